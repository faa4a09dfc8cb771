// The CPU engine's bf16 tile products, for every format that can hand the
// engine a gather list (the inputs a panel reads) and a decoded dense panel
// (FORMATS.md section 4). Two units multiply the same tiles:
//   - AMX (tdpbf16ps), in translation units compiled with the AMX flags;
//   - AVX512-BF16 (vdpbf16ps), elsewhere: a machine without AMX (AMD Zen 4
//     and 5) runs every AMX kernel of the engine on the vector unit, with
//     the layouts, gathers, decoders and task structure unchanged. There
//     vdpbf16ps does 32 multiply-adds per instruction at the f32 FMA's
//     instruction rate (Zen 5), twice f32's work per cycle; on Intel it
//     issues at half that rate, so it only matches f32 there (AMX wins).
//
// A format's tile kernel, per output panel and token tile:
//   1. PlanGather(sel): the panel's gather list as 64-word windows of a row of
//      x, once per panel and block of inputs;
//   2. GatherRow: per token, x[t, sel[kk]] into the A layout (one two-source
//      word permute per window, no scalar loads);
//   3. BTileSink: where the format's decoder writes the panel's weights,
//      straight into the VNNI layout of the B tiles;
//   4. TileBlock: C (f32) += A . B over the k steps, 2 x 2 tiles at a time.
//
// Layouts (words are bf16):
//   A  [token tile i][k step s][16 rows][32 words]: the 16 x 32 tile of
//      tokens 16 i .. 16 i + 15 and selected inputs 32 s .. 32 s + 31 is 1 KB
//      contiguous (64-byte rows), so a tile load touches 16 lines that do not
//      collide in L1 (a row stride of 4 KB would map them to one set).
//   B  [output tile j][k step s][16 pair rows][16 outputs x 2]: row r holds
//      inputs 32 s + 2 r and 32 s + 2 r + 1 of each of 16 outputs side by
//      side, the pairing tdpbf16ps (and vdpbf16ps) multiplies against A's
//      consecutive pairs.
//   C  f32 rows of `ld` floats (the format's accumulator).
// AMX tiles: 0-3 are C (token tile a, output tile b at 2 a + b), 4-5 A, 6-7
// B: 2 x 2 blocking keeps four dot products in flight per four tile loads.
//
// Included by the translation units of the AMX ISA (-mamx-tile -mamx-bf16
// and AVX-512 with AVX512-BF16 and VBMI2) and of the avx512bf16 ISA (the same
// without AMX), after JAXSPARSE_KERNEL_ISA names their namespace: each gets
// its own copy (kernel_util.h says why), and every function here may use
// the instructions of its flags.
#ifndef JAXSPARSE_CPU_ENGINE_BF16_TILES_H_
#define JAXSPARSE_CPU_ENGINE_BF16_TILES_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#ifndef JAXSPARSE_KERNEL_ISA
#error "define JAXSPARSE_KERNEL_ISA (the namespace of this instantiation) first"
#endif
#if !defined(__AVX512BF16__) || !defined(__AVX512VBMI2__)
#error "bf16_tiles.h needs AVX512-BF16 and VBMI2 (the amx or avx512bf16 flags)"
#endif
// The tile unit in an AMX unit (the hardware's, or its model in an emulated
// unit: amx_unit.h), else vdpbf16ps.
#include "cpu/common/amx_unit.h"
#ifdef JAXSPARSE_AMX_TILES
#define JAXSPARSE_TILES_ON_AMX 1
#endif
#ifdef JAXSPARSE_TILES_ON_AMX
#include "cpu/engine/amx_config.h"
#endif

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_KERNEL_ISA {
namespace bf16_tiles {

constexpr int64_t kTileRows = 16;   // Rows of every tile.
constexpr int64_t kStepWords = 32;  // bf16 inputs per k step (a 64-byte row).
constexpr int64_t kTileWords = kTileRows * kStepWords;  // 1 KB.

// ------------------------------------------------------------------ gather

// One 64-word window of a row of x: lanes `lanes` of a k step take words
// idx[lane] of x[offset .. offset + 64). The loads are masked (lo, hi) to
// the words that lie within the row, so the last row of x is never read past.
struct alignas(64) GatherWindow {
  __m512i idx;
  int64_t offset;
  __mmask32 lanes, lo, hi;
};

// Windows per k step a gather list can need: 32 selected inputs of at most
// 8 groups of m span at most 8 m words, from a base up to 31 words lower.
inline int64_t MaxWindowsPerStep(int64_t m) { return (8 * m + 31 + 63) / 64 + 1; }

// Plans the gather of sel[0 .. nk) (offsets in a row of k words) as windows,
// step by step: step s's windows are windows[first[s] .. first[s + 1]).
// Returns the number of steps. The lanes of a step past nk stay zero.
inline int64_t PlanGather(const int32_t* sel, int64_t nk, int64_t k, GatherWindow* windows,
                          int32_t* first) {
  const int64_t steps = (nk + kStepWords - 1) / kStepWords;
  int32_t count = 0;
  for (int64_t s = 0; s < steps; ++s) {
    first[s] = count;
    const int64_t k0 = s * kStepWords;
    const int64_t lanes = nk - k0 < kStepWords ? nk - k0 : kStepWords;
    int64_t lo = sel[k0], hi = sel[k0];
    for (int64_t l = 1; l < lanes; ++l) {
      lo = sel[k0 + l] < lo ? sel[k0 + l] : lo;
      hi = sel[k0 + l] > hi ? sel[k0 + l] : hi;
    }
    // Windows start on 64-byte boundaries of the row (lo rounded down to 32
    // words): an unaligned 64-byte load splits across two cache lines, and
    // with rows of x aligned (K a multiple of 32) the loads then never do.
    // With m = 8 a step's 8 groups are exactly one aligned window.
    const int64_t base = lo / 32 * 32;
    for (int64_t w = 0; w <= (hi - base) / 64; ++w) {
      const int64_t offset = base + 64 * w;
      alignas(64) uint16_t idx[kStepWords] = {};
      uint32_t mask = 0;
      for (int64_t l = 0; l < lanes; ++l) {
        const int64_t rel = sel[k0 + l] - offset;
        if (rel < 0 || rel >= 64) continue;
        idx[l] = static_cast<uint16_t>(rel);
        mask |= 1u << l;
      }
      if (mask == 0) continue;
      auto within = [&](int64_t start) -> uint32_t {
        const int64_t words = k - start;
        if (words >= 32) return 0xffffffffu;
        return words <= 0 ? 0u : (1u << words) - 1;
      };
      GatherWindow& g = windows[count++];
      g.idx = _mm512_load_si512(idx);
      g.offset = offset;
      g.lanes = mask;
      g.lo = within(offset);
      g.hi = within(offset + 32);
    }
  }
  first[steps] = count;
  return steps;
}

// Row `row` (0..15) of every A tile of one token: x_row[sel[kk]] for every
// step, as planned. `a_tile` is the token tile's first A tile.
inline void GatherRow(const uint16_t* x_row, const GatherWindow* windows, const int32_t* first,
                      int64_t steps, uint16_t* a_tile, int64_t row) {
  uint16_t* out = a_tile + row * kStepWords;
  for (int64_t s = 0; s < steps; ++s) {
    __m512i r = _mm512_setzero_si512();
    for (int32_t i = first[s]; i < first[s + 1]; ++i) {
      const GatherWindow& g = windows[i];
      const __m512i lo = _mm512_maskz_loadu_epi16(g.lo, x_row + g.offset);
      const __m512i hi = _mm512_maskz_loadu_epi16(g.hi, x_row + g.offset + 32);
      r = _mm512_mask_mov_epi16(r, g.lanes, _mm512_permutex2var_epi16(lo, g.idx, hi));
    }
    _mm512_store_si512(out + s * kTileWords, r);
  }
}

// Whether plans b and a have the same windows (offsets) at every step, so one
// load of x serves both (GatherRowShared). Windows start on 64-byte
// boundaries of the step's span, so panels that read the same groups
// usually agree.
inline bool SameWindows(const GatherWindow* a, const int32_t* first_a, const GatherWindow* b,
                        const int32_t* first_b, int64_t steps) {
  for (int64_t s = 0; s <= steps; ++s)
    if (first_a[s] != first_b[s]) return false;
  for (int32_t i = 0; i < first_a[steps]; ++i)
    if (a[i].offset != b[i].offset) return false;
  return true;
}

// GatherRow for kPanels panels whose plans have the same windows: each
// window of x is loaded once and permuted once per panel. Panel q's plan is
// windows[q] (first[] is shared), its A tile a_tiles[q].
template <int kPanels>
inline void GatherRowShared(const uint16_t* x_row, const GatherWindow* const* windows,
                            const int32_t* first, int64_t steps, uint16_t* const* a_tiles,
                            int64_t row) {
  for (int64_t s = 0; s < steps; ++s) {
    __m512i r[kPanels];
    for (int q = 0; q < kPanels; ++q) r[q] = _mm512_setzero_si512();
    for (int32_t i = first[s]; i < first[s + 1]; ++i) {
      const GatherWindow& g = windows[0][i];
      const __m512i lo = _mm512_maskz_loadu_epi16(g.lo, x_row + g.offset);
      const __m512i hi = _mm512_maskz_loadu_epi16(g.hi, x_row + g.offset + 32);
      for (int q = 0; q < kPanels; ++q) {
        const GatherWindow& gq = windows[q][i];
        r[q] = _mm512_mask_mov_epi16(r[q], gq.lanes, _mm512_permutex2var_epi16(lo, gq.idx, hi));
      }
    }
    for (int q = 0; q < kPanels; ++q)
      _mm512_store_si512(a_tiles[q] + s * kTileWords + row * kStepWords, r[q]);
  }
}

// Row `row` of every A tile, zero (a token past the end of the tile).
inline void ZeroRow(int64_t steps, uint16_t* a_tile, int64_t row) {
  for (int64_t s = 0; s < steps; ++s)
    _mm512_store_si512(a_tile + s * kTileWords + row * kStepWords, _mm512_setzero_si512());
}

// ------------------------------------------------------------------ B tiles

// Where a format's decoder puts input kk's weights for 16 outputs
// rb .. rb + 15 (f32, rounded here to bf16, round to nearest even: exact for
// values that came from bf16): B[rb / 16][kk / 32], pair row (kk % 32) / 2,
// words 2 c + kk % 2. The decoder writes every (kk, 16 outputs) of its tile
// once, straight into the tiles: no f32 tile and no second pass.
struct BTileSink {
  uint16_t* b;
  int64_t steps;  // k steps per output tile
  // A decoder may also write a whole k step of 16 outputs at once: the
  // 1 KB tile of step kk / 32 (kk a multiple of 32) and outputs rb .. rb + 15.
  static constexpr bool kTakesTileSteps = true;
  inline uint16_t* TileStep(int64_t kk, int64_t rb) const {
    return b + rb / 16 * steps * kTileWords + kk / kStepWords * kTileWords;
  }
  inline void operator()(int64_t kk, int64_t rb, __m512 col) const {
    // Word w of the row takes output w / 2; the store keeps kk's parity.
    const __m512i spread = _mm512_set_epi16(
        15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8,
        7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m256i words = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(col));
    uint16_t* row = b + rb / 16 * steps * kTileWords + kk / kStepWords * kTileWords +
                    kk % kStepWords / 2 * kStepWords;
    const __mmask32 parity = (kk & 1) ? 0xaaaaaaaau : 0x55555555u;
    _mm512_mask_storeu_epi16(row, parity,
                             _mm512_permutexvar_epi16(spread, _mm512_castsi256_si512(words)));
  }
  // Inputs kk and kk + 1 (kk even): one whole pair row, two conversions in
  // one instruction and no masked stores.
  inline void Pair(int64_t kk, int64_t rb, __m512 first, __m512 second) const {
    // Word 2c takes the first input's output c, word 2c + 1 the second's.
    const __m512i interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
        23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i words = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(second, first));
    uint16_t* row = b + rb / 16 * steps * kTileWords + kk / kStepWords * kTileWords +
                    kk % kStepWords / 2 * kStepWords;
    _mm512_storeu_si512(row, _mm512_permutexvar_epi16(interleave, words));
  }
};

// Where a decoder puts input kk's weights for 16 outputs when the product
// runs the other way (dx = dy . W^T): the outputs are the reduction and the
// inputs the columns. Output o of the weight is row o of the k dimension;
// input kk is column sel[kk] - in0 (the task's own inputs, dense). For 16
// consecutive outputs (a multiple of 16) the pairs (o, o + 1) are 8
// consecutive pair rows, each taking one dword (the pair's two words) at the
// input's column: one bf16 conversion and one 8-dword scatter.
// Layout: [input tile (16 inputs)][k step (32 outputs)][16 pair rows][32 words].
// With `add`, the weights add to what the column holds (a panel whose gather
// list names one input twice, which only garbage columns do).
struct TransposedBTileSink {
  uint16_t* b;
  int64_t steps;  // k steps over the outputs (ceil(N / 32))
  int64_t r0;     // the panel's first output
  const int32_t* sel;
  int64_t in0;
  bool add;
  inline void operator()(int64_t kk, int64_t rb, __m512 col) const {
    const int64_t c = sel[kk] - in0, o = r0 + rb;
    uint16_t* row = b + c / 16 * steps * kTileWords + o / kStepWords * kTileWords +
                    o % kStepWords / 2 * kStepWords + c % 16 * 2;
    const __m256i rows = _mm256_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112);  // In dwords.
    if (add) {
      // The 16 words held, widened to f32 in output order (bf16 is f32's top half).
      const __m256i held = _mm256_i32gather_epi32(reinterpret_cast<const int*>(row), rows, 4);
      col = _mm512_add_ps(col, _mm512_castsi512_ps(
                                   _mm512_slli_epi32(_mm512_cvtepu16_epi32(held), 16)));
    }
    const __m256i dwords = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(col));
    _mm256_i32scatter_epi32(row, rows, dwords, 4);
  }
  inline void Pair(int64_t kk, int64_t rb, __m512 first, __m512 second) const {
    (*this)(kk, rb, first);
    (*this)(kk + 1, rb, second);
  }
};

// Rows t .. t + live - 1 of a row-major bf16 matrix (ld words per row, k
// words used) as A tiles [token tile][k step][16][32]: `rows` rows (a
// multiple of 16), zero past `live` and past k.
inline void PackA(const uint16_t* src, int64_t ld, int64_t k, int64_t live, int64_t rows,
                  uint16_t* a) {
  const int64_t steps = (k + kStepWords - 1) / kStepWords;
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* tile_row = a + r / kTileRows * steps * kTileWords + r % kTileRows * kStepWords;
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t left = k - s * kStepWords;
      const __mmask32 keep =
          r >= live ? 0u : (left >= 32 ? 0xffffffffu : (1u << left) - 1u);
      _mm512_store_si512(tile_row + s * kTileWords,
                         _mm512_maskz_loadu_epi16(keep, src + r * ld + s * kStepWords));
    }
  }
}

// Products that reduce over tokens (the weight gradient, x^T dy) take both
// operands token-major. A: 16 columns of x (inputs i0 .. i0 + 15) per tile,
// 32 tokens per k step: tile[i][tt] = x[t0 + 32 s + tt, i0 + i], zero past
// `live` tokens and past `cols` columns. Layout [column tile][token step][16]
// [32]; `steps` token steps, `tiles` column tiles from column c0.
inline void PackColumnsAsA(const uint16_t* x, int64_t ld, int64_t cols, int64_t c0,
                           int64_t tiles, int64_t live, int64_t steps, uint16_t* a) {
  for (int64_t j = 0; j < tiles; ++j) {
    for (int64_t s = 0; s < steps; ++s) {
      uint16_t* tile = a + (j * steps + s) * kTileWords;
      for (int64_t tt = 0; tt < kStepWords; ++tt) {
        const int64_t t = s * kStepWords + tt, c = c0 + j * 16;
        const int64_t left = t < live ? cols - c : 0;
        const __mmask16 keep =
            static_cast<__mmask16>(left >= 16 ? 0xffff : left <= 0 ? 0 : (1u << left) - 1);
        // One token's 16 columns go down column tt of the tile.
        alignas(32) uint16_t words[16];
        _mm256_store_si256(reinterpret_cast<__m256i*>(words),
                           _mm256_maskz_loadu_epi16(keep, x + t * ld + c));
        for (int i = 0; i < 16; ++i) tile[i * kStepWords + tt] = words[i];
      }
    }
  }
}

// B for the same products: 16 columns of dy per tile, token pairs per VNNI
// row: row r of step s holds tokens 32 s + 2 r and 32 s + 2 r + 1 of each
// column side by side. Zero past `live` tokens and `cols` columns. Layout
// [column tile][token step][16][32].
inline void PackColumnsAsB(const uint16_t* dy, int64_t ld, int64_t cols, int64_t tiles,
                           int64_t live, int64_t steps, uint16_t* b) {
  // Word 2c takes the first token's column c, word 2c + 1 the second's.
  const __m512i interleave = _mm512_set_epi16(
      31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
      23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t j = 0; j < tiles; ++j) {
    const int64_t left = cols - j * 16;
    const __mmask16 keep = LaneMask(left);
    for (int64_t s = 0; s < steps; ++s) {
      uint16_t* tile = b + (j * steps + s) * kTileWords;
      for (int64_t r = 0; r < kTileRows; ++r) {
        const int64_t t = s * kStepWords + 2 * r;
        const __m256i first = _mm256_maskz_loadu_epi16(t < live ? keep : 0, dy + t * ld + j * 16);
        const __m256i second =
            _mm256_maskz_loadu_epi16(t + 1 < live ? keep : 0, dy + (t + 1) * ld + j * 16);
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1);
        _mm512_store_si512(tile + r * kStepWords, _mm512_permutexvar_epi16(interleave, both));
      }
    }
  }
}

// Zeroes the B rows of inputs nk .. steps * 32 (the last step's tail, which
// no decoder writes) in each of `out_tiles` output tiles.
inline void ZeroBTail(uint16_t* b, int64_t nk, int64_t out_tiles) {
  const int64_t steps = (nk + kStepWords - 1) / kStepWords;
  if (nk == steps * kStepWords) return;
  for (int64_t j = 0; j < out_tiles; ++j)
    std::memset(b + (j * steps + steps - 1) * kTileWords, 0, kTileWords * sizeof(uint16_t));
}

// ------------------------------------------------------------------ micro-kernel

#ifdef JAXSPARSE_TILES_ON_AMX

// The tile configuration (cpu/engine/amx_config.h), shared with the other tile products.
using amx_config::ConfigureTiles;
using amx_config::ReleaseTiles;

// c (f32, c_ld floats per row) = A . B (kLoad: c + A . B) over `steps` k
// steps, for kTa token tiles (the next at a + a_next words) and kTb output
// tiles (b + b_next).
template <int kTa, int kTb, bool kLoad>
inline void TileBlock(const uint16_t* a, int64_t a_next, const uint16_t* b, int64_t b_next,
                      int64_t steps, float* c, int64_t c_ld) {
  const int64_t c_stride = c_ld * int64_t{sizeof(float)};
  float* const c1 = c + kTileRows * c_ld;
  if constexpr (kLoad) {
    _tile_loadd(0, c, c_stride);
    if constexpr (kTb == 2) _tile_loadd(1, c + 16, c_stride);
    if constexpr (kTa == 2) _tile_loadd(2, c1, c_stride);
    if constexpr (kTa == 2 && kTb == 2) _tile_loadd(3, c1 + 16, c_stride);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t at = s * kTileWords;
    _tile_loadd(4, a + at, 64);
    _tile_loadd(6, b + at, 64);
    if constexpr (kTb == 2) _tile_loadd(7, b + b_next + at, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kTb == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (kTa == 2) {
      _tile_loadd(5, a + a_next + at, 64);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (kTb == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, c_stride);
  if constexpr (kTb == 2) _tile_stored(1, c + 16, c_stride);
  if constexpr (kTa == 2) _tile_stored(2, c1, c_stride);
  if constexpr (kTa == 2 && kTb == 2) _tile_stored(3, c1 + 16, c_stride);
}

#else  // The AVX512-BF16 unit.

// Tasks of the AVX512-BF16 unit have no tile state to set up or give back.
inline void ConfigureTiles() {}
inline void ReleaseTiles() {}

// Half a C tile (8 tokens) by kTb output tiles on vdpbf16ps: per pair row r
// of a k step, kTb loads of B's row and 8 broadcasts of A's pair (token,
// inputs 2 r and 2 r + 1) feed 8 kTb dot products into 8 kTb accumulators.
// At kTb = 2 that is 10 loads per 16 vdpbf16ps (Zen 5 issues two of each
// per cycle) and 16 independent sums, enough to cover the instruction's
// latency (~6 cycles) at two per cycle. `a` is the half's first row of its
// tile's first step; `c` its first row of sums.
template <int kTb, bool kLoad>
inline void HalfTileBlock(const uint16_t* a, const uint16_t* b, int64_t b_next, int64_t steps,
                          float* c, int64_t c_ld) {
  constexpr int kTokens = kTileRows / 2;
  __m512 acc[kTokens][kTb];
  for (int t = 0; t < kTokens; ++t)
    for (int j = 0; j < kTb; ++j)
      acc[t][j] = kLoad ? _mm512_loadu_ps(c + t * c_ld + 16 * j) : _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    const uint16_t* as = a + s * kTileWords;
    const uint16_t* bs = b + s * kTileWords;
#pragma GCC unroll 16
    for (int r = 0; r < kTileRows; ++r) {
      __m512bh w[kTb];
      for (int j = 0; j < kTb; ++j)
        w[j] = reinterpret_cast<__m512bh>(_mm512_load_si512(bs + j * b_next + r * kStepWords));
      for (int t = 0; t < kTokens; ++t) {
        int32_t pair;
        std::memcpy(&pair, as + t * kStepWords + 2 * r, sizeof pair);
        const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
        for (int j = 0; j < kTb; ++j) acc[t][j] = _mm512_dpbf16_ps(acc[t][j], x, w[j]);
      }
    }
  }
  for (int t = 0; t < kTokens; ++t)
    for (int j = 0; j < kTb; ++j) _mm512_storeu_ps(c + t * c_ld + 16 * j, acc[t][j]);
}

// TileBlock's contract (below) on the vector unit, half a token tile at a time.
template <int kTa, int kTb, bool kLoad>
inline void TileBlock(const uint16_t* a, int64_t a_next, const uint16_t* b, int64_t b_next,
                      int64_t steps, float* c, int64_t c_ld) {
  constexpr int64_t kHalf = kTileRows / 2;
  for (int i = 0; i < kTa; ++i)
    for (int64_t h = 0; h < kTileRows; h += kHalf)
      HalfTileBlock<kTb, kLoad>(a + i * a_next + h * kStepWords, b, b_next, steps,
                                c + (i * kTileRows + h) * c_ld, c_ld);
}

#endif  // JAXSPARSE_TILES_ON_AMX

// TileProduct with the choice at compile time.
template <bool kLoad>
inline void TileProductInto(const uint16_t* a, int64_t a_next, int64_t token_tiles,
                            const uint16_t* b, int64_t b_next, int64_t out_tiles, int64_t steps,
                            float* c, int64_t c_ld) {
  for (int64_t i = 0; i < token_tiles; i += 2) {
    const bool two_a = i + 1 < token_tiles;
    for (int64_t j = 0; j < out_tiles; j += 2) {
      const bool two_b = j + 1 < out_tiles;
      const uint16_t* ai = a + i * a_next;
      const uint16_t* bj = b + j * b_next;
      float* cij = c + i * kTileRows * c_ld + j * 16;
      if (two_a && two_b) {
        TileBlock<2, 2, kLoad>(ai, a_next, bj, b_next, steps, cij, c_ld);
      } else if (two_a) {
        TileBlock<2, 1, kLoad>(ai, a_next, bj, b_next, steps, cij, c_ld);
      } else if (two_b) {
        TileBlock<1, 2, kLoad>(ai, a_next, bj, b_next, steps, cij, c_ld);
      } else {
        TileBlock<1, 1, kLoad>(ai, a_next, bj, b_next, steps, cij, c_ld);
      }
    }
  }
}

// TileProduct (below) over `steps` k steps of A tiles packed for more (a k
// block of an A packed once for all of K): token tile i's tiles start a_next
// words after token tile i - 1's.
inline void TileProductStrided(const uint16_t* a, int64_t a_next, int64_t token_tiles,
                               const uint16_t* b, int64_t b_next, int64_t out_tiles,
                               int64_t steps, float* c, int64_t c_ld, bool accumulate) {
  if (accumulate) {
    return TileProductInto<true>(a, a_next, token_tiles, b, b_next, out_tiles, steps, c, c_ld);
  }
  TileProductInto<false>(a, a_next, token_tiles, b, b_next, out_tiles, steps, c, c_ld);
}

// c (+)= A . B for `token_tiles` tiles of A (16 rows each, steps * 1 KB
// apart) and `out_tiles` tiles of B (b_next words apart: steps * 1 KB when B
// was decoded for this product, more when it is a window of B tiles packed
// once for all k steps); `accumulate` adds to c, else c is overwritten.
inline void TileProduct(const uint16_t* a, int64_t token_tiles, const uint16_t* b,
                        int64_t b_next, int64_t out_tiles, int64_t steps, float* c,
                        int64_t c_ld, bool accumulate) {
  TileProductStrided(a, steps * kTileWords, token_tiles, b, b_next, out_tiles, steps, c, c_ld,
                     accumulate);
}

// TileProduct of a B decoded for this product (its tiles steps * 1 KB apart).
inline void TileProduct(const uint16_t* a, int64_t token_tiles, const uint16_t* b,
                        int64_t out_tiles, int64_t steps, float* c, int64_t c_ld,
                        bool accumulate) {
  TileProduct(a, token_tiles, b, steps * kTileWords, out_tiles, steps, c, c_ld, accumulate);
}

}  // namespace bf16_tiles
}  // namespace JAXSPARSE_KERNEL_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_ENGINE_BF16_TILES_H_
