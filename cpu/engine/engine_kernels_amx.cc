// The engine's kernels for AMX machines: the int8 tile products run on
// tdpbssd (int8_tiles.h, compiled with -mamx-tile -mamx-int8).
#define JAXSPARSE_ENGINE_ISA amx
#include "cpu/engine/engine_kernels.h"

#ifndef JAXSPARSE_INT8_TILES_ON_AMX
#error "the amx engine unit needs -mamx-tile and -mamx-int8 (tdpbssd)"
#endif

namespace jaxsparse {
namespace cpu {
const EngineKernelTable kEngineKernelsAmx = amx::MakeEngineTable();
}  // namespace cpu
}  // namespace jaxsparse
