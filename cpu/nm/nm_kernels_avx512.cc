// The N:M kernels instantiated for avx512 (this file is compiled with that
// ISA's -m flags).
#include "cpu/common/simd_avx512.h"
#include "cpu/nm/nm_kernels_api.h"

#define JAXSPARSE_NM_ISA avx512
#include "cpu/nm/nm_kernels.h"
#include "cpu/nm/nm_rowdot_avx512.h"
#include "cpu/nm/nm_rowback_avx512.h"

namespace jaxsparse {
namespace cpu {
// The forward adds the small-token kernel of nm_rowdot_avx512.h, the
// values' gradient at 1-2 tokens the row kernel of nm_rowback_avx512.h.
const NmKernelTable kNmKernelsAvx512 = [] {
  NmKernelTable table = avx512::MakeTable<avx512::Traits>();
  table.spmm = &avx512::SpmmAvx512Any;
  table.spmm_t = &avx512::SpmmTRowsAny;
  table.sddmm = &avx512::SddmmRowsAny;
  return table;
}();
}  // namespace cpu
}  // namespace jaxsparse
