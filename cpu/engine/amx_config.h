// The AMX tile configuration the engine's tile products share (bf16_tiles.h's
// tdpbf16ps, int8_tiles.h's tdpbssd): all eight tiles 16 rows of 64 bytes.
// Included only by AMX units (the AMX flags, or their emulated build: amx_unit.h), after
// JAXSPARSE_KERNEL_ISA names their namespace (one ISA per unit, so one guard).
#ifndef JAXSPARSE_CPU_ENGINE_AMX_CONFIG_H_
#define JAXSPARSE_CPU_ENGINE_AMX_CONFIG_H_

#include <cstdint>
#include <cstring>

#include "cpu/common/amx_unit.h"

#ifndef JAXSPARSE_KERNEL_ISA
#error "define JAXSPARSE_KERNEL_ISA (the namespace of this instantiation) first"
#endif
#if !defined(JAXSPARSE_AMX_TILES)
#error "amx_config.h needs an AMX unit (the AMX flags, or JAXSPARSE_AMX_EMULATED)"
#endif

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_KERNEL_ISA {
namespace amx_config {

constexpr int kTileRows = 16;  // Rows of every tile; each row is 64 bytes.

// The palette-1 configuration of the eight tiles.
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Loads the tile configuration on the calling thread (tile state is per
// thread, and XLA's own AMX kernels on the same pool thread configure it their
// way between our calls). Each task calls this first and ReleaseTiles() last.
inline void ConfigureTiles() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = kTileRows;
  }
  // gcc 12 at -O2 dropped the stores above before ldtilecfg (a segfault in
  // the prototype, FORMATS.md section 4b): handing the address to an asm
  // with a memory clobber forces them.
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// Returns the tiles to their initial state, so a context switch of this
// thread no longer saves their 8 KB.
inline void ReleaseTiles() { _tile_release(); }

}  // namespace amx_config
}  // namespace JAXSPARSE_KERNEL_ISA
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_ENGINE_AMX_CONFIG_H_
