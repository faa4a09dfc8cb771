"""The README's headline table from a bench.py JSON: `x @ ws` speedup over XLA's dense dot.

Usage:
    python benchmarks/headline.py [bench_results/bench.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PATTERNS = ("1:4", "2:4", "2:8", "4:8")


def table(payload) -> str:
    rows = [r for r in payload["results"] if not r["skipped"]]
    by = {(r["dtype"], r["in"], r["out"], r["tokens"], r["kernel"], r["mode"]): r for r in rows}
    cases = sorted({(r["dtype"], r["in"], r["out"], r["tokens"]) for r in rows},
                   key=lambda c: (c[0] != "f32", c[1], c[2], c[3]))
    head = ["dtype", "in x out", "T", "dense ms"] + [f"{p} fwd" for p in PATTERNS]
    head += ["2:4 fwd+bwd", "2:4 fwd vs BCOO"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for dtype, k, n, t in cases:
        dense = by.get((dtype, k, n, t, "xla-dense", "fwd"))
        if dense is None:
            continue
        cells = [dtype, f"{k}x{n}", str(t), f"{dense['ms']:.2f}"]
        for p in PATTERNS:
            r = by.get((dtype, k, n, t, f"nm {p}", "fwd"))
            cells.append(_speedup(r))
        cells.append(_speedup(by.get((dtype, k, n, t, "nm 2:4", "fwd+bwd"))))
        bcoo = by.get((dtype, k, n, t, "bcoo 2:4", "fwd"))
        nm = by.get((dtype, k, n, t, "nm 2:4", "fwd"))
        cells.append(f"{bcoo['ms'] / nm['ms']:.0f}x" if bcoo and nm else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _speedup(r) -> str:
    if r is None:
        return "-"
    mark = " (dense path)" if r.get("path") == "dense" else ""
    return f"{r['speedup']:.2f}x{mark}"


def main(argv) -> None:
    path = Path(argv[1] if len(argv) > 1 else "bench_results/bench.json")
    payload = json.loads(path.read_text())
    print(f"{payload['machine']['cpu']} x{payload['machine']['cpus']}, ISA {payload['isa']}, "
          f"jax {payload['jax']}, commit {payload['commit']}, {payload['date']}\n")
    print(table(payload))


if __name__ == "__main__":
    main(sys.argv)
