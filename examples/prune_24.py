"""Prune a weight to 2:4 and compare the sparse product with the dense one: error, memory, time.

    python examples/prune_24.py [--tokens 128] [--in-features 4096] [--out-features 4096]

The weight is a Gaussian matrix, the hard case for magnitude pruning (no outliers to keep); the
trained-model workflow is examples/digits.py. Times are medians of interleaved runs in this one process.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxsparse as jsp


def median_ms(fn, *args, repeats):
    fn(*args).block_until_ready()  # warm-up: compile outside the timing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--out-features", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)

    kw, kx = jax.random.split(jax.random.key(0))
    w = jax.random.normal(kw, (args.in_features, args.out_features), dtype)
    x = jax.random.normal(kx, (args.tokens, args.in_features), dtype)

    ws = jsp.NMSparse.fromdense(w, n=2, m=4)
    w_pruned = ws.todense()
    kept = float(jnp.sum(jnp.abs(w_pruned.astype(jnp.float32))) / jnp.sum(jnp.abs(w.astype(jnp.float32))))

    sparse = jax.jit(lambda x, ws: x @ ws)
    dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
    y_sparse = sparse(x, ws).astype(jnp.float32)
    y_pruned = dense(x, w_pruned).astype(jnp.float32)
    y_full = dense(x, w).astype(jnp.float32)
    err = float(jnp.linalg.norm(y_sparse - y_pruned) / jnp.linalg.norm(y_pruned))
    drift = float(jnp.linalg.norm(y_pruned - y_full) / jnp.linalg.norm(y_full))

    # Interleave the two timings so the shared machine's noise hits both alike.
    dense_ms, sparse_ms = [], []
    for _ in range(3):
        dense_ms.append(median_ms(dense, x, w, repeats=args.repeats))
        sparse_ms.append(median_ms(sparse, x, ws, repeats=args.repeats))
    dense_t, sparse_t = statistics.median(dense_ms), statistics.median(sparse_ms)

    print(f"jaxsparse 2:4 on {platform.processor() or platform.machine()}, jax {jax.__version__}, "
          f"CPU kernels: {jsp.cpu_isa()}")
    print(f"weight [{args.in_features}, {args.out_features}] {dtype.name}, x [{args.tokens}, "
          f"{args.in_features}]")
    print(f"  kept magnitude after 2:4 pruning     {kept:8.1%}")
    print(f"  ||x@ws - x@prune(w)|| / ||x@prune(w)|| {err:8.2e}   (kernel vs dense of the same weight)")
    print(f"  ||x@prune(w) - x@w|| / ||x@w||       {drift:8.2%}   (what pruning changed)")
    print(f"  weight memory: dense {w.nbytes / 2**20:7.1f} MiB, 2:4 {ws.nbytes / 2**20:7.1f} MiB")
    print(f"  time, median: dense dot {dense_t:8.2f} ms, 2:4 {sparse_t:8.2f} ms, "
          f"speedup {dense_t / sparse_t:5.2f}x")
    tolerance = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}[dtype.name]
    if not err < tolerance:
        raise SystemExit(f"error {err:.2e} above {tolerance:.0e}: the sparse product is wrong")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
