"""Each emulated warp instruction against the NumPy model of the PTX ISA text (_ptx_model.py)."""

import numpy as np
import pytest

from tests.cuda_emu import _ptx_model as ptx

from jaxsparse import _cuda_emu as emu  # noqa: E402  (always built: a missing module must fail)

# CI runs this file with the newest jax only (`once`: tests/conftest.py).
pytestmark = pytest.mark.once

DTYPES = ["bfloat16", "float16"]


def run_mma_sp(a_packed_bits, b_bits, c, meta, selector, dtype, ordered=True):
    a = ptx.a_fragments_m16n8k16(a_packed_bits)
    b = ptx.b_fragments(b_bits, 32)
    d = emu.mma_sp(a.ravel().tolist(), b.ravel().tolist(), ptx.c_fragments(c).ravel().tolist(),
                   meta.tolist(), selector, dtype, ordered)
    return ptx.d_matrix(d)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("selector", [0, 1])
def test_mma_sp_m16n8k32_matches_dense_product(dtype, selector):
    rng = np.random.default_rng(selector + 7 * len(dtype))
    dense, packed_bits, positions = ptx.sparse_a(rng, dtype)
    b_bits = ptx.bits16(rng.standard_normal((32, 8)), dtype)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    # Lanes the selector does not name hold garbage: the instruction must not read them.
    meta = ptx.metadata_registers(positions, selector, filler=0xFFFFFFFF)
    d = run_mma_sp(packed_bits, b_bits, c, meta, selector, dtype)
    expected = (dense @ ptx.values16(b_bits, dtype) + c.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(d, expected)


def test_mma_sp_plain_form_accepts_descending_positions():
    rng = np.random.default_rng(3)
    dense, packed_bits, positions = ptx.sparse_a(rng, "bfloat16")
    # Swap the two stored values and their positions in every chunk: the same logical A.
    swapped = packed_bits.reshape(16, 8, 2)[:, :, ::-1].reshape(16, 16)
    meta = ptx.metadata_registers(positions[:, :, ::-1], 0)
    b_bits = ptx.bits16(rng.standard_normal((32, 8)), "bfloat16")
    c = np.zeros((16, 8), np.float32)
    d = run_mma_sp(swapped, b_bits, c, meta, 0, "bfloat16", ordered=False)
    expected = (dense @ ptx.values16(b_bits, "bfloat16")).astype(np.float32)
    np.testing.assert_array_equal(d, expected)
    with pytest.raises(RuntimeError, match="invalid metadata code"):
        run_mma_sp(swapped, b_bits, c, meta, 0, "bfloat16", ordered=True)


@pytest.mark.parametrize("code", [0b0000, 0b0101, 0b1010, 0b1111])
def test_mma_sp_equal_positions_are_an_error(code):
    rng = np.random.default_rng(4)
    _, packed_bits, positions = ptx.sparse_a(rng, "float16")
    meta = ptx.metadata_registers(positions, 1)
    meta[4 * 5 + 2 + 1] = (meta[4 * 5 + 2 + 1] & ~np.uint32(0xF0)) | np.uint32(code << 4)
    b_bits = ptx.bits16(np.ones((32, 8)), "float16")
    with pytest.raises(RuntimeError, match=r"invalid metadata code.*row 5, chunk 5.*lane 23"):
        run_mma_sp(packed_bits, b_bits, np.zeros((16, 8), np.float32), meta, 1, "float16",
                   ordered=False)


def test_mma_sp_selector_out_of_range_is_an_error():
    zeros = [0] * 128
    with pytest.raises(RuntimeError, match="selector 2"):
        emu.mma_sp(zeros, zeros, [0.0] * 128, [0x4444] * 32, 2, "bfloat16", False)


def test_mma_sp_float16_specials():
    # Subnormals, infinities and signed zeros go through the f16 conversion exactly.
    rng = np.random.default_rng(5)
    dense, packed_bits, positions = ptx.sparse_a(rng, "float16")
    specials = np.array([2.0**-24, -(2.0**-20), 0.0, -0.0, 65504.0, 1e-5], np.float16)
    packed_bits[0, :6] = specials.view(np.uint16)
    dense_fixed = np.zeros((16, 32))
    packed = ptx.values16(packed_bits, "float16")
    for r in range(16):
        for ch in range(8):
            for s in range(2):
                dense_fixed[r, 4 * ch + positions[r, ch, s]] = packed[r, 2 * ch + s]
    b_bits = ptx.bits16(rng.standard_normal((32, 8)), "float16")
    meta = ptx.metadata_registers(positions, 0)
    d = run_mma_sp(packed_bits, b_bits, np.zeros((16, 8), np.float32), meta, 0, "float16")
    expected = (dense_fixed @ ptx.values16(b_bits, "float16")).astype(np.float32)
    np.testing.assert_array_equal(d, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mma_m16n8k16_dense(dtype):
    rng = np.random.default_rng(11)
    a_bits = ptx.bits16(rng.standard_normal((16, 16)), dtype)
    b_bits = ptx.bits16(rng.standard_normal((16, 8)), dtype)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    d = emu.mma(ptx.a_fragments_m16n8k16(a_bits).ravel().tolist(),
                ptx.b_fragments(b_bits, 16).ravel().tolist(),
                ptx.c_fragments(c).ravel().tolist(), dtype)
    expected = ptx.values16(a_bits, dtype) @ ptx.values16(b_bits, dtype) + c
    np.testing.assert_array_equal(ptx.d_matrix(d), expected.astype(np.float32))


@pytest.mark.parametrize("num", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix(num, trans):
    rng = np.random.default_rng(num + 10 * trans)
    rows = rng.integers(0, 2**16, size=(40, 8), dtype=np.uint16)
    row_of_lane = rng.permutation(40)[:32]
    out = np.array(emu.ldmatrix(rows.ravel().tolist(), row_of_lane.tolist(), num, trans),
                   np.uint32).reshape(32, num)
    np.testing.assert_array_equal(out, ptx.ldmatrix(rows, row_of_lane, num, trans))


def test_ldmatrix_row_outside_shared_memory_is_an_error():
    rows = list(range(8 * 8))
    lanes = list(range(8)) * 4
    lanes[5] = 8  # One row past the 8 rows of shared memory.
    with pytest.raises(RuntimeError, match="outside the block's 128 bytes of shared memory"):
        emu.ldmatrix(rows, lanes, 1, False)
    # Lanes >= 8 * num give no address for x1, so their rows are never checked.
    lanes = list(range(8)) + [1000] * 24
    assert len(emu.ldmatrix(rows, lanes, 1, False)) == 32


def shfl_model(values, args, mask, width, mode):
    out = np.zeros(32, np.uint32)
    for lane in range(32):
        if not (mask >> lane) & 1:
            continue
        start, pos, a = lane & ~(width - 1), lane % width, args[lane]
        src = {"idx": start + a % width,
               "up": lane - a if pos >= a else lane,
               "down": lane + a if pos + a < width else lane,
               "xor": lane ^ a if (lane ^ a) < start + width else lane}[mode]
        out[lane] = values[src]
    return out


@pytest.mark.parametrize("mode", ["idx", "up", "down", "xor"])
@pytest.mark.parametrize("width", [32, 16, 4])
def test_shfl(mode, width):
    rng = np.random.default_rng(width)
    values = rng.integers(0, 2**32, size=32, dtype=np.uint32)
    if mode == "idx":
        args = rng.integers(0, 64, size=32)
    else:
        args = np.full(32, min(3, width - 1) if mode != "xor" else 1 + (width > 4))
    out = emu.shfl(values.tolist(), args.tolist(), 0xFFFFFFFF, 0xFFFFFFFF, width, mode)
    np.testing.assert_array_equal(np.array(out, np.uint32),
                                  shfl_model(values, args, 0xFFFFFFFF, width, mode))


def test_shfl_partial_mask_and_reads_outside_it():
    values = list(range(100, 132))
    mask = 0x0000FFFF
    out = emu.shfl(values, [1] * 32, mask, mask, 32, "xor")
    assert out[:16] == [v ^ 0 for v in shfl_model(np.array(values), [1] * 32, mask, 32, "xor")[:16]]
    with pytest.raises(RuntimeError, match="lane 15 reads lane 16, which is not in the mask"):
        emu.shfl(values, [1] * 32, mask, mask, 32, "down")


def test_collective_errors():
    values = list(range(32))
    with pytest.raises(RuntimeError, match="not in the mask"):
        emu.shfl(values, [0] * 32, 0x0000FFFF, 0xFFFFFFFF, 32, "idx")
    with pytest.raises(RuntimeError, match="deadlock"):
        emu.shfl(values, [0] * 32, 0xFFFFFFFF, 0x7FFFFFFF, 32, "idx")
    with pytest.raises(RuntimeError, match="width 3"):
        emu.shfl(values, [0] * 32, 0xFFFFFFFF, 0xFFFFFFFF, 3, "idx")


@pytest.mark.parametrize("mask", [0xFFFFFFFF, 0x00FF00FF])
def test_votes(mask):
    rng = np.random.default_rng(2)
    for preds in (rng.integers(0, 2, size=32), np.ones(32, int), np.zeros(32, int)):
        out = np.array(emu.votes(preds.tolist(), mask), np.uint32).reshape(32, 3)
        ballot = sum(1 << lane for lane in range(32) if preds[lane] and (mask >> lane) & 1)
        lanes = [lane for lane in range(32) if (mask >> lane) & 1]
        assert (out[lanes] == [ballot, ballot != 0, ballot == mask]).all()


# ---------------------------------------------------------------------- per-thread instructions
@pytest.mark.parametrize("imm", [0x00, 0xFF, 0xF0, 0xCC, 0xAA, 0xEA, 0x96, 0xE8, 0x01, 0x80,
                                 0x6A, 0x1B])
def test_lop3_truth_tables(imm):
    rng = np.random.default_rng(imm)
    a, b, c = (rng.integers(0, 2**32, size=300, dtype=np.uint32) for _ in range(3))
    # Every one of the 8 input combinations in some bit of the first word.
    a[0], b[0], c[0] = 0xF0, 0xCC, 0xAA
    out = np.array(emu.lop3(a.tolist(), b.tolist(), c.tolist(), imm), np.uint32)
    np.testing.assert_array_equal(out, ptx.lop3(a, b, c, imm))
    assert out[0] & 0xFF == imm


def test_lop3_every_table_on_the_identity_inputs():
    # a = 0xF0, b = 0xCC, c = 0xAA enumerate the 8 rows of the truth table in bits 0-7: those
    # bits are imm; bits 8-31 (all inputs 0) repeat row 0, imm's bit 0.
    for imm in range(256):
        high = 0xFFFFFF00 if imm & 1 else 0
        assert emu.lop3([0xF0], [0xCC], [0xAA], imm) == [imm | high]
    with pytest.raises(ValueError, match="imm: expected 0..255"):
        emu.lop3([0], [0], [0], 256)


def _specials16(dtype):
    """Bit patterns at the edges of a 16-bit format: zeros, subnormals, the normal edge, ones,
    the largest finite values, infinities, NaN."""
    if dtype == "float16":
        return [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x0401, 0x3C00, 0x3C01, 0xBC00,
                0x3E00, 0x3800, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0x6400, 0x6408, 0x2C00,
                0xD480, 0x0200]
    return [0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x0080, 0x0081, 0x3F80, 0x3F81, 0xBF80,
            0x3FC0, 0x3F00, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC0, 0x4300, 0x4308, 0xC308,
            0x0040]


def _random16(rng, dtype, n):
    """Random patterns, half of them with exponents near the subnormal range and few mantissa
    bits (so products land on subnormals and on rounding ties)."""
    bits = rng.integers(0, 2**16, size=n).astype(np.uint32)
    man = FORMAT_MANTISSA[dtype]
    small_exp = rng.integers(0, 4, size=n).astype(np.uint32) << man
    few_bits = rng.integers(0, 8, size=n).astype(np.uint32) << (man - 3)
    sign = rng.integers(0, 2, size=n).astype(np.uint32) << 15
    low = sign | small_exp | few_bits
    # The other half: exponents around 1.0 with few mantissa bits.
    bias = 15 if dtype == "float16" else 127
    ones = sign | (np.uint32(bias) - 2 + rng.integers(0, 5, size=n).astype(np.uint32)) << man
    ones |= rng.integers(0, 16, size=n).astype(np.uint32) << (man - 4)
    pick = rng.integers(0, 3, size=n)
    return np.where(pick == 0, bits, np.where(pick == 1, low, ones)).astype(np.uint32)


FORMAT_MANTISSA = {"float16": 10, "bfloat16": 7}


def _run_packed16(op, lo_a, lo_b, lo_c, dtype, rng):
    """Registers from element arrays: element 0 as given, element 1 a shuffled copy."""
    perm = rng.permutation(len(lo_a))
    regs = [ptx.pack2(np.asarray(x, np.uint32), np.asarray(x, np.uint32)[perm])
            for x in (lo_a, lo_b, lo_c)]
    out = np.array(emu.packed16(*(r.tolist() for r in regs), op, dtype), np.uint32)
    return out, ptx.packed16(op, *regs, dtype)


def _assert_same16(out, expected, dtype):
    """Bitwise equal, except that any NaN matches any NaN (the payload is not modelled)."""
    for shift in (0, 16):
        got, want = (out >> shift) & 0xFFFF, (expected >> shift) & 0xFFFF
        with np.errstate(invalid="ignore"):  # NaN patterns cast with a warning.
            nan_got = np.isnan(ptx.values16(got.astype(np.uint16), dtype))
            nan_want = np.isnan(ptx.values16(want.astype(np.uint16), dtype))
        np.testing.assert_array_equal(nan_got, nan_want)
        np.testing.assert_array_equal(got[~nan_want], want[~nan_want])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["sub", "mul", "fma"])
def test_packed16_against_exact_rounding(op, dtype):
    rng = np.random.default_rng(len(op) + len(dtype))
    specials = np.array(_specials16(dtype), np.uint32)
    # Every pair of specials, then random operands.
    sa, sb = np.meshgrid(specials, specials)
    a = np.concatenate([sa.ravel(), _random16(rng, dtype, 600)])
    b = np.concatenate([sb.ravel(), _random16(rng, dtype, 600)])
    c = np.concatenate([rng.permutation(np.resize(specials, sa.size)),
                        _random16(rng, dtype, 600)])
    out, expected = _run_packed16(op, a, b, c, dtype, rng)
    _assert_same16(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed16_ties_and_double_rounding(dtype):
    """A product exactly halfway between two 16-bit values rounds to even; a tiny addend beyond
    double precision's reach must still break the tie (a double-then-16-bit rounding would not)."""
    if dtype == "float16":
        a, b, tiny = 0x3C01, 0x3E00, 0x0001  # (1 + 2^-10) * 1.5 = 1.5 + 1.5 ulp: a tie.
        tie_even, above = 0x3E02, 0x3E02
        below = 0x3E01
    else:
        a, b, tiny = 0x3F81, 0x3FC0, 0x0001  # (1 + 2^-7) * 1.5: a tie; tiny = 2^-133.
        tie_even, above = 0x3FC2, 0x3FC2
        below = 0x3FC1
    neg_tiny = tiny | 0x8000
    rng = np.random.default_rng(0)
    out, expected = _run_packed16("fma", [a, a, a], [b, b, b], [0, tiny, neg_tiny], dtype, rng)
    _assert_same16(out, expected, dtype)
    np.testing.assert_array_equal(out & 0xFFFF, [tie_even, above, below])
    out, _ = _run_packed16("mul", [a], [b], [0], dtype, rng)
    assert out[0] & 0xFFFF == tie_even
    # a - b halfway: 2048 - 0.5 in f16 (ulp 1 below 2048) rounds to 2048, the even one.
    if dtype == "float16":
        out, _ = _run_packed16("sub", [0x6800], [0x3800], [0], dtype, rng)
        assert out[0] & 0xFFFF == 0x6800


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed16_signed_zeros_and_subnormals(dtype):
    rng = np.random.default_rng(1)
    smallest = 0x0001
    half = 0x3800 if dtype == "float16" else 0x3F00
    one = 0x3C00 if dtype == "float16" else 0x3F80
    # -0 * 1 = -0; 0 - 0 = +0; -0 - 0 = -0; smallest * 0.5 = 0 (tie, to even); smallest * -1.
    out, expected = _run_packed16("mul", [0x8000, smallest, smallest, 0x0003],
                                  [one, half, one | 0x8000, half], [0] * 4, dtype, rng)
    _assert_same16(out, expected, dtype)
    np.testing.assert_array_equal(out & 0xFFFF, [0x8000, 0x0000, 0x8001, 0x0002])
    out, expected = _run_packed16("sub", [0x0000, 0x8000, 0x0000], [0x0000, 0x0000, 0x8000],
                                  [0] * 3, dtype, rng)
    np.testing.assert_array_equal(out & 0xFFFF, [0x0000, 0x8000, 0x0000])
    # x * 1 + (-x) is +0; -0 * 1 + -0 is -0.
    out, _ = _run_packed16("fma", [0x1234, 0x8000], [one, one], [0x9234, 0x8000], dtype, rng)
    np.testing.assert_array_equal(out & 0xFFFF, [0x0000, 0x8000])
