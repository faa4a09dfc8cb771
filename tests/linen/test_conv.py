"""jaxsparse.linen.SparseConv: variables, the forward pass against nn.Conv with the densified
kernel (f32, bf16; 1x1 and 3x3; strides, SAME/VALID), gradients w.r.t. the input and the kept
values, jit and vmap, sparsify(convs=...) / densify of a small CNN, and bad input."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxsparse as jsp
from jaxsparse.linen import ConvSparsityIndices, SparseConv, SparseDense, densify, sparsify
from tests._check import assert_close, once_after, scale_for

SPECS = [
    pytest.param(jsp.Blocks(16, 0.25), 16, 32, id="1x16@0.25"),
    pytest.param(jsp.Blocks(4, 0.5), 8, 10, id="1x4@0.5-ragged-out"),
    pytest.param(jsp.NM(2, 4), 8, 12, id="2:4"),
    pytest.param(jsp.VNM(16, 2, 8), 16, 32, id="16:2:8"),
]
GEOMETRIES = [  # (kernel_size, strides, padding)
    pytest.param((1, 1), 1, "SAME", id="1x1"),
    pytest.param((3, 3), 1, "SAME", id="3x3-same"),
    pytest.param((3, 3), 2, "VALID", id="3x3-valid-s2"),
]


def normal(seed, shape, dtype=jnp.float32):
    """Test data from NumPy's generator (jax.random would compile a sampler for every shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def numpy_init(key, shape, dtype=jnp.float32):
    """A kernel initializer drawn from the key's bits by NumPy: the default (truncated normal)
    compiles a sampler for every shape, seconds per layer shape of this file."""
    if isinstance(key, jax.core.Tracer):  # linen's shape check at apply (jax.eval_shape)
        return jnp.zeros(shape, dtype)
    seed = np.asarray(jax.random.key_data(key), np.uint32).ravel()
    values = np.random.default_rng(seed).standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    return jnp.asarray(values, dtype)


def conv_pair(spec, features, kernel_size, strides=1, padding="SAME", **kwargs):
    """The SparseConv and the nn.Conv it densifies to, with the same settings."""
    settings = dict(features=features, kernel_size=kernel_size, strides=strides, padding=padding,
                    kernel_init=numpy_init, bias_init=numpy_init, **kwargs)
    return SparseConv(sparsity=spec, **settings), nn.Conv(**settings)


@pytest.mark.parametrize("spec, cin, cout", SPECS)
@pytest.mark.parametrize("kernel_size, strides, padding", once_after(GEOMETRIES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_forward_equals_nn_conv_with_the_densified_kernel(spec, cin, cout, kernel_size, strides,
                                                          padding, dtype):
    sparse, dense = conv_pair(spec, cout, kernel_size, strides, padding, param_dtype=dtype)
    x = normal(1, (2, 7, 6, cin), dtype)
    variables = sparse.init(jax.random.key(0), x)
    y = jax.jit(sparse.apply)(variables, x)
    dense_variables = densify(variables)
    kernel = dense_variables["params"]["kernel"]
    assert kernel.shape == (*kernel_size, cin, cout) and y.dtype == dtype
    assert_close(y, dense.apply(dense_variables, x), dtype, scale_for(np.prod(kernel_size) * cin))


def test_variables_and_the_fresh_layer_is_the_pruned_fresh_conv():
    sparse, dense = conv_pair(jsp.Blocks(16, 0.25), 32, (3, 3))
    x, key = jnp.ones((1, 5, 5, 16)), jax.random.key(4)
    variables = sparse.init(key, x)
    assert set(variables["params"]) == {"values", "bias"}
    assert set(variables["sparsity"]) == {"indices", "indptr"}
    box = variables["sparsity"]["indices"]
    assert isinstance(box, ConvSparsityIndices)
    assert (box.pattern, box.in_features, box.out_features, box.kernel_size) == (
        jsp.Blocks(16, 0.25), 144, 32, (3, 3))
    kernel = dense.init(key, x)["params"]["kernel"]
    ws = jsp.BlocksSparse.fromdense(kernel.reshape(144, 32), n=16, density=0.25)
    np.testing.assert_array_equal(variables["params"]["values"], ws.values)
    np.testing.assert_array_equal(box.value, ws.indices)
    np.testing.assert_array_equal(variables["sparsity"]["indptr"].value, ws.indptr)


@pytest.mark.parametrize("spec, cin, cout", SPECS)
def test_gradients_wrt_input_and_values_match_nn_conv(spec, cin, cout):
    sparse, dense = conv_pair(spec, cout, (3, 3), 2)
    x = normal(2, (2, 7, 7, cin))
    g = normal(3, (2, 4, 4, cout))
    variables = sparse.init(jax.random.key(0), x)
    box = variables["sparsity"]
    rows = 9 * cin

    def sparse_loss(params, x):
        return jnp.sum(sparse.apply({"params": params, "sparsity": box}, x) * g)

    def dense_loss(params, x):
        # The dense kernel as a function of the kept values (the format's own scatter).
        arrays = {**params, **{k: b.value for k, b in box.items()}}
        arrays.pop("bias")
        ws = spec.format.from_arrays(spec, rows, arrays, out_features=cout)
        kernel = ws.todense().reshape(3, 3, cin, cout)
        return jnp.sum(dense.apply({"params": {"kernel": kernel, "bias": params["bias"]}}, x) * g)

    dparams, dx = jax.jit(jax.grad(sparse_loss, argnums=(0, 1)))(variables["params"], x)
    want_params, want_x = jax.grad(dense_loss, argnums=(0, 1))(variables["params"], x)
    assert_close(dx, want_x, jnp.float32, scale_for(9 * cout))
    for name in dparams:
        assert_close(dparams[name], want_params[name], jnp.float32, scale_for(32), err_msg=name)


def test_jit_and_vmap_over_images():
    sparse, _ = conv_pair(jsp.NM(2, 4), 12, (3, 3), 2)
    x = normal(4, (3, 7, 7, 8))
    variables = sparse.init(jax.random.key(0), x)
    batched = jax.jit(sparse.apply)(variables, x)
    per_image = jax.jit(jax.vmap(sparse.apply, in_axes=(None, 0)))(variables, x)
    assert per_image.shape == (3, 4, 4, 12)
    assert_close(per_image, batched, jnp.float32, 9)


class CNN(nn.Module):
    """conv1 (1 input channel) cannot take 2:4 in the sparse model; conv2 and head can."""

    sparsity: object = None

    @nn.compact
    def __call__(self, x):
        init = dict(kernel_init=numpy_init)
        x = nn.relu(nn.Conv(8, (3, 3), name="conv1", **init)(x))
        if self.sparsity is None:
            x = nn.Conv(16, (3, 3), strides=2, name="conv2", **init)(x)
            head = nn.Dense(10, name="head", **init)
        else:
            x = SparseConv(16, (3, 3), strides=2, sparsity=self.sparsity, name="conv2",
                           **init)(x)
            head = SparseDense(10, sparsity=self.sparsity, name="head", **init)
        return head(nn.relu(x).reshape(x.shape[0], -1))


def test_sparsify_and_densify_a_cnn(caplog):
    x = normal(5, (4, 8, 8, 1))
    dense = CNN().init(jax.random.key(0), x)
    with caplog.at_level(logging.INFO, logger="jaxsparse"):
        untouched = sparsify(dense, "2:4")
    assert "skipped conv2 (Conv kernel (3, 3, 8, 16)): a kernel of rank 4 is a Conv's or a " \
           "DenseGeneral's; pass convs=True" in caplog.text
    assert set(untouched["params"]["conv2"]) == {"kernel", "bias"}
    with caplog.at_level(logging.INFO, logger="jaxsparse"):
        sparse = sparsify(dense, "2:4", convs=True)
    assert ("skipped conv1 (Conv kernel (3, 3, 1, 8)): in_features=1 is not a multiple of m=4"
            in caplog.text)
    assert "replaced conv2 (Conv kernel (3, 3, 8, 16)) with SparseConv 2:4" in caplog.text
    # The variables are those of the model written with SparseConv, pruned from the same draw.
    fresh = CNN(sparsity="2:4").init(jax.random.key(0), x)
    assert jax.tree.structure(sparse) == jax.tree.structure(fresh)
    np.testing.assert_array_equal(sparse["params"]["conv2"]["values"],
                                  fresh["params"]["conv2"]["values"])
    y = CNN(sparsity="2:4").apply(sparse, x)
    with caplog.at_level(logging.INFO, logger="jaxsparse"):
        back = densify(sparse)
    assert "replaced conv2 (SparseConv 2:4) with Conv kernel (3, 3, 8, 16)" in caplog.text
    assert jax.tree.structure(back) == jax.tree.structure(dense)
    kernel = dense["params"]["conv2"]["kernel"]
    keep = jsp.NM(2, 4).magnitude_mask(kernel.reshape(72, 16)).reshape(kernel.shape)
    np.testing.assert_array_equal(back["params"]["conv2"]["kernel"], jnp.where(keep, kernel, 0))
    assert_close(y, CNN().apply(back, x), jnp.float32, 20)
    # convs= as a regular expression selects by path.
    only = sparsify(dense, jsp.Blocks(8, 0.25), convs="conv1", filter="conv")
    assert set(only["params"]["conv1"]) == {"values", "bias"}
    assert set(only["params"]["conv2"]) == {"kernel", "bias"}


def test_bad_input():
    x = jnp.ones((1, 5, 5, 8))
    with pytest.raises(ValueError, match="feature_group_count must be 1.*feature_group_count=2"):
        SparseConv(8, (3, 3), feature_group_count=2, sparsity="2:4").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="in_features=6 is not a multiple of m=4"):
        SparseConv(8, (3, 3), sparsity="2:4").init(jax.random.key(0), jnp.ones((1, 5, 5, 6)))
    layer, _ = conv_pair("2:4", 8, (3, 3))
    variables = layer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="no sparsity/indices: pass the whole variable dict"):
        layer.apply({"params": variables["params"]}, x)
    other, _ = conv_pair("2:4", 8, (1, 1))
    boxes = other.init(jax.random.key(0), jnp.ones((1, 5, 5, 72)))["sparsity"]
    with pytest.raises(ValueError, match=r"made for pattern 2:4 with in_features=72, "
                                         r"kernel_size=\(1, 1\)"):
        layer.apply({"params": variables["params"], "sparsity": boxes}, x)
    with pytest.raises(ValueError, match=r"convs=\)"):
        sparsify({"params": {}}, "2:4", convs="(")
