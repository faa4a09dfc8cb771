"""`SparseDense`: `flax.linen.Dense` with a structured-sparse kernel, for every format.

The format's trainable arrays (the kept `values`) live in the `params` collection, beside `bias`,
so optax over `variables["params"]` trains exactly them; its frozen arrays (N:M's `indices`,
V:N:M's `indices` and `columns`) live in the `"sparsity"` collection under their own names, each
boxed in `SparsityIndices` (a `flax.core.meta.AxisMetadata`, like `nn.Partitioned`) that carries
the spec and `in_features` as static metadata, so a variable tree describes itself
(`jaxsparse.linen.densify(variables)` needs nothing else).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import linen as nn
from flax import struct
from flax.core import meta
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import default_kernel_init
from flax.typing import Array, Dtype, Initializer, PrecisionLike, PromoteDtypeFn

from jaxsparse.nn import _layout

#: The collection that holds the positions of the kept values.
SPARSITY_COLLECTION = "sparsity"


class SparsityIndices(struct.PyTreeNode, meta.AxisMetadata):
    """One frozen array of a SparseDense (positions, column selections), boxed with the layer's
    spec (`pattern`) and `in_features`.

    A pytree whose only leaf is `value` (uint8, e.g. `[out, kept]` for N:M); `pattern` and
    `in_features` are static metadata, so the box passes through `jit`, `jax.tree.map`, orbax and
    flax.serialization (which store `value` only). `nn.meta.unbox` strips it; `SparseDense` accepts
    the bare array too.
    """

    value: Any
    pattern: Any = struct.field(pytree_node=False)
    in_features: int = struct.field(pytree_node=False)
    out_features: int | None = struct.field(pytree_node=False, default=None)

    def unbox(self) -> Any:
        return self.value

    def replace_boxed(self, val: Any) -> SparsityIndices:
        return self.replace(value=val)

    def add_axis(self, index: int, params: dict[Any, Any]) -> SparsityIndices:
        return self  # Stacked layers (nn.scan/vmap) keep one pattern and in_features.

    def remove_axis(self, index: int, params: dict[Any, Any]) -> SparsityIndices:
        return self


class SparseDense(nn.Module):
    """A linear transformation with a structured-sparse kernel, over the last input dimension.

    `nn.Dense` with `sparsity=`: `y = x @ W + b` with `W` `[in, features]` keeping only the entries
    the pattern allows. `init` draws the dense kernel with `kernel_init` (from the same rng as
    `nn.Dense` would) and prunes it by magnitude, so a fresh SparseDense is the magnitude-pruned
    version of a fresh Dense of the same name.

    Variables: `params/values` `[features, ceil(in/m)*n]` in `param_dtype`, `params/bias`
    `[features]` (when `use_bias`), and the format's frozen arrays in `sparsity/` (N:M:
    `sparsity/indices`, uint8 `[features, ceil(in/m)*n]`, and `sparsity/indices_2bit`, the same at
    2 bits; V:N:M `sparsity/indices` and `sparsity/columns`), each a
    `SparsityIndices` box: pass the whole variable dict to `apply`.

    Example:
        >>> import jax, jax.numpy as jnp, jaxsparse as jsp
        >>> from flax import linen as nn
        >>> layer = jsp.linen.SparseDense(4, sparsity="2:4")
        >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 8)))
        >>> jax.tree.map(jnp.shape, nn.meta.unbox(variables))
        {'params': {'bias': (4,), 'values': (4, 4)}, 'sparsity': {'indices': (4, 4), 'indices_2bit': (4, 1)}}
        >>> layer.apply(variables, jnp.ones((16, 8))).shape
        (16, 4)

    Attributes:
        features: the number of output features.
        sparsity: the format's spec (keyword-only): `jaxsparse.NM(n, m)` or `"n:m"` such as
            `"2:4"`, `jaxsparse.VNM(v, n, m)` or `"v:n:m"` such as `"64:2:8"`, or any registered
            spec (the input size must be at least `m`). Mask-only patterns
            (`jaxsparse.prune.Unstructured`) are refused.
        use_bias: whether to add a bias to the output (default: True).
        dtype: the dtype of the computation (default: infer from input and params).
        param_dtype: the dtype passed to parameter initializers (default: float32).
        precision: kept for signature compatibility; the sparse kernels multiply in the operand
            dtype and always accumulate in float32.
        kernel_init: initializer function for the dense `[in, features]` kernel that is pruned.
        bias_init: initializer function for the bias.
        promote_dtype: function to promote the dtype of the arrays to the desired dtype. The
            function should accept `(inputs, values, bias)` and a `dtype` keyword argument, and
            return a tuple of arrays with the promoted dtype.
        dot_general, dot_general_cls: only None (the defaults): the product is
            `jaxsparse.matmul`, a custom dot_general cannot apply to it.
    """

    features: int
    sparsity: Any = dataclasses.field(kw_only=True)
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    promote_dtype: PromoteDtypeFn = promote_dtype
    dot_general: Any = None
    dot_general_cls: Any = None

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        """Applies the sparse linear transformation to the last dimension of the inputs.

        Args:
            inputs: `[..., in]`.

        Returns:
            `[..., features]` in the promoted dtype.
        """
        where = f"jaxsparse.linen.SparseDense ({self.name or 'unnamed'})"
        if self.dot_general is not None or self.dot_general_cls is not None:
            raise ValueError(
                f"{where}: dot_general and dot_general_cls must be None: the sparse product is "
                "jaxsparse.matmul and cannot use a custom one; got "
                f"dot_general={self.dot_general!r}, dot_general_cls={self.dot_general_cls!r}"
            )
        in_features = jnp.shape(inputs)[-1]
        pattern, fmt = _layout.layer_pattern(
            sparsity=self.sparsity, in_features=in_features, out_features=self.features, where=where
        )
        def box(value):
            return SparsityIndices(value, pattern, in_features, self.features)

        def check_box(name, boxed):
            made_for = (
                (boxed.pattern, boxed.in_features) if isinstance(boxed, SparsityIndices) else None
            )
            if made_for not in (None, (pattern, in_features)):
                raise ValueError(
                    f"{where}: {SPARSITY_COLLECTION}/{name} was made for pattern {boxed.pattern} "
                    f"with in_features={boxed.in_features}; this layer is {pattern} with "
                    f"in_features={in_features}"
                )

        def draw_kernel(rng):
            return self.kernel_init(rng, (in_features, self.features), self.param_dtype)

        arrays = held_arrays(self, where, pattern, fmt, in_features, draw_kernel, box, check_box)
        inputs, weight, bias = promoted_weight(self, pattern, fmt, in_features, inputs, arrays)
        y = _layout.sparse_product(where, inputs, weight)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


def held_arrays(module, where, pattern, fmt, rows, draw_kernel, box, check_box) -> dict:
    """The format's arrays a linen sparse layer holds (`SparseDense`, `SparseConv`): trainable
    ones in `params`, frozen ones boxed by `box` in the `"sparsity"` collection (each checked
    by `check_box(name, boxed)` against the layer). On init, `draw_kernel(rng)` draws the dense
    kernel once (`[rows, out]` or a Conv's, flattened here) and every array takes its part of
    its compression."""
    trainable, frozen = _layout.trainable_names(fmt), _layout.frozen_names(fmt)
    # A format with no trainable array (int4: every array frozen) is initialised through
    # its first frozen one.
    first = ("params", trainable[0]) if trainable else (SPARSITY_COLLECTION, frozen[0])
    initializing = not module.has_variable(*first)
    missing = [n for n in frozen if not module.has_variable(SPARSITY_COLLECTION, n)]
    if not initializing and missing:
        raise ValueError(
            f"{where}: the variables hold {first[0]}/{first[1]} but no "
            f"{SPARSITY_COLLECTION}/{missing[0]}: pass the whole variable dict (the 'params' "
            f"and the '{SPARSITY_COLLECTION}' collections) to apply"
        )
    drawn = {}

    def draw(rng):
        # The first trainable array's initializer draws and prunes the dense kernel; the
        # other arrays' initializers take their part of it.
        kernel = draw_kernel(rng)
        drawn.update(_layout.compress(kernel.reshape(rows, kernel.shape[-1]), pattern))

    def init_for(name):
        def init(rng, shape, dtype):
            if not drawn:
                draw(rng)
            return drawn.pop(name)

        return init

    def take(name):
        if not drawn:
            draw(module.make_rng("params"))
        return drawn.pop(name)

    shapes = fmt.array_shapes(pattern, rows, module.features)
    arrays = {n: module.param(n, init_for(n), shapes[n][0], module.param_dtype) for n in trainable}
    for name in frozen:
        boxed = module.variable(
            SPARSITY_COLLECTION, name, lambda name=name: box(take(name)), unbox=False
        ).value
        check_box(name, boxed)
        arrays[name] = meta.unbox(boxed)
    _layout.check_state(where, pattern, fmt, rows, module.features, arrays)
    return arrays


def promoted_weight(module, pattern, fmt, rows, inputs, arrays):
    """`(inputs, weight, bias)` of a linen sparse layer promoted together to its compute dtype
    (the bias a param when `use_bias`, else None)."""
    trainable = _layout.trainable_names(fmt)
    bias = (module.param("bias", module.bias_init, (module.features,), module.param_dtype)
            if module.use_bias else None)
    inputs, *values, bias = module.promote_dtype(
        inputs, *(arrays[n] for n in trainable), bias, dtype=module.dtype
    )
    arrays = {**arrays, **dict(zip(trainable, values))}
    weight = _layout.weight(pattern, rows, arrays, out_features=module.features)
    return inputs, _layout.in_compute_dtype(weight, module.dtype), bias
