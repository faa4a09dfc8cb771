// The typed XLA FFI handlers of the CUDA targets (docs/ffi_abi.md):
// jaxsparse_nm_spmm, jaxsparse_nm_spmm_t, jaxsparse_nm_sddmm and
// jaxsparse_nm_spmm_sp24.
//
// Defined in nm_ops.cu, handed to Python by module.cc; this header stays free
// of CUDA and nanobind so both compilers can read it.
#ifndef JAXSPARSE_CUDA_NM_OPS_H_
#define JAXSPARSE_CUDA_NM_OPS_H_

// nvcc's host pass sees the XLA headers' exhaustive enum switches fall off the
// end of non-void functions; silence that there, not in our code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wreturn-type"
#include "xla/ffi/api/api.h"
#pragma GCC diagnostic pop

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxsparseCudaNmSpmm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxsparseCudaNmSpmmT);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxsparseCudaNmSddmm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxsparseCudaNmSpmmSp24);

// The same handlers compiled as host C++ against the SIMT emulator
// (cuda/emu), registered as CPU targets by the _cuda_emu module.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxsparseEmuNmSpmm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxsparseEmuNmSpmmT);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxsparseEmuNmSddmm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxsparseEmuNmSpmmSp24);

#endif  // JAXSPARSE_CUDA_NM_OPS_H_
