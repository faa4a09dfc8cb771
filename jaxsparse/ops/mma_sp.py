"""Packing 2:4 weights for the sparse tensor cores (`mma.sp.m16n8k32`, cuda/nm_sp24.cuh).

The canonical 2:4 layout (docs/ffi_abi.md) already stores the packed A operand: row j holds the two
kept values of every group of 4 inputs, in position order. What the tensor cores need besides is the
metadata: per 16-row m-tile and 64-input k-tile, one 32-bit register per lane of a warp, laid out as
the PTX ISA reads it (KERNELS.md section 1.4):

- lane ``l = 4 g + 2 s + h`` (g = 0..7, k-step s = 0..1 = the sparsity selector, half h = 0..1)
  describes rows ``g`` (bits 0-15) and ``g + 8`` (bits 16-31) of the m-tile, inputs
  ``32 s + 16 h .. + 15`` of the k-tile;
- group ``c`` (4 inputs) of those 16 sits at bits ``4 c .. 4 c + 3``: the first kept position in
  bits 0-1, the second in bits 2-3, increasing (``mma.sp::ordered_metadata``).

So one coalesced 128-byte load per warp and k-tile gives every lane its register for two MMAs.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["pack_mma_sp_24"]

# Code of positions (0, 1): what padding rows and groups get, so every code the kernel reads is valid.
_PAD_CODE = 0b0100


def pack_mma_sp_24(values, indices):
    """The operands of the 2:4 tensor-core kernel, from canonical 2:4 values and indices.

    Pure and jittable. Positions of a group are made increasing and distinct: an entry whose position
    is >= 4 (possible only for unvalidated data under jit) contributes 0; two entries at the same
    position are summed into one; a group keeping fewer than two positions names the lowest free
    ones with value 0. For validated data (strictly increasing positions < 4) the values are
    returned unchanged.

    Args:
        values: `[..., N, K/2]` bfloat16 or float16, K a multiple of 16.
        indices: `[..., N, K/2]` uint8, positions inside each group of 4.

    Returns:
        `(values, metadata)`: values `[..., N, K/2]` of the same dtype, and metadata
        `[..., ceil(N/16), ceil(K/64), 32]` uint32.
    """
    *batch, n_out, kept = values.shape
    if indices.shape != values.shape:
        raise ValueError(
            f"pack_mma_sp_24: indices must have the shape of values {values.shape}, "
            f"got {indices.shape}"
        )
    if kept % 8:
        raise ValueError(f"pack_mma_sp_24: K/2 = values.shape[-1] must be a multiple of 8, got {kept}")
    groups = kept // 2
    pos = indices.reshape(*batch, n_out, groups, 2).astype(jnp.int32)
    val = values.reshape(*batch, n_out, groups, 2)
    first, second = _ordered_pair(pos, val)
    packed = jnp.stack([first[1], second[1]], axis=-1).reshape(values.shape)
    codes = (first[0] | (second[0] << 2)).astype(jnp.uint32)
    return packed, _metadata_words(codes)


def _ordered_pair(pos, val):
    """The two positions a group names (increasing) and their values: ((p0, v0), (p1, v1))."""
    slots = jnp.arange(4)
    hit = [(pos[..., e, None] == slots) for e in range(2)]  # [..., G, 4] each; positions >= 4 miss.
    zero = jnp.zeros((), val.dtype)
    both = hit[0] & hit[1]
    summed = (val[..., 0].astype(jnp.float32) + val[..., 1].astype(jnp.float32)).astype(val.dtype)
    slot_value = jnp.where(
        both, summed[..., None],
        jnp.where(hit[0], val[..., 0, None], jnp.where(hit[1], val[..., 1, None], zero)),
    )
    occupied = hit[0] | hit[1]
    # Fill up to two positions with the lowest free ones.
    missing = 2 - occupied.sum(-1, keepdims=True)
    free_rank = jnp.cumsum(~occupied, axis=-1)
    chosen = occupied | (~occupied & (free_rank <= missing))
    p0 = jnp.argmax(chosen, axis=-1)
    p1 = 3 - jnp.argmax(chosen[..., ::-1], axis=-1)
    v0 = jnp.take_along_axis(slot_value, p0[..., None], axis=-1)[..., 0]
    v1 = jnp.take_along_axis(slot_value, p1[..., None], axis=-1)[..., 0]
    return (p0, v0), (p1, v1)


def _metadata_words(codes):
    """[..., N, G] 4-bit codes -> [..., ceil(N/16), ceil(G/16), 32] registers (see module doc)."""
    *batch, n_out, groups = codes.shape
    m_tiles, k_tiles = -(-n_out // 16), -(-groups // 16)
    pad = [(0, 0)] * len(batch) + [(0, 16 * m_tiles - n_out), (0, 16 * k_tiles - groups)]
    codes = jnp.pad(codes, pad, constant_values=_PAD_CODE)
    # row = 16 i + 8 r + g, group = 16 p + 8 s + 4 h + c.
    codes = codes.reshape(*batch, m_tiles, 2, 8, k_tiles, 2, 2, 4)
    shifts = (16 * jnp.arange(2)[:, None, None, None, None, None]
              + 4 * jnp.arange(4)).astype(jnp.uint32)
    words = _sum_shifted(codes, shifts)
    # words: [..., i, g, p, s, h] -> lanes 4 g + 2 s + h.
    words = jnp.moveaxis(words, -4, -3)  # [..., i, p, g, s, h]
    return words.reshape(*batch, m_tiles, k_tiles, 32)


def _sum_shifted(codes, shifts):
    """OR of code << shift over the row half r (axis -6) and group c (axis -1); disjoint bits."""
    shifted = codes << shifts  # broadcast over [r, g, p, s, h, c]
    return jnp.sum(shifted, axis=(-6, -1), dtype=jnp.uint32)
