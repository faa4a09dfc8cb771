// What bounds the int4 product at 1 token on a CPU: the walk over the weight
// or its decode. A standalone probe (no jax), 4096 x 4096, group 128, f32, on
// 2 threads (one spawned per call, as a pool's wake-up), medians of 40 calls
// on one weight ("resident", in L3) and rotating over 12 (96 MB, "streamed"):
//
//   g++ -O2 -march=native -std=c++17 -pthread benchmarks/int4_walk_probe.cc -o /tmp/walk
//   /tmp/walk
//
//   column  the canonical [K/2, N]: a task's 64-byte line of each row sits on
//           another 4 KB page (software prefetch 48 rows ahead); vpmovzxbd,
//           and / shift, vcvtdq2ps decode (the first round's kernel)
//   blocked each 64-output block's rows contiguous, the same decode
//   lines   blocked, bytes of a line permuted so that dword lane l holds
//           outputs 16 j + l in byte j: one load per row, shifts and a
//           vpermps lookup of u - 8 (cpu/int4/int4_avx512.h ForwardLinesTokens)
//
// Measured on Zen 4 (2 vCPUs, docs/cpu_speed_notes.md, int4 fourth round).
// GCC 12 warns that the intrinsics' undefined pass-through operand "is used
// uninitialized": silenced as in cpu/common/simd_avx512.h.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

constexpr int K = 4096, N = 4096, G = 128, kCopies = 12;
float x[K], xsum[K / G], y[N];

enum class Walk { kColumn, kBlocked, kLines };

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

template <Walk kWalk>
double MedianMs(const std::vector<uint8_t*>& qs, const std::vector<float*>& ss, int copies) {
  std::vector<double> ms;
  for (int r = 0; r < 40; ++r) {
    const uint8_t* q = qs[r % copies];
    const float* s = ss[r % copies];
    const auto start = std::chrono::steady_clock::now();
    std::thread other([&] { for (int o = 0; o < N / 2; o += 64) Task<kWalk>(q, s, o); });
    for (int o = N / 2; o < N; o += 64) Task<kWalk>(q, s, o);
    other.join();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() -
                                                           start).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

template <Walk kWalk>
void Report(const char* name, const std::vector<uint8_t*>& qs, const std::vector<float*>& ss) {
  std::printf("%-8s resident %.3f ms  streamed %.3f ms\n", name, MedianMs<kWalk>(qs, ss, 1),
              MedianMs<kWalk>(qs, ss, kCopies));
}

}  // namespace

int main() {
  std::vector<uint8_t*> qs;
  std::vector<float*> ss;
  for (int c = 0; c < kCopies; ++c) {
    auto* q = static_cast<uint8_t*>(std::aligned_alloc(4096, K / 2 * N));
    auto* s = static_cast<float*>(std::aligned_alloc(64, K / G * N * sizeof(float)));
    for (int i = 0; i < K / 2 * N; ++i) q[i] = static_cast<uint8_t>(std::rand());
    for (int i = 0; i < K / G * N; ++i) s[i] = 0.01f;
    qs.push_back(q);
    ss.push_back(s);
  }
  for (float& v : x) v = 1.0f;
  Report<Walk::kColumn>("column", qs, ss);
  Report<Walk::kBlocked>("blocked", qs, ss);
  Report<Walk::kLines>("lines", qs, ss);
}
