"""W4A8 (int4 weights, int8-quantised activations) against XLA's f32 dot at MiniLM's shapes.

For every shape [K, N] and token count, in one process: XLA's `jnp.dot` of f32 x by the dense f32
weight, and `x @ w` with `w = jsp.fromdense(weight, jsp.Int4(128, activations="int8"))` (the fused
target, which quantises x inside the call), both under `jax.jit`. Each round times a few calls of
each, one after the other (a shared machine's drift hits both alike); the table gives per cell the
median over rounds of XLA's time over W4A8's (above 1: W4A8 is faster) and both medians in us.

The avx2 unit's many-token panels (cpu/int4/int4_a8_avx2.h) are compared with the streaming
kernel by running this script once with a build that has them and once with one that does not
(the ratios are each against XLA's dot of their own process).

Usage:
    python benchmarks/int4_a8_avx2.py                  # 384x1536, 1536x384, 384x384; 17, 256, 1440
    python benchmarks/int4_a8_avx2.py --tokens 8,16,32 --rounds 21 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxsparse as jsp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import git_commit, machine_info  # noqa: E402

SHAPES = ((384, 1536), (1536, 384), (384, 384))
TOKENS = (17, 256, 1440)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median)")
    parser.add_argument("--seconds", type=float, default=0.02,
                        help="at least this long per timed sample (several calls of short ones)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def sample(fn, x, calls):
    start = time.perf_counter()
    for _ in range(calls):
        out = fn(x)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def measure(k, n, t, group, rounds, seconds):
    rng = np.random.default_rng(0)
    weight = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.float32)
    w4a8 = jsp.fromdense(weight, jsp.Int4(group, activations="int8"))
    dense = jax.jit(lambda x: jnp.dot(x, weight))
    sparse = jax.jit(lambda x: x @ w4a8)
    for fn in (dense, sparse):  # compile and warm up outside the timing
        jax.block_until_ready(fn(x))
        jax.block_until_ready(fn(x))
    calls = max(1, int(seconds / max(sample(dense, x, 3), sample(sparse, x, 3))))
    dense_t, sparse_t, ratios = [], [], []
    for _ in range(rounds):
        d = sample(dense, x, calls)
        s = sample(sparse, x, calls)
        dense_t.append(d)
        sparse_t.append(s)
        ratios.append(d / s)
    return {"k": k, "n": n, "tokens": t, "ratio": statistics.median(ratios),
            "dense_us": 1e6 * statistics.median(dense_t),
            "w4a8_us": 1e6 * statistics.median(sparse_t), "calls_per_sample": calls}


def main(argv=None):
    args = parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    meta = {"machine": machine_info(), "jax": jax.__version__, "isa": jsp.cpu_isa(),
            "jaxsparse": str(Path(jsp.__file__).resolve().parent), "commit": git_commit(),
            "rounds": args.rounds, "group": args.group}
    print(f"# {meta['machine']['cpu']}, ISA {meta['isa']}, jax {meta['jax']}, jaxsparse from "
          f"{meta['jaxsparse']}, script commit {meta['commit']}; XLA f32 dot time / W4A8 time, "
          f"median of {args.rounds} interleaved rounds")
    print("| K x N | tokens | dense / W4A8 | dense us | W4A8 us |")
    print("|---|---|---|---|---|")
    results = []
    for k, n in shapes:
        for t in tokens:
            r = measure(k, n, t, args.group, args.rounds, args.seconds)
            results.append(r)
            print(f"| {k}x{n} | {t} | {r['ratio']:.2f}x | {r['dense_us']:.0f} | "
                  f"{r['w4a8_us']:.0f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
