// CUDA handlers of the int4 MARLIN targets: the operand checks, the choice
// of token tile and the launches of cuda/int4/int4_marlin.cuh (dense) and
// cuda/int4/int4_marlin_nm.cuh (2:4). The canonical int4 layout has no CUDA
// kernel; these targets read marlin_pack's / marlin_nm_pack's layouts
// (jaxsparse/ops/int4_marlin.py).
//
// ABI of jaxsparse_int4_marlin_matmul: operands x [T, K] bf16/f16, qweight
// [K/16, 2N] int32, scales [K/g, N] (or [1, N] per column) in x's dtype;
// attribute group_size (i32: -1 for one scale per output column, else a
// multiple of 16 dividing K); result y [T, N] in x's dtype. K % 64 == 0,
// N % 64 == 0, any T >= 0.
//
// ABI of jaxsparse_int4_nm_marlin_matmul: operands x [T, K], qweight
// [K/32, 2N] int32, meta [K/32, N] int32, scales as above; group_size -1 or
// a multiple of 32 dividing K; K % 128 == 0, N % 64 == 0, any T >= 0.

#include <algorithm>
#include <cstdint>
#include <string>

#include "cpu/common/ffi.h"
#include "cpu/common/validate.h"
#include "cuda/ffi_target.h"
#include "cuda/int4/int4_marlin.cuh"
#include "cuda/int4/int4_marlin_nm.cuh"
#include "cuda/launch.cuh"
#include "cuda/simt.cuh"

namespace ffi = xla::ffi;

namespace jaxsparse {
namespace {

using launch::kMaxGridYZ;
using launch::LaunchStatus;

constexpr char kMarlin[] = "jaxsparse_int4_marlin_matmul";
constexpr char kMarlinNm[] = "jaxsparse_int4_nm_marlin_matmul";

struct Shapes {
  int64_t tokens, in, out;
};

ffi::Error CheckRank2(const Validator& v, const char* name, const ffi::AnyBuffer& buffer) {
  if (buffer.dimensions().size() == 2) return ffi::Error::Success();
  return v.Fail(std::string(name) + " must have rank 2, got shape " +
                DimsStr(buffer.dimensions()));
}

ffi::Error CheckShape(const Validator& v, const char* name, const ffi::AnyBuffer& buffer,
                      int64_t rows, int64_t cols, const std::string& expected) {
  const auto dims = buffer.dimensions();
  if (dims[0] == rows && dims[1] == cols) return ffi::Error::Success();
  return v.Fail(std::string(name) + " must be " + expected + " = [" + std::to_string(rows) +
                ", " + std::to_string(cols) + "], got " + DimsStr(dims));
}

ffi::Error CheckDtype(const Validator& v, const char* name, const ffi::AnyBuffer& buffer,
                      ffi::DataType want, const std::string& why) {
  if (buffer.element_type() == want) return ffi::Error::Success();
  return v.Fail(std::string(name) + " dtype must be " + DtypeName(want) + why + ", got " +
                DtypeName(buffer.element_type()));
}

// Every check of the ABI above; the dims into `shapes`.
// The layout's sizes: inputs per packed row, the k tile, the group multiple.
struct Layout {
  int64_t inputs_per_row, tile_k, group_multiple;
  const char* qweight_shape;
};
constexpr Layout kDenseLayout{16, marlin::kTileK, 16, "[K/16, 2N]"};
constexpr Layout kNmLayout{32, marlin_nm::kTileK, 32, "[K/32, 2N]"};

ffi::Error CheckMarlin(const Validator& v, const Layout& layout, const ffi::AnyBuffer& x,
                       const ffi::AnyBuffer& qweight, const ffi::AnyBuffer* meta,
                       const ffi::AnyBuffer& scales, int32_t group_size, const ffi::AnyBuffer& y,
                       Shapes* shapes) {
  for (const auto& [name, buffer] : {std::pair<const char*, const ffi::AnyBuffer*>{"x", &x},
                                     {"qweight", &qweight}, {"scales", &scales}, {"y", &y}}) {
    JAXSPARSE_RETURN_IF_ERROR(CheckRank2(v, name, *buffer));
  }
  if (meta != nullptr) JAXSPARSE_RETURN_IF_ERROR(CheckRank2(v, "meta", *meta));
  const ffi::DataType dtype = x.element_type();
  if (dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F16) {
    return v.Fail("x dtype must be bfloat16 or float16 (the tensor cores' inputs), got " +
                  DtypeName(dtype));
  }
  const int64_t tokens = x.dimensions()[0], in = x.dimensions()[1];
  const int64_t out = y.dimensions()[1];
  if (in % layout.tile_k != 0) {
    return v.Fail("x.shape[1] (K) must be a multiple of " + std::to_string(layout.tile_k) +
                  ", got " + std::to_string(in));
  }
  if (out % marlin::kTileN != 0) {
    return v.Fail("y.shape[1] (N) must be a multiple of " + std::to_string(marlin::kTileN) +
                  ", got " + std::to_string(out));
  }
  if (group_size != marlin::kPerColumn &&
      (group_size <= 0 || group_size % layout.group_multiple != 0 || in % group_size != 0)) {
    return v.Fail("attribute group_size must be -1 (per column) or a multiple of " +
                  std::to_string(layout.group_multiple) + " dividing K = " + std::to_string(in) +
                  ", got " + std::to_string(group_size));
  }
  const int64_t groups = group_size == marlin::kPerColumn ? 1 : in / group_size;
  JAXSPARSE_RETURN_IF_ERROR(CheckShape(v, "qweight", qweight, in / layout.inputs_per_row,
                                       2 * out, layout.qweight_shape));
  JAXSPARSE_RETURN_IF_ERROR(CheckDtype(v, "qweight", qweight, ffi::DataType::S32, ""));
  if (meta != nullptr) {
    JAXSPARSE_RETURN_IF_ERROR(CheckShape(v, "meta", *meta, in / 32, out, "[K/32, N]"));
    JAXSPARSE_RETURN_IF_ERROR(CheckDtype(v, "meta", *meta, ffi::DataType::S32, ""));
  }
  JAXSPARSE_RETURN_IF_ERROR(CheckShape(v, "scales", scales, groups, out,
                                       group_size == marlin::kPerColumn ? "[1, N]"
                                                                        : "[K/group_size, N]"));
  JAXSPARSE_RETURN_IF_ERROR(CheckDtype(v, "scales", scales, dtype, " (x's)"));
  JAXSPARSE_RETURN_IF_ERROR(CheckShape(v, "y", y, tokens, out, "[T, N]"));
  JAXSPARSE_RETURN_IF_ERROR(CheckDtype(v, "y", y, dtype, " (x's)"));
  *shapes = Shapes{tokens, in, out};
  return ffi::Error::Success();
}

template <class T, simt::MmaType kType, int kMTiles, bool kGrouped>
ffi::Error LaunchTiles(simt::Stream stream, const marlin::Args<T>& a) {
  using Shape = marlin::Tile<kMTiles>;
  const int64_t token_blocks = (a.tokens + Shape::kTokens - 1) / Shape::kTokens;
  const dim3 grid(static_cast<unsigned>(a.out / marlin::kTileN),
                  static_cast<unsigned>(std::min(token_blocks, kMaxGridYZ)));
  if constexpr (kGrouped) {
    simt::Launch(kMarlin, &marlin::MarlinKernel<T, kType, kMTiles>, grid, dim3(marlin::kThreads),
                 Shape::kSmemBytes, stream, a);
  } else {
    simt::Launch(kMarlin, &marlin::MarlinPerColumnKernel<T, kType, kMTiles>, grid,
                 dim3(marlin::kThreads), Shape::kSmemBytes, stream, a);
  }
  return LaunchStatus(kMarlin);
}

// The token tile: 16 tokens when T <= 16 (no MMA on padding), 32 up to 32,
// else 64 (each dequantised fragment reused 4 times).
template <class T, simt::MmaType kType, bool kGrouped>
ffi::Error LaunchFor(simt::Stream stream, const marlin::Args<T>& a) {
  if (a.tokens <= 16) return LaunchTiles<T, kType, 1, kGrouped>(stream, a);
  if (a.tokens <= 32) return LaunchTiles<T, kType, 2, kGrouped>(stream, a);
  return LaunchTiles<T, kType, 4, kGrouped>(stream, a);
}

template <class T, simt::MmaType kType>
ffi::Error LaunchTyped(simt::Stream stream, const ffi::AnyBuffer& x, const ffi::AnyBuffer& qweight,
                       const ffi::AnyBuffer& scales, int32_t group_size, ffi::AnyBuffer& y,
                       const Shapes& s) {
  const marlin::Args<T> a{static_cast<const uint16_t*>(x.untyped_data()),
                          static_cast<const uint32_t*>(qweight.untyped_data()),
                          static_cast<const uint16_t*>(scales.untyped_data()),
                          static_cast<T*>(y.untyped_data()),
                          s.tokens,
                          s.in,
                          s.out,
                          group_size};
  if (group_size == marlin::kPerColumn) return LaunchFor<T, kType, false>(stream, a);
  return LaunchFor<T, kType, true>(stream, a);
}

ffi::Error Int4MarlinMatmul(simt::Stream stream, ffi::AnyBuffer x, ffi::AnyBuffer qweight,
                            ffi::AnyBuffer scales, int32_t group_size,
                            ffi::Result<ffi::AnyBuffer> y) {
  Shapes s;
  JAXSPARSE_RETURN_IF_ERROR(CheckMarlin(Validator(kMarlin), kDenseLayout, x, qweight, nullptr,
                                        scales, group_size, *y, &s));
  if (s.tokens == 0 || s.out == 0) return ffi::Error::Success();
  if (s.in == 0) return launch::FillZeros(kMarlin, stream, *y);
  if (x.element_type() == ffi::DataType::BF16) {
    return LaunchTyped<simt::Bf16, simt::MmaType::kBf16>(stream, x, qweight, scales, group_size,
                                                         *y, s);
  }
  return LaunchTyped<simt::Half, simt::MmaType::kF16>(stream, x, qweight, scales, group_size, *y,
                                                      s);
}

// ------------------------------------------------------------------ 2:4

template <class T, simt::MmaType kType, int kTokenTiles, bool kGrouped>
ffi::Error LaunchNmTiles(simt::Stream stream, const marlin::Args<T>& a, const uint32_t* meta) {
  using Shape = marlin_nm::Tile<kTokenTiles>;
  const int64_t token_blocks = (a.tokens + Shape::kTokens - 1) / Shape::kTokens;
  const dim3 grid(static_cast<unsigned>(a.out / marlin_nm::kTileN),
                  static_cast<unsigned>(std::min(token_blocks, kMaxGridYZ)));
  if constexpr (kGrouped) {
    simt::Launch(kMarlinNm, &marlin_nm::MarlinNmKernel<T, kType, kTokenTiles>, grid,
                 dim3(marlin_nm::kThreads), Shape::kSmemBytes, stream, a, meta);
  } else {
    simt::Launch(kMarlinNm, &marlin_nm::MarlinNmPerColumnKernel<T, kType, kTokenTiles>, grid,
                 dim3(marlin_nm::kThreads), Shape::kSmemBytes, stream, a, meta);
  }
  return LaunchStatus(kMarlinNm);
}

// The token tile: 16 tokens when T <= 16, else 32 (4 stages of 64 would not
// fit the 48 KB of shared memory).
template <class T, simt::MmaType kType, bool kGrouped>
ffi::Error LaunchNmFor(simt::Stream stream, const marlin::Args<T>& a, const uint32_t* meta) {
  if (a.tokens <= 16) return LaunchNmTiles<T, kType, 2, kGrouped>(stream, a, meta);
  return LaunchNmTiles<T, kType, 4, kGrouped>(stream, a, meta);
}

template <class T, simt::MmaType kType>
ffi::Error LaunchNmTyped(simt::Stream stream, const ffi::AnyBuffer& x,
                         const ffi::AnyBuffer& qweight, const ffi::AnyBuffer& meta,
                         const ffi::AnyBuffer& scales, int32_t group_size, ffi::AnyBuffer& y,
                         const Shapes& s) {
  const marlin::Args<T> a{static_cast<const uint16_t*>(x.untyped_data()),
                          static_cast<const uint32_t*>(qweight.untyped_data()),
                          static_cast<const uint16_t*>(scales.untyped_data()),
                          static_cast<T*>(y.untyped_data()),
                          s.tokens,
                          s.in,
                          s.out,
                          group_size};
  const auto* m = static_cast<const uint32_t*>(meta.untyped_data());
  if (group_size == marlin::kPerColumn) return LaunchNmFor<T, kType, false>(stream, a, m);
  return LaunchNmFor<T, kType, true>(stream, a, m);
}

ffi::Error Int4NmMarlinMatmul(simt::Stream stream, ffi::AnyBuffer x, ffi::AnyBuffer qweight,
                              ffi::AnyBuffer meta, ffi::AnyBuffer scales, int32_t group_size,
                              ffi::Result<ffi::AnyBuffer> y) {
  Shapes s;
  JAXSPARSE_RETURN_IF_ERROR(CheckMarlin(Validator(kMarlinNm), kNmLayout, x, qweight, &meta,
                                        scales, group_size, *y, &s));
  if (s.tokens == 0 || s.out == 0) return ffi::Error::Success();
  if (s.in == 0) return launch::FillZeros(kMarlinNm, stream, *y);
  if (x.element_type() == ffi::DataType::BF16) {
    return LaunchNmTyped<simt::Bf16, simt::MmaType::kBf16>(stream, x, qweight, meta, scales,
                                                           group_size, *y, s);
  }
  return LaunchNmTyped<simt::Half, simt::MmaType::kF16>(stream, x, qweight, meta, scales,
                                                        group_size, *y, s);
}

}  // namespace
}  // namespace jaxsparse

JAXSPARSE_CUDA_TARGET(Int4MarlinMatmul, "int4_marlin_matmul", jaxsparse::Int4MarlinMatmul,
                      .Arg<ffi::AnyBuffer>()
                          .Arg<ffi::AnyBuffer>()
                          .Arg<ffi::AnyBuffer>()
                          .Attr<int32_t>("group_size")
                          .Ret<ffi::AnyBuffer>());
JAXSPARSE_CUDA_TARGET(Int4NmMarlinMatmul, "int4_nm_marlin_matmul", jaxsparse::Int4NmMarlinMatmul,
                      .Arg<ffi::AnyBuffer>()
                          .Arg<ffi::AnyBuffer>()
                          .Arg<ffi::AnyBuffer>()
                          .Arg<ffi::AnyBuffer>()
                          .Attr<int32_t>("group_size")
                          .Ret<ffi::AnyBuffer>());
