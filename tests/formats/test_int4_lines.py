"""`Int4LinesWeight` and `Int4NMLinesWeight`, the CPU inference forms of int4 weights
(`wq.with_lines()`): packed once and back bit for bit, the same products and x-gradients as the
canonical weight at every token count and dtype, stacks of weights, serialisation, and what they
refuse."""

from __future__ import annotations

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp
from tests._check import assert_close, scale_for


def weight(k=256, n=70, group=64, dtype=jnp.float32, batch=(), sparse=False):
    w = np.random.default_rng(k + n).standard_normal((*batch, k, n)).astype(np.float32)
    spec = jsp.Int4(group, sparsity=jsp.NM(2, 4) if sparse else None)
    return jsp.fromdense(jnp.asarray(w, dtype), spec)


def test_packed_once_and_back_bit_for_bit():
    wq = weight()
    wl = jax.jit(lambda w: w.with_lines())(wq)
    assert isinstance(wl, jsp.Int4LinesWeight) and wl.device == "cpu"
    assert wl.shape == wq.shape and wl.dtype == wq.dtype and wl.lines.shape == (2, 128, 64)
    back = wl.packed_for("cpu")
    assert isinstance(back, jsp.Int4Weight)
    np.testing.assert_array_equal(back.qweight, wq.qweight)
    np.testing.assert_array_equal(back.scales, wq.scales)
    np.testing.assert_array_equal(wl.todense(), wq.todense())
    assert wl.with_lines() is wl and wl.astype(jnp.bfloat16).lines is wl.lines


# 1 and 5 tokens stream the lines; 40 take the f32 panels or the bf16 tiles, reading the lines
# (the 2:4 lines: f32 and f16 stream at every token count).
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("t", [1, 5, 40])
def test_products_and_x_gradients_are_the_canonical_ones(t, dtype, sparse):
    wq = weight(dtype=dtype, sparse=sparse)
    wl = wq.with_lines()
    x = jnp.asarray(np.random.default_rng(t).standard_normal((t, 256)), dtype)
    assert_close(jax.jit(lambda x, w: x @ w)(x, wl), x @ wq, dtype, scale_for(256))
    # One cotangent for both (a loss of y would feed each its own rounding of y).
    dy = jnp.asarray(np.random.default_rng(9).standard_normal((t, 70)), dtype)
    grad = jax.grad(lambda x, w: jnp.sum((x @ w).astype(jnp.float32) * dy.astype(jnp.float32)))
    assert_close(grad(x, wl), grad(x, wq), dtype, scale_for(70))


def test_a_stack_of_weights_multiplies_per_entry():
    wq = weight(k=128, n=40, group=32, batch=(3,))
    wl = wq.with_lines()
    assert wl.batch_shape == (3,) and wl.lines.shape == (3, 1, 64, 64)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 128)), jnp.float32)
    assert_close(x @ wl, x @ wq, jnp.float32, scale_for(128))


def test_serialisation_round_trips_bit_exact():
    wl = weight().with_lines()
    data = flax.serialization.to_bytes(wl.arrays())
    arrays = flax.serialization.from_bytes(wl.arrays(), data)
    restored = jsp.Int4LinesWeight.from_arrays(wl.spec, wl.in_features, arrays)
    # Half a byte per weight, outputs padded to a multiple of 64 (70 -> 128), plus the scales.
    assert len(data) < 128 * 256 // 2 + 4 * wl.scales.size + 200
    np.testing.assert_array_equal(restored.lines, wl.lines)
    np.testing.assert_array_equal(restored.scales, wl.scales)


@pytest.mark.parametrize("sparse", [False, True])
def test_lines_of_the_flat_layout_of_older_checkpoints_are_viewed_by_blocks(sparse):
    wl = weight(sparse=sparse).with_lines()
    flat = wl.lines.reshape(-1, 64)  # As jaxsparse wrote them before 2026-12-07.
    old = type(wl).from_arrays(wl.spec, wl.in_features, {"lines": flat, "scales": wl.scales})
    np.testing.assert_array_equal(old.lines, wl.lines)
    with pytest.raises(ValueError, match=r"lines must have shape \(2, \d+, 64\)"):
        type(wl).from_arrays(wl.spec, wl.in_features, {"lines": flat[:-1], "scales": wl.scales})


def test_what_the_lines_do_not_hold_is_refused_by_name():
    w = jnp.ones((64, 8))
    with pytest.raises(ValueError, match="int8 activations read the canonical layout"):
        jsp.fromdense(w, jsp.Int4(32, activations="int8")).with_lines()
    with pytest.raises(TypeError, match="dense int4 weight"):
        jsp.Int4LinesWeight.from_canonical(jsp.fromdense(w, jsp.Int4(32, sparsity=jsp.NM(2, 4))))
    wl = jsp.fromdense(w, jsp.Int4(32)).with_lines()
    with pytest.raises(ValueError, match="frozen"):
        jax.grad(lambda s: jnp.sum(jnp.ones((1, 64)) @ wl.replace(scales=s)))(wl.scales)


# ---------------------------------------------------------------------- the 2:4 form's lines
def test_nm_lines_packed_once_and_back_bit_for_bit():
    wq = weight(k=200, group=40, sparse=True)  # a ragged last chunk of 8 inputs
    wl = jax.jit(lambda w: w.with_lines())(wq)
    assert isinstance(wl, jsp.Int4NMLinesWeight) and wl.device == "cpu"
    assert wl.shape == wq.shape and wl.dtype == wq.dtype and wl.sparsity == jsp.NM(2, 4)
    assert wl.lines.shape == (2, 13 * 8, 64)
    back = wl.packed_for("cpu")
    assert isinstance(back, jsp.Int4NMWeight)
    for name in ("qweight", "positions", "scales"):
        np.testing.assert_array_equal(getattr(back, name), getattr(wq, name))
    np.testing.assert_array_equal(wl.todense(), wq.todense())
    np.testing.assert_array_equal(wl.mask(), wq.mask())
    assert wl.with_lines() is wl and wl.astype(jnp.bfloat16).lines is wl.lines


def test_nm_lines_stack_and_serialisation():
    wq = weight(k=128, n=40, group=32, batch=(3,), sparse=True)
    wl = wq.with_lines()
    assert wl.batch_shape == (3,) and wl.lines.shape == (3, 1, 8 * 8, 64)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 128)), jnp.float32)
    assert_close(x @ wl, x @ wq, jnp.float32, scale_for(128))
    data = flax.serialization.to_bytes(wl.arrays())
    restored = jsp.Int4NMLinesWeight.from_arrays(
        wl.spec, wl.in_features, flax.serialization.from_bytes(wl.arrays(), data))
    # Half a byte per weight (values and indices), outputs padded to 64, plus the scales.
    assert len(data) < 3 * 128 * 64 // 2 + 4 * wl.scales.size + 300
    np.testing.assert_array_equal(restored.lines, wl.lines)


def test_nm_lines_refuse_what_they_do_not_hold_by_name():
    w = jnp.ones((64, 8))
    with pytest.raises(TypeError, match=r"int4 \+ 2:4 weight \(Int4NMWeight\)"):
        jsp.Int4NMLinesWeight.from_canonical(jsp.fromdense(w, jsp.Int4(32)))
    wl = jsp.fromdense(w, jsp.Int4(32, sparsity=jsp.NM(2, 4))).with_lines()
    bad = np.asarray(wl.lines).copy()
    bad[0, 4, 1] = 0x10  # group 1's byte of an index line: index 0 (group 0's input) and 1
    with pytest.raises(ValueError, match="lines hold an index byte"):
        wl.replace(lines=jnp.asarray(bad))
    with pytest.raises(ValueError, match=r"lines must have shape \(1, 32, 64\)"):
        wl.replace(lines=wl.lines[:, :-8])
    with pytest.raises(ValueError, match="frozen"):
        jax.grad(lambda s: jnp.sum(jnp.ones((1, 64)) @ wl.replace(scales=s)))(wl.scales)
