"""Sparsity schedules: optax schedules (step -> sparsity) for gradual pruning."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse import _validate as V


def cubic_schedule(
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    *,
    initial_sparsity: float = 0.0,
) -> optax.Schedule:
    r"""The cubic sparsity schedule of Zhu & Gupta, as an optax schedule.

    .. math::
        s_t = s_f + (s_i - s_f)\left(1 - \frac{t - t_0}{n\,\Delta t}\right)^3
        \quad\text{for } t_0 \le t \le t_0 + n\Delta t,

    with :math:`s_t = s_i` before :math:`t_0` = `begin_step` and :math:`s_t = s_f` after
    :math:`t_0 + n\Delta t` = `end_step`. Pruning fast early, when many weights are redundant, and
    slowly near the end. (The same curve as `optax.polynomial_schedule(power=3)`.)

    Args:
        final_sparsity: :math:`s_f`, in [0, 1).
        begin_step: :math:`t_0`, an int >= 0.
        end_step: the step where :math:`s_f` is reached, an int > `begin_step`.
        initial_sparsity: :math:`s_i`, in [0, 1).

    Returns:
        A schedule `step -> sparsity` (a float32 scalar), jittable.

    Example:
        >>> s = cubic_schedule(0.8, 0, 100)
        >>> [round(float(s(t)), 3) for t in (0, 50, 100, 200)]
        [0.0, 0.7, 0.8, 0.8]

    References:
        Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model
        compression", ICLR workshop 2018.
    """
    where = "jaxsparse.prune.cubic_schedule"
    final = _check_sparsity("final_sparsity", final_sparsity, where)
    initial = _check_sparsity("initial_sparsity", initial_sparsity, where)
    begin = V.check_int("begin_step", begin_step, low=0, high=2**31 - 1, where=where)
    end = V.check_int("end_step", end_step, low=0, high=2**31 - 1, where=where)
    if end <= begin:
        raise ValueError(
            f"{where}: end_step must be greater than begin_step={begin}; got end_step={end}"
        )
    span = end - begin

    def schedule(step):
        t = jnp.clip(jnp.asarray(step, jnp.float32) - begin, 0.0, float(span))
        return jnp.float32(final) + jnp.float32(initial - final) * (1.0 - t / span) ** 3

    return schedule


def _check_sparsity(name, value, where) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{where}: {name} must be a float in [0, 1), got {type(value).__name__}")
    if not (math.isfinite(float(value)) and 0.0 <= float(value) < 1.0):
        raise ValueError(f"{where}: {name} must be in [0, 1), got {value!r}")
    return float(value)
