// The f32 2:4 forward at many tokens (AVX-512 units): the weight decoded, a
// panel of 64 outputs at a time, into a dense f32 panel [K][64] with its
// zeros, and multiplied on the panel micro-kernel the int4 panels use
// (cpu/common/panel_avx512.h).
//
// Why dense speed here: the token-vectorised kernel (nm_kernels.h) does half
// the FMAs but issues a load per FMA (its x operand sits at a data-dependent
// address), so loads, not FMAs, set its pace; XLA's f32 dot runs its FMAs at
// the pipes' rate (a broadcast and a quarter of a panel load per FMA). At
// MiniLM's shapes and 1440 tokens on the 2-core Zen 5 the kernel tied XLA's
// dot alone and lost in the encoder (1.19-1.42 ms against 0.87-0.92 ms per
// 384 x 384 product); the panels ran them in 0.85-0.90 ms
// (docs/cpu_speed_notes.md, "MiniLM on Zen 5, second round").
//
// The decoder takes 16 outputs x 16 kept entries (8 groups) at a time: the
// values and the positions are transposed in registers so that a vector holds
// one entry of 16 outputs, then each of the 4 rows of a group is the sum of
// its two entries where their position names that row (a compare and a
// masked add: positions >= 4, the padding and unvalidated garbage, name no
// row and drop out; a position named twice adds up, as the reference does).
// Included by nm_rowdot_avx512.h in the AVX-512 units.
#ifndef JAXSPARSE_CPU_NM_NM_PANEL_AVX512_H_
#define JAXSPARSE_CPU_NM_NM_PANEL_AVX512_H_
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "cpu/common/kernel_util.h"
#include "cpu/common/panel_avx512.h"

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_NM_ISA {

struct NmPanels {
  // Where the panels run: from kMinTokens tokens, when K or N is at most
  // kMaxNarrowSide. Measured on the 2-core Zen 5 (jax 0.12.1, each path in its
  // own process against XLA's f32 dot): in MiniLM at batch 32 (1440 tokens,
  // 384 x 384 / 1536 products) the encoder ran 0.95-1.00x dense with the
  // panels against 0.85-0.97x without (five runs each); alone, at 768 x 3072,
  // 3072 x 768, 1024 x 1024, 2048 x 2048 and 4096 x 4096 the kernel stayed
  // ahead at 1024-2048 tokens (1.07-1.29x against the panels' 0.99-1.12x),
  // at 384 x 1536 and 1536 x 384 and 2048 tokens the panels led (0.94-1.02x
  // against 0.86-0.97x), and at 512 and fewer tokens the kernel everywhere.
  static constexpr int64_t kMinTokens = 1024;
  static constexpr int64_t kMaxNarrowSide = 512;
  // Tokens per task at most where K takes several chunks (the sums wait
  // between chunks in 192 KB of L2 per worker).
  static constexpr int64_t kMaxChunkedTokens = 768;

  static bool Applies(const NmProblem& p) {
    return p.dtype == NmDtype::kF32 && p.n == 2 && p.m == 4 && p.tokens >= kMinTokens &&
           p.k > 0 && p.n_out > 0 && std::min(p.k, p.n_out) <= kMaxNarrowSide;
  }

  const NmProblem& p;
  const Runtime& rt;
  int64_t kc = 0, task_tokens = 0, token_blocks = 0, out_blocks = 0, work_floats = 0;
  float* work = nullptr;
  const float* x = nullptr;
  const float* values = nullptr;
  const uint8_t* indices = nullptr;
  float* y = nullptr;

  NmPanels(const NmProblem& problem, const Runtime& runtime) : p(problem), rt(runtime) {}

  void Layout(Carver& c) { work = c.Take<float>(std::max(rt.num_workers, 1) * work_floats); }

  bool Compute() {
    kc = (p.k + 3) / 4 * 2;
    // Each task decodes its panel once, reading the panel's values and
    // positions from memory at 16 rows side by side (their misses cost about
    // as much as the rest of the decoding): so as few token blocks as leave
    // every worker 4 tasks. At 384 tokens a task (4 blocks at 1440 tokens),
    // 2:4 at 384 x 1536 ran 0.95x XLA's dot where int4's panels ran 1.00x; with
    // one block 0.98x as int4's.
    const int64_t workers = std::max(rt.num_workers, 1);
    out_blocks = (p.n_out + kPanelOut - 1) / kPanelOut;
    token_blocks = std::min(p.tokens, (4 * workers + out_blocks - 1) / out_blocks);
    if (PanelChunks(p.k) > 1) {
      token_blocks = std::max(token_blocks, (p.tokens + kMaxChunkedTokens - 1) / kMaxChunkedTokens);
    }
    // Whole micro-tiles of 6 tokens per task, but the last.
    task_tokens = ((p.tokens + token_blocks - 1) / token_blocks + kMicroRows - 1) / kMicroRows *
                  kMicroRows;
    token_blocks = (p.tokens + task_tokens - 1) / task_tokens;
    // Whole 64-byte lines per worker.
    work_floats = PanelWorkFloats(p.k, task_tokens) + 15 & ~int64_t{15};
    if (!TakeScratch(rt, *this)) return false;
    for (int64_t b = 0; b < p.batch; ++b) {
      x = static_cast<const float*>(p.x) + b * p.x_stride;
      values = static_cast<const float*>(p.values) + b * p.values_stride;
      indices = p.indices + b * p.indices_stride;
      y = static_cast<float*>(p.out) + b * p.tokens * p.n_out;
      RunParallel(rt, out_blocks * token_blocks, *this);
    }
    return true;
  }

  // Task (panel, token block), panels fastest: the two workers share each
  // token block's rows of x in L3.
  void Run(int64_t task, int worker) const {
    const int64_t o0 = (task % out_blocks) * kPanelOut;
    const int64_t t0 = (task / out_blocks) * task_tokens;
    const int64_t on = std::min(kPanelOut, p.n_out - o0);
    const int64_t nt = std::min(task_tokens, p.tokens - t0);
    PanelProduct(x, p.k, p.k, t0, nt, o0, on, y, PanelDtype::kF32, p.n_out,
                 work + worker * work_floats,
                 [&](int64_t k0, int64_t kb, float* w) { Decode(k0, kb, o0, on, w); });
  }

  // w[i][0 .. 64) = W[k0 + i, o0 .. o0 + 64) for the whole groups of inputs
  // k0 .. k0 + kb (k0 a multiple of 4); outputs past `on` are zero.
  void Decode(int64_t k0, int64_t kb, int64_t o0, int64_t on, float* w) const {
    const int64_t g0 = k0 / 4, groups = (kb + 3) / 4;
    for (int v = 0; v < 4; ++v) {
      const int64_t rows = std::min<int64_t>(16, on - 16 * v);
      for (int64_t g = 0; g < groups; g += 8) {
        const int64_t gn = std::min<int64_t>(8, groups - g);
        if (rows <= 0) {
          for (int64_t i = 0; i < 4 * gn; ++i) {
            _mm512_store_ps(w + (4 * g + i) * kPanelOut + 16 * v, _mm512_setzero_ps());
          }
          continue;
        }
        DecodeBlock(o0 + 16 * v, rows, 2 * (g0 + g), gn, w + 4 * g * kPanelOut + 16 * v);
      }
    }
  }

  // The rows of gn <= 8 groups of 16 outputs (`rows` of them exist) from
  // entry e0 on, into w (rows kPanelOut floats apart).
  void DecodeBlock(int64_t o, int64_t rows, int64_t e0, int64_t gn, float* w) const {
    const __mmask16 entries = LaneMask(2 * gn);
    __m512 val[16], pos[16];
    for (int i = 0; i < 16; ++i) {
      if (i < rows) {
        val[i] = _mm512_maskz_loadu_ps(entries, values + (o + i) * kc + e0);
        // Positions as 32-bit lanes, transposed with the values.
        pos[i] = _mm512_castsi512_ps(
            _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(entries, indices + (o + i) * kc + e0)));
      } else {
        val[i] = _mm512_setzero_ps();
        pos[i] = _mm512_setzero_ps();
      }
    }
    Transpose16x16Floats(val);
    Transpose16x16Floats(pos);
    for (int64_t j = 0; j < gn; ++j) {
      const __m512i p0 = _mm512_castps_si512(pos[2 * j]), p1 = _mm512_castps_si512(pos[2 * j + 1]);
      for (int q = 0; q < 4; ++q) {
        const __m512i row = _mm512_set1_epi32(q);
        const __m512 first = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(p0, row), val[2 * j]);
        const __m512 both = _mm512_mask_add_ps(first, _mm512_cmpeq_epi32_mask(p1, row), first,
                                               val[2 * j + 1]);
        _mm512_store_ps(w + (4 * j + q) * kPanelOut, both);
      }
    }
  }
};

}  // namespace JAXSPARSE_NM_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_NM_NM_PANEL_AVX512_H_
