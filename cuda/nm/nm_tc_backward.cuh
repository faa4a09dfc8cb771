// The two backward ops of y = x @ W on the (dense) tensor cores, bf16 or f16
// in, f32 accumulate, for every n:m pattern:
//
//   spmm_t: dx = dy @ W^T, as dx^T = W^T dy^T. The 2:4 structure runs along
//           W's input dim, which is the M dim of this product, not its K, so
//           mma.sp cannot use it; each block decompresses its 64 x 32 tile of
//           W^T into shared memory and runs mma.m16n8k16 on it.
//   sddmm:  dv[j, c] = sum_t x[t, pos(c)] dy[t, j], as G = dy^T x on a 64 x 64
//           tile (mma.m16n8k16, both operands read transposed by
//           ldmatrix.trans), then sampled at the kept positions inside the
//           tile. Entries outside every tile (positions >= K or >= m) stay 0:
//           the handler zero-fills dv first.
//
// Block: 4 warps, a 64 x 64 output tile (16 rows per warp, eight n8 tiles),
// 32 of the reduction dim per stage (two k16 steps). Two cp.async stages: the
// next dense tile is in flight while the warps compute on the current one.
// Tile rows are 64 or 128 bytes, XOR-swizzled (simt::SwizzledPiece) so the
// ldmatrix reads are free of bank conflicts.
#ifndef JAXSPARSE_CUDA_NM_TC_BACKWARD_CUH_
#define JAXSPARSE_CUDA_NM_TC_BACKWARD_CUH_

#include <cstdint>

#include "cuda/simt.cuh"

namespace jaxsparse::tc {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTile = 64;     // Output rows and columns per block.
constexpr int kReduce = 32;   // Reduction dim per stage.
constexpr int kNTiles = kTile / 8;

template <class T>
struct Args {
  const uint16_t* dense_a;  // spmm_t: dy [T, N]; sddmm: x [T, K].
  const uint16_t* dy;       // sddmm: dy [T, N].
  const T* values;          // [N, Kc] (spmm_t).
  const uint8_t* indices;   // [N, Kc].
  T* out;                   // spmm_t: dx [B, T, K]; sddmm: dv [B, N, Kc].
  int64_t a_stride, dy_stride, values_stride, indices_stride;  // Per batch, 0 if shared.
  int64_t batch, tokens, in, out_features, groups, kept;
  int n, m;
};

// Element (row, col) of a tile with 16-bit rows of kCols elements.
template <int kCols>
JAXSPARSE_DEV int TileIndex(int row, int col) {
  return row * kCols + simt::SwizzledPiece<kCols / 8>(row, col / 8) * 8 + col % 8;
}

// cp.async of a [kReduce rows][kCols] 16-bit tile: rows r0.. of src (row
// length ld), columns c0..; pieces past the valid rows / columns zero-fill.
template <int kCols>
JAXSPARSE_DEV void LoadRows(simt::Smem<uint16_t> tile, const uint16_t* src, int64_t ld,
                            int64_t r0, int64_t rows, int64_t c0, int64_t cols, int tid) {
  constexpr int kPieces = kCols / 8;
  for (int p = tid; p < kReduce * kPieces; p += kThreads) {
    const int r = p / kPieces, j = p % kPieces;
    const bool live = r0 + r < rows && c0 + 8 * j < cols;
    simt::CpAsync<16>(tile + TileIndex<kCols>(r, 8 * j),
                      live ? src + (r0 + r) * ld + c0 + 8 * j : src, live ? 16 : 0);
  }
}

// cp.async of a [kTile tokens][kReduce] tile of dy (spmm_t's B, tokens as
// rows, 64-byte rows).
JAXSPARSE_DEV void LoadTokenRows(simt::Smem<uint16_t> tile, const uint16_t* src, int64_t ld,
                                 int64_t t0, int64_t tokens, int64_t c0, int64_t cols, int tid) {
  for (int p = tid; p < kTile * (kReduce / 8); p += kThreads) {
    const int r = p / (kReduce / 8), j = p % (kReduce / 8);
    const bool live = t0 + r < tokens && c0 + 8 * j < cols;
    simt::CpAsync<16>(tile + TileIndex<kReduce>(r, 8 * j),
                      live ? src + (t0 + r) * ld + c0 + 8 * j : src, live ? 16 : 0);
  }
}

// The groups with an input in [k0, k0 + kTile): [first, last).
struct GroupRange {
  int64_t first, last;
};

template <class T>
JAXSPARSE_DEV GroupRange GroupsOfTile(const Args<T>& p, int64_t k0) {
  const int64_t last = (k0 + kTile + p.m - 1) / p.m;
  return GroupRange{k0 / p.m, last < p.groups ? last : p.groups};
}

// ------------------------------------------------------------------ spmm_t

// W^T rows [k0, k0 + 64) x columns (weight rows) [j0, j0 + 32) into `a`:
// zeros, then every kept entry in range. Entries with a position >= m
// contribute nothing (docs/ffi_abi.md); two entries of a group at one
// position (only unvalidated data has them) are summed. A task owns one
// group of one row, so no other thread writes its positions.
template <class T>
JAXSPARSE_DEV void DecompressWt(const Args<T>& p, simt::Smem<uint16_t> a, int64_t b, int64_t k0,
                                int64_t j0, int tid) {
  simt::Smem<uint32_t> words = a.template As<uint32_t>();
  for (int i = tid; i < kTile * kReduce / 2; i += kThreads) words[i] = 0;
  simt::SyncThreads();
  const T* values = p.values + b * p.values_stride;
  const uint8_t* indices = p.indices + b * p.indices_stride;
  simt::Smem<T> a_elems = a.template As<T>();
  const GroupRange groups = GroupsOfTile(p, k0);
  for (int64_t task = tid; task < kReduce * (groups.last - groups.first); task += kThreads) {
    const int jl = static_cast<int>(task % kReduce);
    const int64_t j = j0 + jl, g = groups.first + task / kReduce;
    if (j >= p.out_features) continue;
    uint32_t written = 0;
    for (int e = 0; e < p.n; ++e) {
      const int64_t c = g * p.n + e;
      const int idx = indices[j * p.kept + c];
      const int64_t pos = g * p.m + idx;
      if (idx < p.m && pos >= k0 && pos < k0 + kTile && pos < p.in) {
        T& slot = a_elems[TileIndex<kReduce>(static_cast<int>(pos - k0), jl)];
        const T v = values[j * p.kept + c];
        slot = (written >> idx) & 1u
                   ? static_cast<T>(static_cast<float>(slot) + static_cast<float>(v))
                   : v;
        written |= 1u << idx;
      }
    }
  }
}

template <class T, simt::MmaType kType>
__global__ void JAXSPARSE_LAUNCH_BOUNDS(kThreads) SpmmTTcKernel(const JAXSPARSE_GRID_CONSTANT Args<T> p) {
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  // Tile origins fit 32 bits (grid dims are below 2^16 tiles of 64 in y, 2^31 in x).
  const int k0 = static_cast<int>(blockIdx.x) * kTile;
  const int t0 = static_cast<int>(blockIdx.y) * kTile;
  simt::Smem<uint16_t> wt = simt::DynamicSmem<uint16_t>(0);
  const int64_t j_tiles = (p.out_features + kReduce - 1) / kReduce;
  for (int64_t b = blockIdx.z; b < p.batch; b += gridDim.z) {
    const uint16_t* dy = p.dense_a + b * p.a_stride;
    float acc[kNTiles][4] = {};
    auto stage = [](int64_t s) {
      return simt::DynamicSmem<uint16_t>(2 * kTile * kReduce * (1 + s % 2));
    };
    LoadTokenRows(stage(0), dy, p.out_features, t0, p.tokens, 0, p.out_features, tid);
    simt::CpAsyncCommit();
    for (int64_t jt = 0; jt < j_tiles; ++jt) {
      DecompressWt(p, wt, b, k0, jt * kReduce, tid);
      if (jt + 1 < j_tiles) {
        LoadTokenRows(stage(jt + 1), dy, p.out_features, t0, p.tokens, (jt + 1) * kReduce,
                      p.out_features, tid);
      }
      simt::CpAsyncCommit();
      simt::CpAsyncWait<1>();  // dy tile jt has landed.
      simt::SyncThreads();     // ... for every thread, and so has the W^T tile.
      const int quad = lane / 8, a_row = 16 * warp + lane % 8 + 8 * (quad & 1);
      uint32_t a[2][4];
      JAXSPARSE_UNROLL
      for (int ks = 0; ks < 2; ++ks) {
        simt::Ldmatrix<4>(a[ks], wt + TileIndex<kReduce>(a_row, 16 * ks + 8 * (quad >> 1)));
      }
      JAXSPARSE_UNROLL
      for (int nt = 0; nt < kNTiles; ++nt) {
        // Four 8-column slices of the same 8 tokens: B registers of both k16 steps.
        uint32_t bfrag[4];
        simt::Ldmatrix<4>(bfrag, stage(jt) + TileIndex<kReduce>(8 * nt + lane % 8, 8 * quad));
        JAXSPARSE_UNROLL
        for (int ks = 0; ks < 2; ++ks) {
          const uint32_t bk[2] = {bfrag[2 * ks], bfrag[2 * ks + 1]};
          simt::MmaM16n8k16<kType>(acc[nt], a[ks], bk, acc[nt]);
        }
      }
      simt::SyncThreads();  // The W^T tile and this dy stage are rewritten next.
    }
    simt::CpAsyncWait<0>();
    // D rows are inputs k, columns tokens.
    T* dx = p.out + b * p.tokens * p.in;
    simt::ForEachAccumulator(lane, acc, [&](int r, int c, float v) {
      const int64_t k = k0 + 16 * warp + r, token = t0 + c;
      if (k < p.in && token < p.tokens) dx[token * p.in + k] = static_cast<T>(v);
    });
  }
}

// ------------------------------------------------------------------ sddmm

template <class T, simt::MmaType kType>
__global__ void JAXSPARSE_LAUNCH_BOUNDS(kThreads) SddmmTcKernel(const JAXSPARSE_GRID_CONSTANT Args<T> p) {
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int j0 = static_cast<int>(blockIdx.x) * kTile;
  const int k0 = static_cast<int>(blockIdx.y) * kTile;
  constexpr int kStageElems = 2 * kReduce * kTile;  // dy and x tiles.
  auto dy_tile = [](int64_t s) { return simt::DynamicSmem<uint16_t>(2 * kStageElems * (s % 2)); };
  auto x_tile = [](int64_t s) {
    return simt::DynamicSmem<uint16_t>(2 * kStageElems * (s % 2) + 2 * kReduce * kTile);
  };
  simt::Smem<float> gram = simt::DynamicSmem<float>(2 * 2 * kStageElems);
  constexpr int kGramLd = kTile + 1;  // Odd stride: column writes spread over banks.
  const int64_t t_tiles = (p.tokens + kReduce - 1) / kReduce;
  for (int64_t b = blockIdx.z; b < p.batch; b += gridDim.z) {
    const uint16_t* x = p.dense_a + b * p.a_stride;
    const uint16_t* dy = p.dy + b * p.dy_stride;
    float acc[kNTiles][4] = {};
    LoadRows<kTile>(dy_tile(0), dy, p.out_features, 0, p.tokens, j0, p.out_features, tid);
    LoadRows<kTile>(x_tile(0), x, p.in, 0, p.tokens, k0, p.in, tid);
    simt::CpAsyncCommit();
    for (int64_t tt = 0; tt < t_tiles; ++tt) {
      if (tt + 1 < t_tiles) {
        const int64_t t_next = (tt + 1) * kReduce;
        LoadRows<kTile>(dy_tile(tt + 1), dy, p.out_features, t_next, p.tokens, j0,
                        p.out_features, tid);
        LoadRows<kTile>(x_tile(tt + 1), x, p.in, t_next, p.tokens, k0, p.in, tid);
      }
      simt::CpAsyncCommit();
      simt::CpAsyncWait<1>();
      simt::SyncThreads();
      const int quad = lane / 8;
      uint32_t a[2][4];
      JAXSPARSE_UNROLL
      for (int ks = 0; ks < 2; ++ks) {
        // A = dy^T (rows j, columns t): transposed reads of the [t][j] tile.
        simt::Ldmatrix<4, true>(
            a[ks], dy_tile(tt) + TileIndex<kTile>(16 * ks + 8 * (quad >> 1) + lane % 8,
                                                  16 * warp + 8 * (quad & 1)));
      }
      JAXSPARSE_UNROLL
      for (int nt = 0; nt < kNTiles; ++nt) {
        // B = x (rows t, columns k), read transposed: 8-token slices q of columns 8nt..
        uint32_t bfrag[4];
        simt::Ldmatrix<4, true>(bfrag, x_tile(tt) + TileIndex<kTile>(8 * quad + lane % 8, 8 * nt));
        JAXSPARSE_UNROLL
        for (int ks = 0; ks < 2; ++ks) {
          const uint32_t bk[2] = {bfrag[2 * ks], bfrag[2 * ks + 1]};
          simt::MmaM16n8k16<kType>(acc[nt], a[ks], bk, acc[nt]);
        }
      }
      simt::SyncThreads();
    }
    simt::CpAsyncWait<0>();
    simt::ForEachAccumulator(lane, acc, [&](int r, int c, float v) {
      gram[(16 * warp + r) * kGramLd + c] = v;
    });
    simt::SyncThreads();
    // Sample the tile at the kept positions that fall inside it.
    const uint8_t* indices = p.indices + b * p.indices_stride;
    T* dv = p.out + b * p.out_features * p.kept;
    const GroupRange groups = GroupsOfTile(p, k0);
    for (int64_t task = tid; task < kTile * (groups.last - groups.first); task += kThreads) {
      const int jl = static_cast<int>(task % kTile);
      const int64_t j = j0 + jl, grp = groups.first + task / kTile;
      if (j >= p.out_features) continue;
      for (int e = 0; e < p.n; ++e) {
        const int64_t c = grp * p.n + e;
        const int idx = indices[j * p.kept + c];
        const int64_t pos = grp * p.m + idx;
        if (idx < p.m && pos >= k0 && pos < k0 + kTile && pos < p.in) {
          dv[j * p.kept + c] = static_cast<T>(gram[jl * kGramLd + (pos - k0)]);
        }
      }
    }
    simt::SyncThreads();  // The Gram tile is rewritten by the next batch entry.
  }
}

// Dynamic shared memory of each kernel.
constexpr int kSpmmTSmem = 3 * 2 * kTile * kReduce;                    // W^T tile + 2 dy stages.
constexpr int kSddmmSmem = 2 * 2 * 2 * kReduce * kTile + 4 * kTile * (kTile + 1);

}  // namespace jaxsparse::tc

#endif  // JAXSPARSE_CUDA_NM_TC_BACKWARD_CUH_
