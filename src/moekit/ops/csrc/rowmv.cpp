// Grouped row mat-vec for decode: y[r, :] = W[e(r)] · a[r, :] for a few rows per expert.
//
// Why: at decode time (1-8 tokens) every expert GEMM is a mat-vec, bound by reading the
// weights once. torch's CPU call (MKL sgemv) reads them at ~10-18 GB/s single-threaded
// on the reference machine and oneDNN at ~15-35 GB/s, against ~30-55 GB/s for a plain
// sum() over the same bytes; a dot-product loop over the weight rows, split over
// torch's threads in blocks of whole rows, runs at the sum()'s speed
// (benchmarks/gemm.py). moekit/ops/ext.py builds this file on first use; ops/rowmv.py keeps
// a torch reference beside it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "vec_math.h"

namespace {

using moekit::dots;  // vec_math.h

// a_RK: rows sorted by expert; w_ENK: rows of each W[e] contiguous; offsets_E1 (E + 1,)
// int64: the rows of expert e are [offsets[e], offsets[e + 1]). Experts without rows are
// never read.
at::Tensor grouped_rows_linear(const at::Tensor& a_RK, const at::Tensor& w_ENK,
                               const at::Tensor& offsets_E1) {
  TORCH_CHECK(a_RK.device().is_cpu() && w_ENK.device().is_cpu(), "rowmv: CPU tensors only");
  TORCH_CHECK(a_RK.scalar_type() == at::kFloat && w_ENK.scalar_type() == at::kFloat,
              "rowmv: float32 only");
  TORCH_CHECK(a_RK.dim() == 2 && w_ENK.dim() == 3 && offsets_E1.dim() == 1, "rowmv: a (R, K), w (E, N, K), offsets (E + 1)");
  TORCH_CHECK(a_RK.is_contiguous() && w_ENK.stride(2) == 1, "rowmv: rows of a and w must be contiguous");
  const int64_t E = w_ENK.size(0), N = w_ENK.size(1), K = w_ENK.size(2), R = a_RK.size(0);
  TORCH_CHECK(a_RK.size(1) == K, "rowmv: a has ", a_RK.size(1), " columns, w has K = ", K);
  TORCH_CHECK(offsets_E1.numel() == E + 1 && offsets_E1.scalar_type() == at::kLong,
              "rowmv: offsets must be int64 of length E + 1 = ", E + 1);
  const at::Tensor off = offsets_E1.contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0 && o[E] == R, "rowmv: offsets must run from 0 to R = ", R);
  for (int64_t e = 0; e < E; ++e) TORCH_CHECK(o[e] <= o[e + 1], "rowmv: offsets must not decrease");

  at::Tensor y = at::empty({R, N}, a_RK.options());
  // work item = one expert's block of ~64 KiB of weight rows: enough items to share
  // among threads even for one expert, few enough that scheduling costs nothing
  const int64_t rows_per_block = std::max<int64_t>(8, (64 * 1024) / std::max<int64_t>(1, K * 4));
  const int64_t blocks = (N + rows_per_block - 1) / rows_per_block;
  std::vector<int64_t> items;
  for (int64_t e = 0; e < E; ++e)
    if (o[e + 1] > o[e])
      for (int64_t b = 0; b < blocks; ++b) items.push_back(e * blocks + b);
  const float* a = a_RK.data_ptr<float>();
  const float* w = w_ENK.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t sE = w_ENK.stride(0), sN = w_ENK.stride(1);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t e = items[i] / blocks, b = items[i] % blocks;
      const int64_t n_end = std::min(N, (b + 1) * rows_per_block);
      for (int64_t n = b * rows_per_block; n < n_end; ++n) {
        const float* w_row = w + e * sE + n * sN;
        int64_t r = o[e];
        for (; r + 4 <= o[e + 1]; r += 4) {
          const float* rows[4] = {a + r * K, a + (r + 1) * K, a + (r + 2) * K, a + (r + 3) * K};
          dots<4>(w_row, rows, K, yp + r * N + n, N);
        }
        for (; r < o[e + 1]; ++r) {
          const float* row[1] = {a + r * K};
          dots<1>(w_row, row, K, yp + r * N + n, N);
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("grouped_rows_linear(Tensor a_RK, Tensor w_ENK, Tensor offsets_E1) -> Tensor");
}
TORCH_LIBRARY_IMPL(moekit, CPU, m) { m.impl("grouped_rows_linear", grouped_rows_linear); }
