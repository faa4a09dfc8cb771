"""Specs: the values that name a weight format and its numbers, in one registry.

A spec is a hashable NamedTuple (`NM(2, 4)`, `VNM(64, 2, 8)`) that knows

- its format class (`spec.format`) and its density,
- how to validate itself (`spec.validate(where)`) and parse itself from a string
  (`"2:4"`, `"64:2:8"`: `SpecType.from_string(text)` returns None for text that is not its own),
- whether a kernel shape can take it (`spec.fits_shape(shape)`: None, or the reason why not),
- how to choose a magnitude mask (`spec.magnitude_mask(w)`: the entries `fromdense` keeps).

Every spec type registers itself here (`register_spec`), and this registry is what the layers'
`sparsity=`, `sparsify`, the pruners, `jaxsparse.fromdense` and the benchmark accept. A new
format adds its spec type in its own file; nothing else lists formats.
"""

from __future__ import annotations

_SPECS: list[type] = []


def register_spec(spec_type: type) -> type:
    """Class decorator: make `spec_type` (a NamedTuple with the protocol above) accepted
    everywhere a spec is."""
    if spec_type not in _SPECS:
        _SPECS.append(spec_type)
    return spec_type


def registered_specs() -> tuple[type, ...]:
    """Every spec type, in registration order."""
    return tuple(_SPECS)


def is_spec(value) -> bool:
    return isinstance(value, tuple(_SPECS))


def accepted_forms() -> str:
    """A human-readable list of what `as_spec` accepts (for error messages)."""
    names = [f"jaxsparse.{t.__name__}({', '.join(t._fields)})" for t in _SPECS]
    strings = [t.STRING_FORM for t in _SPECS]
    return f"a spec ({', '.join(names)}) or a string ({', '.join(strings)})"


def as_spec(spec, *, name: str = "sparsity", where: str = "jaxsparse"):
    """Turn a spec or its string form into a validated spec value.

    Args:
        spec: a registered spec value (`NM(2, 4)`, `VNM(64, 2, 8)`) or its string
            (`"2:4"`, `"64:2:8"`).
        name: the argument name for error messages.
        where: the public function for error messages.

    Returns:
        The validated spec (Python ints).

    Raises:
        TypeError: neither a spec nor a string.
        ValueError: an unparsable string or out-of-range numbers.

    Example:
        >>> from jaxsparse.formats import as_spec
        >>> as_spec("2:4"), as_spec("64:2:8")
        (NM(n=2, m=4), VNM(v=64, n=2, m=8))
    """
    prefix = f"{where}: {name}"
    if is_spec(spec):
        try:
            return spec.validate(prefix)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (invalid spec {spec!r})") from None
    if isinstance(spec, str):
        for spec_type in _SPECS:
            parsed = spec_type.from_string(spec)
            if parsed is not None:
                try:
                    return parsed.validate(prefix)
                except ValueError as err:
                    raise ValueError(f"{err} (from {name}={spec!r})") from None
        raise ValueError(f"{prefix} must be {accepted_forms()}; got {spec!r}")
    raise TypeError(f"{prefix} must be {accepted_forms()}; got {type(spec).__name__} {spec!r}")


def fromdense(w, spec):
    """Build the format of `spec` from a dense weight, keeping the largest magnitudes.

    Args:
        w: `[..., in, out]` float32/bfloat16/float16 (a Flax kernel, or a stack of them).
        spec: a spec or its string, e.g. `jaxsparse.NM(2, 4)`, `"2:4"`, `jaxsparse.VNM(64, 2, 8)`.

    Returns:
        The format instance (`NMSparse`, `VNMSparse`, ...) of logical shape `w.shape`.

    Example:
        >>> import jax.numpy as jnp, jaxsparse as jsp
        >>> ws = jsp.fromdense(jnp.ones((8, 4)), jsp.NM(2, 4))
        >>> type(ws).__name__, ws.shape
        ('NMSparse', (8, 4))
    """
    spec = as_spec(spec, name="spec", where="jaxsparse.fromdense")
    return spec.format.fromdense(w, **spec._asdict())


def frommask(w, mask, spec):
    """Build the format of `spec` keeping the entries of `w` where `mask` is True.

    Args:
        w: `[..., in, out]` float32/bfloat16/float16.
        mask: bool of `w`'s shape that respects `spec` (e.g. `spec.magnitude_mask(w)`).
        spec: a spec or its string.

    Returns:
        The format instance; `todense()` equals `where(mask, w, 0)`.
    """
    spec = as_spec(spec, name="spec", where="jaxsparse.frommask")
    return spec.format.frommask(w, mask, **spec._asdict())
