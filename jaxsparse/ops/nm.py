"""N:M sparse products as JAX primitives.

Three primitives, closed under differentiation (CONVENTIONS.md 3):

- `nm_spmm`   y  = x @ W              (the forward product)
- `nm_spmm_t` dx = dy @ W^T           (the cotangent of x)
- `nm_sddmm`  dv = (x^T dy)[kept]     (the cotangent of the values: a sampled product)

All work on the canonical layout (see `jaxsparse.formats.nm`) with one leading kernel batch dim:

    x       [Bx, T, K]    f32/bf16/f16
    dy      [By, T, N]    same dtype
    values  [Bw, N, Kc]   same dtype, Kc = ceil(K/m) * n
    indices [Bw, N, Kc]   uint8, positions inside each group of m

Each leading dim is 1 (broadcast) or the common batch B. Accumulation is f32. The absolute input
index of kept entry c is `(c // n) * m + indices[..., c]`; entries that land in the zero padding
(index >= K) contribute nothing.

Each section follows the order of jax's `sparse/csr.py`: primitive, public wrapper, pure-jnp
reference (the test oracle, and the fallback where no kernel exists), abstract eval, JVP,
transpose, batching, lowering.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxsparse import _ffi
from jaxsparse.ops.mma_sp import pack_mma_sp_24

__all__ = ["nm_spmm", "nm_spmm_t", "nm_sddmm", "nm_spmm_reference", "nm_spmm_t_reference",
           "nm_sddmm_reference", "JaxsparseFallbackWarning"]


class JaxsparseFallbackWarning(UserWarning):
    """A jaxsparse op ran its pure-JAX reference because no kernel exists for the platform."""


# ====================================================================== shared helpers
def _positions(indices, n, m):
    """Absolute (zero-padded) input index of every kept entry: `[Bw, N, Kc]` int32."""
    kept = indices.shape[-1]
    group_base = (jnp.arange(kept, dtype=jnp.int32) // n) * m
    return group_base + indices.astype(jnp.int32)


def _padded_width(k, n, m, kept):
    return max(k, (kept // n) * m)


def _broadcast_batch(*arrays):
    """Broadcast the leading (kernel batch) dims of rank-3 operands to their common size."""
    batch = max(a.shape[0] for a in arrays)
    return [jnp.broadcast_to(a, (batch,) + a.shape[1:]) for a in arrays]


def _densify_t(values, indices, n, m, k):
    """`W^T` as a dense `[B, N, K]` array (reference only; exact: a select, no arithmetic)."""
    values, indices = _broadcast_batch(values, indices)
    b, out, kept = values.shape
    groups = kept // n
    vals = values.reshape(b, out, groups, n)
    onehot = indices.reshape(b, out, groups, n)[..., None] == jnp.arange(m, dtype=jnp.uint8)
    slot = jnp.argmax(onehot, axis=-2)
    picked = jnp.take_along_axis(vals, slot, axis=-1)
    dense = jnp.where(jnp.any(onehot, axis=-2), picked, jnp.zeros((), values.dtype))
    dense = dense.reshape(b, out, groups * m)
    width = groups * m
    if width >= k:
        return dense[..., :k]
    return jnp.pad(dense, [(0, 0), (0, 0), (0, k - width)])


def _same_weight_batch(values, indices):
    """The kernels take values and indices with one shared batch dim (the ABI): when only one of
    them is batched (vmap over values with fixed positions, or a transpose producing batched
    values), broadcast the other; the copy is of the size of the batched operand."""
    if values.ndim != 3 or indices.ndim != 3 or values.shape[0] == indices.shape[0]:
        return values, indices
    batch = max(values.shape[0], indices.shape[0])
    return (jnp.broadcast_to(values, (batch,) + values.shape[1:]),
            jnp.broadcast_to(indices, (batch,) + indices.shape[1:]))


def _f32_einsum(spec, a, b, out_dtype):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)


def _sum_to_batch(ct, batch):
    """Reduce a `[B, ...]` cotangent onto an operand whose batch dim broadcast (size 1)."""
    if ct.shape[0] == batch:
        return ct
    return jnp.sum(ct.astype(jnp.float32), axis=0, keepdims=True).astype(ct.dtype)


def _check_batches(where, *named):
    sizes = [a.shape[0] for _, a in named]
    batch = max(sizes)
    for name, a in named:
        if a.shape[0] not in (1, batch):
            raise ValueError(
                f"{where}: {name} batch dim must be 1 or {batch}; got shape {tuple(a.shape)}"
            )
    return batch


def _check_kernel_operands(where, dense, values, indices, n, m, k):
    if dense.ndim != 3 or values.ndim != 3 or indices.ndim != 3:
        raise ValueError(
            f"{where}: operands must be rank 3 ([B, T, K], [B, N, Kc], [B, N, Kc]); got shapes "
            f"{tuple(dense.shape)}, {tuple(values.shape)}, {tuple(indices.shape)}"
        )
    if values.shape[1:] != indices.shape[1:]:
        raise ValueError(
            f"{where}: values {tuple(values.shape)} and indices {tuple(indices.shape)} must agree "
            "but for the batch dim"
        )
    kept = -(-k // m) * n
    if indices.shape[-1] != kept:
        raise ValueError(
            f"{where}: kept dim must be ceil(K/m)*n = ceil({k}/{m})*{n} = {kept}; "
            f"got indices shape {tuple(indices.shape)}"
        )
    if indices.dtype != jnp.uint8:
        raise TypeError(f"{where}: indices must be uint8, got {indices.dtype}")
    if values.dtype != dense.dtype:
        raise TypeError(f"{where}: dtypes must match, got {dense.dtype} and {values.dtype}")


def _impl_via_jit(prim):
    """Eager calls compile the primitive alone, so they run the same kernel as under jit."""

    @functools.lru_cache(maxsize=None)
    def compiled(**params):
        return jax.jit(functools.partial(prim.bind, **params))

    def impl(*args, **params):
        return compiled(**params)(*args)

    return impl


def _fallback_lowering(prim, reference):
    lowered = mlir.lower_fun(reference, multiple_results=False)

    def rule(ctx, *args, **params):
        platforms = ", ".join(getattr(ctx.module_context, "platforms", ()) or ("this platform",))
        warnings.warn(
            f"jaxsparse: no {prim.name} kernel for {platforms}; running the pure-JAX reference "
            "(correct, but slow)",
            JaxsparseFallbackWarning,
            stacklevel=2,
        )
        return lowered(ctx, *args, **params)

    return rule


def _ffi_kernel_lowering(target):
    """Lower to the FFI target; attributes are cast to the handlers' i32 (a Python int is i64).

    Other params (`in_features`) are not passed: the handler reads them from the result shape.
    """
    lowering = jax.ffi.ffi_lowering(target)

    def rule(ctx, *args, n, m, **_):
        return lowering(ctx, *args, n=np.int32(n), m=np.int32(m))

    return rule


def _spmm_cuda_lowering(target):
    """nm_spmm's CUDA lowering: 2:4 bf16/f16 with K % 16 == 0 takes the sparse-tensor-core kernel
    `<target>_sp24` (its metadata packed by `pack_mma_sp_24` inside the same program), anything
    else `target`."""
    generic = _ffi_kernel_lowering(target)
    sp24_target = target + "_sp24"

    def sp24(x, values, indices):
        packed, metadata = pack_mma_sp_24(values, indices)
        y = jax.ShapeDtypeStruct(
            (max(x.shape[0], values.shape[0]), x.shape[1], values.shape[1]), x.dtype)
        return jax.ffi.ffi_call(sp24_target, y)(x, packed, metadata)

    sp24_lowered = mlir.lower_fun(sp24, multiple_results=False)

    def rule(ctx, x, values, indices, *, n, m):
        x_aval = ctx.avals_in[0]
        if (n, m) == (2, 4) and x_aval.dtype in _SP24_DTYPES and x_aval.shape[-1] % 16 == 0:
            return sp24_lowered(ctx, x, values, indices)
        return generic(ctx, x, values, indices, n=n, m=m)

    return rule


_SP24_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


def _kernel_lowering(target, platform, cuda_lowering):
    """The lowering to a kernel target: `cuda_lowering(target)` on GPUs (and on the CPU with the
    emulated CUDA targets when JAXSPARSE_EMULATE_CUDA=1), the CPU kernels otherwise."""
    if platform == "cpu" and not _ffi.emulating_cuda():
        return _ffi_kernel_lowering(target)
    if platform == "cpu":
        target = target.replace("jaxsparse_", "jaxsparse_emu_", 1)
    return cuda_lowering(target)


def _register_lowerings(prim, reference, target, cuda_lowering):
    """The FFI kernel where a module provides it; else the reference, with a warning."""
    mlir.register_lowering(prim, _fallback_lowering(prim, reference))
    for platform, available in (("cpu", _ffi.has_cpu_kernels()), ("cuda", _ffi.has_cuda_kernels())):
        if available:
            rule = _kernel_lowering(target, platform, cuda_lowering)
            mlir.register_lowering(prim, rule, platform=platform)
        else:
            mlir.register_lowering(prim, _fallback_lowering(prim, reference), platform=platform)


def _vmap_into_kernel_batch(args, dims, axis_size):
    """Merge a vmapped axis into the kernel's leading batch dim: `[V, B, ...] -> [V*B, ...]`.

    Operands whose kernel batch is 1 and that are not mapped stay broadcast (no copy).
    """
    moved = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    batch = max(a.shape[1] if d is not None else a.shape[0] for a, d in zip(moved, dims))
    merged = []
    for a, d in zip(moved, dims):
        if d is None:
            if a.shape[0] != 1:
                a = jnp.broadcast_to(a[None], (axis_size,) + a.shape)
                a = a.reshape((axis_size * batch,) + a.shape[2:])
        else:
            a = jnp.broadcast_to(a, (axis_size, batch) + a.shape[2:])
            a = a.reshape((axis_size * batch,) + a.shape[2:])
        merged.append(a)
    return merged, batch


def _fold_vmap_into_tokens(dense, dim, axis_size):
    """`[..V.., 1, T, K]` -> `[1, V*T, K]`: the fast path when only the dense operand is mapped."""
    moved = jnp.moveaxis(dense, dim, 0)
    return moved.reshape((1, axis_size * moved.shape[2]) + moved.shape[3:])


def _unfold_tokens(y, axis_size):
    return y.reshape((axis_size, 1, y.shape[1] // axis_size) + y.shape[2:]), 0


def _jvp_bilinear(prim_fn, primals, tangents, out):
    """JVP of an op bilinear in its first two operands (the third is an index operand)."""
    a, b, idx = primals
    ta, tb, _ = tangents
    terms = []
    if type(ta) is not ad.Zero:
        terms.append(prim_fn(ta, b, idx))
    if type(tb) is not ad.Zero:
        terms.append(prim_fn(a, tb, idx))
    if not terms:
        return out, jnp.zeros_like(out)
    return out, terms[0] if len(terms) == 1 else terms[0] + terms[1]


# ====================================================================== nm_spmm
nm_spmm_p = Primitive("jaxsparse_nm_spmm")


def nm_spmm(x, values, indices, *, n: int, m: int):
    """`y = x @ W` for an N:M sparse `W`.

    Args:
        x: `[Bx, T, K]` float32/bfloat16/float16.
        values: `[Bw, N, Kc]` same dtype, `Kc = ceil(K/m) * n`.
        indices: `[Bw, N, Kc]` uint8.
        n, m: the pattern.

    Returns:
        `[B, T, N]` in x's dtype, `B = max(Bx, Bw)`; f32 accumulation.
    """
    values, indices = _same_weight_batch(values, indices)
    return nm_spmm_p.bind(x, values, indices, n=n, m=m)


def nm_spmm_reference(x, values, indices, *, n, m):
    x, w_t = _broadcast_batch(x, _densify_t(values, indices, n, m, x.shape[-1]))
    return _f32_einsum("btk,bnk->btn", x, w_t, x.dtype)


def _spmm_abstract_eval(x, values, indices, *, n, m):
    _check_kernel_operands("nm_spmm", x, values, indices, n, m, x.shape[-1])
    batch = _check_batches("nm_spmm", ("x", x), ("values", values), ("indices", indices))
    return x.update(shape=(batch, x.shape[1], values.shape[1]), dtype=x.dtype)


def _spmm_jvp(primals, tangents, *, n, m):
    out = nm_spmm(*primals, n=n, m=m)
    return _jvp_bilinear(functools.partial(nm_spmm, n=n, m=m), primals, tangents, out)


def _spmm_transpose(ct, x, values, indices, *, n, m):
    if type(ct) is ad.Zero:
        return None, None, None
    ct_x = ct_values = None
    if ad.is_undefined_primal(x):
        dx = nm_spmm_t(ct, values, indices, n=n, m=m, in_features=x.aval.shape[-1])
        ct_x = _sum_to_batch(dx, x.aval.shape[0])
    if ad.is_undefined_primal(values):
        dv = nm_sddmm(x, ct, indices, n=n, m=m)
        ct_values = _sum_to_batch(dv, values.aval.shape[0])
    return ct_x, ct_values, None


def _spmm_batch(args, dims, *, n, m):
    return _batch_weight_product(functools.partial(nm_spmm, n=n, m=m), args, dims)


# ====================================================================== nm_spmm_t
nm_spmm_t_p = Primitive("jaxsparse_nm_spmm_t")


def nm_spmm_t(dy, values, indices, *, n: int, m: int, in_features: int):
    """`dx = dy @ W^T` for an N:M sparse `W` (the cotangent of x in `x @ W`).

    Args:
        dy: `[By, T, N]` float32/bfloat16/float16.
        values, indices: `[Bw, N, Kc]`, as in `nm_spmm`.
        in_features: K, the width of the result.

    Returns:
        `[B, T, K]` in dy's dtype.
    """
    values, indices = _same_weight_batch(values, indices)
    return nm_spmm_t_p.bind(dy, values, indices, n=n, m=m, in_features=in_features)


def nm_spmm_t_reference(dy, values, indices, *, n, m, in_features):
    dy, w_t = _broadcast_batch(dy, _densify_t(values, indices, n, m, in_features))
    return _f32_einsum("btn,bnk->btk", dy, w_t, dy.dtype)


def _spmm_t_abstract_eval(dy, values, indices, *, n, m, in_features):
    _check_kernel_operands("nm_spmm_t", dy, values, indices, n, m, in_features)
    if dy.shape[-1] != values.shape[1]:
        raise ValueError(f"nm_spmm_t: dy has {dy.shape[-1]} outputs, values {values.shape[1]}")
    batch = _check_batches("nm_spmm_t", ("dy", dy), ("values", values), ("indices", indices))
    return dy.update(shape=(batch, dy.shape[1], in_features), dtype=dy.dtype)


def _spmm_t_jvp(primals, tangents, *, n, m, in_features):
    fn = functools.partial(nm_spmm_t, n=n, m=m, in_features=in_features)
    return _jvp_bilinear(fn, primals, tangents, fn(*primals))


def _spmm_t_transpose(ct, dy, values, indices, *, n, m, in_features):
    if type(ct) is ad.Zero:
        return None, None, None
    ct_dy = ct_values = None
    if ad.is_undefined_primal(dy):
        ct_dy = _sum_to_batch(nm_spmm(ct, values, indices, n=n, m=m), dy.aval.shape[0])
    if ad.is_undefined_primal(values):
        ct_values = _sum_to_batch(nm_sddmm(ct, dy, indices, n=n, m=m), values.aval.shape[0])
    return ct_dy, ct_values, None


def _spmm_t_batch(args, dims, *, n, m, in_features):
    fn = functools.partial(nm_spmm_t, n=n, m=m, in_features=in_features)
    return _batch_weight_product(fn, args, dims)


# ====================================================================== nm_sddmm
nm_sddmm_p = Primitive("jaxsparse_nm_sddmm")


def nm_sddmm(x, dy, indices, *, n: int, m: int):
    """`dv[b, j, c] = sum_t x[b, t, pos(c)] * dy[b, t, j]`: `x^T dy` sampled at the kept positions.

    The cotangent of the values in `x @ W`.

    Args:
        x: `[Bx, T, K]` float32/bfloat16/float16.
        dy: `[By, T, N]` same dtype.
        indices: `[Bw, N, Kc]` uint8.

    Returns:
        `[B, N, Kc]` in x's dtype, `B = max(Bx, By, Bw)`; zero for entries in the padding.
    """
    return nm_sddmm_p.bind(x, dy, indices, n=n, m=m)


def nm_sddmm_reference(x, dy, indices, *, n, m):
    k = x.shape[-1]
    width = _padded_width(k, n, m, indices.shape[-1])
    x_pad, dy, indices = _broadcast_batch(jnp.pad(x, [(0, 0), (0, 0), (0, width - k)]), dy, indices)
    full = jnp.einsum("btn,btk->bnk", dy, x_pad, preferred_element_type=jnp.float32)
    return jnp.take_along_axis(full, _positions(indices, n, m), axis=-1).astype(x.dtype)


def _sddmm_abstract_eval(x, dy, indices, *, n, m):
    _check_kernel_operands("nm_sddmm", x, indices.update(dtype=x.dtype), indices, n, m, x.shape[-1])
    if dy.dtype != x.dtype:
        raise TypeError(f"nm_sddmm: dtypes must match, got {x.dtype} and {dy.dtype}")
    if dy.shape[1] != x.shape[1] or dy.shape[2] != indices.shape[1]:
        raise ValueError(
            f"nm_sddmm: dy must be [B, {x.shape[1]}, {indices.shape[1]}]; got {tuple(dy.shape)}"
        )
    batch = _check_batches("nm_sddmm", ("x", x), ("dy", dy), ("indices", indices))
    return x.update(shape=(batch,) + indices.shape[1:], dtype=x.dtype)


def _sddmm_jvp(primals, tangents, *, n, m):
    fn = functools.partial(nm_sddmm, n=n, m=m)
    return _jvp_bilinear(fn, primals, tangents, fn(*primals))


def _sddmm_transpose(ct, x, dy, indices, *, n, m):
    if type(ct) is ad.Zero:
        return None, None, None
    ct_x = ct_dy = None
    if ad.is_undefined_primal(x):
        dx = nm_spmm_t(dy, ct, indices, n=n, m=m, in_features=x.aval.shape[-1])
        ct_x = _sum_to_batch(dx, x.aval.shape[0])
    if ad.is_undefined_primal(dy):
        ct_dy = _sum_to_batch(nm_spmm(x, ct, indices, n=n, m=m), dy.aval.shape[0])
    return ct_x, ct_dy, None


def _sddmm_batch(args, dims, *, n, m):
    # Per-example outputs: the mapped axis always joins the kernel batch (never the tokens).
    return _batch_into_kernel_batch(functools.partial(nm_sddmm, n=n, m=m), args, dims)


# ====================================================================== batching helpers
def _batch_weight_product(fn, args, dims):
    """Batching of a product by the weights (nm_spmm, nm_spmm_t): dense operand, values, indices.

    When only the dense operand is mapped and the weights are shared, the mapped axis folds into
    the token dim: one kernel call over V*T tokens reads the weights once.
    """
    dense, values, _ = args
    ddense, dvals, didx = dims
    shared_weights = dvals is None and didx is None and values.shape[0] == 1
    if shared_weights and dense.shape[_other(ddense)] == 1:
        axis_size = dense.shape[ddense]
        out = fn(_fold_vmap_into_tokens(dense, ddense, axis_size), *args[1:])
        return _unfold_tokens(out, axis_size)
    return _batch_into_kernel_batch(fn, args, dims)


def _batch_into_kernel_batch(fn, args, dims):
    axis_size = _axis_size(args, dims)
    merged, batch = _vmap_into_kernel_batch(args, dims, axis_size)
    out = fn(*merged)
    return out.reshape((axis_size, batch) + out.shape[1:]), 0


def _axis_size(args, dims):
    return next(a.shape[d] for a, d in zip(args, dims) if d is not None)


def _other(vmap_dim):
    """Index of the kernel batch dim of a mapped rank-4 operand (the first non-vmapped axis)."""
    return 1 if vmap_dim == 0 else 0


# ====================================================================== registration
def _register():
    rules = (
        (nm_spmm_p, _spmm_abstract_eval, _spmm_jvp, _spmm_transpose, _spmm_batch,
         nm_spmm_reference, "jaxsparse_nm_spmm", _spmm_cuda_lowering),
        (nm_spmm_t_p, _spmm_t_abstract_eval, _spmm_t_jvp, _spmm_t_transpose, _spmm_t_batch,
         nm_spmm_t_reference, "jaxsparse_nm_spmm_t", _ffi_kernel_lowering),
        (nm_sddmm_p, _sddmm_abstract_eval, _sddmm_jvp, _sddmm_transpose, _sddmm_batch,
         nm_sddmm_reference, "jaxsparse_nm_sddmm", _ffi_kernel_lowering),
    )
    for prim, abstract_eval, jvp, transpose, batch, reference, target, cuda_lowering in rules:
        prim.def_impl(_impl_via_jit(prim))
        prim.def_abstract_eval(abstract_eval)
        ad.primitive_jvps[prim] = jvp
        ad.primitive_transposes[prim] = transpose
        batching.primitive_batchers[prim] = batch
        _register_lowerings(prim, reference, target, cuda_lowering)


_register()
