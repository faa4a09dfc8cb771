"""jaxsparse.linen.sparsify / densify on the variables of a small MLP written with nn.Dense (dense
model) and SparseDense of the same names (sparse model)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.core import FrozenDict

import jaxsparse as jsp
from jaxsparse.linen import SparseDense, SparsityIndices, densify, sparsify
from jaxsparse.prune import Unstructured
from tests._check import assert_close, scale_for


def normal(seed, shape, dtype=jnp.float32):
    """Test data from NumPy's generator (jax.random would compile a sampler for every shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


class MLP(nn.Module):
    """fc1, fc2 sparse in the sparse model; `tiny` (in=2 < m=4) stays nn.Dense in both."""

    sparsity: object = None

    @nn.compact
    def __call__(self, x):
        def layer(features, name):
            if self.sparsity is None:
                return nn.Dense(features, name=name)
            return SparseDense(features, sparsity=self.sparsity, name=name)

        x = nn.relu(layer(16, "fc1")(x))
        x = nn.LayerNorm(name="norm")(x)
        x = layer(2, "fc2")(x)
        return nn.Dense(3, name="tiny")(x)


X = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8)), jnp.float32)


@pytest.fixture(scope="module")
def dense_variables():
    return MLP().init(jax.random.key(0), X)


def copy(tree):
    return jax.tree.map(np.copy, tree)


def assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_sparsify_matches_the_sparse_model_and_logs(dense_variables, caplog):
    before = copy(dense_variables)
    with caplog.at_level(logging.INFO, logger="jaxsparse"):
        sparse = sparsify(dense_variables, "2:4")
    assert_tree_equal(dense_variables, before)  # the argument is untouched
    # Same structure as the sparse model's own init, and the same values (pruned from the same
    # draw: module names fix the rngs).
    fresh = MLP(sparsity="2:4").init(jax.random.key(0), X)
    assert_tree_equal(sparse, fresh)
    assert isinstance(sparse["sparsity"]["fc1"]["indices"], SparsityIndices)
    assert sparse["sparsity"]["fc1"]["indices"].in_features == 8
    assert set(sparse["params"]["tiny"]) == {"kernel", "bias"}
    text = caplog.text
    assert "replaced fc1 (Dense kernel (8, 16)) with SparseDense 2:4" in text
    assert "skipped tiny (Dense kernel (2, 3)): in=2 < m=4" in text
    assert "2 layer(s) replaced, 1 skipped" in text
    # The sparse model computes the dense model with masked kernels.
    masked = densify(sparse)
    assert_close(
        jax.jit(MLP(sparsity="2:4").apply)(sparse, X),
        MLP().apply(masked, X),
        jnp.float32,
        scale=scale_for(16),
    )


def test_densify_is_the_inverse_on_kept_values(dense_variables, caplog):
    sparse = sparsify(dense_variables, jsp.NM(1, 4))
    before = copy(sparse)
    with caplog.at_level(logging.INFO, logger="jaxsparse"):
        dense = densify(sparse)
    assert "replaced fc2 (SparseDense 1:4) with Dense kernel (16, 2)" in caplog.text
    assert_tree_equal(sparse, before)
    assert "sparsity" not in dense
    assert jax.tree.structure(dense) == jax.tree.structure(dense_variables)
    mask = np.asarray(
        jsp.NMSparse.fromdense(dense_variables["params"]["fc1"]["kernel"], n=1, m=4).mask()
    )
    np.testing.assert_array_equal(
        np.asarray(dense["params"]["fc1"]["kernel"]),
        np.where(mask, dense_variables["params"]["fc1"]["kernel"], 0),
    )
    assert_close(
        MLP().apply(dense, X),
        MLP(sparsity="1:4").apply(sparse, X),
        jnp.float32,
        scale=scale_for(16),
    )
    # Sparsifying the densified tree finds the same positions again.
    assert_tree_equal(sparsify(dense, "1:4"), sparse)


def test_frozen_dicts_stay_frozen_and_filters_select(dense_variables, caplog):
    frozen = FrozenDict(dense_variables)
    with caplog.at_level(logging.INFO, logger="jaxsparse"):
        only_fc2 = sparsify(frozen, "2:4", filter="fc2$")
    assert isinstance(only_fc2, FrozenDict)
    assert set(only_fc2["params"]["fc1"]) == {"kernel", "bias"}
    assert set(only_fc2["params"]["fc2"]) == {"values", "bias"}
    assert "skipped fc1 (Dense kernel (8, 16)): excluded by filter" in caplog.text
    by_predicate = sparsify(
        dense_variables,
        "2:4",
        filter=lambda path, layer: path in ("fc1", "fc2") and layer["kernel"].shape[1] > 8,
    )
    assert set(by_predicate["params"]["fc1"]) == {"values", "bias"}
    assert set(by_predicate["params"]["fc2"]) == {"kernel", "bias"}
    assert isinstance(densify(only_fc2), FrozenDict)


def test_bad_input(dense_variables):
    with pytest.raises(ValueError, match=r"jaxsparse.linen.sparsify: .*sparsity must be"):
        sparsify(dense_variables, "2/4")
    with pytest.raises(ValueError, match="no compressed format"):
        sparsify(dense_variables, Unstructured(0.5))
    with pytest.raises(ValueError, match="method must be 'magnitude', a callable"):
        sparsify(dense_variables, "2:4", method="obs")
    with pytest.raises(ValueError, match="allows at most 2"):
        sparsify(dense_variables, "2:4", method=lambda w, p: jnp.ones(w.shape, bool))
    with pytest.raises(ValueError, match="with a 'params' collection"):
        sparsify(dense_variables["params"], "2:4")
    sparse = sparsify(dense_variables, "2:4")
    with pytest.raises(
        TypeError,
        match=r"sparsity/fc1/indices must be a "
        r"jaxsparse.linen.SparsityIndices box",
    ):
        densify(nn.meta.unbox(sparse))
    del sparse["params"]["fc2"]["values"]
    with pytest.raises(ValueError, match="sparsity/fc2/indices has no params/fc2/values"):
        densify(sparse)
