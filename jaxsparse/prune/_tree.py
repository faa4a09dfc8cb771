"""Tree helpers shared by the pruning transformations: leaf selection (`filter`) and mask trees.

A *mask tree* has the tree structure of the params; each leaf is a bool array of its param's
shape (True = kept) or None (the param is not pruned).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp

#: A leaf selector: a predicate `(path, leaf) -> bool` on the '/'-joined path, a regular
#: expression searched in that path, or None for the default (float kernels of rank >= 2).
Filter = Union[None, str, re.Pattern, Callable[[str, Any], bool]]


def _is_none(x) -> bool:
    return x is None


def path_str(path) -> str:
    """'/'-joined key names; a trailing `.value` (Flax NNX variables) is dropped."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            names.append(str(key.key))
        else:
            names.append(str(key))
    if len(names) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names.pop()
    return "/".join(names)


def default_filter(path: str, leaf) -> bool:
    """Float leaves of rank >= 2 whose name (last path component) is `kernel`."""
    return (
        path.rsplit("/", 1)[-1] == "kernel"
        and getattr(leaf, "ndim", 0) >= 2
        and jnp.issubdtype(leaf.dtype, jnp.floating)
    )


def resolve_filter(filter: Filter, where: str) -> Callable[[str, Any], bool]:
    if filter is None:
        return default_filter
    if isinstance(filter, (str, re.Pattern)):
        try:
            regex = re.compile(filter)
        except re.error as err:
            raise ValueError(f"{where}: filter is not a valid regular expression: {err}") from None
        return lambda path, leaf: (
            getattr(leaf, "ndim", None) is not None and regex.search(path) is not None
        )
    if callable(filter):
        return filter
    raise TypeError(
        f"{where}: filter must be None, a regular expression string or a callable "
        f"(path, leaf) -> bool; got {type(filter).__name__}"
    )


def select(params, filter_fn) -> Any:
    """A tree of bools (params' structure): which leaves the filter selects."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: bool(filter_fn(path_str(path), leaf)), params
    )


def map_selected(fn, params, selected, *rest):
    """`fn(leaf, *rest_leaves)` on selected leaves, None elsewhere."""
    return jax.tree.map(
        lambda sel, leaf, *r: fn(leaf, *r) if sel else None, selected, params, *rest
    )


def check_masks(masks, params, where: str, name: str = "masks") -> None:
    """Raise unless `masks` is a mask tree for `params` (structure, bool dtype, shapes)."""
    got = jax.tree.structure(masks, is_leaf=_is_none)
    want = jax.tree.structure(params, is_leaf=_is_none)
    if got != want:
        raise ValueError(
            f"{where}: {name} must have the tree structure of params (a bool array or None per "
            f"param); expected {want}, got {got}"
        )
    flat_m = jax.tree.leaves(masks, is_leaf=_is_none)
    flat_p, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_none)
    for mask, (path, param) in zip(flat_m, flat_p):
        if mask is None:
            continue
        shape, dtype = getattr(mask, "shape", None), getattr(mask, "dtype", None)
        if dtype is None or jnp.dtype(dtype) != jnp.bool_:
            raise TypeError(
                f"{where}: {name} leaves must be bool arrays or None; at {path_str(path)!r} "
                f"got {type(mask).__name__} {getattr(dtype, 'name', dtype)}"
            )
        if tuple(shape) != tuple(jnp.shape(param)):
            raise ValueError(
                f"{where}: {name} at {path_str(path)!r} must have the param's shape "
                f"{tuple(jnp.shape(param))}; got {tuple(shape)}"
            )


def apply_masks(params, masks):
    """Zero the pruned entries: `where(mask, param, 0)` per masked leaf; None leaves unchanged.

    Args:
        params: a params tree.
        masks: a mask tree for it (bool arrays of each param's shape, or None).

    Returns:
        The pruned params, same structure and dtypes.

    Example:
        >>> import jax.numpy as jnp
        >>> apply_masks({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([True, False])})["w"].tolist()
        [1.0, 0.0]
    """
    check_masks(masks, params, "jaxsparse.prune.apply_masks")
    return jax.tree.map(
        lambda m, p: p if m is None else jnp.where(m, p, jnp.zeros((), p.dtype)),
        masks, params, is_leaf=_is_none,
    )
