// The V:N:M products on AMX (bf16, from kAmxMinTokens): the engine of
// vnm_kernels.h with the tile unit as its micro-kernel
// (cpu/engine/bf16_tiles.h): the forward (SpmmAmx), dx (SpmmTAmx) and the
// values' gradient (SddmmAmx). The N:M engine path (m = 4) runs on them too.
// Included by vnm_kernels_amx.cc after vnm_kernels.h and vnm_avx512.h, inside
// the amx namespace they open; vnm_kernels_avx512bf16.cc compiles the same
// kernels without AMX, so their tiles multiply on vdpbf16ps. Measured facts
// below are from the AMX unit.
//
// Per task (a few panels, a range of tokens) and block of groups (usually
// all of them):
//   - Select: each panel's selected inputs (the gather list), as elsewhere;
//   - Decode (AVX-512) straight into the bf16 B tiles (BTileSink): the
//     values are bf16, so their way through f32 is exact;
//   - per 32 tokens: gather their selected inputs into two A tiles per
//     panel (the panels share each load of x), then the 2 x 2 tile products
//     over every output tile of each panel, into f32 sums (C), rounded to
//     bf16 into y.
// x is read in place (bf16), from L3 at many tokens: each task reads all of
// its tokens' rows once for its panels. Measured on a 2-core Xeon with AMX
// (4096x4096, 2048 tokens): with the x rows of every call forced into L1,
// 64:2:8 ran in 31 ms instead of 40 and 128:2:16 in 16.4 instead of 22,
// with one panel per task; hence the panels that share x's loads.
#ifndef JAXSPARSE_CPU_VNM_VNM_AMX_H_
#define JAXSPARSE_CPU_VNM_VNM_AMX_H_

#include "cpu/engine/bf16_tiles.h"

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_VNM_ISA {

namespace tiles = bf16_tiles;

// From this many tokens the forward runs on the tiles; below, the AVX-512
// kernels (streaming, or f32 FMAs), which need no packing of A and B.
constexpr int64_t kAmxMinTokens = 32;
// Tokens gathered at a time: two A tiles.
constexpr int64_t kAmxGatherTokens = 2 * tiles::kTileRows;
// Panels per task at most: their gathers share each load of x.
constexpr int kAmxMaxPanels = 4;
// Tokens and panels per task when the inputs come in several blocks (the
// task's f32 sums then persist across blocks: tokens x panels x width, up to
// 512 KB). At 11008 inputs and 2048 tokens (64:2:8, 128:2:16): 256 tokens
// 102 and 51 ms, 512 tokens 88 and 47, as many as a quarter of L2 holds (1024
// and 512) 99 and 47.
constexpr int64_t kAmxBlockedTokens = 512;
constexpr int64_t kAmxBlockedPanels = 2;

struct SpmmAmx : Dims {
  using D = BF16;
  using S = D::Storage;
  // One panel of a task: its B tiles, its A tiles (the 32 tokens being
  // multiplied), its gather list and plan.
  struct PanelScratch {
    uint16_t* b;
    uint16_t* a;
    int32_t* sel;
    int32_t* slot_kk;
    tiles::GatherWindow* windows;
    int32_t* first;
  };
  struct Worker {
    PanelScratch panel[kAmxMaxPanels];
    float* c;  // f32 sums: [tokens][panels x vpad_max]
  };

  const VnmProblem& p;
  const Runtime& rt;
  // Per task: `panels` consecutive panels and `task_tokens` tokens; the
  // inputs in blocks of `block_groups` groups (all of them when they fit).
  int64_t block_groups, panels, task_tokens, panel_tasks;
  bool blocked;
  Worker* workers = nullptr;
  Weight<D> w{};
  const S* x = nullptr;
  S* y = nullptr;

  // A panel's B tiles and the A tiles of 32 tokens take (nk x width + 32 x
  // nk) words. Up to half of L2 goes to them, so they stay there next to
  // the rows of x being read; with all inputs in one block, the panels of a
  // task share each load of x (up to kAmxMaxPanels), and every task's tokens
  // meet one decode of their panels' weights. Past three quarters of L2 the
  // inputs come in blocks, two panels per task (sharing x's loads as
  // above), and the sums persist in L2 across blocks (kAmxBlockedTokens
  // tokens per task). Measured with three
  // quarters of L2 for 4 panels (64:2:8, 4096 inputs): 10-20% slower than
  // half of L2 for 2.
  SpmmAmx(const VnmProblem& prob, const Runtime& runtime) : Dims(prob), p(prob), rt(runtime) {
    const int64_t budget_words = rt.l2_bytes / 2 / int64_t{sizeof(uint16_t)};
    const int64_t words_per_group = kSelected * (vpad_max + kAmxGatherTokens);
    const int64_t panel_words = RoundUp(G, 8) * words_per_group;
    // Two panels that share x's loads in blocks beat one over all inputs:
    // at 11008 inputs and 2048 tokens, 64:2:8 ran 123-127 ms with one panel
    // per task (x read once per panel, from L3) against 102 with two in
    // blocks (256 tokens per task).
    blocked = panel_words * Min(P, kAmxBlockedPanels) > budget_words;
    if (blocked) {
      panels = Min(P, kAmxBlockedPanels);
      block_groups = Max(8, budget_words / (panels * words_per_group) / 8 * 8);
    } else {
      block_groups = G;
      panels = Max(1, Min(kAmxMaxPanels, Min(P, budget_words / panel_words)));
      // Fewer panels per task where that alone leaves a worker idle: with few panels (a
      // 384-output layer is 3 of 128) and few tokens, 4 panels per task made one task for two
      // cores (768x384 bf16 2:4 at 32 tokens, docs/cpu_speed_notes.md).
      const int64_t token_tiles = CeilDiv(Max(T, 1), kAmxGatherTokens);
      while (panels > 1 && CeilDiv(P, panels) * token_tiles < 2 * rt.num_workers) --panels;
    }
    panel_tasks = CeilDiv(P, panels);
    // Enough tasks for every worker (about 4 each), as few as that allows:
    // each task decodes its panels once.
    const int64_t chunks = Max(1, CeilDiv(4 * rt.num_workers, panel_tasks));
    task_tokens = RoundUp(CeilDiv(Max(T, 1), chunks), kAmxGatherTokens);
    if (blocked) task_tokens = Min(task_tokens, kAmxBlockedTokens);
  }

  static bool Applies(const VnmProblem& p) {
    return p.dtype == Dtype::kBF16 && p.tokens >= kAmxMinTokens;
  }

  int64_t SumRows() const { return blocked ? task_tokens : kAmxGatherTokens; }

  void Layout(Carver& c) {
    workers = c.Take<Worker>(rt.num_workers);
    const int64_t nk_max = RoundUp(block_groups, 8) * kSelected;
    const int64_t steps_max = CeilDiv(nk_max, tiles::kStepWords);
    for (int i = 0; i < rt.num_workers; ++i) {
      Worker wk{};
      for (int q = 0; q < panels; ++q) {
        wk.panel[q] = PanelScratch{
            c.Take<uint16_t>(steps_max * tiles::kTileWords * (vpad_max / 16)),
            c.Take<uint16_t>(steps_max * tiles::kTileWords * 2),
            c.Take<int32_t>(nk_max),
            c.Take<int32_t>(nk_max),
            c.Take<tiles::GatherWindow>(steps_max * tiles::MaxWindowsPerStep(m)),
            c.Take<int32_t>(steps_max + 1)};
      }
      wk.c = c.Take<float>(SumRows() * panels * vpad_max);
      if (workers != nullptr) workers[i] = wk;
    }
  }

  bool Compute() { return RunForwardInPlace(*this, CeilDiv(T, task_tokens) * panel_tasks); }

  // Panel q of the task, from its first panel; b and b_next: its B tiles of
  // the block (decoded, or a window of the tiles packed once).
  struct TaskPanel {
    int64_t panel, r0, rows, ld, nk, steps;
    const uint16_t* b;
    int64_t b_next;
  };

  // The tiles packed once (VnmProblem::tiles) hold, per panel, v / 16 output
  // tiles of all ceil(4 G / 32) k steps, with every group's 4 slots at kk =
  // 4 g + slot. The block's window of them is its B when its gather list is
  // exactly that: every selected input exists (no ragged last group's
  // padding, no column >= m) and none is named twice (garbage columns under
  // jit), so the list's kk are 4 (g - g0) + slot; and the block starts on a
  // k step (blocks are whole multiples of 8 groups). Otherwise the block is
  // decoded from the values as without packed tiles.
  const uint16_t* PackedWindow(int64_t panel, int64_t g0, int64_t g1, int64_t nk,
                               const int32_t* sel) const {
    if (w.tiles == nullptr || nk != kSelected * (g1 - g0) ||
        kSelected * g0 % tiles::kStepWords != 0 || NamesAnInputTwice(sel, nk)) {
      return nullptr;
    }
    return w.tiles + (panel * (v / 16) * PackedSteps() + kSelected * g0 / tiles::kStepWords) *
                         tiles::kTileWords;
  }
  int64_t PackedSteps() const { return CeilDiv(kSelected * G, tiles::kStepWords); }

  void Run(int64_t task, int worker) const {
    const Worker& wk = workers[worker];
    const int64_t first_panel = task % panel_tasks * panels, t0 = task / panel_tasks * task_tokens;
    const int64_t tokens = Min(task_tokens, T - t0);
    const int np = static_cast<int>(Min(panels, P - first_panel));
    const int64_t c_ld = panels * vpad_max;  // Floats per row of the sums.
    TaskPanel tp[kAmxMaxPanels];
    for (int q = 0; q < np; ++q) {
      const int64_t panel = first_panel + q;
      tp[q] = TaskPanel{panel, panel * v, PanelRows(panel), PanelPad(panel), 0, 0, nullptr, 0};
    }
    if (blocked) std::memset(wk.c, 0, RoundUp(tokens, kAmxGatherTokens) * c_ld * sizeof(float));
    tiles::ConfigureTiles();
    for (int64_t g0 = 0; g0 < G; g0 += block_groups) {
      const int64_t g1 = Min(G, g0 + block_groups);
      bool shared = true;
      for (int q = 0; q < np; ++q) {
        const PanelScratch& ps = wk.panel[q];
        TaskPanel& t = tp[q];
        const uint8_t* cols = w.columns + t.panel * G * kSelected;
        t.nk = Select(cols, g0, g1, m, K, ps.sel, ps.slot_kk);
        if (t.nk == 0) {
          // Its plan is stale: the others gather without it.
          t.steps = 0;
          shared = false;
          continue;
        }
        t.steps = tiles::PlanGather(ps.sel, t.nk, K, ps.windows, ps.first);
        t.b = PackedWindow(t.panel, g0, g1, t.nk, ps.sel);
        t.b_next = t.b != nullptr ? PackedSteps() * tiles::kTileWords : t.steps * tiles::kTileWords;
        if (t.b == nullptr) Decode(t, g0, g1, ps);
        shared = shared && t.steps == tp[0].steps &&
                 tiles::SameWindows(wk.panel[0].windows, wk.panel[0].first, ps.windows,
                                    ps.first, t.steps);
      }
      for (int64_t t = 0; t < tokens; t += kAmxGatherTokens) {
        const int64_t tile_tokens = RoundUp(Min(kAmxGatherTokens, tokens - t), tiles::kTileRows);
        Gather(wk, tp, np, shared, t0 + t, Min(tile_tokens, tokens - t), tile_tokens);
        float* const c = wk.c + (blocked ? t : 0) * c_ld;
        for (int q = 0; q < np; ++q) {
          // A panel without selected inputs in this block adds nothing; in
          // one block, its sums are zero.
          if (tp[q].nk == 0 && blocked) continue;
          if (tp[q].nk == 0) {
            for (int64_t r = 0; r < tile_tokens; ++r)
              std::memset(c + r * c_ld + q * vpad_max, 0, tp[q].ld * sizeof(float));
            continue;
          }
          tiles::TileProduct(wk.panel[q].a, tile_tokens / tiles::kTileRows, tp[q].b,
                             tp[q].b_next, tp[q].ld / 16, tp[q].steps, c + q * vpad_max, c_ld,
                             blocked);
        }
        if (!blocked) WriteY(c, c_ld, tp, np, t0 + t, Min(tile_tokens, tokens - t));
      }
    }
    tiles::ReleaseTiles();
    if (blocked) WriteY(wk.c, c_ld, tp, np, t0, tokens);
  }

  // The block's B tiles of panel t, decoded from the values into its scratch.
  void Decode(TaskPanel& t, int64_t g0, int64_t g1, const PanelScratch& ps) const {
    tiles::ZeroBTail(ps.b, t.nk, t.ld / 16);
    const tiles::BTileSink sink{ps.b, t.steps};
    if (n == 1) {
      Avx512Isa::DecodeN<D, 1>(w, Kc, t.r0, t.rows, g0, g1, ps.slot_kk, t.ld, sink);
    } else {
      Avx512Isa::DecodeN<D, 2>(w, Kc, t.r0, t.rows, g0, g1, ps.slot_kk, t.ld, sink);
    }
    t.b = ps.b;
  }

  // The A tiles of every panel for tokens t .. t + live - 1 (rows up to
  // `rows`, the rest zero): one load of x per window for all panels when
  // their plans agree, else panel by panel.
  void Gather(const Worker& wk, const TaskPanel* tp, int np, bool shared, int64_t t, int64_t live,
              int64_t rows) const {
    const tiles::GatherWindow* windows[kAmxMaxPanels];
    uint16_t* a_tiles[kAmxMaxPanels];
    for (int r = 0; r < rows; ++r) {
      const int64_t row = r % tiles::kTileRows;
      const int64_t tile = r / tiles::kTileRows;
      for (int q = 0; q < np; ++q) {
        windows[q] = wk.panel[q].windows;
        a_tiles[q] = wk.panel[q].a + tile * tp[q].steps * tiles::kTileWords;
      }
      if (r >= live) {
        for (int q = 0; q < np; ++q) tiles::ZeroRow(tp[q].steps, a_tiles[q], row);
        continue;
      }
      const uint16_t* x_row = x + (t + r) * K;
      if (shared) {
        Dispatch<kAmxMaxPanels>(np, [&](auto kp) {
          tiles::GatherRowShared<decltype(kp)::value>(x_row, windows, wk.panel[0].first,
                                                      tp[0].steps, a_tiles, row);
        });
      } else {
        for (int q = 0; q < np; ++q) {
          if (tp[q].nk == 0) continue;
          tiles::GatherRow(x_row, wk.panel[q].windows, wk.panel[q].first, tp[q].steps,
                           a_tiles[q], row);
        }
      }
    }
  }

  // y[t0 .. t0 + tokens) of the task's panels from the f32 sums.
  void WriteY(const float* c, int64_t c_ld, const TaskPanel* tp, int np, int64_t t0,
              int64_t tokens) const {
    for (int64_t t = 0; t < tokens; ++t)
      for (int q = 0; q < np; ++q)
        Avx512Isa::FromF32Row<D>(c + t * c_ld + q * vpad_max, y + (t0 + t) * N + tp[q].r0,
                                 tp[q].rows);
  }
};

// dx = dy @ W^T on the tiles (bf16). A task is (block of tokens, range of
// groups): its inputs are its own, so no two tasks write one dx element, and
// the product over its inputs is dense: dx[t, in0 + c] = sum_o dy[t, o]
// W^T[o, c], with W^T the task's columns of the weight, every panel decoded
// into one B operand (TransposedBTileSink; zero where no panel selects an
// input, or an output keeps none). Per 32 tokens, dy's rows are packed into
// A tiles and multiplied with all of B in one pass over the outputs: the sums
// are whole, so they go straight to dx, with no scatter (one add per panel
// and input, as the FMA kernel does it, would cost ~5x the tile products).
// The unselected inputs of m > 4 are multiplied as zeros: 1 - 4/m of the
// work is spent on them (none for the N:M engine's m = 4).
struct SpmmTAmx : Dims {
  using D = BF16;
  using S = D::Storage;
  struct Worker {
    uint16_t* b;  // [input tiles][out steps][1 KB]
    uint16_t* a;  // [2 token tiles][out steps][1 KB]
    float* c;     // [32 tokens][cols]
    int32_t* sel;
    int32_t* slot_kk;
  };

  const VnmProblem& p;
  const Runtime& rt;
  int64_t out_steps, task_groups, cols, group_tasks, task_tokens, token_tasks;
  Worker* workers = nullptr;
  Weight<D> w{};
  const S* dy = nullptr;
  S* dx = nullptr;

  // B (out_steps x 32 outputs x cols inputs) takes up to half of L2, beside
  // the packed rows of dy; then enough tasks for about 4 per worker.
  SpmmTAmx(const VnmProblem& prob, const Runtime& runtime) : Dims(prob), p(prob), rt(runtime) {
    out_steps = CeilDiv(Max(N, 1), tiles::kStepWords);
    const int64_t budget_words = rt.l2_bytes / 2 / int64_t{sizeof(uint16_t)};
    const int64_t max_cols = Max(32, budget_words / (out_steps * tiles::kStepWords) / 32 * 32);
    task_groups = Max(1, Min(G, max_cols / m));
    group_tasks = CeilDiv(G, task_groups);
    cols = RoundUp(task_groups * m, 32);
    const int64_t chunks = Max(1, CeilDiv(4 * rt.num_workers, group_tasks));
    task_tokens = RoundUp(CeilDiv(Max(T, 1), chunks), kAmxGatherTokens);
    token_tasks = CeilDiv(T, task_tokens);
  }

  static bool Applies(const VnmProblem& p) {
    return p.dtype == Dtype::kBF16 && p.tokens >= kAmxMinTokens;
  }

  void Layout(Carver& c) {
    workers = c.Take<Worker>(rt.num_workers);
    for (int i = 0; i < rt.num_workers; ++i) {
      const Worker wk{c.Take<uint16_t>(cols / 16 * out_steps * tiles::kTileWords),
                      c.Take<uint16_t>(2 * out_steps * tiles::kTileWords),
                      c.Take<float>(kAmxGatherTokens * cols),
                      c.Take<int32_t>(task_groups * kSelected),
                      c.Take<int32_t>(task_groups * kSelected)};
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
      dy = static_cast<const S*>(p.dy) + b * p.dy_stride;
      dx = static_cast<S*>(p.out) + b * T * K;
      RunParallel(rt, token_tasks * group_tasks, *this);
    }
    return true;
  }

  void Run(int64_t task, int worker) const {
    const Worker& wk = workers[worker];
    const int64_t g0 = task % group_tasks * task_groups, g1 = Min(G, g0 + task_groups);
    const int64_t in0 = g0 * m, inputs = Min(K, g1 * m) - in0;
    const int64_t t0 = task / group_tasks * task_tokens, tokens = Min(task_tokens, T - t0);
    const int64_t in_tiles = RoundUp(inputs, 16) / 16;
    std::memset(wk.b, 0, in_tiles * out_steps * tiles::kTileWords * sizeof(uint16_t));
    for (int64_t panel = 0; panel < P; ++panel) {
      const uint8_t* panel_cols = w.columns + panel * G * kSelected;
      const int64_t nk = Select(panel_cols, g0, g1, m, K, wk.sel, wk.slot_kk);
      if (nk == 0) continue;
      const int64_t r0 = panel * v;
      const tiles::TransposedBTileSink sink{wk.b, out_steps, r0, wk.sel, in0,
                                            NamesAnInputTwice(wk.sel, nk)};
      if (n == 1) {
        Avx512Isa::DecodeN<D, 1>(w, Kc, r0, PanelRows(panel), g0, g1, wk.slot_kk,
                                 PanelPad(panel), sink);
      } else {
        Avx512Isa::DecodeN<D, 2>(w, Kc, r0, PanelRows(panel), g0, g1, wk.slot_kk,
                                 PanelPad(panel), sink);
      }
    }
    tiles::ConfigureTiles();
    for (int64_t t = 0; t < tokens; t += kAmxGatherTokens) {
      const int64_t live = Min(kAmxGatherTokens, tokens - t);
      const int64_t rows = RoundUp(live, tiles::kTileRows);
      tiles::PackA(dy + (t0 + t) * N, N, N, live, rows, wk.a);
      tiles::TileProduct(wk.a, rows / tiles::kTileRows, wk.b, in_tiles, out_steps, wk.c, cols,
                         /*accumulate=*/false);
      for (int64_t r = 0; r < live; ++r)
        Avx512Isa::FromF32Row<D>(wk.c + r * cols, dx + (t0 + t + r) * K + in0, inputs);
    }
    tiles::ReleaseTiles();
  }
};

inline bool SpmmTAmxAny(const VnmProblem& p, const Runtime& rt) {
  if (SpmmTAmx::Applies(p)) return Run<SpmmTAmx>(p, rt);
  return RunForDtype<Ops<Traits, Avx512Isa>::template SpmmTOp>(p, rt);
}

// dv = (x^T dy) at the kept entries, on the tiles (bf16). A task is (panel,
// range of groups), as in the FMA kernel (its entries are its own). The Gram
// block over all inputs of its groups, gram[input - in0][r] = sum_t x[t,
// input] dy[t, r0 + r], is one tile product (dense over the inputs, as in
// SpmmTAmx: the unselected ones of m > 4 are multiplied too), then each
// output samples its kept entries from it (the gather list maps each slot
// to its input's row). Both operands are packed once per chunk of tokens
// for every task: x's columns as A tiles (tokens are the reduction), dy's as
// VNNI B tiles of token pairs. Range starts are multiples of 16 inputs, so a
// task's A tiles are whole packed tiles.
struct SddmmAmx : Dims {
  using D = BF16;
  using S = D::Storage;
  static constexpr int64_t kPackTilesPerTask = 4;
  struct Worker {
    float* gram;  // [cols][vpad_max]
    int32_t* sel;
    int32_t* slot_kk;
    float* sampled;  // [vpad_max][task_groups * n]
  };
  struct PackXJob {
    const SddmmAmx* op;
    void Run(int64_t task, int) const { op->PackX(task); }
  };
  struct PackDyJob {
    const SddmmAmx* op;
    void Run(int64_t task, int) const { op->PackDy(task); }
  };

  const VnmProblem& p;
  const Runtime& rt;
  int64_t task_groups, group_tasks, cols, x_tiles, dy_tiles, chunk_tokens, chunks, steps;
  bool sums_in_f32;
  uint16_t* xa = nullptr;  // [x_tiles][steps][1 KB]
  uint16_t* dyb = nullptr;  // [dy_tiles][steps][1 KB]
  float* sums = nullptr;    // [N][Kc], over several chunks
  Worker* workers = nullptr;
  // Per batch and chunk.
  const uint8_t* indices = nullptr;
  const uint8_t* columns = nullptr;
  const S* x = nullptr;
  const S* dy = nullptr;
  S* dv = nullptr;
  int64_t t0 = 0, tokens = 0;

  SddmmAmx(const VnmProblem& prob, const Runtime& runtime) : Dims(prob), p(prob), rt(runtime) {
    // About 128 inputs per task, a multiple of 16.
    int64_t per16 = 16;
    for (int64_t g = 1; g <= 16; ++g) {
      if (g * m % 16 == 0) {
        per16 = g;
        break;
      }
    }
    task_groups = RoundUp(Max(1, 128 / m), per16);
    group_tasks = CeilDiv(G, task_groups);
    cols = RoundUp(task_groups * m, 32);
    x_tiles = CeilDiv(Max(K, 1), 16);
    dy_tiles = CeilDiv(Max(N, 1), 16);
    const int64_t words_per_token = (x_tiles + dy_tiles) * 16;
    chunk_tokens = Max(kAmxGatherTokens, kPackBytes / 2 / words_per_token / kAmxGatherTokens *
                                             kAmxGatherTokens);
    chunk_tokens = Min(chunk_tokens, RoundUp(Max(T, 1), kAmxGatherTokens));
    chunks = CeilDiv(T, chunk_tokens);
    steps = chunk_tokens / tiles::kStepWords;
    sums_in_f32 = chunks > 1;
  }

  static bool Applies(const VnmProblem& p) {
    return p.dtype == Dtype::kBF16 && p.tokens >= kAmxMinTokens;
  }

  void Layout(Carver& c) {
    xa = c.Take<uint16_t>(x_tiles * steps * tiles::kTileWords);
    dyb = c.Take<uint16_t>(dy_tiles * steps * tiles::kTileWords);
    if (sums_in_f32) sums = c.Take<float>(N * Kc);
    workers = c.Take<Worker>(rt.num_workers);
    for (int i = 0; i < rt.num_workers; ++i) {
      const Worker wk{c.Take<float>(cols * vpad_max), c.Take<int32_t>(task_groups * kSelected),
                      c.Take<int32_t>(task_groups * kSelected),
                      c.Take<float>(vpad_max * task_groups * n)};
      if (workers != nullptr) workers[i] = wk;
    }
  }

  bool Compute() {
    if (N == 0 || Kc == 0 || p.batch == 0) return true;
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
        RunParallel(rt, CeilDiv(x_tiles, kPackTilesPerTask), PackXJob{this});
        RunParallel(rt, CeilDiv(dy_tiles, kPackTilesPerTask), PackDyJob{this});
        RunParallel(rt, P * group_tasks, *this);
      }
    }
    return true;
  }

  void PackX(int64_t task) const {
    const int64_t j0 = task * kPackTilesPerTask, tiles_here = Min(kPackTilesPerTask, x_tiles - j0);
    tiles::PackColumnsAsA(x + t0 * K, K, K, j0 * 16, tiles_here, tokens, steps,
                          xa + j0 * steps * tiles::kTileWords);
  }

  void PackDy(int64_t task) const {
    const int64_t j0 = task * kPackTilesPerTask, tiles_here = Min(kPackTilesPerTask, dy_tiles - j0);
    tiles::PackColumnsAsB(dy + t0 * N + j0 * 16, N, N - j0 * 16, tiles_here, tokens, steps,
                          dyb + j0 * steps * tiles::kTileWords);
  }

  void Run(int64_t task, int worker) const {
    const Worker& wk = workers[worker];
    const int64_t panel = task / group_tasks;
    const int64_t g0 = task % group_tasks * task_groups, g1 = Min(G, g0 + task_groups);
    const int64_t r0 = panel * v, rows = PanelRows(panel), ld = PanelPad(panel);
    const int64_t in0 = g0 * m, inputs = Min(K, g1 * m) - in0;
    const int64_t nk = Select(columns + panel * G * kSelected, g0, g1, m, K, wk.sel, wk.slot_kk);
    // Each slot's row of the Gram block: its input's.
    for (int64_t i = 0; i < (g1 - g0) * kSelected; ++i)
      if (wk.slot_kk[i] >= 0) wk.slot_kk[i] = wk.sel[wk.slot_kk[i]] - static_cast<int32_t>(in0);
    if (nk > 0) {
      tiles::ConfigureTiles();
      tiles::TileProduct(xa + in0 / 16 * steps * tiles::kTileWords, CeilDiv(inputs, 16),
                         dyb + r0 / 16 * steps * tiles::kTileWords, ld / 16, steps, wk.gram, ld,
                         /*accumulate=*/false);
      tiles::ReleaseTiles();
    }
    const int64_t count = (g1 - g0) * n;
    Avx512Isa::Sample(wk.gram, ld, wk.slot_kk, indices + r0 * Kc, Kc, n, g0, g1, rows,
                      wk.sampled, count);
    const bool first = t0 == 0, last = t0 + tokens == T;
    for (int64_t r = 0; r < rows; ++r)
      StoreSampledRow<D, Avx512Isa>(wk.sampled + r * count, count, dv + (r0 + r) * Kc + g0 * n,
                                    sums_in_f32 ? sums + (r0 + r) * Kc + g0 * n : nullptr,
                                    first, last);
  }
};

inline bool SddmmAmxAny(const VnmProblem& p, const Runtime& rt) {
  if (SddmmAmx::Applies(p)) return Run<SddmmAmx>(p, rt);
  return RunForDtype<Ops<Traits, Avx512Isa>::template SddmmOp>(p, rt);
}

// The forward on an AMX machine: the tiles for bf16 from kAmxMinTokens on,
// else the AVX-512 kernels.
inline bool SpmmAmxAny(const VnmProblem& p, const Runtime& rt) {
  if (SpmmAmx::Applies(p)) return Run<SpmmAmx>(p, rt);
  return SpmmAvx512Any(p, rt);
}

}  // namespace JAXSPARSE_VNM_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_VNM_VNM_AMX_H_
