// The SwiGLU expert bank's inference forward with threads owning tokens and experts'
// activations in columns (moe/experts/by_expert.py: _columns says when it runs).
//
// Why: expert_bank.cpp's forward hands whole experts to threads. Their output rows land
// in a (T·K, D) slot buffer that ops/rows.py: sum_slots then reads back (64 MiB on the
// "many" layer, written and read through memory), and each expert's weights are
// transposed for oneDNN's brgemm, which read them from memory a cold miss at a time. Here
// each thread owns a range of tokens and runs every expert, in order, on its own tokens'
// rows, so it can add each output row straight into y: no other thread writes that row.
// The products put the expert's weight on the left as it lies (gemm_cols.h), so nothing
// is transposed but the activations, in registers on their way in and out:
//   xᵀ (D x n) = gathered rows of x;  hᵀ = W_in · xᵀ;  aᵀ = silu(gᵀ) · uᵀ · w;
//   oᵀ = W_out · aᵀ;  y[t] += column of oᵀ.
// Each thread reads every expert's weights (the two threads nearly together), and a
// column count is padded to whole 16-wide vectors per expert and thread.
// Measured on the "many" layer (benchmarks/ab.py --switch columns, forward, 2 threads)
// against the whole-experts forward and sum_slots: see docs/design.md.
//
// A token's output is the sum of its rows' outputs in row order (experts in order), each
// row's output one chain of FMAs per element: the result does not depend on the thread
// count. Tokens that no row names (all their slots dropped) get zeros.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "bank_inputs.h"
#include "gemm_cols.h"
#include "transpose_tile.h"
#include "vec_math.h"

namespace {

using moekit::v16;

// Columns c0 .. of xᵀ (D x ldd) for c < n: the rows x[idx[c]], each 16 x 16 block
// transposed in registers; columns n .. of the last vector are zero. The next 16 rows are
// prefetched a line each per block, while this group is transposed.
void gather_cols(const float* x, int64_t D, const int64_t* idx, int64_t n, const float* zeros, float* xT,
                 int64_t ldd) {
  for (int64_t c0 = 0; c0 < n; c0 += 16) {
    const float *row[16], *next[16];
    for (int i = 0; i < 16; ++i) {
      row[i] = c0 + i < n ? x + idx[c0 + i] * D : zeros;
      next[i] = c0 + 16 + i < n ? x + idx[c0 + 16 + i] * D : nullptr;
    }
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      for (int i = 0; i < 16; ++i)
        if (next[i] != nullptr) __builtin_prefetch(next[i] + d0, 0, 3);
      v16 r[16];
      for (int i = 0; i < 16; ++i) r[i] = moekit::vload(row[i] + d0);
      moekit::transpose_regs(r);
      for (int i = 0; i < 16; ++i) moekit::vstore(xT + (d0 + i) * ldd + c0, r[i]);
    }
  }
}

// aᵀ (F x nc, row stride ld) = silu(gᵀ) · uᵀ · w, hᵀ = [gᵀ; uᵀ] (2F x nc): the routing
// weight of column c is w[c] (zero for padding columns). The same operations, in the same
// order, as swiglu_rows.h: fwd_row
void swiglu_cols(const float* hT, int64_t F, int64_t nc, int64_t ld, const float* w, float* aT) {
  for (int64_t f = 0; f < F; ++f) {
    const float *g = hT + f * ld, *u = hT + (F + f) * ld;
    float* a = aT + f * ld;
    for (int64_t c = 0; c < nc; ++c) a[c] = g[c] * moekit::sigmoid(g[c]) * u[c] * w[c];
  }
}

// y rows idx[c] (+)= column c of oᵀ (D x ldo), c < n: written at a token's first row
// (seen[token - t0] still 0), added to after
void scatter_cols(const float* oT, int64_t ldo, int64_t D, const int64_t* idx, int64_t n, float* y,
                  uint8_t* seen, int64_t t0) {
  for (int64_t c0 = 0; c0 < n; c0 += 16) {
    const int cnt = static_cast<int>(std::min<int64_t>(16, n - c0));
    float *row[16], *next[16];
    bool add[16];
    for (int i = 0; i < 16; ++i) {
      next[i] = c0 + 16 + i < n ? y + idx[c0 + 16 + i] * D : nullptr;
      if (i >= cnt) continue;
      row[i] = y + idx[c0 + i] * D;
      add[i] = seen[idx[c0 + i] - t0] != 0;  // a token twice in one group: its second row adds
      seen[idx[c0 + i] - t0] = 1;
    }
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      for (int i = 0; i < 16; ++i)
        if (next[i] != nullptr) __builtin_prefetch(next[i] + d0, 1, 3);
      v16 r[16];
      for (int i = 0; i < 16; ++i) r[i] = moekit::vload(oT + (d0 + i) * ldo + c0);
      moekit::transpose_regs(r);
      for (int i = 0; i < cnt; ++i) moekit::vstore(row[i] + d0, add[i] ? moekit::vload(row[i] + d0) + r[i] : r[i]);
    }
  }
}

// The calling thread's n floats: one block per thread that only grows (fresh buffers on
// every call were fresh pages to fault in, expert_bank.cpp says how costly)
float* thread_floats(int64_t n) {
  thread_local std::vector<float> store;
  if (static_cast<int64_t>(store.size()) < n) store.resize(n);
  return store.data();
}

// Columns per pass through an expert: xᵀ (D x 192 + 16) and hᵀ stay in a core's L2.
constexpr int64_t PIECE = 192;

// y = Σ over each token's rows of w · (silu(x W_gᵀ) · x W_uᵀ) W_outᵀ. The rows are sorted
// by expert, counts[e] of them for expert e (counts may stop before the last expert).
void bank_fwd_cols(const at::Tensor& x, const at::Tensor& tok, const at::Tensor& wts, const at::Tensor& counts,
                   const at::Tensor& w_in, const at::Tensor& w_out, const at::Tensor& y) {
  moekit::bank::check_inputs(x, tok, wts, w_in, w_out);
  const int64_t T = x.size(0), D = x.size(1), F = w_out.size(2), N = 2 * F, E = w_in.size(0);
  TORCH_CHECK(D % 16 == 0, "expert_bank_fwd_cols: the model width must be a multiple of 16, got ", D);
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && y.sizes() == x.sizes(),
              "expert_bank_fwd_cols: y must be contiguous float32 like x");
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.dim() == 1 && counts.is_contiguous() &&
                  counts.numel() <= E, "expert_bank_fwd_cols: counts must be contiguous int64 with at most ", E,
              " entries");
  std::vector<int64_t> start{0};
  const int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t e = 0; e < counts.numel(); ++e) {
    TORCH_CHECK(cp[e] >= 0, "expert_bank_fwd_cols: expert ", e, " has a negative count ", cp[e]);
    start.push_back(start.back() + cp[e]);
  }
  TORCH_CHECK(start.back() == tok.numel(), "expert_bank_fwd_cols: the counts add up to ", start.back(), " rows, not ",
              tok.numel());
  const int64_t* tp = tok.data_ptr<int64_t>();
  const float* wp = wts.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* win = w_in.data_ptr<float>();
  const float* wout = w_out.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t busiest = counts.numel() ? *std::max_element(cp, cp + counts.numel()) : 0;
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), T / 64));
  std::vector<int64_t> experts;  // those with rows, in order
  for (int64_t e = 0; e < counts.numel(); ++e)
    if (cp[e] > 0) experts.push_back(e);
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    const int64_t t0 = T * p0 / P, t1 = T * p1 / P;  // this thread's tokens
    constexpr int64_t W = PIECE + 16;                // the widest row stride
    float* xT = thread_floats((2 * D + N + F) * W + D + W);
    float *hT = xT + D * W, *aT = hT + N * W, *oT = aT + F * W, *wc = oT + D * W, *zeros = wc + W;
    std::fill(zeros, zeros + D, 0.0f);
    std::vector<int64_t> idx(busiest);
    std::vector<float> wr(busiest);
    std::vector<uint8_t> seen(t1 - t0, 0);
    for (size_t j = 0; j < experts.size(); ++j) {
      const int64_t e = experts[j];
      int64_t n = 0;
      for (int64_t r = start[e]; r < start[e + 1]; ++r)
        if (tp[r] >= t0 && tp[r] < t1) {
          idx[n] = tp[r];
          wr[n++] = wp[r];
        }
      const float *wi = win + e * N * D, *wo = wout + e * D * F;
      // the weight read after this expert's last product, prefetched during it
      const float* next = j + 1 < experts.size() ? win + experts[j + 1] * N * D : nullptr;
      const int64_t pieces = (n + PIECE - 1) / PIECE;
      for (int64_t q = 0, q0 = 0; q < pieces; ++q) {
        // pieces of equal width, padded to whole vectors. The row stride is an odd number
        // of cache lines: a power-of-two stride maps the rows onto few L1 sets (harness:
        // 128 columns at 208 GFLOP/s against 224-229 for 112 and 144)
        const int64_t nq = (n - q0) / (pieces - q), nc = (nq + 15) / 16 * 16, ld = nc | 16;
        gather_cols(xp, D, idx.data() + q0, nq, zeros, xT, ld);
        moekit::cols::gemm(N, nc, D, wi, D, xT, ld, hT, ld, wo, F);
        for (int64_t c = 0; c < nc; ++c) wc[c] = c < nq ? wr[q0 + c] : 0.0f;
        swiglu_cols(hT, F, nc, ld, wc, aT);
        moekit::cols::gemm(D, nc, F, wo, F, aT, ld, oT, ld, q + 1 == pieces ? next : wi, D);
        scatter_cols(oT, ld, D, idx.data() + q0, nq, yp, seen.data(), t0);
        q0 += nq;
      }
    }
    for (int64_t t = t0; t < t1; ++t)  // tokens no row names: nothing from the bank
      if (!seen[t - t0]) std::memset(yp + t * D, 0, D * sizeof(float));
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("expert_bank_fwd_cols(Tensor x, Tensor tok, Tensor weights, Tensor counts, Tensor w_in, Tensor w_out, "
        "Tensor(a!) y) -> ()");
}
TORCH_LIBRARY_IMPL(moekit, CPU, m) { m.impl("expert_bank_fwd_cols", bank_fwd_cols); }
