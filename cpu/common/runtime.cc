#include "cpu/common/runtime.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace ffi = xla::ffi;

namespace jaxsparse {
namespace cpu {
namespace {

// ------------------------------------------------------------- ParallelFor

struct ParallelState {
  std::atomic<int64_t> next{0};
  int64_t num_tasks = 0;
  void (*task)(void*, int64_t, int) = nullptr;
  void* ctx = nullptr;
  std::mutex mu;
  std::condition_variable idle;
  int started = 0;  // Helpers that joined; they are workers 1..started.
  int running = 0;  // Helpers still working.
  bool closed = false;
};

void Drain(ParallelState& s, int worker) {
  for (int64_t i = s.next.fetch_add(1, std::memory_order_relaxed);
       i < s.num_tasks; i = s.next.fetch_add(1, std::memory_order_relaxed)) {
    s.task(s.ctx, i, worker);
  }
}

int NumWorkers(ffi::ThreadPool& pool) {
  // The calling thread works too, so the pool's threads plus it would
  // oversubscribe the cores XLA sized its pool for: use as many workers as
  // pool threads, and at least one (the caller) when the pool reports none.
  const int64_t threads = pool.num_threads();
  return threads < 1 ? 1 : static_cast<int>(threads < 256 ? threads : 256);
}

void RunInline(int64_t num_tasks, void (*task)(void*, int64_t, int),
               void* ctx) {
  for (int64_t i = 0; i < num_tasks; ++i) task(ctx, i, 0);
}

// Runs every task on the calling thread and on helpers scheduled on XLA's
// intra-op pool. Deadlock-free even if the pool never runs a helper: the
// caller claims tasks from the same counter, and once none are left it closes
// the state and waits only for helpers that joined before that. A helper that
// starts later finds the state closed and returns without touching the
// caller's data (the state itself is shared-owned). Never throws: if memory
// for the state or a helper runs out, the caller does the remaining work.
void ParallelFor(void* pool_ptr, int64_t num_tasks,
                 void (*task)(void*, int64_t, int), void* ctx) {
  auto& pool = *static_cast<ffi::ThreadPool*>(pool_ptr);
  const int64_t helpers = std::min<int64_t>(NumWorkers(pool), num_tasks) - 1;
  std::shared_ptr<ParallelState> state;
  if (helpers > 0) {
    try {
      state = std::make_shared<ParallelState>();
    } catch (const std::bad_alloc&) {
    }
  }
  if (state == nullptr) return RunInline(num_tasks, task, ctx);
  state->num_tasks = num_tasks;
  state->task = task;
  state->ctx = ctx;
  try {
    for (int64_t h = 0; h < helpers; ++h) {
      pool.Schedule([state] {
        int worker;
        {
          std::lock_guard<std::mutex> lock(state->mu);
          if (state->closed) return;
          worker = ++state->started;
          ++state->running;
        }
        Drain(*state, worker);
        std::lock_guard<std::mutex> lock(state->mu);
        if (--state->running == 0) state->idle.notify_all();
      });
    }
  } catch (const std::bad_alloc&) {
  }
  Drain(*state, 0);
  std::unique_lock<std::mutex> lock(state->mu);
  state->closed = true;
  state->idle.wait(lock, [&] { return state->running == 0; });
}

AlignedPtr AllocateAligned(size_t bytes) {
  constexpr size_t kAlign = 64;
  const size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
  return AlignedPtr(static_cast<char*>(std::aligned_alloc(kAlign, rounded)));
}

// The L2 of one core, from glibc's reading of CPUID (sysconf), once.
int64_t L2Bytes() {
  static const int64_t bytes = [] {
    int64_t l2 = 0;
#if defined(__linux__) && defined(_SC_LEVEL2_CACHE_SIZE)
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return l2 > 0 ? l2 : int64_t{1} << 20;
  }();
  return bytes;
}

}  // namespace

void* CallScratch::Allocate(size_t bytes) {
  if (bytes > kKeepBytes) {
    owned_ = AllocateAligned(bytes);
    return owned_.get();
  }
  struct Cache {
    AlignedPtr data;
    size_t size = 0;
  };
  thread_local Cache cache;
  if (cache.size < bytes) {
    cache.data.reset();
    cache.data = AllocateAligned(bytes);
    cache.size = cache.data ? bytes : 0;
  }
  return cache.data.get();
}

Runtime MakeRuntime(ffi::ThreadPool& pool, CallScratch* scratch) {
  return Runtime{&ParallelFor, &pool, NumWorkers(pool), &CallScratch::Get,
                 scratch, L2Bytes()};
}

void AdviseHugePages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // Below a few huge pages the faults cost little, and the syscall would not.
  constexpr size_t kHugeResultBytes = size_t{4} << 20;
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  if (data == nullptr || bytes < kHugeResultBytes) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + bytes) & ~(kHugePage - 1);
  // Only whole huge pages inside the buffer: its neighbours keep theirs. A
  // refusal (THP off, an old kernel) just leaves the 4 KB pages.
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace cpu
}  // namespace jaxsparse
