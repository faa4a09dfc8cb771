// Sparse-MARLIN's scheme (IST-DASLab/Sparse-Marlin, KERNELS.md 3.5) for the
// int4 + 2:4 form: y = x @ W as Y^T = W^T X^T with the int4 weights as the
// sparse A operand of mma.sp::ordered_metadata.m16n8k32 (only A may be
// sparse), the activations as B, f32 accumulation. Written against
// cuda/simt.cuh only; the dequantisation is int4_marlin.cuh's.
//
// Operands (target jaxsparse_int4_nm_marlin_matmul, marlin_nm_pack's layout,
// jaxsparse/ops/int4_marlin.py):
//   x        [T, K]       bf16/f16; K % 128 == 0
//   qweight  [K/32, 2N]   int32: per k32 step and 64 outputs, 128 words; word
//                         j of lane 4g + t is tile j's (outputs 16j..16j+15)
//                         four A registers: nibbles 0/4, 1/5, 2/6, 3/7 =
//                         packed columns (2t, 2t+1) of rows g, g + 8, then
//                         packed columns (8+2t, 9+2t) of rows g, g + 8
//   meta     [K/32, N]    int32: per k32 step and 64 outputs, 64 words; word
//                         r of lane 4g + 2jl + h is the metadata register of
//                         tile 2r + jl (selector jl), inputs 16h..16h+15
//   scales   [K/g, N] or [1, N]: per 64 outputs position 8i + j holds output
//                         i + 8j (both kinds: lane 4g + t's 16-byte load at
//                         8g holds its 8 rows' scales, row g + 8s of tile j
//                         at element 2j + s)
//   y        [T, N]
//
// Block tile: 64 outputs x 16 or 32 tokens, 4 warps, 128 inputs per stage.
// Why these sizes:
// - 64 outputs are four m16 tiles: one 16-byte load per lane per k32 step is
//   the four tiles' A fragments (32 weights), one 8-byte load their metadata
//   (two registers, selectors 0 and 1), so every B fragment (one
//   ldmatrix.x4 of 8 tokens x 32 inputs) feeds 4 mma.sp.
// - The 4 warps split the stage's 128 inputs (one k32 step each) and reduce
//   at the end through shared memory, as in int4_marlin.cuh.
// - 4 stages of cp.async: x (32 tokens x 128 inputs: 8 KB) + words (2 KB) +
//   metadata (1 KB) + scales (512 B) = 11.5 KB per stage, 46 KB in all,
//   under the 48 KB a block gets without opting in; 64 tokens would not fit
//   4 stages, hence 16- and 32-token tiles (64 accumulators per thread).
#ifndef JAXSPARSE_CUDA_INT4_INT4_MARLIN_NM_CUH_
#define JAXSPARSE_CUDA_INT4_INT4_MARLIN_NM_CUH_

#include <cstdint>

#include "cuda/int4/int4_marlin.cuh"
#include "cuda/simt.cuh"

namespace jaxsparse::marlin_nm {

using marlin::Args;
using marlin::kPerColumn;
using marlin::Words4;
using simt::MmaType;
using simt::Smem;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTileN = 64;                // Outputs per block: 4 m16 tiles.
constexpr int kMTiles = kTileN / 16;
constexpr int kTileK = 32 * kWarps;       // Inputs per stage: one k32 step per warp.
constexpr int kStages = 4;
constexpr int kWordsPerStep = 2 * kTileN;  // Value words of one k32 step x 64 outputs.
constexpr int kMetaPerStep = kTileN;       // Metadata words of one k32 step x 64 outputs.

// Two metadata registers: one 8-byte load per lane.
struct alignas(8) Words2 {
  uint32_t w[2];
};

// Shared memory of one stage in bytes: per warp, its k32 slice of x (tokens
// rows of 64 bytes, 4 pieces), then the words, metadata and scales of 4 steps.
template <int kTokenTiles>
struct Tile {
  static constexpr int kTokens = 8 * kTokenTiles;
  static constexpr int kXSliceBytes = kTokens * 64;
  static constexpr int kXBytes = kWarps * kXSliceBytes;
  static constexpr int kWBytes = kWarps * kWordsPerStep * 4;
  static constexpr int kMBytes = kWarps * kMetaPerStep * 4;
  static constexpr int kSBytes = kWarps * kTileN * 2;
  static constexpr int kStageBytes = kXBytes + kWBytes + kMBytes + kSBytes;
  static constexpr int kReduceBytes = kWarps / 2 * kMTiles * kTokenTiles * 4 * 32 * 4;
  static constexpr int kSmemBytes =
      kStages * kStageBytes > kReduceBytes ? kStages * kStageBytes : kReduceBytes;
};

struct Stage {
  Smem<uint16_t> x;
  Smem<uint32_t> words, meta;
  Smem<uint16_t> scales;
};

template <int kTokenTiles>
JAXSPARSE_DEV Stage StageAt(int s) {
  using Shape = Tile<kTokenTiles>;
  const size_t base = static_cast<size_t>(s) * Shape::kStageBytes;
  const size_t words = base + Shape::kXBytes, meta = words + Shape::kWBytes;
  return Stage{simt::DynamicSmem<uint16_t>(base), simt::DynamicSmem<uint32_t>(words),
               simt::DynamicSmem<uint32_t>(meta),
               simt::DynamicSmem<uint16_t>(meta + Shape::kMBytes)};
}

// x rows of a warp's slice are 64 bytes: swizzled for ldmatrix.
JAXSPARSE_DEV int XPiece(int row, int piece) { return simt::SwizzledPiece<4>(row, piece); }

// The cp.async copies of k-tile kt into stage st: x (tokens past T
// zero-filled, never read), the words (thread tid copies what lane tid % 32
// of warp tid / 32 reads back), the metadata (16 threads per step) and the
// group scales of each step.
template <int kTokenTiles, bool kGrouped, class T>
JAXSPARSE_DEV void LoadTile(const Args<T>& p, const uint32_t* meta, const Stage& st,
                            int64_t token0, int64_t col0, int64_t kt, int tid) {
  constexpr int kTokens = Tile<kTokenTiles>::kTokens;
  for (int piece = tid; piece < kWarps * kTokens * 4; piece += kThreads) {
    const int step = piece / (kTokens * 4), r = piece / 4 % kTokens, j = piece % 4;
    const int64_t token = token0 + r;
    const bool live = token < p.tokens;
    simt::CpAsync<16>(st.x + step * kTokens * 32 + (r * 4 + XPiece(r, j)) * 8,
                      live ? p.x + token * p.in + kt * kTileK + 32 * step + 8 * j : p.x,
                      live ? 16 : 0);
  }
  const int step = tid / 32, lane = tid % 32;
  const int64_t kb = kt * kWarps + step;  // Row of the packed arrays.
  simt::CpAsync<16>(st.words + step * kWordsPerStep + 4 * lane,
                    p.qweight + kb * 2 * p.out + col0 * 2 + 4 * lane);
  if (tid < kWarps * 16) {
    const int s = tid / 16, j = tid % 16;
    simt::CpAsync<16>(st.meta + s * kMetaPerStep + 4 * j,
                      meta + (kt * kWarps + s) * p.out + col0 + 4 * j);
  }
  if constexpr (kGrouped) {
    if (tid < kWarps * 8) {
      const int s = tid / 8, j = tid % 8;
      const int64_t group = (kt * kTileK + 32 * s) / p.group_size;
      simt::CpAsync<16>(st.scales + s * kTileN + 8 * j, p.scales + group * p.out + col0 + 8 * j);
    }
  }
}

// One warp's k32 step: the four tiles' A fragments dequantised (group scales
// multiplied in per row: registers 0, 2 are row g, 1, 3 row g + 8), then per
// 8 tokens one ldmatrix.x4 of B (four 8-input slices of the same 8 tokens:
// the four B registers) and one mma.sp per tile, with metadata register
// tile / 2 and selector tile % 2.
template <MmaType kType, int kTokenTiles, bool kGrouped>
JAXSPARSE_DEV void ComputeStep(const Stage& st, int warp, int lane,
                               float (&acc)[kMTiles][kTokenTiles][4]) {
  constexpr int kTokens = Tile<kTokenTiles>::kTokens;
  const Words4 q = st.words.As<Words4>()[static_cast<size_t>(warp * 32 + lane)];
  const marlin_nm::Words2 meta =
      (st.meta + warp * kMetaPerStep).As<Words2>()[static_cast<size_t>(lane)];
  uint32_t a[kMTiles][4];
  JAXSPARSE_UNROLL
  for (int j = 0; j < kMTiles; ++j) {
    uint32_t lo[2], hi[2];
    marlin::Dequantize<kType>(q.w[j], lo, hi);
    a[j][0] = lo[0];
    a[j][1] = lo[1];
    a[j][2] = hi[0];
    a[j][3] = hi[1];
  }
  if constexpr (kGrouped) {
    const Words4 s = (st.scales + warp * kTileN).As<Words4>()[static_cast<size_t>(lane >> 2)];
    JAXSPARSE_UNROLL
    for (int j = 0; j < kMTiles; ++j) {
      JAXSPARSE_UNROLL
      for (int i = 0; i < 4; ++i) {
        a[j][i] = simt::Mul16x2<kType>(a[j][i], marlin::Broadcast16(s.w[j], i & 1));
      }
    }
  }
  Smem<uint16_t> x = st.x + warp * kTokens * 32;
  const int quad = lane / 8;
  JAXSPARSE_UNROLL
  for (int nt = 0; nt < kTokenTiles; ++nt) {
    const int row = 8 * nt + lane % 8;
    uint32_t b[4];
    simt::Ldmatrix<4>(b, x + (row * 4 + XPiece(row, quad)) * 8);
    JAXSPARSE_UNROLL
    for (int j = 0; j < kMTiles; ++j) {
      if (j % 2 == 0) {
        simt::MmaSpM16n8k32<kType, 0>(acc[j][nt], a[j], b, acc[j][nt], meta.w[j / 2]);
      } else {
        simt::MmaSpM16n8k32<kType, 1>(acc[j][nt], a[j], b, acc[j][nt], meta.w[j / 2]);
      }
    }
  }
}

// Warp 0 writes y: accumulator (j, nt, i) of lane 4g + t is output
// 16j + g + 8 (i >> 1), token 8 nt + 2t + (i & 1); per-column scales (the
// same permuted row: element 2j + (i >> 1) of the 8 at 8g) applied in f32.
template <class T, int kTokenTiles, bool kGrouped>
JAXSPARSE_DEV void Store(const Args<T>& p, int lane, int64_t token0, int64_t col0,
                         const float (&acc)[kMTiles][kTokenTiles][4]) {
  const int g = lane >> 2, t = lane & 3;
  const T* scales = reinterpret_cast<const T*>(p.scales);
  JAXSPARSE_UNROLL
  for (int j = 0; j < kMTiles; ++j) {
    JAXSPARSE_UNROLL
    for (int s = 0; s < 2; ++s) {
      const int64_t out = col0 + 16 * j + g + 8 * s;
      float scale = 1.0f;
      if constexpr (!kGrouped) scale = static_cast<float>(scales[col0 + 8 * g + 2 * j + s]);
      JAXSPARSE_UNROLL
      for (int nt = 0; nt < kTokenTiles; ++nt) {
        JAXSPARSE_UNROLL
        for (int h = 0; h < 2; ++h) {
          const int64_t token = token0 + 8 * nt + 2 * t + h;
          if (token < p.tokens) {
            p.y[token * p.out + out] = static_cast<T>(acc[j][nt][2 * s + h] * scale);
          }
        }
      }
    }
  }
}

// The kernel body. Grid: x = N / 64 output blocks, y strides over the token
// blocks.
template <class T, MmaType kType, int kTokenTiles, bool kGrouped>
JAXSPARSE_DEV void Run(const Args<T>& p, const uint32_t* meta) {
  constexpr int kTokens = Tile<kTokenTiles>::kTokens;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int64_t k_tiles = p.in / kTileK;
  const int64_t token_blocks = (p.tokens + kTokens - 1) / kTokens;
  for (int64_t tb = blockIdx.y; tb < token_blocks; tb += gridDim.y) {
    const int64_t token0 = tb * kTokens;
    float acc[kMTiles][kTokenTiles][4] = {};
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_tiles) {
        LoadTile<kTokenTiles, kGrouped>(p, meta, StageAt<kTokenTiles>(s), token0, col0, s, tid);
      }
      simt::CpAsyncCommit();
    }
    for (int64_t kt = 0; kt < k_tiles; ++kt) {
      // Tile kt has landed once at most kStages - 2 newer groups are pending;
      // the barrier publishes every thread's copies and frees the stage
      // computed on last iteration.
      simt::CpAsyncWait<kStages - 2>();
      simt::SyncThreads();
      const int64_t next = kt + kStages - 1;
      if (next < k_tiles) {
        const Stage stage = StageAt<kTokenTiles>(static_cast<int>(next % kStages));
        LoadTile<kTokenTiles, kGrouped>(p, meta, stage, token0, col0, next, tid);
      }
      simt::CpAsyncCommit();
      ComputeStep<kType, kTokenTiles, kGrouped>(
          StageAt<kTokenTiles>(static_cast<int>(kt % kStages)), warp, lane, acc);
    }
    simt::CpAsyncWait<0>();
    simt::SyncThreads();  // The stages become the reduction buffer.
    marlin::ReduceWarps(warp, lane, acc);  // The same tree as the dense kernel's.
    if (warp == 0) Store<T, kTokenTiles, kGrouped>(p, lane, token0, col0, acc);
    simt::SyncThreads();  // The buffer is the next token block's stages.
  }
}

// Two entry points, so the ptxas and SASS reports name the scale layouts apart.
template <class T, MmaType kType, int kTokenTiles>
__global__ void JAXSPARSE_LAUNCH_BOUNDS(kThreads)
    MarlinNmKernel(const JAXSPARSE_GRID_CONSTANT Args<T> p, const uint32_t* meta) {
  Run<T, kType, kTokenTiles, true>(p, meta);
}

template <class T, MmaType kType, int kTokenTiles>
__global__ void JAXSPARSE_LAUNCH_BOUNDS(kThreads)
    MarlinNmPerColumnKernel(const JAXSPARSE_GRID_CONSTANT Args<T> p, const uint32_t* meta) {
  Run<T, kType, kTokenTiles, false>(p, meta);
}

}  // namespace jaxsparse::marlin_nm

#endif  // JAXSPARSE_CUDA_INT4_INT4_MARLIN_NM_CUH_
