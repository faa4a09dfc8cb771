"""Seeded fuzz of every weight format the CPU runs, and of each of its ops (issue 15, point 4).

Formats: N:M (`NMSparse`), V:N:M (`VNMSparse`, and `VNMSparseTiled` on the same weights), 1xN
blocks (`BlocksSparse`), int4 (`Int4Weight` and `Int4LinesWeight`; `Int4Weight` with int8
activations; `Int4NMWeight` and `Int4NMLinesWeight`). The MARLIN layouts have no CPU kernel and
are left out. One test per family; each asserts that every format in it got `MIN_CASES` cases.

How: a bucket is what one compile serves: a *setup* (spec, `in`, `out` and dtype, shared by three
buckets, so that `fromdense` and the views compile once per setup), a token count, a path
("sparse", and "engine" for N:M's patterns with an engine of their own), a layout and a CPU
instruction set. Its cases differ in data only: weights with exact and negative zeros, whole zero
groups or blocks, ties in magnitude, copies of a group or block (negated or not), huge and tiny
entries side by side (int4: also weights on its grid); inputs with zero tokens and signed zeros.
Most buckets multiply their cases as one stack of weights in one call; the rest loop over single
weights through the same jitted program. Per case:

1. the pattern `fromdense` keeps, against the format's rule recomputed here in NumPy (N:M: each
   group's n largest |w|, ties to the lower input; V:N:M: at most 4 inputs per panel and group,
   each output's n largest |w| of its panel's 4 columns, and for m <= 20 no quad of columns
   scoring more; 1xN: `kept_blocks` distinct whole blocks of the largest L2 norms), and `mask()`,
   `todense()` and the stored values against it (int4: the 2:4 rule, scales max |w| / 7 of their
   group, `todense()` within half a step of w and exact for weights on the grid);
2. the arrays round trip bit for bit through the validating `from_arrays`, and an inference
   form's arrays unpack to the canonical ones;
3. `x @ w` on the kernel against x times `todense()` in float32 (W4A8: the library's reference of
   the quantised-activations product, fed NumPy's IEEE quantisation of x);
4. the gradients of the linear loss sum((x @ w) * g): in x for every format, in the kept values
   for the trainable ones (the dense gradient x^T g gathered at the stored positions).

Tolerances are tests/_check.py's, on results divided by the case's power-of-two scale.

Replay: a failure names the family, bucket and case. A bucket draws from
`numpy.random.default_rng((SEED, crc32(family name), setup[, bucket]))` only, so it replays alone:

    JAXSPARSE_FUZZ_BUCKET=7 pytest "tests/test_fuzz.py::test_fuzz[nm]"
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as jsp
from jaxsparse import _ffi
from jaxsparse.ops.int4 import _a8_order, int4_a8_matmul_reference
from tests._check import DTYPES, assert_close, scale_for

# CI runs this file with the newest jax only (`once`: tests/conftest.py).
pytestmark = pytest.mark.once

SEED = 1504
MIN_CASES = 500  # per format
BUCKETS_PER_SETUP = 3
REPLAY_ENV = "JAXSPARSE_FUZZ_BUCKET"

F32, BF16, F16 = (jnp.dtype(d) for d in DTYPES)
# Per dtype: the range of a weight's power-of-two scale, and how far below it single entries may
# sit ("huge and tiny" in one weight). Bounded so that f16 sums over a few hundred inputs do not
# overflow, f16 int4 scales (max |w| / 7) stay normal, and the float32 squares by which 1xN
# blocks are ranked neither overflow nor underflow (a bug: see the end of the file).
MAGNITUDES = {F32: (-30, 30, 20), BF16: (-30, 30, 20), F16: (-4, 5, 6)}
# Token counts per bucket of a setup: few (the streaming kernels' blocks of 4 and their tails),
# from 32 (where tiles and panels run), any. Some buckets take none, one or hundreds (past N:M's
# 2-bit kernels' 256).
FEW_TOKENS = (1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17)
SOME_TOKENS = (31, 32, 33, 40, 48, 64, 65)
SPECIAL_TOKENS = {(0, 0): 0, (1, 0): 1, (2, 1): 300, (4, 1): 257, (3, 2): 129}


# ====================================================================== buckets
@dataclasses.dataclass(frozen=True)
class Bucket:
    """What every case of a bucket shares."""

    family: str
    index: int
    cases: int
    spec: tuple
    k: int
    out: int
    dtype: np.dtype
    tokens: int
    stacked: bool  # All cases as one stack of weights in one call, or a loop over single ones.
    path: str
    isa: str

    def where(self, case: int | None = None, form: str | None = None) -> str:
        cases = f"cases 0..{self.cases - 1}" if case is None else f"case {case}"
        return (f"fuzz {form or self.family} bucket {self.index} {cases} (spec {self.spec!r}, "
                f"in={self.k}, out={self.out}, tokens={self.tokens}, {self.dtype.name}, "
                f"{'stacked' if self.stacked else 'single'}, path {self.path}, isa {self.isa}; "
                f"replay: {REPLAY_ENV}={self.index} pytest "
                f"'tests/test_fuzz.py::test_fuzz[{self.family}]')")


def instruction_sets() -> list[str]:
    """The ISAs the buckets draw from, as tests/conftest.py's `isa` fixture chooses them."""
    if _ffi.emulating_cuda() or os.environ.get("JAXSPARSE_TEST_ISAS", "all") == "default":
        return [jsp.cpu_isa()]
    return jsp.supported_cpu_isas()


def draw_size(rng, unit: int, most: int, edges=()) -> int:
    """A size of at least 1: below one `unit`, a multiple of it, next to a tile edge, or any."""
    kind = int(rng.integers(4))
    if kind == 0 and unit > 1:
        return int(rng.integers(1, unit))
    if kind == 1:
        return unit * int(rng.integers(1, max(2, most // unit + 1)))
    if kind == 2 and edges:
        return max(1, int(rng.choice(edges)) + int(rng.integers(-1, 2)))
    return int(rng.integers(1, most + 1))


def draw_tokens(rng, setup: int, bucket: int) -> int:
    special = SPECIAL_TOKENS.get((setup, bucket))
    if special is not None:
        return special
    choices = (FEW_TOKENS, SOME_TOKENS, FEW_TOKENS + SOME_TOKENS)[bucket]
    return int(rng.choice(choices))


def draw_isa(rng, tokens) -> str:
    """One of the machine's ISAs (from a stream of its own: the data must not depend on the
    machine); the scalar "portable" units only for up to 64 tokens (where they are quick)."""
    isas = instruction_sets()
    if tokens > 64 and len(isas) > 1:
        isas = [isa for isa in isas if isa != "portable"]
    return isas[int(rng.integers(len(isas)))]


def draw_bucket(family, index) -> tuple[Bucket, np.random.Generator]:
    """Bucket `index` of `family` and the generator of its data: the setup's draws (spec,
    shape, dtype) come from the setup's own stream, so every bucket replays alone."""
    number = zlib.crc32(family.name.encode())
    setup, j = divmod(index, BUCKETS_PER_SETUP)
    setup_rng = np.random.default_rng((SEED, number, setup))
    spec = family.draw_spec(setup_rng, setup)
    k, out = family.draw_shape(setup_rng, spec)
    rng = np.random.default_rng((SEED, number, setup, j))
    tokens = draw_tokens(rng, setup, j)
    bucket = Bucket(
        family.name, index, family.cases, spec, k, out,
        dtype=family.dtypes[setup % len(family.dtypes)],
        tokens=tokens, stacked=not (j == 2 and setup % 2 == 0), path=family.path(spec, setup, j),
        isa=draw_isa(np.random.default_rng((SEED, number, setup, j, 1)), tokens),
    )
    return bucket, rng


# ====================================================================== data
def unit_grid(rng, shape, unit, fraction) -> np.ndarray:
    """Bool `[K, N]`, True on a random `fraction` of the `(inputs, outputs)` tiles `unit`."""
    gk, gn = unit
    pick = rng.random((-(-shape[0] // gk), -(-shape[1] // gn))) < fraction
    return np.repeat(np.repeat(pick, gk, 0), gn, 1)[: shape[0], : shape[1]]


def signed_zeros(rng, shape) -> np.ndarray:
    return np.where(rng.random(shape) < 0.5, np.float32(-0.0), np.float32(0.0))


def weight_case(rng, k, out, dtype, unit) -> tuple[np.ndarray, float]:
    """One `[K, N]` weight (float32 values representable in `dtype`) mixing the structures that
    trip selections and kernels, and its power-of-two scale."""
    low, high, spread = MAGNITUDES[dtype]
    shape = (k, out)
    w = rng.standard_normal(shape).astype(np.float32)
    if rng.random() < 0.3:  # Few magnitudes: ties everywhere.
        w = np.sign(w) * rng.integers(1, 4, shape).astype(np.float32)
    if rng.random() < 0.3:  # Huge and tiny entries side by side.
        w *= np.exp2(-rng.integers(0, spread + 1, shape)).astype(np.float32)
    if rng.random() < 0.2:  # Copies of the first tile, negated or not: ties between tiles.
        source = np.tile(w[: unit[0], : unit[1]], (-(-k // unit[0]), -(-out // unit[1])))
        sign = np.where(rng.random(shape) < 0.5, -1, 1).astype(np.float32)
        w = np.where(unit_grid(rng, shape, unit, 0.5), source[:k, :out] * sign, w)
    if rng.random() < 0.3:  # Whole zero groups or blocks.
        w = np.where(unit_grid(rng, shape, unit, rng.uniform(0.1, 0.9)), signed_zeros(rng, shape),
                     w)
    if rng.random() < 0.3:  # Scattered zeros.
        w = np.where(rng.random(shape) < rng.uniform(0.1, 0.9), signed_zeros(rng, shape), w)
    scale = 2.0 ** int(rng.integers(low, high + 1))
    return representable(w * np.float32(scale), dtype), scale


def input_case(rng, shape, dtype) -> tuple[np.ndarray, float]:
    """Inputs with whole zero tokens and scattered signed zeros, and their scale."""
    x = rng.standard_normal(shape).astype(np.float32)
    if rng.random() < 0.3:
        x[rng.random(shape[:-1]) < 0.3] = 0.0
    if rng.random() < 0.3:
        x = np.where(rng.random(shape) < 0.3, signed_zeros(rng, shape), x)
    scale = 2.0 ** int(rng.integers(-2, 2) if dtype == F16 else rng.integers(-3, 4))
    return representable(x * np.float32(scale), dtype), scale


def representable(a, dtype) -> np.ndarray:
    """`a` rounded to `dtype`, held as float32."""
    return np.asarray(a, np.float32).astype(dtype).astype(np.float32)


def f32(a) -> np.ndarray:
    return np.asarray(a).astype(np.float32)


# ====================================================================== shared checks
def assert_each_equal(name, got, want, where):
    """Bit for bit per case, signs of zeros included (a stored -0 stays -0)."""
    for case in range(len(want)):
        np.testing.assert_array_equal(got[case], want[case], err_msg=f"{where(case)}: {name}")
        if np.issubdtype(np.asarray(want[case]).dtype, np.floating):
            np.testing.assert_array_equal(np.signbit(got[case]), np.signbit(want[case]),
                                          err_msg=f"{where(case)}: {name} (signs of zeros)")


def assert_each_close(name, got, want, scales, dtype, size, where):
    """Per case, tests/_check.py's tolerances on results divided by the case's power-of-two
    scale (huge and tiny weights get the same relative check)."""
    for case, scale in enumerate(scales):
        assert_close(f32(got[case]) / scale, f32(want[case]) / scale, dtype, scale_for(size),
                     err_msg=f"{where(case)}: {name}")


def power_of_two_near_max(w):
    """`[C, 1, 1]`: per case, the power of two at or below max |w| (1 for a zero weight)."""
    top = np.max(np.abs(w), axis=(1, 2), keepdims=True).astype(np.float64)
    return np.exp2(np.floor(np.log2(np.where(top > 0, top, 1.0))))


def first_bad(bad) -> int:
    return int(np.argwhere(bad)[0][0])


def padded(a, k, out):
    """`[C, K, N]` zero-padded to `[C, k, out]` (ragged groups and block rows)."""
    return np.pad(a, [(0, 0), (0, k - a.shape[1]), (0, out - a.shape[2])])


def case_index(like):
    return np.arange(like.shape[0]).reshape((-1,) + (1,) * (like.ndim - 1))


def gather(a, inputs, outputs):
    """`a[c, inputs, outputs]` per case: `a [C, K', N']`, indices `[C, ...]` (broadcast)."""
    inputs, outputs = np.broadcast_arrays(inputs, outputs)
    return a[case_index(inputs), inputs, outputs]


def mask_of(inputs, outputs, k, out):
    """`[C, K, N]` bool, True at every stored (input, output) inside the logical shape."""
    inputs, outputs = np.broadcast_arrays(inputs, outputs)
    real = (inputs < k) & (outputs < out)
    cases = np.broadcast_to(case_index(inputs), inputs.shape)
    mask = np.zeros((inputs.shape[0], k, out), bool)
    mask[cases[real], inputs[real], outputs[real]] = True
    return mask


def keep_largest(score, n, axis):
    """Bool of `score`'s shape: the `n` largest along `axis`, ties to the lower position."""
    order = np.argsort(-score, axis=axis, kind="stable")
    rank = np.empty_like(order)
    shape = [1] * score.ndim
    shape[axis] = score.shape[axis]
    np.put_along_axis(rank, order, np.arange(score.shape[axis]).reshape(shape), axis=axis)
    return rank < n


def nm_rule_mask(w, n, m):
    """fromdense's N:M rule on `[C, K, N]`: per output and group of m inputs its n largest |w|,
    ties to the lower input, the zero padding of a ragged group below any real entry."""
    c, k, out = w.shape
    groups = -(-k // m)
    score = np.full((c, groups * m, out), -1.0, np.float32)
    score[:, :k] = np.abs(w)
    keep = keep_largest(score.reshape(c, groups, m, out), n, axis=2)
    return keep.reshape(c, groups * m, out)[:, :k]


def assert_round_trip(ws, where):
    """The validating `from_arrays` rebuilds the weight bit for bit."""
    back = type(ws).from_arrays(ws.spec, ws.in_features, ws.arrays(),
                                out_features=ws.out_features)
    assert type(back) is type(ws) and back.spec == ws.spec, where
    assert back.shape == ws.shape and back.dtype == ws.dtype, where
    for name, array in ws.arrays().items():
        np.testing.assert_array_equal(np.asarray(back.arrays()[name]), np.asarray(array),
                                      err_msg=f"{where}: from_arrays changed {name}")


# ====================================================================== the formats
@dataclasses.dataclass(frozen=True)
class Form:
    """A format class fuzzed on a family's weights: the canonical one (`derive` None), or an
    inference form packed from it (`derive`, pure and jittable) that unpacks back (`back`)."""

    name: str
    derive: Callable | None = None
    back: Callable | None = None
    dtypes: tuple = (F32, BF16, F16)
    trainable: bool = False  # Whether the gradient in the values is checked.


class Family:
    """A format and its inference forms: how to draw buckets and weights, and what to check."""

    name = ""
    forms: tuple[Form, ...] = ()
    setups = 5  # Each compiles `fromdense` and the views once: most of the fuzz's time.
    cases = 34  # per bucket: 5 setups of 3 buckets give 510 cases
    dtypes = (F32, BF16, F16)  # of the setups, in turn

    def draw_spec(self, rng, setup):
        raise NotImplementedError

    def draw_shape(self, rng, spec) -> tuple[int, int]:
        raise NotImplementedError

    def unit(self, spec) -> tuple[int, int]:
        """The (inputs, outputs) tile that zero groups and copies fill: the format's group."""
        raise NotImplementedError

    def path(self, spec, setup, bucket) -> str:
        return "sparse"

    def weight(self, rng, bucket):
        return weight_case(rng, bucket.k, bucket.out, bucket.dtype, self.unit(bucket.spec))

    def dense32(self, ws):
        """The weight the products use, float32."""
        return ws.todense().astype(jnp.float32)

    def check_pattern(self, bucket, w, r):
        raise NotImplementedError

    def reference_operands(self, bucket, x) -> tuple:
        """Host-computed operands of `forward_reference`, `[C, ...]` (one per case)."""
        return ()

    def forward_reference(self, weight, x32, dense32):
        """Jittable: the product `x @ w` is checked against."""
        return exact_matmul(x32, dense32)


class SparseFamily(Family):
    """Formats that store w's kept values (N:M, V:N:M, blocks): `stored` gives each stored
    value's (input, output), against which mask, dense form, values and the gradient in the
    values are checked; `check_rule` checks which entries were kept."""

    def stored(self, bucket, r):
        raise NotImplementedError

    def padded_shape(self, bucket) -> tuple[int, int]:
        raise NotImplementedError

    def check_rule(self, bucket, w, r, mask):
        raise NotImplementedError

    def check_pattern(self, bucket, w, r):
        inputs, outputs = self.stored(bucket, r)
        at = padded(w, *self.padded_shape(bucket))
        assert_each_equal("stored values against w at their positions", f32(r["values"]),
                          gather(at, inputs, outputs), bucket.where)
        mask = mask_of(inputs, outputs, bucket.k, bucket.out)
        assert_each_equal("mask() against the stored positions", r["mask"], mask, bucket.where)
        assert_each_equal("todense() against where(mask, w, 0)", f32(r["dense"]),
                          np.where(mask, w, np.float32(0.0)), bucket.where)
        self.check_rule(bucket, w, r, mask)

    def values_gradient_reference(self, bucket, dw, r):
        inputs, outputs = self.stored(bucket, r)
        return gather(padded(dw, *self.padded_shape(bucket)), inputs, outputs)


class NMFamily(SparseFamily):
    name = "nm"
    forms = (Form("nm", trainable=True),)

    @staticmethod
    def engine_setup(setup):
        return setup in (1, 3)  # bfloat16 and float32

    def draw_spec(self, rng, setup):
        if self.engine_setup(setup) or rng.random() < 0.3:  # 2:4 and 1:4 have their own kernels
            return jsp.NM(int(rng.integers(1, 3)), 4)
        m = int(rng.integers(2, 17))
        return jsp.NM(int(rng.integers(1, m)), m)

    def path(self, spec, setup, bucket):
        return "engine" if self.engine_setup(setup) and bucket == 1 else "sparse"

    def draw_shape(self, rng, spec):
        return draw_size(rng, spec.m, 160), draw_size(rng, 1, 160, edges=(16, 64, 128))

    def unit(self, spec):
        return spec.m, 1

    def padded_shape(self, bucket):
        return -(-bucket.k // bucket.spec.m) * bucket.spec.m, bucket.out

    def stored(self, bucket, r):
        n, m = bucket.spec
        slot = np.arange(r["indices"].shape[-1])
        inputs = (slot // n) * m + r["indices"].astype(np.int64)  # [C, out, kept]
        return inputs, np.arange(bucket.out)[None, :, None]

    def check_rule(self, bucket, w, r, mask):
        n, m = bucket.spec
        assert_each_equal(f"the kept entries: the {n} largest |w| of each group of {m}", mask,
                          nm_rule_mask(w, n, m), bucket.where)


class VNMFamily(SparseFamily):
    name = "vnm"
    forms = (Form("vnm", trainable=True),
             Form("vnm_tiled", lambda ws: ws.with_tiles(), lambda wt: wt.without_tiles(),
                  dtypes=(F32, BF16)))
    setups = 4  # Its selection compiles longest.
    cases = 56  # 3 setups of bfloat16 or float32 give the tiled form 504 cases
    dtypes = (F32, BF16, F16, F32)
    # Checking the chosen quads of columns against all C(m, 4) costs v * C(m, 4) scores per
    # block: a bucket checks as many blocks as fit (at least one), spread over its cases.
    QUAD_SCORES = 400_000

    def draw_spec(self, rng, setup):
        v = 16 * int(rng.choice([1, 1, 2, 3, 4, 8, 16]))
        m = int(rng.choice([4, 5, 6, 7, 8, 8, 10, 12, 16, 16, 20] if setup != 3 else [24, 32]))
        return jsp.VNM(v, int(rng.integers(1, 3)), m)

    def draw_shape(self, rng, spec):
        v = spec.v
        return (draw_size(rng, spec.m, 160),
                draw_size(rng, v, max(160, 2 * v + 4), edges=(v, 2 * v, 128)))

    def unit(self, spec):
        return spec.m, spec.v

    def padded_shape(self, bucket):
        v, _, m = bucket.spec
        return -(-bucket.k // m) * m, -(-bucket.out // v) * v

    def stored(self, bucket, r):
        v, n, m = bucket.spec
        group = np.arange(r["indices"].shape[-1]) // n
        panel_columns = np.repeat(r["columns"].astype(np.int64), v, axis=1)[:, : bucket.out]
        chosen = np.take_along_axis(panel_columns, 4 * group + r["indices"].astype(np.int64),
                                    axis=-1)
        return group * m + chosen, np.arange(bucket.out)[None, :, None]

    def blocks_of(self, bucket, a, fill_in, fill_out):
        """`[C, K, N]` -> `[C, P, G, v, m]` (panels, groups, outputs, inputs): padding inputs of
        real outputs hold `fill_in`, padding outputs `fill_out`."""
        v, _, m = bucket.spec
        k, out = self.padded_shape(bucket)
        full = np.full((a.shape[0], k, out), fill_out, np.float64)
        full[:, bucket.k:, : bucket.out] = fill_in
        full[:, : bucket.k, : bucket.out] = a
        return full.reshape(a.shape[0], k // m, m, out // v, v).transpose(0, 3, 1, 4, 2)

    def check_rule(self, bucket, w, r, mask):
        v, n, m = bucket.spec
        used = self.blocks_of(bucket, mask, 0, 0) > 0  # [C, P, G, v, m]
        bad = used.sum(-1) > n
        assert not bad.any(), f"{bucket.where(first_bad(bad))}: an output keeps more than {n}"
        bad = used.any(axis=-2).sum(-1) > 4
        assert not bad.any(), f"{bucket.where(first_bad(bad))}: a panel uses more than 4 inputs"
        # fromdense's scores: |w| (over a power of two near its largest, for the quads'
        # tolerance: exact, so the order and the ties stay), -1 for the padding inputs, 0 for
        # the padding outputs.
        score = self.blocks_of(bucket, np.abs(w) / power_of_two_near_max(w), -1, 0)
        columns = r["columns"].astype(np.int64).reshape(*score.shape[:3], 4)
        slot_scores = np.take_along_axis(score, columns[:, :, :, None, :], axis=-1)
        kept = keep_largest(slot_scores, n, axis=-1)  # Each output's n best of its 4 columns.
        slots = np.sort(np.argsort(~kept, axis=-1, kind="stable")[..., :n], axis=-1)
        want = slots.transpose(0, 1, 3, 2, 4).reshape(w.shape[0], -1, score.shape[2] * n)
        assert_each_equal(f"slots: each output's {n} largest |w| of its panel's 4 columns",
                          r["indices"], want[:, : bucket.out].astype(np.uint8), bucket.where)
        if m <= 20:  # VENOM's exhaustive rule (a faster one beyond)
            self.check_best_quads(bucket, score, slot_scores, n)

    def check_best_quads(self, bucket, score, slot_scores, n):
        """No quad of columns scores more than the chosen one (the sum over the panel's outputs
        of each one's n largest |w| among the quad)."""
        quads = _quads(score.shape[-1])
        blocks = score.reshape(-1, *score.shape[-2:])  # [C*P*G, v, m]
        count = max(1, self.QUAD_SCORES // (score.shape[-2] * len(quads)))
        picked = np.unique(np.linspace(0, len(blocks) - 1, count).astype(int))
        best = _top_sum(blocks[picked][..., quads], n).sum(-2).max(-1)
        chosen = _top_sum(slot_scores.reshape(-1, *slot_scores.shape[-2:])[picked], n).sum(-1)
        short = best - chosen > 1e-5 * np.maximum(best, 1.0)
        if short.any():
            block = int(picked[np.argwhere(short)[0][0]])
            case, rest = divmod(block, score.shape[1] * score.shape[2])
            raise AssertionError(
                f"{bucket.where(case)}: block {divmod(rest, score.shape[2])} (panel, group): the "
                f"chosen columns score {chosen[short][0]}, a better quad {best[short][0]}")


@functools.cache
def _quads(m):
    return np.array(list(itertools.combinations(range(m), 4)))


def _top_sum(scores, n):
    """The sum of the n largest along the last axis."""
    if n == 1:
        return scores.max(-1)
    return np.sort(scores, axis=-1)[..., -n:].sum(-1)


class BlocksFamily(SparseFamily):
    name = "blocks"
    forms = (Form("blocks", trainable=True),)

    def draw_spec(self, rng, setup):
        n = (4, 8, 16, 32)[setup % 4]
        if setup % 3 == 2:  # Balanced for row parallelism (stacked): half of each run kept.
            return jsp.Blocks(n, 0.5, int(rng.choice([2, 4])), "in")
        density = float(rng.choice([rng.uniform(0.02, 1.0), rng.uniform(0.02, 0.4), 1.0, 1e-3]))
        return jsp.Blocks(n, density)

    def draw_shape(self, rng, spec):
        # A balanced spec's inputs: a multiple of 2 * shards, so half of each run is whole.
        if spec.stacked:
            return (2 * spec.shards * int(rng.integers(1, 160 // (2 * spec.shards) + 1)),
                    draw_size(rng, spec.n, 160, edges=(spec.n, 64, 128)))
        return (draw_size(rng, 1, 160, edges=(32, 64)),
                draw_size(rng, spec.n, 160, edges=(spec.n, 64, 128)))

    def unit(self, spec):
        return 1, spec.n

    def padded_shape(self, bucket):
        n = bucket.spec.n
        return bucket.k, -(-bucket.out // n) * n

    @staticmethod
    def rows(r):
        """`[C, nnz]`: each stored block's block row, from indptr."""
        block = np.arange(r["indices"].shape[-1])
        return (r["indptr"][:, None, 1:] <= block[None, :, None]).sum(-1)

    def block_rows(self, bucket, r):
        """`[C, nnz]`: each stored block's block row (a stacked weight's rows run run after
        run: row q of the stacked BSR is block row q mod R)."""
        return self.rows(r) % -(-bucket.out // bucket.spec.n)

    def stored(self, bucket, r):
        n = bucket.spec.n
        outputs = self.block_rows(bucket, r)[..., None] * n + np.arange(n)
        return r["indices"].astype(np.int64)[..., None], outputs

    def check_rule(self, bucket, w, r, mask):
        """The stored positions are whole 1xn blocks by construction (`stored`); the rule is
        which: `kept_blocks` distinct blocks of the largest L2 norms across the weight (across
        each run, an equal share, for a balanced spec)."""
        spec, c = bucket.spec, w.shape[0]
        n, shards = spec.n, spec.shards
        nnz = spec.kept_blocks(bucket.k, bucket.out)
        assert r["indices"].shape[-1] == nnz, bucket.where()
        k, out = self.padded_shape(bucket)
        blocks = padded(w.astype(np.float64) / power_of_two_near_max(w), k, out)
        norms = (blocks.reshape(c, k, out // n, n) ** 2).sum(-1)  # [C, K, R]
        kept = np.zeros(norms.shape, bool)
        kept[case_index(r["indices"]), r["indices"], self.block_rows(bucket, r)] = True
        bad = kept.sum((1, 2)) != nnz
        assert not bad.any(), f"{bucket.where(first_bad(bad))}: a block is stored twice"
        axis = 1 if spec.split == "in" else 2  # The runs: of inputs, or of block rows.
        for run in range(shards):
            part = np.arange(norms.shape[axis]).reshape(shards, -1)[run]
            run_norms, run_kept = norms.take(part, axis), kept.take(part, axis)
            bad = run_kept.sum((1, 2)) != nnz // shards
            assert not bad.any(), f"{bucket.where(first_bad(bad))}: run {run} is not its share"
            for case in range(c):
                if run_kept[case].all():
                    continue
                low = run_norms[case][run_kept[case]].min()
                high = run_norms[case][~run_kept[case]].max()
                assert low >= high * (1 - 1e-5) - 1e-30, (
                    f"{bucket.where(case)}: a dropped block's squared L2 norm {high} beats a "
                    f"kept one's {low} (run {run} of {shards})")


def with_lines(wq):
    return wq.with_lines()


def lines_back(wl):
    return wl.packed_for("cpu")


class Int4Family(Family):
    """int4 weights (frozen): quantisation within half a step and exact on the grid, products,
    and the gradient in x."""

    name = "int4"
    forms = (Form("int4"), Form("int4_lines", with_lines, lines_back))
    sparse = False
    activations = None
    group_sizes = (8, 16, 24, 32, 40, 64, 128, None)

    def draw_spec(self, rng, setup):
        size = None if setup == 0 else self.group_sizes[int(rng.integers(len(self.group_sizes)))]
        return jsp.Int4(size, jsp.NM(2, 4) if self.sparse else None, self.activations)

    def draw_shape(self, rng, spec):
        if spec.group_size is None:  # `in` a multiple of 8 (2:4), 4 (int8 quads) or 2 (bytes)
            multiple = 8 if self.sparse else 4 if self.activations else 2
            k = multiple * int(rng.integers(1, 40))
        else:
            k = spec.group_size * int(rng.choice([1, 1, 2, 3, 4]))
        return k, draw_size(rng, 1, 160, edges=(16, 64, 128))

    def unit(self, spec):
        return spec.group_size or 8, 1

    def weight(self, rng, bucket):
        if rng.random() < 0.25:
            return self.weight_on_grid(rng, bucket)
        return super().weight(rng, bucket)

    def weight_on_grid(self, rng, bucket):
        """Codes in [-7, 7] times a power of two per group, with a +-7 among each group's kept
        values: the quantisation must give it back exactly."""
        k, out, size = bucket.k, bucket.out, bucket.spec.group_for(bucket.k)
        low, high, _ = MAGNITUDES[bucket.dtype]
        codes = rng.integers(-7, 8, (k, out))
        keep = np.ones((k, out), bool)
        if self.sparse:  # Two random positions of every 4 hold the kept values.
            keep = (np.argsort(rng.random((k // 4, 4, out)), axis=1) < 2).reshape(k, out)
            codes = np.where(keep, codes, 0)
        first_kept = np.argmax(keep.reshape(k // size, size, out), axis=1)  # [groups, N]
        rows = np.arange(k // size)[:, None] * size + first_kept
        codes[rows, np.arange(out)] = np.where(rng.random(rows.shape) < 0.5, -7, 7)
        exponent = rng.integers(low, high - 2, (k // size, out))
        w = codes * np.repeat(np.exp2(exponent), size, axis=0)
        # Codes reach 7 where a unit normal's draws reach about 4: the next power of two.
        return representable(w, bucket.dtype), 2.0 ** int(exponent.max() + 3)

    def dense32(self, ws):
        return ws.astype(jnp.float32).todense()  # code * scale in f32, what the kernels use

    def kept_by_rule(self, w):
        return nm_rule_mask(w, 2, 4) if self.sparse else np.ones(w.shape, bool)

    def check_pattern(self, bucket, w, r):
        size = bucket.spec.group_for(bucket.k)
        keep = self.kept_by_rule(w)
        assert_each_equal("mask()", r["mask"], keep, bucket.where)
        kept = np.where(keep, w, np.float32(0.0))
        c, k, out = w.shape
        step = np.max(np.abs(kept).reshape(c, k // size, size, out), axis=2) / 7  # [C, G, N]
        scales = f32(r["scales"])
        eps = 4 * float(jnp.finfo(bucket.dtype).eps)
        tiny = float(jnp.finfo(bucket.dtype).smallest_subnormal)
        bad = np.abs(scales - step) > eps * step + tiny
        if bad.any():
            raise AssertionError(f"{bucket.where(first_bad(bad))}: scales are not max |w| / 7 of "
                                 f"their group: {scales[bad][:4]} against {step[bad][:4]}")
        dense = f32(r["dense"])
        assert_each_equal("todense() at the pruned entries", np.where(keep, 0, dense),
                          np.zeros_like(dense), bucket.where)
        allowed = np.repeat(scales * (0.5 + eps) + 7 * eps * step, size, axis=1) + tiny
        far = np.abs(dense - kept) > allowed
        if far.any():
            case, i, o = (int(a) for a in np.argwhere(far)[0])
            raise AssertionError(
                f"{bucket.where(case)}: todense()[{i}, {o}] = {dense[case, i, o]} is more than "
                f"half a step ({scales[case, i // size, o]}) from w = {w[case, i, o]}")
        exact = (dense == kept) | ~self.on_grid(w, keep, size)
        assert_each_equal("todense() of a weight on the grid", exact, np.ones_like(exact),
                          bucket.where)

    @staticmethod
    def on_grid(w, keep, size):
        """`[C, 1, 1]`: the cases whose kept values are all code * 2^e with a +-7 in each group
        (exactly representable; other weights land on the grid only by chance)."""
        c, k, out = w.shape
        kept = np.abs(np.where(keep, w, 0)).reshape(c, k // size, size, out).astype(np.float64)
        top = kept.max(axis=2, keepdims=True)
        base = np.where(top > 0, top / 7, 1.0)
        power = np.log2(base) == np.round(np.log2(base))
        codes = kept / base
        exact = (codes == np.round(codes)).all(axis=2, keepdims=True) & power & (top > 0)
        return exact.all(axis=(1, 2, 3)).reshape(c, 1, 1)


class Int4A8Family(Int4Family):
    """W4A8: the kernel quantises x to int8 inside its call; the forward is checked against the
    library's reference of that product fed NumPy's IEEE quantisation of x (XLA's compiled
    division may round an exact tie differently), the gradient in x straight through."""

    name = "int4_a8"
    forms = (Form("int4_a8"),)
    activations = "int8"

    def reference_operands(self, bucket, x):
        return ieee_quantize(x, bucket.spec.group_for(bucket.k))

    def forward_reference(self, weight, x32, dense32, codes, x_scales, sums):
        def rank3(a):  # The reference takes [B, T, ...] operands; a single case has no B.
            return a if codes.ndim == 3 else a[None]

        y = int4_a8_matmul_reference(rank3(_a8_order(codes)), rank3(x_scales), rank3(sums),
                                     rank3(weight.qweight), rank3(weight.scales),
                                     group_size=weight.group)
        return y if codes.ndim == 3 else y[0]


def ieee_quantize(x, size):
    """`quantize_activations` in NumPy: IEEE float32 division, round half to even."""
    grouped = x.reshape(*x.shape[:-1], x.shape[-1] // size, size)
    scales = np.abs(grouped).max(-1) * np.float32(1 / 127)
    safe = np.where(scales > 0, scales, np.float32(1))[..., None]
    codes = np.clip(np.round(grouped / safe), -127, 127).astype(np.int8)
    return codes.reshape(x.shape), scales, codes.astype(np.int32).sum(-1)


class Int4NMFamily(Int4Family):
    name = "int4_nm"
    forms = (Form("int4_nm"), Form("int4_nm_lines", with_lines, lines_back))
    sparse = True


# The longest first, so that pytest-xdist's two workers finish together.
FAMILIES = (VNMFamily(), BlocksFamily(), Int4NMFamily(), NMFamily(), Int4Family(),
            Int4A8Family())


# ====================================================================== the programs
@functools.cache
def builder(family, spec):
    """Jitted (compiled once per setup: it depends on w's shape and dtype only): the canonical
    format from w, its views, its inference forms for w's dtype and their arrays unpacked."""
    def build(w):
        ws = jsp.fromdense(w, spec)
        views = dict(mask=ws.mask(), dense=ws.todense(), dense32=family.dense32(ws))
        forms = {form.name: form.derive(ws) for form in family.forms
                 if form.derive is not None and w.dtype in form.dtypes}
        backs = {name: form.back(forms[name]) for form in family.forms
                 if (name := form.name) in forms}
        return ws, views, forms, backs

    return jax.jit(build)


@functools.cache
def products(family, form, path):
    """Jitted: `x @ w` on `path` and the gradients of sum((x @ w) * g), in x and (trainable
    forms) in the values; and their references, from `dense32` (the weight in float32) by XLA's
    float32 dots (NumPy's threads would fight XLA's)."""
    def run(weight, dense32, x, g, *operands):
        x32, g32 = x.astype(jnp.float32), g.astype(jnp.float32)

        def loss(x, values=None):
            # The path as an argument, not `jsp.matmul_path(...)` around the call: it is chosen
            # when tracing, and the jitted program is cached per path.
            y = jsp.matmul(x, weight if values is None else weight.replace(values=values),
                           path=path)
            return jnp.sum(y.astype(jnp.float32) * g32), y

        if form.trainable:
            (dx, dv), y = jax.grad(loss, argnums=(0, 1), has_aux=True)(x, weight.values)
        else:
            (dx, y), dv = jax.grad(loss, has_aux=True)(x), None
        out = dict(y=y, dx=dx, dv=dv, y_ref=family.forward_reference(weight, x32, dense32,
                                                                     *operands),
                   dx_ref=exact_matmul(g32, jnp.swapaxes(dense32, -1, -2)))
        if form.trainable:  # Every entry's gradient, x^T g.
            out["dw_ref"] = exact_matmul(jnp.swapaxes(x32, -1, -2), g32)
        return out

    return jax.jit(run)


def exact_matmul(a, b):
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def device(a, dtype):
    return jnp.asarray(np.asarray(a).astype(dtype))


def host(out, lead=False):
    """Results as NumPy arrays, with a leading case axis added when `lead`."""
    return {name: np.asarray(a)[None] if lead else np.asarray(a) for name, a in out.items()
            if a is not None}


def guarded(fn, where, *args):
    try:
        return jax.block_until_ready(fn(*args))
    except Exception as err:  # A crash or a refusal is a finding: name the bucket and case.
        raise AssertionError(f"{where}: raised {err!r}") from err


def case_weight(ws, case):
    """Case `case` of a stack of weights, as a single weight (host-side slicing)."""
    arrays = {name: np.asarray(a)[case] for name, a in ws.arrays().items()}
    return type(ws).from_arrays(ws.spec, ws.in_features, arrays, validate=False,
                                out_features=ws.out_features)


def run_form(family, form, bucket, weight, dense32, x, g):
    """The form's products for every case of the bucket: `[C, ...]` NumPy results."""
    fn = products(family, form, bucket.path)
    operands = family.reference_operands(bucket, x)
    if bucket.stacked:
        return host(guarded(fn, bucket.where(form=form.name), weight, dense32,
                            device(x, bucket.dtype), device(g, bucket.dtype), *operands))
    dense32 = np.asarray(dense32)
    each = [host(guarded(fn, bucket.where(case, form.name), case_weight(weight, case),
                         dense32[case], device(x[case], bucket.dtype),
                         device(g[case], bucket.dtype), *(a[case] for a in operands)),
                 lead=True) for case in range(bucket.cases)]
    return {name: np.concatenate([e[name] for e in each]) for name in each[0]}


# ====================================================================== one bucket
def run_bucket(family, index) -> dict[str, int]:
    """Draw, run and check bucket `index`; returns the cases checked per form."""
    bucket, rng = draw_bucket(family, index)
    weights = [family.weight(rng, bucket) for _ in range(bucket.cases)]
    inputs = [input_case(rng, (bucket.tokens, bucket.k), bucket.dtype)
              for _ in range(bucket.cases)]
    w, w_scale = np.stack([a for a, _ in weights]), np.array([s for _, s in weights])
    x, x_scale = np.stack([a for a, _ in inputs]), np.array([s for _, s in inputs])
    g = representable(rng.standard_normal((bucket.cases, bucket.tokens, bucket.out)),
                      bucket.dtype)

    jsp.set_cpu_isa(bucket.isa)
    ws, views, forms, backs = guarded(builder(family, bucket.spec), bucket.where(),
                                      device(w, bucket.dtype))
    assert_round_trip(ws, bucket.where())
    canonical = {**host(ws.arrays()), **host(views)}
    family.check_pattern(bucket, w, canonical)
    checked = {}
    for form in family.forms:
        if bucket.dtype not in form.dtypes:
            continue
        where = functools.partial(bucket.where, form=form.name)
        weight = ws if form.derive is None else forms[form.name]
        if form.derive is not None:  # Validated, and its arrays unpack to the canonical ones.
            assert_round_trip(weight, where())
            for name, array in host(backs[form.name].arrays()).items():
                assert_each_equal(f"{name} unpacked", array, canonical[name], where)
        r = {**canonical, **run_form(family, form, bucket, weight, views["dense32"], x, g)}
        check_products(family, form, bucket, (w_scale, x_scale), x, r)
        checked[form.name] = bucket.cases
    return checked


def check_products(family, form, bucket, scales, x, r):
    (w_scale, x_scale), dtype = scales, bucket.dtype
    where = functools.partial(bucket.where, form=form.name)
    assert r["y"].shape == (bucket.cases, bucket.tokens, bucket.out), where()
    assert r["y"].dtype == dtype and r["dx"].dtype == dtype and r["dx"].shape == x.shape, where()
    assert_each_close("x @ w", r["y"], r["y_ref"], w_scale * x_scale, dtype, bucket.k, where)
    assert_each_close("d/dx", r["dx"], r["dx_ref"], w_scale, dtype, bucket.out, where)
    if form.trainable:
        assert r["dv"].shape == r["values"].shape and r["dv"].dtype == dtype, where()
        assert_each_close("d/dvalues", r["dv"],
                          family.values_gradient_reference(bucket, r["dw_ref"], r), x_scale,
                          dtype, bucket.tokens, where)


# ====================================================================== the test
@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_fuzz(family):
    replay = os.environ.get(REPLAY_ENV)
    buckets = family.setups * BUCKETS_PER_SETUP
    indices = range(buckets) if replay is None else [int(replay)]
    before = jsp.cpu_isa()
    checked = {form.name: 0 for form in family.forms}
    try:
        for index in indices:
            for form, cases in run_bucket(family, index).items():
                checked[form] += cases
    finally:
        jsp.set_cpu_isa(before)
    if replay is None:
        short = {form: cases for form, cases in checked.items() if cases < MIN_CASES}
        assert not short, f"fuzz {family.name}: fewer than {MIN_CASES} cases: {short}"


# ====================================================================== what the fuzz found
# Outside the magnitudes above: the 1xN rule keeps the blocks of largest L2 norm, and `fromdense`
# used to rank them by their squared norm summed in float32 as it came, which overflowed to inf
# past |w| ~ 1.8e19 and flushed to 0 below |w| ~ 1e-19; tied, the earlier block was kept and the
# largest one, or the only nonzero one, dropped. `_block_scores` now squares in units of the
# matrix's largest power of two (jaxsparse/formats/blocks.py). Subnormal weights stay zero: XLA's
# CPU code flushes them everywhere.
@pytest.mark.parametrize("largest, other", [(1e25, 1e20), (3e38, 1e38), (1e-25, 0.0),
                                            (1e-25, 1e-26), (2e-19, 1e-19)],
                         ids=["overflow", "near-max", "underflow", "both-tiny", "tiny-pair"])
def test_blocks_keep_the_largest_block_at_extreme_magnitudes(largest, other):
    w = np.zeros((4, 4), np.float32)
    w[0], w[3] = other, largest  # Two whole 1x4 blocks (inputs 0 and 3) of four; one is kept.
    spec = jsp.Blocks(4, density=0.25)
    ws = jsp.fromdense(jnp.asarray(w), spec)
    np.testing.assert_array_equal(np.asarray(ws.indices), [3])
    np.testing.assert_array_equal(np.asarray(spec.magnitude_mask(jnp.asarray(w)))[:, 0],
                                  [False, False, False, True])
    # The model-wide threshold compares blocks across layers on one scale: 2 of the 8 blocks are
    # kept, both of layer a unless its second block is zero (then b's largest one).
    densities = jsp.prune.block_densities({"a": {"kernel": w}, "b": {"kernel": w / 1e6}}, 4, 0.25)
    kept_a = 2 if other else 1
    assert densities == {"a/kernel": jsp.Blocks(4, kept_a / 4), "b/kernel": jsp.Blocks(4, 0.25)}
