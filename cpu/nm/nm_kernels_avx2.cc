// The N:M kernels instantiated for avx2 (this file is compiled with that
// ISA's -m flags).
#include "cpu/common/simd_avx2.h"
#include "cpu/nm/nm_kernels_api.h"

#define JAXSPARSE_NM_ISA avx2
#include "cpu/nm/nm_kernels.h"
#include "cpu/nm/nm_rowdot_avx2.h"

namespace jaxsparse {
namespace cpu {
// The forward adds the small-token 2:4 kernel of nm_rowdot_avx2.h.
const NmKernelTable kNmKernelsAvx2 = [] {
  NmKernelTable table = avx2::MakeTable<avx2::Traits>();
  table.spmm = &avx2::RunOp<avx2::Traits, avx2::SpmmAvx2>;
  return table;
}();
}  // namespace cpu
}  // namespace jaxsparse
