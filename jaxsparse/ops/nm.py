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

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, mlir

from jaxsparse.ops import _primitive as P
from jaxsparse.ops._primitive import JaxsparseFallbackWarning
from jaxsparse.ops.mma_sp import pack_mma_sp_24
from jaxsparse.ops.vnm import SELECTED, vnm_spmm, vnm_spmm_p

__all__ = ["nm_spmm", "nm_spmm_t", "nm_sddmm", "nm_spmm_reference", "nm_spmm_t_reference",
           "nm_sddmm_reference", "nm_spmm_engine", "has_engine", "ENGINE_PANEL",
           "nm_spmm_packed", "nm_spmm_packed_reference", "pack_indices_2bit",
           "unpack_indices_2bit", "PACKED_MAX_TOKENS", "JaxsparseFallbackWarning"]


# ====================================================================== shared helpers
def _positions(indices, n, m):
    """Absolute (zero-padded) input index of every kept entry: `[Bw, N, Kc]` int32."""
    kept = indices.shape[-1]
    group_base = (jnp.arange(kept, dtype=jnp.int32) // n) * m
    return group_base + indices.astype(jnp.int32)


def _padded_width(k, n, m, kept):
    return max(k, (kept // n) * m)


def _densify_t(values, indices, n, m, k):
    """`W^T` as a dense `[B, N, K]` array (reference only; exact: a select, no arithmetic)."""
    values, indices = P.broadcast_batch(values, indices)
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


#: The largest m the kernels take (cpu/nm/nm_checks.h kMaxM).
_MAX_M = 16


def _check_kernel_operands(where, dense, values, indices, n, m, k, dense_name="x"):
    m = P.check_attr(where, "m", m, low=2, high=_MAX_M)
    P.check_attr(where, "n", n, low=1, high=m - 1)
    P.check_float(where, **{dense_name: dense})
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


def _spmm_cuda_lowering(target):
    """nm_spmm's CUDA lowering: 2:4 bf16/f16 with K % 16 == 0 takes the sparse-tensor-core kernel
    `<target>_sp24` (its metadata packed by `pack_mma_sp_24` inside the same program), anything
    else `target`."""
    generic = P.ffi_lowering(target, _ATTRS)
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
    values, indices = P.same_batch(values, indices)
    return nm_spmm_p.bind(x, values, indices, n=n, m=m)


def nm_spmm_reference(x, values, indices, *, n, m):
    x, w_t = P.broadcast_batch(x, _densify_t(values, indices, n, m, x.shape[-1]))
    return P.f32_einsum("btk,bnk->btn", x, w_t, x.dtype)


def _spmm_abstract_eval(x, values, indices, *, n, m):
    _check_kernel_operands("nm_spmm", x, values, indices, n, m, x.shape[-1])
    batch = P.check_batches("nm_spmm", ("x", x), ("values", values), ("indices", indices))
    return x.update(shape=(batch, x.shape[1], values.shape[1]), dtype=x.dtype)


def _spmm_jvp(primals, tangents, *, n, m):
    out = nm_spmm(*primals, n=n, m=m)
    return P.jvp_bilinear(functools.partial(nm_spmm, n=n, m=m), primals, tangents, out)


def _spmm_transpose(ct, x, values, indices, *, n, m):
    if type(ct) is ad.Zero:
        return None, None, None
    ct_x = ct_values = None
    if ad.is_undefined_primal(x):
        dx = nm_spmm_t(ct, values, indices, n=n, m=m, in_features=x.aval.shape[-1])
        ct_x = P.sum_to_batch(dx, x.aval.shape[0])
    if ad.is_undefined_primal(values):
        dv = nm_sddmm(x, ct, indices, n=n, m=m)
        ct_values = P.sum_to_batch(dv, values.aval.shape[0])
    return ct_x, ct_values, None


def _spmm_batch(args, dims, *, n, m):
    return P.batch_weight_product(functools.partial(nm_spmm, n=n, m=m), args, dims)


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
    values, indices = P.same_batch(values, indices)
    return nm_spmm_t_p.bind(dy, values, indices, n=n, m=m, in_features=in_features)


def nm_spmm_t_reference(dy, values, indices, *, n, m, in_features):
    dy, w_t = P.broadcast_batch(dy, _densify_t(values, indices, n, m, in_features))
    return P.f32_einsum("btn,bnk->btk", dy, w_t, dy.dtype)


def _spmm_t_abstract_eval(dy, values, indices, *, n, m, in_features):
    _check_kernel_operands("nm_spmm_t", dy, values, indices, n, m, in_features, "dy")
    if dy.shape[-1] != values.shape[1]:
        raise ValueError(f"nm_spmm_t: dy has {dy.shape[-1]} outputs, values {values.shape[1]}")
    batch = P.check_batches("nm_spmm_t", ("dy", dy), ("values", values), ("indices", indices))
    return dy.update(shape=(batch, dy.shape[1], in_features), dtype=dy.dtype)


def _spmm_t_jvp(primals, tangents, *, n, m, in_features):
    fn = functools.partial(nm_spmm_t, n=n, m=m, in_features=in_features)
    return P.jvp_bilinear(fn, primals, tangents, fn(*primals))


def _spmm_t_transpose(ct, dy, values, indices, *, n, m, in_features):
    if type(ct) is ad.Zero:
        return None, None, None
    ct_dy = ct_values = None
    if ad.is_undefined_primal(dy):
        ct_dy = P.sum_to_batch(nm_spmm(ct, values, indices, n=n, m=m), dy.aval.shape[0])
    if ad.is_undefined_primal(values):
        ct_values = P.sum_to_batch(nm_sddmm(ct, dy, indices, n=n, m=m), values.aval.shape[0])
    return ct_dy, ct_values, None


def _spmm_t_batch(args, dims, *, n, m, in_features):
    fn = functools.partial(nm_spmm_t, n=n, m=m, in_features=in_features)
    return P.batch_weight_product(fn, args, dims)


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
    x_pad, dy, indices = P.broadcast_batch(jnp.pad(x, [(0, 0), (0, 0), (0, width - k)]), dy, indices)
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
    batch = P.check_batches("nm_sddmm", ("x", x), ("dy", dy), ("indices", indices))
    return x.update(shape=(batch,) + indices.shape[1:], dtype=x.dtype)


def _sddmm_jvp(primals, tangents, *, n, m):
    fn = functools.partial(nm_sddmm, n=n, m=m)
    return P.jvp_bilinear(fn, primals, tangents, fn(*primals))


def _sddmm_transpose(ct, x, dy, indices, *, n, m):
    if type(ct) is ad.Zero:
        return None, None, None
    ct_x = ct_dy = None
    if ad.is_undefined_primal(x):
        dx = nm_spmm_t(dy, ct, indices, n=n, m=m, in_features=x.aval.shape[-1])
        ct_x = P.sum_to_batch(dx, x.aval.shape[0])
    if ad.is_undefined_primal(dy):
        ct_dy = P.sum_to_batch(nm_spmm(x, ct, indices, n=n, m=m), dy.aval.shape[0])
    return ct_x, ct_dy, None


def _sddmm_batch(args, dims, *, n, m):
    # Per-example outputs: the mapped axis always joins the kernel batch (never the tokens).
    return P.batch_into_kernel_batch(functools.partial(nm_sddmm, n=n, m=m), args, dims)


# ====================================================================== 2-bit positions
#: Up to this many tokens 2:4 and 1:4 products go through `nm_spmm_packed`, whose CPU kernels read
#: the positions at 2 bits: the row-vectorised kernel up to 32 tokens (cpu/nm/nm_rowdot_avx512.h;
#: a matrix-vector product bound by the weight stream: per kept f32 value 4.25 bytes instead of 5,
#: bf16 2.25 instead of 3), and on AMX, bf16 from 12 to 256 tokens on the tiles (cpu/nm/nm_amx.h).
#: Elsewhere it is `nm_spmm`.
PACKED_MAX_TOKENS = 256


def pack_indices_2bit(indices):
    """The positions of an n:4 weight at 2 bits each, four per byte: a pure, jittable packing.

    Entry `c` of a row goes to bits `2 * (c % 4)` of byte `c // 4` (little-endian, so any
    aligned load of a row reads its entries in order); the unused bits of a row's last byte are
    0. Positions must be < 4 (what every 2:4 / 1:4 `indices` holds).

    Args:
        indices: `[..., Kc]` uint8 (or any integer dtype), values in 0..3.

    Returns:
        `[..., ceil(Kc/4)]` uint8.
    """
    indices = jnp.asarray(indices)
    kept = indices.shape[-1]
    pad = -kept % 4
    quads = jnp.pad(indices.astype(jnp.uint8) & 3, [(0, 0)] * (indices.ndim - 1) + [(0, pad)])
    quads = quads.reshape(*indices.shape[:-1], (kept + pad) // 4, 4)
    shifts = jnp.arange(0, 8, 2, dtype=jnp.uint8)
    return jnp.sum(quads << shifts, axis=-1, dtype=jnp.uint8)  # Disjoint bits: sum = or.


def unpack_indices_2bit(packed, kept: int):
    """`pack_indices_2bit`'s inverse: `[..., ceil(kept/4)]` uint8 -> `[..., kept]` uint8."""
    packed = jnp.asarray(packed)
    shifts = jnp.arange(0, 8, 2, dtype=jnp.uint8)
    quads = (packed[..., None] >> shifts) & 3
    return quads.reshape(*packed.shape[:-1], packed.shape[-1] * 4)[..., :kept]


nm_spmm_packed_p = Primitive("jaxsparse_nm_spmm_packed")


def nm_spmm_packed(x, values, indices, indices_2bit, *, n: int, m: int,
                   engine_backward: bool = False):
    """`y = x @ W` for an n:4 sparse `W` whose positions are also held at 2 bits.

    `nm_spmm` with one more operand: the CPU's few-token forward streams `indices_2bit` instead
    of `indices` (a quarter of their bytes; the weight stream is the bound there), every other
    case reads `indices`. Its derivatives read `indices`: `nm_spmm`'s, or with `engine_backward`
    (n in {1, 2}) those of `nm_spmm_engine` (the shared engine's dx and dv, on the AMX tiles for
    bf16; `jaxsparse.ops.dispatch.backward_on_engine` says where they win). On CUDA it is
    `nm_spmm`.

    Args:
        x: `[Bx, T, K]` float32/bfloat16/float16.
        values, indices: `[Bw, N, Kc]`, as in `nm_spmm`; m must be 4.
        indices_2bit: `[Bw, N, ceil(Kc/4)]` uint8, `pack_indices_2bit(indices)`.
        engine_backward: static; differentiate through the engine's kernels.

    Returns:
        `[B, T, N]` in x's dtype; f32 accumulation.
    """
    if m != 4:
        raise ValueError(f"jaxsparse.nm_spmm_packed: 2-bit positions are held for m = 4; got "
                         f"{n}:{m} (use nm_spmm)")
    if engine_backward and not has_engine(n, m):
        raise ValueError(f"jaxsparse.nm_spmm_packed: engine_backward needs n in (1, 2); got "
                         f"{n}:{m}")
    values, indices, indices_2bit = P.same_batch(values, indices, indices_2bit)
    return nm_spmm_packed_p.bind(x, values, indices, indices_2bit, n=n, m=m,
                                 engine_backward=bool(engine_backward))


def nm_spmm_packed_reference(x, values, indices, indices_2bit, *, n, m, engine_backward=False):
    # The positions come from the 2-bit array, so kernels are checked against what they read.
    del indices, engine_backward
    return nm_spmm_reference(x, values, unpack_indices_2bit(indices_2bit, values.shape[-1]),
                             n=n, m=m)


def _spmm_packed_abstract_eval(x, values, indices, indices_2bit, *, n, m, engine_backward):
    out = _spmm_abstract_eval(x, values, indices, n=n, m=m)
    want = (values.shape[0], values.shape[1], -(-values.shape[2] // 4))
    if indices_2bit.dtype != jnp.uint8 or tuple(indices_2bit.shape) != want:
        raise ValueError(f"nm_spmm_packed: indices_2bit must be uint8 {want}; got "
                         f"{indices_2bit.dtype} {tuple(indices_2bit.shape)}")
    return out


def _spmm_packed_jvp(primals, tangents, *, n, m, engine_backward):
    fn = functools.partial(nm_spmm_packed, n=n, m=m, engine_backward=engine_backward)
    return P.jvp_bilinear(fn, primals, tangents, fn(*primals))


def _spmm_packed_transpose(ct, x, values, indices, indices_2bit, *, n, m, engine_backward):
    if not engine_backward:
        return (*_spmm_transpose(ct, x, values, indices, n=n, m=m), None)
    if type(ct) is ad.Zero:
        return None, None, None, None
    columns = _engine_columns(values.aval if ad.is_undefined_primal(values) else values, n)
    ct_x, ct_values, *_ = vnm_spmm_p_transpose(ct, x, values, indices, columns,
                                               v=ENGINE_PANEL, n=n, m=m)
    return ct_x, ct_values, None, None


def _spmm_packed_batch(args, dims, *, n, m, engine_backward):
    fn = functools.partial(nm_spmm_packed, n=n, m=m, engine_backward=engine_backward)
    return P.batch_weight_product(fn, args, dims)


def _spmm_unpacked(x, values, indices, indices_2bit, *, n, m, engine_backward):
    """On CUDA (and the emulator) the product is `nm_spmm`'s: mma.sp has its own metadata."""
    return nm_spmm(x, values, indices, n=n, m=m)


# ====================================================================== the engine route
#: Outputs per panel when an N:M product runs on the V:N:M engine. Measured on a 2-core Xeon with
#: AMX (jax 0.12, bf16, 2:4): 128 beat 64 by 1.2-1.5x and 32 by 1.5-2x at 32-2048 tokens (more
#: outputs share each load of x); 256 was no faster (benchmarks/nm_engine_probe.py).
ENGINE_PANEL = 128


def has_engine(n: int, m: int) -> bool:
    """Whether `n:m` can run on the shared CPU engine: m = 4 (every group is one panel selection
    of all 4 inputs) and n in {1, 2} (the V:N:M kernels' n)."""
    return m == SELECTED and n in (1, 2)


def nm_spmm_engine(x, values, indices, *, n: int, m: int):
    """`y = x @ W` for an N:M sparse `W` with m = 4, on the shared engine (FORMATS.md section 4).

    An n:4 weight is a V:N:M weight `VNM(ENGINE_PANEL, n, 4)` whose panels select all 4 inputs of
    every group: its `values` and `indices` are already that format's (one row per output, slot =
    position). So the product runs the V:N:M kernels: per panel of `ENGINE_PANEL` outputs, decode
    the weights into a cache-resident dense tile and multiply with the dense micro-kernels (f32
    FMA, or the AMX tiles for bf16), with no full-size decompressed weight. Its derivatives are
    the V:N:M primitives' (the engine's backward kernels). On the CPU, like the dense path and
    unlike `nm_spmm`, it multiplies the pattern's zeros: an inf or nan in x reaches every output of
    its group (as nan), not only the outputs that keep that input (the CUDA kernels skip them).

    Args:
        x: `[Bx, T, K]` float32/bfloat16/float16.
        values: `[Bw, N, Kc]` same dtype, `Kc = ceil(K/4) * n`.
        indices: `[Bw, N, Kc]` uint8, positions 0..3.
        n, m: the pattern; `has_engine(n, m)` must hold.

    Returns:
        `[B, T, N]` in x's dtype, `B = max(Bx, Bw)`; f32 accumulation.
    """
    if not has_engine(n, m):
        raise ValueError(f"jaxsparse.nm_spmm_engine: the engine takes n:m with m = {SELECTED} and "
                         f"n in (1, 2); got {n}:{m} (use nm_spmm)")
    return vnm_spmm(x, values, indices, _engine_columns(values, n), v=ENGINE_PANEL, n=n, m=m)


def _engine_columns(values, n):
    """The V:N:M column selections of an n:4 weight of `values`' shape `[Bw, N, Kc]`: every panel
    of `ENGINE_PANEL` outputs selects all 4 inputs of every group."""
    batch, out_features, kept = values.shape
    panels, groups = -(-out_features // ENGINE_PANEL), kept // n
    every_input = jnp.arange(SELECTED, dtype=jnp.uint8)
    columns = jnp.broadcast_to(every_input, (batch, panels, groups, SELECTED))
    return columns.reshape(batch, panels, groups * SELECTED)


def vnm_spmm_p_transpose(ct, *args, **params):
    """The V:N:M forward's transpose rule: the engine's dx and dv."""
    return ad.primitive_transposes[vnm_spmm_p](ct, *args, **params)


# ====================================================================== registration
_ATTRS = ("n", "m")  # engine_backward only chooses the derivatives: not a kernel attribute.


def _register():
    P.register(nm_spmm_p, abstract_eval=_spmm_abstract_eval, jvp=_spmm_jvp,
               transpose=_spmm_transpose, batch=_spmm_batch, reference=nm_spmm_reference,
               target="jaxsparse_nm_spmm", attrs=_ATTRS, cuda_lowering=_spmm_cuda_lowering)
    P.register_cpu_variant(nm_spmm_packed_p, on_cuda=_spmm_unpacked,
                           abstract_eval=_spmm_packed_abstract_eval, jvp=_spmm_packed_jvp,
                           transpose=_spmm_packed_transpose, batch=_spmm_packed_batch,
                           reference=nm_spmm_packed_reference,
                           target="jaxsparse_nm_spmm_packed", attrs=_ATTRS)
    P.register(nm_spmm_t_p, abstract_eval=_spmm_t_abstract_eval, jvp=_spmm_t_jvp,
               transpose=_spmm_t_transpose, batch=_spmm_t_batch, reference=nm_spmm_t_reference,
               target="jaxsparse_nm_spmm_t", attrs=_ATTRS)
    P.register(nm_sddmm_p, abstract_eval=_sddmm_abstract_eval, jvp=_sddmm_jvp,
               transpose=_sddmm_transpose, batch=_sddmm_batch, reference=nm_sddmm_reference,
               target="jaxsparse_nm_sddmm", attrs=_ATTRS)


_register()
