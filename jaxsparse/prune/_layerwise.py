"""Per-layer patterns: one pattern per kernel path, and `block_densities`, which spreads one 1xN
density over a whole model with a global block-norm threshold.

A *pattern mapping* `{path: pattern}` is accepted wherever the pruning functions take a pattern
(`magnitude_masks`, `gradual_pruning(pattern_fn=...)`, `srste`, `srste_weights`): the leaf at
`path` (the '/'-joined path of the params tree, as `filter` sees it) gets its own pattern, and
leaves missing from the mapping are not pruned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import _validate as V
from jaxsparse.formats._base import num_groups
from jaxsparse.formats.blocks import Blocks, _block_scores
from jaxsparse.prune import _tree
from jaxsparse.prune._patterns import as_pattern


def block_densities(params, n: int, density: float, *, filter: _tree.Filter = None,
                    shards: int = 1, split: str = "out") -> dict[str, Blocks]:
    r"""One 1xN density for a whole model: a global block-norm threshold, a density per layer.

    Every selected kernel `[..., in, out]` is cut into blocks of one input by `n` consecutive
    outputs (the last block row zero-padded, as `jaxsparse.BlocksSparse` does), and the
    :math:`\mathrm{round}(\mathrm{density} \cdot B)` blocks of largest L2 norm among all
    :math:`B` blocks of all selected kernels are kept: one threshold across the model, so layers
    whose blocks are larger keep more of them. Each layer's spec is
    `Blocks(n, kept_l / blocks_l)`, whose `kept_blocks` is exactly the layer's share (at least
    one block: a layer is never emptied). The norms are compared as they are: layers whose
    weights have a smaller scale (a larger fan-in, usually) lose more blocks.

    With `shards=s` (tensor parallel: `Blocks(n, density, shards, split)`), each layer's share
    is rounded to the nearest multiple of `s` (at least `s`), so every spec splits into `s`
    runs, and kernels whose runs do not divide (`Blocks.fits_shape`) are left out; the model's
    density then differs from `density` by that rounding.

    Args:
        params: a params tree (`nnx.state(model, nnx.Param)`, linen `variables`, a dict) or an
            nnx Module (its `nnx.Param`s are used).
        n: the block width, one of 4, 8, 16, 32.
        density: the fraction of all blocks kept, in (0, 1].
        filter: which leaves: a predicate `(path, leaf) -> bool` on the '/'-joined path, a
            regular expression searched in it, or None (float leaves of rank >= 2 named
            `kernel`). Kernels with fewer than `n` outputs (`Blocks.fits_shape`) are left out.
        shards, split: the balance of every layer's spec (see `jaxsparse.Blocks`); default:
            each layer's blocks chosen over its whole matrix.

    Returns:
        `{kernel path: Blocks(n, density_l)}` in the tree's order, usable wherever a pattern is
        (a pattern mapping: `magnitude_masks`, `gradual_pruning(pattern_fn=...)`, `srste`,
        `rearrange_filters`). For `jaxsparse.nn.sparsify`, convert layer by layer:
        `sparsify(model, spec, filter="^" + re.escape(path.rsplit("/", 1)[0]) + "$")`.

    Example:
        >>> import numpy as np
        >>> params = {"a": {"kernel": np.ones((8, 16))}, "b": {"kernel": 3 * np.ones((8, 16))}}
        >>> block_densities(params, 16, 0.5)
        {'a/kernel': Blocks(n=16, density=0.125), 'b/kernel': Blocks(n=16, density=1.0)}
    """
    where = "jaxsparse.prune.block_densities"
    spec = Blocks(n, density).validate(where)
    runs = Blocks(n, 1.0, shards, split).validate(where)  # The shape's part of the balance.
    params = _params_of(params)
    filter_fn = _tree.resolve_filter(filter, where)
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    chosen = []
    for path, leaf in leaves:
        name = _tree.path_str(path)
        if getattr(leaf, "ndim", 0) < 2 or not filter_fn(name, leaf):
            continue
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"{where}: the selected leaf {name!r} must be a float kernel; got "
                            f"{leaf.dtype}")
        if V.is_tracer(leaf):
            raise TypeError(f"{where}: params must be concrete (the threshold is chosen on the "
                            f"host, outside jit); {name!r} is a tracer")
        if runs.fits_shape(leaf.shape) is None:
            chosen.append((name, leaf))
    if not chosen:
        raise ValueError(f"{where}: no kernel of params was selected (float leaves of rank >= 2 "
                         f"with at least n={spec.n} outputs that `filter` accepts"
                         f"{f', whose shape splits into {runs.shards} runs' if shards > 1 else ''})")
    peak = max(float(jnp.max(jnp.abs(w))) for _, w in chosen)  # One scale: scores compared.
    scores = [np.asarray(_block_scores(jnp.asarray(w), spec.n, peak)).reshape(-1)
              for _, w in chosen]
    flat = np.concatenate(scores)
    k = spec.kept_blocks(1, flat.size * spec.n)  # Blocks rounding over the model's B blocks.
    # Ties at the threshold go to the earlier layer, then the earlier block (a stable order).
    order = np.argsort(-flat, kind="stable")[:k]
    owner = np.repeat(np.arange(len(chosen)), [s.size for s in scores])
    kept = np.bincount(owner[order], minlength=len(chosen))
    step = runs.shards  # Each layer's count a multiple of its runs (at least one per run).
    kept = [min(s.size, max(step, step * int(np.floor(c / step + 0.5)))) for c, s in
            zip(kept, scores)]
    return {name: Blocks(spec.n, c / s.size, runs.shards, runs.split)
            for (name, _), c, s in zip(chosen, kept, scores)}


def _params_of(params):
    """The `nnx.Param` state of an nnx Module, else `params` unchanged."""
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover  (flax is a dependency)
        return params
    if isinstance(params, nnx.Module):
        return nnx.state(params, nnx.Param)
    return params


# ---------------------------------------------------------------------- pattern mappings
def is_mapping(pattern) -> bool:
    return isinstance(pattern, Mapping)


def check_mapping(patterns: Mapping, where: str, validate=None,
                  arg: str = "pattern") -> dict[str, Any]:
    """`{path: validated pattern}`; `validate(pattern, name)` may narrow what is accepted.

    `arg` is the argument's name in messages (`pattern[...]`, or `spec[...]` for callers whose
    argument is called spec)."""
    if not patterns:
        raise ValueError(f"{where}: the {arg} mapping is empty; give at least one "
                         f"{{path: {arg}}} entry")
    out = {}
    for key, value in patterns.items():
        if not isinstance(key, str):
            raise TypeError(f"{where}: {arg} mapping keys must be '/'-joined leaf paths (str); "
                            f"got {type(key).__name__} {key!r}")
        name = f"{arg}[{key!r}]"
        out[key] = validate(value, name) if validate else as_pattern(value, name=name)
    return out


class Slot:
    """A leaf holding one pattern: patterns are NamedTuples, which `jax.tree` would flatten."""

    __slots__ = ("pattern",)

    def __init__(self, pattern):
        self.pattern = pattern


def pattern_tree(params, patterns, filter_fn, where: str):
    """A tree of params' structure: a `Slot(pattern)` per selected leaf, None elsewhere.

    `patterns` is one pattern (for every leaf the filter selects) or a `{path: pattern}` mapping
    (leaves the filter selects *and* the mapping names). A mapping path that names no selected
    leaf is an error (a misspelt path would silently leave a layer dense)."""
    selected = _tree.select(params, filter_fn)
    if not is_mapping(patterns):
        return jax.tree.map(lambda s: Slot(patterns) if s else None, selected)
    flat, treedef = jax.tree_util.tree_flatten_with_path(selected)
    names = [_tree.path_str(p) for p, _ in flat]
    missing = sorted(set(patterns) - {n for n, (_, s) in zip(names, flat) if s})
    if missing:
        known = [n for n, (_, s) in zip(names, flat) if s]
        raise ValueError(f"{where}: the pattern mapping names leaves that are not selected "
                         f"kernels of params: {missing}; selected: {known}")
    leaves = [Slot(patterns[n]) if s and n in patterns else None
              for n, (_, s) in zip(names, flat)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def units(pattern, shape) -> int:
    """What a pattern counts in a `[..., in, out]` weight: blocks for `Blocks`, else entries."""
    if isinstance(pattern, Blocks):
        return math.prod(shape[:-1]) * num_groups(shape[-1], pattern.n)
    return math.prod(shape)

