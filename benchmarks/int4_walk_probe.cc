// What bounds the int4 product at 1 token on a CPU: the walk over the weight
// or its decode. A standalone probe (no jax), 4096 x 4096, group 128, f32, on
// 2 threads (one spawned per call, as a pool's wake-up), medians of 40 calls
// on one weight ("resident", in L3), rotating over 12 (96 MB, "streamed"),
// and rotating with a 64 MB read just before each call ("after 64 MB", as
// the harness times a call right after XLA's dense dot):
//
//   g++ -O2 -march=native -std=c++17 -pthread benchmarks/int4_walk_probe.cc -o /tmp/walk
//   /tmp/walk          # 4 KB pages
//   /tmp/walk huge     # the buffers madvised to 2 MB pages (THP in "madvise" mode)
//
//   column  the canonical [K/2, N]: a task's 64-byte line of each row sits on
//           another 4 KB page (software prefetch 48 rows ahead); vpmovzxbd,
//           and / shift, vcvtdq2ps decode (the first round's kernel)
//   blocked each 64-output block's rows contiguous, the same decode
//   lines   blocked, bytes of a line permuted so that dword lane l holds
//           outputs 16 j + l in byte j: one load per row, shifts and a
//           vpermps lookup of u - 8 (the fourth round's kernel)
//   lines2  the same, two blocks per task (two streams, 8 accumulators)
//   lines2o two blocks per task, byte j brought low by a load from j bytes on
//           instead of a shift (cpu/int4/int4_avx512.h ForwardLinesTokens)
//
// Measured on Zen 4 (2 vCPUs, docs/cpu_speed_notes.md, int4 fourth round).
// GCC 12 warns that the intrinsics' undefined pass-through operand "is used
// uninitialized": silenced as in cpu/common/simd_avx512.h.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr int K = 4096, N = 4096, G = 128, kCopies = 12;
float x[K], xsum[K / G], y[N];

enum class Walk { kColumn, kBlocked, kLines };

// Two blocks of 64 outputs from o0 on the lines; kOffset: byte j of each dword
// from a load j bytes on (the kernel's), else by a shift of one load.
template <bool kOffset>
void LinesPair(const uint8_t* q, const float* scales, int o0) {
  const __m512 values = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const uint8_t* base = q + int64_t{o0 / 64} * (K / 2) * 64;
  __m512 out[8];
  for (auto& v : out) v = _mm512_setzero_ps();
  for (int g = 0; g < K / G; ++g) {
    __m512 acc[8];
    for (auto& v : acc) v = _mm512_setzero_ps();
    for (int i = g * G; i < (g + 1) * G; i += 2) {
      const __m512 x0 = _mm512_set1_ps(x[i]), x1 = _mm512_set1_ps(x[i + 1]);
      for (int b = 0; b < 2; ++b) {
        const uint8_t* row = base + (int64_t{b} * (K / 2) + (i >> 1)) * 64;
        const __m512i whole = _mm512_loadu_si512(row);
        for (int j = 0; j < 4; ++j) {
          // The probe's buffers are followed by others: the last line's
          // over-read stays in mapped memory (the kernel masks it).
          const __m512i line = kOffset ? _mm512_loadu_si512(row + j)
                                       : _mm512_srli_epi32(whole, 8 * j);
          const __m512 lo = _mm512_permutexvar_ps(line, values);
          const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(line, 4), values);
          acc[4 * b + j] = _mm512_fmadd_ps(hi, x1, _mm512_fmadd_ps(lo, x0, acc[4 * b + j]));
        }
      }
    }
    for (int v = 0; v < 8; ++v) {
      out[v] = _mm512_fmadd_ps(_mm512_loadu_ps(scales + g * N + o0 + 16 * v), acc[v], out[v]);
    }
  }
  for (int v = 0; v < 8; ++v) _mm512_storeu_ps(y + o0 + 16 * v, out[v]);
}

// One task: 64 outputs from o0, all of K, 1 token.
template <Walk kWalk>
void Task(const uint8_t* q, const float* scales, int o0) {
  const __m512i low = _mm512_set1_epi32(15);
  const __m512 values = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const uint8_t* base = kWalk == Walk::kColumn ? q + o0 : q + int64_t{o0 / 64} * (K / 2) * 64;
  const int64_t stride = kWalk == Walk::kColumn ? N : 64;
  __m512 out[4];
  for (auto& v : out) v = _mm512_setzero_ps();
  for (int g = 0; g < K / G; ++g) {
    __m512 acc[4];
    for (auto& v : acc) v = _mm512_setzero_ps();
    for (int i = g * G; i < (g + 1) * G; i += 2) {
      const uint8_t* row = base + (i >> 1) * stride;
      if (kWalk == Walk::kColumn) _mm_prefetch(reinterpret_cast<const char*>(row + 48 * stride),
                                               _MM_HINT_T0);
      const __m512 x0 = _mm512_set1_ps(x[i]), x1 = _mm512_set1_ps(x[i + 1]);
      if (kWalk == Walk::kLines) {
        const __m512i line = _mm512_loadu_si512(row);
        for (int j = 0; j < 4; ++j) {
          const __m512 lo = _mm512_permutexvar_ps(_mm512_srli_epi32(line, 8 * j), values);
          const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(line, 8 * j + 4), values);
          acc[j] = _mm512_fmadd_ps(hi, x1, _mm512_fmadd_ps(lo, x0, acc[j]));
        }
        continue;
      }
      for (int v = 0; v < 4; ++v) {
        const __m512i d =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * v)));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(d, low));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(d, 4));
        acc[v] = _mm512_fmadd_ps(hi, x1, _mm512_fmadd_ps(lo, x0, acc[v]));
      }
    }
    // The lookup gives u - 8; the other decodes subtract 8 sum(x) per group.
    const __m512 offset = _mm512_set1_ps(kWalk == Walk::kLines ? 0.0f : 8 * xsum[g]);
    for (int v = 0; v < 4; ++v) {
      out[v] = _mm512_fmadd_ps(_mm512_loadu_ps(scales + g * N + o0 + 16 * v),
                               _mm512_sub_ps(acc[v], offset), out[v]);
    }
  }
  for (int v = 0; v < 4; ++v) _mm512_storeu_ps(y + o0 + 16 * v, out[v]);
}

using TaskFn = void (*)(const uint8_t*, const float*, int);

uint8_t* evict;  // 64 MB read before each call of the "after 64 MB" column
constexpr size_t kEvictBytes = size_t{64} << 20;

void ReadEvict() {
  __m512i sum = _mm512_setzero_si512();
  for (size_t i = 0; i < kEvictBytes; i += 64) {
    sum = _mm512_add_epi32(sum, _mm512_load_si512(evict + i));
  }
  y[0] += static_cast<float>(_mm512_reduce_add_epi32(sum) & 1);
}

// Median ms of calls over `copies` weights; a task covers `width` outputs.
double MedianMs(TaskFn task, int width, const std::vector<uint8_t*>& qs,
                const std::vector<float*>& ss, int copies, bool read_before) {
  std::vector<double> ms;
  for (int r = 0; r < 40; ++r) {
    const uint8_t* q = qs[r % copies];
    const float* s = ss[r % copies];
    if (read_before) ReadEvict();
    const auto start = std::chrono::steady_clock::now();
    std::thread other([&] { for (int o = 0; o < N / 2; o += width) task(q, s, o); });
    for (int o = N / 2; o < N; o += width) task(q, s, o);
    other.join();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() -
                                                           start).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

void Report(const char* name, TaskFn task, int width, const std::vector<uint8_t*>& qs,
            const std::vector<float*>& ss) {
  std::printf("%-8s resident %.3f ms  streamed %.3f ms  after 64 MB %.3f ms\n", name,
              MedianMs(task, width, qs, ss, 1, false),
              MedianMs(task, width, qs, ss, kCopies, false),
              MedianMs(task, width, qs, ss, kCopies, true));
}

uint8_t* Buffer(size_t bytes, bool huge) {
  auto* p = static_cast<uint8_t*>(std::aligned_alloc(size_t{2} << 20, bytes));
  // Before the first touch, so that the faults take 2 MB pages.
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);
  return p;
}

void PrintHugePages() {
  std::ifstream rollup("/proc/self/smaps_rollup");
  for (std::string line; std::getline(rollup, line);) {
    if (line.find("AnonHugePages") != std::string::npos) std::cout << line << "\n";
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool huge = argc > 1 && std::string(argv[1]) == "huge";
  std::vector<uint8_t*> qs;
  std::vector<float*> ss;
  for (int c = 0; c < kCopies; ++c) {
    uint8_t* q = Buffer(K / 2 * N, huge);
    auto* s = reinterpret_cast<float*>(Buffer(K / G * N * sizeof(float), huge));
    for (int i = 0; i < K / 2 * N; ++i) q[i] = static_cast<uint8_t>(std::rand());
    for (int i = 0; i < K / G * N; ++i) s[i] = 0.01f;
    qs.push_back(q);
    ss.push_back(s);
  }
  evict = Buffer(kEvictBytes, huge);
  for (size_t i = 0; i < kEvictBytes; ++i) evict[i] = static_cast<uint8_t>(i);
  for (float& v : x) v = 1.0f;
  PrintHugePages();
  Report("column", &Task<Walk::kColumn>, 64, qs, ss);
  Report("blocked", &Task<Walk::kBlocked>, 64, qs, ss);
  Report("lines", &Task<Walk::kLines>, 64, qs, ss);
  Report("lines2", &LinesPair<false>, 128, qs, ss);
  Report("lines2o", &LinesPair<true>, 128, qs, ss);
}
