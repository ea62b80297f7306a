// y[idx[j], :] += src[j, :] for the rows of one expert: the combine step (and dx in the
// backward) of the expert bank.
//
// Why: torch's CPU index_add_ over rows runs on one thread here (1 and 2 threads timed
// alike); the expert bank calls it once per expert. Splitting the columns between
// threads is race-free even when idx repeats a row. ops/rows.py keeps index_add_
// beside it as the reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace {

constexpr int64_t AHEAD = 4;

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
      if (j + AHEAD < n)  // y's rows lie at random places: ask for them early (expert_bank.cpp: AHEAD)
        for (int64_t d = d0; d < d1; d += 16) __builtin_prefetch(yp + ip[j + AHEAD] * sy + d, 1, 3);
      float* yr = yp + ip[j] * sy;
      const float* sr = sp + j * ss;
      for (int64_t d = d0; d < d1; ++d) yr[d] += sr[d];
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) { m.def("index_add_rows_(Tensor(a!) y, Tensor idx, Tensor src) -> ()"); }
TORCH_LIBRARY_IMPL(moekit, CPU, m) { m.impl("index_add_rows_", index_add_rows_); }
