"""Times the V:N:M CPU kernels against XLA's dense dot of the same dtype, in one process.

    python benchmarks/vnm_kernels_probe.py                     # the default grid (~10 min)
    python benchmarks/vnm_kernels_probe.py --quick             # f32 forward, 64:2:8 and 128:2:16
    python benchmarks/vnm_kernels_probe.py --ops spmm --specs 64:2:8 --tokens 128 --dtypes f32

Calls the targets through jax.ffi.ffi_call directly (no jaxsparse ops layer), on random valid
V:N:M arrays built in NumPy, x[T, K] @ W[K, N] (K = N = 4096 by default). Every row times the
kernel and its dense baseline interleaved (kernel, dense, kernel, ...; --block b: b calls of each
in turn) and reports medians: the machines this runs on are shared and noisy, so only ratios
measured side by side mean much.
Both sides use XLA's intra-op thread pool (all cores). The speedup is the ratio of the medians;
the ratio of the minima (the quietest calls) is printed beside it.

Baselines: spmm against jnp.dot(x, W); spmm_t against dy @ W.T; sddmm against x.T @ dy (the dense
gradient of W). At T <= 16 each call cycles through enough weight copies (dense and sparse) to
exceed the L3, so every call streams its weight from DRAM; there the table also gives the ideal
speedup the bytes allow (dense bytes / (values + indices + columns bytes)) and the fraction of it
reached, and a read bound: XLA's own reduction over the same V:N:M arrays (every byte read once,
nothing else computed), timed against the same dense dot in the same alternation. A short read
runs below the rate of a long one (XLA's reduction here: 5 MB at 15-24 GB/s, 64 MB at 29-35), so
where the read bound is below the byte ratio it is the one to compare with (FORMATS.md section 6
of the design notes).
Prints a table, and writes JSON (machine, jax version, commit) with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxsparse as jsp

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
L3_BYTES = 32 << 20
STREAM_TOKENS = 16  # Up to here a call streams its weight from DRAM (copies cycle past the L3).


def vnm_arrays(rng, k, n_out, v, n, m, dtype):
    """Random canonical V:N:M arrays (values, indices, columns) for a [K, N] weight."""
    g, p = -(-k // m), -(-n_out // v)
    columns = np.sort(rng.random((p, g, m), np.float32).argsort(-1)[..., :4], -1).astype(np.uint8)
    indices = np.sort(rng.random((n_out, g, 4), np.float32).argsort(-1)[..., :n], -1)
    values = rng.standard_normal((n_out, g * n), np.float32)
    return (jnp.asarray(values[None], dtype), jnp.asarray(indices.reshape(1, n_out, g * n),
            jnp.uint8), jnp.asarray(columns.reshape(1, p, g * 4)))


def nbytes(*arrays):
    return sum(a.size * a.dtype.itemsize for a in arrays)


def ffi(target, shape, dtype, v, n, m):
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, dtype))
    kw = dict(v=np.int32(v), n=np.int32(n), m=np.int32(m))
    return jax.jit(lambda a, b, c, d: call(a, b, c, d, **kw))


def interleaved(fns, args_cycle, reps, min_seconds, block=1):
    """Medians and minima (ms) of each fn, timed in alternating runs of `block` calls each (so a
    drift of the machine's load hits both alike); fn i gets args_cycle[i][j % len]."""
    for f, cyc in zip(fns, args_cycle):  # Compile and warm up, outside the timing.
        for args in cyc:
            jax.block_until_ready(f(*args))
    times = [[] for _ in fns]
    start, j = time.perf_counter(), 0
    while j < reps or (time.perf_counter() - start < min_seconds and j < 20 * reps):
        for i, (f, cyc) in enumerate(zip(fns, args_cycle)):
            for b in range(block):
                args = cyc[(j * block + b) % len(cyc)]
                t = time.perf_counter()
                jax.block_until_ready(f(*args))
                times[i].append(time.perf_counter() - t)
        j += 1
    return [1e3 * float(np.median(t)) for t in times], [1e3 * float(np.min(t)) for t in times]


def read_all(values, indices, columns):
    """Reads every byte of the V:N:M arrays once: the read bound. Reductions over the rows, all
    of one shape, which XLA fuses into one pass (29-30 GB/s on 20 MB here; an int32 sum of the
    uint8 indices instead ran a slow conversion at ~3 GB/s)."""
    return values.sum(1), indices.max(1), columns.max(1)


def copies_for(bytes_each, total):
    return max(1, -(-total // max(1, bytes_each)))


def bench_row(op, dtype_name, spec, t, k, n_out, reps, seed=0, block=1, hot=False):
    v, n, m = spec
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(seed)
    stream = t <= STREAM_TOKENS and not hot
    dense_bytes = k * n_out * jnp.dtype(dtype).itemsize
    one = vnm_arrays(rng, k, n_out, v, n, m, dtype)
    sparse_bytes = nbytes(*one)
    # Streaming rows cycle through copies worth 3x the L3 on each side.
    n_sparse = copies_for(sparse_bytes, 3 * L3_BYTES) if stream else 1
    n_dense = copies_for(dense_bytes, 3 * L3_BYTES) if stream else 1
    weights = [one] + [vnm_arrays(rng, k, n_out, v, n, m, dtype) for _ in range(n_sparse - 1)]
    dense_w = [jnp.asarray(rng.standard_normal((k, n_out), np.float32), dtype)
               for _ in range(n_dense)]
    x = jnp.asarray(rng.standard_normal((1, t, k), np.float32), dtype)
    dy = jnp.asarray(rng.standard_normal((1, t, n_out), np.float32), dtype)
    kc = one[1].shape[2]
    if op == "spmm":
        f = ffi("jaxsparse_vnm_spmm", (1, t, n_out), dtype, v, n, m)
        sparse_args = [(x, *w) for w in weights]
        g = jax.jit(lambda a, w: jnp.dot(a[0], w))
        dense_args = [(x, w) for w in dense_w]
    elif op == "spmm_t":
        f = ffi("jaxsparse_vnm_spmm_t", (1, t, k), dtype, v, n, m)
        sparse_args = [(dy, *w) for w in weights]
        g = jax.jit(lambda a, w: jnp.dot(a[0], w.T))
        dense_args = [(dy, w) for w in dense_w]
    else:
        f = ffi("jaxsparse_vnm_sddmm", (1, n_out, kc), dtype, v, n, m)
        sparse_args = [(x, dy, w[1], w[2]) for w in weights]
        g = jax.jit(lambda a, b: jnp.dot(a[0].T, b[0]))
        dense_args = [(x, dy)]
    min_seconds = 1.5 if t >= 1024 else 0.5
    (ts, td), (bs, bd) = interleaved([f, g], [sparse_args, dense_args], reps, min_seconds, block)
    row = dict(op=op, dtype=dtype_name, spec=f"{v}:{n}:{m}", tokens=t, k=k, n_out=n_out,
               kernel_ms=ts, dense_ms=td, speedup=td / ts, kernel_min_ms=bs, dense_min_ms=bd,
               speedup_of_minima=bd / bs)
    if stream and op == "spmm":
        row["ideal"] = dense_bytes / sparse_bytes
        row["of_ideal"] = row["speedup"] / row["ideal"]
        (tr, td2), _ = interleaved([jax.jit(read_all), g], [weights, dense_args], reps,
                                   min_seconds, block)
        row.update(read_ms=tr, read_dense_ms=td2, read_speedup=td2 / tr)
        row["of_read"] = row["speedup"] / row["read_speedup"]
    return row


def print_row(r):
    ideal = ""
    if "ideal" in r:
        ideal = (f"ideal {r['ideal']:5.2f}x: {100 * r['of_ideal']:5.1f}%  read bound "
                 f"{r['read_speedup']:5.2f}x ({r['read_ms']:.3f} ms): {100 * r['of_read']:5.1f}%")
    print(f"{r['op']:7s} {r['dtype']:5s} {r['spec']:9s} T={r['tokens']:<5d} "
          f"kernel {r['kernel_ms']:9.3f} ms  dense {r['dense_ms']:9.3f} ms  "
          f"{r['speedup']:6.2f}x (minima {r['speedup_of_minima']:5.2f}x)  {ideal}", flush=True)


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__) or ".").stdout.strip()
    except OSError:
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default="spmm,spmm_t,sddmm")
    ap.add_argument("--specs", default="64:2:8,128:2:16,64:2:32")
    ap.add_argument("--tokens", default="1,16,128,2048")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n-out", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--block", type=int, default=1,
                    help="calls of one function in a row before switching to the other (1: "
                         "kernel, dense, kernel, ...; more: each op runs warm after itself)")
    ap.add_argument("--hot", action="store_true",
                    help="no weight copies at few tokens: the weights stay cache-resident, which "
                         "measures the kernels' compute side (the bound besides the bytes)")
    ap.add_argument("--isa", default=None, help="force a CPU ISA (amx, avx512bf16, avx512, avx2, portable)")
    ap.add_argument("--quick", action="store_true", help="f32 spmm, 64:2:8 and 128:2:16 only")
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args()
    if a.quick:
        a.ops, a.specs, a.dtypes = "spmm", "64:2:8,128:2:16", "f32"
    if a.isa:
        jsp.set_cpu_isa(a.isa)
    specs = [tuple(int(s) for s in spec.split(":")) for spec in a.specs.split(",")]
    machine = dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                   jax=jax.__version__, isa=jsp.cpu_isa(), commit=git_commit())
    print(f"# {machine}")
    rows = []
    for op in a.ops.split(","):
        for dtype_name in a.dtypes.split(","):
            for spec in specs:
                for t in (int(s) for s in a.tokens.split(",")):
                    if op != "spmm" and t <= 1:
                        continue  # Training shapes only.
                    rows.append(bench_row(op, dtype_name, spec, t, a.k, a.n_out, a.reps,
                                          block=a.block, hot=a.hot))
                    print_row(rows[-1])
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(machine=machine, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
