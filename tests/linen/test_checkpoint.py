"""Checkpoints of linen variables with SparseDense layers: orbax and flax.serialization (msgpack)
round trips are bit-exact, the saved size scales with the density, mismatches are refused."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import errors, serialization
from flax import linen as nn

from jaxsparse.linen import SparseDense, SparsityIndices, sparsify


class Net(nn.Module):
    sparsity: str = "2:4"

    @nn.compact
    def __call__(self, x):
        x = nn.relu(SparseDense(8, sparsity=self.sparsity, name="fc1")(x))
        return SparseDense(4, sparsity=self.sparsity, name="fc2")(x)


X = jnp.asarray(np.random.default_rng(0).standard_normal((3, 16)), jnp.float32)


def init(sparsity="2:4", width=16, seed=0):
    return Net(sparsity).init(jax.random.key(seed), jnp.ones((1, width)))


def bits(a):
    a = np.asarray(a)
    return a.view(np.uint32) if a.dtype == np.float32 else a


def assert_bit_exact(restored, original):
    assert jax.tree.structure(restored) == jax.tree.structure(original)  # boxes and metadata
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(original)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(bits(a), bits(b))
    assert np.asarray(restored["sparsity"]["fc1"]["indices"].value).dtype == np.uint8
    np.testing.assert_array_equal(bits(Net().apply(restored, X)), bits(Net().apply(original, X)))


@pytest.fixture(scope="module")
def trained():
    variables = init()
    variables["params"] = jax.tree.map(lambda p: p * 3.0 + 0.25, variables["params"])
    return variables


@pytest.fixture(scope="module")
def orbax_checkpoint(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("orbax") / "net"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, trained)
    return path


def orbax_restore(path, target):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path, abstract)


def test_orbax_round_trip_is_bit_exact(trained, orbax_checkpoint):
    restored = orbax_restore(orbax_checkpoint, init(seed=1))
    assert isinstance(restored["sparsity"]["fc2"]["indices"], SparsityIndices)
    assert_bit_exact(restored, trained)


def test_msgpack_round_trip_is_bit_exact(trained):
    restored = serialization.from_bytes(init(seed=1), serialization.to_bytes(trained))
    assert_bit_exact(restored, trained)


def test_saved_size_scales_with_density():
    x = jnp.ones((1, 512))
    dense = nn.Dense(512).init(jax.random.key(0), x)
    size = {"dense": len(serialization.to_bytes(dense))}
    for pattern in ("2:4", "1:4"):
        size[pattern] = len(serialization.to_bytes(sparsify(dense, pattern)))
    bias = 512 * 4
    # Kept values f32, 1 byte per position, and the positions again at 2 bits.
    for name, kept in (("dense", 512 * 512 * 4), ("2:4", 512 * 256 * 5.25),
                       ("1:4", 512 * 128 * 5.25)):
        assert abs(size[name] - (kept + bias)) / (kept + bias) < 0.002, (name, size)


_ORBAX_MISMATCH = """
import sys, warnings
import jax, jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import linen as nn
import jaxsparse.ops
from jaxsparse.linen import SparseDense

warnings.simplefilter("ignore", jaxsparse.ops.JaxsparseFallbackWarning)

class Net(nn.Module):
    sparsity: str

    @nn.compact
    def __call__(self, x):
        x = nn.relu(SparseDense(8, sparsity=self.sparsity, name="fc1")(x))
        return SparseDense(4, sparsity=self.sparsity, name="fc2")(x)

for pattern, width in (("1:4", 16), ("2:4", 32)):
    target = jax.eval_shape(Net(pattern).init, jax.random.key(0), jnp.ones((1, width)))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.restore(sys.argv[1], target)
    except ValueError as err:
        print("ValueError:", str(err).splitlines()[0])
    else:
        print("restored")
"""


def test_mismatched_checkpoints_are_refused(trained, orbax_checkpoint):
    # orbax, in a subprocess: a refused restore leaves the reads of the other arrays suspended in
    # a closed event loop, and they complain when collected at exit, which the strict warning
    # filter of the test session would report against an unrelated test.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    run = subprocess.run(
        [sys.executable, "-c", _ORBAX_MISMATCH, str(orbax_checkpoint)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 2, run.stdout
    for line in lines:
        assert (
            line.startswith("ValueError: Requested shape")
            and "not compatible with the stored shape" in line
        ), line
    # msgpack restores into any target: the layer refuses the arrays at apply.
    wrong = serialization.from_bytes(init("1:4"), serialization.to_bytes(trained))
    with pytest.raises(
        errors.ScopeParamShapeError,
        match=r"\"values\" in \"/fc1\".*expected to generate shape \(8, 4\).*"
        r"has shape \(8, 8\)",
    ):
        Net("1:4").apply(wrong, X)
    with pytest.raises(ValueError, match="keys"):  # a dense checkpoint into a sparse target
        dense = nn.Dense(8, name="fc1").init(jax.random.key(0), X)
        serialization.from_bytes(init(), serialization.to_bytes(dense))
