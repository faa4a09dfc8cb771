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
// VnmTile provides:
//   kVecs    vectors of the lane dimension per micro-tile (outputs in spmm
//            and sddmm, tokens in spmm_t)
//   kRows    broadcast rows per micro-tile (tokens in spmm, selected inputs
//            in spmm_t and sddmm); kRows * kVecs accumulators stay in
//            registers, and per reduction step the micro-kernel issues kVecs
//            vector loads and kRows broadcasts for kRows * kVecs FMAs.
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
// Groups per spmm_t and sddmm task: disjoint ranges of inputs, so tasks never
// write the same dx or dv element.
constexpr int64_t kTaskGroups = 32;

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
  static Weight At(const VnmProblem& p, int64_t b) {
    return Weight{static_cast<const typename D::Storage*>(p.values) +
                      b * p.weight_stride,
                  p.indices + b * p.weight_stride,
                  p.columns + b * p.columns_stride};
  }
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

// The kk of entry c (group g) of a row: -1 for a slot > 3 or a dropped input.
inline int32_t EntryKk(const int32_t* slot_kk, int64_t g_rel, uint8_t slot) {
  return slot < kSelected ? slot_kk[g_rel * kSelected + slot] : -1;
}

// Decode(...): the panel's weights of groups [g0, g1) (rows r0 .. r0 + rows
// - 1) as a dense tile[kk][r], `ld` floats per kk; columns rows .. ld - 1 are
// zero. Entries that repeat a slot add up (the reference sums every entry).
// This one, entry by entry, serves every ISA; an ISA may bring a faster one
// (the ops take the decoder as a template parameter).
struct ScalarDecoder {
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
};

// ------------------------------------------------------------------ dense operands

// A dense [rows, cols] operand as f32: the operand itself for f32, else a
// converted copy (each converted once per call, then read ~P times).
template <class D>
struct DenseF32 {
  const float* data = nullptr;
  int64_t ld = 0;
};

template <class D>
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
      for (int64_t c = 0; c < cols; ++c) d[c] = D::ToF32(s[c]);
      for (int64_t c = cols; c < ld; ++c) d[c] = 0.0f;
    }
  }
};

// src as f32 rows of `ld` floats (zero padded), in `buffer` unless it can be
// read in place (f32 with ld == cols).
template <class D>
DenseF32<D> AsF32(const Runtime& rt, const typename D::Storage* src,
                  int64_t rows, int64_t cols, int64_t ld, float* buffer) {
  if constexpr (kIsF32<D>) {
    if (ld == cols) return DenseF32<D>{src, cols};
  }
  const ConvertJob<D> job{src, rows, cols, ld, buffer};
  RunParallel(rt, CeilDiv(rows, ConvertJob<D>::kRowsPerTask), job);
  return DenseF32<D>{buffer, ld};
}

// ------------------------------------------------------------------ micro-kernels

// spmm: acc[t][lanes] += x[t, sel[kk]] * tile[kk][lanes] over kk in [0, nk),
// for kRows token rows (x_rows) and kVecs vectors of outputs. Per kk: kVecs
// loads of the tile, one load of sel[kk] shared by the kRows broadcasts that
// read x through it (the gather folded into the broadcast).
template <class Tr, int kRows, int kVecs>
void SpmmMicro(const float* const* x_rows, const int32_t* sel, int64_t nk,
               const float* tile, int64_t ld, float* acc, int64_t acc_ld) {
  using V = typename Tr::V;
  constexpr int kW = Tr::kWidth;
  V a[kRows][kVecs];
  const float* xr[kRows];
  for (int t = 0; t < kRows; ++t) xr[t] = x_rows[t];
  for (int t = 0; t < kRows; ++t)
    for (int j = 0; j < kVecs; ++j) a[t][j] = Tr::Load(acc + t * acc_ld + j * kW);
  for (int64_t kk = 0; kk < nk; ++kk) {
    const int64_t off = sel[kk];
    const float* wk = tile + kk * ld;
    V w[kVecs];
    for (int j = 0; j < kVecs; ++j) w[j] = Tr::Load(wk + j * kW);
    for (int t = 0; t < kRows; ++t) {
      const V b = Tr::Broadcast(xr[t] + off);
      for (int j = 0; j < kVecs; ++j) a[t][j] = Tr::Fma(b, w[j], a[t][j]);
    }
  }
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

// sddmm: acc[i][output lanes] += sum_t x[t, off_i] * dy[t][output lanes] over
// `tokens` rows, for kRows selected inputs (offsets off_i into a row of x) and
// kVecs vectors of the panel's outputs.
template <class Tr, int kRows, int kVecs>
void SddmmMicro(const float* x, int64_t x_ld, const int32_t* off,
                const float* dy, int64_t dy_ld, int64_t tokens, float* acc,
                int64_t acc_ld) {
  using V = typename Tr::V;
  constexpr int kW = Tr::kWidth;
  V a[kRows][kVecs];
  int64_t o[kRows];
  for (int i = 0; i < kRows; ++i) o[i] = off[i];
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < kVecs; ++j) a[i][j] = Tr::Load(acc + i * acc_ld + j * kW);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* xt = x + t * x_ld;
    const float* d = dy + t * dy_ld;
    V y[kVecs];
    for (int j = 0; j < kVecs; ++j) y[j] = Tr::Load(d + j * kW);
    for (int i = 0; i < kRows; ++i) {
      const V b = Tr::Broadcast(xt + o[i]);
      for (int j = 0; j < kVecs; ++j) a[i][j] = Tr::Fma(b, y[j], a[i][j]);
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < kVecs; ++j) Tr::Store(acc + i * acc_ld + j * kW, a[i][j]);
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

// y = x @ W. A task is (token block, panel); per block of groups it decodes
// the panel's tile once (kTileFloats) and runs every micro-tile of its
// tokens over it, the partial sums of the task in a per-worker buffer.
// Consecutive tasks share the token block, so its rows of x stay in L3 while
// the panels pass over them.
template <class Tr, class D, class Dec>
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
  int64_t block_groups, task_tokens, token_blocks;
  float* x_buffer = nullptr;
  Worker* workers = nullptr;
  // Per batch.
  Weight<D> w{};
  DenseF32<D> x{};
  S* y = nullptr;

  Spmm(const VnmProblem& prob, const Runtime& runtime)
      : Dims(prob), p(prob), rt(runtime) {
    block_groups = Max(1, kTileFloats / (kSelected * vpad_max));
    task_tokens = RoundUp(kTaskTokens, VnmTile::kRows);
    token_blocks = CeilDiv(T, task_tokens);
  }

  void Layout(Carver& c) {
    if (!kIsF32<D>) x_buffer = c.Take<float>(T * K);
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
    for (int64_t b = 0; b < p.batch; ++b) {
      w = Weight<D>::At(p, b);
      if (b == 0 || p.x_stride != 0) {
        x = AsF32<D>(rt, static_cast<const S*>(p.x) + b * p.x_stride, T, K, K,
                     x_buffer);
      }
      y = static_cast<S*>(p.out) + b * T * N;
      RunParallel(rt, token_blocks * P, *this);
    }
    return true;
  }

  void Run(int64_t task, int worker) const {
    const Worker& wk = workers[worker];
    const int64_t panel = task % P, t0 = task / P * task_tokens;
    const int64_t tokens = Min(task_tokens, T - t0);
    const int64_t r0 = panel * v, rows = PanelRows(panel), ld = PanelPad(panel);
    std::memset(wk.acc, 0, tokens * ld * sizeof(float));
    const uint8_t* cols = w.columns + panel * G * kSelected;
    for (int64_t g0 = 0; g0 < G; g0 += block_groups) {
      const int64_t g1 = Min(G, g0 + block_groups);
      const int64_t nk = Select(cols, g0, g1, m, K, wk.sel, wk.slot_kk);
      if (nk == 0) continue;
      Dec::template Decode<D>(w, Kc, n, r0, rows, g0, g1, wk.slot_kk, nk, ld, wk.tile);
      ForMicroTiles<Tr>(tokens, ld, [&](int64_t t, int64_t c, auto kr, auto kv) {
        constexpr int kRows = decltype(kr)::value, kVecs = decltype(kv)::value;
        const float* x_rows[kRows];
        for (int i = 0; i < kRows; ++i) x_rows[i] = x.data + (t0 + t + i) * x.ld;
        SpmmMicro<Tr, kRows, kVecs>(x_rows, wk.sel, nk, wk.tile + c, ld,
                                    wk.acc + t * ld + c, ld);
      });
    }
    for (int64_t t = 0; t < tokens; ++t) {
      S* out = y + (t0 + t) * N + r0;
      const float* a = wk.acc + t * ld;
      for (int64_t r = 0; r < rows; ++r) out[r] = D::FromF32(a[r]);
    }
  }
};

// ------------------------------------------------------------------ spmm_t

// dx = dy @ W^T. Per panel, dxg[t, kk] = sum_r dy[t, r] Wp[kk, r] is a dense
// product over the panel's rows, then added into dx[t, sel[kk]]. With tokens
// in the lanes that addition is one vector add per (kk, token vector), so dy
// is transposed once per token block (dyT[r][tokens]) and the task's dx block
// is kept transposed (dxT[input][tokens]) until the end of the task.
// A task is (token block, range of groups): its inputs are its own, so tasks
// never write the same dx element; it walks every panel.
template <class Tr, class D, class Dec>
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
  int64_t task_groups, group_tasks, token_blocks, block_tokens;
  float* dyt = nullptr;  // [token block][N][block_tokens]
  Worker* workers = nullptr;
  // Per batch.
  Weight<D> w{};
  const S* dy = nullptr;
  S* dx = nullptr;

  SpmmT(const VnmProblem& prob, const Runtime& runtime)
      : Dims(prob), p(prob), rt(runtime) {
    constexpr int64_t kTileTokens = int64_t{VnmTile::kVecs} * Tr::kWidth;
    block_tokens = Min(RoundUp(kTaskTokens, kTileTokens), RoundUp(T, Tr::kWidth));
    token_blocks = CeilDiv(T, block_tokens);
    task_groups = Max(1, Min(kTaskGroups, kTileFloats / (kSelected * vpad_max)));
    group_tasks = CeilDiv(G, task_groups);
  }

  void Layout(Carver& c) {
    dyt = c.Take<float>(token_blocks * N * block_tokens);
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
    for (int64_t b = 0; b < p.batch; ++b) {
      w = Weight<D>::At(p, b);
      dx = static_cast<S*>(p.out) + b * T * K;
      if (b == 0 || p.dy_stride != 0) {
        dy = static_cast<const S*>(p.dy) + b * p.dy_stride;
        RunParallel(rt, token_blocks * CeilDiv(N, kLanePad), TransposeJob{this});
      }
      RunParallel(rt, token_blocks * group_tasks, *this);
    }
    return true;
  }

  // dyT of one token block and 16 rows of dy, zero past the last token.
  void TransposeDy(int64_t task) const {
    const int64_t row_tasks = CeilDiv(N, kLanePad);
    const int64_t blk = task / row_tasks, r0 = task % row_tasks * kLanePad;
    const int64_t t0 = blk * block_tokens, tokens = Min(block_tokens, T - t0);
    float* out = dyt + blk * N * block_tokens;
    for (int64_t r = r0; r < Min(N, r0 + kLanePad); ++r) {
      float* o = out + r * block_tokens;
      for (int64_t t = 0; t < tokens; ++t) o[t] = D::ToF32(dy[(t0 + t) * N + r]);
      for (int64_t t = tokens; t < block_tokens; ++t) o[t] = 0.0f;
    }
  }

  void Run(int64_t task, int worker) const {
    const Worker& wk = workers[worker];
    const int64_t blk = task / group_tasks;
    const int64_t g0 = task % group_tasks * task_groups, g1 = Min(G, g0 + task_groups);
    const int64_t in0 = g0 * m, inputs = Min(K, g1 * m) - in0;
    const int64_t t0 = blk * block_tokens, tokens = Min(block_tokens, T - t0);
    const int64_t lanes = RoundUp(tokens, Tr::kWidth);
    const float* dyt_blk = dyt + blk * N * block_tokens;
    std::memset(wk.dxt, 0, inputs * block_tokens * sizeof(float));
    for (int64_t panel = 0; panel < P; ++panel) {
      const int64_t r0 = panel * v, rows = PanelRows(panel), ld = PanelPad(panel);
      const uint8_t* cols = w.columns + panel * G * kSelected;
      const int64_t nk = Select(cols, g0, g1, m, K, wk.sel, wk.slot_kk);
      if (nk == 0) continue;
      Dec::template Decode<D>(w, Kc, n, r0, rows, g0, g1, wk.slot_kk, nk, ld, wk.tile);
      ForMicroTiles<Tr>(nk, lanes, [&](int64_t kk, int64_t c, auto kr, auto kv) {
        constexpr int kRows = decltype(kr)::value, kVecs = decltype(kv)::value;
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
    for (int64_t t = 0; t < tokens; ++t) {
      S* out = dx + (t0 + t) * K + in0;
      for (int64_t i = 0; i < inputs; ++i)
        out[i] = D::FromF32(wk.dxt[i * block_tokens + t]);
    }
  }
};

// ------------------------------------------------------------------ sddmm

// dv[r, c] = sum_t x[t, k(r, c)] dy[t, r]. Per panel and range of groups the
// dense Gram tile gram[kk][r] = sum_t x[t, sel[kk]] dy[t, r] over all tokens
// (outputs in the lanes, x read through sel by broadcast), then each output
// samples its kept slots from it. A task is (panel, range of groups): the
// entries it writes are its own.
template <class Tr, class D, class Dec>
struct Sddmm : Dims {
  using S = typename D::Storage;
  // Tokens per pass over a micro-tile: the pass's rows of dy and x stay in L2.
  static constexpr int64_t kBlockTokens = 256;
  struct Worker {
    float* gram;
    int32_t* sel;
    int32_t* slot_kk;
  };

  const VnmProblem& p;
  const Runtime& rt;
  int64_t task_groups, group_tasks, dy_ld;
  bool dy_in_place;
  float* x_buffer = nullptr;
  float* dy_buffer = nullptr;
  Worker* workers = nullptr;
  // Per batch.
  const uint8_t* indices = nullptr;
  const uint8_t* columns = nullptr;
  DenseF32<D> x{}, dyf{};
  S* dv = nullptr;

  Sddmm(const VnmProblem& prob, const Runtime& runtime)
      : Dims(prob), p(prob), rt(runtime) {
    task_groups = Max(1, Min(kTaskGroups, kTileFloats / (kSelected * vpad_max)));
    group_tasks = CeilDiv(G, task_groups);
    // Panels are read as whole vectors: dy is read in place only when every
    // panel is full (then v, a multiple of 16, is the panel stride).
    dy_in_place = kIsF32<D> && N % v == 0;
    dy_ld = dy_in_place ? N : P * vpad_max;
  }

  void Layout(Carver& c) {
    if (!kIsF32<D>) x_buffer = c.Take<float>(T * K);
    if (!dy_in_place) dy_buffer = c.Take<float>(T * dy_ld);
    workers = c.Take<Worker>(rt.num_workers);
    const int64_t nk_max = task_groups * kSelected;
    for (int i = 0; i < rt.num_workers; ++i) {
      const Worker wk{c.Take<float>(nk_max * vpad_max), c.Take<int32_t>(nk_max),
                      c.Take<int32_t>(nk_max)};
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
      const int64_t ws = b * p.weight_stride;
      indices = p.indices + ws;
      columns = p.columns + b * p.columns_stride;
      if (b == 0 || p.x_stride != 0) {
        x = AsF32<D>(rt, static_cast<const S*>(p.x) + b * p.x_stride, T, K, K,
                     x_buffer);
      }
      if (b == 0 || p.dy_stride != 0) PrepareDy(b);
      dv = static_cast<S*>(p.out) + b * N * Kc;
      RunParallel(rt, P * group_tasks, *this);
    }
    return true;
  }

  // dy as f32 with every panel padded to vpad_max columns (zeros).
  void PrepareDy(int64_t b) {
    const S* src = static_cast<const S*>(p.dy) + b * p.dy_stride;
    if (dy_in_place) {
      dyf = DenseF32<D>{reinterpret_cast<const float*>(src), N};
      return;
    }
    struct Job {
      const S* src;
      int64_t T, N, v, vpad, ld;
      float* dst;
      void Run(int64_t t, int) const {
        float* d = dst + t * ld;
        std::memset(d, 0, ld * sizeof(float));
        for (int64_t r = 0; r < N; ++r)
          d[r / v * vpad + r % v] = D::ToF32(src[t * N + r]);
      }
    };
    RunParallel(rt, T, Job{src, T, N, v, vpad_max, dy_ld, dy_buffer});
    dyf = DenseF32<D>{dy_buffer, dy_ld};
  }

  void Run(int64_t task, int worker) const {
    const Worker& wk = workers[worker];
    const int64_t panel = task / group_tasks;
    const int64_t g0 = task % group_tasks * task_groups, g1 = Min(G, g0 + task_groups);
    const int64_t r0 = panel * v, rows = PanelRows(panel), ld = PanelPad(panel);
    const int64_t dy_col = dy_in_place ? r0 : panel * vpad_max;
    const int64_t nk = Select(columns + panel * G * kSelected, g0, g1, m, K,
                              wk.sel, wk.slot_kk);
    std::memset(wk.gram, 0, nk * ld * sizeof(float));
    for (int64_t t0 = 0; t0 < T; t0 += kBlockTokens) {
      const int64_t tokens = Min(kBlockTokens, T - t0);
      ForMicroTiles<Tr>(nk, ld, [&](int64_t kk, int64_t c, auto kr, auto kv) {
        constexpr int kRows = decltype(kr)::value, kVecs = decltype(kv)::value;
        SddmmMicro<Tr, kRows, kVecs>(x.data + t0 * x.ld, x.ld, wk.sel + kk,
                                     dyf.data + t0 * dyf.ld + dy_col + c, dyf.ld,
                                     tokens, wk.gram + kk * ld + c, ld);
      });
    }
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* idx = indices + (r0 + r) * Kc;
      S* out = dv + (r0 + r) * Kc;
      for (int64_t g = g0; g < g1; ++g) {
        for (int e = 0; e < n; ++e) {
          const int64_t c = g * n + e;
          const int32_t kk = EntryKk(wk.slot_kk, g - g0, idx[c]);
          out[c] = D::FromF32(kk >= 0 ? wk.gram[kk * ld + r] : 0.0f);
        }
      }
    }
  }
};

// ------------------------------------------------------------------ table

template <class Op>
bool Run(const VnmProblem& p, const Runtime& rt) {
  Op op(p, rt);
  return op.Compute();
}

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

template <class Tr, class Dec>
struct Ops {
  template <class D>
  using SpmmOp = Spmm<Tr, D, Dec>;
  template <class D>
  using SpmmTOp = SpmmT<Tr, D, Dec>;
  template <class D>
  using SddmmOp = Sddmm<Tr, D, Dec>;
};

template <class Tr, class Dec = ScalarDecoder>
constexpr VnmKernelTable MakeTable() {
  using O = Ops<Tr, Dec>;
  return VnmKernelTable{&RunForDtype<O::template SpmmOp>,
                        &RunForDtype<O::template SpmmTOp>,
                        &RunForDtype<O::template SddmmOp>};
}

}  // namespace JAXSPARSE_VNM_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_VNM_VNM_KERNELS_H_
