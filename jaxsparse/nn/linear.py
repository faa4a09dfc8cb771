"""`SparseLinear`: `nnx.Linear` with a structured-sparse kernel, for every format.

The layer holds the arrays its format declares (jaxsparse/formats/_base.py), under their own
names: the trainable ones (`values`) as `nnx.Param`s, the frozen ones (N:M's `indices`, V:N:M's
`indices` and `columns`) as `SparsityIndices`, a non-trainable `nnx.Variable` type of their own
(as `nnx.LoRA` brings `LoRAParam`), so `nnx.grad`, `nnx.Optimizer(..., wrt=nnx.Param)` and optax
never see them.
"""

from __future__ import annotations

import typing as tp
from types import MappingProxyType

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.nnx.nn.linear import default_bias_init, default_kernel_init
from flax.typing import Dtype, Initializer, PrecisionLike, PromoteDtypeFn
from jax import lax

from jaxsparse import _validate as V
from jaxsparse.nn import _layout

Array = jax.Array
A = tp.TypeVar("A")


class SparsityIndices(nnx.Variable[A]):
    """A sparse layer's frozen structure (positions, column selections; uint8): never trained.

    Not an `nnx.Param`: `nnx.grad`, `nnx.Optimizer(model, tx, wrt=nnx.Param)` and
    `nnx.state(model, nnx.Param)` leave it out, while `nnx.state(model)` (checkpoints) keeps it.
    """


class HeldKernel:
    """What the nnx sparse layers (`SparseLinear`, `SparseConv`) share: a sparse kernel of
    `_rows()` x `out_features` held as its format's arrays (trainable ones as `nnx.Param`,
    frozen ones as `SparsityIndices`), an optional bias, the weight the product multiplies, and
    `from_dense`'s reading of a dense layer. A layer sets `sparsity`, `out_features`, `dtype`
    and `promote_dtype`, and says how many rows its kernel has."""

    def _rows(self) -> int:
        raise NotImplementedError

    def _hold(self, kernel, pattern, fmt, kernel_metadata, bias) -> None:
        """Hold `kernel [rows, out]` compressed to `pattern`, and `bias` (None: no bias)."""
        trainable = set(_layout.trainable_names(fmt))
        for name, array in _layout.compress(kernel, pattern).items():
            kind = nnx.Param if name in trainable else SparsityIndices
            setattr(self, name, kind(array, **kernel_metadata))
        self.bias: nnx.Param[jax.Array] | None
        self.bias = nnx.data(None) if bias is None else bias

    def _arrays(self, fmt) -> dict:
        return {name: getattr(self, name)[...] for name in fmt.array_names()}

    def _checked_arrays(self, where):
        fmt = _layout.format_of(self.sparsity, where)
        arrays = self._arrays(fmt)
        _layout.check_state(where, self.sparsity, fmt, self._rows(), self.out_features, arrays)
        return fmt, arrays

    def _promoted(self, where, inputs):
        """`(inputs, weight, bias)` promoted together to the compute dtype (the weight as its
        format, of logical shape `[rows, out]`)."""
        fmt, arrays = self._checked_arrays(where)
        bias = self.bias[...] if self.bias is not None else None
        names = _layout.trainable_names(fmt)
        inputs, *trainable, bias = self.promote_dtype(
            (inputs, *(arrays[n] for n in names), bias), dtype=self.dtype
        )
        arrays.update(zip(names, trainable))
        weight = _layout.weight(self.sparsity, self._rows(), arrays,
                                out_features=self.out_features)
        return inputs, _layout.in_compute_dtype(weight, self.dtype), bias

    def _validated_weight(self, where):
        fmt, arrays = self._checked_arrays(where)
        return _layout.weight(self.sparsity, self._rows(), arrays,
                              out_features=self.out_features, validate=True)

    @staticmethod
    def _add_bias(y, bias):
        if bias is None:
            return y
        return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))

    @staticmethod
    def _dense_source(where, layer_or_kernel, dense_type, reason_of, fields, bias, kwargs,
                      accepted):
        """`(kernel, bias, config)` from a dense layer of `dense_type` (its kernel, bias and the
        settings named in `fields`) or a bare kernel (and `bias=`)."""
        unknown = set(kwargs) - accepted
        if unknown:
            raise TypeError(
                f"{where}: unexpected keyword arguments {sorted(unknown)}; accepted: "
                f"{sorted(accepted)}"
            )
        if not isinstance(layer_or_kernel, dense_type):
            return layer_or_kernel, bias, {}
        layer = layer_or_kernel
        reason = reason_of(layer)
        if reason is not None:
            raise ValueError(f"{where}: cannot convert this layer: {reason}")
        if bias is not None:
            raise TypeError(f"{where}: bias= is only for a kernel; a {dense_type.__name__} "
                            "brings its own")
        bias = layer.bias[...] if layer.bias is not None else None
        return layer.kernel[...], bias, {f: getattr(layer, f) for f in fields}

    def _dense_settings(self, kernel) -> dict:
        """The keyword arguments of the equivalent dense layer holding `kernel`."""
        return dict(
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=kernel.dtype,
            precision=self.precision,
            kernel_init=_Constant(kernel),
            bias_init=_Constant(self.bias[...] if self.bias is not None else None),
            promote_dtype=self.promote_dtype,
            preferred_element_type=self.preferred_element_type,
            rngs=nnx.Rngs(0),
        )

    def _replace_arrays(self, arrays) -> None:
        """Hold `arrays` (a mask's compression) in place of the constructor's choice."""
        for name, array in arrays.items():
            getattr(self, name).set_value(array)

    @staticmethod
    def _checked_bias(where, bias, kernel_shape):
        if bias is None:
            return None
        bias = jnp.asarray(bias)
        if bias.shape != (kernel_shape[-1],):
            raise ValueError(
                f"{where}: bias must have shape ({kernel_shape[-1]},) (out_features of the "
                f"kernel {tuple(kernel_shape)}); got {tuple(bias.shape)}"
            )
        return bias


def _make_bias(use_bias, bias_init, rngs, out_features, param_dtype, bias_metadata):
    if not use_bias:
        return None
    return nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype), **bias_metadata)


class SparseLinear(HeldKernel, nnx.Module):
    """A linear transformation with a structured-sparse kernel, over the last input dimension.

    `nnx.Linear` with `sparsity=`: `y = x @ W + b` where `W` `[in_features, out_features]` keeps
    only the entries the pattern allows. A fresh layer is the magnitude-pruned version of a fresh
    `nnx.Linear` built with the same arguments and `rngs`: the dense kernel is drawn with
    `kernel_init` and pruned by magnitude.

    Example:
        >>> import jax.numpy as jnp, jaxsparse as jsp
        >>> from flax import nnx
        >>> layer = jsp.nn.SparseLinear(8, 4, sparsity=jsp.NM(2, 4), rngs=nnx.Rngs(0))
        >>> layer.values.shape, layer.indices.shape  # [out, in/m*n]
        ((4, 4), (4, 4))
        >>> layer(jnp.ones((16, 8))).shape
        (16, 4)
        >>> layer = jsp.nn.SparseLinear(64, 32, sparsity=jsp.VNM(16, 2, 8), rngs=nnx.Rngs(0))
        >>> layer.values.shape, layer.indices.shape, layer.columns.shape  # columns [out/v, in/m*4]
        ((32, 16), (32, 16), (2, 32))

    Args:
        in_features: the number of input features.
        out_features: the number of output features.
        sparsity: the format's spec: `jaxsparse.NM(n, m)` or `"n:m"` such as `"2:4"` (N:M along
            the input dimension), `jaxsparse.VNM(v, n, m)` or `"v:n:m"` such as `"64:2:8"`, or any
            registered spec (`in_features` must be at least `m`; a ragged last group is
            zero-padded). Mask-only patterns (`jaxsparse.prune.Unstructured`) are refused.
        use_bias: whether to add a bias to the output (default: True).
        dtype: the dtype of the computation (default: infer from input and params).
        param_dtype: the dtype passed to parameter initializers (default: float32).
        precision: kept for `to_dense()`; the sparse kernels multiply in the operand dtype and
            always accumulate in float32.
        kernel_init: initializer function for the dense `[in, out]` kernel that is then pruned.
        bias_init: initializer function for the bias.
        dot_general: only `jax.lax.dot_general` (the default): the product is
            `jaxsparse.matmul`, a custom dot_general cannot apply to it.
        promote_dtype: function to promote the dtype of the arrays to the desired dtype. The
            function should accept a tuple of `(inputs, values, bias)` and a `dtype` keyword
            argument, and return a tuple of arrays with the promoted dtype.
        preferred_element_type: the dtype of the product, as in `jax.lax.dot_general` (e.g.
            float32 results from bfloat16 operands).
        rngs: rng key.
        kernel_metadata: optional metadata set on every array of the format (`values` and
            `indices` are `[out, kept]`, the transposed layout of a kernel: sharding annotations
            name the `(out, in)` axes).
        bias_metadata: optional metadata set on the bias.

    Attributes:
        values: `nnx.Param` `[out_features, kept]` in `param_dtype` (kept = ceil(in/m)*n).
        indices, ...: the format's frozen arrays as `SparsityIndices` (uint8; N:M: each value's
            position in its group of m inputs; V:N:M: `indices` and `columns`).
        bias: `nnx.Param` `[out_features]` in `param_dtype`, or None.
        sparsity: the validated spec (a static value, e.g. `NM(2, 4)`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        sparsity: tp.Any,
        use_bias: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        dot_general: tp.Any = lax.dot_general,
        promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
        preferred_element_type: Dtype | None = None,
        rngs: nnx.Rngs,
        kernel_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
        bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
    ):
        where = "jaxsparse.nn.SparseLinear"
        pattern, fmt = _layout.layer_pattern(sparsity, in_features, out_features, where)
        _check_dot_general(dot_general, where)
        kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
        if isinstance(kernel, nnx.VariableMetadata):
            raise TypeError(
                f"{where}: kernel_init returned nnx.VariableMetadata (e.g. nnx.with_partitioning); "
                "a sparse layer stores values [out, kept], not the kernel: give a plain "
                "initializer and pass metadata through kernel_metadata="
            )
        self._hold(kernel, pattern, fmt, kernel_metadata,
                   _make_bias(use_bias, bias_init, rngs, out_features, param_dtype,
                              bias_metadata))

        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.sparsity = pattern
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.promote_dtype = promote_dtype
        self.preferred_element_type = preferred_element_type

    def __call__(self, inputs: Array) -> Array:
        """Applies the sparse linear transformation to the last dimension of the inputs.

        Args:
            inputs: `[..., in_features]`.

        Returns:
            `[..., out_features]` in the promoted dtype (or `preferred_element_type`).
        """
        where = "jaxsparse.nn.SparseLinear"
        inputs, weight, bias = self._promoted(where, inputs)
        y = _layout.sparse_product(where, inputs, weight, self.preferred_element_type)
        assert self.use_bias == (bias is not None)
        return self._add_bias(y, bias)

    def _rows(self) -> int:
        return self.in_features

    @property
    def weight(self):
        """The sparse kernel (e.g. an `NMSparse` `[in_features, out_features]`), validated.

        Outside `jit` the positions are checked (a clear error for corrupt or mismatched state).
        """
        return self._validated_weight("jaxsparse.nn.SparseLinear.weight")

    @classmethod
    def from_dense(
        cls,
        linear_or_kernel: nnx.Linear | Array,
        sparsity: tp.Any,
        *,
        method: tp.Any = "magnitude",
        bias: Array | None = None,
        **kwargs: tp.Any,
    ) -> SparseLinear:
        """A SparseLinear holding the entries of a dense layer or kernel that `method` keeps.

        Args:
            linear_or_kernel: an `nnx.Linear` (its bias and its settings, dtype, param_dtype,
                precision, promote_dtype, preferred_element_type, are carried over) or a kernel
                `[in_features, out_features]` (float32/bfloat16/float16; `param_dtype` becomes its
                dtype).
            sparsity: the pattern, as for the constructor.
            method: "magnitude" (keep the largest |w| the pattern allows), a bool mask
                `[in_features, out_features]` that respects the pattern, a callable
                `(kernel, pattern) -> mask`, or the compressed weight itself (a format
                instance of `sparsity` and the kernel's shape, e.g. from
                `jaxsparse.prune.sparsegpt`: the layer holds it, the kernel's values unused).
            bias: `[out_features]`, only with a kernel (a Linear brings its own).
            **kwargs: constructor settings to set or override (dtype, precision, promote_dtype,
                preferred_element_type, kernel_metadata, bias_metadata).

        Returns:
            A new SparseLinear; the argument is not modified.

        Raises:
            ValueError: a mask that breaks the pattern, a pattern the shape cannot take, an unknown
                method, or a Linear whose custom dot_general cannot carry over.
        """
        where = "jaxsparse.nn.SparseLinear.from_dense"
        kernel, bias, config = cls._dense_source(
            where, linear_or_kernel, nnx.Linear, dense_layer_reason,
            ("dtype", "precision", "promote_dtype", "preferred_element_type"), bias, kwargs,
            _FROM_DENSE_KWARGS)
        kernel = _check_kernel(kernel, where)
        in_features, out_features = kernel.shape
        bias = cls._checked_bias(where, bias, kernel.shape)
        pattern, _ = _layout.layer_pattern(sparsity, in_features, out_features, where)
        # Checks a mask (or a compressed weight) against the pattern before building anything.
        magnitude = isinstance(method, str) and method == "magnitude"
        arrays = None if magnitude else _layout.arrays_from_method(method, kernel, pattern, where)
        config.update(kwargs)
        # The constructor prunes what kernel_init returns by magnitude, without a random draw;
        # a mask then replaces its choice.
        layer = cls(
            in_features,
            out_features,
            sparsity=pattern,
            use_bias=bias is not None,
            param_dtype=kernel.dtype,
            kernel_init=_Constant(kernel),
            bias_init=_Constant(bias),
            rngs=nnx.Rngs(0),
            **config,
        )
        if arrays is not None:
            layer._replace_arrays(arrays)
        return layer

    def to_dense(self) -> nnx.Linear:
        """The equivalent `nnx.Linear`: the kept values in place, zeros elsewhere (bit-exact)."""
        kernel = self.weight.todense()
        return nnx.Linear(self.in_features, self.out_features, **self._dense_settings(kernel))


_FROM_DENSE_KWARGS = frozenset(
    {
        "dtype",
        "precision",
        "promote_dtype",
        "preferred_element_type",
        "kernel_metadata",
        "bias_metadata",
    }
)


class _Constant:
    """An initializer returning a given array (how from_dense/to_dense skip the random draw)."""

    def __init__(self, value):
        self.value = value

    def __call__(self, key, shape, dtype=None):
        return self.value


def dense_layer_reason(linear: nnx.Linear) -> str | None:
    """None when an nnx.Linear converts to SparseLinear without losing behaviour, else why not."""
    if type(linear) is not nnx.Linear:
        return (
            f"{type(linear).__name__} is a subclass of nnx.Linear; converting it would lose its "
            "own behaviour"
        )
    if linear.dot_general is not lax.dot_general:
        return "it uses a custom dot_general, which the sparse product cannot apply"
    return None


def _check_dot_general(dot_general, where: str) -> None:
    if dot_general is not lax.dot_general and dot_general is not None:
        raise ValueError(
            f"{where}: dot_general must be jax.lax.dot_general (the default): the sparse product "
            f"is jaxsparse.matmul and cannot use a custom one; got {dot_general!r}"
        )


def _check_kernel(kernel, where: str):
    kernel = V.as_array("kernel", kernel, where=where)
    if kernel.ndim != 2:
        raise ValueError(
            f"{where}: kernel must be 2-D [in_features, out_features]; got shape "
            f"{tuple(kernel.shape)}"
        )
    V.check_float_dtype("kernel", kernel.dtype, where=where)
    return kernel
