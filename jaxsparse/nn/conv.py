"""`SparseConv`: `nnx.Conv` with a structured-sparse kernel, for every format.

A convolution kernel `[*kernel_size, in, out]` (HWIO for 2-D) is held as a format of the
`[prod(kernel_size) * in, out]` matrix it flattens to, its inputs ordered (kernel position
row-major, then input channel): the order of a row-major reshape of the kernel. Sparsity thus
runs along the input channels of each kernel position. N:M and V:N:M need `in % m == 0`, so
that no group of `m` inputs straddles two kernel positions; a 1xN block is one input by `n`
outputs and never does.

The forward pass is im2col: the patches `[batch, *out_spatial, prod(kernel_size) * in]` in that
same order (`conv_patches`, strided slices of the padded input, one per kernel position), then
the sparse product `patches @ weight`, a few images at a time on a CPU (`PATCH_CHUNK_BYTES`
of patches: they are read back while in the cache). A 1x1 kernel with stride 1 and no padding
is the product alone. Gradients flow through the slices (w.r.t. the input) and through the
format's primitives (w.r.t. its trainable values).

A 1xN kernel of a 2-D convolution without input dilation stores no patches: `blocks_conv`
(jaxsparse/ops/blocks.py) hands the unpadded input to a CPU kernel that gathers each
token's pixels through the kernel positions while it packs x, tile by tile
(`blocks_conv_direct`); its backward builds the patches a few images at a time.

The helpers here (`conv_geometry`, `conv_patches`, `conv_fits`, `sparse_conv`) are what the
linen layer (jaxsparse/linen/conv.py) and both surgeries share.
"""

from __future__ import annotations

import math
import typing as tp
from collections.abc import Sequence
from types import MappingProxyType

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.nnx.nn.linear import default_bias_init, default_kernel_init
from flax.typing import Dtype, Initializer, PrecisionLike, PromoteDtypeFn
from jax import lax

from jaxsparse import _validate as V
from jaxsparse.formats.blocks import BlocksSparse
from jaxsparse.nn import _layout
from jaxsparse.ops.blocks import blocks_conv
from jaxsparse.ops.patches import im2col
from jaxsparse.nn.linear import HeldKernel, _Constant, _make_bias
from jaxsparse.prune import as_pattern, fits

Array = jax.Array

_PADDING_STRINGS = ("SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL")


# ====================================================================== geometry
class ConvGeometry(tp.NamedTuple):
    """A convolution's static numbers, validated and broadcast to the spatial rank.

    Attributes:
        kernel_size: `(k_1, ..., k_r)`, positive ints.
        strides, input_dilation, kernel_dilation: `r` positive ints each.
        padding: a string of `_PADDING_STRINGS`, or `r` `(low, high)` int pairs (negative
            values crop, as in `lax.conv_general_dilated`).
    """

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str | tuple[tuple[int, int], ...]
    input_dilation: tuple[int, ...]
    kernel_dilation: tuple[int, ...]

    @property
    def rank(self) -> int:
        return len(self.kernel_size)

    @property
    def positions(self) -> int:
        """Kernel positions: `prod(kernel_size)`."""
        return math.prod(self.kernel_size)


def conv_geometry(
    kernel_size,
    strides=1,
    padding="SAME",
    input_dilation=1,
    kernel_dilation=1,
    *,
    where: str,
) -> ConvGeometry:
    """Validate and normalise a convolution's numbers as `nnx.Conv` / `linen.Conv` take them.

    `kernel_size` is an int (1-D) or a sequence of positive ints; `strides` and the dilations
    are None (1), an int or one int per spatial dimension; `padding` is 'SAME', 'VALID',
    'CIRCULAR', 'REFLECT', 'CAUSAL' (1-D only), an int, or one int or `(low, high)` pair per
    spatial dimension. Errors name the argument, what was expected and what came.
    """
    if isinstance(kernel_size, (int,)) and not isinstance(kernel_size, bool):
        kernel_size = (kernel_size,)
    if not isinstance(kernel_size, Sequence) or isinstance(kernel_size, str) or not kernel_size:
        raise TypeError(
            f"{where}: kernel_size must be an int or a non-empty sequence of ints; got "
            f"{kernel_size!r}"
        )
    kernel_size = tuple(
        V.check_int(f"kernel_size[{i}]", k, low=1, high=2**31 - 1, where=where)
        for i, k in enumerate(kernel_size)
    )
    rank = len(kernel_size)

    def per_dim(name, value):
        if value is None:
            value = 1
        if isinstance(value, Sequence) and not isinstance(value, str):
            if len(value) != rank:
                raise ValueError(
                    f"{where}: {name} must be an int or {rank} ints (one per spatial dimension "
                    f"of kernel_size={kernel_size}); got {tuple(value)!r}"
                )
            return tuple(
                V.check_int(f"{name}[{i}]", v, low=1, high=2**31 - 1, where=where)
                for i, v in enumerate(value)
            )
        return (V.check_int(name, value, low=1, high=2**31 - 1, where=where),) * rank

    strides = per_dim("strides", strides)
    input_dilation = per_dim("input_dilation", input_dilation)
    kernel_dilation = per_dim("kernel_dilation", kernel_dilation)
    padding = _canonical_padding(padding, rank, where)
    if isinstance(padding, str) and any(d != 1 for d in input_dilation):
        # What lax.conv_general_dilated (so nnx.Conv) refuses too: give the pads explicitly.
        raise ValueError(
            f"{where}: padding must be explicit (low, high) pairs when input_dilation > 1 (a "
            f"transposed convolution), as in lax.conv_general_dilated; got padding={padding!r} "
            f"with input_dilation={input_dilation}"
        )
    return ConvGeometry(kernel_size, strides, padding, input_dilation, kernel_dilation)


def _canonical_padding(padding, rank: int, where: str):
    expected = (
        f"'SAME', 'VALID', 'CIRCULAR', 'REFLECT', 'CAUSAL' (1-D), an int, or {rank} ints or "
        "(low, high) int pairs (one per spatial dimension)"
    )
    if isinstance(padding, str):
        if padding not in _PADDING_STRINGS:
            raise ValueError(f"{where}: padding must be {expected}; got {padding!r}")
        if padding == "CAUSAL" and rank != 1:
            raise ValueError(
                f"{where}: padding='CAUSAL' is only for 1-D convolutions; kernel_size has "
                f"{rank} dimensions"
            )
        return padding

    def as_int(p):
        if isinstance(p, bool) or not isinstance(p, int):
            raise TypeError(f"{where}: padding must be {expected}; got {padding!r}")
        return int(p)

    if isinstance(padding, int) and not isinstance(padding, bool):
        return ((int(padding), int(padding)),) * rank
    if isinstance(padding, Sequence) and len(padding) == rank:
        pairs = []
        for p in padding:
            if isinstance(p, Sequence) and len(p) == 2:
                pairs.append((as_int(p[0]), as_int(p[1])))
            else:
                pairs.append((as_int(p), as_int(p)))
        return tuple(pairs)
    raise ValueError(f"{where}: padding must be {expected}; got {padding!r}")


def check_feature_group_count(feature_group_count, where: str) -> None:
    """Only 1: a grouped (or depthwise) convolution would be one small matrix per group."""
    if isinstance(feature_group_count, bool) or feature_group_count != 1:
        raise ValueError(
            f"{where}: feature_group_count must be 1: a sparse convolution holds its kernel as "
            "one [prod(kernel_size) * in_features, out_features] sparse matrix, and a grouped "
            "or depthwise convolution would be one small matrix per group; got "
            f"feature_group_count={feature_group_count!r}"
        )


# ====================================================================== fits
def _input_groups(pattern) -> list[tuple[str, int]]:
    """`(field, size)` of each run of consecutive inputs a spec treats as one group (N:M's and
    V:N:M's `m`, int4's `group_size`, and those of a spec nested in a field), from its fields:
    no format is named here."""
    groups = []
    for field in getattr(pattern, "_fields", ()):
        value = getattr(pattern, field)
        if field in ("m", "group_size") and isinstance(value, int) and not isinstance(value, bool):
            groups.append((field, value))
        elif hasattr(value, "_fields"):
            groups.extend(_input_groups(value))
    return groups


def conv_fits(pattern, kernel_shape) -> str | None:
    """Whether a sparse convolution with a kernel of `kernel_shape` can take `pattern`.

    The kernel `[*kernel_size, in, out]` is held as its `[prod(kernel_size) * in, out]` matrix,
    so the spec must fit that (`jaxsparse.prune.fits`, the spec's `fits_shape`), and every group
    of consecutive inputs the spec has (N:M's `m`, int4's `group_size`) must divide `in`, so that
    no group straddles two kernel positions.

    Args:
        pattern: anything `jaxsparse.prune.as_pattern` accepts.
        kernel_shape: `[*kernel_size, in, out]`, at least 3 non-negative ints.

    Returns:
        None when it fits, else the reason (what `sparsify` logs when it skips a Conv).

    Example:
        >>> conv_fits("2:4", (3, 3, 16, 32)) is None
        True
        >>> conv_fits("2:4", (3, 3, 6, 32))
        'in_features=6 is not a multiple of m=4: a group of 4 consecutive inputs would straddle two kernel positions'
    """
    pattern = as_pattern(pattern)
    shape = tuple(int(d) for d in kernel_shape)
    if len(shape) < 3:
        return (f"kernel of shape {shape} has rank {len(shape)}; a convolution kernel is "
                "[*kernel_size, in, out]")
    *kernel_size, cin, cout = shape
    reason = fits(pattern, (math.prod(kernel_size) * cin, cout))
    if reason is not None:
        return reason
    for field, size in _input_groups(pattern):
        if cin % size:
            return (f"in_features={cin} is not a multiple of {field}={size}: a group of {size} "
                    "consecutive inputs would straddle two kernel positions")
    return None


def conv_pattern(sparsity, geometry: ConvGeometry, in_features, out_features, where: str):
    """Validate a convolution's sizes and pattern together: (spec, format), or a clear error."""
    in_features = V.check_int("in_features", in_features, low=1, high=2**31 - 1, where=where)
    out_features = V.check_int("out_features", out_features, low=1, high=2**31 - 1, where=where)
    pattern = _layout.pattern_of(sparsity, where)
    fmt = _layout.format_of(pattern, where)
    reason = conv_fits(pattern, (*geometry.kernel_size, in_features, out_features))
    if reason is not None:
        raise ValueError(
            f"{where}: sparsity={pattern} cannot be used by a convolution with "
            f"in_features={in_features}, out_features={out_features}, "
            f"kernel_size={geometry.kernel_size}: {reason}"
        )
    return pattern, fmt


# ====================================================================== forward
def explicit_padding(x: Array, geometry: ConvGeometry):
    """`(x, pads)`: x with CIRCULAR, REFLECT or CAUSAL padding applied, and the zero padding
    `[(lo, hi), ...]` per spatial dim that remains (as `lax.conv_general_dilated` reads it)."""
    padding = geometry.padding
    kernel_dilated = [(k - 1) * d + 1 for k, d in zip(geometry.kernel_size,
                                                       geometry.kernel_dilation)]
    if padding in ("CIRCULAR", "REFLECT"):
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in kernel_dilated] + [(0, 0)]
        x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
        padding = "VALID"
    elif padding == "CAUSAL":
        x = jnp.pad(x, [(0, 0), (kernel_dilated[0] - 1, 0), (0, 0)])
        padding = "VALID"
    if isinstance(padding, str):
        # As lax.conv_general_dilated (conv_geometry refuses them with input dilation).
        padding = lax.padtype_to_pads(x.shape[1:-1], kernel_dilated, geometry.strides, padding)
    return x, [tuple(p) for p in padding]


def conv_patches(x: Array, geometry: ConvGeometry) -> Array:
    """The im2col patches of a channels-last input, in the flattened kernel's order.

    `conv_patches(x, g) @ kernel.reshape(-1, out)` equals `lax.conv_general_dilated` of `x` with
    the kernel `[*kernel_size, in, out]` (channels-last), `g`'s strides, padding and dilations.
    Unlike `lax.conv_general_dilated_patches` (features ordered (in, *kernel_size)), the features
    come in the order of a row-major reshape of the kernel, (*kernel_size, in), so they meet the
    sparse matrix's rows without a transpose of either.

    Args:
        x: `[batch, *spatial, in]`, any float dtype.
        geometry: from `conv_geometry`.

    Returns:
        `[batch, *out_spatial, prod(kernel_size) * in]` in `x.dtype`.
    """
    x, padding = explicit_padding(x, geometry)
    return im2col(x, geometry.kernel_size, geometry.strides, geometry.kernel_dilation, padding,
                  geometry.input_dilation)


def sparse_conv(where: str, inputs: Array, weight, geometry: ConvGeometry, in_features: int,
                preferred_element_type=None) -> Array:
    """The convolution of channels-last `inputs` by a sparse kernel `weight`.

    Args:
        where: the public name for error messages.
        inputs: `[*batch, *spatial, in_features]` (any number of batch dims, none included),
            already promoted to the compute dtype.
        weight: a format of logical shape `[prod(kernel_size) * in_features, out]`.
        geometry: from `conv_geometry`.
        in_features: the input channels.
        preferred_element_type: as in `lax.conv_general_dilated`.

    Returns:
        `[*batch, *out_spatial, out]`.
    """
    rank = geometry.rank
    if inputs.ndim < rank + 1:
        raise ValueError(
            f"{where}: inputs must have at least {rank + 1} dimensions ([*batch, *spatial, "
            f"in_features] for kernel_size={geometry.kernel_size}); got shape "
            f"{tuple(inputs.shape)}"
        )
    if inputs.shape[-1] != in_features:
        raise ValueError(
            f"{where}: inputs must have in_features={in_features} channels in their last "
            f"dimension; got shape {tuple(inputs.shape)}"
        )
    batch_shape = inputs.shape[: inputs.ndim - rank - 1]
    x = inputs.reshape(-1, *inputs.shape[len(batch_shape):])
    plain = (
        all(k == 1 for k in geometry.kernel_size)
        and all(s == 1 for s in geometry.strides)
        and all(d == 1 for d in geometry.input_dilation)
        and (isinstance(geometry.padding, str) or all(p == (0, 0) for p in geometry.padding))
    )
    if plain:
        # A 1x1 kernel at stride 1 is the product itself (SAME, VALID, CIRCULAR, REFLECT and
        # CAUSAL all pad nothing for it).
        y = _layout.sparse_product(where, x, weight, preferred_element_type)
        return y.reshape(*batch_shape, *y.shape[1:])

    y = blocks_conv_direct(where, x, weight, geometry, preferred_element_type)
    if y is not None:
        return y.reshape(*batch_shape, *y.shape[1:])

    def conv(images):
        return _layout.sparse_product(where, conv_patches(images, geometry), weight,
                                      preferred_element_type)

    chunk = images_per_chunk(x, geometry)
    if chunk >= x.shape[0]:
        y = conv(x)
    else:
        y = lax.map(conv, x[:, None], batch_size=chunk)[:, 0]
    return y.reshape(*batch_shape, *y.shape[1:])


def blocks_conv_direct(where: str, x, weight, geometry: ConvGeometry, preferred_element_type):
    """`conv_patches(x) @ weight` by `blocks_conv`, in sparse_product's dtypes, for a single 1xN
    weight of a 2-D convolution without input dilation or negative padding: the kernel gathers
    the patches itself and never stores them. None for the rest (they store the patches; a
    stacked weight, split by inputs, runs its own sum of runs there)."""
    if not (isinstance(weight, BlocksSparse) and weight.values.ndim == 2 and not weight.stacked
            and geometry.rank == 2 and all(d == 1 for d in geometry.input_dilation)):
        return None
    compute = jnp.promote_types(x.dtype, weight.dtype)
    out = compute
    if preferred_element_type is not None:
        out = jnp.dtype(preferred_element_type)
        if not jnp.issubdtype(out, jnp.floating):
            raise TypeError(f"{where}: preferred_element_type must be a float dtype, got "
                            f"{out.name}")
        compute = jnp.promote_types(compute, out)
    x, pads = explicit_padding(x.astype(compute), geometry)
    if any(p < 0 for pair in pads for p in pair):
        return None
    w = weight.astype(compute) if weight.dtype != compute else weight
    y = blocks_conv(x, w.values[None], w.indices[None], w.indptr[None],
                    out_features=w.shape[-1], kernel_size=geometry.kernel_size,
                    strides=geometry.strides, dilation=geometry.kernel_dilation, padding=pads)
    return y.astype(out)


#: Patches a CPU builds per step of the batch loop in `sparse_conv` (bytes), so that they are
#: read back by the product while still in the cache. All of a batch's patches at once (9x the
#: input for a 3x3 kernel) go out to DRAM and back: on 2 Zen 4 cores, f32, batch 8, 1x16@0.25,
#: the forward ran at 0.40x XLA's convolution at 28x28x128->128 and 0.23x at 56x56x64->64,
#: against 1.0-1.4x and ~0.5x in chunks of 1 to 8 MiB (bf16 changed little);
#: benchmarks/bench_conv.py.
PATCH_CHUNK_BYTES = 4 * 2**20


def images_per_chunk(x, geometry: ConvGeometry) -> int:
    """Images per step of the batch loop: all of them off the CPU (a GPU wants the whole batch
    in one kernel), else as many as fit `PATCH_CHUNK_BYTES` of patches, at least one."""
    if jax.default_backend() != "cpu":
        return x.shape[0]
    in_pixels = math.prod(x.shape[1:-1])
    out_pixels = in_pixels * math.prod(d for d in geometry.input_dilation) // math.prod(
        geometry.strides)
    per_image = max(1, out_pixels * geometry.positions * x.shape[-1] * x.dtype.itemsize)
    return max(1, PATCH_CHUNK_BYTES // per_image)


def flatten_kernel(kernel: Array) -> Array:
    """`[*kernel_size, in, out]` -> `[prod(kernel_size) * in, out]` (row-major: the patches'
    order)."""
    return kernel.reshape(-1, kernel.shape[-1])


# ====================================================================== the layer
class SparseConv(HeldKernel, nnx.Module):
    """A convolution with a structured-sparse kernel, channels last (NHWC for 2-D).

    `nnx.Conv` with `sparsity=`: the kernel `[*kernel_size, in_features, out_features]` keeps
    only the entries the pattern allows in its flattened `[prod(kernel_size) * in_features,
    out_features]` matrix, inputs ordered (kernel position, input channel), so N:M groups and
    1xN blocks run along the input channels of one kernel position. A fresh layer is the
    magnitude-pruned version of a fresh `nnx.Conv` built with the same arguments and `rngs`.

    Example:
        >>> import jax.numpy as jnp, jaxsparse as jsp
        >>> from flax import nnx
        >>> conv = jsp.nn.SparseConv(16, 32, (3, 3), sparsity=jsp.Blocks(16, 0.25),
        ...                          rngs=nnx.Rngs(0))
        >>> conv.weight.shape  # [3 * 3 * 16, 32]
        (144, 32)
        >>> conv(jnp.ones((2, 8, 8, 16))).shape
        (2, 8, 8, 32)
        >>> conv.dense_kernel().shape
        (3, 3, 16, 32)

    Args:
        in_features: the input channels.
        out_features: the output channels (filters).
        kernel_size: an int (1-D) or one int per spatial dimension, e.g. `(3, 3)`.
        strides: an int or one int per spatial dimension (default 1).
        sparsity: the format's spec: `jaxsparse.Blocks(n, density)` (1xN blocks along the
            outputs), `jaxsparse.NM(n, m)` and `jaxsparse.VNM(v, n, m)` (which need
            `in_features % m == 0`), their strings, or any registered spec that fits the
            flattened kernel. Mask-only patterns (`jaxsparse.prune.Unstructured`) are refused.
        padding: 'SAME', 'VALID', 'CIRCULAR', 'REFLECT', 'CAUSAL' (1-D), an int, or one int or
            `(low, high)` pair per spatial dimension, as in `nnx.Conv`.
        input_dilation: an int or one int per spatial dimension (transposed convolution).
        kernel_dilation: an int or one int per spatial dimension (atrous convolution).
        feature_group_count: only 1 (grouped and depthwise convolutions are refused).
        use_bias: whether to add a bias to the output (default: True).
        dtype: the dtype of the computation (default: infer from input and params).
        param_dtype: the dtype passed to parameter initializers (default: float32).
        precision: kept for `to_dense()`; the sparse kernels multiply in the operand dtype and
            always accumulate in float32.
        kernel_init: initializer for the dense `[*kernel_size, in, out]` kernel that is then
            pruned.
        bias_init: initializer for the bias.
        promote_dtype: promotes `(inputs, trainable arrays..., bias)` to `dtype=`, as in
            `nnx.Conv`.
        preferred_element_type: the dtype of the result, as in `lax.conv_general_dilated`.
        rngs: rng key.
        kernel_metadata: optional metadata set on every array of the format.
        bias_metadata: optional metadata set on the bias.

    Attributes:
        values, ...: the format's trainable arrays as `nnx.Param`s (Blocks: `values` `[nnz, n]`;
            N:M: `[out_features, kept]`) in `param_dtype`.
        indices, ...: the format's frozen arrays as `SparsityIndices`.
        bias: `nnx.Param` `[out_features]` in `param_dtype`, or None.
        kernel_shape: `(*kernel_size, in_features, out_features)`.
        sparsity: the validated spec.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | tp.Sequence[int],
        strides: None | int | tp.Sequence[int] = 1,
        *,
        sparsity: tp.Any,
        padding: tp.Any = "SAME",
        input_dilation: None | int | tp.Sequence[int] = 1,
        kernel_dilation: None | int | tp.Sequence[int] = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        preferred_element_type: Dtype | None = None,
        rngs: nnx.Rngs,
        kernel_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
    ):
        where = "jaxsparse.nn.SparseConv"
        check_feature_group_count(feature_group_count, where)
        geometry = conv_geometry(kernel_size, strides, padding, input_dilation, kernel_dilation,
                                 where=where)
        pattern, fmt = conv_pattern(sparsity, geometry, in_features, out_features, where)
        kernel_shape = (*geometry.kernel_size, int(in_features), int(out_features))
        kernel = kernel_init(rngs.params(), kernel_shape, param_dtype)
        if isinstance(kernel, nnx.VariableMetadata):
            raise TypeError(
                f"{where}: kernel_init returned nnx.VariableMetadata (e.g. nnx.with_partitioning); "
                "a sparse layer stores its format's arrays, not the kernel: give a plain "
                "initializer and pass metadata through kernel_metadata="
            )
        if tuple(jnp.shape(kernel)) != kernel_shape:
            raise ValueError(
                f"{where}: kernel_init must return the kernel of shape {kernel_shape}; got "
                f"{tuple(jnp.shape(kernel))}"
            )
        self._hold(flatten_kernel(kernel), pattern, fmt, kernel_metadata,
                   _make_bias(use_bias, bias_init, rngs, out_features, param_dtype,
                              bias_metadata))

        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.kernel_size = geometry.kernel_size
        self.kernel_shape = kernel_shape
        self.strides = geometry.strides
        self.padding = geometry.padding
        self.input_dilation = geometry.input_dilation
        self.kernel_dilation = geometry.kernel_dilation
        self.feature_group_count = 1
        self.sparsity = pattern
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.promote_dtype = promote_dtype
        self.preferred_element_type = preferred_element_type

    @property
    def geometry(self) -> ConvGeometry:
        return ConvGeometry(self.kernel_size, self.strides, self.padding, self.input_dilation,
                            self.kernel_dilation)

    @property
    def flat_in_features(self) -> int:
        """Rows of the sparse matrix: `prod(kernel_size) * in_features`."""
        return math.prod(self.kernel_size) * self.in_features

    def __call__(self, inputs: Array) -> Array:
        """Applies the sparse convolution.

        Args:
            inputs: `[*batch, *spatial, in_features]`, channels last (NHWC for 2-D); no batch
                dim, one, or several (flattened for the product and restored).

        Returns:
            `[*batch, *out_spatial, out_features]` in the promoted dtype (or
            `preferred_element_type`).
        """
        where = "jaxsparse.nn.SparseConv"
        inputs = V.as_array("inputs", inputs, where=where)
        inputs, weight, bias = self._promoted(where, inputs)
        y = sparse_conv(where, inputs, weight, self.geometry, self.in_features,
                        self.preferred_element_type)
        return self._add_bias(y, bias)

    def _rows(self) -> int:
        return self.flat_in_features

    @property
    def weight(self):
        """The sparse kernel as its format, of logical shape `[prod(kernel_size) * in, out]`,
        validated (outside `jit` the positions are checked)."""
        return self._validated_weight("jaxsparse.nn.SparseConv.weight")

    def dense_kernel(self) -> Array:
        """`[*kernel_size, in_features, out_features]`: kept values in place, zeros elsewhere."""
        return self.weight.todense().reshape(self.kernel_shape)

    @classmethod
    def from_dense(
        cls,
        conv_or_kernel: nnx.Conv | Array,
        sparsity: tp.Any,
        *,
        method: tp.Any = "magnitude",
        bias: Array | None = None,
        **kwargs: tp.Any,
    ) -> SparseConv:
        """A SparseConv holding the entries of a dense convolution or kernel that `method` keeps.

        Args:
            conv_or_kernel: an `nnx.Conv` (its bias, strides, padding, dilations and dtype
                settings are carried over) or a kernel `[*kernel_size, in, out]`
                (float32/bfloat16/float16; `param_dtype` becomes its dtype).
            sparsity: the pattern, as for the constructor.
            method: "magnitude" (the format's `fromdense` on the flattened kernel), a bool mask
                of the kernel's shape or of its flattened `[prod(kernel_size) * in, out]` shape
                that respects the pattern, or a callable `(flat kernel [prod(kernel_size) * in,
                out], pattern) -> mask` of either shape.
            bias: `[out]`, only with a kernel (a Conv brings its own).
            **kwargs: constructor settings to set or override (strides, padding,
                input_dilation, kernel_dilation, dtype, precision, promote_dtype,
                preferred_element_type, kernel_metadata, bias_metadata).

        Returns:
            A new SparseConv; the argument is not modified.

        Raises:
            ValueError: a Conv that cannot convert (`dense_conv_reason`), a mask that breaks the
                pattern, or a pattern the kernel cannot take.
        """
        where = "jaxsparse.nn.SparseConv.from_dense"
        kernel, bias, config = cls._dense_source(
            where, conv_or_kernel, nnx.Conv, dense_conv_reason,
            ("strides", "padding", "input_dilation", "kernel_dilation", "dtype", "precision",
             "promote_dtype", "preferred_element_type"), bias, kwargs, _FROM_DENSE_KWARGS)
        kernel = V.as_array("kernel", kernel, where=where)
        if kernel.ndim < 3:
            raise ValueError(
                f"{where}: kernel must have at least 3 dimensions [*kernel_size, in, out]; got "
                f"shape {tuple(kernel.shape)}"
            )
        V.check_float_dtype("kernel", kernel.dtype, where=where)
        *kernel_size, in_features, out_features = kernel.shape
        bias = cls._checked_bias(where, bias, kernel.shape)
        config.update(kwargs)
        geometry = conv_geometry(
            tuple(kernel_size), config.get("strides", 1), config.get("padding", "SAME"),
            config.get("input_dilation", 1), config.get("kernel_dilation", 1), where=where,
        )
        pattern, _ = conv_pattern(sparsity, geometry, in_features, out_features, where)
        flat = flatten_kernel(kernel)
        mask = conv_mask_from_method(method, kernel, pattern, where)
        if mask is not None:  # Checks the mask against the pattern before building anything.
            arrays = _layout.compress(flat, pattern, mask)
        # The constructor prunes what kernel_init returns by magnitude, without a random draw;
        # a mask then replaces its choice.
        layer = cls(
            in_features,
            out_features,
            tuple(kernel_size),
            sparsity=pattern,
            use_bias=bias is not None,
            param_dtype=kernel.dtype,
            kernel_init=_Constant(kernel),
            bias_init=_Constant(bias),
            rngs=nnx.Rngs(0),
            **config,
        )
        if mask is not None:
            layer._replace_arrays(arrays)
        return layer

    def to_dense(self) -> nnx.Conv:
        """The equivalent `nnx.Conv`: the kept values in place, zeros elsewhere (bit-exact)."""
        kernel = self.dense_kernel()
        return nnx.Conv(
            self.in_features,
            self.out_features,
            self.kernel_size,
            self.strides,
            padding=self.padding if isinstance(self.padding, str) else list(self.padding),
            input_dilation=self.input_dilation,
            kernel_dilation=self.kernel_dilation,
            **self._dense_settings(kernel),
        )


_FROM_DENSE_KWARGS = frozenset(
    {
        "strides",
        "padding",
        "input_dilation",
        "kernel_dilation",
        "dtype",
        "precision",
        "promote_dtype",
        "preferred_element_type",
        "kernel_metadata",
        "bias_metadata",
    }
)


def dense_conv_reason(conv: nnx.Conv) -> str | None:
    """None when an nnx.Conv converts to SparseConv without losing behaviour, else why not."""
    if type(conv) is not nnx.Conv:
        return (f"{type(conv).__name__} is a subclass of nnx.Conv; converting it would lose its "
                "own behaviour")
    if conv.feature_group_count != 1:
        return (f"feature_group_count={conv.feature_group_count}: grouped and depthwise "
                "convolutions are not supported (one sparse matrix per layer)")
    if conv.mask is not None:
        return "it has a mask=, which the sparse kernel would replace"
    if conv.conv_general_dilated is not lax.conv_general_dilated:
        return "it uses a custom conv_general_dilated, which the sparse product cannot apply"
    if not isinstance(conv.in_features, int) or not isinstance(conv.out_features, int):
        return "in_features and out_features must be ints"
    return None


def conv_mask_from_method(method, kernel, pattern, where: str):
    """None for magnitude pruning, else the bool mask `[prod(kernel_size) * in, out]` of the
    flattened kernel chosen by `method` (a mask or a callable; either shape accepted)."""
    flat = flatten_kernel(kernel)
    if isinstance(method, str):
        return _layout.mask_from_method(method, flat, pattern, where)
    mask = method(flat, pattern) if callable(method) else method
    mask = V.as_array("method (mask)", mask, where=where)
    if tuple(mask.shape) == tuple(kernel.shape):
        mask = flatten_kernel(mask)
    if tuple(mask.shape) != tuple(flat.shape):
        raise ValueError(
            f"{where}: the mask given as method must have the kernel's shape "
            f"{tuple(kernel.shape)} or its flattened shape {tuple(flat.shape)}; got "
            f"{tuple(mask.shape)}"
        )
    return _layout.mask_from_method(mask, flat, pattern, where)
