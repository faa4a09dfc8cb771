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

The 2:4 form's lines (`jaxsparse.ops.int4_nm_pack_lines`) keep each block of 64 outputs' chunks of
16 inputs one after the other, a chunk's value bytes beside 4-bit indices of each kept value's
input in the chunk: the few-token kernel looks the inputs up in a vector of the chunk's x, with
about half the vector operations of the canonical 2-bit positions (docs/cpu_speed_notes.md, int4
ninth round).
"""

from __future__ import annotations

import jax

from jaxsparse import _validate as V
from jaxsparse.formats._base import FROZEN
import numpy as np

from jaxsparse.formats.int4 import _SPARSE, Int4NMWeight, Int4Weight, _Int4Base
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
        lines: `[..., ceil(out/64) in/2, 64]` uint8 (`jaxsparse.ops.int4_pack_lines`; frozen).
        scales: `[..., in/group, out]` float (frozen), as `Int4Weight`'s; its dtype is the
            weight's.
        group_size, sparsity (None), in_features: static, as `Int4Weight`'s.

    Example:
        >>> import jax.numpy as jnp, jaxsparse as jsp
        >>> wl = jsp.fromdense(jnp.ones((64, 8)), jsp.Int4(32)).with_lines()
        >>> wl.shape, wl.lines.shape, (jnp.ones((2, 64)) @ wl).shape
        ((64, 8), (32, 64), (2, 8))
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
        rows = -(-out // LINE_OUTPUTS) * (in_features // 2)
        lines = self._check_uint8("lines", lines, (rows, LINE_OUTPUTS), where)
        group = spec.group_for(in_features)
        self.scales = self._check_scales(scales, (in_features // group, out), lines.shape[:-2],
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
        return cls._unflatten(wq._aux, (int4_pack_lines(wq.qweight), wq.scales))

    def _canonical(self) -> Int4Weight:
        qweight = int4_unpack_lines(self.lines, out_features=self.out_features)
        return Int4Weight._unflatten(self._aux, (qweight, self.scales))

    def _kernel(self, x, lines, scales):
        return int4_matmul_lines(x, lines, scales, group_size=self.group)

    def _shard_splits(self, mode: str):
        """Column parallel: each block of 64 outputs is `in/2` consecutive lines. No row
        parallel split: a block's lines run over all its inputs."""
        return _lines_splits(self, mode, self.in_features // 2)


class Int4NMLinesWeight(_LinesBase):
    """An int4 + 2:4 weight in the CPU lines layout (`Int4NMWeight.with_lines()`), logical shape
    `[..., in, out]`.

    Attributes:
        lines: `[..., ceil(out/64) ceil(in/16) 8, 64]` uint8 (`jaxsparse.ops.int4_nm_pack_lines`;
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
        ((64, 8), (32, 64), (2, 8))
    """

    ARRAYS = (("lines", FROZEN), ("scales", FROZEN))

    def __init__(self, lines, scales, *, group_size: int | None, sparsity=_SPARSE,
                 activations=None, in_features: int):
        where = "jaxsparse.Int4NMLinesWeight"
        spec, in_features = Int4NMWeight._check_spec(group_size, sparsity, in_features, where,
                                                     activations)
        scales = self._scales(scales, where)
        out = scales.shape[-1]
        rows = -(-out // LINE_OUTPUTS) * _nm_lines_per_block(in_features)
        lines = self._check_uint8("lines", lines, (rows, LINE_OUTPUTS), where)
        if V.is_concrete(lines):
            _check_nm_indices(np.asarray(lines), where)
        group = spec.group_for(in_features)
        self.scales = self._check_scales(scales, (in_features // group, out), lines.shape[:-2],
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
        lines = int4_nm_pack_lines(wq.qweight, wq.positions)
        return cls._unflatten(wq._aux, (lines, wq.scales))

    def _canonical(self) -> Int4NMWeight:
        qweight, positions = int4_nm_unpack_lines(self.lines, in_features=self.in_features,
                                                  out_features=self.out_features)
        return Int4NMWeight._unflatten(self._aux, (qweight, positions, self.scales))

    def _kernel(self, x, lines, scales):
        return int4_nm_matmul_lines(x, lines, scales, group_size=self.group)

    def _shard_splits(self, mode: str):
        """Column parallel: each block of 64 outputs is `ceil(in/16) * 8` consecutive lines.
        No row parallel split: a block's lines run over all its inputs."""
        return _lines_splits(self, mode, _nm_lines_per_block(self.in_features))


def _nm_lines_per_block(in_features: int) -> int:
    """Lines of one block of 64 outputs in the int4 + 2:4 layout: 8 per chunk of 16 inputs."""
    return -(-in_features // NM_CHUNK) * 8


def _lines_splits(w, mode, lines_per_block):
    if mode == "row":
        return ("each block of 64 outputs stores its lines over all inputs; row parallel needs "
                "the canonical weight (w.packed_for('cpu'))")
    return {"lines": Split(-2, lines_per_block, LINE_OUTPUTS), "scales": Split(-1, 1, 1)}


def _check_nm_indices(lines: np.ndarray, where: str) -> None:
    """Every index byte of the 2:4 lines is `(4 j + p0) | (4 j + p1) << 4` with j its byte of the
    dword and p0 < p1 (what the pack writes: the kernel looks `4 j + p` up in the chunk, the
    unpack keeps p)."""
    index = lines.reshape(*lines.shape[:-2], -1, 8, 16, 4)[..., 4:, :, :].astype(np.int32)
    slot = np.arange(4)
    p0, p1 = index & 3, (index >> 4) & 3
    good = (((index >> 2) & 3) == slot) & (((index >> 6) & 3) == slot) & (p0 < p1)
    if not good.all():
        first = tuple(int(i) for i in np.argwhere(~good)[0])
        raise ValueError(f"{where}: lines hold an index byte that is not (4 j + p0) | "
                         f"(4 j + p1) << 4 with p0 < p1 (int4_nm_pack_lines's layout), at "
                         f"[..., chunk line, lane, j] {first}")
