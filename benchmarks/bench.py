"""Benchmark jaxsparse's formats against XLA dense, BCOO and numpy, with a roofline.

For every dtype x shape (in, out) x tokens, in one process:

- XLA's dense dot of the same shape and dtype (the baseline every speedup is against),
- jaxsparse (`x @ ws`) for each spec of `--specs`, any registered format: N:M (`2:4`), V:N:M
  (`64:2:8`), ...,
- `jax.experimental.sparse` BCOO at the 2:4 pattern where its estimated memory is < 4 GB,
- numpy's matmul (float32 only: numpy has no bfloat16 BLAS),

each as the forward alone (`fwd`) and forward plus backward as in a training step (`fwd+bwd`:
y, then the cotangents of x and of the weight values). Times are medians of `--repeats` calls after
a warm-up (compile + one call) outside the timing, each call ended by `block_until_ready` (short
calls get more repeats, up to a quarter of a second of them). A jaxsparse call shorter than a tenth
of a second is timed in alternation with XLA's dot of the same mode, and its speedup is against
that second timing (`PAIR_BELOW_SECONDS`), so a drift of a shared machine's load hits both alike.

The machine's ceilings are measured first: peak FLOP/s per dtype from a jnp.dot of a
cache-friendly size, memory bandwidth from a large-array copy. Each kernel's effective FLOP/s is
reported against the roofline `min(peak, intensity * bandwidth)`.

Usage:
    python benchmarks/bench.py --quick                 # < 2 minutes
    python benchmarks/bench.py                         # the full grid (N:M and V:N:M)
    python benchmarks/bench.py --specs 64:2:8,128:2:16 --tokens 128,2048 --dtypes f32
Writes bench_results/bench.{txt,json,png} (see --out-dir).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

import jaxsparse as jsp
from jaxsparse.ops import dispatch

FULL_TOKENS = (1, 16, 128, 2048)
FULL_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
FULL_SPECS = ("1:4", "2:4", "2:8", "4:8", "64:2:8", "128:2:16", "64:2:32")
QUICK_TOKENS = (1, 128)
QUICK_SHAPES = ((4096, 4096),)
# `--grid model`: the layers of small real models (MiniLM's 384 and 1536, BERT-base's 768 and
# 3072), where "never slower" must hold too.
MODEL_SIDES = (384, 768, 1536, 3072)
MODEL_SHAPES = tuple((k, n) for k in MODEL_SIDES for n in MODEL_SIDES)
MODEL_TOKENS = (1, 32, 512, 4096)
NEVER_SLOWER = 0.95  # `x @ ws` at less than this fraction of XLA's dot is listed.
BCOO_MEMORY_LIMIT = 4 * 2**30
BCOO_PATTERN = "2:4"
MODES = ("fwd", "fwd+bwd")
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


# ====================================================================== arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small grid, one small BCOO case")
    p.add_argument("--grid", choices=("harness", "model"), default="harness",
                   help="harness: 4096/11008 shapes at 1-2048 tokens; model: in, out in "
                        "{384, 768, 1536, 3072} at 1-4096 tokens")
    p.add_argument("--out-dir", default="bench_results/", type=Path)
    p.add_argument("--dtypes", default="f32,bf16", help="comma list of f32,bf16")
    p.add_argument("--specs", "--patterns", dest="specs", default=",".join(FULL_SPECS),
                   help="comma list of specs of any format: n:m (N:M), v:n:m (V:N:M), "
                        "int4[:gG|:channel][+2:4] (int4)")
    p.add_argument("--tokens", default=None, help="comma list (1,16,128,2048; quick 1,128)")
    p.add_argument("--shapes", default=None, help="comma list of INxOUT (quick: 4096x4096)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 10; quick 7)")
    p.add_argument("--no-extras", action="store_true",
                   help="skip the BCOO and numpy rows (the default of --grid model)")
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"--dtypes: unknown dtype {d!r}; expected f32 or bf16")
    args.specs = [jsp.as_spec(s.strip(), name="--specs") for s in args.specs.split(",")
                  if s.strip()]
    default_tokens = QUICK_TOKENS if args.quick else FULL_TOKENS
    default_shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.grid == "model":
        default_tokens, default_shapes = MODEL_TOKENS, MODEL_SHAPES
    args.tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else list(default_tokens)
    shapes = args.shapes
    args.shapes = [parse_shape(s) for s in shapes.split(",")] if shapes else default_shapes
    args.repeats = args.repeats or (7 if args.quick else 10)
    args.no_extras = args.no_extras or args.grid == "model"
    return args


def parse_shape(text: str) -> tuple[int, int]:
    k, n = (int(v) for v in text.strip().lower().split("x"))
    return k, n


# ====================================================================== timing
def time_call(fn, *args, repeats: int) -> float:
    """Median seconds of `fn(*args)` after a warm-up (compile + one call) outside the timing.

    An argument may be a `Rotating` list of equal arrays: call i then takes copy i % len, so a
    weight read from memory is not left in the last-level cache by the previous call.
    """
    return time_calls([(fn, args)], repeats=repeats)[0]


def time_calls(calls, repeats: int) -> list[float]:
    """Median seconds of each `(fn, args)` of `calls`, called in alternation (one call of each
    in turn), so a change of the machine's load during the timing hits them alike; arguments
    as in `time_call`."""
    def call(fn, args, i):
        return fn(*(a[i % len(a)] if isinstance(a, Rotating) else a for a in args))

    first = 0.0
    for fn, args in calls:
        jax.block_until_ready(call(fn, args, 0))
        start = time.perf_counter()
        jax.block_until_ready(call(fn, args, 1))
        first += time.perf_counter() - start
    repeats = min(repeats, 3) if first > 1.0 else repeats  # Keep the full grid's slow cases short.
    # Short calls get more repeats, up to ~SHORT_CALL_SECONDS in all: a median of 10 sub-ms calls
    # on a shared machine swung single cells by up to 1.5x between runs.
    repeats = max(repeats, min(MAX_REPEATS, int(SHORT_CALL_SECONDS / max(first, 1e-6))))
    times = [[] for _ in calls]
    for i in range(repeats):
        for (fn, args), spent in zip(calls, times):
            start = time.perf_counter()
            jax.block_until_ready(call(fn, args, i))
            spent.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


SHORT_CALL_SECONDS = 0.25
MAX_REPEATS = 200


class Rotating(list):
    """Copies of one operand that `time_call` cycles through."""


# Weight copies cycled through at few tokens: together over twice a 32 MB last-level cache, so
# every call streams its weight from DRAM as in a model with many layers (one copy of a
# 40 MB 2:4 weight would stay mostly cached between calls, a 64 MB dense one would not). Small
# weights get as many copies as that takes: 4 copies of a 5 MB 64:2:32 weight (the earlier cap)
# fit in the cache together, and its calls were timed on cache hits.
ROTATE_TOKENS = 16
ROTATE_BYTES = 96 * 2**20
ROTATE_MAX_COPIES = 64


def rotating(a, tokens, weight_bytes=None):
    """`a`, or a Rotating set of distinct copies of it when the weight stream dominates. The
    arrays of one sparse weight pass its total `weight_bytes`: all get the same number of copies."""
    if tokens > ROTATE_TOKENS:
        return a
    weight_bytes = a.nbytes if weight_bytes is None else weight_bytes
    copies = int(min(ROTATE_MAX_COPIES, max(2, -(-ROTATE_BYTES // max(1, weight_bytes)))))
    return Rotating([a] + [a + jnp.zeros((), a.dtype) * i for i in range(1, copies)])


# ====================================================================== ceilings
def measure_peak_flops(dtype, repeats: int) -> float:
    """FLOP/s of XLA's dense dot at cache-friendly sizes (best of 1024^3, 2048^3): the peak."""
    best = 0.0
    for size in (1024, 2048):
        a = jnp.ones((size, size), dtype)
        seconds = time_call(jax.jit(jnp.dot), a, a, repeats=repeats)
        best = max(best, 2 * size**3 / seconds)
    return best


def measure_bandwidth(repeats: int) -> float:
    """Bytes/s of reading a 512 MiB f32 array (a sum): the memory ceiling.

    A read-only loop: a copy would time page faults on its freshly allocated output as well.
    """
    a = jnp.ones((128 * 2**20,), jnp.float32)
    seconds = time_call(jax.jit(jnp.sum), a, repeats=repeats)
    return a.nbytes / seconds


def measure_ceilings(dtype_names, repeats: int) -> dict:
    peaks = {name: measure_peak_flops(DTYPES[name], repeats) for name in dtype_names}
    return {"peak_gflops": {k: v / 1e9 for k, v in peaks.items()},
            "bandwidth_gbs": measure_bandwidth(repeats) / 1e9}


# ====================================================================== operands
def make_operands(tokens, k, n, dtype, seed=0):
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (tokens, k), dtype)
    w = (jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    g = jax.random.normal(kg, (tokens, n), dtype)
    return x, w, g


def with_arrays(ws: jsp.SparseFormat, arrays) -> jsp.SparseFormat:
    """`ws` with its arrays replaced (timed copies), unvalidated like inside a jitted step."""
    names = ws.array_names()
    return ws.from_arrays(ws.spec, ws.in_features, dict(zip(names, arrays)), validate=False,
                          out_features=ws.out_features)


def kernel_name(spec) -> str:
    return f"{type(spec).__name__.lower()} {spec}"


# ====================================================================== the measured functions
def dense_fns():
    fwd = jax.jit(lambda x, w: x @ w)

    @jax.jit
    def step(x, w, g):
        y, vjp = jax.vjp(lambda x, w: x @ w, x, w)
        return (y, *vjp(g))

    return fwd, step


def sparse_fns(ws: jsp.SparseFormat, path: str):
    """`x @ ws` (path "auto": what a user gets) or one forced path; the step differentiates x and
    the trainable values (the first array), or x alone for a frozen weight (int4)."""
    def product(x, values, *frozen):
        return jsp.matmul(x, with_arrays(ws, (values, *frozen)), path=path)

    trainable = bool(ws.arrays_with_role(jsp.formats.TRAINABLE))
    return jax.jit(product), training_step(product, trainable)


def training_step(product, trainable: bool = True):
    """The jitted step of `product(x, values, *frozen)`: y and the cotangents of x and (when
    `trainable`) the values for the cotangent g (the last argument)."""
    @jax.jit
    def step(x, values, *rest):
        *frozen, g = rest
        if not trainable:  # A frozen base (adapters train beside it): y and dx.
            y, vjp = jax.vjp(lambda x: product(x, values, *frozen), x)
            return (y, *vjp(g))
        y, vjp = jax.vjp(lambda x, v: product(x, v, *frozen), x, values)
        return (y, *vjp(g))

    return step


def bcoo_fns(wb: jsparse.BCOO):
    def product(x, data):
        return x @ jsparse.BCOO((data, wb.indices), shape=wb.shape)

    fwd = jax.jit(product)

    @jax.jit
    def step(x, data, g):
        y, vjp = jax.vjp(product, x, data)
        return (y, *vjp(g))

    return fwd, step


def numpy_fwd(x, w):
    return x @ w


def numpy_step(x, w, g):
    return x @ w, g @ w.T, x.T @ g


# ====================================================================== bytes and flops
def dense_flops(tokens, k, n, mode) -> float:
    """Dense-equivalent FLOPs: 2TKN for y, as much again for each of dx and dW."""
    return 2.0 * tokens * k * n * (1 if mode == "fwd" else 3)


def dense_bytes(tokens, k, n, isz, mode) -> float:
    fwd = isz * (tokens * k + k * n + tokens * n)
    # dx = g W^T reads g, W, writes dx; dW = x^T g reads x, g, writes dW.
    bwd = isz * (tokens * n + k * n + tokens * k) + isz * (tokens * k + tokens * n + k * n)
    return fwd if mode == "fwd" else fwd + bwd


def sparse_bytes(tokens, k, n, isz, weight_bytes, mode) -> float:
    """x and y, plus the weight's canonical arrays (`ws.nbytes`), once per product."""
    fwd = isz * (tokens * k + tokens * n) + weight_bytes
    bwd = (isz * (tokens * n + tokens * k) + weight_bytes
           + isz * (tokens * k + tokens * n) + weight_bytes)
    return fwd if mode == "fwd" else fwd + bwd


def bcoo_memory_estimate(tokens, k, n, isz, density) -> float:
    """BCOO's CPU dot gathers one x column per stored entry: ~T*nse values, plus the matrix."""
    nse = k * n * density
    return nse * (2 * 4 + isz) + 3 * tokens * nse * isz


# ====================================================================== one case
def run_case(tokens, k, n, dtype_name, args, bcoo_done: list) -> list[dict]:
    """All kernels and modes for one (dtype, shape, tokens); returns result rows."""
    dtype = DTYPES[dtype_name]
    isz = jnp.dtype(dtype).itemsize
    x, w, g = make_operands(tokens, k, n, dtype)
    base = {"dtype": dtype_name, "tokens": tokens, "in": k, "out": n}
    rows, dense_t, dense_calls = [], {}, {}
    w_timed = rotating(w, tokens)
    for mode, fn in zip(MODES, dense_fns()):
        dense_calls[mode] = (fn, (x, w_timed, *((g,) if mode != "fwd" else ())))
        t = time_calls([dense_calls[mode]], repeats=args.repeats)[0]
        dense_t[mode] = t
        rows.append(row(base, "xla-dense", mode, t, 1.0, dense_bytes(tokens, k, n, isz, mode)))
    if not args.no_extras:
        rows += numpy_rows(base, x, w, g, dense_t, args)
    for spec in args.specs:
        ws = jsp.fromdense(w, spec)
        density = spec.density
        arrays_timed = [rotating(a, tokens, ws.nbytes) for a in ws.arrays().values()]
        chosen = jsp.choose_path(tokens, dtype, spec)
        # `x @ ws` as a user gets it; where the rule picks another path, the kernel forced too.
        runs = [("auto", kernel_name(spec))]
        if chosen != "sparse":
            runs.append(("sparse", kernel_name(spec) + "!"))
        for path, name in runs:
            for mode, fn in zip(MODES, sparse_fns(ws, path)):
                extra = (g,) if mode != "fwd" else ()
                t, against = timed_against_dense(fn, (x, *arrays_timed, *extra),
                                                 dense_calls[mode], dense_t[mode], args.repeats)
                nbytes = sparse_bytes(tokens, k, n, isz, ws.nbytes, mode)
                r = row(base, name, mode, t, density, nbytes, {mode: against})
                rows.append({**r, "path": chosen if path == "auto" else path,
                             "dense_ms_against": against * 1e3})
        rows += tiled_rows(base, ws, x, dense_calls["fwd"], dense_t["fwd"], args)
    if not args.no_extras:
        rows += bcoo_rows(base, x, w, g, dense_t, args, bcoo_done)
    return rows


def inference_form(ws):
    """`(weight, suffix)`: the format's inference form packed once (V:N:M's `with_tiles()` in bf16
    and f32, " tiled"; int4's and int4 + 2:4's `with_lines()`, " lines"), or None."""
    if hasattr(ws, "with_tiles") and jsp.ops.vnm.has_tiles(ws.dtype):
        return ws.with_tiles(), " tiled"
    if isinstance(ws, (jsp.Int4Weight, jsp.Int4NMWeight)) and not ws.activations:
        return ws.with_lines(), " lines"
    return None


def tiled_rows(base, ws, x, dense_call, dense_seconds, args) -> list[dict]:
    """The inference form's forward (`inference_form`), kernel "<spec> tiled" or "<spec> lines";
    none for other formats and dtypes."""
    form = inference_form(ws)
    if form is None:
        return []
    wt, suffix = form
    arrays_timed = [rotating(a, base["tokens"], wt.nbytes) for a in wt.arrays().values()]
    fwd, _ = sparse_fns(wt, "auto")
    t, against = timed_against_dense(fwd, (x, *arrays_timed), dense_call, dense_seconds,
                                     args.repeats)
    isz = jnp.dtype(ws.dtype).itemsize
    nbytes = sparse_bytes(base["tokens"], base["in"], base["out"], isz, wt.nbytes, "fwd")
    r = row(base, kernel_name(ws.spec) + suffix, "fwd", t, ws.spec.density, nbytes,
            {"fwd": against})
    path = jsp.choose_path(base["tokens"], ws.dtype, ws.spec)
    return [{**r, "path": path, "dense_ms_against": against * 1e3}]


# XLA's dot is timed again in alternation with each jaxsparse call shorter than this, and that
# call's speedup is against it: on a shared 2-vCPU VM, cells of 0.1-2 ms timed one function after
# the other disagreed with alternating probes by more than the 0.95x margin being judged
# (docs/cpu_speed_notes.md, seventh round). Longer calls keep the dense time of the xla-dense row.
PAIR_BELOW_SECONDS = 0.1


def timed_against_dense(fn, args, dense_call, dense_seconds, repeats) -> tuple[float, float]:
    """(seconds of fn(*args), seconds of XLA's dot to compare them with)."""
    if dense_seconds >= PAIR_BELOW_SECONDS:
        return time_calls([(fn, args)], repeats=repeats)[0], dense_seconds
    t, against = time_calls([(fn, args), dense_call], repeats=repeats)
    return t, against


def numpy_rows(base, x, w, g, dense_t, args) -> list[dict]:
    if base["dtype"] != "f32":
        return [skip_row(base, "numpy", mode, "no bf16 BLAS in numpy") for mode in MODES]
    xn, wn, gn = np.asarray(x), np.asarray(w), np.asarray(g)
    rows = []
    for mode, fn, extra in (("fwd", numpy_fwd, ()), ("fwd+bwd", numpy_step, (gn,))):
        t = time_call(fn, xn, wn, *extra, repeats=args.repeats)
        nbytes = dense_bytes(base["tokens"], base["in"], base["out"], 4, mode)
        rows.append(row(base, "numpy", mode, t, 1.0, nbytes, dense_t))
    return rows


def bcoo_rows(base, x, w, g, dense_t, args, bcoo_done: list) -> list[dict]:
    spec = jsp.as_spec(BCOO_PATTERN)
    name, density = f"bcoo {BCOO_PATTERN}", spec.density
    isz = jnp.dtype(x.dtype).itemsize
    estimate = bcoo_memory_estimate(base["tokens"], base["in"], base["out"], isz, density)
    if estimate >= BCOO_MEMORY_LIMIT:
        reason = f"est. {estimate / 2**30:.1f} GB >= 4 GB"
        return [skip_row(base, name, mode, reason) for mode in MODES]
    if args.quick and bcoo_done:
        return [skip_row(base, name, mode, "quick mode: one case only") for mode in MODES]
    bcoo_done.append(True)
    ws = jsp.fromdense(w, spec)
    wb = jsparse.BCOO.fromdense(ws.todense())
    rows = []
    for mode, fn in zip(MODES, bcoo_fns(wb)):
        t = time_call(fn, x, wb.data, *((g,) if mode != "fwd" else ()), repeats=args.repeats)
        nbytes = sparse_bytes(base["tokens"], base["in"], base["out"], isz, ws.nbytes, mode)
        rows.append(row(base, name, mode, t, density, nbytes, dense_t))
    return rows


def row(base, kernel, mode, seconds, density, nbytes, dense_t=None) -> dict:
    flops = dense_flops(base["tokens"], base["in"], base["out"], mode)
    speedup = dense_t[mode] / seconds if dense_t else 1.0
    return {**base, "kernel": kernel, "mode": mode, "density": density, "ms": seconds * 1e3,
            "dense_equiv_gflops": flops / seconds / 1e9,
            "effective_gflops": flops * density / seconds / 1e9,
            "gbs": nbytes / seconds / 1e9, "intensity": flops * density / nbytes,
            "speedup": speedup, "ideal_speedup": 1 / density,
            "fraction_of_ideal": speedup * density, "skipped": None, "path": ""}


def skip_row(base, kernel, mode, reason) -> dict:
    return {**base, "kernel": kernel, "mode": mode, "skipped": reason, "path": ""}


def add_roofline(rows, ceilings) -> None:
    """Attainable = min(peak, intensity * bandwidth); record each kernel's fraction of it."""
    bw = ceilings["bandwidth_gbs"]
    for r in rows:
        if r["skipped"]:
            continue
        peak = ceilings["peak_gflops"][r["dtype"]]
        r["roofline_gflops"] = min(peak, r["intensity"] * bw)
        r["bound"] = "compute" if peak <= r["intensity"] * bw else "memory"
        r["fraction_of_roofline"] = r["effective_gflops"] / r["roofline_gflops"]


# ====================================================================== reporting
HEADER = (f"{'dtype':5} {'shape':>11} {'T':>5} {'kernel':18} {'path':6} {'mode':8} {'ms':>9} "
          f"{'dGF/s':>7} {'eGF/s':>7} {'GB/s':>6} {'speedup':>7} {'ideal':>5} {'%ideal':>6} "
          f"{'%roof':>6} bound")


def format_row(r) -> str:
    shape = f"{r['in']:>5}x{r['out']:<5}"
    head = (f"{r['dtype']:5} {shape} {r['tokens']:>5} {r['kernel']:18} {r['path']:6} "
            f"{r['mode']:8}")
    if r["skipped"]:
        return f"{head} {'skipped: ' + r['skipped']:>9}"
    return (f"{head} {r['ms']:9.3f} {r['dense_equiv_gflops']:7.1f} {r['effective_gflops']:7.1f} "
            f"{r['gbs']:6.1f} {r['speedup']:7.2f} {r['ideal_speedup']:5.1f} "
            f"{100 * r['fraction_of_ideal']:5.0f}% {100 * r['fraction_of_roofline']:5.0f}% "
            f"{r['bound']}")


def format_table(rows, ceilings, meta) -> str:
    peaks = ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in ceilings["peak_gflops"].items())
    lines = [f"jaxsparse benchmark  {meta['machine']['cpu']} x{meta['machine']['cpus']}, "
             f"ISA {meta['isa']}, jax {meta['jax']}, commit {meta['commit']}",
             f"ceilings: peak (best jnp.dot 1024^3/2048^3) {peaks}; bandwidth (512 MiB sum) "
             f"{ceilings['bandwidth_gbs']:.1f} GB/s",
             "dGF/s = dense-equivalent GFLOP/s, eGF/s = effective (stored entries only); "
             "speedup over xla-dense, same dtype/shape/mode; ideal = 1/density; "
             "%roof = eGF/s / min(peak, intensity*bandwidth); path = what `x @ ws` ran "
             "(jsp.choose_path); 'nm n:m!' = the sparse kernel forced where the rule picks the "
             "engine or dense; "
             "ideal = 1/density (the bytes allow less: see GB/s and %roof)",
             HEADER, "-" * len(HEADER)]
    lines += [format_row(r) for r in rows]
    return "\n".join(lines + ["", *slower_than_dense(rows)])


def slower_than_dense(rows) -> list[str]:
    """The cells where `x @ ws`, as the rule chose, ran below NEVER_SLOWER of XLA's dot."""
    slow = [r for r in rows if not r["skipped"] and r["path"] and not r["kernel"].endswith("!")
            and r["speedup"] < NEVER_SLOWER]
    if not slow:
        return [f"Every `x @ ws` ran at {NEVER_SLOWER}x of XLA's dense dot or more."]
    return [f"Below {NEVER_SLOWER}x of XLA's dense dot ({len(slow)} cells, `x @ ws` as chosen):"
            ] + ["  " + format_row(r) for r in slow]


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    kernels = [k for k in dict.fromkeys(r["kernel"] for r in rows) if k != "xla-dense"]
    colors = {k: f"C{i}" for i, k in enumerate(kernels)}  # One color per kernel in every panel.
    fig, axes = plt.subplots(len(dtypes), len(MODES), figsize=(12, 4 * len(dtypes)), squeeze=False)
    for row_axes, dtype in zip(axes, dtypes):
        for ax, mode in zip(row_axes, MODES):
            plot_panel(ax, [r for r in rows if (r["dtype"], r["mode"]) == (dtype, mode)], colors)
            ax.set_title(f"{dtype} {mode}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_panel(ax, rows, colors) -> None:
    cases = sorted({(r["in"], r["out"], r["tokens"]) for r in rows})
    labels = [f"{k}x{n}\nT={t}" for k, n, t in cases]
    for kernel, color in colors.items():
        by_case = {(r["in"], r["out"], r["tokens"]): r for r in rows
                   if r["kernel"] == kernel and not r["skipped"]}
        xs = [i for i, c in enumerate(cases) if c in by_case]
        if xs:
            ax.plot(xs, [by_case[cases[i]]["speedup"] for i in xs], "o-", color=color,
                    label=kernel)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(cases)), labels, fontsize=7)
    ax.set_ylabel("speedup over XLA dense")
    ax.set_yscale("log")
    ax.legend(fontsize=7)


# ====================================================================== metadata
def metadata(args) -> dict:
    return {"machine": machine_info(), "isa": jsp.cpu_isa(), "jax": jax.__version__,
            "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
            "numpy": np.__version__, "python": sys.version.split()[0], "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "devices": [str(d) for d in jax.devices()],
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}


def machine_info() -> dict:
    return {"node": platform.node(), "system": platform.platform(), "cpu": dispatch.cpu_model(),
            "cpus": os.cpu_count()}


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, text=True, capture_output=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ====================================================================== main
def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    meta = metadata(args)
    ceilings = measure_ceilings(args.dtypes, args.repeats)
    rows, bcoo_done = [], []
    for dtype_name in args.dtypes:
        for k, n in args.shapes:
            for tokens in args.tokens:
                rows += run_case(tokens, k, n, dtype_name, args, bcoo_done)
                print(f"  done {dtype_name} {k}x{n} T={tokens} "
                      f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    add_roofline(rows, ceilings)
    meta["wall_seconds"] = time.perf_counter() - start
    write_outputs(args.out_dir, rows, ceilings, meta)


def write_outputs(out_dir: Path, rows, ceilings, meta) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(rows, ceilings, meta)
    print(table)
    (out_dir / "bench.txt").write_text(table + "\n")
    payload = {**meta, "ceilings": ceilings, "results": rows}
    (out_dir / "bench.json").write_text(json.dumps(payload, indent=1) + "\n")
    plot(rows, out_dir / "bench.png")
    print(f"wrote {out_dir}/bench.{{txt,json,png}} in {meta['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
