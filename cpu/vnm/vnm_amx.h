// The V:N:M forward on AMX (bf16): the engine of vnm_kernels.h with the
// tile unit as its micro-kernel (cpu/engine/amx_bf16.h). Included by
// vnm_kernels_amx.cc after vnm_kernels.h and vnm_avx512.h, inside the amx
// namespace they open.
//
// Per task (panel, token block) and block of groups:
//   - Select: the panel's selected inputs (the gather list), as elsewhere;
//   - Decode (AVX-512) straight into the bf16 B tiles (BTileSink): the
//     values are bf16, so their way through f32 is exact;
//   - per 32 tokens: gather their selected inputs into two A tiles, then the
//     2 x 2 tile product over every output tile of the panel, into the
//     task's f32 sums (C), which stay in L2 across blocks of groups.
// x is read in place (bf16); the sums are rounded to bf16 once, at the end.
#ifndef JAXSPARSE_CPU_VNM_VNM_AMX_H_
#define JAXSPARSE_CPU_VNM_VNM_AMX_H_

#include "cpu/engine/amx_bf16.h"

namespace jaxsparse {
namespace cpu {
namespace amx {

namespace tiles = ::jaxsparse::cpu::amx_bf16;

// From this many tokens the forward runs on the tiles; below, the AVX-512
// kernels (streaming, or f32 FMAs), which need no packing of A and B.
constexpr int64_t kAmxMinTokens = 32;
// Tokens per task: each decodes and packs its panel's B tiles once per block
// of groups for all of them.
constexpr int64_t kAmxTaskTokens = 256;
// Tokens gathered at a time: two A tiles.
constexpr int64_t kAmxGatherTokens = 2 * tiles::kTileRows;

struct SpmmAmx : Dims {
  using D = BF16;
  using S = D::Storage;
  struct Worker {
    uint16_t* b;
    uint16_t* a;
    float* acc;
    int32_t* sel;
    int32_t* slot_kk;
    tiles::GatherWindow* windows;
    int32_t* first;
  };

  const VnmProblem& p;
  const Runtime& rt;
  int64_t block_groups, task_tokens;
  Worker* workers = nullptr;
  Weight<D> w{};
  const S* x = nullptr;
  S* y = nullptr;

  SpmmAmx(const VnmProblem& prob, const Runtime& runtime) : Dims(prob), p(prob), rt(runtime) {
    // A quarter of L2 for the B tiles: with A (32 tokens' gathered inputs, as
    // large again at most), the task's sums and its rows of x, they stay in
    // L2. On 4096 inputs that is the whole panel of 64:2:8 (256 KB).
    const int64_t b_words = rt.l2_bytes / 4 / int64_t{sizeof(uint16_t)};
    block_groups = RoundUp(Max(1, b_words / (kSelected * vpad_max)), 8);
    task_tokens = Min(kAmxTaskTokens, RoundUp(Max(T, 1), tiles::kTileRows));
  }

  static bool Applies(const VnmProblem& p) {
    return p.dtype == Dtype::kBF16 && p.tokens >= kAmxMinTokens;
  }

  void Layout(Carver& c) {
    workers = c.Take<Worker>(rt.num_workers);
    const int64_t nk_max = block_groups * kSelected;
    const int64_t steps_max = CeilDiv(nk_max, tiles::kStepWords);
    const int64_t tokens_pad = RoundUp(task_tokens, kAmxGatherTokens);
    for (int i = 0; i < rt.num_workers; ++i) {
      const Worker wk{c.Take<uint16_t>(steps_max * tiles::kTileWords * (vpad_max / 16)),
                      c.Take<uint16_t>(steps_max * tiles::kTileWords * 2),
                      c.Take<float>(tokens_pad * vpad_max),
                      c.Take<int32_t>(nk_max),
                      c.Take<int32_t>(nk_max),
                      c.Take<tiles::GatherWindow>(steps_max * tiles::MaxWindowsPerStep(m)),
                      c.Take<int32_t>(steps_max + 1)};
      if (workers != nullptr) workers[i] = wk;
    }
  }

  bool Compute() {
    if (T == 0 || N == 0 || p.batch == 0) return true;
    if (!TakeScratch(rt, *this)) return false;
    for (int64_t b = 0; b < p.batch; ++b) {
      w = Weight<D>::At(p, b);
      x = static_cast<const S*>(p.x) + b * p.x_stride;
      y = static_cast<S*>(p.out) + b * T * N;
      RunParallel(rt, CeilDiv(T, task_tokens) * P, *this);
    }
    return true;
  }

  void Run(int64_t task, int worker) const {
    const Worker& wk = workers[worker];
    const int64_t panel = task % P, t0 = task / P * task_tokens;
    const int64_t tokens = Min(task_tokens, T - t0);
    const int64_t r0 = panel * v, rows = PanelRows(panel), ld = PanelPad(panel);
    const int64_t tokens_pad = RoundUp(tokens, tiles::kTileRows);
    std::memset(wk.acc, 0, tokens_pad * ld * sizeof(float));
    tiles::ConfigureTiles();
    const uint8_t* cols = w.columns + panel * G * kSelected;
    for (int64_t g0 = 0; g0 < G; g0 += block_groups) {
      const int64_t g1 = Min(G, g0 + block_groups);
      const int64_t nk = Select(cols, g0, g1, m, K, wk.sel, wk.slot_kk);
      if (nk == 0) continue;
      const int64_t steps = tiles::PlanGather(wk.sel, nk, K, wk.windows, wk.first);
      tiles::ZeroBTail(wk.b, nk, ld / 16);
      const tiles::BTileSink sink{wk.b, steps};
      if (n == 1) {
        Avx512Isa::DecodeN<D, 1>(w, Kc, r0, rows, g0, g1, wk.slot_kk, ld, sink);
      } else {
        Avx512Isa::DecodeN<D, 2>(w, Kc, r0, rows, g0, g1, wk.slot_kk, ld, sink);
      }
      for (int64_t t = 0; t < tokens_pad; t += kAmxGatherTokens) {
        const int64_t tile_tokens = Min(kAmxGatherTokens, tokens_pad - t);
        for (int64_t r = 0; r < tile_tokens; ++r) {
          uint16_t* a_tile = wk.a + r / tiles::kTileRows * steps * tiles::kTileWords;
          const int64_t row = r % tiles::kTileRows;
          if (t + r < tokens) {
            tiles::GatherRow(x + (t0 + t + r) * K, wk.windows, wk.first, steps, a_tile, row);
          } else {
            tiles::ZeroRow(steps, a_tile, row);
          }
        }
        tiles::TileProduct(wk.a, tile_tokens / tiles::kTileRows, wk.b, ld / 16, steps,
                           wk.acc + t * ld, ld);
      }
    }
    tiles::ReleaseTiles();
    for (int64_t t = 0; t < tokens; ++t)
      Avx512Isa::FromF32Row<D>(wk.acc + t * ld, y + (t0 + t) * N + r0, rows);
  }
};

// The forward on an AMX machine: the tiles for bf16 from kAmxMinTokens on,
// else the AVX-512 kernels.
inline bool SpmmAmxAny(const VnmProblem& p, const Runtime& rt) {
  if (SpmmAmx::Applies(p)) return Run<SpmmAmx>(p, rt);
  return SpmmAvx512Any(p, rt);
}

}  // namespace amx
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_VNM_VNM_AMX_H_
