"""Times N:M's three paths (the N:M kernel, the shared engine, the dense path) against XLA's
dense dot of the same dtype, interleaved in one process; beside them "u8", the N:M kernel reading
the uint8 positions (`nm_spmm`), where "sparse" at 256 tokens or fewer is the packed forward
reading 2-bit ones (`nm_spmm_packed`: 2:4 and 1:4).

    python benchmarks/nm_engine_probe.py                                  # 2:4, bf16 and f32
    python benchmarks/nm_engine_probe.py --specs 2:4,1:4 --dtypes bf16 --tokens 16,32,128 \\
        --shapes 4096x4096,768x3072 --modes fwd,fwd+bwd

Per (dtype, shape, tokens, spec), every candidate runs in turn, call after call (xla, sparse,
engine, dense, xla, ...), `--repeats` rounds after a warm-up, and the table gives medians and
each path's ratio to XLA's dot (above 1: faster). `fwd+bwd` is a training step's product: y,
then the cotangents of x and of the kept values (of the dense weight for XLA). At 16 tokens or
fewer each call takes the next of several weight copies (bench.py's rotation), so the weights
stream from memory. The machine and jax version head the table; --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax

import jaxsparse as jsp
from bench import (DTYPES, Rotating, dense_fns, machine_info, make_operands, parse_shape,
                   rotating, sparse_fns, training_step)

PATHS = ("sparse", "engine", "dense")
COLUMNS = ("u8", *PATHS)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default="2:4")
    ap.add_argument("--dtypes", default="bf16,f32")
    ap.add_argument("--shapes", default="4096x4096")
    ap.add_argument("--tokens", default="1,16,32,128,512,2048")
    ap.add_argument("--modes", default="fwd")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def interleaved_medians(candidates: dict, repeats: int) -> dict:
    """Median seconds per candidate `name: (fn, args)`, the candidates called in turn."""
    def call(fn, args, i):
        return fn(*(a[i % len(a)] if isinstance(a, Rotating) else a for a in args))

    for fn, args in candidates.values():  # Compile and warm up.
        jax.block_until_ready(call(fn, args, 0))
        jax.block_until_ready(call(fn, args, 1))
    times = {name: [] for name in candidates}
    for i in range(repeats):
        for name, (fn, args) in candidates.items():
            start = time.perf_counter()
            jax.block_until_ready(call(fn, args, i))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def uint8_fns(ws):
    """`x @ ws` on the N:M kernel that reads the uint8 positions (`nm_spmm`), whatever the token
    count: the forward before the 2-bit positions; the step differentiates x and the values."""
    def product(x, values, indices, *_):
        y = jsp.ops.nm_spmm(x[None], values[None], indices[None], n=ws.n, m=ws.m)
        return y[0]

    return jax.jit(product), training_step(product)


def run_case(dtype_name, k, n, tokens, spec, mode, repeats):
    x, w, g = make_operands(tokens, k, n, DTYPES[dtype_name])
    ws = jsp.fromdense(w, spec)
    extra = (g,) if mode == "fwd+bwd" else ()
    pick = 0 if mode == "fwd" else 1
    arrays = [rotating(a, tokens, ws.nbytes) for a in ws.arrays().values()]
    candidates = {"xla": (dense_fns()[pick], (x, rotating(w, tokens), *extra)),
                  "u8": (uint8_fns(ws)[pick], (x, *arrays, *extra))}
    for path in PATHS:
        candidates[path] = (sparse_fns(ws, path)[pick], (x, *arrays, *extra))
    med = interleaved_medians(candidates, repeats)
    return {"dtype": dtype_name, "in": k, "out": n, "tokens": tokens, "spec": str(spec),
            "mode": mode, "auto": jsp.choose_path(tokens, DTYPES[dtype_name], spec),
            **{f"{name}_ms": s * 1e3 for name, s in med.items()},
            **{f"{p}_x": med["xla"] / med[p] for p in COLUMNS}}


def main(argv=None):
    args = parse_args(argv)
    info = machine_info()
    print(f"# {info.get('cpu', '?')}, jax {jax.__version__}, jaxsparse ISA {jsp.cpu_isa()}")
    print(f"# {'dtype':5} {'shape':>11} {'T':>5} {'spec':>5} {'mode':>7} {'xla ms':>8} "
          + " ".join(f"{p:>8}" for p in COLUMNS) + "  auto")
    rows = []
    for dtype_name in args.dtypes.split(","):
        for shape in args.shapes.split(","):
            k, n = parse_shape(shape)
            for tokens in (int(t) for t in args.tokens.split(",")):
                for spec in (jsp.as_spec(s) for s in args.specs.split(",")):
                    for mode in args.modes.split(","):
                        r = run_case(dtype_name, k, n, tokens, spec, mode, args.repeats)
                        rows.append(r)
                        print(f"  {dtype_name:5} {k:>5}x{n:<5} {tokens:>5} {str(spec):>5} "
                              f"{mode:>7} {r['xla_ms']:8.2f} "
                              + " ".join(f"{r[p + '_x']:7.2f}x" for p in COLUMNS)
                              + f"  {r['auto']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
