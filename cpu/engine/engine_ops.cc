// The CPU handlers of the engine's own targets: products of the engine's tile
// units exposed directly, for the formats built on them to come.
//   jaxsparse_engine_int8_matmul  a [Ba, T, K] int8, b [Bb, K, N] int8
//                                 -> [B, T, N] int32, B = max(Ba, Bb)
#include <cstdint>

#include "cpu/common/ffi.h"
#include "cpu/common/isa.h"
#include "cpu/common/runtime.h"
#include "cpu/common/targets.h"
#include "cpu/common/validate.h"
#include "cpu/engine/engine_kernels_api.h"

namespace ffi = xla::ffi;

namespace jaxsparse {
namespace cpu {
namespace {

// avx2 and avx512 run the portable (scalar) kernels; avx512bf16 the VNNI
// ones, amx the tile ones (or their emulated build), where the build has them.
const EngineKernelTable& Kernels() {
#ifdef JAXSPARSE_AMX_KERNELS
  return TableForCurrentIsa<EngineKernelTable>(kEngineKernelsPortable, nullptr, nullptr,
                                               &kEngineKernelsAvx512Bf16, &kEngineKernelsAmx,
                                               JAXSPARSE_AMX_EMULATED_TABLE(kEngineKernels));
#else
  return TableForCurrentIsa<EngineKernelTable>(kEngineKernelsPortable, nullptr, nullptr);
#endif
}

ffi::Error CheckInt8Matmul(const Validator& val, const ffi::AnyBuffer& a_buf,
                           const ffi::AnyBuffer& b_buf, const ffi::AnyBuffer& out_buf,
                           Operand3* a, Operand3* b, Operand3* out) {
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("a", a_buf, a));
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("b", b_buf, b));
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("out", out_buf, out));
  JAXSPARSE_RETURN_IF_ERROR(val.Dtype(*a, ffi::DataType::S8));
  JAXSPARSE_RETURN_IF_ERROR(val.Dtype(*b, ffi::DataType::S8));
  JAXSPARSE_RETURN_IF_ERROR(val.Dtype(*out, ffi::DataType::S32));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("b.shape[1] (K)", b->rows, "a.shape[2]", a->cols));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("out.shape[1] (T)", out->rows, "a.shape[1]", a->rows));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("out.shape[2] (N)", out->cols, "b.shape[2]", b->cols));
  return val.Batch({a, b}, *out);
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer a_buf, ffi::AnyBuffer b_buf,
                          ffi::Result<ffi::AnyBuffer> out_buf) {
  const Validator val("jaxsparse_engine_int8_matmul");
  Operand3 a, b, out;
  JAXSPARSE_RETURN_IF_ERROR(CheckInt8Matmul(val, a_buf, b_buf, *out_buf, &a, &b, &out));
  Int8MatmulProblem p{};
  p.batch = out.batch;
  p.tokens = a.rows;
  p.k = a.cols;
  p.n_out = b.cols;
  p.a = static_cast<const int8_t*>(a.data());
  p.a_stride = a.BatchStride();
  p.b = static_cast<const int8_t*>(b.data());
  p.b_stride = b.BatchStride();
  p.out = static_cast<int32_t*>(out.mutable_data());
  return RunKernel(val, Kernels().int8_matmul, p, pool, *out_buf);
}

}  // namespace
}  // namespace cpu
}  // namespace jaxsparse

JAXSPARSE_CPU_TARGET(JaxsparseCpuEngineInt8Matmul, "jaxsparse_engine_int8_matmul",
                     jaxsparse::cpu::Int8MatmulImpl,
                     .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
