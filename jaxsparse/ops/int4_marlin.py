"""The int4 forms in MARLIN's device layouts, and their CUDA products (KERNELS.md section 3).

The canonical int4 arrays (`jaxsparse.formats.int4`, docs/ffi_abi.md "The int4 canonical layout")
are what the CPU kernels read. The CUDA kernel (cuda/int4/int4_marlin.cuh, after IST-DASLab's
MARLIN) reads them re-laid so that one 16-byte load per thread brings eight complete mma B
fragments and the group scales of its columns:

- `marlin_pack(qweight, scales, group_size=...)`  canonical -> device layout (pure, jittable)
- `marlin_unpack(packed_qweight, packed_scales, group_size=...)`  its exact inverse
- `int4_marlin_matmul(x, packed_qweight, packed_scales, group_size=...)`  y = x @ W on CUDA (or on
  the CPU through the SIMT emulator under JAXSPARSE_EMULATE_CUDA=1)
- `marlin_nm_pack` / `marlin_nm_unpack` / `int4_nm_marlin_matmul`: the same for the int4 + 2:4
  form (Sparse-MARLIN's scheme, KERNELS.md 3.5, in a layout of our own: see `marlin_nm_pack`)

Shapes the CUDA layout supports: `in_features` (K) a multiple of 64 and `out_features` (N) a
multiple of 64 (the kernel's k and n tiles), `group_size` a multiple of 16 dividing K (the inputs of
one mma k-step share a scale) or None for one scale per output column, scales and activations
bfloat16 or float16 (the tensor cores' inputs), any number of tokens. The 2:4 form: K a multiple
of 128, N of 64, group_size a multiple of 32 dividing K or None. The canonical format allows more
(K % 2, groups of 8, float32): such weights stay on the CPU layout.

The device layout, for K = 16 KB x N = 64 NB:

    packed_qweight [K/16, 2N] int32: row kb holds k-rows 16 kb .. 16 kb + 15. Per 64 columns
        (block nb), 128 words, word 4 (4g + t) + j for lane 4g + t (g < 8, t < 4) and j < 4; its
        eight nibbles (bits 4i .. 4i + 3) are the codes u (0..15, meaning u - 8) of
            i = 0, 4: rows 2t, 2t + 1        of column 64 nb + 16 j + g
            i = 1, 5: rows 2t + 8, 2t + 9    of that column
            i = 2, 6 / 3, 7: the same rows   of column 64 nb + 16 j + 8 + g
        (the m16n8k16 B fragments of n8 tiles 2j and 2j + 1, in the [0, 2, 4, 6, 1, 3, 5, 7] nibble
        order the lop3 dequantisation takes them in).
    packed_scales [K/g, N] (grouped): per row and 64 columns, position 8i + j holds column i + 8j
        (lane 4g + t's 16-byte load at 8g: the scales of its eight n8 tiles' column g).
    packed_scales [1, N] (group_size None): per 32 columns, position 8i + j holds column
        2i + (0, 1, 8, 9, 16, 17, 24, 25)[j] (lane t's accumulator columns of four n8 tiles).

These are MARLIN's `Layer.pack` layouts (its groupsize -1 is our None), so weights packed by either
are interchangeable, given the same symmetric int4 codes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad

from jaxsparse import _validate as V
from jaxsparse.ops import _primitive as P
from jaxsparse.ops import int4 as int4_ops

__all__ = ["marlin_pack", "marlin_unpack", "int4_marlin_matmul", "int4_marlin_matmul_reference",
           "marlin_nm_pack", "marlin_nm_unpack", "int4_nm_marlin_matmul",
           "int4_nm_marlin_matmul_reference", "MARLIN_TILE_K", "MARLIN_TILE_N",
           "MARLIN_NM_TILE_K"]

MARLIN_TILE_K = 64  # K must be a multiple: the inputs of one pipeline stage (4 warps x k16).
MARLIN_TILE_N = 64  # N must be a multiple: the columns of one block (8 n8 tiles).
MARLIN_GROUP_MULTIPLE = 16  # Groups are whole mma k16 steps.
MARLIN_NM_TILE_K = 128  # 2:4: K must be a multiple (4 warps x one m16n8k32 step of 32 inputs).
MARLIN_NM_GROUP_MULTIPLE = 32  # 2:4: groups are whole k32 steps.
PER_COLUMN = -1  # The FFI attribute group_size of one scale per output column (MARLIN's -1).
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_TARGET = "jaxsparse_int4_marlin_matmul"
_NM_TARGET = "jaxsparse_int4_nm_marlin_matmul"

# The scales' permutations, each a swap of two axes (so its own inverse). Grouped: position
# 8i + j of a 64-column chunk holds column i + 8j (an 8 x 8 transpose). Per column: position
# 8i + 2a + b of a 32-column chunk holds column 8a + 2i + b (the outer 4 x 4 of [4, 4, 2]).
_GROUPED_SCALE_CHUNK = (8, 8)
_PER_COLUMN_SCALE_CHUNK = (4, 4, 2)


# ====================================================================== validation
def _check_group_size(group_size, k: int, where: str, multiple: int = MARLIN_GROUP_MULTIPLE):
    """None (per column) or a multiple of `multiple` dividing K; returns it."""
    if group_size is None:
        return None
    group_size = V.check_int("group_size", group_size, low=1, high=2**31 - 1, where=where)
    if group_size % multiple or k % group_size:
        raise ValueError(
            f"{where}: group_size must be None (one scale per output column) or a multiple of "
            f"{multiple} dividing in_features = {k} (the MARLIN layout); got {group_size}"
        )
    return group_size


def _check_features(k: int, n: int, where: str, tile_k: int = MARLIN_TILE_K):
    if k % tile_k or k == 0:
        raise ValueError(f"{where}: in_features must be a positive multiple of {tile_k} "
                         f"for the MARLIN layout; got {k}")
    if n % MARLIN_TILE_N or n == 0:
        raise ValueError(f"{where}: out_features must be a positive multiple of {MARLIN_TILE_N} "
                         f"for the MARLIN layout; got {n}")


def _check_rank2(name: str, a, where: str, what: str):
    if a.ndim != 2:
        raise ValueError(f"{where}: {name} must be rank 2 ({what}); got shape {tuple(a.shape)}")


def _check_scales(scales, k: int, n: int, group_size, where: str, name: str = "scales"):
    _check_rank2(name, scales, where, "[in/group_size, out], or [1, out] per column")
    if jnp.dtype(scales.dtype) not in DTYPES:
        raise TypeError(f"{where}: {name} must be bfloat16 or float16 (the MARLIN kernel's "
                        f"tensor-core dtypes); got {jnp.dtype(scales.dtype).name}")
    groups = 1 if group_size is None else k // group_size
    if tuple(scales.shape) != (groups, n):
        want = "[1, out]" if group_size is None else "[in/group_size, out]"
        raise ValueError(f"{where}: {name} must be {want} = {[groups, n]}; got "
                         f"{list(scales.shape)}")


# ====================================================================== the layout
def _split_codes(qweight):
    """uint8 `[K/2, N]` -> int32 codes `[K, N]` (0..15): input 2j low nibble, 2j + 1 high."""
    q = qweight.astype(jnp.int32)
    k2, n = q.shape
    return jnp.stack([q & 15, q >> 4], axis=1).reshape(2 * k2, n)


def _join_codes(codes):
    """int32 codes `[K, N]` -> uint8 `[K/2, N]` (the inverse of `_split_codes`)."""
    pairs = codes.reshape(codes.shape[0] // 2, 2, codes.shape[1])
    return (pairs[:, 0] | (pairs[:, 1] << 4)).astype(jnp.uint8)


def _words_from_codes(codes):
    """`[K, N]` codes -> `[K/16, 2N]` int32 words (the module docstring's layout).

    Row 8s + 2t + h of a k16 step and column 16j + 8e + g of a 64-column block go to nibble
    s + 2e + 4h of word (lane 4g + t, j).
    """
    k, n = codes.shape
    c = codes.reshape(k // 16, 2, 4, 2, n // 64, 4, 2, 8)  # [kb, s, t, h, nb, j, e, g]
    c = c.transpose(0, 4, 7, 2, 5, 3, 6, 1)  # [kb, nb, g, t, j, h, e, s]
    nibbles = c.reshape(k // 16, n // 64, 32, 4, 8).astype(jnp.uint32)
    shifts = 4 * jnp.arange(8, dtype=jnp.uint32)
    words = jnp.sum(nibbles << shifts, axis=-1, dtype=jnp.uint32)  # Disjoint bits: OR.
    return jax.lax.bitcast_convert_type(words.reshape(k // 16, 2 * n), jnp.int32)


def _codes_from_words(words):
    """`[K/16, 2N]` int32 words -> `[K, N]` codes (the inverse of `_words_from_codes`)."""
    kb, n2 = words.shape
    n = n2 // 2
    w = jax.lax.bitcast_convert_type(words, jnp.uint32).reshape(kb, n // 64, 8, 4, 4)
    nibbles = (w[..., None] >> (4 * jnp.arange(8, dtype=jnp.uint32))) & 15  # [.., 8 nibbles]
    c = nibbles.astype(jnp.int32).reshape(kb, n // 64, 8, 4, 4, 2, 2, 2)  # [kb,nb,g,t,j,h,e,s]
    c = c.transpose(0, 7, 3, 5, 1, 4, 6, 2)  # [kb, s, t, h, nb, j, e, g]
    return c.reshape(16 * kb, n)


def _permute_scales(scales, grouped: bool):
    """MARLIN's scale order from the canonical one, and back (the same swap); `grouped`: the
    grouped order (the 2:4 kernel's for every group size). Reshapes and a transpose, no index
    table: traced inside a sharded product's rules, a table would be a closed-over constant,
    which `custom_partitioning` refuses."""
    rows, n = scales.shape
    chunk = _GROUPED_SCALE_CHUNK if grouped else _PER_COLUMN_SCALE_CHUNK
    blocks = scales.reshape(rows, n // math.prod(chunk), *chunk)
    return jnp.swapaxes(blocks, 2, 3).reshape(rows, n)


def marlin_pack(qweight, scales, *, group_size):
    """The MARLIN device layout of canonical int4 arrays (pure and jittable).

    Args:
        qweight: `[in/2, out]` uint8, the canonical codes (input 2j in the low nibble of byte j).
        scales: `[in/group_size, out]` (or `[1, out]` when group_size is None) bfloat16/float16.
        group_size: a multiple of 16 dividing `in`, or None for one scale per output column.

    Returns:
        `(packed_qweight [in/16, 2 out] int32, packed_scales)`, packed_scales of the scales' shape
        and dtype, permuted (module docstring). `in` and `out` must be multiples of 64.
    """
    where = "marlin_pack"
    qweight = V.as_array("qweight", qweight, where=where)
    scales = V.as_array("scales", scales, where=where)
    _check_rank2("qweight", qweight, where, "[in/2, out]")
    if qweight.dtype != jnp.uint8:
        raise TypeError(f"{where}: qweight must be uint8 (two int4 codes per byte); got "
                        f"{qweight.dtype}")
    k, n = 2 * qweight.shape[0], qweight.shape[1]
    _check_features(k, n, where)
    group_size = _check_group_size(group_size, k, where)
    _check_scales(scales, k, n, group_size, where)
    words = _words_from_codes(_split_codes(qweight))
    return words, _permute_scales(scales, group_size is not None)


def marlin_unpack(packed_qweight, packed_scales, *, group_size):
    """The canonical `(qweight [in/2, out] uint8, scales)` of `marlin_pack`'s output: its exact
    inverse (bit for bit). Pure and jittable; `group_size` as given to `marlin_pack`."""
    where = "marlin_unpack"
    packed_qweight = V.as_array("packed_qweight", packed_qweight, where=where)
    packed_scales = V.as_array("packed_scales", packed_scales, where=where)
    _, _, group_size = _check_packed(where, packed_qweight, packed_scales, group_size)
    qweight = _join_codes(_codes_from_words(packed_qweight))
    return qweight, _permute_scales(packed_scales, group_size is not None)


def _check_packed(where, packed_qweight, packed_scales, group_size, packed_meta=None):
    """`(in, out, group_size)` of the arrays of `marlin_pack` (with `packed_meta`,
    `marlin_nm_pack`), given as arrays: shapes, dtypes and the group size."""
    if packed_meta is None:
        k, n = _check_packed_qweight(packed_qweight, where)
        group_size = _check_group_size(group_size, k, where)
    else:
        k, n = _check_packed_qweight(packed_qweight, where, 32, MARLIN_NM_TILE_K)
        _check_packed_meta(packed_meta, k, n, where)
        group_size = _check_group_size(group_size, k, where, MARLIN_NM_GROUP_MULTIPLE)
    _check_scales(packed_scales, k, n, group_size, where, name="packed_scales")
    return k, n, group_size


def _check_packed_qweight(packed_qweight, where, inputs_per_row=16, tile_k=MARLIN_TILE_K):
    """`[in/16, 2 out]` (2:4: `[in/32, 2 out]`) int32 with in and out multiples of the tiles;
    returns (in, out)."""
    what = f"[in/{inputs_per_row}, 2 out]"
    _check_rank2("packed_qweight", packed_qweight, where, what)
    if packed_qweight.dtype != jnp.int32:
        raise TypeError(f"{where}: packed_qweight must be int32 (the packer's words); got "
                        f"{packed_qweight.dtype}")
    k, n2 = inputs_per_row * packed_qweight.shape[0], packed_qweight.shape[1]
    if n2 % 2:
        raise ValueError(f"{where}: packed_qweight must be {what}: its last dim must be "
                         f"even; got shape {tuple(packed_qweight.shape)}")
    _check_features(k, n2 // 2, where, tile_k)
    return k, n2 // 2


# ====================================================================== the dense product
int4_marlin_matmul_p = Primitive("jaxsparse_int4_marlin_matmul")


def int4_marlin_matmul(x, packed_qweight, packed_scales, *, group_size):
    """`y = x @ W` for an int4 `W` in MARLIN's layout, on the MARLIN CUDA kernel.

    Args:
        x: `[..., in]` bfloat16/float16 activations (leading dims flattened into tokens).
        packed_qweight: `[in/16, 2 out]` int32 from `marlin_pack`.
        packed_scales: `[in/group_size, out]` (or `[1, out]`) in x's dtype, from `marlin_pack`.
        group_size: as given to `marlin_pack` (None: one scale per output column).

    Returns:
        `[..., out]` in x's dtype; f32 accumulation (grouped scales are multiplied into the
        dequantised weights in x's dtype before the MMA, as MARLIN does; per-column scales on the
        f32 sums).

    Runs on CUDA, and on the CPU only through the SIMT emulator (JAXSPARSE_EMULATE_CUDA=1);
    elsewhere lowering raises: `marlin_unpack` gives back the canonical arrays that
    `jaxsparse.ops.int4_matmul` runs on the CPU. Differentiable in x only (the weights are frozen):
    the cotangent dx is `marlin_unpack` then `jaxsparse.ops.int4_matmul_t` (the canonical
    layout's kernel), not a MARLIN kernel.
    """
    where = "int4_marlin_matmul"
    x = V.as_array("x", x, where=where)
    packed_qweight = V.as_array("packed_qweight", packed_qweight, where=where)
    packed_scales = V.as_array("packed_scales", packed_scales, where=where)
    V.check_rank("x", x, min_rank=1, where=where, what="[..., in]")
    if jnp.dtype(x.dtype) not in DTYPES:
        raise TypeError(f"{where}: x must be bfloat16 or float16 (the MARLIN kernel's tensor-core "
                        f"dtypes); got {jnp.dtype(x.dtype).name}")
    k, n = _check_packed_qweight(packed_qweight, where)
    if x.shape[-1] != k:
        raise ValueError(f"{where}: x's last dim must be in_features = {k} (16 x "
                         f"packed_qweight.shape[0]); got shape {tuple(x.shape)}")
    group_size = _check_group_size(group_size, k, where)
    _check_scales(packed_scales, k, n, group_size, where, name="packed_scales")
    if packed_scales.dtype != x.dtype:
        raise TypeError(f"{where}: packed_scales must have x's dtype {x.dtype}; got "
                        f"{packed_scales.dtype}")
    attr = PER_COLUMN if group_size is None else group_size
    y = int4_marlin_matmul_p.bind(x.reshape(-1, k), packed_qweight, packed_scales,
                                  group_size=attr)
    return y.reshape(*x.shape[:-1], n)


def _canonical(packed_qweight, packed_scales, group_size: int):
    """(qweight, scales, the canonical ops' group_size) of the packed arrays."""
    group = None if group_size == PER_COLUMN else group_size
    qweight, scales = marlin_unpack(packed_qweight, packed_scales, group_size=group)
    return qweight, scales, 2 * qweight.shape[0] if group is None else group


def int4_marlin_matmul_reference(x, packed_qweight, packed_scales, *, group_size):
    """The pure-jnp product of the primitive (`x [T, in]`, group_size -1 per column): unpack,
    then `jaxsparse.ops.int4_matmul_reference` (f32 dequantisation and accumulation)."""
    qweight, scales, group = _canonical(packed_qweight, packed_scales, group_size)
    y = int4_ops.int4_matmul_reference(x[None], qweight[None], scales[None], group_size=group)
    return y[0]


# ====================================================================== rules of both products
def _abstract_eval(x, *weight, group_size):
    sparse = len(weight) == 3
    where = "int4_nm_marlin_matmul" if sparse else "int4_marlin_matmul"
    packed_qweight, packed_scales = weight[0], weight[-1]
    _check_rank2("x", x, where, "[T, in]")
    if sparse:
        k, n = _check_packed_qweight(packed_qweight, where, 32, MARLIN_NM_TILE_K)
        _check_packed_meta(weight[1], k, n, where)
    else:
        k, n = _check_packed_qweight(packed_qweight, where)
    if x.shape[1] != k or jnp.dtype(x.dtype) not in DTYPES:
        raise ValueError(f"{where}: x must be [T, {k}] bfloat16/float16; got "
                         f"{tuple(x.shape)} {x.dtype}")
    multiple = MARLIN_NM_GROUP_MULTIPLE if sparse else MARLIN_GROUP_MULTIPLE
    group = None if group_size == PER_COLUMN else _check_group_size(group_size, k, where, multiple)
    _check_scales(packed_scales, k, n, group, where, name="packed_scales")
    if packed_scales.dtype != x.dtype:
        raise TypeError(f"{where}: packed_scales must have x's dtype {x.dtype}; got "
                        f"{packed_scales.dtype}")
    return x.update(shape=(x.shape[0], n), dtype=x.dtype)


def _refuse_weight_tangents(tangents):
    if any(type(t) is not ad.Zero for t in tangents):
        raise ValueError(
            "jaxsparse: int4 MARLIN weights (packed_qweight, packed_meta and packed_scales) are "
            "frozen and cannot be differentiated: train adapters beside them (QLoRA), or unpack "
            "them (marlin_unpack / marlin_nm_unpack) and dequantise to fine-tune the dense weight"
        )


def _prim(weight_operands: int):
    return int4_nm_marlin_matmul_p if weight_operands == 3 else int4_marlin_matmul_p


def _jvp(primals, tangents, *, group_size):
    _refuse_weight_tangents(tangents[1:])
    product = functools.partial(_prim(len(primals) - 1).bind, group_size=group_size)
    return P.jvp_linear(product, primals, tangents)


def _transpose(ct, x, *weight, group_size):
    """dx = ct @ W^T through the canonical layout's kernel (no MARLIN kernel for W^T)."""
    none = (None,) * len(weight)
    if type(ct) is ad.Zero or not ad.is_undefined_primal(x):
        return (None, *none)
    k = x.aval.shape[1]
    if len(weight) == 3:
        qweight, positions, scales, group = _canonical_nm(*weight, group_size)
        dx = int4_ops.int4_nm_matmul_t(ct[None], qweight[None], positions[None], scales[None],
                                       group_size=group, in_features=k)
    else:
        qweight, scales, group = _canonical(*weight, group_size)
        dx = int4_ops.int4_matmul_t(ct[None], qweight[None], scales[None], group_size=group,
                                    in_features=k)
    return (dx[0], *none)


def _batch(args, dims, *, group_size):
    """vmap over x folds the mapped axis into the tokens (one kernel call); over the weights,
    one kernel call per weight (`lax.map`)."""
    x, *weight = args
    dx, *dweight = dims
    bind = functools.partial(_prim(len(weight)).bind, group_size=group_size)
    if all(d is None for d in dweight):
        moved = jnp.moveaxis(x, dx, 0)
        y = bind(moved.reshape(-1, moved.shape[2]), *weight)
        return y.reshape(moved.shape[0], moved.shape[1], y.shape[1]), 0
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    mapped = [jnp.broadcast_to(a, (size,) + a.shape) if d is None else jnp.moveaxis(a, d, 0)
              for a, d in zip(args, dims)]
    return jax.lax.map(lambda ops: bind(*ops), tuple(mapped)), 0


# ====================================================================== the 2:4 form: layout
def _sorted_pairs(qweight, positions):
    """Canonical 2:4 arrays -> int32 `(v0, v1, p0, p1)`, each `[K/4, N]`, the pair in position
    order (mma.sp's ordered metadata wants p0 < p1; a descending pair is swapped, exactly)."""
    q = qweight.astype(jnp.int32)
    lo, hi = q & 15, q >> 4
    p0, p1 = int4_ops.unpack_positions(positions, qweight.shape[0])
    swap = p0 > p1
    return (jnp.where(swap, hi, lo), jnp.where(swap, lo, hi), jnp.where(swap, p1, p0),
            jnp.where(swap, p0, p1))


def _nm_words(v0, v1):
    """Kept codes `[K/4, N]` x 2 -> `[K/32, 2N]` int32 words: per k32 step and 64 outputs, word
    4 (4g + t) + j holds tile j's (outputs 16j .. 16j + 15) mma.sp A registers of lane 4g + t:
    packed column 8e + 2t + h (kept value h of group 4e + t) of output row g + 8s at nibble
    s + 2e + 4h."""
    kept = jnp.stack([v0, v1], axis=1).reshape(2 * v0.shape[0], v0.shape[1])  # [K/2, N]
    kc, n = kept.shape
    c = kept.reshape(kc // 16, 2, 4, 2, n // 64, 4, 2, 8)  # [kb, e, t, h, nb, j, s, g]
    c = c.transpose(0, 4, 7, 2, 5, 3, 1, 6)  # [kb, nb, g, t, j, h, e, s]
    nibbles = c.reshape(kc // 16, n // 64, 32, 4, 8).astype(jnp.uint32)
    words = jnp.sum(nibbles << (4 * jnp.arange(8, dtype=jnp.uint32)), axis=-1, dtype=jnp.uint32)
    return jax.lax.bitcast_convert_type(words.reshape(kc // 16, 2 * n), jnp.int32)


def _nm_kept_from_words(words):
    """The inverse of `_nm_words`: `(v0, v1)`, each `[K/4, N]`."""
    kb, n2 = words.shape
    n = n2 // 2
    w = jax.lax.bitcast_convert_type(words, jnp.uint32).reshape(kb, n // 64, 8, 4, 4)
    nibbles = ((w[..., None] >> (4 * jnp.arange(8, dtype=jnp.uint32))) & 15).astype(jnp.int32)
    c = nibbles.reshape(kb, n // 64, 8, 4, 4, 2, 2, 2)  # [kb, nb, g, t, j, h, e, s]
    c = c.transpose(0, 6, 3, 5, 1, 4, 7, 2)  # [kb, e, t, h, nb, j, s, g]
    kept = c.reshape(16 * kb, n).reshape(8 * kb, 2, n)
    return kept[:, 0], kept[:, 1]


def _nm_meta(p0, p1):
    """Positions `[K/4, N]` -> `[K/32, N]` int32 metadata registers: per k32 step and 64 outputs,
    word 2 (4g + 2 jl + half) + r is lane 4g + 2 jl + half's register r, used by tile 2r + jl
    with sparsity selector jl: bits 16s + 4c hold group 4 half + c's code p0 | p1 << 2 of output
    row g + 8s of the tile (row g in the low half, g + 8 in the high, as mma.sp reads them)."""
    code = (p0 | (p1 << 2)).astype(jnp.uint32)
    g4, n = code.shape
    c = code.reshape(g4 // 8, 2, 4, n // 64, 2, 2, 2, 8)  # [kb, half, c, nb, r, jl, s, g]
    c = c.transpose(0, 3, 7, 5, 1, 4, 6, 2)  # [kb, nb, g, jl, half, r, s, c]
    shifts = (16 * jnp.arange(2, dtype=jnp.uint32)[:, None]
              + 4 * jnp.arange(4, dtype=jnp.uint32)[None, :])
    words = jnp.sum(c << shifts, axis=(-2, -1), dtype=jnp.uint32)
    return jax.lax.bitcast_convert_type(words.reshape(g4 // 8, n), jnp.int32)


def _nm_positions_from_meta(meta):
    """The inverse of `_nm_meta`: `(p0, p1)`, each `[K/4, N]`."""
    kb, n = meta.shape
    w = jax.lax.bitcast_convert_type(meta, jnp.uint32).reshape(kb, n // 64, 8, 2, 2, 2)
    shifts = (16 * jnp.arange(2, dtype=jnp.uint32)[:, None]
              + 4 * jnp.arange(4, dtype=jnp.uint32)[None, :])
    c = ((w[..., None, None] >> shifts) & 15).astype(jnp.int32)  # [kb,nb,g,jl,half,r,s,c]
    c = c.transpose(0, 4, 7, 1, 5, 3, 6, 2)  # [kb, half, c, nb, r, jl, s, g]
    code = c.reshape(8 * kb, n)
    return code & 3, code >> 2


def _check_packed_meta(packed_meta, k, n, where):
    _check_rank2("packed_meta", packed_meta, where, "[in/32, out]")
    if packed_meta.dtype != jnp.int32:
        raise TypeError(f"{where}: packed_meta must be int32 (marlin_nm_pack's registers); got "
                        f"{packed_meta.dtype}")
    if tuple(packed_meta.shape) != (k // 32, n):
        raise ValueError(f"{where}: packed_meta must be [in/32, out] = {[k // 32, n]}; got "
                         f"{list(packed_meta.shape)}")


def _check_distinct_positions(positions, where):
    """Equal positions (allowed by the canonical ops, which add the two values) have no mma.sp
    encoding; checked where the values are known."""
    if not V.is_concrete(positions):
        return
    p = np.asarray(positions).astype(np.int32)
    codes = np.stack([p & 15, p >> 4])
    if ((codes & 3) == (codes >> 2)).any():
        raise ValueError(f"{where}: positions must name two distinct positions per group of 4 "
                         "inputs (mma.sp stores exactly two); a group names one position twice")


def marlin_nm_pack(qweight, positions, scales, *, group_size):
    """The device layout of the int4 + 2:4 form for `int4_nm_marlin_matmul` (pure, jittable).

    Sparse-MARLIN's scheme (KERNELS.md 3.5: weights as the sparse A operand of mma.sp.m16n8k32,
    one 16-byte load per lane per k32 step brings four A fragments, dequantised with the same lop3
    magic numbers) in a layout of our own, in register order (KERNELS.md 1.5c), not Sparse-MARLIN's
    CUTLASS-reordered metadata.

    Args:
        qweight: `[in/4, out]` uint8, the canonical kept codes (low nibble: the value at p0).
        positions: `[in/8, out]` uint8, the canonical positions (two groups per byte). Each group's
            two positions must differ (checked when concrete); a descending pair is swapped.
        scales: `[in/group_size, out]` (or `[1, out]`) bfloat16/float16.
        group_size: a multiple of 32 dividing `in`, or None for one scale per output column.

    Returns:
        `(packed_qweight [in/32, 2 out] int32, packed_meta [in/32, out] int32, packed_scales)`:
        words as `_nm_words`, metadata registers as `_nm_meta`, scales permuted as `marlin_pack`'s
        grouped scales (per 64 outputs, position 8i + j holds output i + 8j) for both group kinds.
        `in` must be a multiple of 128 and `out` of 64.
    """
    where = "marlin_nm_pack"
    qweight = V.as_array("qweight", qweight, where=where)
    positions = V.as_array("positions", positions, where=where)
    scales = V.as_array("scales", scales, where=where)
    _check_rank2("qweight", qweight, where, "[in/4, out]")
    _check_rank2("positions", positions, where, "[in/8, out]")
    if qweight.dtype != jnp.uint8 or positions.dtype != jnp.uint8:
        raise TypeError(f"{where}: qweight and positions must be uint8; got {qweight.dtype} and "
                        f"{positions.dtype}")
    k, n = 4 * qweight.shape[0], qweight.shape[1]
    _check_features(k, n, where, MARLIN_NM_TILE_K)
    if tuple(positions.shape) != (k // 8, n):
        raise ValueError(f"{where}: positions must be [in/8, out] = {[k // 8, n]}; got "
                         f"{list(positions.shape)}")
    group_size = _check_group_size(group_size, k, where, MARLIN_NM_GROUP_MULTIPLE)
    _check_scales(scales, k, n, group_size, where)
    _check_distinct_positions(positions, where)
    v0, v1, p0, p1 = _sorted_pairs(qweight, positions)
    return _nm_words(v0, v1), _nm_meta(p0, p1), _permute_scales(scales, grouped=True)


def marlin_nm_unpack(packed_qweight, packed_meta, packed_scales, *, group_size):
    """The canonical `(qweight [in/4, out] uint8, positions [in/8, out] uint8, scales)` of
    `marlin_nm_pack`'s output (pairs in increasing position order). Pure and jittable."""
    where = "marlin_nm_unpack"
    packed_qweight = V.as_array("packed_qweight", packed_qweight, where=where)
    packed_meta = V.as_array("packed_meta", packed_meta, where=where)
    packed_scales = V.as_array("packed_scales", packed_scales, where=where)
    _, n, group_size = _check_packed(where, packed_qweight, packed_scales, group_size, packed_meta)
    v0, v1 = _nm_kept_from_words(packed_qweight)
    p0, p1 = _nm_positions_from_meta(packed_meta)
    qweight = (v0 | (v1 << 4)).astype(jnp.uint8)
    code = p0 | (p1 << 2)
    pairs = code.reshape(code.shape[0] // 2, 2, n)
    positions = (pairs[:, 0] | (pairs[:, 1] << 4)).astype(jnp.uint8)
    return qweight, positions, _permute_scales(packed_scales, grouped=True)


def check_marlin_arrays(where: str, packed_qweight, packed_scales, group_size, packed_meta=None):
    """`(in, out)` of arrays from `marlin_pack` (or, with `packed_meta`, `marlin_nm_pack`): shapes,
    dtypes, the group size and (2:4, when concrete) two distinct positions per group; else an
    exception naming the array. For validating constructors."""
    packed_qweight = V.as_array("packed_qweight", packed_qweight, where=where)
    packed_scales = V.as_array("packed_scales", packed_scales, where=where)
    if packed_meta is not None:
        packed_meta = V.as_array("packed_meta", packed_meta, where=where)
    k, n, _ = _check_packed(where, packed_qweight, packed_scales, group_size, packed_meta)
    if packed_meta is not None and V.is_concrete(packed_meta):
        p0, p1 = _nm_positions_from_meta(packed_meta)
        if bool((p0 == p1).any()):
            raise ValueError(f"{where}: packed_meta must name two distinct positions per group "
                             "of 4 inputs (mma.sp stores exactly two); a group names one "
                             "position twice")
    return k, n


# ====================================================================== the 2:4 product
int4_nm_marlin_matmul_p = Primitive("jaxsparse_int4_nm_marlin_matmul")


def int4_nm_marlin_matmul(x, packed_qweight, packed_meta, packed_scales, *, group_size):
    """`y = x @ W` for an int4 + 2:4 `W` in `marlin_nm_pack`'s layout, on the sparse tensor cores
    (mma.sp.m16n8k32, f32 accumulation).

    Args:
        x: `[..., in]` bfloat16/float16 (leading dims flattened into tokens).
        packed_qweight, packed_meta, packed_scales: from `marlin_nm_pack`.
        group_size: as given to `marlin_nm_pack` (None: one scale per output column).

    Returns:
        `[..., out]` in x's dtype. Platforms, gradients (dx through `marlin_nm_unpack` and
        `jaxsparse.ops.int4_nm_matmul_t`) and frozen weights as `int4_marlin_matmul`.
    """
    where = "int4_nm_marlin_matmul"
    x = V.as_array("x", x, where=where)
    packed_qweight = V.as_array("packed_qweight", packed_qweight, where=where)
    packed_meta = V.as_array("packed_meta", packed_meta, where=where)
    packed_scales = V.as_array("packed_scales", packed_scales, where=where)
    V.check_rank("x", x, min_rank=1, where=where, what="[..., in]")
    if jnp.dtype(x.dtype) not in DTYPES:
        raise TypeError(f"{where}: x must be bfloat16 or float16 (the MARLIN kernel's tensor-core "
                        f"dtypes); got {jnp.dtype(x.dtype).name}")
    k, n = _check_packed_qweight(packed_qweight, where, 32, MARLIN_NM_TILE_K)
    _check_packed_meta(packed_meta, k, n, where)
    if x.shape[-1] != k:
        raise ValueError(f"{where}: x's last dim must be in_features = {k} (32 x "
                         f"packed_qweight.shape[0]); got shape {tuple(x.shape)}")
    group_size = _check_group_size(group_size, k, where, MARLIN_NM_GROUP_MULTIPLE)
    _check_scales(packed_scales, k, n, group_size, where, name="packed_scales")
    if packed_scales.dtype != x.dtype:
        raise TypeError(f"{where}: packed_scales must have x's dtype {x.dtype}; got "
                        f"{packed_scales.dtype}")
    attr = PER_COLUMN if group_size is None else group_size
    y = int4_nm_marlin_matmul_p.bind(x.reshape(-1, k), packed_qweight, packed_meta,
                                     packed_scales, group_size=attr)
    return y.reshape(*x.shape[:-1], n)


def _canonical_nm(packed_qweight, packed_meta, packed_scales, group_size: int):
    group = None if group_size == PER_COLUMN else group_size
    qweight, positions, scales = marlin_nm_unpack(packed_qweight, packed_meta, packed_scales,
                                                  group_size=group)
    return qweight, positions, scales, 4 * qweight.shape[0] if group is None else group


def int4_nm_marlin_matmul_reference(x, packed_qweight, packed_meta, packed_scales, *,
                                    group_size):
    """The pure-jnp product of the 2:4 primitive: unpack, then
    `jaxsparse.ops.int4_nm_matmul_reference`."""
    qweight, positions, scales, group = _canonical_nm(packed_qweight, packed_meta,
                                                      packed_scales, group_size)
    return int4_ops.int4_nm_matmul_reference(x[None], qweight[None], positions[None],
                                             scales[None], group_size=group)[0]


# ====================================================================== registration
_CPU_ERROR = (
    "jaxsparse: this int4 MARLIN product's weight (int4_marlin_matmul, int4_nm_marlin_matmul) "
    "was packed for CUDA (the MARLIN layout of "
    "marlin_pack / marlin_nm_pack) and cannot run on the CPU. For the CPU, use the canonical "
    "layout: `qweight, scales = marlin_unpack(packed_qweight, packed_scales, group_size=...)` "
    "and jaxsparse.ops.int4_matmul (2:4: marlin_nm_unpack and int4_nm_matmul), or keep the "
    "jaxsparse.Int4 format's weight unpacked; "
    "JAXSPARSE_EMULATE_CUDA=1 runs the CUDA kernel on the CPU through the emulator (slow, for "
    "tests)."
)


def _register():
    for prim, reference, target in (
        (int4_marlin_matmul_p, int4_marlin_matmul_reference, _TARGET),
        (int4_nm_marlin_matmul_p, int4_nm_marlin_matmul_reference, _NM_TARGET),
    ):
        P.register_cuda_layout(
            prim, abstract_eval=_abstract_eval, jvp=_jvp, transpose=_transpose, batch=_batch,
            reference=reference, target=target, attrs=("group_size",), cpu_error=_CPU_ERROR)


_register()
