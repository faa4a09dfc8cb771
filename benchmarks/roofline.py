"""The two roofline numbers of every harness shape: the compute bound and the memory bound.

For XLA's dense dot and each N:M pattern, at f32 and bf16, the least time the machine allows:
`flops / peak` (compute) and `bytes / bandwidth` (memory), from the ceilings bench.py measured
(its JSON), and the ideal speedup they imply (dense bound over N:M bound). N:M bytes count the
values plus one byte per kept position (the canonical uint8 positions the kernels read).

Usage:
    python benchmarks/roofline.py [bench_results/bench.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
TOKENS = (1, 16, 128, 2048)
PATTERNS = ((1, 4), (2, 4), (2, 8), (4, 8))
ITEMSIZE = {"f32": 4, "bf16": 2}


def bounds_ms(tokens, k, n, dtype, density, peak_gflops, bandwidth_gbs):
    """(compute-bound ms, memory-bound ms) of the forward product."""
    isz = ITEMSIZE[dtype]
    flops = 2.0 * tokens * k * n * density
    weight = k * n * density * (isz + (1 if density < 1 else 0))
    nbytes = isz * (tokens * k + tokens * n) + weight
    return flops / peak_gflops / 1e6, nbytes / bandwidth_gbs / 1e6


def table(ceilings) -> str:
    bw = ceilings["bandwidth_gbs"]
    lines = [f"ceilings: peak {ceilings['peak_gflops']} GFLOP/s, bandwidth {bw:.1f} GB/s",
             f"{'dtype':5} {'shape':>11} {'T':>5} {'kernel':6} {'compute ms':>10} "
             f"{'memory ms':>10} {'bound ms':>9} {'ideal x':>7}"]
    for dtype, peak in ceilings["peak_gflops"].items():
        for k, n in SHAPES:
            for t in TOKENS:
                dense = max(bounds_ms(t, k, n, dtype, 1.0, peak, bw))
                for name, density in [("dense", 1.0)] + [(f"{a}:{b}", a / b) for a, b in PATTERNS]:
                    c, mem = bounds_ms(t, k, n, dtype, density, peak, bw)
                    lines.append(f"{dtype:5} {k:>5}x{n:<5} {t:>5} {name:6} {c:10.3f} {mem:10.3f} "
                                 f"{max(c, mem):9.3f} {dense / max(c, mem):7.2f}")
    return "\n".join(lines)


def main(argv) -> None:
    path = Path(argv[1] if len(argv) > 1 else "bench_results/bench.json")
    print(table(json.loads(path.read_text())["ceilings"]))


if __name__ == "__main__":
    main(sys.argv)
