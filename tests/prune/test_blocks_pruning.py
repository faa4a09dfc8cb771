"""The pruning toolkit with the 1xN spec `jaxsparse.Blocks`: masks, one density spread over a
model (`block_densities`), gradual pruning, masked fine-tuning and SR-STE, per layer and with a
per-layer mapping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxsparse as jsp
from jaxsparse import prune
from tests._check import keys, random_array


def whole_blocks(mask, n):
    """True when a `[..., in, out]` mask keeps or prunes every 1xn block whole."""
    m = np.asarray(mask)
    out = m.shape[-1]
    pad = -out % n
    # A partial last block: its padding copies the block's first output.
    m = np.concatenate([m, np.repeat(m[..., -(out % n or n):][..., :1], pad, -1)], -1)
    blocks = m.reshape(*m.shape[:-1], -1, n)
    return bool(np.all(blocks.all(-1) | ~blocks.any(-1)))


def block_norms(w, n):
    """Squared block norms `[..., in, R]` (outputs zero-padded), float64."""
    w = np.asarray(w, np.float64)
    pad = -w.shape[-1] % n
    w = np.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, pad)])
    return (w.reshape(*w.shape[:-1], -1, n) ** 2).sum(-1)


def make_params(seed=0):
    k = keys(seed, 4)
    return {
        "a": {"kernel": random_array(k[0], (32, 48)), "bias": random_array(k[1], (48,))},
        "b": {"kernel": 0.8 * random_array(k[2], (48, 20))},  # out=20: a partial block at n=8.
        "c": {"kernel": random_array(k[3], (20, 4))},  # out < n: never selected.
    }


# ---------------------------------------------------------------------- masks
@pytest.mark.parametrize("spec", [jsp.Blocks(8, 0.25), jsp.Blocks(16, 0.5), "1x4@30%"], ids=str)
def test_magnitude_mask_is_the_formats_mask(spec):
    w = random_array(keys(0, 1)[0], (2, 40, 36))  # A stack; out=36 is ragged for 8 and 16.
    mask = prune.magnitude_mask(w, spec)
    spec = jsp.as_spec(spec)
    assert np.array_equal(mask, jsp.BlocksSparse.fromdense(w, **spec._asdict()).mask())
    assert whole_blocks(mask, spec.n)
    kept = block_norms(np.where(mask, w, 0), spec.n) > 0
    assert kept.reshape(2, -1).sum(-1).tolist() == [spec.kept_blocks(40, 36)] * 2


def test_magnitude_masks_one_spec_and_per_layer():
    params = make_params()
    masks = prune.magnitude_masks(params, jsp.Blocks(8, 0.25), filter=r"^(a|b)/kernel")
    assert masks["a"]["bias"] is None and masks["c"]["kernel"] is None
    assert whole_blocks(masks["b"]["kernel"], 8)
    per_layer = {"a/kernel": jsp.Blocks(8, 0.5), "b/kernel": "1x4@0.1"}
    masks = prune.magnitude_masks(params, per_layer)
    assert masks["c"]["kernel"] is None
    assert np.array_equal(masks["a"]["kernel"],
                          prune.magnitude_mask(params["a"]["kernel"], jsp.Blocks(8, 0.5)))
    assert np.array_equal(masks["b"]["kernel"],
                          prune.magnitude_mask(params["b"]["kernel"], jsp.Blocks(4, 0.1)))
    with pytest.raises(ValueError, match=r"names leaves that are not selected kernels of params: "
                                         r"\['x/kernel'\]"):
        prune.magnitude_masks(params, {"x/kernel": jsp.Blocks(8, 0.5)})
    with pytest.raises(ValueError, match=r"pattern\['a/kernel'\]: n must be one of"):
        prune.magnitude_masks(params, {"a/kernel": "1x5@0.5"})


# ---------------------------------------------------------------------- block_densities
def test_block_densities_by_hand():
    params = {"a": {"kernel": np.ones((8, 16), np.float32)},
              "b": {"kernel": 3 * np.ones((8, 16), np.float32)}}
    # 16 blocks; half kept: all 8 of b's (norm 144) before any of a's (norm 16). a keeps one.
    assert prune.block_densities(params, 16, 0.5) == {
        "a/kernel": jsp.Blocks(16, 0.125), "b/kernel": jsp.Blocks(16, 1.0)}


def test_block_densities_is_one_global_threshold():
    params = make_params()
    specs = prune.block_densities(params, 8, 0.3)
    assert set(specs) == {"a/kernel", "b/kernel"}  # c has out=4 < n=8.
    masks = prune.magnitude_masks(params, specs)
    kept_norms, dropped_norms, total, kept_count = [], [], 0, 0
    for name in ("a", "b"):
        w, m = np.asarray(params[name]["kernel"]), np.asarray(masks[name]["kernel"])
        norms, kept = block_norms(w, 8), block_norms(m, 8) > 0
        assert specs[f"{name}/kernel"].kept_blocks(*w.shape) == kept.sum()
        kept_norms += norms[kept].tolist()
        dropped_norms += norms[~kept].tolist()
        total += norms.size
        kept_count += kept.sum()
    assert kept_count == round(0.3 * total)
    assert min(kept_norms) >= max(dropped_norms)  # One threshold across the layers.
    # The weaker layer (b, scaled by 0.8, and its partial blocks) keeps a smaller share.
    assert specs["b/kernel"].density < 0.3 < specs["a/kernel"].density


@pytest.mark.parametrize("split", ("out", "in"))
def test_block_densities_with_shards_rounds_each_layer_to_whole_runs(split):
    rng = np.random.default_rng(0)
    params = {"a": {"kernel": rng.standard_normal((32, 64))},
              "b": {"kernel": 2 * rng.standard_normal((64, 32))},
              "c": {"kernel": rng.standard_normal((30, 16))}}  # Splits in neither way.
    specs = prune.block_densities(params, 8, 0.3, shards=4, split=split)
    assert list(specs) == ["a/kernel", "b/kernel"]
    whole = prune.block_densities({k: params[k] for k in "ab"}, 8, 0.3)
    for name, spec in specs.items():
        w = jnp.asarray(params[name[0]]["kernel"], jnp.float32)
        assert (spec.shards, spec.split) == (4, split)
        kept = spec.kept_blocks(*w.shape)
        assert kept % 4 == 0 and abs(kept - whole[name].kept_blocks(*w.shape)) < 4
        assert jsp.fromdense(w, spec).indices.shape == (kept,)  # Balanced: it builds.
    with pytest.raises(ValueError, match="whose shape splits into 4 runs"):
        prune.block_densities({"c": params["c"]}, 8, 0.3, shards=4, split=split)


def test_block_densities_of_an_nnx_model_and_bad_input():
    model = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.relu,
                           nnx.Linear(32, 32, rngs=nnx.Rngs(1)))
    specs = prune.block_densities(model, 16, 0.25)
    assert list(specs) == ["layers/0/kernel", "layers/2/kernel"]
    assert all(isinstance(s, jsp.Blocks) and s.n == 16 for s in specs.values())
    masks = prune.magnitude_masks(nnx.state(model, nnx.Param), specs)
    assert masks["layers"][0]["kernel"].shape == (16, 32)
    with pytest.raises(ValueError, match=r"block_densities: density must be in \(0, 1\]"):
        prune.block_densities(model, 16, 0.0)
    with pytest.raises(ValueError, match=r"block_densities: n must be one of \(4, 8, 16, 32\)"):
        prune.block_densities(model, 6, 0.5)
    with pytest.raises(ValueError, match="no kernel of params was selected"):
        prune.block_densities(model, 16, 0.5, filter="^nothing")


# ---------------------------------------------------------------------- gradual pruning
def train(tx, params, steps, check=None):
    state = tx.init(params)

    @jax.jit
    def step(params, state, key):
        grads = jax.tree.map(lambda p: 0.01 * jax.random.normal(key, p.shape, p.dtype), params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for t, key in enumerate(keys(1, steps)):
        params, state = step(params, state, key)
        if check is not None:
            check(t, params, state)
    return params, state


def test_gradual_pruning_to_a_blocks_spec_keeps_whole_blocks_at_every_step():
    params = make_params()
    spec = jsp.Blocks(8, 0.25)
    schedule = prune.cubic_schedule(0.75, 0, 6)
    seen = []

    def check(t, params, state):
        masks = state[1].masks
        m = masks["a"]["kernel"]
        assert whole_blocks(m, 8) and whole_blocks(masks["b"]["kernel"], 8)
        seen.append(int((block_norms(m, 8) > 0).sum()))
        # Pruned weights are exactly zero.
        assert np.all(np.asarray(params["a"]["kernel"])[~np.asarray(m)] == 0)

    tx = optax.chain(optax.sgd(0.1), prune.gradual_pruning(
        schedule, update_every=2, pattern_fn=spec, filter=r"^(a|b)/kernel"))
    params, state = train(tx, params, 8, check)
    total = 32 * 6
    assert seen[0] == total and seen[-1] == spec.kept_blocks(32, 48)
    assert seen == sorted(seen, reverse=True)
    # At the final sparsity the mask is the spec's own mask of the current weights.
    assert np.array_equal(state[1].masks["b"]["kernel"],
                          prune.magnitude_mask(params["b"]["kernel"], spec))


@pytest.mark.parametrize("split", ("out", "in"))
def test_gradual_pruning_to_a_spec_with_shards_prunes_each_run_alike(split):
    params = {"a": {"kernel": random_array(keys(3, 1)[0], (32, 64))}}
    # 4 runs of 2 block rows (of 8 inputs with split="in"), 16 blocks kept in each.
    spec = jsp.Blocks(8, 0.25, shards=4, split=split)
    runs = []

    def check(t, params, state):
        counts = block_norms(state.masks["a"]["kernel"], 8).astype(bool)  # [in, R]
        runs.append(counts.reshape(4, -1).sum(axis=1).tolist() if split == "in" else
                    counts.reshape(32, 4, 2).sum(axis=(0, 2)).tolist())

    tx = prune.gradual_pruning(prune.cubic_schedule(0.75, 0, 4), update_every=1, pattern_fn=spec)
    params, state = train(tx, params, 6, check)
    assert all(len(set(r)) == 1 for r in runs), runs  # Every step: the same count per run.
    assert runs[-1] == [16] * 4
    mask = state.masks["a"]["kernel"]
    assert np.array_equal(mask, prune.magnitude_mask(params["a"]["kernel"], spec))
    jsp.BlocksSparse.frommask(params["a"]["kernel"], mask, **spec._asdict())  # Balanced.



def test_gradual_pruning_per_layer_targets_reached_together():
    params = make_params()
    specs = prune.block_densities(params, 8, 0.3)
    tx = prune.gradual_pruning(prune.cubic_schedule(0.7, 0, 4), update_every=1, pattern_fn=specs)
    counts = []

    def check(t, params, state):
        counts.append({k: int((block_norms(state.masks[k]["kernel"], 8) > 0).sum())
                       for k in ("a", "b")})
        assert state.masks["c"]["kernel"] is None and state.masks["a"]["bias"] is None

    train(tx, params, 6, check)
    final = counts[-1]
    assert final["a"] == specs["a/kernel"].kept_blocks(32, 48)
    assert final["b"] == specs["b/kernel"].kept_blocks(48, 20)
    # Mid-way (step 2: sparsity 0.7 * (1 - 0.5^3) = 0.6125), the model's block sparsity is the
    # schedule's, split in proportion to each layer's target.
    total = 32 * 6 + 48 * 3
    assert abs((counts[2]["a"] + counts[2]["b"]) / total - (1 - 0.6125)) < 0.02


# ---------------------------------------------------------------------- masked, SR-STE
def test_masked_fine_tuning_with_blocks_masks():
    params = make_params()
    masks = prune.magnitude_masks(params, prune.block_densities(params, 4, 0.4))
    tx = optax.chain(optax.adam(1e-2), prune.masked(masks))
    params, _ = train(tx, params, 3)
    for name in ("a", "b"):
        w, m = np.asarray(params[name]["kernel"]), np.asarray(masks[name]["kernel"])
        assert np.all(w[~m] == 0) and np.all(w[m] != 0)
        assert whole_blocks(w != 0, 4)


def test_srste_with_blocks():
    w = random_array(keys(3, 1)[0], (16, 24))
    spec = jsp.Blocks(8, 0.25)
    mask = np.asarray(prune.magnitude_mask(w, spec))
    np.testing.assert_array_equal(prune.srste_weight(w, spec), np.where(mask, w, 0))
    grad = jax.grad(lambda w: jnp.sum(prune.srste_weight(w, spec) * 2.0))(w)
    np.testing.assert_array_equal(grad, np.full(w.shape, 2.0))  # Straight through.
    params = {"x": {"kernel": w}, "y": {"kernel": w}}
    tx = prune.srste({"x/kernel": spec}, decay=0.5)
    g, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(g["x"]["kernel"], np.where(mask, 0, 0.5 * np.asarray(w)))
    np.testing.assert_array_equal(g["y"]["kernel"], 0)  # Not in the mapping: untouched.
    pruned = prune.srste_weights(params, {"y/kernel": "1x8@0.25"})
    np.testing.assert_array_equal(pruned["y"]["kernel"], np.where(mask, w, 0))
    assert pruned["x"]["kernel"] is params["x"]["kernel"]
    with pytest.raises(ValueError, match=r"srste: pattern\['x/kernel'\].*must be a format's spec"):
        prune.srste({"x/kernel": prune.Unstructured(0.5)})


def test_srste_trains_a_tiny_model_to_a_blocks_mask():
    # y = x @ W with W 1x4-block sparse at density 0.25; SR-STE recovers a model whose own
    # 1x4 mask keeps (almost) everything that matters.
    k = keys(5, 3)
    true = np.array(random_array(k[0], (16, 16)))
    true *= np.asarray(prune.magnitude_mask(true, jsp.Blocks(4, 0.25)))
    x = random_array(k[1], (128, 16))
    y = x @ true
    params = {"kernel": random_array(k[2], (16, 16)) * 0.1}
    spec = jsp.Blocks(4, 0.25)

    def loss(p):
        return jnp.mean((x @ prune.srste_weights(p, spec)["kernel"] - y) ** 2)

    tx = optax.chain(prune.srste(spec, decay=1e-3), optax.adam(3e-2))
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    start = float(loss(params))
    for _ in range(300):
        params, state = step(params, state)
    assert float(loss(params)) < 0.01 * start
