// The engine's kernels for AMX machines: the int8 tile products run on
// tdpbssd (int8_tiles.h, compiled with -mamx-tile -mamx-int8).
// Built twice: with the AMX flags (namespace amx, the table below) and, for
// machines without AMX, without them on amx_emulator.h's tile model (namespace
// amx_emulated, the table's name + Emulated): cpu/common/amx_unit.h.
#include "cpu/common/amx_unit.h"
#define JAXSPARSE_ENGINE_ISA JAXSPARSE_AMX_NAMESPACE
#include "cpu/engine/engine_kernels.h"

#ifndef JAXSPARSE_INT8_TILES_ON_AMX
#error "the amx engine unit needs -mamx-tile and -mamx-int8 (tdpbssd), or JAXSPARSE_AMX_EMULATED"
#endif

namespace jaxsparse {
namespace cpu {
namespace unit = JAXSPARSE_AMX_NAMESPACE;
const EngineKernelTable JAXSPARSE_AMX_TABLE(kEngineKernelsAmx) = unit::MakeEngineTable();
}  // namespace cpu
}  // namespace jaxsparse
