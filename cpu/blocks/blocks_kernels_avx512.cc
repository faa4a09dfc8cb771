// The 1xN block kernels instantiated for avx512 (this file is compiled with
// that ISA's -m flags): the forward's micro-kernel is the intrinsic one of
// blocks_avx512.h; the backward ops use the portable loops, vectorised by the
// compiler for zmm.
#define JAXSPARSE_BLOCKS_ISA avx512
#include "cpu/blocks/blocks_kernels.h"
#include "cpu/blocks/blocks_avx512.h"

namespace jaxsparse {
namespace cpu {
const BlocksKernelTable kBlocksKernelsAvx512 = avx512::MakeTable<avx512::Avx512Micro, avx512::Avx512Back>();
}  // namespace cpu
}  // namespace jaxsparse
