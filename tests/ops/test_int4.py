"""The int4 primitives (jaxsparse/ops/int4.py): kernels against the pure references through the
public wrappers, their rules (batching, transposes, JVPs, errors) and the dequantisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.formats.int4 import pack_nibbles, pack_positions
from jaxsparse.ops import (
    int4_dequantize,
    int4_matmul,
    int4_matmul_reference,
    int4_matmul_t,
    int4_matmul_t_reference,
    int4_nm_dequantize,
    int4_nm_matmul,
    int4_nm_matmul_reference,
    int4_nm_matmul_t,
    int4_nm_matmul_t_reference,
)
from tests._check import DTYPES, assert_close, scale_for


def dense_weight(k, n, group, batch=1, dtype=jnp.float32, seed=0):
    """Random codes (every nibble value) and scales: `(qweight, scales)` `[batch, ...]`."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(-8, 8, (batch, k, n))
    scales = jnp.asarray(rng.uniform(0.01, 0.1, (batch, k // group, n)), dtype)
    return pack_nibbles(jnp.asarray(codes)), scales


def sparse_weight(k, n, group, batch=1, dtype=jnp.float32, seed=0, sorted_positions=True):
    """Random 2:4 codes and positions: `(qweight, positions, scales)`."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(-8, 8, (batch, k // 2, n))
    if sorted_positions:
        pairs = np.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])[
            rng.integers(0, 6, (batch, k // 4, n))]
        p0, p1 = pairs[..., 0], pairs[..., 1]
    else:  # Unvalidated data: any positions, repeated or out of order.
        p0, p1 = rng.integers(0, 4, (2, batch, k // 4, n))
    scales = jnp.asarray(rng.uniform(0.01, 0.1, (batch, k // group, n)), dtype)
    return (pack_nibbles(jnp.asarray(codes)), pack_positions(jnp.asarray(p0), jnp.asarray(p1)),
            scales)


def tokens(b, t, k, dtype=jnp.float32, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, t, k)), dtype)


FORMS = ["dense", "2:4"]


def weight_of(form, k, n, group, sorted_positions=True, **kw):
    if form == "dense":
        return dense_weight(k, n, group, **kw)
    return sparse_weight(k, n, group, sorted_positions=sorted_positions, **kw)


def ops_of(form):
    if form == "dense":
        return int4_matmul, int4_matmul_t, int4_matmul_reference, int4_matmul_t_reference
    return int4_nm_matmul, int4_nm_matmul_t, int4_nm_matmul_reference, int4_nm_matmul_t_reference


# ====================================================================== against the references
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("t,k,n,group", [(1, 64, 24, 32), (5, 128, 17, 64), (40, 96, 33, 96)])
def test_products_match_the_references(form, t, k, n, group, dtype):
    fwd, bwd, fwd_ref, bwd_ref = ops_of(form)
    weight = weight_of(form, k, n, group, batch=2, dtype=dtype)
    x, dy = tokens(1, t, k, dtype), tokens(2, t, n, dtype, seed=2)
    assert_close(fwd(x, *weight, group_size=group), fwd_ref(x, *weight, group_size=group),
                 dtype, scale_for(k) * 0.1)
    assert_close(bwd(dy, *weight, group_size=group, in_features=k),
                 bwd_ref(dy, *weight, group_size=group, in_features=k), dtype, scale_for(n) * 0.1)


def test_unsorted_positions_add_where_they_land():
    qweight, positions, scales = sparse_weight(64, 8, 32, sorted_positions=False)
    dense = int4_nm_dequantize(qweight, positions, scales, group_size=32)
    x = tokens(1, 3, 64)
    assert_close(int4_nm_matmul(x, qweight, positions, scales, group_size=32),
                 jnp.einsum("btk,bkn->btn", x, dense), jnp.float32, 2)


def test_dequantisation_is_exact():
    qweight, scales = dense_weight(64, 5, 16)
    codes = np.asarray(qweight, np.int32)
    ints = np.stack([(codes & 15) - 8, (codes >> 4) - 8], axis=-2).reshape(1, 64, 5)
    want = ints * np.repeat(np.asarray(scales), 16, axis=1)
    np.testing.assert_array_equal(np.asarray(int4_dequantize(qweight, scales, group_size=16)),
                                  want.astype(np.float32))


# ====================================================================== rules
@pytest.mark.parametrize("form", FORMS)
def test_vmap_folds_into_tokens_and_into_the_kernel_batch(form):
    fwd, bwd, fwd_ref, _ = ops_of(form)
    weight = weight_of(form, 64, 16, 32)
    x = tokens(3, 4, 64)[:, None]  # [V, 1, T, K]
    out = jax.vmap(lambda xi: fwd(xi, *weight, group_size=32))(x)
    assert_close(out, jax.vmap(lambda xi: fwd_ref(xi, *weight, group_size=32))(x), jnp.float32, 1)
    stacked = weight_of(form, 64, 16, 32, batch=3)
    out = jax.vmap(lambda xi, *w: fwd(xi, *(a[None] for a in w), group_size=32))(
        x, *stacked)
    want = jax.vmap(lambda xi, *w: fwd_ref(xi, *(a[None] for a in w), group_size=32))(x, *stacked)
    assert_close(out, want, jnp.float32, 1)


@pytest.mark.parametrize("form", FORMS)
def test_transposes_and_jvps_in_the_dense_operand(form):
    fwd, bwd, _, _ = ops_of(form)
    weight = weight_of(form, 64, 16, 32)
    x, dy = tokens(1, 3, 64), tokens(1, 3, 16, seed=4)
    _, vjp = jax.vjp(lambda x: fwd(x, *weight, group_size=32), x)
    assert_close(vjp(dy)[0], bwd(dy, *weight, group_size=32, in_features=64), jnp.float32, 1)
    _, vjp_t = jax.vjp(lambda dy: bwd(dy, *weight, group_size=32, in_features=64), dy)
    assert_close(vjp_t(x)[0], fwd(x, *weight, group_size=32), jnp.float32, 1)
    _, tangent = jax.jvp(lambda x: fwd(x, *weight, group_size=32), (x,), (x,))
    assert_close(tangent, fwd(x, *weight, group_size=32), jnp.float32, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
def test_the_dense_backward_gives_the_kernels_cotangent(form, dtype):
    """`dense_backward=True` (dequantise W, XLA's dot) against `int4_matmul_t`, for one weight
    broadcast over a batch of x and for a stack of weights, and under vmap."""
    fwd, bwd, _, _ = ops_of(form)
    for batch_x, batch_w in ((2, 1), (3, 3)):
        weight = weight_of(form, 64, 24, 32, batch=batch_w, dtype=dtype)
        x, dy = tokens(batch_x, 5, 64, dtype), tokens(batch_x, 5, 24, dtype, seed=4)
        _, dense_vjp = jax.vjp(lambda x: fwd(x, *weight, group_size=32, dense_backward=True), x)
        want = bwd(dy, *weight, group_size=32, in_features=64)
        assert dense_vjp(dy)[0].dtype == dtype
        assert_close(dense_vjp(dy)[0], want, dtype, scale_for(24))
    weight = weight_of(form, 64, 24, 32, dtype=dtype)
    xs, dys = tokens(4, 3, 64, dtype)[:, None], tokens(4, 3, 24, dtype, seed=4)[:, None]

    def grad_of(dense_backward):
        def one(x, dy):
            return jax.vjp(lambda x: fwd(x, *weight, group_size=32,
                                          dense_backward=dense_backward), x)[1](dy)[0]
        return jax.jit(jax.vmap(one))(xs, dys)

    assert_close(grad_of(True), grad_of(False), dtype, scale_for(24))


@pytest.mark.parametrize("form", FORMS)
def test_tangents_in_the_scales_raise(form):
    fwd, bwd, _, _ = ops_of(form)
    *codes, scales = weight_of(form, 64, 16, 32)
    x = tokens(1, 3, 64)
    with pytest.raises(ValueError, match="frozen"):
        jax.jvp(lambda s: fwd(x, *codes, s, group_size=32), (scales,), (scales,))
    with pytest.raises(ValueError, match="frozen"):
        jax.grad(lambda s: jnp.sum(bwd(x[..., :16], *codes, s, group_size=32, in_features=64)))(
            scales)


def test_operand_errors_name_what_was_expected():
    qweight, scales = dense_weight(64, 16, 32)
    x = tokens(1, 2, 64)
    with pytest.raises(ValueError, match="group_size must divide K = 64"):
        int4_matmul(x, qweight, scales, group_size=48)
    with pytest.raises(ValueError, match=r"scales must be \[B, K/group_size, N\]"):
        int4_matmul(x, qweight, scales[:, :1], group_size=32)
    with pytest.raises(ValueError, match="qweight must be"):
        int4_matmul(tokens(1, 2, 66), qweight, scales, group_size=32)
    with pytest.raises(TypeError, match="scales must have the dense operand's dtype"):
        int4_matmul(x, qweight, scales.astype(jnp.bfloat16), group_size=32)
    with pytest.raises(ValueError, match="batch dim must be 1 or 3"):
        int4_matmul(tokens(3, 2, 64), *dense_weight(64, 16, 32, batch=2), group_size=32)
    qweight, positions, scales = sparse_weight(64, 16, 32)
    with pytest.raises(ValueError, match="positions must be"):
        int4_nm_matmul(x, qweight, positions[:, :4], scales, group_size=32)
    with pytest.raises(ValueError, match="multiple of 8"):
        int4_nm_matmul(x, qweight, positions, jnp.ones((1, 16, 16)), group_size=4)
