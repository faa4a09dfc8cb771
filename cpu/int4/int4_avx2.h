// The int4 kernels' AVX2 blocks (included by int4_kernels.h in the avx2 unit,
// compiled with -mavx2 -mfma -mf16c), outputs in the 8 lanes of a ymm as in
// int4_avx512.h: a qweight row is contiguous along the outputs, so 8 bytes
// are 8 outputs' nibble pairs (two inputs, or one 2:4 group), and one
// `vpmovzxbd` spreads them over the lanes. The nibbles are split by an and /
// a shift and converted to f32 in registers, the weight read once from memory
// at its 4 bits per value.
//
// AVX2 has 16 ymm registers and no masks: a task's 64 outputs are walked in
// slices of 8 kVecs outputs, each with kVecs x kTokens accumulators (8 of
// them: 2 FMA pipes x 4 cycles of latency on Zen 3 want 8 independent
// chains), and the ragged end of a row is read into a zeroed quadword, never
// past the array.
#include <immintrin.h>

#include <cstring>

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_INT4_ISA {
namespace int4 {

// The canonical column walk puts each qweight row on its own 4 KB page at
// harness sizes, where the hardware prefetchers stop: rows this far ahead are
// requested in software (as int4_avx512.h).
constexpr int64_t kPrefetchRows = 48;

// `count` (1..8) bytes from `p` as 8 dwords, zeros past `count`.
__attribute__((always_inline)) inline __m256i LoadBytes8(const uint8_t* p, int count) {
  if (count >= 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  uint64_t bytes = 0;
  std::memcpy(&bytes, p, static_cast<size_t>(count));
  return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(bytes)));
}

// The lanes below `count` (AVX's maskload reads only those: never faults).
inline __m256i LaneMask(int count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(count),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Outputs [o, o + 8) of a scale row, zeros past `count`.
inline __m256 LoadScales(const float* row, int count) {
  if (count >= 8) return _mm256_loadu_ps(row);
  return _mm256_maskload_ps(row, LaneMask(count));
}

// The outputs of vector v of a slice of kVecs vectors that exist: 0..8.
inline int VecCount(int64_t on, int v) {
  return static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(8, on - 8 * v)));
}

// ---------------------------------------------------------------- products by W, dense form
// Nibbles (lo, hi) of one input pair for 8 outputs as f32: from the canonical
// qweight row (`count` bytes, all 8 when kFull), or from a line (int4_checks.h:
// dword lane l of the 32-byte half (o % 16) / 8 of the row's line holds output
// o's byte in byte (o % 64) / 16, here shifted down by `shift`). The lines
// hold zeros past N and a 32-byte half never leaves its line.
template <bool kLines, bool kFull>
inline void DecodePair(const uint8_t* bytes, int count, __m128i shift, __m128i shift_hi,
                       __m256* wl, __m256* wh) {
  const __m256i low = _mm256_set1_epi32(15);
  __m256i lo, hi;
  if (kLines) {
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
    lo = _mm256_and_si256(_mm256_srl_epi32(d, shift), low);
    hi = _mm256_and_si256(_mm256_srl_epi32(d, shift_hi), low);
  } else {
    const __m256i d =
        kFull ? _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)))
              : LoadBytes8(bytes, count);
    lo = _mm256_and_si256(d, low);
    hi = _mm256_srli_epi32(d, 4);
  }
  *wl = _mm256_cvtepi32_ps(lo);
  *wh = _mm256_cvtepi32_ps(hi);
}

// One slice of kVecs x 8 outputs from o (y points at its column) by kTokens
// tokens; kFull: all kVecs vectors exist (every slice but a ragged last one).
// The unsigned nibbles are multiplied as they are, the - 8 and the scale come
// once per group (y += s (acc - 8 sum x)). Per pair of input rows, kVecs
// decodes of 5 vector operations and 2 kTokens FMAs per vector, in an order
// that fits 16 registers: up to 2 tokens the x broadcasts stay in registers
// and each vector is decoded then used; from 3, the kVecs vectors are decoded
// first and each broadcast (a load) serves all of them.
template <int kTokens, int kVecs, bool kLines, bool kFull>
void ForwardDenseSlice(const Ctx& c, int64_t o, int64_t on, int64_t t0, float* y) {
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out, k = p.k, half_group = p.group / 2, groups = k / p.group;
  const int64_t rows = k / 2, step = kLines ? 64 : n;
  const uint8_t* base[kVecs];
  int counts[kVecs];
  __m128i shift[kVecs], shift_hi[kVecs];
  for (int v = 0; v < kVecs; ++v) {
    const int64_t ov = o + 8 * v;
    counts[v] = kFull ? 8 : VecCount(on, v);
    base[v] = kLines ? c.qweight + (ov / 64) * rows * 64 + (ov % 16) / 8 * 32 : c.qweight + ov;
    const int s = 8 * static_cast<int>(ov % 64 / 16);
    shift[v] = _mm_cvtsi32_si128(s);
    shift_hi[v] = _mm_cvtsi32_si128(s + 4);
  }
  const float* x = c.dense + t0 * k;
  const float* xsum = c.xsum + t0 * groups;
  __m256 out[kVecs][kTokens];
  for (int v = 0; v < kVecs; ++v)
    for (int t = 0; t < kTokens; ++t) out[v][t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 acc[kVecs][kTokens];
    for (int v = 0; v < kVecs; ++v)
      for (int t = 0; t < kTokens; ++t) acc[v][t] = _mm256_setzero_ps();
    for (int64_t r = g * half_group; r < (g + 1) * half_group; ++r) {
      if (!kLines && r + kPrefetchRows < rows) {
        _mm_prefetch(reinterpret_cast<const char*>(base[0] + (r + kPrefetchRows) * n),
                     _MM_HINT_T0);
      }
      const int64_t offset = r * step;
      const float* xr = x + 2 * r;
      if (kTokens <= 2) {
        __m256 x0[kTokens], x1[kTokens];
        for (int t = 0; t < kTokens; ++t) {
          x0[t] = _mm256_broadcast_ss(xr + t * k);
          x1[t] = _mm256_broadcast_ss(xr + t * k + 1);
        }
        for (int v = 0; v < kVecs; ++v) {
          if (!kFull && counts[v] == 0) break;
          __m256 wl, wh;
          DecodePair<kLines, kFull>(base[v] + offset, counts[v], shift[v], shift_hi[v], &wl,
                                    &wh);
          for (int t = 0; t < kTokens; ++t) {
            acc[v][t] = _mm256_fmadd_ps(wl, x0[t], acc[v][t]);
            acc[v][t] = _mm256_fmadd_ps(wh, x1[t], acc[v][t]);
          }
        }
      } else {
        __m256 wl[kVecs], wh[kVecs];
        for (int v = 0; v < kVecs; ++v) {
          wl[v] = wh[v] = _mm256_setzero_ps();
          if (!kFull && counts[v] == 0) continue;
          DecodePair<kLines, kFull>(base[v] + offset, counts[v], shift[v], shift_hi[v],
                                    &wl[v], &wh[v]);
        }
        for (int t = 0; t < kTokens; ++t) {
          const __m256 b0 = _mm256_broadcast_ss(xr + t * k);
          for (int v = 0; v < kVecs; ++v) acc[v][t] = _mm256_fmadd_ps(wl[v], b0, acc[v][t]);
          const __m256 b1 = _mm256_broadcast_ss(xr + t * k + 1);
          for (int v = 0; v < kVecs; ++v) acc[v][t] = _mm256_fmadd_ps(wh[v], b1, acc[v][t]);
        }
      }
    }
    for (int v = 0; v < kVecs; ++v) {
      if (!kFull && counts[v] == 0) break;
      const __m256 s = LoadScales(c.scales + g * n + o + 8 * v, counts[v]);
      for (int t = 0; t < kTokens; ++t) {
        const __m256 offset = _mm256_set1_ps(8.0f * xsum[t * groups + g]);
        out[v][t] = _mm256_fmadd_ps(s, _mm256_sub_ps(acc[v][t], offset), out[v][t]);
      }
    }
  }
  for (int v = 0; v < kVecs; ++v)
    for (int t = 0; t < kTokens; ++t) _mm256_storeu_ps(y + t * kOutBlock + 8 * v, out[v][t]);
}

// A task's `on` outputs from o0 (up to 64; 128 at 1 token for the lines'
// pair tasks), slice by slice into y.
template <int kTokens, int kVecs, bool kLines>
void ForwardDenseSlices(const Ctx& c, int64_t o0, int64_t on, int64_t t0, float* y) {
  for (int64_t col = 0; col < on; col += 8 * kVecs) {
    if (on - col >= 8 * kVecs) {
      ForwardDenseSlice<kTokens, kVecs, kLines, true>(c, o0 + col, on - col, t0, y + col);
    } else {
      ForwardDenseSlice<kTokens, kVecs, kLines, false>(c, o0 + col, on - col, t0, y + col);
    }
  }
}

// kVecs per token count: 8 accumulators (at 3 tokens 6).
template <bool kLines>
void ForwardDenseOf(const Ctx& c, int64_t o0, int64_t on, int64_t t0, int nt, float* y) {
  switch (nt) {
    case 1: return ForwardDenseSlices<1, 8, kLines>(c, o0, on, t0, y);
    case 2: return ForwardDenseSlices<2, 4, kLines>(c, o0, on, t0, y);
    case 3: return ForwardDenseSlices<3, 2, kLines>(c, o0, on, t0, y);
    default: return ForwardDenseSlices<4, 2, kLines>(c, o0, on, t0, y);
  }
}

inline void ForwardDenseAvx2(const Ctx& c, int64_t o0, int64_t on, int64_t t0, int nt,
                             float* y) {
  ForwardDenseOf<false>(c, o0, on, t0, nt, y);
}

inline void ForwardLinesAvx2(const Ctx& c, int64_t o0, int64_t on, int64_t t0, int nt,
                             float* y) {
  ForwardDenseOf<true>(c, o0, on, t0, nt, y);
}

// ---------------------------------------------------------------- products by W, 2:4 form
// Per 2:4 group j and 8 outputs: the two values (u - 8, as f32) and their
// positions (0..3), which index an in-lane vpermilps of the group's 4 inputs
// x[4j .. 4j + 3] (broadcast to both 128-bit halves, one load per token): it
// reads the low 2 bits of each index, so the positions need shifts only, and
// it is a cheaper shuffle than the cross-lane vpermps (Zen 3: 1 cycle
// against 3-8).
// Two groups share a positions byte (group 2m in its low nibble); their
// accumulators are kept apart, which doubles the chains.
template <int kTokens, int kVecs, bool kFull>
void ForwardSparseSlice(const Ctx& c, int64_t o, int64_t on, int64_t t0, float* y) {
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out, k = p.k, groups = k / p.group, pairs = p.group / 8;
  const int64_t all_pairs = k / 8;
  const __m256i low = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
  int counts[kVecs];
  for (int v = 0; v < kVecs; ++v) counts[v] = kFull ? 8 : VecCount(on, v);
  const uint8_t* qweight = c.qweight + o;
  const uint8_t* positions = c.positions + o;
  const float* x = c.dense + t0 * k;
  __m256 out[kVecs][kTokens];
  for (int v = 0; v < kVecs; ++v)
    for (int t = 0; t < kTokens; ++t) out[v][t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 acc[2][kVecs][kTokens];
    for (int h = 0; h < 2; ++h)
      for (int v = 0; v < kVecs; ++v)
        for (int t = 0; t < kTokens; ++t) acc[h][v][t] = _mm256_setzero_ps();
    for (int64_t m = g * pairs; m < (g + 1) * pairs; ++m) {
      if (m + kPrefetchRows < all_pairs) {
        const int64_t ahead = m + kPrefetchRows;
        _mm_prefetch(reinterpret_cast<const char*>(positions + ahead * n), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(qweight + 2 * ahead * n), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(qweight + (2 * ahead + 1) * n), _MM_HINT_T0);
      }
      for (int v = 0; v < kVecs; ++v) {
        if (!kFull && counts[v] == 0) break;
        const __m256i codes = LoadBytes8(positions + m * n + 8 * v, counts[v]);
        for (int h = 0; h < 2; ++h) {
          const int64_t j = 2 * m + h;
          // vpermilps reads the low 2 bits of each index: no masking.
          const __m256i p0 = h ? _mm256_srli_epi32(codes, 4) : codes;
          const __m256i p1 = _mm256_srli_epi32(codes, 4 * h + 2);
          const __m256i d = LoadBytes8(qweight + j * n + 8 * v, counts[v]);
          const __m256 w0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(d, low), eight));
          const __m256 w1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(d, 4), eight));
          for (int t = 0; t < kTokens; ++t) {
            const __m256 xg = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(
                x + t * k + 4 * j));
            acc[h][v][t] = _mm256_fmadd_ps(w0, _mm256_permutevar_ps(xg, p0), acc[h][v][t]);
            acc[h][v][t] = _mm256_fmadd_ps(w1, _mm256_permutevar_ps(xg, p1), acc[h][v][t]);
          }
        }
      }
    }
    for (int v = 0; v < kVecs; ++v) {
      if (!kFull && counts[v] == 0) break;
      const __m256 s = LoadScales(c.scales + g * n + o + 8 * v, counts[v]);
      for (int t = 0; t < kTokens; ++t) {
        out[v][t] = _mm256_fmadd_ps(s, _mm256_add_ps(acc[0][v][t], acc[1][v][t]), out[v][t]);
      }
    }
  }
  for (int v = 0; v < kVecs; ++v)
    for (int t = 0; t < kTokens; ++t) _mm256_storeu_ps(y + t * kOutBlock + 8 * v, out[v][t]);
}

template <int kTokens, int kVecs>
void ForwardSparseSlices(const Ctx& c, int64_t o0, int64_t on, int64_t t0, float* y) {
  for (int64_t col = 0; col < on; col += 8 * kVecs) {
    if (on - col >= 8 * kVecs) {
      ForwardSparseSlice<kTokens, kVecs, true>(c, o0 + col, on - col, t0, y + col);
    } else {
      ForwardSparseSlice<kTokens, kVecs, false>(c, o0 + col, on - col, t0, y + col);
    }
  }
}

// 2 kVecs kTokens accumulators: 8 (6 at 3 tokens).
inline void ForwardSparseAvx2(const Ctx& c, int64_t o0, int64_t on, int64_t t0, int nt,
                              float* y) {
  switch (nt) {
    case 1: return ForwardSparseSlices<1, 4>(c, o0, on, t0, y);
    case 2: return ForwardSparseSlices<2, 2>(c, o0, on, t0, y);
    case 3: return ForwardSparseSlices<3, 1>(c, o0, on, t0, y);
    default: return ForwardSparseSlices<4, 1>(c, o0, on, t0, y);
  }
}

// The 2:4 lines (int4_checks.h): dword lane l of the 32-byte half (o % 16) / 8
// of a chunk's value line and index line holds group 4 ch + j of output o in
// byte j. An index nibble (4 j + p) is the kept value's input in the chunk,
// and vpermilps reads only its low 2 bits, p, the input's place in the
// group's x[16 ch + 4 j ..] (broadcast to both halves): shifts alone decode
// the inputs, and a block's weight is one sequential stream.
template <int kTokens, int kVecs>
void ForwardNmLinesSlice(const Ctx& c, int64_t o, int64_t on, int64_t t0, float* y) {
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out, k = p.k, chunks = (k + 15) / 16, per_group = p.group / 4;
  const __m256i low = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
  int counts[kVecs];
  for (int v = 0; v < kVecs; ++v) counts[v] = VecCount(on, v);
  // Vector v's value line in a chunk (its index line is 4 lines on).
  int64_t place[kVecs];
  for (int v = 0; v < kVecs; ++v) {
    const int64_t ov = o + 8 * v;
    place[v] = (ov / 64) * chunks * 8 * 64 + (ov % 64) / 16 * 64 + (ov % 16) / 8 * 32;
  }
  __m256 out[kVecs][kTokens], acc[2][kVecs][kTokens];
  for (int v = 0; v < kVecs; ++v)
    for (int t = 0; t < kTokens; ++t) {
      out[v][t] = acc[0][v][t] = acc[1][v][t] = _mm256_setzero_ps();
    }
  const float* x = c.dense + t0 * k;
  int64_t g = 0;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    // Pairs of groups in K (K / 4 is even: K is a multiple of 8).
    const int pairs = static_cast<int>(std::min<int64_t>(2, k / 8 - 2 * ch));
    for (int jp = 0; jp < pairs; ++jp) {
      for (int v = 0; v < kVecs; ++v) {
        if (counts[v] == 0) break;
        const uint8_t* values = c.qweight + place[v] + ch * 8 * 64;
        const __m256i vb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values));
        const __m256i ib = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + 4 * 64));
        for (int e = 0; e < 2; ++e) {
          const int shift = 8 * (2 * jp + e);
          const __m256i v0 = _mm256_and_si256(_mm256_srli_epi32(vb, shift), low);
          const __m256i v1 = _mm256_and_si256(_mm256_srli_epi32(vb, shift + 4), low);
          const __m256 w0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(v0, eight));
          const __m256 w1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(v1, eight));
          const __m256i i0 = _mm256_srli_epi32(ib, shift);
          const __m256i i1 = _mm256_srli_epi32(ib, shift + 4);
          const float* xg = x + 16 * ch + 4 * (2 * jp + e);
          for (int t = 0; t < kTokens; ++t) {
            const __m256 xs = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(xg + t * k));
            acc[e][v][t] = _mm256_fmadd_ps(w0, _mm256_permutevar_ps(xs, i0), acc[e][v][t]);
            acc[e][v][t] = _mm256_fmadd_ps(w1, _mm256_permutevar_ps(xs, i1), acc[e][v][t]);
          }
        }
      }
      // Scale groups are multiples of 8 inputs: one may end after any pair.
      if ((4 * ch + 2 * jp + 2) % per_group != 0) continue;
      for (int v = 0; v < kVecs; ++v) {
        if (counts[v] == 0) break;
        const __m256 s = LoadScales(c.scales + g * n + o + 8 * v, counts[v]);
        for (int t = 0; t < kTokens; ++t) {
          out[v][t] = _mm256_fmadd_ps(s, _mm256_add_ps(acc[0][v][t], acc[1][v][t]), out[v][t]);
          acc[0][v][t] = acc[1][v][t] = _mm256_setzero_ps();
        }
      }
      ++g;
    }
  }
  for (int v = 0; v < kVecs; ++v)
    for (int t = 0; t < kTokens; ++t) _mm256_storeu_ps(y + t * kOutBlock + 8 * v, out[v][t]);
}

template <int kTokens, int kVecs>
void ForwardNmLinesSlices(const Ctx& c, int64_t o0, int64_t on, int64_t t0, float* y) {
  for (int64_t col = 0; col < on; col += 8 * kVecs) {
    ForwardNmLinesSlice<kTokens, kVecs>(c, o0 + col, on - col, t0, y + col);
  }
}

// As the canonical 2:4 block: 8 accumulators (6 at 3 tokens); `on` up to 128
// at 1 token (the lines' pair tasks).
inline void ForwardNmLinesAvx2(const Ctx& c, int64_t o0, int64_t on, int64_t t0, int nt,
                               float* y) {
  switch (nt) {
    case 1: return ForwardNmLinesSlices<1, 4>(c, o0, on, t0, y);
    case 2: return ForwardNmLinesSlices<2, 2>(c, o0, on, t0, y);
    case 3: return ForwardNmLinesSlices<3, 1>(c, o0, on, t0, y);
    default: return ForwardNmLinesSlices<4, 1>(c, o0, on, t0, y);
  }
}

// ---------------------------------------------------------------- products by W^T
// The sum of a vector's 8 lanes.
inline float SumLanes(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Outputs [o, o + 8) of a row of dys, zeros past `count` (the row's end: the
// next token's row or the end of the worker's scratch).
inline __m256 LoadDys(const float* row, int count) {
  if (count >= 8) return _mm256_loadu_ps(row);
  return _mm256_maskload_ps(row, LaneMask(count));
}

// Dense form: kPairs pairs of input rows from row r of the task (even) at
// once, each decoded once per 8 outputs for kTokens tokens (rows of qweight
// are contiguous along the outputs: a sequential walk), 2 kPairs kTokens
// accumulators (8; 6 at 3 tokens), one horizontal sum per row and token.
template <int kTokens, int kPairs>
void BackwardDenseRows(const Ctx& c, int64_t i0, int64_t r, const float* dys, float* dx) {
  const int64_t n = c.p->n_out;
  const __m256i low = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
  const uint8_t* rows = c.qweight + ((i0 + r) >> 1) * n;
  __m256 acc[kPairs][2][kTokens];
  for (int q = 0; q < kPairs; ++q)
    for (int t = 0; t < kTokens; ++t) acc[q][0][t] = acc[q][1][t] = _mm256_setzero_ps();
  for (int64_t o = 0; o < n; o += 8) {
    const int count = static_cast<int>(std::min<int64_t>(8, n - o));
    __m256 g[kTokens];
    for (int t = 0; t < kTokens; ++t) g[t] = LoadDys(dys + t * n + o, count);
    for (int q = 0; q < kPairs; ++q) {
      const __m256i d = LoadBytes8(rows + q * n + o, count);
      const __m256 lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(d, low), eight));
      const __m256 hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(d, 4), eight));
      for (int t = 0; t < kTokens; ++t) {
        acc[q][0][t] = _mm256_fmadd_ps(lo, g[t], acc[q][0][t]);
        acc[q][1][t] = _mm256_fmadd_ps(hi, g[t], acc[q][1][t]);
      }
    }
  }
  for (int q = 0; q < kPairs; ++q)
    for (int t = 0; t < kTokens; ++t)
      for (int e = 0; e < 2; ++e) dx[t * kRowBlock * 4 + r + 2 * q + e] = SumLanes(acc[q][e][t]);
}

// kPairs at a time while they last, then one.
template <int kTokens, int kPairs>
void BackwardDenseTokens(const Ctx& c, int64_t i0, int64_t rows, const float* dys,
                         float* dx) {
  // The task's rows start on an even input and are even in number (groups
  // and row blocks are even).
  int64_t r = 0;
  for (; r + 2 * kPairs <= rows; r += 2 * kPairs) {
    BackwardDenseRows<kTokens, kPairs>(c, i0, r, dys, dx);
  }
  for (; r < rows; r += 2) BackwardDenseRows<kTokens, 1>(c, i0, r, dys, dx);
}

inline void BackwardDenseAvx2(const Ctx& c, int64_t i0, int64_t rows, int nt,
                              const float* dys, float* dx) {
  switch (nt) {
    case 1: return BackwardDenseTokens<1, 4>(c, i0, rows, dys, dx);
    case 2: return BackwardDenseTokens<2, 2>(c, i0, rows, dys, dx);
    case 3: return BackwardDenseTokens<3, 1>(c, i0, rows, dys, dx);
    default: return BackwardDenseTokens<4, 1>(c, i0, rows, dys, dx);
  }
}

// 2:4 form: each group's 4 inputs' weights along the outputs are spread once
// per chunk of kSpreadOutputs outputs into a buffer in L1 (per lane, the
// value whose position is the input, else zero; added, not chosen, since
// unvalidated positions may name an input twice, as the reference sums
// them), then every token multiplies them by its dys, two tokens at a time
// (8 accumulators: 16 registers cannot hold 4 tokens' 16 besides).
constexpr int64_t kSpreadOutputs = 256;

inline void SpreadGroup(const Ctx& c, int64_t j, int64_t o, int count, float* w) {
  const int64_t n = c.p->n_out;
  const __m256i low = _mm256_set1_epi32(15), three = _mm256_set1_epi32(3);
  const __m256i eight = _mm256_set1_epi32(8);
  const __m256i codes = _mm256_srli_epi32(LoadBytes8(c.positions + (j >> 1) * n + o, count),
                                          static_cast<int>(4 * (j & 1)));
  const __m256i p0 = _mm256_and_si256(codes, three);
  const __m256i p1 = _mm256_and_si256(_mm256_srli_epi32(codes, 2), three);
  const __m256i d = LoadBytes8(c.qweight + j * n + o, count);
  const __m256 w0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(d, low), eight));
  const __m256 w1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(d, 4), eight));
  for (int s = 0; s < 4; ++s) {
    const __m256i slot = _mm256_set1_epi32(s);
    const __m256 m0 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(p0, slot));
    const __m256 m1 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(p1, slot));
    _mm256_store_ps(w + s * kSpreadOutputs,
                    _mm256_add_ps(_mm256_and_ps(m0, w0), _mm256_and_ps(m1, w1)));
  }
}

// acc[s][t] += the spread weights of outputs [0, on) times tokens t0 .. t0 +
// kTokens - 1 of dys from output o0; lanes past N read dys as zeros.
template <int kTokens>
void SpreadProducts(const float* w, int64_t on, const float* dys, int64_t n, int64_t o0,
                    __m256 (*acc)[4]) {
  __m256 a[4][kTokens];
  for (int s = 0; s < 4; ++s)
    for (int t = 0; t < kTokens; ++t) a[s][t] = acc[s][t];
  for (int64_t o = 0; o < on; o += 8) {
    const int count = static_cast<int>(std::min<int64_t>(8, on - o));
    for (int t = 0; t < kTokens; ++t) {
      const __m256 g = LoadDys(dys + t * n + o0 + o, count);
      for (int s = 0; s < 4; ++s) {
        a[s][t] = _mm256_fmadd_ps(_mm256_load_ps(w + s * kSpreadOutputs + o), g, a[s][t]);
      }
    }
  }
  for (int s = 0; s < 4; ++s)
    for (int t = 0; t < kTokens; ++t) acc[s][t] = a[s][t];
}

inline void BackwardSparseAvx2(const Ctx& c, int64_t j0, int64_t count, int nt,
                               const float* dys, float* dx) {
  const int64_t n = c.p->n_out;
  alignas(32) float w[4 * kSpreadOutputs];
  for (int64_t r = 0; r < count; ++r) {
    const int64_t j = j0 + r;
    __m256 acc[4][4];  // [s][t]
    for (int s = 0; s < 4; ++s)
      for (int t = 0; t < 4; ++t) acc[s][t] = _mm256_setzero_ps();
    for (int64_t o0 = 0; o0 < n; o0 += kSpreadOutputs) {
      const int64_t on = std::min(kSpreadOutputs, n - o0);
      for (int64_t o = 0; o < on; o += 8) {
        SpreadGroup(c, j, o0 + o, static_cast<int>(std::min<int64_t>(8, on - o)), w + o);
      }
      int t = 0;
      for (; t + 2 <= nt; t += 2) {
        __m256 pair[4][4];
        for (int s = 0; s < 4; ++s) pair[s][0] = acc[s][t], pair[s][1] = acc[s][t + 1];
        SpreadProducts<2>(w, on, dys + t * n, n, o0, pair);
        for (int s = 0; s < 4; ++s) acc[s][t] = pair[s][0], acc[s][t + 1] = pair[s][1];
      }
      if (t < nt) {
        __m256 one[4][4];
        for (int s = 0; s < 4; ++s) one[s][0] = acc[s][t];
        SpreadProducts<1>(w, on, dys + t * n, n, o0, one);
        for (int s = 0; s < 4; ++s) acc[s][t] = one[s][0];
      }
    }
    for (int t = 0; t < nt; ++t)
      for (int s = 0; s < 4; ++s) dx[t * kRowBlock * 4 + 4 * r + s] = SumLanes(acc[s][t]);
  }
}

// ---------------------------------------------------------------- int8 activations
// 8 outputs' weights for the quad of inputs 4j .. 4j + 3 as one dword per lane,
// bytes (u0, u2, u1, u3) as int4_avx512.h's A8Dword: byte rows 2j (a = u0 |
// u1 << 4) and 2j + 1 (b = u2 | u3 << 4) side by side (w = a | b << 8), then
// w's high nibbles moved 12 bits up, (w | w << 12) & 0x0F0F0F0F. xq stores each
// quad in that order, so vpmaddubsw (unsigned codes by signed activations:
// at most 2 x 15 x 127, no saturation) and vpmaddwd by ones sum the quad in
// int32: 3 operations per 32 multiply-adds, where f32 takes 4 FMAs.
template <bool kFull>
inline __m256i A8Dword(const uint8_t* row_a, const uint8_t* row_b, int count) {
  const __m256i a = kFull ? _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                reinterpret_cast<const __m128i*>(row_a)))
                          : LoadBytes8(row_a, count);
  const __m256i b = kFull ? _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                reinterpret_cast<const __m128i*>(row_b)))
                          : LoadBytes8(row_b, count);
  const __m256i w = _mm256_or_si256(a, _mm256_slli_epi32(b, 8));
  return _mm256_and_si256(_mm256_or_si256(w, _mm256_slli_epi32(w, 12)),
                          _mm256_set1_epi32(0x0F0F0F0F));
}

// Products by W on int8 activations, a slice of kVecs x 8 outputs by kTokens
// tokens as the f32 blocks: per group, int32 sums of u * xq (the unsigned
// nibbles; - 8 sum xq comes once per group), then f32 times the token's scale
// and the output's.
template <int kTokens, int kVecs, bool kFull>
void ForwardA8Slice(const Ctx& c, int64_t o, int64_t on, int64_t t0, float* y) {
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out, k = p.k, groups = k / p.group;
  const int8_t* xq = static_cast<const int8_t*>(c.dense_raw) + t0 * k;
  const __m256i ones = _mm256_set1_epi16(1);
  int counts[kVecs];
  for (int v = 0; v < kVecs; ++v) counts[v] = kFull ? 8 : VecCount(on, v);
  const uint8_t* q = c.qweight + o;
  __m256 out[kVecs][kTokens];
  for (int v = 0; v < kVecs; ++v)
    for (int t = 0; t < kTokens; ++t) out[v][t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i acc[kVecs][kTokens];
    for (int v = 0; v < kVecs; ++v)
      for (int t = 0; t < kTokens; ++t) acc[v][t] = _mm256_setzero_si256();
    for (int64_t i = g * p.group; i < (g + 1) * p.group; i += 4) {
      const uint8_t* row = q + (i >> 1) * n;
      if ((i >> 1) + kPrefetchRows + 1 < k / 2) {
        _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * n), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(row + (kPrefetchRows + 1) * n), _MM_HINT_T0);
      }
      __m256i xb[kTokens];
      for (int t = 0; t < kTokens; ++t) {
        int32_t quad;
        std::memcpy(&quad, xq + t * k + i, sizeof quad);
        xb[t] = _mm256_set1_epi32(quad);
      }
      for (int v = 0; v < kVecs; ++v) {
        if (!kFull && counts[v] == 0) break;
        const __m256i d = A8Dword<kFull>(row + 8 * v, row + n + 8 * v, counts[v]);
        for (int t = 0; t < kTokens; ++t) {
          const __m256i pairs = _mm256_maddubs_epi16(d, xb[t]);
          acc[v][t] = _mm256_add_epi32(acc[v][t], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    for (int v = 0; v < kVecs; ++v) {
      if (!kFull && counts[v] == 0) break;
      const __m256 sw = LoadScales(c.scales + g * n + o + 8 * v, counts[v]);
      for (int t = 0; t < kTokens; ++t) {
        const int64_t tg = (t0 + t) * groups + g;
        const __m256i dot = _mm256_sub_epi32(acc[v][t], _mm256_set1_epi32(8 * c.x_sums[tg]));
        const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(c.x_scales[tg]));
        out[v][t] = _mm256_fmadd_ps(sw, f, out[v][t]);
      }
    }
  }
  for (int v = 0; v < kVecs; ++v)
    for (int t = 0; t < kTokens; ++t) _mm256_storeu_ps(y + t * kOutBlock + 8 * v, out[v][t]);
}

template <int kTokens, int kVecs>
void ForwardA8Slices(const Ctx& c, int64_t o0, int64_t on, int64_t t0, float* y) {
  for (int64_t col = 0; col < on; col += 8 * kVecs) {
    if (on - col >= 8 * kVecs) {
      ForwardA8Slice<kTokens, kVecs, true>(c, o0 + col, on - col, t0, y + col);
    } else {
      ForwardA8Slice<kTokens, kVecs, false>(c, o0 + col, on - col, t0, y + col);
    }
  }
}

// kTokens kVecs int32 accumulators: 8 (6 at 3 tokens), the quads' broadcasts
// held (kTokens registers).
inline void ForwardA8Avx2(const Ctx& c, int64_t o0, int64_t on, int64_t t0, int nt, float* y) {
  switch (nt) {
    case 1: return ForwardA8Slices<1, 8>(c, o0, on, t0, y);
    case 2: return ForwardA8Slices<2, 4>(c, o0, on, t0, y);
    case 3: return ForwardA8Slices<3, 2>(c, o0, on, t0, y);
    default: return ForwardA8Slices<4, 2>(c, o0, on, t0, y);
  }
}

}  // namespace int4
}  // namespace JAXSPARSE_INT4_ISA
}  // namespace cpu
}  // namespace jaxsparse
