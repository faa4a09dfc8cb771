"""The 1xN format's own rules: global block-norm selection, the partial last block row, the
BSR structure checks, mask checks and the spec's parsing. The generic behaviour (round trips,
products, gradients, layers, checkpoints) is in test_conformance.py."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp


def dense(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def test_fromdense_keeps_the_blocks_of_largest_norm_across_the_whole_weight():
    w = dense((32, 48), seed=1)
    spec = jsp.Blocks(16, density=0.25)
    ws = jsp.fromdense(w, spec)
    norms = np.asarray(jnp.sum(w.reshape(32, 3, 16) ** 2, axis=-1))  # [in, R]
    kept = np.asarray(ws.block_mask())
    assert kept.sum() == spec.kept_blocks(32, 48) == 24
    assert norms[kept].min() >= norms[~kept].max()
    # Rows keep as many blocks as their norms earn: not necessarily equal counts.
    np.testing.assert_array_equal(np.diff(np.asarray(ws.indptr)), kept.sum(axis=0))


def test_shards_keep_equal_counts_of_each_runs_largest_blocks():
    w = dense((32, 128), seed=9)
    spec = jsp.Blocks(16, density=0.25)
    ws = jsp.BlocksSparse.fromdense(w, n=16, density=0.25, shards=4)
    assert ws.shards == 4 and ws.values.shape == (64, 16)
    np.testing.assert_array_equal(np.asarray(ws.indptr)[::2], [0, 16, 32, 48, 64])
    norms = np.asarray(jnp.sum(w.reshape(32, 8, 16) ** 2, axis=-1))  # [in, R]
    kept = np.asarray(ws.block_mask())
    for run in range(4):  # Each run of 2 block rows keeps its own 16 largest.
        cols = slice(2 * run, 2 * run + 2)
        assert kept[:, cols].sum() == 16
        assert norms[:, cols][kept[:, cols]].min() >= norms[:, cols][~kept[:, cols]].max()
    np.testing.assert_array_equal(ws.todense(), jnp.where(ws.mask(), w, 0))
    # One run is the whole-matrix choice; the static field survives pytrees and replace.
    whole = jsp.BlocksSparse.fromdense(w, n=16, density=0.25, shards=1)
    np.testing.assert_array_equal(whole.indices, jsp.fromdense(w, spec).indices)
    flat, tree = jax.tree.flatten(ws)
    assert jax.tree.unflatten(tree, flat).shards == 4 and ws.replace(values=ws.values).shards == 4
    assert ws.replace(indices=ws.indices).shards == 4  # Through the validating constructor.
    assert ws.astype(jnp.bfloat16).shards == 4
    x = dense((5, 32), seed=10)
    np.testing.assert_allclose(x @ ws, x @ ws.todense(), rtol=1e-5, atol=1e-5)
    # frommask keeps a balanced mask balanced (fill blocks per run) and refuses an uneven one.
    back = jsp.BlocksSparse.frommask(w, ws.mask(), n=16, density=0.25, shards=4)
    np.testing.assert_array_equal(back.indptr, ws.indptr)
    top = jnp.zeros((32, 128), bool).at[:, :32].set(True)  # 64 blocks in the first run.
    with pytest.raises(ValueError, match=r"keeps 64 blocks in block rows \[0, 2\).*at most 16"):
        jsp.BlocksSparse.frommask(w, top, n=16, density=0.25, shards=4)


def test_shards_is_part_of_the_spec_through_the_seam_strings_and_fits():
    w = dense((32, 128), seed=12)
    spec = jsp.Blocks(16, 0.25, shards=4)
    ws = jsp.fromdense(w, spec)
    assert ws.spec == spec and ws.shards == 4 and str(spec) == "1x16@0.25,shards=4"
    assert repr(spec) == "Blocks(n=16, density=0.25, shards=4)"
    assert repr(jsp.Blocks(16, 0.25)) == "Blocks(n=16, density=0.25)"  # As before shards.
    np.testing.assert_array_equal(
        ws.indices, jsp.BlocksSparse.fromdense(w, n=16, density=0.25, shards=4).indices)
    np.testing.assert_array_equal(spec.magnitude_mask(w), ws.mask())
    np.testing.assert_array_equal(jsp.frommask(w, ws.mask(), spec).indptr, ws.indptr)
    assert jsp.prune.as_pattern("1x16@25%, shards=4") == spec
    assert jsp.prune.as_pattern(str(spec)) == spec
    assert jsp.prune.as_pattern("1x16@0.25") == jsp.Blocks(16, 0.25, 1)
    assert spec.fits_shape((32, 128)) is None
    assert "multiple of n*shards=64" in spec.fits_shape((32, 96))
    assert "77 kept blocks (1x16@0.3) a multiple of 4" in jsp.Blocks(16, 0.3, 4).fits_shape(
        (32, 128))
    for bad, error in ((0, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="shards"):
            jsp.Blocks(16, 0.25, bad).validate()


def test_shards_refuse_runs_that_do_not_divide():
    w = dense((32, 128), seed=11)
    with pytest.raises(ValueError, match=r"shards=3 must divide .* multiple of n\*shards=48"):
        jsp.BlocksSparse.fromdense(w, n=16, density=0.25, shards=3)
    with pytest.raises(ValueError, match="shards must be"):
        jsp.BlocksSparse.fromdense(w, n=16, density=0.25, shards=0)
    with pytest.raises(ValueError, match=r"kept blocks \(1x16@0.3\) a multiple of 4"):
        jsp.BlocksSparse.fromdense(w, n=16, density=0.3, shards=4)  # 77 blocks.
    whole = jsp.fromdense(w, jsp.Blocks(16, 0.25))
    a = {k: np.asarray(v) for k, v in whole.arrays().items()}
    counts = np.diff(np.asarray(whole.indptr)[::2]).tolist()
    assert len(set(counts)) > 1  # The whole-matrix choice is uneven here.
    with pytest.raises(ValueError, match=r"needs equal blocks in each run of 2 block rows; "
                                         rf"indptr gives {re.escape(str(counts))}"):
        jsp.BlocksSparse(*a.values(), n=16, density=0.25, in_features=32, out_features=128,
                         shards=4)


def test_split_by_inputs_keeps_each_input_runs_largest_blocks_stacked_run_after_run():
    w = dense((32, 40), seed=13)  # 3 block rows, the last partial; 4 runs of 8 inputs.
    ws = jsp.BlocksSparse.fromdense(w, n=16, density=0.25, shards=4, split="in")
    assert ws.stacked and ws.split == "in" and ws.values.shape == (24, 16)
    indptr, indices = np.asarray(ws.indptr), np.asarray(ws.indices)
    assert indptr.shape == (4 * 3 + 1,)  # Stacked rows q = run * 3 + r.
    np.testing.assert_array_equal(indptr[::3], [0, 6, 12, 18, 24])
    np.testing.assert_array_equal(indices // 8, np.repeat(np.arange(4), 6))  # Own inputs.
    padded = jnp.pad(w, ((0, 0), (0, 8)))
    norms = np.asarray(jnp.sum(padded.reshape(32, 3, 16) ** 2, axis=-1))  # [in, R]
    kept = np.asarray(ws.block_mask())
    for run in range(4):  # Each run of 8 inputs keeps its own 6 largest.
        rows = slice(8 * run, 8 * run + 8)
        assert kept[rows].sum() == 6
        assert norms[rows][kept[rows]].min() >= norms[rows][~kept[rows]].max()
        # ... which is what the whole-matrix choice keeps of those inputs alone.
        alone = jsp.BlocksSparse.fromdense(w[rows], n=16, density=0.25)
        np.testing.assert_array_equal(alone.block_mask(), kept[rows])
    np.testing.assert_array_equal(ws.todense(), jnp.where(ws.mask(), w, 0))
    x = dense((5, 32), seed=14)
    np.testing.assert_allclose(x @ ws, x @ ws.todense(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(  # The mask the spec names, and frommask keeps the layout.
        jsp.Blocks(16, 0.25, 4, "in").magnitude_mask(w), ws.mask())
    back = jsp.BlocksSparse.frommask(w, ws.mask(), n=16, density=0.25, shards=4, split="in")
    np.testing.assert_array_equal(back.indptr, ws.indptr)
    np.testing.assert_array_equal(back.indices, ws.indices)
    top = jnp.zeros((32, 40), bool).at[:8, :32].set(True)  # 16 blocks in the first run.
    with pytest.raises(ValueError, match=r"keeps 16 blocks in inputs \[0, 8\).*at most 6"):
        jsp.BlocksSparse.frommask(w, top, n=16, density=0.25, shards=4, split="in")
    stack = jnp.stack([w, dense((32, 40), seed=15)])  # A stack of weights, each balanced.
    wss = jsp.fromdense(stack, jsp.Blocks(16, 0.25, 4, "in"))
    np.testing.assert_array_equal(wss.todense()[0], ws.todense())


def test_split_is_part_of_the_spec_strings_and_fits():
    spec = jsp.Blocks(16, 0.25, shards=4, split="in")
    assert str(spec) == "1x16@0.25,shards=4,split=in" and spec.stacked
    assert repr(spec) == "Blocks(n=16, density=0.25, shards=4, split='in')"
    assert jsp.prune.as_pattern("1x16@25%, shards=4, split=in") == spec
    assert jsp.prune.as_pattern("1x16@0.25,shards=4,split=out") == jsp.Blocks(16, 0.25, 4)
    # One run is the whole matrix: the split is moot and reads "out".
    assert jsp.Blocks(16, 0.25, 1, "in").validate() == jsp.Blocks(16, 0.25)
    assert spec.fits_shape((32, 40)) is None  # Any out; in a multiple of the runs.
    assert "in_features=30 must be a multiple of 4" in spec.fits_shape((30, 40))
    assert "kept blocks (1x16@0.3) a multiple of 4" in jsp.Blocks(16, 0.3, 4, "in").fits_shape(
        (32, 40))
    with pytest.raises(ValueError, match=r"split must be one of \('out', 'in'\)"):
        jsp.Blocks(16, 0.25, 4, "rows").validate()


def test_a_stacked_weight_refuses_arrays_without_its_balance_or_with_other_runs_inputs():
    w = dense((32, 40), seed=16)
    ws = jsp.BlocksSparse.fromdense(w, n=16, density=0.25, shards=4, split="in")
    a = {k: np.asarray(v) for k, v in ws.arrays().items()}
    static = dict(n=16, density=0.25, in_features=32, out_features=40, shards=4, split="in")
    jsp.BlocksSparse(**a, **static)  # As built: accepted.
    with pytest.raises(ValueError, match=r"indptr must have shape \(13,\)"):
        jsp.BlocksSparse(a["values"], a["indices"], a["indptr"][:4], **static)
    uneven = a["indptr"].copy()
    uneven[3] += 1  # The first run's last row takes a block of the second run.
    with pytest.raises(ValueError, match=r"equal blocks in each run of 3 stacked block rows"):
        jsp.BlocksSparse(a["values"], a["indices"], uneven, **static)
    swapped = a["indices"].copy()
    swapped[0] = 31  # A block of run 0 on an input of run 3 (still sorted in its row).
    swapped[:a["indptr"][1]] = np.sort(swapped[:a["indptr"][1]])
    with pytest.raises(ValueError, match=r"stacked run 0 .* must hold inputs \[0, 8\)"):
        jsp.BlocksSparse(a["values"], swapped, a["indptr"], **static)


def test_structure_is_sorted_bsr():
    ws = jsp.fromdense(dense((64, 40), seed=2), jsp.Blocks(8, 0.3))
    indptr, indices = np.asarray(ws.indptr), np.asarray(ws.indices)
    assert indptr[0] == 0 and indptr[-1] == indices.size and np.all(np.diff(indptr) >= 0)
    for r in range(indptr.size - 1):
        row = indices[indptr[r]:indptr[r + 1]]
        assert np.all(np.diff(row) > 0)
    # w[indices[p], r*n + j] = values[p, j].
    w = np.asarray(ws.todense())
    p = indptr[2]
    np.testing.assert_array_equal(w[indices[p], 16:24], np.asarray(ws.values[p]))


def test_a_partial_last_block_row_holds_zeros_in_its_padding():
    w = dense((20, 10), seed=3)  # n = 4: rows of outputs 0-3, 4-7, 8-9 (+2 padding).
    ws = jsp.fromdense(w, jsp.Blocks(4, 0.5))
    rows = np.asarray(jsp.ops.block_rows(ws.indptr, ws.indices.shape[-1]))
    last = np.asarray(ws.values)[rows == 2]
    assert last.size and not np.any(last[:, 2:])
    # The partial row's norm counts only its real outputs.
    mask = np.asarray(ws.mask())
    assert mask.shape == (20, 10) and mask.sum() == (rows < 2).sum() * 4 + (rows == 2).sum() * 2


def test_stacks_select_per_weight():
    w = dense((2, 32, 32), seed=4)
    ws = jsp.fromdense(w, jsp.Blocks(16, 0.5))
    assert ws.values.shape == (2, 32, 16) and ws.indptr.shape == (2, 3)
    one = jsp.fromdense(w[1], jsp.Blocks(16, 0.5))
    np.testing.assert_array_equal(ws.values[1], one.values)
    np.testing.assert_array_equal(ws.indices[1], one.indices)


def test_frommask_fills_with_zero_blocks_and_refuses_broken_blocks():
    w = dense((16, 32), seed=5)
    spec = jsp.Blocks(16, density=0.5)
    mask = jnp.zeros((16, 32), bool).at[3, :16].set(True).at[7, 16:].set(True)
    ws = jsp.frommask(w, mask, spec)
    assert ws.values.shape == (16, 16)
    np.testing.assert_array_equal(ws.todense(), jnp.where(ws.mask(), w, 0) * mask)
    with pytest.raises(ValueError, match=r"mask breaks a 1x16 block: input 3, outputs \[0, 16\)"):
        jsp.frommask(w, mask.at[3, 5].set(False), spec)
    with pytest.raises(ValueError, match="allows at most 16 of 32"):
        jsp.frommask(w, jnp.ones((16, 32), bool), spec)
    # The real outputs of a partial block row make the whole block.
    w10 = dense((8, 10), seed=6)
    part = jnp.zeros((8, 10), bool).at[2, 8:].set(True)
    got = jsp.frommask(w10, part, jsp.Blocks(4, 0.5))
    np.testing.assert_array_equal(got.todense(), jnp.where(part, w10, 0))


def test_constructor_checks_concrete_structure():
    ws = jsp.fromdense(dense((32, 32), seed=7), jsp.Blocks(8, 0.5))
    a = {k: np.asarray(v) for k, v in ws.arrays().items()}
    sizes = dict(n=8, density=0.5, in_features=32, out_features=32)
    bad = a["indptr"].copy()
    bad[1], bad[2] = bad[2], bad[1] - 1
    with pytest.raises(ValueError, match="indptr must run from 0 to nnz"):
        jsp.BlocksSparse(a["values"], a["indices"], bad, **sizes)
    bad = a["indices"].copy()
    bad[1] = bad[0]
    with pytest.raises(ValueError, match="strictly increasing inside each block row"):
        jsp.BlocksSparse(a["values"], bad, a["indptr"], **sizes)
    bad = a["indices"].copy()
    bad[0] = 32
    with pytest.raises(ValueError, match=r"indices must be inputs in \[0, 32\)"):
        jsp.BlocksSparse(a["values"], bad, a["indptr"], **sizes)
    with pytest.raises(ValueError, match="values must have shape"):
        jsp.BlocksSparse(a["values"][:-1], a["indices"], a["indptr"], **sizes)
    with pytest.raises(TypeError, match="out_features must be an int"):
        jsp.BlocksSparse(*a.values(), n=8, density=0.5, in_features=32, out_features=None)


def test_spec_parsing_and_validation():
    assert jsp.as_spec("1x16@0.25") == jsp.Blocks(16, 0.25)
    assert jsp.as_spec("1x8@25%") == jsp.Blocks(8, 0.25)
    assert str(jsp.Blocks(32, 0.1)) == "1x32@0.1"
    with pytest.raises(ValueError, match=r"n must be one of \(4, 8, 16, 32\)"):
        jsp.as_spec(jsp.Blocks(6, 0.5))
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        jsp.as_spec("1x16@0")
    with pytest.raises(TypeError, match="density must be a number"):
        jsp.as_spec(jsp.Blocks(16, "half"))
    with pytest.raises(ValueError, match="density must be in"):
        jsp.fromdense(dense((8, 16)), jsp.Blocks(16, 1.5))
    assert jsp.Blocks(16, 0.5).fits_shape((64, 8)).startswith("out=8 < n=16")
    assert jsp.Blocks(16, 0.5).fits_shape((64, 16)) is None


def test_fromdense_is_jittable_and_keeps_dtype():
    w = dense((40, 24), seed=8, dtype=jnp.bfloat16)
    ws = jax.jit(lambda w: jsp.fromdense(w, jsp.Blocks(8, 0.5)))(w)
    assert ws.dtype == jnp.bfloat16 and ws.out_features == 24
    np.testing.assert_array_equal(ws.todense(), jsp.fromdense(w, jsp.Blocks(8, 0.5)).todense())
