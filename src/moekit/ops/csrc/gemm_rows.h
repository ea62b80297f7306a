// C = A · B on one thread for the expert bank's inference forward in rows
// (expert_bank_rows.cpp): A is a few token rows wherever they lie (rows of x read in
// place, or the SwiGLU's output rows), B one panel of an expert's weight packed by
// moe/experts/cpu/packed.py: K x 16·NV floats, contiguous, the transposed weight's columns.
//
// This is gemm_cols.h with the operands' roles swapped. There the weight is broadcast and
// the tokens fill the vectors, so each expert's tokens are padded to whole 16-wide vectors
// (5.5-5.9% of the "many" layer's products) and are transposed on the way in and out.
// Here the tokens are broadcast: a tile of r < 6 rows only has fewer accumulators, and
// rows go in and out as rows. The price is a second, packed copy of the weights.
//
// Every output element is one chain of FMAs over k = 0, 1, ..., K-1 from zero, as in
// gemm_cols.h, so the two kernels give the same bits.
// AVX-512 only (expert_bank_rows.cpp is compiled without it elsewhere).
#pragma once

#ifdef __AVX512F__
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace moekit::rows {

constexpr int RT = 6;      // token rows per register tile
constexpr int NV_MAX = 4;  // 16-wide vectors per panel: 6 x 4 = 24 accumulators of 32 registers;
                           // per k, 4 loads and 6 broadcasts feed 24 FMAs

// The weights a thread reads, in order, as a few contiguous segments: a cursor that
// runs ahead of the panels in use and hands out the next cache line to prefetch
struct Stream {
  static constexpr int MAX = 4;
  const float* seg[MAX];
  int64_t lines[MAX];
  int n = 0, i = 0;
  int64_t at = 0;

  void push(const float* p, int64_t l) {
    if (p != nullptr && l > 0 && n < MAX) seg[n] = p, lines[n++] = l;
  }
  // the next line's address, nullptr past the end
  const float* next() {
    while (i < n && at == lines[i]) ++i, at = 0;
    return i < n ? seg[i] + 16 * at++ : nullptr;
  }
  void skip(int64_t l) {
    while (l > 0 && i < n) {
      const int64_t k = std::min(l, lines[i] - at);
      at += k, l -= k;
      if (at == lines[i]) ++i, at = 0;
    }
  }
};

// What a tile prefetches, spread over its k steps: `lin_lines` lines of the weight
// stream (into L2), and all `row_lines` lines of each of the `nrows` rows (into L1, or
// for writing: rows of y the thread adds to next)
struct Spread {
  Stream* lin = nullptr;
  int64_t lin_lines = 0;
  const float* const* rows = nullptr;
  int64_t nrows = 0, row_lines = 0, row_off = 0;  // lines from row + row_off
  bool write = false;
};

// C (R x 16·NV, ldc) = A (R rows at a[i], K each) · B (K x 16·NV, contiguous); K % 16 == 0
template <int R, int NV>
inline void tile(const float* const* a, int64_t K, const float* __restrict b, float* __restrict c, int64_t ldc,
                 const Spread& s) {
  __m512 acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
  const float* ai[R];
  for (int i = 0; i < R; ++i) ai[i] = a[i];
  auto step = [&](int64_t k) {
    __m512 bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = _mm512_loadu_ps(b + k * 16 * NV + 16 * j);
    for (int i = 0; i < R; ++i) {
      const __m512 av = _mm512_set1_ps(ai[i][k]);
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
    }
  };
  const int64_t KB = K / 16;
  const int64_t lin_q = (s.lin_lines + KB - 1) / KB, row_q = (s.nrows * s.row_lines + KB - 1) / KB;
  int64_t lin_i = 0, row_i = 0, row_l = 0;
  for (int64_t k = 0; k < K; k += 16) {
    for (int64_t q = 0; q < lin_q && lin_i < s.lin_lines; ++q, ++lin_i)
      if (const float* p = s.lin->next()) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
    for (int64_t q = 0; q < row_q && row_i < s.nrows; ++q) {
      const float* p = s.rows[row_i] + s.row_off + 16 * row_l;
      if (s.write)
        __builtin_prefetch(p, 1, 3);
      else
        _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
      if (++row_l == s.row_lines) row_l = 0, ++row_i;
    }
    // unrolled by 4, not 16: fully unrolled, GCC shuffled the accumulators between
    // registers (109 register moves in the loop); single-thread harness, hot panel,
    // 128 rows: 233 against 204 GFLOP/s at K = 512, 240 against 203 at K = 128
#pragma GCC unroll 4
    for (int kk = 0; kk < 16; ++kk) step(k + kk);
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(c + i * ldc + 16 * j, acc[i][j]);
}

// tile<r, NV> for a run-time r in 1 .. R
template <int NV, int R = RT>
inline void tile_r(int r, const float* const* a, int64_t K, const float* b, float* c, int64_t ldc, const Spread& s) {
  if constexpr (R > 0) {
    if (r == R) return tile<R, NV>(a, K, b, c, ldc, s);
    tile_r<NV, R - 1>(r, a, K, b, c, ldc, s);
  }
}

// tile_r for a run-time NV in 1 .. NV_MAX
inline void tile_rv(int r, int nv, const float* const* a, int64_t K, const float* b, float* c, int64_t ldc,
                    const Spread& s) {
  switch (nv) {
    case 1: return tile_r<1>(r, a, K, b, c, ldc, s);
    case 2: return tile_r<2>(r, a, K, b, c, ldc, s);
    case 3: return tile_r<3>(r, a, K, b, c, ldc, s);
    default: return tile_r<4>(r, a, K, b, c, ldc, s);
  }
}

// One panel over n rows: for each tile of RT rows (i0, r), C = out(i0) (row stride ldc)
// gets those rows' A · panel, then done(i0, r) runs. The tiles share the prefetch of
// `ahead` lines of the weight stream (as many as the panel holds, so that the stream stays
// as far ahead as it started). With `next_a`, each tile also prefetches the next tile's
// A rows (they are first read from memory here).
template <class Out, class Done>
inline void panel_pass(const float* const* a, int64_t n, int64_t K, const float* panel, int nv, int64_t ldc,
                       Stream& stream, int64_t ahead, bool next_a, const Out& out, const Done& done) {
  const int64_t tiles = (n + RT - 1) / RT;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t i0 = t * RT, r = std::min<int64_t>(RT, n - i0);
    Spread s;
    s.lin = &stream;
    s.lin_lines = ahead * (t + 1) / tiles - ahead * t / tiles;
    if (next_a && t + 1 < tiles) {
      s.rows = a + i0 + RT;
      s.nrows = std::min<int64_t>(RT, n - i0 - RT);
      s.row_lines = K / 16;
    }
    tile_rv(static_cast<int>(r), nv, a + i0, K, panel, out(i0), ldc, s);
    done(i0, r);
  }
}

}  // namespace moekit::rows

#endif  // __AVX512F__
