// out = xᵀ for a CPU float32 matrix whose columns are contiguous: 16 x 16 tiles transposed
// in registers.
//
// Why: oneDNN's linear (ops/gemm.py) wants its left operand in contiguous rows, and a weight
// gradient dw = dyᵀ · x hands it dyᵀ, a transposed view. torch's copy_ of a transposed
// 2048 x 128 float matrix took ~0.15 ms at one thread (about 7 GB/s: every element is a
// scalar load and store), and a training step of the `tiny` preset makes 17 of them
// (aten::copy_ under torch.profiler). Here each 16 x 16 tile is 16 vector loads, 64
// two-register shuffles and 16 vector stores.
// Reference: torch's x.contiguous(); tests/test_gemm.py checks equality.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "transpose_tile.h"

namespace {

constexpr int64_t T = 16;

// out (N, M) contiguous = x (M, N)ᵀ, x with unit column stride and any row stride
void transpose_into(const at::Tensor& x, const at::Tensor& out) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "transpose_into: x must be a CPU float32 matrix with contiguous rows");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat && out.dim() == 2 &&
                  out.size(0) == x.size(1) && out.size(1) == x.size(0),
              "transpose_into: out must be contiguous float32 of x's transposed shape");
  const int64_t M = x.size(0), N = x.size(1), lds = x.stride(0);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  // a task is 16 columns of x (16 rows of out), so the stores run along out's rows: walking
  // x's rows instead stores at a stride of M floats, and at M = 2048 all 16 rows of a tile
  // land in the same cache sets (measured: no faster than torch's copy)
  const int64_t Nt = (N + T - 1) / T;
  at::parallel_for(0, Nt, 4, [&](int64_t begin, int64_t end) {
    for (int64_t bj = begin; bj < end; ++bj) {
      const int64_t j0 = bj * T;
      moekit::transpose_cols(src, M, lds, j0, std::min(N, j0 + T), dst, M);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) { m.def("transpose_into(Tensor x, Tensor(a!) out) -> ()"); }
TORCH_LIBRARY_IMPL(moekit, CPU, m) { m.impl("transpose_into", transpose_into); }
