// The MARLIN kernel (IST-DASLab/marlin, KERNELS.md section 3) for the dense
// int4 form: y = x @ W, W = (u - 8) * scale, with the weights as the B
// operand of mma.sync.m16n8k16 (bf16 or f16 in, f32 accumulate) and the
// activations as A. Written against cuda/simt.cuh only.
//
// Operands (target jaxsparse_int4_marlin_matmul, jaxsparse/ops/int4_marlin.py):
//   x       [T, K]         bf16/f16, row-major; K % 64 == 0
//   qweight [K/16, 2N]     int32, marlin_pack's layout: per k16 step and 64
//                          output columns, 128 words = 32 lanes x 4; word j
//                          of lane 4g + t holds, as nibbles 0/4, 1/5 and
//                          2/6, 3/7, W rows (2t, 2t+1), (2t+8, 2t+9) at
//                          column 16j + g and at column 16j + 8 + g
//   scales  [K/g, N]       x's dtype; per 64 columns position 8i + j holds
//                          column i + 8j (grouped), or [1, N] with per 32
//                          columns position 8i + j holding column
//                          2i + (0, 1, 8, 9, 16, 17, 24, 25)[j] (per column)
//   y       [T, N]
//
// Block tile: 64 output columns x 16 * kMTiles tokens (kMTiles = 1, 2, 4),
// 4 warps, 64 inputs per pipeline stage. Why these sizes:
// - 64 columns are the 16 x 64 block of the packed layout: one 16-byte load
//   per lane per k16 step is 8 complete B fragments (8 n8 tiles), so every
//   A fragment (one ldmatrix.x4) feeds 8 MMAs.
// - The 4 warps split the stage's 64 inputs (one k16 step each) and reduce
//   their partial sums through shared memory at the end, as MARLIN's warps
//   covering the same outputs do: per warp the B stream is one 16-byte load
//   per k16 step with no reuse, so more warps on the same columns are what
//   keeps enough loads in flight at small T.
// - 4 stages of cp.async (A, B and the group scales: 10.5 KB each at 64
//   tokens, 42 KB in all, under the 48 KB a block gets without opting in):
//   three tiles in flight while the warps dequantise and multiply the
//   fourth, so at T <= 16, where the kernel streams weights, their latency
//   is hidden.
// - 16 * kMTiles tokens: kMTiles = 1 at T <= 16 spends no MMA on padding
//   tokens; kMTiles = 4 reuses each dequantised B fragment 4 times (128 f32
//   accumulators per thread, no spill at 128 threads).
//
// Not done (MARLIN does): striped (k, n) partitioning across CTAs with a
// global reduction (here a block owns its 64 columns over all of K, so
// N / 64 blocks run at T <= 64: at N = 4096, 64 of an A100's 108 SMs), the
// L2 evict-first policy on the weight stream, and double-buffered fragments
// in registers.
#ifndef JAXSPARSE_CUDA_INT4_INT4_MARLIN_CUH_
#define JAXSPARSE_CUDA_INT4_INT4_MARLIN_CUH_

#include <cstdint>

#include "cuda/simt.cuh"

namespace jaxsparse::marlin {

using simt::MmaType;
using simt::Smem;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTileN = 64;          // Output columns per block.
constexpr int kTileK = 16 * kWarps; // Inputs per stage: one k16 step per warp.
constexpr int kStages = 4;
constexpr int kNTiles = kTileN / 8; // n8 tiles of a warp.
constexpr int kWordsPerStep = 2 * kTileN;  // Packed words of one k16 step x 64 columns.
constexpr int kPerColumn = -1;      // group_size of one scale per output column.

// Shared memory of one stage in bytes: A rows of 64 halves (128 bytes, 8
// pieces), the B words of 4 k16 steps, one row of 64 scales per k16 step.
template <int kMTiles>
struct Tile {
  static constexpr int kTokens = 16 * kMTiles;
  static constexpr int kABytes = kTokens * 2 * kTileK;
  static constexpr int kBBytes = kWarps * kWordsPerStep * 4;
  static constexpr int kSBytes = kWarps * kTileN * 2;
  static constexpr int kStageBytes = kABytes + kBBytes + kSBytes;
  // The first round of ReduceWarps: half the warps' accumulators.
  static constexpr int kReduceBytes = kWarps / 2 * kMTiles * kNTiles * 4 * 32 * 4;
  static constexpr int kSmemBytes =
      kStages * kStageBytes > kReduceBytes ? kStages * kStageBytes : kReduceBytes;
};

template <class T>
struct Args {
  const uint16_t* x;
  const uint32_t* qweight;
  const uint16_t* scales;
  T* y;
  int64_t tokens, in, out;
  int32_t group_size;  // kPerColumn or a multiple of 16 dividing K.
};

// Four packed words: one 16-byte load (LDS.128 / ld.global.v4) per lane.
struct alignas(16) Words4 {
  uint32_t w[4];
};

struct Stage {
  Smem<uint16_t> a;
  Smem<uint32_t> b;
  Smem<uint16_t> s;
};

template <int kMTiles>
JAXSPARSE_DEV Stage StageAt(int s) {
  using Shape = Tile<kMTiles>;
  const size_t base = static_cast<size_t>(s) * Shape::kStageBytes;
  return Stage{simt::DynamicSmem<uint16_t>(base),
               simt::DynamicSmem<uint32_t>(base + Shape::kABytes),
               simt::DynamicSmem<uint16_t>(base + Shape::kABytes + Shape::kBBytes)};
}

// A rows are 128 bytes: swizzled so the 8 rows of one ldmatrix phase hit 8
// distinct bank groups (simt::SwizzledPiece).
JAXSPARSE_DEV int APiece(int row, int piece) { return simt::SwizzledPiece<8>(row, piece); }

// Issues the cp.async copies of k-tile kt into stage st: the x rows of the
// block's tokens (tokens past T zero-filled, their source never read), the
// 4 k16 steps' packed words (thread tid copies the 16 bytes that lane tid % 32
// of warp tid / 32 reads back), and per k16 step the 64 scales of its group.
template <int kMTiles, bool kGrouped, class T>
JAXSPARSE_DEV void LoadTile(const Args<T>& p, const Stage& st, int64_t token0, int64_t col0,
                            int64_t kt, int tid) {
  constexpr int kPieces = Tile<kMTiles>::kTokens * 8;
  for (int piece = tid; piece < kPieces; piece += kThreads) {
    const int r = piece / 8, j = piece % 8;
    const int64_t token = token0 + r;
    const bool live = token < p.tokens;
    simt::CpAsync<16>(st.a + (r * 8 + APiece(r, j)) * 8,
                      live ? p.x + token * p.in + kt * kTileK + 8 * j : p.x, live ? 16 : 0);
  }
  const int step = tid / 32, lane = tid % 32;
  const int64_t kb = kt * kWarps + step;  // Row of the packed words.
  simt::CpAsync<16>(st.b + step * kWordsPerStep + 4 * lane,
                    p.qweight + kb * 2 * p.out + col0 * 2 + 4 * lane);
  if constexpr (kGrouped) {
    if (tid < kWarps * 8) {
      const int s = tid / 8, j = tid % 8;
      const int64_t group = (kt * kTileK + 16 * s) / p.group_size;
      simt::CpAsync<16>(st.s + s * kTileN + 8 * j, p.scales + group * p.out + col0 + 8 * j);
    }
  }
}

// (u - 8) for the 8 nibbles of one packed word, as two B fragments (n8
// tiles 2j and 2j + 1: nibbles 0/4 and 1/5, then 2/6 and 3/7, the k rows
// (2t, 2t + 1) and (2t + 8, 2t + 9) of column g). The magic-number trick
// (FasterTransformer's): OR-ing a nibble into the low mantissa bits of a
// 16-bit float whose ulp is 1 gives exactly magic + v, with no int-to-float
// conversion instruction; one lop3 does the mask and the OR.
// f16: 0x6400 = 1024 (ulp 1). Nibbles 0/4 -> 1024 + v, minus 0x6408 = 1032
//   gives v - 8. Nibbles 1/5 masked in place (bits 4-7) give 1024 + 16 v;
//   times 0x2C00 = 1/16 plus 0xD480 = -72 gives 64 + v - 72 = v - 8, one fma.
// bf16: 0x4300 = 128 (7 mantissa bits, ulp 1). 16 v does not fit below the
//   exponent (bit 7 is its lowest bit), so nibbles 1/5 are shifted down by 4
//   first; both pairs then minus 0x4308 = 136 give v - 8.
// Every intermediate is an integer below 2^11 (f16) or 2^8 (bf16): exact.
template <MmaType kType>
JAXSPARSE_DEV void Dequantize(uint32_t q, uint32_t (&b0)[2], uint32_t (&b1)[2]) {
  constexpr uint32_t kAndOr = (0xf0 & 0xcc) | 0xaa;  // lop3 table of (a & b) | c.
  constexpr uint32_t kLow = 0x000f000fu;
  if constexpr (kType == MmaType::kF16) {
    constexpr uint32_t kMagic = 0x64006400u, kMagicPlus8 = 0x64086408u;
    constexpr uint32_t kHigh = 0x00f000f0u, kSixteenth = 0x2c002c00u, kMinus72 = 0xd480d480u;
    const uint32_t hi = q >> 8;
    b0[0] = simt::Sub16x2<kType>(simt::Lop3<kAndOr>(q, kLow, kMagic), kMagicPlus8);
    b0[1] = simt::Fma16x2<kType>(simt::Lop3<kAndOr>(q, kHigh, kMagic), kSixteenth, kMinus72);
    b1[0] = simt::Sub16x2<kType>(simt::Lop3<kAndOr>(hi, kLow, kMagic), kMagicPlus8);
    b1[1] = simt::Fma16x2<kType>(simt::Lop3<kAndOr>(hi, kHigh, kMagic), kSixteenth, kMinus72);
  } else {
    constexpr uint32_t kMagic = 0x43004300u, kMagicPlus8 = 0x43084308u;
    b0[0] = simt::Sub16x2<kType>(simt::Lop3<kAndOr>(q, kLow, kMagic), kMagicPlus8);
    b0[1] = simt::Sub16x2<kType>(simt::Lop3<kAndOr>(q >> 4, kLow, kMagic), kMagicPlus8);
    b1[0] = simt::Sub16x2<kType>(simt::Lop3<kAndOr>(q >> 8, kLow, kMagic), kMagicPlus8);
    b1[1] = simt::Sub16x2<kType>(simt::Lop3<kAndOr>(q >> 12, kLow, kMagic), kMagicPlus8);
  }
}

// Scale `pick` (0: low half, 1: high half) of a register, in both halves:
// the k rows of a B register share their column, so one hmul2 scales both.
JAXSPARSE_DEV uint32_t Broadcast16(uint32_t pair, int pick) {
  const uint32_t h = pick == 0 ? pair & 0xffffu : pair >> 16;
  return h | (h << 16);
}

// One warp's k16 step of one stage: its B fragments (one 16-byte shared
// load, dequantised, grouped scales multiplied in), then per 16 tokens one
// ldmatrix.x4 of A (rows 0-7 / 8-15 x inputs 0-7 / 8-15: the m16n8k16 A
// registers) and 8 MMAs.
template <MmaType kType, int kMTiles, bool kGrouped>
JAXSPARSE_DEV void ComputeStep(const Stage& st, int warp, int lane,
                               float (&acc)[kMTiles][kNTiles][4]) {
  const Words4 q = st.b.As<Words4>()[static_cast<size_t>(warp * 32 + lane)];
  uint32_t b[kNTiles][2];
  JAXSPARSE_UNROLL
  for (int j = 0; j < 4; ++j) Dequantize<kType>(q.w[j], b[2 * j], b[2 * j + 1]);
  if constexpr (kGrouped) {
    // n8 tile nt's column is 8 nt + g: the permuted row holds them at 8 g + nt.
    const Words4 s = (st.s + warp * kTileN).As<Words4>()[static_cast<size_t>(lane >> 2)];
    JAXSPARSE_UNROLL
    for (int nt = 0; nt < kNTiles; ++nt) {
      const uint32_t scale = Broadcast16(s.w[nt >> 1], nt & 1);
      b[nt][0] = simt::Mul16x2<kType>(b[nt][0], scale);
      b[nt][1] = simt::Mul16x2<kType>(b[nt][1], scale);
    }
  }
  const int quad = lane / 8, row_in_tile = lane % 8 + 8 * (quad & 1);
  const int piece = 2 * warp + (quad >> 1);
  JAXSPARSE_UNROLL
  for (int mt = 0; mt < kMTiles; ++mt) {
    const int row = 16 * mt + row_in_tile;
    uint32_t a[4];
    simt::Ldmatrix<4>(a, st.a + (row * 8 + APiece(row, piece)) * 8);
    JAXSPARSE_UNROLL
    for (int nt = 0; nt < kNTiles; ++nt) {
      simt::MmaM16n8k16<kType>(acc[mt][nt], a, b[nt], acc[mt][nt]);
    }
  }
}

// Where accumulator (r, c, i) of `lane` sits in a warp's slice of the
// reduction buffer: lane-minor, so a warp's stores and loads are
// conflict-free.
template <int kCols>
JAXSPARSE_DEV size_t SliceAt(int r, int c, int i, int lane) {
  return static_cast<size_t>(((r * kCols + c) * 4 + i) * 32 + lane);
}

// Sums the warps' partial accumulators (any [kRows][kCols][4] tile of mma
// fragments) into warp 0's by a tree through shared memory: per round, the
// upper half of the remaining warps store theirs and the lower half add
// them. Straight-line stores and adds per round: a loop over warps with a
// branch per step kept every accumulator live twice, and spilled.
template <int kRows, int kCols>
JAXSPARSE_DEV void ReduceWarps(int warp, int lane, float (&acc)[kRows][kCols][4]) {
  constexpr int kSlice = kRows * kCols * 4 * 32;  // floats of one warp's accumulators
  JAXSPARSE_UNROLL
  for (int half = kWarps / 2; half >= 1; half /= 2) {
    const bool sender = warp >= half && warp < 2 * half, receiver = warp < half;
    Smem<float> slice = simt::DynamicSmem<float>(0) + (sender ? warp - half : warp) * kSlice;
    if (sender) {
      JAXSPARSE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        JAXSPARSE_UNROLL
        for (int c = 0; c < kCols; ++c) {
          JAXSPARSE_UNROLL
          for (int i = 0; i < 4; ++i) slice[SliceAt<kCols>(r, c, i, lane)] = acc[r][c][i];
        }
      }
    }
    simt::SyncThreads();
    if (receiver) {
      JAXSPARSE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        JAXSPARSE_UNROLL
        for (int c = 0; c < kCols; ++c) {
          JAXSPARSE_UNROLL
          for (int i = 0; i < 4; ++i) acc[r][c][i] += slice[SliceAt<kCols>(r, c, i, lane)];
        }
      }
    }
    // The next round's senders overwrite slices this round's receivers read.
    if (half > 1) simt::SyncThreads();
  }
}

// Warp 0 writes the block's outputs: accumulator (mt, nt, i) of lane 4g + t
// is token 16 mt + g + 8 (i >> 1), column 8 nt + 2t + (i & 1). Per-column
// scales are applied here, once per output, in f32 (one rounding to T): the
// permuted row puts lane t's 16 columns in two runs of 8 consecutive scales.
template <class T, int kMTiles, bool kGrouped>
JAXSPARSE_DEV void Store(const Args<T>& p, int lane, int64_t token0, int64_t col0,
                         const float (&acc)[kMTiles][kNTiles][4]) {
  const int g = lane >> 2, t = lane & 3;
  const T* scales = reinterpret_cast<const T*>(p.scales);
  JAXSPARSE_UNROLL
  for (int nt = 0; nt < kNTiles; ++nt) {
    float scale[2] = {1.0f, 1.0f};
    if constexpr (!kGrouped) {
      const int64_t at = col0 + 32 * (nt / 4) + 8 * t + 2 * (nt % 4);
      scale[0] = static_cast<float>(scales[at]);
      scale[1] = static_cast<float>(scales[at + 1]);
    }
    const int64_t col = col0 + 8 * nt + 2 * t;
    JAXSPARSE_UNROLL
    for (int mt = 0; mt < kMTiles; ++mt) {
      JAXSPARSE_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int64_t token = token0 + 16 * mt + g + 8 * (i >> 1);
        if (token < p.tokens) {
          p.y[token * p.out + col + (i & 1)] = static_cast<T>(acc[mt][nt][i] * scale[i & 1]);
        }
      }
    }
  }
}

// The kernel body. Grid: x = N / 64 column blocks, y strides over the token
// blocks.
template <class T, MmaType kType, int kMTiles, bool kGrouped>
JAXSPARSE_DEV void Run(const Args<T>& p) {
  constexpr int kTokens = Tile<kMTiles>::kTokens;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int64_t k_tiles = p.in / kTileK;
  const int64_t token_blocks = (p.tokens + kTokens - 1) / kTokens;
  for (int64_t tb = blockIdx.y; tb < token_blocks; tb += gridDim.y) {
    const int64_t token0 = tb * kTokens;
    float acc[kMTiles][kNTiles][4] = {};
    // Prologue: kStages - 1 tiles in flight, one commit group each (empty
    // groups past the last tile keep the wait counts uniform).
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_tiles) LoadTile<kMTiles, kGrouped>(p, StageAt<kMTiles>(s), token0, col0, s, tid);
      simt::CpAsyncCommit();
    }
    for (int64_t kt = 0; kt < k_tiles; ++kt) {
      // Tile kt has landed once at most kStages - 2 newer groups are pending;
      // the barrier makes every thread's copies visible and frees the stage
      // computed on last iteration for the next prefetch.
      simt::CpAsyncWait<kStages - 2>();
      simt::SyncThreads();
      const int64_t next = kt + kStages - 1;
      if (next < k_tiles) {
        LoadTile<kMTiles, kGrouped>(p, StageAt<kMTiles>(static_cast<int>(next % kStages)), token0,
                                    col0, next, tid);
      }
      simt::CpAsyncCommit();
      ComputeStep<kType, kMTiles, kGrouped>(StageAt<kMTiles>(static_cast<int>(kt % kStages)),
                                            warp, lane, acc);
    }
    simt::CpAsyncWait<0>();
    simt::SyncThreads();  // The stages become the reduction buffer.
    ReduceWarps(warp, lane, acc);
    if (warp == 0) Store<T, kMTiles, kGrouped>(p, lane, token0, col0, acc);
    simt::SyncThreads();  // The buffer is the next token block's stages.
  }
}

// Two entry points rather than a bool template argument, so that the ptxas
// and SASS reports (cuda/ptxas_report.py) name the two scale layouts apart.
template <class T, MmaType kType, int kMTiles>
__global__ void JAXSPARSE_LAUNCH_BOUNDS(kThreads)
    MarlinKernel(const JAXSPARSE_GRID_CONSTANT Args<T> p) {
  Run<T, kType, kMTiles, true>(p);
}

template <class T, MmaType kType, int kMTiles>
__global__ void JAXSPARSE_LAUNCH_BOUNDS(kThreads)
    MarlinPerColumnKernel(const JAXSPARSE_GRID_CONSTANT Args<T> p) {
  Run<T, kType, kMTiles, false>(p);
}

}  // namespace jaxsparse::marlin

#endif  // JAXSPARSE_CUDA_INT4_INT4_MARLIN_CUH_
