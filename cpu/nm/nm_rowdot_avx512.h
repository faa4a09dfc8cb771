// The small-token N:M forward for AVX-512 (included by nm_kernels_avx512.cc
// and nm_kernels_amx.cc after nm_kernels.h, inside their JAXSPARSE_NM_ISA
// namespace).
//
// At a few tokens the product is a matrix-vector product bound by the weight
// stream (values + indices), and the token-vectorised kernel of nm_kernels.h
// wastes its vectors: 1 token fills 1 of 16 lanes. Here the vectors run along
// the kept entries of weight rows instead, so every lane of every weight load
// is used, and the x operand each lane needs is fetched from a register:
//
//   a chunk of one row is `lanes` <= 8 consecutive entries = `groups` whole
//   groups, covering `span` <= 16 consecutive inputs. Those inputs of one
//   token sit in one zmm (the "table"); each lane's input is picked by one
//   vpermps whose control is the lane's position inside the chunk (group base
//   + index). vpermps is a single uop with a non-destructive source: measured
//   ~1.5x the rate of the two-table vpermt2ps, which also needs a register
//   copy per use. Each zmm holds the chunks of two rows: lanes 0-7 row a,
//   lanes 8-15 row b, so 8-entry chunks still fill whole vectors.
//
// A table is loaded once per (chunk, token) and shared by the rows of a
// register block; weights and positions once per (chunk, row pair) and shared
// by the block's tokens. One permute per FMA caps the core at ~1.3 FMA/cycle
// (the shuffle and FMA pipes overlap on Zen 4/5), above what the weight stream
// allows at these token counts.
#ifndef JAXSPARSE_CPU_NM_ROWDOT_AVX512_H_
#define JAXSPARSE_CPU_NM_ROWDOT_AVX512_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/nm/nm_outlanes_avx512.h"
#include "cpu/nm/nm_panel_avx512.h"

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_NM_ISA {

// Up to this many tokens the row-vectorised kernel beats the token-vectorised
// one (measured for 2:4, 1:4 and 4:8 at 16-64 tokens; docs/cpu_speed_notes.md).
constexpr int64_t kRowDotMaxTokens = 32;
// Whole groups must fit in the 8 lanes of a row.
constexpr int32_t kRowDotMaxN = 8;
// Chunks of weight entries fetched ahead of use. Measured at T=4, 4096x4096
// 2:4, one thread: no prefetch 3.0 ms, 8-32 chunks ahead 1.8-2.1 ms. The
// permutes keep the core busy, and the hardware prefetcher alone falls behind
// the weight stream.
constexpr int64_t kRowDotAhead = 16;

// The chunk geometry of a pattern. A row's chunk takes a slot of 8 lanes
// (lanes 5-8) or 4 lanes (lanes <= 4, e.g. 1:4 and 2:8), so a zmm holds the
// chunks of 2 or 4 rows and low-density patterns still fill whole vectors.
struct RowDotChunk {
  int groups, lanes, span, slot;
  RowDotChunk(int32_t n, int32_t m) {
    groups = kRowDotMaxN / n;
    if (groups * m > 16) groups = 16 / m;
    lanes = groups * n;
    span = groups * m;
    slot = lanes <= 4 ? 4 : 8;
  }
};

// Helpers for a vector of kRows row chunks: row q in lanes [q*kSlot, q*kSlot + kSlot).
template <int kRows>
struct RowVec {
  static constexpr int kSlot = 16 / kRows;
  static constexpr unsigned kRowMask = (1u << kSlot) - 1;

  // Storage -> f32 for lanes in `keep` (others zero) of rows p, p + stride, ...
  // Masked-off lanes are not read (and cannot fault), so loads stay inside
  // the arrays.
  template <class D>
  static __m512 Values(const typename D::Storage* p, int64_t stride,
                       __mmask16 keep) {
    if constexpr (std::is_same_v<typename D::Storage, float>) {
      __m512 v = _mm512_setzero_ps();
      for (int q = 0; q < kRows; ++q)
        v = _mm512_mask_loadu_ps(v, keep & (kRowMask << (kSlot * q)),
                                 p + q * stride - kSlot * q);
      return v;
    } else {
      __m256i h = _mm256_setzero_si256();
      for (int q = 0; q < kRows; ++q)
        h = _mm256_mask_loadu_epi16(h, keep & (kRowMask << (kSlot * q)),
                                    p + q * stride - kSlot * q);
      return WidenHalves<D>(h);
    }
  }

  // Values() for chunks whose every lane is live: plain loads and inserts
  // (measured faster than the chain of merging masked loads).
  template <class D>
  static __m512 ValuesWhole(const typename D::Storage* p, int64_t stride) {
    if constexpr (std::is_same_v<typename D::Storage, float>) {
      if constexpr (kRows == 2) {
        return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(p)),
                                  _mm256_loadu_ps(p + stride), 1);
      } else {
        __m512 v = _mm512_castps128_ps512(_mm_loadu_ps(p));
        v = _mm512_insertf32x4(v, _mm_loadu_ps(p + stride), 1);
        v = _mm512_insertf32x4(v, _mm_loadu_ps(p + 2 * stride), 2);
        return _mm512_insertf32x4(v, _mm_loadu_ps(p + 3 * stride), 3);
      }
    } else {
      return Values<D>(p, stride, 0xffff);
    }
  }

  static __m512i Indices(const uint8_t* p, int64_t stride, __mmask16 live) {
    __m128i b = _mm_setzero_si128();
    for (int q = 0; q < kRows; ++q)
      b = _mm_mask_loadu_epi8(b, live & (kRowMask << (kSlot * q)),
                              p + q * stride - kSlot * q);
    return _mm512_cvtepu8_epi32(b);
  }

  static __m512i IndicesWhole(const uint8_t* p, int64_t stride) {
    if constexpr (kRows == 2) {
      return _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)),
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + stride))));
    } else {
      int32_t w[4];
      for (int q = 0; q < 4; ++q) std::memcpy(&w[q], p + q * stride, 4);
      return _mm512_cvtepu8_epi32(_mm_setr_epi32(w[0], w[1], w[2], w[3]));
    }
  }

  // The 2-bit positions of the row chunks (`bytes` <= kSlot/4 bytes of each
  // of the first `rows` rows, entry e of a row at bits 2*(e%4) of byte e/4):
  // the rows' bits are concatenated in one 32-bit word, row q at bit
  // 2*kSlot*q, which is exactly where lane kSlot*q starts when lane l takes
  // bits 2l. So one broadcast and one variable shift decode the whole
  // vector (a quarter of the bytes of the uint8 positions, for 3 uops).
  static __m512i Positions2(const uint8_t* p, int64_t stride, int64_t rows,
                            int bytes) {
    uint32_t word = 0;
    for (int q = 0; q < kRows && q < rows; ++q) {
      uint32_t part = 0;
      std::memcpy(&part, p + q * stride, bytes);
      word |= part << (2 * kSlot * q);
    }
    const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16,
                                             18, 20, 22, 24, 26, 28, 30);
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(word), shifts),
                            _mm512_set1_epi32(3));
  }

  // The live lanes of a vector whose first `rows` rows exist, each with the
  // chunk lanes `row_live`.
  static __mmask16 Live(__mmask16 row_live, int64_t rows) {
    unsigned live = 0;
    for (int q = 0; q < kRows && q < rows; ++q) live |= unsigned{row_live} << (kSlot * q);
    return static_cast<__mmask16>(live);
  }

  static float Sum(__m512 v, int q) {
    return _mm512_reduce_add_ps(_mm512_maskz_mov_ps(
        static_cast<__mmask16>(kRowMask << (kSlot * q)), v));
  }
};

// kPacked: positions come from the 2-bit array (NmProblem::indices_2bit; m =
// 4 with whole-slot chunks of 4 or 8 lanes, so a chunk's positions are whole
// bytes), else from the uint8 indices.
template <class D, bool kPacked = false>
struct RowDot : Dims {
  using S = typename D::Storage;

  const NmProblem& p;
  const NmRuntime& rt;
  int64_t chunks, x_stride;
  RowDotChunk chunk;
  __m512i base;  // Lane -> its group's first input inside the chunk.
  int64_t rows_per_task, row_tasks;
  float* xs = nullptr;  // [T, x_stride] f32, zero padded past K.
  // Per batch.
  const S* values = nullptr;
  const uint8_t* idx = nullptr;
  const uint8_t* idx2 = nullptr;  // kPacked: [N, Kc2] bytes.
  int64_t Kc2 = 0;
  S* y = nullptr;

  static bool Applies(const NmProblem& p) {
    if (p.tokens > kRowDotMaxTokens || p.n > kRowDotMaxN) return false;
    if (!kPacked) return true;
    const RowDotChunk c(p.n, p.m);
    return p.indices_2bit != nullptr && p.m == 4 && c.lanes == c.slot;
  }

  RowDot(const NmProblem& prob, const NmRuntime& runtime)
      : Dims(prob),
        p(prob),
        rt(runtime),
        chunk(prob.n, prob.m) {
    chunks = CeilDiv(G, chunk.groups);
    Kc2 = CeilDiv(Kc, 4);
    // The last chunk's table reaches 16 floats past its start.
    x_stride = RoundUp(chunks * chunk.span + 16, 16);
    alignas(64) int32_t b[16] = {};
    for (int l = 0; l < 16; ++l) {
      const int in_slot = l % chunk.slot;
      b[l] = in_slot < chunk.lanes ? (in_slot / n) * m : 0;
    }
    base = _mm512_load_si512(b);
    // Enough tasks to balance the workers; whole register blocks each.
    rows_per_task =
        Max(16, Min(64, RoundUp(CeilDiv(N, 8 * rt.num_workers), 16)));
    row_tasks = CeilDiv(N, rows_per_task);
  }

  void Layout(Carver& c) { xs = c.Take<float>(T * x_stride); }

  bool Compute() {
    if (T == 0 || N == 0 || p.batch == 0) return true;
    if (!TakeScratch(rt, *this)) return false;
    for (int64_t b = 0; b < p.batch; ++b) {
      const S* x = static_cast<const S*>(p.x) + b * p.x_stride;
      values = static_cast<const S*>(p.values) + b * p.values_stride;
      idx = p.indices + b * p.indices_stride;
      if (kPacked) idx2 = p.indices_2bit + b * p.indices_2bit_stride;
      y = static_cast<S*>(p.out) + b * T * N;
      if (b == 0 || p.x_stride != 0) PackRowsF32<D>(x, T, K, x_stride, xs);
      RunParallel(rt, row_tasks, *this);
    }
    return true;
  }


  // Register blocks: kVecs vectors of rows x up to kTb tokens (2 x 8 for
  // several tokens: 16 accumulators, 8 tables, measured fastest of 1x16,
  // 2x6, 2x8, 3x6, 4x4 at T=16; 8 x 1 for one token).
  void Run(int64_t task, int /*worker*/) const {
    const int64_t j0 = task * rows_per_task, j1 = Min(N, j0 + rows_per_task);
    if (chunk.slot == 8) {
      if (T == 1) return Rows<2, 8, 1>(j0, j1);
      return Rows<2, 2, 8>(j0, j1);
    }
    if (T == 1) return Rows<4, 8, 1>(j0, j1);
    Rows<4, 2, 8>(j0, j1);
  }

  // Left-over rows go one vector at a time, its missing rows masked off; each
  // block's token count gets its own fully unrolled kernel.
  template <int kRows, int kVecs, int kTb>
  void Rows(int64_t j0, int64_t j1) const {
    for (int64_t t0 = 0; t0 < T; t0 += kTb) {
      const int tb = static_cast<int>(Min(kTb, T - t0));
      Dispatch<kTb>(tb, [&](auto toks) {
        constexpr int kT = decltype(toks)::value;
        constexpr int64_t kBlockRows = int64_t{kRows} * kVecs;
        int64_t j = j0;
        for (; j + kBlockRows <= j1; j += kBlockRows) {
          Block<kRows, kVecs, kT>(j, kBlockRows, t0);
        }
        for (; j < j1; j += kRows) Block<kRows, 1, kT>(j, Min(kRows, j1 - j), t0);
      });
    }
  }

  // Rows j .. j + rows - 1 (rows <= kRows * kVecs) x tokens t0 .. t0 + kTb - 1.
  template <int kRows, int kVecs, int kTb>
  void Block(int64_t j, int64_t rows, int64_t t0) const {
    using RV = RowVec<kRows>;
    // Locals: the compiler then keeps every accumulator in a register.
    const int64_t kc = Kc, stride = x_stride, span = chunk.span;
    const int64_t lanes = chunk.lanes, num_chunks = chunks;
    const float* const x0 = xs + t0 * stride;
    const uint8_t* const ix = idx + j * kc;
    const int64_t kc2 = Kc2;
    const uint8_t* const ix2 = kPacked ? idx2 + j * kc2 : nullptr;
    const S* const vs = values + j * kc;
    const __m512i limit = _mm512_set1_epi32(m), lane_base = base;
    const __mmask16 one = static_cast<__mmask16>((1u << lanes) - 1);
    const bool whole_rows = rows == int64_t{kRows} * kVecs;
    __m512 acc[kVecs][kTb];
#pragma GCC unroll 16
    for (int v = 0; v < kVecs; ++v)
#pragma GCC unroll 16
      for (int t = 0; t < kTb; ++t) acc[v][t] = _mm512_setzero_ps();

    // One chunk of every row of the block. kPlain: every lane is live (whole
    // slots, whole rows, inside the rows' entries): no load masks.
    auto step = [&](int64_t c, __mmask16 row_live, auto plain) {
      constexpr bool kPlain = decltype(plain)::value;
      const int64_t e0 = c * lanes;
      __m512 table[kTb];
#pragma GCC unroll 16
      for (int t = 0; t < kTb; ++t)
        table[t] = _mm512_loadu_ps(x0 + t * stride + c * span);
#pragma GCC unroll 16
      for (int v = 0; v < kVecs; ++v) {
        const int64_t at = int64_t{v} * kRows * kc + e0;
        // The weight rows stream from memory while the permutes keep the
        // core busy: fetch them kRowDotAhead chunks early, every other chunk
        // (two chunks of a row are <= 64 bytes of values).
        if ((c & 1) == 0) {
          const int64_t ahead = at + kRowDotAhead * lanes;
#pragma GCC unroll 16
          for (int q = 0; q < kRows; ++q) {
            _mm_prefetch(reinterpret_cast<const char*>(vs + ahead + q * kc), _MM_HINT_T0);
            if (!kPacked) {
              _mm_prefetch(reinterpret_cast<const char*>(ix + ahead + q * kc), _MM_HINT_T0);
            }
          }
          // 2-bit positions: a line holds 256 entries (32 or 64 chunks) of
          // a row; fetch two lines ahead, once per line.
          if (kPacked && (c & 31) == 0) {
#pragma GCC unroll 16
            for (int q = 0; q < kRows; ++q) {
              const int64_t row = int64_t{v} * kRows + q;
              _mm_prefetch(reinterpret_cast<const char*>(ix2 + row * kc2 + e0 / 4 + 128),
                           _MM_HINT_T0);
            }
          }
        }
        const __mmask16 live = RV::Live(row_live, rows - int64_t{v} * kRows);
        __m512i i32;
        if constexpr (kPacked) {
          // Whole bytes per row chunk (lanes is 4 or 8); the row's last
          // chunk may have fewer bytes left.
          const int64_t first = e0 / 4;
          const int bytes = kPlain ? RV::kSlot / 4
                                   : static_cast<int>(Min(RV::kSlot / 4, kc2 - first));
          i32 = RV::Positions2(ix2 + int64_t{v} * kRows * kc2 + first, kc2,
                               rows - int64_t{v} * kRows, bytes);
        } else {
          i32 = kPlain ? RV::IndicesWhole(ix + at, kc) : RV::Indices(ix + at, kc, live);
        }
        // An index >= m (garbage that reached the kernel under jit) would
        // name another group's input: its lane is dropped instead, and a
        // zeroing permute makes it add 0, not 0 * (an inf in x). Lanes past
        // a row's end, unused slot lanes and missing rows are zero in w and
        // pick from inside the table (finite unless x holds an inf there);
        // they are dropped the same way. (2-bit positions are < 4 = m.)
        const __mmask16 keep =
            kPacked ? live : _mm512_mask_cmplt_epu32_mask(live, i32, limit);
        const __m512i pos = _mm512_add_epi32(lane_base, i32);
        if (kPlain && __builtin_expect(keep == 0xffff, 1)) {
          const __m512 w = RV::template ValuesWhole<D>(vs + at, kc);
#pragma GCC unroll 16
          for (int t = 0; t < kTb; ++t)
            acc[v][t] = _mm512_fmadd_ps(
                w, _mm512_permutexvar_ps(pos, table[t]), acc[v][t]);
        } else {
          // Zeroing permutes measured 0.84x the rate of plain ones.
          const __m512 w = RV::template Values<D>(vs + at, kc, keep);
#pragma GCC unroll 16
          for (int t = 0; t < kTb; ++t)
            acc[v][t] = _mm512_fmadd_ps(
                w, _mm512_maskz_permutexvar_ps(keep, pos, table[t]), acc[v][t]);
        }
      }
    };

    // Chunks whose entries are all inside the rows.
    const int64_t whole = Min(num_chunks, kc / lanes);
    int64_t c = 0;
    if (lanes == RV::kSlot && whole_rows) {
      for (; c < whole; ++c) step(c, one, std::true_type{});
    } else {
      for (; c < whole; ++c) step(c, one, std::false_type{});
    }
    for (; c < num_chunks; ++c) {  // The end of the rows.
      step(c, static_cast<__mmask16>((1u << (kc - c * lanes)) - 1), std::false_type{});
    }
#pragma GCC unroll 16
    for (int v = 0; v < kVecs; ++v) {
#pragma GCC unroll 16
      for (int t = 0; t < kTb; ++t) {
        S* out = y + (t0 + t) * N + j + int64_t{v} * kRows;
#pragma GCC unroll 16
        for (int q = 0; q < kRows; ++q) {
          if (int64_t{v} * kRows + q < rows) out[q] = D::FromF32(RV::Sum(acc[v][t], q));
        }
      }
    }
  }
};

// The forward for AVX-512: 2:4 at 9-32 tokens and 1:4 at 1-48 with outputs in
// the lanes (nm_outlanes_avx512.h), the row-vectorised kernel at other few-token
// counts, f32 2:4 at many on dense panels (nm_panel_avx512.h), else the
// token-vectorised one.
template <class D>
bool SpmmAvx512(const NmProblem& p, const NmRuntime& rt) {
  if (NmPanels::Applies(p)) {
    NmPanels op(p, rt);
    return op.Compute();
  }
  if (OutLanes<D>::Applies(p)) {
    OutLanes<D> op(p, rt);
    return op.Compute();
  }
  if (RowDot<D, true>::Applies(p)) {
    RowDot<D, true> op(p, rt);
    return op.Compute();
  }
  if (RowDot<D>::Applies(p)) {
    RowDot<D> op(p, rt);
    return op.Compute();
  }
  Spmm<Traits, D> op(p, rt);
  return op.Compute();
}

inline bool SpmmAvx512Any(const NmProblem& p, const NmRuntime& rt) {
  switch (p.dtype) {
    case NmDtype::kF32:
      return SpmmAvx512<F32<Traits>>(p, rt);
    case NmDtype::kBF16:
      return SpmmAvx512<BF16<Traits>>(p, rt);
    case NmDtype::kF16:
      return SpmmAvx512<F16<Traits>>(p, rt);
  }
  return true;
}

}  // namespace JAXSPARSE_NM_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_NM_ROWDOT_AVX512_H_
