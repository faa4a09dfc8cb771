// The AVX-512 forward micro-kernel of the 1xN blocks (included after
// blocks_kernels.h by blocks_kernels_avx512.cc, and by the avx512bf16 unit,
// in their own namespaces).
//
// A tile is tokens x the block row's n outputs, accumulated in zmm registers
// over the row's blocks. Per block: one load of its n weights, and per group
// of tokens one broadcast of x from the packed xT (a memory operand, so a
// load-port uop and no shuffle) feeding one FMA per vector. So the FMAs per
// load approach 1 and the loop runs at the FMA rate on cores with two or three
// load ports (Zen 4: one zmm FMA and up to three loads per cycle).
//
// Every vector is full whatever n is: its 16 lanes hold kG tokens x 16/kG
// outputs, lane l = output l / kG of token l % kG (kG = 16/n for n < 16).
// x then comes in by one broadcast of kG adjacent floats of xT (vbroadcastss,
// vbroadcastsd or vbroadcastf32x4), and the block's n weights are spread
// once per block to lanes l -> l / kG by one vpermps; the store undoes it per
// token. n = 32 takes two vectors per token.
//
// bf16/f16 are computed in f32: x was converted when packed, the weights are
// widened per block (two uops, shared by the tile's tokens), the result is
// rounded once.
#ifndef JAXSPARSE_CPU_BLOCKS_BLOCKS_AVX512_H_
#define JAXSPARSE_CPU_BLOCKS_BLOCKS_AVX512_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/blocks/blocks_pack.h"
#include "cpu/common/simd_avx512.h"

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_BLOCKS_ISA {

// How far ahead of the block being multiplied the few-token tiles prefetch
// the values (about 100 ns of the stream at 20 GB/s).
constexpr int64_t kPrefetchBytes = 2048;

template <int kN>
struct Lanes {
  static constexpr int kG = kN >= 16 ? 1 : 16 / kN;  // tokens per vector
  static constexpr int kV = kN >= 16 ? kN / 16 : 1;  // vectors per token group
  // Token groups per full tile: 24 accumulators of the 32 zmm registers.
  static constexpr int kMaxGroups = 24 / kV;
};

// 16 values of `dtype` at p as f32 (the lanes beyond `count` zero).
template <Dtype D>
inline __m512 LoadF32(const void* p, int count) {
  const __mmask16 keep = static_cast<__mmask16>((1u << count) - 1u);
  if constexpr (D == Dtype::kF32) {
    return count == 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(keep, p);
  } else {
    const __m256i h = count == 16 ? _mm256_loadu_si256(static_cast<const __m256i*>(p))
                                  : _mm256_maskz_loadu_epi16(keep, p);
    if constexpr (D == Dtype::kBF16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

// The lanes of v whose bits are in `keep`, rounded to `dtype`, to p.
template <Dtype D>
inline void StoreF32(void* p, __m512 v, __mmask16 keep) {
  if constexpr (D == Dtype::kF32) {
    _mm512_mask_storeu_ps(p, keep, v);
  } else if constexpr (D == Dtype::kBF16) {
    StoreBf16(static_cast<uint16_t*>(p), v, keep);
  } else {
    _mm256_mask_storeu_epi16(p, keep, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT |
                                                             _MM_FROUND_NO_EXC));
  }
}

// Block b's n weights in lane order (lane l: output l / kG).
template <int kN, Dtype D>
inline void LoadWeights(const void* values, int64_t b, __m512* w) {
  using L = Lanes<kN>;
  const char* base = static_cast<const char*>(values) + b * kN * (D == Dtype::kF32 ? 4 : 2);
  if constexpr (kN >= 16) {
    #pragma GCC unroll 32
    for (int v = 0; v < L::kV; ++v) w[v] = LoadF32<D>(base + v * 16 * (D == Dtype::kF32 ? 4 : 2), 16);
  } else {
    const __m512i spread = _mm512_srli_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        L::kG == 2 ? 1 : 2);
    w[0] = _mm512_permutexvar_ps(spread, LoadF32<D>(base, kN));
  }
}

// kG adjacent floats of xT broadcast to every group of kG lanes.
template <int kG>
inline __m512 BroadcastX(const float* p) {
  if constexpr (kG == 1) {
    return _mm512_set1_ps(*p);
  } else if constexpr (kG == 2) {
    double pair;
    std::memcpy(&pair, p, sizeof(pair));
    return _mm512_castpd_ps(_mm512_set1_pd(pair));
  } else {
    return _mm512_broadcast_f32x4(_mm_loadu_ps(p));
  }
}

// One block into kA token groups of accumulators.
template <int kN, int kA, Dtype D>
__attribute__((always_inline)) inline void AddBlock(const void* values, int64_t b, const float* xs, __m512 (*acc)[Lanes<kN>::kV]) {
  using L = Lanes<kN>;
  __m512 w[L::kV];
  LoadWeights<kN, D>(values, b, w);
  #pragma GCC unroll 32
  for (int a = 0; a < kA; ++a) {
    const __m512 xv = BroadcastX<L::kG>(xs + a * L::kG);
    #pragma GCC unroll 32
    for (int v = 0; v < L::kV; ++v) acc[a][v] = _mm512_fmadd_ps(xv, w[v], acc[a][v]);
  }
}

// The tile's accumulators to y (token t at y + t * N), `outs` real outputs.
template <int kN, int kA, Dtype D>
inline void StoreTile(const __m512 (*acc)[Lanes<kN>::kV], int64_t tokens, int64_t n_out,
                      int64_t outs, void* y) {
  using L = Lanes<kN>;
  constexpr int64_t kBytes = D == Dtype::kF32 ? 4 : 2;
  #pragma GCC unroll 32
  for (int a = 0; a < kA; ++a) {
    #pragma GCC unroll 32
    for (int g = 0; g < L::kG; ++g) {
      const int64_t t = static_cast<int64_t>(a) * L::kG + g;
      if (t >= tokens) return;
      char* row = static_cast<char*>(y) + t * n_out * kBytes;
      #pragma GCC unroll 32
      for (int v = 0; v < L::kV; ++v) {
        const int64_t left = outs - 16 * v;
        if (left <= 0) break;
        __m512 out = acc[a][v];
        if constexpr (L::kG > 1) {
          // Lanes j * kG + g hold token g's outputs j: gather them to lanes j.
          const __m512i pick = _mm512_add_epi32(
              _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                   13, 14, 15),
                                 _mm512_set1_epi32(L::kG)),
              _mm512_set1_epi32(g));
          out = _mm512_permutexvar_ps(pick, out);
        }
        constexpr int64_t kCap = kN < 16 ? kN : 16;
        const int live = static_cast<int>(left < kCap ? left : kCap);
        const __mmask16 keep = static_cast<__mmask16>((1u << live) - 1u);
        StoreF32<D>(row + 16 * v * kBytes, out, keep);
      }
    }
  }
}

// Where input k's tokens start in the micro-kernel's x: k * ld floats into a
// packed xT (RowsApart), or a table's entry (RowsAt: a convolution's input
// strip, where input k = (kernel position, channel) is a channel's row
// shifted by the position, blocks_kernels.h's direct convolution).
struct RowsApart {
  int64_t ld;
  int64_t operator()(uint32_t k) const { return static_cast<int64_t>(k) * ld; }
};
struct RowsAt {
  const int64_t* offsets;
  int64_t first;  // the tile's first token, in the strip's elements like the offsets
  int64_t operator()(uint32_t k) const { return offsets[k] + first; }
};

// Blocks [b0, b1) of one row for kA token groups. With few groups the FMAs of
// one block depend on the previous block's (4-cycle latency): kC chains take
// alternate blocks and are summed at the end.
template <int kN, int kA, Dtype D, class At>
void RowTile(const BlocksProblem& p, const void* values, const int32_t* indices, int64_t b0,
             int64_t b1, const float* xt, At at, int64_t tokens, void* y, int64_t outs) {
  using L = Lanes<kN>;
  constexpr int kC = kA >= 4 ? 1 : 4 / kA;
  __m512 acc[kC][kA][L::kV];
  #pragma GCC unroll 32
  for (int c = 0; c < kC; ++c)
    #pragma GCC unroll 32
    for (int a = 0; a < kA; ++a)
      #pragma GCC unroll 32
      for (int v = 0; v < L::kV; ++v) acc[c][a][v] = _mm512_setzero_ps();
  const uint64_t k = static_cast<uint64_t>(p.k);
  int64_t b = b0;
  constexpr int64_t kValueBytes = kN * (D == Dtype::kF32 ? 4 : 2);
  const char* ahead = static_cast<const char*>(values) + kPrefetchBytes;
  for (; b + kC <= b1; b += kC) {
    if constexpr (kA <= 2) {
      // Few tokens: the values stream decides, and the core's prefetchers
      // alone left it at a third of the bandwidth; ask kPrefetchBytes ahead.
      _mm_prefetch(ahead + b * kValueBytes, _MM_HINT_T0);
      // The inputs' stream too: each block's broadcast waits on its index.
      _mm_prefetch(reinterpret_cast<const char*>(indices + b) + kPrefetchBytes / 4, _MM_HINT_T0);
      if constexpr (kC * kValueBytes > 64) _mm_prefetch(ahead + b * kValueBytes + 64, _MM_HINT_T0);
      if constexpr (kC * kValueBytes > 128) {
        _mm_prefetch(ahead + b * kValueBytes + 128, _MM_HINT_T0);
        _mm_prefetch(ahead + b * kValueBytes + 192, _MM_HINT_T0);
      }
    }
    #pragma GCC unroll 32
    for (int c = 0; c < kC; ++c) {
      const uint32_t input = static_cast<uint32_t>(indices[b + c]);
      if (input >= k) continue;  // Untrusted structure: a block outside x adds nothing.
      AddBlock<kN, kA, D>(values, b + c, xt + at(input), acc[c]);
    }
  }
  for (; b < b1; ++b) {
    const uint32_t input = static_cast<uint32_t>(indices[b]);
    if (input >= k) continue;
    AddBlock<kN, kA, D>(values, b, xt + at(input), acc[0]);
  }
  #pragma GCC unroll 32
  for (int c = 1; c < kC; ++c)
    #pragma GCC unroll 32
    for (int a = 0; a < kA; ++a)
      #pragma GCC unroll 32
      for (int v = 0; v < L::kV; ++v) acc[0][a][v] = _mm512_add_ps(acc[0][a][v], acc[c][a][v]);
  StoreTile<kN, kA, D>(acc[0], tokens, p.n_out, outs, y);
}

template <int kN, Dtype D, class At>
void RowFor(const BlocksProblem& p, const void* values, const int32_t* indices, int64_t b0,
            int64_t b1, const float* xt, At at, int64_t tokens, void* y, int64_t outs) {
  using L = Lanes<kN>;
  const int64_t groups = CeilDiv(tokens, L::kG);
  // The smallest instantiated tile that covers the tokens.
  if (groups <= 1) return RowTile<kN, 1, D>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
  if (groups <= 2) return RowTile<kN, 2, D>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
  if (groups <= 4) return RowTile<kN, 4, D>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
  if (groups <= 8) return RowTile<kN, 8, D>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
  if (groups <= 12) return RowTile<kN, 12, D>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
  if constexpr (L::kMaxGroups > 12) {
    if (groups <= 16) return RowTile<kN, 16, D>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
    return RowTile<kN, 24, D>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
  }
}

template <Dtype D, class At>
void RowForDtype(const BlocksProblem& p, const void* values, const int32_t* indices, int64_t b0,
                 int64_t b1, const float* xt, At at, int64_t tokens, void* y, int64_t outs) {
  switch (p.n) {
    case 4:
      return RowFor<4, D>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
    case 8:
      return RowFor<8, D>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
    case 16:
      return RowFor<16, D>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
    default:
      return RowFor<32, D>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
  }
}

template <class At>
void RowForAny(const BlocksProblem& p, const void* values, const int32_t* indices, int64_t b0,
               int64_t b1, const float* xt, At at, int64_t tokens, void* y, int64_t outs) {
  switch (p.dtype) {
    case Dtype::kBF16:
      return RowForDtype<Dtype::kBF16>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
    case Dtype::kF16:
      return RowForDtype<Dtype::kF16>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
    default:
      return RowForDtype<Dtype::kF32>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
  }
}

// ---------------------------------------------------------------- f32, tokens in lanes
// Where a tile's tokens lie one float apart for every input (a packed xT of
// full tiles, or the direct convolution's strip), f32 1 x 16 blocks can put
// tokens in the lanes instead of outputs. With outputs in the lanes (RowTile)
// every FMA takes its own broadcast of x, as an embedded {1to16} operand:
// 5.3-7.1 zmm FMA/ns per core on Zen 5 against 7.6-8.55 for FMAs alone
// (cpu_bounds.c part 5, runs of two sessions), since a block row's blocks
// have distinct inputs and cannot share one. With tokens in the lanes a block is kLaneVectors loads of
// 16 tokens, and each of its weights is broadcast once (a load, no shuffle)
// for kLaneVectors FMAs. 8 outputs x 2 vectors per pass beat 4 x 4 (more
// passes over the blocks) and 8 x 3 and 4 x 6 (24 accumulators) on Zen 5:
// 1.50 ms against 1.61-2.0 for the direct 56 x 56 x 64 convolution at 25%,
// 2.0-2.75 with outputs in the lanes. The accumulators come out
// [output][token]; one 16 x 16 transpose per 16 tokens (64 shuffles for 256
// outputs, each of which took 9 FMAs at 25% of a 3 x 3 x 64 kernel) turns
// them into the tile's [token][output] rows.
constexpr int kLaneOutputs = 8;   // outputs per pass over the row's blocks
constexpr int kLaneVectors = 2;   // 16-token vectors per tile
constexpr int64_t kLaneTokens = 16 * kLaneVectors;
constexpr int64_t kLanePrefetch = 16;  // blocks
static_assert(kLaneTokens * 16 <= kMaxTileOutputs, "the direct convolution's tile buffer");

inline bool TokensInLanes(const BlocksProblem& p) {
  return p.dtype == Dtype::kF32 && p.n == 16;
}

// Outputs [o0, o0 + kLaneOutputs) of the tile, over blocks [b0, b1), into
// out [16][kLaneTokens]; input k's tokens at xt + at(k). 16 independent
// accumulators cover the FMA latency (4 cycles at two per cycle).
template <class At>
inline void TokenLanesPass(const float* values, const int32_t* indices, int64_t b0, int64_t b1,
                           uint64_t k, const float* xt, At at, int o0, float* out) {
  constexpr int kO = kLaneOutputs, kT = kLaneVectors;
  __m512 acc[kO][kT];
  #pragma GCC unroll 16
  for (int o = 0; o < kO; ++o)
    #pragma GCC unroll 16
    for (int t = 0; t < kT; ++t) acc[o][t] = _mm512_setzero_ps();
  for (int64_t b = b0; b < b1; ++b) {
    const uint32_t input = static_cast<uint32_t>(indices[b]);
    // The x row kLanePrefetch blocks ahead, into L1 (its two lines): rows
    // come from L2 at random, and the FMAs wait on them.
    if (b + kLanePrefetch < b1) {
      const uint32_t ahead = static_cast<uint32_t>(indices[b + kLanePrefetch]);
      if (ahead < k) {
        const char* row = reinterpret_cast<const char*>(xt + at(ahead));
        _mm_prefetch(row, _MM_HINT_T0);
        _mm_prefetch(row + 4 * kLaneTokens - 1, _MM_HINT_T0);
      }
    }
    if (input >= k) continue;  // Untrusted structure: a block outside x adds nothing.
    const float* xs = xt + at(input);
    __m512 xv[kT];
    #pragma GCC unroll 16
    for (int t = 0; t < kT; ++t) xv[t] = _mm512_loadu_ps(xs + 16 * t);
    const float* w = values + b * 16 + o0;
    #pragma GCC unroll 16
    for (int o = 0; o < kO; ++o) {
      const __m512 wo = _mm512_set1_ps(w[o]);  // vbroadcastss from memory: a load, no shuffle
      #pragma GCC unroll 16
      for (int t = 0; t < kT; ++t) acc[o][t] = _mm512_fmadd_ps(wo, xv[t], acc[o][t]);
    }
  }
  #pragma GCC unroll 16
  for (int o = 0; o < kO; ++o)
    #pragma GCC unroll 16
    for (int t = 0; t < kT; ++t) _mm512_store_ps(out + (o0 + o) * kLaneTokens + 16 * t, acc[o][t]);
}

// y[t * n_out + o] = out[o][t] for t < tokens, o < outs: one 16 x 16
// transpose per 16 tokens, rounded once to D.
template <Dtype D>
inline void StoreTokenLanes(const float* out, int64_t tokens, int64_t n_out, int64_t outs,
                            void* y) {
  constexpr int64_t kBytes = D == Dtype::kF32 ? 4 : 2;
  const __mmask16 keep = static_cast<__mmask16>((1u << outs) - 1u);
  for (int64_t g = 0; g * 16 < tokens; ++g) {
    __m512 r[16];
    #pragma GCC unroll 16
    for (int o = 0; o < 16; ++o) r[o] = _mm512_load_ps(out + o * kLaneTokens + 16 * g);
    Transpose16x16Floats(r);
    const int64_t live = Min(16, tokens - 16 * g);
    for (int64_t t = 0; t < live; ++t) {
      StoreF32<D>(static_cast<char*>(y) + (16 * g + t) * n_out * kBytes, r[t], keep);
    }
  }
}

// A tile of `tokens` tokens (at most kLaneTokens) of one block row:
// y[t * n_out + o] for o < outs.
template <class At>
void TokenLanesRow(const BlocksProblem& p, const float* values, const int32_t* indices, int64_t b0,
                   int64_t b1, const float* xt, At at, int64_t tokens, float* y, int64_t outs) {
  alignas(64) float out[16 * kLaneTokens];
  // Every pass, also those past `outs`: each block stores 16 values, so they
  // read nothing outside it, and the transpose then reads no stale lanes (the
  // padding outputs' lanes are masked off at the store).
  for (int o0 = 0; o0 < 16; o0 += kLaneOutputs) {
    TokenLanesPass(values, indices, b0, b1, static_cast<uint64_t>(p.k), xt, at, o0, out);
  }
  StoreTokenLanes<Dtype::kF32>(out, tokens, p.n_out, outs, y);
}

struct Avx512Micro {
  // f32 1 x 16 blocks with a tile's worth of tokens take them in the lanes
  // (TokenLanesRow); fewer tokens stay on outputs in the lanes, where the
  // weights' stream decides.
  static bool LanesHoldTokens(const BlocksProblem& p) {
    return TokensInLanes(p) && p.tokens >= kLaneTokens;
  }
  static int64_t TileTokens(const BlocksProblem& p) {
    if (LanesHoldTokens(p)) return kLaneTokens;
    switch (p.n) {
      case 4:
        return Lanes<4>::kMaxGroups * Lanes<4>::kG;
      case 8:
        return Lanes<8>::kMaxGroups * Lanes<8>::kG;
      case 16:
        return Lanes<16>::kMaxGroups;
      default:
        return Lanes<32>::kMaxGroups;
    }
  }
  // A tile may read up to 96 tokens past its first (n = 4): padding, never stored.
  static int64_t Slack() { return 128; }
  template <class Rows>
  static void Pack(const BlocksProblem& p, const Rows& rows, int64_t count, int64_t ld,
                   int64_t k0, int64_t k1, float* xt) {
    PackFloatsRows(p.dtype, rows, count, ld, k0, k1, xt);
  }
  static void Row(const BlocksProblem& p, const void* values, const int32_t* indices,
                  int64_t b0, int64_t b1, const float* xt, int64_t ld, int64_t tokens, void* y,
                  int64_t outs) {
    if (LanesHoldTokens(p) && ld == kLaneTokens) {
      return TokenLanesRow(p, static_cast<const float*>(values), indices, b0, b1, xt,
                           RowsApart{ld}, tokens, static_cast<float*>(y), outs);
    }
    RowForAny(p, values, indices, b0, b1, xt, RowsApart{ld}, tokens, y, outs);
  }
  // The direct convolution (blocks_kernels.h): x is an f32 strip of the
  // input, the tile's token t of input k at xt + offsets[k] + first + t.
  // f32 1 x 16 blocks take the tokens in the lanes (TokenLanesRow) whatever
  // the count: the strip's tiles run across the band's rows.
  static bool DirectConv(const BlocksProblem&) { return true; }
  static int64_t DirectTileTokens(const BlocksProblem& p) {
    return TokensInLanes(p) ? kLaneTokens : TileTokens(p);
  }
  static void RowAt(const BlocksProblem& p, const void* values, const int32_t* indices,
                    int64_t b0, int64_t b1, const float* xt, const int64_t* offsets,
                    int64_t first, int64_t tokens, void* y, int64_t outs) {
    if (TokensInLanes(p)) {
      return TokenLanesRow(p, static_cast<const float*>(values), indices, b0, b1, xt,
                           RowsAt{offsets, first}, tokens, static_cast<float*>(y), outs);
    }
    RowForAny(p, values, indices, b0, b1, xt, RowsAt{offsets, first}, tokens, y, outs);
  }
};

// ---------------------------------------------------------------- backward
// The backward ops' inner loops (blocks_kernels.h gives the task structure).
// Eight blocks at a time: eight independent accumulator chains, so the FMAs
// never wait on one another (4-cycle latency, one or two per cycle).
constexpr int kBackBlocks = 8;
// The sddmm's token chunk (its dyr rows: 16 KB for n = 16) and block segment
// (the f32 sums held across chunks: 16 KB for n = 16, 32 KB for n = 32, on
// the stack).
constexpr int64_t kSampleTokens = 256;
constexpr int64_t kSampleSegment = 256;

template <Dtype D>
inline float LoadScalar(const void* base, int64_t i) {
  if constexpr (D == Dtype::kF32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (D == Dtype::kBF16) {
    return Bf16ToF32(static_cast<const uint16_t*>(base)[i]);
  } else {
    return F16ToF32(static_cast<const uint16_t*>(base)[i]);
  }
}

// spmm_t: dxT[k_p][16 tokens] += sum_j dyr[j][:] * v[p][j], tokens in the
// lanes; each row of dyr is loaded once for the eight blocks.
template <int kN, Dtype D>
void AddRowTVec(const void* values, const int32_t* indices, uint64_t k, int64_t b0, int64_t b1,
                const float* rows, float* acc) {
  for (int64_t b = b0; b < b1; b += kBackBlocks) {
    const int count = static_cast<int>(b1 - b < kBackBlocks ? b1 - b : kBackBlocks);
    __m512 sum[kBackBlocks];
#pragma GCC unroll 8
    for (int i = 0; i < kBackBlocks; ++i) sum[i] = _mm512_setzero_ps();
    // Past the row's last block, repeat it (its sum is dropped below).
    int64_t block[kBackBlocks];
#pragma GCC unroll 8
    for (int i = 0; i < kBackBlocks; ++i) block[i] = b + (i < count ? i : count - 1);
#pragma GCC unroll 4
    for (int j = 0; j < kN; ++j) {
      const __m512 r = _mm512_loadu_ps(rows + j * 16);
#pragma GCC unroll 8
      for (int i = 0; i < kBackBlocks; ++i) {
        const __m512 w = _mm512_set1_ps(LoadScalar<D>(values, block[i] * kN + j));
        sum[i] = _mm512_fmadd_ps(r, w, sum[i]);
      }
    }
    for (int i = 0; i < count; ++i) {
      const uint32_t input = static_cast<uint32_t>(indices[b + i]);
      if (input >= k) continue;  // Untrusted structure: a block outside dx adds nothing.
      float* dst = acc + static_cast<int64_t>(input) * 16;
      _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), sum[i]));
    }
  }
}

// sddmm: dv[p][outputs] = sum_t xT[k_p][t] * dyr[t][:], outputs in the lanes
// (kN < 16: the first kN lanes of one vector); each token's dyr row is loaded
// once for the eight blocks.
template <int kN, Dtype D>
void SampleRowVec(const float* xt, const int32_t* indices, uint64_t k, int64_t tokens,
                  int64_t b0, int64_t b1, const float* rows, void* dv) {
  constexpr int kV = kN >= 16 ? kN / 16 : 1;
  constexpr int kLanes = kN >= 16 ? 16 : kN;
  const __mmask16 keep = static_cast<__mmask16>((1u << kLanes) - 1u);
  // Tokens in chunks, blocks in segments: every group of blocks of a segment
  // reads the chunk's rows of dyr from L1/L2 (over all of a convolution's
  // tokens, 25 K x 16 floats, each group streamed dyr from memory), and the
  // segment's sums wait in f32 between chunks.
  alignas(64) float held[kSampleSegment][kV * 16];
  for (int64_t s0 = b0; s0 < b1; s0 += kSampleSegment) {
    const int64_t s1 = b1 - s0 < kSampleSegment ? b1 : s0 + kSampleSegment;
    for (int64_t t0 = 0; t0 < tokens; t0 += kSampleTokens) {
      const int64_t t1 = tokens - t0 < kSampleTokens ? tokens : t0 + kSampleTokens;
      for (int64_t b = s0; b < s1; b += kBackBlocks) {
        const int count = static_cast<int>(s1 - b < kBackBlocks ? s1 - b : kBackBlocks);
        const float* xs[kBackBlocks];
#pragma GCC unroll 8
        for (int i = 0; i < kBackBlocks; ++i) {
          const uint32_t input = i < count ? static_cast<uint32_t>(indices[b + i]) : 0u;
          // Untrusted structure: a block outside x reads the zero row past xT.
          xs[i] = xt + static_cast<int64_t>(i < count && input < k ? input : k) * tokens;
        }
        __m512 sum[kBackBlocks][kV];
#pragma GCC unroll 8
        for (int i = 0; i < kBackBlocks; ++i)
#pragma GCC unroll 2
          for (int v = 0; v < kV; ++v) {
            sum[i][v] = t0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(held[b - s0 + i] + 16 * v);
          }
        for (int64_t t = t0; t < t1; ++t) {
          __m512 d[kV];
#pragma GCC unroll 2
          for (int v = 0; v < kV; ++v) {
            d[v] = kN >= 16 ? _mm512_loadu_ps(rows + t * kN + 16 * v)
                            : _mm512_maskz_loadu_ps(keep, rows + t * kN);
          }
#pragma GCC unroll 8
          for (int i = 0; i < kBackBlocks; ++i) {
            const __m512 xv = _mm512_set1_ps(xs[i][t]);
#pragma GCC unroll 2
            for (int v = 0; v < kV; ++v) sum[i][v] = _mm512_fmadd_ps(xv, d[v], sum[i][v]);
          }
        }
        // Past the segment's end the slots are spare (kSampleSegment is a multiple of 8).
#pragma GCC unroll 8
        for (int i = 0; i < kBackBlocks; ++i)
#pragma GCC unroll 2
          for (int v = 0; v < kV; ++v) _mm512_store_ps(held[b - s0 + i] + 16 * v, sum[i][v]);
      }
    }
    for (int64_t b = s0; b < s1; ++b) {
      char* out = static_cast<char*>(dv) + b * kN * (D == Dtype::kF32 ? 4 : 2);
#pragma GCC unroll 2
      for (int v = 0; v < kV; ++v) {
        StoreF32<D>(out + 16 * v * (D == Dtype::kF32 ? 4 : 2), _mm512_load_ps(held[b - s0] + 16 * v),
                    keep);
      }
    }
  }
}

// spmm_t's dyr [n][16]: 16 tokens' rows of the n columns, one masked load each,
// then 16 x 16 transposes (the scalar loop took a load, a conversion and a
// strided store per element).
template <Dtype D>
void LoadColumnsTAs(int64_t n, int64_t n_out, const void* dy, int64_t count, int64_t outs,
                    float* rows) {
  constexpr int64_t kBytes = D == Dtype::kF32 ? 4 : 2;
  for (int64_t h = 0; h < n; h += 16) {
    const int live = static_cast<int>(Max(0, Min(16, outs - h)));
    __m512 r[16];
    for (int64_t t = 0; t < 16; ++t) {
      const char* row = static_cast<const char*>(dy) + (t * n_out + h) * kBytes;
      r[t] = t < count ? LoadF32<D>(row, live) : _mm512_setzero_ps();
    }
    JAXSPARSE_AVX512_NAMESPACE::Transpose16x16Floats(r);
    for (int64_t j = 0; j < Min(16, n - h); ++j) _mm512_storeu_ps(rows + (h + j) * 16, r[j]);
  }
}

// spmm_t's dxT [K][16] to dx rows: 16 inputs x 16 tokens per transpose.
template <Dtype D>
void StoreDxAs(int64_t k, const float* acc, int64_t count, void* dx) {
  constexpr int64_t kBytes = D == Dtype::kF32 ? 4 : 2;
  for (int64_t k0 = 0; k0 < k; k0 += 16) {
    const int64_t live = Min(16, k - k0);
    __m512 r[16];
    for (int64_t i = 0; i < 16; ++i) {
      r[i] = i < live ? _mm512_loadu_ps(acc + (k0 + i) * 16) : _mm512_setzero_ps();
    }
    JAXSPARSE_AVX512_NAMESPACE::Transpose16x16Floats(r);
    const __mmask16 keep = static_cast<__mmask16>((1u << live) - 1u);
    for (int64_t t = 0; t < count; ++t) {
      StoreF32<D>(static_cast<char*>(dx) + (t * k + k0) * kBytes, r[t], keep);
    }
  }
}

// The sddmm's dyr [T][n]: one masked load and store per token and 16 outputs.
template <Dtype D>
void PackColumnsAs(int64_t n, int64_t n_out, const void* dy, int64_t tokens, int64_t outs,
                   float* rows) {
  constexpr int64_t kBytes = D == Dtype::kF32 ? 4 : 2;
  for (int64_t h = 0; h < n; h += 16) {
    const int live = static_cast<int>(Max(0, Min(16, outs - h)));
    const __mmask16 width = static_cast<__mmask16>((1u << Min(16, n - h)) - 1u);
    for (int64_t t = 0; t < tokens; ++t) {
      const char* row = static_cast<const char*>(dy) + (t * n_out + h) * kBytes;
      _mm512_mask_storeu_ps(rows + t * n + h, width, LoadF32<D>(row, live));
    }
  }
}

struct Avx512Back {
  static void PackColumns(const BlocksProblem& p, const void* dy, int64_t tokens, int64_t outs,
                          float* rows) {
    switch (p.dtype) {
      case Dtype::kBF16:
        return PackColumnsAs<Dtype::kBF16>(p.n, p.n_out, dy, tokens, outs, rows);
      case Dtype::kF16:
        return PackColumnsAs<Dtype::kF16>(p.n, p.n_out, dy, tokens, outs, rows);
      default:
        return PackColumnsAs<Dtype::kF32>(p.n, p.n_out, dy, tokens, outs, rows);
    }
  }
  static void LoadColumnsT(const BlocksProblem& p, const void* dy, int64_t count, int64_t outs,
                           float* rows) {
    switch (p.dtype) {
      case Dtype::kBF16:
        return LoadColumnsTAs<Dtype::kBF16>(p.n, p.n_out, dy, count, outs, rows);
      case Dtype::kF16:
        return LoadColumnsTAs<Dtype::kF16>(p.n, p.n_out, dy, count, outs, rows);
      default:
        return LoadColumnsTAs<Dtype::kF32>(p.n, p.n_out, dy, count, outs, rows);
    }
  }
  static void StoreDx(const BlocksProblem& p, const float* acc, int64_t count, void* dx) {
    switch (p.dtype) {
      case Dtype::kBF16:
        return StoreDxAs<Dtype::kBF16>(p.k, acc, count, dx);
      case Dtype::kF16:
        return StoreDxAs<Dtype::kF16>(p.k, acc, count, dx);
      default:
        return StoreDxAs<Dtype::kF32>(p.k, acc, count, dx);
    }
  }
  // The sddmm's xT by 8 x 8 register transposes (blocks_pack.h).
  template <class Rows>
  static void Pack(Dtype dtype, const Rows& rows, int64_t count, int64_t ld, int64_t k0,
                   int64_t k1, float* xt) {
    PackFloatsRows(dtype, rows, count, ld, k0, k1, xt);
  }
  template <int kN>
  static void AddRowTN(const BlocksProblem& p, const void* values, const int32_t* indices,
                       int64_t b0, int64_t b1, const float* rows, float* acc) {
    const uint64_t k = static_cast<uint64_t>(p.k);
    switch (p.dtype) {
      case Dtype::kBF16:
        return AddRowTVec<kN, Dtype::kBF16>(values, indices, k, b0, b1, rows, acc);
      case Dtype::kF16:
        return AddRowTVec<kN, Dtype::kF16>(values, indices, k, b0, b1, rows, acc);
      default:
        return AddRowTVec<kN, Dtype::kF32>(values, indices, k, b0, b1, rows, acc);
    }
  }
  static void AddRowT(const BlocksProblem& p, const void* values, const int32_t* indices,
                      int64_t b0, int64_t b1, const float* rows, float* acc) {
    static_assert(kTokensT == 16, "spmm_t's token tile is one zmm of tokens");
    switch (p.n) {
      case 4:
        return AddRowTN<4>(p, values, indices, b0, b1, rows, acc);
      case 8:
        return AddRowTN<8>(p, values, indices, b0, b1, rows, acc);
      case 16:
        return AddRowTN<16>(p, values, indices, b0, b1, rows, acc);
      default:
        return AddRowTN<32>(p, values, indices, b0, b1, rows, acc);
    }
  }
  template <int kN>
  static void SampleRowN(const BlocksProblem& p, const float* xt, const int32_t* indices,
                         int64_t b0, int64_t b1, const float* rows, void* dv) {
    const uint64_t k = static_cast<uint64_t>(p.k);
    switch (p.dtype) {
      case Dtype::kBF16:
        return SampleRowVec<kN, Dtype::kBF16>(xt, indices, k, p.tokens, b0, b1, rows, dv);
      case Dtype::kF16:
        return SampleRowVec<kN, Dtype::kF16>(xt, indices, k, p.tokens, b0, b1, rows, dv);
      default:
        return SampleRowVec<kN, Dtype::kF32>(xt, indices, k, p.tokens, b0, b1, rows, dv);
    }
  }
  static void SampleRow(const BlocksProblem& p, const float* xt, const int32_t* indices,
                        int64_t b0, int64_t b1, const float* rows, void* dv) {
    switch (p.n) {
      case 4:
        return SampleRowN<4>(p, xt, indices, b0, b1, rows, dv);
      case 8:
        return SampleRowN<8>(p, xt, indices, b0, b1, rows, dv);
      case 16:
        return SampleRowN<16>(p, xt, indices, b0, b1, rows, dv);
      default:
        return SampleRowN<32>(p, xt, indices, b0, b1, rows, dv);
    }
  }
};

}  // namespace JAXSPARSE_BLOCKS_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_BLOCKS_BLOCKS_AVX512_H_
