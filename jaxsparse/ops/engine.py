"""The CPU engine's own products, exposed for testing and for the formats built on them.

- `int8_matmul`  c = a @ b, int8 x int8 -> int32 (the engine's int8 tiles: AMX `tdpbssd`,
                 AVX512-VNNI `vpdpbusd`, or scalar code, by the CPU ISA in use)

The kernel target `jaxsparse_engine_int8_matmul` takes rank-3 operands with one leading kernel
batch dim, as every jaxsparse kernel (`ops/_primitive.py`):

    a    [Ba, T, K]   int8
    b    [Bb, K, N]   int8
    out  [B, T, N]    int32, B = max(Ba, Bb)

Sums are int32 and wrap modulo 2**32 as `jnp.matmul(..., preferred_element_type=jnp.int32)`
does; any result that fits in int32 (every K below 131072) is exact. No CUDA kernel: on GPUs the
op runs its reference, with a `JaxsparseFallbackWarning`. Integer products have no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive

from jaxsparse import _validate
from jaxsparse.ops import _primitive as P

__all__ = ["int8_matmul", "int8_matmul_reference"]

_WHERE = "int8_matmul"

int8_matmul_p = Primitive("jaxsparse_engine_int8_matmul")


def _check_matrix(name, x, what):
    x = _validate.as_array(name, x, where=_WHERE)
    if x.ndim != 2:
        raise ValueError(f"{_WHERE}: {name} must be a 2-D array {what}; got shape {tuple(x.shape)}")
    if x.dtype != jnp.int8:
        raise TypeError(f"{_WHERE}: {name} must have dtype int8; got {x.dtype}")
    return x


def int8_matmul(a, b):
    """`a @ b` of int8 matrices, accumulated and returned in int32, on the CPU engine's int8 tiles.

    Args:
        a: `[T, K]` int8.
        b: `[K, N]` int8.

    Returns:
        `[T, N]` int32, exactly `int8_matmul_reference(a, b)`.
    """
    a = _check_matrix("a", a, "[T, K]")
    b = _check_matrix("b", b, "[K, N]")
    if b.shape[0] != a.shape[1]:
        raise ValueError(
            f"{_WHERE}: b.shape[0] (K) must equal a.shape[1] = {a.shape[1]}; got b of shape "
            f"{tuple(b.shape)}"
        )
    return int8_matmul_p.bind(a[None], b[None])[0]


def int8_matmul_reference(a, b):
    """The pure-jnp `int8_matmul` (the test oracle, and the fallback where no kernel exists).

    Args:
        a: `[..., T, K]` int8; b: `[..., K, N]` int8 (leading dims broadcast).

    Returns:
        `[..., T, N]` int32.
    """
    return jnp.matmul(a, b, preferred_element_type=jnp.int32)


def _abstract_eval(a, b):
    P.check_rank3(_WHERE, a=a, b=b)
    if a.dtype != jnp.int8 or b.dtype != jnp.int8:
        raise TypeError(f"{_WHERE}: a and b must be int8, got {a.dtype} and {b.dtype}")
    if b.shape[1] != a.shape[2]:
        raise ValueError(
            f"{_WHERE}: b must be [B, K, N] with K = {a.shape[2]} (a's); got {tuple(b.shape)}"
        )
    batch = P.check_batches(_WHERE, ("a", a), ("b", b))
    return a.update(shape=(batch, a.shape[1], b.shape[2]), dtype=jnp.int32)


def _jvp(primals, tangents):
    # Integer operands carry float0 tangents, and so does the integer result.
    del tangents
    out = int8_matmul_p.bind(*primals)
    return out, np.zeros(out.shape, dtype=jax.dtypes.float0)


def _transpose(ct, a, b):
    raise TypeError(f"{_WHERE}: an integer product is not differentiable")


def _batch(args, dims):
    return P.batch_into_kernel_batch(int8_matmul_p.bind, args, dims)


P.register(int8_matmul_p, abstract_eval=_abstract_eval, jvp=_jvp, transpose=_transpose,
           batch=_batch, reference=int8_matmul_reference, target="jaxsparse_engine_int8_matmul",
           attrs=())
