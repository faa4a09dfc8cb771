// The 1xN block kernels instantiated for avx2 (this file is compiled with that
// ISA's -m flags): the portable micro-kernel, whose output loop the compiler
// vectorises for the unit's vector width.
#define JAXSPARSE_BLOCKS_ISA avx2
#include "cpu/blocks/blocks_kernels.h"

namespace jaxsparse {
namespace cpu {
const BlocksKernelTable kBlocksKernelsAvx2 = avx2::MakeTable<avx2::PortableMicro>();
}  // namespace cpu
}  // namespace jaxsparse
