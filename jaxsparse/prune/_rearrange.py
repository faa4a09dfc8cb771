"""Filter rearrangement for 1xN block sparsity: permute a layer's outputs so that the blocks
`Blocks(n, density)` keeps hold more of the weight, and permute the next layer's inputs to match.

A 1xN block is one input by `n` *consecutive* outputs (`jaxsparse.Blocks`), so which output
filters sit next to each other decides how much of the weight the kept blocks can hold: filters
that are large on the same inputs should share blocks. Lin et al. sort the filters by their L1
norm before computing the mask and apply the same permutation to the next layer's input channels
(and to the BatchNorm / bias in between), so the network computes the same function.

Two levels:

- the layer: `rearrange_outputs(kernel, spec, method=...)` searches an output permutation of one
  kernel that raises `kept_block_norm(kernel, spec)` (the sum of squares of the entries the spec's
  magnitude mask keeps); `apply_output_permutation` / `apply_input_permutation` apply one;
- the model: `rearrange_filters(model, spec, example_input)` (Flax NNX, in place) and
  `rearrange_filters_linen(module, variables, spec, example_input)` find, by tracing the model to a
  jaxpr and following the dataflow, every layer whose outputs reach the next layers' inputs only
  through operations that commute with a permutation of the features, permute it and its
  consumers, and report the rest with the reason they were left alone.

The search (`method="cluster"`, the default) treats the problem as grouping the filters into
blocks of `n`: with `A = kernel**2` folded to `[rows, out]`, a block's score is the sum of its
group's `A` over one row, and the kept norm is the sum of the `k` largest scores (of each run's
`k / shards` largest for a balanced spec, `Blocks(n, density, shards, split)`). It seeds with a
recursive balanced 2-means split of the filters' per-input profiles `A[:, j]` (filters large on
the same inputs end up in one group) and balanced k-means, then improves the exact objective by
a swap search (`_swap_search`) alternated with balanced reassignments under the kept blocks
(`_refine`); the paper's L1 sort refined the same way is the other candidate, and the better of
the two (or the identity, if neither gains) is returned.

Measured on random 1024 x 1024 kernels of five kinds (i.i.d. normal; filters of log-normal
norm; filters in hidden groups of `n` sharing inputs; low rank plus noise; half the inputs dead
per filter) at 1x16@0.25, as fractions of the squared norm kept: the sort gains 0.0005-0.19 over
the identity (0.19 only where filter norms vary), the cluster search a further 0.0005-0.35
(0.007 on i.i.d. normal, 0.017 on low rank, 0.35 on hidden groups), in 0.1-1.3 s.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import _validate as V
from jaxsparse.formats.blocks import Blocks, _shards_misfit
from jaxsparse.prune._layerwise import check_mapping
from jaxsparse.prune._patterns import as_pattern
from jaxsparse.prune._permutation import _check_perm
from jaxsparse.prune._tree import path_str

#: The search methods of `rearrange_outputs`, best last.
METHODS = ("identity", "sort", "swap", "cluster")


# ====================================================================== the layer
def kept_block_norm(kernel, spec) -> float:
    r"""The squared L2 norm that 1xN magnitude pruning keeps of a kernel.

    .. math:: K(W) = \sum_{(r, b)\ \mathrm{kept}} \sum_{j \in b} W_{rj}^2,

    with the kernel folded to `[rows, out]` (every axis but the last is a row: a Linear
    `[in, out]` as is, a Conv HWIO `[kh, kw, Cin, Cout]` as `[kh*kw*Cin, Cout]`), blocks `b` of `n`
    consecutive outputs (the last one zero-padded when `n` does not divide `out`), and the kept
    blocks the `Blocks(n, density).kept_blocks(rows, out)` of largest norm (global within the
    layer, as `jaxsparse.BlocksSparse.fromdense` keeps them; with `shards=s`, the largest
    `kept_blocks / s` of each of the spec's runs of block rows, or of rows with `split="in"`).
    Divide by `sum(kernel**2)` for the fraction kept.

    Args:
        kernel: `[..., in, out]` float array (concrete, any float dtype; squared in float32,
            summed in float64).
        spec: a `jaxsparse.Blocks(n, density, shards, split)` or its string (`"1x16@0.25"`).

    Returns:
        A Python float >= 0.

    Example:
        >>> import numpy as np, jaxsparse as jsp
        >>> w = np.array([[3.0, 0.0, 4.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
        >>> kept_block_norm(w, jsp.Blocks(4, 0.5))  # the first row's block; 2 rows, 1 kept
        25.0
    """
    where = "jaxsparse.prune.kept_block_norm"
    spec = _blocks_spec(spec, where)
    x = _squares(kernel, where)
    _check_runs(spec, x, where)
    return _kept(x, np.arange(x.shape[0]), spec)


def rearrange_outputs(kernel, spec, *, method: str = "cluster") -> np.ndarray:
    """A permutation of a kernel's outputs that raises what 1xN block pruning keeps of it.

    `kernel[..., perm]` (see `apply_output_permutation`) keeps at least as much squared norm under
    `spec` as `kernel` (`kept_block_norm`): every method falls back to the identity when it finds
    nothing better. The layer that consumes these outputs must have its inputs permuted with the
    same `perm` (`apply_input_permutation`), which `rearrange_filters` does for a whole model.

    Methods (deterministic; times for a 4096 x 4096 kernel on 2 shared cores):

    - `"sort"`: Lin et al.'s filter rearrangement: filters by decreasing L1 norm (0.3-0.5 s).
    - `"swap"`: the sort, then a local search: with the kept blocks fixed, the gain of moving
      filter `j` to block `g` is `sum_r A[r, j] * kept[r, g]` minus what it holds in its own
      block (`A = kernel**2`); each round applies the best swap of every pair of blocks,
      disjoint pairs in decreasing order of gain, then re-selects the kept blocks, so the kept
      norm never decreases; until no swap gains (0.5-2 s).
    - `"cluster"` (default): recursive balanced 2-means of the filters' profiles `A[:, j]`
      into groups of `n` (filters large on the same inputs share blocks), balanced k-means,
      then the swap search alternated with balanced reassignments of all filters under the
      kept blocks; the same refinement of the sort is the other candidate, the better one is
      returned (4-15 s).
    - `"identity"`: no permutation (a baseline).

    Args:
        kernel: `[..., in, out]` float array (every axis but the last folded into rows; a Conv
            HWIO kernel is searched as `[kh*kw*Cin, Cout]`), concrete.
        spec: a `jaxsparse.Blocks(n, density)` or its string (`"1x16@0.25"`).
        method: one of `"identity"`, `"sort"`, `"swap"`, `"cluster"`.

    Returns:
        An int32 NumPy array `[out]`, a permutation of `range(out)`: output `i` of the permuted
        kernel is output `perm[i]` of `kernel`.

    Example:
        >>> import numpy as np, jaxsparse as jsp
        >>> w = np.array([[1.0, 0.0] * 4, [0.0, 1.0] * 4])  # Row 0 uses even outputs, row 1 odd.
        >>> spec = jsp.Blocks(4, 0.5)                          # 4 blocks of 1x4, 2 kept
        >>> perm = rearrange_outputs(w, spec)
        >>> kept_block_norm(w, spec), kept_block_norm(apply_output_permutation(w, perm), spec)
        (4.0, 8.0)

    References:
        Lin et al., "1xN Pattern for Pruning Convolutional Neural Networks", TPAMI 2022
        (filter rearrangement).
    """
    where = "jaxsparse.prune.rearrange_outputs"
    spec = _blocks_spec(spec, where)
    if method not in METHODS:
        raise ValueError(f"{where}: method must be one of {METHODS}; got {method!r}")
    x = _squares(kernel, where)
    _check_runs(spec, x, where)
    return _search(x, spec, method)


def apply_output_permutation(kernel, perm):
    """Permute the outputs (last axis) of a kernel `[..., in, out]` or a vector `[..., out]`.

    Use it for the producer's kernel and for everything indexed by its outputs (its bias, and the
    scale, bias and running statistics of a normalisation over those features).

    Args:
        kernel: array of rank >= 1 whose last axis has `len(perm)` entries.
        perm: a permutation of `range(kernel.shape[-1])` (int array-like).

    Returns:
        `kernel[..., perm]`, same shape and dtype.

    Raises:
        ValueError: `perm` is not a permutation of `range(kernel.shape[-1])` (wrong length,
            repeated or out-of-range entries).

    Example:
        >>> import numpy as np
        >>> apply_output_permutation(np.array([[1.0, 2.0, 3.0]]), [2, 0, 1]).tolist()
        [[3.0, 1.0, 2.0]]
    """
    where = "jaxsparse.prune.apply_output_permutation"
    kernel = V.as_array("kernel", kernel, where=where)
    V.check_rank("kernel", kernel, min_rank=1, where=where, what="[..., out]")
    perm = _check_perm(perm, kernel.shape[-1], "kernel.shape[-1], the outputs", where)
    return jnp.take(kernel, perm, axis=-1)


def apply_input_permutation(kernel, perm):
    """Permute the inputs (axis -2) of a kernel `[..., in, out]` (a Conv HWIO kernel's `Cin`).

    With `y = x @ kernel`: `x[..., perm] @ apply_input_permutation(kernel, perm) == y`, so it
    undoes, in the consumer, an `apply_output_permutation` of the producer of `x`.

    Args:
        kernel: array `[..., in, out]` of rank >= 2.
        perm: a permutation of `range(kernel.shape[-2])` (int array-like).

    Returns:
        `kernel[..., perm, :]`, same shape and dtype.

    Raises:
        ValueError: `perm` is not a permutation of `range(kernel.shape[-2])`.

    Example:
        >>> import numpy as np
        >>> apply_input_permutation(np.arange(6.0).reshape(3, 2), [2, 0, 1]).tolist()
        [[4.0, 5.0], [0.0, 1.0], [2.0, 3.0]]
    """
    where = "jaxsparse.prune.apply_input_permutation"
    kernel = V.as_array("kernel", kernel, where=where)
    V.check_rank("kernel", kernel, min_rank=2, where=where, what="[..., in, out]")
    perm = _check_perm(perm, kernel.shape[-2], "kernel.shape[-2], the inputs", where)
    return jnp.take(kernel, perm, axis=-2)


# ---------------------------------------------------------------------- layer helpers
def _blocks_spec(spec, where, name: str = "spec") -> Blocks:
    pattern = as_pattern(spec, name=name, where=where)
    if not isinstance(pattern, Blocks):
        raise ValueError(f"{where}: {name} must be a 1xN spec, jaxsparse.Blocks(n, density) or "
                         f"'1xN@density'; got {pattern!r}")
    return pattern


def _squares(kernel, where) -> np.ndarray:
    """`kernel**2` folded to `[rows, out]` and transposed: float32 `[out, rows]`, C-contiguous
    (filter-major: the search gathers whole filters, which are then contiguous rows)."""
    kernel = V.as_array("kernel", kernel, where=where)
    if V.is_tracer(kernel):
        raise TypeError(f"{where}: kernel must be a concrete array (the search runs on the host, "
                        "outside jit); got a tracer")
    V.check_rank("kernel", kernel, min_rank=2, where=where, what="[..., in, out]")
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise TypeError(f"{where}: kernel must be a float array, got {kernel.dtype.name}")
    w = np.asarray(kernel, np.float32)
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{where}: kernel must be finite (no inf or NaN)")
    w = w.reshape(-1, w.shape[-1])
    return np.ascontiguousarray((w * w).T)


def _check_runs(spec: Blocks, x: np.ndarray, where: str) -> None:
    """A balanced spec's runs must divide the folded kernel `x [out, rows]`."""
    reason = _shards_misfit(spec, x.shape[1], x.shape[0])
    if reason is not None:
        raise ValueError(f"{where}: spec {spec} does not fit the kernel folded to "
                         f"[{x.shape[1]}, {x.shape[0]}]: {reason}")


def _groups(out: int, n: int) -> int:
    return -(-out // n)


class _Problem:
    """One layer's search: `x [out, rows]` squared magnitudes per filter, zero filters appended
    to `slots = G*n` (the padding of a partial last block, pinned at the end), and `k` kept
    blocks (`k` in each of the spec's `shards` runs: of blocks, or of rows with `split="in"`).
    A permutation of slots lists, block after block, the filters each block holds."""

    def __init__(self, x: np.ndarray, spec: Blocks):
        self.n = spec.n
        self.out, self.rows = x.shape
        self.groups = _groups(self.out, self.n)
        self.slots = self.groups * self.n
        self.xp = np.zeros((self.slots, self.rows), np.float32)
        self.xp[: self.out] = x
        if _shards_misfit(spec, self.rows, self.out) is not None:
            spec = spec._replace(shards=1, split="out")  # A skipped layer's report: whole.
        self.shards, self.by_rows = spec.shards, spec.stacked
        self.k = spec.kept_blocks(self.rows, self.out) // self.shards
        cap = np.full(self.groups, self.n)
        cap[-1] = self.out - self.n * (self.groups - 1)
        self.cap = cap  # Real filters per block.

    def slots_of(self, order: np.ndarray) -> np.ndarray:
        return np.concatenate([order, np.arange(self.out, self.slots)]).astype(np.int64)

    def scores(self, perm: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Block scores `[G, rows]` of the slot permutation `perm`."""
        return self.xp[perm].reshape(self.groups, self.n, self.rows).sum(1, dtype=dtype)

    def runs(self, scores: np.ndarray) -> np.ndarray:
        """Block scores `[G, rows]` as `[shards, blocks of a run]`."""
        if not self.by_rows:
            return scores.reshape(self.shards, -1)
        runs = scores.reshape(self.groups, self.shards, -1)
        return runs.transpose(1, 0, 2).reshape(self.shards, -1)

    def top_mask(self, scores: np.ndarray) -> np.ndarray:
        """float32 0/1 mask `[G, rows]` of the kept blocks: the `k` largest of each run."""
        mask = np.stack([_topk_mask(run, self.k) for run in self.runs(scores)])
        if not self.by_rows:
            return mask.reshape(scores.shape)
        mask = mask.reshape(self.shards, self.groups, -1).transpose(1, 0, 2)
        return mask.reshape(scores.shape)

    def kept(self, order: np.ndarray) -> float:
        """Exact (float64) kept norm with the filters in `order` (a permutation of `out`)."""
        if self.rows == 0 or self.out == 0:
            return 0.0
        runs = self.runs(self.scores(self.slots_of(order), np.float64))
        cut = runs.shape[1] - self.k
        return float(np.partition(runs, cut, axis=1)[:, cut:].sum())


def _kept(x: np.ndarray, order: np.ndarray, spec: Blocks) -> float:
    return _Problem(x, spec).kept(order)


def _search(x: np.ndarray, spec: Blocks, method: str) -> np.ndarray:
    out, rows = x.shape
    identity = np.arange(out, dtype=np.int32)
    if method == "identity" or out <= 1 or rows == 0 or _groups(out, spec.n) < 2:
        return identity  # One block row: every order keeps the same blocks.
    pb = _Problem(x, spec)
    # The paper's order: decreasing L1 norm (sum of |w| over the filter), ties by index.
    l1 = np.sqrt(x).sum(1, dtype=np.float64)
    candidates = [np.argsort(-l1, kind="stable").astype(np.int32)]
    if method == "swap":
        candidates = [_swap_search(pb, candidates[0])]
    if method == "cluster":
        candidates = [_refine(pb, candidates[0])]
        seed = _bisect(pb)
        clustered = _kmeans(pb, seed)
        if pb.kept(clustered) < pb.kept(seed):
            clustered = seed  # k-means optimises a surrogate; keep it only where it helps.
        candidates.append(_refine(pb, clustered))
    best, best_kept = identity, pb.kept(identity)
    for order in candidates:
        value = pb.kept(order)
        if value > best_kept * (1 + 1e-9):  # Strictly better, not float32 noise.
            best, best_kept = order, value
    return best.astype(np.int32)


def _topk_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """float32 0/1 mask of the `k` largest entries of `scores` (ties: any k of them)."""
    flat = scores.ravel()
    mask = np.zeros(flat.size, np.float32)
    if k >= flat.size:
        mask[:] = 1
    elif k > 0:
        mask[np.argpartition(-flat, k - 1)[:k]] = 1
    return mask.reshape(scores.shape)


def _swap_search(pb: _Problem, order: np.ndarray, max_rounds: int = 400) -> np.ndarray:
    """Local search from `order` on the exact kept norm; never returns a worse order.

    With the kept mask `M [G, rows]` fixed, the kept norm is `sum_g sum_{j in g} P[j, g]` with
    `P = X M^T` (one matmul), so the gain of swapping filter `j` of block `g1` with `j'` of block
    `g2` is `D[j, g2] + D[j', g1]` with `D[j, g] = P[j, g] - P[j, own(j)]`; swaps between disjoint
    pairs of blocks add up. Re-selecting the top `k` blocks afterwards can only add more.
    """
    n, groups, slots = pb.n, pb.groups, pb.slots
    perm = pb.slots_of(order)
    movable = perm < pb.out  # The padding slots of a partial last block stay where they are.
    group_of = np.arange(slots) // n
    best_value, best = -1.0, perm.copy()
    limit = min(4 * groups, groups * (groups - 1) // 2)
    iu, ju = np.triu_indices(groups, 1)
    # Scores, mask and P are updated only where a round changed them (the touched blocks, the
    # blocks whose kept rows moved): late rounds swap few blocks, so they cost little.
    scores = pb.scores(perm)
    mask = pb.top_mask(scores)
    p = pb.xp @ mask.T  # [slots, G]: filter j's kept mass if it sat in block g.
    for _ in range(max_rounds):
        value = float(np.sum(scores * mask, dtype=np.float64))
        if value <= best_value * (1 + 1e-7):
            break  # float32 noise, no real gain: converged.
        best_value, best = value, perm.copy()
        ps = p[perm]
        own = ps[np.arange(slots), group_of]
        d = np.where(movable[:, None], ps - own[:, None], -np.inf).reshape(groups, n, groups)
        arg = d.argmax(1)  # [from, to]: the filter of `from` that gains most moving to `to`.
        gain_one = np.take_along_axis(d, arg[:, None], 1)[:, 0]
        gain = (gain_one + gain_one.T)[iu, ju]
        cand = np.nonzero(gain > 1e-6 * value / groups)[0]
        if cand.size == 0:
            break
        if cand.size > limit:  # Enough candidates to pair every block once.
            cand = cand[np.argpartition(-gain[cand], limit - 1)[:limit]]
        cand = cand[np.argsort(-gain[cand], kind="stable")]
        used = np.zeros(groups, bool)
        pairs = []
        for c in cand:  # Best gains first, each block in at most one swap per round.
            g1, g2 = iu[c], ju[c]
            if not (used[g1] or used[g2]):
                used[g1] = used[g2] = True
                pairs.append((g1, g2))
        g1, g2 = np.asarray(pairs).T
        sa, sb = g1 * n + arg[g1, g2], g2 * n + arg[g2, g1]
        perm[sa], perm[sb] = perm[sb], perm[sa].copy()
        touched = np.nonzero(used)[0]
        cols = perm.reshape(groups, n)[touched].reshape(-1)
        scores[touched] = pb.xp[cols].reshape(len(touched), n, pb.rows).sum(1, dtype=np.float32)
        new_mask = pb.top_mask(scores)
        changed = np.nonzero(np.any(new_mask != mask, axis=1))[0]
        mask = new_mask
        if changed.size:
            p[:, changed] = pb.xp @ mask[changed].T
    return best[best < pb.out].astype(np.int32)


def _refine(pb: _Problem, order: np.ndarray, max_steps: int = 6,
            min_gain: float = 2e-4) -> np.ndarray:
    """The swap search, then alternately a balanced reassignment of every filter under the kept
    blocks and the swap search again, while the kept norm rises.

    With the kept mask `M` fixed, the best assignment of filters to blocks (each block taking
    `n`) maximises `sum_j P[j, block(j)]`, `P = X M^T`; it can move filters in cycles that no
    pairwise swap reaches (measured: 1x8@0.1 on 1024 x 1024, 0.375 -> 0.412 of the norm kept on
    filters in hidden groups, 0.347 -> 0.359 on low-rank plus noise). The proposal rounds of
    `_balanced_assign` solve it approximately, so a step is kept only when it gains, and the
    steps stop when one gains less than `min_gain` of the kept norm (later steps gain ever less:
    on 4096 x 4096 low-rank weights twenty steps add 0.0074 to the fraction kept, the first
    three 0.0045, at 1-2 s each).
    """
    best = _swap_search(pb, order)
    best_kept = pb.kept(best)
    for _ in range(max_steps):
        mask = pb.top_mask(pb.scores(pb.slots_of(best)))
        assign = _balanced_assign(pb.xp[: pb.out] @ mask.T, pb.cap)
        moved = _swap_search(pb, np.argsort(assign, kind="stable").astype(np.int32))
        value = pb.kept(moved)
        gained = value / best_kept - 1 if best_kept > 0 else 0.0
        if gained > 1e-9:
            best, best_kept = moved, value
        if gained < min_gain:
            break
    return best


def _bisect(pb: _Problem, iters: int = 6) -> np.ndarray:
    """Recursive balanced 2-means of the filters' profiles `x[j]` into groups of `n`.

    Each split puts a multiple of `n` filters on the left (the partial group, if any, ends up
    last); the two centroids start at the filter farthest from the mean and the one farthest from
    it, and a filter goes to the side whose centroid it is nearer to (ranked by
    `x . (c2 - c1)`, so the split sizes are exact). Distances are `|x|^2 - 2 x.c + |c|^2` and
    means are products with an indicator, so no step copies the profiles but the one gather per
    split.
    """
    n = pb.n
    x = pb.xp[: pb.out]
    sq = np.einsum("ij,ij->i", x, x)
    leaves: list[np.ndarray] = []
    stack = [np.arange(pb.out)]
    while stack:
        idx = stack.pop()
        m = len(idx)
        if m <= n:
            leaves.append(idx)
            continue
        left = n * ((m // n + 1) // 2)
        y, ysq = x[idx], sq[idx]
        far = int(np.argmax(ysq - 2 * (y @ (y.sum(0) / m))))
        other = int(np.argmax(ysq - 2 * (y @ y[far])))
        c1, c2 = y[far], y[other]
        side = None
        for _ in range(iters):
            order = np.argsort(y @ (c2 - c1), kind="stable")
            new = np.zeros(m, bool)
            new[order[left:]] = True
            if side is not None and np.array_equal(new, side):
                break
            side = new
            right = side.astype(np.float32)
            total, right_sum = y.sum(0), right @ y
            c1, c2 = (total - right_sum) / left, right_sum / (m - left)
        stack.append(idx[side])  # Popped last: the right part (with any partial group) ends last.
        stack.append(idx[~side])
    return np.concatenate(leaves).astype(np.int32)


def _kmeans(pb: _Problem, order: np.ndarray, iters: int = 5, budget: float = 2e10
            ) -> np.ndarray:
    """Balanced k-means of the profiles from the groups of `order` (groups of `n`, the last
    possibly partial and kept last). An iteration costs an `[out, rows] x [rows, G]` product, so
    the iterations are capped at `budget` multiply-adds (1x4 blocks on 4096 x 4096: one
    iteration of 17e9; k-means after the bisection moves the kept norm by < 0.001 there)."""
    iters = max(1, min(iters, int(budget // max(1, pb.out * pb.rows * pb.groups))))
    x = pb.xp[: pb.out]
    starts = np.concatenate([[0], np.cumsum(pb.cap)[:-1]])
    assign = np.empty(pb.out, np.int64)
    assign[order] = np.arange(pb.out) // pb.n
    for _ in range(iters):
        by_group = np.argsort(assign, kind="stable")
        cent = np.add.reduceat(x[by_group], starts, axis=0) / pb.cap[:, None]
        # Nearest centroid = largest 2 x.c - |c|^2 (|x|^2 is the same for every centroid).
        new = _balanced_assign(2 * (x @ cent.T) - np.einsum("ij,ij->i", cent, cent)[None],
                               pb.cap)
        if np.array_equal(new, assign):
            break
        assign = new
    return np.argsort(assign, kind="stable").astype(np.int32)


def _balanced_assign(profit: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Each filter to a group, group `g` taking exactly `cap[g]`: rounds in which every
    unassigned filter proposes to its best open group and each group accepts its best proposals
    up to its remaining capacity."""
    out, groups = profit.shape
    assign = np.full(out, -1, np.int64)
    cap = cap.copy()
    while True:
        free = np.nonzero(assign < 0)[0]
        if free.size == 0:
            return assign
        p = profit[free]
        p[:, cap == 0] = -np.inf
        best = p.argmax(1)
        value = p[np.arange(free.size), best]
        order = np.lexsort((-value, best))
        by_group = best[order]
        rank = np.arange(order.size) - np.searchsorted(by_group, by_group)
        take = rank < cap[by_group]
        assign[free[order[take]]] = by_group[take]
        np.subtract.at(cap, by_group[take], 1)


# ====================================================================== the model: report
@dataclasses.dataclass(frozen=True)
class LayerRearrangement:
    """What `rearrange_filters` did to one producer layer.

    Attributes:
        path: the layer's kernel path, '/'-joined (`"conv1/kernel"`, `"layers/0/kernel"`).
        spec: the 1xN spec the permutation was searched for (None when the layer had none).
        kept_before: the kernel's `kept_block_norm` before (absolute, a sum of squares).
        kept_after: the same after the permutation (== `kept_before` when skipped).
        total: `sum(kernel**2)`, so `kept_before / total` is the fraction kept.
        perm: int32 `[out]` NumPy array, the output permutation applied, or None when skipped.
        skipped: None when rearranged, else the reason it was left alone.
        consumers: the kernels whose inputs were permuted to match (paths).
        companions: the feature vectors permuted with the outputs (bias, normalisation scale,
            bias and running statistics; paths).
    """

    path: str
    spec: Any
    kept_before: float
    kept_after: float
    total: float
    perm: np.ndarray | None = None
    skipped: str | None = None
    consumers: tuple[str, ...] = ()
    companions: tuple[str, ...] = ()

    @property
    def fraction_before(self) -> float:
        return self.kept_before / self.total if self.total > 0 else 1.0

    @property
    def fraction_after(self) -> float:
        return self.kept_after / self.total if self.total > 0 else 1.0


@dataclasses.dataclass(frozen=True)
class RearrangeReport:
    """The result of `rearrange_filters` / `rearrange_filters_linen`: one `LayerRearrangement`
    per producer candidate (every `kernel` used as the weight of a dense product or convolution),
    in the model's order. `str(report)` is a table; `report["conv1/kernel"]` one row."""

    layers: tuple[LayerRearrangement, ...]
    method: str

    @property
    def rearranged(self) -> tuple[LayerRearrangement, ...]:
        return tuple(r for r in self.layers if r.skipped is None)

    @property
    def skipped(self) -> tuple[LayerRearrangement, ...]:
        return tuple(r for r in self.layers if r.skipped is not None)

    def __getitem__(self, path: str) -> LayerRearrangement:
        for r in self.layers:
            if r.path == path or r.path == f"{path}/kernel":
                return r
        raise KeyError(f"no layer {path!r} in the report; layers: {[r.path for r in self.layers]}")

    def __str__(self) -> str:
        head = ("layer", "spec", "kept before", "kept after", "gain", "result")
        rows = []
        for r in self.layers:
            gain = (f"{(r.kept_after / r.kept_before - 1) * 100:+.2f}%" if r.kept_before > 0
                    else "")
            result = ("rearranged" + (f" -> inputs of {', '.join(r.consumers)}"
                                      if r.consumers else "")
                      if r.skipped is None else f"skipped: {r.skipped}")
            measured = r.spec is not None
            rows.append((r.path, str(r.spec) if measured else "-",
                         f"{r.kept_before:.4g} ({r.fraction_before:.2%})" if measured else "-",
                         f"{r.kept_after:.4g} ({r.fraction_after:.2%})" if measured else "-",
                         gain if measured else "", result))
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
                  for i, h in enumerate(head)]

        def fmt(row):
            return "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1]

        lines = [f"filter rearrangement (method {self.method!r}): {len(self.rearranged)} "
                 f"rearranged, {len(self.skipped)} skipped", fmt(head),
                 fmt(tuple("-" * w for w in widths))]
        return "\n".join(lines + [fmt(row) for row in rows])


# ====================================================================== the model: tracing
# The dataflow analysis runs on a flat copy of the model's jaxpr: calls (jit, custom_jvp/vjp,
# checkpoint) are inlined, so `nnx.relu` (a custom_jvp around a jit) is a plain `max`.
_CALLS = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "remat", "checkpoint", "remat2", "custom_lin"}
# Elementwise primitives: output[i] depends on the operands' [i] only (with rank-preserving
# broadcasting of size-1 axes), so they commute with any permutation of any axis.
_ELEMENTWISE = {
    "add", "sub", "mul", "div", "max", "min", "pow", "integer_pow", "neg", "abs", "sign", "exp",
    "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "asin", "acos",
    "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "erf", "erfc",
    "erf_inv", "square", "select_n", "gt", "lt", "ge", "le", "eq", "ne", "and", "or", "not",
    "xor", "clamp", "floor", "ceil", "round", "is_finite", "nextafter", "atan2", "rem",
    "reduce_precision", "convert_element_type", "copy", "copy_p", "imag", "real", "conj",
    "stop_gradient", "shift_left", "shift_right_logical", "shift_right_arithmetic", "population_count",
    "lgamma", "digamma", "sharding_constraint", "device_put", "optimization_barrier", "pvary",
    "mesh_cast",
}
_IDENTITY = {"convert_element_type", "copy", "copy_p", "reduce_precision", "sharding_constraint",
             "device_put", "optimization_barrier", "pvary", "mesh_cast", "stop_gradient"}
# Reductions that are invariant under a permutation of the reduced axis.
_REDUCE_INVARIANT = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                     "reduce_or", "reduce_xor"}
_REDUCE_WINDOW = {"reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"}
_CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}
_RANDOM = {"random_bits", "random_wrap", "random_unwrap", "random_seed", "random_fold_in",
           "random_split", "threefry2x32"}
_CONTROL = {"cond", "while", "scan", "switch"}


class _Graph:
    """A flat copy of a jaxpr: equations `(name, params, ins, outs)` over integer value ids."""

    def __init__(self, closed):
        self.shape: list[tuple[int, ...]] = []
        self.consts: set[int] = set()  # Literals and constants.
        self.eqns: list[tuple[str, dict, list[int], list[int]]] = []
        env: dict = {}
        self.invars = [self._new(v.aval, env, v) for v in closed.jaxpr.invars]
        for v in closed.jaxpr.constvars:
            self.consts.add(self._new(v.aval, env, v))
        self._inline(closed.jaxpr, env)
        self.outvars = [self._read(v, env) for v in closed.jaxpr.outvars]

    def _new(self, aval, env=None, var=None) -> int:
        i = len(self.shape)
        self.shape.append(tuple(getattr(aval, "shape", ())))
        if env is not None and var is not None:
            env[var] = i
        return i

    def _read(self, atom, env) -> int:
        if type(atom).__name__ == "Literal":
            i = self._new(atom.aval)
            self.consts.add(i)
            return i
        return env[atom]

    def _inline(self, jaxpr, env):
        for eqn in jaxpr.eqns:
            ins = [self._read(a, env) for a in eqn.invars]
            name = eqn.primitive.name
            sub = _sub_jaxpr(eqn) if name in _CALLS else None
            if sub is not None:
                inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
                consts = getattr(sub, "consts", ())
                sub_env: dict = {}
                for v, _ in zip(inner.constvars, consts):
                    self.consts.add(self._new(v.aval, sub_env, v))
                for v, i in zip(inner.invars, ins):
                    sub_env[v] = i
                self._inline(inner, sub_env)
                for v, o in zip(eqn.outvars, inner.outvars):
                    env[v] = self._read(o, sub_env)
                continue
            outs = [self._new(v.aval, env, v) for v in eqn.outvars]
            self.eqns.append((name, dict(eqn.params), ins, outs))


def _sub_jaxpr(eqn):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns") and len(inner.invars) == len(eqn.invars):
            return sub
    return None


def _uniform_axes(g: _Graph) -> list[frozenset]:
    """For every value: the axes along which it is known to be constant (broadcast), whatever
    the inputs hold. A value combined with permuted features must be constant along them."""
    uni: list[frozenset] = [frozenset(j for j, d in enumerate(s) if d == 1) for s in g.shape]
    for name, params, ins, outs in g.eqns:
        for o in outs:
            shape = g.shape[o]
            ones = {j for j, d in enumerate(shape) if d == 1}
            if name in _ELEMENTWISE:
                axes = set(range(len(shape)))
                for i in ins:
                    if g.shape[i] and len(g.shape[i]) == len(shape):
                        axes &= uni[i] | {j for j, d in enumerate(g.shape[i]) if d == 1}
                    elif g.shape[i]:
                        axes = set()
                uni[o] = frozenset(axes | ones)
            elif name == "broadcast_in_dim":
                dims = params["broadcast_dimensions"]
                src = g.shape[ins[0]]
                axes = {j for j in range(len(shape)) if j not in dims}
                axes |= {dims[k] for k in range(len(src)) if src[k] == 1 or k in uni[ins[0]]}
                uni[o] = frozenset(axes | ones)
            elif name == "transpose":
                perm = params["permutation"]
                uni[o] = frozenset({j for j, k in enumerate(perm) if k in uni[ins[0]]} | ones)
            elif name in _REDUCE_INVARIANT or name in ("argmax", "argmin"):
                gone = set(params["axes"])
                keep = [k for k in range(len(g.shape[ins[0]])) if k not in gone]
                uni[o] = frozenset({j for j, k in enumerate(keep) if k in uni[ins[0]]} | ones)
            elif name in ("reshape", "squeeze"):
                src = g.shape[ins[0]]
                a = [k for k, d in enumerate(src) if d != 1]
                b = [j for j, d in enumerate(shape) if d != 1]
                if [src[k] for k in a] == [shape[j] for j in b]:  # Only unit axes changed.
                    uni[o] = frozenset({j for j, k in zip(b, a) if k in uni[ins[0]]} | ones)
                else:
                    uni[o] = frozenset(ones)
            else:
                uni[o] = frozenset(ones)
    return uni


def _random_values(g: _Graph) -> list[bool]:
    """Values computed from random bits (and constants) only: dropout masks. A permutation of
    the features reorders their i.i.d. entries, which leaves the model's output distribution
    (not its draw for a given key) unchanged."""
    rand = [False] * len(g.shape)
    static = [i in g.consts for i in range(len(g.shape))]  # Computed from constants only.
    for name, _, ins, outs in g.eqns:
        if name in _RANDOM or (any(rand[i] for i in ins) and all(
                rand[i] or static[i] or not g.shape[i] for i in ins)):
            for o in outs:
                rand[o] = True
        elif all(static[i] for i in ins):
            for o in outs:
                static[o] = True
    return rand


# ====================================================================== the model: dataflow
@dataclasses.dataclass(frozen=True)
class _Tag:
    """A value carrying the producer's features along `axis`: permuting the producer's outputs by
    `perm` permutes it along `axis` as `(outer, feature, inner)` with `inner` of size `stride`
    (stride > 1 after a flatten that puts features before other axes)."""

    axis: int
    stride: int = 1


@dataclasses.dataclass(frozen=True)
class _Vec:
    """A value whose dependence on `axis` comes only from rank-1 parameters `params` (a bias, a
    norm's scale or statistics, broadcast and combined with values constant along `axis`):
    permuting those parameters permutes it along `axis`."""

    params: frozenset
    axis: int


@dataclasses.dataclass(frozen=True)
class _Param:
    """A dtype view of a parameter of rank >= 2 (a candidate consumer kernel); `producer` when it
    is the kernel of the layer being analysed."""

    path: str
    producer: bool = False


@dataclasses.dataclass
class _Flow:
    consumers: list  # (path, axis, stride)
    companions: set


class _Unsafe(Exception):
    pass


def _prod(xs) -> int:
    return int(math.prod(xs))


def _map_reshape(src, dst, axis: int, stride: int, features: int):
    """Where a feature digit (size `features`, element stride `stride` inside axis `axis` of
    `src`) lands after a row-major reshape to `dst`: `(axis, stride)`, or None when the reshape
    splits it across axes."""
    g = stride * _prod(src[axis + 1:])
    for j in range(len(dst)):
        inner = _prod(dst[j + 1:])
        if dst[j] > 1 and g % inner == 0 and (inner * dst[j]) % (g * features) == 0:
            return j, g // inner
    return None


def _analyse(g: _Graph, uniform, random, param_ids: dict, producer: str, features: int,
             sparse_of: dict) -> _Flow:
    """Follow the producer's outputs through `g`; raise `_Unsafe(reason)` unless every use is a
    feature-permutation-equivariant op ending in a consumer's contraction (or an invariant)."""
    st: dict[int, Any] = {}
    for i, (path, rank) in param_ids.items():
        if path == producer:
            st[i] = _Param(path, producer=True)
        elif rank == 1:
            st[i] = _Vec(frozenset([path]), 0)
        elif rank >= 2:
            st[i] = _Param(path)
    consumers: list = []
    claimed: set = set()
    poisoned: dict[str, str] = {}
    other_use: dict[str, str] = {}
    produced = False

    def poison(state, why):
        if isinstance(state, _Vec):
            for p in state.params:
                poisoned.setdefault(p, why)
        elif isinstance(state, _Param) and not state.producer:
            other_use.setdefault(state.path, why)

    for name, params, ins, outs in g.eqns:
        states = [st.get(i) for i in ins]
        if all(s is None for s in states):
            continue
        tags = [s for s in states if isinstance(s, _Tag)]
        kern = [s for s in states if isinstance(s, _Param) and s.producer]
        what = _describe(name, ins, sparse_of)

        if name in _IDENTITY and len(ins) == len(outs):
            for i, o in zip(ins, outs):
                st[o] = st.get(i)
            continue

        if name in ("dot_general", "conv_general_dilated"):
            out = _product(g, name, params, ins, outs, states)
            if isinstance(out, tuple) and out[0] == "source":
                produced = True
                st[outs[0]] = _Tag(out[1], 1)
                continue
            if isinstance(out, tuple):  # A consumer's contraction: its output is invariant.
                consumers.append(out[1:])
                continue
            if kern:
                raise _Unsafe(f"its kernel is used by {what} other than as the layer's weight "
                              "(shared or tied weights)")
            if tags:
                raise _Unsafe(out)
            for s in states:
                poison(s, f"used by {what}")
            continue

        if kern:
            raise _Unsafe(f"its kernel is used by {what} (shared or tied weights)")
        if any(isinstance(s, _Param) for s in states):
            if tags:
                raise _Unsafe(f"its features meet the parameter "
                              f"{next(s.path for s in states if isinstance(s, _Param))} in "
                              f"{what}, which is not a per-feature vector")
            for s in states:
                poison(s, f"used by {what}")
            continue

        if name in _ELEMENTWISE:
            st.update(zip(outs, [_elementwise(g, uniform, random, ins, states, outs[0], what,
                                              claimed, poison, features)] * len(outs)))
            continue

        if name == "concatenate":
            if tags and all(s == tags[0] for s in states) and params["dimension"] != tags[0].axis:
                st[outs[0]] = tags[0]
                continue
            if tags:
                raise _Unsafe(_why_mixed(name, params, tags, what))
            for s in states:
                poison(s, f"used by {what}")
            continue

        if len(ins) >= 1 and states[0] is not None and all(s is None for s in states[1:]):
            s = states[0]
            moved = _shape_op(g, name, params, ins[0], outs, s, features)
            if moved is not None:
                for o, m in zip(outs, moved):
                    st[o] = m
                continue
            if isinstance(s, _Tag):
                raise _Unsafe(_why_shape_op(name, s, what))
            poison(s, f"used by {what}")
            continue

        if tags:
            raise _Unsafe(_why_mixed(name, params, tags, what))
        for s in states:
            poison(s, f"used by {what}")

    for o in g.outvars:
        s = st.get(o)
        if isinstance(s, _Tag):
            raise _Unsafe("its outputs reach the model's output (a permutation would reorder it)")
        if isinstance(s, _Param) and s.producer:
            raise _Unsafe("its kernel is returned by the model")
        poison(s, "returned by the model")
    if not produced:
        raise _Unsafe("its kernel is not the weight of a dense product or convolution in the "
                      "traced call")
    for path, _, _ in consumers:
        if path in other_use:
            raise _Unsafe(f"its consumer's kernel {path} is also {other_use[path]} (shared "
                          "weights: permuting its inputs would change that use)")
    for path in sorted(claimed):
        if path in poisoned:
            raise _Unsafe(f"the per-feature parameter {path} is also {poisoned[path]} (shared "
                          "with another part of the model)")
    return _Flow(consumers=consumers, companions=claimed)


def _describe(name, ins, sparse_of) -> str:
    for i in ins:
        if i in sparse_of:
            layer, kind = sparse_of[i]
            return (f"`{name}` of the sparse layer {layer} ({kind}: rearrange the dense model, "
                    "then sparsify)")
    return f"`{name}`"


def _sparse_values(g: _Graph, leaf_ids: dict, sparse_owner: dict) -> dict:
    """`{value id: (layer, class)}` for values computed from a sparse layer's arrays."""
    of = {i: sparse_owner[p] for i, p in leaf_ids.items() if p in sparse_owner}
    for _, _, ins, outs in g.eqns:
        found = next((of[i] for i in ins if i in of), None)
        if found is not None:
            for o in outs:
                of[o] = found
    return of


def _product(g, name, params, ins, outs, states):
    """A dense product or convolution: `("source", output axis)` (the producer's own),
    `("consumer", kernel path, axis, stride)`, or the reason it is unsafe (a str)."""
    if len(ins) != 2:
        return f"`{name}` with {len(ins)} operands"
    lhs, rhs = states
    if name == "dot_general":
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        for side, (s, other, contract, batch, own_contract, own_batch) in enumerate(
                ((lhs, rhs, lc, lb, rc, rb), (rhs, lhs, rc, rb, lc, lb))):
            if isinstance(other, _Param) and other.producer and s is None:
                rank = len(g.shape[ins[1 - side]])
                last = rank - 1
                if last in own_contract or last in own_batch or len(own_batch) or \
                        sorted(own_contract) != list(range(rank - 1)):
                    return ("`dot_general` that does not contract the kernel's inputs "
                            "[..., in] against its input")
                # Output dims: batch, lhs free, rhs free.
                lhs_rank = len(g.shape[ins[0]])
                lhs_free = lhs_rank - len(lc) - len(lb)
                pos = len(lb) + (lhs_free + last - len(own_contract) if side == 0
                                 else last - len(own_contract))
                return ("source", pos)
        for s, other, contract, other_contract, other_id in (
                (lhs, rhs, lc, rc, ins[1]), (rhs, lhs, rc, lc, ins[0])):
            if isinstance(s, _Tag) and isinstance(other, _Param) and not other.producer:
                if s.axis not in contract:
                    return ("its features are a free or batch axis of a `dot_general` with "
                            f"{other.path} (not the contracted inputs)")
                axis = other_contract[list(contract).index(s.axis)]
                return ("consumer", other.path, axis, s.stride)
        tag = next((s for s in states if isinstance(s, _Tag)), None)
        if tag is None:
            return "`dot_general` without the layer's features"
        return "its features enter a `dot_general` whose other operand is not a parameter"
    # conv_general_dilated
    dn = params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    grouped = params["feature_group_count"] != 1 or params["batch_group_count"] != 1
    if isinstance(rhs, _Param) and rhs.producer and lhs is None:
        if grouped:
            return "a grouped or depthwise convolution (its outputs are tied to input groups)"
        if rhs_spec[0] != len(g.shape[ins[1]]) - 1:
            return "a convolution whose kernel's output features are not its last axis"
        return ("source", out_spec[1])
    if isinstance(lhs, _Tag) and isinstance(rhs, _Param) and not rhs.producer:
        if lhs.axis != lhs_spec[1] or lhs.stride != 1:
            return "its features are a spatial axis of a convolution's input"
        if grouped:
            return "its features enter a grouped or depthwise convolution"
        return ("consumer", rhs.path, rhs_spec[1], 1)
    if isinstance(lhs, _Param) and lhs.producer:
        return "its kernel is used as a convolution's input"
    return "its features enter a convolution whose kernel is not a parameter"


def _elementwise(g, uniform, random, ins, states, out, what, claimed, poison, features):
    tags = [s for s in states if isinstance(s, _Tag)]
    vecs = [s for s in states if isinstance(s, _Vec)]
    rank = len(g.shape[out])

    def constant_along(i, axis):
        shape = g.shape[i]
        return not shape or (len(shape) == rank and (shape[axis] == 1 or axis in uniform[i]))

    if tags:
        t = tags[0]
        if any(s != t for s in tags):
            raise _Unsafe(f"{what} combines its features laid out on different axes")
        for i, s in zip(ins, states):
            if isinstance(s, _Vec):
                if s.axis != t.axis or t.stride != 1 or g.shape[i][s.axis] != features:
                    raise _Unsafe(f"{what} combines its features with the per-feature "
                                  f"parameters {sorted(s.params)} on another axis")
            elif s is None and not constant_along(i, t.axis) and not random[i]:
                raise _Unsafe(f"{what} combines its features with a tensor that is not "
                              "permuted with them (a residual connection or another branch)")
        for s in vecs:
            claimed.update(s.params)
        return t
    axis = vecs[0].axis
    ok = all(s.axis == axis for s in vecs) and all(
        s is not None or constant_along(i, axis) for i, s in zip(ins, states))
    if not ok:
        for s in vecs:
            poison(s, f"used by {what} with values that vary along its features")
        return None
    return _Vec(frozenset().union(*(s.params for s in vecs)), axis)


def _shape_op(g, name, params, i, outs, s, features):
    """The state after a one-operand structural op, or None when it is not equivariant."""
    src, dst = g.shape[i], g.shape[outs[0]] if outs else ()
    size = features if isinstance(s, _Tag) else src[s.axis]
    stride = s.stride if isinstance(s, _Tag) else 1

    def make(axis, new_stride=stride):
        if isinstance(s, _Tag):
            return _Tag(axis, new_stride)
        return _Vec(s.params, axis) if new_stride == 1 else None

    a = s.axis
    if name == "broadcast_in_dim":
        dims = params["broadcast_dimensions"]
        if src[a] != dst[dims[a]]:
            return None
        return [make(dims[a])]
    if name in ("reshape", "squeeze"):
        if name == "reshape" and params.get("dimensions") is not None:
            return None
        where = _map_reshape(src, dst, a, stride, size)
        if where is None:
            return None
        m = make(*where)
        return None if m is None else [m]
    if name == "transpose":
        return [make(list(params["permutation"]).index(a))]
    if name in _REDUCE_INVARIANT or name in ("argmax", "argmin"):
        axes = set(params["axes"])
        if a in axes:
            return None if name in ("argmax", "argmin") else [None] * len(outs)
        return [make(a - sum(1 for k in axes if k < a))] * len(outs)
    if name in _REDUCE_WINDOW:
        keys = ("window_dimensions", "window_strides", "base_dilation", "window_dilation")
        if any(params[k][a] != 1 for k in keys if params.get(k) is not None):
            return None
        if tuple(params["padding"][a]) != (0, 0):
            return None
        return [make(a)] * len(outs)
    if name in _CUMULATIVE:
        return None if params["axis"] == a else [make(a)]
    if name == "rev":
        return None if a in params["dimensions"] else [make(a)]
    if name == "pad":
        return None if tuple(params["padding_config"][a]) != (0, 0, 0) else [make(a)]
    if name == "slice":
        start, limit = params["start_indices"][a], params["limit_indices"][a]
        step = (params.get("strides") or [1] * len(src))[a]
        return [make(a)] if (start, limit, step) == (0, src[a], 1) else None
    if name == "split":
        if params["axis"] == a:
            return None
        return [make(a)] * len(outs)
    return None


def _why_shape_op(name, s, what) -> str:
    if name in ("slice", "split", "dynamic_slice", "gather"):
        return f"`{name}` slices or gathers along its features"
    if name in ("reshape", "squeeze"):
        return "a reshape splits its features across axes"
    if name in ("argmax", "argmin"):
        return f"`{name}` over its features returns positions, which a permutation changes"
    if name in _CONTROL:
        return f"its features pass through control flow (`{name}`)"
    if name in _CUMULATIVE:
        return f"`{name}` accumulates along its features"
    if name in _REDUCE_WINDOW or name == "pad" or name == "rev":
        return f"`{name}` mixes neighbouring features"
    return f"its features pass through {what}, not known to commute with a permutation"


def _why_mixed(name, params, tags, what) -> str:
    if name == "concatenate":
        if params["dimension"] == tags[0].axis:
            return "a concatenation along its features"
        return "a concatenation with a tensor that is not permuted with its features"
    if name in _CONTROL:
        return f"its features pass through control flow (`{name}`)"
    if name in ("dynamic_slice", "dynamic_update_slice", "gather", "scatter", "scatter-add",
                "scatter_add"):
        return f"`{name}` indexes its features"
    return f"its features pass through {what}, not known to commute with a permutation"


# ====================================================================== the model: entry points
def rearrange_filters(model, spec, example_input, *, method: str = "cluster",
                      check: bool = True) -> RearrangeReport:
    """Rearrange the filters of a Flax NNX model for 1xN pruning, in place, keeping its function.

    Every `kernel` used as the weight of a dense product or convolution (`nnx.Linear`,
    `nnx.Conv`, ...) is a candidate *producer*. The model is traced once with `jax.make_jaxpr` on
    `example_input` and each producer's outputs are followed through the jaxpr: they may pass
    through elementwise ops (activations, bias adds, dropout), normalisations over the features
    (`nnx.LayerNorm`, `nnx.RMSNorm`, `nnx.BatchNorm`: per-feature statistics, scale and bias),
    reductions and pooling over other axes, reshapes that keep the features whole (a flatten of
    NHWC features puts feature `c` of pixel `s` at `c + C*s`), and must end in the contracted
    inputs of other layers' kernels (the *consumers*: `nnx.Linear` rows, `nnx.Conv` `Cin`), or
    in reductions over the features. Then the producer's outputs (kernel columns, bias) are
    permuted by `rearrange_outputs(kernel, spec)`, the per-feature parameters in between with
    them, and the consumers' inputs to match, so the model computes the same function (up to
    the summation order in the consumers). A producer is skipped, with the reason in the report,
    when its features reach the model's output, meet a tensor not permuted with them (a residual
    connection, another branch), are concatenated, sliced or indexed along the features, pass
    through an op not known to commute with a permutation, when a parameter on the way is shared
    with another part of the model, or when it is already a sparse layer
    (`jaxsparse.nn.SparseLinear`: rearrange the dense model, then sparsify).

    Dropout in training mode is accepted: its mask has i.i.d. entries, so the permuted model's
    outputs have the same distribution (for a given key, another draw).

    Args:
        model: an nnx Module; modified in place (its kernels, biases and normalisation
            parameters and statistics).
        spec: the spec each producer will be pruned with: a `jaxsparse.Blocks(n, density)`, its
            string (`"1x16@0.25"`), or a mapping from kernel path (`"conv1/kernel"`) or module
            path (`"conv1"`) to one (e.g. from `block_densities`); producers missing from the
            mapping are skipped.
        example_input: an input `model(example_input)` accepts (its values do not matter; a
            small batch is enough).
        method: the search of `rearrange_outputs` (`"cluster"`, `"swap"`, `"sort"`,
            `"identity"`).
        check: run the model on `example_input` before and after and raise (restoring the
            model) if the outputs differ by more than 1e-4 of their largest magnitude; skipped
            when the model draws random numbers.

    Returns:
        A `RearrangeReport`: per producer, the kept block norm before and after, the permutation
        and the consumers, or the skip reason. `print(report)` shows a table.

    Example:
        >>> import jax.numpy as jnp, jaxsparse as jsp
        >>> from flax import nnx
        >>> model = nnx.Sequential(nnx.Linear(32, 64, rngs=nnx.Rngs(0)), nnx.relu,
        ...                        nnx.Linear(64, 16, rngs=nnx.Rngs(1)))
        >>> report = jsp.prune.rearrange_filters(model, jsp.Blocks(16, 0.25), jnp.ones((2, 32)))
        >>> [r.skipped is None for r in report.layers]
        [True, False]
        >>> report["layers/2"].skipped
        "its outputs reach the model's output (a permutation would reorder it)"

    References:
        Lin et al., "1xN Pattern for Pruning Convolutional Neural Networks", TPAMI 2022.
    """
    from flax import nnx

    where = "jaxsparse.prune.rearrange_filters"
    if not isinstance(model, nnx.Module):
        raise TypeError(f"{where}: model must be a flax.nnx.Module; got {type(model).__name__} "
                        "(for linen use rearrange_filters_linen)")
    specs = _spec_resolver(spec, where)
    _check_method(method, where)
    graphdef, state = nnx.split(model)

    def call(state, x):
        return nnx.merge(graphdef, state)(x)

    sparse_owner = _sparse_layers(model)
    new_state, report = _rearrange(call, state, example_input, specs, method, check,
                                   sparse_owner, where)
    nnx.update(model, new_state)
    return report


def rearrange_filters_linen(module, variables, spec, example_input, *, method: str = "cluster",
                            check: bool = True):
    """`rearrange_filters` for a linen model: the same analysis on `module.apply`.

    Args:
        module: a `flax.linen.Module`; `module.apply(variables, example_input)` must run
            without mutable collections (BatchNorm with `use_running_average=True`).
        variables: its variables (`{"params": ..., "batch_stats": ...}`, dict or FrozenDict);
            not modified.
        spec: as in `rearrange_filters`; mapping keys are paths in `variables`
            (`"params/Dense_0/kernel"` or `"params/Dense_0"`).
        example_input, method, check: as in `rearrange_filters`.

    Returns:
        `(new_variables, report)`: the rearranged variables (same structure and container) and a
        `RearrangeReport` keyed by paths in `variables`.

    Example:
        >>> import jax, jax.numpy as jnp, jaxsparse as jsp
        >>> from flax import linen as nn
        >>> mlp = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(10)])
        >>> variables = mlp.init(jax.random.key(0), jnp.ones((2, 32)))
        >>> new, report = jsp.prune.rearrange_filters_linen(mlp, variables, "1x16@0.25",
        ...                                                 jnp.ones((2, 32)))
        >>> [r.path for r in report.rearranged]
        ['params/layers_0/kernel']
    """
    where = "jaxsparse.prune.rearrange_filters_linen"
    if not hasattr(module, "apply"):
        raise TypeError(f"{where}: module must be a flax.linen.Module; got "
                        f"{type(module).__name__}")
    specs = _spec_resolver(spec, where)
    _check_method(method, where)
    if not isinstance(variables, Mapping):
        raise TypeError(f"{where}: variables must be a mapping of collections (the result of "
                        f"module.init); got {type(variables).__name__}")

    def call(v, x):
        return module.apply(v, x)

    return _rearrange(call, variables, example_input, specs, method, check, {}, where)


def _check_method(method, where):
    if method not in METHODS:
        raise ValueError(f"{where}: method must be one of {METHODS}; got {method!r}")


def _spec_resolver(spec, where):
    """A function `kernel path -> (Blocks | None, reason)`."""
    if isinstance(spec, Mapping):
        table = check_mapping(spec, where, arg="spec",
                              validate=lambda value, name: _blocks_spec(value, where, name))

        def lookup(path):
            module = path.rsplit("/", 1)[0] if "/" in path else path
            found = table.get(path, table.get(module))
            return found, None if found is not None else "no spec for this layer in spec"

        return lookup
    single = _blocks_spec(spec, where)
    return lambda path: (single, None)


def _sparse_layers(model) -> dict:
    """`{leaf path: (layer path, class name)}` for the model's jaxsparse sparse layers."""
    from flax import nnx

    from jaxsparse import nn as jnn

    kinds = tuple(getattr(jnn, name) for name in ("SparseLinear", "SparseConv")
                  if hasattr(jnn, name))
    owner = {}
    for path, node in nnx.iter_graph(model):
        if kinds and isinstance(node, kinds):
            layer = "/".join(str(p) for p in path) or "<root>"
            for sub, _ in nnx.to_flat_state(nnx.state(node)):
                leaf = "/".join(str(p) for p in (*path, *sub))
                owner[leaf] = (layer, type(node).__name__)
    return owner


def _rearrange(call, state, example_input, specs, method, check, sparse_owner, where):
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    paths = [path_str(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    try:
        closed = jax.make_jaxpr(call)(state, example_input)
    except Exception as err:  # noqa: BLE001  (the model's own error, with where it came from)
        raise type(err)(f"{where}: tracing the model on example_input failed: {err}") from err
    g = _Graph(closed)
    param_ids = {}
    for var_id, path, leaf in zip(g.invars, paths, leaves):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
            param_ids[var_id] = (path, leaf.ndim)
    uniform, random = _uniform_axes(g), _random_values(g)
    sparse_of = _sparse_values(g, dict(zip(g.invars, paths)), sparse_owner)
    by_path = dict(zip(paths, leaves))
    producers = [p for p in paths if p.rsplit("/", 1)[-1] == "kernel" and p not in sparse_owner
                 and getattr(by_path[p], "ndim", 0) >= 2
                 and jnp.issubdtype(by_path[p].dtype, jnp.floating)]

    rows: list[LayerRearrangement] = []
    updates: dict[str, Any] = {}
    owner: dict[tuple, str] = {}  # (param path, axis) -> the producer that permutes it
    for layer, kind in sorted({v for v in sparse_owner.values()}):
        rows.append(LayerRearrangement(
            layer, None, 0.0, 0.0, 0.0,
            skipped=f"already sparse ({kind}): rearrange the dense model, then sparsify"))
    for path in producers:
        kernel = np.asarray(by_path[path])
        x = _squares(kernel, where)  # [out, rows]
        total = float(x.sum(dtype=np.float64))
        spec, reason = specs(path)
        before = _kept(x, np.arange(x.shape[0]), spec) if spec is not None else total
        row = dict(path=path, spec=spec, kept_before=before, kept_after=before, total=total)
        if reason is None:
            reason = spec.fits_shape(x.shape[::-1])
        if reason is None:
            try:
                flow = _analyse(g, uniform, random, param_ids, path, kernel.shape[-1],
                                sparse_of)
            except _Unsafe as err:
                reason = str(err)
        if reason is None:
            targets = [(path, kernel.ndim - 1)] + [(c, 0) for c in sorted(flow.companions)] + [
                (c, axis % by_path[c].ndim) for c, axis, _ in flow.consumers]
            clash = next(((t, owner[t]) for t in targets if t in owner), None)
            if clash is not None:
                reason = (f"{clash[0][0]} is already permuted along that axis for "
                          f"{clash[1]}")
        if reason is not None:
            rows.append(LayerRearrangement(**row, skipped=reason))
            continue
        perm = _search(x, spec, method)
        for t in targets:
            owner[t] = path
        _permute(updates, by_path, path, -1, perm, 1)
        for c in flow.companions:
            _permute(updates, by_path, c, 0, perm, 1)
        for c, axis, stride in flow.consumers:
            _permute(updates, by_path, c, axis, perm, stride)
        row["kept_after"] = _kept(x, perm, spec)
        rows.append(LayerRearrangement(
            **row, perm=perm, consumers=tuple(dict.fromkeys(c for c, _, _ in flow.consumers)),
            companions=tuple(sorted(flow.companions))))

    new_leaves = [updates.get(p, leaf) for p, leaf in zip(paths, leaves)]
    new_state = jax.tree_util.tree_unflatten(treedef, new_leaves)
    if check and updates and not any(random):
        _check_same(call, state, new_state, example_input, where)
    order: dict[str, int] = {}
    for k, p in enumerate(paths):  # A layer's position: its first leaf's.
        parts = p.split("/")
        for j in range(1, len(parts) + 1):
            order.setdefault("/".join(parts[:j]), k)
    rows.sort(key=lambda r: order.get(r.path, -1))
    return new_state, RearrangeReport(tuple(rows), method)


def _permute(updates, by_path, path, axis, perm, stride):
    """Permute `path` along `axis`, whose entries are `(outer, feature, inner=stride)`."""
    current = updates.get(path, by_path[path])
    extent = current.shape[axis]
    features = len(perm)
    index = np.arange(extent).reshape(-1, features, stride)[:, perm, :].reshape(-1)
    updates[path] = jnp.take(jnp.asarray(current), index, axis=axis)


def _check_same(call, state, new_state, example_input, where):
    before = jax.tree.leaves(call(state, example_input))
    after = jax.tree.leaves(call(new_state, example_input))
    for y0, y1 in zip(before, after):
        y0, y1 = np.asarray(y0), np.asarray(y1)
        if not np.issubdtype(y0.dtype, np.floating):
            continue
        scale = float(np.max(np.abs(y0), initial=0.0))
        err = float(np.max(np.abs(y1.astype(np.float64) - y0), initial=0.0))
        if err > 1e-4 * max(scale, 1e-30):
            raise RuntimeError(
                f"{where}: the rearranged model's outputs differ from the original's by {err:.3g} "
                f"(largest output magnitude {scale:.3g}); the model was left unchanged. This is a "
                "bug in the dataflow analysis: please report the model's structure")
