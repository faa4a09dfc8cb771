// The FFI targets of each extension module, collected at static
// initialisation: a format's handler file names each of its targets once, next
// to the handler (JAXSPARSE_REGISTER_TARGET), and the module's
// registrations() hands the list to Python. No module file lists formats.
#ifndef JAXSPARSE_CPU_COMMON_TARGETS_H_
#define JAXSPARSE_CPU_COMMON_TARGETS_H_

#include <vector>

namespace jaxsparse {

// The extension module a target belongs to (each is its own shared object,
// with its own copy of the list).
enum class TargetModule { kCpu, kCuda, kCudaEmu };

struct Target {
  const char* name;  // "jaxsparse_<format>_<op>" (an ABI: docs/ffi_abi.md)
  void* handler;     // an XLA_FFI_Handler*
};

// The targets registered so far for `module`, in registration order.
std::vector<Target>& RegisteredTargets(TargetModule module);

// Registers one target when constructed (a namespace-scope static object).
struct TargetRegistrar {
  TargetRegistrar(TargetModule module, const char* name, void* handler) {
    RegisteredTargets(module).push_back(Target{name, handler});
  }
};

}  // namespace jaxsparse

#define JAXSPARSE_TARGET_CONCAT_(a, b) a##b
#define JAXSPARSE_TARGET_CONCAT(a, b) JAXSPARSE_TARGET_CONCAT_(a, b)

// Registers the handler symbol `symbol` (from XLA_FFI_DEFINE_HANDLER_SYMBOL)
// as target `name` of `module` (a TargetModule enumerator).
#define JAXSPARSE_REGISTER_TARGET(module, name, symbol)                 \
  static const ::jaxsparse::TargetRegistrar JAXSPARSE_TARGET_CONCAT(    \
      jaxsparse_target_, __COUNTER__)(::jaxsparse::TargetModule::module, \
                                      name, reinterpret_cast<void*>(symbol))

#endif  // JAXSPARSE_CPU_COMMON_TARGETS_H_
