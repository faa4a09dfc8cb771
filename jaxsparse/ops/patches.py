"""The im2col patches of a channels-last input: the one implementation behind the convolution
layers (`jaxsparse.nn.conv.conv_patches`, which resolves the layers' padding modes first) and the
1xN convolution op (`jaxsparse.ops.blocks_conv`: its reference, its CUDA route and its backward)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax.numpy as jnp
from jax import lax


def im2col(x, kernel_size: Sequence[int], strides: Sequence[int], dilation: Sequence[int],
           padding: Sequence[tuple[int, int]], input_dilation: Sequence[int] | None = None):
    """The patches of `x`, features in the order of a row-major reshape of the kernel.

    Args:
        x: `[batch, *spatial, channels]`, any dtype.
        kernel_size, strides, dilation: one int per spatial dim (`dilation` is the kernel's).
        padding: `(lo, hi)` zeros per spatial dim, as `lax.conv_general_dilated` reads explicit
            padding (negative values crop).
        input_dilation: one int per spatial dim (default 1: none).

    Returns:
        `[batch, *out_spatial, prod(kernel_size) * channels]` in x's dtype: feature
        `(position, c)` of an output pixel is channel `c` of the input the kernel position
        `position` (row-major over `kernel_size`) reads, zero in the padding.
    """
    if input_dilation is None:
        input_dilation = (1,) * len(kernel_size)
    config = [(0, 0, 0)]
    config += [(lo, hi, d - 1) for (lo, hi), d in zip(padding, input_dilation)]
    config += [(0, 0, 0)]
    if any(c != (0, 0, 0) for c in config):
        x = lax.pad(x, jnp.zeros((), x.dtype), config)
    kernel_dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    out = [(p - k) // s + 1 if p >= k else 0
           for p, k, s in zip(x.shape[1:-1], kernel_dilated, strides)]
    batch, channels = x.shape[0], x.shape[-1]
    positions = 1
    for k in kernel_size:
        positions *= k
    if 0 in out:
        return jnp.zeros((batch, *out, positions * channels), x.dtype)
    slices = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        start = [o * d for o, d in zip(offset, dilation)]
        limit = [s + (n - 1) * st + 1 for s, n, st in zip(start, out, strides)]
        slices.append(lax.slice(x, (0, *start, 0), (batch, *limit, channels), (1, *strides, 1)))
    return slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)
