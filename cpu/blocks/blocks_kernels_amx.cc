// The 1xN block kernels for AMX machines (AVX-512, AVX512-BF16 and the AMX
// flags): the avx512bf16 unit's kernels recompiled into namespace amx, where
// the bf16 forward of n = 16 and 32 from 32 tokens runs on tdpbf16ps
// (blocks_tiles.h; bf16_tiles.h's TileBlock is the AMX one under these flags).
// Built twice: with the AMX flags (namespace amx, the table below) and, for
// machines without AMX, without them on amx_emulator.h's tile model (namespace
// amx_emulated, the table's name + Emulated): cpu/common/amx_unit.h.
#include "cpu/common/amx_unit.h"
#define JAXSPARSE_AVX512_NAMESPACE JAXSPARSE_AMX_NAMESPACE
#define JAXSPARSE_BLOCKS_ISA JAXSPARSE_AMX_NAMESPACE
#include "cpu/blocks/blocks_kernels.h"
#include "cpu/blocks/blocks_avx512.h"
#include "cpu/blocks/blocks_bf16dp.h"
#include "cpu/blocks/blocks_tiles.h"

namespace jaxsparse {
namespace cpu {
namespace unit = JAXSPARSE_AMX_NAMESPACE;
const BlocksKernelTable JAXSPARSE_AMX_TABLE(kBlocksKernelsAmx) =
    unit::MakeTable<unit::Bf16TileMicro, unit::Avx512Back>();
}  // namespace cpu
}  // namespace jaxsparse
