"""V:N:M's own cases (the conformance suite covers what every format shares): the selection rule
against brute force, padding of ragged groups and partial panels, masks that break the pattern,
corrupt arrays, and the spec value."""

import itertools

import jax

import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp
from jaxsparse import prune


def normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def block_best(block, n):
    """VENOM's exhaustive rule on one block [v, m] of |w|: the best quad's kept magnitude."""
    best = -1.0
    for quad in itertools.combinations(range(block.shape[1]), 4):
        kept = np.sort(block[:, quad], axis=1)[:, -n:].sum()
        best = max(best, kept)
    return best


@pytest.mark.parametrize("v,n,m", [(16, 2, 8), (16, 1, 8), (32, 2, 5), (16, 2, 16)])
def test_fromdense_keeps_the_best_quad_of_every_block(v, n, m):
    w = normal(0, (4 * m, 2 * v))
    ws = jsp.VNMSparse.fromdense(w, v=v, n=n, m=m)
    kept = np.abs(np.asarray(ws.todense()))
    a = np.abs(np.asarray(w))
    for p in range(2):
        for g in range(4):
            block = a[g * m:(g + 1) * m, p * v:(p + 1) * v].T  # [v, m]
            got = kept[g * m:(g + 1) * m, p * v:(p + 1) * v].sum()
            np.testing.assert_allclose(got, block_best(block, n), rtol=1e-6)
            # The panel uses at most 4 inputs of the group, each output at most n.
            used = kept[g * m:(g + 1) * m, p * v:(p + 1) * v] > 0
            assert used.any(axis=1).sum() <= 4 and used.sum(axis=0).max() <= n


def test_m4_is_plain_2to4():
    w = normal(1, (32, 48))
    np.testing.assert_array_equal(jsp.VNM(16, 2, 4).magnitude_mask(w), prune.magnitude_mask(w, "2:4"))


def test_ragged_group_with_fewer_than_four_real_inputs():
    # in = 2*8 + 2: the last group has 2 real inputs; its other 2 selected columns are padding.
    w = normal(2, (18, 16))
    ws = jsp.VNMSparse.fromdense(w, v=16, n=2, m=8)
    last = np.asarray(ws.columns).reshape(1, 3, 4)[:, 2]
    np.testing.assert_array_equal(last, [[0, 1, 2, 3]])
    dense = np.asarray(ws.todense())
    np.testing.assert_array_equal(dense[16:], np.asarray(w)[16:])  # Both real inputs kept.
    assert ws.mask().sum() == 16 * (2 * 2 + 2)


def test_partial_last_panel_and_real_zero_beats_padding():
    w = normal(3, (24, 20)).at[16:, :].set(0.0)  # A real all-zero last group (in = 24 = 3*8).
    ws = jsp.VNMSparse.fromdense(w, v=16, n=2, m=8)
    assert ws.columns.shape == (2, 12)  # ceil(20/16) panels
    np.testing.assert_array_equal(jnp.where(ws.mask(), w, 0), ws.todense())
    w2 = normal(4, (11, 20))  # in = 8 + 3: 3 real inputs in the last group beat the padding.
    ws2 = jsp.VNMSparse.fromdense(w2, v=16, n=1, m=8)
    cols = np.asarray(ws2.columns).reshape(2, 2, 4)[:, 1]
    assert (np.sort(cols, axis=1)[:, :3] == [0, 1, 2]).all()


def test_frommask_fills_and_rejects_masks_that_break_the_pattern():
    w = normal(5, (16, 16))
    mask = np.zeros((16, 16), bool)
    mask[0, 0] = mask[3, 1] = True  # 2 inputs of group 0 used by the panel.
    ws = jsp.VNMSparse.frommask(w, jnp.asarray(mask), v=16, n=2, m=8)
    np.testing.assert_array_equal(ws.todense(), jnp.where(mask, w, 0))
    cols = np.asarray(ws.columns).reshape(2, 4)
    assert {0, 3} <= set(cols[0].tolist())
    too_many_inputs = np.zeros((16, 16), bool)
    too_many_inputs[[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]] = True
    with pytest.raises(ValueError, match=r"uses 5 inputs of the group \[0, 8\) in the panel of "
                                         r"outputs \[0, 16\).*allows 4"):
        jsp.VNMSparse.frommask(w, jnp.asarray(too_many_inputs), v=16, n=2, m=8)
    three_in_a_row = np.zeros((16, 16), bool)
    three_in_a_row[[0, 1, 2], 5] = True
    with pytest.raises(ValueError, match=r"keeps 3 entries of output 5 .*allows at most 2"):
        jsp.VNMSparse.frommask(w, jnp.asarray(three_in_a_row), v=16, n=2, m=8)


def test_constructor_validates_columns_and_slots():
    ws = jsp.VNMSparse.fromdense(normal(6, (16, 16)), v=16, n=2, m=8)
    arrays = ws.arrays()
    spec = dict(v=16, n=2, m=8, in_features=16)
    cols = np.asarray(arrays["columns"]).copy()
    cols[0, :4] = [0, 2, 2, 5]
    with pytest.raises(ValueError, match=r"columns must be strictly increasing .*\[0, 2, 2, 5\]"):
        jsp.VNMSparse(**{**arrays, "columns": cols}, **spec)
    cols[0, :4] = [0, 2, 4, 8]
    with pytest.raises(ValueError, match=r"columns must be positions in \[0, 8\); got 8"):
        jsp.VNMSparse(**{**arrays, "columns": cols}, **spec)
    slots = np.asarray(arrays["indices"]).copy()
    slots[0, :2] = [3, 1]
    with pytest.raises(ValueError, match="indices must be strictly increasing"):
        jsp.VNMSparse(**{**arrays, "indices": slots}, **spec)
    with pytest.raises(ValueError, match=r"columns must have shape \(1, 8\)"):
        jsp.VNMSparse(**{**arrays, "columns": arrays["columns"][:, :4]}, **spec)
    with pytest.raises(TypeError, match="indices must be an integer array"):
        jsp.VNMSparse(**{**arrays, "indices": arrays["indices"].astype(jnp.float32)}, **spec)


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ((48, 2, 8), None, None),
        ((24, 2, 8), ValueError, "v must be a multiple of 16"),
        ((512, 2, 8), ValueError, r"v must be in \[16, 256\]"),
        ((64, 3, 8), ValueError, r"n must be in \[1, 2\]"),
        ((64, 2, 3), ValueError, r"m must be in \[4, 64\]"),
        ((64, 2, 65), ValueError, r"m must be in \[4, 64\]"),
        ((64.0, 2, 8), TypeError, "v must be an int"),
    ],
)
def test_spec_validation(spec, error, match):
    if error is None:
        assert jsp.as_spec(jsp.VNM(*spec)) == jsp.VNM(*spec)
        return
    with pytest.raises(error, match=match):
        jsp.as_spec(jsp.VNM(*spec))


def test_spec_strings_and_values():
    assert jsp.as_spec("64:2:8") == jsp.VNM(64, 2, 8)
    assert jsp.as_spec(" 128 : 2 : 16 ") == jsp.VNM(128, 2, 16)
    assert prune.as_pattern("64:2:32") == jsp.VNM(64, 2, 32)
    assert jsp.VNM(64, 2, 8).density == 0.25 and str(jsp.VNM(64, 1, 32)) == "64:1:32"
    assert prune.fits("64:2:8", (4, 64)) == (
        "in=4 < m=8: a V:N:M group needs at least m inputs, nothing would be pruned"
    )
    assert prune.fits(jsp.VNM(64, 2, 8), (8, 3)) is None  # A single partial panel is fine.
    with pytest.raises(ValueError, match="'v:n:m' such as '64:2:8'"):
        jsp.as_spec("64-2-8")


# ---------------------------------------------------------------------- the inference form
def bf16_weight(seed, k=96, out=80, v=16, n=2, m=8):
    return jsp.VNMSparse.fromdense(normal(seed, (k, out)).astype(jnp.bfloat16), v=v, n=n, m=m)


def bits(a):
    return np.asarray(a, np.float32)


def test_with_tiles_multiplies_as_the_weight():
    ws = bf16_weight(0)
    wt = ws.with_tiles()
    assert isinstance(wt, jsp.VNMSparseTiled) and wt.with_tiles() is wt
    assert wt.spec == ws.spec and wt.shape == ws.shape
    assert wt.arrays_with_role(jsp.formats.TRAINABLE) == ("values",)
    assert wt.tiles.dtype == jnp.bfloat16 and wt.nbytes > ws.nbytes
    np.testing.assert_array_equal(bits(wt.todense()), bits(ws.todense()))
    for t in (1, 40, 300):
        x = normal(t, (t, 96)).astype(jnp.bfloat16)
        np.testing.assert_array_equal(bits(jax.jit(lambda x, w: x @ w)(x, wt)), bits(x @ ws))
    stacked = jsp.VNMSparse.fromdense(normal(1, (3, 96, 80)).astype(jnp.bfloat16), v=16, n=2,
                                      m=8).with_tiles()
    x = normal(2, (3, 40, 96)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(bits(x @ stacked), bits(x @ stacked.without_tiles()))


def test_tiled_weight_through_jit_and_pytrees():
    wt = bf16_weight(3).with_tiles()
    leaves, tree = jax.tree.flatten(wt)
    assert len(leaves) == 4
    back = jax.tree.unflatten(tree, leaves)
    assert isinstance(back, jsp.VNMSparseTiled)
    made = jax.jit(lambda w: w.with_tiles())(bf16_weight(3))
    np.testing.assert_array_equal(bits(made.tiles), bits(wt.tiles))
    x = normal(4, (48, 96)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(bits(jax.jit(lambda x, w: x @ w)(x, wt)), bits(x @ wt))


def test_tiles_follow_the_values_and_never_go_stale():
    ws = bf16_weight(5)
    wt = ws.with_tiles()
    x = normal(6, (40, 96)).astype(jnp.bfloat16)
    doubled = wt.replace(values=wt.values * 2)
    assert isinstance(doubled, jsp.VNMSparseTiled)
    np.testing.assert_array_equal(bits(x @ doubled), bits(x @ ws.replace(values=ws.values * 2)))
    with pytest.raises(TypeError, match="tiles are derived"):
        wt.replace(tiles=wt.tiles)
    # A cast leaves the inference form; bfloat16 keeps it.
    assert type(wt.astype(jnp.float32)) is jsp.VNMSparse
    assert wt.astype(jnp.bfloat16) is wt
    f32 = wt.astype(jnp.float32).with_tiles()
    assert f32.tiles.dtype == jnp.float32 and type(f32.astype(jnp.bfloat16)) is jsp.VNMSparse
    np.testing.assert_array_equal(bits(x.astype(jnp.float32) @ f32),
                                  bits(x.astype(jnp.float32) @ ws.astype(jnp.float32)))
    assert type(wt.without_tiles()) is jsp.VNMSparse
    # Gradients: in x as the weight's; in the values (training) an error, not stale tiles.
    gx = jax.grad(lambda x: jnp.sum((x @ wt).astype(jnp.float32)))(x)
    np.testing.assert_array_equal(
        bits(gx), bits(jax.grad(lambda x: jnp.sum((x @ ws).astype(jnp.float32)))(x)))
    with pytest.raises(ValueError, match="inference form"):
        jax.grad(lambda w: jnp.sum((x @ w).astype(jnp.float32)), allow_int=True)(wt)


def test_tiles_are_checked():
    ws = bf16_weight(7)
    arrays, spec = ws.arrays(), dict(v=16, n=2, m=8, in_features=96)
    good = ws.with_tiles().tiles
    assert isinstance(jsp.VNMSparseTiled(**arrays, tiles=good, **spec), jsp.VNMSparseTiled)
    made = jsp.VNMSparseTiled(**arrays, **spec)  # tiles=None: packed.
    np.testing.assert_array_equal(bits(made.tiles), bits(good))
    # Each panel's words as [output tiles, k steps, 512]: 12 groups are 48 slots, 2 steps.
    assert good.shape == (5, 1, 2, 512)
    flat = jsp.VNMSparseTiled(**arrays, tiles=good.reshape(5, -1), **spec)  # Older files.
    np.testing.assert_array_equal(bits(flat.tiles), bits(good))
    with pytest.raises(ValueError, match="tiles must be the values' packing"):
        jsp.VNMSparseTiled(**arrays, tiles=(good.astype(jnp.float32) * 2).astype(jnp.bfloat16),
                           **spec)
    with pytest.raises(ValueError, match="tiles must be bfloat16 of shape"):
        jsp.VNMSparseTiled(**arrays, tiles=good[..., :-1], **spec)
    with pytest.raises(TypeError, match="packed for bfloat16 or float32 values"):
        jsp.VNMSparse.fromdense(normal(8, (96, 80)), v=16, n=2, m=8).astype(
            jnp.float16).with_tiles()
    fromdense = jsp.VNMSparseTiled.fromdense(normal(9, (96, 80)).astype(jnp.bfloat16), v=16,
                                             n=2, m=8)
    assert isinstance(fromdense, jsp.VNMSparseTiled)
    shapes = jsp.VNMSparseTiled.array_shapes(jsp.VNM(16, 2, 8), 96, 80)
    assert shapes["tiles"] == (fromdense.tiles.shape, None)
    rows = jsp.VNMSparseTiled.fromdense(normal(9, (96, 80)), v=16, n=2, m=8)
    shapes = jsp.VNMSparseTiled.array_shapes(jsp.VNM(16, 2, 8), 96, 80, jnp.float32)
    assert rows.tiles.dtype == jnp.float32 and shapes["tiles"][0] == rows.tiles.shape
