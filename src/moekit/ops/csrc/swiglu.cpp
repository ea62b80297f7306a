// SwiGLU for the expert bank, forward and backward each in one pass over the rows.
//
// h = [g | u] (the fused gate/up product), a = silu(g) * u, scaled by the row's routing
// weight w. The torch version (moe/experts/cpu/chunked.py: _act_fwd/_act_grads, the
// reference) makes 3 passes in the forward (silu, mul, scale) and 8 in the backward
// (silu and mul to recompute a, a dot with the output gradient for dw, two scalings,
// two muls and silu_backward), each a read and write of an R x F array; here each
// element of g, u and the incoming gradient is read once and each output written once.
// Measured on the reference machine: see ops/swiglu.py.
//
// exp: vec_math.h's polynomial, which vectorizes with the row loop.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "swiglu_rows.h"
#include "vec_math.h"

namespace {

using moekit::bwd_row;
using moekit::fwd_row;

int64_t grain(int64_t F) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, F)); }

void check(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "swiglu: ", name, " must be CPU float32");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "swiglu: ", name, " must be (",
              rows, ", ", cols, "), got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1, "swiglu: rows of ", name, " must be contiguous");
}

// a[r] = silu(g[r]) * u[r] * (r < n ? w[r] : 1); n = w.numel() (0: no scaling)
void swiglu_fwd(const at::Tensor& h, const at::Tensor& w, const at::Tensor& a) {
  const int64_t m = h.size(0), F = h.size(1) / 2, n = w.numel();
  check(h, "h", m, 2 * F);
  check(a, "out", m, F);
  TORCH_CHECK(n <= m && w.scalar_type() == at::kFloat && w.is_contiguous(), "swiglu: w must be float32, at most ", m, " rows");
  const float* hp = h.data_ptr<float>();
  const float* wp = n ? w.data_ptr<float>() : nullptr;
  float* ap = a.data_ptr<float>();
  const int64_t sh = h.stride(0), sa = a.stride(0);
  at::parallel_for(0, m, grain(F), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = hp + r * sh;
      const float* u = g + F;
      float* out = ap + r * sa;
      fwd_row(g, u, r < n ? wp[r] : 1.0f, out, F);
    }
  });
}

// With ub the gradient reaching a before the routing weight (dy · W_out):
//   dw[r] = <ub[r], a[r]>              (need_dw; rows < n)
//   a_out[r] = a[r] · w[r]             (need_a: the left operand of dW_out)
//   dh[r] = [ub·w·u·silu'(g) | ub·w·silu(g)]
// Rows >= n (zero padding) take w = 0: their dh and a_out are written as zeros.
void swiglu_bwd(const at::Tensor& h, const at::Tensor& ub, const at::Tensor& w, const at::Tensor& dh,
                const at::Tensor& a_out, const at::Tensor& dw, bool need_a, bool need_dw) {
  const int64_t m = h.size(0), F = h.size(1) / 2, n = w.numel();
  check(h, "h", m, 2 * F);
  check(ub, "ub", m, F);
  check(dh, "dh", m, 2 * F);
  if (need_a) check(a_out, "a_out", m, F);
  TORCH_CHECK(n <= m && w.scalar_type() == at::kFloat && w.is_contiguous(), "swiglu: w must be float32, at most ", m, " rows");
  TORCH_CHECK(!need_dw || (dw.numel() == n && dw.scalar_type() == at::kFloat && dw.is_contiguous()),
              "swiglu: dw must be float32 of ", n, " elements");
  const float* hp = h.data_ptr<float>();
  const float* up = ub.data_ptr<float>();
  const float* wp = n ? w.data_ptr<float>() : nullptr;
  float* dhp = dh.data_ptr<float>();
  float* ap = need_a ? a_out.data_ptr<float>() : nullptr;
  float* dwp = need_dw ? dw.data_ptr<float>() : nullptr;
  const int64_t sh = h.stride(0), su = ub.stride(0), sd = dh.stride(0), sa = need_a ? a_out.stride(0) : 0;
  at::parallel_for(0, m, grain(F), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = hp + r * sh;
      float* dg = dhp + r * sd;
      const float wr = r < n ? wp[r] : 0.0f;
      const float dot = need_a ? bwd_row<true>(g, g + F, up + r * su, wr, dg, dg + F, ap + r * sa, F)
                               : bwd_row<false>(g, g + F, up + r * su, wr, dg, dg + F, nullptr, F);
      if (need_dw && r < n) dwp[r] = dot;
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("swiglu_fwd(Tensor h, Tensor w, Tensor(a!) out) -> ()");
  m.def("swiglu_bwd(Tensor h, Tensor ub, Tensor w, Tensor(a!) dh, Tensor(b!) a_out, Tensor(c!) dw, "
        "bool need_a, bool need_dw) -> ()");
}
TORCH_LIBRARY_IMPL(moekit, CPU, m) {
  m.impl("swiglu_fwd", swiglu_fwd);
  m.impl("swiglu_bwd", swiglu_bwd);
}
