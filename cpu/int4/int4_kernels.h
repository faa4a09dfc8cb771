// The int4 kernels (layouts in cpu/int4/int4_checks.h), compiled once per ISA
// unit inside namespace JAXSPARSE_INT4_ISA. The AVX-512 units define
// JAXSPARSE_INT4_AVX512 and get the vector blocks of int4_avx512.h, the avx2
// unit defines JAXSPARSE_INT4_AVX2 and gets those of int4_avx2.h; the portable
// unit runs the scalar blocks below.
//
// Every kernel works per batch entry in f32: bf16/f16 dense operands (x or dy)
// and scales are widened once into scratch, f32 ones read in place (as is the
// weight, the bytes that matter), then tasks on XLA's pool
// each own a block of outputs (products by W) or of inputs (products by W^T)
// and a block of up to 4 tokens, and write their part of the result in its
// dtype.
//
// Products by W decode each weight byte once per 4 tokens. In the dense form
// the offset of the nibbles (u - 8) and the group scale are applied once per
// group and output: y += s * (sum_i u_i x_i - 8 sum_i x_i), with the sums of x
// over each group taken once per call.
#ifndef JAXSPARSE_INT4_ISA
#error "define JAXSPARSE_INT4_ISA (the unit's namespace) before including int4_kernels.h"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/common/dtype_convert.h"
#include "cpu/common/kernel_util.h"
#include "cpu/int4/int4_kernels_api.h"

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_INT4_ISA {
namespace int4 {

constexpr int64_t kOutBlock = 64;    // outputs per task: one 64-byte line of a qweight row
constexpr int kTokenBlock = 4;       // tokens per task: each decoded byte serves 4 tokens
constexpr int64_t kRowBlock = 64;    // dx tasks: input rows (dense) or 2:4 groups per task

// One batch entry's operands, widened.
struct Ctx {
  const Int4Problem* p;
  const float* dense;     // x [T, K] or dy [T, N], f32
  const float* scales;    // [G, N], f32
  const float* xsum;      // [T, G]: x summed over each group (dense forward)
  const void* dense_raw;  // int8 activations: xq [T, K] as stored
  const float* x_scales;  // int8 activations: [T, G] per token and group
  const int32_t* x_sums;  // int8 activations: [T, G] sums of the codes
  const uint8_t* qweight;
  const uint8_t* positions;
  void* out;              // this batch entry's result
  int64_t out_blocks;     // forward: ceil(N / out_width); dx: row blocks
  int64_t token_blocks;   // forward tasks in block-major order: the token blocks; else 0
  int64_t out_width;      // forward: outputs per task (64; 128 for the lines at 1 token)
  float* work;            // dx: per worker, kTokenBlock * N floats
  const uint8_t* block_lines;  // a task's own copy of its block's 2:4 lines (NmRepackTask)
  int64_t lines_floats;        // NmRepackTask: per-worker floats of that copy
};

inline const void* Offset(const void* base, int64_t elements, Dtype dtype) {
  const int64_t size = dtype == Dtype::kF32 ? 4 : 2;
  return static_cast<const char*>(base) + elements * size;
}

// `count` values of `src` (in `dtype`) as f32 into `dst`.
inline void Widen(const void* src, Dtype dtype, int64_t count, float* dst) {
  if (dtype == Dtype::kF32) {
    std::memcpy(dst, src, count * sizeof(float));
    return;
  }
  const uint16_t* h = static_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < count; ++i) {
    dst[i] = dtype == Dtype::kBF16 ? Bf16ToF32(h[i]) : F16ToF32(h[i]);
  }
}

// `count` f32 values into `dst` at element `index`, rounded to `dtype`.
inline void Store(void* dst, Dtype dtype, int64_t index, const float* src, int64_t count) {
  if (dtype == Dtype::kF32) {
    std::memcpy(static_cast<float*>(dst) + index, src, count * sizeof(float));
    return;
  }
  uint16_t* h = static_cast<uint16_t*>(dst) + index;
  for (int64_t i = 0; i < count; ++i) {
    h[i] = dtype == Dtype::kBF16 ? F32ToBf16(src[i]) : F32ToF16(src[i]);
  }
}

// The two positions (0..3) of 2:4 group j of output o.
inline void GroupPositions(const uint8_t* positions, int64_t n_out, int64_t j, int64_t o,
                           int* p0, int* p1) {
  const int code = (positions[(j >> 1) * n_out + o] >> (4 * (j & 1))) & 15;
  *p0 = code & 3;
  *p1 = code >> 2;
}

// The 2:4 lines (int4_checks.h): the first of the 8 lines of chunk j / 4 in
// the block of output o, and the byte of (j, o) in lines 0..3 (values) or
// 4..7 (indices).
inline int64_t NmLinesChunk(const Int4Problem& p, int64_t j, int64_t o) {
  return ((o / 64) * ((p.k + 15) / 16) + j / 4) * 8 * 64;
}

// 2:4 group j of output o: its value byte (v0 | v1 << 4) and positions, from
// the canonical arrays or the lines.
inline void SparseGroup(const Ctx& c, int64_t j, int64_t o, int* byte, int* p0, int* p1) {
  const Int4Problem& p = *c.p;
  if (!p.lines) {
    *byte = c.qweight[j * p.n_out + o];
    GroupPositions(c.positions, p.n_out, j, o, p0, p1);
    return;
  }
  const uint8_t* value =
      c.qweight + NmLinesChunk(p, j, o) + o % 64 / 16 * 64 + 4 * (o % 16) + j % 4;
  const int index = value[4 * 64];
  *byte = *value;
  *p0 = index & 3;
  *p1 = (index >> 4) & 3;
}

// Byte (input pair r, output o) of the dense form's qweight, canonical or in
// the lines layout (int4_checks.h).
inline int DenseByte(const Ctx& c, int64_t r, int64_t o) {
  const Int4Problem& p = *c.p;
  if (!p.lines) return c.qweight[r * p.n_out + o];
  return c.qweight[((o / 64) * (p.k / 2) + r) * 64 + 4 * (o % 16) + o % 64 / 16];
}

// ---------------------------------------------------------------- scalar blocks
// y[t0 + t][o0 + o] for t < nt, o < on, f32, into y (row stride kOutBlock).
inline void ForwardDenseScalar(const Ctx& c, int64_t o0, int64_t on, int64_t t0, int nt,
                               float* y) {
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out, k = p.k, groups = k / p.group;
  for (int t = 0; t < nt; ++t) {
    const float* x = c.dense + (t0 + t) * k;
    for (int64_t o = 0; o < on; ++o) {
      float sum = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        float acc = 0.0f;
        for (int64_t i = g * p.group; i < (g + 1) * p.group; i += 2) {
          const int byte = DenseByte(c, i >> 1, o0 + o);
          acc += static_cast<float>(byte & 15) * x[i] + static_cast<float>(byte >> 4) * x[i + 1];
        }
        sum += c.scales[g * n + o0 + o] * (acc - 8.0f * c.xsum[(t0 + t) * groups + g]);
      }
      y[t * kOutBlock + o] = sum;
    }
  }
}

inline void ForwardSparseScalar(const Ctx& c, int64_t o0, int64_t on, int64_t t0, int nt,
                                float* y) {
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out, k = p.k, groups = k / p.group, per_group = p.group / 4;
  for (int t = 0; t < nt; ++t) {
    const float* x = c.dense + (t0 + t) * k;
    for (int64_t o = 0; o < on; ++o) {
      float sum = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        float acc = 0.0f;
        for (int64_t j = g * per_group; j < (g + 1) * per_group; ++j) {
          int byte, p0, p1;
          SparseGroup(c, j, o0 + o, &byte, &p0, &p1);
          acc += static_cast<float>((byte & 15) - 8) * x[4 * j + p0] +
                 static_cast<float>((byte >> 4) - 8) * x[4 * j + p1];
        }
        sum += c.scales[g * n + o0 + o] * acc;
      }
      y[t * kOutBlock + o] = sum;
    }
  }
}

// dx[t0 + t][rows of the block] for the dense form: input rows [i0, i0 + rows)
// of one group; `dys` holds dy * the group's scales, [nt][N].
inline void BackwardDenseScalar(const Ctx& c, int64_t i0, int64_t rows, int nt,
                                const float* dys, float* dx) {
  const int64_t n = c.p->n_out;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    const uint8_t* q = c.qweight + (i >> 1) * n;
    const int shift = 4 * (i & 1);
    for (int t = 0; t < nt; ++t) {
      float acc = 0.0f;
      for (int64_t o = 0; o < n; ++o) {
        acc += static_cast<float>(((q[o] >> shift) & 15) - 8) * dys[t * n + o];
      }
      dx[t * kRowBlock * 4 + r] = acc;
    }
  }
}

// The 2:4 form: groups [j0, j0 + count) of one scale group; dx rows 4 j + p.
inline void BackwardSparseScalar(const Ctx& c, int64_t j0, int64_t count, int nt,
                                 const float* dys, float* dx) {
  const int64_t n = c.p->n_out;
  for (int64_t r = 0; r < count; ++r) {
    const int64_t j = j0 + r;
    for (int t = 0; t < nt; ++t) {
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int64_t o = 0; o < n; ++o) {
        const int byte = c.qweight[j * n + o];
        int p0, p1;
        GroupPositions(c.positions, n, j, o, &p0, &p1);
        acc[p0] += static_cast<float>((byte & 15) - 8) * dys[t * n + o];
        acc[p1] += static_cast<float>((byte >> 4) - 8) * dys[t * n + o];
      }
      for (int s = 0; s < 4; ++s) dx[t * kRowBlock * 4 + 4 * r + s] = acc[s];
    }
  }
}

// Without AVX-512 the lines run the canonical scalar blocks (DenseByte and
// SparseGroup read either layout).
inline void ForwardLinesScalar(const Ctx& c, int64_t o0, int64_t on, int64_t t0, int nt,
                               float* y) {
  ForwardDenseScalar(c, o0, on, t0, nt, y);
}

inline void ForwardNmLinesScalar(const Ctx& c, int64_t o0, int64_t on, int64_t t0, int nt,
                                 float* y) {
  ForwardSparseScalar(c, o0, on, t0, nt, y);
}

// ---------------------------------------------------------------- int8 activations
// Where input i of a quad sits in xq: quads are stored (0, 2, 1, 3), the order
// of the decoded weight dwords (int4_avx512.h's A8Dword); the swap is its own
// inverse.
inline int64_t A8Slot(int64_t i) {
  const int64_t r = i & 3;
  return (i & ~int64_t{3}) + (r == 1 ? 2 : r == 2 ? 1 : r);
}

// y[t0 + t][o0 + o] on int8 activations: per group the exact integer dot
// sum u xq - 8 sum xq, then times the token's and the output's scales.
inline void ForwardA8Scalar(const Ctx& c, int64_t o0, int64_t on, int64_t t0, int nt,
                            float* y) {
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out, k = p.k, groups = k / p.group;
  const int8_t* xq = static_cast<const int8_t*>(c.dense_raw);
  for (int t = 0; t < nt; ++t) {
    const int8_t* x = xq + (t0 + t) * k;
    const float* sx = c.x_scales + (t0 + t) * groups;
    const int32_t* sums = c.x_sums + (t0 + t) * groups;
    for (int64_t o = 0; o < on; ++o) {
      float sum = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        int32_t dot = 0;
        for (int64_t i = g * p.group; i < (g + 1) * p.group; i += 2) {
          const int byte = c.qweight[(i >> 1) * n + o0 + o];
          dot += (byte & 15) * x[A8Slot(i)] + (byte >> 4) * x[A8Slot(i + 1)];
        }
        dot -= 8 * sums[g];
        sum += c.scales[g * n + o0 + o] * (sx[g] * static_cast<float>(dot));
      }
      y[t * kOutBlock + o] = sum;
    }
  }
}

}  // namespace int4
}  // namespace JAXSPARSE_INT4_ISA
}  // namespace cpu
}  // namespace jaxsparse

#ifdef JAXSPARSE_INT4_AVX512
#include "cpu/common/simd_avx512.h"
#include "cpu/int4/int4_avx512.h"
#include "cpu/int4/int4_panel_avx512.h"
#include "cpu/int4/int4_pairs.h"
#else
#ifdef JAXSPARSE_INT4_AVX2
#include "cpu/int4/int4_avx2.h"
#endif
namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_INT4_ISA {
namespace int4 {
// Without AVX-512 every product streams the weight (no panel or pairs path).
inline int64_t PanelWorkFloats(const Int4Problem&) { return 0; }
inline bool UsePanels(const Int4Problem&) { return false; }
inline bool UseNmRepack(const Int4Problem&) { return false; }
inline bool UsePairs(const Int4Problem&) { return false; }
inline bool RunPairs(const Int4Problem&, const Runtime&) { return false; }
}  // namespace int4
}  // namespace JAXSPARSE_INT4_ISA
}  // namespace cpu
}  // namespace jaxsparse
#endif

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_INT4_ISA {
namespace int4 {

#ifdef JAXSPARSE_INT4_AVX512
#define JAXSPARSE_INT4_BLOCK(name) name##Avx512
#elif defined(JAXSPARSE_INT4_AVX2)
#define JAXSPARSE_INT4_BLOCK(name) name##Avx2
#else
#define JAXSPARSE_INT4_BLOCK(name) name##Scalar
#endif

// ---------------------------------------------------------------- products by W
// kSparse: the 2:4 form; kLines: either form in its lines layout.
template <bool kSparse, bool kLines = false>
void ForwardTask(void* ctx, int64_t task, int /*worker*/) {
  const Ctx& c = *static_cast<const Ctx*>(ctx);
  const Int4Problem& p = *c.p;
  const int64_t block = c.token_blocks ? task / c.token_blocks : task % c.out_blocks;
  const int64_t o0 = block * c.out_width;
  const int64_t t0 = (c.token_blocks ? task % c.token_blocks : task / c.out_blocks) * kTokenBlock;
  const int64_t on = std::min(c.out_width, p.n_out - o0);
  const int nt = static_cast<int>(std::min<int64_t>(kTokenBlock, p.tokens - t0));
  // Rows of kOutBlock floats per token; a 128-output task has 1 token.
  alignas(64) float y[kTokenBlock * kOutBlock];
  if (kLines && kSparse) {
    JAXSPARSE_INT4_BLOCK(ForwardNmLines)(c, o0, on, t0, nt, y);
  } else if (kLines) {
    JAXSPARSE_INT4_BLOCK(ForwardLines)(c, o0, on, t0, nt, y);
  } else if (kSparse) {
    JAXSPARSE_INT4_BLOCK(ForwardSparse)(c, o0, on, t0, nt, y);
  } else {
    JAXSPARSE_INT4_BLOCK(ForwardDense)(c, o0, on, t0, nt, y);
  }
  for (int t = 0; t < nt; ++t) {
    Store(c.out, p.dtype, (t0 + t) * p.n_out + o0, y + t * kOutBlock, on);
  }
}

// ---------------------------------------------------------------- products by W^T
// A task owns up to kRowBlock rows (dense: input rows; 2:4: groups of 4 inputs)
// inside one scale group, and a block of tokens.
template <bool kSparse>
void BackwardTask(void* ctx, int64_t task, int worker) {
  const Ctx& c = *static_cast<const Ctx*>(ctx);
  const Int4Problem& p = *c.p;
  const int64_t n = p.n_out, k = p.k;
  const int64_t units = kSparse ? k / 4 : k;             // rows of the task's unit
  const int64_t unit_per_group = kSparse ? p.group / 4 : p.group;
  const int64_t blocks_per_group = (unit_per_group + kRowBlock - 1) / kRowBlock;
  const int64_t block = task % c.out_blocks;
  const int64_t t0 = (task / c.out_blocks) * kTokenBlock;
  const int64_t g = block / blocks_per_group;
  const int64_t u0 = g * unit_per_group + (block % blocks_per_group) * kRowBlock;
  const int64_t count = std::min({kRowBlock, (g + 1) * unit_per_group - u0, units - u0});
  const int nt = static_cast<int>(std::min<int64_t>(kTokenBlock, p.tokens - t0));
  // dy times the group's scales, once per task (a 64th of its multiply-adds).
  float* dys = c.work + static_cast<int64_t>(worker) * kTokenBlock * n;
  for (int t = 0; t < nt; ++t) {
    const float* dy = c.dense + (t0 + t) * n;
    for (int64_t o = 0; o < n; ++o) dys[t * n + o] = dy[o] * c.scales[g * n + o];
  }
  alignas(64) float dx[kTokenBlock * kRowBlock * 4];
  if (kSparse) {
    JAXSPARSE_INT4_BLOCK(BackwardSparse)(c, u0, count, nt, dys, dx);
  } else {
    JAXSPARSE_INT4_BLOCK(BackwardDense)(c, u0, count, nt, dys, dx);
  }
  const int64_t i0 = kSparse ? 4 * u0 : u0, width = kSparse ? 4 * count : count;
  for (int t = 0; t < nt; ++t) {
    Store(c.out, p.dtype, (t0 + t) * k + i0, dx + t * kRowBlock * 4, width);
  }
}

#undef JAXSPARSE_INT4_BLOCK

#ifdef JAXSPARSE_INT4_AVX512
// The canonical 2:4 form at many f32 / f16 tokens (UseNmRepack): a task packs
// its block of 64 outputs into lines in its scratch (lines_floats per
// worker), then multiplies every token by them, 4 at a time.
inline void NmRepackTask(void* ctx, int64_t task, int worker) {
  const Ctx& c = *static_cast<const Ctx*>(ctx);
  const Int4Problem& p = *c.p;
  const int64_t o0 = task * kOutBlock, on = std::min(kOutBlock, p.n_out - o0);
  uint8_t* lines = reinterpret_cast<uint8_t*>(c.work + worker * c.lines_floats);
  // The block's scales, read a group at a time after the pack: asked for now.
  PrefetchSpans(c.scales + o0, p.n_out * 4, p.k / p.group, on * 4);
  PackNmLinesBlock(p, c.qweight, c.positions, o0, lines);
  Ctx local = c;
  local.block_lines = lines;
  alignas(64) float y[kTokenBlock * kOutBlock];
  for (int64_t t0 = 0; t0 < p.tokens; t0 += kTokenBlock) {
    const int nt = static_cast<int>(std::min<int64_t>(kTokenBlock, p.tokens - t0));
    ForwardNmLinesAvx512(local, o0, on, t0, nt, y);
    for (int t = 0; t < nt; ++t) {
      Store(c.out, p.dtype, (t0 + t) * p.n_out + o0, y + t * kOutBlock, on);
    }
  }
}
#endif

// ---------------------------------------------------------------- drivers
// Scratch: the widened dense operand and scales (bf16/f16 only: f32 is read
// in place), the group sums of x, and per worker the dx tasks' scaled dy or
// the panels' decoded block and accumulators (floats of each; Layout carves
// them, kernel_util.h's TakeScratch).
struct Scratch {
  int64_t dense_floats, scale_floats, xsum_floats, work_floats;
  float* dense = nullptr;
  float* scales = nullptr;
  float* xsum = nullptr;
  float* work = nullptr;

  void Layout(Carver& c) {
    dense = c.Take<float>(dense_floats);
    scales = c.Take<float>(scale_floats);
    xsum = c.Take<float>(xsum_floats);
    work = c.Take<float>(work_floats);
  }
};

inline bool TakeStreamScratch(const Int4Problem& p, const Runtime& rt, int64_t dense_cols,
                              bool panels, int64_t per_worker_floats, Scratch* s) {
  const int64_t groups = p.k / p.group;
  const int64_t per_worker =
      per_worker_floats ? per_worker_floats : panels ? PanelWorkFloats(p) : kTokenBlock * p.n_out;
  s->dense_floats = p.dtype == Dtype::kF32 ? 0 : p.tokens * dense_cols;
  s->scale_floats = p.dtype == Dtype::kF32 ? 0 : groups * p.n_out;  // f32: in place
  s->xsum_floats = panels ? 0 : p.tokens * groups;
  s->work_floats = static_cast<int64_t>(std::max(rt.num_workers, 1)) * per_worker;
  return TakeScratch(rt, *s);
}

// The lines at 1 token: tasks of two blocks (ForwardLinesTokens), when that
// still leaves every worker 4 of them.
inline bool LinesPairTasks(const Int4Problem& p, const Runtime& rt) {
  const int64_t pairs = (p.n_out + 2 * kOutBlock - 1) / (2 * kOutBlock);
  return p.lines && p.tokens == 1 && pairs >= 4 * std::max(rt.num_workers, 1);
}

// The group sums of x that the streaming dense forward subtracts 8 times.
inline void GroupSums(const Int4Problem& p, const float* x, float* xsum) {
  const int64_t groups = p.k / p.group;
  for (int64_t t = 0; t < p.tokens; ++t) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = x + t * p.k + g * p.group;
      float sum = 0.0f;
      for (int64_t i = 0; i < p.group; ++i) sum += xg[i];
      xsum[t * groups + g] = sum;
    }
  }
}

template <bool kSparse, bool kTransposed>
bool Run(const Int4Problem& p, const Runtime& rt) {
  const int64_t dense_cols = kTransposed ? p.n_out : p.k;
  const int64_t out_cols = kTransposed ? p.k : p.n_out;
  if (p.tokens == 0 || out_cols == 0) return true;
  if (!kSparse && !kTransposed && UsePairs(p)) return RunPairs(p, rt);
  if (dense_cols == 0) {  // K = 0 or N = 0: the product is zero.
    const int64_t size = p.dtype == Dtype::kF32 ? 4 : 2;
    std::memset(p.out, 0, p.batch * p.tokens * out_cols * size);
    return true;
  }
  // The 2:4 lines take their lookup kernel at every token count: it multiplies
  // the kept values only, where the panels multiply the zeros too (4096 x
  // 4096 f32 on Zen 4: 1.27-1.29x XLA at 128 tokens against 1.08x, 1.16x at
  // 2048 against 1.07x; docs/cpu_speed_notes.md, int4 ninth round).
  const bool repack = kSparse && !kTransposed && UseNmRepack(p);
  const bool panels = !kTransposed && UsePanels(p) && !(kSparse && p.lines) && !repack;
#ifdef JAXSPARSE_INT4_AVX512
  const int64_t repack_floats = repack ? NmBlockBytes(p) / 4 + 16 : 0;
#else
  const int64_t repack_floats = 0;
#endif
  Scratch s;
  if (!TakeStreamScratch(p, rt, dense_cols, panels, repack_floats, &s)) return false;
  const int64_t groups = p.k / p.group;
  for (int64_t b = 0; b < p.batch; ++b) {
    const void* dense = Offset(p.dense, b * p.dense_stride, p.dtype);
    if (p.dtype != Dtype::kF32) Widen(dense, p.dtype, p.tokens * dense_cols, s.dense);
    const void* scales = Offset(p.scales, b * p.scales_stride, p.dtype);
    if (p.dtype != Dtype::kF32) Widen(scales, p.dtype, groups * p.n_out, s.scales);
    Ctx c{};
    c.p = &p;
    c.dense = p.dtype == Dtype::kF32 ? static_cast<const float*>(dense) : s.dense;
    c.scales = p.dtype == Dtype::kF32 ? static_cast<const float*>(scales) : s.scales;
    c.xsum = s.xsum;
    c.work = s.work;
    c.qweight = p.qweight + b * p.weight_stride;
    c.positions = kSparse ? p.positions + b * p.positions_stride : nullptr;
    c.out = const_cast<void*>(Offset(p.out, b * p.tokens * out_cols, p.dtype));
    if (kTransposed) {
      const int64_t unit_per_group = kSparse ? p.group / 4 : p.group;
      const int64_t token_blocks = (p.tokens + kTokenBlock - 1) / kTokenBlock;
      c.out_blocks = groups * ((unit_per_group + kRowBlock - 1) / kRowBlock);
      rt.parallel_for(rt.pool, c.out_blocks * token_blocks, &BackwardTask<kSparse>, &c);
#ifdef JAXSPARSE_INT4_AVX512
    } else if (repack) {
      c.out_blocks = (p.n_out + kOutBlock - 1) / kOutBlock;
      c.lines_floats = repack_floats;
      rt.parallel_for(rt.pool, c.out_blocks, &NmRepackTask, &c);
    } else if (panels) {
      const int64_t token_blocks = (p.tokens + kPanelTokens - 1) / kPanelTokens;
      c.out_blocks = (p.n_out + kPanelOut - 1) / kPanelOut;
      rt.parallel_for(rt.pool, c.out_blocks * token_blocks, &PanelTask<kSparse>, &c);
#endif
    } else {
      if (!kSparse) GroupSums(p, c.dense, s.xsum);
      const int64_t token_blocks = (p.tokens + kTokenBlock - 1) / kTokenBlock;
      c.out_width = LinesPairTasks(p, rt) ? 2 * kOutBlock : kOutBlock;
      c.out_blocks = (p.n_out + c.out_width - 1) / c.out_width;
      // The 2:4 lines at many tokens: a block's tasks one after the other, so
      // that its lines stay in L2 for all its tokens (4096 x 11008 f32 at 2048
      // tokens: 1.22-1.31x XLA against 1.14-1.16x in token-major order).
      c.token_blocks = kSparse && p.lines ? token_blocks : 0;
      rt.parallel_for(rt.pool, c.out_blocks * token_blocks,
                      p.lines ? &ForwardTask<kSparse, true> : &ForwardTask<kSparse>, &c);
    }
  }
  return true;
}

// ---------------------------------------------------------------- int8 activations
// The int8-activation forward's block: VNNI's vpdpbusd where the unit has it,
// AVX2's vpmaddubsw in the avx2 unit, else the scalar block (exact integer
// dots every way).
inline void ForwardA8Block(const Ctx& c, int64_t o0, int64_t on, int64_t t0, int nt, float* y) {
#if defined(JAXSPARSE_INT4_AVX512) && defined(__AVX512VNNI__)
  ForwardA8Avx512Vnni(c, o0, on, t0, nt, y);
#elif defined(JAXSPARSE_INT4_AVX2)
  ForwardA8Avx2(c, o0, on, t0, nt, y);
#else
  ForwardA8Scalar(c, o0, on, t0, nt, y);
#endif
}

inline void A8Task(void* ctx, int64_t task, int /*worker*/) {
  const Ctx& c = *static_cast<const Ctx*>(ctx);
  const Int4Problem& p = *c.p;
  const int64_t o0 = (task % c.out_blocks) * kOutBlock;
  const int64_t t0 = (task / c.out_blocks) * kTokenBlock;
  const int64_t on = std::min(kOutBlock, p.n_out - o0);
  const int nt = static_cast<int>(std::min<int64_t>(kTokenBlock, p.tokens - t0));
  alignas(64) float y[kTokenBlock * kOutBlock];
  ForwardA8Block(c, o0, on, t0, nt, y);
  for (int t = 0; t < nt; ++t) {
    Store(c.out, p.dtype, (t0 + t) * p.n_out + o0, y + t * kOutBlock, on);
  }
}

// y = x @ W on int8 activations: tasks of 64 outputs by 4 tokens, as the
// streaming forward; the weight's scales widened to f32 once per call.
inline bool RunA8(const Int4Problem& p, const Runtime& rt) {
  if (p.tokens == 0 || p.n_out == 0) return true;
  if (p.k == 0) {
    std::memset(p.out, 0, p.batch * p.tokens * p.n_out * (p.dtype == Dtype::kF32 ? 4 : 2));
    return true;
  }
  const int64_t groups = p.k / p.group;
  float* scales = static_cast<float*>(
      rt.scratch(rt.scratch_owner, static_cast<size_t>(groups * p.n_out) * sizeof(float)));
  if (scales == nullptr) return false;
  const int64_t token_blocks = (p.tokens + kTokenBlock - 1) / kTokenBlock;
  for (int64_t b = 0; b < p.batch; ++b) {
    Widen(Offset(p.scales, b * p.scales_stride, p.dtype), p.dtype, groups * p.n_out, scales);
    Ctx c{};
    c.p = &p;
    c.scales = scales;
    c.dense_raw = static_cast<const int8_t*>(p.dense) + b * p.dense_stride;
    c.x_scales = p.x_scales + b * p.x_group_stride;
    c.x_sums = p.x_sums + b * p.x_group_stride;
    c.qweight = p.qweight + b * p.weight_stride;
    c.out = const_cast<void*>(Offset(p.out, b * p.tokens * p.n_out, p.dtype));
    c.out_blocks = (p.n_out + kOutBlock - 1) / kOutBlock;
    rt.parallel_for(rt.pool, c.out_blocks * token_blocks, &A8Task, &c);
  }
  return true;
}

// The quantiser's chunk: 256 widened inputs (1 KB) on the stack.
constexpr int64_t kQuantChunk = 256;

// `n` inputs of x from element `index` as f32: in place, or widened into `chunk`.
inline const float* ChunkF32(const void* x, Dtype dtype, int64_t index, int64_t n,
                             float* chunk) {
  if (dtype == Dtype::kF32) return static_cast<const float*>(x) + index;
  Widen(Offset(x, index, dtype), dtype, n, chunk);
  return chunk;
}

// max |v| of a group: the integer max of the bit patterns with the sign
// cleared, which orders finite values and infinity as the floats do (and
// vectorises, where a float max reduction would not without -ffast-math),
// and ranks every NaN above them, so a NaN input keeps its group's scale NaN
// and the product NaN, as in the reference.
inline float GroupAbsMax(const void* x, Dtype dtype, int64_t base, int32_t group,
                         float* chunk) {
  uint32_t top = 0;
  for (int64_t i0 = 0; i0 < group; i0 += kQuantChunk) {
    const int64_t n = std::min<int64_t>(kQuantChunk, group - i0);
    const float* v = ChunkF32(x, dtype, base + i0, n, chunk);
    for (int64_t i = 0; i < n; ++i) {
      uint32_t bits;
      std::memcpy(&bits, v + i, sizeof(bits));
      bits &= 0x7fffffffu;
      top = bits > top ? bits : top;
    }
  }
  float amax;
  std::memcpy(&amax, &top, sizeof(amax));
  return amax;
}

// x quantised as jaxsparse.ops.quantize_activations: per row and group,
// scale = max |x| * f32(1/127) and code = round-half-even(x / scale) clipped to
// [-127, 127] (IEEE division: on exact ties XLA's compiled division of the
// reference may land one code lower), each quad stored in the (0, 2, 1, 3) order of the
// decoded weight dwords. An all-zero group gets scale 0 and codes 0; a NaN
// code becomes -127 (its group's scale is NaN).
inline void QuantizeA8Rows(const void* x, Dtype dtype, int64_t row0, int64_t rows, int64_t k,
                           int32_t group, int8_t* codes, float* scales, int32_t* sums) {
  alignas(64) float chunk[kQuantChunk];
  alignas(64) int8_t q[kQuantChunk];
  const int64_t groups = k / group;
  for (int64_t r = row0; r < row0 + rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t base = r * k + g * group;
      // Times the rounded reciprocal, as the reference.
      const float scale = GroupAbsMax(x, dtype, base, group, chunk) * (1.0f / 127.0f);
      const float safe = scale > 0.0f ? scale : 1.0f;
      int32_t sum = 0;
      for (int64_t i0 = 0; i0 < group; i0 += kQuantChunk) {
        const int64_t n = std::min<int64_t>(kQuantChunk, group - i0);
        const float* v = ChunkF32(x, dtype, base + i0, n, chunk);
        for (int64_t i = 0; i < n; ++i) {
          float c = std::nearbyint(v[i] / safe);  // The default mode: half to even.
          c = c >= -127.0f ? c : -127.0f;
          c = c <= 127.0f ? c : 127.0f;
          q[i] = static_cast<int8_t>(static_cast<int32_t>(c));
          sum += q[i];
        }
        int8_t* out = codes + base + i0;
        for (int64_t j = 0; j < n; j += 4) {
          out[j] = q[j];
          out[j + 1] = q[j + 2];
          out[j + 2] = q[j + 1];
          out[j + 3] = q[j + 3];
        }
      }
      scales[r * groups + g] = scale;
      sums[r * groups + g] = sum;
    }
  }
}

}  // namespace int4

inline Int4KernelTable MakeInt4Table() {
  Int4KernelTable table;
  table.matmul = &int4::Run<false, false>;
  table.matmul_t = &int4::Run<false, true>;
  table.nm_matmul = &int4::Run<true, false>;
  table.nm_matmul_t = &int4::Run<true, true>;
  table.a8_matmul = &int4::RunA8;
  table.quantize_a8 = &int4::QuantizeA8Rows;
  return table;
}

}  // namespace JAXSPARSE_INT4_ISA
}  // namespace cpu
}  // namespace jaxsparse
