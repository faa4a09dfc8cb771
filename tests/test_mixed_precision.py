"""jaxsparse.mixed_precision: loss scale arithmetic, casting, finiteness, skipped updates, and
full float16 training loops (dense and with an NMSparse weight) under jit."""

import doctest
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as jsp
from jaxsparse import mixed_precision as mp
from tests._check import keys, random_array

F16, BF16, F32 = jnp.float16, jnp.bfloat16, jnp.float32


def assert_tree_bitwise_equal(a, b):
    """Same structure, same dtypes, same bits in every leaf (NaN == NaN, -0.0 != 0.0)."""
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        x, y = np.atleast_1d(np.asarray(x)), np.atleast_1d(np.asarray(y))
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))


def python_adjust(scale, good, finite, *, growth_interval, factor, min_scale):
    """Independent model of the dynamic loss scale (the formula of dynamic_loss_scale)."""
    if not finite:
        return max(scale / factor, min_scale), 0
    if good + 1 >= growth_interval:
        grown = np.float32(scale) * np.float32(factor)
        return (float(grown) if np.isfinite(grown) else scale), 0
    return scale, good + 1


# ====================================================================== dynamic_loss_scale
def test_dynamic_loss_scale_defaults_and_dtypes():
    s = mp.dynamic_loss_scale()
    assert isinstance(s, mp.DynamicLossScale)
    assert (float(s.scale), int(s.good_steps), int(s.growth_interval)) == (2.0**15, 0, 2000)
    assert (float(s.factor), float(s.min_scale)) == (2.0, 1.0)
    assert [x.dtype for x in s] == [F32, jnp.int32, jnp.int32, F32, F32]
    assert all(x.shape == () for x in s)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(growth_interval=0), ValueError,
         r"growth_interval must be in \[1, 2147483647\], got 0"),
        (dict(growth_interval=-5), ValueError, r"growth_interval must be in \[1, .*got -5"),
        (dict(growth_interval=2**31), ValueError, r"growth_interval must be in \[1, "),
        (dict(growth_interval=10.0), TypeError, r"growth_interval must be an int, got float 10.0"),
        (dict(growth_interval=True), TypeError, r"growth_interval must be an int, got bool"),
        (dict(factor=1.0), ValueError, r"factor must be > 1, got 1.0"),
        (dict(factor=0.5), ValueError, r"factor must be > 1, got 0.5"),
        (dict(factor=float("inf")), ValueError, r"factor must be finite in float32, got inf"),
        (dict(init_scale=0), ValueError, r"init_scale must be > 0, got 0.0"),
        (dict(init_scale=-2.0), ValueError, r"init_scale must be > 0, got -2.0"),
        (dict(init_scale=float("nan")), ValueError, r"init_scale must be finite in float32"),
        (dict(init_scale=2.0**200), ValueError, r"init_scale must be finite in float32"),
        (dict(init_scale="big"), TypeError, r"init_scale must be a real number, got str 'big'"),
        (dict(init_scale=None), TypeError, r"init_scale must be a real number, got NoneType"),
        (dict(min_scale=0.0), ValueError, r"min_scale must be > 0, got 0.0"),
        (dict(init_scale=0.5), ValueError, r"init_scale must be >= min_scale=1.0, got 0.5"),
    ],
)
def test_dynamic_loss_scale_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=r"jaxsparse.mixed_precision.dynamic_loss_scale: " + match):
        mp.dynamic_loss_scale(**kwargs)


# ====================================================================== adjust
def test_adjust_overflow_shrinks_scale_and_resets_good_steps():
    s = mp.dynamic_loss_scale(init_scale=2.0**10, growth_interval=5)
    for _ in range(3):
        s = mp.adjust(s, True)
    assert (float(s.scale), int(s.good_steps)) == (2.0**10, 3)
    s = mp.adjust(s, jnp.array(False))
    assert (float(s.scale), int(s.good_steps)) == (2.0**9, 0)
    # The growth count starts over: 5 more finite steps are needed.
    for _ in range(4):
        s = mp.adjust(s, True)
    assert float(s.scale) == 2.0**9
    s = mp.adjust(s, True)
    assert (float(s.scale), int(s.good_steps)) == (2.0**10, 0)


@pytest.mark.parametrize("growth_interval", [1, 3])
def test_adjust_grows_after_growth_interval_finite_steps(growth_interval):
    s = mp.dynamic_loss_scale(init_scale=4.0, growth_interval=growth_interval)
    for expected in (8.0, 16.0, 32.0):
        for i in range(growth_interval - 1):
            s = mp.adjust(s, True)
            assert (float(s.scale), int(s.good_steps)) == (expected / 2, i + 1)
        s = mp.adjust(s, True)
        assert (float(s.scale), int(s.good_steps)) == (expected, 0)


@pytest.mark.parametrize("factor, init, floor", [(2.0, 8.0, 1.0), (3.0, 10.0, 2.0)])
def test_adjust_never_drops_below_min_scale(factor, init, floor):
    s = mp.dynamic_loss_scale(init_scale=init, factor=factor, min_scale=floor)
    seen = []
    for _ in range(8):
        s = mp.adjust(s, False)
        seen.append(float(s.scale))
    assert min(seen) == floor and seen[-1] == floor
    assert seen == sorted(seen, reverse=True)


def test_adjust_growth_never_overflows_float32():
    big = float(np.finfo(np.float32).max) / 1.5
    s = mp.adjust(mp.dynamic_loss_scale(init_scale=big, growth_interval=1), True)
    assert np.isfinite(float(s.scale)) and float(s.scale) == np.float32(big)
    assert int(s.good_steps) == 0


def test_adjust_under_jit_and_scan_matches_python_model():
    flags = np.asarray(jax.random.bernoulli(jax.random.key(3), 0.8, (200,)))
    cfg = dict(growth_interval=4, factor=2.0, min_scale=0.25)
    s0 = mp.dynamic_loss_scale(init_scale=2.0, **cfg)

    def body(s, finite):
        s = mp.adjust(s, finite)
        return s, (s.scale, s.good_steps)

    _, (scales, goods) = jax.jit(lambda s, f: jax.lax.scan(body, s, f))(s0, jnp.asarray(flags))
    scale, good = 2.0, 0
    for t, finite in enumerate(flags):
        scale, good = python_adjust(scale, good, bool(finite), **cfg)
        assert (float(scales[t]), int(goods[t])) == (scale, good), f"step {t}"
    assert float(scales.min()) >= 0.25


@pytest.mark.parametrize(
    "finite, match",
    [(jnp.ones(3, bool), r"bool scalar .*got bool array of shape \(3,\)"),
     (1.0, r"bool scalar .*got float32 array of shape \(\)"),
     (jnp.int32(1), r"bool scalar .*got int32")],
)
def test_adjust_rejects_non_bool_scalar(finite, match):
    where = r"jaxsparse.mixed_precision.adjust: finite must be a "
    with pytest.raises(TypeError, match=where + match):
        mp.adjust(mp.dynamic_loss_scale(), finite)


@pytest.mark.parametrize("fn", [mp.adjust, mp.scale_loss, mp.unscale])
def test_loss_scale_functions_reject_a_non_state(fn):
    with pytest.raises(TypeError, match=r"state must be a DynamicLossScale .*got float"):
        if fn is mp.adjust:
            fn(2.0**15, True)
        else:
            fn(jnp.ones(()), 2.0**15)


# ====================================================================== scale_loss / unscale
def test_scale_loss_multiplies_in_float32():
    s = mp.dynamic_loss_scale(init_scale=2.0**20)
    out = mp.scale_loss(jnp.float16(0.5), s)
    assert out.dtype == F32 and float(out) == 2.0**19  # beyond the f16 range, yet finite
    assert mp.scale_loss(jnp.ones((2,), BF16), s).dtype == F32
    with pytest.raises(TypeError, match=r"scale_loss: loss must be a float array, got dtype int32"):
        mp.scale_loss(jnp.int32(3), s)


def test_unscale_promotes_to_float32_and_leaves_other_leaves_alone():
    s = mp.dynamic_loss_scale(init_scale=2.0**12)
    true = {"a": np.array([0.5, -3.0], np.float32), "b": np.array([1e-6], np.float32)}
    idx = jnp.arange(4, dtype=jnp.uint8)
    float0 = jax.grad(lambda p: p["x"].sum(), allow_int=True)({"x": jnp.ones(2), "i": idx})["i"]
    grads = {
        "a": (jnp.asarray(true["a"]) * 2.0**12).astype(F16),
        "b": (jnp.asarray(true["b"]) * 2.0**12).astype(BF16),
        "c": jnp.asarray(true["a"]) * 2.0**12,
        "idx": idx,
        "float0": float0,
        "none": None,
    }
    out = mp.unscale(grads, s)
    assert out["a"].dtype == out["b"].dtype == out["c"].dtype == F32
    np.testing.assert_array_equal(out["a"], true["a"])
    np.testing.assert_array_equal(out["c"], true["a"])
    np.testing.assert_allclose(out["b"], true["b"], rtol=1e-2)
    assert out["idx"] is idx and out["float0"] is float0 and out["none"] is None


def test_loss_scaling_recovers_gradients_that_underflow_float16():
    w = jnp.full((4,), 1e-2, F32)

    def loss(w):  # d/dw = 2e-6 * w = 2e-8: below half the smallest f16 subnormal (6e-8).
        w16 = w.astype(F16)
        return (jnp.float16(1e-6) * jnp.sum(w16 * w16)).astype(F32)

    assert not np.any(jax.grad(loss)(w))  # flushed to zero without scaling
    s = mp.dynamic_loss_scale(init_scale=2.0**15)
    g = mp.unscale(jax.grad(lambda w: mp.scale_loss(loss(w), s))(w), s)
    np.testing.assert_allclose(g, 2e-8, rtol=5e-2)


# ====================================================================== all_finite
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_all_finite_detects_inf_and_nan_in_any_float_leaf(dtype, bad):
    tree = {"a": jnp.ones((3,), F32), "b": [jnp.zeros((2, 2), dtype), jnp.ones((), dtype)]}
    assert bool(mp.all_finite(tree)) and bool(jax.jit(mp.all_finite)(tree))
    tree["b"][0] = tree["b"][0].at[1, 0].set(bad)
    assert not bool(mp.all_finite(tree)) and not bool(jax.jit(mp.all_finite)(tree))


def test_all_finite_ignores_integer_float0_and_empty_leaves():
    ws = jsp.NMSparse.fromdense(random_array(keys(0, 1)[0], (8, 3)), n=2, m=4)
    assert ws.indices.dtype == jnp.uint8
    grads = jax.grad(lambda p: jnp.sum(p["w"].values), allow_int=True)({"w": ws, "n": jnp.int32(7)})
    assert grads["w"].indices.dtype == jax.dtypes.float0
    assert bool(mp.all_finite(grads)) and bool(mp.all_finite({"w": ws, "n": 3, "none": None}))
    assert bool(mp.all_finite({})) and bool(mp.all_finite(None))
    bad = {"w": ws.replace(values=ws.values.at[0, 0].set(jnp.nan))}
    assert not bool(mp.all_finite(bad)) and not bool(jax.jit(mp.all_finite)(bad))
    assert mp.all_finite(grads).dtype == jnp.bool_ and mp.all_finite(grads).shape == ()


# ====================================================================== cast_tree
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_cast_tree_casts_float_leaves_only(dtype):
    k = keys(1, 3)
    ws = jsp.NMSparse.fromdense(random_array(k[0], (10, 4)), n=2, m=4)
    tree = {
        "w": ws,
        "f32": random_array(k[1], (3,)),
        "bf16": random_array(k[2], (2,), BF16),
        "np": np.ones((2,), np.float32),
        "i32": jnp.arange(3),
        "u8": jnp.arange(3, dtype=jnp.uint8),
        "bool": jnp.array([True, False]),
        "c64": jnp.ones((2,), jnp.complex64),
        "py": 0.5,
        "none": None,
    }
    for out in (mp.cast_tree(tree, dtype), jax.jit(mp.cast_tree, static_argnums=1)(tree, dtype)):
        assert isinstance(out["w"], jsp.NMSparse) and out["w"].shape == ws.shape
        assert out["w"].values.dtype == dtype and out["w"].indices.dtype == jnp.uint8
        np.testing.assert_array_equal(out["w"].indices, ws.indices)
        for name in ("f32", "bf16", "np"):
            assert out[name].dtype == dtype
            np.testing.assert_array_equal(out[name], jnp.asarray(tree[name]).astype(dtype))
        assert out["i32"].dtype == jnp.int32 and out["u8"].dtype == jnp.uint8
        assert out["bool"].dtype == jnp.bool_ and out["c64"].dtype == jnp.complex64
        assert out["py"] == 0.5 and out["none"] is None
    eager = mp.cast_tree(tree, dtype)
    assert eager["w"].indices is ws.indices and eager["u8"] is tree["u8"]  # not even copied


@pytest.mark.parametrize(
    "dtype, got",
    [(jnp.int32, "int32"), (jnp.uint8, "uint8"), (jnp.bool_, "bool"), (jnp.complex64, "complex64"),
     ("int8", "int8"), (None, "None"), ("no-such-dtype", "'no-such-dtype'")],
)
def test_cast_tree_rejects_non_float_dtype(dtype, got):
    with pytest.raises(
        TypeError, match=rf"cast_tree: dtype must be a floating dtype \(.*\), got {got}"
    ):
        mp.cast_tree({"a": jnp.ones(2)}, dtype)


# ====================================================================== skip_nonfinite
def test_skip_nonfinite_skips_update_and_keeps_inner_state():
    params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.zeros(())}
    good = [{"w": jnp.array([0.1, 0.2, -0.3]) * (i + 1), "b": jnp.float32(0.5)} for i in range(3)]
    bad = [{"w": good[0]["w"].at[1].set(v), "b": jnp.float32(0.5)} for v in (jnp.inf, jnp.nan)]
    bad.append({"w": good[0]["w"], "b": jnp.float32(-jnp.inf)})
    inner = optax.adam(1e-1)
    tx = mp.skip_nonfinite(inner)
    update = jax.jit(tx.update)

    state, ref_state, p, ref_p = tx.init(params), inner.init(params), params, params
    for g, is_bad in [(good[0], 0), (bad[0], 1), (good[1], 0), (bad[1], 1), (bad[2], 1),
                      (good[2], 0)]:
        before = state
        updates, state = update(g, state, p)
        if is_bad:
            assert not bool(state.last_finite)
            assert_tree_bitwise_equal(updates, jax.tree.map(jnp.zeros_like, p))
            assert_tree_bitwise_equal(state.inner_state, before.inner_state)
        else:
            assert bool(state.last_finite)
            ref_updates, ref_state = inner.update(g, ref_state, ref_p)
            ref_p = optax.apply_updates(ref_p, ref_updates)
        p = optax.apply_updates(p, updates)
    assert int(state.total_skipped) == 3
    # The skipped steps left no trace: the same as the inner optimizer on the good steps only.
    np.testing.assert_allclose(p["w"], ref_p["w"], rtol=1e-6)
    assert [x.dtype for x in jax.tree.leaves(state.inner_state)] == [
        x.dtype for x in jax.tree.leaves(ref_state)
    ]


def test_skip_nonfinite_ignores_uint8_indices_and_zeroes_skipped_updates():
    ws = jsp.NMSparse.fromdense(random_array(keys(2, 1)[0], (8, 3)), n=2, m=4)
    tx = mp.skip_nonfinite(optax.identity())
    state = tx.init({"w": ws})
    updates, state = tx.update({"w": ws}, state)
    assert bool(state.last_finite) and isinstance(updates["w"], jsp.NMSparse)
    bad = {"w": ws.replace(values=ws.values.at[1, 1].set(-jnp.inf))}
    updates, state = jax.jit(tx.update)(bad, state)
    assert not bool(state.last_finite) and int(state.total_skipped) == 1
    assert updates["w"].values.dtype == F32 and updates["w"].indices.dtype == jnp.uint8
    assert not np.any(updates["w"].values) and not np.any(updates["w"].indices)


def test_skip_nonfinite_rejects_a_non_transformation():
    with pytest.raises(TypeError, match=r"skip_nonfinite: inner must be an optax Gradient"
                                        r"Transformation \(with init and update\), got object"):
        mp.skip_nonfinite(object())


# ====================================================================== make_train_step
def mlp_params(key, sizes=(8, 16, 1), sparse_first=False):
    k1, k2 = jax.random.split(key)
    w1 = jax.random.normal(k1, sizes[:2]) / np.sqrt(sizes[0])
    params = {
        "w1": jsp.NMSparse.fromdense(w1, n=2, m=4) if sparse_first else w1,
        "b1": jnp.zeros(sizes[1]),
        "w2": jax.random.normal(k2, sizes[1:]) / np.sqrt(sizes[1]),
        "b2": jnp.zeros(sizes[2]),
    }
    return params


def mlp_loss(p, x, y, poison=1.0):
    """A 2-layer MLP computed in the dtype of its (already cast) parameters; loss reduced in f32."""
    dtype = p["b1"].dtype
    assert dtype == p["w1"].dtype == p["w2"].dtype  # the step casts before calling us
    h = jax.nn.relu(x.astype(dtype) @ p["w1"] + p["b1"])
    out = h @ p["w2"] + p["b2"]
    return jnp.mean((out.astype(F32) - y) ** 2) * poison


def regression_data(seed, batch=64, features=8):
    kx, kw = keys(seed, 2)
    x = jax.random.normal(kx, (batch, features))
    y = jnp.sin(x @ jax.random.normal(kw, (features, 1)))
    return x, y


@pytest.mark.parametrize("sparse_first", [False, True], ids=["dense", "nm"])
def test_forced_overflow_skips_step_and_halves_scale(sparse_first):
    x, y = regression_data(0)
    train = mp.make_train_step(mlp_loss, optax.adam(1e-2), compute_dtype=F16)
    state = train.init(mlp_params(keys(1, 1)[0], sparse_first=sparse_first),
                       mp.dynamic_loss_scale(init_scale=2.0**24, growth_interval=5))
    step = jax.jit(train.step)
    # One good step first (at a safe scale) so that good_steps and the adam moments are non-zero.
    state = state._replace(loss_scale=state.loss_scale._replace(scale=jnp.float32(2.0**8)))
    state, info = step(state, x, y)
    assert bool(info.finite) and int(state.loss_scale.good_steps) == 1
    state = state._replace(loss_scale=state.loss_scale._replace(scale=jnp.float32(2.0**24)))
    # d(scaled loss)/d(out) = 2 (out - y) / 64 * 2**24 is far beyond f16's 65504: inf in f16.
    new, info = step(state, x, y)
    assert not bool(info.finite) and np.isfinite(float(info.loss))
    assert_tree_bitwise_equal(new.params, state.params)
    assert_tree_bitwise_equal(new.opt_state, state.opt_state)
    assert float(new.loss_scale.scale) == 2.0**23 and int(new.loss_scale.good_steps) == 0


@pytest.mark.parametrize("poison", [np.nan, np.inf], ids=["nan", "inf"])
def test_injected_nonfinite_gradient_is_skipped(poison):
    x, y = regression_data(1)
    train = mp.make_train_step(mlp_loss, optax.sgd(1e-2, momentum=0.9), compute_dtype=F16)
    state = train.init(mlp_params(keys(2, 1)[0], sparse_first=True),
                       mp.dynamic_loss_scale(init_scale=2.0**6, growth_interval=10))
    step = jax.jit(train.step)
    for _ in range(3):
        state, info = step(state, x, y, 1.0)
        assert bool(info.finite)
    assert int(state.loss_scale.good_steps) == 3
    new, info = step(state, x, y, poison)
    assert not bool(info.finite)
    assert_tree_bitwise_equal(new.params, state.params)
    assert_tree_bitwise_equal(new.opt_state, state.opt_state)
    assert (float(new.loss_scale.scale), int(new.loss_scale.good_steps)) == (2.0**5, 0)
    # Training resumes: the next clean step is applied.
    newer, info = step(new, x, y, 1.0)
    assert bool(info.finite) and int(newer.loss_scale.good_steps) == 1
    assert not np.array_equal(newer.params["w2"], new.params["w2"])


def test_scale_grows_after_growth_interval_and_respects_min_scale():
    x, y = regression_data(2)
    train = mp.make_train_step(mlp_loss, optax.sgd(1e-3), compute_dtype=F16)
    params = mlp_params(keys(3, 1)[0])
    state = train.init(params, mp.dynamic_loss_scale(init_scale=4.0, growth_interval=3,
                                                     min_scale=2.0))
    step = jax.jit(train.step)
    scales = []
    for _ in range(6):
        state, info = step(state, x, y, 1.0)
        assert bool(info.finite)
        scales.append(float(state.loss_scale.scale))
    assert scales == [4.0, 4.0, 8.0, 8.0, 8.0, 16.0]
    frozen = state.params
    for expected in (8.0, 4.0, 2.0, 2.0, 2.0):
        state, info = step(state, x, y, np.nan)
        assert not bool(info.finite) and float(state.loss_scale.scale) == expected
    assert_tree_bitwise_equal(state.params, frozen)


def test_nmsparse_indices_ride_along_untouched():
    x, y = regression_data(3)
    params = mlp_params(keys(4, 1)[0], sparse_first=True)
    train = mp.make_train_step(mlp_loss, optax.adam(1e-2), compute_dtype=F16)
    state = train.init(params)
    assert isinstance(state.loss_scale, mp.DynamicLossScale)  # "auto" for f16
    # The optimizer sees only float leaves: the NMSparse in its state holds no indices.
    opt_leaves = jax.tree.leaves(state.opt_state)
    assert all(leaf.dtype != jnp.uint8 for leaf in opt_leaves)
    step = jax.jit(train.step)
    for _ in range(3):
        state, info = step(state, x, y)
    w1 = state.params["w1"]
    assert isinstance(w1, jsp.NMSparse) and (w1.n, w1.m, w1.in_features) == (2, 4, 8)
    assert w1.values.dtype == F32 and w1.indices.dtype == jnp.uint8
    np.testing.assert_array_equal(w1.indices, params["w1"].indices)
    assert not np.array_equal(w1.values, params["w1"].values)
    assert all(state.params[k].dtype == F32 for k in ("b1", "w2", "b2"))


def test_vnmsparse_trains_through_its_values_only():
    x, y = regression_data(5)
    params = mlp_params(keys(6, 1)[0], sizes=(32, 16, 1))
    params["w1"] = jsp.VNMSparse.fromdense(params["w1"], v=16, n=2, m=8)
    train = mp.make_train_step(mlp_loss, optax.adam(1e-2), compute_dtype=jnp.bfloat16)
    state = train.init(params)
    step = jax.jit(train.step)
    for _ in range(3):
        state, info = step(state, *regression_data(5, features=32))
    w1 = state.params["w1"]
    assert isinstance(w1, jsp.VNMSparse) and w1.values.dtype == F32
    np.testing.assert_array_equal(w1.indices, params["w1"].indices)
    np.testing.assert_array_equal(w1.columns, params["w1"].columns)
    assert not np.array_equal(w1.values, params["w1"].values)
    del x, y


class _ScaledSpec(NamedTuple):
    group: int


class _Scaled(jsp.SparseFormat):
    """A format with a frozen *float* array (as int4 group scales will be): roles, not dtypes,
    decide what trains."""

    ARRAYS = (("values", jsp.formats.TRAINABLE), ("scales", jsp.formats.FROZEN))
    SPEC = _ScaledSpec


def test_frozen_float_arrays_of_a_format_never_train():
    w = _Scaled._unflatten((4, 8), (jnp.ones((3, 8)), jnp.full((3, 2), 0.5)))
    params = {"w": w, "b": jnp.zeros(3)}

    def loss(p, x):
        return jnp.sum((x @ (p["w"].values * jnp.repeat(p["w"].scales, 4, axis=1)).T + p["b"]) ** 2)

    train = mp.make_train_step(loss, optax.sgd(0.1), compute_dtype=F32)
    state = train.init(params)
    state, _ = jax.jit(train.step)(state, jnp.ones((2, 8)))
    np.testing.assert_array_equal(state.params["w"].scales, w.scales)
    assert not np.array_equal(state.params["w"].values, w.values)
    assert all(leaf.shape != (3, 2) for leaf in jax.tree.leaves(state.opt_state))


@pytest.mark.parametrize("sparse_first", [False, True], ids=["dense", "nm"])
def test_tiny_float16_mlp_trains_with_dynamic_loss_scale(sparse_first):
    x, y = regression_data(4)
    train = mp.make_train_step(mlp_loss, optax.adam(2e-2), compute_dtype=F16)
    state = train.init(mlp_params(keys(5, 1)[0], sparse_first=sparse_first),
                       mp.dynamic_loss_scale(init_scale=2.0**24, growth_interval=8))
    step = jax.jit(train.step)
    losses, finite = [], []
    for _ in range(40):
        state, info = step(state, x, y)
        losses.append(float(info.loss))
        finite.append(bool(info.finite))
    skipped = finite.count(False)
    assert skipped >= 1 and not finite[0]  # 2**24 overflows f16 at once
    assert skipped < 20
    assert float(state.loss_scale.scale) < 2.0**24
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.5 * losses[0], losses
    assert all(leaf.dtype in (F32, jnp.uint8) for leaf in jax.tree.leaves(state.params))


def test_bfloat16_compute_without_loss_scale():
    x, y = regression_data(5)
    train = mp.make_train_step(mlp_loss, optax.adam(2e-2), compute_dtype=BF16)
    state = train.init(mlp_params(keys(6, 1)[0]))
    assert state.loss_scale is None  # "auto": bf16 has f32's exponent range
    step = jax.jit(train.step)
    losses = []
    for _ in range(30):
        state, info = step(state, x, y)
        assert bool(info.finite)
        losses.append(float(info.loss))
    assert state.loss_scale is None and losses[-1] < 0.5 * losses[0]
    # Non-finite gradients are still skipped without a loss scale.
    new, info = step(state, x, y, np.nan)
    assert not bool(info.finite)
    assert_tree_bitwise_equal(new.params, state.params)


def test_low_precision_master_params_with_a_promoting_optimizer():
    # Not the recommended setup (keep f32 masters), but it must not break the skip/apply branch:
    # adam's moments of bf16 params turn f32 after the first f32 gradient.
    x, y = regression_data(7)
    params = mp.cast_tree(mlp_params(keys(9, 1)[0]), BF16)
    train = mp.make_train_step(mlp_loss, optax.adam(1e-2), compute_dtype=F16)
    step = jax.jit(train.step)
    skipped, info = step(train.init(params), x, y, np.nan)
    assert not bool(info.finite)
    assert_tree_bitwise_equal(skipped.params, params)
    applied, info = step(skipped, x, y, 1.0)
    assert bool(info.finite) and applied.params["w2"].dtype == BF16
    dtypes = [leaf.dtype for leaf in jax.tree.leaves(skipped.opt_state)]
    assert dtypes == [leaf.dtype for leaf in jax.tree.leaves(applied.opt_state)]
    assert F32 in dtypes  # adam's first moment was promoted, in the skipped branch as well
    # The same for skip_nonfinite's inner state.
    tx = mp.skip_nonfinite(optax.adam(1e-2))
    grads = {"w": jnp.array([1.0, jnp.nan])}
    updates, state = jax.jit(tx.update)(grads, tx.init({"w": jnp.ones(2, BF16)}))
    assert not bool(state.last_finite) and not np.any(updates["w"])
    assert state.inner_state[0].mu["w"].dtype == F32


def test_has_aux_and_explicit_none_loss_scale():
    x, y = regression_data(6)

    def loss_fn(p, x, y):
        loss = mlp_loss(p, x, y)
        return loss, {"double": 2 * loss}

    train = mp.make_train_step(loss_fn, optax.sgd(1e-2), compute_dtype=F16, has_aux=True)
    state = train.init(mlp_params(keys(7, 1)[0]), loss_scale=None)
    state, info = jax.jit(train.step)(state, x, y)
    assert state.loss_scale is None and bool(info.finite)
    np.testing.assert_allclose(info.aux["double"], 2 * info.loss, rtol=1e-6)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((3, optax.sgd(0.1)), {}, r"loss_fn must be callable, got int"),
        ((mlp_loss, "adam"), {}, r"optimizer must be an optax GradientTransformation .*got str"),
        ((mlp_loss, optax.sgd(0.1)), dict(compute_dtype=jnp.int8),
         r"compute_dtype must be a floating dtype .*got int8"),
        ((mlp_loss, optax.sgd(0.1)), dict(has_aux=1), r"has_aux must be a bool, got int"),
    ],
)
def test_make_train_step_rejects_bad_arguments(args, kwargs, match):
    with pytest.raises(TypeError, match=r"jaxsparse.mixed_precision.make_train_step: " + match):
        mp.make_train_step(*args, **kwargs)


def test_train_step_init_rejects_a_bad_loss_scale():
    train = mp.make_train_step(mlp_loss, optax.sgd(0.1))
    with pytest.raises(TypeError, match=r"init: loss_scale must be a DynamicLossScale, None or "
                                        r"'auto', got float"):
        train.init(mlp_params(keys(8, 1)[0]), 2.0**15)


# ====================================================================== docs
def test_docstring_examples():
    result = doctest.testmod(mp, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
