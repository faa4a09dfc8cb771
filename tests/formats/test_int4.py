"""int4 weights (jaxsparse/formats/int4.py): the spec, quantisation, dequantisation, products and
their gradient in x, frozen weights, bad input, layers and checkpoints."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx, serialization

import jaxsparse as jsp
from jaxsparse.formats.int4 import quantize_rtn
from tests._check import DTYPES, assert_close, scale_for

SPECS = [jsp.Int4(32), jsp.Int4(64), jsp.Int4(128), jsp.Int4(None),
         jsp.Int4(32, jsp.NM(2, 4)), jsp.Int4(128, jsp.NM(2, 4)), jsp.Int4(None, jsp.NM(2, 4))]
SPEC_IDS = [str(s) for s in SPECS]


def weight(k, n, seed=0, dtype=jnp.float32, batch=()):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((*batch, k, n)), dtype)


def tokens(t, k, seed=1, dtype=jnp.float32, lead=()):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((*lead, t, k)), dtype)


# ====================================================================== the spec
def test_spec_strings_and_values():
    assert jsp.as_spec("int4") == jsp.Int4(128)
    assert jsp.as_spec("int4:g64") == jsp.Int4(64)
    assert jsp.as_spec("int4:channel") == jsp.Int4(None)
    assert jsp.as_spec("int4:g32+2:4") == jsp.Int4(32, jsp.NM(2, 4))
    assert jsp.as_spec(jsp.Int4(-1)) == jsp.Int4(None)
    assert jsp.as_spec(jsp.Int4(128, "2:4")) == jsp.Int4(128, jsp.NM(2, 4))
    assert jsp.as_spec("int4:channel:a8") == jsp.Int4(None, activations="int8")
    for spec in (*SPECS, jsp.Int4(64, activations="int8")):
        assert jsp.as_spec(str(spec)) == spec
    assert jsp.Int4().density == 1.0 and jsp.Int4(128, jsp.NM(2, 4)).density == 0.5
    assert jsp.Int4().format is jsp.Int4Weight
    assert jsp.Int4(sparsity=jsp.NM(2, 4)).format is jsp.Int4NMWeight


@pytest.mark.parametrize("spec, match", [
    (jsp.Int4(12), "group_size must be a multiple of 8"),
    (jsp.Int4(0), "group_size"),
    (jsp.Int4(128.0), "group_size must be an int"),
    (jsp.Int4(128, jsp.NM(2, 8)), "sparsity must be None or jaxsparse.NM"),
    (jsp.Int4(128, activations="int4"), "activations must be None"),
    (jsp.Int4(128, jsp.NM(2, 4), "int8"), "activations='int8' is for the dense int4 form"),
])
def test_bad_specs_name_the_field(spec, match):
    with pytest.raises((TypeError, ValueError), match=match):
        jsp.as_spec(spec)


def test_fits_shape_says_why():
    assert jsp.Int4(128).fits_shape((256, 8)) is None
    assert "group_size=128" in jsp.Int4(128).fits_shape((192, 8))
    assert "multiple of 8" in jsp.Int4(None, jsp.NM(2, 4)).fits_shape((12, 8))
    assert jsp.Int4(None).fits_shape((12, 8)) is None
    assert "multiple of 4" in jsp.Int4(None, activations="int8").fits_shape((10, 8))


# ====================================================================== quantisation
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [32, 64, 128, None])
def test_round_to_nearest_is_within_half_a_step(group, dtype):
    w = weight(256, 24, dtype=dtype)
    wq = jsp.fromdense(w, jsp.Int4(group))
    g = group or 256
    assert wq.shape == w.shape and wq.dtype == dtype
    assert wq.qweight.shape == (128, 24) and wq.qweight.dtype == jnp.uint8
    assert wq.scales.shape == (256 // g, 24)
    codes = np.asarray(wq.codes(), np.int32)
    assert codes.min() >= -7 and codes.max() <= 7
    scales = np.repeat(np.asarray(wq.scales, np.float32), g, axis=0)
    err = np.abs(np.asarray(wq.todense(), np.float32) - np.asarray(w, np.float32))
    ulp = {jnp.float32: 1e-6, jnp.bfloat16: 8e-3, jnp.float16: 1e-3}[dtype]
    assert np.all(err <= scales * (0.5 + ulp) + ulp * np.abs(np.asarray(w, np.float32)))
    # Every group's largest magnitude maps to +-7.
    per_group = np.abs(codes).reshape(256 // g, g, 24).max(axis=1)
    assert np.all(per_group == 7)


def test_codes_round_trip_losslessly():
    rng = np.random.default_rng(3)
    codes = rng.integers(-8, 8, (64, 10)).astype(np.int8)
    scales = jnp.asarray(rng.uniform(0.1, 1, (2, 10)), jnp.float32)
    wq = jsp.Int4Weight.from_codes(codes, scales, group_size=32)
    np.testing.assert_array_equal(np.asarray(wq.codes()), codes)
    np.testing.assert_array_equal(
        np.asarray(wq.todense()), codes.astype(np.float32) * np.repeat(np.asarray(scales), 32, 0))
    # Through the constructor from its own arrays (what layers and checkpoints do).
    again = jsp.Int4Weight(wq.qweight, wq.scales, group_size=32, in_features=64)
    np.testing.assert_array_equal(np.asarray(again.todense()), np.asarray(wq.todense()))


def test_zero_groups_quantise_to_zero():
    w = jnp.zeros((64, 4)).at[40, 1].set(3.0)
    wq = jsp.fromdense(w, jsp.Int4(32))
    dense = np.asarray(wq.todense())
    np.testing.assert_allclose(dense, np.asarray(w), rtol=1e-6)
    assert np.count_nonzero(dense) == 1
    codes, scales = quantize_rtn(w, 32)
    assert float(scales[0, 0]) == 0.0 and int(codes[40, 1]) == 7


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tiny_groups_keep_a_normal_scale(dtype):
    # max |w| / 7 would be a subnormal scale, which XLA's CPU code flushes to zero; the scale is
    # raised to float32's smallest normal number, so the group survives within half a step.
    tiny = float(jnp.finfo(jnp.float32).tiny)
    w = (jnp.zeros((64, 4), jnp.float32).at[:32, 0].set(3 * tiny).at[5, 0].set(6 * tiny)
         .at[40, 1].set(3.0)).astype(dtype)
    codes, scales = quantize_rtn(w, 32)
    assert float(scales[0, 0]) == tiny and int(codes[5, 0]) == 6
    dense = np.asarray(jsp.fromdense(w, jsp.Int4(32)).todense().astype(jnp.float32))
    assert np.all(dense[:32, 0] > 0)
    assert np.max(np.abs(dense[:32, 0] - np.asarray(w[:32, 0], np.float32))) <= tiny / 2
    gptq = np.asarray(jsp.prune.gptq(w.astype(jnp.float32), jnp.eye(64), jsp.Int4(32)).todense())
    assert np.all(gptq[:32, 0] > 0)


@pytest.mark.parametrize("group", [32, None])
def test_sparse_form_keeps_two_of_four_then_quantises(group):
    w = weight(128, 20)
    spec = jsp.Int4(group, jsp.NM(2, 4))
    wq = jsp.fromdense(w, spec)
    assert type(wq) is jsp.Int4NMWeight and wq.spec == spec
    assert wq.qweight.shape == (32, 20) and wq.positions.shape == (16, 20)
    mask = np.asarray(wq.mask())
    np.testing.assert_array_equal(mask, np.asarray(jsp.NM(2, 4).magnitude_mask(w)))
    dense = np.asarray(wq.todense())
    assert np.all(dense[~mask] == 0)
    g = group or 128
    kept = np.asarray(w)[mask].reshape(-1)  # Row-major over [in, out]
    scales = np.repeat(np.asarray(wq.scales), g, axis=0)[mask]
    assert np.all(np.abs(dense[mask] - kept) <= 0.5 * scales + 1e-6)
    # The largest kept magnitude of each group of g inputs maps to +-7.
    codes = np.round(dense / np.maximum(np.repeat(np.asarray(wq.scales), g, 0), 1e-30))
    assert np.all(np.abs(codes).reshape(128 // g, g, 20).max(axis=1) == 7)


def test_sparse_codes_round_trip_and_positions_are_checked():
    rng = np.random.default_rng(4)
    codes = rng.integers(-8, 8, (32, 6)).astype(np.int8)  # in = 64: 16 groups, two kept each
    pairs = np.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
    pos = pairs[rng.integers(0, 6, (16, 6))].transpose(0, 2, 1).reshape(32, 6)
    scales = jnp.asarray(rng.uniform(0.5, 1, (2, 6)), jnp.float32)
    wq = jsp.Int4NMWeight.from_codes(codes, pos, scales, group_size=32)
    dense = np.asarray(wq.todense())
    want = np.zeros((64, 6), np.float32)
    for j in range(16):
        for slot in range(2):
            rows = 4 * j + pos[2 * j + slot]
            want[rows, np.arange(6)] = codes[2 * j + slot] * np.asarray(scales)[(4 * j) // 32]
    np.testing.assert_array_equal(dense, want)
    bad = np.asarray(wq.positions).copy()
    bad[0, 0] = 0b0101  # p0 = p1 = 1
    with pytest.raises(ValueError, match="positions must hold two increasing positions"):
        jsp.Int4NMWeight(wq.qweight, bad, wq.scales, group_size=32, in_features=64)


# ====================================================================== products
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_product_matches_the_dequantised_weight(spec, dtype):
    k = 128
    wq = jsp.fromdense(weight(k, 20, dtype=dtype), spec)
    for t in (1, 5, 33):
        x = tokens(t, k, dtype=dtype)
        want = jnp.einsum("tk,kn->tn", x, wq.todense(), preferred_element_type=jnp.float32)
        assert_close(x @ wq, want, dtype, scale_for(k))
        assert (x @ wq).dtype == dtype


@pytest.mark.parametrize("spec", [jsp.Int4(32), jsp.Int4(32, jsp.NM(2, 4))], ids=str)
def test_leading_dims_and_stacks_of_weights(spec):
    w = weight(64, 12, batch=(3,))
    wq = jsp.fromdense(w, spec)
    assert wq.shape == (3, 64, 12) and wq.batch_shape == (3,)
    x = tokens(5, 64, lead=(3,))
    want = jnp.matmul(x, wq.todense())
    assert_close(x @ wq, want, jnp.float32, scale_for(64))
    one = jsp.fromdense(w[1], spec)
    assert_close(jax.vmap(lambda xi: xi @ one)(x), jnp.matmul(x, one.todense()), jnp.float32, 8)
    assert_close(tokens(1, 64)[0] @ one, tokens(1, 64)[0] @ one.todense(), jnp.float32, 8)


def test_mixed_dtypes_promote():
    wq = jsp.fromdense(weight(64, 8), jsp.Int4(32))
    y = tokens(4, 64, dtype=jnp.bfloat16) @ wq
    assert y.dtype == jnp.float32
    assert wq.astype(jnp.bfloat16).scales.dtype == jnp.bfloat16
    assert (tokens(4, 64, dtype=jnp.bfloat16) @ wq.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("spec", [jsp.Int4(32), jsp.Int4(64, jsp.NM(2, 4))], ids=str)
def test_gradient_in_x_through_jit_and_vmap(spec):
    wq = jsp.fromdense(weight(128, 24), spec)
    dense = wq.todense()
    x = tokens(6, 128)
    loss = lambda x: jnp.sum(jnp.sin(x @ wq))  # noqa: E731
    want = jax.grad(lambda x: jnp.sum(jnp.sin(x @ dense)))(x)
    assert_close(jax.jit(jax.grad(loss))(x), want, jnp.float32, 4)
    assert_close(jax.vmap(jax.grad(loss))(x[:, None]), want[:, None], jnp.float32, 4)
    _, tangent = jax.jvp(lambda x: x @ wq, (x,), (jnp.ones_like(x),))
    assert_close(tangent, jnp.ones_like(x) @ dense, jnp.float32, 12)
    # Second order in x (through int4_matmul_t's own rules).
    hvp = jax.grad(lambda x: jnp.sum(jax.grad(loss)(x) ** 2))(x)
    dense_loss = lambda x: jnp.sum(jnp.sin(x @ dense))  # noqa: E731
    want_hvp = jax.grad(lambda x: jnp.sum(jax.grad(dense_loss)(x) ** 2))(x)
    # Magnitudes reach ~500 here: the tolerance follows them (f32 sums in another order).
    assert_close(hvp, want_hvp, jnp.float32, float(jnp.max(jnp.abs(want_hvp))))


def test_differentiating_in_the_weights_raises():
    wq = jsp.fromdense(weight(64, 8), jsp.Int4(32))
    x = tokens(2, 64)
    with pytest.raises(ValueError, match="frozen"):
        jax.grad(lambda scales: jnp.sum(x @ wq.replace(scales=scales)))(wq.scales)


# ====================================================================== bad input
def test_bad_input_names_the_argument():
    w = weight(96, 8)
    with pytest.raises(ValueError, match="in=96 is not a multiple of group_size=64"):
        jsp.fromdense(w, jsp.Int4(64))
    with pytest.raises(ValueError, match="must be finite"):
        jsp.fromdense(w.at[3, 2].set(jnp.nan), jsp.Int4(32))
    with pytest.raises(ValueError, match="must be finite"):
        jsp.fromdense(w.at[3, 2].set(jnp.inf), jsp.Int4(32, jsp.NM(2, 4)))
    wq = jsp.fromdense(w, jsp.Int4(32))
    with pytest.raises(ValueError, match=r"scales must have shape \(3, 8\)"):
        jsp.Int4Weight(wq.qweight, wq.scales[:2], group_size=32, in_features=96)
    with pytest.raises(TypeError, match="qweight must be uint8"):
        jsp.Int4Weight(wq.qweight.astype(jnp.int32), wq.scales, group_size=32, in_features=96)
    with pytest.raises(ValueError, match="qweight must have shape"):
        jsp.Int4Weight(wq.qweight[:10], wq.scales, group_size=32, in_features=96)
    with pytest.raises(ValueError, match="codes must be in"):
        jsp.Int4Weight.from_codes(np.full((64, 2), 9), jnp.ones((2, 2)), group_size=32)
    with pytest.raises(ValueError, match="x must have last dimension 96"):
        jnp.ones((2, 95)) @ wq


# ====================================================================== layers, frozen weights
@pytest.mark.parametrize("spec", ["int4:g32", "int4:g32+2:4"])
def test_nnx_layer_trains_nothing_of_the_weight(spec):
    layer = jsp.nn.SparseLinear(64, 16, sparsity=spec, rngs=nnx.Rngs(0))
    frozen = {n: np.asarray(getattr(layer, n)[...]) for n in layer.sparsity.format.array_names()}
    params = nnx.state(layer, nnx.Param)
    assert set(jax.tree_util.tree_leaves(jax.tree.map(lambda a: a.shape, params))) == {16}
    optimizer = nnx.Optimizer(layer, optax.adam(1e-1), wrt=nnx.Param)
    x = tokens(8, 64)

    def loss(model):
        return jnp.mean((model(x) - 1.0) ** 2)

    for _ in range(3):
        grads = nnx.grad(loss)(layer)
        optimizer.update(layer, grads)
    for name, before in frozen.items():
        np.testing.assert_array_equal(np.asarray(getattr(layer, name)[...]), before)
    assert not np.allclose(np.asarray(layer.bias[...]), 0.0)
    want = x @ layer.weight.todense() + layer.bias[...]
    assert_close(layer(x), want, jnp.float32, 8)


def test_layer_from_dense_and_back():
    linear = nnx.Linear(64, 12, rngs=nnx.Rngs(1))
    layer = jsp.nn.SparseLinear.from_dense(linear, jsp.Int4(32))
    x = tokens(3, 64)
    assert_close(layer(x), x @ layer.weight.todense() + linear.bias[...], jnp.float32, 8)
    dense = layer.to_dense()
    np.testing.assert_array_equal(np.asarray(dense.kernel[...]),
                                  np.asarray(layer.weight.todense()))


def test_layer_dtype_sets_the_product_dtype():
    layer = jsp.nn.SparseLinear(64, 8, sparsity="int4:g32", dtype=jnp.bfloat16,
                                rngs=nnx.Rngs(0))
    assert layer(tokens(2, 64)).dtype == jnp.bfloat16


def test_linen_dense_holds_the_weight_as_sparsity_state():
    module = jsp.linen.SparseDense(8, sparsity="int4:g32+2:4")
    variables = module.init(jax.random.key(0), tokens(2, 64))
    assert set(variables["params"]) == {"bias"}
    assert set(variables["sparsity"]) == {"qweight", "positions", "scales"}
    y = module.apply(variables, tokens(2, 64))
    assert y.shape == (2, 8)


# ====================================================================== checkpoints
@pytest.mark.parametrize("spec", [jsp.Int4(128), jsp.Int4(128, jsp.NM(2, 4))], ids=str)
def test_checkpoints_are_bit_exact_at_half_a_byte_per_weight(spec, tmp_path):
    wq = jsp.fromdense(weight(1024, 256, dtype=jnp.bfloat16), spec)
    per_weight = 0.5 if spec.sparsity is None else 0.25 + 1 / 8
    assert wq.nbytes == 1024 * 256 * per_weight + wq.scales.nbytes
    layer = jsp.nn.SparseLinear(1024, 256, sparsity=spec, use_bias=False,
                                param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    fresh = jsp.nn.SparseLinear(1024, 256, sparsity=spec, use_bias=False,
                                param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    data = serialization.to_bytes(nnx.to_pure_dict(nnx.state(layer)))
    assert len(data) < 1.05 * wq.nbytes  # About half a byte (or 3/8) per weight plus scales.
    state = nnx.state(fresh)
    nnx.replace_by_pure_dict(state, serialization.from_bytes(nnx.to_pure_dict(state), data))
    nnx.update(fresh, state)
    for name in spec.format.array_names():
        np.testing.assert_array_equal(np.asarray(getattr(fresh, name)[...]).view(np.uint8),
                                      np.asarray(getattr(layer, name)[...]).view(np.uint8))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", {"w": wq})
    checkpointer.wait_until_finished()
    back = checkpointer.restore(tmp_path / "ckpt", {"w": wq})["w"]
    assert type(back) is type(wq) and back.spec == wq.spec
    np.testing.assert_array_equal(np.asarray(back.todense(), np.float32),
                                  np.asarray(wq.todense(), np.float32))


def test_mixed_precision_trains_adapters_on_a_frozen_int4_base():
    """QLoRA's shape: a frozen int4 weight plus a trainable low-rank adapter, bf16 compute."""
    mp = jsp.mixed_precision
    rng = np.random.default_rng(7)
    params = {"w": jsp.fromdense(weight(64, 16), jsp.Int4(32)),
              "a": jnp.asarray(rng.standard_normal((64, 4)) * 0.1, jnp.float32),
              "b": jnp.zeros((4, 16), jnp.float32)}
    x = tokens(8, 64)
    target = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)

    def loss(p, x, y):
        return jnp.mean((x @ p["w"] + (x @ p["a"]) @ p["b"] - y) ** 2)

    train = mp.make_train_step(loss, optax.adam(1e-2), compute_dtype=jnp.bfloat16)
    state = train.init(params)
    step = jax.jit(train.step)
    for _ in range(3):
        state, info = step(state, x, target)
    for name in ("qweight", "scales"):
        np.testing.assert_array_equal(np.asarray(getattr(state.params["w"], name)),
                                      np.asarray(getattr(params["w"], name)))
    assert not np.array_equal(np.asarray(state.params["b"]), np.asarray(params["b"]))
    assert bool(info.finite)


class _Mlp(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(64, 32, rngs=rngs)
        self.down = nnx.Linear(32, 8, rngs=rngs)
        self.odd = nnx.Linear(8, 6, rngs=rngs)  # in=8 is not a multiple of group_size=32

    def __call__(self, x):
        return self.odd(self.down(nnx.relu(self.up(x))))


def test_the_same_surgery_quantises_a_model():
    model = _Mlp(nnx.Rngs(0))
    quantised = jsp.nn.sparsify(model, "int4:g32")
    assert isinstance(quantised.up, jsp.nn.SparseLinear)
    assert isinstance(quantised.down, jsp.nn.SparseLinear)
    assert isinstance(quantised.odd, nnx.Linear)  # Skipped, with the reason logged.
    x = tokens(4, 64)
    up = x @ quantised.up.weight.todense() + model.up.bias[...]
    down = nnx.relu(up) @ quantised.down.weight.todense() + model.down.bias[...]
    assert_close(quantised(x), model.odd(down), jnp.float32, 8)
    back = jsp.nn.densify(quantised)
    assert_close(back(x), quantised(x), jnp.float32, 8)


@pytest.mark.parametrize("spec", [jsp.Int4(32), jsp.Int4(32, jsp.NM(2, 4))], ids=str)
def test_every_path_computes_the_same_product(spec):
    wq = jsp.fromdense(weight(64, 12), spec)
    x = tokens(70, 64)
    want = x @ wq.todense()
    for path in ("sparse", "engine", "dense"):
        assert_close(jsp.matmul(x, wq, path=path), want, jnp.float32, 8, err_msg=path)
    # The AVX-512 units keep the kernel at every token count (panels from 16 tokens), except bf16
    # where the engine's bf16 tiles are not built; the units without panels (avx2, portable)
    # hand many tokens to XLA: avx2 from 192 in f32 and f16, from 512 in bf16 (ops/dispatch.py).
    for isa in ("avx512", "avx512bf16", "amx"):
        assert jsp.choose_path(4096, jnp.float32, spec, isa=isa) == "sparse"
    for isa in ("avx512bf16", "amx"):
        assert jsp.choose_path(4096, jnp.bfloat16, spec, isa=isa) == "sparse"
    assert jsp.choose_path(4096, jnp.bfloat16, spec, isa="avx512") == "dense"
    for dtype, most in ((jnp.float32, 191), (jnp.float16, 191), (jnp.bfloat16, 511)):
        assert jsp.choose_path(most, dtype, spec, isa="avx2") == "sparse"
        assert jsp.choose_path(most + 1, dtype, spec, isa="avx2") == "dense"
    assert jsp.choose_path(1, jnp.bfloat16, spec, isa="avx2") == "sparse"


def test_int8_activations_are_a_spec_value_on_every_path():
    """`Int4(..., activations="int8")`: the same codes, x quantised per token and group on the fly;
    every path computes that quantised product, the layers take the string form."""
    w, x = weight(128, 24), tokens(9, 128)
    wq = jsp.fromdense(w, jsp.Int4(32))
    wa = jsp.fromdense(w, jsp.Int4(32, activations="int8"))
    assert wa.activations == "int8" and str(wa.spec) == "int4:g32:a8"
    np.testing.assert_array_equal(np.asarray(wa.qweight), np.asarray(wq.qweight))
    exact = x @ wq
    for path in ("sparse", "engine", "dense"):
        got = jsp.matmul(x, wa, path=path)
        assert_close(got, x @ wa, jnp.float32, 8, err_msg=path)
        rel = jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact)
        assert 1e-4 < float(rel) < 2e-2, path  # The activations' rounding, nothing else.
    layer = jsp.nn.SparseLinear(128, 24, sparsity="int4:g32:a8", rngs=nnx.Rngs(0))
    assert layer(x).shape == (9, 24) and layer.weight.activations == "int8"
    with pytest.raises(ValueError, match="int8 activations run on the CPU"):
        wa.packed_for("cuda")
