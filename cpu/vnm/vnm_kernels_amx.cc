// The V:N:M kernels for AMX machines (compiled with AVX-512, AVX512-BF16 and
// the AMX flags): the AVX-512 kernels, recompiled into namespace amx, with the
// bf16 products (forward, dx, dv) on the tile unit from kAmxMinTokens on
// (vnm_amx.h).
#define JAXSPARSE_AVX512_NAMESPACE amx
#include "cpu/common/simd_avx512.h"
#include "cpu/vnm/vnm_kernels_api.h"
#include "cpu/vnm/vnm_tile_avx512.h"

#define JAXSPARSE_VNM_ISA amx
#include "cpu/vnm/vnm_kernels.h"
#include "cpu/vnm/vnm_avx512.h"
#include "cpu/vnm/vnm_amx.h"

namespace jaxsparse {
namespace cpu {
const VnmKernelTable kVnmKernelsAmx = [] {
  VnmKernelTable table = amx::MakeTable<amx::Traits, amx::Avx512Isa>();
  table.spmm = &amx::SpmmAmxAny;
  table.spmm_t = &amx::SpmmTAmxAny;
  table.sddmm = &amx::SddmmAmxAny;
  return table;
}();
}  // namespace cpu
}  // namespace jaxsparse
