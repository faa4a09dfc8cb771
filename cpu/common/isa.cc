#include "cpu/common/isa.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#ifdef JAXSPARSE_X86
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace jaxsparse {
namespace cpu {
namespace {

struct IsaInfo {
  Isa isa;
  const char* name;
};

// Best first.
constexpr IsaInfo kIsas[] = {
#ifdef JAXSPARSE_X86
#ifdef JAXSPARSE_AMX_KERNELS
    {Isa::kAmx, "amx"},
    {Isa::kAvx512Bf16, "avx512bf16"},
#endif
#ifdef JAXSPARSE_AVX512_KERNELS
    {Isa::kAvx512, "avx512"},
#endif
    {Isa::kAvx2, "avx2"},
#endif
    {Isa::kPortable, "portable"},
};

const IsaInfo* Find(Isa isa) {
  for (const IsaInfo& info : kIsas) {
    if (info.isa == isa) return &info;
  }
  return nullptr;
}

#ifdef JAXSPARSE_X86
// XCR0: the register state the OS saves on a context switch. The CPUID feature
// bits alone do not say the OS enabled the wider registers.
uint64_t ReadXcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

// Linux lends the AMX tile data (8 KB of state per thread) only to a process
// that asks (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); without
// it the first tile instruction faults. Asked once per process.
bool RequestTileData() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  static const bool granted = [] {
    constexpr int kArchReqXcompPerm = 0x1023;
    constexpr int kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
#else
  return false;
#endif
}

bool X86Supports(Isa isa) {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28);
  const bool fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave || !avx || !fma || !f16c) return false;
  const uint64_t xcr0 = ReadXcr0();
  constexpr uint64_t kYmmState = 0x6;   // SSE + AVX upper halves.
  constexpr uint64_t kZmmState = 0xe6;  // + opmask, ZMM0-15 upper, ZMM16-31.
  if ((xcr0 & kYmmState) != kYmmState) return false;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool avx2 = b & (1u << 5);
  if (isa == Isa::kAvx2) return avx2;
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 17)) &&  // F, DQ
                      (b & (1u << 30)) && (b & (1u << 31));    // BW, VL
  const bool zmm = avx2 && avx512 && (xcr0 & kZmmState) == kZmmState;
  if (isa == Isa::kAvx512) return zmm;
  // kAvx512Bf16: AVX512-BF16 (CPUID 7.1 EAX bit 5), AVX512-VBMI2 (7.0 ECX
  // bit 6) and AVX512-VNNI (7.0 ECX bit 11: its units are compiled with
  // -mavx512vnni, for the engine's int8 tiles on vpdpbusd). kAmx adds
  // AMX-BF16/TILE/INT8 (7.0 EDX bits 22, 24, 25), the tile state enabled in
  // XCR0 (bits 17, 18), and the process's permission to use the tile data,
  // which Linux grants on request.
  const bool vbmi2 = c & (1u << 6), vnni = c & (1u << 11);
  const bool amx = (d & (1u << 22)) && (d & (1u << 24)) && (d & (1u << 25));
  if (!zmm || !vbmi2 || !vnni || !__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  const bool avx512_bf16 = a & (1u << 5);
  if (isa == Isa::kAvx512Bf16) return avx512_bf16;
  constexpr uint64_t kTileState = uint64_t{3} << 17;
  return avx512_bf16 && amx && (xcr0 & kTileState) == kTileState && RequestTileData();
}
#endif

bool Supports(Isa isa) {
  if (isa == Isa::kPortable) return true;
#ifdef JAXSPARSE_X86
  // The emulated AMX units need the AMX units' other instructions.
  if (isa == Isa::kAmx && AmxEmulated()) return X86Supports(Isa::kAvx512Bf16);
  return X86Supports(isa);
#else
  return false;
#endif
}

Isa BestIsa() {
  for (const IsaInfo& info : kIsas) {
    if (Supports(info.isa)) return info.isa;
  }
  return Isa::kPortable;
}

std::atomic<Isa>& CurrentIsaSlot() {
  static std::atomic<Isa> current{BestIsa()};
  return current;
}

}  // namespace

bool AmxEmulated() {
#if defined(JAXSPARSE_AMX_KERNELS) && defined(JAXSPARSE_AMX_EMULATION)
  static const bool emulated = [] {
    const char* flag = std::getenv("JAXSPARSE_EMULATE_AMX");
    return flag != nullptr && std::strcmp(flag, "1") == 0;
  }();
  return emulated;
#else
  return false;
#endif
}

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kAmx:
      return "amx";
    case Isa::kAvx512Bf16:
      return "avx512bf16";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kPortable:
      return "portable";
  }
  return "unknown";
}

bool IsaFromName(const std::string& name, Isa* isa) {
  for (Isa candidate : {Isa::kAmx, Isa::kAvx512Bf16, Isa::kAvx512, Isa::kAvx2, Isa::kPortable}) {
    if (name == IsaName(candidate)) {
      *isa = candidate;
      return true;
    }
  }
  return false;
}

std::vector<Isa> SupportedIsas() {
  std::vector<Isa> isas;
  for (const IsaInfo& info : kIsas) {
    if (Supports(info.isa)) isas.push_back(info.isa);
  }
  return isas;
}

Isa CurrentIsa() { return CurrentIsaSlot().load(std::memory_order_relaxed); }

bool SetCurrentIsa(Isa isa) {
  if (Find(isa) == nullptr || !Supports(isa)) return false;
  CurrentIsaSlot().store(isa, std::memory_order_relaxed);
  return true;
}

}  // namespace cpu
}  // namespace jaxsparse
