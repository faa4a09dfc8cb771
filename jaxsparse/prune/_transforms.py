"""Pruning as optax transformations: gradual magnitude pruning and masked fine-tuning.

Both end their `update` with `update = -param` on pruned entries, so `optax.apply_updates` makes
those weights exactly zero (`p + (-p) == 0` in IEEE arithmetic). Put them *last* in an
`optax.chain`, after the optimizer and the learning-rate scaling, so nothing rescales that update.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse import _validate as V
from jaxsparse.formats._spec import is_spec
from jaxsparse.prune import _layerwise, _tree
from jaxsparse.prune._masks import _gradual_mask
from jaxsparse.prune._patterns import Unstructured, as_pattern


class GradualPruningState(NamedTuple):
    """State of `gradual_pruning`.

    Attributes:
        step: int32 scalar, the number of updates done so far.
        masks: the current mask tree (bool per selected param, None elsewhere).
    """

    step: jax.Array
    masks: Any


class MaskedState(NamedTuple):
    """State of `masked`: the fixed mask tree (bool per masked param, None elsewhere)."""

    masks: Any


def gradual_pruning(
    schedule: Union[optax.Schedule, float],
    *,
    update_every: int,
    pattern_fn=None,
    filter: _tree.Filter = None,
) -> optax.GradientTransformation:
    r"""Gradual magnitude pruning (Zhu & Gupta) as an optax transformation.

    At every step :math:`t` with :math:`t \bmod` `update_every` :math:`= 0` the masks are recomputed
    from the current params: each selected weight keeps its largest-|w| entries at the sparsity
    :math:`s_t` = `schedule(t)`. At every step the update of a pruned entry is :math:`-w`, so the
    pruned weights are exactly zero after `optax.apply_updates`; kept entries get the incoming
    update unchanged. Pruned weights are therefore 0 when the masks are next recomputed and
    do not come back while the sparsity does not decrease.

    Args:
        schedule: an optax schedule `step -> sparsity` (e.g. `cubic_schedule`) or a constant
            sparsity in [0, 1).
        update_every: recompute the masks every this many steps (an int >= 1).
        pattern_fn: what the masks look like at sparsity `s`:
            None: unstructured, the largest `1 - s` fraction of each tensor;
            a format's spec (`NM(2, 4)`, `"2:4"`, `VNM(64, 2, 8)`): approach its magnitude mask:
            its entries are kept first, the others by |w|, so the mask is the spec's mask once `s`
            reaches `1 - density` (and a subset of it beyond);
            `Blocks(n, density)`: whole 1xN blocks at every step, the largest-norm `1 - s`
            fraction of each kernel's blocks (the spec's mask once `s` reaches `1 - density`);
            a callable `s -> pattern` (`s` is a traced scalar under `jit`) returning either;
            a mapping `{path: pattern}` (e.g. `block_densities(params, 16, 0.25)`): per-layer
            targets reached together, the schedule giving the sparsity of the whole mapping:
            layer `l` with target density `d_l` is pruned to
            `s * (1 - d_l) / (1 - D)` at step sparsity `s`, where `D` is the targets' mean
            density weighted by each layer's blocks (entries for non-1xN patterns), so at
            `s = 1 - D` every layer is at its target; leaves missing from it are not pruned.
            For `Unstructured` and `Blocks` the schedule sets the density (`1 - s`); the value's
            own density is not used (in a mapping it is the layer's target).
        filter: which params to prune: a predicate `(path, leaf) -> bool` on the '/'-joined path,
            a regular expression searched in it, or None (float leaves of rank >= 2 named
            `kernel`).

    Returns:
        An `optax.GradientTransformation` with a `GradualPruningState(step, masks)`; its
        `update` needs `params`. Use it last: `optax.chain(optax.adam(1e-3), gradual_pruning(...))`.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> params = {"kernel": jnp.arange(1.0, 9.0).reshape(4, 2)}
        >>> tx = gradual_pruning(0.5, update_every=10)  # constant sparsity 0.5
        >>> state = tx.init(params)
        >>> updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
        >>> optax.apply_updates(params, updates)["kernel"].tolist()
        [[0.0, 0.0], [0.0, 0.0], [5.0, 6.0], [7.0, 8.0]]

    References:
        Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model
        compression", ICLR workshop 2018.
    """
    where = "jaxsparse.prune.gradual_pruning"
    update_every = V.check_int("update_every", update_every, low=1, high=2**31 - 1, where=where)
    schedule_fn = _check_schedule(schedule, where)
    layered = _layerwise.is_mapping(pattern_fn)
    if layered:
        targets = _layerwise.check_mapping(pattern_fn, where)
    else:
        to_pattern = _pattern_fn(pattern_fn, where)
    filter_fn = _tree.resolve_filter(filter, where)

    def init_fn(params):
        if layered:
            patterns = _layerwise.pattern_tree(params, targets, filter_fn, where)
            selected = jax.tree.map(lambda p: p is not None, patterns, is_leaf=_tree._is_none)
        else:
            selected = _tree.select(params, filter_fn)
        masks = _tree.map_selected(lambda p: jnp.ones(jnp.shape(p), jnp.bool_), params, selected)
        return GradualPruningState(step=jnp.zeros((), jnp.int32), masks=masks)

    def layer_masks(params, sparsity):
        patterns = _layerwise.pattern_tree(params, targets, filter_fn, where)
        chosen = [(slot.pattern, jnp.shape(p)) for slot, p in zip(
            jax.tree.leaves(patterns, is_leaf=_tree._is_none), jax.tree.leaves(params))
            if slot is not None]
        units = np.array([_layerwise.units(pat, shape) for pat, shape in chosen], np.float64)
        dens = np.array([float(pat.density) for pat, _ in chosen], np.float64)
        mean = float((units * dens).sum() / units.sum()) if units.sum() else 1.0

        def one(slot, p):
            if slot is None:
                return None
            pat = slot.pattern
            if mean >= 1.0:
                s = jnp.zeros((), jnp.float32)
            else:  # Every layer's share of the schedule: all reach their targets together.
                s = jnp.clip(sparsity * ((1.0 - pat.density) / (1.0 - mean)), 0.0, 1.0)
            return _gradual_mask(p, pat, s)

        return jax.tree.map(one, patterns, params, is_leaf=_tree._is_none)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(f"{where}: update needs params (the masks are computed from them)")
        _tree.check_masks(state.masks, params, where, name="state.masks")

        def recompute():
            sparsity = schedule_fn(state.step)
            if layered:
                return layer_masks(params, sparsity)
            pattern = to_pattern(sparsity)
            return jax.tree.map(
                lambda m, p: None if m is None else _gradual_mask(p, pattern, sparsity),
                state.masks, params, is_leaf=_tree._is_none,
            )

        masks = jax.lax.cond(
            state.step % update_every == 0, recompute, lambda: state.masks
        )
        return _zero_pruned(updates, masks, params), GradualPruningState(state.step + 1, masks)

    return optax.GradientTransformation(init_fn, update_fn)


def masked(masks) -> optax.GradientTransformation:
    """Fine-tuning with fixed masks: pruned weights become and stay exactly zero.

    The update of a pruned entry is `-param` (so it is 0 after `optax.apply_updates`, whatever it
    was before); kept entries get the incoming update unchanged. Params whose mask is None are not
    touched.

    Args:
        masks: a mask tree for the params (a bool array of the param's shape, or None, per param;
            e.g. from `magnitude_masks`), or a callable `params -> mask tree`.

    Returns:
        An `optax.GradientTransformation` with a `MaskedState(masks)`; its `update` needs
        `params`. Use it last: `optax.chain(optax.adam(1e-3), masked(masks))`.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> params = {"w": jnp.array([1.0, 2.0])}
        >>> tx = optax.chain(optax.sgd(0.5), masked({"w": jnp.array([True, False])}))
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": jnp.array([1.0, 1.0])}, state, params)
        >>> optax.apply_updates(params, updates)["w"].tolist()
        [0.5, 0.0]
    """
    where = "jaxsparse.prune.masked"

    def init_fn(params):
        m = masks(params) if callable(masks) else masks
        _tree.check_masks(m, params, where)
        return MaskedState(masks=m)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(f"{where}: update needs params (pruned entries get -param)")
        _tree.check_masks(state.masks, params, where)
        return _zero_pruned(updates, state.masks, params), state

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------- helpers
def _zero_pruned(updates, masks, params):
    def one(m, u, p):
        if m is None:
            return u
        return jnp.where(m, u, -jnp.asarray(p).astype(jnp.result_type(u)))

    return jax.tree.map(one, masks, updates, params, is_leaf=_tree._is_none)


def _check_schedule(schedule, where) -> Callable:
    if callable(schedule):
        return schedule
    if isinstance(schedule, bool) or not isinstance(
        schedule, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            f"{where}: schedule must be an optax schedule (step -> sparsity) or a float in "
            f"[0, 1); got {type(schedule).__name__}"
        )
    if not 0.0 <= float(schedule) < 1.0:
        raise ValueError(
            f"{where}: schedule (a constant sparsity) must be in [0, 1), got {schedule}"
        )
    value = float(schedule)
    return lambda step: jnp.float32(value)


def _pattern_fn(pattern_fn, where) -> Callable:
    if pattern_fn is None:
        return lambda s: Unstructured(1.0 - s)
    if isinstance(pattern_fn, (Unstructured, str)) or is_spec(pattern_fn):
        pattern = as_pattern(pattern_fn, name="pattern_fn")
        return lambda s: pattern
    if callable(pattern_fn):
        def checked(s):
            pattern = pattern_fn(s)
            if not (isinstance(pattern, Unstructured) or is_spec(pattern)):
                pattern = as_pattern(pattern, name="pattern_fn(sparsity)")
            return pattern

        return checked
    raise TypeError(
        f"{where}: pattern_fn must be None, a pattern (a spec such as NM / VNM, Unstructured, "
        f"or a string such as '2:4') or a callable "
        f"sparsity -> pattern; got {type(pattern_fn).__name__}"
    )
