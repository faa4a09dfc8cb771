#include "cpu/nm_ops.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <utility>

#include "cpu/dispatch.h"
#include "cpu/nm_kernels_api.h"

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

// ----------------------------------------------------------------- Scratch

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using AlignedPtr = std::unique_ptr<char, FreeDeleter>;

AlignedPtr AllocateAligned(size_t bytes) {
  constexpr size_t kAlign = 64;
  const size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
  return AlignedPtr(static_cast<char*>(std::aligned_alloc(kAlign, rounded)));
}

// The scratch of one call. Each calling thread keeps its buffer between
// calls (the kernels bound it to ~16 MB of packed tokens plus small
// per-worker tiles), so steady-state calls neither allocate nor page-fault
// fresh memory. Requests above kKeepBytes (only sddmm's f32 sums of a huge
// bf16/f16 gradient) get a buffer of their own, freed after the call.
class CallScratch {
 public:
  static void* Get(void* self, size_t bytes) {
    return static_cast<CallScratch*>(self)->Allocate(bytes);
  }

 private:
  static constexpr size_t kKeepBytes = size_t{64} << 20;

  struct Cache {
    AlignedPtr data;
    size_t size = 0;
  };

  void* Allocate(size_t bytes) {
    if (bytes > kKeepBytes) {
      owned_ = AllocateAligned(bytes);
      return owned_.get();
    }
    thread_local Cache cache;
    if (cache.size < bytes) {
      cache.data.reset();
      cache.data = AllocateAligned(bytes);
      cache.size = cache.data ? bytes : 0;
    }
    return cache.data.get();
  }

  AlignedPtr owned_;
};

// -------------------------------------------------------------- Validation

std::string DimsStr(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

std::string DtypeName(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32:
      return "f32";
    case ffi::DataType::BF16:
      return "bf16";
    case ffi::DataType::F16:
      return "f16";
    case ffi::DataType::F64:
      return "f64";
    case ffi::DataType::U8:
      return "uint8";
    case ffi::DataType::S8:
      return "int8";
    case ffi::DataType::S32:
      return "int32";
    default:
      return "dtype code " + std::to_string(static_cast<int>(t));
  }
}

class Validator {
 public:
  explicit Validator(const char* target) : target_(target) {}

  std::string Prefix() const { return std::string(target_) + ": "; }

  ffi::Error Fail(const std::string& what) const {
    return ffi::Error::InvalidArgument(Prefix() + what);
  }

  ffi::Error NM(int32_t n, int32_t m) const {
    if (1 <= n && n < m && m <= 16) return ffi::Error::Success();
    return Fail("expected 1 <= n < m <= 16, got n = " + std::to_string(n) +
                ", m = " + std::to_string(m));
  }

  ffi::Error Rank3(const char* name, const ffi::AnyBuffer& b) const {
    if (b.dimensions().size() == 3) return ffi::Error::Success();
    return Fail(std::string(name) + " must have rank 3, got shape " +
                DimsStr(b.dimensions()));
  }

  ffi::Error Dtype(const char* name, const ffi::AnyBuffer& b,
                   ffi::DataType want) const {
    if (b.element_type() == want) return ffi::Error::Success();
    return Fail(std::string(name) + " must have dtype " + DtypeName(want) +
                ", got " + DtypeName(b.element_type()));
  }

  ffi::Error Dim(const char* what, int64_t got, int64_t want) const {
    if (got == want) return ffi::Error::Success();
    return Fail(std::string(what) + ": expected " + std::to_string(want) +
                ", got " + std::to_string(got));
  }

  // Each leading batch dimension is 1 or the result's B, and B is what they
  // broadcast to.
  ffi::Error Batch(std::initializer_list<int64_t> dims, int64_t b) const {
    bool each_ok = true, reaches_b = b == 1;
    std::string got;
    for (int64_t d : dims) {
      each_ok = each_ok && (d == 1 || d == b);
      reaches_b = reaches_b || d == b;
      got += (got.empty() ? "" : ", ") + std::to_string(d);
    }
    if (each_ok && reaches_b) return ffi::Error::Success();
    return Fail("operand batch dimensions (" + got +
                ") must each be 1 or the result's batch " + std::to_string(b) +
                " and broadcast to it");
  }

 private:
  const char* target_;
};

#define JAXSPARSE_RETURN_IF_ERROR(expr) \
  do {                                  \
    ffi::Error _e = (expr);             \
    if (_e.failure()) return _e;        \
  } while (0)

// The floating dtype D of a target: f32, bf16 or f16.
ffi::Error FloatDtype(const Validator& v, const char* name,
                      const ffi::AnyBuffer& b, NmDtype* dtype) {
  switch (b.element_type()) {
    case ffi::DataType::F32:
      *dtype = NmDtype::kF32;
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      *dtype = NmDtype::kBF16;
      return ffi::Error::Success();
    case ffi::DataType::F16:
      *dtype = NmDtype::kF16;
      return ffi::Error::Success();
    default:
      return v.Fail(std::string(name) + " must be f32, bf16 or f16, got " +
                    DtypeName(b.element_type()));
  }
}

// The checks shared by the three targets: n:m, ranks, one float dtype D for
// `floats`, u8 indices, and [Bw, N, Kc] indices with Kc = ceil(K / m) * n.
ffi::Error CheckCommon(
    const Validator& v, int32_t n, int32_t m,
    std::initializer_list<std::pair<const char*, const ffi::AnyBuffer*>> floats,
    const ffi::AnyBuffer& indices, NmDtype* dtype) {
  JAXSPARSE_RETURN_IF_ERROR(v.NM(n, m));
  for (const auto& [name, buf] : floats)
    JAXSPARSE_RETURN_IF_ERROR(v.Rank3(name, *buf));
  JAXSPARSE_RETURN_IF_ERROR(v.Rank3("indices", indices));
  const auto& [first_name, first] = *floats.begin();
  JAXSPARSE_RETURN_IF_ERROR(FloatDtype(v, first_name, *first, dtype));
  for (const auto& [name, buf] : floats) {
    if (buf->element_type() != first->element_type()) {
      return v.Fail(std::string(name) + " must have the dtype of " +
                    first_name + " (" + DtypeName(first->element_type()) +
                    "), got " + DtypeName(buf->element_type()));
    }
  }
  JAXSPARSE_RETURN_IF_ERROR(v.Dtype("indices", indices, ffi::DataType::U8));
  return ffi::Error::Success();
}

ffi::Error CheckIndices(const Validator& v, const ffi::AnyBuffer& indices,
                        int64_t k, int64_t n_out, int32_t n, int32_t m) {
  const auto d = indices.dimensions();
  const int64_t kc = (k + m - 1) / m * n;
  if (d[1] == n_out && d[2] == kc) return ffi::Error::Success();
  return v.Fail(
      "indices must be [Bw, N, Kc] with N = " + std::to_string(n_out) +
      " and Kc = ceil(K / m) * n = " + std::to_string(kc) +
      " (K = " + std::to_string(k) + ", n = " + std::to_string(n) +
      ", m = " + std::to_string(m) + "), got " + DimsStr(d));
}

int64_t BatchStride(int64_t batch_dim, int64_t elements) {
  return batch_dim == 1 ? 0 : elements;
}

ffi::Error Run(const Validator& v, NmKernelFn kernel, const NmProblem& problem,
               ffi::ThreadPool& pool) {
  try {
    CallScratch scratch;
    NmRuntime rt{&ParallelFor, &pool, NumWorkers(pool), &CallScratch::Get,
                 &scratch};
    if (kernel(problem, rt)) return ffi::Error::Success();
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      v.Prefix() + "out of memory for scratch buffers");
  } catch (const std::exception& e) {  // Nothing below throws; a guard.
    return ffi::Error::Internal(v.Prefix() + e.what());
  }
}

// ---------------------------------------------------------------- Handlers

ffi::Error SpmmImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                    ffi::AnyBuffer values, ffi::AnyBuffer indices, int32_t n,
                    int32_t m, ffi::Result<ffi::AnyBuffer> y) {
  const Validator v("jaxsparse_nm_spmm");
  NmDtype dtype;
  JAXSPARSE_RETURN_IF_ERROR(CheckCommon(
      v, n, m, {{"x", &x}, {"values", &values}, {"y", &*y}}, indices, &dtype));
  const auto xd = x.dimensions(), wd = values.dimensions(),
             yd = y->dimensions();
  const int64_t t = xd[1], k = xd[2], n_out = wd[1];
  JAXSPARSE_RETURN_IF_ERROR(CheckIndices(v, indices, k, n_out, n, m));
  if (!(indices.dimensions() == wd)) {
    return v.Fail("values and indices must have the same shape, got " +
                  DimsStr(wd) + " and " + DimsStr(indices.dimensions()));
  }
  if (yd[1] != t || yd[2] != n_out) {
    return v.Fail("y must be [B, T, N] = [B, " + std::to_string(t) + ", " +
                  std::to_string(n_out) + "], got " + DimsStr(yd));
  }
  JAXSPARSE_RETURN_IF_ERROR(v.Batch({xd[0], wd[0]}, yd[0]));
  const int64_t kc = wd[2];
  NmProblem p{};
  p.dtype = dtype;
  p.batch = yd[0];
  p.tokens = t;
  p.k = k;
  p.n_out = n_out;
  p.n = n;
  p.m = m;
  p.x = x.untyped_data();
  p.x_stride = BatchStride(xd[0], t * k);
  p.values = values.untyped_data();
  p.values_stride = BatchStride(wd[0], n_out * kc);
  p.indices = static_cast<const uint8_t*>(indices.untyped_data());
  p.indices_stride = p.values_stride;
  p.out = y->untyped_data();
  return Run(v, CurrentKernels().spmm, p, pool);
}

ffi::Error SpmmTImpl(ffi::ThreadPool pool, ffi::AnyBuffer dy,
                     ffi::AnyBuffer values, ffi::AnyBuffer indices, int32_t n,
                     int32_t m, ffi::Result<ffi::AnyBuffer> dx) {
  const Validator v("jaxsparse_nm_spmm_t");
  NmDtype dtype;
  JAXSPARSE_RETURN_IF_ERROR(
      CheckCommon(v, n, m, {{"dy", &dy}, {"values", &values}, {"dx", &*dx}},
                  indices, &dtype));
  const auto dyd = dy.dimensions(), wd = values.dimensions(),
             xd = dx->dimensions();
  const int64_t t = dyd[1], n_out = dyd[2], k = xd[2];
  JAXSPARSE_RETURN_IF_ERROR(CheckIndices(v, indices, k, n_out, n, m));
  if (!(indices.dimensions() == wd)) {
    return v.Fail("values and indices must have the same shape, got " +
                  DimsStr(wd) + " and " + DimsStr(indices.dimensions()));
  }
  JAXSPARSE_RETURN_IF_ERROR(v.Dim("dx tokens (dim 1)", xd[1], t));
  JAXSPARSE_RETURN_IF_ERROR(v.Batch({dyd[0], wd[0]}, xd[0]));
  const int64_t kc = wd[2];
  NmProblem p{};
  p.dtype = dtype;
  p.batch = xd[0];
  p.tokens = t;
  p.k = k;
  p.n_out = n_out;
  p.n = n;
  p.m = m;
  p.dy = dy.untyped_data();
  p.dy_stride = BatchStride(dyd[0], t * n_out);
  p.values = values.untyped_data();
  p.values_stride = BatchStride(wd[0], n_out * kc);
  p.indices = static_cast<const uint8_t*>(indices.untyped_data());
  p.indices_stride = p.values_stride;
  p.out = dx->untyped_data();
  return Run(v, CurrentKernels().spmm_t, p, pool);
}

ffi::Error SddmmImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                     ffi::AnyBuffer indices, int32_t n, int32_t m,
                     ffi::Result<ffi::AnyBuffer> dv) {
  const Validator v("jaxsparse_nm_sddmm");
  NmDtype dtype;
  JAXSPARSE_RETURN_IF_ERROR(CheckCommon(
      v, n, m, {{"x", &x}, {"dy", &dy}, {"dv", &*dv}}, indices, &dtype));
  const auto xd = x.dimensions(), dyd = dy.dimensions(),
             id = indices.dimensions();
  const auto vd = dv->dimensions();
  const int64_t t = xd[1], k = xd[2], n_out = dyd[2];
  JAXSPARSE_RETURN_IF_ERROR(v.Dim("dy tokens (dim 1)", dyd[1], t));
  JAXSPARSE_RETURN_IF_ERROR(CheckIndices(v, indices, k, n_out, n, m));
  if (vd[1] != id[1] || vd[2] != id[2]) {
    return v.Fail("dv must be [B, N, Kc] like indices " + DimsStr(id) +
                  ", got " + DimsStr(vd));
  }
  JAXSPARSE_RETURN_IF_ERROR(v.Batch({xd[0], dyd[0], id[0]}, vd[0]));
  const int64_t kc = id[2];
  NmProblem p{};
  p.dtype = dtype;
  p.batch = vd[0];
  p.tokens = t;
  p.k = k;
  p.n_out = n_out;
  p.n = n;
  p.m = m;
  p.x = x.untyped_data();
  p.x_stride = BatchStride(xd[0], t * k);
  p.dy = dy.untyped_data();
  p.dy_stride = BatchStride(dyd[0], t * n_out);
  p.indices = static_cast<const uint8_t*>(indices.untyped_data());
  p.indices_stride = BatchStride(id[0], n_out * kc);
  p.out = dv->untyped_data();
  return Run(v, CurrentKernels().sddmm, p, pool);
}

}  // namespace
}  // namespace cpu
}  // namespace jaxsparse

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsparseCpuNmSpmm, jaxsparse::cpu::SpmmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // values
                                  .Arg<ffi::AnyBuffer>()  // indices
                                  .Attr<int32_t>("n")
                                  .Attr<int32_t>("m")
                                  .Ret<ffi::AnyBuffer>());  // y

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsparseCpuNmSpmmT, jaxsparse::cpu::SpmmTImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Arg<ffi::AnyBuffer>()  // values
                                  .Arg<ffi::AnyBuffer>()  // indices
                                  .Attr<int32_t>("n")
                                  .Attr<int32_t>("m")
                                  .Ret<ffi::AnyBuffer>());  // dx

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsparseCpuNmSddmm, jaxsparse::cpu::SddmmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Arg<ffi::AnyBuffer>()  // indices
                                  .Attr<int32_t>("n")
                                  .Attr<int32_t>("m")
                                  .Ret<ffi::AnyBuffer>());  // dv
