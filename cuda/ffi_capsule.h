// The capsule jax.ffi.register_ffi_target takes, for a typed XLA FFI handler
// symbol: what every extension module's registrations() returns per target.
#ifndef JAXSPARSE_CUDA_FFI_CAPSULE_H_
#define JAXSPARSE_CUDA_FFI_CAPSULE_H_

#include <nanobind/nanobind.h>

#include <type_traits>

#include "xla/ffi/api/c_api.h"

namespace jaxsparse {

template <typename Fn>
nanobind::capsule EncapsulateHandler(Fn* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, Fn, XLA_FFI_CallFrame*>,
                "an XLA FFI handler takes an XLA_FFI_CallFrame*");
  return nanobind::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace jaxsparse

#endif  // JAXSPARSE_CUDA_FFI_CAPSULE_H_
