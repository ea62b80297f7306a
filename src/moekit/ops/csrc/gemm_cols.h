// C = A · B on one thread for the expert bank's inference forward (expert_bank.cpp:
// bank_fwd_tokens): A is an expert's weight as it lies (rows of W_in or W_out, read once,
// from memory), B the expert's activations in columns (xᵀ, aᵀ), hot in the core's caches.
//
// Why not oneDNN's brgemm (the bank's other products): it wants the weight as B in rows
// (K x N), so every forward transposed each expert's weights first, and that transpose
// read the 96 MiB of the "many" layer's weights from memory at ~13 GB/s a core, a cold
// miss at a time (7.1 of ~74 thread-ms per forward, per-thread timers). With the weight as A, each register
// tile reads MR weight rows, and while it computes, the next tile's rows are prefetched:
// the weights stream in behind the FMAs. Single-thread harness (M=256 K=512, weights of
// 128 experts cycled, B hot): 212-227 GFLOP/s with cold weights for 48-192 columns,
// where brgemm reaches 229-235 on hot operands and 201-213 with a cold left operand.
//
// Every output element is one chain of FMAs over k = 0, 1, ..., K-1 from zero, whatever
// the tile shape, so a column's result does not depend on how many columns come with it.
// AVX-512 only (expert_bank_cols.cpp is compiled without it elsewhere).
#pragma once

#ifdef __AVX512F__
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace moekit::cols {

constexpr int MR = 8;     // weight rows per register tile
constexpr int NV_MAX = 3; // 16-column vectors per tile: 8 x 3 = 24 accumulators of 32 registers

// C (MR' x 16·NV) = A (MR' x K) · B (K x 16·NV); every 16 k, one line of each of the
// pf_rows rows at pf (row stride lda) is prefetched
template <int R, int NV>
inline void tile(const float* __restrict A, int64_t lda, const float* __restrict B, int64_t ldb,
                 float* __restrict C, int64_t ldc, int64_t K, const float* pf, int64_t pf_lda, int pf_rows) {
  __m512 acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
  auto step = [&](int64_t k) {
    __m512 b[NV];
    for (int j = 0; j < NV; ++j) b[j] = _mm512_loadu_ps(B + k * ldb + 16 * j);
    for (int i = 0; i < R; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * lda + k]);
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);
    }
  };
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (pf != nullptr)
      for (int i = 0; i < pf_rows; ++i) _mm_prefetch(reinterpret_cast<const char*>(pf + i * pf_lda + k), _MM_HINT_T0);
#pragma GCC unroll 16
    for (int kk = 0; kk < 16; ++kk) step(k + kk);
  }
  for (; k < K; ++k) step(k);
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(C + i * ldc + 16 * j, acc[i][j]);
}

// R rows of C, all n columns: the columns in panels of at most NV_MAX vectors, as even as
// they come (a 1-vector panel runs at about half the rate); the first panel prefetches
template <int R>
inline void row_tile(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t K,
                     int64_t n, const float* pf, int64_t pf_lda, int pf_rows) {
  const int64_t nv = n / 16, panels = (nv + NV_MAX - 1) / NV_MAX;
  for (int64_t p = 0, v = 0; p < panels; ++p) {
    const int64_t w = (nv - v) / (panels - p);
    const float* q = p == 0 ? pf : nullptr;
    if (w == 3) tile<R, 3>(A, lda, B + 16 * v, ldb, C + 16 * v, ldc, K, q, pf_lda, pf_rows);
    if (w == 2) tile<R, 2>(A, lda, B + 16 * v, ldb, C + 16 * v, ldc, K, q, pf_lda, pf_rows);
    if (w == 1) tile<R, 1>(A, lda, B + 16 * v, ldb, C + 16 * v, ldc, K, q, pf_lda, pf_rows);
    v += w;
  }
}

template <int R>
inline void tail(int64_t r, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t K,
                 int64_t n) {
  if constexpr (R > 0) {
    if (r == R) return row_tile<R>(A, lda, B, ldb, C, ldc, K, n, nullptr, 0, 0);
    tail<R - 1>(r, A, lda, B, ldb, C, ldc, K, n);
  }
}

// The prefetch of a row tile starting at row i of M: the next tile's rows, or for the
// last tile the first rows of `next`
struct Prefetch {
  const float* p;
  int64_t lda;
  int rows;
};
inline Prefetch prefetch_for(int64_t i, int64_t M, const float* A, int64_t lda, const float* next, int64_t next_lda) {
  if (i + 2 * MR > M) return {next, next_lda, next != nullptr ? MR : 0};
  return {A + (i + MR) * lda, lda, static_cast<int>(std::min<int64_t>(MR, M - i - MR))};
}

// B panels (K x 48 floats) up to this size stay in L1 (48 KiB on the reference machine)
// while every row tile passes over them
constexpr int64_t L1_PANEL_BYTES = 32 * 1024;

// C (M x n, ldc) = A (M x K, lda) · B (K x n, ldb), n a multiple of 16. While a row tile
// computes (in its first panel), the next tile's weight rows are prefetched, and during
// the last one the first rows of `next` (the weight the thread reads after this one; row
// stride next_lda).
// Loop order: for a short K (W_out · aᵀ: K = F) the B panels fit L1, and the panels go
// outermost, each reused by every row tile from L1; A is then read once per panel (from
// L2 after the first): the "many" forward took 0.988 of the time of rows outermost
// (benchmarks/ab.py with a build of each order). For a long K (W_in · xᵀ: K = D) rows go outermost, and a
// tile's weight rows stay in L1 over its panels (panels outermost measured the same there,
// 1.001 and 0.995).
inline void gemm(int64_t M, int64_t n, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, const float* next, int64_t next_lda) {
  const int64_t Mr = M / MR * MR;
  if (K * 16 * NV_MAX * 4 <= L1_PANEL_BYTES) {
    const int64_t nv = n / 16, panels = (nv + NV_MAX - 1) / NV_MAX;
    for (int64_t p = 0, v = 0; p < panels; ++p) {
      const int64_t w = (nv - v) / (panels - p);
      for (int64_t i = 0; i < Mr; i += MR) {
        const Prefetch f = p == 0 ? prefetch_for(i, M, A, lda, next, next_lda) : Prefetch{nullptr, 0, 0};
        const float* a = A + i * lda;
        if (w == 3) tile<MR, 3>(a, lda, B + 16 * v, ldb, C + i * ldc + 16 * v, ldc, K, f.p, f.lda, f.rows);
        if (w == 2) tile<MR, 2>(a, lda, B + 16 * v, ldb, C + i * ldc + 16 * v, ldc, K, f.p, f.lda, f.rows);
        if (w == 1) tile<MR, 1>(a, lda, B + 16 * v, ldb, C + i * ldc + 16 * v, ldc, K, f.p, f.lda, f.rows);
      }
      v += w;
    }
  } else {
    for (int64_t i = 0; i < Mr; i += MR) {
      const Prefetch f = prefetch_for(i, M, A, lda, next, next_lda);
      row_tile<MR>(A + i * lda, lda, B, ldb, C + i * ldc, ldc, K, n, f.p, f.lda, f.rows);
    }
  }
  tail<MR - 1>(M - Mr, A + Mr * lda, lda, B, ldb, C + Mr * ldc, ldc, K, n);
}

}  // namespace moekit::cols

#endif  // __AVX512F__
