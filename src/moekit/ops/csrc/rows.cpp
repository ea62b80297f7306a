// y[idx[j], :] += src[j, :] for the rows of one expert: the combine step (and dx in the
// backward) of the expert bank; and y[t] = Σ_k src[t·K + k] (sum_slots), the same combine
// when the bank wrote every row to its slot.
//
// Why: torch's CPU index_add_ over rows runs on one thread here (1 and 2 threads timed
// alike); the expert bank calls it once per expert. Splitting the columns between
// threads is race-free even when idx repeats a row. ops/rows.py keeps index_add_
// beside it as the reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "vec_math.h"

namespace {

constexpr int64_t AHEAD = moekit::PREFETCH_AHEAD;

void index_add_rows_(const at::Tensor& y, const at::Tensor& idx, const at::Tensor& src) {
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kFloat && src.scalar_type() == at::kFloat,
              "index_add_rows_: CPU float32 only");
  TORCH_CHECK(y.dim() == 2 && src.dim() == 2 && y.stride(1) == 1 && src.stride(1) == 1 && y.size(1) == src.size(1),
              "index_add_rows_: y (T, D) and src (n, D) with contiguous rows");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.numel() == src.size(0),
              "index_add_rows_: idx must be int64 with one entry per row of src");
  const int64_t n = idx.numel(), D = y.size(1), T = y.size(0);
  const at::Tensor ix = idx.contiguous();
  const int64_t* ip = ix.data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j) TORCH_CHECK(ip[j] >= 0 && ip[j] < T, "index_add_rows_: index ", ip[j], " out of range");
  const float* sp = src.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ss = src.stride(0), sy = y.stride(0);
  const int64_t blocks = std::max<int64_t>(1, D / 64);  // 64-float column blocks (whole cache lines)
  at::parallel_for(0, blocks, n * D < 32768 ? blocks : 1, [&](int64_t b0, int64_t b1) {
    const int64_t d0 = b0 * D / blocks, d1 = b1 * D / blocks;
    for (int64_t j = 0; j < n; ++j) {
      if (j + AHEAD < n)  // y's rows lie at random places: ask for them early
        moekit::prefetch_floats<1>(yp + ip[j + AHEAD] * sy + d0, d1 - d0);
      float* yr = yp + ip[j] * sy;
      const float* sr = sp + j * ss;
      for (int64_t d = d0; d < d1; ++d) yr[d] += sr[d];
    }
  });
}

// y (T, D) = src (T·K, D) summed over each token's K slots, k = 0, 1, ... in that order
// (ops/rows.py: sum_slots_reference adds them in the same order, so the two agree
// bit for bit). Each output row is written once: no zero fill and no read of y, which
// the scatter-add needs (moe/experts/cpu/whole.py says when each is used).
at::Tensor sum_slots(const at::Tensor& src, int64_t K) {
  TORCH_CHECK(src.device().is_cpu() && src.scalar_type() == at::kFloat && src.dim() == 2 && src.is_contiguous(),
              "sum_slots: src must be a contiguous CPU float32 (T*K, D) matrix");
  TORCH_CHECK(K >= 1 && src.size(0) % K == 0, "sum_slots: ", src.size(0), " rows do not split into K=", K);
  const int64_t T = src.size(0) / K, D = src.size(1);
  at::Tensor y = at::empty({T, D}, src.options());
  const float* sp = src.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * D)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* yr = yp + t * D;
      const float* s0 = sp + t * K * D;
      std::memcpy(yr, s0, D * sizeof(float));
      for (int64_t k = 1; k < K; ++k)
        for (int64_t d = 0; d < D; ++d) yr[d] += s0[k * D + d];
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("index_add_rows_(Tensor(a!) y, Tensor idx, Tensor src) -> ()");
  m.def("sum_slots(Tensor src, int K) -> Tensor");
}
TORCH_LIBRARY_IMPL(moekit, CPU, m) {
  m.impl("index_add_rows_", index_add_rows_);
  m.impl("sum_slots", sum_slots);
}
