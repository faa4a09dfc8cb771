// The one validator of FFI operands, shared by the CPU handlers, the CUDA
// handlers and their emulated build: every shape, dtype and attribute check a
// handler makes goes through it, so the messages read the same on every
// platform. Python validates first (jaxsparse/_validate.py); these checks are
// what stands between a hand-written ffi_call and out-of-bounds memory.
//
// Messages name the target, the operand, what was expected and what came:
//   "jaxsparse_nm_spmm: values.shape[2] (Kc) must be ceil(K/m)*n = 8, got 6"
#ifndef JAXSPARSE_CPU_COMMON_VALIDATE_H_
#define JAXSPARSE_CPU_COMMON_VALIDATE_H_

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "cpu/common/ffi.h"

namespace jaxsparse {

inline std::string DimsStr(xla::ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

inline std::string DtypeName(xla::ffi::DataType t) {
  using xla::ffi::DataType;
  switch (t) {
    case DataType::F32:
      return "float32";
    case DataType::BF16:
      return "bfloat16";
    case DataType::F16:
      return "float16";
    case DataType::F64:
      return "float64";
    case DataType::U8:
      return "uint8";
    case DataType::S8:
      return "int8";
    case DataType::S32:
      return "int32";
    case DataType::U32:
      return "uint32";
    default:
      return "XLA dtype #" + std::to_string(static_cast<int>(t));
  }
}

inline bool IsFloatDtype(xla::ffi::DataType t) {
  using xla::ffi::DataType;
  return t == DataType::F32 || t == DataType::BF16 || t == DataType::F16;
}

// A named operand or result of rank 3: [batch, rows, cols]. Every jaxsparse
// target takes rank-3 arrays with one leading kernel batch dimension.
struct Operand3 {
  const char* name;
  const xla::ffi::AnyBuffer* buffer;
  int64_t batch = 0;
  int64_t rows = 0;
  int64_t cols = 0;

  xla::ffi::DataType dtype() const { return buffer->element_type(); }
  // Elements between consecutive batch entries: 0 when the batch broadcasts.
  int64_t BatchStride() const { return batch == 1 ? 0 : rows * cols; }
  const void* data() const { return buffer->untyped_data(); }
  void* mutable_data() const { return buffer->untyped_data(); }
};

class Validator {
 public:
  explicit Validator(const char* target) : target_(target) {}

  const char* target() const { return target_; }
  std::string Prefix() const { return std::string(target_) + ": "; }

  xla::ffi::Error Fail(const std::string& what) const {
    return xla::ffi::Error::InvalidArgument(Prefix() + what);
  }

  // A rank-3 buffer, its dims read into `out`.
  xla::ffi::Error Shape3(const char* name, const xla::ffi::AnyBuffer& buffer,
                         Operand3* out) const {
    const auto dims = buffer.dimensions();
    if (dims.size() != 3) {
      return Fail(std::string(name) + " must have rank 3, got shape " +
                  DimsStr(dims));
    }
    *out = Operand3{name, &buffer, dims[0], dims[1], dims[2]};
    return xla::ffi::Error::Success();
  }

  // An integer attribute in [low, high].
  xla::ffi::Error Attr(const char* name, int64_t value, int64_t low,
                       int64_t high) const {
    if (low <= value && value <= high) return xla::ffi::Error::Success();
    return Fail("attribute " + std::string(name) + " must be in [" +
                std::to_string(low) + ", " + std::to_string(high) + "], got " +
                std::to_string(value));
  }

  // All of `arrays` share one dtype, and it is float32, bfloat16 or float16.
  xla::ffi::Error SameFloatDtype(
      std::initializer_list<const Operand3*> arrays) const {
    const Operand3& first = **arrays.begin();
    if (!IsFloatDtype(first.dtype())) {
      return Fail(std::string(first.name) +
                  " dtype must be float32, bfloat16 or float16, got " +
                  DtypeName(first.dtype()));
    }
    for (const Operand3* a : arrays) {
      if (a->dtype() != first.dtype()) {
        return Fail(std::string(a->name) + " dtype must be " +
                    DtypeName(first.dtype()) + " (" + first.name + "'s), got " +
                    DtypeName(a->dtype()));
      }
    }
    return xla::ffi::Error::Success();
  }

  xla::ffi::Error Dtype(const Operand3& a, xla::ffi::DataType want) const {
    if (a.dtype() == want) return xla::ffi::Error::Success();
    return Fail(std::string(a.name) + " dtype must be " + DtypeName(want) +
                ", got " + DtypeName(a.dtype()));
  }

  // `what` (e.g. "y.shape[1] (T)") must equal `source` (e.g. "x.shape[1]").
  xla::ffi::Error Dim(const std::string& what, int64_t got,
                      const std::string& source, int64_t want) const {
    if (got == want) return xla::ffi::Error::Success();
    return Fail(what + " must equal " + source + " = " + std::to_string(want) +
                ", got " + std::to_string(got));
  }

  // Each operand's batch is 1 or the largest operand batch, and the result's
  // batch is that largest one.
  xla::ffi::Error Batch(std::initializer_list<const Operand3*> operands,
                        const Operand3& result) const {
    int64_t batch = 0;
    for (const Operand3* op : operands) batch = op->batch > batch ? op->batch : batch;
    for (const Operand3* op : operands) {
      if (op->batch != 1 && op->batch != batch) {
        return Fail(std::string(op->name) + ".shape[0] must be 1 or " +
                    std::to_string(batch) + ", got " + std::to_string(op->batch));
      }
    }
    if (result.batch == batch) return xla::ffi::Error::Success();
    return Fail(std::string(result.name) + ".shape[0] must be " +
                std::to_string(batch) + " (the largest operand batch), got " +
                std::to_string(result.batch));
  }

 private:
  const char* target_;
};

}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_COMMON_VALIDATE_H_
