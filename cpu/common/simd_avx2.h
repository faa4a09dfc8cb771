// SIMD traits for AVX2 + FMA + F16C (compiled with -mavx2 -mfma -mf16c;
// cpu/common/isa.cc only selects it after checking CPUID and the OS-enabled state).
//
// One `Traits` class in namespace jaxsparse::cpu::avx2: the vector type and the
// handful of operations every format's kernels are written against (see
// cpu/nm/nm_kernels.h for the list). Include it only from translation units
// compiled with this ISA's -m flags (CMake's jaxsparse_add_format does that).
#ifndef JAXSPARSE_CPU_COMMON_SIMD_AVX2_H_
#define JAXSPARSE_CPU_COMMON_SIMD_AVX2_H_
#include <immintrin.h>

#include <cstdint>

#include "cpu/common/dtype_convert.h"

namespace jaxsparse {
namespace cpu {
namespace avx2 {

struct Traits {
  static constexpr int kWidth = 8;
  // 4 ymm of tokens (32) per tile; 16 ymm registers leave 12 for
  // accumulators. Two FMA pipes x 4-5 cycles latency want 8-10 chains.
  static constexpr int kMaxVecs = 4;
  static constexpr int kChains = 8;
  static constexpr int kAccRegs = 12;
  static constexpr int kSquare = 0;  // No register transposes (simd_avx512.h).

  using V = __m256;

  static V Zero() { return _mm256_setzero_ps(); }
  static V Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, V a) { _mm256_storeu_ps(p, a); }
  // One load of the four values, then in-register shuffles.
  static void Spread(__m128 f, V* v) {
    const V q = _mm256_set_m128(f, f);
    v[0] = _mm256_permute_ps(q, 0x00);
    v[1] = _mm256_permute_ps(q, 0x55);
    v[2] = _mm256_permute_ps(q, 0xaa);
    v[3] = _mm256_permute_ps(q, 0xff);
  }
  static void Broadcast4(const float* p, V* v) { Spread(_mm_loadu_ps(p), v); }
  static V Broadcast(const float* p) { return _mm256_set1_ps(*p); }
  static V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V Add(V a, V b) { return _mm256_add_ps(a, b); }

  // Transposing reduction of 8 vectors: fold 128-bit halves, then two
  // rounds of in-lane horizontal adds; a final permute restores lane order.
  static V SumLanes(const V* a) {
    V h[4];
    for (int k = 0; k < 4; ++k) {
      h[k] =
          _mm256_add_ps(_mm256_permute2f128_ps(a[2 * k], a[2 * k + 1], 0x20),
                        _mm256_permute2f128_ps(a[2 * k], a[2 * k + 1], 0x31));
    }
    const V s =
        _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
    return _mm256_permutevar8x32_ps(s,
                                    _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  }

  static void Broadcast4Bf16(const uint16_t* p, V* v) {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    Spread(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16)), v);
  }
  static void Broadcast4F16(const uint16_t* p, V* v) {
    Spread(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))),
           v);
  }
};

}  // namespace avx2
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_COMMON_SIMD_AVX2_H_
