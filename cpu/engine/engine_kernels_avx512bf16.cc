// The engine's kernels for machines with AVX-512 and AVX512-VNNI but no AMX
// (AMD Zen 4 and 5; the avx512bf16 flags include -mavx512vnni and
// cpu/common/isa.cc checks the CPU has it): the int8 tile products run on
// vpdpbusd (int8_tiles.h).
#define JAXSPARSE_ENGINE_ISA avx512bf16
#include "cpu/engine/engine_kernels.h"

#ifndef JAXSPARSE_INT8_TILES_ON_VNNI
#error "the avx512bf16 engine unit needs -mavx512vnni (vpdpbusd)"
#endif

namespace jaxsparse {
namespace cpu {
const EngineKernelTable kEngineKernelsAvx512Bf16 = avx512bf16::MakeEngineTable();
}  // namespace cpu
}  // namespace jaxsparse
