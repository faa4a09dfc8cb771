"""Report what each CUDA kernel uses on sm_80 and sm_90.

    python cuda/ptxas_report.py [--out build/cuda_kernel_resources.json] [--compile]

Records per kernel and architecture: registers, spill stores/loads, stack, static shared memory,
and the sparse / dense tensor-core, ldmatrix and cp.async instructions in its SASS (cuobjdump +
nvdisasm from the PyPI packages nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm). The dynamic shared
memory of the tensor-core kernels is fixed in their headers (kSmemBytes).

Two sources, the same rows:
- the built CUDA module (`module_report`, the default when `jaxsparse._cuda` is built): its
  cubins, read in seconds. The build compiled them with `-Xptxas=-v,-warn-spills,-warn-lmem-usage
  --Werror=all-warnings` (CMakeLists.txt), so a ptxas warning or a spill already failed it; local
  memory is what a spill would leave in the cubin.
- a compile of its own (`report`, `--compile`): nvcc on every format's handler file
  (cuda/<format>/<format>_ops.cu) once per architecture, failing on any ptxas error or warning.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("sm_80", "sm_90")
SASS_COUNTS = ("HMMA.SP", "HMMA", "LDSM", "LDGSTS")


def nvidia_tool(name: str) -> str:
    """A CUDA binary tool from the PATH or from the nvidia-* PyPI wheels."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        nvidia = None
    for base in getattr(nvidia, "__path__", []):
        for candidate in Path(base).glob(f"*/bin/{name}"):
            return str(candidate)
    raise FileNotFoundError(f"{name} not found: pip install nvidia-cuda-{name}")


def demangle_name(symbol: str) -> str:
    """The kernel's template name from its mangled symbol: its integer template arguments, then the
    dtype (e.g. SpmmSp24Kernel<bf16>, NmSpmmTKernel<4, f16>, VnmSpmmSpKernel<64, 2, bf16>)."""
    match = re.search(r"\d+([A-Z][A-Za-z0-9]*Kernel)I", symbol)
    if not match:
        return symbol
    dtype = "bf16" if "bfloat16" in symbol else "f16" if "half" in symbol else "f32"
    template = symbol[match.end() - 1:].split("EEv", 1)[0]
    ints = re.findall(r"Li(\d+)E", template)
    return f"{match.group(1)}<{''.join(i + ', ' for i in ints)}{dtype}>"


def format_sources() -> list[Path]:
    """Every format's CUDA handler file: cuda/<format>/<format>_ops.cu."""
    return sorted(p for p in (ROOT / "cuda").glob("*/*_ops.cu") if p.stem == f"{p.parent.name}_ops")


def compile_arch(source: Path, arch: str, workdir: Path) -> tuple[str, Path]:
    import jax

    cubin = workdir / f"{source.stem}.{arch}.cubin"
    cmd = ["nvcc", "-std=c++17", f"-I{ROOT}", f"-I{jax.ffi.include_dir()}",
           "-Xcudafe=--diag_suppress=940", "-Xcudafe=--diag_suppress=2473",
           "--Werror=all-warnings", "-Xptxas=-v,-warn-spills,-warn-lmem-usage", "-cubin",
           f"-arch={arch}", str(source), "-o", str(cubin)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"nvcc failed for {source.name} on {arch}:\n{run.stderr}")
    return run.stderr, cubin


def parse_ptxas(log: str, arch: str) -> dict[str, dict]:
    kernels, current = {}, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line):
            current = m.group(1)
            kernels[current] = {"arch": m.group(2), "name": demangle_name(current)}
        elif current and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                         r"(\d+) bytes spill loads", line)):
            kernels[current].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            kernels[current]["registers"] = int(m[1])
            smem = re.search(r"(\d+) bytes smem", line)
            kernels[current]["static_smem"] = int(smem[1]) if smem else 0
    return kernels


def sass_counts(cubin: Path) -> dict[str, dict[str, int]]:
    return {symbol: count_sass(lines)
            for _, symbol, lines in per_arch_functions(cuobjdump("-sass", str(cubin)))}


def count_sass(lines) -> dict[str, int]:
    """How often each instruction of SASS_COUNTS occurs in a function's SASS lines."""
    counts = dict.fromkeys(SASS_COUNTS, 0)
    for line in lines:
        for op in re.findall(r"\b(HMMA\.SP|HMMA|LDSM|LDGSTS)\b", line):
            counts[op] += 1
    return counts


def compile_and_count(source: Path, arch: str, workdir: Path) -> list[dict]:
    """The rows of one handler file on one architecture."""
    log, cubin = compile_arch(source, arch, workdir)
    kernels = parse_ptxas(log, arch)
    for symbol, sass in sass_counts(cubin).items():
        kernels.setdefault(symbol, {"arch": arch, "name": demangle_name(symbol)})
        kernels[symbol]["sass"] = sass
    fmt = source.parent.name
    return [{"symbol": s, "format": fmt, **k} for s, k in kernels.items()]


def sources_key() -> str:
    """What the report depends on: the device sources (cuda/, and the cpu/ headers they include)
    and nvcc's version. The FFI headers, which differ between jax versions, only reach host code."""
    digest = hashlib.sha256()
    for path in sorted([*(ROOT / "cuda").rglob("*"), *(ROOT / "cpu").rglob("*")]):
        if path.is_file() and path.suffix in (".cu", ".cuh", ".h", ".cc"):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    digest.update(version.encode())
    return digest.hexdigest()[:24]


def report(cache_dir: Path | None = ROOT / "build" / "ptxas_cache") -> list[dict]:
    """Every kernel's row on both architectures. The compiles run in parallel (one per core), and
    the result is kept in `cache_dir` under the sources' key, so a second test run on the same
    tree (CI runs the suite with two Pythons) reads it instead of compiling again."""
    cached = cache_dir / f"{sources_key()}.json" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        return json.loads(cached.read_text())
    jobs = [(source, arch) for source in format_sources() for arch in ARCHS]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        parts = pool.map(lambda job: compile_and_count(*job, Path(tmp)), jobs)
        rows = [row for part in parts for row in part]
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(rows))
    return rows


def built_module() -> Path | None:
    """The installed CUDA module (jaxsparse/_cuda*.so), or None where it was not built."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("jaxsparse._cuda")
    except ImportError:
        return None
    return Path(spec.origin) if spec is not None and spec.origin else None


def cuobjdump(*args: str) -> str:
    env = dict(os.environ)  # -sass runs nvdisasm, found on the PATH.
    env["PATH"] = str(Path(nvidia_tool("nvdisasm")).parent) + os.pathsep + env.get("PATH", "")
    return subprocess.run([nvidia_tool("cuobjdump"), *args], capture_output=True, text=True,
                          env=env, check=True).stdout


def per_arch_functions(listing: str):
    """(arch, symbol, the function's lines) for each function of a cuobjdump listing, whose
    `arch = sm_XX` line heads each embedded cubin."""
    arch, symbol, lines = None, None, []
    for line in listing.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            if symbol:
                yield arch, symbol, lines
            arch, symbol, lines = m.group(1), None, []
        elif m := re.match(r"\s*Function\s*:?\s*(\S+?):?$", line):
            if symbol:
                yield arch, symbol, lines
            symbol, lines = m.group(1), []
        elif symbol:
            lines.append(line)
    if symbol:
        yield arch, symbol, lines


def source_format(symbol: str) -> str:
    """The format whose handler file defined the kernel (its anonymous namespace names the file,
    e.g. _9_nm_ops_cu_), or "shared" for the kernels of cuda/'s shared headers."""
    m = re.search(r"_\d+_([a-z0-9]+)_ops_cu_", symbol)
    return m.group(1) if m else "shared"


def module_report(module: Path) -> list[dict]:
    """Every kernel's row on each architecture, read from the built module's cubins."""
    rows = {}
    for arch, symbol, lines in per_arch_functions(cuobjdump("-res-usage", str(module))):
        usage = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", " ".join(lines)))
        local = int(usage.get("LOCAL", 0))
        rows[arch, symbol] = {
            "symbol": symbol, "format": source_format(symbol), "arch": arch,
            "name": demangle_name(symbol), "stack": int(usage.get("STACK", 0)),
            "spill_stores": local, "spill_loads": local, "registers": int(usage.get("REG", 0)),
            # cuobjdump's SHARED: on sm_90 it counts the 1 KB per block the system reserves.
            "static_smem": int(usage.get("SHARED", 0))}
    for arch, symbol, lines in per_arch_functions(cuobjdump("-sass", str(module))):
        rows[arch, symbol]["sass"] = count_sass(lines)
    return list(rows.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "build" / "cuda_kernel_resources.json"))
    parser.add_argument("--compile", action="store_true",
                        help="compile the sources with nvcc instead of reading the built module")
    args = parser.parse_args(argv)
    module = None if args.compile else built_module()
    rows = module_report(module) if module else report()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"{'kernel':34} {'arch':6} {'regs':>4} {'spill':>5} {'smem':>5}  SASS")
    for r in sorted(rows, key=lambda r: (r["name"], r["arch"])):
        spill = r.get("spill_stores", 0) + r.get("spill_loads", 0)
        sass = " ".join(f"{k}={v}" for k, v in r.get("sass", {}).items() if v)
        print(f"{r['name']:34} {r['arch']:6} {r.get('registers', 0):4} {spill:5} "
              f"{r.get('static_smem', 0):5}  {sass}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
