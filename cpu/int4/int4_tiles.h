// The int4 products by W with bf16 activations at many tokens, on the engine's
// bf16 tiles (cpu/engine/bf16_tiles.h): AMX tdpbf16ps where the unit is built
// with the AMX flags, vdpbf16ps in the avx512bf16 unit (AMD Zen 4 and 5).
// XLA's bf16 dot runs on those instructions too, about twice its f32 rate, so
// the f32 FMA panels (int4_panel_avx512.h) cannot keep up with it in bf16.
//
// Per call and batch entry: x is packed once into A tiles for all of K (one
// copy of x; each task then reads its token tiles' k blocks in place). A task
// owns a block of up to kTileTokens tokens and a group of kGroupPanels panels
// of 32 outputs (two B tiles); per block of kTileSteps k steps it decodes each
// panel's weights straight into the VNNI pair rows of its B tiles and
// multiplies them by the block's A tiles, which stay in L2 for all the
// group's panels. A qweight byte is exactly one VNNI pair (inputs 2j, 2j + 1
// of one output), so a pair row is one 16-byte load, the nibbles split, -8,
// times the scale in f32 (exact: 4 x 8 significant bits), rounded once to
// bf16 (the reference's bf16 product) and interleaved. The 2:4 form is
// decoded with its zeros, which the tiles multiply.
// Included by int4_kernels_{avx512bf16,amx}.cc after int4_kernels.h.
#include "cpu/common/kernel_util.h"
#include "cpu/engine/bf16_tiles.h"

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_INT4_ISA {
namespace int4 {

namespace tiles = bf16_tiles;

// From this many tokens (one A tile) bf16 products take the tiles; the 2:4
// lines from 32, below which their lookup kernel, which multiplies only the
// kept values, was faster (4096 x 4096 on Zen 4: 1.41-1.54x XLA at 16 tokens
// and 1.18-1.23x at 24 against the tiles' 1.16-1.28x and 0.93-1.11x; at 32
// the tiles won, 1.20-1.26x against 1.06-1.08x).
constexpr int64_t kTileMinTokens = 16;
constexpr int64_t kNmLinesTileMinTokens = 32;
constexpr int64_t kTilePanelOut = 2 * tiles::kTileRows;  // two B tiles: the 2 x 2 blocking
constexpr int64_t kTileSteps = 16;                       // k steps per block: 512 inputs
constexpr int64_t kGroupPanels = 8;                      // panels sharing a block of A
// Tokens per task: the block of A (tokens x 512 inputs) and the group's sums
// (tokens x 256 outputs) take 256 KB each at 256 tokens, half of a 1 MB L2;
// a smaller L2 gets half the tokens.
inline int64_t TileTokens(const Runtime& rt) { return rt.l2_bytes >= (1 << 20) ? 256 : 128; }

// 16 outputs' pairs (lo = input 2j, hi = input 2j + 1) as bf16 VNNI words.
inline __m512i PairsBf16(__m512 lo, __m512 hi) {
  const __m512i l = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(lo)));
  const __m512i h = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(hi)));
  return _mm512_or_si512(l, _mm512_slli_epi32(h, 16));
}

struct TileCtx {
  const Int4Problem* p;
  const uint16_t* a;     // x as A tiles [token tile][step][16][32], all of K
  const float* scales;   // [G, N], f32
  const uint8_t* qweight;
  const uint8_t* positions;
  uint16_t* out;         // this batch entry's y [T, N]
  float* work;           // per worker: the B block and the group's sums
  int64_t steps;         // k steps of K
  int64_t token_block;   // tokens per task
  int64_t panel_groups;  // tasks per token block
  int64_t worker_floats;
};

// Pair row r of k step s of output tile j, dense form: byte row 16 s + r.
inline __m512i DensePairRow(const TileCtx& c, int64_t row, int64_t o, __mmask16 mask) {
  const Int4Problem& p = *c.p;
  if (2 * row >= p.k || mask == 0) return _mm512_setzero_si512();
  const __m512i low = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
  const __m512 s = _mm512_maskz_loadu_ps(mask, c.scales + 2 * row / p.group * p.n_out + o);
  const __m512i d = RowBytes(p, c.qweight, row, o, mask);
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(d, low), eight));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(d, 4), eight));
  return PairsBf16(_mm512_mul_ps(lo, s), _mm512_mul_ps(hi, s));
}

// Pair rows 2h and 2h + 1 of a step, 2:4 form: 2:4 group j's inputs 0, 1 and
// 2, 3 (SpreadGroup).
inline void SparsePairRows(const TileCtx& c, int64_t j, int64_t o, __mmask16 mask,
                           __m512i* first, __m512i* second) {
  const Int4Problem& p = *c.p;
  if (4 * j >= p.k || mask == 0) {
    *first = *second = _mm512_setzero_si512();
    return;
  }
  const SparseLanes lanes = DecodeSparse(p, c.qweight, c.positions, j, o, mask);
  const __m512 s = _mm512_maskz_loadu_ps(mask, c.scales + 4 * j / p.group * p.n_out + o);
  __m512 w[4];
  SpreadGroup(lanes, _mm512_mul_ps(lanes.v0, s), _mm512_mul_ps(lanes.v1, s), w);
  *first = PairsBf16(w[0], w[1]);
  *second = PairsBf16(w[2], w[3]);
}

// The B tiles [2][ks][16][32] of the panel at o0, k steps s0 .. s0 + ks; rows
// past K and outputs past N are zero.
template <bool kSparse>
void DecodeBBlock(const TileCtx& c, int64_t s0, int64_t ks, int64_t o0, uint16_t* b) {
  const int64_t n = c.p->n_out;
  for (int64_t j = 0; j < 2; ++j) {
    const int64_t o = o0 + 16 * j;
    const __mmask16 mask = o < n ? LaneMask(n - o) : 0;
    for (int64_t s = 0; s < ks; ++s) {
      uint16_t* tile = b + (j * ks + s) * tiles::kTileWords;
      const int64_t step = s0 + s;
      for (int64_t r = 0; r < tiles::kTileRows; r += 2) {
        __m512i first, second;
        if (kSparse) {
          SparsePairRows(c, 8 * step + r / 2, o, mask, &first, &second);
        } else {
          first = DensePairRow(c, 16 * step + r, o, mask);
          second = DensePairRow(c, 16 * step + r + 1, o, mask);
        }
        _mm512_store_si512(tile + r * tiles::kStepWords, first);
        _mm512_store_si512(tile + (r + 1) * tiles::kStepWords, second);
      }
    }
  }
}

// Packs token tile `task` of x (bf16 [T, K]) into A tiles.
struct PackXJob {
  const TileCtx* c;
  const uint16_t* x;
  uint16_t* a;

  void Run(int64_t task, int /*worker*/) const {
    const Int4Problem& p = *c->p;
    const int64_t t0 = task * tiles::kTileRows;
    tiles::PackA(x + t0 * p.k, p.k, p.k, Min(tiles::kTileRows, p.tokens - t0), tiles::kTileRows,
                 a + task * c->steps * tiles::kTileWords);
  }
};

// One task: a token block by a group of panels.
template <bool kSparse>
struct TileProductJob {
  const TileCtx* c;

  void Run(int64_t task, int worker) const {
    const Int4Problem& p = *c->p;
    const int64_t t0 = task / c->panel_groups * c->token_block;
    const int64_t o_first = task % c->panel_groups * kGroupPanels * kTilePanelOut;
    const int64_t live = Min(c->token_block, p.tokens - t0);
    const int64_t token_tiles = CeilDiv(live, tiles::kTileRows);
    const int64_t panels = Min(kGroupPanels, CeilDiv(p.n_out - o_first, kTilePanelOut));
    float* sums = c->work + worker * c->worker_floats;
    uint16_t* b = reinterpret_cast<uint16_t*>(sums + kGroupPanels * c->token_block * kTilePanelOut);
    const uint16_t* a = c->a + t0 / tiles::kTileRows * c->steps * tiles::kTileWords;
    tiles::ConfigureTiles();
    for (int64_t s0 = 0; s0 < c->steps; s0 += kTileSteps) {
      const int64_t ks = Min(kTileSteps, c->steps - s0);
      for (int64_t q = 0; q < panels; ++q) {
        DecodeBBlock<kSparse>(*c, s0, ks, o_first + q * kTilePanelOut, b);
        tiles::TileProductStrided(a + s0 * tiles::kTileWords, c->steps * tiles::kTileWords,
                                  token_tiles, b, ks * tiles::kTileWords, 2, ks,
                                  sums + q * c->token_block * kTilePanelOut, kTilePanelOut,
                                  s0 > 0);
      }
    }
    tiles::ReleaseTiles();
    for (int64_t q = 0; q < panels; ++q) {
      const int64_t o0 = o_first + q * kTilePanelOut, on = Min(kTilePanelOut, p.n_out - o0);
      for (int64_t t = 0; t < live; ++t) {
        StorePanelRow(c->out, Dtype::kBF16, (t0 + t) * p.n_out + o0,
                      sums + (q * c->token_block + t) * kTilePanelOut, on);
      }
    }
  }
};

// The scratch of one call: x's A tiles, the scales in f32, per worker the
// group's sums and a B block.
struct TileScratch {
  int64_t a_words, scale_floats, workers, worker_floats;
  uint16_t* a;
  float* scales;
  float* work;

  template <class Carver>
  void Layout(Carver& carver) {
    a = carver.template Take<uint16_t>(a_words);
    scales = carver.template Take<float>(scale_floats);
    work = carver.template Take<float>(workers * worker_floats);
  }
};

template <bool kSparse>
bool RunTiles(const Int4Problem& p, const Runtime& rt) {
  if (p.n_out == 0) return true;
  TileCtx c{};
  c.p = &p;
  c.steps = CeilDiv(p.k, tiles::kStepWords);
  c.token_block = TileTokens(rt);
  c.panel_groups = CeilDiv(p.n_out, kGroupPanels * kTilePanelOut);
  // Sums, then a B block (2 tiles of kTileSteps steps) in the same floats.
  c.worker_floats = kGroupPanels * c.token_block * kTilePanelOut +
                    2 * kTileSteps * tiles::kTileWords / 2;
  const int64_t token_tiles = CeilDiv(p.tokens, tiles::kTileRows);
  const int64_t groups = p.k / p.group;
  TileScratch scratch{token_tiles * c.steps * tiles::kTileWords, groups * p.n_out,
                      std::max(rt.num_workers, 1), c.worker_floats, nullptr, nullptr, nullptr};
  if (!TakeScratch(rt, scratch)) return false;
  c.a = scratch.a;
  c.scales = scratch.scales;
  c.work = scratch.work;
  const int64_t token_blocks = CeilDiv(p.tokens, c.token_block);
  for (int64_t e = 0; e < p.batch; ++e) {
    const uint16_t* x = static_cast<const uint16_t*>(p.dense) + e * p.dense_stride;
    Widen(Offset(p.scales, e * p.scales_stride, p.dtype), p.dtype, groups * p.n_out,
          scratch.scales);
    c.qweight = p.qweight + e * p.weight_stride;
    c.positions = kSparse ? p.positions + e * p.positions_stride : nullptr;
    c.out = static_cast<uint16_t*>(p.out) + e * p.tokens * p.n_out;
    RunParallel(rt, token_tiles, PackXJob{&c, x, scratch.a});
    RunParallel(rt, token_blocks * c.panel_groups, TileProductJob<kSparse>{&c});
  }
  return true;
}

// Products by W: the dense form at a few tokens with a token per register
// (int4_pairs.h: bf16 on vdpbf16ps), else bf16 from kTileMinTokens on the
// tiles, the rest as in the AVX-512 unit (streaming, or f32 panels).
template <bool kSparse>
bool MatmulWithTiles(const Int4Problem& p, const Runtime& rt) {
  if (!kSparse && UsePairs(p)) return RunPairs(p, rt);
  const int64_t min_tokens = kSparse && p.lines ? kNmLinesTileMinTokens : kTileMinTokens;
  if (p.dtype == Dtype::kBF16 && p.tokens >= min_tokens && p.k > 0) {
    return RunTiles<kSparse>(p, rt);
  }
  return Run<kSparse, false>(p, rt);
}

}  // namespace int4
}  // namespace JAXSPARSE_INT4_ISA
}  // namespace cpu
}  // namespace jaxsparse

#include "cpu/int4/int4_a8_tiles.h"

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_INT4_ISA {
namespace int4 {

inline Int4KernelTable MakeInt4TableWithTiles() {
  Int4KernelTable table = MakeInt4Table();
  table.matmul = &MatmulWithTiles<false>;
  table.nm_matmul = &MatmulWithTiles<true>;
  table.a8_matmul = &A8MatmulWithTiles;
  return table;
}

}  // namespace int4
}  // namespace JAXSPARSE_INT4_ISA
}  // namespace cpu
}  // namespace jaxsparse
