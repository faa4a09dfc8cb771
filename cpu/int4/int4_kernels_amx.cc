// The int4 kernels instantiated for amx (this file is compiled with that ISA's
// -m flags): the AVX-512 blocks, with bf16 products by W at many tokens on
// the AMX tile unit (tdpbf16ps) (int4_tiles.h).
#define JAXSPARSE_AVX512_NAMESPACE amx
#define JAXSPARSE_KERNEL_ISA amx
#include "cpu/int4/int4_kernels_api.h"

#define JAXSPARSE_INT4_ISA amx
#define JAXSPARSE_INT4_AVX512 1
#include "cpu/int4/int4_kernels.h"
#include "cpu/int4/int4_tiles.h"

namespace jaxsparse {
namespace cpu {
const Int4KernelTable kInt4KernelsAmx = amx::int4::MakeInt4TableWithTiles();
}  // namespace cpu
}  // namespace jaxsparse
