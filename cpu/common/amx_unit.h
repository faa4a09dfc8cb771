// What an AMX kernel unit multiplies its tiles on, and the names it takes.
//
// A unit compiled with the AMX flags (-mamx-tile, -mamx-bf16, -mamx-int8) runs
// on the tile unit: namespace `amx`, tables kFooAmx. The same source compiled
// without them and with JAXSPARSE_AMX_EMULATED (CMake's JAXSPARSE_AMX_EMULATION,
// for machines without AMX) runs on amx_emulator.h's model of it: namespace
// `amx_emulated`, tables kFooAmxEmulated. Either way JAXSPARSE_AMX_TILES is
// defined, and the tile code (cpu/engine/bf16_tiles.h, int8_tiles.h and their
// users) takes its AMX branch. Units of the other ISAs define neither.
#ifndef JAXSPARSE_CPU_COMMON_AMX_UNIT_H_
#define JAXSPARSE_CPU_COMMON_AMX_UNIT_H_

#if defined(JAXSPARSE_AMX_EMULATED)
#if defined(__AMX_TILE__)
#error "an emulated AMX unit is compiled without the -mamx flags (so it cannot run a tile instruction)"
#endif
#include "cpu/common/amx_emulator.h"
#define JAXSPARSE_AMX_TILES 1
#define JAXSPARSE_AMX_NAMESPACE amx_emulated
#define JAXSPARSE_AMX_TABLE(name) name##Emulated
#elif defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__)
#include <immintrin.h>
#define JAXSPARSE_AMX_TILES 1
#define JAXSPARSE_AMX_NAMESPACE amx
#define JAXSPARSE_AMX_TABLE(name) name
#endif

#endif  // JAXSPARSE_CPU_COMMON_AMX_UNIT_H_
