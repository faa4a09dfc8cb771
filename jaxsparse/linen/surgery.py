"""Variable-tree surgery for linen models: `sparsify` (Dense -> SparseDense and, when asked,
Conv -> SparseConv trees) and `densify`.

A linen model's structure lives in its code, so these functions turn *variables*: a model that uses
`nn.Dense(name="fc")` has `params/fc/kernel`; the same model written with
`SparseDense(name="fc", sparsity=...)` has the format's trainable arrays in `params/fc/`
(`values`) and its frozen arrays in `sparsity/fc/` (N:M: `indices`; V:N:M: `indices`, `columns`).
`nn.Conv(name="conv")` and `jaxsparse.linen.SparseConv(name="conv", ...)` likewise, the Conv's
kernel `[*kernel_size, in, out]` held flattened to `[prod(kernel_size) * in, out]`.

Variables alone cannot tell a Conv's kernel `[kh, kw, in, out]` from a DenseGeneral's of the
same rank (attention's `[features, heads, head_dim]`), so `sparsify` converts kernels of rank 3
and more only where its `convs=` says they are convolutions; `densify` needs no help (the boxes
of a SparseConv carry its `kernel_size`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax.core import FrozenDict

from jaxsparse.linen.conv import ConvSparsityIndices
from jaxsparse.linen.dense import SPARSITY_COLLECTION, SparsityIndices
from jaxsparse.nn import _layout
from jaxsparse.nn.conv import conv_fits, conv_mask_from_method, flatten_kernel
from jaxsparse.prune import fits


def sparsify(
    variables: Mapping[str, Any],
    sparsity: Any,
    method: Any = "magnitude",
    filter: Any = None,
    *,
    convs: Any = None,
) -> Mapping[str, Any]:
    """The variables of the SparseDense version of a model, from those of its Dense version.

    Every Dense layer in `variables["params"]` (a dict holding a 2-D float `kernel` `[in, out]`
    and optionally a `bias`, nothing else) that `filter` selects and the pattern fits becomes
    the format's trainable arrays plus `bias` in `params`, and its frozen arrays (each a
    `SparsityIndices` box) at the same path in the `"sparsity"` collection. With `convs=`, a
    Conv layer (a float `kernel` `[*kernel_size, in, out]` of rank 3 or more, and optionally a
    `bias`) that `convs` and `filter` select and the pattern fits (`jaxsparse.nn.conv.conv_fits`:
    for N:M, `in % m == 0`) becomes the variables of a `jaxsparse.linen.SparseConv` of the same
    name, its frozen arrays boxed in `ConvSparsityIndices`. Other layers and collections are kept
    as they are. Every replacement and skip is logged with its reason on the `"jaxsparse"`
    logger (INFO).

    Args:
        variables: a linen variable dict (or FrozenDict) with a `"params"` collection; not
            modified.
        sparsity: the format's spec: `jaxsparse.NM(n, m)`, `jaxsparse.VNM(v, n, m)`, or their
            strings (`"2:4"`, `"64:2:8"`).
        method: "magnitude" or a callable `(kernel [in, out], pattern) -> bool mask` (a Conv's
            kernel is given flattened, `[prod(kernel_size) * in, out]`; its mask may have that
            shape or the kernel's); or a mapping `{layer path: compressed weight}` (e.g. from
            `jaxsparse.prune.sparsegpt` per layer): each named Dense holds its weight as it is,
            layers it does not name stay dense.
        filter: None (all Dense layers), a regular expression searched in the '/'-joined module
            path within params (e.g. `"^encoder/"`), or a predicate `(path, layer_params) -> bool`
            on that '/'-joined path (as in `jaxsparse.prune`).
        convs: which layers with a kernel of rank 3 or more are convolutions (`nn.Conv`, to
            become `SparseConv`): None (the default: none, as variables cannot tell them from
            `nn.DenseGeneral`'s), True (all of them), or a regular expression or predicate as for
            `filter`. `filter` applies to them too.

    Returns:
        A new variable dict (a FrozenDict when `variables` is one) for `apply` of the model
        written with `SparseDense` layers of the same names.

    Example:
        >>> import jax, jax.numpy as jnp, jaxsparse as jsp
        >>> from flax import linen as nn
        >>> dense = nn.Dense(8, name="fc").init(jax.random.key(0), jnp.ones((1, 16)))
        >>> sparse = jsp.linen.sparsify(dense, "2:4")
        >>> y = jsp.linen.SparseDense(8, sparsity="2:4", name="fc").apply(sparse, jnp.ones((1, 16)))
    """
    where = "jaxsparse.linen.sparsify"
    pattern = _layout.pattern_of(sparsity, where)
    fmt = _layout.format_of(pattern, where)
    trainable = _layout.trainable_names(fmt)
    _layout.check_method(method, where)
    selected = _layout.make_filter(filter, where)
    if convs is None or convs is False:
        is_conv = None
    elif convs is True:
        is_conv = _layout.make_filter(None, where)
    else:
        try:
            is_conv = _layout.make_filter(convs, where)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (as convs=)") from None
    frozen, variables = _copy_variables(variables, where)
    positions = _copy_tree(variables.get(SPARSITY_COLLECTION, {}))
    counts = {"replaced": 0, "skipped": 0}

    def convert(path, layer):
        kernel = layer["kernel"]
        name = _layout.path_str(path) or "<root>"
        conv = len(kernel.shape) > 2
        desc = f"{'Conv' if conv else 'Dense'} kernel {tuple(kernel.shape)}"
        if conv and (is_conv is None or not is_conv(path, layer)):
            reason = (
                f"a kernel of rank {len(kernel.shape)} is a Conv's or a DenseGeneral's; "
                + ("pass convs=True (or a filter of Conv paths) to convert convolutions"
                   if is_conv is None else "not selected by convs=")
            )
        elif not selected(path, layer):
            reason = "excluded by filter"
        else:
            reason = conv_fits(pattern, kernel.shape) if conv else fits(pattern, kernel.shape)
        layer_method = _layout.method_for(method, name)
        if reason is None and layer_method is None:
            reason = "no compressed weight for it in the method mapping"
        if reason is None and conv and isinstance(method, Mapping):
            reason = "a compressed weight in the method mapping is for Dense layers"
        if reason is not None:
            counts["skipped"] += 1
            _layout.logger.info("%s: skipped %s (%s): %s", where, name, desc, reason)
            return layer
        if conv:
            mask = conv_mask_from_method(layer_method, kernel, pattern, where)
            arrays = _layout.compress(flatten_kernel(kernel), pattern, mask)
            rows = math.prod(kernel.shape[:-1])
        else:
            arrays = _layout.arrays_from_method(layer_method, kernel, pattern, where)
            rows = int(kernel.shape[0])
        counts["replaced"] += 1
        _layout.logger.info("%s: replaced %s (%s) with %s %s", where, name, desc,
                            "SparseConv" if conv else "SparseDense", pattern)
        node = positions
        for key in path:
            node = node.setdefault(key, {})
        for n in _layout.frozen_names(fmt):
            if conv:
                node[n] = ConvSparsityIndices(arrays[n], pattern, rows, int(kernel.shape[-1]),
                                              tuple(int(k) for k in kernel.shape[:-2]))
            else:
                node[n] = SparsityIndices(arrays[n], pattern, rows, int(kernel.shape[1]))
        out = {}
        for k, v in layer.items():
            if k == "kernel":
                out.update((n, arrays[n]) for n in trainable)
            else:
                out[k] = v
        return out

    variables["params"] = _map_layers(convert, variables["params"], (), _is_kernel_layer)
    if positions:
        variables[SPARSITY_COLLECTION] = positions
    _layout.logger.info(
        "%s: %d layer(s) replaced, %d skipped (pattern %s)",
        where,
        counts["replaced"],
        counts["skipped"],
        pattern,
    )
    return FrozenDict(variables) if frozen else variables


def densify(variables: Mapping[str, Any]) -> Mapping[str, Any]:
    """The variables of the Dense version of a model, from those of its SparseDense version.

    The `SparsityIndices` boxes at `sparsity/<path>/` and the trainable arrays at `params/<path>/`
    of each SparseDense become `params/<path>/kernel` `[in, out]`, the kept values in place and
    zeros elsewhere (bit-exact); those of a SparseConv (`ConvSparsityIndices`) become the Conv
    kernel `[*kernel_size, in, out]`. The `"sparsity"` collection goes away when it empties.
    Logged on `"jaxsparse"` (INFO).

    Args:
        variables: a linen variable dict (or FrozenDict) from `SparseDense` layers, their frozen
            arrays still boxed in `SparsityIndices` (which carries the spec); not modified.

    Returns:
        A new variable dict for `apply` of the model written with `nn.Dense` layers.
    """
    where = "jaxsparse.linen.densify"
    frozen, variables = _copy_variables(variables, where)
    positions = variables.pop(SPARSITY_COLLECTION, {})
    count = 0

    def visit(path, node):
        nonlocal count
        if not isinstance(node, dict):
            return node
        boxes = {k: v for k, v in node.items() if isinstance(v, SparsityIndices)}
        unboxed = [k for k, v in node.items() if not isinstance(v, (dict, SparsityIndices))]
        name = _layout.path_str(path) or "<root>"
        if unboxed and not boxes:
            raise TypeError(
                f"{where}: {SPARSITY_COLLECTION}/{name}/{unboxed[0]} must be a "
                "jaxsparse.linen.SparsityIndices box (it carries the pattern); got "
                f"{type(node[unboxed[0]]).__name__} (stripped by nn.meta.unbox?)"
            )
        out = {k: visit((*path, k), v) for k, v in node.items() if k not in boxes}
        if not boxes:
            return out
        box = next(iter(boxes.values()))
        fmt = _layout.format_of(box.pattern, where)
        trainable = _layout.trainable_names(fmt)
        layer = _get(variables["params"], path)
        if not isinstance(layer, dict) or any(n not in layer for n in trainable):
            raise ValueError(
                f"{where}: {SPARSITY_COLLECTION}/{name}/{next(iter(boxes))} has no "
                f"params/{name}/{trainable[0]} beside it"
            )
        arrays = {n: layer[n] for n in trainable}
        arrays.update((n, b.value) for n, b in boxes.items())
        missing = [n for n in fmt.array_names() if n not in arrays]
        if missing:
            raise ValueError(f"{where}: {SPARSITY_COLLECTION}/{name}/{missing[0]} is missing")
        kernel = _layout.weight(box.pattern, box.in_features, arrays,
                                out_features=box.out_features, validate=True).todense()
        kernel_size = getattr(box, "kernel_size", None)
        if kernel_size is not None:  # A SparseConv: the flattened kernel back to its shape.
            kernel = kernel.reshape(*kernel_size, -1, kernel.shape[-1])
        dense = {"kernel": kernel}
        dense.update((k, v) for k, v in layer.items() if k not in trainable)
        if path:
            _set(variables["params"], path, dense)
        else:
            variables["params"] = dense
        count += 1
        _layout.logger.info(
            "%s: replaced %s (%s %s) with %s kernel %s",
            where,
            name,
            "SparseDense" if kernel_size is None else "SparseConv",
            box.pattern,
            "Dense" if kernel_size is None else "Conv",
            tuple(kernel.shape),
        )
        return out

    rest = _prune_empty(visit((), positions))
    if rest:
        variables[SPARSITY_COLLECTION] = rest
    _layout.logger.info("%s: %d layer(s) replaced", where, count)
    return FrozenDict(variables) if frozen else variables


def _is_dense_layer(node) -> bool:
    if not isinstance(node, dict) or "kernel" not in node or not set(node) <= {"kernel", "bias"}:
        return False
    kernel = node["kernel"]
    return (
        hasattr(kernel, "shape")
        and len(kernel.shape) == 2
        and jnp.issubdtype(kernel.dtype, jnp.floating)
    )


def _is_kernel_layer(node) -> bool:
    """A Dense layer, or one whose float kernel has rank 3 or more (a Conv's or a
    DenseGeneral's: `sparsify`'s `convs=` tells them apart)."""
    if _is_dense_layer(node):
        return True
    if not isinstance(node, dict) or "kernel" not in node or not set(node) <= {"kernel", "bias"}:
        return False
    kernel = node["kernel"]
    return (
        hasattr(kernel, "shape")
        and len(kernel.shape) >= 3
        and jnp.issubdtype(kernel.dtype, jnp.floating)
    )


def _map_layers(fn, node, path, is_layer):
    if is_layer(node):
        return fn(path, node)
    if isinstance(node, dict):
        return {k: _map_layers(fn, v, (*path, k), is_layer) for k, v in node.items()}
    return node


def _copy_variables(variables, where):
    frozen = isinstance(variables, FrozenDict)
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(
            f"{where}: variables must be a linen variable dict with a 'params' collection (what "
            f"Module.init returns); got {type(variables).__name__}"
            + (f" with keys {sorted(variables)}" if isinstance(variables, Mapping) else "")
        )
    return frozen, _copy_tree(variables)


def _copy_tree(node):
    if isinstance(node, Mapping):
        return {k: _copy_tree(v) for k, v in node.items()}
    return node


def _get(tree, path):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _prune_empty(node):
    if not isinstance(node, dict):
        return node
    out = {k: _prune_empty(v) for k, v in node.items()}
    return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}
