"""`SparseConv`: `flax.linen.Conv` with a structured-sparse kernel, for every format.

The kernel `[*kernel_size, in, features]` is held as a format of its flattened
`[prod(kernel_size) * in, features]` matrix, inputs ordered (kernel position, input channel), as
in `jaxsparse.nn.SparseConv` (jaxsparse/nn/conv.py: the layout, the im2col forward pass and the
shape rules). The variables follow `SparseDense`: the format's trainable arrays (`values`) and
`bias` in `params`, its frozen arrays in the `"sparsity"` collection, each boxed in a
`ConvSparsityIndices` (a `SparsityIndices` that also carries `kernel_size`), so
`jaxsparse.linen.densify(variables)` can give the kernel back its convolution shape.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import linen as nn
from flax import struct
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import default_kernel_init
from flax.typing import Array, Dtype, Initializer, PaddingLike, PrecisionLike, PromoteDtypeFn

from jaxsparse.linen.dense import (
    SPARSITY_COLLECTION,
    SparsityIndices,
    held_arrays,
    promoted_weight,
)
from jaxsparse.nn.conv import (
    check_feature_group_count,
    conv_geometry,
    conv_pattern,
    sparse_conv,
)


class ConvSparsityIndices(SparsityIndices):
    """One frozen array of a linen `SparseConv`, boxed with its spec, the flattened
    `in_features` (`prod(kernel_size) * in`), `out_features` and `kernel_size` (all static)."""

    kernel_size: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)


class SparseConv(nn.Module):
    """A convolution with a structured-sparse kernel, channels last (NHWC for 2-D).

    `nn.Conv` with `sparsity=` (and `feature_group_count=1`): `init` draws the dense kernel
    `[*kernel_size, in, features]` with `kernel_init` from the same rng as `nn.Conv` would and
    prunes its flattened `[prod(kernel_size) * in, features]` matrix by magnitude, so a fresh
    SparseConv is the magnitude-pruned version of a fresh Conv of the same name.

    Variables: the format's trainable arrays in `params` (Blocks: `params/values` `[nnz, n]`),
    `params/bias` `[features]` (when `use_bias`), and its frozen arrays in `sparsity/` (Blocks:
    `indices`, `indptr`), each boxed in `ConvSparsityIndices`: pass the whole variable dict to
    `apply`.

    Example:
        >>> import jax, jax.numpy as jnp, jaxsparse as jsp
        >>> from flax import linen as nn
        >>> conv = jsp.linen.SparseConv(32, (3, 3), sparsity=jsp.Blocks(16, 0.25))
        >>> variables = conv.init(jax.random.key(0), jnp.ones((1, 8, 8, 16)))
        >>> jax.tree.map(jnp.shape, nn.meta.unbox(variables))
        {'params': {'bias': (32,), 'values': (72, 16)}, 'sparsity': {'indices': (72,), 'indptr': (3,)}}
        >>> conv.apply(variables, jnp.ones((2, 8, 8, 16))).shape
        (2, 8, 8, 32)

    Attributes:
        features: the number of output channels (filters).
        kernel_size: an int (1-D) or one int per spatial dimension.
        strides: an int or one int per spatial dimension (default 1).
        padding: 'SAME', 'VALID', 'CIRCULAR', 'REFLECT', 'CAUSAL' (1-D), an int, or one int or
            `(low, high)` pair per spatial dimension.
        input_dilation, kernel_dilation: an int or one int per spatial dimension.
        feature_group_count: only 1 (grouped and depthwise convolutions are refused).
        sparsity: the format's spec (keyword-only): `jaxsparse.Blocks(n, density)`,
            `jaxsparse.NM(n, m)`, `jaxsparse.VNM(v, n, m)` (N:M and V:N:M need the input channels
            to be a multiple of `m`), their strings, or any registered spec that fits.
        use_bias: whether to add a bias to the output (default: True).
        dtype: the dtype of the computation (default: infer from input and params).
        param_dtype: the dtype passed to parameter initializers (default: float32).
        precision: kept for signature compatibility; the sparse kernels multiply in the operand
            dtype and always accumulate in float32.
        kernel_init: initializer for the dense `[*kernel_size, in, features]` kernel.
        bias_init: initializer for the bias.
        promote_dtype: promotes `(inputs, trainable arrays..., bias)` to `dtype=`.
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: None | int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    input_dilation: None | int | Sequence[int] = 1
    kernel_dilation: None | int | Sequence[int] = 1
    feature_group_count: int = 1
    sparsity: Any = dataclasses.field(kw_only=True)
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    promote_dtype: PromoteDtypeFn = promote_dtype

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        """Applies the sparse convolution.

        Args:
            inputs: `[*batch, *spatial, in]`, channels last; no batch dim, one, or several.

        Returns:
            `[*batch, *out_spatial, features]` in the promoted dtype.
        """
        where = f"jaxsparse.linen.SparseConv ({self.name or 'unnamed'})"
        check_feature_group_count(self.feature_group_count, where)
        geometry = conv_geometry(self.kernel_size, self.strides, self.padding,
                                 self.input_dilation, self.kernel_dilation, where=where)
        in_channels = jnp.shape(inputs)[-1]
        pattern, fmt = conv_pattern(self.sparsity, geometry, in_channels, self.features, where)
        in_features = geometry.positions * in_channels  # Rows of the flattened kernel.
        kernel_shape = (*geometry.kernel_size, in_channels, self.features)

        def box(value):
            return ConvSparsityIndices(value, pattern, in_features, self.features,
                                       geometry.kernel_size)

        def check_box(name, boxed):
            made_for = (
                (boxed.pattern, boxed.in_features, getattr(boxed, "kernel_size", None))
                if isinstance(boxed, SparsityIndices)
                else None
            )
            if made_for not in (None, (pattern, in_features, geometry.kernel_size)):
                raise ValueError(
                    f"{where}: {SPARSITY_COLLECTION}/{name} was made for pattern {made_for[0]} "
                    f"with in_features={made_for[1]}, kernel_size={made_for[2]}; this layer is "
                    f"{pattern} with in_features={in_features} "
                    f"(= {math.prod(geometry.kernel_size)} positions x {in_channels} channels), "
                    f"kernel_size={geometry.kernel_size}"
                )

        def draw_kernel(rng):
            return self.kernel_init(rng, kernel_shape, self.param_dtype)

        arrays = held_arrays(self, where, pattern, fmt, in_features, draw_kernel, box, check_box)
        inputs, weight, bias = promoted_weight(self, pattern, fmt, in_features, inputs, arrays)
        y = sparse_conv(where, inputs, weight, geometry, in_channels)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y
