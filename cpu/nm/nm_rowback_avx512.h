// The few-token gradient of N:M's kept values for AVX-512: dv[o, c] =
// sum_t dy[t, o] x[t, k] at up to kRowBackMaxTokens tokens (SddmmRows).
// Included by nm_kernels_avx512.cc, nm_kernels_avx512bf16.cc and
// nm_kernels_amx.cc after nm_kernels.h, inside their JAXSPARSE_NM_ISA
// namespace.
//
// The token-vectorised sddmm of nm_kernels.h puts tokens in vector lanes: at
// one token 15 of 16 lanes are padding, and a training step at 1 token spent
// 0.29 ms in dv where XLA's whole dense step took 0.44 (f32 768x768 on Zen 4,
// docs/cpu_speed_notes.md). Here the lanes run along the kept entries of a
// weight row, and each entry's input is addressed directly, k = (c / n) * m +
// position: per 16 entries and token one masked gather from x's row. An
// entry whose input does not exist (a position >= m under jit, or the padding
// of a ragged last group) reads nothing and gets 0. Each gather costs about
// as much as a token's share of the token-vectorised kernel, so this wins at
// 1 and 2 tokens only (measured on Zen 4: 768x768 f32 at 1 token 0.16 ms
// against 0.22-0.32, 4096x4096 bf16 at 2 tokens 4.9 against 8.5; at 4 tokens
// 0.32-0.43 against 0.22-0.24 at 768x768).
//
// The same row form of dx (per 16 entries a gather, an FMA and a scatter on
// dx's row) was built and measured too: at 1 token it took 8.1-8.5 ms at
// 4096x4096 f32 against the token-vectorised spmm_t's 6.1-7.5 (the scatters
// are slow on Zen 4), so dx keeps that kernel.
#ifndef JAXSPARSE_CPU_NM_ROWBACK_AVX512_H_
#define JAXSPARSE_CPU_NM_ROWBACK_AVX512_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_NM_ISA {

// Up to this many tokens dv runs here (measured above); past it the
// token-vectorised sddmm.
constexpr int64_t kRowBackMaxTokens = 2;
// Tasks per worker (ranges of output rows).
constexpr int64_t kRowBackTasksPerWorker = 4;

// dv = (x^T dy) at the kept entries. A task is a range of output rows.
template <class Tr, class D>
struct SddmmRows : Dims {
  using S = typename D::Storage;
  const NmProblem& p;
  const NmRuntime& rt;
  int64_t rows_per_task = 1, tasks = 0;
  int32_t* base = nullptr;  // [Kc]: (c / n) * m, the entry's group's first input.
  float* wide = nullptr;    // Half types: x widened, [T][K].
  // Per batch.
  const float* xs = nullptr;  // x's T rows, f32.
  const S* dy = nullptr;
  const uint8_t* idx = nullptr;
  S* dv = nullptr;

  SddmmRows(const NmProblem& prob, const NmRuntime& runtime)
      : Dims(prob), p(prob), rt(runtime) {
    rows_per_task = Max(1, CeilDiv(N, kRowBackTasksPerWorker * rt.num_workers));
    tasks = CeilDiv(N, rows_per_task);
  }

  void Layout(Carver& c) {
    base = c.Take<int32_t>(Kc);
    if constexpr (!kIsF32<D>) wide = c.Take<float>(T * K);
  }

  bool Compute() {
    if (N == 0 || Kc == 0 || p.batch == 0) return true;
    if (T == 0) {
      std::memset(p.out, 0, p.batch * N * Kc * sizeof(S));
      return true;
    }
    if (!TakeScratch(rt, *this)) return false;
    for (int64_t e = 0; e < Kc; ++e) base[e] = static_cast<int32_t>(e / n * m);
    for (int64_t b = 0; b < p.batch; ++b) {
      xs = WidenedX(static_cast<const S*>(p.x) + b * p.x_stride);
      dy = static_cast<const S*>(p.dy) + b * p.dy_stride;
      idx = p.indices + b * p.indices_stride;
      dv = static_cast<S*>(p.out) + b * N * Kc;
      RunParallel(rt, tasks, *this);
    }
    return true;
  }

  void Run(int64_t task, int) const {
    const int64_t j0 = task * rows_per_task, j1 = Min(N, j0 + rows_per_task);
    for (int64_t j = j0; j < j1; ++j) {
      float d[kRowBackMaxTokens];
      for (int64_t t = 0; t < T; ++t) d[t] = D::ToF32(dy[t * N + j]);
      for (int64_t c = 0; c < Kc; c += 16) {
        const __mmask16 live = Live(Kc - c);
        __m512i k;
        __mmask16 valid;
        Inputs(idx + j * Kc, c, live, &k, &valid);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t t = 0; t < T; ++t) {
          const __m512 xk = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, k, xs + t * K, 4);
          sum = _mm512_fmadd_ps(_mm512_set1_ps(d[t]), xk, sum);
        }
        Store(dv + j * Kc + c, sum, live);
      }
    }
  }

  // x's T rows as f32: x itself for f32, else widened into `wide` (a gather
  // reads f32 lanes; T x K is small at these counts).
  const float* WidenedX(const S* x) const {
    if constexpr (kIsF32<D>) {
      return x;
    } else {
      for (int64_t i = 0; i < T * K; i += 16) {
        const __mmask16 live = Live(T * K - i);
        _mm512_mask_storeu_ps(wide + i, live, HalfToF32(x + i, live));
      }
      return wide;
    }
  }

  // Entries c .. c + 15 of a row (`live` of them): their inputs, and the
  // lanes whose input exists.
  __attribute__((always_inline)) void Inputs(const uint8_t* row_idx, int64_t c, __mmask16 live,
                                             __m512i* k, __mmask16* valid) const {
    const __m512i pos = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, row_idx + c));
    *k = _mm512_add_epi32(_mm512_maskz_loadu_epi32(live, base + c), pos);
    *valid = live & _mm512_cmplt_epi32_mask(pos, _mm512_set1_epi32(m)) &
             _mm512_cmplt_epi32_mask(*k, _mm512_set1_epi32(static_cast<int32_t>(K)));
  }

  // 16 bf16 or f16 values as f32 (lanes outside `live` zero, not read).
  __attribute__((always_inline)) static __m512 HalfToF32(const S* v, __mmask16 live) {
    const __m256i h = _mm256_maskz_loadu_epi16(live, v);
    if constexpr (std::is_same_v<D, BF16<Tr>>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }

  // 16 f32 lanes stored as S, lanes in `live` only, rounded once to nearest
  // even.
  __attribute__((always_inline)) static void Store(S* out, __m512 v, __mmask16 live) {
    if constexpr (kIsF32<D>) {
      _mm512_mask_storeu_ps(out, live, v);
    } else if constexpr (std::is_same_v<D, BF16<Tr>>) {
      StoreBf16(out, v, live);  // cpu/common/simd_avx512.h
    } else {
      _mm256_mask_storeu_epi16(out, live,
                               _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }

  static __mmask16 Live(int64_t left) {
    return left >= 16 ? __mmask16{0xffff} : static_cast<__mmask16>((1u << left) - 1);
  }
};

// The sddmm of the AVX-512 tables: the row kernel up to kRowBackMaxTokens
// tokens, else the token-vectorised one.
inline bool SddmmRowsAny(const NmProblem& p, const NmRuntime& rt) {
  if (p.tokens <= kRowBackMaxTokens) return RunOp<Traits, SddmmRows>(p, rt);
  return RunOp<Traits, Sddmm>(p, rt);
}

}  // namespace JAXSPARSE_NM_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_NM_ROWBACK_AVX512_H_
