"""Mixed-precision training: f32 master weights, bf16/f16 compute, dynamic loss scaling.

The parameters live in float32 (the *master* copy the optimizer updates). Each step casts them to
the compute dtype (bfloat16 or float16), runs the forward and backward passes there, and brings
the gradients back to float32 before the optimizer sees them (Micikevicius et al., 2018).

float16 has 5 exponent bits: gradients below ~6e-8 flush to zero. Multiplying the loss by a large
*loss scale* `S` shifts every gradient of the backward pass up by `S` (the chain rule is linear),
and dividing by `S` in float32 afterwards restores them. Too large an `S` overflows to inf instead,
so the scale is *dynamic*: after `growth_interval` consecutive finite steps it grows by `factor`;
on a non-finite gradient the step is skipped (parameters and optimizer state unchanged) and the
scale shrinks by `factor`, never below `min_scale`. bfloat16 has float32's exponent range and
needs no scaling.

One step, from the building blocks (all pure functions, jittable):

    f32 master params -> cast_tree(params, f16) -> loss -> scale_loss -> grad (f16 backward pass,
    f32 grads w.r.t. the f32 master) -> unscale (in f32) -> all_finite -> apply the optax update
    or skip it -> adjust the scale

Integer leaves (the uint8 `indices` of an `NMSparse`, step counters) are left alone everywhere:
`cast_tree` does not cast them, `all_finite` does not inspect them, and `make_train_step`
differentiates and updates only the float leaves; inside a jaxsparse format only the arrays it
declares trainable (an `NMSparse` or `VNMSparse` is trained through its `values`, never through
its frozen structure).

Example (the loop written out; `make_train_step` packages exactly this):

    >>> import jax, jax.numpy as jnp, optax
    >>> from jaxsparse import mixed_precision as mp
    >>> def loss_fn(p, x, y):                       # p arrives in the compute dtype
    ...     out = jnp.tanh(x.astype(p["w1"].dtype) @ p["w1"]) @ p["w2"]
    ...     return jnp.mean((out.astype(jnp.float32) - y) ** 2)
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> params = {"w1": jax.random.normal(k1, (4, 8)), "w2": jax.random.normal(k2, (8, 1))}
    >>> x = jax.random.normal(k3, (16, 4)); y = jnp.sum(x, axis=1, keepdims=True)
    >>> opt = optax.sgd(1e-2)
    >>> opt_state = opt.init(params)
    >>> scale = mp.dynamic_loss_scale(init_scale=2.0**24, growth_interval=100)
    >>> @jax.jit
    ... def step(params, opt_state, scale):
    ...     def scaled_loss(p):
    ...         loss = loss_fn(mp.cast_tree(p, jnp.float16), x, y)
    ...         return mp.scale_loss(loss, scale), loss
    ...     grads, loss = jax.grad(scaled_loss, has_aux=True)(params)
    ...     grads = mp.unscale(grads, scale)            # float32
    ...     finite = mp.all_finite(grads)
    ...     def apply():
    ...         updates, new_state = opt.update(grads, opt_state, params)
    ...         return optax.apply_updates(params, updates), new_state
    ...     params, opt_state = jax.lax.cond(finite, apply, lambda: (params, opt_state))
    ...     return params, opt_state, mp.adjust(scale, finite), loss, finite
    >>> params, opt_state, scale, loss, finite = step(params, opt_state, scale)
    >>> bool(finite), float(scale.scale)              # 2**24 overflows f16: skipped, halved
    (False, 8388608.0)

References:
    Micikevicius et al., "Mixed Precision Training", ICLR 2018, arXiv:1710.03740.
    Kalamkar et al., "A Study of BFLOAT16 for Deep Learning Training", 2019, arXiv:1905.12322.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse.formats._base import TRAINABLE, SparseFormat

__all__ = [
    "DynamicLossScale",
    "SkipNonFiniteState",
    "StepInfo",
    "TrainState",
    "TrainStep",
    "adjust",
    "all_finite",
    "cast_tree",
    "dynamic_loss_scale",
    "make_train_step",
    "scale_loss",
    "skip_nonfinite",
    "unscale",
]

_F32 = jnp.dtype(jnp.float32)
_INT32_MAX = 2**31 - 1
_F32_MAX = float(np.finfo(np.float32).max)


# ====================================================================== loss scale
class DynamicLossScale(NamedTuple):
    """The state of a dynamic loss scale: a pytree of scalar arrays, jit- and checkpoint-friendly.

    Build one with `dynamic_loss_scale(...)` (which validates); advance it with `adjust`.

    Attributes:
        scale: float32 `[]`, the current loss scale S.
        good_steps: int32 `[]`, consecutive finite steps since the scale last changed.
        growth_interval: int32 `[]`, finite steps after which S grows.
        factor: float32 `[]`, S grows by `factor` and shrinks by `factor`.
        min_scale: float32 `[]`, the floor under S.
    """

    scale: jax.Array
    good_steps: jax.Array
    growth_interval: jax.Array
    factor: jax.Array
    min_scale: jax.Array


def dynamic_loss_scale(
    init_scale: float = 2.0**15,
    growth_interval: int = 2000,
    factor: float = 2.0,
    min_scale: float = 1.0,
) -> DynamicLossScale:
    """A dynamic loss scale for float16 training (the initial `DynamicLossScale`).

    The scale follows, after each step with gradients finite or not:

    .. math::

        S_{t+1} = \\begin{cases}
            S_t \\cdot \\text{factor} & \\text{finite, and the } \\text{growth\\_interval}
                \\text{-th finite step in a row} \\\\
            S_t & \\text{finite, otherwise} \\\\
            \\max(S_t / \\text{factor}, \\text{min\\_scale}) & \\text{not finite (step skipped)}
        \\end{cases}

    With the default `factor=2` an overflow halves the scale and a run of `growth_interval`
    finite steps doubles it. Powers of two keep scaling and unscaling exact.

    Args:
        init_scale: the initial scale, `min_scale <= init_scale < float32 max`. 2**15 is a common
            start; a too-large value only costs a few skipped steps.
        growth_interval: an int >= 1, the number of consecutive finite steps before growing.
        factor: the growth and back-off factor, a finite number > 1.
        min_scale: the floor, a finite number > 0.

    Returns:
        A `DynamicLossScale` with `good_steps=0`.

    Raises:
        TypeError: an argument is not a (real, non-bool) number, or `growth_interval` not an int.
        ValueError: an argument is out of its range.

    Example:
        >>> from jaxsparse import mixed_precision as mp
        >>> s = mp.dynamic_loss_scale(init_scale=8.0, growth_interval=2)
        >>> float(s.scale), int(s.good_steps)
        (8.0, 0)
        >>> s = mp.adjust(s, False)
        >>> float(s.scale)
        4.0

    References:
        Micikevicius et al., "Mixed Precision Training", ICLR 2018, section 3.2.
    """
    where = "jaxsparse.mixed_precision.dynamic_loss_scale"
    init_scale = _check_real("init_scale", init_scale, where)
    factor = _check_real("factor", factor, where)
    min_scale = _check_real("min_scale", min_scale, where)
    if isinstance(growth_interval, bool) or not isinstance(growth_interval, (int, np.integer)):
        raise TypeError(
            f"{where}: growth_interval must be an int, got "
            f"{type(growth_interval).__name__} {growth_interval!r}"
        )
    if not 1 <= int(growth_interval) <= _INT32_MAX:
        raise ValueError(
            f"{where}: growth_interval must be in [1, {_INT32_MAX}], got {growth_interval}"
        )
    if not factor > 1.0:
        raise ValueError(f"{where}: factor must be > 1, got {factor!r}")
    if not min_scale > 0.0:
        raise ValueError(f"{where}: min_scale must be > 0, got {min_scale!r}")
    if not init_scale > 0.0:
        raise ValueError(f"{where}: init_scale must be > 0, got {init_scale!r}")
    if init_scale < min_scale:
        raise ValueError(
            f"{where}: init_scale must be >= min_scale={min_scale!r}, got {init_scale!r}"
        )
    return DynamicLossScale(
        scale=jnp.asarray(init_scale, _F32),
        good_steps=jnp.zeros((), jnp.int32),
        growth_interval=jnp.asarray(int(growth_interval), jnp.int32),
        factor=jnp.asarray(factor, _F32),
        min_scale=jnp.asarray(min_scale, _F32),
    )


def scale_loss(loss, state: DynamicLossScale) -> jax.Array:
    """The loss times the loss scale, in float32: differentiate this instead of the loss.

    .. math:: \\tilde L = S \\cdot L

    The product is taken in float32 (or wider), so a scale beyond the float16 range (65504) is
    representable here; the overflow, if any, happens where the backward pass enters float16
    code, which is exactly what `all_finite` then detects.

    Args:
        loss: a float array (usually a scalar), any float dtype.
        state: the current `DynamicLossScale`.

    Returns:
        `loss * state.scale`, dtype `promote_types(loss.dtype, float32)`.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxsparse import mixed_precision as mp
        >>> mp.scale_loss(jnp.float16(0.5), mp.dynamic_loss_scale(init_scale=2.0**20))
        Array(524288., dtype=float32)
    """
    where = "jaxsparse.mixed_precision.scale_loss"
    _check_state(state, where)
    loss = jnp.asarray(loss)
    if not jnp.issubdtype(loss.dtype, jnp.floating):
        raise TypeError(f"{where}: loss must be a float array, got dtype {loss.dtype.name}")
    dtype = jnp.promote_types(loss.dtype, _F32)
    return loss.astype(dtype) * jnp.asarray(state.scale).astype(dtype)


def unscale(grads, state: DynamicLossScale):
    """Divide every float leaf of `grads` by the loss scale, in float32.

    .. math:: g \\leftarrow \\operatorname{f32}(g) / S

    Float leaves are promoted to at least float32 *before* dividing, so small true gradients
    that the scale lifted out of float16's subnormal range are not lost again. Other leaves
    (integers such as `NMSparse.indices`, bools, the `float0` cotangents of integer inputs from
    `jax.grad(..., allow_int=True)`, None) are returned unchanged.

    Args:
        grads: a pytree of gradients of `scale_loss(...)`.
        state: the `DynamicLossScale` used to scale the loss.

    Returns:
        A pytree of the structure of `grads`; float leaves in `promote_types(dtype, float32)`.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxsparse import mixed_precision as mp
        >>> g = mp.unscale({"w": jnp.full((2,), 1024.0, jnp.float16)}, mp.dynamic_loss_scale())
        >>> g["w"]
        Array([0.03125, 0.03125], dtype=float32)
    """
    _check_state(state, "jaxsparse.mixed_precision.unscale")

    def one(g):
        if not _is_inexact(g):
            return g
        dtype = jnp.promote_types(g.dtype, _F32)
        return g.astype(dtype) / jnp.asarray(state.scale).astype(dtype)

    return jax.tree.map(one, grads)


def all_finite(tree) -> jax.Array:
    """True when every float (or complex) array leaf of `tree` holds only finite values.

    .. math:: \\bigwedge_{\\text{leaves } x} \\bigwedge_i \\operatorname{isfinite}(x_i)

    Only leaves with an inexact dtype are inspected: integer leaves (`NMSparse.indices`, counters),
    bools, `float0` cotangents, Python scalars and None are skipped. An empty tree is finite.

    Args:
        tree: any pytree.

    Returns:
        A bool `[]` array (a tracer under `jit`).

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxsparse import mixed_precision as mp
        >>> bool(mp.all_finite({"a": jnp.ones(3), "i": jnp.arange(3, dtype=jnp.uint8)}))
        True
        >>> bool(mp.all_finite({"a": jnp.array([1.0, jnp.inf])}))
        False
    """
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _is_inexact(x)]
    if not checks:
        return jnp.array(True)
    return jnp.all(jnp.stack(checks))


def adjust(state: DynamicLossScale, finite) -> DynamicLossScale:
    """The loss scale after a step whose (unscaled) gradients were `finite` or not.

    Finite: count the step; after `growth_interval` finite steps in a row, multiply the scale by
    `factor` (unless that would overflow float32) and restart the count. Not finite: divide the
    scale by `factor`, clamp it at `min_scale`, and restart the count. See `dynamic_loss_scale`
    for the formula.

    Args:
        state: the current `DynamicLossScale`.
        finite: a bool scalar (`all_finite(grads)`), a Python bool or a bool `[]` array.

    Returns:
        The next `DynamicLossScale` (same fields, new `scale` and `good_steps`). Jittable.

    Example:
        >>> from jaxsparse import mixed_precision as mp
        >>> s = mp.dynamic_loss_scale(init_scale=4.0, growth_interval=2, min_scale=2.0)
        >>> s = mp.adjust(mp.adjust(s, True), True); float(s.scale), int(s.good_steps)
        (8.0, 0)
        >>> s = mp.adjust(mp.adjust(mp.adjust(s, False), False), False); float(s.scale)
        2.0
    """
    where = "jaxsparse.mixed_precision.adjust"
    _check_state(state, where)
    finite = jnp.asarray(finite)
    if finite.dtype != jnp.bool_ or finite.shape != ():
        raise TypeError(
            f"{where}: finite must be a bool scalar (e.g. all_finite(grads)), got "
            f"{finite.dtype.name} array of shape {tuple(finite.shape)}"
        )
    scale = jnp.asarray(state.scale, _F32)
    factor = jnp.asarray(state.factor, _F32)
    good = jnp.asarray(state.good_steps, jnp.int32) + 1
    grow = finite & (good >= state.growth_interval)
    grown = scale * factor
    grown = jnp.where(jnp.isfinite(grown), grown, scale)
    shrunk = jnp.maximum(scale / factor, jnp.asarray(state.min_scale, _F32))
    new_scale = jnp.where(finite, jnp.where(grow, grown, scale), shrunk)
    new_good = jnp.where(finite & ~grow, good, jnp.zeros_like(good))
    return state._replace(scale=new_scale, good_steps=new_good)


# ====================================================================== dtypes
def cast_tree(tree, dtype):
    """Cast every floating-point array leaf of `tree` to `dtype`; leave everything else alone.

    Integer leaves (the uint8 `indices` of an `NMSparse`), bools, complex arrays, Python scalars
    and None are returned as they are (the same objects). Registered pytrees such as `NMSparse`
    come back as the same type: `cast_tree(ws, jnp.bfloat16)` is `ws.astype(jnp.bfloat16)`.

    Args:
        tree: any pytree, e.g. f32 master parameters.
        dtype: a floating dtype: `jnp.float32`, `jnp.bfloat16`, `jnp.float16`, ...

    Returns:
        A pytree of the structure of `tree`.

    Raises:
        TypeError: `dtype` is not a floating dtype.

    Example:
        >>> import jax, jax.numpy as jnp, jaxsparse as jsp
        >>> from jaxsparse import mixed_precision as mp
        >>> ws = jsp.NMSparse.fromdense(jnp.ones((8, 2)), n=2, m=4)
        >>> half = mp.cast_tree({"w": ws, "step": jnp.int32(3)}, jnp.float16)
        >>> half["w"].values.dtype, half["w"].indices.dtype, half["step"].dtype
        (dtype('float16'), dtype('uint8'), dtype('int32'))
    """
    dtype = _check_float_dtype("dtype", dtype, "jaxsparse.mixed_precision.cast_tree")

    def one(x):
        if _is_array(x) and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            return x.astype(dtype)
        return x

    return jax.tree.map(one, tree)


# ====================================================================== skipping updates
class SkipNonFiniteState(NamedTuple):
    """State of `skip_nonfinite`.

    Attributes:
        inner_state: the wrapped transformation's state (unchanged by skipped steps).
        last_finite: bool `[]`, whether the last update was finite (applied).
        total_skipped: int32 `[]`, the number of skipped updates so far (saturating).
    """

    inner_state: Any
    last_finite: jax.Array
    total_skipped: jax.Array


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wrap an optax transformation so that updates with a non-finite value are skipped.

    .. math::

        (u_t, s_t) = \\begin{cases} \\text{inner.update}(g_t, s_{t-1}) &
            \\text{all\\_finite}(g_t) \\\\ (0, s_{t-1}) & \\text{otherwise} \\end{cases}

    A skipped step returns zero updates (so `optax.apply_updates` leaves the parameters as they
    are) and the inner state unchanged. Unlike `optax.apply_if_finite`, it never gives up: with
    dynamic loss scaling, non-finite gradients are expected and the scale is what adapts. The
    finiteness check ignores integer leaves (see `all_finite`). Feed it *unscaled* gradients.

    Args:
        inner: the optax transformation to wrap (with or without extra args).

    Returns:
        An `optax.GradientTransformationExtraArgs` with state `SkipNonFiniteState`.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from jaxsparse import mixed_precision as mp
        >>> tx = mp.skip_nonfinite(optax.sgd(0.1))
        >>> params = {"w": jnp.ones(2)}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": jnp.array([1.0, jnp.nan])}, state, params)
        >>> updates["w"], int(state.total_skipped)
        (Array([0., 0.], dtype=float32), 1)

    References:
        `optax.apply_if_finite`, which this follows without the give-up counter.
    """
    where = "jaxsparse.mixed_precision.skip_nonfinite"
    _check_optimizer("inner", inner, where)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SkipNonFiniteState(
            inner_state=inner.init(params),
            last_finite=jnp.array(True),
            total_skipped=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        finite = all_finite(updates)

        def apply():
            return inner.update(updates, state.inner_state, params, **extra_args)

        shapes = jax.eval_shape(apply)

        def skip():
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[0])
            return zeros, _cast_like(state.inner_state, shapes[1])

        new_updates, inner_state = jax.lax.cond(finite, apply, skip)
        skipped = jnp.asarray(state.total_skipped, jnp.int32)
        skipped = jnp.where(finite | (skipped == _INT32_MAX), skipped, skipped + 1)
        return new_updates, SkipNonFiniteState(inner_state, finite, skipped)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ====================================================================== the training step
class TrainState(NamedTuple):
    """What `make_train_step`'s step carries from one step to the next (a pytree).

    Attributes:
        params: the master parameters (float32 leaves stay float32; integer leaves ride along).
        opt_state: the optimizer's state over the float leaves of `params` (integer leaves
            replaced by None, e.g. an `NMSparse` with `indices=None`).
        loss_scale: a `DynamicLossScale`, or None for no loss scaling (bfloat16, float32).
    """

    params: Any
    opt_state: Any
    loss_scale: DynamicLossScale | None


class StepInfo(NamedTuple):
    """What one step reports.

    Attributes:
        loss: float32 `[]`, the unscaled loss at the parameters *before* the step.
        finite: bool `[]`, True when the update was applied, False when it was skipped.
        aux: the auxiliary output of `loss_fn` (with `has_aux=True`), else None.
    """

    loss: jax.Array
    finite: jax.Array
    aux: Any


class TrainStep(NamedTuple):
    """The pair returned by `make_train_step`: `init(params, loss_scale="auto") -> TrainState`
    and `step(state, *args) -> (TrainState, StepInfo)` (pure; wrap it in `jax.jit`)."""

    init: Callable[..., TrainState]
    step: Callable[..., tuple[TrainState, StepInfo]]


def make_train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    compute_dtype=jnp.float16,
    has_aux: bool = False,
) -> TrainStep:
    """A mixed-precision training step: f32 master params, `compute_dtype` compute, loss scaling.

    `step(state, *args)` does, with `S` the current loss scale (1 without one):

    1. split `state.params` into float leaves (trained) and the others (carried unchanged: an
       `NMSparse` is trained through its `values`, its uint8 `indices` ride along);
    2. `g = grad(S * loss_fn(cast_tree(params, compute_dtype), *args))` w.r.t. the float32
       master leaves (the backward pass runs in `compute_dtype`; the gradients arrive in f32);
    3. `g = unscale(g)` in float32, `finite = all_finite(g)`;
    4. finite: `params += optimizer.update(g)`; else params and optimizer state stay as they are;
    5. `loss_scale = adjust(loss_scale, finite)`.

    Args:
        loss_fn: `loss_fn(params, *args) -> loss` (or `(loss, aux)` with `has_aux=True`), a
            float scalar. It receives the parameters already cast to `compute_dtype` and should
            cast its inputs to match (e.g. `x.astype(compute_dtype)`); reducing the loss in
            float32 is advisable.
        optimizer: an optax `GradientTransformation`, applied to the float leaves.
        compute_dtype: the dtype of the forward and backward passes: float16 (use a loss
            scale), bfloat16 or float32.
        has_aux: whether `loss_fn` returns `(loss, aux)`.

    Returns:
        A `TrainStep(init, step)`. `init(params, loss_scale="auto")` builds the `TrainState`;
        `"auto"` means `dynamic_loss_scale()` for float16 and None (no scaling) otherwise; pass a
        `DynamicLossScale` or None to choose. `step(state, *args) -> (TrainState, StepInfo)`.

    Raises:
        TypeError: `loss_fn` not callable, `optimizer` without `init`/`update`, `compute_dtype`
            not a floating dtype, `has_aux` not a bool; from `init`, a `loss_scale` that is
            neither a `DynamicLossScale`, None nor "auto".

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from jaxsparse import mixed_precision as mp
        >>> def loss_fn(p, x, y):
        ...     pred = x.astype(jnp.float16) @ p["w"] + p["b"]
        ...     return jnp.mean((pred.astype(jnp.float32) - y) ** 2)
        >>> x = jax.random.normal(jax.random.key(0), (32, 3)); y = x @ jnp.array([1.0, -2.0, 0.5])
        >>> params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
        >>> train = mp.make_train_step(loss_fn, optax.adam(0.1), compute_dtype=jnp.float16)
        >>> state = train.init(params, mp.dynamic_loss_scale(2.0**24, growth_interval=50))
        >>> step = jax.jit(train.step)
        >>> skipped = 0
        >>> for _ in range(60):
        ...     state, info = step(state, x, y)
        ...     skipped += int(not info.finite)
        >>> skipped > 0, float(info.loss) < 0.05, state.params["w"].dtype
        (True, True, dtype('float32'))

    References:
        Micikevicius et al., "Mixed Precision Training", ICLR 2018, arXiv:1710.03740.
    """
    where = "jaxsparse.mixed_precision.make_train_step"
    if not callable(loss_fn):
        raise TypeError(f"{where}: loss_fn must be callable, got {type(loss_fn).__name__}")
    _check_optimizer("optimizer", optimizer, where)
    compute_dtype = _check_float_dtype("compute_dtype", compute_dtype, where)
    if not isinstance(has_aux, bool):
        raise TypeError(f"{where}: has_aux must be a bool, got {type(has_aux).__name__}")

    def init(params, loss_scale="auto") -> TrainState:
        if isinstance(loss_scale, str) and loss_scale == "auto":
            loss_scale = dynamic_loss_scale() if compute_dtype == jnp.float16 else None
        elif loss_scale is not None and not isinstance(loss_scale, DynamicLossScale):
            raise TypeError(
                f"{where}: init: loss_scale must be a DynamicLossScale, None or 'auto', got "
                f"{type(loss_scale).__name__}"
            )
        trainable, _ = _partition(params)
        return TrainState(params, optimizer.init(trainable), loss_scale)

    def step(state: TrainState, *args) -> tuple[TrainState, StepInfo]:
        trainable, frozen = _partition(state.params)
        loss_scale = state.loss_scale

        def objective(t):
            out = loss_fn(cast_tree(_combine(t, frozen), compute_dtype), *args)
            loss, aux = out if has_aux else (out, None)
            if loss_scale is None:
                return loss.astype(jnp.promote_types(loss.dtype, _F32)), (loss, aux)
            return scale_loss(loss, loss_scale), (loss, aux)

        grads, (loss, aux) = jax.grad(objective, has_aux=True)(trainable)
        if loss_scale is not None:
            grads = unscale(grads, loss_scale)
        finite = all_finite(grads)

        def apply():
            updates, new_opt_state = optimizer.update(grads, state.opt_state, trainable)
            return optax.apply_updates(trainable, updates), new_opt_state

        shapes = jax.eval_shape(apply)

        def skip():
            return trainable, _cast_like(state.opt_state, shapes[1])

        trainable, opt_state = jax.lax.cond(finite, apply, skip)
        new_scale = None if loss_scale is None else adjust(loss_scale, finite)
        new_state = TrainState(_combine(trainable, frozen), opt_state, new_scale)
        return new_state, StepInfo(jnp.asarray(loss).astype(_F32), finite, aux)

    return TrainStep(init, step)


# ====================================================================== helpers
def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer))


def _is_inexact(x) -> bool:
    return _is_array(x) and jnp.issubdtype(x.dtype, jnp.inexact)


def _is_trainable(x) -> bool:
    return _is_array(x) and jnp.issubdtype(x.dtype, jnp.floating)


def _partition(tree):
    """(trainable leaves with None elsewhere, the other leaves with None at the trainable ones).

    Trainable: float array leaves, except inside a jaxsparse format, where only the arrays the
    format declares `TRAINABLE` are (a format's frozen arrays never train, even float ones).
    """
    def split(node, keep_trainable):
        if isinstance(node, SparseFormat):
            trainable = set(node.arrays_with_role(TRAINABLE))
            children = tuple(
                a if ((n in trainable and _is_trainable(a)) == keep_trainable) else None
                for n, a in node.arrays().items()
            )
            return node.tree_unflatten(node._aux, children)
        return node if _is_trainable(node) == keep_trainable else None

    is_format = lambda x: isinstance(x, SparseFormat)  # noqa: E731
    trainable = jax.tree.map(lambda x: split(x, True), tree, is_leaf=is_format)
    frozen = jax.tree.map(lambda x: split(x, False), tree, is_leaf=is_format)
    return trainable, frozen


def _combine(trainable, frozen):
    return jax.tree.map(
        lambda a, b: b if a is None else a, trainable, frozen, is_leaf=lambda x: x is None
    )


def _cast_like(tree, shapes):
    """`tree`'s values in the dtypes of `shapes` (what the applied branch returns), so that both
    branches of the skip/apply `lax.cond` agree even when an optimizer promotes its state (adam's
    moments of bf16 params become f32 after one f32 gradient). A no-op in the usual case."""
    return jax.tree.map(lambda x, s: jnp.asarray(x).astype(s.dtype), tree, shapes)


def _check_real(name: str, value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__} "
                        f"{value!r}")
    value = float(value)
    if not math.isfinite(value) or abs(value) > _F32_MAX:
        raise ValueError(f"{where}: {name} must be finite in float32, got {value!r}")
    return value


def _check_float_dtype(name: str, dtype, where: str) -> jnp.dtype:
    try:
        if dtype is None:  # np.dtype(None) would be float64
            raise TypeError("None")
        dt = jnp.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"{where}: {name} must be a floating dtype (e.g. jnp.float16, "
                        f"jnp.bfloat16, jnp.float32), got {dtype!r}") from err
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{where}: {name} must be a floating dtype (e.g. jnp.float16, "
                        f"jnp.bfloat16, jnp.float32), got {dt.name}")
    return dt


def _check_state(state, where: str) -> None:
    if not isinstance(state, DynamicLossScale):
        raise TypeError(
            f"{where}: state must be a DynamicLossScale (from dynamic_loss_scale()), got "
            f"{type(state).__name__}"
        )


def _check_optimizer(name: str, tx, where: str) -> None:
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(
            f"{where}: {name} must be an optax GradientTransformation (with init and update), "
            f"got {type(tx).__name__}"
        )
