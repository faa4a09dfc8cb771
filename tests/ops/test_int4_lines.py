"""The dense int4 form's CPU lines layout (jaxsparse.ops.int4_pack_lines) and its forward
primitive `int4_matmul_lines`: the packing against its definition and back, the kernel on every
ISA against the canonical reference (ragged blocks of 64 outputs, token blocks of 1-4 and their
tails, every group kind, every dtype), the gradient in x, batching, and bad lines refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.ops import (
    int4_matmul,
    int4_matmul_lines,
    int4_matmul_lines_reference,
    int4_matmul_reference,
    int4_pack_lines,
    int4_unpack_lines,
)
from tests._check import assert_close, once_after, scale_for
from tests.ops.test_int4 import dense_weight, tokens


@pytest.mark.parametrize("rows,n", [(1, 1), (3, 64), (2, 70), (5, 130)])
def test_pack_lines_places_each_byte_and_unpacks_bit_for_bit(rows, n):
    q = jnp.asarray(np.random.default_rng(n).integers(0, 256, (2, rows, n)), jnp.uint8)
    lines = jax.jit(int4_pack_lines)(q)
    blocks = -(-n // 64)
    assert lines.shape == (2, blocks * rows, 64) and lines.dtype == jnp.uint8
    want = np.zeros((2, blocks * rows, 64), np.uint8)
    for b in range(blocks):
        for r in range(rows):
            for j in range(4):
                for lane in range(16):
                    o = 64 * b + 16 * j + lane
                    if o < n:
                        want[:, b * rows + r, 4 * lane + j] = np.asarray(q)[:, r, o]
    np.testing.assert_array_equal(lines, want)
    np.testing.assert_array_equal(int4_unpack_lines(lines, out_features=n), q)


# (tokens, K, N, group): a ragged single vector, one whole block, a block and a ragged tail,
# token blocks 1-5 (the streaming kernel on the lines), one group per column, groups of 8; from
# 16 tokens the f32 panels and the bf16 tiles read the lines (RowBytes): a ragged k block
# (K = 200) and panel (N = 130), and for the tiles two k blocks of 512 and a ragged panel group.
# At 1 token with 4 pairs of blocks per worker or more, tasks of 128 outputs: a last pair of 66
# (two blocks, the second ragged) and of 26 outputs (one block). The dense form with a token per
# register (int4_pairs.h) takes f32 from 8 to 128 tokens and bf16 from 4 to 63 (vdpbf16ps, the
# units with AVX512-BF16): one chunk of 4 tokens and groups of 8, two chunks (9 + 8) with a last
# block of 2 outputs, 40 tokens in three bf16 chunks (14 + 14 + 12) and four f32 ones (of 10, the
# f32 passes taking 32 outputs and up to 12 tokens) with a ragged vector, and two f32 chunks of 12
# with a second vector of 4 outputs (N = 84); 64 bf16 tokens take the tiles again, 130 f32 ones
# the panels.
SHAPES = [(1, 64, 1, 32), (2, 128, 64, 64), (3, 256, 130, 128), (4, 64, 70, 8),
          (5, 392, 33, 392), (17, 200, 130, 8), (40, 1056, 290, 32), (1, 128, 1090, 64),
          (1, 64, 1050, 32), (64, 256, 130, 64), (130, 136, 70, 8)]
CASES = [(*s, jnp.float32) for s in SHAPES[:-2] + SHAPES[-1:]] + [
    (*s, dt) for s in (SHAPES[2], SHAPES[5], SHAPES[6], SHAPES[7])
    for dt in (jnp.bfloat16, jnp.float16)] + [
    (*s, jnp.bfloat16) for s in (SHAPES[3], SHAPES[9])] + [
    # The avx2 unit's slices (tests/ops/test_int4_kernels.py): a last task of one vector after a
    # 4 + 3 token split over one group, a slice of 3 vectors of 4 with a 4 + 2 split.
    (7, 8, 72, 8, jnp.float32), (6, 48, 24, 48, jnp.float16), (24, 144, 84, 16, jnp.float32)]


@pytest.mark.parametrize("t,k,n,group,dtype", once_after(CASES, keep=2))
def test_every_isa_against_the_reference(isa, t, k, n, group, dtype):
    qweight, scales = dense_weight(k, n, group, batch=2, dtype=dtype)
    x = tokens(1, t, k, dtype)
    lines = int4_pack_lines(qweight)
    y = int4_matmul_lines(x, lines, scales, group_size=group)
    assert y.shape == (2, t, n) and y.dtype == dtype
    want = int4_matmul_reference(x, qweight, scales, group_size=group)
    assert_close(y, want, dtype, 0.2 * scale_for(k), err_msg=isa)
    assert_close(int4_matmul_lines_reference(x, lines, scales, group_size=group), want, dtype,
                 0.2 * scale_for(k))


def test_gradient_in_x_is_the_canonical_ones_and_the_weight_is_frozen():
    qweight, scales = dense_weight(128, 70, 32)
    lines, x = int4_pack_lines(qweight), tokens(1, 3, 128)

    def loss(op, weight):
        return lambda x: jnp.sum(jnp.sin(op(x, *weight, group_size=32)))

    got = jax.jit(jax.grad(loss(int4_matmul_lines, (lines, scales))))(x)
    want = jax.grad(loss(int4_matmul, (qweight, scales)))(x)
    assert_close(got, want, jnp.float32, scale_for(70))
    with pytest.raises(ValueError, match="frozen"):
        jax.grad(lambda s: jnp.sum(int4_matmul_lines(x, lines, s, group_size=32)))(scales)


def test_vmap_over_tokens_and_over_weights():
    qweight, scales = dense_weight(64, 40, 32, batch=3)
    lines = int4_pack_lines(qweight)
    xs = tokens(4, 2, 64).reshape(4, 1, 2, 64)
    shared = jax.vmap(lambda x: int4_matmul_lines(x, lines[:1], scales[:1], group_size=32))(xs)
    want = jax.vmap(lambda x: int4_matmul(x, qweight[:1], scales[:1], group_size=32))(xs)
    assert_close(shared, want, jnp.float32, scale_for(64))
    per_weight = jax.vmap(lambda l, s: int4_matmul_lines(xs[0], l[None], s[None], group_size=32))(
        lines, scales)
    want = jax.vmap(lambda q, s: int4_matmul(xs[0], q[None], s[None], group_size=32))(
        qweight, scales)
    assert_close(per_weight, want, jnp.float32, scale_for(64))


def test_bad_lines_are_refused_by_name():
    qweight, scales = dense_weight(64, 70, 32)
    lines, x = int4_pack_lines(qweight), tokens(1, 2, 64)
    with pytest.raises(ValueError, match=r"lines must be uint8 \[Bw, ceil\(N/64\) K/2, 64\]"):
        int4_matmul_lines(x, qweight, scales, group_size=32)  # The canonical layout.
    with pytest.raises(ValueError, match="lines must be uint8"):
        int4_matmul_lines(x, lines.astype(jnp.int8), scales, group_size=32)
    with pytest.raises(ValueError, match="group_size must divide K"):
        int4_matmul_lines(x, lines, scales, group_size=24)
    with pytest.raises(ValueError, match="int4_unpack_lines"):
        int4_unpack_lines(lines, out_features=300)  # 5 blocks of 64 rows?
