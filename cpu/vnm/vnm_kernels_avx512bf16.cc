// The V:N:M kernels for machines with AVX512-BF16 and VBMI2 but no AMX (AMD
// Zen 4 and 5): the AMX build's kernels (vnm_amx.h), recompiled into namespace
// avx512bf16 without the AMX flags, so their tile products run on vdpbf16ps
// (cpu/engine/bf16_tiles.h) over the same layouts.
#define JAXSPARSE_AVX512_NAMESPACE avx512bf16
#include "cpu/common/simd_avx512.h"
#include "cpu/vnm/vnm_kernels_api.h"
#include "cpu/vnm/vnm_tile_avx512.h"

#define JAXSPARSE_VNM_ISA avx512bf16
#include "cpu/vnm/vnm_kernels.h"
#include "cpu/vnm/vnm_avx512.h"
#include "cpu/vnm/vnm_amx.h"

namespace jaxsparse {
namespace cpu {
const VnmKernelTable kVnmKernelsAvx512Bf16 = [] {
  VnmKernelTable table = avx512bf16::MakeTable<avx512bf16::Traits, avx512bf16::Avx512Isa>();
  table.spmm = &avx512bf16::SpmmAmxAny;
  table.spmm_t = &avx512bf16::SpmmTAmxAny;
  table.sddmm = &avx512bf16::SddmmAmxAny;
  return table;
}();
}  // namespace cpu
}  // namespace jaxsparse
