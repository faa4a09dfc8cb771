// The 1xN block kernels instantiated for portable (this file is compiled with that
// ISA's -m flags): the portable micro-kernel, whose output loop the compiler
// vectorises for the unit's vector width.
#define JAXSPARSE_BLOCKS_ISA portable
#include "cpu/blocks/blocks_kernels.h"

namespace jaxsparse {
namespace cpu {
const BlocksKernelTable kBlocksKernelsPortable = portable::MakeTable<portable::PortableMicro>();
}  // namespace cpu
}  // namespace jaxsparse
