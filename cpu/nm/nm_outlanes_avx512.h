// The few-token 2:4 and 1:4 forward with outputs in the lanes (AVX-512 units;
// included by nm_rowdot_avx512.h after nm_kernels.h, in the units that define
// JAXSPARSE_NM_ISA).
//
// The row-vectorised kernel (nm_rowdot_avx512.h) decodes each chunk of the
// weight again for every block of 8 tokens: at 17 tokens (MiniLM at batch 1)
// that is three decodes, the third for one token. Here a task takes 16
// outputs and all the tokens of a pass (up to 24, a register each), so each
// piece of the weight is decoded once per call:
//
//   the values of 16 outputs x 16 kept entries (8 groups, 32 inputs at 2:4;
//   16 groups, 64 inputs at 1:4) are transposed in registers, so that a
//   vector holds one entry of 16 outputs, and their 2-bit positions come in
//   one dword per output (a gather of 4 bytes per row). Per token and kept
//   entry, one vpermps picks each lane's input out of the token's 16 inputs
//   of 4 groups (control = 4 x group + position) and one FMA adds value x
//   input: at 2:4, 2 permutes and 2 FMAs per group where the dense rows of
//   the group would take 4 FMAs plus their decode.
//
// Measured alone (one core, weights in L1, 17 tokens, against dense FMAs on
// decoded rows at the pipes' rate): 0.89x the dense time with the permutes,
// 0.64x with a compare-and-blend decode of the dense rows, 0.79x with
// vpermilps on a broadcast of each group's 4 inputs (the 128-bit broadcast
// costs a shuffle). The permutes share the FMA pipes, so this is the dense
// rate, not twice it; what it saves is the weight stream (half the values)
// and the row kernel's repeated decodes.
//
// Where it runs: 2:4 at 9-32 tokens, 1:4 at 1-48. Against XLA's f32 dot in
// one process (2-core Zen 5, jax 0.12.1, weights hot in a loop of products;
// this kernel and the row kernel by turns): 2:4 at 17 tokens 384 x 384 1.01x
// against 0.75x, 1536 x 384 1.01x against 0.68x, 384 x 1536 0.81-1.06x
// against 0.70-0.83x; at 10 tokens 0.82-0.87x against 0.69-0.77x (384 x 1536,
// 1536 x 384) and 4096 x 4096 1.78x against 1.65x; at 24 and 32 ahead or even
// (4096 x 4096 at 32: 1.18-1.33x against 1.22-1.24x); at 8 tokens behind
// (4096 x 4096 1.89x against 1.98x), where the row kernel's weight stream is
// the bound and one token fills few lanes of its blocks anyway. 1:4 at 17
// tokens: 384 x 1536 1.55-1.94x against 0.89-0.93x, 4096 x 4096 2.83-2.89x
// against 2.11-2.40x; at 1 token 2.21x against 1.50x and 5.64x against 2.57x;
// at 48 (against the token-vectorised kernel) 1.46x against 1.26x and 1.97x
// against 1.98x. bf16 runs the tiles (nm_amx.h) from 12 tokens on AMX, and
// on vdpbf16ps 2:4 from 21 tokens and 1:4 from 49 (docs/cpu_speed_notes.md,
// "MiniLM on Zen 5, fourth round" and "N:M at few tokens, fifth round").
#ifndef JAXSPARSE_CPU_NM_NM_OUTLANES_AVX512_H_
#define JAXSPARSE_CPU_NM_NM_OUTLANES_AVX512_H_
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/nm/nm_panel_avx512.h"

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_NM_ISA {

// 16 bf16 or f16 values as f32 (exact).
template <class D>
inline __m512 WidenHalves(__m256i h) {
  if constexpr (std::is_same_v<D, BF16<Traits>>) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(h);
  }
}

template <class D>
struct OutLanes : Dims {
  using S = typename D::Storage;
  // Tokens of one pass: a sum register each, in two arrays (one array of more
  // than 16 vectors stays in memory), beside 2 values, 2 controls and a table.
  static constexpr int kPassTokens = 24;
  // 1:4 runs here at 1-48 tokens: its row kernel (4 rows of 4 lanes per
  // vector) was slower at every count measured (1-12 tokens, f32, bf16, f16,
  // weights hot and cold), and the token-vectorised kernel at 40 and 48. 2:4
  // at 9-32: at 1-8 tokens the row kernel's blocks of 8 tokens are whole and
  // its weight stream led; at 40 the two were even.
  static constexpr int64_t kMinTokens1of4 = 1, kMaxTokens1of4 = 48;
  static constexpr int64_t kMinTokens2of4 = 9, kMaxTokens2of4 = 32;
  // Entries per chunk: 16 outputs x 16 entries, one transpose.
  static constexpr int64_t kChunkEntries = 16;

  static bool Applies(const NmProblem& p) {
    return (p.n == 1 || p.n == 2) && p.m == 4 && p.indices_2bit != nullptr &&
           p.k > 0 && p.n_out > 0 &&
           (p.n == 1 ? p.tokens >= kMinTokens1of4 && p.tokens <= kMaxTokens1of4
                     : p.tokens >= kMinTokens2of4 && p.tokens <= kMaxTokens2of4);
  }

  const NmProblem& p;
  const NmRuntime& rt;
  int64_t chunk_inputs, chunks, kc2, x_stride, pass_tokens;
  __m512i row_offsets;  // Lane i: i * kc2, output i's positions in a task's block.
  // f32 x is read in place when its rows hold whole chunks of inputs and do
  // not all fall in one L1 set (a stride of whole 4 KB pages); else it is
  // packed (and widened) into xs, zero past K.
  bool x_in_place;
  float* xs = nullptr;  // [T, x_stride] f32
  // Per batch entry.
  const float* x = nullptr;
  const S* values = nullptr;
  const uint8_t* idx2 = nullptr;
  S* y = nullptr;

  OutLanes(const NmProblem& prob, const NmRuntime& runtime) : Dims(prob), p(prob), rt(runtime) {
    chunk_inputs = kChunkEntries * 4 / n;  // 32 at 2:4, 64 at 1:4
    chunks = CeilDiv(Kc, kChunkEntries);
    kc2 = CeilDiv(Kc, 4);
    row_offsets = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(static_cast<int32_t>(kc2)));
    x_in_place = std::is_same_v<S, float> && K == chunks * chunk_inputs && K % 1024 != 0;
    x_stride = x_in_place ? K : chunks * chunk_inputs;
    if (!x_in_place && x_stride % 1024 == 0) x_stride += 16;
    pass_tokens = CeilDiv(T, CeilDiv(T, kPassTokens));
  }

  void Layout(Carver& c) { xs = c.Take<float>(x_in_place ? 0 : T * x_stride); }

  bool Compute() {
    if (p.batch == 0) return true;
    if (!TakeScratch(rt, *this)) return false;
    for (int64_t b = 0; b < p.batch; ++b) {
      const S* xb = static_cast<const S*>(p.x) + b * p.x_stride;
      values = static_cast<const S*>(p.values) + b * p.values_stride;
      idx2 = p.indices_2bit + b * p.indices_2bit_stride;
      y = static_cast<S*>(p.out) + b * T * N;
      if (x_in_place) {
        x = reinterpret_cast<const float*>(xb);
      } else {
        if (b == 0 || p.x_stride != 0) PackRowsF32<D>(xb, T, K, x_stride, xs);
        x = xs;
      }
      RunParallel(rt, CeilDiv(N, 16), *this);
    }
    return true;
  }

  // Task: outputs [16 task, 16 task + 16), all tokens.
  void Run(int64_t task, int /*worker*/) const {
    const int64_t o = 16 * task, rows = Min(16, N - o);
    Sweep(o, rows);
    for (int64_t t0 = 0; t0 < T; t0 += pass_tokens) {
      Dispatch<kPassTokens>(static_cast<int>(Min(pass_tokens, T - t0)), [&](auto tokens) {
        if (n == 1) return Pass<decltype(tokens)::value, 1>(o, rows, t0);
        Pass<decltype(tokens)::value, 2>(o, rows, t0);
      });
    }
  }

  // Reads a byte of every line of the task's values and positions, in address
  // order (16 rows are one block of memory). In a model the weights come from
  // L3 or DRAM (MiniLM's f32 2:4 layers: 22 MB), and the transposes read 16
  // rows side by side, 16 streams, more than the hardware prefetchers follow:
  // a chain of 72 cold 384 x 384 products at 17 tokens ran 1.04-1.33x XLA's
  // dot with the sweep and 0.60-0.85x without (384 x 1536: 1.01-1.16x and
  // 0.57-0.58x; each variant its own weights, the order rotated per round);
  // software prefetches of the rows ahead (2-8 chunks, T0/T1/NTA) or of the
  // next task's block in address order did not help (2-core Zen 5).
  void Sweep(int64_t o, int64_t rows) const {
    TouchLines(values + o * Kc, rows * Kc * static_cast<int64_t>(sizeof(S)));
    TouchLines(idx2 + o * kc2, rows * kc2);
  }

  // Entries [e0, e0 + 16) of outputs [o, o + rows) as 16 vectors, vector e
  // holding entry e0 + e of each output (zero past the rows and entries).
  void Values(int64_t o, int64_t rows, int64_t e0, __m512 v[16]) const {
    const __mmask16 live = LaneMask(Min(kChunkEntries, Kc - e0));
    const S* at = values + o * Kc + e0;
    for (int i = 0; i < 16; ++i) {
      if (i >= rows) {
        v[i] = _mm512_setzero_ps();
      } else if constexpr (std::is_same_v<S, float>) {
        v[i] = _mm512_maskz_loadu_ps(live, at + i * Kc);
      } else {
        v[i] = WidenHalves<D>(_mm256_maskz_loadu_epi16(live, at + i * Kc));
      }
    }
    Transpose16x16Floats(v);
  }

  // The 2-bit positions of entries [e0, e0 + 16) of outputs [o, o + rows):
  // a dword per output, entry e0 + e at bits 2e. Bytes past a row's end (its
  // last chunk) and rows past `rows` read as zero.
  __m512i Positions(int64_t o, int64_t rows, int64_t e0) const {
    const uint8_t* at = idx2 + o * kc2 + e0 / 4;
    const int64_t bytes = Min(4, kc2 - e0 / 4);
    if (rows == 16 && bytes == 4) return _mm512_i32gather_epi32(row_offsets, at, 1);
    alignas(64) uint32_t words[16] = {};
    for (int64_t i = 0; i < rows; ++i) std::memcpy(&words[i], at + i * kc2, bytes);
    return _mm512_load_si512(words);
  }

  // Tokens [t0, t0 + kT) of outputs [o, o + rows), over all of K, for kN:4.
  template <int kT, int kN>
  void Pass(int64_t o, int64_t rows, int64_t t0) const {
    constexpr int kA = (kT + 1) / 2, kB = kT / 2;
    __m512 a[kA], b[kB + 1];
    for (int t = 0; t < kA; ++t) a[t] = _mm512_setzero_ps();
    for (int t = 0; t < kB; ++t) b[t] = _mm512_setzero_ps();
    const float* const x0 = x + t0 * x_stride;
    const int64_t stride = x_stride;
    const __m512i three = _mm512_set1_epi32(3);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t e0 = c * kChunkEntries;
      __m512 v[16];
      Values(o, rows, e0, v);
      const __m512i pos = Positions(o, rows, e0);
      // Tables of 16 inputs (4 groups, 4 kN entries) each: 2 at 2:4, 4 at 1:4.
      for (int h = 0; h < 4 / kN; ++h) {
        const float* xh = x0 + c * chunk_inputs + 16 * h;
        for (int q = 0; q < 4; ++q) {
          const __m512i group = _mm512_set1_epi32(4 * q);
          __m512i control[kN];
          __m512 value[kN];
          for (int j = 0; j < kN; ++j) {
            const int e = 4 * kN * h + kN * q + j;
            control[j] = _mm512_add_epi32(
                _mm512_and_si512(_mm512_srli_epi32(pos, 2 * e), three), group);
            value[j] = v[e];
          }
          for (int t = 0; t < kA; ++t) {
            const __m512 table = _mm512_loadu_ps(xh + t * stride);
            for (int j = 0; j < kN; ++j) {
              a[t] = _mm512_fmadd_ps(value[j], _mm512_permutexvar_ps(control[j], table), a[t]);
            }
          }
          for (int t = 0; t < kB; ++t) {
            const __m512 table = _mm512_loadu_ps(xh + (kA + t) * stride);
            for (int j = 0; j < kN; ++j) {
              b[t] = _mm512_fmadd_ps(value[j], _mm512_permutexvar_ps(control[j], table), b[t]);
            }
          }
        }
      }
    }
    const PanelDtype dtype = std::is_same_v<S, float>            ? PanelDtype::kF32
                             : std::is_same_v<D, BF16<Traits>> ? PanelDtype::kBF16
                                                               : PanelDtype::kF16;
    const __mmask16 keep = LaneMask(rows);
    for (int t = 0; t < kA; ++t) StoreLanes(y, dtype, (t0 + t) * N + o, a[t], keep);
    for (int t = 0; t < kB; ++t) StoreLanes(y, dtype, (t0 + kA + t) * N + o, b[t], keep);
  }
};

}  // namespace JAXSPARSE_NM_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_NM_NM_OUTLANES_AVX512_H_
