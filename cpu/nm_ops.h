// The typed XLA FFI handlers of the CPU targets (docs/ffi_abi.md):
// jaxsparse_nm_spmm, jaxsparse_nm_spmm_t and jaxsparse_nm_sddmm.
#ifndef JAXSPARSE_CPU_NM_OPS_H_
#define JAXSPARSE_CPU_NM_OPS_H_

// The XLA headers trip -Wextra (unused parameters, sign compares); keep our
// own code's warnings visible by silencing theirs.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wreturn-type"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#include "xla/ffi/api/ffi.h"
#pragma GCC diagnostic pop

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxsparseCpuNmSpmm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxsparseCpuNmSpmmT);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxsparseCpuNmSddmm);

#endif  // JAXSPARSE_CPU_NM_OPS_H_
