"""The AMX tile emulator (cpu/common/amx_emulator.h): JAXSPARSE_EMULATE_AMX=1 runs the "amx" ISA's
kernel units on a software model of the tile unit, so that machines without AMX test them.

`make test`'s third pass runs tests/ops that way; these tests check, in fresh processes, that the
switch does what it says: "amx" becomes the ISA, every format's AMX tile path reaches the model's
tile products, and their results match the references and the avx512bf16 kernels."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jaxsparse as jsp
from jaxsparse import _ffi

pytestmark = pytest.mark.skipif(
    not jsp.has_cpu_kernels() or "avx512bf16" not in jsp.supported_cpu_isas(),
    reason="the AMX units (emulated or not) need AVX512-BF16")

# One bf16 product per format at 64 tokens (every format's tile path from 32 tokens on), and the
# engine's int8 tiles: the products the model ran for each, and the largest error against the
# reference (f32 products of the same bf16 operands) and against the avx512bf16 kernels.
_SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
import jaxsparse as jsp
from jaxsparse import _ffi
from jaxsparse.ops import engine

out = {"isa": jsp.cpu_isa(), "emulated": _ffi.emulating_amx(), "cases": {}}
w = jax.random.normal(jax.random.PRNGKey(0), (256, 192), jnp.float32).astype(jnp.bfloat16)
x = jax.random.normal(jax.random.PRNGKey(1), (64, 256), jnp.float32).astype(jnp.bfloat16)
specs = {"blocks": jsp.Blocks(16, density=0.25), "nm": jsp.NM(2, 4), "vnm": jsp.VNM(64, 2, 8),
         "int4": jsp.Int4(group_size=128)}
for name, spec in specs.items():
    sparse = jsp.fromdense(w, spec)
    want = np.asarray(x.astype(jnp.float32) @ sparse.todense().astype(jnp.float32))
    before = _ffi._cpu.amx_emulator_products()
    got = np.asarray((x @ sparse).astype(jnp.float32))
    products = _ffi._cpu.amx_emulator_products() - before
    jsp.set_cpu_isa("avx512bf16")
    other = np.asarray((x @ sparse).astype(jnp.float32))
    jsp.set_cpu_isa("amx")
    out["cases"][name] = {"products": products,
                          "error": float(np.max(np.abs(got - want)) / np.max(np.abs(want))),
                          "vs_avx512bf16": float(np.max(np.abs(got - other)) / np.max(np.abs(want)))}
a = jax.random.randint(jax.random.PRNGKey(2), (40, 200), -128, 128, jnp.int32).astype(jnp.int8)
b = jax.random.randint(jax.random.PRNGKey(3), (200, 72), -128, 128, jnp.int32).astype(jnp.int8)
before = _ffi._cpu.amx_emulator_products()
exact = bool(np.array_equal(np.asarray(engine.int8_matmul(a, b)),
                            np.asarray(engine.int8_matmul_reference(a, b))))
out["cases"]["int8"] = {"products": _ffi._cpu.amx_emulator_products() - before, "exact": exact}
print(json.dumps(out))
"""


def _run(emulate: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JAXSPARSE_CPU_ISA",
                                                            "JAXSPARSE_EMULATE_AMX")}
    if emulate:
        env["JAXSPARSE_EMULATE_AMX"] = "1"
    code = ("import json, jaxsparse as jsp; from jaxsparse import _ffi; print(json.dumps("
            "{'isa': jsp.cpu_isa(), 'supported': jsp.supported_cpu_isas(), "
            "'emulated': _ffi.emulating_amx()}))") if not emulate else _SCRIPT
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_tile_path_runs_on_the_emulator_and_matches():
    run = _run(emulate=True)
    assert run["emulated"] and run["isa"] == "amx"
    for name in ("blocks", "nm", "vnm", "int4"):
        case = run["cases"][name]
        assert case["products"] > 0, f"{name}: no tile product ran on the emulator"
        # bf16 outputs: within two of their roundings of the f32 reference.
        assert case["error"] < 2 ** -7, (name, case)
        assert case["vs_avx512bf16"] < 2 ** -7, (name, case)
    assert run["cases"]["int8"]["products"] > 0 and run["cases"]["int8"]["exact"]


def test_amx_is_emulated_only_on_request():
    run = _run(emulate=False)
    assert not run["emulated"]
    # Without the request "amx" is this machine's own: never there without the tile unit.
    if not _hardware_amx():
        assert "amx" not in run["supported"] and run["isa"] != "amx"


def _hardware_amx() -> bool:
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    return " amx_tile " in flags.replace("\n", " ") and " amx_bf16 " in flags.replace("\n", " ")


def test_emulating_amx_reports_this_process():
    assert _ffi.emulating_amx() == (os.environ.get("JAXSPARSE_EMULATE_AMX") == "1")


# ------------------------------------------------------------------ the model's own instructions
# Tile products through `_cpu.amx_emulator_product` against numpy references that follow Intel's
# pseudocode (the SDM's TDPBF16PS and TDPBSSD). These need no AVX512-BF16 (the model is plain C++),
# but the module skip above keeps the file to machines whose AMX units can run.


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """f32 values that are exact in bf16 -> their bf16 bit patterns (uint16)."""
    bits = np.asarray(values, np.float32).view(np.uint32)
    assert np.all(bits & 0xFFFF == 0), "not exact in bf16"
    return (bits >> 16).astype(np.uint16)


def _bf16_values(rng, shape) -> np.ndarray:
    """Random normal f32 rounded to bf16 (by truncation: any bf16 will do)."""
    bits = rng.standard_normal(shape).astype(np.float32).view(np.uint32) & 0xFFFF0000
    return bits.view(np.float32)


def _tdpbf16ps_reference(c, a, b):
    """c [M, N] f32 += pairs: a [M, 2K] and b [K, 2N] bf16 values in f32, summed in the
    pseudocode's order (k outer, the pair's two halves one after the other), each sum rounded to
    f32 (the products are exact)."""
    c = c.copy()
    for k in range(a.shape[1] // 2):
        c = c + a[:, 2 * k, None] * b[None, k, 0::2]
        c = c + a[:, 2 * k + 1, None] * b[None, k, 1::2]
    return c


def _product(instruction, c, a, b):
    out = _ffi._cpu.amx_emulator_product(
        instruction, c.tobytes(), (c.shape[0], c.shape[1] * c.itemsize), a.tobytes(),
        (a.shape[0], a.shape[1] * a.itemsize), b.tobytes(), (b.shape[0], b.shape[1] * b.itemsize))
    return np.frombuffer(out, c.dtype).reshape(c.shape)


@pytest.mark.parametrize("m, k_pairs, n", [(16, 16, 16), (3, 5, 2), (16, 1, 7)])
def test_tdpbf16ps_is_the_pseudocode(m, k_pairs, n):
    rng = np.random.default_rng(m * 100 + k_pairs * 10 + n)
    a, b = _bf16_values(rng, (m, 2 * k_pairs)), _bf16_values(rng, (k_pairs, 2 * n))
    c = rng.standard_normal((m, n)).astype(np.float32)
    got = _product("tdpbf16ps", c, _bf16_bits(a), _bf16_bits(b))
    np.testing.assert_array_equal(got, _tdpbf16ps_reference(c, a, b))


def test_tdpbf16ps_reads_denormals_as_zero():
    a = np.zeros((1, 2), np.uint16)
    a[0, 0] = 0x0001  # The smallest bf16 denormal, 2^-133.
    b = _bf16_bits(np.full((1, 2), 2.0 ** 100, np.float32))  # 2^-33 if the denormal counted.
    got = _product("tdpbf16ps", np.ones((1, 1), np.float32), a, b)
    assert got[0, 0] == 1.0


@pytest.mark.parametrize("m, k_quads, n", [(16, 16, 16), (5, 3, 4)])
def test_tdpbssd_is_the_pseudocode_and_wraps(m, k_quads, n):
    rng = np.random.default_rng(m + k_quads + n)
    a = rng.integers(-128, 128, (m, 4 * k_quads)).astype(np.int8)
    b = rng.integers(-128, 128, (k_quads, 4 * n)).astype(np.int8)
    c = rng.integers(-2 ** 31, 2 ** 31, (m, n)).astype(np.int32)
    c[0, 0] = 2 ** 31 - 1  # Wraps past the top unless the products sum to <= 0.
    want = c.astype(np.int64) + np.einsum(
        "mkq,knq->mn", a.reshape(m, k_quads, 4).astype(np.int64),
        b.reshape(k_quads, n, 4).astype(np.int64))
    want = ((want + 2 ** 31) % 2 ** 32 - 2 ** 31).astype(np.int32)
    np.testing.assert_array_equal(_product("tdpbssd", c, a, b), want)


@pytest.mark.parametrize("a_shape, b_shape, c_shape, message", [
    ((16, 64), (8, 64), (16, 64), "a row bytes / 4 != b rows"),
    ((16, 64), (16, 64), (8, 64), "c rows != a rows"),
    ((16, 64), (16, 32), (16, 64), "c row bytes != b row bytes"),
    ((17, 64), (16, 64), (17, 64), "tile too large"),
])
def test_a_product_the_hardware_refuses_stops_the_process(a_shape, b_shape, c_shape, message):
    code = ("from jaxsparse import _ffi\n"
            f"a, b, c = {a_shape!r}, {b_shape!r}, {c_shape!r}\n"
            "_ffi._cpu.amx_emulator_product('tdpbf16ps', bytes(c[0] * c[1]), c, bytes(a[0] * a[1]),"
            " a, bytes(b[0] * b[1]), b)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert f"faults: {message}" in done.stderr, done.stderr


def test_the_test_entry_names_its_bad_arguments():
    with pytest.raises(ValueError, match="instruction must be tdpbf16ps or tdpbssd; got tdpfp16ps"):
        _product("tdpfp16ps", np.zeros((1, 1), np.float32), np.zeros((1, 2), np.uint16),
                 np.zeros((1, 2), np.uint16))
    with pytest.raises(ValueError, match="rows x row bytes"):
        _ffi._cpu.amx_emulator_product("tdpbssd", b"\0" * 4, (1, 8), b"\0" * 4, (1, 4),
                                       b"\0" * 4, (1, 4))
