// The N:M kernels for AMX machines (compiled with AVX-512, AVX512-BF16,
// VBMI2 and the AMX flags): the AVX-512 kernels, recompiled into namespace
// amx, with the few-token bf16 forward of n:4 weights on the tile unit
// (nm_amx.h).
#define JAXSPARSE_AVX512_NAMESPACE amx
#include "cpu/common/simd_avx512.h"
#include "cpu/nm/nm_kernels_api.h"

#define JAXSPARSE_NM_ISA amx
#include "cpu/nm/nm_kernels.h"
#include "cpu/nm/nm_rowdot_avx512.h"
#include "cpu/nm/nm_rowback_avx512.h"
#include "cpu/nm/nm_amx.h"

namespace jaxsparse {
namespace cpu {
const NmKernelTable kNmKernelsAmx = [] {
  NmKernelTable table = amx::MakeTable<amx::Traits>();
  table.spmm = &amx::SpmmAmxAny;
  table.spmm_t = &amx::SpmmTRowsAny;
  table.sddmm = &amx::SddmmRowsAny;
  return table;
}();
}  // namespace cpu
}  // namespace jaxsparse
