// Per-output math of the V:N:M CUDA-core kernels (the ABI: cpu/vnm/vnm_checks.h),
// the generic path for f32, and for both backward ops at every dtype.
//
// Weight W [K, N], spec V:N:M: G = ceil(K/m) groups of m inputs, P = ceil(N/v)
// panels of v outputs. columns [P, G*4] holds each panel's 4 selected inputs
// per group, values / indices [N, G*n] each output's n kept values and their
// slots (0..3) among the 4. Kept entry c of output r reads input
//   k = (c/n)*m + columns[r/v][4*(c/n) + indices[r][c]].
// An entry contributes nothing when its slot is > 3, its column >= m (possible
// only for unvalidated data under jit) or k >= K (the ragged last group).
//
// Each function computes and stores one output element in a fixed f32 order
// with fmaf. It compiles as CUDA (__host__ __device__) and as plain C++17 for
// the SIMT emulator. T is float or a 16-bit float type converting to and from
// float.
#ifndef JAXSPARSE_CUDA_VNM_VNM_MATH_CUH_
#define JAXSPARSE_CUDA_VNM_VNM_MATH_CUH_

#include <math.h>  // fmaf, a host and device function under nvcc

#include <cstdint>

#include "cuda/simt.cuh"

#if defined(__CUDACC__)
#define JAXSPARSE_VNM_HD __host__ __device__ __forceinline__
#else
#define JAXSPARSE_VNM_HD inline
#endif

namespace jaxsparse::vnm {

// The selected inputs a panel keeps per group (2:4 inside them for n = 2).
inline constexpr int kSelected = 4;

// Sizes of one call, in elements. Operand batch dims are 1 or `batch`.
struct Dims {
  int64_t batch;   // B
  int64_t tokens;  // T
  int64_t in;      // K
  int64_t out;     // N
  int64_t groups;  // G = ceil(K / m)
  int64_t kept;    // Kc = G * n
  int32_t v, n, m;
};

// Batch strides in elements (0 where an operand's batch of 1 broadcasts).
struct Strides {
  int64_t a, b, indices, columns;  // the two float operands, then the weight's positions
};

// Input k of kept entry c (group g = c / n) whose slot is `slot`, read through
// the panel's column row; -1 when the entry contributes nothing. A slot > 3
// is never used as an offset, so garbage reads stay inside the panel's group.
JAXSPARSE_VNM_HD int64_t KeptInput(const uint8_t* panel_columns, uint8_t slot, int64_t g,
                                   const Dims& d) {
  if (slot >= kSelected) return -1;
  const int col = panel_columns[kSelected * g + slot];
  const int64_t k = g * d.m + col;
  return (col < d.m && k < d.in) ? k : -1;
}

template <typename T>
struct SpmmArgs {
  const T* x;              // [Bx, T, K]
  const T* values;         // [Bw, N, Kc]
  const uint8_t* indices;  // [Bw, N, Kc]
  const uint8_t* columns;  // [Bw, P, G*4]
  T* y;                    // [B, T, N]
  Strides s;               // a = x, b = values
  Dims d;
};

// y[b, t, r] = sum over c (ascending) of values[r, c] * x[t, k(r, c)].
template <typename T>
JAXSPARSE_VNM_HD void SpmmElement(const SpmmArgs<T>& a, int64_t b, int64_t t, int64_t r) {
  const Dims& d = a.d;
  const T* x = a.x + b * a.s.a + t * d.in;
  const T* values = a.values + b * a.s.b + r * d.kept;
  const uint8_t* indices = a.indices + b * a.s.indices + r * d.kept;
  const uint8_t* columns = a.columns + b * a.s.columns + (r / d.v) * d.groups * kSelected;
  // Groups, then their n slots: no 64-bit division per entry (c / n made
  // ptxas spill the 16-bit kernels).
  float acc = 0.0f;
  for (int64_t g = 0, c = 0; g < d.groups; ++g) {
    for (int j = 0; j < d.n; ++j, ++c) {
      const int64_t k = KeptInput(columns, indices[c], g, d);
      if (k >= 0) acc = fmaf(static_cast<float>(values[c]), static_cast<float>(x[k]), acc);
    }
  }
  a.y[(b * d.tokens + t) * d.out + r] = static_cast<T>(acc);
}

template <typename T>
struct SpmmTArgs {
  const T* dy;             // [By, T, N]
  const T* values;         // [Bw, N, Kc]
  const uint8_t* indices;  // [Bw, N, Kc]
  const uint8_t* columns;  // [Bw, P, G*4]
  T* dx;                   // [B, T, K]
  Strides s;               // a = dy, b = values
  Dims d;
};

// dx[b, t, k]: the sum over panels p (ascending), the slots s of group
// g = k / m whose column is k % m, the panel's rows r and their kept entries
// of group g in slot s, of values[r, c] * dy[t, r]. A gather per input, not a
// scatter: no atomics, deterministic. A thread whose input no panel selects
// does only 4 compares per panel.
template <typename T>
JAXSPARSE_VNM_HD void SpmmTElement(const SpmmTArgs<T>& a, int64_t b, int64_t t, int64_t k) {
  const Dims& d = a.d;
  const int64_t g = k / d.m;
  const int col = static_cast<int>(k - g * d.m);
  const T* dy = a.dy + b * a.s.a + t * d.out;
  const T* values = a.values + b * a.s.b;
  const uint8_t* indices = a.indices + b * a.s.indices;
  const uint8_t* columns = a.columns + b * a.s.columns + g * kSelected;
  const int64_t panels = (d.out + d.v - 1) / d.v;
  float acc = 0.0f;
  for (int64_t p = 0; p < panels; ++p) {
    const uint8_t* selected = columns + p * d.groups * kSelected;
    for (int s = 0; s < kSelected; ++s) {
      if (selected[s] != col) continue;
      const int64_t r_end = (p + 1) * d.v < d.out ? (p + 1) * d.v : d.out;
      for (int64_t r = p * d.v; r < r_end; ++r) {
        const float dy_r = static_cast<float>(dy[r]);
        for (int j = 0; j < d.n; ++j) {
          const int64_t c = r * d.kept + g * d.n + j;
          if (indices[c] == s) acc = fmaf(static_cast<float>(values[c]), dy_r, acc);
        }
      }
    }
  }
  a.dx[(b * d.tokens + t) * d.in + k] = static_cast<T>(acc);
}

template <typename T>
struct SddmmArgs {
  const T* x;              // [Bx, T, K]
  const T* dy;             // [By, T, N]
  const uint8_t* indices;  // [Bw, N, Kc]
  const uint8_t* columns;  // [Bw, P, G*4]
  T* dv;                   // [B, N, Kc]
  Strides s;               // a = x, b = dy
  Dims d;
};

// dv[b, r, c] = sum over t (ascending) of x[t, k(r, c)] * dy[t, r]; zero
// where the entry contributes nothing.
template <typename T>
JAXSPARSE_VNM_HD void SddmmElement(const SddmmArgs<T>& a, int64_t b, int64_t r, int64_t c) {
  const Dims& d = a.d;
  const uint8_t slot = a.indices[b * a.s.indices + r * d.kept + c];
  const uint8_t* columns = a.columns + b * a.s.columns + (r / d.v) * d.groups * kSelected;
  const int64_t k = KeptInput(columns, slot, c / d.n, d);
  float acc = 0.0f;
  if (k >= 0) {
    const T* x = a.x + b * a.s.a + k;
    const T* dy = a.dy + b * a.s.b + r;
    for (int64_t t = 0; t < d.tokens; ++t) {
      acc = fmaf(static_cast<float>(x[t * d.in]), static_cast<float>(dy[t * d.out]), acc);
    }
  }
  a.dv[(b * d.out + r) * d.kept + c] = static_cast<T>(acc);
}

}  // namespace jaxsparse::vnm

#endif  // JAXSPARSE_CUDA_VNM_VNM_MATH_CUH_
