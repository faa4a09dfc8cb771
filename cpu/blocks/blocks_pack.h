// The forward's pack of x into xT with 8 x 8 register transposes (included by
// blocks_avx512.h and blocks_avx2.h, so by the avx512, avx512bf16 and avx2
// units, in their own namespaces). The 8 x 8 transposes are AVX2.
//
// Why: the scalar pack (blocks_kernels.h, PackTransposedAs) stores one element
// per instruction at a stride of ld, so for 128 tokens x 4096 inputs it is
// half a million strided stores: 9% of the bf16 forward at 1x16@0.1 on Zen 4,
// where the products themselves are short. Here 8 tokens x 8 inputs are
// loaded as 8 rows (one 16- or 32-byte load each), transposed in registers
// (unpacks, all on the shuffle pipes) and stored as 8 runs of 8 tokens.
// The edges (tokens or inputs not a multiple of 8) take the scalar loop. The
// AVX-512 backward's 16 x 16 transpose is simd_avx512.h's.
#ifndef JAXSPARSE_CPU_BLOCKS_BLOCKS_PACK_H_
#define JAXSPARSE_CPU_BLOCKS_BLOCKS_PACK_H_

#include <immintrin.h>

#include <cstdint>

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_BLOCKS_ISA {

// Rows r[i] = token i's 8 inputs (16-bit words) -> r[j] = input j's 8 tokens.
inline void Transpose8x8Words(__m128i r[8]) {
  __m128i a[8], b[8];
  for (int i = 0; i < 4; ++i) {
    a[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
  }
  // a[0]: inputs 0-3 of tokens 0, 1; a[1]: inputs 4-7; a[2], a[3]: tokens 2, 3 ...
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < 2; ++i) {
      b[4 * h + 2 * i] = _mm_unpacklo_epi32(a[4 * h + i], a[4 * h + i + 2]);
      b[4 * h + 2 * i + 1] = _mm_unpackhi_epi32(a[4 * h + i], a[4 * h + i + 2]);
    }
  }
  // b[0]: inputs 0, 1 of tokens 0-3; b[1]: inputs 2, 3; b[2]: 4, 5; b[3]: 6, 7;
  // b[4..7]: the same for tokens 4-7.
  for (int j = 0; j < 4; ++j) {
    r[2 * j] = _mm_unpacklo_epi64(b[j], b[j + 4]);
    r[2 * j + 1] = _mm_unpackhi_epi64(b[j], b[j + 4]);
  }
}

// Rows r[i] = token i's 8 inputs (f32) -> r[j] = input j's 8 tokens.
inline void Transpose8x8Floats(__m256 r[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {
    s[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    s[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // s[j] (j < 4): inputs j and j + 4 of tokens 0-3 in its two halves; s[j + 4]: tokens 4-7.
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(s[j], s[j + 4], 0x20);
    r[j + 4] = _mm256_permute2f128_ps(s[j], s[j + 4], 0x31);
  }
}

// Tokens' feature rows as xT [k][ld] for features [k0, k1): rows(t) is token
// t's row (its feature 0), or null for a token whose features are all zero (a
// convolution's padding). 16-bit words are copied as they are (bf16 kept).
template <class Rows>
inline void PackWordsRows(const Rows& rows, int64_t count, int64_t ld, int64_t k0, int64_t k1,
                          uint16_t* xt) {
  const int64_t t8 = count & ~int64_t{7}, kk8 = k0 + ((k1 - k0) & ~int64_t{7});
  for (int64_t t = 0; t < t8; t += 8) {
    const uint16_t* row[8];
    for (int i = 0; i < 8; ++i) row[i] = static_cast<const uint16_t*>(rows(t + i));
    for (int64_t kk = k0; kk < kk8; kk += 8) {
      __m128i r[8];
      for (int i = 0; i < 8; ++i) {
        r[i] = row[i] != nullptr
                   ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(row[i] + kk))
                   : _mm_setzero_si128();
      }
      Transpose8x8Words(r);
      for (int j = 0; j < 8; ++j) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xt + (kk + j) * ld + t), r[j]);
      }
    }
    for (int i = 0; i < 8; ++i) {
      for (int64_t kk = kk8; kk < k1; ++kk) xt[kk * ld + t + i] = row[i] ? row[i][kk] : 0;
    }
  }
  for (int64_t t = t8; t < count; ++t) {
    const uint16_t* row = static_cast<const uint16_t*>(rows(t));
    for (int64_t kk = k0; kk < k1; ++kk) xt[kk * ld + t] = row ? row[kk] : 0;
  }
  for (int64_t kk = k0; kk < k1; ++kk) {
    for (int64_t t = count; t < ld; ++t) xt[kk * ld + t] = 0;
  }
}

// 8 words (bf16 or f16) widened to f32.
template <Dtype D>
inline __m256 WidenWords(__m128i v) {
  if constexpr (D == Dtype::kBF16) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  } else {
    return _mm256_cvtph_ps(v);
  }
}

// As PackWordsRows, into f32 xT: rows of dtype D, widened.
template <Dtype D, class Rows>
inline void PackFloatsRowsAs(const Rows& rows, int64_t count, int64_t ld, int64_t k0,
                             int64_t k1, float* xt) {
  const int64_t t8 = count & ~int64_t{7}, kk8 = k0 + ((k1 - k0) & ~int64_t{7});
  for (int64_t t = 0; t < t8; t += 8) {
    const void* row[8];
    for (int i = 0; i < 8; ++i) row[i] = rows(t + i);
    for (int64_t kk = k0; kk < kk8; kk += 8) {
      __m256 r[8];
      if constexpr (D == Dtype::kF32) {
        for (int i = 0; i < 8; ++i) {
          r[i] = row[i] != nullptr ? _mm256_loadu_ps(static_cast<const float*>(row[i]) + kk)
                                   : _mm256_setzero_ps();
        }
        Transpose8x8Floats(r);
      } else {
        // Transposed as words, then widened: 8 shuffles fewer than widening first.
        __m128i w[8];
        for (int i = 0; i < 8; ++i) {
          w[i] = row[i] != nullptr ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(
                                         static_cast<const uint16_t*>(row[i]) + kk))
                                   : _mm_setzero_si128();
        }
        Transpose8x8Words(w);
        for (int j = 0; j < 8; ++j) r[j] = WidenWords<D>(w[j]);
      }
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(xt + (kk + j) * ld + t, r[j]);
    }
    for (int i = 0; i < 8; ++i) {
      for (int64_t kk = kk8; kk < k1; ++kk) {
        xt[kk * ld + t + i] = row[i] ? LoadAs(D, row[i], kk) : 0.0f;
      }
    }
  }
  for (int64_t t = t8; t < count; ++t) {
    const void* row = rows(t);
    for (int64_t kk = k0; kk < k1; ++kk) xt[kk * ld + t] = row ? LoadAs(D, row, kk) : 0.0f;
  }
  for (int64_t kk = k0; kk < k1; ++kk) {
    for (int64_t t = count; t < ld; ++t) xt[kk * ld + t] = 0.0f;
  }
}

template <class Rows>
inline void PackFloatsRows(Dtype dtype, const Rows& rows, int64_t count, int64_t ld, int64_t k0,
                           int64_t k1, float* xt) {
  switch (dtype) {
    case Dtype::kBF16:
      return PackFloatsRowsAs<Dtype::kBF16>(rows, count, ld, k0, k1, xt);
    case Dtype::kF16:
      return PackFloatsRowsAs<Dtype::kF16>(rows, count, ld, k0, k1, xt);
    default:
      return PackFloatsRowsAs<Dtype::kF32>(rows, count, ld, k0, k1, xt);
  }
}

}  // namespace JAXSPARSE_BLOCKS_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_BLOCKS_BLOCKS_PACK_H_
