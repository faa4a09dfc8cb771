"""Variable-tree surgery for linen models: `sparsify` (Dense -> SparseDense trees) and `densify`.

A linen model's structure lives in its code, so these functions turn *variables*: a model that uses
`nn.Dense(name="fc")` has `params/fc/kernel`; the same model written with
`SparseDense(name="fc", sparsity=...)` has the format's trainable arrays in `params/fc/`
(`values`) and its frozen arrays in `sparsity/fc/` (N:M: `indices`; V:N:M: `indices`, `columns`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax.core import FrozenDict

from jaxsparse.linen.dense import SPARSITY_COLLECTION, SparsityIndices
from jaxsparse.nn import _layout
from jaxsparse.prune import fits


def sparsify(
    variables: Mapping[str, Any],
    sparsity: Any,
    method: Any = "magnitude",
    filter: Any = None,
) -> Mapping[str, Any]:
    """The variables of the SparseDense version of a model, from those of its Dense version.

    Every Dense layer in `variables["params"]` (a dict holding a 2-D float `kernel` `[in, out]`
    and optionally a `bias`, nothing else) that `filter` selects and the pattern fits becomes
    the format's trainable arrays plus `bias` in `params`, and its frozen arrays (each a
    `SparsityIndices` box) at the same path in the `"sparsity"` collection. Other layers and collections are kept as they are. Every
    replacement and skip is logged with its reason on the `"jaxsparse"` logger (INFO).

    Args:
        variables: a linen variable dict (or FrozenDict) with a `"params"` collection; not
            modified.
        sparsity: the format's spec: `jaxsparse.NM(n, m)`, `jaxsparse.VNM(v, n, m)`, or their
            strings (`"2:4"`, `"64:2:8"`).
        method: "magnitude" or a callable `(kernel [in, out], pattern) -> bool mask`.
        filter: None (all Dense layers), a regular expression searched in the '/'-joined module
            path within params (e.g. `"^encoder/"`), or a predicate `(path, layer_params) -> bool`
            on that '/'-joined path (as in `jaxsparse.prune`).

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
    frozen, variables = _copy_variables(variables, where)
    positions = _copy_tree(variables.get(SPARSITY_COLLECTION, {}))
    counts = {"replaced": 0, "skipped": 0}

    def convert(path, layer):
        kernel = layer["kernel"]
        name = _layout.path_str(path) or "<root>"
        desc = f"Dense kernel {tuple(kernel.shape)}"
        if not selected(path, layer):
            reason = "excluded by filter"
        else:
            reason = fits(pattern, kernel.shape)
        if reason is not None:
            counts["skipped"] += 1
            _layout.logger.info("%s: skipped %s (%s): %s", where, name, desc, reason)
            return layer
        mask = _layout.mask_from_method(method, kernel, pattern, where)
        arrays = _layout.compress(kernel, pattern, mask)
        counts["replaced"] += 1
        _layout.logger.info("%s: replaced %s (%s) with SparseDense %s", where, name, desc, pattern)
        node = positions
        for key in path:
            node = node.setdefault(key, {})
        for n in _layout.frozen_names(fmt):
            node[n] = SparsityIndices(arrays[n], pattern, int(kernel.shape[0]))
        out = {}
        for k, v in layer.items():
            if k == "kernel":
                out.update((n, arrays[n]) for n in trainable)
            else:
                out[k] = v
        return out

    variables["params"] = _map_layers(convert, variables["params"], (), _is_dense_layer)
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
    zeros elsewhere (bit-exact); the `"sparsity"` collection goes away when it empties. Logged on
    `"jaxsparse"` (INFO).

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
        kernel = _layout.weight(box.pattern, box.in_features, arrays, validate=True).todense()
        dense = {"kernel": kernel}
        dense.update((k, v) for k, v in layer.items() if k not in trainable)
        if path:
            _set(variables["params"], path, dense)
        else:
            variables["params"] = dense
        count += 1
        _layout.logger.info(
            "%s: replaced %s (SparseDense %s) with Dense kernel %s",
            where,
            name,
            box.pattern,
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
