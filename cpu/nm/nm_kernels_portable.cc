// The N:M kernels instantiated for portable (this file is compiled with that
// ISA's -m flags).
#include "cpu/common/simd_portable.h"
#include "cpu/nm/nm_kernels_api.h"

#define JAXSPARSE_NM_ISA portable
#include "cpu/nm/nm_kernels.h"

namespace jaxsparse {
namespace cpu {
const NmKernelTable kNmKernelsPortable =
    portable::MakeTable<portable::Traits>();
}  // namespace cpu
}  // namespace jaxsparse
