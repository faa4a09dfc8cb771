// The V:N:M kernels for AMX machines (compiled with AVX-512, AVX512-BF16 and
// the AMX flags): the AVX-512 kernels, recompiled into namespace amx, with the
// bf16 products (forward, dx, dv) on the tile unit from kAmxMinTokens on
// (vnm_amx.h).
// Built twice: with the AMX flags (namespace amx, the table below) and, for
// machines without AMX, without them on amx_emulator.h's tile model (namespace
// amx_emulated, the table's name + Emulated): cpu/common/amx_unit.h.
#include "cpu/common/amx_unit.h"
#define JAXSPARSE_AVX512_NAMESPACE JAXSPARSE_AMX_NAMESPACE
#include "cpu/common/simd_avx512.h"
#include "cpu/vnm/vnm_kernels_api.h"
#include "cpu/vnm/vnm_tile_avx512.h"

#define JAXSPARSE_VNM_ISA JAXSPARSE_AMX_NAMESPACE
#include "cpu/vnm/vnm_kernels.h"
#include "cpu/vnm/vnm_avx512.h"
#include "cpu/vnm/vnm_amx.h"

namespace jaxsparse {
namespace cpu {
namespace unit = JAXSPARSE_AMX_NAMESPACE;
const VnmKernelTable JAXSPARSE_AMX_TABLE(kVnmKernelsAmx) = [] {
  VnmKernelTable table = unit::MakeTable<unit::Traits, unit::Avx512Isa>();
  table.spmm = &unit::SpmmAmxAny;
  table.spmm_t = &unit::SpmmTAmxAny;
  table.sddmm = &unit::SddmmAmxAny;
  return table;
}();
}  // namespace cpu
}  // namespace jaxsparse
