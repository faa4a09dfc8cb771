"""The int4 MARLIN kernel (cuda/int4/int4_marlin.cuh) run on the CPU by the SIMT emulator, its
device layout (`marlin_pack` / `marlin_unpack`) and its primitive (`int4_marlin_matmul`).

The kernel is called through its emulated FFI target (registered for the CPU in every session)
and compared with a float64 NumPy oracle written from the format's definition, at its tile edges:
T = 1, 15, 16, 17 (16-token tiles), 32, 33, 64, 65 (32- and 64-token tiles), K and N at the smallest
tile (64) and crossing the 4-stage ring of 64-input tiles (K = 384, 6 tiles), groups of 16, 32,
64, 128 and one per column, bf16 and f16, codes covering 0..15.

The primitive's CPU lowering depends on JAXSPARSE_EMULATE_CUDA at import: under it the tests run
the kernel through the primitive (jit, vmap, batch dims, gradients); without it they check that
lowering refuses the CUDA layout with a message that says how to get the CPU layout back.

These tests can fail: planted bugs in cuda/int4/int4_marlin.cuh (2026-12-04) each failed some of
the 45 kernel tests: the f16 magic 0x6408 as 0x6407 (22: every f16 case), the bf16 magic 0x4308
as 0x4300 (22: every bf16 case), the grouped scales read for the next n8 tile's column (38), a
cp.async wait one group short (44: the MMAs read poisoned shared memory, NaN), the A tile read
without its XOR swizzle (36). In cuda/int4/int4_marlin_nm.cuh (the 2:4 kernel, 32 kernel tests):
the metadata register of the other tile pair (32), selector 0 for the odd tiles (32: the emulator
reads the wrong lanes' metadata), row g + 8's group scale taken from the register pair instead of
the row (28), every step of a stage scaled by the group of its first step (24).

The 2:4 form (int4_nm_marlin_matmul, cuda/int4/int4_marlin_nm.cuh) is taken the same way: T = 1 ..
65 (16- and 32-token tiles), K = 128 and 640 (5 tiles of 128 across the 4-stage ring), groups of 32,
64, 128 and per column, every code and every ordered position pair.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import _ffi
from jaxsparse.ops import (int4_marlin_matmul, int4_marlin_matmul_reference, int4_matmul,
                           int4_nm_marlin_matmul, int4_nm_matmul, marlin_nm_pack,
                           marlin_nm_unpack, marlin_pack, marlin_unpack)

# CI runs this file with the newest jax only (`once`: tests/conftest.py).
pytestmark = pytest.mark.once

EMU_TARGET = "jaxsparse_emu_int4_marlin_matmul"
DTYPES = [jnp.bfloat16, jnp.float16]
PER_COLUMN = None
EMULATING = _ffi.emulating_cuda()


# ------------------------------------------------------------------ operands and oracle
def random_weight(rng, k, n, group_size, dtype):
    """Canonical (codes [K, N] 0..15, qweight [K/2, N] uint8, scales): every code 0..15 occurs
    (the first 16 rows of column 0 are 0..15), scales of both signs and varied magnitudes."""
    codes = rng.integers(0, 16, size=(k, n))
    codes[:16, 0] = np.arange(16)
    qweight = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)
    groups = 1 if group_size is None else k // group_size
    scales = rng.uniform(0.25, 2.0, size=(groups, n)) * rng.choice([-1, 1], size=(groups, n))
    return codes, qweight, jnp.asarray(scales / 8, dtype)


def oracle(x, codes, scales, group_size):
    """float64 y = x @ W. Grouped: W = (u - 8) * scale rounded once to x's dtype (the kernel
    multiplies the scale into the dequantised 16-bit weights, as MARLIN does); per column: the
    exact (u - 8) sums times the scale."""
    x64 = np.asarray(x, np.float64)
    ints = (codes - 8).astype(np.float64)
    s = np.asarray(scales, np.float64)
    if group_size is None:
        return (x64 @ ints) * s, np.abs(x64) @ np.abs(ints) * np.abs(s)
    w = np.asarray(jnp.asarray(ints * np.repeat(s, group_size, axis=0), x.dtype), np.float64)
    return x64 @ w, np.abs(x64) @ np.abs(w)


def assert_matches(y, expected, magnitude, dtype):
    """Within one ulp of the output dtype, plus f32 summation slack (the emulated mma rounds each
    k16 partial sum to f32)."""
    ulp = 2.0 ** -(7 if jnp.dtype(dtype) == jnp.bfloat16 else 10)
    y = np.asarray(y, np.float64)
    bound = ulp * np.abs(expected) + 2.0**-20 * magnitude + 1e-30
    bad = ~(np.abs(y - expected) <= bound)  # NaN (read poison) is bad too.
    assert not bad.any(), (f"{bad.sum()} of {bad.size} outside: first at "
                           f"{np.argwhere(bad)[0]}, got {y[bad][0]}, want {expected[bad][0]}")


def emulated(x, packed_qweight, packed_scales, group_size):
    """The emulated target through jax.ffi.ffi_call (group_size None -> the attribute -1)."""
    call = jax.ffi.ffi_call(EMU_TARGET, jax.ShapeDtypeStruct((x.shape[0],
                                                              packed_scales.shape[1]), x.dtype))
    attr = np.int32(-1 if group_size is None else group_size)
    return call(x, packed_qweight, packed_scales, group_size=attr)


def run_case(seed, t, k, n, group_size, dtype):
    rng = np.random.default_rng(seed)
    codes, qweight, scales = random_weight(rng, k, n, group_size, dtype)
    x = jnp.asarray(rng.standard_normal((t, k)), dtype)
    packed_qweight, packed_scales = marlin_pack(qweight, scales, group_size=group_size)
    y = emulated(x, packed_qweight, packed_scales, group_size)
    assert y.shape == (t, n) and y.dtype == dtype
    expected, magnitude = oracle(x, codes, scales, group_size)
    assert_matches(y, expected, magnitude, dtype)


# ------------------------------------------------------------------ the kernel at its tile edges
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 15, 16, 17, 32, 33, 64, 65])
def test_kernel_tokens_at_tile_edges(t, dtype):
    run_case(t, t, 128, 128, 64, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [16, 32, 64, 128, PER_COLUMN])
@pytest.mark.parametrize("k, n", [(128, 64), (384, 192)])
def test_kernel_group_sizes_and_tiles(k, n, group_size, dtype):
    run_case(k + n, 33, k, n, group_size, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [16, 64, PER_COLUMN])
def test_kernel_smallest_shape(group_size, dtype):
    run_case(7, 1, 64, 64, group_size, dtype)


@pytest.mark.cpu_only
def test_kernel_without_tokens():
    rng = np.random.default_rng(0)
    _, qweight, scales = random_weight(rng, 64, 64, 32, jnp.float16)
    packed = marlin_pack(qweight, scales, group_size=32)
    y = emulated(jnp.zeros((0, 64), jnp.float16), *packed, 32)
    assert y.shape == (0, 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_exact_on_small_integers(dtype):
    """x and scales small integers: every product and sum is exact in f32 and in the output dtype,
    so the kernel must match the canonical CPU kernel bit for bit."""
    rng = np.random.default_rng(3)
    codes, qweight, _ = random_weight(rng, 128, 64, 32, dtype)
    scales = jnp.asarray(rng.integers(1, 3, size=(4, 64)), dtype)
    x = jnp.asarray(rng.integers(-2, 3, size=(17, 128)), dtype)
    y = emulated(x, *marlin_pack(qweight, scales, group_size=32), 32)
    cpu = int4_matmul(x[None], jnp.asarray(qweight)[None], scales[None], group_size=32)[0]
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(cpu, np.float32))


@pytest.mark.parametrize("bad, match", [
    (dict(group_size=24), "group_size must be -1 .per column. or a multiple of 16"),
    (dict(qweight_dtype=np.uint32), "qweight dtype must be int32"),
    (dict(scales_dtype=jnp.bfloat16), r"scales dtype must be float16 \(x's\)"),
    (dict(k=96), "must be a multiple of 64"),
    (dict(x_dtype=jnp.float32), "x dtype must be bfloat16 or float16"),
])
@pytest.mark.cpu_only
def test_handler_rejects_bad_operands(bad, match):
    """A hand-written ffi_call gets an InvalidArgument error naming the operand, never a crash."""
    k = bad.get("k", 128)
    x = jnp.ones((3, k), bad.get("x_dtype", jnp.float16))
    qweight = jnp.zeros((k // 16, 128), bad.get("qweight_dtype", np.int32))
    scales = jnp.ones((k // 32, 64), bad.get("scales_dtype", jnp.float16))
    call = jax.ffi.ffi_call(EMU_TARGET, jax.ShapeDtypeStruct((3, 64), x.dtype))
    with pytest.raises(Exception, match=match):
        call(x, qweight, scales, group_size=np.int32(bad.get("group_size", 32)))


# ------------------------------------------------------------------ the layout
@pytest.mark.parametrize("group_size", [16, 64, PER_COLUMN])
@pytest.mark.parametrize("k, n", [(64, 64), (192, 128)])
@pytest.mark.cpu_only
def test_pack_unpack_round_trip_is_bit_exact(k, n, group_size):
    rng = np.random.default_rng(k * n)
    _, qweight, scales = random_weight(rng, k, n, group_size, jnp.bfloat16)
    pack = jax.jit(lambda q, s: marlin_pack(q, s, group_size=group_size))
    packed_qweight, packed_scales = pack(qweight, scales)
    assert packed_qweight.shape == (k // 16, 2 * n) and packed_qweight.dtype == jnp.int32
    assert packed_scales.shape == scales.shape and packed_scales.dtype == scales.dtype
    q2, s2 = marlin_unpack(packed_qweight, packed_scales, group_size=group_size)
    np.testing.assert_array_equal(np.asarray(q2), qweight)
    np.testing.assert_array_equal(np.asarray(s2).view(np.uint16),
                                  np.asarray(scales).view(np.uint16))


@pytest.mark.cpu_only
def test_packed_word_against_the_layout_formula():
    """KERNELS.md 3.2: word (lane 4g + t, j) of k16 step kb and 64-column block nb holds W rows
    16 kb + (2t, 2t + 1, 2t + 8, 2t + 9) at column 64 nb + 16j + g as nibbles 0, 4, 1, 5, and at
    column 64 nb + 16j + 8 + g as nibbles 2, 6, 3, 7."""
    k, n = 64, 128
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, size=(k, n))
    qweight = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)
    words = np.asarray(marlin_pack(qweight, jnp.ones((1, n), jnp.float16), group_size=None)[0])
    words = words.view(np.uint32)
    for kb, nb, g, t, j in [(0, 0, 0, 0, 0), (1, 0, 3, 2, 1), (3, 1, 7, 3, 3), (2, 1, 5, 1, 2)]:
        word = int(words[kb, 128 * nb + 4 * (4 * g + t) + j])
        nibble = [(word >> (4 * i)) & 15 for i in range(8)]
        rows = [16 * kb + r for r in (2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9)]
        col = 64 * nb + 16 * j + g
        assert [nibble[i] for i in (0, 4, 1, 5)] == [codes[r, col] for r in rows]
        assert [nibble[i] for i in (2, 6, 3, 7)] == [codes[r, col + 8] for r in rows]
    # A single code: input 17 (kb 1, row 1 = 2t + 1 with t 0), column 64 + 16 + 8 + 2 (nb 1, j 1,
    # second n8 half, g 2) -> nibble 6 of word 128 + 4 * (4 * 2 + 0) + 1 of row 1.
    codes = np.full((k, n), 8)
    codes[17, 90] = 3
    qweight = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)
    words = np.asarray(marlin_pack(qweight, jnp.ones((1, n), jnp.float16),
                                   group_size=None)[0]).view(np.uint32)
    assert words[1, 128 + 4 * 8 + 1] == 0x83888888
    assert (np.delete(words.ravel(), 1 * 256 + 128 + 33) == 0x88888888).all()


def marlin_reference_pack(codes, scales, group_size):
    """IST-DASLab/marlin's `Layer.pack` (marlin/__init__.py, `_get_perms`), ported to NumPy from
    the published source: 16 x 16 tiles flattened along n, a 1024-entry permutation per 4 tiles,
    the [0, 2, 4, 6, 1, 3, 5, 7] interleave, 8 codes per int32; scales by `_scale_perm` (grouped)
    or `_scale_perm_single` (groupsize -1)."""
    perm = []
    for i in range(32):
        perm1 = [16 * row + i // 4 + 8 * block for block in (0, 1)
                 for row in (2 * (i % 4), 2 * (i % 4) + 1, 2 * (i % 4 + 4), 2 * (i % 4 + 4) + 1)]
        for j in range(4):
            perm.extend(p + 256 * j for p in perm1)
    perm = np.array(perm).reshape(-1, 8)[:, [0, 2, 4, 6, 1, 3, 5, 7]].ravel()
    k, n = codes.shape
    w = codes.reshape(k // 16, 16, n // 16, 16).transpose(0, 2, 1, 3).reshape(k // 16, 16 * n)
    res = w.reshape(-1, perm.size)[:, perm].reshape(w.shape).astype(np.uint32)
    q = np.zeros((res.shape[0], res.shape[1] // 8), np.uint32)
    for i in range(8):
        q |= res[:, i::8] << np.uint32(4 * i)
    if group_size is None:
        scale_perm = [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]
    else:
        scale_perm = [i + 8 * j for i in range(8) for j in range(8)]
    s = np.asarray(scales).reshape(-1, len(scale_perm))[:, scale_perm].reshape(-1, n)
    return q.view(np.int32), s


@pytest.mark.parametrize("group_size", [64, PER_COLUMN])
@pytest.mark.cpu_only
def test_layout_is_marlins(group_size):
    """Weights packed by MARLIN's own `Layer.pack` and by marlin_pack are the same arrays."""
    rng = np.random.default_rng(11)
    codes, qweight, scales = random_weight(rng, 128, 192, group_size, jnp.float16)
    words, packed_scales = marlin_pack(qweight, scales, group_size=group_size)
    want_words, want_scales = marlin_reference_pack(codes, scales, group_size)
    np.testing.assert_array_equal(np.asarray(words), want_words)
    np.testing.assert_array_equal(np.asarray(packed_scales), want_scales)


@pytest.mark.cpu_only
def test_packed_scale_positions():
    n = 128
    columns = jnp.asarray(np.arange(n)[None], jnp.float16)
    grouped = np.asarray(marlin_pack(np.zeros((32, n), np.uint8), columns, group_size=64)[1])
    # Grouped: in each 64-column chunk position 8i + j holds column i + 8j.
    assert [grouped[0, 8 * i + j] for i, j in [(0, 1), (3, 5), (7, 7)]] == [8, 43, 63]
    assert grouped[0, 64 + 8 * 2 + 3] == 64 + 2 + 24
    per_column = np.asarray(marlin_pack(np.zeros((32, n), np.uint8), columns, group_size=None)[1])
    # Per column: in each 32-column chunk position 8i + j holds 2i + (0, 1, 8, 9, 16, 17, 24,
    # 25)[j].
    assert list(per_column[0, 8:16]) == [2, 3, 10, 11, 18, 19, 26, 27]
    assert per_column[0, 32 + 8 * 3 + 7] == 32 + 6 + 25


@pytest.mark.parametrize("args, error, match", [
    (dict(k=96), ValueError, "in_features must be a positive multiple of 64 .* got 96"),
    (dict(n=96), ValueError, "out_features must be a positive multiple of 64 .* got 96"),
    (dict(group_size=24), ValueError, "group_size must be None .* multiple of 16 .* got 24"),
    (dict(group_size=48), ValueError, "dividing in_features = 128 .* got 48"),
    (dict(group_size=8), ValueError, "multiple of 16 .* got 8"),
    (dict(group_size=64.0), TypeError, "group_size must be an int"),
    (dict(qdtype=np.int8), TypeError, "qweight must be uint8"),
    (dict(sdtype=jnp.float32), TypeError, "scales must be bfloat16 or float16 .* got float32"),
    (dict(groups=3), ValueError,
     r"scales must be \[in/group_size, out\] = \[4, 64\]; got \[3, 64\]"),
    (dict(rank3=True), ValueError, r"qweight must be rank 2 \(\[in/2, out\]\)"),
])
@pytest.mark.cpu_only
def test_pack_errors(args, error, match):
    k, n = args.get("k", 128), args.get("n", 64)
    qweight = np.zeros((k // 2, n), args.get("qdtype", np.uint8))
    if args.get("rank3"):
        qweight = qweight[None]
    group_size = args.get("group_size", 32)
    groups = args.get("groups", k // 32)
    scales = jnp.ones((groups, n), args.get("sdtype", jnp.float16))
    with pytest.raises(error, match=match):
        marlin_pack(qweight, scales, group_size=group_size)


@pytest.mark.cpu_only
def test_unpack_errors():
    scales = jnp.ones((1, 64), jnp.float16)
    with pytest.raises(TypeError, match="packed_qweight must be int32 .* got uint32"):
        marlin_unpack(np.zeros((8, 128), np.uint32), scales, group_size=None)
    with pytest.raises(ValueError, match="last dim must be even"):
        marlin_unpack(np.zeros((8, 127), np.int32), scales, group_size=None)
    with pytest.raises(ValueError, match=r"packed_scales must be \[1, out\] = \[1, 64\]"):
        marlin_unpack(np.zeros((8, 128), np.int32), jnp.ones((2, 64), jnp.float16),
                      group_size=None)


# ------------------------------------------------------------------ the primitive
def packed_weight(seed=0, k=128, n=64, group_size=32, dtype=jnp.float16):
    rng = np.random.default_rng(seed)
    codes, qweight, scales = random_weight(rng, k, n, group_size, dtype)
    return codes, scales, marlin_pack(qweight, scales, group_size=group_size)


@pytest.mark.cpu_only
def test_primitive_argument_errors():
    _, _, (pq, ps) = packed_weight()
    with pytest.raises(TypeError, match="x must be bfloat16 or float16 .* got float32"):
        int4_marlin_matmul(jnp.ones((2, 128)), pq, ps, group_size=32)
    with pytest.raises(ValueError, match="x's last dim must be in_features = 128"):
        int4_marlin_matmul(jnp.ones((2, 64), jnp.float16), pq, ps, group_size=32)
    with pytest.raises(TypeError, match="packed_scales must have x's dtype"):
        int4_marlin_matmul(jnp.ones((2, 128), jnp.bfloat16), pq, ps, group_size=32)
    with pytest.raises(ValueError, match=r"packed_scales must be \[1, out\]"):
        int4_marlin_matmul(jnp.ones((2, 128), jnp.float16), pq, ps, group_size=None)


@pytest.mark.cpu_only
def test_primitive_shapes_and_transpose_in_any_mode():
    """Abstract evaluation and the transpose (marlin_unpack + int4_matmul_t on the CPU) need no
    forward kernel."""
    codes, scales, (pq, ps) = packed_weight(group_size=None)
    x = jnp.ones((2, 3, 128), jnp.float16)
    out = jax.eval_shape(lambda x: int4_marlin_matmul(x, pq, ps, group_size=None), x)
    assert out.shape == (2, 3, 64) and out.dtype == jnp.float16
    ct = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 64)), jnp.float16)
    transpose = jax.linear_transpose(lambda x: int4_marlin_matmul(x, pq, ps, group_size=None), x)
    (dx,) = transpose(ct)
    w = (codes - 8) * np.asarray(scales, np.float64)
    np.testing.assert_allclose(np.asarray(dx, np.float64), np.asarray(ct, np.float64) @ w.T,
                               rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(EMULATING, reason="JAXSPARSE_EMULATE_CUDA=1 lowers to the emulated kernel")
def test_cpu_lowering_refuses_the_cuda_layout():
    _, _, (pq, ps) = packed_weight()
    with pytest.raises(ValueError, match=r"packed for CUDA \(the MARLIN layout.*marlin_unpack"):
        int4_marlin_matmul(jnp.ones((2, 128), jnp.float16), pq, ps, group_size=32)


def needs_emulator(test):
    """Runs only in the emulated pass (`emulated_only`: kept there even where that pass leaves
    the `once` tests out, as CI's does)."""
    skip = pytest.mark.skipif(not EMULATING, reason="the primitive runs on the CPU only emulated")
    return pytest.mark.emulated_only(skip(test))


@needs_emulator
@pytest.mark.parametrize("dtype", DTYPES)
def test_primitive_against_reference_with_batch_dims(dtype):
    codes, scales, (pq, ps) = packed_weight(dtype=dtype)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 9, 128)), dtype)
    y = jax.jit(lambda x: int4_marlin_matmul(x, pq, ps, group_size=32))(x)
    assert y.shape == (2, 9, 64)
    expected, magnitude = oracle(x.reshape(18, 128), codes, scales, 32)
    assert_matches(y.reshape(18, 64), expected, magnitude, dtype)
    # The reference dequantises in f32 (no 16-bit rounding of the scaled weights): the two differ
    # by at most half an ulp of each weight, summed, plus the output's rounding.
    reference = np.asarray(int4_marlin_matmul_reference(x.reshape(18, 128), pq, ps,
                                                        group_size=32), np.float64)
    ulp = 2.0 ** -(7 if jnp.dtype(dtype) == jnp.bfloat16 else 10)
    diff = np.abs(np.asarray(y.reshape(18, 64), np.float64) - reference)
    assert (diff <= ulp * (magnitude + np.abs(reference))).all()


@needs_emulator
def test_primitive_vmap_grad_and_frozen_weights():
    codes, scales, (pq, ps) = packed_weight(group_size=None)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((3, 4, 128)), jnp.float16)
    f = lambda x: int4_marlin_matmul(x, pq, ps, group_size=None)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(jax.vmap(f)(x), np.float32),
                                  np.asarray(f(x), np.float32))
    w = (codes - 8) * np.asarray(scales, np.float64)
    dx = jax.grad(lambda x: f(x).astype(jnp.float32).sum())(x)
    np.testing.assert_allclose(np.asarray(dx, np.float64),
                               np.broadcast_to(w.sum(axis=1), (3, 4, 128)), rtol=2e-3, atol=2e-3)
    _, tangent = jax.jvp(f, (x,), (jnp.ones_like(x),))
    assert tangent.shape == (3, 4, 64)
    with pytest.raises(ValueError, match="frozen"):
        jax.jvp(lambda s: int4_marlin_matmul(x, pq, s, group_size=None), (ps,),
                (jnp.ones_like(ps),))
    # Weights mapped too: one kernel call per weight.
    stacked = jax.vmap(lambda q, s: int4_marlin_matmul(x[0], q, s, group_size=None))(
        jnp.stack([pq, pq]), jnp.stack([ps, ps]))
    np.testing.assert_array_equal(np.asarray(stacked[1], np.float32),
                                  np.asarray(f(x[0]), np.float32))


# ------------------------------------------------------------------ the 2:4 form (Sparse-MARLIN)
NM_TARGET = "jaxsparse_emu_int4_nm_marlin_matmul"
ORDERED_PAIRS = np.array([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)])


def random_nm_weight(rng, k, n, group_size, dtype):
    """Canonical int4 + 2:4: (ints [K, N] = code - 8 at the kept positions, 0 elsewhere,
    qweight [K/4, N], positions [K/8, N], scales); every code 0..15 and every position pair
    occurs."""
    groups = k // 4
    pairs = ORDERED_PAIRS[rng.integers(0, 6, size=(groups, n))]
    pairs[:6, 0] = ORDERED_PAIRS
    vals = rng.integers(0, 16, size=(groups, n, 2))
    vals[:8, 1] = np.arange(16).reshape(8, 2)
    qweight = (vals[..., 0] | (vals[..., 1] << 4)).astype(np.uint8)
    code = pairs[..., 0] | (pairs[..., 1] << 2)
    positions = (code[0::2] | (code[1::2] << 4)).astype(np.uint8)
    ints = np.zeros((k, n))
    cols = np.arange(n)
    for h in range(2):
        for g in range(groups):
            ints[4 * g + pairs[g, :, h], cols] = vals[g, :, h] - 8
    n_scales = 1 if group_size is None else k // group_size
    scales = rng.uniform(0.25, 2.0, size=(n_scales, n)) * rng.choice([-1, 1], size=(n_scales, n))
    return ints, qweight, positions, jnp.asarray(scales / 8, dtype)


def oracle_from_ints(x, ints, scales, group_size):
    """float64 y = x @ W for W = ints * scale (grouped: rounded once to x's dtype, as the kernel
    multiplies in x's dtype); returns (y, sum |x| |W|)."""
    x64 = np.asarray(x, np.float64)
    s = np.asarray(scales, np.float64)
    if group_size is None:
        return (x64 @ ints) * s, np.abs(x64) @ np.abs(ints) * np.abs(s)
    w = np.asarray(jnp.asarray(ints * np.repeat(s, group_size, axis=0), x.dtype), np.float64)
    return x64 @ w, np.abs(x64) @ np.abs(w)


def emulated_nm(x, packed_qweight, packed_meta, packed_scales, group_size):
    call = jax.ffi.ffi_call(NM_TARGET, jax.ShapeDtypeStruct((x.shape[0],
                                                             packed_scales.shape[1]), x.dtype))
    attr = np.int32(-1 if group_size is None else group_size)
    return call(x, packed_qweight, packed_meta, packed_scales, group_size=attr)


def run_nm_case(seed, t, k, n, group_size, dtype):
    rng = np.random.default_rng(seed)
    ints, qweight, positions, scales = random_nm_weight(rng, k, n, group_size, dtype)
    x = jnp.asarray(rng.standard_normal((t, k)), dtype)
    packed = marlin_nm_pack(qweight, positions, scales, group_size=group_size)
    y = emulated_nm(x, *packed, group_size)
    assert y.shape == (t, n) and y.dtype == dtype
    expected, magnitude = oracle_from_ints(x, ints, scales, group_size)
    assert_matches(y, expected, magnitude, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 15, 16, 17, 32, 33, 65])
def test_nm_kernel_tokens_at_tile_edges(t, dtype):
    run_nm_case(t, t, 128, 64, 32, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128, PER_COLUMN])
@pytest.mark.parametrize("k, n", [(128, 128), (640, 64)])
def test_nm_kernel_group_sizes_and_tiles(k, n, group_size, dtype):
    run_nm_case(k + n, 20, k, n, group_size, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nm_kernel_exact_on_small_integers(dtype):
    """Small integers: exact everywhere, so the kernel equals the canonical CPU kernel bit for
    bit."""
    rng = np.random.default_rng(8)
    _, qweight, positions, _ = random_nm_weight(rng, 256, 64, 64, dtype)
    scales = jnp.asarray(rng.integers(1, 3, size=(4, 64)), dtype)
    x = jnp.asarray(rng.integers(-2, 3, size=(9, 256)), dtype)
    y = emulated_nm(x, *marlin_nm_pack(qweight, positions, scales, group_size=64), 64)
    cpu = int4_nm_matmul(x[None], jnp.asarray(qweight)[None], jnp.asarray(positions)[None],
                         scales[None], group_size=64)[0]
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(cpu, np.float32))


@pytest.mark.parametrize("group_size", [32, PER_COLUMN])
@pytest.mark.cpu_only
def test_nm_pack_unpack_round_trip_is_bit_exact(group_size):
    rng = np.random.default_rng(9)
    _, qweight, positions, scales = random_nm_weight(rng, 256, 128, group_size, jnp.float16)
    pack = jax.jit(lambda q, p, s: marlin_nm_pack(q, p, s, group_size=group_size))
    pq, pm, ps = pack(qweight, positions, scales)
    assert pq.shape == (8, 256) and pm.shape == (8, 128) and ps.shape == scales.shape
    q2, p2, s2 = marlin_nm_unpack(pq, pm, ps, group_size=group_size)
    np.testing.assert_array_equal(np.asarray(q2), qweight)
    np.testing.assert_array_equal(np.asarray(p2), positions)
    np.testing.assert_array_equal(np.asarray(s2), np.asarray(scales))


@pytest.mark.cpu_only
def test_nm_packed_word_and_metadata_against_the_layout():
    """One kept value and its group's positions, placed by hand: group 13 (inputs 52..55: k32
    step 1, group 5 of the step, so e = 1, t = 1; metadata half 1, chunk 1), output 64 + 16 * 2 +
    8 + 3 (block 1, tile 2, row g + 8 with g = 3), its second kept value (h = 1)."""
    k, n = 128, 128
    qweight = np.full((k // 4, n), 0x88, np.uint8)
    code = np.full((k // 4, n), 0 | (1 << 2))  # positions (0, 1) everywhere
    out = 64 + 32 + 8 + 3
    qweight[13, out] = 0x58  # kept values (8, 5): the second is 5
    code[13, out] = 1 | (3 << 2)  # positions (1, 3)
    positions = (code[0::2] | (code[1::2] << 4)).astype(np.uint8)
    pq, pm, _ = marlin_nm_pack(qweight, positions, jnp.ones((1, n), jnp.float16), group_size=None)
    words, meta = np.asarray(pq).view(np.uint32), np.asarray(pm).view(np.uint32)
    # Word 4 (4g + t) + j of block 1, row 1: nibble s + 2e + 4h = 1 + 2 + 4 = 7.
    assert words[1, 128 + 4 * (4 * 3 + 1) + 2] == 0x58888888
    assert (np.delete(words.ravel(), 256 + 128 + 54) == 0x88888888).all()
    # Tile 2 = 2r + jl with r = 1, jl = 0; lane 4g + 2 jl + half = 13; register r: word 2 * 13 + 1
    # of block 1, row 1; row g + 8 -> bits 16 + 4c with c = 1: code 0b1101 there, 0b0100 elsewhere.
    assert meta[1, 64 + 27] == 0x44D44444
    assert (np.delete(meta.ravel(), 128 + 64 + 27) == 0x44444444).all()


@pytest.mark.cpu_only
def test_nm_descending_pairs_are_swapped_and_equal_positions_refused():
    rng = np.random.default_rng(10)
    _, qweight, positions, scales = random_nm_weight(rng, 128, 64, 32, jnp.float16)
    swapped_q = ((qweight >> 4) | (qweight << 4)).astype(np.uint8)
    swapped_p = (((positions >> 2) & 0x33) | ((positions << 2) & 0xCC)).astype(np.uint8)
    a = marlin_nm_pack(qweight, positions, scales, group_size=32)
    b = marlin_nm_pack(swapped_q, swapped_p, scales, group_size=32)
    for left, right in zip(a, b):
        np.testing.assert_array_equal(np.asarray(left), np.asarray(right))
    same = positions.copy()
    same[3, 5] = 0x55  # both groups at (1, 1)
    with pytest.raises(ValueError, match="two distinct positions per group"):
        marlin_nm_pack(qweight, same, scales, group_size=32)


@pytest.mark.parametrize("args, error, match", [
    (dict(k=64), ValueError, "in_features must be a positive multiple of 128 .* got 64"),
    (dict(group_size=16), ValueError, "multiple of 32 dividing in_features = 128 .* got 16"),
    (dict(pdtype=np.int8), TypeError, "qweight and positions must be uint8"),
    (dict(prows=8), ValueError, r"positions must be \[in/8, out\] = \[16, 64\]; got \[8, 64\]"),
])
@pytest.mark.cpu_only
def test_nm_pack_errors(args, error, match):
    k, n = args.get("k", 128), 64
    qweight = np.zeros((k // 4, n), np.uint8)
    positions = np.full((args.get("prows", k // 8), n), 0x44, args.get("pdtype", np.uint8))
    scales = jnp.ones((k // 32, n), jnp.float16)
    with pytest.raises(error, match=match):
        marlin_nm_pack(qweight, positions, scales, group_size=args.get("group_size", 32))


@pytest.mark.cpu_only
def test_nm_handler_rejects_bad_metadata():
    x = jnp.ones((3, 128), jnp.float16)
    call = jax.ffi.ffi_call(NM_TARGET, jax.ShapeDtypeStruct((3, 64), x.dtype))
    with pytest.raises(Exception, match=r"meta must be \[K/32, N\]"):
        call(x, jnp.zeros((4, 128), np.int32), jnp.zeros((4, 32), np.int32),
             jnp.ones((4, 64), jnp.float16), group_size=np.int32(32))


@pytest.mark.skipif(EMULATING, reason="JAXSPARSE_EMULATE_CUDA=1 lowers to the emulated kernel")
def test_nm_cpu_lowering_refuses_the_cuda_layout():
    rng = np.random.default_rng(12)
    _, qweight, positions, scales = random_nm_weight(rng, 128, 64, 32, jnp.float16)
    packed = marlin_nm_pack(qweight, positions, scales, group_size=32)
    with pytest.raises(ValueError, match=r"packed for CUDA.*marlin_nm_unpack"):
        int4_nm_marlin_matmul(jnp.ones((2, 128), jnp.float16), *packed, group_size=32)


@needs_emulator
@pytest.mark.parametrize("dtype", DTYPES)
def test_nm_primitive_batch_dims_and_grad(dtype):
    rng = np.random.default_rng(13)
    ints, qweight, positions, scales = random_nm_weight(rng, 128, 64, 32, dtype)
    packed = marlin_nm_pack(qweight, positions, scales, group_size=32)
    x = jnp.asarray(rng.standard_normal((2, 5, 128)), dtype)
    f = lambda x: int4_nm_marlin_matmul(x, *packed, group_size=32)  # noqa: E731
    y = jax.jit(f)(x)
    expected, magnitude = oracle_from_ints(x.reshape(10, 128), ints, scales, 32)
    assert_matches(y.reshape(10, 64), expected, magnitude, dtype)
    dx = jax.grad(lambda x: f(x).astype(jnp.float32).sum())(x)
    w = ints * np.repeat(np.asarray(scales, np.float64), 32, axis=0)
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-3
    np.testing.assert_allclose(np.asarray(dx, np.float64),
                               np.broadcast_to(w.sum(axis=1), (2, 5, 128)), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="frozen"):
        jax.jvp(lambda s: int4_nm_marlin_matmul(x, *packed[:2], s, group_size=32),
                (packed[2],), (jnp.ones_like(packed[2]),))
