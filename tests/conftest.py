import jax
import pytest

import jaxsparse as jsp


def pytest_report_header(config):
    isa = jsp.cpu_isa() if jsp.has_cpu_kernels() else "no CPU kernels built"
    return f"jax {jax.__version__}, jaxsparse CPU ISA {isa}, CUDA module: {jsp.has_cuda_kernels()}"


@pytest.fixture(autouse=True)
def _require_kernels():
    # A test run without the extension would silently test the fallback only.
    assert jsp.has_cpu_kernels(), "the CPU extension is not built: pip install -e . first"
