// The small-token 2:4 forward for AVX2 (included by nm_kernels_avx2.cc after
// nm_kernels.h, inside its JAXSPARSE_NM_ISA namespace).
//
// At a few tokens the token-vectorised kernel of nm_kernels.h fills few lanes
// (17 tokens: 3 vectors of 8, 71% used) and issues a gathered load per FMA,
// which held 2:4 at 1.2x of XLA's dot in a chain of MiniLM's 17-token
// products on Zen 3. Here the vectors run along the kept entries of weight
// rows instead, as nm_rowdot_avx512.h does with 16 lanes, but with AVX2's
// in-lane permute: a ymm holds the entries of two 2:4 groups of two rows,
//
//   lanes 0-1: row a, group 2c    lanes 2-3: row b, group 2c
//   lanes 4-5: row a, group 2c+1  lanes 6-7: row b, group 2c+1
//
// so each 128-bit half needs the 4 inputs of one group, and one plain load
// of x's inputs 8c .. 8c + 7 is the table of both halves. `vpermilps` picks
// each lane's input by the low 2 bits of its position: one uop and no
// cross-lane move (Zen 3: 1 cycle, where the cross-lane vpermps takes 3-8).
// A row pair's values and positions for a chunk of two groups are put in
// this order once and serve the block's tokens; each token is one load, one
// permute and one FMA per 8 kept entries, every lane in use.
#ifndef JAXSPARSE_CPU_NM_ROWDOT_AVX2_H_
#define JAXSPARSE_CPU_NM_ROWDOT_AVX2_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_NM_ISA {

// Up to this many tokens the row kernel runs (more, and the token-vectorised
// kernel fills its lanes).
constexpr int64_t kRowDot2Max = 32;
// Tokens per register block: 8 accumulators (2 FMA pipes x 4 cycles of
// latency), the rest of the 16 ymm for the weights, positions and tables.
constexpr int kRowDot2Tokens = 8;

template <class D>
struct RowDot24 : Dims {
  using S = typename D::Storage;

  const NmProblem& p;
  const NmRuntime& rt;
  int64_t chunks, x_stride, Kc2;
  int64_t pairs_per_task, tasks, token_blocks, block_tokens;
  float* xs = nullptr;  // [T, x_stride] f32, zero padded past K.
  // Per batch.
  const S* values = nullptr;
  const uint8_t* idx = nullptr;
  const uint8_t* idx2 = nullptr;  // 2-bit positions, or null.
  S* y = nullptr;

  static bool Applies(const NmProblem& p) {
    return p.tokens <= kRowDot2Max && p.n == 2 && p.m == 4;
  }

  RowDot24(const NmProblem& prob, const NmRuntime& runtime)
      : Dims(prob), p(prob), rt(runtime) {
    chunks = CeilDiv(G, 2);
    x_stride = chunks * 8;
    Kc2 = CeilDiv(Kc, 4);
    // Tokens in even blocks of at most kRowDot2Tokens (17 -> 6, 6, 5): each
    // block pays the weights' reordering once.
    token_blocks = CeilDiv(Max(T, 1), kRowDot2Tokens);
    block_tokens = CeilDiv(Max(T, 1), token_blocks);
    const int64_t pairs = CeilDiv(N, 2);
    pairs_per_task = Max(8, Min(32, CeilDiv(pairs, 8 * rt.num_workers)));
    tasks = CeilDiv(pairs, pairs_per_task);
  }

  void Layout(Carver& c) { xs = c.Take<float>(T * x_stride); }

  bool Compute() {
    if (T == 0 || N == 0 || p.batch == 0) return true;
    if (!TakeScratch(rt, *this)) return false;
    for (int64_t b = 0; b < p.batch; ++b) {
      const S* x = static_cast<const S*>(p.x) + b * p.x_stride;
      values = static_cast<const S*>(p.values) + b * p.values_stride;
      idx = p.indices + b * p.indices_stride;
      idx2 = p.indices_2bit == nullptr ? nullptr : p.indices_2bit + b * p.indices_2bit_stride;
      y = static_cast<S*>(p.out) + b * T * N;
      if (b == 0 || p.x_stride != 0) PackRowsF32<D>(x, T, K, x_stride, xs);
      RunParallel(rt, tasks, *this);
    }
    return true;
  }


  void Run(int64_t task, int /*worker*/) const {
    const int64_t pair0 = task * pairs_per_task;
    const int64_t pair1 = Min(CeilDiv(N, 2), pair0 + pairs_per_task);
    for (int64_t t0 = 0; t0 < T; t0 += block_tokens) {
      const int tb = static_cast<int>(Min(block_tokens, T - t0));
      Dispatch<kRowDot2Tokens>(tb, [&](auto toks) {
        constexpr int kT = decltype(toks)::value;
        for (int64_t pair = pair0; pair < pair1; ++pair) Pair<kT>(2 * pair, t0);
      });
    }
  }

  // Entries [4c, 4c + 4) of rows a and b as f32 in lane order a0 a1 b0 b1 |
  // a2 a3 b2 b3 (entries 4c, 4c + 1 are group 2c's).
  static __m256 Values(const S* a, const S* b) {
    __m256 ab;  // a0 a1 a2 a3 | b0 b1 b2 b3
    if constexpr (kIsF32<D>) {
      ab = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(a)), _mm_loadu_ps(b), 1);
    } else {
      uint64_t wa, wb;
      std::memcpy(&wa, a, 8);
      std::memcpy(&wb, b, 8);
      const __m128i h = _mm_set_epi64x(static_cast<long long>(wb), static_cast<long long>(wa));
      if constexpr (std::is_same_v<D, BF16<Traits>>) {
        ab = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      } else {
        ab = _mm256_cvtph_ps(h);
      }
    }
    return _mm256_castpd_ps(
        _mm256_permute4x64_pd(_mm256_castps_pd(ab), _MM_SHUFFLE(3, 1, 2, 0)));
  }

  // The same entries' positions as dword lanes in that order (vpermilps
  // reads their low 2 bits): from the uint8 indices (4 bytes per row), or
  // from one byte per row of the 2-bit positions.
  static __m256i Positions(const uint8_t* a, const uint8_t* b) {
    int32_t wa, wb;
    std::memcpy(&wa, a, 4);
    std::memcpy(&wb, b, 4);
    // 16-bit interleave: bytes a0 a1 b0 b1 a2 a3 b2 b3.
    return _mm256_cvtepu8_epi32(_mm_unpacklo_epi16(_mm_cvtsi32_si128(wa), _mm_cvtsi32_si128(wb)));
  }
  static __m256i Positions2(uint8_t a, uint8_t b) {
    const __m256i shifts = _mm256_setr_epi32(0, 2, 8, 10, 4, 6, 12, 14);
    return _mm256_srlv_epi32(_mm256_set1_epi32(a | (b << 8)), shifts);
  }

  // Rows j and j + 1 (j alone, paired with itself, when j + 1 == N) by
  // tokens t0 .. t0 + kT - 1.
  template <int kT>
  void Pair(int64_t j, int64_t t0) const {
    const int64_t kc = Kc, kc2 = Kc2, stride = x_stride;
    const int64_t jb = j + 1 < N ? j + 1 : j;
    const S* const va = values + j * kc;
    const S* const vb = values + jb * kc;
    const uint8_t* const ia = idx + j * kc;
    const uint8_t* const ib = idx + jb * kc;
    const uint8_t* const pa = idx2 == nullptr ? nullptr : idx2 + j * kc2;
    const uint8_t* const pb = idx2 == nullptr ? nullptr : idx2 + jb * kc2;
    const float* const x0 = xs + t0 * stride;
    const __m256i four = _mm256_set1_epi32(4);
    __m256 acc[kT];
#pragma GCC unroll 8
    for (int t = 0; t < kT; ++t) acc[t] = _mm256_setzero_ps();

    // One chunk: w and pos in lane order. `garbage`: a position is >= 4
    // (possible under jit; vpermilps would read its low 2 bits): such lanes
    // add 0, not 0 * inf. The 2-bit positions are always < 4.
    auto step = [&](int64_t c, __m256 w, __m256i pos, bool garbage) {
      if (__builtin_expect(!garbage, 1)) {
#pragma GCC unroll 8
        for (int t = 0; t < kT; ++t) {
          const __m256 table = _mm256_loadu_ps(x0 + t * stride + 8 * c);
          acc[t] = _mm256_fmadd_ps(w, _mm256_permutevar_ps(table, pos), acc[t]);
        }
      } else {
        const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(four, pos));
        w = _mm256_and_ps(w, keep);
#pragma GCC unroll 8
        for (int t = 0; t < kT; ++t) {
          const __m256 table = _mm256_loadu_ps(x0 + t * stride + 8 * c);
          acc[t] = _mm256_fmadd_ps(
              w, _mm256_and_ps(_mm256_permutevar_ps(table, pos), keep), acc[t]);
        }
      }
    };

    // Chunks whose 4 entries per row lie inside the rows.
    const int64_t whole = Kc / 4;
    for (int64_t c = 0; c < whole; ++c) {
      const __m256 w = Values(va + 4 * c, vb + 4 * c);
      if (pa != nullptr) {
        step(c, w, Positions2(pa[c], pb[c]), false);
      } else {
        uint32_t qa, qb;
        std::memcpy(&qa, ia + 4 * c, 4);
        std::memcpy(&qb, ib + 4 * c, 4);
        step(c, w, Positions(ia + 4 * c, ib + 4 * c), ((qa | qb) & 0xfcfcfcfcu) != 0);
      }
    }
    if (whole < chunks) {  // A last chunk of one group (G odd): copied out, zero padded.
      S wa[4] = {}, wb[4] = {};
      uint8_t qa[4] = {}, qb[4] = {};
      const int64_t left = Kc - 4 * whole;  // 2 entries
      for (int64_t e = 0; e < left; ++e) {
        wa[e] = va[4 * whole + e];
        wb[e] = vb[4 * whole + e];
        qa[e] = pa != nullptr ? (pa[whole] >> (2 * e)) & 3 : ia[4 * whole + e];
        qb[e] = pb != nullptr ? (pb[whole] >> (2 * e)) & 3 : ib[4 * whole + e];
      }
      uint32_t ua, ub;
      std::memcpy(&ua, qa, 4);
      std::memcpy(&ub, qb, 4);
      step(whole, Values(wa, wb), Positions(qa, qb), ((ua | ub) & 0xfcfcfcfcu) != 0);
    }
#pragma GCC unroll 8
    for (int t = 0; t < kT; ++t) {
      // Row a: lanes 0, 1, 4, 5; row b: 2, 3, 6, 7.
      const __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc[t]),
                                     _mm256_extractf128_ps(acc[t], 1));
      const __m128 sums = _mm_hadd_ps(half, half);  // a, b, a, b
      S* out = y + (t0 + t) * N + j;
      out[0] = D::FromF32(_mm_cvtss_f32(sums));
      if (jb != j) out[1] = D::FromF32(_mm_cvtss_f32(_mm_shuffle_ps(sums, sums, 1)));
    }
  }
};

// The forward for AVX2 (an Op of RunOp): the row kernel for 2:4 at few
// tokens, else the token-vectorised one.
template <class Tr, class D>
struct SpmmAvx2 {
  SpmmAvx2(const NmProblem& prob, const NmRuntime& runtime) : p(prob), rt(runtime) {}
  bool Compute() {
    if (RowDot24<D>::Applies(p)) {
      RowDot24<D> op(p, rt);
      return op.Compute();
    }
    Spmm<Tr, D> op(p, rt);
    return op.Compute();
  }
  const NmProblem& p;
  const NmRuntime& rt;
};

}  // namespace JAXSPARSE_NM_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_NM_ROWDOT_AVX2_H_
