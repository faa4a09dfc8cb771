// The engine's kernels in scalar C++ (int8_tiles.h's scalar tile product),
// for the portable ISA and, through it, avx2 and avx512: neither has an int8
// dot product instruction, so they have no engine unit of their own.
#define JAXSPARSE_ENGINE_ISA portable
#include "cpu/engine/engine_kernels.h"

namespace jaxsparse {
namespace cpu {
const EngineKernelTable kEngineKernelsPortable = portable::MakeEngineTable();
}  // namespace cpu
}  // namespace jaxsparse
