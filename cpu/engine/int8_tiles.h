// The CPU engine's int8 tile products: C (int32) += A (int8) . B (int8), s8 x s8,
// for the int4-weight formats with int8-quantised activations to come. The same
// tile style as bf16_tiles.h, on three units:
//   - AMX (tdpbssd), in translation units compiled with the AMX flags
//     (-mamx-tile -mamx-int8): 2 x 2 tiles at a time, as bf16_tiles.h;
//   - AVX512-VNNI (vpdpbusd), in the avx512bf16 units (AMD Zen 4 and 5, Intel
//     from Ice Lake): 8 tokens by kTb 16-lane output vectors at a time;
//   - scalar C++ everywhere else (the portable unit; the avx2 and avx512 ISAs
//     run it too: neither has an int8 dot product instruction worth a unit).
// All three read the same layouts, written by the packers below (plain C++,
// so every unit, the scalar one included, tests them).
//
// Layouts (bytes are int8):
//   A  [token tile i][k step s][16 rows][64 bytes]: tokens 16 i .. 16 i + 15
//      by inputs 64 s .. 64 s + 63, 1 KB contiguous per tile (bf16_tiles.h
//      says why: 16 lines that do not collide in L1).
//   B  [output tile j][k step s][16 quad rows][16 outputs x 4 bytes]: row r
//      holds inputs 64 s + 4 r .. 64 s + 4 r + 3 of each of 16 outputs side by
//      side, the quads tdpbssd (and vpdpbusd) multiply against A's consecutive
//      quads.
//   C  int32 rows of `ld` int32.
// Tile edges are zero: K padded to a multiple of 64, T and N to multiples of
// 16. Sums wrap modulo 2^32 on every unit (tdpbssd and vpdpbusd do not
// saturate), so a result that fits in int32 is exact.
//
// Included after JAXSPARSE_KERNEL_ISA names the unit's namespace: each unit
// gets its own copy (kernel_util.h says why), and every function here may use
// the instructions of its flags.
#ifndef JAXSPARSE_CPU_ENGINE_INT8_TILES_H_
#define JAXSPARSE_CPU_ENGINE_INT8_TILES_H_

#include <cstdint>
#include <cstring>

#ifndef JAXSPARSE_KERNEL_ISA
#error "define JAXSPARSE_KERNEL_ISA (the namespace of this instantiation) first"
#endif
// The tile unit in an AMX unit (the hardware's, or its model in an emulated
// unit: amx_unit.h), else vpdpbusd where the flags allow that, else scalar
// code.
#include "cpu/common/amx_unit.h"
#if defined(JAXSPARSE_AMX_TILES)
#ifndef JAXSPARSE_TILES_ON_AMX
#define JAXSPARSE_TILES_ON_AMX 1
#endif
#define JAXSPARSE_INT8_TILES_ON_AMX 1
#elif defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define JAXSPARSE_INT8_TILES_ON_VNNI 1
#endif
#if defined(JAXSPARSE_INT8_TILES_ON_AMX) || defined(JAXSPARSE_INT8_TILES_ON_VNNI)
// GCC 12 warns on its own AVX-512 intrinsics' _mm512_undefined placeholders
// (GCC bug 105593), as simd_avx512.h says; the scalar unit keeps the warning.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#endif
#ifdef JAXSPARSE_INT8_TILES_ON_AMX
#include "cpu/engine/amx_config.h"
#endif

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_KERNEL_ISA {
namespace int8_tiles {

constexpr int64_t kTileRows = 16;  // Rows of every tile (tokens of A, quads of B).
constexpr int64_t kStepBytes = 64;  // int8 inputs per k step (a 64-byte row).
constexpr int64_t kQuad = 4;        // Inputs per VNNI quad (one int32 lane).
constexpr int64_t kTileBytes = kTileRows * kStepBytes;  // 1 KB.

inline int64_t KSteps(int64_t k) { return (k + kStepBytes - 1) / kStepBytes; }
inline int64_t Tiles(int64_t rows) { return (rows + kTileRows - 1) / kTileRows; }

// ------------------------------------------------------------------ packing

// Row-major a[tokens, k] (ld bytes per row) as A tiles: token_tiles * steps
// tiles, zero past `tokens` and past k.
inline void PackA(const int8_t* a, int64_t ld, int64_t tokens, int64_t k, int64_t token_tiles,
                  int8_t* tiles) {
  const int64_t steps = KSteps(k);
  std::memset(tiles, 0, token_tiles * steps * kTileBytes);
  for (int64_t t = 0; t < tokens; ++t) {
    int8_t* row = tiles + t / kTileRows * steps * kTileBytes + t % kTileRows * kStepBytes;
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t k0 = s * kStepBytes;
      const int64_t bytes = k - k0 < kStepBytes ? k - k0 : kStepBytes;
      std::memcpy(row + s * kTileBytes, a + t * ld + k0, bytes);
    }
  }
}

// Row-major b[k, n] (ld bytes per row) as B tiles (out_tiles * steps of
// them), zero past k and n, and the column sums sums[c] = sum_kk b[kk, c]
// for every padded output c (zero past n): what the VNNI unit subtracts
// (Int8TileProduct below says why).
inline void PackB(const int8_t* b, int64_t ld, int64_t k, int64_t n, int64_t out_tiles,
                  int8_t* tiles, int32_t* sums) {
  const int64_t steps = KSteps(k);
  std::memset(tiles, 0, out_tiles * steps * kTileBytes);
  std::memset(sums, 0, out_tiles * kTileRows * sizeof(int32_t));
  for (int64_t kk = 0; kk < k; ++kk) {
    const int64_t s = kk / kStepBytes, r = kk % kStepBytes / kQuad, q = kk % kQuad;
    for (int64_t c = 0; c < n; ++c) {
      const int8_t v = b[kk * ld + c];
      tiles[(c / kTileRows * steps + s) * kTileBytes + r * kStepBytes + c % kTileRows * kQuad + q] =
          v;
      sums[c] += v;
    }
  }
}

// ------------------------------------------------------------------ micro-kernels

#if defined(JAXSPARSE_INT8_TILES_ON_AMX)

// The tile configuration (cpu/engine/amx_config.h), shared with the other tile products.
using amx_config::ConfigureTiles;
using amx_config::ReleaseTiles;

// c (int32, c_ld per row) (+)= A . B over `steps` k steps for kTa token tiles
// (the next at a + a_next bytes) and kTb output tiles (b + b_next): tiles 0-3
// are C, 4-5 A, 6-7 B, so four tdpbssd run per four tile loads.
template <int kTa, int kTb, bool kLoad>
inline void TileBlock(const int8_t* a, int64_t a_next, const int8_t* b, int64_t b_next,
                      int64_t steps, const int32_t* /*sums*/, int32_t* c, int64_t c_ld) {
  const int64_t c_stride = c_ld * int64_t{sizeof(int32_t)};
  int32_t* const c1 = c + kTileRows * c_ld;
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
    const int64_t at = s * kTileBytes;
    _tile_loadd(4, a + at, 64);
    _tile_loadd(6, b + at, 64);
    if constexpr (kTb == 2) _tile_loadd(7, b + b_next + at, 64);
    _tile_dpbssd(0, 4, 6);
    if constexpr (kTb == 2) _tile_dpbssd(1, 4, 7);
    if constexpr (kTa == 2) {
      _tile_loadd(5, a + a_next + at, 64);
      _tile_dpbssd(2, 5, 6);
      if constexpr (kTb == 2) _tile_dpbssd(3, 5, 7);
    }
  }
  _tile_stored(0, c, c_stride);
  if constexpr (kTb == 2) _tile_stored(1, c + 16, c_stride);
  if constexpr (kTa == 2) _tile_stored(2, c1, c_stride);
  if constexpr (kTa == 2 && kTb == 2) _tile_stored(3, c1 + 16, c_stride);
}

#elif defined(JAXSPARSE_INT8_TILES_ON_VNNI)

// The vector unit has no tile state to set up or give back.
inline void ConfigureTiles() {}
inline void ReleaseTiles() {}

// Half a C tile (8 tokens) by kTb output tiles on vpdpbusd. The instruction
// multiplies UNSIGNED bytes by signed bytes only (AVX512-VNNI has no s8 x s8
// form; AVX-VNNI-INT8's vpdpbssd is not on Zen 4/5 or pre-Sierra Forest Intel),
// so A goes in shifted to u8: a' = a + 128 (the sign bit flipped, xor 0x80),
// and sum a' b = sum a b + 128 sum b. The 128 * (column sum of B) is
// subtracted once per output at the end (sums[], from PackB). Both sums wrap
// modulo 2^32 alike (vpdpbusd does not saturate), so the difference is exact
// whenever the true result fits in int32.
// Per quad row r of a k step: kTb loads of B's row and 8 broadcasts of A's
// quad (token, inputs 4 r .. 4 r + 3) feed 8 kTb dot products into 8 kTb
// accumulators, as bf16_tiles.h's HalfTileBlock. `a` is the half's first row
// of its tile's first step; `c` its first row of sums.
template <int kTb, bool kLoad>
inline void HalfTileBlock(const int8_t* a, const int8_t* b, int64_t b_next, int64_t steps,
                          const int32_t* sums, int32_t* c, int64_t c_ld) {
  constexpr int kTokens = kTileRows / 2;
  const __m512i sign = _mm512_set1_epi32(static_cast<int32_t>(0x80808080u));
  __m512i acc[kTokens][kTb];
  for (int t = 0; t < kTokens; ++t)
    for (int j = 0; j < kTb; ++j) acc[t][j] = _mm512_setzero_si512();
  for (int64_t s = 0; s < steps; ++s) {
    const int8_t* as = a + s * kTileBytes;
    const int8_t* bs = b + s * kTileBytes;
#pragma GCC unroll 16
    for (int r = 0; r < kTileRows; ++r) {
      __m512i w[kTb];
      for (int j = 0; j < kTb; ++j) w[j] = _mm512_load_si512(bs + j * b_next + r * kStepBytes);
      for (int t = 0; t < kTokens; ++t) {
        int32_t quad;
        std::memcpy(&quad, as + t * kStepBytes + kQuad * r, sizeof quad);
        const __m512i x = _mm512_xor_si512(_mm512_set1_epi32(quad), sign);
        for (int j = 0; j < kTb; ++j) acc[t][j] = _mm512_dpbusd_epi32(acc[t][j], x, w[j]);
      }
    }
  }
  for (int j = 0; j < kTb; ++j) {
    const __m512i shift = _mm512_slli_epi32(_mm512_loadu_si512(sums + 16 * j), 7);  // 128 sum b
    for (int t = 0; t < kTokens; ++t) {
      __m512i sum = _mm512_sub_epi32(acc[t][j], shift);
      if (kLoad) sum = _mm512_add_epi32(sum, _mm512_loadu_si512(c + t * c_ld + 16 * j));
      _mm512_storeu_si512(c + t * c_ld + 16 * j, sum);
    }
  }
}

// TileBlock's contract (the AMX one above) on the vector unit, half a token
// tile at a time; sums are the column sums of the kTb output tiles.
template <int kTa, int kTb, bool kLoad>
inline void TileBlock(const int8_t* a, int64_t a_next, const int8_t* b, int64_t b_next,
                      int64_t steps, const int32_t* sums, int32_t* c, int64_t c_ld) {
  constexpr int64_t kHalf = kTileRows / 2;
  for (int i = 0; i < kTa; ++i)
    for (int64_t h = 0; h < kTileRows; h += kHalf)
      HalfTileBlock<kTb, kLoad>(a + i * a_next + h * kStepBytes, b, b_next, steps, sums,
                                c + (i * kTileRows + h) * c_ld, c_ld);
}

#else  // Scalar.

inline void ConfigureTiles() {}
inline void ReleaseTiles() {}

// One C tile (16 tokens x 16 outputs) from the packed tiles, in plain C++:
// the portable unit's product, and the layouts' executable definition.
template <bool kLoad>
inline void ScalarTile(const int8_t* a, const int8_t* b, int64_t steps, int32_t* c,
                       int64_t c_ld) {
  for (int64_t t = 0; t < kTileRows; ++t) {
    int32_t row[kTileRows] = {};
    for (int64_t s = 0; s < steps; ++s) {
      const int8_t* at = a + s * kTileBytes + t * kStepBytes;
      const int8_t* bs = b + s * kTileBytes;
      for (int64_t r = 0; r < kTileRows; ++r)
        for (int64_t o = 0; o < kTileRows; ++o)
          for (int64_t q = 0; q < kQuad; ++q)
            row[o] += int32_t{at[kQuad * r + q]} * bs[r * kStepBytes + o * kQuad + q];
    }
    for (int64_t o = 0; o < kTileRows; ++o)
      c[t * c_ld + o] = kLoad ? c[t * c_ld + o] + row[o] : row[o];
  }
}

// TileBlock's contract, one C tile at a time.
template <int kTa, int kTb, bool kLoad>
inline void TileBlock(const int8_t* a, int64_t a_next, const int8_t* b, int64_t b_next,
                      int64_t steps, const int32_t* /*sums*/, int32_t* c, int64_t c_ld) {
  for (int i = 0; i < kTa; ++i)
    for (int j = 0; j < kTb; ++j)
      ScalarTile<kLoad>(a + i * a_next, b + j * b_next, steps,
                        c + i * kTileRows * c_ld + j * kTileRows, c_ld);
}

#endif

// ------------------------------------------------------------------ products

// TileProduct with the choice at compile time.
template <bool kLoad>
inline void TileProductInto(const int8_t* a, int64_t token_tiles, const int8_t* b,
                            int64_t out_tiles, int64_t steps, const int32_t* sums, int32_t* c,
                            int64_t c_ld) {
  const int64_t next = steps * kTileBytes;
  for (int64_t i = 0; i < token_tiles; i += 2) {
    const bool two_a = i + 1 < token_tiles;
    for (int64_t j = 0; j < out_tiles; j += 2) {
      const bool two_b = j + 1 < out_tiles;
      const int8_t* ai = a + i * next;
      const int8_t* bj = b + j * next;
      const int32_t* sj = sums + j * kTileRows;
      int32_t* cij = c + i * kTileRows * c_ld + j * kTileRows;
      if (two_a && two_b) {
        TileBlock<2, 2, kLoad>(ai, next, bj, next, steps, sj, cij, c_ld);
      } else if (two_a) {
        TileBlock<2, 1, kLoad>(ai, next, bj, next, steps, sj, cij, c_ld);
      } else if (two_b) {
        TileBlock<1, 2, kLoad>(ai, next, bj, next, steps, sj, cij, c_ld);
      } else {
        TileBlock<1, 1, kLoad>(ai, next, bj, next, steps, sj, cij, c_ld);
      }
    }
  }
}

// c (+)= A . B for `token_tiles` tiles of A (steps * 1 KB apart) and
// `out_tiles` tiles of B with their column sums `sums` (from PackB; 16 per
// output tile), 2 x 2 tiles at a time, narrower at the edges. c holds
// 16 token_tiles rows of 16 out_tiles int32 (ld c_ld); `accumulate` adds to
// it, else it is overwritten. On AMX, call between ConfigureTiles() and
// ReleaseTiles() on the same thread.
inline void TileProduct(const int8_t* a, int64_t token_tiles, const int8_t* b, int64_t out_tiles,
                        int64_t steps, const int32_t* sums, int32_t* c, int64_t c_ld,
                        bool accumulate) {
  if (accumulate)
    return TileProductInto<true>(a, token_tiles, b, out_tiles, steps, sums, c, c_ld);
  TileProductInto<false>(a, token_tiles, b, out_tiles, steps, sums, c, c_ld);
}

}  // namespace int8_tiles
}  // namespace JAXSPARSE_KERNEL_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_ENGINE_INT8_TILES_H_
