// The `_cuda` extension: the CUDA handlers of the jaxsparse FFI targets.
//
// Host-compiled so nanobind stays out of nvcc; jaxsparse/_ffi.py registers the
// capsules with jax.ffi.register_ffi_target(name, capsule, platform="CUDA").
#include <nanobind/nanobind.h>

#include "cpu/common/targets.h"

namespace nb = nanobind;

namespace {

// Every target a format's .cu file registered (cuda/ffi_target.h).
nb::dict Registrations() {
  nb::dict targets;
  for (const jaxsparse::Target& target :
       jaxsparse::RegisteredTargets(jaxsparse::TargetModule::kCuda)) {
    targets[target.name] = nb::capsule(target.handler);
  }
  return targets;
}

}  // namespace

NB_MODULE(_cuda, m) {
  m.doc() = "CUDA handlers of the jaxsparse XLA FFI targets.";
  m.def("registrations", &Registrations,
        "Target name -> capsule of its XLA FFI handler (platform CUDA).");
}
