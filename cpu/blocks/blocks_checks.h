// The operand checks of the 1xN block targets, shared by the CPU handlers
// (blocks_ops.cc) and the CUDA handlers (cuda/blocks/, native and emulated),
// built on the common Validator. Layouts (docs/ffi_abi.md):
//
//   blocks_spmm    x [Bx, T, K], values [Bw, nnz, n], indices [Bw, nnz],
//                  indptr [Bw, R + 1]                         -> y  [B, T, N]
//   blocks_spmm_t  dy [By, T, N], values, indices, indptr     -> dx [B, T, K]
//   blocks_sddmm   x [Bx, T, K], dy [By, T, N], indices, indptr -> dv [B, nnz, n]
//
// BSR with blocks of one input by n consecutive outputs: R = ceil(N / n)
// block rows; block p of row r (indptr[r] <= p < indptr[r + 1]) holds
// values[p][0..n) for outputs r*n .. r*n+n-1 at input indices[p]. Float
// operands share one dtype; indices and indptr are int32 and, with the
// values, share one batch dimension. n is 4, 8, 16 or 32. The kernels treat
// the structure as untrusted (it may come from unvalidated data under jit):
// indptr is clamped into [0, nnz] and made non-decreasing, and blocks whose
// input is outside [0, K) contribute nothing.
#ifndef JAXSPARSE_CPU_BLOCKS_BLOCKS_CHECKS_H_
#define JAXSPARSE_CPU_BLOCKS_BLOCKS_CHECKS_H_

#include <cstdint>
#include <string>

#include "cpu/common/ffi.h"
#include "cpu/common/validate.h"

namespace jaxsparse {
namespace blocks_check {

inline bool IsBlockSize(int64_t n) { return n == 4 || n == 8 || n == 16 || n == 32; }
inline int64_t Rows(int64_t n_out, int64_t n) { return (n_out + n - 1) / n; }

// The arrays of one call: two operands (float, or the first float and the
// second absent for sddmm's x/dy pair: a = x or dy, b = values or dy), the
// structure, the result.
struct Operands {
  Operand3 a, b, indices, indptr, result;
};

// A rank-2 [B, cols] buffer as an Operand3 of one row per batch entry.
inline xla::ffi::Error Shape2(const Validator& val, const char* name,
                              const xla::ffi::AnyBuffer& buffer, Operand3* out) {
  const auto dims = buffer.dimensions();
  if (dims.size() != 2) {
    return val.Fail(std::string(name) + " must have rank 2 ([B, cols]), got shape " +
                    DimsStr(dims));
  }
  *out = Operand3{name, &buffer, dims[0], 1, dims[1]};
  return xla::ffi::Error::Success();
}

// indices [B, nnz] and indptr [B, ceil(N/n) + 1], int32, one batch.
inline xla::ffi::Error CheckStructure(const Validator& val, Operands* o,
                                      int64_t n_out, int64_t n) {
  JAXSPARSE_RETURN_IF_ERROR(val.Dtype(o->indices, xla::ffi::DataType::S32));
  JAXSPARSE_RETURN_IF_ERROR(val.Dtype(o->indptr, xla::ffi::DataType::S32));
  if (!IsBlockSize(n)) {
    return val.Fail("the block size n (values.shape[2] or the result's) must be 4, 8, 16 "
                    "or 32, got " + std::to_string(n));
  }
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("indptr.shape[1] (R + 1)", o->indptr.cols,
                                    "ceil(N/n) + 1", Rows(n_out, n) + 1));
  return val.Dim("indptr.shape[0]", o->indptr.batch, "indices.shape[0]",
                 o->indices.batch);
}

// The weight's values [B, nnz, n] beside its structure.
inline xla::ffi::Error CheckValues(const Validator& val, const Operands& o) {
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("values.shape[1] (nnz)", o.b.rows,
                                    "indices.shape[1]", o.indices.cols));
  return val.Dim("values.shape[0]", o.b.batch, "indices.shape[0]", o.indices.batch);
}

inline xla::ffi::Error Read(const Validator& val, const xla::ffi::AnyBuffer& a,
                            const char* a_name, const xla::ffi::AnyBuffer& b,
                            const char* b_name, const xla::ffi::AnyBuffer& indices,
                            const xla::ffi::AnyBuffer& indptr,
                            const xla::ffi::AnyBuffer& result, const char* result_name,
                            Operands* o) {
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3(a_name, a, &o->a));
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3(b_name, b, &o->b));
  JAXSPARSE_RETURN_IF_ERROR(Shape2(val, "indices", indices, &o->indices));
  JAXSPARSE_RETURN_IF_ERROR(Shape2(val, "indptr", indptr, &o->indptr));
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3(result_name, result, &o->result));
  JAXSPARSE_RETURN_IF_ERROR(val.SameFloatDtype({&o->a, &o->b, &o->result}));
  return val.Batch({&o->a, &o->b, &o->indices}, o->result);
}

// y = x @ W: x [B, T, K], values [B, nnz, n] -> y [B, T, N].
inline xla::ffi::Error CheckSpmm(const Validator& val, const xla::ffi::AnyBuffer& x,
                                 const xla::ffi::AnyBuffer& values,
                                 const xla::ffi::AnyBuffer& indices,
                                 const xla::ffi::AnyBuffer& indptr,
                                 const xla::ffi::AnyBuffer& y, Operands* o) {
  JAXSPARSE_RETURN_IF_ERROR(Read(val, x, "x", values, "values", indices, indptr, y, "y", o));
  JAXSPARSE_RETURN_IF_ERROR(CheckStructure(val, o, o->result.cols, o->b.cols));
  JAXSPARSE_RETURN_IF_ERROR(CheckValues(val, *o));
  return val.Dim("y.shape[1] (T)", o->result.rows, "x.shape[1]", o->a.rows);
}

// dx = dy @ W^T: dy [B, T, N], values [B, nnz, n] -> dx [B, T, K].
inline xla::ffi::Error CheckSpmmT(const Validator& val, const xla::ffi::AnyBuffer& dy,
                                  const xla::ffi::AnyBuffer& values,
                                  const xla::ffi::AnyBuffer& indices,
                                  const xla::ffi::AnyBuffer& indptr,
                                  const xla::ffi::AnyBuffer& dx, Operands* o) {
  JAXSPARSE_RETURN_IF_ERROR(
      Read(val, dy, "dy", values, "values", indices, indptr, dx, "dx", o));
  JAXSPARSE_RETURN_IF_ERROR(CheckStructure(val, o, o->a.cols, o->b.cols));
  JAXSPARSE_RETURN_IF_ERROR(CheckValues(val, *o));
  return val.Dim("dx.shape[1] (T)", o->result.rows, "dy.shape[1]", o->a.rows);
}

// dv = (x^T dy)[kept]: x [B, T, K], dy [B, T, N] -> dv [B, nnz, n].
inline xla::ffi::Error CheckSddmm(const Validator& val, const xla::ffi::AnyBuffer& x,
                                  const xla::ffi::AnyBuffer& dy,
                                  const xla::ffi::AnyBuffer& indices,
                                  const xla::ffi::AnyBuffer& indptr,
                                  const xla::ffi::AnyBuffer& dv, Operands* o) {
  JAXSPARSE_RETURN_IF_ERROR(Read(val, x, "x", dy, "dy", indices, indptr, dv, "dv", o));
  JAXSPARSE_RETURN_IF_ERROR(CheckStructure(val, o, o->b.cols, o->result.cols));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("dy.shape[1] (T)", o->b.rows, "x.shape[1]", o->a.rows));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("dv.shape[1] (nnz)", o->result.rows,
                                    "indices.shape[1]", o->indices.cols));
  return val.Batch({&o->a, &o->b, &o->indices}, o->result);
}

// ---------------------------------------------------------------- CUDA forms
// The CUDA targets (cuda/blocks/blocks_ops.cu) take the structure as
// jaxsparse/ops/blocks.py's CUDA lowering prepares it in the same program, so
// that every output element has its inputs without a search or a scatter:
//
//   blocks_spmm    as above, indptr already non-decreasing in [0, nnz]
//   blocks_spmm_t  dy [By, T, N], values [Bw, nnz, n], rows [Bw, nnz],
//                  order [Bw, nnz], kptr [Bw, K + 1]            -> dx [B, T, K]
//                  (rows: each block's row, or outside [0, R) for none;
//                  order: the blocks sorted by input, kptr[k] .. kptr[k+1]-1
//                  the positions in order of the blocks with input k)
//   blocks_sddmm   x [Bx, T, K], dy [By, T, N], indices, rows -> dv [B, nnz, n]
// Out-of-range entries still never read out of bounds (clamped or skipped).

// The arrays of a CUDA call with per-block rows: a, b as above; `structure`
// holds rows, order, kptr (spmm_t) or indices, rows (sddmm).
struct RowOperands {
  Operand3 a, b, result;
  Operand3 structure[3];
};

inline xla::ffi::Error Int32Rows(const Validator& val, const char* name,
                                 const xla::ffi::AnyBuffer& buffer, Operand3* out) {
  JAXSPARSE_RETURN_IF_ERROR(Shape2(val, name, buffer, out));
  return val.Dtype(*out, xla::ffi::DataType::S32);
}

// dx = dy @ W^T with the blocks ordered by input (CUDA).
inline xla::ffi::Error CheckSpmmTByInput(const Validator& val, const xla::ffi::AnyBuffer& dy,
                                         const xla::ffi::AnyBuffer& values,
                                         const xla::ffi::AnyBuffer& rows,
                                         const xla::ffi::AnyBuffer& order,
                                         const xla::ffi::AnyBuffer& kptr,
                                         const xla::ffi::AnyBuffer& dx, RowOperands* o) {
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("dy", dy, &o->a));
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("values", values, &o->b));
  JAXSPARSE_RETURN_IF_ERROR(Int32Rows(val, "rows", rows, &o->structure[0]));
  JAXSPARSE_RETURN_IF_ERROR(Int32Rows(val, "order", order, &o->structure[1]));
  JAXSPARSE_RETURN_IF_ERROR(Int32Rows(val, "kptr", kptr, &o->structure[2]));
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("dx", dx, &o->result));
  JAXSPARSE_RETURN_IF_ERROR(val.SameFloatDtype({&o->a, &o->b, &o->result}));
  JAXSPARSE_RETURN_IF_ERROR(val.Batch({&o->a, &o->b, &o->structure[0]}, o->result));
  if (!IsBlockSize(o->b.cols)) {
    return val.Fail("the block size n (values.shape[2]) must be 4, 8, 16 or 32, got " +
                    std::to_string(o->b.cols));
  }
  const Operand3 &r = o->structure[0], &ord = o->structure[1], &kp = o->structure[2];
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("rows.shape[1] (nnz)", r.cols, "values.shape[1]", o->b.rows));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("order.shape[1]", ord.cols, "values.shape[1]", o->b.rows));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("kptr.shape[1]", kp.cols, "K + 1", o->result.cols + 1));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("values.shape[0]", o->b.batch, "rows.shape[0]", r.batch));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("order.shape[0]", ord.batch, "rows.shape[0]", r.batch));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("kptr.shape[0]", kp.batch, "rows.shape[0]", r.batch));
  return val.Dim("dx.shape[1] (T)", o->result.rows, "dy.shape[1]", o->a.rows);
}

// dv = (x^T dy)[kept] with each block's row given (CUDA).
inline xla::ffi::Error CheckSddmmByRow(const Validator& val, const xla::ffi::AnyBuffer& x,
                                       const xla::ffi::AnyBuffer& dy,
                                       const xla::ffi::AnyBuffer& indices,
                                       const xla::ffi::AnyBuffer& rows,
                                       const xla::ffi::AnyBuffer& dv, RowOperands* o) {
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("x", x, &o->a));
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("dy", dy, &o->b));
  JAXSPARSE_RETURN_IF_ERROR(Int32Rows(val, "indices", indices, &o->structure[0]));
  JAXSPARSE_RETURN_IF_ERROR(Int32Rows(val, "rows", rows, &o->structure[1]));
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("dv", dv, &o->result));
  JAXSPARSE_RETURN_IF_ERROR(val.SameFloatDtype({&o->a, &o->b, &o->result}));
  JAXSPARSE_RETURN_IF_ERROR(val.Batch({&o->a, &o->b, &o->structure[0]}, o->result));
  if (!IsBlockSize(o->result.cols)) {
    return val.Fail("the block size n (dv.shape[2]) must be 4, 8, 16 or 32, got " +
                    std::to_string(o->result.cols));
  }
  const Operand3 &ind = o->structure[0], &r = o->structure[1];
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("rows.shape", r.cols, "indices.shape[1]", ind.cols));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("rows.shape[0]", r.batch, "indices.shape[0]", ind.batch));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("dy.shape[1] (T)", o->b.rows, "x.shape[1]", o->a.rows));
  return val.Dim("dv.shape[1] (nnz)", o->result.rows, "indices.shape[1]", ind.cols);
}

// ---------------------------------------------------------------- convolution
// blocks_conv  x [N, H, W, C], values [1, nnz, n], indices [1, nnz],
//              indptr [1, R + 1]                              -> y [N, OH, OW, out]
// with attributes kernel_h, kernel_w, stride_h, stride_w, dilation_h,
// dilation_w (>= 1), pad_top, pad_left (>= 0): y = the im2col patches of x
// (features in the kernel's (i, j, c) order) @ W, W [kernel_h kernel_w C, out].
struct ConvAttrs {
  int32_t kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left;
};

inline xla::ffi::Error Rank4(const Validator& val, const char* name,
                             const xla::ffi::AnyBuffer& buffer, int64_t dims4[4]) {
  const auto dims = buffer.dimensions();
  if (dims.size() != 4) {
    return val.Fail(std::string(name) + " must have rank 4 ([N, H, W, C]), got shape " +
                    DimsStr(dims));
  }
  for (int i = 0; i < 4; ++i) dims4[i] = dims[i];
  return xla::ffi::Error::Success();
}

inline xla::ffi::Error CheckConvAttrs(const Validator& val, const ConvAttrs& a) {
  constexpr int64_t kMax = 1 << 20;
  JAXSPARSE_RETURN_IF_ERROR(val.Attr("kernel_h", a.kernel_h, 1, kMax));
  JAXSPARSE_RETURN_IF_ERROR(val.Attr("kernel_w", a.kernel_w, 1, kMax));
  JAXSPARSE_RETURN_IF_ERROR(val.Attr("stride_h", a.stride_h, 1, kMax));
  JAXSPARSE_RETURN_IF_ERROR(val.Attr("stride_w", a.stride_w, 1, kMax));
  JAXSPARSE_RETURN_IF_ERROR(val.Attr("dilation_h", a.dilation_h, 1, kMax));
  JAXSPARSE_RETURN_IF_ERROR(val.Attr("dilation_w", a.dilation_w, 1, kMax));
  JAXSPARSE_RETURN_IF_ERROR(val.Attr("pad_top", a.pad_top, 0, kMax));
  return val.Attr("pad_left", a.pad_left, 0, kMax);
}

inline xla::ffi::Error CheckConv(const Validator& val, const ConvAttrs& a,
                                 const xla::ffi::AnyBuffer& x,
                                 const xla::ffi::AnyBuffer& values,
                                 const xla::ffi::AnyBuffer& indices,
                                 const xla::ffi::AnyBuffer& indptr,
                                 const xla::ffi::AnyBuffer& y, Operands* o, int64_t x_dims[4],
                                 int64_t y_dims[4]) {
  JAXSPARSE_RETURN_IF_ERROR(CheckConvAttrs(val, a));
  JAXSPARSE_RETURN_IF_ERROR(Rank4(val, "x", x, x_dims));
  JAXSPARSE_RETURN_IF_ERROR(Rank4(val, "y", y, y_dims));
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("values", values, &o->b));
  JAXSPARSE_RETURN_IF_ERROR(Shape2(val, "indices", indices, &o->indices));
  JAXSPARSE_RETURN_IF_ERROR(Shape2(val, "indptr", indptr, &o->indptr));
  // x and y as [1, pixels, channels] operands, for the dtype checks.
  o->a = Operand3{"x", &x, 1, x_dims[0] * x_dims[1] * x_dims[2], x_dims[3]};
  o->result = Operand3{"y", &y, 1, y_dims[0] * y_dims[1] * y_dims[2], y_dims[3]};
  JAXSPARSE_RETURN_IF_ERROR(val.SameFloatDtype({&o->a, &o->b, &o->result}));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("values.shape[0]", o->b.batch, "one weight", 1));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("indices.shape[0]", o->indices.batch, "one weight", 1));
  JAXSPARSE_RETURN_IF_ERROR(CheckStructure(val, o, y_dims[3], o->b.cols));
  JAXSPARSE_RETURN_IF_ERROR(CheckValues(val, *o));
  return val.Dim("y.shape[0] (N)", y_dims[0], "x.shape[0]", x_dims[0]);
}

// blocks_conv_sddmm  x [N, H, W, C], dy [N, OH, OW, out], indices [1, nnz],
//                    indptr [1, R + 1]                        -> dv [1, nnz, n]
// with blocks_conv's attributes: dv = (patches(x)^T dy) sampled at the blocks.
inline xla::ffi::Error CheckConvSddmm(const Validator& val, const ConvAttrs& a,
                                      const xla::ffi::AnyBuffer& x,
                                      const xla::ffi::AnyBuffer& dy,
                                      const xla::ffi::AnyBuffer& indices,
                                      const xla::ffi::AnyBuffer& indptr,
                                      const xla::ffi::AnyBuffer& dv, Operands* o,
                                      int64_t x_dims[4], int64_t dy_dims[4]) {
  JAXSPARSE_RETURN_IF_ERROR(CheckConvAttrs(val, a));
  JAXSPARSE_RETURN_IF_ERROR(Rank4(val, "x", x, x_dims));
  JAXSPARSE_RETURN_IF_ERROR(Rank4(val, "dy", dy, dy_dims));
  JAXSPARSE_RETURN_IF_ERROR(Shape2(val, "indices", indices, &o->indices));
  JAXSPARSE_RETURN_IF_ERROR(Shape2(val, "indptr", indptr, &o->indptr));
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("dv", dv, &o->result));
  o->a = Operand3{"x", &x, 1, x_dims[0] * x_dims[1] * x_dims[2], x_dims[3]};
  o->b = Operand3{"dy", &dy, 1, dy_dims[0] * dy_dims[1] * dy_dims[2], dy_dims[3]};
  JAXSPARSE_RETURN_IF_ERROR(val.SameFloatDtype({&o->a, &o->b, &o->result}));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("indices.shape[0]", o->indices.batch, "one weight", 1));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("dv.shape[0]", o->result.batch, "one weight", 1));
  JAXSPARSE_RETURN_IF_ERROR(CheckStructure(val, o, dy_dims[3], o->result.cols));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("dv.shape[1] (nnz)", o->result.rows, "indices.shape[1]",
                                    o->indices.cols));
  return val.Dim("dy.shape[0] (N)", dy_dims[0], "x.shape[0]", x_dims[0]);
}

}  // namespace blocks_check
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_BLOCKS_BLOCKS_CHECKS_H_
