"""Magnitude masks: N:M matches NMSparse.fromdense, unstructured keeps exactly k, jit/traced."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp
from jaxsparse import prune
from tests._check import DTYPES, keys, random_array
from tests.formats.test_nm import numpy_nm_mask


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
@pytest.mark.parametrize("in_features", [7, 16])
def test_nm_mask_matches_oracle_and_fromdense(n, m, in_features):
    w = random_array(keys(0, 1)[0], (in_features, 5))
    mask = prune.magnitude_mask(w, jsp.NM(n, m))
    assert mask.dtype == jnp.bool_ and mask.shape == w.shape
    np.testing.assert_array_equal(mask, numpy_nm_mask(w, n, m))
    np.testing.assert_array_equal(mask, jsp.NMSparse.fromdense(w, n=n, m=m).mask())


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (4, 8), (3, 7), (15, 16)])
def test_nm_mask_agrees_with_fromdense_on_zeros_infs_nans_and_ragged_groups(n, m):
    w = random_array(keys(3, 1)[0], (37, 6))
    w = w.at[0:4, 0].set(jnp.nan).at[5:9, 1].set(1.0).at[1, 2].set(-jnp.inf).at[:, 3].set(0.0)
    np.testing.assert_array_equal(prune.magnitude_mask(w, jsp.NM(n, m)),
                                  jsp.NMSparse.fromdense(w, n=n, m=m).mask())


def test_nm_mask_ties_keep_lower_position_and_batches():
    w = jnp.ones((8, 3))
    mask = prune.magnitude_mask(w, "2:4")
    np.testing.assert_array_equal(mask[:, 0], [1, 1, 0, 0, 1, 1, 0, 0])
    stack = random_array(keys(1, 1)[0], (3, 8, 4))
    got = prune.magnitude_mask(stack, "2:4")
    for b in range(3):
        np.testing.assert_array_equal(got[b], prune.magnitude_mask(stack[b], "2:4"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_masks_accept_every_float_dtype(dtype):
    w = random_array(keys(2, 1)[0], (12, 6), dtype)
    want = numpy_nm_mask(np.asarray(w, np.float32), 2, 4)
    np.testing.assert_array_equal(prune.magnitude_mask(w, "2:4"), want)
    assert int(prune.magnitude_mask(w, prune.Unstructured(0.25)).sum()) == 18


@pytest.mark.parametrize("density", [1.0, 0.5, 0.1, 0.01])
def test_unstructured_keeps_the_largest_k(density):
    w = random_array(keys(3, 1)[0], (2, 16, 10))
    mask = np.asarray(prune.magnitude_mask(w, prune.Unstructured(density)))
    k = round(density * w.size)
    assert mask.sum() == k
    a = np.abs(np.asarray(w))
    if 0 < k < w.size:
        assert a[mask].min() >= a[~mask].max()


def test_unstructured_ties_keep_lower_flat_index_exact_count():
    w = jnp.array([[1.0, -1.0], [1.0, 0.5]])
    np.testing.assert_array_equal(
        prune.magnitude_mask(w, prune.Unstructured(0.5)), [[True, True], [False, False]]
    )


def test_unstructured_density_may_be_traced():
    w = random_array(keys(4, 1)[0], (8, 8))
    f = jax.jit(lambda w, d: prune.magnitude_mask(w, prune.Unstructured(d)))
    for d in (0.25, 0.5, 0.75):
        np.testing.assert_array_equal(f(w, d), prune.magnitude_mask(w, prune.Unstructured(d)))
    # A concrete jax scalar is validated like a float.
    assert int(prune.magnitude_mask(w, prune.Unstructured(jnp.float32(0.5))).sum()) == 32


def test_masks_are_jittable():
    w = random_array(keys(5, 1)[0], (16, 8))
    f = jax.jit(prune.magnitude_mask, static_argnums=1)
    np.testing.assert_array_equal(f(w, jsp.NM(2, 4)), prune.magnitude_mask(w, "2:4"))
    # Equal up to the sums' order: XLA's fused reduction under jit adds in another order than
    # the eager one on some CPUs (one f32 ulp seen on a Zen 4).
    np.testing.assert_allclose(
        float(jax.jit(prune.nm_kept_magnitude, static_argnums=1)(w, jsp.NM(2, 4))),
        float(prune.nm_kept_magnitude(w, "2:4")), rtol=1e-6)


def test_nm_kept_magnitude():
    w = jnp.array([[4.0], [-1.0], [3.0], [2.0]])
    np.testing.assert_allclose(prune.nm_kept_magnitude(w, "2:4"), 0.7, rtol=1e-6)
    np.testing.assert_allclose(prune.nm_kept_magnitude(w, "1:4"), 0.4, rtol=1e-6)
    np.testing.assert_allclose(prune.nm_kept_magnitude(w, prune.Unstructured(1.0)), 1.0)
    assert float(prune.nm_kept_magnitude(jnp.zeros((4, 2)), "2:4")) == 1.0


def test_edge_shapes():
    assert prune.magnitude_mask(jnp.zeros((0, 3)), "2:4").shape == (0, 3)
    assert prune.magnitude_mask(jnp.zeros((4, 0)), "2:4").shape == (4, 0)
    assert prune.magnitude_mask(jnp.zeros((0,)), prune.Unstructured(0.5)).shape == (0,)
    np.testing.assert_array_equal(prune.magnitude_mask(jnp.ones((2, 3)), "2:4"), np.ones((2, 3)))
    np.testing.assert_array_equal(prune.magnitude_mask(jnp.ones((3, 1)), "2:4")[:, 0], [1, 1, 0])


def test_magnitude_masks_over_a_tree():
    params = {
        "a": {"kernel": random_array(keys(6, 1)[0], (8, 4)), "bias": jnp.ones(4)},
        "b": {"kernel": random_array(keys(7, 1)[0], (12, 2)), "scale": jnp.ones((4, 4))},
    }
    masks = prune.magnitude_masks(params, "2:4")
    assert masks["a"]["bias"] is None and masks["b"]["scale"] is None
    want = prune.magnitude_mask(params["a"]["kernel"], "2:4")
    np.testing.assert_array_equal(masks["a"]["kernel"], want)
    only_b = prune.magnitude_masks(params, prune.Unstructured(0.5), filter=r"^b/")
    assert only_b["a"]["kernel"] is None and only_b["b"]["scale"] is not None
    by_fn = prune.magnitude_masks(params, "1:4", filter=lambda path, leaf: path == "a/kernel")
    assert by_fn["b"]["kernel"] is None and int(by_fn["a"]["kernel"].sum()) == 8


def test_apply_masks():
    params = {"kernel": jnp.arange(1.0, 9.0).reshape(4, 2), "bias": jnp.ones(2)}
    masks = prune.magnitude_masks(params, "2:4")
    pruned = prune.apply_masks(params, masks)
    np.testing.assert_array_equal(pruned["kernel"], [[0, 0], [0, 0], [5, 6], [7, 8]])
    assert pruned["bias"] is params["bias"]
    with pytest.raises(ValueError, match="masks must have the tree structure of params"):
        prune.apply_masks(params, {"kernel": masks["kernel"]})


def test_bad_inputs():
    w = jnp.ones((8, 4))
    with pytest.raises(ValueError, match="pattern must be"):
        prune.magnitude_mask(w, "2-4")
    with pytest.raises(ValueError, match="pattern.*n must be in"):
        prune.magnitude_mask(w, jsp.NM(5, 4))
    with pytest.raises(ValueError, match=r"w must have at least 2 dimensions \(\[\.\.\., in, "):
        prune.magnitude_mask(jnp.ones(8), "2:4")
    with pytest.raises(TypeError, match="w must be a float array, got int32"):
        prune.magnitude_mask(jnp.ones((8, 4), jnp.int32), "2:4")
    with pytest.raises(ValueError, match="filter is not a valid regular expression"):
        prune.magnitude_masks({"kernel": w}, "2:4", filter="(")
    with pytest.raises(TypeError, match="filter must be None"):
        prune.magnitude_masks({"kernel": w}, "2:4", filter=3)
