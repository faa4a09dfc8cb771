"""A dense int4 weight in the CPU kernels' lines layout: `Int4LinesWeight`, the inference form of
`Int4Weight` for CPUs.

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
for bit; `todense()` unpacks and dequantises. int8 activations and the 2:4 form keep the canonical
layout.
"""

from __future__ import annotations

import jax

from jaxsparse import _validate as V
from jaxsparse.formats._base import FROZEN
from jaxsparse.formats.int4 import Int4Weight, _Int4Base
from jaxsparse.ops.int4 import (
    LINE_OUTPUTS,
    int4_matmul_lines,
    int4_pack_lines,
    int4_unpack_lines,
)


class Int4LinesWeight(_Int4Base):
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
    device = "cpu"

    def __init__(self, lines, scales, *, group_size: int | None, sparsity=None, activations=None,
                 in_features: int):
        where = "jaxsparse.Int4LinesWeight"
        spec, in_features = Int4Weight._check_spec(group_size, sparsity, in_features, where,
                                                   activations)
        if spec.activations:
            raise ValueError(f"{where}: int8 activations read the canonical layout; got "
                             f"activations={spec.activations!r}")
        scales = V.as_array("scales", scales, where=where)
        if scales.ndim < 2:
            raise ValueError(f"{where}: scales must be [..., in/group, out]; got shape "
                             f"{tuple(scales.shape)}")
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

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.scales.shape[:-2], self.in_features, self.scales.shape[-1])

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.scales.shape[:-2])

    @property
    def out_features(self) -> int:
        return self.scales.shape[-1]

    def with_lines(self) -> "Int4LinesWeight":
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

    def _canonical(self) -> Int4Weight:
        qweight = int4_unpack_lines(self.lines, out_features=self.out_features)
        return Int4Weight._unflatten(self._aux, (qweight, self.scales))

    def _kernel(self, x, lines, scales):
        return int4_matmul_lines(x, lines, scales, group_size=self.group)
