// The AVX2 (+FMA, F16C) forward micro-kernel of the 1xN blocks (included
// after blocks_kernels.h by blocks_kernels_avx2.cc): blocks_avx512.h's
// structure on 8-lane ymm and 16 registers.
//
// A pass is up to 8 token groups x the block row's n outputs, accumulated in
// ymm registers over the row's blocks. Per block: one load of its n weights,
// and per group of tokens one broadcast of x from the packed xT (vbroadcastss
// / vbroadcastsd: a load-port uop, no shuffle) feeding one FMA per vector.
// Zen 3 issues two FMAs and three loads per cycle, so a pass needs at least
// one FMA per load and eight independent accumulators (FMA latency 4 x 2
// pipes) to run at the FMA rate: n = 8 takes 8 tokens (8 FMAs per 9 loads),
// n = 16 4 tokens (8 FMAs per 6 loads), n = 32 2 tokens (8 FMAs per 6 loads),
// n = 4 12 pairs of tokens (12 FMAs per 13 loads). Accumulators, weights and
// the broadcast then take at most 14 of the 16 registers. A tile (the xT
// layout's tokens, ld) is 8 tokens, 24 for n = 4, so the pack transposes
// whole 8 x 8 blocks (blocks_pack.h); a tile wider than a pass takes several
// passes over the row, whose weights come back from L1/L2.
//
// n = 4 fills a vector with 2 tokens: lane l holds output l / 2 of token
// l % 2, x comes in by one vbroadcastsd of the two tokens' adjacent floats of
// xT, the 4 weights are spread once per block by one vpermps, and the store
// undoes it per token (as blocks_avx512.h does with 16 lanes).
//
// bf16/f16 are computed in f32 (AVX2 has no bf16 dot): x was converted when
// packed, the weights are widened per block and pass (two uops per 8, shared
// by the pass's tokens), the result is rounded once.
#ifndef JAXSPARSE_CPU_BLOCKS_BLOCKS_AVX2_H_
#define JAXSPARSE_CPU_BLOCKS_BLOCKS_AVX2_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/blocks/blocks_pack.h"

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_BLOCKS_ISA {

// How far ahead of the block being multiplied the few-token passes prefetch
// the values (about 100 ns of the stream at 20 GB/s).
constexpr int64_t kAheadBytes = 2048;

template <int kN>
struct Lanes8 {
  static constexpr int kG = kN >= 8 ? 1 : 8 / kN;  // tokens per vector
  static constexpr int kV = kN >= 8 ? kN / 8 : 1;  // vectors per token group
  // Token groups per pass: at most 12 accumulators, 8 for n >= 8 (a multiple
  // of the 8-token tile).
  static constexpr int kMaxGroups = kN == 4 ? 12 : 8 / kV;
};

template <Dtype D>
constexpr int64_t kBytesOf = D == Dtype::kF32 ? 4 : 2;

// 8 values of `dtype` at p as f32.
template <Dtype D>
inline __m256 Load8(const void* p) {
  if constexpr (D == Dtype::kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(p));
  } else {
    const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
    if constexpr (D == Dtype::kBF16) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
      return _mm256_cvtph_ps(h);
    }
  }
}

// 4 values of `dtype` at p as f32.
template <Dtype D>
inline __m128 Load4(const void* p) {
  if constexpr (D == Dtype::kF32) {
    return _mm_loadu_ps(static_cast<const float*>(p));
  } else {
    const __m128i h = _mm_loadl_epi64(static_cast<const __m128i*>(p));
    if constexpr (D == Dtype::kBF16) {
      return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
    } else {
      return _mm_cvtph_ps(h);
    }
  }
}

// 8 f32 lanes rounded to bf16: dtype_convert.h's F32ToBf16 on vectors (to
// nearest even: the upper half after adding 0x7fff + the kept half's lowest
// bit; a NaN keeps its upper half with the quiet bit set). The 8 results are
// the low 128 bits.
inline __m128i RoundBf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i up = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
  const __m256i r = _mm256_srli_epi32(_mm256_blendv_epi8(up, quiet, nan), 16);
  // packus works within 128-bit lanes: words 0-3 and 8-11 hold the results.
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

// The first `live` lanes of v (live <= 8), rounded to `dtype`, to p.
template <Dtype D>
inline void Store8(void* p, __m256 v, int live) {
  if constexpr (D == Dtype::kF32) {
    if (live == 8) return _mm256_storeu_ps(static_cast<float*>(p), v);
    if (live == 4) return _mm_storeu_ps(static_cast<float*>(p), _mm256_castps256_ps128(v));
    alignas(32) float part[8];
    _mm256_store_ps(part, v);
    std::memcpy(p, part, sizeof(float) * live);
  } else {
    __m128i h;
    if constexpr (D == Dtype::kBF16) {
      h = RoundBf16(v);
    } else {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    if (live == 8) return _mm_storeu_si128(static_cast<__m128i*>(p), h);
    if (live == 4) return _mm_storel_epi64(static_cast<__m128i*>(p), h);
    alignas(16) uint16_t part[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(part), h);
    std::memcpy(p, part, sizeof(uint16_t) * live);
  }
}

// Block b's n weights in lane order (lane l: output l / kG).
template <int kN, Dtype D>
inline void LoadWeights8(const void* values, int64_t b, __m256* w) {
  using L = Lanes8<kN>;
  const char* base = static_cast<const char*>(values) + b * kN * kBytesOf<D>;
  if constexpr (kN >= 8) {
#pragma GCC unroll 4
    for (int v = 0; v < L::kV; ++v) w[v] = Load8<D>(base + v * 8 * kBytesOf<D>);
  } else {
    // vpermps reads only lanes 0-3, so the cast's undefined upper half is never used.
    const __m256i spread = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    w[0] = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(Load4<D>(base)), spread);
  }
}

// kG adjacent floats of xT broadcast to every group of kG lanes.
template <int kG>
inline __m256 BroadcastX8(const float* p) {
  if constexpr (kG == 1) {
    return _mm256_broadcast_ss(p);
  } else {
    double pair;
    std::memcpy(&pair, p, sizeof(pair));
    return _mm256_castpd_ps(_mm256_set1_pd(pair));
  }
}

// One block into kA token groups of accumulators.
template <int kN, int kA, Dtype D>
__attribute__((always_inline)) inline void AddBlock8(const void* values, int64_t b,
                                                     const float* xs,
                                                     __m256 (*acc)[Lanes8<kN>::kV]) {
  using L = Lanes8<kN>;
  __m256 w[L::kV];
  LoadWeights8<kN, D>(values, b, w);
#pragma GCC unroll 16
  for (int a = 0; a < kA; ++a) {
    const __m256 xv = BroadcastX8<L::kG>(xs + a * L::kG);
#pragma GCC unroll 4
    for (int v = 0; v < L::kV; ++v) acc[a][v] = _mm256_fmadd_ps(xv, w[v], acc[a][v]);
  }
}

// The pass's accumulators to y (token t at y + t * n_out), `outs` real outputs.
template <int kN, int kA, Dtype D>
inline void StoreTile8(const __m256 (*acc)[Lanes8<kN>::kV], int64_t tokens, int64_t n_out,
                       int64_t outs, void* y) {
  using L = Lanes8<kN>;
  constexpr int64_t kCap = kN < 8 ? kN : 8;
#pragma GCC unroll 16
  for (int a = 0; a < kA; ++a) {
#pragma GCC unroll 2
    for (int g = 0; g < L::kG; ++g) {
      const int64_t t = static_cast<int64_t>(a) * L::kG + g;
      if (t >= tokens) return;
      char* row = static_cast<char*>(y) + t * n_out * kBytesOf<D>;
#pragma GCC unroll 4
      for (int v = 0; v < L::kV; ++v) {
        const int64_t left = outs - 8 * v;
        if (left <= 0) break;
        __m256 out = acc[a][v];
        if constexpr (L::kG > 1) {
          // Lanes 2 j + g hold token g's output j: gather them to lanes j.
          out = _mm256_permutevar8x32_ps(out, _mm256_setr_epi32(g, g + 2, g + 4, g + 6, g, g + 2,
                                                                g + 4, g + 6));
        }
        Store8<D>(row + 8 * v * kBytesOf<D>, out, static_cast<int>(left < kCap ? left : kCap));
      }
    }
  }
}

// Blocks [b0, b1) of one row for kA token groups from xs (ld floats per
// input). With few groups the FMAs of one block depend on the previous
// block's (4-cycle latency): kC chains take alternate blocks and are summed at
// the end.
template <int kN, int kA, Dtype D>
void RowPass(uint64_t k, const void* values, const int32_t* indices, int64_t b0, int64_t b1,
             const float* xs, int64_t ld, int64_t tokens, int64_t n_out, void* y,
             int64_t outs) {
  using L = Lanes8<kN>;
  constexpr int kVectors = kA * L::kV;
  constexpr int kC = kVectors >= 8 ? 1 : kVectors >= 4 ? 2 : 4;
  __m256 acc[kC][kA][L::kV];
#pragma GCC unroll 4
  for (int c = 0; c < kC; ++c)
#pragma GCC unroll 16
    for (int a = 0; a < kA; ++a)
#pragma GCC unroll 4
      for (int v = 0; v < L::kV; ++v) acc[c][a][v] = _mm256_setzero_ps();
  constexpr int64_t kValueBytes = kN * kBytesOf<D>;
  const char* ahead = static_cast<const char*>(values) + kAheadBytes;
  int64_t b = b0;
  for (; b + kC <= b1; b += kC) {
    if constexpr (kA <= 2) {
      // Few tokens: the values stream decides; ask for it kAheadBytes ahead,
      // and for the inputs' stream (each block's broadcast waits on its index).
      _mm_prefetch(ahead + b * kValueBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(indices + b) + kAheadBytes / 4, _MM_HINT_T0);
      if constexpr (kC * kValueBytes > 64) _mm_prefetch(ahead + b * kValueBytes + 64, _MM_HINT_T0);
      if constexpr (kC * kValueBytes > 128) {
        _mm_prefetch(ahead + b * kValueBytes + 128, _MM_HINT_T0);
        _mm_prefetch(ahead + b * kValueBytes + 192, _MM_HINT_T0);
      }
    }
#pragma GCC unroll 4
    for (int c = 0; c < kC; ++c) {
      const uint32_t input = static_cast<uint32_t>(indices[b + c]);
      if (input >= k) continue;  // Untrusted structure: a block outside x adds nothing.
      AddBlock8<kN, kA, D>(values, b + c, xs + static_cast<int64_t>(input) * ld, acc[c]);
    }
  }
  for (; b < b1; ++b) {
    const uint32_t input = static_cast<uint32_t>(indices[b]);
    if (input >= k) continue;
    AddBlock8<kN, kA, D>(values, b, xs + static_cast<int64_t>(input) * ld, acc[0]);
  }
#pragma GCC unroll 4
  for (int c = 1; c < kC; ++c)
#pragma GCC unroll 16
    for (int a = 0; a < kA; ++a)
#pragma GCC unroll 4
      for (int v = 0; v < L::kV; ++v) acc[0][a][v] = _mm256_add_ps(acc[0][a][v], acc[c][a][v]);
  StoreTile8<kN, kA, D>(acc[0], tokens, n_out, outs, y);
}

// Block row [b0, b1) for tokens [0, tokens) of xT: passes of kMaxGroups token
// groups, the last one through the smallest instantiated pass that covers it
// (it may read a few padding tokens past the tile: Slack()).
template <int kN, Dtype D>
void RowFor8(const BlocksProblem& p, const void* values, const int32_t* indices, int64_t b0,
             int64_t b1, const float* xt, int64_t ld, int64_t tokens, void* y, int64_t outs) {
  using L = Lanes8<kN>;
  const uint64_t k = static_cast<uint64_t>(p.k);
  for (int64_t t0 = 0; t0 < tokens; t0 += L::kMaxGroups * L::kG) {
    const int64_t count = Min(tokens - t0, L::kMaxGroups * L::kG);
    const int64_t groups = CeilDiv(count, L::kG);
    const float* xs = xt + t0;
    void* yt = static_cast<char*>(y) + t0 * p.n_out * kBytesOf<D>;
    const auto pass = [&](auto groups_c) {
      RowPass<kN, decltype(groups_c)::value, D>(k, values, indices, b0, b1, xs, ld, count,
                                                p.n_out, yt, outs);
    };
    if (groups <= 1) {
      pass(std::integral_constant<int, 1>{});
    } else if (groups <= 2) {
      pass(std::integral_constant<int, 2>{});
    } else if (groups <= 4) {
      pass(std::integral_constant<int, 4>{});
    } else if (groups <= 8 || L::kMaxGroups <= 8) {
      pass(std::integral_constant<int, (L::kMaxGroups < 8 ? L::kMaxGroups : 8)>{});
    } else {
      pass(std::integral_constant<int, L::kMaxGroups>{});
    }
  }
}

template <Dtype D>
void RowForDtype8(const BlocksProblem& p, const void* values, const int32_t* indices, int64_t b0,
                  int64_t b1, const float* xt, int64_t ld, int64_t tokens, void* y,
                  int64_t outs) {
  switch (p.n) {
    case 4:
      return RowFor8<4, D>(p, values, indices, b0, b1, xt, ld, tokens, y, outs);
    case 8:
      return RowFor8<8, D>(p, values, indices, b0, b1, xt, ld, tokens, y, outs);
    case 16:
      return RowFor8<16, D>(p, values, indices, b0, b1, xt, ld, tokens, y, outs);
    default:
      return RowFor8<32, D>(p, values, indices, b0, b1, xt, ld, tokens, y, outs);
  }
}

struct Avx2Micro {
  // Whole 8 x 8 transposes per tile (blocks_pack.h); n = 4's 12 pairs per pass.
  static int64_t TileTokens(const BlocksProblem& p) { return p.n == 4 ? 24 : 8; }
  // A last pass may read up to 8 tokens past the tile (n = 4: 9 groups as 12):
  // padding, never stored.
  static int64_t Slack() { return 32; }
  template <class Rows>
  static void Pack(const BlocksProblem& p, const Rows& rows, int64_t count, int64_t ld,
                   int64_t k0, int64_t k1, float* xt) {
    PackFloatsRows(p.dtype, rows, count, ld, k0, k1, xt);
  }
  static void Row(const BlocksProblem& p, const void* values, const int32_t* indices,
                  int64_t b0, int64_t b1, const float* xt, int64_t ld, int64_t tokens, void* y,
                  int64_t outs) {
    switch (p.dtype) {
      case Dtype::kBF16:
        return RowForDtype8<Dtype::kBF16>(p, values, indices, b0, b1, xt, ld, tokens, y, outs);
      case Dtype::kF16:
        return RowForDtype8<Dtype::kF16>(p, values, indices, b0, b1, xt, ld, tokens, y, outs);
      default:
        return RowForDtype8<Dtype::kF32>(p, values, indices, b0, b1, xt, ld, tokens, y, outs);
    }
  }
};

// ---------------------------------------------------------------- backward
// The backward ops' inner loops (blocks_kernels.h gives the task structure),
// blocks_avx512.h's on ymm: 8 independent accumulators per group of blocks
// (FMA latency 4 x 2 pipes), the rest of the 16 registers for the shared
// operand and the broadcast.

// The first `live` (0..8) values of `dtype` at p as f32, zero past them.
template <Dtype D>
inline __m256 LoadPart8(const void* p, int64_t live) {
  if (live >= 8) return Load8<D>(p);
  alignas(32) float part[8] = {};
  for (int64_t i = 0; i < live; ++i) part[i] = LoadAs(D, p, i);
  return _mm256_load_ps(part);
}

// spmm_t: dxT[k_p][16 tokens] += sum_j dyr[j][:] * v[p][j], tokens in two ymm.
// Four blocks at a time (8 accumulators): each row of dyr is loaded once for
// the four, and their weights are widened once into f32 on the stack so every
// broadcast is a plain vbroadcastss from L1.
constexpr int kBackBlocksT = 4;

template <int kN, Dtype D>
void AddRowT8(const void* values, const int32_t* indices, uint64_t k, int64_t b0, int64_t b1,
              const float* rows, float* acc) {
  static_assert(kTokensT == 16, "spmm_t's token tile is two ymm of tokens");
  alignas(32) float w[kBackBlocksT][kN];
  for (int64_t b = b0; b < b1; b += kBackBlocksT) {
    const int count = static_cast<int>(b1 - b < kBackBlocksT ? b1 - b : kBackBlocksT);
    // Past the row's last block, repeat it (its sum is dropped below).
#pragma GCC unroll 4
    for (int i = 0; i < kBackBlocksT; ++i) {
      const char* src =
          static_cast<const char*>(values) + (b + (i < count ? i : count - 1)) * kN * kBytesOf<D>;
      if constexpr (kN == 4) {
        _mm_store_ps(w[i], Load4<D>(src));
      } else {
#pragma GCC unroll 4
        for (int v = 0; v < kN / 8; ++v) _mm256_store_ps(w[i] + 8 * v, Load8<D>(src + 8 * v * kBytesOf<D>));
      }
    }
    __m256 sum[kBackBlocksT][2];
#pragma GCC unroll 4
    for (int i = 0; i < kBackBlocksT; ++i) sum[i][0] = sum[i][1] = _mm256_setzero_ps();
#pragma GCC unroll 4
    for (int j = 0; j < kN; ++j) {
      const __m256 r0 = _mm256_loadu_ps(rows + j * 16), r1 = _mm256_loadu_ps(rows + j * 16 + 8);
#pragma GCC unroll 4
      for (int i = 0; i < kBackBlocksT; ++i) {
        const __m256 wv = _mm256_broadcast_ss(&w[i][j]);
        sum[i][0] = _mm256_fmadd_ps(r0, wv, sum[i][0]);
        sum[i][1] = _mm256_fmadd_ps(r1, wv, sum[i][1]);
      }
    }
    for (int i = 0; i < count; ++i) {
      const uint32_t input = static_cast<uint32_t>(indices[b + i]);
      if (input >= k) continue;  // Untrusted structure: a block outside dx adds nothing.
      float* dst = acc + static_cast<int64_t>(input) * 16;
      _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), sum[i][0]));
      _mm256_storeu_ps(dst + 8, _mm256_add_ps(_mm256_loadu_ps(dst + 8), sum[i][1]));
    }
  }
}

// sddmm: dv[p][outputs] = sum_t xT[k_p][t] * dyr[t][:], outputs in the lanes
// (n >= 8). kB blocks at a time, 8 accumulators (n = 8: 8 blocks, n = 16: 4,
// n = 32: 2); each token's dyr row is loaded once for them. Tokens in chunks,
// blocks in segments, as blocks_avx512.h: a group of blocks reads the chunk's
// rows of dyr from L1/L2 and the segment's sums wait in f32 between chunks.
constexpr int64_t kSampleTokens8 = 256;
constexpr int64_t kSampleSegment8 = 256;

template <int kN, Dtype D>
void SampleRow8(const float* xt, const int32_t* indices, uint64_t k, int64_t tokens, int64_t b0,
                int64_t b1, const float* rows, void* dv) {
  constexpr int kV = kN / 8;
  constexpr int kB = 8 / kV;
  alignas(32) float held[kSampleSegment8][kN];
  for (int64_t s0 = b0; s0 < b1; s0 += kSampleSegment8) {
    const int64_t s1 = b1 - s0 < kSampleSegment8 ? b1 : s0 + kSampleSegment8;
    for (int64_t t0 = 0; t0 < tokens; t0 += kSampleTokens8) {
      const int64_t t1 = tokens - t0 < kSampleTokens8 ? tokens : t0 + kSampleTokens8;
      for (int64_t b = s0; b < s1; b += kB) {
        const int count = static_cast<int>(s1 - b < kB ? s1 - b : kB);
        const float* xs[kB];
#pragma GCC unroll 8
        for (int i = 0; i < kB; ++i) {
          const uint32_t input = i < count ? static_cast<uint32_t>(indices[b + i]) : 0u;
          // Untrusted structure: a block outside x reads the zero row past xT.
          xs[i] = xt + static_cast<int64_t>(i < count && input < k ? input : k) * tokens;
        }
        __m256 sum[kB][kV];
#pragma GCC unroll 8
        for (int i = 0; i < kB; ++i)
#pragma GCC unroll 4
          for (int v = 0; v < kV; ++v) {
            sum[i][v] = t0 == 0 ? _mm256_setzero_ps() : _mm256_load_ps(held[b - s0 + i] + 8 * v);
          }
        for (int64_t t = t0; t < t1; ++t) {
          __m256 d[kV];
#pragma GCC unroll 4
          for (int v = 0; v < kV; ++v) d[v] = _mm256_loadu_ps(rows + t * kN + 8 * v);
#pragma GCC unroll 8
          for (int i = 0; i < kB; ++i) {
            const __m256 xv = _mm256_broadcast_ss(xs[i] + t);
#pragma GCC unroll 4
            for (int v = 0; v < kV; ++v) sum[i][v] = _mm256_fmadd_ps(xv, d[v], sum[i][v]);
          }
        }
        // Past the segment's end the slots are spare (kSampleSegment8 is a multiple of 8).
#pragma GCC unroll 8
        for (int i = 0; i < kB; ++i)
#pragma GCC unroll 4
          for (int v = 0; v < kV; ++v) _mm256_store_ps(held[b - s0 + i] + 8 * v, sum[i][v]);
      }
    }
    for (int64_t b = s0; b < s1; ++b) {
      char* out = static_cast<char*>(dv) + b * kN * kBytesOf<D>;
#pragma GCC unroll 4
      for (int v = 0; v < kV; ++v) {
        Store8<D>(out + 8 * v * kBytesOf<D>, _mm256_load_ps(held[b - s0] + 8 * v), 8);
      }
    }
  }
}

// spmm_t's dyr [n][16]: per 8 outputs and 8 tokens, 8 row loads and one 8 x 8
// transpose (the scalar loop took a load, a conversion and a strided store per
// element); zero past `outs` and `count`.
template <Dtype D>
void LoadColumnsT8(int64_t n, int64_t n_out, const void* dy, int64_t count, int64_t outs,
                   float* rows) {
  for (int64_t h = 0; h < n; h += 8) {
    const int64_t live = Max(0, Min(8, outs - h));
    for (int64_t half = 0; half < 16; half += 8) {
      __m256 r[8];
      for (int64_t i = 0; i < 8; ++i) {
        const int64_t t = half + i;
        const char* row = static_cast<const char*>(dy) + (t * n_out + h) * kBytesOf<D>;
        r[i] = t < count ? LoadPart8<D>(row, live) : _mm256_setzero_ps();
      }
      Transpose8x8Floats(r);
      for (int64_t j = 0; j < Min(8, n - h); ++j) _mm256_storeu_ps(rows + (h + j) * 16 + half, r[j]);
    }
  }
}

// spmm_t's dxT [K][16] to dx rows: 8 inputs x 8 tokens per transpose.
template <Dtype D>
void StoreDx8(int64_t k, const float* acc, int64_t count, void* dx) {
  for (int64_t k0 = 0; k0 < k; k0 += 8) {
    const int64_t live = Min(8, k - k0);
    for (int64_t half = 0; half < count; half += 8) {
      __m256 r[8];
      for (int64_t i = 0; i < 8; ++i) {
        r[i] = i < live ? _mm256_loadu_ps(acc + (k0 + i) * 16 + half) : _mm256_setzero_ps();
      }
      Transpose8x8Floats(r);
      for (int64_t t = half; t < Min(count, half + 8); ++t) {
        Store8<D>(static_cast<char*>(dx) + (t * k + k0) * kBytesOf<D>, r[t - half],
                  static_cast<int>(live));
      }
    }
  }
}

// The sddmm's dyr [T][n]: one load and store per token and 8 outputs.
template <Dtype D>
void PackColumns8(int64_t n, int64_t n_out, const void* dy, int64_t tokens, int64_t outs,
                  float* rows) {
  for (int64_t h = 0; h < n; h += 8) {
    const int64_t live = Max(0, Min(8, outs - h));
    for (int64_t t = 0; t < tokens; ++t) {
      const char* row = static_cast<const char*>(dy) + (t * n_out + h) * kBytesOf<D>;
      const __m256 v = LoadPart8<D>(row, live);
      if (n - h >= 8) {
        _mm256_storeu_ps(rows + t * n + h, v);
      } else {
        _mm_storeu_ps(rows + t * n + h, _mm256_castps256_ps128(v));  // n = 4
      }
    }
  }
}

// Calls f(dtype constant) for p's dtype.
template <class F>
inline void ForDtype(Dtype dtype, const F& f) {
  switch (dtype) {
    case Dtype::kBF16:
      return f(std::integral_constant<Dtype, Dtype::kBF16>{});
    case Dtype::kF16:
      return f(std::integral_constant<Dtype, Dtype::kF16>{});
    default:
      return f(std::integral_constant<Dtype, Dtype::kF32>{});
  }
}

// Calls f(n constant) for p's n.
template <class F>
inline void ForN(int64_t n, const F& f) {
  switch (n) {
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 8:
      return f(std::integral_constant<int, 8>{});
    case 16:
      return f(std::integral_constant<int, 16>{});
    default:
      return f(std::integral_constant<int, 32>{});
  }
}

struct Avx2Back {
  static void PackColumns(const BlocksProblem& p, const void* dy, int64_t tokens, int64_t outs,
                          float* rows) {
    ForDtype(p.dtype, [&](auto d) {
      PackColumns8<decltype(d)::value>(p.n, p.n_out, dy, tokens, outs, rows);
    });
  }
  static void LoadColumnsT(const BlocksProblem& p, const void* dy, int64_t count, int64_t outs,
                           float* rows) {
    ForDtype(p.dtype, [&](auto d) {
      LoadColumnsT8<decltype(d)::value>(p.n, p.n_out, dy, count, outs, rows);
    });
  }
  static void StoreDx(const BlocksProblem& p, const float* acc, int64_t count, void* dx) {
    ForDtype(p.dtype, [&](auto d) { StoreDx8<decltype(d)::value>(p.k, acc, count, dx); });
  }
  // The sddmm's xT by 8 x 8 register transposes (blocks_pack.h).
  template <class Rows>
  static void Pack(Dtype dtype, const Rows& rows, int64_t count, int64_t ld, int64_t k0,
                   int64_t k1, float* xt) {
    PackFloatsRows(dtype, rows, count, ld, k0, k1, xt);
  }
  static void AddRowT(const BlocksProblem& p, const void* values, const int32_t* indices,
                      int64_t b0, int64_t b1, const float* rows, float* acc) {
    const uint64_t k = static_cast<uint64_t>(p.k);
    ForN(p.n, [&](auto n) {
      ForDtype(p.dtype, [&](auto d) {
        AddRowT8<decltype(n)::value, decltype(d)::value>(values, indices, k, b0, b1, rows, acc);
      });
    });
  }
  static void SampleRow(const BlocksProblem& p, const float* xt, const int32_t* indices,
                        int64_t b0, int64_t b1, const float* rows, void* dv) {
    // n = 4 fills half a ymm: the portable loop (8 blocks' sums in xmm).
    if (p.n == 4) return PortableBack::SampleRow(p, xt, indices, b0, b1, rows, dv);
    const uint64_t k = static_cast<uint64_t>(p.k);
    ForN(p.n, [&](auto n) {
      if constexpr (decltype(n)::value >= 8) {
        ForDtype(p.dtype, [&](auto d) {
          SampleRow8<decltype(n)::value, decltype(d)::value>(xt, indices, k, p.tokens, b0, b1,
                                                             rows, dv);
        });
      }
    });
  }
};

}  // namespace JAXSPARSE_BLOCKS_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_BLOCKS_BLOCKS_AVX2_H_
