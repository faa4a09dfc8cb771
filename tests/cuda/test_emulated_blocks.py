"""The 1xN block CUDA kernels (cuda/blocks), run on the CPU by the SIMT emulator through their
emulated FFI targets, against a float64 NumPy reference that densifies W from the three arrays.

The structure is prepared as the CUDA lowering prepares it (jaxsparse/ops/blocks.py: the spans,
the blocks by input, each block's row). The mma.m16n8k16 forward (bf16/f16) is taken at its tile
edges: 16-token tiles (T = 1, 15, 17, 65), rows of 0 blocks and of block counts that are not a
multiple of a 16-block step, every n (4 pads its n8 tile), outputs not a multiple of n. f32 runs on
the CUDA-core forward, and both backward ops at every dtype. Through the primitives, the
whole of tests/ops/test_blocks.py also runs on these kernels under JAXSPARSE_EMULATE_CUDA=1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.ops.blocks import _blocks_by_input, _spans, block_rows
from tests._check import assert_close, scale_for

# CI runs this file with the newest jax only (`once`: tests/conftest.py).
pytestmark = pytest.mark.once

# ------------------------------------------------------------------ operands and reference


def random_blocks(rng, k, n_out, n, batch=1, dtype=jnp.bfloat16, max_per_row=40):
    """BSR arrays with rows of 0 up to `max_per_row` blocks (sorted distinct inputs)."""
    rows = -(-n_out // n)
    counts = rng.integers(0, min(k, max_per_row) + 1, (batch, rows))
    counts[:, 0] = 0  # An empty row for sure.
    nnz = int(counts.sum(axis=1).max())
    indices = np.zeros((batch, nnz), np.int32)
    indptr = np.zeros((batch, rows + 1), np.int32)
    for b in range(batch):
        chosen = [np.sort(rng.choice(k, c, replace=False)) for c in counts[b]]
        flat = np.concatenate(chosen) if chosen else np.zeros(0)
        indices[b, :len(flat)] = flat
        indices[b, len(flat):] = k + 5  # Tail blocks in no row, outside x.
        indptr[b, 1:] = np.cumsum(counts[b])
    values = rng.standard_normal((batch, nnz, n)).astype(np.float32)
    return jnp.asarray(values, dtype), jnp.asarray(indices), jnp.asarray(indptr)


def dense_weight(values, indices, indptr, k, n_out):
    """W [B, K, N] in float64 under the kernels' reading of untrusted structure."""
    vals = np.asarray(values, np.float64)
    b, nnz, n = vals.shape
    rows = np.asarray(block_rows(jnp.asarray(indptr), nnz))
    idx = np.asarray(indices)
    r_count = indptr.shape[-1] - 1
    w = np.zeros((b, k, r_count * n))
    for bi in range(b):
        for p in range(nnz):
            r, kk = rows[bi, p], idx[bi, p]
            if 0 <= r < r_count and 0 <= kk < k:
                w[bi, kk, r * n:(r + 1) * n] += vals[bi, p]
    return w[..., :n_out]


def f64(a):
    return np.asarray(a, np.float64)


# ------------------------------------------------------------------ the emulated targets


def spmm(x, values, indices, indptr, n_out):
    b = max(x.shape[0], values.shape[0])
    out = jax.ShapeDtypeStruct((b, x.shape[1], n_out), x.dtype)
    return jax.ffi.ffi_call("jaxsparse_emu_blocks_spmm", out)(
        x, values, indices, _spans(indptr, values.shape[1]))


def spmm_t(dy, values, indices, indptr, k):
    rows = block_rows(indptr, values.shape[1])
    order, kptr = _blocks_by_input(indices, rows, indptr.shape[-1] - 1, k)
    out = jax.ShapeDtypeStruct((max(dy.shape[0], values.shape[0]), dy.shape[1], k), dy.dtype)
    return jax.ffi.ffi_call("jaxsparse_emu_blocks_spmm_t", out)(dy, values, rows, order, kptr)


def sddmm(x, dy, indices, indptr, n):
    rows = block_rows(indptr, indices.shape[-1])
    b = max(x.shape[0], dy.shape[0], indices.shape[0])
    out = jax.ShapeDtypeStruct((b, indices.shape[-1], n), x.dtype)
    return jax.ffi.ffi_call("jaxsparse_emu_blocks_sddmm", out)(x, dy, indices, rows)


def ref_sddmm(x, dy, values, indices, indptr):
    """dv[p, j] = (x^T dy)[k_p, row(p) n + j], 0 for blocks in no row, outside x or padding."""
    b, nnz, n = values.shape
    rows = np.asarray(block_rows(jnp.asarray(indptr), nnz))
    idx = np.asarray(indices)
    gram = np.swapaxes(f64(x), 1, 2) @ f64(dy)  # [B, K, N]
    gram = np.broadcast_to(gram, (max(b, gram.shape[0]), *gram.shape[1:]))
    k, n_out, r_count = x.shape[2], dy.shape[2], indptr.shape[-1] - 1
    dv = np.zeros((gram.shape[0], nnz, n))
    for bi in range(gram.shape[0]):
        wb = min(bi, b - 1)
        for p in range(nnz):
            r, kk = rows[wb, p], idx[wb, p]
            if 0 <= r < r_count and 0 <= kk < k:
                outs = min(n, n_out - r * n)
                dv[bi, p, :outs] = gram[bi, kk, r * n:r * n + outs]
    return dv


def normal(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


# ------------------------------------------------------------------ forward

# (T, K, N): 16-token tiles and their edges, outputs not a multiple of n.
TC_SHAPES = [(1, 37, 45), (15, 70, 64), (17, 50, 70), (65, 33, 21)]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("n", [4, 8, 16, 32])
@pytest.mark.parametrize("t,k,n_out", TC_SHAPES)
def test_spmm_on_tensor_cores_at_tile_edges(dtype, n, t, k, n_out):
    rng = np.random.default_rng(t * 1000 + k + n_out + n)
    values, indices, indptr = random_blocks(rng, k, n_out, n, dtype=dtype)
    x = normal(rng, (1, t, k), dtype)
    got = spmm(x, values, indices, indptr, n_out)
    assert got.dtype == dtype and got.shape == (1, t, n_out)
    assert_close(got, f64(x) @ dense_weight(values, indices, indptr, k, n_out), dtype,
                 scale_for(k))


@pytest.mark.parametrize("n", [4, 8, 16, 32])
def test_spmm_f32_on_cuda_cores(n):
    rng = np.random.default_rng(n)
    t, k, n_out = 19, 45, 3 * n + 3
    values, indices, indptr = random_blocks(rng, k, n_out, n, dtype=jnp.float32)
    x = normal(rng, (1, t, k), jnp.float32)
    assert_close(spmm(x, values, indices, indptr, n_out),
                 f64(x) @ dense_weight(values, indices, indptr, k, n_out), jnp.float32,
                 scale_for(k))


# ------------------------------------------------------------------ backward


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("n,t,k,n_out", [(4, 9, 30, 18), (16, 17, 40, 50), (32, 5, 21, 40)])
def test_backward_kernels(dtype, n, t, k, n_out):
    rng = np.random.default_rng(7 * t + k + n)
    values, indices, indptr = random_blocks(rng, k, n_out, n, dtype=dtype)
    x = normal(rng, (1, t, k), dtype)
    dy = normal(rng, (1, t, n_out), dtype)
    w = dense_weight(values, indices, indptr, k, n_out)
    assert_close(spmm_t(dy, values, indices, indptr, k), f64(dy) @ np.swapaxes(w, 1, 2), dtype,
                 scale_for(n_out))
    dv = sddmm(x, dy, indices, indptr, n)
    assert dv.shape == values.shape
    assert_close(dv, ref_sddmm(x, dy, values, indices, indptr), dtype, scale_for(t))


# ------------------------------------------------------------------ batches


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_batches_broadcast(dtype):
    rng = np.random.default_rng(3)
    t, k, n, n_out = 20, 30, 8, 36
    values, indices, indptr = random_blocks(rng, k, n_out, n, batch=2, dtype=dtype)
    x1, x2 = normal(rng, (1, t, k), dtype), normal(rng, (2, t, k), dtype)
    dy1 = normal(rng, (1, t, n_out), dtype)
    w = dense_weight(values, indices, indptr, k, n_out)
    assert_close(spmm(x1, values, indices, indptr, n_out), f64(x1) @ w, dtype, scale_for(k))
    one = (values[:1], indices[:1], indptr[:1])
    assert_close(spmm(x2, *one, n_out), f64(x2) @ w[:1], dtype, scale_for(k))
    assert_close(spmm_t(dy1, values, indices, indptr, k), f64(dy1) @ np.swapaxes(w, 1, 2), dtype,
                 scale_for(n_out))
    assert_close(sddmm(x2, dy1, indices[:1], indptr[:1], n),
                 ref_sddmm(x2, dy1, values[:1], indices[:1], indptr[:1]), dtype, scale_for(t))


# ------------------------------------------------------------------ untrusted structure


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_malformed_structure_reads_as_the_reference_reads_it(dtype):
    """indptr out of [0, nnz] and decreasing, inputs outside x (negative and >= K), and a NaN in
    a block outside x: the CUDA forms give what the reference gives, and the NaN adds nothing."""
    rng = np.random.default_rng(5)
    t, k, n, n_out = 18, 24, 8, 40
    values, indices, indptr = random_blocks(rng, k, n_out, n, dtype=dtype)
    nnz = values.shape[1]
    indptr = jnp.asarray(rng.integers(-3, nnz + 4, indptr.shape), jnp.int32)
    indices = jnp.asarray(rng.integers(-2, k + 2, indices.shape), jnp.int32)
    outside = int(np.argmax((np.asarray(indices[0]) < 0) | (np.asarray(indices[0]) >= k)))
    assert not 0 <= int(indices[0, outside]) < k
    values = values.at[0, outside, 0].set(jnp.nan)
    x = normal(rng, (1, t, k), dtype)
    dy = normal(rng, (1, t, n_out), dtype)
    w = dense_weight(jnp.nan_to_num(values), indices, indptr, k, n_out)
    assert_close(spmm(x, values, indices, indptr, n_out), f64(x) @ w, dtype, scale_for(k))
    assert_close(spmm_t(dy, values, indices, indptr, k), f64(dy) @ np.swapaxes(w, 1, 2), dtype,
                 scale_for(n_out))
    assert_close(sddmm(x, dy, indices, indptr, n), ref_sddmm(x, dy, values, indices, indptr),
                 dtype, scale_for(t))


def test_empty_dimensions():
    rng = np.random.default_rng(0)
    values, indices, indptr = random_blocks(rng, 4, 16, 8, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(
        spmm(jnp.ones((1, 5, 0), jnp.bfloat16), values, indices, indptr, 16), 0)
    assert spmm(jnp.ones((1, 0, 4), jnp.bfloat16), values, indices, indptr, 16).shape == (1, 0, 16)
    dv = sddmm(jnp.ones((1, 0, 4), jnp.float32), jnp.ones((1, 0, 16), jnp.float32), indices,
               indptr, 8)
    np.testing.assert_array_equal(dv, 0)


def test_the_cuda_forms_are_checked():
    rng = np.random.default_rng(1)
    values, indices, indptr = random_blocks(rng, 10, 16, 8, dtype=jnp.float32)
    rows = block_rows(indptr, values.shape[1])
    order, kptr = _blocks_by_input(indices, rows, 2, 10)
    dy = jnp.ones((1, 3, 16), jnp.float32)
    out = jax.ShapeDtypeStruct((1, 3, 10), jnp.float32)
    call = jax.ffi.ffi_call("jaxsparse_emu_blocks_spmm_t", out)
    with pytest.raises(Exception, match="kptr.shape"):
        call(dy, values, rows, order, kptr[:, :-1])
    with pytest.raises(Exception, match="order dtype must be"):
        call(dy, values, rows, order.astype(jnp.int16), kptr)
