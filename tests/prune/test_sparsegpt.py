"""SparseGPT/OBS and GPTQ for one layer: against a plain OBS reference (explicit inverses, float64,
no lazy updates), planted solutions recovered exactly, better than magnitude/RTN, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp
from jaxsparse import prune
from tests._check import once_after

UNSTRUCTURED = prune.Unstructured(0.375)
SPECS = [jsp.NM(2, 4), jsp.NM(1, 4), jsp.VNM(16, 2, 8), jsp.Blocks(4, density=0.5), UNSTRUCTURED,
         jsp.Int4(16), jsp.Int4(16, sparsity=jsp.NM(2, 4)), jsp.Int4(None)]


def correlated_inputs(seed, tokens, k):
    """Calibration inputs with correlated features and uneven scales, as real activations have."""
    rng = np.random.default_rng(seed)
    mix = np.eye(k) + 0.6 * rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((tokens, k)) @ mix * rng.uniform(0.3, 3.0, k)
    return jnp.asarray(x, jnp.float32)


def layer(seed, k, out, tokens=512):
    x = correlated_inputs(seed, tokens, k)
    w = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((k, out)), jnp.float32)
    return x, w, x.T @ x


def relative_error(x, w, q):
    x, w, q = (np.asarray(a, np.float64) for a in (x, w, q))
    return float(np.sum((x @ (w - q)) ** 2) / np.sum((x @ w) ** 2))


def dense(result):
    return np.asarray(result if isinstance(result, jax.Array) else result.todense(), np.float64)


# ---------------------------------------------------------------------- the reference
def reference_obs(w, gram, spec, damp=0.01, block_size=128, act_order=True):
    """SparseGPT/GPTQ spelled out: at input i, `Hinv_i = inv(H[i:, i:])` explicitly, the OBS update
    `W[i:] -= Hinv_i[0]^T (w_i - q_i) / Hinv_i[0, 0]`, no lazy batching. The mask rules are the
    specs' own (`magnitude_mask` on `w / sqrt(Hinv_i[0, 0])`), chosen where the module docstring
    says: per group of m for N:M / V:N:M, per chunk of `block_size` (the solver's chunks) for the
    others. With act-order (dense int4), the inputs are visited by decreasing diag(H) with the
    groups' scales taken first from the original weights."""
    w = np.array(w, np.float64)
    k, out = w.shape
    h = np.array(gram, np.float64)
    plan = prune._sparsegpt._make_plan(spec, w.shape, jnp.float32, block_size, act_order)
    order = np.arange(k)
    if plan.act_order:
        order = np.argsort(-np.diag(np.asarray(gram, np.float32)), kind="stable")
    static = None
    if plan.static_scales:  # From the original, dead-zeroed weights, per contiguous group.
        g = plan.quant_group
        live = np.where((np.diag(h) == 0)[:, None], 0.0, w)
        sparsity = spec.sparsity
        static = np.stack([scales_of(live[i:i + g], np.ones(g), sparsity) for i in range(0, k, g)])
    w, h = w[order], h[order][:, order]
    h = (h + h.T) / 2
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += np.eye(k) * damp * np.mean(np.diag(h))
    m = plan.step
    padded = plan.chunks[-1][0] + plan.chunks[-1][1]
    h = np.pad(h, [(0, padded - k)] * 2) + np.diag(np.arange(padded) >= k)
    w = np.pad(w, [(0, padded - k), (0, 0)])
    d = np.array([np.sqrt(np.linalg.inv(h[i:, i:])[0, 0]) for i in range(padded)])
    q = np.zeros_like(w)
    mask = np.ones(w.shape, bool)
    group = plan.quant_group
    sparsity = spec.sparsity if isinstance(spec, jsp.Int4) else spec
    scale = None
    for c, (a, size) in enumerate(plan.chunks):
        if plan.chunk_quota is not None:
            mask[a:a + size] = chunk_mask(w[a:a + size] / d[a:a + size, None], spec,
                                          plan.chunk_quota[c])
        for i in range(a, a + size):
            if plan.group_mask is not None and i % m == 0:
                mask[i:i + m] = np.asarray(plan.group_mask.magnitude_mask(
                    jnp.asarray(w[i:i + m] / d[i:i + m, None], jnp.float32)))
            if static is not None and i < k:
                scale = static[order[i] // group]
            elif group is not None and i % group == 0:
                scale = scales_of(w[i:i + group], d[i:i + group], sparsity)
            row = w[i] if group is None else quantized(w[i], scale)
            q[i] = np.where(mask[i], row, 0.0)
            hinv = np.linalg.inv(h[i:, i:])
            w[i:] -= np.outer(hinv[0] / hinv[0, 0], w[i] - q[i])
    back = np.empty_like(order)
    back[order] = np.arange(k)
    return q[:k][back], mask[:k][back]


def chunk_mask(scaled, spec, quota):
    if isinstance(spec, jsp.Blocks):
        n = spec.n
        rows = -(-scaled.shape[1] // n)
        padded = np.pad(scaled, [(0, 0), (0, rows * n - scaled.shape[1])])
        score = (padded.reshape(len(scaled), rows, n) ** 2).sum(-1)
    else:
        score = scaled ** 2
    keep = np.zeros(score.size, bool)
    keep[np.argsort(-score.ravel(), kind="stable")[:quota]] = True
    keep = keep.reshape(score.shape)
    if isinstance(spec, jsp.Blocks):
        keep = np.repeat(keep, spec.n, axis=1)[:, : scaled.shape[1]]
    return keep


def scales_of(rows, d, sparsity):
    """Per output, the clipped scale `c * max|w| / 7` (c from 1 down to 0.7) with the least
    squared rounding error of the group (the first such c on ties)."""
    if sparsity is not None:
        kept = np.asarray(sparsity.magnitude_mask(jnp.asarray(rows / d[:, None], jnp.float32)))
        rows = np.where(kept, rows, 0.0)
    full = np.abs(rows).max(axis=0).astype(np.float32) / np.float32(7)
    best, best_error = None, None
    for clip in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7):
        scale = (np.float32(clip) * full).astype(np.float32)
        error = ((quantized(rows, scale) - rows) ** 2).sum(axis=0)
        if best is None:
            best, best_error = scale, error
        else:
            better = error < best_error
            best, best_error = np.where(better, scale, best), np.where(better, error, best_error)
    return best


def quantized(row, scale):
    safe = np.where(scale == 0, 1.0, scale)
    return np.clip(np.round(row / safe), -8, 7) * scale


def solve(w, gram, spec, **kw):
    if isinstance(spec, jsp.Int4) and spec.sparsity is None:
        return prune.gptq(w, gram, spec, **kw)
    return prune.sparsegpt(w, gram, spec, **kw)


def sweep(w, gram, spec, **kw):
    """The OBS sweep alone (no refit): what the plain reference computes."""
    if isinstance(spec, jsp.Int4):
        return solve(w, gram, spec, **kw)
    return prune.sparsegpt(w, gram, spec, refit=0, **kw)


def masked_optimum(w, gram, mask, damp=0.01):
    """Per output, the exact minimiser of `(w - q)^T H (w - q)` with `q = 0` off the mask (H damped
    as the solver damps it), in float64: `H_SS q_S = (H w)_S`."""
    h = np.array(gram, np.float64)
    h = (h + h.T) / 2
    h += np.eye(len(h)) * damp * np.mean(np.diag(h))
    w = np.asarray(w, np.float64)
    q = np.zeros_like(w)
    for o in range(w.shape[1]):
        kept = np.flatnonzero(mask[:, o])
        q[kept, o] = np.linalg.solve(h[np.ix_(kept, kept)], (h @ w[:, o])[kept])
    return q


# ---------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("k,out,block_size", once_after([(64, 24, 128), (96, 20, 32)]))
def test_matches_the_plain_obs_reference(spec, k, out, block_size):
    x, w, gram = layer(0, k, out)
    got = sweep(w, gram, spec, block_size=block_size)
    want, want_mask = reference_obs(w, gram, spec, block_size=block_size)
    np.testing.assert_array_equal(dense(got) != 0, want_mask & (want != 0))
    np.testing.assert_allclose(dense(got), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


@pytest.mark.parametrize("spec", [jsp.NM(2, 4), jsp.NM(3, 8), jsp.VNM(16, 2, 8)], ids=str)
def test_ragged_inputs_match_the_reference(spec):
    x, w, gram = layer(1, 30, 17)
    got = prune.sparsegpt(w, gram, spec, block_size=8, refit=0)
    want, _ = reference_obs(w, gram, spec, block_size=8)
    assert got.shape == w.shape
    np.testing.assert_allclose(dense(got), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


# ---------------------------------------------------------------------- planted solutions
def planted_layer(seed, k, out, kept_rows, group, tokens=400):
    """Inputs where every pruned input is a combination of later kept ones of its `group`, so
    that the pruned rows' weights can move onto kept rows with no change in `x @ w`: OBS must
    find exactly that sparse weight (`kept_rows` gets `w_K + C w_P`, the rest 0). The weights'
    magnitudes are in [0.5, 1.5], so that the mask is decided by the second-order scores (a
    pruned input's is ~sqrt(damp) of a kept one's), not by a near-zero weight."""
    rng = np.random.default_rng(seed)
    kept_rows = np.asarray(kept_rows)
    pruned = np.setdiff1d(np.arange(k), kept_rows)
    x = np.zeros((tokens, k))
    x[:, kept_rows] = rng.standard_normal((tokens, len(kept_rows)))
    mix = rng.standard_normal((len(kept_rows), len(pruned)))
    # Only later inputs can take a pruned input's error; within its group, so that a kept
    # weight is still its own when its group's mask is chosen.
    mix *= (kept_rows[:, None] > pruned[None, :]) & (
        kept_rows[:, None] // group == pruned[None, :] // group)
    x[:, pruned] = x[:, kept_rows] @ mix
    w = rng.uniform(0.5, 1.5, (k, out)) * rng.choice([-1.0, 1.0], (k, out))
    solution = np.zeros_like(w)
    solution[kept_rows] = w[kept_rows] + mix @ w[pruned]
    return jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), solution


@pytest.mark.parametrize("spec,kept,group", [
    (jsp.NM(2, 4), lambda k: [i for i in range(k) if i % 4 >= 2], 4),
    (jsp.VNM(16, 2, 8), lambda k: [i for i in range(k) if i % 8 >= 6], 8),
    (jsp.Blocks(8, density=0.5), lambda k: list(range(1, k, 2)), 2),
    (prune.Unstructured(0.5), lambda k: list(range(1, k, 2)), 2),
], ids=["2:4", "16:2:8", "1x8", "unstructured"])
def test_planted_sparse_solution_is_recovered(spec, kept, group):
    k, out = 32, 16
    x, w, solution = planted_layer(2, k, out, kept(k), group)
    got = dense(prune.sparsegpt(w, x.T @ x, spec, damp=1e-5))
    np.testing.assert_array_equal(got != 0, solution != 0)
    np.testing.assert_allclose(got, solution, atol=2e-3 * np.abs(solution).max())
    assert relative_error(x, w, got) < 1e-5
    magnitude = np.asarray(jsp.fromdense(w, spec).todense()) if not isinstance(
        spec, prune.Unstructured) else np.where(prune.magnitude_mask(w, spec), w, 0)
    assert relative_error(x, w, magnitude) > 0.05


@pytest.mark.parametrize("spec", [jsp.Int4(32), jsp.Int4(None), jsp.Int4(32, jsp.NM(2, 4))],
                         ids=str)
def test_weights_already_in_the_format_come_back_unchanged(spec):
    x, w, gram = layer(3, 64, 16)
    exact = jsp.fromdense(w, spec)  # Codes with a 7 in every group: the scales reproduce
    got = solve(exact.todense(), gram, spec)  # (to an ulp: 7 * s / 7 rounds in f32).
    np.testing.assert_allclose(got.scales, exact.scales, rtol=2e-7)
    if spec.sparsity is None:
        np.testing.assert_array_equal(got.qweight, exact.qweight)
    else:  # A kept code 0 ties with the pruned zeros: its position may differ, not its value.
        np.testing.assert_allclose(got.todense(), exact.todense(), rtol=4e-7, atol=0)


@pytest.mark.parametrize("spec", [jsp.NM(2, 4), jsp.VNM(16, 2, 8), jsp.Blocks(4, density=0.25)],
                         ids=str)
def test_weights_already_sparse_come_back_unchanged(spec):
    x, w, gram = layer(4, 64, 32)
    sparse = jsp.fromdense(w, spec).todense()
    np.testing.assert_array_equal(prune.sparsegpt(sparse, gram, spec).todense(), sparse)


# ---------------------------------------------------------------------- the refit
@pytest.mark.parametrize("spec", [jsp.NM(2, 4), jsp.NM(1, 4), jsp.VNM(16, 2, 8),
                                  jsp.Blocks(4, density=0.5), UNSTRUCTURED], ids=str)
def test_refit_reaches_the_least_squares_optimum_of_the_sweeps_mask(spec):
    x, w, gram = layer(13, 64, 24)
    swept = dense(prune.sparsegpt(w, gram, spec, refit=0))
    got = dense(prune.sparsegpt(w, gram, spec))
    np.testing.assert_array_equal(got != 0, swept != 0)  # The same mask,
    want = masked_optimum(w, gram, swept != 0)  # its optimal weights,
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    # and so a smaller reconstruction error than the sweep's.
    assert relative_error(x, w, got) < 0.98 * relative_error(x, w, swept)


def test_refit_leaves_int4_codes_on_their_grid():
    x, w, gram = layer(14, 64, 16)
    spec = jsp.Int4(32, sparsity=jsp.NM(2, 4))
    np.testing.assert_array_equal(dense(prune.sparsegpt(w, gram, spec)),
                                  dense(prune.sparsegpt(w, gram, spec, refit=0)))


# ---------------------------------------------------------------------- better than one-shot baselines
@pytest.mark.parametrize("spec", [jsp.NM(2, 4), jsp.VNM(16, 2, 8), jsp.Blocks(8, density=0.5),
                                  prune.Unstructured(0.5), jsp.Int4(32, jsp.NM(2, 4))], ids=str)
def test_sparsegpt_beats_magnitude(spec):
    x, w, gram = layer(5, 128, 48)
    if isinstance(spec, prune.Unstructured):
        baseline = np.where(prune.magnitude_mask(w, spec), w, 0)
    else:
        baseline = jsp.fromdense(w, spec).todense()
    got = relative_error(x, w, dense(prune.sparsegpt(w, gram, spec)))
    assert got < 0.85 * relative_error(x, w, baseline)


@pytest.mark.parametrize("spec", [jsp.Int4(32), jsp.Int4(128), jsp.Int4(None)], ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_gptq_beats_rtn(spec, dtype):
    x, w, gram = layer(6, 256, 32)
    w = w.astype(dtype)
    got = prune.gptq(w, gram, spec)
    assert got.dtype == dtype and got.scales.dtype == dtype
    rtn = jsp.fromdense(w, spec).todense()
    assert relative_error(x, w, got.todense()) < 0.7 * relative_error(x, w, rtn)


def test_results_serve_the_layers_in_the_weights_dtype():
    x, w, gram = layer(7, 64, 32)
    for spec in SPECS[:4]:
        ws = prune.sparsegpt(w.astype(jnp.bfloat16), gram, spec)
        if isinstance(spec, prune.Unstructured):
            continue
        assert ws.dtype == jnp.bfloat16 and type(ws) is spec.format
        np.testing.assert_allclose(np.asarray(x[:4].astype(jnp.bfloat16) @ ws, np.float32),
                                   np.asarray(x[:4] @ ws.todense().astype(jnp.float32)),
                                   rtol=3e-2, atol=3e-2 * 8)


def test_dead_inputs_are_pruned_and_the_rest_solved():
    x, w, _ = layer(8, 32, 8)
    x = x.at[:, 5].set(0.0).at[:, 17].set(0.0)
    got = dense(prune.sparsegpt(w, x.T @ x, jsp.NM(2, 4)))
    assert np.all(got[[5, 17]] == 0) and np.all(np.isfinite(got))
    assert np.all((got != 0).reshape(8, 4, 8).sum(1) <= 2)


def test_under_jit_matches_eager():
    x, w, gram = layer(9, 32, 8)
    solve_jit = jax.jit(lambda w, g: prune.sparsegpt(w, g, jsp.NM(2, 4)).todense())
    np.testing.assert_allclose(solve_jit(w, gram), prune.sparsegpt(w, gram, "2:4").todense(),
                               rtol=1e-5, atol=1e-5)


def test_chunk_quotas_keep_what_fromdense_keeps():
    x, w, gram = layer(10, 100, 13)
    for spec in (jsp.Blocks(4, density=0.3), prune.Unstructured(0.3)):
        got = dense(prune.sparsegpt(w, gram, spec, block_size=24))
        want = jsp.fromdense(w, spec).todense() if isinstance(spec, jsp.Blocks) else \
            prune.magnitude_mask(w, spec)
        assert np.count_nonzero(got) <= np.count_nonzero(want)
        if isinstance(spec, jsp.Blocks):
            kept = prune.sparsegpt(w, gram, spec, block_size=24)
            assert kept.values.shape == jsp.fromdense(w, spec).values.shape


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case,error,match", [
    (lambda w, g: prune.sparsegpt(w, g[:-1], "2:4"), ValueError, "gram must be"),
    (lambda w, g: prune.sparsegpt(w, g.at[0, 0].set(jnp.nan), "2:4"), ValueError,
     "gram holds non-finite"),
    (lambda w, g: prune.sparsegpt(w.at[1, 1].set(jnp.inf), g, "2:4"), ValueError,
     "w holds non-finite"),
    (lambda w, g: prune.sparsegpt(w, -g, "2:4"), ValueError, "not positive definite"),
    (lambda w, g: prune.sparsegpt(w, jnp.ones_like(g), "2:4", damp=0.0), ValueError,
     "not positive definite"),
    (lambda w, g: prune.sparsegpt(w, g, "2:4", damp=-0.1), ValueError, "damp must be"),
    (lambda w, g: prune.sparsegpt(w, g, "2:4", block_size=0), ValueError, "block_size"),
    (lambda w, g: prune.sparsegpt(w[None], g, "2:4"), ValueError, "rank 2"),
    (lambda w, g: prune.sparsegpt(w.astype(jnp.int32), g, "2:4"), TypeError, "w must have"),
    (lambda w, g: prune.sparsegpt(w, g.astype(jnp.int32), "2:4"), TypeError, "gram must be"),
    (lambda w, g: prune.sparsegpt(w, g, "3:2"), ValueError,
     r"^jaxsparse\.prune\.sparsegpt: spec: n must be"),
    (lambda w, g: prune.sparsegpt(w, g, 0.5), TypeError, "Unstructured"),
    (lambda w, g: prune.sparsegpt(w[:2], g[:2, :2], "2:4"), ValueError, "does not fit"),
    (lambda w, g: prune.gptq(w, g, "2:4"), TypeError, "jaxsparse.Int4"),
    (lambda w, g: prune.gptq(w, g, jsp.Int4(64)), ValueError, "group_size=64"),
    (lambda w, g: prune.gptq(w, g, jsp.Int4(8), act_order=1), TypeError, "act_order"),
    (lambda w, g: prune.sparsegpt(w, g, "2:4", refit=-1), ValueError, "refit"),
    (lambda w, g: prune.sparsegpt(w, g, "2:4", refit=2.5), TypeError, "refit"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_is_named(case, error, match):
    x, w, gram = layer(11, 40, 8)
    with pytest.raises(error, match=match):
        case(w, gram)


@pytest.mark.parametrize("spec", [jsp.Int4(16), jsp.Int4(None)], ids=str)
def test_gptq_in_input_order_matches_the_reference(spec):
    x, w, gram = layer(12, 96, 20)
    got = prune.gptq(w, gram, spec, act_order=False, block_size=32)
    want, _ = reference_obs(w, gram, spec, block_size=32, act_order=False)
    np.testing.assert_allclose(dense(got), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_a_1xn_spec_with_shards_keeps_each_runs_share_and_still_beats_magnitude():
    # Column-parallel 1xN (Blocks(..., shards=s)): every chunk's choice is made per run of block
    # rows, so the layer comes back balanced (the constructor checks it) at the same count.
    x, w, gram = layer(6, 64, 128)
    spec = jsp.Blocks(16, 0.25, shards=4)
    got = prune.sparsegpt(w, gram, spec)
    assert got.spec == spec
    np.testing.assert_array_equal(np.diff(np.asarray(got.indptr)[::2]), [32] * 4)
    magnitude = jsp.fromdense(w, spec).todense()
    assert relative_error(x, w, dense(got)) < relative_error(x, w, magnitude)


@pytest.mark.parametrize("inputs", (64, 60))  # Runs of 16 inputs; of 15 (one input a step).
def test_a_1xn_spec_split_by_inputs_keeps_each_input_runs_share_and_beats_magnitude(inputs):
    # Row-parallel 1xN (Blocks(..., shards=s, split="in")): chunks end at every run of inputs and
    # share out that run's count, so the layer comes back stacked and balanced.
    x, w, gram = layer(6, inputs, 128)
    spec = jsp.Blocks(16, 0.25, shards=4, split="in")
    got = prune.sparsegpt(w, gram, spec, block_size=24)  # Chunks that straddle run edges.
    assert got.spec == spec and got.stacked
    kept = spec.kept_blocks(inputs, 128) // 4
    np.testing.assert_array_equal(np.diff(np.asarray(got.indptr)[::8]), [kept] * 4)
    magnitude = jsp.fromdense(w, spec).todense()
    assert relative_error(x, w, dense(got)) < relative_error(x, w, magnitude)
