"""Bugs planted in small kernels: the emulator must make each one fail, loudly or by a wrong result."""

import numpy as np
import pytest

from tests.cuda_emu import _ptx_model as ptx

from jaxsparse import _cuda_emu as emu  # noqa: E402  (always built: a missing module must fail)

# CI runs this file with the newest jax only (`once`: tests/conftest.py).
pytestmark = pytest.mark.once


def tile_problem(seed=0):
    rng = np.random.default_rng(seed)
    dense, packed_bits, positions = ptx.sparse_a(rng, "bfloat16")
    b_bits = ptx.bits16(rng.standard_normal((32, 8)), "bfloat16")
    meta = ptx.metadata_registers(positions, 0)
    expected = (dense @ ptx.values16(b_bits, "bfloat16")).astype(np.float32)
    return packed_bits, meta, b_bits, expected


def sparse_tile(packed_bits, meta, b_bits, bug):
    out = emu.sparse_tile(packed_bits.ravel().tolist(), meta.tolist(), b_bits.ravel().tolist(), bug)
    return np.array(out, np.float32).reshape(16, 8)


def test_sparse_tile_kernel_is_correct():
    # cp.async -> shared -> ldmatrix.x4 -> mma.sp: the whole path of a tensor-core tile.
    packed_bits, meta, b_bits, expected = tile_problem()
    np.testing.assert_array_equal(sparse_tile(packed_bits, meta, b_bits, "none"), expected)


def test_missing_cp_async_wait_reads_poisoned_shared_memory():
    packed_bits, meta, b_bits, expected = tile_problem(1)
    d = sparse_tile(packed_bits, meta, b_bits, "missing_wait")
    assert np.isnan(d).all()


def test_swapped_fragment_registers_give_a_wrong_product():
    packed_bits, meta, b_bits, expected = tile_problem(2)
    d = sparse_tile(packed_bits, meta, b_bits, "swapped_fragment")
    assert not np.allclose(d, expected)


def test_out_of_bounds_shared_write_is_an_error():
    packed_bits, meta, b_bits, _ = tile_problem(3)
    with pytest.raises(RuntimeError,
                       match=r"cp.async destination.*offset 512 is outside the block's 512 bytes"
                             r".*kernel SparseTileGemm, block \(0,0,0\), thread \(31,0,0\)"):
        sparse_tile(packed_bits, meta, b_bits, "out_of_bounds")


@pytest.mark.parametrize("n", [32, 128, 1024])
def test_block_sum_and_its_missing_barrier(n):
    x = np.arange(n, dtype=np.float32)
    assert emu.block_sum(x.tolist()) == float(x.sum())
    # Without the first barrier thread 0 folds in slots no thread has written yet.
    assert np.isnan(emu.block_sum(x.tolist(), "missing_barrier"))


def test_the_emulator_counts_its_launches():
    # The emulated pass's audit (tests/conftest.py) reads this count around each test.
    before = emu.launches()
    emu.block_sum([1.0] * 64)
    with pytest.raises(RuntimeError):
        sparse_tile(*tile_problem(3)[:3], "out_of_bounds")
    assert emu.launches() - before == 2


def test_divergent_collective_is_a_reported_deadlock():
    with pytest.raises(RuntimeError, match=r"deadlock in kernel DivergedShuffle.*missing 0xffff0000"):
        emu.diverged_shuffle()
