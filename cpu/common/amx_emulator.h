// A software model of the AMX tile unit (AMX-TILE, AMX-BF16, AMX-INT8), so
// that the AMX kernel units run, and are tested, on machines without AMX.
//
// The AMX units (cpu/<format>/<format>_kernels_amx.cc) are compiled a second
// time with JAXSPARSE_AMX_EMULATED and without the -mamx flags (CMake's
// JAXSPARSE_AMX_EMULATION); cpu/common/amx_unit.h then includes this header,
// whose macros stand in for the compiler's tile intrinsics. Everything else in
// those units (their AVX-512 code, the tiles' layouts, the configuration) is
// the real unit's. JAXSPARSE_EMULATE_AMX=1 at import selects these tables for
// the "amx" ISA (cpu/common/isa.cc).
//
// The model follows the pseudocode of Intel's SDM for LDTILECFG, TILELOADD,
// TILESTORED, TILEZERO, TDPBF16PS, TDPBSSD and TILERELEASE, and aborts with a
// message where the hardware raises #UD or #GP: a tile instruction before the
// configuration, a tile or row beyond it, a product whose tile shapes do not
// match. A kernel bug that would fault on the hardware fails the emulated test
// run loudly instead of computing something.
#ifndef JAXSPARSE_CPU_COMMON_AMX_EMULATOR_H_
#define JAXSPARSE_CPU_COMMON_AMX_EMULATOR_H_

#include <cstddef>
#include <cstdint>

namespace jaxsparse {
namespace cpu {
namespace amx_emulator {

// LDTILECFG: the 64-byte palette-1 configuration at `config`.
void LoadConfig(const void* config);
// TILERELEASE: back to the initial state (no configuration, tiles zero).
void Release();
// TILELOADD / TILESTORED: the configured rows of `tile`, `stride` bytes apart
// from `base`, each the configured number of bytes.
void LoadD(int tile, const void* base, int64_t stride);
void StoreD(int tile, void* base, int64_t stride);
// TILEZERO.
void Zero(int tile);
// TDPBF16PS: c (f32) += a (bf16 pairs) . b (bf16 pairs, VNNI order).
void DpBf16Ps(int c, int a, int b);
// TDPBSSD: c (int32) += a (int8 quads) . b (int8 quads), both signed.
void DpBssd(int c, int a, int b);

// The tile products (TDPBF16PS and TDPBSSD) this process has run: the
// emulated test pass checks that its kernels reached the tiles.
uint64_t ProductCount();

// One product as a kernel runs it, for the model's own tests: configures
// tmm0 (c: c_rows x c_colsb bytes), tmm1 (a) and tmm2 (b), loads them from
// the row-major buffers (rows of colsb bytes), runs `instruction`
// ("tdpbf16ps" or "tdpbssd") and stores c back. Mismatched shapes fault as
// in a kernel. Returns false for an unknown instruction.
bool RunProductForTest(const char* instruction, uint8_t* c, int c_rows, int c_colsb,
                       const uint8_t* a, int a_rows, int a_colsb, const uint8_t* b, int b_rows,
                       int b_colsb);

}  // namespace amx_emulator
}  // namespace cpu
}  // namespace jaxsparse

#ifdef JAXSPARSE_AMX_EMULATED
// The compiler's intrinsics as the model's calls. GCC's immintrin.h declares
// them whatever the flags (as functions and macros under a target pragma), so
// it comes first and its macros give way to these.
#include <immintrin.h>
#undef _tile_loadconfig
#undef _tile_release
#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#undef _tile_dpbssd
#define _tile_loadconfig(config) ::jaxsparse::cpu::amx_emulator::LoadConfig(config)
#define _tile_release() ::jaxsparse::cpu::amx_emulator::Release()
#define _tile_loadd(tile, base, stride) \
  ::jaxsparse::cpu::amx_emulator::LoadD(tile, base, stride)
#define _tile_stored(tile, base, stride) \
  ::jaxsparse::cpu::amx_emulator::StoreD(tile, base, stride)
#define _tile_zero(tile) ::jaxsparse::cpu::amx_emulator::Zero(tile)
#define _tile_dpbf16ps(c, a, b) ::jaxsparse::cpu::amx_emulator::DpBf16Ps(c, a, b)
#define _tile_dpbssd(c, a, b) ::jaxsparse::cpu::amx_emulator::DpBssd(c, a, b)
#endif

#endif  // JAXSPARSE_CPU_COMMON_AMX_EMULATOR_H_
