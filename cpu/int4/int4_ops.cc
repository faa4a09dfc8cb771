// The CPU handlers of the int4 targets (layouts in cpu/int4/int4_checks.h):
// checks through the shared validator, then one call of the current ISA's
// kernel (int4_kernels.h) on XLA's thread pool.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu/common/ffi.h"
#include "cpu/common/isa.h"
#include "cpu/common/runtime.h"
#include "cpu/common/targets.h"
#include "cpu/common/validate.h"
#include "cpu/int4/int4_checks.h"
#include "cpu/int4/int4_kernels_api.h"

namespace ffi = xla::ffi;

namespace jaxsparse {
namespace cpu {
namespace {

const Int4KernelTable& Kernels() { return JAXSPARSE_TABLE_FOR_CURRENT_ISA_WITH_AMX(kInt4Kernels); }

Int4Problem Problem(const int4_check::Operands& o, int64_t k, int64_t n_out,
                    int32_t group) {
  Int4Problem p{};
  p.dtype = KernelDtype(o.result.dtype());
  p.batch = o.result.batch;
  p.tokens = o.result.rows;
  p.k = k;
  p.n_out = n_out;
  p.group = group;
  p.dense = o.dense.data();
  p.dense_stride = o.dense.BatchStride();
  p.qweight = static_cast<const uint8_t*>(o.qweight.data());
  p.weight_stride = o.qweight.BatchStride();
  if (o.sparse) {
    p.positions = static_cast<const uint8_t*>(o.positions.data());
    p.positions_stride = o.positions.BatchStride();
  }
  p.scales = o.scales.data();
  p.scales_stride = o.scales.BatchStride();
  p.out = o.result.mutable_data();
  return p;
}

ffi::Error Matmul(const char* target, Int4KernelFn kernel, ffi::ThreadPool& pool,
                  const ffi::AnyBuffer& x, const ffi::AnyBuffer& qweight,
                  const ffi::AnyBuffer* positions, const ffi::AnyBuffer& scales,
                  int32_t group, ffi::Result<ffi::AnyBuffer>& y) {
  const Validator val(target);
  int4_check::Operands o;
  JAXSPARSE_RETURN_IF_ERROR(
      int4_check::CheckMatmul(val, group, x, qweight, positions, scales, *y, &o));
  return RunKernel(val, kernel, Problem(o, o.dense.cols, o.result.cols, group), pool, *y);
}

ffi::Error MatmulT(const char* target, Int4KernelFn kernel, ffi::ThreadPool& pool,
                   const ffi::AnyBuffer& dy, const ffi::AnyBuffer& qweight,
                   const ffi::AnyBuffer* positions, const ffi::AnyBuffer& scales,
                   int32_t group, ffi::Result<ffi::AnyBuffer>& dx) {
  const Validator val(target);
  int4_check::Operands o;
  JAXSPARSE_RETURN_IF_ERROR(
      int4_check::CheckMatmulT(val, group, dy, qweight, positions, scales, *dx, &o));
  return RunKernel(val, kernel, Problem(o, o.result.cols, o.dense.cols, group), pool, *dx);
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer qweight,
                      ffi::AnyBuffer scales, int32_t group_size,
                      ffi::Result<ffi::AnyBuffer> y) {
  return Matmul("jaxsparse_int4_matmul", Kernels().matmul, pool, x, qweight, nullptr, scales,
                group_size, y);
}

ffi::Error MatmulTImpl(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer qweight,
                       ffi::AnyBuffer scales, int32_t group_size,
                       ffi::Result<ffi::AnyBuffer> dx) {
  return MatmulT("jaxsparse_int4_matmul_t", Kernels().matmul_t, pool, dy, qweight, nullptr,
                 scales, group_size, dx);
}

ffi::Error NmMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer qweight,
                        ffi::AnyBuffer positions, ffi::AnyBuffer scales, int32_t group_size,
                        ffi::Result<ffi::AnyBuffer> y) {
  return Matmul("jaxsparse_int4_nm_matmul", Kernels().nm_matmul, pool, x, qweight, &positions,
                scales, group_size, y);
}

ffi::Error NmMatmulTImpl(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer qweight,
                         ffi::AnyBuffer positions, ffi::AnyBuffer scales,
                         int32_t group_size, ffi::Result<ffi::AnyBuffer> dx) {
  return MatmulT("jaxsparse_int4_nm_matmul_t", Kernels().nm_matmul_t, pool, dy, qweight,
                 &positions, scales, group_size, dx);
}

ffi::Error Lines(const char* target, bool sparse, Int4KernelFn kernel, ffi::ThreadPool& pool,
                 const ffi::AnyBuffer& x, const ffi::AnyBuffer& lines,
                 const ffi::AnyBuffer& scales, int32_t group, ffi::Result<ffi::AnyBuffer>& y) {
  const Validator val(target);
  int4_check::Operands o;
  JAXSPARSE_RETURN_IF_ERROR(
      int4_check::CheckMatmulLines(val, group, sparse, x, lines, scales, *y, &o));
  Int4Problem p = Problem(o, o.dense.cols, o.result.cols, group);
  p.lines = true;
  return RunKernel(val, kernel, p, pool, *y);
}

ffi::Error MatmulLinesImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer lines,
                           ffi::AnyBuffer scales, int32_t group_size,
                           ffi::Result<ffi::AnyBuffer> y) {
  return Lines("jaxsparse_int4_matmul_lines", false, Kernels().matmul, pool, x, lines, scales,
               group_size, y);
}

ffi::Error NmMatmulLinesImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer lines,
                             ffi::AnyBuffer scales, int32_t group_size,
                             ffi::Result<ffi::AnyBuffer> y) {
  return Lines("jaxsparse_int4_nm_matmul_lines", true, Kernels().nm_matmul, pool, x, lines,
               scales, group_size, y);
}

ffi::Error A8MatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer xq, ffi::AnyBuffer x_scales,
                        ffi::AnyBuffer x_sums, ffi::AnyBuffer qweight, ffi::AnyBuffer scales,
                        int32_t group_size, ffi::Result<ffi::AnyBuffer> y) {
  const Validator val("jaxsparse_int4_a8_matmul");
  int4_check::A8Operands o;
  JAXSPARSE_RETURN_IF_ERROR(int4_check::CheckA8Matmul(val, group_size, xq, x_scales, x_sums,
                                                      qweight, scales, *y, &o));
  Int4Problem p = Problem(o.w, o.w.dense.cols, o.w.result.cols, group_size);
  p.x_scales = static_cast<const float*>(o.x_scales.data());
  p.x_sums = static_cast<const int32_t*>(o.x_sums.data());
  p.x_group_stride = o.x_scales.BatchStride();
  return RunKernel(val, Kernels().a8_matmul, p, pool, *y);
}

// The int8-activation product of float x: x quantised here, inside the call,
// then the a8 kernel. At 17 tokens the same quantisation as XLA ops around
// the call (abs, max, divide, round, clip, convert, sum and the quad gather)
// cost more than the product (docs/cpu_speed_notes.md). The quantised
// operands live in this thread's buffers, kept between calls.
struct A8Quantized {
  std::vector<int8_t> codes;
  std::vector<float> scales;
  std::vector<int32_t> sums;
};

struct QuantizeJob {
  Int4QuantizeFn quantize;
  const void* x;
  Dtype dtype;
  int64_t rows, k, rows_per_task;
  int32_t group;
  A8Quantized* out;

  static void Run(void* self, int64_t task, int /*worker*/) {
    const auto& j = *static_cast<const QuantizeJob*>(self);
    const int64_t row0 = task * j.rows_per_task;
    j.quantize(j.x, j.dtype, row0, std::min(j.rows_per_task, j.rows - row0), j.k, j.group,
               j.out->codes.data(), j.out->scales.data(), j.out->sums.data());
  }
};

// Inputs per quantising task: below twice this the caller quantises alone
// (17 tokens of MiniLM's 1536 inputs: a few microseconds, less than a wake-up).
constexpr int64_t kQuantizeTaskInputs = int64_t{1} << 15;

void QuantizeA8(ffi::ThreadPool& pool, const void* x, Dtype dtype, int64_t rows, int64_t k,
                int32_t group, A8Quantized* out) {
  out->codes.resize(static_cast<size_t>(rows * k));
  out->scales.resize(static_cast<size_t>(rows * (k / group)));
  out->sums.resize(out->scales.size());
  if (rows == 0 || k == 0) return;  // Nothing to quantise (and no rows to split).
  const int64_t tasks = std::max<int64_t>(1, std::min(rows, rows * k / kQuantizeTaskInputs));
  QuantizeJob job{Kernels().quantize_a8, x, dtype, rows, k, (rows + tasks - 1) / tasks, group,
                  out};
  const int64_t used = (rows + job.rows_per_task - 1) / job.rows_per_task;
  if (used == 1) {
    QuantizeJob::Run(&job, 0, 0);
    return;
  }
  CallScratch unused;
  const Runtime rt = MakeRuntime(pool, &unused);
  rt.parallel_for(rt.pool, used, &QuantizeJob::Run, &job);
}

ffi::Error A8FusedMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer qweight,
                             ffi::AnyBuffer scales, int32_t group_size,
                             ffi::Result<ffi::AnyBuffer> y) {
  const Validator val("jaxsparse_int4_a8_fused_matmul");
  int4_check::Operands o;
  JAXSPARSE_RETURN_IF_ERROR(
      int4_check::CheckMatmul(val, group_size, x, qweight, nullptr, scales, *y, &o));
  const int64_t k = o.dense.cols, t = o.dense.rows, groups = k / group_size;
  JAXSPARSE_RETURN_IF_ERROR(int4_check::CheckWholeQuads(val, k, group_size));
  thread_local A8Quantized quantized;
  QuantizeA8(pool, o.dense.data(), KernelDtype(o.dense.dtype()), o.dense.batch * t, k,
             group_size, &quantized);
  Int4Problem p = Problem(o, k, o.result.cols, group_size);
  const bool broadcast = o.dense.BatchStride() == 0;
  p.dense = quantized.codes.data();
  p.dense_stride = broadcast ? 0 : t * k;
  p.x_scales = quantized.scales.data();
  p.x_sums = quantized.sums.data();
  p.x_group_stride = broadcast ? 0 : t * groups;
  return RunKernel(val, Kernels().a8_matmul, p, pool, *y);
}

}  // namespace
}  // namespace cpu
}  // namespace jaxsparse

// The dense form: a float operand, qweight, scales; the 2:4 form adds positions.
#define JAXSPARSE_INT4_BINDING                                                     \
  .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()               \
      .Attr<int32_t>("group_size").Ret<ffi::AnyBuffer>()
#define JAXSPARSE_INT4_NM_BINDING                                                   \
  .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>() \
      .Attr<int32_t>("group_size").Ret<ffi::AnyBuffer>()

JAXSPARSE_CPU_TARGET(JaxsparseCpuInt4Matmul, "jaxsparse_int4_matmul",
                     jaxsparse::cpu::MatmulImpl, JAXSPARSE_INT4_BINDING);
JAXSPARSE_CPU_TARGET(JaxsparseCpuInt4MatmulT, "jaxsparse_int4_matmul_t",
                     jaxsparse::cpu::MatmulTImpl, JAXSPARSE_INT4_BINDING);
JAXSPARSE_CPU_TARGET(JaxsparseCpuInt4MatmulLines, "jaxsparse_int4_matmul_lines",
                     jaxsparse::cpu::MatmulLinesImpl, JAXSPARSE_INT4_BINDING);
JAXSPARSE_CPU_TARGET(JaxsparseCpuInt4NmMatmulLines, "jaxsparse_int4_nm_matmul_lines",
                     jaxsparse::cpu::NmMatmulLinesImpl, JAXSPARSE_INT4_BINDING);
JAXSPARSE_CPU_TARGET(JaxsparseCpuInt4NmMatmul, "jaxsparse_int4_nm_matmul",
                     jaxsparse::cpu::NmMatmulImpl, JAXSPARSE_INT4_NM_BINDING);
JAXSPARSE_CPU_TARGET(JaxsparseCpuInt4NmMatmulT, "jaxsparse_int4_nm_matmul_t",
                     jaxsparse::cpu::NmMatmulTImpl, JAXSPARSE_INT4_NM_BINDING);
// int8 activations: xq, x_scales, x_sums, qweight, scales.
JAXSPARSE_CPU_TARGET(JaxsparseCpuInt4A8Matmul, "jaxsparse_int4_a8_matmul",
                     jaxsparse::cpu::A8MatmulImpl,
                     .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                         .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                         .Attr<int32_t>("group_size").Ret<ffi::AnyBuffer>());
// int8 activations quantised inside the call: float x, qweight, scales.
JAXSPARSE_CPU_TARGET(JaxsparseCpuInt4A8FusedMatmul, "jaxsparse_int4_a8_fused_matmul",
                     jaxsparse::cpu::A8FusedMatmulImpl, JAXSPARSE_INT4_BINDING);
