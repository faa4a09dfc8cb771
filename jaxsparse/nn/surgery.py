"""Model surgery for nnx models: `sparsify` (nnx.Linear -> SparseLinear) and `densify` (back).

Both return a new model and leave their argument untouched: they clone it first (new Variables,
shared references preserved), then rewrite the clone with `nnx.recursive_map`.
"""

from __future__ import annotations

import typing as tp

from flax import nnx

from jaxsparse.nn import _layout
from jaxsparse.nn.linear import SparseLinear, dense_layer_reason
from jaxsparse.prune import fits

M = tp.TypeVar("M")


def sparsify(
    model: M,
    sparsity: tp.Any,
    method: tp.Any = "magnitude",
    filter: tp.Any = None,
) -> M:
    """A copy of `model` whose `nnx.Linear` layers are `SparseLinear` layers.

    Each selected layer becomes `SparseLinear.from_dense(linear, sparsity, method=method)`; layers
    the pattern cannot take (e.g. `in_features < m` for N:M), subclasses of `nnx.Linear` and
    layers with a custom `dot_general` stay dense. Every replacement and every skip is logged with
    its reason on the `"jaxsparse"` logger (INFO).

    Args:
        model: an nnx graph node (a Module, or a list/dict of them); not modified.
        sparsity: the format's spec: `jaxsparse.NM(n, m)`, `jaxsparse.VNM(v, n, m)`, or their
            strings (`"2:4"`, `"64:2:8"`).
        method: "magnitude" or a callable `(kernel [in, out], pattern) -> bool mask`.
        filter: which layers to convert: None (all), a regular expression searched in the
            '/'-joined module path (e.g. `"^encoder/"`; list items appear as their index), or a
            predicate `(path, module) -> bool` on that '/'-joined path (as in `jaxsparse.prune`).

    Returns:
        The new model (same structure, shared references kept shared).

    Example:
        >>> import jaxsparse as jsp
        >>> from flax import nnx
        >>> mlp = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu,
        ...                      nnx.Linear(16, 2, rngs=nnx.Rngs(1)))
        >>> sparse = jsp.nn.sparsify(mlp, "2:4")
        >>> type(sparse.layers[0]).__name__
        'SparseLinear'
    """
    where = "jaxsparse.nn.sparsify"
    pattern = _layout.pattern_of(sparsity, where)
    _layout.format_of(pattern, where)
    _layout.check_method(method, where)
    selected = _layout.make_filter(filter, where)
    counts = {"replaced": 0, "skipped": 0}

    def convert(path, node):
        if not isinstance(node, nnx.Linear):
            return node
        name = _layout.path_str(path) or "<root>"
        desc = f"{type(node).__name__}({node.in_features} -> {node.out_features})"
        if not selected(path, node):
            reason = "excluded by filter"
        else:
            reason = dense_layer_reason(node) or _fits(pattern, node)
        if reason is not None:
            counts["skipped"] += 1
            _layout.logger.info("%s: skipped %s %s: %s", where, name, desc, reason)
            return node
        counts["replaced"] += 1
        _layout.logger.info("%s: replaced %s %s with SparseLinear %s", where, name, desc, pattern)
        return SparseLinear.from_dense(node, pattern, method=method)

    new = nnx.recursive_map(convert, nnx.clone(model))
    _layout.logger.info(
        "%s: %d layer(s) replaced, %d skipped (pattern %s)",
        where,
        counts["replaced"],
        counts["skipped"],
        pattern,
    )
    return new


def densify(model: M) -> M:
    """A copy of `model` whose `SparseLinear` layers are the equivalent `nnx.Linear` layers.

    The dense kernels hold the kept values in place and zeros elsewhere, so the new model computes
    the same function (up to the summation order of the product). Logged on `"jaxsparse"` (INFO).

    Args:
        model: an nnx graph node; not modified.

    Returns:
        The new model.
    """
    where = "jaxsparse.nn.densify"
    count = 0

    def convert(path, node):
        nonlocal count
        if not isinstance(node, SparseLinear):
            return node
        count += 1
        _layout.logger.info(
            "%s: replaced %s SparseLinear(%d -> %d, %s) with Linear",
            where,
            _layout.path_str(path) or "<root>",
            node.in_features,
            node.out_features,
            node.sparsity,
        )
        return node.to_dense()

    new = nnx.recursive_map(convert, nnx.clone(model))
    _layout.logger.info("%s: %d layer(s) replaced", where, count)
    return new


def _fits(pattern, linear: nnx.Linear) -> str | None:
    return fits(pattern, (linear.in_features, linear.out_features))
