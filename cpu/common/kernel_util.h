// Helpers every format's kernel templates share: integer arithmetic, scratch
// carving, running jobs on XLA's pool, and unrolling by a run-time count.
//
// Included by a format's kernel header (cpu/<format>/<format>_kernels.h),
// itself included by one per-ISA translation unit that defines
// JAXSPARSE_KERNEL_ISA to its ISA's namespace (avx512, avx2, portable):
// everything here lives in that namespace, so the copies compiled with
// different -m flags never share a symbol (a shared inline copy could carry
// AVX-512 code to a CPU without it).
#ifndef JAXSPARSE_CPU_COMMON_KERNEL_UTIL_H_
#define JAXSPARSE_CPU_COMMON_KERNEL_UTIL_H_

#ifndef JAXSPARSE_KERNEL_ISA
#error "define JAXSPARSE_KERNEL_ISA (the namespace of this instantiation) first"
#endif

#include <cstdint>
#include <type_traits>

#include "cpu/common/kernel_api.h"

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_KERNEL_ISA {

constexpr int64_t kCacheLine = 64;

inline int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t Max(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t RoundUp(int64_t a, int64_t b) { return CeilDiv(a, b) * b; }

// Reads a byte of every cache line of [p, p + bytes), in address order, so a
// block that a kernel then reads as many streams side by side (rows of a
// weight) comes in as one stream, which the hardware prefetchers follow.
// Nothing for bytes <= 0.
inline void TouchLines(const void* p, int64_t bytes) {
  if (bytes <= 0) return;
  const uint8_t* at = static_cast<const uint8_t*>(p);
  uint32_t sink = 0;
  for (int64_t i = 0; i < bytes; i += kCacheLine) sink |= at[i];
  sink |= at[bytes - 1];
  asm volatile("" : : "r"(sink));  // The reads are the point: keep them.
}

// Asks for the cache lines of `rows` spans of `bytes` bytes, `stride` bytes
// apart from `p` (a column of a row-major weight, or its scales' rows), all
// at once and without waiting for them. A kernel calls it for what it reads
// first: its own prefetches run ahead of its walk, and the hardware's do not
// follow a walk across rows a page apart, so without it a weight not in cache
// (as in a model, where each product's weight comes from L3 or memory) comes
// in one miss after another for the first rows. Nothing for rows or bytes <= 0.
inline void PrefetchSpans(const void* p, int64_t stride, int64_t rows, int64_t bytes) {
  if (bytes <= 0) return;
  const uintptr_t base = reinterpret_cast<uintptr_t>(p);
  for (int64_t r = 0; r < rows; ++r) {
    const uintptr_t first = base + r * stride, last = first + bytes - 1;
    for (uintptr_t line = first & ~uintptr_t{kCacheLine - 1}; line <= last; line += kCacheLine) {
      __builtin_prefetch(reinterpret_cast<const void*>(line));
    }
  }
}

// Carves one scratch request into 64-byte aligned pieces: a first pass
// measures (base == nullptr), the second hands out pointers. An empty piece
// still takes a cache line, so no two pieces ever share an address.
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}
  template <class T>
  T* Take(int64_t count) {
    T* p = reinterpret_cast<T*>(base_ + used_);
    used_ += RoundUp(Max(count, 1) * static_cast<int64_t>(sizeof(T)), kCacheLine);
    return base_ != nullptr ? p : nullptr;
  }
  int64_t used() const { return used_; }

 private:
  char* base_;
  int64_t used_ = 0;
};

// Measures the layout of `op` (op.Layout(carver)), gets the scratch and lays
// it out for real. False when the memory is not available.
template <class Op>
bool TakeScratch(const Runtime& rt, Op& op) {
  Carver measure(nullptr);
  op.Layout(measure);
  void* base = rt.scratch(rt.scratch_owner, measure.used());
  if (base == nullptr) return false;
  Carver carve(static_cast<char*>(base));
  op.Layout(carve);
  return true;
}

// Runs job.Run(i, worker) for i in [0, num_tasks) on XLA's pool.
template <class Job>
void RunParallel(const Runtime& rt, int64_t num_tasks, const Job& job) {
  if (num_tasks <= 0) return;
  rt.parallel_for(
      rt.pool, num_tasks,
      [](void* ctx, int64_t i, int worker) {
        static_cast<const Job*>(ctx)->Run(i, worker);
      },
      const_cast<Job*>(&job));
}

// Calls f(std::integral_constant<int, k>) for a run-time k in [1, kMax], so
// each tile shape gets its own fully unrolled loops.
template <int kMax, class F>
void Dispatch(int k, F&& f) {
  if constexpr (kMax >= 1) {
    if (k == kMax) {
      f(std::integral_constant<int, kMax>{});
    } else {
      Dispatch<kMax - 1>(k, f);
    }
  }
}

}  // namespace JAXSPARSE_KERNEL_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_COMMON_KERNEL_UTIL_H_
