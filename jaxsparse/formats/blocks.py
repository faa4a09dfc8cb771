"""1xN block sparsity: the `Blocks` spec and the `BlocksSparse` format.

A weight `w [..., in, out]` (a Flax kernel) is 1xN block sparse when its entries are kept or
pruned in *blocks* of one input by `n` consecutive outputs: output block row `r` (outputs
`r*n .. r*n+n-1`) keeps a set of inputs, and for each kept input all `n` weights. On a CPU one
broadcast of `x[t, k]` then feeds `n` outputs, so every kept block is a small dense product
(Lin et al., "1xN Pattern for Pruning CNNs", TPAMI 2022; KERNELS.md section 4).

Canonical storage, BSR (TVM's and scipy's block sparse rows with `1 x n` blocks along the
outputs), with `R = ceil(out/n)` block rows and `nnz = Blocks(n, density).kept_blocks(in, out)`
stored blocks:

- `values  [..., nnz, n]`: block after block, each block's `n` weights (trainable).
- `indices [..., nnz]`, int32: each block's input, strictly increasing inside a block row.
- `indptr  [..., R + 1]`, int32: block row `r` holds blocks `indptr[r] .. indptr[r+1] - 1`
  (`indptr[0] = 0`, `indptr[R] = nnz`).

So `w[indices[p], r*n + j] = values[p, j]` for every block `p` of row `r`. The number of kept
blocks is fixed by the density (a static shape, so the format works under `jit` and in
layers), while each block row keeps as many as its norms earn: `fromdense` keeps the blocks
with the largest L2 norm across the whole weight (the paper's rule, global within a layer).
`jaxsparse.prune.block_densities` spreads one density over a whole model instead.

When `out` is not a multiple of `n`, the last block row is partial: its blocks still hold `n`
weights, and those of the padding outputs (`>= out`) are 0, are never computed and get zero
gradient. `out_features` is a static field of the weight (the arrays do not carry it).
`todense()` drops the padding.

Tensor parallelism needs every device to hold the same number of blocks. Over output features
(column parallel), the spec `Blocks(n, density, shards=s)` keeps, in each of `s` equal runs of
block rows, the same share of the blocks (that run's largest), so its weights split
column-parallel over any divisor of `s` devices (jaxsparse/sharding.py). Over input features
(row parallel), `Blocks(n, density, shards=s, split="in")` keeps the same share in each of `s`
equal runs of inputs, and stores the weight as `s` BSR matrices one after the other, run by run
(the *stacked* layout): `indptr [..., s*R + 1]`, its stacked row `q = run*R + r` holding block
row `r`'s blocks of that run's inputs, `indices` still the inputs of the whole weight. A device
then holds one contiguous slice of `values` and `indices`, a BSR matrix of its own inputs, and
its products are summed over the devices. On one device the stacked weight's product is the
sum of its runs' products (each run's partial in the dtype, the sum in float32). `shards` and
`split` are part of the pattern, so layers, `sparsify`, the pruning masks, SparseGPT and BCOO
interop keep the balance too. A weight chosen over the whole matrix (`shards=1`, the default)
runs data parallel only.
"""

from __future__ import annotations

import functools
import math
import re
from typing import ClassVar, NamedTuple

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
    num_groups,
    rows_to_dense,
)
from jaxsparse.formats._spec import register_spec
from jaxsparse.sharding import Split
from jaxsparse.ops.blocks import block_rows, blocks_spmm

BLOCK_SIZES = (4, 8, 16, 32)  # The block widths the kernels are built for (one to two zmm).
SPLITS = ("out", "in")  # The features a balanced spec's runs run along.


@register_spec
class Blocks(NamedTuple):
    """The 1xN spec: blocks of one input by `n` consecutive outputs, a fraction `density` kept.

    A hashable value, usable as a static argument and as the `sparsity=` of layers;
    `"1xN@density"` strings (`"1x16@0.25"`, or `"1x16@25%"`, and `"1x16@0.25,shards=8"`) parse
    to it. `n` is one of 4, 8, 16, 32; `density` is in (0, 1] (0.25 is 75% sparse). `shards`
    (default 1: the largest blocks of the whole matrix) splits the weight into `shards` equal
    runs that each keep `kept_blocks / shards` blocks (their largest), so that it runs
    tensor-parallel over `shards` devices or a divisor of it (a layer's weight too); `split`
    says along which features: `"out"` (default: runs of block rows, column parallel; `out`
    must then be a multiple of `n * shards`) or `"in"` (runs of inputs, row parallel, in the
    stacked layout of the module docstring; `in` must be a multiple of `shards`). Either way
    `kept_blocks` must be a multiple of `shards`. With `shards=1` the split is moot and reads
    `"out"`.

    Example:
        >>> Blocks(16, density=0.25).kept_blocks(64, 32)
        32
        >>> str(Blocks(16, 0.25)), str(Blocks(16, 0.25, shards=8))
        ('1x16@0.25', '1x16@0.25,shards=8')
        >>> Blocks.from_string("1x16@0.25,shards=4,split=in")
        Blocks(n=16, density=0.25, shards=4, split='in')
    """

    n: int
    density: float
    shards: int = 1
    split: str = "out"

    STRING_FORM = ("'1xN@density' such as '1x16@0.25' (or '1x16@0.25,shards=8', "
                   "'1x16@0.25,shards=8,split=in')")

    @property
    def format(self) -> type:
        return BlocksSparse

    @property
    def has_engine(self) -> bool:
        """True: the 1xN kernels are dense micro-kernels over each block row's inputs."""
        return True

    def validate(self, where: str = "jaxsparse.Blocks") -> "Blocks":
        if not isinstance(self.n, (int, np.integer)) or isinstance(self.n, bool) \
                or int(self.n) not in BLOCK_SIZES:
            raise ValueError(f"{where}: n must be one of {BLOCK_SIZES} (outputs per block); "
                             f"got {self.n!r}")
        if isinstance(self.density, bool) or not isinstance(
                self.density, (int, float, np.integer, np.floating)):
            raise TypeError(f"{where}: density must be a number in (0, 1]; got "
                            f"{type(self.density).__name__} {self.density!r}")
        density = float(self.density)
        if not (0.0 < density <= 1.0):
            raise ValueError(f"{where}: density must be in (0, 1] (the fraction of blocks "
                             f"kept); got {self.density!r}")
        shards = V.check_int("shards", self.shards, low=1, high=2**31 - 1, where=where)
        if self.split not in SPLITS:
            raise ValueError(f"{where}: split must be one of {SPLITS} (the features the "
                             f"shards run along); got {self.split!r}")
        return Blocks(int(self.n), density, shards, self.split if shards > 1 else "out")

    @classmethod
    def from_string(cls, text: str) -> "Blocks | None":
        match = _BLOCKS_STRING.match(text)
        if match is None:
            return None
        n, number, percent, shards, split = match.groups()
        try:
            density = float(number) / (100.0 if percent else 1.0)
        except ValueError:
            return None
        return cls(int(n), density, int(shards) if shards else 1, split or "out")

    def kept_blocks(self, in_features: int, out_features: int) -> int:
        """Blocks a `[in, out]` weight keeps: `density` of its `in * ceil(out/n)`, rounded half
        up, at least one (when there is any)."""
        total = in_features * num_groups(out_features, self.n)
        return min(total, max(1 if total else 0, math.floor(self.density * total + 0.5)))

    def fits_shape(self, shape: tuple[int, ...]) -> str | None:
        """None when a kernel `[..., in, out]` can take this spec, else why not."""
        if shape[-1] < self.n:
            return (f"out={shape[-1]} < n={self.n}: a 1x{self.n} block would be mostly "
                    "padding")
        return _shards_misfit(self, *shape[-2:])

    def magnitude_mask(self, w) -> jax.Array:
        """The bool mask `BlocksSparse.fromdense(w, **spec._asdict())` keeps (`[..., in, out]`)."""
        return _magnitude_mask(w, self)

    @property
    def stacked(self) -> bool:
        """True when weights of this spec are stored in the stacked layout (row-parallel runs)."""
        return self.split == "in" and self.shards > 1

    def __str__(self) -> str:
        shards = f",shards={self.shards}" if self.shards != 1 else ""
        split = f",split={self.split}" if self.split != "out" else ""
        return f"1x{self.n}@{self.density:g}{shards}{split}"

    def __repr__(self) -> str:
        # The whole-matrix default left out, as the spec was written before it had shards.
        shards = f", shards={self.shards!r}" if self.shards != 1 else ""
        split = f", split={self.split!r}" if self.split != "out" else ""
        return f"Blocks(n={self.n!r}, density={self.density!r}{shards}{split})"


_BLOCKS_STRING = re.compile(
    r"^\s*1\s*[xX]\s*(\d+)\s*@\s*([0-9.eE+-]+)\s*(%?)\s*(?:,\s*shards\s*=\s*(\d+)\s*)?"
    r"(?:,\s*split\s*=\s*(in|out)\s*)?$")


class BlocksSparse(SparseFormat):
    """A 1xN block sparse matrix of logical shape `[..., in, out]` (module docstring: layout).

    Build one with `BlocksSparse.fromdense(w, n=16, density=0.25)`,
    `BlocksSparse.frommask(w, mask, ...)` or `jaxsparse.fromdense(w, Blocks(16, 0.25))`;
    multiply with `x @ ws`.

    Attributes:
        values: `[..., nnz, n]` float32/bfloat16/float16, the kept blocks (trainable).
        indices: `[..., nnz]` int32, each block's input (frozen).
        indptr: `[..., ceil(out/n) + 1]` int32, where each block row starts (frozen); in the
            stacked layout (`split="in"`) `[..., shards * ceil(out/n) + 1]`, run after run.
        in_features, out_features: the logical shape (static).
        n, density, shards, split: the spec (static; `shards`: the equal runs of block rows,
            or of inputs with `split="in"`, that keep equal shares of the blocks, 1 when chosen
            over the whole matrix: column- or row-parallel products split over a divisor of
            it).

    Example:
        >>> import jax, jax.numpy as jnp, jaxsparse as jsp
        >>> w = jax.random.normal(jax.random.key(0), (64, 40))
        >>> ws = jsp.BlocksSparse.fromdense(w, n=16, density=0.25)
        >>> ws.values.shape, ws.indices.shape, ws.indptr.shape
        ((48, 16), (48,), (4,))
        >>> (jnp.ones((4, 64)) @ ws).shape
        (4, 40)
    """

    ARRAYS = (("values", TRAINABLE), ("indices", FROZEN), ("indptr", FROZEN))
    SPEC = Blocks
    STATIC_OUT = True
    # Static fields, set per instance (they shadow the base's derived properties).
    density: ClassVar = None
    out_features: ClassVar = None

    def __init__(self, values, indices, indptr, *, n: int, density: float, in_features: int,
                 out_features: int, shards: int = 1, split: str = "out"):
        where = "jaxsparse.BlocksSparse"
        spec = Blocks(n, density, shards, split).validate(where)
        in_features = V.check_int("in_features", in_features, low=1, high=2**31 - 1,
                                  where=where)
        out_features = V.check_int("out_features", out_features, low=1, high=2**31 - 1,
                                   where=where)
        values = V.as_array("values", values, where=where)
        indices = V.as_array("indices", indices, where=where)
        indptr = V.as_array("indptr", indptr, where=where)
        V.check_float_dtype("values", values.dtype, where=where)
        for name, a in (("indices", indices), ("indptr", indptr)):
            if not jnp.issubdtype(a.dtype, jnp.integer):
                raise TypeError(f"{where}: {name} must be an integer array, got {a.dtype.name}")
        V.check_rank("values", values, min_rank=2, where=where, what="[..., nnz, n]")
        lead = tuple(values.shape[:-2])
        shapes = self.array_shapes(spec, in_features, out_features)
        for name, a in (("values", values), ("indices", indices), ("indptr", indptr)):
            want = (*lead, *shapes[name][0])
            if tuple(a.shape) != want:
                raise ValueError(
                    f"{where}: {name} must have shape {want} (in_features={in_features}, "
                    f"out_features={out_features}, spec {spec}: {shapes['values'][0][0]} kept "
                    f"blocks of {spec.n} outputs in {num_groups(out_features, spec.n)} block "
                    f"rows); got {tuple(a.shape)}"
                )
        _check_shards(spec, in_features, out_features, where)
        if V.is_concrete(indices) and V.is_concrete(indptr):
            _check_structure(np.asarray(indices), np.asarray(indptr), in_features, where)
            _check_balance(np.asarray(indices), np.asarray(indptr), spec, in_features, where)
        self.values = values
        self.indices = indices.astype(jnp.int32)
        self.indptr = indptr.astype(jnp.int32)
        self.n, self.density, self.shards, self.split = spec
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def array_shapes(cls, spec: Blocks, in_features: int, out_features: int) -> dict:
        """`{name: (shape, dtype)}` of one weight's arrays; dtype None means the values' dtype."""
        nnz = spec.kept_blocks(in_features, out_features)
        rows = num_groups(out_features, spec.n) * (spec.shards if spec.stacked else 1)
        return {"values": ((nnz, spec.n), None), "indices": ((nnz,), jnp.int32),
                "indptr": ((rows + 1,), jnp.int32)}

    # ------------------------------------------------------------------ shape
    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.values.shape[:-2], self.in_features, self.out_features)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape[:-2])

    @property
    def block_rows(self) -> int:
        """`R = ceil(out/n)`, the block rows."""
        return num_groups(self.out_features, self.n)

    @property
    def stacked(self) -> bool:
        """True in the stacked layout (`split="in"` with shards: module docstring)."""
        return self.split == "in" and self.shards > 1

    # ------------------------------------------------------------------ construction
    @classmethod
    def fromdense(cls, w, *, n: int, density: float, shards: int = 1,
                  split: str = "out") -> "BlocksSparse":
        """Keep the `Blocks(n, density).kept_blocks(in, out)` blocks of largest L2 norm.

        Args:
            w: `[..., in, out]` float32/bfloat16/float16.
            n, density, shards, split: the spec (see `Blocks`). `shards=1` (default): the
                largest blocks of the whole matrix. `s > 1`: `s` equal runs, each keeping
                `kept_blocks / s` blocks (its largest), so the weight splits over `s`
                devices (or a divisor of `s`): runs of block rows (`split="out"`, column
                parallel; `out` must be a multiple of `n * s`) or of inputs (`split="in"`,
                row parallel, stacked; `in` must be a multiple of `s`); `kept_blocks` must be
                a multiple of `s`.

        Returns:
            A BlocksSparse of shape `w.shape`. Ties go to the earlier block (row-major over
            block rows, then inputs). Jittable.

        Example:
            >>> import jax, jaxsparse as jsp
            >>> w = jax.random.normal(jax.random.key(0), (64, 128))
            >>> ws = jsp.BlocksSparse.fromdense(w, n=16, density=0.25, shards=4)
            >>> ws.shards, ws.indptr[::2].tolist()  # 32 blocks in each pair of block rows.
            (4, [0, 32, 64, 96, 128])
        """
        where = "jaxsparse.BlocksSparse.fromdense"
        spec = Blocks(n, density, shards, split).validate(where)
        w = check_dense("w", w, where)
        _check_sizes(w.shape, where)
        _check_shards(spec, *w.shape[-2:], where)
        return _fromdense(w, spec)

    @classmethod
    def frommask(cls, w, mask, *, n: int, density: float, shards: int = 1,
                 split: str = "out") -> "BlocksSparse":
        """Keep the entries of `w` where `mask` is True; the mask must be made of whole blocks.

        Each block (one input, the real outputs of one block row) must be all True or all
        False, and at most `kept_blocks(in, out)` blocks may be True (with `shards=s`, at most
        `kept_blocks / s` in each of the `s` runs: see `fromdense`). The rest of the stored
        blocks are the lowest unmasked ones (row-major, in each run), holding 0, so
        `todense()` equals `where(mask, w, 0)` exactly.

        Args:
            w: `[..., in, out]` float32/bfloat16/float16.
            mask: `[..., in, out]` bool.
            n, density, shards, split: the spec, as in `fromdense`.
        """
        where = "jaxsparse.BlocksSparse.frommask"
        spec = Blocks(n, density, shards, split).validate(where)
        w = check_dense("w", w, where)
        _check_sizes(w.shape, where)
        mask = check_mask(mask, w, where)
        _check_shards(spec, *w.shape[-2:], where)
        if V.is_concrete(mask):
            _check_mask_blocks(np.asarray(mask), spec, where)
        return _frommask(jnp.where(mask, w, jnp.zeros((), w.dtype)), mask, spec)

    # ------------------------------------------------------------------ views
    def todense(self) -> jax.Array:
        """`[..., in, out]` in `dtype`: kept values in place, zeros elsewhere; bit-exact."""
        return rows_to_dense(self.dense_rows(), self.in_features)

    def dense_rows(self) -> jax.Array:
        """`todense()` before its transpose: `[..., out, in]`."""
        return self._scatter(self.values)

    def mask(self) -> jax.Array:
        """`[..., in, out]` bool: True at every stored position (including stored zeros)."""
        ones = jnp.ones(self.values.shape, jnp.bool_)
        return rows_to_dense(self._scatter(ones), self.in_features)

    def block_mask(self) -> jax.Array:
        """`[..., in, ceil(out/n)]` bool: True where a block is stored."""
        rows = self._rows()
        lead = self.batch_shape
        dense = jnp.zeros((*lead, self.block_rows, self.in_features), jnp.bool_)
        index = _lead_index(lead, rows.shape[-1])
        dense = dense.at[(*index, rows, self.indices)].set(True, mode="drop")
        return jnp.swapaxes(dense, -1, -2)

    def _rows(self):
        """The block row of every stored block (`[..., nnz]`; R or -1 outside every row)."""
        rows = block_rows(self.indptr, self.indices.shape[-1])
        if not self.stacked:
            return rows
        stacked = self.block_rows * self.shards  # Stacked row q = run * R + r.
        return jnp.where((rows >= 0) & (rows < stacked), rows % self.block_rows,
                         self.block_rows)

    def _scatter(self, values):
        """`values [..., nnz, n]` into `[..., out, in]` at the stored blocks."""
        lead, n = self.batch_shape, self.n
        rows = self._rows()
        dense = jnp.zeros((*lead, self.block_rows, self.in_features, n), values.dtype)
        index = _lead_index(lead, rows.shape[-1])
        dense = dense.at[(*index, rows, self.indices)].set(values, mode="drop")
        dense = jnp.swapaxes(dense, -1, -2).reshape(*lead, self.block_rows * n,
                                                    self.in_features)
        return dense[..., :self.out_features, :]

    def _kernel(self, x, values, indices, indptr):
        if not self.stacked:
            return blocks_spmm(x, values, indices, indptr, out_features=self.out_features)
        # The stacked BSR is a weight [in, shards * R * n] whose run j holds run j's inputs:
        # its product, in runs of R * n outputs, summed (in f32) is the weight's.
        width = self.block_rows * self.n
        parts = blocks_spmm(x, values, indices, indptr, out_features=self.shards * width)
        parts = parts.reshape(*parts.shape[:-1], self.shards, width)
        y = jnp.sum(parts.astype(jnp.float32), axis=-2).astype(parts.dtype)
        return y[..., :self.out_features]

    def _engine_kernel(self):
        return self._kernel  # The 1xN kernels are dense micro-kernels per block row.

    # ------------------------------------------------------------------ sharding
    def _shard_splits(self, mode: str):
        """A weight built with `shards=s` holds `nnz / s` blocks in each of its runs: of
        `out / s` outputs (`split="out"`: column parallel) or of `in / s` inputs
        (`split="in"`, stacked: row parallel). Values and indices split into such runs;
        indptr stays whole and each shard takes its rows from it (`_column_shard`,
        `_row_shard`). A weight chosen over the whole matrix holds uneven counts in every
        run, so it splits in neither mode."""
        split = "out" if mode == "column" else "in"
        if self.shards == 1 or self.split != split:
            why = ("its blocks were chosen over the whole matrix, so its runs hold uneven counts"
                   if self.shards == 1 else
                   f"its shards={self.shards} balance runs of "
                   f"{'inputs' if self.split == 'in' else 'outputs'}, not of "
                   f"{'outputs' if mode == 'column' else 'inputs'}")
            along = ', split="in"' if split == "in" else ""
            return (f"{why}; for {mode} parallel over s devices build it with the spec "
                    f"Blocks({self.n}, {self.density:g}, shards=s{along}) (a layer's "
                    f"sparsity=, or BlocksSparse.fromdense(w, n={self.n}, "
                    f"density={self.density:g}, shards=s{along}))")
        nnz = self.spec.kept_blocks(self.in_features, self.out_features)
        total = self.out_features if mode == "column" else self.in_features
        run = Split(-2, nnz // self.shards, total // self.shards)
        return {"values": run, "indices": Split(-1, run.elems, run.feats), "indptr": None}

    def _column_shard(self, arrays: tuple, shard, shards: int) -> tuple:
        """One column shard's arrays: its values and indices as held, its rows of indptr from
        the whole one, counted from its first block. `shard`: its index (traced)."""
        values, indices, indptr = arrays
        return values, indices, _local_indptr(indptr, shard, shards, values.shape[-2])

    def _row_shard(self, arrays: tuple, shard, shards: int) -> tuple:
        """One row shard's arrays (stacked layout): its values as held, its indices counted
        from its first input, its stacked rows of indptr (`shards / devices` runs of R rows)
        counted from its first block. `shard`: its index (traced)."""
        values, indices, indptr = arrays
        first = (shard * (self.in_features // shards)).astype(indices.dtype)
        return (values, indices - first,
                _local_indptr(indptr, shard, shards, values.shape[-2]))

    def _shard_consistent(self):
        """A shard's local BSR spans exactly its blocks, and its inputs are its own: else the
        weight was split by hand without the balance its spec claims (a tracer that escaped
        the constructor's check), and the shard would read other shards' blocks."""
        held = self.values.shape[-2]
        ok = jnp.all(self.indptr[..., 0] == 0) & jnp.all(self.indptr[..., -1] == held)
        return ok & jnp.all((self.indices >= 0) & (self.indices < self.in_features))

    def _shard_statics(self, statics: dict, out_shards: int, in_shards: int) -> dict:
        """A row shard holds `shards / in_shards` of the runs."""
        return {**statics, "shards": self.shards // in_shards} if self.stacked else statics

    def __repr__(self) -> str:
        return (f"BlocksSparse(shape={self.shape}, dtype={jnp.dtype(self.dtype).name}, "
                f"pattern={self.spec}, nbytes={self.nbytes})")


def _local_indptr(indptr, shard, shards: int, held: int):
    """A shard's equal share of indptr's (stacked) rows, counted from its first block, of the
    `held` it holds."""
    rows = (indptr.shape[-1] - 1) // shards
    local = jax.lax.dynamic_slice_in_dim(indptr, shard * rows, rows + 1, axis=-1)
    return local - (shard * held).astype(local.dtype)


# ---------------------------------------------------------------------- selection
def _block_scores(w, n: int, peak=None):
    """`[..., R, in]` float32: each block's squared L2 norm (outputs zero-padded to R*n), in
    units of `peak`'s power of two (default: each `[in, out]` matrix's max |w|).

    The power of two keeps the ranking of the blocks of one matrix exact while the squares
    stay inside float32's range: unscaled, they overflow past |w| ~ 1.8e19 and flush to zero
    below ~1e-19, and the tied blocks would then be kept by position, not by size. Scores
    compared across matrices (a model-wide threshold) must share one `peak`.
    """
    in_f, out_f = w.shape[-2:]
    rows = num_groups(out_f, n)
    wp = jnp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, rows * n - out_f)])
    blocks = wp.reshape(*w.shape[:-1], rows, n).astype(jnp.float32)
    if peak is None:
        peak = jnp.max(jnp.abs(blocks), axis=(-3, -2, -1), keepdims=True)
    _, exponent = jnp.frexp(jnp.asarray(peak, jnp.float32))
    blocks = jnp.ldexp(blocks, -exponent)  # Exact: a power of two, |blocks| < 1.
    return jnp.swapaxes(jnp.sum(blocks * blocks, axis=-1), -1, -2)


def _by_runs(score, spec: Blocks):
    """Block scores `[..., R, in]` as `[..., shards, candidates of a run]`, each run row-major
    (by block row, then input): runs of block rows, or, stacked, run j the block rows over
    inputs `[j in/s, j in/s + in/s)` (block rows `[j R, j R + R)` of the stacked BSR)."""
    *lead, rows, in_f = score.shape
    if spec.stacked:
        score = jnp.moveaxis(score.reshape(*lead, rows, spec.shards, in_f // spec.shards), -2, -3)
    return score.reshape(*lead, spec.shards, -1)


def _from_runs(runs, spec: Blocks, rows: int, in_f: int):
    """`_by_runs`'s inverse: `[..., shards, candidates]` back to `[..., R, in]`."""
    lead = runs.shape[:-2]
    if spec.stacked:
        runs = jnp.moveaxis(runs.reshape(*lead, spec.shards, rows, in_f // spec.shards), -3, -2)
    return runs.reshape(*lead, rows, in_f)


def _keep_top(w, score, spec: Blocks) -> BlocksSparse:
    """Store the `kept_blocks` blocks of highest `score [..., R, in]` (ties: lower block), an
    equal share from each of `spec.shards` equal runs (of block rows, or of inputs when
    stacked)."""
    shards = spec.shards
    in_f, out_f = w.shape[-2:]
    n, rows = spec.n, num_groups(out_f, spec.n)
    nnz = spec.kept_blocks(in_f, out_f)
    lead = w.shape[:-2]
    width = in_f // shards if spec.stacked else in_f  # Inputs of a run's rows.
    runs = _by_runs(score, spec)
    run = runs.shape[-1]  # Candidate blocks per run.
    _, ids = jax.lax.top_k(runs, nnz // shards)
    ids = jnp.sort(ids, axis=-1) + run * jnp.arange(shards)[:, None]
    ids = ids.reshape(*lead, nnz).astype(jnp.int32)
    row, col = ids // width, ids % width  # Stacked: row q = j R + r, col within run j.
    if spec.stacked:
        col = col + row // rows * width
    wp = jnp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, rows * n - out_f)])
    blocks = jnp.swapaxes(wp.reshape(*lead, in_f, rows, n), -3, -2)  # [..., R, in, n]
    flat = (row % rows) * in_f + col
    values = jnp.take_along_axis(blocks.reshape(*lead, rows * in_f, n), flat[..., None],
                                 axis=-2)
    starts = jnp.arange(rows * (shards if spec.stacked else 1) + 1, dtype=jnp.int32)
    search = functools.partial(jnp.searchsorted, side="left")
    for _ in lead:
        search = jax.vmap(search, in_axes=(0, None))
    indptr = search(row, starts).astype(jnp.int32)
    return BlocksSparse.tree_unflatten((*spec, in_f, out_f), (values, col, indptr))


@functools.partial(jax.jit, static_argnums=1)
def _fromdense(w, spec: Blocks) -> BlocksSparse:
    return _keep_top(w, _block_scores(w, spec.n), spec)


@functools.partial(jax.jit, static_argnums=2)
def _frommask(w, mask, spec: Blocks) -> BlocksSparse:
    # Masked blocks first, then unmasked ones in row-major order (they hold zeros).
    masked = _block_scores(mask.astype(jnp.float32), spec.n) > 0
    return _keep_top(w, masked.astype(jnp.float32), spec)


@functools.partial(jax.jit, static_argnums=1)
def _magnitude_mask(w, spec: Blocks) -> jax.Array:
    return _fromdense(w, spec).mask()


# ---------------------------------------------------------------------- checks
def _check_sizes(shape, where):
    if shape[-2] < 1 or shape[-1] < 1:
        raise ValueError(f"{where}: w must have at least one input and one output; got shape "
                         f"{tuple(shape)}")


def _shards_misfit(spec: Blocks, in_features: int, out_features: int) -> str | None:
    """None when `spec.shards` divides a `[in, out]` weight into equal runs of whole block rows
    (or of inputs, `split="in"`) holding equal shares of the kept blocks, else why not."""
    shards = spec.shards
    if shards == 1:
        return None
    rows, nnz = num_groups(out_features, spec.n), spec.kept_blocks(in_features, out_features)
    if spec.stacked:
        if in_features % shards or nnz % shards:
            return (f"shards={shards}, split='in' must divide the weight into equal runs of "
                    f"inputs holding equal shares of the kept blocks: in_features="
                    f"{in_features} must be a multiple of {shards} and the {nnz} kept blocks "
                    f"({spec._replace(shards=1, split='out')}) a multiple of {shards}")
        return None
    if out_features % spec.n or rows % shards or nnz % shards:
        return (f"shards={shards} must divide the weight into equal runs of whole 1x{spec.n} "
                f"block rows holding equal shares of the kept blocks: out_features="
                f"{out_features} must be a multiple of n*shards={spec.n * shards} and the "
                f"{nnz} kept blocks ({spec._replace(shards=1)}) a multiple of {shards}")
    return None


def _check_shards(spec: Blocks, in_features: int, out_features: int, where: str) -> None:
    reason = _shards_misfit(spec, in_features, out_features)
    if reason is not None:
        raise ValueError(f"{where}: {reason}")


def _check_balance(indices: np.ndarray, indptr: np.ndarray, spec: Blocks, in_features: int,
                   where: str) -> None:
    """Concrete: each of the `shards` runs of (stacked) block rows holds `nnz / shards` blocks,
    and, stacked, only inputs of its own run."""
    shards = spec.shards
    if shards == 1:
        return
    rows = indptr.shape[-1] - 1
    starts = indptr[..., ::rows // shards].reshape(-1, shards + 1)
    held = np.diff(starts, axis=-1)
    runs = "stacked block rows" if spec.stacked else "block rows"
    split = ", split='in'" if spec.stacked else ""
    if np.any(held != held[:, :1]):
        b = int(np.argwhere(np.any(held != held[:, :1], axis=-1))[0, 0])
        at = f" (stack entry {b})" if starts.shape[0] > 1 else ""
        raise ValueError(
            f"{where}: shards={shards} needs equal blocks in each run of {rows // shards} "
            f"{runs}; indptr gives {held[b].tolist()}{at} (BlocksSparse.fromdense(..., "
            f"shards={shards}{split}) keeps them equal)")
    if spec.stacked:
        width = in_features // shards
        nnz = indices.shape[-1]
        run = np.arange(nnz) // max(1, nnz // shards)
        outside = (indices // width) != run
        if outside.any():
            *lead, p = (int(i) for i in np.argwhere(outside)[0])
            raise ValueError(
                f"{where}: stacked run {run[p]} (blocks [{run[p] * (nnz // shards)}, "
                f"{(run[p] + 1) * (nnz // shards)})) must hold inputs [{run[p] * width}, "
                f"{(run[p] + 1) * width}); block {p} holds input {int(indices[(*lead, p)])}"
                f"{_at(lead)}")


def _lead_index(lead, nnz):
    """Index arrays that broadcast the leading (stack) dims against `[..., nnz]`."""
    grids = []
    for axis, size in enumerate(lead):
        shape = [1] * (len(lead) + 1)
        shape[axis] = size
        grids.append(jnp.arange(size).reshape(shape))
    return tuple(jnp.broadcast_to(g, (*lead, nnz)) for g in grids)


def _check_structure(indices: np.ndarray, indptr: np.ndarray, in_features: int, where: str):
    """Concrete BSR structure: indptr from 0 to nnz, non-decreasing; indices in [0, in),
    strictly increasing inside each block row."""
    nnz = indices.shape[-1]
    flat_ptr = indptr.reshape(-1, indptr.shape[-1])
    flat_idx = indices.reshape(-1, nnz)
    for b, (ptr, idx) in enumerate(zip(flat_ptr, flat_idx)):
        at = f" (stack entry {b})" if flat_ptr.shape[0] > 1 else ""
        if ptr[0] != 0 or ptr[-1] != nnz or np.any(np.diff(ptr) < 0):
            raise ValueError(
                f"{where}: indptr must run from 0 to nnz={nnz}, non-decreasing; got "
                f"{_preview(ptr)}{at}"
            )
        if idx.size and (idx.min() < 0 or idx.max() >= in_features):
            bad = int(np.argwhere((idx < 0) | (idx >= in_features))[0, 0])
            raise ValueError(f"{where}: indices must be inputs in [0, {in_features}); got "
                             f"{int(idx[bad])} at block {bad}{at}")
        step = np.diff(idx.astype(np.int64)) > 0
        starts = np.zeros(nnz, bool)
        starts[ptr[1:-1][ptr[1:-1] < nnz]] = True  # A row's first block may be lower.
        bad = np.argwhere(~step & ~starts[1:])
        if bad.size:
            p = int(bad[0, 0]) + 1
            raise ValueError(f"{where}: indices must be strictly increasing inside each block "
                             f"row (distinct, sorted inputs); block {p} holds input "
                             f"{int(idx[p])} after {int(idx[p - 1])}{at}")


def _preview(a) -> str:
    items = a.tolist()
    return str(items) if len(items) <= 12 else f"[{items[0]}, ..., {items[-1]}] (length {len(items)})"


def _check_mask_blocks(mask: np.ndarray, spec: Blocks, where: str) -> None:
    """A 1xN mask: whole blocks only, at most `kept_blocks` of them (`kept_blocks / shards` in
    each run of block rows)."""
    shards = spec.shards
    in_f, out_f = mask.shape[-2:]
    n, rows = spec.n, num_groups(out_f, spec.n)
    pad = rows * n - out_f
    padded = np.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, pad)])
    blocks = padded.reshape(*mask.shape[:-1], rows, n)
    real = np.arange(rows * n).reshape(rows, n) < out_f
    any_set = blocks.any(axis=-1)
    whole = (blocks | ~real).all(axis=-1)
    broken = any_set & ~whole
    if broken.any():
        *lead, k, r = (int(i) for i in np.argwhere(broken)[0])
        raise ValueError(
            f"{where}: mask breaks a 1x{n} block: input {k}, outputs "
            f"[{r * n}, {min(r * n + n, out_f)}) are partly kept{_at(lead)}; a block is kept "
            "or pruned whole"
        )
    count = any_set.reshape(*any_set.shape[:-2], -1).sum(axis=-1)
    limit = spec.kept_blocks(in_f, out_f)
    if count.size and count.max() > limit:
        lead = tuple(int(i) for i in np.argwhere(count > limit)[0]) if count.ndim else ()
        raise ValueError(
            f"{where}: mask keeps {int(count.max())} blocks{_at(lead)}; {spec} allows at most "
            f"{limit} of {in_f * rows} (density {spec.density:g}): raise the density or drop "
            "blocks"
        )
    if shards == 1:
        return
    if spec.stacked:
        width = in_f // shards
        runs = any_set.reshape(*any_set.shape[:-2], shards, width, rows).sum(axis=(-2, -1))
        what = "inputs [{0}, {1})"
        span = width
    else:
        runs = any_set.reshape(*any_set.shape[:-2], in_f, shards, rows // shards).sum(
            axis=(-3, -1))
        what = "block rows [{0}, {1})"
        span = rows // shards
    if runs.max() > limit // shards:
        *lead, run = (int(i) for i in np.argwhere(runs > limit // shards)[0])
        raise ValueError(
            f"{where}: mask keeps {int(runs[(*lead, run)])} blocks in "
            f"{what.format(run * span, (run + 1) * span)}{_at(lead)}; with shards={shards} "
            f"each run keeps at most {limit // shards}")


def _at(lead) -> str:
    return f" at batch index {tuple(lead)}" if lead else ""
