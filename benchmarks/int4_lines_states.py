"""What the state a call starts in costs the 1-token int4 lines product (`x @ wq.with_lines()`).

    python benchmarks/int4_lines_states.py                      # 4096x4096, f32
    python benchmarks/int4_lines_states.py --shapes 4096x11008 --rounds 3
    python benchmarks/int4_lines_states.py --sparse             # int4 + 2:4's lines

bench.py times each short call in alternation with XLA's dense dot (so that a change of the
machine's load hits both alike): every lines call then starts right after the dot has streamed
its 64+ MB. This probe times the same jitted call, weights rotated over 12 copies (streamed from
memory), in four states, round after round in one process, and one weight again and again:

    resident      one weight (its 8.9 MB stay in the caches), back-to-back
    back-to-back  the previous call was a lines call
    after-dot     right after XLA's dot of a rotated dense weight (bench.py's state)
    after-sleep   after --sleep-ms asleep (10 by default), when the vCPUs may have halted
    dot           XLA's dot itself, for the ratios

and prints the medians and the ratio of the dot to each, then what waking costs any call: a
jitted `a + 1` on 8 floats back-to-back and after the same sleep.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxsparse as jsp

COPIES = 12  # 12 x 8.9 MB at 4096x4096: three times a 32 MB last-level cache
DENSE_COPIES = 4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4096x4096", help="comma list of INxOUT")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the four states")
    parser.add_argument("--calls", type=int, default=60, help="timed calls per state and round")
    parser.add_argument("--sleep-ms", type=float, default=10.0, help="idle time of after-sleep")
    parser.add_argument("--sparse", action="store_true", help="int4 + 2:4 (g128) in place of int4")
    return parser.parse_args(argv)


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def one_round(product, x, lines, dense, calls, sleep_s) -> dict[str, float]:
    """Median ms of each state over `calls` calls."""
    times = {"resident": [], "back-to-back": [], "after-dot": [], "after-sleep": [], "dot": []}
    for i in range(calls):
        times["resident"].append(seconds(product, x, lines[0]))
    for i in range(calls):
        times["back-to-back"].append(seconds(product, x, lines[i % COPIES]))
    for i in range(calls):
        times["dot"].append(seconds(product, x, dense[i % DENSE_COPIES]))
        times["after-dot"].append(seconds(product, x, lines[i % COPIES]))
    for i in range(calls):
        time.sleep(sleep_s)
        times["after-sleep"].append(seconds(product, x, lines[i % COPIES]))
    return {state: float(np.median(t)) * 1e3 for state, t in times.items()}


def run_shape(k: int, n: int, args) -> None:
    rng = np.random.default_rng(0)
    lines, dense = [], []
    for _ in range(COPIES):
        w = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32))
        spec = jsp.Int4(128, sparsity=jsp.NM(2, 4) if args.sparse else None)
        lines.append(jsp.fromdense(w, spec).with_lines())
    for _ in range(DENSE_COPIES):
        dense.append(jnp.asarray(rng.standard_normal((k, n), dtype=np.float32)))
    x = jnp.asarray(rng.standard_normal((1, k), dtype=np.float32))
    product = jax.jit(lambda x, w: x @ w)
    jax.block_until_ready((product(x, lines[0]), product(x, dense[0])))
    for r in range(args.rounds):
        ms = one_round(product, x, lines, dense, args.calls, args.sleep_ms * 1e-3)
        cells = "  ".join(f"{state} {ms[state]:.3f} ms ({ms['dot'] / ms[state]:.2f}x)"
                          for state in ("resident", "back-to-back", "after-dot", "after-sleep"))
        form = "int4 + 2:4" if args.sparse else "int4"
        print(f"{k}x{n} {form} f32 1 token, round {r}: dot {ms['dot']:.3f} ms  {cells}", flush=True)


def wake_cost(args) -> None:
    """Median µs of a trivial jitted call back-to-back and after the sleep."""
    add_one = jax.jit(lambda a: a + 1)
    a = jnp.ones((8,), jnp.float32)
    jax.block_until_ready(add_one(a))
    busy = [seconds(add_one, a) for _ in range(args.calls)]
    idle = []
    for _ in range(args.calls):
        time.sleep(args.sleep_ms * 1e-3)
        idle.append(seconds(add_one, a))
    print(f"a + 1 on 8 floats: back-to-back {np.median(busy) * 1e6:.0f} us, "
          f"after {args.sleep_ms:g} ms asleep {np.median(idle) * 1e6:.0f} us")


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, jax {jax.__version__}")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.lower().split("x"))
        run_shape(k, n, args)
    wake_cost(args)


if __name__ == "__main__":
    main()
