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
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t e = 0; e < E; ++e) m = std::max(m, xr[e]);  // NaN: std::max keeps m, the sum below turns NaN
      const float shift = std::isinf(m) ? 0.0f : m;  // a row of -inf: lse -inf and probs NaN, as torch
      float s = 0.0f;
      for (int64_t e = 0; e < E; ++e) pr[e] = moekit::exp_approx(xr[e] - shift);  // vectorizes; libm's exp does not
      for (int64_t e = 0; e < E; ++e) s += pr[e];
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
      float pg = 0.0f;
      for (int64_t e = 0; e < E; ++e) pg += pr[e] * g[e];
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
