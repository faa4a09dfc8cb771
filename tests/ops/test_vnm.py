"""The V:N:M primitives against their pure references and the dense product, under vmap and
autodiff, at tile edges. Run twice by `make test`: on the CPU kernels, and with
JAXSPARSE_EMULATE_CUDA=1 on the CUDA kernels under the SIMT emulator (the mma.sp forward for
bf16/f16, the CUDA-core kernels otherwise)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxsparse as jsp
from jaxsparse.ops import (
    vnm_pack_tiles,
    vnm_sddmm,
    vnm_sddmm_reference,
    vnm_spmm,
    vnm_spmm_reference,
    vnm_spmm_t,
    vnm_spmm_t_reference,
    vnm_spmm_tiled,
    vnm_spmm_tiled_reference,
)
from jaxsparse.ops.vnm import kept_positions
from tests._check import DTYPES, assert_close, once_after, scale_for

# (tokens, in, out, v, n, m): partial panels and token tiles, ragged groups (in % m < 4 too).
SHAPES = [
    (1, 64, 32, 16, 2, 8),
    (3, 70, 40, 16, 2, 8),
    (17, 37, 48, 32, 1, 5),
    (65, 96, 80, 64, 2, 16),
    (9, 66, 130, 128, 2, 32),
]


def weight(seed, k, out, v, n, m, dtype=jnp.float32, batch=()):
    w = np.random.default_rng(seed).standard_normal((*batch, k, out))
    return jsp.VNMSparse.fromdense(jnp.asarray(w, dtype), v=v, n=n, m=m)


def operands(seed, t, k, out, v, n, m, dtype, bx=1, bw=1):
    rng = np.random.default_rng(seed + 100)
    x = jnp.asarray(rng.standard_normal((bx, t, k)), dtype)
    dy = jnp.asarray(rng.standard_normal((max(bx, bw), t, out)), dtype)
    return x, weight(seed, k, out, v, n, m, dtype, batch=(bw,)), dy


def spec(ws):
    return dict(v=ws.v, n=ws.n, m=ws.m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,k,out,v,n,m", once_after(SHAPES))
def test_three_ops_match_reference_and_dense(t, k, out, v, n, m, dtype):
    x, ws, dy = operands(0, t, k, out, v, n, m, dtype)
    a = (ws.values, ws.indices, ws.columns)
    dense = ws.todense().astype(jnp.float32)  # [1, k, out]
    x32, dy32 = x.astype(jnp.float32), dy.astype(jnp.float32)
    s = scale_for(k)
    y = jax.jit(functools.partial(vnm_spmm, **spec(ws)))(x, *a)
    assert y.shape == (1, t, out) and y.dtype == dtype
    assert_close(y, vnm_spmm_reference(x, *a, **spec(ws)), dtype, s)
    assert_close(y, x32 @ dense, dtype, s)
    dx = vnm_spmm_t(dy, *a, **spec(ws), in_features=k)
    assert dx.shape == (1, t, k) and dx.dtype == dtype
    assert_close(dx, vnm_spmm_t_reference(dy, *a, **spec(ws), in_features=k), dtype, s)
    assert_close(dx, dy32 @ jnp.swapaxes(dense, -1, -2), dtype, s)
    dv = vnm_sddmm(x, dy, ws.indices, ws.columns, **spec(ws))
    assert dv.shape == ws.values.shape and dv.dtype == dtype
    assert_close(dv, vnm_sddmm_reference(x, dy, ws.indices, ws.columns, **spec(ws)), dtype,
                 scale_for(t))
    full = jnp.swapaxes(x32, -1, -2) @ dy32  # every entry of x^T dy, sampled at the kept ones
    sampled = jsp.VNMSparse.frommask(full, ws.mask(), **spec(ws))
    assert_close(dv, sampled.values, dtype, scale_for(t))


@pytest.mark.parametrize("bx,bw", [(1, 3), (3, 1), (3, 3)])
def test_kernel_batch_broadcasting(bx, bw):
    x, ws, dy = operands(1, 7, 40, 20, 16, 2, 8, jnp.float32, bx=bx, bw=bw)
    a = (ws.values, ws.indices, ws.columns)
    assert_close(vnm_spmm(x, *a, **spec(ws)), vnm_spmm_reference(x, *a, **spec(ws)), jnp.float32)
    assert_close(vnm_spmm_t(dy, *a, **spec(ws), in_features=40),
                 vnm_spmm_t_reference(dy, *a, **spec(ws), in_features=40), jnp.float32)
    assert_close(vnm_sddmm(x, dy, ws.indices, ws.columns, **spec(ws)),
                 vnm_sddmm_reference(x, dy, ws.indices, ws.columns, **spec(ws)), jnp.float32)


def test_values_batched_alone_and_empty_dimensions():
    x, ws, dy = operands(2, 4, 24, 16, 16, 2, 8, jnp.float32)
    v3 = jnp.concatenate([ws.values, 2 * ws.values, -ws.values])
    y = vnm_spmm(x, v3, ws.indices, ws.columns, **spec(ws))
    assert_close(y, vnm_spmm_reference(x, v3, ws.indices, ws.columns, **spec(ws)), jnp.float32)
    w = weight(3, 24, 16, 16, 2, 8)
    assert (jnp.zeros((0, 24)) @ w).shape == (0, 16)
    empty_out = jsp.VNMSparse.fromdense(jnp.zeros((24, 0)), v=16, n=2, m=8)
    assert (jnp.ones((3, 24)) @ empty_out).shape == (3, 0)
    g = jax.grad(lambda v: (jnp.zeros((0, 24)) @ w.replace(values=v)).sum())(w.values)
    np.testing.assert_array_equal(g, jnp.zeros_like(w.values))


def test_vmap_of_each_primitive_against_a_loop():
    x, ws, dy = operands(4, 6, 40, 20, 16, 2, 8, jnp.float32)
    v, i, c = ws.values, ws.indices, ws.columns
    kw = spec(ws)
    rng = np.random.default_rng(5)
    xs = jnp.asarray(rng.standard_normal((4, 1, 6, 40)), jnp.float32)
    dys = jnp.asarray(rng.standard_normal((4, 1, 6, 20)), jnp.float32)
    vs = jnp.asarray(rng.standard_normal((4,) + v.shape), jnp.float32)
    cases = [
        (lambda a: vnm_spmm(a, v, i, c, **kw), xs),
        (lambda w: vnm_spmm(x, w, i, c, **kw), vs),
        (lambda a: vnm_spmm_t(a, v, i, c, **kw, in_features=40), dys),
        (lambda w: vnm_spmm_t(dy, w, i, c, **kw, in_features=40), vs),
        (lambda a: vnm_sddmm(a, dy, i, c, **kw), xs),
        (lambda b: vnm_sddmm(x, b, i, c, **kw), dys),
    ]
    for fn, batch in cases:
        for in_axis in (0, 1, 3):
            got = jax.vmap(fn, in_axes=in_axis)(jnp.moveaxis(batch, 0, in_axis))
            want = jnp.stack([fn(batch[j]) for j in range(batch.shape[0])])
            assert_close(got, want, jnp.float32, 5)


def test_check_grads_each_primitive():
    x, ws, dy = operands(6, 3, 24, 16, 16, 2, 8, jnp.float32)
    v, i, c = ws.values, ws.indices, ws.columns
    kw = dict(order=2, modes=("fwd", "rev"), atol=2e-2, rtol=2e-2, eps=1e-3)
    check_grads(lambda a, b: vnm_spmm(a, b, i, c, **spec(ws)), (x, v), **kw)
    check_grads(lambda a, b: vnm_spmm_t(a, b, i, c, **spec(ws), in_features=24), (dy, v), **kw)
    check_grads(lambda a, b: vnm_sddmm(a, b, i, c, **spec(ws)), (x, dy), **kw)


def test_unvalidated_positions_add_nothing_even_next_to_inf():
    # Under jit the positions are unknown at trace time: garbage slots (>= 4) and columns (>= m)
    # must neither crash nor read outside x, and such entries contribute nothing; inputs that only
    # garbage could name hold inf, so reading one would poison the row.
    ws = weight(7, 32, 16, 16, 2, 8)
    slots = ws.indices.at[:, ::2].set(7)
    cols = ws.columns.at[:, 1::4].set(200)
    pos, valid = kept_positions(slots[None], cols[None], 16, 2, 8)
    read = np.zeros(32, bool)
    read[np.asarray(pos[valid])] = True
    x = jnp.where(jnp.asarray(read), jnp.ones((3, 32)), jnp.inf)

    @jax.jit
    def f(x, slots, cols):
        return vnm_spmm(x[None], ws.values[None], slots[None], cols[None], v=16, n=2, m=8)[0]

    y = f(x, slots, cols)
    assert bool(jnp.all(jnp.isfinite(y)))
    want = vnm_spmm_reference(jnp.where(jnp.asarray(read), x, 0)[None], ws.values[None],
                              slots[None], cols[None], v=16, n=2, m=8)[0]
    assert_close(y, want, jnp.float32, 4)


@pytest.mark.cpu_only
def test_primitive_shape_checks():
    x, ws, dy = operands(8, 3, 24, 16, 16, 2, 8, jnp.float32)
    v, i, c = ws.values, ws.indices, ws.columns
    with pytest.raises(ValueError, match=r"values and indices must be \[B, N, ceil\(K/m\)\*n\]"):
        vnm_spmm(x[..., :16], v, i, c, **spec(ws))
    with pytest.raises(ValueError, match=r"columns must be \[B, ceil\(N/v\), ceil\(K/m\)\*4\]"):
        vnm_spmm(x, v, i, c[..., :4], **spec(ws))
    with pytest.raises(TypeError, match="indices and columns must be uint8"):
        vnm_spmm(x, v, i.astype(jnp.int32), c, **spec(ws))
    with pytest.raises(TypeError, match="dtypes must match"):
        vnm_spmm(x.astype(jnp.bfloat16), v, i, c, **spec(ws))
    with pytest.raises(ValueError, match="must be rank 3"):
        vnm_spmm(x[0], v, i, c, **spec(ws))
    with pytest.raises(ValueError, match="batch dim must be 1 or 3"):
        vnm_spmm(jnp.concatenate([x] * 3), *(jnp.concatenate([a] * 2) for a in (v, i, c)),
                 **spec(ws))


# ====================================================================== tiles packed once
TILED_SHAPES = [(40, 64, 48, 16, 2, 8), (33, 70, 40, 16, 2, 8), (64, 96, 80, 64, 2, 16),
                (32, 66, 130, 128, 1, 32), (1, 64, 32, 16, 2, 8)]


def tiled(ws):
    return (ws.values, ws.indices, ws.columns,
            vnm_pack_tiles(ws.values, ws.indices, v=ws.v, n=ws.n))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("t,k,out,v,n,m", TILED_SHAPES)
def test_tiled_forward_is_the_forward_bit_for_bit(t, k, out, v, n, m, dtype):
    # The packed tiles hold what the decoder would write, so the forward's sums are the same;
    # below 32 tokens (and on CUDA) the tiles are not read at all.
    x, ws, _ = operands(3, t, k, out, v, n, m, dtype)
    a = tiled(ws)
    y = jax.jit(functools.partial(vnm_spmm_tiled, **spec(ws)))(x, *a)
    want = jax.jit(functools.partial(vnm_spmm, **spec(ws)))(x, *a[:3])
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))
    assert_close(y, vnm_spmm_tiled_reference(x, *a, **spec(ws)), dtype, scale_for(k))


@pytest.mark.cpu_only
def test_pack_tiles_layout():
    # Word (panel p, output tile j, step s, pair row r, output o, e) = W[kk = 32 s + 2 r + e]
    # [output p v + 16 j + o], kk = 4 g + slot; zero past the outputs and past 4 G.
    x, ws, _ = operands(4, 1, 70, 40, 32, 2, 8, jnp.bfloat16)
    tiles = np.asarray(vnm_pack_tiles(ws.values, ws.indices, v=32, n=2), np.float32)
    out, groups, steps = 40, 9, 2  # ceil(4 * 9 / 32) = 2 k steps.
    assert tiles.shape == (1, 2, 32 // 16 * steps * 512)
    slots = np.zeros((2 * 32, steps * 32), np.float32)  # [outputs padded, kk padded]
    vals = np.asarray(ws.values, np.float32)[0].reshape(out, groups, 2)
    idx = np.asarray(ws.indices)[0].reshape(out, groups, 2)
    for r in range(out):
        for g in range(groups):
            for e in range(2):
                slots[r, 4 * g + idx[r, g, e]] += vals[r, g, e]
    want = slots.reshape(2, 2, 16, steps, 16, 2).transpose(0, 1, 3, 4, 2, 5).reshape(2, -1)
    np.testing.assert_array_equal(tiles[0], want)
    jitted = jax.jit(functools.partial(vnm_pack_tiles, v=32, n=2))(ws.values, ws.indices)
    np.testing.assert_array_equal(np.asarray(jitted, np.float32), tiles)
    # f32: the FMA engine's rows, [4G][v] per panel (no padding of 4G).
    rows = np.asarray(vnm_pack_tiles(ws.values.astype(jnp.float32), ws.indices, v=32, n=2))
    assert rows.shape == (1, 2, 4 * groups * 32)
    want = slots[:, :4 * groups].reshape(2, 32, 4 * groups).transpose(0, 2, 1).reshape(2, -1)
    np.testing.assert_array_equal(rows[0], want)
    with pytest.raises(TypeError, match="bfloat16 or float32"):
        vnm_pack_tiles(ws.values.astype(jnp.float16), ws.indices, v=32, n=2)


def test_tiled_forward_differentiates_in_x_only():
    x, ws, dy = operands(5, 40, 64, 48, 16, 2, 8, jnp.bfloat16)
    a = tiled(ws)
    fn = functools.partial(vnm_spmm_tiled, **spec(ws))
    plain = functools.partial(vnm_spmm, **spec(ws))
    _, vjp = jax.vjp(lambda x: fn(x, *a), x)
    _, vjp_plain = jax.vjp(lambda x: plain(x, *a[:3]), x)
    np.testing.assert_array_equal(np.asarray(vjp(dy)[0], np.float32),
                                  np.asarray(vjp_plain(dy)[0], np.float32))
    _, tangent = jax.jvp(lambda x: fn(x, *a), (x,), (x,))
    assert_close(tangent, plain(x, *a[:3]), jnp.bfloat16, scale_for(64))
    with pytest.raises(ValueError, match="inference form"):
        jax.grad(lambda v: jnp.sum(fn(x, v, *a[1:]).astype(jnp.float32)))(a[0])
    with pytest.raises(ValueError, match="inference form"):
        jax.grad(lambda t: jnp.sum(fn(x, *a[:3], t).astype(jnp.float32)))(a[3])


def test_tiled_forward_under_vmap_and_batches():
    x, ws, _ = operands(6, 34, 64, 48, 16, 2, 8, jnp.bfloat16, bw=2)
    a = tiled(ws)
    fn = functools.partial(vnm_spmm_tiled, **spec(ws))
    xs = jnp.stack([x[0], x[0] * 2])  # [2, 34, 64]: mapped, over a shared weight.
    mapped = jax.vmap(lambda x: fn(x[None], *(b[:1] for b in a))[0])(xs)
    loop = jnp.stack([fn(x[None], *(b[:1] for b in a))[0] for x in xs])
    np.testing.assert_array_equal(np.asarray(mapped, np.float32), np.asarray(loop, np.float32))
    y = fn(x, *a)  # x broadcasts over the weight's batch of 2.
    assert y.shape == (2, 34, 48)
    assert_close(y, vnm_spmm_reference(x, *a[:3], **spec(ws)), jnp.bfloat16, scale_for(64))


@pytest.mark.cpu_only
def test_tiled_forward_shape_checks():
    x, ws, _ = operands(7, 32, 64, 48, 16, 2, 8, jnp.bfloat16)
    a = tiled(ws)
    fn = functools.partial(vnm_spmm_tiled, **spec(ws))
    with pytest.raises(ValueError, match="tiles .* of their dtype"):
        fn(x, *a[:3], a[3][..., :-1])
    with pytest.raises(ValueError, match="tiles .* of their dtype"):
        fn(x, *a[:3], a[3].astype(jnp.float32))
    with pytest.raises(ValueError, match="values must be bfloat16 or float32"):
        fn(x.astype(jnp.float16), a[0].astype(jnp.float16), *a[1:3], a[3].astype(jnp.float16))
