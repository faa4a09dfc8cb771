"""Checkpoints of nnx models with sparse layers: orbax and flax.serialization (msgpack) round trips
are bit-exact, the saved size scales with the density, and mismatched checkpoints are refused."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx, serialization

from jaxsparse.nn import SparseLinear, SparsityIndices


def normal(seed, shape, dtype=jnp.float32):
    """Test data from NumPy's generator (jax.random would compile a sampler for every shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


class Net(nnx.Module):
    def __init__(self, pattern="2:4", width=16, seed=0):
        rngs = nnx.Rngs(seed)
        self.fc1 = SparseLinear(width, 8, sparsity=pattern, rngs=rngs)
        self.fc2 = SparseLinear(8, 4, sparsity=pattern, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


def bits(a):
    a = np.asarray(a)
    return a.view(np.uint32) if a.dtype == np.float32 else a


def assert_bit_exact(restored, original, x):
    a, b = nnx.state(restored), nnx.state(original)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, va), (_, vb) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
        assert type(va) is type(vb), path
        assert np.asarray(va[...]).dtype == np.asarray(vb[...]).dtype, path
        np.testing.assert_array_equal(bits(va[...]), bits(vb[...]), err_msg=str(path))
    assert restored.fc1.indices[...].dtype == jnp.uint8
    np.testing.assert_array_equal(bits(restored(x)), bits(original(x)))


def msgpack_save(model) -> bytes:
    return serialization.to_bytes(nnx.to_pure_dict(nnx.state(model)))


def msgpack_restore(model, data: bytes):
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, serialization.from_bytes(nnx.to_pure_dict(state), data))
    nnx.update(model, state)
    return model


def orbax_restore(path, make):
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(path, abstract)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def trained():
    """A model whose values moved away from their initialization (so restoring is visible)."""
    model = Net()
    for layer in (model.fc1, model.fc2):
        layer.values.set_value(layer.values[...] * 3.0 + 0.25)
        layer.bias.set_value(layer.bias[...] - 0.5)
    return model


@pytest.fixture(scope="module")
def orbax_checkpoint(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("orbax") / "net"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, nnx.state(trained))
    return path


def test_orbax_round_trip_is_bit_exact(trained, orbax_checkpoint):
    restored = orbax_restore(orbax_checkpoint, lambda: Net(seed=1))
    assert isinstance(restored.fc1.indices, SparsityIndices)
    assert_bit_exact(restored, trained, normal(8, (3, 16)))


def test_msgpack_round_trip_is_bit_exact(trained):
    restored = msgpack_restore(Net(seed=1), msgpack_save(trained))
    assert not np.array_equal(Net(seed=1).fc1.values[...], trained.fc1.values[...])
    assert_bit_exact(restored, trained, normal(8, (3, 16)))


def test_saved_size_scales_with_density(capsys):
    """msgpack bytes of a [512, 512] layer: values f32 + 1 byte per kept position + the same
    positions at 2 bits (+ bias)."""
    size, features = {}, 512
    dense = nnx.Linear(features, features, rngs=nnx.Rngs(0))
    size["dense"] = len(msgpack_save(dense))
    for pattern in ("2:4", "1:4"):
        size[pattern] = len(msgpack_save(SparseLinear.from_dense(dense, pattern)))
    bias = features * 4
    expected = {
        "dense": features * features * 4 + bias,
        "2:4": features * features // 2 * (4 + 1 + 0.25) + bias,
        "1:4": features * features // 4 * (4 + 1 + 0.25) + bias,
    }
    for name, want in expected.items():  # msgpack adds ~100 bytes of keys and headers
        assert abs(size[name] - want) / want < 0.001, (name, size, expected)
    for name in ("2:4", "1:4"):  # 0.6572 and 0.3294 with the bias (0.65625 and 0.328 without)
        ratio, want = size[name] / size["dense"], expected[name] / expected["dense"]
        assert abs(ratio - want) < 0.001, (name, ratio, want)
    with capsys.disabled():
        print(
            f"\nmsgpack bytes of a [512, 512] layer: {size} "
            f"(2:4 / dense = {size['2:4'] / size['dense']:.4f}, "
            f"1:4 / dense = {size['1:4'] / size['dense']:.4f})"
        )


# ----------------------------------------------------------------------------- mismatches
_ORBAX_MISMATCH = """
import sys, warnings
import orbax.checkpoint as ocp
from flax import nnx
import jaxsparse.ops
from jaxsparse.nn import SparseLinear

warnings.simplefilter("ignore", jaxsparse.ops.JaxsparseFallbackWarning)

class Net(nnx.Module):
    def __init__(self, pattern, width):
        rngs = nnx.Rngs(0)
        self.fc1 = SparseLinear(width, 8, sparsity=pattern, rngs=rngs)
        self.fc2 = SparseLinear(8, 4, sparsity=pattern, rngs=rngs)

for pattern, width in (("1:4", 16), ("2:4", 32)):
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Net(pattern, width)))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.restore(sys.argv[1], abstract)
    except ValueError as err:
        print("ValueError:", str(err).splitlines()[0])
    else:
        print("restored")
"""


def test_orbax_refuses_a_checkpoint_of_another_pattern_or_shape(orbax_checkpoint):
    # In a subprocess: a refused orbax restore leaves the reads of the other arrays suspended in a
    # closed event loop, and they complain when collected at exit, which the strict warning filter
    # of the test session would report against an unrelated test.
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


def test_msgpack_checkpoint_of_another_pattern_is_refused_at_first_use(trained):
    model = msgpack_restore(Net(pattern="1:4"), msgpack_save(trained))  # 2:4 data, 1:4 layers
    x = jnp.ones((2, 16))
    message = (
        r"values must have shape \(8, 4\) for a 1:4 layer with in_features=16, "
        r"out_features=8; got \(8, 8\) \(a checkpoint of another pattern or shape"
    )
    with pytest.raises(ValueError, match=message):
        model(x)
    with pytest.raises(ValueError, match=message):
        nnx.jit(lambda m, x: m(x))(model, x)
    with pytest.raises(ValueError, match=message):
        _ = model.fc1.weight


def test_msgpack_checkpoint_of_another_shape_is_refused_at_first_use(trained):
    model = msgpack_restore(Net(width=32), msgpack_save(trained))
    with pytest.raises(ValueError, match=r"in_features=32, out_features=8; got \(8, 8\)"):
        model(jnp.ones((2, 32)))


def test_a_dense_checkpoint_does_not_load_into_a_sparse_model():
    dense = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="keys"):
        msgpack_restore(SparseLinear(16, 8, sparsity="2:4", rngs=nnx.Rngs(0)), msgpack_save(dense))
