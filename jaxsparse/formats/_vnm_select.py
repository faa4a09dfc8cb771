"""Column selection for V:N:M sparsity: which 4 of the `m` inputs a panel of `v` outputs keeps.

V:N:M (VENOM, Castro et al., SC'23) splits the outputs of a weight `[..., in, out]` into panels of
`v` consecutive outputs and the inputs into groups of `m` consecutive inputs. In every (panel,
group) block the panel keeps 4 of the `m` inputs ("columns"), shared by its `v` outputs; inside
those 4, each output keeps its `n` (1 or 2) largest values. `select_columns` picks the 4 columns
of every block from a non-negative importance `score [..., v, m]` (e.g. `|w|` of the block with
the outputs as rows).

The block score of a quad of columns is the sum over the `v` rows of the sum of the `n` largest
scores of that row among the 4 columns. The rule:

- `m <= 20`: VENOM's exhaustive rule, exactly. Score all C(m, 4) quads and keep the best; among
  equal scores, the lexicographically smallest quad. Cost per block: `v * C(m, 4)` max/add pairs
  (C(16, 4) = 1820, C(20, 4) = 4845).
- `m > 20`: a fast rule (C(32, 4) = 35960 and C(64, 4) = 635376 quads are too many):
  1. candidates: the 20 columns with the largest column sum of `score` (equal sums: the lower
     position first), in ascending order of position;
  2. the exhaustive rule among the candidates (ties: the lexicographically smallest quad of
     candidate positions);
  3. 4 rounds of best-improvement 1-swap local search against all `m` columns. A round scores
     every quad obtained by replacing one of the 4 chosen columns by one of the `m - 4` others;
     if the best of them scores strictly higher than the current quad, it becomes the current
     quad (among equal best: the lowest replaced slot of the sorted quad, then the lowest new
     position); otherwise the quad is kept.
  Cost per block: `v * (C(20, 4) + 4 * 4 * m)` max/add pairs. On random normal weights (v = 32
  and 64, n = 1 and 2) the chosen quads score 0.9997 or more of the exhaustive optimum in total
  for m = 24 and 32, 0.9992 for m = 48; 95% or more of the blocks get the optimum itself at
  m = 32, and n = 2 comes closer than n = 1.

Scoring without sorting: along the columns of a set, keep per row the running maximum `top` and
the running sum of the two largest `top2`. Adding a column of values `x` gives `top' = max(top, x)`
and `top2' = max(top2, top + x)` (when `x` is not among the two largest, `top + x <= top2`). Both
are exactly the float32 max and the float32 sum of the two largest, whatever the order of the
columns, so equal quads tie exactly. The pairs, then the triples, then the quads are built in
lexicographic order as "column `a` added to a smaller set after `a`", through static index tables
(numpy) that XLA fuses into the max/add; the sum over the rows is a matvec.

Padding: the caller scores the entries of zero-padding (`in` not a multiple of `m`) as -1, below
any real entry, including a real 0. With the padding at the end of the group (the ragged last
group), both rules prefer real columns: a quad with a padding column never scores more than the
same quad with an unused real column instead, which is lexicographically smaller; in the fast rule
the padding columns are the last candidates, and replacing a real column by padding is never a
strict gain. With fewer than 4 real columns, the quad is the real columns and then the lowest
padding positions.

Memory: the blocks go through `lax.map` in chunks of about `_CHUNK_BYTES` (1 MB) of intermediates,
which keeps them in cache; a call on a 4096 x 4096 weight needs a few copies of its scores (64 MB)
and nothing else of note.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

#: Candidates of the fast rule, searched exhaustively: C(20, 4) = 4845 quads (2.7x m = 16).
_CANDIDATES = 20
#: The largest `m` selected exhaustively: where that costs no more than the candidates' search.
_EXACT_MAX_M = _CANDIDATES
#: Rounds of 1-swap local search of the fast rule.
_SWAP_ROUNDS = 4
#: Target working set of one chunk of blocks, in bytes (about an L2 cache).
_CHUNK_BYTES = 1 << 20

_MIN_M, _MAX_M, _MAX_V = 4, 64, 256


def select_columns(score: jax.Array, n: int) -> jax.Array:
    """The 4 columns every block of a V:N:M weight keeps (VENOM's rule; a fast rule for m > 20).

    Pure and jittable (`n` static); the rule is given in the module docstring.

    Args:
        score: `[..., v, m]` float32 (other floats are cast), the non-negative importance of each
            entry of a block (`v` rows = outputs, `m` columns = inputs), -1 for zero-padding.
            Leading dims are any batch of blocks. `1 <= v <= 256`, `4 <= m <= 64`.
        n: 1 or 2 (static), the values each row keeps among the 4 columns.

    Returns:
        `[..., 4]` uint8, the chosen columns (0..m-1) of each block, strictly ascending.

    Example:
        >>> s = jnp.array([[0.0, 5.0, 1.0, 4.0, 0.0, 3.0], [0.0, 0.0, 2.0, 0.0, 1.0, 9.0]])
        >>> select_columns(s, n=2).tolist()
        [1, 2, 3, 5]
    """
    score, n = _check_args(score, n)
    return _select(score, n)


@functools.partial(jax.jit, static_argnames="n")
def _select(score: jax.Array, n: int) -> jax.Array:
    # Jitted as a whole: op-by-op dispatch of the many small steps would dominate eager calls.
    *batch, v, m = score.shape
    if m == 4:
        return jnp.broadcast_to(jnp.arange(4, dtype=jnp.uint8), (*batch, 4))
    # Internal layout [blocks, m, v]: a row reduction over the minor axis is a fast matvec.
    blocks = jnp.swapaxes(score.reshape(-1, v, m), -1, -2)
    quads = _map_chunks(lambda s: _select_chunk(s, n), blocks, _chunk_size(v, m))
    return quads.astype(jnp.uint8).reshape(*batch, 4)


def _check_args(score, n) -> tuple[jax.Array, int]:
    where = "jaxsparse select_columns"
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) not in (1, 2):
        raise ValueError(f"{where}: n must be the int 1 or 2, got {n!r}")
    score = jnp.asarray(score)
    if not jnp.issubdtype(score.dtype, jnp.floating):
        raise TypeError(f"{where}: score must be a float array, got {score.dtype.name}")
    if score.ndim < 2:
        raise ValueError(f"{where}: score must be [..., v, m], got shape {tuple(score.shape)}")
    v, m = score.shape[-2:]
    if not (_MIN_M <= m <= _MAX_M and 1 <= v <= _MAX_V):
        raise ValueError(
            f"{where}: score must be [..., v, m] with 1 <= v <= {_MAX_V} and "
            f"{_MIN_M} <= m <= {_MAX_M}; got shape {tuple(score.shape)}"
        )
    return score.astype(jnp.float32), int(n)


def _select_chunk(s: jax.Array, n: int) -> jax.Array:
    """The chosen quads of a chunk: `s [b, m, v]` float32 -> `[b, 4]` int32, ascending."""
    m = s.shape[1]
    if m <= _EXACT_MAX_M:
        return _best_quad(s, n)
    cand = _candidates(s, _CANDIDATES)
    quads = jnp.take_along_axis(cand, _best_quad(_take_columns(s, cand), n), axis=1)
    return _local_search(s, quads, n, _SWAP_ROUNDS)


# ---------------------------------------------------------------------------- exhaustive rule


def _best_quad(s: jax.Array, n: int) -> jax.Array:
    """VENOM's exhaustive rule: `s [b, m, v]` -> `[b, 4]` int32, the best quad (lowest on ties)."""
    quads = _tables(s.shape[1]).quads
    # jnp.argmax returns the first maximum, and the scores are in lexicographic order of quads.
    return jnp.asarray(quads)[jnp.argmax(_quad_scores(s, n), axis=1)]


class _Tables(NamedTuple):
    """Subsets of `range(m)` in lexicographic order, and where their tails are (numpy int32)."""

    pairs: np.ndarray  # [C(m, 2), 2]
    triples: np.ndarray  # [C(m, 3), 3]
    quads: np.ndarray  # [C(m, 4), 4]
    triple_tail: np.ndarray  # [C(m, 3)], the index in `pairs` of triple[1:]
    quad_tail: np.ndarray  # [C(m, 4)], the index in `triples` of quad[1:]


@functools.lru_cache(maxsize=None)
def _tables(m: int) -> _Tables:
    def subsets(k):
        return np.array(list(itertools.combinations(range(m), k)), np.int32).reshape(-1, k)

    def tail_index(sets, shorter):
        where = {tuple(row): i for i, row in enumerate(shorter.tolist())}
        return np.array([where[tuple(row[1:])] for row in sets.tolist()], np.int32)

    pairs, triples, quads = subsets(2), subsets(3), subsets(4)
    return _Tables(pairs, triples, quads, tail_index(triples, pairs), tail_index(quads, triples))


def _take(x: jax.Array, index: np.ndarray) -> jax.Array:
    """`x[:, index]` for a static in-range index; XLA fuses it into the elementwise consumer."""
    return x.at[:, index].get(mode="promise_in_bounds")


def _quad_scores(s: jax.Array, n: int) -> jax.Array:
    """Block scores of all quads, lexicographic order: `s [b, m, v]` -> `[b, C(m, 4)]` float32."""
    tab = _tables(s.shape[1])
    top, top2 = _triple_values(s, n)
    # Quad (a, i, j, k) = column a added to the triple (i, j, k).
    tails = _take(top, tab.quad_tail), _take(top2, tab.quad_tail)
    per_row = _add_column(*tails, _take(s, tab.quads[:, 0]), n)[n - 1]
    return _sum_rows(per_row)


def _triple_values(s: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Per row, the max and the sum of the two largest of every triple of columns.

    Args:
        s: `[b, m, v]` float32.
        n: 1 or 2; for n = 1 the second result is the first (the sums are not needed).

    Returns:
        `(top, top2)`, each `[b, C(m, 3), v]` float32, triples in lexicographic order.
    """
    tab = _tables(s.shape[1])
    first, second = _take(s, tab.pairs[:, 0]), _take(s, tab.pairs[:, 1])
    pair_top = jnp.maximum(first, second)
    pair_top2 = first + second if n == 2 else pair_top
    # Triple (a, i, j) = column a added to the pair (i, j).
    tails = _take(pair_top, tab.triple_tail), _take(pair_top2, tab.triple_tail)
    top, top2 = _add_column(*tails, _take(s, tab.triples[:, 0]), n)
    return top, (top2 if n == 2 else top)


def _add_column(top, top2, x, n: int):
    """The running (max, sum of the two largest) of a set after adding a column of values `x`.

    `top2 + ...` is skipped for n = 1 (returned unchanged): only the max is needed there.
    """
    new_top = jnp.maximum(top, x)
    # x below the two largest: top + x <= top2. Otherwise the two largest are top and x.
    new_top2 = jnp.maximum(top2, top + x) if n == 2 else top2
    return new_top, new_top2


def _sum_rows(per_row: jax.Array) -> jax.Array:
    """`[b, q, v]` -> `[b, q]`, the sum over rows, as a matvec (faster on CPU than a reduce)."""
    ones = jnp.ones((per_row.shape[-1],), per_row.dtype)
    return jnp.einsum("bqv,v->bq", per_row, ones, precision=lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------- fast rule, m > 20


def _candidates(s: jax.Array, k: int) -> jax.Array:
    """The `k` columns of largest column sum (ties: lower position), ascending: `[b, k]` int32."""
    # Padding columns sum to -v, below every real column; top_k keeps the lower index on ties.
    _, cand = lax.top_k(s.sum(axis=2), min(k, s.shape[1]))
    # Ascending positions: the candidates' lexicographic order is that of the positions.
    return jnp.sort(cand, axis=1)


def _take_columns(s: jax.Array, cols: jax.Array) -> jax.Array:
    """`s [b, m, v]`, `cols [b, k]` -> `[b, k, v]`, the chosen columns of each block."""
    return jnp.take_along_axis(s, cols[:, :, None], axis=1)


# The other three slots of a sorted quad, for each slot that is swapped out.
_OTHERS = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]], np.int32)


def _local_search(s: jax.Array, quads: jax.Array, n: int, rounds: int) -> jax.Array:
    """Best-improvement 1-swap rounds: `s [b, m, v]`, `quads [b, 4]` -> `[b, 4]` int32 sorted."""
    return lax.fori_loop(0, rounds, lambda _, q: _swap_round(s, q, n), quads)


def _swap_round(s: jax.Array, quads: jax.Array, n: int) -> jax.Array:
    """One round: the best strictly improving swap of one chosen column, or no change."""
    b, m, _ = s.shape
    gains = _swap_scores(s, quads, n)  # [b, 4, m]: slot p replaced by column c
    chosen = quads[:, :, None] == jnp.arange(m)  # [b, 4, m]
    # Slot 0 replaced by itself: the current quad.
    current = jnp.max(jnp.where(chosen[:, 0], gains[:, 0], -jnp.inf), axis=1)
    gains = jnp.where(chosen.any(axis=1)[:, None], -jnp.inf, gains).reshape(b, 4 * m)
    # argmax: the first best, i.e. the lowest slot, then the lowest new column.
    best = jnp.argmax(gains, axis=1)
    slot, col = best // m, best % m
    better = jnp.max(gains, axis=1) > current
    swapped = jnp.where(jnp.arange(4) == slot[:, None], col[:, None], quads)
    return jnp.where(better[:, None], jnp.sort(swapped, axis=1), quads)


def _swap_scores(s: jax.Array, quads: jax.Array, n: int) -> jax.Array:
    """Block scores of the quads with slot p replaced by column c: `[b, 4, m]` float32.

    Entry (p, c) with c already in the quad is not a quad; with c = quads[p] it is the current
    score, which the caller reads from there.
    """
    others = _take_columns(s, quads)[:, _OTHERS]  # [b, 4, 3, v]
    top, top2 = others[:, :, 0], jnp.full_like(others[:, :, 0], -jnp.inf)
    for j in (1, 2):
        top, top2 = _add_column(top, top2, others[:, :, j], 2)
    # [b, 4, 1, v] with the columns [b, 1, m, v]: every slot against every column.
    per_row = _add_column(top[:, :, None], top2[:, :, None], s[:, None], n)[n - 1]
    b, m, v = s.shape
    return _sum_rows(per_row.reshape(b, 4 * m, v)).reshape(b, 4, m)


# ---------------------------------------------------------------------------- chunking


def _chunk_size(v: int, m: int) -> int:
    """Blocks per chunk: about `_CHUNK_BYTES` of the largest per-block intermediates."""
    k = min(m, _CANDIDATES)
    # The triples' (top, top2) plus the quads' per-row values (the matvec's operand).
    exhaustive = 2 * math.comb(k, 3) + math.comb(k, 4)
    # The swap round's per-row values and its column gather (fast rule only).
    swaps = 4 * m + 12 if m > _EXACT_MAX_M else 0
    return max(1, _CHUNK_BYTES // (4 * v * max(exhaustive, swaps, m)))


def _map_chunks(f, blocks: jax.Array, chunk: int) -> jax.Array:
    """`f` over chunks of `chunk` blocks (zero-padded to whole chunks): `[B, ...]` -> `[B, 4]`."""
    total = blocks.shape[0]
    chunk = min(chunk, max(total, 1))
    count = -(-total // chunk)
    padded = jnp.pad(blocks, [(0, count * chunk - total)] + [(0, 0)] * (blocks.ndim - 1))
    out = lax.map(f, padded.reshape(count, chunk, *blocks.shape[1:]))
    return out.reshape(count * chunk, 4)[:total]
