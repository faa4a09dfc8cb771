// The XLA FFI API as every handler file (CPU, CUDA, emulated CUDA) includes
// it, and the one error-propagation macro they share.
#ifndef JAXSPARSE_CPU_COMMON_FFI_H_
#define JAXSPARSE_CPU_COMMON_FFI_H_

// The XLA headers trip -Wextra (unused parameters, sign compares) and, in
// nvcc's host pass, -Wreturn-type on exhaustive enum switches; keep our own
// code's warnings visible by silencing theirs, only here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wreturn-type"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#include "xla/ffi/api/ffi.h"
#pragma GCC diagnostic pop

#define JAXSPARSE_RETURN_IF_ERROR(expr)      \
  do {                                       \
    ::xla::ffi::Error jaxsparse_status_ = (expr); \
    if (jaxsparse_status_.failure()) {       \
      return jaxsparse_status_;              \
    }                                        \
  } while (false)

#endif  // JAXSPARSE_CPU_COMMON_FFI_H_
