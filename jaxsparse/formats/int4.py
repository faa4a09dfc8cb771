"""int4 weights with group scales (MARLIN), dense or 2:4 sparse (Sparse-MARLIN): `Int4`,
`Int4Weight`, `Int4NMWeight`.

`jaxsparse.fromdense(w, jaxsparse.Int4(128))` quantises a weight `[..., in, out]` by symmetric
round-to-nearest: per output column and group of `group_size` consecutive inputs, the scale is
`max |w| / 7` and each weight becomes the integer `round(w / scale)` in [-8, 7] (RTN gives
[-7, 7]; -8 is there for GPTQ's codes). `Int4(128, sparsity=NM(2, 4))` first keeps the 2 largest
of every 4 inputs, then quantises the kept values the same way (the group's scale over its kept
values). `todense()` dequantises; `x @ w` multiplies.

Canonical storage (device-neutral; checkpoints hold exactly this: about half a byte per weight
plus the scales), in Flax's `[in, out]` orientation so that each input's row of outputs is
contiguous (what vector kernels with outputs in lanes stream):

- `Int4Weight`: `qweight [..., in/2, out]` uint8, byte (j, o) = inputs 2j (low nibble) and 2j+1
  (high nibble) of output o, each nibble u meaning u - 8; `scales [..., in/g, out]` in the
  activations' dtype (f32, bf16 or f16).
- `Int4NMWeight` (2:4): `qweight [..., in/4, out]` uint8, byte (j, o) = the two kept values of
  group j (inputs 4j..4j+3) of output o, the lower position's in the low nibble;
  `positions [..., in/8, out]` uint8, groups 2j and 2j+1's positions `p0 | p1 << 2` in the low
  and high 4 bits of byte j; `scales` as above. A quarter byte per weight plus an eighth for
  the positions (4 bits per group of 4).

`group_size=None` is one group per output column (GPTQ's -1, also accepted). `in` must be a
multiple of the group size, and even (dense) or a multiple of 8 (2:4): shapes that are not raise
a ValueError naming them, and `Int4.fits_shape` says why (layer surgery skips such layers).

Every array is frozen: layers hold them as sparsity state, optimisers and mixed precision never
train them, and differentiating in them raises (the gradient in x works: adapters on a frozen
int4 base, as QLoRA). Device layouts (Marlin's) are packed once from these arrays, never per call.

Second-order quantisation (GPTQ) plugs in through `Int4Weight.from_codes(codes, scales, ...)` /
`Int4NMWeight.from_codes(codes, positions, scales, ...)`: integer codes and scales in, the format
out. `quantize_rtn` is the round-to-nearest those replace.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import _validate as V
from jaxsparse.formats._base import FROZEN, SparseFormat, check_dense, check_mask
from jaxsparse.formats._spec import register_spec
from jaxsparse.formats.nm import NM, NMSparse
from jaxsparse.ops.dispatch import int4_dense_backward
from jaxsparse.sharding import Split
from jaxsparse.ops.int4 import (
    NIBBLE_OFFSET,
    int4_a8_matmul,
    int4_dequantize,
    int4_matmul,
    int4_nm_dequantize,
    int4_nm_matmul,
    quantize_activations,
    unpack_positions,
)

QMAX = 7  # Symmetric RTN maps max |w| to 7; codes span [-8, 7].
_QMIN = -8
_SPARSE = NM(2, 4)


@register_spec
class Int4(NamedTuple):
    """The int4 spec: `Int4(group_size=128, sparsity=None)`; `sparsity=NM(2, 4)` for int4 + 2:4.

    `group_size` is the number of consecutive inputs that share a scale (a positive multiple of
    8, e.g. 32, 64, 128), or None (or -1) for one group per output column. `activations="int8"`
    (dense form only) opts into int8-quantised activations: x is quantised per token and group
    on the fly and multiplied in int32 (`jaxsparse.ops.int4_a8_matmul`), faster on CPUs with
    AVX512-VNNI at the cost of the activations' rounding (docs/cpu_speed_notes.md). Strings:
    `"int4"` (g128), `"int4:g64"`, `"int4:channel"`, `"+2:4"` after any of them, or `":a8"`
    after a dense one.

    Example:
        >>> Int4(), Int4(64, NM(2, 4)).density
        (Int4(group_size=128, sparsity=None, activations=None), 0.5)
        >>> str(Int4(128, NM(2, 4))), str(Int4(128, activations="int8"))
        ('int4:g128+2:4', 'int4:g128:a8')
    """

    group_size: int | None = 128
    sparsity: NM | None = None
    activations: str | None = None

    STRING_FORM = "'int4', 'int4:g64', 'int4:channel', 'int4:g128+2:4', 'int4:g128:a8'"

    @property
    def density(self) -> float:
        return 1.0 if self.sparsity is None else self.sparsity.density

    @property
    def format(self) -> type:
        return Int4Weight if self.sparsity is None else Int4NMWeight

    @property
    def has_engine(self) -> bool:
        return False

    @property
    def crossover_table(self) -> str:
        # int8 activations have no table: their kernel at every token count (the dense path
        # computes the same quantised product, in XLA).
        return "INT4A8" if self.activations else "INT4"

    def validate(self, where: str = "jaxsparse.Int4") -> "Int4":
        group = self.group_size
        if group is not None and not (isinstance(group, (int, np.integer))
                                      and not isinstance(group, bool) and int(group) == -1):
            group = V.check_int("group_size", group, low=8, high=2**31 - 1, where=where)
            if group % 8:
                raise ValueError(f"{where}: group_size must be a multiple of 8 (32, 64, 128, ...) "
                                 f"or None for one group per output column; got {group}")
        else:
            group = None
        sparsity = self.sparsity
        if sparsity is not None:
            if isinstance(sparsity, str):
                sparsity = NM.from_string(sparsity) or sparsity
            if sparsity != _SPARSE:
                raise ValueError(f"{where}: sparsity must be None or jaxsparse.NM(2, 4) (int4 + "
                                 f"2:4, Sparse-MARLIN); got {self.sparsity!r}")
            sparsity = _SPARSE
        if self.activations not in (None, "int8"):
            raise ValueError(f"{where}: activations must be None (as given) or 'int8' (quantised "
                             f"per token and group); got {self.activations!r}")
        if self.activations and sparsity is not None:
            raise ValueError(f"{where}: activations='int8' is for the dense int4 form; got it "
                             f"with sparsity={sparsity}")
        return Int4(group, sparsity, self.activations)

    @classmethod
    def from_string(cls, text: str) -> "Int4 | None":
        match = _INT4_STRING.match(text)
        if match is None:
            return None
        group = match.group(1)
        group = 128 if group is None else None if group == "channel" else int(group[1:])
        return cls(group, _SPARSE if match.group(2) else None,
                   "int8" if match.group(3) else None)

    def group_for(self, in_features: int) -> int:
        """The inputs per scale for a weight with `in_features` inputs."""
        return in_features if self.group_size is None else self.group_size

    def fits_shape(self, shape: tuple[int, ...]) -> str | None:
        """None when a kernel `[..., in, out]` can take this spec, else why not."""
        k = shape[-2]
        multiple = 8 if self.sparsity is not None else 4 if self.activations else 2
        if k == 0 or k % multiple:
            return f"in={k} must be a positive multiple of {multiple} for {self}"
        if k % self.group_for(k):
            return f"in={k} is not a multiple of group_size={self.group_size}"
        return None

    def magnitude_mask(self, w) -> jax.Array:
        """The entries `fromdense` keeps: all of them, or 2:4's by magnitude."""
        if self.sparsity is None:
            return jnp.ones(jnp.shape(w), jnp.bool_)
        return self.sparsity.magnitude_mask(w)

    def __str__(self) -> str:
        group = "channel" if self.group_size is None else f"g{self.group_size}"
        return (f"int4:{group}" + ("" if self.sparsity is None else f"+{self.sparsity}")
                + (":a8" if self.activations else ""))


_INT4_STRING = re.compile(r"^\s*int4(?::(g\d+|channel))?(\+2:4)?(:a8)?\s*$", re.IGNORECASE)


# ====================================================================== quantisation
def quantize_rtn(w, group_size: int):
    """Symmetric round-to-nearest of `w [..., K, N]` in groups of `group_size` inputs.

    Returns:
        `(codes, scales)`: int8 codes `[..., K, N]` in [-8, 7] (RTN gives [-7, 7]) and scales
        `[..., K/g, N]` in w's dtype, with `w ~= codes * scales` per group. A group of zeros gets
        scale 0 and codes 0. The codes are computed against the scale as stored (rounded to w's
        dtype), so dequantisation reproduces exactly what was rounded. A nonzero scale is at least
        float32's smallest normal number (`rtn_scales`).
    """
    k, n = w.shape[-2:]
    grouped = w.astype(jnp.float32).reshape(*w.shape[:-2], k // group_size, group_size, n)
    scales = rtn_scales(jnp.max(jnp.abs(grouped), axis=-2)).astype(w.dtype)
    divisor = scales.astype(jnp.float32)[..., None, :]
    codes = jnp.round(grouped / jnp.where(divisor == 0, 1.0, divisor))
    codes = jnp.clip(codes, _QMIN, QMAX).astype(jnp.int8)
    return codes.reshape(w.shape), scales


def rtn_scales(amax, clip=1.0):
    """The f32 scales `clip * amax / 7` of groups whose largest magnitude is `amax`, 0 where it
    is 0, and otherwise at least float32's smallest normal number: XLA's CPU code flushes
    subnormals to zero, which would zero a whole group of weights below ~8e-38 (its codes then
    reach at most 7 against the raised scale). The test is on `amax`, which is normal when
    nonzero: the quotient may already be flushed."""
    tiny = jnp.finfo(jnp.float32).tiny
    return jnp.where(amax > 0, jnp.maximum(clip * amax / QMAX, tiny), 0.0)


def pack_nibbles(codes):
    """int8 codes `[..., R, N]` in [-8, 7] (R even) -> uint8 `[..., R/2, N]`: rows 2j, 2j+1 in
    the low and high nibbles of row j, each as code + 8."""
    return _pack_4bit(codes.astype(jnp.int32) + NIBBLE_OFFSET)


def pack_positions(p0, p1):
    """Positions `[..., G, N]` (0..3) of a 2:4 group's two kept values -> uint8 `[..., G/2, N]`:
    `p0 | p1 << 2` per group, groups 2j and 2j+1 in the low and high 4 bits of byte j."""
    return _pack_4bit((p0.astype(jnp.int32) & 3) | ((p1.astype(jnp.int32) & 3) << 2))


def _pack_4bit(u):
    """int32 `[..., R, N]` in 0..15 (R even) -> uint8 `[..., R/2, N]`, row 2j low, 2j+1 high."""
    pairs = (u & 15).reshape(*u.shape[:-2], u.shape[-2] // 2, 2, u.shape[-1])
    return (pairs[..., 0, :] | (pairs[..., 1, :] << 4)).astype(jnp.uint8)


# ====================================================================== the formats
class _Int4Base(SparseFormat):
    """What both int4 forms share: every array frozen, the logical shape from `qweight`, the
    dtype of the scales, the dense path through `todense()`."""

    SPEC = Int4
    _PER_BYTE = 2

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.qweight.shape[:-2], self.in_features, self.qweight.shape[-1])

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.qweight.shape[:-2])

    @property
    def out_features(self) -> int:
        return self.qweight.shape[-1]

    @property
    def dtype(self):
        return self.scales.dtype

    @property
    def density(self) -> float:
        return float(self.spec.density)

    @property
    def group(self) -> int:
        """The inputs per scale (`in_features` for one group per output column)."""
        return self.spec.group_for(self.in_features)

    def astype(self, dtype):
        """The same codes with the scales cast to `dtype` (f32, bf16 or f16): the dtype of the
        products."""
        where = f"jaxsparse.{type(self).__name__}.astype"
        V.check_float_dtype("dtype", dtype, where=where)
        arrays = self.arrays()
        arrays["scales"] = self.scales.astype(dtype)
        return self._unflatten(self._aux, tuple(arrays.values()))

    device = "cpu"  # The canonical layout, which the CPU kernels read.

    def packed_for(self, device: str):
        """This weight in the layout of `device`: "cpu" is the canonical form itself, "cuda" the
        MARLIN kernels' layout (`jaxsparse.formats.int4_marlin`), packed once (pure, jittable);
        `packed_for("cpu")` unpacks it back bit for bit."""
        from jaxsparse.formats.int4_marlin import packed_for  # It imports this module.

        return packed_for(self, device)

    def with_lines(self):
        """This weight packed once into the CPU kernels' lines layout (`Int4LinesWeight`): the
        inference form for CPUs, whose few-token products stream the weight sequentially (dense
        int4 with float activations; pure, jittable)."""
        from jaxsparse.formats.int4_lines import Int4LinesWeight  # It imports this module.

        return Int4LinesWeight.from_canonical(self)

    def dense_rows(self) -> jax.Array:
        """`todense()` as `[..., out, in]` rows."""
        return jnp.swapaxes(self.todense(), -1, -2)

    def _dense_product(self, x):
        """Dequantise, then XLA's dot (the `[in, out]` layout needs no transpose)."""
        return jnp.matmul(x, self.todense())

    @classmethod
    def _check_spec(cls, group_size, sparsity, in_features, where, activations=None):
        spec = Int4(group_size, sparsity, activations).validate(where)
        if (spec.sparsity is None) != (cls is Int4Weight):
            raise ValueError(f"{where}: {cls.__name__} holds "
                             f"{'dense int4' if cls is Int4Weight else 'int4 + 2:4'}; got {spec}")
        in_features = V.check_int("in_features", in_features, low=0, high=2**62, where=where)
        reason = spec.fits_shape((in_features, 1)) if in_features else None
        if reason is not None:
            raise ValueError(f"{where}: {reason}")
        return spec, in_features

    @staticmethod
    def _check_uint8(name, a, shape, where):
        a = V.as_array(name, a, where=where)
        if a.dtype != jnp.uint8:
            raise TypeError(f"{where}: {name} must be uint8 (packed nibbles), got {a.dtype.name}")
        if tuple(a.shape[-2:]) != shape or a.ndim < 2:
            raise ValueError(f"{where}: {name} must have shape [..., {shape[0]}, {shape[1]}]; "
                             f"got {tuple(a.shape)}")
        return a

    @staticmethod
    def _check_scales(scales, shape, lead, where):
        scales = V.as_array("scales", scales, where=where)
        V.check_float_dtype("scales", scales.dtype, where=where)
        if tuple(scales.shape) != (*lead, *shape):
            raise ValueError(f"{where}: scales must have shape {(*lead, *shape)} "
                             f"([..., in/group_size, out]); got {tuple(scales.shape)}")
        _check_finite_scales("scales", scales, where)
        return scales


class Int4Weight(_Int4Base):
    """An int4 weight with group scales, logical shape `[..., in, out]` (MARLIN's numbers).

    Build one with `jaxsparse.fromdense(w, jaxsparse.Int4(128))` (round-to-nearest),
    `Int4Weight.fromdense(w, group_size=128)` or `Int4Weight.from_codes(codes, scales, ...)`.

    Attributes:
        qweight: `[..., in/2, out]` uint8, two inputs per byte (frozen).
        scales: `[..., in/group, out]` float32/bfloat16/float16 (frozen); its dtype is the
            weight's.
        group_size: inputs per scale, or None for one group per output column (static).
        sparsity: None (static).
        in_features: the logical `in` (static).

    Example:
        >>> import jax.numpy as jnp, jaxsparse as jsp
        >>> wq = jsp.fromdense(jnp.ones((64, 8)), jsp.Int4(32))
        >>> wq.shape, wq.qweight.shape, wq.scales.shape
        ((64, 8), (32, 8), (2, 8))
    """

    ARRAYS = (("qweight", FROZEN), ("scales", FROZEN))

    def __init__(self, qweight, scales, *, group_size: int | None, sparsity=None,
                 activations=None, in_features: int):
        where = "jaxsparse.Int4Weight"
        spec, in_features = self._check_spec(group_size, sparsity, in_features, where,
                                             activations)
        qweight = V.as_array("qweight", qweight, where=where)
        out = qweight.shape[-1] if qweight.ndim else 0
        qweight = self._check_uint8("qweight", qweight, (in_features // 2, out), where)
        group = spec.group_for(in_features)
        groups = in_features // group if group else 0
        self.scales = self._check_scales(scales, (groups, out), qweight.shape[:-2], where)
        self.qweight = qweight
        self.group_size, self.sparsity, self.in_features = spec.group_size, None, in_features
        self.activations = spec.activations

    @classmethod
    def array_shapes(cls, spec: Int4, in_features: int, out_features: int) -> dict:
        """`{name: (shape, dtype)}`; dtype None means the weight's float dtype."""
        groups = in_features // spec.group_for(in_features) if in_features else 0
        return {"qweight": ((in_features // 2, out_features), jnp.uint8),
                "scales": ((groups, out_features), None)}

    # ------------------------------------------------------------------ construction
    @classmethod
    def fromdense(cls, w, *, group_size: int | None = 128, sparsity=None,
                  activations=None) -> "Int4Weight":
        """Quantise `w [..., in, out]` (f32/bf16/f16) by symmetric round-to-nearest.

        Raises:
            ValueError: `in` not a multiple of the group size (or odd), or non-finite weights
                (checked when `w` is concrete; under jit a non-finite group gives NaN scales).
        """
        where = "jaxsparse.Int4Weight.fromdense"
        w = check_dense("w", w, where)
        spec, k = cls._check_spec(group_size, sparsity, w.shape[-2], where, activations)
        _check_finite(w, where)
        codes, scales = quantize_rtn(w, spec.group_for(k))
        return cls._unflatten((*spec, k), (pack_nibbles(codes), scales))

    @classmethod
    def frommask(cls, w, mask, *, group_size: int | None = 128, sparsity=None,
                 activations=None) -> "Int4Weight":
        """Quantise `where(mask, w, 0)`: masked-out entries are exact zeros (code 0)."""
        where = "jaxsparse.Int4Weight.frommask"
        w = check_dense("w", w, where)
        mask = check_mask(mask, w, where)
        return cls.fromdense(jnp.where(mask, w, jnp.zeros((), w.dtype)), group_size=group_size,
                             activations=activations)

    @classmethod
    def from_codes(cls, codes, scales, *, group_size: int | None = 128,
                   activations=None) -> "Int4Weight":
        """The format from integer codes `[..., in, out]` in [-8, 7] and scales
        `[..., in/group, out]` (what GPTQ produces); lossless."""
        where = "jaxsparse.Int4Weight.from_codes"
        codes = _check_codes(codes, where)
        return cls(pack_nibbles(codes), scales, group_size=group_size, activations=activations,
                   in_features=codes.shape[-2])

    # ------------------------------------------------------------------ views
    def codes(self) -> jax.Array:
        """The integer codes `[..., in, out]` int8 in [-8, 7]."""
        q = self.qweight.astype(jnp.int32)
        pairs = jnp.stack([q & 15, q >> 4], axis=-2)
        return (pairs.reshape(self.shape) - NIBBLE_OFFSET).astype(jnp.int8)

    def todense(self) -> jax.Array:
        """`[..., in, out]` in `dtype`: the dequantised weight (`codes * scale`, one rounding)."""
        return int4_dequantize(self.qweight, self.scales, group_size=self.group)

    def mask(self) -> jax.Array:
        """`[..., in, out]` bool: every entry is stored."""
        return jnp.ones(self.shape, jnp.bool_)

    def _shard_splits(self, mode: str):
        """Column parallel: every array by output columns. Row parallel: 2 inputs per byte of
        qweight, a group of inputs per scale (one scale per column: whole on every shard)."""
        return _int4_splits(self, mode, {"qweight": 2})

    def _kernel(self, x, qweight, scales):
        if self.activations:
            return int4_a8_matmul(x, qweight, scales, group_size=self.group)
        return int4_matmul(x, qweight, scales, group_size=self.group,
                           dense_backward=int4_dense_backward(x.shape[1], x.dtype, self.spec))

    def _dense_product(self, x):
        """Dequantise, then XLA's dot; with int8 activations, of the quantised activations (the
        kernel's product, in XLA)."""
        if self.activations:
            codes, x_scales, _ = quantize_activations(x, self.group)
            x = (codes.astype(jnp.float32) * jnp.repeat(x_scales, self.group, axis=-1))
            return jnp.matmul(x, self.todense().astype(jnp.float32)).astype(self.dtype)
        return super()._dense_product(x)


class Int4NMWeight(_Int4Base):
    """An int4 + 2:4 weight (Sparse-MARLIN's numbers), logical shape `[..., in, out]`.

    Build one with `jaxsparse.fromdense(w, jaxsparse.Int4(128, sparsity=jaxsparse.NM(2, 4)))`.

    Attributes:
        qweight: `[..., in/4, out]` uint8, a group's two kept values per byte (frozen).
        positions: `[..., in/8, out]` uint8, two groups' positions per byte (frozen).
        scales: `[..., in/group, out]` float (frozen); its dtype is the weight's.
        group_size, sparsity (`NM(2, 4)`), in_features: static.
    """

    ARRAYS = (("qweight", FROZEN), ("positions", FROZEN), ("scales", FROZEN))

    def __init__(self, qweight, positions, scales, *, group_size: int | None,
                 sparsity=_SPARSE, activations=None, in_features: int):
        where = "jaxsparse.Int4NMWeight"
        spec, in_features = self._check_spec(group_size, sparsity, in_features, where,
                                             activations)
        qweight = V.as_array("qweight", qweight, where=where)
        out = qweight.shape[-1] if qweight.ndim else 0
        qweight = self._check_uint8("qweight", qweight, (in_features // 4, out), where)
        positions = self._check_uint8("positions", positions, (in_features // 8, out), where)
        if positions.shape[:-2] != qweight.shape[:-2]:
            raise ValueError(f"{where}: positions must have qweight's leading dims "
                             f"{tuple(qweight.shape[:-2])}; got {tuple(positions.shape)}")
        if V.is_concrete(positions):
            _check_positions(np.asarray(positions), where)
        group = spec.group_for(in_features)
        groups = in_features // group if group else 0
        self.scales = self._check_scales(scales, (groups, out), qweight.shape[:-2], where)
        self.qweight, self.positions = qweight, positions
        self.group_size, self.sparsity, self.in_features = spec.group_size, _SPARSE, in_features
        self.activations = None

    @classmethod
    def array_shapes(cls, spec: Int4, in_features: int, out_features: int) -> dict:
        groups = in_features // spec.group_for(in_features) if in_features else 0
        return {"qweight": ((in_features // 4, out_features), jnp.uint8),
                "positions": ((in_features // 8, out_features), jnp.uint8),
                "scales": ((groups, out_features), None)}

    # ------------------------------------------------------------------ construction
    @classmethod
    def fromdense(cls, w, *, group_size: int | None = 128, sparsity=_SPARSE,
                  activations=None) -> "Int4NMWeight":
        """Keep the 2 largest |w| of every 4 inputs, then quantise them by round-to-nearest
        (each group's scale over its kept values)."""
        where = "jaxsparse.Int4NMWeight.fromdense"
        w = check_dense("w", w, where)
        spec, _ = cls._check_spec(group_size, sparsity, w.shape[-2], where, activations)
        _check_finite(w, where)
        return cls._from_nm(NMSparse.fromdense(w, n=2, m=4), spec)

    @classmethod
    def frommask(cls, w, mask, *, group_size: int | None = 128,
                 sparsity=_SPARSE, activations=None) -> "Int4NMWeight":
        """Keep the entries where `mask` (which must respect 2:4) is True, then quantise."""
        where = "jaxsparse.Int4NMWeight.frommask"
        w = check_dense("w", w, where)
        spec, _ = cls._check_spec(group_size, sparsity, w.shape[-2], where, activations)
        _check_finite(w, where)
        return cls._from_nm(NMSparse.frommask(w, mask, n=2, m=4), spec)

    @classmethod
    def _from_nm(cls, ws: NMSparse, spec: Int4):
        """Quantise a 2:4 `NMSparse`'s kept values in groups of the spec (g/2 kept per group)."""
        k = ws.in_features
        kept = jnp.swapaxes(ws.values, -1, -2)  # [..., K/2, N]: kept values by input order
        codes, scales = quantize_rtn(kept, spec.group_for(k) // 2)
        pos = jnp.swapaxes(ws.indices, -1, -2)  # [..., K/2, N]
        p0, p1 = pos[..., 0::2, :], pos[..., 1::2, :]
        return cls._unflatten((spec.group_size, _SPARSE, None, k),
                              (pack_nibbles(codes), pack_positions(p0, p1), scales))

    @classmethod
    def from_codes(cls, codes, positions, scales, *,
                   group_size: int | None = 128) -> "Int4NMWeight":
        """The format from the kept values' integer codes `[..., in/2, out]` in [-8, 7] (two per
        group of 4 inputs, in position order), their positions `[..., in/2, out]` (0..3,
        increasing inside a group) and scales `[..., in/group, out]`; lossless."""
        where = "jaxsparse.Int4NMWeight.from_codes"
        codes = _check_codes(codes, where)
        positions = V.as_array("positions", positions, where=where)
        if not jnp.issubdtype(positions.dtype, jnp.integer):
            raise TypeError(f"{where}: positions must be an integer array in [0, 3], got "
                            f"{positions.dtype.name}")
        if positions.shape != codes.shape:
            raise ValueError(f"{where}: positions must have the shape of codes "
                             f"{tuple(codes.shape)}; got {tuple(positions.shape)}")
        if V.is_concrete(positions) and positions.size:
            # Packing keeps 2 bits of each: a position out of range would alias another.
            lo, hi = int(jnp.min(positions)), int(jnp.max(positions))
            if lo < 0 or hi > 3:
                raise ValueError(f"{where}: positions must be in [0, 3] (inside each group of 4 "
                                 f"inputs); got values in [{lo}, {hi}]")
        packed = pack_positions(positions[..., 0::2, :], positions[..., 1::2, :])
        return cls(pack_nibbles(codes), packed, scales, group_size=group_size,
                   in_features=2 * codes.shape[-2])

    # ------------------------------------------------------------------ views
    def todense(self) -> jax.Array:
        """`[..., in, out]` in `dtype`: the dequantised kept values in place, zeros elsewhere."""
        return int4_nm_dequantize(self.qweight, self.positions, self.scales,
                                  group_size=self.group)

    def mask(self) -> jax.Array:
        """`[..., in, out]` bool: True at the two stored positions of every group."""
        p0, p1 = unpack_positions(self.positions, self.qweight.shape[-2])
        slot = jnp.arange(4)[:, None]
        hit = (p0[..., None, :] == slot) | (p1[..., None, :] == slot)  # [..., G, 4, N]
        return hit.reshape(self.shape)

    def with_lines(self):
        """This weight packed once into the CPU kernels' 2:4 lines layout (`Int4NMLinesWeight`):
        the inference form for CPUs, whose few-token products look each kept value's input up in
        a vector of x (pure, jittable)."""
        from jaxsparse.formats.int4_lines import Int4NMLinesWeight  # It imports this module.

        return Int4NMLinesWeight.from_canonical(self)

    def _shard_splits(self, mode: str):
        """Column parallel: every array by output columns. Row parallel: 4 inputs per byte of
        qweight, 8 per byte of positions, a group of inputs per scale (one scale per column:
        whole on every shard)."""
        return _int4_splits(self, mode, {"qweight": 4, "positions": 8})

    def _kernel(self, x, qweight, positions, scales):
        return int4_nm_matmul(x, qweight, positions, scales, group_size=self.group,
                              dense_backward=int4_dense_backward(x.shape[1], x.dtype, self.spec))


def _int4_splits(w, mode, inputs_per_row):
    """The splits of a canonical int4 weight (`[in/k, out]` arrays, k inputs per row)."""
    if mode == "column":
        return {name: Split(-1, 1, 1) for name in w.array_names()}
    scales = row_scales(w)
    if isinstance(scales, str):
        return scales
    return {**{name: Split(-2, 1, k) for name, k in inputs_per_row.items()}, "scales": scales}


def row_scales(w):
    """How an int4 weight's scales split row-parallel: by whole groups; one scale per column
    (`group_size=None`) stays whole on every shard, each shard's partial product scaled alike,
    except with int8 activations, whose quantisation groups then span every input (a shard's
    slice of x would be quantised on its own scale: another product)."""
    if w.group_size is not None:
        return Split(-2, 1, w.group)
    if w.activations:
        return ("one scale per output column (group_size=None) with int8 activations: x is "
                "quantised per token over every input, which no input shard holds; row "
                "parallel needs groups (Int4(group_size=..., activations='int8'))")
    return None


# ====================================================================== checks
def _check_finite(w, where):
    if V.is_concrete(w) and not bool(jnp.all(jnp.isfinite(w))):
        bad = np.argwhere(~np.isfinite(np.asarray(w, np.float32)))[0]
        raise ValueError(f"{where}: w must be finite to be quantised; got "
                         f"{np.asarray(w)[tuple(bad)]} at index {tuple(int(i) for i in bad)}")


def _check_finite_scales(name, scales, where):
    """Concrete scales hold no NaN or infinity: one would make every product of its group NaN
    or infinite without a word (as `load_safetensors` refuses them in a file). Under jit the
    values are unknown and not checked."""
    if not V.is_concrete(scales) or not scales.size:
        return
    host = np.asarray(scales, np.float32)
    if not np.isfinite(host).all():
        bad = np.argwhere(~np.isfinite(host))[0]
        raise ValueError(f"{where}: {name} must be finite; got {host[tuple(bad)]} at index "
                         f"{tuple(int(i) for i in bad)} (a non-finite scale makes its "
                         "group's products NaN or infinite)")


def _check_codes(codes, where):
    codes = V.as_array("codes", codes, where=where)
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(f"{where}: codes must be an integer array in [-8, 7], got "
                        f"{codes.dtype.name}")
    V.check_rank("codes", codes, min_rank=2, where=where, what="[..., in, out]")
    if V.is_concrete(codes) and codes.size:
        lo, hi = int(jnp.min(codes)), int(jnp.max(codes))
        if lo < _QMIN or hi > QMAX:
            raise ValueError(f"{where}: codes must be in [-8, 7]; got values in [{lo}, {hi}]")
    return codes


def _check_positions(packed: np.ndarray, where: str) -> None:
    """Every group's two positions are increasing (p0 < p1): what `fromdense` writes."""
    if packed.size == 0:
        return
    codes = np.stack([packed & 15, packed >> 4], axis=-2)
    p0, p1 = codes & 3, codes >> 2
    bad = np.argwhere(p0 >= p1)
    if bad.size:
        first = tuple(int(i) for i in bad[0])
        raise ValueError(
            f"{where}: positions must hold two increasing positions per group of 4 inputs "
            f"(p0 < p1); byte {first[:-2] + first[-1:]} (nibble {first[-2]}) holds "
            f"p0={int(p0[tuple(bad[0])])}, p1={int(p1[tuple(bad[0])])}"
        )
