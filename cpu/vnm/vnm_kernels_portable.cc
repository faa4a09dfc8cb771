// The V:N:M kernels instantiated for portable (this file is compiled with that
// ISA's -m flags).
#include "cpu/common/simd_portable.h"
#include "cpu/vnm/vnm_kernels_api.h"

namespace jaxsparse {
namespace cpu {
namespace portable {
// Portable "vectors" are 8 floats (two SSE2/NEON registers): 2 x 3 of
// them (12 registers of accumulators) leave room for the operands in 16.
struct VnmTile {
  static constexpr int kVecs = 1;
  static constexpr int kRows = 6;
};
}  // namespace portable
}  // namespace cpu
}  // namespace jaxsparse

#define JAXSPARSE_VNM_ISA portable
#include "cpu/vnm/vnm_kernels.h"

namespace jaxsparse {
namespace cpu {
const VnmKernelTable kVnmKernelsPortable = portable::MakeTable<portable::Traits>();
}  // namespace cpu
}  // namespace jaxsparse
