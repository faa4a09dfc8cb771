"""gradual_pruning and masked as optax transformations: schedule, exact zeros, jit, chains."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as jsp
from jaxsparse import prune
from tests._check import keys, random_array


def make_params(seed=0):
    k = keys(seed, 3)
    return {
        "dense": {"kernel": random_array(k[0], (16, 8)), "bias": random_array(k[1], (8,))},
        "out": {"kernel": random_array(k[2], (8, 4))},
    }


def train(tx, params, steps, seed=1, check=None):
    """Random gradients through `tx` under one jitted step; `check(t, params, state)` after each."""
    state = tx.init(params)

    @jax.jit
    def step(params, state, key):
        grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape, p.dtype), params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for t, key in enumerate(keys(seed, steps)):
        params, state = step(params, state, key)
        if check is not None:
            check(t, params, state)
    return params, state


def zeros(x):
    return int(np.sum(np.asarray(x) == 0))


def test_gradual_pruning_follows_the_schedule_with_exact_zeros():
    schedule = prune.cubic_schedule(0.75, 0, 40)
    tx = optax.chain(optax.adam(1e-2), prune.gradual_pruning(schedule, update_every=10))
    params = make_params()
    seen = []

    def check(t, params, state):
        masks = state[1].masks
        assert masks["dense"]["bias"] is None
        assert int(state[1].step) == t + 1
        for name in ("dense", "out"):
            kernel, mask = np.asarray(params[name]["kernel"]), np.asarray(masks[name]["kernel"])
            assert np.all(kernel[~mask] == 0)  # pruned weights are exactly zero after every step
            if t % 10 == 0:  # masks recomputed at this step: sparsity = schedule(t)
                want = round(float(schedule(t)) * kernel.size)
                assert (~mask).sum() == want, (t, name)
                assert zeros(kernel) == want
        assert zeros(params["dense"]["bias"]) == 0
        if t % 10 == 0:
            seen.append(zeros(params["dense"]["kernel"]))

    train(tx, params, 45, check=check)
    assert seen == [round(float(schedule(t)) * 128) for t in (0, 10, 20, 30, 40)]
    assert seen == [0, 56, 84, 94, 96]


def test_gradual_pruning_prunes_the_smallest_magnitudes():
    params = {"kernel": jnp.arange(1.0, 13.0).reshape(4, 3) * jnp.array([1.0, -1.0, 1.0])}
    tx = prune.gradual_pruning(0.5, update_every=1)
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_array_equal(
        optax.apply_updates(params, updates)["kernel"],
        [[0, 0, 0], [0, 0, 0], [7, -8, 9], [10, -11, 12]],
    )


def test_gradual_pruning_to_an_nm_pattern():
    schedule = prune.cubic_schedule(0.5, 0, 30)
    tx = optax.chain(
        optax.adam(1e-2), prune.gradual_pruning(schedule, update_every=10, pattern_fn="2:4")
    )
    params, state = train(tx, make_params(), 31)
    for name in ("dense", "out"):
        kernel = params[name]["kernel"]
        nm = prune.magnitude_mask(kernel, "2:4")
        np.testing.assert_array_equal(state[1].masks[name]["kernel"], nm)
        np.testing.assert_array_equal(kernel, jnp.where(nm, kernel, 0))
        assert zeros(kernel) == kernel.size // 2
        # So the kernel converts to an NMSparse exactly.
        np.testing.assert_array_equal(jsp.NMSparse.fromdense(kernel, n=2, m=4).todense(), kernel)


def test_gradual_pruning_to_a_vnm_pattern_then_masked_fine_tuning():
    spec = jsp.VNM(16, 2, 8)
    params = {"kernel": random_array(keys(7, 1)[0], (32, 24))}
    schedule = prune.cubic_schedule(1 - spec.density, 0, 30)
    tx = optax.chain(optax.adam(1e-2), prune.gradual_pruning(schedule, update_every=10,
                                                              pattern_fn=spec))
    params, state = train(tx, params, 31)
    kernel = params["kernel"]
    vnm = prune.magnitude_mask(kernel, spec)
    np.testing.assert_array_equal(state[1].masks["kernel"], vnm)
    np.testing.assert_array_equal(kernel, jnp.where(vnm, kernel, 0))
    # Fine-tuning with the mask fixed keeps the kernel V:N:M, so it converts exactly.
    tuned, _ = train(optax.chain(optax.adam(1e-2), prune.masked({"kernel": vnm})), params, 5)
    np.testing.assert_array_equal(tuned["kernel"], jnp.where(vnm, tuned["kernel"], 0))
    ws = jsp.fromdense(tuned["kernel"], spec)
    np.testing.assert_array_equal(ws.todense(), tuned["kernel"])


def test_gradual_pruning_pattern_fn_callable_and_filter():
    seen = []

    def pattern_fn(s):
        seen.append(s)
        return prune.Unstructured(1.0 - s)

    tx = prune.gradual_pruning(
        prune.cubic_schedule(0.5, 0, 2), update_every=2, pattern_fn=pattern_fn, filter=r"^out/"
    )
    params, state = train(optax.chain(optax.sgd(1e-3), tx), make_params(), 3)
    assert seen  # called (traced) inside the jitted update
    assert state[1].masks["dense"]["kernel"] is None
    assert zeros(params["dense"]["kernel"]) == 0 and zeros(params["out"]["kernel"]) == 16


def test_gradual_pruning_in_an_nnx_state():
    from flax import nnx

    model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 4, rngs=nnx.Rngs(1)))
    _, params = nnx.split(model, nnx.Param)
    tx = prune.gradual_pruning(0.5, update_every=1)
    state = tx.init(params)
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    new = optax.apply_updates(params, updates)
    leaf = lambda layer, name: jax.tree.leaves(new["layers"][layer][name])[0]  # noqa: E731
    assert zeros(leaf(0, "kernel")) == 32 and zeros(leaf(1, "kernel")) == 16
    assert zeros(leaf(0, "bias")) == 8  # not pruned (nnx.Linear's bias starts at zero)
    assert jax.tree.leaves(state.masks["layers"][0]["bias"]) == []  # None: not pruned


def test_masked_keeps_pruned_weights_at_zero_and_trains_the_rest():
    params = make_params(3)
    masks = prune.magnitude_masks(params, "2:4")
    tx = optax.chain(optax.adam(1e-2), prune.masked(masks))
    # Params are dense at the start: the first update zeroes the pruned entries.
    trained, state = train(tx, params, 50)
    for name in ("dense", "out"):
        before, after = np.asarray(params[name]["kernel"]), np.asarray(trained[name]["kernel"])
        mask = np.asarray(masks[name]["kernel"])
        assert np.all(after[~mask] == 0)
        # Kept entries moved (Adam may bring the odd one back near where it started).
        assert np.mean(np.abs(after[mask] - before[mask]) > 1e-3) > 0.9
    assert not np.allclose(trained["dense"]["bias"], params["dense"]["bias"])  # unmasked: trained
    assert isinstance(state[1], prune.MaskedState)
    assert jax.tree.structure(state[1].masks) == jax.tree.structure(masks)


def test_masked_accepts_a_callable():
    params = make_params(4)
    tx = prune.masked(lambda p: prune.magnitude_masks(p, prune.Unstructured(0.25)))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert zeros(new["dense"]["kernel"]) == 96 and zeros(new["out"]["kernel"]) == 24


def test_masks_that_do_not_match_the_params():
    params = make_params()
    masks = prune.magnitude_masks(params, "2:4")
    with pytest.raises(ValueError, match="masks must have the tree structure of params"):
        prune.masked({"dense": masks["dense"]}).init(params)
    with pytest.raises(ValueError, match="masks must have the tree structure of params"):
        prune.masked(dict(masks, extra=None)).init(params)
    bad_shape = jax.tree.map(lambda x: x, masks, is_leaf=lambda x: x is None)
    bad_shape["out"]["kernel"] = jnp.ones((4, 8), bool)
    shape_msg = r"masks at 'out/kernel' must have the param's shape \(8, 4\); got \(4, 8\)"
    with pytest.raises(ValueError, match=shape_msg):
        prune.masked(bad_shape).init(params)
    bad_dtype = dict(masks, out={"kernel": jnp.ones((8, 4))})
    with pytest.raises(TypeError, match="masks leaves must be bool arrays or None; at 'out/ker"):
        prune.masked(bad_dtype).init(params)
    tx = prune.masked(masks)
    state = tx.init(params)
    with pytest.raises(ValueError, match="masks must have the tree structure of params"):
        tx.update({"out": params["out"]}, state, {"out": params["out"]})
    with pytest.raises(ValueError, match="update needs params"):
        tx.update(params, state)


BAD_PATTERN = jsp.NM(5, 4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(schedule=0.5, update_every=0), ValueError, r"update_every must be in \[1, "),
        (dict(schedule=0.5, update_every=1.5), TypeError, "update_every must be an int"),
        (dict(schedule=1.0, update_every=1), ValueError, r"schedule \(a constant sparsity\) must"),
        (dict(schedule="cubic", update_every=1), TypeError, "schedule must be an optax schedule"),
        (dict(schedule=0.5, update_every=1, pattern_fn="2-4"), ValueError, "pattern_fn must be"),
        (dict(schedule=0.5, update_every=1, pattern_fn=BAD_PATTERN), ValueError, "pattern_fn.*n "),
        (dict(schedule=0.5, update_every=1, pattern_fn=3), TypeError, "pattern_fn must be None"),
        (dict(schedule=0.5, update_every=1, filter=3), TypeError, "filter must be None"),
    ],
)
def test_gradual_pruning_validation(kwargs, error, match):
    schedule = kwargs.pop("schedule")
    with pytest.raises(error, match=match):
        prune.gradual_pruning(schedule, **kwargs)


def test_gradual_pruning_update_errors():
    params = make_params()
    tx = prune.gradual_pruning(0.5, update_every=1)
    state = tx.init(params)
    with pytest.raises(ValueError, match="update needs params"):
        tx.update(params, state)
    with pytest.raises(ValueError, match="state.masks must have the tree structure of params"):
        tx.update({"out": params["out"]}, state, {"out": params["out"]})
    bad = prune.gradual_pruning(0.5, update_every=1, pattern_fn=lambda s: "2-4")
    with pytest.raises(ValueError, match=r"pattern_fn\(sparsity\) must be"):
        bad.update(params, bad.init(params), params)
