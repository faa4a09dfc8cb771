import os

# The suite compiles thousands of small XLA programs, and LLVM's optimisation of their machine code
# is a third of its time on jax 0.12 (tests/ops/test_nm.py, test_blocks.py and the conformance
# suite, 2 workers: 131 s at XLA's default level, 89 s at 0; jax 0.10.2 12% less on the
# conformance and conv files). XLA's HLO passes (fusion, layouts, our custom calls' lowering) run
# in full either way, and the kernels are ours; nothing here times anything. Set before jax reads
# its flags; JAXSPARSE_TEST_XLA_OPT=default keeps XLA's own level.
if os.environ.get("JAXSPARSE_TEST_XLA_OPT") != "default":
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

import jax  # noqa: E402
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


#: JAXSPARSE_TEST_ISAS (`make test TEST_ISAS=...`): "all" (every ISA the machine supports, every
#: case), "lean" (every ISA, but on the ISAs other than the default one the sweeps' cases marked
#: `once` are left out: CI's newest jax, whose time would otherwise grow with the machine's ISAs,
#: 2 on AVX2 machines and 5 on AMX ones) or "default" (the default ISA only).
TEST_ISAS_MODES = ("all", "lean", "default")


def _test_isas_mode() -> str:
    mode = os.environ.get("JAXSPARSE_TEST_ISAS", "all")
    if mode not in TEST_ISAS_MODES:
        raise pytest.UsageError(f"JAXSPARSE_TEST_ISAS must be one of {', '.join(TEST_ISAS_MODES)}; "
                                f"got {mode!r}")
    return mode


def _isas_to_test() -> list[str]:
    """Every instruction set the machine supports; only the default one under the CUDA emulator
    (there the ops run the emulated CUDA kernels whatever the ISA, and the tests that call the CPU
    targets by name ran on every ISA in the first pass of `make test`) or when
    JAXSPARSE_TEST_ISAS=default (`make test TEST_ISAS=default`: CI's second Python, whose
    extension is the same C++ compiled again, so its ISAs were covered by the first), and "amx"
    only on the AMX emulator (`make test`'s third pass: the other ISAs ran in the first)."""
    if not jsp.has_cpu_kernels():
        return []
    if _ffi.emulating_cuda() or _ffi.emulating_amx() or _test_isas_mode() == "default":
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
    _check_amx_emulation()
    config.addinivalue_line(
        "markers", "cpu_only: launches no CUDA kernel under the SIMT emulator; the emulated pass "
        "of `make test` skips it (checked by `make emulation-audit`)")
    config.addinivalue_line(
        "markers", "emulated_only: runs only in the emulated pass (JAXSPARSE_EMULATE_CUDA=1), which "
        "keeps it even where it leaves the `once` tests out (`make test EMULATED_ONCE=0`)")
    config.addinivalue_line(
        "markers", "once: what it adds to the other tests does not depend on the jax version (the "
        "C++ kernels' and the emulator's numerics over many shapes and data, the CUDA build, "
        "threads, end-to-end models whose layers are tested on their own): CI runs it with the "
        "newest jax only (`make test ONCE=0` deselects it: .ci/run's other Python), on the "
        "default ISA only (`TEST_ISAS=lean`) and not in the emulated pass (`EMULATED_ONCE=0`)")


def _check_amx_emulation():
    """`make test`'s third pass (JAXSPARSE_EMULATE_AMX=1) runs the AMX kernels on the tile emulator.
    A machine without AVX512-BF16 cannot run those units at all, so the pass has nothing to do
    there; a machine with it and no emulated "amx" has a build without the emulator, an error."""
    if os.environ.get("JAXSPARSE_EMULATE_AMX") != "1" or _ffi.emulating_amx():
        return
    if jsp.has_cpu_kernels() and "avx512bf16" in jsp.supported_cpu_isas():
        raise pytest.UsageError("JAXSPARSE_EMULATE_AMX=1, but this build has no AMX emulator "
                                "(CMake's JAXSPARSE_AMX_EMULATION, or a compiler without the AMX "
                                "flags)")
    pytest.exit("JAXSPARSE_EMULATE_AMX=1: no AVX512-BF16 on this machine, so no AMX unit can run "
                "here, emulated or not", returncode=0)


def pytest_collection_modifyitems(config, items):
    _leave_out(config, items, _lean_isa_cases(items))
    if not _ffi.emulating_cuda() or _AUDIT_FILE:
        return
    _leave_out(config, items, [item for item in items if item.get_closest_marker("cpu_only")])


def _lean_isa_cases(items) -> list:
    """Under JAXSPARSE_TEST_ISAS=lean: the `once` cases forced onto an ISA other than the
    default (the first cases of each sweep run on every ISA)."""
    if _test_isas_mode() != "lean" or not jsp.has_cpu_kernels():
        return []
    default = jsp.cpu_isa()
    return [item for item in items if item.get_closest_marker("once")
            and getattr(item, "callspec", None) is not None
            and item.callspec.params.get("isa", default) != default]


def _leave_out(config, items, deselected):
    if deselected:
        gone = {id(item) for item in deselected}
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if id(item) not in gone]


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
