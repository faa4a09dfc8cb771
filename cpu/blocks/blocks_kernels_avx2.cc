// The 1xN block kernels instantiated for avx2 (this file is compiled with that
// ISA's -m flags: AVX2, FMA, F16C): the forward's micro-kernel is the
// intrinsic one of blocks_avx2.h; the backward ops use the portable loops,
// vectorised by the compiler for ymm.
#define JAXSPARSE_BLOCKS_ISA avx2
#include "cpu/blocks/blocks_kernels.h"
#include "cpu/blocks/blocks_avx2.h"

namespace jaxsparse {
namespace cpu {
const BlocksKernelTable kBlocksKernelsAvx2 = avx2::MakeTable<avx2::Avx2Micro, avx2::Avx2Back>();
}  // namespace cpu
}  // namespace jaxsparse
