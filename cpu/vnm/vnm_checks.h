// The operand checks of the V:N:M targets, shared by the CPU handlers
// (vnm_ops.cc) and the CUDA handlers (cuda/vnm/vnm_ops.cu, native and
// emulated), built on the common Validator. Layouts (docs/ffi_abi.md):
//
//   vnm_spmm    x [Bx, T, K], values [Bw, N, Kc], indices [Bw, N, Kc],
//               columns [Bw, P, G*4]                        -> y  [B, T, N]
//   vnm_spmm_t  dy [By, T, N], values, indices, columns     -> dx [B, T, K]
//   vnm_sddmm   x [Bx, T, K], dy [By, T, N], indices, columns -> dv [B, N, Kc]
//
// with G = ceil(K / m) groups of m inputs, P = ceil(N / v) panels of v
// outputs, Kc = G * n kept values per output; float operands of one dtype,
// uint8 indices (the slot 0..3 of each kept value among its panel's 4 selected
// inputs of the group) and uint8 columns (the 4 selected positions 0..m-1 of
// each panel and group). The kept entry c of output r reads input
//   (c / n) * m + columns[r / v][4 * (c / n) + indices[r][c]].
// The weight's three arrays share one batch dimension.
#ifndef JAXSPARSE_CPU_VNM_VNM_CHECKS_H_
#define JAXSPARSE_CPU_VNM_VNM_CHECKS_H_

#include <cstdint>
#include <string>

#include "cpu/common/ffi.h"
#include "cpu/common/validate.h"

namespace jaxsparse {
namespace vnm_check {

constexpr int32_t kMinV = 16, kMaxV = 256, kVMultiple = 16;
constexpr int32_t kMinM = 4, kMaxM = 64;
constexpr int32_t kSelected = 4;  // Inputs a panel keeps per group (2:4 inside).

// The five arrays of one call: two float operands, the weight's positions
// (indices, columns), the result.
struct Operands {
  Operand3 a, b, indices, columns, result;
};

inline int64_t Groups(int64_t k, int32_t m) { return (k + m - 1) / m; }
inline int64_t Panels(int64_t n_out, int32_t v) { return (n_out + v - 1) / v; }

inline xla::ffi::Error CheckSpec(const Validator& val, int32_t v, int32_t n,
                                 int32_t m) {
  JAXSPARSE_RETURN_IF_ERROR(val.Attr("v", v, kMinV, kMaxV));
  if (v % kVMultiple != 0) {
    return val.Fail("attribute v must be a multiple of " +
                    std::to_string(kVMultiple) + ", got " + std::to_string(v));
  }
  JAXSPARSE_RETURN_IF_ERROR(val.Attr("n", n, 1, 2));
  return val.Attr("m", m, kMinM, kMaxM);
}

// [.., N, Kc] with Kc = ceil(K / m) * n.
inline xla::ffi::Error CheckKept(const Validator& val, const Operand3& array,
                                 int64_t n_out, int64_t k, int32_t n,
                                 int32_t m) {
  JAXSPARSE_RETURN_IF_ERROR(
      val.Dim(std::string(array.name) + ".shape[1] (N)", array.rows,
              "the outputs", n_out));
  return val.Dim(std::string(array.name) + ".shape[2] (Kc = ceil(K/m)*n)",
                 array.cols, "ceil(" + std::to_string(k) + "/" +
                     std::to_string(m) + ")*" + std::to_string(n),
                 Groups(k, m) * n);
}

// [.., P, G*4] with P = ceil(N / v), G = ceil(K / m).
inline xla::ffi::Error CheckColumns(const Validator& val, const Operand3& c,
                                    int64_t n_out, int64_t k, int32_t v,
                                    int32_t m) {
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("columns.shape[1] (P = ceil(N/v))", c.rows,
                                    "ceil(" + std::to_string(n_out) + "/" +
                                        std::to_string(v) + ")",
                                    Panels(n_out, v)));
  return val.Dim("columns.shape[2] (ceil(K/m)*4)", c.cols,
                 "ceil(" + std::to_string(k) + "/" + std::to_string(m) + ")*4",
                 Groups(k, m) * kSelected);
}

inline xla::ffi::Error ReadShapes(
    const Validator& val, const char* a_name, const xla::ffi::AnyBuffer& a,
    const char* b_name, const xla::ffi::AnyBuffer& b,
    const xla::ffi::AnyBuffer& indices, const xla::ffi::AnyBuffer& columns,
    const char* result_name, const xla::ffi::AnyBuffer& result, Operands* o) {
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3(a_name, a, &o->a));
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3(b_name, b, &o->b));
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("indices", indices, &o->indices));
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("columns", columns, &o->columns));
  return val.Shape3(result_name, result, &o->result);
}

// The checks every V:N:M target shares: the spec, one float dtype for a, b
// and the result, uint8 indices and columns sharing one batch, broadcastable
// batches.
inline xla::ffi::Error CheckCommon(const Validator& val, int32_t v, int32_t n,
                                   int32_t m, const Operands& o) {
  JAXSPARSE_RETURN_IF_ERROR(CheckSpec(val, v, n, m));
  JAXSPARSE_RETURN_IF_ERROR(val.SameFloatDtype({&o.a, &o.b, &o.result}));
  JAXSPARSE_RETURN_IF_ERROR(val.Dtype(o.indices, xla::ffi::DataType::U8));
  JAXSPARSE_RETURN_IF_ERROR(val.Dtype(o.columns, xla::ffi::DataType::U8));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("columns.shape[0]", o.columns.batch,
                                    "indices.shape[0]", o.indices.batch));
  return val.Batch({&o.a, &o.b, &o.indices}, o.result);
}

// y = x @ W: a = x, b = values.
inline xla::ffi::Error CheckSpmm(const Validator& val, int32_t v, int32_t n,
                                 int32_t m, const xla::ffi::AnyBuffer& x,
                                 const xla::ffi::AnyBuffer& values,
                                 const xla::ffi::AnyBuffer& indices,
                                 const xla::ffi::AnyBuffer& columns,
                                 const xla::ffi::AnyBuffer& y, Operands* o) {
  JAXSPARSE_RETURN_IF_ERROR(
      ReadShapes(val, "x", x, "values", values, indices, columns, "y", y, o));
  JAXSPARSE_RETURN_IF_ERROR(CheckCommon(val, v, n, m, *o));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("values.shape[0]", o->b.batch,
                                    "indices.shape[0]", o->indices.batch));
  const int64_t k = o->a.cols, n_out = o->result.cols;
  JAXSPARSE_RETURN_IF_ERROR(
      val.Dim("y.shape[1] (T)", o->result.rows, "x.shape[1]", o->a.rows));
  JAXSPARSE_RETURN_IF_ERROR(CheckKept(val, o->b, n_out, k, n, m));
  JAXSPARSE_RETURN_IF_ERROR(CheckKept(val, o->indices, n_out, k, n, m));
  return CheckColumns(val, o->columns, n_out, k, v, m);
}

// The forward's tiles packed once (vnm_spmm_tiled, CPU only): tiles
// [Bw, P, words] of the values' dtype, sharing their batch; bf16: the tile
// kernels' B tiles, v/16 * ceil(4 G / 32) * 512 words per panel; f32: the
// FMA engine's rows, 4 G * v floats per panel.
inline int64_t TileWordsPerPanel(int64_t k, int32_t v, int32_t m, xla::ffi::DataType dtype) {
  constexpr int64_t kStepWords = 32, kTileWords = 16 * kStepWords;
  const int64_t slots = Groups(k, m) * kSelected;
  if (dtype == xla::ffi::DataType::F32) return slots * v;
  return v / 16 * ((slots + kStepWords - 1) / kStepWords) * kTileWords;
}

inline xla::ffi::Error CheckTiles(const Validator& val, int32_t v, int32_t m,
                                  const xla::ffi::AnyBuffer& tiles, const Operands& o,
                                  Operand3* t) {
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("tiles", tiles, t));
  JAXSPARSE_RETURN_IF_ERROR(val.SameFloatDtype({&o.b, t}));
  if (t->dtype() == xla::ffi::DataType::F16) {
    return val.Fail("tiles are packed for float32 or bfloat16 values, got float16");
  }
  JAXSPARSE_RETURN_IF_ERROR(
      val.Dim("tiles.shape[0]", t->batch, "values.shape[0]", o.b.batch));
  const int64_t k = o.a.cols, n_out = o.result.cols;
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("tiles.shape[1] (P = ceil(N/v))", t->rows,
                                    "ceil(" + std::to_string(n_out) + "/" +
                                        std::to_string(v) + ")",
                                    Panels(n_out, v)));
  const bool f32 = t->dtype() == xla::ffi::DataType::F32;
  return val.Dim("tiles.shape[2]", t->cols,
                 f32 ? "ceil(K/m)*4 * v" : "v/16 * ceil(ceil(K/m)*4/32) * 512",
                 TileWordsPerPanel(k, v, m, t->dtype()));
}

// dx = dy @ W^T: a = dy, b = values; K comes from dx.
inline xla::ffi::Error CheckSpmmT(const Validator& val, int32_t v, int32_t n,
                                  int32_t m, const xla::ffi::AnyBuffer& dy,
                                  const xla::ffi::AnyBuffer& values,
                                  const xla::ffi::AnyBuffer& indices,
                                  const xla::ffi::AnyBuffer& columns,
                                  const xla::ffi::AnyBuffer& dx, Operands* o) {
  JAXSPARSE_RETURN_IF_ERROR(ReadShapes(val, "dy", dy, "values", values,
                                       indices, columns, "dx", dx, o));
  JAXSPARSE_RETURN_IF_ERROR(CheckCommon(val, v, n, m, *o));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("values.shape[0]", o->b.batch,
                                    "indices.shape[0]", o->indices.batch));
  const int64_t k = o->result.cols, n_out = o->a.cols;
  JAXSPARSE_RETURN_IF_ERROR(
      val.Dim("dx.shape[1] (T)", o->result.rows, "dy.shape[1]", o->a.rows));
  JAXSPARSE_RETURN_IF_ERROR(CheckKept(val, o->b, n_out, k, n, m));
  JAXSPARSE_RETURN_IF_ERROR(CheckKept(val, o->indices, n_out, k, n, m));
  return CheckColumns(val, o->columns, n_out, k, v, m);
}

// dv = (x^T dy)[kept]: a = x, b = dy.
inline xla::ffi::Error CheckSddmm(const Validator& val, int32_t v, int32_t n,
                                  int32_t m, const xla::ffi::AnyBuffer& x,
                                  const xla::ffi::AnyBuffer& dy,
                                  const xla::ffi::AnyBuffer& indices,
                                  const xla::ffi::AnyBuffer& columns,
                                  const xla::ffi::AnyBuffer& dv, Operands* o) {
  JAXSPARSE_RETURN_IF_ERROR(
      ReadShapes(val, "x", x, "dy", dy, indices, columns, "dv", dv, o));
  JAXSPARSE_RETURN_IF_ERROR(CheckCommon(val, v, n, m, *o));
  const int64_t k = o->a.cols, n_out = o->b.cols;
  JAXSPARSE_RETURN_IF_ERROR(
      val.Dim("dy.shape[1] (T)", o->b.rows, "x.shape[1]", o->a.rows));
  JAXSPARSE_RETURN_IF_ERROR(CheckKept(val, o->indices, n_out, k, n, m));
  JAXSPARSE_RETURN_IF_ERROR(CheckKept(val, o->result, n_out, k, n, m));
  return CheckColumns(val, o->columns, n_out, k, v, m);
}

}  // namespace vnm_check
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_VNM_VNM_CHECKS_H_
