import os

import jax
import pytest

import jaxsparse as jsp
from jaxsparse import _ffi

# The tests check the built-in path table: a crossovers file tuned on this machine
# (`python -m jaxsparse.tune`) must not change what they see. tests/test_tune.py sets its own.
os.environ["JAXSPARSE_CROSSOVERS"] = "builtin"


def pytest_report_header(config):
    isa = jsp.cpu_isa() if jsp.has_cpu_kernels() else "no CPU kernels built"
    return f"jax {jax.__version__}, jaxsparse CPU ISA {isa}, CUDA module: {jsp.has_cuda_kernels()}"


@pytest.fixture(autouse=True)
def _require_kernels():
    # A test run without the extension would silently test the fallback only.
    assert jsp.has_cpu_kernels(), "the CPU extension is not built: pip install -e . first"


def _isas_to_test() -> list[str]:
    """Every instruction set the machine supports; only the default one under the CUDA emulator
    (there the ops run the emulated CUDA kernels whatever the ISA, and the tests that call the CPU
    targets by name ran on every ISA in the first pass of `make test`) or when
    JAXSPARSE_TEST_ISAS=default (`make test TEST_ISAS=default`: CI's second Python, whose
    extension is the same C++ compiled again, so its ISAs were covered by the first)."""
    if not jsp.has_cpu_kernels():
        return []
    if _ffi.emulating_cuda() or os.environ.get("JAXSPARSE_TEST_ISAS", "all") == "default":
        return [jsp.cpu_isa()]
    return jsp.supported_cpu_isas()


@pytest.fixture(params=_isas_to_test())
def isa(request):
    """Runs the test once per instruction set the machine supports (forced), portable included."""
    before = jsp.cpu_isa()
    jsp.set_cpu_isa(request.param)
    yield request.param
    jsp.set_cpu_isa(before)


# ---------------------------------------------------------------------- the emulated pass
# `make test`'s second pass re-runs tests/ops with the CUDA kernels under the SIMT emulator. A
# test marked `cpu_only` launches no emulated kernel there (pure Python, argument checks, the
# CPU-only targets), so that pass skips it: it would repeat the first pass exactly.
# JAXSPARSE_EMULATION_AUDIT=<file> (`make emulation-audit`) runs every test of the emulated pass
# instead, fails a marked test that does launch a kernel, and lists in <file> the unmarked tests
# that launched none (candidates for the mark).
_AUDIT_FILE = os.environ.get("JAXSPARSE_EMULATION_AUDIT")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cpu_only: launches no CUDA kernel under the SIMT emulator; the emulated pass "
        "of `make test` skips it (checked by `make emulation-audit`)")
    config.addinivalue_line(
        "markers", "once: what it adds to the other tests does not depend on the jax version (the "
        "C++ kernels' and the emulator's numerics over many shapes and data, the CUDA build, "
        "threads, end-to-end models whose layers are tested on their own): CI runs it with the "
        "newest jax only (`make test ONCE=0` deselects it: .ci/run's other Python)")


def pytest_collection_modifyitems(config, items):
    if not _ffi.emulating_cuda() or _AUDIT_FILE:
        return
    skipped = [item for item in items if item.get_closest_marker("cpu_only")]
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = [item for item in items if not item.get_closest_marker("cpu_only")]


@pytest.fixture(autouse=True)
def _replayable_block_orders():
    """Under emulation, each test restarts the block orders' sequence (the same setting again:
    docs/simt_emulator.md, "Block orders"), so a test that fails in a shuffled order fails the
    same way when run alone."""
    if _ffi.emulating_cuda():
        _ffi._cuda_emu.set_block_order(_ffi._cuda_emu.block_order())
    yield


@pytest.fixture(autouse=True)
def _emulated_launches(request):
    """Audit mode: the emulator's launches during the test against its `cpu_only` mark."""
    if not (_AUDIT_FILE and _ffi.emulating_cuda()):
        yield
        return
    before = _ffi._cuda_emu.launches()
    yield
    launched = _ffi._cuda_emu.launches() - before
    if request.node.get_closest_marker("cpu_only"):
        assert launched == 0, f"marked cpu_only, but launched {launched} emulated kernels"
    elif launched == 0:
        with open(_AUDIT_FILE, "a") as out:
            out.write(request.node.nodeid + "\n")
