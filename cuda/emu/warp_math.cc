// The warp collectives' arithmetic. Notation of the PTX ISA: lane l,
// g = l >> 2 (groupID), t = l & 3 (threadID_in_group). A 32-bit register
// holding two 16-bit elements keeps the lower-indexed one in bits 0-15.
#include "cuda/emu/warp_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cuda/emu/emu.h"

namespace jaxsparse::emu {
namespace {

constexpr int kLanes = 32;

float Bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// IEEE binary16 -> f32, exactly (subnormals, infinities, NaN payloads).
float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return Bits(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    if (mantissa == 0) return Bits(sign);
    // Subnormal: normalise the mantissa.
    exponent = 113;  // 127 - 15 + 1
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    mantissa &= 0x3ffu;
    return Bits(sign | (exponent << 23) | (mantissa << 13));
  }
  return Bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

double Element(MmaType type, uint32_t reg, int half) {
  const auto bits = static_cast<uint16_t>(half == 0 ? reg & 0xffffu : reg >> 16);
  return type == MmaType::kBf16 ? Bits(static_cast<uint32_t>(bits) << 16)
                                : HalfToFloat(bits);
}

// D = A B + C over a 16 x K by K x 8 product, accumulated in double and
// rounded once: products of 16-bit floats are exact in double, so the result
// does not depend on the summation order the hardware leaves unspecified for
// these inputs (sums spanning more than ~2^37 in magnitude aside).
template <int K>
void Multiply(const double (&a)[16][K], const double (&b)[K][8],
              const LaneInput* inputs, LaneResult* results) {
  double c[16][8];
  for (int l = 0; l < kLanes; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int j = 0; j < 4; ++j) c[g + 8 * (j >> 1)][2 * t + (j & 1)] = inputs[l].f[j];
  }
  for (int l = 0; l < kLanes; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int j = 0; j < 4; ++j) {
      const int row = g + 8 * (j >> 1), col = 2 * t + (j & 1);
      double sum = c[row][col];
      for (int k = 0; k < K; ++k) sum += a[row][k] * b[k][col];
      results[l].f[j] = static_cast<float>(sum);
    }
  }
}

// The A and B fragments of all lanes as matrices. A (16 x 16: the dense
// m16n8k16 A, or mma.sp's packed A): reg i of lane l holds row g + 8 * (i & 1),
// columns 2t + 8 * (i >> 1) + {0, 1}. B (8 kBRegs x 8): reg i holds rows
// 2t + 8i + {0, 1}, column g; B's registers follow A's four in LaneInput.
template <int kBRegs>
void Fragments(MmaType type, const LaneInput* in, double (&a)[16][16],
               double (&b)[8 * kBRegs][8]) {
  for (int l = 0; l < kLanes; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i)
      for (int h = 0; h < 2; ++h)
        a[g + 8 * (i & 1)][2 * t + 8 * (i >> 1) + h] = Element(type, in[l].u[i], h);
    for (int i = 0; i < kBRegs; ++i)
      for (int h = 0; h < 2; ++h)
        b[2 * t + 8 * i + h][g] = Element(type, in[l].u[4 + i], h);
  }
}

void Mma(const Collective& op, const LaneInput* in, LaneResult* out) {
  double a[16][16], b[16][8];
  Fragments<2>(static_cast<MmaType>(op.params[0]), in, a, b);
  Multiply<16>(a, b, in, out);
}

// mma.sp.m16n8k32: A is the packed 16 x 16 matrix in the dense m16n8k16 A
// layout (packed columns 2c, 2c + 1 hold chunk c's two values). Metadata of rows g and g + 8 comes from
// lane 4g + 2 * selector + half (half 0: K columns 0-15, half 1: 16-31): bits
// 0-15 row g, 16-31 row g + 8; chunk c of the half at bits 4c..4c+3, the
// first value's position in bits 0-1, the second's in bits 2-3.
void MmaSp(const Collective& op, const LaneInput* in, LaneResult* out) {
  const auto type = static_cast<MmaType>(op.params[0]);
  const bool ordered = op.params[1] != 0;
  const int selector = op.params[2];
  double packed[16][16], a[16][32] = {}, b[32][8];
  Fragments<4>(type, in, packed, b);
  for (int g = 0; g < 8; ++g) {
    for (int half = 0; half < 2; ++half) {
      const int lane = 4 * g + 2 * selector + half;
      const uint32_t meta = in[lane].u[8];
      for (int r = 0; r < 2; ++r) {
        const int row = g + 8 * r;
        for (int c = 0; c < 4; ++c) {
          const uint32_t code = (meta >> (16 * r + 4 * c)) & 0xfu;
          const int pos0 = code & 3, pos1 = code >> 2;
          if (pos0 == pos1 || (ordered && pos0 > pos1)) {
            Fail("mma.sp%s: invalid metadata code 0x%x (positions %d, %d) for "
                 "row %d, chunk %d, in the register of lane %d (selector %d)",
                 ordered ? "::ordered_metadata" : "", code, pos0, pos1, row,
                 4 * half + c, lane, selector);
          }
          a[row][16 * half + 4 * c + pos0] = packed[row][8 * half + 2 * c];
          a[row][16 * half + 4 * c + pos1] = packed[row][8 * half + 2 * c + 1];
        }
      }
    }
  }
  Multiply<32>(a, b, in, out);
}

void Shfl(const Collective& op, const LaneInput* in, LaneResult* out) {
  const int width = op.params[0];
  const auto mode = static_cast<ShflMode>(op.params[1]);
  for (int l = 0; l < kLanes; ++l) {
    if (((op.mask >> l) & 1u) == 0) continue;
    const int start = l & ~(width - 1), pos = l - start, arg = in[l].arg;
    int src = l;
    switch (mode) {
      case ShflMode::kIdx:
        src = start + (((arg % width) + width) % width);
        break;
      case ShflMode::kUp:
        src = pos >= arg ? l - arg : l;
        break;
      case ShflMode::kDown:
        src = pos + arg < width ? l + arg : l;
        break;
      case ShflMode::kXor:
        src = l ^ arg;
        // A later segment (or past the warp) gives the lane its own value.
        if (src >= start + width || src >= kLanes || src < 0) src = l;
        break;
    }
    if (((op.mask >> src) & 1u) == 0) {
      Fail("shfl: lane %d reads lane %d, which is not in the mask 0x%08x", l, src,
           op.mask);
    }
    out[l].u[0] = in[src].u[0];
  }
}

void Ballot(const Collective& op, const LaneInput* in, LaneResult* out) {
  uint32_t bits = 0;
  for (int l = 0; l < kLanes; ++l) {
    if (((op.mask >> l) & 1u) && in[l].arg) bits |= 1u << l;
  }
  for (int l = 0; l < kLanes; ++l) out[l].u[0] = bits;
}

// ldmatrix .m8n8 .b16: lanes 8i..8i+7 give the row addresses of matrix i.
// Lane l receives, per matrix, row l/4, columns 2(l%4) and 2(l%4)+1; with
// .trans, column l/4 of rows 2(l%4) and 2(l%4)+1.
void Ldmatrix(const Collective& op, const LaneInput* in, LaneResult* out) {
  const int num = op.params[0];
  const bool trans = op.params[1] != 0;
  auto at = [&](int matrix, int row, int col) -> uint32_t {
    uint16_t v;
    std::memcpy(&v, static_cast<const unsigned char*>(in[8 * matrix + row].ptr) + 2 * col,
                sizeof(v));
    return v;
  };
  for (int l = 0; l < kLanes; ++l) {
    for (int i = 0; i < num; ++i) {
      const int q = l % 4, r = l / 4;
      out[l].u[i] = trans ? at(i, 2 * q, r) | (at(i, 2 * q + 1, r) << 16)
                          : at(i, r, 2 * q) | (at(i, r, 2 * q + 1) << 16);
    }
  }
}

}  // namespace

const char* CollectiveName(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::kShfl:
      return "shfl.sync";
    case CollectiveKind::kBallot:
      return "vote.sync.ballot";
    case CollectiveKind::kLdmatrix:
      return "ldmatrix";
    case CollectiveKind::kMma:
      return "mma.sync.m16n8k16";
    case CollectiveKind::kMmaSp:
      return "mma.sp.m16n8k32";
  }
  return "?";
}

bool SameCollective(const Collective& a, const Collective& b) {
  if (a.kind != b.kind || a.mask != b.mask) return false;
  for (int i = 0; i < 4; ++i) {
    if (a.params[i] != b.params[i]) return false;
  }
  return true;
}

void Compute(const Collective& op, const LaneInput* inputs, LaneResult* results) {
  switch (op.kind) {
    case CollectiveKind::kShfl:
      return Shfl(op, inputs, results);
    case CollectiveKind::kBallot:
      return Ballot(op, inputs, results);
    case CollectiveKind::kLdmatrix:
      return Ldmatrix(op, inputs, results);
    case CollectiveKind::kMma:
      return Mma(op, inputs, results);
    case CollectiveKind::kMmaSp:
      return MmaSp(op, inputs, results);
  }
}

// ------------------------------------------------------------ per-thread arithmetic

uint32_t Lop3(uint32_t a, uint32_t b, uint32_t c, uint32_t imm) {
  uint32_t d = 0;
  for (int i = 0; i < 32; ++i) {
    const uint32_t index = (((a >> i) & 1u) << 2) | (((b >> i) & 1u) << 1) | ((c >> i) & 1u);
    d |= ((imm >> index) & 1u) << i;
  }
  return d;
}

namespace {

// A 16-bit float format: `mantissa` stored fraction bits, `bias`.
struct Format16 {
  int mantissa, bias;
};
constexpr Format16 kHalfFormat{10, 15};
constexpr Format16 kBf16Format{7, 127};
constexpr uint16_t kCanonicalNan = 0x7fff;

// Rounds s + tail (|tail| at most half an ulp of the double s: the exact value
// the double s approximates) to the 16-bit format, to nearest even. The
// format's rounding boundaries are doubles of few bits, so the exact value is
// on s's side of each, except when s sits exactly on a tie: then tail's sign
// decides (double rounding would otherwise round a non-tie as a tie).
uint16_t RoundTo16(double s, double tail, Format16 f) {
  if (std::isnan(s)) return kCanonicalNan;
  const uint16_t sign = std::signbit(s) ? 0x8000u : 0u;
  const uint32_t inf = ((1u << (15 - f.mantissa)) - 1u) << f.mantissa;
  if (std::isinf(s)) return sign | static_cast<uint16_t>(inf);
  if (s == 0.0) return sign;
  const double mag = std::fabs(s);
  const double toward_larger = std::signbit(s) ? -tail : tail;  // > 0: exact |value| above mag.
  int exponent;
  std::frexp(mag, &exponent);  // mag = m * 2^exponent, m in [0.5, 1).
  const int min_quantum = 1 - f.bias - f.mantissa;  // The subnormals' spacing, as a power of 2.
  const int quantum = std::max(exponent - 1 - f.mantissa, min_quantum);
  const double scaled = std::ldexp(mag, -quantum);  // Exact: a change of exponent.
  auto n = static_cast<uint64_t>(scaled);
  const double rest = scaled - static_cast<double>(n);
  const bool up = rest > 0.5 ||
                  (rest == 0.5 && (toward_larger > 0 || (toward_larger == 0 && (n & 1u))));
  if (up) ++n;
  // n * 2^quantum: n < 2^(mantissa + 1), its top bit the implicit one; a carry
  // to 2^(mantissa + 1) moves into the exponent field by the same addition.
  const uint64_t biased = static_cast<uint64_t>(quantum - min_quantum + 1);
  const uint64_t bits = (biased << f.mantissa) + n - (uint64_t{1} << f.mantissa);
  if (bits >= inf) return sign | static_cast<uint16_t>(inf);
  return sign | static_cast<uint16_t>(bits);
}

double Value16(MmaType type, uint16_t bits) {
  return type == MmaType::kBf16 ? Bits(static_cast<uint32_t>(bits) << 16) : HalfToFloat(bits);
}

// a * b + c for one element: the product of two 16-bit floats is exact in
// double, the sum's rounding error exact by Knuth's TwoSum.
uint16_t Fma16(MmaType type, uint16_t a, uint16_t b, double c) {
  const double product = Value16(type, a) * Value16(type, b);
  const double s = product + c;
  double tail = 0.0;
  if (std::isfinite(s)) {
    const double bp = s - c, bc = s - bp;
    tail = (product - bp) + (c - bc);
  }
  return RoundTo16(s, tail, type == MmaType::kBf16 ? kBf16Format : kHalfFormat);
}

uint16_t Element16(uint32_t reg, int half) {
  return static_cast<uint16_t>(half == 0 ? reg & 0xffffu : reg >> 16);
}

}  // namespace

uint32_t Packed16(MmaType type, PackedOp op, uint32_t a, uint32_t b, uint32_t c) {
  const uint16_t one = type == MmaType::kBf16 ? 0x3f80u : 0x3c00u;
  uint32_t d = 0;
  for (int h = 0; h < 2; ++h) {
    const uint16_t ea = Element16(a, h), eb = Element16(b, h);
    uint16_t r = 0;
    switch (op) {
      case PackedOp::kSub:  // a * 1 - b: a - b, one rounding.
        r = Fma16(type, ea, one, -Value16(type, eb));
        break;
      case PackedOp::kMul:  // a * b + (-0): keeps the product's signed zero.
        r = Fma16(type, ea, eb, -0.0);
        break;
      case PackedOp::kFma:
        r = Fma16(type, ea, eb, Value16(type, Element16(c, h)));
        break;
    }
    d |= static_cast<uint32_t>(r) << (16 * h);
  }
  return d;
}

}  // namespace jaxsparse::emu
