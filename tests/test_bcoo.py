"""Interchange with jax.experimental.sparse.BCOO (jaxsparse/bcoo.py): every format to BCOO and
back; the sparse formats lose nothing, int4 quantises again."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import sparse as jsparse

import jaxsparse as jsp
from tests.test_io import dense, every_format

SPARSE = ("nm", "nm_bf16", "vnm", "vnm_tiled", "blocks", "blocks_shards", "blocks_rows")
INT4 = ("int4", "int4_a8", "int4_nm", "int4_lines", "int4_nm_lines", "int4_marlin",
        "int4_nm_marlin")
CANONICAL = {"vnm_tiled": jsp.VNMSparse, "int4_lines": jsp.Int4Weight,
             "int4_nm_lines": jsp.Int4NMWeight, "int4_marlin": jsp.Int4Weight,
             "int4_nm_marlin": jsp.Int4NMWeight}


@pytest.fixture(scope="module")
def weights():
    return every_format()


def assert_same_arrays(a, b):
    assert type(a) is type(b) and a.spec == b.spec and a.shape == b.shape
    for name, array in a.arrays().items():
        np.testing.assert_array_equal(np.asarray(array), np.asarray(getattr(b, name)), name)


@pytest.mark.parametrize("name", SPARSE + INT4)
def test_to_bcoo_lists_every_stored_entry_exactly(weights, name):
    w = weights[name]
    m = jsp.to_bcoo(w)
    mask = np.asarray(w.mask())
    assert m.shape == w.shape and m.nse == mask.sum()
    assert m.dtype == (jnp.float32 if name in INT4 else w.dtype)
    np.testing.assert_array_equal(np.argwhere(mask), np.asarray(m.indices))
    if name in SPARSE:
        np.testing.assert_array_equal(np.asarray(m.todense()), np.asarray(w.todense()))
    else:  # codes * scale in f32 is exact; the format's own dtype rounds it once
        np.testing.assert_array_equal(np.asarray(m.todense().astype(w.dtype)),
                                      np.asarray(w.todense()))


@pytest.mark.parametrize("name", SPARSE)
def test_sparse_formats_round_trip_losing_nothing(weights, name):
    w = weights[name]
    back = jsp.from_bcoo(jsp.to_bcoo(w), w.spec)
    canonical = w.without_tiles() if name == "vnm_tiled" else w
    assert type(back) is CANONICAL.get(name, type(w))
    assert_same_arrays(back, canonical)


def test_stored_zeros_keep_their_place():
    w = np.zeros((8, 4), np.float32)
    w[0, 0] = 3.0  # one nonzero in the first group of output 0: the other kept entry is a 0
    ws = jsp.frommask(jnp.asarray(w), jnp.asarray(w != 0), "2:4")
    m = jsp.to_bcoo(ws)
    assert m.nse == 16 and np.count_nonzero(np.asarray(m.data)) == 1
    assert_same_arrays(jsp.from_bcoo(m, "2:4"), ws)


@pytest.mark.parametrize("name", ["int4", "int4_nm", "int4_lines", "int4_marlin",
                                  "int4_nm_marlin"])
def test_int4_made_by_rounding_comes_back_with_the_same_codes(weights, name):
    # The scales are recomputed from the dequantised group maxima (7 * scale, then / 7), in f32:
    # equal to within a rounding, not bit for bit.
    w = weights[name]
    back = jsp.from_bcoo(jsp.to_bcoo(w), w.spec)
    assert type(back) is CANONICAL.get(name, type(w))
    expected = w.packed_for("cpu").astype(jnp.float32)
    assert back.spec == expected.spec and back.shape == expected.shape
    for array in expected.array_names():
        if array == "scales":
            np.testing.assert_allclose(back.scales, expected.scales, rtol=2**-22)
        else:
            np.testing.assert_array_equal(getattr(back, array), getattr(expected, array), array)


def test_a_foreign_bcoo_becomes_any_format():
    m = jsparse.BCOO.fromdense(dense((64, 48)))  # every entry stored: a dense matrix
    for spec in ("2:4", jsp.VNM(16, 2, 8), jsp.Blocks(16, 0.5)):
        with pytest.raises(ValueError, match="jaxsparse"):  # all stored: breaks the pattern
            jsp.from_bcoo(m, spec)
    wq = jsp.from_bcoo(m, jsp.Int4(32))
    np.testing.assert_array_equal(np.asarray(wq.qweight),
                                  np.asarray(jsp.fromdense(dense((64, 48)), jsp.Int4(32)).qweight))
    kept = jsp.fromdense(dense((64, 48)), "2:4")
    sparse = jsparse.BCOO.fromdense(kept.todense())  # stores the nonzeros only
    np.testing.assert_array_equal(np.asarray(jsp.from_bcoo(sparse, "2:4").todense()),
                                  np.asarray(kept.todense()))


def test_duplicate_indices_are_summed():
    data = jnp.array([1.0, 2.0, 5.0])
    indices = jnp.array([[0, 0], [0, 0], [4, 1]], jnp.int32)
    m = jsparse.BCOO((data, indices), shape=(8, 2))
    w = jsp.from_bcoo(m, "1:4")
    assert float(w.todense()[0, 0]) == 3.0 and float(w.todense()[4, 1]) == 5.0


@pytest.mark.cpu_only
def test_bad_arguments_are_named(weights):
    m = jsp.to_bcoo(weights["nm"])
    with pytest.raises(TypeError, match="jaxsparse.to_bcoo: w must be a jaxsparse weight"):
        jsp.to_bcoo(np.ones((4, 4)))
    with pytest.raises(TypeError, match="jaxsparse.from_bcoo: m must be a"):
        jsp.from_bcoo(np.ones((8, 4)), "2:4")
    with pytest.raises(TypeError, match="m's data must have dtype float32"):
        jsp.from_bcoo(jsparse.BCOO.fromdense(jnp.ones((8, 4), jnp.int32)), "2:4")
    with pytest.raises(ValueError, match="no dense dims"):
        jsp.from_bcoo(jsparse.BCOO.fromdense(jnp.ones((8, 4)), n_dense=1), "2:4")
    with pytest.raises(ValueError, match="spec"):
        jsp.from_bcoo(m, "5:4")
    with pytest.raises(TypeError, match="concrete arrays"):
        jax.jit(jsp.to_bcoo)(weights["nm"])
