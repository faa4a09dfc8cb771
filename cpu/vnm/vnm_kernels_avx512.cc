// The V:N:M kernels instantiated for avx512 (this file is compiled with that
// ISA's -m flags).
#include "cpu/common/simd_avx512.h"
#include "cpu/vnm/vnm_kernels_api.h"

namespace jaxsparse {
namespace cpu {
namespace avx512 {
// 6 x 4 zmm accumulators (24 of 32 registers): per reduction step 4 vector
// loads and 6 broadcasts feed 24 FMAs, 10 loads per 12 cycles of two FMA
// pipes, so the FMAs, not the loads, set the pace (the prototype's tile).
struct VnmTile {
  static constexpr int kVecs = 4;
  static constexpr int kRows = 6;
};
}  // namespace avx512
}  // namespace cpu
}  // namespace jaxsparse

#define JAXSPARSE_VNM_ISA avx512
#include "cpu/vnm/vnm_kernels.h"
#include "cpu/vnm/vnm_avx512.h"

namespace jaxsparse {
namespace cpu {
// The vector decoder everywhere, and the streaming forward at few tokens.
const VnmKernelTable kVnmKernelsAvx512 = [] {
  VnmKernelTable table = avx512::MakeTable<avx512::Traits, avx512::Avx512Isa>();
  table.spmm = &avx512::SpmmAvx512Any;
  return table;
}();
}  // namespace cpu
}  // namespace jaxsparse
