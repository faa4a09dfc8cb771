// The interface between the N:M handlers (nm_ops.cc) and the per-ISA kernel
// translation units (nm_kernels_{portable,avx2,avx512}.cc).
//
// This header holds plain data and declarations only. It is included by the
// ISA translation units, which are compiled with their own -m flags, so it must
// not define inline functions: the linker keeps one copy of an inline function
// per program, and a copy taken from the AVX-512 object would then also run on
// CPUs without AVX-512.
#ifndef JAXSPARSE_CPU_NM_KERNELS_API_H_
#define JAXSPARSE_CPU_NM_KERNELS_API_H_

#include <cstddef>
#include <cstdint>

#include "cpu/common/kernel_api.h"

namespace jaxsparse {
namespace cpu {

using NmDtype = Dtype;
using NmRuntime = Runtime;

// One call of a target, already validated. Leading batch dimensions are
// expressed as element strides: 0 when the operand's batch dimension is 1.
// Operands a target does not use are null.
struct NmProblem {
  NmDtype dtype;
  int64_t batch;   // B
  int64_t tokens;  // T
  int64_t k;       // K, input features
  int64_t n_out;   // N, output features
  int32_t n;       // kept entries per group
  int32_t m;       // group size
  const void* x;   // [T, K] per batch
  int64_t x_stride;
  const void* dy;  // [T, N] per batch
  int64_t dy_stride;
  const void* values;  // [N, Kc] per batch
  int64_t values_stride;
  const uint8_t* indices;  // [N, Kc] per batch
  int64_t indices_stride;
  // Optional (null when absent; only m = 4): the same positions at 2 bits
  // each, [N, ceil(Kc/4)] bytes per batch, entry c in bits 2*(c%4) of byte
  // c/4. The few-token forward streams these instead of `indices`.
  const uint8_t* indices_2bit;
  int64_t indices_2bit_stride;
  void* out;  // [B, T, N], [B, T, K] or [B, N, Kc], dense
};

// A kernel returns false only when scratch memory could not be obtained.
using NmKernelFn = bool (*)(const NmProblem& problem, const NmRuntime& rt);

struct NmKernelTable {
  NmKernelFn spmm;
  NmKernelFn spmm_t;
  NmKernelFn sddmm;
};

// Defined by nm_kernels_<isa>.cc (the x86 ones only exist on x86 builds).
// Declared unconditionally: this declaration is what gives each const
// definition external linkage.
extern const NmKernelTable kNmKernelsPortable;
extern const NmKernelTable kNmKernelsAvx2;
extern const NmKernelTable kNmKernelsAvx512;
extern const NmKernelTable kNmKernelsAvx512Bf16;
extern const NmKernelTable kNmKernelsAmx;
// The same unit on the AMX emulator (cpu/common/amx_unit.h).
extern const NmKernelTable kNmKernelsAmxEmulated;

}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_NM_KERNELS_API_H_
