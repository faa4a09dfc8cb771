"""Pattern values: as_pattern accepts pattern values and 'n:m' strings, fits reports reasons."""

import pytest

import jaxsparse as jsp
from jaxsparse import prune


def test_as_pattern_accepts_values_and_strings():
    assert prune.as_pattern("2:4") == jsp.NM(2, 4)
    assert prune.as_pattern(" 1 : 8 ") == jsp.NM(1, 8)
    assert prune.as_pattern(jsp.NM(3, 7)) == jsp.NM(3, 7)
    assert prune.as_pattern(prune.Unstructured(0.25)) == prune.Unstructured(0.25)
    assert prune.as_pattern(prune.Unstructured(1)) == prune.Unstructured(1.0)
    assert type(prune.as_pattern(prune.Unstructured(1)).density) is float


def test_patterns_are_hashable_values():
    assert len({prune.as_pattern("2:4"), jsp.NM(2, 4), prune.Unstructured(0.5)}) == 2
    assert prune.Unstructured(0.25).sparsity == 0.75
    assert str(prune.Unstructured(0.5)) == "unstructured(0.5)"


@pytest.mark.parametrize(
    "spec, error, words",
    [
        ("2-4", ValueError, ["sparsity", "'2-4'", "'n:m'"]),
        ("dense", ValueError, ["sparsity", "'dense'"]),
        ("4:4", ValueError, ["sparsity", "n must be in [1, 3]", "4"]),
        ("1:17", ValueError, ["sparsity", "m must be in [2, 16]", "17"]),
        (3.5, TypeError, ["sparsity", "float 3.5", "Unstructured(density)"]),
        (0.5, TypeError, ["sparsity", "float 0.5"]),
        ((2, 4), TypeError, ["sparsity", "tuple"]),
        (None, TypeError, ["sparsity", "NoneType"]),
        (jsp.NM(5, 4), ValueError, ["sparsity", "n must be in [1, 3], got 5", "NM(n=5, m=4)"]),
        (jsp.NM(0, 4), ValueError, ["sparsity", "n must be in [1, 3], got 0"]),
        (jsp.NM(2, 4.0), TypeError, ["sparsity", "m must be an int"]),
        (prune.Unstructured(0.0), ValueError, ["sparsity", "density must be in (0, 1]", "0.0"]),
        (prune.Unstructured(1.5), ValueError, ["sparsity", "density must be in (0, 1]", "1.5"]),
        (prune.Unstructured("x"), TypeError, ["sparsity", "density must be a float"]),
    ],
)
def test_as_pattern_refuses_unknown_specs(spec, error, words):
    with pytest.raises(error) as info:
        prune.as_pattern(spec)
    for word in words:
        assert word in str(info.value)


def test_as_pattern_names_the_argument():
    with pytest.raises(ValueError, match="pattern must be"):
        prune.as_pattern("2/4", name="pattern")


def test_fits():
    assert prune.fits("2:4", (64, 32)) is None
    assert prune.fits(jsp.NM(2, 4), (6, 32)) is None  # ragged in is padded
    assert prune.fits("2:4", (3, 16, 8)) is None  # leading dims: [..., in, out]
    assert prune.fits("2:4", (2, 4, 8)) is None
    assert "in=3 < m=4" in prune.fits("2:4", (3, 8))
    assert "in=0 < m=8" in prune.fits("1:8", (0, 8))
    assert "rank 1" in prune.fits("2:4", (8,))
    assert "no compressed format" in prune.fits(prune.Unstructured(0.5), (64, 64))


def test_fits_validates_its_arguments():
    with pytest.raises(ValueError, match="sparsity"):
        prune.fits("2-4", (8, 8))
    with pytest.raises(TypeError, match="kernel_shape must be a sequence of ints"):
        prune.fits("2:4", (8.5, 8))
    with pytest.raises(TypeError, match="kernel_shape"):
        prune.fits("2:4", 8)
    with pytest.raises(ValueError, match="non-negative"):
        prune.fits("2:4", (-1, 8))
