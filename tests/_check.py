"""Shared checkers for every op test (CONVENTIONS.md 12): one tolerance table, random operands,
and comparisons against the pure reference and against the dense product."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

# Kernels and references sum in f32 in different orders, then round once to the dtype: the results
# may differ by rounding of the f32 sum (~sqrt(K) eps_f32) plus one ulp of the output dtype.
_TOL = {
    jnp.dtype(jnp.float32): dict(rtol=2e-5, atol=2e-5),
    jnp.dtype(jnp.bfloat16): dict(rtol=1.6e-2, atol=1.6e-2),
    jnp.dtype(jnp.float16): dict(rtol=2e-3, atol=2e-3),
}


def tol(dtype, scale=1.0):
    t = _TOL[jnp.dtype(dtype)]
    return dict(rtol=t["rtol"], atol=t["atol"] * scale)


def assert_close(actual, expected, dtype, scale=1.0, err_msg=""):
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), np.asarray(expected, np.float32), err_msg=err_msg,
        **tol(dtype, scale),
    )


def random_array(key, shape, dtype=jnp.float32):
    """Unit normals of `shape` in `dtype`, drawn by NumPy from the key's bits: jax.random would
    compile its generator once per shape (a quarter of the per-ISA sweeps' time)."""
    seed = np.asarray(jax.random.key_data(key), np.uint32).ravel()
    values = np.random.default_rng(seed).standard_normal(shape, np.float32)
    return jnp.asarray(values.astype(jnp.dtype(dtype)))


def random_nm(key, in_features, out_features, n, m, dtype=jnp.float32, batch=()):
    w = random_array(key, (*batch, in_features, out_features), dtype)
    return jsp.NMSparse.fromdense(w, n=n, m=m)


def sweep(shapes, f16_every=3):
    """(shape..., dtype) cases of a per-ISA sweep: every shape in f32 and bf16, every
    `f16_every`-th in f16 too. f16 runs the kernels' bf16 code with its own conversions (checked on
    a third of the shapes), and each shape and dtype costs the sweep its compiles."""
    return [(*shape, dtype) for index, shape in enumerate(shapes) for dtype in DTYPES
            if dtype != jnp.float16 or index % f16_every == 0]


def once_after(cases, keep=1, *, unpack=True):
    """`cases` for `pytest.mark.parametrize`, each past the first `keep` marked `once`
    (tests/conftest.py): CI's older jax runs the first `keep` (the op's lowering and rules on that
    version), the newest jax all of them (the kernels' numerics over shapes, which do not depend
    on the jax version). `unpack`: each case is a tuple of several argnames' values; a case may
    be a `pytest.param` already (its id and marks kept)."""
    cases = [case if isinstance(case, _ParameterSet) else
             pytest.param(*(case if unpack else (case,))) for case in cases]
    return [pytest.param(*case.values, id=case.id,
                         marks=(*case.marks, *(() if index < keep else (pytest.mark.once,))))
            for index, case in enumerate(cases)]


_ParameterSet = type(pytest.param(None))  # What pytest.param returns (its values, marks, id).


def keys(seed, count):
    return jax.random.split(jax.random.key(seed), count)


def scale_for(k):
    """Outputs of sums over k unit normals have magnitude ~sqrt(k): scale atol with it."""
    return max(1.0, float(np.sqrt(max(k, 1))))
