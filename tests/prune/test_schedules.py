"""The cubic sparsity schedule of Zhu & Gupta."""

import jax
import numpy as np
import pytest

from jaxsparse import prune


def zhu_gupta(t, s_f, t0, t1, s_i=0.0):
    t = min(max(t, t0), t1)
    return s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3


@pytest.mark.parametrize("s_f, t0, t1, s_i", [(0.9, 0, 100, 0.0), (0.5, 10, 30, 0.1)])
def test_cubic_schedule_follows_the_formula(s_f, t0, t1, s_i):
    schedule = prune.cubic_schedule(s_f, t0, t1, initial_sparsity=s_i)
    steps = np.arange(0, t1 + 20, 3)
    got = jax.jit(jax.vmap(schedule))(steps)
    want = [zhu_gupta(t, s_f, t0, t1, s_i) for t in steps]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert float(schedule(t0)) == pytest.approx(s_i)
    assert float(schedule(t1)) == pytest.approx(s_f)
    assert float(schedule(10 * t1)) == pytest.approx(s_f)
    # Monotone, fast first: the first half of the ramp does 7/8 of the pruning.
    mid = (t0 + t1) / 2
    assert float(schedule(mid)) - s_i == pytest.approx((s_f - s_i) * 7 / 8, rel=1e-5)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((0.5, 10, 10), {}, ValueError, "end_step must be greater than begin_step=10; got end_st"),
        ((0.5, 10, 5), {}, ValueError, "end_step must be greater than begin_step=10; got end_st"),
        ((1.0, 0, 10), {}, ValueError, r"final_sparsity must be in \[0, 1\), got 1.0"),
        ((-0.1, 0, 10), {}, ValueError, r"final_sparsity must be in \[0, 1\), got -0.1"),
        ((0.5, 0, 10), {"initial_sparsity": 1.2}, ValueError, r"initial_sparsity must be in \["),
        ((float("nan"), 0, 10), {}, ValueError, "final_sparsity"),
        (("0.5", 0, 10), {}, TypeError, "final_sparsity must be a float"),
        ((0.5, -1, 10), {}, ValueError, r"begin_step must be in \[0, "),
        ((0.5, 0, 10.0), {}, TypeError, "end_step must be an int"),
    ],
)
def test_cubic_schedule_validation(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        prune.cubic_schedule(*args, **kwargs)
