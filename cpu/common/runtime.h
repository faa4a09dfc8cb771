// The host side of every format's CPU kernels: XLA's intra-op thread pool
// and per-call scratch memory behind the plain `Runtime` the kernels see
// (cpu/common/kernel_api.h), and the call wrapper every handler uses.
#ifndef JAXSPARSE_CPU_COMMON_RUNTIME_H_
#define JAXSPARSE_CPU_COMMON_RUNTIME_H_

#include <cstddef>
#include <cstdlib>
#include <exception>
#include <memory>

#include "cpu/common/ffi.h"
#include "cpu/common/kernel_api.h"
#include "cpu/common/targets.h"
#include "cpu/common/validate.h"

namespace jaxsparse {
namespace cpu {

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using AlignedPtr = std::unique_ptr<char, FreeDeleter>;

// The scratch of one call. Each calling thread keeps its buffer between
// calls (the kernels bound their requests to tens of MB), so steady-state
// calls neither allocate nor page-fault fresh memory. Requests above
// kKeepBytes (e.g. sddmm's f32 sums of a huge bf16/f16 gradient) get a buffer
// of their own, freed after the call.
class CallScratch {
 public:
  static void* Get(void* self, size_t bytes) {
    return static_cast<CallScratch*>(self)->Allocate(bytes);
  }

 private:
  static constexpr size_t kKeepBytes = size_t{64} << 20;
  void* Allocate(size_t bytes);
  AlignedPtr owned_;
};

// The kernels' element type of a checked float dtype (f32, bf16 or f16).
inline Dtype KernelDtype(xla::ffi::DataType t) {
  return t == xla::ffi::DataType::BF16  ? Dtype::kBF16
         : t == xla::ffi::DataType::F16 ? Dtype::kF16
                                        : Dtype::kF32;
}

// The Runtime of one call on XLA's pool, with `scratch` as its memory.
Runtime MakeRuntime(xla::ffi::ThreadPool& pool, CallScratch* scratch);

// Asks the OS to back the whole 2 MB pages inside a large result buffer with
// huge pages (Linux madvise(MADV_HUGEPAGE); a no-op elsewhere, for buffers
// under kHugeResultBytes, and where transparent huge pages are off). XLA's
// CPU client allocates each call's result afresh, and glibc serves 32 MB and
// more by a fresh mmap, so every call first-touches its result: measured on
// the 2-core Zen 5 (THP "madvise"), 32 MB written through 4 KB faults took
// 13 ms, through 2 MB faults 2 ms, a fifth of a 2048 x 4096 V:N:M forward.
// The advice changes no data, and a buffer already resident keeps its pages.
void AdviseHugePages(void* data, size_t bytes);

// Runs kernel(problem, runtime), which writes `result`, and turns its outcome
// into the handler's result: a kernel returns false only when scratch memory
// ran out.
template <class Problem>
xla::ffi::Error RunKernel(const Validator& v,
                          bool (*kernel)(const Problem&, const Runtime&),
                          const Problem& problem, xla::ffi::ThreadPool& pool,
                          xla::ffi::AnyBuffer result) {
  AdviseHugePages(result.untyped_data(), result.size_bytes());
  try {
    CallScratch scratch;
    if (kernel(problem, MakeRuntime(pool, &scratch))) {
      return xla::ffi::Error::Success();
    }
    return xla::ffi::Error(xla::ffi::ErrorCode::kResourceExhausted,
                           v.Prefix() + "out of memory for scratch buffers");
  } catch (const std::exception& e) {  // Nothing below throws; a guard.
    return xla::ffi::Error::Internal(v.Prefix() + e.what());
  }
}

}  // namespace cpu
}  // namespace jaxsparse

// Defines the CPU handler symbol `symbol` for `fn(ffi::ThreadPool, operands...,
// attributes..., result)` with the binding's operands, attributes and result
// (`.Arg<...>()...`, after XLA's thread pool), and registers it as target
// `name` of the _cpu module: a format names each CPU target once, here.
#define JAXSPARSE_CPU_TARGET(symbol, name, fn, ...)                      \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                         \
      symbol, fn,                                                        \
      ::xla::ffi::Ffi::Bind().Ctx<::xla::ffi::ThreadPool>() __VA_ARGS__); \
  JAXSPARSE_REGISTER_TARGET(kCpu, name, symbol)

#endif  // JAXSPARSE_CPU_COMMON_RUNTIME_H_
