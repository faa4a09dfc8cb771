// The AMX tile unit in software (amx_emulator.h says why): one tile state
// per thread, as on the hardware, where the state is part of each thread's
// context.
#include "cpu/common/amx_emulator.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace jaxsparse {
namespace cpu {
namespace amx_emulator {
namespace {

constexpr int kTiles = 8;       // Palette 1: tmm0-tmm7.
constexpr int kMaxRows = 16;    // Rows of a tile at most.
constexpr int kMaxColsb = 64;   // Bytes of a row at most.

struct TileState {
  bool configured = false;
  uint8_t rows[kTiles] = {};
  uint16_t colsb[kTiles] = {};
  alignas(64) uint8_t data[kTiles][kMaxRows][kMaxColsb] = {};
};

thread_local TileState state;
std::atomic<uint64_t> products{0};

// Where the hardware faults (#UD, #GP), the model stops the process: the
// kernel that got here is wrong, and must not go on to compute something.
[[noreturn]] void Fault(const char* instruction, const char* what, int a = -1, int b = -1) {
  std::fprintf(stderr, "jaxsparse AMX emulator: %s faults: %s (%d, %d)\n", instruction, what, a,
               b);
  std::abort();
}

void CheckTile(const char* instruction, int tile) {
  if (!state.configured) Fault(instruction, "no tile configuration loaded", tile);
  if (tile < 0 || tile >= kTiles) Fault(instruction, "tile number out of range", tile);
  if (state.rows[tile] == 0) Fault(instruction, "tile not configured", tile);
}

// The product's operand checks (SDM, TDPBF16PS / TDPBSSD: #UD): three
// distinct configured tiles, c rows = a rows, c row bytes = b row bytes, and
// b rows = a row bytes / 4 (one b row per pair or quad of a row).
void CheckProduct(const char* instruction, int c, int a, int b) {
  CheckTile(instruction, c);
  CheckTile(instruction, a);
  CheckTile(instruction, b);
  if (c == a || c == b || a == b) Fault(instruction, "tiles not distinct", c, a);
  if (state.rows[c] != state.rows[a]) Fault(instruction, "c rows != a rows", c, a);
  if (state.colsb[c] != state.colsb[b]) Fault(instruction, "c row bytes != b row bytes", c, b);
  if (state.colsb[a] / 4 != state.rows[b] || state.colsb[a] % 4 != 0)
    Fault(instruction, "a row bytes / 4 != b rows", a, b);
  if (state.colsb[c] % 4 != 0) Fault(instruction, "c row bytes not a multiple of 4", c);
}

// A bf16 as the f32 with its bits on top; denormals read as zero (the
// instruction's DAZ). A product of two is exact in f32.
float Bf16ToF32(uint16_t bits) {
  if ((bits & 0x7f80) == 0) bits &= 0x8000;
  const uint32_t word = uint32_t{bits} << 16;
  float f;
  std::memcpy(&f, &word, sizeof f);
  return f;
}

// The instruction's FTZ: a denormal result is written as a zero of its sign.
float FlushDenormal(float f) {
  uint32_t word;
  std::memcpy(&word, &f, sizeof word);
  if ((word & 0x7f800000u) == 0) word &= 0x80000000u;
  std::memcpy(&f, &word, sizeof f);
  return f;
}

template <class T>
T Element(int tile, int row, int index) {
  T value;
  std::memcpy(&value, &state.data[tile][row][index * sizeof(T)], sizeof value);
  return value;
}

// write_row_and_zero: the row's configured bytes, zero past them.
void WriteRow(int tile, int row, const void* bytes) {
  std::memcpy(state.data[tile][row], bytes, state.colsb[tile]);
  std::memset(state.data[tile][row] + state.colsb[tile], 0, kMaxColsb - state.colsb[tile]);
}

}  // namespace

void LoadConfig(const void* config) {
  uint8_t cfg[64];
  std::memcpy(cfg, config, sizeof cfg);
  if (cfg[0] == 0) {  // Palette 0: the initial state.
    Release();
    return;
  }
  if (cfg[0] != 1) Fault("ldtilecfg", "palette other than 0 or 1", cfg[0]);
  for (int i = 1; i < 16; ++i)  // start_row and the reserved bytes.
    if (cfg[i] != 0) Fault("ldtilecfg", "start_row or a reserved byte not zero", i, cfg[i]);
  TileState fresh;
  for (int t = 0; t < 16; ++t) {
    uint16_t colsb;
    std::memcpy(&colsb, cfg + 16 + 2 * t, sizeof colsb);
    const uint8_t rows = cfg[48 + t];
    if (t >= kTiles) {
      if (colsb != 0 || rows != 0) Fault("ldtilecfg", "a tile past tmm7 configured", t);
      continue;
    }
    if (rows > kMaxRows || colsb > kMaxColsb) Fault("ldtilecfg", "tile too large", rows, colsb);
    if ((rows == 0) != (colsb == 0)) Fault("ldtilecfg", "rows and row bytes disagree", rows, colsb);
    fresh.rows[t] = rows;
    fresh.colsb[t] = colsb;
  }
  fresh.configured = true;
  state = fresh;  // Loading a configuration zeroes every tile.
}

void Release() { state = TileState(); }

void LoadD(int tile, const void* base, int64_t stride) {
  CheckTile("tileloadd", tile);
  const auto* bytes = static_cast<const uint8_t*>(base);
  for (int r = 0; r < state.rows[tile]; ++r) WriteRow(tile, r, bytes + r * stride);
  for (int r = state.rows[tile]; r < kMaxRows; ++r) std::memset(state.data[tile][r], 0, kMaxColsb);
}

void StoreD(int tile, void* base, int64_t stride) {
  CheckTile("tilestored", tile);
  auto* bytes = static_cast<uint8_t*>(base);
  for (int r = 0; r < state.rows[tile]; ++r)
    std::memcpy(bytes + r * stride, state.data[tile][r], state.colsb[tile]);
}

void Zero(int tile) {
  CheckTile("tilezero", tile);
  std::memset(state.data[tile], 0, sizeof state.data[tile]);
}

void DpBf16Ps(int c, int a, int b) {
  CheckProduct("tdpbf16ps", c, a, b);
  const int pairs = state.colsb[a] / 4, outputs = state.colsb[c] / 4;
  for (int m = 0; m < state.rows[c]; ++m) {
    float tmp[kMaxColsb / 4];
    for (int n = 0; n < outputs; ++n) tmp[n] = Element<float>(c, m, n);
    for (int k = 0; k < pairs; ++k) {
      const float a0 = Bf16ToF32(Element<uint16_t>(a, m, 2 * k));
      const float a1 = Bf16ToF32(Element<uint16_t>(a, m, 2 * k + 1));
      for (int n = 0; n < outputs; ++n) {
        tmp[n] = FlushDenormal(tmp[n] + a0 * Bf16ToF32(Element<uint16_t>(b, k, 2 * n)));
        tmp[n] = FlushDenormal(tmp[n] + a1 * Bf16ToF32(Element<uint16_t>(b, k, 2 * n + 1)));
      }
    }
    WriteRow(c, m, tmp);
  }
  products.fetch_add(1, std::memory_order_relaxed);
}

void DpBssd(int c, int a, int b) {
  CheckProduct("tdpbssd", c, a, b);
  const int quads = state.colsb[a] / 4, outputs = state.colsb[c] / 4;
  for (int m = 0; m < state.rows[c]; ++m) {
    uint32_t tmp[kMaxColsb / 4];  // Unsigned: the sums wrap as the hardware's do.
    for (int n = 0; n < outputs; ++n) tmp[n] = Element<uint32_t>(c, m, n);
    for (int k = 0; k < quads; ++k)
      for (int n = 0; n < outputs; ++n)
        for (int i = 0; i < 4; ++i)
          tmp[n] += static_cast<uint32_t>(int32_t{Element<int8_t>(a, m, 4 * k + i)} *
                                          int32_t{Element<int8_t>(b, k, 4 * n + i)});
    WriteRow(c, m, tmp);
  }
  products.fetch_add(1, std::memory_order_relaxed);
}

uint64_t ProductCount() { return products.load(std::memory_order_relaxed); }

bool RunProductForTest(const char* instruction, uint8_t* c, int c_rows, int c_colsb,
                       const uint8_t* a, int a_rows, int a_colsb, const uint8_t* b, int b_rows,
                       int b_colsb) {
  const bool bf16 = std::strcmp(instruction, "tdpbf16ps") == 0;
  if (!bf16 && std::strcmp(instruction, "tdpbssd") != 0) return false;
  alignas(64) uint8_t cfg[64] = {};
  cfg[0] = 1;
  const int rows[3] = {c_rows, a_rows, b_rows}, colsb[3] = {c_colsb, a_colsb, b_colsb};
  for (int t = 0; t < 3; ++t) {
    const uint16_t bytes = static_cast<uint16_t>(colsb[t]);
    std::memcpy(cfg + 16 + 2 * t, &bytes, sizeof bytes);
    cfg[48 + t] = static_cast<uint8_t>(rows[t]);
  }
  LoadConfig(cfg);
  LoadD(0, c, c_colsb);
  LoadD(1, a, a_colsb);
  LoadD(2, b, b_colsb);
  if (bf16) {
    DpBf16Ps(0, 1, 2);
  } else {
    DpBssd(0, 1, 2);
  }
  StoreD(0, c, c_colsb);
  Release();
  return true;
}

}  // namespace amx_emulator
}  // namespace cpu
}  // namespace jaxsparse
