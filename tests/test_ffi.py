"""The compiled kernels: every CPU instruction-set path against the reference, and the fallback."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp
from jaxsparse.ops import (
    JaxsparseFallbackWarning,
    nm_sddmm,
    nm_sddmm_reference,
    nm_spmm,
    nm_spmm_reference,
    nm_spmm_t,
    nm_spmm_t_reference,
)
from tests._check import (assert_close, keys, once_after, random_array, random_nm, scale_for,
                          sweep)

# Sizes around the register tiles of every ISA path (16/32/64 tokens, 2 or 8 rows).
SHAPES = [(1, 7, 3, 2, 4), (16, 33, 9, 2, 4), (17, 64, 16, 1, 4), (64, 100, 18, 4, 8),
          (129, 40, 11, 3, 7), (33, 48, 35, 15, 16)]


@pytest.mark.parametrize("t,k,out,n,m,dtype", once_after(sweep(SHAPES), keep=3))
def test_every_isa_path(isa, t, k, out, n, m, dtype):
    kx, kw, ky = keys(50, 3)
    x = random_array(kx, (2, t, k), dtype)
    ws = random_nm(kw, k, out, n, m, dtype, batch=(1,))
    dy = random_array(ky, (2, t, out), dtype)
    v, i = ws.values, ws.indices
    assert jsp.cpu_isa() == isa
    assert_close(nm_spmm(x, v, i, n=n, m=m), nm_spmm_reference(x, v, i, n=n, m=m), dtype, scale_for(k))
    assert_close(nm_spmm_t(dy, v, i, n=n, m=m, in_features=k),
                 nm_spmm_t_reference(dy, v, i, n=n, m=m, in_features=k), dtype, scale_for(k))
    assert_close(nm_sddmm(x, dy, i, n=n, m=m), nm_sddmm_reference(x, dy, i, n=n, m=m), dtype,
                 scale_for(t))


# The few-token backward (the values' gradient on the row kernel of cpu/nm/nm_rowback_avx512.h at
# 1-2 tokens, the token-vectorised kernels past it): whole 16-entry chunks and ragged tails, several
# n:m, every dtype and ISA.
# dv on weight rows at 1-2 tokens, dx of n:4 at 1-4 (cpu/nm/nm_rowback_avx512.h): dx's tasks of
# 16 / T vectors of 16 inputs (a full task and a 1-chunk task at K = 136, a last chunk of one
# group at K = 100, a ragged last group at K = 135, 33 tasks at K = 4100, 5-vector tasks at 3
# tokens), and past those counts the token-vectorised kernels.
ROW_BACKWARD_SHAPES = [(1, 136, 40, 2, 4), (2, 100, 33, 1, 4), (3, 250, 17, 3, 7),
                       (3, 70, 30, 2, 4), (4, 520, 24, 2, 8), (4, 35, 130, 15, 16),
                       (1, 135, 70, 2, 4), (2, 4100, 20, 2, 4), (1, 1030, 50, 1, 4),
                       (4, 300, 20, 1, 4), (5, 200, 20, 2, 4)]


@pytest.mark.parametrize("t,k,out,n,m,dtype", once_after(sweep(ROW_BACKWARD_SHAPES), keep=3))
def test_few_token_backward_on_every_isa(isa, t, k, out, n, m, dtype):
    kx, kw, ky = keys(56, 3)
    x = random_array(kx, (2, t, k), dtype)
    ws = random_nm(kw, k, out, n, m, dtype, batch=(1,))
    dy = random_array(ky, (2, t, out), dtype)
    v, i = ws.values, ws.indices
    assert_close(nm_spmm_t(dy, v, i, n=n, m=m, in_features=k),
                 nm_spmm_t_reference(dy, v, i, n=n, m=m, in_features=k), dtype, scale_for(out))
    assert_close(nm_sddmm(x, dy, i, n=n, m=m), nm_sddmm_reference(x, dy, i, n=n, m=m), dtype,
                 scale_for(t))


@pytest.mark.parametrize("t", [1, 4])
def test_few_token_backward_with_unvalidated_positions(isa, t):
    # Garbage under jit: a position >= m (the entry is dropped, its gradient 0) and a group whose
    # distinct positions decrease (each entry still adds at its own input).
    k, out, n, m = 160, 21, 2, 4
    ws = random_nm(keys(57, 1)[0], k, out, n, m)
    idx = ws.indices.at[::2, 4].set(6).at[1::3, 8:10].set(jnp.array([3, 0], jnp.uint8))
    x = random_array(keys(58, 1)[0], (1, t, k), jnp.float32)
    dy = random_array(keys(59, 1)[0], (1, t, out), jnp.float32)
    v, idx = ws.values[None], idx[None]
    dx = jax.jit(lambda a, b, c: nm_spmm_t(a, b, c, n=n, m=m, in_features=k))(dy, v, idx)
    assert_close(dx, nm_spmm_t_reference(dy, v, idx, n=n, m=m, in_features=k), jnp.float32,
                 scale_for(out))
    dv = jax.jit(lambda a, b, c: nm_sddmm(a, b, c, n=n, m=m))(x, dy, idx)
    # A dropped entry's gradient is 0 (the kernels' rule; the reference would read the input its
    # position names).
    want = jnp.where(idx < m, nm_sddmm_reference(x, dy, idx, n=n, m=m), 0.0)
    assert_close(dv, want, jnp.float32, scale_for(t))


def test_unvalidated_positions_never_read_out_of_bounds():
    # Under jit the positions are unknown at trace time, so garbage can reach the kernel: it must
    # neither crash nor read outside x; such entries contribute nothing.
    ws = random_nm(keys(51, 1)[0], 10, 4, 2, 4)
    garbage = ws.indices.at[:, -1].set(255).at[0, 0].set(200)

    @jax.jit
    def f(x, idx):
        return nm_spmm(x[None], ws.values[None], idx[None], n=2, m=4)[0]

    y = f(jnp.ones((3, 10)), garbage)
    assert bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.cpu_only
def test_set_isa_rejects_unknown_names():
    with pytest.raises(ValueError):
        jsp.set_cpu_isa("sse9")


@pytest.mark.cpu_only
def test_fallback_warns_on_a_platform_without_kernels():
    ws = random_nm(keys(52, 1)[0], 8, 4, 2, 4)
    traced = jax.jit(lambda x: x @ ws).trace(jnp.ones((2, 8)))
    # x @ ws at 2 tokens is the packed forward (2-bit positions); it has no TPU kernel either.
    with pytest.warns(JaxsparseFallbackWarning,
                      match="no jaxsparse_nm_spmm(_packed)? kernel for tpu"):
        traced.lower(lowering_platforms=("tpu",))


@pytest.mark.parametrize("t", [1, 3, 16, 20])
def test_unvalidated_positions_add_nothing_even_next_to_inf(isa, t):
    # A garbage position >= m names an input of the next group; the kernels must drop the entry,
    # not multiply its value by that input (0 * inf would poison the row with NaN).
    k, out, n, m = 40, 19, 2, 4
    valid = jnp.tile(jnp.array([1, 2], jnp.uint8), (out, k // m))
    values = random_array(keys(53, 1)[0], (out, k // m * n), jnp.float32)
    garbage = valid.at[::2, 0::4].set(4).at[1::3, 1::6].set(7)
    x = random_array(keys(54, 1)[0], (t, k), jnp.float32)
    x = x.at[:, 0::4].set(jnp.inf).at[:, 3::4].set(-jnp.inf)  # Only garbage could read these.
    kept = np.asarray(garbage == valid)
    pos = (np.arange(k // m * n) // n) * m + np.asarray(valid[0], np.int64)  # Same in every row.
    picked = np.asarray(x, np.float64)[:, pos]  # [t, Kc]: the finite inputs of valid positions.
    want = (picked @ np.where(kept, np.asarray(values, np.float64), 0.0).T)[None]
    got = jax.jit(lambda x, v, i: nm_spmm(x, v, i, n=n, m=m))(x[None], values[None], garbage[None])
    assert bool(jnp.all(jnp.isfinite(got)))
    assert_close(got, want, jnp.float32, scale_for(k))
