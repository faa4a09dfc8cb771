// The N:M kernels instantiated for avx2 (this file is compiled with that
// ISA's -m flags).
#include "cpu/common/simd_avx2.h"
#include "cpu/nm/nm_kernels_api.h"

#define JAXSPARSE_NM_ISA avx2
#include "cpu/nm/nm_kernels.h"

namespace jaxsparse {
namespace cpu {
const NmKernelTable kNmKernelsAvx2 = avx2::MakeTable<avx2::Traits>();
}  // namespace cpu
}  // namespace jaxsparse
