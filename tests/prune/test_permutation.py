"""Channel permutations for N:M: search quality, same function after applying, validation."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp
from jaxsparse import prune
from tests._check import keys, random_array


def kept(w, pattern):
    return float(prune.nm_kept_magnitude(jnp.asarray(w, jnp.float32), pattern))


def mlp(params, x):
    h = jax.nn.relu(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


@pytest.mark.parametrize("pattern", ["2:4", "3:8"])
def test_two_layer_mlp_computes_the_same_function(pattern):
    k = keys(0, 5)
    params = {
        "w1": random_array(k[0], (12, 32)),
        "b1": random_array(k[1], (32,)),
        "w2": random_array(k[2], (32, 6)),
        "b2": random_array(k[3], (6,)),
    }
    x = random_array(k[4], (5, 12))
    result = prune.search_permutation(params["w2"], pattern, seed=1)
    assert isinstance(result, prune.PermutationResult)
    assert sorted(result.perm.tolist()) == list(range(32))
    w1, b1 = prune.permute_outputs(params["w1"], params["b1"], result.perm)
    permuted = dict(params, w1=w1, b1=b1, w2=prune.permute_inputs(params["w2"], result.perm))
    np.testing.assert_allclose(mlp(permuted, x), mlp(params, x), rtol=1e-5, atol=1e-5)
    # The reported fractions are the kept magnitude of the original and the permuted kernel.
    assert result.kept_after >= result.kept_before
    np.testing.assert_allclose(result.kept_before, kept(params["w2"], pattern), rtol=1e-5)
    np.testing.assert_allclose(result.kept_after, kept(permuted["w2"], pattern), rtol=1e-5)
    # So the N:M-pruned network keeps more magnitude, and still computes a permuted function.
    assert result.kept_after > result.kept_before


@pytest.mark.parametrize(
    "magnitudes, pattern, before, after",
    [
        ([10, 10, 10, 10, 1, 1, 1, 1], "2:4", 22 / 44, 40 / 44),
        ([10, 10, 1, 1, 1, 1, 1, 1], "1:4", 11 / 26, 20 / 26),
        ([9] * 6 + [1] * 10, "3:8", 30 / 64, 54 / 64),
        ([5, 5, 1, 1, 1, 1], "1:2", 7 / 14, 11 / 14),
    ],
)
def test_strictly_better_when_the_default_order_is_bad(magnitudes, pattern, before, after):
    signs = np.where(np.arange(3) % 2, -1.0, 1.0)
    w = np.asarray(magnitudes, np.float32)[:, None] * signs[None, :]
    result = prune.search_permutation(w, pattern)
    np.testing.assert_allclose(result.kept_before, before, rtol=1e-6)
    np.testing.assert_allclose(result.kept_after, after, rtol=1e-6)
    np.testing.assert_allclose(kept(w[result.perm], pattern), after, rtol=1e-6)


def best_split_of_8(w, pattern):
    """Exhaustive optimum over the 35 ways to split 8 inputs into two groups of 4."""
    best = 0.0
    for half in itertools.combinations(range(1, 8), 3):
        first = (0, *half)
        perm = list(first) + [i for i in range(8) if i not in first]
        best = max(best, kept(w[perm], pattern))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_finds_the_exhaustive_optimum_on_8_inputs(seed):
    w = np.asarray(random_array(keys(10 + seed, 1)[0], (8, 6)))
    result = prune.search_permutation(w, "2:4", seed=seed)
    np.testing.assert_allclose(result.kept_after, best_split_of_8(w, "2:4"), rtol=1e-6)


def test_deterministic_given_a_seed_and_a_real_improvement():
    w = np.asarray(random_array(keys(1, 1)[0], (64, 48)))
    a = prune.search_permutation(w, "2:4", seed=3, escape_attempts=20)
    b = prune.search_permutation(w, "2:4", seed=3, escape_attempts=20)
    np.testing.assert_array_equal(a.perm, b.perm)
    assert a.kept_after == b.kept_after and a.kept_before == b.kept_before
    assert a.kept_after > a.kept_before + 0.005
    assert a.perm.dtype == np.int32
    # No escapes, no rounds: the plain greedy result and the identity.
    greedy = prune.search_permutation(w, "2:4", escape_attempts=0)
    assert a.kept_before < greedy.kept_after <= a.kept_after + 1e-9
    none = prune.search_permutation(w, "2:4", max_rounds=0, escape_attempts=0)
    np.testing.assert_array_equal(none.perm, np.arange(64))
    assert none.kept_after == none.kept_before


def test_ragged_in_keeps_the_padding_at_the_end():
    w = np.asarray(random_array(keys(2, 1)[0], (10, 8)))
    result = prune.search_permutation(w, "2:4")
    assert sorted(result.perm.tolist()) == list(range(10))
    assert result.kept_after >= result.kept_before
    np.testing.assert_allclose(result.kept_after, kept(w[result.perm], "2:4"), rtol=1e-5)
    # The last group has 2 real inputs and keeps both: the two smallest rows belong elsewhere.
    w = np.ones((6, 3), np.float32) * np.array([5, 5, 5, 5, 1, 1], np.float32)[:, None]
    result = prune.search_permutation(w, "2:4")
    np.testing.assert_allclose(result.kept_before, 12 / 22, rtol=1e-6)
    np.testing.assert_allclose(result.kept_after, 20 / 22, rtol=1e-6)
    assert set(result.perm[4:].tolist()) <= {0, 1, 2, 3}
    # Already optimal: the identity comes back.
    w = np.ones((6, 3), np.float32) * np.array([1, 1, 5, 5, 5, 5], np.float32)[:, None]
    result = prune.search_permutation(w, "2:4")
    np.testing.assert_allclose(result.kept_after, 20 / 22, rtol=1e-6)
    np.testing.assert_array_equal(result.perm, np.arange(6))


def test_siblings_and_leading_dims_are_searched_jointly():
    k = keys(3, 2)
    a, b = random_array(k[0], (16, 5)), random_array(k[1], (2, 16, 3))
    joint = prune.search_permutation([a, b], "2:4")
    flat = np.concatenate([np.asarray(a), np.moveaxis(np.asarray(b), 1, 0).reshape(16, 6)], 1)
    assert prune.search_permutation(flat, "2:4").kept_after == joint.kept_after
    assert joint.kept_after >= joint.kept_before


def test_small_and_empty_inputs_give_the_identity():
    for shape in [(3, 4), (4, 4), (0, 4), (8, 0)]:
        result = prune.search_permutation(np.ones(shape, np.float32), "2:4")
        np.testing.assert_array_equal(result.perm, np.arange(shape[0]))
    zero = prune.search_permutation(np.zeros((8, 2), np.float32), "2:4")
    assert zero.kept_before == zero.kept_after == 1.0


def test_permute_outputs_and_inputs():
    kernel = jnp.arange(12.0).reshape(3, 4)
    perm = np.array([3, 1, 0, 2])
    k2, b2 = prune.permute_outputs(kernel, jnp.arange(4.0), perm)
    np.testing.assert_array_equal(k2, np.asarray(kernel)[:, perm])
    np.testing.assert_array_equal(b2, perm.astype(np.float32))
    k3, none = prune.permute_outputs(jnp.ones((2, 3, 4)), None, perm)
    assert none is None and k3.shape == (2, 3, 4)
    np.testing.assert_array_equal(
        prune.permute_inputs(kernel, [2, 0, 1]), np.asarray(kernel)[[2, 0, 1]]
    )
    # A PermutationResult is accepted; jit with a traced perm works.
    r = prune.PermutationResult(np.array([1, 0, 2], np.int32), 0.5, 0.5)
    np.testing.assert_array_equal(prune.permute_inputs(kernel, r), np.asarray(kernel)[[1, 0, 2]])
    jitted = jax.jit(prune.permute_inputs)(kernel, jnp.array([2, 1, 0]))
    np.testing.assert_array_equal(jitted, np.asarray(kernel)[::-1])


@pytest.mark.parametrize(
    "perm, error, match",
    [
        ([0, 1], ValueError, r"perm must be a 1-D permutation of length 3 .*got shape \(2,\)"),
        ([0, 1, 2, 3], ValueError, r"length 3 .*got shape \(4,\)"),
        ([[0, 1, 2]], ValueError, r"1-D permutation of length 3"),
        ([0, 0, 2], ValueError, r"permutation of range\(3\) .*repeated entries \[0\]"),
        ([0, 1, 3], ValueError, r"permutation of range\(3\) .*out-of-range entries \[3\]"),
        ([0, -1, 2], ValueError, r"out-of-range entries \[-1\]"),
        ([0.0, 1.0, 2.0], TypeError, r"perm must be an integer array, got float32"),
        ("abc", TypeError, r"perm must be an array"),
    ],
)
def test_bad_permutations(perm, error, match):
    with pytest.raises(error, match=match):
        prune.permute_inputs(jnp.ones((3, 5)), perm)
    with pytest.raises(error, match=match.replace("length 3", "length 3").replace("in", "in")):
        prune.permute_outputs(jnp.ones((5, 3)), None, perm)


def test_bad_arguments():
    with pytest.raises(ValueError, match="bias must have last dimension out = 3; got shape"):
        prune.permute_outputs(jnp.ones((5, 3)), jnp.ones(4), [0, 1, 2])
    with pytest.raises(ValueError, match=r"kernel must have at least 2 dimensions"):
        prune.permute_inputs(jnp.ones(3), [0, 1, 2])
    w = np.ones((8, 4), np.float32)
    with pytest.raises(ValueError, match="pattern must be an N:M pattern"):
        prune.search_permutation(w, prune.Unstructured(0.5))
    with pytest.raises(ValueError, match="V:N:M is not searched: its group score couples"):
        prune.search_permutation(w, jsp.VNM(16, 2, 8))
    with pytest.raises(ValueError, match="pattern must be"):
        prune.search_permutation(w, "2-4")
    with pytest.raises(ValueError, match="n must be in"):
        prune.search_permutation(w, jsp.NM(5, 4))
    with pytest.raises(ValueError, match=r"same in .*w\[0\] has 8, w\[1\] has 4"):
        prune.search_permutation([w, w[:4]], "2:4")
    with pytest.raises(ValueError, match="w must be finite"):
        prune.search_permutation(np.full((8, 4), np.nan, np.float32), "2:4")
    with pytest.raises(TypeError, match="w must be a float array"):
        prune.search_permutation(np.ones((8, 4), np.int32), "2:4")
    with pytest.raises(ValueError, match="escape_attempts must be in"):
        prune.search_permutation(w, "2:4", escape_attempts=-1)
    with pytest.raises(TypeError, match="seed must be an int"):
        prune.search_permutation(w, "2:4", seed=1.5)
    with pytest.raises(TypeError, match="concrete array"):
        jax.jit(lambda w: prune.search_permutation(w, "2:4").kept_after)(w)


@pytest.mark.parametrize("n,m", [(1, 2), (1, 4), (3, 4), (5, 8), (1, 16), (15, 16)])
def test_gain_table_is_exact_for_any_nm(n, m):
    """The search's running score (a sum of table gains) equals the exact kept-magnitude change."""
    from jaxsparse.prune import _permutation as P

    in_features = 3 * m + 1  # ragged: the padding is pinned
    a = np.abs(np.asarray(random_array(keys(20 + m, 1)[0], (in_features, 7)), np.float64))
    padded = np.zeros((4 * m, 7))
    padded[:in_features] = a
    search = P._Search(padded, in_features, n, m, seed=0)
    perm = search.run(max_rounds=50, escape_attempts=5)
    assert sorted(perm.tolist()) == list(range(4 * m))
    assert np.all(perm[in_features:] == np.arange(in_features, 4 * m))
    exact = P._kept(padded, search.perm, n, m) - P._kept(padded, np.arange(4 * m), n, m)
    np.testing.assert_allclose(search.score, exact, rtol=1e-4, atol=1e-4)
    assert P._kept(padded, perm, n, m) >= P._kept(padded, np.arange(4 * m), n, m)
