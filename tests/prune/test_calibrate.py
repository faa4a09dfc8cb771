"""Calibration (nnx and linen Gram sums without touching the model), one_shot over a model
(one pass and sequential), and sparsify holding the solvers' weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsparse as jsp
from jaxsparse import prune
from tests._check import once_after


class Branches(nnx.Module):
    """Two layers reading the same input, then one reading their sum: shared inputs and a
    layer called twice."""

    def __init__(self, rngs):
        self.left = nnx.Linear(16, 24, rngs=rngs)
        self.right = nnx.Linear(16, 24, rngs=rngs)
        self.head = nnx.Linear(24, 8, rngs=rngs)

    def __call__(self, x, *, twice=False):
        h = nnx.relu(self.left(x)) + nnx.relu(self.right(x))
        y = self.head(h)
        return y + self.head(h * 0.5) if twice else y


def mlp(seed=0):
    return nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(seed)), nnx.relu,
                          nnx.Linear(32, 8, rngs=nnx.Rngs(seed + 1)))


def inputs(seed, n=3, shape=(10, 16)):
    keys = jax.random.split(jax.random.key(seed), n)
    return [jax.random.normal(k, shape) for k in keys]


def gram_of(x):
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    return x.T @ x


def assert_gram(stats, want, count):
    np.testing.assert_allclose(stats.gram, want, rtol=1e-5, atol=1e-4)
    assert stats.count == count and stats.gram.dtype == jnp.float32


# ---------------------------------------------------------------------- nnx
def test_nnx_grams_are_the_sums_over_batches():
    model = mlp()
    batches = inputs(0)
    stats = prune.calibrate(model, batches, progress=False)
    assert list(stats) == ["layers/0", "layers/2"]
    first = sum(gram_of(x) for x in batches)
    hidden = sum(gram_of(jax.nn.relu(model.layers[0](x))) for x in batches)
    assert_gram(stats["layers/0"], first, 30)
    assert_gram(stats["layers/2"], hidden, 30)


def test_nnx_batches_as_tuples_and_dicts_a_layer_called_twice_and_the_model_untouched():
    model = Branches(nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model))
    x = inputs(1, n=1)[0]
    stats = prune.calibrate(model, [{"x": x, "twice": True}, (x,)], progress=False)
    h = jax.nn.relu(model.left(x)) + jax.nn.relu(model.right(x))
    assert_gram(stats["left"], 2 * gram_of(x), 20)
    assert_gram(stats["head"], 2 * gram_of(h) + gram_of(h * 0.5), 30)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)
    assert type(model.left).__call__ is nnx.Linear.__call__


def test_nnx_filter_and_bad_arguments():
    model = mlp()
    assert list(prune.calibrate(model, inputs(2, 1), filter="2$", progress=False)) == ["layers/2"]
    with pytest.raises(ValueError, match="batches is empty"):
        prune.calibrate(model, [], progress=False)
    with pytest.raises(TypeError, match="batches must be an iterable"):
        prune.calibrate(model, jnp.ones((4, 16)), progress=False)
    with pytest.raises(TypeError, match="model must be an nnx.Module"):
        prune.calibrate(lambda x: x, inputs(2, 1), progress=False)


def test_progress_bar_goes_to_stderr(capsys):
    prune.calibrate(mlp(), inputs(3, 2), progress=True)
    assert "calibration" in capsys.readouterr().err


# ---------------------------------------------------------------------- linen
class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(32, name="fc1")(x))
        return Block(name="block")(h)


class Block(nn.Module):
    @nn.compact
    def __call__(self, h):
        return nn.Dense(8, name="out")(h)


def test_linen_grams_are_the_sums_over_batches():
    net = LinenNet()
    batches = inputs(4)
    variables = net.init(jax.random.key(0), batches[0])
    stats = prune.calibrate_linen(net, variables, batches, progress=False)
    assert list(stats) == ["fc1", "block/out"]
    kernel, bias = variables["params"]["fc1"]["kernel"], variables["params"]["fc1"]["bias"]
    assert_gram(stats["fc1"], sum(gram_of(x) for x in batches), 30)
    assert_gram(stats["block/out"], sum(gram_of(jax.nn.relu(x @ kernel + bias))
                                        for x in batches), 30)
    only = prune.calibrate_linen(net, variables, batches, filter="^block", progress=False)
    assert list(only) == ["block/out"]


def test_linen_bad_arguments():
    with pytest.raises(TypeError, match="module must be a flax.linen Module"):
        prune.calibrate_linen(mlp(), {}, inputs(5, 1))
    with pytest.raises(TypeError, match="variables must be"):
        prune.calibrate_linen(LinenNet(), [1], inputs(5, 1))


# ---------------------------------------------------------------------- one_shot
def test_one_pass_solves_each_layer_from_the_dense_model():
    model = mlp()
    batches = inputs(6, n=4, shape=(64, 16))
    weights = prune.one_shot(model, batches, "2:4", progress=False)
    stats = prune.calibrate(model, batches, progress=False)
    for name, layer in (("layers/0", model.layers[0]), ("layers/2", model.layers[2])):
        want = prune.sparsegpt(layer.kernel[...], stats[name].gram, jsp.NM(2, 4))
        np.testing.assert_array_equal(weights[name].todense(), want.todense())


def test_sequential_sees_the_compressed_layers_before():
    model = mlp()
    batches = inputs(7, n=4, shape=(64, 16))
    weights = prune.one_shot(model, batches, "2:4", sequential=True, progress=False)
    one_pass = prune.one_shot(model, batches, "2:4", progress=False)
    # The first layer's inputs are the model's: both modes agree there.
    np.testing.assert_array_equal(weights["layers/0"].todense(),
                                  one_pass["layers/0"].todense())
    first = weights["layers/0"].todense()
    bias = model.layers[0].bias[...]
    gram = sum(gram_of(jax.nn.relu(x @ first + bias)) for x in batches)
    want = prune.sparsegpt(model.layers[2].kernel[...], jnp.asarray(gram, jnp.float32), "2:4")
    np.testing.assert_allclose(weights["layers/2"].todense(), want.todense(), rtol=1e-4,
                               atol=1e-4)
    assert not np.allclose(weights["layers/2"].todense(), one_pass["layers/2"].todense())


def test_sequential_and_one_pass_agree_on_layers_that_read_the_same_input():
    model = Branches(nnx.Rngs(1))
    batches = inputs(8, n=2, shape=(64, 16))
    spec = {"left": "2:4", "right": "2:4"}
    a = prune.one_shot(model, batches, spec, sequential=True, progress=False)
    b = prune.one_shot(model, batches, spec, progress=False)
    assert list(a) == list(b) == ["left", "right"]
    for name in a:
        np.testing.assert_array_equal(a[name].todense(), b[name].todense())


# CI's older jax: the first spec (the calibration and serving through Flax); the others differ
# in the solvers' numerics, the same on every jax (`once`).
@pytest.mark.parametrize("spec", once_after(["2:4", jsp.Int4(16), jsp.Int4(16, jsp.NM(2, 4)),
                                             jsp.Blocks(8, density=0.5)], unpack=False), ids=str)
def test_one_shot_model_beats_magnitude_and_serves(spec):
    model = mlp(3)
    calibration, held_out = inputs(9, n=4, shape=(64, 16)), inputs(10, n=1, shape=(256, 16))[0]
    weights = prune.one_shot(model, calibration, spec, sequential=True, progress=False)
    compressed = jsp.nn.sparsify(model, spec, method=weights)
    magnitude = jsp.nn.sparsify(model, spec)
    assert type(compressed.layers[0]) is jsp.nn.SparseLinear
    dense_out = model(held_out)

    def error(m):
        return float(jnp.sum((m(held_out) - dense_out) ** 2))

    assert error(compressed) < error(magnitude)
    np.testing.assert_allclose(compressed.layers[0].weight.todense(),
                               weights["layers/0"].todense(), rtol=1e-6)


def test_layers_the_spec_cannot_take_are_left_out(caplog):
    model = nnx.Sequential(nnx.Linear(16, 24, rngs=nnx.Rngs(0)), nnx.Linear(24, 4,
                                                                            rngs=nnx.Rngs(1)))
    with caplog.at_level("INFO", logger="jaxsparse"):
        weights = prune.one_shot(model, inputs(11, 1), jsp.Int4(16), progress=False)
    assert list(weights) == ["layers/0"]
    assert "skipped layers/1" in caplog.text and "group_size=16" in caplog.text
    sparse = jsp.nn.sparsify(model, jsp.Int4(16), method=weights)
    assert type(sparse.layers[1]) is nnx.Linear


def test_sparsify_checks_the_weights_it_is_given():
    model = mlp()
    weights = prune.one_shot(model, inputs(12, 1, (64, 16)), "2:4", progress=False)
    with pytest.raises(ValueError, match="is 2:4; the layer's sparsity is 64:2:8|sparsity"):
        jsp.nn.sparsify(model, "1:4", method=weights)
    swapped = {"layers/0": weights["layers/2"]}
    with pytest.raises(ValueError, match="has shape"):
        jsp.nn.sparsify(model, "2:4", method=swapped)
    with pytest.raises(TypeError, match="method mapping"):
        jsp.nn.sparsify(model, "2:4", method={"layers/0": jnp.ones((16, 32))})


def test_linen_sparsify_holds_the_solvers_weights():
    net = LinenNet()
    batches = inputs(13, n=2, shape=(64, 16))
    variables = net.init(jax.random.key(1), batches[0])
    stats = prune.calibrate_linen(net, variables, batches, progress=False)
    kernel = variables["params"]["fc1"]["kernel"]
    weight = prune.sparsegpt(kernel, stats["fc1"].gram, "2:4")
    sparse = jsp.linen.sparsify(variables, "2:4", method={"fc1": weight})
    assert "values" in sparse["params"]["fc1"] and "kernel" in sparse["params"]["block"]["out"]
    np.testing.assert_array_equal(sparse["params"]["fc1"]["values"], weight.values)


def test_one_shot_from_given_statistics_equals_one_pass():
    model = mlp(4)
    batches = inputs(14, n=2, shape=(64, 16))
    stats = prune.calibrate(model, batches, progress=False)
    a = prune.one_shot(model, None, jsp.Int4(16), stats=stats, progress=False)
    b = prune.one_shot(model, batches, jsp.Int4(16), progress=False)
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_array_equal(a[name].qweight, b[name].qweight)
    with pytest.raises(ValueError, match="stats= is one pass"):
        prune.one_shot(model, batches, "2:4", stats=stats, sequential=True, progress=False)
    with pytest.raises(TypeError, match="stats must be"):
        prune.one_shot(model, None, "2:4", stats={"layers/0": 1}, progress=False)
    with pytest.raises(ValueError, match="the spec mapping is empty"):
        prune.one_shot(model, None, {}, stats=stats, progress=False)
    with pytest.raises(ValueError, match=r"spec\['head'\]"):
        prune.one_shot(model, None, {"head": "5:4"}, stats=stats, progress=False)


def test_one_shot_passes_the_refit_to_every_layer():
    model = mlp(5)
    stats = prune.calibrate(model, inputs(16, n=2, shape=(64, 16)), progress=False)
    refit = prune.one_shot(model, None, "2:4", stats=stats, progress=False)
    swept = prune.one_shot(model, None, "2:4", stats=stats, progress=False, refit=0)
    assert sorted(refit) == sorted(swept) == ["layers/0", "layers/2"]
    for name, module in nnx.iter_modules(model):
        key = "/".join(map(str, name))
        if key not in refit:
            continue
        w, gram = module.kernel[...], stats[key].gram
        np.testing.assert_array_equal(refit[key].todense(),
                                      prune.sparsegpt(w, gram, "2:4").todense())
        np.testing.assert_array_equal(swept[key].todense(),
                                      prune.sparsegpt(w, gram, "2:4", refit=0).todense())
        assert not np.array_equal(refit[key].todense(), swept[key].todense())
    with pytest.raises(ValueError, match=r"one_shot: refit must be in \[0"):
        prune.one_shot(model, None, "2:4", stats=stats, progress=False, refit=-1)


def test_sequential_stages_compress_a_stage_from_one_pass():
    model = Branches(nnx.Rngs(2))
    batches = inputs(15, n=2, shape=(64, 16))
    staged = prune.one_shot(model, batches, "2:4", sequential=r"^(left|right)", progress=False)
    per_layer = prune.one_shot(model, batches, "2:4", sequential=True, progress=False)
    one_pass = prune.one_shot(model, batches, "2:4", progress=False)
    for name in ("left", "right"):  # Same inputs: every mode agrees.
        np.testing.assert_array_equal(staged[name].todense(), one_pass[name].todense())
    # head is its own stage after both branches: as in the per-layer sequential mode.
    np.testing.assert_array_equal(staged["head"].todense(), per_layer["head"].todense())
    assert not np.array_equal(staged["head"].todense(), one_pass["head"].todense())
    with pytest.raises(ValueError, match="not a valid regular expression"):
        prune.one_shot(model, batches, "2:4", sequential="(", progress=False)
    with pytest.raises(TypeError, match="sequential must be"):
        prune.one_shot(model, batches, "2:4", sequential=1, progress=False)
