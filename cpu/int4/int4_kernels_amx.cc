// The int4 kernels instantiated for amx (this file is compiled with that ISA's
// -m flags): the AVX-512 blocks, with bf16 products by W at many tokens on
// the AMX tile unit (tdpbf16ps) (int4_tiles.h).
// Built twice: with the AMX flags (namespace amx, the table below) and, for
// machines without AMX, without them on amx_emulator.h's tile model (namespace
// amx_emulated, the table's name + Emulated): cpu/common/amx_unit.h.
#include "cpu/common/amx_unit.h"
#define JAXSPARSE_AVX512_NAMESPACE JAXSPARSE_AMX_NAMESPACE
#define JAXSPARSE_KERNEL_ISA JAXSPARSE_AMX_NAMESPACE
#include "cpu/int4/int4_kernels_api.h"

#define JAXSPARSE_INT4_ISA JAXSPARSE_AMX_NAMESPACE
#define JAXSPARSE_INT4_AVX512 1
#include "cpu/int4/int4_kernels.h"
#include "cpu/int4/int4_tiles.h"

namespace jaxsparse {
namespace cpu {
namespace unit = JAXSPARSE_AMX_NAMESPACE;
const Int4KernelTable JAXSPARSE_AMX_TABLE(kInt4KernelsAmx) = unit::int4::MakeInt4TableWithTiles();
}  // namespace cpu
}  // namespace jaxsparse
