// The bf16 forward of 1xN blocks on the engine's tile product (cpu/engine/
// bf16_tiles.h): AMX's tdpbf16ps in the amx unit, where it is the default for
// n = 16 and 32 from kTileMinTokens tokens; the same code runs on vdpbf16ps in
// the avx512bf16 unit when a call asks for it (BlocksProblem::tile_product,
// the environment variable JAXSPARSE_BLOCKS_TILES=1), which is how machines
// without AMX test its layouts, gathers and edges.
//
// Why tiles: a block row is a small dense product x[:, kept] @ V[kept, n].
// Run as y^T = V^T x^T, the row's n outputs are the tile rows (M), its kept
// inputs the reduction (K) and the tokens the columns (N):
//   - A = V^T, [n / 16 tiles][k step][16 outputs][32 kept inputs]: depends on
//     the weights only, so it is built once per call (PrepackRows) and read by
//     every token tile;
//   - B = the kept rows of xT as VNNI pairs, [token tile][k step][16 pair
//     rows][16 tokens x 2]: pair row r of a step interleaves xT rows k_p and
//     k_q of blocks 2r and 2r + 1, one vpermt2w per 16 tokens, exactly the
//     pairs the vdpbf16ps kernel (blocks_bf16dp.h) builds;
//   - C = f32 [n][tokens], transposed into y once per row and token tile.
// The other orientation (A = x gathered per token) would need a gather of 32
// scattered words per token and step, four times the shuffles of B's build.
// On AMX one tdpbf16ps (16 x 16 x 32 multiply-adds, 16 cycles) replaces 256
// vdpbf16ps of the pair kernel; B's 16 permutes per 16 tokens and step then
// bound the loop.
//
// Blocks past the row's end and blocks whose input lies outside x get zero
// weights in A and zero x in B, so they add nothing (a NaN weight of a block
// the reference skips stays out too).
#ifndef JAXSPARSE_CPU_BLOCKS_BLOCKS_TILES_H_
#define JAXSPARSE_CPU_BLOCKS_BLOCKS_TILES_H_

#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "cpu/engine/bf16_tiles.h"

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_BLOCKS_ISA {

#ifdef JAXSPARSE_TILES_ON_AMX
constexpr bool kTilesByDefault = true;
#else
constexpr bool kTilesByDefault = false;  // vdpbf16ps: the pair kernel is faster.
#endif

// From 32 tokens (two B tiles per A tile, the 2 x 2 blocking's minimum)
// the weights' A is read by enough token tiles to pay its build.
constexpr int64_t kTileMinTokens = 32;
// Tokens per forward tile (xT's ld): 4 B tiles per step.
constexpr int64_t kTileTokens = 64;
// k steps (32 blocks each) per B build: 4 token tiles x 8 steps x 1 KB = 32 KB,
// which stays in L1 while the tile product reads it.
constexpr int64_t kTileChunkSteps = 8;
// A row of A is padded up to whole steps: a row of len blocks takes
// ceil(len / 32) steps, at most len + 31 block slots; row r starts at slot
// b0 + 32 r with b0 rounded up to even, so every tile row (32 words, slots of
// 16 words) starts on a 64-byte line and rows never overlap.
constexpr int64_t kSlotPad = bf16_tiles::kStepWords;

// Word w of the result takes lo's word w / 2 for even w, hi's (source word
// 32 + w / 2) for odd w: the VNNI pairing of two 16-word rows.
inline __m512i InterleaveWords(__m512i lo, __m512i hi) {
  const __m512i order = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41,
                                         9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2,
                                         33, 1, 32, 0);
  return _mm512_permutex2var_epi16(lo, order, hi);
}

struct Bf16TileMicro {
  static bool UsesTiles(const BlocksProblem& p) {
    return p.dtype == Dtype::kBF16 && p.n >= 16 && p.tokens >= kTileMinTokens &&
           (kTilesByDefault || p.tile_product);
  }
  static int64_t TileTokens(const BlocksProblem& p) {
    return UsesTiles(p) ? kTileTokens : Bf16DpMicro::TileTokens(p);
  }
  static int64_t Slack() { return Bf16DpMicro::Slack(); }
  // xT in bf16 words, as the pair kernel takes it (UsesTiles implies UsesDp).
  template <class Rows>
  static void Pack(const BlocksProblem& p, const Rows& rows, int64_t count, int64_t ld,
                   int64_t k0, int64_t k1, float* xt) {
    Bf16DpMicro::Pack(p, rows, count, ld, k0, k1, xt);
  }
  static void Row(const BlocksProblem& p, const void* values, const int32_t* indices,
                  int64_t b0, int64_t b1, const float* xt, int64_t ld, int64_t tokens, void* y,
                  int64_t outs) {
    Bf16DpMicro::Row(p, values, indices, b0, b1, xt, ld, tokens, y, outs);
  }
  static bool DirectConv(const BlocksProblem& p) {
    return !UsesTiles(p) && Bf16DpMicro::DirectConv(p);
  }
  static int64_t DirectTileTokens(const BlocksProblem& p) {
    return Bf16DpMicro::DirectTileTokens(p);
  }
  static void RowAt(const BlocksProblem& p, const void* values, const int32_t* indices,
                    int64_t b0, int64_t b1, const float* xt, const int64_t* offsets,
                    int64_t first, int64_t tokens, void* y, int64_t outs) {
    Bf16DpMicro::RowAt(p, values, indices, b0, b1, xt, offsets, first, tokens, y, outs);
  }

  // ---- the weights' A, once per call
  static int64_t OutputTiles(const BlocksProblem& p) { return p.n / 16; }
  // Words of A for a batch entry: one slot of n words per block plus the pad.
  static int64_t PrepackWords(const BlocksProblem& p) {
    return UsesTiles(p) ? (p.nnz + 1 + kSlotPad * p.rows) * 16 * OutputTiles(p) : 0;
  }
  // Row r's A (blocks from b0), from slot even(b0) + 32 r.
  static uint16_t* RowWeights(const BlocksProblem& p, uint16_t* a, int64_t r, int64_t b0) {
    return a + (b0 + (b0 & 1) + kSlotPad * r) * 16 * OutputTiles(p);
  }

  // A for block rows [r0, r1): per row, step and output tile, the 16 pair
  // rows of its 32 blocks (one vpermt2w each, the pair kernel's weights),
  // then their 16 x 16 dword transpose: dword o of pair row q is (v[2q][o],
  // v[2q + 1][o]), so column o of the pair rows is A's row o.
  static void PrepackRows(const BlocksProblem& p, const void* values_raw,
                          const int32_t* indices, const int64_t* spans, int64_t r0, int64_t r1,
                          uint16_t* a) {
    const uint16_t* values = static_cast<const uint16_t*>(values_raw);
    const uint64_t k = static_cast<uint64_t>(p.k);
    const int64_t tiles = OutputTiles(p);
    alignas(64) uint32_t pairs[16][16];
    const __m512i column = _mm512_mullo_epi32(_mm512_set1_epi32(16),
                                              _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                                                                10, 11, 12, 13, 14, 15));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b0 = spans[r], b1 = spans[r + 1];
      const int64_t steps = CeilDiv(b1 - b0, bf16_tiles::kStepWords);
      uint16_t* row_a = RowWeights(p, a, r, b0);
      auto weights = [&](int64_t b, int64_t m) -> __m512i {
        const bool live = b < b1 && static_cast<uint32_t>(indices[b]) < k;
        return live ? _mm512_castsi256_si512(_mm256_loadu_si256(
                          reinterpret_cast<const __m256i*>(values + b * p.n + 16 * m)))
                    : _mm512_setzero_si512();
      };
      for (int64_t m = 0; m < tiles; ++m) {
        for (int64_t s = 0; s < steps; ++s) {
          const int64_t first = b0 + s * bf16_tiles::kStepWords;
          for (int q = 0; q < 16; ++q) {
            const __m512i both = InterleaveWords(weights(first + 2 * q, m),
                                                 weights(first + 2 * q + 1, m));
            _mm512_store_si512(pairs[q], both);
          }
          uint16_t* tile = row_a + (m * steps + s) * bf16_tiles::kTileWords;
          for (int o = 0; o < 16; ++o) {
            const __m512i row = _mm512_i32gather_epi32(column, &pairs[0][o], 4);
            _mm512_store_si512(tile + o * bf16_tiles::kStepWords, row);
          }
        }
      }
    }
  }

  // ---- the product, per block row and token tile
  // Tokens [16 j, 16 j + 16) of blocks p and q (null: zeros) as one pair row,
  // masked to the tile's `tokens`.
  static __m512i XPairRow(const uint16_t* xp, const uint16_t* xq, int64_t j, int64_t tokens) {
    const int64_t left = tokens - 16 * j;
    const __mmask16 keep =
        static_cast<__mmask16>(left >= 16 ? 0xffff : left <= 0 ? 0 : (1u << left) - 1);
    const __m256i lo = xp ? _mm256_maskz_loadu_epi16(keep, xp + 16 * j) : _mm256_setzero_si256();
    const __m256i hi = xq ? _mm256_maskz_loadu_epi16(keep, xq + 16 * j) : _mm256_setzero_si256();
    return InterleaveWords(_mm512_castsi256_si512(lo), _mm512_castsi256_si512(hi));
  }

  // y[t, o] for t < tokens, o < outs, from C [n][kTileTokens] f32 (rounded to
  // bf16 once): column t of C, 16 outputs at a time, by one gather.
  static void StoreTransposed(const BlocksProblem& p, const float* c, int64_t tokens,
                              int64_t outs, void* y) {
    const __m512i rows = _mm512_mullo_epi32(_mm512_set1_epi32(kTileTokens),
                                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                                                              10, 11, 12, 13, 14, 15));
    uint16_t* out = static_cast<uint16_t*>(y);
    for (int64_t m = 0; m * 16 < outs; ++m) {
      const int64_t left = outs - 16 * m;
      const __mmask16 keep = LaneMask(left);
      for (int64_t t = 0; t < tokens; ++t) {
        const __m512 col = _mm512_i32gather_ps(rows, c + m * 16 * kTileTokens + t, 4);
        const __m256i words = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(col));
        _mm256_mask_storeu_epi16(out + t * p.n_out + 16 * m, keep, words);
      }
    }
  }

  // Block row [b0, b1) whose A is a_row, for the tile's tokens of xT (bf16
  // words, ld per input) into y (the tile's first token, the row's first output).
  static void TileRow(const BlocksProblem& p, const uint16_t* a_row, const int32_t* indices,
                      int64_t b0, int64_t b1, const float* xt, int64_t ld, int64_t tokens,
                      void* y, int64_t outs) {
    namespace bt = bf16_tiles;
    const uint64_t k = static_cast<uint64_t>(p.k);
    const uint16_t* xt16 = reinterpret_cast<const uint16_t*>(xt);
    const int64_t steps = CeilDiv(b1 - b0, bt::kStepWords);
    const int64_t token_tiles = CeilDiv(tokens, int64_t{16});
    alignas(64) uint16_t b_tiles[kTileTokens / 16 * kTileChunkSteps * bt::kTileWords];
    alignas(64) float c[32 * kTileTokens];
    auto x_row = [&](int64_t b) -> const uint16_t* {
      if (b >= b1) return nullptr;
      const uint32_t input = static_cast<uint32_t>(indices[b]);
      return input < k ? xt16 + static_cast<int64_t>(input) * ld : nullptr;
    };
    if (steps == 0) {
      for (int64_t i = 0; i < OutputTiles(p) * 16 * kTileTokens; ++i) c[i] = 0.0f;
      return StoreTransposed(p, c, tokens, outs, y);
    }
    bt::ConfigureTiles();
    for (int64_t s0 = 0; s0 < steps; s0 += kTileChunkSteps) {
      const int64_t chunk = Min(kTileChunkSteps, steps - s0);
      for (int64_t s = 0; s < chunk; ++s) {
        const int64_t first = b0 + (s0 + s) * bt::kStepWords;
        for (int64_t q = 0; q < 16; ++q) {
          const uint16_t* xp = x_row(first + 2 * q);
          const uint16_t* xq = x_row(first + 2 * q + 1);
          for (int64_t j = 0; j < token_tiles; ++j) {
            _mm512_store_si512(b_tiles + (j * chunk + s) * bt::kTileWords + q * bt::kStepWords,
                               XPairRow(xp, xq, j, tokens));
          }
        }
      }
      bt::TileProductStrided(a_row + s0 * bt::kTileWords, steps * bt::kTileWords,
                             OutputTiles(p), b_tiles, chunk * bt::kTileWords, token_tiles, chunk,
                             c, kTileTokens, /*accumulate=*/s0 > 0);
    }
    bt::ReleaseTiles();
    StoreTransposed(p, c, tokens, outs, y);
  }
};

}  // namespace JAXSPARSE_BLOCKS_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_BLOCKS_BLOCKS_TILES_H_
