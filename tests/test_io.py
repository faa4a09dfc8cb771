"""jaxsparse.save_safetensors / load_safetensors: every format round-trips bit for bit and
multiplies as before; other safetensors readers read the tensors; malformed files, mismatched
records and arrays the formats refuse are named errors before any kernel runs."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp
from jaxsparse import io as jio


def dense(shape=(128, 96), dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def every_format():
    """One weight of every format class (both dtypes families, ragged outputs): built once per
    test process (~15 s of compiles) for the files that share it (io, BCOO, export)."""
    return dict(_every_format())


@functools.lru_cache(maxsize=None)
def _every_format():
    w = dense()
    wide = dense((128, 128)).astype(jnp.float16)  # MARLIN tiles: 64 outputs
    int4 = jsp.fromdense(wide, jsp.Int4(32))
    int4_nm = jsp.fromdense(wide, jsp.Int4(32, jsp.NM(2, 4)))
    vnm = jsp.fromdense(w, jsp.VNM(16, 2, 8))
    return {
        "nm": jsp.fromdense(w, "2:4"),
        "nm_bf16": jsp.fromdense(w.astype(jnp.bfloat16), "1:3"),
        "vnm": vnm,
        "vnm_tiled": vnm.with_tiles(),
        "blocks": jsp.fromdense(w[:, :90], jsp.Blocks(16, 0.3)),
        "blocks_shards": jsp.fromdense(w, jsp.Blocks(16, 0.25, shards=3)),
        "blocks_rows": jsp.fromdense(w, jsp.Blocks(16, 0.25, shards=4, split="in")),
        "int4": int4,
        "int4_a8": jsp.fromdense(w, jsp.Int4(None, activations="int8")),
        "int4_nm": int4_nm,
        "int4_lines": jsp.fromdense(w, jsp.Int4(32)).with_lines(),
        "int4_nm_lines": jsp.fromdense(w, jsp.Int4(32, jsp.NM(2, 4))).with_lines(),
        "int4_marlin": jsp.Int4MarlinWeight.from_canonical(int4),
        "int4_nm_marlin": jsp.Int4NMMarlinWeight.from_canonical(int4_nm),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    weights = every_format()
    path = tmp_path_factory.mktemp("io") / "model.safetensors"
    jsp.save_safetensors(path, {**weights, "head.bias": np.arange(5, dtype=np.float32)},
                         metadata={"model": "test"})
    return weights, path


def test_every_format_round_trips_bit_for_bit(saved):
    weights, path = saved
    back = jsp.load_safetensors(path)
    assert set(back) == set(weights) | {"head.bias"}
    np.testing.assert_array_equal(back["head.bias"], np.arange(5, dtype=np.float32))
    for name, weight in weights.items():
        got = back[name]
        assert type(got) is type(weight) and got.spec == weight.spec, name
        assert got.shape == weight.shape and got.dtype == weight.dtype, name
        assert got._aux == weight._aux, name
        for array, value in weight.arrays().items():
            np.testing.assert_array_equal(np.asarray(got.arrays()[array]), np.asarray(value),
                                          err_msg=f"{name}.{array}")
        if isinstance(weight, (jsp.Int4MarlinWeight, jsp.Int4NMMarlinWeight)):
            continue  # No CPU kernel reads the MARLIN layouts: their arrays are the check.
        x = jnp.ones((3, weight.shape[0]), weight.dtype)
        np.testing.assert_array_equal(np.asarray(x @ got), np.asarray(x @ weight), err_msg=name)


def test_other_readers_see_the_tensors_and_the_record(saved):
    weights, path = saved
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = safetensors_numpy.load_file(path)
    np.testing.assert_array_equal(tensors["nm.values"], np.asarray(weights["nm"].values))
    np.testing.assert_array_equal(tensors["int4.qweight"], np.asarray(weights["int4"].qweight))
    header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert header["__metadata__"]["model"] == "test"
    record = json.loads(header["__metadata__"][jio.METADATA_KEY])
    assert record["version"] == jio.METADATA_VERSION
    assert record["weights"]["int4_nm"]["spec"] == {
        "type": "Int4", "fields": {"group_size": 32, "activations": None,
                                   "sparsity": {"type": "NM", "fields": {"n": 2, "m": 4}}}}


def test_a_1xn_balance_is_in_the_spec_and_older_records_of_it_still_load(saved, tmp_path):
    weights, path = saved
    data = path.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    record = json.loads(header["__metadata__"][jio.METADATA_KEY])["weights"]
    assert record["blocks_shards"]["spec"]["fields"]["shards"] == 3
    assert record["blocks"]["spec"]["fields"]["shards"] == 1
    assert record["blocks_rows"]["spec"]["fields"] == {"n": 16, "density": 0.25, "shards": 4,
                                                      "split": "in"}

    def legacy(record):  # As 59a3c92 wrote it: the spec without shards, the balance beside it.
        entries = record["weights"]
        for name in ("blocks", "blocks_shards"):
            assert entries[name]["spec"]["fields"].pop("split") == "out"
            shards = entries[name]["spec"]["fields"].pop("shards")
            if shards > 1:
                entries[name]["shards"] = shards
    back = jsp.load_safetensors(rewrite(path, tmp_path / "legacy.safetensors", legacy))
    for name in ("blocks", "blocks_shards"):
        assert back[name].spec == weights[name].spec and back[name]._aux == weights[name]._aux
    bad = rewrite(path, tmp_path / "bad.safetensors", record_edit("nm", "shards", 2))
    with pytest.raises(ValueError, match="format NMSparse has no 'shards'"):
        jsp.load_safetensors(bad)


def test_a_plain_safetensors_file_loads_as_arrays(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "plain.safetensors"
    safetensors_numpy.save_file({"a": np.ones((2, 3), np.float32), "b": np.arange(4, dtype=np.int8)},
                                path)
    back = jsp.load_safetensors(path)
    np.testing.assert_array_equal(back["b"], np.arange(4, dtype=np.int8))
    assert back["a"].shape == (2, 3)


# ---------------------------------------------------------------------- bad input
def rewrite(path, out, edit_record=None, edit_header=None):
    """A copy of `path` with its header (and the jaxsparse record in it) edited."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if edit_record:
        record = json.loads(header["__metadata__"][jio.METADATA_KEY])
        edit_record(record)
        header["__metadata__"][jio.METADATA_KEY] = json.dumps(record)
    if edit_header:
        edit_header(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    out.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size:])
    return out


def record_edit(name, key, value):
    def edit(record):
        record["weights"][name][key] = value
    return edit


def body_edit(saved_weights, name, array, values):
    """A header edit cannot change bytes: this writes a fresh file with one array replaced."""
    def make(tmp_path):
        weight = saved_weights[name]
        bad = weight.from_arrays(weight.spec, weight.in_features,
                                 {**weight.arrays(), array: values(weight)}, validate=False,
                                 out_features=weight.out_features)
        path = tmp_path / "bad.safetensors"
        jsp.save_safetensors(path, {name: bad})
        return path
    return make


@pytest.mark.parametrize("corrupt,error,match", [
    (lambda p, t: (t / "short").write_bytes(p.read_bytes()[:5]) and t / "short", ValueError,
     "truncated: 5 bytes"),
    (lambda p, t: (t / "cut").write_bytes(p.read_bytes()[:-7]) and t / "cut", ValueError,
     "truncated"),
    (lambda p, t: (t / "pad").write_bytes(p.read_bytes() + b"\0" * 8) and t / "pad", ValueError,
     "padded"),
    (lambda p, t: (t / "head").write_bytes(p.read_bytes()[:200]) and t / "head", ValueError,
     "the header claims"),
    (lambda p, t: (t / "json").write_bytes((8).to_bytes(8, "little") + b"{not js}") and t / "json",
     ValueError, "not valid JSON"),
    (lambda p, t: rewrite(p, t / "v", lambda r: r.update(version=2)), ValueError,
     "version 2; this jaxsparse reads version 1"),
    (lambda p, t: rewrite(p, t / "f", record_edit("nm", "format", "CSR")), ValueError,
     "unknown format 'CSR'"),
    (lambda p, t: rewrite(p, t / "s", record_edit("nm", "spec", {"type": "NM", "fields": {
        "n": 5, "m": 4}})), ValueError, "weight 'nm': spec: n must be"),
    (lambda p, t: rewrite(p, t / "s2", record_edit("nm", "spec", {"type": "VNM", "fields": {
        "v": 16, "n": 2, "m": 8}})), ValueError, "format NMSparse takes a NM spec"),
    (lambda p, t: rewrite(p, t / "s3", record_edit("nm", "spec", "2:4")), ValueError,
     "the spec must be"),
    (lambda p, t: rewrite(p, t / "i", record_edit("nm", "in_features", 64)), ValueError,
     "weight 'nm'"),
    (lambda p, t: rewrite(p, t / "i2", record_edit("nm", "in_features", -1)), ValueError,
     r"in_features must be in \[0, "),
    (lambda p, t: rewrite(p, t / "i3", record_edit("nm", "out_features", 64.0)), TypeError,
     "out_features must be an int, got float"),
    (lambda p, t: rewrite(p, t / "o", record_edit("blocks", "out_features", 80)), ValueError,
     "weight 'blocks'"),
    (lambda p, t: rewrite(p, t / "a", record_edit("nm", "tensors", {"values": "nm.values"})),
     ValueError, "has the arrays"),
    (lambda p, t: rewrite(p, t / "m", record_edit("int4", "tensors", {
        "qweight": "int4.qweight", "scales": "int4.scale"})), ValueError,
     "no tensor \\['int4.scale'\\]"),
    (lambda p, t: rewrite(p, t / "gap", edit_header=lambda h: h.pop("int4.scales")), ValueError,
     "overlapping or with a gap"),
    (lambda p, t: rewrite(p, t / "d", edit_header=lambda h: h["nm.values"].update(dtype="F8")),
     ValueError, "unknown dtype 'F8'"),
    (lambda p, t: rewrite(p, t / "d2", edit_header=lambda h: h["nm.indices"].update(
        dtype="I8")), TypeError, "'nm.indices' \\(indices\\) has dtype int8; format NMSparse"),
    (lambda p, t: rewrite(p, t / "sh", edit_header=lambda h: h["nm.values"].update(
        shape=[1, 2])), ValueError, "bytes for shape \\(1, 2\\)"),
    (lambda p, t: rewrite(p, t / "sh2", edit_header=lambda h: h["nm.values"].update(
        shape=[-1])), ValueError, "shape must be a list of non-negative ints"),
    (lambda p, t: rewrite(p, t / "off", edit_header=lambda h: h["nm.values"].update(
        data_offsets=[5, 1])), ValueError, "data_offsets must be"),
    (lambda p, t: rewrite(p, t / "key", edit_header=lambda h: h["nm.values"].update(
        strides=[1])), ValueError, "expected \\{dtype, shape, data_offsets\\}"),
    (lambda p, t: rewrite(p, t / "meta", edit_header=lambda h: h.update(__metadata__=[1])),
     ValueError, "__metadata__ must be"),
    (lambda p, t: rewrite(p, t / "rec", edit_header=lambda h: h["__metadata__"].update(
        jaxsparse="{")), ValueError, "metadata is not valid JSON"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_malformed_files_are_named_errors(saved, tmp_path, corrupt, error, match):
    _, path = saved
    bad = corrupt(path, tmp_path)
    with pytest.raises(error, match=match) as caught:
        jsp.load_safetensors(bad)
    assert "jaxsparse.load_safetensors: " in str(caught.value)


@pytest.mark.parametrize("name,array,values,error,match", [
    ("nm", "indices", lambda w: jnp.full_like(w.indices, 9), ValueError, "weight 'nm'"),
    ("blocks", "indices", lambda w: w.indices + 1000, ValueError, "weight 'blocks'"),
    ("int4", "scales", lambda w: w.scales.at[0, 0].set(jnp.nan), ValueError,
     "'int4.scales' \\(scales\\) holds non-finite values"),
    ("nm", "values", lambda w: w.values.at[0, 0].set(jnp.inf), ValueError,
     "'nm.values' \\(values\\) holds non-finite"),
    ("int4_nm", "positions", lambda w: w.positions[:1], ValueError, "weight 'int4_nm'"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_arrays_the_format_refuses_are_named_errors(saved, tmp_path, name, array, values, error,
                                                    match):
    weights, _ = saved
    path = body_edit(weights, name, array, values)(tmp_path)
    with pytest.raises(error, match=match):
        jsp.load_safetensors(path)


def test_save_refuses_what_it_cannot_store(tmp_path):
    w = jsp.fromdense(dense(), "2:4")
    path = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match="weights must be a non-empty mapping"):
        jsp.save_safetensors(path, {})
    with pytest.raises(TypeError, match="weight names must be non-empty strings"):
        jsp.save_safetensors(path, {3: w})
    with pytest.raises(ValueError, match="stored as tensor 'w.values'"):
        jsp.save_safetensors(path, {"w": w, "w.values": np.ones(2)})
    with pytest.raises(TypeError, match="metadata must be a mapping of str to str"):
        jsp.save_safetensors(path, {"w": w}, metadata={"a": 1})
    with pytest.raises(ValueError, match="'jaxsparse' is jaxsparse's own record"):
        jsp.save_safetensors(path, {"w": w}, metadata={"jaxsparse": "{}"})
    with pytest.raises(TypeError, match="dtype complex64"):
        jsp.save_safetensors(path, {"c": np.ones(2, np.complex64)})
    with pytest.raises(ValueError, match="cannot read the file"):
        jsp.load_safetensors(tmp_path / "missing.safetensors")
