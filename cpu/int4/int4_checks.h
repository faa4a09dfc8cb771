// The operand checks of the int4 targets (docs/ffi_abi.md), on the common
// Validator:
//
//   int4_matmul       x [Bx, T, K], qweight [Bw, K/2, N], scales [Bw, K/g, N]
//                                                         -> y  [B, T, N]
//   int4_matmul_t     dy [By, T, N], qweight, scales      -> dx [B, T, K]
//   int4_nm_matmul    x, qweight [Bw, K/4, N], positions [Bw, K/8, N], scales
//                                                         -> y  [B, T, N]
//   int4_nm_matmul_t  dy, qweight, positions, scales      -> dx [B, T, K]
//   int4_matmul_lines x [Bx, T, K], lines [Bw, ceil(N/64) K/2, 64], scales
//                                                         -> y  [B, T, N]
//   int4_nm_matmul_lines x, lines [Bw, ceil(N/64) ceil(K/16) 8, 64], scales
//                                                         -> y  [B, T, N]
//
// The lines (the dense form's CPU layout, jaxsparse.ops.int4_pack_lines) hold
// each block of 64 outputs' input rows one after the other, a 64-byte line per
// row: lines[b K/2 + r][4 l + j] = qweight[r][64 b + 16 j + l] (0 past N), so
// a task's weight is one sequential stream and each dword lane l of a line
// holds outputs 16 j + l for j = 0..3.
//
// The 2:4 form's lines (jaxsparse.ops.int4_nm_pack_lines) hold each block of
// 64 outputs' chunks of 16 inputs (4 2:4 groups) one after the other, 8 lines
// per chunk: lines 0..3 the values, 4..7 the indices of outputs 16 v + l
// (line v or 4 + v, dword lane l), group 4 c + j of chunk c in byte j:
//   values  lines[8 (b C + c) + v][4 l + j]     = qweight[4 c + j][64 b + 16 v + l]
//   indices lines[8 (b C + c) + 4 + v][4 l + j] = (4 j + p0) | (4 j + p1) << 4
// with C = ceil(K/16) and (p0, p1) the group's positions; past K/4 groups or
// past N the values are 0x88 (code 0) and the indices 4 j | (4 j + 1) << 4.
// An index nibble is the kept value's input within the chunk, which a
// vpermps looks up in a vector of the chunk's 16 inputs.
//
// g = the attribute group_size, dividing K (even; a multiple of 8 for 2:4).
// qweight and positions are uint8, scales share the float dtype of the dense
// operand and the result; the weight's arrays share one batch.
#ifndef JAXSPARSE_CPU_INT4_INT4_CHECKS_H_
#define JAXSPARSE_CPU_INT4_INT4_CHECKS_H_

#include <cstdint>
#include <string>

#include "cpu/common/ffi.h"
#include "cpu/common/validate.h"

namespace jaxsparse {
namespace int4_check {

struct Operands {
  Operand3 dense, qweight, positions, scales, result;
  bool sparse = false;
};

// `k` is the contraction width: x's for the products by W, the result's for
// the products by W^T.
inline xla::ffi::Error CheckWeight(const Validator& val, int32_t group,
                                   int64_t k, int64_t n_out, Operands* o) {
  const int32_t multiple = o->sparse ? 8 : 2;
  JAXSPARSE_RETURN_IF_ERROR(val.Attr("group_size", group, multiple, INT32_MAX));
  if (k % group != 0 || group % multiple != 0) {
    return val.Fail("attribute group_size must divide K = " + std::to_string(k) +
                    " and be a multiple of " + std::to_string(multiple) +
                    ", got " + std::to_string(group));
  }
  const int64_t per_byte = o->sparse ? 4 : 2;
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("qweight.shape[1] (K/" + std::to_string(per_byte) + ")",
                                    o->qweight.rows, "K/" + std::to_string(per_byte),
                                    k / per_byte));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("qweight.shape[2] (N)", o->qweight.cols, "N", n_out));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("scales.shape[1] (K/group_size)", o->scales.rows,
                                    "K/group_size", k / group));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("scales.shape[2] (N)", o->scales.cols, "N", n_out));
  JAXSPARSE_RETURN_IF_ERROR(val.Dtype(o->qweight, xla::ffi::DataType::U8));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("scales.shape[0]", o->scales.batch,
                                    "qweight.shape[0]", o->qweight.batch));
  if (!o->sparse) return xla::ffi::Error::Success();
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("positions.shape[1] (K/8)", o->positions.rows,
                                    "K/8", k / 8));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("positions.shape[2] (N)", o->positions.cols, "N",
                                    n_out));
  JAXSPARSE_RETURN_IF_ERROR(val.Dtype(o->positions, xla::ffi::DataType::U8));
  return val.Dim("positions.shape[0]", o->positions.batch, "qweight.shape[0]",
                 o->qweight.batch);
}

inline xla::ffi::Error ReadShapes(const Validator& val, const char* dense_name,
                                  const xla::ffi::AnyBuffer& dense,
                                  const xla::ffi::AnyBuffer& qweight,
                                  const xla::ffi::AnyBuffer* positions,
                                  const xla::ffi::AnyBuffer& scales,
                                  const char* result_name,
                                  const xla::ffi::AnyBuffer& result, Operands* o) {
  o->sparse = positions != nullptr;
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3(dense_name, dense, &o->dense));
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("qweight", qweight, &o->qweight));
  if (o->sparse) {
    JAXSPARSE_RETURN_IF_ERROR(val.Shape3("positions", *positions, &o->positions));
  }
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("scales", scales, &o->scales));
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3(result_name, result, &o->result));
  JAXSPARSE_RETURN_IF_ERROR(val.SameFloatDtype({&o->dense, &o->scales, &o->result}));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim(std::string(result_name) + ".shape[1] (T)",
                                    o->result.rows, std::string(dense_name) + ".shape[1]",
                                    o->dense.rows));
  return val.Batch({&o->dense, &o->qweight}, o->result);
}

// y = x @ W (positions null for the dense form).
inline xla::ffi::Error CheckMatmul(const Validator& val, int32_t group,
                                   const xla::ffi::AnyBuffer& x,
                                   const xla::ffi::AnyBuffer& qweight,
                                   const xla::ffi::AnyBuffer* positions,
                                   const xla::ffi::AnyBuffer& scales,
                                   const xla::ffi::AnyBuffer& y, Operands* o) {
  JAXSPARSE_RETURN_IF_ERROR(ReadShapes(val, "x", x, qweight, positions, scales, "y", y, o));
  return CheckWeight(val, group, o->dense.cols, o->result.cols, o);
}

// y = x @ W on the lines layouts (2:4 when `sparse`): the canonical checks on
// copies of the lines' operand with the canonical dims ([K/2, N], or [K/4, N]
// and positions [K/8, N]).
inline xla::ffi::Error CheckMatmulLines(const Validator& val, int32_t group, bool sparse,
                                        const xla::ffi::AnyBuffer& x,
                                        const xla::ffi::AnyBuffer& lines,
                                        const xla::ffi::AnyBuffer& scales,
                                        const xla::ffi::AnyBuffer& y, Operands* o) {
  JAXSPARSE_RETURN_IF_ERROR(ReadShapes(val, "x", x, lines, nullptr, scales, "y", y, o));
  const int64_t k = o->dense.cols, n_out = o->result.cols, blocks = (n_out + 63) / 64;
  const int64_t rows = sparse ? blocks * ((k + 15) / 16) * 8 : blocks * (k / 2);
  JAXSPARSE_RETURN_IF_ERROR(val.Dim(sparse ? "lines.shape[1] (ceil(N/64) ceil(K/16) 8)"
                                           : "lines.shape[1] (ceil(N/64) K/2)",
                                    o->qweight.rows,
                                    sparse ? "ceil(N/64) ceil(K/16) 8" : "ceil(N/64) K/2", rows));
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("lines.shape[2]", o->qweight.cols, "64", 64));
  const int64_t multiple = sparse ? 4 : 2;
  if (k % multiple != 0) {
    return val.Fail("K = " + std::to_string(k) + " must be a multiple of " +
                    std::to_string(multiple) +
                    (sparse ? " (2:4 groups)" : " (two inputs per byte)"));
  }
  Operands canonical = *o;
  canonical.sparse = sparse;
  canonical.qweight.rows = k / (sparse ? 4 : 2);
  canonical.qweight.cols = n_out;
  if (sparse) {
    canonical.positions = canonical.qweight;
    canonical.positions.rows = k / 8;
  }
  return CheckWeight(val, group, k, n_out, &canonical);
}

// dx = dy @ W^T: K is the result's width.
inline xla::ffi::Error CheckMatmulT(const Validator& val, int32_t group,
                                    const xla::ffi::AnyBuffer& dy,
                                    const xla::ffi::AnyBuffer& qweight,
                                    const xla::ffi::AnyBuffer* positions,
                                    const xla::ffi::AnyBuffer& scales,
                                    const xla::ffi::AnyBuffer& dx, Operands* o) {
  JAXSPARSE_RETURN_IF_ERROR(ReadShapes(val, "dy", dy, qweight, positions, scales, "dx", dx, o));
  return CheckWeight(val, group, o->result.cols, o->dense.cols, o);
}

// y = dequant(xq) @ W on int8 activations (int4_a8_matmul):
//   xq [Bx, T, K] int8, x_scales [Bx, T, K/g] f32, x_sums [Bx, T, K/g] int32,
//   qweight [Bw, K/2, N], scales [Bw, K/g, N] -> y [B, T, N] in the scales'
//   dtype; K and g multiples of 4 (whole quads of inputs per group).
// The int8-activation kernels read inputs in quads (vpdpbusd sums 4 byte products), and a
// quad must not straddle a group: K and the group size are whole numbers of quads.
inline xla::ffi::Error CheckWholeQuads(const Validator& val, int64_t k, int32_t group) {
  if (k % 4 != 0 || group % 4 != 0) {
    return val.Fail("K = " + std::to_string(k) + " and attribute group_size = " +
                    std::to_string(group) + " must be multiples of 4 (whole input quads)");
  }
  return xla::ffi::Error::Success();
}

struct A8Operands {
  Operand3 x_scales, x_sums;
  Operands w;  // w.dense is xq
};

inline xla::ffi::Error CheckA8Matmul(const Validator& val, int32_t group,
                                     const xla::ffi::AnyBuffer& xq,
                                     const xla::ffi::AnyBuffer& x_scales,
                                     const xla::ffi::AnyBuffer& x_sums,
                                     const xla::ffi::AnyBuffer& qweight,
                                     const xla::ffi::AnyBuffer& scales,
                                     const xla::ffi::AnyBuffer& y, A8Operands* o) {
  Operands& w = o->w;
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("xq", xq, &w.dense));
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("x_scales", x_scales, &o->x_scales));
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("x_sums", x_sums, &o->x_sums));
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("qweight", qweight, &w.qweight));
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("scales", scales, &w.scales));
  JAXSPARSE_RETURN_IF_ERROR(val.Shape3("y", y, &w.result));
  JAXSPARSE_RETURN_IF_ERROR(val.Dtype(w.dense, xla::ffi::DataType::S8));
  JAXSPARSE_RETURN_IF_ERROR(val.Dtype(o->x_scales, xla::ffi::DataType::F32));
  JAXSPARSE_RETURN_IF_ERROR(val.Dtype(o->x_sums, xla::ffi::DataType::S32));
  JAXSPARSE_RETURN_IF_ERROR(val.SameFloatDtype({&w.scales, &w.result}));
  const int64_t k = w.dense.cols;
  JAXSPARSE_RETURN_IF_ERROR(CheckWeight(val, group, k, w.result.cols, &w));
  JAXSPARSE_RETURN_IF_ERROR(CheckWholeQuads(val, k, group));
  for (const Operand3* info : {&o->x_scales, &o->x_sums}) {
    JAXSPARSE_RETURN_IF_ERROR(val.Dim(std::string(info->name) + ".shape[0]", info->batch,
                                      "xq.shape[0]", w.dense.batch));
    JAXSPARSE_RETURN_IF_ERROR(val.Dim(std::string(info->name) + ".shape[1] (T)", info->rows,
                                      "xq.shape[1]", w.dense.rows));
    JAXSPARSE_RETURN_IF_ERROR(val.Dim(std::string(info->name) + ".shape[2] (K/group_size)",
                                      info->cols, "K/group_size", k / group));
  }
  JAXSPARSE_RETURN_IF_ERROR(val.Dim("y.shape[1] (T)", w.result.rows, "xq.shape[1]",
                                    w.dense.rows));
  return val.Batch({&w.dense, &w.qweight}, w.result);
}

}  // namespace int4_check
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_INT4_INT4_CHECKS_H_
