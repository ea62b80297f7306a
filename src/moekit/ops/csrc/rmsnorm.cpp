// RMSNorm (Zhang & Sennrich 2019) over the last dim of CPU float32 rows, forward and backward
// in one pass each:
//   forward   r = 1 / sqrt(mean(x²) + eps);  y = x · r · w            (r kept for the backward)
//   backward  g = dy · w;  dx = r · (g - x · r² · mean(g · x));  dw = Σ_rows dy · x · r
// Why: torch's F.rms_norm on the CPU is a chain of elementwise ops (pow, mean, add, rsqrt,
// mul, mul), and its backward several more. A training step of the `tiny` preset runs 9
// norms over 2048 x 128 rows; under torch.profiler their muls, pows, sums and divs came to
// ~5 ms of a ~110 ms step at one thread.
// dw is summed per block of BLOCK rows, then over blocks in order, so the result does not
// depend on the thread count.
// Reference: ops/rmsnorm.py's reference (F.rms_norm); tests/test_ops.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "vec_math.h"

namespace {

using moekit::v16;
using moekit::hsum;
using moekit::vload;
using moekit::vstore;

constexpr int64_t W = 16;
constexpr int64_t BLOCK = 64;  // rows per partial sum of dw

// Σ a·b over D floats: W lanes, then the tail
inline float dot(const float* a, const float* b, int64_t D) {
  v16 acc = {};
  int64_t c = 0;
  for (; c + W <= D; c += W) acc += vload(a + c) * vload(b + c);
  float s = hsum(acc);
  for (; c < D; ++c) s += a[c] * b[c];
  return s;
}

void check_rows(const at::Tensor& t, int64_t N, int64_t D, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == N * D,
              "rmsnorm: ", name, " must be contiguous CPU float32 with ", N, " rows of ", D);
}

void rmsnorm_fwd(const at::Tensor& x, const at::Tensor& w, double eps, const at::Tensor& y, const at::Tensor& rstd) {
  const int64_t D = w.numel(), N = D ? x.numel() / D : 0;
  check_rows(x, N, D, "x");
  check_rows(y, N, D, "y");
  check_rows(w, 1, D, "w");
  check_rows(rstd, N, 1, "rstd");
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* xi = xp + i * D;
      float* yi = yp + i * D;
      const float r = 1.0f / std::sqrt(dot(xi, xi, D) / D + static_cast<float>(eps));
      rp[i] = r;
      int64_t c = 0;
      for (; c + W <= D; c += W) vstore(yi + c, vload(xi + c) * vload(wp + c) * r);
      for (; c < D; ++c) yi[c] = xi[c] * wp[c] * r;
    }
  });
}

void rmsnorm_bwd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd, const at::Tensor& dy,
                 const at::Tensor& dx, const at::Tensor& dw, bool need_dw) {
  const int64_t D = w.numel(), N = D ? x.numel() / D : 0;
  check_rows(x, N, D, "x");
  check_rows(dy, N, D, "dy");
  check_rows(dx, N, D, "dx");
  check_rows(w, 1, D, "w");
  check_rows(dw, 1, D, "dw");
  check_rows(rstd, N, 1, "rstd");
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  const float* dyp = dy.data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *dwp = dw.data_ptr<float>();
  const int64_t nblocks = (N + BLOCK - 1) / BLOCK;
  std::vector<float> part(need_dw ? nblocks * D : 0, 0.0f);
  at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> g(D);
    for (int64_t blk = begin; blk < end; ++blk) {
      float* pb = need_dw ? part.data() + blk * D : nullptr;
      for (int64_t i = blk * BLOCK; i < std::min(N, (blk + 1) * BLOCK); ++i) {
        const float *xi = xp + i * D, *dyi = dyp + i * D;
        float* dxi = dxp + i * D;
        const float r = rp[i];
        for (int64_t c = 0; c < D; ++c) g[c] = dyi[c] * wp[c];
        const float k = dot(g.data(), xi, D) * r * r / D;
        int64_t c = 0;
        for (; c + W <= D; c += W) {
          const v16 xv = vload(xi + c);
          vstore(dxi + c, (vload(g.data() + c) - xv * k) * r);
          if (pb) vstore(pb + c, vload(pb + c) + vload(dyi + c) * xv * r);
        }
        for (; c < D; ++c) {
          dxi[c] = (g[c] - xi[c] * k) * r;
          if (pb) pb[c] += dyi[c] * xi[c] * r;
        }
      }
    }
  });
  if (!need_dw) return;
  at::parallel_for(0, D, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      float s = 0.0f;
      for (int64_t blk = 0; blk < nblocks; ++blk) s += part[blk * D + c];
      dwp[c] = s;
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("rmsnorm_fwd(Tensor x, Tensor w, float eps, Tensor(a!) y, Tensor(b!) rstd) -> ()");
  m.def("rmsnorm_bwd(Tensor x, Tensor w, Tensor rstd, Tensor dy, Tensor(a!) dx, Tensor(b!) dw, bool need_dw) -> ()");
}
TORCH_LIBRARY_IMPL(moekit, CPU, m) {
  m.impl("rmsnorm_fwd", rmsnorm_fwd);
  m.impl("rmsnorm_bwd", rmsnorm_bwd);
}
