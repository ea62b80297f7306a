// The SwiGLU expert bank's inference forward with threads owning tokens and activations
// in rows, on a packed copy of the weights (moe/experts/cpu/packed.py lays it out; cpu/path.py
// says when it runs).
//
// Why: expert_bank_cols.cpp computes in columns, the expert's weight broadcast and its
// tokens filling 16-wide vectors. Each expert's tokens on a thread are then padded to
// whole vectors (5.5-5.9% of the "many" layer's products), and x and output rows are
// transposed on their way in and out. Here the roles are swapped (gemm_rows.h): tokens
// are broadcast from their rows of x, read in place, and the weight, packed into panels
// of its transposed columns, fills the vectors. A tile of r < 6 rows just has fewer
// accumulators; outputs come out as rows and are added into y as rows.
//   a = silu(x W_gᵀ) · x W_uᵀ · w a panel at a time, each panel a group of gate columns
//   and the same up columns, so that the SwiGLU runs on each tile as it comes out;
//   o = a W_outᵀ a tile of rows at a time over all output panels, each tile's rows added
//   straight into y (y[t] += row of o) while the next tile's rows of y are prefetched.
// The weights stream from memory once per piece, through one cursor that runs a panel
// ahead of their use into the next piece's expert; during the first panel each tile
// prefetches the next tile's x rows.
//
// Each output element is one chain of FMAs over k in order, the SwiGLU the same
// operations as the column kernel's: the two kernels give the same bits, whatever the
// thread count (bank_owned.h). Tokens that no row names get zeros.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "bank_common.h"
#include "bank_owned.h"
#include "gemm_rows.h"
#include "swiglu_rows.h"
#include "vec_math.h"

namespace {

#ifdef __AVX512F__
// Rows per pass through an expert: their x rows (at most 384 KiB) stay in a core's L2
// while the panels stream past them; 192 at D = 512, 96 at D = 1024
constexpr int64_t PIECE_BYTES = 384 * 1024, PIECE_MAX = 192;
// how far the weight stream runs ahead of its use: a panel of W_in at D = 512 (128 KiB)
constexpr int64_t AHEAD_LINES = 2048;
constexpr int GV = 2;  // gate vectors per W_in panel (and as many up vectors): 4 in all

// y rows idx[i] (+)= row i of o (row stride ldo), i < n: written at a token's first row
// (seen[token - t0] still 0), added to after. With `ahead`, rows PREFETCH_AHEAD on are
// requested early (a tile's own rows were prefetched while it computed)
void add_rows(const float* o, int64_t ldo, int64_t D, const int64_t* idx, int64_t n, float* y, uint8_t* seen,
              int64_t t0, bool ahead) {
  constexpr int64_t AHEAD = moekit::PREFETCH_AHEAD;
  for (int64_t i = 0; i < n; ++i) {
    if (ahead && i + AHEAD < n) moekit::prefetch_floats<1>(y + idx[i + AHEAD] * D, D);
    float* yr = y + idx[i] * D;
    const float* orow = o + i * ldo;
    if (seen[idx[i] - t0]) {
      for (int64_t d = 0; d < D; ++d) yr[d] += orow[d];
    } else {
      std::memcpy(yr, orow, D * sizeof(float));
      seen[idx[i] - t0] = 1;
    }
  }
}

// y = Σ over each token's rows of w · (silu(x W_gᵀ) · x W_uᵀ) W_outᵀ. The rows are sorted
// by expert, counts[e] of them for expert e. p_in (E, 2F·D) and p_out (E, F·D) hold the
// weights packed (moe/experts/cpu/packed.py): W_in as panels (D x 32·gv) of gv gate columns'
// vectors and the same up columns, gv = 2 but the last (F/16 odd: 1); W_out as panels
// (F x 16·nv) of nv output vectors, nv = 4 but the last. Returns how many pieces threads
// took from other threads' tokens.
int64_t bank_fwd_rows(const at::Tensor& x, const at::Tensor& tok, const at::Tensor& wts, const at::Tensor& counts,
                      const at::Tensor& p_in, const at::Tensor& p_out, const at::Tensor& y) {
  moekit::bank::check_rows(x, tok, wts);
  const int64_t T = x.size(0), D = x.size(1), E = p_in.size(0);
  TORCH_CHECK(p_in.scalar_type() == at::kFloat && p_in.dim() == 2 && p_in.is_contiguous() &&
                  p_out.scalar_type() == at::kFloat && p_out.dim() == 2 && p_out.is_contiguous() &&
                  p_out.size(0) == E && D > 0 && p_out.size(1) % D == 0 && p_in.size(1) == 2 * p_out.size(1),
              "expert_bank_fwd_rows: packed weights (E, 2F·D) and (E, F·D) of contiguous float32 expected, got ",
              p_in.sizes(), " and ", p_out.sizes(), " for D=", D);
  const int64_t F = p_out.size(1) / D, N = 2 * F;
  TORCH_CHECK(D % 16 == 0 && F % 16 == 0, "expert_bank_fwd_rows: D and F must be multiples of 16, got D=", D,
              " F=", F);
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && y.sizes() == x.sizes(),
              "expert_bank_fwd_rows: y must be contiguous float32 like x");
  const auto start = moekit::bank::expert_starts(counts, E, tok.numel(), "expert_bank_fwd_rows");
  const int64_t* tp = tok.data_ptr<int64_t>();
  const float* wp = wts.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* pin = p_in.data_ptr<float>();
  const float* pout = p_out.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  using moekit::bank::Owned;
  using moekit::bank::Piece;
  using moekit::rows::RT;
  // row strides of an odd number of cache lines (see bank_owned.h: Piece)
  const int64_t lda = F | 16, ldo = D | 16, FV = F / 16, DV = D / 16;
  const int64_t piece = std::clamp<int64_t>(PIECE_BYTES / (4 * D), RT, PIECE_MAX);
  const auto in_lines = [&](int64_t v0) { return D * 2 * std::min<int64_t>(GV, FV - v0); };  // panel at v0

  using moekit::rows::NV_MAX;
  using moekit::rows::Stream;

  // a = silu(x W_gᵀ) · x W_uᵀ · w for n rows (x rows at xr), a gate/up panel at a time
  const auto first = [&](const float* const* xr, int64_t n, const float* panel, const float* wr, Stream& stream,
                         float* a, float* tmp) {
    for (int64_t v0 = 0; v0 < FV;) {
      const int gv = static_cast<int>(std::min<int64_t>(GV, FV - v0));
      const auto glu = [&](int64_t i0, int64_t r) {
        for (int64_t i = 0; i < r; ++i)
          moekit::fwd_row(tmp + i * 32 * gv, tmp + i * 32 * gv + 16 * gv, wr[i0 + i], a + (i0 + i) * lda + 16 * v0,
                          16 * gv);
      };
      moekit::rows::panel_pass(xr, n, D, panel, 2 * gv, 32 * gv, stream, in_lines(v0), v0 == 0,
                               [&](int64_t) { return tmp; }, glu);
      panel += D * 32 * gv;
      v0 += gv;
    }
  };
  // o = a W_outᵀ for n rows (a rows at ar), a tile of rows at a time over all output
  // panels. With y rows (yr: the rows' rows of y), each tile's rows go into y as they
  // come, and each panel prefetches its columns of the next tile's rows of y for writing;
  // else they stay in o.
  const auto second = [&](const float* const* ar, int64_t n, const float* wo, Stream& stream, float* o, float* tmp,
                          float* const* yr, const int64_t* idx, uint8_t* seen, int64_t t0) {
    const int64_t tiles = (n + RT - 1) / RT, Q = (DV + NV_MAX - 1) / NV_MAX, lines = F * D / 16;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t i0 = t * RT, r = std::min<int64_t>(RT, n - i0);
      float* ot = yr != nullptr ? tmp : o + i0 * ldo;
      const float* panel = wo;
      for (int64_t d0 = 0, q = 0; d0 < DV; ++q) {
        const int nv = static_cast<int>(std::min<int64_t>(NV_MAX, DV - d0));
        moekit::rows::Spread s;
        s.lin = &stream;  // the weight stream stays a panel ahead: its lines spread evenly
        s.lin_lines = lines * (t * Q + q + 1) / (tiles * Q) - lines * (t * Q + q) / (tiles * Q);
        if (yr != nullptr && t + 1 < tiles) {
          s.rows = yr + i0 + RT;
          s.nrows = std::min<int64_t>(RT, n - i0 - RT);
          s.row_lines = nv;
          s.row_off = 16 * d0;
          s.write = true;
        }
        moekit::rows::tile_rv(static_cast<int>(r), nv, ar + i0, F, panel, ot + 16 * d0, ldo, s);
        panel += F * 16 * nv;
        d0 += nv;
      }
      if (yr != nullptr) add_rows(ot, ldo, D, idx + i0, r, yp, seen, t0, false);
    }
  };
  // Piece j in the calling thread's buffers: added into y by its owner (seen given), or
  // left in o for it. The weights stream in a panel ahead of their use: this expert's,
  // then those of piece `next` (the one this thread runs after; -1: none).
  const auto compute = [&](const Owned& u, int64_t j, int64_t next, float* buf, uint8_t* seen) {
    const Piece& g = u.pieces[j];
    float *a = buf, *o = a + piece * lda, *tmp = o + piece * ldo;  // tmp: a tile of h, or of o
    thread_local std::vector<const float*> rows;  // of x and of a
    thread_local std::vector<float*> yrows;
    rows.resize(2 * piece);
    yrows.resize(piece);
    const float **xr = rows.data(), **ar = xr + piece;
    float** yr = yrows.data();
    for (int64_t i = 0; i < g.n; ++i)
      xr[i] = xp + u.idx[g.b + i] * D, ar[i] = a + i * lda, yr[i] = yp + u.idx[g.b + i] * D;
    Stream stream;
    stream.push(pin + g.e * N * D, N * D / 16);
    stream.push(pout + g.e * F * D, F * D / 16);
    if (next >= 0) {
      const int64_t e = u.pieces[next].e;
      stream.push(pin + e * N * D, N * D / 16);
      stream.push(pout + e * F * D, F * D / 16);
    }
    stream.skip(std::min(in_lines(0), AHEAD_LINES));  // prefetched by the piece before
    first(xr, g.n, pin + g.e * N * D, u.wr.data() + g.b, stream, a, tmp);
    second(ar, g.n, pout + g.e * F * D, stream, o, tmp, seen != nullptr ? yr : nullptr, u.idx.data() + g.b, seen,
           u.t0);
    return seen != nullptr ? nullptr : static_cast<const float*>(o);
  };
  const auto out_floats = [&](const Piece& g) { return g.n * ldo; };
  const auto add = [&](const Owned& u, const Piece& g, const float* o, uint8_t* seen) {
    add_rows(o, ldo, D, u.idx.data() + g.b, g.n, yp, seen, u.t0, true);
  };
  const int64_t buf_floats = piece * (lda + ldo) + RT * std::max<int64_t>(32 * GV, ldo);
  return moekit::bank::run_owned(T, D, start, tp, wp, false, piece, buf_floats, yp, compute, out_floats, add);
}
#else
int64_t bank_fwd_rows(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "expert_bank_fwd_rows: built without AVX-512 (cpu/path.py never chooses it then)");
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("expert_bank_fwd_rows(Tensor x, Tensor tok, Tensor weights, Tensor counts, Tensor p_in, Tensor p_out, "
        "Tensor(a!) y) -> int");
}
TORCH_LIBRARY_IMPL(moekit, CPU, m) { m.impl("expert_bank_fwd_rows", bank_fwd_rows); }
