"""The int8-activation int4 product (jaxsparse.ops.int4_a8_matmul, opt-in for the dense form):
the kernels of every ISA against the pure reference (exact integer dots, so only f32 rounding
apart), the activations' quantisation, and its rules (straight-through gradient, vmap, errors)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.ops import int4_a8_matmul, int4_matmul, quantize_activations
from jaxsparse.ops.int4 import _a8_order, int4_a8_matmul_p, int4_a8_matmul_reference
from tests._check import DTYPES, assert_close, once_after, scale_for
from tests.ops.test_int4 import dense_weight, tokens


def reference(x, qweight, scales, group):
    codes, x_scales, sums = quantize_activations(x, group)
    return int4_a8_matmul_reference(_a8_order(codes), x_scales, sums, qweight, scales,
                                    group_size=group)


# (tokens, K, N, group): 1-5 tokens (the 4-token block and its tails), ragged outputs (N = 17,
# 130), groups of 8 and one per column, a weight batch of 2 against x's 1. From 16 tokens the
# units with VNNI take the engine's int8 tiles where the groups are whole k steps of 64 (or one
# per column): one token tile and a ragged panel; a pair of token tiles and a single one, one
# group over K = 200 (padded to 256); two token blocks (256 + 44) of groups of 64; groups of 32,
# which stream.
@pytest.mark.parametrize("t,k,n,group", once_after([
    (1, 64, 16, 32), (5, 256, 130, 128), (3, 200, 17, 8), (6, 392, 70, 392), (16, 256, 130, 128),
    (40, 200, 70, 200), (300, 512, 40, 64), (33, 128, 17, 32)], keep=2))
def test_every_isa_against_the_reference(isa, t, k, n, group):
    weight = dense_weight(k, n, group, batch=2)
    x = tokens(1, t, k)
    # The kernels' integer dots are exact: the results differ by f32 rounding only.
    assert_close(int4_a8_matmul(x, *weight, group_size=group), reference(x, *weight, group),
                 jnp.float32, 0.1 * scale_for(k), err_msg=isa)


@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("t,group", [(7, 32), (40, 64)])  # streamed; the int8 tiles
def test_half_precision_activations_and_scales(dtype, t, group):
    weight = dense_weight(128, 40, group, dtype=dtype)
    x = tokens(1, t, 128, dtype)
    assert_close(int4_a8_matmul(x, *weight, group_size=group), reference(x, *weight, group),
                 dtype, 0.3 * scale_for(128))


def ieee_quantize(x, group):
    """quantize_activations in NumPy: IEEE f32 division and round-half-even, which XLA's compiled
    division does not always give on exact ties (63.5 became 63 in a bf16 fusion)."""
    xf = np.asarray(x).astype(np.float32)
    grouped = xf.reshape(*xf.shape[:-1], -1, group)
    scales = np.abs(grouped).max(-1) * np.float32(1 / 127)
    safe = np.where(scales > 0, scales, np.float32(1))[..., None]
    codes = np.clip(np.round(grouped / safe), -127, 127).astype(np.int8)
    return codes.reshape(xf.shape), scales, codes.astype(np.int32).sum(-1)


# int4_a8_matmul binds the fused target, which quantises x inside its call: IEEE codes, scales
# and sums bit for bit, so its result is the quantised-operand target's exactly. Every ISA and
# dtype; one token to two token blocks (streamed and tiled); x broadcast against a weight batch
# of 2 and batched with it; an all-zero group, a tiny value.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bx,t,k,n,group", [(1, 1, 64, 16, 32), (1, 17, 1536, 96, 128),
                                            (2, 40, 512, 70, 64), (1, 300, 256, 40, 256),
                                            (1, 5, 4096, 16, 4096)])
def test_quantising_inside_the_call_is_exact(isa, dtype, bx, t, k, n, group):
    weight = dense_weight(k, n, group, batch=2, dtype=dtype)
    x = tokens(bx, t, k, dtype).at[0, 0, :group].set(0).at[-1, -1, 1].set(1e-30)
    codes, x_scales, sums = ieee_quantize(x, group)
    want = int4_a8_matmul_p.bind(_a8_order(jnp.asarray(codes)), jnp.asarray(x_scales),
                                 jnp.asarray(sums), *weight, group_size=group)
    got = int4_a8_matmul(x, *weight, group_size=group)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=isa)


def test_no_tokens():
    weight = dense_weight(64, 16, 32)
    x = tokens(2, 0, 64)
    assert int4_a8_matmul(x, *weight, group_size=32).shape == (2, 0, 16)
    assert jax.jit(lambda x: int4_a8_matmul(x, *weight, group_size=32))(x).shape == (2, 0, 16)


def test_a_nan_activation_makes_its_token_nan():
    weight = dense_weight(128, 24, 64)
    x = tokens(1, 20, 128)
    got = np.asarray(int4_a8_matmul(x.at[0, 3, 70].set(jnp.nan), *weight, group_size=64))
    assert np.isnan(got[0, 3]).all()
    np.testing.assert_array_equal(np.delete(got, 3, axis=1),
                                  np.delete(np.asarray(int4_a8_matmul(x, *weight, group_size=64)),
                                            3, axis=1))


# From a dozen tokens the product leaves the streaming kernel where the groups allow it: the
# engine's int8 tiles with VNNI (from 16), the avx2 unit's u8 panels (from 12: 16 outputs by
# blocks of 256 tokens, 3 tokens at a time, 8 quads summed in s16 per widening). Their integer
# sums are exact and their epilogue is the streaming kernel's, so the result equals, bit for bit,
# the same product taken 4 tokens per call (streamed on every ISA). Cases: the avx2 threshold with
# one s16 chunk per group (g32); outputs past the last whole panel; one group per column with
# K = 100 (a short last chunk) and with K = 1536 over 4 outputs (half a vector); two token blocks
# (257 = 256 + 1) and three (600, g128), micro tiles of 1 and 2 tokens at the blocks' ends; g64 by
# 130 outputs in bf16, g32 in f16; in each an all-zero group (token 1) and a NaN activation (only
# its token is NaN).
@pytest.mark.parametrize("t,k,n,group,dtype", once_after([
    (12, 128, 16, 32, jnp.float32), (17, 384, 40, 128, jnp.float32),
    (100, 100, 21, 100, jnp.float32), (50, 1536, 4, 1536, jnp.float32),
    (257, 256, 33, 64, jnp.float32), (600, 512, 24, 128, jnp.float32),
    (38, 256, 130, 64, jnp.bfloat16), (29, 96, 17, 32, jnp.float16)], keep=2))
def test_many_tokens_equal_the_streamed_product(isa, t, k, n, group, dtype):
    weight = dense_weight(k, n, group, dtype=dtype)
    x = tokens(1, t, k, dtype).at[0, 1, :group].set(0).at[0, t - 2, k // 2].set(jnp.nan)
    got = np.asarray(int4_a8_matmul(x, *weight, group_size=group).astype(jnp.float32))
    streamed = np.concatenate([
        np.asarray(int4_a8_matmul(x[:, i:i + 4], *weight, group_size=group).astype(jnp.float32))
        for i in range(0, t, 4)], axis=1)
    np.testing.assert_array_equal(got, streamed, err_msg=isa)
    assert np.isnan(got[0, t - 2]).all() and not np.isnan(np.delete(got, t - 2, axis=1)).any()


def test_quantisation_of_the_activations():
    x = jnp.asarray([[[0.5, -1.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0]]])
    codes, scales, sums = quantize_activations(x, 4)
    np.testing.assert_array_equal(np.asarray(codes), [[[64, -127, 32, 0, 0, 0, 0, 0]]])
    np.testing.assert_array_equal(np.asarray(scales), np.float32([[[1 / 127, 0.0]]]))  # Zero: 0.
    np.testing.assert_array_equal(np.asarray(sums), [[[-31, 0]]])
    # The kernel's quad order (0, 2, 1, 3) is its own inverse.
    quad = jnp.arange(8)
    np.testing.assert_array_equal(np.asarray(_a8_order(quad)), [0, 2, 1, 3, 4, 6, 5, 7])
    np.testing.assert_array_equal(np.asarray(_a8_order(_a8_order(quad))), np.arange(8))


def test_error_is_the_activations_rounding():
    weight = dense_weight(512, 64, 128)
    x = tokens(1, 16, 512)
    exact = int4_matmul(x, *weight, group_size=128)
    rel = jnp.linalg.norm(int4_a8_matmul(x, *weight, group_size=128) - exact) / jnp.linalg.norm(
        exact)
    assert 1e-4 < float(rel) < 1e-2  # Rounding to 8 bits of a normal draw: ~0.5%.


def test_straight_through_gradient_vmap_and_jit():
    weight = dense_weight(64, 24, 32)
    x = tokens(1, 3, 64)
    loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x, *weight, group_size=32)))  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.grad(loss(int4_a8_matmul))(x)),
                               np.asarray(jax.grad(loss(int4_matmul))(x)), rtol=0.05, atol=0.05)
    stack = tokens(5, 3, 64)[:, None]  # vmap over 5 calls of x [1, 3, 64]
    batched = jax.vmap(lambda x: int4_a8_matmul(x, *weight, group_size=32))(stack)
    looped = jnp.stack([int4_a8_matmul(x, *weight, group_size=32) for x in stack])
    assert_close(batched, looped, jnp.float32, 1e-5)
    assert_close(jax.jit(lambda x: int4_a8_matmul(x, *weight, group_size=32))(x),
                 int4_a8_matmul(x, *weight, group_size=32), jnp.float32, 1e-6)


def test_errors_are_named():
    qweight, scales = dense_weight(64, 8, 32)
    x = tokens(1, 2, 64)
    with pytest.raises(ValueError, match="group_size"):
        int4_a8_matmul(x, qweight, jnp.ones((1, 32, 8)), group_size=2)
    with pytest.raises(TypeError, match="scales"):
        int4_a8_matmul(x, qweight, scales.astype(jnp.bfloat16), group_size=32)
    with pytest.raises(ValueError, match="frozen"):
        jax.grad(lambda s: jnp.sum(int4_a8_matmul(x, qweight, s, group_size=32)))(scales)
    codes, x_scales, sums = quantize_activations(x, 32)
    with pytest.raises(ValueError, match="no derivative"):
        jax.jvp(lambda s: int4_a8_matmul_p.bind(codes, s, sums, qweight, scales, group_size=32),
                (x_scales,), (x_scales,))
    with pytest.raises(TypeError, match="xq must be int8"):
        int4_a8_matmul_p.bind(codes.astype(jnp.int32), x_scales, sums, qweight, scales,
                              group_size=32)
