// The interface between the V:N:M handlers (vnm_ops.cc) and the per-ISA
// kernel translation units (vnm_kernels_{portable,avx2,avx512,amx}.cc).
//
// Plain data and declarations only: the ISA translation units, each compiled
// with its own -m flags, include this header, so it must not define inline
// functions (the linker keeps one copy of an inline function per program, and
// a copy taken from the AVX-512 object would then also run on CPUs without
// AVX-512).
#ifndef JAXSPARSE_CPU_VNM_VNM_KERNELS_API_H_
#define JAXSPARSE_CPU_VNM_VNM_KERNELS_API_H_

#include <cstdint>

#include "cpu/common/kernel_api.h"

namespace jaxsparse {
namespace cpu {

// One call of a V:N:M target, already validated (cpu/vnm/vnm_checks.h gives
// the layouts). Leading batch dimensions are element strides: 0 when the
// operand's batch dimension is 1. Operands a target does not use are null.
struct VnmProblem {
  Dtype dtype;
  int64_t batch;   // B
  int64_t tokens;  // T
  int64_t k;       // K, input features
  int64_t n_out;   // N, output features
  int32_t v;       // outputs per panel
  int32_t n;       // kept values per output and group
  int32_t m;       // group size
  const void* x;   // [T, K] per batch
  int64_t x_stride;
  const void* dy;  // [T, N] per batch
  int64_t dy_stride;
  const void* values;  // [N, G * n] per batch
  const uint8_t* indices;  // [N, G * n] per batch, slots 0..3
  const uint8_t* columns;  // [P, G * 4] per batch, positions 0..m-1
  int64_t weight_stride;   // values' and indices' batch stride
  int64_t columns_stride;
  // The forward's optional tiles, packed once (jaxsparse.ops.vnm_pack_tiles),
  // null when absent; per panel, bf16: [v/16 output tiles][ceil(4 G / 32) k
  // steps][1 KB], read by the tile forward (vnm_amx.h); f32: [4 G][v], read
  // by the FMA engine's forward (Spmm in vnm_kernels.h).
  const void* tiles;
  int64_t tiles_stride;  // batch stride, elements
  void* out;  // [B, T, N], [B, T, K] or [B, N, G * n], dense
};

// A kernel returns false only when scratch memory could not be obtained.
using VnmKernelFn = bool (*)(const VnmProblem& problem, const Runtime& rt);

struct VnmKernelTable {
  VnmKernelFn spmm;
  VnmKernelFn spmm_t;
  VnmKernelFn sddmm;
};

// Defined by vnm_kernels_<isa>.cc (the x86 ones only exist on x86 builds).
// Declared unconditionally: this declaration is what gives each const
// definition external linkage.
extern const VnmKernelTable kVnmKernelsPortable;
extern const VnmKernelTable kVnmKernelsAvx2;
extern const VnmKernelTable kVnmKernelsAvx512;
extern const VnmKernelTable kVnmKernelsAvx512Bf16;
extern const VnmKernelTable kVnmKernelsAmx;
// The same unit on the AMX emulator (cpu/common/amx_unit.h).
extern const VnmKernelTable kVnmKernelsAmxEmulated;

}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_VNM_VNM_KERNELS_API_H_
