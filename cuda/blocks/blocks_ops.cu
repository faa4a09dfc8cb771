// CUDA handlers and kernels of the 1xN block targets (layouts and the CUDA
// forms of the structure: cpu/blocks/blocks_checks.h; docs/gpu_kernels.md).
//
// - y = x @ W, bf16/f16: BlocksSpmmTcKernel on the dense tensor cores
//   (mma.sync.m16n8k16). A block row is a small dense product
//   x[:, kept] @ W_row[kept, n], so a warp takes one row and 16 tokens: per
//   step of 16 blocks, A is the 16 tokens' gathered x entries (the rows of
//   the dense operand picked by the blocks' inputs), B the 16 blocks' values
//   (n = 8: one n8 tile, 16: two, 32: four; n = 4 pads its tile with zero
//   columns), f32 accumulators in registers across the row.
// - y = x @ W, f32: BlocksSpmmKernel on the CUDA cores, a warp per row and
//   32 / n tokens, lane = (token, output): every lane works whatever n is,
//   the values of a block are one coalesced load for the warp, x a
//   broadcast per token.
// - dx = dy @ W^T: one thread per dx[b, t, k] over the blocks of input k,
//   which the lowering lists (order, kptr: a CSC view, as cuSPARSE's csr2csc
//   gives a transposed product): no atomics, a deterministic f32 sum, dx
//   stores coalesced along k.
// - dv = (x^T dy)[kept]: one thread per dv[b, p, j] (j across lanes, so a
//   block's n outputs read one dy run per token), f32 sum over the tokens.
// The structure is untrusted: spans, rows, order and kptr are clamped or
// skipped when out of range, so a bad array never reads out of bounds.

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "cpu/blocks/blocks_checks.h"
#include "cpu/common/ffi.h"
#include "cpu/common/validate.h"
#include "cuda/ffi_target.h"
#include "cuda/launch.cuh"
#include "cuda/simt.cuh"

namespace ffi = xla::ffi;

namespace jaxsparse {
namespace {

using namespace launch;  // NOLINT: the shared launch helpers of cuda/launch.cuh.

constexpr char kSpmm[] = "jaxsparse_blocks_spmm";
constexpr char kSpmmT[] = "jaxsparse_blocks_spmm_t";
constexpr char kSddmm[] = "jaxsparse_blocks_sddmm";

// Tokens of one tensor-core tile (the mma's M).
constexpr int kTcTokens = 16;
// Blocks per mma step (the mma's K).
constexpr int kTcBlocks = 16;

struct Dims {
  int64_t batch, tokens, k, n_out, n, nnz, rows;
};

template <typename T>
struct SpmmArgs {
  const T* x;
  const T* values;
  const int32_t* indices;
  const int32_t* spans;  // [B, R + 1], non-decreasing in [0, nnz] (the lowering's)
  T* y;
  int64_t x_stride, values_stride, indices_stride, spans_stride;
  Dims d;
};

template <typename T>
struct SpmmTArgs {
  const T* dy;
  const T* values;
  const int32_t* rows;   // [B, nnz]
  const int32_t* order;  // [B, nnz]
  const int32_t* kptr;   // [B, K + 1]
  T* dx;
  int64_t dy_stride, values_stride, rows_stride, order_stride, kptr_stride;
  Dims d;
};

template <typename T>
struct SddmmArgs {
  const T* x;
  const T* dy;
  const int32_t* indices;
  const int32_t* rows;
  T* dv;
  int64_t x_stride, dy_stride, indices_stride, rows_stride;
  Dims d;
};

JAXSPARSE_DEV int64_t Clamp(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Row r's blocks [start, end): the lowering made spans non-decreasing; a
// direct caller's bad array is still read inside [0, nnz].
JAXSPARSE_DEV void RowSpan(const int32_t* spans, int64_t r, int64_t nnz, int64_t* start,
                           int64_t* end) {
  *start = Clamp(spans[r], 0, nnz);
  *end = Clamp(spans[r + 1], *start, nnz);
}

// ------------------------------------------------------------------ tensor cores

// The 16-bit pattern of element i (x and values as raw words: the mma reads
// bf16 or f16 bits as they are).
JAXSPARSE_DEV uint32_t Word(const uint16_t* p, int64_t i) { return p[i]; }

// One warp: block row r, tokens [t0, t0 + 16), all of the row's blocks in
// steps of 16. Fragment layouts (PTX ISA, m16n8k16 row.col): lane 4g + q
// holds A rows g, g + 8 at columns 2q, 2q + 1 (+ 8 in a[2], a[3]); B rows
// (blocks) 2q, 2q + 1 (+ 8 in b[1]) at column (output) g.
template <typename T, simt::MmaType kType, int kN>
JAXSPARSE_DEV void TcRowTile(const SpmmArgs<T>& a, int64_t b, int64_t r, int64_t t0) {
  constexpr int kTiles = (kN + 7) / 8;
  const Dims& d = a.d;
  const int lane = simt::LaneId(), g = lane >> 2, q = lane & 3;
  const uint16_t* x = reinterpret_cast<const uint16_t*>(a.x) + b * a.x_stride;
  const uint16_t* values = reinterpret_cast<const uint16_t*>(a.values) + b * a.values_stride;
  const int32_t* indices = a.indices + b * a.indices_stride;
  int64_t start, end;
  RowSpan(a.spans + b * a.spans_stride, r, d.nnz, &start, &end);
  // The lane's two token rows of x (A rows g and g + 8), or none past T.
  const int64_t t_lo = t0 + g, t_hi = t0 + g + 8;
  const uint16_t* x_rows[2] = {t_lo < d.tokens ? x + t_lo * d.k : nullptr,
                               t_hi < d.tokens ? x + t_hi * d.k : nullptr};
  float acc[kTiles][4] = {};
  for (int64_t p0 = start; p0 < end; p0 += kTcBlocks) {
    // The four blocks (step columns 2q, 2q + 1, 2q + 8, 2q + 9) whose x
    // entries this lane puts in A and whose values it puts in B; -1 past the
    // row or outside x: both then enter as zeros (a zero value alone would
    // let a NaN of x through).
    int64_t pb[4];
    int64_t kb[4];
    JAXSPARSE_UNROLL
    for (int s = 0; s < 4; ++s) {
      const int64_t p = p0 + 2 * q + (s & 1) + 8 * (s >> 1);
      const int64_t k = p < end ? indices[p] : -1;
      const bool inside = k >= 0 && k < d.k;
      pb[s] = inside ? p : -1;
      kb[s] = inside ? k : 0;
    }
    uint32_t fa[4];
    JAXSPARSE_UNROLL
    for (int i = 0; i < 4; ++i) {
      const uint16_t* row = x_rows[i & 1];
      uint32_t pair = 0;
      JAXSPARSE_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int s = 2 * (i >> 1) + h;
        if (pb[s] >= 0 && row != nullptr) pair |= Word(row, kb[s]) << (16 * h);
      }
      fa[i] = pair;
    }
    JAXSPARSE_UNROLL
    for (int nt = 0; nt < kTiles; ++nt) {
      const int j = 8 * nt + g;
      uint32_t fb[2];
      JAXSPARSE_UNROLL
      for (int i = 0; i < 2; ++i) {
        uint32_t pair = 0;
        JAXSPARSE_UNROLL
        for (int h = 0; h < 2; ++h) {
          const int s = 2 * i + h;
          if (pb[s] >= 0 && j < kN) pair |= Word(values, pb[s] * kN + j) << (16 * h);
        }
        fb[i] = pair;
      }
      simt::MmaM16n8k16<kType>(acc[nt], fa, fb, acc[nt]);
    }
  }
  T* y = a.y + b * d.tokens * d.n_out;
  simt::ForEachAccumulator<kTiles>(lane, acc, [&](int m, int j, float v) {
    const int64_t t = t0 + m, o = r * kN + j;
    if (t < d.tokens && j < kN && o < d.n_out) y[t * d.n_out + o] = static_cast<T>(v);
  });
}

// Rows along grid x, 16-token tiles along the block's 4 warps and grid y,
// batch along grid z (grid-strided past the limits): the 4 warps of a block
// share the row's indices and values through L1.
template <typename T, simt::MmaType kType, int kN>
__global__ void JAXSPARSE_LAUNCH_BOUNDS(kBlockThreads)
    BlocksSpmmTcKernel(const JAXSPARSE_GRID_CONSTANT SpmmArgs<T> a) {
  const int64_t tiles = (a.d.tokens + kTcTokens - 1) / kTcTokens;
  for (int64_t b = blockIdx.z; b < a.d.batch; b += gridDim.z) {
    for (int64_t r = blockIdx.x; r < a.d.rows; r += gridDim.x) {
      for (int64_t tile = static_cast<int64_t>(blockIdx.y) * kWarpsPerBlock + threadIdx.y;
           tile < tiles; tile += static_cast<int64_t>(gridDim.y) * kWarpsPerBlock) {
        TcRowTile<T, kType, kN>(a, b, r, tile * kTcTokens);
      }
    }
  }
}

// ------------------------------------------------------------------ CUDA cores

// One warp: block row r, tokens [t0, t0 + 32 / n); lane = (token, output).
template <typename T>
JAXSPARSE_DEV void CoreRowTile(const SpmmArgs<T>& a, int64_t b, int64_t r, int64_t t0) {
  const Dims& d = a.d;
  const int lane = simt::LaneId();
  const int64_t n = d.n, t = t0 + lane / n, j = lane % n, o = r * n + j;
  const T* x = a.x + b * a.x_stride;
  const T* values = a.values + b * a.values_stride;
  const int32_t* indices = a.indices + b * a.indices_stride;
  int64_t start, end;
  RowSpan(a.spans + b * a.spans_stride, r, d.nnz, &start, &end);
  if (t >= d.tokens || o >= d.n_out) return;
  float acc = 0.0f;
  for (int64_t p = start; p < end; ++p) {
    const int64_t k = indices[p];
    if (k < 0 || k >= d.k) continue;  // Outside x: adds nothing.
    acc += static_cast<float>(x[t * d.k + k]) * static_cast<float>(values[p * n + j]);
  }
  a.y[(b * d.tokens + t) * d.n_out + o] = static_cast<T>(acc);
}

template <typename T>
__global__ void JAXSPARSE_LAUNCH_BOUNDS(kBlockThreads)
    BlocksSpmmKernel(const JAXSPARSE_GRID_CONSTANT SpmmArgs<T> a) {
  const int64_t per_warp = kWarpLanes / a.d.n;
  const int64_t groups = (a.d.tokens + per_warp - 1) / per_warp;
  for (int64_t b = blockIdx.z; b < a.d.batch; b += gridDim.z) {
    for (int64_t r = blockIdx.x; r < a.d.rows; r += gridDim.x) {
      for (int64_t group = static_cast<int64_t>(blockIdx.y) * kWarpsPerBlock + threadIdx.y;
           group < groups; group += static_cast<int64_t>(gridDim.y) * kWarpsPerBlock) {
        CoreRowTile<T>(a, b, r, group * per_warp);
      }
    }
  }
}

// dx[b, t, k] = sum over the blocks p of input k (order[kptr[k] ..
// kptr[k+1])) of dy[b, t, row(p) n + j] . values[p][j].
template <typename T>
JAXSPARSE_DEV void SpmmTElement(const SpmmTArgs<T>& a, int64_t b, int64_t t, int64_t k) {
  const Dims& d = a.d;
  const T* dy = a.dy + b * a.dy_stride + t * d.n_out;
  const T* values = a.values + b * a.values_stride;
  const int32_t* rows = a.rows + b * a.rows_stride;
  const int32_t* order = a.order + b * a.order_stride;
  const int32_t* kptr = a.kptr + b * a.kptr_stride;
  const int64_t q0 = Clamp(kptr[k], 0, d.nnz), q1 = Clamp(kptr[k + 1], q0, d.nnz);
  float acc = 0.0f;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t p = order[q];
    if (p < 0 || p >= d.nnz) continue;
    const int64_t r = rows[p];
    if (r < 0 || r >= d.rows) continue;  // In no row: adds nothing.
    const int64_t outs = d.n_out - r * d.n < d.n ? d.n_out - r * d.n : d.n;
    for (int64_t j = 0; j < outs; ++j) {
      acc += static_cast<float>(dy[r * d.n + j]) * static_cast<float>(values[p * d.n + j]);
    }
  }
  a.dx[(b * d.tokens + t) * d.k + k] = static_cast<T>(acc);
}

template <typename T>
__global__ void JAXSPARSE_LAUNCH_BOUNDS(kBlockThreads)
    BlocksSpmmTKernel(const JAXSPARSE_GRID_CONSTANT SpmmTArgs<T> a) {
  ForEachPoint(a.d.batch, a.d.tokens, a.d.k,
               [&](int64_t b, int64_t t, int64_t k) { SpmmTElement(a, b, t, k); });
}

// dv[b, p, j] = sum_t x[b, t, k_p] dy[b, t, row(p) n + j]; 0 for a block in
// no row, outside x, or a padding output.
template <typename T>
JAXSPARSE_DEV void SddmmElement(const SddmmArgs<T>& a, int64_t b, int64_t e) {
  const Dims& d = a.d;
  const int64_t p = e / d.n, j = e % d.n;
  const int64_t k = a.indices[b * a.indices_stride + p];
  const int64_t r = a.rows[b * a.rows_stride + p];
  const int64_t o = r * d.n + j;
  float acc = 0.0f;
  if (k >= 0 && k < d.k && r >= 0 && r < d.rows && o < d.n_out) {
    const T* x = a.x + b * a.x_stride;
    const T* dy = a.dy + b * a.dy_stride;
    for (int64_t t = 0; t < d.tokens; ++t) {
      acc += static_cast<float>(x[t * d.k + k]) * static_cast<float>(dy[t * d.n_out + o]);
    }
  }
  a.dv[b * d.nnz * d.n + e] = static_cast<T>(acc);
}

template <typename T>
__global__ void JAXSPARSE_LAUNCH_BOUNDS(kBlockThreads)
    BlocksSddmmKernel(const JAXSPARSE_GRID_CONSTANT SddmmArgs<T> a) {
  ForEachPoint(a.d.batch, 1, a.d.nnz * a.d.n,
               [&](int64_t b, int64_t, int64_t e) { SddmmElement(a, b, e); });
}

// ------------------------------------------------------------------ launches

// Rows x token groups (4 per block) x batch, capped at the grid's limits.
dim3 RowGrid(const Dims& d, int64_t tokens_per_warp) {
  const int64_t groups = (d.tokens + tokens_per_warp - 1) / tokens_per_warp;
  return dim3(static_cast<unsigned>(std::min(d.rows, kMaxGridX)),
              static_cast<unsigned>(std::min((groups + kWarpsPerBlock - 1) / kWarpsPerBlock,
                                             kMaxGridYZ)),
              static_cast<unsigned>(std::min(d.batch, kMaxGridYZ)));
}

template <typename T, simt::MmaType kType>
ffi::Error LaunchTc(simt::Stream stream, const SpmmArgs<T>& a) {
  const dim3 grid = RowGrid(a.d, kTcTokens);
  switch (a.d.n) {
    case 4:
      simt::Launch(kSpmm, &BlocksSpmmTcKernel<T, kType, 4>, grid, Block(), 0, stream, a);
      break;
    case 8:
      simt::Launch(kSpmm, &BlocksSpmmTcKernel<T, kType, 8>, grid, Block(), 0, stream, a);
      break;
    case 16:
      simt::Launch(kSpmm, &BlocksSpmmTcKernel<T, kType, 16>, grid, Block(), 0, stream, a);
      break;
    default:
      simt::Launch(kSpmm, &BlocksSpmmTcKernel<T, kType, 32>, grid, Block(), 0, stream, a);
  }
  return LaunchStatus(kSpmm);
}

template <typename T>
ffi::Error LaunchCore(simt::Stream stream, const SpmmArgs<T>& a) {
  simt::Launch(kSpmm, &BlocksSpmmKernel<T>, RowGrid(a.d, kWarpLanes / a.d.n), Block(), 0, stream,
               a);
  return LaunchStatus(kSpmm);
}

// ------------------------------------------------------------------ handlers

ffi::Error BlocksSpmm(simt::Stream stream, ffi::AnyBuffer x_buffer, ffi::AnyBuffer values_buffer,
                      ffi::AnyBuffer indices_buffer, ffi::AnyBuffer spans_buffer,
                      ffi::Result<ffi::AnyBuffer> y_buffer) {
  blocks_check::Operands o;
  JAXSPARSE_RETURN_IF_ERROR(blocks_check::CheckSpmm(Validator(kSpmm), x_buffer, values_buffer,
                                                    indices_buffer, spans_buffer, *y_buffer, &o));
  if (o.result.buffer->element_count() == 0) return ffi::Error::Success();
  const Dims d{o.result.batch, o.a.rows, o.a.cols, o.result.cols, o.b.cols, o.indices.cols,
               o.indptr.cols - 1};
  const ffi::DataType dtype = o.a.dtype();
  return DispatchFloat(kSpmm, dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const SpmmArgs<T> a{Data<T>(o.a), Data<T>(o.b), Data<int32_t>(o.indices),
                        Data<int32_t>(o.indptr), MutableData<T>(o.result), o.a.BatchStride(),
                        o.b.BatchStride(), o.indices.BatchStride(), o.indptr.BatchStride(), d};
    if constexpr (std::is_same_v<T, simt::Bf16>) {
      return LaunchTc<T, simt::MmaType::kBf16>(stream, a);
    } else if constexpr (std::is_same_v<T, simt::Half>) {
      return LaunchTc<T, simt::MmaType::kF16>(stream, a);
    } else {
      return LaunchCore<T>(stream, a);
    }
  });
}

ffi::Error BlocksSpmmT(simt::Stream stream, ffi::AnyBuffer dy_buffer, ffi::AnyBuffer values_buffer,
                       ffi::AnyBuffer rows_buffer, ffi::AnyBuffer order_buffer,
                       ffi::AnyBuffer kptr_buffer, ffi::Result<ffi::AnyBuffer> dx_buffer) {
  blocks_check::RowOperands o;
  JAXSPARSE_RETURN_IF_ERROR(blocks_check::CheckSpmmTByInput(
      Validator(kSpmmT), dy_buffer, values_buffer, rows_buffer, order_buffer, kptr_buffer,
      *dx_buffer, &o));
  if (o.result.buffer->element_count() == 0) return ffi::Error::Success();
  const Operand3 &rows = o.structure[0], &order = o.structure[1], &kptr = o.structure[2];
  const Dims d{o.result.batch, o.a.rows, o.result.cols, o.a.cols, o.b.cols, o.b.rows,
               blocks_check::Rows(o.a.cols, o.b.cols)};
  return DispatchFloat(kSpmmT, o.a.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const SpmmTArgs<T> a{Data<T>(o.a), Data<T>(o.b), Data<int32_t>(rows), Data<int32_t>(order),
                         Data<int32_t>(kptr), MutableData<T>(o.result), o.a.BatchStride(),
                         o.b.BatchStride(), rows.BatchStride(), order.BatchStride(),
                         kptr.BatchStride(), d};
    simt::Launch(kSpmmT, &BlocksSpmmTKernel<T>, GridFor(d.batch, d.tokens, d.k), Block(), 0,
                 stream, a);
    return LaunchStatus(kSpmmT);
  });
}

ffi::Error BlocksSddmm(simt::Stream stream, ffi::AnyBuffer x_buffer, ffi::AnyBuffer dy_buffer,
                       ffi::AnyBuffer indices_buffer, ffi::AnyBuffer rows_buffer,
                       ffi::Result<ffi::AnyBuffer> dv_buffer) {
  blocks_check::RowOperands o;
  JAXSPARSE_RETURN_IF_ERROR(blocks_check::CheckSddmmByRow(
      Validator(kSddmm), x_buffer, dy_buffer, indices_buffer, rows_buffer, *dv_buffer, &o));
  if (o.result.buffer->element_count() == 0) return ffi::Error::Success();
  const Operand3 &indices = o.structure[0], &rows = o.structure[1];
  const Dims d{o.result.batch, o.a.rows, o.a.cols, o.b.cols, o.result.cols, o.result.rows,
               blocks_check::Rows(o.b.cols, o.result.cols)};
  return DispatchFloat(kSddmm, o.a.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const SddmmArgs<T> a{Data<T>(o.a), Data<T>(o.b), Data<int32_t>(indices),
                         Data<int32_t>(rows), MutableData<T>(o.result), o.a.BatchStride(),
                         o.b.BatchStride(), indices.BatchStride(), rows.BatchStride(), d};
    simt::Launch(kSddmm, &BlocksSddmmKernel<T>, GridFor(d.batch, 1, d.nnz * d.n), Block(), 0,
                 stream, a);
    return LaunchStatus(kSddmm);
  });
}

}  // namespace
}  // namespace jaxsparse

#define JAXSPARSE_BLOCKS_BINDING4                                                           \
  .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>() \
      .Ret<ffi::AnyBuffer>()
#define JAXSPARSE_BLOCKS_BINDING5                                                           \
  .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>() \
      .Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()

JAXSPARSE_CUDA_TARGET(BlocksSpmm, "blocks_spmm", jaxsparse::BlocksSpmm, JAXSPARSE_BLOCKS_BINDING4);
JAXSPARSE_CUDA_TARGET(BlocksSpmmT, "blocks_spmm_t", jaxsparse::BlocksSpmmT,
                      JAXSPARSE_BLOCKS_BINDING5);
JAXSPARSE_CUDA_TARGET(BlocksSddmm, "blocks_sddmm", jaxsparse::BlocksSddmm,
                      JAXSPARSE_BLOCKS_BINDING4);
