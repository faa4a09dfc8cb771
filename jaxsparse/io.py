"""Compressed weights in safetensors files, with their format recorded and validated on load.

`save_safetensors(path, {name: weight})` writes each jaxsparse weight as its arrays (tensors named
`<name>.<array>`, e.g. `encoder.0.kernel.values`, in the format's own dtypes) and records in the
file's metadata, under the key `"jaxsparse"`, what they are: the format class, its spec, the
logical in and out features and which tensor holds which array. Plain arrays are written as they
are. Any safetensors reader (torch, numpy, Hugging Face tools) reads the tensors;
`load_safetensors` reads them back into the same formats.

The file is the safetensors layout (an 8-byte little-endian header size, a JSON header of dtypes,
shapes and byte offsets, then the raw little-endian data), written and read here without the
`safetensors` package, so that every dtype jaxsparse stores (bf16 included) needs no framework.

Loading checks everything before any array reaches a kernel: the header against the file's size
(a truncated or padded file is refused), each tensor's dtype, shape and byte range, the metadata's
version, format and spec, that no float array holds NaN or infinity, each weight through its
format's validating constructor (positions in range, shapes consistent), and that each array has
the dtype its format stores. Every failure is a ValueError or TypeError naming the
file, the weight and what was expected.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from jaxsparse._validate import check_int
from jaxsparse.formats._base import SparseFormat
from jaxsparse.formats._spec import registered_specs

__all__ = ["save_safetensors", "load_safetensors", "METADATA_KEY", "METADATA_VERSION"]

#: The key of jaxsparse's record in the safetensors metadata.
METADATA_KEY = "jaxsparse"
#: The record's version; a file of another version is refused on load.
METADATA_VERSION = 1

# safetensors dtype names <-> NumPy dtypes (bf16 through ml_dtypes).
_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_HEADER_LIMIT = 100 << 20  # safetensors readers refuse headers above 100 MB.


# ====================================================================== saving
def save_safetensors(path, weights: Mapping[str, Any], *,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write `{name: weight}` to a safetensors file at `path`.

    Args:
        path: the file to write (replaced if it exists).
        weights: jaxsparse weights (any `SparseFormat`: `NMSparse`, `VNMSparse`, `BlocksSparse`,
            `Int4Weight`, ...) and plain arrays, by name. Names are strings without `.`-suffix
            clashes: a weight named `w` takes the tensors `w.<array>`.
        metadata: extra `{str: str}` entries for the file's metadata (not `"jaxsparse"`).

    Example:
        >>> import jax, jaxsparse as jsp, tempfile, os
        >>> w = jsp.fromdense(jax.random.normal(jax.random.key(0), (64, 32)), "2:4")
        >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> jsp.save_safetensors(path, {"layer": w})
        >>> jsp.load_safetensors(path)["layer"].spec
        NM(n=2, m=4)
    """
    where = "jaxsparse.save_safetensors"
    if not isinstance(weights, Mapping) or not weights:
        raise TypeError(f"{where}: weights must be a non-empty mapping {{name: weight}}; got "
                        f"{type(weights).__name__}")
    extra = _check_metadata(metadata, where)
    tensors: dict[str, np.ndarray] = {}
    record: dict[str, Any] = {}
    for name, weight in weights.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"{where}: weight names must be non-empty strings; got {name!r}")
        if isinstance(weight, SparseFormat):
            record[name] = _describe(weight, name, tensors, where)
        else:
            _add_tensor(tensors, name, weight, where, f"weights[{name!r}]")
    header_meta = {**extra, METADATA_KEY: json.dumps({"version": METADATA_VERSION,
                                                      "weights": record}, sort_keys=True)}
    _write(path, tensors, header_meta)


def _describe(weight: SparseFormat, name: str, tensors: dict, where: str) -> dict:
    keys = {}
    for array_name, array in weight.arrays().items():
        key = f"{name}.{array_name}"
        _add_tensor(tensors, key, array, where, f"weights[{name!r}].{array_name}")
        keys[array_name] = key
    entry = {"format": type(weight).__name__, "spec": _encode_spec(weight.spec),
             "in_features": int(weight.in_features), "out_features": int(weight.out_features),
             "tensors": keys}
    return entry


def _add_tensor(tensors: dict, key: str, array, where: str, what: str) -> None:
    if key in tensors:
        raise ValueError(f"{where}: two arrays would both be stored as tensor {key!r}; rename "
                         "one weight")
    try:
        host = np.asarray(array)
    except Exception as err:  # A tracer, or an object that is no array.
        raise TypeError(f"{where}: {what} must be a concrete array; got "
                        f"{type(array).__name__} ({err})") from None
    if host.dtype not in _NAMES:
        raise TypeError(f"{where}: {what} has dtype {host.dtype}, which safetensors cannot "
                        f"store; expected one of {sorted(str(d) for d in _NAMES)}")
    tensors[key] = np.ascontiguousarray(host)


def _check_metadata(metadata, where: str) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"{where}: metadata must be a mapping of str to str; got {metadata!r}")
    if METADATA_KEY in metadata:
        raise ValueError(f"{where}: metadata key {METADATA_KEY!r} is jaxsparse's own record")
    return dict(metadata)


def _write(path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, array in tensors.items():
        header[key] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                       "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # The data starts 8-byte aligned, as safetensors writes it.
    with open(path, "wb") as out:
        out.write(len(text).to_bytes(8, "little"))
        out.write(text)
        for array in tensors.values():
            out.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


# ====================================================================== loading
def load_safetensors(path) -> dict[str, Any]:
    """Read a safetensors file: jaxsparse weights back in their formats, other tensors as arrays.

    Args:
        path: a file written by `save_safetensors` (or any safetensors file: without a jaxsparse
            record every tensor comes back as an array).

    Returns:
        `{name: weight}`: a `SparseFormat` for every weight the record names (validated by its
        format's constructor), a NumPy array for every other tensor.

    Raises:
        ValueError: a truncated or malformed file, a record of another version, an unknown format
            or spec, a missing tensor, or arrays the format refuses (shapes, positions).
        TypeError: a tensor of the wrong dtype for its format.
    """
    where = f"jaxsparse.load_safetensors: {os.fspath(path)}"
    tensors, metadata = _read(path, where)
    record = _record(metadata, where)
    out: dict[str, Any] = {}
    used: set[str] = set()
    for name, entry in record.items():
        out[name] = _rebuild(name, entry, tensors, where)
        used.update(entry["tensors"].values())
    for key, array in tensors.items():
        if key not in used:
            out[key] = array
    return out


def _read(path, where: str) -> tuple[dict[str, np.ndarray], dict]:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as err:
        raise ValueError(f"{where}: cannot read the file ({err})") from None
    if len(data) < 8:
        raise ValueError(f"{where}: truncated: {len(data)} bytes, fewer than the 8 of the "
                         "header size")
    size = int.from_bytes(data[:8], "little")
    if size > _HEADER_LIMIT or 8 + size > len(data):
        raise ValueError(f"{where}: truncated or not a safetensors file: the header claims "
                         f"{size} bytes, the file has {len(data) - 8} after the size")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where}: the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: the header must be a JSON object; got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: __metadata__ must be an object of strings")
    body = memoryview(data)[8 + size:]
    tensors = {key: _tensor(key, info, body, where) for key, info in header.items()}
    end = 0  # The tensors must tile the data exactly, in some order, as safetensors requires.
    for key, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        begin, stop = info["data_offsets"]
        if begin != end:
            raise ValueError(f"{where}: tensor {key!r} starts at byte {begin} of the data, where "
                             f"the previous one ends at {end} (overlapping or with a gap)")
        end = stop
    if end != len(body):
        raise ValueError(f"{where}: the tensors cover {end} bytes of data, the file holds "
                         f"{len(body)} (truncated or padded)")
    return tensors, metadata


def _tensor(key: str, info, body: memoryview, where: str) -> np.ndarray:
    what = f"{where}: tensor {key!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"{what}: expected {{dtype, shape, data_offsets}}; got {info!r}")
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"{what}: unknown dtype {info['dtype']!r}; expected one of "
                         f"{sorted(_DTYPES)}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(f"{what}: shape must be a list of non-negative ints; got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"{what}: data_offsets must be [begin, end] with 0 <= begin <= end; "
                         f"got {offsets!r}")
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{what}: {end - begin} bytes for shape {tuple(shape)} of "
                         f"{info['dtype']} ({math.prod(shape) * dtype.itemsize} bytes expected)")
    if end > len(body):
        raise ValueError(f"{what}: bytes [{begin}, {end}) lie past the file's {len(body)} bytes "
                         "of data (truncated)")
    raw = np.frombuffer(body[begin:end], dtype=dtype.newbyteorder("<"))
    return raw.astype(dtype).reshape(shape)


def _record(metadata: dict, where: str) -> dict:
    text = metadata.get(METADATA_KEY)
    if text is None:
        return {}
    try:
        record = json.loads(text)
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where}: the {METADATA_KEY!r} metadata is not valid JSON ({err})") \
            from None
    if not isinstance(record, dict) or record.get("version") != METADATA_VERSION:
        version = record.get("version") if isinstance(record, dict) else None
        raise ValueError(f"{where}: the {METADATA_KEY!r} record has version {version!r}; this "
                         f"jaxsparse reads version {METADATA_VERSION}")
    weights = record.get("weights")
    if not isinstance(weights, dict):
        raise ValueError(f"{where}: the {METADATA_KEY!r} record has no weights object")
    return weights


def _rebuild(name: str, entry, tensors: dict, where: str) -> SparseFormat:
    what = f"{where}: weight {name!r}"
    fields = {"format", "spec", "in_features", "out_features", "tensors"}
    if not isinstance(entry, dict) or set(entry) - {"shards"} != fields:
        raise ValueError(f"{what}: the record must have exactly {sorted(fields)}; got "
                         f"{entry!r}")
    cls = _formats().get(entry["format"])
    if cls is None:
        raise ValueError(f"{what}: unknown format {entry['format']!r}; this jaxsparse knows "
                         f"{sorted(_formats())}")
    spec = _decode_spec(entry["spec"], what)
    if not isinstance(spec, cls.SPEC):
        raise ValueError(f"{what}: format {cls.__name__} takes a {cls.SPEC.__name__} spec; the "
                         f"record has {spec!r}")
    if "shards" in entry:  # Files of jaxsparse 59a3c92 recorded a 1xN balance beside the spec.
        if "shards" not in cls.SPEC._fields:
            raise ValueError(f"{what}: format {cls.__name__} has no 'shards'; the record "
                             f"gives {entry['shards']!r}")
        spec = spec._replace(shards=check_int("shards", entry["shards"], low=1,
                                              high=2**31 - 1, where=what))
    for field in ("in_features", "out_features"):
        check_int(field, entry[field], low=0, high=2**62, where=what)
    keys = entry["tensors"]
    if not isinstance(keys, dict) or set(keys) != set(cls.array_names()):
        raise ValueError(f"{what}: format {cls.__name__} has the arrays "
                         f"{list(cls.array_names())}; the record names {keys!r}")
    missing = sorted(k for k in keys.values() if k not in tensors)
    if missing:
        raise ValueError(f"{what}: the file has no tensor {missing} (a mismatched checkpoint?)")
    arrays = {array: tensors[key] for array, key in keys.items()}
    for array, value in arrays.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(
                value.astype(np.float32)).all():
            raise ValueError(f"{what}: tensor {keys[array]!r} ({array}) holds non-finite "
                             "values (a corrupted or diverged checkpoint)")
    try:
        weight = cls.from_arrays(spec, entry["in_features"], arrays,
                                 out_features=entry["out_features"])
    except (TypeError, ValueError) as err:
        raise type(err)(f"{what}: {err}") from None
    for array, value in weight.arrays().items():
        if np.dtype(value.dtype) != arrays[array].dtype:
            raise TypeError(f"{what}: tensor {keys[array]!r} ({array}) has dtype "
                            f"{arrays[array].dtype}; format {cls.__name__} stores it as "
                            f"{np.dtype(value.dtype)}")
    if weight.out_features != entry["out_features"]:
        raise ValueError(f"{what}: the arrays hold {weight.out_features} outputs; the record "
                         f"says {entry['out_features']}")
    return weight


def _formats() -> dict[str, type]:
    """Every public format class by name (subclasses of SparseFormat, at any depth)."""
    found, stack = {}, [SparseFormat]
    while stack:
        for sub in stack.pop().__subclasses__():
            stack.append(sub)
            if not sub.__name__.startswith("_"):
                found[sub.__name__] = sub
    return found


def _encode_spec(spec) -> dict:
    return {"type": type(spec).__name__,
            "fields": {k: _encode_spec(v) if hasattr(v, "_fields") else v
                       for k, v in spec._asdict().items()}}


def _decode_spec(encoded, what: str):
    types = {t.__name__: t for t in registered_specs()}
    if not isinstance(encoded, dict) or set(encoded) != {"type", "fields"} \
            or encoded["type"] not in types or not isinstance(encoded["fields"], dict):
        raise ValueError(f"{what}: the spec must be {{type, fields}} with type one of "
                         f"{sorted(types)}; got {encoded!r}")
    spec_type = types[encoded["type"]]
    fields = {k: _decode_spec(v, what) if isinstance(v, dict) else v
              for k, v in encoded["fields"].items()}
    # A field added later with a default (1xN's shards) may be absent from older records.
    fields = {**{k: v for k, v in spec_type._field_defaults.items() if k not in fields},
              **fields}
    if set(fields) != set(spec_type._fields):
        raise ValueError(f"{what}: a {spec_type.__name__} spec has the fields "
                         f"{list(spec_type._fields)}; got {sorted(fields)}")
    try:
        return spec_type(**fields).validate(f"{what}: spec")
    except (TypeError, ValueError) as err:
        raise type(err)(str(err)) from None
