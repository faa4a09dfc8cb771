"""The int4 + 2:4 form's CPU lines layout (jaxsparse.ops.int4_nm_pack_lines) and its forward
primitive `int4_nm_matmul_lines`: the packing against its definition and back (padding in K and
N), the kernel on every ISA against the canonical reference (one- and two-block tasks, token
blocks of 1-4 and their tails, the f32 panels and the bf16 tiles from 16 tokens, scale groups
that end inside a chunk, a ragged last chunk), unsorted positions, the gradient in x, batching,
and bad lines refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.ops import (
    int4_nm_matmul,
    int4_nm_matmul_lines,
    int4_nm_matmul_lines_reference,
    int4_nm_matmul_reference,
    int4_nm_pack_lines,
    int4_nm_unpack_lines,
)
from jaxsparse.ops.int4 import unpack_positions
from tests._check import assert_close, once_after, scale_for
from tests.ops.test_int4 import sparse_weight, tokens

# No CUDA kernel reads these (CPU layouts, or the layout model): the emulated pass skips them.
pytestmark = pytest.mark.cpu_only


@pytest.mark.parametrize("k,n", [(8, 1), (16, 64), (24, 70), (72, 130)])
def test_pack_places_each_value_and_index_and_unpacks_bit_for_bit(k, n):
    qweight, positions, _ = sparse_weight(k, n, 8, batch=2, seed=k + n)
    lines = jax.jit(int4_nm_pack_lines)(qweight, positions)
    blocks, chunks = -(-n // 64), -(-k // 16)
    assert lines.shape == (2, blocks * chunks * 8, 64) and lines.dtype == jnp.uint8
    q, (p0, p1) = np.asarray(qweight), (np.asarray(p) for p in unpack_positions(positions, k // 4))
    want = np.empty((2, blocks * chunks * 8, 64), np.uint8)
    for b in range(blocks):
        for c in range(chunks):
            for v in range(4):
                for lane in range(16):
                    for j in range(4):
                        g, o, row = 4 * c + j, 64 * b + 16 * v + lane, 8 * (b * chunks + c) + v
                        inside = g < k // 4 and o < n
                        want[:, row, 4 * lane + j] = q[:, g, o] if inside else 0x88
                        pair = (p0[:, g, o], p1[:, g, o]) if inside else (0, 1)
                        want[:, row + 4, 4 * lane + j] = (4 * j + pair[0]) | (4 * j + pair[1]) << 4
    np.testing.assert_array_equal(lines, want)
    back_q, back_p = int4_nm_unpack_lines(lines, in_features=k, out_features=n)
    np.testing.assert_array_equal(back_q, qweight)
    np.testing.assert_array_equal(back_p, positions)


# (tokens, K, N, group): a ragged single vector, a block, a block and a ragged tail, token blocks
# 1-5 (the lookup kernel, which f32 and f16 take at every token count, in block-major order past
# 4 tokens), one group per column over a ragged last chunk (K = 40, 392), groups of 8 that end
# inside a chunk, 17 and 40 tokens (bf16: the lookup kernel, then the tiles decoding the lines,
# two k blocks of 512 and a ragged panel group); at 1 token with 4 pairs of blocks per worker or
# more, tasks of 128 outputs: a last pair of 66 outputs (two blocks, the second ragged) and of 26
# (one block).
SHAPES = [(1, 64, 1, 32), (2, 128, 64, 64), (3, 256, 130, 128), (4, 40, 70, 8),
          (5, 392, 33, 392), (1, 40, 70, 40), (17, 200, 130, 8), (40, 1056, 290, 32),
          (1, 128, 1090, 64), (1, 64, 1050, 32), (130, 136, 70, 8)]
CASES = [(*s, jnp.float32) for s in SHAPES] + [
    (*s, dt) for s in (SHAPES[2], SHAPES[3], SHAPES[6], SHAPES[7])
    for dt in (jnp.bfloat16, jnp.float16)] + [
    # The avx2 unit's slices (4 vectors of 8 at 1 token, 2 at 2, 1 at 3 and 4): one pair of groups
    # (K = 8) and a last task of one vector after a 4 + 3 token split; 3 vectors at 2 tokens.
    (7, 8, 72, 8, jnp.float32), (2, 48, 24, 48, jnp.bfloat16)]


@pytest.mark.parametrize("t,k,n,group,dtype", once_after(CASES, keep=2))
def test_every_isa_against_the_reference(isa, t, k, n, group, dtype):
    qweight, positions, scales = sparse_weight(k, n, group, batch=2, dtype=dtype)
    x = tokens(1, t, k, dtype)
    lines = int4_nm_pack_lines(qweight, positions)
    y = int4_nm_matmul_lines(x, lines, scales, group_size=group)
    assert y.shape == (2, t, n) and y.dtype == dtype
    want = int4_nm_matmul_reference(x, qweight, positions, scales, group_size=group)
    assert_close(y, want, dtype, 0.2 * scale_for(k), err_msg=isa)
    assert_close(int4_nm_matmul_lines_reference(x, lines, scales, group_size=group), want, dtype,
                 0.2 * scale_for(k))


def test_unsorted_positions_add_where_they_land():
    """Positions that repeat or are out of order (unvalidated data) keep the reference's meaning:
    each value added at its input, in the lines as in the canonical kernel."""
    qweight, positions, scales = sparse_weight(64, 70, 32, sorted_positions=False)
    x = tokens(1, 3, 64)
    y = int4_nm_matmul_lines(x, int4_nm_pack_lines(qweight, positions), scales, group_size=32)
    want = int4_nm_matmul_reference(x, qweight, positions, scales, group_size=32)
    assert_close(y, want, jnp.float32, 0.2 * scale_for(64))


def test_gradient_in_x_is_the_canonical_ones_and_the_weight_is_frozen():
    qweight, positions, scales = sparse_weight(128, 70, 32)
    lines, x = int4_nm_pack_lines(qweight, positions), tokens(1, 3, 128)

    def loss(op, weight):
        return lambda x: jnp.sum(jnp.sin(op(x, *weight, group_size=32)))

    got = jax.jit(jax.grad(loss(int4_nm_matmul_lines, (lines, scales))))(x)
    want = jax.grad(loss(int4_nm_matmul, (qweight, positions, scales)))(x)
    assert_close(got, want, jnp.float32, scale_for(70))
    with pytest.raises(ValueError, match="frozen"):
        jax.grad(lambda s: jnp.sum(int4_nm_matmul_lines(x, lines, s, group_size=32)))(scales)


def test_vmap_over_tokens_and_over_weights():
    qweight, positions, scales = sparse_weight(64, 40, 32, batch=3)
    lines = int4_nm_pack_lines(qweight, positions)
    xs = tokens(4, 2, 64).reshape(4, 1, 2, 64)
    shared = jax.vmap(lambda x: int4_nm_matmul_lines(x, lines[:1], scales[:1], group_size=32))(xs)
    want = jax.vmap(lambda x: int4_nm_matmul(x, qweight[:1], positions[:1], scales[:1],
                                             group_size=32))(xs)
    assert_close(shared, want, jnp.float32, scale_for(64))
    per_weight = jax.vmap(
        lambda l, s: int4_nm_matmul_lines(xs[0], l[None], s[None], group_size=32))(lines, scales)
    want = jax.vmap(lambda q, p, s: int4_nm_matmul(xs[0], q[None], p[None], s[None],
                                                   group_size=32))(qweight, positions, scales)
    assert_close(per_weight, want, jnp.float32, scale_for(64))


def test_bad_lines_are_refused_by_name():
    qweight, positions, scales = sparse_weight(64, 70, 32)
    lines, x = int4_nm_pack_lines(qweight, positions), tokens(1, 2, 64)
    with pytest.raises(ValueError, match=r"lines must be uint8 \[Bw, ceil\(N/64\) ceil\(K/16\) 8"):
        int4_nm_matmul_lines(x, qweight, scales, group_size=32)  # The canonical layout.
    with pytest.raises(ValueError, match="lines must be uint8"):
        int4_nm_matmul_lines(x, lines.astype(jnp.int8), scales, group_size=32)
    with pytest.raises(ValueError, match="group_size must divide K"):
        int4_nm_matmul_lines(x, lines, scales, group_size=24)
    with pytest.raises(ValueError, match="int4_nm_unpack_lines"):
        int4_nm_unpack_lines(lines, in_features=128, out_features=70)
