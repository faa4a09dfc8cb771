// Exact scalar conversions between f32 and the 16-bit float types, by bit
// manipulation (no compiler or ISA support needed, no dependence on the FPU's
// rounding or flush-to-zero modes).
//
// f32 -> bf16/f16 round to nearest, ties to even, like XLA's convert; NaN stays
// NaN (quiet, sign kept); f16 overflow goes to infinity and f16 subnormals are
// produced exactly.
//
// The functions are `static` on purpose: this header is compiled into every ISA
// translation unit with that unit's -m flags, and internal linkage keeps each
// unit's copy to itself (a shared inline copy could carry AVX-512 code to a CPU
// without it).
#ifndef JAXSPARSE_CPU_DTYPE_CONVERT_H_
#define JAXSPARSE_CPU_DTYPE_CONVERT_H_

#include <cstdint>
#include <cstring>

namespace jaxsparse {
namespace cpu {

static inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

static inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// bf16 is the upper half of an f32.
static inline float Bf16ToF32(uint16_t h) {
  return BitsFloat(static_cast<uint32_t>(h) << 16);
}

static inline uint16_t F32ToBf16(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: truncate, force quiet bit.
    return static_cast<uint16_t>((u >> 16) | 0x0040u);
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // Round to nearest even on 16 bits.
  return static_cast<uint16_t>(u >> 16);
}

static inline float F16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return BitsFloat(sign | 0x7f800000u | (mant << 13));
  if (exp != 0) return BitsFloat(sign | ((exp + 112) << 23) | (mant << 13));
  if (mant == 0) return BitsFloat(sign);
  // Subnormal: shift the leading one up to the implicit bit position.
  int e = 113;  // Biased f32 exponent of 2^-14.
  while ((mant & 0x400u) == 0) {
    mant <<= 1;
    --e;
  }
  return BitsFloat(sign | (static_cast<uint32_t>(e) << 23) |
                   ((mant & 0x3ffu) << 13));
}

static inline uint16_t F32ToF16(float f) {
  const uint32_t u = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) {  // NaN: keep the top payload bits, force quiet bit.
    return sign | 0x7e00u | static_cast<uint16_t>((a >> 13) & 0x3ffu);
  }
  // 65520 = 65504 + half an ulp rounds to even, i.e. to infinity.
  if (a >= 0x477ff000u) return sign | 0x7c00u;
  if (a >= 0x38800000u) {  // Normal f16: rebias by 127 - 15, round 13 bits.
    const uint32_t r = a - (112u << 23) + 0xfffu + ((a >> 13) & 1u);
    return sign | static_cast<uint16_t>(r >> 13);
  }
  // Subnormal f16 (or zero): the result counts units of 2^-24. Shift the full
  // 24-bit significand right by (126 - exp) bits with round to nearest even.
  const uint32_t exp = a >> 23;
  if (exp < 102) return sign;        // Below 2^-25: rounds to zero.
  const uint32_t shift = 126 - exp;  // 14..24
  const uint32_t sig = (a & 0x7fffffu) | 0x800000u;
  const uint32_t half = 1u << (shift - 1);
  const uint32_t rem = sig & ((1u << shift) - 1);
  uint32_t q = sig >> shift;
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return sign | static_cast<uint16_t>(q);
}

}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_DTYPE_CONVERT_H_
