// The AVX-512 parts of the V:N:M kernels (included by vnm_kernels_avx512.cc
// after vnm_kernels.h, inside namespace jaxsparse::cpu::avx512):
//
// 1. Avx512Decoder: the panel tile decoded 16 rows x 16 entries at a time.
//    The tile is [selected input][output], the transpose of the canonical
//    [output][entry] arrays, so a block of 16 rows of values and of indices is
//    transposed in registers (16 x 16 floats: 64 shuffles; 16 x 16 bytes: 64
//    SSE unpacks), after which each (group, slot) column of the tile is one
//    compare per kept entry of the group and a masked move / masked add: ~9
//    instructions per 16 tile floats, against ~8 scalar ones per kept entry
//    (~8 per 16 floats) for the scalar decoder. Every (group, slot) of the
//    block is stored whole, so the tile needs no clearing.
//
// 2. SpmmStream: the forward at a few tokens, where the call streams the
//    weight from DRAM (dense-equivalent work per byte is tiny) and the dense
//    engine's 2:4 zeros and decode would cost more than the stream. Per panel,
//    x's selected inputs are gathered into small per-token tables (one 16-lane
//    table = 4 groups x 4 slots), and each output row's kept values dot them
//    directly: a row chunk is the 4n entries of 4 groups, 4 / n rows share a
//    zmm, and each lane takes its input from the token's table by one
//    vpermps (single uop, non-destructive). So only kept entries are
//    multiplied, and the canonical arrays are read once, in order.
#ifndef JAXSPARSE_CPU_VNM_VNM_AVX512_H_
#define JAXSPARSE_CPU_VNM_VNM_AVX512_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace jaxsparse {
namespace cpu {
namespace avx512 {

// ------------------------------------------------------------------ loads

// 16 values of dtype D as f32; lanes outside `keep` are zero and not read
// (a masked load never faults), so a chunk's tail stays inside the arrays.
template <class D>
__m512 LoadF32(const typename D::Storage* p, __mmask16 keep) {
  if constexpr (kIsF32<D>) {
    return _mm512_maskz_loadu_ps(keep, p);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(keep, p);
    if constexpr (std::is_same_v<D, BF16>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

// ------------------------------------------------------------------ transposes

// r[i][j] -> r[j][i] for 16 rows of 16 floats.
inline void Transpose16x16(__m512* r) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // In each 128-bit lane L, u[4q + c] holds column 4L + c of rows 4q .. 4q+3.
  for (int q = 0; q < 16; q += 4) {
    for (int h = 0; h < 2; ++h) {
      const __m512d a = _mm512_castps_pd(t[q + h]), b = _mm512_castps_pd(t[q + 2 + h]);
      u[q + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      u[q + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  }
  // Gather the four 128-bit lanes holding column j from u[c], u[4 + c], u[8
  // + c], u[12 + c] (c = j % 4, lane j / 4) in two rounds of lane shuffles.
  __m512 v[16];
  for (int c = 0; c < 4; ++c) {
    for (int half = 0; half < 2; ++half) {
      const int a = 8 * half + c, b = 8 * half + 4 + c;
      v[8 * half + c] = _mm512_shuffle_f32x4(u[a], u[b], 0x88);      // lanes 0, 2
      v[8 * half + 4 + c] = _mm512_shuffle_f32x4(u[a], u[b], 0xdd);  // lanes 1, 3
    }
  }
  for (int c = 0; c < 4; ++c) {
    for (int odd = 0; odd < 2; ++odd) {
      const __m512 a = v[4 * odd + c], b = v[8 + 4 * odd + c];
      r[4 * odd + c] = _mm512_shuffle_f32x4(a, b, 0x88);       // lane 0 / 1
      r[8 + 4 * odd + c] = _mm512_shuffle_f32x4(a, b, 0xdd);   // lane 2 / 3
    }
  }
}

// b[i] byte j -> b[j] byte i for 16 rows of 16 bytes (four unpack rounds:
// after round w, units of 2^w bytes hold 2^w consecutive rows of a column).
inline void Transpose16x16Bytes(__m128i* b) {
  __m128i t[16];
  for (int i = 0; i < 8; ++i) {
    t[i] = _mm_unpacklo_epi8(b[2 * i], b[2 * i + 1]);      // columns 0-7
    t[8 + i] = _mm_unpackhi_epi8(b[2 * i], b[2 * i + 1]);  // columns 8-15
  }
  // t[8h + i]: 16-bit unit c = column 8h + c, rows 2i, 2i+1.
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < 4; ++i) {
      b[8 * h + i] = _mm_unpacklo_epi16(t[8 * h + 2 * i], t[8 * h + 2 * i + 1]);
      b[8 * h + 4 + i] = _mm_unpackhi_epi16(t[8 * h + 2 * i], t[8 * h + 2 * i + 1]);
    }
  }
  // b[8h + 4q + i]: 32-bit unit c = column 8h + 4q + c, rows 4i .. 4i+3.
  for (int hq = 0; hq < 4; ++hq) {
    for (int i = 0; i < 2; ++i) {
      t[4 * hq + i] = _mm_unpacklo_epi32(b[4 * hq + 2 * i], b[4 * hq + 2 * i + 1]);
      t[4 * hq + 2 + i] = _mm_unpackhi_epi32(b[4 * hq + 2 * i], b[4 * hq + 2 * i + 1]);
    }
  }
  // t[4hq + 2p + i]: 64-bit unit c = column 4hq + 2p + c, rows 8i .. 8i+7.
  for (int hqp = 0; hqp < 8; ++hqp) {
    const __m128i lo = t[2 * hqp], hi = t[2 * hqp + 1];
    b[2 * hqp] = _mm_unpacklo_epi64(lo, hi);
    b[2 * hqp + 1] = _mm_unpackhi_epi64(lo, hi);
  }
}

// ------------------------------------------------------------------ decode

struct Avx512Decoder {
  template <class D>
  static void Decode(const Weight<D>& w, int64_t kc, int32_t n, int64_t r0,
                     int64_t rows, int64_t g0, int64_t g1,
                     const int32_t* slot_kk, int64_t /*nk*/, int64_t ld,
                     float* tile) {
    const int64_t first = g0 * n, count = (g1 - g0) * n;
    for (int64_t rb = 0; rb < ld; rb += 16) {
      const int64_t live_rows = Min(16, rows - rb);
      for (int64_t e0 = 0; e0 < count; e0 += 16) {
        const int ne = static_cast<int>(Min(16, count - e0));
        const __mmask16 live = static_cast<__mmask16>((1u << ne) - 1);
        __m512 val[16];
        __m128i idx[16];
        for (int r = 0; r < 16; ++r) {
          const int64_t at = (r0 + rb + r) * kc + first + e0;
          if (r < live_rows) {
            val[r] = LoadF32<D>(w.values + at, live);
            // Lanes past the chunk read as slot 255: they match no slot.
            idx[r] = _mm_mask_loadu_epi8(_mm_set1_epi8(-1), live, w.indices + at);
          } else {
            val[r] = _mm512_setzero_ps();
            idx[r] = _mm_set1_epi8(-1);
          }
        }
        Transpose16x16(val);
        Transpose16x16Bytes(idx);
        const int64_t gb = e0 / n;  // First group of the chunk, relative to g0.
        for (int q = 0; q < ne / n; ++q) {
          const int32_t* kks = slot_kk + (gb + q) * kSelected;
          for (int s = 0; s < kSelected; ++s) {
            if (kks[s] < 0) continue;
            const __m128i slot = _mm_set1_epi8(static_cast<char>(s));
            __m512 col = _mm512_maskz_mov_ps(
                _mm_cmpeq_epi8_mask(idx[q * n], slot), val[q * n]);
            if (n == 2) {
              col = _mm512_mask_add_ps(col, _mm_cmpeq_epi8_mask(idx[q * n + 1], slot),
                                       col, val[q * n + 1]);
            }
            _mm512_storeu_ps(tile + kks[s] * ld + rb, col);
          }
        }
      }
    }
  }
};


// ------------------------------------------------------------------ stream forward

// Up to this many tokens the forward streams the weight (SpmmStream).
constexpr int64_t kStreamMaxTokens = 16;
// A block of chunks' tables (tokens x 16 floats per chunk) stays in L1 next
// to the row chunks that stream through: 16 KB.
constexpr int64_t kStreamTableFloats = 4096;
// Row chunks fetched ahead of use, for the same rows: the hardware
// prefetchers cannot follow the many row streams of a panel (2 per row).
constexpr int64_t kStreamAheadChunks = 16;

// The rows of a zmm: `rpv` rows of `slot` lanes each (the 4n entries of 4
// groups), row q in lanes [q * slot, (q + 1) * slot).
struct RowChunks {
  int slot, rpv;
  explicit RowChunks(int32_t n) : slot(4 * n), rpv(16 / (4 * n)) {}
  __mmask16 SlotMask(int q) const {
    return static_cast<__mmask16>(((1u << slot) - 1) << (slot * q));
  }
};

// The row chunks of one zmm: rows p, p + stride, ... (rpv of them), lanes in
// `keep` only (the others zero and unread).
template <class D>
__m512 RowValues(const typename D::Storage* p, int64_t stride, const RowChunks& rc,
                 __mmask16 keep) {
  if constexpr (kIsF32<D>) {
    __m512 v = _mm512_setzero_ps();
    for (int q = 0; q < rc.rpv; ++q)
      v = _mm512_mask_loadu_ps(v, keep & rc.SlotMask(q), p + q * stride - rc.slot * q);
    return v;
  } else {
    __m256i h = _mm256_setzero_si256();
    for (int q = 0; q < rc.rpv; ++q)
      h = _mm256_mask_loadu_epi16(h, keep & rc.SlotMask(q), p + q * stride - rc.slot * q);
    if constexpr (std::is_same_v<D, BF16>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

// RowValues() when every lane is live, by plain loads and inserts (measured
// faster than a chain of merging masked loads in the N:M kernel).
template <class D>
__m512 RowValuesWhole(const typename D::Storage* p, int64_t stride, const RowChunks& rc) {
  if constexpr (kIsF32<D>) {
    if (rc.rpv == 2) {
      return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(p)),
                                _mm256_loadu_ps(p + stride), 1);
    }
    __m512 v = _mm512_castps128_ps512(_mm_loadu_ps(p));
    v = _mm512_insertf32x4(v, _mm_loadu_ps(p + stride), 1);
    v = _mm512_insertf32x4(v, _mm_loadu_ps(p + 2 * stride), 2);
    return _mm512_insertf32x4(v, _mm_loadu_ps(p + 3 * stride), 3);
  } else {
    return RowValues<D>(p, stride, rc, 0xffff);
  }
}

inline __m512i RowIndices(const uint8_t* p, int64_t stride, const RowChunks& rc,
                          __mmask16 live) {
  __m128i b = _mm_setzero_si128();
  for (int q = 0; q < rc.rpv; ++q)
    b = _mm_mask_loadu_epi8(b, live & rc.SlotMask(q), p + q * stride - rc.slot * q);
  return _mm512_cvtepu8_epi32(b);
}

inline __m512i RowIndicesWhole(const uint8_t* p, int64_t stride, const RowChunks& rc) {
  if (rc.rpv == 2) {
    return _mm512_cvtepu8_epi32(
        _mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)),
                           _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + stride))));
  }
  int32_t q4[4];
  for (int q = 0; q < 4; ++q) std::memcpy(&q4[q], p + q * stride, 4);
  return _mm512_cvtepu8_epi32(_mm_setr_epi32(q4[0], q4[1], q4[2], q4[3]));
}

template <class D>
struct SpmmStream : Dims {
  using S = typename D::Storage;
  struct Worker {
    float* tables;  // [T][16 * block_chunks]
    __m512* acc;    // [row vectors of a panel][T]
  };

  static bool Applies(const VnmProblem& p) { return p.tokens <= kStreamMaxTokens; }

  const VnmProblem& p;
  const Runtime& rt;
  RowChunks rc;
  int64_t chunks, block_chunks, table_ld, x_ld, vecs_max;
  __m512i lane_base;  // Lane -> 4 * (its group within the chunk).
  float* xf = nullptr;  // [T][x_ld] f32, zero padded past K.
  Worker* workers = nullptr;
  // Per batch.
  Weight<D> w{};
  S* y = nullptr;

  SpmmStream(const VnmProblem& prob, const Runtime& runtime)
      : Dims(prob), p(prob), rt(runtime), rc(prob.n) {
    chunks = CeilDiv(G, 4);
    block_chunks = Max(1, Min(chunks, kStreamTableFloats / (16 * Max(1, T))));
    table_ld = 16 * block_chunks;
    // The gather reads 32-float windows that start below K.
    x_ld = RoundUp(K + 32, 16);
    vecs_max = CeilDiv(Min(v, N), rc.rpv);
    alignas(64) int32_t base[16];
    for (int l = 0; l < 16; ++l) base[l] = 4 * ((l % rc.slot) / n);
    lane_base = _mm512_load_si512(base);
  }

  void Layout(Carver& c) {
    xf = c.Take<float>(T * x_ld);
    workers = c.Take<Worker>(rt.num_workers);
    for (int i = 0; i < rt.num_workers; ++i) {
      const Worker wk{c.Take<float>(T * table_ld), c.Take<__m512>(vecs_max * T)};
      if (workers != nullptr) workers[i] = wk;
    }
  }

  bool Compute() {
    if (T == 0 || N == 0 || p.batch == 0) return true;
    if (!TakeScratch(rt, *this)) return false;
    for (int64_t b = 0; b < p.batch; ++b) {
      w = Weight<D>::At(p, b);
      if (b == 0 || p.x_stride != 0) {
        const ConvertJob<D> job{static_cast<const S*>(p.x) + b * p.x_stride, T, K, x_ld, xf};
        RunParallel(rt, CeilDiv(T, ConvertJob<D>::kRowsPerTask), job);
      }
      y = static_cast<S*>(p.out) + b * T * N;
      RunParallel(rt, P, *this);
    }
    return true;
  }

  void Run(int64_t panel, int worker) const {
    const Worker& wk = workers[worker];
    const int64_t r0 = panel * v, rows = PanelRows(panel);
    const int64_t vecs = CeilDiv(rows, rc.rpv);
    std::memset(static_cast<void*>(wk.acc), 0, vecs * T * sizeof(__m512));
    const uint8_t* cols = w.columns + panel * G * kSelected;
    for (int64_t c0 = 0; c0 < chunks; c0 += block_chunks) {
      const int64_t c1 = Min(chunks, c0 + block_chunks);
      Gather(cols, c0, c1, wk.tables);
      for (int64_t t0 = 0; t0 < T; t0 += 8) {
        Dispatch<8>(static_cast<int>(Min(8, T - t0)), [&](auto tb) {
          constexpr int kTb = decltype(tb)::value;
          // 16 accumulators (and kTb tables) in registers.
          constexpr int kVecs = 16 / kTb < 8 ? 16 / kTb : 8;
          int64_t j = 0;
          for (; j + kVecs <= vecs; j += kVecs) Block<kVecs, kTb>(r0, rows, j, t0, c0, c1, wk);
          for (; j < vecs; ++j) Block<1, kTb>(r0, rows, j, t0, c0, c1, wk);
        });
      }
    }
    WriteY(r0, rows, vecs, wk.acc);
  }

  // tables[t][16 (c - c0) + 4q + s] = x[t, input of slot s of group 4c + q],
  // or 0 where that input does not exist. Each group's inputs lie in
  // [g m, g m + m): a chunk's 4 groups span 4m floats, read as 32-float
  // windows, each placed by one two-table permute.
  void Gather(const uint8_t* cols, int64_t c0, int64_t c1, float* tables) const {
    const int windows = static_cast<int>(CeilDiv(4 * m, 32));
    const __m512i lane_group = _mm512_srli_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 2);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t g0 = 4 * c, first = g0 * m;
      const int64_t groups = Min(4, G - g0);
      const __mmask16 live = static_cast<__mmask16>((1u << (4 * groups)) - 1);
      const __m512i col = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, cols + g0 * kSelected));
      const __m512i rel = _mm512_add_epi32(_mm512_mullo_epi32(lane_group, _mm512_set1_epi32(m)), col);
      __mmask16 valid = _mm512_mask_cmplt_epi32_mask(live, col, _mm512_set1_epi32(m));
      valid = _mm512_mask_cmplt_epi32_mask(valid, rel, _mm512_set1_epi32(static_cast<int32_t>(K - first)));
      __mmask16 in_window[8];
      for (int wi = 0; wi < windows; ++wi)
        in_window[wi] = _mm512_mask_cmpeq_epi32_mask(valid, _mm512_srli_epi32(rel, 5), _mm512_set1_epi32(wi));
      float* out = tables + (c - c0) * 16;
      for (int64_t t = 0; t < T; ++t) {
        const float* xr = xf + t * x_ld + first;
        __m512 tab = _mm512_setzero_ps();
        for (int wi = 0; wi < windows; ++wi) {
          if (in_window[wi] == 0) continue;
          const __m512 lo = _mm512_loadu_ps(xr + 32 * wi), hi = _mm512_loadu_ps(xr + 32 * wi + 16);
          tab = _mm512_mask_mov_ps(tab, in_window[wi], _mm512_permutex2var_ps(lo, rel, hi));
        }
        _mm512_store_ps(out + t * table_ld, tab);
      }
    }
  }

  // Row vectors j .. j + kVecs - 1 x tokens t0 .. t0 + kTb - 1 over chunks
  // [c0, c1), the sums kept in wk.acc between blocks of chunks.
  template <int kVecs, int kTb>
  void Block(int64_t r0, int64_t rows, int64_t j, int64_t t0, int64_t c0, int64_t c1,
             const Worker& wk) const {
    // Locals, so the compiler keeps the accumulators in registers.
    const RowChunks chunk = rc;
    const int64_t kc = Kc, slot = chunk.slot, tld = table_ld, all = chunks;
    const int64_t row0 = j * chunk.rpv;
    const int64_t vec_rows = Min(int64_t{kVecs} * chunk.rpv, rows - row0);
    const bool whole_rows = vec_rows == int64_t{kVecs} * chunk.rpv;
    const S* const vs = w.values + (r0 + row0) * kc;
    const uint8_t* const ix = w.indices + (r0 + row0) * kc;
    const __m512i base = lane_base, four = _mm512_set1_epi32(kSelected);
    __m512 acc[kVecs][kTb];
    for (int vv = 0; vv < kVecs; ++vv)
      for (int t = 0; t < kTb; ++t) acc[vv][t] = wk.acc[(j + vv) * T + t0 + t];
    const float* const tab0 = wk.tables + t0 * tld;
    // Whole chunks of whole rows: no masks on the loads.
    const int64_t whole_end = whole_rows ? Min(c1, kc / slot) : c0;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t e0 = c * slot;
      __m512 tab[kTb];
      for (int t = 0; t < kTb; ++t) tab[t] = _mm512_load_ps(tab0 + t * tld + (c - c0) * 16);
      if (c + kStreamAheadChunks < all) {
        for (int64_t r = 0; r < vec_rows; ++r) {
          _mm_prefetch(reinterpret_cast<const char*>(vs + r * kc + e0 + kStreamAheadChunks * slot),
                       _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(ix + r * kc + e0 + kStreamAheadChunks * slot),
                       _MM_HINT_T0);
        }
      }
      for (int vv = 0; vv < kVecs; ++vv) {
        const int64_t at = int64_t{vv} * chunk.rpv * kc + e0;
        __m512i i32;
        __mmask16 live = 0xffff;
        if (c < whole_end) {
          i32 = RowIndicesWhole(ix + at, kc, chunk);
        } else {
          const int64_t lanes = Min(slot, kc - e0);
          const int64_t vr = Min(chunk.rpv, vec_rows - int64_t{vv} * chunk.rpv);
          live = 0;
          for (int q = 0; q < vr; ++q)
            live |= static_cast<__mmask16>(((1u << lanes) - 1) << (slot * q));
          i32 = RowIndices(ix + at, kc, chunk, live);
        }
        // A slot > 3 (garbage under jit) would pick another group's input:
        // its lane is dropped, and zeroing permutes make it add 0, never 0 *
        // inf. Inputs that do not exist are zeros in the tables.
        const __mmask16 keep = _mm512_mask_cmplt_epu32_mask(live, i32, four);
        const __m512i pos = _mm512_add_epi32(base, i32);
        if (__builtin_expect(keep == 0xffff, 1) && c < whole_end) {
          const __m512 wv = RowValuesWhole<D>(vs + at, kc, chunk);
          for (int t = 0; t < kTb; ++t)
            acc[vv][t] = _mm512_fmadd_ps(wv, _mm512_permutexvar_ps(pos, tab[t]), acc[vv][t]);
        } else {
          const __m512 wv = RowValues<D>(vs + at, kc, chunk, keep);
          for (int t = 0; t < kTb; ++t)
            acc[vv][t] = _mm512_fmadd_ps(wv, _mm512_maskz_permutexvar_ps(keep, pos, tab[t]),
                                         acc[vv][t]);
        }
      }
    }
    for (int vv = 0; vv < kVecs; ++vv)
      for (int t = 0; t < kTb; ++t) wk.acc[(j + vv) * T + t0 + t] = acc[vv][t];
  }

  void WriteY(int64_t r0, int64_t rows, int64_t vecs, const __m512* acc) const {
    for (int64_t j = 0; j < vecs; ++j) {
      for (int64_t t = 0; t < T; ++t) {
        const __m512 a = acc[j * T + t];
        for (int q = 0; q < rc.rpv; ++q) {
          const int64_t row = j * rc.rpv + q;
          if (row < rows) {
            y[t * N + r0 + row] =
                D::FromF32(_mm512_reduce_add_ps(_mm512_maskz_mov_ps(rc.SlotMask(q), a)));
          }
        }
      }
    }
  }
};

// The forward: streaming at a few tokens, else the dense engine.
template <class D>
bool SpmmAvx512(const VnmProblem& p, const Runtime& rt) {
  if (SpmmStream<D>::Applies(p)) return Run<SpmmStream<D>>(p, rt);
  return Run<Spmm<Traits, D, Avx512Decoder>>(p, rt);
}

inline bool SpmmAvx512Any(const VnmProblem& p, const Runtime& rt) {
  switch (p.dtype) {
    case Dtype::kF32:
      return SpmmAvx512<F32>(p, rt);
    case Dtype::kBF16:
      return SpmmAvx512<BF16>(p, rt);
    case Dtype::kF16:
      return SpmmAvx512<F16>(p, rt);
  }
  return true;
}

}  // namespace avx512
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_VNM_VNM_AVX512_H_
