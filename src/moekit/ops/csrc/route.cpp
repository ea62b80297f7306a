// The differentiable half of softmax top-k routing, one pass per row each way: from the
// router logits and the chosen expert ids, the softmax probabilities, the combine weights
// (the chosen probabilities, optionally renormalised over the top k) and the row's
// log-sum-exp (for the ST-MoE z-loss); and back, the logits' gradient from the gradients
// of all three.
//
// Why: in torch this is a softmax, a gather, a sum and a div forward, logsumexp (itself
// five ops) for the z-loss, and as many backward nodes whose gradients are summed into the
// logits. For a router of 8 experts over 2048 tokens each op costs more in dispatch than in
// arithmetic: router, dispatch and losses took ~0.9 ms fwd+bwd of a tiny MoE layer at one
// thread, the router's product 0.24 of it.
//
// Math, per row (p = softmax(x), S = Σ_top p, w_i = p[id_i] / S or p[id_i]):
//   dx_j = p_j (g_j - Σ_l p_l g_l) + dlse · p_j        g = dprobs (+ dw at the ids if not renormalised)
//   renormalised: w is the softmax of the top-k logits, so dx[id_m] += w_m (dw_m - Σ_i w_i dw_i)
// Reference: moe/router/topk_softmax.py's torch path; tests/test_route_kernel.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace {

void check2(const at::Tensor& t, at::ScalarType dt, int64_t rows, int64_t cols, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dt && t.is_contiguous() && t.dim() == 2 &&
                  t.size(0) == rows && t.size(1) == cols,
              "route_softmax: ", name, " must be contiguous (", rows, ", ", cols, ") of ", dt);
}

// The row reductions (row_max, row_dot) run in 16 lanes, then a tree over the lanes: a
// plain loop is one chain of dependent adds (the compiler may not reorder float sums), 4
// cycles per expert. `python benchmarks/kernels.py`, route softmax fwd+bwd of
// (8192, 128, k=4) on 2 threads: 1271 -> 635 us; (4096, 64, k=8): 402 -> 289 us.

// lane j and lane j ^ B of v, swapped
template <int B>
moekit::v16 swapped(moekit::v16 v) {
  return __builtin_shufflevector(v, v, 0 ^ B, 1 ^ B, 2 ^ B, 3 ^ B, 4 ^ B, 5 ^ B, 6 ^ B, 7 ^ B, 8 ^ B, 9 ^ B, 10 ^ B,
                                 11 ^ B, 12 ^ B, 13 ^ B, 14 ^ B, 15 ^ B);
}

// the larger of each lane pair; a NaN in either wins
moekit::v16 nan_max(moekit::v16 a, moekit::v16 b) { return (b > a) | (b != b) ? b : a; }

float row_max(const float* x, int64_t E) {
  moekit::v16 m = moekit::vbroadcast(-std::numeric_limits<float>::infinity());
  int64_t e = 0;
  for (; e + 16 <= E; e += 16) m = nan_max(m, moekit::vload(x + e));
  m = nan_max(m, swapped<8>(m));
  m = nan_max(m, swapped<4>(m));
  m = nan_max(m, swapped<2>(m));
  m = nan_max(m, swapped<1>(m));
  float r = m[0];
  for (; e < E; ++e) r = x[e] > r || x[e] != x[e] ? x[e] : r;
  return r;
}

// Σ a_e (b_e or 1)
float row_dot(const float* a, const float* b, int64_t E) {
  moekit::v16 acc{};
  int64_t e = 0;
  for (; e + 16 <= E; e += 16) acc += b ? moekit::vload(a + e) * moekit::vload(b + e) : moekit::vload(a + e);
  acc += swapped<8>(acc);
  acc += swapped<4>(acc);
  acc += swapped<2>(acc);
  acc += swapped<1>(acc);
  float r = acc[0];
  for (; e < E; ++e) r += b ? a[e] * b[e] : a[e];
  return r;
}

void route_softmax_fwd(const at::Tensor& logits, const at::Tensor& ids, bool renorm, const at::Tensor& probs,
                       const at::Tensor& weights, const at::Tensor& lse) {
  const int64_t T = logits.size(0), E = logits.size(1), K = ids.size(1);
  check2(logits, at::kFloat, T, E, "logits");
  check2(ids, at::kLong, T, K, "ids");
  check2(probs, at::kFloat, T, E, "probs");
  check2(weights, at::kFloat, T, K, "weights");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat && lse.numel() == T,
              "route_softmax: lse must be contiguous float32 (T,)");
  const float* x = logits.data_ptr<float>();
  const int64_t* id = ids.data_ptr<int64_t>();
  float *p = probs.data_ptr<float>(), *w = weights.data_ptr<float>(), *l = lse.data_ptr<float>();
  for (int64_t i = 0; i < T * K; ++i) TORCH_CHECK(id[i] >= 0 && id[i] < E, "route_softmax: expert id ", id[i], " out of range");
  at::parallel_for(0, T, 1024, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* xr = x + t * E;
      float* pr = p + t * E;
      const float m = row_max(xr, E);  // a NaN makes the whole row NaN, as in torch
      constexpr float inf = std::numeric_limits<float>::infinity();
      if (m == -inf) {  // a row of -inf: probs and weights NaN, lse -inf, as torch
        std::fill(pr, pr + E, std::numeric_limits<float>::quiet_NaN());
        std::fill(w + t * K, w + (t + 1) * K, std::numeric_limits<float>::quiet_NaN());
        l[t] = -inf;
        continue;
      }
      const float shift = m == inf ? 0.0f : m;
      // exp_approx vectorizes (libm's exp does not); it clamps, so a -inf logit (a masked
      // expert) is set to 0 here rather than to exp(-87.3)
      for (int64_t e = 0; e < E; ++e) pr[e] = xr[e] == -inf ? 0.0f : moekit::exp_approx(xr[e] - shift);
      const float s = row_dot(pr, nullptr, E);
      const float inv = 1.0f / s;
      for (int64_t e = 0; e < E; ++e) pr[e] *= inv;
      l[t] = std::log(s) + shift;
      float top = 0.0f;
      for (int64_t k = 0; k < K; ++k) top += pr[id[t * K + k]];
      const float scale = renorm ? 1.0f / top : 1.0f;
      for (int64_t k = 0; k < K; ++k) w[t * K + k] = pr[id[t * K + k]] * scale;
    }
  });
}

// any of dprobs, dweights, dlse may be empty (no gradient reached it)
void route_softmax_bwd(const at::Tensor& probs, const at::Tensor& ids, const at::Tensor& weights, bool renorm,
                       const at::Tensor& dprobs, const at::Tensor& dweights, const at::Tensor& dlse,
                       const at::Tensor& dlogits) {
  const int64_t T = probs.size(0), E = probs.size(1), K = ids.size(1);
  check2(probs, at::kFloat, T, E, "probs");
  check2(ids, at::kLong, T, K, "ids");
  check2(weights, at::kFloat, T, K, "weights");
  check2(dlogits, at::kFloat, T, E, "dlogits");
  const bool has_dp = dprobs.numel() > 0, has_dw = dweights.numel() > 0, has_dl = dlse.numel() > 0;
  if (has_dp) check2(dprobs, at::kFloat, T, E, "dprobs");
  if (has_dw) check2(dweights, at::kFloat, T, K, "dweights");
  if (has_dl) TORCH_CHECK(dlse.is_contiguous() && dlse.scalar_type() == at::kFloat && dlse.numel() == T,
                          "route_softmax: dlse must be contiguous float32 (T,)");
  const float *p = probs.data_ptr<float>(), *w = weights.data_ptr<float>();
  const float* dp = has_dp ? dprobs.data_ptr<float>() : nullptr;
  const float* dw = has_dw ? dweights.data_ptr<float>() : nullptr;
  const float* dl = has_dl ? dlse.data_ptr<float>() : nullptr;
  const int64_t* id = ids.data_ptr<int64_t>();
  float* dx = dlogits.data_ptr<float>();
  at::parallel_for(0, T, 1024, [&](int64_t t0, int64_t t1) {
    std::vector<float> g(E);
    for (int64_t t = t0; t < t1; ++t) {
      const float* pr = p + t * E;
      const int64_t* ir = id + t * K;
      float* dxr = dx + t * E;
      for (int64_t e = 0; e < E; ++e) g[e] = has_dp ? dp[t * E + e] : 0.0f;
      if (has_dw && !renorm)
        for (int64_t k = 0; k < K; ++k) g[ir[k]] += dw[t * K + k];
      const float pg = row_dot(pr, g.data(), E);
      const float lse_grad = has_dl ? dl[t] : 0.0f;
      for (int64_t e = 0; e < E; ++e) dxr[e] = pr[e] * (g[e] - pg + lse_grad);
      if (has_dw && renorm) {
        const float* wr = w + t * K;
        float wdw = 0.0f;
        for (int64_t k = 0; k < K; ++k) wdw += wr[k] * dw[t * K + k];
        for (int64_t k = 0; k < K; ++k) dxr[ir[k]] += wr[k] * (dw[t * K + k] - wdw);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("route_softmax_fwd(Tensor logits, Tensor ids, bool renorm, Tensor(a!) probs, Tensor(b!) weights, "
        "Tensor(c!) lse) -> ()");
  m.def("route_softmax_bwd(Tensor probs, Tensor ids, Tensor weights, bool renorm, Tensor dprobs, Tensor dweights, "
        "Tensor dlse, Tensor(a!) dlogits) -> ()");
}
TORCH_LIBRARY_IMPL(moekit, CPU, m) {
  m.impl("route_softmax_fwd", route_softmax_fwd);
  m.impl("route_softmax_bwd", route_softmax_bwd);
}
