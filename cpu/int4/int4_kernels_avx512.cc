// The int4 kernels instantiated for avx512 (this file is compiled with that ISA's
// -m flags): the vector blocks of int4_avx512.h and the f32 products of int4_pairs.h.
#define JAXSPARSE_KERNEL_ISA avx512
#include "cpu/int4/int4_kernels_api.h"

#define JAXSPARSE_INT4_ISA avx512
#define JAXSPARSE_INT4_AVX512 1
#include "cpu/int4/int4_kernels.h"

namespace jaxsparse {
namespace cpu {
const Int4KernelTable kInt4KernelsAvx512 = avx512::MakeInt4Table();
}  // namespace cpu
}  // namespace jaxsparse
