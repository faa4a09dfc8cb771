"""N:M structured sparsity: the `NM` pattern and the `NMSparse` format.

A weight `w` of shape `[..., in, out]` (a Flax kernel) is N:M sparse along `in` when every group of
`m` consecutive inputs of every output keeps at most `n` values. 2:4 is what NVIDIA's sparse tensor
cores run; any `1 <= n < m <= 16` is supported here.

Canonical storage (device-neutral; checkpoints hold exactly this; kernels may pack it further):

- `values  [..., out, ceil(in/m) * n]`: the kept values of each output, group after group, in the
  order of their positions. This is `w.T` with the pruned entries squeezed out, the layout of
  cuSPARSELt, CUTLASS and torch's semi-structured tensors.
- `indices [..., out, ceil(in/m) * n]`, uint8: the position (0..m-1) of each kept value inside its
  group, strictly increasing inside a group.

Held beside them, derived (packed once by `jaxsparse.ops.pack_indices_2bit`, never per call):

- `indices_2bit [..., out, ceil(kept/4)]`, uint8, for m = 4 (2:4, 1:4, 3:4): the same positions at
  2 bits, four per byte. The CPU's few-token forward streams these instead of `indices` (the
  weight stream is its bound). Empty (`[..., out, 0]`) for m != 4.

When `in` is not a multiple of `m`, the input dimension is zero-padded to the next multiple of `m`:
the last group has fewer real inputs, and a slot that cannot hold a real input (a group of 2 inputs
at 2:4 keeps both, nothing is left to prune) points into the padding with value 0. Products treat the
padding as zero inputs, so such slots contribute nothing and receive zero gradient; `todense()`
drops them.
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
from jaxsparse.ops.dispatch import backward_on_engine
from jaxsparse.sharding import Split
from jaxsparse.ops.nm import (
    PACKED_MAX_TOKENS,
    has_engine,
    nm_spmm,
    nm_spmm_engine,
    nm_spmm_packed,
    pack_indices_2bit,
)

_MAX_M = 16


@register_spec
class NM(NamedTuple):
    """The N:M spec: keep `n` of every `m` consecutive inputs of each output.

    A hashable value, usable as a static argument and as the `sparsity=` of layers; `"n:m"`
    strings (`"2:4"`) parse to it.

    Example:
        >>> NM(2, 4).density
        0.5
    """

    n: int
    m: int

    STRING_FORM = "'n:m' such as '2:4'"

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def format(self) -> type:
        return NMSparse

    @property
    def has_engine(self) -> bool:
        """Whether products can run on the shared CPU engine (m = 4, n in {1, 2}; see
        `jaxsparse.ops.nm_spmm_engine`); other patterns take the dense path there."""
        return has_engine(self.n, self.m)

    @property
    def crossover_table(self) -> str:
        """The row of `jaxsparse.ops.dispatch.FORMAT_TABLES` for this pattern: "NM4" for 2:4 and
        1:4 (positions also held at 2 bits, their own kernels), else "NM"."""
        return "NM4" if has_engine(self.n, self.m) else "NM"

    def validate(self, where: str = "jaxsparse.NM") -> "NM":
        n = V.check_int("m", self.m, low=2, high=_MAX_M, where=where)
        V.check_int("n", self.n, low=1, high=n - 1, where=where)
        return NM(int(self.n), int(self.m))

    @classmethod
    def from_string(cls, text: str) -> "NM | None":
        match = _NM_STRING.match(text)
        return None if match is None else cls(int(match.group(1)), int(match.group(2)))

    def fits_shape(self, shape: tuple[int, ...]) -> str | None:
        """None when a kernel `[..., in, out]` can take this spec, else why not."""
        return group_fits(shape, self.m, "an N:M group")

    def magnitude_mask(self, w) -> jax.Array:
        """The bool mask `NMSparse.fromdense(w, n, m)` keeps (`[..., in, out]`)."""
        return _magnitude_mask(w, self)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


_NM_STRING = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class NMSparse(SparseFormat):
    """An N:M sparse matrix of logical shape `[..., in, out]`, sparse along `in`.

    Build one with `NMSparse.fromdense(w, n=2, m=4)`, `NMSparse.frommask(w, mask, n=, m=)` or
    `jaxsparse.fromdense(w, NM(2, 4))`. Multiply with `x @ ws` or `jaxsparse.matmul(x, ws)`:
    `x [..., in] -> [..., out]`.

    Attributes:
        values: `[..., out, ceil(in/m)*n]`, float32/bfloat16/float16; the kept values (trainable).
        indices: `[..., out, ceil(in/m)*n]`, uint8; each value's position inside its group of m
            (frozen).
        indices_2bit: `[..., out, ceil(kept/4)]` uint8 for m = 4 (else `[..., out, 0]`): `indices`
            at 2 bits (frozen, derived: the constructor packs it when not given).
        n, m: the pattern (static).
        in_features: the logical `in` (static); `out` and leading batch dims come from `values`.

    A registered pytree: `values`, `indices` and `indices_2bit` are its children,
    `(n, m, in_features)` its static
    aux data, so it passes through `jit`, `vmap` (a stack of sparse weights is a leading batch dim
    of both arrays), `grad` (w.r.t. `values`) and checkpointing unchanged.
    """

    ARRAYS = (("values", TRAINABLE), ("indices", FROZEN), ("indices_2bit", FROZEN))
    SPEC = NM

    def __init__(self, values, indices, indices_2bit=None, *, n: int, m: int, in_features: int):
        where = "jaxsparse.NMSparse"
        n, m = NM(n, m).validate(where)
        in_features = V.check_int("in_features", in_features, low=0, high=2**62, where=where)
        values = V.as_array("values", values, where=where)
        indices = V.as_array("indices", indices, where=where)
        V.check_float_dtype("values", values.dtype, where=where)
        if not jnp.issubdtype(indices.dtype, jnp.integer):
            raise TypeError(f"{where}: indices must be an integer array, got {indices.dtype.name}")
        V.check_rank("values", values, min_rank=2, where=where, what="[..., out, kept]")
        kept = num_groups(in_features, m) * n
        if values.shape[-1] != kept:
            raise ValueError(
                f"{where}: values must have last dimension ceil(in_features/m)*n = "
                f"ceil({in_features}/{m})*{n} = {kept}; got shape {tuple(values.shape)}"
            )
        if indices.shape != values.shape:
            raise ValueError(
                f"{where}: indices must have the shape of values {tuple(values.shape)}; "
                f"got {tuple(indices.shape)}"
            )
        if V.is_concrete(indices):
            check_sorted_positions(np.asarray(indices), per_group=n, limit=m, name="indices",
                                   where=where)
        self.values, self.indices = values, indices.astype(jnp.uint8)
        self.indices_2bit = _checked_2bit(indices_2bit, self.indices, m, where)
        self.n, self.m, self.in_features = n, m, in_features

    @classmethod
    def array_shapes(cls, spec: NM, in_features: int, out_features: int) -> dict:
        """`{name: (shape, dtype)}` of one weight's arrays; dtype None means the values' dtype."""
        shape = (out_features, num_groups(in_features, spec.m) * spec.n)
        return {"values": (shape, None), "indices": (shape, jnp.uint8),
                "indices_2bit": (_shape_2bit(shape, spec.m), jnp.uint8)}

    # ------------------------------------------------------------------ construction
    @classmethod
    def fromdense(cls, w, *, n: int, m: int) -> "NMSparse":
        """Keep the `n` largest-magnitude values of every group of `m` consecutive inputs.

        Args:
            w: `[..., in, out]` float32/bfloat16/float16.
            n, m: the pattern, `1 <= n < m <= 16`.

        Returns:
            An NMSparse of shape `w.shape`. Ties keep the lower position. Jittable.
        """
        where = "jaxsparse.NMSparse.fromdense"
        n, m = NM(n, m).validate(where)
        w = check_dense("w", w, where)
        groups, real = _to_groups(w, m)
        # Padding must lose to any real input, even a real zero: score it below 0.
        score = jnp.where(real, jnp.abs(groups).astype(jnp.float32), -1.0)
        return cls._from_scores(groups, score, n, m, w.shape[-2])

    @classmethod
    def frommask(cls, w, mask, *, n: int, m: int) -> "NMSparse":
        """Keep the entries of `w` where `mask` is True; the mask must respect N:M.

        A group with fewer than `n` True entries is filled with unmasked positions holding 0, so
        `todense()` equals `where(mask, w, 0)` exactly.

        Args:
            w: `[..., in, out]` float32/bfloat16/float16.
            mask: `[..., in, out]` bool, at most `n` True in every group of `m` along `in`.
        """
        where = "jaxsparse.NMSparse.frommask"
        n, m = NM(n, m).validate(where)
        w = check_dense("w", w, where)
        mask = check_mask(mask, w, where)
        mask_groups, real = _to_groups(mask, m)
        if V.is_concrete(mask_groups):
            _check_mask_counts(np.asarray(mask_groups), n, m, where)
        groups, _ = _to_groups(jnp.where(mask, w, jnp.zeros((), w.dtype)), m)
        # Masked entries first, then real unmasked ones (value 0), then padding; lower position
        # first among equals (top_k is stable).
        score = mask_groups.astype(jnp.float32) * 2 + real.astype(jnp.float32)
        return cls._from_scores(groups, score, n, m, w.shape[-2])

    @classmethod
    def _from_scores(cls, groups, score, n, m, in_features):
        _, pos = jax.lax.top_k(score, n)
        pos = jnp.sort(pos, axis=-1)
        values = jnp.take_along_axis(groups, pos, axis=-1)
        kept_shape = (*groups.shape[:-2], groups.shape[-2] * n)
        indices = pos.astype(jnp.uint8).reshape(kept_shape)
        return cls.tree_unflatten(
            (n, m, in_features),
            (values.reshape(kept_shape), indices, _packed_2bit(indices, m)),
        )

    def replace(self, **changes):
        """`SparseFormat.replace`; new `indices` bring their 2-bit form along unless given."""
        if "indices" in changes and "indices_2bit" not in changes:
            indices = jnp.asarray(changes["indices"])
            if jnp.issubdtype(indices.dtype, jnp.integer):  # Else the constructor says why.
                changes["indices_2bit"] = _packed_2bit(indices, self.m)
        return super().replace(**changes)

    # ------------------------------------------------------------------ views
    def todense(self) -> jax.Array:
        """`[..., in, out]` in `dtype`: kept values in place, zeros elsewhere; bit-exact."""
        return rows_to_dense(self.dense_rows(), self.in_features)

    def dense_rows(self) -> jax.Array:
        """`todense()` before its transpose: `[..., out, ceil(in/m)*m]`, zero padded.

        Built by a chain of n selects per position (no gather or scatter), which XLA fuses into
        one elementwise pass: 14 ms (bf16) / 28 ms (f32) for a 4096x4096 2:4 weight on the CPU of
        docs/cpu_speed_notes.md, where the former take_along_axis `todense()` took 98 / 120 ms.
        A dot can contract this layout directly (`x @ rows.T` needs no copy).
        """
        idx = self._grouped(self.indices)[..., None, :]  # [..., out, G, 1, n]
        vals = self._grouped(self.values)[..., None, :]
        position = jnp.arange(self.m, dtype=idx.dtype)  # Broadcasts against [..., out, G, 1].
        dense = jnp.zeros((), self.dtype)
        for s in range(self.n):  # Positions inside a group are distinct: one slot matches.
            dense = jnp.where(idx[..., s] == position, vals[..., s], dense)
        return dense.reshape(*dense.shape[:-2], dense.shape[-2] * dense.shape[-1])

    def mask(self) -> jax.Array:
        """`[..., in, out]` bool: True at every stored position (including stored zeros)."""
        idx = self._grouped(self.indices)[..., None, :]  # [..., out, G, 1, n]
        hit = jnp.any(idx == jnp.arange(self.m, dtype=idx.dtype)[:, None], axis=-1)
        return rows_to_dense(hit.reshape(*hit.shape[:-2], -1), self.in_features)

    def _grouped(self, a):
        return a.reshape(*a.shape[:-1], a.shape[-1] // self.n, self.n)

    def _kernel(self, x, values, indices, indices_2bit):
        # Few tokens stream the weight: 2-bit positions where held (m = 4) and the CPU's
        # row-vectorised kernel reads them (whole bytes per chunk: n in {1, 2}).
        if self.m == 4 and self.n <= 2 and x.shape[1] <= PACKED_MAX_TOKENS:
            engine_backward = backward_on_engine(x.shape[1], x.dtype, self.spec)
            return nm_spmm_packed(x, values, indices, indices_2bit, n=self.n, m=self.m,
                                  engine_backward=engine_backward)
        return nm_spmm(x, values, indices, n=self.n, m=self.m)

    def _shard_splits(self, mode: str):
        """Column parallel: every array by output rows. Row parallel: `n` kept values (and
        positions) per group of `m` inputs; for m = 4 the 2-bit positions pack 4 kept per byte,
        so a shard holds whole bytes (8 inputs at 2:4, 16 at 1:4)."""
        if mode == "column":
            return {name: Split(-2, 1, 1) for name in self.array_names()}
        bits = None
        if self.m == 4:
            runs = 4 // math.gcd(self.n, 4)  # Groups per whole run of 2-bit bytes.
            bits = Split(-1, self.n * runs // 4, self.m * runs)
        return {"values": Split(-1, self.n, self.m), "indices": Split(-1, self.n, self.m),
                "indices_2bit": bits}

    def _engine_kernel(self):
        if not has_engine(self.n, self.m):
            return None

        def engine(x, values, indices, indices_2bit):
            del indices_2bit  # The engine decodes panels from `indices`.
            return nm_spmm_engine(x, values, indices, n=self.n, m=self.m)

        return engine


# ---------------------------------------------------------------------- helpers
def _shape_2bit(kept_shape, m):
    """The shape of `indices_2bit` for `indices` of shape `kept_shape`."""
    return (*kept_shape[:-1], -(-kept_shape[-1] // 4) if m == 4 else 0)


def _packed_2bit(indices, m):
    """`indices` at 2 bits for m = 4, else the empty `[..., out, 0]` placeholder."""
    if m == 4:
        return pack_indices_2bit(indices)
    return jnp.zeros(_shape_2bit(indices.shape, m), jnp.uint8)


def _checked_2bit(indices_2bit, indices, m, where):
    """The 2-bit positions: packed from `indices` when None, else checked to be exactly that
    (when concrete), so the two can never disagree."""
    if indices_2bit is None:
        return _packed_2bit(indices, m)
    indices_2bit = V.as_array("indices_2bit", indices_2bit, where=where)
    want = _shape_2bit(indices.shape, m)
    if indices_2bit.dtype != jnp.uint8 or tuple(indices_2bit.shape) != want:
        raise ValueError(
            f"{where}: indices_2bit must be uint8 of shape {want} (indices at 2 bits"
            f"{'' if m == 4 else '; empty for m != 4'}); got {indices_2bit.dtype.name} "
            f"{tuple(indices_2bit.shape)}"
        )
    if V.is_concrete(indices_2bit) and V.is_concrete(indices) and m == 4:
        if not np.array_equal(np.asarray(indices_2bit), np.asarray(pack_indices_2bit(indices))):
            raise ValueError(f"{where}: indices_2bit does not hold indices at 2 bits; pass "
                             "indices_2bit=None to have it packed")
    return indices_2bit


def _to_groups(w, m):
    """`[..., in, out]` -> (`[..., out, G, m]` zero-padded along in, bool `real` `[G, m]`)."""
    in_features = w.shape[-2]
    groups = num_groups(in_features, m)
    pad = groups * m - in_features
    wt = jnp.swapaxes(w, -1, -2)
    wt = jnp.pad(wt, [(0, 0)] * (wt.ndim - 1) + [(0, pad)])
    real = (jnp.arange(groups * m) < in_features).reshape(groups, m)
    return wt.reshape(*wt.shape[:-1], groups, m), real


def _check_mask_counts(mask_groups: np.ndarray, n: int, m: int, where: str) -> None:
    counts = mask_groups.sum(axis=-1)
    if counts.size and counts.max() > n:
        bad = np.argwhere(counts > n)[0]
        *lead, out, group = (int(i) for i in bad)
        raise ValueError(
            f"{where}: mask keeps {int(counts[tuple(bad)])} entries in the group of inputs "
            f"[{group * m}, {group * m + m}) of output {out}"
            f"{' at batch index ' + str(tuple(lead)) if lead else ''}; the {n}:{m} pattern "
            f"allows at most {n}"
        )


@functools.partial(jax.jit, static_argnums=1)
def _magnitude_mask(w, pattern: NM) -> jax.Array:
    """`NMSparse.fromdense(w).mask()` without building the format: each entry's rank in its group
    by pairwise comparison (m^2 compares per group, elementwise and fused by XLA), measured ~60x
    faster than the top_k + scatter of fromdense on a 1024x1024 kernel.

    The keys order like fromdense's top_k: |w| as its f32 bit pattern (non-negative floats, and
    NaN above inf, order as their bits), the zero padding of a ragged group below every real entry.
    """
    n, m = pattern
    k = w.shape[-2]
    if k == 0 or w.shape[-1] == 0:
        return jnp.zeros(w.shape, jnp.bool_)
    groups = -(-k // m)
    bits = jax.lax.bitcast_convert_type(jnp.abs(w.astype(jnp.float32)), jnp.int32)
    keys = jnp.pad(bits, [(0, 0)] * (w.ndim - 2) + [(0, groups * m - k), (0, 0)],
                   constant_values=-1)
    keys = keys.reshape(*w.shape[:-2], groups, m, 1, w.shape[-1])  # [..., G, i, 1, out]
    other = jnp.swapaxes(keys, -3, -2)  # [..., G, 1, j, out]
    earlier = (jnp.arange(m)[None, :] < jnp.arange(m)[:, None])[:, :, None]  # [i, j, 1]: j < i
    beaten_by = (other > keys) | ((other == keys) & earlier)
    rank = jnp.sum(beaten_by, axis=-2, dtype=jnp.int32)  # [..., G, m, out]
    kept = (rank < n).reshape(*w.shape[:-2], groups * m, w.shape[-1])
    return kept[..., :k, :]
