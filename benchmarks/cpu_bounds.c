/* The machine bounds the CPU speed notes quote (docs/cpu_speed_notes.md), measured in one process:
 *
 *   cc -O2 -mavx512f -pthread benchmarks/cpu_bounds.c -o /tmp/cpu_bounds && /tmp/cpu_bounds
 *
 * 1. f32 FMA peak: 12 independent zmm FMA chains per thread, on 1 and on 2 threads (GFLOP/s and
 *    zmm FMAs per ns per core). The dense engine's ceiling; XLA's dot is quoted as a fraction of it.
 * 2. The V:N:M streaming forward's inner step in L1: per chunk of 16 kept entries, one index load,
 *    one values load, then per token one vpermps (table from memory) and one FMA, 16 tokens. Its
 *    rate (permutes per ns, one core) bounds the forward at 3-16 tokens from the compute side.
 * 3. First touch of a fresh 32 MB buffer (what a fresh XLA result costs a kernel that writes it):
 *    4 KB pages, against the same with madvise(MADV_HUGEPAGE) on its whole 2 MB pages.
 * 4. bf16 dot peak: 12 independent zmm vdpbf16ps chains per thread (each does 32 bf16 products
 *    into 16 f32 lanes), on 1 and 2 threads, where the CPU has AVX512-BF16 (checked at run time).
 *    The bound of the engine's bf16 tiles on CPUs without AMX (cpu/engine/bf16_tiles.h).
 * 5. The 1xN f32 forward's inner step in L1 (cpu/blocks/blocks_avx512.h, RowTile at n = 16): per
 *    block one index load and one load of its 16 weights, then 24 FMAs, each with an embedded
 *    {1to16} broadcast of one token's x: one broadcast per FMA, its bound from the compute side.
 *    Beside it, the same FMAs with each broadcast shared by two blocks' weight vectors (half a
 *    broadcast per FMA), which a block row alone cannot do (its blocks keep distinct inputs).
 * 6. The same step with tokens in the lanes (blocks_avx512.h, TokenLanesRow, f32 1x16): per block
 *    two loads of 16 tokens' x and 8 broadcasts of weights (a load each), then 16 FMAs (a broadcast
 *    per 2 FMAs). And, where the CPU has AVX512-BF16, the two bf16 steps: the pair kernel's
 *    (blocks_bf16dp.h: per pair of blocks a weight-pair vector, then 30 vdpbf16ps each with an
 *    embedded {1to16} broadcast of one token's x pair), and the same with tokens in the lanes (per
 *    pair of blocks two vpermt2w building 32 tokens' x pairs from bf16 rows, 8 broadcasts of weight
 *    pairs, 16 vdpbf16ps): whether a bf16 kernel with tokens in the lanes could gain.
 * Needs an AVX-512 CPU (checked); Linux for part 3.
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

/* ------------------------------------------------------------------ 1. FMA peak */

struct fma_arg {
  long iters;
  float sink;
};

static void* fma_chains(void* p) {
  struct fma_arg* a = p;
  __m512 acc[12];
  const __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
  for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_ps((float)i);
  for (long k = 0; k < a->iters; k++) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++) acc[i] = _mm512_fmadd_ps(acc[i], b, c);
  }
  float s = 0;
  for (int i = 0; i < 12; i++) s += _mm512_reduce_add_ps(acc[i]);
  a->sink = s;
  return NULL;
}

static void fma_peak(void) {
  const long iters = 100000000;
  for (int threads = 1; threads <= 2; threads++) {
    pthread_t th[2];
    struct fma_arg args[2] = {{iters, 0}, {iters, 0}};
    const double t0 = now();
    for (int i = 0; i < threads; i++) pthread_create(&th[i], NULL, fma_chains, &args[i]);
    for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
    const double t = now() - t0;
    printf("f32 FMA peak, %d thread(s): %6.1f GFLOP/s (%.2f zmm FMA/ns per core)\n", threads,
           threads * iters * 12.0 * 32 / t / 1e9, iters * 12.0 / t / 1e9);
  }
}

/* ------------------------------------------------------------------ 4. bf16 dot peak */

/* Built for AVX512-BF16 by attribute, so that the file still compiles with -mavx512f alone and
 * runs this part only where the CPU has it. */
__attribute__((target("avx512f,avx512bf16"))) static void* bf16_dot_chains(void* p) {
  struct fma_arg* a = p;
  __m512 acc[12];
  const __m512i b = _mm512_set1_epi16(0x3f80); /* bf16 1.0 */
  const __m512i c = _mm512_set1_epi16(0x3380); /* bf16 ~6e-8 */
  for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_ps((float)i);
  for (long k = 0; k < a->iters; k++) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++)
      acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)b, (__m512bh)c);
  }
  float s = 0;
  for (int i = 0; i < 12; i++) s += _mm512_reduce_add_ps(acc[i]);
  a->sink = s;
  return NULL;
}

static void bf16_dot_peak(void) {
  if (!__builtin_cpu_supports("avx512bf16")) {
    printf("bf16 dot peak: this CPU has no AVX512-BF16\n");
    return;
  }
  const long iters = 100000000;
  for (int threads = 1; threads <= 2; threads++) {
    pthread_t th[2];
    struct fma_arg args[2] = {{iters, 0}, {iters, 0}};
    const double t0 = now();
    for (int i = 0; i < threads; i++) pthread_create(&th[i], NULL, bf16_dot_chains, &args[i]);
    for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
    const double t = now() - t0;
    /* one vdpbf16ps: 16 lanes x 2 products, 2 flops each */
    printf("bf16 dot peak (vdpbf16ps), %d thread(s): %6.1f GFLOP/s (%.2f zmm vdpbf16ps/ns per core)\n",
           threads, threads * iters * 12.0 * 64 / t / 1e9, iters * 12.0 / t / 1e9);
  }
}

/* ------------------------------------------------------------------ 2. permute step */

__attribute__((noinline)) static __m512 chunk_steps(const float* tables, const uint8_t* slots,
                                                    const float* values, long chunks) {
  __m512 acc[16];
  for (int t = 0; t < 16; t++) acc[t] = _mm512_setzero_ps();
  for (long c = 0; c < chunks; c++) {
    const __m512i pos =
        _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(slots + 16 * (c & 63))));
    const __m512 w = _mm512_loadu_ps(values + 16 * (c & 63));
    const float* tab = tables + (c & 15) * 256; /* 16 chunks x 16 tokens x 16 floats: 16 KB */
#pragma GCC unroll 16
    for (int t = 0; t < 16; t++)
      acc[t] = _mm512_fmadd_ps(w, _mm512_permutexvar_ps(pos, _mm512_load_ps(tab + 16 * t)), acc[t]);
  }
  __m512 s = acc[0];
  for (int t = 1; t < 16; t++) s = _mm512_add_ps(s, acc[t]);
  return s;
}

static void permute_step(void) {
  float* tables = aligned_alloc(64, 16 * 256 * sizeof(float));
  float* values = aligned_alloc(64, 64 * 16 * sizeof(float));
  uint8_t* slots = aligned_alloc(64, 64 * 16);
  for (int i = 0; i < 16 * 256; i++) tables[i] = 1e-3f * (i % 7);
  for (int i = 0; i < 64 * 16; i++) {
    values[i] = 1e-3f;
    slots[i] = (uint8_t)(rand() % 16);
  }
  const long chunks = 20000000;
  const double t0 = now();
  const __m512 s = chunk_steps(tables, slots, values, chunks);
  const double t = now() - t0;
  float out[16];
  _mm512_storeu_ps(out, s);
  printf("V:N:M stream step in L1, 1 thread: %.2f ns per chunk x 16 tokens = %.2f permute+FMA/ns"
         " (checksum %g)\n", t / chunks * 1e9, 16.0 * chunks / t / 1e9, out[0]);
  free(tables);
  free(values);
  free(slots);
}

/* ------------------------------------------------------------------ 5. the 1xN block step */

/* Per block one weight vector and 24 tokens' broadcasts into 24 accumulators. */
__attribute__((noinline)) static void block_row(const float* x, const int* inputs,
                                                const float* w, int blocks, float* out) {
  __m512 acc[24];
  for (int i = 0; i < 24; i++) acc[i] = _mm512_setzero_ps();
  for (int b = 0; b < blocks; b++) {
    const float* xs = x + inputs[b];
    const __m512 wv = _mm512_loadu_ps(w + 16 * b);
#pragma GCC unroll 24
    for (int t = 0; t < 24; t++) acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(xs[t]), wv, acc[t]);
  }
  for (int i = 0; i < 24; i++) _mm512_storeu_ps(out + 16 * i, acc[i]);
}

/* Two weight vectors per block and 12 tokens: each broadcast feeds both. */
__attribute__((noinline)) static void block_row_shared(const float* x, const int* inputs,
                                                       const float* w, int blocks, float* out) {
  __m512 acc[12][2];
  for (int i = 0; i < 12; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int b = 0; b < blocks; b++) {
    const float* xs = x + inputs[b];
    const __m512 w0 = _mm512_loadu_ps(w + 32 * b), w1 = _mm512_loadu_ps(w + 32 * b + 16);
#pragma GCC unroll 12
    for (int t = 0; t < 12; t++) {
      const __m512 xv = _mm512_set1_ps(xs[t]);
      acc[t][0] = _mm512_fmadd_ps(xv, w0, acc[t][0]);
      acc[t][1] = _mm512_fmadd_ps(xv, w1, acc[t][1]);
    }
  }
  for (int i = 0; i < 12; i++) {
    _mm512_storeu_ps(out + 32 * i, acc[i][0]);
    _mm512_storeu_ps(out + 32 * i + 16, acc[i][1]);
  }
}

static void block_step(void) {
  enum { kBlocks = 144, kRows = 64, kRowFloats = 48 };  /* a 3x3x64 row at 25%: 12 KB of x */
  float* x = aligned_alloc(64, kRows * kRowFloats * sizeof(float));
  float* w = aligned_alloc(64, kBlocks * 32 * sizeof(float));
  int* inputs = malloc(kBlocks * sizeof(int));
  for (int i = 0; i < kRows * kRowFloats; i++) x[i] = 1e-3f * (i % 7);
  for (int i = 0; i < kBlocks * 32; i++) w[i] = 1e-3f;
  for (int b = 0; b < kBlocks; b++) inputs[b] = (b * 37 % kRows) * kRowFloats;
  const long rounds = 100000;
  float out[384];
  for (int shared = 1; shared <= 2; shared++) {
    const double t0 = now();
    for (long r = 0; r < rounds; r++)
      (shared == 1 ? block_row : block_row_shared)(x, inputs, w, kBlocks, out);
    const double t = now() - t0;
    printf("1xN block step in L1, 1 thread, %s: %.2f zmm FMA/ns (checksum %g)\n",
           shared == 1 ? "a broadcast per FMA" : "a broadcast per 2 FMAs",
           24.0 * kBlocks * rounds / t / 1e9, out[0]);
  }
  free(x);
  free(w);
  free(inputs);
}

/* ------------------------------------------------------------------ 6. tokens in the lanes */

__attribute__((noinline)) static void lanes_row(const float* x, const int* inputs, const float* w,
                                                int blocks, float* out) {
  for (int o0 = 0; o0 < 16; o0 += 8) {
    __m512 acc[8][2];
    for (int o = 0; o < 8; o++) acc[o][0] = acc[o][1] = _mm512_setzero_ps();
    for (int b = 0; b < blocks; b++) {
      const float* xs = x + inputs[b];
      const __m512 x0 = _mm512_loadu_ps(xs), x1 = _mm512_loadu_ps(xs + 16);
#pragma GCC unroll 8
      for (int o = 0; o < 8; o++) {
        const __m512 wo = _mm512_set1_ps(w[16 * b + o0 + o]);
        acc[o][0] = _mm512_fmadd_ps(wo, x0, acc[o][0]);
        acc[o][1] = _mm512_fmadd_ps(wo, x1, acc[o][1]);
      }
    }
    for (int o = 0; o < 8; o++) {
      _mm512_storeu_ps(out + 32 * (o0 + o), acc[o][0]);
      _mm512_storeu_ps(out + 32 * (o0 + o) + 16, acc[o][1]);
    }
  }
}

/* The pair kernel's step: 30 token accumulators, a weight-pair vector per pair of blocks, each
 * token's x pair broadcast into vdpbf16ps from memory. */
__attribute__((noinline, target("avx512f,avx512bf16"))) static void pairs_row(
    const uint32_t* pairs, const int* inputs, const uint16_t* w, int blocks, float* out) {
  __m512 acc[30];
  for (int t = 0; t < 30; t++) acc[t] = _mm512_setzero_ps();
  for (int b = 0; b + 1 < blocks; b += 2) {
    const __m512i wv = _mm512_loadu_si512(w + 32 * b);
    const uint32_t* xp = pairs + inputs[b] / 2;
#pragma GCC unroll 30
    for (int t = 0; t < 30; t++) {
      __asm__("vdpbf16ps %[x]%{1to16%}, %[w], %[acc]" : [acc] "+v"(acc[t]) : [w] "v"(wv), [x] "m"(xp[t]));
    }
  }
  for (int t = 0; t < 30; t++) _mm512_storeu_ps(out + 16 * t, acc[t]);
}

/* The bf16 step with tokens in the lanes: per pair of blocks, 32 tokens' x pairs built from the
 * two inputs' bf16 rows (two vpermt2w), then 8 outputs' weight pairs broadcast, 16 vdpbf16ps. */
__attribute__((noinline, target("avx512f,avx512bw,avx512bf16"))) static void bf16_lanes_row(
    const uint16_t* x, const int* inputs, const uint32_t* w, int blocks, float* out) {
  const __m512i lo_order = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                            40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33,
                                            1, 32, 0);
  const __m512i hi_order = _mm512_add_epi16(lo_order, _mm512_set1_epi16(16));
  for (int o0 = 0; o0 < 16; o0 += 8) {
    __m512 acc[8][2];
    for (int o = 0; o < 8; o++) acc[o][0] = acc[o][1] = _mm512_setzero_ps();
    for (int b = 0; b + 1 < blocks; b += 2) {
      const __m512i p = _mm512_loadu_si512(x + inputs[b]);      /* 32 tokens of input p */
      const __m512i q = _mm512_loadu_si512(x + inputs[b + 1]);  /* and of input q */
      const __m512i x0 = _mm512_permutex2var_epi16(p, lo_order, q);
      const __m512i x1 = _mm512_permutex2var_epi16(p, hi_order, q);
#pragma GCC unroll 8
      for (int o = 0; o < 8; o++) {
        const __m512i wo = _mm512_set1_epi32((int)w[16 * b + o0 + o]);
        acc[o][0] = _mm512_dpbf16_ps(acc[o][0], (__m512bh)x0, (__m512bh)wo);
        acc[o][1] = _mm512_dpbf16_ps(acc[o][1], (__m512bh)x1, (__m512bh)wo);
      }
    }
    for (int o = 0; o < 8; o++) {
      _mm512_storeu_ps(out + 32 * (o0 + o), acc[o][0]);
      _mm512_storeu_ps(out + 32 * (o0 + o) + 16, acc[o][1]);
    }
  }
}

static void lanes_step(void) {
  enum { kBlocks = 144, kRows = 64, kRowFloats = 48 };
  float* x = aligned_alloc(64, (kRows * kRowFloats + 64) * sizeof(float));
  float* w = aligned_alloc(64, kBlocks * 32 * sizeof(float));
  int* inputs = malloc(kBlocks * sizeof(int));
  for (int i = 0; i < kRows * kRowFloats + 64; i++) x[i] = 1e-3f * (i % 7);
  for (int i = 0; i < kBlocks * 32; i++) w[i] = 1e-3f;
  for (int b = 0; b < kBlocks; b++) inputs[b] = (b * 37 % kRows) * kRowFloats + b % 5;
  const long rounds = 100000;
  float out[512];
  double t0 = now();
  for (long r = 0; r < rounds; r++) lanes_row(x, inputs, w, kBlocks, out);
  double t = now() - t0;
  printf("1xN step with tokens in the lanes, f32, 1 thread: %.2f zmm FMA/ns (checksum %g)\n",
         32.0 * kBlocks * rounds / t / 1e9, out[0]);
  if (__builtin_cpu_supports("avx512bf16")) {
    /* bf16 x rows and weights of about 1e-3 (0x3a83); the same offsets, in words */
    uint16_t* xb = aligned_alloc(64, (kRows * kRowFloats + 64) * sizeof(uint16_t) * 2);
    uint16_t* wb = aligned_alloc(64, kBlocks * 32 * sizeof(uint16_t));
    for (int i = 0; i < 2 * (kRows * kRowFloats + 64); i++) xb[i] = 0x3a83;
    for (int i = 0; i < kBlocks * 32; i++) wb[i] = 0x3a83;
    t0 = now();
    for (long r = 0; r < rounds; r++)
      pairs_row((const uint32_t*)xb, inputs, wb, kBlocks, out);
    t = now() - t0;
    printf("1xN bf16 pair step (a broadcast per vdpbf16ps), 1 thread: %.2f zmm vdpbf16ps/ns "
           "(checksum %g)\n", 30.0 * (kBlocks / 2) * rounds / t / 1e9, out[0]);
    t0 = now();
    for (long r = 0; r < rounds; r++)
      bf16_lanes_row(xb, inputs, (const uint32_t*)wb, kBlocks, out);
    t = now() - t0;
    printf("1xN bf16 step with tokens in the lanes, 1 thread: %.2f zmm vdpbf16ps/ns "
           "(checksum %g)\n", 32.0 * (kBlocks / 2) * rounds / t / 1e9, out[0]);
    free(xb);
    free(wb);
  }
  free(x);
  free(w);
  free(inputs);
}

/* ------------------------------------------------------------------ 3. first touch */

static void first_touch(void) {
  const size_t bytes = (size_t)32 << 20;
  const uintptr_t huge = (uintptr_t)2 << 20;
  for (int advise = 0; advise < 2; advise++) {
    double best = 1e9;
    for (int r = 0; r < 9; r++) {
      char* p = malloc(bytes + 64); /* glibc serves this by a fresh mmap, as XLA's results */
      const double t0 = now();
#ifdef MADV_HUGEPAGE
      if (advise) {
        const uintptr_t first = ((uintptr_t)p + huge - 1) & ~(huge - 1);
        const uintptr_t last = ((uintptr_t)p + bytes) & ~(huge - 1);
        if (last > first) madvise((void*)first, last - first, MADV_HUGEPAGE);
      }
#endif
      memset(p, 1, bytes);
      const double t = now() - t0;
      if (t < best) best = t;
      free(p);
    }
    printf("first write of a fresh 32 MB buffer, %s: %.2f ms\n",
           advise ? "MADV_HUGEPAGE" : "4 KB pages", best * 1e3);
  }
}

int main(void) {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f")) {
    printf("this CPU has no AVX-512: nothing to measure\n");
    return 0;
  }
  fma_peak();
  bf16_dot_peak();
  permute_step();
  block_step();
  lanes_step();
  first_touch();
  return 0;
}
