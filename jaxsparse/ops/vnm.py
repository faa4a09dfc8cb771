"""V:N:M structured sparsity (VENOM) products as JAX primitives.

Three primitives, closed under differentiation (CONVENTIONS.md 3), as for N:M:

- `vnm_spmm`   y  = x @ W              (the forward product)
- `vnm_spmm_t` dx = dy @ W^T           (the cotangent of x)
- `vnm_sddmm`  dv = (x^T dy)[kept]     (the cotangent of the values: a sampled product)

All work on the canonical layout (see `jaxsparse.formats.vnm`) with one leading kernel batch dim:

    x       [Bx, T, K]     f32/bf16/f16
    dy      [By, T, N]     same dtype
    values  [Bw, N, Kc]    same dtype, Kc = G * n, G = ceil(K/m)
    indices [Bw, N, Kc]    uint8, the slot (0..3) of each kept value among its panel's 4
    columns [Bw, P, G*4]   uint8, per panel of v outputs and group of m inputs the 4 selected
                           positions (0..m-1), P = ceil(N/v)

Each leading dim is 1 (broadcast) or the common batch B; values, indices and columns share one.
Accumulation is f32. Kept entry c of output r reads input
`(c // n) * m + columns[r // v, 4 * (c // n) + indices[r, c]]`; entries that land in the zero
padding (input >= K), or whose slot or column is out of range (unvalidated data under jit),
contribute nothing.

Each section follows the order of jax's `sparse/csr.py`: primitive, public wrapper, pure-jnp
reference (the test oracle, and the fallback where no kernel exists), abstract eval, JVP,
transpose, batching; registration last.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad

from jaxsparse.ops import _primitive as P

__all__ = ["vnm_spmm", "vnm_spmm_t", "vnm_sddmm", "vnm_spmm_reference", "vnm_spmm_t_reference",
           "vnm_sddmm_reference", "vnm_pack_tiles", "vnm_spmm_tiled", "vnm_spmm_tiled_reference",
           "TILE_DTYPES", "has_tiles", "tile_words_per_panel"]

SELECTED = 4  # Inputs a panel keeps per group; 2:4 (or 1:4) applies inside them.


# ====================================================================== shared helpers
def kept_positions(indices, columns, v, n, m):
    """Absolute (zero-padded) input of every kept entry, and whether it is a valid entry.

    Args:
        indices: `[B, N, Kc]` uint8; columns: `[B, P, G*4]` uint8 (same B).

    Returns:
        `(positions, valid)`, both `[B, N, Kc]`: int32 inputs in `[0, G*m)` (0 where invalid),
        and bool, False for a slot >= 4 or a column >= m.
    """
    b, out, kept = indices.shape
    groups = kept // n
    slot = indices.astype(jnp.int32).reshape(b, out, groups, n)
    panel_cols = columns.astype(jnp.int32).reshape(b, columns.shape[1], groups, SELECTED)
    row_cols = jnp.repeat(panel_cols, v, axis=1)[:, :out]  # [B, N, G, 4]
    col = jnp.take_along_axis(row_cols, jnp.clip(slot, 0, SELECTED - 1), axis=-1)
    valid = (slot < SELECTED) & (col < m)
    base = (jnp.arange(groups, dtype=jnp.int32) * m)[:, None]
    positions = jnp.where(valid, base + col, 0)
    return positions.reshape(b, out, kept), valid.reshape(b, out, kept)


def _densify_t(values, indices, columns, v, n, m, k):
    """`W^T` as a dense `[B, N, K]` array (reference only; exact: selects, and adds of zeros)."""
    values, indices, columns = P.broadcast_batch(values, indices, columns)
    b, out, kept = values.shape
    groups = kept // n
    pos, valid = kept_positions(indices, columns, v, n, m)
    in_group = (pos - (jnp.arange(kept, dtype=jnp.int32) // n) * m).reshape(b, out, groups, n)
    valid = valid.reshape(b, out, groups, n)
    vals = values.reshape(b, out, groups, n)
    position = jnp.arange(m, dtype=jnp.int32)
    dense = jnp.zeros((b, out, groups, m), values.dtype)
    for s in range(n):
        hit = valid[..., s, None] & (in_group[..., s, None] == position)
        dense = dense + jnp.where(hit, vals[..., s, None], jnp.zeros((), values.dtype))
    dense = dense.reshape(b, out, groups * m)
    if groups * m >= k:
        return dense[..., :k]
    return jnp.pad(dense, [(0, 0), (0, 0), (0, k - groups * m)])


def _check_operands(where, dense, values, indices, columns, v, n, m, k, dense_name="x"):
    # The spec's ranges, as the kernels check their attributes (cpu/vnm/vnm_checks.h).
    v = P.check_attr(where, "v", v, low=16, high=256, multiple=16)
    P.check_attr(where, "n", n, low=1, high=2)
    P.check_attr(where, "m", m, low=SELECTED, high=64)
    P.check_float(where, **{dense_name: dense})
    P.check_rank3(where, dense=dense, values=values, indices=indices, columns=columns)
    groups = -(-k // m)
    if values.shape[1:] != indices.shape[1:] or indices.shape[-1] != groups * n:
        raise ValueError(
            f"{where}: values and indices must be [B, N, ceil(K/m)*n] = [B, N, "
            f"ceil({k}/{m})*{n}] = [B, N, {groups * n}]; got {tuple(values.shape)} and "
            f"{tuple(indices.shape)}"
        )
    panels = -(-indices.shape[1] // v)
    if columns.shape[1:] != (panels, groups * SELECTED):
        raise ValueError(
            f"{where}: columns must be [B, ceil(N/v), ceil(K/m)*4] = [B, {panels}, "
            f"{groups * SELECTED}]; got {tuple(columns.shape)}"
        )
    if indices.dtype != jnp.uint8 or columns.dtype != jnp.uint8:
        raise TypeError(
            f"{where}: indices and columns must be uint8, got {indices.dtype} and {columns.dtype}"
        )
    if values.dtype != dense.dtype:
        raise TypeError(f"{where}: dtypes must match, got {dense.dtype} and {values.dtype}")


# ====================================================================== vnm_spmm
vnm_spmm_p = Primitive("jaxsparse_vnm_spmm")


def vnm_spmm(x, values, indices, columns, *, v: int, n: int, m: int):
    """`y = x @ W` for a V:N:M sparse `W`.

    Args:
        x: `[Bx, T, K]` float32/bfloat16/float16.
        values: `[Bw, N, Kc]` same dtype, `Kc = ceil(K/m) * n`.
        indices: `[Bw, N, Kc]` uint8.
        columns: `[Bw, ceil(N/v), ceil(K/m) * 4]` uint8.
        v, n, m: the spec.

    Returns:
        `[B, T, N]` in x's dtype, `B = max(Bx, Bw)`; f32 accumulation.
    """
    values, indices, columns = P.same_batch(values, indices, columns)
    return vnm_spmm_p.bind(x, values, indices, columns, v=v, n=n, m=m)


def vnm_spmm_reference(x, values, indices, columns, *, v, n, m):
    x, w_t = P.broadcast_batch(x, _densify_t(values, indices, columns, v, n, m, x.shape[-1]))
    return P.f32_einsum("btk,bnk->btn", x, w_t, x.dtype)


def _spmm_abstract_eval(x, values, indices, columns, *, v, n, m):
    _check_operands("vnm_spmm", x, values, indices, columns, v, n, m, x.shape[-1])
    batch = P.check_batches("vnm_spmm", ("x", x), ("values", values), ("indices", indices),
                            ("columns", columns))
    return x.update(shape=(batch, x.shape[1], values.shape[1]), dtype=x.dtype)


def _spmm_jvp(primals, tangents, *, v, n, m):
    fn = functools.partial(vnm_spmm, v=v, n=n, m=m)
    return P.jvp_bilinear(fn, primals, tangents, fn(*primals))


def _spmm_transpose(ct, x, values, indices, columns, *, v, n, m):
    if type(ct) is ad.Zero:
        return None, None, None, None
    ct_x = ct_values = None
    if ad.is_undefined_primal(x):
        dx = vnm_spmm_t(ct, values, indices, columns, v=v, n=n, m=m,
                        in_features=x.aval.shape[-1])
        ct_x = P.sum_to_batch(dx, x.aval.shape[0])
    if ad.is_undefined_primal(values):
        dv = vnm_sddmm(x, ct, indices, columns, v=v, n=n, m=m)
        ct_values = P.sum_to_batch(dv, values.aval.shape[0])
    return ct_x, ct_values, None, None


def _spmm_batch(args, dims, *, v, n, m):
    return P.batch_weight_product(functools.partial(vnm_spmm, v=v, n=n, m=m), args, dims)


# ====================================================================== vnm_spmm_t
vnm_spmm_t_p = Primitive("jaxsparse_vnm_spmm_t")


def vnm_spmm_t(dy, values, indices, columns, *, v: int, n: int, m: int, in_features: int):
    """`dx = dy @ W^T` for a V:N:M sparse `W` (the cotangent of x in `x @ W`).

    Args:
        dy: `[By, T, N]` float32/bfloat16/float16.
        values, indices, columns: as in `vnm_spmm`.
        in_features: K, the width of the result.

    Returns:
        `[B, T, K]` in dy's dtype.
    """
    values, indices, columns = P.same_batch(values, indices, columns)
    return vnm_spmm_t_p.bind(dy, values, indices, columns, v=v, n=n, m=m,
                             in_features=in_features)


def vnm_spmm_t_reference(dy, values, indices, columns, *, v, n, m, in_features):
    dy, w_t = P.broadcast_batch(dy, _densify_t(values, indices, columns, v, n, m, in_features))
    return P.f32_einsum("btn,bnk->btk", dy, w_t, dy.dtype)


def _spmm_t_abstract_eval(dy, values, indices, columns, *, v, n, m, in_features):
    _check_operands("vnm_spmm_t", dy, values, indices, columns, v, n, m, in_features, "dy")
    if dy.shape[-1] != values.shape[1]:
        raise ValueError(f"vnm_spmm_t: dy has {dy.shape[-1]} outputs, values {values.shape[1]}")
    batch = P.check_batches("vnm_spmm_t", ("dy", dy), ("values", values), ("indices", indices),
                            ("columns", columns))
    return dy.update(shape=(batch, dy.shape[1], in_features), dtype=dy.dtype)


def _spmm_t_jvp(primals, tangents, *, v, n, m, in_features):
    fn = functools.partial(vnm_spmm_t, v=v, n=n, m=m, in_features=in_features)
    return P.jvp_bilinear(fn, primals, tangents, fn(*primals))


def _spmm_t_transpose(ct, dy, values, indices, columns, *, v, n, m, in_features):
    if type(ct) is ad.Zero:
        return None, None, None, None
    ct_dy = ct_values = None
    if ad.is_undefined_primal(dy):
        y = vnm_spmm(ct, values, indices, columns, v=v, n=n, m=m)
        ct_dy = P.sum_to_batch(y, dy.aval.shape[0])
    if ad.is_undefined_primal(values):
        dv = vnm_sddmm(ct, dy, indices, columns, v=v, n=n, m=m)
        ct_values = P.sum_to_batch(dv, values.aval.shape[0])
    return ct_dy, ct_values, None, None


def _spmm_t_batch(args, dims, *, v, n, m, in_features):
    fn = functools.partial(vnm_spmm_t, v=v, n=n, m=m, in_features=in_features)
    return P.batch_weight_product(fn, args, dims)


# ====================================================================== vnm_sddmm
vnm_sddmm_p = Primitive("jaxsparse_vnm_sddmm")


def vnm_sddmm(x, dy, indices, columns, *, v: int, n: int, m: int):
    """`dv[b, r, c] = sum_t x[b, t, pos(r, c)] * dy[b, t, r]`: `x^T dy` sampled at the kept entries.

    The cotangent of the values in `x @ W`.

    Args:
        x: `[Bx, T, K]` float32/bfloat16/float16.
        dy: `[By, T, N]` same dtype.
        indices: `[Bw, N, Kc]` uint8; columns: `[Bw, ceil(N/v), ceil(K/m) * 4]` uint8.

    Returns:
        `[B, N, Kc]` in x's dtype, `B = max(Bx, By, Bw)`; zero for entries in the padding.
    """
    indices, columns = P.same_batch(indices, columns)
    return vnm_sddmm_p.bind(x, dy, indices, columns, v=v, n=n, m=m)


def vnm_sddmm_reference(x, dy, indices, columns, *, v, n, m):
    k = x.shape[-1]
    width = max(k, indices.shape[-1] // n * m)
    x_pad = jnp.pad(x, [(0, 0), (0, 0), (0, width - k)])
    x_pad, dy, indices, columns = P.broadcast_batch(x_pad, dy, indices, columns)
    full = jnp.einsum("btn,btk->bnk", dy, x_pad, preferred_element_type=jnp.float32)
    pos, valid = kept_positions(indices, columns, v, n, m)
    picked = jnp.take_along_axis(full, pos, axis=-1)
    return jnp.where(valid, picked, 0.0).astype(x.dtype)


def _sddmm_abstract_eval(x, dy, indices, columns, *, v, n, m):
    _check_operands("vnm_sddmm", x, indices.update(dtype=x.dtype), indices, columns, v, n, m,
                    x.shape[-1])
    if dy.dtype != x.dtype:
        raise TypeError(f"vnm_sddmm: dtypes must match, got {x.dtype} and {dy.dtype}")
    if dy.ndim != 3 or dy.shape[1] != x.shape[1] or dy.shape[2] != indices.shape[1]:
        raise ValueError(
            f"vnm_sddmm: dy must be [B, {x.shape[1]}, {indices.shape[1]}]; got {tuple(dy.shape)}"
        )
    batch = P.check_batches("vnm_sddmm", ("x", x), ("dy", dy), ("indices", indices),
                            ("columns", columns))
    return x.update(shape=(batch,) + indices.shape[1:], dtype=x.dtype)


def _sddmm_jvp(primals, tangents, *, v, n, m):
    fn = functools.partial(vnm_sddmm, v=v, n=n, m=m)
    return P.jvp_bilinear(fn, primals, tangents, fn(*primals))


def _sddmm_transpose(ct, x, dy, indices, columns, *, v, n, m):
    if type(ct) is ad.Zero:
        return None, None, None, None
    ct_x = ct_dy = None
    if ad.is_undefined_primal(x):
        dx = vnm_spmm_t(dy, ct, indices, columns, v=v, n=n, m=m, in_features=x.aval.shape[-1])
        ct_x = P.sum_to_batch(dx, x.aval.shape[0])
    if ad.is_undefined_primal(dy):
        y = vnm_spmm(x, ct, indices, columns, v=v, n=n, m=m)
        ct_dy = P.sum_to_batch(y, dy.aval.shape[0])
    return ct_x, ct_dy, None, None


def _sddmm_batch(args, dims, *, v, n, m):
    # Per-example outputs: the mapped axis always joins the kernel batch (never the tokens).
    return P.batch_into_kernel_batch(functools.partial(vnm_sddmm, v=v, n=n, m=m), args, dims)


# ====================================================================== tiles packed once
#: The dtypes whose forward has packed tiles: bf16 (the tile kernels: AMX `tdpbf16ps`, or
#: `vdpbf16ps`) and f32 (the FMA engine).
TILE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
_TILE_ROWS, _STEP_WORDS = 16, 32  # A B tile: 16 pair rows of 32 words (16 outputs x 2 inputs).


def has_tiles(dtype) -> bool:
    """Whether weights of `dtype` have a packed-tile forward (`TILE_DTYPES`)."""
    return jnp.dtype(dtype) in TILE_DTYPES


def tile_words_per_panel(v: int, kept: int, n: int, dtype) -> int:
    """Elements of one panel's packed tiles (`vnm_pack_tiles`)."""
    slots = SELECTED * (kept // n)
    if jnp.dtype(dtype) == jnp.float32:
        return slots * v
    return v // _TILE_ROWS * -(-slots // _STEP_WORDS) * _TILE_ROWS * _STEP_WORDS


def vnm_pack_tiles(values, indices, *, v: int, n: int):
    """The forward's tiles of a V:N:M weight, packed once: a pure, jittable packing.

    The CPU forward from 32 tokens otherwise decodes every panel's values into this layout on
    every call (about a seventh of the bf16 tile forward's time at 128 tokens,
    docs/cpu_speed_notes.md). Per panel of `v` outputs, with `kk = 4 g + slot` (slot `slot` of
    group `g`'s 4 selected inputs) and 0 where an output keeps no value:

    - bfloat16, the tile kernels' B (AMX `tdpbf16ps`, `vdpbf16ps`): `v/16` output tiles, each
      `ceil(4G/32)` k steps of 16 pair rows x 32 words; pair row `r` of step `s` holds, for its
      16 outputs `o`, the weights of `kk = 32 s + 2 r` and `kk + 1` at words `2 o`, `2 o + 1`;
    - float32, the FMA engine's rows: `[4G][v]`, row `kk` the weights of the panel's outputs.

    Twice the values' elements: the 2:4 zeros inside the panel's selected inputs are stored.
    Entries whose slot is >= 4 add nothing; entries repeating a slot add up (in f32, rounded
    once), as the decoder treats them.

    Args:
        values: `[..., N, G*n]` bfloat16 or float32.
        indices: `[..., N, G*n]` uint8 slots.
        v, n: the spec's panel height and values per group.

    Returns:
        `[..., ceil(N/v), tile_words_per_panel(v, G*n, n, dtype)]` in the values' dtype.
    """
    values, indices = jnp.asarray(values), jnp.asarray(indices)
    if not has_tiles(values.dtype):
        raise TypeError(f"jaxsparse.ops.vnm_pack_tiles: values must be bfloat16 or float32 (the "
                        f"dtypes with a packed-tile forward); got {values.dtype}")
    *lead, out, kept = values.shape
    groups, panels, nd = kept // n, -(-out // v), len(lead)
    slot = indices.astype(jnp.int32).reshape(*lead, out, groups, n)
    vals = values.astype(jnp.float32).reshape(*lead, out, groups, n)
    hit = slot[..., None] == jnp.arange(SELECTED, dtype=jnp.int32)  # [..., N, G, n, 4]
    dense = jnp.sum(jnp.where(hit, vals[..., None], 0.0), axis=-2)  # [..., N, G, 4]
    dense = dense.astype(values.dtype).reshape(*lead, out, groups * SELECTED)
    words = tile_words_per_panel(v, kept, n, values.dtype)
    if values.dtype == jnp.float32:  # [..., P, v, 4G] -> [..., P, 4G, v]
        dense = jnp.pad(dense, [(0, 0)] * nd + [(0, panels * v - out), (0, 0)])
        rows = dense.reshape(*lead, panels, v, groups * SELECTED)
        return jnp.swapaxes(rows, -1, -2).reshape(*lead, panels, words)
    steps = -(-SELECTED * groups // _STEP_WORDS)
    dense = jnp.pad(dense, [(0, 0)] * nd + [(0, panels * v - out),
                                            (0, steps * _STEP_WORDS - groups * SELECTED)])
    # [..., P, v/16, o=16, S, r=16, e=2] -> [..., P, v/16, S, r, o, e]
    tiles = dense.reshape(*lead, panels, v // _TILE_ROWS, _TILE_ROWS, steps, _TILE_ROWS, 2)
    order = [*range(nd), nd, nd + 1, nd + 3, nd + 4, nd + 2, nd + 5]
    return tiles.transpose(order).reshape(*lead, panels, words)


vnm_spmm_tiled_p = Primitive("jaxsparse_vnm_spmm_tiled")


def vnm_spmm_tiled(x, values, indices, columns, tiles, *, v: int, n: int, m: int):
    """`y = x @ W` for a V:N:M `W` whose forward tiles are also held, packed once.

    `vnm_spmm` with one more operand, `tiles = vnm_pack_tiles(values, indices)`: the CPU
    forward from 32 tokens (bf16 on the tile kernels, f32 on the FMA engine) multiplies them
    instead of decoding the values on every call; every other kernel reads `values`, so the two
    must agree
    (`VNMSparse.with_tiles` packs them). An inference form: its derivative with respect to x
    is `vnm_spmm`'s (frozen weights under adapters work), but differentiating it with respect
    to `values` or `tiles` raises, since training the values would leave the tiles stale. On
    CUDA it is `vnm_spmm`.

    Args:
        x: `[Bx, T, K]` bfloat16 or float32.
        values, indices, columns: as in `vnm_spmm`; values of x's dtype.
        tiles: `[Bw, ceil(N/v), tile_words_per_panel(v, Kc, n, dtype)]` of x's dtype.

    Returns:
        `[B, T, N]` in x's dtype; f32 accumulation.
    """
    values, indices, columns, tiles = P.same_batch(values, indices, columns, tiles)
    return vnm_spmm_tiled_p.bind(x, values, indices, columns, tiles, v=v, n=n, m=m)


def vnm_spmm_tiled_reference(x, values, indices, columns, tiles, *, v, n, m):
    del tiles  # The packing of the values (checked where the format builds them).
    return vnm_spmm_reference(x, values, indices, columns, v=v, n=n, m=m)


def _spmm_tiled_abstract_eval(x, values, indices, columns, tiles, *, v, n, m):
    out = _spmm_abstract_eval(x, values, indices, columns, v=v, n=n, m=m)
    want = (values.shape[0], columns.shape[1],
            tile_words_per_panel(v, values.shape[2], n, values.dtype))
    if not has_tiles(values.dtype) or tiles.dtype != values.dtype or tuple(tiles.shape) != want:
        raise ValueError(
            f"vnm_spmm_tiled: values must be bfloat16 or float32 and tiles {want} of their "
            f"dtype (vnm_pack_tiles); got tiles {tiles.dtype} {tuple(tiles.shape)}, values "
            f"{values.dtype}"
        )
    return out


def _spmm_tiled_jvp(primals, tangents, *, v, n, m):
    _, tvalues, _, _, ttiles = tangents
    if type(tvalues) is not ad.Zero or type(ttiles) is not ad.Zero:
        raise ValueError(
            "jaxsparse: a V:N:M weight holding packed tiles (VNMSparse.with_tiles) is an "
            "inference form and cannot be differentiated with respect to its values or tiles: "
            "training would leave the tiles stale. Train the weight without tiles "
            "(ws.without_tiles()) and pack them again after training, or keep its values out "
            "of what is differentiated."
        )
    return P.jvp_linear(functools.partial(vnm_spmm_tiled, v=v, n=n, m=m), primals, tangents)


def _spmm_tiled_transpose(ct, x, values, indices, columns, tiles, *, v, n, m):
    if type(ct) is ad.Zero or not ad.is_undefined_primal(x):
        return None, None, None, None, None
    dx = vnm_spmm_t(ct, values, indices, columns, v=v, n=n, m=m, in_features=x.aval.shape[-1])
    return P.sum_to_batch(dx, x.aval.shape[0]), None, None, None, None


def _spmm_tiled_batch(args, dims, *, v, n, m):
    return P.batch_weight_product(functools.partial(vnm_spmm_tiled, v=v, n=n, m=m), args, dims)


def _spmm_untiled(x, values, indices, columns, tiles, *, v, n, m):
    """On CUDA (and the emulator) the product is `vnm_spmm`'s: Spatha's layout is its own."""
    return vnm_spmm(x, values, indices, columns, v=v, n=n, m=m)


# ====================================================================== registration
_ATTRS = ("v", "n", "m")


def _register():
    P.register(vnm_spmm_p, abstract_eval=_spmm_abstract_eval, jvp=_spmm_jvp,
               transpose=_spmm_transpose, batch=_spmm_batch, reference=vnm_spmm_reference,
               target="jaxsparse_vnm_spmm", attrs=_ATTRS)
    P.register_cpu_variant(vnm_spmm_tiled_p, on_cuda=_spmm_untiled,
                           abstract_eval=_spmm_tiled_abstract_eval, jvp=_spmm_tiled_jvp,
                           transpose=_spmm_tiled_transpose, batch=_spmm_tiled_batch,
                           reference=vnm_spmm_tiled_reference,
                           target="jaxsparse_vnm_spmm_tiled", attrs=_ATTRS)
    P.register(vnm_spmm_t_p, abstract_eval=_spmm_t_abstract_eval, jvp=_spmm_t_jvp,
               transpose=_spmm_t_transpose, batch=_spmm_t_batch, reference=vnm_spmm_t_reference,
               target="jaxsparse_vnm_spmm_t", attrs=_ATTRS)
    P.register(vnm_sddmm_p, abstract_eval=_sddmm_abstract_eval, jvp=_sddmm_jvp,
               transpose=_sddmm_transpose, batch=_sddmm_batch, reference=vnm_sddmm_reference,
               target="jaxsparse_vnm_sddmm", attrs=_ATTRS)


_register()
