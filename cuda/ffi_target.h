// Defines and registers one CUDA FFI target from a handler function
// `ffi::Error fn(simt::Stream, operands..., attributes..., results...)`, in
// both builds of a format's .cu file:
//
// - under nvcc: the handler symbol JaxsparseCuda<Suffix> with XLA's CUDA
//   stream, registered as target "jaxsparse_<name>" of the _cuda module;
// - as host C++ against the SIMT emulator (cuda/emu): the symbol
//   JaxsparseEmu<Suffix>, a CPU handler that runs each launch to completion,
//   registered as "jaxsparse_emu_<name>" of the _cuda_emu module. An emulator
//   error (emu::Error: a rule of the ISA broken) becomes an Internal error
//   naming the target.
//
// So a format's CUDA targets are named once, in its .cu file.
#ifndef JAXSPARSE_CUDA_FFI_TARGET_H_
#define JAXSPARSE_CUDA_FFI_TARGET_H_

#include <exception>
#include <string>

#include "cpu/common/ffi.h"
#include "cpu/common/targets.h"
#include "cuda/simt.cuh"

#if defined(__CUDACC__)

// The handlers only enqueue memsets and kernels on XLA's stream, so XLA may
// capture them into CUDA graphs (command buffers).
#define JAXSPARSE_CUDA_TARGET(Suffix, name, fn, ...)                           \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                              \
      JaxsparseCuda##Suffix, fn,                                              \
      ::xla::ffi::Ffi::Bind()                                                 \
          .Ctx<::xla::ffi::PlatformStream<cudaStream_t>>() __VA_ARGS__,       \
      {::xla::ffi::Traits::kCmdBufferCompatible});                            \
  JAXSPARSE_REGISTER_TARGET(kCuda, "jaxsparse_" name, JaxsparseCuda##Suffix)

#else  // Emulated.

namespace jaxsparse {

template <const char* kName, auto kFn>
struct Emulated;

// fn(nullptr, args...): no stream, the emulator runs each launch at once.
template <const char* kName, class... Args,
          ::xla::ffi::Error (*kFn)(simt::Stream, Args...)>
struct Emulated<kName, kFn> {
  static ::xla::ffi::Error Call(Args... args) {
    try {
      return kFn(nullptr, args...);
    } catch (const std::exception& e) {
      return ::xla::ffi::Error::Internal(std::string(kName) +
                                         " (emulated CUDA): " + e.what());
    }
  }
};

}  // namespace jaxsparse

#define JAXSPARSE_CUDA_TARGET(Suffix, name, fn, ...)                         \
  static constexpr char kJaxsparseEmuName##Suffix[] = "jaxsparse_" name;    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                            \
      JaxsparseEmu##Suffix,                                                 \
      (::jaxsparse::Emulated<kJaxsparseEmuName##Suffix, fn>::Call),         \
      ::xla::ffi::Ffi::Bind() __VA_ARGS__);                                 \
  JAXSPARSE_REGISTER_TARGET(kCudaEmu, "jaxsparse_emu_" name,                \
                            JaxsparseEmu##Suffix)

#endif  // __CUDACC__

#endif  // JAXSPARSE_CUDA_FFI_TARGET_H_
