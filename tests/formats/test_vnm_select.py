"""select_columns, the 4 columns of every V:N:M block: VENOM's exhaustive rule against a brute-force
oracle, the fast rule's quality, padding, batch dims, jit, vmap and chunking, validation.

Most tests use blocks of the shape BLOCKS + (m,): equal shapes share one compilation."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.formats import _vnm_select
from jaxsparse.formats._vnm_select import select_columns

BLOCKS, V = 32, 8  # blocks per test batch, rows per block


def oracle_scores(score, n):
    """Brute force: every quad (itertools order, i.e. lexicographic) and its block scores.

    Args:
        score: `[B, V, M]` float.
        n: 1 or 2.

    Returns:
        `quads [C(M, 4), 4]` int and `scores [B, C(M, 4)]` float32.
    """
    score = np.asarray(score, np.float32)
    quads = np.array(list(itertools.combinations(range(score.shape[-1]), 4)))
    chosen = [score[..., quads[:, i]] for i in range(4)]  # 4 x [B, V, C]
    if n == 1:
        per_row = functools.reduce(np.maximum, chosen)
    else:  # the sum of the 2 largest of 4 is the largest sum of a pair
        pair_sums = (a + b for a, b in itertools.combinations(chosen, 2))
        per_row = functools.reduce(np.maximum, pair_sums)
    return quads, per_row.sum(axis=1)


def oracle(score, n):
    """VENOM's rule: the best quad, the lexicographically smallest among equals (first argmax)."""
    quads, scores = oracle_scores(score, n)
    return quads[np.argmax(scores, axis=1)]


def scores_of(score, n, chosen):
    """The oracle's scores of the `chosen [B, 4]` quads, and the best scores: two `[B]`."""
    quads, scores = oracle_scores(score, n)
    index = {q: i for i, q in enumerate(map(tuple, quads.tolist()))}
    rows = [index[q] for q in map(tuple, np.asarray(chosen).tolist())]
    return scores[np.arange(len(rows)), rows], scores.max(axis=1)


def integer_scores(seed, shape, high):
    # Small integers: float32 sums are exact in any order, and ties are frequent and real.
    return np.random.default_rng(seed).integers(0, high, shape).astype(np.float32)


def normal_scores(seed, m):
    return np.abs(np.random.default_rng(seed).standard_normal((BLOCKS, V, m))).astype(np.float32)


def repeat(block):
    """One `[V, m]` block, BLOCKS times."""
    return np.broadcast_to(np.asarray(block, np.float32), (BLOCKS, V, np.shape(block)[-1]))


@pytest.mark.parametrize("m", [4, 5, 7, 8, 12, 16, 20])
@pytest.mark.parametrize("n", [1, 2])
def test_exhaustive_rule_matches_the_brute_force_oracle(m, n):
    # Half the blocks in {0, 1, 2} (many ties), half in 0..99.
    score = np.concatenate([
        integer_scores(m, (BLOCKS // 2, V, m), 3),
        integer_scores(m + 100, (BLOCKS // 2, V, m), 100),
    ])
    got = np.asarray(select_columns(jnp.asarray(score), n))
    np.testing.assert_array_equal(got, oracle(score, n))
    assert got.dtype == np.uint8


@pytest.mark.parametrize("n", [1, 2])
def test_exhaustive_rule_with_a_single_row_and_real_valued_scores(n):
    score = integer_scores(7, (20, 1, 9), 4)
    np.testing.assert_array_equal(select_columns(score, n), oracle(score, n))
    # Real values: sums in another order may break near-ties otherwise; compare the scores.
    score = normal_scores(1, 12)
    got, best = scores_of(score, n, select_columns(score, n))
    np.testing.assert_allclose(got, best, rtol=1e-6)


@pytest.mark.parametrize("m", [8, 16, 20])
@pytest.mark.parametrize("n", [1, 2])
def test_real_valued_ties_go_to_the_lexicographically_smallest_quad(m, n):
    # n + 1 dominant columns make every row's n largest; the 4th column is free: all quads holding
    # the dominant ones tie exactly, whatever the order of the sum over the rows.
    score = normal_scores(9, m)
    rng = np.random.default_rng(10)
    for block in score:
        block[:, rng.choice(m, n + 1, replace=False)] += 10.0
    np.testing.assert_array_equal(select_columns(score, n), oracle(score, n))


@pytest.mark.parametrize("m", [5, 16, 32])
@pytest.mark.parametrize("n", [1, 2])
def test_ties_go_to_the_lexicographically_smallest_quad(m, n):
    equal = repeat(np.full((V, m), 0.5))
    np.testing.assert_array_equal(select_columns(equal, n), [[0, 1, 2, 3]] * BLOCKS)
    # Only the last column counts (for n = 1 and n = 2): the first three fill the quad.
    last = np.zeros((V, m))
    last[:, -1] = 7.0
    np.testing.assert_array_equal(select_columns(repeat(last), n), [[0, 1, 2, m - 1]] * BLOCKS)


def test_n_changes_the_choice():
    # Row 0 wants 1 and 3 (5 + 4), row 1 wants 5 (9) and then 2 (2): only n = 2 keeps the 2.
    rows = [[0, 5, 1, 4, 0, 3, 0, 0], [0, 0, 2, 0, 1, 9, 0, 0]]
    score = repeat(rows * (V // 2))
    np.testing.assert_array_equal(select_columns(score, n=2), [[1, 2, 3, 5]] * BLOCKS)
    np.testing.assert_array_equal(select_columns(score, n=1), [[0, 1, 2, 5]] * BLOCKS)


@pytest.mark.parametrize("n", [1, 2])
def test_fast_rule_is_close_to_the_optimum(n):
    m = 32
    score = normal_scores(2, m)
    chosen = np.asarray(select_columns(score, n))
    assert np.all(np.diff(chosen.astype(int), axis=1) > 0) and chosen.max() < m
    got, best = scores_of(score, n, chosen)
    assert np.all(got <= best * (1 + 1e-6))
    # Measured on this data: total 0.9997 (n=1) and 1.0 (n=2), worst block 0.990 (n=1).
    assert got.sum() / best.sum() >= 0.998
    assert np.min(got / best) >= 0.95
    assert np.mean(got >= best * (1 - 1e-6)) >= 0.8


def test_fast_rule_output_is_ascending_and_in_range():
    m = 64
    chosen = np.asarray(select_columns(normal_scores(m, m), 1))
    assert chosen.shape == (BLOCKS, 4) and chosen.dtype == np.uint8
    assert np.all(np.diff(chosen.astype(int), axis=1) > 0) and chosen.max() < m


@pytest.mark.parametrize("m", [8, 32])
@pytest.mark.parametrize("n", [1, 2])
def test_real_zeros_beat_padding(m, n):
    # A ragged last group: real columns 0..5, padding (-1) after. Columns 3..5 are real zeros:
    # only 0..2 ever count, yet the 4th column must be real, the lowest: 3.
    score = np.full((V, m), -1.0)
    score[:, :6] = 0.0
    score[:, :3] = integer_scores(3, (V, 3), 10) + 1
    np.testing.assert_array_equal(select_columns(repeat(score), n), [[0, 1, 2, 3]] * BLOCKS)


@pytest.mark.parametrize("m", [8, 32])
@pytest.mark.parametrize("n", [1, 2])
def test_few_real_columns_take_the_lowest_padding(m, n):
    for real in (1, 2, 3):
        score = np.full((V, m), -1.0)
        score[:, :real] = integer_scores(real, (V, real), 4)
        np.testing.assert_array_equal(select_columns(repeat(score), n), [[0, 1, 2, 3]] * BLOCKS)


@pytest.mark.parametrize("n", [1, 2])
def test_fast_rule_never_picks_padding_while_real_columns_remain(n):
    m, real = 32, 25
    score = normal_scores(4, m)
    score[..., 10:real] = 0.0  # real zeros: in no row's n largest, like padding
    score[..., real:] = -1.0
    chosen = np.asarray(select_columns(score, n))
    assert chosen.max() < real


def test_batch_dims_jit_and_vmap():
    score = integer_scores(5, (2, BLOCKS // 2, V, 8), 50)
    flat = oracle(score.reshape(BLOCKS, V, 8), 2)
    batched = select_columns(jnp.asarray(score), 2)
    assert batched.shape == (2, BLOCKS // 2, 4) and batched.dtype == jnp.uint8
    np.testing.assert_array_equal(batched, flat.reshape(2, BLOCKS // 2, 4))
    np.testing.assert_array_equal(jax.jit(select_columns, static_argnums=1)(score, 2), batched)
    np.testing.assert_array_equal(jax.vmap(lambda s: select_columns(s, 2))(score), batched)


@pytest.mark.parametrize("chunk", [1, 4])
def test_chunks_give_the_same_quads(chunk):
    # 6 blocks in chunks of 1, and of 4 (the last chunk padded with zero blocks).
    score = integer_scores(8, (6, 7, 4), 50)  # internal layout [blocks, m, v]
    chunked = jax.jit(lambda s: _vnm_select._map_chunks(
        lambda c: _vnm_select._select_chunk(c, 2), s, chunk))(score)
    np.testing.assert_array_equal(chunked, oracle(np.swapaxes(score, 1, 2), 2))


def test_bfloat16_scores_and_empty_batch():
    score = integer_scores(6, (BLOCKS, V, 8), 20)  # integers up to 256 are exact in bfloat16
    np.testing.assert_array_equal(
        select_columns(jnp.asarray(score, jnp.bfloat16), 1), oracle(score, 1)
    )
    assert select_columns(jnp.zeros((0, V, 8)), 2).shape == (0, 4)


@pytest.mark.parametrize(
    "shape,n,match",
    [
        ((4, 8), 3, "n must be"),
        ((4, 8), True, "n must be"),
        ((4, 3), 2, "4 <= m <= 64"),
        ((4, 65), 2, "4 <= m <= 64"),
        ((257, 8), 2, "v <= 256"),
        ((8,), 2, r"\[\.\.\., v, m\]"),
    ],
)
def test_validation(shape, n, match):
    with pytest.raises(ValueError, match=match):
        select_columns(jnp.zeros(shape), n)


def test_integer_scores_are_refused():
    with pytest.raises(TypeError, match="float"):
        select_columns(jnp.zeros((4, 8), jnp.int32), 2)
