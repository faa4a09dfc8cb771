"""The order in which the SIMT emulator runs a grid's blocks (docs/simt_emulator.md, Block orders).

Self-test kernels (cuda/emu/selftest_kernels.cuh) show the orders themselves: `block_tickets`
gives each block, by linear index (x fastest), its place in the order in which blocks started;
`last_writer` is a planted race between blocks, which a single fixed order hides and the varied
orders expose; `fail_in_block` breaks a rule in one block, which the error must name whatever
the order. Then the library's kernels, through their emulated FFI targets, give the same bits in
every order: their blocks do not race.
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import _ffi
from jaxsparse.ops import marlin_pack
from tests._check import keys, random_array, random_nm
from tests.cuda import test_emulated_blocks as blocks
from tests.cuda import test_emulated_int4 as int4
from tests.cuda import test_emulated_vnm as vnm
from tests.cuda.test_emulated_kernels import sp24

# CI runs this file with the newest jax only (`once`: tests/conftest.py).
pytestmark = pytest.mark.once

emu = _ffi._cuda_emu
GRID = (5, 4, 3)  # Every extent > 1, so that decoding a linear index into x, y, z is exercised.
BLOCKS = 60
FORWARD, REVERSE = list(range(BLOCKS)), list(range(BLOCKS))[::-1]


@pytest.fixture(autouse=True)
def _keep_order():
    before = emu.block_order()
    yield
    emu.set_block_order(before)


# ------------------------------------------------------------------ the orders


def test_forward_and_reverse_run_blocks_by_linear_index():
    emu.set_block_order("forward")
    assert emu.block_tickets(GRID) == FORWARD
    assert emu.block_order() == "forward"
    emu.set_block_order("reverse")
    assert emu.block_tickets(GRID) == REVERSE
    assert emu.block_order() == "reverse"


def test_shuffled_runs_a_new_permutation_per_launch():
    emu.set_block_order("shuffled:7")
    first, second = emu.block_tickets(GRID), emu.block_tickets(GRID)
    for tickets in first, second:
        assert sorted(tickets) == FORWARD  # Every block ran, once.
        assert tickets not in (FORWARD, REVERSE)
    assert first != second


def test_a_seed_reproduces_its_permutations():
    emu.set_block_order("shuffled:7")
    runs = [emu.block_tickets(GRID) for _ in range(3)]
    emu.set_block_order("shuffled:7")  # Restarts the sequence.
    assert [emu.block_tickets(GRID) for _ in range(3)] == runs
    emu.set_block_order("shuffled:8")
    assert emu.block_tickets(GRID) != runs[0]
    emu.set_block_order("shuffled")
    assert emu.block_order() == "shuffled:0"
    assert emu.block_tickets(GRID) not in runs


# ------------------------------------------------------------------ what the orders find


def test_a_race_between_blocks_surfaces():
    """Each block stores its index to one cell: in the old fixed (forward) order the cell always
    named the last block, as if the kernel were right."""
    emu.set_block_order("forward")
    assert emu.last_writer(GRID) == BLOCKS - 1
    emu.set_block_order("reverse")
    assert emu.last_writer(GRID) == 0
    emu.set_block_order("shuffled:1")
    assert len({emu.last_writer(GRID) for _ in range(6)}) > 1


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffled:3"])
@pytest.mark.parametrize("deadlock", [False, True])
def test_errors_name_the_failing_block(order, deadlock):
    emu.set_block_order(order)
    for bad in [(0, 0, 0), (3, 2, 1), (4, 3, 2)]:
        block = re.escape(f"block ({bad[0]},{bad[1]},{bad[2]})")
        what = "deadlock in kernel FailInBlock, " if deadlock else "outside the block's"
        with pytest.raises(RuntimeError, match=f"{what}.*{block}"):
            emu.fail_in_block(GRID, bad, deadlock)


# ------------------------------------------------------------------ the setting

EXPECTED = re.escape("expected 'forward', 'reverse', 'shuffled' or 'shuffled:<seed>'")


@pytest.mark.cpu_only
@pytest.mark.parametrize("bad", ["", "Forward", "shuffle", "shuffled:", "shuffled:-1",
                                 "shuffled:+1", "shuffled: 1", "shuffled:1.5", "shuffled:0x10",
                                 f"shuffled:{2**64}", "reverse "])
def test_a_bad_order_is_refused(bad):
    emu.set_block_order("reverse")
    with pytest.raises(ValueError, match=f"^order: {EXPECTED}.*got '{re.escape(bad)}'$"):
        emu.set_block_order(bad)
    assert emu.block_order() == "reverse"


def run_emulator(order: str | None, code: str) -> str:
    """Runs `code` (with `e`, the emulator module, loaded without jax) in a fresh process whose
    JAXSPARSE_EMU_BLOCK_ORDER is `order` (None: unset); returns what it printed."""
    env = {k: v for k, v in os.environ.items() if k != "JAXSPARSE_EMU_BLOCK_ORDER"}
    if order is not None:
        env["JAXSPARSE_EMU_BLOCK_ORDER"] = order
    load = (f"import importlib.util as u\n"
            f"s = u.spec_from_file_location('jaxsparse._cuda_emu', {emu.__file__!r})\n"
            f"e = u.module_from_spec(s)\ns.loader.exec_module(e)\n")
    done = subprocess.run([sys.executable, "-c", load + code], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_environment_sets_the_default_order():
    show = f"print(e.block_order(), e.block_tickets({GRID}))"
    emu.set_block_order("shuffled:7")
    first = emu.block_tickets(GRID)
    # Another process under the same seed runs the same permutations.
    assert run_emulator("shuffled:7", show) == f"shuffled:7 {first}\n"
    assert run_emulator("reverse", show) == f"reverse {REVERSE}\n"
    emu.set_block_order("shuffled:0")
    default = f"shuffled:0 {emu.block_tickets(GRID)}\n"
    assert run_emulator(None, show) == default
    assert run_emulator("", show) == default


@pytest.mark.cpu_only
def test_a_bad_environment_value_is_a_value_error():
    code = (f"for f in (e.block_order, lambda: e.block_tickets({GRID})):\n"
            "    try:\n        f()\n    except ValueError as err:\n        print(err)\n"
            "e.set_block_order('forward')\nprint(e.block_order())\n")
    message = ("JAXSPARSE_EMU_BLOCK_ORDER: expected 'forward', 'reverse', 'shuffled' or "
               "'shuffled:<seed>' (seed a decimal integer in [0, 2^64)), got 'sorted'")
    assert run_emulator("sorted", code) == f"{message}\n{message}\nforward\n"


# ------------------------------------------------------------------ the library's kernels


def assert_order_independent(compute):
    """compute() (the emulated kernels' arrays) holds the same bits in every order."""
    results = {}
    for order in ["forward", "reverse", "shuffled:1", "shuffled:2"]:
        emu.set_block_order(order)
        launched = emu.launches()
        results[order] = [np.asarray(a) for a in compute()]
        assert emu.launches() > launched
    want = results["forward"]
    for order, got in results.items():
        for i, (g, w) in enumerate(zip(got, want)):
            differ = g.view(np.uint8).reshape(g.shape + (-1,)) != w.view(np.uint8).reshape(
                w.shape + (-1,))
            assert not differ.any(), (f"output {i} under {order} differs from forward at "
                                      f"{differ.any(-1).sum()} elements, first "
                                      f"{np.argwhere(differ.any(-1))[0]}")


def nm_call(op, shape, a, b, indices, n, m):
    """The emulated N:M target of `op` (its output of `shape`, a's dtype)."""
    out = jax.ShapeDtypeStruct(shape, a.dtype)
    return jax.ffi.ffi_call(f"jaxsparse_emu_nm_{op}", out)(a, b, indices, n=np.int32(n),
                                                          m=np.int32(m))


def test_nm_kernels_do_not_depend_on_the_order():
    kx, kw, kd = keys(2, 3)
    # 3:7, f32 (CUDA cores): spmm grid 3 x 3 x 2 (70 outputs / 32, 9 tokens / 4, batch), spmm_t
    # 1 x 3 x 2, sddmm 2 x 18 x 2 (33 kept / 32, 70 outputs / 4).
    t, k, out, n, m = 9, 77, 70, 3, 7
    x = random_array(kx, (2, t, k), jnp.float32)
    dy = random_array(kd, (2, t, out), jnp.float32)
    ws = random_nm(kw, k, out, n, m, jnp.float32)
    v, i = ws.values[None], ws.indices[None]

    def generic():
        return [nm_call("spmm", (2, t, out), x, v, i, n, m),
                nm_call("spmm_t", (2, t, k), dy, v, i, n, m),
                nm_call("sddmm", (2, out, 33), x, dy, i, n, m)]

    assert_order_independent(generic)


def test_nm_tensor_core_kernels_do_not_depend_on_the_order():
    kx, kw, kt, kd = keys(3, 4)
    # 2:4 bf16: sp24 grid 2 x 2 x 2 (80 outputs / 64, 65 tokens / 64, batch), spmm_t 2 x 2
    # (72 inputs / 64, 65 tokens / 64), sddmm 2 x 2 (72 outputs / 64, 72 inputs / 64).
    t, k = 65, 72
    x = random_array(kx, (2, t, k), jnp.bfloat16)
    ws = random_nm(kw, 64, 80, 2, 4, jnp.bfloat16)
    wt = random_nm(kt, k, 72, 2, 4, jnp.bfloat16)
    dy = random_array(kd, (1, t, 72), jnp.bfloat16)
    v, i = wt.values[None], wt.indices[None]

    def tensor_cores():
        return [sp24(x[..., :64], ws.values[None], ws.indices[None]),
                nm_call("spmm_t", (1, t, k), dy, v, i, 2, 4),
                nm_call("sddmm", (1, *v.shape[1:]), x[:1], dy, i, 2, 4)]

    assert_order_independent(tensor_cores)


def test_blocks_vnm_and_int4_kernels_do_not_depend_on_the_order():
    rng = np.random.default_rng(4)
    # 1xN blocks, n = 8, bf16 (tensor cores): 3 rows x 2 (65 tokens / 16 per group / 4) blocks.
    values, indices, indptr = blocks.random_blocks(rng, 40, 24, 8, dtype=jnp.bfloat16)
    xb = blocks.normal(rng, (1, 65, 40), jnp.bfloat16)
    # V:N:M 2:8, V = 16, bf16 (mma.sp): 3 panels x 2 (65 tokens / 64) blocks.
    vv, vi, vc = vnm.random_vnm(rng, 90, 48, 16, 2, 8, dtype=jnp.bfloat16)
    xv = vnm.normal(rng, (1, 65, 90), jnp.bfloat16)
    # int4 MARLIN, groups of 64, bf16: 2 (128 outputs / 64) x 2 (65 tokens / 64) blocks.
    _, qweight, scales = int4.random_weight(rng, 128, 128, 64, jnp.bfloat16)
    packed_qweight, packed_scales = marlin_pack(qweight, scales, group_size=64)
    xi = jnp.asarray(rng.standard_normal((65, 128)), jnp.bfloat16)

    def kernels():
        return [blocks.spmm(xb, values, indices, indptr, 24),
                vnm.spmm(xv, vv, vi, vc, 16, 2, 8),
                int4.emulated(xi, packed_qweight, packed_scales, 64)]

    assert_order_independent(kernels)
