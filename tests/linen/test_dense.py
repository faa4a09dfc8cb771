"""jaxsparse.linen.SparseDense: variables, equivalence with the masked nn.Dense (forward and
gradients under jit), mixed precision, training with optax over params, and bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import jaxsparse as jsp
from jaxsparse.linen import SparseDense, SparsityIndices
from jaxsparse.prune import Unstructured
from tests._check import assert_close, scale_for


def normal(seed, shape, dtype=jnp.float32):
    """Test data from NumPy's generator (jax.random would compile a sampler for every shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def masked_dense_variables(variables):
    """The nn.Dense variables holding the SparseDense kernel, zeros in place."""
    box = variables["sparsity"]["indices"]
    ws = jsp.NMSparse(
        variables["params"]["values"],
        box.value,
        n=box.pattern.n,
        m=box.pattern.m,
        in_features=box.in_features,
    )
    params = {"kernel": ws.todense()}
    if "bias" in variables["params"]:
        params["bias"] = variables["params"]["bias"]
    return {"params": params}, ws


def test_fresh_layer_is_the_magnitude_pruned_fresh_dense():
    x, key = jnp.ones((1, 12)), jax.random.key(4)
    sparse = SparseDense(5, sparsity=jsp.NM(2, 4)).init(key, x)
    dense = nn.Dense(5).init(key, x)
    ws = jsp.NMSparse.fromdense(dense["params"]["kernel"], n=2, m=4)
    np.testing.assert_array_equal(np.asarray(sparse["params"]["values"]), np.asarray(ws.values))
    np.testing.assert_array_equal(
        np.asarray(sparse["sparsity"]["indices"].value), np.asarray(ws.indices)
    )


def test_variables_collections_shapes_and_dtypes():
    variables = SparseDense(6, sparsity="2:4").init(jax.random.key(0), jnp.ones((2, 10)))
    assert set(variables) == {"params", "sparsity"}
    assert set(variables["params"]) == {"values", "bias"}
    box = variables["sparsity"]["indices"]
    assert isinstance(box, SparsityIndices)
    assert box.pattern == jsp.NM(2, 4) and box.in_features == 10
    assert variables["params"]["values"].shape == box.value.shape == (6, 6)
    assert variables["params"]["values"].dtype == jnp.float32 and box.value.dtype == jnp.uint8
    # The boxes' metadata is static: one leaf each, the uint8 arrays (positions, and the same at
    # 2 bits: 6 kept per row in 2 bytes).
    assert [x.dtype for x in jax.tree.leaves(variables["sparsity"])] == [jnp.uint8] * 2
    assert variables["sparsity"]["indices_2bit"].value.shape == (6, 2)
    no_bias = SparseDense(3, sparsity="1:4", use_bias=False).init(
        jax.random.key(0), jnp.ones((1, 8))
    )
    assert set(no_bias["params"]) == {"values"}


@pytest.mark.parametrize(
    "in_features,features,pattern,use_bias", [(16, 8, "2:4", True), (10, 6, "2:4", False)]
)
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_forward_and_gradients_equal_the_masked_dense(
    in_features, features, pattern, use_bias, compute
):
    dtype = None if compute == "float32" else jnp.bfloat16
    out_dtype = jnp.float32 if dtype is None else jnp.bfloat16
    x = normal(110, (2, 3, in_features))
    cot = normal(111, (2, 3, features))
    sparse = SparseDense(features, sparsity=pattern, use_bias=use_bias, dtype=dtype)
    dense = nn.Dense(features, use_bias=use_bias, dtype=dtype)
    variables = jax.jit(sparse.init)(jax.random.key(0), x)
    if use_bias:
        variables["params"]["bias"] = normal(112, (features,))
    dense_variables, ws = masked_dense_variables(variables)

    def outputs_and_grads(params, rest, x, module_is_sparse):
        module = sparse if module_is_sparse else dense

        def loss(params, x):
            y = module.apply({"params": params, **rest}, x)
            return jnp.sum(y.astype(jnp.float32) * cot), y

        (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return y, grads

    outputs_and_grads = jax.jit(outputs_and_grads, static_argnums=3)
    y_s, (g_s, gx_s) = outputs_and_grads(
        variables["params"], {"sparsity": variables["sparsity"]}, x, True
    )
    y_d, (g_d, gx_d) = outputs_and_grads(dense_variables["params"], {}, x, False)
    assert y_s.dtype == y_d.dtype == out_dtype
    assert_close(y_s, y_d, out_dtype, scale=scale_for(in_features))
    assert_close(gx_s, gx_d, out_dtype, scale=scale_for(features))
    assert g_s["values"].dtype == jnp.float32
    assert_close(
        ws.replace(values=g_s["values"]).todense(),
        jnp.where(ws.mask(), g_d["kernel"], 0),
        out_dtype,
        scale=scale_for(6),
    )
    if use_bias:
        assert_close(g_s["bias"], g_d["bias"], out_dtype, scale=scale_for(6))


def test_optax_over_params_trains_values_and_bias_and_positions_stay():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(SparseDense(16, sparsity="2:4", name="fc1")(x))
            return SparseDense(2, sparsity="1:4", name="fc2")(x)

    model, x, t = MLP(), normal(12, (4, 8)), jnp.ones((4, 2))
    variables = model.init(jax.random.key(0), x)
    params, positions = variables["params"], variables["sparsity"]
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    mu_paths = {
        tuple(k.key for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(opt_state[0].mu)[0]
    }
    assert mu_paths == {("fc1", "values"), ("fc1", "bias"), ("fc2", "values"), ("fc2", "bias")}
    positions_before = jax.tree.map(np.copy, positions)
    params_before = jax.tree.map(np.copy, params)

    @jax.jit
    def step(params, opt_state):
        def loss(params):
            return jnp.mean((model.apply({"params": params, "sparsity": positions}, x) - t) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    losses = []
    for _ in range(5):
        params, opt_state, value = step(params, opt_state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    assert all(
        jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), params, params_before))
    )
    jax.tree.map(np.testing.assert_array_equal, positions, positions_before)


def test_unboxed_indices_are_accepted():
    layer = SparseDense(4, sparsity="2:4")
    x = jnp.ones((2, 8))
    variables = layer.init(jax.random.key(0), x)
    np.testing.assert_array_equal(
        layer.apply(nn.meta.unbox(variables), x), layer.apply(variables, x)
    )


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "spec,err,match",
    [
        ("2-4", ValueError, "sparsity must be"),
        ("2:4:8", ValueError, r"v must be in \[16, 256\]"),  # A V:N:M string, v too small.
        (0.5, TypeError, "sparsity must be"),
        ("4:4", ValueError, "n must be in"),
        (Unstructured(0.5), ValueError, "no compressed format"),
    ],
)
def test_unknown_or_invalid_sparsity(spec, err, match):
    with pytest.raises(err, match=match) as info:
        SparseDense(4, sparsity=spec).init(jax.random.key(0), jnp.ones((1, 8)))
    assert "jaxsparse.linen.SparseDense" in str(info.value)


def test_bad_arguments_and_state():
    with pytest.raises(TypeError, match="sparsity"):
        SparseDense(4)  # keyword-only and required
    with pytest.raises(ValueError, match=r"in_features=3, out_features=4: in=3 < m=4"):
        SparseDense(4, sparsity="2:4").init(jax.random.key(0), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="dot_general and dot_general_cls must be None"):
        SparseDense(4, sparsity="2:4", dot_general=jax.lax.dot_general).init(
            jax.random.key(0), jnp.ones((1, 8))
        )
    layer, x = SparseDense(4, sparsity="2:4"), jnp.ones((1, 8))
    variables = layer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="no sparsity/indices: pass the whole variable dict"):
        layer.apply({"params": variables["params"]}, x)
    other = dataclasses.replace(variables["sparsity"]["indices"], pattern=jsp.NM(1, 2))
    with pytest.raises(
        ValueError,
        match=r"made for pattern 1:2 with in_features=8; this layer is "
        r"2:4 with in_features=8",
    ):
        layer.apply({**variables, "sparsity": {**variables["sparsity"], "indices": other}}, x)
    wrong_dtype = nn.meta.unbox(variables)
    wrong_dtype["sparsity"]["indices"] = wrong_dtype["sparsity"]["indices"].astype(jnp.int32)
    with pytest.raises(TypeError, match="indices must have dtype uint8; got int32"):
        layer.apply(wrong_dtype, x)


def test_a_1xn_spec_with_shards_gives_a_balanced_weight():
    spec = jsp.Blocks(16, 0.25, shards=4)  # Column parallel over 4 devices (or 2).
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 32)), jnp.float32)
    layer = SparseDense(128, sparsity=spec)
    variables = layer.init(jax.random.key(1), x)
    box = variables["sparsity"]["indptr"]
    assert box.pattern == spec
    np.testing.assert_array_equal(np.diff(np.asarray(box.value)[::2]), [16] * 4)
    weight = jsp.BlocksSparse(variables["params"]["values"], variables["sparsity"]["indices"].value,
                              box.value, **spec._asdict(), in_features=32, out_features=128)
    want = x @ weight.todense() + variables["params"]["bias"]
    assert_close(layer.apply(variables, x), want, jnp.float32, scale_for(32))
    with pytest.raises(ValueError, match=r"multiple of n\*shards=64"):
        SparseDense(96, sparsity=spec).init(jax.random.key(1), x)
