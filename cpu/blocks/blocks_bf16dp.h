// The bf16 forward micro-kernel of the 1xN blocks on vdpbf16ps (AVX512-BF16:
// AMD Zen 4 and 5, Intel from Cooper Lake), included by the avx512bf16 unit
// after blocks_avx512.h (whose f32-compute kernel still runs f32 and f16).
//
// vdpbf16ps multiplies 16 lanes of bf16 pairs and adds both products to the
// lane's f32: two inputs of the reduction per instruction, 32 multiply-adds
// against the f32 FMA's 16, at the same instruction rate on Zen 4/5. In a
// block row the reduction runs over the row's blocks, so a pair is two
// consecutive blocks p, q of the row:
//   - weights: lane l holds (v[p][j], v[q][j]) for its output j, one word
//     permute (vpermt2w) of the two blocks' rows per pair;
//   - x: the pair (x[t, k_p], x[t, k_q]) of each token, built for a chunk of
//     pairs before they are multiplied: per 16 tokens two rows of xT, which
//     this kernel packs in bf16, interleaved by one vpermt2w and stored to an
//     L1 buffer; the product loop then broadcasts each token's pair from
//     memory into vdpbf16ps (a load uop, no shuffle), as the f32 kernel
//     broadcasts x.
// Lanes hold kG tokens x 16/kG outputs for n < 16, as in the f32 kernel, so
// the x broadcast is kG adjacent pairs. A row's odd last block pairs with
// zeros, and a block whose input lies outside x reads zeros (it adds nothing).
// The products are exact in f32 and summed in f32 (vdpbf16ps treats bf16
// subnormal inputs as zero, below any tolerance the f32 path keeps).
// 1 x 16 blocks from 32 tokens take another kernel (Bf16TokenLanesRow
// below): on Zen 5 these embedded broadcasts hold vdpbf16ps to a third of its
// peak, where broadcasting the weight pairs into token vectors reaches it.
#ifndef JAXSPARSE_CPU_BLOCKS_BLOCKS_BF16DP_H_
#define JAXSPARSE_CPU_BLOCKS_BLOCKS_BF16DP_H_

#include <immintrin.h>

#include <cstdint>

#if !defined(__AVX512BF16__)
#error "blocks_bf16dp.h needs AVX512-BF16 (the avx512bf16 flags)"
#endif

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_BLOCKS_ISA {

// Pairs built per chunk: 32 pairs x up to 96 tokens x 4 bytes = 12 KB of L1.
constexpr int kDpPairChunk = 32;

template <int kN>
struct DpLanes {
  static constexpr int kG = Lanes<kN>::kG;
  static constexpr int kV = Lanes<kN>::kV;
  // Accumulators: for kG = 1 the broadcast is embedded in vdpbf16ps
  // (DpBroadcast), so the kV weight vectors and one spare keep the rest of the
  // 32 registers (30 tokens for n = 16: 128 tokens in 5 tiles where 24 took
  // 6, each paying the pairs' build and the weights' interleave once); for
  // kG > 1 the broadcast takes a register too, so 24.
  static constexpr int kMaxGroups = kG == 1 ? (31 - kV) / kV : 24 / kV;
};

// The bf16 pairs of blocks p and q (q < 0: none, zeros) in lane order.
template <int kN>
inline void LoadWeightPairs(const uint16_t* values, int64_t p, int64_t q, __m512i* w) {
  using L = DpLanes<kN>;
  // Word 2l of a vector: output j of block p, word 2l + 1: of block q, with
  // j the output of lane l (l / kG, or 16 v + l for n >= 16).
  alignas(64) uint16_t order[32];
  for (int l = 0; l < 16; ++l) {
    order[2 * l] = static_cast<uint16_t>(l / L::kG);
    order[2 * l + 1] = static_cast<uint16_t>(32 + l / L::kG);
  }
  const __m512i idx = _mm512_load_si512(order);
  constexpr int kWords = kN < 16 ? kN : 16;
  const __mmask32 keep = static_cast<__mmask32>((1ull << kWords) - 1);
#pragma GCC unroll 4
  for (int v = 0; v < L::kV; ++v) {
    const __m512i lo = _mm512_maskz_loadu_epi16(keep, values + p * kN + 16 * v);
    const __m512i hi =
        q >= 0 ? _mm512_maskz_loadu_epi16(keep, values + q * kN + 16 * v) : _mm512_setzero_si512();
    w[v] = _mm512_permutex2var_epi16(lo, idx, hi);
  }
}

// Tokens [16 s, 16 s + 16) of blocks p, q as interleaved bf16 pairs: xT holds
// bf16 here (Bf16DpMicro::Pack), so a pair is one vpermt2w of the two rows'
// 16 words (the f32 xT took a vcvtne2ps2bf16 and a vpermw, both on the
// shuffle/FP pipes that vdpbf16ps needs, and twice the bytes from L2).
inline __m512i XPairs(const uint16_t* xp, const uint16_t* xq, int s) {
  const __m512i lo = xp != nullptr
                         ? _mm512_castsi256_si512(_mm256_loadu_si256(
                               reinterpret_cast<const __m256i*>(xp + 16 * s)))
                         : _mm512_setzero_si512();
  const __m512i hi = xq != nullptr
                         ? _mm512_castsi256_si512(_mm256_loadu_si256(
                               reinterpret_cast<const __m256i*>(xq + 16 * s)))
                         : _mm512_setzero_si512();
  // Word 2t: lo's token t, word 2t + 1: hi's (word 32 + t of the pair of sources).
  const __m512i order = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41,
                                         9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2,
                                         33, 1, 32, 0);
  return _mm512_permutex2var_epi16(lo, order, hi);
}

// acc += the pair at `pair` (broadcast) . w, with the broadcast embedded in
// vdpbf16ps ({1to16}): a separate vbroadcastss zmm costs Zen 4 an FP-pipe op
// beside the load, which vdpbf16ps needs (the loop ran at about half the
// instruction's peak with it), while an embedded 32-bit broadcast is done by
// the load. GCC folds set1 into the FMA but not into vdpbf16ps, hence asm.
inline __m512 DpBroadcast(__m512 acc, __m512i w, const uint32_t* pair) {
  __asm__("vdpbf16ps %[x]%{1to16%}, %[w], %[acc]" : [acc] "+v"(acc) : [w] "v"(w), [x] "m"(*pair));
  return acc;
}

template <int kG>
inline __m512i BroadcastPairs(const uint32_t* p) {
  return _mm512_castps_si512(BroadcastX<kG>(reinterpret_cast<const float*>(p)));
}

template <int kN, int kA, class At>
void DpRowTile(const BlocksProblem& p, const void* values_raw, const int32_t* indices,
               int64_t b0, int64_t b1, const float* xt, At at, int64_t tokens, void* y,
               int64_t outs) {
  using L = DpLanes<kN>;
  constexpr int kTokens = kA * L::kG;
  constexpr int kBuilds = (kTokens + 15) / 16;
  const uint16_t* values = static_cast<const uint16_t*>(values_raw);
  const uint64_t k = static_cast<uint64_t>(p.k);
  alignas(64) uint32_t pairs[kDpPairChunk][kBuilds * 16];
  __m512 acc[kA][L::kV];
#pragma GCC unroll 32
  for (int a = 0; a < kA; ++a)
#pragma GCC unroll 4
    for (int v = 0; v < L::kV; ++v) acc[a][v] = _mm512_setzero_ps();
  // xT in bf16 (Pack below), in the f32 region's first half of each tile;
  // `at` gives input k's row in words (RowsApart / RowsAt, blocks_avx512.h).
  const uint16_t* xt16 = reinterpret_cast<const uint16_t*>(xt);
  auto x_row = [&](int64_t b) -> const uint16_t* {
    const uint32_t input = static_cast<uint32_t>(indices[b]);
    return input < k ? xt16 + at(input) : nullptr;
  };
  for (int64_t c0 = b0; c0 < b1; c0 += 2 * kDpPairChunk) {
    const int64_t c1 = Min(b1, c0 + 2 * kDpPairChunk);
    const int count = static_cast<int>((c1 - c0 + 1) / 2);
    for (int i = 0; i < count; ++i) {
      const int64_t bp = c0 + 2 * i, bq = bp + 1;
      const uint16_t* xp = x_row(bp);
      const uint16_t* xq = bq < c1 ? x_row(bq) : nullptr;
#pragma GCC unroll 4
      for (int s = 0; s < kBuilds; ++s) {
        _mm512_store_si512(pairs[i] + 16 * s, XPairs(xp, xq, s));
      }
    }
    // The next chunk's rows of xT are gathered from L2 while this chunk's
    // products run: without it, the build of a chunk waited on its L2 loads
    // with the FP pipes idle (measured: see docs/cpu_speed_notes.md).
    const int64_t n0 = c1, n1 = Min(b1, c1 + 2 * kDpPairChunk);
    for (int i = 0; i < count; ++i) {
      const int64_t bp = c0 + 2 * i, bq = bp + 1 < c1 ? bp + 1 : -1;
      for (int64_t b = n0 + 2 * i; b < Min(n1, n0 + 2 * i + 2); ++b) {
        if (const uint16_t* row = x_row(b)) {
          _mm_prefetch(reinterpret_cast<const char*>(row), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(row + kBuilds * 16) - 1, _MM_HINT_T0);
        }
      }
      __m512i w[L::kV];
      LoadWeightPairs<kN>(values, bp, bq, w);
#pragma GCC unroll 32
      for (int a = 0; a < kA; ++a) {
        if constexpr (L::kG == 1) {
#pragma GCC unroll 4
          for (int v = 0; v < L::kV; ++v) acc[a][v] = DpBroadcast(acc[a][v], w[v], pairs[i] + a);
        } else {
          const __m512i xv = BroadcastPairs<L::kG>(pairs[i] + a * L::kG);
#pragma GCC unroll 4
          for (int v = 0; v < L::kV; ++v) {
            acc[a][v] = _mm512_dpbf16_ps(acc[a][v], (__m512bh)xv, (__m512bh)w[v]);
          }
        }
      }
    }
  }
  StoreTile<kN, kA, Dtype::kBF16>(acc, tokens, p.n_out, outs, y);
}

template <int kN, class At>
void DpRowFor(const BlocksProblem& p, const void* values, const int32_t* indices, int64_t b0,
              int64_t b1, const float* xt, At at, int64_t tokens, void* y, int64_t outs) {
  using L = DpLanes<kN>;
  const int64_t groups = CeilDiv(tokens, L::kG);
  // The smallest instantiation holding the tile's groups: 2, 4, 8, 12, 16,
  // 24 (those below kMaxGroups), then kMaxGroups.
  if (groups <= 2) return DpRowTile<kN, 2>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
  if (groups <= 4) return DpRowTile<kN, 4>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
  if (groups <= 8) return DpRowTile<kN, 8>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
  if (groups <= 12) {
    return DpRowTile<kN, 12>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
  }
  if constexpr (L::kMaxGroups > 16) {
    if (groups <= 16) {
      return DpRowTile<kN, 16>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
    }
  }
  if constexpr (L::kMaxGroups > 24) {
    if (groups <= 24) {
      return DpRowTile<kN, 24>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
    }
  }
  return DpRowTile<kN, L::kMaxGroups>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
}

// ---------------------------------------------------------------- tokens in lanes
// bf16 1 x 16 blocks with a tile's worth of tokens (a packed xT of full tiles,
// or the direct convolution's strip) put tokens in the lanes, as the f32
// kernel does (TokenLanesRow, blocks_avx512.h): per pair of blocks, the two
// inputs' 32 tokens interleaved into two vectors of x pairs (two vpermt2w),
// then per output its weight pair broadcast from memory (a load) into two
// vdpbf16ps. On Zen 5 that step runs at 7.5-7.7 vdpbf16ps/ns per core, the
// pairs above (each vdpbf16ps with its embedded {1to16} broadcast of x) at
// 2.6-2.7 (cpu_bounds.c part 6), against a peak of 7.8.
inline bool Bf16TokensInLanes(const BlocksProblem& p) {
  return p.dtype == Dtype::kBF16 && p.n == 16;
}

// Outputs [o0, o0 + kLaneOutputs) of the tile over blocks [b0, b1), into
// out [16][kLaneTokens] f32. A block whose input lies outside x reads a row
// of zeros and weighs zero (NaN weights there add nothing); a row's odd last
// block pairs with zeros.
template <class At>
inline void Bf16TokenLanesPass(const uint16_t* values, const int32_t* indices, int64_t b0,
                               int64_t b1, uint64_t k, const uint16_t* xt16, At at, int o0,
                               float* out) {
  static_assert(kLaneOutputs == 8 && kLaneVectors == 2, "8 weight pairs, 32 tokens");
  alignas(64) static const uint16_t kZeroRow[kLaneTokens] = {};
  // Word 2t: input p's token t, word 2t + 1: input q's (word 32 + t of the pair of sources).
  const __m512i lo_order = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41,
                                            9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2,
                                            33, 1, 32, 0);
  const __m512i hi_order = _mm512_add_epi16(lo_order, _mm512_set1_epi16(16));
  __m512 acc[kLaneOutputs][kLaneVectors];
#pragma GCC unroll 8
  for (int o = 0; o < kLaneOutputs; ++o) acc[o][0] = acc[o][1] = _mm512_setzero_ps();
  alignas(16) uint32_t pairs[kLaneOutputs];
  for (int64_t b = b0; b < b1; b += 2) {
    const uint32_t input_p = static_cast<uint32_t>(indices[b]);
    const uint32_t input_q = b + 1 < b1 ? static_cast<uint32_t>(indices[b + 1]) : UINT32_MAX;
    const bool has_p = input_p < k, has_q = input_q < k;
    // Ask for the x rows kLanePrefetch blocks ahead into L1: the rows come
    // from L2 at random, and the pair's vpermt2w and its 16 vdpbf16ps wait on
    // them.
    if (b + kLanePrefetch + 1 < b1) {
      const uint32_t ahead_p = static_cast<uint32_t>(indices[b + kLanePrefetch]);
      const uint32_t ahead_q = static_cast<uint32_t>(indices[b + kLanePrefetch + 1]);
      if (ahead_p < k) _mm_prefetch(reinterpret_cast<const char*>(xt16 + at(ahead_p)), _MM_HINT_T0);
      if (ahead_q < k) _mm_prefetch(reinterpret_cast<const char*>(xt16 + at(ahead_q)), _MM_HINT_T0);
    }
    const __m128i wp = has_p ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(values + b * 16 + o0))
                             : _mm_setzero_si128();
    const __m128i wq = has_q ? _mm_loadu_si128(
                                   reinterpret_cast<const __m128i*>(values + (b + 1) * 16 + o0))
                             : _mm_setzero_si128();
    // (v[p][o], v[q][o]) for the pass's 8 outputs, stored so that each is
    // broadcast by a load.
    _mm_store_si128(reinterpret_cast<__m128i*>(pairs), _mm_unpacklo_epi16(wp, wq));
    _mm_store_si128(reinterpret_cast<__m128i*>(pairs + 4), _mm_unpackhi_epi16(wp, wq));
    const __m512i xp = _mm512_loadu_si512(has_p ? xt16 + at(input_p) : kZeroRow);
    const __m512i xq = _mm512_loadu_si512(has_q ? xt16 + at(input_q) : kZeroRow);
    const __m512bh x0 = (__m512bh)_mm512_permutex2var_epi16(xp, lo_order, xq);
    const __m512bh x1 = (__m512bh)_mm512_permutex2var_epi16(xp, hi_order, xq);
#pragma GCC unroll 8
    for (int o = 0; o < kLaneOutputs; ++o) {
      // From memory, by asm: GCC otherwise forwards the stores and builds the
      // broadcasts with vpsrldq and a register vpbroadcastd, shuffles on the
      // pipes vdpbf16ps needs (2048 tokens of 4096 x 4096 at 25% on Zen 5:
      // 36-44 ms that way, 32-36 ms this way, before the prefetch above).
      __m512i w_pair;
      __asm__("vpbroadcastd %[pair], %[w]" : [w] "=v"(w_pair) : [pair] "m"(pairs[o]));
      const __m512bh wo = (__m512bh)w_pair;
      acc[o][0] = _mm512_dpbf16_ps(acc[o][0], x0, wo);
      acc[o][1] = _mm512_dpbf16_ps(acc[o][1], x1, wo);
    }
  }
#pragma GCC unroll 8
  for (int o = 0; o < kLaneOutputs; ++o) {
    _mm512_store_ps(out + (o0 + o) * kLaneTokens, acc[o][0]);
    _mm512_store_ps(out + (o0 + o) * kLaneTokens + 16, acc[o][1]);
  }
}

template <class At>
void Bf16TokenLanesRow(const BlocksProblem& p, const void* values, const int32_t* indices,
                       int64_t b0, int64_t b1, const float* xt, At at, int64_t tokens, void* y,
                       int64_t outs) {
  alignas(64) float out[16 * kLaneTokens];
  for (int o0 = 0; o0 < 16; o0 += kLaneOutputs) {
    Bf16TokenLanesPass(static_cast<const uint16_t*>(values), indices, b0, b1,
                       static_cast<uint64_t>(p.k), reinterpret_cast<const uint16_t*>(xt), at,
                       o0, out);
  }
  StoreTokenLanes<Dtype::kBF16>(out, tokens, p.n_out, outs, y);
}

// bf16 from kDpMinTokens tokens on vdpbf16ps; everything else (f32, f16, and
// bf16 below: there the values stream decides, and pairing adds work) on the
// f32-compute kernel.
constexpr int64_t kDpMinTokens = 4;

struct Bf16DpMicro {
  static bool UsesDp(const BlocksProblem& p) {
    return p.dtype == Dtype::kBF16 && p.tokens >= kDpMinTokens;
  }
  // bf16 1 x 16 blocks with a tile's worth of tokens take them in the lanes.
  static bool LanesHoldTokens(const BlocksProblem& p) {
    return Bf16TokensInLanes(p) && p.tokens >= kLaneTokens;
  }
  static int64_t TileTokens(const BlocksProblem& p) {
    if (!UsesDp(p)) return Avx512Micro::TileTokens(p);
    if (LanesHoldTokens(p)) return kLaneTokens;
    switch (p.n) {
      case 4:
        return DpLanes<4>::kMaxGroups * DpLanes<4>::kG;
      case 8:
        return DpLanes<8>::kMaxGroups * DpLanes<8>::kG;
      case 16:
        return DpLanes<16>::kMaxGroups;
      default:
        return DpLanes<32>::kMaxGroups;
    }
  }
  static int64_t Slack() { return Avx512Micro::Slack(); }
  // The pair kernel's xT is bf16, copied as it comes ([K][ld] words at the
  // start of each tile's f32 region): half the bytes, and no conversion back.
  template <class Rows>
  static void Pack(const BlocksProblem& p, const Rows& rows, int64_t count, int64_t ld,
                   int64_t k0, int64_t k1, float* xt) {
    if (!UsesDp(p)) return Avx512Micro::Pack(p, rows, count, ld, k0, k1, xt);
    PackWordsRows(rows, count, ld, k0, k1, reinterpret_cast<uint16_t*>(xt));
  }
  // The direct convolution on either kernel: the pairs read a bf16 strip
  // (Pack above) at offsets in words, the f32-compute kernel an f32 one.
  static bool DirectConv(const BlocksProblem&) { return true; }
  static int64_t DirectTileTokens(const BlocksProblem& p) {
    if (!UsesDp(p)) return Avx512Micro::DirectTileTokens(p);
    return Bf16TokensInLanes(p) ? kLaneTokens : TileTokens(p);
  }
  static void RowAt(const BlocksProblem& p, const void* values, const int32_t* indices,
                    int64_t b0, int64_t b1, const float* xt, const int64_t* offsets,
                    int64_t first, int64_t tokens, void* y, int64_t outs) {
    if (!UsesDp(p)) {
      return Avx512Micro::RowAt(p, values, indices, b0, b1, xt, offsets, first, tokens, y,
                                outs);
    }
    if (Bf16TokensInLanes(p)) {
      return Bf16TokenLanesRow(p, values, indices, b0, b1, xt, RowsAt{offsets, first}, tokens, y,
                               outs);
    }
    DpRowForN(p, values, indices, b0, b1, xt, RowsAt{offsets, first}, tokens, y, outs);
  }
  static void Row(const BlocksProblem& p, const void* values, const int32_t* indices,
                  int64_t b0, int64_t b1, const float* xt, int64_t ld, int64_t tokens, void* y,
                  int64_t outs) {
    if (!UsesDp(p)) return Avx512Micro::Row(p, values, indices, b0, b1, xt, ld, tokens, y, outs);
    if (LanesHoldTokens(p) && ld == kLaneTokens) {
      return Bf16TokenLanesRow(p, values, indices, b0, b1, xt, RowsApart{ld}, tokens, y, outs);
    }
    DpRowForN(p, values, indices, b0, b1, xt, RowsApart{ld}, tokens, y, outs);
  }
  template <class At>
  static void DpRowForN(const BlocksProblem& p, const void* values, const int32_t* indices,
                        int64_t b0, int64_t b1, const float* xt, At at, int64_t tokens, void* y,
                        int64_t outs) {
    switch (p.n) {
      case 4:
        return DpRowFor<4>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
      case 8:
        return DpRowFor<8>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
      case 16:
        return DpRowFor<16>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
      default:
        return DpRowFor<32>(p, values, indices, b0, b1, xt, at, tokens, y, outs);
    }
  }
};

}  // namespace JAXSPARSE_BLOCKS_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_BLOCKS_BLOCKS_BF16DP_H_
