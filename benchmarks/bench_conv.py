"""Benchmark `jaxsparse.nn.SparseConv` against XLA's dense convolution, at a CNN's shapes.

For every dtype x layer shape, in one process, channels last (NHWC / HWIO):

- `lax.conv_general_dilated` with the dense kernel (the baseline every ratio is against),
- im2col + XLA's dense dot (`conv_patches(x) @ kernel`, in the sparse layer's loop over chunks
  of images): what the sparse layer would cost with a dense product, so the patches' share of
  its time shows,
- the sparse convolution (`jaxsparse.nn.conv.sparse_conv`: patches, then `patches @ ws`) for
  each spec of `--specs` (default 1x16@0.25, 1x16@0.1 and 2:4),

each jit-compiled, as the forward alone (`fwd`) and, with `--modes fwd,fwd+bwd`, forward plus
backward as in a training step (y, then the cotangents of x and of the kernel: the dense
kernel's, or the sparse format's trainable values). Every call is warmed up (compiled and run
once) outside the timing and ended by `block_until_ready`; the calls of one (dtype, shape, mode)
are timed in alternation (one call of each in turn, `bench.time_calls`), so a change of a
shared machine's load hits them alike, and each time is a median. `path` is what the format's
product ran (`jaxsparse.choose_path` for the patches' token count).

Usage:
    python benchmarks/bench_conv.py --quick            # two shapes, f32: < 1 minute
    python benchmarks/bench_conv.py                    # the five shapes, f32 and bf16
    python benchmarks/bench_conv.py --specs 1x8@0.25 --dtypes bf16 --modes fwd,fwd+bwd
Writes bench_results/bench_conv.{txt,json} (see --out-dir).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxsparse as jsp
from jaxsparse.nn.conv import conv_geometry, conv_patches, images_per_chunk, sparse_conv

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench.py's harness, beside this file
from bench import DTYPES, git_commit, machine_info, time_calls  # noqa: E402


class Shape(NamedTuple):
    """One convolution of a CNN: `batch x size x size x cin -> cout`, a `k x k` kernel."""

    size: int
    cin: int
    cout: int
    k: int
    stride: int = 1

    def __str__(self) -> str:
        return f"{self.size}x{self.size}x{self.cin}->{self.cout} {self.k}x{self.k}"


# ResNet-50's stages (batch 8): the 3x3 convolutions of each stage and a 1x1 expansion.
SHAPES = (Shape(56, 64, 64, 3), Shape(28, 128, 128, 3), Shape(14, 256, 256, 3),
          Shape(14, 256, 1024, 1), Shape(7, 512, 512, 3))
QUICK_SHAPES = (Shape(28, 128, 128, 3), Shape(14, 256, 1024, 1))
SPECS = "1x16@0.25,1x16@0.1,2:4"
MODES = ("fwd", "fwd+bwd")
DIMS = ("NHWC", "HWIO", "NHWC")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two shapes, f32, fewer repeats")
    p.add_argument("--batch", type=int, default=8, help="images per call (default 8)")
    p.add_argument("--dtypes", default=None, help="comma list of f32,bf16 (quick: f32)")
    p.add_argument("--specs", default=SPECS, help=f"comma list of specs (default {SPECS})")
    p.add_argument("--modes", default="fwd", help="comma list of fwd,fwd+bwd (default fwd)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 10; quick 5)")
    p.add_argument("--out-dir", default="bench_results/", type=Path)
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in (args.dtypes or ("f32" if args.quick else "f32,bf16"))
                   .split(",") if d.strip()]
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"--dtypes: unknown dtype {d!r}; expected f32 or bf16")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r}; expected fwd or fwd+bwd")
    args.specs = [jsp.as_spec(s.strip(), name="--specs") for s in args.specs.split(",")
                  if s.strip()]
    if args.batch < 1:
        p.error(f"--batch must be positive; got {args.batch}")
    args.shapes = QUICK_SHAPES if args.quick else SHAPES
    args.repeats = args.repeats or (5 if args.quick else 10)
    return args


# ====================================================================== the measured functions
def dense_fn(shape: Shape, mode: str):
    """XLA's convolution; with fwd+bwd, y and the cotangents of x and the kernel."""
    def conv(x, kernel):
        return lax.conv_general_dilated(x, kernel, (shape.stride,) * 2, "SAME",
                                        dimension_numbers=DIMS)

    return jax.jit(conv) if mode == "fwd" else step_of(conv)


def im2col_fn(shape: Shape, mode: str):
    """The same patches the sparse layer builds, in the same loop over chunks of images, times
    the dense kernel by XLA's dot."""
    geometry = conv_geometry((shape.k, shape.k), shape.stride, "SAME", where="bench_conv")

    def conv(x, kernel):
        def product(images):
            return conv_patches(images, geometry) @ kernel.reshape(-1, kernel.shape[-1])

        chunk = images_per_chunk(x, geometry)
        if chunk >= x.shape[0]:
            return product(x)
        return lax.map(product, x[:, None], batch_size=chunk)[:, 0]

    return jax.jit(conv) if mode == "fwd" else step_of(conv)


def sparse_fn(shape: Shape, ws, mode: str):
    """The sparse convolution with `ws`'s trainable values as an argument (what a training step
    differentiates) and its frozen arrays closed over."""
    geometry = conv_geometry((shape.k, shape.k), shape.stride, "SAME", where="bench_conv")
    names = ws.array_names()

    def conv(x, values, *frozen):
        weight = ws.from_arrays(ws.spec, ws.in_features, dict(zip(names, (values, *frozen))),
                                validate=False, out_features=ws.out_features)
        return sparse_conv("bench_conv", x, weight, geometry, shape.cin)

    return jax.jit(conv) if mode == "fwd" else step_of(conv)


def step_of(conv):
    """The jitted step: y and the cotangents of x and of the second argument, for g (last)."""
    @jax.jit
    def step(x, w, *rest):
        *frozen, g = rest
        y, vjp = jax.vjp(lambda x, w: conv(x, w, *frozen), x, w)
        return (y, *vjp(g))

    return step


# ====================================================================== one case
def run_case(shape: Shape, dtype_name: str, args) -> list[dict]:
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, shape.size, shape.size, shape.cin)), dtype)
    kernel = rng.standard_normal((shape.k, shape.k, shape.cin, shape.cout))
    kernel = jnp.asarray(kernel / np.sqrt(shape.k * shape.k * shape.cin), dtype)
    out = -(-shape.size // shape.stride)
    g = jnp.asarray(rng.standard_normal((args.batch, out, out, shape.cout)), dtype)
    tokens = args.batch * out * out
    flops = 2.0 * tokens * shape.k * shape.k * shape.cin * shape.cout
    base = {"dtype": dtype_name, "shape": str(shape), "batch": args.batch, "tokens": tokens}
    weights = [(spec, jsp.fromdense(kernel.reshape(-1, shape.cout), spec)) for spec in args.specs]
    rows = []
    for mode in args.modes:
        extra = () if mode == "fwd" else (g,)
        calls = [("xla-conv", 1.0, "-", dense_fn(shape, mode), (x, kernel, *extra)),
                 ("im2col+xla-dot", 1.0, "-", im2col_fn(shape, mode), (x, kernel, *extra))]
        for spec, ws in weights:
            arrays = tuple(ws.arrays().values())
            calls.append((f"sparse {spec}", spec.density,
                          jsp.choose_path(tokens, dtype, spec),
                          sparse_fn(shape, ws, mode), (x, *arrays, *extra)))
        seconds = time_calls([(fn, call_args) for *_, fn, call_args in calls],
                             repeats=args.repeats)
        dense_s = seconds[0]
        for (name, density, path, *_), s in zip(calls, seconds):
            rows.append({**base, "mode": mode, "kernel": name, "density": density, "path": path,
                         "ms": 1e3 * s, "vs_dense": dense_s / s,
                         "dense_equiv_gflops": flops * (1 if mode == "fwd" else 3) / s / 1e9})
    return rows


# ====================================================================== report
HEADER = (f"{'dtype':5} {'shape':22} {'mode':7} {'kernel':18} {'path':6} {'ms':>9} "
          f"{'dGF/s':>7} {'x dense':>7}")


def format_row(r) -> str:
    return (f"{r['dtype']:5} {r['shape']:22} {r['mode']:7} {r['kernel']:18} {r['path']:6} "
            f"{r['ms']:9.3f} {r['dense_equiv_gflops']:7.1f} {r['vs_dense']:7.2f}")


def format_table(rows, meta) -> str:
    lines = [f"jaxsparse conv benchmark  {meta['machine']['cpu']} x{meta['machine']['cpus']}, "
             f"ISA {meta['isa']}, jax {meta['jax']}, commit {meta['commit']}, batch "
             f"{meta['args']['batch']}, NHWC, SAME padding",
             "x dense = xla-conv time / this time (above 1: faster than XLA's convolution); "
             "dGF/s = dense-equivalent GFLOP/s; im2col+xla-dot = the sparse layer's patches "
             "times the dense kernel",
             HEADER, "-" * len(HEADER)]
    return "\n".join(lines + [format_row(r) for r in rows])


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    meta = {"machine": machine_info(), "isa": jsp.cpu_isa(), "jax": jax.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0], "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "devices": [str(d) for d in jax.devices()],
            "args": {"batch": args.batch, "dtypes": args.dtypes, "modes": args.modes,
                     "specs": [str(s) for s in args.specs], "repeats": args.repeats,
                     "shapes": [str(s) for s in args.shapes]}}
    rows = []
    for dtype_name in args.dtypes:
        for shape in args.shapes:
            rows += run_case(shape, dtype_name, args)
            print(f"  done {dtype_name} {shape} ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr, flush=True)
    meta["wall_seconds"] = time.perf_counter() - start
    table = format_table(rows, meta)
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_conv.txt").write_text(table + "\n")
    (args.out_dir / "bench_conv.json").write_text(
        json.dumps({**meta, "results": rows}, indent=1) + "\n")
    print(f"wrote {args.out_dir}/bench_conv.{{txt,json}} in {meta['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
