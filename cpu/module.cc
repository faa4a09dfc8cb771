// The nanobind module jaxsparse._cpu: the FFI handlers of every format's CPU
// targets and the choice of instruction set their kernels use.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/common/isa.h"
#include "cpu/common/targets.h"

namespace nb = nanobind;

namespace jaxsparse {
namespace cpu {
namespace {

// Every target a format's handler file registered (cpu/<format>/*_ops.cc).
nb::dict Registrations() {
  nb::dict d;
  for (const Target& target : RegisteredTargets(TargetModule::kCpu)) {
    d[target.name] = nb::capsule(target.handler);
  }
  return d;
}

std::vector<std::string> SupportedIsaNames() {
  std::vector<std::string> names;
  for (Isa isa : SupportedIsas()) names.emplace_back(IsaName(isa));
  return names;
}

std::string SupportedList() {
  std::string s;
  for (const std::string& name : SupportedIsaNames())
    s += (s.empty() ? "" : ", ") + name;
  return s;
}

void SetIsa(const std::string& name) {
  Isa isa;
  if (!IsaFromName(name, &isa)) {
    throw nb::value_error(
        ("unknown ISA '" + name + "'; expected one of amx, avx512bf16, avx512, avx2, portable")
            .c_str());
  }
  if (!SetCurrentIsa(isa)) {
    throw nb::value_error(("this CPU cannot run ISA '" + name +
                           "'; supported: " + SupportedList())
                              .c_str());
  }
}

}  // namespace
}  // namespace cpu
}  // namespace jaxsparse

NB_MODULE(_cpu, m) {
  namespace jc = jaxsparse::cpu;
  m.doc() = "jaxsparse CPU kernels (XLA FFI handlers)";
  m.def("registrations", &jc::Registrations,
        "Target name -> capsule of its XLA FFI handler.");
  m.def(
      "isa", [] { return std::string(jc::IsaName(jc::CurrentIsa())); },
      "The instruction set the kernels currently use.");
  m.def("supported_isas", &jc::SupportedIsaNames,
        "The instruction sets this machine can run, best first.");
  m.def("set_isa", &jc::SetIsa, nb::arg("name"),
        "Use the kernels for `name` (ValueError if unknown or unsupported).");
  // JAXSPARSE_CPU_ISA forces a choice at import; a name this machine cannot
  // run fails the import rather than silently measuring another path.
  if (const char* forced = std::getenv("JAXSPARSE_CPU_ISA");
      forced && *forced) {
    jc::SetIsa(forced);
  }
}
