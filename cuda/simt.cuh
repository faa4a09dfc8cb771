// Device helpers for jaxsparse's CUDA kernels, one source for two compilers:
// under nvcc each helper is the PTX instruction (inline asm); as host C++ it
// calls the SIMT emulator (cuda/emu/emu.h), which checks what the hardware
// leaves undefined. Kernels call only these helpers for barriers, warp
// collectives, tensor-core MMAs, cp.async and shared memory, and never test
// the compiler themselves: the #if lives here only.
//
// Shared memory is reached through Smem<T> handles into the launch's dynamic
// shared memory. On the GPU a handle is a plain pointer; emulated, every
// element access is bounds- and alignment-checked against the launch's size.
#ifndef JAXSPARSE_CUDA_SIMT_CUH_
#define JAXSPARSE_CUDA_SIMT_CUH_

#include <cstddef>
#include <cstdint>
#include <string>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define JAXSPARSE_DEV __device__ __forceinline__
#define JAXSPARSE_LAUNCH_BOUNDS(threads) __launch_bounds__(threads)
// Also asks ptxas to fit `blocks` resident blocks per SM: a register cap of
// 65536 / (threads * blocks), which it meets by rematerialising what it
// would otherwise keep live.
#define JAXSPARSE_LAUNCH_BOUNDS_MIN(threads, blocks) __launch_bounds__(threads, blocks)
#define JAXSPARSE_GRID_CONSTANT __grid_constant__
#else
#include <cstring>

#include "cuda/emu/emu.h"
// The CUDA keywords and built-in variables of a kernel, for the host compiler.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define threadIdx (::jaxsparse::emu::ThreadIdx())
#define blockIdx (::jaxsparse::emu::BlockIdx())
#define blockDim (::jaxsparse::emu::BlockDim())
#define gridDim (::jaxsparse::emu::GridDim())
using dim3 = ::jaxsparse::emu::Dim3;
#define JAXSPARSE_DEV inline
#define JAXSPARSE_LAUNCH_BOUNDS(threads)
#define JAXSPARSE_LAUNCH_BOUNDS_MIN(threads, blocks)
#define JAXSPARSE_GRID_CONSTANT
#endif

// Only the device pass unrolls; a host compiler would warn on the pragma.
#if defined(__CUDA_ARCH__)
#define JAXSPARSE_UNROLL _Pragma("unroll")
#else
#define JAXSPARSE_UNROLL
#endif

namespace jaxsparse::simt {

constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------ shared memory

template <class T>
class Smem {
 public:
  JAXSPARSE_DEV Smem() : p_(nullptr) {}
  JAXSPARSE_DEV explicit Smem(T* p) : p_(p) {}
  JAXSPARSE_DEV T& operator[](size_t i) const {
#if !defined(__CUDACC__)
    emu::CheckShared(p_ + i, sizeof(T), alignof(T), "shared-memory element");
#endif
    return p_[i];
  }
  JAXSPARSE_DEV Smem operator+(ptrdiff_t i) const { return Smem(p_ + i); }
  template <class U>
  JAXSPARSE_DEV Smem<U> As() const {
    return Smem<U>(reinterpret_cast<U*>(p_));
  }
  JAXSPARSE_DEV T* raw() const { return p_; }

 private:
  T* p_;
};

#if defined(__CUDACC__)
extern __shared__ __align__(128) unsigned char jaxsparse_dynamic_smem[];
#endif

// `count` elements of T at `byte_offset` into the dynamic shared memory.
template <class T>
JAXSPARSE_DEV Smem<T> DynamicSmem(size_t byte_offset) {
#if defined(__CUDACC__)
  return Smem<T>(reinterpret_cast<T*>(jaxsparse_dynamic_smem + byte_offset));
#else
  return Smem<T>(reinterpret_cast<T*>(emu::SharedBase() + byte_offset));
#endif
}

// Where 16-byte piece `piece` of tile row `row` is stored when rows hold
// kPieces (4 or 8) pieces: XOR-swizzled so that the 8 row addresses of one
// ldmatrix phase (same logical piece, 8 consecutive rows) fall in 8
// distinct 16-byte bank groups of the 128-byte bank line. With 64-byte rows
// (4 pieces) rows r and r + 2 would collide, with 128-byte rows all 8 would.
template <int kPieces>
JAXSPARSE_DEV int SwizzledPiece(int row, int piece) {
  static_assert(kPieces == 4 || kPieces == 8, "rows of 64 or 128 bytes");
  return piece ^ static_cast<int>((static_cast<unsigned>(row) / (8 / kPieces)) % kPieces);
}

#if defined(__CUDACC__)
JAXSPARSE_DEV uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// ------------------------------------------------------------ threads

JAXSPARSE_DEV int LaneId() {
#if defined(__CUDACC__)
  return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) & 31;
#else
  return emu::LaneId();
#endif
}

JAXSPARSE_DEV void SyncThreads() {
#if defined(__CUDACC__)
  __syncthreads();
#else
  emu::SyncThreads();
#endif
}

JAXSPARSE_DEV uint32_t ShflIdx(unsigned mask, uint32_t v, int src, int width = 32) {
#if defined(__CUDACC__)
  return __shfl_sync(mask, v, src, width);
#else
  return emu::Shfl(mask, v, src, width, emu::ShflMode::kIdx);
#endif
}

JAXSPARSE_DEV uint32_t ShflXor(unsigned mask, uint32_t v, int lane_mask, int width = 32) {
#if defined(__CUDACC__)
  return __shfl_xor_sync(mask, v, lane_mask, width);
#else
  return emu::Shfl(mask, v, lane_mask, width, emu::ShflMode::kXor);
#endif
}

JAXSPARSE_DEV uint32_t ShflDown(unsigned mask, uint32_t v, int delta, int width = 32) {
#if defined(__CUDACC__)
  return __shfl_down_sync(mask, v, delta, width);
#else
  return emu::Shfl(mask, v, delta, width, emu::ShflMode::kDown);
#endif
}

JAXSPARSE_DEV uint32_t ShflUp(unsigned mask, uint32_t v, int delta, int width = 32) {
#if defined(__CUDACC__)
  return __shfl_up_sync(mask, v, delta, width);
#else
  return emu::Shfl(mask, v, delta, width, emu::ShflMode::kUp);
#endif
}

JAXSPARSE_DEV float ShflXorF32(unsigned mask, float v, int lane_mask) {
#if defined(__CUDACC__)
  return __shfl_xor_sync(mask, v, lane_mask);
#else
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  u = emu::Shfl(mask, u, lane_mask, 32, emu::ShflMode::kXor);
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

JAXSPARSE_DEV uint32_t Ballot(unsigned mask, bool predicate) {
#if defined(__CUDACC__)
  return __ballot_sync(mask, predicate);
#else
  return emu::Ballot(mask, predicate);
#endif
}

JAXSPARSE_DEV bool Any(unsigned mask, bool predicate) {
#if defined(__CUDACC__)
  return __any_sync(mask, predicate);
#else
  return emu::Ballot(mask, predicate) != 0;
#endif
}

JAXSPARSE_DEV bool All(unsigned mask, bool predicate) {
#if defined(__CUDACC__)
  return __all_sync(mask, predicate);
#else
  return emu::Ballot(mask, predicate) == mask;
#endif
}

// ------------------------------------------------------------ ldmatrix

// ldmatrix.sync.aligned.m8n8.x{kNum}{.trans}.shared.b16: lane i < 8 * kNum
// gives the 16-byte row i % 8 of matrix i / 8; r[j] receives matrix j's
// elements for this lane (row lane/4, columns 2(lane%4)..+1; transposed
// with kTrans). It feeds mma fragments straight from shared memory with one
// instruction per 1-4 8x8 tiles instead of 4-16 scalar loads.
template <int kNum, bool kTrans = false>
JAXSPARSE_DEV void Ldmatrix(uint32_t (&r)[kNum], Smem<uint16_t> row) {
  static_assert(kNum == 1 || kNum == 2 || kNum == 4, "ldmatrix is x1, x2 or x4");
#if defined(__CUDACC__)
  const uint32_t a = SharedAddress(row.raw());
  if constexpr (kNum == 1 && !kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  } else if constexpr (kNum == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  } else if constexpr (kNum == 2 && !kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  } else if constexpr (kNum == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  } else if constexpr (!kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  }
#else
  emu::Ldmatrix(kNum, kTrans, row.raw(), r);
#endif
}

// ------------------------------------------------------------ cp.async

// cp.async of kBytes (4, 8 or 16) global -> shared, bypassing registers so a
// block can stage the next tiles while its warps compute on the current ones.
// src_bytes < kBytes zero-fills the tail (tile edges read no memory past an
// operand). 16-byte copies use .cg (L2 only: the tile is read once per
// block), smaller ones .ca (the only form the ISA allows for them).
template <int kBytes, class T>
JAXSPARSE_DEV void CpAsync(Smem<T> dst, const void* src, int src_bytes = kBytes) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(__CUDACC__)
  const uint32_t d = SharedAddress(dst.raw());
  if constexpr (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                 "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d), "l"(src),
                 "n"(kBytes), "r"(src_bytes));
  }
#else
  emu::CpAsync(dst.raw(), src, kBytes, src_bytes);
#endif
}

JAXSPARSE_DEV void CpAsyncCommit() {
#if defined(__CUDACC__)
  asm volatile("cp.async.commit_group;\n" ::);
#else
  emu::CpAsyncCommit();
#endif
}

// Waits until at most kPending committed groups are still in flight.
template <int kPending>
JAXSPARSE_DEV void CpAsyncWait() {
#if defined(__CUDACC__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#else
  emu::CpAsyncWait(kPending);
#endif
}

// ------------------------------------------------------------ tensor cores

enum class MmaType { kBf16, kF16 };

// ------------------------------------------------------------ per-thread bit and 16-bit arithmetic

// lop3.b32: any 3-input bitwise function in one instruction; bit i of the
// result is bit ((a_i << 2) | (b_i << 1) | c_i) of the truth table kImm.
// (0xf0 & 0xcc) | 0xaa, for instance, is (a & b) | c: the mask-and-or of the
// int4 dequantisation in one instruction instead of two.
template <uint32_t kImm>
JAXSPARSE_DEV uint32_t Lop3(uint32_t a, uint32_t b, uint32_t c) {
  static_assert(kImm <= 0xff, "lop3 takes an 8-bit truth table");
#if defined(__CUDACC__)
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(kImm));
  return d;
#else
  return emu::Lop3(a, b, c, kImm);
#endif
}

// Two 16-bit floats per register (element 0 in bits 0-15), rounded to
// nearest even, subnormals kept. f16 uses {sub,mul,fma}.rn.f16x2 (sm_53+).
// bf16 sub and mul exist only from sm_90, so both are fma.rn.bf16x2 (sm_80):
// a * 1 + (-b) and a * b + (-0), the same single rounding; the sign flip of b
// is an XOR of the sign bits, exact for every value.
constexpr uint32_t kBf16x2One = 0x3f803f80u;
constexpr uint32_t kSignBits16x2 = 0x80008000u;

template <MmaType kType>
JAXSPARSE_DEV uint32_t Fma16x2(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDACC__)
  uint32_t d;
  if constexpr (kType == MmaType::kBf16) {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  } else {
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  }
  return d;
#else
  return emu::Packed16(kType == MmaType::kBf16 ? emu::MmaType::kBf16 : emu::MmaType::kF16,
                       emu::PackedOp::kFma, a, b, c);
#endif
}

template <MmaType kType>
JAXSPARSE_DEV uint32_t Sub16x2(uint32_t a, uint32_t b) {
#if defined(__CUDACC__)
  if constexpr (kType == MmaType::kBf16) {
    return Fma16x2<kType>(a, kBf16x2One, b ^ kSignBits16x2);
  } else {
    uint32_t d;
    asm("sub.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
    return d;
  }
#else
  return emu::Packed16(kType == MmaType::kBf16 ? emu::MmaType::kBf16 : emu::MmaType::kF16,
                       emu::PackedOp::kSub, a, b, 0);
#endif
}

template <MmaType kType>
JAXSPARSE_DEV uint32_t Mul16x2(uint32_t a, uint32_t b) {
#if defined(__CUDACC__)
  if constexpr (kType == MmaType::kBf16) {
    return Fma16x2<kType>(a, b, kSignBits16x2);
  } else {
    uint32_t d;
    asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
    return d;
  }
#else
  return emu::Packed16(kType == MmaType::kBf16 ? emu::MmaType::kBf16 : emu::MmaType::kF16,
                       emu::PackedOp::kMul, a, b, 0);
#endif
}


// The f32 accumulator layout of an m16n8 tile (PTX ISA): register i of lane
// 4g + t holds row g + 8 * (i >> 1), column 2t + (i & 1). Calls
// f(row, column, value) for a warp's kTiles n8 tiles side by side (column +
// 8 * tile): the epilogues write their results through it.
template <int kTiles, class F>
JAXSPARSE_DEV void ForEachAccumulator(int lane, const float (&acc)[kTiles][4], const F& f) {
  const int g = lane >> 2, t = lane & 3;
  JAXSPARSE_UNROLL
  for (int nt = 0; nt < kTiles; ++nt) {
    JAXSPARSE_UNROLL
    for (int i = 0; i < 4; ++i) f(g + 8 * (i >> 1), 8 * nt + 2 * t + (i & 1), acc[nt][i]);
  }
}

// D = A B + C, mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: per lane
// A in a[4], B in b[2], C and D in 4 f32 (PTX ISA fragment layouts).
template <MmaType kType>
JAXSPARSE_DEV void MmaM16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                               const float (&c)[4]) {
#if defined(__CUDACC__)
  if constexpr (kType == MmaType::kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
          "f"(c[1]), "f"(c[2]), "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
          "f"(c[1]), "f"(c[2]), "f"(c[3]));
  }
#else
  emu::MmaM16n8k16(kType == MmaType::kBf16 ? emu::MmaType::kBf16 : emu::MmaType::kF16, a, b,
                   c, d);
#endif
}

// D = A B + C on the sparse tensor cores:
// mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{bf16,f16}.
// A is 16 x 32 with 2 of every 4 columns kept: a[4] holds the packed 16 x 16
// values in the dense m16n8k16 A layout, `metadata` the 2-bit positions
// (rows g / g + 8 in the low / high half), read from lanes 4g + 2 * kSelector
// and 4g + 2 * kSelector + 1. ordered_metadata (positions increasing inside
// a chunk) is the form the ISA recommends for speed on every target.
template <MmaType kType, int kSelector>
JAXSPARSE_DEV void MmaSpM16n8k32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                 const float (&c)[4], uint32_t metadata) {
  static_assert(kSelector == 0 || kSelector == 1, "m16n8k32 takes sparsity selector 0 or 1");
#if defined(__CUDACC__)
  if constexpr (kType == MmaType::kBf16) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%12,%13,%14,%15}, %16, %17;\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
          "r"(b[3]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]), "r"(metadata), "n"(kSelector));
  } else {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%12,%13,%14,%15}, %16, %17;\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
          "r"(b[3]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]), "r"(metadata), "n"(kSelector));
  }
#else
  emu::MmaSpM16n8k32(kType == MmaType::kBf16 ? emu::MmaType::kBf16 : emu::MmaType::kF16, true,
                     a, b, c, metadata, kSelector, d);
#endif
}

// ------------------------------------------------------------ host side

#if defined(__CUDACC__)
using Stream = cudaStream_t;
using Bf16 = __nv_bfloat16;
using Half = __half;

// The error of the last launch ("" when none). cudaGetLastError may also
// return an error left by an earlier asynchronous launch on this device.
inline std::string LastLaunchError() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

inline std::string MemsetAsync(void* p, size_t bytes, Stream stream) {
  const cudaError_t err = cudaMemsetAsync(p, 0, bytes, stream);
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}
#else
using Stream = void*;

// Host stand-ins for the 16-bit float types: storage plus the conversions
// the kernels use (static_cast to and from float, round to nearest even).
struct Bf16 {
  uint16_t bits;
  Bf16() = default;
  explicit Bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = static_cast<uint16_t>((u >> 16) | 0x40u);  // Quiet NaN.
    } else {
      bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  explicit operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
};

struct Half {
  uint16_t bits;
  Half() = default;
  explicit Half(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    const uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) {
      bits = sign | 0x7e00u;  // NaN.
    } else if (abs >= 0x477ff000u) {
      bits = sign | 0x7c00u;  // Rounds past 65504: infinity.
    } else if (abs < 0x38800000u) {
      // Subnormal (or zero) in f16: scale to an integer count of 2^-24 and
      // round to nearest even.
      float mag;
      std::memcpy(&mag, &abs, sizeof(mag));
      const float scaled = mag * 16777216.0f;  // 2^24, exact.
      uint32_t q = static_cast<uint32_t>(scaled);
      const float rest = scaled - static_cast<float>(q);
      if (rest > 0.5f || (rest == 0.5f && (q & 1u))) ++q;
      bits = sign | static_cast<uint16_t>(q);
    } else {
      const uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
      bits = sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
    }
  }
  explicit operator float() const {
    const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
    uint32_t exponent = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu, u;
    if (exponent == 0x1f) {
      u = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent == 0) {
      const float m = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
      std::memcpy(&u, &m, sizeof(u));
      u |= sign;
    } else {
      u = sign | ((exponent + 112) << 23) | (mantissa << 13);
    }
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
};

// Emulated launches run synchronously and raise emu::Error themselves.
inline std::string LastLaunchError() { return std::string(); }

inline std::string MemsetAsync(void* p, size_t bytes, Stream) {
  std::memset(p, 0, bytes);
  return std::string();
}
#endif

// ------------------------------------------------------------ launch

// kernel<<<grid, block, smem_bytes, stream>>>(args...) on the GPU; emulated,
// the launch runs to completion on the calling thread (and raises
// emu::Error when the kernel breaks a rule). `name` labels emulator errors.
#if defined(__CUDACC__)
template <class... KArgs, class... Args>
void Launch(const char* /*name*/, void (*kernel)(KArgs...), dim3 grid, dim3 block,
            size_t smem_bytes, cudaStream_t stream, Args... args) {
  kernel<<<grid, block, smem_bytes, stream>>>(args...);
}
#else
template <class... KArgs, class... Args>
void Launch(const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block,
            size_t smem_bytes, void* /*stream*/, Args... args) {
  emu::Launch(name, grid, block, smem_bytes, [&] { kernel(args...); });
}
#endif

}  // namespace jaxsparse::simt

#endif  // JAXSPARSE_CUDA_SIMT_CUH_
