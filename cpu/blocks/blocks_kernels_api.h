// The interface between the 1xN block handlers (blocks_ops.cc) and the per-ISA
// kernel translation units (blocks_kernels_{portable,avx2,avx512}.cc).
//
// Plain data and declarations only: the ISA translation units, each compiled
// with its own -m flags, include this header, so it must not define inline
// functions (a copy taken from the AVX-512 object could run on a CPU without
// AVX-512).
#ifndef JAXSPARSE_CPU_BLOCKS_BLOCKS_KERNELS_API_H_
#define JAXSPARSE_CPU_BLOCKS_BLOCKS_KERNELS_API_H_

#include <cstdint>

#include "cpu/common/kernel_api.h"

namespace jaxsparse {
namespace cpu {

// A 2-D convolution read through its kernel positions (jaxsparse_blocks_conv):
// x is [images, height, width, channels] channels-last, a token is one output
// pixel (image, oh, ow), and feature (i, j, c) of it is the input at
// (oh * stride_h + i * dilation_h - pad_top, ow * stride_w + j * dilation_w -
// pad_left, c), zero outside the image: the im2col patches, never stored.
struct BlocksConv {
  int64_t height, width, channels;  // the input image
  int64_t out_h, out_w;             // output pixels per image
  int64_t kernel_w;                 // positions per kernel row (the kernel's height is
                                    // features / (kernel_w * channels))
  int64_t stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left;
};

// One call of a 1xN target, already validated (cpu/blocks/blocks_checks.h
// gives the layouts). Batch strides are in elements, 0 when the operand's
// batch dimension is 1. Operands a target does not use are null.
struct BlocksProblem {
  Dtype dtype;
  int64_t batch;   // B
  int64_t tokens;  // T
  int64_t k;       // K, input features
  int64_t n_out;   // N, output features
  int32_t n;       // outputs per block (4, 8, 16 or 32)
  int64_t nnz;     // stored blocks per batch entry
  int64_t rows;    // R = ceil(N / n) block rows
  const void* x;   // [T, K] per batch
  int64_t x_stride;
  const void* dy;  // [T, N] per batch
  int64_t dy_stride;
  const void* values;  // [nnz, n] per batch
  int64_t values_stride;
  const int32_t* indices;  // [nnz] per batch: each block's input
  const int32_t* indptr;   // [R + 1] per batch: where each block row starts
  int64_t indices_stride;
  int64_t indptr_stride;
  void* out;  // [B, T, N], [B, T, K] or [B, nnz, n], dense
  // Set for the convolution targets (the forward, and the sddmm whose dy is
  // [images, out_h, out_w, N]): x is then the images, T = images x out_h x
  // out_w and K = kernel_h x kernel_w x channels (B = 1).
  const BlocksConv* conv;
  // Asks for the bf16 forward on the tile product where the ISA's default is
  // another kernel (JAXSPARSE_BLOCKS_TILES=1: tests of blocks_tiles.h on
  // machines without AMX).
  bool tile_product;
};

// A kernel returns false only when scratch memory could not be obtained.
using BlocksKernelFn = bool (*)(const BlocksProblem& problem, const Runtime& rt);

struct BlocksKernelTable {
  BlocksKernelFn spmm;
  BlocksKernelFn spmm_t;
  BlocksKernelFn sddmm;
};

// Defined by blocks_kernels_<isa>.cc (the x86 ones only exist on x86 builds).
extern const BlocksKernelTable kBlocksKernelsPortable;
extern const BlocksKernelTable kBlocksKernelsAvx2;
extern const BlocksKernelTable kBlocksKernelsAvx512;
extern const BlocksKernelTable kBlocksKernelsAvx512Bf16;
extern const BlocksKernelTable kBlocksKernelsAmx;
// The same unit on the AMX emulator (cpu/common/amx_unit.h).
extern const BlocksKernelTable kBlocksKernelsAmxEmulated;

}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_BLOCKS_BLOCKS_KERNELS_API_H_
