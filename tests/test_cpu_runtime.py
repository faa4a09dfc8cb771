"""The CPU kernels' runtime (cpu/common/runtime.cc): its helper threads give the same products
when calls run one after another (a model's chain of short products) and when several threads
call at once (the helpers are shared: a call that finds them busy runs on XLA's pool), short
calls mixed with long ones."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp


def normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def weights():
    """Three formats' weights whose products take the multi-task kernels."""
    return [jsp.Int4Weight.fromdense(normal(1, (256, 192)), group_size=128),
            jsp.NMSparse.fromdense(normal(2, (256, 320)), n=2, m=4),
            jsp.VNMSparse.fromdense(normal(3, (256, 128)), v=64, n=2, m=8)]


@jax.jit
def chain(ws, x):
    """Products one after another, each waiting for the one before (as in a transformer); the
    dependency leaves x as it is (0 * a finite y), so the products are those of x."""
    outs = []
    for w in ws:
        y = x @ w
        outs.append(y)
        x = x + 0.0 * y[:, :1]
    return outs


def expected(ws, x):
    """The same products, one per call."""
    return [jax.jit(lambda w, x: x @ w)(w, x) for w in ws]


def assert_same(got, want):
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("tokens", [1, 17, 300])
def test_a_chain_of_products_matches_the_products_alone(tokens):
    ws, x = weights(), normal(0, (tokens, 256))
    want = expected(ws, x)
    for _ in range(3):  # The helpers awake from the call before, or asleep.
        assert_same(chain(ws, x), want)


def test_threads_calling_at_once_get_their_own_products():
    ws = weights()
    inputs = [normal(10 + i, (tokens, 256)) for i, tokens in enumerate([3, 17, 64, 700])]
    wants = [expected(ws, x) for x in inputs]
    errors = []

    def run(i):
        try:
            for _ in range(15):
                assert_same(chain(ws, inputs[i]), wants[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((i, e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a call hung"
    assert not errors, errors



def test_set_cpu_isa_refuses_an_isa_this_cpu_cannot_run():
    unsupported = [isa for isa in ("amx", "avx512bf16", "avx512", "avx2")
                   if isa not in jsp.supported_cpu_isas()]
    if not unsupported:
        pytest.skip("this CPU runs every ISA")
    before = jsp.cpu_isa()
    with pytest.raises(ValueError, match=rf"set_cpu_isa: .*got '{unsupported[0]}' "
                                         r"\(this CPU cannot run it\)"):
        jsp.set_cpu_isa(unsupported[0])
    assert jsp.cpu_isa() == before
