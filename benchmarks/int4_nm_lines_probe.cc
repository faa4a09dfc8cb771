// What an int4 + 2:4 product at 1 token could reach on a CPU with a lines
// layout of its own (issue 12's 9x target against XLA's f32 dot), before any
// such layout is built. A standalone probe (no jax), 4096 x 4096, group 128,
// f32, 2 threads (one spawned per call), medians of 40 calls on one weight
// ("resident"), rotating over 12 ("streamed"), and rotating with a 64 MB read
// just before each call ("after 64 MB"), as benchmarks/int4_walk_probe.cc:
//
//   g++ -O2 -march=native -std=c++17 -pthread benchmarks/int4_nm_lines_probe.cc -o /tmp/nm
//   /tmp/nm
//
// Outputs sit in vector lanes, as in the dense lines: per 64-output block and
// chunk of 16 inputs (4 groups of 4), 4 vectors of values, lane l of vector v
// holding output 16 v + l's 4 value bytes (group j's v0 | v1 << 4 in byte j).
// A lane's kept values multiply x[4 j + p]: vpermps looks them up in a vector
// of the chunk's 16 inputs, with index 4 j + p. The variants differ in how
// the index is stored:
//
//   dense     the dense int4 lines (cpu/int4/int4_avx512.h), 0.5 byte per
//             weight, for comparison
//   idx4      4-bit indices 4 j + p, one byte per group like the values
//             (0.5 byte per weight: no fewer bytes than dense): an offset
//             load and a shift, as the values
//   pos2      2-bit positions (3/8 byte per weight, the canonical 2:4's
//             bytes): per group a shift and a vpternlogd make 4 j + p
//
// Measured on Zen 4 (2 vCPUs): docs/cpu_speed_notes.md, int4 seventh round.
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
constexpr size_t kEvictBytes = size_t{64} << 20;
float x[K], y[N];
uint8_t* evict;

enum class Form { kDense, kIdx4, kPos2 };

// Bytes per 64-output block of each form (the layout is only sized here; the
// data is random, every index valid).
constexpr int64_t BlockBytes(Form f) {
  return f == Form::kPos2 ? int64_t{K} / 16 * 384 : int64_t{K} / 16 * 512;
}

// The dense lines' two-block task (int4_walk_probe.cc's lines2o).
void DenseTask(const uint8_t* q, const float* scales, int o0) {
  const __m512 kCodes = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
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
        for (int j = 0; j < 4; ++j) {
          const __m512i bytes = _mm512_loadu_si512(row + j);
          const __m512 lo = _mm512_permutexvar_ps(bytes, kCodes);
          const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), kCodes);
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

// Two blocks of 64 outputs from o0 (the dense lines' 1-token tasks), 2:4.
template <Form kForm>
void Task(const uint8_t* q, const float* scales, int o0) {
  const __m512 kCodes = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const uint8_t* base[2] = {q + int64_t{o0 / 64} * BlockBytes(kForm),
                            q + int64_t{o0 / 64 + 1} * BlockBytes(kForm)};
  __m512 out[8];
  for (auto& v : out) v = _mm512_setzero_ps();
  for (int g = 0; g < K / G; ++g) {
    __m512 acc[8];
    for (auto& v : acc) v = _mm512_setzero_ps();
    for (int c = g * G / 16; c < (g + 1) * G / 16; ++c) {  // chunks of 16 inputs
      const __m512 xs = _mm512_loadu_ps(x + 16 * c);  // the chunk's inputs, looked up
      for (int b = 0; b < 2; ++b) {
        const uint8_t* chunk = base[b] + int64_t{c} * (kForm == Form::kPos2 ? 384 : 512);
        for (int v = 0; v < 4; ++v) {
          const uint8_t* values = chunk + 64 * v;
          for (int j = 0; j < 4; ++j) {
            const __m512i vb = _mm512_loadu_si512(values + j);
            __m512i i0, i1;
            if (kForm == Form::kIdx4) {
              const __m512i ib = _mm512_loadu_si512(chunk + 256 + 64 * v + j);
              i0 = ib;
              i1 = _mm512_srli_epi32(ib, 4);
            } else {
              // Lane l's 16 position bits of 4 groups: 32 lanes per vector,
              // as words; group j's p0, p1 at bits 4 j, 4 j + 2. 0xEA: (A & B) | C.
              const __m512i pw = _mm512_cvtepu16_epi32(
                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 256 + 32 * v)));
              const __m512i three = _mm512_set1_epi32(3), base4 = _mm512_set1_epi32(4 * j);
              i0 = _mm512_ternarylogic_epi32(_mm512_srli_epi32(pw, 4 * j), three, base4, 0xEA);
              i1 = _mm512_ternarylogic_epi32(_mm512_srli_epi32(pw, 4 * j + 2), three, base4,
                                             0xEA);
            }
            const __m512 w0 = _mm512_permutexvar_ps(vb, kCodes);
            const __m512 w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(vb, 4), kCodes);
            acc[4 * b + v] = _mm512_fmadd_ps(w0, _mm512_permutexvar_ps(i0, xs), acc[4 * b + v]);
            acc[4 * b + v] = _mm512_fmadd_ps(w1, _mm512_permutexvar_ps(i1, xs), acc[4 * b + v]);
          }
        }
      }
    }
    for (int v = 0; v < 8; ++v) {
      out[v] = _mm512_fmadd_ps(_mm512_loadu_ps(scales + g * N + o0 + 16 * v), acc[v], out[v]);
    }
  }
  for (int v = 0; v < 8; ++v) _mm512_storeu_ps(y + o0 + 16 * v, out[v]);
}

void ReadEvict() {
  __m512i sum = _mm512_setzero_si512();
  for (size_t i = 0; i < kEvictBytes; i += 64) {
    sum = _mm512_add_epi32(sum, _mm512_load_si512(evict + i));
  }
  y[0] += static_cast<float>(_mm512_reduce_add_epi32(sum) & 1);
}

using TaskFn = void (*)(const uint8_t*, const float*, int);

double MedianMs(TaskFn task, const std::vector<uint8_t*>& qs, const std::vector<float*>& ss,
                int copies, bool read_before) {
  std::vector<double> ms;
  for (int r = 0; r < 40; ++r) {
    const uint8_t* q = qs[r % copies];
    const float* s = ss[r % copies];
    if (read_before) ReadEvict();
    const auto start = std::chrono::steady_clock::now();
    std::thread other([&] { for (int o = 0; o < N / 2; o += 128) task(q, s, o); });
    for (int o = N / 2; o < N; o += 128) task(q, s, o);
    other.join();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() -
                                                           start).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

template <Form kForm>
void Report(const char* name, TaskFn task) {
  // Each form gets its own copies, sized to its bytes (+ 64: the offset loads
  // of the last line read 3 bytes on).
  const size_t bytes = static_cast<size_t>(N / 64 * BlockBytes(kForm)) + 64;
  std::vector<uint8_t*> qs;
  std::vector<float*> ss;
  for (int c = 0; c < kCopies; ++c) {
    auto* q = static_cast<uint8_t*>(std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096));
    auto* s = static_cast<float*>(std::aligned_alloc(64, K / G * N * sizeof(float)));
    for (size_t i = 0; i < bytes; ++i) q[i] = static_cast<uint8_t>(std::rand());
    for (int i = 0; i < K / G * N; ++i) s[i] = 0.01f;
    qs.push_back(q);
    ss.push_back(s);
  }
  std::printf("%-6s %5.2f MB  resident %.3f ms  streamed %.3f ms  after 64 MB %.3f ms\n", name,
              (bytes + K / G * N * 4.0) / 1e6, MedianMs(task, qs, ss, 1, false),
              MedianMs(task, qs, ss, kCopies, false), MedianMs(task, qs, ss, kCopies, true));
  for (int c = 0; c < kCopies; ++c) {
    std::free(qs[c]);
    std::free(ss[c]);
  }
}

}  // namespace

int main() {
  evict = static_cast<uint8_t*>(std::aligned_alloc(4096, kEvictBytes));
  for (size_t i = 0; i < kEvictBytes; ++i) evict[i] = static_cast<uint8_t>(i);
  for (int i = 0; i < K; ++i) x[i] = 1.0f + static_cast<float>(i % 7);
  Report<Form::kDense>("dense", &DenseTask);
  Report<Form::kIdx4>("idx4", &Task<Form::kIdx4>);
  Report<Form::kPos2>("pos2", &Task<Form::kPos2>);
}
