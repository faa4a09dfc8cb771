// The 1xN block kernel bodies, written once and instantiated per instruction
// set.
//
// Each blocks_kernels_<isa>.cc defines JAXSPARSE_BLOCKS_ISA to <isa> and
// includes this header; everything here lives in that per-ISA namespace so
// the copies, each compiled with different -m flags, never share a symbol.
//
// Why 1xN is fast on a CPU: the n outputs of a block row share each kept
// input, so one broadcast of x[t, k] feeds an n-wide FMA, and a block row is
// a small dense product x[:, kept] @ W_row[kept, n] (KERNELS.md section 4).
// The forward (spmm) therefore runs, per block of tokens:
//   1. Pack (Micro::Pack): x transposed to xT [K][tokens] in f32, once per
//      token block and shared by every block row: the broadcasts of a tile's
//      tokens for one input then read one or two cache lines, and bf16/f16
//      are converted once instead of once per block row (the bf16 pair
//      kernel keeps bf16; the AVX-512 units transpose 8 x 8 in registers,
//      blocks_pack.h);
//   2. per task (a run of block rows holding about kChunkBlocks blocks, so the
//      two workers stay balanced whatever the rows' lengths), per token tile,
//      per block row: the micro-kernel (`Micro`, per ISA) accumulates a
//      tile of tokens x n outputs in registers over the row's blocks and
//      stores it once. Tiles are the outer loop: one tile's lines of xT stay
//      in L2 while the task's rows stream through.
// A convolution's x is its images: step 1 gathers the patches while packing,
// or, at stride 1 with a kernel larger than 1x1, each task packs the input
// strip of a band of output rows once and reads every kernel position as a
// shifted view of it (SpmmOp's DirectJob).
// The backward ops reuse the same structure:
//   spmm_t  dx[t, k] = sum over blocks p with input k of dy[t, row(p)] . v[p]:
//           tasks own token tiles (no two tasks write the same dx entry), or,
//           with a single tile, runs of rows summed per worker and then added;
//           dx is accumulated transposed (dxT [K][tile]) so every block adds
//           one token-vector, then written back once.
//   sddmm   dv[p, j] = sum_t x[t, k_p] dy[t, row(p) n + j]: tasks own block
//           rows (each dv entry is written by one task); x is transposed
//           once per call and each row's dy columns are packed per task.
// The structure is untrusted: block rows are the running maximum of indptr
// clamped into [0, nnz] (so they never overlap or run out of the arrays), and
// blocks whose input is outside [0, K) are skipped.
#ifndef JAXSPARSE_CPU_BLOCKS_BLOCKS_KERNELS_H_
#define JAXSPARSE_CPU_BLOCKS_BLOCKS_KERNELS_H_

#ifndef JAXSPARSE_BLOCKS_ISA
#error "define JAXSPARSE_BLOCKS_ISA (the namespace of this instantiation) first"
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/blocks/blocks_kernels_api.h"
#include "cpu/common/dtype_convert.h"

#define JAXSPARSE_KERNEL_ISA JAXSPARSE_BLOCKS_ISA
#include "cpu/common/kernel_util.h"

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_BLOCKS_ISA {

// Blocks per forward task: the task's values (16 K blocks x 16 f32 = 1 MB at
// most, 256 KB for n = 4) are re-read once per token tile, from L2 when they
// fit; smaller tasks would only add scheduling.
constexpr int64_t kChunkBlocks = 4096;
// Tokens per forward token block: xT for it is K x 256 f32 (4 MB at K = 4096),
// of which one tile's lines are live at a time.
constexpr int64_t kBlockTokens = 256;
// Token tile of spmm_t tasks: dxT [K][16] f32 per worker (256 KB at K = 4096).
constexpr int64_t kTokensT = 16;
// Slack after xT so a micro-kernel's last token tile may read a whole tile of
// padding tokens (never stored).
constexpr int64_t kPackSlack = 256;
// Floats of the direct convolution's tile buffer: a tile of tokens x n
// outputs, at most 96 x 4, 48 x 8, 24 x 16 or 12 x 32 for the f32-compute
// kernel (Lanes in blocks_avx512.h) and 32 x 16 for its f32 tokens in lanes
// (kLaneTokens), 30 x 16 and 14 x 32 for the bf16 pairs (DpLanes in
// blocks_bf16dp.h).
constexpr int64_t kMaxTileOutputs = 512;

// ---------------------------------------------------------------- scalars
inline float LoadAs(Dtype dtype, const void* base, int64_t i) {
  switch (dtype) {
    case Dtype::kBF16:
      return Bf16ToF32(static_cast<const uint16_t*>(base)[i]);
    case Dtype::kF16:
      return F16ToF32(static_cast<const uint16_t*>(base)[i]);
    default:
      return static_cast<const float*>(base)[i];
  }
}

inline void StoreAs(Dtype dtype, void* base, int64_t i, float v) {
  switch (dtype) {
    case Dtype::kBF16:
      static_cast<uint16_t*>(base)[i] = F32ToBf16(v);
      break;
    case Dtype::kF16:
      static_cast<uint16_t*>(base)[i] = F32ToF16(v);
      break;
    default:
      static_cast<float*>(base)[i] = v;
  }
}

inline int64_t ElementBytes(Dtype dtype) { return dtype == Dtype::kF32 ? 4 : 2; }

inline const void* Offset(const void* base, Dtype dtype, int64_t elements) {
  return static_cast<const char*>(base) + elements * ElementBytes(dtype);
}

inline void* Offset(void* base, Dtype dtype, int64_t elements) {
  return static_cast<char*>(base) + elements * ElementBytes(dtype);
}

// ---------------------------------------------------------------- structure
// spans[r] .. spans[r + 1] are block row r's blocks: the running maximum of
// indptr clamped into [0, nnz] (the reference's jaxsparse.ops.block_rows).
inline void RowSpans(const int32_t* indptr, int64_t rows, int64_t nnz, int64_t* spans) {
  int64_t high = 0;
  for (int64_t r = 0; r <= rows; ++r) {
    const int64_t at = Min(Max(static_cast<int64_t>(indptr[r]), 0), nnz);
    high = Max(high, at);
    spans[r] = high;
  }
}

// Splits rows into runs of about `target` blocks (at least one row each);
// returns the number of runs, their bounds in bounds[0..runs].
inline int64_t RowRuns(const int64_t* spans, int64_t rows, int64_t target, int64_t* bounds) {
  int64_t runs = 0;
  bounds[0] = 0;
  int64_t start = 0;
  for (int64_t r = 1; r <= rows; ++r) {
    // Rows count one block each beyond their length, so runs of empty rows end.
    if (spans[r] - spans[start] + (r - start) >= target || r == rows) {
      bounds[++runs] = r;
      start = r;
    }
  }
  return runs;
}

// Exactly `parts` runs of rows (some may be empty), cut where the running
// count of blocks plus rows passes each part of the total, into
// bounds[0..parts].
inline void EvenRowRuns(const int64_t* spans, int64_t rows, int64_t parts, int64_t* bounds) {
  const int64_t total = spans[rows] + rows;
  int64_t r = 0;
  bounds[0] = 0;
  for (int64_t part = 1; part < parts; ++part) {
    const int64_t goal = CeilDiv(total * part, parts);
    while (r < rows && spans[r] + r < goal) ++r;
    bounds[part] = r;
  }
  bounds[parts] = rows;
}

// Tokens' feature rows (rows(t): token t's feature 0, or null for zeros) as
// f32 xT [k][ld] for features [k0, k1), padding tokens zero. Token by token:
// each reads a contiguous run of its row and writes one column of xT, whose
// lines stay in L1 across the 16 inputs that share them (the AVX-512 units
// transpose 8 x 8 in registers instead, blocks_pack.h).
template <class Rows>
void PackRowsScalar(Dtype dtype, const Rows& rows, int64_t count, int64_t ld, int64_t k0,
                    int64_t k1, float* xt) {
  for (int64_t t = 0; t < count; ++t) {
    const void* row = rows(t);
    for (int64_t kk = k0; kk < k1; ++kk) xt[kk * ld + t] = row ? LoadAs(dtype, row, kk) : 0.0f;
  }
  for (int64_t kk = k0; kk < k1; ++kk) {
    for (int64_t t = count; t < ld; ++t) xt[kk * ld + t] = 0.0f;
  }
}

// A convolution's patches for tokens from `first`, features [k0, k1), never
// stored: per kernel position overlapping [k0, k1), pack(rows, f0, f1) with
// rows(t) = token t's input pixel (null in the padding) for that position's
// features [f0, f1). A row's pointer is shifted back by the position's first
// feature, so that feature kk reads channel kk - pos * C of the pixel (in
// address arithmetic: the shifted pointer may lie before x).
template <class PackFeatures>
void PackConvFeatures(Dtype dtype, const BlocksConv& g, const void* x, int64_t first, int64_t k0,
                      int64_t k1, const PackFeatures& pack) {
  const int64_t c = g.channels, pixels = g.out_h * g.out_w;
  const intptr_t bytes = ElementBytes(dtype);
  for (int64_t pos = k0 / c; pos * c < k1; ++pos) {
    const int64_t i = pos / g.kernel_w, j = pos % g.kernel_w;
    const auto rows = [&](int64_t t) -> const void* {
      const int64_t token = first + t, image = token / pixels, pixel = token % pixels;
      const int64_t ih = (pixel / g.out_w) * g.stride_h + i * g.dilation_h - g.pad_top;
      const int64_t iw = (pixel % g.out_w) * g.stride_w + j * g.dilation_w - g.pad_left;
      if (ih < 0 || ih >= g.height || iw < 0 || iw >= g.width) return nullptr;
      const int64_t element = ((image * g.height + ih) * g.width + iw) * c - pos * c;
      return reinterpret_cast<const void*>(reinterpret_cast<intptr_t>(x) + element * bytes);
    };
    pack(rows, Max(k0, pos * c), Min(k1, (pos + 1) * c));
  }
}

// ---------------------------------------------------------------- forward
// The portable micro-kernel: a tile of kT tokens x kN outputs in a local
// array the compiler keeps in vector registers (the j loop vectorises).
template <int kN, int kT>
void PortableTile(const BlocksProblem& p, const void* values, const int32_t* indices,
                  int64_t b0, int64_t b1, const float* xt, int64_t ld, int64_t tokens,
                  void* y, int64_t outs) {
  float acc[kT][kN] = {};
  float w[kN];
  for (int64_t b = b0; b < b1; ++b) {
    const uint32_t input = static_cast<uint32_t>(indices[b]);
    if (input >= static_cast<uint64_t>(p.k)) continue;
    for (int j = 0; j < kN; ++j) w[j] = LoadAs(p.dtype, values, b * kN + j);
    const float* xs = xt + static_cast<int64_t>(input) * ld;
    for (int t = 0; t < kT; ++t) {
      const float xv = xs[t];
      for (int j = 0; j < kN; ++j) acc[t][j] += xv * w[j];
    }
  }
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t j = 0; j < outs; ++j) StoreAs(p.dtype, y, t * p.n_out + j, acc[t][j]);
  }
}

struct PortableMicro {
  // One tile's feature rows into its xT region (f32 for every micro-kernel but
  // the bf16 pairs'); rows(t) as in PackRowsScalar.
  template <class Rows>
  static void Pack(const BlocksProblem& p, const Rows& rows, int64_t count, int64_t ld,
                   int64_t k0, int64_t k1, float* xt) {
    PackRowsScalar(p.dtype, rows, count, ld, k0, k1, xt);
  }
  // Tokens per tile: a tile of n outputs keeps kT * n floats of accumulators.
  static int64_t TileTokens(const BlocksProblem& p) {
    return p.n >= 32 ? 4 : p.n == 16 ? 8 : 16;
  }
  static int64_t Slack() { return 16; }
  // Block row [b0, b1) for tokens [0, tokens) of xT (ld floats per input) into
  // y (the tile's first output, N per token), `outs` real outputs.
  static void Row(const BlocksProblem& p, const void* values, const int32_t* indices,
                  int64_t b0, int64_t b1, const float* xt, int64_t ld, int64_t tokens,
                  void* y, int64_t outs) {
    switch (p.n) {
      case 4:
        return PortableTile<4, 16>(p, values, indices, b0, b1, xt, ld, tokens, y, outs);
      case 8:
        return PortableTile<8, 16>(p, values, indices, b0, b1, xt, ld, tokens, y, outs);
      case 16:
        return PortableTile<16, 8>(p, values, indices, b0, b1, xt, ld, tokens, y, outs);
      default:
        return PortableTile<32, 4>(p, values, indices, b0, b1, xt, ld, tokens, y, outs);
    }
  }
};

// Micro-kernels that multiply a block row from weights laid out once per call
// (the tile product, blocks_tiles.h) say so by PrepackWords / PrepackRows /
// RowWeights / TileRow; the others take the values as stored.
template <class Micro, class = void>
struct PrepacksWeights : std::false_type {};
template <class Micro>
struct PrepacksWeights<Micro, std::void_t<decltype(&Micro::PrepackRows)>> : std::true_type {};
// Micro-kernels that read x through an offset table per input (RowAt) run a
// convolution of stride 1 directly from a strip of its input (SpmmOp's
// DirectJob), where DirectConv(p) says their kernel for p can.
template <class Micro, class = void>
struct ReadsOffsets : std::false_type {};
template <class Micro>
struct ReadsOffsets<Micro, std::void_t<decltype(&Micro::RowAt)>> : std::true_type {};

template <class Micro>
struct SpmmOp {
  static constexpr bool kPrepacks = PrepacksWeights<Micro>::value;
  const BlocksProblem& p;
  const Runtime& rt;
  // xT is tile-major: per token tile [K][ld], ld = the tile's tokens, so one
  // block's broadcasts for a tile read ld contiguous floats (24 for n = 16:
  // 1.5 lines, where rows of the whole token block took 2).
  int64_t ld = 0;
  int64_t tile = 0;   // the micro-kernel's tokens per tile
  int64_t block = 0;  // tokens per token block: whole tiles
  // Few blocks (fewer row runs than workers: a layer of 384 outputs, a
  // convolution's 64 filters) would leave workers idle with the rows split
  // among them; then each worker takes whole token blocks instead, packing
  // its own xT region (by_tokens).
  bool by_tokens = false;
  int64_t region = 0;  // floats of one xT region
  int64_t* spans = nullptr;
  int64_t* bounds = nullptr;
  float* xt = nullptr;
  uint16_t* weights = nullptr;  // the micro-kernel's prepacked weights, if it takes them
  // The direct convolution (stride 1): instead of the patches, each task
  // packs a band of output rows' input strip once (as its micro-kernel packs
  // x: f32, or bf16 for the pair kernel), [channel][strip row]
  // [strip column] (strip_ld elements per channel, zero where the padding
  // is); the kernel position (i, j) of channel c is then the channel's row
  // shifted by i * strip_w + j. A virtual token v = row * strip_w + column of
  // the band (columns past out_w are computed and dropped) reads input
  // k = (i, j, c) at strip + offsets[k] + v: every token of a tile one
  // element apart, as in a packed xT, but each input pixel is packed once
  // instead of once per kernel position (9 times for 3 x 3).
  bool direct = false;
  int64_t images = 0;      // per batch entry
  int64_t halo = 0;        // input rows a band reads past its output rows
  int64_t strip_w = 0;     // input columns of a strip: out_w + (kernel_w - 1) dilation_w
  int64_t band_rows = 0;   // output rows per task
  int64_t bands = 0;       // bands per image
  int64_t run_bands = 0;   // consecutive bands per task (each prefetches the next one's input)
  int64_t strip_ld = 0;    // elements per channel of a strip
  int64_t* offsets = nullptr;

  bool DirectApplies() const {
    if constexpr (ReadsOffsets<Micro>::value) {
      // A 1 x 1 kernel's patches are its pixels: nothing to save there.
      return p.conv != nullptr && p.conv->stride_h == 1 && p.conv->stride_w == 1 &&
             p.k > p.conv->channels && Micro::DirectConv(p);
    } else {
      return false;
    }
  }

  // Bands of about 64 K floats of strip (L2), and enough tasks for the workers.
  void LayoutDirect(Carver& c) {
    const BlocksConv& g = *p.conv;
    halo = (p.k / (g.kernel_w * g.channels) - 1) * g.dilation_h;
    strip_w = g.out_w + (g.kernel_w - 1) * g.dilation_w;
    images = p.tokens / (g.out_h * g.out_w);
    band_rows = Max(1, Min(g.out_h, 65536 / (g.channels * strip_w) - halo));
    const int64_t want_bands = CeilDiv(4 * rt.num_workers, Max(1, images));
    band_rows = Max(1, Min(band_rows, CeilDiv(g.out_h, want_bands)));
    bands = CeilDiv(g.out_h, band_rows);
    run_bands = Max(1, images * bands / (4 * rt.num_workers));
    // A tile reads up to a tile past its first token, and the last kernel
    // position reads (kernel_w - 1) dilation_w past the strip's last row.
    strip_ld = RoundUp((band_rows + halo) * strip_w + tile + (g.kernel_w - 1) * g.dilation_w +
                           Micro::Slack(), 16);
    region = g.channels * strip_ld;
    spans = c.Take<int64_t>(p.rows + 1);
    bounds = c.Take<int64_t>(p.rows + 1);
    offsets = c.Take<int64_t>(p.k);
    xt = c.Take<float>(region * rt.num_workers);
  }

  void Layout(Carver& c) {
    tile = Micro::TileTokens(p);
    direct = DirectApplies();
    if constexpr (ReadsOffsets<Micro>::value) {
      if (direct) {
        tile = Micro::DirectTileTokens(p);
        return LayoutDirect(c);
      }
    }
    by_tokens = rt.num_workers > 1 && p.nnz < kChunkBlocks * rt.num_workers && p.tokens > tile;
    // By tokens: about four token blocks per worker, so they balance.
    const int64_t want = by_tokens ? Min(kBlockTokens, CeilDiv(p.tokens, 4 * rt.num_workers))
                                   : kBlockTokens;
    block = RoundUp(want, tile);
    const int64_t count = Min(p.tokens, block);
    // Few tokens: rows of 4 floats keep xT in L1 (16 KB per token and 4096
    // inputs).
    ld = count < tile ? RoundUp(count, 4) : tile;
    spans = c.Take<int64_t>(p.rows + 1);
    bounds = c.Take<int64_t>(p.rows + 1);
    region = CeilDiv(count, ld) * p.k * ld + Micro::Slack() + kPackSlack;
    xt = c.Take<float>(region * (by_tokens ? rt.num_workers : 1));
    if constexpr (kPrepacks) weights = c.Take<uint16_t>(Micro::PrepackWords(p));
  }

  bool Prepacked() const {
    if constexpr (kPrepacks) {
      return Micro::PrepackWords(p) > 0;
    } else {
      return false;
    }
  }

  bool RunDirect() {
    FillOffsets();
    for (int64_t b = 0; b < p.batch; ++b) {
      const void* x = Offset(p.x, p.dtype, b * p.x_stride);
      const void* values = Offset(p.values, p.dtype, b * p.values_stride);
      const int32_t* indices = p.indices + b * p.indices_stride;
      RowSpans(p.indptr + b * p.indptr_stride, p.rows, p.nnz, spans);
      void* y = Offset(p.out, p.dtype, b * p.tokens * p.n_out);
      RunParallel(rt, CeilDiv(images * bands, run_bands), DirectJob{this, x, values, indices, y});
    }
    return true;
  }

  // Block row r of a token tile through the micro-kernel.
  void Row(int64_t r, const void* values, const int32_t* indices, const float* xt_tile,
           int64_t tokens, void* yr, int64_t outs) const {
    if constexpr (kPrepacks) {
      if (Prepacked()) {
        return Micro::TileRow(p, Micro::RowWeights(p, weights, r, spans[r]), indices, spans[r],
                              spans[r + 1], xt_tile, ld, tokens, yr, outs);
      }
    }
    Micro::Row(p, values, indices, spans[r], spans[r + 1], xt_tile, ld, tokens, yr, outs);
  }

  // Tokens [t0, t0 + count) of x, inputs [k0, k1), into the xT region at base.
  void Pack(const void* x, int64_t t0, int64_t count, int64_t k0, int64_t k1,
            float* base) const {
    for (int64_t a = 0; a * ld < count; ++a) {
      const int64_t first = t0 + a * ld, tokens = Min(ld, count - a * ld);
      float* tile_base = base + a * p.k * ld;
      if (p.conv != nullptr) {
        PackConv(*p.conv, x, first, tokens, k0, k1, tile_base);
        continue;
      }
      const auto rows = [&](int64_t t) { return Offset(x, p.dtype, (first + t) * p.k); };
      Micro::Pack(p, rows, tokens, ld, k0, k1, tile_base);
    }
  }

  void PackConv(const BlocksConv& g, const void* x, int64_t first, int64_t tokens, int64_t k0,
                int64_t k1, float* tile_base) const {
    PackConvFeatures(p.dtype, g, x, first, k0, k1, [&](const auto& rows, int64_t f0, int64_t f1) {
      Micro::Pack(p, rows, tokens, ld, f0, f1, tile_base);
    });
  }

  // The rows of one run for the token block packed at base (y at its first token).
  void Rows(int64_t run, const void* values, const int32_t* indices, void* y, int64_t count,
            const float* base) const {
    for (int64_t a = 0; a * ld < count; ++a) {
      const int64_t tokens = Min(ld, count - a * ld);
      const float* xt_tile = base + a * p.k * ld;
      for (int64_t r = bounds[run]; r < bounds[run + 1]; ++r) {
        const int64_t outs = Min(static_cast<int64_t>(p.n), p.n_out - r * p.n);
        void* yr = Offset(y, p.dtype, a * ld * p.n_out + r * p.n);
        Row(r, values, indices, xt_tile, tokens, yr, outs);
      }
    }
  }

  struct PackJob {
    const SpmmOp* op;
    const void* x;
    int64_t t0, count, k_step;
    void Run(int64_t i, int) const {
      const int64_t k0 = i * k_step, k1 = Min(op->p.k, k0 + k_step);
      op->Pack(x, t0, count, k0, k1, op->xt);
    }
  };

  struct RowJob {
    const SpmmOp* op;
    const void* values;
    const int32_t* indices;
    void* y;  // this token block's first token
    int64_t count;
    void Run(int64_t run, int) const { op->Rows(run, values, indices, y, count, op->xt); }
  };

  // The weights of every row of one run, laid out for the micro-kernel.
  struct PrepackJob {
    const SpmmOp* op;
    const void* values;
    const int32_t* indices;
    void Run(int64_t run, int) const {
      if constexpr (kPrepacks) {
        Micro::PrepackRows(op->p, values, indices, op->spans, op->bounds[run],
                           op->bounds[run + 1], op->weights);
      }
    }
  };

  // by_tokens: one token block, packed into the worker's own region, through every run.
  struct TokenJob {
    const SpmmOp* op;
    const void* x;
    const void* values;
    const int32_t* indices;
    void* y;
    int64_t runs;
    void Run(int64_t i, int worker) const {
      const BlocksProblem& p = op->p;
      const int64_t t0 = i * op->block, count = Min(op->block, p.tokens - t0);
      float* base = op->xt + worker * op->region;
      op->Pack(x, t0, count, 0, p.k, base);
      void* yt = Offset(y, p.dtype, t0 * p.n_out);
      for (int64_t run = 0; run < runs; ++run) op->Rows(run, values, indices, yt, count, base);
    }
  };

  // Input k = (position i, j; channel c) of the kernel: channel c's strip
  // row shifted by the position.
  void FillOffsets() const {
    const BlocksConv& g = *p.conv;
    for (int64_t kk = 0; kk < p.k; ++kk) {
      const int64_t pos = kk / g.channels, ch = kk % g.channels;
      const int64_t i = pos / g.kernel_w, j = pos % g.kernel_w;
      offsets[kk] = ch * strip_ld + i * g.dilation_h * strip_w + j * g.dilation_w;
    }
  }

  // A token's outputs of one block row: a copy of a constant size (one or two
  // vector moves, not a call) for a whole block of n in f32 or 16 bits.
  static void CopyOutputs(void* to, const void* from, int64_t bytes) {
    switch (bytes) {
      case 8:
        std::memcpy(to, from, 8);
        return;
      case 16:
        std::memcpy(to, from, 16);
        return;
      case 32:
        std::memcpy(to, from, 32);
        return;
      case 64:
        std::memcpy(to, from, 64);
        return;
      case 128:
        std::memcpy(to, from, 128);
        return;
      default:
        std::memcpy(to, from, bytes);
    }
  }

  // The bytes of x that band reads: whole input rows, contiguous in NHWC.
  struct Span {
    const char* from = nullptr;
    const char* to = nullptr;
  };
  Span BandInput(const void* x, int64_t band) const {
    const BlocksConv& g = *p.conv;
    const int64_t image = band / bands, oh0 = band % bands * band_rows;
    const int64_t rows_out = Min(band_rows, g.out_h - oh0);
    const int64_t ih0 = Max(0, oh0 - g.pad_top);
    const int64_t ih1 = Min(g.height, oh0 - g.pad_top + rows_out + halo);
    if (ih1 <= ih0) return {};
    const int64_t row = g.width * g.channels;
    return {static_cast<const char*>(Offset(x, p.dtype, (image * g.height + ih0) * row)),
            static_cast<const char*>(Offset(x, p.dtype, (image * g.height + ih1) * row))};
  }

  // A run of consecutive bands; each band's input is asked into L2 while the
  // previous band computes, so the reads from memory (the 6.4 MB of a
  // 56 x 56 x 64 layer's batch of 8, about 0.3 ms at 20 GB/s) overlap the
  // FMAs instead of stalling the next band's pack.
  struct DirectJob {
    const SpmmOp* op;
    const void* x;
    const void* values;
    const int32_t* indices;
    void* y;
    void Run(int64_t task, int worker) const {
      const int64_t first = task * op->run_bands;
      const int64_t end = Min(op->images * op->bands, first + op->run_bands);
      for (int64_t band = first; band < end; ++band) {
        Band(band, band + 1 < end ? op->BandInput(x, band + 1) : Span{}, worker);
      }
    }

    // One band of one image: its strip, then per tile of virtual tokens every
    // block row into a tile buffer, whose real tokens go to y.
    void Band(int64_t band, Span next, int worker) const {
      const BlocksProblem& p = op->p;
      const BlocksConv& g = *p.conv;
      const int64_t image = band / op->bands, oh0 = band % op->bands * op->band_rows;
      const int64_t rows_out = Min(op->band_rows, g.out_h - oh0);
      const int64_t sw = op->strip_w, ih0 = oh0 - g.pad_top;
      float* strip = op->xt + worker * op->region;
      const intptr_t bytes = ElementBytes(p.dtype);
      const auto pixel = [&](int64_t v) -> const void* {
        const int64_t ih = ih0 + v / sw, iw = v % sw - g.pad_left;
        if (ih < 0 || ih >= g.height || iw < 0 || iw >= g.width) return nullptr;
        return Offset(x, p.dtype, ((image * g.height + ih) * g.width + iw) * g.channels);
      };
      // Zero past the strip's rows too: the tiles' slack reads there.
      Micro::Pack(p, pixel, (rows_out + op->halo) * sw, op->strip_ld, 0, g.channels, strip);
      // The tile buffer: a tile's tokens x n outputs, n apart.
      BlocksProblem in_tile = p;
      in_tile.n_out = p.n;
      alignas(64) float tile_y[kMaxTileOutputs];
      const int64_t virtual_tokens = (rows_out - 1) * sw + g.out_w;
      const int64_t first_token = (image * g.out_h + oh0) * g.out_w;
      // The next band's lines, spread evenly over this band's tiles.
      const int64_t tiles = p.rows * CeilDiv(virtual_tokens, op->tile);
      const int64_t lines_per_tile = CeilDiv(CeilDiv(next.to - next.from, 64), tiles);
      // Rows outside, tiles inside: a row's weights (9 KB for 144 blocks of
      // 16 f32) stay in L1 while the strip streams from L2; the other way
      // round the weights of every row (36 KB for 64 outputs of a 3 x 3 x 64
      // kernel at 25%) and a tile's strip lines (24 KB) overflowed L1.
      for (int64_t r = 0; r < p.rows; ++r) {
        const int64_t outs = Min(static_cast<int64_t>(p.n), p.n_out - r * p.n);
        for (int64_t v0 = 0; v0 < virtual_tokens; v0 += op->tile) {
          const int64_t count = Min(op->tile, virtual_tokens - v0);
          Micro::RowAt(in_tile, values, indices, op->spans[r], op->spans[r + 1], strip,
                       op->offsets, v0, count, tile_y, outs);
          const int64_t row_bytes = outs * bytes;
          for (int64_t t = 0; t < count; ++t) {
            const int64_t row = (v0 + t) / sw, column = (v0 + t) % sw;
            if (column >= g.out_w) continue;  // A strip column past the output row.
            const int64_t token = first_token + row * g.out_w + column;
            CopyOutputs(Offset(y, p.dtype, token * p.n_out + r * p.n),
                        Offset(tile_y, p.dtype, t * p.n), row_bytes);
          }
          for (int64_t l = 0; l < lines_per_tile && next.from < next.to; ++l, next.from += 64) {
            __builtin_prefetch(next.from, 0, 2);  // locality 2: prefetcht1, into L2
          }
        }
      }
    }
  };

  bool operator()() {
    if (!TakeScratch(rt, *this)) return false;
    if constexpr (ReadsOffsets<Micro>::value) {
      if (direct) return RunDirect();
    }
    const int64_t count0 = Min(p.tokens, block);
    // The slack a last tile may read: padding tokens, never stored; zeroed so
    // they hold no stale bits.
    for (int64_t w = 0; w < (by_tokens ? rt.num_workers : 1); ++w) {
      std::memset(xt + w * region + CeilDiv(count0, ld) * p.k * ld, 0,
                  sizeof(float) * (Micro::Slack() + kPackSlack));
    }
    for (int64_t b = 0; b < p.batch; ++b) {
      const void* x = Offset(p.x, p.dtype, b * p.x_stride);
      const void* values = Offset(p.values, p.dtype, b * p.values_stride);
      const int32_t* indices = p.indices + b * p.indices_stride;
      RowSpans(p.indptr + b * p.indptr_stride, p.rows, p.nnz, spans);
      const int64_t runs = RowRuns(spans, p.rows, kChunkBlocks, bounds);
      if (Prepacked()) RunParallel(rt, runs, PrepackJob{this, values, indices});
      void* y = Offset(p.out, p.dtype, b * p.tokens * p.n_out);
      if (by_tokens) {
        RunParallel(rt, CeilDiv(p.tokens, block), TokenJob{this, x, values, indices, y, runs});
        continue;
      }
      for (int64_t t0 = 0; t0 < p.tokens; t0 += block) {
        const int64_t count = Min(block, p.tokens - t0);
        // A few tokens pack in microseconds: a parallel job would cost more.
        const int64_t k_step = count <= 16 ? p.k : Max(64, CeilDiv(p.k, 8));
        const PackJob pack{this, x, t0, count, k_step};
        if (k_step == p.k) {
          pack.Run(0, 0);
        } else {
          RunParallel(rt, CeilDiv(p.k, k_step), pack);
        }
        RunParallel(rt, runs,
                    RowJob{this, values, indices, Offset(y, p.dtype, t0 * p.n_out), count});
      }
    }
    return true;
  }
};

// ---------------------------------------------------------------- spmm_t
// Blocks [b0, b1) of one row into dxT: block p adds sum_j dyr[j][:] * v[p][j]
// to dxT[k_p][:] (tokens in the lanes). Four blocks at a time: each row of
// dyr loaded once feeds four independent sums, so the FMAs do not wait on
// one chain (the padding outputs' rows of dyr are zero).
constexpr int kBlocksAtOnceT = 4;

template <int kN>
void AddRowT(const BlocksProblem& p, const void* values, const int32_t* indices, int64_t b0,
             int64_t b1, const float* rows, float* acc) {
  const uint64_t k = static_cast<uint64_t>(p.k);
  for (int64_t b = b0; b < b1; b += kBlocksAtOnceT) {
    const int count = static_cast<int>(Min(kBlocksAtOnceT, b1 - b));
    float w[kBlocksAtOnceT][kN] = {};
    for (int i = 0; i < count; ++i) {
      for (int j = 0; j < kN; ++j) w[i][j] = LoadAs(p.dtype, values, (b + i) * kN + j);
    }
    float sum[kBlocksAtOnceT][kTokensT] = {};
#pragma GCC unroll 4
    for (int j = 0; j < kN; ++j) {
#pragma GCC unroll 4
      for (int i = 0; i < kBlocksAtOnceT; ++i) {
#pragma GCC unroll 16
        for (int t = 0; t < kTokensT; ++t) sum[i][t] += rows[j * kTokensT + t] * w[i][j];
      }
    }
    for (int i = 0; i < count; ++i) {
      const uint32_t input = static_cast<uint32_t>(indices[b + i]);
      if (input >= k) continue;  // Untrusted structure: a block outside dx adds nothing.
      float* dst = acc + static_cast<int64_t>(input) * kTokensT;
      for (int t = 0; t < kTokensT; ++t) dst[t] += sum[i][t];
    }
  }
}

// dx = dy @ W^T. A task owns a tile of kTokensT tokens: per block row it
// gathers the row's dy columns for its tokens (dyr [n][tile]), then every
// block adds sum_j dyr[j][:] * v[p][j] to dxT[k_p][:]: tokens in the lanes.
template <class Back>
struct SpmmTOp {
  const BlocksProblem& p;
  const Runtime& rt;
  int64_t* spans = nullptr;
  int64_t* bounds = nullptr;  // the row runs of a single token tile's split
  float* dxt = nullptr;  // [workers][K][kTokensT]
  float* dyr = nullptr;  // [workers][32][kTokensT]

  void Layout(Carver& c) {
    spans = c.Take<int64_t>(p.rows + 1);
    bounds = c.Take<int64_t>(Max(p.rows, static_cast<int64_t>(rt.num_workers)) + 1);
    dxt = c.Take<float>(static_cast<int64_t>(rt.num_workers) * p.k * kTokensT);
    dyr = c.Take<float>(static_cast<int64_t>(rt.num_workers) * 32 * kTokensT);
  }

  // Rows [r0, r1) of tokens [t0, t0 + count) into dxT slot `slot` (a
  // worker's, or a split's run's).
  void AddRows(int64_t r0, int64_t r1, const void* dy, const void* values,
               const int32_t* indices, int64_t t0, int64_t count, int slot) const {
    float* acc = dxt + static_cast<int64_t>(slot) * p.k * kTokensT;
    float* rows = dyr + static_cast<int64_t>(slot) * 32 * kTokensT;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b0 = spans[r], b1 = spans[r + 1];
      if (b0 == b1) continue;
      const int64_t outs = Min(static_cast<int64_t>(p.n), p.n_out - r * p.n);
      Back::LoadColumnsT(p, Offset(dy, p.dtype, t0 * p.n_out + r * p.n), count, outs, rows);
      Back::AddRowT(p, values, indices, b0, b1, rows, acc);
    }
  }

  struct Job {
    const SpmmTOp* op;
    const void* dy;
    const void* values;
    const int32_t* indices;
    void* dx;
    void Run(int64_t tile, int worker) const {
      const BlocksProblem& p = op->p;
      const int64_t t0 = tile * kTokensT, count = Min(kTokensT, p.tokens - t0);
      float* acc = op->dxt + static_cast<int64_t>(worker) * p.k * kTokensT;
      std::memset(acc, 0, sizeof(float) * p.k * kTokensT);
      op->AddRows(0, p.rows, dy, values, indices, t0, count, worker);
      Back::StoreDx(p, acc, count, Offset(dx, p.dtype, t0 * p.k));
    }
  };

  // One token tile (a decode step's few tokens) would leave every worker but
  // one idle while it streams all the values: the rows are split into runs
  // instead, each worker sums its runs into its own dxT, and the dxTs are
  // added before the store.
  struct SplitJob {
    const SpmmTOp* op;
    const void* dy;
    const void* values;
    const int32_t* indices;
    // Run r sums into dxT slot r, whichever thread runs it: the slots are then
    // added in a fixed order, so the result does not depend on the schedule.
    void Run(int64_t run, int) const {
      op->AddRows(op->bounds[run], op->bounds[run + 1], dy, values, indices, 0, op->p.tokens,
                  static_cast<int>(run));
    }
  };

  void SplitRows(const void* dy, const void* values, const int32_t* indices, void* dx) const {
    const int64_t size = p.k * kTokensT;
    const int64_t runs = rt.num_workers;  // One dxT slot per run (the scratch has one per worker).
    std::memset(dxt, 0, sizeof(float) * size * runs);
    EvenRowRuns(spans, p.rows, runs, bounds);
    RunParallel(rt, runs, SplitJob{this, dy, values, indices});
    for (int64_t r = 1; r < runs; ++r) {
      const float* other = dxt + r * size;
      for (int64_t i = 0; i < size; ++i) dxt[i] += other[i];
    }
    Back::StoreDx(p, dxt, p.tokens, dx);
  }

  bool operator()() {
    if (!TakeScratch(rt, *this)) return false;
    for (int64_t b = 0; b < p.batch; ++b) {
      RowSpans(p.indptr + b * p.indptr_stride, p.rows, p.nnz, spans);
      const void* dy = Offset(p.dy, p.dtype, b * p.dy_stride);
      const void* values = Offset(p.values, p.dtype, b * p.values_stride);
      const int32_t* indices = p.indices + b * p.indices_stride;
      void* dx = Offset(p.out, p.dtype, b * p.tokens * p.k);
      if (p.tokens <= kTokensT && rt.num_workers > 1) {
        SplitRows(dy, values, indices, dx);
        continue;
      }
      RunParallel(rt, CeilDiv(p.tokens, kTokensT), Job{this, dy, values, indices, dx});
    }
    return true;
  }
};

// ---------------------------------------------------------------- sddmm
// Blocks [b0, b1) of one row: dv[p][:] = sum_t xT[k_p][t] * dyr[t][:]
// (outputs in the lanes). Eight blocks at a time: each token's row of dyr,
// loaded once, feeds eight independent sums (one chain would wait on the
// FMA latency at every token).
constexpr int kBlocksAtOnce = 8;

template <int kN>
void SampleRow(const BlocksProblem& p, const float* xt, const int32_t* indices, int64_t b0,
               int64_t b1, const float* rows, void* dv) {
  const uint64_t k = static_cast<uint64_t>(p.k);
  const int64_t tokens = p.tokens;
  for (int64_t b = b0; b < b1; b += kBlocksAtOnce) {
    const int count = static_cast<int>(Min(kBlocksAtOnce, b1 - b));
    const float* xs[kBlocksAtOnce];
    for (int i = 0; i < kBlocksAtOnce; ++i) {
      const uint32_t input = i < count ? static_cast<uint32_t>(indices[b + i]) : 0u;
      // Untrusted structure: a block outside x reads the zero row past xT.
      xs[i] = xt + static_cast<int64_t>(i < count && input < k ? input : k) * tokens;
    }
    float sum[kBlocksAtOnce][kN] = {};
    for (int64_t t = 0; t < tokens; ++t) {
      const float* dyr = rows + t * kN;
#pragma GCC unroll 8
      for (int i = 0; i < kBlocksAtOnce; ++i) {
        const float xv = xs[i][t];
#pragma GCC unroll 32
        for (int j = 0; j < kN; ++j) sum[i][j] += xv * dyr[j];
      }
    }
    for (int i = 0; i < count; ++i) {
      for (int j = 0; j < kN; ++j) StoreAs(p.dtype, dv, (b + i) * kN + j, sum[i][j]);
    }
  }
}

// dv[p, j] = sum_t x[t, k_p] dy[t, r n + j]. x is transposed once per batch
// entry (xT [K][T], so a block's tokens are contiguous); a task owns a run of
// block rows and packs each row's dy columns (dyr [T][n]) before its blocks.
template <class Back>
struct SddmmOp {
  const BlocksProblem& p;
  const Runtime& rt;
  int64_t* spans = nullptr;
  int64_t* bounds = nullptr;
  float* xt = nullptr;   // [K][T]
  float* dyr = nullptr;  // [workers][T][32]

  void Layout(Carver& c) {
    spans = c.Take<int64_t>(p.rows + 1);
    bounds = c.Take<int64_t>(p.rows + 1);
    xt = c.Take<float>((p.k + 1) * p.tokens);  // A zero row past the last input.
    dyr = c.Take<float>(static_cast<int64_t>(rt.num_workers) * p.tokens * 32);
  }

  struct PackJob {
    const SddmmOp* op;
    const void* x;
    int64_t k_step;
    void Run(int64_t i, int) const {
      const BlocksProblem& p = op->p;
      const int64_t k0 = i * k_step, k1 = Min(p.k, k0 + k_step);
      if (p.conv != nullptr) {  // x is the images: the patches gathered, never stored.
        return PackConvFeatures(p.dtype, *p.conv, x, 0, k0, k1,
                                [&](const auto& rows, int64_t f0, int64_t f1) {
                                  Back::Pack(p.dtype, rows, p.tokens, p.tokens, f0, f1, op->xt);
                                });
      }
      const auto rows = [&](int64_t t) { return Offset(x, p.dtype, t * p.k); };
      Back::Pack(p.dtype, rows, p.tokens, p.tokens, k0, k1, op->xt);
    }
  };

  struct Job {
    const SddmmOp* op;
    const void* dy;
    const int32_t* indices;
    void* dv;
    void Run(int64_t run, int worker) const {
      const BlocksProblem& p = op->p;
      const int64_t n = p.n, tokens = p.tokens;
      float* rows = op->dyr + static_cast<int64_t>(worker) * tokens * 32;
      for (int64_t r = op->bounds[run]; r < op->bounds[run + 1]; ++r) {
        const int64_t b0 = op->spans[r], b1 = op->spans[r + 1];
        if (b0 == b1) continue;
        const int64_t outs = Min(n, p.n_out - r * n);
        Back::PackColumns(p, Offset(dy, p.dtype, r * n), tokens, outs, rows);
        Back::SampleRow(p, op->xt, indices, b0, b1, rows, dv);
      }
    }
  };

  bool operator()() {
    if (!TakeScratch(rt, *this)) return false;
    for (int64_t b = 0; b < p.batch; ++b) {
      void* dv = Offset(p.out, p.dtype, b * p.nnz * p.n);
      // Blocks outside every row (malformed indptr) get 0.
      for (int64_t i = 0; i < p.nnz * p.n; ++i) StoreAs(p.dtype, dv, i, 0.0f);
      const int64_t k_step = Max(64, CeilDiv(p.k, 8));
      RunParallel(rt, CeilDiv(p.k, k_step),
                  PackJob{this, Offset(p.x, p.dtype, b * p.x_stride), k_step});
      std::memset(xt + p.k * p.tokens, 0, sizeof(float) * p.tokens);
      RowSpans(p.indptr + b * p.indptr_stride, p.rows, p.nnz, spans);
      // Few blocks (a convolution's 64 filters are 4 block rows of n = 16) would all sit in
      // one 4096-block task with the other workers idle: runs of fewer blocks then, about four
      // per worker (a run is still at least one row).
      const int64_t target = Min(kChunkBlocks, Max(1, CeilDiv(p.nnz, 4 * rt.num_workers)));
      const int64_t runs = RowRuns(spans, p.rows, target, bounds);
      RunParallel(rt, runs, Job{this, Offset(p.dy, p.dtype, b * p.dy_stride),
                                p.indices + b * p.indices_stride, dv});
    }
    return true;
  }
};

template <class Op>
bool Run(const BlocksProblem& p, const Runtime& rt) {
  if (p.tokens == 0 || p.batch == 0) return true;
  Op op{p, rt};
  return op();
}

template <class Back>
bool RunSddmm(const BlocksProblem& p, const Runtime& rt) {
  if (p.batch == 0) return true;
  if (p.tokens == 0) {  // An empty sum: dv is 0.
    for (int64_t i = 0; i < p.batch * p.nnz * p.n; ++i) StoreAs(p.dtype, p.out, i, 0.0f);
    return true;
  }
  SddmmOp<Back> op{p, rt};
  return op();
}

// The backward ops' inner loops for any ISA: plain loops over constant trip
// counts, left to the compiler's vectoriser.
struct PortableBack {
  // spmm_t's dyr [n][kTokensT]: the n columns of dy from `dy` (token 0's first
  // output, N per token) for `count` tokens, zero past `outs` and `count`.
  static void LoadColumnsT(const BlocksProblem& p, const void* dy, int64_t count, int64_t outs,
                           float* rows) {
    for (int64_t j = 0; j < p.n; ++j) {
      for (int64_t t = 0; t < kTokensT; ++t) {
        rows[j * kTokensT + t] = (j < outs && t < count) ? LoadAs(p.dtype, dy, t * p.n_out + j)
                                                         : 0.0f;
      }
    }
  }
  // The sddmm's dyr [T][n]: the n columns of dy from `dy` (token 0's first
  // output) for every token, zero past `outs`.
  static void PackColumns(const BlocksProblem& p, const void* dy, int64_t tokens, int64_t outs,
                          float* rows) {
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t j = 0; j < p.n; ++j) {
        rows[t * p.n + j] = j < outs ? LoadAs(p.dtype, dy, t * p.n_out + j) : 0.0f;
      }
    }
  }
  // spmm_t's dxT [K][kTokensT] to dx (token 0's row, K per token), `count` tokens.
  static void StoreDx(const BlocksProblem& p, const float* acc, int64_t count, void* dx) {
    for (int64_t t = 0; t < count; ++t) {
      for (int64_t k = 0; k < p.k; ++k) StoreAs(p.dtype, dx, t * p.k + k, acc[k * kTokensT + t]);
    }
  }
  // Tokens' rows (rows(t)) as f32 xT [k][ld] for features [k0, k1): the sddmm's x.
  template <class Rows>
  static void Pack(Dtype dtype, const Rows& rows, int64_t count, int64_t ld, int64_t k0,
                   int64_t k1, float* xt) {
    PackRowsScalar(dtype, rows, count, ld, k0, k1, xt);
  }
  static void AddRowT(const BlocksProblem& p, const void* values, const int32_t* indices,
                      int64_t b0, int64_t b1, const float* rows, float* acc) {
    switch (p.n) {
      case 4:
        return JAXSPARSE_BLOCKS_ISA::AddRowT<4>(p, values, indices, b0, b1, rows, acc);
      case 8:
        return JAXSPARSE_BLOCKS_ISA::AddRowT<8>(p, values, indices, b0, b1, rows, acc);
      case 16:
        return JAXSPARSE_BLOCKS_ISA::AddRowT<16>(p, values, indices, b0, b1, rows, acc);
      default:
        return JAXSPARSE_BLOCKS_ISA::AddRowT<32>(p, values, indices, b0, b1, rows, acc);
    }
  }
  static void SampleRow(const BlocksProblem& p, const float* xt, const int32_t* indices,
                        int64_t b0, int64_t b1, const float* rows, void* dv) {
    switch (p.n) {
      case 4:
        return JAXSPARSE_BLOCKS_ISA::SampleRow<4>(p, xt, indices, b0, b1, rows, dv);
      case 8:
        return JAXSPARSE_BLOCKS_ISA::SampleRow<8>(p, xt, indices, b0, b1, rows, dv);
      case 16:
        return JAXSPARSE_BLOCKS_ISA::SampleRow<16>(p, xt, indices, b0, b1, rows, dv);
      default:
        return JAXSPARSE_BLOCKS_ISA::SampleRow<32>(p, xt, indices, b0, b1, rows, dv);
    }
  }
};

template <class Micro, class Back = PortableBack>
constexpr BlocksKernelTable MakeTable() {
  return BlocksKernelTable{&Run<SpmmOp<Micro>>, &Run<SpmmTOp<Back>>, &RunSddmm<Back>};
}

}  // namespace JAXSPARSE_BLOCKS_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_BLOCKS_BLOCKS_KERNELS_H_
