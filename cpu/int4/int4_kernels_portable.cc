// The int4 kernels instantiated for portable (this file is compiled with that ISA's
// -m flags): the scalar blocks, which the compiler vectorises.
#define JAXSPARSE_KERNEL_ISA portable
#include "cpu/int4/int4_kernels_api.h"

#define JAXSPARSE_INT4_ISA portable
#include "cpu/int4/int4_kernels.h"

namespace jaxsparse {
namespace cpu {
const Int4KernelTable kInt4KernelsPortable = portable::MakeInt4Table();
}  // namespace cpu
}  // namespace jaxsparse
