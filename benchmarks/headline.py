"""The README's speed tables from a bench.py JSON: `x @ ws` speedup over XLA's dense dot.

Usage:
    python benchmarks/headline.py [bench_results/bench.json]            # the N:M table
    python benchmarks/headline.py docs/bench_vnm.json --specs 2:4,64:2:8,128:2:16,64:2:32
                                                                        # any specs, any format
Columns: the forward of each spec, then fwd+bwd of each spec but the first (with --specs) or 2:4
and its ratio to BCOO (the N:M table). Where the rule picks the engine or the dense path, the cell
gives what `x @ ws` ran and, beside it, the kernel forced (kernel name with "!"); a forced row
alone is marked "(forced)". A V:N:M forward also gives, in brackets, the inference form's
(`ws.with_tiles()`, kernel "<spec> tiled"; int4's `wq.with_lines()`, "<spec> lines") where the
run measured it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PATTERNS = ("1:4", "2:4", "2:8", "4:8")


def kernel_name(spec: str) -> str:
    """bench.py's kernel name of a spec: "nm 2:4", "vnm 64:2:8", "int4 int4:g128+2:4"."""
    if spec.lower().startswith("int4"):
        return "int4 " + spec.lower()
    return ("vnm " if spec.count(":") == 2 else "nm ") + spec


def table(payload, specs=None) -> str:
    rows = [r for r in payload["results"] if not r["skipped"]]
    by = {(r["dtype"], r["in"], r["out"], r["tokens"], r["kernel"], r["mode"]): r for r in rows}
    cases = sorted({(r["dtype"], r["in"], r["out"], r["tokens"]) for r in rows},
                   key=lambda c: (c[0] != "f32", c[1], c[2], c[3]))
    fwd = list(specs or PATTERNS)
    both = fwd[1:] if specs else ["2:4"]
    head = ["dtype", "in x out", "T", "dense ms"] + [f"{p} fwd" for p in fwd]
    head += [f"{p} fwd+bwd" for p in both] + ([] if specs else ["2:4 fwd vs BCOO"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for dtype, k, n, t in cases:
        dense = by.get((dtype, k, n, t, "xla-dense", "fwd"))
        if dense is None:
            continue
        cells = [dtype, f"{k}x{n}", str(t), f"{dense['ms']:.2f}"]
        for mode, names in (("fwd", fwd), ("fwd+bwd", both)):
            for p in names:
                cell = _speedup(by, (dtype, k, n, t), kernel_name(p), mode)
                for form in ("tiled", "lines"):
                    packed = by.get((dtype, k, n, t, f"{kernel_name(p)} {form}", mode))
                    if packed is not None:
                        cell += f" ({form} {packed['speedup']:.2f}x)"
                cells.append(cell)
        if not specs:
            bcoo = by.get((dtype, k, n, t, "bcoo 2:4", "fwd"))
            nm = by.get((dtype, k, n, t, "nm 2:4", "fwd"))
            cells.append(f"{bcoo['ms'] / nm['ms']:.0f}x" if bcoo and nm else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _speedup(by, case, kernel, mode) -> str:
    r = by.get((*case, kernel, mode))
    forced = by.get((*case, kernel + "!", mode))
    if forced is not None:
        if r is None:
            return f"{forced['speedup']:.2f}x (forced)"
        return f"{r['speedup']:.2f}x ({r.get('path')} path; kernel {forced['speedup']:.2f}x)"
    if r is None:
        return "-"
    mark = f" ({r['path']} path)" if r.get("path") in ("dense", "engine") else ""
    return f"{r['speedup']:.2f}x{mark}"


def main(argv) -> None:
    specs = None
    if "--specs" in argv:
        i = argv.index("--specs")
        specs = argv[i + 1].split(",")
        argv = argv[:i] + argv[i + 2:]
    path = Path(argv[1] if len(argv) > 1 else "bench_results/bench.json")
    payload = json.loads(path.read_text())
    print(f"{payload['machine']['cpu']} x{payload['machine']['cpus']}, ISA {payload['isa']}, "
          f"jax {payload['jax']}, commit {payload['commit']}, {payload['date']}\n")
    print(table(payload, specs))


if __name__ == "__main__":
    main(sys.argv)
