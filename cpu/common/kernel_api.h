// What every format's CPU kernels share with the host side: the element type
// of a call and the runtime (XLA's thread pool and scratch memory).
//
// Plain data and declarations only. Per-ISA translation units (compiled with
// their own -m flags) include this header, so it must not define inline
// functions: the linker keeps one copy of an inline function per program, and
// a copy taken from the AVX-512 object would then also run on CPUs without
// AVX-512.
#ifndef JAXSPARSE_CPU_COMMON_KERNEL_API_H_
#define JAXSPARSE_CPU_COMMON_KERNEL_API_H_

#include <cstddef>
#include <cstdint>

namespace jaxsparse {
namespace cpu {

// The float element type of a call's dense operands, values and result.
enum class Dtype : int32_t { kF32, kBF16, kF16 };

// What the kernels need from the host: XLA's thread pool and scratch memory.
struct Runtime {
  // Runs task(ctx, i, worker) for every i in [0, num_tasks) and returns when
  // all have finished. `worker` is in [0, num_workers) and no two tasks run
  // concurrently with the same worker id, so it can index per-worker scratch.
  void (*parallel_for)(void* pool, int64_t num_tasks,
                       void (*task)(void* ctx, int64_t i, int worker),
                       void* ctx);
  void* pool;
  int num_workers;
  // A 64-byte aligned buffer of `bytes` for this call, or null when the memory
  // is not available. Valid until the kernel returns; one request per call.
  void* (*scratch)(void* owner, size_t bytes);
  void* scratch_owner;
  // The data cache of one core (its L2) in bytes, read once from the OS
  // (1 MB where it does not say). Blocking choices that depend on what stays
  // in L2 read it here instead of assuming one machine's size: 1 MB on
  // Zen 5, 2 MB on recent Xeons.
  int64_t l2_bytes;
};

}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_COMMON_KERNEL_API_H_
