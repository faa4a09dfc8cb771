// The CPU handlers of the N:M targets (docs/ffi_abi.md): checks through the
// shared validator (nm_checks.h), then one call of the current ISA's kernel
// on XLA's thread pool.
#include <cstdint>

#include "cpu/common/ffi.h"
#include "cpu/common/isa.h"
#include "cpu/common/runtime.h"
#include "cpu/common/targets.h"
#include "cpu/common/validate.h"
#include "cpu/nm/nm_checks.h"
#include "cpu/nm/nm_kernels_api.h"

namespace ffi = xla::ffi;

namespace jaxsparse {
namespace cpu {
namespace {

const NmKernelTable& Kernels() {
  return JAXSPARSE_TABLE_FOR_CURRENT_ISA_WITH_AMX(kNmKernels);
}

// The CPU kernels read values and indices with one batch stride.
ffi::Error SameWeightBatch(const Validator& v, const nm_check::Operands& o) {
  return v.Dim("indices.shape[0]", o.indices.batch, "values.shape[0]",
               o.b.batch);
}

NmProblem Problem(const nm_check::Operands& o, int64_t tokens, int64_t k,
                  int64_t n_out, int32_t n, int32_t m) {
  NmProblem p{};
  p.dtype = KernelDtype(o.result.dtype());
  p.batch = o.result.batch;
  p.tokens = tokens;
  p.k = k;
  p.n_out = n_out;
  p.n = n;
  p.m = m;
  p.indices = static_cast<const uint8_t*>(o.indices.data());
  p.indices_stride = o.indices.BatchStride();
  p.out = o.result.mutable_data();
  return p;
}

ffi::Error SpmmImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                    ffi::AnyBuffer values, ffi::AnyBuffer indices, int32_t n,
                    int32_t m, ffi::Result<ffi::AnyBuffer> y) {
  const Validator v("jaxsparse_nm_spmm");
  nm_check::Operands o;
  JAXSPARSE_RETURN_IF_ERROR(nm_check::CheckSpmm(v, n, m, x, values, indices, *y, &o));
  JAXSPARSE_RETURN_IF_ERROR(SameWeightBatch(v, o));
  NmProblem p = Problem(o, o.a.rows, o.a.cols, o.result.cols, n, m);
  p.x = o.a.data();
  p.x_stride = o.a.BatchStride();
  p.values = o.b.data();
  p.values_stride = o.b.BatchStride();
  return RunKernel(v, Kernels().spmm, p, pool, *y);
}

// nm_spmm with the positions also at 2 bits: the few-token forward streams
// those (a quarter of the bytes of `indices`); every other case reads indices.
ffi::Error SpmmPackedImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                          ffi::AnyBuffer values, ffi::AnyBuffer indices,
                          ffi::AnyBuffer indices_2bit, int32_t n, int32_t m,
                          ffi::Result<ffi::AnyBuffer> y) {
  const Validator v("jaxsparse_nm_spmm_packed");
  nm_check::Operands o;
  JAXSPARSE_RETURN_IF_ERROR(nm_check::CheckSpmm(v, n, m, x, values, indices, *y, &o));
  JAXSPARSE_RETURN_IF_ERROR(SameWeightBatch(v, o));
  Operand3 packed;
  JAXSPARSE_RETURN_IF_ERROR(nm_check::CheckIndices2bit(v, m, indices_2bit, o, &packed));
  NmProblem p = Problem(o, o.a.rows, o.a.cols, o.result.cols, n, m);
  p.x = o.a.data();
  p.x_stride = o.a.BatchStride();
  p.values = o.b.data();
  p.values_stride = o.b.BatchStride();
  p.indices_2bit = static_cast<const uint8_t*>(packed.data());
  p.indices_2bit_stride = packed.BatchStride();
  return RunKernel(v, Kernels().spmm, p, pool, *y);
}

ffi::Error SpmmTImpl(ffi::ThreadPool pool, ffi::AnyBuffer dy,
                     ffi::AnyBuffer values, ffi::AnyBuffer indices, int32_t n,
                     int32_t m, ffi::Result<ffi::AnyBuffer> dx) {
  const Validator v("jaxsparse_nm_spmm_t");
  nm_check::Operands o;
  JAXSPARSE_RETURN_IF_ERROR(
      nm_check::CheckSpmmT(v, n, m, dy, values, indices, *dx, &o));
  JAXSPARSE_RETURN_IF_ERROR(SameWeightBatch(v, o));
  NmProblem p = Problem(o, o.a.rows, o.result.cols, o.a.cols, n, m);
  p.dy = o.a.data();
  p.dy_stride = o.a.BatchStride();
  p.values = o.b.data();
  p.values_stride = o.b.BatchStride();
  return RunKernel(v, Kernels().spmm_t, p, pool, *dx);
}

ffi::Error SddmmImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                     ffi::AnyBuffer indices, int32_t n, int32_t m,
                     ffi::Result<ffi::AnyBuffer> dv) {
  const Validator v("jaxsparse_nm_sddmm");
  nm_check::Operands o;
  JAXSPARSE_RETURN_IF_ERROR(nm_check::CheckSddmm(v, n, m, x, dy, indices, *dv, &o));
  NmProblem p = Problem(o, o.a.rows, o.a.cols, o.b.cols, n, m);
  p.x = o.a.data();
  p.x_stride = o.a.BatchStride();
  p.dy = o.b.data();
  p.dy_stride = o.b.BatchStride();
  return RunKernel(v, Kernels().sddmm, p, pool, *dv);
}

}  // namespace
}  // namespace cpu
}  // namespace jaxsparse

// Every N:M target: two float operands, the uint8 positions, attributes n and
// m, one result.
#define JAXSPARSE_NM_BINDING                                        \
  .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>() \
      .Attr<int32_t>("n").Attr<int32_t>("m").Ret<ffi::AnyBuffer>()

JAXSPARSE_CPU_TARGET(JaxsparseCpuNmSpmm, "jaxsparse_nm_spmm",
                     jaxsparse::cpu::SpmmImpl, JAXSPARSE_NM_BINDING);
JAXSPARSE_CPU_TARGET(JaxsparseCpuNmSpmmPacked, "jaxsparse_nm_spmm_packed",
                     jaxsparse::cpu::SpmmPackedImpl,
                     .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                         .Arg<ffi::AnyBuffer>().Attr<int32_t>("n").Attr<int32_t>("m")
                         .Ret<ffi::AnyBuffer>());
JAXSPARSE_CPU_TARGET(JaxsparseCpuNmSpmmT, "jaxsparse_nm_spmm_t",
                     jaxsparse::cpu::SpmmTImpl, JAXSPARSE_NM_BINDING);
JAXSPARSE_CPU_TARGET(JaxsparseCpuNmSddmm, "jaxsparse_nm_sddmm",
                     jaxsparse::cpu::SddmmImpl, JAXSPARSE_NM_BINDING);
