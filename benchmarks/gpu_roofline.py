"""Paper predictions for the CUDA kernels on A100 and H100 (no GPU ran any of this).

    python benchmarks/gpu_roofline.py            # the markdown tables of docs/gpu_kernels.md
    python benchmarks/gpu_roofline.py --vnm      # the V:N:M tables
    python benchmarks/gpu_roofline.py --marlin   # the int4 MARLIN tables (dense and 2:4)
    python benchmarks/gpu_roofline.py --blocks   # the 1xN block tables

Per kernel and shape: the FLOPs (dense-equivalent 2*T*K*N) and the bytes each kernel must move at
least once (its operands and result), and the roofline time max(math / peak, bytes / bandwidth) with
the datasheet peaks below; the dense reference is cuBLAS's roofline on the same GPU (bf16 tensor
cores, dense weights). Ratios are upper bounds of what the kernels can reach, not measurements.
"""

from __future__ import annotations

# Datasheet figures (NVIDIA A100 80GB SXM4 and H100 SXM5), dense bf16 tensor-core TFLOP/s, their
# 2:4 sparse rate, f32 CUDA-core TFLOP/s and HBM bandwidth in GB/s.
GPUS = {
    "A100": dict(tc=312e12, tc_sparse=624e12, fma=19.5e12, hbm=2039e9),
    "H100": dict(tc=989e12, tc_sparse=1979e12, fma=67e12, hbm=3350e9),
}
# Warp-level mma/mma.sp (sm_80 instructions) do not reach Hopper's wgmma rate; we assume 2/3 of it
# (an assumption, stated in the doc, not a datasheet figure).
WARP_MMA_FRACTION = {"A100": 1.0, "H100": 2.0 / 3.0}
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
TOKENS = [1, 16, 128, 2048]
BLOCK_TOKENS = 64  # The 2:4 kernel's token tile: fewer tokens still pay a whole tile of math.


def sp24_forward(t, k, n):
    """bytes: x (2TK), packed values (NK), metadata (NK/8), y (2TN); math executed on the sparse
    tensor cores for whole 64-token tiles."""
    flops = 2 * t * k * n
    executed = 2 * max(t, BLOCK_TOKENS) * k * n if t < BLOCK_TOKENS else flops
    bytes_ = 2 * t * k + n * k + n * k / 8 + 2 * t * n
    return flops, executed, bytes_


def dense(t, k, n):
    return 2 * t * k * n, 2 * t * k * n, 2 * t * k + 2 * k * n + 2 * t * n


def backward_tc(t, k, n):
    """spmm_t / sddmm on dense tensor cores over decompressed tiles: the dense math, the sparse
    weight bytes (values + 1-byte positions: 1.5 NK for 2:4) and the dense operands."""
    return 2 * t * k * n, 2 * t * k * n, 2 * t * k + 1.5 * n * k + 2 * t * n


VNM_SPECS = [(64, 2, 8), (128, 2, 16)]
VNM_SHAPES = [(4096, 4096), (4096, 11008)]


def vnm_forward(t, k, n, spec):
    """V:N:M forward on mma.sp (cuda/vnm/vnm_sp.cuh): the condensed problem (4 of every m inputs)
    is a 2:4 product of T x 4K/m x N, run for whole 64-token tiles. Bytes: x once (2TK: the panels
    together select most inputs), values (2 bytes) and indices (1 byte) of the N*K*n/m kept
    entries, the columns (4 bytes per panel and group), y (2TN). The gather's scattered 2-byte
    reads of x are L2 traffic, not modelled here."""
    v, nn, m = spec
    flops = 2 * t * k * n
    executed = 2 * max(t, BLOCK_TOKENS) * (4 * k / m) * n
    bytes_ = 2 * t * k + 3 * n * k * nn / m + 4 * (n / v) * (k / m) + 2 * t * n
    return flops, executed, bytes_


def vnm_backward_cuda_cores(t, k, n, spec):
    """spmm_t and sddmm on the CUDA-core kernels (f32 FMA): spmm_t compares every kept entry of a
    selected slot's panel rows (about 4x the useful T*N*K*n/m FMAs), sddmm does the useful ones.
    Returned as (spmm_t ops, sddmm ops, bytes): 2 ops per FMA or compare."""
    v, nn, m = spec
    useful = t * n * k * nn / m
    bytes_ = 2 * t * k + 3 * n * k * nn / m + 4 * (n / v) * (k / m) + 2 * t * n
    return 2 * 4 * useful, 2 * useful, bytes_


def vnm_table(gpu):
    g = GPUS[gpu]
    rows = ["| spec | T | K x N | dense (cuBLAS roofline) | V:N:M fwd mma.sp | ratio | "
            "spmm_t (CUDA cores) | sddmm (CUDA cores) |", "|---|---|---|---|---|---|---|---|"]
    for spec in VNM_SPECS:
        for t in TOKENS:
            for k, n in VNM_SHAPES:
                _, ex, by = dense(t, k, n)
                t_dense = max(ex / g["tc"], by / g["hbm"])
                _, ex, by = vnm_forward(t, k, n, spec)
                t_fwd = roofline(gpu, ex, by, sparse_tc=True)
                ops_t, ops_s, by = vnm_backward_cuda_cores(t, k, n, spec)
                t_bt = roofline(gpu, ops_t, by, sparse_tc=False, tensor_cores=False)
                t_bs = roofline(gpu, ops_s, by, sparse_tc=False, tensor_cores=False)
                rows.append(f"| {':'.join(map(str, spec))} | {t} | {k} x {n} | "
                            f"{t_dense * 1e6:.1f} us | {t_fwd * 1e6:.1f} us | "
                            f"{t_dense / t_fwd:.2f}x | {t_bt * 1e6:.1f} us | "
                            f"{t_bs * 1e6:.1f} us |")
    return "\n".join(rows)


MARLIN_SHAPES = [(4096, 4096), (4096, 11008)]
MARLIN_GROUP = 128


def marlin_token_tile(t):
    """The MARLIN kernel's token tile (cuda/int4/int4_ops.cu): 16, 32, then 64 tokens."""
    return 16 if t <= 16 else 32 if t <= 32 else 64


def marlin_forward(t, k, n, group_size=MARLIN_GROUP):
    """int4 x bf16/f16 on dense tensor cores (cuda/int4/int4_marlin.cuh): math for whole token
    tiles; bytes: x (2TK), the packed codes (KN/2), the group scales (2 KN/g), y (2TN). The
    dequantisation (about 2 CUDA-core instructions per weight and token tile, interleaved with the
    MMAs) is not on the roofline: at 2048 tokens it is ~1/4 of the tensor-core time on A100."""
    tile = marlin_token_tile(t)
    executed = 2 * (-(-t // tile) * tile) * k * n
    bytes_ = 2 * t * k + k * n / 2 + 2 * (k // group_size) * n + 2 * t * n
    return 2 * t * k * n, executed, bytes_


def marlin_nm_forward(t, k, n, group_size=MARLIN_GROUP):
    """int4 + 2:4 on the sparse tensor cores (cuda/int4/int4_marlin_nm.cuh): math for whole 16- or
    32-token tiles at the sparse rate; bytes: x, the kept codes (KN/4), the metadata (KN/8), the
    group scales, y."""
    tile = 16 if t <= 16 else 32
    executed = 2 * (-(-t // tile) * tile) * k * n
    bytes_ = 2 * t * k + k * n / 4 + k * n / 8 + 2 * (k // group_size) * n + 2 * t * n
    return 2 * t * k * n, executed, bytes_


def marlin_table(gpu):
    g = GPUS[gpu]
    rows = ["| T | K x N | dense fp16 (cuBLAS roofline) | int4 MARLIN (g128) | ratio | "
            "int4 + 2:4 (mma.sp, g128) | ratio |", "|---|---|---|---|---|---|---|"]
    for t in TOKENS:
        for k, n in MARLIN_SHAPES:
            _, ex, by = dense(t, k, n)
            t_dense = max(ex / g["tc"], by / g["hbm"])
            _, ex, by = marlin_forward(t, k, n)
            t_marlin = roofline(gpu, ex, by, sparse_tc=False)
            _, ex, by = marlin_nm_forward(t, k, n)
            t_nm = roofline(gpu, ex, by, sparse_tc=True)
            rows.append(f"| {t} | {k} x {n} | {t_dense * 1e6:.1f} us | {t_marlin * 1e6:.1f} us | "
                        f"{t_dense / t_marlin:.2f}x | {t_nm * 1e6:.1f} us | "
                        f"{t_dense / t_nm:.2f}x |")
    return "\n".join(rows)


BLOCKS_SPECS = [(16, 0.25), (16, 0.1)]
BLOCKS_SHAPES = [(4096, 4096), (4096, 11008)]
BLOCKS_TOKEN_TILE = 16  # One warp's tokens (the mma's M): fewer tokens still pay a whole tile.


def blocks_forward(t, k, n, spec):
    """1xN forward on dense mma.m16n8k16 (cuda/blocks/blocks_ops.cu): a block row is a dense
    product over its kept inputs, so the math executed is the kept fraction of the dense math, for
    whole 16-token tiles. Bytes: x once (2TK; the rows' gathers of it are L2 traffic, not
    modelled), values (2 bytes per kept weight), indices (4 bytes per block), y (2TN)."""
    bn, density = spec
    blocks = k * (n / bn) * density
    flops = 2 * t * k * n
    executed = 2 * max(t, BLOCKS_TOKEN_TILE) * k * n * density
    bytes_ = 2 * t * k + 2 * blocks * bn + 4 * blocks + 2 * t * n
    return flops, executed, bytes_


def blocks_backward_cuda_cores(t, k, n, spec):
    """spmm_t and sddmm on the CUDA-core kernels (f32 FMA): each does the useful T*K*N*density
    FMAs (spmm_t over the blocks listed by input, sddmm over the tokens). Returned as (ops,
    bytes)."""
    bn, density = spec
    blocks = k * (n / bn) * density
    bytes_ = 2 * t * k + 2 * blocks * bn + 12 * blocks + 2 * t * n
    return 2 * t * k * n * density, bytes_


def blocks_table(gpu):
    g = GPUS[gpu]
    rows = ["| spec | T | K x N | dense (cuBLAS roofline) | 1xN fwd mma | ratio | "
            "spmm_t, sddmm (CUDA cores, each) |", "|---|---|---|---|---|---|---|"]
    for spec in BLOCKS_SPECS:
        for t in TOKENS:
            for k, n in BLOCKS_SHAPES:
                _, ex, by = dense(t, k, n)
                t_dense = max(ex / g["tc"], by / g["hbm"])
                _, ex, by = blocks_forward(t, k, n, spec)
                t_fwd = roofline(gpu, ex, by, sparse_tc=False)
                ops, by = blocks_backward_cuda_cores(t, k, n, spec)
                t_bw = roofline(gpu, ops, by, sparse_tc=False, tensor_cores=False)
                rows.append(f"| 1x{spec[0]}@{spec[1]} | {t} | {k} x {n} | "
                            f"{t_dense * 1e6:.1f} us | {t_fwd * 1e6:.1f} us | "
                            f"{t_dense / t_fwd:.2f}x | {t_bw * 1e6:.1f} us |")
    return "\n".join(rows)


def roofline(gpu, executed, bytes_, sparse_tc, tensor_cores=True):
    g = GPUS[gpu]
    peak = (g["tc_sparse"] if sparse_tc else g["tc"]) if tensor_cores else g["fma"]
    peak *= WARP_MMA_FRACTION[gpu] if tensor_cores else 1.0
    return max(executed / peak, bytes_ / g["hbm"])


def table(gpu):
    rows = [f"| T | K x N | dense (cuBLAS roofline) | 2:4 fwd mma.sp | ratio | "
            f"backward op (dense TC) | ratio |", "|---|---|---|---|---|---|---|"]
    for t in TOKENS:
        for k, n in SHAPES:
            fl, ex, by = dense(t, k, n)
            t_dense = max(ex / GPUS[gpu]["tc"], by / GPUS[gpu]["hbm"])
            fl, ex, by = sp24_forward(t, k, n)
            t_sp = roofline(gpu, ex, by, sparse_tc=True)
            fl, ex, by = backward_tc(t, k, n)
            t_bw = roofline(gpu, ex, by, sparse_tc=False)
            rows.append(f"| {t} | {k} x {n} | {t_dense * 1e6:.1f} us | {t_sp * 1e6:.1f} us | "
                        f"{t_dense / t_sp:.2f}x | {t_bw * 1e6:.1f} us | {t_dense / t_bw:.2f}x |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    vnm, marlin = "--vnm" in sys.argv[1:], "--marlin" in sys.argv[1:]
    blocks = "--blocks" in sys.argv[1:]
    for gpu in GPUS:
        label = ", V:N:M" if vnm else ", int4 MARLIN" if marlin else ", 1xN" if blocks else ""
        print(f"### {gpu}{label} (predicted)\n")
        print(vnm_table(gpu) if vnm else marlin_table(gpu) if marlin else
              blocks_table(gpu) if blocks else table(gpu))
        print()
