// The int4 products by W at many tokens (AVX-512 units), on the f32 FMA
// engine's register tile (FORMATS.md section 4): a task owns a panel of 64
// outputs and a block of tokens. It dequantises the whole panel once into an
// f32 buffer [K][64] (K x 256 bytes: 96 KB at K = 384, 384 KB at 1536, in L2
// while every token of the block reads it), then runs the dense micro-kernel
// 6 tokens x 64 outputs over all of K with its sums in registers, and stores
// them once into the result. The decoding, which bounds the few-token kernels
// (each decoded byte serves 4 tokens there), is spread over up to
// kPanelTokens tokens: at 128 tokens and more it is a few percent of the FMAs.
// Summing over all of K in registers, not over blocks of K into an L1 buffer,
// drops a load and a store of 24 vectors per 6 tokens and block, and the pass
// that converted the buffer into the result: at MiniLM's shapes and 1440
// tokens these were a tenth of the task's time (2-core Zen 5,
// docs/cpu_speed_notes.md). The decoded panel streams from L2 in order, at
// 4 loads per 24 FMAs, well inside L2's bandwidth.
// The 2:4 form is decoded into the dense panel with its zeros, which the
// micro-kernel multiplies: dense speed, not sparse speed; only bf16 in the
// avx512 unit comes here (f32 / f16 repack into lines per task, UseNmRepack).
// Included by int4_kernels.h (after Ctx) in the AVX-512 units.
#include <immintrin.h>

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_INT4_ISA {
namespace int4 {

constexpr int64_t kPanelOut = 64;      // outputs per panel: 4 vectors, one qweight line
constexpr int64_t kPanelTokens = 384;  // tokens per task: the decoding is ~1% of the FMAs
constexpr int kMicroRows = 6;          // 6 x 4 zmm accumulators (the engine's VnmTile)
// From this many tokens on, products by W take the panels (below, the
// streaming kernels, which read each weight byte once per 4 tokens and never
// write a decoded copy); where int4_pairs.h takes a product (the dense form in
// f32 up to 128 tokens), it runs first, and the 2:4 lines never take them
// (int4_kernels.h's Run).
constexpr int64_t kPanelMinTokens = 16;

// Inputs decoded at a time: all of K up to this (512 KB, in L2); a longer K
// is cut into equal chunks no longer, and the sums wait between chunks in an
// f32 buffer of the task's tokens (kPanelTokens x 64, 96 KB).
constexpr int64_t kPanelChunkMax = 2048;

inline int64_t PanelChunks(const Int4Problem& p) {
  return (p.k + kPanelChunkMax - 1) / kPanelChunkMax;
}

// The chunk's length: a multiple of 4, so that chunks start on whole 2:4
// groups and byte rows.
inline int64_t PanelChunk(const Int4Problem& p) {
  const int64_t chunks = PanelChunks(p);
  return std::min(p.k, (p.k + chunks - 1) / chunks + 3 & ~int64_t{3});
}

// Floats of per-worker scratch: the decoded chunk, and the sums between chunks.
inline int64_t PanelWorkFloats(const Int4Problem& p) {
  return PanelChunk(p) * kPanelOut + (PanelChunks(p) > 1 ? kPanelTokens * kPanelOut : 0);
}

inline bool UsePanels(const Int4Problem& p) { return p.tokens >= kPanelMinTokens; }

// The panel's 4 lane masks: outputs past `on` are masked off, so their
// decoded weights are zero (their scales load as zero).
inline void PanelMasks(int64_t on, __mmask16* masks) {
  for (int v = 0; v < 4; ++v) masks[v] = on > 16 * v ? LaneMask(on - 16 * v) : 0;
}

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

// One vector of a result row, rounded to its dtype, lanes past `keep` left alone.
inline void StoreLanes(void* out, Dtype dtype, int64_t index, __m512 v, __mmask16 keep) {
  if (dtype == Dtype::kF32) {
    _mm512_mask_storeu_ps(static_cast<float*>(out) + index, keep, v);
  } else if (dtype == Dtype::kBF16) {
    JAXSPARSE_AVX512_NAMESPACE::StoreBf16(static_cast<uint16_t*>(out) + index, v, keep);
  } else {
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + index, keep,
                             _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
}

// Where a micro-tile's sums start and end: a chunk that is not the first
// starts from the sums buffer, one that is not the last ends in it; the last
// stores them into the result.
struct PanelSums {
  float* acc;      // kRows rows of kPanelOut floats; unused with one chunk
  bool first, last;
  void* out;       // the result, at element `index` (row r at index + r * n_out)
  Dtype dtype;
  int64_t index, n_out;
  const __mmask16* masks;  // the panel's lanes that exist
};

// Sums (+)= x[r, 0 .. kb) . w for kRows rows of x (ldx floats apart): per
// input 4 aligned loads of the decoded panel and kRows broadcasts feed
// 4 kRows FMAs, so the FMA pipes, not the loads, set the pace.
template <int kRows>
inline void PanelMicro(const float* x, int64_t ldx, const float* w, int64_t kb,
                       const PanelSums& s) {
  __m512 sum[kRows][4];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < 4; ++v)
      sum[r][v] = s.first ? _mm512_setzero_ps() : _mm512_load_ps(s.acc + r * kPanelOut + 16 * v);
  for (int64_t i = 0; i < kb; ++i) {
    const float* wi = w + i * kPanelOut;
    const __m512 w0 = _mm512_load_ps(wi), w1 = _mm512_load_ps(wi + 16);
    const __m512 w2 = _mm512_load_ps(wi + 32), w3 = _mm512_load_ps(wi + 48);
    for (int r = 0; r < kRows; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * ldx + i]);
      sum[r][0] = _mm512_fmadd_ps(w0, xr, sum[r][0]);
      sum[r][1] = _mm512_fmadd_ps(w1, xr, sum[r][1]);
      sum[r][2] = _mm512_fmadd_ps(w2, xr, sum[r][2]);
      sum[r][3] = _mm512_fmadd_ps(w3, xr, sum[r][3]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < 4; ++v) {
      if (!s.last) {
        _mm512_store_ps(s.acc + r * kPanelOut + 16 * v, sum[r][v]);
      } else if (s.masks[v]) {
        StoreLanes(s.out, s.dtype, s.index + r * s.n_out + 16 * v, sum[r][v], s.masks[v]);
      }
    }
  }
}

inline void PanelRows(int rows, const float* x, int64_t ldx, const float* w, int64_t kb,
                      const PanelSums& s) {
  switch (rows) {
    case 1: return PanelMicro<1>(x, ldx, w, kb, s);
    case 2: return PanelMicro<2>(x, ldx, w, kb, s);
    case 3: return PanelMicro<3>(x, ldx, w, kb, s);
    case 4: return PanelMicro<4>(x, ldx, w, kb, s);
    case 5: return PanelMicro<5>(x, ldx, w, kb, s);
    default: return PanelMicro<6>(x, ldx, w, kb, s);
  }
}

// One row of f32 sums into the result in its dtype (vector conversions: at
// 2048 tokens the result has millions of elements).
inline void StorePanelRow(void* out, Dtype dtype, int64_t index, const float* acc, int64_t on) {
  for (int64_t o = 0; o < on; o += 16) {
    StoreLanes(out, dtype, index + o, _mm512_load_ps(acc + o), LaneMask(on - o));
  }
}

// Task (panel, token block): the panel decoded a chunk of K at a time (all
// of it, at K up to kPanelChunkMax), each chunk multiplied into the sums of
// every token of the block, 6 tokens at a time.
template <bool kSparse>
void PanelTask(void* ctx, int64_t task, int worker) {
  const Ctx& c = *static_cast<const Ctx*>(ctx);
  const Int4Problem& p = *c.p;
  const int64_t o0 = (task % c.out_blocks) * kPanelOut;
  const int64_t t0 = (task / c.out_blocks) * kPanelTokens;
  const int64_t on = std::min(kPanelOut, p.n_out - o0);
  const int64_t nt = std::min(kPanelTokens, p.tokens - t0);
  const int64_t chunk = PanelChunk(p);
  float* w = c.work + worker * PanelWorkFloats(p);
  float* acc = w + chunk * kPanelOut;
  __mmask16 masks[4];
  PanelMasks(on, masks);
  for (int64_t k0 = 0; k0 < p.k; k0 += chunk) {
    const int64_t kb = std::min(chunk, p.k - k0);
    if (kSparse) {
      DecodeSparsePanel(c, k0, kb, o0, on, w);
    } else {
      DecodeDensePanel(c, k0, kb, o0, on, w);
    }
    for (int64_t t = 0; t < nt; t += kMicroRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kMicroRows, nt - t));
      const PanelSums sums{acc + t * kPanelOut, k0 == 0,  k0 + kb == p.k, c.out, p.dtype,
                           (t0 + t) * p.n_out + o0, p.n_out, masks};
      PanelRows(rows, c.dense + (t0 + t) * p.k + k0, p.k, w, kb, sums);
    }
  }
}

}  // namespace int4
}  // namespace JAXSPARSE_INT4_ISA
}  // namespace cpu
}  // namespace jaxsparse
