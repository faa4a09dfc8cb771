// Kernels that test the SIMT emulator itself (tests/cuda_emu): one-warp
// probes that run a single warp instruction on per-lane inputs, small
// kernels with a planted-bug switch, whose bugs the emulator must catch, and
// kernels that show the order in which it runs blocks.
// Written against cuda/simt.cuh only, so nvcc compiles the same source.
#ifndef JAXSPARSE_CUDA_EMU_SELFTEST_KERNELS_CUH_
#define JAXSPARSE_CUDA_EMU_SELFTEST_KERNELS_CUH_

#include <cstdint>

#include "cuda/simt.cuh"

namespace jaxsparse::selftest {

using simt::MmaType;
using simt::Smem;

// Per lane l: a[4l..4l+3], b[4l..], c[4l..], metadata[l] -> d[4l..].
template <MmaType kType, int kSelector>
__global__ void MmaSpProbe(const uint32_t* a, const uint32_t* b, const float* c,
                           const uint32_t* metadata, float* d) {
  const int l = simt::LaneId();
  uint32_t ra[4], rb[4];
  float rc[4], rd[4];
  for (int i = 0; i < 4; ++i) {
    ra[i] = a[4 * l + i];
    rb[i] = b[4 * l + i];
    rc[i] = c[4 * l + i];
  }
  simt::MmaSpM16n8k32<kType, kSelector>(rd, ra, rb, rc, metadata[l]);
  for (int i = 0; i < 4; ++i) d[4 * l + i] = rd[i];
}

// Per lane l: a[4l..], b[2l..], c[4l..] -> d[4l..].
template <MmaType kType>
__global__ void MmaProbe(const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  const int l = simt::LaneId();
  uint32_t ra[4], rb[2];
  float rc[4], rd[4];
  for (int i = 0; i < 4; ++i) ra[i] = a[4 * l + i];
  for (int i = 0; i < 2; ++i) rb[i] = b[2 * l + i];
  for (int i = 0; i < 4; ++i) rc[i] = c[4 * l + i];
  simt::MmaM16n8k16<kType>(rd, ra, rb, rc);
  for (int i = 0; i < 4; ++i) d[4 * l + i] = rd[i];
}

// Copies `rows` 16-byte rows into shared memory, then lane l names row
// row_of_lane[l] for ldmatrix.x{kNum}; out[kNum * l + j] = its register j.
template <int kNum, bool kTrans>
__global__ void LdmatrixProbe(const uint16_t* rows, int num_rows, const int* row_of_lane,
                              uint32_t* out) {
  const int l = simt::LaneId();
  Smem<uint16_t> tile = simt::DynamicSmem<uint16_t>(0);
  for (int i = l; i < num_rows * 8; i += 32) tile[i] = rows[i];
  simt::SyncThreads();
  uint32_t r[kNum];
  simt::Ldmatrix<kNum, kTrans>(r, tile + 8 * row_of_lane[l]);
  for (int j = 0; j < kNum; ++j) out[kNum * l + j] = r[j];
}

// Per thread i < n: out[i] = lop3(a[i], b[i], c[i], kImm).
template <uint32_t kImm>
__global__ void Lop3Probe(const uint32_t* a, const uint32_t* b, const uint32_t* c, int n,
                          uint32_t* out) {
  const int i = static_cast<int>(threadIdx.x + blockIdx.x * blockDim.x);
  if (i < n) out[i] = simt::Lop3<kImm>(a[i], b[i], c[i]);
}

// The packed 16-bit arithmetic of the dequantisation, one register pair per thread.
enum class PackedOp { kSub, kMul, kFma };

// Per thread i < n: out[i] = a[i] - b[i], a[i] * b[i] or a[i] * b[i] + c[i],
// two 16-bit elements per register.
template <MmaType kType, PackedOp kOp>
__global__ void Packed16Probe(const uint32_t* a, const uint32_t* b, const uint32_t* c, int n,
                              uint32_t* out) {
  const int i = static_cast<int>(threadIdx.x + blockIdx.x * blockDim.x);
  if (i >= n) return;
  if constexpr (kOp == PackedOp::kSub) {
    out[i] = simt::Sub16x2<kType>(a[i], b[i]);
  } else if constexpr (kOp == PackedOp::kMul) {
    out[i] = simt::Mul16x2<kType>(a[i], b[i]);
  } else {
    out[i] = simt::Fma16x2<kType>(a[i], b[i], c[i]);
  }
}

// The bugs SparseTileGemm and BlockSum can be built with.
enum class Bug {
  kNone,
  kMissingWait,       // Reads the staged tile before cp.async lands.
  kMissingBarrier,    // Reads other threads' shared writes before they happen.
  kSwappedFragment,   // Passes A registers 1 and 2 to mma.sp swapped.
  kOutOfBounds,       // One copy lands 16 bytes past the shared tile.
};

// One warp: D[16 x 8] = A[16 x 32] B[32 x 8], A 2:4 sparse on the sparse
// tensor cores. The packed A (16 x 16 bf16, row-major) is staged into shared
// memory by cp.async (one 16-byte piece per lane) and read back with one
// ldmatrix.x4 (quadrants (0,0), (1,0), (0,1), (1,1): the m16n8k32 A layout);
// B (row-major [32][8]) and the per-lane metadata registers come straight
// from global memory. Needs 512 bytes of dynamic shared memory.
template <Bug kBug>
__global__ void SparseTileGemm(const uint16_t* a_packed, const uint32_t* metadata,
                               const uint16_t* b, float* d) {
  const int l = simt::LaneId(), g = l >> 2, t = l & 3;
  Smem<uint16_t> tile = simt::DynamicSmem<uint16_t>(0);
  const int piece = kBug == Bug::kOutOfBounds && l == 31 ? 32 : l;
  simt::CpAsync<16>(tile + 8 * piece, a_packed + 8 * l);
  simt::CpAsyncCommit();
  if constexpr (kBug != Bug::kMissingWait) simt::CpAsyncWait<0>();
  simt::SyncThreads();
  const int quadrant = l / 8, row = l % 8 + 8 * (quadrant & 1), col = 8 * (quadrant >> 1);
  uint32_t a[4];
  simt::Ldmatrix<4>(a, tile + 16 * row + col);
  if constexpr (kBug == Bug::kSwappedFragment) {
    const uint32_t keep = a[1];
    a[1] = a[2];
    a[2] = keep;
  }
  uint32_t rb[4];
  for (int i = 0; i < 4; ++i) {
    const int k = 2 * t + 8 * i;
    rb[i] = static_cast<uint32_t>(b[8 * k + g]) | (static_cast<uint32_t>(b[8 * (k + 1) + g]) << 16);
  }
  const float c[4] = {0.f, 0.f, 0.f, 0.f};
  float acc[4];
  simt::MmaSpM16n8k32<MmaType::kBf16, 0>(acc, a, rb, c, metadata[l]);
  for (int j = 0; j < 4; ++j) d[8 * (g + 8 * (j >> 1)) + 2 * t + (j & 1)] = acc[j];
}

// out[0] = sum of x[0..blockDim.x): a shared-memory tree reduction with a
// barrier per level (blockDim.x a power of two, blockDim.x floats of shared
// memory).
template <Bug kBug>
__global__ void BlockSum(const float* x, float* out) {
  const int tid = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
  Smem<float> partial = simt::DynamicSmem<float>(0);
  partial[tid] = x[tid];
  if constexpr (kBug != Bug::kMissingBarrier) simt::SyncThreads();
  for (int stride = n / 2; stride > 0; stride /= 2) {
    if (tid < stride) partial[tid] = partial[tid] + partial[tid + stride];
    simt::SyncThreads();
  }
  if (tid == 0) out[0] = partial[0];
}

// Per lane l: out[3l..3l+2] = ballot, any and all of predicates over mask.
__global__ void VoteProbe(const int* predicates, unsigned mask, uint32_t* out) {
  const int l = simt::LaneId();
  if (((mask >> l) & 1u) == 0) return;
  const bool p = predicates[l] != 0;
  out[3 * l] = simt::Ballot(mask, p);
  out[3 * l + 1] = simt::Any(mask, p);
  out[3 * l + 2] = simt::All(mask, p);
}

// Lanes 16-31 leave before a full-warp shuffle that lanes 0-15 enter: a
// collective that can never complete.
__global__ void DivergedShuffle(uint32_t* out) {
  const int l = simt::LaneId();
  if (l >= 16) return;
  out[l] = simt::ShflXor(simt::kFullMask, static_cast<uint32_t>(l), 1);
}

// ---- block order (tests/cuda/test_emulator_block_order.py)

// The block's linear index, x fastest: what the emulator's block orders permute.
JAXSPARSE_DEV unsigned LinearBlock() {
  return blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
}

// counter's old value, incremented. simt.cuh has no atomics (no library kernel
// needs one), hence the #if here: emulated, blocks run one at a time on one OS
// thread and a fiber is switched out only at a barrier or a collective, so a
// plain increment is already atomic.
JAXSPARSE_DEV unsigned TakeTicket(unsigned* counter) {
#if defined(__CUDACC__)
  return atomicAdd(counter, 1u);
#else
  return (*counter)++;
#endif
}

// out[linear block] = the block's place in the order in which blocks started
// (*counter = 0 before the launch).
__global__ void BlockTickets(unsigned* counter, unsigned* out) {
  if (threadIdx.x == 0) out[LinearBlock()] = TakeTicket(counter);
}

// A race between blocks: each block stores its linear index to the one cell,
// as a reduction that stores its blocks' partial results where it should add
// them atomically. The cell ends up naming the block that ran last.
__global__ void LastWriter(unsigned* cell) {
  if (threadIdx.x == 0) *cell = LinearBlock();
}

// Block (bad_x, bad_y, bad_z) of a grid of one-warp blocks breaks a rule, the
// others do nothing: with kDeadlock, lanes 0-15 enter a full-warp shuffle that
// lanes 16-31 never reach; else lane 3 stores one element past the shared
// memory (blockDim.x words).
template <bool kDeadlock>
__global__ void FailInBlock(unsigned bad_x, unsigned bad_y, unsigned bad_z) {
  if (blockIdx.x != bad_x || blockIdx.y != bad_y || blockIdx.z != bad_z) return;
  const int l = simt::LaneId();
  if constexpr (kDeadlock) {
    if (l < 16) simt::ShflXor(simt::kFullMask, 0u, 1);
  } else if (l == 3) {
    simt::DynamicSmem<uint32_t>(0)[blockDim.x] = 0;
  }
}

}  // namespace jaxsparse::selftest

#endif  // JAXSPARSE_CUDA_EMU_SELFTEST_KERNELS_CUH_
