// The SIMT emulator: runs jaxsparse's CUDA kernels, compiled as host C++, on
// the CPU (docs/simt_emulator.md). cuda/simt.cuh calls into it when it is not
// compiled by nvcc; kernels never include this header themselves.
//
// Model. A launch runs its blocks one after another on the calling OS thread,
// in the order SetBlockOrder chose: by default a different pseudo-random
// permutation per launch, so that a kernel whose blocks race (one reads what
// another writes, two write one output without atomics) can give a wrong or
// varying result. The threads of a block are fibers (ucontext) scheduled
// round-robin: a thread runs until it reaches a barrier, a warp collective or
// its end, then the next one runs. So a block of 256 threads costs 256 small
// stacks, not 256 OS threads, and a run is deterministic for a given order.
//
// Strictness. Everything the PTX ISA leaves undefined and a kernel could
// trip over is an error (emu::Error, raised by Launch), never a quiet result:
// a deadlock (a barrier or collective some thread never reaches), lanes of a
// warp disagreeing on a collective (kind, mask, shape), an invalid mma.sp
// metadata code or selector, a shared-memory access outside the launch's
// dynamic shared memory or misaligned, a shuffle from a lane outside the mask.
// Fresh shared memory is poisoned with 0xff bytes (NaN in f32, bf16 and f16),
// and cp.async data lands only at the cp.async.wait_group that covers it, so
// a kernel that reads too early reads NaNs.
#ifndef JAXSPARSE_CUDA_EMU_EMU_H_
#define JAXSPARSE_CUDA_EMU_EMU_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>

namespace jaxsparse::emu {

struct Dim3 {
  unsigned x, y, z;
  constexpr Dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1)
      : x(x_), y(y_), z(z_) {}
};

// What Launch raises when a kernel breaks a rule; the message names the
// kernel, the block and the thread.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Runs body() once per thread of every block, the blocks in the set order
// (SetBlockOrder). `name` labels errors. Raises Error (after tearing the
// launch down) when a thread fails a check.
void Launch(const char* name, Dim3 grid, Dim3 block, size_t dynamic_smem,
            const std::function<void()>& body);

// The order in which Launch runs a grid's blocks:
// - "forward": by linear index, x fastest, then y, then z;
// - "reverse": the same backwards;
// - "shuffled:<seed>" ("shuffled" is seed 0): a pseudo-random permutation of
//   the grid's blocks, a different one per launch, drawn from the seed and the
//   launch's number since the order was set (so setting an order restarts its
//   sequence of permutations).
// The default is JAXSPARSE_EMU_BLOCK_ORDER's value, read at the first use of
// the order ("shuffled:0" when it is unset or empty). For any other value,
// throws std::invalid_argument naming `what` (the argument), order unchanged.
void SetBlockOrder(const std::string& order, const std::string& what);
// The current order in SetBlockOrder's form ("shuffled:<seed>" with its seed).
// Throws std::invalid_argument, as Launch does, while JAXSPARSE_EMU_BLOCK_ORDER
// holds a bad value and no order has been set.
std::string BlockOrder();

// Kernel launches this process has run (each grid once; failed launches
// included): the tests read it to tell which of them ran an emulated kernel.
uint64_t Launches();

// Inside a running thread.
Dim3 ThreadIdx();
Dim3 BlockIdx();
Dim3 BlockDim();
Dim3 GridDim();
int LaneId();

// Fails the running thread with a formatted message (printf-style). Never
// returns: the launch stops and Launch raises Error.
[[noreturn]] void Fail(const char* format, ...)
    __attribute__((format(printf, 1, 2)));

// __syncthreads(): parks until every thread of the block that has not exited
// arrives.
void SyncThreads();

// Dynamic shared memory of the running block.
unsigned char* SharedBase();
size_t SharedBytes();
// Fails unless [p, p + bytes) lies in the block's shared memory and p is a
// multiple of `align`. `what` names the access in the message.
void CheckShared(const void* p, size_t bytes, size_t align, const char* what);

// ---- warp collectives (all lanes named by `mask` must call with the same
// mask and the same arguments where the ISA requires it)
enum class ShflMode { kIdx, kUp, kDown, kXor };
uint32_t Shfl(uint32_t mask, uint32_t value, int lane_arg, int width,
              ShflMode mode);
uint32_t Ballot(uint32_t mask, bool predicate);

// ldmatrix.sync.aligned.m8n8.x{num}{.trans}.shared.b16: this lane's row
// address (lanes 0..8*num-1 give one each), its `num` result registers.
void Ldmatrix(int num, bool trans, const void* row_address, uint32_t* out);

enum class MmaType { kBf16, kF16 };
// mma.sync.aligned.m16n8k16.row.col.f32.{type}.{type}.f32: per lane a[4],
// b[2], c[4] -> d[4] (PTX ISA fragment layouts).
void MmaM16n8k16(MmaType type, const uint32_t* a, const uint32_t* b,
                 const float* c, float* d);
// mma.sp{::ordered_metadata}.sync.aligned.m16n8k32.row.col.f32.{type}.{type}.f32:
// per lane a[4] (the packed 16x16 A), b[4], c[4], the metadata register and
// the selector (0 or 1) -> d[4].
void MmaSpM16n8k32(MmaType type, bool ordered_metadata, const uint32_t* a,
                   const uint32_t* b, const float* c, uint32_t metadata,
                   int selector, float* d);

// ---- cp.async: copies are read at issue and land at the wait covering them
// cp.async.{ca,cg}.shared.global [dst], [src], bytes, src_bytes: src_bytes
// (<= bytes) are copied, the rest of the bytes are zero-filled.
void CpAsync(void* shared_dst, const void* global_src, int bytes,
             int src_bytes);
void CpAsyncCommit();
// cp.async.wait_group n: lands every committed group but the newest n.
void CpAsyncWait(int n);

// ---- per-thread instructions (no rendezvous: plain functions of registers)
// lop3.b32 d, a, b, c, imm: bit i of d is bit ((a_i << 2) | (b_i << 1) | c_i)
// of the truth table imm.
uint32_t Lop3(uint32_t a, uint32_t b, uint32_t c, uint32_t imm);

// {sub, mul, fma}.rn.{f16x2, bf16x2} on registers holding two 16-bit floats
// (element 0 in bits 0-15): each element computed exactly and rounded once
// to the 16-bit type, to nearest even; subnormals kept (no .ftz), signed
// zeros as IEEE 754, a NaN result is the canonical NaN 0x7fff.
// kSub: a - b; kMul: a * b; kFma: a * b + c (c unused otherwise).
enum class PackedOp { kSub, kMul, kFma };
uint32_t Packed16(MmaType type, PackedOp op, uint32_t a, uint32_t b,
                  uint32_t c);

}  // namespace jaxsparse::emu

#endif  // JAXSPARSE_CUDA_EMU_EMU_H_
