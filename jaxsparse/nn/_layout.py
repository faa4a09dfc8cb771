"""What the nnx and linen layers share: spec -> format, the arrays a layer holds, the product,
filters, methods.

Layers never name a format's arrays: a spec's format (`spec.format`, a `SparseFormat`) declares
its arrays and their roles. A layer holds each `TRAINABLE` array as a parameter (`nnx.Param`,
linen's `params`) and each `FROZEN` one as sparsity state (`SparsityIndices`, linen's `"sparsity"`
collection), under the array's own name; `compress` makes them from a dense kernel and
`weight` makes the format back from them (CONVENTIONS.md 8: arrays are children, the spec and
the logical shape are static).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxsparse import _validate as V
from jaxsparse.formats import FROZEN, TRAINABLE
from jaxsparse.formats._base import SparseFormat
from jaxsparse.formats._spec import accepted_forms
from jaxsparse.ops.matmul import matmul
from jaxsparse.prune import Unstructured, as_pattern, fits

#: The library's logger: `sparsify` / `densify` report what they replaced and what they skipped.
logger = logging.getLogger("jaxsparse")


def pattern_of(sparsity, where: str):
    """`sparsity` as a validated pattern value; errors name `sparsity` and the accepted forms."""
    return as_pattern(sparsity, name="sparsity", where=where)


def format_of(pattern, where: str):
    """The format class of a spec; a ValueError for patterns no layer can hold."""
    if isinstance(pattern, Unstructured):
        reason = fits(pattern, (1, 1))
        raise ValueError(
            f"{where}: sparsity={pattern} cannot be held by a sparse layer: {reason}; "
            f"layers take {accepted_forms()}"
        )
    return pattern.format


def trainable_names(fmt) -> tuple[str, ...]:
    return fmt.arrays_with_role(TRAINABLE)


def frozen_names(fmt) -> tuple[str, ...]:
    return fmt.arrays_with_role(FROZEN)


def layer_pattern(sparsity, in_features, out_features, where: str):
    """Validate a layer's sizes and pattern together: (spec, format), or a clear exception."""
    in_features = V.check_int("in_features", in_features, low=0, high=2**62, where=where)
    out_features = V.check_int("out_features", out_features, low=0, high=2**62, where=where)
    pattern = pattern_of(sparsity, where)
    fmt = format_of(pattern, where)
    reason = fits(pattern, (in_features, out_features))
    if reason is not None:
        raise ValueError(
            f"{where}: sparsity={pattern} cannot be used by a layer with in_features={in_features}, "
            f"out_features={out_features}: {reason}"
        )
    return pattern, fmt


def compress(kernel, pattern, mask=None) -> dict[str, jax.Array]:
    """`{array name: array}` of the format of `pattern` for a dense kernel `[in, out]`: by
    magnitude, or keeping `mask` (which must respect the pattern)."""
    fmt = pattern.format
    if mask is None:
        w = fmt.fromdense(kernel, **pattern._asdict())
    else:
        w = fmt.frommask(kernel, mask, **pattern._asdict())
    return w.arrays()


def weight(pattern, in_features: int, arrays: dict, *, out_features: int | None = None,
           validate: bool = False):
    """The format of `pattern` from a layer's arrays (validated when asked: the positions are
    checked when the arrays are concrete); `out_features` for formats that hold it static."""
    return pattern.format.from_arrays(pattern, in_features, arrays, validate=validate,
                                      out_features=out_features)


def in_compute_dtype(weight, dtype):
    """The weight in the layer's compute `dtype` (None: as held). Layers promote their trainable
    arrays with the inputs; this also casts what a format holds frozen in float (int4's scales),
    so that `dtype=bf16` computes in bf16 for every format."""
    if dtype is None or weight.dtype == jnp.dtype(dtype):
        return weight
    return weight.astype(dtype)


def check_state(where: str, pattern, fmt, in_features: int, out_features: int, arrays) -> None:
    """Static (trace-time, free) checks of a layer's arrays against its pattern and sizes.

    This is what catches a checkpoint of another pattern or shape restored into the layer.
    """
    for name, (shape, dtype) in fmt.array_shapes(pattern, in_features, out_features).items():
        a = arrays[name]
        if tuple(jnp.shape(a)) != tuple(shape):
            raise ValueError(
                f"{where}: {name} must have shape {tuple(shape)} for a {pattern} layer with "
                f"in_features={in_features}, out_features={out_features}; got "
                f"{tuple(jnp.shape(a))} (a checkpoint of another pattern or shape restored "
                "into this layer?)"
            )
        if dtype is not None and jnp.result_type(a) != jnp.dtype(dtype):
            raise TypeError(
                f"{where}: {name} must have dtype {jnp.dtype(dtype).name}; got "
                f"{jnp.result_type(a).name}"
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


def arrays_from_method(method, kernel, pattern, where: str) -> dict[str, jax.Array]:
    """The arrays a layer holds for a dense kernel `[in, out]` and `method`: "magnitude", a bool
    mask, a callable `(kernel, pattern) -> mask`, or the compressed weight itself (a format
    instance of `pattern` and the kernel's shape, e.g. from `jaxsparse.prune.sparsegpt`: held as
    it is, its values replacing the kernel's)."""
    if isinstance(method, SparseFormat):
        return held_weight(method, kernel, pattern, where)
    return compress(kernel, pattern, mask_from_method(method, kernel, pattern, where))


def held_weight(weight: SparseFormat, kernel, pattern, where: str) -> dict[str, jax.Array]:
    """The arrays of a compressed weight given for a layer, checked against its spec and shape."""
    if weight.spec != pattern:
        raise ValueError(f"{where}: the compressed weight given as method is {weight.spec}; the "
                         f"layer's sparsity is {pattern}")
    if tuple(weight.shape) != tuple(kernel.shape):
        raise ValueError(f"{where}: the compressed weight given as method has shape "
                         f"{tuple(weight.shape)}; the layer's kernel is {tuple(kernel.shape)}")
    return weight.astype(kernel.dtype).arrays()


def method_for(method, name: str):
    """A layer's method: `method` itself, or its entry in a `{layer path: weight}` mapping (also
    under `"<path>/kernel"`); None when the mapping has none."""
    if isinstance(method, Mapping):
        return method.get(name, method.get(f"{name}/kernel"))
    return method


def mask_from_method(method, kernel, pattern, where: str):
    """None for magnitude pruning, else the bool mask `[in, out]` chosen by `method`.

    `method` is "magnitude", a bool mask of the kernel's shape, or a callable
    `(kernel, pattern) -> mask`.
    """
    if isinstance(method, SparseFormat):
        raise TypeError(f"{where}: a compressed weight as method is for dense layers (Linear / "
                        f"Dense); got a {type(method).__name__} here")
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
    """Up-front check of a `sparsify` method (one method for many layers: no mask arrays; or a
    mapping from layer path to its compressed weight)."""
    if isinstance(method, str) and method == "magnitude":
        return
    if callable(method) and not isinstance(method, str):
        return
    if isinstance(method, Mapping):
        for key, weight in method.items():
            if not isinstance(key, str) or not isinstance(weight, SparseFormat):
                raise TypeError(
                    f"{where}: a method mapping must map layer paths to compressed weights "
                    f"(format instances, e.g. from jaxsparse.prune.one_shot); got {key!r}: "
                    f"{type(weight).__name__}")
        return
    raise ValueError(
        f"{where}: method must be 'magnitude', a callable (kernel, pattern) -> bool mask, or a "
        f"mapping from layer path to its compressed weight; got {method!r}"
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
