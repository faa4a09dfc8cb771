// The `_cuda_emu` extension: the SIMT emulator's self-test entry points
// (tests/cuda_emu, tests/cuda/test_emulator_block_order.py) and its block-order
// setting. Each entry point runs one of cuda/emu/selftest_kernels.cuh through
// the emulator on small host arrays; emulator errors surface as RuntimeError.
#include <nanobind/nanobind.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cuda/emu/emu.h"
#include "cpu/common/targets.h"
#include "cuda/emu/selftest_kernels.cuh"

namespace nb = nanobind;

namespace jaxsparse::selftest {
namespace {

constexpr size_t kLanes = 32;

template <class T>
void CheckSize(const std::vector<T>& v, size_t expected, const char* name) {
  if (v.size() != expected) {
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(expected) +
                                " elements, got " + std::to_string(v.size()));
  }
}

template <MmaType kType>
std::vector<float> RunMmaSp(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b,
                            const std::vector<float>& c, const std::vector<uint32_t>& meta,
                            int selector) {
  std::vector<float> d(4 * kLanes);
  if (selector == 0) {
    simt::Launch("MmaSpProbe", &MmaSpProbe<kType, 0>, dim3(32), dim3(32), 0, nullptr, a.data(),
                 b.data(), c.data(), meta.data(), d.data());
  } else {
    simt::Launch("MmaSpProbe", &MmaSpProbe<kType, 1>, dim3(32), dim3(32), 0, nullptr, a.data(),
                 b.data(), c.data(), meta.data(), d.data());
  }
  return d;
}

// One m16n8k32 mma.sp through the kernel helper (ordered metadata, selector 0
// or 1), or, with `raw`, straight through the emulator call so that the
// plain .sp form and invalid selectors can be tried.
std::vector<float> MmaSp(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b,
                         const std::vector<float>& c, const std::vector<uint32_t>& meta,
                         int selector, const std::string& dtype, bool ordered) {
  CheckSize(a, 4 * kLanes, "a");
  CheckSize(b, 4 * kLanes, "b");
  CheckSize(c, 4 * kLanes, "c");
  CheckSize(meta, kLanes, "metadata");
  if (dtype != "bfloat16" && dtype != "float16") {
    throw std::invalid_argument("dtype: expected 'bfloat16' or 'float16', got '" + dtype + "'");
  }
  const bool bf16 = dtype == "bfloat16";
  if (ordered && (selector == 0 || selector == 1)) {
    return bf16 ? RunMmaSp<MmaType::kBf16>(a, b, c, meta, selector)
                : RunMmaSp<MmaType::kF16>(a, b, c, meta, selector);
  }
  std::vector<float> d(4 * kLanes);
  emu::Launch("MmaSpRaw", dim3(1), dim3(32), 0, [&] {
    const int l = emu::LaneId();
    emu::MmaSpM16n8k32(bf16 ? emu::MmaType::kBf16 : emu::MmaType::kF16, ordered, &a[4 * l],
                       &b[4 * l], &c[4 * l], meta[l], selector, &d[4 * l]);
  });
  return d;
}

std::vector<float> Mma(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b,
                       const std::vector<float>& c, const std::string& dtype) {
  CheckSize(a, 4 * kLanes, "a");
  CheckSize(b, 2 * kLanes, "b");
  CheckSize(c, 4 * kLanes, "c");
  std::vector<float> d(4 * kLanes);
  if (dtype == "bfloat16") {
    simt::Launch("MmaProbe", &MmaProbe<MmaType::kBf16>, dim3(1), dim3(32), 0, nullptr, a.data(),
                 b.data(), c.data(), d.data());
  } else if (dtype == "float16") {
    simt::Launch("MmaProbe", &MmaProbe<MmaType::kF16>, dim3(1), dim3(32), 0, nullptr, a.data(),
                 b.data(), c.data(), d.data());
  } else {
    throw std::invalid_argument("dtype: expected 'bfloat16' or 'float16', got '" + dtype + "'");
  }
  return d;
}

// ---- per-thread instructions: n inputs, one thread each (blocks of 128).

constexpr unsigned kProbeBlock = 128;

dim3 ProbeGrid(size_t n) {
  return dim3(static_cast<unsigned>((n + kProbeBlock - 1) / kProbeBlock));
}

using ProbeKernel = void (*)(const uint32_t*, const uint32_t*, const uint32_t*, int, uint32_t*);

template <size_t... kImm>
constexpr std::array<ProbeKernel, 256> Lop3Kernels(std::index_sequence<kImm...>) {
  return {&Lop3Probe<static_cast<uint32_t>(kImm)>...};
}

void CheckOperands(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b,
                   const std::vector<uint32_t>& c) {
  if (a.empty()) throw std::invalid_argument("a: expected at least one register");
  CheckSize(b, a.size(), "b");
  CheckSize(c, a.size(), "c");
}

// out[i] = lop3.b32(a[i], b[i], c[i], imm), imm in 0..255.
std::vector<uint32_t> Lop3(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b,
                           const std::vector<uint32_t>& c, int imm) {
  CheckOperands(a, b, c);
  if (imm < 0 || imm > 255) {
    throw std::invalid_argument("imm: expected 0..255, got " + std::to_string(imm));
  }
  static constexpr std::array<ProbeKernel, 256> kKernels =
      Lop3Kernels(std::make_index_sequence<256>());
  std::vector<uint32_t> out(a.size());
  simt::Launch("Lop3Probe", kKernels[static_cast<size_t>(imm)], ProbeGrid(a.size()),
               dim3(kProbeBlock), 0, nullptr, a.data(), b.data(), c.data(),
               static_cast<int>(a.size()), out.data());
  return out;
}

template <MmaType kType>
ProbeKernel Packed16Kernel(const std::string& op) {
  if (op == "sub") return &Packed16Probe<kType, PackedOp::kSub>;
  if (op == "mul") return &Packed16Probe<kType, PackedOp::kMul>;
  if (op == "fma") return &Packed16Probe<kType, PackedOp::kFma>;
  throw std::invalid_argument("op: expected 'sub', 'mul' or 'fma', got '" + op + "'");
}

// out[i] = {sub, mul, fma}.rn.{f16x2, bf16x2} of a[i], b[i] (and c[i]).
std::vector<uint32_t> Packed16(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b,
                               const std::vector<uint32_t>& c, const std::string& op,
                               const std::string& dtype) {
  CheckOperands(a, b, c);
  ProbeKernel kernel;
  if (dtype == "bfloat16") {
    kernel = Packed16Kernel<MmaType::kBf16>(op);
  } else if (dtype == "float16") {
    kernel = Packed16Kernel<MmaType::kF16>(op);
  } else {
    throw std::invalid_argument("dtype: expected 'bfloat16' or 'float16', got '" + dtype + "'");
  }
  std::vector<uint32_t> out(a.size());
  simt::Launch("Packed16Probe", kernel, ProbeGrid(a.size()), dim3(kProbeBlock), 0, nullptr,
               a.data(), b.data(), c.data(), static_cast<int>(a.size()), out.data());
  return out;
}

template <int kNum, bool kTrans>
void RunLdmatrix(const std::vector<uint16_t>& rows, const std::vector<int>& row_of_lane,
                 std::vector<uint32_t>& out) {
  const int num_rows = static_cast<int>(rows.size() / 8);
  simt::Launch("LdmatrixProbe", &LdmatrixProbe<kNum, kTrans>, dim3(1), dim3(32),
               rows.size() * sizeof(uint16_t), nullptr, rows.data(), num_rows,
               row_of_lane.data(), out.data());
}

// rows: [R, 8] uint16 (16-byte rows); row_of_lane[l]: the row lane l names
// (may be out of range, to test the bounds check).
std::vector<uint32_t> Ldmatrix(const std::vector<uint16_t>& rows,
                               const std::vector<int>& row_of_lane, int num, bool trans) {
  if (rows.size() % 8 != 0 || rows.empty()) {
    throw std::invalid_argument("rows: expected a non-empty multiple of 8 uint16 values");
  }
  CheckSize(row_of_lane, kLanes, "row_of_lane");
  std::vector<uint32_t> out(static_cast<size_t>(num) * kLanes);
  if (num == 1) {
    trans ? RunLdmatrix<1, true>(rows, row_of_lane, out) : RunLdmatrix<1, false>(rows, row_of_lane, out);
  } else if (num == 2) {
    trans ? RunLdmatrix<2, true>(rows, row_of_lane, out) : RunLdmatrix<2, false>(rows, row_of_lane, out);
  } else if (num == 4) {
    trans ? RunLdmatrix<4, true>(rows, row_of_lane, out) : RunLdmatrix<4, false>(rows, row_of_lane, out);
  } else {
    throw std::invalid_argument("num: expected 1, 2 or 4, got " + std::to_string(num));
  }
  return out;
}

// Lanes whose bit is clear in `active` do not take part (they return 0).
std::vector<uint32_t> Shfl(const std::vector<uint32_t>& values, const std::vector<int>& args,
                           uint32_t mask, uint32_t active, int width, const std::string& mode) {
  CheckSize(values, kLanes, "values");
  CheckSize(args, kLanes, "args");
  emu::ShflMode m;
  if (mode == "idx") {
    m = emu::ShflMode::kIdx;
  } else if (mode == "up") {
    m = emu::ShflMode::kUp;
  } else if (mode == "down") {
    m = emu::ShflMode::kDown;
  } else if (mode == "xor") {
    m = emu::ShflMode::kXor;
  } else {
    throw std::invalid_argument("mode: expected idx, up, down or xor, got '" + mode + "'");
  }
  std::vector<uint32_t> out(kLanes, 0);
  emu::Launch("ShflProbe", dim3(1), dim3(32), 0, [&] {
    const int l = emu::LaneId();
    if ((active >> l) & 1u) out[l] = emu::Shfl(mask, values[l], args[l], width, m);
  });
  return out;
}

// [32, 3]: per lane (ballot, any, all) over the lanes of `mask`; 0 elsewhere.
std::vector<uint32_t> Votes(const std::vector<int>& predicates, uint32_t mask) {
  CheckSize(predicates, kLanes, "predicates");
  std::vector<uint32_t> out(3 * kLanes, 0);
  simt::Launch("VoteProbe", &VoteProbe, dim3(1), dim3(32), 0, nullptr, predicates.data(), mask,
               out.data());
  return out;
}

Bug ParseBug(const std::string& bug) {
  if (bug == "none") return Bug::kNone;
  if (bug == "missing_wait") return Bug::kMissingWait;
  if (bug == "missing_barrier") return Bug::kMissingBarrier;
  if (bug == "swapped_fragment") return Bug::kSwappedFragment;
  if (bug == "out_of_bounds") return Bug::kOutOfBounds;
  throw std::invalid_argument("bug: unknown planted bug '" + bug + "'");
}

// a_packed [16, 16] bf16 bits, metadata [32] (per lane), b [32, 8] bf16 bits
// -> d [16, 8] f32.
std::vector<float> SparseTile(const std::vector<uint16_t>& a_packed,
                              const std::vector<uint32_t>& metadata,
                              const std::vector<uint16_t>& b, const std::string& bug) {
  CheckSize(a_packed, 256, "a_packed");
  CheckSize(metadata, kLanes, "metadata");
  CheckSize(b, 256, "b");
  std::vector<float> d(128);
  auto run = [&](auto kernel) {
    simt::Launch("SparseTileGemm", kernel, dim3(1), dim3(32), 512, nullptr, a_packed.data(),
                 metadata.data(), b.data(), d.data());
  };
  switch (ParseBug(bug)) {
    case Bug::kNone:
      run(&SparseTileGemm<Bug::kNone>);
      break;
    case Bug::kMissingWait:
      run(&SparseTileGemm<Bug::kMissingWait>);
      break;
    case Bug::kSwappedFragment:
      run(&SparseTileGemm<Bug::kSwappedFragment>);
      break;
    case Bug::kOutOfBounds:
      run(&SparseTileGemm<Bug::kOutOfBounds>);
      break;
    case Bug::kMissingBarrier:
      throw std::invalid_argument("bug: sparse_tile has no missing_barrier variant");
  }
  return d;
}

float BlockSumOf(const std::vector<float>& x, const std::string& bug) {
  const size_t n = x.size();
  if (n == 0 || n > 1024 || (n & (n - 1)) != 0) {
    throw std::invalid_argument("x: expected a power-of-two length <= 1024, got " +
                                std::to_string(n));
  }
  float out = 0.f;
  const Bug b = ParseBug(bug);
  if (b == Bug::kNone) {
    simt::Launch("BlockSum", &BlockSum<Bug::kNone>, dim3(1), dim3(static_cast<unsigned>(n)),
                 n * sizeof(float), nullptr, x.data(), &out);
  } else if (b == Bug::kMissingBarrier) {
    simt::Launch("BlockSum", &BlockSum<Bug::kMissingBarrier>, dim3(1),
                 dim3(static_cast<unsigned>(n)), n * sizeof(float), nullptr, x.data(), &out);
  } else {
    throw std::invalid_argument("bug: block_sum has only none and missing_barrier");
  }
  return out;
}

void RunDivergedShuffle() {
  std::vector<uint32_t> out(kLanes);
  simt::Launch("DivergedShuffle", &DivergedShuffle, dim3(1), dim3(32), 0, nullptr, out.data());
}

// ---- block order

// A self-test grid (x, y, z): every extent at least 1, at most 2^22 blocks.
dim3 TestGrid(const std::array<unsigned, 3>& grid) {
  const uint64_t blocks = uint64_t{grid[0]} * grid[1] * grid[2];
  if (blocks == 0 || blocks > (uint64_t{1} << 22)) {
    throw std::invalid_argument("grid: expected extents >= 1 and at most 2^22 blocks, got (" +
                                std::to_string(grid[0]) + ", " + std::to_string(grid[1]) + ", " +
                                std::to_string(grid[2]) + ")");
  }
  return dim3(grid[0], grid[1], grid[2]);
}

// [blocks]: per linear block index (x fastest), its place in the order in
// which the launch's blocks started.
std::vector<unsigned> RunBlockTickets(const std::array<unsigned, 3>& grid) {
  const dim3 g = TestGrid(grid);
  std::vector<unsigned> out(static_cast<size_t>(g.x) * g.y * g.z);
  unsigned counter = 0;
  simt::Launch("BlockTickets", &BlockTickets, g, dim3(1), 0, nullptr, &counter, out.data());
  return out;
}

// The linear index of the block whose store to the racy cell came last.
unsigned RunLastWriter(const std::array<unsigned, 3>& grid) {
  unsigned cell = ~0u;
  simt::Launch("LastWriter", &LastWriter, TestGrid(grid), dim3(1), 0, nullptr, &cell);
  return cell;
}

// Raises the emulator's error for block `bad` (a deadlock or an out-of-bounds
// shared-memory store).
void RunFailInBlock(const std::array<unsigned, 3>& grid, const std::array<unsigned, 3>& bad,
                    bool deadlock) {
  const dim3 g = TestGrid(grid);
  const size_t smem = 32 * sizeof(uint32_t);
  if (deadlock) {
    simt::Launch("FailInBlock", &FailInBlock<true>, g, dim3(32), smem, nullptr, bad[0], bad[1],
                 bad[2]);
  } else {
    simt::Launch("FailInBlock", &FailInBlock<false>, g, dim3(32), smem, nullptr, bad[0], bad[1],
                 bad[2]);
  }
}

void SetBlockOrder(const std::string& order) { emu::SetBlockOrder(order, "order"); }

}  // namespace
}  // namespace jaxsparse::selftest

namespace {

// The emulated CUDA handlers, under their own names (jaxsparse_emu_*), as
// every format's .cu file registered them (cuda/ffi_target.h):
// jaxsparse/_ffi.py registers them for platform cpu, and the CPU lowerings
// call them instead of the CPU kernels when JAXSPARSE_EMULATE_CUDA=1.
nb::dict Registrations() {
  nb::dict targets;
  for (const jaxsparse::Target& target :
       jaxsparse::RegisteredTargets(jaxsparse::TargetModule::kCudaEmu)) {
    targets[target.name] = nb::capsule(target.handler);
  }
  return targets;
}

}  // namespace

NB_MODULE(_cuda_emu, m) {
  namespace st = jaxsparse::selftest;
  m.def("registrations", &Registrations,
        "Target name -> capsule of the emulated CUDA handlers (platform cpu).");
  m.doc() = "Self-test entry points of jaxsparse's SIMT emulator (CUDA kernels run on the CPU).";
  m.def("mma_sp", &st::MmaSp, nb::arg("a"), nb::arg("b"), nb::arg("c"), nb::arg("metadata"),
        nb::arg("selector"), nb::arg("dtype"), nb::arg("ordered") = true);
  m.def("mma", &st::Mma, nb::arg("a"), nb::arg("b"), nb::arg("c"), nb::arg("dtype"));
  m.def("ldmatrix", &st::Ldmatrix, nb::arg("rows"), nb::arg("row_of_lane"), nb::arg("num"),
        nb::arg("trans"));
  m.def("shfl", &st::Shfl, nb::arg("values"), nb::arg("args"), nb::arg("mask"),
        nb::arg("active"), nb::arg("width"), nb::arg("mode"));
  m.def("lop3", &st::Lop3, nb::arg("a"), nb::arg("b"), nb::arg("c"), nb::arg("imm"));
  m.def("packed16", &st::Packed16, nb::arg("a"), nb::arg("b"), nb::arg("c"), nb::arg("op"),
        nb::arg("dtype"));
  m.def("votes", &st::Votes, nb::arg("predicates"), nb::arg("mask"));
  m.def("sparse_tile", &st::SparseTile, nb::arg("a_packed"), nb::arg("metadata"), nb::arg("b"),
        nb::arg("bug") = "none");
  m.def("block_sum", &st::BlockSumOf, nb::arg("x"), nb::arg("bug") = "none");
  m.def("diverged_shuffle", &st::RunDivergedShuffle);
  m.def("launches", &jaxsparse::emu::Launches,
        "Kernel launches the emulator has run in this process.");
  m.def("set_block_order", &st::SetBlockOrder, nb::arg("order"),
        "Runs the blocks of every later launch in `order`: 'forward', 'reverse', 'shuffled' or "
        "'shuffled:<seed>' (a new permutation per launch; setting restarts their sequence). "
        "ValueError for any other value.");
  m.def("block_order", &jaxsparse::emu::BlockOrder,
        "The block order ('forward', 'reverse' or 'shuffled:<seed>'); by default "
        "JAXSPARSE_EMU_BLOCK_ORDER's value, else 'shuffled:0'.");
  m.def("block_tickets", &st::RunBlockTickets, nb::arg("grid"));
  m.def("last_writer", &st::RunLastWriter, nb::arg("grid"));
  m.def("fail_in_block", &st::RunFailInBlock, nb::arg("grid"), nb::arg("bad"),
        nb::arg("deadlock"));
}
