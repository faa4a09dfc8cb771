// N:M's few-token backward for AVX-512: the gradient of the kept values,
// dv[o, c] = sum_t dy[t, o] x[t, k] at up to kRowBackMaxTokens tokens
// (SddmmRows), and for n:4 dx = dy @ W^T at up to kRowDxMaxTokens (SpmmTRows).
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
// are slow on Zen 4), so dx runs along its inputs instead (SpmmTRows).
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
// Up to this many tokens dx runs on rows (SpmmTRows). Measured on Zen 4
// (nm_spmm_t of 2:4 under jit, ms, this kernel / the token-vectorised one,
// two runs each): at 4 tokens f32 768x768 0.09-0.16 / 0.28-0.30, bf16
// 3072x768 0.30-0.34 / 0.89-0.97, f32 4096x4096 5.2-6.1 / 6.7-7.0; at 8
// tokens 0.20-0.25 / 0.29, 0.66-0.68 / 0.76-0.96, but 10.5-11.3 / 6.3-7.3:
// past 4 tokens a large layer's tasks (16 / T vectors of inputs each) read
// too little of each weight row. At 1 token this kernel took 0.05-0.09 ms
// at f32 768x768 and 2.2-4.6 at 4096x4096 (the other: 0.22-0.32 and
// 6.1-7.5 in the seventh round of docs/cpu_speed_notes.md).
constexpr int64_t kRowDxMaxTokens = 4;
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
        const __mmask16 live = LaneMask(Kc - c);
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
        const __mmask16 live = LaneMask(T * K - i);
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
};

// dx = dy @ W^T at up to kRowDxMaxTokens tokens for n:4 (n = 1, 2), with
// the lanes along dx's inputs. The token-vectorised spmm_t puts tokens in
// lanes (15 of 16 padding at one token), and the row form that scatters each
// entry into dx was no faster (scatters are slow on Zen 4, above). Here a
// task owns a range of dx's inputs, 16 per vector, and walks every output
// row: the 4 groups of 16 inputs hold 4 n entries of the row; per entry
// slot s (of n), one byte shuffle puts each input's candidate position
// beside it and one compare says which inputs it hits (a position >= 4 hits
// none, two entries on one position both add, as the reference has it), and
// one permute spreads the entries' values over their groups' inputs; then a
// masked FMA per slot and token. No scatter, no gather, every value and
// position read once per call.
template <class Tr, class D>
struct SpmmTRows : Dims {
  using S = typename D::Storage;
  // Inputs per task: 16 vectors of sums across its tokens (8 vectors at 2
  // tokens, 2 at 8), half of the registers.
  static constexpr int64_t kSums = 16;
  const NmProblem& p;
  const NmRuntime& rt;
  int64_t chunks = 0, tasks = 0;
  // Per batch.
  const S* dy = nullptr;
  const S* values = nullptr;
  const uint8_t* idx = nullptr;
  S* dx = nullptr;

  SpmmTRows(const NmProblem& prob, const NmRuntime& runtime)
      : Dims(prob), p(prob), rt(runtime) {
    chunks = CeilDiv(G * 4, 16);  // Groups of 4 inputs, 16 inputs per vector.
    tasks = CeilDiv(chunks, TaskChunks(Max(T, 1)));
  }

  static bool Applies(const NmProblem& p) {
    return p.tokens <= kRowDxMaxTokens && p.m == 4 && (p.n == 1 || p.n == 2);
  }

  void Layout(Carver&) {}

  bool Compute() {
    if (T == 0 || K == 0 || p.batch == 0) return true;
    if (N == 0) {
      std::memset(p.out, 0, p.batch * T * K * sizeof(S));
      return true;
    }
    for (int64_t b = 0; b < p.batch; ++b) {
      dy = static_cast<const S*>(p.dy) + b * p.dy_stride;
      values = static_cast<const S*>(p.values) + b * p.values_stride;
      idx = p.indices + b * p.indices_stride;
      dx = static_cast<S*>(p.out) + b * T * K;
      RunParallel(rt, tasks, *this);
    }
    return true;
  }

  // Tasks own TaskChunks(T) vectors of 16 inputs each.
  static int64_t TaskChunks(int64_t tokens) { return Max(1, kSums / tokens); }

  void Run(int64_t task, int) const {
    Dispatch<kRowDxMaxTokens>(static_cast<int>(T), [&](auto kt) {
      constexpr int kT = decltype(kt)::value;
      constexpr int kMaxC = static_cast<int>(kSums / kT);
      const int64_t c0 = task * kMaxC, nc = Min(kMaxC, chunks - c0);
      Dispatch<kMaxC>(static_cast<int>(nc), [&](auto kc) {
        if (n == 1) {
          Rows<kT, decltype(kc)::value, 1>(c0);
        } else {
          Rows<kT, decltype(kc)::value, 2>(c0);
        }
      });
    });
  }

  template <int kT, int kC, int kN>
  void Rows(int64_t c0) const {
    constexpr int kEntries = 4 * kN;  // Entries of one row per 16 inputs.
    // Lane i (input i of 16, group i / 4) takes entry (i / 4) * kN + s of the chunk.
    alignas(16) int8_t pick[kN][16];
    alignas(64) int32_t spread[kN][16];
    alignas(16) int8_t slot[16];
    for (int i = 0; i < 16; ++i) {
      slot[i] = static_cast<int8_t>(i % 4);
      for (int s = 0; s < kN; ++s) pick[s][i] = spread[s][i] = i / 4 * kN + s;
    }
    const __m128i slots = _mm_load_si128(reinterpret_cast<const __m128i*>(slot));
    __m128i picks[kN];
    __m512i spreads[kN];
    for (int s = 0; s < kN; ++s) {
      picks[s] = _mm_load_si128(reinterpret_cast<const __m128i*>(pick[s]));
      spreads[s] = _mm512_load_si512(spread[s]);
    }
    // The chunks' live entries (a last chunk past G has fewer groups).
    __mmask16 live[kC];
    for (int c = 0; c < kC; ++c) {
      const int64_t groups = Min(4, G - (c0 + c) * 4);
      live[c] = static_cast<__mmask16>((1u << (groups * kN)) - 1);
    }
    __m512 acc[kT][kC];
    for (int t = 0; t < kT; ++t)
      for (int c = 0; c < kC; ++c) acc[t][c] = _mm512_setzero_ps();
    const int64_t e0 = c0 * kEntries;
    for (int64_t j = 0; j < N; ++j) {
      __m512 d[kT];
      for (int t = 0; t < kT; ++t) d[t] = _mm512_set1_ps(D::ToF32(dy[t * N + j]));
      const uint8_t* row_idx = idx + j * Kc + e0;
      const S* row_val = values + j * Kc + e0;
      for (int c = 0; c < kC; ++c) {
        // Absent entries read as position 0xff: they hit no input.
        const __m128i pos = _mm_mask_loadu_epi8(_mm_set1_epi8(-1), live[c],
                                                row_idx + c * kEntries);
        const __m512 v = Values(row_val + c * kEntries, live[c]);
        for (int s = 0; s < kN; ++s) {
          const __mmask16 hit = _mm_cmpeq_epi8_mask(_mm_shuffle_epi8(pos, picks[s]), slots);
          const __m512 w = _mm512_permutexvar_ps(spreads[s], v);
          for (int t = 0; t < kT; ++t) acc[t][c] = _mm512_mask3_fmadd_ps(d[t], w, acc[t][c], hit);
        }
      }
    }
    for (int t = 0; t < kT; ++t)
      for (int c = 0; c < kC; ++c) {
        const int64_t k = (c0 + c) * 16;
        SddmmRows<Tr, D>::Store(dx + t * K + k, acc[t][c], LaneMask(K - k));
      }
  }

  // Up to 8 entries' values as f32 lanes 0..7 (lanes outside `live` zero).
  __attribute__((always_inline)) static __m512 Values(const S* v, __mmask16 live) {
    if constexpr (kIsF32<D>) {
      return _mm512_maskz_loadu_ps(live, v);
    } else {
      return SddmmRows<Tr, D>::HalfToF32(v, live);
    }
  }
};

// The spmm_t of the AVX-512 tables: the row kernel for n:4 up to
// kRowDxMaxTokens tokens, else the token-vectorised one.
inline bool SpmmTRowsAny(const NmProblem& p, const NmRuntime& rt) {
  if (SpmmTRows<Traits, F32<Traits>>::Applies(p)) return RunOp<Traits, SpmmTRows>(p, rt);
  return RunOp<Traits, SpmmT>(p, rt);
}

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
