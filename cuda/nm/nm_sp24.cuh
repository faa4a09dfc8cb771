// The 2:4 forward on the sparse tensor cores: y = x @ W as Y^T = W X^T with
// the weights as the sparse A operand of mma.sp.m16n8k32 (Sparse-Marlin and
// Spatha do the same: only A may be sparse). bf16 or f16 in, f32 accumulate.
//
// Operands (target jaxsparse_nm_spmm_sp24, docs/ffi_abi.md):
//   x        [Bx, T, K]  16-bit, K % 16 == 0
//   values   [Bw, N, K/2] 16-bit: the canonical 2:4 values are already the
//            packed A (row j, packed columns 2c, 2c+1 = group c's values),
//            after jaxsparse.ops.pack_mma_sp_24 has ordered them
//   metadata [Bw, ceil(N/16), ceil(K/64), 32] u32, from pack_mma_sp_24: per
//            16-row m-tile and 64-input k-tile, the register of each lane
//            (lane 4g + 2s + h: rows g / g + 8, k-step s, 16 inputs h)
//   y        [B, T, N]
//
// Block tile: 64 weight rows (4 warps x 16) x 64 tokens x 64 inputs per
// stage. Why these sizes:
// - A k-tile of 64 is two m16n8k32 steps, so one 32-bit metadata word per
//   lane covers it (selector 0, then 1): one coalesced 128-byte load per
//   warp and k-tile, the layout the packer writes.
// - 64 tokens are 8 n8 tiles: each A fragment (one ldmatrix.x4) feeds 8
//   mma.sp, and 32 f32 accumulators per thread leave registers for the
//   fragments without spilling.
// - 3 stages of cp.async (12.5 KB each, 37.5 KB in all, under the 48 KB a
//   block gets without opting in) keep two tiles in flight while the warps
//   compute on the third: global latency is hidden without a register
//   round trip.
#ifndef JAXSPARSE_CUDA_NM_SP24_CUH_
#define JAXSPARSE_CUDA_NM_SP24_CUH_

#include <cstdint>

#include "cuda/simt.cuh"

namespace jaxsparse::sp24 {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockRows = 16 * kWarps;  // Weight rows (outputs) per block.
constexpr int kBlockTokens = 64;
constexpr int kTileK = 64;                // Inputs per stage.
constexpr int kStages = 3;
constexpr int kTokenTiles = kBlockTokens / 8;
// Shared memory of one stage, in 16-bit elements / words.
constexpr int kAElems = kBlockRows * kTileK / 2;  // 64 rows x 64 B.
constexpr int kBElems = kBlockTokens * kTileK;    // 64 tokens x 128 B.
constexpr int kMetaWords = 32 * kWarps;
constexpr int kStageBytes = 2 * kAElems + 2 * kBElems + 4 * kMetaWords;
constexpr int kSmemBytes = kStages * kStageBytes;

template <class T>
struct Args {
  const uint16_t* x;
  const uint16_t* values;
  const uint32_t* metadata;
  T* y;
  int64_t x_stride, values_stride, metadata_stride;  // Per batch, 0 if shared.
  int64_t batch, tokens, in, out;
  int64_t m_tiles, k_tiles;  // ceil(N / 16), ceil(K / 64).
};

// A rows are 64 bytes (4 pieces), B rows 128 bytes (8): both swizzled so
// ldmatrix reads them without bank conflicts (simt::SwizzledPiece).
JAXSPARSE_DEV int APiece(int row, int piece) { return simt::SwizzledPiece<4>(row, piece); }
JAXSPARSE_DEV int BPiece(int row, int piece) { return simt::SwizzledPiece<8>(row, piece); }

struct Stage {
  simt::Smem<uint16_t> a, b;
  simt::Smem<uint32_t> meta;
};

JAXSPARSE_DEV Stage StageAt(int s) {
  const size_t base = static_cast<size_t>(s) * kStageBytes;
  return Stage{simt::DynamicSmem<uint16_t>(base), simt::DynamicSmem<uint16_t>(base + 2 * kAElems),
               simt::DynamicSmem<uint32_t>(base + 2 * kAElems + 2 * kBElems)};
}

// Issues the cp.async copies of k-tile kt into stage st. Pieces past N, T or
// K are zero-filled (their source is never read), so edge tiles need no
// other branch; metadata of m-tiles past N is read from the last m-tile, so
// every code stays valid (its A rows are zeros).
template <class T>
JAXSPARSE_DEV void LoadTile(const Args<T>& p, const Stage& st, int64_t b, int64_t row0,
                            int64_t token0, int64_t kt, int tid) {
  const int64_t kc = p.in / 2;
  const uint16_t* values = p.values + b * p.values_stride;
  for (int piece = tid; piece < kBlockRows * 4; piece += kThreads) {
    const int r = piece / 4, j = piece % 4;
    const int64_t row = row0 + r, col = kt * (kTileK / 2) + 8 * j;
    const bool live = row < p.out && col < kc;
    simt::CpAsync<16>(st.a + (r * 4 + APiece(r, j)) * 8,
                      live ? values + row * kc + col : values, live ? 16 : 0);
  }
  const uint16_t* x = p.x + b * p.x_stride;
  for (int piece = tid; piece < kBlockTokens * 8; piece += kThreads) {
    const int r = piece / 8, j = piece % 8;
    const int64_t token = token0 + r, col = kt * kTileK + 8 * j;
    const bool live = token < p.tokens && col < p.in;
    simt::CpAsync<16>(st.b + (r * 8 + BPiece(r, j)) * 8,
                      live ? x + token * p.in + col : x, live ? 16 : 0);
  }
  if (tid < kMetaWords / 4) {
    const int w = tid / 8;
    int64_t mt = row0 / 16 + w;
    mt = mt < p.m_tiles ? mt : p.m_tiles - 1;
    const uint32_t* src =
        p.metadata + b * p.metadata_stride + (mt * p.k_tiles + kt) * 32 + 4 * (tid % 8);
    simt::CpAsync<16>(st.meta + 4 * tid, src);
  }
}

// One warp's 16 rows x 64 tokens of one k-tile: per k-step one ldmatrix.x4
// of A (quadrants (0,0), (1,0), (0,1), (1,1): the m16n8k32 A layout) and per
// 8 tokens one ldmatrix.x4 of B (four 8-input slices of the same 8 tokens:
// the four B registers), then mma.sp with selector = k-step.
template <simt::MmaType kType>
JAXSPARSE_DEV void ComputeTile(const Stage& st, int warp, int lane, float (&acc)[kTokenTiles][4]) {
  const uint32_t meta = st.meta[warp * 32 + lane];
  const int quad = lane / 8;
JAXSPARSE_UNROLL
  for (int ks = 0; ks < 2; ++ks) {
    const int a_row = 16 * warp + lane % 8 + 8 * (quad & 1);
    const int a_piece = 2 * ks + (quad >> 1);
    uint32_t a[4];
    simt::Ldmatrix<4>(a, st.a + (a_row * 4 + APiece(a_row, a_piece)) * 8);
JAXSPARSE_UNROLL
    for (int nt = 0; nt < kTokenTiles; ++nt) {
      const int b_row = 8 * nt + lane % 8;
      uint32_t bfrag[4];
      simt::Ldmatrix<4>(bfrag, st.b + (b_row * 8 + BPiece(b_row, 4 * ks + quad)) * 8);
      if (ks == 0) {
        simt::MmaSpM16n8k32<kType, 0>(acc[nt], a, bfrag, acc[nt], meta);
      } else {
        simt::MmaSpM16n8k32<kType, 1>(acc[nt], a, bfrag, acc[nt], meta);
      }
    }
  }
}

template <class T, simt::MmaType kType>
__global__ void JAXSPARSE_LAUNCH_BOUNDS(kThreads) SpmmSp24Kernel(const JAXSPARSE_GRID_CONSTANT Args<T> p) {
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const int64_t token0 = static_cast<int64_t>(blockIdx.y) * kBlockTokens;
  for (int64_t b = blockIdx.z; b < p.batch; b += gridDim.z) {
    float acc[kTokenTiles][4] = {};
    // Prologue: the first kStages - 1 tiles in flight, one commit group each
    // (empty groups past the last tile keep the wait counts uniform).
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < p.k_tiles) LoadTile(p, StageAt(s), b, row0, token0, s, tid);
      simt::CpAsyncCommit();
    }
    for (int64_t kt = 0; kt < p.k_tiles; ++kt) {
      // Tile kt has landed once at most kStages - 2 newer groups are pending;
      // the barrier makes every thread's copies visible, and frees the stage
      // computed on last iteration for the next prefetch.
      simt::CpAsyncWait<kStages - 2>();
      simt::SyncThreads();
      const int64_t next = kt + kStages - 1;
      if (next < p.k_tiles) {
        LoadTile(p, StageAt(static_cast<int>(next % kStages)), b, row0, token0, next, tid);
      }
      simt::CpAsyncCommit();
      ComputeTile<kType>(StageAt(static_cast<int>(kt % kStages)), warp, lane, acc);
    }
    simt::CpAsyncWait<0>();
    simt::SyncThreads();  // The stages are reused by the next batch entry.
    // D rows are weight rows (outputs), columns tokens. Written out rather than
    // through simt::ForEachAccumulator, whose lambda made ptxas spill here.
    const int g = lane >> 2, t = lane & 3;
    T* y = p.y + b * p.tokens * p.out;
JAXSPARSE_UNROLL
    for (int nt = 0; nt < kTokenTiles; ++nt) {
JAXSPARSE_UNROLL
      for (int j = 0; j < 4; ++j) {
        const int64_t row = row0 + 16 * warp + g + 8 * (j >> 1);
        const int64_t token = token0 + 8 * nt + 2 * t + (j & 1);
        if (row < p.out && token < p.tokens) y[token * p.out + row] = static_cast<T>(acc[nt][j]);
      }
    }
  }
}

}  // namespace jaxsparse::sp24

#endif  // JAXSPARSE_CUDA_NM_SP24_CUH_
