"""The seam every weight format plugs into: `SparseFormat`, its array roles, and `x @ w`.

A format is a registered pytree whose children are arrays with declared *roles*:

- `TRAINABLE`: what training updates (the kept `values`); layers hold it as an `nnx.Param` /
  in linen's `params`, `mixed_precision` differentiates it, `replace(values=...)` swaps it cheaply.
- `FROZEN`: structure that training never touches (positions, column selections); layers hold it
  as `SparsityIndices` / in linen's `"sparsity"` collection.

and *static* fields (the spec's numbers and the logical `in_features`) as pytree aux data.
Layers, surgery, mixed precision and checkpoints read these declarations and never name a
format's arrays themselves, so a new format is one file here (plus its ops and kernels).

Every format stores its trainable `values` as `[..., out, kept]` (the weight's `w.T` with pruned
entries squeezed out, one row per output), so the logical shape `[..., in, out]`, the batch
dims of a stack of weights, `dtype`, `density` and `nbytes` are defined once, here.

Products: `x @ w` and `jaxsparse.matmul(x, w)` validate `x` (jaxsparse/ops/matmul.py), choose
the path (jaxsparse/ops/dispatch.py) and call `w._matmul(x, path)`: the sparse path flattens the
leading dims of `x` and of a stack of weights into one kernel batch dim and calls the format's
`_kernel` (its primitive); the dense path multiplies by `dense_rows()` with XLA's dot.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse import _validate as V
from jaxsparse.ops.matmul import matmul
from jaxsparse.sharding import sharded_product

TRAINABLE = "trainable"
FROZEN = "frozen"
ROLES = (TRAINABLE, FROZEN)


class SparseFormat:
    """Base of every jaxsparse weight format (`NMSparse`, `VNMSparse`, ...).

    A subclass declares:

    - `ARRAYS`: `((name, role), ...)` of its array children in pytree order; `values`
      (`[..., out, kept]`, float32/bfloat16/float16) is the trainable one.
    - `SPEC`: its spec type (e.g. `NM`); the spec's fields and `in_features` are the static
      fields, in that order.
    - `__init__(*arrays, **static)`: the validating constructor.
    - `fromdense(w, **spec)`, `frommask(w, mask, **spec)`, `todense()`, `mask()`,
      `dense_rows()`, `array_shapes(spec, in_features, out_features)` and
      `_kernel(x3, *arrays3)` (the sparse product on rank-3 operands);
    - optionally `_engine_kernel()`: the product on the shared CPU engine, with `_kernel`'s
      signature, or None where the spec has none (then the "engine" path multiplies densely);
    - optionally `_shard_splits(mode)`: how its arrays split for column and row parallel
      products (jaxsparse/sharding.py), and `_column_shard` / `_row_shard` where a shard's
      arrays are not simply those it holds (with `_shard_statics` for a static field that
      changes per shard, `_shard_consistent` to turn a hand-split weight's product NaN); without
      them the format is data parallel only.

    and gets pytree registration, `replace`, `astype`, the logical shape, `density`, `nbytes`,
    `spec`, `x @ w` and a `repr` from here.
    """

    ARRAYS: ClassVar[tuple[tuple[str, str], ...]] = ()
    SPEC: ClassVar[type] = tuple
    #: Whether `out_features` is a static field too (after `in_features`): for a format whose
    #: arrays do not carry it (1xN blocks: `values [..., nnz, n]`, the last block row padded).
    STATIC_OUT: ClassVar[bool] = False

    __array_ufunc__ = None  # NumPy defers `np_array @ w` to __rmatmul__.

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, role in cls.ARRAYS:
            if role not in ROLES:
                raise TypeError(f"{cls.__name__}.ARRAYS: role of {name!r} must be one of {ROLES}")
        jax.tree_util.register_pytree_with_keys(
            cls, cls._flatten_with_keys, cls._unflatten, flatten_func=cls._flatten
        )

    # ------------------------------------------------------------------ declarations
    @classmethod
    def array_names(cls) -> tuple[str, ...]:
        return tuple(name for name, _ in cls.ARRAYS)

    @classmethod
    def arrays_with_role(cls, role: str) -> tuple[str, ...]:
        return tuple(name for name, r in cls.ARRAYS if r == role)

    @classmethod
    def static_names(cls) -> tuple[str, ...]:
        return (*cls.SPEC._fields, "in_features") + (("out_features",) if cls.STATIC_OUT else ())

    # ------------------------------------------------------------------ pytree
    def _flatten(self):
        return tuple(getattr(self, n) for n in self.array_names()), self._aux

    def _flatten_with_keys(self):
        children = tuple(
            (jax.tree_util.GetAttrKey(n), getattr(self, n)) for n in self.array_names()
        )
        return children, self._aux

    @classmethod
    def _unflatten(cls, aux, children):
        # No validation: leaves may be tracers, None or sentinels inside JAX transformations.
        obj = object.__new__(cls)
        for name, value in zip(cls.array_names(), children):
            setattr(obj, name, value)
        for name, value in zip(cls.static_names(), aux):
            setattr(obj, name, value)
        return obj

    def tree_flatten(self):
        return self._flatten()

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls._unflatten(aux, children)

    @property
    def _aux(self) -> tuple:
        return tuple(getattr(self, n) for n in self.static_names())

    @classmethod
    def from_arrays(cls, spec, in_features: int, arrays: dict, *, validate: bool = True,
                    out_features: int | None = None):
        """A format from its spec, `in_features` and `{array name: array}` (what layers hold);
        `out_features` is used by formats whose arrays do not carry it (`STATIC_OUT`).

        With `validate=False` nothing is checked (for arrays a layer already checked, or
        tracers); otherwise the validating constructor runs.
        """
        static = {"in_features": in_features}
        if cls.STATIC_OUT:
            static["out_features"] = out_features
        if validate:
            return cls(**arrays, **spec._asdict(), **static)
        return cls._unflatten((*spec, *static.values()),
                              tuple(arrays[n] for n in cls.array_names()))

    def arrays(self) -> dict[str, Any]:
        """`{name: array}` of every array child, in pytree order."""
        return {n: getattr(self, n) for n in self.array_names()}

    # ------------------------------------------------------------------ updates
    def replace(self, **changes: Any):
        """A copy with some arrays replaced (same spec and shape), validated.

        `w.replace(values=v)` is how training updates the kept values: `v` may be a tracer and
        only its shape and dtype are checked; replacing a frozen array re-runs the constructor's
        checks.
        """
        where = f"jaxsparse.{type(self).__name__}.replace"
        unknown = set(changes) - set(self.array_names())
        if unknown:
            raise TypeError(
                f"{where}: unknown fields {sorted(unknown)}; expected "
                f"{', '.join(n + '=' for n in self.array_names())}"
            )
        arrays = self.arrays()
        for name in self.arrays_with_role(TRAINABLE):
            if name in changes:
                new = V.as_array(name, changes[name], where=where)
                if new.shape != arrays[name].shape:
                    raise ValueError(
                        f"{where}: {name} must keep the shape {tuple(arrays[name].shape)}; "
                        f"got {tuple(new.shape)}"
                    )
                V.check_float_dtype(name, new.dtype, where=where)
                changes[name] = new
        arrays.update(changes)
        if set(changes) <= set(self.arrays_with_role(TRAINABLE)):
            # Frozen arrays were validated already: skip the host round trip.
            return self._unflatten(self._aux, tuple(arrays[n] for n in self.array_names()))
        return self.from_arrays(self.spec, self.in_features, arrays,
                                out_features=self.out_features)

    def astype(self, dtype):
        """The same structure with the trainable values cast to `dtype` (f32, bf16 or f16)."""
        V.check_float_dtype("dtype", dtype, where=f"jaxsparse.{type(self).__name__}.astype")
        trainable = set(self.arrays_with_role(TRAINABLE))
        children = tuple(
            a.astype(dtype) if n in trainable else a for n, a in self.arrays().items()
        )
        return self._unflatten(self._aux, children)

    # ------------------------------------------------------------------ properties
    @property
    def spec(self):
        """The spec value of this weight, e.g. `NM(2, 4)`."""
        return self.SPEC(*(getattr(self, f) for f in self.SPEC._fields))

    @property
    def pattern(self):
        """The same as `spec` (the name the pruning toolkit uses)."""
        return self.spec

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape `[..., in, out]`."""
        return (*self.values.shape[:-2], self.in_features, self.values.shape[-2])

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The leading dims of a stack of weights (`()` for one weight)."""
        return tuple(self.values.shape[:-2])

    @property
    def out_features(self) -> int:
        return self.values.shape[-2]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def density(self) -> float:
        """Stored values over logical entries (the spec's density, or more when padded)."""
        total = math.prod(self.shape)
        return self.values.size / total if total else float(self.spec.density)

    @property
    def nbytes(self) -> int:
        """Bytes held by the canonical arrays (what a checkpoint stores)."""
        return sum(a.nbytes for a in self.arrays().values())

    # ------------------------------------------------------------------ products
    def _matmul(self, x, path: str):
        """`x @ self` on the chosen path ("sparse", "engine" or "dense"); x is validated and has
        `self`'s dtype (jaxsparse/ops/matmul.py)."""
        if path == "dense":
            return self._dense_product(x)
        if path == "engine":
            kernel = self._engine_kernel()
            return self._dense_product(x) if kernel is None else self._sparse_product(x, kernel)
        return self._sparse_product(x)

    def _engine_kernel(self):
        """The product on the shared CPU engine (`_kernel`'s signature), or None: no engine."""
        return None

    def _dense_product(self, x):
        """Decompress, then XLA's dot. The dot contracts the `[out, in]` rows as they come out of
        the decompression: transposing them to `[in, out]` first measured 2-5x slower in total
        (the transpose, and XLA fusing it into the dot's operand)."""
        rows = self.dense_rows()[..., : self.in_features]
        if not self.batch_shape:
            return jnp.einsum("...k,nk->...n", x, rows)
        return jnp.matmul(x, jnp.swapaxes(rows, -1, -2))

    def _sparse_product(self, x, kernel=None):
        """The format's `_kernel` (or, given any `kernel`, its `_engine_kernel()`) over any
        leading dims of x and of a stack of weights, through `jaxsparse.sharding`'s wrapper
        primitive: under `jit` over several devices it partitions by the operands' shardings
        (data, column or row parallel) instead of gathering them."""
        kind = "sparse" if kernel is None else "engine"
        arrays = tuple(self.arrays().values())
        if not self.batch_shape:
            lead = x.shape[:-1]
            x3 = x.reshape(1, math.prod(lead), self.in_features)
            y = sharded_product(self, kind, x3, tuple(a[None] for a in arrays))
            return y.reshape(*lead, self.out_features)
        if x.ndim == 1:
            return self._sparse_product(x[None], kernel)[..., 0, :]
        batch = jnp.broadcast_shapes(x.shape[:-2], self.batch_shape)
        core = len(self.batch_shape)
        x3 = _flatten_batch(x, batch, 2)
        y = sharded_product(self, kind, x3, tuple(_flatten_batch(a, batch, a.ndim - core)
                                                  for a in arrays))
        return y.reshape(*batch, *y.shape[1:])

    def _shard_splits(self, mode: str):
        """How this weight's arrays split in a tensor-parallel `mode` ("column": over output
        features, "row": over input features): `{array name: Split or None}` (None: the array
        stays whole on every shard), or a string saying why the format cannot. Reads only the
        static fields (the spec, `in_features`). Data parallel needs no declaration."""
        return f"{type(self).__name__} declares no {mode}-parallel split"

    def _column_shard(self, arrays: tuple, shard, shards: int) -> tuple:
        """One column-parallel shard's arrays from those it holds (each split array its own
        share, each whole one entire), `shard` its index (traced) of `shards`. As held here;
        a format whose whole arrays index the split ones (1xN's indptr) takes its part."""
        del shard, shards
        return arrays

    def _row_shard(self, arrays: tuple, shard, shards: int) -> tuple:
        """One row-parallel shard's arrays, as `_column_shard` (1xN's stacked layout counts its
        indices from the shard's first input)."""
        del shard, shards
        return arrays

    def _shard_consistent(self):
        """On one shard's weight (its arrays local): a bool scalar, False where the arrays
        cannot be this shard's part of a weight of its spec (the product is then NaN), or None
        when every split is consistent by construction (here)."""
        return None

    def _shard_statics(self, statics: dict, out_shards: int, in_shards: int) -> dict:
        """The static fields of one shard's weight, given `{name: value}` with `in_features`
        (and a static `out_features`) already divided; as given here (1xN's stacked layout
        divides its runs)."""
        del out_shards, in_shards
        return statics

    def __rmatmul__(self, x):
        return matmul(x, self)  # The public entry validates x and chooses the path.

    def __matmul__(self, other):
        name = type(self).__name__
        raise TypeError(
            f"{name} @ x is not supported: jaxsparse multiplies a dense left operand by a sparse "
            "weight, `x @ ws` with x [..., in]; for ws @ x use (x.T @ ws).T or ws.todense() @ x"
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={jnp.dtype(self.dtype).name}, "
            f"pattern={self.spec}, nbytes={self.nbytes})"
        )


def _flatten_batch(a, batch, core):
    """Broadcast `a`'s leading dims to `batch` and flatten them to one; `[1, ...]` stays a view
    when `a` has no leading dims (the kernel broadcasts it)."""
    if a.ndim == core:
        return a[None]
    a = jnp.broadcast_to(a, (*batch, *a.shape[-core:]))
    return a.reshape(math.prod(batch), *a.shape[-core:])


# ====================================================================== helpers for formats
def num_groups(size: int, group: int) -> int:
    """`ceil(size / group)`: the groups (or panels) a dimension is padded to."""
    return -(-size // group)


def check_dense(name: str, w, where: str):
    """`w` as a float array `[..., in, out]`, or a clear exception."""
    w = V.as_array(name, w, where=where)
    V.check_rank(name, w, min_rank=2, where=where, what="[..., in, out]")
    V.check_float_dtype(name, w.dtype, where=where)
    return w


def check_mask(mask, w, where: str):
    """`mask` as a bool array of `w`'s shape, or a clear exception."""
    mask = V.as_array("mask", mask, where=where)
    if mask.shape != w.shape:
        raise ValueError(
            f"{where}: mask must have the shape of w {tuple(w.shape)}; got {tuple(mask.shape)}"
        )
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{where}: mask must be a bool array, got {mask.dtype.name}")
    return mask


def rows_to_dense(rows, in_features: int):
    """`[..., out, padded in]` -> `[..., in, out]`, dropping the padding."""
    return jnp.swapaxes(rows[..., :in_features], -1, -2)


def check_sorted_positions(a: np.ndarray, *, per_group: int, limit: int, name: str, where: str,
                           unit: str = "positions") -> None:
    """Every run of `per_group` entries along the last axis of `a` holds distinct `unit` in
    `[0, limit)`, strictly increasing (a concrete array: called only outside jit)."""
    if a.size == 0:
        return
    if a.min() < 0 or a.max() >= limit:
        bad = np.argwhere((a < 0) | (a >= limit))[0]
        raise ValueError(
            f"{where}: {name} must be {unit} in [0, {limit}); got {a[tuple(bad)]} at index "
            f"{tuple(int(i) for i in bad)}"
        )
    grouped = a.astype(np.int16).reshape(*a.shape[:-1], -1, per_group)
    order = np.diff(grouped, axis=-1) > 0
    if not order.all():
        bad = np.argwhere(~order)[0]
        raise ValueError(
            f"{where}: {name} must be strictly increasing inside each group of {per_group} "
            f"(distinct, sorted {unit}); group {tuple(int(i) for i in bad[:-1])} holds "
            f"{grouped[tuple(bad[:-1])].tolist()}"
        )


def group_fits(shape, m: int, group: str) -> str | None:
    """None when a kernel `[..., in, out]` has at least one whole group of `m` inputs; `group`
    names the group in the reason (e.g. "an N:M group")."""
    if shape[-2] < m:
        return f"in={shape[-2]} < m={m}: {group} needs at least m inputs, nothing would be pruned"
    return None
