"""SR-STE (Zhou et al., 2021): training N:M sparse networks from scratch.

The forward pass uses the N:M-pruned weight, the backward pass is straight-through (the dense
gradient, evaluated at the pruned weight, goes to every dense entry), and a "sparse-refined"
decay pulls the currently pruned entries towards zero so the mask settles.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsparse.prune import _layerwise, _tree
from jaxsparse.prune._masks import magnitude_mask
from jaxsparse.prune._patterns import Unstructured, as_pattern


class SRSTEState(NamedTuple):
    """State of `srste`: none (the masks are recomputed from the params at every step)."""


def srste_weight(w, pattern):
    r"""The N:M-pruned weight with a straight-through gradient.

    Forward: :math:`\tilde w = m(w) \odot w` with :math:`m` the N:M magnitude mask
    (`magnitude_mask`). Backward: :math:`\partial L / \partial w = \partial L / \partial \tilde w`,
    i.e. the dense gradient evaluated at the pruned weight reaches every entry of `w`, pruned or
    not (the mask is treated as a constant and the masking as the identity).

    Args:
        w: `[..., in, out]` float kernel.
        pattern: a format's spec (N:M, V:N:M, ...; anything `as_pattern` accepts but `Unstructured`).

    Returns:
        `where(mask, w, 0)`, differentiable straight through. Works under `jit`, `vmap`,
        `grad` and `jvp`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w = jnp.array([[4.0], [-1.0], [3.0], [2.0]])
        >>> srste_weight(w, "2:4")[:, 0].tolist()
        [4.0, 0.0, 3.0, 0.0]
        >>> jax.grad(lambda w: srste_weight(w, "2:4").sum())(w)[:, 0].tolist()
        [1.0, 1.0, 1.0, 1.0]

    References:
        Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch",
        ICLR 2021.
    """
    return _ste(w, _nm_pattern(pattern, "jaxsparse.prune.srste_weight"))


def srste_weights(params, pattern, *, filter: _tree.Filter = None):
    """`srste_weight` on every selected leaf of a params tree (others unchanged).

    Call it inside the loss: `loss(srste_weights(params, "2:4"), batch)`.

    Args:
        params: a params tree.
        pattern: a format's spec (N:M, V:N:M, 1xN `Blocks`, ...), or a mapping
            `{path: spec}` (e.g. from `block_densities`; leaves missing from it are unchanged).
        filter: as in `srste` (default: float leaves of rank >= 2 named `kernel`).

    Returns:
        The tree with the selected leaves pruned (straight-through differentiable).
    """
    where = "jaxsparse.prune.srste_weights"
    pattern = _structured(pattern, where)
    patterns = _layerwise.pattern_tree(params, pattern, _tree.resolve_filter(filter, where), where)
    return jax.tree.map(lambda s, p: p if s is None else _ste(p, s.pattern), patterns, params,
                        is_leaf=_tree._is_none)


def srste(
    pattern, decay: float = 2e-4, *, filter: _tree.Filter = None
) -> optax.GradientTransformation:
    r"""The sparse-refined term of SR-STE as an optax transformation.

    .. math:: g \leftarrow g + \lambda_W\, (\lnot m(w)) \odot w

    added to the gradient of each selected weight, with :math:`m` the N:M magnitude mask of the
    current params: the pruned entries decay towards zero, the kept ones are untouched. Put it
    before the optimizer, on gradients computed through `srste_weight`:
    `optax.chain(srste("2:4"), optax.adam(1e-3))`.

    Args:
        pattern: a format's spec (N:M, V:N:M, 1xN `Blocks`, ...), or a mapping `{path: spec}`
            (e.g. from `block_densities`; leaves missing from it get no decay).
        decay: :math:`\lambda_W` >= 0 (the paper's default 2e-4).
        filter: which params: a predicate `(path, leaf) -> bool` on the '/'-joined path, a
            regular expression searched in it, or None (float leaves of rank >= 2 named `kernel`).

    Returns:
        An `optax.GradientTransformation` (stateless, `SRSTEState()`); its `update` needs `params`.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"kernel": jnp.array([[4.0], [-1.0], [3.0], [2.0]])}
        >>> tx = srste("2:4", decay=0.5)
        >>> g, _ = tx.update({"kernel": jnp.zeros((4, 1))}, tx.init(params), params)
        >>> g["kernel"][:, 0].tolist()
        [0.0, -0.5, 0.0, 1.0]

    References:
        Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch",
        ICLR 2021.
    """
    where = "jaxsparse.prune.srste"
    pattern = _structured(pattern, where)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not decay >= 0:
        raise ValueError(f"{where}: decay must be a float >= 0, got {decay!r}")
    decay = float(decay)
    filter_fn = _tree.resolve_filter(filter, where)

    def init_fn(params):
        del params
        return SRSTEState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(f"{where}: update needs params (the decay acts on pruned weights)")
        patterns = _layerwise.pattern_tree(params, pattern, filter_fn, where)

        def one(pat, g, w):
            if pat is None:
                return g
            pruned = jnp.where(magnitude_mask(w, pat.pattern), jnp.zeros((), w.dtype), w)
            return g + (decay * pruned).astype(jnp.result_type(g))

        return jax.tree.map(one, patterns, updates, params, is_leaf=_tree._is_none), state

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------- helpers
def _structured(pattern, where):
    """`_nm_pattern`, or a `{path: spec}` mapping of them."""
    if _layerwise.is_mapping(pattern):
        return _layerwise.check_mapping(
            pattern, where, validate=lambda p, name: _nm_pattern(p, f"{where}: {name}"))
    return _nm_pattern(pattern, where)


def _nm_pattern(pattern, where):
    """A format's spec (N:M, V:N:M, ...): SR-STE needs a structured mask to refine towards."""
    pattern = as_pattern(pattern, name="pattern")
    if isinstance(pattern, Unstructured):
        raise ValueError(
            f"{where}: pattern must be a format's spec (N:M, V:N:M, ...: SR-STE refines towards a "
            f"structured mask); got {pattern!r}"
        )
    return pattern


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _ste(w, pattern):
    return jnp.where(magnitude_mask(w, pattern), w, jnp.zeros((), w.dtype))


@_ste.defjvp
def _ste_jvp(pattern, primals, tangents):
    (w,), (dw,) = primals, tangents
    return _ste(w, pattern), dw
