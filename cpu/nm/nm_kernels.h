// The N:M kernel bodies, written once and instantiated per instruction set.
//
// Each nm_kernels_<isa>.cc defines, inside namespace jaxsparse::cpu::<isa>, a
// `Traits` class (vector type and a handful of operations), defines
// JAXSPARSE_NM_ISA to <isa> and includes this header. Everything here lives in
// that per-ISA namespace so the three copies, each compiled with different -m
// flags, never share a symbol (a shared inline copy could carry AVX-512 code to
// a CPU without it). For the same reason this code avoids std:: templates that
// generate out-of-line code.
//
// Traits provides:
//   kWidth    floats per vector (a multiple of 8)
//   kMaxVecs  vectors of tokens in a full token tile
//   kChains   independent FMA chains needed to hide FMA latency
//             (latency x FMA pipes)
//   kAccRegs  vector registers the accumulators may take
//   V, Zero, Load, Store, Fma(a, b, c) = a * b + c, Add,
//   Broadcast(p): *p in every lane,
//   Broadcast4 / Broadcast4Bf16 / Broadcast4F16(p, v[4]): v[e] = f32(p[e])
//     in every lane, from one load of the four values,
//   SumLanes(acc[kWidth]) -> lane q holds the sum of the lanes of acc[q].
//
// Layouts. All arithmetic is f32. A dense operand ([T, K] x or [T, N] dy) is
// packed transposed per token tile: row r of a tile holds the tile's tokens of
// column r, zero padded to a whole number of vectors, so every inner loop works
// on whole vectors of tokens. The rows of x come in blocks of whole groups
// sized for L1 (Blocks); each block is followed by a zero row, which entries
// with an index >= m read, so they contribute zeros without a branch.
//
// Entries are read 4 at a time, straight from `indices` and `values`: the
// inner loops issue one vector load per FMA (the x or dx operand), so loads,
// not FMAs, are the limit (two per cycle on current x86 cores). Fetching four
// indices with one 4-byte load and four values with one broadcast load (then
// in-register shuffles) keeps the extra loads at 0.75 per entry; the rows come
// from the indices by 64-bit SWAR arithmetic on the otherwise idle integer
// ALUs (QuadRows). No per-block preprocessing pass is needed, except in
// spmm_t over several token tiles, which first sorts the entries by column
// (ColumnLists) so that dx rows are summed in registers rather than updated
// in memory (see SpmmT).
#ifndef JAXSPARSE_CPU_NM_KERNELS_H_
#define JAXSPARSE_CPU_NM_KERNELS_H_

#ifndef JAXSPARSE_NM_ISA
#error "define JAXSPARSE_NM_ISA (the namespace of this instantiation) first"
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/common/dtype_convert.h"
#include "cpu/nm/nm_kernels_api.h"

#define JAXSPARSE_KERNEL_ISA JAXSPARSE_NM_ISA
#include "cpu/common/kernel_util.h"

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_NM_ISA {

// The block of packed rows an inner loop reads (or, in spmm_t, updates) stays
// in L1: 32 KB leaves room in a 48 KB L1d (Zen 4/5, Golden Cove) for the
// partial sums, entries and streamed weights; 64 rows of a 128-token tile.
constexpr int64_t kL1BlockBytes = 32 * 1024;
// Caps the rows of a block (narrow tiles), so row numbers fit 16-bit lanes.
constexpr int64_t kMaxBlockRows = 256;
// Entries per block are fewer than rows (n < m); group bases are kept for the
// entries rounded up to whole reduction groups (kWidth <= 16).
constexpr int64_t kMaxGroupBase = kMaxBlockRows + 16;
// Token tiles are packed a chunk at a time so the scratch memory of a call
// stays bounded (and the chunk stays in a shared L3) whatever T is.
constexpr int64_t kChunkBytes = int64_t{16} << 20;
// Output rows per spmm task (partial sums: rows x tile width floats, in L2)
// and per sddmm task. Larger blocks reuse each L1 block of x more often.
constexpr int64_t kSpmmRowsPerTask = 128;
constexpr int64_t kSddmmRowsPerTask = 64;
constexpr int64_t kPackRowsPerTask = 256;
constexpr int kMaxRowsPerPass = 4;

// Nothing for bytes <= 0. kLocality 3 fetches into L1, 2 into L2.
template <int kLocality = 3>
void PrefetchBytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += kCacheLine) {
    __builtin_prefetch(c + i, 0, kLocality);
  }
}

// Four entries' rows within their block, computed from their indices (one
// 4-byte load) and group bases (one 8-byte load) in four 16-bit lanes of a
// 64-bit word: row = base + index, or zero_row where index >= m. Memory order
// is used for both loads, so lane e is entry e on either endianness.
class QuadRows {
 public:
  QuadRows(int32_t m, int64_t zero_row)
      : bias_(static_cast<uint64_t>(0x8000 - m) * kLanes),
        zero_(static_cast<uint64_t>(zero_row) * kLanes) {}

  uint64_t Rows(const uint8_t* idx, const uint16_t* base) const {
    uint32_t i4;
    std::memcpy(&i4, idx, sizeof(i4));
    uint64_t w = i4;  // Spread the 4 bytes to 4 16-bit lanes.
    w = (w | (w << 16)) & 0x0000ffff0000ffffull;
    w = (w | (w << 8)) & 0x00ff00ff00ff00ffull;
    // Lane + 0x8000 - m has its top bit set iff lane >= m (no carries: lanes
    // are < 256). The top bits become all-ones lane masks.
    const uint64_t invalid = ((w + bias_) >> 15) & kLanes;
    const uint64_t mask = invalid * 0xffff;
    uint64_t b;
    std::memcpy(&b, base, sizeof(b));
    return ((b + w) & ~mask) | (zero_ & mask);
  }

  static int64_t At(uint64_t q, int e) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return static_cast<int64_t>((q >> (48 - 16 * e)) & 0xffff);
#else
    return static_cast<int64_t>((q >> (16 * e)) & 0xffff);
#endif
  }

 private:
  static constexpr uint64_t kLanes = 0x0001000100010001ull;
  uint64_t bias_;
  uint64_t zero_;
};

// The last, partial quad of a row's entries copied out (reading it in place
// could run past the arrays), padded with invalid indices and zero values.
template <class S>
struct TailQuad {
  uint8_t idx[4] = {0xff, 0xff, 0xff, 0xff};
  S vals[4] = {};
  TailQuad(const uint8_t* i, const S* v, int64_t count) {
    for (int64_t e = 0; e < count && e < 4; ++e) {
      idx[e] = i[e];
      if (v != nullptr) vals[e] = v[e];
    }
  }
};

// ------------------------------------------------------------------ dtypes

template <class Tr>
struct F32 {
  using Storage = float;
  static float ToF32(float v) { return v; }
  static float FromF32(float v) { return v; }
  static void Broadcast4(const float* p, typename Tr::V* v) {
    Tr::Broadcast4(p, v);
  }
};

template <class Tr>
struct BF16 {
  using Storage = uint16_t;
  static float ToF32(uint16_t h) { return Bf16ToF32(h); }
  static uint16_t FromF32(float v) { return F32ToBf16(v); }
  static void Broadcast4(const uint16_t* p, typename Tr::V* v) {
    Tr::Broadcast4Bf16(p, v);
  }
};

template <class Tr>
struct F16 {
  using Storage = uint16_t;
  static float ToF32(uint16_t h) { return F16ToF32(h); }
  static uint16_t FromF32(float v) { return F32ToF16(v); }
  static void Broadcast4(const uint16_t* p, typename Tr::V* v) {
    Tr::Broadcast4F16(p, v);
  }
};

template <class D>
constexpr bool kIsF32 = std::is_same_v<typename D::Storage, float>;

// x [T, K] as f32 rows of `stride` floats, zero padded past K (the row
// kernels' tables read past K).
template <class D>
void PackRowsF32(const typename D::Storage* x, int64_t tokens, int64_t k, int64_t stride,
                 float* xs) {
  for (int64_t t = 0; t < tokens; ++t) {
    float* row = xs + t * stride;
    const typename D::Storage* src = x + t * k;
    for (int64_t i = 0; i < k; ++i) row[i] = D::ToF32(src[i]);
    std::memset(row + k, 0, (stride - k) * sizeof(float));
  }
}

// ------------------------------------------------------------------ tiling

// Tokens are cut into tiles of kMaxVecs vectors; the last tile is only as many
// vectors wide as it needs (so T = 1 runs a 1-vector kernel, not a full one).
template <class Tr>
struct TokenTiles {
  static constexpr int64_t kFullWidth = int64_t{Tr::kMaxVecs} * Tr::kWidth;
  int64_t tokens = 0;
  int64_t count = 0;
  int last_vecs = 0;

  explicit TokenTiles(int64_t t) : tokens(t), count(CeilDiv(t, kFullWidth)) {
    const int64_t rest = t - (count - 1) * kFullWidth;
    last_vecs = static_cast<int>(CeilDiv(rest, Tr::kWidth));
  }
  int Vecs(int64_t i) const { return i + 1 < count ? Tr::kMaxVecs : last_vecs; }
  int64_t Width(int64_t i) const { return int64_t{Vecs(i)} * Tr::kWidth; }
  int64_t Begin(int64_t i) const { return i * kFullWidth; }
  int64_t Valid(int64_t i) const { return Min(kFullWidth, tokens - Begin(i)); }
};

// The K dimension in blocks of whole groups whose rows of a packed tile
// `width` floats wide fill about kL1BlockBytes. In packed x each block of
// `rows` rows is followed by its zero row (row number `rows`).
struct Blocks {
  int64_t groups = 0;  // Per block.
  int64_t rows = 0;    // groups * m.
  int64_t count = 0;

  Blocks(int64_t width, int64_t num_groups, int32_t m) {
    const int64_t fit = Min(kMaxBlockRows, kL1BlockBytes / (width * 4));
    groups = Max(1, fit / m);
    rows = groups * m;
    count = CeilDiv(num_groups, groups);
  }
  int64_t Stride() const { return rows + 1; }
  int64_t PackedRows() const { return count * Stride(); }
};

// The largest packed tile (over the tile widths) of `rows_for(width)` rows.
template <class Tr, class F>
int64_t MaxTileFloats(F rows_for) {
  int64_t most = 0;
  for (int v = 1; v <= Tr::kMaxVecs; ++v) {
    const int64_t width = int64_t{v} * Tr::kWidth;
    most = Max(most, rows_for(width) * width);
  }
  return most;
}

// Which token tiles are packed together; every tile of a chunk occupies
// `tile_floats` floats of the packed buffer.
struct Chunking {
  int64_t tile_floats = 0;
  int64_t tiles_per_chunk = 1;
  int64_t num_chunks = 0;

  Chunking(int64_t max_tile_floats, int64_t num_tiles)
      : tile_floats(RoundUp(max_tile_floats, kCacheLine / 4)) {
    tiles_per_chunk = Max(1, kChunkBytes / Max(1, tile_floats * 4));
    tiles_per_chunk = Min(tiles_per_chunk, Max(1, num_tiles));
    num_chunks = CeilDiv(num_tiles, tiles_per_chunk);
  }
  int64_t First(int64_t c) const { return c * tiles_per_chunk; }
  int64_t Count(int64_t c, int64_t num_tiles) const {
    return Min(tiles_per_chunk, num_tiles - First(c));
  }
};

// Accumulator rows sharing one pass over the entries: enough independent FMA
// chains to hide the FMA latency, within the register budgets: vector
// registers for the sums, and general registers for each row's index and
// value streams and its next quad of rows (3 each; x86-64 has 15 to spare,
// and 8 rows measured 2x slower than 4 from the spills).
template <class Tr>
constexpr int RowsFor(int vecs) {
  const int want = (Tr::kChains + vecs - 1) / vecs;
  const int cap = Tr::kAccRegs / vecs;
  int rows = want < cap ? want : cap;
  rows = rows < kMaxRowsPerPass ? rows : kMaxRowsPerPass;
  return rows < 1 ? 1 : rows;
}

// ------------------------------------------------------------------ packing

// Packs the transpose of src [T, cols] (dtype D) for the tiles of one chunk
// into each tile's slot, after `row_shift` rows: `cols` rows of the tile's
// width, or, with `blocked`, the Blocks layout of x (a zero row after every
// block). Rows >= cols and tokens >= T are zero. A task is (tile, row range).
template <class Tr, class D>
struct PackJob {
  using S = typename D::Storage;
  const S* src;
  int64_t cols;
  int64_t row_shift;
  bool blocked;
  int64_t num_groups;
  int32_t m;
  const TokenTiles<Tr>* tiles;
  int64_t first_tile;
  float* dst;
  int64_t tile_floats;
  int64_t row_tasks;  // Per tile, for the widest tile.

  int64_t PackedRows(int64_t width) const {
    return blocked ? Blocks(width, num_groups, m).PackedRows() : cols;
  }

  void Run(int64_t task, int /*worker*/) const {
    const int64_t rel = task / row_tasks;
    const int64_t tile = first_tile + rel;
    const int64_t width = tiles->Width(tile), valid = tiles->Valid(tile);
    const int64_t r0 = (task % row_tasks) * kPackRowsPerTask;
    const int64_t r1 = Min(PackedRows(width), r0 + kPackRowsPerTask);
    const S* s = src + tiles->Begin(tile) * cols;
    float* out = dst + rel * tile_floats + row_shift * width;
    // Transposes squares of up to 16 rows x kWidth tokens through a local
    // buffer: each source line is read once, and the strided walks a plain
    // row-by-row transpose makes (one line per token, all in one L1 set when
    // cols * 4 is a multiple of 4 KB) are avoided.
    constexpr int kSq = 16;
    for (int64_t r = r0; r < r1; r += kSq) {
      const int rn = static_cast<int>(Min(kSq, r1 - r));
      int64_t col[kSq];
      for (int k = 0; k < rn; ++k) col[k] = SourceColumn(r + k, width);
      // f32 squares of 16 consecutive columns by 16 tokens move in registers
      // (a 1440 x 1536 x at 2:4 took 0.81 ms element by element beside a 3.8
      // ms product, 2-core Zen 5).
      const bool square = rn == kSq && col[kSq - 1] == col[0] + kSq - 1 && col[kSq - 1] < cols;
      for (int64_t t0 = 0; t0 < width; t0 += Tr::kWidth) {
        if constexpr (std::is_same_v<S, float> && Tr::kSquare == kSq && Tr::kWidth == kSq) {
          if (square && t0 + kSq <= valid) {
            Tr::TransposeSquare(s + t0 * cols + col[0], cols, out + r * width + t0, width);
            continue;
          }
        }
        float sq[kSq][Tr::kWidth];
        for (int tt = 0; tt < Tr::kWidth; ++tt) {
          const bool live = t0 + tt < valid;
          const S* row = live ? s + (t0 + tt) * cols : s;
          for (int k = 0; k < rn; ++k) {
            sq[k][tt] = live && col[k] < cols ? D::ToF32(row[col[k]]) : 0.0f;
          }
        }
        for (int k = 0; k < rn; ++k) {
          std::memcpy(out + (r + k) * width + t0, sq[k], sizeof(sq[k]));
        }
      }
    }
  }

  // The column of src packed into row r (cols, i.e. none, for a zero row).
  int64_t SourceColumn(int64_t r, int64_t width) const {
    if (!blocked) return r;
    const Blocks blocks(width, num_groups, m);
    const int64_t in_block = r % blocks.Stride();
    return in_block < blocks.rows ? r / blocks.Stride() * blocks.rows + in_block
                                  : cols;
  }
};

template <class Tr, class D>
void Pack(const NmRuntime& rt, const typename D::Storage* src, int64_t cols,
          int64_t row_shift, bool blocked, int64_t num_groups, int32_t m,
          const TokenTiles<Tr>& tiles, const Chunking& chunking, int64_t chunk,
          float* dst) {
  PackJob<Tr, D> job{src,        cols,
                     row_shift,  blocked,
                     num_groups, m,
                     &tiles,     chunking.First(chunk),
                     dst,        chunking.tile_floats,
                     0};
  int64_t most_rows = 0;
  for (int v = 1; v <= Tr::kMaxVecs; ++v) {
    most_rows = Max(most_rows, job.PackedRows(int64_t{v} * Tr::kWidth));
  }
  job.row_tasks = Max(1, CeilDiv(most_rows, kPackRowsPerTask));
  RunParallel(rt, chunking.Count(chunk, tiles.count) * job.row_tasks, job);
}

// ------------------------------------------------------------------ entries

// Row of entry c within its block, before adding its index: (c / n) * m,
// built with counters rather than divisions (shared by all weight rows).
inline void FillGroupBase(uint16_t* base, int64_t count, int32_t n, int32_t m) {
  int32_t g = 0, s = 0;
  for (int64_t c = 0; c < count; ++c) {
    base[c] = static_cast<uint16_t>(g);
    if (++s == n) {
      s = 0;
      g += m;
    }
  }
}

// ------------------------------------------------------------------ spmm

// The sizes every op derives from its problem: T tokens, K inputs, N outputs,
// G = ceil(K / m) groups and Kc = G * n kept entries per output row.
struct Dims {
  int64_t T, K, N, G, Kc;
  int32_t n, m;
  explicit Dims(const NmProblem& p)
      : T(p.tokens),
        K(p.k),
        N(p.n_out),
        G(CeilDiv(p.k, p.m)),
        Kc(G * p.n),
        n(p.n),
        m(p.m) {}
};

// One quad of entries (rows q, values v) into kVecs token vectors of partial
// sums: per entry, kVecs FMAs whose x operand comes straight from the L1 block.
template <class Tr, int kVecs>
inline void SpmmQuad(const float* blk, uint64_t q, const typename Tr::V* v,
                     typename Tr::V* a) {
  constexpr int64_t kW = int64_t{kVecs} * Tr::kWidth;
  for (int e = 0; e < 4; ++e) {
    const float* x = blk + QuadRows::At(q, e) * kW;
    for (int i = 0; i < kVecs; ++i)
      a[i] = Tr::Fma(v[e], Tr::Load(x + i * Tr::kWidth), a[i]);
  }
}

// kRows output rows x kVecs token vectors of partial sums in registers over
// the `count` entries each row has in one block (rows `stride` apart). The
// rows of the next quad are computed before this quad's FMAs: the address
// chain (index load, SWAR, x load) is long, and issuing it a quad early keeps
// it off the FMAs' critical path.
template <class Tr, class D, int kVecs, int kRows>
void SpmmMicro(const float* blk, const QuadRows& quad, const uint8_t* idx,
               const typename D::Storage* vals, int64_t stride, int64_t count,
               const uint16_t* base, float* acc) {
  using V = typename Tr::V;
  using S = typename D::Storage;
  constexpr int64_t kW = int64_t{kVecs} * Tr::kWidth;
  V a[kRows][kVecs];
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < kVecs; ++i)
      a[r][i] = Tr::Load(acc + r * kW + i * Tr::kWidth);
  const int64_t full = count / 4 * 4;
  uint64_t q[kRows];
  for (int r = 0; r < kRows; ++r)
    q[r] = full > 0 ? quad.Rows(idx + r * stride, base) : 0;
  for (int64_t c = 0; c < full; c += 4) {
    const int64_t next = c + 4 < full ? c + 4 : c;
    for (int r = 0; r < kRows; ++r) {
      V v[4];
      D::Broadcast4(vals + r * stride + c, v);
      const uint64_t qn = quad.Rows(idx + r * stride + next, base + next);
      SpmmQuad<Tr, kVecs>(blk, q[r], v, a[r]);
      q[r] = qn;
    }
  }
  if (full < count) {
    for (int r = 0; r < kRows; ++r) {
      const TailQuad<S> t(idx + r * stride + full, vals + r * stride + full,
                          count - full);
      V v[4];
      D::Broadcast4(t.vals, v);
      SpmmQuad<Tr, kVecs>(blk, quad.Rows(t.idx, base + full), v, a[r]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < kVecs; ++i)
      Tr::Store(acc + r * kW + i * Tr::kWidth, a[r][i]);
}

// y = x @ W. A task is (token tile, block of output rows). Its partial sums
// (rows x tile width) live in a per-worker buffer across the K blocks; each K
// block of the packed x is reused from L1 by every row of the task.
template <class Tr, class D>
struct Spmm : Dims {
  using S = typename D::Storage;

  struct Worker {
    float* acc;
    uint16_t* group_base;
  };

  const NmProblem& p;
  const NmRuntime& rt;
  TokenTiles<Tr> tiles;
  Chunking chunking;
  int64_t rows_per_task = 0, row_tasks = 0;
  float* packed = nullptr;
  Worker* workers = nullptr;
  // Per batch and chunk.
  const S* values = nullptr;
  const uint8_t* idx = nullptr;
  S* y = nullptr;
  int64_t first_tile = 0;

  Spmm(const NmProblem& prob, const NmRuntime& runtime)
      : Dims(prob),
        p(prob),
        rt(runtime),
        tiles(prob.tokens),
        chunking(MaxTileFloats<Tr>(
                     [&](int64_t w) { return Blocks(w, G, m).PackedRows(); }),
                 tiles.count) {
    // Enough tasks for every worker even with a single tile.
    const int64_t want = CeilDiv(4 * rt.num_workers, chunking.tiles_per_chunk);
    rows_per_task = Max(8, Min(kSpmmRowsPerTask, RoundUp(CeilDiv(N, want), 8)));
    row_tasks = CeilDiv(N, rows_per_task);
  }

  void Layout(Carver& c) {
    packed = c.Take<float>(chunking.tiles_per_chunk * chunking.tile_floats);
    workers = c.Take<Worker>(rt.num_workers);
    for (int w = 0; w < rt.num_workers; ++w) {
      const Worker wk{c.Take<float>(rows_per_task * TokenTiles<Tr>::kFullWidth),
                      c.Take<uint16_t>(kMaxGroupBase)};
      if (workers != nullptr) workers[w] = wk;
    }
  }

  bool Compute() {
    if (T == 0 || N == 0 || p.batch == 0) return true;
    if (!TakeScratch(rt, *this)) return false;
    for (int64_t b = 0; b < p.batch; ++b) {
      const S* x = static_cast<const S*>(p.x) + b * p.x_stride;
      values = static_cast<const S*>(p.values) + b * p.values_stride;
      idx = p.indices + b * p.indices_stride;
      y = static_cast<S*>(p.out) + b * T * N;
      for (int64_t ch = 0; ch < chunking.num_chunks; ++ch) {
        if (b == 0 || p.x_stride != 0 || chunking.num_chunks > 1) {
          Pack<Tr, D>(rt, x, K, 0, true, G, m, tiles, chunking, ch, packed);
        }
        first_tile = chunking.First(ch);
        RunParallel(rt, chunking.Count(ch, tiles.count) * row_tasks, *this);
      }
    }
    return true;
  }

  void Run(int64_t task, int worker) const {
    const int64_t tile = first_tile + task / row_tasks;
    const int64_t j0 = (task % row_tasks) * rows_per_task;
    const int64_t j1 = Min(N, j0 + rows_per_task);
    Dispatch<Tr::kMaxVecs>(tiles.Vecs(tile), [&](auto vecs) {
      Tile<decltype(vecs)::value>(tile, j0, j1, workers[worker]);
    });
  }

  template <int kVecs>
  void Tile(int64_t tile, int64_t j0, int64_t j1, const Worker& w) const {
    constexpr int64_t kW = int64_t{kVecs} * Tr::kWidth;
    constexpr int kRows = RowsFor<Tr>(kVecs);
    const float* xt = packed + (tile - first_tile) * chunking.tile_floats;
    const Blocks blocks(kW, G, m);
    const QuadRows quad(m, blocks.rows);
    std::memset(w.acc, 0, (j1 - j0) * kW * sizeof(float));
    FillGroupBase(w.group_base, RoundUp(blocks.groups * n, 4), n, m);
    for (int64_t b = 0; b < blocks.count; ++b) {
      const float* blk = xt + b * blocks.Stride() * kW;
      const int64_t g0 = b * blocks.groups, g1 = Min(G, g0 + blocks.groups);
      const int64_t c0 = g0 * n, count = (g1 - g0) * n;
      int64_t j = j0;
      for (; j + kRows <= j1; j += kRows) {
        Rows<kVecs, kRows>(blk, quad, c0, count, j, j0, w);
      }
      for (; j < j1; ++j) Rows<kVecs, 1>(blk, quad, c0, count, j, j0, w);
    }
    WriteY<kW>(tile, j0, j1, w.acc);
  }

  template <int kVecs, int kRows>
  void Rows(const float* blk, const QuadRows& quad, int64_t c0, int64_t count,
            int64_t j, int64_t j0, const Worker& w) const {
    constexpr int64_t kW = int64_t{kVecs} * Tr::kWidth;
    const int64_t at = j * Kc + c0;
    // The weights stream from memory. Each row's entries of the block after
    // next are fetched now (a pass over the task's rows takes ~20K cycles; one
    // block ahead measured 5% slower), and the next rows' entries of this
    // block are brought from there into L1 (3% faster): their indices start
    // the address chains of the inner loop.
    const int64_t ahead = Min(count, Kc - c0 - 2 * count);
    const int next_rows = static_cast<int>(Min(kRows, N - j - kRows));
    for (int r = 0; r < kRows; ++r) {
      PrefetchBytes(idx + at + r * Kc + 2 * count, ahead);
      PrefetchBytes(values + at + r * Kc + 2 * count, ahead * sizeof(S));
      if (r < next_rows) {
        PrefetchBytes(idx + at + (r + kRows) * Kc, count);
        PrefetchBytes(values + at + (r + kRows) * Kc, count * sizeof(S));
      }
    }
    SpmmMicro<Tr, D, kVecs, kRows>(blk, quad, idx + at, values + at, Kc, count,
                                   w.group_base, w.acc + (j - j0) * kW);
  }

  template <int64_t kW>
  void WriteY(int64_t tile, int64_t j0, int64_t j1, const float* acc) const {
    const int64_t t0 = tiles.Begin(tile), valid = tiles.Valid(tile);
    for (int64_t t = 0; t < valid; ++t) {
      S* out = y + (t0 + t) * N;
      for (int64_t j = j0; j < j1; ++j)
        out[j] = D::FromF32(acc[(j - j0) * kW + t]);
    }
  }
};

// ------------------------------------------------------------------ spmm_t

// One quad of entries (rows q, values v) into the L1 tile of dx: per entry,
// the tile row it names += value * dy (kVecs token vectors in registers).
template <class Tr, int kVecs>
inline void SpmmTQuad(float* dxt, uint64_t q, const typename Tr::V* v,
                      const typename Tr::V* dy) {
  constexpr int64_t kW = int64_t{kVecs} * Tr::kWidth;
  for (int e = 0; e < 4; ++e) {
    float* row = dxt + QuadRows::At(q, e) * kW;
    for (int i = 0; i < kVecs; ++i) {
      float* d = row + i * Tr::kWidth;
      Tr::Store(d, Tr::Fma(v[e], dy[i], Tr::Load(d)));
    }
  }
}

// One weight row's `count` entries of a block into the L1 tile of dx. The
// stores (one per FMA) are the limit; the next quad's indices, values and
// group bases are loaded before this quad's stores so they do not queue
// behind them.
template <class Tr, class D, int kVecs>
void SpmmTMicro(float* dxt, const QuadRows& quad, const uint8_t* idx,
                const typename D::Storage* vals, int64_t count,
                const uint16_t* base, const typename Tr::V* dy) {
  using V = typename Tr::V;
  const int64_t full = count / 4 * 4;
  if (full > 0) {
    uint64_t q = quad.Rows(idx, base);
    V v[4];
    D::Broadcast4(vals, v);
    for (int64_t c = 0; c < full; c += 4) {
      const int64_t next = c + 4 < full ? c + 4 : c;
      const uint64_t qn = quad.Rows(idx + next, base + next);
      V vn[4];
      D::Broadcast4(vals + next, vn);
      SpmmTQuad<Tr, kVecs>(dxt, q, v, dy);
      q = qn;
      for (int e = 0; e < 4; ++e) v[e] = vn[e];
    }
  }
  if (full < count) {
    const TailQuad<typename D::Storage> t(idx + full, vals + full,
                                          count - full);
    V v[4];
    D::Broadcast4(t.vals, v);
    SpmmTQuad<Tr, kVecs>(dxt, quad.Rows(t.idx, base + full), v, dy);
  }
}

// Column lists (the CSC view of W used by spmm_t when the tiles of dy are
// many): per block of `rows` weight rows (a block of dy rows that fits L1),
// the entries of every column k as (row in the block, f32 value), each column
// padded to an even count with zero entries. Blocks are `capacity` entries
// apart; column k of block b is [start[b][k], start[b][k + 1]) of its block.
struct ColumnLists {
  int64_t rows = 0, count = 0, capacity = 0;
  int32_t* start = nullptr;  // [count][K + 1]
  uint8_t* row = nullptr;    // [count][capacity]
  float* value = nullptr;    // [count][capacity]
};

// One column of a block: dx row += sum over its entries of value * dy row.
// Even and odd entries feed separate accumulators, 2 * kVecs independent FMA
// chains, so consecutive entries do not wait on each other's FMA latency;
// the dy rows come straight from the L1 block as the FMAs' memory operands.
// Inlined into the column loop: as a call it measured 20% slower.
template <class Tr, int kVecs>
[[gnu::always_inline]] inline void SpmmTColumn(const float* dyb,
                                               const uint8_t* row,
                                               const float* val, int64_t count,
                                               float* dxr) {
  using V = typename Tr::V;
  constexpr int64_t kW = int64_t{kVecs} * Tr::kWidth;
  V a[kVecs], b[kVecs];
  for (int i = 0; i < kVecs; ++i) a[i] = Tr::Load(dxr + i * Tr::kWidth);
  for (int i = 0; i < kVecs; ++i) b[i] = Tr::Zero();
  for (int64_t e = 0; e < count; e += 2) {
    const float* y0 = dyb + int64_t{row[e]} * kW;
    const float* y1 = dyb + int64_t{row[e + 1]} * kW;
    const V w0 = Tr::Broadcast(val + e), w1 = Tr::Broadcast(val + e + 1);
    for (int i = 0; i < kVecs; ++i)
      a[i] = Tr::Fma(w0, Tr::Load(y0 + i * Tr::kWidth), a[i]);
    for (int i = 0; i < kVecs; ++i)
      b[i] = Tr::Fma(w1, Tr::Load(y1 + i * Tr::kWidth), b[i]);
  }
  for (int i = 0; i < kVecs; ++i)
    Tr::Store(dxr + i * Tr::kWidth, Tr::Add(a[i], b[i]));
}

// dx = dy @ W^T, two ways.
//
// Scatter (a single token tile): a task is (token tile, block of groups =
// input rows): a transposed dx tile of the block's rows stays in L1 while
// every weight row scatters its entries of the block into it. Entries with an
// index >= m go to a spare row that is dropped. Each FMA needs a load and a
// store of dx, so stores (one per cycle) bound it at half the FMA rate.
//
// Gather (several tiles): the entries are first sorted into column lists
// (ColumnLists, built once per call and reused by every tile), and a task is
// (token tile, range of dx rows): per block of dy rows in L1, each dx row
// gathers its column's entries into registers, one load per FMA and one
// store per column and block (measured 1.6x the scatter's rate). Building the
// lists costs about 0.8 of one scatter tile (4096 x 4096, 2:4), so a single
// tile keeps the scatter.
constexpr int64_t kSpmmTGatherMinTiles = 2;
constexpr int64_t kSpmmTRowsPerTask = 128;

template <class Tr, class D>
struct SpmmT : Dims {
  using S = typename D::Storage;

  struct Worker {
    float* dxt;  // Scatter: the L1 dx tile. Gather: the task's dx rows.
    uint16_t* group_base;
    int32_t* cursor;  // Gather: per-column fill positions while building.
  };

  // Builds the column lists of one block of weight rows (a task).
  struct BuildJob {
    const SpmmT* op;
    void Run(int64_t task, int worker) const {
      op->BuildColumns(task, op->workers[worker].cursor);
    }
  };

  const NmProblem& p;
  const NmRuntime& rt;
  TokenTiles<Tr> tiles;
  Chunking chunking;
  bool gather;
  int64_t row_tasks = 0;
  ColumnLists cols;
  float* packed = nullptr;
  Worker* workers = nullptr;
  // Per batch and chunk. All tiles of a chunk but the last are full width, so
  // the chunk's first tile sets the blocks (a narrower last tile just uses
  // less of L1).
  const S* values = nullptr;
  const uint8_t* idx = nullptr;
  S* dx = nullptr;
  int64_t first_tile = 0;
  Blocks blocks{1, 0, 1};

  SpmmT(const NmProblem& prob, const NmRuntime& runtime)
      : Dims(prob),
        p(prob),
        rt(runtime),
        tiles(prob.tokens),
        chunking(MaxTileFloats<Tr>([&](int64_t) { return N; }), tiles.count),
        gather(tiles.count >= kSpmmTGatherMinTiles) {
    if (gather) {
      // Blocks of dy rows sized for L1 at the full tile width; rows within a
      // block fit a byte.
      cols.rows = Min(256, kL1BlockBytes / (TokenTiles<Tr>::kFullWidth * 4));
      cols.count = CeilDiv(N, cols.rows);
      cols.capacity = RoundUp(cols.rows * Kc + K, kCacheLine);
      row_tasks = CeilDiv(K, kSpmmTRowsPerTask);
    }
  }

  void Layout(Carver& c) {
    packed = c.Take<float>(chunking.tiles_per_chunk * chunking.tile_floats);
    if (gather) {
      cols.start = c.Take<int32_t>(cols.count * (K + 1));
      cols.row = c.Take<uint8_t>(cols.count * cols.capacity);
      cols.value = c.Take<float>(cols.count * cols.capacity);
    }
    workers = c.Take<Worker>(rt.num_workers);
    const int64_t dxt_floats =
        gather ? kSpmmTRowsPerTask * TokenTiles<Tr>::kFullWidth
               : MaxTileFloats<Tr>(
                     [&](int64_t w) { return Blocks(w, G, m).Stride(); });
    for (int w = 0; w < rt.num_workers; ++w) {
      const Worker wk{c.Take<float>(dxt_floats),
                      c.Take<uint16_t>(kMaxGroupBase),
                      gather ? c.Take<int32_t>(K) : nullptr};
      if (workers != nullptr) workers[w] = wk;
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
      const S* dy = static_cast<const S*>(p.dy) + b * p.dy_stride;
      values = static_cast<const S*>(p.values) + b * p.values_stride;
      idx = p.indices + b * p.indices_stride;
      dx = static_cast<S*>(p.out) + b * T * K;
      if (gather &&
          (b == 0 || p.values_stride != 0 || p.indices_stride != 0)) {
        RunParallel(rt, cols.count, BuildJob{this});
      }
      for (int64_t ch = 0; ch < chunking.num_chunks; ++ch) {
        if (b == 0 || p.dy_stride != 0 || chunking.num_chunks > 1) {
          Pack<Tr, D>(rt, dy, N, 0, false, G, m, tiles, chunking, ch, packed);
        }
        first_tile = chunking.First(ch);
        blocks = Blocks(tiles.Width(first_tile), G, m);
        const int64_t per_tile = gather ? row_tasks : blocks.count;
        RunParallel(rt, chunking.Count(ch, tiles.count) * per_tile, *this);
      }
    }
    return true;
  }

  // The column lists of weight rows [b * cols.rows, +cols.rows): count the
  // entries per column, lay the columns out (padded to even counts), then
  // place the entries. Entries with an index >= m, or past K, are dropped.
  void BuildColumns(int64_t b, int32_t* cursor) const {
    const int64_t j0 = b * cols.rows, j1 = Min(N, j0 + cols.rows);
    int32_t* start = cols.start + b * (K + 1);
    uint8_t* row = cols.row + b * cols.capacity;
    float* value = cols.value + b * cols.capacity;
    std::memset(cursor, 0, K * sizeof(int32_t));
    for (int64_t j = j0; j < j1; ++j) {
      const uint8_t* ji = idx + j * Kc;
      for (int64_t g = 0, c = 0; g < G; ++g) {
        for (int32_t s = 0; s < n; ++s, ++c) {
          const int64_t k = g * m + ji[c];
          if (ji[c] < m && k < K) ++cursor[k];
        }
      }
    }
    start[0] = 0;
    for (int64_t k = 0; k < K; ++k) {
      start[k + 1] = start[k] + ((cursor[k] + 1) & ~1);
      cursor[k] = start[k];
    }
    for (int64_t j = j0; j < j1; ++j) {
      const uint8_t* ji = idx + j * Kc;
      const S* jv = values + j * Kc;
      for (int64_t g = 0, c = 0; g < G; ++g) {
        for (int32_t s = 0; s < n; ++s, ++c) {
          const int64_t k = g * m + ji[c];
          if (ji[c] < m && k < K) {
            const int32_t at = cursor[k]++;
            row[at] = static_cast<uint8_t>(j - j0);
            value[at] = D::ToF32(jv[c]);
          }
        }
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      if (cursor[k] < start[k + 1]) {
        row[cursor[k]] = 0;
        value[cursor[k]] = 0.0f;
      }
    }
  }

  void Run(int64_t task, int worker) const {
    const int64_t per_tile = gather ? row_tasks : blocks.count;
    const int64_t tile = first_tile + task / per_tile;
    const int64_t b = task % per_tile;
    Dispatch<Tr::kMaxVecs>(tiles.Vecs(tile), [&](auto vecs) {
      if (gather) {
        Gather<decltype(vecs)::value>(tile, b, workers[worker]);
      } else {
        Tile<decltype(vecs)::value>(tile, b, workers[worker]);
      }
    });
  }

  // dx rows [k0, k1) of one tile, from every block of dy rows in turn.
  template <int kVecs>
  void Gather(int64_t tile, int64_t task, const Worker& w) const {
    constexpr int64_t kW = int64_t{kVecs} * Tr::kWidth;
    const float* dyt = packed + (tile - first_tile) * chunking.tile_floats;
    const int64_t k0 = task * kSpmmTRowsPerTask;
    const int64_t k1 = Min(K, k0 + kSpmmTRowsPerTask);
    float* const dxr = w.dxt;
    std::memset(dxr, 0, (k1 - k0) * kW * sizeof(float));
    for (int64_t b = 0; b < cols.count; ++b) {
      const float* dyb = dyt + b * cols.rows * kW;
      const int32_t* start = cols.start + b * (K + 1);
      const uint8_t* row = cols.row + b * cols.capacity;
      const float* value = cols.value + b * cols.capacity;
      for (int64_t k = k0; k < k1; ++k) {
        SpmmTColumn<Tr, kVecs>(dyb, row + start[k], value + start[k],
                               start[k + 1] - start[k], dxr + (k - k0) * kW);
      }
    }
    WriteDx<kW>(tile, k0, k1, dxr);
  }

  template <int kVecs>
  void Tile(int64_t tile, int64_t b, const Worker& w) const {
    using V = typename Tr::V;
    constexpr int64_t kW = int64_t{kVecs} * Tr::kWidth;
    const float* dyt = packed + (tile - first_tile) * chunking.tile_floats;
    const int64_t g0 = b * blocks.groups, g1 = Min(G, g0 + blocks.groups);
    const int64_t c0 = g0 * n, count = (g1 - g0) * n;
    const QuadRows quad(m, blocks.rows);  // The spare row.
    // Locals, not members: the stores into the dx tile could alias members,
    // which the compiler would then reload after every store.
    float* const dxt = w.dxt;
    const uint16_t* const base = w.group_base;
    const uint8_t* const row_idx = idx + c0;
    const S* const row_vals = values + c0;
    std::memset(dxt, 0, blocks.Stride() * kW * sizeof(float));
    FillGroupBase(w.group_base, RoundUp(count, 4), n, m);
    // Weight rows are Kc apart; fetch a few rows ahead of use.
    constexpr int64_t kAhead = 4;
    for (int64_t j = 0; j < N; ++j) {
      const uint8_t* ji = row_idx + j * Kc;
      const S* jv = row_vals + j * Kc;
      if (j + kAhead < N) {
        PrefetchBytes(ji + kAhead * Kc, count);
        PrefetchBytes(jv + kAhead * Kc, count * sizeof(S));
      }
      V dy[kVecs];
      for (int i = 0; i < kVecs; ++i)
        dy[i] = Tr::Load(dyt + j * kW + i * Tr::kWidth);
      SpmmTMicro<Tr, D, kVecs>(dxt, quad, ji, jv, count, base, dy);
    }
    WriteDx<kW>(tile, g0 * m, Min(K, g1 * m), dxt);
  }

  template <int64_t kW>
  void WriteDx(int64_t tile, int64_t k0, int64_t k1, const float* dxt) const {
    const int64_t t0 = tiles.Begin(tile), valid = tiles.Valid(tile);
    for (int64_t t = 0; t < valid; ++t) {
      S* out = dx + (t0 + t) * K;
      for (int64_t k = k0; k < k1; ++k)
        out[k] = D::FromF32(dxt[(k - k0) * kW + t]);
    }
  }
};

// ------------------------------------------------------------------ sddmm

// Sums over the tile's tokens of x[row] * dy for Tr::kWidth entries of one
// weight row, 8 entries at a time: 8 independent FMA chains (two FMA pipes x
// 4 cycles latency) walking the token vectors together, each dy vector (held
// in registers) feeding 8 FMAs. One transposing reduction then turns the
// kWidth accumulators into a vector of the kWidth sums.
// Inlined into the tile loop: as a call it measured 5-9% slower.
template <class Tr, int kVecs>
[[gnu::always_inline]] inline typename Tr::V SddmmMicro(
    const float* blk, const QuadRows& quad, const uint8_t* idx,
    const uint16_t* base, const typename Tr::V* dy) {
  using V = typename Tr::V;
  constexpr int64_t kW = int64_t{kVecs} * Tr::kWidth;
  static_assert(Tr::kWidth % 8 == 0, "entries go 8 at a time");
  V acc[Tr::kWidth];
  for (int c0 = 0; c0 < Tr::kWidth; c0 += 8) {
    const uint64_t q[2] = {quad.Rows(idx + c0, base + c0),
                           quad.Rows(idx + c0 + 4, base + c0 + 4)};
    const float* x[8];
    for (int e = 0; e < 8; ++e) x[e] = blk + QuadRows::At(q[e / 4], e % 4) * kW;
    V a[8];
    for (int e = 0; e < 8; ++e) a[e] = Tr::Zero();
    for (int i = 0; i < kVecs; ++i)
      for (int e = 0; e < 8; ++e)
        a[e] = Tr::Fma(Tr::Load(x[e] + i * Tr::kWidth), dy[i], a[e]);
    for (int e = 0; e < 8; ++e) acc[c0 + e] = a[e];
  }
  return Tr::SumLanes(acc);
}

// dv = (dy^T x) at the kept positions. A task is a block of output rows over
// all token tiles; per K block the x block sits in L1 and serves every row.
// Sums accumulate in f32: in the output itself for f32, else in a per-worker
// buffer, or in a call-wide one when T needs several chunks.
template <class Tr, class D>
struct Sddmm : Dims {
  using S = typename D::Storage;

  struct Worker {
    float* acc;
    uint16_t* group_base;
  };

  const NmProblem& p;
  const NmRuntime& rt;
  TokenTiles<Tr> tiles;
  Chunking chunking;
  int64_t rows_per_task, row_tasks;
  bool shared_sums;  // Half types with several chunks: f32 sums of all rows.
  float* packed = nullptr;
  float* sums = nullptr;
  Worker* workers = nullptr;
  // Per batch and chunk.
  const uint8_t* idx = nullptr;
  S* dv = nullptr;
  int64_t chunk = 0;

  Sddmm(const NmProblem& prob, const NmRuntime& runtime)
      : Dims(prob),
        p(prob),
        rt(runtime),
        tiles(prob.tokens),
        // A tile's slot holds the N rows of dy, then the blocks of x.
        chunking(MaxTileFloats<Tr>([&](int64_t w) {
                   return N + Blocks(w, G, m).PackedRows();
                 }),
                 tiles.count) {
    rows_per_task =
        Max(1, Min(kSddmmRowsPerTask, CeilDiv(N, 4 * rt.num_workers)));
    row_tasks = CeilDiv(N, rows_per_task);
    shared_sums = !kIsF32<D> && chunking.num_chunks > 1;
  }

  void Layout(Carver& c) {
    packed = c.Take<float>(chunking.tiles_per_chunk * chunking.tile_floats);
    if (shared_sums) sums = c.Take<float>(N * Kc);
    workers = c.Take<Worker>(rt.num_workers);
    const bool local = !kIsF32<D> && !shared_sums;
    for (int w = 0; w < rt.num_workers; ++w) {
      const Worker wk{local ? c.Take<float>(rows_per_task * Kc) : nullptr,
                      c.Take<uint16_t>(kMaxGroupBase)};
      if (workers != nullptr) workers[w] = wk;
    }
  }

  bool Compute() {
    if (N == 0 || Kc == 0 || p.batch == 0) return true;
    if (T == 0) {
      std::memset(p.out, 0, p.batch * N * Kc * sizeof(S));
      return true;
    }
    if (!TakeScratch(rt, *this)) return false;
    const bool single = chunking.num_chunks == 1;
    for (int64_t b = 0; b < p.batch; ++b) {
      const S* x = static_cast<const S*>(p.x) + b * p.x_stride;
      const S* dy = static_cast<const S*>(p.dy) + b * p.dy_stride;
      idx = p.indices + b * p.indices_stride;
      dv = static_cast<S*>(p.out) + b * N * Kc;
      for (chunk = 0; chunk < chunking.num_chunks; ++chunk) {
        if (b == 0 || p.dy_stride != 0 || !single) {
          Pack<Tr, D>(rt, dy, N, 0, false, G, m, tiles, chunking, chunk,
                      packed);
        }
        if (b == 0 || p.x_stride != 0 || !single) {
          Pack<Tr, D>(rt, x, K, N, true, G, m, tiles, chunking, chunk, packed);
        }
        RunParallel(rt, row_tasks, *this);
      }
    }
    return true;
  }

  void Run(int64_t task, int worker) const {
    const Worker& w = workers[worker];
    const int64_t j0 = task * rows_per_task, j1 = Min(N, j0 + rows_per_task);
    float* acc = shared_sums ? sums + j0 * Kc : w.acc;
    if constexpr (kIsF32<D>) acc = dv + j0 * Kc;
    if (chunk == 0) std::memset(acc, 0, (j1 - j0) * Kc * sizeof(float));
    const int64_t first = chunking.First(chunk);
    for (int64_t i = 0; i < chunking.Count(chunk, tiles.count); ++i) {
      Dispatch<Tr::kMaxVecs>(tiles.Vecs(first + i), [&](auto vecs) {
        Tile<decltype(vecs)::value>(i, j0, j1, acc, w);
      });
    }
    if constexpr (!kIsF32<D>) {
      if (chunk + 1 == chunking.num_chunks) {
        S* out = dv + j0 * Kc;
        for (int64_t i = 0; i < (j1 - j0) * Kc; ++i)
          out[i] = D::FromF32(acc[i]);
      }
    }
  }

  template <int kVecs>
  void Tile(int64_t rel, int64_t j0, int64_t j1, float* acc,
            const Worker& w) const {
    using V = typename Tr::V;
    constexpr int64_t kW = int64_t{kVecs} * Tr::kWidth;
    constexpr int kLanes = Tr::kWidth;
    const float* dyt = packed + rel * chunking.tile_floats;
    const float* xt = dyt + N * kW;
    const Blocks blocks(kW, G, m);
    const QuadRows quad(m, blocks.rows);
    // Locals, not members: the stores of sums could alias members.
    const uint8_t* const indices = idx;
    const uint16_t* const base = w.group_base;
    FillGroupBase(w.group_base, RoundUp(blocks.groups * n, kLanes), n, m);
    for (int64_t b = 0; b < blocks.count; ++b) {
      const float* blk = xt + b * blocks.Stride() * kW;
      const int64_t g0 = b * blocks.groups, g1 = Min(G, g0 + blocks.groups);
      const int64_t c0 = g0 * n, count = (g1 - g0) * n;
      for (int64_t j = j0; j < j1; ++j) {
        V dy[kVecs];
        for (int i = 0; i < kVecs; ++i)
          dy[i] = Tr::Load(dyt + j * kW + i * kLanes);
        const uint8_t* row_idx = indices + j * Kc + c0;
        float* out = acc + (j - j0) * Kc + c0;
        int64_t c = 0;
        for (; c + kLanes <= count; c += kLanes) {
          const V s =
              SddmmMicro<Tr, kVecs>(blk, quad, row_idx + c, base + c, dy);
          Tr::Store(out + c, Tr::Add(Tr::Load(out + c), s));
        }
        if (c < count) {  // The last entries, padded with invalid indices.
          uint8_t tail_idx[kLanes];
          std::memset(tail_idx, 0xff, kLanes);
          std::memcpy(tail_idx, row_idx + c, count - c);
          alignas(64) float sums_tail[kLanes];
          Tr::Store(sums_tail,
                    SddmmMicro<Tr, kVecs>(blk, quad, tail_idx, base + c, dy));
          for (int64_t q = 0; c + q < count; ++q) out[c + q] += sums_tail[q];
        }
      }
    }
  }
};

// ------------------------------------------------------------------ table

template <class Tr, template <class, class> class Op>
bool RunOp(const NmProblem& p, const NmRuntime& rt) {
  switch (p.dtype) {
    case NmDtype::kF32: {
      Op<Tr, F32<Tr>> op(p, rt);
      return op.Compute();
    }
    case NmDtype::kBF16: {
      Op<Tr, BF16<Tr>> op(p, rt);
      return op.Compute();
    }
    case NmDtype::kF16: {
      Op<Tr, F16<Tr>> op(p, rt);
      return op.Compute();
    }
  }
  return true;
}

template <class Tr>
constexpr NmKernelTable MakeTable() {
  return NmKernelTable{&RunOp<Tr, Spmm>, &RunOp<Tr, SpmmT>, &RunOp<Tr, Sddmm>};
}

}  // namespace JAXSPARSE_NM_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_NM_KERNELS_H_
