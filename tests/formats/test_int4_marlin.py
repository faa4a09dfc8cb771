"""int4 weights in the MARLIN kernels' device layout (jaxsparse/formats/int4_marlin.py): packed
once from the canonical form and back bit for bit, refused on a device they were not packed for,
and multiplied by the CUDA kernel (under the SIMT emulator, in a subprocess) like the canonical
weight."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp

SPECS = [jsp.Int4(32), jsp.Int4(None), jsp.Int4(32, jsp.NM(2, 4)), jsp.Int4(None, jsp.NM(2, 4))]


def weight(k=128, n=64, dtype=jnp.bfloat16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((k, n), np.float32), dtype)


def same_leaves(a, b) -> bool:
    return all(x.dtype == y.dtype and bool(jnp.array_equal(x, y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
def test_packed_once_and_back_bit_for_bit(spec, dtype):
    wq = jsp.fromdense(weight(dtype=dtype), spec)
    wp = jax.jit(lambda w: w.packed_for("cuda"))(wq)
    assert isinstance(wp, jsp.Int4NMMarlinWeight if spec.sparsity else jsp.Int4MarlinWeight)
    assert (wp.device, wq.device) == ("cuda", "cpu")
    assert (wp.shape, wp.dtype, wp.spec, wp.in_features) == (wq.shape, wq.dtype, wq.spec, 128)
    back = wp.packed_for("cpu")
    assert type(back) is type(wq) and same_leaves(back, wq)
    assert wp.packed_for("cuda") is wp and wq.packed_for("cpu") is wq
    np.testing.assert_array_equal(np.asarray(wp.todense()), np.asarray(wq.todense()))
    np.testing.assert_array_equal(np.asarray(wp.mask()), np.asarray(wq.mask()))
    # A pytree like the others: its arrays are frozen leaves, its statics the spec's.
    leaves, tree = jax.tree.flatten(wp)
    assert same_leaves(jax.tree.unflatten(tree, leaves), wp)
    assert wp.arrays_with_role(jsp.formats.FROZEN) == wp.array_names()
    other = jnp.float16 if dtype == jnp.bfloat16 else jnp.bfloat16
    assert same_leaves(wp.astype(other).packed_for("cpu"), wq.astype(other))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_a_cuda_layout_is_refused_on_the_cpu(spec):
    wp = jsp.fromdense(weight(), spec).packed_for("cuda")
    x = jnp.ones((3, 128), jnp.bfloat16)
    for path in ("sparse", "engine", "dense"):  # No path unpacks the layout per call.
        with pytest.raises(ValueError, match="packed for CUDA"):
            jsp.matmul(x, wp, path=path)
    with pytest.raises(ValueError, match="packed for CUDA"):
        jax.jit(lambda x, w: x @ w)(x, wp)


def test_bad_devices_and_shapes_are_named():
    wq = jsp.fromdense(weight(), jsp.Int4(32))
    with pytest.raises(ValueError, match="device must be one of"):
        wq.packed_for("tpu")
    with pytest.raises(ValueError, match="device must be one of"):
        wq.packed_for("cuda").packed_for("gpu")
    stack = jsp.fromdense(jnp.stack([weight(), weight(seed=1)]), jsp.Int4(32))
    with pytest.raises(ValueError, match="one weight"):
        stack.packed_for("cuda")
    with pytest.raises(ValueError, match="64"):  # in = 32 is below the layout's k tile.
        jsp.fromdense(weight(k=32), jsp.Int4(32)).packed_for("cuda")
    with pytest.raises(ValueError):  # Groups of 8 are not whole mma k-steps.
        jsp.fromdense(weight(), jsp.Int4(8)).packed_for("cuda")
    with pytest.raises(TypeError, match="bfloat16|float16"):  # f32: no tensor-core dtype.
        jsp.fromdense(weight(dtype=jnp.float32), jsp.Int4(32)).packed_for("cuda")


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_constructors_validate_the_packed_arrays(spec):
    wp = jsp.fromdense(weight(), spec).packed_for("cuda")
    cls = type(wp)
    rebuilt = cls.from_arrays(wp.spec, wp.in_features, wp.arrays())
    assert same_leaves(rebuilt, wp) and rebuilt.spec == wp.spec
    assert same_leaves(wp.replace(packed_scales=wp.packed_scales * 1), wp)
    assert same_leaves(jax.jit(lambda w: w.replace(packed_scales=w.packed_scales * 1))(wp), wp)
    with pytest.raises(ValueError, match="packed_scales must be"):
        wp.replace(packed_scales=wp.packed_scales[:, :32])
    with pytest.raises(TypeError, match="packed_qweight must be int32"):
        wp.replace(packed_qweight=wp.packed_qweight.astype(jnp.uint32))
    with pytest.raises(ValueError, match="holds in_features = 128; got in_features=256"):
        cls.from_arrays(wp.spec, 256, wp.arrays())
    with pytest.raises(ValueError, match="int8"):  # CPU only; dense int4 only.
        cls.from_arrays(spec._replace(activations="int8"), 128, wp.arrays())
    if spec.sparsity:
        with pytest.raises(ValueError, match="two distinct positions"):
            wp.replace(packed_meta=jnp.zeros_like(wp.packed_meta))


_EMULATED = textwrap.dedent("""
    import jax.numpy as jnp, numpy as np, jaxsparse as jsp
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((128, 64), np.float32), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((5, 128), np.float32), jnp.bfloat16)
    for spec in (jsp.Int4(32), jsp.Int4(32, jsp.NM(2, 4))):
        wq = jsp.fromdense(w, spec)
        want = np.asarray(x.astype(jnp.float32) @ wq.todense().astype(jnp.float32))
        got = np.asarray((x @ wq.packed_for("cuda")).astype(jnp.float32))
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=0.3)
    print("ok")
""")


def test_the_cuda_layout_multiplies_under_the_emulator():
    env = {**os.environ, "JAXSPARSE_EMULATE_CUDA": "1", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", _EMULATED], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
