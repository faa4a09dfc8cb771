// The interface between the engine's handlers (engine_ops.cc) and its per-ISA
// kernel translation units (engine_kernels_{portable,avx512bf16,amx}.cc).
//
// Plain data and declarations only, as every *_kernels_api.h: the ISA units,
// each compiled with its own -m flags, include this header.
#ifndef JAXSPARSE_CPU_ENGINE_ENGINE_KERNELS_API_H_
#define JAXSPARSE_CPU_ENGINE_ENGINE_KERNELS_API_H_

#include <cstdint>

#include "cpu/common/kernel_api.h"

namespace jaxsparse {
namespace cpu {

// One call of jaxsparse_engine_int8_matmul, already validated: per batch
// entry out[T, N] (int32) = a[T, K] . b[K, N] (int8, row-major, dense). The
// batch strides are in elements, 0 when the operand's batch dimension is 1.
struct Int8MatmulProblem {
  int64_t batch;   // B
  int64_t tokens;  // T
  int64_t k;       // K
  int64_t n_out;   // N
  const int8_t* a;
  int64_t a_stride;
  const int8_t* b;
  int64_t b_stride;
  int32_t* out;  // [B, T, N]
};

// A kernel returns false only when scratch memory could not be obtained.
using Int8MatmulFn = bool (*)(const Int8MatmulProblem& problem, const Runtime& rt);

struct EngineKernelTable {
  Int8MatmulFn int8_matmul;
};

// Defined by engine_kernels_<isa>.cc: portable everywhere, the others on x86
// builds whose compiler knows the AMX flags (JAXSPARSE_AMX_KERNELS). The
// avx2 and avx512 ISAs run the portable table (no int8 dot product there).
extern const EngineKernelTable kEngineKernelsPortable;
extern const EngineKernelTable kEngineKernelsAvx512Bf16;
extern const EngineKernelTable kEngineKernelsAmx;
// The same unit on the AMX emulator (cpu/common/amx_unit.h).
extern const EngineKernelTable kEngineKernelsAmxEmulated;

}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_ENGINE_ENGINE_KERNELS_API_H_
