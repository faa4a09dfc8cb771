// The engine's kernels over its tile products, written once and instantiated
// per unit: each engine_kernels_<isa>.cc defines JAXSPARSE_ENGINE_ISA to its
// namespace and includes this header (kernel_util.h says why each unit gets
// its own copy).
//
// int8 matmul, per batch entry:
//   1. pack a into A tiles and b into B tiles with their column sums, one
//      task per token tile or output tile (int8_tiles.h's layouts);
//   2. one task per block of kBlockTokenTiles x kBlockOutTiles C tiles: the
//      block's tile product, straight into out when the block is whole, else
//      into a stack buffer whose live part is copied out (tile edges).
#ifndef JAXSPARSE_CPU_ENGINE_ENGINE_KERNELS_H_
#define JAXSPARSE_CPU_ENGINE_ENGINE_KERNELS_H_

#ifndef JAXSPARSE_ENGINE_ISA
#error "define JAXSPARSE_ENGINE_ISA (the namespace of this instantiation) first"
#endif
#define JAXSPARSE_KERNEL_ISA JAXSPARSE_ENGINE_ISA

#include <cstdint>
#include <cstring>

#include "cpu/common/kernel_util.h"
#include "cpu/engine/engine_kernels_api.h"
#include "cpu/engine/int8_tiles.h"

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_ENGINE_ISA {

// C tiles per product task: 2 x 4 tiles (32 tokens x 64 outputs, 8 KB of
// int32) keep the 2 x 2 blocking of the tile units busy and give a 2-core
// machine several tasks from 64 tokens and 128 outputs on.
constexpr int64_t kBlockTokenTiles = 2;
constexpr int64_t kBlockOutTiles = 4;

// The packed operands of one batch entry.
struct Int8Packed {
  int64_t token_tiles, out_tiles, steps;
  int8_t* a;      // token_tiles * steps tiles
  int8_t* b;      // out_tiles * steps tiles
  int32_t* sums;  // 16 * out_tiles column sums of b

  template <class Carver>
  void Layout(Carver& carver) {
    a = carver.template Take<int8_t>(token_tiles * steps * int8_tiles::kTileBytes);
    b = carver.template Take<int8_t>(out_tiles * steps * int8_tiles::kTileBytes);
    sums = carver.template Take<int32_t>(out_tiles * int8_tiles::kTileRows);
  }
};

// Packs one token tile of a (tasks 0 .. token_tiles - 1) or one output tile
// of b (the rest) of one batch entry.
struct Int8PackJob {
  const Int8MatmulProblem* p;
  const Int8Packed* packed;
  const int8_t* a;  // The batch entry's a and b.
  const int8_t* b;
  bool pack_a, pack_b;  // False when the operand broadcasts and is packed already.

  void Run(int64_t task, int /*worker*/) const {
    constexpr int64_t kRows = int8_tiles::kTileRows;
    const int64_t tile_bytes = packed->steps * int8_tiles::kTileBytes;
    if (task < packed->token_tiles) {
      if (!pack_a) return;
      const int64_t t0 = task * kRows;
      int8_tiles::PackA(a + t0 * p->k, p->k, Min(kRows, p->tokens - t0), p->k, 1,
                        packed->a + task * tile_bytes);
      return;
    }
    if (!pack_b) return;
    const int64_t j = task - packed->token_tiles, c0 = j * kRows;
    int8_tiles::PackB(b + c0, p->n_out, p->k, Min(kRows, p->n_out - c0), 1,
                      packed->b + j * tile_bytes, packed->sums + c0);
  }
};

// One block of C tiles of one batch entry.
struct Int8ProductJob {
  const Int8MatmulProblem* p;
  const Int8Packed* packed;
  int32_t* out;  // The batch entry's [T, N].
  int64_t out_blocks;

  void Run(int64_t task, int /*worker*/) const {
    constexpr int64_t kRows = int8_tiles::kTileRows;
    const int64_t i0 = task / out_blocks * kBlockTokenTiles, j0 = task % out_blocks * kBlockOutTiles;
    const int64_t ta = Min(kBlockTokenTiles, packed->token_tiles - i0);
    const int64_t tb = Min(kBlockOutTiles, packed->out_tiles - j0);
    const int64_t tokens = Min(ta * kRows, p->tokens - i0 * kRows);
    const int64_t outs = Min(tb * kRows, p->n_out - j0 * kRows);
    const int64_t tile_bytes = packed->steps * int8_tiles::kTileBytes;
    const int8_t* a = packed->a + i0 * tile_bytes;
    const int8_t* b = packed->b + j0 * tile_bytes;
    const int32_t* sums = packed->sums + j0 * kRows;
    int32_t* c = out + i0 * kRows * p->n_out + j0 * kRows;
    int8_tiles::ConfigureTiles();
    if (tokens == ta * kRows && outs == tb * kRows) {
      int8_tiles::TileProduct(a, ta, b, tb, packed->steps, sums, c, p->n_out, false);
    } else {
      constexpr int64_t kLd = kBlockOutTiles * kRows;
      alignas(64) int32_t block[kBlockTokenTiles * kRows * kLd];
      int8_tiles::TileProduct(a, ta, b, tb, packed->steps, sums, block, kLd, false);
      for (int64_t t = 0; t < tokens; ++t)
        std::memcpy(c + t * p->n_out, block + t * kLd, outs * sizeof(int32_t));
    }
    int8_tiles::ReleaseTiles();
  }
};

// out[b] = a[b] . b[b] for every batch entry (int8 x int8 -> int32).
inline bool Int8Matmul(const Int8MatmulProblem& p, const Runtime& rt) {
  if (p.tokens == 0 || p.n_out == 0) return true;
  Int8Packed packed{};
  packed.token_tiles = int8_tiles::Tiles(p.tokens);
  packed.out_tiles = int8_tiles::Tiles(p.n_out);
  packed.steps = int8_tiles::KSteps(p.k);
  if (!TakeScratch(rt, packed)) return false;
  const int64_t token_blocks = CeilDiv(packed.token_tiles, kBlockTokenTiles);
  const int64_t out_blocks = CeilDiv(packed.out_tiles, kBlockOutTiles);
  for (int64_t e = 0; e < p.batch; ++e) {
    const Int8PackJob pack{&p, &packed, p.a + e * p.a_stride, p.b + e * p.b_stride,
                           e == 0 || p.a_stride != 0, e == 0 || p.b_stride != 0};
    RunParallel(rt, packed.token_tiles + packed.out_tiles, pack);
    const Int8ProductJob product{&p, &packed, p.out + e * p.tokens * p.n_out, out_blocks};
    RunParallel(rt, token_blocks * out_blocks, product);
  }
  return true;
}

inline EngineKernelTable MakeEngineTable() { return EngineKernelTable{&Int8Matmul}; }

}  // namespace JAXSPARSE_ENGINE_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_ENGINE_ENGINE_KERNELS_H_
