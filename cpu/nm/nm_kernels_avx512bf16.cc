// The N:M kernels for machines with AVX512-BF16 and VBMI2 but no AMX (AMD Zen
// 4 and 5): the AMX build's kernels (nm_amx.h), recompiled into namespace
// avx512bf16 without the AMX flags, so the few-token bf16 forward of n:4
// weights multiplies its tiles on vdpbf16ps (cpu/engine/bf16_tiles.h).
#define JAXSPARSE_AVX512_NAMESPACE avx512bf16
#include "cpu/common/simd_avx512.h"
#include "cpu/nm/nm_kernels_api.h"

#define JAXSPARSE_NM_ISA avx512bf16
#include "cpu/nm/nm_kernels.h"
#include "cpu/nm/nm_rowdot_avx512.h"
#include "cpu/nm/nm_rowback_avx512.h"
#include "cpu/nm/nm_amx.h"

namespace jaxsparse {
namespace cpu {
const NmKernelTable kNmKernelsAvx512Bf16 = [] {
  NmKernelTable table = avx512bf16::MakeTable<avx512bf16::Traits>();
  table.spmm = &avx512bf16::SpmmAmxAny;
  table.spmm_t = &avx512bf16::SpmmTRowsAny;
  table.sddmm = &avx512bf16::SddmmRowsAny;
  return table;
}();
}  // namespace cpu
}  // namespace jaxsparse
