// The SIMT emulator's runtime: launches, fibers, barriers, warp rendezvous,
// shared memory and cp.async queues. The warp instructions' arithmetic is in
// warp_math.cc. See emu.h for the model.
#include "cuda/emu/emu.h"

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <utility>
#include <vector>

#include "cuda/emu/warp_math.h"

namespace jaxsparse::emu {
namespace {

// A fiber's stack. The kernels keep fragments and small arrays in locals and
// the warp instructions' models run on the stack of the lane that completes
// them; 256 KB leaves room for AddressSanitizer's redzones too.
constexpr size_t kStackBytes = 256 * 1024;
constexpr int kWarpSize = 32;
constexpr size_t kSharedAlign = 128;
constexpr unsigned char kPoison = 0xff;  // NaN in f32, bf16 and f16.

enum class State { kRunnable, kBarrier, kCollective, kDone };

struct PendingCopy {
  unsigned char* dst;
  std::vector<unsigned char> bytes;  // Read at issue, zero-filled tail.
};

struct Thread {
  ucontext_t context;
  Dim3 idx;
  int linear = 0;
  State state = State::kRunnable;
  const char* waiting_at = "";
  std::vector<PendingCopy> open_group;
  std::vector<std::vector<PendingCopy>> committed;
  LaneResult result;  // Written by the lane that completes a collective.
};

// A warp collective some lanes have reached: the lanes of `mask` must all
// arrive with the same kind and parameters.
struct PendingCollective {
  Collective op;
  uint32_t arrived = 0;
  LaneInput inputs[kWarpSize];
};

struct Launcher {
  const char* name;
  Dim3 grid, block;
  size_t smem_bytes;
  const std::function<void()>* body;
  int threads_per_block;
  Dim3 block_idx;
  std::vector<Thread> threads;
  std::vector<std::vector<PendingCollective>> warps;
  int at_barrier = 0;
  int done = 0;
  std::unique_ptr<unsigned char[]> smem_storage;
  unsigned char* smem = nullptr;
  std::unique_ptr<unsigned char[]> stacks;
  ucontext_t scheduler;
  Thread* current = nullptr;
  std::string error;
};

thread_local Launcher* tls_launch = nullptr;
std::atomic<uint64_t> launches{0};

Launcher& Current(const char* what) {
  if (tls_launch == nullptr || tls_launch->current == nullptr) {
    throw Error(std::string("jaxsparse emulator: ") + what +
                " called outside a kernel launch");
  }
  return *tls_launch;
}

std::string Where(const Launcher& l, const Thread& t) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), "kernel %s, block (%u,%u,%u), thread (%u,%u,%u)",
                l.name, l.block_idx.x, l.block_idx.y, l.block_idx.z, t.idx.x,
                t.idx.y, t.idx.z);
  return buf;
}

// Parks the running thread and returns to the scheduler; returns when the
// scheduler runs it again.
void Park(Launcher& l, State state, const char* what) {
  Thread& t = *l.current;
  t.state = state;
  t.waiting_at = what;
  swapcontext(&t.context, &l.scheduler);
}

[[noreturn]] void FailThread(Launcher& l, const std::string& message) {
  Thread& t = *l.current;
  if (l.error.empty()) l.error = message + " (" + Where(l, t) + ")";
  t.state = State::kDone;
  // Never resumed: the launch is abandoned once an error is set.
  setcontext(&l.scheduler);
  __builtin_unreachable();
}

void ReleaseBarrierIfComplete(Launcher& l) {
  if (l.at_barrier == 0 || l.at_barrier + l.done < l.threads_per_block) return;
  for (Thread& t : l.threads) {
    if (t.state == State::kBarrier) t.state = State::kRunnable;
  }
  l.at_barrier = 0;
}

void FiberEntry() {
  Launcher& l = *tls_launch;
  (*l.body)();
  Thread& t = *l.current;
  t.state = State::kDone;
  // uc_link returns to the scheduler.
}

std::string DeadlockReport(const Launcher& l) {
  std::string report = "deadlock in kernel " + std::string(l.name) + ", block (" +
                       std::to_string(l.block_idx.x) + "," +
                       std::to_string(l.block_idx.y) + "," +
                       std::to_string(l.block_idx.z) + "):";
  int shown = 0;
  for (const Thread& t : l.threads) {
    if (t.state == State::kDone) continue;
    if (shown++ == 8) {
      report += " ...";
      break;
    }
    char buf[160];
    std::snprintf(buf, sizeof(buf), " thread (%u,%u,%u) waits at %s;", t.idx.x,
                  t.idx.y, t.idx.z, t.waiting_at);
    report += buf;
  }
  for (size_t w = 0; w < l.warps.size(); ++w) {
    for (const PendingCollective& p : l.warps[w]) {
      char buf[200];
      std::snprintf(buf, sizeof(buf),
                    " warp %zu: %s with mask 0x%08x has lanes 0x%08x, missing "
                    "0x%08x;",
                    w, CollectiveName(p.op.kind), p.op.mask, p.arrived,
                    p.op.mask & ~p.arrived);
      report += buf;
    }
  }
  return report + " (a barrier or warp collective that some threads never reach)";
}

void RunBlock(Launcher& l) {
  std::memset(l.smem, kPoison, l.smem_bytes);
  l.at_barrier = 0;
  l.done = 0;
  for (auto& w : l.warps) w.clear();
  for (int i = 0; i < l.threads_per_block; ++i) {
    Thread& t = l.threads[i];
    t.state = State::kRunnable;
    t.waiting_at = "";
    t.open_group.clear();
    t.committed.clear();
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = l.stacks.get() + static_cast<size_t>(i) * kStackBytes;
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = &l.scheduler;
    makecontext(&t.context, FiberEntry, 0);
  }
  while (l.done < l.threads_per_block) {
    bool progress = false;
    for (Thread& t : l.threads) {
      if (t.state != State::kRunnable) continue;
      progress = true;
      l.current = &t;
      swapcontext(&l.scheduler, &t.context);
      l.current = nullptr;
      if (!l.error.empty()) return;
      if (t.state == State::kDone) {
        ++l.done;
        ReleaseBarrierIfComplete(l);
      }
    }
    if (!progress) {
      l.error = DeadlockReport(l);
      return;
    }
  }
}

// ---------------------------------------------------------------- block order

enum class OrderKind { kForward, kReverse, kShuffled };

constexpr char kOrderVariable[] = "JAXSPARSE_EMU_BLOCK_ORDER";

struct OrderSetting {
  OrderKind kind = OrderKind::kShuffled;
  uint64_t seed = 0;
  uint64_t launches = 0;  // Shuffled launches since the order was set.
  std::string error;      // A bad JAXSPARSE_EMU_BLOCK_ORDER until one is set.
};

// "forward", "reverse", "shuffled" or "shuffled:<seed>" (decimal uint64).
std::optional<OrderSetting> ParseOrder(const std::string& text) {
  OrderSetting setting;
  if (text == "forward" || text == "reverse") {
    setting.kind =
        text == "forward" ? OrderKind::kForward : OrderKind::kReverse;
    return setting;
  }
  if (text == "shuffled") return setting;
  const std::string prefix = "shuffled:";
  if (text.compare(0, prefix.size(), prefix) != 0) return std::nullopt;
  const char* first = text.data() + prefix.size();
  const char* last = text.data() + text.size();
  const auto [end, status] = std::from_chars(first, last, setting.seed);
  if (status != std::errc() || end != last) return std::nullopt;
  return setting;
}

std::string BadOrder(const std::string& what, const std::string& text) {
  return what +
         ": expected 'forward', 'reverse', 'shuffled' or 'shuffled:<seed>' "
         "(seed a decimal integer in [0, 2^64)), got '" +
         text + "'";
}

// The default order, from the environment (unset or empty: shuffled, seed 0).
// A bad value is kept as an error rather than thrown: the first use may be a
// kernel launch inside an XLA handler, and the module's import would turn an
// exception into an ImportError that jaxsparse/_ffi.py reads as "not built".
OrderSetting FromEnvironment() {
  const char* value = std::getenv(kOrderVariable);
  if (value == nullptr || *value == '\0') return OrderSetting{};
  if (std::optional<OrderSetting> parsed = ParseOrder(value)) return *parsed;
  OrderSetting bad;
  bad.error = BadOrder(kOrderVariable, value);
  return bad;
}

// Launches may run on several threads at once (XLA runs independent ops of a
// program concurrently); the mutex guards the setting.
std::mutex order_mutex;

// The caller holds order_mutex. The environment is read once, at first use.
OrderSetting& Setting() {
  static OrderSetting setting = FromEnvironment();
  return setting;
}

std::string Describe(const OrderSetting& setting) {
  switch (setting.kind) {
    case OrderKind::kForward:
      return "forward";
    case OrderKind::kReverse:
      return "reverse";
    case OrderKind::kShuffled:
      break;
  }
  return "shuffled:" + std::to_string(setting.seed);
}

// SplitMix64 (Steele, Lea and Flood, 2014): one addition and a mixing function
// per draw. Unlike std::uniform_int_distribution, its draws are the same under
// every standard library, so a seed names the same permutations everywhere.
uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15u);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
  return z ^ (z >> 31);
}

// A draw in [0, bound): the high word of draw * bound (Lemire, 2019), whose
// bias, below bound / 2^64, cannot matter to a test order.
uint64_t Below(uint64_t bound, uint64_t& state) {
  const __uint128_t product =
      static_cast<__uint128_t>(SplitMix64(state)) * bound;
  return static_cast<uint64_t>(product >> 64);
}

// Fisher-Yates over the linear indices: one draw and one swap per block, so a
// grid of a million blocks costs ~70 ms, a tenth of running a million blocks
// of one thread.
std::vector<uint64_t> Permutation(uint64_t blocks, uint64_t seed,
                                  uint64_t launch) {
  std::vector<uint64_t> order(blocks);
  std::iota(order.begin(), order.end(), uint64_t{0});
  // The launch number is mixed in: two launches whose states were a few steps
  // of the generator apart would draw the same numbers, shifted.
  uint64_t state = seed ^ SplitMix64(launch);
  for (uint64_t i = blocks; i > 1; --i) {
    std::swap(order[i - 1], order[Below(i, state)]);
  }
  return order;
}

// The blocks of one launch in the set order: At(step) is the linear index (x
// fastest, then y, then z) of the block to run at that step.
class BlockSequence {
 public:
  explicit BlockSequence(uint64_t blocks) : blocks_(blocks) {
    uint64_t seed, launch;
    {
      std::lock_guard<std::mutex> lock(order_mutex);
      OrderSetting& setting = Setting();
      if (!setting.error.empty()) {
        throw std::invalid_argument(setting.error);
      }
      kind_ = setting.kind;
      seed = setting.seed;
      launch = kind_ == OrderKind::kShuffled ? setting.launches++ : 0;
    }
    if (kind_ == OrderKind::kShuffled) {
      permutation_ = Permutation(blocks, seed, launch);
    }
  }

  uint64_t At(uint64_t step) const {
    switch (kind_) {
      case OrderKind::kForward:
        return step;
      case OrderKind::kReverse:
        return blocks_ - 1 - step;
      case OrderKind::kShuffled:
        break;
    }
    return permutation_[step];
  }

 private:
  uint64_t blocks_;
  OrderKind kind_;
  std::vector<uint64_t> permutation_;  // Shuffled only.
};

Dim3 BlockAt(Dim3 grid, uint64_t linear) {
  return Dim3{static_cast<unsigned>(linear % grid.x),
              static_cast<unsigned>(linear / grid.x % grid.y),
              static_cast<unsigned>(linear / grid.x / grid.y)};
}

}  // namespace

void SetBlockOrder(const std::string& order, const std::string& what) {
  std::optional<OrderSetting> parsed = ParseOrder(order);
  if (!parsed) throw std::invalid_argument(BadOrder(what, order));
  std::lock_guard<std::mutex> lock(order_mutex);
  Setting() = *parsed;
}

std::string BlockOrder() {
  std::lock_guard<std::mutex> lock(order_mutex);
  const OrderSetting& setting = Setting();
  if (!setting.error.empty()) throw std::invalid_argument(setting.error);
  return Describe(setting);
}

uint64_t Launches() { return launches.load(std::memory_order_relaxed); }

void Launch(const char* name, Dim3 grid, Dim3 block, size_t dynamic_smem,
            const std::function<void()>& body) {
  if (tls_launch != nullptr) throw Error("jaxsparse emulator: nested launch");
  launches.fetch_add(1, std::memory_order_relaxed);
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64) {
    throw Error(std::string("jaxsparse emulator: kernel ") + name +
                ": invalid block size " + std::to_string(threads));
  }
  if (grid.y > 65535 || grid.z > 65535) {
    throw Error(std::string("jaxsparse emulator: kernel ") + name +
                ": grid.y and grid.z must be <= 65535");
  }
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  const BlockSequence sequence(blocks);
  Launcher l;
  l.name = name;
  l.grid = grid;
  l.block = block;
  l.smem_bytes = dynamic_smem;
  l.body = &body;
  l.threads_per_block = static_cast<int>(threads);
  l.threads.resize(threads);
  l.warps.resize((threads + kWarpSize - 1) / kWarpSize);
  for (unsigned z = 0, i = 0; z < block.z; ++z)
    for (unsigned y = 0; y < block.y; ++y)
      for (unsigned x = 0; x < block.x; ++x, ++i) {
        l.threads[i].idx = Dim3{x, y, z};
        l.threads[i].linear = static_cast<int>(i);
      }
  l.smem_storage.reset(new unsigned char[dynamic_smem + kSharedAlign]);
  l.smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(l.smem_storage.get()) + kSharedAlign - 1) &
      ~uintptr_t{kSharedAlign - 1});
  l.stacks.reset(new unsigned char[threads * kStackBytes]);
  tls_launch = &l;
  for (uint64_t step = 0; step < blocks && l.error.empty(); ++step) {
    l.block_idx = BlockAt(grid, sequence.At(step));
    RunBlock(l);
  }
  tls_launch = nullptr;
  if (!l.error.empty()) throw Error("jaxsparse emulator: " + l.error);
}

Dim3 ThreadIdx() { return Current("threadIdx").current->idx; }
Dim3 BlockIdx() { return Current("blockIdx").block_idx; }
Dim3 BlockDim() { return Current("blockDim").block; }
Dim3 GridDim() { return Current("gridDim").grid; }
int LaneId() { return Current("laneid").current->linear % kWarpSize; }

void Fail(const char* format, ...) {
  char buf[512];
  va_list args;
  va_start(args, format);
  std::vsnprintf(buf, sizeof(buf), format, args);
  va_end(args);
  if (tls_launch == nullptr || tls_launch->current == nullptr) {
    throw Error(std::string("jaxsparse emulator: ") + buf);
  }
  FailThread(*tls_launch, buf);
}

void SyncThreads() {
  Launcher& l = Current("__syncthreads");
  ++l.at_barrier;
  l.current->state = State::kBarrier;
  if (l.at_barrier + l.done == l.threads_per_block) {
    ReleaseBarrierIfComplete(l);
    return;
  }
  Park(l, State::kBarrier, "__syncthreads");
}

unsigned char* SharedBase() { return Current("shared memory").smem; }
size_t SharedBytes() { return Current("shared memory").smem_bytes; }

void CheckShared(const void* p, size_t bytes, size_t align, const char* what) {
  Launcher& l = Current(what);
  const auto addr = reinterpret_cast<uintptr_t>(p);
  const auto base = reinterpret_cast<uintptr_t>(l.smem);
  if (addr < base || addr + bytes > base + l.smem_bytes || addr + bytes < addr) {
    Fail("%s: shared-memory access of %zu bytes at offset %lld is outside the "
         "block's %zu bytes of shared memory",
         what, bytes, static_cast<long long>(addr - base), l.smem_bytes);
  }
  if ((addr - base) % align != 0) {
    Fail("%s: shared-memory offset %llu is not a multiple of %zu", what,
         static_cast<unsigned long long>(addr - base), align);
  }
}

// ---------------------------------------------------------------- collectives

namespace {

// This lane's part of a collective: deposits its input, and either completes
// the collective (the last lane to arrive computes every lane's result) or
// parks until the last lane does. Returns this lane's result.
const LaneResult& Arrive(const Collective& op, const LaneInput& input) {
  Launcher& l = Current(CollectiveName(op.kind));
  Thread& self = *l.current;
  const int lane = self.linear % kWarpSize;
  const int warp = self.linear / kWarpSize;
  const uint32_t bit = 1u << lane;
  if ((op.mask & bit) == 0) {
    Fail("%s: the calling lane %d is not in the mask 0x%08x",
         CollectiveName(op.kind), lane, op.mask);
  }
  const int lanes_in_warp =
      std::min(kWarpSize, l.threads_per_block - warp * kWarpSize);
  const uint32_t existing =
      lanes_in_warp == kWarpSize ? ~0u : (1u << lanes_in_warp) - 1;
  if ((op.mask & ~existing) != 0) {
    Fail("%s: mask 0x%08x names lanes this warp does not have (it has %d)",
         CollectiveName(op.kind), op.mask, lanes_in_warp);
  }
  std::vector<PendingCollective>& pending = l.warps[warp];
  PendingCollective* slot = nullptr;
  for (PendingCollective& p : pending) {
    if (p.op.mask & bit) {
      slot = &p;
      break;
    }
    if (p.op.mask & op.mask) {
      Fail("%s with mask 0x%08x overlaps a pending %s with mask 0x%08x",
           CollectiveName(op.kind), op.mask, CollectiveName(p.op.kind),
           p.op.mask);
    }
  }
  if (slot == nullptr) {
    pending.push_back(PendingCollective{op, 0, {}});
    slot = &pending.back();
  } else if (!SameCollective(slot->op, op)) {
    Fail("lanes of a warp disagree: lane %d calls %s (mask 0x%08x) while lanes "
         "0x%08x wait at %s (mask 0x%08x)",
         lane, CollectiveName(op.kind), op.mask, slot->arrived,
         CollectiveName(slot->op.kind), slot->op.mask);
  }
  slot->inputs[lane] = input;
  slot->arrived |= bit;
  if (slot->arrived != slot->op.mask) {
    Park(l, State::kCollective, CollectiveName(op.kind));
    return self.result;
  }
  LaneResult results[kWarpSize];
  const PendingCollective done = *slot;
  pending.erase(pending.begin() + (slot - pending.data()));
  Compute(done.op, done.inputs, results);
  for (int i = 0; i < kWarpSize; ++i) {
    if ((done.op.mask >> i) & 1u) {
      Thread& t = l.threads[warp * kWarpSize + i];
      t.result = results[i];
      if (&t != &self) t.state = State::kRunnable;
    }
  }
  return self.result;
}

}  // namespace

uint32_t Shfl(uint32_t mask, uint32_t value, int lane_arg, int width,
              ShflMode mode) {
  if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0) {
    Fail("shfl: width %d is not a power of two in [1, 32]", width);
  }
  Collective op{CollectiveKind::kShfl, mask};
  op.params[0] = width;
  op.params[1] = static_cast<int>(mode);
  LaneInput in{};
  in.u[0] = value;
  in.arg = lane_arg;
  return Arrive(op, in).u[0];
}

uint32_t Ballot(uint32_t mask, bool predicate) {
  LaneInput in{};
  in.arg = predicate ? 1 : 0;
  return Arrive(Collective{CollectiveKind::kBallot, mask}, in).u[0];
}

void Ldmatrix(int num, bool trans, const void* row_address, uint32_t* out) {
  if (num != 1 && num != 2 && num != 4) Fail("ldmatrix: .x%d is not x1, x2 or x4", num);
  const int lane = LaneId();
  if (lane < 8 * num) CheckShared(row_address, 16, 16, "ldmatrix row address");
  Collective op{CollectiveKind::kLdmatrix, ~0u};
  op.params[0] = num;
  op.params[1] = trans ? 1 : 0;
  LaneInput in{};
  in.ptr = row_address;
  const LaneResult& r = Arrive(op, in);
  for (int i = 0; i < num; ++i) out[i] = r.u[i];
}

void MmaM16n8k16(MmaType type, const uint32_t* a, const uint32_t* b,
                 const float* c, float* d) {
  Collective op{CollectiveKind::kMma, ~0u};
  op.params[0] = static_cast<int>(type);
  LaneInput in{};
  for (int i = 0; i < 4; ++i) in.u[i] = a[i];
  for (int i = 0; i < 2; ++i) in.u[4 + i] = b[i];
  for (int i = 0; i < 4; ++i) in.f[i] = c[i];
  const LaneResult& r = Arrive(op, in);
  for (int i = 0; i < 4; ++i) d[i] = r.f[i];
}

void MmaSpM16n8k32(MmaType type, bool ordered_metadata, const uint32_t* a,
                   const uint32_t* b, const float* c, uint32_t metadata,
                   int selector, float* d) {
  if (selector != 0 && selector != 1) {
    Fail("mma.sp m16n8k32: sparsity selector %d is not 0 or 1", selector);
  }
  Collective op{CollectiveKind::kMmaSp, ~0u};
  op.params[0] = static_cast<int>(type);
  op.params[1] = ordered_metadata ? 1 : 0;
  op.params[2] = selector;
  LaneInput in{};
  for (int i = 0; i < 4; ++i) in.u[i] = a[i];
  for (int i = 0; i < 4; ++i) in.u[4 + i] = b[i];
  for (int i = 0; i < 4; ++i) in.f[i] = c[i];
  in.u[8] = metadata;
  const LaneResult& r = Arrive(op, in);
  for (int i = 0; i < 4; ++i) d[i] = r.f[i];
}

// ---------------------------------------------------------------- cp.async

void CpAsync(void* shared_dst, const void* global_src, int bytes, int src_bytes) {
  Launcher& l = Current("cp.async");
  if (bytes != 4 && bytes != 8 && bytes != 16) {
    Fail("cp.async: cp-size %d is not 4, 8 or 16", bytes);
  }
  if (src_bytes < 0 || src_bytes > bytes) {
    Fail("cp.async: src-size %d is outside [0, %d]", src_bytes, bytes);
  }
  CheckShared(shared_dst, bytes, bytes, "cp.async destination");
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(global_src) % bytes != 0) {
    Fail("cp.async: global source is not aligned to %d bytes", bytes);
  }
  PendingCopy copy{static_cast<unsigned char*>(shared_dst),
                   std::vector<unsigned char>(bytes, 0)};
  if (src_bytes > 0) std::memcpy(copy.bytes.data(), global_src, src_bytes);
  l.current->open_group.push_back(std::move(copy));
}

void CpAsyncCommit() {
  Thread& t = *Current("cp.async.commit_group").current;
  t.committed.push_back(std::move(t.open_group));
  t.open_group.clear();
}

void CpAsyncWait(int n) {
  Thread& t = *Current("cp.async.wait_group").current;
  if (n < 0) Fail("cp.async.wait_group: n = %d is negative", n);
  while (static_cast<int>(t.committed.size()) > n) {
    for (const PendingCopy& c : t.committed.front()) {
      std::memcpy(c.dst, c.bytes.data(), c.bytes.size());
    }
    t.committed.erase(t.committed.begin());
  }
}

}  // namespace jaxsparse::emu
