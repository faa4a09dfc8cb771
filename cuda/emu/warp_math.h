// The warp collectives of the SIMT emulator: what each lane deposits, and the
// arithmetic that turns the 32 lanes' deposits into their results, written
// from the PTX ISA's per-lane fragment layouts (docs/simt_emulator.md).
#ifndef JAXSPARSE_CUDA_EMU_WARP_MATH_H_
#define JAXSPARSE_CUDA_EMU_WARP_MATH_H_

#include <cstdint>

namespace jaxsparse::emu {

enum class CollectiveKind { kShfl, kBallot, kLdmatrix, kMma, kMmaSp };

// A collective as one lane calls it: lanes of one warp must agree on all of it.
struct Collective {
  CollectiveKind kind;
  uint32_t mask;
  int params[4] = {0, 0, 0, 0};  // Per kind: width/mode, num/trans, types...
};

struct LaneInput {
  uint32_t u[12];  // Registers: shuffled value, A and B fragments, metadata.
  float f[4];      // The C fragment.
  const void* ptr; // ldmatrix row address.
  int arg;         // Shuffle lane argument, ballot predicate.
};

struct LaneResult {
  uint32_t u[4];
  float f[4];
};

const char* CollectiveName(CollectiveKind kind);
bool SameCollective(const Collective& a, const Collective& b);

// Computes every lane's result of a completed collective; lanes outside the
// mask are left alone. Fails the running thread (emu::Fail) on a rule the
// ISA leaves undefined (a shuffle from a lane outside the mask, an invalid
// sparse metadata code).
void Compute(const Collective& op, const LaneInput* inputs, LaneResult* results);

}  // namespace jaxsparse::emu

#endif  // JAXSPARSE_CUDA_EMU_WARP_MATH_H_
