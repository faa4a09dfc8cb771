"""jaxsparse.nn.sparsify / densify: what is replaced, what is skipped and why (logged), the
argument left untouched, filters, and the same outputs as the masked dense model."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsparse as jsp
from jaxsparse.nn import SparseLinear, densify, sparsify
from jaxsparse.prune import Unstructured
from tests._check import assert_close, scale_for


def normal(seed, shape, dtype=jnp.float32):
    """Test data from NumPy's generator (jax.random would compile a sampler for every shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(16, 8, rngs=rngs)
        self.down = nnx.Linear(8, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)

    def __call__(self, x):
        return self.norm(x + self.down(nnx.relu(self.up(x))))


class Model(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([Block(rngs), Block(rngs)])
        self.head = nnx.Linear(16, 2, rngs=rngs)
        self.tiny = nnx.Linear(2, 3, rngs=rngs)  # in=2 < m=4: the pattern cannot take it
        self.lora = nnx.LoRALinear(16, 4, lora_rank=2, rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([self.tiny(self.head(x)), self.lora(x)], axis=-1)


def layer_types(model):
    return {
        "/".join(map(str, path)): type(node).__name__
        for path, node in nnx.iter_graph(model)
        if isinstance(node, (nnx.Linear, SparseLinear))
    }


def snapshot(model):
    return jax.tree.map(np.copy, nnx.state(model))


def assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def model():
    return Model(nnx.Rngs(0))


def test_sparsify_replaces_what_fits_and_logs_every_decision(model, caplog):
    before, types_before = snapshot(model), layer_types(model)
    with caplog.at_level(logging.INFO, logger="jaxsparse"):
        sparse = sparsify(model, jsp.NM(2, 4))
    assert layer_types(sparse) == {
        "blocks/0/up": "SparseLinear",
        "blocks/0/down": "SparseLinear",
        "blocks/1/up": "SparseLinear",
        "blocks/1/down": "SparseLinear",
        "head": "SparseLinear",
        "tiny": "Linear",
        "lora": "LoRALinear",
    }
    # The argument is untouched: same layer types, same values (bit for bit).
    assert layer_types(model) == types_before
    assert_tree_equal(snapshot(model), before)
    assert isinstance(sparse.blocks[0].norm, nnx.LayerNorm)
    assert sparse.blocks[0].norm.scale is not model.blocks[0].norm.scale  # nothing shared

    records = [r for r in caplog.records if r.name == "jaxsparse"]
    text = "\n".join(r.getMessage() for r in records)
    assert "replaced blocks/0/up Linear(16 -> 8) with SparseLinear 2:4" in text
    assert "replaced head Linear(16 -> 2) with SparseLinear 2:4" in text
    assert "skipped tiny Linear(2 -> 3): in=2 < m=4" in text
    assert "skipped lora LoRALinear(16 -> 4): LoRALinear is a subclass of nnx.Linear" in text
    assert "5 layer(s) replaced, 2 skipped" in text


def test_sparsified_layers_are_the_magnitude_pruned_linears(model):
    sparse = sparsify(model, "2:4")
    ws = jsp.NMSparse.fromdense(model.blocks[1].down.kernel[...], n=2, m=4)
    np.testing.assert_array_equal(np.asarray(sparse.blocks[1].down.values[...]), ws.values)
    np.testing.assert_array_equal(np.asarray(sparse.blocks[1].down.indices[...]), ws.indices)
    np.testing.assert_array_equal(np.asarray(sparse.head.bias[...]), model.head.bias[...])


def test_densify_gives_the_same_outputs_and_leaves_its_argument(model, caplog):
    sparse = sparsify(model, "1:4")
    before = snapshot(sparse)
    with caplog.at_level(logging.INFO, logger="jaxsparse"):
        dense = densify(sparse)
    assert "replaced blocks/0/up SparseLinear(16 -> 8, 1:4) with Linear" in caplog.text
    assert set(layer_types(dense).values()) == {"Linear", "LoRALinear"}
    assert_tree_equal(snapshot(sparse), before)
    assert "SparseLinear" in layer_types(sparse).values()
    x = normal(7, (3, 16))
    call = nnx.jit(lambda m, x: m(x))
    assert_close(call(sparse, x), call(dense, x), jnp.float32, scale=scale_for(16))
    # The dense kernels are the sparse ones, zeros in place (bit-exact).
    np.testing.assert_array_equal(
        np.asarray(dense.head.kernel[...]), np.asarray(sparse.head.weight.todense())
    )


def test_filter_as_regex_and_as_predicate(model, caplog):
    with caplog.at_level(logging.INFO, logger="jaxsparse"):
        by_regex = sparsify(model, "2:4", filter=r"^blocks/\d+/up$")
    assert [k for k, v in layer_types(by_regex).items() if v == "SparseLinear"] == [
        "blocks/0/up",
        "blocks/1/up",
    ]
    assert "skipped head Linear(16 -> 2): excluded by filter" in caplog.text
    seen = []

    def only_wide_outputs(path, module):
        seen.append((path, type(module).__name__))
        return module.out_features >= 16

    by_predicate = sparsify(model, "2:4", filter=only_wide_outputs)
    assert [k for k, v in layer_types(by_predicate).items() if v == "SparseLinear"] == [
        "blocks/0/down",
        "blocks/1/down",
    ]
    assert ("blocks/0/up", "Linear") in seen  # '/'-joined paths, as in jaxsparse.prune


def test_a_shared_layer_stays_shared_and_a_bare_layer_converts():
    shared = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
    model = nnx.Sequential(shared, nnx.relu, shared)
    sparse = sparsify(model, "2:4")
    assert isinstance(sparse.layers[0], SparseLinear) and sparse.layers[0] is sparse.layers[2]
    # A bare layer is a model too.
    assert isinstance(sparsify(shared, "2:4"), SparseLinear)
    assert isinstance(densify(sparsify(shared, "2:4")), nnx.Linear)


def test_a_custom_method_is_applied_per_layer(model):
    calls = []

    def first_two_of_four(kernel, pattern):
        calls.append(kernel.shape)
        keep = jnp.arange(kernel.shape[0]) % pattern.m < pattern.n
        return jnp.broadcast_to(keep[:, None], kernel.shape)

    sparse = sparsify(model, "2:4", method=first_two_of_four, filter="head")
    assert calls == [(16, 2)]
    np.testing.assert_array_equal(
        np.asarray(sparse.head.weight.mask()),
        np.asarray(first_two_of_four(jnp.zeros((16, 2)), jsp.NM(2, 4))),
    )


def test_bad_arguments_are_refused_up_front(model):
    with pytest.raises(ValueError, match=r"jaxsparse.nn.sparsify: .*sparsity must be"):
        sparsify(model, "two:four")
    with pytest.raises(TypeError, match="sparsity must be"):
        sparsify(model, 0.5)
    with pytest.raises(ValueError, match="no compressed format"):
        sparsify(model, Unstructured(0.5))
    with pytest.raises(ValueError, match="method must be 'magnitude', a callable"):
        sparsify(model, "2:4", method="random")
    with pytest.raises(ValueError, match="method must be 'magnitude', a callable"):
        sparsify(model, "2:4", method=jnp.ones((16, 8), bool))
    with pytest.raises(TypeError, match="filter must be None, a regular expression"):
        sparsify(model, "2:4", filter=3)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        sparsify(model, "2:4", filter="blocks/(")


def test_a_method_whose_mask_breaks_the_pattern_raises(model):
    with pytest.raises(ValueError, match="the 2:4 pattern allows at most 2"):
        sparsify(model, "2:4", method=lambda w, p: jnp.ones(w.shape, bool), filter="head")


def test_sparsify_can_rearrange_filters_first(caplog):
    """`rearrange=True` permutes the copy's filters for 1xN (the function kept, the input model
    untouched), logs every layer's kept block norm and why a layer was skipped, and keeps at
    least as much of the first layer's magnitude as plain sparsify."""
    rng = np.random.default_rng(0)
    model = nnx.Sequential(nnx.Linear(32, 64, rngs=nnx.Rngs(0)), nnx.relu,
                           nnx.Linear(64, 10, rngs=nnx.Rngs(1)))
    # Filters of two magnitudes, interleaved: rearrangement can group them into blocks.
    scale = np.where(np.arange(64) % 2 == 0, 1.0, 0.05)
    model.layers[0].kernel.set_value(jnp.asarray(rng.standard_normal((32, 64)) * scale,
                                                 jnp.float32))
    before = np.asarray(model.layers[0].kernel[...]).copy()
    x = jnp.asarray(rng.standard_normal((4, 32)), jnp.float32)
    spec = jsp.Blocks(16, 0.25)
    with caplog.at_level(logging.INFO, logger="jaxsparse"):
        plain = sparsify(model, spec)
        arranged = sparsify(model, spec, rearrange=True, example_input=x)
    np.testing.assert_array_equal(np.asarray(model.layers[0].kernel[...]), before)
    kept = lambda m: float(jnp.sum(m.layers[0].weight.values.astype(jnp.float32) ** 2))
    assert kept(arranged) > kept(plain)
    assert "rearrange" in caplog.text and "kept before" in caplog.text
    assert "skipped: out=10 < n=16" in caplog.text
    with pytest.raises(ValueError, match="rearrange=True is for 1xN specs"):
        sparsify(model, "2:4", rearrange=True, example_input=x)
    with pytest.raises(ValueError, match="needs example_input="):
        sparsify(model, spec, rearrange=True)


def test_sparsify_takes_a_spec_per_layer_such_as_one_density_for_the_whole_model(caplog):
    model = nnx.Sequential(nnx.Linear(32, 64, rngs=nnx.Rngs(0)), nnx.relu,
                           nnx.Linear(64, 32, rngs=nnx.Rngs(1)), nnx.relu,
                           nnx.Linear(32, 16, rngs=nnx.Rngs(2)))
    model.layers[2].kernel.set_value(model.layers[2].kernel[...] * 3)
    specs = jsp.prune.block_densities(model, 16, 0.25)
    assert set(specs) == {"layers/0/kernel", "layers/2/kernel", "layers/4/kernel"}
    assert specs["layers/2/kernel"].density > specs["layers/0/kernel"].density
    with caplog.at_level(logging.INFO, logger="jaxsparse"):
        sparse = sparsify(model, {k: v for k, v in specs.items() if k != "layers/4/kernel"})
    assert sparse.layers[0].sparsity == specs["layers/0/kernel"]
    assert sparse.layers[2].sparsity == specs["layers/2/kernel"]
    assert isinstance(sparse.layers[4], nnx.Linear)
    assert "layers/4: no spec for it in the sparsity mapping" in caplog.text
    kept = sum(int(sparse.layers[i].weight.values.shape[0]) for i in (0, 2))
    mixed = sparsify(model, {"layers/0": "2:4", "layers/4/kernel": jsp.Blocks(16, 0.5)},
                     rearrange=False)
    assert mixed.layers[0].sparsity == jsp.NM(2, 4) and isinstance(mixed.layers[2], nnx.Linear)
    assert kept == specs["layers/0/kernel"].kept_blocks(32, 64) + \
        specs["layers/2/kernel"].kept_blocks(64, 32)
    with pytest.raises(ValueError, match=r"sparsity\['layers/0'\]"):
        sparsify(model, {"layers/0": "two:four"})
    with pytest.raises(TypeError, match="keys of a sparsity mapping must be layer paths"):
        sparsify(model, {0: "2:4"})
