"""SR-STE: straight-through gradient, decay on pruned entries only, training N:M from scratch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as jsp
from jaxsparse import prune
from tests._check import keys, random_array


def loss_fn(w, x, y):
    return jnp.mean((x @ w - y) ** 2)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:8", "16:2:8", "16:1:8"])
def test_forward_is_the_masked_weight_and_gradient_is_straight_through(pattern):
    k = keys(0, 3)
    w, x, y = random_array(k[0], (16, 6)), random_array(k[1], (10, 16)), random_array(k[2], (10, 6))
    mask = prune.magnitude_mask(w, pattern)
    masked_w = jnp.where(mask, w, 0.0)
    np.testing.assert_array_equal(prune.srste_weight(w, pattern), masked_w)
    ste_grad = jax.grad(lambda w: loss_fn(prune.srste_weight(w, pattern), x, y))(w)
    dense_grad_at_masked = jax.grad(loss_fn)(masked_w, x, y)
    np.testing.assert_array_equal(ste_grad, dense_grad_at_masked)
    assert np.all(np.asarray(ste_grad)[~np.asarray(mask)] != 0)  # pruned entries get gradient too


def test_srste_weight_under_transformations():
    w = random_array(keys(1, 1)[0], (3, 8, 4))
    jitted = jax.jit(prune.srste_weight, static_argnums=1)(w, jsp.NM(2, 4))
    np.testing.assert_array_equal(jitted, prune.srste_weight(w, "2:4"))
    vmapped = jax.vmap(lambda w: prune.srste_weight(w, "2:4"))(w)
    np.testing.assert_array_equal(vmapped, jitted)
    dw = jnp.ones_like(w)
    _, tangent = jax.jvp(lambda w: prune.srste_weight(w, "2:4"), (w,), (dw,))
    np.testing.assert_array_equal(tangent, dw)
    params = {"kernel": w[0], "bias": jnp.ones(4)}
    tree = prune.srste_weights(params, "2:4")
    np.testing.assert_array_equal(tree["kernel"], prune.srste_weight(w[0], "2:4"))
    assert tree["bias"] is params["bias"]


def test_decay_is_added_only_on_pruned_entries():
    k = keys(2, 3)
    params = {"kernel": random_array(k[0], (16, 8)), "bias": random_array(k[1], (8,))}
    grads = jax.tree.map(lambda p: random_array(k[2], p.shape), params)
    tx = prune.srste("2:4", decay=0.1)
    out, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert state == prune.SRSTEState()
    mask = np.asarray(prune.magnitude_mask(params["kernel"], "2:4"))
    g, w, got = (np.asarray(t["kernel"]) for t in (grads, params, out))
    np.testing.assert_array_equal(got[mask], g[mask])  # kept entries: gradient unchanged
    np.testing.assert_allclose(got[~mask], g[~mask] + 0.1 * w[~mask], rtol=1e-6)
    np.testing.assert_array_equal(out["bias"], grads["bias"])  # not selected by the filter


def test_tiny_regression_trained_with_srste_ends_nm_prunable():
    k = keys(3, 3)
    w_true = jsp.NMSparse.fromdense(random_array(k[0], (16, 4)), n=2, m=4).todense()
    x = random_array(k[1], (128, 16))
    y = x @ w_true
    params = {"kernel": 0.1 * random_array(k[2], (16, 4))}
    tx = optax.chain(prune.srste("2:4", decay=2e-3), optax.adam(2e-2))

    def loss(params):
        return loss_fn(prune.srste_weights(params, "2:4")["kernel"], x, y)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    start = float(loss_fn(params["kernel"], x, y))
    for _ in range(400):
        params, state = step(params, state)
    w = params["kernel"]
    pruned = jsp.NMSparse.fromdense(w, n=2, m=4).todense()  # the N:M-pruned weight
    pruned_loss = float(loss_fn(pruned, x, y))
    assert pruned_loss < 1e-3 * start, (pruned_loss, start)
    np.testing.assert_array_equal(
        prune.magnitude_mask(w, "2:4"), prune.magnitude_mask(w_true, "2:4")
    )


def test_srste_validation():
    with pytest.raises(ValueError, match="pattern must be a format.s spec"):
        prune.srste(prune.Unstructured(0.5))
    with pytest.raises(ValueError, match="pattern must be"):
        prune.srste("2-4")
    with pytest.raises(ValueError, match="n must be in"):
        prune.srste_weight(jnp.ones((8, 4)), jsp.NM(5, 4))
    with pytest.raises(ValueError, match="decay must be a float >= 0, got -1"):
        prune.srste("2:4", decay=-1)
    tx = prune.srste("2:4")
    with pytest.raises(ValueError, match="update needs params"):
        tx.update({"kernel": jnp.ones((8, 4))}, tx.init(None))
