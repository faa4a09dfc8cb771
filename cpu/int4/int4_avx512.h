// The int4 kernels' AVX-512 blocks (included by int4_kernels.h in the AVX-512
// units), with outputs in vector lanes: a qweight row is contiguous along the
// outputs, so 16 bytes are 16 outputs' nibble pairs (two inputs, or one 2:4
// group), and one `vpmovzxbd` spreads them over the 16 lanes of a vector.
// The nibbles are split by an and / a shift and converted to f32 in
// registers: the weight is read once from memory, at its 4 bits per value.
// GCC 12 warns that the masked-load intrinsics' pass-through operand "may be
// used uninitialized" (it is a zero vector): silenced as in simd_avx512.h.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cstring>

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_INT4_ISA {
namespace int4 {

// A task walks down a column of qweight: consecutive rows are N bytes apart,
// each on its own 4 KB page at harness sizes, where the hardware prefetchers
// stop. Rows this far ahead are requested in software, so that many lines are
// in flight at once (measured without: 2.9 GB/s at 1 token, 4096 x 4096).
constexpr int64_t kPrefetchRows = 48;

inline void PrefetchRow(const uint8_t* row) {
  _mm_prefetch(reinterpret_cast<const char*>(row), _MM_HINT_T0);
}

// 16 bytes of a qweight (or positions) row as 16 dwords.
inline __m512i LoadBytes(const uint8_t* row, __mmask16 mask) {
  return _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, row));
}

// Outputs [o, o + 16) of byte row r (o a multiple of 16) as dwords, read from
// the canonical qweight, or from the lines (int4_checks.h): there byte
// (o % 64) / 16 of each dword of the row's line in the block of o.
inline __m512i RowBytes(const Int4Problem& p, const uint8_t* qweight, int64_t r, int64_t o,
                        __mmask16 mask) {
  if (!p.lines) return LoadBytes(qweight + r * p.n_out + o, mask);
  const __m512i line = _mm512_loadu_si512(qweight + ((o / 64) * (p.k / 2) + r) * 64);
  return _mm512_maskz_and_epi32(mask, _mm512_srli_epi32(line, 8 * static_cast<int>(o % 64 / 16)),
                                _mm512_set1_epi32(0xFF));
}

// Products by W, dense form: 4 vectors of 16 outputs and nt tokens of
// accumulators (16 registers at 4 tokens); per pair of input rows, 4 loads of
// 16 bytes (the task's 64-byte line) and 2 nt FMAs per vector. The unsigned
// nibbles u are multiplied as they are; the - 8 and the scale come once per
// group (y += s (acc - 8 sum x)).
template <int kTokens>
void ForwardDenseTokens(const Ctx& c, int64_t o0, int64_t on, int64_t t0, float* y) {
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out, k = p.k, groups = k / p.group;
  const int vecs = static_cast<int>((on + 15) / 16);
  __mmask16 masks[4];
  for (int v = 0; v < 4; ++v) masks[v] = v < vecs ? LaneMask(on - 16 * v) : 0;
  const __m512i low = _mm512_set1_epi32(15);
  __m512 out[4][kTokens];
  for (int v = 0; v < 4; ++v)
    for (int t = 0; t < kTokens; ++t) out[v][t] = _mm512_setzero_ps();
  // The walk's first rows at once (kernel_util.h).
  PrefetchSpans(c.qweight + o0, n, std::min(kPrefetchRows, k / 2), on);
  for (int64_t g = 0; g < groups; ++g) {
    PrefetchSpans(c.scales + g * n + o0, 0, 1, on * 4);  // Read at the group's end.
    __m512 acc[4][kTokens];
    for (int v = 0; v < 4; ++v)
      for (int t = 0; t < kTokens; ++t) acc[v][t] = _mm512_setzero_ps();
    for (int64_t i = g * p.group; i < (g + 1) * p.group; i += 2) {
      const uint8_t* row = c.qweight + (i >> 1) * n + o0;
      if ((i >> 1) + kPrefetchRows < k / 2) PrefetchRow(row + kPrefetchRows * n);
      __m512 x0[kTokens], x1[kTokens];
      for (int t = 0; t < kTokens; ++t) {
        x0[t] = _mm512_set1_ps(c.dense[(t0 + t) * k + i]);
        x1[t] = _mm512_set1_ps(c.dense[(t0 + t) * k + i + 1]);
      }
      for (int v = 0; v < vecs; ++v) {
        const __m512i d = LoadBytes(row + 16 * v, masks[v]);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(d, low));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(d, 4));
        for (int t = 0; t < kTokens; ++t) {
          acc[v][t] = _mm512_fmadd_ps(lo, x0[t], acc[v][t]);
          acc[v][t] = _mm512_fmadd_ps(hi, x1[t], acc[v][t]);
        }
      }
    }
    for (int v = 0; v < vecs; ++v) {
      const __m512 s = _mm512_maskz_loadu_ps(masks[v], c.scales + g * n + o0 + 16 * v);
      for (int t = 0; t < kTokens; ++t) {
        const __m512 offset = _mm512_set1_ps(8.0f * c.xsum[(t0 + t) * groups + g]);
        out[v][t] = _mm512_fmadd_ps(s, _mm512_sub_ps(acc[v][t], offset), out[v][t]);
      }
    }
  }
  for (int v = 0; v < vecs; ++v)
    for (int t = 0; t < kTokens; ++t) _mm512_store_ps(y + t * kOutBlock + 16 * v, out[v][t]);
}

// 16 outputs' 2:4 group j: its two values (u - 8, as f32) and their positions
// (0..3) in the group, lane by lane.
struct SparseLanes {
  __m512 v0, v1;
  __m512i p0, p1;
};

// From the arrays themselves: what the tile decoder of int4_tiles.h calls,
// which has no Ctx. The canonical rows are 16-byte loads; the lines
// (int4_checks.h) hold group j's byte in byte j % 4 of each dword of the
// chunk's value line and index line (4 j + p0 | (4 j + p1) << 4: the
// positions are an index's low 2 bits).
inline SparseLanes DecodeSparse(const Int4Problem& p, const uint8_t* qweight,
                                const uint8_t* positions, int64_t j, int64_t o, __mmask16 mask) {
  const __m512i low = _mm512_set1_epi32(15), three = _mm512_set1_epi32(3);
  const __m512i eight = _mm512_set1_epi32(8);
  __m512i d, p0, p1;
  if (p.lines) {
    const uint8_t* values = qweight + NmLinesChunk(p, j, o) + o % 64 / 16 * 64;
    const unsigned shift = static_cast<unsigned>(8 * (j % 4));
    d = _mm512_maskz_and_epi32(mask, _mm512_srli_epi32(_mm512_loadu_si512(values), shift),
                               _mm512_set1_epi32(0xFF));
    const __m512i index = _mm512_srli_epi32(_mm512_loadu_si512(values + 4 * 64), shift);
    p0 = _mm512_and_si512(index, three);
    p1 = _mm512_and_si512(_mm512_srli_epi32(index, 4), three);
  } else {
    d = LoadBytes(qweight + j * p.n_out + o, mask);
    const __m512i codes = _mm512_srli_epi32(LoadBytes(positions + (j >> 1) * p.n_out + o, mask),
                                            static_cast<unsigned>(4 * (j & 1)));
    p0 = _mm512_and_si512(codes, three);
    p1 = _mm512_and_si512(_mm512_srli_epi32(codes, 2), three);
  }
  SparseLanes lanes;
  lanes.v0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(d, low), eight));
  lanes.v1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(d, 4), eight));
  lanes.p0 = p0;
  lanes.p1 = p1;
  return lanes;
}

inline SparseLanes DecodeSparse(const Ctx& c, int64_t j, int64_t o, __mmask16 mask) {
  return DecodeSparse(*c.p, c.qweight, c.positions, j, o, mask);
}

// A 2:4 group's 4 inputs' weights lane by lane from its two values v0, v1
// (as decoded, or scaled): each input gets the value whose position it is,
// else zero. Added, not chosen: unvalidated positions may name one input
// twice, and the reference then sums both values there.
inline void SpreadGroup(const SparseLanes& lanes, __m512 v0, __m512 v1, __m512* w) {
  for (int q = 0; q < 4; ++q) {
    const __m512i slot = _mm512_set1_epi32(q);
    w[q] = _mm512_add_ps(_mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(lanes.p0, slot), v0),
                         _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(lanes.p1, slot), v1));
  }
}

// Products by W, 2:4 form: per 2:4 group and vector, the two values (u - 8,
// converted) and their positions; each lane's inputs come from a permute of
// the group's 4 inputs (x[4j .. 4j + 3] in the low 128 bits).
template <int kTokens>
void ForwardSparseTokens(const Ctx& c, int64_t o0, int64_t on, int64_t t0, float* y) {
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out, k = p.k, groups = k / p.group, per_group = p.group / 4;
  const int vecs = static_cast<int>((on + 15) / 16);
  // The walk's first rows at once (kernel_util.h); the later vectors' bytes
  // share the first one's lines.
  PrefetchSpans(c.qweight + o0, n, std::min(kPrefetchRows, k / 4), on);
  PrefetchSpans(c.positions + o0, n, std::min(kPrefetchRows, k / 8), on);
  for (int v = 0; v < vecs; ++v) {
    const __mmask16 mask = LaneMask(on - 16 * v);
    const int64_t o = o0 + 16 * v;
    __m512 out[kTokens];
    for (int t = 0; t < kTokens; ++t) out[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      // The group's scales, read at its end.
      PrefetchSpans(c.scales + g * n + o, 0, 1, std::min<int64_t>(16, n - o) * 4);
      __m512 acc[kTokens];
      for (int t = 0; t < kTokens; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t j = g * per_group; j < (g + 1) * per_group; ++j) {
        if (j + kPrefetchRows < k / 4) {
          PrefetchRow(c.qweight + (j + kPrefetchRows) * n + o);
          if ((j & 1) == 0) PrefetchRow(c.positions + ((j >> 1) + kPrefetchRows) * n + o);
        }
        const SparseLanes w = DecodeSparse(c, j, o, mask);
        for (int t = 0; t < kTokens; ++t) {
          const __m512 xg = _mm512_castps128_ps512(_mm_loadu_ps(c.dense + (t0 + t) * k + 4 * j));
          acc[t] = _mm512_fmadd_ps(w.v0, _mm512_permutexvar_ps(w.p0, xg), acc[t]);
          acc[t] = _mm512_fmadd_ps(w.v1, _mm512_permutexvar_ps(w.p1, xg), acc[t]);
        }
      }
      const __m512 s = _mm512_maskz_loadu_ps(mask, c.scales + g * n + o);
      for (int t = 0; t < kTokens; ++t) out[t] = _mm512_fmadd_ps(s, acc[t], out[t]);
    }
    for (int t = 0; t < kTokens; ++t) _mm512_store_ps(y + t * kOutBlock + 16 * v, out[t]);
  }
}

inline void ForwardDenseAvx512(const Ctx& c, int64_t o0, int64_t on, int64_t t0, int nt,
                               float* y) {
  switch (nt) {
    case 1: return ForwardDenseTokens<1>(c, o0, on, t0, y);
    case 2: return ForwardDenseTokens<2>(c, o0, on, t0, y);
    case 3: return ForwardDenseTokens<3>(c, o0, on, t0, y);
    default: return ForwardDenseTokens<4>(c, o0, on, t0, y);
  }
}

inline void ForwardSparseAvx512(const Ctx& c, int64_t o0, int64_t on, int64_t t0, int nt,
                                float* y) {
  switch (nt) {
    case 1: return ForwardSparseTokens<1>(c, o0, on, t0, y);
    case 2: return ForwardSparseTokens<2>(c, o0, on, t0, y);
    case 3: return ForwardSparseTokens<3>(c, o0, on, t0, y);
    default: return ForwardSparseTokens<4>(c, o0, on, t0, y);
  }
}

// Products by W^T, dense form: per pair of input rows, the dot products of
// both rows with each token's scaled dy, along the outputs (16 per vector),
// then one horizontal sum per row and token.
template <int kTokens>
void BackwardDenseTokens(const Ctx& c, int64_t i0, int64_t rows, const float* dys,
                         float* dx) {
  const int64_t n = c.p->n_out;
  const __m512i low = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
  // The task's rows start on an even input (groups and row blocks are even).
  for (int64_t r = 0; r < rows; r += 2) {
    const uint8_t* row = c.qweight + ((i0 + r) >> 1) * n;
    __m512 acc0[kTokens], acc1[kTokens];
    for (int t = 0; t < kTokens; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
    for (int64_t o = 0; o < n; o += 16) {
      const __mmask16 mask = LaneMask(n - o);
      const __m512i d = LoadBytes(row + o, mask);
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(d, low), eight));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(d, 4), eight));
      for (int t = 0; t < kTokens; ++t) {
        const __m512 g = _mm512_maskz_loadu_ps(mask, dys + t * n + o);
        acc0[t] = _mm512_fmadd_ps(lo, g, acc0[t]);
        acc1[t] = _mm512_fmadd_ps(hi, g, acc1[t]);
      }
    }
    for (int t = 0; t < kTokens; ++t) {
      dx[t * kRowBlock * 4 + r] = _mm512_reduce_add_ps(acc0[t]);
      if (r + 1 < rows) dx[t * kRowBlock * 4 + r + 1] = _mm512_reduce_add_ps(acc1[t]);
    }
  }
}

// The 2:4 form: per group, each of the 4 inputs' weights along the outputs
// (SpreadGroup), then an FMA per token, and a horizontal sum per input.
template <int kTokens>
void BackwardSparseTokens(const Ctx& c, int64_t j0, int64_t count, const float* dys,
                          float* dx) {
  const int64_t n = c.p->n_out;
  for (int64_t r = 0; r < count; ++r) {
    const int64_t j = j0 + r;
    __m512 acc[4][kTokens];
    for (int s = 0; s < 4; ++s)
      for (int t = 0; t < kTokens; ++t) acc[s][t] = _mm512_setzero_ps();
    for (int64_t o = 0; o < n; o += 16) {
      const __mmask16 mask = LaneMask(n - o);
      const SparseLanes lanes = DecodeSparse(c, j, o, mask);
      __m512 w[4];
      SpreadGroup(lanes, lanes.v0, lanes.v1, w);
      for (int t = 0; t < kTokens; ++t) {
        const __m512 g = _mm512_maskz_loadu_ps(mask, dys + t * n + o);
        for (int s = 0; s < 4; ++s) acc[s][t] = _mm512_fmadd_ps(w[s], g, acc[s][t]);
      }
    }
    for (int t = 0; t < kTokens; ++t)
      for (int s = 0; s < 4; ++s) {
        dx[t * kRowBlock * 4 + 4 * r + s] = _mm512_reduce_add_ps(acc[s][t]);
      }
  }
}

inline void BackwardDenseAvx512(const Ctx& c, int64_t i0, int64_t rows, int nt,
                                const float* dys, float* dx) {
  switch (nt) {
    case 1: return BackwardDenseTokens<1>(c, i0, rows, dys, dx);
    case 2: return BackwardDenseTokens<2>(c, i0, rows, dys, dx);
    case 3: return BackwardDenseTokens<3>(c, i0, rows, dys, dx);
    default: return BackwardDenseTokens<4>(c, i0, rows, dys, dx);
  }
}

inline void BackwardSparseAvx512(const Ctx& c, int64_t j0, int64_t count, int nt,
                                 const float* dys, float* dx) {
  switch (nt) {
    case 1: return BackwardSparseTokens<1>(c, j0, count, dys, dx);
    case 2: return BackwardSparseTokens<2>(c, j0, count, dys, dx);
    case 3: return BackwardSparseTokens<3>(c, j0, count, dys, dx);
    default: return BackwardSparseTokens<4>(c, j0, count, dys, dx);
  }
}

// ---------------------------------------------------------------- the lines layout
// Products by W on the CPU lines (int4_checks.h): a task's 64 outputs are one
// sequential stream of 64-byte lines, which the hardware prefetchers follow
// (the canonical column walk crosses a 4 KB page per row, where they stop:
// measured 0.84 ms against 0.52 streamed for the same decode at 4096 x 4096,
// benchmarks/int4_walk_probe.cc). Dword lane l of a line holds outputs
// 16 j + l in byte j. vpermps reads only the low 4 bits of each index lane,
// so it looks up u - 8 as f32 straight from a vector whose low byte is byte j:
// the line loaded from j bytes further on (the load ports are idle, where a
// shift by 8 j would take a vector pipe; Zen 4 splits each 512-bit operation
// in two), and that load shifted by 4 for the odd input. 20 vector
// operations per 128 weights, 23 with shifts only; no software prefetch, which
// cost more issue slots than it saved on the sequential stream (a variant of
// the probe: 0.41-0.44 ms streamed without, 0.44-0.49 with, 16-128 lines ahead).

// Bytes [j, j + 64) of a line; the array's last line has no bytes after it,
// so its top j bytes come from a masked load (which never faults) as zeros,
// in lanes whose low byte alone is used.
inline __m512i LineFrom(const uint8_t* line, int j, bool last) {
  if (j == 0) return _mm512_loadu_si512(line);
  if (last) return _mm512_maskz_loadu_epi8(~uint64_t{0} >> j, line + j);
  return _mm512_loadu_si512(line + j);
}

// The last line of a batch entry's lines `qweight`: the last block's last
// input pair (the one LineFrom must not read past).
inline const uint8_t* LastLine(const Int4Problem& p, const uint8_t* qweight) {
  return qweight + ((p.n_out + kOutBlock - 1) / kOutBlock * (p.k / 2) - 1) * 64;
}

// kBlocks 64-output blocks per task: at 1 token two (two streams and 8
// independent accumulator chains per core: 10-15% faster than one in
// benchmarks/int4_walk_probe.cc's terms, resident and streamed); more tokens
// fill the registers with one.
template <int kTokens, int kBlocks>
void ForwardLinesTokens(const Ctx& c, int64_t o0, int64_t on, int64_t t0, float* y) {
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out, k = p.k, groups = k / p.group;
  constexpr int kVecs = 4 * kBlocks;  // vector v: block v / 4, byte j = v % 4 of each dword
  const __m512 values = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const uint8_t* lines[kBlocks];
  for (int b = 0; b < kBlocks; ++b) lines[b] = c.qweight + (o0 / kOutBlock + b) * (k / 2) * 64;
  const uint8_t* last_line = LastLine(p, c.qweight);
  __mmask16 masks[kVecs];
  for (int v = 0; v < kVecs; ++v) masks[v] = 16 * v < on ? LaneMask(on - 16 * v) : 0;
  __m512 out[kVecs][kTokens];
  for (int v = 0; v < kVecs; ++v)
    for (int t = 0; t < kTokens; ++t) out[v][t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    PrefetchSpans(c.scales + g * n + o0, 0, 1, on * 4);  // Read at the group's end.
    __m512 acc[kVecs][kTokens];
    for (int v = 0; v < kVecs; ++v)
      for (int t = 0; t < kTokens; ++t) acc[v][t] = _mm512_setzero_ps();
    for (int64_t i = g * p.group; i < (g + 1) * p.group; i += 2) {
      __m512 x0[kTokens], x1[kTokens];
      for (int t = 0; t < kTokens; ++t) {
        x0[t] = _mm512_set1_ps(c.dense[(t0 + t) * k + i]);
        x1[t] = _mm512_set1_ps(c.dense[(t0 + t) * k + i + 1]);
      }
      for (int b = 0; b < kBlocks; ++b) {
        const uint8_t* line = lines[b] + (i >> 1) * 64;
        const bool last = line == last_line;
        for (int j = 0; j < 4; ++j) {
          const __m512i bytes = LineFrom(line, j, last);
          const __m512 lo = _mm512_permutexvar_ps(bytes, values);
          const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), values);
          for (int t = 0; t < kTokens; ++t) {
            acc[4 * b + j][t] = _mm512_fmadd_ps(lo, x0[t], acc[4 * b + j][t]);
            acc[4 * b + j][t] = _mm512_fmadd_ps(hi, x1[t], acc[4 * b + j][t]);
          }
        }
      }
    }
    for (int v = 0; v < kVecs; ++v) {
      const __m512 s = _mm512_maskz_loadu_ps(masks[v], c.scales + g * n + o0 + 16 * v);
      for (int t = 0; t < kTokens; ++t) out[v][t] = _mm512_fmadd_ps(s, acc[v][t], out[v][t]);
    }
  }
  // Row t of y at t * kOutBlock: kBlocks > 1 only at 1 token.
  for (int v = 0; v < kVecs; ++v)
    for (int t = 0; t < kTokens; ++t) _mm512_store_ps(y + t * kOutBlock + 16 * v, out[v][t]);
}

// `on` up to 128 outputs at 1 token (two blocks, the lines' pair tasks), else
// up to 64.
inline void ForwardLinesAvx512(const Ctx& c, int64_t o0, int64_t on, int64_t t0, int nt,
                               float* y) {
  switch (nt) {
    case 1:
      if (on > kOutBlock) return ForwardLinesTokens<1, 2>(c, o0, on, t0, y);
      return ForwardLinesTokens<1, 1>(c, o0, on, t0, y);
    case 2: return ForwardLinesTokens<2, 1>(c, o0, on, t0, y);
    case 3: return ForwardLinesTokens<3, 1>(c, o0, on, t0, y);
    default: return ForwardLinesTokens<4, 1>(c, o0, on, t0, y);
  }
}

// Products by W on the 2:4 lines (int4_checks.h), outputs in lanes as in the
// dense lines: per chunk of 16 inputs each token's x[16 c .. 16 c + 16) sits
// in one vector, and a kept value's index nibble (4 j + p, its input in the
// chunk) looks its input up there with one vpermps; its code looks up u - 8
// as the dense lines do. Per 16 outputs and group: 2 offset loads (values,
// indices), 2 shifts, 2 + 2 nt lookups and 2 nt FMAs for 32 kept values, where
// the canonical form's decode takes about twice the vector operations and
// walks a column of 4 KB pages (benchmarks/int4_nm_lines_probe.cc: 0.27-0.29
// ms resident at 4096 x 4096 against the dense lines' 0.33).

// Group j of a chunk's vector v (its value line and index line), for every
// token: acc[t] += w0 x[4 j + p0] + w1 x[4 j + p1].
template <int kTokens>
inline void NmLinesGroup(const uint8_t* chunk, int v, int j, const uint8_t* last_line,
                         const __m512* xs, __m512* acc) {
  const __m512 values = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const uint8_t* index_line = chunk + (4 + v) * 64;
  const __m512i vb = LineFrom(chunk + v * 64, j, false);
  const __m512i ib = LineFrom(index_line, j, index_line == last_line);
  const __m512 w0 = _mm512_permutexvar_ps(vb, values);
  const __m512 w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(vb, 4), values);
  const __m512i i1 = _mm512_srli_epi32(ib, 4);
  for (int t = 0; t < kTokens; ++t) {
    acc[t] = _mm512_fmadd_ps(w0, _mm512_permutexvar_ps(ib, xs[t]), acc[t]);
    acc[t] = _mm512_fmadd_ps(w1, _mm512_permutexvar_ps(i1, xs[t]), acc[t]);
  }
}

// kWholeChunks: every scale group is whole chunks (group % 16 == 0, so K too),
// and each line is read through (its 4 groups) before the next, as the dense
// lines are; else the chunk's lines are walked once per group j, and a scale
// group (a multiple of 8 inputs) may end after any j.
template <int kTokens, int kBlocks, bool kWholeChunks>
void ForwardNmLinesTokens(const Ctx& c, int64_t o0, int64_t on, int64_t t0, float* y) {
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out, k = p.k, chunks = (k + 15) / 16, per_group = p.group / 4;
  constexpr int kVecs = 4 * kBlocks;  // vector v: block v / 4, outputs 16 (v % 4) + lane
  // The block's lines in the weight, or the task's own copy (NmRepackTask,
  // one block, with slack after it: no line is the last).
  const uint8_t* blocks[kBlocks];
  for (int b = 0; b < kBlocks; ++b) {
    blocks[b] = c.block_lines ? c.block_lines
                              : c.qweight + (o0 / kOutBlock + b) * chunks * 8 * 64;
  }
  // The array's last line: the last block's last chunk's last index line.
  const uint8_t* last_line =
      c.block_lines ? nullptr : c.qweight + ((n + kOutBlock - 1) / kOutBlock * chunks * 8 - 1) * 64;
  __mmask16 masks[kVecs];
  for (int v = 0; v < kVecs; ++v) masks[v] = 16 * v < on ? LaneMask(on - 16 * v) : 0;
  __m512 out[kVecs][kTokens], acc[kVecs][kTokens];
  for (int v = 0; v < kVecs; ++v)
    for (int t = 0; t < kTokens; ++t) out[v][t] = acc[v][t] = _mm512_setzero_ps();
  int64_t g = 0;
  auto end_group = [&] {  // the scale group's sums into the outputs
    for (int v = 0; v < kVecs; ++v) {
      const __m512 s = _mm512_maskz_loadu_ps(masks[v], c.scales + g * n + o0 + 16 * v);
      for (int t = 0; t < kTokens; ++t) {
        out[v][t] = _mm512_fmadd_ps(s, acc[v][t], out[v][t]);
        acc[v][t] = _mm512_setzero_ps();
      }
    }
    ++g;
  };
  for (int64_t ch = 0; ch < chunks; ++ch) {
    // The ragged last chunk's inputs past K load as zeros (its padded groups'
    // indices name them, their values are code 0).
    const __mmask16 live = LaneMask(k - 16 * ch);
    __m512 xs[kTokens];
    for (int t = 0; t < kTokens; ++t) {
      xs[t] = _mm512_maskz_loadu_ps(live, c.dense + (t0 + t) * k + 16 * ch);
    }
    if (kWholeChunks) {
      for (int b = 0; b < kBlocks; ++b)
        for (int v = 0; v < 4; ++v)
          for (int j = 0; j < 4; ++j)
            NmLinesGroup<kTokens>(blocks[b] + ch * 8 * 64, v, j, last_line, xs, acc[4 * b + v]);
      if ((ch + 1) * 4 % per_group == 0) end_group();
      continue;
    }
    const int quads = static_cast<int>(std::min<int64_t>(4, k / 4 - 4 * ch));
    for (int j = 0; j < quads; ++j) {
      for (int b = 0; b < kBlocks; ++b)
        for (int v = 0; v < 4; ++v)
          NmLinesGroup<kTokens>(blocks[b] + ch * 8 * 64, v, j, last_line, xs, acc[4 * b + v]);
      if ((4 * ch + j + 1) % per_group == 0) end_group();
    }
  }
  // Row t of y at t * kOutBlock: kBlocks > 1 only at 1 token.
  for (int v = 0; v < kVecs; ++v)
    for (int t = 0; t < kTokens; ++t) _mm512_store_ps(y + t * kOutBlock + 16 * v, out[v][t]);
}

template <bool kWholeChunks>
inline void ForwardNmLinesOf(const Ctx& c, int64_t o0, int64_t on, int64_t t0, int nt,
                             float* y) {
  switch (nt) {
    case 1:
      if (on > kOutBlock) return ForwardNmLinesTokens<1, 2, kWholeChunks>(c, o0, on, t0, y);
      return ForwardNmLinesTokens<1, 1, kWholeChunks>(c, o0, on, t0, y);
    case 2: return ForwardNmLinesTokens<2, 1, kWholeChunks>(c, o0, on, t0, y);
    case 3: return ForwardNmLinesTokens<3, 1, kWholeChunks>(c, o0, on, t0, y);
    default: return ForwardNmLinesTokens<4, 1, kWholeChunks>(c, o0, on, t0, y);
  }
}

inline void ForwardNmLinesAvx512(const Ctx& c, int64_t o0, int64_t on, int64_t t0, int nt,
                                 float* y) {
  if (c.p->group % 16 == 0) return ForwardNmLinesOf<true>(c, o0, on, t0, nt, y);
  ForwardNmLinesOf<false>(c, o0, on, t0, nt, y);
}

// The canonical 2:4 form at many f32 / f16 tokens: each task packs its block
// of 64 outputs into the lines layout (int4_checks.h) in its own scratch,
// then runs the lookup kernel over every token on that copy, from L2. The
// pack is a small fraction of the products from kNmRepackMinTokens (about
// 12 vector operations per 16 groups of 16 outputs, once per call), and the
// lookup multiplies the kept values only, where the panels multiply the zeros
// too (docs/cpu_speed_notes.md, int4 eleventh round). bf16 keeps its tiles.
constexpr int64_t kNmRepackMinTokens = 16;

inline bool UseNmRepack(const Int4Problem& p) {
  return !p.lines && p.dtype != Dtype::kBF16 && p.tokens >= kNmRepackMinTokens;
}

// Bytes of one block's lines and the slack the offset loads read past them.
inline int64_t NmBlockBytes(const Int4Problem& p) { return (p.k + 15) / 16 * 8 * 64 + 64; }

// Block o0 (64 outputs) of the canonical qweight / positions as lines.
inline void PackNmLinesBlock(const Int4Problem& p, const uint8_t* qweight,
                             const uint8_t* positions, int64_t o0, uint8_t* lines) {
  const int64_t n = p.n_out, groups = p.k / 4, chunks = (p.k + 15) / 16;
  const int64_t width = std::min<int64_t>(64, n - o0);
  const __m512i three = _mm512_set1_epi32(3), pad_value = _mm512_set1_epi32(0x88);
  // The first vector's walk brings in the block's lines (the others' bytes
  // share them): its first rows at once, then kPrefetchRows ahead.
  // (A positions row serves two groups: half the rows, as far ahead.)
  const int64_t position_rows = (groups + 1) / 2, ahead = kPrefetchRows / 2;
  PrefetchSpans(qweight + o0, n, std::min(kPrefetchRows, groups), width);
  PrefetchSpans(positions + o0, n, std::min(ahead, position_rows), width);
  for (int v = 0; v < 4; ++v) {
    const int64_t o = o0 + 16 * v;
    const __mmask16 mask = o < n ? LaneMask(n - o) : 0;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t row = 4 * ch + kPrefetchRows, position_row = 2 * ch + ahead;
      if (v == 0 && row < groups) {
        PrefetchSpans(qweight + row * n + o0, n, std::min<int64_t>(4, groups - row), width);
      }
      if (v == 0 && position_row < position_rows) {
        PrefetchSpans(positions + position_row * n + o0, n,
                      std::min<int64_t>(2, position_rows - position_row), width);
      }
      __m512i values = _mm512_setzero_si512(), index = _mm512_setzero_si512();
      for (int j = 0; j < 4; ++j) {
        const int64_t g = 4 * ch + j;
        const __m512i slot = _mm512_set1_epi32(4 * j);
        const __m512i pad_index = _mm512_set1_epi32(4 * j | (4 * j + 1) << 4);
        __m512i value = pad_value, idx = pad_index;
        if (g < groups && mask != 0) {
          const __m512i codes = _mm512_srli_epi32(
              LoadBytes(positions + (g >> 1) * n + o, mask), static_cast<unsigned>(4 * (g & 1)));
          const __m512i p0 = _mm512_add_epi32(_mm512_and_si512(codes, three), slot);
          const __m512i p1 =
              _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(codes, 2), three), slot);
          value = _mm512_mask_mov_epi32(pad_value, mask, LoadBytes(qweight + g * n + o, mask));
          idx = _mm512_mask_mov_epi32(pad_index, mask,
                                      _mm512_or_si512(p0, _mm512_slli_epi32(p1, 4)));
        }
        values = _mm512_or_si512(values, _mm512_slli_epi32(value, 8 * j));
        index = _mm512_or_si512(index, _mm512_slli_epi32(idx, 8 * j));
      }
      _mm512_storeu_si512(lines + (ch * 8 + v) * 64, values);
      _mm512_storeu_si512(lines + (ch * 8 + 4 + v) * 64, index);
    }
  }
}

#ifdef __AVX512VNNI__
// ---------------------------------------------------------------- int8 activations
// 16 outputs' weights for the quad of inputs 4j .. 4j + 3 as one dword per
// lane, bytes (u0, u2, u1, u3): byte rows 2j (a = u0 | u1 << 4) and 2j + 1
// (b = u2 | u3 << 4) side by side (w = a | b << 8), then w's high nibbles
// moved 12 bits up: (w | w << 12) & 0x0F0F0F0F, one vpternlogd. xq stores
// each quad in that order, so one vpdpbusd per token multiplies the unsigned
// codes by the signed activations 4 at a time (64 multiply-adds per
// instruction, 4x the f32 FMA's): 6 operations decode 64 weights, where the
// f32 path spends 7 on 32.
inline __m512i A8Dword(const uint8_t* row_a, const uint8_t* row_b, __mmask16 mask) {
  const __m512i w =
      _mm512_or_si512(LoadBytes(row_a, mask), _mm512_slli_epi32(LoadBytes(row_b, mask), 8));
  // 0xA8: (A | B) & C.
  return _mm512_ternarylogic_epi32(w, _mm512_slli_epi32(w, 12), _mm512_set1_epi32(0x0F0F0F0F),
                                   0xA8);
}

// Products by W on int8 activations: per group, int32 sums of u * xq (the
// unsigned nibbles; - 8 sum xq comes once per group), then f32 times the
// token's scale and the output's.
template <int kTokens>
void ForwardA8Tokens(const Ctx& c, int64_t o0, int64_t on, int64_t t0, float* y) {
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out, k = p.k, groups = k / p.group;
  const int8_t* xq = static_cast<const int8_t*>(c.dense_raw);
  const int vecs = static_cast<int>((on + 15) / 16);
  __mmask16 masks[4];
  for (int v = 0; v < 4; ++v) masks[v] = v < vecs ? LaneMask(on - 16 * v) : 0;
  __m512 out[4][kTokens];
  for (int v = 0; v < 4; ++v)
    for (int t = 0; t < kTokens; ++t) out[v][t] = _mm512_setzero_ps();
  // The walk's first rows at once (kernel_util.h).
  PrefetchSpans(c.qweight + o0, n, std::min(kPrefetchRows, k / 2), on);
  for (int64_t g = 0; g < groups; ++g) {
    PrefetchSpans(c.scales + g * n + o0, 0, 1, on * 4);  // Read at the group's end.
    __m512i acc[4][kTokens];
    for (int v = 0; v < 4; ++v)
      for (int t = 0; t < kTokens; ++t) acc[v][t] = _mm512_setzero_si512();
    for (int64_t i = g * p.group; i < (g + 1) * p.group; i += 4) {
      const uint8_t* row = c.qweight + (i >> 1) * n + o0;
      if ((i >> 1) + kPrefetchRows + 1 < k / 2) {
        PrefetchRow(row + kPrefetchRows * n);
        PrefetchRow(row + (kPrefetchRows + 1) * n);
      }
      __m512i xb[kTokens];
      for (int t = 0; t < kTokens; ++t) {
        int32_t quad;
        std::memcpy(&quad, xq + (t0 + t) * k + i, sizeof quad);
        xb[t] = _mm512_set1_epi32(quad);
      }
      for (int v = 0; v < vecs; ++v) {
        const __m512i d = A8Dword(row + 16 * v, row + n + 16 * v, masks[v]);
        for (int t = 0; t < kTokens; ++t) acc[v][t] = _mm512_dpbusd_epi32(acc[v][t], d, xb[t]);
      }
    }
    for (int v = 0; v < vecs; ++v) {
      const __m512 sw = _mm512_maskz_loadu_ps(masks[v], c.scales + g * n + o0 + 16 * v);
      for (int t = 0; t < kTokens; ++t) {
        const int64_t tg = (t0 + t) * groups + g;
        const __m512i dot = _mm512_sub_epi32(acc[v][t], _mm512_set1_epi32(8 * c.x_sums[tg]));
        const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(c.x_scales[tg]));
        out[v][t] = _mm512_fmadd_ps(sw, f, out[v][t]);
      }
    }
  }
  for (int v = 0; v < vecs; ++v)
    for (int t = 0; t < kTokens; ++t) _mm512_store_ps(y + t * kOutBlock + 16 * v, out[v][t]);
}

inline void ForwardA8Avx512Vnni(const Ctx& c, int64_t o0, int64_t on, int64_t t0, int nt,
                                float* y) {
  switch (nt) {
    case 1: return ForwardA8Tokens<1>(c, o0, on, t0, y);
    case 2: return ForwardA8Tokens<2>(c, o0, on, t0, y);
    case 3: return ForwardA8Tokens<3>(c, o0, on, t0, y);
    default: return ForwardA8Tokens<4>(c, o0, on, t0, y);
  }
}
#endif  // __AVX512VNNI__

}  // namespace int4
}  // namespace JAXSPARSE_INT4_ISA
}  // namespace cpu
}  // namespace jaxsparse
