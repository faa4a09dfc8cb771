// SIMD traits for AVX-512 F/BW/VL/DQ (compiled with those -m flags;
// cpu/common/isa.cc only selects it after checking CPUID and that the OS saves the
// ZMM and opmask state).
// GCC 12's AVX-512 intrinsic headers warn on their own _mm512_undefined
// placeholders (GCC bug 105593); the same kernel code is still checked for
// these warnings in the portable and AVX2 units.
//
// One `Traits` class in namespace jaxsparse::cpu::avx512: the vector type and the
// handful of operations every format's kernels are written against (see
// cpu/nm/nm_kernels.h for the list). Include it only from translation units
// compiled with this ISA's -m flags (CMake's jaxsparse_add_format does that).
#ifndef JAXSPARSE_CPU_COMMON_SIMD_AVX512_H_
#define JAXSPARSE_CPU_COMMON_SIMD_AVX512_H_
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cstdint>

#include "cpu/common/dtype_convert.h"

// An AMX translation unit (compiled with AVX-512 and more) sets
// JAXSPARSE_AVX512_NAMESPACE to its own namespace, so that its copies of
// these inline functions never stand in for the AVX-512 unit's.
#ifndef JAXSPARSE_AVX512_NAMESPACE
#define JAXSPARSE_AVX512_NAMESPACE avx512
#endif

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_AVX512_NAMESPACE {

// The first `remaining` lanes (all 16 from 16 on): masked loads and stores
// of a row's last, partial vector never touch past its end.
inline __mmask16 LaneMask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF)
                         : static_cast<__mmask16>((1u << remaining) - 1);
}

// Rows r[i] (16 floats each) -> r[j] = column j: unpacks pair the rows within
// 128-bit lanes, shuffles make 4 x 4 blocks, two rounds of lane shuffles move
// the blocks (64 shuffles for 256 elements, where scalar moves take 256
// loads and stores).
inline void Transpose16x16Floats(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // r[4 i + c], lane L: rows 4 i .. 4 i + 3 of column 4 L + c.
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
  // Per c, a 4 x 4 transpose of 128-bit lanes across r[c], r[4 + c], r[8 + c], r[12 + c].
  for (int c = 0; c < 4; ++c) {
    const __m512 u0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
    const __m512 u1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
    const __m512 u2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    const __m512 u3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
    t[c] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    t[4 + c] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    t[8 + c] = _mm512_shuffle_f32x4(u0, u2, 0xdd);
    t[12 + c] = _mm512_shuffle_f32x4(u1, u3, 0xdd);
  }
  for (int j = 0; j < 16; ++j) r[j] = t[j];
}

struct Traits {
  static constexpr int kWidth = 16;
  // 8 zmm of tokens (128) per tile: each entry's value feeds 8 FMAs whose x
  // operands are loads from L1 (about one load per FMA, the load ports' rate
  // at two FMAs per cycle). Two FMA pipes x 4 cycles latency want 8
  // independent chains; 16 of the 32 zmm may hold them.
  static constexpr int kMaxVecs = 8;
  static constexpr int kChains = 8;
  static constexpr int kAccRegs = 16;
  // Squares of this many floats that TransposeSquare moves in registers (0:
  // none; the packs then move elements one by one).
  static constexpr int kSquare = 16;

  using V = __m512;

  // dst[j * ldd + i] = src[i * ld + j] for a 16 x 16 square: 16 loads, 64
  // shuffles and 16 stores where element moves take 256 loads and strided
  // stores.
  static void TransposeSquare(const float* src, int64_t ld, float* dst, int64_t ldd) {
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld);
    Transpose16x16Floats(r);
    for (int j = 0; j < 16; ++j) _mm512_storeu_ps(dst + j * ldd, r[j]);
  }

  static V Zero() { return _mm512_setzero_ps(); }
  static V Load(const float* p) { return _mm512_loadu_ps(p); }
  static void Store(float* p, V a) { _mm512_storeu_ps(p, a); }
  // One load of the four values, then in-register shuffles.
  static void Spread(__m128 f, V* v) {
    const V q = _mm512_broadcast_f32x4(f);
    v[0] = _mm512_permute_ps(q, 0x00);
    v[1] = _mm512_permute_ps(q, 0x55);
    v[2] = _mm512_permute_ps(q, 0xaa);
    v[3] = _mm512_permute_ps(q, 0xff);
  }
  static void Broadcast4(const float* p, V* v) { Spread(_mm_loadu_ps(p), v); }
  static V Broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V Add(V a, V b) { return _mm512_add_ps(a, b); }

  // Transposing reduction of 16 vectors in four halving rounds (256-bit
  // halves, 128-bit quarters, then pairs and single lanes inside each
  // quarter); lane 4L + k then holds vector 4k + L, undone by one permute.
  static V SumLanes(const V* a) {
    V h[8], q[4], r[2];
    for (int k = 0; k < 8; ++k) {
      h[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x44),
                           _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xee));
    }
    for (int k = 0; k < 4; ++k) {
      q[k] = _mm512_add_ps(_mm512_shuffle_f32x4(h[2 * k], h[2 * k + 1], 0x88),
                           _mm512_shuffle_f32x4(h[2 * k], h[2 * k + 1], 0xdd));
    }
    for (int k = 0; k < 2; ++k) {
      r[k] = _mm512_add_ps(_mm512_unpacklo_ps(q[2 * k], q[2 * k + 1]),
                           _mm512_unpackhi_ps(q[2 * k], q[2 * k + 1]));
    }
    const V s = _mm512_add_ps(_mm512_shuffle_ps(r[0], r[1], 0x44),
                              _mm512_shuffle_ps(r[0], r[1], 0xee));
    const __m512i order =
        _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, s);
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

// 16 f32 lanes rounded once to bf16 and stored to the lanes in `keep`: the
// vector form of dtype_convert.h's F32ToBf16 (to nearest even: the upper half
// after adding 0x7fff + the kept half's lowest bit; a NaN keeps its upper half
// with the quiet bit set).
inline void StoreBf16(uint16_t* p, __m512 v, __mmask16 keep) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  _mm256_mask_storeu_epi16(p, keep, _mm512_cvtepi32_epi16(r));
}

}  // namespace JAXSPARSE_AVX512_NAMESPACE
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_COMMON_SIMD_AVX512_H_
