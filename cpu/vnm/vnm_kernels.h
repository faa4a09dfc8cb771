// The V:N:M kernel bodies, written once and instantiated per instruction set.
//
// Each vnm_kernels_<isa>.cc defines, inside namespace jaxsparse::cpu::<isa>,
// the SIMD `Traits` (cpu/common/simd_<isa>.h) and a `VnmTile` (the register
// tile of its micro-kernels), defines JAXSPARSE_VNM_ISA to <isa> and includes
// this header. Everything here lives in that per-ISA namespace so the three
// copies, each compiled with different -m flags, never share a symbol (a
// shared inline copy could carry AVX-512 code to a CPU without it); for the
// same reason it avoids std:: templates that generate out-of-line code.
//
// The engine. The v outputs of a panel read the same 4 selected inputs of
// every group, so per panel the product is DENSE over the panel's selected
// inputs: y[t, panel] = sum_kk x[t, sel[kk]] * Wp[kk, :], with Wp the panel's
// weights decoded into a dense [selected, v] tile (zeros where an output does
// not keep a selected input: 2:4 inside). Every kernel therefore runs
//   1. Select: per (panel, block of groups) the list `sel` of the selected
//      inputs that exist (position < m and input < K), compacted, and per
//      (group, slot) its place in that list or -1. Garbage positions and the
//      padding of a ragged last group drop out here, before any arithmetic,
//      so they contribute nothing even next to an inf (no 0 * inf);
//   2. Decode: the panel's kept values of those groups into the dense tile
//      (entries whose slot is > 3 or names a dropped input are skipped;
//      entries that repeat a slot add up, as the reference's sum does);
//   3. a dense register-tiled micro-kernel (f32 FMAs) that reads x (or dy)
//      straight from memory through `sel`: the gather is folded into the
//      broadcast operand, never materialised (a full gather of x would be
//      T * 4G * P floats, ~1 GB for 64:2:8 at 2048 tokens).
// All arithmetic is f32; bf16/f16 operands are converted once per call (x,
// dy) or while decoding (values), and results are rounded once at the end.
//
// The three ops share that engine; what differs is which operand is in the
// lanes and how the operands are laid out (each op's comment gives why):
//   spmm    outputs in the lanes, tokens broadcast; x read in place.
//   spmm_t  tokens in the lanes, tile entries broadcast; dy transposed and dx
//           accumulated transposed per token block, so the scatter into
//           dx[:, sel[kk]] is one vector add per (kk, token vector).
//   sddmm   outputs in the lanes, x broadcast; the reduction runs over tokens,
//           so x is transposed and dy packed panel by panel, a chunk of
//           tokens at a time.
//
// VnmTile (per ISA) gives the register tile of the micro-kernels:
//   kVecs    vectors of the lane dimension per micro-tile
//   kRows    broadcast rows per micro-tile; kRows * kVecs accumulators stay in
//            registers, and per reduction step the micro-kernel issues kVecs
//            vector loads and kRows broadcasts for kRows * kVecs FMAs.
// The layout transforms (decode, sample, transposing packs, row conversions)
// come from an `Isa` policy: ScalarIsa here, faster ones per ISA.
#ifndef JAXSPARSE_CPU_VNM_VNM_KERNELS_H_
#define JAXSPARSE_CPU_VNM_VNM_KERNELS_H_

#ifndef JAXSPARSE_VNM_ISA
#error "define JAXSPARSE_VNM_ISA (the namespace of this instantiation) first"
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/common/dtype_convert.h"
#include "cpu/vnm/vnm_kernels_api.h"

#define JAXSPARSE_KERNEL_ISA JAXSPARSE_VNM_ISA
#include "cpu/common/kernel_util.h"

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_VNM_ISA {

constexpr int kSelected = 4;  // Inputs a panel keeps per group.
// Panel widths are padded to whole 16-float vectors (v is a multiple of 16;
// only a partial last panel needs the padding): every ISA's vector divides 16.
constexpr int64_t kLanePad = 16;
// The decoded weight tile (selected inputs x panel width) of one task stays in
// L2 (1-2 MB per core on current x86) next to the rows of x it meets: 128 KB,
// e.g. 512 selected inputs x 64 outputs, as in the measured prototype.
constexpr int64_t kTileFloats = 32 * 1024;
// Tokens per spmm / spmm_t task. Each task decodes its panel's tiles once and
// reuses them for all its tokens: 256 tokens make the decode a few percent of
// the FMAs, and the tasks' x rows (256 x K) stay in the shared L3.
constexpr int64_t kTaskTokens = 256;
// spmm's partial sums of a task (tokens x panel width) in L2: 256 KB.
constexpr int64_t kAccFloats = 64 * 1024;
// Groups per spmm_t and sddmm task: disjoint ranges of inputs, so tasks never
// write the same dx or dv element.
constexpr int64_t kTaskGroups = 32;
// Rows per task of the transposing packs.
constexpr int64_t kTransposeRows = 64;
// The packed or converted dense operand of a chunk of tokens takes at most
// this much scratch (a call's scratch stays bounded whatever T is).
constexpr int64_t kPackBytes = int64_t{32} << 20;

// ------------------------------------------------------------------ dtypes

struct F32 {
  using Storage = float;
  static float ToF32(float v) { return v; }
  static float FromF32(float v) { return v; }
};

struct BF16 {
  using Storage = uint16_t;
  static float ToF32(uint16_t h) { return Bf16ToF32(h); }
  static uint16_t FromF32(float v) { return F32ToBf16(v); }
};

struct F16 {
  using Storage = uint16_t;
  static float ToF32(uint16_t h) { return F16ToF32(h); }
  static uint16_t FromF32(float v) { return F32ToF16(v); }
};

template <class D>
constexpr bool kIsF32 = std::is_same_v<D, F32>;

// ------------------------------------------------------------------ shapes

// The sizes every op derives from its problem: G = ceil(K / m) groups,
// Kc = G * n kept values per output, P = ceil(N / v) panels, and the widest
// panel padded to whole vectors.
struct Dims {
  int64_t T, K, N, G, Kc, P, vpad_max;
  int32_t v, n, m;
  explicit Dims(const VnmProblem& p)
      : T(p.tokens),
        K(p.k),
        N(p.n_out),
        G(CeilDiv(p.k, p.m)),
        Kc(G * p.n),
        P(CeilDiv(p.n_out, p.v)),
        vpad_max(RoundUp(Max(1, Min(p.v, p.n_out)), kLanePad)),
        v(p.v),
        n(p.n),
        m(p.m) {}
  int64_t PanelRows(int64_t panel) const { return Min(v, N - panel * v); }
  int64_t PanelPad(int64_t panel) const {
    return RoundUp(PanelRows(panel), kLanePad);
  }
};

// The weight of one batch entry.
template <class D>
struct Weight {
  const typename D::Storage* values;  // [N, Kc]
  const uint8_t* indices;             // [N, Kc]
  const uint8_t* columns;             // [P, G * 4]
  const typename D::Storage* tiles;   // VnmProblem::tiles, or null
  static Weight At(const VnmProblem& p, int64_t b) {
    using S = typename D::Storage;
    return Weight{static_cast<const S*>(p.values) + b * p.weight_stride,
                  p.indices + b * p.weight_stride,
                  p.columns + b * p.columns_stride,
                  p.tiles == nullptr ? nullptr
                                     : static_cast<const S*>(p.tiles) + b * p.tiles_stride};
  }
};

// Fetches a panel's values and indices of a range of groups (a segment of
// each of `rows` rows) into L2 in `steps` installments, one per Step(): the
// decode of the next block of groups then reads L2, not DRAM, and the
// fetches overlap the micro-kernels of the current block.
template <class D>
class SegmentFetch {
 public:
  SegmentFetch() = default;
  SegmentFetch(const Weight<D>& w, int64_t kc, int64_t r0, int64_t rows, int64_t e0,
               int64_t e1, int64_t steps)
      : values_(reinterpret_cast<const char*>(w.values + r0 * kc + e0)),
        indices_(reinterpret_cast<const char*>(w.indices + r0 * kc + e0)),
        rows_(rows),
        value_stride_(kc * static_cast<int64_t>(sizeof(typename D::Storage))),
        index_stride_(kc),
        value_bytes_((e1 - e0) * static_cast<int64_t>(sizeof(typename D::Storage))),
        index_bytes_(e1 - e0) {
    const int64_t lines =
        rows * (CeilDiv(value_bytes_, kCacheLine) + CeilDiv(index_bytes_, kCacheLine) + 2);
    per_step_ = CeilDiv(lines, Max(1, steps));
  }

  void Step() {
    for (int64_t i = 0; i < per_step_ && row_ < rows_; ++i) {
      // Values, then indices, of each row; a segment's last line too (it
      // need not start on a line boundary).
      const bool values = offset_ < value_bytes_ + kCacheLine;
      const int64_t bytes = values ? value_bytes_ : index_bytes_;
      const int64_t off = values ? offset_ : offset_ - value_bytes_ - kCacheLine;
      const char* base = values ? values_ + row_ * value_stride_ : indices_ + row_ * index_stride_;
      __builtin_prefetch(base + Min(off, Max(0, bytes - 1)), 0, 2);
      offset_ += kCacheLine;
      if (offset_ >= value_bytes_ + kCacheLine + index_bytes_ + kCacheLine) {
        offset_ = 0;
        ++row_;
      }
    }
  }

 private:
  const char* values_ = nullptr;
  const char* indices_ = nullptr;
  int64_t rows_ = 0, value_stride_ = 0, index_stride_ = 0, value_bytes_ = 0, index_bytes_ = 0;
  int64_t per_step_ = 0, row_ = 0, offset_ = 0;
};

// ------------------------------------------------------------------ panels

// The selected inputs of groups [g0, g1) of one panel that exist, in group
// order: sel[kk] = input (offset in a row of x), and slot_kk[4 (g - g0) + s]
// = kk of slot s of group g, or -1 where the position is >= m or the input
// is >= K (a ragged last group's padding, or garbage). Returns their count.
inline int64_t Select(const uint8_t* panel_columns, int64_t g0, int64_t g1,
                      int32_t m, int64_t k, int32_t* sel, int32_t* slot_kk) {
  int64_t nk = 0;
  for (int64_t g = g0; g < g1; ++g) {
    for (int s = 0; s < kSelected; ++s) {
      const int64_t col = panel_columns[g * kSelected + s];
      const int64_t input = g * m + col;
      const bool exists = col < m && input < k;
      slot_kk[(g - g0) * kSelected + s] = exists ? static_cast<int32_t>(nk) : -1;
      if (exists) sel[nk++] = static_cast<int32_t>(input);
    }
  }
  return nk;
}

// Whether a gather list holds an input twice (garbage columns that repeat a
// position). Select lists a group's inputs next to each other, and inputs of
// different groups differ, so only the 3 entries before each can match.
inline bool NamesAnInputTwice(const int32_t* sel, int64_t nk) {
  for (int64_t i = 1; i < nk; ++i)
    for (int64_t j = Max(0, i - (kSelected - 1)); j < i; ++j)
      if (sel[i] == sel[j]) return true;
  return false;
}

// The kk of entry c (group g) of a row: -1 for a slot > 3 or a dropped input.
inline int32_t EntryKk(const int32_t* slot_kk, int64_t g_rel, uint8_t slot) {
  return slot < kSelected ? slot_kk[g_rel * kSelected + slot] : -1;
}

// The layout transforms of the kernels, entry by entry, for every ISA; an ISA
// may bring faster ones (the ops take this policy as a template parameter).
struct ScalarIsa {
  // The panel's weights of groups [g0, g1) (rows r0 .. r0 + rows - 1) as a
  // dense tile[kk][r], `ld` floats per kk; columns rows .. ld - 1 are zero.
  // Entries that repeat a slot add up (the reference sums every entry).
  template <class D>
  static void Decode(const Weight<D>& w, int64_t kc, int32_t n, int64_t r0,
                     int64_t rows, int64_t g0, int64_t g1,
                     const int32_t* slot_kk, int64_t nk, int64_t ld,
                     float* tile) {
    std::memset(tile, 0, nk * ld * sizeof(float));
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t at = (r0 + r) * kc;
      const uint8_t* idx = w.indices + at;
      const typename D::Storage* val = w.values + at;
      for (int64_t g = g0; g < g1; ++g) {
        for (int e = 0; e < n; ++e) {
          const int64_t c = g * n + e;
          const int32_t kk = EntryKk(slot_kk, g - g0, idx[c]);
          if (kk >= 0) tile[kk * ld + r] += D::ToF32(val[c]);
        }
      }
    }
  }

  // The inverse of Decode for a Gram tile: out[r][c - g0 n] =
  // gram[kk of entry c of row r][r], or 0 where the entry's input does not
  // exist; `indices` is row 0's, rows kc apart.
  static void Sample(const float* gram, int64_t ld, const int32_t* slot_kk,
                     const uint8_t* indices, int64_t kc, int32_t n, int64_t g0,
                     int64_t g1, int64_t rows, float* out, int64_t out_ld) {
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* idx = indices + r * kc;
      for (int64_t g = g0; g < g1; ++g) {
        for (int e = 0; e < n; ++e) {
          const int64_t c = g * n + e;
          const int32_t kk = EntryKk(slot_kk, g - g0, idx[c]);
          out[r * out_ld + c - g0 * n] = kk >= 0 ? gram[kk * ld + r] : 0.0f;
        }
      }
    }
  }

  // dst[i] = f32(src[i]) / D(src[i]) for i < count.
  template <class D>
  static void ToF32Row(const typename D::Storage* src, float* dst, int64_t count) {
    for (int64_t i = 0; i < count; ++i) dst[i] = D::ToF32(src[i]);
  }
  template <class D>
  static void FromF32Row(const float* src, typename D::Storage* dst, int64_t count) {
    for (int64_t i = 0; i < count; ++i) dst[i] = D::FromF32(src[i]);
  }

  // dst[c][r] = f32(src[r][c]) for r < rows, c < cols.
  template <class D>
  static void TransposeIn(const typename D::Storage* src, int64_t src_ld, int64_t rows,
                          int64_t cols, float* dst, int64_t dst_ld) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) dst[c * dst_ld + r] = D::ToF32(src[r * src_ld + c]);
  }

  // dst[c][r] = D(src[r][c]) for r < rows, c < cols.
  template <class D>
  static void TransposeOut(const float* src, int64_t src_ld, int64_t rows, int64_t cols,
                           typename D::Storage* dst, int64_t dst_ld) {
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t r = 0; r < rows; ++r) dst[c * dst_ld + r] = D::FromF32(src[r * src_ld + c]);
  }
};

// ------------------------------------------------------------------ dense operands

// A dense [rows, cols] operand as f32: the operand itself for f32, else a
// converted copy (each converted once per call, then read ~P times).
template <class D>
struct DenseF32 {
  const float* data = nullptr;
  int64_t ld = 0;
};

template <class D, class Isa>
struct ConvertJob {
  static constexpr int64_t kRowsPerTask = 16;
  const typename D::Storage* src;
  int64_t rows, cols, ld;
  float* dst;
  void Run(int64_t task, int /*worker*/) const {
    const int64_t r1 = Min(rows, (task + 1) * kRowsPerTask);
    for (int64_t r = task * kRowsPerTask; r < r1; ++r) {
      const typename D::Storage* s = src + r * cols;
      float* d = dst + r * ld;
      Isa::template ToF32Row<D>(s, d, cols);
      for (int64_t c = cols; c < ld; ++c) d[c] = 0.0f;
    }
  }
};

// src as f32 rows of `ld` floats (zero padded), in `buffer` unless it can be
// read in place (f32 with ld == cols).
template <class D, class Isa>
DenseF32<D> AsF32(const Runtime& rt, const typename D::Storage* src,
                  int64_t rows, int64_t cols, int64_t ld, float* buffer) {
  if constexpr (kIsF32<D>) {
    if (ld == cols) return DenseF32<D>{src, cols};
  }
  const ConvertJob<D, Isa> job{src, rows, cols, ld, buffer};
  RunParallel(rt, CeilDiv(rows, ConvertJob<D, Isa>::kRowsPerTask), job);
  return DenseF32<D>{buffer, ld};
}

// ------------------------------------------------------------------ micro-kernels

// spmm: acc[t][lanes] += x[t, sel[kk]] * tile[kk][lanes] over kk in [0, nk),
// for kRows token rows (x_rows) and kVecs vectors of outputs. Per kk: kVecs
// loads of the tile, one load of sel[kk] shared by the kRows broadcasts that
// read x through it (the gather folded into the broadcast).
// A task's rows of x over a block of groups (its tokens x ~1000 inputs, 2 MB
// at 512 tokens) outgrow L2, and perf put the kernel's stalls right after the
// broadcasts' loads, which read the six rows at the gaps of `sel`
// (11008x4096, 2048 tokens). So the micro-kernel also fetches the next token
// tile's lines (next_rows, next_n of them) into L2, at every 4th kk: one
// prefetch per row and line where a line holds 4 or more selected inputs
// (m <= 16). Measured at 2048 tokens (11008x4096, kernel alone, alternating
// builds on a noisy host): 2-5% faster than none, and faster than one per kk,
// on Zen 5 (1 MB of L2 per core).
// The same fetches on a Xeon (Granite Rapids class, 2 MB of L2 per core),
// where that x block (516 tokens x 1024 inputs, 2.1 MB) about fits its L2,
// made 64:2:8 10% slower (4096x4096, 2048 tokens: 132 against 118 ms) and
// 128:2:16 no faster. So the micro-kernel fetches only for an x block past
// kFetchXPastL2 times the L2 of a core (Runtime::l2_bytes): a threshold
// between the two machines measured, not derived.
constexpr int64_t kPrefetchEvery = 4;
constexpr int64_t kFetchXPastL2 = 2;
template <class Tr, int kRows, int kVecs>
void SpmmMicro(const float* const* x_rows, const int32_t* sel, int64_t nk,
               const float* tile, int64_t ld, float* acc, int64_t acc_ld,
               const float* const* next_rows, int next_n) {
  using V = typename Tr::V;
  constexpr int kW = Tr::kWidth;
  V a[kRows][kVecs];
  const float* xr[kRows];
  for (int t = 0; t < kRows; ++t) xr[t] = x_rows[t];
  for (int t = 0; t < kRows; ++t)
    for (int j = 0; j < kVecs; ++j) a[t][j] = Tr::Load(acc + t * acc_ld + j * kW);
  auto step = [&](int64_t kk) {
    const int64_t off = sel[kk];
    const float* wk = tile + kk * ld;
    V w[kVecs];
    for (int j = 0; j < kVecs; ++j) w[j] = Tr::Load(wk + j * kW);
    for (int t = 0; t < kRows; ++t) {
      const V b = Tr::Broadcast(xr[t] + off);
      for (int j = 0; j < kVecs; ++j) a[t][j] = Tr::Fma(b, w[j], a[t][j]);
    }
  };
  int64_t kk = 0;
  for (; kk + kPrefetchEvery <= nk; kk += kPrefetchEvery) {
    for (int t = 0; t < next_n; ++t) __builtin_prefetch(next_rows[t] + sel[kk], 0, 2);
#pragma GCC unroll 4
    for (int q = 0; q < kPrefetchEvery; ++q) step(kk + q);
  }
  for (; kk < nk; ++kk) step(kk);
  for (int t = 0; t < kRows; ++t)
    for (int j = 0; j < kVecs; ++j) Tr::Store(acc + t * acc_ld + j * kW, a[t][j]);
}

// spmm_t: acc[i][token lanes] = sum_r tile[kk_i][r] * dyT[r][token lanes] over
// the panel's rows, for kRows selected inputs (tile rows) and kVecs vectors of
// tokens; then added into the rows sel[kk_i] of the transposed dx block.
template <class Tr, int kRows, int kVecs>
void SpmmTMicro(const float* const* tile_rows, int64_t rows, const float* dyt,
                int64_t dyt_ld, float* const* dxt_rows) {
  using V = typename Tr::V;
  constexpr int kW = Tr::kWidth;
  V a[kRows][kVecs];
  const float* wr[kRows];
  for (int i = 0; i < kRows; ++i) wr[i] = tile_rows[i];
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < kVecs; ++j) a[i][j] = Tr::Zero();
  for (int64_t r = 0; r < rows; ++r) {
    const float* d = dyt + r * dyt_ld;
    V y[kVecs];
    for (int j = 0; j < kVecs; ++j) y[j] = Tr::Load(d + j * kW);
    for (int i = 0; i < kRows; ++i) {
      const V b = Tr::Broadcast(wr[i] + r);
      for (int j = 0; j < kVecs; ++j) a[i][j] = Tr::Fma(b, y[j], a[i][j]);
    }
  }
  for (int i = 0; i < kRows; ++i) {
    for (int j = 0; j < kVecs; ++j) {
      float* o = dxt_rows[i] + j * kW;
      Tr::Store(o, Tr::Add(Tr::Load(o), a[i][j]));
    }
  }
}

// sddmm: acc[i][output lanes] += sum_t xt_i[t] * dy[t][output lanes] over
// `tokens` tokens, for kRows selected inputs (rows xt_i of the transposed x)
// and kVecs vectors of the panel's outputs (dy packed panel by panel, `dy_ld`
// floats per token). Both operands advance sequentially with t.
template <class Tr, int kRows, int kVecs>
void SddmmMicro(const float* const* xt_rows, const float* dy, int64_t dy_ld,
                int64_t tokens, float* acc, int64_t acc_ld) {
  using V = typename Tr::V;
  constexpr int kW = Tr::kWidth;
  V a[kRows][kVecs];
  const float* xr[kRows];
  for (int i = 0; i < kRows; ++i) xr[i] = xt_rows[i];
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < kVecs; ++j) a[i][j] = Tr::Load(acc + i * acc_ld + j * kW);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* d = dy + t * dy_ld;
    V y[kVecs];
    for (int j = 0; j < kVecs; ++j) y[j] = Tr::Load(d + j * kW);
    for (int i = 0; i < kRows; ++i) {
      const V b = Tr::Broadcast(xr[i] + t);
      for (int j = 0; j < kVecs; ++j) a[i][j] = Tr::Fma(b, y[j], a[i][j]);
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < kVecs; ++j) Tr::Store(acc + i * acc_ld + j * kW, a[i][j]);
}

template <class Tr>
int64_t MicroTiles(int64_t rows, int64_t lanes) {
  constexpr int64_t kTileLanes = int64_t{VnmTile::kVecs} * Tr::kWidth;
  return CeilDiv(rows, VnmTile::kRows) * CeilDiv(lanes, kTileLanes);
}

// Runs f(rows_c, vecs_c) over a block of `rows` broadcast rows and `lanes`
// floats (a multiple of the vector width) in whole micro-tiles: the last
// micro-tiles of each dimension get narrower instantiations.
template <class Tr, class F>
void ForMicroTiles(int64_t rows, int64_t lanes, F&& f) {
  constexpr int64_t kTileLanes = int64_t{VnmTile::kVecs} * Tr::kWidth;
  for (int64_t r = 0; r < rows; r += VnmTile::kRows) {
    const int nr = static_cast<int>(Min(VnmTile::kRows, rows - r));
    for (int64_t c = 0; c < lanes; c += kTileLanes) {
      const int nv = static_cast<int>(Min(kTileLanes, lanes - c) / Tr::kWidth);
      Dispatch<VnmTile::kRows>(nr, [&](auto kr) {
        Dispatch<VnmTile::kVecs>(nv, [&](auto kv) { f(r, c, kr, kv); });
      });
    }
  }
}

// ------------------------------------------------------------------ spmm

template <class Op>
bool Run(const VnmProblem& p, const Runtime& rt) {
  Op op(p, rt);
  return op.Compute();
}

// y = x @ W. A task is (token block, panel); per block of groups it decodes
// the panel's tile once (kTileFloats) and runs every micro-tile of its
// tokens over it, the partial sums of the task in a per-worker buffer.
// Consecutive tasks share the token block, so its rows of x stay in L3 while
// the panels pass over them.
template <class Tr, class D, class Isa>
struct Spmm : Dims {
  using S = typename D::Storage;
  struct Worker {
    float* tile;
    float* acc;
    int32_t* sel;
    int32_t* slot_kk;
  };

  const VnmProblem& p;
  const Runtime& rt;
  int64_t block_groups, task_tokens, chunk_tokens;
  float* x_buffer = nullptr;  // bf16/f16: x of a chunk of tokens as f32
  Worker* workers = nullptr;
  // Per batch and chunk of tokens: x from the chunk's first token.
  Weight<D> w{};
  DenseF32<D> x{};
  S* y = nullptr;
  int64_t chunk_t0 = 0, chunk_len = 0;

  Spmm(const VnmProblem& prob, const Runtime& runtime)
      : Dims(prob), p(prob), rt(runtime) {
    block_groups = Max(1, kTileFloats / (kSelected * vpad_max));
    // More tokens per task decode each tile for more of them; the partial
    // sums (tokens x panel width) stay within 256 KB of L2. 512 tokens
    // measured 3-5% faster than 256 at 2048 tokens (64:2:8, 128:2:16).
    task_tokens = RoundUp(Max(kTaskTokens, Min(2 * kTaskTokens, kAccFloats / vpad_max)),
                          VnmTile::kRows);
    // f32 x is read in place: one chunk, one pass of tasks.
    chunk_tokens = kIsF32<D> ? Max(T, 1)
                             : Max(1, kPackBytes / (4 * Max(1, K)) / task_tokens) * task_tokens;
  }

  void Layout(Carver& c) {
    if (!kIsF32<D>) x_buffer = c.Take<float>(Min(T, chunk_tokens) * K);
    workers = c.Take<Worker>(rt.num_workers);
    const int64_t nk_max = block_groups * kSelected;
    for (int i = 0; i < rt.num_workers; ++i) {
      const Worker wk{c.Take<float>(nk_max * vpad_max),
                      c.Take<float>(Min(task_tokens, T) * vpad_max),
                      c.Take<int32_t>(nk_max), c.Take<int32_t>(nk_max)};
      if (workers != nullptr) workers[i] = wk;
    }
  }

  bool Compute() {
    if (T == 0 || N == 0 || p.batch == 0) return true;
    if (!TakeScratch(rt, *this)) return false;
    const bool one_chunk = T <= chunk_tokens;
    for (int64_t b = 0; b < p.batch; ++b) {
      w = Weight<D>::At(p, b);
      y = static_cast<S*>(p.out) + b * T * N;
      for (chunk_t0 = 0; chunk_t0 < T; chunk_t0 += chunk_tokens) {
        chunk_len = Min(chunk_tokens, T - chunk_t0);
        if (b == 0 || p.x_stride != 0 || !one_chunk) {
          x = AsF32<D, Isa>(rt, static_cast<const S*>(p.x) + b * p.x_stride + chunk_t0 * K,
                            chunk_len, K, K, x_buffer);
        }
        RunParallel(rt, CeilDiv(chunk_len, task_tokens) * P, *this);
      }
    }
    return true;
  }

  // The f32 tiles packed once (VnmProblem::tiles) hold, per panel, the rows
  // kk = 4 g + slot of all G groups, v floats each. A block's rows are its
  // tile when its gather list is exactly that: every selected input exists
  // and none is named twice (else the block is decoded as without them).
  const float* PackedBlock(int64_t panel, int64_t g0, int64_t g1, int64_t nk,
                           const int32_t* sel) const {
    if constexpr (!kIsF32<D>) {
      return nullptr;  // bf16 tiles are the tile kernels' (vnm_amx.h).
    } else {
      if (w.tiles == nullptr || nk != kSelected * (g1 - g0) || NamesAnInputTwice(sel, nk)) {
        return nullptr;
      }
      return w.tiles + (panel * G + g0) * kSelected * v;
    }
  }

  void Run(int64_t task, int worker) const {
    const Worker& wk = workers[worker];
    // t0 counts from the chunk's first token.
    const int64_t panel = task % P, t0 = task / P * task_tokens;
    const int64_t tokens = Min(task_tokens, chunk_len - t0);
    const int64_t r0 = panel * v, rows = PanelRows(panel), ld = PanelPad(panel);
    std::memset(wk.acc, 0, tokens * ld * sizeof(float));
    const uint8_t* cols = w.columns + panel * G * kSelected;
    for (int64_t g0 = 0; g0 < G; g0 += block_groups) {
      const int64_t g1 = Min(G, g0 + block_groups);
      const int64_t nk = Select(cols, g0, g1, m, K, wk.sel, wk.slot_kk);
      if (nk == 0) continue;
      // The rows of x this block of groups reads: past twice the L2, the
      // micro-kernel fetches them a token tile ahead (see SpmmMicro).
      const int64_t x_block_bytes = tokens * (Min(K, g1 * m) - g0 * m) * int64_t{sizeof(float)};
      const bool fetch_x = x_block_bytes > kFetchXPastL2 * rt.l2_bytes;
      const float* tile = PackedBlock(panel, g0, g1, nk, wk.sel);
      const int64_t tile_ld = tile != nullptr ? v : ld;
      if (tile == nullptr) {
        Isa::template Decode<D>(w, Kc, n, r0, rows, g0, g1, wk.slot_kk, nk, ld, wk.tile);
        tile = wk.tile;
      }
      // The next block of groups comes into L2 while this one computes;
      // after the last, the next panel's first (the next task's, on this
      // worker or the other: then it is in L3). Packed tiles need no values.
      SegmentFetch<D> fetch;
      if (w.tiles == nullptr && g1 < G) {
        fetch = SegmentFetch<D>(w, Kc, r0, rows, g1 * n, Min(G, g1 + block_groups) * n,
                                MicroTiles<Tr>(tokens, ld));
      } else if (w.tiles == nullptr && panel + 1 < P) {
        fetch = SegmentFetch<D>(w, Kc, r0 + v, PanelRows(panel + 1), 0,
                                Min(G, block_groups) * n, MicroTiles<Tr>(tokens, ld));
      }
      ForMicroTiles<Tr>(tokens, ld, [&](int64_t t, int64_t c, auto kr, auto kv) {
        constexpr int kRows = decltype(kr)::value, kVecs = decltype(kv)::value;
        fetch.Step();
        const float* x_rows[kRows];
        for (int i = 0; i < kRows; ++i) x_rows[i] = x.data + (t0 + t + i) * x.ld;
        // The next token tile's rows of x come into L2 while this one
        // computes (during the first column of micro-tiles; see SpmmMicro).
        const float* next_rows[VnmTile::kRows];
        const int64_t left = tokens - t - kRows;
        const int next_n =
            c == 0 && fetch_x ? static_cast<int>(Max(0, Min(VnmTile::kRows, left))) : 0;
        for (int i = 0; i < next_n; ++i) next_rows[i] = x.data + (t0 + t + kRows + i) * x.ld;
        SpmmMicro<Tr, kRows, kVecs>(x_rows, wk.sel, nk, tile + c, tile_ld,
                                    wk.acc + t * ld + c, ld, next_rows, next_n);
      });
    }
    for (int64_t t = 0; t < tokens; ++t) {
      S* out = y + (chunk_t0 + t0 + t) * N + r0;
      const float* a = wk.acc + t * ld;
      Isa::template FromF32Row<D>(a, out, rows);
    }
  }
};

// The driver of a forward that reads x in place: per batch entry, op's w, x
// and y, then `tasks` tasks of op.Run on XLA's pool (after its scratch).
template <class Op>
bool RunForwardInPlace(Op& op, int64_t tasks) {
  const VnmProblem& p = op.p;
  if (op.T == 0 || op.N == 0 || p.batch == 0) return true;
  if (!TakeScratch(op.rt, op)) return false;
  using S = typename Op::S;
  for (int64_t b = 0; b < p.batch; ++b) {
    op.w = decltype(op.w)::At(p, b);
    op.x = static_cast<const S*>(p.x) + b * p.x_stride;
    op.y = static_cast<S*>(p.out) + b * op.T * op.N;
    RunParallel(op.rt, tasks, op);
  }
  return true;
}

// y = x @ W at a few tokens, entry by entry with the tokens in the lanes (the
// portable and AVX2 forward up to kStreamMaxVecs vectors of tokens; AVX-512
// has its own, vnm_avx512.h). At these token counts the dense engine would
// decode every tile for a handful of tokens: its scalar decode then costs
// about as much as its FMAs (on Zen 3 at 17 tokens, 64:2:8 ran at 0.84x of
// XLA's dense dot in MiniLM), and it multiplies the 2:4 zeros inside a panel.
// Here only kept entries are multiplied. Per panel, x's selected inputs are
// gathered once into a table xs[4 g + s][tokens] (zero where the input does
// not exist, and a zero row 4G that garbage positions read), shared by the
// panel's v rows and small enough for L1/L2; then each entry of a row is one
// broadcast of its value and, per vector of tokens, one load of its table row
// and one FMA. Two rows go together (four at one vector): 4-8 independent
// FMA chains toward the 8 that cover the FMA latency (4 cycles x 2 pipes).
constexpr int kStreamMaxVecs = 4;

template <class Tr, class D, class Isa>
struct SpmmTokens : Dims {
  using S = typename D::Storage;
  using V = typename Tr::V;

  const VnmProblem& p;
  const Runtime& rt;
  int64_t vecs, table_ld, table_rows;
  float* tables = nullptr;  // Per worker: [4G + 1][table_ld]
  Weight<D> w{};
  const S* x = nullptr;
  S* y = nullptr;

  static bool Applies(const VnmProblem& p) {
    return p.tokens <= int64_t{kStreamMaxVecs} * Tr::kWidth;
  }

  SpmmTokens(const VnmProblem& prob, const Runtime& runtime)
      : Dims(prob),
        p(prob),
        rt(runtime),
        vecs(CeilDiv(Max(T, 1), Tr::kWidth)),
        table_ld(vecs * Tr::kWidth),
        table_rows(kSelected * G + 1) {}

  void Layout(Carver& c) { tables = c.Take<float>(rt.num_workers * table_rows * table_ld); }

  bool Compute() { return RunForwardInPlace(*this, P); }

  void Run(int64_t panel, int worker) const {
    float* const xs = tables + worker * table_rows * table_ld;
    FillTable(panel, xs);
    Dispatch<kStreamMaxVecs>(static_cast<int>(vecs), [&](auto nv) {
      constexpr int kV = decltype(nv)::value;
      constexpr int kR = kV == 1 ? 4 : 2;
      const int64_t r0 = panel * v, r1 = r0 + PanelRows(panel);
      int64_t r = r0;
      for (; r + kR <= r1; r += kR) Rows<kV, kR>(r, xs);
      for (; r < r1; ++r) Rows<kV, 1>(r, xs);
    });
  }

  // xs[j][t] = x[t, input of selected slot j] (0 if it does not exist), and
  // the zero row 4G; tokens past T are zero.
  void FillTable(int64_t panel, float* xs) const {
    const uint8_t* cols = w.columns + panel * G * kSelected;
    for (int64_t j = 0; j < table_rows; ++j) {
      float* row = xs + j * table_ld;
      const int64_t col = j < kSelected * G ? cols[j] : m;
      const int64_t input = j / kSelected * m + col;
      if (col < m && input < K) {
        for (int64_t t = 0; t < T; ++t) row[t] = D::ToF32(x[t * K + input]);
        for (int64_t t = T; t < table_ld; ++t) row[t] = 0.0f;
      } else {
        std::memset(row, 0, table_ld * sizeof(float));
      }
    }
  }

  // Rows r .. r + kR - 1, every token.
  template <int kV, int kR>
  void Rows(int64_t r, const float* xs) const {
    const int64_t kc = Kc, ld = table_ld, zero_row = kSelected * G;
    const int32_t nn = n;
    const uint8_t* idx[kR];
    const S* val[kR];
    V acc[kR][kV];
    for (int q = 0; q < kR; ++q) {
      idx[q] = w.indices + (r + q) * kc;
      val[q] = w.values + (r + q) * kc;
      for (int u = 0; u < kV; ++u) acc[q][u] = Tr::Zero();
    }
    for (int64_t g = 0; g < G; ++g) {
      for (int e = 0; e < nn; ++e) {
        const int64_t c = g * nn + e;
#pragma GCC unroll 4
        for (int q = 0; q < kR; ++q) {
          // A slot > 3 (garbage under jit) reads the zero row: adds nothing.
          const uint8_t slot = idx[q][c];
          const int64_t j = slot < kSelected ? g * kSelected + slot : zero_row;
          const float value = D::ToF32(val[q][c]);
          const V wv = Tr::Broadcast(&value);
          const float* in = xs + j * ld;
#pragma GCC unroll 4
          for (int u = 0; u < kV; ++u)
            acc[q][u] = Tr::Fma(wv, Tr::Load(in + u * Tr::kWidth), acc[q][u]);
        }
      }
    }
    alignas(64) float out[kV * Tr::kWidth];
    for (int q = 0; q < kR; ++q) {
      for (int u = 0; u < kV; ++u) Tr::Store(out + u * Tr::kWidth, acc[q][u]);
      for (int64_t t = 0; t < T; ++t) y[t * N + r + q] = D::FromF32(out[t]);
    }
  }
};

// The forward: entry by entry at a few tokens, else the dense engine.
template <class Tr, class D, class Isa>
struct SpmmAny {
  SpmmAny(const VnmProblem& prob, const Runtime& runtime) : p(prob), rt(runtime) {}
  bool Compute() {
    if (SpmmTokens<Tr, D, Isa>::Applies(p)) return Run<SpmmTokens<Tr, D, Isa>>(p, rt);
    return Run<Spmm<Tr, D, Isa>>(p, rt);
  }
  const VnmProblem& p;
  const Runtime& rt;
};

// ------------------------------------------------------------------ spmm_t

// dx = dy @ W^T. Per panel, dxg[t, kk] = sum_r dy[t, r] Wp[kk, r] is a dense
// product over the panel's rows, then added into dx[t, sel[kk]]. With tokens
// in the lanes that addition is one vector add per (kk, token vector), so dy
// is transposed once per token block (dyT[r][tokens]) and the task's dx block
// is kept transposed (dxT[input][tokens]) until the end of the task.
// A task is (token block, range of groups): its inputs are its own, so tasks
// never write the same dx element; it walks every panel.
template <class Tr, class D, class Isa>
struct SpmmT : Dims {
  using S = typename D::Storage;
  struct Worker {
    float* tile;
    float* dxt;
    int32_t* sel;
    int32_t* slot_kk;
  };

  struct TransposeJob {
    const SpmmT* op;
    void Run(int64_t task, int) const { op->TransposeDy(task); }
  };

  const VnmProblem& p;
  const Runtime& rt;
  int64_t task_groups, group_tasks, token_blocks, block_tokens, chunk_blocks;
  float* dyt = nullptr;  // [token block of the chunk][N][block_tokens]
  Worker* workers = nullptr;
  // Per batch and chunk of token blocks.
  Weight<D> w{};
  const S* dy = nullptr;
  S* dx = nullptr;
  int64_t first_block = 0;

  SpmmT(const VnmProblem& prob, const Runtime& runtime)
      : Dims(prob), p(prob), rt(runtime) {
    constexpr int64_t kTileTokens = int64_t{VnmTile::kVecs} * Tr::kWidth;
    block_tokens = Min(RoundUp(kTaskTokens, kTileTokens), RoundUp(Max(T, 1), Tr::kWidth));
    token_blocks = CeilDiv(T, block_tokens);
    chunk_blocks = Min(token_blocks, Max(1, kPackBytes / (4 * Max(1, N) * block_tokens)));
    task_groups = Max(1, Min(kTaskGroups, kTileFloats / (kSelected * vpad_max)));
    group_tasks = CeilDiv(G, task_groups);
  }

  void Layout(Carver& c) {
    dyt = c.Take<float>(chunk_blocks * N * block_tokens);
    workers = c.Take<Worker>(rt.num_workers);
    const int64_t nk_max = task_groups * kSelected;
    for (int i = 0; i < rt.num_workers; ++i) {
      const Worker wk{c.Take<float>(nk_max * vpad_max),
                      c.Take<float>(task_groups * m * block_tokens),
                      c.Take<int32_t>(nk_max), c.Take<int32_t>(nk_max)};
      if (workers != nullptr) workers[i] = wk;
    }
  }

  bool Compute() {
    if (T == 0 || K == 0 || p.batch == 0) return true;
    if (N == 0) {
      std::memset(p.out, 0, p.batch * T * K * sizeof(S));
      return true;
    }
    if (!TakeScratch(rt, *this)) return false;
    const bool one_chunk = chunk_blocks == token_blocks;
    for (int64_t b = 0; b < p.batch; ++b) {
      w = Weight<D>::At(p, b);
      dx = static_cast<S*>(p.out) + b * T * K;
      dy = static_cast<const S*>(p.dy) + b * p.dy_stride;
      for (first_block = 0; first_block < token_blocks; first_block += chunk_blocks) {
        const int64_t blocks = Min(chunk_blocks, token_blocks - first_block);
        if (b == 0 || p.dy_stride != 0 || !one_chunk) {
          RunParallel(rt, blocks * CeilDiv(N, kTransposeRows), TransposeJob{this});
        }
        RunParallel(rt, blocks * group_tasks, *this);
      }
    }
    return true;
  }

  // dyT of one token block and kTransposeRows rows of dy, zero past the last
  // token.
  void TransposeDy(int64_t task) const {
    const int64_t row_tasks = CeilDiv(N, kTransposeRows);
    const int64_t blk = task / row_tasks, r0 = task % row_tasks * kTransposeRows;
    const int64_t rows = Min(kTransposeRows, N - r0);
    const int64_t t0 = (first_block + blk) * block_tokens, tokens = Min(block_tokens, T - t0);
    float* out = dyt + blk * N * block_tokens + r0 * block_tokens;
    Isa::template TransposeIn<D>(dy + t0 * N + r0, N, tokens, rows, out, block_tokens);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t t = tokens; t < block_tokens; ++t) out[r * block_tokens + t] = 0.0f;
  }

  void Run(int64_t task, int worker) const {
    const Worker& wk = workers[worker];
    const int64_t blk = task / group_tasks;  // Within the chunk.
    const int64_t g0 = task % group_tasks * task_groups, g1 = Min(G, g0 + task_groups);
    const int64_t in0 = g0 * m, inputs = Min(K, g1 * m) - in0;
    const int64_t t0 = (first_block + blk) * block_tokens, tokens = Min(block_tokens, T - t0);
    const int64_t lanes = RoundUp(tokens, Tr::kWidth);
    const float* dyt_blk = dyt + blk * N * block_tokens;
    std::memset(wk.dxt, 0, inputs * block_tokens * sizeof(float));
    for (int64_t panel = 0; panel < P; ++panel) {
      const int64_t r0 = panel * v, rows = PanelRows(panel), ld = PanelPad(panel);
      const uint8_t* cols = w.columns + panel * G * kSelected;
      const int64_t nk = Select(cols, g0, g1, m, K, wk.sel, wk.slot_kk);
      if (nk == 0) continue;
      Isa::template Decode<D>(w, Kc, n, r0, rows, g0, g1, wk.slot_kk, nk, ld, wk.tile);
      // The next panel's entries of these groups come into L2 meanwhile.
      SegmentFetch<D> fetch;
      if (panel + 1 < P) {
        fetch = SegmentFetch<D>(w, Kc, r0 + v, PanelRows(panel + 1), g0 * n, g1 * n,
                                MicroTiles<Tr>(nk, lanes));
      }
      ForMicroTiles<Tr>(nk, lanes, [&](int64_t kk, int64_t c, auto kr, auto kv) {
        constexpr int kRows = decltype(kr)::value, kVecs = decltype(kv)::value;
        fetch.Step();
        const float* tile_rows[kRows];
        float* dxt_rows[kRows];
        for (int i = 0; i < kRows; ++i) {
          tile_rows[i] = wk.tile + (kk + i) * ld;
          dxt_rows[i] = wk.dxt + (wk.sel[kk + i] - in0) * block_tokens + c;
        }
        SpmmTMicro<Tr, kRows, kVecs>(tile_rows, rows, dyt_blk + r0 * block_tokens + c,
                                     block_tokens, dxt_rows);
      });
    }
    Isa::template TransposeOut<D>(wk.dxt, block_tokens, inputs, tokens, dx + t0 * K + in0, K);
  }
};

// ------------------------------------------------------------------ sddmm

// One row of sampled Gram entries (f32, `count`) into dv, for one chunk of
// tokens: stored on the first chunk, added after it. With `f32_sums` (half
// types over several chunks) the sums stay in f32 until the last chunk.
template <class D, class Isa>
void StoreSampledRow(const float* in, int64_t count, typename D::Storage* out, float* f32_sums,
                     bool first, bool last) {
  if (f32_sums != nullptr) {
    for (int64_t c = 0; c < count; ++c) {
      const float value = first ? in[c] : in[c] + f32_sums[c];
      if (last) {
        out[c] = D::FromF32(value);
      } else {
        f32_sums[c] = value;
      }
    }
  } else if (first) {
    Isa::template FromF32Row<D>(in, out, count);
  } else {  // f32 only: half types take the f32 sums over several chunks.
    for (int64_t c = 0; c < count; ++c) out[c] = D::FromF32(in[c] + D::ToF32(out[c]));
  }
}

// dv[r, c] = sum_t x[t, k(r, c)] dy[t, r]. Per panel and range of groups the
// dense Gram tile gram[kk][r] = sum_t x[t, sel[kk]] dy[t, r] (outputs in the
// lanes, x broadcast), then each output samples its kept slots from it. A task
// is (panel, range of groups): the entries it writes are its own.
//
// The reduction runs over tokens, so both operands are first packed token-
// contiguous, a chunk of tokens at a time: x transposed (xT[input][token]) and
// dy panel by panel (dyP[panel][token][v]). Read in place, consecutive tokens
// would be rows of K or N floats apart, 16 KB for 4096: every step a new page,
// and all in one L1 set.
template <class Tr, class D, class Isa>
struct Sddmm : Dims {
  using S = typename D::Storage;
  // Tokens per pass over a micro-tile: the pass's xT and dyP rows stay in L2.
  static constexpr int64_t kBlockTokens = 256;
  struct Worker {
    float* gram;
    int32_t* sel;
    int32_t* slot_kk;
    float* sampled;  // [v][task_groups * n]
  };

  // xT of one chunk, kTransposeRows inputs per task.
  struct TransposeX {
    const Sddmm* op;
    void Run(int64_t task, int) const { op->PackX(task); }
  };
  // dyP of one chunk, one panel per task.
  struct PackDyJob {
    const Sddmm* op;
    void Run(int64_t task, int) const { op->PackDy(task); }
  };

  const VnmProblem& p;
  const Runtime& rt;
  int64_t task_groups, group_tasks, chunk_tokens, chunks;
  bool sums_in_f32;  // Half types over several chunks: f32 sums of dv.
  float* xt = nullptr;    // [K][chunk_tokens]
  float* dyp = nullptr;   // [P][chunk_tokens][vpad_max]
  float* sums = nullptr;  // [N][Kc] f32, when sums_in_f32
  Worker* workers = nullptr;
  // Per batch and chunk.
  const uint8_t* indices = nullptr;
  const uint8_t* columns = nullptr;
  const S* x = nullptr;
  const S* dy = nullptr;
  S* dv = nullptr;
  int64_t t0 = 0, tokens = 0;

  Sddmm(const VnmProblem& prob, const Runtime& runtime)
      : Dims(prob), p(prob), rt(runtime) {
    task_groups = Max(1, Min(kTaskGroups, kTileFloats / (kSelected * vpad_max)));
    group_tasks = CeilDiv(G, task_groups);
    const int64_t floats_per_token = K + P * vpad_max;
    chunk_tokens = Max(kBlockTokens, RoundUp(kPackBytes / 4 / Max(1, floats_per_token), kBlockTokens));
    chunk_tokens = Min(chunk_tokens, RoundUp(Max(T, 1), Tr::kWidth));
    chunks = CeilDiv(T, chunk_tokens);
    sums_in_f32 = !kIsF32<D> && chunks > 1;
  }

  void Layout(Carver& c) {
    xt = c.Take<float>(K * chunk_tokens);
    dyp = c.Take<float>(P * chunk_tokens * vpad_max);
    if (sums_in_f32) sums = c.Take<float>(N * Kc);
    workers = c.Take<Worker>(rt.num_workers);
    const int64_t nk_max = task_groups * kSelected;
    for (int i = 0; i < rt.num_workers; ++i) {
      const Worker wk{c.Take<float>(nk_max * vpad_max), c.Take<int32_t>(nk_max),
                      c.Take<int32_t>(nk_max), c.Take<float>(vpad_max * task_groups * n)};
      if (workers != nullptr) workers[i] = wk;
    }
  }

  bool Compute() {
    if (N == 0 || Kc == 0 || p.batch == 0) return true;
    if (T == 0) {
      std::memset(p.out, 0, p.batch * N * Kc * sizeof(S));
      return true;
    }
    if (!TakeScratch(rt, *this)) return false;
    for (int64_t b = 0; b < p.batch; ++b) {
      indices = p.indices + b * p.weight_stride;
      columns = p.columns + b * p.columns_stride;
      x = static_cast<const S*>(p.x) + b * p.x_stride;
      dy = static_cast<const S*>(p.dy) + b * p.dy_stride;
      dv = static_cast<S*>(p.out) + b * N * Kc;
      for (int64_t ch = 0; ch < chunks; ++ch) {
        t0 = ch * chunk_tokens;
        tokens = Min(chunk_tokens, T - t0);
        RunParallel(rt, CeilDiv(K, kTransposeRows), TransposeX{this});
        RunParallel(rt, P, PackDyJob{this});
        RunParallel(rt, P * group_tasks, *this);
      }
    }
    return true;
  }

  // xT[k][t] for kTransposeRows inputs k, zero past the chunk's tokens (up
  // to a whole vector).
  void PackX(int64_t task) const {
    const int64_t k0 = task * kTransposeRows, k1 = Min(K, k0 + kTransposeRows);
    const int64_t padded = Min(chunk_tokens, RoundUp(tokens, Tr::kWidth));
    Isa::template TransposeIn<D>(x + t0 * K + k0, K, tokens, k1 - k0, xt + k0 * chunk_tokens,
                                 chunk_tokens);
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t t = tokens; t < padded; ++t) xt[k * chunk_tokens + t] = 0.0f;
  }

  // dyP[panel][t][j] = dy[t, panel * v + j], zero past the panel's outputs.
  void PackDy(int64_t panel) const {
    const int64_t r0 = panel * v, rows = PanelRows(panel), ld = PanelPad(panel);
    float* out = dyp + panel * chunk_tokens * vpad_max;
    for (int64_t t = 0; t < tokens; ++t) {
      const S* row = dy + (t0 + t) * N + r0;
      float* o = out + t * ld;
      Isa::template ToF32Row<D>(row, o, rows);
      for (int64_t j = rows; j < ld; ++j) o[j] = 0.0f;
    }
  }

  void Run(int64_t task, int worker) const {
    const Worker& wk = workers[worker];
    const int64_t panel = task / group_tasks;
    const int64_t g0 = task % group_tasks * task_groups, g1 = Min(G, g0 + task_groups);
    const int64_t r0 = panel * v, rows = PanelRows(panel), ld = PanelPad(panel);
    const int64_t nk = Select(columns + panel * G * kSelected, g0, g1, m, K,
                              wk.sel, wk.slot_kk);
    std::memset(wk.gram, 0, nk * ld * sizeof(float));
    const float* dyp_panel = dyp + panel * chunk_tokens * vpad_max;
    for (int64_t tb = 0; tb < tokens; tb += kBlockTokens) {
      const int64_t block = Min(kBlockTokens, tokens - tb);
      ForMicroTiles<Tr>(nk, ld, [&](int64_t kk, int64_t c, auto kr, auto kv) {
        constexpr int kRows = decltype(kr)::value, kVecs = decltype(kv)::value;
        const float* xt_rows[kRows];
        for (int i = 0; i < kRows; ++i) xt_rows[i] = xt + wk.sel[kk + i] * chunk_tokens + tb;
        SddmmMicro<Tr, kRows, kVecs>(xt_rows, dyp_panel + tb * ld + c, ld, block,
                                     wk.gram + kk * ld + c, ld);
      });
    }
    Sample(r0, rows, ld, g0, g1, wk);
  }

  // Each output's kept slots from the Gram tile, added to dv (or its f32
  // sums) after the first chunk.
  void Sample(int64_t r0, int64_t rows, int64_t ld, int64_t g0, int64_t g1,
              const Worker& wk) const {
    const int64_t count = (g1 - g0) * n;
    Isa::Sample(wk.gram, ld, wk.slot_kk, indices + r0 * Kc, Kc, n, g0, g1,
                rows, wk.sampled, count);
    const bool first = t0 == 0, last = t0 + tokens == T;
    for (int64_t r = 0; r < rows; ++r)
      StoreSampledRow<D, Isa>(wk.sampled + r * count, count, dv + (r0 + r) * Kc + g0 * n,
                              sums_in_f32 ? sums + (r0 + r) * Kc + g0 * n : nullptr, first,
                              last);
  }
};

// ------------------------------------------------------------------ table

// Op<D> for the call's dtype.
template <template <class> class Op>
bool RunForDtype(const VnmProblem& p, const Runtime& rt) {
  switch (p.dtype) {
    case Dtype::kF32:
      return Run<Op<F32>>(p, rt);
    case Dtype::kBF16:
      return Run<Op<BF16>>(p, rt);
    case Dtype::kF16:
      return Run<Op<F16>>(p, rt);
  }
  return true;
}

template <class Tr, class Isa>
struct Ops {
  template <class D>
  using SpmmOp = SpmmAny<Tr, D, Isa>;
  template <class D>
  using SpmmTOp = SpmmT<Tr, D, Isa>;
  template <class D>
  using SddmmOp = Sddmm<Tr, D, Isa>;
};

template <class Tr, class Isa = ScalarIsa>
constexpr VnmKernelTable MakeTable() {
  using O = Ops<Tr, Isa>;
  return VnmKernelTable{&RunForDtype<O::template SpmmOp>,
                        &RunForDtype<O::template SpmmTOp>,
                        &RunForDtype<O::template SddmmOp>};
}

}  // namespace JAXSPARSE_VNM_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_VNM_VNM_KERNELS_H_
