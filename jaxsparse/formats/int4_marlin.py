"""int4 weights in the MARLIN CUDA kernels' device layout: `Int4MarlinWeight` (dense int4) and
`Int4NMMarlinWeight` (int4 + 2:4, Sparse-MARLIN's scheme).

`wq.packed_for("cuda")` packs a canonical `Int4Weight` / `Int4NMWeight` once (pure, jittable:
`jaxsparse.ops.marlin_pack`, `marlin_nm_pack`); `x @ wp` then runs the CUDA kernel on every call
with no repacking. `wp.packed_for("cpu")` gives the canonical weight back, bit for bit
(`marlin_unpack`): conversions lose nothing.

A device layout runs where it was packed for. Multiplying a CUDA-packed weight in a program lowered
for the CPU raises a ValueError that says so (under `JAXSPARSE_EMULATE_CUDA=1` the CPU runs the
CUDA kernel through the SIMT emulator instead); there is no silent unpacking per call. `todense()`
unpacks (for inspection, anywhere).

The layout supports what the tensor cores take: one weight (no stack), `in` a multiple of 64
(dense) or 128 (2:4), `out` a multiple of 64, groups a multiple of 16 (dense) or 32 (2:4) or one
per output column, bf16 or f16 scales (and activations). Other canonical weights stay on the
CPU layout: `packed_for("cuda")` raises naming what does not fit.
"""

from __future__ import annotations

import jax

from jaxsparse import _validate as V
from jaxsparse.formats._base import FROZEN
from jaxsparse.formats.int4 import (
    _SPARSE,
    Int4NMWeight,
    Int4Weight,
    _Int4Base,
    _check_finite_scales,
)
from jaxsparse.ops.int4_marlin import (
    MARLIN_NM_TILE_K,
    MARLIN_TILE_K,
    MARLIN_TILE_N,
    check_marlin_arrays,
    int4_marlin_matmul,
    int4_nm_marlin_matmul,
    marlin_nm_pack,
    marlin_nm_unpack,
    marlin_pack,
    marlin_unpack,
)
from jaxsparse.sharding import Split

DEVICES = ("cpu", "cuda")


def check_device(device, where: str) -> str:
    """`device` as one of `DEVICES`, or a ValueError naming it."""
    if device not in DEVICES:
        raise ValueError(f"{where}: device must be one of {DEVICES}; got {device!r}")
    return device


class _MarlinBase(_Int4Base):
    """What both device-layout forms share: the logical shape from the scales, no stacks, the
    kernel on every path."""

    device = "cuda"

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.in_features, self.packed_scales.shape[-1])

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return ()

    @property
    def out_features(self) -> int:
        return self.packed_scales.shape[-1]

    @property
    def dtype(self):
        return self.packed_scales.dtype

    def astype(self, dtype):
        """The canonical weight's `astype`, packed again (bf16 or f16 only)."""
        return self.packed_for("cpu").astype(dtype).packed_for("cuda")

    def packed_for(self, device: str):
        """This weight in the layout of `device` ("cpu": the canonical form, bit for bit)."""
        if check_device(device, f"jaxsparse.{type(self).__name__}.packed_for") == "cuda":
            return self
        return self._canonical()

    def todense(self) -> jax.Array:
        """`[in, out]` in `dtype`: the dequantised weight (unpacked first)."""
        return self._canonical().todense()

    def mask(self) -> jax.Array:
        return self._canonical().mask()

    def _matmul(self, x, path: str):
        """The device kernel whatever the path: a device layout is never unpacked per call."""
        del path
        return self._sparse_product(x)

    def _shard_splits(self, mode: str):
        """Column parallel: each row of the packed arrays (one k-tile) holds its 64-column
        blocks one after the other (128 words of packed_qweight, 64 of packed_meta; the scales
        permuted inside 64 columns), so a shard of whole 64-column blocks holds exactly the
        layout of its columns. Row parallel: packed rows of 16 inputs (32 at 2:4), a shard
        holding whole pipeline stages (64 inputs, 128 at 2:4: the kernel's K tile) and whole
        groups of the scales; one scale per column (`group_size=None`) stays whole on every
        shard."""
        sparse = self.sparsity is not None
        if mode == "column":
            blocks = Split(-1, MARLIN_TILE_N, MARLIN_TILE_N)
            splits = {"packed_qweight": Split(-1, 2 * MARLIN_TILE_N, MARLIN_TILE_N),
                      "packed_scales": blocks}
            return {**splits, "packed_meta": blocks} if sparse else splits
        stage = Split(-2, 4, MARLIN_NM_TILE_K if sparse else MARLIN_TILE_K)  # 4 packed rows.
        scales = None if self.group_size is None else Split(-2, 1, self.group_size)
        splits = {"packed_qweight": stage, "packed_scales": scales}
        return {**splits, "packed_meta": stage} if sparse else splits

    @classmethod
    def _check(cls, arrays: dict, group_size, sparsity, activations, in_features):
        """`(spec, arrays as jax arrays)` once the packed `arrays` and the spec are valid (the
        constructors), else an exception naming what is wrong."""
        where = f"jaxsparse.{cls.__name__}"
        canonical = Int4NMWeight if "packed_meta" in arrays else Int4Weight
        spec, in_features = canonical._check_spec(group_size, sparsity, in_features, where,
                                                  activations)
        if spec.activations:
            raise ValueError(f"{where}: int8 activations run on the CPU kernels only; got "
                             f"activations={spec.activations!r}")
        arrays = {name: V.as_array(name, a, where=where) for name, a in arrays.items()}
        k, _ = check_marlin_arrays(where, arrays["packed_qweight"], arrays["packed_scales"],
                                   spec.group_size, arrays.get("packed_meta"))
        if k != in_features:
            raise ValueError(f"{where}: packed_qweight holds in_features = {k}; got "
                             f"in_features={in_features}")
        _check_finite_scales("packed_scales", arrays["packed_scales"], where)
        return spec, arrays


class Int4MarlinWeight(_MarlinBase):
    """A dense int4 weight in MARLIN's device layout (`Int4Weight.packed_for("cuda")`).

    Attributes:
        packed_qweight: `[in/16, 2 out]` int32 (`jaxsparse.ops.marlin_pack`; frozen).
        packed_scales: the scales `[in/group, out]` (or `[1, out]`), bf16/f16, permuted (frozen).
        group_size, sparsity (None), in_features: static, as `Int4Weight`'s.
    """

    ARRAYS = (("packed_qweight", FROZEN), ("packed_scales", FROZEN))

    def __init__(self, packed_qweight, packed_scales, *, group_size: int | None, sparsity=None,
                 activations=None, in_features: int):
        spec, arrays = self._check({"packed_qweight": packed_qweight,
                                    "packed_scales": packed_scales},
                                   group_size, sparsity, activations, in_features)
        self.packed_qweight, self.packed_scales = arrays["packed_qweight"], arrays["packed_scales"]
        self.group_size, self.sparsity, self.in_features = spec.group_size, None, in_features
        self.activations = None

    @classmethod
    def from_canonical(cls, wq: Int4Weight) -> "Int4MarlinWeight":
        """Pack `wq` (pure, jittable); its shape must fit the layout (module docstring)."""
        _check_single(wq, "jaxsparse.Int4Weight.packed_for")
        packed = marlin_pack(wq.qweight, wq.scales, group_size=wq.group_size)
        return cls._unflatten(wq._aux, packed)

    def _canonical(self) -> Int4Weight:
        qweight, scales = marlin_unpack(self.packed_qweight, self.packed_scales,
                                        group_size=self.group_size)
        return Int4Weight._unflatten(self._aux, (qweight, scales))

    def _kernel(self, x, packed_qweight, packed_scales):
        return int4_marlin_matmul(x[0], packed_qweight[0], packed_scales[0],
                                  group_size=self.group_size)[None]


class Int4NMMarlinWeight(_MarlinBase):
    """An int4 + 2:4 weight in the Sparse-MARLIN kernel's device layout
    (`Int4NMWeight.packed_for("cuda")`).

    Attributes:
        packed_qweight: `[in/32, 2 out]` int32, packed_meta `[in/32, out]` int32 (the mma.sp
            metadata registers), packed_scales as `Int4MarlinWeight`'s (all frozen;
            `jaxsparse.ops.marlin_nm_pack`).
        group_size, sparsity (`NM(2, 4)`), in_features: static.
    """

    ARRAYS = (("packed_qweight", FROZEN), ("packed_meta", FROZEN), ("packed_scales", FROZEN))

    def __init__(self, packed_qweight, packed_meta, packed_scales, *, group_size: int | None,
                 sparsity=_SPARSE, activations=None, in_features: int):
        spec, arrays = self._check({"packed_qweight": packed_qweight, "packed_meta": packed_meta,
                                    "packed_scales": packed_scales},
                                   group_size, sparsity, activations, in_features)
        self.packed_qweight, self.packed_meta = arrays["packed_qweight"], arrays["packed_meta"]
        self.packed_scales = arrays["packed_scales"]
        self.group_size, self.sparsity, self.in_features = spec.group_size, _SPARSE, in_features
        self.activations = None

    @classmethod
    def from_canonical(cls, wq: Int4NMWeight) -> "Int4NMMarlinWeight":
        """Pack `wq` (pure, jittable); its shape must fit the layout (module docstring)."""
        _check_single(wq, "jaxsparse.Int4NMWeight.packed_for")
        packed = marlin_nm_pack(wq.qweight, wq.positions, wq.scales, group_size=wq.group_size)
        return cls._unflatten(wq._aux, packed)

    def _canonical(self) -> Int4NMWeight:
        qweight, positions, scales = marlin_nm_unpack(
            self.packed_qweight, self.packed_meta, self.packed_scales, group_size=self.group_size)
        return Int4NMWeight._unflatten(self._aux, (qweight, positions, scales))

    def _kernel(self, x, packed_qweight, packed_meta, packed_scales):
        return int4_nm_marlin_matmul(x[0], packed_qweight[0], packed_meta[0], packed_scales[0],
                                     group_size=self.group_size)[None]


def _check_single(wq, where: str) -> None:
    if wq.batch_shape:
        raise ValueError(f"{where}: the CUDA layout holds one weight [in, out]; got a stack of "
                         f"shape {wq.shape} (pack each weight of the stack on its own)")


def packed_for(wq, device: str):
    """A canonical int4 weight in the layout of `device` ("cpu": itself)."""
    where = f"jaxsparse.{type(wq).__name__}.packed_for"
    if check_device(device, where) == "cpu":
        return wq
    if wq.activations:
        raise ValueError(f"{where}: int8 activations run on the CPU kernels only; the CUDA "
                         f"layout multiplies bf16/f16 activations (use wq.spec without "
                         f"activations='int8': jaxsparse.Int4(group_size, sparsity))")
    cls = Int4NMMarlinWeight if isinstance(wq, Int4NMWeight) else Int4MarlinWeight
    return cls.from_canonical(wq)
