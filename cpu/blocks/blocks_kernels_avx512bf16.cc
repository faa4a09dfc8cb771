// The 1xN block kernels for machines with AVX512-BF16 (AMD Zen 4 and 5, Intel
// from Cooper Lake): the AVX-512 units' kernels recompiled into namespace
// avx512bf16, with the bf16 forward on vdpbf16ps (blocks_bf16dp.h). The tile
// product of blocks_tiles.h runs here on vdpbf16ps only when a call asks for
// it (BlocksProblem::tile_product): the pair kernel is faster without AMX.
#define JAXSPARSE_AVX512_NAMESPACE avx512bf16
#define JAXSPARSE_BLOCKS_ISA avx512bf16
#include "cpu/blocks/blocks_kernels.h"
#include "cpu/blocks/blocks_avx512.h"
#include "cpu/blocks/blocks_bf16dp.h"
#include "cpu/blocks/blocks_tiles.h"

namespace jaxsparse {
namespace cpu {
const BlocksKernelTable kBlocksKernelsAvx512Bf16 =
    avx512bf16::MakeTable<avx512bf16::Bf16TileMicro, avx512bf16::Avx512Back>();
}  // namespace cpu
}  // namespace jaxsparse
