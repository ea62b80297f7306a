// Row-wise top-k indices for routers: ids[t, :] = the k largest scores[t, :], largest
// first, ties to the lower expert id, NaN above every number (torch.topk's order).
//
// Why: torch.topk on CPU costs 4.4 ms for 8192 x 128 scores and k = 4 on the reference
// machine (16x the softmax over the same scores), 7% of the "many" layer's forward;
// routers take k <= 16 of a few hundred experts, where one pass per row that keeps
// the best k by compare-exchange is a few vector ops per score. ops/topk.py keeps a
// stable sort beside it as the reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <bit>
#include <cstdint>
#include <cstring>
#include <vector>

#include "transpose_tile.h"

namespace {

constexpr int64_t KMAX = 16;
constexpr int64_t L = 16;  // rows handled together, one per vector lane
typedef int64_t V __attribute__((vector_size(64)));  // 8 lanes (GCC/Clang vector extension)

// Keys: one int64 per score that orders like (score, -expert): the float's bits mapped
// to an int32 that sorts like the float (negative floats have their magnitude bits
// flipped), any NaN mapped to the top, then ~e in the low word so that on equal scores
// the lower expert wins. Keys are distinct, so top-k is a plain max-k with no tie rule
// left to get wrong. keys32 makes the high words of 16 scores at once.
typedef float F16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));
typedef int32_t I8 __attribute__((vector_size(32)));

inline I16 keys32(F16 v) {
  v = v + 0.0f;  // -0.0 ties with 0.0
  I16 bits;
  std::memcpy(&bits, &v, sizeof bits);
  const I16 key = bits >= 0 ? bits : bits ^ 0x7FFFFFFF;
  return v != v ? I16{} + INT32_MAX : key;
}

at::Tensor topk_ids(const at::Tensor& scores_TE, int64_t k) {
  TORCH_CHECK(scores_TE.device().is_cpu() && scores_TE.scalar_type() == at::kFloat,
              "topk_ids: CPU float32 scores only");
  TORCH_CHECK(scores_TE.dim() == 2, "topk_ids: scores must be (T, E)");
  const int64_t T = scores_TE.size(0), E = scores_TE.size(1);
  TORCH_CHECK(k >= 1 && k <= KMAX && k <= E, "topk_ids: need 1 <= k <= min(E, ", KMAX, "), got k = ", k);
  TORCH_CHECK(E < (int64_t(1) << 32), "topk_ids: too many experts");
  const at::Tensor s = scores_TE.contiguous();
  at::Tensor ids = at::empty({T, k}, scores_TE.options().dtype(at::kLong));
  const float* sp = s.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  // L rows at a time, one per vector lane: the block of scores is transposed in 16 x 16
  // tiles (E x L, transpose_tile.h), each column of L scores becomes L keys in vector
  // registers, and the keys are pushed through a k-deep compare-exchange chain (the max
  // stays, the min moves on), branch-free. A per-row insertion sort was branch-bound (2 ms
  // for 8192 x 128); keys made one score at a time and stored transposed one by one spent
  // 80% of the time in those two loops (perf). `python benchmarks/kernels.py` on 2 threads,
  // (8192, 128, k=4): 642 -> 229 us; (4096, 64, k=8): 188 -> 80 us.
  at::parallel_for(0, (T + L - 1) / L, 16, [&](int64_t b0, int64_t b1) {
    std::vector<float> rows_LE(L * E), cols_EL(E * L);
    V best[KMAX][L / 8];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * L, lanes = std::min(L, T - t0);
      const float* block = sp + t0 * E;
      if (lanes < L) {  // spare lanes repeat the last row
        for (int64_t l = 0; l < L; ++l)
          std::memcpy(rows_LE.data() + l * E, sp + (t0 + std::min(l, lanes - 1)) * E, E * sizeof(float));
        block = rows_LE.data();
      }
      moekit::transpose_cols(block, L, E, 0, E, cols_EL.data(), L);
      for (int64_t p = 0; p < k; ++p)
        for (int64_t h = 0; h < L / 8; ++h) best[p][h] = V{} + INT64_MIN;  // below every key
      for (int64_t e = 0; e < E; ++e) {
        const I16 key = keys32(moekit::vload(cols_EL.data() + e * L));
        const V low = V{} + static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(e));
        for (int64_t h = 0; h < L / 8; ++h) {
          I8 half;
          std::memcpy(&half, reinterpret_cast<const char*>(&key) + h * sizeof half, sizeof half);
          V c = (__builtin_convertvector(half, V) << 32) | low;
          for (int64_t p = 0; p < k; ++p) {
            const V hi = best[p][h] > c ? best[p][h] : c;
            c = best[p][h] > c ? c : best[p][h];
            best[p][h] = hi;
          }
        }
      }
      for (int64_t l = 0; l < lanes; ++l)
        for (int64_t p = 0; p < k; ++p)
          ip[(t0 + l) * k + p] = 0xFFFFFFFFu - static_cast<uint32_t>(best[p][l / 8][l % 8] & 0xFFFFFFFF);
    }
  });
  return ids;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) { m.def("topk_ids(Tensor scores_TE, int k) -> Tensor"); }
TORCH_LIBRARY_IMPL(moekit, CPU, m) { m.impl("topk_ids", topk_ids); }
