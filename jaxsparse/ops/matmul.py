"""`jaxsparse.matmul(x, w)`: a dense left operand times a sparse weight, for every format.

Each format registers the function that multiplies by it; `x @ w` on a format lands here.
"""

from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp

from jaxsparse import _validate as V
from jaxsparse.formats.nm import NMSparse
from jaxsparse.ops.dispatch import check_path, choose_path
from jaxsparse.ops.nm import nm_spmm

_WHERE = "jaxsparse.matmul"


def matmul(x, w, *, path: str | None = None):
    """`x @ w` for a sparse weight `w` of logical shape `[..., in, out]`.

    Args:
        x: `[..., in]` float32/bfloat16/float16 (any leading dims, including none). With a
            batched `w` (`[B..., in, out]`, a stack of weights), x is `[..., T, in]` and the leading
            dims broadcast as in `jnp.matmul`.
        w: a jaxsparse format, e.g. `NMSparse`.
        path: "auto" (the default, or what an enclosing `jsp.matmul_path(...)` sets) picks at
            trace time between the sparse kernel and the dense path (decompress `w`, then XLA's
            dot) by `jsp.choose_path`; "sparse" or "dense" forces one (jaxsparse/ops/dispatch.py).

    Returns:
        `[..., out]` in the promoted dtype of x and w (bf16 with f16 promotes to f32); the product
        accumulates in f32.
    """
    path = check_path(path, _WHERE)
    for fmt, rule in _RULES.items():
        if isinstance(w, fmt):
            return rule(x, w, path)
    raise TypeError(
        f"{_WHERE}: w must be a jaxsparse sparse format ({', '.join(f.__name__ for f in _RULES)}); "
        f"got {type(w).__name__}"
    )


def _prepare_x(x, w):
    x = V.as_array("x", x, where=_WHERE)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{_WHERE}: x must be a float array, got dtype {x.dtype.name}")
    V.check_float_dtype("x", x.dtype, where=_WHERE)
    if x.ndim < 1 or x.shape[-1] != w.in_features:
        raise ValueError(
            f"{_WHERE}: x must have last dimension {w.in_features} (w's `in`, the contraction "
            f"dim of w with shape {w.shape}); got x with shape {tuple(x.shape)}"
        )
    dtype = jnp.promote_types(x.dtype, w.dtype)
    return x.astype(dtype), w if w.dtype == dtype else w.astype(dtype)


def _tokens(x, w) -> int:
    """Rows of x per weight: all of x's leading dims for one weight, its last for a stack."""
    if not w.batch_shape:
        return math.prod(x.shape[:-1])
    return x.shape[-2] if x.ndim >= 2 else 1


def _nm_matmul(x, w: NMSparse, path: str):
    x, w = _prepare_x(x, w)
    if path == "auto":
        path = choose_path(_tokens(x, w), x.dtype, w.density)
    if path == "dense":
        return _nm_dense_path(x, w)
    return _nm_spmm_any_rank(x, w)


def _nm_dense_path(x, w: NMSparse):
    """Decompress, then XLA's dot. The dot contracts the `[out, in]` rows as they come out of
    the decompression: transposing them to `[in, out]` first measured 2-5x slower in total
    (the transpose, and XLA fusing it into the dot's operand)."""
    rows = w.dense_rows()[..., : w.in_features]
    if not w.batch_shape:
        return jnp.einsum("...k,nk->...n", x, rows)
    return jnp.matmul(x, jnp.swapaxes(rows, -1, -2))


def _nm_spmm_any_rank(x, w: NMSparse):
    values, indices = w.values, w.indices
    if values.ndim == 2:
        lead = x.shape[:-1]
        x3 = x.reshape(1, math.prod(lead), w.in_features)
        y = nm_spmm(x3, values[None], indices[None], n=w.n, m=w.m)
        return y.reshape(*lead, w.out_features)
    if x.ndim == 1:
        return _nm_spmm_any_rank(x[None], w)[..., 0, :]
    batch = jnp.broadcast_shapes(x.shape[:-2], w.batch_shape)
    x3 = _flatten_batch(x, batch, 2)
    y = nm_spmm(x3, _flatten_batch(values, batch, 2), _flatten_batch(indices, batch, 2),
                n=w.n, m=w.m)
    return y.reshape(*batch, *y.shape[1:])


def _flatten_batch(a, batch, core):
    """Broadcast `a`'s leading dims to `batch` and flatten them to one; `[1, ...]` stays a view
    when `a` has no leading dims (the kernel broadcasts it)."""
    if a.ndim == core:
        return a[None]
    a = jnp.broadcast_to(a, (*batch, *a.shape[-core:]))
    return a.reshape(math.prod(batch), *a.shape[-core:])


_RULES: dict[type, Callable] = {NMSparse: _nm_matmul}
