#include "cpu/common/runtime.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <thread>

#if defined(__linux__)
#include <pthread.h>
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

// ------------------------------------------------------------- HelperPool

// Why the kernels keep helper threads of their own: a model runs one small
// product after another (MiniLM at 17 tokens: 36 products of 40-130 us, with
// XLA's small ops between them). Scheduled on XLA's pool, each call's helper
// wakes an Eigen worker, which spins looking for more work once it is done;
// with the thread that runs XLA's program, that is three busy threads on two
// cores, and the chain ran no faster with the helper than without it
// (measured on a 2-core Zen 4, jax 0.12: MiniLM's 36 int4 products at 17
// tokens, 3.94 ms per forward with the helper, 4.07 ms on the caller alone;
// 2.7-3.2 ms with these helpers, 3.6-3.9 ms without them, in alternating
// runs). These helpers wait for the next job for kSpinMicros after each one,
// yielding the core to any other runnable thread while they wait, and then
// sleep: the next call of a chain finds them awake, and nothing else is
// woken. A job takes them when they are awake and its kind (its task
// function and task count) ran faster on them than on XLA's pool the last
// times it ran on each; otherwise it runs as before, on XLA's pool.
class HelperPool {
 public:
  // The process's pool, made with `helpers` threads on first use (and again
  // in a forked child, which inherits no threads); null without memory.
  static HelperPool* Get(int helpers);

  // Runs the tasks on the caller (worker 0) and the helpers that join before
  // the tasks run out; returns false, having run nothing, when the helpers
  // sleep or another call holds the pool.
  bool TryRun(int64_t num_tasks, void (*task)(void*, int64_t, int), void* ctx);

  // After a job that ran on XLA's pool and took `took`: times its kind there,
  // and a short one wakes the helpers to wait kSpinMicros for the next (a
  // chain's next call finds them awake).
  void Finished(int64_t num_tasks, void (*task)(void*, int64_t, int),
                std::chrono::steady_clock::duration took);

  int helpers() const { return helpers_; }

 private:
  static constexpr int64_t kSpinMicros = 200;
  // After a job shorter than this the helpers are woken for the next one.
  static constexpr int64_t kLongJobMicros = 1000;
  // Which pool a job takes is measured per kind of job, because neither is
  // faster everywhere: a chain of short products gains by these helpers, but
  // beside XLA's own parallel ops (whose Eigen workers spin after them) jobs
  // took about twice their time here, short ones too (2-core Zen 5, jax
  // 0.12.1, 1440 tokens: a 2:4 product 7.8 ms here, 3.7 ms there; its pack
  // of x 0.49 ms, 0.19 ms). Rules by duration did not hold: "the last job was
  // short" sent every long product of a chain here after its call's short
  // pack (MiniLM's 2:4 projections with a GELU between: 62.6 ms a forward,
  // 48.9 ms with every job on XLA's pool, dense 48.2 ms), and any threshold
  // is one machine's. So each kind keeps a running time on each pool (its
  // first job here, its next there), takes the faster, and every
  // kExploreEvery-th job (kExploreRarely-th when one pool took 1.5x the
  // other's time) takes the other to follow a change. A direct-mapped table:
  // a kind that collides starts over.
  static constexpr int kKinds = 256;
  static constexpr uint32_t kExploreEvery = 32;
  static constexpr uint32_t kExploreRarely = 512;  // when one pool is 1.5x the other
  struct KindTimes {
    std::atomic<uint64_t> key{0};
    std::atomic<uint32_t> own_us{0}, xla_us{0};  // running times; 0: not yet timed
    std::atomic<uint32_t> jobs{0};
  };
  static uint64_t Kind(int64_t num_tasks, void (*task)(void*, int64_t, int));
  KindTimes& Times(uint64_t kind) { return kinds_[(kind >> 40) % kKinds]; }
  bool PreferHelpers(uint64_t kind);
  void Record(uint64_t kind, bool on_helpers, std::chrono::steady_clock::duration took);
  explicit HelperPool(int helpers) : helpers_(helpers) {}
  void Work(int worker);
  void Drain(int worker);

  const int helpers_;
  std::atomic<bool> busy_{false};     // a caller holds the pool
  std::atomic<int> sleeping_{0};      // helpers asleep (changed under mu_)
  KindTimes kinds_[kKinds];
  std::atomic<bool> open_{false};     // the current job takes helpers
  std::atomic<int> active_{0};        // helpers inside the current job
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> next_{0};
  int64_t num_tasks_ = 0;
  void (*task_)(void*, int64_t, int) = nullptr;
  void* ctx_ = nullptr;
  std::mutex mu_;
  std::condition_variable wake_;
};

void HelperPool::Drain(int worker) {
  for (int64_t i = next_.fetch_add(1); i < num_tasks_; i = next_.fetch_add(1)) {
    task_(ctx_, i, worker);
  }
}

void HelperPool::Work(int worker) {
#if defined(__linux__)
  pthread_setname_np(pthread_self(), "jaxsparse-help");  // Named in top, perf and gdb.
#endif
  uint64_t seen = generation_.load();
  for (;;) {
    const auto spin_until =
        std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
    while (generation_.load() == seen) {
      if (std::chrono::steady_clock::now() < spin_until) {
        std::this_thread::yield();
        continue;
      }
      std::unique_lock<std::mutex> lock(mu_);
      sleeping_.fetch_add(1);
      wake_.wait(lock, [&] { return generation_.load() != seen; });
      sleeping_.fetch_sub(1);
    }
    seen = generation_.load();
    // Join only a job still open: its caller waits for the helpers that
    // joined, and for no other.
    active_.fetch_add(1);
    if (open_.load()) Drain(worker);
    active_.fetch_sub(1);
  }
}

uint64_t HelperPool::Kind(int64_t num_tasks, void (*task)(void*, int64_t, int)) {
  const uint64_t mixed = (reinterpret_cast<uintptr_t>(task) ^
                          static_cast<uint64_t>(num_tasks) * 0x9E3779B97F4A7C15ull) *
                         0xBF58476D1CE4E5B9ull;
  return mixed | 1;  // Never 0, an empty slot's key.
}

// Relaxed atomics throughout: concurrent callers may mix their updates of a
// slot, which only misplaces a job, never a result.
bool HelperPool::PreferHelpers(uint64_t kind) {
  KindTimes& t = Times(kind);
  if (t.key.load(std::memory_order_relaxed) != kind) {
    t.key.store(kind, std::memory_order_relaxed);
    t.own_us.store(0, std::memory_order_relaxed);
    t.xla_us.store(0, std::memory_order_relaxed);
    t.jobs.store(0, std::memory_order_relaxed);
  }
  const uint32_t jobs = t.jobs.fetch_add(1, std::memory_order_relaxed) + 1;
  const uint32_t own = t.own_us.load(std::memory_order_relaxed);
  const uint32_t xla = t.xla_us.load(std::memory_order_relaxed);
  if (own == 0) return true;
  if (xla == 0) return false;
  const bool faster = own <= xla;
  const uint64_t slow = std::max(own, xla), quick = std::min(own, xla);
  const uint32_t every = 2 * slow > 3 * quick ? kExploreRarely : kExploreEvery;
  return jobs % every == 0 ? !faster : faster;
}

void HelperPool::Record(uint64_t kind, bool on_helpers,
                        std::chrono::steady_clock::duration took) {
  KindTimes& t = Times(kind);
  if (t.key.load(std::memory_order_relaxed) != kind) return;
  const int64_t us = std::chrono::duration_cast<std::chrono::microseconds>(took).count();
  const uint32_t now = static_cast<uint32_t>(std::clamp<int64_t>(us, 1, int64_t{1} << 28));
  std::atomic<uint32_t>& slot = on_helpers ? t.own_us : t.xla_us;
  const uint32_t before = slot.load(std::memory_order_relaxed);
  // A running mean over about the last four jobs: one noisy job does not flip the choice.
  slot.store(before == 0 ? now : (3 * before + now) / 4, std::memory_order_relaxed);
}

bool HelperPool::TryRun(int64_t num_tasks, void (*task)(void*, int64_t, int), void* ctx) {
  const uint64_t kind = Kind(num_tasks, task);
  // Asleep, the helpers would join late (a futex wake-up), after the
  // XLA-pool helper that the caller then schedules.
  if (sleeping_.load() != 0 || !PreferHelpers(kind) || busy_.exchange(true)) return false;
  const auto start = std::chrono::steady_clock::now();
  num_tasks_ = num_tasks;
  task_ = task;
  ctx_ = ctx;
  next_.store(0);
  open_.store(true);
  generation_.fetch_add(1);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (sleeping_.load() > 0) wake_.notify_all();  // One fell asleep since the check.
  }
  Drain(0);
  open_.store(false);
  while (active_.load() != 0) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
  busy_.store(false);
  Record(kind, true, std::chrono::steady_clock::now() - start);
  return true;
}

void HelperPool::Finished(int64_t num_tasks, void (*task)(void*, int64_t, int),
                          std::chrono::steady_clock::duration took) {
  Record(Kind(num_tasks, task), false, took);
  if (took > std::chrono::microseconds(kLongJobMicros) || sleeping_.load() == 0) return;
  generation_.fetch_add(1);  // A job of no tasks: open_ stays as it is.
  std::lock_guard<std::mutex> lock(mu_);
  wake_.notify_all();
}

HelperPool* HelperPool::Get(int helpers) {
  static std::mutex made_mu;
  static HelperPool* pool = nullptr;
#if defined(__linux__)
  static pid_t owner = 0;
#endif
  std::lock_guard<std::mutex> lock(made_mu);
#if defined(__linux__)
  if (owner != getpid()) pool = nullptr;  // A forked child: the threads stayed behind.
#endif
  if (pool == nullptr) {
    // The pool and its threads live as long as the process, with the size of
    // the first call's pool.
    auto* made = new (std::nothrow) HelperPool(helpers);
    if (made == nullptr) return nullptr;
    try {
      for (int h = 1; h <= helpers; ++h) std::thread([made, h] { made->Work(h); }).detach();
    } catch (const std::exception&) {
      // Fewer threads than helpers: calls wait only for helpers that joined,
      // so the missing ones leave their share to the caller.
    }
    pool = made;
#if defined(__linux__)
    owner = getpid();
#endif
  }
  return pool;
}

// Runs every task on the calling thread and on helpers: the kernels' own
// (HelperPool) when they take the job, else helpers scheduled on XLA's
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
  if (helpers <= 0) return RunInline(num_tasks, task, ctx);
  const auto start = std::chrono::steady_clock::now();
  // Its helpers' worker ids must stay below this call's num_workers.
  HelperPool* own = HelperPool::Get(NumWorkers(pool) - 1);
  if (own != nullptr && own->helpers() < NumWorkers(pool) && own->TryRun(num_tasks, task, ctx)) {
    return;
  }
  std::shared_ptr<ParallelState> state;
  try {
    state = std::make_shared<ParallelState>();
  } catch (const std::bad_alloc&) {
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
  lock.unlock();
  if (own != nullptr) own->Finished(num_tasks, task, std::chrono::steady_clock::now() - start);
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
