"""jaxsparse.nn.SparseConv: the forward pass against lax.conv_general_dilated with the masked dense
kernel (f32, bf16; 1x1 and 3x3; strides, SAME/VALID and explicit padding, dilations), gradients
w.r.t. the input and the kept values against the dense convolution's, jit and vmap, sparsify /
densify of a small CNN, and bad input."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import jaxsparse as jsp
from jaxsparse.nn import SparseConv, SparseLinear, densify, sparsify
from jaxsparse.nn.conv import conv_fits, conv_geometry, conv_patches
from jaxsparse.prune import Unstructured
from tests._check import assert_close, once_after, scale_for

# (spec, in channels, out channels): Blocks(4, 0.5) with out=10, not a multiple of n.
SPECS = [
    pytest.param(jsp.Blocks(16, 0.25), 16, 32, id="1x16@0.25"),
    pytest.param(jsp.Blocks(4, 0.5), 8, 10, id="1x4@0.5-ragged-out"),
    # Row-parallel runs over the flattened kernel's inputs (stacked: no direct 1xN kernel).
    pytest.param(jsp.Blocks(8, 0.25, shards=4, split="in"), 16, 16, id="1x8@0.25-split-in"),
    pytest.param(jsp.NM(2, 4), 8, 12, id="2:4"),
    pytest.param(jsp.VNM(16, 2, 8), 16, 32, id="16:2:8"),
]
# (kernel_size, strides, padding, kernel_dilation, dtype): every geometry in f32, the common
# ones in bf16 too (the patches are dtype-blind; bf16 checks the product's rounding).
_GEOMETRIES = [
    ((1, 1), 1, "SAME", 1, "1x1"),
    ((3, 3), 1, "SAME", 1, "3x3-same"),
    ((3, 3), 2, "VALID", 1, "3x3-valid-s2"),
    ((3, 3), (2, 1), ((1, 0), (2, 1)), (1, 2), "3x3-explicit-dilated"),
]
GEOMETRIES = [
    pytest.param(*g[:-1], dtype, id=f"{name}-{g[-1]}")
    for dtype, name in ((jnp.float32, "f32"), (jnp.bfloat16, "bf16"))
    for g in _GEOMETRIES
    if dtype == jnp.float32 or g[-1] != "3x3-explicit-dilated"
]


def normal(seed, shape, dtype=jnp.float32):
    """Test data from NumPy's generator (jax.random would compile a sampler for every shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def numpy_init(key, shape, dtype=jnp.float32):
    """A kernel initializer without jax.random: the default (truncated normal) compiles a
    sampler for every shape, seconds per layer shape of this file."""
    seed = int(np.asarray(jax.random.key_data(key)).ravel()[-1])
    return (normal(seed, shape) / np.sqrt(np.prod(shape[:-1]))).astype(dtype)


INIT = dict(kernel_init=numpy_init, bias_init=numpy_init)


def dense_conv(x, kernel, layer):
    """What the layer computes, by XLA's convolution of its dense (masked) kernel."""
    padding = layer.padding if isinstance(layer.padding, str) else list(layer.padding)
    dims = ("NHWC", "HWIO", "NHWC") if kernel.ndim == 4 else ("NWC", "WIO", "NWC")
    y = lax.conv_general_dilated(
        x, kernel.astype(x.dtype), layer.strides, padding, lhs_dilation=layer.input_dilation,
        rhs_dilation=layer.kernel_dilation, dimension_numbers=dims,
    )
    if layer.bias is not None:
        y = y + layer.bias[...].astype(y.dtype)
    return y


@pytest.mark.parametrize("spec, cin, cout", SPECS)
# CI's older jax: each spec at the first geometry (the layer's jax-facing part); the rest of the
# geometries are the patches' arithmetic, the same on every jax (`once`).
@pytest.mark.parametrize("kernel_size, strides, padding, kernel_dilation, dtype",
                         once_after(GEOMETRIES))
def test_forward_equals_the_dense_convolution(spec, cin, cout, kernel_size, strides, padding,
                                              kernel_dilation, dtype):
    layer = SparseConv(cin, cout, kernel_size, strides, sparsity=spec, padding=padding,
                       kernel_dilation=kernel_dilation, param_dtype=dtype, **INIT,
                       rngs=nnx.Rngs(0))
    x = normal(1, (2, 7, 6, cin), dtype)
    y = jax.jit(lambda x: layer(x))(x)
    kernel = layer.dense_kernel()
    assert kernel.shape == (*kernel_size, cin, cout) and y.dtype == dtype
    # The layer keeps what the format keeps of the flattened kernel, zeros elsewhere.
    np.testing.assert_array_equal(
        np.asarray(layer.weight.mask()).reshape(kernel.shape) | (np.asarray(kernel) == 0), True
    )
    assert_close(y, dense_conv(x, kernel, layer), dtype,
                 scale_for(np.prod(kernel_size) * cin))


def test_patches_follow_the_kernel_order_for_input_dilation_and_1d():
    """conv_patches @ reshaped kernel is XLA's convolution, for a transposed (input-dilated)
    convolution with negative padding, and in 1-D with CAUSAL padding."""
    x = normal(2, (2, 6, 5, 3))
    kernel = normal(3, (3, 2, 3, 4))
    g = conv_geometry((3, 2), (1, 2), ((2, -1), (1, 1)), 2, (2, 1), where="test")
    want = lax.conv_general_dilated(x, kernel, g.strides, list(g.padding), lhs_dilation=(2, 2),
                                    rhs_dilation=(2, 1),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert_close(conv_patches(x, g) @ kernel.reshape(-1, 4), want, jnp.float32, 3)
    layer = SparseConv(8, 16, 3, sparsity=jsp.NM(2, 4), padding="CAUSAL", **INIT,
                       rngs=nnx.Rngs(0))
    x1 = normal(4, (2, 9, 8))
    y = layer(x1)
    want = jnp.pad(x1, ((0, 0), (2, 0), (0, 0)))
    want = lax.conv_general_dilated(want, layer.dense_kernel(), (1,), "VALID",
                                    dimension_numbers=("NWC", "WIO", "NWC")) + layer.bias[...]
    assert y.shape == (2, 9, 16)
    assert_close(y, want, jnp.float32, 5)


@pytest.mark.parametrize("spec, cin, cout", SPECS)
def test_gradients_wrt_input_and_values_match_the_dense_convolution(spec, cin, cout):
    layer = SparseConv(cin, cout, (3, 3), 2, sparsity=spec, **INIT, rngs=nnx.Rngs(0))
    x = normal(5, (2, 7, 7, cin))
    g = normal(6, (2, 4, 4, cout))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    weight = layer.weight

    def sparse_loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x) * g)

    def dense_loss(values, bias, x):
        # The dense kernel as a function of the kept values: its gradient is the dense kernel's
        # gradient at the kept positions.
        kernel = weight.replace(values=values).todense().reshape(layer.kernel_shape)
        return jnp.sum((dense_conv(x, kernel, layer) - layer.bias[...] + bias) * g)

    (dparams, dx) = jax.jit(jax.grad(sparse_loss, argnums=(0, 1)))(params, x)
    dvalues, dbias, dx_dense = jax.grad(dense_loss, argnums=(0, 1, 2))(
        weight.values, layer.bias[...], x)
    assert_close(dx, dx_dense, jnp.float32, scale_for(9 * cout))
    assert_close(dparams["values"][...], dvalues, jnp.float32, scale_for(2 * 16))
    assert_close(dparams["bias"][...], dbias, jnp.float32, scale_for(32))


def test_jit_vmap_and_batch_dims():
    layer = SparseConv(16, 32, (3, 3), sparsity=jsp.Blocks(16, 0.25), **INIT, rngs=nnx.Rngs(0))
    x = normal(7, (3, 2, 5, 5, 16))
    call = nnx.jit(lambda m, x: m(x))
    want = jnp.stack([call(layer, x[i]) for i in range(3)])
    assert_close(call(layer, x), want, jnp.float32, 12)  # two batch dims, flattened, restored
    assert_close(dense_conv(x[0], layer.dense_kernel(), layer), want[0], jnp.float32, 12)
    # vmap of the unbatched call (an image [H, W, C] per call).
    assert_close(jax.vmap(lambda img: layer(img))(x[0]), want[0], jnp.float32, 12)
    assert_close(jax.jit(jax.vmap(jax.vmap(layer)))(x), want, jnp.float32, 12)

    def loss(x):
        return jnp.sum(layer(x) ** 2)

    per_example = jax.vmap(jax.grad(loss))(x[0][:, None])
    assert_close(per_example[:, 0], jax.grad(loss)(x[0]), jnp.float32, 12)


def test_the_batch_loop_over_cache_sized_chunks_changes_nothing(monkeypatch):
    """Large batches run in chunks of images (`PATCH_CHUNK_BYTES`); forward and gradients are
    those of the whole batch at once, with a ragged last chunk too (5 images, 2 per chunk)."""
    from jaxsparse.nn import conv as conv_module

    layer = SparseConv(8, 16, (3, 3), 2, sparsity=jsp.Blocks(8, 0.5), **INIT, rngs=nnx.Rngs(0))
    x = normal(11, (5, 6, 6, 8))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)

    whole = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    per_image = 9 * 9 * 8 * 4  # 3x3 out pixels x 9 positions x 8 channels x f32 bytes
    monkeypatch.setattr(conv_module, "PATCH_CHUNK_BYTES", 2 * per_image)
    assert conv_module.images_per_chunk(x, layer.geometry) == 2
    chunked = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    jax.tree.map(lambda a, b: assert_close(a, b, jnp.float32, 10), chunked, whole)


def test_a_fresh_layer_is_the_pruned_nnx_conv_and_round_trips():
    dense = nnx.Conv(16, 32, (3, 3), strides=2, padding="VALID", **INIT, rngs=nnx.Rngs(3))
    fresh = SparseConv(16, 32, (3, 3), 2, padding="VALID", sparsity=jsp.Blocks(16, 0.25), **INIT,
                       rngs=nnx.Rngs(3))
    converted = SparseConv.from_dense(dense, jsp.Blocks(16, 0.25))
    np.testing.assert_array_equal(fresh.dense_kernel(), converted.dense_kernel())
    kept = jsp.BlocksSparse.fromdense(dense.kernel[...].reshape(144, 32), n=16, density=0.25)
    np.testing.assert_array_equal(fresh.dense_kernel(), kept.todense().reshape(3, 3, 16, 32))
    back = converted.to_dense()
    assert type(back) is nnx.Conv and back.strides == (2, 2) and back.padding == "VALID"
    np.testing.assert_array_equal(back.kernel[...], converted.dense_kernel())
    x = normal(8, (2, 9, 9, 16))
    assert_close(back(x), converted(x), jnp.float32, 12)
    # A mask in the kernel's shape is kept as given.
    mask = jsp.Blocks(16, 0.25).magnitude_mask(jnp.flip(dense.kernel[...].reshape(144, 32), 0))
    masked = SparseConv.from_dense(dense, "1x16@0.25", method=mask.reshape(3, 3, 16, 32))
    np.testing.assert_array_equal(
        masked.dense_kernel(), jnp.where(mask.reshape(3, 3, 16, 32), dense.kernel[...], 0))


def test_int4_kernels_fit_when_groups_stay_inside_a_position():
    layer = SparseConv(8, 16, (3, 3), sparsity=jsp.Int4(8, jsp.NM(2, 4)), **INIT,
                       rngs=nnx.Rngs(0))
    x = normal(9, (2, 5, 5, 8))
    assert_close(layer(x), dense_conv(x, layer.dense_kernel(), layer), jnp.float32, 9)
    assert "group_size=16" in conv_fits(jsp.Int4(16), (3, 3, 8, 16))


class CNN(nnx.Module):
    """Conv-relu-Conv-Linear on 8x8 images; conv3 (6 input channels) cannot take 2:4."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 8, (3, 3), **INIT, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, **INIT, rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 16, 10, **INIT, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
        return self.head(x.reshape(*x.shape[:-3], -1))


@pytest.mark.parametrize("spec", [jsp.Blocks(8, 0.25), jsp.NM(2, 4)], ids=str)
def test_sparsify_and_densify_a_cnn(spec, caplog):
    model = CNN(nnx.Rngs(0))
    kernels = {name: np.copy(getattr(model, name).kernel[...])
               for name in ("conv1", "conv2", "head")}
    with caplog.at_level(logging.INFO, logger="jaxsparse"):
        sparse = sparsify(model, spec)
    for name, kernel in kernels.items():  # the argument is untouched
        np.testing.assert_array_equal(getattr(model, name).kernel[...], kernel)
    assert type(sparse.conv2) is SparseConv and type(sparse.head) is SparseLinear
    if isinstance(spec, jsp.NM):  # 1 input channel: a group of 4 would straddle positions
        assert type(sparse.conv1) is nnx.Conv
        assert ("skipped conv1 Conv(1 -> 8, kernel_size=(3, 3)): in_features=1 is not a "
                "multiple of m=4") in caplog.text
    else:
        assert type(sparse.conv1) is SparseConv
    assert f"replaced conv2 Conv(8 -> 16, kernel_size=(3, 3)) with SparseConv {spec}" in (
        caplog.text)
    with caplog.at_level(logging.INFO, logger="jaxsparse"):
        dense = densify(sparse)
    assert "replaced conv2 SparseConv(8 -> 16, " in caplog.text
    assert all(type(getattr(dense, n)) in (nnx.Conv, nnx.Linear) for n in kernels)
    np.testing.assert_array_equal(dense.conv2.kernel[...], sparse.conv2.dense_kernel())
    # The densified kernels are the originals where kept, zero elsewhere.
    flat = kernels["conv2"].reshape(-1, 16)
    keep = np.asarray(spec.magnitude_mask(jnp.asarray(flat))).reshape(kernels["conv2"].shape)
    np.testing.assert_array_equal(dense.conv2.kernel[...], np.where(keep, kernels["conv2"], 0))
    x = normal(10, (4, 8, 8, 1))
    assert_close(sparse(x), dense(x), jnp.float32, 20)


def test_sparsify_skips_what_cannot_convert(caplog):
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.grouped = nnx.Conv(8, 8, (3, 3), feature_group_count=2, **INIT, rngs=rngs)
            self.masked = nnx.Conv(8, 8, (1, 1), mask=jnp.ones((1, 1, 8, 8)), **INIT, rngs=rngs)
            self.kept = nnx.Conv(8, 8, (1, 1), **INIT, rngs=rngs)

    with caplog.at_level(logging.INFO, logger="jaxsparse"):
        sparse = sparsify(Model(nnx.Rngs(0)), "2:4", filter="grouped|masked|kept")
    assert type(sparse.grouped) is nnx.Conv and type(sparse.masked) is nnx.Conv
    assert type(sparse.kept) is SparseConv
    assert "skipped grouped Conv(8 -> 8, kernel_size=(3, 3)): feature_group_count=2" in (
        caplog.text)
    assert "skipped masked Conv(8 -> 8, kernel_size=(1, 1)): it has a mask=" in caplog.text


def test_bad_input_is_refused_with_the_argument_named():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="feature_group_count must be 1.*feature_group_count=2"):
        SparseConv(8, 8, (3, 3), sparsity="2:4", feature_group_count=2, rngs=rngs)
    with pytest.raises(ValueError, match="in_features=6 is not a multiple of m=4"):
        SparseConv(6, 8, (3, 3), sparsity="2:4", rngs=rngs)
    with pytest.raises(ValueError, match="in_features=12 is not a multiple of m=8"):
        SparseConv(12, 32, (3, 3), sparsity=jsp.VNM(16, 2, 8), rngs=rngs)
    with pytest.raises(ValueError, match="cannot be held by a sparse layer"):
        SparseConv(8, 8, (3, 3), sparsity=Unstructured(0.5), rngs=rngs)
    with pytest.raises(ValueError, match="out=3 < n=16"):
        SparseConv(8, 3, (3, 3), sparsity=jsp.Blocks(16, 0.25), rngs=rngs)
    with pytest.raises(ValueError, match="padding must be 'SAME', 'VALID'.*got 'same'"):
        SparseConv(8, 8, (3, 3), sparsity="2:4", padding="same", rngs=rngs)
    with pytest.raises(ValueError, match=r"strides must be an int or 2 ints.*got \(1, 1, 1\)"):
        SparseConv(8, 8, (3, 3), (1, 1, 1), sparsity="2:4", rngs=rngs)
    with pytest.raises(ValueError, match=r"kernel_size\[1\] must be in \[1, "):
        SparseConv(8, 8, (3, 0), sparsity="2:4", rngs=rngs)
    with pytest.raises(ValueError, match="padding must be explicit .* input_dilation"):
        SparseConv(8, 8, (3, 3), sparsity="2:4", input_dilation=2, rngs=rngs)
    layer = SparseConv(8, 8, (3, 3), sparsity="2:4", **INIT, rngs=rngs)
    with pytest.raises(ValueError, match=r"in_features=8 channels .* got shape \(2, 5, 5, 4\)"):
        layer(jnp.ones((2, 5, 5, 4)))
    with pytest.raises(ValueError, match=r"at least 3 dimensions .* got shape \(5, 8\)"):
        layer(jnp.ones((5, 8)))
    grouped = nnx.Conv(8, 8, (3, 3), feature_group_count=2, **INIT, rngs=rngs)
    with pytest.raises(ValueError, match="cannot convert this layer: feature_group_count=2"):
        SparseConv.from_dense(grouped, "2:4")
    with pytest.raises(ValueError, match=r"kernel's shape \(3, 3, 8, 8\) or its flattened shape "
                                         r"\(72, 8\); got \(8, 8\)"):
        SparseConv.from_dense(layer.dense_kernel(), "2:4", method=jnp.ones((8, 8), bool))


@pytest.mark.parametrize("spec, expect", [(jsp.Blocks(8, 0.25), True), (jsp.NM(2, 4), False)],
                         ids=str)
def test_2d_1xn_convolutions_gather_their_patches_in_the_kernel(spec, expect):
    """A 1xN kernel of a 2-D convolution runs `blocks_conv` (the patches never stored); other
    formats, 1-D and input-dilated convolutions store the patches."""
    layer = SparseConv(8, 16, (3, 3), sparsity=spec, padding="CIRCULAR", **INIT, rngs=nnx.Rngs(0))
    x = normal(2, (2, 6, 5, 8))
    assert ("jaxsparse_blocks_conv" in str(jax.make_jaxpr(layer)(x))) is expect
    assert_close(layer(x), dense_conv(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap"),
                                      layer.dense_kernel(), _valid(layer)), jnp.float32,
                 scale_for(72))
    dilated = SparseConv(8, 16, (3, 3), sparsity=jsp.Blocks(8, 0.25), input_dilation=2,
                         padding=((1, 1), (1, 1)), **INIT, rngs=nnx.Rngs(0))
    assert "jaxsparse_blocks_conv" not in str(jax.make_jaxpr(dilated)(x))


def _valid(layer):
    """The layer's geometry read with VALID padding (the input padded by the caller)."""
    class View:
        padding, strides = "VALID", layer.strides
        input_dilation, kernel_dilation, bias = layer.input_dilation, layer.kernel_dilation, layer.bias
    return View
