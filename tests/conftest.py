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
