"""One catalog of malformed inputs across every format and entry point (issue 15, point 4).

`MALFORMED` is a single table: each entry is one bad input, what it is given to, and the exception
(ValueError or TypeError) with a pattern its message must match: the argument, what was expected
and, where it helps, what came. One parametrized test runs the table and asserts that the input
is refused before any kernel runs:

- no jaxsparse primitive executes: every primitive's eager `impl` is replaced by one that
  records the call and raises, and no entry runs a compiled program holding a primitive (they
  trace, or lower, such programs; `test_the_guard_sees_a_kernel_run` shows the record working);
- a product (`x @ w`, `jsp.matmul`, an op of `jaxsparse.ops`, a layer's call) is refused inside
  `jax.eval_shape`, which runs abstract evaluation only, or, for a weight packed for CUDA, while
  lowering for the CPU (`jax.jit(...).lower`, which compiles and runs nothing).

What it covers, by category (`CATEGORIES`): wrong dtypes (integer values, float positions,
float64 under x64), wrong ranks and shapes, positions out of range or repeated or unsorted
(an index >= m, a block column >= in_features, a row pointer that goes down, repeated 2:4
positions), derived arrays that disagree with their source (2-bit positions, packed tiles),
NaN and infinite scales and weights, masks that break their pattern, specs out of range,
products with x of the wrong last dim, dtype or rank, the ops called directly with bad
parameters, layers given a spec or kernel they cannot take or the state of another pattern,
safetensors files that are truncated or whose record mismatches their arrays, permutations that
are not permutations, and the runtime switches (`matmul_path`, `set_cpu_isa`, `choose_path`).
Every public format class (`SparseFormat`'s subclasses) has entries through its validating
constructor, its `from_arrays` and a product; `test_the_catalog_covers_every_format_and_category`
keeps it so when a format is added.

Not entries, by design: bf16 x with an f32 weight (promoted to f32, as `jnp.matmul` does), NaN
weights given to `fromdense` of a non-quantised format (kept, and they propagate as in a dense
product; only int4 refuses them, a NaN having no code), a float64 NumPy array without x64 (JAX
makes every float64 input float32). The format modules' own tests check the same refusals in
more depth (tests/formats, tests/ops, tests/nn, tests/test_io.py); this file is the one list
across formats.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from functools import cached_property
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import Primitive

import jaxsparse as jsp
from jaxsparse.formats import SparseFormat
from tests.test_io import record_edit, rewrite

pytestmark = pytest.mark.cpu_only  # Argument checks: no kernel runs, emulated or not.

S = jax.ShapeDtypeStruct
F32, F16, U8, I32 = jnp.float32, jnp.float16, jnp.uint8, jnp.int32

CATEGORIES = ("dtype", "shape", "position", "derived", "non-finite", "mask", "spec", "product",
              "op", "layer", "checkpoint", "permutation", "runtime")
#: Entry points a format's entries go through (`Bad.via`).
VIAS = ("constructor", "from_arrays", "fromdense", "frommask", "from_codes", "replace",
        "packing", "product", "op", "layer", "file", "spec", "prune", "runtime")
#: Issue 15 asks for at least 30; the catalog keeps at least this many.
MIN_ENTRIES = 40


class Bad(NamedTuple):
    """One malformed input: `call(weights)` must raise `error` with a message matching `match`."""

    subject: str  # The format class (by name) or the entry point the input is given to.
    via: str  # How: one of VIAS.
    category: str  # What is wrong: one of CATEGORIES.
    call: Callable
    error: type
    match: str


def case(id_, subject, via, category, call, error, match):
    return pytest.param(Bad(subject, via, category, call, error, match), id=id_)


# ====================================================================== the weights
def _jitted(fn, *args):
    """`fn(*args)` as one compiled program: a few times faster to build than op by op."""
    return jax.jit(fn)(*args)


class Weights:
    """One small valid weight of every format (and what the entries derive from them), built
    lazily, once per worker, outside any trace."""

    def __init__(self, tmp):
        self.tmp = tmp

    @cached_property
    def w(self):
        return jnp.asarray(np.random.default_rng(0).standard_normal((64, 64)), F32)

    @cached_property
    def w16(self):  # MARLIN's tiles: in a multiple of 128 for 2:4, out of 64; f16 scales.
        return jnp.asarray(np.random.default_rng(1).standard_normal((128, 64)), F16)

    @cached_property
    def nm(self):
        return _jitted(lambda w: jsp.fromdense(w, "2:4"), self.w)

    @cached_property
    def vnm(self):
        return _jitted(lambda w: jsp.fromdense(w, jsp.VNM(16, 2, 8)), self.w)

    @cached_property
    def nm_stack(self):  # A stack of three weights [3, 64, 64].
        return _jitted(lambda w: jsp.fromdense(jnp.stack([w, -w, 2 * w]), "2:4"), self.w)

    @cached_property
    def tiled(self):
        return _jitted(lambda w: w.with_tiles(), self.vnm)

    @cached_property
    def blocks(self):
        return _jitted(lambda w: jsp.fromdense(w, jsp.Blocks(16, 0.25)), self.w)

    @cached_property
    def int4(self):
        return _jitted(lambda w: jsp.fromdense(w, jsp.Int4(32)), self.w)

    @cached_property
    def int4_nm(self):
        return _jitted(lambda w: jsp.fromdense(w, jsp.Int4(32, jsp.NM(2, 4))), self.w)

    @cached_property
    def lines(self):
        return _jitted(lambda w: w.with_lines(), self.int4)

    @cached_property
    def nm_lines(self):
        return _jitted(lambda w: w.with_lines(), self.int4_nm)

    @cached_property
    def marlin(self):
        return _jitted(lambda w: jsp.fromdense(w, jsp.Int4(32)).packed_for("cuda"), self.w16)

    @cached_property
    def nm_marlin(self):
        return _jitted(lambda w: jsp.fromdense(w, jsp.Int4(32, jsp.NM(2, 4))).packed_for("cuda"),
                       self.w16)

    @cached_property
    def saved(self):
        path = self.tmp / "model.safetensors"
        jsp.save_safetensors(path, {"nm": self.nm, "int4": self.int4})
        return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return Weights(tmp_path_factory.mktemp("malformed"))


# ====================================================================== helpers for entries
def host(a, dtype):
    """`a` as a NumPy array of `dtype` (no eager JAX op to compile)."""
    return np.asarray(a).astype(dtype)


def edited(a, index, value, dtype=None):
    """A NumPy copy of `a` with `a[index] = value`."""
    a = np.array(a, dtype=dtype)
    a[index] = value
    return a


def build(cls, weight, **changes):
    """`cls(**arrays, **static)` with some of `weight`'s arrays or static fields changed."""
    static = {name: getattr(weight, name) for name in weight.static_names()}
    arrays = weight.arrays()
    for name, value in changes.items():
        (arrays if name in arrays else static)[name] = value
    return cls(**arrays, **static)


def from_arrays(cls, spec, in_features, weight, **kwargs):
    """`cls.from_arrays(spec, in_features, weight's arrays)`: a weight's arrays under another
    spec or size (what a mismatched checkpoint gives)."""
    return cls.from_arrays(spec, in_features, weight.arrays(), **kwargs)


def product(name, shape, dtype=F32):
    """`x @ weights.<name>` for an abstract x: refused by abstract evaluation, or not at all."""
    def run(k):
        w = getattr(k, name)  # Built outside the trace.
        return jax.eval_shape(lambda x: x @ w, S(shape, dtype))
    return run


def abstract(fn, x, w):
    """`jax.eval_shape(fn, x)` with the concrete weight `w` closed over (built before tracing:
    a weight first built inside the trace would be made of tracers)."""
    return jax.eval_shape(lambda x: fn(x, w), x)


def lowered(w, x):
    """`x @ w` lowered for the CPU (no compilation, no run)."""
    return jax.jit(lambda x: x @ w).lower(x)


def x64(call):
    """`call` with float64 enabled (without it JAX turns every float64 input into float32)."""
    def run(k):
        with jax.enable_x64(True):
            return call(k)
    return run


def op(fn, *operands, **params):
    """`jaxsparse.ops.<fn>(*operands, **params)` on abstract operands `(shape, dtype)`."""
    return lambda k: jax.eval_shape(functools.partial(fn, **params),
                                    *(S(shape, dtype) for shape, dtype in operands))


def repeated_block(k):
    """The blocks' indices with one block repeating its predecessor inside a block row."""
    indices, indptr = np.array(k.blocks.indices), np.asarray(k.blocks.indptr)
    row = int(np.argmax(np.diff(indptr) >= 2))
    p = int(indptr[row]) + 1
    indices[p] = indices[p - 1]
    return indices


def codes_of(wq):
    """An Int4Weight's integer codes `[in, out]` (int8), unpacked on the host."""
    q = np.asarray(wq.qweight)  # uint8: inputs 2j and 2j+1 in the low and high nibbles.
    return (np.stack([q & 15, q >> 4], axis=-2).reshape(wq.shape).astype(np.int8) - 8)


def nm_codes(positions_edit=None, dtype=np.int32):
    """Int4NMWeight.from_codes's operands for in=64, out=8: zero codes, positions (0, 1) in every
    group (then `positions_edit(positions)`), unit scales."""
    positions = np.tile(np.array([[0], [1]]), (16, 8)).astype(dtype)
    if positions_edit is not None:
        positions = positions_edit(positions)
    return np.zeros((32, 8), np.int8), positions, np.ones((2, 8), np.float32)


def restored_layer_of_another_pattern(k):
    """A 1:4 layer updated with a 2:4 layer's state (a checkpoint of another pattern), called;
    all of it abstractly (the layers' arrays are never computed)."""
    def run(x):
        layer = jsp.nn.SparseLinear(16, 8, sparsity="1:4", rngs=nnx.Rngs(0))
        nnx.update(layer, nnx.state(jsp.nn.SparseLinear(16, 8, sparsity="2:4",
                                                        rngs=nnx.Rngs(0))))
        return layer(x)
    return jax.eval_shape(run, S((2, 16), F32))


def truncated_file(k):
    path = k.tmp / "cut.safetensors"
    path.write_bytes(k.saved.read_bytes()[:-7])
    return jsp.load_safetensors(path)


def file_with_nan_scale(k):
    bad = jsp.Int4Weight.from_arrays(
        k.int4.spec, 64, {**k.int4.arrays(), "scales": edited(k.int4.scales, (0, 0), np.nan)},
        validate=False)
    path = k.tmp / "nan.safetensors"
    jsp.save_safetensors(path, {"int4": bad})
    return jsp.load_safetensors(path)


def bogus_matmul_path(k):
    jsp.matmul_path("bogus")  # Refused at the call, before any `with`.


# ====================================================================== the catalog
NM, VNM, BLK = jsp.NMSparse, jsp.VNMSparse, jsp.BlocksSparse
TILED, I4, I4NM = jsp.VNMSparseTiled, jsp.Int4Weight, jsp.Int4NMWeight
LINES, NMLINES = jsp.Int4LinesWeight, jsp.Int4NMLinesWeight
MARLIN, NMMARLIN = jsp.Int4MarlinWeight, jsp.Int4NMMarlinWeight
FLOATS = r"float32, bfloat16, float16"

MALFORMED = [
    # ------------------------------------------------------------------ N:M
    case("nm-int-values", "NMSparse", "constructor", "dtype",
         lambda k: build(NM, k.nm, values=host(k.nm.values, np.int32)), TypeError,
         rf"NMSparse: values must have dtype {FLOATS}; got int32"),
    case("nm-float-indices", "NMSparse", "constructor", "dtype",
         lambda k: build(NM, k.nm, indices=host(k.nm.indices, np.float32), indices_2bit=None),
         TypeError, r"NMSparse: indices must be an integer array, got float32"),
    case("nm-f64-values", "NMSparse", "from_arrays", "dtype",
         x64(lambda k: NM.from_arrays(jsp.NM(2, 4), 64, {
             **k.nm.arrays(), "values": np.asarray(k.nm.values, np.float64)})),
         TypeError, rf"NMSparse: values must have dtype {FLOATS}; got float64"),
    case("nm-index-not-below-m", "NMSparse", "constructor", "position",
         lambda k: build(NM, k.nm, indices=edited(k.nm.indices, (0, 0), 4), indices_2bit=None),
         ValueError, r"NMSparse: indices must be positions in \[0, 4\); got 4 at index \(0, 0\)"),
    case("nm-repeated-position", "NMSparse", "constructor", "position",
         lambda k: build(NM, k.nm, indices=edited(k.nm.indices, (3, slice(0, 2)), 1),
                         indices_2bit=None),
         ValueError, r"indices must be strictly increasing inside each group of 2 \(distinct, "
                     r"sorted positions\); group \(3, 0\) holds \[1, 1\]"),
    case("nm-kept-width", "NMSparse", "constructor", "shape",
         lambda k: build(NM, k.nm, in_features=72), ValueError,
         r"values must have last dimension ceil\(in_features/m\)\*n = ceil\(72/4\)\*2 = 36; got "
         r"shape \(64, 32\)"),
    case("nm-rank-1", "NMSparse", "constructor", "shape",
         lambda k: NM(k.nm.values[0], k.nm.indices[0], n=2, m=4, in_features=64), ValueError,
         r"values must have at least 2 dimensions \(\[\.\.\., out, kept\]\); got shape \(32,\)"),
    case("nm-2bit-disagrees", "NMSparse", "constructor", "derived",
         lambda k: build(NM, k.nm, indices_2bit=np.zeros((64, 8), np.uint8)), ValueError,
         r"NMSparse: indices_2bit does not hold indices at 2 bits"),
    case("nm-arrays-of-2:4-as-1:4", "NMSparse", "from_arrays", "shape",
         lambda k: from_arrays(NM, jsp.NM(1, 4), 64, k.nm), ValueError,
         r"values must have last dimension ceil\(in_features/m\)\*n = ceil\(64/4\)\*1 = 16"),
    case("nm-replace-indices-out-of-range", "NMSparse", "replace", "position",
         lambda k: k.nm.replace(indices=np.full((64, 32), 7, np.uint8)), ValueError,
         r"NMSparse: indices must be positions in \[0, 4\); got 7"),
    case("nm-mask-three-of-four", "NMSparse", "frommask", "mask",
         lambda k: NM.frommask(k.w, edited(np.zeros((64, 64), bool), (slice(0, 3), 0), True),
                               n=2, m=4),
         ValueError, r"frommask: mask keeps 3 entries in the group of inputs \[0, 4\) of output "
                     r"0; the 2:4 pattern allows at most 2"),
    case("nm-float-mask", "NMSparse", "frommask", "dtype",
         lambda k: NM.frommask(k.w, np.ones((64, 64), np.float32), n=2, m=4), TypeError,
         r"frommask: mask must be a bool array, got float32"),
    case("nm-mask-shape", "NMSparse", "frommask", "shape",
         lambda k: NM.frommask(k.w, np.ones((64, 63), bool), n=2, m=4), ValueError,
         r"mask must have the shape of w \(64, 64\); got \(64, 63\)"),
    case("nm-fromdense-1d", "NMSparse", "fromdense", "shape",
         lambda k: jsp.fromdense(jnp.ones(64), "2:4"), ValueError,
         r"NMSparse.fromdense: w must have at least 2 dimensions \(\[\.\.\., in, out\]\); got "
         r"shape \(64,\)"),
    case("nm-fromdense-int", "NMSparse", "fromdense", "dtype",
         lambda k: jsp.fromdense(jnp.ones((8, 4), I32), "2:4"), TypeError,
         rf"NMSparse.fromdense: w must have dtype {FLOATS}; got int32"),
    # ------------------------------------------------------------------ V:N:M
    case("vnm-column-not-below-m", "VNMSparse", "constructor", "position",
         lambda k: build(VNM, k.vnm, columns=edited(k.vnm.columns, (0, 3), 8)), ValueError,
         r"VNMSparse: columns must be positions in \[0, 8\); got 8 at index \(0, 3\)"),
    case("vnm-slot-not-below-4", "VNMSparse", "constructor", "position",
         lambda k: build(VNM, k.vnm, indices=edited(k.vnm.indices, (0, 1), 4)), ValueError,
         r"VNMSparse: indices must be slots in \[0, 4\); got 4 at index \(0, 1\)"),
    case("vnm-repeated-column", "VNMSparse", "constructor", "position",
         lambda k: build(VNM, k.vnm, columns=edited(k.vnm.columns, (1, slice(4, 8)), [0, 0, 1, 2])),
         ValueError, r"columns must be strictly increasing inside each group of 4 .*holds "
                     r"\[0, 0, 1, 2\]"),
    case("vnm-float-columns", "VNMSparse", "constructor", "dtype",
         lambda k: build(VNM, k.vnm, columns=host(k.vnm.columns, np.float32)), TypeError,
         r"VNMSparse: columns must be an integer array, got float32"),
    case("vnm-columns-shape", "VNMSparse", "constructor", "shape",
         lambda k: build(VNM, k.vnm, columns=k.vnm.columns[:-1]), ValueError,
         r"VNMSparse: columns must have shape \(4, 32\) .*; got \(3, 32\)"),
    case("vnm-arrays-of-v16-as-v32", "VNMSparse", "from_arrays", "shape",
         lambda k: from_arrays(VNM, jsp.VNM(32, 2, 8), 64, k.vnm), ValueError,
         r"VNMSparse: columns must have shape \(2, 32\) \(out=64, in_features=64, spec 32:2:8"),
    case("vnm-mask-five-inputs-in-a-panel", "VNMSparse", "frommask", "mask",
         lambda k: VNM.frommask(k.w, edited(np.zeros((64, 64), bool), (range(5), range(5)), True),
                                v=16, n=2, m=8),
         ValueError, r"mask uses 5 inputs of the group \[0, 8\) in the panel of outputs \[0, 16\); "
                     r"the 16:2:8 pattern allows 4 per panel and group"),
    # ------------------------------------------------------------------ V:N:M with tiles
    case("tiled-stale-tiles", "VNMSparseTiled", "constructor", "derived",
         lambda k: build(TILED, k.tiled, tiles=np.asarray(k.tiled.tiles) + 1), ValueError,
         r"VNMSparseTiled: tiles must be the values' packing \(vnm_pack_tiles\)"),
    case("tiled-tiles-shape", "VNMSparseTiled", "constructor", "shape",
         lambda k: build(TILED, k.tiled, tiles=k.tiled.tiles[..., :-1]), ValueError,
         r"VNMSparseTiled: tiles must be float32 of shape \(4, 1, \d+, \d+\) \(vnm_pack_tiles "
         r"of the values, each panel's words as \[A, S, W\]\); got float32 \(4, 1, \d+, \d+\)"),
    case("tiled-f16", "VNMSparseTiled", "packing", "dtype",
         lambda k: k.vnm.astype(F16).with_tiles(), TypeError,
         r"with_tiles: tiles are packed for bfloat16 or float32 values .*got float16"),
    case("tiled-replace-tiles", "VNMSparseTiled", "replace", "derived",
         lambda k: k.tiled.replace(tiles=k.tiled.tiles), TypeError,
         r"VNMSparseTiled.replace: tiles are derived from the values; replace values"),
    case("tiled-arrays-of-n2-as-n1", "VNMSparseTiled", "from_arrays", "shape",
         lambda k: from_arrays(TILED, jsp.VNM(16, 1, 8), 64, k.tiled), ValueError,
         r"VNMSparse: values must have shape \(64, 8\) \(out=64, in_features=64, spec "
         r"16:1:8"),
    # ------------------------------------------------------------------ 1xN blocks
    case("blocks-indptr-goes-down", "BlocksSparse", "constructor", "position",
         lambda k: build(BLK, k.blocks, indptr=np.array([0, 40, 20, 50, 64], np.int32)),
         ValueError, r"BlocksSparse: indptr must run from 0 to nnz=64, non-decreasing; got "
                     r"\[0, 40, 20, 50, 64\]"),
    case("blocks-column-not-below-in", "BlocksSparse", "constructor", "position",
         lambda k: build(BLK, k.blocks, indices=edited(k.blocks.indices, -1, 64)), ValueError,
         r"BlocksSparse: indices must be inputs in \[0, 64\); got 64 at block 63"),
    case("blocks-repeated-block", "BlocksSparse", "constructor", "position",
         lambda k: build(BLK, k.blocks, indices=repeated_block(k)), ValueError,
         r"indices must be strictly increasing inside each block row \(distinct, sorted "
         r"inputs\); block \d+ holds input (\d+) after \1"),
    case("blocks-float-indptr", "BlocksSparse", "constructor", "dtype",
         lambda k: build(BLK, k.blocks, indptr=host(k.blocks.indptr, np.float32)), TypeError,
         r"BlocksSparse: indptr must be an integer array, got float32"),
    case("blocks-arrays-of-64-outputs-as-80", "BlocksSparse", "from_arrays", "shape",
         lambda k: from_arrays(BLK, k.blocks.spec, 64, k.blocks, out_features=80), ValueError,
         r"BlocksSparse: values must have shape \(80, 16\) \(in_features=64, out_features=80"),
    case("blocks-mask-splits-a-block", "BlocksSparse", "frommask", "mask",
         lambda k: BLK.frommask(k.w, edited(np.zeros((64, 64), bool), (0, slice(0, 8)), True),
                                n=16, density=0.25),
         ValueError, r"mask breaks a 1x16 block: input 0, outputs \[0, 16\) are partly kept"),
    case("blocks-mask-too-many-blocks", "BlocksSparse", "frommask", "mask",
         lambda k: BLK.frommask(k.w, np.ones((64, 64), bool), n=16, density=0.25), ValueError,
         r"mask keeps 256 blocks; 1x16@0.25 allows at most 64 of 256"),
    case("blocks-fromdense-no-inputs", "BlocksSparse", "fromdense", "shape",
         lambda k: jsp.fromdense(jnp.ones((0, 16)), jsp.Blocks(16, 0.5)), ValueError,
         r"w must have at least one input and one output; got shape \(0, 16\)"),
    # ------------------------------------------------------------------ int4
    case("int4-int8-qweight", "Int4Weight", "constructor", "dtype",
         lambda k: build(I4, k.int4, qweight=host(k.int4.qweight, np.int8)), TypeError,
         r"Int4Weight: qweight must be uint8 \(packed nibbles\), got int8"),
    case("int4-int-scales", "Int4Weight", "constructor", "dtype",
         lambda k: build(I4, k.int4, scales=host(k.int4.scales, np.int32)), TypeError,
         rf"Int4Weight: scales must have dtype {FLOATS}; got int32"),
    case("int4-scales-shape", "Int4Weight", "constructor", "shape",
         lambda k: build(I4, k.int4, scales=k.int4.scales[:1]), ValueError,
         r"scales must have shape \(2, 64\) \(\[\.\.\., in/group_size, out\]\); got \(1, 64\)"),
    case("int4-nan-scale", "Int4Weight", "constructor", "non-finite",
         lambda k: build(I4, k.int4, scales=edited(k.int4.scales, (1, 5), np.nan)), ValueError,
         r"Int4Weight: scales must be finite; got nan at index \(1, 5\)"),
    case("int4-inf-scale", "Int4Weight", "from_codes", "non-finite",
         lambda k: I4.from_codes(codes_of(k.int4), edited(k.int4.scales, (0, 2), np.inf),
                                 group_size=32),
         ValueError, r"Int4Weight: scales must be finite; got inf at index \(0, 2\)"),
    case("int4-code-out-of-range", "Int4Weight", "from_codes", "position",
         lambda k: I4.from_codes(edited(codes_of(k.int4), (0, 0), 9), k.int4.scales, group_size=32),
         ValueError, r"from_codes: codes must be in \[-8, 7\]; got values in \[-\d, 9\]"),
    case("int4-float-codes", "Int4Weight", "from_codes", "dtype",
         lambda k: I4.from_codes(codes_of(k.int4).astype(np.float32), k.int4.scales, group_size=32),
         TypeError, r"from_codes: codes must be an integer array in \[-8, 7\], got float32"),
    case("int4-nan-weight", "Int4Weight", "fromdense", "non-finite",
         lambda k: jsp.fromdense(k.w.at[3, 2].set(jnp.nan), jsp.Int4(32)), ValueError,
         r"Int4Weight.fromdense: w must be finite to be quantised; got nan at index \(3, 2\)"),
    case("int4-in-not-a-multiple-of-the-group", "Int4Weight", "fromdense", "shape",
         lambda k: jsp.fromdense(k.w[:48], jsp.Int4(32)), ValueError,
         r"Int4Weight.fromdense: in=48 is not a multiple of group_size=32"),
    case("int4-arrays-of-64-inputs-as-128", "Int4Weight", "from_arrays", "shape",
         lambda k: from_arrays(I4, k.int4.spec, 128, k.int4), ValueError,
         r"Int4Weight: qweight must have shape \[\.\.\., 64, 64\]; got \(32, 64\)"),
    # ------------------------------------------------------------------ int4 + 2:4
    case("int4nm-repeated-position", "Int4NMWeight", "constructor", "position",
         lambda k: build(I4NM, k.int4_nm, positions=np.zeros((8, 64), np.uint8)), ValueError,
         r"Int4NMWeight: positions must hold two increasing positions per group of 4 inputs "
         r"\(p0 < p1\); byte \(0, 0\) \(nibble 0\) holds p0=0, p1=0"),
    case("int4nm-position-out-of-range", "Int4NMWeight", "from_codes", "position",
         lambda k: I4NM.from_codes(*nm_codes(lambda p: edited(p, (1, 0), 5)), group_size=32),
         ValueError, r"from_codes: positions must be in \[0, 3\] \(inside each group of 4 "
                     r"inputs\); got values in \[0, 5\]"),
    case("int4nm-float-positions", "Int4NMWeight", "from_codes", "dtype",
         lambda k: I4NM.from_codes(*nm_codes(dtype=np.float32), group_size=32), TypeError,
         r"from_codes: positions must be an integer array in \[0, 3\], got float32"),
    case("int4nm-positions-shape", "Int4NMWeight", "constructor", "shape",
         lambda k: build(I4NM, k.int4_nm, positions=k.int4_nm.positions[:-1]), ValueError,
         r"Int4NMWeight: positions must have shape \[\.\.\., 8, 64\]; got \(7, 64\)"),
    case("int4nm-nan-scale", "Int4NMWeight", "constructor", "non-finite",
         lambda k: build(I4NM, k.int4_nm, scales=edited(k.int4_nm.scales, (0, 0), np.nan)),
         ValueError, r"Int4NMWeight: scales must be finite; got nan at index \(0, 0\)"),
    case("int4nm-mask-three-of-four", "Int4NMWeight", "frommask", "mask",
         lambda k: I4NM.frommask(k.w, edited(np.zeros((64, 64), bool), (slice(4, 7), 2), True),
                                 group_size=32),
         ValueError, r"mask keeps 3 entries in the group of inputs \[4, 8\) of output 2; the 2:4 "
                     r"pattern allows at most 2"),
    case("int4nm-in-not-a-multiple-of-8", "Int4NMWeight", "fromdense", "shape",
         lambda k: jsp.fromdense(k.w[:36], jsp.Int4(None, jsp.NM(2, 4))), ValueError,
         r"Int4NMWeight.fromdense: in=36 must be a positive multiple of 8"),
    case("int4nm-arrays-under-a-dense-spec", "Int4NMWeight", "from_arrays", "spec",
         lambda k: from_arrays(I4NM, jsp.Int4(32), 64, k.int4_nm), ValueError,
         r"Int4NMWeight: Int4NMWeight holds int4 \+ 2:4; got int4:g32"),
    # ------------------------------------------------------------------ int4 lines
    case("lines-rows", "Int4LinesWeight", "constructor", "shape",
         lambda k: build(LINES, k.lines, lines=k.lines.lines[:, :-1]), ValueError,
         r"Int4LinesWeight: lines must have shape \(1, 32, 64\) .*; got \(1, 31, 64\)"),
    case("lines-nan-scale", "Int4LinesWeight", "constructor", "non-finite",
         lambda k: build(LINES, k.lines, scales=edited(k.lines.scales, (0, 63), np.nan)),
         ValueError, r"Int4LinesWeight: scales must be finite; got nan at index \(0, 63\)"),
    case("lines-int8-activations", "Int4LinesWeight", "constructor", "spec",
         lambda k: build(LINES, k.lines, activations="int8"), ValueError,
         r"Int4LinesWeight: int8 activations read the canonical layout"),
    case("lines-of-a-2:4-weight", "Int4LinesWeight", "packing", "spec",
         lambda k: LINES.from_canonical(k.int4_nm), TypeError,
         r"the lines hold a dense int4 weight \(Int4Weight\); got Int4NMWeight"),
    case("lines-arrays-under-a-2:4-spec", "Int4LinesWeight", "from_arrays", "spec",
         lambda k: from_arrays(LINES, jsp.Int4(32, jsp.NM(2, 4)), 64, k.lines), ValueError,
         r"Int4LinesWeight: Int4Weight holds dense int4; got int4:g32\+2:4"),
    case("nm-lines-index-byte", "Int4NMLinesWeight", "constructor", "position",
         lambda k: build(NMLINES, k.nm_lines, lines=edited(k.nm_lines.lines, (0, 4, 1), 0)),
         ValueError, r"Int4NMLinesWeight: lines hold an index byte that is not \(4 j \+ p0\) \| "
                     r"\(4 j \+ p1\) << 4 with p0 < p1"),
    case("nm-lines-int8-lines", "Int4NMLinesWeight", "constructor", "dtype",
         lambda k: build(NMLINES, k.nm_lines, lines=host(k.nm_lines.lines, np.int8)),
         TypeError, r"Int4NMLinesWeight: lines must be uint8 \(packed nibbles\), got int8"),
    case("nm-lines-inf-scale", "Int4NMLinesWeight", "constructor", "non-finite",
         lambda k: build(NMLINES, k.nm_lines, scales=edited(k.nm_lines.scales, (1, 0), -np.inf)),
         ValueError, r"Int4NMLinesWeight: scales must be finite; got -inf at index \(1, 0\)"),
    case("nm-lines-arrays-under-a-dense-spec", "Int4NMLinesWeight", "from_arrays", "spec",
         lambda k: from_arrays(NMLINES, jsp.Int4(32), 64, k.nm_lines), ValueError,
         r"Int4NMLinesWeight: Int4NMWeight holds int4 \+ 2:4; got int4:g32"),
    # ------------------------------------------------------------------ int4 MARLIN layouts
    case("marlin-f32-scales", "Int4MarlinWeight", "packing", "dtype",
         lambda k: k.int4.packed_for("cuda"), TypeError,
         r"scales must be bfloat16 or float16 \(the MARLIN kernel's tensor-core dtypes\); got "
         r"float32"),
    case("marlin-a-stack", "Int4MarlinWeight", "packing", "shape",
         lambda k: _jitted(lambda w: jsp.fromdense(jnp.stack([w, w]), jsp.Int4(32)),
                           k.w16).packed_for("cuda"),
         ValueError, r"packed_for: the CUDA layout holds one weight \[in, out\]; got a stack of "
                     r"shape \(2, 128, 64\)"),
    case("marlin-in-features", "Int4MarlinWeight", "constructor", "shape",
         lambda k: build(MARLIN, k.marlin, in_features=64), ValueError,
         r"Int4MarlinWeight: packed_qweight holds in_features = 128; got in_features=64"),
    case("marlin-nan-scale", "Int4MarlinWeight", "constructor", "non-finite",
         lambda k: build(MARLIN, k.marlin,
                         packed_scales=edited(k.marlin.packed_scales, (2, 7), np.nan)),
         ValueError, r"Int4MarlinWeight: packed_scales must be finite; got nan at index \(2, 7\)"),
    case("marlin-arrays-with-int8-activations", "Int4MarlinWeight", "from_arrays", "spec",
         lambda k: from_arrays(MARLIN, jsp.Int4(32, activations="int8"), 128, k.marlin),
         ValueError, r"Int4MarlinWeight: int8 activations run on the CPU kernels only"),
    case("marlin-device", "Int4MarlinWeight", "packing", "spec",
         lambda k: k.marlin.packed_for("tpu"), ValueError,
         r"Int4MarlinWeight.packed_for: device must be one of \('cpu', 'cuda'\); got 'tpu'"),
    case("marlin-product-on-the-cpu", "Int4MarlinWeight", "product", "product",
         lambda k: lowered(k.marlin, S((2, 128), F16)), ValueError,
         r"was packed for CUDA .*and cannot run on the CPU"),
    case("nm-marlin-meta-rows", "Int4NMMarlinWeight", "constructor", "shape",
         lambda k: build(NMMARLIN, k.nm_marlin, packed_meta=k.nm_marlin.packed_meta[:-1]),
         ValueError, r"Int4NMMarlinWeight: packed_meta must be \[in/32, out\] = \[4, 64\]; got "
                     r"\[3, 64\]"),
    case("nm-marlin-meta-dtype", "Int4NMMarlinWeight", "constructor", "dtype",
         lambda k: build(NMMARLIN, k.nm_marlin,
                         packed_meta=host(k.nm_marlin.packed_meta, np.uint8)),
         TypeError, r"Int4NMMarlinWeight: packed_meta must be int32"),
    case("nm-marlin-meta-repeats-a-position", "Int4NMMarlinWeight", "constructor", "position",
         lambda k: build(NMMARLIN, k.nm_marlin,
                         packed_meta=np.full(k.nm_marlin.packed_meta.shape, -1, np.int32)),
         ValueError, r"packed_meta must name two distinct positions per group of 4 inputs"),
    case("nm-marlin-group", "Int4NMMarlinWeight", "constructor", "spec",
         lambda k: build(NMMARLIN, k.nm_marlin, group_size=16), ValueError,
         r"Int4NMMarlinWeight: group_size must be None \(one scale per output column\) or a "
         r"multiple of 32"),
    case("nm-marlin-inf-scale", "Int4NMMarlinWeight", "constructor", "non-finite",
         lambda k: build(NMMARLIN, k.nm_marlin,
                         packed_scales=edited(k.nm_marlin.packed_scales, (0, 1), np.inf)),
         ValueError, r"Int4NMMarlinWeight: packed_scales must be finite; got inf"),
    case("nm-marlin-arrays-under-a-dense-spec", "Int4NMMarlinWeight", "from_arrays", "spec",
         lambda k: from_arrays(NMMARLIN, jsp.Int4(32), 128, k.nm_marlin), ValueError,
         r"Int4NMMarlinWeight: Int4NMWeight holds int4 \+ 2:4; got int4:g32"),
    case("nm-marlin-product-on-the-cpu", "Int4NMMarlinWeight", "product", "product",
         lambda k: lowered(k.nm_marlin, S((2, 128), F16)), ValueError,
         r"was packed for CUDA .*and cannot run on the CPU"),
    # ------------------------------------------------------------------ specs
    case("spec-nm-5:4", "spec", "spec", "spec",
         lambda k: jsp.fromdense(k.w, jsp.NM(5, 4)), ValueError,
         r"fromdense: spec: n must be in \[1, 3\], got 5 \(invalid spec NM\(n=5, m=4\)\)"),
    case("spec-nm-float-m", "spec", "spec", "spec",
         lambda k: jsp.as_spec(jsp.NM(2, 4.0)), TypeError,
         r"sparsity: m must be an int, got float 4.0"),
    case("spec-blocks-without-density", "spec", "spec", "spec",
         lambda k: jsp.Blocks(3), TypeError, r"missing 1 required positional argument: 'density'"),
    case("spec-blocks-1x3", "spec", "spec", "spec",
         lambda k: jsp.fromdense(k.w, jsp.Blocks(3, 0.5)), ValueError,
         r"spec: n must be one of \(4, 8, 16, 32\) \(outputs per block\); got 3"),
    case("spec-blocks-density-1.5", "spec", "spec", "spec",
         lambda k: jsp.fromdense(k.w, jsp.Blocks(16, density=1.5)), ValueError,
         r"spec: density must be in \(0, 1\] \(the fraction of blocks kept\); got 1.5"),
    case("spec-blocks-density-string", "spec", "spec", "spec",
         lambda k: jsp.as_spec(jsp.Blocks(16, "0.5")), TypeError,
         r"density must be a number in \(0, 1\]; got str '0.5'"),
    case("spec-vnm-v-20", "spec", "spec", "spec",
         lambda k: jsp.fromdense(k.w, jsp.VNM(20, 2, 8)), ValueError,
         r"spec: v must be a multiple of 16 \(whole 16-row tiles .*got 20"),
    case("spec-vnm-n-3", "spec", "spec", "spec",
         lambda k: jsp.as_spec("64:3:8"), ValueError, r"sparsity: n must be in \[1, 2\], got 3"),
    case("spec-vnm-m-2", "spec", "spec", "spec",
         lambda k: jsp.as_spec(jsp.VNM(16, 1, 2)), ValueError,
         r"sparsity: m must be in \[4, 64\], got 2"),
    case("spec-int4-group-100", "spec", "spec", "spec",
         lambda k: jsp.fromdense(k.w, jsp.Int4(100)), ValueError,
         r"spec: group_size must be a multiple of 8 .*got 100"),
    case("spec-int4-with-1:4", "spec", "spec", "spec",
         lambda k: jsp.as_spec(jsp.Int4(128, jsp.NM(1, 4))), ValueError,
         r"sparsity: sparsity must be None or jaxsparse.NM\(2, 4\) .*got NM\(n=1, m=4\)"),
    case("spec-int4-a8-with-2:4", "spec", "spec", "spec",
         lambda k: jsp.as_spec(jsp.Int4(128, jsp.NM(2, 4), "int8")), ValueError,
         r"activations='int8' is for the dense int4 form; got it with sparsity=2:4"),
    case("spec-unparsable-string", "spec", "spec", "spec",
         lambda k: jsp.as_spec("2:4:8:1"), ValueError, r"sparsity must be a spec .*got '2:4:8:1'"),
    case("spec-not-a-spec", "spec", "spec", "spec",
         lambda k: jsp.fromdense(k.w, 0.5), TypeError,
         r"fromdense: spec must be a spec .*got float 0.5"),
    # ------------------------------------------------------------------ products
    case("x-last-dim", "NMSparse", "product", "product", product("nm", (2, 63)), ValueError,
         r"matmul: x must have last dimension 64 \(w's `in`.*got x with shape \(2, 63\)"),
    case("x-int32", "NMSparse", "product", "product", product("nm", (2, 64), I32), TypeError,
         r"matmul: x must be a float array, got dtype int32"),
    case("x-f64", "NMSparse", "product", "product", x64(product("nm", (2, 64), jnp.float64)),
         TypeError, rf"matmul: x must have dtype {FLOATS}; got float64"),
    case("x-rank-0", "VNMSparse", "product", "product", product("vnm", ()), ValueError,
         r"matmul: x must have last dimension 64 .*got x with shape \(\)"),
    case("x-last-dim-tiled", "VNMSparseTiled", "product", "product", product("tiled", (5, 32)),
         ValueError, r"matmul: x must have last dimension 64 .*got x with shape \(5, 32\)"),
    case("x-bool", "BlocksSparse", "product", "product", product("blocks", (2, 64), jnp.bool_),
         TypeError, r"matmul: x must be a float array, got dtype bool"),
    case("x-last-dim-int4", "Int4Weight", "product", "product", product("int4", (3, 4, 65)),
         ValueError, r"matmul: x must have last dimension 64 .*got x with shape \(3, 4, 65\)"),
    case("x-int8-int4nm", "Int4NMWeight", "product", "product",
         product("int4_nm", (2, 64), jnp.int8), TypeError,
         r"matmul: x must be a float array, got dtype int8"),
    case("x-f64-lines", "Int4LinesWeight", "product", "product",
         x64(product("lines", (1, 64), jnp.float64)), TypeError,
         rf"matmul: x must have dtype {FLOATS}; got float64"),
    case("x-last-dim-nm-lines", "Int4NMLinesWeight", "product", "product",
         product("nm_lines", (1, 128)), ValueError, r"matmul: x must have last dimension 64"),
    case("x-stack-mismatch", "NMSparse", "product", "product", product("nm_stack", (2, 5, 64)),
         ValueError, r"matmul: x's leading dims \(2,\) \(all but its last two, of shape "
         r"\(2, 5, 64\)\) must broadcast with w's stack dims \(3,\)"),
    case("w-not-a-format", "matmul", "product", "product",
         lambda k: abstract(lambda x, w: jsp.matmul(x, w), S((2, 64), F32), k.w), TypeError,
         r"matmul: w must be a jaxsparse sparse format .*got ArrayImpl"),
    case("w-on-the-left", "NMSparse", "product", "product",
         lambda k: abstract(lambda x, w: w @ x, S((64, 2), F32), k.nm), TypeError,
         r"NMSparse @ x is not supported: .*x @ ws"),
    case("matmul-path", "matmul", "product", "product",
         lambda k: abstract(lambda x, w: jsp.matmul(x, w, path="bogus"), S((2, 64), F32), k.nm),
         ValueError, r"matmul: path must be one of 'auto', 'sparse', 'engine', 'dense'; got "
                     r"'bogus'"),
    # ------------------------------------------------------------------ the ops, directly
    case("op-nm_spmm-n-5", "ops", "op", "op",
         op(jsp.ops.nm_spmm, ((1, 3, 16), F32), ((1, 8, 20), F32), ((1, 8, 20), U8), n=5, m=4),
         ValueError, r"nm_spmm: n must be in \[1, 3\], got 5"),
    case("op-nm_spmm-m-0", "ops", "op", "op",
         op(jsp.ops.nm_spmm, ((1, 3, 16), F32), ((1, 8, 8), F32), ((1, 8, 8), U8), n=2, m=0),
         ValueError, r"nm_spmm: m must be in \[2, 16\], got 0"),
    case("op-nm_spmm-rank-2", "ops", "op", "op",
         op(jsp.ops.nm_spmm, ((3, 16), F32), ((8, 8), F32), ((8, 8), U8), n=2, m=4),
         ValueError, r"nm_spmm: operands must be rank 3 \(\[B, T, K\], "),
    case("op-nm_spmm_t-int-dy", "ops", "op", "op",
         op(jsp.ops.nm_spmm_t, ((1, 3, 8), I32), ((1, 8, 8), I32), ((1, 8, 8), U8), n=2, m=4,
            in_features=16),
         TypeError, rf"nm_spmm_t: dy must have dtype {FLOATS}; got int32"),
    case("op-nm_sddmm-dtypes", "ops", "op", "op",
         op(jsp.ops.nm_sddmm, ((1, 3, 16), F32), ((1, 3, 8), jnp.bfloat16), ((1, 8, 8), U8),
            n=2, m=4),
         TypeError, r"nm_sddmm: dtypes must match, got float32 and bfloat16"),
    case("op-vnm_spmm-v-20", "ops", "op", "op",
         op(jsp.ops.vnm_spmm, ((1, 3, 16), F32), ((1, 8, 4), F32), ((1, 8, 4), U8),
            ((1, 1, 8), U8), v=20, n=2, m=8),
         ValueError, r"vnm_spmm: v must be a multiple of 16; got 20"),
    case("op-vnm_spmm-int32-indices", "ops", "op", "op",
         op(jsp.ops.vnm_spmm, ((1, 3, 16), F32), ((1, 8, 4), F32), ((1, 8, 4), I32),
            ((1, 1, 8), U8), v=16, n=2, m=8),
         TypeError, r"vnm_spmm: indices and columns must be uint8, got int32 and uint8"),
    case("op-blocks_spmm-1x3", "ops", "op", "op",
         op(jsp.ops.blocks_spmm, ((1, 3, 16), F32), ((1, 4, 3), F32), ((1, 4), I32),
            ((1, 2), I32), out_features=3),
         ValueError, r"blocks_spmm: the block size n \(values.shape\[-1\], or n=\) must be one "
                     r"of \(4, 8, 16, 32\); got 3"),
    case("op-blocks_spmm-int-x", "ops", "op", "op",
         op(jsp.ops.blocks_spmm, ((1, 3, 16), I32), ((1, 4, 16), I32), ((1, 4), I32),
            ((1, 2), I32), out_features=16),
         TypeError, rf"blocks_spmm: x must have dtype {FLOATS}; got int32"),
    case("op-int4_matmul-group-3", "ops", "op", "op",
         op(jsp.ops.int4_matmul, ((1, 3, 16), F32), ((1, 8, 8), U8), ((1, 1, 8), F32),
            group_size=3),
         ValueError, r"int4_matmul: group_size must divide K = 16 and be a multiple of 2; got 3"),
    case("op-int4_matmul-int-x", "ops", "op", "op",
         op(jsp.ops.int4_matmul, ((1, 3, 16), I32), ((1, 8, 8), U8), ((1, 1, 8), I32),
            group_size=16),
         TypeError, rf"int4_matmul: x must have dtype {FLOATS}; got int32"),
    case("op-int4_nm_matmul-positions", "ops", "op", "op",
         op(jsp.ops.int4_nm_matmul, ((1, 3, 16), F32), ((1, 4, 8), U8), ((1, 1, 8), U8),
            ((1, 1, 8), F32), group_size=16),
         ValueError, r"int4_nm_matmul: positions must be \[B, K/8, N\] = \[B, 2, 8\]; got "
                     r"\(1, 1, 8\)"),
    case("op-int4_marlin_matmul-f32-x", "ops", "op", "op",
         op(jsp.ops.int4_marlin_matmul, ((3, 64), F32), ((4, 128), I32), ((1, 64), F32),
            group_size=None),
         TypeError, r"int4_marlin_matmul: x must be bfloat16 or float16"),
    case("op-int8_matmul-float-b", "ops", "op", "op",
         op(jsp.ops.int8_matmul, ((3, 16), jnp.int8), ((16, 8), F32)), TypeError,
         r"int8_matmul: b must have dtype int8; got float32"),
    # ------------------------------------------------------------------ layers
    case("linear-too-few-inputs", "nn", "layer", "layer",
         lambda k: jsp.nn.SparseLinear(3, 8, sparsity="2:4", rngs=nnx.Rngs(0)), ValueError,
         r"SparseLinear: sparsity=2:4 cannot be used by a layer with in_features=3, "
         r"out_features=8: in=3 < m=4"),
    case("linear-spec-5:4", "nn", "layer", "layer",
         lambda k: jsp.nn.SparseLinear(16, 8, sparsity="5:4", rngs=nnx.Rngs(0)), ValueError,
         r"SparseLinear: sparsity: n must be in \[1, 3\], got 5"),
    case("linear-int4-group", "nn", "layer", "layer",
         lambda k: jsp.nn.SparseLinear(36, 8, sparsity="int4:g32", rngs=nnx.Rngs(0)),
         ValueError, r"in=36 is not a multiple of group_size=32"),
    case("linear-kernel-3d", "nn", "layer", "layer",
         lambda k: jsp.nn.SparseLinear.from_dense(jnp.ones((2, 16, 8)), "2:4"), ValueError,
         r"from_dense: kernel must be 2-D \[in_features, out_features\]; got shape \(2, 16, 8\)"),
    case("conv-blocks-wider-than-out", "nn", "layer", "layer",
         lambda k: jsp.nn.SparseConv(16, 8, (3, 3), sparsity=jsp.Blocks(16, 0.5),
                                     rngs=nnx.Rngs(0)),
         ValueError, r"SparseConv: sparsity=1x16@0.5 cannot be used by a convolution .*out=8 < "
                     r"n=16"),
    case("linen-dense-spec-5:4", "linen", "layer", "layer",
         lambda k: jsp.linen.SparseDense(8, sparsity="5:4").init(jax.random.key(0),
                                                                 jnp.ones((2, 16))),
         ValueError, r"linen.SparseDense .*sparsity: n must be in \[1, 3\], got 5"),
    case("linear-state-of-another-pattern", "nn", "layer", "checkpoint",
         restored_layer_of_another_pattern, ValueError,
         r"values must have shape \(8, 4\) for a 1:4 layer with in_features=16, out_features=8; "
         r"got \(8, 8\)"),
    # ------------------------------------------------------------------ files
    case("file-truncated", "load_safetensors", "file", "checkpoint", truncated_file, ValueError,
         r"load_safetensors: .*cut\.safetensors: .*truncated"),
    case("file-record-in-features", "load_safetensors", "file", "checkpoint",
         lambda k: jsp.load_safetensors(rewrite(k.saved, k.tmp / "in.safetensors",
                                                record_edit("nm", "in_features", 72))),
         ValueError, r"weight 'nm': jaxsparse.NMSparse: values must have last dimension "
                     r"ceil\(in_features/m\)\*n = ceil\(72/4\)\*2 = 36"),
    case("file-record-format", "load_safetensors", "file", "checkpoint",
         lambda k: jsp.load_safetensors(rewrite(k.saved, k.tmp / "format.safetensors",
                                                record_edit("int4", "format", "Int4NMWeight"))),
         ValueError, r"weight 'int4': format Int4NMWeight has the arrays \['qweight', "
                     r"'positions', 'scales'\]"),
    case("file-nan-scale", "load_safetensors", "file", "non-finite", file_with_nan_scale,
         ValueError, r"weight 'int4': tensor 'int4.scales' \(scales\) holds non-finite values"),
    # ------------------------------------------------------------------ permutations
    case("perm-repeats", "prune", "prune", "permutation",
         lambda k: jsp.prune.apply_output_permutation(k.w, edited(np.arange(64), 1, 0)),
         ValueError, r"apply_output_permutation: perm must be a permutation of range\(64\) "
                     r"\(kernel.shape\[-1\], the outputs\); got repeated entries \[0\]"),
    case("perm-out-of-range", "prune", "prune", "permutation",
         lambda k: jsp.prune.apply_input_permutation(k.w, edited(np.arange(64), 5, 64)),
         ValueError, r"apply_input_permutation: perm must be a permutation of range\(64\) .*got "
                     r"out-of-range entries \[64\]"),
    case("perm-float", "prune", "prune", "permutation",
         lambda k: jsp.prune.apply_input_permutation(k.w, np.arange(64.0)), TypeError,
         r"apply_input_permutation: perm must be an integer array, got float32"),
    case("perm-length", "prune", "prune", "permutation",
         lambda k: jsp.prune.permute_inputs(k.w, np.arange(63)), ValueError,
         r"permute_inputs: perm must be a 1-D permutation of length 64"),
    # ------------------------------------------------------------------ runtime switches
    case("matmul_path-bogus", "runtime", "runtime", "runtime", bogus_matmul_path, ValueError,
         r"matmul_path: path must be one of 'auto', 'sparse', 'engine', 'dense'; got 'bogus'"),
    case("set_cpu_isa-bogus", "runtime", "runtime", "runtime",
         lambda k: jsp.set_cpu_isa("bogus"), ValueError,
         r"set_cpu_isa: name must be one this CPU supports \(.*portable\); got 'bogus' "
         r"\(the ISAs are amx, avx512bf16, avx512, avx2, portable\)"),
    case("set_cpu_isa-not-a-string", "runtime", "runtime", "runtime",
         lambda k: jsp.set_cpu_isa(3), TypeError,
         r"set_cpu_isa: name must be a string such as 'avx2'; got int 3"),
    case("choose_path-negative-tokens", "runtime", "runtime", "runtime",
         lambda k: jsp.choose_path(-1, F32, jsp.NM(2, 4)), ValueError,
         r"choose_path: tokens must be an int >= 0; got -1"),
]


# ====================================================================== the tests
def _primitives() -> list[Primitive]:
    found = {}
    for info in pkgutil.iter_modules(jsp.ops.__path__):
        module = importlib.import_module(f"jaxsparse.ops.{info.name}")
        found.update({id(v): v for v in vars(module).values() if isinstance(v, Primitive)})
    return list(found.values())


@pytest.fixture
def kernels_run(monkeypatch):
    """The names of the jaxsparse primitives executed during the test. Every eager execution of a
    primitive goes through its `impl` (jitted programs are not run by the entries), which here
    records the call and raises instead of running a kernel."""
    ran = []
    for prim in _primitives():
        def refuse(*args, _name=prim.name, **params):
            ran.append(_name)
            raise AssertionError(f"{_name} would have run a kernel")
        monkeypatch.setattr(prim, "impl", refuse)
    return ran


@pytest.mark.parametrize("bad", MALFORMED)
def test_malformed_input_is_refused_before_any_kernel(bad, weights, kernels_run):
    isa = jsp.cpu_isa()
    with pytest.raises(bad.error, match=bad.match):
        bad.call(weights)
    assert not kernels_run, f"a kernel ran before the input was refused: {kernels_run}"
    assert jsp.cpu_isa() == isa


def test_the_guard_sees_a_kernel_run(weights, kernels_run):
    """The check of the catalog's test can fail: an eager product is caught at its kernel."""
    x = jnp.ones((2, 64), F32)
    with pytest.raises(AssertionError, match="would have run a kernel"):
        x @ weights.nm
    assert kernels_run == ["jaxsparse_nm_spmm_packed"]


def test_the_catalog_covers_every_format_and_category():
    entries = [param.values[0] for param in MALFORMED]
    ids = [param.id for param in MALFORMED]
    assert len(entries) >= MIN_ENTRIES >= 30
    assert len(set(ids)) == len(ids), "entry ids must be unique"
    assert {e.category for e in entries} == set(CATEGORIES)
    assert {e.via for e in entries} <= set(VIAS)
    assert all(e.error in (ValueError, TypeError) for e in entries)
    formats, stack = set(), [SparseFormat]
    while stack:  # Every public format class, however deep (as jsp.load_safetensors finds them).
        for sub in stack.pop().__subclasses__():
            stack.append(sub)
            if not sub.__name__.startswith("_"):
                formats.add(sub.__name__)
    assert formats >= {"NMSparse", "VNMSparse", "VNMSparseTiled", "BlocksSparse", "Int4Weight",
                       "Int4NMWeight", "Int4LinesWeight", "Int4NMLinesWeight",
                       "Int4MarlinWeight", "Int4NMMarlinWeight"}
    for name in sorted(formats):
        vias = {e.via for e in entries if e.subject == name}
        missing = {"constructor", "from_arrays", "product"} - vias
        assert not missing, f"{name} has no malformed entry through {sorted(missing)}"
