// The register tile of the f32 FMA engine's micro-kernels (vnm_kernels.h) for
// every AVX-512 build: avx512, and the avx512bf16 and amx units, which run the
// same FMA kernels where their tile products do not apply (f32, f16, and bf16
// below the tiles' token count). Included after cpu/common/simd_avx512.h,
// whose JAXSPARSE_AVX512_NAMESPACE names the unit's namespace.
#ifndef JAXSPARSE_CPU_VNM_VNM_TILE_AVX512_H_
#define JAXSPARSE_CPU_VNM_VNM_TILE_AVX512_H_

#ifndef JAXSPARSE_AVX512_NAMESPACE
#error "include cpu/common/simd_avx512.h first"
#endif

namespace jaxsparse {
namespace cpu {
namespace JAXSPARSE_AVX512_NAMESPACE {
// 6 x 4 zmm accumulators (24 of 32 registers): per reduction step 4 vector
// loads and 6 broadcasts feed 24 FMAs, 10 loads per 12 cycles of two FMA
// pipes, so the FMAs, not the loads, set the pace (the prototype's tile).
struct VnmTile {
  static constexpr int kVecs = 4;
  static constexpr int kRows = 6;
};
}  // namespace JAXSPARSE_AVX512_NAMESPACE
}  // namespace cpu
}  // namespace jaxsparse

#endif  // JAXSPARSE_CPU_VNM_VNM_TILE_AVX512_H_
