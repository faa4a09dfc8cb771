// Per-output math of the N:M kernels (docs/ffi_abi.md), shared by the CUDA
// kernels and host code.
//
// Each function computes and stores one output element (one group of m inputs
// for spmm_t) in a fixed f32 order with fmaf, so a host build of this header
// (a CPU emulator, a test) reproduces the CUDA kernels bit for bit. It compiles
// as CUDA (__host__ __device__) and as plain C++17. T is float or a 16-bit
// float type converting to and from float (__nv_bfloat16, __half, or a host
// stand-in).
#ifndef JAXSPARSE_CUDA_NM_MATH_CUH_
#define JAXSPARSE_CUDA_NM_MATH_CUH_

#include <math.h>  // fmaf, a host and device function under nvcc

#include <cstdint>

#if defined(__CUDACC__)
#define JAXSPARSE_HD __host__ __device__ __forceinline__
#else
#define JAXSPARSE_HD inline
#endif
#include "cuda/simt.cuh"  // JAXSPARSE_UNROLL

namespace jaxsparse::nm {

// Largest group size m the format allows.
inline constexpr int kMaxM = 16;

// Sizes of one call, in elements. Operand batch dims are 1 or `batch`.
struct Dims {
  int64_t batch;   // B
  int64_t tokens;  // T
  int64_t in;      // K
  int64_t out;     // N
  int64_t groups;  // G = ceil(K / m)
  int64_t kept;    // Kc = G * n
  int32_t n;
  int32_t m;
};

// Offset of row `row` of an operand [operand_batch, rows, cols] at output
// batch b: a batch dim of 1 broadcasts. Each operand broadcasts on its own
// (values and indices too: a vmap may map one and not the other).
JAXSPARSE_HD int64_t RowOffset(int64_t operand_batch, int64_t b, int64_t rows,
                               int64_t row, int64_t cols) {
  return ((operand_batch == 1 ? 0 : b) * rows + row) * cols;
}

// Absolute input index of a kept entry of group g with in-group index idx, or
// -1 when it contributes nothing: it lies in the zero padding (>= K), or
// idx >= m (possible only for unvalidated indices under jit).
JAXSPARSE_HD int64_t KeptPosition(int64_t g, uint8_t idx, const Dims& d) {
  const int64_t pos = g * d.m + idx;
  return (idx < d.m && pos < d.in) ? pos : -1;
}

template <typename T>
struct SpmmArgs {
  const T* x;              // [x_batch, T, K]
  const T* values;         // [v_batch, N, Kc]
  const uint8_t* indices;  // [i_batch, N, Kc]
  T* y;                    // [B, T, N]
  int64_t x_batch;
  int64_t v_batch;
  int64_t i_batch;
  Dims d;
};

// y[b, t, j] = sum over c (ascending) of values[b, j, c] * xpad[b, t, pos(c)].
template <typename T>
JAXSPARSE_HD void SpmmElement(const SpmmArgs<T>& a, int64_t b, int64_t t,
                              int64_t j) {
  const Dims& d = a.d;
  const T* x = a.x + RowOffset(a.x_batch, b, d.tokens, t, d.in);
  const T* values = a.values + RowOffset(a.v_batch, b, d.out, j, d.kept);
  const uint8_t* indices =
      a.indices + RowOffset(a.i_batch, b, d.out, j, d.kept);
  float acc = 0.0f;
  for (int64_t g = 0; g < d.groups; ++g) {
    for (int s = 0; s < d.n; ++s) {
      const int64_t c = g * d.n + s;
      const int64_t pos = KeptPosition(g, indices[c], d);
      if (pos >= 0) {
        acc = fmaf(static_cast<float>(values[c]), static_cast<float>(x[pos]),
                   acc);
      }
    }
  }
  a.y[(b * d.tokens + t) * d.out + j] = static_cast<T>(acc);
}

template <typename T>
struct SpmmTArgs {
  const T* dy;             // [dy_batch, T, N]
  const T* values;         // [v_batch, N, Kc]
  const uint8_t* indices;  // [i_batch, N, Kc]
  T* dx;                   // [B, T, K]
  int64_t dy_batch;
  int64_t v_batch;
  int64_t i_batch;
  Dims d;
};

// dx[b, t, g*m + i] for the m inputs i of group g: the sum over rows j
// (ascending) and their n kept slots of group g (ascending) of
// values[b, j, c] * dy[b, t, j]. This gathers instead of scattering, so it
// needs no atomics and is deterministic.
//
// The kSlots >= m accumulators stay in registers because every index into
// them is a compile-time constant after unrolling; acc[idx] would put them in
// local memory. An unvalidated idx in [m, kSlots) lands in a slot that is never
// stored and an idx >= kSlots matches none, so it contributes nothing.
template <int kSlots, typename T>
JAXSPARSE_HD void SpmmTGroup(const SpmmTArgs<T>& a, int64_t b, int64_t t,
                             int64_t g) {
  const Dims& d = a.d;
  const T* dy = a.dy + RowOffset(a.dy_batch, b, d.tokens, t, d.out);
  const T* values = a.values + RowOffset(a.v_batch, b, d.out, 0, d.kept);
  const uint8_t* indices =
      a.indices + RowOffset(a.i_batch, b, d.out, 0, d.kept);
  float acc[kSlots] = {};
  for (int64_t j = 0; j < d.out; ++j) {
    const float dy_j = static_cast<float>(dy[j]);
    const int64_t c0 = j * d.kept + g * d.n;
    for (int s = 0; s < d.n; ++s) {
      const int idx = indices[c0 + s];
      const float v = static_cast<float>(values[c0 + s]);
      JAXSPARSE_UNROLL
      for (int i = 0; i < kSlots; ++i) {
        if (i == idx) acc[i] = fmaf(v, dy_j, acc[i]);
      }
    }
  }
  T* dx = a.dx + (b * d.tokens + t) * d.in + g * d.m;
  JAXSPARSE_UNROLL
  for (int i = 0; i < kSlots; ++i) {
    if (i < d.m && g * d.m + i < d.in) dx[i] = static_cast<T>(acc[i]);
  }
}

template <typename T>
struct SddmmArgs {
  const T* x;              // [x_batch, T, K]
  const T* dy;             // [dy_batch, T, N]
  const uint8_t* indices;  // [i_batch, N, Kc]
  T* dv;                   // [B, N, Kc]
  int64_t x_batch;
  int64_t dy_batch;
  int64_t i_batch;
  Dims d;
};

// dv[b, j, c] = sum over t (ascending) of xpad[b, t, pos(c)] * dy[b, t, j];
// zero where the entry contributes nothing.
template <typename T>
JAXSPARSE_HD void SddmmElement(const SddmmArgs<T>& a, int64_t b, int64_t j,
                               int64_t c) {
  const Dims& d = a.d;
  const uint8_t idx = a.indices[RowOffset(a.i_batch, b, d.out, j, d.kept) + c];
  const int64_t pos = KeptPosition(c / d.n, idx, d);
  float acc = 0.0f;
  if (pos >= 0) {
    const T* x = a.x + RowOffset(a.x_batch, b, d.tokens, 0, d.in) + pos;
    const T* dy = a.dy + RowOffset(a.dy_batch, b, d.tokens, 0, d.out) + j;
    for (int64_t t = 0; t < d.tokens; ++t) {
      acc = fmaf(static_cast<float>(x[t * d.in]),
                 static_cast<float>(dy[t * d.out]), acc);
    }
  }
  a.dv[(b * d.out + j) * d.kept + c] = static_cast<T>(acc);
}

}  // namespace jaxsparse::nm

#endif  // JAXSPARSE_CUDA_NM_MATH_CUH_
