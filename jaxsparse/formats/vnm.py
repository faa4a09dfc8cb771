"""V:N:M structured sparsity (VENOM): the `VNM` spec and the `VNMSparse` format.

A weight `w [..., in, out]` (a Flax kernel) is V:N:M sparse when its outputs, in *panels* of `v`
consecutive outputs, and its inputs, in *groups* of `m` consecutive inputs, form blocks in which
the panel keeps the same 4 *selected* inputs for all its outputs, and each output keeps `n`
(1 or 2) of those 4. Density is `n/m`: 64:2:8 is 75% sparse, 128:2:16 87.5%, 64:2:32 93.75%.
The 4-of-m choice makes any ratio run on 2:4 sparse tensor cores (Castro et al., SC'23, "VENOM"),
and on a CPU the `v` outputs of a panel share their inputs, so a panel is a small dense product
over `4/m` of the inputs.

Canonical storage (device-neutral; checkpoints hold exactly this; kernels may pack it further),
with `G = ceil(in/m)` groups and `P = ceil(out/v)` panels:

- `values  [..., out, G * n]`: each output's kept values, group after group, in input order.
- `indices [..., out, G * n]`, uint8: the slot (0..3) of each kept value among its panel's 4
  selected inputs of the group, strictly increasing inside a group.
- `columns [..., P, G * 4]`, uint8: the 4 selected positions (0..m-1) of each panel and group,
  strictly increasing.

So kept entry `c` of output `r` is input `(c // n) * m + columns[r // v, 4 * (c // n) + indices[r, c]]`.
`values` is the only trainable array; `indices` and `columns` are frozen structure. Per output
and group this stores `n` values and `n` bytes, and per panel `4` bytes: for 64:2:8 in float32,
10.06 bytes per 32 dense ones (3.18x fewer).

An inference form, `VNMSparseTiled` (`ws.with_tiles()`, bfloat16 or float32), also holds
`tiles [..., P, A, S, W]`: the weight packed once from `values` and `indices` into the layout the
CPU forward multiplies (`jaxsparse.ops.vnm_pack_tiles`, whose `[..., P, words]` it views with
each panel's output tiles, k steps and words on axes of their own, so that it splits by panels
and by steps), so from 32 tokens it no longer decodes the values on every call.

Padding is handled as N:M handles it: `in` is zero-padded to a multiple of `m` (a ragged last
group has fewer real inputs; when fewer than 4 are real, selected columns point into the padding
and their values are 0, contributing nothing and receiving zero gradient); `out` need not be a
multiple of `v` (the last panel is partial: `columns` covers it, `values` has exactly `out`
rows). `todense()` drops the padding.

`fromdense` is magnitude selection (KERNELS.md's VENOM rule, see `jaxsparse.formats._vnm_select`):
per block, the 4 columns whose quad maximises the sum over the panel's outputs of each output's
`n` largest `|w|` among them (exhaustive for `m <= 20`; candidates plus swap search above), then
each output keeps its `n` largest `|w|` of the 4 (ties to the lower slot).
"""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import _validate as V
from jaxsparse.formats._base import (
    FROZEN,
    TRAINABLE,
    SparseFormat,
    check_dense,
    check_mask,
    check_sorted_positions,
    group_fits,
    num_groups,
    rows_to_dense,
)
from jaxsparse.formats._spec import register_spec
from jaxsparse.formats._vnm_select import select_columns
from jaxsparse.sharding import Split
# SELECTED: the 4 inputs a panel keeps per group.
from jaxsparse.ops.vnm import (
    SELECTED,
    has_tiles,
    tile_words_per_panel,
    vnm_pack_tiles,
    vnm_spmm,
    vnm_spmm_tiled,
)

_MAX_V = 256  # Panels up to 256 outputs (uint8 slots, CTA tiles up to 256 rows).
_MAX_M = 64  # Groups up to 64 inputs (uint8 positions; selection cost grows as C(m, 4)).
_V_MULTIPLE = 16  # Panels are whole m16 tiles of mma.sp.


@register_spec
class VNM(NamedTuple):
    """The V:N:M spec: panels of `v` outputs keep 4 of every `m` inputs, each output `n` of them.

    A hashable value, usable as a static argument and as the `sparsity=` of layers;
    `"v:n:m"` strings (`"64:2:8"`) parse to it. `v` is a multiple of 16 in [16, 256]
    (32, 64 and 128 are Spatha's), `n` is 1 or 2, `m` is in [4, 64] (4 is plain 2:4).

    Example:
        >>> VNM(64, 2, 8).density
        0.25
        >>> str(VNM(128, 2, 16))
        '128:2:16'
    """

    v: int
    n: int
    m: int

    STRING_FORM = "'v:n:m' such as '64:2:8'"

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def format(self) -> type:
        return VNMSparse

    @property
    def has_engine(self) -> bool:
        """True: V:N:M's kernels are the shared CPU engine."""
        return True

    def validate(self, where: str = "jaxsparse.VNM") -> "VNM":
        v = V.check_int("v", self.v, low=_V_MULTIPLE, high=_MAX_V, where=where)
        if v % _V_MULTIPLE:
            raise ValueError(
                f"{where}: v must be a multiple of {_V_MULTIPLE} (whole 16-row tiles of the "
                f"sparse tensor cores), got {v}"
            )
        n = V.check_int("n", self.n, low=1, high=2, where=where)
        m = V.check_int("m", self.m, low=SELECTED, high=_MAX_M, where=where)
        return VNM(v, n, m)

    @classmethod
    def from_string(cls, text: str) -> "VNM | None":
        match = _VNM_STRING.match(text)
        return None if match is None else cls(*(int(g) for g in match.groups()))

    def fits_shape(self, shape: tuple[int, ...]) -> str | None:
        """None when a kernel `[..., in, out]` can take this spec, else why not."""
        return group_fits(shape, self.m, "a V:N:M group")

    def magnitude_mask(self, w) -> jax.Array:
        """The bool mask `VNMSparse.fromdense(w, v, n, m)` keeps (`[..., in, out]`)."""
        return _magnitude_mask(w, self)

    def __str__(self) -> str:
        return f"{self.v}:{self.n}:{self.m}"


_VNM_STRING = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*:\s*(\d+)\s*$")


class VNMSparse(SparseFormat):
    """A V:N:M sparse matrix of logical shape `[..., in, out]` (module docstring: the layout).

    Build one with `VNMSparse.fromdense(w, v=64, n=2, m=8)`, `VNMSparse.frommask(w, mask, ...)`
    or `jaxsparse.fromdense(w, VNM(64, 2, 8))`; multiply with `x @ ws`.

    Attributes:
        values: `[..., out, ceil(in/m)*n]` float32/bfloat16/float16, the kept values (trainable).
        indices: `[..., out, ceil(in/m)*n]` uint8, each value's slot among its panel's 4 (frozen).
        columns: `[..., ceil(out/v), ceil(in/m)*4]` uint8, the selected positions (frozen).
        v, n, m: the spec (static); in_features: the logical `in` (static).

    Example:
        >>> import jax, jax.numpy as jnp, jaxsparse as jsp
        >>> w = jax.random.normal(jax.random.key(0), (64, 48))
        >>> ws = jsp.VNMSparse.fromdense(w, v=16, n=2, m=8)
        >>> ws.values.shape, ws.columns.shape, ws.density
        ((48, 16), (3, 32), 0.25)
        >>> (jnp.ones((4, 64)) @ ws).shape
        (4, 48)
    """

    ARRAYS = (("values", TRAINABLE), ("indices", FROZEN), ("columns", FROZEN))
    SPEC = VNM

    def __init__(self, values, indices, columns, *, v: int, n: int, m: int, in_features: int):
        where = "jaxsparse.VNMSparse"
        v, n, m = VNM(v, n, m).validate(where)
        in_features = V.check_int("in_features", in_features, low=0, high=2**62, where=where)
        values = V.as_array("values", values, where=where)
        indices = V.as_array("indices", indices, where=where)
        columns = V.as_array("columns", columns, where=where)
        V.check_float_dtype("values", values.dtype, where=where)
        for name, a in (("indices", indices), ("columns", columns)):
            if not jnp.issubdtype(a.dtype, jnp.integer):
                raise TypeError(f"{where}: {name} must be an integer array, got {a.dtype.name}")
        V.check_rank("values", values, min_rank=2, where=where, what="[..., out, kept]")
        groups = num_groups(in_features, m)
        out = values.shape[-2]
        want = {
            "values": (*values.shape[:-1], groups * n),
            "indices": tuple(values.shape[:-1]) + (groups * n,),
            "columns": (*values.shape[:-2], num_groups(out, v), groups * SELECTED),
        }
        for name, a in (("values", values), ("indices", indices), ("columns", columns)):
            if tuple(a.shape) != want[name]:
                raise ValueError(
                    f"{where}: {name} must have shape {want[name]} (out={out}, "
                    f"in_features={in_features}, spec {v}:{n}:{m}: ceil(in/m)*n kept values per "
                    f"output, ceil(out/v) panels of ceil(in/m)*4 columns); got {tuple(a.shape)}"
                )
        if V.is_concrete(indices):
            check_sorted_positions(np.asarray(indices), per_group=n, limit=SELECTED,
                                   name="indices", where=where, unit="slots")
        if V.is_concrete(columns):
            check_sorted_positions(np.asarray(columns), per_group=SELECTED, limit=m,
                                   name="columns", where=where)
        self.values = values
        self.indices = indices.astype(jnp.uint8)
        self.columns = columns.astype(jnp.uint8)
        self.v, self.n, self.m, self.in_features = v, n, m, in_features

    @classmethod
    def array_shapes(cls, spec: VNM, in_features: int, out_features: int) -> dict:
        """`{name: (shape, dtype)}` of one weight's arrays; dtype None means the values' dtype."""
        groups = num_groups(in_features, spec.m)
        kept = (out_features, groups * spec.n)
        panels = (num_groups(out_features, spec.v), groups * SELECTED)
        return {"values": (kept, None), "indices": (kept, jnp.uint8),
                "columns": (panels, jnp.uint8)}

    # ------------------------------------------------------------------ construction
    @classmethod
    def fromdense(cls, w, *, v: int, n: int, m: int) -> "VNMSparse":
        """Keep, per panel and group, the best 4 columns, then each output's `n` largest of them.

        Args:
            w: `[..., in, out]` float32/bfloat16/float16.
            v, n, m: the spec (see `VNM`).

        Returns:
            A VNMSparse of shape `w.shape`; the module docstring states the selection rule.
            Jittable.
        """
        where = "jaxsparse.VNMSparse.fromdense"
        spec = VNM(v, n, m).validate(where)
        w = check_dense("w", w, where)
        return _fromdense(w, spec)

    @classmethod
    def frommask(cls, w, mask, *, v: int, n: int, m: int) -> "VNMSparse":
        """Keep the entries of `w` where `mask` is True; the mask must respect V:N:M.

        In every block at most 4 inputs may hold True entries (across the panel's outputs), and
        each output at most `n` per group. The selected columns are the masked ones, then the
        lowest unmasked real inputs; each output's slots are its masked entries, then unmasked
        ones holding 0, so `todense()` equals `where(mask, w, 0)` exactly.

        Args:
            w: `[..., in, out]` float32/bfloat16/float16.
            mask: `[..., in, out]` bool.
        """
        where = "jaxsparse.VNMSparse.frommask"
        spec = VNM(v, n, m).validate(where)
        w = check_dense("w", w, where)
        mask = check_mask(mask, w, where)
        blocks, real, _ = _to_blocks(mask, spec)
        if V.is_concrete(blocks):
            _check_mask_blocks(np.asarray(blocks), spec, w.shape[-1], where)
        return _frommask(jnp.where(mask, w, jnp.zeros((), w.dtype)), mask, spec)

    # ------------------------------------------------------------------ views
    def todense(self) -> jax.Array:
        """`[..., in, out]` in `dtype`: kept values in place, zeros elsewhere; bit-exact."""
        return rows_to_dense(self.dense_rows(), self.in_features)

    def dense_rows(self) -> jax.Array:
        """`todense()` before its transpose: `[..., out, ceil(in/m)*m]`, zero padded; selects
        only (no gather of values), so XLA fuses it into one elementwise pass."""
        col, vals = self._row_columns(), self._grouped(self.values)
        position = jnp.arange(self.m, dtype=col.dtype)
        dense = jnp.zeros((), self.dtype)
        for s in range(self.n):  # The n columns of a row's group are distinct.
            dense = jnp.where(col[..., s, None] == position, vals[..., s, None], dense)
        return dense.reshape(*dense.shape[:-2], dense.shape[-2] * dense.shape[-1])

    def mask(self) -> jax.Array:
        """`[..., in, out]` bool: True at every stored position (including stored zeros)."""
        col = self._row_columns()
        hit = jnp.any(col[..., None] == jnp.arange(self.m, dtype=col.dtype), axis=-2)
        return rows_to_dense(hit.reshape(*hit.shape[:-2], -1), self.in_features)

    def _grouped(self, a):
        return a.reshape(*a.shape[:-1], a.shape[-1] // self.n, self.n)

    def _row_columns(self):
        """`[..., out, G, n]` int32: the in-group position of every kept value."""
        out, groups = self.out_features, self.values.shape[-1] // self.n
        panel_cols = self.columns.reshape(*self.columns.shape[:-1], groups, SELECTED)
        row_cols = jnp.repeat(panel_cols, self.v, axis=-3)[..., :out, :, :]
        slots = self._grouped(self.indices).astype(jnp.int32)
        return jnp.take_along_axis(row_cols.astype(jnp.int32), slots, axis=-1)

    # ------------------------------------------------------------------ the inference form
    def with_tiles(self) -> "VNMSparseTiled":
        """This weight with the forward's tiles also held, packed once from the values.

        For inference in bfloat16 or float32: the CPU forward from 32 tokens (bf16 on the tile
        kernels, AMX or AVX512-BF16; f32 on the FMA engine) then multiplies the packed tiles
        instead of decoding the values on every call (about a seventh of the bf16 forward's time
        at 128 tokens). The tiles take twice the values' bytes. Pure and jittable. See
        `VNMSparseTiled` for what the form allows.

        Raises:
            TypeError: the values are float16 (no packed-tile forward).
        """
        return VNMSparseTiled.from_sparse(self)

    def _kernel(self, x, values, indices, columns):
        return vnm_spmm(x, values, indices, columns, v=self.v, n=self.n, m=self.m)

    def _engine_kernel(self):
        return self._kernel  # The V:N:M kernels are the engine.

    def _shard_splits(self, mode: str):
        """Column parallel: values and indices by output rows, columns by panels of v outputs.
        Row parallel: n kept values per group of m inputs, 4 selected columns per group."""
        if mode == "column":
            return {"values": Split(-2, 1, 1), "indices": Split(-2, 1, 1),
                    "columns": Split(-2, 1, self.v)}
        return {"values": Split(-1, self.n, self.m), "indices": Split(-1, self.n, self.m),
                "columns": Split(-1, 4, self.m)}


class VNMSparseTiled(VNMSparse):
    """A V:N:M weight that also holds its forward's tiles, packed once (inference; bf16, f32).

    `ws.with_tiles()` makes one. Products, `todense()` and the rest are `VNMSparse`'s; `x @ w`
    runs `jaxsparse.ops.vnm_spmm_tiled`, whose CPU forward from 32 tokens (bf16 on the tile
    kernels, f32 on the FMA engine) multiplies `tiles` instead of decoding the values on every
    call.

    The tiles are derived from `values` and `indices`, so they must never disagree:
    `replace(values=...)` packs them again, and differentiating `x @ w` with respect to the
    values or tiles raises (an optimiser's update of the values leaf alone would leave the tiles
    stale); the gradient with respect to x works, so frozen tiled weights can sit under trained
    adapters. `without_tiles()` gives the trainable `VNMSparse` back, as does `astype` to
    another dtype. Layers hold `VNMSparse`; this form is for functions that take weights as
    arguments.

    Attributes:
        values, indices, columns: as in `VNMSparse`; values bfloat16 or float32.
        tiles: `[..., ceil(out/v), A, S, W]` of the values' dtype: `jaxsparse.ops.vnm_pack_tiles`'s
            words of each panel in their own axes (frozen): bf16 `A = v/16` output tiles of `S`
            k steps of 32 slots (8 groups) in 512 words; f32 `A = 1`, `S` groups of `W = 4 v`
            (a group's 4 slots' rows). A row shard holds whole k steps (groups), a column shard
            whole panels.

    Example:
        >>> import jax, jax.numpy as jnp, jaxsparse as jsp
        >>> w = jax.random.normal(jax.random.key(0), (64, 32)).astype(jnp.bfloat16)
        >>> wt = jsp.VNMSparse.fromdense(w, v=16, n=2, m=8).with_tiles()
        >>> wt.tiles.shape, (jnp.ones((40, 64), jnp.bfloat16) @ wt).shape
        ((2, 1, 1, 512), (40, 32))
    """

    ARRAYS = VNMSparse.ARRAYS + (("tiles", FROZEN),)

    def __init__(self, values, indices, columns, tiles=None, *, v: int, n: int, m: int,
                 in_features: int):
        super().__init__(values, indices, columns, v=v, n=n, m=m, in_features=in_features)
        self.tiles = _checked_tiles(tiles, self.values, self.indices, v, n,
                                    "jaxsparse.VNMSparseTiled")

    @classmethod
    def from_sparse(cls, ws: VNMSparse) -> "VNMSparseTiled":
        """`ws` with its tiles packed (pure, jittable); values bfloat16 or float32."""
        _check_tile_dtype(ws.values.dtype, "jaxsparse.VNMSparse.with_tiles")
        tiles = _packed_tiles(ws.values, ws.indices, ws.v, ws.n)
        return cls._unflatten(ws._aux, (ws.values, ws.indices, ws.columns, tiles))

    @classmethod
    def fromdense(cls, w, *, v: int, n: int, m: int) -> "VNMSparseTiled":
        """`VNMSparse.fromdense(w, ...).with_tiles()`; w bfloat16 or float32."""
        return VNMSparse.fromdense(w, v=v, n=n, m=m).with_tiles()

    @classmethod
    def frommask(cls, w, mask, *, v: int, n: int, m: int) -> "VNMSparseTiled":
        """`VNMSparse.frommask(w, mask, ...).with_tiles()`; w bfloat16 or float32."""
        return VNMSparse.frommask(w, mask, v=v, n=n, m=m).with_tiles()

    @classmethod
    def array_shapes(cls, spec: VNM, in_features: int, out_features: int,
                     dtype=jnp.bfloat16) -> dict:
        """As `VNMSparse.array_shapes`, plus the tiles of values of `dtype`."""
        shapes = super().array_shapes(spec, in_features, out_features)
        kept = shapes["values"][0][-1]
        view = _tile_view(spec.v, kept, spec.n, dtype)
        shapes["tiles"] = ((num_groups(out_features, spec.v), *view), None)
        return shapes

    def with_tiles(self) -> "VNMSparseTiled":
        return self

    def without_tiles(self) -> VNMSparse:
        """The trainable `VNMSparse` (the same arrays, no tiles)."""
        return VNMSparse._unflatten(self._aux, (self.values, self.indices, self.columns))

    def replace(self, **changes):
        """As `VNMSparse.replace`; new values are packed into new tiles."""
        if "tiles" in changes:
            raise TypeError("jaxsparse.VNMSparseTiled.replace: tiles are derived from the "
                            "values; replace values (the tiles follow)")
        out = self.without_tiles().replace(**changes)
        return out.with_tiles() if has_tiles(out.dtype) else out

    def astype(self, dtype):
        """This weight for its own dtype; for another, `without_tiles().astype(dtype)` (the
        tiles would need packing again: `.with_tiles()` does it)."""
        if jnp.dtype(dtype) == jnp.dtype(self.dtype):
            return self
        return self.without_tiles().astype(dtype)

    def _kernel(self, x, values, indices, columns, tiles):
        flat = tiles.reshape(*tiles.shape[:-3], -1)  # The op's [..., P, words]: the same order.
        return vnm_spmm_tiled(x, values, indices, columns, flat, v=self.v, n=self.n, m=self.m)

    def _shard_splits(self, mode: str):
        """As `VNMSparse`, plus the tiles: by panels (column parallel), by k steps (row
        parallel: a bf16 step holds 8 groups, an f32 one a group; read from the values'
        dtype, which the row split needs)."""
        if mode == "column":
            return {**super()._shard_splits(mode), "tiles": Split(-4, 1, self.v)}
        dtype = getattr(self.values, "dtype", None)
        if dtype is None:
            return "its tiles' row split depends on the values' dtype, which is not known here"
        groups = 1 if jnp.dtype(dtype) == jnp.float32 else _STEP_GROUPS
        return {**super()._shard_splits(mode), "tiles": Split(-2, 1, groups * self.m)}


# ---------------------------------------------------------------------- packed tiles
def _check_tile_dtype(dtype, where):
    if not has_tiles(dtype):
        raise TypeError(
            f"{where}: tiles are packed for bfloat16 or float32 values (the dtypes with a "
            f"packed-tile forward); got {jnp.dtype(dtype).name} (cast first: "
            "ws.astype(jnp.bfloat16).with_tiles())"
        )


_STEP_GROUPS = 8  # Groups per bf16 k step: 32 slots of 4 per group.


def _tile_view(v, kept, n, dtype) -> tuple[int, int, int]:
    """`(A, S, W)`: a panel's packed words (`tile_words_per_panel`) in axes of their own: bf16
    `v/16` output tiles by k steps by 16 pair rows x 32 words; f32 one by groups by 4 rows x v."""
    words = tile_words_per_panel(v, kept, n, dtype)
    if jnp.dtype(dtype) == jnp.float32:
        return 1, kept // n, words * n // kept
    tiles, step = v // 16, 16 * 32
    return tiles, words // (tiles * step), step


def _packed_tiles(values, indices, v, n):
    """`vnm_pack_tiles` in the format's view `[..., P, A, S, W]`."""
    tiles = vnm_pack_tiles(values, indices, v=v, n=n)
    return tiles.reshape(*tiles.shape[:-1], *_tile_view(v, values.shape[-1], n, values.dtype))


def _checked_tiles(tiles, values, indices, v, n, where):
    """The tiles: packed from the values when None, else checked to be exactly their packing
    (when concrete), so the two can never disagree. The flat `[..., P, words]` of older
    checkpoints is viewed as `[..., P, A, S, W]`."""
    _check_tile_dtype(values.dtype, where)
    if tiles is None:
        return _packed_tiles(values, indices, v, n)
    tiles = V.as_array("tiles", tiles, where=where)
    panels = (*values.shape[:-2], num_groups(values.shape[-2], v))
    view = _tile_view(v, values.shape[-1], n, values.dtype)
    want = (*panels, *view)
    if tuple(tiles.shape) == (*panels, math.prod(view)):
        tiles = tiles.reshape(want)  # The flat layout: the same words.
    if tiles.dtype != values.dtype or tuple(tiles.shape) != want:
        raise ValueError(
            f"{where}: tiles must be {values.dtype.name} of shape {want} (vnm_pack_tiles of the "
            f"values, each panel's words as [A, S, W]); got {tiles.dtype.name} "
            f"{tuple(tiles.shape)}"
        )
    if V.is_concrete(tiles) and V.is_concrete(values) and V.is_concrete(indices):
        packed = _packed_tiles(values, indices, v, n)
        if not np.array_equal(np.asarray(tiles, np.float32), np.asarray(packed, np.float32),
                              equal_nan=True):
            raise ValueError(f"{where}: tiles must be the values' packing (vnm_pack_tiles); pass "
                             "tiles=None to have them packed")
    return tiles


# ---------------------------------------------------------------------- selection
def _to_blocks(w, spec: VNM):
    """`[..., in, out]` -> `[..., P, G, v, m]` (outputs and inputs zero-padded), with bool
    `real_in [G, m]` and `real_out [P, v]`."""
    v, _, m = spec
    in_f, out_f = w.shape[-2:]
    groups, panels = num_groups(in_f, m), num_groups(out_f, v)
    wt = jnp.swapaxes(w, -1, -2)
    pad = [(0, 0)] * (wt.ndim - 2) + [(0, panels * v - out_f), (0, groups * m - in_f)]
    wt = jnp.pad(wt, pad).reshape(*wt.shape[:-2], panels, v, groups, m)
    real_in = (jnp.arange(groups * m) < in_f).reshape(groups, m)
    real_out = (jnp.arange(panels * v) < out_f).reshape(panels, v)
    return jnp.swapaxes(wt, -3, -2), real_in, real_out


@functools.partial(jax.jit, static_argnums=1)
def _fromdense(w, spec: VNM) -> VNMSparse:
    blocks, real_in, real_out = _to_blocks(w, spec)  # [..., P, G, v, m]
    # Padding inputs lose to any real one (even a real 0); padding outputs weigh nothing.
    score = jnp.where(real_in[:, None, :], jnp.abs(blocks).astype(jnp.float32), -1.0)
    score = jnp.where(real_out[:, None, :, None], score, 0.0)
    columns = select_columns(score, spec.n).astype(jnp.int32)  # [..., P, G, 4]
    return _keep_in_columns(blocks, score, columns, spec, w.shape[-2], w.shape[-1])


@functools.partial(jax.jit, static_argnums=2)
def _frommask(w, mask, spec: VNM) -> VNMSparse:
    blocks, real_in, _ = _to_blocks(w, spec)
    mask_blocks, _, _ = _to_blocks(mask, spec)
    real = real_in[:, None, :].astype(jnp.float32)
    # Columns: masked ones first, then real unmasked ones, then padding (lowest position first).
    column_score = jnp.any(mask_blocks, axis=-2).astype(jnp.float32) * 2 + real[..., 0, :]
    _, columns = jax.lax.top_k(column_score, SELECTED)
    columns = jnp.sort(columns, axis=-1)
    score = mask_blocks.astype(jnp.float32) * 2 + real
    return _keep_in_columns(blocks, score, columns, spec, w.shape[-2], w.shape[-1])


def _keep_in_columns(blocks, score, columns, spec: VNM, in_f: int, out_f: int) -> VNMSparse:
    """Each output keeps its `n` best-scored slots of its panel's 4 columns (ties: lower slot)."""
    v, n, _ = spec
    cols = jnp.broadcast_to(columns[..., None, :], (*blocks.shape[:-1], SELECTED))
    slot_scores = jnp.take_along_axis(score, cols, axis=-1)  # [..., P, G, v, 4]
    _, slots = jax.lax.top_k(slot_scores, n)
    slots = jnp.sort(slots, axis=-1)  # [..., P, G, v, n]
    values = jnp.take_along_axis(blocks, jnp.take_along_axis(cols, slots, axis=-1), axis=-1)
    lead, (panels, groups) = blocks.shape[:-4], blocks.shape[-4:-2]

    def rows(a):  # [..., P, G, v, n] -> [..., out, G*n]
        a = jnp.swapaxes(a, -3, -2).reshape(*lead, panels * v, groups * n)
        return a[..., :out_f, :]

    columns = columns.astype(jnp.uint8).reshape(*lead, panels, groups * SELECTED)
    children = (rows(values), rows(slots.astype(jnp.uint8)), columns)
    return VNMSparse.tree_unflatten((*spec, in_f), children)


@functools.partial(jax.jit, static_argnums=1)
def _magnitude_mask(w, spec: VNM) -> jax.Array:
    return _fromdense(w, spec).mask()


# ---------------------------------------------------------------------- helpers
def _check_mask_blocks(blocks: np.ndarray, spec: VNM, out_f: int, where: str) -> None:
    """A V:N:M mask: per block at most 4 inputs in use, per output at most n per group."""
    v, n, m = spec
    per_row = blocks.sum(axis=-1)  # [..., P, G, v]
    if per_row.size and per_row.max() > n:
        *lead, p, g, r = (int(i) for i in np.argwhere(per_row > n)[0])
        raise ValueError(
            f"{where}: mask keeps {int(per_row[(*lead, p, g, r)])} entries of output {p * v + r} "
            f"in the group of inputs [{g * m}, {g * m + m}){_at(lead)}; the {spec} pattern "
            f"allows at most {n}"
        )
    used = blocks.any(axis=-2).sum(axis=-1)  # [..., P, G]
    if used.size and used.max() > SELECTED:
        *lead, p, g = (int(i) for i in np.argwhere(used > SELECTED)[0])
        raise ValueError(
            f"{where}: mask uses {int(used[(*lead, p, g)])} inputs of the group "
            f"[{g * m}, {g * m + m}) in the panel of outputs [{p * v}, {min(p * v + v, out_f)})"
            f"{_at(lead)}; the {spec} pattern allows {SELECTED} per panel and group"
        )


def _at(lead) -> str:
    return f" at batch index {tuple(lead)}" if lead else ""
