// The V:N:M kernels instantiated for avx512 (this file is compiled with that
// ISA's -m flags).
#include "cpu/common/simd_avx512.h"
#include "cpu/vnm/vnm_kernels_api.h"
#include "cpu/vnm/vnm_tile_avx512.h"

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
