"""The NMSparse format: construction, exact round trips, views, pytree behaviour, validation."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp
from tests._check import DTYPES, keys, once_after, random_array

PATTERNS = [(1, 2), (2, 4), (1, 4), (2, 8), (4, 8), (3, 7), (1, 16), (15, 16)]


def numpy_nm_mask(w, n, m):
    """Independent oracle: per output and group, keep the n largest |w| (lower position on ties)."""
    w = np.asarray(w, np.float32)
    k, out = w.shape
    mask = np.zeros_like(w, dtype=bool)
    for j in range(out):
        for g0 in range(0, k, m):
            col = np.abs(w[g0 : g0 + m, j])
            order = sorted(range(len(col)), key=lambda i: (-col[i], i))[:n]
            mask[[g0 + i for i in order], j] = True
    return mask


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("in_features", once_after([1, 5, 16, 23], keep=2, unpack=False))
def test_fromdense_keeps_largest_magnitudes(n, m, in_features):
    w = random_array(keys(0, 1)[0], (in_features, 6))
    ws = jsp.NMSparse.fromdense(w, n=n, m=m)
    expected_mask = numpy_nm_mask(w, n, m)
    np.testing.assert_array_equal(np.asarray(ws.mask()), expected_mask)
    np.testing.assert_array_equal(np.asarray(ws.todense()), np.where(expected_mask, w, 0))
    assert ws.shape == (in_features, 6)
    assert ws.values.shape == (6, -(-in_features // m) * n)
    assert ws.indices.dtype == jnp.uint8


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_bit_exact(dtype):
    w = random_array(keys(1, 1)[0], (37, 9), dtype)
    # Special values survive: signed zero, infinities, subnormals, NaN.
    w = w.at[0, 0].set(-0.0).at[4, 1].set(jnp.inf).at[8, 2].set(-jnp.inf).at[12, 3].set(jnp.nan)
    w = w.at[16, 4].set(jnp.finfo(dtype).smallest_subnormal)
    ws = jsp.NMSparse.fromdense(w, n=2, m=4)
    dense = ws.todense()
    assert dense.dtype == dtype
    kept = np.asarray(ws.mask())
    got = np.asarray(dense).view(np.uint16 if dtype != jnp.float32 else np.uint32)
    want = np.asarray(w).view(got.dtype)
    np.testing.assert_array_equal(got[kept], want[kept])
    assert np.all(np.asarray(dense, np.float32)[~kept] == 0)
    # fromdense of the pruned matrix stores the same entries again.
    again = jsp.NMSparse.fromdense(dense, n=2, m=4)
    np.testing.assert_array_equal(
        np.asarray(again.values).view(got.dtype), np.asarray(ws.values).view(got.dtype)
    )


def test_padding_of_a_ragged_last_group():
    # in=6 at 2:4: the last group has 2 real inputs; both are kept; at 3:4 a third slot falls
    # into the padding with value 0.
    w = jnp.arange(1.0, 7.0)[:, None] * jnp.ones((1, 2))
    ws = jsp.NMSparse.fromdense(w, n=3, m=4)
    assert ws.values.shape == (2, 6)
    np.testing.assert_array_equal(np.asarray(ws.indices[0]), [1, 2, 3, 0, 1, 2])
    np.testing.assert_array_equal(np.asarray(ws.values[0]), [2.0, 3.0, 4.0, 5.0, 6.0, 0.0])
    np.testing.assert_array_equal(np.asarray(ws.todense()), np.where(ws.mask(), w, 0))
    assert ws.mask().shape == (6, 2)


def test_real_zero_beats_padding():
    w = jnp.zeros((5, 1)).at[4, 0].set(3.0)
    ws = jsp.NMSparse.fromdense(w, n=2, m=4)
    # group 1 holds input 4 (value 3) and padding; slot 2 must be the padding (positions 1..3).
    assert int(ws.indices[0, 2]) == 0 and float(ws.values[0, 2]) == 3.0


def test_frommask_and_fill_of_short_groups():
    w = random_array(keys(2, 1)[0], (8, 3))
    mask = np.zeros((8, 3), bool)
    mask[1, 0] = mask[3, 0] = True  # two kept in group 0 of output 0
    mask[6, 1] = True  # one kept in group 1 of output 1
    ws = jsp.NMSparse.frommask(w, mask, n=2, m=4)
    np.testing.assert_array_equal(np.asarray(ws.todense()), np.where(mask, w, 0))
    assert int(jnp.sum(ws.mask())) == 3 * 2 * 2  # every group stores n slots


def test_frommask_rejects_a_mask_that_breaks_the_pattern():
    w = jnp.ones((8, 2))
    mask = np.zeros((8, 2), bool)
    mask[4:7, 1] = True
    with pytest.raises(ValueError, match=r"mask keeps 3 entries in the group of inputs \[4, 8\) "
                                         r"of output 1.*2:4 pattern allows at most 2"):
        jsp.NMSparse.frommask(w, mask, n=2, m=4)


def test_frommask_validates_shape_and_dtype():
    w = jnp.ones((8, 2))
    with pytest.raises(ValueError, match="mask must have the shape of w"):
        jsp.NMSparse.frommask(w, np.ones((8, 3), bool), n=2, m=4)
    with pytest.raises(TypeError, match="mask must be a bool array"):
        jsp.NMSparse.frommask(w, np.ones((8, 2)), n=2, m=4)


def test_properties_and_repr():
    ws = jsp.NMSparse.fromdense(jnp.ones((16, 8), jnp.bfloat16), n=2, m=8)
    assert ws.shape == (16, 8) and ws.ndim == 2 and ws.dtype == jnp.bfloat16
    assert ws.in_features == 16 and ws.out_features == 8
    assert ws.pattern == jsp.NM(2, 8) and str(ws.pattern) == "2:8"
    assert ws.density == pytest.approx(0.25)
    assert ws.nbytes == 8 * 4 * 2 + 8 * 4
    assert repr(ws) == "NMSparse(shape=(16, 8), dtype=bfloat16, pattern=2:8, nbytes=96)"


def test_pytree_flatten_and_static_pattern():
    ws = jsp.NMSparse.fromdense(random_array(keys(3, 1)[0], (12, 4)), n=1, m=4)
    leaves, treedef = jax.tree.flatten(ws)
    assert [leaf.shape for leaf in leaves] == [(4, 3), (4, 3), (4, 1)]  # indices_2bit: 3 in 1 byte
    back = jax.tree.unflatten(treedef, leaves)
    assert back.pattern == ws.pattern and back.in_features == 12
    doubled = jax.tree.map(lambda a: a, ws)
    np.testing.assert_array_equal(doubled.todense(), ws.todense())
    # jit sees the pattern as static: two patterns, two traces; values only change nothing.
    traced = jax.jit(lambda s: s.todense())(ws)
    np.testing.assert_array_equal(traced, ws.todense())
    restored = pickle.loads(pickle.dumps(ws))
    np.testing.assert_array_equal(restored.todense(), ws.todense())


def test_fromdense_under_jit_and_vmap_builds_a_stack():
    w = random_array(keys(4, 1)[0], (3, 12, 5))
    stack = jax.vmap(lambda a: jsp.NMSparse.fromdense(a, n=2, m=4))(w)
    assert stack.shape == (3, 12, 5) and stack.batch_shape == (3,)
    direct = jax.jit(lambda a: jsp.NMSparse.fromdense(a, n=2, m=4))(w)
    np.testing.assert_array_equal(stack.todense(), direct.todense())
    for i in range(3):
        one = jsp.NMSparse.fromdense(w[i], n=2, m=4)
        np.testing.assert_array_equal(direct.todense()[i], one.todense())


def test_replace_and_astype():
    ws = jsp.NMSparse.fromdense(random_array(keys(5, 1)[0], (8, 4)), n=2, m=4)
    doubled = ws.replace(values=ws.values * 2)
    np.testing.assert_array_equal(doubled.todense(), ws.todense() * 2)
    np.testing.assert_array_equal(doubled.indices, ws.indices)
    half = ws.astype(jnp.float16)
    assert half.dtype == jnp.float16 and half.pattern == ws.pattern
    with pytest.raises(ValueError, match=r"values must keep the shape \(4, 4\); got \(4, 3\)"):
        ws.replace(values=ws.values[:, :3])
    with pytest.raises(TypeError, match="unknown fields"):
        ws.replace(pattern=(1, 4))
    with pytest.raises(TypeError, match="values must have dtype"):
        ws.replace(values=ws.values.astype(jnp.int32))
    with pytest.raises(TypeError, match="dtype must have dtype"):
        ws.astype(jnp.int8)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "n,m,exc,match",
    [
        (0, 4, ValueError, r"n must be in \[1, 3\], got 0"),
        (4, 4, ValueError, r"n must be in \[1, 3\], got 4"),
        (2, 17, ValueError, r"m must be in \[2, 16\], got 17"),
        (1, 1, ValueError, r"m must be in \[2, 16\], got 1"),
        (2.0, 4, TypeError, r"n must be an int, got float"),
        (2, None, TypeError, r"m must be an int, got NoneType"),
    ],
)
def test_pattern_out_of_range(n, m, exc, match):
    with pytest.raises(exc, match=match):
        jsp.NMSparse.fromdense(jnp.ones((8, 2)), n=n, m=m)


def test_fromdense_bad_input():
    with pytest.raises(ValueError, match=r"w must have at least 2 dimensions.*got shape \(8,\)"):
        jsp.NMSparse.fromdense(jnp.ones(8), n=2, m=4)
    with pytest.raises(TypeError, match="w must have dtype float32, bfloat16, float16; got int32"):
        jsp.NMSparse.fromdense(jnp.ones((8, 2), jnp.int32), n=2, m=4)
    with pytest.raises(TypeError, match="w must be an array, got str"):
        jsp.NMSparse.fromdense("weights", n=2, m=4)


def test_constructor_validates_positions():
    values = jnp.ones((2, 4))
    good = np.array([[0, 3, 1, 2]] * 2, np.uint8)
    ws = jsp.NMSparse(values, good, n=2, m=4, in_features=8)
    assert ws.shape == (8, 2)
    with pytest.raises(ValueError, match=r"indices must be positions in \[0, 4\); got 4 at index"):
        jsp.NMSparse(values, np.array([[0, 4, 1, 2]] * 2, np.uint8), n=2, m=4, in_features=8)
    with pytest.raises(ValueError, match=r"strictly increasing inside each group.*\[3, 1\]"):
        jsp.NMSparse(values, np.array([[3, 1, 1, 2]] * 2, np.uint8), n=2, m=4, in_features=8)
    with pytest.raises(ValueError, match=r"strictly increasing.*\[2, 2\]"):
        jsp.NMSparse(values, np.array([[0, 1, 2, 2]] * 2, np.uint8), n=2, m=4, in_features=8)
    with pytest.raises(ValueError, match=r"last dimension ceil\(in_features/m\)\*n.*= 6"):
        jsp.NMSparse(values, good, n=2, m=4, in_features=10)
    with pytest.raises(ValueError, match="indices must have the shape of values"):
        jsp.NMSparse(values, good[:1], n=2, m=4, in_features=8)
    with pytest.raises(TypeError, match="indices must be an integer array"):
        jsp.NMSparse(values, good.astype(np.float32), n=2, m=4, in_features=8)
    with pytest.raises(ValueError, match=r"values must have at least 2 dimensions"):
        jsp.NMSparse(jnp.ones(4), good[0], n=2, m=4, in_features=8)
    with pytest.raises(ValueError, match=r"indices must be positions"):
        ws.replace(indices=np.full((2, 4), 9, np.uint8))


def test_positions_are_also_held_at_2_bits_for_m_4():
    w = random_array(keys(7, 1)[0], (2, 22, 5))  # A stack; 22 inputs: a ragged last group.
    for n in (1, 2, 3):
        ws = jsp.NMSparse.fromdense(w, n=n, m=4)
        assert ws.indices_2bit.shape == (2, 5, -(-ws.indices.shape[-1] // 4))
        np.testing.assert_array_equal(ws.indices_2bit, jsp.ops.pack_indices_2bit(ws.indices))
        mask = jsp.NMSparse.frommask(w, ws.mask(), n=n, m=4)
        np.testing.assert_array_equal(mask.indices_2bit, ws.indices_2bit)
    # Other group sizes hold an empty placeholder (no kernel reads 2-bit positions there).
    assert jsp.NMSparse.fromdense(w, n=2, m=8).indices_2bit.shape == (2, 5, 0)
    # Jittable: packed inside the program that builds the weight.
    traced = jax.jit(lambda w: jsp.NMSparse.fromdense(w, n=2, m=4))(w)
    np.testing.assert_array_equal(traced.indices_2bit, jsp.NMSparse.fromdense(w, n=2, m=4)
                                  .indices_2bit)


def test_constructor_packs_and_checks_the_2bit_positions():
    values = jnp.ones((2, 4))
    good = np.array([[0, 3, 1, 2]] * 2, np.uint8)
    ws = jsp.NMSparse(values, good, n=2, m=4, in_features=8)
    np.testing.assert_array_equal(ws.indices_2bit, np.full((2, 1), 0 | 3 << 2 | 1 << 4 | 2 << 6))
    same = jsp.NMSparse(values, good, ws.indices_2bit, n=2, m=4, in_features=8)
    np.testing.assert_array_equal(same.indices_2bit, ws.indices_2bit)
    with pytest.raises(ValueError, match="indices_2bit does not hold indices at 2 bits"):
        jsp.NMSparse(values, good, ws.indices_2bit ^ 4, n=2, m=4, in_features=8)
    with pytest.raises(ValueError, match=r"indices_2bit must be uint8 of shape \(2, 1\).*\(2, 2\)"):
        jsp.NMSparse(values, good, np.zeros((2, 2), np.uint8), n=2, m=4, in_features=8)
    with pytest.raises(ValueError, match=r"indices_2bit must be uint8 of shape \(2, 0\)"):
        jsp.NMSparse(values, np.array([[0, 3, 1, 2]] * 2, np.uint8), ws.indices_2bit, n=2, m=8,
                     in_features=16)
    # New positions bring their 2-bit form along; a stale one cannot be passed with them.
    moved = ws.replace(indices=np.array([[1, 2, 0, 3]] * 2, np.uint8))
    np.testing.assert_array_equal(moved.indices_2bit, np.full((2, 1), 1 | 2 << 2 | 0 | 3 << 6))
    with pytest.raises(ValueError, match="indices_2bit does not hold indices at 2 bits"):
        ws.replace(indices=np.array([[1, 2, 0, 3]] * 2, np.uint8), indices_2bit=ws.indices_2bit)


def test_nm_pattern_value():
    assert jsp.NM(2, 4).density == 0.5
    assert jsp.NM(2, 4) == (2, 4) and hash(jsp.NM(2, 4)) == hash((2, 4))
    with pytest.raises(ValueError, match=r"n must be in \[1, 7\], got 8"):
        jsp.NM(8, 8).validate()
