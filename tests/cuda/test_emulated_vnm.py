"""The V:N:M CUDA kernels (cuda/vnm), run on the CPU by the SIMT emulator through their emulated FFI
targets, against a float64 NumPy reference that densifies W from the three arrays.

The mma.sp forward (bf16/f16) is taken at its tile edges: 64-token tiles (T = 1, 63, 65), panels
whose last one is partial (N = 2V + 16), every block height (V = 16, 32, 48, 64, 128 select 16, 32,
16, 64, 128 rows per block), K not a multiple of m nor of a k-tile (8 groups), n = 1 and 2, and
row lengths that leave the values and indices 16-, 8-, 4-byte or no cp.async alignment. f32 runs
on the CUDA-core kernel, as do both backward ops at every dtype.

These tests can fail: five planted bugs in cuda/vnm/vnm_sp.cuh (2026-12-02, commit c2bc922) each
failed some of them: a descending slot pair not swapped (1 test), garbage slot pairs passed to
mma.sp unchecked (10: the emulator raises on the invalid ordered_metadata codes), the metadata's
high half taken from row g instead of g + 8 (17), the gathered tile stored into the buffer being
read (12), a cp.async wait one group short (14: the MMAs read poisoned shared memory).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests._check import assert_close, scale_for

# CI runs this file with the newest jax only (`once`: tests/conftest.py).
pytestmark = pytest.mark.once

# ------------------------------------------------------------------ operands and reference


def random_vnm(rng, k, n_out, v, n, m, batch=1, dtype=jnp.bfloat16):
    """A valid V:N:M weight: sorted distinct columns per panel and group, sorted distinct slots per
    output and group, zeros where the input is >= K (the ragged last group)."""
    groups, panels = -(-k // m), -(-n_out // v)
    columns = np.sort(np.argsort(rng.random((batch, panels, groups, m)), -1)[..., :4], -1)
    indices = np.sort(np.argsort(rng.random((batch, n_out, groups, 4)), -1)[..., :n], -1)
    values = rng.standard_normal((batch, n_out, groups, n)).astype(np.float32)
    col = np.take_along_axis(columns[:, np.arange(n_out) // v], indices, -1)
    values = np.where(np.arange(groups)[:, None] * m + col < k, values, 0)
    return (jnp.asarray(values.reshape(batch, n_out, groups * n), dtype),
            jnp.asarray(indices.reshape(batch, n_out, groups * n), jnp.uint8),
            jnp.asarray(columns.reshape(batch, panels, groups * 4), jnp.uint8))


def kept_inputs(indices, columns, v, n, m, k):
    """[B, N, Kc] input of every kept entry, -1 where it contributes nothing (slot > 3, column >= m,
    input >= K): the ABI's rule, which garbage data under jit relies on."""
    idx = np.asarray(indices).astype(np.int64)
    cols = np.asarray(columns).astype(np.int64)
    b, n_out, kc = idx.shape
    g = np.arange(kc) // n
    panel_cols = cols[:, np.arange(n_out) // v]  # [B, N, G*4]
    col = np.take_along_axis(panel_cols, 4 * g[None, None] + np.minimum(idx, 3), -1)
    pos = g * m + col
    return np.where((idx < 4) & (col < m) & (pos < k), pos, -1)


def dense_weight(values, indices, columns, v, n, m, k):
    """W [B, K, N] in float64; entries naming one input twice add up."""
    vals = np.asarray(values, np.float64)
    pos = kept_inputs(indices, columns, v, n, m, k)
    b, n_out, _ = vals.shape
    w = np.zeros((b, k + 1, n_out))
    bi, ri, _ = np.indices(pos.shape)
    np.add.at(w, (bi, np.where(pos < 0, k, pos), ri), vals)
    return w[:, :k]


def f64(a):
    return np.asarray(a, np.float64)


def ref_spmm(x, values, indices, columns, v, n, m):
    return f64(x) @ dense_weight(values, indices, columns, v, n, m, x.shape[2])


def ref_spmm_t(dy, values, indices, columns, v, n, m, k):
    return f64(dy) @ np.swapaxes(dense_weight(values, indices, columns, v, n, m, k), 1, 2)


def ref_sddmm(x, dy, indices, columns, v, n, m):
    pos = kept_inputs(indices, columns, v, n, m, x.shape[2])
    b = max(x.shape[0], dy.shape[0], pos.shape[0])
    gram = np.broadcast_to(np.swapaxes(f64(dy), 1, 2) @ f64(x), (b, dy.shape[2], x.shape[2]))
    pos = np.broadcast_to(pos, (b, *pos.shape[1:]))
    return np.where(pos < 0, 0, np.take_along_axis(gram, np.maximum(pos, 0), -1))


# ------------------------------------------------------------------ the emulated targets


def attrs(v, n, m):
    return dict(v=np.int32(v), n=np.int32(n), m=np.int32(m))


def spmm(x, values, indices, columns, v, n, m):
    b = max(x.shape[0], values.shape[0])
    out = jax.ShapeDtypeStruct((b, x.shape[1], values.shape[1]), x.dtype)
    return jax.ffi.ffi_call("jaxsparse_emu_vnm_spmm", out)(x, values, indices, columns,
                                                          **attrs(v, n, m))


def spmm_t(dy, values, indices, columns, v, n, m, k):
    b = max(dy.shape[0], values.shape[0])
    out = jax.ShapeDtypeStruct((b, dy.shape[1], k), dy.dtype)
    return jax.ffi.ffi_call("jaxsparse_emu_vnm_spmm_t", out)(dy, values, indices, columns,
                                                            **attrs(v, n, m))


def sddmm(x, dy, indices, columns, v, n, m):
    b = max(x.shape[0], dy.shape[0], indices.shape[0])
    out = jax.ShapeDtypeStruct((b, *indices.shape[1:]), x.dtype)
    return jax.ffi.ffi_call("jaxsparse_emu_vnm_sddmm", out)(x, dy, indices, columns,
                                                           **attrs(v, n, m))


def normal(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


# ------------------------------------------------------------------ forward on mma.sp

# (T, K, V, n, m); N = 2V + 16. The comments give the block rows, k-tiles (8 groups each) and the
# staging pieces of values / indices ("-": plain loads).
SP_SHAPES = [
    (1, 40, 32, 2, 8),     # 32 rows, G=5: one partial k-tile; values 4 B, indices -
    (63, 70, 64, 2, 5),    # 64 rows, G=14 ragged K: 2 k-tiles; 8 B / 4 B
    (65, 100, 128, 1, 16), # 128 rows, G=7 odd: values and indices by plain loads
    (64, 128, 64, 2, 8),   # one whole token tile, G=16: 16 B / 16 B, 2 k-tiles
    (65, 300, 32, 1, 32),  # G=10, 2 k-tiles, n=1: 4 B / -
    (33, 90, 16, 2, 8),    # V=16: 16-row blocks, G=12: 16 B / 8 B
    (20, 77, 48, 1, 5),    # V=48: 16-row blocks, 3 per panel, G=16: 16 B / 8 B
    (17, 600, 64, 2, 8),   # G=75: 10 k-tiles, the 3-stage ring wraps 3 times; 4 B / -
    (9, 400, 128, 1, 5),   # G=80: 10 k-tiles, n=1; 16 B / 8 B
]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("t,k,v,n,m", SP_SHAPES)
def test_spmm_on_sparse_tensor_cores_at_tile_edges(dtype, t, k, v, n, m):
    rng = np.random.default_rng(t * 1000 + k + v + n + m)
    n_out = 2 * v + 16
    values, indices, columns = random_vnm(rng, k, n_out, v, n, m, dtype=dtype)
    x = normal(rng, (1, t, k), dtype)
    got = spmm(x, values, indices, columns, v, n, m)
    assert got.dtype == dtype and got.shape == (1, t, n_out)
    assert_close(got, ref_spmm(x, values, indices, columns, v, n, m), dtype,
                 scale_for(k * n / m))


@pytest.mark.parametrize("t,k,v,n,m", [(33, 70, 32, 2, 5), (5, 37, 48, 1, 8)])
def test_spmm_f32_on_cuda_cores(t, k, v, n, m):
    rng = np.random.default_rng(k)
    values, indices, columns = random_vnm(rng, k, 2 * v + 16, v, n, m, dtype=jnp.float32)
    x = normal(rng, (1, t, k), jnp.float32)
    assert_close(spmm(x, values, indices, columns, v, n, m),
                 ref_spmm(x, values, indices, columns, v, n, m), jnp.float32, scale_for(k))


# ------------------------------------------------------------------ backward on CUDA cores


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("t,k,v,n,m", [(33, 70, 32, 2, 5), (9, 45, 16, 1, 8), (65, 64, 64, 2, 16)])
def test_backward_kernels(dtype, t, k, v, n, m):
    rng = np.random.default_rng(7 * t + k)
    n_out = 2 * v + 16
    values, indices, columns = random_vnm(rng, k, n_out, v, n, m, dtype=dtype)
    x = normal(rng, (1, t, k), dtype)
    dy = normal(rng, (1, t, n_out), dtype)
    assert_close(spmm_t(dy, values, indices, columns, v, n, m, k),
                 ref_spmm_t(dy, values, indices, columns, v, n, m, k), dtype, scale_for(n_out))
    dv = sddmm(x, dy, indices, columns, v, n, m)
    assert dv.shape == values.shape
    assert_close(dv, ref_sddmm(x, dy, indices, columns, v, n, m), dtype, scale_for(t))


# ------------------------------------------------------------------ batches


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_batches_broadcast(dtype):
    rng = np.random.default_rng(3)
    t, k, v, n, m, n_out = 40, 50, 32, 2, 8, 48
    values, indices, columns = random_vnm(rng, k, n_out, v, n, m, batch=3, dtype=dtype)
    x1, x3 = normal(rng, (1, t, k), dtype), normal(rng, (3, t, k), dtype)
    dy1 = normal(rng, (1, t, n_out), dtype)
    # Weights batched, x shared; x batched, weights shared; both batched.
    for x, w in [(x1, (values, indices, columns)), (x3, tuple(a[:1] for a in (values, indices,
                                                                           columns))),
                 (x3, (values, indices, columns))]:
        assert_close(spmm(x, *w, v, n, m), ref_spmm(x, *w, v, n, m), dtype, scale_for(k))
    assert_close(spmm_t(dy1, values, indices, columns, v, n, m, k),
                 ref_spmm_t(dy1, values, indices, columns, v, n, m, k), dtype, scale_for(n_out))
    assert_close(sddmm(x3, dy1, indices[:1], columns[:1], v, n, m),
                 ref_sddmm(x3, dy1, indices[:1], columns[:1], v, n, m), dtype, scale_for(t))


# ------------------------------------------------------------------ garbage positions


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("n", [1, 2])
def test_garbage_positions_contribute_nothing_and_stay_in_bounds(dtype, n):
    """Slots 4..7 (dropped), columns m..m+3 (gather zeros), and for n = 2 equal and descending slot
    pairs, which the mma.sp path must still turn into valid ordered_metadata codes (an invalid code
    is an emulator error) and which add up as the reference does."""
    rng = np.random.default_rng(11 + n)
    t, k, v, m, n_out = 65, 60, 32, 7, 80
    values, indices, columns = random_vnm(rng, k, n_out, v, n, m, dtype=dtype)
    indices = jnp.asarray(rng.integers(0, 8, indices.shape), jnp.uint8)
    columns = jnp.asarray(rng.integers(0, m + 4, columns.shape), jnp.uint8)
    if n == 2:  # Some equal pairs for sure.
        indices = indices.at[:, ::5, 1::2].set(indices[:, ::5, 0::2])
    x = normal(rng, (1, t, k), dtype)
    dy = normal(rng, (1, t, n_out), dtype)
    assert_close(spmm(x, values, indices, columns, v, n, m),
                 ref_spmm(x, values, indices, columns, v, n, m), dtype, scale_for(k))
    assert_close(spmm_t(dy, values, indices, columns, v, n, m, k),
                 ref_spmm_t(dy, values, indices, columns, v, n, m, k), dtype, scale_for(n_out))
    assert_close(sddmm(x, dy, indices, columns, v, n, m),
                 ref_sddmm(x, dy, indices, columns, v, n, m), dtype, scale_for(t))


# ------------------------------------------------------------------ empty and invalid


def test_empty_dimensions():
    rng = np.random.default_rng(0)
    values, indices, columns = random_vnm(rng, 0, 32, 16, 2, 8)
    x = jnp.ones((1, 5, 0), jnp.bfloat16)
    np.testing.assert_array_equal(spmm(x, values, indices, columns, 16, 2, 8), 0)
    values, indices, columns = random_vnm(rng, 24, 32, 16, 2, 8)
    y = spmm(jnp.ones((1, 0, 24), jnp.bfloat16), values, indices, columns, 16, 2, 8)
    assert y.shape == (1, 0, 32)
    dv = sddmm(jnp.ones((1, 0, 24), jnp.float32), jnp.ones((1, 0, 32), jnp.float32), indices,
               columns, 16, 2, 8)
    np.testing.assert_array_equal(dv, 0)


def test_invalid_operands_are_refused_with_the_target_name():
    rng = np.random.default_rng(0)
    values, indices, columns = random_vnm(rng, 24, 32, 16, 2, 8)
    x = jnp.ones((1, 4, 24), jnp.bfloat16)
    with pytest.raises(Exception, match="jaxsparse_vnm_spmm: attribute v must be a multiple of 16"):
        spmm(x, values, indices, columns, 24, 2, 8).block_until_ready()
    with pytest.raises(Exception, match=r"jaxsparse_vnm_spmm: columns.shape\[1\]"):
        spmm(x, values, indices, columns[:, :1], 16, 2, 8).block_until_ready()
