"""Which path `x @ ws` takes: the sparse kernel, the shared engine, or the dense path.

- "sparse": the format's own kernel (for N:M, the per-output-position kernels: they read fewer
  bytes and do fewer FMAs, and win at few tokens).
- "engine": the shared CPU engine (FORMATS.md section 4): per panel of outputs, decode the weights
  into a cache-resident dense tile, then the dense micro-kernels (f32 FMA, AMX tiles for bf16)
  over the panel's inputs, with no full-size decompressed weight. V:N:M's kernel is the engine;
  an N:M weight with m = 4 runs on it as a V:N:M weight that selects every input
  (`jaxsparse.ops.nm_spmm_engine`). A format with no engine for its spec multiplies densely.
- "dense": decompress, then XLA's dot.

XLA's dense dot runs its FMAs close to the machine's peak (and, for bf16, on AVX512-BF16 or AMX dot
instructions), so where the sparse kernel's savings run out the engine or the dense path takes
over. The choice is made at trace time from static facts only: the platform, the CPU kernels'
instruction set, the dtype, the format and density, and the number of tokens (the product of x's
leading dims).

The rule, `choose_path`:

- Off the CPU, or without the CPU extension: "sparse" (the CUDA kernels, or the reference with its
  fallback warning).
- On the CPU, per (instruction set, dtype), a table of crossovers (`SPARSE_MAX_TOKENS`; 2:4 and
  1:4, whose positions the kernels can read at 2 bits, have their own, `N4_MAX_TOKENS`): for
  density bands, the most tokens at which the sparse kernel beat the other paths
  (benchmarks/bench.py, docs/cpu_speed_notes.md). Beyond it, "engine" where `ENGINE_ROWS` holds
  the (instruction set, dtype) and the format has an engine for its spec, else "dense".

The built-in table was measured on two machines (a Zen 5 without AMX, a Xeon with AMX). On
another, `python -m jaxsparse.tune` measures the N:M crossovers and writes them to the user's
cache (`crossovers_file()`: `$XDG_CACHE_HOME/jaxsparse/crossovers.json`, or the file that
`JAXSPARSE_CROSSOVERS` names), keyed by the CPU model and instruction set; its rows then replace
the built-in rows of 2:4 and 1:4 (the patterns it measures) on that machine. `JAXSPARSE_CROSSOVERS=builtin` ignores the cache.

A user forces a path per call (`jsp.matmul(x, ws, path="engine")`) or for a region of code,
including `@` and the Flax layers (`with jsp.matmul_path("sparse"): ...`). Every path computes the
same product; they round differently (the kernels accumulate in f32 in their own order; the dense
path rounds as XLA's dot does).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import threading
import warnings
from pathlib import Path

import jax
import numpy as np

from jaxsparse import _ffi

__all__ = ["ENGINE_BACKWARD_FROM", "ENGINE_ROWS", "FORMAT_TABLES", "N4_MAX_TOKENS", "PATHS",
           "SPARSE_MAX_TOKENS", "INT4_DENSE_BACKWARD_FROM", "backward_on_engine", "choose_path",
           "int4_dense_backward",
           "matmul_path", "current_path", "cpu_model", "crossovers_file", "machine_key",
           "tuned_entry"]

PATHS = ("auto", "sparse", "engine", "dense")

_ALWAYS = math.inf

# (ISA, dtype) -> ((density bound, max tokens for the sparse kernel), ...), bounds ascending; the
# first bound >= the weight's density applies. Measured on a 2-core AMD Zen 5 (AVX-512 with
# AVX512-BF16, no AMX) against jax 0.12's dense dot; see docs/cpu_speed_notes.md.
SPARSE_MAX_TOKENS: dict[tuple[str, str], tuple[tuple[float, float], ...]] = {
    # f32: the kernels beat XLA's f32 dot at every harness shape.
    ("avx512", "float32"): ((1.0, _ALWAYS),),
    # XLA's f16 dot has no fast CPU path: the kernels (f32 arithmetic) win everywhere.
    ("avx512", "float16"): ((1.0, _ALWAYS),),
    # XLA's bf16 dot runs at ~2x its f32 rate (AVX512-BF16); our kernels widen to f32, so at
    # density 1/2 they lose from ~32 tokens on. But the dense path first materializes the dense
    # weight (~30 ms for 4096x4096 on the measured VM, mostly page faults of the fresh buffer),
    # so it only pays off once the dot itself is long: from 1024 tokens.
    ("avx512", "bfloat16"): ((0.25, _ALWAYS), (1.0, 1023)),
    # On AMX machines XLA's bf16 dot runs on the tiles while the N:M kernels widen to f32; the
    # engine runs bf16 on the tiles too from 32 tokens. Measured on a 2-core Intel Xeon with AMX
    # (jax 0.12; benchmarks/nm_engine_probe.py): at 4096x4096 and 32 tokens the engine ran 2:4 in
    # 2.8 ms, the N:M kernel 4.8 and XLA's dot 4.1; at 16 and 24 tokens the kernel won (1.35x
    # and 1.04x of XLA's dot, the engine 0.90x and 0.82x). Likewise for 1:4.
    ("amx", "bfloat16"): ((1.0, 31),),
    # f32 on AMX machines: the N:M kernel up to 511 tokens; past it the engine (FMA) at 2:4 (at
    # 3072x768 and 4096 tokens 1.06x of XLA's dot against the kernel's 0.88x); 1:4 keeps the kernel
    # (at 4096x4096 and 2048 tokens 1.70x against the engine's 1.08x). f16 takes the AVX-512 row.
    ("amx", "float32"): ((0.25, _ALWAYS), (1.0, 511)),
    # AVX2, measured on a 2-core AMD Zen 3 (AVX2 + FMA, no AVX-512), jax 0.12.1, 2:4 at 1024 x
    # 1024 and 2048 x 2048, 32-2048 tokens, interleaved with XLA's dot in one process (shared
    # machine, +-15%): bf16 0.47-1.07x of XLA's dot (its bf16 dot has no fast AVX2 path), below the
    # dense path at every count (0.93-1.28x); f32 0.39-1.03x to 64 tokens, then 0.90-1.24x against
    # the dense path's 0.98-1.44x, neither ahead by more than the noise: the kernel to 1023
    # tokens stays. 1:4 beats both at every count (`python -m jaxsparse.tune --dry-run`, 2048 x
    # 2048: f32 at 1024 tokens 43 ms against 82 ms; f16 2:4 likewise). The portable row is an
    # estimate.
    ("avx2", "float32"): ((0.25, _ALWAYS), (1.0, 1023)),
    ("avx2", "float16"): ((1.0, _ALWAYS),),
    ("avx2", "bfloat16"): ((1.0, _ALWAYS),),
    # The portable path is a scalar fallback: dense once the dot amortizes the decompression.
    ("portable", "float32"): ((1.0, 255),),
    ("portable", "float16"): ((1.0, 255),),
    ("portable", "bfloat16"): ((1.0, 255),),
}

#: The N:M table of 2:4 and 1:4 (`NM.crossover_table == "NM4"`): their positions are also held
#: at 2 bits, and on AMX their bf16 forward runs on the tiles from 12 to 256 tokens
#: (`jaxsparse.ops.nm_spmm_packed`, cpu/nm/nm_amx.h). Measured on a 2-core Intel Xeon with AMX
#: (jax 0.12, benchmarks/nm_engine_probe.py): 2:4 at 32-128 tokens 1.65-3.15x of
#: XLA's AMX dot where the engine ran 0.88-1.76x; at 256 tokens 1.33-1.79x (engine 1.15-1.47x);
#: at 512 the engine won on 2 of 3 harness shapes. Otherwise N:M's rows.
#: Without AMX but with AVX512-BF16 (`avx512bf16`) the same tiles run on `vdpbf16ps`. Measured
#: on a 2-core AMD Zen 4 (jax 0.12, `JAXSPARSE_CPU_ISA=avx512bf16 benchmarks/nm_engine_probe.py`,
#: 4096x4096 and 11008x4096): 2:4 at 128 / 256 tokens 1.30-1.32x / 1.12-1.14x of XLA's bf16 dot
#: (engine 1.10-1.11x / 0.90-1.02x), at 512 the kernel 0.70-0.72x and the engine 0.97x, at 2048
#: the engine 1.00-1.06x (dense path 0.90-1.00x); 1:4 keeps the kernel (at 512 and 1024 tokens
#: 1.12-1.25x against the engine's 0.89-1.03x).
N4_MAX_TOKENS: dict[tuple[str, str], tuple[tuple[float, float], ...]] = {
    **SPARSE_MAX_TOKENS,
    ("amx", "bfloat16"): ((1.0, 255),),
    ("avx512bf16", "bfloat16"): ((0.25, _ALWAYS), (1.0, 255)),
}

#: Where, past the sparse kernel's crossover, the engine beats the dense path (measured as above);
#: elsewhere the dense path takes over. The avx512 rows were measured on Zen 5 before the engine
#: ran N:M: they keep the dense path until measured again. avx512bf16 bf16: see N4_MAX_TOKENS.
ENGINE_ROWS: frozenset[tuple[str, str]] = frozenset(
    {("amx", "bfloat16"), ("amx", "float32"), ("avx512bf16", "bfloat16")})

#: From how many tokens the derivatives of 2:4 and 1:4 products on the sparse kernel (dx and the
#: values' gradient) run on the engine's kernels rather than N:M's (`nm_spmm_packed`'s
#: `engine_backward`). Measured on a 2-core Intel Xeon with AMX (jax 0.12, a training step's
#: product, `benchmarks/nm_engine_probe.py --modes fwd+bwd`, 4096x4096 and 11008x4096): bf16 at
#: 128 tokens 4.08x / 4.14x of XLA's step with the engine's backward (on the tiles) against 1.68x /
#: 1.53x with N:M's, at 32 tokens 4.95x / 4.29x against 4.81x / 4.07x, at 16 tokens N:M's won
#: (5.73x / 4.86x against 4.26x / 4.03x); f32 at 128 tokens 1.30x / 1.18x against 1.07x / 0.88x,
#: at 32 N:M's won. On a 2-core AMD Zen 4 with `avx512bf16` (the tiles on `vdpbf16ps`), bf16 2:4
#: at 128 tokens 2.36x / 2.43x with the engine's backward against 1.54x / 1.56x with N:M's, at 256
#: 1.98x / 1.85x against 1.37x / 1.19x, at 16 and 32 within 1-10% either way. Elsewhere
#: (unmeasured) N:M's kernels.
ENGINE_BACKWARD_FROM: dict[tuple[str, str], int] = {
    ("amx", "bfloat16"): 32,
    ("avx512bf16", "bfloat16"): 32,
    ("amx", "float32"): 128,
}

#: Per format (the spec type's name), its crossover table; N:M's is `SPARSE_MAX_TOKENS`. A
#: format without a table (or without a row for the ISA and dtype) always takes its kernel.
FORMAT_TABLES: dict[str, dict] = {
    "NM": SPARSE_MAX_TOKENS,
    "NM4": N4_MAX_TOKENS,
    # V:N:M's kernels compute over 4/m of the inputs, sharing each panel's gathered inputs across
    # its outputs: they beat XLA's dot at every harness shape, f32 and bf16 (the tightest: bf16
    # 64:2:8 at 2048 tokens, 1.22x; the dense path there was 0.92x), on a 2-core AMD Zen 5 with
    # jax 0.12 (benchmarks/bench.py, 4096x4096). On a 2-core Intel Xeon with AMX, bf16 runs on
    # the tiles from 32 tokens: 1.5-1.9x (64:2:8) and 2.5-3.1x (128:2:16) over XLA's AMX dot at
    # 32-2048 tokens, 1.9-24x over the dense path. No table: always the kernel.
    # int4 (`Int4.crossover_table`): its AVX-512 kernels stream the nibbles at few tokens and,
    # from 16 tokens, dequantise 64-output panels once per block of tokens into the f32 FMA
    # engine's micro-kernel, or (bf16, on avx512bf16 and amx) into the engine's bf16 tiles.
    # Measured on a 2-core AMD Zen 4 (AVX512-BF16, no AMX), jax 0.12, 4096x4096 g128
    # (`benchmarks/int4_probe.py`, docs/cpu_speed_notes.md "int4, second round"): f32 1.21x /
    # 1.08x / 1.11x of XLA's dot at 16 / 128 / 2048 tokens, bf16 1.09x / 1.04x / 1.16x, int4 + 2:4
    # alike; the dense path (dequantise, XLA's dot) was 0.21-0.95x. So the kernel everywhere,
    # except where the tiles are not built (plain AVX-512: bf16 on the f32 panels, 0.56x of an
    # AVX512-BF16 dot at 128 tokens) and the units without panels (avx2, portable): the dense
    # path past their rows. avx2 (cpu/int4/int4_avx2.h, 4 tokens per decoded weight, no panels)
    # measured on a 2-core AMD Zen 3 (AVX2 + FMA, no AVX-512), jax 0.12.1, 1024 x 1024 g128,
    # time over XLA's dot, calls interleaved in one process, both forms alike: f32 0.3-0.5x at
    # 1-32 tokens; from ~128 both the kernel and the dense path run the same FMAs at the FMA
    # pipes' peak plus their decode, and the dense path's is once per call: kernel 1.09x / 1.19x
    # / 1.14x / 1.20x at 128 / 192 / 256 / 384 tokens, dense path 1.17x / 1.14x / 1.06x / 1.07x;
    # f16 likewise (256: 1.34x against 1.07x; 128: 1.01x against 1.39x). bf16's dequantisation
    # costs the dense path more: 64 / 128 tokens kernel 0.96x / 0.95x, dense path 1.32x / 1.71x,
    # a tie at 256 and 384 (0.85x, 1.03x both). So the kernel to 191 tokens (f32, f16), 511
    # (bf16).
    "INT4": {
        ("avx512", "bfloat16"): ((1.0, 63),),
        ("avx512bf16", "bfloat16"): ((1.0, _ALWAYS),),
        ("amx", "bfloat16"): ((1.0, _ALWAYS),),
        ("avx2", "float32"): ((1.0, 191),),
        ("avx2", "bfloat16"): ((1.0, 511),),
        ("avx2", "float16"): ((1.0, 191),),
        ("portable", "float32"): ((1.0, 63),),
        ("portable", "bfloat16"): ((1.0, 63),),
    },
}

_state = threading.local()

#: Environment variable: the tuned crossovers file, or "builtin" for the built-in table only.
CROSSOVERS_ENV = "JAXSPARSE_CROSSOVERS"
CROSSOVERS_VERSION = 1


def crossovers_file() -> Path | None:
    """Where `python -m jaxsparse.tune` writes, and `choose_path` reads, tuned crossovers (None:
    `JAXSPARSE_CROSSOVERS=builtin`)."""
    named = os.environ.get(CROSSOVERS_ENV)
    if named == "builtin":
        return None
    if named:
        return Path(named).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "jaxsparse" / "crossovers.json"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's processor or machine name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(isa: str) -> str:
    """The key of this machine's entry in the crossovers file: CPU model and instruction set (a
    home directory shared by several machines keeps one entry per kind)."""
    return f"{cpu_model()} | {isa}"


def tuned_entry(isa: str) -> dict | None:
    """This machine's tuned N:M crossovers for `isa`, or None: `{"rows": {dtype: ((density
    bound, max sparse tokens), ...)}, "engine": {dtype, ...}}`."""
    path = crossovers_file()
    if path is None:
        return None
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return None
    return _read_crossovers(str(path), stamp).get(machine_key(isa))


@functools.lru_cache(maxsize=8)
def _read_crossovers(path: str, _stamp: int) -> dict:
    """The entries of a crossovers file, checked; a malformed file warns and counts as empty
    (a product must not fail because of a cache)."""
    try:
        data = json.loads(Path(path).read_text())
        if data.get("version") != CROSSOVERS_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {CROSSOVERS_VERSION}")
        return {key: _check_entry(entry) for key, entry in data["machines"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        warnings.warn(f"jaxsparse: ignoring the tuned crossovers in {path} ({err}); the built-in "
                      f"table applies. Rerun `python -m jaxsparse.tune` to rewrite it.",
                      stacklevel=3)
        return {}


def _check_entry(entry: dict) -> dict:
    rows = {}
    for dtype, table in entry["rows"].items():
        parsed = tuple((float(bound), _ALWAYS if most is None else float(most))
                       for bound, most in table)
        bounds = [b for b, _ in parsed]
        if not parsed or bounds != sorted(bounds) or bounds[-1] < 1.0 or any(
                m < 0 for _, m in parsed):
            raise ValueError(f"row {dtype!r} is not ascending density bounds up to 1 with "
                             f"token counts >= 0: {table!r}")
        rows[str(dtype)] = parsed
    return {"rows": rows, "engine": frozenset(str(d) for d in entry["engine"])}


def current_path() -> str:
    """The path `x @ ws` takes in this thread: "auto" unless inside `matmul_path(...)`."""
    return getattr(_state, "path", "auto")


def matmul_path(path: str):
    """Force every jaxsparse product traced inside the block onto one path.

    Args:
        path: "sparse" (always the sparse kernel), "engine" (always the shared engine, or the dense
            path for a format without one), "dense" (always decompress, then XLA's dot) or "auto"
            (`choose_path`).

    Example:
        >>> import jax, jax.numpy as jnp, jaxsparse as jsp
        >>> ws = jsp.NMSparse.fromdense(jnp.ones((8, 4)), n=2, m=4)
        >>> with jsp.matmul_path("dense"):
        ...     y = jnp.ones((3, 8)) @ ws
        >>> y.shape
        (3, 4)
    """
    # Checked here, at the call, not when the block is entered.
    return _forced_path(check_path(path, "jaxsparse.matmul_path"))


@contextlib.contextmanager
def _forced_path(path: str):
    before = current_path()
    _state.path = path
    try:
        yield
    finally:
        _state.path = before


def check_path(path, where: str) -> str:
    if path is None:
        return current_path()
    if not isinstance(path, str) or path not in PATHS:
        raise ValueError(f"{where}: path must be one of {', '.join(map(repr, PATHS))}; got {path!r}")
    return path


def choose_path(tokens: int, dtype, density, *, platform: str | None = None,
                isa: str | None = None) -> str:
    """The path "auto" takes for `tokens` rows of x times a weight of `dtype` and `density`.

    Args:
        tokens: the number of rows of x (the product of its leading dims).
        dtype: the dtype of the product.
        density: the weight's spec (`ws.spec`, e.g. `NM(2, 4)` or `VNM(64, 2, 8)`: its format's
            table), or a number, stored entries over logical entries (`ws.density`), read in the
            N:M table.
        platform: the platform lowered for; default `jax.default_backend()`.
        isa: the CPU kernels' instruction set; default `jsp.cpu_isa()`.

    Returns:
        "sparse", "engine" or "dense". For a spec without an engine (`spec.has_engine` false, e.g.
        `NM(2, 8)`), "engine" becomes "dense"; for a plain number it stays "engine" (the format
        multiplies densely if it has no engine).
    """
    where = "jaxsparse.choose_path"
    if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 0:
        raise ValueError(f"{where}: tokens must be an int >= 0; got {tokens!r}")
    tables, engine, tuned = SPARSE_MAX_TOKENS, True, True
    if isinstance(density, tuple) and hasattr(density, "density"):  # A spec value.
        tables = FORMAT_TABLES.get(getattr(density, "crossover_table", type(density).__name__), {})
        engine = bool(getattr(density, "has_engine", False))
        # The tuner measures 1:4 and 2:4: its rows stand for those patterns only.
        tuned = tables is N4_MAX_TOKENS
        density = density.density
    if not isinstance(density, (int, float, np.floating)) or not 0 < density <= 1:
        raise ValueError(
            f"{where}: density must be a number in (0, 1]; got {density!r} (or pass a spec)"
        )
    platform = platform or jax.default_backend()
    if platform != "cpu" or not _ffi.has_cpu_kernels():
        return "sparse"
    isa = isa or _ffi.cpu_isa()
    dtype_name = np.dtype(dtype).name
    entry = tuned_entry(isa) if tuned else None
    if entry is not None and dtype_name in entry["rows"]:
        return _pick(entry["rows"][dtype_name], tokens, density,
                     engine and dtype_name in entry["engine"])
    # Under "amx" and "avx512bf16" a format without its own row there runs its AVX-512 kernels
    # (or, for the engine's tile kernels on "avx512bf16", is unmeasured there): AVX-512's row.
    row = tables.get((isa, dtype_name)) or (tables.get(("avx512", dtype_name))
                                           if isa in ("amx", "avx512bf16") else None)
    return _pick(row or ((1.0, _ALWAYS),), tokens, density,
                 engine and (isa, dtype_name) in ENGINE_ROWS)


def backward_on_engine(tokens: int, dtype, spec, *, platform: str | None = None,
                       isa: str | None = None) -> bool:
    """Whether the derivatives of `x @ ws` on the sparse kernel should run on the engine's
    kernels (`ENGINE_BACKWARD_FROM`): on the CPU, for a spec with an engine, from the measured
    token count of the (instruction set, dtype)."""
    if not getattr(spec, "has_engine", False):
        return False
    return _measured_from(ENGINE_BACKWARD_FROM, tokens, dtype, platform=platform, isa=isa)


#: From how many tokens the cotangent of x of an int4 product that ran on the kernel (`dx = dy @
#: W^T`) dequantises W and takes XLA's dot (`int4_matmul(..., dense_backward=True)`) rather than
#: the int4 kernels' W^T product, per (instruction set, dtype, form: "int4" or "int4+2:4").
#: Measured on a 2-core AMD Zen 3 (AVX2 + FMA, no AVX-512), jax 0.12.1, 1024 x 1024 g128, the
#: cotangent of x of `x @ w` (`jax.vjp`) over XLA's for the dense weight, medians in one process
#: (`/tmp` probe, shared machine): the int4 + 2:4 W^T kernel re-spreads the kept values per
#: block of 4 tokens: f32 0.24x / 0.51-0.93x at 1 / 8 tokens, then 1.35-1.66x / 1.67-2.69x /
#: 2.9-3.1x at 32 / 64 / 128, where the dense path ran 0.99-1.30x / 0.77-1.17x / 1.09-1.30x; bf16
#: and f16 alike (32 tokens: 1.92x and 1.48x against 1.47x and 0.98x). The dense form's kernel
#: holds out longer: f32 0.41-0.83x at 32, 0.66-1.31x at 64 (dense path 0.83-1.43x), 1.37-1.53x
#: at 128 (1.00-1.33x); f16 1.22x at 128 (1.06x); bf16 0.91x at 128 (0.99x), 2.24x at 192 (1.92x),
#: 1.33x at 512 (1.07x). The forward's own dense path (past `FORMAT_TABLES["INT4"]`'s rows)
#: differentiates through XLA's dot anyway. Elsewhere (unmeasured) the kernels.
INT4_DENSE_BACKWARD_FROM: dict[tuple[str, str, str], int] = {
    ("avx2", "float32", "int4+2:4"): 32,
    ("avx2", "bfloat16", "int4+2:4"): 32,
    ("avx2", "float16", "int4+2:4"): 32,
    ("avx2", "float32", "int4"): 128,
    ("avx2", "float16", "int4"): 128,
    ("avx2", "bfloat16", "int4"): 192,
}


def int4_dense_backward(tokens: int, dtype, spec, *, platform: str | None = None,
                        isa: str | None = None) -> bool:
    """Whether the cotangent of x of an int4 product on the kernel should dequantise W and take
    XLA's dot (`INT4_DENSE_BACKWARD_FROM`): on the CPU, from the measured token count of the
    (instruction set, dtype, form), unless `matmul_path("sparse")` forces the kernels."""
    if current_path() == "sparse":
        return False
    form = "int4" if getattr(spec, "sparsity", None) is None else "int4+2:4"
    return _measured_from(INT4_DENSE_BACKWARD_FROM, tokens, dtype, form, platform=platform,
                          isa=isa)


def _measured_from(table, tokens: int, dtype, *key, platform, isa) -> bool:
    """A backward rule's table, `(isa, dtype name, *key) -> first token count`: true on the CPU
    with our kernels from that count; false off the CPU and where the table has no row."""
    if (platform or jax.default_backend()) != "cpu" or not _ffi.has_cpu_kernels():
        return False
    start = table.get((isa or _ffi.cpu_isa(), np.dtype(dtype).name, *key))
    return start is not None and tokens >= start


def _pick(table, tokens, density, engine: bool) -> str:
    max_tokens = next((most for bound, most in table if density <= bound + 1e-9), table[-1][1])
    if tokens <= max_tokens:
        return "sparse"
    return "engine" if engine else "dense"
