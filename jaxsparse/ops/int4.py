"""int4 weights with group scales (MARLIN's numbers), dense or 2:4 sparse, as JAX primitives.

Two primitives per form, closed under differentiation in x (the weights are frozen):

- `int4_matmul`      y  = x @ W        `int4_nm_matmul`      (the 2:4 form)
- `int4_matmul_t`    dx = dy @ W^T     `int4_nm_matmul_t`

the forwards on the CPU layouts, `int4_matmul_lines` and `int4_nm_matmul_lines` (the weight packed
once by `int4_pack_lines` / `int4_nm_pack_lines`, for inference), and, opt-in for the dense form,
`int4_a8_matmul`: y = x @ W with x quantised to int8 per token
and group on the fly (`quantize_activations`), multiplied in int32 by the kernel: the CPU
target `jaxsparse_int4_a8_fused_matmul` quantises inside the call, `jaxsparse_int4_a8_matmul`
takes the quantised operands; its derivative in x is straight through the rounding.

The canonical layout (see `jaxsparse.formats.int4`), Flax's `[in, out]` orientation, with one
leading kernel batch dim (1, broadcast, or the common batch B):

    x          [Bx, T, K]      f32/bf16/f16
    dy         [By, T, N]      same dtype
    qweight    [Bw, K/2, N]    uint8: byte (j, o) holds input 2j (low nibble) and 2j+1 (high)
               [Bw, K/4, N]    2:4: byte (j, o) holds group j's two kept values (low nibble: the
                               one at the lower position)
    positions  [Bw, K/8, N]    uint8, 2:4 only: byte (j, o) holds group 2j's positions p0 | p1 << 2
                               in its low 4 bits, group 2j+1's in its high 4 bits
    scales     [Bw, K/g, N]    x's dtype; g = group_size (g = K: one group per output column)

A nibble u means the integer u - 8, so `W[i, o] = (u(i, o) - 8) * scales[i // g, o]`; in the 2:4
form each kept value lands at input `4j + p` of its group (added, so positions that are not
sorted and distinct keep a meaning, as the kernels read them). Accumulation is f32.

The quantised weights and scales are frozen: a tangent in them raises (their layers hold them as
sparsity state, never as parameters), and the cotangent of x is `int4_matmul_t`.

Each section in the order of jax's `sparse/csr.py`: primitive, public wrapper, pure-jnp reference
(the tests' oracle, and the fallback where no kernel exists), abstract eval, JVP, transpose,
batching; registration last.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad

from jaxsparse.ops import _primitive as P

__all__ = ["int4_matmul", "int4_matmul_t", "int4_nm_matmul", "int4_nm_matmul_t",
           "int4_matmul_reference", "int4_matmul_t_reference", "int4_nm_matmul_reference",
           "int4_nm_matmul_t_reference", "int4_dequantize", "int4_nm_dequantize",
           "NIBBLE_OFFSET", "unpack_positions", "int4_a8_matmul", "int4_a8_matmul_reference",
           "int4_a8_fused_matmul_reference",
           "quantize_activations", "int4_pack_lines", "int4_unpack_lines", "int4_matmul_lines",
           "int4_matmul_lines_reference", "int4_nm_pack_lines", "int4_nm_unpack_lines",
           "int4_nm_matmul_lines", "int4_nm_matmul_lines_reference"]

NIBBLE_OFFSET = 8  # A stored nibble u means u - 8: the int4 range [-8, 7] as unsigned 0..15.


# ====================================================================== dequantisation
def _nibbles(qweight):
    """uint8 `[..., R, N]` -> int32 `([..., R, N] low, [..., R, N] high)`, each u - 8."""
    q = qweight.astype(jnp.int32)
    return (q & 15) - NIBBLE_OFFSET, (q >> 4) - NIBBLE_OFFSET


def _expand_scales(scales, group_size: int, k: int):
    """`[..., K/g, N]` -> `[..., K, N]` in f32 (each group's scale on its g inputs)."""
    return jnp.repeat(scales.astype(jnp.float32), group_size, axis=-2)[..., :k, :]


def int4_dequantize(qweight, scales, *, group_size: int, dtype=None):
    """The dense weight `[..., K, N]` of an int4 `qweight [..., K/2, N]` and `scales`.

    Exact: `(u - 8) * scale` is one rounding of an exact f32 product to `dtype` (default the
    scales' dtype). Pure and jittable.
    """
    lo, hi = _nibbles(qweight)
    k = 2 * qweight.shape[-2]
    ints = jnp.stack([lo, hi], axis=-2).reshape(*qweight.shape[:-2], k, qweight.shape[-1])
    w = ints.astype(jnp.float32) * _expand_scales(scales, group_size, k)
    return w.astype(dtype or scales.dtype)


def int4_nm_dequantize(qweight, positions, scales, *, group_size: int, dtype=None):
    """The dense weight `[..., K, N]` of the int4 + 2:4 form (`qweight [..., K/4, N]`,
    `positions [..., K/8, N]`): each group's two values at inputs `4j + p0`, `4j + p1` (added
    where they coincide), zeros elsewhere. Pure and jittable."""
    lo, hi = _nibbles(qweight)  # [..., G, N], G = K/4 groups
    p0, p1 = unpack_positions(positions, qweight.shape[-2])
    slot = jnp.arange(4, dtype=jnp.int32)[:, None]  # [4, 1]: position inside the group
    ints = (jnp.where(p0[..., None, :] == slot, lo[..., None, :], 0)
            + jnp.where(p1[..., None, :] == slot, hi[..., None, :], 0))  # [..., G, 4, N]
    k = 4 * qweight.shape[-2]
    ints = ints.reshape(*qweight.shape[:-2], k, qweight.shape[-1])
    w = ints.astype(jnp.float32) * _expand_scales(scales, group_size, k)
    return w.astype(dtype or scales.dtype)


def unpack_positions(positions, groups: int):
    """uint8 `[..., K/8, N]` -> int32 `(p0, p1)`, each `[..., groups, N]` (`groups` = K/4): every
    2:4 group's two positions (group 2j in the low 4 bits of byte j, group 2j+1 in the high 4)."""
    p = positions.astype(jnp.int32)
    codes = jnp.stack([p & 15, p >> 4], axis=-2)  # [..., K/8, 2, N]
    codes = codes.reshape(*positions.shape[:-2], 2 * positions.shape[-2], positions.shape[-1])
    codes = codes[..., :groups, :]
    return codes & 3, (codes >> 2) & 3


# ====================================================================== shared checks
def _check_weight(where, qweight, positions, scales, group_size, k):
    """The weight operands against K (the dense operand's contraction width)."""
    sparse = positions is not None
    per_byte = 4 if sparse else 2
    named = {"qweight": qweight, "scales": scales}
    if sparse:
        named["positions"] = positions
    P.check_rank3(where, **named)
    n = qweight.shape[-1]
    if qweight.shape[1] * per_byte != k:
        raise ValueError(
            f"{where}: qweight must be [B, K/{per_byte}, N] = [B, {k // per_byte}, N]; got "
            f"{tuple(qweight.shape)}"
        )
    if group_size <= 0 or k % group_size or group_size % (8 if sparse else 2):
        raise ValueError(
            f"{where}: group_size must divide K = {k} and be a multiple of "
            f"{8 if sparse else 2}; got {group_size}"
        )
    if scales.shape[1:] != (k // group_size, n):
        raise ValueError(
            f"{where}: scales must be [B, K/group_size, N] = [B, {k // group_size}, {n}]; got "
            f"{tuple(scales.shape)}"
        )
    if sparse and positions.shape[1:] != (k // 8, n):
        raise ValueError(
            f"{where}: positions must be [B, K/8, N] = [B, {k // 8}, {n}]; got "
            f"{tuple(positions.shape)}"
        )
    if qweight.dtype != jnp.uint8 or (sparse and positions.dtype != jnp.uint8):
        raise TypeError(f"{where}: qweight and positions must be uint8, got {qweight.dtype}"
                        f"{'' if not sparse else ' and ' + str(positions.dtype)}")


def _check_dtypes(where, dense, scales, dense_name="x"):
    P.check_float(where, **{dense_name: dense})
    if scales.dtype != dense.dtype:
        raise TypeError(f"{where}: scales must have the dense operand's dtype {dense.dtype}; got "
                        f"{scales.dtype}")


def _refuse_weight_tangents(tangents):
    """The weights are frozen: differentiating in them is a user error, said plainly."""
    if any(type(t) is not ad.Zero for t in tangents):
        raise ValueError(
            "jaxsparse: int4 weights (qweight, positions and scales) are frozen and cannot be "
            "differentiated: train adapters beside them (QLoRA), or dequantise with todense() to "
            "fine-tune the dense weight and quantise it again"
        )


def _split(weight):
    """`(qweight, scales)` or `(qweight, positions, scales)` -> (qweight, positions, scales)."""
    return (weight[0], None, weight[1]) if len(weight) == 2 else tuple(weight)


def _dequantize(weight, group_size, dtype):
    qweight, positions, scales = _split(weight)
    if positions is None:
        return int4_dequantize(qweight, scales, group_size=group_size, dtype=dtype)
    return int4_nm_dequantize(qweight, positions, scales, group_size=group_size, dtype=dtype)


# ====================================================================== the forward products
int4_matmul_p = Primitive("jaxsparse_int4_matmul")
int4_nm_matmul_p = Primitive("jaxsparse_int4_nm_matmul")


def int4_matmul(x, qweight, scales, *, group_size: int, dense_backward: bool = False):
    """`y = x @ W` for an int4 `W` with group scales.

    Args:
        x: `[Bx, T, K]` float32/bfloat16/float16.
        qweight: `[Bw, K/2, N]` uint8, two inputs' nibbles per byte.
        scales: `[Bw, K/group_size, N]` in x's dtype.
        group_size: the inputs per scale (K for one group per output column).
        dense_backward: static; the cotangent of x dequantises W and takes XLA's dot instead of
            `int4_matmul_t` (`jaxsparse.ops.dispatch.int4_dense_backward` says where that wins).

    Returns:
        `[B, T, N]` in x's dtype, `B = max(Bx, Bw)`; f32 accumulation.
    """
    qweight, scales = P.same_batch(qweight, scales)
    return int4_matmul_p.bind(x, qweight, scales, group_size=group_size,
                              dense_backward=bool(dense_backward))


def int4_nm_matmul(x, qweight, positions, scales, *, group_size: int,
                   dense_backward: bool = False):
    """`y = x @ W` for an int4 + 2:4 `W`.

    Args:
        x: `[Bx, T, K]` float32/bfloat16/float16.
        qweight: `[Bw, K/4, N]` uint8, a 2:4 group's two kept nibbles per byte.
        positions: `[Bw, K/8, N]` uint8, two groups' positions per byte.
        scales: `[Bw, K/group_size, N]` in x's dtype (group_size a multiple of 8).
        dense_backward: static, as in `int4_matmul`.

    Returns:
        `[B, T, N]` in x's dtype; f32 accumulation.
    """
    qweight, positions, scales = P.same_batch(qweight, positions, scales)
    return int4_nm_matmul_p.bind(x, qweight, positions, scales, group_size=group_size,
                                 dense_backward=bool(dense_backward))


def int4_matmul_reference(x, qweight, scales, *, group_size, dense_backward=False):
    return _product_reference(x, (qweight, scales), group_size)


def int4_nm_matmul_reference(x, qweight, positions, scales, *, group_size,
                             dense_backward=False):
    return _product_reference(x, (qweight, positions, scales), group_size)


def _product_reference(x, weight, group_size):
    x, w = P.broadcast_batch(x, _dequantize(weight, group_size, jnp.float32))
    return P.f32_einsum("btk,bkn->btn", x, w, x.dtype)


def _product_abstract_eval(x, *weight, group_size, dense_backward):
    where = "int4_nm_matmul" if len(weight) == 3 else "int4_matmul"
    qweight, positions, scales = _split(weight)
    _check_weight(where, qweight, positions, scales, group_size, x.shape[-1])
    P.check_rank3(where, x=x)
    _check_dtypes(where, x, scales)
    batch = P.check_batches(where, ("x", x), ("qweight", qweight), ("scales", scales))
    return x.update(shape=(batch, x.shape[1], qweight.shape[-1]), dtype=x.dtype)


def _product_jvp(primals, tangents, *, group_size, dense_backward):
    _refuse_weight_tangents(tangents[1:])
    forward = functools.partial(_forward(len(primals) - 1), group_size=group_size,
                                dense_backward=dense_backward)
    return P.jvp_linear(forward, primals, tangents)


def _product_transpose(ct, x, *weight, group_size, dense_backward):
    none = (None,) * len(weight)
    if type(ct) is ad.Zero or not ad.is_undefined_primal(x):
        return (None, *none)
    if dense_backward:
        dx = _dense_product_t(ct, weight, group_size)
    else:
        dx = _backward(len(weight))(ct, *weight, group_size=group_size,
                                    in_features=x.aval.shape[-1])
    return (P.sum_to_batch(dx, x.aval.shape[0]), *none)


def _dense_product_t(dy, weight, group_size):
    """`dy @ W^T` by XLA's dot on the dequantised W (in dy's dtype, accumulated in f32): where
    the tokens are many, one dequantisation per call costs less than the W^T kernel's per-block
    decoding (jaxsparse/ops/dispatch.py, `INT4_DENSE_BACKWARD_FROM`)."""
    dy, w = P.broadcast_batch(dy, _dequantize(weight, group_size, dy.dtype))
    return P.f32_einsum("btn,bkn->btk", dy, w, dy.dtype)


def _product_batch(args, dims, *, group_size, dense_backward):
    fn = functools.partial(_forward(len(args) - 1), group_size=group_size,
                           dense_backward=dense_backward)
    return P.batch_weight_product(fn, args, dims)


# ====================================================================== the products by W^T
int4_matmul_t_p = Primitive("jaxsparse_int4_matmul_t")
int4_nm_matmul_t_p = Primitive("jaxsparse_int4_nm_matmul_t")


def int4_matmul_t(dy, qweight, scales, *, group_size: int, in_features: int):
    """`dx = dy @ W^T` for an int4 `W` (the cotangent of x in `x @ W`).

    Args:
        dy: `[By, T, N]` float32/bfloat16/float16.
        qweight, scales: as in `int4_matmul`.
        group_size: as in `int4_matmul`.
        in_features: K, the width of the result (`2 * qweight.shape[1]`).

    Returns:
        `[B, T, K]` in dy's dtype.
    """
    qweight, scales = P.same_batch(qweight, scales)
    return int4_matmul_t_p.bind(dy, qweight, scales, group_size=group_size,
                                in_features=in_features)


def int4_nm_matmul_t(dy, qweight, positions, scales, *, group_size: int, in_features: int):
    """`dx = dy @ W^T` for an int4 + 2:4 `W`; operands as in `int4_nm_matmul`.

    Returns:
        `[B, T, K]` in dy's dtype, K = `in_features` = `4 * qweight.shape[1]`.
    """
    qweight, positions, scales = P.same_batch(qweight, positions, scales)
    return int4_nm_matmul_t_p.bind(dy, qweight, positions, scales, group_size=group_size,
                                   in_features=in_features)


def int4_matmul_t_reference(dy, qweight, scales, *, group_size, in_features):
    return _product_t_reference(dy, (qweight, scales), group_size)


def int4_nm_matmul_t_reference(dy, qweight, positions, scales, *, group_size, in_features):
    return _product_t_reference(dy, (qweight, positions, scales), group_size)


def _product_t_reference(dy, weight, group_size):
    dy, w = P.broadcast_batch(dy, _dequantize(weight, group_size, jnp.float32))
    return P.f32_einsum("btn,bkn->btk", dy, w, dy.dtype)


def _product_t_abstract_eval(dy, *weight, group_size, in_features):
    where = "int4_nm_matmul_t" if len(weight) == 3 else "int4_matmul_t"
    qweight, positions, scales = _split(weight)
    _check_weight(where, qweight, positions, scales, group_size, in_features)
    P.check_rank3(where, dy=dy)
    _check_dtypes(where, dy, scales, "dy")
    if dy.shape[-1] != qweight.shape[-1]:
        raise ValueError(f"{where}: dy has {dy.shape[-1]} outputs, qweight "
                         f"{qweight.shape[-1]}")
    batch = P.check_batches(where, ("dy", dy), ("qweight", qweight), ("scales", scales))
    return dy.update(shape=(batch, dy.shape[1], in_features), dtype=dy.dtype)


def _product_t_jvp(primals, tangents, *, group_size, in_features):
    _refuse_weight_tangents(tangents[1:])
    backward = functools.partial(_backward(len(primals) - 1), group_size=group_size,
                                 in_features=in_features)
    return P.jvp_linear(backward, primals, tangents)


def _product_t_transpose(ct, dy, *weight, group_size, in_features):
    none = (None,) * len(weight)
    if type(ct) is ad.Zero or not ad.is_undefined_primal(dy):
        return (None, *none)
    y = _forward(len(weight))(ct, *weight, group_size=group_size)
    return (P.sum_to_batch(y, dy.aval.shape[0]), *none)


def _product_t_batch(args, dims, *, group_size, in_features):
    fn = functools.partial(_backward(len(args) - 1), group_size=group_size,
                           in_features=in_features)
    return P.batch_weight_product(fn, args, dims)


# ====================================================================== int8 activations
int4_a8_matmul_p = Primitive("jaxsparse_int4_a8_matmul")
int4_a8_fused_matmul_p = Primitive("jaxsparse_int4_a8_fused_matmul")

A8_QMAX = 127  # Symmetric int8: max |x| of a token's group maps to 127.


def quantize_activations(x, group_size: int):
    """Symmetric int8 quantisation of `x [..., K]` per row and group of `group_size` inputs.

    Returns:
        `(codes [..., K] int8, scales [..., K/g] f32, sums [..., K/g] int32)`: per group
        `scale = max |x| * f32(1/127)` and `code = round(x / scale)` (half to even), so
        `x ~ code * scale`; `sums` is
        the sum of each group's codes (what the kernel's `- 8 sum` of the nibble offset takes).
        An all-zero group has scale 0 and codes 0.
    """
    k = x.shape[-1]
    grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], k // group_size, group_size)
    # Times the rounded reciprocal, not divided by 127 (which XLA rewrites so or not), so the
    # CPU kernel that quantises inside its call gets these scales bit for bit.
    scales = jnp.max(jnp.abs(grouped), axis=-1) * jnp.float32(1 / A8_QMAX)
    safe = jnp.where(scales > 0, scales, 1.0)[..., None]
    codes = jnp.clip(jnp.round(grouped / safe), -A8_QMAX, A8_QMAX).astype(jnp.int8)
    return codes.reshape(x.shape), scales, jnp.sum(codes.astype(jnp.int32), axis=-1)


def _a8_order(codes):
    """Each quad of inputs in the order (0, 2, 1, 3) of the kernel's weight dwords (its own
    inverse)."""
    quads = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 4, 4)
    return quads[..., jnp.array([0, 2, 1, 3])].reshape(codes.shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _int4_a8_product(x, qweight, scales, group_size):
    # One primitive of float x: its CPU kernel quantises inside the call, so jit compiles no
    # quantising ops around it (at few tokens they cost more than the product).
    qweight, scales = P.same_batch(qweight, scales)
    return int4_a8_fused_matmul_p.bind(x, qweight, scales, group_size=group_size)


@functools.partial(_int4_a8_product.defjvp, symbolic_zeros=True)
def _int4_a8_product_jvp(group_size, primals, tangents):
    x, qweight, scales = primals
    if any(type(t) is not jax.custom_derivatives.SymbolicZero for t in tangents[1:]):
        _refuse_weight_tangents((None,))
    out = _int4_a8_product(x, qweight, scales, group_size)
    if type(tangents[0]) is jax.custom_derivatives.SymbolicZero:
        return out, jnp.zeros_like(out)
    # Straight through the activations' rounding: the tangent is the product by W of the
    # unquantised tangent (so the cotangent of x is int4_matmul_t, as without int8).
    return out, int4_matmul(tangents[0].astype(x.dtype), qweight, scales, group_size=group_size)


def int4_a8_matmul(x, qweight, scales, *, group_size: int):
    """`y = x @ W` for an int4 `W`, with x quantised to int8 on the fly (opt-in, dense form).

    x is quantised per token and group of `group_size` inputs (`quantize_activations`), on the
    CPU inside the kernel's call (no XLA ops around it); the kernels then multiply the int8
    codes by the int4 codes exactly in int32 (`vpdpbusd` where the
    CPU has AVX512-VNNI: 64 multiply-adds per instruction) and apply both scales once per group.
    The error is the activations' rounding: measured in docs/cpu_speed_notes.md (int4, third
    round). Differentiable in x, straight through the rounding (the cotangent of x is that of
    `int4_matmul`).

    Args:
        x: `[Bx, T, K]` float32/bfloat16/float16.
        qweight, scales, group_size: as in `int4_matmul`; group_size and K multiples of 4.

    Returns:
        `[B, T, N]` in x's dtype.
    """
    if scales.dtype != x.dtype:
        raise TypeError(f"int4_a8_matmul: scales must have x's dtype {x.dtype}; got "
                        f"{scales.dtype}")
    P.check_rank3("int4_a8_matmul", x=x, qweight=qweight, scales=scales)
    if group_size <= 0 or group_size % 4 or x.shape[-1] % group_size:
        raise ValueError(f"int4_a8_matmul: group_size must divide K = {x.shape[-1]} and be a "
                         f"multiple of 4; got {group_size}")
    return _int4_a8_product(x, qweight, scales, group_size)


def int4_a8_matmul_reference(xq, x_scales, x_sums, qweight, scales, *, group_size):
    """The primitive's pure-jnp product: the dequantised activations `code * scale` (xq in the
    kernel's quad order) times the dequantised weight, f32 accumulation."""
    del x_sums  # Implied by xq; the kernels take it to skip a pass over x.
    codes = _a8_order(xq).astype(jnp.float32)
    x = codes * jnp.repeat(x_scales, group_size, axis=-1)
    x, w = P.broadcast_batch(x, int4_dequantize(qweight, scales, group_size=group_size,
                                                dtype=jnp.float32))
    return P.f32_einsum("btk,bkn->btn", x, w, scales.dtype)


def int4_a8_fused_matmul_reference(x, qweight, scales, *, group_size):
    """The fused primitive's pure-jnp product: `quantize_activations`, then
    `int4_a8_matmul_reference`. The kernel's codes are IEEE division's; XLA's compiled division
    here may round an exact tie (x / scale = 63.5) one code lower."""
    codes, x_scales, sums = quantize_activations(x, group_size)
    return int4_a8_matmul_reference(_a8_order(codes), x_scales, sums, qweight, scales,
                                    group_size=group_size)


def _a8_fused_abstract_eval(x, qweight, scales, *, group_size):
    where = "int4_a8_matmul"
    P.check_rank3(where, x=x)
    _check_dtypes(where, x, scales)
    _check_weight(where, qweight, None, scales, group_size, x.shape[-1])
    if group_size % 4 or x.shape[-1] % 4:
        raise ValueError(f"{where}: K = {x.shape[-1]} and group_size = {group_size} must be "
                         "multiples of 4 (whole input quads)")
    batch = P.check_batches(where, ("x", x), ("qweight", qweight), ("scales", scales))
    return x.update(shape=(batch, x.shape[1], qweight.shape[-1]), dtype=x.dtype)


def _a8_abstract_eval(xq, x_scales, x_sums, qweight, scales, *, group_size):
    where = "int4_a8_matmul"
    _check_weight(where, qweight, None, scales, group_size, xq.shape[-1])
    P.check_rank3(where, xq=xq, x_scales=x_scales, x_sums=x_sums)
    groups = xq.shape[-1] // group_size
    for name, a, dtype in (("xq", xq, jnp.int8), ("x_scales", x_scales, jnp.float32),
                           ("x_sums", x_sums, jnp.int32)):
        if a.dtype != dtype:
            raise TypeError(f"{where}: {name} must be {jnp.dtype(dtype).name}; got {a.dtype}")
    for name, a in (("x_scales", x_scales), ("x_sums", x_sums)):
        if a.shape != (*xq.shape[:2], groups):
            raise ValueError(f"{where}: {name} must be [B, T, K/group_size] = "
                             f"{(*xq.shape[:2], groups)}; got {tuple(a.shape)}")
    batch = P.check_batches(where, ("xq", xq), ("qweight", qweight), ("scales", scales))
    return scales.update(shape=(batch, xq.shape[1], qweight.shape[-1]), dtype=scales.dtype)


def _a8_refuse(*args, **params):
    raise ValueError(
        "jaxsparse: the int8-activation primitive's quantised operands have no derivative of "
        "their own; differentiate jaxsparse.ops.int4_a8_matmul (straight through the rounding)"
    )


def _a8_batcher(primitive):
    """The batching rule of an int8-activation primitive: vmap's axis into its kernel batch."""
    def batch(args, dims, *, group_size):
        fn = functools.partial(primitive.bind, group_size=group_size)
        return P.batch_into_kernel_batch(fn, args, dims)
    return batch


# ====================================================================== the CPU lines layout
LINE_OUTPUTS = 64  # outputs per block: one 64-byte line per input pair


def int4_pack_lines(qweight):
    """The dense form's CPU layout: each block of 64 outputs' rows one after the other.

    A task of the CPU kernel owns 64 outputs; in the canonical `[K/2, N]` its 64-byte line of each
    row sits on another 4 KB page, where the hardware prefetchers stop. Here the block's lines are
    one sequential stream, and within a line output `16 j + l` sits in byte `4 l + j`, so that a
    shift puts it in dword lane `l` (the kernel's lookup reads a lane's low 4 bits).

    Args:
        qweight: `[..., K/2, N]` uint8 (canonical).

    Returns:
        `[..., ceil(N/64) K/2, 64]` uint8: `lines[b K/2 + r, 4 l + j] = qweight[r, 64 b + 16 j + l]`,
        0 past N. Pure and jittable; `int4_unpack_lines` inverts it.
    """
    *lead, rows, n = qweight.shape
    blocks = -(-n // LINE_OUTPUTS)
    padded = jnp.pad(qweight, [(0, 0)] * (len(lead) + 1) + [(0, blocks * LINE_OUTPUTS - n)])
    split = padded.reshape(*lead, rows, blocks, 4, 16)  # [.., r, b, j, l]
    lines = jnp.moveaxis(split, -4, -3).swapaxes(-1, -2)  # [.., b, r, l, j]
    return lines.reshape(*lead, blocks * rows, LINE_OUTPUTS)


def int4_unpack_lines(lines, *, out_features: int):
    """The canonical `[..., K/2, N]` of `int4_pack_lines`'s result (N = out_features)."""
    *lead, total, width = lines.shape
    blocks = -(-out_features // LINE_OUTPUTS)
    if width != LINE_OUTPUTS or blocks == 0 or total % blocks:
        raise ValueError(f"int4_unpack_lines: lines of shape {lines.shape} do not hold "
                         f"{out_features} outputs (expected [..., ceil(N/64) K/2, 64])")
    rows = total // blocks
    split = lines.reshape(*lead, blocks, rows, 16, 4).swapaxes(-1, -2)  # [.., b, r, j, l]
    canonical = jnp.moveaxis(split, -4, -3).reshape(*lead, rows, blocks * LINE_OUTPUTS)
    return canonical[..., :out_features]


int4_matmul_lines_p = Primitive("jaxsparse_int4_matmul_lines")


def int4_matmul_lines(x, lines, scales, *, group_size: int):
    """`y = x @ W` for a dense int4 `W` packed once by `int4_pack_lines` (CPU inference form).

    Args:
        x: `[Bx, T, K]` float32/bfloat16/float16.
        lines: `[Bw, ceil(N/64) K/2, 64]` uint8, `int4_pack_lines(qweight)`.
        scales: `[Bw, K/group_size, N]` in x's dtype.

    Returns:
        `[B, T, N]` in x's dtype; f32 accumulation. The CPU kernels read the lines at every token
    count (streaming them at few tokens, the f32 panels and the bf16 tiles from 16). The cotangent
    of x unpacks the lines to the canonical layout for `int4_matmul_t` (a cost of the backward
    only); the weight is frozen.
    """
    lines, scales = P.same_batch(lines, scales)
    return int4_matmul_lines_p.bind(x, lines, scales, group_size=group_size)


def int4_matmul_lines_reference(x, lines, scales, *, group_size):
    return _product_reference(x, _canonical_of_lines(lines, scales, x.shape[-1], False),
                              group_size)


def _canonical_of_lines(lines, scales, k, sparse):
    """The canonical weight operands `(qweight, scales)` or `(qweight, positions, scales)` of
    either form's lines (K = k)."""
    n = scales.shape[-1]
    if sparse:
        return (*int4_nm_unpack_lines(lines, in_features=k, out_features=n), scales)
    return int4_unpack_lines(lines, out_features=n), scales


def _lines_abstract_eval(x, lines, scales, *, group_size, sparse):
    where = "int4_nm_matmul_lines" if sparse else "int4_matmul_lines"
    P.check_rank3(where, x=x, lines=lines, scales=scales)
    k, n, b = x.shape[-1], scales.shape[-1], lines.shape[0]
    blocks = -(-n // LINE_OUTPUTS)
    if sparse:
        rows, text, multiple = blocks * -(-k // NM_CHUNK) * 8, "ceil(N/64) ceil(K/16) 8", 8
        canonical = (jax.ShapeDtypeStruct((b, k // 4, n), jnp.uint8),
                     jax.ShapeDtypeStruct((b, k // 8, n), jnp.uint8))
    else:
        rows, text, multiple = blocks * (k // 2), "ceil(N/64) K/2", 2
        canonical = (jax.ShapeDtypeStruct((b, k // 2, n), jnp.uint8), None)
    if lines.dtype != jnp.uint8 or tuple(lines.shape[1:]) != (rows, LINE_OUTPUTS) or k % multiple:
        raise ValueError(f"{where}: lines must be uint8 [Bw, {text}, 64] = [Bw, {rows}, 64] for "
                         f"K = {k} ({'a multiple of 8' if sparse else 'even'}), N = {n} (scales' "
                         f"last dim); got {lines.dtype} {tuple(lines.shape)}")
    _check_weight(where, *canonical, scales, group_size, k)
    _check_dtypes(where, x, scales)
    batch = P.check_batches(where, ("x", x), ("lines", lines), ("scales", scales))
    return x.update(shape=(batch, x.shape[1], n), dtype=x.dtype)


def _lines_product(sparse, group_size):
    return functools.partial(int4_nm_matmul_lines if sparse else int4_matmul_lines,
                             group_size=group_size)


def _lines_jvp(primals, tangents, *, group_size, sparse):
    _refuse_weight_tangents(tangents[1:])
    return P.jvp_linear(_lines_product(sparse, group_size), primals, tangents)


def _lines_transpose(ct, x, lines, scales, *, group_size, sparse):
    if type(ct) is ad.Zero or not ad.is_undefined_primal(x):
        return None, None, None
    k = x.aval.shape[-1]
    weight = _canonical_of_lines(lines, scales, k, sparse)
    dx = _backward(len(weight))(ct, *weight, group_size=group_size, in_features=k)
    return P.sum_to_batch(dx, x.aval.shape[0]), None, None


def _lines_batch(args, dims, *, group_size, sparse):
    return P.batch_weight_product(_lines_product(sparse, group_size), args, dims)


# ---------------------------------------------------------------------- the 2:4 form's lines
NM_CHUNK = 16  # inputs per chunk of the 2:4 lines: 4 groups, one vector of x to look up in
_NM_PAD_VALUE = 0x88  # both nibbles code 0 (u = 8): padding multiplies as zero


def int4_nm_pack_lines(qweight, positions):
    """The 2:4 form's CPU layout: per block of 64 outputs, per chunk of 16 inputs, 8 lines.

    Lines 0..3 hold the chunk's 4 groups' value bytes of outputs `16 v + l` (line v, byte
    `4 l + j` for group `4 c + j`), lines 4..7 the same places' indices `(4 j + p0) | (4 j + p1) <<
    4`: each kept value's input within the chunk, which the kernel looks up with one `vpermps` in a
    vector of the chunk's 16 inputs. A block's chunks are one sequential stream (the canonical rows
    sit a 4 KB page apart), and the 4-bit indices cost fewer vector operations than the canonical
    2-bit positions (benchmarks/int4_nm_lines_probe.cc). 0.5 byte per weight, as the dense lines.

    Args:
        qweight: `[..., K/4, N]` uint8, positions: `[..., K/8, N]` uint8 (canonical 2:4 form).

    Returns:
        `[..., ceil(N/64) ceil(K/16) 8, 64]` uint8; past K or N the values are 0x88 (code 0) and
        the indices `4 j | (4 j + 1) << 4`. Pure and jittable; `int4_nm_unpack_lines` inverts it.
    """
    *lead, groups, n = qweight.shape
    p0, p1 = unpack_positions(positions, groups)
    chunks, blocks = -(-groups // 4), -(-n // LINE_OUTPUTS)
    slot = 4 * (jnp.arange(groups, dtype=jnp.int32) % 4)[:, None]  # 4 j for group j's byte
    index = ((slot + p0) | ((slot + p1) << 4)).astype(jnp.uint8)
    pad = [(0, 0)] * len(lead) + [(0, 4 * chunks - groups), (0, blocks * LINE_OUTPUTS - n)]
    values = jnp.pad(qweight, pad, constant_values=_NM_PAD_VALUE)
    pad_slot = 4 * (jnp.arange(4 * chunks, dtype=jnp.int32) % 4)[:, None]
    index = jnp.where(_inside(groups, n, chunks, blocks),
                      jnp.pad(index, pad), (pad_slot | ((pad_slot + 1) << 4)).astype(jnp.uint8))
    both = jnp.stack([values, index], axis=-3)  # [.., 2, C*4, B*64]
    split = both.reshape(*lead, 2, chunks, 4, blocks, 4, 16)  # [.., kind, c, j, b, v, l]
    lines = jnp.moveaxis(split, (-3, -5, -6, -2, -1, -4), (-6, -5, -4, -3, -2, -1))
    return lines.reshape(*lead, blocks * chunks * 8, LINE_OUTPUTS)


def _inside(groups, n, chunks, blocks):
    """`[C*4, B*64]` bool: the places of the padded grid that hold a group of the weight."""
    rows = jnp.arange(4 * chunks)[:, None] < groups
    return rows & (jnp.arange(blocks * LINE_OUTPUTS)[None, :] < n)


def int4_nm_unpack_lines(lines, *, in_features: int, out_features: int):
    """`(qweight [..., K/4, N], positions [..., K/8, N])` of `int4_nm_pack_lines`'s result (K =
    in_features, a multiple of 8; N = out_features): the positions are each index's low 2 bits."""
    *lead, total, width = lines.shape
    groups, blocks = in_features // 4, -(-out_features // LINE_OUTPUTS)
    chunks = -(-groups // 4)
    if (width != LINE_OUTPUTS or in_features % 8 or blocks == 0
            or total != blocks * chunks * 8):
        raise ValueError(f"int4_nm_unpack_lines: lines of shape {tuple(lines.shape)} do not hold "
                         f"{in_features} inputs (a multiple of 8) and {out_features} outputs "
                         f"(expected [..., ceil(N/64) ceil(K/16) 8, 64])")
    split = lines.reshape(*lead, blocks, chunks, 2, 4, 16, 4)  # [.., b, c, kind, v, l, j]
    grid = jnp.moveaxis(split, (-4, -5, -1, -6, -3, -2), (-6, -5, -4, -3, -2, -1))
    grid = grid.reshape(*lead, 2, 4 * chunks, blocks * LINE_OUTPUTS)[..., :groups, :out_features]
    qweight, index = grid[..., 0, :, :], grid[..., 1, :, :].astype(jnp.int32)
    codes = (index & 3) | ((index >> 4) & 3) << 2  # [.., G, N]: p0 | p1 << 2
    pairs = codes.reshape(*lead, groups // 2, 2, out_features)
    positions = (pairs[..., 0, :] | (pairs[..., 1, :] << 4)).astype(jnp.uint8)
    return qweight, positions


int4_nm_matmul_lines_p = Primitive("jaxsparse_int4_nm_matmul_lines")


def int4_nm_matmul_lines(x, lines, scales, *, group_size: int):
    """`y = x @ W` for an int4 + 2:4 `W` packed once by `int4_nm_pack_lines` (CPU inference form).

    Args:
        x: `[Bx, T, K]` float32/bfloat16/float16.
        lines: `[Bw, ceil(N/64) ceil(K/16) 8, 64]` uint8, `int4_nm_pack_lines(qweight, positions)`.
        scales: `[Bw, K/group_size, N]` in x's dtype.

    Returns:
        `[B, T, N]` in x's dtype; f32 accumulation. The CPU kernels read the lines at every token
    count (a lookup of each kept value's input at few tokens; the f32 panels and the bf16 tiles,
    which decode the lines with their zeros, from 16). The cotangent of x unpacks the lines to the
    canonical arrays for `int4_nm_matmul_t`; the weight is frozen.
    """
    lines, scales = P.same_batch(lines, scales)
    return int4_nm_matmul_lines_p.bind(x, lines, scales, group_size=group_size)


def int4_nm_matmul_lines_reference(x, lines, scales, *, group_size):
    return _product_reference(x, _canonical_of_lines(lines, scales, x.shape[-1], True),
                              group_size)


# ====================================================================== registration
def _forward(weight_operands: int):
    return int4_nm_matmul if weight_operands == 3 else int4_matmul


def _backward(weight_operands: int):
    return int4_nm_matmul_t if weight_operands == 3 else int4_matmul_t


_ATTRS = ("group_size",)


def _register():
    for prim, reference, target in (
        (int4_matmul_p, int4_matmul_reference, "jaxsparse_int4_matmul"),
        (int4_nm_matmul_p, int4_nm_matmul_reference, "jaxsparse_int4_nm_matmul"),
    ):
        P.register(prim, abstract_eval=_product_abstract_eval, jvp=_product_jvp,
                   transpose=_product_transpose, batch=_product_batch, reference=reference,
                   target=target, attrs=_ATTRS)
    for prim, reference, target in (
        (int4_matmul_t_p, int4_matmul_t_reference, "jaxsparse_int4_matmul_t"),
        (int4_nm_matmul_t_p, int4_nm_matmul_t_reference, "jaxsparse_int4_nm_matmul_t"),
    ):
        P.register(prim, abstract_eval=_product_t_abstract_eval, jvp=_product_t_jvp,
                   transpose=_product_t_transpose, batch=_product_t_batch, reference=reference,
                   target=target, attrs=_ATTRS)


    for prim, reference, target, sparse in (
        (int4_matmul_lines_p, int4_matmul_lines_reference, "jaxsparse_int4_matmul_lines", False),
        (int4_nm_matmul_lines_p, int4_nm_matmul_lines_reference,
         "jaxsparse_int4_nm_matmul_lines", True),
    ):
        rules = {name: functools.partial(rule, sparse=sparse) for name, rule in (
            ("abstract_eval", _lines_abstract_eval), ("jvp", _lines_jvp),
            ("transpose", _lines_transpose), ("batch", _lines_batch))}
        P.register(prim, **rules, reference=reference, target=target, attrs=_ATTRS)
    P.register(int4_a8_matmul_p, abstract_eval=_a8_abstract_eval, jvp=_a8_refuse,
               transpose=_a8_refuse, batch=_a8_batcher(int4_a8_matmul_p),
               reference=int4_a8_matmul_reference,
               target="jaxsparse_int4_a8_matmul", attrs=_ATTRS)
    P.register(int4_a8_fused_matmul_p, abstract_eval=_a8_fused_abstract_eval, jvp=_a8_refuse,
               transpose=_a8_refuse, batch=_a8_batcher(int4_a8_fused_matmul_p),
               reference=int4_a8_fused_matmul_reference,
               target="jaxsparse_int4_a8_fused_matmul", attrs=_ATTRS)


_register()
