// The int4 kernels instantiated for avx512bf16 (this file is compiled with that ISA's
// -m flags): the AVX-512 blocks, with bf16 products by W at many tokens on
// vdpbf16ps (machines with AVX512-BF16 and no AMX: AMD Zen 4 and 5) (int4_tiles.h).
#define JAXSPARSE_AVX512_NAMESPACE avx512bf16
#define JAXSPARSE_KERNEL_ISA avx512bf16
#include "cpu/int4/int4_kernels_api.h"

#define JAXSPARSE_INT4_ISA avx512bf16
#define JAXSPARSE_INT4_AVX512 1
#include "cpu/int4/int4_kernels.h"
#include "cpu/int4/int4_tiles.h"

namespace jaxsparse {
namespace cpu {
const Int4KernelTable kInt4KernelsAvx512Bf16 = avx512bf16::int4::MakeInt4TableWithTiles();
}  // namespace cpu
}  // namespace jaxsparse
