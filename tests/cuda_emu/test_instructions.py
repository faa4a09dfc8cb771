"""Each emulated warp instruction against the NumPy model of the PTX ISA text (_ptx_model.py)."""

import numpy as np
import pytest

from tests.cuda_emu import _ptx_model as ptx

from jaxsparse import _cuda_emu as emu  # noqa: E402  (always built: a missing module must fail)

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
