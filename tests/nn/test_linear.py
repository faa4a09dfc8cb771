"""jaxsparse.nn.SparseLinear: state types, equivalence with the masked dense layer (forward and
gradients, eager and jit), mixed precision, from_dense / to_dense, training, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxsparse as jsp
from jaxsparse.nn import SparseLinear, SparsityIndices
from jaxsparse.prune import Unstructured
from tests._check import assert_close, scale_for


def normal(seed, shape, dtype=jnp.float32):
    """Test data from NumPy's generator (jax.random would compile a sampler for every shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def as_bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize]) if a.dtype.kind == "f" else a


def paths(state):
    return sorted(path for path, _ in nnx.to_flat_state(state))


def assert_bit_equal(a, b):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(as_bits(a), as_bits(b))


def test_fresh_layer_is_the_magnitude_pruned_fresh_linear():
    layer = SparseLinear(12, 5, sparsity=jsp.NM(2, 4), rngs=nnx.Rngs(3))
    dense = nnx.Linear(12, 5, rngs=nnx.Rngs(3))
    ws = jsp.NMSparse.fromdense(dense.kernel[...], n=2, m=4)
    assert_bit_equal(layer.values[...], ws.values)
    assert_bit_equal(layer.indices[...], ws.indices)
    assert_bit_equal(layer.bias[...], dense.bias[...])


def test_state_types_shapes_and_dtypes():
    layer = SparseLinear(10, 6, sparsity="2:4", rngs=nnx.Rngs(0))  # ragged: 10 = 2 groups + 2
    assert isinstance(layer.values, nnx.Param) and not isinstance(layer.indices, nnx.Param)
    assert isinstance(layer.indices, SparsityIndices) and isinstance(layer.bias, nnx.Param)
    assert layer.values.shape == layer.indices.shape == (6, 3 * 2)
    assert layer.values[...].dtype == jnp.float32 and layer.indices[...].dtype == jnp.uint8
    assert layer.sparsity == jsp.NM(2, 4) and layer.in_features == 10
    params = nnx.state(layer, nnx.Param)
    assert paths(params) == [("bias",), ("values",)]
    assert paths(nnx.state(layer, SparsityIndices)) == [("indices",), ("indices_2bit",)]
    assert layer.indices_2bit.shape == (6, 2) and layer.indices_2bit[...].dtype == jnp.uint8
    assert layer.weight.shape == (10, 6) and layer.weight.pattern == jsp.NM(2, 4)
    no_bias = SparseLinear(8, 3, sparsity="1:4", use_bias=False, rngs=nnx.Rngs(0))
    assert no_bias.bias is None and no_bias.values.shape == (3, 2)


def _outputs_and_grads(model, x, cot):
    def loss(model, x):
        y = model(x)
        return jnp.sum(y.astype(jnp.float32) * cot), y

    (_, y), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    return y, grads


@pytest.mark.parametrize(
    "in_features,out_features,pattern,use_bias,use_jit",
    # A ragged `in` (10 = 2 groups of 4 + 2), without bias, and one eager run.
    [(16, 8, "2:4", True, True), (10, 6, "2:4", False, True), (16, 8, "2:4", True, False)],
)
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_forward_and_gradients_equal_the_masked_dense_layer(
    in_features, out_features, pattern, use_bias, compute, use_jit
):
    # f32: tight tolerance; bf16 compute over f32 parameters: bf16 tolerance.
    dtype = None if compute == "float32" else jnp.bfloat16
    out_dtype = jnp.float32 if dtype is None else jnp.bfloat16
    layer = SparseLinear(
        in_features,
        out_features,
        sparsity=pattern,
        use_bias=use_bias,
        dtype=dtype,
        rngs=nnx.Rngs(0),
    )
    if use_bias:  # a non-zero bias, so its gradient path and promotion are exercised
        layer.bias.set_value(normal(12, (out_features,)))
    dense = layer.to_dense()
    assert isinstance(dense, nnx.Linear) and dense.dtype == dtype
    x = normal(10, (2, 3, in_features))
    cot = normal(11, (2, 3, out_features))
    run = nnx.jit(_outputs_and_grads) if use_jit else _outputs_and_grads

    y_sparse, (g_layer, g_x_s) = run(layer, x, cot)
    y_dense, (g_dense, g_x_d) = run(dense, x, cot)
    assert y_sparse.dtype == y_dense.dtype == out_dtype
    assert_close(y_sparse, y_dense, out_dtype, scale=scale_for(in_features))
    assert_close(g_x_s, g_x_d, out_dtype, scale=scale_for(out_features))
    # Gradients of the kept values are the dense kernel gradient at the kept positions.
    assert g_layer["values"][...].dtype == jnp.float32  # f32 params, whatever the compute dtype
    assert "indices" not in g_layer
    g_values = layer.weight.replace(values=g_layer["values"][...])
    assert_close(
        g_values.todense(),
        jnp.where(layer.weight.mask(), g_dense["kernel"][...], 0),
        out_dtype,
        scale=scale_for(6),
    )
    if use_bias:
        assert_close(g_layer["bias"][...], g_dense["bias"][...], out_dtype, scale=scale_for(6))


def test_preferred_element_type_gives_f32_results_from_bf16_operands():
    layer = SparseLinear(
        16,
        8,
        sparsity="2:4",
        dtype=jnp.bfloat16,
        preferred_element_type=jnp.float32,
        rngs=nnx.Rngs(0),
    )
    x = normal(2, (3, 16))
    y = layer(x)
    assert y.dtype == jnp.float32
    # The exact f32 sum of the bf16 products:
    xb = x.astype(jnp.bfloat16).astype(jnp.float32)
    kb = layer.weight.todense().astype(jnp.bfloat16).astype(jnp.float32)
    want = jnp.dot(xb, kb, precision=jax.lax.Precision.HIGHEST)
    assert_close(y, want, jnp.float32, scale=scale_for(16))


def test_higher_rank_inputs_and_a_single_vector():
    layer = SparseLinear(16, 8, sparsity="2:4", rngs=nnx.Rngs(0))
    dense = layer.to_dense()
    call = nnx.jit(lambda m, x: m(x))
    for shape in [(16,), (2, 1, 3, 16)]:
        x = normal(3, shape)
        assert call(layer, x).shape == (*shape[:-1], 8)
        assert_close(call(layer, x), dense(x), jnp.float32, scale=scale_for(16))


def test_from_dense_linear_keeps_settings_and_is_bit_exact():
    linear = nnx.Linear(16, 8, dtype=jnp.bfloat16, rngs=nnx.Rngs(5))
    linear.bias.set_value(normal(4, (8,)))
    before = jax.tree.map(np.copy, nnx.state(linear))
    layer = SparseLinear.from_dense(linear, "2:4")
    assert layer.dtype == jnp.bfloat16 and layer.in_features == 16 and layer.out_features == 8
    ws = jsp.NMSparse.fromdense(linear.kernel[...], n=2, m=4)
    assert_bit_equal(layer.values[...], ws.values)
    assert_bit_equal(layer.indices[...], ws.indices)
    assert_bit_equal(layer.bias[...], linear.bias[...])
    jax.tree.map(assert_bit_equal, nnx.state(linear), before)  # argument untouched
    back = layer.to_dense()
    assert_bit_equal(back.kernel[...], ws.todense())
    assert_bit_equal(back.bias[...], linear.bias[...])


def test_from_dense_kernel_with_bias_dtype_and_an_explicit_mask():
    kernel = normal(5, (16, 8), jnp.bfloat16)
    # Keep the first 2 inputs of every group of 4: an explicit N:M mask, not the magnitude one.
    mask = jnp.tile(jnp.array([True, True, False, False]), 4)[:, None] & jnp.ones((1, 8), bool)
    bias = jnp.arange(8.0, dtype=jnp.bfloat16)
    layer = SparseLinear.from_dense(kernel, jsp.NM(2, 4), method=mask, bias=bias, dtype=jnp.float32)
    assert layer.param_dtype == jnp.bfloat16 and layer.values[...].dtype == jnp.bfloat16
    assert layer.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(layer.weight.mask()), np.asarray(mask))
    assert_bit_equal(layer.weight.todense(), jnp.where(mask, kernel, 0))
    assert_bit_equal(layer.bias[...], bias)
    no_bias = SparseLinear.from_dense(kernel, "2:4", method=lambda w, p: mask)
    assert no_bias.bias is None
    np.testing.assert_array_equal(np.asarray(no_bias.weight.mask()), np.asarray(mask))


def test_under_jit_the_layer_is_built_and_called():
    @nnx.jit
    def build_and_call(x):
        layer = SparseLinear(16, 8, sparsity="2:4", rngs=nnx.Rngs(0))
        return layer(x)

    x = jnp.ones((2, 16))
    eager = SparseLinear(16, 8, sparsity="2:4", rngs=nnx.Rngs(0)).to_dense()(x)
    assert_close(build_and_call(x), eager, jnp.float32, scale=scale_for(16))


def test_optimizer_trains_values_and_bias_only_and_positions_stay():
    model = nnx.Sequential(
        SparseLinear(8, 16, sparsity="2:4", rngs=nnx.Rngs(0)),
        nnx.relu,
        SparseLinear(16, 2, sparsity="1:4", rngs=nnx.Rngs(1)),
    )
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    # The optimizer state (adam's mu and nu) mirrors values and bias, never the positions.
    opt_paths = {path[-1] for path in paths(nnx.state(optimizer, nnx.OptState))}
    assert {"values", "bias"} <= opt_paths and "indices" not in opt_paths
    mu = optimizer.opt_state[0].mu
    assert sorted({p[-1] for p in paths(mu)}) == ["bias", "values"]
    positions = jax.tree.map(np.copy, nnx.state(model, SparsityIndices))
    values = jax.tree.map(np.copy, nnx.state(model, nnx.Param))
    masks = [np.asarray(model.layers[i].weight.mask()) for i in (0, 2)]
    x, t = normal(6, (4, 8)), jnp.ones((4, 2))

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - t) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, SparsityIndices), positions)
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), nnx.state(model, nnx.Param), values
    )
    assert all(jax.tree.leaves(changed))
    for i, mask in zip((0, 2), masks):
        np.testing.assert_array_equal(np.asarray(model.layers[i].weight.mask()), mask)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "spec,err,match",
    [
        ("2-4", ValueError, "sparsity must be"),
        (0.5, TypeError, "sparsity must be"),
        (None, TypeError, "sparsity must be"),
        (jsp.NM(4, 4), ValueError, "n must be in"),
        ("5:4", ValueError, "n must be in"),
        (Unstructured(0.5), ValueError, "no compressed format"),
    ],
)
def test_unknown_or_invalid_sparsity(spec, err, match):
    with pytest.raises(err, match=match) as info:
        SparseLinear(8, 4, sparsity=spec, rngs=nnx.Rngs(0))
    assert "jaxsparse.nn.SparseLinear" in str(info.value)
    with pytest.raises(err, match=match):
        SparseLinear.from_dense(jnp.ones((8, 4)), spec)


def test_a_shape_the_pattern_cannot_take():
    with pytest.raises(ValueError, match=r"in_features=3.*in=3 < m=4"):
        SparseLinear(3, 8, sparsity="2:4", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"in=2 < m=8"):
        SparseLinear.from_dense(nnx.Linear(2, 4, rngs=nnx.Rngs(0)), "1:8")
    with pytest.raises(ValueError, match="kernel must be 2-D"):
        SparseLinear.from_dense(jnp.ones((2, 8, 4)), "2:4")
    with pytest.raises(TypeError, match="kernel must have dtype"):
        SparseLinear.from_dense(jnp.ones((8, 4), jnp.int32), "2:4")


def test_a_mask_that_breaks_the_pattern():
    kernel = jnp.ones((8, 2))
    mask = jnp.zeros((8, 2), bool).at[:3, 0].set(True)  # 3 kept in the first group of 4
    with pytest.raises(
        ValueError, match=r"mask keeps 3 entries .* the 2:4 pattern allows at most 2"
    ):
        SparseLinear.from_dense(kernel, "2:4", method=mask)
    with pytest.raises(ValueError, match=r"mask given as method must have the kernel's shape"):
        SparseLinear.from_dense(kernel, "2:4", method=mask[:4])
    with pytest.raises(TypeError, match="mask given as method must be bool"):
        SparseLinear.from_dense(kernel, "2:4", method=mask.astype(jnp.float32))
    with pytest.raises(ValueError, match="method must be 'magnitude'"):
        SparseLinear.from_dense(kernel, "2:4", method="sparsegpt")


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="dot_general must be jax.lax.dot_general"):
        SparseLinear(8, 4, sparsity="2:4", dot_general=lambda *a, **k: None, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="in_features must be an int"):
        SparseLinear(8.0, 4, sparsity="2:4", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="bias= is only for a kernel"):
        SparseLinear.from_dense(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), "2:4", bias=jnp.zeros(4))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        SparseLinear.from_dense(jnp.ones((8, 4)), "2:4", bias=jnp.zeros(3))
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        SparseLinear.from_dense(jnp.ones((8, 4)), "2:4", rngs=nnx.Rngs(0))
    layer = SparseLinear(8, 4, sparsity="2:4", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="x must have last dimension 8"):
        layer(jnp.ones((2, 7)))


def test_a_1xn_spec_with_shards_gives_layers_balanced_weights():
    # The spec carries the balance, so a fresh layer, from_dense and sparsify keep it and the
    # layer's weight can split column-parallel (tests/test_sharding.py runs one on 8 devices).
    spec = jsp.Blocks(16, 0.25, shards=4)
    dense = nnx.Linear(32, 128, rngs=nnx.Rngs(5))
    for layer in (SparseLinear(32, 128, sparsity=spec, rngs=nnx.Rngs(5)),
                  SparseLinear.from_dense(dense, spec)):
        w = layer.weight
        assert w.spec == spec and w.shards == 4
        np.testing.assert_array_equal(np.diff(np.asarray(w.indptr)[::2]), [16] * 4)
        assert jsp.shard_weight(w, jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",)),
                                "column", "d").shards == 4
    model = nnx.Sequential(nnx.Linear(32, 128, rngs=nnx.Rngs(6)), nnx.Linear(128, 64,
                                                                            rngs=nnx.Rngs(7)))
    sparse = jsp.nn.sparsify(model, "1x16@0.25,shards=4")
    assert [m.weight.shards for m in sparse.layers] == [4, 4]
    assert_chain_of_dense_layers(sparse)
    with pytest.raises(ValueError, match=r"out_features=96 .*multiple of n\*shards=64"):
        SparseLinear(32, 96, sparsity=spec, rngs=nnx.Rngs(0))


def test_a_1xn_spec_split_by_inputs_gives_layers_stacked_weights():
    # Row parallel: runs of inputs, stored run after run (tests/test_sharding.py runs a layer of
    # it on 8 devices).
    model = nnx.Sequential(nnx.Linear(32, 128, rngs=nnx.Rngs(6)), nnx.Linear(128, 40,
                                                                            rngs=nnx.Rngs(7)))
    sparse = jsp.nn.sparsify(model, "1x16@0.25,shards=4,split=in")
    assert [(m.weight.shards, m.weight.stacked) for m in sparse.layers] == [(4, True)] * 2
    assert_chain_of_dense_layers(sparse)


def assert_chain_of_dense_layers(sparse):
    """A Sequential of sparse layers computes its dense kernels' chain."""
    x = normal(8, (3, 32))
    want = x
    for m in sparse.layers:
        want = want @ m.weight.todense() + m.bias[...]
    assert_close(sparse(x), want, jnp.float32, scale_for(128))
    with pytest.raises(ValueError, match=r"in_features=30 must be a multiple of 4"):
        SparseLinear(30, 64, sparsity=jsp.Blocks(16, 0.25, 4, "in"), rngs=nnx.Rngs(0))
