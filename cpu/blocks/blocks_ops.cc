// The CPU handlers of the 1xN block targets (layouts in
// cpu/blocks/blocks_checks.h): checks through the shared validator, then one
// call of the current ISA's kernel (blocks_kernels.h) on XLA's thread pool.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu/blocks/blocks_checks.h"
#include "cpu/blocks/blocks_kernels_api.h"
#include "cpu/common/ffi.h"
#include "cpu/common/isa.h"
#include "cpu/common/runtime.h"
#include "cpu/common/targets.h"
#include "cpu/common/validate.h"

namespace ffi = xla::ffi;

namespace jaxsparse {
namespace cpu {
namespace {

const BlocksKernelTable& Kernels() {
  return JAXSPARSE_TABLE_FOR_CURRENT_ISA_WITH_AMX(kBlocksKernels);
}

// JAXSPARSE_BLOCKS_TILES=1 puts the bf16 forward on the tile product where
// the ISA would run another kernel (blocks_tiles.h): read per call, so a test
// can set it around one call.
bool TileProductAsked() {
  const char* asked = std::getenv("JAXSPARSE_BLOCKS_TILES");
  return asked != nullptr && std::strcmp(asked, "1") == 0;
}

// The fields every target shares, from the checked operands.
BlocksProblem Problem(const blocks_check::Operands& o, int64_t tokens, int64_t k,
                      int64_t n_out, int64_t n) {
  BlocksProblem p{};
  p.dtype = KernelDtype(o.result.dtype());
  p.batch = o.result.batch;
  p.tokens = tokens;
  p.k = k;
  p.n_out = n_out;
  p.n = static_cast<int32_t>(n);
  p.nnz = o.indices.cols;
  p.rows = o.indptr.cols - 1;
  p.indices = static_cast<const int32_t*>(o.indices.data());
  p.indptr = static_cast<const int32_t*>(o.indptr.data());
  p.indices_stride = o.indices.BatchStride();
  p.indptr_stride = o.indptr.BatchStride();
  p.out = o.result.mutable_data();
  p.tile_product = TileProductAsked();
  return p;
}

ffi::Error SpmmImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer values,
                    ffi::AnyBuffer indices, ffi::AnyBuffer indptr,
                    ffi::Result<ffi::AnyBuffer> y) {
  const Validator val("jaxsparse_blocks_spmm");
  blocks_check::Operands o;
  JAXSPARSE_RETURN_IF_ERROR(blocks_check::CheckSpmm(val, x, values, indices, indptr, *y, &o));
  BlocksProblem p = Problem(o, o.a.rows, o.a.cols, o.result.cols, o.b.cols);
  p.x = o.a.data();
  p.x_stride = o.a.BatchStride();
  p.values = o.b.data();
  p.values_stride = o.b.BatchStride();
  return RunKernel(val, Kernels().spmm, p, pool, *y);
}

ffi::Error SpmmTImpl(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer values,
                     ffi::AnyBuffer indices, ffi::AnyBuffer indptr,
                     ffi::Result<ffi::AnyBuffer> dx) {
  const Validator val("jaxsparse_blocks_spmm_t");
  blocks_check::Operands o;
  JAXSPARSE_RETURN_IF_ERROR(
      blocks_check::CheckSpmmT(val, dy, values, indices, indptr, *dx, &o));
  BlocksProblem p = Problem(o, o.a.rows, o.result.cols, o.a.cols, o.b.cols);
  p.dy = o.a.data();
  p.dy_stride = o.a.BatchStride();
  p.values = o.b.data();
  p.values_stride = o.b.BatchStride();
  return RunKernel(val, Kernels().spmm_t, p, pool, *dx);
}

ffi::Error SddmmImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                     ffi::AnyBuffer indices, ffi::AnyBuffer indptr,
                     ffi::Result<ffi::AnyBuffer> dv) {
  const Validator val("jaxsparse_blocks_sddmm");
  blocks_check::Operands o;
  JAXSPARSE_RETURN_IF_ERROR(blocks_check::CheckSddmm(val, x, dy, indices, indptr, *dv, &o));
  BlocksProblem p = Problem(o, o.a.rows, o.a.cols, o.b.cols, o.result.cols);
  p.x = o.a.data();
  p.x_stride = o.a.BatchStride();
  p.dy = o.b.data();
  p.dy_stride = o.b.BatchStride();
  return RunKernel(val, Kernels().sddmm, p, pool, *dv);
}

// The kernels' view of a convolution: the images' and output pixels' dims
// ([N, H, W, C] and [N, OH, OW, out]) and the checked attributes.
BlocksConv Geometry(const blocks_check::ConvAttrs& a, const int64_t x_dims[4],
                    const int64_t out_dims[4]) {
  return BlocksConv{x_dims[1],  x_dims[2],    x_dims[3],    out_dims[1],  out_dims[2],
                    a.kernel_w, a.stride_h,   a.stride_w,   a.dilation_h, a.dilation_w,
                    a.pad_top,  a.pad_left};
}

ffi::Error ConvImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer values,
                    ffi::AnyBuffer indices, ffi::AnyBuffer indptr,
                    ffi::Result<ffi::AnyBuffer> y, int32_t kernel_h, int32_t kernel_w,
                    int32_t stride_h, int32_t stride_w, int32_t dilation_h, int32_t dilation_w,
                    int32_t pad_top, int32_t pad_left) {
  const Validator val("jaxsparse_blocks_conv");
  const blocks_check::ConvAttrs attrs{kernel_h,   kernel_w,   stride_h, stride_w,
                                      dilation_h, dilation_w, pad_top,  pad_left};
  blocks_check::Operands o;
  int64_t xd[4], yd[4];
  JAXSPARSE_RETURN_IF_ERROR(
      blocks_check::CheckConv(val, attrs, x, values, indices, indptr, *y, &o, xd, yd));
  const BlocksConv conv = Geometry(attrs, xd, yd);
  BlocksProblem p = Problem(o, yd[0] * yd[1] * yd[2], int64_t{kernel_h} * kernel_w * xd[3],
                            yd[3], o.b.cols);
  p.x = o.a.data();
  p.values = o.b.data();
  p.conv = &conv;
  return RunKernel(val, Kernels().spmm, p, pool, *y);
}

ffi::Error ConvSddmmImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                         ffi::AnyBuffer indices, ffi::AnyBuffer indptr,
                         ffi::Result<ffi::AnyBuffer> dv, int32_t kernel_h, int32_t kernel_w,
                         int32_t stride_h, int32_t stride_w, int32_t dilation_h,
                         int32_t dilation_w, int32_t pad_top, int32_t pad_left) {
  const Validator val("jaxsparse_blocks_conv_sddmm");
  const blocks_check::ConvAttrs attrs{kernel_h,   kernel_w,   stride_h, stride_w,
                                      dilation_h, dilation_w, pad_top,  pad_left};
  blocks_check::Operands o;
  int64_t xd[4], dyd[4];
  JAXSPARSE_RETURN_IF_ERROR(
      blocks_check::CheckConvSddmm(val, attrs, x, dy, indices, indptr, *dv, &o, xd, dyd));
  const BlocksConv conv = Geometry(attrs, xd, dyd);
  BlocksProblem p = Problem(o, dyd[0] * dyd[1] * dyd[2], int64_t{kernel_h} * kernel_w * xd[3],
                            dyd[3], o.result.cols);
  p.x = o.a.data();
  p.dy = o.b.data();
  p.conv = &conv;
  return RunKernel(val, Kernels().sddmm, p, pool, *dv);
}

}  // namespace
}  // namespace cpu
}  // namespace jaxsparse

// Every 1xN target: two float operands, the int32 indices and indptr, one
// result; no attributes (n, N and K come from the shapes).
#define JAXSPARSE_BLOCKS_BINDING \
  .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>() \
      .Ret<ffi::AnyBuffer>()

JAXSPARSE_CPU_TARGET(JaxsparseCpuBlocksSpmm, "jaxsparse_blocks_spmm",
                     jaxsparse::cpu::SpmmImpl, JAXSPARSE_BLOCKS_BINDING);
JAXSPARSE_CPU_TARGET(JaxsparseCpuBlocksSpmmT, "jaxsparse_blocks_spmm_t",
                     jaxsparse::cpu::SpmmTImpl, JAXSPARSE_BLOCKS_BINDING);
JAXSPARSE_CPU_TARGET(JaxsparseCpuBlocksSddmm, "jaxsparse_blocks_sddmm",
                     jaxsparse::cpu::SddmmImpl, JAXSPARSE_BLOCKS_BINDING);

// The convolution targets: blocks_conv's geometry as attributes.
#define JAXSPARSE_BLOCKS_CONV_BINDING \
  JAXSPARSE_BLOCKS_BINDING.Attr<int32_t>("kernel_h") \
      .Attr<int32_t>("kernel_w") \
      .Attr<int32_t>("stride_h") \
      .Attr<int32_t>("stride_w") \
      .Attr<int32_t>("dilation_h") \
      .Attr<int32_t>("dilation_w") \
      .Attr<int32_t>("pad_top") \
      .Attr<int32_t>("pad_left")

JAXSPARSE_CPU_TARGET(JaxsparseCpuBlocksConv, "jaxsparse_blocks_conv", jaxsparse::cpu::ConvImpl,
                     JAXSPARSE_BLOCKS_CONV_BINDING);
JAXSPARSE_CPU_TARGET(JaxsparseCpuBlocksConvSddmm, "jaxsparse_blocks_conv_sddmm",
                     jaxsparse::cpu::ConvSddmmImpl, JAXSPARSE_BLOCKS_CONV_BINDING);
