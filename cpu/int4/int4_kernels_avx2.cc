// The int4 kernels instantiated for avx2 (this file is compiled with that ISA's
// -m flags): the vector blocks of int4_avx2.h, and the int8-activation product
// at many tokens on decoded u8 panels (int4_a8_avx2.h).
#define JAXSPARSE_KERNEL_ISA avx2
#include "cpu/int4/int4_kernels_api.h"

#define JAXSPARSE_INT4_ISA avx2
#define JAXSPARSE_INT4_AVX2 1
#include "cpu/int4/int4_kernels.h"
#include "cpu/int4/int4_a8_avx2.h"

namespace jaxsparse {
namespace cpu {
const Int4KernelTable kInt4KernelsAvx2 = avx2::MakeInt4TableAvx2();
}  // namespace cpu
}  // namespace jaxsparse
