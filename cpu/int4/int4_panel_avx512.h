// The int4 products by W at many tokens (AVX-512 units), on the shared dense
// panel micro-kernel (cpu/common/panel_avx512.h; FORMATS.md section 4): a task
// owns a panel of 64 outputs and a block of tokens. It dequantises the panel
// over all of K at once (K past 2048 in chunks) into an f32 buffer [K][64]
// (96 KB at K = 384, 384 KB at 1536, in L2 while every token of the block
// reads it), and each tile of 6 tokens sums over it in registers and stores
// once into the result. The decoding, which bounds the few-token kernels (each
// decoded byte serves 4 tokens there), is spread over up to kPanelTokens
// tokens: at 128 tokens and more it is a few percent of the FMAs.
// The 2:4 form is decoded into the dense panel with its zeros, which the
// micro-kernel multiplies: dense speed, not sparse speed; only bf16 in the
// avx512 unit comes here (f32 / f16 repack into lines per task, UseNmRepack).
// Included by int4_kernels.h (after Ctx) in the AVX-512 units.
#include <immintrin.h>

#include "cpu/common/panel_avx512.h"

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_INT4_ISA {
namespace int4 {

using JAXSPARSE_AVX512_NAMESPACE::kPanelOut;
using JAXSPARSE_AVX512_NAMESPACE::PanelDtype;
using JAXSPARSE_AVX512_NAMESPACE::PanelMasks;
using JAXSPARSE_AVX512_NAMESPACE::StoreLanes;

constexpr int64_t kPanelTokens = 384;  // tokens per task: the decoding is ~1% of the FMAs
// From this many tokens on, products by W take the panels (below, the
// streaming kernels, which read each weight byte once per 4 tokens and never
// write a decoded copy); where int4_pairs.h takes a product (the dense form in
// f32 up to 48 tokens), it runs first, and the 2:4 lines never take them
// (int4_kernels.h's Run).
constexpr int64_t kPanelMinTokens = 16;

// Floats of per-worker scratch: the decoded chunk, and the sums between chunks.
inline int64_t PanelWorkFloats(const Int4Problem& p) {
  return JAXSPARSE_AVX512_NAMESPACE::PanelWorkFloats(p.k, kPanelTokens);
}

inline PanelDtype PanelDtypeOf(Dtype dtype) {
  return dtype == Dtype::kF32    ? PanelDtype::kF32
         : dtype == Dtype::kBF16 ? PanelDtype::kBF16
                                 : PanelDtype::kF16;
}

inline bool UsePanels(const Int4Problem& p) { return p.tokens >= kPanelMinTokens; }

// w[i][0 .. 64) = W[k0 + i, o0 .. o0 + 64) for i < kb, dense form: per byte
// row (inputs k0 + i and k0 + i + 1, one group: groups are even) 4 loads of
// 16 bytes (or 4 shifts of one line, RowBytes), the nibbles split and
// converted in registers, times the scales.
inline void DecodeDensePanel(const Ctx& c, int64_t k0, int64_t kb, int64_t o0, int64_t on,
                             float* w) {
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out;
  __mmask16 masks[4];
  PanelMasks(on, masks);
  const __m512i low = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
  for (int64_t i = 0; i < kb; i += 2) {
    const float* scales = c.scales + (k0 + i) / p.group * n + o0;
    for (int v = 0; v < 4; ++v) {
      const __m512 s = _mm512_maskz_loadu_ps(masks[v], scales + 16 * v);
      const __m512i d = RowBytes(p, c.qweight, (k0 + i) >> 1, o0 + 16 * v, masks[v]);
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(d, low), eight));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(d, 4), eight));
      _mm512_store_ps(w + i * kPanelOut + 16 * v, _mm512_mul_ps(lo, s));
      _mm512_store_ps(w + (i + 1) * kPanelOut + 16 * v, _mm512_mul_ps(hi, s));
    }
  }
}

// The same for the 2:4 form: per group of 4 inputs, each input's row is the
// kept value whose position it is, else zero (SpreadGroup).
inline void DecodeSparsePanel(const Ctx& c, int64_t k0, int64_t kb, int64_t o0, int64_t on,
                              float* w) {
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out;
  __mmask16 masks[4];
  PanelMasks(on, masks);
  for (int64_t i = 0; i < kb; i += 4) {
    const int64_t j = (k0 + i) >> 2;
    const float* scales = c.scales + (k0 + i) / p.group * n + o0;
    for (int v = 0; v < 4; ++v) {
      const __m512 s = _mm512_maskz_loadu_ps(masks[v], scales + 16 * v);
      const SparseLanes lanes = DecodeSparse(c, j, o0 + 16 * v, masks[v]);
      __m512 rows[4];
      SpreadGroup(lanes, _mm512_mul_ps(lanes.v0, s), _mm512_mul_ps(lanes.v1, s), rows);
      for (int q = 0; q < 4; ++q) _mm512_store_ps(w + (i + q) * kPanelOut + 16 * v, rows[q]);
    }
  }
}

// One row of f32 sums into the result in its dtype (vector conversions: at
// 2048 tokens the result has millions of elements).
inline void StorePanelRow(void* out, Dtype dtype, int64_t index, const float* acc, int64_t on) {
  for (int64_t o = 0; o < on; o += 16) {
    StoreLanes(out, PanelDtypeOf(dtype), index + o, _mm512_load_ps(acc + o), LaneMask(on - o));
  }
}

// Task (panel, token block): the panel decoded a chunk of K at a time (all
// of it, at K up to 2048), each chunk multiplied into the sums of every token
// of the block, 6 tokens at a time.
template <bool kSparse>
void PanelTask(void* ctx, int64_t task, int worker) {
  const Ctx& c = *static_cast<const Ctx*>(ctx);
  const Int4Problem& p = *c.p;
  const int64_t o0 = (task % c.out_blocks) * kPanelOut;
  const int64_t t0 = (task / c.out_blocks) * kPanelTokens;
  const int64_t on = std::min(kPanelOut, p.n_out - o0);
  const int64_t nt = std::min(kPanelTokens, p.tokens - t0);
  JAXSPARSE_AVX512_NAMESPACE::PanelProduct(
      c.dense, p.k, p.k, t0, nt, o0, on, c.out, PanelDtypeOf(p.dtype), p.n_out,
      c.work + worker * PanelWorkFloats(p), [&](int64_t k0, int64_t kb, float* panel) {
        if (kSparse) {
          DecodeSparsePanel(c, k0, kb, o0, on, panel);
        } else {
          DecodeDensePanel(c, k0, kb, o0, on, panel);
        }
      });
}

}  // namespace int4
}  // namespace JAXSPARSE_INT4_ISA
}  // namespace cpu
}  // namespace jaxsparse
