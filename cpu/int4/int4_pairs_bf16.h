// bf16 products by the dense int4 form at a few tokens on vdpbf16ps, in the
// units with AVX512-BF16 (included by int4_tiles.h, after int4_kernels.h),
// reading the lines or the canonical qweight.
//
// A qweight byte holds one output's two inputs 2r, 2r + 1: exactly the pair
// that a vdpbf16ps lane multiplies by the pair (x[2r], x[2r + 1]) of a token,
// which one broadcast dword of bf16 x gives. So the nibbles become bf16 pairs
// u - 8 (exact in bf16) in registers, without the f32 detour of the FMA
// kernels (2 FMAs per 16 weights and token) or the tiles' panel in memory: 3
// vector operations per 32 weights, then one vdpbf16ps per token. Per group
// the f32 sums are scaled once, as in the f32 kernels (so the weight is never
// rounded to bf16, where the tiles round s (u - 8)).
//
// A task owns a 64-output block and a chunk of up to kPairsBf16Tokens tokens:
// four passes over the block's rows, one per 16 outputs, with a token's
// accumulator per register, so that one decode serves up to 16 vdpbf16ps.
// The passes after the first read the block's K/2 64-byte lines (128 KB at
// K = 4096) from L2. x is packed once per call as pairs [K/2, T] (PackPairsJob).
#include <cstring>

#include "cpu/common/kernel_util.h"

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_INT4_ISA {
namespace int4 {

// Tokens per pass: 16 accumulators (24 spilled: 0.67x XLA at 48 tokens, 1.45x
// with 16).
constexpr int kPairsBf16Tokens = 16;
// Token counts that run here (measured on Zen 4 at 4096 x 4096 and 4096 x
// 11008, docs/cpu_speed_notes.md, int4 sixth round). Below the minimum the
// four passes stream the weight worse than the FMA kernels' one pass (the
// lines at 2 tokens: 3.4x XLA against 3.9x; the canonical form at 4: 1.7-2.2x
// against 1.9-2.6x). Up to the lines' maximum the dispatch table still sends
// bf16 to the kernel; the canonical form's column walk fell behind the tiles
// at 48 tokens (1.07-1.14x against 1.18-1.26x).
constexpr int64_t kPairsBf16LinesMinTokens = 4;
constexpr int64_t kPairsBf16CanonicalMinTokens = 8;
#ifdef __AMX_BF16__
// AMX's tiles take bf16 from one A tile (16 tokens, int4_tiles.h) on.
constexpr int64_t kPairsBf16LinesMaxTokens = 15;
constexpr int64_t kPairsBf16CanonicalMaxTokens = 15;
#else
constexpr int64_t kPairsBf16LinesMaxTokens = 63;
constexpr int64_t kPairsBf16CanonicalMaxTokens = 32;
#endif

// vpermw reads the low 5 bits of each index word: the nibble and the lowest
// bit of whatever lies above it, so the 16 values u - 8 (as bf16) twice.
inline __m512i NibbleBf16Table() {
  alignas(64) uint16_t table[32];
  for (int i = 0; i < 32; ++i) {
    const float value = static_cast<float>(i % 16 - 8);
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    table[i] = static_cast<uint16_t>(bits >> 16);  // exact: small integers
  }
  return _mm512_load_si512(table);
}

// 16 outputs' pairs as bf16 words from a vector whose dword lanes hold the
// byte (u0 | u1 << 4) low: word 2l indexed by the byte as it is (u0), word
// 2l + 1 by the byte shifted 12 bits up (u1 at bit 16), the bits above the
// byte cleared first so that they do not reach word 2l + 1's index.
inline __m512i PairsFromLowByte(__m512i bytes, __m512i table) {
  // 0xEC: (A & C) | B.
  const __m512i index = _mm512_ternarylogic_epi32(bytes, _mm512_slli_epi32(bytes, 12),
                                                  _mm512_set1_epi32(0xFF), 0xEC);
  return _mm512_permutexvar_epi16(index, table);
}

struct PairsBf16Ctx {
  const Int4Problem* p;
  const int32_t* x_pairs;  // this batch entry's bf16 x as pairs [K/2, T] (PackPairsJob)
  const float* scales;    // [K/group, N] in f32
  const uint8_t* qweight;  // the lines [ceil(N/64) K/2, 64] or canonical [K/2, N]
  const uint8_t* last_line;  // the lines' last (LineFrom)
  uint16_t* out;          // this batch entry's y [T, N]
  int64_t chunks;         // token chunks
  int64_t chunk_tokens;   // tokens per chunk (the last may have fewer)
};

// Outputs [o, o + 16), o = 64 block + 16 j, of tokens [t0, t0 + kTokens):
// byte j of each dword of the block's lines (kLines), or 16 bytes of each
// canonical row. y: f32 [kTokens][16], accumulated group by group.
template <int kTokens, bool kLines>
void PairsBf16Pass(const PairsBf16Ctx& c, int64_t block, int j, int64_t t0, __mmask16 mask,
                   float* y) {
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out, k = p.k, groups = k / p.group, o = block * kOutBlock + 16 * j;
  const __m512i table = NibbleBf16Table();
  // Row r's bytes: the block's line r, or canonical row r from output o.
  const uint8_t* rows = kLines ? c.qweight + block * (k / 2) * 64 : c.qweight + o;
  const int64_t stride = kLines ? 64 : n;
  for (int t = 0; t < kTokens; ++t) _mm512_store_ps(y + 16 * t, _mm512_setzero_ps());
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[kTokens];
    for (int t = 0; t < kTokens; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t r = g * p.group / 2; r < (g + 1) * p.group / 2; ++r) {
      const uint8_t* row = rows + r * stride;
      // The canonical rows are N bytes apart, a page each at the harness's
      // sizes, where the hardware prefetchers stop: the first pass asks for
      // them ahead, the later ones find them in L2.
      if (!kLines && j == 0 && r + kPrefetchRows < k / 2) PrefetchRow(row + kPrefetchRows * n);
      const __m512i bytes = kLines ? LineFrom(row, j, row == c.last_line) : LoadBytes(row, mask);
      const __m512bh w = reinterpret_cast<__m512bh>(PairsFromLowByte(bytes, table));
      const int32_t* pairs = c.x_pairs + r * p.tokens + t0;
      for (int t = 0; t < kTokens; ++t) {
        acc[t] = _mm512_dpbf16_ps(acc[t], w,
                                  reinterpret_cast<__m512bh>(_mm512_set1_epi32(pairs[t])));
      }
    }
    const __m512 s = _mm512_maskz_loadu_ps(mask, c.scales + g * n + o);
    for (int t = 0; t < kTokens; ++t) {
      _mm512_store_ps(y + 16 * t, _mm512_fmadd_ps(s, acc[t], _mm512_load_ps(y + 16 * t)));
    }
  }
}

// x [T, K] as pairs [K/2, T]: a row's tokens side by side, where x's rows
// (K / 2 dwords apart: 8 KB at K = 4096) all fall in one L1 set and 16 of
// them overflow its 8 ways (measured at 16 tokens: 1.05x XLA read in place,
// 2.1x packed).
// A task packs 64 pair rows; dword (2r, 2r + 1) of a token is bf16 x[t, 2r]
// low, x[t, 2r + 1] high, the word order of the lanes' pairs.
struct PackPairsJob {
  const Int4Problem* p;
  const uint16_t* x;
  int32_t* pairs;
  static constexpr int64_t kRows = 64;

  void Run(int64_t task, int /*worker*/) const {
    const int64_t rows = std::min(kRows, p->k / 2 - task * kRows);
    for (int64_t r = task * kRows; r < task * kRows + rows; ++r) {
      for (int64_t t = 0; t < p->tokens; ++t) {
        std::memcpy(pairs + r * p->tokens + t, x + t * p->k + 2 * r, sizeof(int32_t));
      }
    }
  }
};

struct PairsBf16Job {
  const PairsBf16Ctx* c;

  void Run(int64_t task, int /*worker*/) const {
    const Int4Problem& p = *c->p;
    const int64_t block = task / c->chunks;
    const int64_t t0 = (task % c->chunks) * c->chunk_tokens;
    const int nt = static_cast<int>(std::min(c->chunk_tokens, p.tokens - t0));
    alignas(64) float y[kPairsBf16Tokens * 16];
    for (int j = 0; j < 4; ++j) {
      const int64_t o = block * kOutBlock + 16 * j;
      if (o >= p.n_out) break;
      Dispatch<kPairsBf16Tokens>(nt, [&](auto tokens) {
        constexpr int kTokens = decltype(tokens)::value;
        const __mmask16 mask = LaneMask(p.n_out - o);
        if (p.lines) return PairsBf16Pass<kTokens, true>(*c, block, j, t0, mask, y);
        PairsBf16Pass<kTokens, false>(*c, block, j, t0, mask, y);
      });
      const int64_t on = std::min<int64_t>(16, p.n_out - o);
      for (int t = 0; t < nt; ++t) {
        Store(c->out, Dtype::kBF16, (t0 + t) * p.n_out + o, y + 16 * t, on);
      }
    }
  }
};

// The dense form in bf16 (the 2:4 form keeps the tiles: its pairs hold one
// input's zeros).
inline bool UsePairsBf16(const Int4Problem& p) {
  if (p.dtype != Dtype::kBF16 || p.k == 0 || p.n_out == 0) return false;
  if (p.lines) return p.tokens >= kPairsBf16LinesMinTokens && p.tokens <= kPairsBf16LinesMaxTokens;
  return p.tokens >= kPairsBf16CanonicalMinTokens && p.tokens <= kPairsBf16CanonicalMaxTokens;
}

inline bool RunPairsBf16(const Int4Problem& p, const Runtime& rt) {
  const int64_t groups = p.k / p.group;
  // The scales in f32, then x's pairs from the next 64-byte boundary.
  const int64_t scale_floats = RoundUp(groups * p.n_out, 16);
  void* scratch = rt.scratch(rt.scratch_owner, static_cast<size_t>(scale_floats) * sizeof(float) +
                                                   static_cast<size_t>(p.k / 2 * p.tokens) * 4);
  if (scratch == nullptr) return false;
  float* scales = static_cast<float*>(scratch);
  int32_t* pairs = reinterpret_cast<int32_t*>(scales + scale_floats);
  PairsBf16Ctx c{};
  c.p = &p;
  c.scales = scales;
  c.x_pairs = pairs;
  c.chunks = CeilDiv(p.tokens, kPairsBf16Tokens);
  c.chunk_tokens = CeilDiv(p.tokens, c.chunks);
  const int64_t blocks = CeilDiv(p.n_out, kOutBlock);
  for (int64_t e = 0; e < p.batch; ++e) {
    Widen(Offset(p.scales, e * p.scales_stride, p.dtype), p.dtype, groups * p.n_out, scales);
    const uint16_t* x = static_cast<const uint16_t*>(p.dense) + e * p.dense_stride;
    RunParallel(rt, CeilDiv(p.k / 2, PackPairsJob::kRows), PackPairsJob{&p, x, pairs});
    c.qweight = p.qweight + e * p.weight_stride;
    c.last_line = p.lines ? c.qweight + (blocks * (p.k / 2) - 1) * 64 : nullptr;
    c.out = static_cast<uint16_t*>(p.out) + e * p.tokens * p.n_out;
    RunParallel(rt, blocks * c.chunks, PairsBf16Job{&c});
  }
  return true;
}

}  // namespace int4
}  // namespace JAXSPARSE_INT4_ISA
}  // namespace cpu
}  // namespace jaxsparse
