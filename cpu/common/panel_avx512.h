// The dense f32 micro-kernel that the formats' panel paths share on AVX-512
// (int4's panels, cpu/int4/int4_panel_avx512.h; 2:4's, cpu/nm/nm_panel_avx512.h):
// a format decodes a panel of 64 outputs over a chunk of K into an f32 buffer
// [k][64], then each tile of 6 tokens x 64 outputs multiplies it with its 24
// sums in registers. Per input: 4 aligned loads of the panel and 6 broadcasts
// of x feed 24 FMAs, so the two FMA pipes, not the loads, set the pace (as in
// XLA's own f32 dot, YNNPACK's 5 x 64 kernel).
//
// The sums stay in registers over a whole chunk of K and are stored once; a
// chunk that is not the last leaves them in an f32 buffer for the next. At
// MiniLM's shapes and 1440 tokens, blocks of 128 inputs with the sums in an
// L1 buffer (a load and a store of 24 vectors per tile and block, and a pass
// converting the buffer into the result) cost a tenth of the task's time
// (2-core Zen 5, docs/cpu_speed_notes.md, "MiniLM on Zen 5, second round").
//
// Include it only from units compiled with AVX-512 flags, after
// simd_avx512.h (its namespace, JAXSPARSE_AVX512_NAMESPACE, is the unit's).
#ifndef JAXSPARSE_CPU_COMMON_PANEL_AVX512_H_
#define JAXSPARSE_CPU_COMMON_PANEL_AVX512_H_
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_AVX512_NAMESPACE {

constexpr int64_t kPanelOut = 64;  // outputs per panel: 4 vectors
constexpr int kMicroRows = 6;      // 6 x 4 zmm sums, 4 panel vectors, a broadcast: 29 of 32

// Inputs decoded at a time: all of K up to this (512 KB of f32, in L2); a
// longer K is cut into equal chunks no longer than this.
constexpr int64_t kPanelChunkMax = 2048;

// The chunks of K and their length, a multiple of 4 (whole 2:4 groups and
// int4 byte rows) and at most kPanelChunkMax.
inline int64_t PanelChunks(int64_t k) { return (k + kPanelChunkMax - 1) / kPanelChunkMax; }
inline int64_t PanelChunk(int64_t k) {
  const int64_t chunks = PanelChunks(k);
  return std::min(k, (k + chunks - 1) / chunks + 3 & ~int64_t{3});
}

// The panel's 4 lane masks: outputs past `on` are masked off.
inline void PanelMasks(int64_t on, __mmask16* masks) {
  for (int v = 0; v < 4; ++v) masks[v] = on > 16 * v ? LaneMask(on - 16 * v) : 0;
}

enum class PanelDtype { kF32, kBF16, kF16 };

// One vector of a result row, rounded to its dtype, lanes outside `keep` left alone.
inline void StoreLanes(void* out, PanelDtype dtype, int64_t index, __m512 v, __mmask16 keep) {
  if (dtype == PanelDtype::kF32) {
    _mm512_mask_storeu_ps(static_cast<float*>(out) + index, keep, v);
  } else if (dtype == PanelDtype::kBF16) {
    StoreBf16(static_cast<uint16_t*>(out) + index, v, keep);
  } else {
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + index, keep,
                             _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
}

// Where a tile's sums start and end: a chunk that is not the first starts
// from the sums buffer, one that is not the last ends in it; the last stores
// them into the result.
struct PanelSums {
  float* acc;  // kRows rows of kPanelOut floats (64-byte aligned); unused with one chunk
  bool first, last;
  void* out;  // the result, at element `index` (row r at index + r * n_out)
  PanelDtype dtype;
  int64_t index, n_out;
  const __mmask16* masks;  // the panel's lanes that exist
};

// Sums (+)= x[r, 0 .. kb) . w[0 .. kb)[64] for kRows rows of x (ldx floats apart).
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

// Rows of the decoded chunk in a worker's scratch: PanelChunk(k) rounded up
// to whole groups of 4 (a decoder writes whole groups).
inline int64_t PanelChunkRows(int64_t k) { return PanelChunk(k) + 3 & ~int64_t{3}; }

// Floats of a worker's scratch for PanelProduct: the decoded chunk and,
// with several chunks, the sums of up to `tokens` tokens.
inline int64_t PanelWorkFloats(int64_t k, int64_t tokens) {
  return PanelChunkRows(k) * kPanelOut + (PanelChunks(k) > 1 ? tokens * kPanelOut : 0);
}

// A task's tokens t0 .. t0 + nt (rows of x, ldx floats apart, read in place)
// times the panel of outputs o0 .. o0 + on, decoded a chunk of K at a time
// by `decode(k0, kb, w)` (rows k0 .. k0 + kb of the panel into w [kb][64],
// rounded up to whole groups of 4 rows at most), into the result's rows
// (n_out elements each). `work`: PanelWorkFloats(k, nt) floats, 64-byte
// aligned.
template <class Decode>
inline void PanelProduct(const float* x, int64_t ldx, int64_t k, int64_t t0, int64_t nt,
                         int64_t o0, int64_t on, void* out, PanelDtype dtype, int64_t n_out,
                         float* work, Decode&& decode) {
  const int64_t chunk = PanelChunk(k);
  float* acc = work + PanelChunkRows(k) * kPanelOut;
  __mmask16 masks[4];
  PanelMasks(on, masks);
  for (int64_t k0 = 0; k0 < k; k0 += chunk) {
    const int64_t kb = std::min(chunk, k - k0);
    decode(k0, kb, work);
    for (int64_t t = 0; t < nt; t += kMicroRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kMicroRows, nt - t));
      const PanelSums sums{acc + t * kPanelOut, k0 == 0, k0 + kb == k, out, dtype,
                           (t0 + t) * n_out + o0, n_out, masks};
      PanelRows(rows, x + (t0 + t) * ldx + k0, ldx, work, kb, sums);
    }
  }
}

}  // namespace JAXSPARSE_AVX512_NAMESPACE
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_COMMON_PANEL_AVX512_H_
