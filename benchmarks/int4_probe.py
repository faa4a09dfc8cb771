"""Times the int4 CPU kernels against XLA's dense dot of the same dtype, in one process.

    python benchmarks/int4_probe.py                                   # 4096x4096, 16/128/2048 tokens
    python benchmarks/int4_probe.py --tokens 128 --dtypes bf16 --forms 2:4 --shapes 4096x11008

Calls the primitives (jaxsparse.ops.int4_matmul, int4_nm_matmul: always the kernel, whatever the
dispatch table would pick) on random codes and scales (group 128 by default), x[T, K] @ W[K, N].
Each row times the kernel and XLA's dot of the dequantised weight interleaved (kernel, dense,
kernel, ...) and reports the medians, their ratio and the ratio of the minima: the machines this
runs on are shared and noisy, so only ratios measured side by side mean much. The dense weight is
resident (the dot reads 4-8x the kernel's bytes): at 16+ tokens both sides are compute-bound.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxsparse as jsp
from jaxsparse import ops

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4096x4096", help="comma list of INxOUT")
    parser.add_argument("--tokens", default="16,128,2048", help="comma list")
    parser.add_argument("--dtypes", default="f32,bf16", help="comma list of f32,bf16,f16")
    parser.add_argument("--forms", default="dense,2:4", help="comma list of dense,2:4")
    parser.add_argument("--group", type=int, default=128, help="group size (-1: per column)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of each side")
    return parser.parse_args(argv)


def weight_of(form: str, k: int, n: int, group: int, dtype) -> jsp.SparseFormat:
    """A random int4 weight of the form, quantised from a normal draw."""
    w = jnp.asarray(np.random.default_rng(0).standard_normal((k, n), np.float32), dtype)
    spec = jsp.Int4(group_size=None if group < 0 else group,
                    sparsity=jsp.NM(2, 4) if form == "2:4" else None)
    return jsp.fromdense(w, spec)


def kernel_call(form: str, ws: jsp.SparseFormat):
    """The jitted primitive of the form on the weight's arrays (always the CPU kernel)."""
    group = ws.scales.shape[-2] and ws.in_features // ws.scales.shape[-2]
    q, s = ws.qweight[None], ws.scales[None]
    if form == "2:4":
        pos = ws.positions[None]
        return jax.jit(lambda x: ops.int4_nm_matmul(x[None], q, pos, s, group_size=group)[0])
    return jax.jit(lambda x: ops.int4_matmul(x[None], q, s, group_size=group)[0])


def time_alternating(calls, x, repeats: int) -> list[list[float]]:
    """Seconds of each call over `repeats` rounds, one call of each per round."""
    for fn in calls:
        jax.block_until_ready(fn(x))
    times = [[] for _ in calls]
    for _ in range(repeats):
        for fn, out in zip(calls, times):
            start = time.perf_counter()
            jax.block_until_ready(fn(x))
            out.append(time.perf_counter() - start)
    return times


def run(args) -> None:
    print(f"machine: {platform.processor() or platform.machine()}, {jax.device_count()} device(s), "
          f"jax {jax.__version__}")
    print("| form | dtype | T | K x N | kernel ms | XLA dot ms | speedup (medians) | minima |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            for form in args.forms.split(","):
                ws = weight_of(form, k, n, args.group, dtype)
                dense_w = ws.todense()
                dense = jax.jit(lambda x, w=dense_w: x @ w)
                kernel = kernel_call(form, ws)
                for t in (int(v) for v in args.tokens.split(",")):
                    x = jnp.asarray(np.random.default_rng(1).standard_normal((t, k), np.float32),
                                    dtype)
                    kt, dt = time_alternating([kernel, dense], x, args.repeats)
                    km, dm = np.median(kt), np.median(dt)
                    print(f"| {form} | {dtype_name} | {t} | {k} x {n} | {1e3 * km:.2f} | "
                          f"{1e3 * dm:.2f} | {dm / km:.2f}x | {min(dt) / min(kt):.2f}x |",
                          flush=True)


if __name__ == "__main__":
    run(parse_args())
