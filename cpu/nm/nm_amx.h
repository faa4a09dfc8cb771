// The few-token N:M forward on AMX: bf16 2:4 and 1:4 weights whose positions
// are also held at 2 bits (NmProblem::indices_2bit), kNmAmxMinTokens to
// kNmAmxMaxTokens tokens. Included by nm_kernels_amx.cc after nm_kernels.h and
// nm_rowdot_avx512.h, inside the amx namespace they open (and, without AMX,
// by nm_kernels_avx512bf16.cc: the tiles then multiply on vdpbf16ps).
//
// At these token counts the row-vectorised kernel (nm_rowdot_avx512.h) is
// bound by its permutes (one per 16 multiply-adds, all on one port), and the
// V:N:M engine route by its per-panel decode into VNNI B tiles. Here the
// product runs the other way round, y^T = W^T . x^T, so that the weight needs
// no transpose:
//   - A = the weight's own rows (outputs x inputs, k contiguous, as A tiles
//     want), decoded to dense bf16: per row and k step (32 inputs) one masked
//     expanding load (vpexpandw) puts the step's 16 (2:4) or 8 (1:4) kept
//     values at their positions. The masks come from the 2-bit positions by
//     a 16-entry nibble lookup (vpshufb), 16 steps of a row at a time.
//   - B = x^T as VNNI pairs, packed once per call (T x K words, small).
//   - C = 16 outputs x 16 tokens f32 tiles, transposed into y at the end.
// The tiles multiply the pattern's zeros too (2x the useful work), which at
// 16 tokens is a small part of the time: the decode and the weight stream
// (2.25 bytes per kept bf16 value) are the rest.
#ifndef JAXSPARSE_CPU_NM_NM_AMX_H_
#define JAXSPARSE_CPU_NM_NM_AMX_H_

#include "cpu/engine/bf16_tiles.h"

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_NM_ISA {

namespace tiles = bf16_tiles;

// The token counts it takes. Measured on a 2-core Xeon with AMX (bf16 2:4,
// weights streamed from memory at <= 16 tokens; jax 0.12): below 12 tokens
// the row-vectorised kernel streams as fast or faster (4096x4096: 0.71
// against 1.10 ms at 1 token; at 8 tokens 1.26 against 1.12, but at
// 11008x4096 3.39x against 2.74x of XLA's dot); up to 256 tokens this beats
// the V:N:M engine route (4096x4096 at 128 tokens 2.2 against 3.9 ms; at 512
// it lost, 11.9 against 10.4: x^T no longer fits L2 beside the A tiles).
constexpr int64_t kNmAmxMinTokens = 12;
constexpr int64_t kNmAmxMaxTokens = 256;
// Without AMX the same tiles run on vdpbf16ps, and the outputs-in-lanes
// kernel (nm_outlanes_avx512.h) leads below these counts. Measured on a
// 2-core Zen 5 (jax 0.12.1, weights hot, against XLA's bf16 dot): 1:4 at 12,
// 17, 32 and 48 tokens 1.04-2.73x against the tiles' 0.67-1.44x (384 x 1536,
// 4096 x 4096); 2:4 at 12 and 17 tokens 0.80-1.29x against 0.64-0.95x, at 20
// 0.64-0.97x against 0.57-0.94x, at 24 the tiles ahead (0.82-0.93x against
// 0.65-0.84x).
constexpr int64_t kNmDpMinTokens1of4 = OutLanes<BF16<Traits>>::kMaxTokens1of4 + 1;  // 49
constexpr int64_t kNmDpMinTokens2of4 = 21;
// Outputs per task: two A tiles.
constexpr int64_t kNmAmxRows = 2 * tiles::kTileRows;
// k steps (32 inputs) decoded at a time: 2 A tiles x 64 KB stay in L2 next
// to the B tiles of the same steps (16 to 512 steps measured alike).
constexpr int64_t kNmAmxBlockSteps = 128;
// Steps of x^T packed per task of the packing job.
constexpr int64_t kNmAmxPackSteps = 16;

struct SpmmPackedAmx : Dims {
  struct Worker {
    uint16_t* a;      // [2 tiles][block steps][16][32]
    float* c;         // [32 outputs][token tiles x 16]
    uint32_t* masks;  // [32 outputs][block steps, rounded up to 16]
  };

  const NmProblem& p;
  const Runtime& rt;
  int64_t steps, token_tiles, row_tasks, block_steps, mask_ld, c_ld, kc2;
  uint16_t* xb = nullptr;  // x^T: [token tile][step][16 pair rows][16 tokens x 2]
  Worker* workers = nullptr;
  // Per batch.
  const uint16_t* x = nullptr;
  const uint16_t* values = nullptr;
  const uint8_t* pos = nullptr;
  uint16_t* y = nullptr;

  static bool Applies(const NmProblem& p) {
#ifdef JAXSPARSE_TILES_ON_AMX
    const int64_t min_tokens = kNmAmxMinTokens;
#else
    const int64_t min_tokens = p.n == 1 ? kNmDpMinTokens1of4 : kNmDpMinTokens2of4;
#endif
    return p.dtype == Dtype::kBF16 && p.indices_2bit != nullptr && p.m == 4 &&
           (p.n == 1 || p.n == 2) && p.tokens >= min_tokens && p.tokens <= kNmAmxMaxTokens;
  }

  SpmmPackedAmx(const NmProblem& prob, const Runtime& runtime) : Dims(prob), p(prob), rt(runtime) {
    steps = CeilDiv(G * 4, tiles::kStepWords);
    token_tiles = CeilDiv(T, tiles::kTileRows);
    row_tasks = CeilDiv(N, kNmAmxRows);
    block_steps = Min(steps, kNmAmxBlockSteps);
    mask_ld = RoundUp(block_steps, 16);
    c_ld = token_tiles * tiles::kTileRows;
    kc2 = CeilDiv(Kc, 4);
  }

  void Layout(Carver& c) {
    xb = c.Take<uint16_t>(token_tiles * steps * tiles::kTileWords);
    workers = c.Take<Worker>(rt.num_workers);
    for (int i = 0; i < rt.num_workers; ++i) {
      const Worker wk{c.Take<uint16_t>(2 * block_steps * tiles::kTileWords),
                      c.Take<float>(kNmAmxRows * c_ld), c.Take<uint32_t>(kNmAmxRows * mask_ld)};
      if (workers != nullptr) workers[i] = wk;
    }
  }

  bool Compute() {
    if (T == 0 || N == 0 || p.batch == 0) return true;
    if (K == 0) {
      std::memset(p.out, 0, p.batch * T * N * sizeof(uint16_t));
      return true;
    }
    if (!TakeScratch(rt, *this)) return false;
    const PackJob pack{this};
    for (int64_t b = 0; b < p.batch; ++b) {
      x = static_cast<const uint16_t*>(p.x) + b * p.x_stride;
      values = static_cast<const uint16_t*>(p.values) + b * p.values_stride;
      pos = p.indices_2bit + b * p.indices_2bit_stride;
      y = static_cast<uint16_t*>(p.out) + b * T * N;
      if (b == 0 || p.x_stride != 0) {
        RunParallel(rt, token_tiles * CeilDiv(steps, kNmAmxPackSteps), pack);
      }
      RunParallel(rt, row_tasks, *this);
    }
    return true;
  }

  // ---------------------------------------------------------------- B = x^T
  struct PackJob {
    const SpmmPackedAmx* op;
    void Run(int64_t task, int /*worker*/) const { op->PackX(task); }
  };

  // One token tile's x^T over kNmAmxPackSteps steps: token t's 32 inputs of
  // step s are 16 dwords (input pairs), which go down column t of the
  // step's 16 pair rows. Tokens past T and inputs past K are zero.
  void PackX(int64_t task) const {
    const int64_t chunks = CeilDiv(steps, kNmAmxPackSteps);
    const int64_t jt = task / chunks, s0 = task % chunks * kNmAmxPackSteps;
    const int64_t s1 = Min(steps, s0 + kNmAmxPackSteps);
    const __m512i rows = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176,
                                           192, 208, 224, 240);
    for (int64_t tt = 0; tt < tiles::kTileRows; ++tt) {
      const int64_t t = jt * tiles::kTileRows + tt;
      const __m512i column = _mm512_add_epi32(rows, _mm512_set1_epi32(static_cast<int>(tt)));
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t k0 = s * tiles::kStepWords, left = K - k0;
        const __mmask32 keep =
            t >= T ? 0 : left >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << left) - 1);
        const __m512i pairs = _mm512_maskz_loadu_epi16(keep, x + t * K + k0);
        uint16_t* tile = xb + (jt * steps + s) * tiles::kTileWords;
        _mm512_i32scatter_epi32(tile, column, pairs, 4);
      }
    }
  }

  // ---------------------------------------------------------------- masks
  // The expand masks of steps s0 .. s0 + ns of one row: bit 4 g + p of step
  // s is set when the row keeps position p of the step's group g. Nibble
  // lookups, 16 steps per vector:
  //   n = 2: a step is one dword of positions, one group per nibble
  //          (p0 | p1 << 2) -> mask nibble (1 << p0) | (1 << p1);
  //   n = 1: a step is one word, two groups per nibble (pa | pb << 2) ->
  //          mask byte (1 << pa) | (1 << pb) << 4.
  // Groups past the row's last (the last step's tail) get no bits, so the
  // expanding loads never read past a row's kept values.
  void Masks(const uint8_t* row_pos, int64_t s0, int64_t ns, uint32_t* out) const {
    const int64_t bytes_per_step = 2 * n;
    const int64_t first = s0 * bytes_per_step;
    const __m512i low = _mm512_set1_epi8(0x0f);
    for (int64_t s = 0; s < ns; s += 16) {
      const int64_t at = first + s * bytes_per_step;
      const int64_t left = Min(16 * bytes_per_step, kc2 - at);
      __m512i m;
      if (n == 2) {
        const __mmask64 keep = left >= 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
        const __m512i v = _mm512_maskz_loadu_epi8(keep, row_pos + at);
        const __m512i lut = _mm512_broadcast_i32x4(
            _mm_setr_epi8(0x1, 0x3, 0x5, 0x9, 0x3, 0x2, 0x6, 0xa, 0x5, 0x6, 0x4, 0xc, 0x9, 0xa,
                          0xc, 0x8));
        const __m512i lo = _mm512_shuffle_epi8(lut, _mm512_and_si512(v, low));
        const __m512i hi =
            _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
        m = _mm512_or_si512(lo, _mm512_slli_epi16(hi, 4));
      } else {
        const __mmask32 keep = left >= 32 ? ~__mmask32{0} : (__mmask32{1} << left) - 1;
        const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi8(keep, row_pos + at));
        // Nibble i of the word into byte i.
        const __m512i spread = _mm512_or_si512(
            _mm512_or_si512(_mm512_and_si512(w, _mm512_set1_epi32(0x000f)),
                            _mm512_slli_epi32(_mm512_and_si512(w, _mm512_set1_epi32(0x00f0)), 4)),
            _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(w, _mm512_set1_epi32(0x0f00)), 8),
                            _mm512_slli_epi32(_mm512_and_si512(w, _mm512_set1_epi32(0xf000)), 12)));
        alignas(16) uint8_t table[16];
        for (int v = 0; v < 16; ++v) table[v] = static_cast<uint8_t>((1 << (v & 3)) | (16 << (v >> 2)));
        const __m512i lut =
            _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(table)));
        m = _mm512_shuffle_epi8(lut, spread);
      }
      _mm512_storeu_si512(out + s, m);
    }
    // The last step's groups past G.
    const int64_t last = steps - 1;
    if (s0 <= last && last < s0 + ns) {
      const int64_t groups = G - last * 8;  // 1..8
      if (groups < 8) out[last - s0] &= (1u << (4 * groups)) - 1;
    }
  }

  // ---------------------------------------------------------------- products
  void Run(int64_t task, int worker) const {
    const Worker& wk = workers[worker];
    const int64_t j0 = task * kNmAmxRows, rows = Min(kNmAmxRows, N - j0);
    const int a_tiles = rows > tiles::kTileRows ? 2 : 1;
    tiles::ConfigureTiles();
    for (int64_t s0 = 0; s0 < steps; s0 += block_steps) {
      const int64_t ns = Min(block_steps, steps - s0);
      DecodeA(wk, j0, rows, a_tiles, s0, ns);
      if (s0 == 0) {
        Multiply<false>(wk, a_tiles, s0, ns);
      } else {
        Multiply<true>(wk, a_tiles, s0, ns);
      }
    }
    tiles::ReleaseTiles();
    StoreY(wk, j0, rows);
  }

  // Rows j0 .. j0 + rows - 1, steps s0 .. s0 + ns - 1, dense bf16 into A
  // (rows past `rows` of the last tile are zero).
  void DecodeA(const Worker& wk, int64_t j0, int64_t rows, int a_tiles, int64_t s0,
               int64_t ns) const {
    const int64_t kept_per_step = 8 * n;
    for (int64_t r = 0; r < rows; ++r) {
      Masks(pos + (j0 + r) * kc2, s0, ns, wk.masks + r * mask_ld);
    }
    for (int i = 0; i < a_tiles; ++i) {
      for (int64_t rr = 0; rr < tiles::kTileRows; ++rr) {
        const int64_t r = i * tiles::kTileRows + rr;
        uint16_t* dst = wk.a + i * ns * tiles::kTileWords + rr * tiles::kStepWords;
        if (r >= rows) {
          for (int64_t s = 0; s < ns; ++s) {
            _mm512_store_si512(dst + s * tiles::kTileWords, _mm512_setzero_si512());
          }
          continue;
        }
        const uint16_t* src = values + (j0 + r) * Kc + s0 * kept_per_step;
        const uint32_t* mask = wk.masks + r * mask_ld;
        for (int64_t s = 0; s < ns; ++s) {
          _mm512_store_si512(dst + s * tiles::kTileWords,
                             _mm512_maskz_expandloadu_epi16(mask[s], src + s * kept_per_step));
        }
      }
    }
  }

  // C (+)= A . B over the block's steps, for every token tile pair.
  template <bool kLoad>
  void Multiply(const Worker& wk, int a_tiles, int64_t s0, int64_t ns) const {
    const int64_t a_next = ns * tiles::kTileWords, b_next = steps * tiles::kTileWords;
    for (int64_t jt = 0; jt < token_tiles; jt += 2) {
      const uint16_t* b = xb + (jt * steps + s0) * tiles::kTileWords;
      float* c = wk.c + jt * tiles::kTileRows;
      const bool two_b = jt + 1 < token_tiles;
      if (a_tiles == 2 && two_b) {
        tiles::TileBlock<2, 2, kLoad>(wk.a, a_next, b, b_next, ns, c, c_ld);
      } else if (a_tiles == 2) {
        tiles::TileBlock<2, 1, kLoad>(wk.a, a_next, b, b_next, ns, c, c_ld);
      } else if (two_b) {
        tiles::TileBlock<1, 2, kLoad>(wk.a, a_next, b, b_next, ns, c, c_ld);
      } else {
        tiles::TileBlock<1, 1, kLoad>(wk.a, a_next, b, b_next, ns, c, c_ld);
      }
    }
  }

  // y[t, j0 + r] = bf16(C[r][t]) (round to nearest even), 16 outputs per
  // gather.
  void StoreY(const Worker& wk, int64_t j0, int64_t rows) const {
    const __m512i down = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                                              11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(c_ld)));
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
      const int64_t left = rows - r0;
      const __mmask16 keep = LaneMask(left);
      for (int64_t t = 0; t < T; ++t) {
        const __m512 sums = _mm512_i32gather_ps(down, wk.c + r0 * c_ld + t, 4);
        const __m256i words = (__m256i)_mm512_cvtneps_pbh(sums);
        _mm256_mask_storeu_epi16(y + t * N + j0 + r0, keep, words);
      }
    }
  }
};

// The forward on AMX machines: the tiles for bf16 n:4 at few tokens when the
// 2-bit positions came along, else the AVX-512 kernels.
inline bool SpmmAmxAny(const NmProblem& p, const Runtime& rt) {
  if (SpmmPackedAmx::Applies(p)) {
    SpmmPackedAmx op(p, rt);
    return op.Compute();
  }
  return SpmmAvx512Any(p, rt);
}

}  // namespace JAXSPARSE_NM_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_NM_NM_AMX_H_
