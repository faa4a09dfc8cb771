"""1xN block sparsity products as JAX primitives.

Three primitives, closed under differentiation (CONVENTIONS.md 3), as for N:M and V:N:M:

- `blocks_spmm`   y  = x @ W              (the forward product)
- `blocks_spmm_t` dx = dy @ W^T           (the cotangent of x)
- `blocks_sddmm`  dv = (x^T dy)[kept]     (the cotangent of the values: a sampled product)

All work on the canonical BSR layout (see `jaxsparse.formats.blocks`) with one leading kernel
batch dim; `R = ceil(N_out / n)` block rows of `n` consecutive outputs:

    x       [Bx, T, K]       f32/bf16/f16
    dy      [By, T, N_out]   same dtype
    values  [Bw, nnz, n]     same dtype: block b's weights for its n outputs
    indices [Bw, nnz]        int32: block b's input, strictly increasing inside a block row
    indptr  [Bw, R + 1]      int32: block row r holds blocks indptr[r] .. indptr[r+1]-1

Each leading dim is 1 (broadcast) or the common batch B; values, indices and indptr share one.
Accumulation is f32. Outputs `>= N_out` of the last block row are padding: they are not
computed, and the sampled product gives them 0. Unvalidated structure (under jit) never reads
out of bounds: `indptr` is clamped into `[0, nnz]` and made non-decreasing (`block_rows`), and
blocks whose input is outside `[0, K)` or that lie in no row contribute nothing (and get 0 from
the sampled product).

Each section follows the order of jax's `sparse/csr.py`: primitive, public wrapper, pure-jnp
reference (the test oracle, and the fallback where no kernel exists), abstract eval, JVP,
transpose, batching; registration last.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxsparse import _ffi
from jaxsparse.ops import _primitive as P
from jaxsparse.ops.patches import im2col

__all__ = ["blocks_spmm", "blocks_spmm_t", "blocks_sddmm", "blocks_conv", "blocks_conv_sddmm",
           "blocks_conv_sddmm_reference", "blocks_spmm_reference",
           "blocks_spmm_t_reference", "blocks_sddmm_reference", "blocks_conv_reference",
           "block_rows"]


# ====================================================================== shared helpers
def _spans(indptr, nnz):
    """Where each block row starts, as the kernels read untrusted `indptr`: clamped into
    `[0, nnz]`, then a running maximum."""
    return jax.lax.cummax(jnp.clip(indptr.astype(jnp.int32), 0, nnz), axis=indptr.ndim - 1)


def block_rows(indptr, nnz: int):
    """The block row of every stored block: `[..., nnz]` int32 from `indptr [..., R + 1]`.

    Untrusted `indptr` is read as the kernels read it: clamped into `[0, nnz]` and made
    non-decreasing by a running maximum, so rows never overlap; a block outside every row then
    gets row -1 or R.
    """
    slots = jnp.arange(nnz, dtype=jnp.int32)
    spans = _spans(indptr, nnz)
    search = functools.partial(jnp.searchsorted, side="right")
    for _ in range(indptr.ndim - 1):
        search = jax.vmap(search, in_axes=(0, None))
    return (search(spans, slots) - 1).astype(jnp.int32)


def _densify_t(values, indices, indptr, out_features, k):
    """`W^T` as a dense `[B, N_out, K]` array (reference only; exact for valid structure, whose
    rows hold distinct inputs; blocks repeating an input in a row add up, as in the kernels)."""
    values, indices, indptr = _same_batch(values, indices, indptr)
    b, nnz, n = values.shape
    rows_count = indptr.shape[-1] - 1
    rows = block_rows(indptr, nnz)
    valid = (rows >= 0) & (rows < rows_count) & (indices >= 0) & (indices < k)
    row = jnp.where(valid, rows, rows_count)  # Invalid blocks go to a dropped row.
    col = jnp.where(valid, indices, 0)
    batch = jnp.broadcast_to(jnp.arange(b)[:, None], (b, nnz))
    dense = jnp.zeros((b, rows_count + 1, k, n), values.dtype)
    dense = dense.at[batch, row, col].add(values, mode="drop")[:, :rows_count]
    dense = jnp.swapaxes(dense, -1, -2).reshape(b, rows_count * n, k)
    return dense[:, :out_features]


def _same_batch(values, indices, indptr):
    """Broadcast a weight's three arrays to one kernel batch (the kernels' ABI)."""
    batch = max(values.shape[0], indices.shape[0], indptr.shape[0])
    return (jnp.broadcast_to(values, (batch,) + values.shape[1:]),
            jnp.broadcast_to(indices, (batch,) + indices.shape[1:]),
            jnp.broadcast_to(indptr, (batch,) + indptr.shape[1:]))


def _weight_same_batch(values, indices, indptr):
    if values.ndim != 3 or indices.ndim != 2 or indptr.ndim != 2:
        return values, indices, indptr  # The abstract eval reports wrong ranks.
    if len({values.shape[0], indices.shape[0], indptr.shape[0]}) <= 1:
        return values, indices, indptr
    return _same_batch(values, indices, indptr)


def _structure_same_batch(indices, indptr):
    if indices.ndim != 2 or indptr.ndim != 2 or indices.shape[0] == indptr.shape[0]:
        return indices, indptr
    batch = max(indices.shape[0], indptr.shape[0])
    return (jnp.broadcast_to(indices, (batch,) + indices.shape[1:]),
            jnp.broadcast_to(indptr, (batch,) + indptr.shape[1:]))


#: The block widths the kernels take (cpu/blocks/blocks_checks.h).
_BLOCK_SIZES = (4, 8, 16, 32)


def _check_structure(where, indices, indptr, out_features, n):
    if isinstance(n, bool) or n not in _BLOCK_SIZES:
        raise ValueError(f"{where}: the block size n (values.shape[-1], or n=) must be one of "
                         f"{_BLOCK_SIZES}; got {n!r}")
    if indices.ndim != 2 or indptr.ndim != 2:
        raise ValueError(
            f"{where}: indices must be [B, nnz] and indptr [B, R + 1]; got "
            f"{tuple(indices.shape)} and {tuple(indptr.shape)}"
        )
    rows = -(-out_features // n)
    if indptr.shape[-1] != rows + 1:
        raise ValueError(
            f"{where}: indptr must be [B, ceil(N_out/n) + 1] = [B, ceil({out_features}/{n}) + 1]"
            f" = [B, {rows + 1}]; got {tuple(indptr.shape)}"
        )
    if indices.dtype != jnp.int32 or indptr.dtype != jnp.int32:
        raise TypeError(
            f"{where}: indices and indptr must be int32, got {indices.dtype} and {indptr.dtype}"
        )


def _check_operands(where, dense, values, indices, indptr, out_features, dense_name="x"):
    P.check_float(where, **{dense_name: dense})
    if dense.ndim != 3 or values.ndim != 3:
        raise ValueError(
            f"{where}: the dense operand must be [B, T, cols] and values [B, nnz, n]; got "
            f"{tuple(dense.shape)} and {tuple(values.shape)}"
        )
    _check_structure(where, indices, indptr, out_features, values.shape[-1])
    if values.shape[1] != indices.shape[-1]:
        raise ValueError(
            f"{where}: values [B, nnz, n] and indices [B, nnz] must agree on nnz; got "
            f"{tuple(values.shape)} and {tuple(indices.shape)}"
        )
    if values.dtype != dense.dtype:
        raise TypeError(f"{where}: dtypes must match, got {dense.dtype} and {values.dtype}")


# ====================================================================== blocks_spmm
blocks_spmm_p = Primitive("jaxsparse_blocks_spmm")


def blocks_spmm(x, values, indices, indptr, *, out_features: int):
    """`y = x @ W` for a 1xN block sparse `W`.

    Args:
        x: `[Bx, T, K]` float32/bfloat16/float16.
        values: `[Bw, nnz, n]` same dtype.
        indices: `[Bw, nnz]` int32, each block's input.
        indptr: `[Bw, ceil(out_features/n) + 1]` int32.
        out_features: `N_out`, the width of the result.

    Returns:
        `[B, T, N_out]` in x's dtype, `B = max(Bx, Bw)`; f32 accumulation.
    """
    values, indices, indptr = _weight_same_batch(values, indices, indptr)
    return blocks_spmm_p.bind(x, values, indices, indptr, out_features=out_features)


def blocks_spmm_reference(x, values, indices, indptr, *, out_features):
    w_t = _densify_t(values, indices, indptr, out_features, x.shape[-1])
    x, w_t = P.broadcast_batch(x, w_t)
    return P.f32_einsum("btk,bnk->btn", x, w_t, x.dtype)


def _spmm_abstract_eval(x, values, indices, indptr, *, out_features):
    _check_operands("blocks_spmm", x, values, indices, indptr, out_features)
    batch = P.check_batches("blocks_spmm", ("x", x), ("values", values), ("indices", indices),
                            ("indptr", indptr))
    return x.update(shape=(batch, x.shape[1], out_features), dtype=x.dtype)


def _spmm_jvp(primals, tangents, *, out_features):
    fn = functools.partial(blocks_spmm, out_features=out_features)
    return P.jvp_bilinear(fn, primals, tangents, fn(*primals))


def _spmm_transpose(ct, x, values, indices, indptr, *, out_features):
    if type(ct) is ad.Zero:
        return None, None, None, None
    ct_x = ct_values = None
    if ad.is_undefined_primal(x):
        dx = blocks_spmm_t(ct, values, indices, indptr, in_features=x.aval.shape[-1])
        ct_x = P.sum_to_batch(dx, x.aval.shape[0])
    if ad.is_undefined_primal(values):
        dv = blocks_sddmm(x, ct, indices, indptr, n=values.aval.shape[-1])
        ct_values = P.sum_to_batch(dv, values.aval.shape[0])
    return ct_x, ct_values, None, None


def _spmm_batch(args, dims, *, out_features):
    fn = functools.partial(blocks_spmm, out_features=out_features)
    return P.batch_weight_product(fn, args, dims)


# ====================================================================== blocks_spmm_t
blocks_spmm_t_p = Primitive("jaxsparse_blocks_spmm_t")


def blocks_spmm_t(dy, values, indices, indptr, *, in_features: int):
    """`dx = dy @ W^T` for a 1xN block sparse `W` (the cotangent of x in `x @ W`).

    Args:
        dy: `[By, T, N_out]` float32/bfloat16/float16.
        values, indices, indptr: as in `blocks_spmm` (`N_out` is dy's last dim).
        in_features: K, the width of the result.

    Returns:
        `[B, T, K]` in dy's dtype; f32 accumulation.
    """
    values, indices, indptr = _weight_same_batch(values, indices, indptr)
    return blocks_spmm_t_p.bind(dy, values, indices, indptr, in_features=in_features)


def blocks_spmm_t_reference(dy, values, indices, indptr, *, in_features):
    w_t = _densify_t(values, indices, indptr, dy.shape[-1], in_features)
    dy, w_t = P.broadcast_batch(dy, w_t)
    return P.f32_einsum("btn,bnk->btk", dy, w_t, dy.dtype)


def _spmm_t_abstract_eval(dy, values, indices, indptr, *, in_features):
    _check_operands("blocks_spmm_t", dy, values, indices, indptr, dy.shape[-1], "dy")
    batch = P.check_batches("blocks_spmm_t", ("dy", dy), ("values", values),
                            ("indices", indices), ("indptr", indptr))
    return dy.update(shape=(batch, dy.shape[1], in_features), dtype=dy.dtype)


def _spmm_t_jvp(primals, tangents, *, in_features):
    fn = functools.partial(blocks_spmm_t, in_features=in_features)
    return P.jvp_bilinear(fn, primals, tangents, fn(*primals))


def _spmm_t_transpose(ct, dy, values, indices, indptr, *, in_features):
    if type(ct) is ad.Zero:
        return None, None, None, None
    ct_dy = ct_values = None
    if ad.is_undefined_primal(dy):
        y = blocks_spmm(ct, values, indices, indptr, out_features=dy.aval.shape[-1])
        ct_dy = P.sum_to_batch(y, dy.aval.shape[0])
    if ad.is_undefined_primal(values):
        dv = blocks_sddmm(ct, dy, indices, indptr, n=values.aval.shape[-1])
        ct_values = P.sum_to_batch(dv, values.aval.shape[0])
    return ct_dy, ct_values, None, None


def _spmm_t_batch(args, dims, *, in_features):
    fn = functools.partial(blocks_spmm_t, in_features=in_features)
    return P.batch_weight_product(fn, args, dims)


# ====================================================================== blocks_sddmm
blocks_sddmm_p = Primitive("jaxsparse_blocks_sddmm")


def blocks_sddmm(x, dy, indices, indptr, *, n: int):
    """`dv[b, p, j] = sum_t x[b, t, indices[p]] * dy[b, t, row(p) * n + j]`: `x^T dy` sampled
    at the kept blocks; the cotangent of the values in `x @ W`.

    Args:
        x: `[Bx, T, K]` float32/bfloat16/float16.
        dy: `[By, T, N_out]` same dtype.
        indices: `[Bw, nnz]` int32; indptr: `[Bw, ceil(N_out/n) + 1]` int32.
        n: the block size.

    Returns:
        `[B, nnz, n]` in x's dtype, `B = max(Bx, By, Bw)`; zero for padding outputs and for
        blocks that are out of range.
    """
    indices, indptr = _structure_same_batch(indices, indptr)
    return blocks_sddmm_p.bind(x, dy, indices, indptr, n=n)


def blocks_sddmm_reference(x, dy, indices, indptr, *, n):
    x, dy, indices, indptr = P.broadcast_batch(x, dy, indices[..., None], indptr[..., None])
    indices, indptr = indices[..., 0], indptr[..., 0]
    b, _, k = x.shape
    out_features, nnz = dy.shape[-1], indices.shape[-1]
    rows_count = indptr.shape[-1] - 1
    pad = rows_count * n - out_features
    dy_pad = jnp.pad(dy, [(0, 0), (0, 0), (0, pad)]).reshape(b, dy.shape[1], rows_count, n)
    rows = block_rows(indptr, nnz)
    valid = (rows >= 0) & (rows < rows_count) & (indices >= 0) & (indices < k)
    x_cols = jnp.take_along_axis(x, jnp.where(valid, indices, 0)[:, None, :], axis=-1)
    dy_rows = jnp.take_along_axis(
        dy_pad, jnp.where(valid, rows, 0)[:, None, :, None], axis=2)  # [B, T, nnz, n]
    dv = jnp.einsum("btp,btpj->bpj", x_cols, dy_rows, preferred_element_type=jnp.float32)
    return jnp.where(valid[..., None], dv, 0.0).astype(x.dtype)


def _sddmm_abstract_eval(x, dy, indices, indptr, *, n):
    if x.ndim != 3 or dy.ndim != 3:
        raise ValueError(f"blocks_sddmm: x and dy must be rank 3 ([B, T, cols]); got "
                         f"{tuple(x.shape)} and {tuple(dy.shape)}")
    _check_structure("blocks_sddmm", indices, indptr, dy.shape[-1], n)
    P.check_float("blocks_sddmm", x=x)
    if dy.dtype != x.dtype:
        raise TypeError(f"blocks_sddmm: dtypes must match, got {x.dtype} and {dy.dtype}")
    if dy.shape[1] != x.shape[1]:
        raise ValueError(f"blocks_sddmm: x and dy must have the same tokens; got "
                         f"{tuple(x.shape)} and {tuple(dy.shape)}")
    batch = P.check_batches("blocks_sddmm", ("x", x), ("dy", dy), ("indices", indices),
                            ("indptr", indptr))
    return x.update(shape=(batch, indices.shape[-1], n), dtype=x.dtype)


def _sddmm_jvp(primals, tangents, *, n):
    fn = functools.partial(blocks_sddmm, n=n)
    return P.jvp_bilinear(fn, primals, tangents, fn(*primals))


def _sddmm_transpose(ct, x, dy, indices, indptr, *, n):
    if type(ct) is ad.Zero:
        return None, None, None, None
    ct_x = ct_dy = None
    if ad.is_undefined_primal(x):
        dx = blocks_spmm_t(dy, ct, indices, indptr, in_features=x.aval.shape[-1])
        ct_x = P.sum_to_batch(dx, x.aval.shape[0])
    if ad.is_undefined_primal(dy):
        y = blocks_spmm(x, ct, indices, indptr, out_features=dy.aval.shape[-1])
        ct_dy = P.sum_to_batch(y, dy.aval.shape[0])
    return ct_x, ct_dy, None, None


def _sddmm_batch(args, dims, *, n):
    # Per-example outputs: the mapped axis always joins the kernel batch (never the tokens).
    return P.batch_into_kernel_batch(functools.partial(blocks_sddmm, n=n), args, dims)


# ====================================================================== blocks_conv
blocks_conv_p = Primitive("jaxsparse_blocks_conv")


def blocks_conv(x, values, indices, indptr, *, out_features: int, kernel_size, strides=(1, 1),
                dilation=(1, 1), padding=((0, 0), (0, 0))):
    """A channels-last 2-D convolution by a 1xN block-sparse kernel, read through its kernel
    positions: the im2col patches are never stored (the CPU kernel gathers them into its packed
    x tile by tile).

    Args:
        x: `[N, H, W, C]` f32/bf16/f16.
        values, indices, indptr: one weight's BSR arrays (`[1, nnz, n]`, `[1, nnz]`,
            `[1, R + 1]`) of the kernel as `W [kh * kw * C, out_features]`, features in the
            kernel's row-major `(i, j, c)` order.
        out_features: the output channels.
        kernel_size, strides, dilation: `(h, w)` pairs of the kernel (dilation of the kernel,
            not of the input).
        padding: `((top, bottom), (left, right))` zeros around x.

    Returns:
        `[N, OH, OW, out_features]` in x's dtype: `conv_patches(x) @ W`.
    """
    return blocks_conv_p.bind(x, values, indices, indptr, out_features=int(out_features),
                              kernel_size=_pair(kernel_size), strides=_pair(strides),
                              dilation=_pair(dilation),
                              padding=tuple(tuple(int(v) for v in p) for p in padding))


def _pair(v):
    return tuple(int(a) for a in v)


def _conv_out(size, kernel, stride, dilation, pads):
    extent = (kernel - 1) * dilation + 1
    padded = size + pads[0] + pads[1]
    return (padded - extent) // stride + 1 if padded >= extent else 0


def _conv_out_dims(x_shape, kernel_size, strides, dilation, padding) -> list[int]:
    """The output pixels `[OH, OW]` of a convolution of `x [N, H, W, C]`."""
    return [_conv_out(size, k, s, d, p) for size, k, s, d, p in
            zip(x_shape[1:3], kernel_size, strides, dilation, padding)]


def _conv_by_patches(x, values, indices, indptr, *, out_features, kernel_size, strides,
                     dilation, padding, product):
    patches = im2col(x, kernel_size, strides, dilation, padding)
    n, oh, ow, k = patches.shape
    y = product(patches.reshape(1, n * oh * ow, k), values, indices, indptr,
                out_features=out_features)
    return y.reshape(n, oh, ow, out_features)


def blocks_conv_reference(x, values, indices, indptr, **params):
    """Pure jnp: the patches times the densified kernel (the test oracle)."""
    return _conv_by_patches(x, values, indices, indptr, product=blocks_spmm_reference, **params)


def _conv_through_spmm(x, values, indices, indptr, **params):
    """The patches stored, then `blocks_spmm` (CUDA, the emulator, and batched weights)."""
    return _conv_by_patches(x, values, indices, indptr, product=blocks_spmm, **params)


def _conv_abstract_eval(x, values, indices, indptr, *, out_features, kernel_size, strides,
                        dilation, padding):
    if x.ndim != 4:
        raise ValueError(f"blocks_conv: x must have rank 4 ([N, H, W, C]); got {tuple(x.shape)}")
    P.check_float("blocks_conv", x=x)
    if values.ndim != 3 or values.dtype != x.dtype:
        raise TypeError(f"blocks_conv: values must be [1, nnz, n] of x's dtype {x.dtype}; got "
                        f"{values.dtype}{list(values.shape)}")
    _check_structure("blocks_conv", indices, indptr, out_features, values.shape[-1])
    out = _conv_out_dims(x.shape, kernel_size, strides, dilation, padding)
    return x.update(shape=(x.shape[0], *out, out_features), dtype=x.dtype)


def _conv_jvp(primals, tangents, **params):
    fn = functools.partial(blocks_conv, **params)
    return P.jvp_bilinear(fn, primals, tangents, fn(*primals))


#: Patches the input's cotangent stores per step of its loop over images on a CPU (bytes): read
#: back by the product while still in the cache (nn/conv.py's PATCH_CHUNK_BYTES, for the same
#: reason).
BACKWARD_PATCH_BYTES = 4 * 2**20
#: The values' cotangent stores no patches (blocks_conv_sddmm gathers them), but its CPU kernel
#: packs them transposed in its scratch: this bounds that scratch per step (bytes). Each step of
#: the loop costs about a millisecond, so the steps are few (one for a 56x56x64 3x3 layer of 8
#: images in bf16, two in f32).
BACKWARD_SDDMM_BYTES = 32 * 2**20


def _conv_transpose(ct, x, values, indices, indptr, *, out_features, kernel_size, strides,
                    dilation, padding):
    """x's cotangent: the patches' (spmm_t) folded back onto x by the patches' transpose; the
    values': blocks_conv_sddmm, which gathers the patches itself on a CPU. On a CPU both go a few
    images at a time (the values' cotangent summed over the steps in f32)."""
    if type(ct) is ad.Zero:
        return None, None, None, None
    geometry = (kernel_size, strides, dilation, padding)
    want_x, want_values = ad.is_undefined_primal(x), ad.is_undefined_primal(values)
    x_aval = x.aval if want_x else x
    k = kernel_size[0] * kernel_size[1] * x_aval.shape[-1]

    def step(x_img, ct_img):
        ct_rows = ct_img.reshape(1, -1, out_features)
        d_x = d_values = None
        if want_x:
            d_patches = blocks_spmm_t(ct_rows, values, indices, indptr, in_features=k)
            # The fold (the kernel positions' overlapping patches added back onto the image)
            # in f32: XLA's CPU adds bf16 element by element with conversions (3-4x the time
            # of f32 here), and each input then rounds once.
            images_here = (ct_img.shape[0], *x_aval.shape[1:])
            fold = jax.linear_transpose(lambda v: im2col(v, *geometry),
                                        jax.ShapeDtypeStruct(images_here, jnp.float32))
            (d_x,) = fold(d_patches.reshape(*ct_img.shape[:-1], k).astype(jnp.float32))
            d_x = d_x.astype(x_aval.dtype)
        if want_values:
            d_values = blocks_conv_sddmm(x_img, ct_img, indices, indptr,
                                         n=values.aval.shape[-1], kernel_size=kernel_size,
                                         strides=strides, dilation=dilation,
                                         padding=padding).astype(jnp.float32)
        return d_x, d_values

    images = ct.shape[0]
    per_image = max(1, (ct.size // max(images, 1)) // out_features * k * ct.dtype.itemsize)
    step_bytes = BACKWARD_PATCH_BYTES if want_x else BACKWARD_SDDMM_BYTES
    chunk = images if jax.default_backend() != "cpu" else max(1, step_bytes // per_image)
    # x is the unknown when its cotangent is wanted (the op is linear in x or in values, never
    # in both at once): then only its shape, in x_aval, is read.
    x_known = None if want_x else x
    if chunk >= images:
        d_x, d_values = step(x_known, ct)
    else:
        # Whole steps of `chunk` images in a loop, each step one call of the kernels on its
        # images (lax.map's batch_size would vmap the step instead), then the remainder.
        full = images // chunk * chunk

        def steps(a):
            return None if a is None else a[:full].reshape(full // chunk, chunk, *a.shape[1:])

        d_x, d_values = jax.lax.map(lambda args: step(*args), (steps(x_known), steps(ct)))
        d_x = None if d_x is None else d_x.reshape(full, *d_x.shape[2:])
        d_values = None if d_values is None else jnp.sum(d_values, axis=0)
        if full < images:
            tail_x, tail_values = step(None if x_known is None else x_known[full:], ct[full:])
            d_x = None if d_x is None else jnp.concatenate([d_x, tail_x])
            d_values = None if d_values is None else d_values + tail_values
    ct_values = None if d_values is None else d_values.astype(values.aval.dtype)
    return d_x, ct_values, None, None


def _conv_batch(args, dims, **params):
    x, values, indices, indptr = args
    dx, *weight_dims = dims
    if all(d is None for d in weight_dims):
        # Only the images are batched: they join the image dim.
        x = jnp.moveaxis(x, dx, 0)
        b, n = x.shape[:2]
        y = blocks_conv(x.reshape(b * n, *x.shape[2:]), values, indices, indptr, **params)
        return y.reshape(b, n, *y.shape[1:]), 0
    # Batched weights: the stored patches and blocks_spmm's own batching.
    fn = functools.partial(_conv_through_spmm, **params)
    in_axes = tuple(dims)
    return jax.vmap(fn, in_axes=in_axes)(*args), 0


def _conv_lowering(target, through_patches):
    """CPU: `target`, the kernel that gathers the patches itself; elsewhere (CUDA, the emulator)
    `through_patches`, the stored patches through the matrix ops' kernels."""
    elsewhere = mlir.lower_fun(through_patches, multiple_results=False)
    if not _ffi.has_target(target, "cpu") or _ffi.emulating_cuda():
        return elsewhere, elsewhere
    direct = jax.ffi.ffi_lowering(target)

    def cpu(ctx, *operands, kernel_size, strides, dilation, padding, **shape_params):
        del shape_params  # out_features / n: the handler reads them from the shapes.
        return direct(ctx, *operands,
                      kernel_h=np.int32(kernel_size[0]), kernel_w=np.int32(kernel_size[1]),
                      stride_h=np.int32(strides[0]), stride_w=np.int32(strides[1]),
                      dilation_h=np.int32(dilation[0]), dilation_w=np.int32(dilation[1]),
                      pad_top=np.int32(padding[0][0]), pad_left=np.int32(padding[1][0]))

    return cpu, elsewhere


# ====================================================================== blocks_conv_sddmm
blocks_conv_sddmm_p = Primitive("jaxsparse_blocks_conv_sddmm")


def blocks_conv_sddmm(x, dy, indices, indptr, *, n: int, kernel_size, strides=(1, 1),
                      dilation=(1, 1), padding=((0, 0), (0, 0))):
    """The values' cotangent of `blocks_conv`: the patches of x times dy, sampled at the blocks,
    with the patches never stored on a CPU (the kernel gathers them through the kernel
    positions, as the forward does).

    Args:
        x: `[N, H, W, C]` f32/bf16/f16.
        dy: `[N, OH, OW, out]` in x's dtype (blocks_conv's output shape for this geometry).
        indices, indptr: one weight's structure (`[1, nnz]`, `[1, R + 1]`, `R = ceil(out / n)`).
        n: outputs per block.
        kernel_size, strides, dilation, padding: as `blocks_conv`.

    Returns:
        `dv [1, nnz, n]` in x's dtype: `dv[0, b, j] = sum_t patches(x)[t, indices[b]] *
        dy[t, row(b) * n + j]` over the output pixels t, accumulated in f32; 0 for padding
        outputs and for blocks outside x or outside every row.
    """
    return blocks_conv_sddmm_p.bind(x, dy, indices, indptr, n=int(n),
                                    kernel_size=_pair(kernel_size), strides=_pair(strides),
                                    dilation=_pair(dilation),
                                    padding=tuple(tuple(int(v) for v in p) for p in padding))


def _conv_sddmm_by_patches(x, dy, indices, indptr, *, n, kernel_size, strides, dilation,
                           padding, product):
    patches = im2col(x, kernel_size, strides, dilation, padding)
    rows = patches.shape[0] * patches.shape[1] * patches.shape[2]
    return product(patches.reshape(1, rows, -1), dy.reshape(1, rows, dy.shape[-1]), indices,
                   indptr, n=n)


def blocks_conv_sddmm_reference(x, dy, indices, indptr, **params):
    """Pure jnp: the stored patches' sampled product (the test oracle)."""
    return _conv_sddmm_by_patches(x, dy, indices, indptr, product=blocks_sddmm_reference,
                                  **params)


def _conv_sddmm_through_patches(x, dy, indices, indptr, **params):
    """The patches stored, then `blocks_sddmm` (CUDA, the emulator, batches)."""
    return _conv_sddmm_by_patches(x, dy, indices, indptr, product=blocks_sddmm, **params)


def _conv_sddmm_abstract_eval(x, dy, indices, indptr, *, n, kernel_size, strides, dilation,
                              padding):
    if x.ndim != 4 or dy.ndim != 4:
        raise ValueError("blocks_conv_sddmm: x and dy must have rank 4 ([N, H, W, C], "
                         f"[N, OH, OW, out]); got {tuple(x.shape)} and {tuple(dy.shape)}")
    P.check_float("blocks_conv_sddmm", x=x)
    if dy.dtype != x.dtype:
        raise TypeError(f"blocks_conv_sddmm: dy must have x's dtype {x.dtype}; got {dy.dtype}")
    out = _conv_out_dims(x.shape, kernel_size, strides, dilation, padding)
    if tuple(dy.shape[:3]) != (x.shape[0], *out):
        raise ValueError(f"blocks_conv_sddmm: dy must be [N, OH, OW, out] = [{x.shape[0]}, "
                         f"{out[0]}, {out[1]}, out] for this x and geometry; got "
                         f"{tuple(dy.shape)}")
    _check_structure("blocks_conv_sddmm", indices, indptr, dy.shape[-1], n)
    return x.update(shape=(1, indices.shape[-1], n), dtype=x.dtype)


def _conv_sddmm_jvp(primals, tangents, **params):
    fn = functools.partial(blocks_conv_sddmm, **params)
    return P.jvp_bilinear(fn, primals, tangents, fn(*primals))


def _conv_sddmm_transpose(ct, x, dy, indices, indptr, *, n, **geometry):
    """<sddmm(x, dy), ct> = <dy, blocks_conv(x, ct)>: dy's cotangent is the forward with ct as
    the values, x's that forward's own transpose applied to dy."""
    if type(ct) is ad.Zero:
        return None, None, None, None
    want_x = ad.is_undefined_primal(x)
    x_aval = x.aval if want_x else x
    dy_aval = dy.aval if ad.is_undefined_primal(dy) else dy
    conv = functools.partial(blocks_conv, values=ct, indices=indices, indptr=indptr,
                             out_features=dy_aval.shape[-1], **geometry)
    if want_x:
        (ct_x,) = jax.linear_transpose(conv, jax.ShapeDtypeStruct(x_aval.shape,
                                                                  x_aval.dtype))(dy)
        return ct_x, None, None, None
    return None, conv(x), None, None


def _conv_sddmm_batch(args, dims, **params):
    fn = functools.partial(_conv_sddmm_through_patches, **params)
    return jax.vmap(fn, in_axes=tuple(dims))(*args), 0


# ====================================================================== CUDA lowerings# ====================================================================== CUDA lowerings
# The CUDA kernels (cuda/blocks/blocks_ops.cu) take the structure prepared in the same program,
# so that every output element finds its inputs without a search or a scatter: the forward
# reads indptr already made non-decreasing (a warp per block row), the input gradient the blocks
# listed by input (a CSC view: one thread per dx entry sums its blocks, no atomics), the values'
# gradient each block's row (docs/ffi_abi.md).
def _blocks_by_input(indices, rows, rows_count, k):
    """`(order, kptr)`: the blocks sorted by input (blocks outside x or in no row last), and
    `kptr [B, K + 1]` with input k's blocks at `order[kptr[k]:kptr[k + 1]]`."""
    valid = (indices >= 0) & (indices < k) & (rows >= 0) & (rows < rows_count)
    key = jnp.where(valid, indices, k)
    order = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
    sorted_key = jnp.take_along_axis(key, order, axis=-1)
    starts = jax.vmap(functools.partial(jnp.searchsorted, side="left"), in_axes=(0, None))(
        sorted_key, jnp.arange(k + 1, dtype=jnp.int32))
    return order, starts.astype(jnp.int32)


def _spmm_cuda_lowering(target):
    def call(x, values, indices, indptr, *, out_features):
        y = jax.ShapeDtypeStruct((max(x.shape[0], values.shape[0]), x.shape[1], out_features),
                                 x.dtype)
        return jax.ffi.ffi_call(target, y)(x, values, indices, _spans(indptr, values.shape[1]))

    return mlir.lower_fun(call, multiple_results=False)


def _spmm_t_cuda_lowering(target):
    def call(dy, values, indices, indptr, *, in_features):
        rows = block_rows(indptr, values.shape[1])
        order, kptr = _blocks_by_input(indices, rows, indptr.shape[-1] - 1, in_features)
        dx = jax.ShapeDtypeStruct((max(dy.shape[0], values.shape[0]), dy.shape[1], in_features),
                                  dy.dtype)
        return jax.ffi.ffi_call(target, dx)(dy, values, rows, order, kptr)

    return mlir.lower_fun(call, multiple_results=False)


def _sddmm_cuda_lowering(target):
    def call(x, dy, indices, indptr, *, n):
        rows = block_rows(indptr, indices.shape[-1])
        dv = jax.ShapeDtypeStruct(
            (max(x.shape[0], dy.shape[0], indices.shape[0]), indices.shape[-1], n), x.dtype)
        return jax.ffi.ffi_call(target, dv)(x, dy, indices, rows)

    return mlir.lower_fun(call, multiple_results=False)


def _register_conv_op(prim, *, abstract_eval, jvp, transpose, batch, target, through_patches):
    """A convolution primitive: its rules, the CPU target that gathers the patches, and the
    stored-patch route elsewhere."""
    prim.def_impl(P.impl_via_jit(prim))
    prim.def_abstract_eval(abstract_eval)
    ad.primitive_jvps[prim] = jvp
    ad.primitive_transposes[prim] = transpose
    batching.primitive_batchers[prim] = batch
    cpu, elsewhere = _conv_lowering(target, through_patches)
    mlir.register_lowering(prim, elsewhere)
    mlir.register_lowering(prim, cpu, platform="cpu")


def _register_conv():
    _register_conv_op(blocks_conv_p, abstract_eval=_conv_abstract_eval, jvp=_conv_jvp,
                      transpose=_conv_transpose, batch=_conv_batch,
                      target="jaxsparse_blocks_conv", through_patches=_conv_through_spmm)
    _register_conv_op(blocks_conv_sddmm_p, abstract_eval=_conv_sddmm_abstract_eval,
                      jvp=_conv_sddmm_jvp, transpose=_conv_sddmm_transpose,
                      batch=_conv_sddmm_batch, target="jaxsparse_blocks_conv_sddmm",
                      through_patches=_conv_sddmm_through_patches)


def _register():
    # No attributes: the handlers read N_out, K and n from the operands' and result's shapes.
    P.register(blocks_spmm_p, abstract_eval=_spmm_abstract_eval, jvp=_spmm_jvp,
               transpose=_spmm_transpose, batch=_spmm_batch, reference=blocks_spmm_reference,
               target="jaxsparse_blocks_spmm", attrs=(),
               cuda_lowering=_spmm_cuda_lowering)
    P.register(blocks_spmm_t_p, abstract_eval=_spmm_t_abstract_eval, jvp=_spmm_t_jvp,
               transpose=_spmm_t_transpose, batch=_spmm_t_batch,
               reference=blocks_spmm_t_reference, target="jaxsparse_blocks_spmm_t", attrs=(),
               cuda_lowering=_spmm_t_cuda_lowering)
    P.register(blocks_sddmm_p, abstract_eval=_sddmm_abstract_eval, jvp=_sddmm_jvp,
               transpose=_sddmm_transpose, batch=_sddmm_batch, reference=blocks_sddmm_reference,
               target="jaxsparse_blocks_sddmm", attrs=(),
               cuda_lowering=_sddmm_cuda_lowering)


_register()
_register_conv()
