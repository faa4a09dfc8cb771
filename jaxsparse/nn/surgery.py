"""Model surgery for nnx models: `sparsify` (nnx.Linear -> SparseLinear, nnx.Conv -> SparseConv)
and `densify` (back).

Both return a new model and leave their argument untouched: they clone it first (new Variables,
shared references preserved), then rewrite the clone with `nnx.recursive_map`.
"""

from __future__ import annotations

import typing as tp

from flax import nnx

from jaxsparse.nn import _layout
from jaxsparse.nn.conv import SparseConv, conv_fits, dense_conv_reason
from jaxsparse.nn.linear import SparseLinear, dense_layer_reason
from jaxsparse.prune import fits

M = tp.TypeVar("M")


def sparsify(
    model: M,
    sparsity: tp.Any,
    method: tp.Any = "magnitude",
    filter: tp.Any = None,
    *,
    rearrange: bool = False,
    example_input: tp.Any = None,
) -> M:
    """A copy of `model` whose `nnx.Linear` and `nnx.Conv` layers are `SparseLinear` and
    `SparseConv` layers.

    Each selected Linear becomes `SparseLinear.from_dense(linear, sparsity, method=method)` and
    each selected Conv `SparseConv.from_dense(conv, sparsity, method=method)` (its kernel
    `[*kernel_size, in, out]` held as the flattened `[prod(kernel_size) * in, out]` matrix).
    Layers the pattern cannot take (e.g. `in_features < m` for N:M, or a Conv whose input
    channels are not a multiple of `m`), subclasses, layers with a custom `dot_general` /
    `conv_general_dilated`, masked Convs and grouped Convs (`feature_group_count > 1`) stay
    dense. Every replacement and every skip is logged with its reason on the `"jaxsparse"`
    logger (INFO).

    Args:
        model: an nnx graph node (a Module, or a list/dict of them); not modified.
        sparsity: the format's spec: `jaxsparse.NM(n, m)`, `jaxsparse.VNM(v, n, m)`,
            `jaxsparse.Blocks(n, density)`, or their strings (`"2:4"`, `"64:2:8"`,
            `"1x16@0.25"`); or a mapping from layer path (`"conv1"`, or its kernel's
            `"conv1/kernel"`) to one, e.g. `jaxsparse.prune.block_densities(model, 16, 0.25)`
            (one 1xN density for the whole model); layers it does not name stay dense.
        method: "magnitude" or a callable `(kernel [in, out], pattern) -> bool mask`; a Conv's
            kernel is given flattened, `[prod(kernel_size) * in, out]`, and its mask may have
            that shape or the kernel's. Or a mapping `{layer path: compressed weight}` (e.g.
            from `jaxsparse.prune.one_shot`): each named Linear holds its weight as it is
            (error-compensated values, GPTQ codes); layers it does not name stay dense.
        filter: which layers to convert: None (all), a regular expression searched in the
            '/'-joined module path (e.g. `"^encoder/"`; list items appear as their index), or a
            predicate `(path, module) -> bool` on that '/'-joined path (as in `jaxsparse.prune`).
        rearrange: for 1xN specs (`jaxsparse.Blocks`), first rearrange the copy's filters
            (`jaxsparse.prune.rearrange_filters`: each layer's output channels permuted so that
            similar filters share blocks, its consumer's inputs to match, the function kept).
            Layers where that is unsafe (a residual connection, the model's output, ...) keep
            their order, and the reason is logged, as is every layer's kept block norm before
            and after.
        example_input: an input of the model, needed with `rearrange=True` (to trace it).

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
    patterns = _patterns_of(sparsity, where)
    _layout.check_method(method, where)
    selected = _layout.make_filter(filter, where)
    counts = {"replaced": 0, "skipped": 0}
    model = nnx.clone(model)
    if rearrange:
        _rearrange(model, patterns.mapping or patterns.one, example_input, where)

    def convert(path, node):
        if not isinstance(node, (nnx.Linear, nnx.Conv)):
            return node
        name = _layout.path_str(path) or "<root>"
        pattern = patterns.lookup(name)
        if pattern is None:
            counts["skipped"] += 1
            _layout.logger.info("%s: skipped %s: no spec for it in the sparsity mapping", where,
                                name)
            return node
        if isinstance(node, nnx.Linear):
            sparse_type = SparseLinear
            desc = f"{type(node).__name__}({node.in_features} -> {node.out_features})"

            def reason_of():
                return dense_layer_reason(node) or _fits(pattern, node)
        else:
            sparse_type = SparseConv
            desc = (f"{type(node).__name__}({node.in_features} -> {node.out_features}, "
                    f"kernel_size={tuple(node.kernel_size)})")

            def reason_of():
                return dense_conv_reason(node) or conv_fits(pattern, node.kernel.shape)
        reason = "excluded by filter" if not selected(path, node) else reason_of()
        layer_method = _layout.method_for(method, name)
        if reason is None and layer_method is None:
            reason = "no compressed weight for it in the method mapping"
        if reason is None and sparse_type is SparseConv and not callable(layer_method) \
                and not isinstance(layer_method, str):
            reason = "a compressed weight in the method mapping is for Linear layers"
        if reason is not None:
            counts["skipped"] += 1
            _layout.logger.info("%s: skipped %s %s: %s", where, name, desc, reason)
            return node
        counts["replaced"] += 1
        _layout.logger.info("%s: replaced %s %s with %s %s", where, name, desc,
                            sparse_type.__name__, pattern)
        return sparse_type.from_dense(node, pattern, method=layer_method)

    new = nnx.recursive_map(convert, model)
    _layout.logger.info(
        "%s: %d layer(s) replaced, %d skipped (pattern %s)",
        where,
        counts["replaced"],
        counts["skipped"],
        "per layer" if patterns.mapping else patterns.one,
    )
    return new


class _Patterns:
    """`sparsify`'s sparsity: one pattern for every layer, or a mapping from layer path (or
    kernel path, as `jaxsparse.prune.block_densities` gives) to a pattern."""

    def __init__(self, one=None, mapping=None):
        self.one, self.mapping = one, mapping

    def lookup(self, name: str):
        if self.mapping is None:
            return self.one
        return self.mapping.get(name, self.mapping.get(f"{name}/kernel"))


def _patterns_of(sparsity, where: str) -> _Patterns:
    if isinstance(sparsity, tp.Mapping):
        mapping = {}
        for key, spec in sparsity.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: the keys of a sparsity mapping must be layer paths "
                                f"('conv1' or 'conv1/kernel'); got {key!r}")
            pattern = _layout.pattern_of(spec, f"{where}: sparsity[{key!r}]")
            _layout.format_of(pattern, where)
            mapping[key] = pattern
        return _Patterns(mapping=mapping)
    pattern = _layout.pattern_of(sparsity, where)
    _layout.format_of(pattern, where)
    return _Patterns(one=pattern)


def _rearrange(model, pattern, example_input, where: str) -> None:
    """Filter rearrangement of `model` (in place) before it is sparsified; logs the report."""
    from jaxsparse.formats.blocks import Blocks
    from jaxsparse.prune import rearrange_filters

    specs = pattern.values() if isinstance(pattern, tp.Mapping) else [pattern]
    if not all(isinstance(spec, Blocks) for spec in specs):
        raise ValueError(f"{where}: rearrange=True is for 1xN specs (jaxsparse.Blocks); got "
                         f"sparsity={pattern}")
    if example_input is None:
        raise ValueError(f"{where}: rearrange=True needs example_input= (an input of the model, "
                         "to trace where each layer's outputs go); got None")
    report = rearrange_filters(model, pattern, example_input)
    for line in str(report).splitlines():
        _layout.logger.info("%s: rearrange: %s", where, line)


def densify(model: M) -> M:
    """A copy of `model` whose `SparseLinear` and `SparseConv` layers are the equivalent
    `nnx.Linear` and `nnx.Conv` layers.

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
        if not isinstance(node, (SparseLinear, SparseConv)):
            return node
        count += 1
        dense = node.to_dense()
        _layout.logger.info(
            "%s: replaced %s %s(%d -> %d, %s) with %s",
            where,
            _layout.path_str(path) or "<root>",
            type(node).__name__,
            node.in_features,
            node.out_features,
            node.sparsity,
            type(dense).__name__,
        )
        return dense

    new = nnx.recursive_map(convert, model)
    _layout.logger.info("%s: %d layer(s) replaced", where, count)
    return new


def _fits(pattern, linear: nnx.Linear) -> str | None:
    return fits(pattern, (linear.in_features, linear.out_features))
