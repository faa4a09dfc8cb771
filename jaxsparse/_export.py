"""`jax.export` of programs with jaxsparse weights: the custom-call safety check, and the formats
as pytrees an exported program can take and return.

`jax.export` refuses a program that calls a custom-call target without a compatibility
guarantee from XLA, which every jaxsparse kernel is: it is our ABI, not XLA's. The targets are a
versioned, stable ABI of their own (docs/ffi_abi.md: a target's operands, attributes and meaning
never change under its name), so `export` below disables that one check for jaxsparse's targets,
and for no others.

    >>> import jax, jax.numpy as jnp, jaxsparse as jsp
    >>> w = jsp.fromdense(jnp.ones((64, 32)), "2:4")
    >>> exported = jsp.export(jax.jit(lambda w, x: x @ w))(w, jnp.ones((8, 64)))
    >>> blob = exported.serialize()                  # bytes, to store or ship
    >>> y = jsp.deserialize(blob).call(w, jnp.ones((8, 64)))
    >>> y.shape
    (8, 32)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import jax
from jax import export as jax_export

from jaxsparse import _ffi
from jaxsparse.formats._base import SparseFormat
from jaxsparse.io import _decode_spec, _encode_spec, _formats

#: The version of the FFI targets' ABI (docs/ffi_abi.md: what a new version changes).
FFI_ABI_VERSION = 1


def custom_call_checks() -> list:
    """The `jax.export.DisabledSafetyCheck`s that let `jax.export.export` serialise calls of
    jaxsparse's FFI targets: one per target of the CPU, CUDA and emulator modules built here.
    Pass them as `disabled_checks=` when calling `jax.export.export` yourself."""
    names = sorted(set().union(*_ffi._TARGETS.values()))
    return [jax_export.DisabledSafetyCheck.custom_call(name) for name in names]


def export(fun: Callable, *, platforms: Sequence[str] | None = None,
           disabled_checks: Sequence = ()) -> Callable[..., jax_export.Exported]:
    """`jax.export.export(fun, ...)` with jaxsparse's custom calls allowed.

    Args:
        fun: the function to export, jitted (`jax.jit(f)`) or not (then jitted here).
        platforms: the platforms to lower for (`("cpu",)`, `("cpu", "cuda")`, ...); default the
            current backend. A platform without a jaxsparse kernel for a primitive lowers to its
            pure-jnp reference there.
        disabled_checks: further `jax.export.DisabledSafetyCheck`s (for other libraries' calls).

    Returns:
        What `jax.export.export` returns: a function of the arguments (arrays, `jax.ShapeDtypeStruct`s
        and jaxsparse weights, in any pytree) that traces, lowers and returns a
        `jax.export.Exported`. Weights may be arguments (their arrays become the program's
        inputs, their format and spec part of its signature) or closed over (then constants).
    """
    if not callable(fun):
        raise TypeError(f"jaxsparse.export: fun must be callable, got {type(fun).__name__}")
    if not hasattr(fun, "lower"):
        fun = jax.jit(fun)
    return jax_export.export(fun, platforms=platforms,
                             disabled_checks=(*custom_call_checks(), *disabled_checks))


def deserialize(blob: bytes | bytearray) -> jax_export.Exported:
    """`jax.export.deserialize`, after jaxsparse has registered its FFI targets and formats (which
    importing jaxsparse does): the returned program's `.call` runs its kernels."""
    if not isinstance(blob, (bytes, bytearray)):
        raise TypeError(f"jaxsparse.deserialize: blob must be bytes (Exported.serialize()), "
                        f"got {type(blob).__name__}")
    return jax_export.deserialize(bytearray(blob))


# ====================================================================== formats as pytrees
def _serialize_aux(cls: type[SparseFormat]) -> Callable[[tuple], bytes]:
    def serialize(aux: tuple) -> bytes:
        n_spec = len(cls.SPEC._fields)
        return json.dumps({"spec": _encode_spec(cls.SPEC(*aux[:n_spec])),
                           "static": list(aux[n_spec:])}).encode()
    return serialize


def _deserialize_aux(cls: type[SparseFormat]) -> Callable[[bytes], tuple]:
    def deserialize(data: bytes) -> tuple:
        what = f"jaxsparse.deserialize: a {cls.__name__} in the program's signature"
        record = json.loads(bytes(data).decode())
        spec = _decode_spec(record["spec"], what)
        static = list(record["static"])
        if "shards" not in record["spec"]["fields"] and "shards" in cls.SPEC._fields \
                and len(static) == len(cls.static_names()) - len(spec) + 1:
            # Programs of jaxsparse 59a3c92 kept 1xN's shards after the shape, not in the spec.
            spec = spec._replace(shards=static.pop())
        return (*spec, *static)
    return deserialize


def _register_formats() -> None:
    """Every format class as a pytree node `jax.export` can serialise, named
    `jaxsparse.<class>`, its aux data (spec, in_features[, out_features]) as JSON."""
    for name, cls in sorted(_formats().items()):
        jax_export.register_pytree_node_serialization(
            cls, serialized_name=f"jaxsparse.{name}",
            serialize_auxdata=_serialize_aux(cls), deserialize_auxdata=_deserialize_aux(cls))


_register_formats()
