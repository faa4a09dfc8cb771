"""Input-channel permutations that maximise the magnitude kept by N:M pruning (apex ASP style).

N:M pruning keeps `n` of every `m` *consecutive* inputs, so which inputs share a group matters:
permuting the input channels of a layer (and, to compute the same function, the output channels of
the layer that produces them) changes how much magnitude survives. This module searches such a
permutation and applies it.

The search adapts the stripe-group search of NVIDIA apex's ASP (Pool & Yu, 2021) to any N:M.
A *stripe* is a group of `m` consecutive input slots; the kept magnitude is a sum of independent
per-stripe terms, so moving a channel between two stripes only changes those two terms. For every
slot `a` and every channel `c` the search holds the exact change of `a`'s stripe score when `c`
replaces the channel at `a` (one fused, jitted [slots, channels, out] reduction, see `_slot_gains`);
the gain of swapping two slots is then a sum of two table entries. Each round applies, greedily in
decreasing order, the best swap of every pair of stripes whose stripes were not yet touched in that
round (apex's "apply best gains, skip touched stripes"), and recomputes only the touched stripes'
rows. At convergence it records the best order and, up to `escape_attempts` times, escapes the
local optimum with a random swap between two stripes (apex's perturbation), then improves again.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import _validate as V
from jaxsparse.formats.nm import NM
from jaxsparse.prune._patterns import as_pattern


class PermutationResult(NamedTuple):
    """The result of `search_permutation`.

    Attributes:
        perm: int32 `[in]` NumPy array; position `i` of the permuted layer reads input `perm[i]`.
        kept_before: fraction of the total |w| kept by N:M magnitude pruning in the original order.
        kept_after: the same fraction after permuting the inputs by `perm` (>= `kept_before`).
    """

    perm: np.ndarray
    kept_before: float
    kept_after: float


def search_permutation(
    w,
    pattern,
    *,
    seed: int = 0,
    max_rounds: int = 1000,
    escape_attempts: int = 100,
) -> PermutationResult:
    r"""Search a permutation of the inputs of `w` that maximises the magnitude N:M pruning keeps.

    With :math:`A = |w|` seen as `[in, cols]` (leading dims and `out` are columns), the objective is

    .. math::
        K(\pi) = \sum_{s} \sum_{j} \operatorname{top}_n \{A_{\pi(sm + p),\, j} : 0 \le p < m\},

    the sum over stripes `s` of `m` consecutive permuted inputs of the `n` largest magnitudes of
    each column. Replacing the channel `x` at slot `a` of stripe `s` by channel `c` changes the
    stripe score by :math:`\sum_j \max(A_{cj}, t_{aj}) - \max(A_{xj}, t_{aj})`, where
    :math:`t_{aj}` is the n-th largest of the stripe's other `m - 1` values in column `j`; the
    search tabulates this for all (slot, channel) pairs and improves greedily by swaps between
    stripes, with random escapes.
    Deterministic for a given `seed` (on one machine and JAX version).

    Args:
        w: a `[..., in, out]` float kernel, or a sequence of kernels that consume the same input
            (apex's "siblings"; they must share `in`), searched jointly.
        pattern: an N:M pattern (anything `as_pattern` accepts except `Unstructured`).
        seed: seeds the random escapes.
        max_rounds: the maximum number of greedy rounds (over all escapes), >= 0.
        escape_attempts: random perturbations tried after convergence, >= 0 (apex uses 100).

    Returns:
        A `PermutationResult(perm, kept_before, kept_after)`; apply `perm` with `permute_inputs`
        to this layer (and its siblings) and with `permute_outputs` to the producer of its input.
        A ragged `in` is searched with its zero padding pinned at the end.

    Example:
        >>> import numpy as np
        >>> w = np.repeat([[10.0], [10.0], [10.0], [10.0], [1.0], [1.0], [1.0], [1.0]], 2, axis=1)
        >>> r = search_permutation(w, "2:4")
        >>> round(r.kept_before, 3), round(r.kept_after, 3)
        (0.5, 0.909)

    References:
        Pool & Yu, "Channel Permutations for N:M Sparsity", NeurIPS 2021; NVIDIA apex
        `apex/contrib/sparsity/permutation_lib.py`.
    """
    where = "jaxsparse.prune.search_permutation"
    pattern = as_pattern(pattern, name="pattern")
    if not isinstance(pattern, NM):
        raise ValueError(f"{where}: pattern must be an N:M pattern ({_why_nm_only(pattern)}); "
                         f"got {pattern!r}")
    V.check_int("seed", seed, low=0, high=2**63 - 1, where=where)
    V.check_int("max_rounds", max_rounds, low=0, high=2**62, where=where)
    V.check_int("escape_attempts", escape_attempts, low=0, high=2**62, where=where)
    a = _as_columns(w, where)  # float64 [in, cols]
    n, m = pattern
    in_features = a.shape[0]
    stripes = -(-in_features // m)
    slots = stripes * m
    padded = np.zeros((slots, a.shape[1]), np.float64)
    padded[:in_features] = a
    identity = np.arange(in_features, dtype=np.int32)
    before = _kept(padded, np.arange(slots), n, m)
    total = float(padded.sum())
    frac = (lambda k: k / total) if total > 0 else (lambda k: 1.0)
    if stripes < 2 or a.shape[1] == 0 or total == 0:
        return PermutationResult(identity, frac(before), frac(before))

    perm = _Search(padded, in_features, n, m, seed).run(max_rounds, escape_attempts)
    after = _kept(padded, perm, n, m)
    if after <= before:  # Nothing better found (or only by rounding): keep the original order.
        return PermutationResult(identity, frac(before), frac(before))
    return PermutationResult(perm[:in_features].astype(np.int32), frac(before), frac(after))


def _why_nm_only(pattern) -> str:
    if isinstance(pattern, tuple) and type(pattern).__name__ == "VNM":
        # A V:N:M group's score is, per panel, the best 4-column choice for all its v outputs at
        # once: moving one channel between groups changes that choice, so the exact per-swap
        # gain table that makes this search fast (one max per column) has no closed form, and
        # re-selecting the columns of both groups for every candidate swap costs C(m, 4) * v per
        # panel. Not searched.
        return ("V:N:M is not searched: its group score couples a panel's outputs through their "
                "shared 4-column choice, so the per-swap gains have no closed form")
    return "a permutation does not change what unstructured pruning keeps"


def permute_inputs(kernel, perm):
    """Permute the inputs (axis -2) of a `[..., in, out]` kernel: `kernel[..., perm, :]`.

    With `y = x @ kernel`, `x[..., perm] @ permute_inputs(kernel, perm) == y`: apply
    `permute_outputs` with the same `perm` to the layer producing `x`.

    Args:
        kernel: `[..., in, out]` array.
        perm: a permutation of `range(in)` (int array or a `PermutationResult`).

    Returns:
        The permuted kernel, same shape and dtype.

    Example:
        >>> import numpy as np
        >>> permute_inputs(np.arange(6.0).reshape(3, 2), [2, 0, 1]).tolist()
        [[4.0, 5.0], [0.0, 1.0], [2.0, 3.0]]
    """
    where = "jaxsparse.prune.permute_inputs"
    kernel = V.as_array("kernel", kernel, where=where)
    V.check_rank("kernel", kernel, min_rank=2, where=where, what="[..., in, out]")
    perm = _check_perm(perm, kernel.shape[-2], "the kernel's in = kernel.shape[-2]", where)
    return jnp.take(kernel, perm, axis=-2)


def permute_outputs(kernel, bias, perm):
    """Permute the outputs (axis -1) of a `[..., in, out]` kernel and its bias.

    The layer then produces `y[..., perm]`; feed it to a layer permuted by `permute_inputs` with the
    same `perm` and the network computes the same function (elementwise activations, dropout and
    residual-free paths commute with a permutation of features).

    Args:
        kernel: `[..., in, out]` array.
        bias: `[..., out]` array or None.
        perm: a permutation of `range(out)` (int array or a `PermutationResult`).

    Returns:
        `(kernel[..., :, perm], bias[..., perm])` (`bias` stays None when None).

    Example:
        >>> import numpy as np
        >>> k, b = permute_outputs(np.eye(2), np.array([1.0, 2.0]), [1, 0])
        >>> k.tolist(), b.tolist()
        ([[0.0, 1.0], [1.0, 0.0]], [2.0, 1.0])
    """
    where = "jaxsparse.prune.permute_outputs"
    kernel = V.as_array("kernel", kernel, where=where)
    V.check_rank("kernel", kernel, min_rank=2, where=where, what="[..., in, out]")
    out = kernel.shape[-1]
    perm = _check_perm(perm, out, "the kernel's out = kernel.shape[-1]", where)
    if bias is not None:
        bias = V.as_array("bias", bias, where=where)
        if bias.ndim < 1 or bias.shape[-1] != out:
            raise ValueError(
                f"{where}: bias must have last dimension out = {out}; got shape {tuple(bias.shape)}"
            )
        bias = jnp.take(bias, perm, axis=-1)
    return jnp.take(kernel, perm, axis=-1), bias


# ---------------------------------------------------------------------- search
class _Search:
    """Greedy swap search with random escapes over a padded `[slots, cols]` magnitude matrix."""

    def __init__(self, a: np.ndarray, in_features: int, n: int, m: int, seed: int):
        self.n, self.m = n, m
        self.slots = a.shape[0]
        self.stripes = self.slots // m
        self.a = jnp.asarray(a, jnp.float32)
        self.perm = np.arange(self.slots, dtype=np.int32)
        self.rng = np.random.default_rng(seed)
        # Padding slots (the zero-padded tail of a ragged `in`) are pinned where they are.
        self.movable = np.arange(self.slots) < in_features
        # Same-stripe swaps change nothing; swaps touching padding are forbidden.
        stripe_of = np.arange(self.slots) // m
        self.forbidden = (stripe_of[:, None] == stripe_of[None, :]) | ~(
            self.movable[:, None] & self.movable[None, :]
        )
        # Gains below this are float32 rounding of the table sums, not improvements.
        self.eps = 1e-5 * float(a.sum()) / self.stripes
        self.table = np.asarray(self._rows(np.arange(self.stripes)), np.float64)  # [slot, channel]
        self.score = 0.0  # Tracked relative to the start: sum of applied gains.
        self.best_gain = np.full((self.stripes, self.stripes), -np.inf)
        self.best_arg = np.zeros((self.stripes, self.stripes), np.int64)
        self._update_pairs(np.arange(self.stripes))

    def _rows(self, stripe_ids):
        # Bucket the number of stripes to a power of two so only O(log S) shapes compile.
        k = len(stripe_ids)
        bucket = min(1 << max(0, (k - 1).bit_length()), self.stripes)
        ids = np.concatenate([stripe_ids, np.repeat(stripe_ids[:1], bucket - k)]).astype(np.int32)
        rows = _slot_gains(self.a, jnp.asarray(self.perm), jnp.asarray(ids), n=self.n, m=self.m)
        return np.asarray(rows)[: k * self.m]

    def _pair_gains(self, slot_ids):
        """Swap gains `[len(slot_ids), slots]` of the given slots with every slot."""
        t, p = self.table, self.perm
        g = t[slot_ids][:, p] + t[:, p[slot_ids]].T
        return np.where(self.forbidden[slot_ids], -np.inf, g)

    def _update_pairs(self, stripe_ids):
        """Recompute the best swap of every stripe pair involving `stripe_ids`."""
        m = self.m
        slot_ids = (stripe_ids[:, None] * m + np.arange(m)).reshape(-1)
        g = self._pair_gains(slot_ids).reshape(len(stripe_ids), m, self.stripes, m)
        g = g.transpose(0, 2, 1, 3).reshape(len(stripe_ids), self.stripes, m * m)
        arg = np.argmax(g, axis=-1)
        best = np.take_along_axis(g, arg[..., None], -1)[..., 0]
        # best_arg holds (p, q) as p * m + q for the pair (row stripe, column stripe).
        self.best_gain[stripe_ids, :] = best
        self.best_arg[stripe_ids, :] = arg
        self.best_gain[:, stripe_ids] = best.T
        self.best_arg[:, stripe_ids] = (arg % m * m + arg // m).T

    def _swap(self, pairs):
        """Apply the best swap of each (disjoint) stripe pair and refresh the touched stripes."""
        m = self.m
        i, j = pairs[:, 0], pairs[:, 1]
        arg = self.best_arg[i, j]
        sa, sb = i * m + arg // m, j * m + arg % m
        self.score += float(self.best_gain[i, j].sum())
        self.perm[sa], self.perm[sb] = self.perm[sb], self.perm[sa].copy()
        self._refresh(np.unique(pairs))

    def _refresh(self, touched):
        m = self.m
        slot_ids = (touched[:, None] * m + np.arange(m)).reshape(-1)
        self.table[slot_ids] = self._rows(touched)
        self._update_pairs(touched)

    def _greedy_round(self) -> bool:
        iu, ju = np.nonzero(np.triu(self.best_gain > self.eps, 1))
        if len(iu) == 0:
            return False
        order = np.argsort(-self.best_gain[iu, ju], kind="stable")
        used = np.zeros(self.stripes, bool)
        chosen = []
        for k in order:  # Best gains first, each stripe at most once per round.
            i, j = iu[k], ju[k]
            if not (used[i] or used[j]):
                used[i] = used[j] = True
                chosen.append((i, j))
        self._swap(np.asarray(chosen, np.int64))
        return True

    def _escape(self):
        """apex's perturbation: swap two random channels of two random stripes (usually a loss)."""
        m = self.m
        movable_stripes = np.nonzero(self.movable.reshape(self.stripes, m).any(1))[0]
        if len(movable_stripes) < 2:
            return False
        i, j = self.rng.choice(movable_stripes, 2, replace=False)
        sa = i * m + self.rng.choice(np.nonzero(self.movable[i * m : (i + 1) * m])[0])
        sb = j * m + self.rng.choice(np.nonzero(self.movable[j * m : (j + 1) * m])[0])
        self.score += float(self._pair_gains(np.array([sa]))[0, sb])
        self.perm[[sa, sb]] = self.perm[[sb, sa]]
        self._refresh(np.unique([i, j]))
        return True

    def run(self, max_rounds: int, escape_attempts: int) -> np.ndarray:
        best_perm, best_score = self.perm.copy(), self.score
        rounds, escapes = 0, 0
        while rounds < max_rounds:
            if self._greedy_round():
                rounds += 1
                continue
            if self.score > best_score + self.eps:
                best_perm, best_score = self.perm.copy(), self.score
            if escapes >= escape_attempts or not self._escape():
                break
            escapes += 1
        if self.score > best_score + self.eps:
            best_perm = self.perm.copy()
        return best_perm


@functools.partial(jax.jit, static_argnames=("n", "m"))
def _slot_gains(a, perm, stripe_ids, *, n, m):
    """`[len(stripe_ids) * m, slots]`: the change of a stripe's kept magnitude when channel `c`
    replaces the channel at slot `a`, for every slot `a` of the given stripes and every channel.

    For one column with the stripe's values sorted decreasingly `s_0 >= ... >= s_{m-1}`, the n-th
    largest of the values other than slot `a` is `t = s_n` when `a` is among the top n, else
    `s_{n-1}`; the stripe keeps `top_{n-1}(others) + max(v, t)` when slot `a` holds `v`. XLA fuses
    the broadcast maximum into the reduction, so the `[k, slots, cols]` cube is never stored.
    """
    slot_ids = stripe_ids[:, None] * m + jnp.arange(m)
    vals = a[perm[slot_ids]]  # [k, m, cols]
    order = jnp.argsort(-vals, axis=1, stable=True)
    ranked = jnp.take_along_axis(vals, order, axis=1)
    rank = jnp.argsort(order, axis=1)
    t = jnp.where(rank < n, ranked[:, n][:, None], ranked[:, n - 1][:, None])
    t = t.reshape(-1, t.shape[-1])
    cur = vals.reshape(-1, vals.shape[-1])
    return jnp.sum(jnp.maximum(a[None], t[:, None]) - jnp.maximum(cur[:, None], t[:, None]), -1)


# ---------------------------------------------------------------------- helpers
def _as_columns(w, where) -> np.ndarray:
    """|w| as float64 `[in, cols]` (leading dims and out folded into columns; siblings joined)."""
    kernels = list(w) if isinstance(w, (list, tuple)) else [w]
    if not kernels:
        raise ValueError(f"{where}: w must be a kernel or a non-empty sequence of kernels; got []")
    cols = []
    for k, x in enumerate(kernels):
        name = "w" if len(kernels) == 1 and not isinstance(w, (list, tuple)) else f"w[{k}]"
        x = V.as_array(name, x, where=where)
        if V.is_tracer(x):
            raise TypeError(f"{where}: {name} must be a concrete array (the search runs on the "
                            "host, outside jit); got a tracer")
        V.check_rank(name, x, min_rank=2, where=where, what="[..., in, out]")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{where}: {name} must be a float array, got {x.dtype.name}")
        x = np.abs(np.asarray(x, np.float64))
        x = np.moveaxis(x, -2, 0)
        x = x.reshape(x.shape[0], math.prod(x.shape[1:]))
        if cols and x.shape[0] != cols[0].shape[0]:
            raise ValueError(
                f"{where}: every kernel in w must have the same in (shape[-2]); w[0] has "
                f"{cols[0].shape[0]}, {name} has {x.shape[0]}"
            )
        cols.append(x)
    a = np.concatenate(cols, axis=1)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{where}: w must be finite (no inf or NaN)")
    return a


def _kept(a: np.ndarray, perm: np.ndarray, n: int, m: int) -> float:
    """Exact (float64) kept magnitude of the padded `[slots, cols]` matrix in the order `perm`."""
    if a.size == 0:
        return 0.0
    g = a[perm].reshape(-1, m, a.shape[1])
    return float(np.sort(g, axis=1)[:, m - n :].sum())


def _check_perm(perm, size: int, what: str, where: str):
    if isinstance(perm, PermutationResult):
        perm = perm.perm
    perm = V.as_array("perm", perm, where=where)
    if not jnp.issubdtype(perm.dtype, jnp.integer):
        raise TypeError(f"{where}: perm must be an integer array, got {perm.dtype.name}")
    if perm.ndim != 1 or perm.shape[0] != size:
        raise ValueError(
            f"{where}: perm must be a 1-D permutation of length {size} ({what}); "
            f"got shape {tuple(perm.shape)}"
        )
    if V.is_concrete(perm):
        values = np.asarray(perm)
        if not np.array_equal(np.sort(values), np.arange(size)):
            seen = np.bincount(values[(values >= 0) & (values < size)], minlength=size)
            bad = [int(v) for v in values if not 0 <= v < size][:3]
            detail = (
                f"out-of-range entries {bad}" if bad
                else f"repeated entries {np.nonzero(seen > 1)[0][:3].tolist()}"
            )
            raise ValueError(
                f"{where}: perm must be a permutation of range({size}) ({what}); got {detail}"
            )
    return perm
