"""The V:N:M CPU targets (jaxsparse_vnm_spmm, _spmm_t, _sddmm) called through jax.ffi directly,
on every instruction-set path, against a float64 NumPy reference that densifies the weight from its
three canonical arrays (cpu/vnm/vnm_checks.h gives the layouts).

Shapes sit at the kernels' tile edges: panels of v outputs (a partial last panel), 16-lane vectors
and the 6 x 64 (AVX-512) register tiles, token blocks of 256 and the small-token paths, groups of m
(a ragged last group, also with fewer than 4 real inputs), batches that broadcast either way.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp
from tests._check import assert_close, scale_for, sweep

# CI runs this file with the newest jax only (`once`: tests/conftest.py).
pytestmark = pytest.mark.once

SPMM, SPMM_T, SDDMM = "jaxsparse_vnm_spmm", "jaxsparse_vnm_spmm_t", "jaxsparse_vnm_sddmm"


# ---------------------------------------------------------------- arrays and reference


def random_vnm(rng, k, n_out, v, n, m, batch=1):
    """Canonical V:N:M arrays (values f32, indices, columns) of a random [K, N] weight."""
    g, p = -(-k // m), -(-n_out // v)
    # Per (panel, group) 4 increasing positions in 0..m-1; per (output, group) n increasing slots.
    columns = np.sort(rng.random((batch, p, g, m)).argsort(-1)[..., :4], -1).astype(np.uint8)
    indices = np.sort(rng.random((batch, n_out, g, 4)).argsort(-1)[..., :n], -1).astype(np.uint8)
    values = rng.standard_normal((batch, n_out, g, n)).astype(np.float32)
    # The padding of a ragged last group (inputs >= K) holds zeros.
    values[input_of(indices.reshape(batch, n_out, g * n), columns.reshape(batch, p, g * 4), v, n, m)
           .reshape(values.shape) >= k] = 0
    return values.reshape(batch, n_out, g * n), indices.reshape(batch, n_out, g * n), \
        columns.reshape(batch, p, g * 4)


def input_of(indices, columns, v, n, m):
    """The input k of every kept entry, or -1 where its slot is > 3 or its position >= m."""
    batch, n_out, kc = indices.shape
    c = np.arange(kc)
    g = c // n
    slot = indices.astype(np.int64)
    panel_cols = columns[:, np.arange(n_out) // v, :]  # [B, N, G*4]
    pos = np.take_along_axis(panel_cols, np.minimum(4 * g + slot, 4 * (kc // n) - 1), -1)
    pos = pos.astype(np.int64)
    k = g * m + pos
    return np.where((slot < 4) & (pos < m), k, -1)


def densify(values, indices, columns, k, v, n, m):
    """[B, K, N] float64: every entry whose input exists adds its value (the kernels' rule)."""
    batch, n_out, _ = values.shape
    inputs = input_of(indices, columns, v, n, m)
    w = np.zeros((batch, k + 1, n_out))
    ok = (inputs >= 0) & (inputs < k)
    b, r, _ = np.meshgrid(np.arange(batch), np.arange(n_out), np.arange(values.shape[2]),
                          indexing="ij")
    np.add.at(w, (b[ok], inputs[ok], r[ok]), np.asarray(values, np.float64)[ok])
    return w[:, :k]


def sampled(gram, indices, columns, k, v, n, m):
    """dv[b, r, c] = gram[b, k(r, c), r], 0 where the entry's input does not exist."""
    inputs = input_of(indices, columns, v, n, m)
    ok = (inputs >= 0) & (inputs < k)
    picked = np.take_along_axis(np.swapaxes(gram, 1, 2), np.where(ok, inputs, 0), -1) \
        if k > 0 else np.zeros(indices.shape)
    return np.where(ok, picked, 0.0)


def f64(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def call(target, out_shape, dtype, *operands, v, n, m):
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, dtype))(
        *operands, v=np.int32(v), n=np.int32(n), m=np.int32(m))


# ---------------------------------------------------------------- products


def check_all(t, k, n_out, v, n, m, dtype, bx=1, bw=1, seed=0):
    rng = np.random.default_rng(seed)
    values, indices, columns = random_vnm(rng, k, n_out, v, n, m, bw)
    b = max(bx, bw)
    x = jnp.asarray(rng.standard_normal((bx, t, k)), dtype)
    dy = jnp.asarray(rng.standard_normal((bx, t, n_out)), dtype)
    vals = jnp.asarray(values, dtype)
    w = densify(f64(vals), indices, columns, k, v, n, m)  # [Bw, K, N]
    xs, dys = f64(x), f64(dy)
    kw = dict(v=v, n=n, m=m)
    y = call(SPMM, (b, t, n_out), dtype, x, vals, indices, columns, **kw)
    assert_close(y, xs @ w, dtype, scale_for(k), err_msg="spmm")
    dx = call(SPMM_T, (b, t, k), dtype, dy, vals, indices, columns, **kw)
    assert_close(dx, dys @ np.swapaxes(w, 1, 2), dtype, scale_for(n_out), err_msg="spmm_t")
    kc = indices.shape[2]
    dv = call(SDDMM, (b, n_out, kc), dtype, x, dy, indices, columns, **kw)
    gram = np.broadcast_to(np.swapaxes(xs, 1, 2) @ dys, (b, k, n_out))
    want = sampled(gram, np.broadcast_to(indices, (b, *indices.shape[1:])),
                   np.broadcast_to(columns, (b, *columns.shape[1:])), k, v, n, m)
    assert_close(dv, want, dtype, scale_for(t), err_msg="sddmm")


# (T, K, N, v, n, m): partial last panels (N % v), N not a multiple of 64, ragged last groups
# (K % m, also < 4), T around the 6-token micro-tiles and the small-token paths (row mode at 1-2
# tokens, chunk mode up to 16, 8 tokens per pass).
SHAPES = [
    (1, 40, 19, 16, 2, 4),
    (3, 37, 50, 16, 1, 5),
    (16, 67, 100, 32, 2, 8),
    (17, 130, 70, 64, 2, 16),
    (130, 97, 150, 128, 1, 32),
    (5, 66, 200, 64, 2, 32),
    (12, 200, 48, 16, 2, 64),
    (8, 129, 33, 32, 1, 64),
    (1, 45, 33, 16, 1, 8),
    (2, 150, 40, 32, 1, 5),
    (20, 50, 20, 64, 2, 8),  # One partial panel: v > N.
    (14, 150, 70, 32, 2, 16),  # Tables from x transposed (2 windows x 14 tokens), ragged group.
]


@pytest.mark.parametrize("t,k,n_out,v,n,m,dtype", sweep(SHAPES))
def test_every_isa_path(isa, t, k, n_out, v, n, m, dtype):
    assert jsp.cpu_isa() == isa
    check_all(t, k, n_out, v, n, m, dtype)


@pytest.mark.parametrize("t,k,n_out,v,n,m", [(17, 300, 130, 64, 2, 8), (300, 130, 96, 32, 1, 4),
                                             (2, 520, 40, 16, 2, 16), (16, 600, 40, 16, 2, 8),
                                             (13, 600, 70, 32, 1, 8), (600, 45, 33, 16, 2, 8)])
def test_larger_shapes_span_several_blocks(isa, t, k, n_out, v, n, m):
    # Several token blocks (256-512 tokens), group blocks per task (K / m > 32 groups) and blocks
    # of chunks in the small-token forward (> 64 groups at 16 tokens).
    check_all(t, k, n_out, v, n, m, jnp.float32, seed=1)


@pytest.mark.parametrize("t", [8, 9, 25, 32, 33])
def test_the_few_token_forward_at_each_vector_count(isa, t):
    # AVX2 and portable run the forward with tokens in the lanes up to 4 vectors of 8 (1-32
    # tokens; cpu/vnm/vnm_kernels.h, SpmmTokens), rows 4 or 2 at a time, then the dense engine.
    # Odd panel rows (N % 2) and a ragged last group.
    check_all(t, 77, 45, 16, 2, 8, jnp.float32, seed=2)
    check_all(t, 77, 45, 16, 1, 4, jnp.bfloat16, seed=3)


# bf16 from 32 tokens under amx and avx512bf16 runs on the tiles (cpu/vnm/vnm_amx.h; the tile unit
# or vdpbf16ps): 16-token tiles of A (T % 16, T % 32; vdpbf16ps takes them in halves of 8), 16-output
# tiles of B (an odd count: v = 16, 48-wide partial panels), k steps of
# 32 selected inputs (nk % 32, rows of x not 64-byte aligned: K % 32), one to four 64-word gather
# windows per step (m = 5 .. 64), tasks of 1-4 panels and of part of the tokens, and inputs in
# several blocks (past half of L2 for two panels' tiles: K = 9000 at v = 128, K = 17000 at v = 16).
# Other ISAs run the same shapes on their own paths.
AMX_SHAPES = [
    (32, 64, 64, 64, 2, 8),
    (33, 100, 48, 16, 2, 8),
    (47, 257, 176, 64, 2, 16),
    (64, 300, 150, 128, 1, 32),
    (100, 130, 70, 32, 2, 5),
    (80, 520, 40, 16, 1, 64),
    (300, 96, 80, 64, 2, 8),
    (40, 9000, 130, 128, 2, 8),
    (40, 9000, 100, 128, 1, 8),  # In blocks, one panel.
    (70, 17000, 70, 16, 2, 8),  # In blocks, two panels per task, then one.
    # dx and dv on the tiles: outputs are the reduction of dx (N % 32, N past half of L2 for 32
    # inputs: fewer inputs per task), inputs per task not a multiple of 16, m = 4 (the N:M
    # engine); tokens the reduction of dv (T % 32, several chunks of tokens: K + N = 9070 words
    # per token take 32 MB at 1850).
    (48, 70, 9000, 128, 2, 8),
    (36, 1030, 4100, 128, 2, 4),
    (45, 21, 33, 16, 1, 4),
    (1900, 70, 9000, 128, 2, 8),
]


@pytest.mark.parametrize("t,k,n_out,v,n,m", AMX_SHAPES)
def test_bf16_from_32_tokens_at_tile_edges(isa, t, k, n_out, v, n, m):
    rng = np.random.default_rng(7)
    values, indices, columns = random_vnm(rng, k, n_out, v, n, m)
    x = jnp.asarray(rng.standard_normal((1, t, k)), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((1, t, n_out)), jnp.bfloat16)
    vals = jnp.asarray(values, jnp.bfloat16)
    w = densify(f64(vals), indices, columns, k, v, n, m)
    y = call(SPMM, (1, t, n_out), jnp.bfloat16, x, vals, indices, columns, v=v, n=n, m=m)
    assert_close(y, f64(x) @ w, jnp.bfloat16, scale_for(k))
    dx = call(SPMM_T, (1, t, k), jnp.bfloat16, dy, vals, indices, columns, v=v, n=n, m=m)
    assert_close(dx, f64(dy) @ np.swapaxes(w, 1, 2), jnp.bfloat16, scale_for(n_out))
    dv = call(SDDMM, (1, n_out, indices.shape[2]), jnp.bfloat16, x, dy, indices, columns,
              v=v, n=n, m=m)
    gram = np.swapaxes(f64(x), 1, 2) @ f64(dy)
    assert_close(dv, sampled(gram, indices, columns, k, v, n, m), jnp.bfloat16, scale_for(t))


def test_tile_kernels_leave_xla_s_own_tile_dots_intact(isa):
    # On AMX machines XLA's bf16 dot runs on the tiles too, on the same pool threads. Our kernels
    # load their tile configuration per task and release the tiles after it; XLA's dots in between
    # must still give their own results, bit for bit, and ours theirs.
    rng = np.random.default_rng(11)
    t, k, n_out, v, n, m = 96, 512, 256, 64, 2, 8
    values, indices, columns = random_vnm(rng, k, n_out, v, n, m)
    x = jnp.asarray(rng.standard_normal((1, t, k)), jnp.bfloat16)
    vals = jnp.asarray(values, jnp.bfloat16)
    spmm = jax.jit(lambda *a: call(SPMM, (1, t, n_out), jnp.bfloat16, *a, v=v, n=n, m=m))
    dot = jax.jit(lambda a, b: a @ b)
    a = jnp.asarray(rng.standard_normal((37, 1000)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((1000, 600)), jnp.bfloat16)
    want_dot, want_y = np.asarray(dot(a, b)), np.asarray(spmm(x, vals, indices, columns))
    for _ in range(20):
        y = spmm(x, vals, indices, columns)
        z = dot(a, b)
        np.testing.assert_array_equal(np.asarray(z), want_dot)
        np.testing.assert_array_equal(np.asarray(y), want_y)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_long_operands_go_in_several_chunks_of_tokens(isa, dtype):
    # The converted or packed dense operand of a chunk of tokens takes at most 32 MB of scratch:
    # x at K = 8200 (spmm, sddmm) and dy at N = 8200 (spmm_t) hold ~1000 tokens, so 1100 tokens
    # take two chunks (sddmm sums the chunks' samples in f32).
    t, big, small, v, n, m = 1100, 8200, 20, 16, 2, 8
    rng = np.random.default_rng(5)
    kw = dict(v=v, n=n, m=m)
    values, indices, columns = random_vnm(rng, big, small, v, n, m)  # W [8200, 20]
    vals = jnp.asarray(values, dtype)
    x = jnp.asarray(rng.standard_normal((1, t, big)), dtype)
    dy = jnp.asarray(rng.standard_normal((1, t, small)), dtype)
    w = densify(f64(vals), indices, columns, big, v, n, m)
    y = call(SPMM, (1, t, small), dtype, x, vals, indices, columns, **kw)
    assert_close(y, f64(x) @ w, dtype, scale_for(big), err_msg="spmm")
    dv = call(SDDMM, (1, small, indices.shape[2]), dtype, x, dy, indices, columns, **kw)
    gram = np.swapaxes(f64(x), 1, 2) @ f64(dy)
    assert_close(dv, sampled(gram, indices, columns, big, v, n, m), dtype, scale_for(t),
                 err_msg="sddmm")
    values, indices, columns = random_vnm(rng, small, big, v, n, m)  # W [20, 8200]
    vals = jnp.asarray(values, dtype)
    dy = jnp.asarray(rng.standard_normal((1, t, big)), dtype)
    dx = call(SPMM_T, (1, t, small), dtype, dy, vals, indices, columns, **kw)
    w = densify(f64(vals), indices, columns, small, v, n, m)
    assert_close(dx, f64(dy) @ np.swapaxes(w, 1, 2), dtype, scale_for(big), err_msg="spmm_t")


@pytest.mark.parametrize("t,k,n_out,m", [(1030, 40, 1040, 8), (1030, 1040, 40, 8),
                                          (3, 4160, 1040, 4)])
def test_results_of_4_mb_and_more(isa, t, k, n_out, m):
    # Each op's result in turn (y, dx, dv) is past the 4 MB from which the handlers advise huge
    # pages (cpu/common/runtime.h): the advice must leave every value as computed.
    check_all(t, k, n_out, 16, 2, m, jnp.float32, seed=4)


@pytest.mark.parametrize("bx,bw", [(1, 3), (3, 1), (2, 2)])
@pytest.mark.parametrize("t,dtype", [(7, jnp.float32), (40, jnp.bfloat16)])  # bf16 40: the tiles.
def test_batches_broadcast(isa, bx, bw, t, dtype):
    check_all(t, 45, 33, 16, 2, 8, dtype, bx=bx, bw=bw, seed=2)


@pytest.mark.parametrize("t,k,n_out", [(0, 16, 32), (4, 0, 32), (4, 16, 0), (0, 0, 0)])
def test_empty_dims(isa, t, k, n_out):
    v, n, m = 16, 2, 8
    g, p = -(-k // m), -(-n_out // v)
    kw = dict(v=v, n=n, m=m)
    x, dy = jnp.ones((1, t, k)), jnp.ones((1, t, n_out))
    vals = jnp.ones((1, n_out, g * n))
    idx = jnp.zeros((1, n_out, g * n), jnp.uint8)
    cols = jnp.zeros((1, p, g * 4), jnp.uint8)
    y = call(SPMM, (1, t, n_out), jnp.float32, x, vals, idx, cols, **kw)
    dx = call(SPMM_T, (1, t, k), jnp.float32, dy, vals, idx, cols, **kw)
    dv = call(SDDMM, (1, n_out, g * n), jnp.float32, x, dy, idx, cols, **kw)
    for a in (y, dx, dv):
        assert not np.any(np.asarray(a))


# ---------------------------------------------------------------- garbage under jit


@pytest.mark.parametrize("m", [8, 20])  # One 32-float window per chunk of groups, or several.
@pytest.mark.parametrize("t,dtype", [(1, jnp.float32), (3, jnp.float32), (16, jnp.float32),
                                     (20, jnp.float32), (40, jnp.bfloat16)])
def test_garbage_positions_add_nothing_even_next_to_inf(isa, t, m, dtype):
    # Under jit the arrays are unknown at trace time, so garbage can reach the kernels: slots > 3,
    # positions >= m, repeated or decreasing ones. They must neither read nor write out of bounds,
    # and an entry whose input does not exist must contribute nothing (not 0 * inf = NaN).
    k, n_out, v, n = 45, 40, 16, 2
    rng = np.random.default_rng(3)
    values, indices, columns = random_vnm(rng, k, n_out, v, n, m)
    columns[0, 0, 0:4] = [m + 1, 200, 3, 3]  # Out of group, far out, a repeat.
    columns[0, 1, 8:12] = [7, 6, 5, 4]  # Decreasing, all existing.
    columns[0, 2, -4:] = [0, 1, 2, 7]  # Ragged last group (K % m = 5): position 7 is past K.
    indices[0, ::3, 1] = 4
    indices[0, 1::5, 2:4] = [255, 1]
    indices[0, 2::7, 4:6] = [2, 2]  # A repeated slot: both entries add.
    values[0, 5, -2:] = 3.0  # Nonzero values on padding must still add nothing.
    x = rng.standard_normal((1, t, k)).astype(np.float32)
    dy = rng.standard_normal((1, t, n_out)).astype(np.float32)
    inputs = input_of(indices, columns, v, n, m)
    used = np.zeros(k, bool)
    used[inputs[(inputs >= 0) & (inputs < k)]] = True
    x[..., ~used] = np.inf  # Inputs no kept entry reads.
    x[..., -3:][..., ~used[-3:]] = -np.inf
    kw = dict(v=v, n=n, m=m)
    x, dy, values = (np.asarray(jnp.asarray(a, dtype)) for a in (x, dy, values))
    w = densify(f64(values), indices, columns, k, v, n, m)
    xs = np.where(np.isfinite(f64(x)), f64(x), 0.0)
    y = jax.jit(lambda *a: call(SPMM, (1, t, n_out), dtype, *a, **kw))(
        x, values, indices, columns)
    assert np.all(np.isfinite(f64(y)))
    assert_close(y, xs @ w, dtype, scale_for(k))
    dx = jax.jit(lambda *a: call(SPMM_T, (1, t, k), dtype, *a, **kw))(
        dy, values, indices, columns)
    assert_close(dx, f64(dy) @ np.swapaxes(w, 1, 2), dtype, scale_for(n_out))
    dv = jax.jit(lambda *a: call(SDDMM, (1, n_out, indices.shape[2]), dtype, *a, **kw))(
        x, dy, indices, columns)
    assert np.all(np.isfinite(f64(dv)))
    want = sampled(np.swapaxes(xs, 1, 2) @ f64(dy), indices, columns, k, v, n, m)
    assert_close(dv, want, dtype, scale_for(t))


@pytest.mark.parametrize("t", [32, 40])
def test_bf16_tile_decoder_takes_whole_steps_and_leaves_garbage_to_the_general_path(isa, t):
    # The tiles' decoder writes a chunk of 16 outputs x 8 groups (n = 2) straight into one k step
    # of a B tile when the chunk's positions are strictly increasing slots 0..3 (cpu/vnm/
    # vnm_avx512.h, DecodeTileStepBF16); a chunk holding garbage (a slot > 3, a repeat, a
    # decrease) takes the general decoder. Here whole chunks of both kinds, a partial last output
    # tile (40 outputs) and a ragged last group (K % m = 3, fewer than 4 real inputs).
    k, n_out, v, n, m = 8 * 33 + 3, 40, 16, 2, 8
    rng = np.random.default_rng(21)
    values, indices, columns = random_vnm(rng, k, n_out, v, n, m)
    indices[0, 3, 18:20] = [3, 1]  # Decreasing.
    indices[0, 17, 40:42] = [2, 2]  # Repeated: both entries add.
    indices[0, 39, 2:4] = [1, 7]  # Past slot 3: adds nothing.
    x = jnp.asarray(rng.standard_normal((1, t, k)), jnp.bfloat16)
    vals = jnp.asarray(values, jnp.bfloat16)
    w = densify(f64(vals), indices, columns, k, v, n, m)
    y = jax.jit(lambda *a: call(SPMM, (1, t, n_out), jnp.bfloat16, *a, v=v, n=n, m=m))(
        x, vals, indices, columns)
    assert_close(y, f64(x) @ w, jnp.bfloat16, scale_for(k))


@pytest.mark.parametrize("t,dtype", [(20, jnp.float32), (40, jnp.bfloat16)])
def test_a_panel_without_any_existing_input_gives_zeros(isa, t, dtype):
    # Every position of panel 1 is garbage (>= m): it selects nothing, beside panels that do (the
    # AMX path then gathers panel by panel), and its outputs are 0.
    k, n_out, v, n, m = 64, 64, 16, 2, 8
    rng = np.random.default_rng(13)
    values, indices, columns = random_vnm(rng, k, n_out, v, n, m)
    columns[0, 1, :] = 200
    x = jnp.asarray(rng.standard_normal((1, t, k)), dtype)
    vals = jnp.asarray(values, dtype)
    w = densify(f64(vals), indices, columns, k, v, n, m)
    y = call(SPMM, (1, t, n_out), dtype, x, vals, indices, columns, v=v, n=n, m=m)
    assert not np.any(f64(y)[..., v:2 * v])
    assert_close(y, f64(x) @ w, dtype, scale_for(k))


# ---------------------------------------------------------------- tiles packed once
TILED = "jaxsparse_vnm_spmm_tiled"


def pack(vals, indices, v, n):
    return jsp.ops.vnm_pack_tiles(vals, indices, v=v, n=n)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("t,k,n_out,v,n,m", AMX_SHAPES)
def test_tiled_forward_at_tile_edges(isa, t, k, n_out, v, n, m, dtype):
    # Packed tiles hold exactly what the decoder writes: the same sums bit for bit, on every
    # ISA (only the bf16 tile forward and the f32 engine read them), one block or several (K =
    # 9000, 17000; the f32 engine's blocks of kTileFloats), with a ragged last group (decoded:
    # its selected inputs do not all exist).
    rng = np.random.default_rng(17)
    values, indices, columns = random_vnm(rng, k, n_out, v, n, m)
    x = jnp.asarray(rng.standard_normal((1, t, k)), dtype)
    vals = jnp.asarray(values, dtype)
    kw = dict(v=v, n=n, m=m)
    y = call(TILED, (1, t, n_out), dtype, x, vals, indices, columns,
             pack(vals, indices, v, n), **kw)
    plain = call(SPMM, (1, t, n_out), dtype, x, vals, indices, columns, **kw)
    np.testing.assert_array_equal(f64(y), f64(plain))
    w = densify(f64(vals), indices, columns, k, v, n, m)
    assert_close(y, f64(x) @ w, dtype, scale_for(k))


@pytest.mark.parametrize("t,dtype", [(20, jnp.bfloat16), (40, jnp.bfloat16), (3, jnp.float32),
                                     (40, jnp.float32)])
def test_tiled_forward_reads_the_tiles_only_where_every_selected_input_exists(isa, t, dtype):
    # Tiles that disagree with the values (doubled) show which the kernel read: the bf16 tile
    # forward (amx, avx512bf16, from 32 tokens) and the f32 engine (every ISA, past the
    # few-token kernels) read the tiles of blocks whose 4 selected inputs all exist and differ;
    # they decode the values of a panel whose ragged last group (5 real inputs of 8) selects
    # padding, of one whose columns repeat an input (garbage under jit), and every other kernel
    # reads the values.
    k, n_out, v, n, m = 8 * 40 + 5, 64, 16, 2, 8
    rng = np.random.default_rng(23)
    values, indices, columns = random_vnm(rng, k, n_out, v, n, m)
    g_last = k // m
    columns[0, :, 4 * g_last:4 * g_last + 4] = [0, 1, 2, 4]  # All real.
    columns[0, 1, 4 * g_last:4 * g_last + 4] = [0, 1, 2, 5]  # Selects padding: decoded.
    columns[0, 2, 4:8] = [1, 1, 2, 3]  # Repeats input 9 (garbage): decoded.
    x = jnp.asarray(rng.standard_normal((1, t, k)), dtype)
    vals = jnp.asarray(values, dtype)
    doubled = (pack(vals, indices, v, n).astype(jnp.float32) * 2).astype(dtype)
    y = jax.jit(lambda *a: call(TILED, (1, t, n_out), dtype, *a, v=v, n=n, m=m))(
        x, vals, indices, columns, doubled)
    w = densify(f64(vals), indices, columns, k, v, n, m)
    want = f64(x) @ w
    reads = t >= 32 and (isa in ("amx", "avx512bf16") or dtype == jnp.float32)
    if reads:
        want[..., 0:v] *= 2
        want[..., 3 * v:] *= 2
    assert_close(y, want, dtype, scale_for(k))


# ---------------------------------------------------------------- the validator


def test_the_validator_names_the_operand():
    k, n_out, v, n, m = 32, 32, 16, 2, 8
    rng = np.random.default_rng(4)
    values, indices, columns = random_vnm(rng, k, n_out, v, n, m)
    x = np.ones((1, 3, k), np.float32)
    ok = dict(v=v, n=n, m=m)

    def spmm(*a, out=(1, 3, n_out), dtype=jnp.float32, **kw):
        return call(SPMM, out, dtype, *a, **{**ok, **kw})

    cases = [
        (lambda: spmm(x, values.astype(np.float16), indices, columns), "values dtype"),
        (lambda: spmm(x, values, indices.astype(np.int32), columns), "indices dtype"),
        (lambda: spmm(x, values, indices, columns[:, :1]), "columns.shape[1]"),
        (lambda: spmm(x, values, indices, columns[..., :-4]), "columns.shape[2]"),
        (lambda: spmm(x, values[..., :-1], indices, columns), "values.shape[2]"),
        (lambda: spmm(x[0], values, indices, columns), "x must have rank 3"),
        (lambda: spmm(x, values, indices, columns, v=np.int32(24)), "attribute v"),
        (lambda: spmm(x, values, indices, columns, n=np.int32(3)), "attribute n"),
        (lambda: spmm(x, values, indices, columns, m=np.int32(65)), "attribute m"),
        (lambda: spmm(x, values, indices, columns, out=(1, 4, n_out)), "y.shape[1]"),
        (lambda: call(SPMM_T, (1, 3, k + 1), jnp.float32, np.ones((1, 3, n_out), np.float32),
                      values, indices, columns, **ok), "values.shape[2]"),
        (lambda: call(SDDMM, (1, n_out, 9), jnp.float32, x, np.ones((1, 3, n_out), np.float32),
                      indices, columns, **ok), "dv.shape[2]"),
        (lambda: call(SDDMM, (2, n_out, indices.shape[2]), jnp.float32,
                      np.ones((3, 3, k), np.float32), np.ones((2, 3, n_out), np.float32),
                      indices, columns, **ok), "dy.shape[0]"),
        (lambda: call(TILED, (1, 3, n_out), jnp.float32, x, values, indices, columns,
                      np.ones((1, 2, 512), np.float32), **ok), "tiles.shape[2]"),
        (lambda: call(TILED, (1, 3, n_out), jnp.float32, x, values, indices, columns,
                      np.ones((1, 2, 256), np.float16), **ok), "tiles dtype"),
        (lambda: call(TILED, (1, 3, n_out), jnp.float32, x, values, indices, columns,
                      np.ones((1, 3, 256), np.float32), **ok), "tiles.shape[1]"),
        (lambda: call(TILED, (1, 3, n_out), jnp.float32, x, values, indices, columns,
                      np.ones((2, 2, 256), np.float32), **ok), "tiles.shape[0]"),
        (lambda: call(TILED, (1, 3, n_out), jnp.float16, x.astype(np.float16),
                      values.astype(np.float16), indices, columns,
                      np.ones((1, 2, 256), np.float16), **ok), "float32 or bfloat16"),
    ]
    for run, name in cases:
        with pytest.raises(Exception, match=name.replace("[", r"\[").replace("]", r"\]")):
            jax.block_until_ready(run())
