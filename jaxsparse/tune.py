"""Measure this machine's N:M path crossovers and cache them: `python -m jaxsparse.tune`.

`x @ ws` chooses between the N:M kernel, the shared engine and the dense path from a table of
crossovers (jaxsparse/ops/dispatch.py). The built-in table was measured on two machines; CPUs
differ (AMX or not, the bf16 rate, cache sizes), so this command measures the table on the
machine at hand:

    python -m jaxsparse.tune                    # f32, bf16, f16; 1:4 and 2:4; ~2-4 minutes
    python -m jaxsparse.tune --dtypes bf16 --shape 4096x4096 --repeats 9
    python -m jaxsparse.tune --dry-run          # print the table, write nothing

For each dtype and spec it times the three paths at a ladder of token counts (each path called
in turn, medians of `--repeats` rounds, in one process) and finds:

- the sparse kernel's crossover: the most tokens up to which it was the fastest path at every
  measured count (the rows of `SPARSE_MAX_TOKENS`, by density band);
- past it, whether the engine beat the dense path at every measured count (`ENGINE_ROWS`).

The result is written to `jaxsparse.ops.dispatch.crossovers_file()` (the user's cache directory,
or the file `JAXSPARSE_CROSSOVERS` names) under this machine's key (CPU model and instruction
set), next to the entries of other machines. From then on `choose_path` reads it instead of the
built-in rows for the patterns it measures, 1:4 and 2:4 (`N4_MAX_TOKENS`); other N:M patterns keep
the built-in rows. Delete the file, or set `JAXSPARSE_CROSSOVERS=builtin`, to go back.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import _ffi
from jaxsparse.formats import NM, fromdense
from jaxsparse.ops import dispatch
from jaxsparse.ops.matmul import matmul

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
SPECS = ("1:4", "2:4")
PATHS = ("sparse", "engine", "dense")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m jaxsparse.tune",
                                 description="Measure and cache this machine's N:M crossovers.")
    ap.add_argument("--dtypes", default="f32,bf16,f16", help="of f32, bf16, f16")
    ap.add_argument("--specs", default=",".join(SPECS), help="N:M specs, one per density band")
    ap.add_argument("--shape", default="2048x2048", help="in x out of the weight timed")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dry-run", action="store_true", help="print the table, write nothing")
    args = ap.parse_args(argv)
    args.dtypes = [_one_of("--dtypes", d, DTYPES) for d in args.dtypes.split(",")]
    args.specs = [_nm_spec(s) for s in args.specs.split(",")]
    args.tokens = sorted({_positive("--tokens", t) for t in args.tokens.split(",")})
    k, _, n = args.shape.lower().partition("x")
    args.shape = (_positive("--shape", k), _positive("--shape", n))
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1; got {args.repeats}")
    return args


def _one_of(flag, value, choices):
    if value not in choices:
        raise SystemExit(f"{flag}: expected one of {', '.join(choices)}; got {value!r}")
    return value


def _positive(flag, text) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise SystemExit(f"{flag}: expected positive integers; got {text!r}")
    return value


def _nm_spec(text) -> NM:
    try:
        n, m = (int(v) for v in text.split(":"))
        return NM(n, m).validate("--specs")
    except ValueError as err:
        raise SystemExit(f"--specs: expected N:M specs such as 2:4; got {text!r} ({err})")


# ====================================================================== measuring
def path_medians(x, ws, repeats: int) -> dict[str, float]:
    """Median seconds of `x @ ws` on each path (a pattern without an engine skips it), the paths
    called in turn so that load on the machine falls on all of them alike."""
    paths = PATHS if ws.spec.has_engine else ("sparse", "dense")
    fns = {p: jax.jit(lambda x, ws, p=p: matmul(x, ws, path=p)) for p in paths}
    for fn in fns.values():  # Compile, then one warm call.
        jax.block_until_ready(fn(x, ws))
        jax.block_until_ready(fn(x, ws))
    times = {p: [] for p in paths}
    for _ in range(repeats):
        for p, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(x, ws))
            times[p].append(time.perf_counter() - start)
    return {p: statistics.median(t) for p, t in times.items()}


def crossover(medians_by_tokens: dict[int, dict[str, float]]) -> tuple[float, bool]:
    """(the most tokens up to which the sparse kernel was fastest at every count, or inf; whether
    the engine beat the dense path at every count past that)."""
    counts = sorted(medians_by_tokens)
    most = math.inf
    for t in counts:
        med = medians_by_tokens[t]
        if med["sparse"] > min(med.values()):
            index = counts.index(t)
            most = counts[index - 1] if index else 0
            break
    past = [medians_by_tokens[t] for t in counts if t > most]
    engine = bool(past) and all("engine" in m and m["engine"] < m["dense"] for m in past)
    return most, engine


def measure(dtype_name, spec, shape, tokens, repeats, log=print) -> dict[int, dict[str, float]]:
    k, n = shape
    key_w, key_x = jax.random.split(jax.random.key(0))
    w = jax.random.normal(key_w, (k, n), jnp.float32).astype(DTYPES[dtype_name]) / np.sqrt(k)
    ws = fromdense(w, spec)
    result = {}
    for t in tokens:
        x = jax.random.normal(key_x, (t, k), jnp.float32).astype(DTYPES[dtype_name])
        result[t] = path_medians(x, ws, repeats)
        log(f"  {dtype_name:4} {str(spec):4} {t:>5} tokens: " + "  ".join(
            f"{p} {s * 1e3:8.3f} ms" for p, s in result[t].items()))
    return result


def tune(dtypes, specs, shape, tokens, repeats, log=print) -> dict:
    """This machine's entry: `{"rows": {dtype: [[bound, most or None], ...]}, "engine": [...],
    "measured": {...}}` (bounds: the specs' densities, ascending, the last widened to 1)."""
    rows, engine, measured = {}, [], {}
    for dtype_name in dtypes:
        dtype = np.dtype(DTYPES[dtype_name]).name
        table, engine_wins = [], []
        for spec in sorted(specs, key=lambda s: s.density):
            medians = measure(dtype_name, spec, shape, tokens, repeats, log)
            most, wins = crossover(medians)
            table.append([spec.density, None if math.isinf(most) else most])
            if spec.has_engine and not math.isinf(most):
                engine_wins.append(wins)
            measured[f"{dtype} {spec}"] = {str(t): {p: round(s * 1e3, 4) for p, s in m.items()}
                                           for t, m in medians.items()}
        table[-1][0] = 1.0
        rows[dtype] = table
        if engine_wins and all(engine_wins):
            engine.append(dtype)
    return {"rows": rows, "engine": engine, "measured": measured}


# ====================================================================== the cache file
def write_entry(path: Path, key: str, entry: dict, meta: dict) -> None:
    """Puts `entry` under `key` in the crossovers file, keeping the other machines' entries."""
    data = {"version": dispatch.CROSSOVERS_VERSION, "machines": {}}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if old.get("version") == dispatch.CROSSOVERS_VERSION:
                data["machines"] = dict(old.get("machines", {}))
        except (OSError, ValueError, AttributeError):
            pass  # A damaged file is replaced.
    data["machines"][key] = {**entry, **meta}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)  # Atomic: a process reading at the same time sees old or new.


def main(argv=None) -> int:
    args = parse_args(argv)
    if jax.default_backend() != "cpu" or not _ffi.has_cpu_kernels():
        raise SystemExit("jaxsparse.tune measures the CPU kernels: it needs the CPU extension "
                         f"and jax's CPU backend (got backend {jax.default_backend()!r})")
    isa = _ffi.cpu_isa()
    key = dispatch.machine_key(isa)
    print(f"# {key}; jax {jax.__version__}; weight {args.shape[0]}x{args.shape[1]}")
    entry = tune(args.dtypes, args.specs, args.shape, args.tokens, args.repeats)
    for dtype, table in entry["rows"].items():
        beyond = "engine" if dtype in entry["engine"] else "dense"
        print(f"{dtype}: " + ", ".join(
            f"density <= {b:g}: sparse up to {'every count' if t is None else f'{t} tokens'}"
            for b, t in table) + f"; past that {beyond}")
    path = dispatch.crossovers_file()
    if args.dry_run or path is None:
        print("not written (--dry-run, or JAXSPARSE_CROSSOVERS=builtin)")
        return 0
    meta = {"jax": jax.__version__, "shape": list(args.shape),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    write_entry(path, key, entry, meta)
    print(f"written to {path} (under {key!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
