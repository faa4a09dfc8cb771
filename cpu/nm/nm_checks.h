// The operand checks of the N:M targets, shared by the CPU handlers
// (nm_ops.cc) and the CUDA handlers (cuda/nm/nm_ops.cu, native and emulated),
// built on the common Validator. Layouts are in docs/ffi_abi.md:
//
//   nm_spmm    x [Bx, T, K], values [Bw, N, Kc], indices [Bw, N, Kc] -> y  [B, T, N]
//   nm_spmm_t  dy [By, T, N], values, indices                        -> dx [B, T, K]
//   nm_sddmm   x [Bx, T, K], dy [By, T, N], indices                  -> dv [B, N, Kc]
//   nm_spmm_packed  nm_spmm's operands + indices_2bit [Bw, N, ceil(Kc/4)] -> y
//
// with Kc = ceil(K / m) * n, float operands of one dtype and uint8 indices.
#ifndef JAXSPARSE_CPU_NM_NM_CHECKS_H_
#define JAXSPARSE_CPU_NM_NM_CHECKS_H_

#include <cstdint>
#include <string>

#include "cpu/common/ffi.h"
#include "cpu/common/validate.h"

namespace jaxsparse {
namespace nm_check {

constexpr int32_t kMaxM = 16;

// The four arrays of one call: two float operands, the positions, the result.
struct Operands {
  Operand3 a, b, indices, result;
};

inline int64_t KeptPerRow(int64_t k, int32_t n, int32_t m) {
  return (k + m - 1) / m * n;
}

// Kc == ceil(K / m) * n.
inline xla::ffi::Error CheckKept(const Validator& v, const Operand3& array,
                                 int64_t k, int32_t n, int32_t m) {
  const int64_t kept = KeptPerRow(k, n, m);
  if (array.cols == kept) return xla::ffi::Error::Success();
  return v.Fail(std::string(array.name) +
                ".shape[2] (Kc) must be ceil(K/m)*n = ceil(" +
                std::to_string(k) + "/" + std::to_string(m) + ")*" +
                std::to_string(n) + " = " + std::to_string(kept) + ", got " +
                std::to_string(array.cols));
}

// The checks every N:M target shares: the pattern, ranks, one float dtype for
// a, b and the result, uint8 indices, and broadcastable batches.
inline xla::ffi::Error CheckCommon(const Validator& v, int32_t n, int32_t m,
                                   Operands& o) {
  JAXSPARSE_RETURN_IF_ERROR(v.Attr("m", m, 2, kMaxM));
  JAXSPARSE_RETURN_IF_ERROR(v.Attr("n", n, 1, m - 1));
  JAXSPARSE_RETURN_IF_ERROR(v.SameFloatDtype({&o.a, &o.b, &o.result}));
  JAXSPARSE_RETURN_IF_ERROR(v.Dtype(o.indices, xla::ffi::DataType::U8));
  return v.Batch({&o.a, &o.b, &o.indices}, o.result);
}

inline xla::ffi::Error ReadShapes(const Validator& v, const char* a_name,
                                  const xla::ffi::AnyBuffer& a,
                                  const char* b_name,
                                  const xla::ffi::AnyBuffer& b,
                                  const xla::ffi::AnyBuffer& indices,
                                  const char* result_name,
                                  const xla::ffi::AnyBuffer& result,
                                  Operands* o) {
  JAXSPARSE_RETURN_IF_ERROR(v.Shape3(a_name, a, &o->a));
  JAXSPARSE_RETURN_IF_ERROR(v.Shape3(b_name, b, &o->b));
  JAXSPARSE_RETURN_IF_ERROR(v.Shape3("indices", indices, &o->indices));
  return v.Shape3(result_name, result, &o->result);
}

// y = x @ W: a = x, b = values.
inline xla::ffi::Error CheckSpmm(const Validator& v, int32_t n, int32_t m,
                                 const xla::ffi::AnyBuffer& x,
                                 const xla::ffi::AnyBuffer& values,
                                 const xla::ffi::AnyBuffer& indices,
                                 const xla::ffi::AnyBuffer& y, Operands* o) {
  JAXSPARSE_RETURN_IF_ERROR(
      ReadShapes(v, "x", x, "values", values, indices, "y", y, o));
  JAXSPARSE_RETURN_IF_ERROR(CheckCommon(v, n, m, *o));
  JAXSPARSE_RETURN_IF_ERROR(
      v.Dim("y.shape[1] (T)", o->result.rows, "x.shape[1]", o->a.rows));
  JAXSPARSE_RETURN_IF_ERROR(v.Dim("values.shape[1] (N)", o->b.rows,
                                  "y.shape[2]", o->result.cols));
  JAXSPARSE_RETURN_IF_ERROR(v.Dim("indices.shape[1] (N)", o->indices.rows,
                                  "y.shape[2]", o->result.cols));
  JAXSPARSE_RETURN_IF_ERROR(CheckKept(v, o->b, o->a.cols, n, m));
  return CheckKept(v, o->indices, o->a.cols, n, m);
}

// The 2-bit positions beside a 2:4 or 1:4 weight (nm_spmm_packed): uint8
// [Bw, N, ceil(Kc/4)], the batch of values, m = 4.
inline xla::ffi::Error CheckIndices2bit(const Validator& v, int32_t m,
                                        const xla::ffi::AnyBuffer& packed,
                                        const Operands& o, Operand3* out) {
  JAXSPARSE_RETURN_IF_ERROR(v.Shape3("indices_2bit", packed, out));
  if (m != 4) {
    return v.Fail("indices_2bit is held for m = 4 only; got m = " +
                  std::to_string(m));
  }
  JAXSPARSE_RETURN_IF_ERROR(v.Dtype(*out, xla::ffi::DataType::U8));
  JAXSPARSE_RETURN_IF_ERROR(v.Dim("indices_2bit.shape[0]", out->batch,
                                  "values.shape[0]", o.b.batch));
  JAXSPARSE_RETURN_IF_ERROR(v.Dim("indices_2bit.shape[1] (N)", out->rows,
                                  "values.shape[1]", o.b.rows));
  return v.Dim("indices_2bit.shape[2]", out->cols, "ceil(Kc/4)",
               (o.b.cols + 3) / 4);
}

// dx = dy @ W^T: a = dy, b = values; K comes from dx.
inline xla::ffi::Error CheckSpmmT(const Validator& v, int32_t n, int32_t m,
                                  const xla::ffi::AnyBuffer& dy,
                                  const xla::ffi::AnyBuffer& values,
                                  const xla::ffi::AnyBuffer& indices,
                                  const xla::ffi::AnyBuffer& dx, Operands* o) {
  JAXSPARSE_RETURN_IF_ERROR(
      ReadShapes(v, "dy", dy, "values", values, indices, "dx", dx, o));
  JAXSPARSE_RETURN_IF_ERROR(CheckCommon(v, n, m, *o));
  JAXSPARSE_RETURN_IF_ERROR(
      v.Dim("dx.shape[1] (T)", o->result.rows, "dy.shape[1]", o->a.rows));
  JAXSPARSE_RETURN_IF_ERROR(
      v.Dim("values.shape[1] (N)", o->b.rows, "dy.shape[2]", o->a.cols));
  JAXSPARSE_RETURN_IF_ERROR(
      v.Dim("indices.shape[1] (N)", o->indices.rows, "dy.shape[2]", o->a.cols));
  JAXSPARSE_RETURN_IF_ERROR(CheckKept(v, o->b, o->result.cols, n, m));
  return CheckKept(v, o->indices, o->result.cols, n, m);
}

// dv = (x^T dy)[kept]: a = x, b = dy.
inline xla::ffi::Error CheckSddmm(const Validator& v, int32_t n, int32_t m,
                                  const xla::ffi::AnyBuffer& x,
                                  const xla::ffi::AnyBuffer& dy,
                                  const xla::ffi::AnyBuffer& indices,
                                  const xla::ffi::AnyBuffer& dv, Operands* o) {
  JAXSPARSE_RETURN_IF_ERROR(
      ReadShapes(v, "x", x, "dy", dy, indices, "dv", dv, o));
  JAXSPARSE_RETURN_IF_ERROR(CheckCommon(v, n, m, *o));
  JAXSPARSE_RETURN_IF_ERROR(
      v.Dim("dy.shape[1] (T)", o->b.rows, "x.shape[1]", o->a.rows));
  JAXSPARSE_RETURN_IF_ERROR(
      v.Dim("dy.shape[2] (N)", o->b.cols, "dv.shape[1]", o->result.rows));
  JAXSPARSE_RETURN_IF_ERROR(v.Dim("indices.shape[1] (N)", o->indices.rows,
                                  "dv.shape[1]", o->result.rows));
  JAXSPARSE_RETURN_IF_ERROR(CheckKept(v, o->indices, o->a.cols, n, m));
  return CheckKept(v, o->result, o->a.cols, n, m);
}

}  // namespace nm_check
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_NM_NM_CHECKS_H_
