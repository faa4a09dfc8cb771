"""The CPU engine's int8 tiles (`jaxsparse.ops.int8_matmul`, target jaxsparse_engine_int8_matmul) on
every instruction-set path the machine runs (AMX tdpbssd, AVX512-VNNI vpdpbusd, scalar), compared
exactly against the jnp reference and NumPy.

Shapes sit at the tile edges: 16 tokens and 16 outputs per tile, 64 inputs per k step, 2 x 4 tiles
per task; values span int8's range, and the extremes check the VNNI path's u8 shift (a + 128, minus
128 * the column sums of b) and int32 accumulation past 16 bits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp
from jaxsparse.ops import int8_matmul, int8_matmul_reference

TARGET = "jaxsparse_engine_int8_matmul"

# Every T in {1, 15, 16, 17, 33, 130}, K in {1, 63, 64, 65, 200} and N in {1, 15, 16, 17, 48, 100}
# appears, each next to a tile edge of the other two dims (not the full product).
SHAPES = [(1, 1, 1), (15, 63, 15), (16, 64, 16), (17, 65, 17), (33, 200, 48), (130, 65, 100),
          (16, 200, 1), (1, 64, 100), (130, 1, 16), (33, 63, 17), (17, 200, 48), (130, 200, 100)]


def random_int8(rng, shape):
    return rng.integers(-128, 128, size=shape, dtype=np.int8)


def numpy_matmul(a, b):
    return np.asarray(a, np.int64) @ np.asarray(b, np.int64)


def check_exact(a, b):
    got = int8_matmul(a, b)
    assert got.dtype == jnp.int32 and got.shape == (a.shape[0], b.shape[1])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(int8_matmul_reference(a, b)))
    np.testing.assert_array_equal(np.asarray(got, np.int64), numpy_matmul(a, b))


@pytest.mark.parametrize("t,k,n", SHAPES)
def test_every_isa_path(isa, t, k, n):
    rng = np.random.default_rng(t * 10007 + k * 101 + n)
    assert jsp.cpu_isa() == isa
    check_exact(random_int8(rng, (t, k)), random_int8(rng, (k, n)))


@pytest.mark.parametrize("a_value,b_value", [(-128, -128), (127, 127), (-128, 127), (127, -128)])
@pytest.mark.parametrize("t,k,n", [(17, 65, 17), (33, 200, 48), (16, 2048, 16)])
def test_extreme_values(isa, t, k, n, a_value, b_value):
    # All -128 times all -128 is the largest sum (16384 K, past 2**31 / 2**16 at K = 2048) and
    # the case where the shifted a (+ 128) and b's column sums are largest.
    a = np.full((t, k), a_value, np.int8)
    b = np.full((k, n), b_value, np.int8)
    check_exact(a, b)
    assert int(int8_matmul(a, b)[0, 0]) == a_value * b_value * k


def test_one_hot_rows_pick_rows_of_b(isa):
    # Row t of a is the unit vector e_(t mod K): row t of the product is b's row t mod K, which
    # pins down where every byte of the packed tiles lands.
    t, k, n = 33, 65, 48
    a = np.zeros((t, k), np.int8)
    a[np.arange(t), np.arange(t) % k] = 1
    b = random_int8(np.random.default_rng(3), (k, n))
    np.testing.assert_array_equal(np.asarray(int8_matmul(a, b)), b[np.arange(t) % k].astype(np.int32))


def test_jit_and_vmap(isa):
    rng = np.random.default_rng(5)
    a = random_int8(rng, (3, 17, 65))
    b = random_int8(rng, (3, 65, 17))
    want = numpy_matmul(a, b)
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(int8_matmul))(a, b)), want)
    # A shared b (the kernel batch broadcasts it) and a shared a.
    shared_b = jax.vmap(int8_matmul, in_axes=(0, None))(a, b[0])
    np.testing.assert_array_equal(np.asarray(shared_b), numpy_matmul(a, b[0]))
    shared_a = jax.vmap(int8_matmul, in_axes=(None, 0))(a[0], b)
    np.testing.assert_array_equal(np.asarray(shared_a), numpy_matmul(a[0], b))


def test_zero_sized_dims():
    assert int8_matmul(np.zeros((0, 8), np.int8), np.zeros((8, 4), np.int8)).shape == (0, 4)
    empty_k = int8_matmul(np.zeros((3, 0), np.int8), np.zeros((0, 4), np.int8))
    np.testing.assert_array_equal(np.asarray(empty_k), np.zeros((3, 4), np.int32))


@pytest.mark.parametrize("a,b,error,message", [
    (np.zeros((4, 8), np.float32), np.zeros((8, 4), np.int8), TypeError,
     "a must have dtype int8; got float32"),
    (np.zeros((4, 8), np.int8), np.zeros((8, 4), np.uint8), TypeError,
     "b must have dtype int8; got uint8"),
    (np.zeros((8,), np.int8), np.zeros((8, 4), np.int8), ValueError,
     r"a must be a 2-D array \[T, K\]; got shape \(8,\)"),
    (np.zeros((4, 8), np.int8), np.zeros((1, 8, 4), np.int8), ValueError,
     r"b must be a 2-D array \[K, N\]; got shape \(1, 8, 4\)"),
    (np.zeros((4, 8), np.int8), np.zeros((7, 4), np.int8), ValueError,
     r"b.shape\[0\] \(K\) must equal a.shape\[1\] = 8; got b of shape \(7, 4\)"),
    ("not an array", np.zeros((8, 4), np.int8), TypeError, "a must be an array, got str"),
])
def test_bad_arguments_name_the_argument(a, b, error, message):
    with pytest.raises(error, match="int8_matmul: " + message):
        int8_matmul(a, b)


def test_the_target_validates_its_operands():
    # A hand-written ffi_call skips the Python checks: the handler's own must catch it.
    def call(a, b, out_shape, out_dtype=jnp.int32):
        return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(out_shape, out_dtype))(a, b)

    a, b = np.zeros((1, 4, 8), np.int8), np.zeros((1, 8, 5), np.int8)
    cases = [
        (lambda: call(a.astype(np.float32), b, (1, 4, 5)), "a dtype must be int8, got float32"),
        (lambda: call(a, b, (1, 4, 5), jnp.float32), "out dtype must be int32, got float32"),
        (lambda: call(a, b[:, :7], (1, 4, 5)), r"b.shape\[1\] \(K\) must equal a.shape\[2\] = 8"),
        (lambda: call(a, b, (1, 4, 6)), r"out.shape\[2\] \(N\) must equal b.shape\[2\] = 5"),
        (lambda: call(a[0], b, (1, 4, 5)), "a must have rank 3"),
        (lambda: call(np.zeros((2, 4, 8), np.int8), np.zeros((3, 8, 5), np.int8), (3, 4, 5)),
         r"a.shape\[0\] must be 1 or 3"),
    ]
    for run, message in cases:
        with pytest.raises(Exception, match=f"{TARGET}: {message}"):
            jax.block_until_ready(run())


def test_not_exported_at_the_top_level():
    assert not hasattr(jsp, "int8_matmul")
    assert "int8_matmul" in jsp.ops.__all__
