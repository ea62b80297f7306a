// One decode step of an MoE FFN: the routed SwiGLU experts, their weighted combine and
// an optional shared SwiGLU expert (with its optional sigmoid gate), in two parallel
// passes over the weights.
//
// Why: at decode (1-8 tokens) the layer is bound by reading the active experts' weights
// once. As torch calls (gather, a grouped mat-vec, activation, scaling, another grouped
// mat-vec, scatter-add, then the shared expert's two mat-vecs, activation and add) a step
// pays ~12 calls' fixed costs and 5 fork/joins of the thread pool, and the shared expert
// reads its weights in two more passes. Here:
//   pass 1  every routed row and every token's shared row: a = silu(x·W_g) · (x·W_u) · s
//           (s = routing weight, or the shared gate, or 1), the gate and up rows of W_in
//           in the same work item (gate rows first, then up rows) so the activation
//           needs no second pass;
//   pass 2  the output's D columns split over the threads: each adds every expert's
//           W_out rows for its columns to y, so no two threads write the same element.
// Reference: ops/decode_ffn.py's experts_step_reference and the staged layer (the expert bank and the shared
// FFN); tests/test_decode.py holds the parity tests.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "vec_math.h"

namespace {

constexpr int MAX_NR = 8;  // rows per dot-product batch (8 x 32 accumulators fit 16 zmm registers)

// out[i] = <w, a[i]> for n <= MAX_NR rows
inline void dots_n(int n, const float* w, const float* const* a, int64_t K, float* out) {
  switch (n) {
    case 1: moekit::dots<1>(w, a, K, out, 1); break;
    case 2: moekit::dots<2>(w, a, K, out, 1); break;
    case 3: moekit::dots<3>(w, a, K, out, 1); break;
    case 4: moekit::dots<4>(w, a, K, out, 1); break;
    case 5: moekit::dots<5>(w, a, K, out, 1); break;
    case 6: moekit::dots<6>(w, a, K, out, 1); break;
    case 7: moekit::dots<7>(w, a, K, out, 1); break;
    default: moekit::dots<8>(w, a, K, out, 1); break;
  }
}

// One FFN's rows: the routed rows of one expert, or every token for the shared expert.
struct Group {
  const float* w_in;   // (2F, D): gate rows, then up rows; rows w_in_stride apart
  const float* w_out;  // (D, F); rows w_out_stride apart
  int64_t w_in_stride, w_out_stride, F;
  const int64_t* tok;  // token of each row
  const float* scale;  // factor of each row's activation
  int64_t n;           // rows
  float* a;            // (n, F) activations
};

void check_weight(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == dim && t.stride(-1) == 1,
              "moe_decode: ", name, " must be a CPU float32 tensor of ", dim, " dims with contiguous rows");
}

constexpr int64_t MAX_F_BLOCK = 64;  // gate/up rows per pass-1 item, at most

// pass 1 for the rows of g: a[:, f] for f in [f0, f1), f1 - f0 <= MAX_F_BLOCK. The gate
// rows of the block are read first, then the up rows: two sequential runs of memory
// rather than hops between two regions every row (measured, the layer's decode step
// against alternating rows: 0.93-0.99 of the time; pass 1 alone had run 13% slower than
// a sum() over the same W_in rows)
void activations(const Group& g, const float* x, int64_t D, int64_t f0, int64_t f1) {
  const float* rows[MAX_NR];
  float gv[MAX_F_BLOCK][MAX_NR], uv[MAX_NR];
  for (int64_t i0 = 0; i0 < g.n; i0 += MAX_NR) {
    const int nr = static_cast<int>(std::min<int64_t>(MAX_NR, g.n - i0));
    for (int i = 0; i < nr; ++i) rows[i] = x + g.tok[i0 + i] * D;
    for (int64_t f = f0; f < f1; ++f) dots_n(nr, g.w_in + f * g.w_in_stride, rows, D, gv[f - f0]);
    for (int64_t f = f0; f < f1; ++f) {
      dots_n(nr, g.w_in + (g.F + f) * g.w_in_stride, rows, D, uv);
      const float* gf = gv[f - f0];
      for (int i = 0; i < nr; ++i)
        g.a[(i0 + i) * g.F + f] = gf[i] * moekit::sigmoid(gf[i]) * uv[i] * g.scale[i0 + i];
    }
  }
}

// pass 2 for the rows of g: y[tok, d] += <W_out[d], a> for d in [d0, d1)
void combine(const Group& g, float* y, int64_t D, int64_t d0, int64_t d1) {
  const float* rows[MAX_NR];
  float out[MAX_NR];
  for (int64_t i0 = 0; i0 < g.n; i0 += MAX_NR) {
    const int nr = static_cast<int>(std::min<int64_t>(MAX_NR, g.n - i0));
    for (int i = 0; i < nr; ++i) rows[i] = g.a + (i0 + i) * g.F;
    for (int64_t d = d0; d < d1; ++d) {
      dots_n(nr, g.w_out + d * g.w_out_stride, rows, g.F, out);
      for (int i = 0; i < nr; ++i) y[g.tok[i0 + i] * D + d] += out[i];
    }
  }
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "moe_decode: x must be a contiguous CPU float32 (T, D) tensor");
}

// x (T, D); tok_R, weights_R: the routed rows sorted by expert, counts_E the rows of each
// expert (in order); w_in (E, 2F, D), w_out (E, D, F);
// s_in (2Fs, D), s_out (D, Fs), s_gate (D): the shared expert, all three optional.
at::Tensor moe_decode_swiglu(const at::Tensor& x, const at::Tensor& tok_R, const at::Tensor& weights_R,
                             const at::Tensor& counts_E, const at::Tensor& w_in, const at::Tensor& w_out,
                             const std::optional<at::Tensor>& s_in, const std::optional<at::Tensor>& s_out,
                             const std::optional<at::Tensor>& s_gate) {
  check_x(x);
  check_weight(w_in, "w_in", 3);
  check_weight(w_out, "w_out", 3);
  const int64_t T = x.size(0), D = x.size(1), E = w_in.size(0), F = w_out.size(2), R = tok_R.numel();
  TORCH_CHECK(w_in.size(1) == 2 * F && w_in.size(2) == D && w_out.size(0) == E && w_out.size(1) == D,
              "moe_decode_swiglu: w_in must be (E, 2F, D) and w_out (E, D, F); got ", w_in.sizes(), " and ", w_out.sizes());
  TORCH_CHECK(tok_R.scalar_type() == at::kLong && tok_R.is_contiguous() && weights_R.scalar_type() == at::kFloat &&
                  weights_R.is_contiguous() && weights_R.numel() == R,
              "moe_decode_swiglu: tok_R must be contiguous int64 and weights_R contiguous float32 of the same length");
  TORCH_CHECK(counts_E.scalar_type() == at::kLong && counts_E.is_contiguous() && counts_E.numel() == E,
              "moe_decode_swiglu: counts must be contiguous int64 of length E = ", E);
  std::vector<int64_t> o(E + 1, 0);  // rows of expert e: [o[e], o[e + 1])
  const int64_t* c = counts_E.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(c[e] >= 0, "moe_decode_swiglu: counts must not be negative");
    o[e + 1] = o[e] + c[e];
  }
  TORCH_CHECK(o[E] == R, "moe_decode_swiglu: counts sum to ", o[E], ", not R = ", R);
  const int64_t* tok = tok_R.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(tok[r] >= 0 && tok[r] < T, "moe_decode_swiglu: token index out of range");
  const bool shared = s_in.has_value() && s_in->defined();
  TORCH_CHECK(shared == (s_out.has_value() && s_out->defined()), "moe_decode_swiglu: give both s_in and s_out, or neither");

  const float* xp = x.data_ptr<float>();
  at::Tensor a_R = at::empty({R, F}, x.options());
  std::vector<Group> groups;
  for (int64_t e = 0; e < E; ++e)
    if (o[e + 1] > o[e])
      groups.push_back({w_in.data_ptr<float>() + e * w_in.stride(0), w_out.data_ptr<float>() + e * w_out.stride(0),
                        w_in.stride(1), w_out.stride(1), F, tok + o[e], weights_R.data_ptr<float>() + o[e],
                        o[e + 1] - o[e], a_R.data_ptr<float>() + o[e] * F});
  at::Tensor a_s, tok_s, scale_s;
  if (shared) {
    check_weight(*s_in, "s_in", 2);
    check_weight(*s_out, "s_out", 2);
    const int64_t Fs = s_out->size(1);
    TORCH_CHECK(s_in->size(0) == 2 * Fs && s_in->size(1) == D && s_out->size(0) == D,
                "moe_decode_swiglu: s_in must be (2Fs, D) and s_out (D, Fs); got ", s_in->sizes(), " and ", s_out->sizes());
    a_s = at::empty({T, Fs}, x.options());
    tok_s = at::arange(T, tok_R.options());
    scale_s = at::ones({T}, x.options());
    if (s_gate.has_value() && s_gate->defined()) {  // Qwen2-MoE: sigmoid(<g, x_t>) scales the shared expert
      check_weight(*s_gate, "s_gate", 1);
      TORCH_CHECK(s_gate->size(0) == D, "moe_decode_swiglu: s_gate must have D = ", D, " elements");
      const float* gp = s_gate->data_ptr<float>();
      float* sp = scale_s.data_ptr<float>();
      for (int64_t t = 0; t < T; ++t) {
        const float* row[1] = {xp + t * D};
        moekit::dots<1>(gp, row, D, sp + t, 1);
        sp[t] = moekit::sigmoid(sp[t]);
      }
    }
    groups.push_back({s_in->data_ptr<float>(), s_out->data_ptr<float>(), s_in->stride(0), s_out->stride(0), Fs,
                      tok_s.data_ptr<int64_t>(), scale_s.data_ptr<float>(), T, a_s.data_ptr<float>()});
  }

  // pass 1 work items: (group, block of f) with ~512 KiB of W_in rows each (two runs of
  // 256 KiB: gate rows, up rows), still several per expert to share out. Against 64 KiB
  // items, in one process with the order alternating (as benchmarks/layer.py's decode
  // harness): the layer's decode step 0.93-0.97 of the time, fine and coarse, T = 1
  const int64_t f_block = std::clamp<int64_t>((512 * 1024) / (8 * std::max<int64_t>(1, D)), 1, MAX_F_BLOCK);
  std::vector<std::pair<int64_t, int64_t>> items;  // (group, f0)
  for (size_t g = 0; g < groups.size(); ++g)
    for (int64_t f0 = 0; f0 < groups[g].F; f0 += f_block) items.emplace_back(g, f0);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Group& g = groups[items[i].first];
      activations(g, xp, D, items[i].second, std::min(g.F, items[i].second + f_block));
    }
  });

  // pass 2: blocks of output columns, each summing every group's W_out rows for them
  at::Tensor y = at::zeros({T, D}, x.options());
  float* yp = y.data_ptr<float>();
  constexpr int64_t d_block = 16;
  // (static split: each thread gets one contiguous range of columns, so it streams
  // through one block of each W_out; handing out blocks dynamically measured no better)
  at::parallel_for(0, (D + d_block - 1) / d_block, 1, [&](int64_t b0, int64_t b1) {
    const int64_t d0 = b0 * d_block, d1 = std::min(D, b1 * d_block);
    for (const Group& g : groups) combine(g, yp, D, d0, d1);
  });
  return y;
}

// Orders expert ids by a score, largest first: NaN above everything, ties to the lower
// id (as ops/topk.py's kernel)
struct Above {
  const float* v;
  bool operator()(int64_t a, int64_t b) const {
    const bool na = std::isnan(v[a]), nb = std::isnan(v[b]);
    if (na != nb) return na;
    if (!na && v[a] != v[b]) return v[a] > v[b];
    return a < b;
  }
};

// How the router turns one token's logits into expert ids and weights.
struct RouteSpec {
  int64_t E, k;
  bool sigmoid;          // topk_sigmoid (DeepSeek-V3) rather than topk_softmax
  bool after;            // softmax: over the k chosen logits (GPT-OSS) rather than all
  bool normalize;        // weights renormalised to sum to 1
  float scale;           // sigmoid: routed_scaling_factor
  const float* sel_bias; // sigmoid: the aux-loss-free balancing bias (selection only), or null
  int64_t n_group, topk_group;  // sigmoid: group-limited selection
};

// One token: probs (the Routing's probs_TE), ids and weights, as moe/router/topk_softmax.py
// and topk_sigmoid.py compute them. order and sel are scratch of E elements.
void route_token(const RouteSpec& r, const float* l, float* p, int64_t* ids, float* w,
                 std::vector<int64_t>& order, std::vector<float>& sel) {
  const int64_t E = r.E, k = r.k;
  for (int64_t e = 0; e < E; ++e) order[e] = e;
  float wsum = 0.0f;
  if (!r.sigmoid) {
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t e = 0; e < E; ++e) mx = std::max(mx, l[e]);
    for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(l[e] - mx));
    for (int64_t e = 0; e < E; ++e) p[e] /= sum;
    std::partial_sort(order.begin(), order.begin() + k, order.end(), Above{l});
    const float lmax = l[order[0]];
    for (int64_t j = 0; j < k; ++j) {
      ids[j] = order[j];
      wsum += (w[j] = r.after ? std::exp(l[order[j]] - lmax) : p[order[j]]);
    }
    if (r.after || r.normalize)
      for (int64_t j = 0; j < k; ++j) w[j] /= wsum;
    return;
  }
  float ssum = 0.0f;
  for (int64_t e = 0; e < E; ++e) {
    p[e] = 1.0f / (1.0f + std::exp(-l[e]));  // the score; probs = scores / their sum, below
    sel[e] = p[e] + (r.sel_bias ? r.sel_bias[e] : 0.0f);
    ssum += p[e];
  }
  if (r.n_group > 1) {  // keep the topk_group groups with the best sum of two best scores
    const int64_t G = r.n_group, per = E / G;
    std::vector<float> gs(G);
    std::vector<int64_t> gorder(G);
    for (int64_t g = 0; g < G; ++g) {
      std::partial_sort(order.begin() + g * per, order.begin() + g * per + 2, order.begin() + (g + 1) * per,
                        Above{sel.data()});
      gs[g] = sel[order[g * per]] + sel[order[g * per + 1]];
      gorder[g] = g;
    }
    std::partial_sort(gorder.begin(), gorder.begin() + r.topk_group, gorder.end(), Above{gs.data()});
    std::vector<char> keep(G, 0);
    for (int64_t j = 0; j < r.topk_group; ++j) keep[gorder[j]] = 1;
    for (int64_t e = 0; e < E; ++e) {
      order[e] = e;
      if (!keep[e / per]) sel[e] = -INFINITY;
    }
  }
  std::partial_sort(order.begin(), order.begin() + k, order.end(), Above{sel.data()});
  for (int64_t j = 0; j < k; ++j) {
    ids[j] = order[j];
    wsum += (w[j] = p[order[j]]);
  }
  for (int64_t j = 0; j < k; ++j) w[j] = (r.normalize ? w[j] / (wsum + 1e-20f) : w[j]) * r.scale;
  for (int64_t e = 0; e < E; ++e) p[e] /= ssum;
}

// The whole layer step for the top-k routers with dropless dispatch (moe/router/
// topk_softmax.py, topk_sigmoid.py, ops/sort.py; inference/fused_decode.py is the Python side
// and names the staged path it must equal): fp32 logits x·Wᵀ (+ b) split over the
// threads by expert rows; per token the router's ids and weights (route_token); the
// slots sorted by (expert, choice, token) as sort_slots_by_expert; then
// moe_decode_swiglu. Returns y and every tensor the staged Routing and DispatchPlan hold.
std::vector<at::Tensor> moe_decode_topk(
    const at::Tensor& x, const at::Tensor& router_w, const std::optional<at::Tensor>& router_b,
    const std::optional<at::Tensor>& sel_bias, int64_t k, bool sigmoid, bool after, bool normalize, double scale,
    int64_t n_group, int64_t topk_group, const at::Tensor& w_in, const at::Tensor& w_out,
    const std::optional<at::Tensor>& s_in, const std::optional<at::Tensor>& s_out,
    const std::optional<at::Tensor>& s_gate) {
  check_x(x);
  check_weight(router_w, "router_w", 2);
  const int64_t T = x.size(0), D = x.size(1), E = router_w.size(0);
  TORCH_CHECK(router_w.size(1) == D, "moe_decode: router_w must be (E, D = ", D, "), got ", router_w.sizes());
  TORCH_CHECK(k >= 1 && k <= E, "moe_decode: k must be in [1, E = ", E, "], got ", k);
  TORCH_CHECK(n_group >= 1 && E % n_group == 0 && topk_group >= 1 && topk_group <= n_group &&
                  (n_group == 1 || E / n_group >= 2) && k <= topk_group * (E / n_group),
              "moe_decode: groups must split E = ", E, " evenly (two or more experts each) and hold k");
  const float* bp = nullptr;
  if (router_b.has_value() && router_b->defined()) {
    check_weight(*router_b, "router_b", 1);
    TORCH_CHECK(router_b->size(0) == E, "moe_decode: router_b must have E = ", E, " elements");
    bp = router_b->data_ptr<float>();
  }
  const float* sbp = nullptr;
  if (sel_bias.has_value() && sel_bias->defined()) {
    check_weight(*sel_bias, "sel_bias", 1);
    TORCH_CHECK(sel_bias->size(0) == E, "moe_decode: sel_bias must have E = ", E, " elements");
    sbp = sel_bias->data_ptr<float>();
  }
  at::Tensor logits = at::empty({T, E}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = router_w.data_ptr<float>();
  float* lp = logits.data_ptr<float>();
  const int64_t sw = router_w.stride(0);
  constexpr int64_t e_block = 8;
  at::parallel_for(0, (E + e_block - 1) / e_block, 1, [&](int64_t b0, int64_t b1) {
    const float* rows[MAX_NR];
    float out[MAX_NR];
    for (int64_t t0 = 0; t0 < T; t0 += MAX_NR) {
      const int nr = static_cast<int>(std::min<int64_t>(MAX_NR, T - t0));
      for (int i = 0; i < nr; ++i) rows[i] = xp + (t0 + i) * D;
      for (int64_t e = b0 * e_block; e < std::min(E, b1 * e_block); ++e) {
        dots_n(nr, wp + e * sw, rows, D, out);
        for (int i = 0; i < nr; ++i) lp[(t0 + i) * E + e] = out[i] + (bp ? bp[e] : 0.0f);
      }
    }
  });

  at::Tensor probs = at::empty({T, E}, x.options());
  at::Tensor ids = at::empty({T, k}, x.options().dtype(at::kLong));
  at::Tensor weights = at::empty({T, k}, x.options());
  int64_t* ip = ids.data_ptr<int64_t>();
  float* wtp = weights.data_ptr<float>();
  const RouteSpec spec{E, k, sigmoid, after, normalize, static_cast<float>(scale), sbp, n_group, topk_group};
  std::vector<int64_t> order(E);
  std::vector<float> sel(E);
  for (int64_t t = 0; t < T; ++t)
    route_token(spec, lp + t * E, probs.data_ptr<float>() + t * E, ip + t * k, wtp + t * k, order, sel);

  // dropless dispatch: slots t*k + j by (expert, j, t)
  const int64_t R = T * k;
  at::Tensor counts = at::zeros({E}, ids.options());
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) ++cp[ip[r]];
  std::vector<int64_t> next(E, 0);
  for (int64_t e = 1; e < E; ++e) next[e] = next[e - 1] + cp[e - 1];
  at::Tensor slot_idx = at::empty({R}, ids.options());
  at::Tensor tok = at::empty({R}, ids.options());
  at::Tensor weights_R = at::empty({R}, x.options());
  int64_t* sp = slot_idx.data_ptr<int64_t>();
  int64_t* tp = tok.data_ptr<int64_t>();
  float* wrp = weights_R.data_ptr<float>();
  for (int64_t j = 0; j < k; ++j)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t r = next[ip[t * k + j]]++;
      sp[r] = t * k + j;
      tp[r] = t;
      wrp[r] = wtp[t * k + j];
    }
  at::Tensor y = moe_decode_swiglu(x, tok, weights_R, counts, w_in, w_out, s_in, s_out, s_gate);
  return {y, logits, probs, ids, weights, tok, slot_idx, weights_R, counts};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("moe_decode_topk(Tensor x, Tensor router_w, Tensor? router_b, Tensor? sel_bias, int k, bool sigmoid, "
        "bool after, bool normalize, float scale, int n_group, int topk_group, Tensor w_in, Tensor w_out, "
        "Tensor? s_in, Tensor? s_out, Tensor? s_gate) -> Tensor[]");
  m.def("moe_decode_swiglu(Tensor x, Tensor tok_R, Tensor weights_R, Tensor counts_E, Tensor w_in, "
        "Tensor w_out, Tensor? s_in, Tensor? s_out, Tensor? s_gate) -> Tensor");
}
TORCH_LIBRARY_IMPL(moekit, CPU, m) {
  m.impl("moe_decode_swiglu", moe_decode_swiglu);
  m.impl("moe_decode_topk", moe_decode_topk);
}
