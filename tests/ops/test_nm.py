"""The N:M primitives under every transformation, against the pure reference and the dense product."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxsparse as jsp
from jaxsparse import _ffi
from jaxsparse.ops import (
    nm_sddmm,
    nm_sddmm_reference,
    nm_spmm,
    nm_spmm_packed,
    nm_spmm_packed_reference,
    nm_spmm_reference,
    nm_spmm_t,
    nm_spmm_t_reference,
    pack_indices_2bit,
    unpack_indices_2bit,
)
from jaxsparse.ops.nm import ENGINE_PANEL, has_engine, nm_spmm_engine
from tests._check import (DTYPES, assert_close, keys, once_after, random_array, random_nm,
                          scale_for, sweep)

# (tokens, in, out, n, m): token counts of 1 and odd sizes, `in` not a multiple of m, tile edges.
SHAPES = [
    (1, 16, 8, 2, 4),
    (3, 10, 5, 2, 4),
    (17, 33, 20, 1, 4),
    (64, 64, 48, 2, 8),
    (65, 70, 33, 4, 8),
    (5, 21, 7, 3, 7),
    (2, 40, 3, 1, 16),
    (130, 48, 17, 2, 4),
]


def operands(key, t, k, out, n, m, dtype, bx=1, bw=1):
    kx, kw, ky = jax.random.split(key, 3)
    x = random_array(kx, (bx, t, k), dtype)
    ws = random_nm(kw, k, out, n, m, dtype, batch=(bw,))
    dy = random_array(ky, (max(bx, bw), t, out), dtype)
    return x, ws, dy


# ---------------------------------------------------------------------- forward values
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,k,out,n,m", once_after(SHAPES))
def test_three_ops_match_reference_and_dense(t, k, out, n, m, dtype):
    x, ws, dy = operands(keys(10, 1)[0], t, k, out, n, m, dtype)
    v, i = ws.values, ws.indices
    dense = ws.todense().astype(jnp.float32)  # [1, k, out]
    x32, dy32 = x.astype(jnp.float32), dy.astype(jnp.float32)
    s = scale_for(k)
    for run in (lambda f, *a, **kw: f(*a, **kw), lambda f, *a, **kw: jax.jit(functools.partial(f, **kw))(*a)):
        y = run(nm_spmm, x, v, i, n=n, m=m)
        assert y.shape == (1, t, out) and y.dtype == dtype
        assert_close(y, nm_spmm_reference(x, v, i, n=n, m=m), dtype, s)
        assert_close(y, x32 @ dense, dtype, s)

        dx = run(nm_spmm_t, dy, v, i, n=n, m=m, in_features=k)
        assert dx.shape == (1, t, k) and dx.dtype == dtype
        assert_close(dx, nm_spmm_t_reference(dy, v, i, n=n, m=m, in_features=k), dtype, s)
        assert_close(dx, dy32 @ jnp.swapaxes(dense, -1, -2), dtype, s)

        dv = run(nm_sddmm, x, dy, i, n=n, m=m)
        assert dv.shape == v.shape and dv.dtype == dtype
        assert_close(dv, nm_sddmm_reference(x, dy, i, n=n, m=m), dtype, scale_for(t))
        full = jnp.swapaxes(x32, -1, -2) @ dy32  # [1, k, out]: every entry of x^T dy
        sampled = jsp.NMSparse.frommask(full, ws.mask(), n=n, m=m)
        assert_close(dv, sampled.values, dtype, scale_for(t))


@pytest.mark.parametrize("t,k,out", [(1030, 24, 1040), (1030, 1040, 24), (3, 2080, 1040)])
def test_results_of_4_mb_and_more(t, k, out):
    # Each op's result in turn (y, dx, dv) is past the 4 MB from which the CPU handlers advise
    # huge pages (cpu/common/runtime.h): the advice must leave every value as computed.
    x, ws, dy = operands(keys(12, 1)[0], t, k, out, 2, 4, jnp.float32)
    v, i = ws.values, ws.indices
    assert_close(nm_spmm(x, v, i, n=2, m=4), nm_spmm_reference(x, v, i, n=2, m=4), jnp.float32,
                 scale_for(k))
    assert_close(nm_spmm_t(dy, v, i, n=2, m=4, in_features=k),
                 nm_spmm_t_reference(dy, v, i, n=2, m=4, in_features=k), jnp.float32,
                 scale_for(out))
    assert_close(nm_sddmm(x, dy, i, n=2, m=4), nm_sddmm_reference(x, dy, i, n=2, m=4),
                 jnp.float32, scale_for(t))


@pytest.mark.parametrize("bx,bw", [(1, 3), (3, 1), (3, 3)])
def test_kernel_batch_broadcasting(bx, bw):
    x, ws, dy = operands(keys(11, 1)[0], 7, 20, 9, 2, 4, jnp.float32, bx=bx, bw=bw)
    v, i = ws.values, ws.indices
    assert_close(nm_spmm(x, v, i, n=2, m=4), nm_spmm_reference(x, v, i, n=2, m=4), jnp.float32)
    assert_close(nm_spmm_t(dy, v, i, n=2, m=4, in_features=20),
                 nm_spmm_t_reference(dy, v, i, n=2, m=4, in_features=20), jnp.float32)
    assert_close(nm_sddmm(x, dy, i, n=2, m=4), nm_sddmm_reference(x, dy, i, n=2, m=4), jnp.float32)


def test_values_and_indices_batched_separately():
    x, ws, dy = operands(keys(12, 1)[0], 4, 12, 6, 2, 4, jnp.float32)
    v3 = jnp.concatenate([ws.values, 2 * ws.values, -ws.values])
    y = nm_spmm(x, v3, ws.indices, n=2, m=4)
    assert_close(y, nm_spmm_reference(x, v3, ws.indices, n=2, m=4), jnp.float32)
    dx = nm_spmm_t(jnp.concatenate([dy] * 3), v3, ws.indices, n=2, m=4, in_features=12)
    assert_close(dx[2], -dx[0], jnp.float32)


@pytest.mark.cpu_only
def test_empty_dimensions():
    ws = random_nm(keys(13, 1)[0], 12, 5, 2, 4)
    for t in (0,):
        x = jnp.zeros((t, 12))
        assert (x @ ws).shape == (0, 5)
    empty_out = jsp.NMSparse.fromdense(jnp.zeros((12, 0)), n=2, m=4)
    assert (jnp.ones((3, 12)) @ empty_out).shape == (3, 0)
    empty_in = jsp.NMSparse.fromdense(jnp.zeros((0, 4)), n=2, m=4)
    np.testing.assert_array_equal(jnp.ones((3, 0)) @ empty_in, jnp.zeros((3, 4)))
    g = jax.grad(lambda v: (jnp.zeros((0, 12)) @ ws.replace(values=v)).sum())(ws.values)
    np.testing.assert_array_equal(g, jnp.zeros_like(ws.values))


# ---------------------------------------------------------------------- the public product
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_operator_and_function(dtype):
    ws = random_nm(keys(14, 1)[0], 50, 24, 2, 4, dtype)
    x = random_array(keys(15, 1)[0], (2, 3, 50), dtype)
    y = x @ ws
    assert y.shape == (2, 3, 24) and y.dtype == dtype
    assert_close(y, x.astype(jnp.float32) @ ws.todense().astype(jnp.float32), dtype, scale_for(50))
    np.testing.assert_array_equal(jsp.matmul(x, ws), y)
    np.testing.assert_array_equal(jax.jit(jsp.matmul)(x, ws), y)
    np.testing.assert_array_equal(np.asarray(x) @ ws, y)  # NumPy defers to NMSparse
    v = x[0, 0] @ ws  # a vector
    assert v.shape == (24,)


def test_matmul_promotes_dtypes():
    ws = random_nm(keys(16, 1)[0], 8, 4, 2, 4, jnp.bfloat16)
    assert (jnp.ones((2, 8), jnp.float32) @ ws).dtype == jnp.float32
    assert (jnp.ones((2, 8), jnp.float16) @ ws).dtype == jnp.float32
    assert (jnp.ones((2, 8), jnp.bfloat16) @ ws).dtype == jnp.bfloat16


def test_matmul_with_a_stack_of_weights():
    stack = random_nm(keys(17, 1)[0], 12, 6, 2, 4, batch=(3,))
    dense = stack.todense()
    x = random_array(keys(18, 1)[0], (3, 5, 12))
    assert_close(x @ stack, x @ dense, jnp.float32, 4)
    x2 = x[0]  # one x broadcast against the stack
    assert_close(x2 @ stack, x2 @ dense, jnp.float32, 4)
    x4 = random_array(keys(19, 1)[0], (2, 3, 5, 12))
    assert_close(x4 @ stack, x4 @ dense, jnp.float32, 4)


# ---------------------------------------------------------------------- vmap
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_vmap_at_every_position_of_x(axis):
    ws = random_nm(keys(20, 1)[0], 20, 6, 2, 4)
    x = random_array(keys(21, 1)[0], (4, 5, 20))
    xs = jnp.moveaxis(x, 0, axis) if axis < 2 else jnp.moveaxis(x, 0, 1)
    # Map over axis `axis` of xs; the loop gives the oracle.
    in_axis = axis if axis < 2 else 1
    got = jax.vmap(lambda a: a @ ws, in_axes=in_axis)(xs)
    want = jnp.stack([jnp.take(xs, i, axis=in_axis) @ ws.todense() for i in range(xs.shape[in_axis])])
    assert_close(got, want, jnp.float32, 4)
    # the last axis of a 3-D x: map over tokens inside a [5, 4, 20] x
    x3 = random_array(keys(22, 1)[0], (5, 4, 20))
    got = jax.vmap(lambda a: a @ ws, in_axes=1, out_axes=1)(x3)
    assert_close(got, x3 @ ws.todense(), jnp.float32, 4)


def test_vmap_over_a_stack_of_weights_and_both():
    stack = random_nm(keys(23, 1)[0], 24, 10, 2, 4, batch=(3,))
    x = random_array(keys(24, 1)[0], (7, 24))
    per_weight = jax.vmap(lambda w: x @ w)(stack)
    assert_close(per_weight, x @ stack.todense(), jnp.float32, 5)
    xs = random_array(keys(25, 1)[0], (3, 7, 24))
    both = jax.vmap(lambda a, w: a @ w)(xs, stack)
    assert_close(both, xs @ stack.todense(), jnp.float32, 5)
    # x mapped on axis 1, weights on axis 0, output on axis 2
    both_t = jax.vmap(lambda a, w: a @ w, in_axes=(1, 0), out_axes=2)(jnp.swapaxes(xs, 0, 1), stack)
    assert_close(jnp.moveaxis(both_t, 2, 0), both, jnp.float32, 5)
    # nested vmap: over weights, then over tokens
    nested = jax.vmap(lambda w: jax.vmap(lambda row: row @ w)(x))(stack)
    assert_close(nested, per_weight, jnp.float32, 5)


def test_vmap_of_each_primitive_against_a_loop():
    x, ws, dy = operands(keys(26, 1)[0], 6, 18, 7, 2, 4, jnp.float32, bx=1, bw=1)
    v, i = ws.values, ws.indices
    xs = random_array(keys(27, 1)[0], (4, 1, 6, 18))
    dys = random_array(keys(28, 1)[0], (4, 1, 6, 7))
    vs = random_array(keys(29, 1)[0], (4,) + v.shape)
    cases = [
        (lambda a: nm_spmm(a, v, i, n=2, m=4), xs),
        (lambda w: nm_spmm(x, w, i, n=2, m=4), vs),
        (lambda a: nm_spmm_t(a, v, i, n=2, m=4, in_features=18), dys),
        (lambda w: nm_spmm_t(dy, w, i, n=2, m=4, in_features=18), vs),
        (lambda a: nm_sddmm(a, dy, i, n=2, m=4), xs),
        (lambda b: nm_sddmm(x, b, i, n=2, m=4), dys),
    ]
    for fn, batch in cases:
        for in_axis in (0, 1, 3):
            moved = jnp.moveaxis(batch, 0, in_axis)
            got = jax.vmap(fn, in_axes=in_axis)(moved)
            want = jnp.stack([fn(batch[j]) for j in range(batch.shape[0])])
            assert_close(got, want, jnp.float32, 5)


# ---------------------------------------------------------------------- autodiff
def _loss(x, v, ws):
    y = x @ ws.replace(values=v)
    return jnp.sum(jnp.sin(y) * y)


def test_grad_of_values_and_x_against_dense():
    ws = random_nm(keys(30, 1)[0], 22, 9, 2, 4)
    x = random_array(keys(31, 1)[0], (5, 22))
    gv, gx = jax.grad(_loss, argnums=(1, 0))(x, ws.values, ws)
    dense_mask = ws.mask()

    def dense_loss(x, w):
        y = x @ w
        return jnp.sum(jnp.sin(y) * y)

    gw_dense, gx_dense = jax.grad(dense_loss, argnums=(1, 0))(x, ws.todense())
    assert_close(gx, gx_dense, jnp.float32, 5)
    assert_close(gv, jsp.NMSparse.frommask(gw_dense, dense_mask, n=2, m=4).values, jnp.float32, 5)
    # the issue's own example
    g = jax.grad(lambda v, x: (x @ ws.replace(values=v)).sum())(ws.values, x)
    assert g.shape == ws.values.shape


@pytest.mark.parametrize("t,k,out,n,m", [(3, 10, 5, 2, 4), (4, 17, 6, 3, 8), (1, 8, 3, 1, 2)])
def test_check_grads_order_2_both_modes(t, k, out, n, m):
    ws = random_nm(keys(32, 1)[0], k, out, n, m)
    x = random_array(keys(33, 1)[0], (t, k))
    f = functools.partial(_loss, ws=ws)
    check_grads(f, (x, ws.values), order=2, modes=("fwd", "rev"), atol=2e-2, rtol=2e-2, eps=1e-3)


def test_check_grads_each_primitive():
    x, ws, dy = operands(keys(34, 1)[0], 3, 9, 4, 2, 4, jnp.float32)
    v, i = ws.values, ws.indices
    kw = dict(order=2, modes=("fwd", "rev"), atol=2e-2, rtol=2e-2, eps=1e-3)
    check_grads(lambda a, b: nm_spmm(a, b, i, n=2, m=4), (x, v), **kw)
    check_grads(lambda a, b: nm_spmm_t(a, b, i, n=2, m=4, in_features=9), (dy, v), **kw)
    check_grads(lambda a, b: nm_sddmm(a, b, i, n=2, m=4), (x, dy), **kw)


def test_jvp_and_grad_of_grad():
    ws = random_nm(keys(35, 1)[0], 12, 5, 2, 4)
    x = random_array(keys(36, 1)[0], (4, 12))
    tx = random_array(keys(37, 1)[0], (4, 12))
    tv = random_array(keys(38, 1)[0], ws.values.shape)
    y, ty = jax.jvp(lambda a, v: a @ ws.replace(values=v), (x, ws.values), (tx, tv))
    dense_t = jsp.NMSparse(tv, ws.indices, n=2, m=4, in_features=12).todense()
    assert_close(ty, tx @ ws.todense() + x @ dense_t, jnp.float32, 4)

    hvp = jax.grad(lambda v: jnp.vdot(jax.grad(_loss, argnums=1)(x, v, ws), tv))(ws.values)
    eps = 1e-3
    g = jax.grad(_loss, argnums=1)
    fd = (g(x, ws.values + eps * tv, ws) - g(x, ws.values - eps * tv, ws)) / (2 * eps)
    np.testing.assert_allclose(hvp, fd, rtol=3e-2, atol=3e-2)


def test_vmap_of_grad_against_a_loop():
    ws = random_nm(keys(39, 1)[0], 16, 6, 2, 4)
    xs = random_array(keys(40, 1)[0], (5, 3, 16))
    per_example = jax.vmap(jax.grad(_loss, argnums=1), in_axes=(0, None, None))(xs, ws.values, ws)
    loop = jnp.stack([jax.grad(_loss, argnums=1)(xs[b], ws.values, ws) for b in range(5)])
    assert_close(per_example, loop, jnp.float32, 4)
    stack = random_nm(keys(41, 1)[0], 16, 6, 2, 4, batch=(3,))
    per_weight = jax.vmap(jax.grad(lambda v, w: _loss(xs[0], v, w)))(stack.values, stack)
    loop = jnp.stack([jax.grad(_loss, argnums=1)(xs[0], stack.values[b],
                                                 jax.tree.map(lambda a: a[b], stack))
                      for b in range(3)])
    assert_close(per_weight, loop, jnp.float32, 4)


def test_training_step_under_jit():
    ws = random_nm(keys(42, 1)[0], 32, 8, 2, 4)
    x = random_array(keys(43, 1)[0], (16, 32))
    target = random_array(keys(44, 1)[0], (16, 8))

    @jax.jit
    def step(w):
        # Differentiate w.r.t. the whole format: the uint8 positions get float0 cotangents.
        loss, g = jax.value_and_grad(lambda w: jnp.mean((x @ w - target) ** 2), allow_int=True)(w)
        return w.replace(values=w.values - 0.1 * g.values), loss

    losses = []
    for _ in range(20):
        ws, loss = step(ws)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    np.testing.assert_array_equal(ws.indices, random_nm(keys(42, 1)[0], 32, 8, 2, 4).indices)


# ---------------------------------------------------------------------- bad input
@pytest.mark.cpu_only
def test_matmul_bad_input():
    ws = random_nm(keys(45, 1)[0], 12, 5, 2, 4)
    with pytest.raises(ValueError, match=r"x must have last dimension 12.*got x with shape \(3, 11\)"):
        jnp.ones((3, 11)) @ ws
    with pytest.raises(ValueError, match="x must have last dimension 12"):
        jsp.matmul(jnp.float32(1.0), ws)
    with pytest.raises(TypeError, match="x must be a float array, got dtype int32"):
        jsp.matmul(jnp.ones((3, 12), jnp.int32), ws)
    with pytest.raises(TypeError, match="x must be an array, got str"):
        jsp.matmul("x", ws)
    with pytest.raises(TypeError, match="w must be a jaxsparse sparse format.*got ndarray"):
        jsp.matmul(jnp.ones((3, 12)), np.ones((12, 5)))
    with pytest.raises(TypeError, match="NMSparse @ x is not supported"):
        ws @ jnp.ones((5, 3))


@pytest.mark.cpu_only
def test_primitive_shape_checks():
    x, ws, dy = operands(keys(46, 1)[0], 3, 12, 5, 2, 4, jnp.float32)
    v, i = ws.values, ws.indices
    with pytest.raises(ValueError, match=r"kept dim must be ceil\(K/m\)\*n"):
        nm_spmm(x[..., :8], v, i, n=2, m=4)
    with pytest.raises(TypeError, match="indices must be uint8"):
        nm_spmm(x, v, i.astype(jnp.int32), n=2, m=4)
    with pytest.raises(TypeError, match="dtypes must match"):
        nm_spmm(x.astype(jnp.bfloat16), v, i, n=2, m=4)
    with pytest.raises(ValueError, match="batch dim must be 1 or 3"):
        nm_spmm(jnp.concatenate([x] * 3), jnp.concatenate([v] * 2), jnp.concatenate([i] * 2), n=2, m=4)
    with pytest.raises(ValueError, match="must be rank 3"):
        nm_spmm(x[0], v, i, n=2, m=4)


# ---------------------------------------------------------------------- the engine route
# (tokens, in, out): 1 and 17 tokens (the FMA engine), 40 and 96 (bf16 on the AMX tiles from 32),
# `in` ragged against the group and the 32-input k step, `out` across partial panels of 128.
ENGINE_SHAPES = [(1, 16, 8), (17, 33, 20), (40, 70, ENGINE_PANEL + 2),
                 (96, 300, 2 * ENGINE_PANEL + 17)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("t,k,out", once_after(ENGINE_SHAPES))
def test_engine_matches_the_reference_on_every_isa(isa, t, k, out, n, dtype):
    x, ws, _ = operands(keys(80, 1)[0], t, k, out, n, 4, dtype)
    v, i = ws.values, ws.indices
    y = jax.jit(functools.partial(nm_spmm_engine, n=n, m=4))(x, v, i)
    assert y.shape == (1, t, out) and y.dtype == dtype
    assert_close(y, nm_spmm_reference(x, v, i, n=n, m=4), dtype, scale_for(k))


@pytest.mark.parametrize("bx,bw", [(1, 3), (3, 1), (3, 3)])
def test_engine_batches_broadcast(bx, bw):
    x, ws, _ = operands(keys(81, 1)[0], 40, 24, 10, 2, 4, jnp.bfloat16, bx=bx, bw=bw)
    y = nm_spmm_engine(x, ws.values, ws.indices, n=2, m=4)
    assert y.shape == (max(bx, bw), 40, 10)
    assert_close(y, nm_spmm_reference(x, ws.values, ws.indices, n=2, m=4), jnp.bfloat16, 2)


def test_engine_drops_positions_past_the_group_as_the_kernel_does():
    x, ws, _ = operands(keys(82, 1)[0], 40, 16, 8, 2, 4, jnp.float32)
    indices = ws.indices.at[0, 3, 1].set(4).at[0, 5, 0].set(255)
    got = nm_spmm_engine(x, ws.values, indices, n=2, m=4)
    assert_close(got, nm_spmm(x, ws.values, indices, n=2, m=4), jnp.float32, scale_for(16))


@pytest.mark.cpu_only
def test_engine_multiplies_the_pattern_zeros_as_the_dense_path_does():
    # The CPU engine's tile is dense over each group: an inf in x reaches every output of its
    # group as inf * 0 = nan, as in the dense path; the sparse kernel skips unkept inputs, and so
    # do the CUDA kernels (mma.sp multiplies the kept values only).
    if _ffi.emulating_cuda():
        pytest.skip("a property of the CPU engine; the emulated CUDA kernels skip unkept inputs")
    x, ws, _ = operands(keys(86, 1)[0], 40, 16, 8, 2, 4, jnp.float32)
    x = x.at[0, :, 4].set(jnp.inf)
    engine = nm_spmm_engine(x, ws.values, ws.indices, n=2, m=4)
    dense = jnp.einsum("btk,bkn->btn", x, ws.todense())
    np.testing.assert_array_equal(np.isfinite(engine), np.isfinite(dense))


def test_engine_gradients_match_the_kernel_path():
    ws = random_nm(keys(83, 1)[0], 36, 20, 2, 4)
    x = random_array(keys(84, 1)[0], (40, 36))

    def loss(path):
        return lambda x, v: jnp.sum(jnp.sin(jsp.matmul(x, ws.replace(values=v), path=path)))

    got = jax.jit(jax.grad(loss("engine"), argnums=(0, 1)))(x, ws.values)
    want = jax.grad(loss("sparse"), argnums=(0, 1))(x, ws.values)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert_close(g, w, jnp.float32, scale_for(40))
    check_grads(loss("engine"), (x[:3], ws.values), order=1, modes=("rev",), atol=2e-2,
                rtol=2e-2, eps=1e-3)


@pytest.mark.cpu_only
def test_engine_takes_only_m_4_with_n_1_or_2():
    assert has_engine(2, 4) and has_engine(1, 4)
    assert not (has_engine(3, 4) or has_engine(2, 8) or has_engine(1, 2))
    x, ws, _ = operands(keys(85, 1)[0], 2, 16, 4, 2, 8, jnp.float32)
    match = r"nm_spmm_engine: the engine takes n:m with m = 4 .*got 2:8"
    with pytest.raises(ValueError, match=match):
        nm_spmm_engine(x, ws.values, ws.indices, n=2, m=8)


# ---------------------------------------------------------------------- 2-bit positions
@pytest.mark.cpu_only
def test_pack_indices_2bit_layout_and_round_trip():
    got = pack_indices_2bit(jnp.array([[1, 2, 3, 0, 2]], jnp.uint8))
    # Entry c at bits 2 (c % 4) of byte c // 4; the last byte's unused bits are 0.
    np.testing.assert_array_equal(got, np.array([[1 | 2 << 2 | 3 << 4 | 0 << 6, 2]], np.uint8))
    for kept in (0, 1, 3, 4, 5, 8, 37):
        idx = jax.random.randint(keys(90 + kept, 1)[0], (3, 2, kept), 0, 4).astype(jnp.uint8)
        packed = jax.jit(pack_indices_2bit)(idx)
        assert packed.shape == (3, 2, -(-kept // 4)) and packed.dtype == jnp.uint8
        np.testing.assert_array_equal(unpack_indices_2bit(packed, kept), idx)


# (tokens, in, out): the row-vectorised kernel at 1-32 tokens (chunks of 8 or 4 entries, rows in
# pairs or fours, a ragged last chunk and row block; on AVX-512 2:4 at 1-8 tokens); on AVX-512 2:4
# at 9-32 tokens and 1:4 at 1-48 with outputs in the lanes (cpu/nm/nm_outlanes_avx512.h:
# 16-output tasks, 32- or 64-input chunks with a ragged last one at in = 36, 70, 300, 2052, x read
# in place at in = 64 and 128 and packed with a padded stride at 1024, one pass of up to 24 tokens
# or two at 30 and 40, a ragged last task); for bf16 the tile kernel (32-output tasks, 32-input k
# steps, 16-token tiles, a ragged last group and step) up to 256 tokens, from 12 on AMX and on
# vdpbf16ps 2:4 from 21 and 1:4 from 49; past 256 tokens the token-vectorised kernel.
PACKED_SHAPES = [(1, 16, 8), (1, 128, 40), (2, 6, 3), (4, 70, 33), (9, 36, 18), (11, 4, 1),
                 (12, 100, 37), (13, 70, 16), (16, 2052, 33), (17, 300, 65), (24, 64, 32),
                 (30, 1024, 20), (33, 1030, 70), (40, 130, 20), (128, 64, 31), (256, 96, 40),
                 (257, 40, 18)]


@pytest.mark.parametrize("t,k,out,n,dtype",
                         once_after(sweep([(*shape, n) for shape in PACKED_SHAPES for n in (1, 2)]),
                                    keep=3))
def test_packed_forward_matches_the_reference_on_every_isa(isa, t, k, out, n, dtype):
    x, ws, _ = operands(keys(87, 1)[0], t, k, out, n, 4, dtype, bx=2)
    arrays = (ws.values, ws.indices, ws.indices_2bit)
    y = jax.jit(functools.partial(nm_spmm_packed, n=n, m=4))(x, *arrays)
    assert y.shape == (2, t, out) and y.dtype == dtype
    # The reference reads the 2-bit positions: what the kernels read.
    assert_close(y, nm_spmm_packed_reference(x, *arrays, n=n, m=4), dtype, scale_for(k))
    assert_close(y, nm_spmm(x, ws.values, ws.indices, n=n, m=4), dtype, scale_for(k))


@pytest.mark.parametrize("t,dtype", [(3, jnp.float32), (16, jnp.bfloat16)])
def test_packed_forward_reads_the_2bit_positions(isa, t, dtype):
    # Positions that disagree with `indices` show which array a kernel read (never done by the
    # format, whose constructor keeps the two equal): the row-vectorised kernels (AVX-512, and
    # AVX2 for 2:4) and the tiles (AMX or AVX512-BF16, bf16) read the 2-bit ones, the other
    # kernels `indices`.
    x, ws, _ = operands(keys(88, 1)[0], t, 64, 40, 2, 4, dtype)
    shifted = (ws.indices.reshape(1, 40, 16, 2) + 1) % 4  # Still two distinct positions.
    other = jnp.sort(shifted, axis=-1).reshape(ws.indices.shape)
    y = nm_spmm_packed(x, ws.values, ws.indices, pack_indices_2bit(other), n=2, m=4)
    reads_2bit = isa in ("avx2", "avx512", "avx512bf16", "amx") and not _ffi.emulating_cuda()
    read = other if reads_2bit else ws.indices
    assert_close(y, nm_spmm_reference(x, ws.values, read, n=2, m=4), dtype, scale_for(64))
    unread = ws.indices if reads_2bit else other
    assert not np.allclose(np.asarray(y, np.float32),
                           np.asarray(nm_spmm_reference(x, ws.values, unread, n=2, m=4),
                                      np.float32), atol=1)


@pytest.mark.parametrize("bx,bw", [(1, 3), (3, 1), (3, 3)])
def test_packed_forward_batches_broadcast(bx, bw):
    x, ws, _ = operands(keys(89, 1)[0], 12, 40, 20, 2, 4, jnp.bfloat16, bx=bx, bw=bw)
    arrays = (ws.values, ws.indices, ws.indices_2bit)
    y = nm_spmm_packed(x, *arrays, n=2, m=4)
    assert y.shape == (max(bx, bw), 12, 20)
    assert_close(y, nm_spmm_reference(x, ws.values, ws.indices, n=2, m=4), jnp.bfloat16,
                 scale_for(40))


@pytest.mark.cpu_only
def test_few_tokens_of_two_to_four_take_the_packed_forward():
    ws = random_nm(keys(91, 1)[0], 32, 8, 2, 4)

    def primitives(t, w):
        return str(jax.make_jaxpr(lambda x: jsp.matmul(x, w, path="sparse"))(jnp.ones((t, 32))))

    assert "jaxsparse_nm_spmm_packed" in primitives(1, ws)
    assert "jaxsparse_nm_spmm_packed" in primitives(256, ws)
    assert "jaxsparse_nm_spmm_packed" not in primitives(257, ws)
    for n, m in ((3, 4), (2, 8)):  # No 2-bit form read: the plain kernel.
        assert "jaxsparse_nm_spmm_packed" not in primitives(4, random_nm(keys(92, 1)[0], 32, 8,
                                                                         n, m))


def test_packed_forward_gradients_and_vmap_match_the_kernel():
    ws = random_nm(keys(93, 1)[0], 36, 20, 2, 4)
    x = random_array(keys(94, 1)[0], (3, 5, 36))

    def loss(x, v):
        return jnp.sum(jnp.sin(x @ ws.replace(values=v)))

    def loss_plain(x, v):
        w = ws.replace(values=v)
        return jnp.sum(jnp.sin(nm_spmm(x, w.values[None], w.indices[None], n=2, m=4)))

    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, ws.values)
    want = jax.grad(loss_plain, argnums=(0, 1))(x, ws.values)
    for g, w in zip(got, want):
        assert_close(g, w, jnp.float32, scale_for(36))
    check_grads(loss, (x[:1, :2], ws.values), order=2, modes=("fwd", "rev"), atol=2e-2,
                rtol=2e-2, eps=1e-3)
    arrays = (ws.values[None], ws.indices[None], ws.indices_2bit[None])
    mapped = jax.vmap(lambda x: nm_spmm_packed(x[None], *arrays, n=2, m=4)[0])(x)
    assert_close(mapped, x @ ws.todense(), jnp.float32, scale_for(36))


@pytest.mark.cpu_only
def test_packed_forward_bad_input():
    x, ws, _ = operands(keys(95, 1)[0], 2, 16, 4, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match=r"nm_spmm_packed: 2-bit positions are held for m = 4"):
        nm_spmm_packed(x, ws.values, ws.indices, ws.indices_2bit, n=2, m=8)
    x, ws, _ = operands(keys(96, 1)[0], 2, 16, 4, 2, 4, jnp.float32)
    with pytest.raises(ValueError, match=r"indices_2bit must be uint8 \(1, 4, 2\)"):
        nm_spmm_packed(x, ws.values, ws.indices, ws.indices_2bit[..., :1], n=2, m=4)
    with pytest.raises(ValueError, match=r"indices_2bit must be uint8"):
        nm_spmm_packed(x, ws.values, ws.indices, ws.indices_2bit.astype(jnp.int32), n=2, m=4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("t", [3, 40, 130])
def test_packed_forward_differentiates_through_either_backward(isa, t, dtype):
    ws = random_nm(keys(97, 1)[0], 72, 136, 2, 4, dtype)  # Two panels of the engine, one partial.
    x = random_array(keys(98, 1)[0], (2, t, 72), dtype)
    arrays = (ws.indices[None], ws.indices_2bit[None])

    def loss(engine_backward):
        def f(x, v):
            y = nm_spmm_packed(x, v[None], *arrays, n=2, m=4, engine_backward=engine_backward)
            return jnp.sum(jnp.sin(y.astype(jnp.float32)))
        return f

    grads = jax.jit(jax.grad(loss(True), argnums=(0, 1)))(x, ws.values)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss(True), argnums=(0, 1)))(x, ws.values))
    assert "jaxsparse_vnm_spmm_t" in jaxpr and "jaxsparse_vnm_sddmm" in jaxpr
    want = jax.grad(loss(False), argnums=(0, 1))(x, ws.values)
    for g, w in zip(grads, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert_close(g, w, dtype, scale_for(2 * t))
    with pytest.raises(ValueError, match="engine_backward needs n in"):
        nm_spmm_packed(x, ws.values[None], *arrays, n=3, m=4, engine_backward=True)


# (tokens, in, out): on the AVX-512 units the f32 2:4 forward from 1024 tokens on, where an output
# dimension is at most 512, decodes panels of 64 outputs into dense f32 and multiplies them on the
# panel micro-kernel (cpu/nm/nm_panel_avx512.h): `in` not a multiple of 4 and ragged panels (130,
# 70), two chunks of K (2056) with their sums between chunks over two token blocks (1030 tokens),
# and 16-output blocks of which only some rows exist (33).
PANEL_SHAPES = [(1024, 130, 70), (1030, 2056, 33), (1100, 64, 130)]


@pytest.mark.parametrize("t,k,out", PANEL_SHAPES)
def test_panel_forward_matches_the_reference_on_every_isa(isa, t, k, out):
    x, ws, _ = operands(keys(90, 1)[0], t, k, out, 2, 4, jnp.float32, bw=2)
    y = nm_spmm(x, ws.values, ws.indices, n=2, m=4)
    assert y.shape == (2, t, out)
    assert_close(y, nm_spmm_reference(x, ws.values, ws.indices, n=2, m=4), jnp.float32,
                 scale_for(k))


def test_panel_forward_on_unvalidated_positions(isa):
    # Positions past the group (the padding, or garbage) name no row of the panel and drop out,
    # as in the reference.
    x, ws, _ = operands(keys(91, 1)[0], 1024, 64, 70, 2, 4, jnp.float32)
    indices = ws.indices.at[0, 3, 1].set(4).at[0, 5, 0].set(255).at[0, 69, 7].set(9)
    y = nm_spmm(x, ws.values, indices, n=2, m=4)
    assert_close(y, nm_spmm_reference(x, ws.values, indices, n=2, m=4), jnp.float32,
                 scale_for(64))
