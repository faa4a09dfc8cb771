// The `_cuda` extension: the CUDA handlers of the jaxsparse FFI targets.
//
// Host-compiled so nanobind stays out of nvcc; jaxsparse/_ffi.py registers the
// capsules with jax.ffi.register_ffi_target(name, capsule, platform="CUDA").
#include <nanobind/nanobind.h>

#include "cuda/ffi_capsule.h"
#include "cuda/nm_ops.h"

namespace nb = nanobind;

namespace {

using jaxsparse::EncapsulateHandler;

nb::dict Registrations() {
  nb::dict targets;
  targets["jaxsparse_nm_spmm"] = EncapsulateHandler(JaxsparseCudaNmSpmm);
  targets["jaxsparse_nm_spmm_t"] = EncapsulateHandler(JaxsparseCudaNmSpmmT);
  targets["jaxsparse_nm_sddmm"] = EncapsulateHandler(JaxsparseCudaNmSddmm);
  targets["jaxsparse_nm_spmm_sp24"] = EncapsulateHandler(JaxsparseCudaNmSpmmSp24);
  return targets;
}

}  // namespace

NB_MODULE(_cuda, m) {
  m.doc() = "CUDA handlers of the jaxsparse XLA FFI targets.";
  m.def("registrations", &Registrations,
        "Target name -> capsule of its XLA FFI handler (platform CUDA).");
}
