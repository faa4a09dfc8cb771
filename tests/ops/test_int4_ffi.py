"""The four int4 CPU targets called directly (`jax.ffi.ffi_call`: no Python checks in between)
against a NumPy float64 oracle that packs the nibbles and positions itself, from the layout in
docs/ffi_abi.md: a check of the ABI that shares no code with jaxsparse/formats/int4.py or the pure
references (tests/ops/test_int4_kernels.py checks the kernels through the public wrappers).

Every ISA the machine supports; f32, bf16, f16; T across the token blocks and the many-token path;
N ragged around the 16-lane vectors and the 64-output tasks; group sizes 32, 64, 128 and K (one
group per column, also at K = 1000); broadcast and real batch dims on either side; extreme nibbles
(0 and 15); 2:4 positions unsorted and repeated; the handlers' own errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp
from tests._check import assert_close, scale_for

TARGETS = {
    "dense": ("jaxsparse_int4_matmul", "jaxsparse_int4_matmul_t"),
    "2:4": ("jaxsparse_int4_nm_matmul", "jaxsparse_int4_nm_matmul_t"),
}


def f64(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def nibbles(rng, shape):
    """Unsigned nibbles 0..15, a fifth of them at the extremes 0 and 15."""
    u = rng.integers(0, 16, shape)
    extreme = rng.random(shape)
    u[extreme < 0.1], u[extreme > 0.9] = 0, 15
    return u


def dense_weight(rng, k, n, g, bw, dtype):
    """(qweight, scales) in the target's layout and W [Bw, K, N] in float64."""
    u = nibbles(rng, (bw, k, n))
    qweight = (u[:, 0::2] | u[:, 1::2] << 4).astype(np.uint8)
    scales = jnp.asarray(rng.uniform(0.01, 0.1, (bw, k // g, n)), dtype)
    w = (u - 8) * np.repeat(f64(scales), g, axis=1)
    return (qweight, scales), w


def sparse_weight(rng, k, n, g, bw, dtype):
    """(qweight, positions, scales) of 2:4 with positions drawn independently (unsorted and
    repeated ones included: the kernels add, they must not assume p0 < p1), and W."""
    u = nibbles(rng, (bw, k // 4, n, 2))
    p = rng.integers(0, 4, (bw, k // 4, n, 2))
    qweight = (u[..., 0] | u[..., 1] << 4).astype(np.uint8)
    code = p[..., 0] | p[..., 1] << 2  # [Bw, K/4, N], one 2:4 group each
    positions = (code[:, 0::2] | code[:, 1::2] << 4).astype(np.uint8)
    scales = jnp.asarray(rng.uniform(0.01, 0.1, (bw, k // g, n)), dtype)
    s = np.repeat(f64(scales), g // 4, axis=1)  # [Bw, K/4, N]: each group's scale
    w = np.zeros((bw, k, n))
    b, j, o = np.meshgrid(np.arange(bw), np.arange(k // 4), np.arange(n), indexing="ij")
    for half in (0, 1):
        np.add.at(w, (b, 4 * j + p[..., half], o), (u[..., half] - 8) * s)
    return (qweight, positions, scales), w


def call(target, out_shape, dtype, *operands, group_size):
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, dtype))(
        *operands, group_size=np.int32(group_size))


# (T, K, N, g, Bx, Bw): T across 1-4 (the few-token kernels and their token tails), 5, 16, 17,
# 33 and 70 (several token blocks, the many-token path), 0; N of 1, 15, 17 (a vector and a
# tail), 40, 130 (two 64-output tasks and a 2-lane tail); one group per column at K = 128, 64 and
# 1000 (the latter spanning many 128-input chunks of the streaming forward).
CASES = [
    (1, 64, 1, 32, 1, 1),
    (1, 256, 130, 64, 1, 2),
    (2, 128, 15, 128, 2, 1),
    (3, 192, 17, 64, 2, 2),
    (5, 64, 40, 64, 1, 1),
    (16, 96, 130, 32, 1, 1),
    (17, 128, 40, 128, 2, 1),
    (33, 64, 17, 32, 1, 2),
    (70, 128, 15, 64, 1, 1),
    (0, 64, 15, 32, 2, 1),
    (1, 1000, 40, 1000, 1, 1),
    (4, 1024, 17, 128, 1, 2),
]
HALF_CASES = [CASES[i] for i in (1, 3, 6, 10)]
PARAMS = [(jnp.float32, c) for c in CASES] + [
    (d, c) for d in (jnp.bfloat16, jnp.float16) for c in HALF_CASES]


@pytest.mark.parametrize("form", ["dense", "2:4"])
@pytest.mark.parametrize("dtype,case", PARAMS, ids=lambda p: str(getattr(p, "__name__", p)))
def test_targets_against_float64(isa, form, dtype, case):
    t, k, n, g, bx, bw = case
    assert jsp.cpu_isa() == isa
    rng = np.random.default_rng(k * 1000 + n * 10 + t)
    make = dense_weight if form == "dense" else sparse_weight
    weight, w = make(rng, k, n, g, bw, dtype)
    x = jnp.asarray(rng.standard_normal((bx, t, k)), dtype)
    dy = jnp.asarray(rng.standard_normal((bx, t, n)), dtype)
    b = max(bx, bw)
    forward, backward = TARGETS[form]
    y = call(forward, (b, t, n), dtype, x, *weight, group_size=g)
    # |W| ~ 0.2 on average: sums over K of unit normals times W are ~0.2 sqrt(K).
    assert_close(y, f64(x) @ w, dtype, 0.3 * scale_for(k), err_msg=f"{isa} {form} y")
    dx = call(backward, (b, t, k), dtype, dy, *weight, group_size=g)
    assert_close(dx, f64(dy) @ np.swapaxes(w, 1, 2), dtype, 0.3 * scale_for(n),
                 err_msg=f"{isa} {form} dx")


@pytest.mark.parametrize("form", ["dense", "2:4"])
def test_zero_sized_dimensions(isa, form):
    """N = 0 and K = 0 are valid: the products are empty or zero."""
    rng = np.random.default_rng(3)
    make = dense_weight if form == "dense" else sparse_weight
    forward, backward = TARGETS[form]
    no_outputs, _ = make(rng, 64, 0, 32, 1, jnp.float32)
    assert call(forward, (1, 3, 0), jnp.float32, jnp.ones((1, 3, 64)), *no_outputs,
                group_size=32).shape == (1, 3, 0)
    dx = call(backward, (1, 3, 64), jnp.float32, jnp.ones((1, 3, 0)), *no_outputs, group_size=32)
    assert dx.shape == (1, 3, 64) and not np.any(np.asarray(dx))
    no_inputs, _ = make(rng, 0, 5, 8, 1, jnp.float32)
    y = call(forward, (1, 3, 5), jnp.float32, jnp.ones((1, 3, 0)), *no_inputs, group_size=8)
    assert y.shape == (1, 3, 5) and not np.any(np.asarray(y))


def test_the_handlers_validate_their_operands():
    """A hand-written ffi_call skips the Python checks: the handlers' own must catch each error,
    naming the target, the operand, what was expected and what came."""
    f32 = jnp.float32
    x, q, s = jnp.ones((1, 4, 64)), np.zeros((1, 32, 8), np.uint8), jnp.ones((1, 2, 8))
    pq, pos = np.zeros((1, 16, 8), np.uint8), np.zeros((1, 8, 8), np.uint8)
    mm, mm_t = TARGETS["dense"]
    nm, nm_t = TARGETS["2:4"]
    cases = [
        (mm, lambda: call(mm, (1, 4, 8), f32, x, q, s, group_size=48),
         "attribute group_size must divide K = 64 and be a multiple of 2, got 48"),
        (mm, lambda: call(mm, (1, 4, 8), f32, x, q, s, group_size=1),
         r"attribute group_size must be in \[2, "),
        (mm, lambda: call(mm, (1, 4, 8), f32, x, q, jnp.ones((1, 3, 8)), group_size=32),
         r"scales.shape\[1\] \(K/group_size\) must equal K/group_size = 2, got 3"),
        (mm, lambda: call(mm, (1, 4, 8), f32, x, q, s.astype(jnp.float16), group_size=32),
         r"scales dtype must be float32 \(x's\), got float16"),
        (mm, lambda: call(mm, (1, 4, 8), f32, x, q.astype(np.int8), s, group_size=32),
         "qweight dtype must be uint8, got int8"),
        (mm, lambda: call(mm, (1, 4, 8), f32, x, q[:, :31], s, group_size=32),
         r"qweight.shape\[1\] \(K/2\) must equal K/2 = 32, got 31"),
        (mm, lambda: call(mm, (1, 4, 8), jnp.bfloat16, x, q, s, group_size=32),
         r"y dtype must be float32 \(x's\), got bfloat16"),
        (mm, lambda: call(mm, (3, 4, 8), f32, jnp.ones((2, 4, 64)), np.zeros((3, 32, 8), np.uint8),
                          jnp.ones((3, 2, 8)), group_size=32),
         r"x.shape\[0\] must be 1 or 3, got 2"),
        (mm, lambda: call(mm, (1, 4, 8), f32, x, q, jnp.ones((2, 2, 8)), group_size=32),
         r"scales.shape\[0\] must equal qweight.shape\[0\] = 1, got 2"),
        (mm, lambda: call(mm, (1, 4, 8), f32, x[0], q, s, group_size=32),
         "x must have rank 3"),
        (mm_t, lambda: call(mm_t, (1, 4, 128), f32, jnp.ones((1, 4, 8)), q, s, group_size=32),
         r"qweight.shape\[1\] \(K/2\) must equal K/2 = 64, got 32"),
        (nm, lambda: call(nm, (1, 1, 8), f32, jnp.ones((1, 1, 96)), np.zeros((1, 24, 8), np.uint8),
                          np.zeros((1, 12, 8), np.uint8), jnp.ones((1, 8, 8)), group_size=12),
         "attribute group_size must divide K = 96 and be a multiple of 8, got 12"),
        (nm, lambda: call(nm, (1, 4, 8), f32, x, pq, pos[:, :7], s, group_size=32),
         r"positions.shape\[1\] \(K/8\) must equal K/8 = 8, got 7"),
        (nm, lambda: call(nm, (1, 4, 8), f32, x, pq, pos.astype(np.int32), s, group_size=32),
         "positions dtype must be uint8, got int32"),
        (nm, lambda: call(nm, (1, 4, 8), f32, x, q, pos, s, group_size=32),
         r"qweight.shape\[1\] \(K/4\) must equal K/4 = 16, got 32"),
        (nm_t, lambda: call(nm_t, (1, 4, 64), f32, jnp.ones((1, 4, 8)), pq, pos,
                            jnp.ones((1, 4, 8)), group_size=32),
         r"scales.shape\[1\] \(K/group_size\) must equal K/group_size = 2, got 4"),
    ]
    for target, run, message in cases:
        with pytest.raises(Exception, match=f"{target}: {message}"):
            jax.block_until_ready(run())
