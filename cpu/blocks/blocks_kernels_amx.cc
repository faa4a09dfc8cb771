// The 1xN block kernels for AMX machines (AVX-512, AVX512-BF16 and the AMX
// flags): the avx512bf16 unit's kernels recompiled into namespace amx, where
// the bf16 forward of n = 16 and 32 from 32 tokens runs on tdpbf16ps
// (blocks_tiles.h; bf16_tiles.h's TileBlock is the AMX one under these flags).
#define JAXSPARSE_AVX512_NAMESPACE amx
#define JAXSPARSE_BLOCKS_ISA amx
#include "cpu/blocks/blocks_kernels.h"
#include "cpu/blocks/blocks_avx512.h"
#include "cpu/blocks/blocks_bf16dp.h"
#include "cpu/blocks/blocks_tiles.h"

namespace jaxsparse {
namespace cpu {
const BlocksKernelTable kBlocksKernelsAmx =
    amx::MakeTable<amx::Bf16TileMicro, amx::Avx512Back>();
}  // namespace cpu
}  // namespace jaxsparse
