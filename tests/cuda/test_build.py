"""The CUDA module's build, checked where nvcc is present: both architectures compile without a ptxas
warning (the build's own flags make one an error; without a built module, a compile of its own),
no kernel spills, the 2:4 forward runs on the sparse tensor cores (HMMA.SP in its SASS) and
the int4 MARLIN kernels on the dense ones (HMMA), their 2:4 form on the sparse ones."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

# `once`: CI runs this file with the newest jax only (tests/conftest.py).
pytestmark = [pytest.mark.once,
              pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kernels():
    spec = importlib.util.spec_from_file_location("ptxas_report", ROOT / "cuda" / "ptxas_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.built_module()
    rows = module.module_report(built) if built else module.report()
    # The record of this build: registers, spills, stack and SASS counts per kernel and arch.
    out = ROOT / "build" / "cuda_kernel_resources.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    return rows


def test_every_kernel_builds_for_both_architectures_without_spills(kernels):
    by_name = {}
    for k in kernels:
        by_name.setdefault(k["name"], set()).add(k["arch"])
        assert k["spill_stores"] == k["spill_loads"] == 0, k
        assert k["stack"] == 0, k
    assert all(archs == {"sm_80", "sm_90"} for archs in by_name.values()), by_name
    assert {"SpmmSp24Kernel<bf16>", "SpmmSp24Kernel<f16>"} <= set(by_name)
    vnm_sp = {f"VnmSpmmSpKernel<{rows}, {n}, {t}>" for rows in (16, 32, 64, 128) for n in (1, 2)
              for t in ("bf16", "f16")}
    vnm_generic = {f"Vnm{op}Kernel<{t}>" for op in ("Spmm", "SpmmT", "Sddmm")
                   for t in ("f32", "bf16", "f16")}
    assert vnm_sp | vnm_generic <= set(by_name), sorted(set(by_name))


def test_sp24_forward_uses_sparse_tensor_cores(kernels):
    sp24 = [k for k in kernels if k["name"].startswith("SpmmSp24Kernel")]
    assert len(sp24) == 4
    for k in sp24:
        # 2 k-steps x 8 token tiles of mma.sp per stage; ldmatrix for A and B; cp.async staging.
        assert k["sass"]["HMMA.SP"] == 16, k
        assert k["sass"]["LDSM"] > 0 and k["sass"]["LDGSTS"] > 0, k


def test_backward_kernels_use_tensor_cores(kernels):
    tc = [k for k in kernels if k["name"].split("<")[0] in ("SpmmTTcKernel", "SddmmTcKernel")]
    assert len(tc) == 8
    for k in tc:
        # 2 k16 steps x 8 token/column tiles of dense mma per stage, ldmatrix reads.
        assert k["sass"]["HMMA"] == 16 and k["sass"]["LDSM"] > 0, k


def test_vnm_forward_uses_sparse_tensor_cores(kernels):
    vnm = [k for k in kernels if k["name"].startswith("VnmSpmmSpKernel")]
    assert len(vnm) == 32  # 4 block heights x n = 1, 2 x bf16, f16 x sm_80, sm_90
    for k in vnm:
        rows = int(k["name"].split("<")[1].split(",")[0])
        warps_m = rows // 16
        warps_n = 2 if warps_m >= 4 else 8 // warps_m
        # One m16n8k32 k-step per tile, one mma.sp per n8 tile of the warp's share of 64 tokens;
        # ldmatrix for the gathered x; cp.async for the values and indices ring.
        assert k["sass"]["HMMA.SP"] == 8 // warps_n, k
        assert k["sass"]["LDSM"] > 0 and k["sass"]["LDGSTS"] > 0, k
        # Sized to keep 128 registers per thread (two 256-thread blocks or one 512-thread block
        # per SM): the launch bounds ask for it, and ptxas met it without spilling.
        assert k["registers"] <= 128, k


def test_int4_marlin_kernels_use_tensor_cores(kernels):
    marlin = [k for k in kernels if k["name"].split("<")[0] in ("MarlinKernel",
                                                                "MarlinPerColumnKernel")]
    names = {f"{kind}<{m}, {t}>" for kind in ("MarlinKernel", "MarlinPerColumnKernel")
             for m in (1, 2, 4) for t in ("bf16", "f16")}
    assert {k["name"] for k in marlin} == names
    assert len(marlin) == 24  # 2 scale layouts x 3 token tiles x bf16, f16 x sm_80, sm_90
    for k in marlin:
        m_tiles = int(k["name"].split("<")[1].split(",")[0])
        # One k16 step per warp and stage: 8 n8 tiles of dense mma per 16 tokens, one ldmatrix.x4
        # of A per 16 tokens, cp.async staging of x, the packed words (and the group scales).
        assert k["sass"]["HMMA"] == 8 * m_tiles, k
        assert k["sass"]["LDSM"] == m_tiles and k["sass"]["LDGSTS"] > 0, k


def test_int4_nm_marlin_kernels_use_sparse_tensor_cores(kernels):
    nm = [k for k in kernels if k["name"].split("<")[0] in ("MarlinNmKernel",
                                                            "MarlinNmPerColumnKernel")]
    names = {f"{kind}<{tiles}, {t}>" for kind in ("MarlinNmKernel", "MarlinNmPerColumnKernel")
             for tiles in (2, 4) for t in ("bf16", "f16")}
    assert {k["name"] for k in nm} == names
    assert len(nm) == 16  # 2 scale layouts x 16 / 32 tokens x bf16, f16 x sm_80, sm_90
    for k in nm:
        token_tiles = int(k["name"].split("<")[1].split(",")[0])
        # One k32 step per warp and stage: per 8 tokens one ldmatrix.x4 of x and one mma.sp per
        # m16 tile (4 tiles = 64 outputs).
        assert k["sass"]["HMMA.SP"] == 4 * token_tiles, k
        assert k["sass"]["LDSM"] == token_tiles and k["sass"]["LDGSTS"] > 0, k


def test_blocks_forward_uses_tensor_cores(kernels):
    tc = [k for k in kernels if k["name"].startswith("BlocksSpmmTcKernel")]
    names = {f"BlocksSpmmTcKernel<{n}, {t}>" for n in (4, 8, 16, 32) for t in ("bf16", "f16")}
    assert {k["name"] for k in tc} == names
    assert len(tc) == 16  # n = 4, 8, 16, 32 x bf16, f16 x sm_80, sm_90
    for k in tc:
        n = int(k["name"].split("<")[1].split(",")[0])
        # One m16n8k16 per n8 tile of the block row (n = 4 pads one tile) per step of 16 blocks.
        assert k["sass"]["HMMA"] == max(1, n // 8), k
    generic = {f"Blocks{op}Kernel<{t}>" for op in ("SpmmT", "Sddmm") for t in ("f32", "bf16", "f16")}
    assert generic | {"BlocksSpmmKernel<f32>"} <= {k["name"] for k in kernels}
