"""What the nnx and linen layers share: pattern -> compressed layout, the product, filters, methods.

Layers never branch on a pattern themselves: they look its type up in `_LAYOUTS`, which says how a
dense `[in, out]` kernel is compressed into trainable `values` and non-trainable `indices`, and how
those two arrays become a sparse weight again. N:M is the only entry today; V:N:M, 1xN blocks and
int4 groups join by adding theirs (CONVENTIONS.md 8: the arrays are children, the pattern and the
logical shape are static).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxsparse import _validate as V
from jaxsparse.formats.nm import NM, NMSparse
from jaxsparse.ops.matmul import matmul
from jaxsparse.prune import as_pattern, fits

#: The library's logger: `sparsify` / `densify` report what they replaced and what they skipped.
logger = logging.getLogger("jaxsparse")


class Layout(NamedTuple):
    """How one pattern type lives in a layer (all functions pure and jittable)."""

    #: (pattern, in_features, out_features) -> the shape of `values` and of `indices`.
    state_shape: Callable[[Any, int, int], tuple[int, ...]]
    #: The dtype of `indices`.
    indices_dtype: Any
    #: (kernel [in, out], pattern, mask or None) -> (values, indices); None keeps by magnitude.
    compress: Callable[..., tuple[jax.Array, jax.Array]]
    #: (pattern, in_features, values, indices) -> the sparse weight, without host validation.
    weight: Callable[..., Any]
    #: The same, validated (positions checked when the arrays are concrete).
    checked_weight: Callable[..., Any]


def _nm_state_shape(pattern: NM, in_features: int, out_features: int) -> tuple[int, int]:
    return (out_features, -(-in_features // pattern.m) * pattern.n)


def _nm_compress(kernel, pattern: NM, mask=None):
    n, m = pattern
    ws = (
        NMSparse.fromdense(kernel, n=n, m=m)
        if mask is None
        else NMSparse.frommask(kernel, mask, n=n, m=m)
    )
    return ws.values, ws.indices


def _nm_weight(pattern: NM, in_features: int, values, indices) -> NMSparse:
    return NMSparse.tree_unflatten((pattern.n, pattern.m, in_features), (values, indices))


def _nm_checked_weight(pattern: NM, in_features: int, values, indices) -> NMSparse:
    return NMSparse(values, indices, n=pattern.n, m=pattern.m, in_features=in_features)


_LAYOUTS: dict[type, Layout] = {
    NM: Layout(_nm_state_shape, jnp.uint8, _nm_compress, _nm_weight, _nm_checked_weight),
}


def pattern_of(sparsity, where: str):
    """`sparsity` as a validated pattern value; errors name `sparsity` and the accepted forms."""
    try:
        return as_pattern(sparsity, name="sparsity")
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: {err}") from None


def layout_of(pattern, where: str) -> Layout:
    """The layout of a pattern value; a ValueError for patterns no layer can hold."""
    layout = _LAYOUTS.get(type(pattern))
    if layout is None:
        reason = fits(pattern, (1, 1)) or "it has no compressed format"
        raise ValueError(
            f"{where}: sparsity={pattern} cannot be held by a sparse layer: {reason}; "
            f"layers take {', '.join(_accepted())}"
        )
    return layout


def _accepted() -> list[str]:
    return [f"jaxsparse.{t.__name__}" for t in _LAYOUTS] + ["a string 'n:m' such as '2:4'"]


def layer_pattern(sparsity, in_features, out_features, where: str):
    """Validate a layer's sizes and pattern together: (pattern, layout), or a clear exception."""
    in_features = V.check_int("in_features", in_features, low=0, high=2**62, where=where)
    out_features = V.check_int("out_features", out_features, low=0, high=2**62, where=where)
    pattern = pattern_of(sparsity, where)
    layout = layout_of(pattern, where)
    reason = fits(pattern, (in_features, out_features))
    if reason is not None:
        raise ValueError(
            f"{where}: sparsity={pattern} cannot be used by a layer with in_features={in_features}, "
            f"out_features={out_features}: {reason}"
        )
    return pattern, layout


def check_state(
    where: str, pattern, layout: Layout, in_features: int, out_features: int, values, indices
) -> None:
    """Static (trace-time, free) checks of a layer's arrays against its pattern and sizes.

    This is what catches a checkpoint of another pattern or shape restored into the layer.
    """
    want = layout.state_shape(pattern, in_features, out_features)
    for name, a in (("values", values), ("indices", indices)):
        if tuple(jnp.shape(a)) != want:
            raise ValueError(
                f"{where}: {name} must have shape {want} for a {pattern} layer with "
                f"in_features={in_features}, out_features={out_features}; got "
                f"{tuple(jnp.shape(a))} (a checkpoint of another pattern or shape restored "
                "into this layer?)"
            )
    if jnp.result_type(indices) != jnp.dtype(layout.indices_dtype):
        raise TypeError(
            f"{where}: indices must have dtype {jnp.dtype(layout.indices_dtype).name}; got "
            f"{jnp.result_type(indices).name}"
        )


def sparse_product(where: str, x, weight, preferred_element_type=None):
    """`x @ weight` after the layer promoted dtypes; `preferred_element_type` as in dot_general.

    A wider `preferred_element_type` (bf16 inputs, f32 result) multiplies the widened operands:
    widening is exact and the kernels accumulate in f32, so this is the f32-accumulated product
    emitted in f32, which is what `dot_general(..., preferred_element_type=f32)` computes.
    """
    if preferred_element_type is None:
        return matmul(x, weight)
    out = jnp.dtype(preferred_element_type)
    if not jnp.issubdtype(out, jnp.floating):
        raise TypeError(f"{where}: preferred_element_type must be a float dtype, got {out.name}")
    compute = jnp.promote_types(x.dtype, out)
    if compute != x.dtype:
        x, weight = x.astype(compute), weight.astype(compute)
    return matmul(x, weight).astype(out)


def mask_from_method(method, kernel, pattern, where: str):
    """None for magnitude pruning, else the bool mask `[in, out]` chosen by `method`.

    `method` is "magnitude", a bool mask of the kernel's shape, or a callable
    `(kernel, pattern) -> mask`.
    """
    if isinstance(method, str):
        if method == "magnitude":
            return None
        raise ValueError(
            f"{where}: method must be 'magnitude', a bool mask [in, out] or a callable "
            f"(kernel, pattern) -> mask; got {method!r}"
        )
    mask = method(kernel, pattern) if callable(method) else method
    mask = V.as_array("method (mask)", mask, where=where)
    if tuple(mask.shape) != tuple(kernel.shape):
        raise ValueError(
            f"{where}: the mask given as method must have the kernel's shape "
            f"{tuple(kernel.shape)}; got {tuple(mask.shape)}"
        )
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{where}: the mask given as method must be bool, got {mask.dtype.name}")
    return mask


def check_method(method, where: str) -> None:
    """Up-front check of a `sparsify` method (one method for many layers: no mask arrays)."""
    if isinstance(method, str) and method == "magnitude":
        return
    if callable(method) and not isinstance(method, str):
        return
    raise ValueError(
        f"{where}: method must be 'magnitude' or a callable (kernel, pattern) -> bool mask; "
        f"got {method!r}"
    )


def path_str(path) -> str:
    return "/".join(str(p) for p in path)


def make_filter(filter, where: str) -> Callable[[tuple, Any], bool]:
    """`filter` as a predicate on (path parts, module): None (all), a regex or a callable.

    As in `jaxsparse.prune`: a callable gets the '/'-joined path (list items appear as their
    index) and the module; a regular expression (a string or a compiled pattern) is searched
    (`re.search`) in that path, e.g. `r"^encoder/"` or `"mlp"`.
    """
    if filter is None:
        return lambda path, module: True
    if isinstance(filter, (str, re.Pattern)):
        try:
            regex = re.compile(filter)
        except re.error as err:
            raise ValueError(
                f"{where}: filter {filter!r} is not a valid regular expression: {err}"
            ) from None
        return lambda path, module: regex.search(path_str(path)) is not None
    if callable(filter):
        return lambda path, module: bool(filter(path_str(path), module))
    raise TypeError(
        f"{where}: filter must be None, a regular expression (str or re.Pattern) matched against "
        f"the '/'-joined module path, or a predicate (path, module) -> bool; got "
        f"{type(filter).__name__}"
    )
