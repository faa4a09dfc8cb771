// The nanobind module jaxsparse._cpu: the FFI handlers of every format's CPU
// targets and the choice of instruction set their kernels use.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "cpu/common/amx_emulator.h"
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

// amx_emulator::RunProductForTest on Python bytes: c's bytes after the product.
nb::bytes AmxEmulatorProduct(const std::string& instruction, nb::bytes c,
                             std::pair<int, int> c_shape, nb::bytes a, std::pair<int, int> a_shape,
                             nb::bytes b, std::pair<int, int> b_shape) {
  const auto fits = [](const nb::bytes& buf, std::pair<int, int> shape) {
    return shape.first >= 0 && shape.second >= 0 &&
           buf.size() == static_cast<size_t>(shape.first) * static_cast<size_t>(shape.second);
  };
  if (!fits(c, c_shape) || !fits(a, a_shape) || !fits(b, b_shape))
    throw nb::value_error("amx_emulator_product: each buffer must hold rows x row bytes");
  std::string out(c.c_str(), c.size());
  const auto* a_bytes = reinterpret_cast<const uint8_t*>(a.c_str());
  const auto* b_bytes = reinterpret_cast<const uint8_t*>(b.c_str());
  if (!amx_emulator::RunProductForTest(instruction.c_str(), reinterpret_cast<uint8_t*>(out.data()),
                                       c_shape.first, c_shape.second, a_bytes, a_shape.first,
                                       a_shape.second, b_bytes, b_shape.first, b_shape.second))
    throw nb::value_error(("amx_emulator_product: instruction must be tdpbf16ps or tdpbssd; got " +
                           instruction).c_str());
  return nb::bytes(out.data(), out.size());
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
  m.def("amx_emulated", &jc::AmxEmulated,
        "True when \"amx\" runs the AMX units on the tile emulator (JAXSPARSE_EMULATE_AMX=1).");
  m.def("amx_emulator_products", &jc::amx_emulator::ProductCount,
        "The tile products (tdpbf16ps, tdpbssd) the AMX emulator has run in this process.");
  m.def("amx_emulator_product", &jc::AmxEmulatorProduct, nb::arg("instruction"), nb::arg("c"),
        nb::arg("c_shape"), nb::arg("a"), nb::arg("a_shape"), nb::arg("b"), nb::arg("b_shape"),
        "c after one emulated tile product (tests): buffers as bytes, shapes as (rows, row bytes).");
  // JAXSPARSE_CPU_ISA forces a choice at import; a name this machine cannot
  // run fails the import rather than silently measuring another path.
  if (const char* forced = std::getenv("JAXSPARSE_CPU_ISA");
      forced && *forced) {
    jc::SetIsa(forced);
  }
}
