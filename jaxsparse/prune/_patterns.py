"""Sparsity patterns as values: the formats' specs (`NM`, `VNM`, ...), `Unstructured`,
`as_pattern`, `fits`.

Every pruning function and every layer dispatches on the *pattern value* (a hashable NamedTuple),
never on strings scattered in the code. A format's spec (jaxsparse/formats/_spec.py) brings its
own `fits_shape` and `magnitude_mask`, so the pruners take every registered format without a
branch per format; `Unstructured` is the one mask-only pattern, with no format.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Union

import numpy as np

from jaxsparse.formats import _spec
from jaxsparse.formats.nm import NM


class Unstructured(NamedTuple):
    """Unstructured sparsity: keep a fraction `density` of the entries of each tensor.

    A mask-only pattern: there is no compressed format or kernel for it, so sparse layers refuse it
    (see `fits`); masks, schedules and fine-tuning accept it.

    Args:
        density: the fraction of entries kept, in (0, 1]; the sparsity is `1 - density`.

    Example:
        >>> Unstructured(0.25).sparsity
        0.75
    """

    density: float

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.density)

    def validate(self, where: str = "jaxsparse.prune.Unstructured") -> "Unstructured":
        d = self.density
        if isinstance(d, bool) or not isinstance(d, (int, float, np.integer, np.floating)):
            raise TypeError(
                f"{where}: density must be a float in (0, 1], got {type(d).__name__} {d!r}"
            )
        if not (math.isfinite(float(d)) and 0.0 < float(d) <= 1.0):
            raise ValueError(f"{where}: density must be in (0, 1], got {d!r}")
        return Unstructured(float(d))

    def __str__(self) -> str:
        return f"unstructured({self.density:g})"


#: Every pattern value the pruning functions accept: a registered spec or `Unstructured`.
Pattern = Union[NM, Unstructured, tuple]


def _accepted() -> str:
    return f"{_spec.accepted_forms()}, or jaxsparse.prune.Unstructured(density)"


def as_pattern(spec, *, name: str = "sparsity",
               where: str = "jaxsparse.prune.as_pattern") -> Pattern:
    """Turn a sparsity spec into a validated pattern value.

    Args:
        spec: a format's spec (`NM(n, m)`, `VNM(v, n, m)`, ...), its string (`"2:4"`,
            `"64:2:8"`), or `Unstructured(density)` with `0 < density <= 1`.
        name: the argument name used in error messages (`sparsity` for the layers).
        where: the public function named first in error messages (a caller's own name).

    Returns:
        The validated pattern (a spec with Python ints, or `Unstructured` with a Python float).

    Raises:
        TypeError: `spec` is neither a pattern value nor a string.
        ValueError: an unparsable string or out-of-range numbers.

    Example:
        >>> as_pattern("2:4")
        NM(n=2, m=4)
        >>> as_pattern(Unstructured(0.1))
        Unstructured(density=0.1)
    """
    if isinstance(spec, Unstructured):
        try:
            return spec.validate(f"{where}: {name}")
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (invalid pattern {spec!r})") from None
    if isinstance(spec, str) and not any(
        t.from_string(spec) is not None for t in _spec.registered_specs()
    ):
        raise ValueError(f"{where}: {name} must be {_accepted()}; got {spec!r}")
    if _spec.is_spec(spec) or isinstance(spec, str):
        return _spec.as_spec(spec, name=name, where=where)
    raise TypeError(
        f"{where}: {name} must be {_accepted()}; got {type(spec).__name__} "
        f"{spec!r}"
        + (
            " (for unstructured sparsity pass jaxsparse.prune.Unstructured(density))"
            if isinstance(spec, (int, float)) and not isinstance(spec, bool)
            else ""
        )
    )


def fits(pattern, kernel_shape) -> str | None:
    """Whether a sparse layer with a kernel of `kernel_shape` can take `pattern`.

    A layer's kernel is `[..., in, out]` and N:M runs along `in`. N:M fits any such shape (a ragged
    `in` is zero-padded to a multiple of `m`), but with `in < m` nothing can be pruned, so that is
    reported. `Unstructured` has no compressed format or kernel and never fits a layer.

    Args:
        pattern: anything `as_pattern` accepts.
        kernel_shape: the dense kernel's shape, a sequence of non-negative ints.

    Returns:
        None when the pattern fits, else a short human-readable reason (used by `sparsify` to skip
        a layer and log why).

    Example:
        >>> fits("2:4", (64, 32)) is None
        True
        >>> fits("2:4", (3, 32))
        'in=3 < m=4: an N:M group needs at least m inputs, nothing would be pruned'
    """
    pattern = as_pattern(pattern)
    try:
        shape = tuple(int(d) for d in kernel_shape)
        if any(d != s for d, s in zip(shape, kernel_shape)):
            raise TypeError
    except TypeError:
        raise TypeError(
            f"jaxsparse.prune.fits: kernel_shape must be a sequence of ints, got {kernel_shape!r}"
        ) from None
    if any(d < 0 for d in shape):
        raise ValueError(
            f"jaxsparse.prune.fits: kernel_shape must hold non-negative sizes, got {shape}"
        )
    if isinstance(pattern, Unstructured):
        return (
            f"{pattern} has no compressed format or kernel: sparse layers take the formats' specs "
            "(N:M, V:N:M, ...); use jaxsparse.prune.magnitude_mask / masked() for unstructured "
            "pruning"
        )
    if len(shape) < 2:
        return f"kernel of shape {shape} has rank {len(shape)}; expected [..., in, out]"
    return pattern.fits_shape(shape)
