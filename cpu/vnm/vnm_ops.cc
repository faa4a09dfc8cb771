// The CPU handlers of the V:N:M targets (layouts in cpu/vnm/vnm_checks.h):
// checks through the shared validator, then one call of the current ISA's
// kernel (vnm_kernels.h) on XLA's thread pool.
#include <cstdint>

#include "cpu/common/ffi.h"
#include "cpu/common/isa.h"
#include "cpu/common/runtime.h"
#include "cpu/common/targets.h"
#include "cpu/common/validate.h"
#include "cpu/vnm/vnm_checks.h"
#include "cpu/vnm/vnm_kernels_api.h"

namespace ffi = xla::ffi;

namespace jaxsparse {
namespace cpu {
namespace {

const VnmKernelTable& Kernels() {
  return JAXSPARSE_TABLE_FOR_CURRENT_ISA_WITH_AMX(kVnmKernels);
}

// The fields every target shares; a = the first float operand.
VnmProblem Problem(const vnm_check::Operands& o, int64_t tokens, int64_t k,
                   int64_t n_out, int32_t v, int32_t n, int32_t m) {
  VnmProblem p{};
  p.dtype = KernelDtype(o.result.dtype());
  p.batch = o.result.batch;
  p.tokens = tokens;
  p.k = k;
  p.n_out = n_out;
  p.v = v;
  p.n = n;
  p.m = m;
  p.indices = static_cast<const uint8_t*>(o.indices.data());
  p.columns = static_cast<const uint8_t*>(o.columns.data());
  // The checks make values, indices and columns share one batch.
  p.weight_stride = o.indices.BatchStride();
  p.columns_stride = o.columns.BatchStride();
  p.out = o.result.mutable_data();
  return p;
}

ffi::Error SpmmImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                    ffi::AnyBuffer values, ffi::AnyBuffer indices,
                    ffi::AnyBuffer columns, int32_t v, int32_t n, int32_t m,
                    ffi::Result<ffi::AnyBuffer> y) {
  const Validator val("jaxsparse_vnm_spmm");
  vnm_check::Operands o;
  JAXSPARSE_RETURN_IF_ERROR(
      vnm_check::CheckSpmm(val, v, n, m, x, values, indices, columns, *y, &o));
  VnmProblem p = Problem(o, o.a.rows, o.a.cols, o.result.cols, v, n, m);
  p.x = o.a.data();
  p.x_stride = o.a.BatchStride();
  p.values = o.b.data();
  return RunKernel(val, Kernels().spmm, p, pool, *y);
}

// y = x @ W with the forward's tiles packed once (read by the bf16 tile
// forward and the f32 FMA engine; every other kernel reads the values).
ffi::Error SpmmTiledImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer values,
                         ffi::AnyBuffer indices, ffi::AnyBuffer columns, ffi::AnyBuffer tiles,
                         int32_t v, int32_t n, int32_t m, ffi::Result<ffi::AnyBuffer> y) {
  const Validator val("jaxsparse_vnm_spmm_tiled");
  vnm_check::Operands o;
  JAXSPARSE_RETURN_IF_ERROR(
      vnm_check::CheckSpmm(val, v, n, m, x, values, indices, columns, *y, &o));
  Operand3 t;
  JAXSPARSE_RETURN_IF_ERROR(vnm_check::CheckTiles(val, v, m, tiles, o, &t));
  VnmProblem p = Problem(o, o.a.rows, o.a.cols, o.result.cols, v, n, m);
  p.x = o.a.data();
  p.x_stride = o.a.BatchStride();
  p.values = o.b.data();
  p.tiles = t.data();
  p.tiles_stride = t.BatchStride();
  return RunKernel(val, Kernels().spmm, p, pool, *y);
}

ffi::Error SpmmTImpl(ffi::ThreadPool pool, ffi::AnyBuffer dy,
                     ffi::AnyBuffer values, ffi::AnyBuffer indices,
                     ffi::AnyBuffer columns, int32_t v, int32_t n, int32_t m,
                     ffi::Result<ffi::AnyBuffer> dx) {
  const Validator val("jaxsparse_vnm_spmm_t");
  vnm_check::Operands o;
  JAXSPARSE_RETURN_IF_ERROR(vnm_check::CheckSpmmT(val, v, n, m, dy, values,
                                                  indices, columns, *dx, &o));
  VnmProblem p = Problem(o, o.a.rows, o.result.cols, o.a.cols, v, n, m);
  p.dy = o.a.data();
  p.dy_stride = o.a.BatchStride();
  p.values = o.b.data();
  return RunKernel(val, Kernels().spmm_t, p, pool, *dx);
}

ffi::Error SddmmImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                     ffi::AnyBuffer indices, ffi::AnyBuffer columns, int32_t v,
                     int32_t n, int32_t m, ffi::Result<ffi::AnyBuffer> dv) {
  const Validator val("jaxsparse_vnm_sddmm");
  vnm_check::Operands o;
  JAXSPARSE_RETURN_IF_ERROR(
      vnm_check::CheckSddmm(val, v, n, m, x, dy, indices, columns, *dv, &o));
  VnmProblem p = Problem(o, o.a.rows, o.a.cols, o.b.cols, v, n, m);
  p.x = o.a.data();
  p.x_stride = o.a.BatchStride();
  p.dy = o.b.data();
  p.dy_stride = o.b.BatchStride();
  return RunKernel(val, Kernels().sddmm, p, pool, *dv);
}

}  // namespace
}  // namespace cpu
}  // namespace jaxsparse

// Every V:N:M target: two float operands, the uint8 indices and columns,
// attributes v, n and m, one result.
#define JAXSPARSE_VNM_BINDING \
  .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>() \
      .Attr<int32_t>("v").Attr<int32_t>("n").Attr<int32_t>("m").Ret<ffi::AnyBuffer>()

JAXSPARSE_CPU_TARGET(JaxsparseCpuVnmSpmm, "jaxsparse_vnm_spmm",
                     jaxsparse::cpu::SpmmImpl, JAXSPARSE_VNM_BINDING);
JAXSPARSE_CPU_TARGET(JaxsparseCpuVnmSpmmTiled, "jaxsparse_vnm_spmm_tiled",
                     jaxsparse::cpu::SpmmTiledImpl,
                     .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                         .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Attr<int32_t>("v")
                         .Attr<int32_t>("n").Attr<int32_t>("m").Ret<ffi::AnyBuffer>());
JAXSPARSE_CPU_TARGET(JaxsparseCpuVnmSpmmT, "jaxsparse_vnm_spmm_t",
                     jaxsparse::cpu::SpmmTImpl, JAXSPARSE_VNM_BINDING);
JAXSPARSE_CPU_TARGET(JaxsparseCpuVnmSddmm, "jaxsparse_vnm_sddmm",
                     jaxsparse::cpu::SddmmImpl, JAXSPARSE_VNM_BINDING);
