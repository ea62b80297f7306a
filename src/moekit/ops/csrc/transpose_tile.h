// 16 x 16 float tiles transposed in registers, and a one-thread transpose of a block built
// on them: shared by transpose.cpp (a whole matrix over threads) and expert_bank.cpp (one
// expert's operands inside a thread).
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "vec_math.h"

namespace moekit {

// One stage of the block-swap transpose: rows i and i+b (b = 8, 4, 2, 1) trade the b x b
// blocks off the diagonal ([[A, B], [C, D]]ᵀ = [[Aᵀ, Cᵀ], [Bᵀ, Dᵀ]], recursively).
// Shuffle lane indices 16.. pick from the second row.
constexpr int lo_lane(int b, int j) { return (j & b) ? 16 + j - b : j; }
constexpr int hi_lane(int b, int j) { return (j & b) ? 16 + j : j + b; }

template <int b, int... J>
inline void transpose_stage(v16* r, std::integer_sequence<int, J...>) {
  for (int i = 0; i < 16; ++i) {
    if (i & b) continue;
    const v16 x = r[i], y = r[i + b];
    r[i] = __builtin_shufflevector(x, y, lo_lane(b, J)...);
    r[i + b] = __builtin_shufflevector(x, y, hi_lane(b, J)...);
  }
}

// 16 registers of 16 floats, a 16 x 16 tile, transposed in place. With AVX-512: 32
// in-lane unpacks (of floats, then of float pairs) and 32 shuffles of 128-bit lanes, the
// usual sequence; 12.5 ns per tile against 16.2 for the 64 two-register shuffles below
// (hot tiles, loads and stores included, one thread). Elsewhere: the block-swap stages.
inline void transpose_regs(v16* r) {
#ifdef __AVX512F__
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(__m512(r[2 * i]), __m512(r[2 * i + 1]));
    t[2 * i + 1] = _mm512_unpackhi_ps(__m512(r[2 * i]), __m512(r[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(u[i], u[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(u[i], u[4 + i], 0xDD);
    t[8 + i] = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = v16(_mm512_shuffle_f32x4(t[i], t[8 + i], 0x88));
    r[8 + i] = v16(_mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD));
    r[4 + i] = v16(_mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88));
    r[12 + i] = v16(_mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xDD));
  }
#else
  constexpr auto lanes = std::make_integer_sequence<int, 16>{};
  transpose_stage<8>(r, lanes);
  transpose_stage<4>(r, lanes);
  transpose_stage<2>(r, lanes);
  transpose_stage<1>(r, lanes);
#endif
}

// dst (16 x 16, row stride ldd) = src (16 x 16, row stride lds)ᵀ: 16 vector loads, the
// shuffles and 16 vector stores
inline void transpose_tile(const float* src, int64_t lds, float* dst, int64_t ldd) {
  v16 r[16];
  for (int i = 0; i < 16; ++i) r[i] = vload(src + i * lds);
  transpose_regs(r);
  for (int i = 0; i < 16; ++i) vstore(dst + i * ldd, r[i]);
}

// dst (N x M, row stride ldd) = src (M x N, row stride lds)ᵀ for columns j0..j1 of src,
// on the calling thread; the ragged edges element by element
inline void transpose_cols(const float* src, int64_t M, int64_t lds, int64_t j0, int64_t j1, float* dst,
                           int64_t ldd) {
  for (int64_t j = j0; j < j1; j += 16) {
    const int64_t nj = std::min<int64_t>(16, j1 - j);
    int64_t i0 = 0;
    if (nj == 16)
      for (; i0 + 16 <= M; i0 += 16) transpose_tile(src + i0 * lds + j, lds, dst + j * ldd + i0, ldd);
    for (int64_t jj = j; jj < j + nj; ++jj)
      for (int64_t i = i0; i < M; ++i) dst[jj * ldd + i] = src[i * lds + jj];
  }
}

}  // namespace moekit
