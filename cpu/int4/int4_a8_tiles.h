// The int8-activation product (int4_a8_matmul, dense canonical form) at many
// tokens on the engine's int8 tiles (cpu/engine/int8_tiles.h): AMX tdpbssd
// where the unit is built with the AMX flags, vpdpbusd in the avx512bf16 unit
// (AMD Zen 4 and 5). The streaming kernel (ForwardA8Tokens) decodes each
// weight quad once per 4 tokens and feeds one vpdpbusd per token; here a
// task decodes its panel of 32 outputs once for a block of up to 256 tokens
// into B tiles, and the tiles multiply 16-token tiles of the activation codes
// against it, 2 x 2 tiles at a time.
//
// The sums are exact int32 per scale group (the tiles' k runs over one group's
// k steps, then C is scaled into f32 outputs): y += s_w s_x (sum u xq -
// 8 sum xq), as the streaming kernel. A B tile's quad row is A8Dword's dword,
// the nibbles u (0..15, as s8) in the order (0, 2, 1, 3) that xq's quads are
// stored in, so the A tiles are xq's rows as they are (int8_tiles::PackA).
// Groups must be whole k steps of 64 inputs (or one group per column, K
// padded with zeros); other groups stream.
// Included by int4_tiles.h in the units with AVX512-VNNI (avx512bf16, amx).
#include "cpu/engine/int8_tiles.h"

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_INT4_ISA {
namespace int4 {

namespace i8 = int8_tiles;

constexpr int64_t kA8TileMinTokens = 16;              // one A tile
constexpr int64_t kA8PanelOut = 2 * i8::kTileRows;    // two B tiles: the 2 x 2 blocking
constexpr int64_t kA8TokenBlock = 256;                // tokens per task

inline bool UseA8Tiles(const Int4Problem& p) {
  return p.tokens >= kA8TileMinTokens && p.k > 0 && p.n_out > 0 &&
         (p.group % i8::kStepBytes == 0 || p.group == p.k);
}

struct A8TileCtx {
  const Int4Problem* p;
  const int8_t* a;         // xq as A tiles [token tile][step][16][64], all of K
  const float* scales;     // [G, N], f32
  const float* x_scales;   // [T, G]
  const int32_t* x_sums;   // [T, G]
  const uint8_t* qweight;  // [K/2, N]
  void* out;               // [T, N] in the problem's dtype
  int64_t steps;           // k steps of K
  int64_t group_steps;     // k steps per scale group
  int64_t panels;          // ceil(N / 32)
  int8_t* b;               // per worker: a panel's B tiles [2][steps][1 KB]
  int32_t* sums;           // per worker: their column sums per group [G][32]
};

// The B tiles of the 32 outputs from o0 for all of K, and per scale group the
// column sums of its steps (what the vpdpbusd tiles subtract, int8_tiles.h).
// Quads past K and outputs past N are zero.
inline void DecodeA8Panel(const A8TileCtx& c, int64_t o0, int8_t* b, int32_t* sums) {
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out, quads = p.k / 4, groups = p.k / p.group;
  const __m512i ones = _mm512_set1_epi8(1);
  // The first half's walk brings in the panel's lines (the second half's
  // bytes share them): its first rows at once, then kPrefetchRows ahead.
  const int64_t rows = p.k / 2, width = std::min<int64_t>(kA8PanelOut, n - o0);
  PrefetchSpans(c.qweight + o0, n, std::min(kPrefetchRows, rows), width);
  PrefetchSpans(c.scales + o0, n * 4, groups, width * 4);
  for (int64_t j = 0; j < 2; ++j) {
    const int64_t o = o0 + 16 * j;
    const __mmask16 mask = o < n ? LaneMask(n - o) : 0;
    for (int64_t g = 0; g < groups; ++g) {
      __m512i sum = _mm512_setzero_si512();
      for (int64_t s = g * c.group_steps; s < (g + 1) * c.group_steps; ++s) {
        int8_t* tile = b + (j * c.steps + s) * i8::kTileBytes;
        const int64_t ahead = 2 * s * i8::kTileRows + kPrefetchRows;
        if (j == 0 && ahead < rows) {  // The step's 32 rows, kPrefetchRows ahead.
          PrefetchSpans(c.qweight + ahead * n + o0, n,
                        std::min<int64_t>(2 * i8::kTileRows, rows - ahead), width);
        }
        for (int64_t r = 0; r < i8::kTileRows; ++r) {
          const int64_t q = s * i8::kTileRows + r;
          const __m512i w = q < quads && mask != 0
                                ? A8Dword(c.qweight + 2 * q * n + o,
                                          c.qweight + (2 * q + 1) * n + o, mask)
                                : _mm512_setzero_si512();
          _mm512_store_si512(tile + r * i8::kStepBytes, w);
          sum = _mm512_dpbusd_epi32(sum, ones, w);  // the quad's 4 codes added
        }
      }
      _mm512_storeu_si512(sums + g * kA8PanelOut + 16 * j, sum);
    }
  }
}

// y[rows of the token tiles][32] += s_w s_x (C - 8 sum xq) for scale group g.
inline void ScaleGroupInto(const A8TileCtx& c, int64_t g, int64_t t_first, int64_t rows,
                           int64_t o0, const int32_t* sums_c, float* y) {
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out, groups = p.k / p.group;
  __m512 sw[2];
  for (int v = 0; v < 2; ++v) {
    const int64_t o = o0 + 16 * v;
    sw[v] = o < n ? _mm512_maskz_loadu_ps(LaneMask(n - o), c.scales + g * n + o)
                  : _mm512_setzero_ps();
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t tg = (t_first + r) * groups + g;
    const __m512i offset = _mm512_set1_epi32(8 * c.x_sums[tg]);
    const __m512 sx = _mm512_set1_ps(c.x_scales[tg]);
    for (int v = 0; v < 2; ++v) {
      const __m512i dot = _mm512_sub_epi32(_mm512_load_si512(sums_c + r * kA8PanelOut + 16 * v),
                                           offset);
      float* yr = y + r * kA8PanelOut + 16 * v;
      const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), sx);
      _mm512_store_ps(yr, _mm512_fmadd_ps(sw[v], f, _mm512_load_ps(yr)));
    }
  }
}

// Packs token tile `task` of xq into A tiles.
struct PackA8Job {
  const A8TileCtx* c;
  const int8_t* xq;
  int8_t* a;

  void Run(int64_t task, int /*worker*/) const {
    const Int4Problem& p = *c->p;
    const int64_t t0 = task * i8::kTileRows;
    i8::PackA(xq + t0 * p.k, p.k, std::min(i8::kTileRows, p.tokens - t0), p.k, 1,
              a + task * c->steps * i8::kTileBytes);
  }
};

// One task: a block of up to kA8TokenBlock tokens by a panel of 32 outputs,
// two token tiles at a time, every scale group of K for each pair.
struct A8TileJob {
  const A8TileCtx* c;

  void Run(int64_t task, int worker) const {
    const Int4Problem& p = *c->p;
    const int64_t t0 = task / c->panels * kA8TokenBlock;
    const int64_t o0 = task % c->panels * kA8PanelOut;
    const int64_t live = std::min(kA8TokenBlock, p.tokens - t0);
    const int64_t on = std::min(kA8PanelOut, p.n_out - o0);
    const int64_t groups = p.k / p.group, tile_stride = c->steps * i8::kTileBytes;
    int8_t* b = c->b + worker * 2 * tile_stride;
    int32_t* sums = c->sums + worker * groups * kA8PanelOut;
    DecodeA8Panel(*c, o0, b, sums);
    alignas(64) int32_t sums_c[2 * i8::kTileRows * kA8PanelOut];
    alignas(64) float y[2 * i8::kTileRows * kA8PanelOut];
    i8::ConfigureTiles();
    for (int64_t t = 0; t < live; t += 2 * i8::kTileRows) {
      const bool two = t + i8::kTileRows < live;
      const int64_t rows = std::min(2 * i8::kTileRows, live - t);
      std::fill(y, y + rows * kA8PanelOut, 0.0f);
      const int8_t* a = c->a + (t0 + t) / i8::kTileRows * tile_stride;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t at = g * c->group_steps * i8::kTileBytes;
        if (two) {
          i8::TileBlock<2, 2, false>(a + at, tile_stride, b + at, tile_stride, c->group_steps,
                                     sums + g * kA8PanelOut, sums_c, kA8PanelOut);
        } else {
          i8::TileBlock<1, 2, false>(a + at, tile_stride, b + at, tile_stride, c->group_steps,
                                     sums + g * kA8PanelOut, sums_c, kA8PanelOut);
        }
        ScaleGroupInto(*c, g, t0 + t, rows, o0, sums_c, y);
      }
      for (int64_t r = 0; r < rows; ++r) {
        StorePanelRow(c->out, p.dtype, (t0 + t + r) * p.n_out + o0, y + r * kA8PanelOut, on);
      }
    }
    i8::ReleaseTiles();
  }
};

struct A8TileScratch {
  int64_t a_bytes, scale_floats, workers, b_bytes, sum_ints;
  int8_t* a;
  float* scales;
  int8_t* b;
  int32_t* sums;

  template <class Carver>
  void Layout(Carver& carver) {
    a = carver.template Take<int8_t>(a_bytes);
    scales = carver.template Take<float>(scale_floats);
    b = carver.template Take<int8_t>(workers * b_bytes);
    sums = carver.template Take<int32_t>(workers * sum_ints);
  }
};

// y = x @ W on int8 activations, many tokens: per batch entry xq packed once
// into A tiles (in parallel by token tile), the scales widened to f32, then
// tasks of (token block, panel).
inline bool RunA8Tiles(const Int4Problem& p, const Runtime& rt) {
  A8TileCtx c{};
  c.p = &p;
  c.steps = i8::KSteps(p.k);
  c.group_steps = p.group == p.k ? c.steps : p.group / i8::kStepBytes;
  c.panels = CeilDiv(p.n_out, kA8PanelOut);
  const int64_t groups = p.k / p.group, token_tiles = i8::Tiles(p.tokens);
  A8TileScratch scratch{token_tiles * c.steps * i8::kTileBytes, groups * p.n_out,
                        std::max(rt.num_workers, 1), 2 * c.steps * i8::kTileBytes,
                        groups * kA8PanelOut, nullptr, nullptr, nullptr, nullptr};
  if (!TakeScratch(rt, scratch)) return false;
  c.a = scratch.a;
  c.scales = scratch.scales;
  c.b = scratch.b;
  c.sums = scratch.sums;
  const int64_t token_blocks = CeilDiv(p.tokens, kA8TokenBlock);
  for (int64_t e = 0; e < p.batch; ++e) {
    const int8_t* xq = static_cast<const int8_t*>(p.dense) + e * p.dense_stride;
    Widen(Offset(p.scales, e * p.scales_stride, p.dtype), p.dtype, groups * p.n_out,
          scratch.scales);
    c.x_scales = p.x_scales + e * p.x_group_stride;
    c.x_sums = p.x_sums + e * p.x_group_stride;
    c.qweight = p.qweight + e * p.weight_stride;
    c.out = const_cast<void*>(Offset(p.out, e * p.tokens * p.n_out, p.dtype));
    RunParallel(rt, token_tiles, PackA8Job{&c, xq, scratch.a});
    RunParallel(rt, token_blocks * c.panels, A8TileJob{&c});
  }
  return true;
}

// The int8-activation product: the tiles from kA8TileMinTokens where the
// groups are whole k steps, else the streaming kernel.
inline bool A8MatmulWithTiles(const Int4Problem& p, const Runtime& rt) {
  if (UseA8Tiles(p)) return RunA8Tiles(p, rt);
  return RunA8(p, rt);
}

}  // namespace int4
}  // namespace JAXSPARSE_INT4_ISA
}  // namespace cpu
}  // namespace jaxsparse
