"""int4 weights in the CPU kernels' lines layouts: `Int4LinesWeight` and `Int4NMLinesWeight`, the
inference forms of `Int4Weight` and `Int4NMWeight` for CPUs.

`wq.with_lines()` packs a canonical `Int4Weight` once (pure, jittable:
`jaxsparse.ops.int4_pack_lines`). The layout keeps each block of 64 outputs' rows as one
sequential stream of 64-byte lines: a kernel task (64 outputs) then reads its weight the way the
hardware prefetchers follow, where the canonical `[in/2, out]` puts each of its rows on another
4 KB page. At a few tokens, where the product streams the weight, that is what bounds the call
(docs/cpu_speed_notes.md, int4 fourth round). The many-token kernels (f32 panels, bf16 tiles)
read the same lines, so `x @ wl` runs the kernel at every token count with no repacking.

The form is frozen like the canonical one (inference, or a frozen base under adapters): the
gradient in x works (its backward unpacks the lines to the canonical layout for the transposed
kernel), a gradient in the weight raises. `packed_for("cpu")` gives the canonical weight back bit
for bit; `todense()` unpacks and dequantises. int8 activations keep the canonical layout.

Both forms hold their lines as `[..., ceil(out/64), lines per block, 64]`: the kernels' stream,
block after block (the ops take it flattened to `[..., ceil(out/64) * lines per block, 64]`, the
same bytes), with the blocks and each block's inputs on axes of their own, so the weight splits
column-parallel by blocks and row-parallel by runs of each block's lines. Lines of the flat
shape (checkpoints of jaxsparse before 2026-12-07) are accepted and viewed as such.

The 2:4 form's lines (`jaxsparse.ops.int4_nm_pack_lines`) keep each block of 64 outputs' chunks of
16 inputs one after the other, a chunk's value bytes beside 4-bit indices of each kept value's
input in the chunk: the few-token kernel looks the inputs up in a vector of the chunk's x, with
about half the vector operations of the canonical 2-bit positions (docs/cpu_speed_notes.md, int4
ninth round).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsparse import _validate as V
from jaxsparse.formats._base import FROZEN
import numpy as np

from jaxsparse.formats.int4 import _SPARSE, Int4NMWeight, Int4Weight, _Int4Base, row_scales
from jaxsparse.sharding import Split
from jaxsparse.ops.int4 import (
    LINE_OUTPUTS,
    NM_CHUNK,
    int4_matmul_lines,
    int4_nm_matmul_lines,
    int4_nm_pack_lines,
    int4_nm_unpack_lines,
    int4_pack_lines,
    int4_unpack_lines,
)


class _LinesBase(_Int4Base):
    """What both lines forms share: the logical shape from the scales, and every view through
    the canonical weight (`_canonical`, unpacked)."""

    device = "cpu"

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.scales.shape[:-2], self.in_features, self.scales.shape[-1])

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.scales.shape[:-2])

    @property
    def out_features(self) -> int:
        return self.scales.shape[-1]

    def with_lines(self):
        return self

    def packed_for(self, device: str):
        """This weight in the layout of `device`: "cpu" the canonical form (bit for bit), "cuda"
        MARLIN's layout packed from it."""
        return self._canonical().packed_for(device)

    def todense(self) -> jax.Array:
        """`[..., in, out]` in `dtype`: the dequantised weight (unpacked first)."""
        return self._canonical().todense()

    def mask(self) -> jax.Array:
        return self._canonical().mask()

    @staticmethod
    def _blocked(lines, scales, per_block: int, where: str):
        """`lines` as `[..., ceil(out/64), per_block, 64]` uint8 for `scales [..., G, out]`,
        checked; the flat `[..., ceil(out/64) * per_block, 64]` of older checkpoints viewed so."""
        lines = V.as_array("lines", lines, where=where)
        if lines.dtype != jnp.uint8:
            raise TypeError(f"{where}: lines must be uint8 (packed nibbles), got "
                            f"{lines.dtype.name}")
        blocks = -(-scales.shape[-1] // LINE_OUTPUTS)
        lead = tuple(scales.shape[:-2])
        want = (*lead, blocks, per_block, LINE_OUTPUTS)
        if tuple(lines.shape) == (*lead, blocks * per_block, LINE_OUTPUTS):
            lines = _LinesBase._by_blocks(lines, per_block)  # The flat layout: the same bytes.
        if tuple(lines.shape) != want:
            raise ValueError(f"{where}: lines must have shape {want} ([..., ceil(out/64), "
                             f"{per_block} lines per block, 64] for the scales' "
                             f"{tuple(scales.shape)}); got {tuple(lines.shape)}")
        return lines

    @staticmethod
    def _by_blocks(flat, per_block: int):
        """The ops' flat lines `[..., ceil(out/64) * per_block, 64]` by blocks (`_flat`'s
        inverse)."""
        return flat.reshape(*flat.shape[:-2], -1, per_block, LINE_OUTPUTS)

    @staticmethod
    def _flat(lines):
        """The ops' view of the lines: `[..., ceil(out/64) * per_block, 64]`."""
        return lines.reshape(*lines.shape[:-3], -1, LINE_OUTPUTS)

    @staticmethod
    def _scales(scales, where):
        scales = V.as_array("scales", scales, where=where)
        if scales.ndim < 2:
            raise ValueError(f"{where}: scales must be [..., in/group, out]; got shape "
                             f"{tuple(scales.shape)}")
        return scales


class Int4LinesWeight(_LinesBase):
    """A dense int4 weight in the CPU lines layout (`Int4Weight.with_lines()`), logical shape
    `[..., in, out]`.

    Attributes:
        lines: `[..., ceil(out/64), in/2, 64]` uint8 (`jaxsparse.ops.int4_pack_lines`, a
            block of 64 outputs per entry of axis -3; frozen).
        scales: `[..., in/group, out]` float (frozen), as `Int4Weight`'s; its dtype is the
            weight's.
        group_size, sparsity (None), in_features: static, as `Int4Weight`'s.

    Example:
        >>> import jax.numpy as jnp, jaxsparse as jsp
        >>> wl = jsp.fromdense(jnp.ones((64, 8)), jsp.Int4(32)).with_lines()
        >>> wl.shape, wl.lines.shape, (jnp.ones((2, 64)) @ wl).shape
        ((64, 8), (1, 32, 64), (2, 8))
    """

    ARRAYS = (("lines", FROZEN), ("scales", FROZEN))

    def __init__(self, lines, scales, *, group_size: int | None, sparsity=None, activations=None,
                 in_features: int):
        where = "jaxsparse.Int4LinesWeight"
        spec, in_features = Int4Weight._check_spec(group_size, sparsity, in_features, where,
                                                   activations)
        if spec.activations:
            raise ValueError(f"{where}: int8 activations read the canonical layout; got "
                             f"activations={spec.activations!r}")
        scales = self._scales(scales, where)
        out = scales.shape[-1]
        lines = self._blocked(lines, scales, in_features // 2, where)
        group = spec.group_for(in_features)
        self.scales = self._check_scales(scales, (in_features // group, out), lines.shape[:-3],
                                         where)
        self.lines = lines
        self.group_size, self.sparsity, self.in_features = spec.group_size, None, in_features
        self.activations = None

    @classmethod
    def from_canonical(cls, wq: Int4Weight) -> "Int4LinesWeight":
        """Pack `wq` (pure, jittable)."""
        where = "jaxsparse.Int4Weight.with_lines"
        if not isinstance(wq, Int4Weight):
            raise TypeError(f"{where}: the lines hold a dense int4 weight (Int4Weight); got "
                            f"{type(wq).__name__}")
        if wq.activations:
            raise ValueError(f"{where}: int8 activations read the canonical layout; the lines "
                             f"multiply float activations (use a weight without "
                             f"activations='int8')")
        lines = cls._by_blocks(int4_pack_lines(wq.qweight), wq.in_features // 2)
        return cls._unflatten(wq._aux, (lines, wq.scales))

    def _canonical(self) -> Int4Weight:
        qweight = int4_unpack_lines(self._flat(self.lines), out_features=self.out_features)
        return Int4Weight._unflatten(self._aux, (qweight, self.scales))

    def _kernel(self, x, lines, scales):
        return int4_matmul_lines(x, self._flat(lines), scales, group_size=self.group)

    def _shard_splits(self, mode: str):
        """Column parallel: blocks of 64 outputs. Row parallel: each block's lines, one per
        pair of inputs, in whole scale groups."""
        return _lines_splits(self, mode, 1, 2)


class Int4NMLinesWeight(_LinesBase):
    """An int4 + 2:4 weight in the CPU lines layout (`Int4NMWeight.with_lines()`), logical shape
    `[..., in, out]`.

    Attributes:
        lines: `[..., ceil(out/64), ceil(in/16) 8, 64]` uint8 (`jaxsparse.ops.int4_nm_pack_lines`;
            frozen): per block of 64 outputs and chunk of 16 inputs, 4 lines of value bytes and 4
            of indices `4 j + p` of the kept values' inputs in the chunk.
        scales: `[..., in/group, out]` float (frozen), as `Int4NMWeight`'s; its dtype is the
            weight's.
        group_size, sparsity (`NM(2, 4)`), in_features: static, as `Int4NMWeight`'s.

    Example:
        >>> import jax.numpy as jnp, jaxsparse as jsp
        >>> spec = jsp.Int4(32, sparsity=jsp.NM(2, 4))
        >>> wl = jsp.fromdense(jnp.ones((64, 8)), spec).with_lines()
        >>> wl.shape, wl.lines.shape, (jnp.ones((2, 64)) @ wl).shape
        ((64, 8), (1, 32, 64), (2, 8))
    """

    ARRAYS = (("lines", FROZEN), ("scales", FROZEN))

    def __init__(self, lines, scales, *, group_size: int | None, sparsity=_SPARSE,
                 activations=None, in_features: int):
        where = "jaxsparse.Int4NMLinesWeight"
        spec, in_features = Int4NMWeight._check_spec(group_size, sparsity, in_features, where,
                                                     activations)
        scales = self._scales(scales, where)
        out = scales.shape[-1]
        lines = self._blocked(lines, scales, _nm_lines_per_block(in_features), where)
        if V.is_concrete(lines):
            _check_nm_indices(np.asarray(lines), where)
        group = spec.group_for(in_features)
        self.scales = self._check_scales(scales, (in_features // group, out), lines.shape[:-3],
                                         where)
        self.lines = lines
        self.group_size, self.sparsity, self.in_features = spec.group_size, spec.sparsity, \
            in_features
        self.activations = None

    @classmethod
    def from_canonical(cls, wq: Int4NMWeight) -> "Int4NMLinesWeight":
        """Pack `wq` (pure, jittable)."""
        if not isinstance(wq, Int4NMWeight):
            raise TypeError(f"jaxsparse.Int4NMWeight.with_lines: these lines hold an int4 + 2:4 "
                            f"weight (Int4NMWeight); got {type(wq).__name__}")
        lines = cls._by_blocks(int4_nm_pack_lines(wq.qweight, wq.positions),
                               _nm_lines_per_block(wq.in_features))
        return cls._unflatten(wq._aux, (lines, wq.scales))

    def _canonical(self) -> Int4NMWeight:
        qweight, positions = int4_nm_unpack_lines(self._flat(self.lines),
                                                  in_features=self.in_features,
                                                  out_features=self.out_features)
        return Int4NMWeight._unflatten(self._aux, (qweight, positions, self.scales))

    def _kernel(self, x, lines, scales):
        return int4_nm_matmul_lines(x, self._flat(lines), scales, group_size=self.group)

    def _shard_splits(self, mode: str):
        """Column parallel: blocks of 64 outputs. Row parallel: each block's chunks of 16
        inputs (8 lines each), in whole scale groups."""
        return _lines_splits(self, mode, 8, NM_CHUNK)


def _nm_lines_per_block(in_features: int) -> int:
    """Lines of one block of 64 outputs in the int4 + 2:4 layout: 8 per chunk of 16 inputs."""
    return -(-in_features // NM_CHUNK) * 8


def _lines_splits(w, mode, lines, inputs):
    """Column parallel: `lines [..., blocks, per block, 64]` by blocks, scales by columns. Row
    parallel: each block's lines in runs of `lines` lines holding `inputs` inputs, and the
    scales by rows of groups."""
    if mode == "column":
        return {"lines": Split(-3, 1, LINE_OUTPUTS), "scales": Split(-1, 1, 1)}
    return {"lines": Split(-2, lines, inputs), "scales": row_scales(w)}


def _check_nm_indices(lines: np.ndarray, where: str) -> None:
    """Every index byte of the 2:4 lines is `(4 j + p0) | (4 j + p1) << 4` with j its byte of the
    dword and p0 < p1 (what the pack writes: the kernel looks `4 j + p` up in the chunk, the
    unpack keeps p)."""
    index = lines.reshape(*lines.shape[:-3], -1, 8, 16, 4)[..., 4:, :, :].astype(np.int32)
    slot = np.arange(4)
    p0, p1 = index & 3, (index >> 4) & 3
    good = (((index >> 2) & 3) == slot) & (((index >> 6) & 3) == slot) & (p0 < p1)
    if not good.all():
        first = tuple(int(i) for i in np.argwhere(~good)[0])
        raise ValueError(f"{where}: lines hold an index byte that is not (4 j + p0) | "
                         f"(4 j + p1) << 4 with p0 < p1 (int4_nm_pack_lines's layout), at "
                         f"[..., chunk line, lane, j] {first}")
