"""Second-order one-shot compression of one layer: SparseGPT/OBS (`sparsegpt`) and GPTQ (`gptq`).

Both solve the layer-wise problem of the SparseGPT and GPTQ papers: given a weight `W [in, out]`
and the Gram matrix `H = X^T X [in, in]` of the layer's calibration inputs, find a compressed
`Q` (sparse, int4, or both) with a small reconstruction error `||X W - X Q||^2 = tr(E^T H E)`,
`E = W - Q`. One algorithm serves every format (Frantar & Alistarh, 2022/2023):

1. Inputs that never fire (`H_ii = 0`) are dropped (`W_i = 0`, `H_ii = 1`); `H += damp *
   mean(diag H) * I`.
2. `U` = the upper Cholesky factor of `H^-1`. Its row `i` gives the OBS quantities for "inputs
   `>= i` still free": `[(H[i:, i:])^-1]_00 = U_ii^2`, and the optimal update of the later inputs
   after fixing input `i` to `q` is `W[i:] -= U[i, i:]^T (w_i - q) / U_ii`.
3. The inputs are visited in order; each input row `w_i` (all outputs at once: they share `U`)
   becomes `q_i` = its kept entries, quantised for int4, and its error is spread over the later
   inputs. Updates inside a chunk of `block_size` inputs are immediate; the rest of the weight
   gets them once per chunk, as one matrix product (the papers' lazy batch updates).
4. Sparse specs: with the mask now fixed, the kept weights are re-solved for it (`refit`
   conjugate-gradient steps on each output's masked least-squares problem, `H_SS q_S = (H w)_S`),
   which the sweep of step 3 only approximates: it spreads each error over later inputs only.
   Boza, "Fast and Effective Weight Update for Pruned Large Language Models" (TMLR 2024) solves
   the same problem by ADMM.

The mask is chosen by each spec's own rule (`spec.magnitude_mask`) applied to the OBS-scaled
weights `w_i / U_ii` (the OBS saliency is `w^2 / U_ii^2`):

- `NM(n, m)` and `VNM(v, n, m)`: at the first input of every group of `m`, from the current
  (already updated) weights of that group, as SparseGPT does for N:M;
- `Blocks(n, density)` and `Unstructured(density)`: at the start of every chunk, keeping that
  chunk's share of the layer's blocks (entries), so that the layer keeps exactly what
  `fromdense` keeps in number;
- int4 (`Int4(g)`, GPTQ): every entry kept, each group's scale `max |w| / 7` taken from the
  current weights at the group's first input; `Int4(g, sparsity=NM(2, 4))`: 2:4 as above, the
  scale over the entries the 2:4 rule keeps at the group's start.

References:
    Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
    One-Shot", ICML 2023. Frantar et al., "GPTQ: Accurate Post-Training Quantization for
    Generative Pre-trained Transformers", ICLR 2023. Hassibi & Stork, "Optimal Brain Surgeon",
    1993.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsparse import _validate as V
from jaxsparse.formats import _spec
from jaxsparse.formats.blocks import Blocks, _block_scores
from jaxsparse.formats.int4 import _QMIN, QMAX, Int4, Int4NMWeight, Int4Weight, rtn_scales
from jaxsparse.formats.nm import NM, NMSparse
from jaxsparse.formats.vnm import VNM
from jaxsparse.prune._patterns import Unstructured, as_pattern

_BLOCK_SIZE = 128  # Inputs per lazy-update chunk: the papers' default, a few hundred KB of W.
_STEP = 8  # Inputs per unrolled step when no mask group sets it.
#: Conjugate-gradient steps of the refit (see `_refit`): on all-MiniLM-L6-v2 (in 384 / 1536) the
#: 2:4 model's cosine to dense was 0.8995 / 0.9320 / 0.9322 / 0.9322 after 0 / 20 / 50 / 100.
_REFIT_STEPS = 50
#: Clipping factors an int4 group's scale is searched over (1.0 first: ties keep RTN's scale).
_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


class _Plan(NamedTuple):
    """Static choices of one solve (hashable: jit caches on it)."""

    spec: tuple  # The pattern or Int4 spec.
    chunks: tuple  # (start, size) of each lazy-update chunk, covering the padded inputs.
    step: int  # Inputs per loop step; mask groups and quantisation groups start on steps.
    group_mask: NM | VNM | None  # Chosen per `step` inputs from the current weights.
    chunk_quota: tuple | None  # Entries (Unstructured) or blocks (Blocks) each chunk keeps.
    quant_group: int | None  # Inputs per int4 scale; None without int4.
    static_scales: bool  # int4 scales taken before the solve, from the original weights.
    act_order: bool  # Inputs visited by decreasing diag(gram) (GPTQ's act-order).
    dtype: str  # The weight's dtype: int4 scales are rounded to it, as the format stores them.


# ====================================================================== public solvers
def sparsegpt(w, gram, spec, *, damp: float = 0.01, block_size: int = _BLOCK_SIZE,
              refit: int = _REFIT_STEPS):
    """Prune (and, for int4 + 2:4, quantise) one layer by SparseGPT/OBS.

    Args:
        w: the weight `[in, out]` (Flax's kernel orientation), float32/bfloat16/float16.
        gram: `[in, in]` the Gram matrix of the layer's inputs, `X^T X` summed over calibration
            tokens (any positive scale: it cancels). Symmetric positive semi-definite.
        spec: `jaxsparse.NM(n, m)`, `jaxsparse.VNM(v, n, m)`, `jaxsparse.Blocks(n, density)`,
            `jaxsparse.Int4(g, sparsity=jaxsparse.NM(2, 4))` (joint 2:4 + int4; a dense
            `Int4(g)` runs GPTQ), their strings (`"2:4"`, `"64:2:8"`), or
            `jaxsparse.prune.Unstructured(density)`.
        damp: dampening, as a fraction of the mean of `diag(gram)` added to the diagonal.
        block_size: inputs per lazy-update chunk (rounded to fit the spec's groups).
        refit: conjugate-gradient steps that re-solve the kept weights once the mask is chosen
            (the exact least-squares problem of the layer with the pruned entries held at zero,
            which the OBS sweep leaves unsolved; 0: the sweep's weights). On all-MiniLM-L6-v2's
            36 layers the 50 default steps cut the layers' errors ~30% and lift the 2:4 model's
            cosine to dense from 0.90 to 0.93. Sparse specs only: int4 + 2:4 keeps its values on
            the int4 grid.

    Returns:
        The format `spec` names (`NMSparse`, `VNMSparse`, `BlocksSparse`, `Int4NMWeight`,
        `Int4Weight`) in `w`'s dtype, ready for the layers; for `Unstructured`, a dense array of
        `w`'s shape and dtype with the pruned entries zero. The kept entries are the solver's
        (error-compensated) values, not `w`'s.

    Raises:
        TypeError / ValueError: a bad argument, named; a spec the shape cannot take; a
            non-finite `w` or `gram`; a `gram` that is not positive definite after dampening
            (checked when the arguments are concrete: under a trace the result is NaN).

    Example:
        >>> import jax, jax.numpy as jnp, jaxsparse as jsp
        >>> x = jax.random.normal(jax.random.key(0), (256, 16))
        >>> w = jax.random.normal(jax.random.key(1), (16, 8))
        >>> ws = jsp.prune.sparsegpt(w, x.T @ x, jsp.NM(2, 4))
        >>> type(ws).__name__, ws.shape
        ('NMSparse', (16, 8))
    """
    where = "jaxsparse.prune.sparsegpt"
    spec = as_pattern(spec, name="spec", where=where)
    V.check_int("refit", refit, low=0, high=2**31 - 1, where=where)
    if isinstance(spec, Int4) and spec.sparsity is None:  # Nothing to prune: GPTQ.
        return gptq(w, gram, spec, damp=damp, block_size=block_size)
    return _compress(w, gram, spec, damp, block_size, where, refit=refit)


def gptq(w, gram, spec, *, damp: float = 0.01, act_order: bool = True,
         block_size: int = _BLOCK_SIZE):
    """Quantise one layer to int4 by GPTQ (with `Int4(g, sparsity=NM(2, 4))`: 2:4 + int4).

    Args:
        w: the weight `[in, out]`, float32/bfloat16/float16.
        gram: `[in, in]`, `X^T X` of the layer's calibration inputs (see `sparsegpt`).
        spec: `jaxsparse.Int4(group_size, ...)` or its string (`"int4"`, `"int4:g64"`,
            `"int4:channel"`, `"int4:g128+2:4"`).
        damp: dampening, as a fraction of the mean of `diag(gram)`.
        act_order: for dense int4, visit the inputs by decreasing `diag(gram)` (GPTQ's
            act-order: the most active inputs are quantised first, while the most inputs are
            left to take their error), with every group's scale taken before the solve from
            the original weights (GPTQ's static groups, so that the groups stay the format's
            contiguous ones). 2:4 + int4 always visits the inputs in order.
        block_size: inputs per lazy-update chunk (rounded to fit the groups).

    Returns:
        `Int4Weight` (or `Int4NMWeight`) with GPTQ's codes (in [-8, 7]) and group scales, in
        `w`'s dtype. A group's scale is the clipped range `c * max |w| / 7` (`c` searched in
        [0.7, 1]) with the least squared rounding error of the group's weights: as the solver
        reaches the group, or from the original weights with `act_order`.

    Raises:
        TypeError / ValueError: as `sparsegpt`; a spec that is not int4.

    Example:
        >>> import jax, jax.numpy as jnp, jaxsparse as jsp
        >>> x = jax.random.normal(jax.random.key(0), (256, 64))
        >>> w = jax.random.normal(jax.random.key(1), (64, 8))
        >>> wq = jsp.prune.gptq(w, x.T @ x, jsp.Int4(32))
        >>> type(wq).__name__, wq.scales.shape
        ('Int4Weight', (2, 8))
    """
    where = "jaxsparse.prune.gptq"
    spec = as_pattern(spec, name="spec", where=where)
    if not isinstance(spec, Int4):
        raise TypeError(f"{where}: spec must be jaxsparse.Int4(group_size, ...) or its string "
                        f"('int4', 'int4:g64', 'int4:g128+2:4'); got {spec!r} (for pruning use "
                        "jaxsparse.prune.sparsegpt)")
    if not isinstance(act_order, bool):
        raise TypeError(f"{where}: act_order must be a bool; got {act_order!r}")
    return _compress(w, gram, spec, damp, block_size, where, act_order)


# ====================================================================== checks
def _check_inputs(w, gram, spec, damp, block_size, where):
    w = V.as_array("w", w, where=where)
    V.check_float_dtype("w", w.dtype, where=where)
    if w.ndim != 2:
        raise ValueError(f"{where}: w must be one layer's weight [in, out] (rank 2); got shape "
                         f"{tuple(w.shape)}")
    gram = V.as_array("gram", gram, where=where)
    if not jnp.issubdtype(gram.dtype, jnp.floating):
        raise TypeError(f"{where}: gram must be a float array [in, in]; got {gram.dtype.name}")
    if gram.shape != (w.shape[0],) * 2:
        raise ValueError(f"{where}: gram must be [in, in] = {(w.shape[0],) * 2} for w of shape "
                         f"{tuple(w.shape)} (X^T X of the layer's inputs); got "
                         f"{tuple(gram.shape)}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float, np.integer, np.floating)) \
            or not (math.isfinite(float(damp)) and float(damp) >= 0):
        raise ValueError(f"{where}: damp must be a finite float >= 0 (a fraction of the mean "
                         f"diagonal of gram); got {damp!r}")
    V.check_int("block_size", block_size, low=1, high=2**31 - 1, where=where)
    reason = _fits(spec, w.shape)
    if reason is not None:
        raise ValueError(f"{where}: spec {spec} does not fit w of shape {tuple(w.shape)}: "
                         f"{reason}")
    for name, a in (("w", w), ("gram", gram)):
        if V.is_concrete(a) and not bool(jnp.all(jnp.isfinite(a))):
            raise ValueError(f"{where}: {name} holds non-finite values (NaN or inf)")
    return w, gram


def _fits(spec, shape):
    if shape[0] == 0 or shape[1] == 0:
        return "the layer is empty"
    if isinstance(spec, Unstructured):
        return None
    return spec.fits_shape(shape)


# ====================================================================== driver
def _compress(w, gram, spec, damp, block_size, where, act_order=False, refit=0):
    w, gram = _check_inputs(w, gram, spec, damp, block_size, where)
    plan = _make_plan(spec, w.shape, w.dtype, block_size, act_order)
    order = None
    if plan.act_order:  # Stable: equal activity keeps the input order.
        order = jnp.argsort(-jnp.diagonal(gram).astype(jnp.float32), stable=True)
        gram = gram[order][:, order]
    u, dead = _inverse_factor(gram, jnp.float32(damp), plan.chunks[-1][0] + plan.chunks[-1][1])
    if V.is_concrete(u) and not bool(jnp.all(jnp.isfinite(u))):
        raise ValueError(f"{where}: gram is not positive definite after dampening with "
                         f"damp={damp} (its Cholesky factor is not finite): pass a Gram "
                         "matrix X^T X of real inputs, or a larger damp")
    w32 = w.astype(jnp.float32)
    q, mask, codes, scales = _solve(w32, u, dead, order, plan)
    if refit and codes is None:  # Quantised values stay on their grid.
        q = _refit(w32, gram, q, mask, jnp.float32(damp), refit)
    return _to_format(w, q, mask, codes, scales, spec)


def _make_plan(spec, shape, dtype, block_size, act_order=False) -> _Plan:
    k, out = shape
    group_mask = spec.sparsity if isinstance(spec, Int4) else spec
    group_mask = group_mask if isinstance(group_mask, (NM, VNM)) else None
    quant_group = spec.group_for(k) if isinstance(spec, Int4) else None
    act_order = bool(act_order) and quant_group is not None and group_mask is None
    static_scales = quant_group is not None and (act_order or (quant_group == k
                                                                and k > block_size))
    if group_mask is not None:
        step = group_mask.m
    else:
        step = _STEP if k % _STEP == 0 else 1
        if isinstance(spec, Blocks) and spec.stacked and (k // spec.shards) % step:
            step = 1  # Chunks start at every run of inputs.
    padded = -(-k // step) * step
    size = max(step, block_size // step * step)
    if quant_group is not None and not static_scales:
        # A scale group never straddles two chunks: its scale is taken from updated weights.
        size = quant_group * max(1, size // quant_group) if quant_group <= size else quant_group
    cuts = set(range(0, padded, size))
    if isinstance(spec, Blocks) and spec.stacked:  # A chunk never straddles two runs.
        cuts |= set(range(0, k, k // spec.shards))
    cuts = sorted(cuts) + [padded]
    chunks = tuple((a, b - a) for a, b in zip(cuts, cuts[1:]))
    quota = _chunk_quotas(spec, chunks, k, out) if group_mask is None else None
    return _Plan(spec, chunks, step, group_mask, quota, quant_group, static_scales, act_order,
                 jnp.dtype(dtype).name)


def _chunk_quotas(spec, chunks, k, out):
    """What each chunk keeps so that the layer keeps exactly what `fromdense` would (1xN with
    `shards`: what each chunk keeps in each run of block rows; with `split="in"`, each run of
    inputs keeps its share, spread over its chunks)."""
    if isinstance(spec, Unstructured):
        per_input, total = out, int(round(spec.density * k * out))
    elif isinstance(spec, Blocks) and spec.stacked:
        per_input, runs = -(-out // spec.n), spec.shards
        total = spec.kept_blocks(k, out) // runs
        width = k // runs
        quotas = []
        for run in range(runs):  # The chunks of run j lie in [j width, j width + width).
            mine = [(a - run * width, s) for a, s in chunks if run * width <= a < (run + 1) * width]
            quotas += _spread(total, mine, width)
        quotas += [0] * (len(chunks) - len(quotas))  # Chunks of the padding past k.
        assert all(0 <= q <= s * per_input for q, (_, s) in zip(quotas, chunks))
        return tuple(quotas)
    elif isinstance(spec, Blocks):
        per_input = -(-out // spec.n) // spec.shards
        total = spec.kept_blocks(k, out) // spec.shards
    else:
        return None
    quotas = _spread(total, chunks, k)
    assert all(0 <= q <= s * per_input for q, (_, s) in zip(quotas, chunks))
    return tuple(quotas)


def _spread(total: int, chunks, k: int) -> list:
    """`total` over `chunks` ((start, size) from 0, covering k) in proportion to their inputs,
    rounded so that the counts add up."""
    cuts = [min(total, math.floor(total * (a + s) / k + 0.5)) for a, s in chunks]
    cuts[-1] = total
    return np.diff([0, *cuts]).tolist()


def _damped(gram, damp):
    """`(H, dead)`: the symmetrised f32 Gram matrix with each dead input's (`H_ii = 0`) diagonal
    set to 1, plus `damp * mean(diag H) * I`; bool `dead [in]`."""
    k = gram.shape[0]
    h = gram.astype(jnp.float32)
    h = (h + h.T) * 0.5  # Sums in another order leave X^T X asymmetric by rounding.
    dead = jnp.diagonal(h) == 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
    return h + jnp.eye(k, dtype=jnp.float32) * (damp * jnp.mean(jnp.diagonal(h))), dead


@functools.partial(jax.jit, static_argnums=2)
def _inverse_factor(gram, damp, padded: int):
    """U (upper, `[padded, padded]`) with `U^T U = (H + damp * mean(diag H) * I)^-1`, H the
    Gram matrix with dead inputs set to 1 and padded by an identity; bool `dead [padded]`."""
    k = gram.shape[0]
    h, dead = _damped(gram, damp)
    h = jnp.pad(h, [(0, padded - k)] * 2) + jnp.diag(jnp.arange(padded) >= k).astype(h.dtype)
    lower = jnp.linalg.cholesky(h)
    h_inv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(padded, dtype=jnp.float32))
    u = jnp.linalg.cholesky((h_inv + h_inv.T) * 0.5).T
    return u, jnp.pad(dead, (0, padded - k))


# ====================================================================== the solve
@functools.partial(jax.jit, static_argnums=4)
def _solve(w, u, dead, order, plan: _Plan):
    """`(q, mask, codes, scales)`: the compressed weight `[in, out]` f32, its mask, and for
    int4 its codes (int8) and scales `[in/g, out]` f32 (else None). With `order` (act-order),
    `u` and `dead` are in that order of the inputs, `w` and the results in the original one."""
    k, out = w.shape
    padded = u.shape[0]
    if order is not None:
        w = w[order]
    w = jnp.pad(jnp.where(dead[:k, None], 0.0, w), [(0, padded - k), (0, 0)])
    static, row_scales = None, None
    if plan.static_scales:
        static, row_scales = _static_scales(w, u, order, plan)
    q_rows, mask_rows, code_rows, scale_rows = [], [], [], []
    for c, (a, size) in enumerate(plan.chunks):
        b = a + size
        u_chunk = u[a:b, a:b]
        chunk_mask = _chunk_mask(w[a:b], jnp.diagonal(u_chunk), plan, c)
        rows = None if row_scales is None else row_scales[a:b]
        q, mask, codes, scales, err = _solve_chunk(w[a:b], u_chunk, chunk_mask, rows, plan)
        # The lazy update: the later inputs get the chunk's errors at once.
        w = w.at[b:].add(-(u[a:b, b:].T @ err)) if b < padded else w
        q_rows.append(q), mask_rows.append(mask), code_rows.append(codes)
        scale_rows.append(scales)
    q, mask = _unpermute(jnp.concatenate(q_rows)[:k], order), _unpermute(
        jnp.concatenate(mask_rows)[:k], order)
    if plan.quant_group is None:
        return q, mask, None, None
    codes = _unpermute(jnp.concatenate(code_rows)[:k], order)
    scales = static if plan.static_scales else jnp.concatenate(scale_rows)
    return q, mask, codes, scales


def _unpermute(a, order):
    return a if order is None else jnp.zeros_like(a).at[order].set(a)


# ====================================================================== the refit
@functools.partial(jax.jit, static_argnums=5)
def _refit(w, gram, q, mask, damp, steps: int):
    """The kept weights re-solved for the chosen mask: `[in, out]` f32.

    Each output column `o` has its own least-squares problem once the mask is fixed: minimise
    `(w - q)^T H (w - q)` (H damped as for the solve) over `q` with `q_i = 0` off the mask, whose
    optimum solves `H_SS q_S = (H w)_S` on the kept inputs S. The OBS sweep does not reach it:
    input i's error is spread only over the inputs after i, and the later groups' masks are
    chosen from weights that later errors still change. Here `steps` conjugate-gradient steps on
    the masked system run from the sweep's `q` for every column at once (one `[in, in] @ [in,
    out]` product per step, the columns' step sizes a vector). A column keeps the sweep's `q`
    unless the result is better, so the refit never loses (nor moves a planted exact solution:
    its residual is zero)."""
    h, dead = _damped(gram, damp)
    w = jnp.where(dead[:, None], 0.0, w)
    keep = mask.astype(jnp.float32)
    start = q * keep
    tiny = jnp.float32(1e-30)

    def step(_, carry):
        q, r, p, rr = carry
        hp = keep * (h @ p)
        alpha = rr / jnp.maximum(jnp.sum(p * hp, axis=0), tiny)
        q, r = q + alpha * p, r - alpha * hp
        rr_next = jnp.sum(r * r, axis=0)
        return q, r, r + (rr_next / jnp.maximum(rr, tiny)) * p, rr_next

    residual = keep * (h @ (w - start))  # Minus the gradient, on the kept entries.
    q, *_ = lax.fori_loop(0, steps, step, (start, residual, residual,
                                           jnp.sum(residual * residual, axis=0)))

    def error(q):
        return jnp.sum((w - q) * (h @ (w - q)), axis=0)

    return jnp.where(error(q) < error(start), q, start)


def _static_scales(w, u, order, plan: _Plan):
    """Every group's scale before the solve, from the original (dead-zeroed) weights of the
    format's contiguous groups: `(scales [in/g, out], row_scales [in, out])`, the scale of
    each input in the visiting order. (int4 needs no padding: `in` is a multiple of the group,
    a multiple of 8, and the solver's step is 4 or 8.)"""
    group = plan.quant_group
    k, out = w.shape
    original = _unpermute(w[:k], order)
    d = _unpermute(jnp.diagonal(u)[:k], order)
    groups = original.reshape(k // group, group, out)
    scales = jax.vmap(lambda rows, rows_d: _group_scale(rows, rows_d, plan))(
        groups, d.reshape(k // group, group))
    visit = jnp.arange(k) if order is None else order
    return scales, scales[visit // group]


def _solve_chunk(w, u, chunk_mask, row_scales, plan: _Plan):
    """Visit the chunk's inputs in order, `plan.step` at a time; returns the chunk's `q`, mask,
    codes, scales (one row per quantisation group starting in it) and OBS errors. With
    `row_scales` (static scales), each input's scale is given."""
    size, out = w.shape
    step, group = plan.step, plan.quant_group
    n_scales = 0 if group is None or plan.static_scales else size // group
    carry = dict(
        w=w, q=jnp.zeros_like(w), err=jnp.zeros_like(w), mask=jnp.zeros(w.shape, jnp.bool_),
        codes=jnp.zeros(w.shape, jnp.int8), scale=jnp.zeros((out,), jnp.float32),
        scales=jnp.zeros((max(n_scales, 1), out), jnp.float32),
    )
    d = jnp.diagonal(u)

    def visit(s, carry):
        start = s * step
        rows_w = lax.dynamic_slice_in_dim(carry["w"], start, step)
        rows_d = lax.dynamic_slice_in_dim(d, start, step)
        if plan.group_mask is not None:
            keep = plan.group_mask.magnitude_mask(rows_w / rows_d[:, None])
        else:
            keep = lax.dynamic_slice_in_dim(chunk_mask, start, step)
        if n_scales:
            carry = lax.cond(start % group == 0, lambda c: _new_scale(c, start, d, plan),
                             lambda c: c, carry)
        for j in range(step):
            if row_scales is not None:
                carry["scale"] = row_scales[start + j]
            carry = _visit_input(carry, u, start + j, keep[j], plan)
        carry["mask"] = lax.dynamic_update_slice_in_dim(carry["mask"], keep, start, 0)
        return carry

    carry = lax.fori_loop(0, size // step, visit, carry)
    scales = carry["scales"][:n_scales] if n_scales else None
    return carry["q"], carry["mask"], carry["codes"], scales, carry["err"]


def _visit_input(carry, u, i, keep, plan: _Plan):
    """Fix input `i` of the chunk to its compressed row and spread the error over the later
    inputs: `W[i:] -= U[i, i:]^T (w_i - q_i) / U_ii` (U's row is zero before `i`)."""
    w_i, u_i = carry["w"][i], u[i]
    if plan.quant_group is None:
        q_i, codes = jnp.where(keep, w_i, 0.0), None
    else:
        codes = _quantize(w_i, carry["scale"])
        codes = jnp.where(keep, codes, 0)
        q_i = codes.astype(jnp.float32) * carry["scale"]
        carry["codes"] = carry["codes"].at[i].set(codes.astype(jnp.int8))
    err = (w_i - q_i) / u_i[i]
    carry["w"] = carry["w"] - u_i[:, None] * err[None, :]
    carry["q"] = carry["q"].at[i].set(q_i)
    carry["err"] = carry["err"].at[i].set(err)
    return carry


# ====================================================================== masks and scales
def _chunk_mask(w, d, plan: _Plan, chunk: int):
    """The mask of a chunk chosen at its start (Unstructured, Blocks); all kept otherwise."""
    if plan.chunk_quota is None:
        return jnp.ones(w.shape, jnp.bool_)
    quota = plan.chunk_quota[chunk]
    scaled = w / d[:, None]
    if isinstance(plan.spec, Blocks):
        n, shards = plan.spec.n, 1 if plan.spec.stacked else plan.spec.shards
        score = jnp.swapaxes(_block_scores(scaled, n), 0, 1)  # [rows, out/n]: w^2/d^2 summed
        runs = jnp.swapaxes(score.reshape(score.shape[0], shards, -1), 0, 1)
        kept = jax.vmap(lambda run: _top(run, quota))(runs)  # Each run of block rows its own.
        kept = jnp.swapaxes(kept, 0, 1).reshape(score.shape)
        return jnp.repeat(kept, n, axis=1)[:, : w.shape[1]]
    return _top(scaled * scaled, quota)


def _top(score, k: int):
    """bool of `score`'s shape: its `k` largest entries (ties: the lower flat index)."""
    flat = score.reshape(-1)
    if k == 0:
        return jnp.zeros(score.shape, jnp.bool_)
    _, ids = lax.top_k(flat, k)
    return jnp.zeros(flat.shape, jnp.bool_).at[ids].set(True).reshape(score.shape)


def _new_scale(carry, start, d, plan: _Plan):
    """At the first input of a quantisation group: its scales from the current weights."""
    group = plan.quant_group
    rows = lax.dynamic_slice_in_dim(carry["w"], start, group)
    rows_d = lax.dynamic_slice_in_dim(d, start, group)
    scale = _group_scale(rows, rows_d, plan)
    carry = dict(carry)
    carry["scale"] = scale
    carry["scales"] = lax.dynamic_update_slice_in_dim(carry["scales"], scale[None],
                                                      start // group, 0)
    return carry


def _group_scale(rows, rows_d, plan: _Plan):
    """Each output's scale over the group's rows (for 2:4 + int4, over the entries the 2:4 rule
    keeps now): of the clipped ranges `c * max |w| / 7`, `c` in `_CLIP_GRID`, the one with the
    least squared rounding error of the group (GPTQ's `mse` grid search; `c = 1` is RTN's
    scale). Rounded to the weight's dtype as the format stores it: the codes are computed
    against the stored scale, so dequantisation gives what the solver assumed."""
    if plan.group_mask is not None:
        rows = jnp.where(plan.group_mask.magnitude_mask(rows / rows_d[:, None]), rows, 0.0)
    amax = jnp.max(jnp.abs(rows), axis=0)
    candidates = rtn_scales(amax[None], jnp.asarray(_CLIP_GRID, jnp.float32)[:, None])
    candidates = candidates.astype(plan.dtype).astype(jnp.float32)  # [C, out]
    codes = jax.vmap(lambda scale: _quantize(rows, scale))(candidates)  # [C, g, out]
    errors = jnp.sum((codes * candidates[:, None] - rows[None]) ** 2, axis=1)  # [C, out]
    return jnp.take_along_axis(candidates, jnp.argmin(errors, axis=0)[None], axis=0)[0]


def _quantize(w_i, scale):
    safe = jnp.where(scale == 0, 1.0, scale)
    return jnp.clip(jnp.round(w_i / safe), _QMIN, QMAX).astype(jnp.int32)


# ====================================================================== formats out
def _to_format(w, q, mask, codes, scales, spec):
    dtype = w.dtype
    if isinstance(spec, Unstructured):
        return jnp.where(mask, q, 0.0).astype(dtype)
    if not isinstance(spec, Int4):
        return _spec.frommask(q.astype(dtype), mask, spec)
    kw = dict(group_size=spec.group_size)
    if spec.sparsity is None:
        return Int4Weight.from_codes(codes, scales.astype(dtype), activations=spec.activations,
                                     **kw)
    kept = NMSparse.frommask(codes.astype(jnp.float32), mask, n=2, m=4)
    return Int4NMWeight.from_codes(jnp.swapaxes(kept.values, 0, 1).astype(jnp.int8),
                                   jnp.swapaxes(kept.indices, 0, 1), scales.astype(dtype), **kw)
