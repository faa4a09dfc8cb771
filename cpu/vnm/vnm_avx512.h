// The AVX-512 parts of the V:N:M kernels (included by vnm_kernels_avx512.cc
// and vnm_kernels_amx.cc after vnm_kernels.h, inside namespace
// jaxsparse::cpu::JAXSPARSE_VNM_ISA: avx512, or amx). Measured
// facts quoted here come from the project's 2-core Zen 5 (AVX-512, no AMX).
//
// 1. Avx512Isa, the layout transforms of the dense engine:
//    - Decode: the panel tile is [selected input][output], the transpose of
//      the canonical [output][entry] arrays, so 16 rows x 16 entries of values
//      and of slots are transposed in registers (64 shuffles for the floats,
//      64 SSE unpacks for the bytes); then each (group, slot) column of the
//      tile is one compare per kept entry of the group and a masked move /
//      masked add. ~1.5 ns per 16 tile floats against ~6 for the scalar
//      decoder. Every (group, slot) of the block is stored whole: no clearing.
//    - Sample: its inverse for sddmm's Gram tile; TransposeIn/Out: the
//      16 x 16 transposing packs of spmm_t and sddmm; row conversions.
//
// 2. SpmmStream, the forward at up to 16 tokens. The call then streams the
//    weight from DRAM and the work per byte is small; the dense engine would
//    multiply the 2:4 zeros and decode every tile for a few tokens. Here only
//    kept entries are multiplied: per panel, x's selected inputs are gathered
//    into per-token tables (16 floats = 4 groups x 4 slots), and each lane of
//    a row's kept values takes its input from a table by a permute.
//    - Chunk mode (3-16 tokens): a zmm holds the entries of 4 groups of 4 / n
//      rows (a "chunk" of each), one vpermps per token; blocks of chunks keep
//      the tables in L1.
//    - Row mode (1-2 tokens): a zmm holds 16 consecutive entries of one row
//      (one two-table vpermt2ps), so the values and indices are read as two
//      sequential streams, which the hardware prefetchers follow.
//    Reading a panel's rows side by side defeats those prefetchers (measured:
//    16 rows x 32 bytes per step stream at 12.5 GB/s, 2 rows at 6.8, one
//    sequential read at 29.6), hence the software prefetches: each task runs
//    consecutive panels and fetches the next one into L2 while it works, and
//    the first panel's blocks fetch the rows of a block ahead.
#ifndef JAXSPARSE_CPU_VNM_VNM_AVX512_H_
#define JAXSPARSE_CPU_VNM_VNM_AVX512_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

// The inner loops are built from small helpers and lambdas; the compiler's
// inlining budget runs out in these large templates, and an out-of-line
// helper costs a call per chunk and spills the accumulators. So helpers of
// the inner loops are forced inline, and each loop nest is its own
// (non-inlined) function with the whole register file to itself.
#define JAXSPARSE_VNM_INLINE __attribute__((always_inline))

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_VNM_ISA {

// ------------------------------------------------------------------ loads

// 16 values of dtype D as f32; lanes outside `keep` are zero and not read
// (a masked load never faults), so a chunk's tail stays inside the arrays.
template <class D>
JAXSPARSE_VNM_INLINE inline __m512 LoadF32(const typename D::Storage* p, __mmask16 keep) {
  if constexpr (kIsF32<D>) {
    return _mm512_maskz_loadu_ps(keep, p);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(keep, p);
    if constexpr (std::is_same_v<D, BF16>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

// 16 f32 lanes stored as dtype D (rounded once, to nearest even, as
// dtype_convert.h), lanes in `keep` only.
template <class D>
JAXSPARSE_VNM_INLINE inline void StoreF32(typename D::Storage* p, __m512 v, __mmask16 keep) {
  if constexpr (kIsF32<D>) {
    _mm512_mask_storeu_ps(p, keep, v);
  } else if constexpr (std::is_same_v<D, F16>) {
    _mm256_mask_storeu_epi16(p, keep, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    StoreBf16(p, v, keep);  // cpu/common/simd_avx512.h
  }
}

// ------------------------------------------------------------------ transposes

// r[i][j] -> r[j][i] for 16 rows of 16 floats.
JAXSPARSE_VNM_INLINE inline void Transpose16x16(__m512* r) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // In each 128-bit lane L, u[4q + c] holds column 4L + c of rows 4q .. 4q+3.
  for (int q = 0; q < 16; q += 4) {
    for (int h = 0; h < 2; ++h) {
      const __m512d a = _mm512_castps_pd(t[q + h]), b = _mm512_castps_pd(t[q + 2 + h]);
      u[q + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      u[q + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  }
  // Gather the four 128-bit lanes holding column j from u[c], u[4 + c], u[8
  // + c], u[12 + c] (c = j % 4, lane j / 4) in two rounds of lane shuffles.
  __m512 v[16];
  for (int c = 0; c < 4; ++c) {
    for (int half = 0; half < 2; ++half) {
      const int a = 8 * half + c, b = 8 * half + 4 + c;
      v[8 * half + c] = _mm512_shuffle_f32x4(u[a], u[b], 0x88);      // lanes 0, 2
      v[8 * half + 4 + c] = _mm512_shuffle_f32x4(u[a], u[b], 0xdd);  // lanes 1, 3
    }
  }
  for (int c = 0; c < 4; ++c) {
    for (int odd = 0; odd < 2; ++odd) {
      const __m512 a = v[4 * odd + c], b = v[8 + 4 * odd + c];
      r[4 * odd + c] = _mm512_shuffle_f32x4(a, b, 0x88);       // lane 0 / 1
      r[8 + 4 * odd + c] = _mm512_shuffle_f32x4(a, b, 0xdd);   // lane 2 / 3
    }
  }
}

// b[i] byte j -> b[j] byte i for 16 rows of 16 bytes (four unpack rounds:
// after round w, units of 2^w bytes hold 2^w consecutive rows of a column).
JAXSPARSE_VNM_INLINE inline void Transpose16x16Bytes(__m128i* b) {
  __m128i t[16];
  for (int i = 0; i < 8; ++i) {
    t[i] = _mm_unpacklo_epi8(b[2 * i], b[2 * i + 1]);      // columns 0-7
    t[8 + i] = _mm_unpackhi_epi8(b[2 * i], b[2 * i + 1]);  // columns 8-15
  }
  // t[8h + i]: 16-bit unit c = column 8h + c, rows 2i, 2i+1.
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < 4; ++i) {
      b[8 * h + i] = _mm_unpacklo_epi16(t[8 * h + 2 * i], t[8 * h + 2 * i + 1]);
      b[8 * h + 4 + i] = _mm_unpackhi_epi16(t[8 * h + 2 * i], t[8 * h + 2 * i + 1]);
    }
  }
  // b[8h + 4q + i]: 32-bit unit c = column 8h + 4q + c, rows 4i .. 4i+3.
  for (int hq = 0; hq < 4; ++hq) {
    for (int i = 0; i < 2; ++i) {
      t[4 * hq + i] = _mm_unpacklo_epi32(b[4 * hq + 2 * i], b[4 * hq + 2 * i + 1]);
      t[4 * hq + 2 + i] = _mm_unpackhi_epi32(b[4 * hq + 2 * i], b[4 * hq + 2 * i + 1]);
    }
  }
  // t[4hq + 2p + i]: 64-bit unit c = column 4hq + 2p + c, rows 8i .. 8i+7.
  for (int hqp = 0; hqp < 8; ++hqp) {
    const __m128i lo = t[2 * hqp], hi = t[2 * hqp + 1];
    b[2 * hqp] = _mm_unpacklo_epi64(lo, hi);
    b[2 * hqp + 1] = _mm_unpackhi_epi64(lo, hi);
  }
}

// ------------------------------------------------------------------ decode

// Whether a decoder's sink takes whole k steps of bf16 B tiles (TileStep(kk,
// rb): the 1 KB tile of k step kk / 32 and outputs rb .. rb + 15), as the
// engine's BTileSink does.
template <class Sink, class = void>
struct TakesTileSteps : std::false_type {};
template <class Sink>
struct TakesTileSteps<Sink, std::void_t<decltype(Sink::kTakesTileSteps)>>
    : std::bool_constant<Sink::kTakesTileSteps> {};

struct Avx512Isa {
  template <class D>
  static void Decode(const Weight<D>& w, int64_t kc, int32_t n, int64_t r0,
                     int64_t rows, int64_t g0, int64_t g1,
                     const int32_t* slot_kk, int64_t /*nk*/, int64_t ld,
                     float* tile) {
    const F32TileSink sink{tile, ld};
    if (n == 1) return DecodeN<D, 1>(w, kc, r0, rows, g0, g1, slot_kk, ld, sink);
    DecodeN<D, 2>(w, kc, r0, rows, g0, g1, slot_kk, ld, sink);
  }

  // Where Decode puts tile row kk's 16 outputs rb .. rb + 15: the f32 tile
  // [kk][ld] of the FMA engine (AMX kernels bring their own sink).
  struct F32TileSink {
    float* tile;
    int64_t ld;
    JAXSPARSE_VNM_INLINE void operator()(int64_t kk, int64_t rb, __m512 col) const {
      _mm512_storeu_ps(tile + kk * ld + rb, col);
    }
    // Rows kk and kk + 1 (kk even).
    JAXSPARSE_VNM_INLINE void Pair(int64_t kk, int64_t rb, __m512 first, __m512 second) const {
      _mm512_storeu_ps(tile + kk * ld + rb, first);
      _mm512_storeu_ps(tile + (kk + 1) * ld + rb, second);
    }
  };

  // Chunks fetched ahead within the 16 rows of a block: their 16 streams are
  // beyond what the hardware prefetchers follow.
  static constexpr int64_t kAheadChunks = 4;

#ifdef __AVX512VBMI2__
  // Whether the 32 slots of a chunk of 8 groups are tile rows kk0 .. kk0 + 31
  // with kk0 a multiple of 32 (one whole k step of a B tile): every group of
  // the block selects 4 existing inputs, the usual case.
  JAXSPARSE_VNM_INLINE static bool FillsOneTileStep(const int32_t* kks) {
    const __m512i first = _mm512_set1_epi32(kks[0]);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __mmask16 lo = _mm512_cmpeq_epi32_mask(_mm512_loadu_si512(kks), _mm512_add_epi32(first, iota));
    const __mmask16 hi = _mm512_cmpeq_epi32_mask(
        _mm512_loadu_si512(kks + 16),
        _mm512_add_epi32(first, _mm512_add_epi32(iota, _mm512_set1_epi32(16))));
    return kks[0] % 32 == 0 && lo == 0xffff && hi == 0xffff;
  }

  // The bf16 2:4-in-panel chunk (16 outputs x 8 groups, n = 2) whose slots
  // fill one k step: straight into its 1 KB B tile, with no trip through
  // f32. Each output's 16 values become its 8 dense slot quads by one
  // vpexpandw (the mask from its positions); a dword of a quad is a pair of
  // slots, so one 16 x 16 dword transpose turns the 16 outputs' quads into
  // the tile's 16 VNNI pair rows. About a third of the general path's
  // instructions (no f32 and byte transposes, no per-slot compares and
  // conversions). Rows past `live_rows` are zero. Returns false, having
  // written nothing, when a row's positions are not strictly increasing
  // slots 0..3 (garbage under jit): the general path gives those their
  // meaning (a slot > 3 adds nothing, a repeated one adds both).
  JAXSPARSE_VNM_INLINE static bool DecodeTileStepBF16(const uint16_t* vs, const uint8_t* ix,
                                                      int64_t kc, int64_t live_rows,
                                                      uint16_t* tile) {
    // Byte j of the 32 (group j / 4, slot j % 4) takes the group's first
    // and second position (in-lane shuffles of the positions broadcast to
    // both lanes).
    const __m256i pick_first = _mm256_setr_epi8(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6,
                                                8, 8, 8, 8, 10, 10, 10, 10, 12, 12, 12, 12, 14, 14, 14, 14);
    const __m256i pick_second = _mm256_add_epi8(pick_first, _mm256_set1_epi8(1));
    const __m256i slots = _mm256_setr_epi8(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3,
                                           0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
    const __m256i last_slot = _mm256_set1_epi8(3);
    __mmask32 valid = 0xffffffffu;
    __m512 quads[16];
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) {
      if (r >= live_rows) {
        quads[r] = _mm512_setzero_ps();
        continue;
      }
      const __m256i pos = _mm256_broadcastsi128_si256(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(ix + r * kc)));
      const __m256i first = _mm256_shuffle_epi8(pos, pick_first);
      const __m256i second = _mm256_shuffle_epi8(pos, pick_second);
      valid &= _mm256_cmpgt_epu8_mask(second, first) & _mm256_cmple_epu8_mask(second, last_slot);
      const __mmask32 kept =
          _mm256_cmpeq_epi8_mask(first, slots) | _mm256_cmpeq_epi8_mask(second, slots);
      const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vs + r * kc));
      quads[r] = _mm512_castsi512_ps(_mm512_maskz_expand_epi16(kept, _mm512_castsi256_si512(words)));
    }
    if (valid != 0xffffffffu) return false;
    Transpose16x16(quads);
#pragma GCC unroll 16
    for (int d = 0; d < 16; ++d) _mm512_storeu_ps(tile + d * 32, quads[d]);
    return true;
  }
#endif  // __AVX512VBMI2__

  // Every (kk, 16 outputs) of the block's selected inputs reaches the sink
  // exactly once, for every 16 outputs below ld: sink(kk, rb, column), or
  // sink.Pair(kk, rb, column, next column) for rows kk, kk + 1 (kk even).
  template <class D, int kN, class Sink>
  [[gnu::noinline]] static void DecodeN(const Weight<D>& w, int64_t kc, int64_t r0,
                                        int64_t rows, int64_t g0, int64_t g1,
                                        const int32_t* slot_kk, int64_t ld, const Sink& sink) {
    using S = typename D::Storage;
    const int64_t first = g0 * kN, count = (g1 - g0) * kN;
    for (int64_t rb = 0; rb < ld; rb += 16) {
      const int64_t live_rows = Min(16, rows - rb);
      const S* const vs = w.values + (r0 + rb) * kc + first;
      const uint8_t* const ix = w.indices + (r0 + rb) * kc + first;
      for (int64_t e0 = 0; e0 < count; e0 += 16) {
        const int ne = static_cast<int>(Min(16, count - e0));
        const __mmask16 live = static_cast<__mmask16>((1u << ne) - 1);
        const int64_t ahead = e0 + kAheadChunks * 16;
        if (ahead < count) {
          for (int64_t r = 0; r < live_rows; ++r) {
            _mm_prefetch(reinterpret_cast<const char*>(vs + r * kc + ahead), _MM_HINT_T0);
            if (ahead % 64 == 0)
              _mm_prefetch(reinterpret_cast<const char*>(ix + r * kc + ahead), _MM_HINT_T0);
          }
        }
#ifdef __AVX512VBMI2__
        if constexpr (kN == 2 && std::is_same_v<D, BF16> && TakesTileSteps<Sink>::value) {
          const int32_t* const kks = slot_kk + e0 / kN * kSelected;
          if (ne == 16 && FillsOneTileStep(kks) &&
              DecodeTileStepBF16(vs + e0, ix + e0, kc, live_rows, sink.TileStep(kks[0], rb)))
            continue;
        }
#endif
        __m512 val[16];
        __m128i idx[16];
#pragma GCC unroll 16
        for (int r = 0; r < 16; ++r) {
          if (r < live_rows) {
            val[r] = LoadF32<D>(vs + r * kc + e0, live);
            // Lanes past the chunk read as slot 255: they match no slot.
            idx[r] = _mm_mask_loadu_epi8(_mm_set1_epi8(-1), live, ix + r * kc + e0);
          } else {
            val[r] = _mm512_setzero_ps();
            idx[r] = _mm_set1_epi8(-1);
          }
        }
        Transpose16x16(val);
        Transpose16x16Bytes(idx);
        const int32_t* const kks = slot_kk + e0 / kN * kSelected;
        // Unrolled, so val[] and idx[] are registers, not stack arrays.
#pragma GCC unroll 16
        for (int q = 0; q < 16 / kN; ++q) {
          if (q * kN >= ne) break;
          auto column = [&](int s) JAXSPARSE_VNM_INLINE {
            const __m128i slot = _mm_set1_epi8(static_cast<char>(s));
            __m512 col = _mm512_maskz_mov_ps(_mm_cmpeq_epi8_mask(idx[q * kN], slot), val[q * kN]);
            if constexpr (kN == 2) {
              col = _mm512_mask_add_ps(col, _mm_cmpeq_epi8_mask(idx[q * kN + 1], slot), col,
                                       val[q * kN + 1]);
            }
            return col;
          };
          // Slots s, s + 1 at tile rows kk, kk + 1 (kk even: the usual case,
          // with no dropped input before them) go to the sink as one pair:
          // the AMX sink then writes one whole VNNI row.
#pragma GCC unroll 2
          for (int s = 0; s < kSelected; s += 2) {
            const int32_t kk = kks[q * kSelected + s], kk1 = kks[q * kSelected + s + 1];
            if (kk >= 0 && kk1 == kk + 1 && kk % 2 == 0) {
              sink.Pair(kk, rb, column(s), column(s + 1));
              continue;
            }
            if (kk >= 0) sink(kk, rb, column(s));
            if (kk1 >= 0) sink(kk1, rb, column(s + 1));
          }
        }
      }
    }
  }

  // Gram tile -> each row's kept entries (the inverse of Decode), 16 rows x
  // 16 entries at a time: per entry, the group's (up to) 4 tile columns are
  // selected by compares of the transposed slots, then one 16 x 16 transpose
  // puts the entries back in row order.
  static void Sample(const float* gram, int64_t ld, const int32_t* slot_kk,
                     const uint8_t* indices, int64_t kc, int32_t n, int64_t g0,
                     int64_t g1, int64_t rows, float* out, int64_t out_ld) {
    if (n == 1) return SampleN<1>(gram, ld, slot_kk, indices, kc, g0, g1, rows, out, out_ld);
    SampleN<2>(gram, ld, slot_kk, indices, kc, g0, g1, rows, out, out_ld);
  }

  template <int kN>
  [[gnu::noinline]] static void SampleN(const float* gram, int64_t ld, const int32_t* slot_kk,
                                        const uint8_t* indices, int64_t kc, int64_t g0,
                                        int64_t g1, int64_t rows, float* out, int64_t out_ld) {
    const int64_t first = g0 * kN, count = (g1 - g0) * kN;
    for (int64_t rb = 0; rb < rows; rb += 16) {
      const int64_t live_rows = Min(16, rows - rb);
      for (int64_t e0 = 0; e0 < count; e0 += 16) {
        const int ne = static_cast<int>(Min(16, count - e0));
        const __mmask16 live = static_cast<__mmask16>((1u << ne) - 1);
        __m128i idx[16];
#pragma GCC unroll 16
        for (int r = 0; r < 16; ++r) {
          idx[r] = r < live_rows ? _mm_mask_loadu_epi8(_mm_set1_epi8(-1), live,
                                                       indices + (rb + r) * kc + first + e0)
                                 : _mm_set1_epi8(-1);
        }
        Transpose16x16Bytes(idx);
        const int32_t* const kks = slot_kk + e0 / kN * kSelected;
        __m512 col[16];
#pragma GCC unroll 16
        for (int q = 0; q < 16 / kN; ++q) {
          __m512 tile_col[kSelected];
#pragma GCC unroll 4
          for (int s = 0; s < kSelected; ++s) {
            const int32_t kk = q * kN < ne ? kks[q * kSelected + s] : -1;
            // A dropped input (kk < 0) samples 0, as does a slot > 3.
            tile_col[s] = kk >= 0 ? _mm512_loadu_ps(gram + kk * ld + rb) : _mm512_setzero_ps();
          }
#pragma GCC unroll 2
          for (int e = 0; e < kN; ++e) {
            __m512 v = _mm512_setzero_ps();
#pragma GCC unroll 4
            for (int s = 0; s < kSelected; ++s)
              v = _mm512_mask_mov_ps(
                  v, _mm_cmpeq_epi8_mask(idx[q * kN + e], _mm_set1_epi8(static_cast<char>(s))),
                  tile_col[s]);
            col[q * kN + e] = v;
          }
        }
        Transpose16x16(col);
#pragma GCC unroll 16
        for (int r = 0; r < 16; ++r)
          if (r < live_rows) _mm512_mask_storeu_ps(out + (rb + r) * out_ld + e0, live, col[r]);
      }
    }
  }

  template <class D>
  static void ToF32Row(const typename D::Storage* src, float* dst, int64_t count) {
    for (int64_t i = 0; i < count; i += 16) {
      const int64_t left = count - i;
      const __mmask16 keep = LaneMask(left);
      _mm512_mask_storeu_ps(dst + i, keep, LoadF32<D>(src + i, keep));
    }
  }
  template <class D>
  static void FromF32Row(const float* src, typename D::Storage* dst, int64_t count) {
    for (int64_t i = 0; i < count; i += 16) {
      const int64_t left = count - i;
      const __mmask16 keep = LaneMask(left);
      StoreF32<D>(dst + i, _mm512_maskz_loadu_ps(keep, src + i), keep);
    }
  }

  // dst[c][r] = Out(In(src[r][c])) in 16 x 16 blocks through registers.
  template <class In, class Out>
  static void Transpose(const typename In::Storage* src, int64_t src_ld, int64_t rows,
                        int64_t cols, typename Out::Storage* dst, int64_t dst_ld) {
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
      const int64_t nr = Min(16, rows - r0);
      const __mmask16 row_mask = LaneMask(nr);
      for (int64_t c0 = 0; c0 < cols; c0 += 16) {
        const int64_t nc = Min(16, cols - c0);
        const __mmask16 col_mask = LaneMask(nc);
        __m512 b[16];
#pragma GCC unroll 16
        for (int r = 0; r < 16; ++r)
          b[r] = r < nr ? LoadF32<In>(src + (r0 + r) * src_ld + c0, col_mask) : _mm512_setzero_ps();
        Transpose16x16(b);
#pragma GCC unroll 16
        for (int c = 0; c < 16; ++c)
          if (c < nc) StoreF32<Out>(dst + (c0 + c) * dst_ld + r0, b[c], row_mask);
      }
    }
  }

  // dst[c][r] = f32(src[r][c]).
  template <class D>
  static void TransposeIn(const typename D::Storage* src, int64_t src_ld, int64_t rows,
                          int64_t cols, float* dst, int64_t dst_ld) {
    Transpose<D, F32>(src, src_ld, rows, cols, dst, dst_ld);
  }

  // dst[c][r] = D(src[r][c]).
  template <class D>
  static void TransposeOut(const float* src, int64_t src_ld, int64_t rows, int64_t cols,
                           typename D::Storage* dst, int64_t dst_ld) {
    Transpose<F32, D>(src, src_ld, rows, cols, dst, dst_ld);
  }
};

// ------------------------------------------------------------------ stream forward

// Up to this many tokens the forward streams the weight (SpmmStream).
constexpr int64_t kStreamMaxTokens = 16;
// A block of chunks' tables (tokens x 16 floats per chunk) stays in L1 next
// to the row chunks that stream through: 16 KB.
constexpr int64_t kStreamTableFloats = 4096;
// How far ahead (in the panel's bytes) a block of rows fetches the chunks of
// a later block, chunk by chunk in step with its own.
constexpr int64_t kStreamAheadBytes = 24 * 1024;
// Up to this many tokens the forward runs in row mode (SpmmStream::RowMode).
constexpr int kRowModeMaxTokens = 2;
// Row mode's prefetch distance in the values stream (indices: a quarter):
// 8 KB measured best of 0-32 KB for one core's sequential stream.
constexpr int64_t kRowAheadBytes = 8 * 1024;

// The rows of a zmm at n kept values per group: kRpv rows of kSlot lanes each
// (the 4n entries of 4 groups), row q in lanes [q * kSlot, (q + 1) * kSlot).
// Compile-time, so every loop over the rows of a zmm unrolls.
template <int kN>
struct RowChunk {
  static constexpr int kSlot = 4 * kN;
  static constexpr int kRpv = 16 / kSlot;
  JAXSPARSE_VNM_INLINE static constexpr __mmask16 SlotMask(int q) {
    return static_cast<__mmask16>(((1u << kSlot) - 1) << (kSlot * q));
  }

  // The row chunks of rows p, p + stride, ... in lanes `keep` only (the
  // others zero and unread: masked loads never fault).
  template <class D>
  JAXSPARSE_VNM_INLINE static __m512 Values(const typename D::Storage* p, int64_t stride, __mmask16 keep) {
    if constexpr (kIsF32<D>) {
      __m512 v = _mm512_setzero_ps();
#pragma GCC unroll 4
      for (int q = 0; q < kRpv; ++q)
        v = _mm512_mask_loadu_ps(v, keep & SlotMask(q), p + q * stride - kSlot * q);
      return v;
    } else {
      __m256i h = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int q = 0; q < kRpv; ++q)
        h = _mm256_mask_loadu_epi16(h, keep & SlotMask(q), p + q * stride - kSlot * q);
      return Widen<D>(h);
    }
  }

  // Values() when every lane is live: plain loads and inserts (measured
  // faster than a chain of merging masked loads in the N:M kernel).
  template <class D>
  JAXSPARSE_VNM_INLINE static __m512 ValuesWhole(const typename D::Storage* p, int64_t stride) {
    if constexpr (kIsF32<D> && kRpv == 2) {
      return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(p)),
                                _mm256_loadu_ps(p + stride), 1);
    } else if constexpr (kIsF32<D>) {
      __m512 v = _mm512_castps128_ps512(_mm_loadu_ps(p));
      v = _mm512_insertf32x4(v, _mm_loadu_ps(p + stride), 1);
      v = _mm512_insertf32x4(v, _mm_loadu_ps(p + 2 * stride), 2);
      return _mm512_insertf32x4(v, _mm_loadu_ps(p + 3 * stride), 3);
    } else if constexpr (kRpv == 2) {
      return Widen<D>(_mm256_inserti128_si256(
          _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + stride)), 1));
    } else {
      return Values<D>(p, stride, 0xffff);
    }
  }

  JAXSPARSE_VNM_INLINE static __m512i Indices(const uint8_t* p, int64_t stride, __mmask16 live) {
    __m128i b = _mm_setzero_si128();
#pragma GCC unroll 4
    for (int q = 0; q < kRpv; ++q)
      b = _mm_mask_loadu_epi8(b, live & SlotMask(q), p + q * stride - kSlot * q);
    return _mm512_cvtepu8_epi32(b);
  }

  JAXSPARSE_VNM_INLINE static __m512i IndicesWhole(const uint8_t* p, int64_t stride) {
    if constexpr (kRpv == 2) {
      return _mm512_cvtepu8_epi32(
          _mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)),
                             _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + stride))));
    } else {
      int32_t q4[4];
      for (int q = 0; q < 4; ++q) std::memcpy(&q4[q], p + q * stride, 4);
      return _mm512_cvtepu8_epi32(_mm_setr_epi32(q4[0], q4[1], q4[2], q4[3]));
    }
  }

  template <class D>
  JAXSPARSE_VNM_INLINE static __m512 Widen(__m256i h) {
    if constexpr (std::is_same_v<D, BF16>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
};

// Fetches two regions (a panel's values and indices) into L2 in `steps`
// installments, one per Step(): sequential lines, which DRAM serves at its
// full rate. An installment is a whole number of lines of each region, or
// one line every few steps.
class LinearFetch {
 public:
  LinearFetch() = default;
  LinearFetch(const void* a, int64_t a_bytes, const void* b, int64_t b_bytes, int64_t steps)
      : a_(static_cast<const char*>(a)), b_(static_cast<const char*>(b)) {
    const int64_t a_lines = CeilDiv(a_bytes, kCacheLine), b_lines = CeilDiv(b_bytes, kCacheLine);
    a_end_ = a_lines * kCacheLine;
    b_end_ = b_lines * kCacheLine;
    // Bytes per step, rounded up to whole lines over the whole run.
    a_step_ = CeilDiv(a_lines * kCacheLine, Max(1, steps));
    b_step_ = CeilDiv(b_lines * kCacheLine, Max(1, steps));
  }
  JAXSPARSE_VNM_INLINE void Step() {
    a_want_ += a_step_;
    b_want_ += b_step_;
    for (; a_next_ < a_end_ && a_next_ < a_want_; a_next_ += kCacheLine)
      _mm_prefetch(a_ + a_next_, _MM_HINT_T1);
    for (; b_next_ < b_end_ && b_next_ < b_want_; b_next_ += kCacheLine)
      _mm_prefetch(b_ + b_next_, _MM_HINT_T1);
  }

 private:
  const char* a_ = nullptr;
  const char* b_ = nullptr;
  int64_t a_end_ = 0, b_end_ = 0, a_step_ = 0, b_step_ = 0;
  int64_t a_want_ = 0, b_want_ = 0, a_next_ = 0, b_next_ = 0;
};

// Chunk steps per installment of the panel fetches. A step reads and writes
// the fetch state (in memory: the blocks take it by reference), ~20
// instructions on a chain of stores and loads. Once per chunk (16 permutes),
// perf put 51% of a block's samples outside its permute loop at 16 tokens
// (128:2:16); once per 4 chunks, 40%.
constexpr int64_t kFetchEvery = 4;

// The fetches a panel's blocks make, one step per kFetchEvery chunk steps.
struct PanelFetch {
  LinearFetch self, next;
  JAXSPARSE_VNM_INLINE void Step() {
    self.Step();
    next.Step();
  }
};

template <class D>
struct SpmmStream : Dims {
  using S = typename D::Storage;
  // Row vector `first_vec` of a panel (rows rpv * first_vec ...) over chunks
  // [c0, c1).
  struct Span {
    int64_t first_vec, c0, c1;
  };
  struct Worker {
    float* tables;  // [block_chunks][T][16]: a chunk's tables side by side
    __m512* acc;    // [row vectors of a panel][T]
  };

  static bool Applies(const VnmProblem& p) { return p.tokens <= kStreamMaxTokens; }

  const VnmProblem& p;
  const Runtime& rt;
  int slot, rpv;  // RowChunk<n>'s.
  int64_t chunks, block_chunks, table_ld, x_ld, vecs_max, panels_per_task;
  __m512i lane_base;    // Lane -> 4 * (its group within the chunk).
  __m512i lane_base16;  // Row mode: lane -> 4 * (its group within 16 entries).
  float* xf = nullptr;  // [T][x_ld] f32, zero padded past K.
  // Wide groups spread a chunk over several 32-float windows; at enough
  // tokens their tables come from x transposed (GatherTransposed):
  // xt[k][t] = xf[t][k] for t < T (lanes of later tokens are never read),
  // rows up to x_ld, zero past K (the row of inputs that do not exist).
  bool transposed_gather = false;
  float* xt = nullptr;
  Worker* workers = nullptr;
  // Per batch.
  Weight<D> w{};
  S* y = nullptr;

  SpmmStream(const VnmProblem& prob, const Runtime& runtime)
      : Dims(prob), p(prob), rt(runtime), slot(4 * prob.n), rpv(4 / prob.n) {
    chunks = CeilDiv(G, 4);
    // Row mode keeps every chunk's tables (at most 1024 chunks x 2 tokens x
    // 64 bytes: in L1 for K <= 4096, in L2 beyond).
    block_chunks = T <= kRowModeMaxTokens
                       ? chunks
                       : Max(1, Min(chunks, kStreamTableFloats / (16 * Max(1, T))));
    table_ld = 16 * T;  // Floats per chunk: the tables of its T tokens.
    // The gather reads 32-float windows that start below K.
    x_ld = RoundUp(K + 32, 16);
    vecs_max = CeilDiv(Min(v, N), rpv);
    // Per chunk, Gather costs ~5 instructions per window and token, the
    // transposed gather ~100 whatever T and m (measured equal at m = 8 and
    // 16 tokens, one window).
    transposed_gather = CeilDiv(4 * m, 32) * T >= 24;
    // A task is a run of consecutive panels (so each can fetch the next one
    // while it works), 8 tasks per worker to balance a busy machine.
    panels_per_task = Max(1, P / (8 * rt.num_workers));
    alignas(64) int32_t base[16];
    for (int l = 0; l < 16; ++l) base[l] = 4 * ((l % slot) / n);
    lane_base = _mm512_load_si512(base);
    for (int l = 0; l < 16; ++l) base[l] = 4 * (l / n);
    lane_base16 = _mm512_load_si512(base);
  }

  void Layout(Carver& c) {
    xf = c.Take<float>(T * x_ld);
    if (transposed_gather) xt = c.Take<float>(x_ld * 16);
    workers = c.Take<Worker>(rt.num_workers);
    for (int i = 0; i < rt.num_workers; ++i) {
      // Row mode's last piece of a row reads the tables of up to 4 chunks
      // from its first (lanes past the row are dropped): 4 chunks of slack.
      const Worker wk{c.Take<float>((block_chunks + 4) * table_ld),
                      c.Take<__m512>(vecs_max * T)};
      if (workers != nullptr) workers[i] = wk;
    }
  }

  bool Compute() {
    if (T == 0 || N == 0 || p.batch == 0) return true;
    if (!TakeScratch(rt, *this)) return false;
    for (int64_t b = 0; b < p.batch; ++b) {
      w = Weight<D>::At(p, b);
      if (b == 0 || p.x_stride != 0) {
        const ConvertJob<D, Avx512Isa> job{static_cast<const S*>(p.x) + b * p.x_stride, T, K, x_ld, xf};
        RunParallel(rt, CeilDiv(T, ConvertJob<D, Avx512Isa>::kRowsPerTask), job);
        if (transposed_gather) Avx512Isa::TransposeIn<F32>(xf, x_ld, T, x_ld, xt, 16);
      }
      y = static_cast<S*>(p.out) + b * T * N;
      RunParallel(rt, CeilDiv(P, panels_per_task), *this);
    }
    return true;
  }

  void Run(int64_t task, int worker) const {
    const int64_t first = task * panels_per_task, end = Min(P, first + panels_per_task);
    for (int64_t panel = first; panel < end; ++panel) {
      Panel(panel, panel + 1 < end, panel > first, workers[worker]);
    }
  }

  // The panel's products. With `fetch_next`, the next panel's values and
  // indices (one contiguous run of rows each) are fetched into L2 meanwhile,
  // spread over the panel's blocks, so that its blocks then hit L2; when
  // `fetched`, this panel came that way and the blocks need not fetch ahead.
  void Panel(int64_t panel, bool fetch_next, bool fetched, const Worker& wk) const {
    if (T <= kRowModeMaxTokens) return RowMode(panel, wk);
    const int64_t r0 = panel * v, rows = PanelRows(panel);
    const int64_t vecs = CeilDiv(rows, rpv);
    std::memset(static_cast<void*>(wk.acc), 0, vecs * T * sizeof(__m512));
    const uint8_t* cols = w.columns + panel * G * kSelected;
    // One installment per chunk step of the panel's blocks: the next panel
    // over the whole panel; a panel that did not come that way (a task's
    // first) fetches itself over its first block of chunks, whose blocks read
    // every row (and fetch the rows just ahead of them, below).
    const int64_t steps = CeilDiv(vecs * chunks * CeilDiv(T, kStreamMaxTokens), kFetchEvery);
    PanelFetch fetch;
    if (!fetched) {
      fetch.self = LinearFetch(w.values + r0 * Kc, rows * Kc * sizeof(S), w.indices + r0 * Kc,
                               rows * Kc, CeilDiv(vecs * block_chunks, kFetchEvery));
    }
    if (fetch_next) {
      const int64_t next_rows = PanelRows(panel + 1);
      fetch.next = LinearFetch(w.values + (r0 + v) * Kc, next_rows * Kc * sizeof(S),
                               w.indices + (r0 + v) * Kc, next_rows * Kc, steps);
    }
    for (int64_t c0 = 0; c0 < chunks; c0 += block_chunks) {
      const int64_t c1 = Min(chunks, c0 + block_chunks);
      GatherAny(cols, c0, c1, wk.tables);
      // A block is one row vector (rpv rows) over chunks [c0, c1); the ones
      // after it follow in memory order (rows, then the next chunks). Unless
      // the panel is in L2 already, each block fetches the chunks of the
      // block kStreamAheadBytes later.
      const int64_t block_bytes = rpv * (c1 - c0) * slot * (sizeof(S) + 1);
      const int64_t ahead = Max(1, CeilDiv(kStreamAheadBytes, block_bytes));
      for (int64_t t0 = 0; t0 < T; t0 += kStreamMaxTokens) {
        Dispatch<kStreamMaxTokens>(static_cast<int>(Min(kStreamMaxTokens, T - t0)), [&](auto tb) {
          constexpr int kTb = decltype(tb)::value;
          Dispatch<2>(n, [&](auto kn) {
            constexpr int kN = decltype(kn)::value;
            for (int64_t j = 0; j < vecs; ++j) {
              const int64_t jn = j + ahead;
              const Span span{j, c0, c1};
              Span next = jn < vecs ? Span{jn, c0, c1}
                                    : Span{jn - vecs, c1, Min(c1 + block_chunks, chunks)};
              if (fetched || next.first_vec >= vecs) next = Span{0, 0, 0};
              Rows<kN, kTb>(r0, rows, span, next, t0, wk, fetch);
            }
          });
        });
      }
    }
    WriteY(r0, rows, vecs, wk.acc);
  }

  // Row mode (1-2 tokens): a zmm holds 16 consecutive entries of ONE row,
  // so each worker reads its panels' values and indices as two sequential
  // streams (measured 35-42 GB/s on one core here, against 20-23 for the
  // rows-side-by-side chunks above, whose several row streams the hardware
  // prefetchers do not follow). The 16 entries span 16 / n groups, i.e. 2
  // chunks (n = 2) or 4 (n = 1) of tables: one two-table vpermt2ps, or two
  // and a blend.
  void RowMode(int64_t panel, const Worker& wk) const {
    const int64_t r0 = panel * v, rows = PanelRows(panel);
    GatherAny(w.columns + panel * G * kSelected, 0, chunks, wk.tables);
    Dispatch<kRowModeMaxTokens>(static_cast<int>(T), [&](auto tb) {
      constexpr int kTb = decltype(tb)::value;
      Dispatch<2>(n, [&](auto kn) {
        constexpr int kN = decltype(kn)::value;
        for (int64_t r = r0; r < r0 + rows; ++r) {
          float sums[kTb];
          if (!RowDot<kN, kTb, false>(r, wk.tables, sums)) RowDot<kN, kTb, true>(r, wk.tables, sums);
          for (int t = 0; t < kTb; ++t) y[t * N + r] = D::FromF32(sums[t]);
        }
      });
    });
  }

  // Output row r's sums for every token. As Block: whole pieces first run
  // without checks, and a slot > 3 seen makes the row run again in safe mode.
  template <int kN, int kTb, bool kSafe>
  [[gnu::noinline]] bool RowDot(int64_t r, const float* tables, float* sums) const {
    // Chunks (of 16 table floats) a 16-entry piece spans.
    constexpr int kChunks = 4 / kN;
    // Independent accumulator sets, so the FMA latency does not bound the
    // few instructions of a piece.
    constexpr int kU = 4;
    const int64_t kc = Kc, tld = table_ld;
    const S* const vs = w.values + r * kc;
    const uint8_t* const ix = w.indices + r * kc;
    const __m512i base = lane_base16, four = _mm512_set1_epi32(kSelected);
    __m512 acc[kU][kTb];
    for (int u = 0; u < kU; ++u)
      for (int t = 0; t < kTb; ++t) acc[u][t] = _mm512_setzero_ps();
    __m512i seen = _mm512_setzero_si512();
    // x at the 16 lanes' inputs for token t: tables of chunks c .. c + kChunks - 1.
    auto pick = [&](const float* tab, __m512i pos, int t) JAXSPARSE_VNM_INLINE {
      const __m512 lo = _mm512_permutex2var_ps(_mm512_load_ps(tab + t * 16), pos,
                                               _mm512_load_ps(tab + tld + t * 16));
      if constexpr (kChunks == 2) {
        return lo;
      } else {
        const __m512 hi = _mm512_permutex2var_ps(_mm512_load_ps(tab + 2 * tld + t * 16), pos,
                                                 _mm512_load_ps(tab + 3 * tld + t * 16));
        return _mm512_mask_mov_ps(lo, _mm512_test_epi32_mask(pos, _mm512_set1_epi32(32)), hi);
      }
    };
    auto piece = [&](int64_t e0, __m512* a, __mmask16 live, auto checked) JAXSPARSE_VNM_INLINE {
      constexpr bool kChecked = decltype(checked)::value;
      // The streams, a fixed distance ahead (rows are consecutive in memory,
      // so this runs on into the next rows): one prefetch per 64 bytes.
      _mm_prefetch(reinterpret_cast<const char*>(vs + e0) + kRowAheadBytes, _MM_HINT_T0);
      if (e0 % (4 * 16) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(ix + e0) + kRowAheadBytes / 4, _MM_HINT_T0);
      const float* const tab = tables + e0 / kN / 4 * tld;
      if constexpr (!kChecked) {
        const __m512i i32 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ix + e0)));
        seen = _mm512_or_si512(seen, i32);
        const __m512i pos = _mm512_add_epi32(base, i32);
        const __m512 wv = LoadF32<D>(vs + e0, 0xffff);
        for (int t = 0; t < kTb; ++t) a[t] = _mm512_fmadd_ps(wv, pick(tab, pos, t), a[t]);
      } else {
        const __m512i i32 = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, ix + e0));
        // A slot > 3 would pick another group's input: dropped (zero value,
        // zeroed x), never 0 * inf. Inputs that do not exist are zeros in
        // the tables.
        const __mmask16 keep = _mm512_mask_cmplt_epu32_mask(live, i32, four);
        const __m512i pos = _mm512_add_epi32(base, i32);
        const __m512 wv = LoadF32<D>(vs + e0, keep);
        for (int t = 0; t < kTb; ++t)
          a[t] = _mm512_fmadd_ps(wv, _mm512_maskz_mov_ps(keep, pick(tab, pos, t)), a[t]);
      }
    };
    const int64_t whole = kc / 16 * 16;
    int64_t e0 = 0;
    if (!kSafe) {
      for (; e0 + kU * 16 <= whole; e0 += kU * 16) {
#pragma GCC unroll 4
        for (int u = 0; u < kU; ++u) piece(e0 + 16 * u, acc[u], 0xffff, std::false_type{});
      }
      for (; e0 < whole; e0 += 16) piece(e0, acc[0], 0xffff, std::false_type{});
    }
    for (; e0 < kc; e0 += 16) {
      const __mmask16 live = LaneMask(kc - e0);
      piece(e0, acc[0], live, std::true_type{});
    }
    if (!kSafe && _mm512_test_epi32_mask(seen, _mm512_set1_epi32(~3)) != 0) return false;
    for (int t = 0; t < kTb; ++t) {
      __m512 sum = acc[0][t];
      for (int u = 1; u < kU; ++u) sum = _mm512_add_ps(sum, acc[u][t]);
      sums[t] = _mm512_reduce_add_ps(sum);
    }
    return true;
  }

  void GatherAny(const uint8_t* cols, int64_t c0, int64_t c1, float* tables) const {
    if (transposed_gather) return GatherTransposed(cols, c0, c1, tables);
    Gather(cols, c0, c1, tables);
  }

  // The tables of Gather from xt, for wide groups at enough tokens: per chunk,
  // the 16 rows xt[input of lane j] (16 tokens each, a zero row for inputs
  // that do not exist), transposed in registers into the 16 tokens' tables.
  // 16 loads and 64 shuffles per chunk whatever m is, where Gather takes one
  // two-table permute and a blend per 32-float window per token: 4 windows
  // at m = 32 (perf: Gather was 20% of the forward at 64:2:32, 16 tokens).
  [[gnu::noinline]] void GatherTransposed(const uint8_t* cols, int64_t c0, int64_t c1,
                                          float* tables) const {
    const __m512i lane_group = _mm512_srli_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 2);
    // Every input >= K reads the zero row at x_ld - 16 (x_ld >= K + 32).
    const int32_t zero_row = static_cast<int32_t>(x_ld - 16);
    alignas(64) int32_t input[16];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t g0 = 4 * c;
      const int64_t groups = Min(4, G - g0);
      const __mmask16 live = static_cast<__mmask16>((1u << (4 * groups)) - 1);
      const __m512i col = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, cols + g0 * kSelected));
      const __m512i k = _mm512_add_epi32(
          _mm512_mullo_epi32(_mm512_add_epi32(lane_group, _mm512_set1_epi32(static_cast<int32_t>(g0))),
                             _mm512_set1_epi32(m)),
          col);
      __mmask16 valid = _mm512_mask_cmplt_epi32_mask(live, col, _mm512_set1_epi32(m));
      valid = _mm512_mask_cmplt_epi32_mask(valid, k, _mm512_set1_epi32(static_cast<int32_t>(K)));
      _mm512_store_si512(input, _mm512_mask_mov_epi32(_mm512_set1_epi32(zero_row), valid, k));
      __m512 r[16];
      for (int j = 0; j < 16; ++j) r[j] = _mm512_load_ps(xt + int64_t{input[j]} * 16);
      Transpose16x16(r);
      float* out = tables + (c - c0) * table_ld;
      for (int64_t t = 0; t < T; ++t) _mm512_store_ps(out + t * 16, r[t]);
    }
  }

  // tables[c - c0][t][4q + s] = x[t, input of slot s of group 4c + q],
  // or 0 where that input does not exist. Each group's inputs lie in
  // [g m, g m + m): a chunk's 4 groups span 4m floats, read as 32-float
  // windows, each placed by one two-table permute.
  [[gnu::noinline]] void Gather(const uint8_t* cols, int64_t c0, int64_t c1, float* tables) const {
    const int windows = static_cast<int>(CeilDiv(4 * m, 32));
    const __m512i lane_group = _mm512_srli_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 2);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t g0 = 4 * c, first = g0 * m;
      const int64_t groups = Min(4, G - g0);
      const __mmask16 live = static_cast<__mmask16>((1u << (4 * groups)) - 1);
      const __m512i col = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, cols + g0 * kSelected));
      const __m512i rel = _mm512_add_epi32(_mm512_mullo_epi32(lane_group, _mm512_set1_epi32(m)), col);
      __mmask16 valid = _mm512_mask_cmplt_epi32_mask(live, col, _mm512_set1_epi32(m));
      valid = _mm512_mask_cmplt_epi32_mask(valid, rel, _mm512_set1_epi32(static_cast<int32_t>(K - first)));
      __mmask16 in_window[8];
      for (int wi = 0; wi < windows; ++wi)
        in_window[wi] = _mm512_mask_cmpeq_epi32_mask(valid, _mm512_srli_epi32(rel, 5), _mm512_set1_epi32(wi));
      float* out = tables + (c - c0) * table_ld;
      for (int64_t t = 0; t < T; ++t) {
        const float* xr = xf + t * x_ld + first;
        __m512 tab = _mm512_setzero_ps();
        for (int wi = 0; wi < windows; ++wi) {
          if (in_window[wi] == 0) continue;
          const __m512 lo = _mm512_loadu_ps(xr + 32 * wi), hi = _mm512_loadu_ps(xr + 32 * wi + 16);
          tab = _mm512_mask_mov_ps(tab, in_window[wi], _mm512_permutex2var_ps(lo, rel, hi));
        }
        _mm512_store_ps(out + t * 16, tab);
      }
    }
  }

  // One row vector x tokens t0 .. t0 + kTb - 1 over the span's chunks. Slots
  // > 3 only come from garbage (under jit), so whole chunks first run without
  // a check per chunk; the slots seen are OR-ed together, and if any was > 3
  // the block runs again in safe mode, which drops such lanes.
  template <int kN, int kTb>
  void Rows(int64_t r0, int64_t rows, const Span& span, const Span& next, int64_t t0,
            const Worker& wk, PanelFetch& fetch) const {
    // Below 4 tokens, chunks alternate between accumulator sets so the FMA
    // latency (4 cycles) does not bound a chunk's few instructions.
    constexpr int kU = kTb >= 4 ? 1 : 4 / kTb;
    const PanelFetch at_start = fetch;
    if (!Block<kN, kTb, kU, false>(r0, rows, span, next, t0, wk, fetch)) {
      fetch = at_start;
      Block<kN, kTb, kU, true>(r0, rows, span, next, t0, wk, fetch);
    }
  }

  // Adds the block's sums to wk.acc and returns true, or (fast mode only)
  // returns false, leaving wk.acc as it was, when a slot > 3 was seen.
  template <int kN, int kTb, int kU, bool kSafe>
  [[gnu::noinline]] bool Block(int64_t r0, int64_t rows, const Span& span, const Span& next, int64_t t0,
             const Worker& wk, PanelFetch& fetch) const {
    using RC = RowChunk<kN>;
    constexpr int kSlot = RC::kSlot, kRpv = RC::kRpv;
    // Locals, so the compiler keeps the accumulators in registers.
    const int64_t kc = Kc, tld = table_ld, j = span.first_vec;
    const int64_t c0 = span.c0, c1 = span.c1;
    const int64_t row0 = j * kRpv, vec_rows = Min(kRpv, rows - row0);
    const S* const vs = w.values + (r0 + row0) * kc;
    const uint8_t* const ix = w.indices + (r0 + row0) * kc;
    // What the block `ahead` reads: its rows, and its chunks as an offset
    // from ours (entries below next_end).
    const int64_t next_row0 = next.first_vec * kRpv;
    const int64_t next_rows = next.c0 < next.c1 ? Min(kRpv, rows - next_row0) : 0;
    const int64_t shift = (next.c0 - c0) * kSlot;
    const S* const next_vs = w.values + (r0 + next_row0) * kc + shift;
    const uint8_t* const next_ix = w.indices + (r0 + next_row0) * kc + shift;
    const int64_t next_end = Min(kc, next.c1 * kSlot) - shift;
    const __m512i base = lane_base, four = _mm512_set1_epi32(kSelected);
    __m512* const acc_mem = wk.acc + j * T + t0;
    __m512 acc[kU][kTb];
#pragma GCC unroll 16
    for (int t = 0; t < kTb; ++t) acc[0][t] = acc_mem[t];
#pragma GCC unroll 16
    for (int u = 1; u < kU; ++u)
#pragma GCC unroll 16
      for (int t = 0; t < kTb; ++t) acc[u][t] = _mm512_setzero_ps();
    // The chunk's tables of tokens t0 ...: 64 bytes apart, so every token's
    // address is the chunk's plus a constant.
    const float* const tab0 = wk.tables + t0 * 16 - c0 * tld;
    // Chunks whose every lane is live (whole chunks of whole rows): no masks.
    const int64_t whole_end = vec_rows == kRpv ? Max(c0, Min(c1, kc / kSlot)) : c0;
    __m512i seen = _mm512_setzero_si512();  // OR of the slots read unchecked.

    auto prefetch = [&](int64_t e0) JAXSPARSE_VNM_INLINE {
      if ((e0 / kSlot) % kFetchEvery == 0) fetch.Step();
      // One prefetch per 64 bytes of each row (the same schedule for both
      // rows and arrays: no test per row).
      if (e0 >= next_end) return;
      if ((e0 * sizeof(S)) % kCacheLine < kSlot * sizeof(S)) {
#pragma GCC unroll 4
        for (int r = 0; r < kRpv; ++r)
          if (r < next_rows)
            _mm_prefetch(reinterpret_cast<const char*>(next_vs + r * kc + e0), _MM_HINT_T0);
      }
      if (e0 % kCacheLine < kSlot) {
#pragma GCC unroll 4
        for (int r = 0; r < kRpv; ++r)
          if (r < next_rows)
            _mm_prefetch(reinterpret_cast<const char*>(next_ix + r * kc + e0), _MM_HINT_T0);
      }
    };
    // A whole chunk without checks, into accumulator set u.
    auto fast = [&](int64_t c, __m512* a) JAXSPARSE_VNM_INLINE {
      const int64_t e0 = c * kSlot;
      prefetch(e0);
      const __m512i i32 = RC::IndicesWhole(ix + e0, kc);
      seen = _mm512_or_si512(seen, i32);
      const __m512i pos = _mm512_add_epi32(base, i32);
      const __m512 wv = RC::template ValuesWhole<D>(vs + e0, kc);
      // Tables are the permutes' memory operands (one load each, from L1):
      // measured 10-30% faster (4 and 16 tokens) than blocks of 2-5 row
      // vectors sharing each chunk's tables in registers.
      const float* const tab = tab0 + c * tld;
#pragma GCC unroll 16
      for (int t = 0; t < kTb; ++t)
        a[t] = _mm512_fmadd_ps(wv, _mm512_permutexvar_ps(pos, _mm512_load_ps(tab + t * 16)),
                               a[t]);
    };
    // Any chunk, lanes past the rows' ends or with a slot > 3 dropped.
    auto safe = [&](int64_t c, __m512* a) JAXSPARSE_VNM_INLINE {
      const int64_t e0 = c * kSlot;
      prefetch(e0);
      const int64_t lanes = Min(kSlot, kc - e0);
      __mmask16 live = 0;
      for (int q = 0; q < vec_rows; ++q)
        live |= static_cast<__mmask16>(((1u << lanes) - 1) << (kSlot * q));
      const __m512i i32 = RC::Indices(ix + e0, kc, live);
      // A slot > 3 would pick another group's input: its lane is dropped, and
      // zeroing permutes make it add 0, never 0 * inf. Inputs that do not
      // exist are zeros in the tables.
      const __mmask16 keep = _mm512_mask_cmplt_epu32_mask(live, i32, four);
      const __m512i pos = _mm512_add_epi32(base, i32);
      const __m512 wv = RC::template Values<D>(vs + e0, kc, keep);
      const float* const tab = tab0 + c * tld;
#pragma GCC unroll 16
      for (int t = 0; t < kTb; ++t)
        a[t] = _mm512_fmadd_ps(
            wv, _mm512_maskz_permutexvar_ps(keep, pos, _mm512_load_ps(tab + t * 16)), a[t]);
    };
    int64_t c = c0;
    if (!kSafe) {
      for (; c + kU <= whole_end; c += kU) {
#pragma GCC unroll 4
        for (int u = 0; u < kU; ++u) fast(c + u, acc[u]);
      }
    }
    for (; c < c1; ++c) safe(c, acc[0]);
    if (!kSafe && _mm512_test_epi32_mask(seen, _mm512_set1_epi32(~3)) != 0) return false;
#pragma GCC unroll 16
    for (int t = 0; t < kTb; ++t) {
      __m512 sum = acc[0][t];
#pragma GCC unroll 4
      for (int u = 1; u < kU; ++u) sum = _mm512_add_ps(sum, acc[u][t]);
      acc_mem[t] = sum;
    }
    return true;
  }

  // The row sums. An accumulator (row vector j, token t) holds rpv rows'
  // partial sums, kSlot lanes each; for one token, the accumulators of 16
  // consecutive rows (16 / rpv vectors) are reduced together by a transposing
  // reduction (~20 shuffles and adds for 16 sums, not ~10 per sum), and the
  // 16 sums stored as one vector.
  [[gnu::noinline]] void WriteY(int64_t r0, int64_t rows, int64_t vecs, const __m512* acc) const {
    const int64_t per16 = 16 / rpv;  // Row vectors per 16 rows.
    // sums[4q + i] holds row 4i + q: back to row order.
    const __m512i order =
        _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (int64_t j0 = 0; j0 < vecs; j0 += per16) {
      const int64_t left = rows - j0 * rpv;
      const __mmask16 live = LaneMask(left);
      for (int64_t t = 0; t < T; ++t) {
        auto at = [&](int64_t j) {
          return j < vecs ? acc[j * T + t] : _mm512_setzero_ps();
        };
        // part[i], 128-bit lane q: the partial sums of row 4i + q.
        __m512 part[4];
        for (int i = 0; i < 4; ++i) {
          if (rpv == 4) {
            part[i] = at(j0 + i);
          } else {
            const __m512 x0 = at(j0 + 2 * i), x1 = at(j0 + 2 * i + 1);
            part[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, 0x88),
                                    _mm512_shuffle_f32x4(x0, x1, 0xdd));
          }
        }
        // Lane 4q + i: the total of lane q of part[i].
        const __m512 a01 = _mm512_add_ps(_mm512_unpacklo_ps(part[0], part[1]),
                                         _mm512_unpackhi_ps(part[0], part[1]));
        const __m512 a23 = _mm512_add_ps(_mm512_unpacklo_ps(part[2], part[3]),
                                         _mm512_unpackhi_ps(part[2], part[3]));
        const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(a01, a23, 0x44),
                                          _mm512_shuffle_ps(a01, a23, 0xee));
        StoreF32<D>(y + t * N + r0 + j0 * rpv, _mm512_permutexvar_ps(order, sums), live);
      }
    }
  }
};

// The forward: streaming at a few tokens, else the dense engine.
template <class D>
bool SpmmAvx512(const VnmProblem& p, const Runtime& rt) {
  if (SpmmStream<D>::Applies(p)) return Run<SpmmStream<D>>(p, rt);
  return Run<Spmm<Traits, D, Avx512Isa>>(p, rt);
}

inline bool SpmmAvx512Any(const VnmProblem& p, const Runtime& rt) {
  switch (p.dtype) {
    case Dtype::kF32:
      return SpmmAvx512<F32>(p, rt);
    case Dtype::kBF16:
      return SpmmAvx512<BF16>(p, rt);
    case Dtype::kF16:
      return SpmmAvx512<F16>(p, rt);
  }
  return true;
}

}  // namespace JAXSPARSE_VNM_ISA
}  // namespace cpu
}  // namespace jaxsparse

#undef JAXSPARSE_VNM_INLINE

#endif  // JAXSPARSE_CPU_VNM_VNM_AVX512_H_
