// Products by the dense int4 form at a few tokens with a token per register
// (AVX-512 units; included by int4_kernels.h after int4_avx512.h), reading the
// lines or the canonical qweight: f32 (and f16, widened) on FMAs, and bf16 on
// vdpbf16ps in the units with AVX512-BF16.
//
// A qweight byte holds one output's two inputs 2r, 2r + 1. In bf16 that is
// exactly the pair a vdpbf16ps lane multiplies by a token's (x[2r], x[2r + 1]),
// which one broadcast dword of bf16 x gives: the byte becomes a bf16 pair
// u - 8 (exact) in registers, 3 vector operations per 32 weights, then one
// vdpbf16ps per token (the tiles wrote a panel of bf16(s (u - 8)) to memory
// first; the FMA kernels widened x to f32). In f32 the nibbles become two
// vectors of u - 8 by vpermps (3 operations per 32 weights), then 2 FMAs per
// token. Per group the f32 sums are scaled once (the weight is never rounded).
//
// A task owns a 64-output block and a chunk of tokens: bf16 four passes over
// the block's rows, one per 16 outputs, with a token's accumulator per
// register, so that one decode serves up to 16 tokens (the streaming kernels'
// serves 4); f32 two passes of 32 outputs with up to 12 tokens (2 x 12
// accumulators). The passes after the first read the block's K/2 64-byte
// lines (128 KB at K = 4096) from L2. x is packed once per call with a row's
// tokens side by side (PackTokensJob).
#include <cstring>

#include "cpu/common/amx_unit.h"
#include "cpu/common/kernel_util.h"

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_INT4_ISA {
namespace int4 {

// Tokens per pass: bf16 16 accumulators (24 spilled: bf16 at 0.67x XLA at 48
// tokens, 1.45x with 16). f32 2 x 12: each row's decode (a load, a shift and
// two vpermps per 16 outputs) then serves twice the FMAs, and twice the
// independent chains hide the FMAs' latency. At 17 tokens (two chunks of 9
// and 8) on Zen 5 that ran 384 x 1536 in 49.7 us against 57.5 us with one
// vector of 16 outputs, with the weights in cache (XLA's dot: 53.8 us).
constexpr int kPairsTokens = 16;
constexpr int kPairsTokensF32 = 12;

// Token counts that run here, per dtype and layout (measured on Zen 4 at
// 4096 x 4096 and 4096 x 11008, docs/cpu_speed_notes.md, int4 sixth and eighth
// rounds). Below a minimum the four passes stream the weight worse than the
// streaming kernels' one pass (bf16 on the lines at 2 tokens: 3.4x XLA against
// 3.9x; canonical at 4: 1.7-2.2x against 1.9-2.6x). bf16: above the maximum
// the canonical form's column walk fell behind the tiles (48 tokens:
// 1.07-1.14x against 1.18-1.26x). f32: up to 48 tokens. On Zen 4 the pairs
// kept up with the panels to 128 tokens (1.09-1.11x XLA against 1.04-1.10x);
// since the panels sum over all of K in registers they lead from 64 tokens
// on (2-core Zen 5, jax 0.12.1, 4096 x 4096 / 11008 x 4096, XLA's f32 dot
// in the same process: at 64 tokens 1.06-1.10x / 1.10-1.11x against the
// pairs' 0.89-0.93x / 0.84-0.92x, at 128 1.06-1.08x against 0.80-0.82x; at
// 32 tokens the pairs 1.05-1.07x against 0.93x at 4096 x 4096).
struct PairsRange {
  int64_t lines_min, lines_max, canonical_min, canonical_max;
};
#ifdef JAXSPARSE_AMX_TILES
// AMX's tiles take bf16 from one A tile (16 tokens, int4_tiles.h) on.
constexpr PairsRange kPairsBf16 = {4, 15, 8, 15};
#else
constexpr PairsRange kPairsBf16 = {4, 63, 8, 32};
#endif
constexpr PairsRange kPairsF32 = {8, 128, 8, 48};  // f32 and f16
#ifdef __AVX512BF16__
constexpr bool kHasBf16Pairs = true;
#else
constexpr bool kHasBf16Pairs = false;  // bf16 keeps the streaming kernels and panels
#endif

inline bool UsePairs(const Int4Problem& p) {
  if (p.k == 0 || p.n_out == 0 || (p.dtype == Dtype::kBF16 && !kHasBf16Pairs)) return false;
  const bool bf16 = p.dtype == Dtype::kBF16;
  // f16 x is widened to f32 once per call (PackTokensJob) and runs the f32 passes.
  const PairsRange& r = bf16 ? kPairsBf16 : kPairsF32;
  if (p.lines) return p.tokens >= r.lines_min && p.tokens <= r.lines_max;
  return p.tokens >= r.canonical_min && p.tokens <= r.canonical_max;
}

struct PairsCtx {
  const Int4Problem* p;
  const void* x_packed;      // bf16: pairs [K/2, T] (dwords); f32: [K, T]
  const float* scales;       // [K/group, N] in f32
  const uint8_t* qweight;    // the lines [ceil(N/64) K/2, 64] or canonical [K/2, N]
  const uint8_t* last_line;  // the lines' last (LineFrom)
  void* out;                 // this batch entry's y [T, N]
  int64_t chunks;            // token chunks
  int64_t chunk_tokens;      // tokens per chunk (the last may have fewer)
};

#ifdef __AVX512BF16__
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
#endif  // __AVX512BF16__

// Row r's 16 bytes for outputs [o, o + 16) in the dword lanes' low bytes:
// byte j of the block's line r (kLines), or 16 bytes of canonical row r.
template <bool kLines>
inline __m512i PairBytes(const PairsCtx& c, const uint8_t* row, int j, __mmask16 mask) {
  if (kLines) return LineFrom(row, j, row == c.last_line);
  return LoadBytes(row, mask);
}

// Outputs [o, o + 16), o = 64 block + 16 j, of tokens [t0, t0 + kTokens),
// bf16 on vdpbf16ps. y: f32 [kTokens][16], accumulated group by group.
template <int kTokens, bool kLines>
void PairsPassBf16(const PairsCtx& c, int64_t block, int j, int64_t t0, __mmask16 mask,
                   float* y) {
#ifdef __AVX512BF16__
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out, k = p.k, groups = k / p.group, o = block * kOutBlock + 16 * j;
  // Row r's bytes: the block's line r, or canonical row r from output o.
  const uint8_t* rows = kLines ? c.qweight + block * (k / 2) * 64 : c.qweight + o;
  const int64_t stride = kLines ? 64 : n;
  const __m512i table = NibbleBf16Table();
  for (int t = 0; t < kTokens; ++t) _mm512_store_ps(y + 16 * t, _mm512_setzero_ps());
  for (int64_t g = 0; g < groups; ++g) {
    // The group's scales, read at its end.
    PrefetchSpans(c.scales + g * n + o, 0, 1, std::min<int64_t>(16, n - o) * 4);
    __m512 acc[kTokens];
    for (int t = 0; t < kTokens; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t r = g * p.group / 2; r < (g + 1) * p.group / 2; ++r) {
      const uint8_t* row = rows + r * stride;
      // The canonical rows are N bytes apart, a page each at the harness's
      // sizes, where the hardware prefetchers stop: the first pass asks for
      // them ahead, the later ones find them in L2.
      if (!kLines && j == 0 && r + kPrefetchRows < k / 2) PrefetchRow(row + kPrefetchRows * n);
      const __m512i bytes = PairBytes<kLines>(c, row, j, mask);
      const __m512bh w = reinterpret_cast<__m512bh>(PairsFromLowByte(bytes, table));
      const int32_t* pairs = static_cast<const int32_t*>(c.x_packed) + r * p.tokens + t0;
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
#else
  (void)c, (void)block, (void)j, (void)t0, (void)mask, (void)y;
#endif
}

// Outputs [o, o + 32), o = 64 block + 16 j (j = 0 or 2), of tokens
// [t0, t0 + kTokens) in f32. masks: the two vectors' outputs below n_out.
// The nibbles become u - 8 by vpermps (exact), 2 FMAs per token and vector
// per row; per group the sums are scaled once (the weight is never rounded).
// y: f32 [kTokens][32].
template <int kTokens, bool kLines>
void PairsPassF32(const PairsCtx& c, int64_t block, int j, int64_t t0, const __mmask16 masks[2],
                  float* y) {
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out, k = p.k, groups = k / p.group, o = block * kOutBlock + 16 * j;
  const uint8_t* rows = kLines ? c.qweight + block * (k / 2) * 64 : c.qweight + o;
  const int64_t stride = kLines ? 64 : n;
  const __m512 codes = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  // Two arrays per role: one array of more than 16 vectors stays in memory.
  __m512 out0[kTokens], out1[kTokens];
  for (int t = 0; t < kTokens; ++t) out0[t] = out1[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    // The group's scales, read at its end.
    PrefetchSpans(c.scales + g * n + o, 0, 1, std::min<int64_t>(32, n - o) * 4);
    __m512 acc0[kTokens], acc1[kTokens];
    for (int t = 0; t < kTokens; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
    for (int64_t r = g * p.group / 2; r < (g + 1) * p.group / 2; ++r) {
      const uint8_t* row = rows + r * stride;
      if (!kLines && j == 0 && r + kPrefetchRows < k / 2) PrefetchRow(row + kPrefetchRows * n);
      const __m512i b0 = kLines ? LineFrom(row, j, row == c.last_line) : LoadBytes(row, masks[0]);
      const __m512i b1 =
          kLines ? LineFrom(row, j + 1, row == c.last_line) : LoadBytes(row + 16, masks[1]);
      const __m512 lo0 = _mm512_permutexvar_ps(b0, codes);
      const __m512 hi0 = _mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), codes);
      const __m512 lo1 = _mm512_permutexvar_ps(b1, codes);
      const __m512 hi1 = _mm512_permutexvar_ps(_mm512_srli_epi32(b1, 4), codes);
      const float* x0 = static_cast<const float*>(c.x_packed) + 2 * r * p.tokens + t0;
      const float* x1 = x0 + p.tokens;
      for (int t = 0; t < kTokens; ++t) {
        const __m512 a = _mm512_set1_ps(x0[t]), b = _mm512_set1_ps(x1[t]);
        acc0[t] = _mm512_fmadd_ps(lo0, a, acc0[t]);
        acc1[t] = _mm512_fmadd_ps(lo1, a, acc1[t]);
        acc0[t] = _mm512_fmadd_ps(hi0, b, acc0[t]);
        acc1[t] = _mm512_fmadd_ps(hi1, b, acc1[t]);
      }
    }
    const __m512 s0 = _mm512_maskz_loadu_ps(masks[0], c.scales + g * n + o);
    const __m512 s1 = _mm512_maskz_loadu_ps(masks[1], c.scales + g * n + o + 16);
    for (int t = 0; t < kTokens; ++t) {
      out0[t] = _mm512_fmadd_ps(s0, acc0[t], out0[t]);
      out1[t] = _mm512_fmadd_ps(s1, acc1[t], out1[t]);
    }
  }
  for (int t = 0; t < kTokens; ++t) {
    _mm512_store_ps(y + 32 * t, out0[t]);
    _mm512_store_ps(y + 32 * t + 16, out1[t]);
  }
}

// x [T, K] with a row's tokens side by side, where x's rows (8 or 16 KB apart
// at K = 4096) all fall in one L1 set and 16 of them overflow its 8 ways
// (measured in bf16 at 16 tokens: 1.05x XLA read in place, 2.1x packed).
// bf16: dword (2r, 2r + 1) of a token is bf16 x[t, 2r] low, x[t, 2r + 1]
// high, the word order of the lanes' pairs: [K/2, T]. f32 and f16: f32 [K, T].
struct PackTokensJob {
  const Int4Problem* p;
  const void* x;
  void* packed;
  static constexpr int64_t kRows = 64;  // pair rows per task

  void Run(int64_t task, int /*worker*/) const {
    const int64_t r0 = task * kRows, rows = std::min(kRows, p->k / 2 - r0);
    if (p->dtype == Dtype::kBF16) return PackBf16Pairs(r0, rows);
    PackWidened(2 * r0, 2 * (r0 + rows));
  }

  // f32 [K, T] for inputs [i0, i1): squares of 16 tokens x 16 inputs
  // transposed in registers (x's rows read 64 bytes at a time), the rest
  // one by one. Moving every element one by one cost MiniLM's 1536 x 384
  // product at 17 tokens 15 us of its 65 (no pack at all, a probe: 50 us).
  void PackWidened(int64_t i0, int64_t i1) const {
    const int64_t k = p->k, tokens = p->tokens;
    float* out = static_cast<float*>(packed);
    const int64_t t_squares = tokens / 16 * 16, i_squares = i0 + (i1 - i0) / 16 * 16;
    for (int64_t t = 0; t < t_squares; t += 16) {
      for (int64_t i = i0; i < i_squares; i += 16) {
        __m512 r[16];
        for (int s = 0; s < 16; ++s) r[s] = LoadWidened(t + s, i);
        Transpose16x16Floats(r);
        for (int s = 0; s < 16; ++s) _mm512_storeu_ps(out + (i + s) * tokens + t, r[s]);
      }
    }
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t from = t < t_squares ? i_squares : i0;
      for (int64_t i = from; i < i1; ++i) out[i * tokens + t] = Widened(t * k + i);
    }
  }

  // x[t, i .. i + 16) as f32.
  __m512 LoadWidened(int64_t t, int64_t i) const {
    const int64_t at = t * p->k + i;
    if (p->dtype == Dtype::kF32) return _mm512_loadu_ps(static_cast<const float*>(x) + at);
    return _mm512_cvtph_ps(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + at)));
  }

  float Widened(int64_t at) const {
    if (p->dtype == Dtype::kF32) return static_cast<const float*>(x)[at];
    return F16ToF32(static_cast<const uint16_t*>(x)[at]);
  }

  // bf16: dword r of a token is its inputs (2r, 2r + 1), [K/2, T].
  void PackBf16Pairs(int64_t r0, int64_t rows) const {
    const int64_t k = p->k, tokens = p->tokens;
    const uint16_t* xh = static_cast<const uint16_t*>(x);
    int32_t* out = static_cast<int32_t*>(packed);
    for (int64_t r = r0; r < r0 + rows; ++r) {
      for (int64_t t = 0; t < tokens; ++t) {
        std::memcpy(out + r * tokens + t, xh + t * k + 2 * r, sizeof(int32_t));
      }
    }
  }
};

// Up to this many elements of x, PackTokensJob runs on the calling thread.
constexpr int64_t kInlinePackElements = int64_t{1} << 16;

// A task's first rows, asked for at once before its first pass (kernel_util.h:
// the pass's own prefetches run kPrefetchRows ahead of it). The lines layout
// is one stream, which the hardware prefetchers follow.
inline void PrefetchBlockStart(const PairsCtx& c, int64_t block) {
  const Int4Problem& p = *c.p;
  const int64_t o = block * kOutBlock, width = std::min(kOutBlock, p.n_out - o);
  if (!p.lines) PrefetchSpans(c.qweight + o, p.n_out, std::min(kPrefetchRows, p.k / 2), width);
}

struct PairsJob {
  const PairsCtx* c;

  void Run(int64_t task, int /*worker*/) const {
    const Int4Problem& p = *c->p;
    const int64_t block = task / c->chunks;
    const int64_t t0 = (task % c->chunks) * c->chunk_tokens;
    const int nt = static_cast<int>(std::min(c->chunk_tokens, p.tokens - t0));
    alignas(64) float y[kPairsTokensF32 * 32];  // the larger of 16 x 16 and 12 x 32
    static_assert(kPairsTokensF32 * 32 >= kPairsTokens * 16, "y holds a bf16 pass");
    const bool bf16 = p.dtype == Dtype::kBF16;
    const int vecs = bf16 ? 1 : 2;  // per pass
    PrefetchBlockStart(*c, block);
    for (int j = 0; j < 4; j += vecs) {
      const int64_t o = block * kOutBlock + 16 * j;
      if (o >= p.n_out) break;
      const __mmask16 masks[2] = {LaneMask(p.n_out - o),
                                  o + 16 < p.n_out ? LaneMask(p.n_out - o - 16) : __mmask16{0}};
      if (bf16) {
        Dispatch<kPairsTokens>(nt, [&](auto tokens) {
          constexpr int kTokens = decltype(tokens)::value;
          if (p.lines) return PairsPassBf16<kTokens, true>(*c, block, j, t0, masks[0], y);
          PairsPassBf16<kTokens, false>(*c, block, j, t0, masks[0], y);
        });
      } else {  // f32, or f16 widened
        Dispatch<kPairsTokensF32>(nt, [&](auto tokens) {
          constexpr int kTokens = decltype(tokens)::value;
          if (p.lines) return PairsPassF32<kTokens, true>(*c, block, j, t0, masks, y);
          PairsPassF32<kTokens, false>(*c, block, j, t0, masks, y);
        });
      }
      const int64_t width = 16 * vecs, on = std::min<int64_t>(width, p.n_out - o);
      for (int t = 0; t < nt; ++t) {
        Store(c->out, p.dtype, (t0 + t) * p.n_out + o, y + width * t, on);
      }
    }
  }
};

// y = x @ W where UsePairs(p): f32 scales read in place, bf16 and f16 ones
// widened.
inline bool RunPairs(const Int4Problem& p, const Runtime& rt) {
  const int64_t groups = p.k / p.group;
  const bool f32 = p.dtype == Dtype::kF32;
  // The widened scales, then x packed, from a 64-byte boundary.
  const int64_t scale_floats = f32 ? 0 : RoundUp(groups * p.n_out, 16);
  const size_t x_bytes = static_cast<size_t>(p.k * p.tokens) * (p.dtype == Dtype::kBF16 ? 2 : 4);
  void* scratch = rt.scratch(rt.scratch_owner,
                             static_cast<size_t>(scale_floats) * sizeof(float) + x_bytes);
  if (scratch == nullptr) return false;
  float* widened = static_cast<float*>(scratch);
  void* x_packed = widened + scale_floats;
  PairsCtx c{};
  c.p = &p;
  c.x_packed = x_packed;
  c.chunks = CeilDiv(p.tokens, p.dtype == Dtype::kBF16 ? kPairsTokens : kPairsTokensF32);
  c.chunk_tokens = CeilDiv(p.tokens, c.chunks);
  const int64_t blocks = CeilDiv(p.n_out, kOutBlock);
  for (int64_t e = 0; e < p.batch; ++e) {
    const void* scales = Offset(p.scales, e * p.scales_stride, p.dtype);
    if (!f32) Widen(scales, p.dtype, groups * p.n_out, widened);
    c.scales = f32 ? static_cast<const float*>(scales) : widened;
    const void* x = Offset(p.dense, e * p.dense_stride, p.dtype);
    // A small x (MiniLM's 17 x 384: 26 KB) is packed faster than a helper
    // joins: on the caller.
    const PackTokensJob pack{&p, x, x_packed};
    const int64_t pack_tasks = CeilDiv(p.k / 2, PackTokensJob::kRows);
    if (p.k * p.tokens <= kInlinePackElements) {
      for (int64_t t = 0; t < pack_tasks; ++t) pack.Run(t, 0);
    } else {
      RunParallel(rt, pack_tasks, pack);
    }
    c.qweight = p.qweight + e * p.weight_stride;
    c.last_line = p.lines ? LastLine(p, c.qweight) : nullptr;
    c.out = const_cast<void*>(Offset(p.out, e * p.tokens * p.n_out, p.dtype));
    RunParallel(rt, blocks * c.chunks, PairsJob{&c});
  }
  return true;
}

}  // namespace int4
}  // namespace JAXSPARSE_INT4_ISA
}  // namespace cpu
}  // namespace jaxsparse
