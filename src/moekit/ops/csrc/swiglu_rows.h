// SwiGLU over one row of the expert bank, forward and backward: shared by swiglu.cpp
// (one product's rows) and expert_bank.cpp (whole experts per thread).
#pragma once

#include <cstdint>

#include "vec_math.h"

namespace moekit {

// a[j] = silu(g[j]) * u[j] * s
inline void fwd_row(const float* __restrict g, const float* __restrict u, float s, float* __restrict a, int64_t F) {
  for (int64_t j = 0; j < F; ++j) a[j] = g[j] * sigmoid(g[j]) * u[j] * s;
}

// One row of the backward; see swiglu_bwd. Blocks of 16 with 16 partial sums for the
// dot product, so the loop vectorizes without reassociating a single running sum (the
// tail is the same body, scalar).
template <bool NEED_A>
inline float bwd_row(const float* __restrict g, const float* __restrict u, const float* __restrict b,
                     float wr, float* __restrict dg, float* __restrict du, float* __restrict ar, int64_t F) {
  float acc[16] = {0};
  int64_t j0 = 0;
  for (; j0 + 16 <= F; j0 += 16)
    for (int l = 0; l < 16; ++l) {
      const int64_t j = j0 + l;
      const float sg = sigmoid(g[j]), s = g[j] * sg, d = b[j] * wr;
      acc[l] += b[j] * (s * u[j]);
      du[j] = d * s;
      dg[j] = d * u[j] * sg * (1.0f + g[j] * (1.0f - sg));
      if (NEED_A) ar[j] = s * u[j] * wr;
    }
  float dot = 0.0f;
  for (int64_t j = j0; j < F; ++j) {
    const float sg = sigmoid(g[j]), s = g[j] * sg, d = b[j] * wr;
    dot += b[j] * (s * u[j]);
    du[j] = d * s;
    dg[j] = d * u[j] * sg * (1.0f + g[j] * (1.0f - sg));
    if (NEED_A) ar[j] = s * u[j] * wr;
  }
  for (int l = 0; l < 16; ++l) dot += acc[l];
  return dot;
}

}  // namespace moekit
