// Run-time choice of the instruction set every format's CPU kernels use.
#ifndef JAXSPARSE_CPU_COMMON_ISA_H_
#define JAXSPARSE_CPU_COMMON_ISA_H_

#include <string>
#include <vector>


namespace jaxsparse {
namespace cpu {

// Ordered from the least to the most capable. kAvx512Bf16 is AVX-512 plus
// AVX512-BF16, VBMI2 and VNNI (AMD Zen 4 and 5, Intel from Sapphire Rapids):
// the engine's tile kernels run there with vdpbf16ps (bf16) and vpdpbusd
// (int8) as their multiplies. kAmx adds
// the AMX tiles (AMX-TILE, AMX-BF16, AMX-INT8), with the OS's permission to
// use the tile data: the same kernels multiply on the tile unit. Formats
// without such kernels run their AVX-512 ones under both.
enum class Isa { kPortable, kAvx2, kAvx512, kAvx512Bf16, kAmx };

const char* IsaName(Isa isa);
// Returns false for an unknown name.
bool IsaFromName(const std::string& name, Isa* isa);

// The ISAs this CPU and its OS can run, best first (always ends in portable).
std::vector<Isa> SupportedIsas();

// The ISA in use; the initial choice is the best supported ISA.
Isa CurrentIsa();
// Returns false (and changes nothing) when this machine cannot run `isa`.
bool SetCurrentIsa(Isa isa);

// True when JAXSPARSE_EMULATE_AMX=1 was set at load and the build has the
// emulated AMX units (CMake's JAXSPARSE_AMX_EMULATION): then "amx" is
// supported on any machine with AVX512-BF16 (the units' other instructions),
// is the default ISA, and runs the AMX units' emulated build
// (cpu/common/amx_emulator.h), on AMX machines too.
bool AmxEmulated();

// A format's kernel table for the ISA in use. Each format defines one table
// per ISA (kFooPortable, and kFooAvx2 / kFooAvx512 / kFooAvx512Bf16 / kFooAmx
// on x86 builds); pass them here, null for the ones this build or format
// lacks. A format without AMX or AVX512-BF16 kernels runs its AVX-512 ones
// under those ISAs. Under AmxEmulated() "amx" takes `amx_emulated` instead
// of `amx` (a build with one has the other).
template <class Table>
const Table& TableForCurrentIsa(const Table& portable, const Table* avx2,
                                const Table* avx512, const Table* avx512_bf16 = nullptr,
                                const Table* amx = nullptr,
                                const Table* amx_emulated = nullptr) {
  const Isa isa = CurrentIsa();
  if (isa == Isa::kAmx && AmxEmulated() && amx_emulated != nullptr) return *amx_emulated;
  if (isa == Isa::kAmx && !AmxEmulated() && amx != nullptr) return *amx;
  if (isa == Isa::kAvx512Bf16 && avx512_bf16 != nullptr) return *avx512_bf16;
  if ((isa == Isa::kAmx || isa == Isa::kAvx512Bf16 || isa == Isa::kAvx512) && avx512 != nullptr)
    return *avx512;
  if (isa == Isa::kAvx2 && avx2 != nullptr) return *avx2;
  return portable;
}

}  // namespace cpu
}  // namespace jaxsparse

// TableForCurrentIsa(prefix##Portable, &prefix##Avx2, &prefix##Avx512), with
// the x86 tables only where the build has them.
#ifdef JAXSPARSE_AMX_EMULATION
#define JAXSPARSE_AMX_EMULATED_TABLE(prefix) (&prefix##AmxEmulated)
#else
#define JAXSPARSE_AMX_EMULATED_TABLE(prefix) nullptr
#endif
#if defined(JAXSPARSE_X86) && !defined(JAXSPARSE_AVX512_KERNELS)
// An x86 build without the AVX-512 units (CMake's JAXSPARSE_AVX512_KERNELS=OFF).
#define JAXSPARSE_TABLE_FOR_CURRENT_ISA(prefix)                      \
  ::jaxsparse::cpu::TableForCurrentIsa<decltype(prefix##Portable)>( \
      prefix##Portable, &prefix##Avx2, nullptr)
#define JAXSPARSE_TABLE_FOR_CURRENT_ISA_WITH_AMX(prefix) JAXSPARSE_TABLE_FOR_CURRENT_ISA(prefix)
#elif defined(JAXSPARSE_X86)
#define JAXSPARSE_TABLE_FOR_CURRENT_ISA(prefix) \
  ::jaxsparse::cpu::TableForCurrentIsa(prefix##Portable, &prefix##Avx2, &prefix##Avx512)
// The same for a format that also has AVX512-BF16 and AMX kernels
// (prefix##Avx512Bf16, prefix##Amx, built when the compiler knows the AMX
// flags: JAXSPARSE_AMX_KERNELS).
#ifdef JAXSPARSE_AMX_KERNELS
#define JAXSPARSE_TABLE_FOR_CURRENT_ISA_WITH_AMX(prefix)                              \
  ::jaxsparse::cpu::TableForCurrentIsa(prefix##Portable, &prefix##Avx2, &prefix##Avx512, \
                                       &prefix##Avx512Bf16, &prefix##Amx,             \
                                       JAXSPARSE_AMX_EMULATED_TABLE(prefix))
#else
#define JAXSPARSE_TABLE_FOR_CURRENT_ISA_WITH_AMX(prefix) JAXSPARSE_TABLE_FOR_CURRENT_ISA(prefix)
#endif
#else
#define JAXSPARSE_TABLE_FOR_CURRENT_ISA_WITH_AMX(prefix) JAXSPARSE_TABLE_FOR_CURRENT_ISA(prefix)
#define JAXSPARSE_TABLE_FOR_CURRENT_ISA(prefix)                           \
  ::jaxsparse::cpu::TableForCurrentIsa<decltype(prefix##Portable)>(      \
      prefix##Portable, nullptr, nullptr)
#endif

#endif  // JAXSPARSE_CPU_COMMON_ISA_H_
