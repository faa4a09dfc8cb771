"""What every format's primitives share: lowering to FFI targets (CPU, CUDA, emulated CUDA) with
the pure reference as a warned fallback, eager execution through jit, batch broadcasting, JVPs
of bilinear products, transposes onto broadcast batches, and batching into the kernel batch dim.

Every jaxsparse kernel takes rank-3 operands with one leading *kernel batch* dim that is 1
(broadcast) or the common batch `B`. A format's ops module (`ops/nm.py`, `ops/vnm.py`) holds
only its primitives and their rules; the mechanics live here.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad, batching, mlir

from jaxsparse import _ffi
from jaxsparse import _validate as V


class JaxsparseFallbackWarning(UserWarning):
    """A jaxsparse op ran its pure-JAX reference because no kernel exists for the platform."""


# ====================================================================== kernel batch
def broadcast_batch(*arrays):
    """Broadcast the leading (kernel batch) dims of rank-3 operands to their common size."""
    batch = max(a.shape[0] for a in arrays)
    return [jnp.broadcast_to(a, (batch,) + a.shape[1:]) for a in arrays]


def same_batch(*arrays):
    """The kernels read a weight's arrays with one shared batch stride (the ABI): when only some
    are batched (vmap over values with fixed positions, or a transpose producing batched values),
    broadcast the others; the copies are of the size of the batched operand."""
    if any(jnp.ndim(a) != 3 for a in arrays) or len({a.shape[0] for a in arrays}) <= 1:
        return arrays  # Wrong ranks are reported by the abstract eval.
    return tuple(broadcast_batch(*arrays))


def sum_to_batch(ct, batch):
    """Reduce a `[B, ...]` cotangent onto an operand whose batch dim broadcast (size 1)."""
    if ct.shape[0] == batch:
        return ct
    return jnp.sum(ct.astype(jnp.float32), axis=0, keepdims=True).astype(ct.dtype)


def check_batches(where, *named):
    """Each `(name, array)`'s leading dim is 1 or the largest one, which is returned."""
    batch = max(a.shape[0] for _, a in named)
    for name, a in named:
        if a.shape[0] not in (1, batch):
            raise ValueError(
                f"{where}: {name} batch dim must be 1 or {batch}; got shape {tuple(a.shape)}"
            )
    return batch


def check_rank3(where, **named):
    if any(a.ndim != 3 for a in named.values()):
        shapes = ", ".join(f"{n} {tuple(a.shape)}" for n, a in named.items())
        raise ValueError(f"{where}: operands must be rank 3 ([B, rows, cols]); got {shapes}")


def check_float(where, **named):
    """Each named operand (an aval) has a dtype the kernels implement (f32, bf16, f16): a
    TypeError at trace time, never the kernel's INVALID_ARGUMENT when the program runs."""
    for name, a in named.items():
        V.check_float_dtype(name, a.dtype, where=where)


def check_attr(where, name, value, *, low, high, multiple=1) -> int:
    """A static parameter the kernels take as an attribute is an int in [low, high] (and a
    multiple of `multiple`): checked at trace time, like the kernels' own attribute checks."""
    value = V.check_int(name, value, low=low, high=high, where=where)
    if value % multiple:
        raise ValueError(f"{where}: {name} must be a multiple of {multiple}; got {value}")
    return value


def f32_einsum(spec, a, b, out_dtype):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)


# ====================================================================== lowering
def impl_via_jit(prim):
    """Eager calls compile the primitive alone, so they run the same kernel as under jit."""

    @functools.lru_cache(maxsize=None)
    def compiled(**params):
        return jax.jit(functools.partial(prim.bind, **params))

    def impl(*args, **params):
        return compiled(**params)(*args)

    return impl


def fallback_lowering(prim, reference):
    """Lower to the pure-jnp reference, warning that no kernel ran."""
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


def ffi_lowering(target, attrs):
    """Lower to the FFI target, passing the params named in `attrs` as the handlers' i32
    attributes (a Python int would be i64). Other params (`in_features`) are not passed: the
    handlers read them from the result's shape."""
    lowering = jax.ffi.ffi_lowering(target)

    def rule(ctx, *args, **params):
        return lowering(ctx, *args, **{a: np.int32(params[a]) for a in attrs})

    return rule


def emulated_target(target: str) -> str:
    """The SIMT emulator's CPU target of a CUDA target: jaxsparse_x -> jaxsparse_emu_x."""
    return target.replace("jaxsparse_", "jaxsparse_emu_", 1)


def register(prim, *, abstract_eval, jvp, transpose, batch, reference, target, attrs,
             cuda_lowering=None):
    """Define every rule of one primitive and its lowerings.

    Lowerings: on CUDA, `cuda_lowering(target)` (default: the same target on the CUDA module);
    on the CPU, the same CUDA lowering onto the emulated targets when JAXSPARSE_EMULATE_CUDA=1
    and the emulator has them, else the CPU kernel `target`; the reference, with a
    `JaxsparseFallbackWarning`, wherever the module lacks the target.
    """
    prim.def_impl(impl_via_jit(prim))
    prim.def_abstract_eval(abstract_eval)
    ad.primitive_jvps[prim] = jvp
    ad.primitive_transposes[prim] = transpose
    batching.primitive_batchers[prim] = batch
    cuda_lowering = cuda_lowering or (lambda t: ffi_lowering(t, attrs))
    mlir.register_lowering(prim, fallback_lowering(prim, reference))
    if _ffi.emulating_cuda() and _ffi.has_target(emulated_target(target), "emu"):
        cpu = cuda_lowering(emulated_target(target))
    elif _ffi.has_target(target, "cpu"):
        cpu = ffi_lowering(target, attrs)
    else:
        cpu = fallback_lowering(prim, reference)
    mlir.register_lowering(prim, cpu, platform="cpu")
    cuda = (cuda_lowering(target) if _ffi.has_target(target, "cuda")
            else fallback_lowering(prim, reference))
    mlir.register_lowering(prim, cuda, platform="cuda")


def register_cuda_layout(prim, *, cpu_error, **rules):
    """`register` for a primitive whose operands are in a CUDA-only device layout: on the CPU it
    lowers to the emulated CUDA target under JAXSPARSE_EMULATE_CUDA=1, and otherwise raises
    `ValueError(cpu_error)` at lowering (no CPU kernel reads the layout, and a silent reference
    would hide a weight packed for the wrong device)."""
    register(prim, **rules)
    if not (_ffi.emulating_cuda() and _ffi.has_target(emulated_target(rules["target"]), "emu")):
        def refuse(ctx, *args, **params):
            raise ValueError(cpu_error)

        mlir.register_lowering(prim, refuse, platform="cpu")


def register_cpu_variant(prim, *, on_cuda, **rules):
    """`register` for a CPU-only variant of another primitive (an extra operand that only CPU
    kernels read): on CUDA, and on the CPU under the emulator, it lowers as `on_cuda` (the same
    params, the extra operands ignored), never as its reference."""
    register(prim, **rules)
    lowered = mlir.lower_fun(on_cuda, multiple_results=False)
    mlir.register_lowering(prim, lowered, platform="cuda")
    if _ffi.emulating_cuda():
        mlir.register_lowering(prim, lowered, platform="cpu")


# ====================================================================== autodiff
def jvp_bilinear(fn, primals, tangents, out):
    """JVP of an op bilinear in its first two operands; the rest are index operands."""
    a, b, *index = primals
    ta, tb, *_ = tangents
    terms = []
    if type(ta) is not ad.Zero:
        terms.append(fn(ta, b, *index))
    if type(tb) is not ad.Zero:
        terms.append(fn(a, tb, *index))
    if not terms:
        return out, jnp.zeros_like(out)
    return out, terms[0] if len(terms) == 1 else terms[0] + terms[1]


def jvp_linear(fn, primals, tangents):
    """JVP of an op linear in its first operand, the rest held fixed (frozen weights: the caller
    refuses their tangents first, with its own message)."""
    out = fn(*primals)
    if type(tangents[0]) is ad.Zero:
        return out, jnp.zeros_like(out)
    return out, fn(tangents[0], *primals[1:])


# ====================================================================== batching
def batch_weight_product(fn, args, dims):
    """Batching of a product by a weight: the dense operand, then the weight's arrays.

    When only the dense operand is mapped and the weight is shared (batch 1), the mapped axis
    folds into the token dim: one kernel call over V*T tokens reads the weight once.
    """
    dense, *weight = args
    ddense, *dweight = dims
    shared = all(d is None for d in dweight) and all(a.shape[0] == 1 for a in weight)
    if shared and dense.shape[_kernel_batch_axis(ddense)] == 1:
        axis_size = dense.shape[ddense]
        moved = jnp.moveaxis(dense, ddense, 0)
        folded = moved.reshape((1, axis_size * moved.shape[2]) + moved.shape[3:])
        out = fn(folded, *weight)
        return out.reshape((axis_size, 1, out.shape[1] // axis_size) + out.shape[2:]), 0
    return batch_into_kernel_batch(fn, args, dims)


def batch_into_kernel_batch(fn, args, dims):
    """Merge the vmapped axis into the kernel's leading batch dim: `[V, B, ...] -> [V*B, ...]`.

    Operands whose kernel batch is 1 and that are not mapped stay broadcast (no copy).
    """
    axis_size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
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
    out = fn(*merged)
    return out.reshape((axis_size, batch) + out.shape[1:]), 0


def _kernel_batch_axis(vmap_dim):
    """The kernel batch dim of a mapped rank-4 operand (the first non-vmapped axis)."""
    return 1 if vmap_dim == 0 else 0
