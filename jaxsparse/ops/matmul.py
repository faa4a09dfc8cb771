"""`jaxsparse.matmul(x, w)`: a dense left operand times a sparse weight, for every format.

`x @ w` on any format lands here. This module validates `x`, promotes the dtypes, chooses the
path (jaxsparse/ops/dispatch.py) and hands the product to the format (`w._matmul`, defined by
`jaxsparse.formats._base.SparseFormat`): ops never import formats, formats call ops.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxsparse import _validate as V
from jaxsparse.ops.dispatch import check_path, choose_path

_WHERE = "jaxsparse.matmul"


def matmul(x, w, *, path: str | None = None):
    """`x @ w` for a sparse weight `w` of logical shape `[..., in, out]`.

    Args:
        x: `[..., in]` float32/bfloat16/float16 (any leading dims, including none). With a
            batched `w` (`[B..., in, out]`, a stack of weights), x is `[..., T, in]` and the leading
            dims broadcast as in `jnp.matmul`.
        w: a jaxsparse format, e.g. `NMSparse` or `VNMSparse`.
        path: "auto" (the default, or what an enclosing `jsp.matmul_path(...)` sets) picks at
            trace time between the sparse kernel, the shared engine (decode panels into dense
            tiles, dense micro-kernels) and the dense path (decompress `w`, then XLA's dot) by
            `jsp.choose_path`; "sparse", "engine" or "dense" forces one
            (jaxsparse/ops/dispatch.py).

    Returns:
        `[..., out]` in the promoted dtype of x and w (bf16 with f16 promotes to f32); the product
        accumulates in f32.
    """
    path = check_path(path, _WHERE)
    if not callable(getattr(w, "_matmul", None)):
        raise TypeError(
            f"{_WHERE}: w must be a jaxsparse sparse format (NMSparse, VNMSparse, ...: see "
            f"jaxsparse.fromdense); got {type(w).__name__}"
        )
    x, w = _prepare_x(x, w)
    if path == "auto":
        path = choose_path(_tokens(x, w), x.dtype, w.spec)
    return w._matmul(x, path)


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
    _check_stack_broadcast(x, w)
    dtype = jnp.promote_types(x.dtype, w.dtype)
    return x.astype(dtype), w if w.dtype == dtype else w.astype(dtype)


def _check_stack_broadcast(x, w):
    """A stack of weights `[B..., in, out]` takes x `[..., T, in]` whose leading dims broadcast
    with `B...`, as in `jnp.matmul`."""
    if not w.batch_shape or x.ndim < 2:
        return
    try:
        np.broadcast_shapes(tuple(x.shape[:-2]), tuple(w.batch_shape))
    except ValueError:
        raise ValueError(
            f"{_WHERE}: x's leading dims {tuple(x.shape[:-2])} (all but its last two, of shape "
            f"{tuple(x.shape)}) must broadcast with w's stack dims {tuple(w.batch_shape)} (w has "
            f"shape {w.shape})"
        ) from None


def _tokens(x, w) -> int:
    """Rows of x per weight: all of x's leading dims for one weight, its last for a stack."""
    if not w.batch_shape:
        return math.prod(x.shape[:-1])
    return x.shape[-2] if x.ndim >= 2 else 1
