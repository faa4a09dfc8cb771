// The 1xN block kernels for machines with AVX512-BF16 (AMD Zen 4 and 5, Intel
// from Cooper Lake; the amx ISA runs them too, see below): the AVX-512 units'
// kernels recompiled into namespace avx512bf16, with the bf16 forward on
// vdpbf16ps (blocks_bf16dp.h).
#define JAXSPARSE_AVX512_NAMESPACE avx512bf16
#define JAXSPARSE_BLOCKS_ISA avx512bf16
#include "cpu/blocks/blocks_kernels.h"
#include "cpu/blocks/blocks_avx512.h"
#include "cpu/blocks/blocks_bf16dp.h"

namespace jaxsparse {
namespace cpu {
const BlocksKernelTable kBlocksKernelsAvx512Bf16 =
    avx512bf16::MakeTable<avx512bf16::Bf16DpMicro, avx512bf16::Avx512Back>();
// AMX machines (which all have AVX512-BF16) run the same kernels: a 1xN tile
// product on AMX's tdpbf16ps is not written yet.
const BlocksKernelTable kBlocksKernelsAmx = kBlocksKernelsAvx512Bf16;
}  // namespace cpu
}  // namespace jaxsparse
