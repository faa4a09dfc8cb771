// The V:N:M kernels instantiated for avx2 (this file is compiled with that
// ISA's -m flags).
#include "cpu/common/simd_avx2.h"
#include "cpu/vnm/vnm_kernels_api.h"

namespace jaxsparse {
namespace cpu {
namespace avx2 {
// 6 x 2 ymm accumulators (12 of 16 registers), 2 loads + 6 broadcasts per
// 12 FMAs: within the two load ports' rate at two FMAs per cycle.
struct VnmTile {
  static constexpr int kVecs = 2;
  static constexpr int kRows = 6;
};
}  // namespace avx2
}  // namespace cpu
}  // namespace jaxsparse

#define JAXSPARSE_VNM_ISA avx2
#include "cpu/vnm/vnm_kernels.h"

namespace jaxsparse {
namespace cpu {
const VnmKernelTable kVnmKernelsAvx2 = avx2::MakeTable<avx2::Traits>();
}  // namespace cpu
}  // namespace jaxsparse
