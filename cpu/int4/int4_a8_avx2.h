// The int8-activation product (int4_a8_matmul, dense canonical form) at many
// tokens in the avx2 unit, which has neither AVX512-VNNI's vpdpbusd nor AMX
// for the engine's int8 tiles (int4_a8_tiles.h). The streaming kernel
// (ForwardA8Avx2) decodes each weight quad once per 4 tokens: 7 operations
// per 8 outputs' quad shared by only 4 tokens' 3 (vpmaddubsw, vpmaddwd,
// vpaddd), so from about a dozen tokens the decode and the per-quad widening
// bound it. Here a task decodes a panel of 16 outputs once for a block of up
// to 256 tokens into a u8 layout (per quad of inputs, two ymm of 8 outputs'
// dwords, bytes (u0, u2, u1, u3) as A8Dword; zeros past N), then multiplies
// 4 tokens by the panel at a time, the panel's 16 * K bytes staying in L1
// (24 KB at K = 1536) or streaming from L2 in order.
//
// The arithmetic is the streaming kernel's, exactly: per quad vpmaddubsw of
// the unsigned nibbles (0..15) by the token's broadcast s8 codes gives two
// s16 pair sums per output, each |.| <= 2 * 15 * 127 = 3810; 8 quads' of them
// add in s16 with vpaddw (8 * 3810 = 30480 < 32767: exact), then one
// vpmaddwd by ones widens and sums a lane pair into int32. The group's int32
// sum minus 8 sum xq is converted, times the token's scale, and fused into the
// output with the weight's scale (fma(s_w, f32(dot) * s_x, y), groups in
// order from y = 0): the same operations in the same order as
// ForwardA8Slice, so the results are bit-identical.
//
// Why vpaddw before widening: vpmaddubsw and vpmaddwd both issue on the
// vector multiply pipes (Intel without VNNI: p0 and p1, 5 cycles of latency;
// Zen 3: two of its four vector pipes), of which there are fewer than vector
// adders. Widening every quad (the streaming kernel's order) spends two
// multiply-pipe operations per 32 multiply-adds; summing 8 quads in s16 first
// on the adders spends 1 + 1/8, close to half, and 2 vpmaddubsw a cycle are
// 64 multiply-adds against the f32 FMA's 16 (2 pipes x 8 lanes).
//
// Registers: 4 tokens x 2 vectors of s16 sums (8), the 2 weight vectors, the
// broadcast codes and vpmaddubsw's product: 12 of the 16 ymm in the inner
// loop; the 8 int32 group sums wait outside it (the compiler keeps some in
// registers, spills the rest once per 8 quads). Timed against 3, 5 and 6
// tokens in one process (Zen 3, MiniLM's three shapes at 256 and 1440
// tokens), as time over 4 tokens' time: 3 tokens 1.16-1.31x, 5 0.89-1.08x
// (no clear winner; 4 divides the block), 6 1.09-1.24x (12 s16 sums, 2
// weights, broadcast and product are 17 registers: one sum spills in the
// inner loop).
//
// Groups must be whole chunks of 8 quads (32 inputs), or one group per
// column (K any multiple of 4: the last chunk is short); other groups stream,
// as on the VNNI tiles. Included by int4_kernels_avx2.cc after
// int4_kernels.h (and int4_avx2.h, whose A8Dword and LoadScales it uses).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_INT4_ISA {
namespace int4 {

constexpr int kA8Vecs = 2;                         // 8-output vectors per panel
constexpr int64_t kA8PanelWidth = 8 * kA8Vecs;     // outputs per task
constexpr int kA8Tokens = 4;                       // tokens per micro tile
constexpr int kA8ChunkQuads = 8;                   // quads summed in s16 before widening
constexpr int64_t kA8BlockTokens = 256;            // tokens per task
// From this many tokens the panels beat the streaming kernel: at 12 tokens by
// 1.04-1.28x at MiniLM's shapes on Zen 3, at 8 a tie (0.92-1.02x), at 4 the
// streaming kernel's single token block wins (0.76-0.89x) (docs/cpu_speed_notes.md,
// "int4 W4A8 on AVX2").
constexpr int64_t kA8PanelMinTokens = 12;

inline bool UseA8Panels(const Int4Problem& p) {
  return p.tokens >= kA8PanelMinTokens && p.k > 0 && p.n_out > 0 &&
         (p.group % (4 * kA8ChunkQuads) == 0 || p.group == p.k);
}

struct A8PanelCtx {
  const Int4Problem* p;
  const int8_t* xq;        // [T, K], quads in the (0, 2, 1, 3) order
  const float* scales;     // [G, N], f32
  const float* x_scales;   // [T, G]
  const int32_t* x_sums;   // [T, G]
  const uint8_t* qweight;  // [K/2, N]
  void* out;               // [T, N] in the problem's dtype
  int64_t panels;          // ceil(N / 16)
  uint8_t* work;           // per worker: a panel, K/4 quads x 64 bytes
  int64_t panel_bytes;
};

// The 16 outputs from o0 for all of K: quad q's two vectors at
// panel + 64 q, zeros past N.
inline void DecodeA8PanelAvx2(const A8PanelCtx& c, int64_t o0, uint8_t* panel) {
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out, quads = p.k / 4;
  int counts[kA8Vecs];
  for (int v = 0; v < kA8Vecs; ++v) counts[v] = VecCount(n - o0, v);
  for (int64_t q = 0; q < quads; ++q) {
    const uint8_t* row = c.qweight + 2 * q * n + o0;
    __m256i* dst = reinterpret_cast<__m256i*>(panel + q * 32 * kA8Vecs);
    for (int v = 0; v < kA8Vecs; ++v) {
      const __m256i d = counts[v] == 8   ? A8Dword<true>(row + 8 * v, row + n + 8 * v, 8)
                        : counts[v] > 0 ? A8Dword<false>(row + 8 * v, row + n + 8 * v, counts[v])
                                        : _mm256_setzero_si256();
      _mm256_store_si256(dst + v, d);
    }
  }
}

// y[kT][16] for tokens t0 .. t0 + kT - 1 by the panel of outputs from o0.
template <int kT>
inline void A8PanelTokens(const A8PanelCtx& c, const uint8_t* panel, int64_t o0, int64_t t0,
                          float* y) {
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out, k = p.k, groups = k / p.group, group_quads = p.group / 4;
  const int8_t* x = c.xq + t0 * k;
  alignas(32) static const int16_t kOnes[16] = {1, 1, 1, 1, 1, 1, 1, 1,
                                                 1, 1, 1, 1, 1, 1, 1, 1};
  int counts[kA8Vecs];
  for (int v = 0; v < kA8Vecs; ++v) counts[v] = VecCount(n - o0, v);
  for (int i = 0; i < kT * kA8PanelWidth; i += 8) _mm256_store_ps(y + i, _mm256_setzero_ps());
  for (int64_t g = 0; g < groups; ++g) {
    __m256i acc[kT][kA8Vecs];
    for (int t = 0; t < kT; ++t)
      for (int v = 0; v < kA8Vecs; ++v) acc[t][v] = _mm256_setzero_si256();
    const int64_t q_end = (g + 1) * group_quads;
    for (int64_t q0 = g * group_quads; q0 < q_end; q0 += kA8ChunkQuads) {
      const int64_t q1 = std::min<int64_t>(q0 + kA8ChunkQuads, q_end);
      __m256i part[kT][kA8Vecs];
      for (int t = 0; t < kT; ++t)
        for (int v = 0; v < kA8Vecs; ++v) part[t][v] = _mm256_setzero_si256();
      for (int64_t q = q0; q < q1; ++q) {
        const __m256i* wq = reinterpret_cast<const __m256i*>(panel + q * 32 * kA8Vecs);
        __m256i w[kA8Vecs];
        for (int v = 0; v < kA8Vecs; ++v) w[v] = _mm256_load_si256(wq + v);
        for (int t = 0; t < kT; ++t) {
          int32_t quad;
          std::memcpy(&quad, x + t * k + 4 * q, sizeof quad);
          const __m256i xb = _mm256_set1_epi32(quad);
          for (int v = 0; v < kA8Vecs; ++v) {
            part[t][v] = _mm256_add_epi16(part[t][v], _mm256_maddubs_epi16(w[v], xb));
          }
        }
      }
      const __m256i ones = _mm256_load_si256(reinterpret_cast<const __m256i*>(kOnes));
      for (int t = 0; t < kT; ++t)
        for (int v = 0; v < kA8Vecs; ++v)
          acc[t][v] = _mm256_add_epi32(acc[t][v], _mm256_madd_epi16(part[t][v], ones));
    }
    // ForwardA8Slice's epilogue, operation for operation.
    for (int v = 0; v < kA8Vecs; ++v) {
      const __m256 sw = LoadScales(c.scales + g * n + o0 + 8 * v, counts[v]);
      for (int t = 0; t < kT; ++t) {
        const int64_t tg = (t0 + t) * groups + g;
        const __m256i dot = _mm256_sub_epi32(acc[t][v], _mm256_set1_epi32(8 * c.x_sums[tg]));
        const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(c.x_scales[tg]));
        float* yv = y + t * kA8PanelWidth + 8 * v;
        _mm256_store_ps(yv, _mm256_fmadd_ps(sw, f, _mm256_load_ps(yv)));
      }
    }
  }
}

// One task: a block of up to 256 tokens by a panel of 16 outputs.
inline void A8PanelTask(void* ctx, int64_t task, int worker) {
  const A8PanelCtx& c = *static_cast<const A8PanelCtx*>(ctx);
  const Int4Problem& p = *c.p;
  const int64_t t0 = task / c.panels * kA8BlockTokens;
  const int64_t o0 = task % c.panels * kA8PanelWidth;
  const int64_t live = std::min(kA8BlockTokens, p.tokens - t0);
  const int64_t on = std::min(kA8PanelWidth, p.n_out - o0);
  uint8_t* panel = c.work + worker * c.panel_bytes;
  DecodeA8PanelAvx2(c, o0, panel);
  alignas(32) float y[kA8Tokens * kA8PanelWidth];
  for (int64_t t = t0; t < t0 + live; t += kA8Tokens) {
    const int nt = static_cast<int>(std::min<int64_t>(kA8Tokens, t0 + live - t));
    switch (nt) {
      case 1: A8PanelTokens<1>(c, panel, o0, t, y); break;
      case 2: A8PanelTokens<2>(c, panel, o0, t, y); break;
      case 3: A8PanelTokens<3>(c, panel, o0, t, y); break;
      default: A8PanelTokens<kA8Tokens>(c, panel, o0, t, y); break;
    }
    for (int r = 0; r < nt; ++r) {
      Store(c.out, p.dtype, (t + r) * p.n_out + o0, y + r * kA8PanelWidth, on);
    }
  }
}

// y = x @ W on int8 activations, many tokens: per batch entry the scales
// widened to f32, then tasks of (token block, panel) in block-major order, so
// that the two workers' panels share the block's codes in L2.
inline bool RunA8Panels(const Int4Problem& p, const Runtime& rt) {
  const int64_t groups = p.k / p.group;
  const int64_t quads = p.k / 4;
  const int64_t panel_bytes = (quads * 32 * kA8Vecs + 63) / 64 * 64;
  const int64_t workers = std::max(rt.num_workers, 1);
  const int64_t scale_bytes = (groups * p.n_out * 4 + 63) / 64 * 64;
  uint8_t* base = static_cast<uint8_t*>(
      rt.scratch(rt.scratch_owner, static_cast<size_t>(scale_bytes + workers * panel_bytes)));
  if (base == nullptr) return false;
  float* scales = reinterpret_cast<float*>(base);
  A8PanelCtx c{};
  c.p = &p;
  c.scales = scales;
  c.panels = (p.n_out + kA8PanelWidth - 1) / kA8PanelWidth;
  c.work = base + scale_bytes;
  c.panel_bytes = panel_bytes;
  const int64_t token_blocks = (p.tokens + kA8BlockTokens - 1) / kA8BlockTokens;
  for (int64_t b = 0; b < p.batch; ++b) {
    Widen(Offset(p.scales, b * p.scales_stride, p.dtype), p.dtype, groups * p.n_out, scales);
    c.xq = static_cast<const int8_t*>(p.dense) + b * p.dense_stride;
    c.x_scales = p.x_scales + b * p.x_group_stride;
    c.x_sums = p.x_sums + b * p.x_group_stride;
    c.qweight = p.qweight + b * p.weight_stride;
    c.out = const_cast<void*>(Offset(p.out, b * p.tokens * p.n_out, p.dtype));
    rt.parallel_for(rt.pool, token_blocks * c.panels, &A8PanelTask, &c);
  }
  return true;
}

// The int8-activation product in the avx2 unit: the panels from
// kA8PanelMinTokens where the groups are whole chunks, else streaming.
inline bool A8MatmulAvx2(const Int4Problem& p, const Runtime& rt) {
  if (UseA8Panels(p)) return RunA8Panels(p, rt);
  return RunA8(p, rt);
}

}  // namespace int4

inline Int4KernelTable MakeInt4TableAvx2() {
  Int4KernelTable table = MakeInt4Table();
  table.a8_matmul = &int4::A8MatmulAvx2;
  return table;
}

}  // namespace JAXSPARSE_INT4_ISA
}  // namespace cpu
}  // namespace jaxsparse
