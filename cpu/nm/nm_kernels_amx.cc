// The N:M kernels for AMX machines (compiled with AVX-512, AVX512-BF16,
// VBMI2 and the AMX flags): the AVX-512 kernels, recompiled into namespace
// amx, with the few-token bf16 forward of n:4 weights on the tile unit
// (nm_amx.h).
// Built twice: with the AMX flags (namespace amx, the table below) and, for
// machines without AMX, without them on amx_emulator.h's tile model (namespace
// amx_emulated, the table's name + Emulated): cpu/common/amx_unit.h.
#include "cpu/common/amx_unit.h"
#define JAXSPARSE_AVX512_NAMESPACE JAXSPARSE_AMX_NAMESPACE
#include "cpu/common/simd_avx512.h"
#include "cpu/nm/nm_kernels_api.h"

#define JAXSPARSE_NM_ISA JAXSPARSE_AMX_NAMESPACE
#include "cpu/nm/nm_kernels.h"
#include "cpu/nm/nm_rowdot_avx512.h"
#include "cpu/nm/nm_rowback_avx512.h"
#include "cpu/nm/nm_amx.h"

namespace jaxsparse {
namespace cpu {
namespace unit = JAXSPARSE_AMX_NAMESPACE;
const NmKernelTable JAXSPARSE_AMX_TABLE(kNmKernelsAmx) = [] {
  NmKernelTable table = unit::MakeTable<unit::Traits>();
  table.spmm = &unit::SpmmAmxAny;
  table.spmm_t = &unit::SpmmTRowsAny;
  table.sddmm = &unit::SddmmRowsAny;
  return table;
}();
}  // namespace cpu
}  // namespace jaxsparse
