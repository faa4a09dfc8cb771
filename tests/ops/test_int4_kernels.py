"""The int4 CPU kernels (cpu/int4/) on every instruction set the machine supports, against the
pure references: ragged output vectors (N not a multiple of 16 or 64), token blocks of 1-4 and
their tails, group sizes from 8 to one per column, a broadcast and a real weight batch, every
nibble value, and 2:4 positions that are not sorted or distinct (unvalidated data)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from tests._check import DTYPES, assert_close, scale_for
from tests.ops.test_int4 import ops_of, tokens, weight_of

# CI runs this file with the newest jax only (`once`: tests/conftest.py).
pytestmark = pytest.mark.once

# (tokens, K, N, group): one vector of outputs and less, a task's 64 and a ragged tail, several
# tasks; 1-5 tokens (each token block and its tail), 17 tokens (4 blocks and 1), 70; groups of
# 8 over K = 200, one group per column of K = 392. Past the pairs' range (below), products by W
# take the panel path (int4_panel_avx512.h): all of K decoded at once (K = 136) or, past 2048
# inputs, in two chunks whose sums wait in a buffer (K = 2056, below), a panel's 64 outputs and
# a ragged one (N = 130, 70), two token blocks of 384 and a ragged one (390);
# the 2:4 form in f32 / f16 packs each block of 64 outputs into lines in the task and looks its
# inputs up there (NmRepackTask): ragged chunks (K = 200, 136), groups of 8 inside a chunk,
# ragged blocks (N = 130, 33, 20) and unsorted positions. The avx2 unit walks a task's outputs
# in slices of 8 vectors of 8 at 1 token, 4 at 2, 2 at 3 and 4 (the 2:4 form 4, 2, 1, 1): a
# last task of one vector (N = 72) after a 4 + 3 token split over one group of 8 inputs (K = 8),
# a slice of 3 vectors of 4 (N = 24) with one group per column and a 4 + 2 split, and at 1 token
# a last slice of one vector (N = 200).
SHAPES = [(1, 64, 1, 32), (3, 128, 17, 8), (4, 64, 64, 64), (5, 256, 130, 128),
          (17, 96, 40, 96), (2, 1024, 70, 128), (70, 64, 33, 32), (3, 200, 20, 8),
          (1, 392, 33, 392), (20, 200, 130, 8), (390, 136, 20, 8), (7, 8, 72, 8),
          (6, 48, 24, 48), (1, 64, 200, 16)]


# bf16 and f16 operands are widened to f32 once per call by code every ISA shares: three shapes
# (a ragged tail, the 4-token block, many tokens) check them, the rest run in f32.
# bf16 at 16+ tokens takes the engine's tiles in the avx512bf16 and amx units (int4_tiles.h):
# the last shape has three k blocks (16, 16, 1 steps), two token blocks and two panel groups,
# each with a ragged tail. The dense form with a token per register (int4_pairs.h) takes f32
# from 8 to 48 tokens (17, 20 above, and the range's end, 48) and bf16 from 8 to 32 (vdpbf16ps;
# up to 15 in the amx unit): 20 tokens in two chunks, and the range's ends, 8 and 32 (two chunks
# of 16), with ragged vectors; 70 and 390 f32 tokens take the panels, and 52 tokens of each dtype
# over K = 2056 take them in two chunks of K (bf16 in the avx512 unit, which has no tiles).
# The f32 passes take 32 outputs and up to 12 tokens: a second vector of 4 outputs (N = 20, 84)
# in one chunk of 12 and in two; f32 and f16 x is packed in squares of 16 tokens x 16 inputs with
# the rest one by one: 24 tokens (a square and 8) over K = 144 (a pack task's 128 inputs and 16).
CASES = [(*shape, jnp.float32) for shape in SHAPES] + [
    (*shape, dtype) for shape in (SHAPES[1], SHAPES[3], SHAPES[9]) for dtype in DTYPES[1:]] + [
    (260, 1056, 290, 32, jnp.bfloat16), (8, 136, 70, 8, jnp.bfloat16),
    (32, 64, 33, 32, jnp.bfloat16), (48, 136, 70, 8, jnp.float32),
    (12, 64, 20, 32, jnp.float32), (24, 144, 84, 16, jnp.float32),
    (24, 144, 84, 16, jnp.float16)] + [
    (52, 2056, 70, 8, dtype) for dtype in DTYPES]


@pytest.mark.parametrize("form", ["dense", "2:4"])
@pytest.mark.parametrize("t,k,n,group,dtype", CASES)
def test_every_isa_against_the_reference(isa, form, t, k, n, group, dtype):
    fwd, bwd, fwd_ref, bwd_ref = ops_of(form)
    weight = weight_of(form, k, n, group, batch=2, dtype=dtype, sorted_positions=False)
    x, dy = tokens(1, t, k, dtype), tokens(2, t, n, dtype, seed=2)
    # Weights ~0.05 x codes up to 8: products of magnitude ~0.2 sqrt(K).
    assert_close(fwd(x, *weight, group_size=group), fwd_ref(x, *weight, group_size=group),
                 dtype, 0.3 * scale_for(k), err_msg=f"{isa} forward")
    assert_close(bwd(dy, *weight, group_size=group, in_features=k),
                 bwd_ref(dy, *weight, group_size=group, in_features=k), dtype,
                 0.3 * scale_for(n), err_msg=f"{isa} dx")


def test_empty_dimensions(isa):
    for form in ("dense", "2:4"):
        fwd, bwd, _, _ = ops_of(form)
        weight = weight_of(form, 64, 8, 32)
        assert fwd(tokens(1, 0, 64), *weight, group_size=32).shape == (1, 0, 8)
        assert bwd(tokens(1, 0, 8), *weight, group_size=32, in_features=64).shape == (1, 0, 64)
        empty = weight_of(form, 64, 0, 32)
        assert fwd(tokens(1, 3, 64), *empty, group_size=32).shape == (1, 3, 0)
        dx = bwd(jnp.zeros((1, 3, 0)), *empty, group_size=32, in_features=64)
        assert dx.shape == (1, 3, 64) and not jnp.any(dx)


@pytest.mark.parametrize("t", [1, 2, 3])
def test_dense_groups_of_an_odd_number_of_input_pairs(isa, t):
    # The dense form's group is any even size at the op: groups of 6 inputs (3 byte rows) leave
    # the avx2 unit's dx a last row pair after its blocks of 4 (1 token) or 2 (2 tokens), and
    # its forward a group that ends inside a slice's row walk.
    fwd, bwd, fwd_ref, bwd_ref = ops_of("dense")
    weight = weight_of("dense", 12, 20, 6, batch=2)
    x, dy = tokens(1, t, 12), tokens(1, t, 20, seed=2)
    assert_close(fwd(x, *weight, group_size=6), fwd_ref(x, *weight, group_size=6),
                 jnp.float32, 0.3 * scale_for(12), err_msg=f"{isa} forward")
    assert_close(bwd(dy, *weight, group_size=6, in_features=12),
                 bwd_ref(dy, *weight, group_size=6, in_features=12), jnp.float32,
                 0.3 * scale_for(20), err_msg=f"{isa} dx")
