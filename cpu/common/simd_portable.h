// The N:M kernels in plain C++: "vectors" are small float arrays whose loops
// the compiler vectorizes for whatever the target offers (SSE2, NEON, ...).
//
// One `Traits` class in namespace jaxsparse::cpu::portable: the vector type and the
// handful of operations every format's kernels are written against (see
// cpu/nm/nm_kernels.h for the list). Include it only from translation units
// compiled with this ISA's -m flags (CMake's jaxsparse_add_format does that).
#ifndef JAXSPARSE_CPU_COMMON_SIMD_PORTABLE_H_
#define JAXSPARSE_CPU_COMMON_SIMD_PORTABLE_H_
#include <cstdint>

#include "cpu/common/dtype_convert.h"

namespace jaxsparse {
namespace cpu {
namespace portable {

struct Traits {
  // 8 floats = two SSE2/NEON registers per "vector"; 2 vectors per token tile
  // and 4 accumulators keep the unrolled loops within 16 registers.
  static constexpr int kWidth = 8;
  static constexpr int kMaxVecs = 2;
  static constexpr int kChains = 4;
  static constexpr int kAccRegs = 4;
  static constexpr int kSquare = 0;  // No register transposes (simd_avx512.h).

  struct V {
    float v[kWidth];
  };

  static V Zero() {
    V r;
    for (float& f : r.v) f = 0.0f;
    return r;
  }
  static V Load(const float* p) {
    V r;
    for (int l = 0; l < kWidth; ++l) r.v[l] = p[l];
    return r;
  }
  static void Store(float* p, const V& a) {
    for (int l = 0; l < kWidth; ++l) p[l] = a.v[l];
  }
  static void Broadcast4(const float* p, V* v) {
    for (int e = 0; e < 4; ++e)
      for (float& f : v[e].v) f = p[e];
  }
  static V Broadcast(const float* p) {
    V r;
    for (float& f : r.v) f = *p;
    return r;
  }
  static V Fma(const V& a, const V& b, const V& c) {
    V r;
    for (int l = 0; l < kWidth; ++l) r.v[l] = a.v[l] * b.v[l] + c.v[l];
    return r;
  }
  static V Add(const V& a, const V& b) {
    V r;
    for (int l = 0; l < kWidth; ++l) r.v[l] = a.v[l] + b.v[l];
    return r;
  }
  static V SumLanes(const V* acc) {
    V r;
    for (int q = 0; q < kWidth; ++q) {
      float s = 0.0f;
      for (int l = 0; l < kWidth; ++l) s += acc[q].v[l];
      r.v[q] = s;
    }
    return r;
  }
  static void Broadcast4Bf16(const uint16_t* p, V* v) {
    const float f[4] = {Bf16ToF32(p[0]), Bf16ToF32(p[1]), Bf16ToF32(p[2]),
                        Bf16ToF32(p[3])};
    Broadcast4(f, v);
  }
  static void Broadcast4F16(const uint16_t* p, V* v) {
    const float f[4] = {F16ToF32(p[0]), F16ToF32(p[1]), F16ToF32(p[2]),
                        F16ToF32(p[3])};
    Broadcast4(f, v);
  }
};

}  // namespace portable
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_COMMON_SIMD_PORTABLE_H_
