"""The CUDA kernels, run on the CPU by the SIMT emulator through their emulated FFI targets.

These run in every test session (the emulator module is always built); `JAXSPARSE_EMULATE_CUDA=1`
additionally routes the whole op suite onto them (see the Makefile's test target).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp
from jaxsparse.ops import nm_spmm_reference, pack_mma_sp_24
from tests._check import assert_close, keys, random_array, random_nm, scale_for

# CI runs this file with the newest jax only (`once`: tests/conftest.py).
pytestmark = pytest.mark.once

SP24 = "jaxsparse_emu_nm_spmm_sp24"


def sp24(x, values, indices):
    """y = x @ W on the emulated sparse-tensor-core kernel (rank-3 operands)."""
    packed, metadata = pack_mma_sp_24(values, indices)
    out = jax.ShapeDtypeStruct((max(x.shape[0], values.shape[0]), x.shape[1], values.shape[1]),
                               x.dtype)
    return jax.ffi.ffi_call(SP24, out)(x, packed, metadata)


# Around the block tile (64 rows x 64 tokens x 64 inputs) and the 16-row m-tile.
EDGES = [(1, 16, 1), (63, 48, 17), (64, 64, 64), (65, 80, 65), (130, 192, 130), (7, 128, 16)]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("t,k,out", EDGES)
def test_sp24_kernel_at_tile_edges(dtype, t, k, out):
    kx, kw = keys(t * 1000 + k + out, 2)
    x = random_array(kx, (1, t, k), dtype)
    ws = random_nm(kw, k, out, 2, 4, dtype)
    values, indices = ws.values[None], ws.indices[None]
    got = jax.jit(sp24)(x, values, indices)
    want = nm_spmm_reference(x, values, indices, n=2, m=4)
    assert got.dtype == dtype and got.shape == (1, t, out)
    assert_close(got, want, dtype, scale_for(k))


def test_sp24_kernel_batches_and_garbage_positions():
    kx, kw = keys(5, 2)
    x = random_array(kx, (1, 70, 64), jnp.bfloat16)
    ws = random_nm(kw, 64, 40, 2, 4, jnp.bfloat16, batch=(3,))
    rng = np.random.default_rng(0)
    # Positions >= 4, equal or descending, as unvalidated data under jit could hold.
    garbage = jnp.asarray(rng.integers(0, 7, size=ws.indices.shape), jnp.uint8)
    got = jax.jit(sp24)(x, ws.values, ws.indices)
    assert got.shape == (3, 70, 40)
    assert_close(got, nm_spmm_reference(x, ws.values, ws.indices, n=2, m=4), jnp.bfloat16,
                 scale_for(64))
    # The ABI's rule for positions >= m (they contribute 0) is the CPU kernels' too; the pure
    # reference is only defined for valid positions.
    got = jax.jit(sp24)(x, ws.values, garbage)
    assert_close(got, jsp.ops.nm_spmm(x, ws.values, garbage, n=2, m=4), jnp.bfloat16, scale_for(64))


def test_sp24_kernel_rejects_bad_operands():
    x = jnp.ones((1, 4, 24), jnp.bfloat16)
    values = jnp.ones((1, 8, 12), jnp.bfloat16)
    metadata = jnp.zeros((1, 1, 1, 32), jnp.uint32)
    out = jax.ShapeDtypeStruct((1, 4, 8), jnp.bfloat16)
    with pytest.raises(Exception, match="K = x.shape\\[2\\] must be a multiple of 16, got 24"):
        jax.ffi.ffi_call(SP24, out)(x, values, metadata).block_until_ready()
    x = jnp.ones((1, 4, 32), jnp.float32)
    values = jnp.ones((1, 8, 16), jnp.float32)
    with pytest.raises(Exception, match="x dtype must be bfloat16 or float16, got float32"):
        jax.ffi.ffi_call(SP24, jax.ShapeDtypeStruct((1, 4, 8), jnp.float32))(
            x, values, metadata).block_until_ready()


@pytest.mark.parametrize("target", ["spmm", "spmm_t", "sddmm"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_generic_kernels_match_the_reference(target, dtype):
    kx, kw, kd = keys(11, 3)
    t, k, out, n, m = 33, 37, 19, 3, 7
    x = random_array(kx, (1, t, k), dtype)
    dy = random_array(kd, (1, t, out), dtype)
    ws = random_nm(kw, k, out, n, m, dtype)
    v, i = ws.values[None], ws.indices[None]
    ops = jsp.ops
    if target == "spmm":
        shape, args, ref = (1, t, out), (x, v, i), ops.nm_spmm_reference(x, v, i, n=n, m=m)
    elif target == "spmm_t":
        shape, args = (1, t, k), (dy, v, i)
        ref = ops.nm_spmm_t_reference(dy, v, i, n=n, m=m, in_features=k)
    else:
        shape, args, ref = v.shape, (x, dy, i), ops.nm_sddmm_reference(x, dy, i, n=n, m=m)
    got = jax.ffi.ffi_call(f"jaxsparse_emu_nm_{target}", jax.ShapeDtypeStruct(shape, dtype))(
        *args, n=np.int32(n), m=np.int32(m))
    assert_close(got, ref, dtype, scale_for(max(k, t)))


# Tensor-core backward kernels: 16-bit operands with N % 8 == 0 (and K % 8 == 0 for sddmm).
TC_SHAPES = [(1, 8, 8, 2, 4), (65, 72, 40, 2, 4), (33, 136, 64, 1, 4), (64, 64, 72, 4, 8),
             (20, 40, 16, 3, 5), (130, 200, 24, 2, 4)]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("t,k,out,n,m", TC_SHAPES)
def test_tensor_core_backward_kernels(dtype, t, k, out, n, m):
    kx, kw, kd = keys(t + 7 * k + out, 3)
    x = random_array(kx, (1, t, k), dtype)
    dy = random_array(kd, (2, t, out), dtype)
    ws = random_nm(kw, k, out, n, m, dtype)
    v, i = ws.values[None], ws.indices[None]
    ops = jsp.ops
    dx = jax.ffi.ffi_call("jaxsparse_emu_nm_spmm_t", jax.ShapeDtypeStruct((2, t, k), dtype))(
        dy, v, i, n=np.int32(n), m=np.int32(m))
    assert_close(dx, ops.nm_spmm_t_reference(dy, v, i, n=n, m=m, in_features=k), dtype,
                 scale_for(out))
    dv = jax.ffi.ffi_call("jaxsparse_emu_nm_sddmm", jax.ShapeDtypeStruct((2, *v.shape[1:]), dtype))(
        x, dy, i, n=np.int32(n), m=np.int32(m))
    assert_close(dv, ops.nm_sddmm_reference(x, dy, i, n=n, m=m), dtype, scale_for(t))


def test_tensor_core_backward_with_garbage_positions():
    kx, kw, kd = keys(3, 3)
    t, k, out = 40, 64, 32
    x = random_array(kx, (1, t, k), jnp.bfloat16)
    dy = random_array(kd, (1, t, out), jnp.bfloat16)
    ws = random_nm(kw, k, out, 2, 4, jnp.bfloat16)
    garbage = jnp.asarray(np.random.default_rng(1).integers(0, 9, size=ws.indices.shape),
                          jnp.uint8)[None]
    v = ws.values[None]
    # Against the CPU kernels, which follow the ABI's rule (positions >= m contribute 0).
    dx = jax.ffi.ffi_call("jaxsparse_emu_nm_spmm_t", jax.ShapeDtypeStruct((1, t, k), jnp.bfloat16))(
        dy, v, garbage, n=np.int32(2), m=np.int32(4))
    assert_close(dx, jsp.ops.nm_spmm_t(dy, v, garbage, n=2, m=4, in_features=k), jnp.bfloat16,
                 scale_for(out))
    dv = jax.ffi.ffi_call("jaxsparse_emu_nm_sddmm", jax.ShapeDtypeStruct(v.shape, jnp.bfloat16))(
        x, dy, garbage, n=np.int32(2), m=np.int32(4))
    assert_close(dv, jsp.ops.nm_sddmm(x, dy, garbage, n=2, m=4), jnp.bfloat16, scale_for(t))
