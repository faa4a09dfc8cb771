// The V:N:M forward on the sparse tensor cores, Spatha's scheme (VENOM, SC'23):
// y = x @ W computed as Y^T = W X^T with the weights as the sparse A operand of
// mma.sp::ordered_metadata.m16n8k32 (only A may be sparse). bf16 or f16 in,
// f32 accumulate. Reads the canonical arrays as they are (cpu/vnm/vnm_checks.h):
//
//   x       [Bx, T, K]     16-bit
//   values  [Bw, N, G*n]   16-bit, n = 1 or 2 kept values per output and group
//   indices [Bw, N, G*n]   u8, slot 0..3 of each kept value among the 4 selected
//   columns [Bw, P, G*4]   u8, the 4 selected inputs (0..m-1) of each panel and group
//   y       [B, T, N]
//
// Why it maps onto mma.sp: inside one panel every output reads the same 4
// inputs of a group, so the panel's "condensed" K (4 inputs per group) is an
// ordinary 2:4 problem. One m16n8k32 step covers 8 groups = 32 condensed
// inputs: a chunk of 4 A columns is one group's 4 selected inputs, and the
// metadata code of a chunk is the slot pair of `indices` (n = 2), or for n = 1
// the kept slot padded with an explicit zero at another slot.
//
// Block: kRows outputs of one panel (kRows = 16, 32, 64 or 128 dividing V;
// V / kRows blocks share a panel) x 64 tokens. Per k-tile of 8 groups:
// - A: the tile's raw values (16n bytes per row) and indices (8n bytes per
//   row) by cp.async into a 3-stage ring (contiguous in global memory; pieces
//   of 16, 8 or 4 bytes as the row length's alignment allows, plain loads when
//   it allows none). Each lane decodes its A fragment and metadata from them
//   (no repacking pass, no extra barrier): it reads 32-bit words at a 48-byte
//   row stride, which spreads the 8 rows of a fragment over distinct banks.
// - B: the gather. Lane l of every warp owns condensed input l of the tile
//   (group l / 4, slot l % 4): it reads the panel's column byte (one 32-byte
//   coalesced load per warp), then x[token, k] for its tokens; a warp's 32
//   loads of one token fall in an 8m-element window of one x row. x rows are
//   not contiguous along condensed K, so cp.async (4-byte minimum, aligned)
//   does not fit; the loads go through registers one tile ahead instead
//   (issued before the current tile's MMAs, stored to shared memory after
//   them), which hides their latency behind the tensor-core work.
// - B fragments: ldmatrix.x4 of 8 tokens x 32 condensed inputs from a
//   [token][32] tile with XOR-swizzled 16-byte pieces (conflict-free phases).
//
// Garbage under jit (slots > 3, columns >= m, slot pairs not increasing) never
// reaches memory outside the operands and never an invalid metadata code: a
// slot > 3 drops its value, a descending pair is swapped, and a pair naming one
// slot twice adds its two values (rounded to T) into that slot; a column >= m
// or an input >= K gathers a zero.
#ifndef JAXSPARSE_CUDA_VNM_VNM_SP_CUH_
#define JAXSPARSE_CUDA_VNM_VNM_SP_CUH_

#include <cstdint>
#include <cstring>

#include "cuda/simt.cuh"

namespace jaxsparse::vnm_sp {

constexpr int kBlockTokens = 64;
constexpr int kGroupsPerTile = 8;                 // One m16n8k32 k-step.
constexpr int kTileKc = 4 * kGroupsPerTile;       // 32 condensed inputs.
constexpr int kStages = 3;                        // A ring: two tiles in flight.
constexpr int kValRowBytes = 48;                  // 32 used (n = 2); see the bank note above.
constexpr int kIdxRowBytes = 16;                  // 16 used (n = 2).
constexpr int kBRowBytes = 2 * kTileKc;           // 64: 4 pieces of 16 bytes.
constexpr int kBBytes = kBlockTokens * kBRowBytes;

// The block shape for kRows outputs: kRows / 16 warps along the outputs (one
// m16 tile each) times 2-8 along the 64 tokens, at least 8 warps. What sets
// it is the gather: each thread holds its share of a tile's 64 x 32 gathered
// inputs in registers while the MMAs run, and with 16 per thread (128
// threads) ptxas needed 160-220 registers and spilled under a 128 cap; with
// 8 (256 threads) or 4 (512) it fits in about 100. A warp then holds 1-4 n8
// tiles (4-16 f32 accumulators). The warps along the tokens decode the same
// A fragment each; that is the price of the small kRows, taken only when V
// is not a multiple of 64.
template <int kRows>
struct Tile {
  static_assert(kRows == 16 || kRows == 32 || kRows == 64 || kRows == 128, "16, 32, 64 or 128 rows");
  static constexpr int kWarpsM = kRows / 16;
  static constexpr int kWarps = kWarpsM >= 4 ? 2 * kWarpsM : 8;
  static constexpr int kWarpsN = kWarps / kWarpsM;  // 8, 4, 2, 2
  static constexpr int kThreads = 32 * kWarps;      // 256, 256, 256, 512
  // Blocks per SM the register budget must allow: 128 registers per thread.
  static constexpr int kMinBlocks = 512 / kThreads;
  static constexpr int kWarpTokens = kBlockTokens / kWarpsN;
  static constexpr int kTokenTiles = kWarpTokens / 8;
  static constexpr int kGather = kBlockTokens / kWarps;  // Tokens per thread and tile.
  static constexpr int kStageBytes = kRows * (kValRowBytes + kIdxRowBytes);
  static constexpr int kSmemBytes = kStages * kStageBytes + 2 * kBBytes;
};

template <class T>
struct Args {
  const uint16_t* x;
  const uint8_t* values;  // As bytes: the rows are staged bytewise.
  const uint8_t* indices;
  const uint8_t* columns;
  T* y;
  // Per batch entry, in elements of each array (0 when its batch broadcasts).
  int64_t x_stride, values_stride, indices_stride, columns_stride;
  int64_t batch, tokens, in, out, groups, k_tiles;
  int32_t v, n, m;
  int32_t sub_tiles;                     // V / kRows blocks per panel.
  int32_t values_piece, indices_piece;   // Staging piece in bytes: 16, 8, 4 (cp.async) or 2, 1.
};

// The A ring: kRows rows per stage, each thread staging part of one row. A
// thread's row is fixed, so its two global row pointers are computed once per
// batch entry; the per-tile offsets are all it adds (hoisted per-piece
// addresses of a loop over all rows cost ptxas 100+ registers).
template <int kRows>
struct RowStager {
  static constexpr int kPerRow = Tile<kRows>::kThreads / kRows;  // Threads per row: 16, 8, 4 or 4.
  int local;      // This thread's row in the tile.
  int part;       // Its share of the row's pieces.
  bool live;      // The row exists (< N).
  const uint8_t* values;   // The row's values, as bytes.
  const uint8_t* indices;  // The row's indices.
};

// Copies k-tile `kt` (kTileBytes per row, at byte kt * kTileBytes) of one row
// of `row_bytes` into its shared row, in pieces of kPiece bytes shared by the
// kPerRow threads of the row. Bytes past the row's end (the ragged last tile)
// or of a row >= N are zero-filled and not read. kPiece >= 4 copies by
// cp.async; 2 and 1 by plain loads, for rows whose length allows no 4-byte
// alignment.
template <int kPiece, int kTileBytes, int kPerRow>
JAXSPARSE_DEV void StageRow(simt::Smem<uint8_t> dst, const uint8_t* src, bool live,
                            int64_t row_bytes, int kt, int part) {
  constexpr int kPieces = kTileBytes / kPiece;
JAXSPARSE_UNROLL
  for (int j0 = 0; j0 < kPieces; j0 += kPerRow) {
    const int j = j0 + part;
    if (kPieces % kPerRow != 0 && j >= kPieces) break;
    const int64_t offset = static_cast<int64_t>(kt) * kTileBytes + j * kPiece;
    const int64_t left = live ? row_bytes - offset : 0;
    const int valid = left <= 0 ? 0 : left >= kPiece ? kPiece : static_cast<int>(left);
    const uint8_t* from = valid > 0 ? src + offset : src;
    if constexpr (kPiece >= 4) {
      simt::CpAsync<kPiece>(dst + j * kPiece, from, valid);
    } else if constexpr (kPiece == 2) {
      (dst + j * kPiece).template As<uint16_t>()[0] =
          valid > 0 ? *reinterpret_cast<const uint16_t*>(from) : uint16_t{0};
    } else {
      dst[j] = valid > 0 ? *from : uint8_t{0};
    }
  }
}

template <int kRows>
JAXSPARSE_DEV size_t ValuesAt(int stage) {
  return static_cast<size_t>(stage) * Tile<kRows>::kStageBytes;
}
template <int kRows>
JAXSPARSE_DEV size_t IndicesAt(int stage) {
  return ValuesAt<kRows>(stage) + static_cast<size_t>(kRows) * kValRowBytes;
}
template <int kRows>
JAXSPARSE_DEV size_t GatherAt(int buffer) {
  return static_cast<size_t>(kStages) * Tile<kRows>::kStageBytes +
         static_cast<size_t>(buffer) * kBBytes;
}

// Issues the copies of k-tile kt's raw values (16 kN bytes per row) and
// indices (8 kN bytes per row) of this thread's row into `stage`. The piece
// sizes are uniform per launch, so the switches do not diverge.
template <int kRows, int kN, class T>
JAXSPARSE_DEV void StageA(const Args<T>& p, const RowStager<kRows>& r, int stage, int kt) {
  constexpr int kPerRow = RowStager<kRows>::kPerRow;
  constexpr int kValBytes = 2 * kGroupsPerTile * kN, kIdxBytes = kGroupsPerTile * kN;
  const simt::Smem<uint8_t> sv =
      simt::DynamicSmem<uint8_t>(ValuesAt<kRows>(stage) + r.local * kValRowBytes);
  const simt::Smem<uint8_t> si =
      simt::DynamicSmem<uint8_t>(IndicesAt<kRows>(stage) + r.local * kIdxRowBytes);
  const int64_t value_row = 2 * p.groups * kN, index_row = p.groups * kN;
  switch (p.values_piece) {
    case 16:
      StageRow<16, kValBytes, kPerRow>(sv, r.values, r.live, value_row, kt, r.part);
      break;
    case 8:
      StageRow<8, kValBytes, kPerRow>(sv, r.values, r.live, value_row, kt, r.part);
      break;
    case 4:
      StageRow<4, kValBytes, kPerRow>(sv, r.values, r.live, value_row, kt, r.part);
      break;
    default:
      StageRow<2, kValBytes, kPerRow>(sv, r.values, r.live, value_row, kt, r.part);
      break;
  }
  switch (p.indices_piece) {
    case 16:
      if constexpr (kIdxBytes % 16 == 0) {
        StageRow<16, kIdxBytes, kPerRow>(si, r.indices, r.live, index_row, kt, r.part);
      }
      break;
    case 8:
      StageRow<8, kIdxBytes, kPerRow>(si, r.indices, r.live, index_row, kt, r.part);
      break;
    case 4:
      StageRow<4, kIdxBytes, kPerRow>(si, r.indices, r.live, index_row, kt, r.part);
      break;
    default:
      StageRow<1, kIdxBytes, kPerRow>(si, r.indices, r.live, index_row, kt, r.part);
      break;
  }
}

// ------------------------------------------------------------------ A decode

// One chunk of the packed A operand: the 32-bit register (first stored value
// in the low half) and its 4-bit ordered_metadata code (positions p0 < p1 at
// bits 0-1 and 2-3).
struct Chunk {
  uint32_t word;
  uint32_t code;
};

// One value in slot `slot` (0..3) and an explicit zero in another slot, so the
// two positions are distinct and increasing: (slot, 3), or (2, 3) for slot 3.
JAXSPARSE_DEV Chunk Single(uint32_t slot, uint32_t bits) {
  if (slot == 3) return Chunk{bits << 16, 2u | (3u << 2)};
  return Chunk{bits, slot | (3u << 2)};
}

// a + b rounded to T, on the 16-bit patterns.
template <class T>
JAXSPARSE_DEV uint32_t AddBits(uint32_t a, uint32_t b) {
  const uint16_t a16 = static_cast<uint16_t>(a), b16 = static_cast<uint16_t>(b);
  T ta, tb;
  memcpy(&ta, &a16, sizeof(ta));
  memcpy(&tb, &b16, sizeof(tb));
  const T sum = static_cast<T>(static_cast<float>(ta) + static_cast<float>(tb));
  uint16_t out;
  memcpy(&out, &sum, sizeof(out));
  return out;
}

// Chunk of local row `row`, group `group` (0..7) of the staged tile. Valid
// data takes the first branch; the rest turns garbage into a valid code.
template <class T, int kN>
JAXSPARSE_DEV Chunk Decode(simt::Smem<uint8_t> values, simt::Smem<uint8_t> indices, int row,
                           int group) {
  if constexpr (kN == 1) {
    const uint32_t slot = indices[row * kIdxRowBytes + group];
    const uint32_t bits = values.As<uint16_t>()[row * (kValRowBytes / 2) + group];
    // Branch-free (selects): with a branch per chunk ptxas needed 40 more
    // registers for this kernel than for n = 2.
    const uint32_t word = slot == 3 ? bits << 16 : slot < 3 ? bits : 0u;
    const uint32_t code = slot == 3 ? (2u | (3u << 2)) : slot < 3 ? (slot | (3u << 2)) : (1u << 2);
    return Chunk{word, code};
  } else {
  const uint32_t word = values.As<uint32_t>()[row * (kValRowBytes / 4) + group];
  const uint32_t pair = indices.As<uint16_t>()[row * (kIdxRowBytes / 2) + group];
  const uint32_t s0 = pair & 0xffu, s1 = pair >> 8;
  if (s0 < s1 && s1 < 4) return Chunk{word, s0 | (s1 << 2)};
  const uint32_t v0 = word & 0xffffu, v1 = word >> 16;
  if (s1 < s0 && s0 < 4) return Chunk{v1 | (v0 << 16), s1 | (s0 << 2)};
  if (s0 == s1 && s0 < 4) return Single(s0, AddBits<T>(v0, v1));
  if (s0 < 4) return Single(s0, v0);
  if (s1 < 4) return Single(s1, v1);
  return Chunk{0, 1u << 2};
  }
}

// ------------------------------------------------------------------ B gather

// Input k of this lane's condensed input in a tile whose column byte is
// `column` (0xff past the last group), or -1: a column >= m or an input >= K
// gathers a zero.
template <class T>
JAXSPARSE_DEV int64_t GatherInput(const Args<T>& p, int kt, int lane, uint32_t column) {
  const int64_t k = (static_cast<int64_t>(kt) * kGroupsPerTile + lane / 4) * p.m + column;
  return (column < static_cast<uint32_t>(p.m) && k < p.in) ? k : -1;
}

template <class T>
JAXSPARSE_DEV uint32_t LoadColumn(const Args<T>& p, const uint8_t* panel_columns, int kt,
                                  int lane) {
  const int64_t c = static_cast<int64_t>(kt) * kTileKc + lane;
  return c < p.groups * 4 ? panel_columns[c] : 0xffu;
}

// ------------------------------------------------------------------ kernel

template <class T, simt::MmaType kType, int kRows, int kN>
__global__ void JAXSPARSE_LAUNCH_BOUNDS_MIN(Tile<kRows>::kThreads, Tile<kRows>::kMinBlocks)
    VnmSpmmSpKernel(const JAXSPARSE_GRID_CONSTANT Args<T> p) {
  using Shape = Tile<kRows>;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int warp_m = warp % Shape::kWarpsM, warp_n = warp / Shape::kWarpsM;
  const int g = lane >> 2, t = lane & 3;
  const int64_t panel = blockIdx.x / p.sub_tiles;
  const int64_t row0 = panel * p.v + static_cast<int64_t>(blockIdx.x % p.sub_tiles) * kRows;
  const int64_t token0 = static_cast<int64_t>(blockIdx.y) * kBlockTokens;
  const int k_tiles = static_cast<int>(p.k_tiles);
  // This thread's gather rows: tokens warp, warp + kWarps, ... of the tile;
  // `live` of them exist (T is not a multiple of 64 in the last tile).
  const int64_t first_token = token0 + warp;
  const int live = p.tokens - first_token > kBlockTokens ? kBlockTokens
                                                         : static_cast<int>(p.tokens - first_token);

  for (int64_t b = blockIdx.z; b < p.batch; b += gridDim.z) {
    RowStager<kRows> stager;
    stager.local = tid / RowStager<kRows>::kPerRow;
    stager.part = tid % RowStager<kRows>::kPerRow;
    stager.live = row0 + stager.local < p.out;
    const int64_t row = stager.live ? row0 + stager.local : 0;
    stager.values = p.values + 2 * (b * p.values_stride + row * p.groups * kN);
    stager.indices = p.indices + b * p.indices_stride + row * p.groups * kN;
    const uint8_t* columns = p.columns + b * p.columns_stride + panel * p.groups * 4;
    const uint16_t* x_rows = p.x + b * p.x_stride + first_token * p.in;

    // Gathers tile kt's x into registers: this lane's condensed input for its
    // tokens, zeros past T or for unusable inputs. A running pointer (not
    // token * K per row) keeps the row offsets out of the registers.
    uint16_t gathered[Shape::kGather];
    const auto gather = [&](int kt, uint32_t column) {
      const int64_t k = GatherInput(p, kt, lane, column);
      const int rows = k < 0 ? 0 : live;
      const uint16_t* from = x_rows + (k < 0 ? 0 : k);
JAXSPARSE_UNROLL
      for (int i = 0; i < Shape::kGather; ++i) {
        gathered[i] = Shape::kWarps * i < rows ? *from : uint16_t{0};
        from += Shape::kWarps * p.in;
      }
    };
    const auto store_gathered = [&](int buffer) {
      simt::Smem<uint16_t> tile = simt::DynamicSmem<uint16_t>(GatherAt<kRows>(buffer));
JAXSPARSE_UNROLL
      for (int i = 0; i < Shape::kGather; ++i) {
        const int row = warp + Shape::kWarps * i;
        tile[row * 32 + simt::SwizzledPiece<4>(row, lane / 8) * 8 + lane % 8] = gathered[i];
      }
    };

    // Prologue: tile 0's gather in place; the first kStages - 1 A tiles in
    // flight, one commit group each (empty groups keep the wait counts
    // uniform).
    gather(0, LoadColumn(p, columns, 0, lane));
    store_gathered(0);
    uint32_t next_column = LoadColumn(p, columns, 1, lane);
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_tiles) StageA<kRows, kN>(p, stager, s, s);
      simt::CpAsyncCommit();
    }

    float acc[Shape::kTokenTiles][4] = {};
    int stage = 0;
    for (int kt = 0; kt < k_tiles; ++kt) {
      // Tile kt's A has landed once at most kStages - 2 newer groups are
      // pending; the barrier publishes every thread's copies and gathered
      // stores, and frees the A stage and B buffer read last iteration.
      simt::CpAsyncWait<kStages - 2>();
      simt::SyncThreads();
      const int ahead = kt + kStages - 1;
      if (ahead < k_tiles) {
        StageA<kRows, kN>(p, stager, stage == 0 ? kStages - 1 : stage - 1, ahead);
      }
      simt::CpAsyncCommit();
      const bool more = kt + 1 < k_tiles;
      if (more) {
        gather(kt + 1, next_column);
        next_column = LoadColumn(p, columns, kt + 2, lane);
      }

      // This warp's 16 rows: A fragment registers (row g / g + 8, group t /
      // t + 4: the m16n8k32 layout on the packed 16 x 16 A), and the
      // metadata of selector 0 from lanes 4g (groups 0-3) and 4g + 1 (4-7).
      const simt::Smem<uint8_t> sv = simt::DynamicSmem<uint8_t>(ValuesAt<kRows>(stage));
      const simt::Smem<uint8_t> si = simt::DynamicSmem<uint8_t>(IndicesAt<kRows>(stage));
      const int ra = 16 * warp_m + g, rb = ra + 8;
      uint32_t a[4], meta = 0;
      {
        const Chunk c0 = Decode<T, kN>(sv, si, ra, t), c1 = Decode<T, kN>(sv, si, rb, t);
        const Chunk c2 = Decode<T, kN>(sv, si, ra, t + 4), c3 = Decode<T, kN>(sv, si, rb, t + 4);
        a[0] = c0.word;
        a[1] = c1.word;
        a[2] = c2.word;
        a[3] = c3.word;
      }
      if (t < 2) {
JAXSPARSE_UNROLL
        for (int c = 0; c < 4; ++c) {
          meta |= Decode<T, kN>(sv, si, ra, 4 * t + c).code << (4 * c);
          meta |= Decode<T, kN>(sv, si, rb, 4 * t + c).code << (16 + 4 * c);
        }
      }
      const simt::Smem<uint16_t> sb = simt::DynamicSmem<uint16_t>(GatherAt<kRows>(kt & 1));
JAXSPARSE_UNROLL
      for (int nt = 0; nt < Shape::kTokenTiles; ++nt) {
        // Matrix q of the x4 = condensed inputs 8q..8q+7 of 8 tokens: the
        // four B registers of m16n8k32.
        const int row = Shape::kWarpTokens * warp_n + 8 * nt + lane % 8;
        uint32_t bfrag[4];
        simt::Ldmatrix<4>(bfrag, sb + (row * 4 + simt::SwizzledPiece<4>(row, lane / 8)) * 8);
        simt::MmaSpM16n8k32<kType, 0>(acc[nt], a, bfrag, acc[nt], meta);
      }
      if (more) store_gathered((kt + 1) & 1);
      stage = stage == kStages - 1 ? 0 : stage + 1;
    }
    simt::CpAsyncWait<0>();
    simt::SyncThreads();  // The stages and buffers are reused by the next batch entry.

    // D rows are outputs, columns tokens.
    T* y = p.y + b * p.tokens * p.out;
JAXSPARSE_UNROLL
    for (int nt = 0; nt < Shape::kTokenTiles; ++nt) {
JAXSPARSE_UNROLL
      for (int j = 0; j < 4; ++j) {
        const int64_t row = row0 + 16 * warp_m + g + 8 * (j >> 1);
        const int64_t token = token0 + Shape::kWarpTokens * warp_n + 8 * nt + 2 * t + (j & 1);
        if (row < p.out && token < p.tokens) y[token * p.out + row] = static_cast<T>(acc[nt][j]);
      }
    }
  }
}

}  // namespace jaxsparse::vnm_sp

#endif  // JAXSPARSE_CUDA_VNM_VNM_SP_CUH_
