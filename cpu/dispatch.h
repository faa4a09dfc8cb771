// Run-time choice of the instruction set the N:M kernels use.
#ifndef JAXSPARSE_CPU_DISPATCH_H_
#define JAXSPARSE_CPU_DISPATCH_H_

#include <string>
#include <vector>

#include "cpu/nm_kernels_api.h"

namespace jaxsparse {
namespace cpu {

// Ordered from the least to the most capable.
enum class Isa { kPortable, kAvx2, kAvx512 };

const char* IsaName(Isa isa);
// Returns false for an unknown name.
bool IsaFromName(const std::string& name, Isa* isa);

// The ISAs this CPU and its OS can run, best first (always ends in portable).
std::vector<Isa> SupportedIsas();

// The kernels in use; the initial choice is the best supported ISA.
Isa CurrentIsa();
const NmKernelTable& CurrentKernels();
// Returns false (and changes nothing) when this machine cannot run `isa`.
bool SetCurrentIsa(Isa isa);

}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_DISPATCH_H_
