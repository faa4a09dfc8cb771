"""The 1xN block primitives against their pure references and the dense product, on every CPU
ISA, under vmap and autodiff, at tile edges and on untrusted structure. Run twice by
`make test`: on the CPU kernels, and with JAXSPARSE_EMULATE_CUDA=1 on the CUDA kernels under
the SIMT emulator."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxsparse as jsp
from jaxsparse import _ffi
from jaxsparse.ops import (
    block_rows,
    blocks_conv,
    blocks_conv_reference,
    blocks_conv_sddmm,
    blocks_conv_sddmm_reference,
    blocks_sddmm,
    blocks_sddmm_reference,
    blocks_spmm,
    blocks_spmm_reference,
    blocks_spmm_t,
    blocks_spmm_t_reference,
)
from tests._check import DTYPES, assert_close, once_after, scale_for

# (tokens, in, out, n, density): token tiles of every micro-kernel (24 tokens for n = 16, 48
# for n = 8, 96 for n = 4, 12 for n = 32) and their remainders, partial last block rows,
# densities that leave rows empty.
SHAPES = [
    (1, 64, 32, 16, 0.25),
    (3, 70, 40, 16, 0.3),
    (25, 37, 48, 4, 0.5),
    (97, 50, 21, 4, 0.2),
    (49, 33, 70, 8, 0.4),
    (13, 66, 96, 32, 0.25),
    (300, 40, 17, 16, 0.1),
    # The AVX2 unit's passes (blocks_avx2.h: 8-token tiles, 24 for n = 4; passes of 12 token
    # pairs for n = 4, 8 tokens for n = 8, 4 for n = 16, 2 for n = 32): remainders whose last
    # pass is rounded up to a wider one (reading padding tokens past the tile), odd tokens in a
    # pair, and partial last block rows of 3, 4 and 11 outputs.
    (11, 64, 46, 4, 0.5),
    (59, 48, 20, 4, 0.4),
    (21, 40, 35, 8, 0.5),
    (15, 48, 52, 16, 0.3),
    (11, 40, 75, 32, 0.4),
]


def weight(seed, k, out, n, density, dtype=jnp.float32, batch=()):
    w = np.random.default_rng(seed).standard_normal((*batch, k, out))
    return jsp.BlocksSparse.fromdense(jnp.asarray(w, dtype), n=n, density=density)


def operands(seed, t, k, out, n, density, dtype, bx=1, bw=1):
    rng = np.random.default_rng(seed + 100)
    x = jnp.asarray(rng.standard_normal((bx, t, k)), dtype)
    dy = jnp.asarray(rng.standard_normal((max(bx, bw), t, out)), dtype)
    return x, weight(seed, k, out, n, density, dtype, batch=(bw,)), dy


def arrays(ws):
    return ws.values, ws.indices, ws.indptr


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,k,out,n,density", once_after(SHAPES))
def test_three_ops_match_reference_and_dense(isa, t, k, out, n, density, dtype):
    x, ws, dy = operands(0, t, k, out, n, density, dtype)
    values, indices, indptr = arrays(ws)
    dense = ws.todense().astype(jnp.float32)  # [1, k, out]
    s = scale_for(k)
    y = blocks_spmm(x, values, indices, indptr, out_features=out)
    assert y.shape == (1, t, out) and y.dtype == dtype
    assert_close(y, blocks_spmm_reference(x, values, indices, indptr, out_features=out), dtype, s)
    assert_close(y, jnp.einsum("btk,bkn->btn", x.astype(jnp.float32), dense), dtype, s)
    dx = blocks_spmm_t(dy, values, indices, indptr, in_features=k)
    assert dx.shape == (1, t, k) and dx.dtype == dtype
    assert_close(dx, blocks_spmm_t_reference(dy, values, indices, indptr, in_features=k), dtype,
                 scale_for(out))
    dv = blocks_sddmm(x, dy, indices, indptr, n=n)
    assert dv.shape == values.shape and dv.dtype == dtype
    assert_close(dv, blocks_sddmm_reference(x, dy, indices, indptr, n=n), dtype, scale_for(t))
    # The padding outputs of a partial last block row get no gradient.
    rows = block_rows(indptr, indices.shape[-1])
    padding = (rows[..., None] * n + jnp.arange(n)) >= out
    assert not bool(jnp.any(jnp.where(padding, dv, 0) != 0))


def check_three_ops(t, k, out, n, density):
    x, ws, dy = operands(3, t, k, out, n, density, jnp.float32)
    values, indices, indptr = arrays(ws)
    y = blocks_spmm(x, values, indices, indptr, out_features=out)
    assert_close(y, blocks_spmm_reference(x, values, indices, indptr, out_features=out),
                 jnp.float32, scale_for(k))
    dx = blocks_spmm_t(dy, values, indices, indptr, in_features=k)
    assert_close(dx, blocks_spmm_t_reference(dy, values, indices, indptr, in_features=k),
                 jnp.float32, scale_for(out))
    dv = blocks_sddmm(x, dy, indices, indptr, n=n)
    assert_close(dv, blocks_sddmm_reference(x, dy, indices, indptr, n=n), jnp.float32,
                 scale_for(t))


# The split into tasks and token blocks is the same code for every n: the later n are `once`
# (not emulated, where each takes seconds and the CUDA grid splits differently; default ISA).
@pytest.mark.parametrize("n", once_after([4, 8, 16, 32], unpack=False))
def test_larger_shapes_span_several_tasks_and_token_blocks(isa, n):
    # 600 tokens: three token blocks of 256; 8192 blocks and more: 4096-block tasks over rows.
    check_three_ops(600, 2048, 256, n, 0.5)


@pytest.mark.parametrize("n", [4, 8, 16, 32])
@pytest.mark.parametrize("t,k,out,density", [(600, 256, 160, 0.5), (77, 40, 17, 0.3)])
def test_few_blocks_and_many_tokens_split_the_tokens(isa, n, t, k, out, density):
    # Fewer blocks than a task per worker: the workers take token blocks of a few tiles each
    # (the last one partial), every block row in each.
    check_three_ops(t, k, out, n, density)


@pytest.mark.parametrize("bx,bw", [(1, 3), (3, 1), (3, 3)])
def test_kernel_batch_broadcasting(isa, bx, bw):
    x, ws, dy = operands(1, 5, 40, 24, 8, 0.5, jnp.float32, bx=bx, bw=bw)
    a = arrays(ws)
    y = blocks_spmm(x, *a, out_features=24)
    assert y.shape == (3, 5, 24)
    assert_close(y, blocks_spmm_reference(x, *a, out_features=24), jnp.float32)
    assert_close(blocks_spmm_t(dy, *a, in_features=40),
                 blocks_spmm_t_reference(dy, *a, in_features=40), jnp.float32)
    assert_close(blocks_sddmm(x, dy, a[1], a[2], n=8),
                 blocks_sddmm_reference(x, dy, a[1], a[2], n=8), jnp.float32)


def test_values_batched_alone_and_empty_dimensions():
    x, ws, dy = operands(2, 4, 32, 16, 16, 0.5, jnp.float32)
    values = jnp.stack([ws.values[0], 2 * ws.values[0]])  # Structure stays batch 1.
    y = blocks_spmm(x, values, ws.indices, ws.indptr, out_features=16)
    assert_close(y[1], 2 * y[0], jnp.float32)
    empty = jnp.zeros((1, 0, 32), jnp.float32)
    assert blocks_spmm(empty, *arrays(ws), out_features=16).shape == (1, 0, 16)
    dv = blocks_sddmm(empty, jnp.zeros((1, 0, 16)), ws.indices, ws.indptr, n=16)
    assert dv.shape == ws.values.shape and not bool(jnp.any(dv))


def test_vmap_of_each_primitive_against_a_loop():
    x, ws, dy = operands(4, 6, 48, 20, 4, 0.4, jnp.float32, bx=1, bw=1)
    xs = jnp.stack([x[0], -x[0], 2 * x[0]])
    values, indices, indptr = arrays(ws)
    f = functools.partial(blocks_spmm, out_features=20)
    got = jax.vmap(lambda xi: f(xi[None], values, indices, indptr))(xs)
    want = jnp.stack([f(xi[None], values, indices, indptr) for xi in xs])
    assert_close(got, want, jnp.float32)
    vs = jnp.stack([values, -values])
    got = jax.vmap(lambda v: blocks_spmm_t(dy, v, indices, indptr, in_features=48))(vs)
    want = jnp.stack([blocks_spmm_t(dy, v, indices, indptr, in_features=48) for v in vs])
    assert_close(got, want, jnp.float32)
    dys = jnp.stack([dy, 3 * dy])
    got = jax.vmap(lambda d: blocks_sddmm(x, d, indices, indptr, n=4))(dys)
    want = jnp.stack([blocks_sddmm(x, d, indices, indptr, n=4) for d in dys])
    assert_close(got, want, jnp.float32)


def test_check_grads_each_primitive():
    # Every primitive is linear in each operand, so central differences are exact up to
    # rounding at any step: a step of 1e-2 (not check_grads' 1e-4) keeps the f32 cancellation
    # well inside the tolerance (at 1e-4 the second-order check of sddmm drifted 3.5% on a Zen 3).
    x, ws, dy = operands(5, 3, 20, 12, 8, 0.5, jnp.float32)
    values, indices, indptr = arrays(ws)
    tolerance = dict(order=2, modes=("fwd", "rev"), atol=2e-2, rtol=2e-2, eps=1e-2)
    check_grads(lambda a, v: blocks_spmm(a, v, indices, indptr, out_features=12), (x, values),
                **tolerance)
    check_grads(lambda d, v: blocks_spmm_t(d, v, indices, indptr, in_features=20), (dy, values),
                **tolerance)
    check_grads(lambda a, d: blocks_sddmm(a, d, indices, indptr, n=8), (x, dy), **tolerance)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_untrusted_structure_reads_nothing_out_of_bounds(isa, dtype):
    """Garbage indices and an unordered indptr (unvalidated data under jit) behave as the
    reference says: rows are the running maximum of the clamped indptr, blocks outside x or
    outside every row add nothing."""
    t, k, out, n = 7, 30, 40, 8
    x, ws, dy = operands(6, t, k, out, n, 0.5, dtype)
    values, indices, indptr = arrays(ws)
    nnz = indices.shape[-1]
    bad_indices = indices.at[0, ::5].set(jnp.array([-3, 30, 2**30, 29, 7, 1000, -1, 5, 31, 0,
                                                    99, 8, 7, 4, 2, 1, 0, 3, 6, 9][: -(-nnz // 5)],
                                                   jnp.int32))
    bad_indptr = jnp.array([[-5, 3, 2, nnz + 9, 4, 7]], jnp.int32)
    for ind, ptr in [(bad_indices, indptr), (indices, bad_indptr), (bad_indices, bad_indptr)]:
        assert_close(blocks_spmm(x, values, ind, ptr, out_features=out),
                     blocks_spmm_reference(x, values, ind, ptr, out_features=out), dtype,
                     scale_for(k))
        assert_close(blocks_spmm_t(dy, values, ind, ptr, in_features=k),
                     blocks_spmm_t_reference(dy, values, ind, ptr, in_features=k), dtype,
                     scale_for(out))
        assert_close(blocks_sddmm(x, dy, ind, ptr, n=n),
                     blocks_sddmm_reference(x, dy, ind, ptr, n=n), dtype, scale_for(t))


@pytest.mark.cpu_only
def test_block_rows_is_the_running_maximum_of_clamped_indptr():
    rows = block_rows(jnp.array([-2, 3, 1, 9, 5], jnp.int32), 7)
    # spans: [0, 3, 3, 7, 7]: blocks 0-2 in row 0, 3-6 in row 2 (row 1 empty).
    np.testing.assert_array_equal(rows, [0, 0, 0, 2, 2, 2, 2])
    np.testing.assert_array_equal(block_rows(jnp.array([2, 4, 5], jnp.int32), 6),
                                  [-1, -1, 0, 0, 1, 2])


@pytest.mark.cpu_only
def test_primitive_shape_checks():
    x, ws, dy = operands(7, 4, 32, 16, 16, 0.5, jnp.float32)
    values, indices, indptr = arrays(ws)
    with pytest.raises(ValueError, match="indptr must be"):
        blocks_spmm(x, values, indices, indptr[:, :-1], out_features=16)
    with pytest.raises(ValueError, match="must agree on nnz"):
        blocks_spmm(x, values[:, :-1], indices, indptr, out_features=16)
    with pytest.raises(TypeError, match="int32"):
        blocks_spmm(x, values, indices.astype(jnp.uint8), indptr, out_features=16)
    with pytest.raises(TypeError, match="dtypes must match"):
        blocks_spmm(x.astype(jnp.bfloat16), values, indices, indptr, out_features=16)
    with pytest.raises(ValueError, match="batch dim must be 1 or"):
        blocks_spmm(jnp.concatenate([x] * 2), jnp.concatenate([values] * 3),
                    jnp.concatenate([indices] * 3), jnp.concatenate([indptr] * 3),
                    out_features=16)
    with pytest.raises(ValueError, match="same tokens"):
        blocks_sddmm(x, dy[:, :2], indices, indptr, n=16)


@pytest.mark.cpu_only
def test_the_ffi_validator_names_the_operand():
    """A hand-written ffi_call with a wrong shape gets the target's own message, not a crash."""
    if not jsp.has_cpu_kernels():
        pytest.skip("no CPU kernels built")
    x, ws, _ = operands(8, 4, 32, 16, 16, 0.5, jnp.float32)
    values, indices, indptr = arrays(ws)
    call = jax.ffi.ffi_call("jaxsparse_blocks_spmm",
                            jax.ShapeDtypeStruct((1, 4, 40), jnp.float32))
    with pytest.raises(Exception, match=r"jaxsparse_blocks_spmm: indptr.shape\[1\]"):
        jax.block_until_ready(call(x, values, indices, indptr))
    call = jax.ffi.ffi_call("jaxsparse_blocks_spmm",
                            jax.ShapeDtypeStruct((1, 4, 16), jnp.float32))
    with pytest.raises(Exception, match="indices dtype must be int32"):
        jax.block_until_ready(call(x, values, indices.astype(jnp.uint32), indptr))
    with pytest.raises(Exception, match="block size n"):
        jax.block_until_ready(call(x, values[..., :5], indices, indptr))


# (H, W, C, out, kernel, strides, dilation, padding, n): channels that are and are not a multiple
# of the 8x8 pack, padding on every side, strides and dilation, 1x1, more output pixels than a
# token block (two images of 20x20). Stride 1 with a kernel larger than 1x1 runs the direct
# convolution (blocks_kernels.h's DirectJob: a strip per band of output rows, tiles across its
# rows) on the AVX-512 kernels, f32 and bf16 pairs: the last four cases give it uneven padding
# with dilation, a 1x1 kernel (which keeps the patches), outputs that are not a multiple of n,
# padding wider than the kernel's reach, and many bands with a short last one.
CONV_CASES = [
    (9, 11, 12, 40, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 16),
    (10, 7, 8, 24, (3, 2), (2, 1), (1, 2), ((0, 2), (1, 0)), 8),
    (6, 6, 17, 33, (1, 1), (2, 2), (1, 1), ((0, 0), (0, 0)), 4),
    (20, 20, 16, 64, (3, 3), (1, 1), (2, 2), ((2, 2), (2, 2)), 32),
    (10, 7, 8, 24, (3, 2), (1, 1), (1, 2), ((0, 2), (1, 0)), 8),
    (6, 6, 17, 33, (1, 1), (1, 1), (1, 1), ((0, 0), (0, 0)), 4),
    (5, 4, 9, 20, (3, 3), (1, 1), (1, 1), ((3, 2), (4, 3)), 16),
    (62, 5, 40, 36, (2, 3), (1, 1), (2, 1), ((1, 0), (2, 1)), 4),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("h,w,c,out,kernel,strides,dilation,padding,n", CONV_CASES)
def test_blocks_conv_gathers_the_patches_the_reference_stores(isa, dtype, h, w, c, out, kernel,
                                                              strides, dilation, padding, n):
    k = kernel[0] * kernel[1] * c
    ws = weight(5, k, out, n, 0.3, dtype)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, h, w, c)), dtype)
    params = dict(out_features=out, kernel_size=kernel, strides=strides, dilation=dilation,
                  padding=padding)
    arrays3 = (ws.values[None], ws.indices[None], ws.indptr[None])
    y = blocks_conv(x, *arrays3, **params)
    want = blocks_conv_reference(x, *arrays3, **params)
    assert y.shape == want.shape and y.dtype == dtype
    assert_close(y, want, dtype, scale_for(k))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n", [8, 16])
def test_blocks_conv_untrusted_structure_reads_nothing_out_of_bounds(isa, dtype, n):
    """The stride-1 convolution reads its inputs through a table of offsets: garbage indices
    and an unordered indptr must add nothing there either, as the reference says."""
    geometry = dict(out_features=40, kernel_size=(3, 3), strides=(1, 1), dilation=(1, 1),
                    padding=((1, 1), (1, 1)))
    ws = weight(21, 9 * 6, 40, n, 0.5, dtype)
    x = jnp.asarray(np.random.default_rng(22).standard_normal((2, 7, 9, 6)), dtype)
    values, indices, indptr = ws.values[None], ws.indices[None], ws.indptr[None]
    nnz = indices.shape[-1]
    garbage = jnp.array([-3, 54, 2**30, 53, 7, 1000, -1, 5, 55, 0], jnp.int32)
    bad_indices = indices.at[0, ::3].set(jnp.resize(garbage, (-(-nnz // 3),)))
    bad_indptr = jnp.array([[-5, 3, 2, nnz + 9, 4, 7][: indptr.shape[-1]]], jnp.int32)
    for ind, ptr in [(bad_indices, indptr), (indices, bad_indptr), (bad_indices, bad_indptr)]:
        assert_close(blocks_conv(x, values, ind, ptr, **geometry),
                     blocks_conv_reference(x, values, ind, ptr, **geometry), dtype, scale_for(54))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_blocks_conv_many_images_run_several_bands_per_task(isa, dtype):
    """17 small images: one band each, taken a few at a time per task (the last run shorter)."""
    geometry = dict(out_features=48, kernel_size=(3, 3), strides=(1, 1), dilation=(1, 1),
                    padding=((1, 1), (1, 1)))
    ws = weight(23, 9 * 5, 48, 16, 0.4, dtype)
    x = jnp.asarray(np.random.default_rng(24).standard_normal((17, 6, 5, 5)), dtype)
    arrays3 = (ws.values[None], ws.indices[None], ws.indptr[None])
    assert_close(blocks_conv(x, *arrays3, **geometry),
                 blocks_conv_reference(x, *arrays3, **geometry), dtype, scale_for(45))


def test_blocks_conv_gradients_vmap_and_jvp():
    params = dict(out_features=24, kernel_size=(3, 3), strides=(2, 1), dilation=(1, 1),
                  padding=((1, 1), (0, 1)))
    ws = weight(7, 9 * 8, 24, 8, 0.4)
    x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 9, 8, 8)), jnp.float32)
    v, i, p = ws.values[None], ws.indices[None], ws.indptr[None]
    check_grads(lambda x, v: blocks_conv(x, v, i, p, **params), (x, v), order=1,
                modes=("fwd", "rev"), atol=1e-2, rtol=1e-2)
    batched = jax.vmap(lambda x: blocks_conv(x, v, i, p, **params))(jnp.stack([x, 2 * x]))
    assert_close(batched[1], 2 * blocks_conv(x, v, i, p, **params), jnp.float32)
    per_weight = jax.vmap(lambda v: blocks_conv(x, v, i, p, **params))(jnp.stack([v, -v]))
    assert_close(per_weight[1], -blocks_conv_reference(x, v, i, p, **params), jnp.float32)


@pytest.mark.cpu_only
def test_blocks_conv_target_checks_its_attributes():
    ws = weight(9, 18, 16, 8, 0.5)
    x = jnp.ones((1, 4, 4, 2), jnp.float32)
    out = jax.ShapeDtypeStruct((1, 4, 4, 16), jnp.float32)
    call = jax.ffi.ffi_call("jaxsparse_blocks_conv", out)
    attrs = dict(kernel_h=np.int32(3), kernel_w=np.int32(3), stride_h=np.int32(1),
                 stride_w=np.int32(1), dilation_h=np.int32(1), dilation_w=np.int32(1),
                 pad_top=np.int32(1), pad_left=np.int32(1))
    args = (x, ws.values[None], ws.indices[None], ws.indptr[None])
    np.testing.assert_allclose(call(*args, **attrs), blocks_conv_reference(
        *args, out_features=16, kernel_size=(3, 3), strides=(1, 1), dilation=(1, 1),
        padding=((1, 1), (1, 1))), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="pad_top"):
        call(*args, **{**attrs, "pad_top": np.int32(-1)})
    with pytest.raises(Exception, match="x must have rank 4"):
        call(x[0], *args[1:], **attrs)


# Bytes per backward step: one image, two of the three (a loop and a remainder), all three.
@pytest.mark.parametrize("chunk_bytes", [1, 2 * 4 * 5 * 6 * 36, 2**30],
                         ids=["image-by-image", "two-and-one", "all-at-once"])
def test_blocks_conv_backward_by_chunks_of_images(monkeypatch, chunk_bytes):
    import jaxsparse.ops.blocks as blocks_module

    monkeypatch.setattr(blocks_module, "BACKWARD_PATCH_BYTES", chunk_bytes)
    monkeypatch.setattr(blocks_module, "BACKWARD_SDDMM_BYTES", chunk_bytes)
    params = dict(out_features=16, kernel_size=(3, 3), strides=(1, 1), dilation=(1, 1),
                  padding=((1, 1), (1, 1)))
    ws = weight(11, 9 * 4, 16, 8, 0.5)
    x = jnp.asarray(np.random.default_rng(12).standard_normal((3, 5, 6, 4)), jnp.float32)
    v, i, p = ws.values[None], ws.indices[None], ws.indptr[None]

    def loss(conv):
        return lambda x, v: jnp.sum(jnp.sin(conv(x, v, i, p, **params)))

    got = jax.grad(loss(blocks_conv), (0, 1))(x, v)
    want = jax.grad(loss(blocks_conv_reference), (0, 1))(x, v)
    for g, w in zip(got, want):
        assert_close(g, w, jnp.float32, scale_for(36))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("h,w,c,out,kernel,strides,dilation,padding,n", CONV_CASES)
def test_blocks_conv_sddmm_gathers_the_patches_the_reference_stores(isa, dtype, h, w, c, out,
                                                                    kernel, strides, dilation,
                                                                    padding, n):
    k = kernel[0] * kernel[1] * c
    ws = weight(15, k, out, n, 0.3, dtype)
    x = jnp.asarray(np.random.default_rng(16).standard_normal((2, h, w, c)), dtype)
    geometry = dict(kernel_size=kernel, strides=strides, dilation=dilation, padding=padding)
    y_shape = blocks_conv(x, ws.values[None], ws.indices[None], ws.indptr[None],
                          out_features=out, **geometry).shape
    dy = jnp.asarray(np.random.default_rng(17).standard_normal(y_shape), dtype)
    structure = (ws.indices[None], ws.indptr[None])
    dv = blocks_conv_sddmm(x, dy, *structure, n=n, **geometry)
    assert dv.shape == (1, *ws.values.shape) and dv.dtype == dtype
    assert_close(dv, blocks_conv_sddmm_reference(x, dy, *structure, n=n, **geometry), dtype,
                 scale_for(y_shape[0] * y_shape[1] * y_shape[2]))


def test_blocks_conv_sddmm_untrusted_structure_and_rules():
    """Blocks outside x or outside every row get 0 as the reference says; the op's JVP,
    transposes (jax.grad of a loss of dv) and vmap agree with the stored-patch reference."""
    geometry = dict(kernel_size=(3, 3), strides=(1, 1), dilation=(1, 1),
                    padding=((1, 1), (1, 1)))
    ws = weight(18, 9 * 4, 24, 8, 0.5)
    x = jnp.asarray(np.random.default_rng(19).standard_normal((2, 5, 6, 4)), jnp.float32)
    dy = jnp.asarray(np.random.default_rng(20).standard_normal((2, 5, 6, 24)), jnp.float32)
    indices, indptr = ws.indices[None], ws.indptr[None]
    nnz = indices.shape[-1]
    bad_indices = indices.at[0, ::4].set(jnp.int32(36 + 3)).at[0, 1].set(-2)
    bad_indptr = jnp.array([[-1, 3, 2, nnz + 5]], jnp.int32)
    for ind, ptr in [(bad_indices, indptr), (indices, bad_indptr)]:
        assert_close(blocks_conv_sddmm(x, dy, ind, ptr, n=8, **geometry),
                     blocks_conv_sddmm_reference(x, dy, ind, ptr, n=8, **geometry), jnp.float32,
                     scale_for(60))

    def loss(op):
        return lambda x, dy: jnp.sum(jnp.sin(op(x, dy, indices, indptr, n=8, **geometry)))

    for got, want in zip(jax.grad(loss(blocks_conv_sddmm), (0, 1))(x, dy),
                         jax.grad(loss(blocks_conv_sddmm_reference), (0, 1))(x, dy)):
        assert_close(got, want, jnp.float32, scale_for(60))
    tangents = (jnp.ones_like(x), jnp.ones_like(dy))
    _, got = jax.jvp(lambda x, dy: blocks_conv_sddmm(x, dy, indices, indptr, n=8, **geometry),
                     (x, dy), tangents)
    _, want = jax.jvp(lambda x, dy: blocks_conv_sddmm_reference(x, dy, indices, indptr, n=8,
                                                                **geometry), (x, dy), tangents)
    assert_close(got, want, jnp.float32, scale_for(60))
    per_dy = jax.vmap(lambda d: blocks_conv_sddmm(x, d, indices, indptr, n=8, **geometry))(
        jnp.stack([dy, 2 * dy]))
    assert_close(per_dy[1], 2 * per_dy[0], jnp.float32, scale_for(60))
    with pytest.raises(ValueError, match=r"dy must be \[N, OH, OW, out\]"):
        blocks_conv_sddmm(x, dy[:, :4], indices, indptr, n=8, **geometry)


@pytest.mark.cpu_only
def test_blocks_conv_sddmm_target_checks_its_operands():
    ws = weight(21, 18, 16, 8, 0.5)
    x = jnp.ones((1, 4, 4, 2), jnp.float32)
    dy = jnp.ones((1, 4, 4, 16), jnp.float32)
    call = jax.ffi.ffi_call("jaxsparse_blocks_conv_sddmm",
                            jax.ShapeDtypeStruct((1, *ws.values.shape), jnp.float32))
    attrs = dict(kernel_h=np.int32(3), kernel_w=np.int32(3), stride_h=np.int32(1),
                 stride_w=np.int32(1), dilation_h=np.int32(1), dilation_w=np.int32(1),
                 pad_top=np.int32(1), pad_left=np.int32(1))
    structure = (ws.indices[None], ws.indptr[None])
    np.testing.assert_allclose(
        call(x, dy, *structure, **attrs),
        blocks_conv_sddmm_reference(x, dy, *structure, n=8, kernel_size=(3, 3), strides=(1, 1),
                                    dilation=(1, 1), padding=((1, 1), (1, 1))),
        rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="dilation_w"):
        call(x, dy, *structure, **{**attrs, "dilation_w": np.int32(0)})
    with pytest.raises(Exception, match="dy must have rank 4"):
        call(x, dy[0], *structure, **attrs)
    with pytest.raises(Exception, match=r"dy.shape\[0\] \(N\)"):
        call(x, jnp.ones((2, 4, 4, 16), jnp.float32), *structure, **attrs)


# The bf16 forward on the tile product (cpu/blocks/blocks_tiles.h): AMX's default for n = 16 and
# 32 from 32 tokens, run on vdpbf16ps where JAXSPARSE_BLOCKS_TILES=1 asks for it, so machines
# without AMX test its layouts. (tokens, in, out, n, density): the 32-token minimum and one past
# it, a 64-token tile and one past, several tiles and token blocks; rows of more than 8 k steps
# (256 blocks: the B chunk's edge), partial last block rows, empty rows.
TILE_SHAPES = [
    (32, 64, 48, 16, 0.5),
    (33, 300, 70, 16, 0.3),
    (64, 96, 40, 32, 1.0),
    (65, 700, 64, 16, 0.5),
    (200, 1100, 90, 32, 0.6),
    (600, 256, 160, 16, 0.5),
    (47, 40, 33, 16, 0.05),
]
# Under the CUDA emulator the ops run the emulated CUDA kernels: nothing to test there.
TILE_ISAS = ([isa for isa in jsp.supported_cpu_isas() if isa in ("amx", "avx512bf16")]
             if jsp.has_cpu_kernels() and not _ffi.emulating_cuda() else [])


@pytest.fixture(params=TILE_ISAS or [pytest.param(None, marks=pytest.mark.skip(
    reason="the tile product is built for the amx and avx512bf16 ISAs only"))])
def tile_isa(request, monkeypatch):
    before = jsp.cpu_isa()
    jsp.set_cpu_isa(request.param)
    monkeypatch.setenv("JAXSPARSE_BLOCKS_TILES", "1")
    yield request.param
    jsp.set_cpu_isa(before)


@pytest.mark.parametrize("t,k,out,n,density", TILE_SHAPES)
def test_bf16_tile_product_forward(tile_isa, t, k, out, n, density):
    x, ws, _ = operands(8, t, k, out, n, density, jnp.bfloat16, bw=2)
    x = jnp.concatenate([x, -x])  # Two batch entries of weights, each with its own x.
    values, indices, indptr = arrays(ws)
    y = blocks_spmm(x, values, indices, indptr, out_features=out)
    assert y.shape == (2, t, out) and y.dtype == jnp.bfloat16
    assert_close(y, blocks_spmm_reference(x, values, indices, indptr, out_features=out),
                 jnp.bfloat16, scale_for(k))


def test_bf16_tile_product_skips_blocks_outside_x(tile_isa):
    """Blocks whose input lies outside x add nothing, NaN weights included, and an unordered
    indptr gives the reference's rows."""
    t, k, out, n = 40, 96, 64, 16
    x, ws, _ = operands(9, t, k, out, n, 0.5, jnp.bfloat16)
    values, indices, indptr = arrays(ws)
    bad = jnp.arange(indices.shape[-1]) % 7 == 3
    bad_indices = jnp.where(bad, jnp.int32(k + 5), indices)
    bad_values = jnp.where(bad[None, :, None], jnp.nan, values).astype(jnp.bfloat16)
    bad_indptr = indptr.at[0, 2].set(-4).at[0, 3].set(10**6)
    for ind, ptr in [(bad_indices, indptr), (bad_indices, bad_indptr)]:
        y = blocks_spmm(x, bad_values, ind, ptr, out_features=out)
        want = blocks_spmm_reference(x, jnp.where(bad[None, :, None], 0, bad_values), ind, ptr,
                                     out_features=out)
        assert bool(jnp.all(jnp.isfinite(y)))
        assert_close(y, want, jnp.bfloat16, scale_for(k))


def test_bf16_tile_product_convolution(tile_isa):
    params = dict(out_features=48, kernel_size=(3, 3), strides=(1, 1), dilation=(1, 1),
                  padding=((1, 1), (1, 1)))
    ws = weight(13, 9 * 16, 48, 16, 0.4, jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(14).standard_normal((2, 7, 6, 16)), jnp.bfloat16)
    arrays3 = (ws.values[None], ws.indices[None], ws.indptr[None])
    assert_close(blocks_conv(x, *arrays3, **params),
                 blocks_conv_reference(x, *arrays3, **params), jnp.bfloat16, scale_for(144))
