// The SwiGLU expert bank's forward with threads owning tokens and experts' activations
// in columns (moe/experts/cpu/path.py says when it runs). A training forward
// also writes each row's pre-activations for expert_bank.cpp's backward.
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
// column count is padded to whole 16-wide vectors per expert and thread. A thread out
// of work takes pieces of another's (bank_owned.h).
// many forward: 0.887 of the time of whole experts and summed slots
// (`python benchmarks/ab.py --config many --mode fwd --a kernel=whole --b kernel=columns`).
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

#include "bank_common.h"
#include "bank_owned.h"
#include "gemm_cols.h"
#include "transpose_tile.h"
#include "vec_math.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

#ifdef __AVX512F__
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

// Columns c0 .. c0+cnt-1 of srcᵀ (W x ld) into the rows row[0 .. cnt-1] (W wide):
// added to where add[i], else written. 16 x 16 blocks are transposed in registers; the
// lines of next[i] (the following group's rows, where not null) are prefetched, for
// writing, a line per block. W past a multiple of 16 goes element by element.
void cols_to_rows(const float* srcT, int64_t ld, int64_t W, int64_t c0, int cnt, float* const* row, const bool* add,
                  float* const* next) {
  int64_t w0 = 0;
  for (; w0 + 16 <= W; w0 += 16) {
    for (int i = 0; i < 16; ++i)
      if (next[i] != nullptr) __builtin_prefetch(next[i] + w0, 1, 3);
    v16 r[16];
    for (int i = 0; i < 16; ++i) r[i] = moekit::vload(srcT + (w0 + i) * ld + c0);
    moekit::transpose_regs(r);
    for (int i = 0; i < cnt; ++i) moekit::vstore(row[i] + w0, add[i] ? moekit::vload(row[i] + w0) + r[i] : r[i]);
  }
  for (; w0 < W; ++w0)
    for (int i = 0; i < cnt; ++i) row[i][w0] = (add[i] ? row[i][w0] : 0.0f) + srcT[w0 * ld + c0 + i];
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
    cols_to_rows(oT, ldo, D, c0, cnt, row, add, next);
  }
}

// The saved pre-activations: column c of hᵀ (N x ld), c < n, into row rid[c] of h, whose
// rows lie in blocks (h_at: the row's address)
template <class RowAt>
void save_cols(const float* hT, int64_t ld, int64_t N, const int64_t* rid, int64_t n, const RowAt& h_at) {
  const bool add[16] = {};
  for (int64_t c0 = 0; c0 < n; c0 += 16) {
    const int cnt = static_cast<int>(std::min<int64_t>(16, n - c0));
    float *row[16], *next[16];
    for (int i = 0; i < 16; ++i) {
      next[i] = c0 + 16 + i < n ? h_at(rid[c0 + 16 + i]) : nullptr;
      row[i] = i < cnt ? h_at(rid[c0 + i]) : nullptr;
    }
    cols_to_rows(hT, ld, N, c0, cnt, row, add, next);
  }
}

// Columns per pass through an expert: xᵀ (D x 192 + 16) and hᵀ stay in a core's L2.
constexpr int64_t PIECE = 192;

// y = Σ over each token's rows of w · (silu(x W_gᵀ) · x W_uᵀ) W_outᵀ. The rows are sorted
// by expert, counts[e] of them for expert e (counts may stop before the last expert).
// h, when given, gets each row's pre-activations [x W_gᵀ, x W_uᵀ] (a training forward
// saves them for expert_bank.cpp's backward). Returns how many pieces threads took from
// other threads' tokens.
int64_t bank_fwd_cols(const at::Tensor& x, const at::Tensor& tok, const at::Tensor& wts, const at::Tensor& counts,
                   const at::Tensor& w_in, const at::Tensor& w_out, const at::Tensor& y, at::TensorList h,
                   at::IntArrayRef h_rows) {
  moekit::bank::check_inputs(x, tok, wts, w_in, w_out);
  const int64_t T = x.size(0), D = x.size(1), F = w_out.size(2), N = 2 * F, E = w_in.size(0);
  TORCH_CHECK(D % 16 == 0, "expert_bank_fwd_cols: the model width must be a multiple of 16, got ", D);
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && y.sizes() == x.sizes(),
              "expert_bank_fwd_cols: y must be contiguous float32 like x");
  const auto start = moekit::bank::expert_starts(counts, E, tok.numel(), "expert_bank_fwd_cols");
  // the saved pre-activations, when given: rows h_rows[b] .. of the call in block h[b]
  TORCH_CHECK(h.size() == h_rows.size(), "expert_bank_fwd_cols: ", h.size(), " blocks of h but ", h_rows.size(),
              " row starts");
  std::vector<float*> h_ptr;
  for (size_t b = 0; b < h.size(); ++b) {
    TORCH_CHECK(h[b].scalar_type() == at::kFloat && h[b].is_contiguous() && h[b].dim() == 2 && h[b].size(1) == N &&
                    h_rows[b] == (b == 0 ? 0 : h_rows[b - 1] + h[b - 1].size(0)),
                "expert_bank_fwd_cols: the blocks of h must be contiguous float32 (rows, ", N,
                ") covering the rows in order");
    h_ptr.push_back(h[b].data_ptr<float>());
  }
  TORCH_CHECK(h.empty() || h_rows.back() + h.back().size(0) == tok.numel(),
              "expert_bank_fwd_cols: the blocks of h must cover all ", tok.numel(), " rows");
  const auto h_at = [&](int64_t r) {
    const auto b = std::upper_bound(h_rows.begin(), h_rows.end(), r) - h_rows.begin() - 1;
    return h_ptr[b] + (r - h_rows[b]) * N;
  };
  const int64_t* tp = tok.data_ptr<int64_t>();
  const float* wp = wts.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* win = w_in.data_ptr<float>();
  const float* wout = w_out.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  constexpr int64_t W = PIECE + 16;  // the widest row stride
  using moekit::bank::Owned;
  using moekit::bank::Piece;

  // xᵀ, hᵀ, aᵀ and finally oᵀ of piece j, in the calling thread's buffers; during the
  // second product the weight of piece `next` (the one this thread runs after) is prefetched
  const auto compute = [&](const Owned& u, int64_t j, int64_t next, float* buf, uint8_t*) {
    const Piece& g = u.pieces[j];
    float *xT = buf, *hT = xT + D * W, *aT = hT + N * W, *oT = aT + F * W, *wc = oT + D * W, *zeros = wc + W;
    std::fill(zeros, zeros + D, 0.0f);
    const float *wi = win + g.e * N * D, *wo = wout + g.e * D * F;
    gather_cols(xp, D, u.idx.data() + g.b, g.n, zeros, xT, g.ld());
    moekit::cols::gemm(N, g.nc(), D, wi, D, xT, g.ld(), hT, g.ld(), wo, F);
    if (!h.empty()) save_cols(hT, g.ld(), N, u.rid.data() + g.b, g.n, h_at);
    for (int64_t c = 0; c < g.nc(); ++c) wc[c] = c < g.n ? u.wr[g.b + c] : 0.0f;
    swiglu_cols(hT, F, g.nc(), g.ld(), wc, aT);
    moekit::cols::gemm(D, g.nc(), F, wo, F, aT, g.ld(), oT, g.ld(), next < 0 ? nullptr : win + u.pieces[next].e * N * D, D);
    return static_cast<const float*>(oT);
  };
  const auto out_floats = [&](const Piece& g) { return D * g.ld(); };
  const auto add = [&](const Owned& u, const Piece& g, const float* oT, uint8_t* seen) {
    scatter_cols(oT, g.ld(), D, u.idx.data() + g.b, g.n, yp, seen, u.t0);
  };
  return moekit::bank::run_owned(T, D, start, tp, wp, !h.empty(), PIECE, (2 * D + N + F) * W + D + W, yp, compute,
                                 out_floats, add);
}
#else
int64_t bank_fwd_cols(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const at::Tensor&, at::TensorList, at::IntArrayRef) {
  TORCH_CHECK(false, "expert_bank_fwd_cols: built without AVX-512 (cpu/path.py never chooses it then)");
}
#endif

// whether this build has the kernel (the argument only routes the call to the CPU kernel)
bool bank_cols_built(const at::Tensor&) {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("expert_bank_fwd_cols(Tensor x, Tensor tok, Tensor weights, Tensor counts, Tensor w_in, Tensor w_out, "
        "Tensor(a!) y, Tensor(b!)[] h, int[] h_rows) -> int");
  m.def("expert_bank_cols_built(Tensor like) -> bool");
}
TORCH_LIBRARY_IMPL(moekit, CPU, m) {
  m.impl("expert_bank_fwd_cols", bank_fwd_cols);
  m.impl("expert_bank_cols_built", bank_cols_built);
}
