"""The one importer of jaxsparse's compiled extensions (CONVENTIONS.md 6).

It registers every FFI target of the CPU module (`jaxsparse._cpu`, always built), of the CUDA
module (`jaxsparse._cuda`, built when nvcc was found) and of the SIMT emulator module
(`jaxsparse._cuda_emu`, always built: the CUDA handlers compiled for the CPU, as platform-cpu targets
named `jaxsparse_emu_*`) with XLA, once, at import.

`JAXSPARSE_EMULATE_CUDA=1` in the environment at import makes the CPU lowerings of the ops call the
emulated CUDA kernels instead of the CPU kernels (docs/simt_emulator.md).
"""

from __future__ import annotations

import os

import jax

try:
    from jaxsparse import _cpu
except ImportError as err:  # A source checkout that was never built: ops fall back, with a warning.
    _cpu, _cpu_import_error = None, err
else:
    _cpu_import_error = None

try:
    from jaxsparse import _cuda
except ImportError:
    _cuda = None

try:
    from jaxsparse import _cuda_emu
except ImportError:
    _cuda_emu = None

_EMULATE_CUDA = os.environ.get("JAXSPARSE_EMULATE_CUDA", "").strip() not in ("", "0")
if _EMULATE_CUDA and _cuda_emu is None:
    raise ImportError(
        "JAXSPARSE_EMULATE_CUDA is set, but jaxsparse's emulator module (_cuda_emu) is not built: "
        "pip install -e . first"
    )

_TARGETS: dict[str, set[str]] = {"cpu": set(), "cuda": set(), "emu": set()}
for _module, _platform, _kind in ((_cpu, "cpu", "cpu"), (_cuda, "CUDA", "cuda"),
                                  (_cuda_emu, "cpu", "emu")):
    if _module is not None:
        for _name, _capsule in _module.registrations().items():
            jax.ffi.register_ffi_target(_name, _capsule, platform=_platform)
            _TARGETS[_kind].add(_name)


def has_target(name: str, kind: str) -> bool:
    """True when the module of `kind` ("cpu", "cuda" or "emu", the emulated CUDA handlers)
    registered the FFI target `name` (a format may have no kernel on some platform)."""
    return name in _TARGETS[kind]


def has_cpu_kernels() -> bool:
    """True when the CPU extension is built and its targets are registered."""
    return _cpu is not None


def emulating_cuda() -> bool:
    """True when JAXSPARSE_EMULATE_CUDA=1 routes the CPU lowerings to the emulated CUDA kernels."""
    return _EMULATE_CUDA


def emulating_amx() -> bool:
    """True when JAXSPARSE_EMULATE_AMX=1 at import runs the "amx" ISA's kernels on the AMX tile
    emulator (cpu/common/amx_emulator.h): then "amx" is supported, and the default, on any machine
    with AVX512-BF16, so that machines without AMX test the AMX kernels."""
    return _cpu is not None and _cpu.amx_emulated()


def has_cuda_kernels() -> bool:
    """True when the CUDA extension was built (nvcc present at build time)."""
    return _cuda is not None


def cpu_isa() -> str:
    """The instruction set the CPU kernels run with now: "amx", "avx512bf16", "avx512", "avx2" or
    "portable".

    "avx512bf16" is AVX-512 plus AVX512-BF16, VBMI2 and VNNI (AMD Zen 4 and 5; Intel from
    Sapphire Rapids): the engine's bf16 tile kernels (V:N:M's bf16 products from 32 tokens, the
    2:4 and 1:4 bf16 forward from 12 to 256 tokens) run with `vdpbf16ps` as their multiply, its
    int8 tiles (`jaxsparse.ops.int8_matmul`) with `vpdpbusd`. "amx" adds the AMX tiles (Intel
    Sapphire Rapids and later): the same kernels multiply on the tile unit.
    Everything else runs its AVX-512 kernels under both.
    """
    _require_cpu()
    return _cpu.isa()


def supported_cpu_isas() -> list[str]:
    """The instruction sets this CPU can run, best first."""
    _require_cpu()
    return list(_cpu.supported_isas())


def set_cpu_isa(name: str) -> None:
    """Force the CPU kernels onto one instruction set (for tests and benchmarks).

    The environment variable JAXSPARSE_CPU_ISA does the same at import.

    Args:
        name: one of `supported_cpu_isas()`: "amx", "avx512bf16", "avx512", "avx2", "portable".

    Raises:
        TypeError: `name` is not a string.
        ValueError: `name` is not an ISA this CPU supports.
    """
    _require_cpu()
    if not isinstance(name, str):
        raise TypeError(f"jaxsparse.set_cpu_isa: name must be a string such as 'avx2'; "
                        f"got {type(name).__name__} {name!r}")
    supported = supported_cpu_isas()
    if name not in supported:
        known = ("amx", "avx512bf16", "avx512", "avx2", "portable")
        reason = ("this CPU cannot run it" if name in known
                  else f"the ISAs are {', '.join(known)}")
        raise ValueError(f"jaxsparse.set_cpu_isa: name must be one this CPU supports "
                         f"({', '.join(supported)}); got {name!r} ({reason})")
    _cpu.set_isa(name)


def _require_cpu():
    if _cpu is None:
        raise RuntimeError(f"jaxsparse's CPU extension is not built: {_cpu_import_error}")
