"""Sparsity patterns as values: `NM` (from the formats), `Unstructured`, `as_pattern`, `fits`.

Every pruning function and every layer dispatches on the *pattern value* (a hashable NamedTuple),
never on strings scattered in the code, so further patterns (V:N:M, 1xN blocks) slot in as new
values with their own branches in `magnitude_mask` and `fits`.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple, Union

import numpy as np

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


#: Every pattern value the pruning functions accept.
Pattern = Union[NM, Unstructured]

_NM_STRING = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_ACCEPTED = (
    "a pattern value (jaxsparse.NM(n, m) or jaxsparse.prune.Unstructured(density)) or a string "
    "'n:m' such as '2:4'"
)


def as_pattern(spec, *, name: str = "sparsity") -> Pattern:
    """Turn a sparsity spec into a validated pattern value.

    Args:
        spec: `NM(n, m)`, `Unstructured(density)`, or a string `"n:m"` (e.g. `"2:4"`), with
            `1 <= n < m <= 16` and `0 < density <= 1`.
        name: the argument name used in error messages (`sparsity` for the layers).

    Returns:
        The validated pattern (`NM` with Python ints, or `Unstructured` with a Python float).

    Raises:
        TypeError: `spec` is neither a pattern value nor a string.
        ValueError: an unparsable string or out-of-range numbers.

    Example:
        >>> as_pattern("2:4")
        NM(n=2, m=4)
        >>> as_pattern(Unstructured(0.1))
        Unstructured(density=0.1)
    """
    where = f"jaxsparse.prune.as_pattern: {name}"
    if isinstance(spec, (NM, Unstructured)):
        try:
            return spec.validate(where)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (invalid pattern {spec!r})") from None
    if isinstance(spec, str):
        match = _NM_STRING.match(spec)
        if match is None:
            raise ValueError(
                f"jaxsparse.prune.as_pattern: {name} must be {_ACCEPTED}; got {spec!r}"
            )
        n, m = int(match.group(1)), int(match.group(2))
        try:
            return NM(n, m).validate(where)
        except ValueError as err:
            raise ValueError(f"{err} (from {name}={spec!r})") from None
    raise TypeError(
        f"jaxsparse.prune.as_pattern: {name} must be {_ACCEPTED}; got {type(spec).__name__} "
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
            f"{pattern} has no compressed format or kernel: sparse layers take N:M patterns; "
            "use jaxsparse.prune.magnitude_mask / masked() for unstructured pruning"
        )
    if len(shape) < 2:
        return f"kernel of shape {shape} has rank {len(shape)}; expected [..., in, out]"
    in_features = shape[-2]
    if in_features < pattern.m:
        return (
            f"in={in_features} < m={pattern.m}: an N:M group needs at least m inputs, "
            "nothing would be pruned"
        )
    return None
