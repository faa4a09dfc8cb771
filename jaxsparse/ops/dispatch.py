"""Which path `x @ ws` takes: the sparse kernel, or the dense path (decompress, then XLA's dot).

A sparse kernel reads fewer bytes and does fewer FMAs, but XLA's dense dot runs its FMAs closer to
the machine's peak (and, for bf16, on AVX512-BF16/AMX dot instructions our f32-accumulating CPU
kernels do not use). Where the measured crossovers say the dense path wins, jaxsparse multiplies
densely instead (it does not yet win everywhere: docs/cpu_speed_notes.md lists the shapes where
neither path reaches the dense dot). The choice is made at trace time from static
facts only: the platform, the CPU kernels' instruction set, the dtype, the density n/m and the
number of tokens (the product of x's leading dims).

The rule, `choose_path`:

- Off the CPU, or without the CPU extension: "sparse" (the CUDA kernels, or the reference with its
  fallback warning).
- On the CPU, per (instruction set, dtype), a table of crossovers (`SPARSE_MAX_TOKENS`): for
  density bands, the most tokens at which the sparse kernel beat the dense path
  (benchmarks/bench.py, docs/cpu_speed_notes.md). Beyond it, "dense".

A user forces either path per call (`jsp.matmul(x, ws, path="dense")`) or for a region of code,
including `@` and the Flax layers (`with jsp.matmul_path("sparse"): ...`). Both paths compute the same
product; they round differently (the kernel accumulates in f32 in its own order; the dense path
rounds as XLA's dot does).
"""

from __future__ import annotations

import contextlib
import math
import threading

import jax
import numpy as np

from jaxsparse import _ffi

__all__ = ["FORMAT_TABLES", "PATHS", "SPARSE_MAX_TOKENS", "choose_path", "matmul_path",
           "current_path"]

PATHS = ("auto", "sparse", "dense")

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
    # On AMX machines XLA's bf16 dot runs on the tiles (~2x its AVX512-BF16 rate at 128+ tokens)
    # while the N:M kernels still widen to f32: measured on a 2-core Intel Xeon with AMX (jax
    # 0.12, 4096x4096, against the dense path), 2:4 was faster at 128 tokens (1.24x) and slower
    # at 192 (0.82x); 1:4 faster at 192 (1.18x), even at 256. f32 and f16 take the AVX-512 rows.
    ("amx", "bfloat16"): ((0.25, 255), (1.0, 128)),
    # AVX2 and portable rows are estimates, not measurements: XLA on the measured machine always
    # ran its AVX-512 dot. They keep the kernel where its byte and FMA savings are largest.
    ("avx2", "float32"): ((0.25, _ALWAYS), (1.0, 1023)),
    ("avx2", "float16"): ((1.0, _ALWAYS),),
    ("avx2", "bfloat16"): ((0.25, _ALWAYS), (1.0, 1023)),
    # The portable path is a scalar fallback: dense once the dot amortizes the decompression.
    ("portable", "float32"): ((1.0, 255),),
    ("portable", "float16"): ((1.0, 255),),
    ("portable", "bfloat16"): ((1.0, 255),),
}

#: Per format (the spec type's name), its crossover table; N:M's is `SPARSE_MAX_TOKENS`. A
#: format without a table (or without a row for the ISA and dtype) always takes its kernel.
FORMAT_TABLES: dict[str, dict] = {
    "NM": SPARSE_MAX_TOKENS,
    # V:N:M's kernels compute over 4/m of the inputs, sharing each panel's gathered inputs across
    # its outputs: they beat XLA's dot at every harness shape, f32 and bf16 (the tightest: bf16
    # 64:2:8 at 2048 tokens, 1.22x; the dense path there was 0.92x), on a 2-core AMD Zen 5 with
    # jax 0.12 (benchmarks/bench.py, 4096x4096). On a 2-core Intel Xeon with AMX, bf16 runs on
    # the tiles from 32 tokens: 1.5-1.9x (64:2:8) and 2.5-3.1x (128:2:16) over XLA's AMX dot at
    # 32-2048 tokens, 1.9-24x over the dense path. No table: always the kernel.
}

_state = threading.local()


def current_path() -> str:
    """The path `x @ ws` takes in this thread: "auto" unless inside `matmul_path(...)`."""
    return getattr(_state, "path", "auto")


@contextlib.contextmanager
def matmul_path(path: str):
    """Force every jaxsparse product traced inside the block onto one path.

    Args:
        path: "sparse" (always the sparse kernel), "dense" (always decompress, then XLA's dot) or
            "auto" (`choose_path`).

    Example:
        >>> import jax, jax.numpy as jnp, jaxsparse as jsp
        >>> ws = jsp.NMSparse.fromdense(jnp.ones((8, 4)), n=2, m=4)
        >>> with jsp.matmul_path("dense"):
        ...     y = jnp.ones((3, 8)) @ ws
        >>> y.shape
        (3, 4)
    """
    path = check_path(path, "jaxsparse.matmul_path")
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
        "sparse" or "dense".
    """
    where = "jaxsparse.choose_path"
    if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 0:
        raise ValueError(f"{where}: tokens must be an int >= 0; got {tokens!r}")
    tables = SPARSE_MAX_TOKENS
    if isinstance(density, tuple) and hasattr(density, "density"):  # A spec value.
        tables = FORMAT_TABLES.get(type(density).__name__, {})
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
    # Under "amx" a format without an AMX row runs its AVX-512 kernels: their row applies.
    row = tables.get((isa, dtype_name)) or (tables.get(("avx512", dtype_name)) if isa == "amx"
                                           else None)
    table = row or ((1.0, _ALWAYS),)
    for bound, max_tokens in table:
        if density <= bound + 1e-9:
            return "sparse" if tokens <= max_tokens else "dense"
    return "sparse" if tokens <= table[-1][1] else "dense"
