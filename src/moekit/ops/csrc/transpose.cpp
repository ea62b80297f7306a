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
#include <cstring>
#include <utility>

#include "vec_math.h"

namespace {

using moekit::v16;
using moekit::vload;
using moekit::vstore;

constexpr int64_t T = 16;

// One stage of the block-swap transpose: rows i and i+b (b = 8, 4, 2, 1) trade the b x b
// blocks off the diagonal ([[A, B], [C, D]]ᵀ = [[Aᵀ, Cᵀ], [Bᵀ, Dᵀ]], recursively).
// Shuffle lane indices 16.. pick from the second row.
constexpr int lo_lane(int b, int j) { return (j & b) ? 16 + j - b : j; }
constexpr int hi_lane(int b, int j) { return (j & b) ? 16 + j : j + b; }

template <int b, int... J>
inline void stage(v16* r, std::integer_sequence<int, J...>) {
  for (int i = 0; i < 16; ++i) {
    if (i & b) continue;
    const v16 x = r[i], y = r[i + b];
    r[i] = __builtin_shufflevector(x, y, lo_lane(b, J)...);
    r[i + b] = __builtin_shufflevector(x, y, hi_lane(b, J)...);
  }
}

void tile(const float* src, int64_t lds, float* dst, int64_t ldd) {
  v16 r[16];
  for (int i = 0; i < 16; ++i) r[i] = vload(src + i * lds);
  constexpr auto lanes = std::make_integer_sequence<int, 16>{};
  stage<8>(r, lanes);
  stage<4>(r, lanes);
  stage<2>(r, lanes);
  stage<1>(r, lanes);
  for (int i = 0; i < 16; ++i) vstore(dst + i * ldd, r[i]);
}

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
      const int64_t j0 = bj * T, nj = std::min(T, N - j0);
      int64_t i0 = 0;
      if (nj == T) {
        for (; i0 + T <= M; i0 += T) tile(src + i0 * lds + j0, lds, dst + j0 * M + i0, M);
      }
      for (int64_t j = j0; j < j0 + nj; ++j)  // the ragged edges, element by element
        for (int64_t i = i0; i < M; ++i) dst[j * M + i] = src[i * lds + j];
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) { m.def("transpose_into(Tensor x, Tensor(a!) out) -> ()"); }
TORCH_LIBRARY_IMPL(moekit, CPU, m) { m.impl("transpose_into", transpose_into); }
