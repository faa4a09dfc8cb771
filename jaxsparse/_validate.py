"""Validation at the public boundary (CONVENTIONS.md 9).

Every check runs once, in Python, before any kernel, and its message names the argument, what was
expected and what came. Checks that need array *values* (positions in range, a mask that respects
its pattern) run only on concrete arrays: under `jit` the values are unknown at trace time, and the
kernels then still never read or write out of bounds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

#: The value dtypes every jaxsparse kernel implements (f32 accumulation throughout).
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def as_array(name: str, x, *, where: str):
    """Return `x` as a jax array (or tracer); TypeError for anything that is not array-like."""
    if isinstance(x, (jax.Array, np.ndarray, np.generic)) or is_tracer(x):
        return x if is_tracer(x) or isinstance(x, jax.Array) else jnp.asarray(x)
    if isinstance(x, (list, tuple, float, int)):
        try:
            return jnp.asarray(x)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{where}: {name} must be an array, got {type(x).__name__}") from err
    raise TypeError(f"{where}: {name} must be an array, got {type(x).__name__}")


def is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def is_concrete(x) -> bool:
    """True when the values of `x` are known now (not a tracer under jit/vmap/grad)."""
    return not is_tracer(x)


def check_float_dtype(name: str, dtype, *, where: str) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(d.name for d in SUPPORTED_DTYPES)
        raise TypeError(f"{where}: {name} must have dtype {names}; got {dtype.name}")
    return dtype


def check_int(name: str, value, *, low: int, high: int, where: str) -> int:
    """An integer in [low, high]; bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__} {value!r}")
    if not low <= int(value) <= high:
        raise ValueError(f"{where}: {name} must be in [{low}, {high}], got {value}")
    return int(value)


def check_rank(name: str, x, *, min_rank: int, where: str, what: str) -> None:
    if x.ndim < min_rank:
        raise ValueError(
            f"{where}: {name} must have at least {min_rank} dimensions ({what}); "
            f"got shape {tuple(x.shape)}"
        )
