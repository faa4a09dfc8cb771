"""Sharded products: every format's kernel partitions under `jit` with `NamedSharding`s.

XLA's partitioner cannot see inside a custom call: left alone it would gather every operand of
a jaxsparse kernel onto every device. So the product of every format (`x @ w`, on the sparse and
engine paths) binds one wrapper primitive, `sharded_product_p`, whose lowering, in a program
partitioned over more than one device, goes through `jax.experimental.custom_partitioning`: from
the operands' shardings its partition rule picks a plan, and each device runs the format's own
kernel on its shard:

- **data parallel**: x's tokens sharded, the weight replicated: the local kernel on local
  tokens, the output sharded on its tokens.
- **column parallel** (tensor parallel over output features): the weight's arrays sharded along
  their output axis: the local kernel on the local outputs, the output sharded on its last dim.
- **row parallel** (tensor parallel over input features): x's last dim and the weight's input
  axis sharded: the local kernel on the local inputs, then a `psum` (in f32) over the axis.

Plans combine (tokens over one mesh axis and outputs over another). No plan gathers a weight:
when the weight is sharded in a way its format cannot run locally (a row split that cuts a
group, or splits a weight along an axis its format does not split), the rule falls back to the
replicated weight, which is correct, and warns (`JaxsparseShardingWarning`).

What each format can do is declared by the format (`SparseFormat._shard_splits`): per mode,
per stored array, the axis that runs over output (or input) features and how many elements of
it hold how many features (a `Split`). The shard's weight is `from_arrays(spec, local_in,
local_arrays)` and its product is the format's `_kernel`, so a new format needs only its
declaration. Which format runs in which mode:

============================  ==============  =========================  =====================
format                        data parallel   column parallel            row parallel
============================  ==============  =========================  =====================
NMSparse (N:M)                yes             yes                        in a multiple of m *
VNMSparse (V:N:M)             yes             out a multiple of v        in a multiple of m
VNMSparseTiled                yes             out a multiple of v        m (f32), 8 m (bf16)
BlocksSparse (1xN)            yes             built with shards= **      shards=, split="in" **
Int4Weight / W4A8             yes             yes                        in a multiple of group ***
Int4NMWeight (int4 + 2:4)     yes             yes                        multiple of group, 8
Int4LinesWeight / NMLines     yes             out a multiple of 64       multiple of group (, 16)
MARLIN layouts (CUDA) ***     yes             out a multiple of 64       whole K tiles and groups
============================  ==============  =========================  =====================

(* and of 8 inputs for 2:4, whose 2-bit positions pack 8 inputs per byte. ** a 1xN weight
chosen over the whole matrix holds uneven block counts per run of outputs or inputs; one of
the spec `Blocks(n, density, shards=s)` (a layer's `sparsity=`, or `BlocksSparse.fromdense(w,
n=, density=, shards=s)`) keeps equal counts in `s` equal runs of block rows and splits
column-parallel over a divisor of `s` devices; one of `Blocks(n, density, shards=s,
split="in")` keeps equal counts in `s` equal runs of inputs, stored run after run (the stacked
layout, jaxsparse/formats/blocks.py), and splits row-parallel. Either way values and indices
split by runs and indptr stays whole, each shard taking its rows of it. V:N:M's packed tiles
hold each panel's words as `[output tiles, k steps, words]`: panels split column-parallel, k
steps row-parallel (an f32 step is one group of m inputs, a bf16 step 8 groups). The int4 lines
hold `[..., ceil(out/64), lines per block, 64]`: blocks of 64 outputs split column-parallel,
each block's lines row-parallel (a line per 2 inputs; 8 lines per chunk of 16 at 2:4) in whole
groups. *** Int4MarlinWeight and Int4NMMarlinWeight: a packed row holds one K tile's 64-column
blocks one after the other and the scales are permuted inside 64 columns, so a shard of whole
64-column blocks, or of whole K tiles (64 inputs, 128 at 2:4) and whole groups, holds exactly
the MARLIN layout of its own columns or inputs. Every int4 layout with one scale per column
keeps all of them on each row shard: a shard's partial product is scaled as the whole one's,
except with int8 activations, whose quantisation then spans every input.) "in a multiple of"
is per shard: `in_features / shards`.
`shard_weight(w, mesh, mode, axis)` raises a ValueError naming the format and the mode where it
cannot shard.

Limits, all correct but not split: the kernel batch dim (a stack of weights) stays whole, so
expert parallelism over a stack gathers; a product under `vmap` runs its kernel's batching rule,
unpartitioned; row parallel in bf16/f16 rounds each shard's partial product to the dtype before
the f32 sum (about one rounding more than one device).

Autodiff: `sharded_product_p`'s JVP is the format's kernel's own (its primitives and their
rules), bound as `sharded_tangent_p`, whose transpose `sharded_cotangent_p` runs the backward
kernels; both partition by the product's plan (x's cotangent summed over the output shards in
column parallel, the weight arrays' over the token shards in data parallel), so `grad` of a jit
over sharded operands gathers no weight either. Second derivatives and `vmap` of those run the
kernels' own rules, unpartitioned. A data-parallel training step can also run every kernel
locally under `jax.shard_map`, where a replicated weight is cast to varying like jax's own
binary ops do, so its gradient comes out summed over the devices (examples/sharded.py,
tests/test_sharding.py).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive, jaxpr_as_fun
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding, PartitionSpec

try:  # The wrapper must lower with concrete devices (custom_partitioning needs them).
    from jax._src import dispatch as _dispatch
    from jax._src import sharding_impls as _sharding_impls
except ImportError:  # pragma: no cover - a jax without these private modules
    _dispatch = _sharding_impls = None

try:
    from jax.experimental.custom_partitioning import custom_partitioning
except ImportError:  # pragma: no cover
    custom_partitioning = None

MODES = ("data", "column", "row")


class JaxsparseShardingWarning(UserWarning):
    """A sharded product fell back to a replicated weight (correct, but gathers the weight)."""


class Split(NamedTuple):
    """How a stored array runs along output (or input) features: `elems` elements of `axis`
    (negative, counted from the end) hold `feats` logical features, and a shard must hold a
    whole number of such runs."""

    axis: int
    elems: int
    feats: int


# ====================================================================== public helpers
def shard_weight(w, mesh, mode: str, axis_name=None):
    """`w` with each stored array placed on `mesh` for `mode`.

    Args:
        w: a jaxsparse format (one weight, `[in, out]`, or a stack `[..., in, out]`).
        mesh: a `jax.sharding.Mesh`.
        mode: "data" (replicated), "column" (split over output features) or "row" (split over
            input features).
        axis_name: the mesh axis (or tuple of axes) to split over (column and row modes).

    Returns:
        The same format, each array `jax.device_put` with its `NamedSharding`.

    Raises:
        ValueError: the format cannot be split so in `mode` (its name and the reason in the
            message), or the shape does not divide into the mesh axis.
    """
    specs = weight_specs(w, mesh, mode, axis_name)
    arrays = {name: jax.device_put(a, NamedSharding(mesh, specs[name]))
              for name, a in w.arrays().items()}
    return type(w)._unflatten(w._aux, tuple(arrays[n] for n in type(w).array_names()))


def weight_specs(w, mesh, mode: str, axis_name=None) -> dict:
    """`{array name: PartitionSpec}` of `shard_weight` (for `jit`'s `in_shardings`)."""
    where = "jaxsparse.shard_weight"
    if mode not in MODES:
        raise ValueError(f"{where}: mode must be one of {MODES}; got {mode!r}")
    arrays = w.arrays()
    if mode == "data":
        return {name: PartitionSpec() for name in arrays}
    if axis_name is None:
        raise ValueError(f"{where}: mode={mode!r} needs axis_name, the mesh axis to split over")
    axes = _as_axes(axis_name)
    shards = math.prod(mesh.shape[a] for a in axes)
    splits, reason = _splits_for(w, mode, shards)
    if splits is None:
        raise ValueError(f"{where}: {type(w).__name__} ({w.spec}, shape {w.shape}) cannot be "
                         f"split in {mode} mode over {shards} shards: {reason}")
    specs = {}
    for name, a in arrays.items():
        split = splits.get(name)
        if split is None:
            specs[name] = PartitionSpec()
            continue
        dims = [None] * jnp.ndim(a)
        dims[split.axis] = axes if len(axes) > 1 else axes[0]
        specs[name] = PartitionSpec(*dims)
    return specs


def x_spec(mode: str, axis_name=None, *, ndim: int = 2) -> PartitionSpec:
    """The `PartitionSpec` of an activation `x [..., in]` (rank `ndim`) for `mode`: tokens (the
    first dim) over `axis_name` for "data", replicated for "column", the last dim for "row"."""
    if mode not in MODES:
        raise ValueError(f"jaxsparse.x_spec: mode must be one of {MODES}; got {mode!r}")
    dims = [None] * ndim
    if mode == "data":
        dims[0] = axis_name
    elif mode == "row":
        dims[-1] = axis_name
    return PartitionSpec(*dims)


def shard_x(x, mesh, mode: str, axis_name=None):
    """`x [..., in]` placed on `mesh` for `mode` (`x_spec`)."""
    return jax.device_put(x, NamedSharding(mesh, x_spec(mode, axis_name, ndim=jnp.ndim(x))))


# ====================================================================== the plan
def _as_axes(axis_name) -> tuple:
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _splits_for(w, mode: str, shards: int):
    """`(splits, None)`: the format's `Split` per array for `mode` when `w` divides into
    `shards` shards of whole runs, else `(None, reason)`."""
    declared = w._shard_splits(mode)
    if isinstance(declared, str):
        return None, declared
    total = w.out_features if mode == "column" else w.in_features
    if total % shards:
        return None, f"{'out' if mode == 'column' else 'in'}_features={total} is not a " \
                     f"multiple of {shards}"
    local = total // shards
    arrays = w.arrays()
    for name, split in declared.items():
        if split is None:
            continue
        shape = tuple(arrays[name].shape)
        if local % split.feats or total // split.feats * split.elems != shape[split.axis]:
            return None, (f"each shard's {local} {'outputs' if mode == 'column' else 'inputs'} "
                          f"must be whole runs of {split.feats} in {name} (shape {shape}, "
                          f"{split.elems} elements per {split.feats} features along axis "
                          f"{split.axis}, none padded)")
    return declared, None


def _spec_axes(sharding, ndim) -> list[tuple]:
    """The mesh axes of each of `ndim` dims of a NamedSharding, as tuples."""
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return [() if s is None else _as_axes(s) for s in spec[:ndim]]


def _size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


class _Plan(NamedTuple):
    tokens: tuple  # Mesh axes over x's tokens (and the output's).
    out: tuple  # Over output features (column parallel).
    inp: tuple  # Over input features (row parallel: psum).
    out_splits: dict
    in_splits: dict


def _plan(fmt, mesh, arg_shapes):
    """The plan for operands sharded as `arg_shapes` (x3 then the weight's rank-3 arrays)."""
    x, *arrays = arg_shapes
    names = type(fmt).array_names()
    shardings = [s.sharding for s in arg_shapes]
    if not all(isinstance(s, NamedSharding) for s in shardings):
        return _Plan((), (), (), {}, {})
    x_axes = _spec_axes(shardings[0], 3)

    def weight_axes(mode):
        declared = fmt._shard_splits(mode)
        if isinstance(declared, str):
            return (), declared
        for name, a, s in zip(names, arrays, shardings[1:]):
            split = declared.get(name)
            if split is not None:
                axes = _spec_axes(s, len(a.shape))[split.axis]
                if axes:
                    return axes, declared
        return (), declared

    def usable(mode, axes):
        if not axes:
            return {}
        splits, reason = _splits_for(fmt, mode, _size(mesh, axes))
        if splits is None:
            warnings.warn(f"jaxsparse: {type(fmt).__name__} cannot run {mode}-parallel over "
                          f"mesh axes {axes} ({reason}); multiplying by the replicated weight",
                          JaxsparseShardingWarning, stacklevel=2)
        return splits

    in_axes, _ = weight_axes("row")
    if not in_axes:  # x split over its inputs and a replicated weight: slice the weight.
        in_axes = x_axes[2]
    in_splits = usable("row", in_axes) if in_axes else {}
    in_axes = in_axes if in_splits else ()
    out_axes, _ = weight_axes("column")
    out_axes = tuple(a for a in out_axes if a not in in_axes)
    out_splits = usable("column", out_axes) if out_axes else {}
    out_axes = out_axes if out_splits else ()
    tokens = tuple(a for a in x_axes[1] if a not in in_axes + out_axes)
    if tokens and x.shape[1] % _size(mesh, tokens):
        tokens = ()
    return _Plan(tokens, out_axes, in_axes, out_splits or {}, in_splits or {})


def _dim(axes):
    return None if not axes else (axes if len(axes) > 1 else axes[0])


class _Layout(NamedTuple):
    """A plan's shardings: of x, of each weight array, of the product."""
    x: NamedSharding
    arrays: tuple
    out: NamedSharding


def _layout(cls, plan, mesh, array_shapes) -> _Layout:
    arrays = []
    for name, a in zip(cls.array_names(), array_shapes):
        dims = [None] * len(a.shape)
        for axes, splits in ((plan.out, plan.out_splits), (plan.inp, plan.in_splits)):
            split = splits.get(name)
            if axes and split is not None:
                dims[split.axis] = _dim(axes)
        arrays.append(NamedSharding(mesh, PartitionSpec(*dims)))
    return _Layout(NamedSharding(mesh, PartitionSpec(None, _dim(plan.tokens), _dim(plan.inp))),
                   tuple(arrays),
                   NamedSharding(mesh, PartitionSpec(None, _dim(plan.tokens), _dim(plan.out))))


def _planned(cls, aux, mesh, arg_shapes):
    """The plan for the primal operands `arg_shapes` (x3, then the weight's arrays), its
    shardings and the static fields of one shard's weight."""
    fmt = cls._unflatten(aux, tuple(arg_shapes[1:]))
    plan = _plan(fmt, mesh, arg_shapes)
    layout = _layout(cls, plan, mesh, arg_shapes[1:])
    _warn_dropped(fmt, mesh, arg_shapes, (layout.x,) + layout.arrays)
    local_aux = _local_aux(fmt, aux, _size(mesh, plan.out), _size(mesh, plan.inp))
    return plan, layout, local_aux


def _shard_arrays(cls, aux, plan, mesh, arrays) -> tuple:
    """One shard's weight arrays from those it holds: the format's `_column_shard` where the
    plan splits the outputs and its `_row_shard` where it splits the inputs (1xN takes its
    rows of the whole indptr), else as held."""
    arrays = tuple(arrays)
    fmt = cls._unflatten(aux, arrays)
    if plan.out:
        arrays = fmt._column_shard(arrays, jax.lax.axis_index(plan.out), _size(mesh, plan.out))
    if plan.inp:
        arrays = fmt._row_shard(arrays, jax.lax.axis_index(plan.inp), _size(mesh, plan.inp))
    return arrays


def _guarded(cls, local_aux, plan, arrays, outs):
    """`outs` (a product or its cotangents), NaN throughout where the plan splits the weight
    and the format finds its local arrays inconsistent (`_shard_consistent`: a hand-split 1xN
    weight without the balance its spec claims): a shard's wrong structure could otherwise
    leave some outputs silently wrong, as it never reads them. Data parallel keeps the weight
    whole: nothing to check."""
    if not (plan.out or plan.inp):
        return outs
    ok = cls._unflatten(local_aux, tuple(arrays))._shard_consistent()
    if ok is None:
        return outs
    return jax.tree.map(lambda a: jnp.where(ok, a, jnp.asarray(jnp.nan, a.dtype))
                        if jnp.issubdtype(a.dtype, jnp.floating) else a, outs)


def _psum_f32(y, axes):
    """The sum over mesh `axes` of partial results, added in f32."""
    return jax.lax.psum(y.astype(jnp.float32), axes).astype(y.dtype) if axes else y


def _partition(cls, aux, kind, mesh, arg_shapes, result_shape):
    del result_shape
    plan, layout, local_aux = _planned(cls, aux, mesh, arg_shapes)

    def lower_fn(x3, *arrays3):
        arrays3 = _shard_arrays(cls, aux, plan, mesh, arrays3)
        y = _guarded(cls, local_aux, plan, arrays3, _call(cls, local_aux, kind, x3, arrays3))
        return _psum_f32(y, plan.inp)

    return mesh, lower_fn, layout.out, (layout.x,) + layout.arrays


def _warn_dropped(fmt, mesh, arg_shapes, arg_shardings):
    """Warn when a weight array arrives split along a dim the plan keeps whole (XLA gathers
    it: correct, but the weight is no longer split)."""
    for name, a, planned in zip(type(fmt).array_names(), arg_shapes[1:], arg_shardings[1:]):
        if not isinstance(a.sharding, NamedSharding):
            continue
        have = _spec_axes(a.sharding, len(a.shape))
        keep = _spec_axes(planned, len(a.shape))
        if any(h and h != k for h, k in zip(have, keep)):
            warnings.warn(
                f"jaxsparse: {type(fmt).__name__}'s {name} arrives split as {a.sharding.spec}, "
                f"which its format cannot multiply locally; gathering it (the layouts each "
                f"format splits: jaxsparse.shard_weight)", JaxsparseShardingWarning,
                stacklevel=2)


def _local_aux(fmt, aux, out_shards, in_shards):
    """The static fields of one shard's weight: `in_features` (and a static `out_features`)
    divided by the shards."""
    names = type(fmt).static_names()
    local = dict(zip(names, aux))
    local["in_features"] = fmt.in_features // in_shards
    if "out_features" in local:
        local["out_features"] = fmt.out_features // out_shards
    local = fmt._shard_statics(local, out_shards, in_shards)
    return tuple(local[n] for n in names)


def _sharding_rule(cls, aux, kind, mesh, operand_types, result_types):
    """Shardy's rule (with its compound factors' sizes)."""
    del kind, mesh, result_types
    operands, result, sizes = _rule_factors(cls, aux, operand_types)
    return ", ".join(operands) + " -> " + result, sizes


def _rule_factors(cls, aux, operand_types):
    """Shardy's factors of the operands and the product, and the compound factors' sizes: x's
    tokens and the output's tokens are one factor, and so are the weight's output axis (where
    it runs one element per output) and the output's last dim. A format with no such axis but
    with runs (1xN built with shards: `nnz / s` blocks hold `out / s` outputs) shares the run
    factor `o` of its split axes and of the output's last dim. Every other dim is its own factor
    (the partition rule decides about them)."""
    column = _declared(cls, aux, "column")
    one_to_one = any(s.elems == s.feats == 1 for s in column.values())
    parts, result, sizes = ["xb t xk"], "rb t ro", {}
    for i, (name, typ) in enumerate(zip(cls.array_names(), operand_types[1:])):
        rank = len(typ.shape)
        dims = [f"w{i}d{j}" for j in range(rank)]
        split = column.get(name)
        if split is not None and one_to_one and split.elems == split.feats == 1:
            dims[rank + split.axis] = "o"
            result = "rb t o"
        elif split is not None and not one_to_one:
            dims[rank + split.axis] = f"(o w{i}e)"
            sizes.update({"o": typ.shape[split.axis] // split.elems, f"w{i}e": split.elems,
                          "of": split.feats})
            result = "rb t (o of)"
        parts.append(" ".join(dims))
    return parts, result, sizes


def _declared(cls, aux, mode):
    declared = cls._unflatten(aux, (None,) * len(cls.array_names()))._shard_splits(mode)
    return {} if isinstance(declared, str) else {k: v for k, v in declared.items() if v}


# ====================================================================== the primitive
sharded_product_p = Primitive("jaxsparse_sharded_product")


def sharded_product(fmt, kind: str, x3, arrays3):
    """`fmt`'s kernel (`kind`: "sparse" its `_kernel`, "engine" its `_engine_kernel()`) on the
    rank-3 operands, partitioned by the operands' shardings under `jit`.

    The primitive carries the kernel's jaxpr as a parameter (`jaxpr`): printed jaxprs show the
    kernel's primitives inside, and single-device programs lower exactly that."""
    args = _same_varying_axes(x3, *arrays3)
    jaxpr = _traced(type(fmt), fmt._aux, kind, tuple((a.shape, a.dtype) for a in args))
    return sharded_product_p.bind(*args, jaxpr=jaxpr, cls=type(fmt), aux=fmt._aux, kind=kind)


def _same_varying_axes(*args):
    """Inside `shard_map`, mark float operands that are the same on every device (a replicated
    weight) as varying where x varies, as jax's own binary ops do: the transpose of that cast
    sums the weight's per-device cotangents, so its gradient has the weight's type."""
    vma = [_varying(a) for a in args]
    every = frozenset().union(*vma)
    if not every:
        return args
    out = []
    for a, have in zip(args, vma):
        missing = tuple(sorted(every - have))
        if missing and jnp.issubdtype(a.dtype, jnp.floating):
            if hasattr(jax.lax, "pcast"):
                a = jax.lax.pcast(a, missing, to="varying")
            else:  # jax before pcast
                a = jax.lax.pvary(a, missing)
        out.append(a)
    return tuple(out)


def _varying(a) -> frozenset:
    """The manual mesh axes `a` varies over inside `shard_map` (empty outside)."""
    aval = jax.typeof(a) if hasattr(jax, "typeof") else jax.core.get_aval(a)
    mat = getattr(aval, "mat", None)  # jax 0.12; before, the aval's `vma`.
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _call(cls, aux, kind, x3, arrays3):
    fmt = cls._unflatten(aux, tuple(arrays3))
    kernel = fmt._kernel if kind == "sparse" else fmt._engine_kernel()
    return kernel(x3, *arrays3)


@functools.lru_cache(maxsize=512)
def _traced(cls, aux, kind, avals):
    structs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in avals]
    return jax.make_jaxpr(lambda x, *a: _call(cls, aux, kind, x, a))(*structs)


def _abstract_eval(*args, jaxpr, cls, aux, kind):
    (out,) = jaxpr.out_avals
    # x's aval carries what the kernels' own abstract evals keep (shard_map's varying axes).
    return args[0].update(shape=out.shape, dtype=out.dtype)


def _impl(*args, jaxpr, cls, aux, kind):
    """Eager: the kernel's primitives, each on its own (as without the wrapper)."""
    return _call(cls, aux, kind, args[0], args[1:])


def _jvp(primals, tangents, *, jaxpr, cls, aux, kind):
    """The kernel's own JVP (its primitives' rules) on the operands with nonzero tangents, bound
    as `sharded_tangent_p` so that it, and its transpose (the backward kernels), partition as
    the product does."""
    out = sharded_product_p.bind(*primals, jaxpr=jaxpr, cls=cls, aux=aux, kind=kind)
    live = tuple(i for i, t in enumerate(tangents) if type(t) is not ad.Zero)
    if not live:
        return out, ad.Zero.from_primal_value(out)
    t_out = sharded_tangent_p.bind(*primals, *(tangents[i] for i in live), live=live, cls=cls,
                                   aux=aux, kind=kind)
    return out, t_out


def _batch(args, dims, *, jaxpr, cls, aux, kind):
    """vmap of the kernel itself (its batching rules fold the mapped axis into its batch)."""
    in_axes = tuple(dims)  # Unmapped operands have None.
    out = jax.vmap(lambda x, *a: _call(cls, aux, kind, x, a), in_axes=in_axes)(*args)
    return out, 0


def _partitioned(cls, aux, kind):
    """The custom-partitioned kernel call for one weight's static fields."""

    def call(x3, *arrays3):
        return _call(cls, aux, kind, x3, arrays3)

    wrapped = custom_partitioning(call)
    wrapped.def_partition(
        partition=functools.partial(_partition, cls, aux, kind),
        infer_sharding_from_operands=functools.partial(_infer, cls, aux, kind),
        sharding_rule=functools.partial(_sharding_rule, cls, aux, kind),
    )
    return wrapped


def _infer(cls, aux, kind, mesh, arg_shapes, result_shape):
    """GSPMD's (non-Shardy) propagation: the output sharding of the plan."""
    del result_shape
    return _planned_layout(cls, aux, mesh, arg_shapes).out


def _planned_layout(cls, aux, mesh, arg_shapes) -> _Layout:
    """The shardings of the plan for the primal operands `arg_shapes` (no warning: the
    partition rules, through `_planned`, give it)."""
    fmt = cls._unflatten(aux, tuple(arg_shapes[1:]))
    return _layout(cls, _plan(fmt, mesh, arg_shapes), mesh, arg_shapes[1:])


def _multi_device(ctx) -> bool:
    context = ctx.module_context.axis_context
    if _sharding_impls is None or custom_partitioning is None:
        return False
    return (isinstance(context, _sharding_impls.ShardingContext)
            and context.device_assignment is not None and len(context.device_assignment) > 1)


def _lowering(ctx, *args, jaxpr, cls, aux, kind):
    if _multi_device(ctx):
        return mlir.lower_fun(_partitioned(cls, aux, kind), multiple_results=False)(ctx, *args)
    return mlir.lower_fun(jaxpr_as_fun(jaxpr), multiple_results=True)(ctx, *args)


sharded_product_p.def_impl(_impl)
sharded_product_p.def_abstract_eval(_abstract_eval)
ad.primitive_jvps[sharded_product_p] = _jvp
batching.primitive_batchers[sharded_product_p] = _batch
mlir.register_lowering(sharded_product_p, _lowering)
if _dispatch is not None:
    _dispatch.prim_requires_devices_during_lowering.add(sharded_product_p)


# ====================================================================== the backward
# The JVP of the product binds `sharded_tangent_p` (linear in the tangents of the operands
# `live`), whose transpose binds `sharded_cotangent_p` (the backward kernels: x's cotangent and
# the weight arrays'). Both partition by the plan of the primal operands, as the product does,
# so `grad` of a jit over sharded operands runs every backward kernel on its shard:
#
# - data parallel: x's cotangent on the local tokens; each weight array's is the local tokens'
#   share, summed over the token axes (psum, in f32);
# - column parallel: each shard's x cotangent is its outputs' share, summed over the output
#   axes; the weight arrays' are local to their shard;
# - row parallel: x's cotangent on the local inputs, the weight arrays' on their shard; the
#   tangent (forward-mode) is summed over the input axes as the product is.
sharded_tangent_p = Primitive("jaxsparse_sharded_tangent")
sharded_cotangent_p = Primitive("jaxsparse_sharded_cotangent")
sharded_cotangent_p.multiple_results = True


def _live_fn(cls, aux, kind, primals, live):
    """The product as a function of the operands `live` (the others held at `primals`)."""

    def fn(*live_args):
        args = list(primals)
        for i, a in zip(live, live_args):
            args[i] = a
        return _call(cls, aux, kind, args[0], args[1:])

    return fn


def _tangent_impl(*args, live, cls, aux, kind):
    primals, tangents = args[:-len(live)], args[-len(live):]
    fn = _live_fn(cls, aux, kind, primals, live)
    return jax.jvp(fn, [primals[i] for i in live], list(tangents))[1]


def _cotangent_impl(*args, live, cls, aux, kind):
    primals, ct = args[:-1], args[-1]
    fn = _live_fn(cls, aux, kind, primals, live)
    return list(jax.vjp(fn, *(primals[i] for i in live))[1](ct))


@functools.lru_cache(maxsize=512)
def _traced_tangent(cls, aux, kind, live, avals):
    """The kernel's JVP traced once per signature: a format that refuses a tangent (frozen int4
    arrays, packed tiles) raises here, when the JVP is taken, not when it is compiled."""
    structs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in avals]
    return jax.make_jaxpr(functools.partial(_tangent_impl, live=live, cls=cls, aux=aux,
                                            kind=kind))(*structs)


def _tangent_abstract_eval(*args, live, cls, aux, kind):
    avals = tuple((a.shape, a.dtype) for a in args)
    (out,) = _traced_tangent(cls, aux, kind, live, avals).out_avals
    return args[0].update(shape=out.shape, dtype=out.dtype)  # The product's type.


def _cotangent_abstract_eval(*args, live, cls, aux, kind):
    return [args[i] for i in live]  # Each cotangent has its operand's type.


def _tangent_transpose(ct, *args, live, cls, aux, kind):
    primals = args[:-len(live)]
    if any(ad.is_undefined_primal(p) for p in primals):
        raise NotImplementedError("jaxsparse: the sharded product's tangent is linear in the "
                                  "tangents only")
    out = [None] * len(args)
    if type(ct) is ad.Zero:
        return out
    cts = sharded_cotangent_p.bind(*primals, ct, live=live, cls=cls, aux=aux, kind=kind)
    for slot, c in enumerate(cts):
        out[len(primals) + slot] = c
    return out


def _unwrapped_jvp(impl, multiple_results):
    """Second-order rules: the JVP of the unwrapped kernels (their primitives' own rules)."""

    def rule(primals, tangents, **params):
        nonzero = [i for i, t in enumerate(tangents) if type(t) is not ad.Zero]

        def fn(*nonzero_args):  # Zero tangents stay symbolic: frozen arrays stay underived.
            args = list(primals)
            for i, a in zip(nonzero, nonzero_args):
                args[i] = a
            return impl(*args, **params)

        if not nonzero:
            out = fn()
            zeros = [ad.Zero.from_primal_value(o) for o in (out if multiple_results else [out])]
            return out, zeros if multiple_results else zeros[0]
        return jax.jvp(fn, tuple(primals[i] for i in nonzero),
                       tuple(tangents[i] for i in nonzero))

    return rule


def _unwrapped_batch(impl):
    def rule(args, dims, **params):
        out = jax.vmap(functools.partial(impl, **params), in_axes=tuple(dims))(*args)
        return out, [0] * len(out) if isinstance(out, (list, tuple)) else 0

    return rule


def _tangent_partition(live, cls, aux, kind, mesh, arg_shapes, result_shape):
    del result_shape
    primals = arg_shapes[:-len(live)]
    plan, layout, local_aux = _planned(cls, aux, mesh, primals)
    shardings = (layout.x,) + layout.arrays

    def lower_fn(x3, *args):
        arrays3 = _shard_arrays(cls, aux, plan, mesh, args[:len(primals) - 1])
        out = _tangent_impl(x3, *arrays3, *args[len(primals) - 1:], live=live, cls=cls,
                            aux=local_aux, kind=kind)
        return _psum_f32(_guarded(cls, local_aux, plan, arrays3, out), plan.inp)

    return mesh, lower_fn, layout.out, shardings + tuple(shardings[i] for i in live)


def _cotangent_partition(live, cls, aux, kind, mesh, arg_shapes, result_shape):
    del result_shape
    primals = arg_shapes[:-1]
    plan, layout, local_aux = _planned(cls, aux, mesh, primals)
    shardings = (layout.x,) + layout.arrays
    # x's cotangent sums over the output shards, every weight array's over the token shards.
    sums = [plan.out if i == 0 else plan.tokens for i in live]

    def lower_fn(x3, *args):
        arrays3 = _shard_arrays(cls, aux, plan, mesh, args[:-1])
        cts = _cotangent_impl(x3, *arrays3, args[-1], live=live, cls=cls, aux=local_aux,
                              kind=kind)
        cts = _guarded(cls, local_aux, plan, arrays3, list(cts))
        return tuple(_psum_f32(c, axes) for c, axes in zip(cts, sums))

    return (mesh, lower_fn, tuple(shardings[i] for i in live),
            shardings + (layout.out,))


def _tangent_infer(live, cls, aux, kind, mesh, arg_shapes, result_shape):
    return _infer(cls, aux, kind, mesh, arg_shapes[:-len(live)], result_shape)


def _cotangent_infer(live, cls, aux, kind, mesh, arg_shapes, result_shape):
    del result_shape
    layout = _planned_layout(cls, aux, mesh, arg_shapes[:-1])
    shardings = (layout.x,) + layout.arrays
    return tuple(shardings[i] for i in live)


def _tangent_rule(live, cls, aux, kind, mesh, operand_types, result_types):
    del kind, mesh, result_types
    factors, result, sizes = _rule_factors(cls, aux, operand_types[:-len(live)])
    return ", ".join(factors + [factors[i] for i in live]) + " -> " + result, sizes


def _cotangent_rule(live, cls, aux, kind, mesh, operand_types, result_types):
    del kind, mesh, result_types
    factors, result, sizes = _rule_factors(cls, aux, operand_types[:-1])
    return (", ".join(factors + [result]) + " -> " + ", ".join(factors[i] for i in live),
            sizes)


def _partitioned_backward(impl, partition, infer, rule, live, cls, aux, kind):
    def call(*args):
        out = impl(*args, live=live, cls=cls, aux=aux, kind=kind)
        return tuple(out) if isinstance(out, list) else out

    wrapped = custom_partitioning(call)
    wrapped.def_partition(
        partition=functools.partial(partition, live, cls, aux, kind),
        infer_sharding_from_operands=functools.partial(infer, live, cls, aux, kind),
        sharding_rule=functools.partial(rule, live, cls, aux, kind),
    )
    return wrapped


def _backward_lowering(impl, partition, infer, rule, multiple_results):
    def lowering(ctx, *args, live, cls, aux, kind):
        params = dict(live=live, cls=cls, aux=aux, kind=kind)
        if _multi_device(ctx):
            fn = _partitioned_backward(impl, partition, infer, rule, live, cls, aux, kind)
        else:
            fn = functools.partial(impl, **params)
        return mlir.lower_fun(fn, multiple_results=multiple_results)(ctx, *args)

    return lowering


sharded_tangent_p.def_impl(_tangent_impl)
sharded_tangent_p.def_abstract_eval(_tangent_abstract_eval)
ad.primitive_jvps[sharded_tangent_p] = _unwrapped_jvp(_tangent_impl, False)
ad.primitive_transposes[sharded_tangent_p] = _tangent_transpose
batching.primitive_batchers[sharded_tangent_p] = _unwrapped_batch(_tangent_impl)
mlir.register_lowering(sharded_tangent_p, _backward_lowering(
    _tangent_impl, _tangent_partition, _tangent_infer, _tangent_rule, False))

sharded_cotangent_p.def_impl(_cotangent_impl)
sharded_cotangent_p.def_abstract_eval(_cotangent_abstract_eval)
ad.primitive_jvps[sharded_cotangent_p] = _unwrapped_jvp(_cotangent_impl, True)
batching.primitive_batchers[sharded_cotangent_p] = _unwrapped_batch(_cotangent_impl)
mlir.register_lowering(sharded_cotangent_p, _backward_lowering(
    _cotangent_impl, _cotangent_partition, _cotangent_infer, _cotangent_rule, True))
if _dispatch is not None:
    _dispatch.prim_requires_devices_during_lowering.update(
        (sharded_tangent_p, sharded_cotangent_p))
