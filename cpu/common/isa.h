// Run-time choice of the instruction set every format's CPU kernels use.
#ifndef JAXSPARSE_CPU_COMMON_ISA_H_
#define JAXSPARSE_CPU_COMMON_ISA_H_

#include <string>
#include <vector>


namespace jaxsparse {
namespace cpu {

// Ordered from the least to the most capable. kAmx is AVX-512 plus
// AVX512-BF16 and the AMX tiles (AMX-TILE, AMX-BF16, AMX-INT8), with the
// OS's permission to use the tile data: the formats with AMX kernels run them
// there, the others their AVX-512 kernels.
enum class Isa { kPortable, kAvx2, kAvx512, kAmx };

const char* IsaName(Isa isa);
// Returns false for an unknown name.
bool IsaFromName(const std::string& name, Isa* isa);

// The ISAs this CPU and its OS can run, best first (always ends in portable).
std::vector<Isa> SupportedIsas();

// The ISA in use; the initial choice is the best supported ISA.
Isa CurrentIsa();
// Returns false (and changes nothing) when this machine cannot run `isa`.
bool SetCurrentIsa(Isa isa);

// A format's kernel table for the ISA in use. Each format defines one table
// per ISA (kFooPortable, and kFooAvx2 / kFooAvx512 / kFooAmx on x86 builds);
// pass them here, null for the ones this build or format lacks. A format
// without AMX kernels runs its AVX-512 ones under kAmx.
template <class Table>
const Table& TableForCurrentIsa(const Table& portable, const Table* avx2,
                                const Table* avx512, const Table* amx = nullptr) {
  const Isa isa = CurrentIsa();
  if (isa == Isa::kAmx && amx != nullptr) return *amx;
  if ((isa == Isa::kAmx || isa == Isa::kAvx512) && avx512 != nullptr) return *avx512;
  if (isa == Isa::kAvx2 && avx2 != nullptr) return *avx2;
  return portable;
}

}  // namespace cpu
}  // namespace jaxsparse

// TableForCurrentIsa(prefix##Portable, &prefix##Avx2, &prefix##Avx512), with
// the x86 tables only where the build has them.
#ifdef JAXSPARSE_X86
#define JAXSPARSE_TABLE_FOR_CURRENT_ISA(prefix) \
  ::jaxsparse::cpu::TableForCurrentIsa(prefix##Portable, &prefix##Avx2, &prefix##Avx512)
// The same for a format that also has AMX kernels (prefix##Amx, built when
// the compiler knows the AMX flags: JAXSPARSE_AMX_KERNELS).
#ifdef JAXSPARSE_AMX_KERNELS
#define JAXSPARSE_TABLE_FOR_CURRENT_ISA_WITH_AMX(prefix)                              \
  ::jaxsparse::cpu::TableForCurrentIsa(prefix##Portable, &prefix##Avx2, &prefix##Avx512, \
                                       &prefix##Amx)
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
