// Inline helpers shared by several kernels in this folder (ops/ext.py folds a hash of
// every header into the build flags, so editing one rebuilds the extension).
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>

namespace moekit {

// exp as a Cody-Waite range reduction and a degree-6 polynomial (relative error ~2e-7,
// below fp32 rounding of the result), written so that the compiler vectorizes loops
// around it; libm's expf would not vectorize without -ffast-math.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);  // NaN passes through both
  const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;    // ln 2 = hi + lo
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  return p * std::bit_cast<float>(e);
}

inline float sigmoid(float g) { return 1.0f / (1.0f + exp_approx(-g)); }

// Rows read (or written) at random places are requested from memory this many rows
// before their use: one thread's demand misses alone left most of the memory bandwidth
// unused (expert_bank.cpp and rows.cpp say what it bought; distances 2 to 16 measured
// the same).
constexpr int64_t PREFETCH_AHEAD = 4;

// every cache line of n floats from p; WRITE = 1 when they are about to be written
template <int WRITE = 0>
inline void prefetch_floats(const float* p, int64_t n) {
  for (int64_t c = 0; c < n; c += 16) __builtin_prefetch(p + c, WRITE, 3);
}

// The weight stream of a decode step is requested this many floats (4 KiB) ahead of its
// use (dots): the hardware prefetcher alone left the step reading below the bandwidth a
// plain sum() over the same weights gets. Measured in one process, the decode harness of
// benchmarks/layer.py (another layer's step before each timed one), 2 threads, the
// layer's step against no software prefetch: fine T=1 0.94, T=8 0.81; coarse T=1 0.94;
// distances of 512-4096 floats measured within 0.01 of each other at T=1.
constexpr int64_t STREAM_AHEAD = 1024;

// <w, a_i> for NR rows a_i at once, written to out[i * out_stride]: each weight vector is
// loaded once for all of them, and 2·NR independent 16-wide partial sums keep the FMA
// units busy (one chain would wait on its own latency); the compiler turns each inner j
// loop into vector FMAs. The 32 partial sums of a row are added as a tree: one chain of
// 32 dependent adds (the compiler may not reorder float sums) cost 128 cycles a row,
// and a row of W_out at decode is ~1.4 KiB (measured as above against the chain: fine
// T=1 0.97-0.99, coarse T=1 0.95-0.97, fine T=8 1.01).
template <int NR>
inline void dots(const float* __restrict w, const float* const* a, int64_t K, float* out, int64_t out_stride) {
  float acc[NR][32] = {{0}};
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __builtin_prefetch(w + k + STREAM_AHEAD, 0, 0);  // past the end of w: prefetches never fault
    __builtin_prefetch(w + k + STREAM_AHEAD + 16, 0, 0);
    for (int i = 0; i < NR; ++i)
      for (int j = 0; j < 32; ++j) acc[i][j] += w[k + j] * a[i][k + j];
  }
  for (int i = 0; i < NR; ++i) {
    for (int j = 0; j < 16; ++j) acc[i][j] += acc[i][j + 16];
    for (int j = 0; j < 8; ++j) acc[i][j] += acc[i][j + 8];
    for (int j = 0; j < 4; ++j) acc[i][j] += acc[i][j + 4];
    float s = (acc[i][0] + acc[i][2]) + (acc[i][1] + acc[i][3]);
    for (int64_t kk = k; kk < K; ++kk) s += w[kk] * a[i][kk];
    out[i * out_stride] = s;
  }
}

// 16 floats as a GCC/Clang vector type: one zmm register with AVX-512 (two ymm with AVX2).
// Kernels write their tiles in it where the compiler, left to itself, vectorized badly
// (attention.cpp says how badly).
typedef float v16 __attribute__((vector_size(64)));

inline v16 vload(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline v16 vbroadcast(float s) { return v16{} + s; }
inline float hsum(v16 v) {
  float s = 0.0f;
  for (int c = 0; c < 16; ++c) s += v[c];
  return s;
}

}  // namespace moekit

