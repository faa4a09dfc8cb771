// The int4 kernels' problem description and kernel tables (layouts in
// cpu/int4/int4_checks.h). Plain data and declarations only (see
// cpu/common/kernel_api.h for why).
#ifndef JAXSPARSE_CPU_INT4_INT4_KERNELS_API_H_
#define JAXSPARSE_CPU_INT4_INT4_KERNELS_API_H_

#include <cstdint>

#include "cpu/common/kernel_api.h"

namespace jaxsparse {
namespace cpu {

struct Int4Problem {
  Dtype dtype;
  int64_t batch;   // B
  int64_t tokens;  // T
  int64_t k;       // K, input features
  int64_t n_out;   // N, output features
  int32_t group;   // inputs per scale; divides K
  const void* dense;  // x [T, K] (products by W) or dy [T, N] (by W^T), per batch
  int64_t dense_stride;           // elements; 0 when broadcast
  const uint8_t* qweight;         // [K/2, N] (dense) or [K/4, N] (2:4) per batch; with
                                  // `lines`, [ceil(N/64) K/2, 64] (int4_checks.h)
  const uint8_t* positions;       // [K/8, N] per batch (2:4 only)
  const void* scales;             // [K/group, N] per batch
  int64_t weight_stride;          // qweight's batch stride in bytes; 0 when broadcast
  int64_t positions_stride;
  int64_t scales_stride;          // elements
  void* out;  // [B, T, N] or [B, T, K]
  // The int8-activation product (a8_matmul): `dense` is xq [B, T, K] int8,
  // each quad of inputs stored in the order (0, 2, 1, 3) that the decoded
  // weight dwords take (int4_checks.h); per token and group of K/group its
  // scale (f32) and the sum of its codes (int32), [B, T, K/group] each.
  const float* x_scales;
  const int32_t* x_sums;
  int64_t x_group_stride;  // elements of x_scales / x_sums per batch entry; 0 when broadcast
  // The dense form's qweight in the CPU lines layout (matmul only, int4_checks.h).
  bool lines;
};

using Int4KernelFn = bool (*)(const Int4Problem& problem, const Runtime& rt);

// Rows [row0, row0 + rows) of x [*, K] (f32/bf16/f16) quantised to int8 per
// row and group of `group` inputs, as jaxsparse.ops.quantize_activations and
// in a8_matmul's operand layout: codes [*, K] in the (0, 2, 1, 3) quad order,
// scales and sums [*, K/group].
using Int4QuantizeFn = void (*)(const void* x, Dtype dtype, int64_t row0, int64_t rows,
                                int64_t k, int32_t group, int8_t* codes, float* scales,
                                int32_t* sums);

struct Int4KernelTable {
  Int4KernelFn matmul;       // y  = x @ W, int4
  Int4KernelFn matmul_t;     // dx = dy @ W^T
  Int4KernelFn nm_matmul;    // the same for int4 + 2:4
  Int4KernelFn nm_matmul_t;
  Int4KernelFn a8_matmul;    // y = x @ W on int8-quantised activations (dense int4)
  Int4QuantizeFn quantize_a8;  // x to a8_matmul's operands, inside the call (no XLA ops)
};

extern const Int4KernelTable kInt4KernelsPortable;
extern const Int4KernelTable kInt4KernelsAvx2;
extern const Int4KernelTable kInt4KernelsAvx512;
// The AVX-512 kernels plus bf16 products on the engine's tiles (int4_tiles.h):
// vdpbf16ps, or AMX; built when the compiler knows the AMX flags.
extern const Int4KernelTable kInt4KernelsAvx512Bf16;
extern const Int4KernelTable kInt4KernelsAmx;
// The same unit on the AMX emulator (cpu/common/amx_unit.h).
extern const Int4KernelTable kInt4KernelsAmxEmulated;

}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_INT4_INT4_KERNELS_API_H_
