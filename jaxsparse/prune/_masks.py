"""Magnitude masks: pure, jittable functions from a weight and a pattern to a bool mask."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import _validate as V
from jaxsparse.formats.blocks import Blocks, _block_scores, _by_runs, _from_runs
from jaxsparse.prune import _layerwise, _tree
from jaxsparse.prune._patterns import Unstructured, as_pattern


def magnitude_mask(w, pattern) -> jax.Array:
    r"""The bool mask keeping the largest-magnitude entries of `w` under `pattern`.

    - A format's spec (`NM(n, m)`, `VNM(v, n, m)`, ...): the entries its `fromdense` keeps
      (`spec.magnitude_mask`). `NM(n, m)`: in every group of `m` consecutive inputs (axis `-2`)
      of every output, the `n` largest `|w|`, ties to the lower position, a ragged last group
      treated as zero-padded. `VNM`: see `jaxsparse.VNMSparse.fromdense`. `Blocks(n, density)`:
      the `kept_blocks` blocks (one input by `n` consecutive outputs) of largest L2 norm, global
      within each `[in, out]` matrix (see `jaxsparse.BlocksSparse.fromdense`).
    - `Unstructured(density)`: keep the
      :math:`k = \mathrm{round}(\mathrm{density}\cdot\mathrm{size})` largest `|w|` of the whole
      tensor (a global threshold per tensor); ties keep the lower flat index, so exactly `k`
      entries are kept. `density` may be a traced scalar (a scheduled sparsity under `jit`).

    Args:
        w: `[..., in, out]` float array (for `Unstructured` any shape).
        pattern: anything `jaxsparse.prune.as_pattern` accepts.

    Returns:
        A bool array of `w.shape`, True where the entry is kept.

    Example:
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[4.0], [-1.0], [3.0], [2.0]])
        >>> magnitude_mask(w, "2:4")[:, 0].tolist()
        [True, False, True, False]
        >>> magnitude_mask(w, Unstructured(0.25))[:, 0].tolist()
        [True, False, False, False]

    References:
        Han et al., "Learning both Weights and Connections for Efficient Neural Networks", 2015.
    """
    where = "jaxsparse.prune.magnitude_mask"
    pattern = _pattern(pattern, where)
    w = V.as_array("w", w, where=where)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"{where}: w must be a float array, got {w.dtype.name}")
    if isinstance(pattern, Unstructured):
        return _ranked_mask(jnp.abs(w), pattern.density)
    V.check_rank("w", w, min_rank=2, where=where, what="[..., in, out]")
    return pattern.magnitude_mask(w)


def nm_kept_magnitude(w, pattern) -> jax.Array:
    r"""The fraction of the total magnitude that `magnitude_mask(w, pattern)` keeps.

    .. math:: \frac{\sum_{ij} \mathrm{mask}_{ij} |w_{ij}|}{\sum_{ij} |w_{ij}|}

    (1 for an all-zero or empty `w`). The objective that `search_permutation` maximises.

    Args:
        w: `[..., in, out]` float array.
        pattern: anything `jaxsparse.prune.as_pattern` accepts.

    Returns:
        A float32 scalar in [0, 1].

    Example:
        >>> import jax.numpy as jnp
        >>> round(float(nm_kept_magnitude(jnp.array([[4.0], [-1.0], [3.0], [2.0]]), "2:4")), 4)
        0.7
    """
    mask = magnitude_mask(w, pattern)
    a = jnp.abs(jnp.asarray(w)).astype(jnp.float32)
    total = jnp.sum(a)
    kept = jnp.sum(jnp.where(mask, a, 0.0))
    return jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), 1.0)


# ---------------------------------------------------------------------- helpers
def _pattern(pattern, where):
    """as_pattern, except that an Unstructured density may be a traced (scheduled) scalar."""
    if isinstance(pattern, Unstructured):
        d = pattern.density
        if V.is_tracer(d):
            return pattern
        if isinstance(d, (jax.Array, np.ndarray)) and d.shape == ():
            pattern = Unstructured(float(d))
    return as_pattern(pattern, name="pattern")


@jax.jit
def _ranked_mask(score, density, priority=None) -> jax.Array:
    """Keep the round(density * size) highest scores (lower flat index first on ties).

    `priority` (bool, optional): entries where it is True rank before all others.
    """
    flat = score.reshape(-1).astype(jnp.float32)
    size = flat.shape[0]
    if size == 0:
        return jnp.zeros(score.shape, jnp.bool_)
    iota = jnp.arange(size, dtype=jnp.int32)
    keys = (-flat, iota) if priority is None else (~priority.reshape(-1), -flat, iota)
    # The index is the last sort key: equal scores keep the lower flat index first.
    order = jax.lax.sort(keys, num_keys=len(keys))[-1]
    rank = jnp.zeros(size, jnp.int32).at[order].set(jnp.arange(size, dtype=jnp.int32))
    k = jnp.round(jnp.asarray(density, jnp.float32) * size).astype(jnp.int32)
    return (rank < k).reshape(score.shape)


def magnitude_masks(params, pattern, *, filter=None):
    """`magnitude_mask` on every selected leaf of a params tree: a mask tree (None elsewhere).

    Args:
        params: a params tree (dicts, Flax NNX `State`, linen variables, ...).
        pattern: anything `as_pattern` accepts, used for every selected leaf; or a mapping
            `{path: pattern}` (e.g. from `block_densities`): each named leaf gets its own, the
            others are not pruned.
        filter: which leaves to prune: a predicate `(path, leaf) -> bool` on the '/'-joined path,
            a regular expression searched in it, or None for float leaves of rank >= 2 named
            `kernel`.

    Returns:
        A tree of params' structure: bool masks for the selected leaves, None for the others; feed
        it to `masked` or `apply_masks`.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"dense": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)}}
        >>> masks = magnitude_masks(params, "2:4")
        >>> masks["dense"]["bias"] is None, int(masks["dense"]["kernel"].sum())
        (True, 4)
    """
    where = "jaxsparse.prune.magnitude_masks"
    if _layerwise.is_mapping(pattern):
        pattern = _layerwise.check_mapping(pattern, where)
    else:
        pattern = as_pattern(pattern, name="pattern")
    patterns = _layerwise.pattern_tree(params, pattern, _tree.resolve_filter(filter, where), where)
    return jax.tree.map(lambda p, w: None if p is None else magnitude_mask(w, p.pattern), patterns,
                        params, is_leaf=_tree._is_none)


def _gradual_mask(w, pattern, sparsity) -> jax.Array:
    """The mask at a scheduled `sparsity` (maybe traced) approaching `pattern`.

    Unstructured: the largest `1 - sparsity` fraction of |w| (the pattern's own density is
    ignored: the schedule sets it). N:M: the N:M mask's entries rank first, then the rest by |w|,
    and the largest `1 - sparsity` fraction is kept, so the mask is exactly the N:M mask when the
    sparsity reaches `1 - n/m` (with `in` a multiple of `m`), and N:M-valid beyond that.
    `Blocks(n, density)`: whole blocks at every step, the largest-norm `1 - sparsity` fraction of
    them (the schedule sets the density; with `shards`, that fraction of each run of block rows,
    or of inputs with `split="in"`), so the mask is the spec's when the sparsity reaches
    `1 - density`.
    """
    density = 1.0 - jnp.asarray(sparsity, jnp.float32)
    if isinstance(pattern, Blocks):
        return _blocks_mask(w, pattern.n, density, pattern.shards, pattern.split)
    score = jnp.abs(w)
    if isinstance(pattern, Unstructured):
        return _ranked_mask(score, density)
    return _ranked_mask(score, density, priority=pattern.magnitude_mask(w))


@functools.partial(jax.jit, static_argnums=(1, 3, 4))
def _blocks_mask(w, n: int, density, shards: int = 1, split: str = "out") -> jax.Array:
    """The 1xN mask keeping a (maybe traced) fraction `density` of the blocks of each
    `[in, out]` matrix of `w [..., in, out]` (of each of its `shards` runs of block rows, or of
    inputs with `split="in"`), by L2 norm: `Blocks(n, density, shards,
    split).magnitude_mask(w)` (same count, same ties) for a density known only at run time."""
    in_f, out_f = w.shape[-2:]
    lead = w.shape[:-2]
    scores = _block_scores(w, n)  # [..., R, in]
    rows = scores.shape[-2]
    runs = Blocks(n, 1.0, shards, split)  # The runs, as the format keeps them.
    scores = _by_runs(scores, runs)
    total = rows * in_f // shards  # Blocks per run.
    # Blocks.kept_blocks: floor(density * total + 0.5), at least one; per run, the same count
    # whenever the whole matrix's is a multiple of `shards` (the spec's own density).
    k = jnp.maximum(jnp.floor(density * total + 0.5), 1.0)
    flat = scores.reshape(-1, total)
    kept = jax.vmap(lambda s: _ranked_mask(s, k / total))(flat)  # Ties: the lower block first.
    kept = _from_runs(kept.reshape(*lead, shards, total), runs, rows, in_f)
    kept = jnp.swapaxes(kept, -1, -2)  # [..., in, R]
    return jnp.repeat(kept, n, axis=-1)[..., :out_f]
