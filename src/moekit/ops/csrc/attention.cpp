// Causal attention for short sequences on CPU, float32, with the rotary embedding applied
// inside: forward and backward, one (batch, key/value head) pair per work item.
//
// Why: training the small models moekit runs on a laptop (head_dim 32-128, a few hundred
// positions) spends most of an attention block outside its matmuls. torch's CPU flash
// kernel pads and blocks for long sequences; around it sit the RoPE passes (mul, cat,
// neg, add, forward and backward) and the copies that make q, k, v contiguous per head.
// Here a thread takes one (b, g): it rotates that head's keys once into its own buffers,
// then streams its H/G query heads through them in blocks of R rows:
//   forward   s = (scale · rot(q)) · rot(k)ᵀ, masked; p = exp(s - max); o = p · v / Σp;
//             lse = max + log Σp is kept for the backward (as FlashAttention, Dao et al. 2022)
//   backward  p recomputed from lse; dv += pᵀ do; dp = do · vᵀ; ds = p ∘ (dp - rowsum(do ∘ o));
//             dq = scale · ds · k, dk += scale · dsᵀ q, both rotated back (rotᵀ)
// Every output element is written by one thread in a fixed order: results do not depend
// on the thread count. The sequence is never blocked over keys: each query row sees all its
// keys at once, which is why models/attention.py sends long sequences to SDPA instead.
//
// Layouts: q (B, H, S, D), k and v (B, G, L, D) with any strides but contiguous rows;
// causal row i sees keys j <= i + offset (offset = L - S: the bottom-right alignment of a
// prefill after cached keys). Tables cos/sin: (S, D) for the queries, (L, D) for the keys,
// in the "rotate half" layout of models/rope.py; empty tables mean no rotation.
// Reference: models/attention.py's SDPA path; tests/test_attention_kernel.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace {

constexpr int R = 8;   // query rows per block (8 accumulators of W lanes)
constexpr int W = 16;  // lanes: one 512-bit register of floats

struct Geo {
  int64_t B, H, G, S, L, D, Lp;  // Lp: L rounded up to W (transposed buffers are Lp wide)
  int64_t offset;
  bool causal, rope;
  float scale;
};

// A (B, heads, rows, D) tensor's row pointer.
struct Rows {
  float* p;
  int64_t sb, sh, si;
  float* row(int64_t b, int64_t h, int64_t i) const { return p + b * sb + h * sh + i * si; }
};

Rows rows_of(const at::Tensor& t) { return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)}; }

int64_t visible(const Geo& g, int64_t i) { return g.causal ? std::min(g.L, i + g.offset + 1) : g.L; }

// out = (x·cos + rot(x)·sin) · mult, rot(x) = [-x[h:], x[:h]] (models/rope.py)
void rope_row(const float* x, const float* cos, const float* sin, int64_t D, float mult, float* out) {
  const int64_t h = D / 2;
  for (int64_t c = 0; c < h; ++c) out[c] = (x[c] * cos[c] - x[c + h] * sin[c]) * mult;
  for (int64_t c = 0; c < h; ++c) out[c + h] = (x[c + h] * cos[c + h] + x[c] * sin[c + h]) * mult;
}

// the transpose of the rotation, for gradients: out = g·cos + rotᵀ(g·sin), rotᵀ(u) = [u[h:], -u[:h]]
void rope_row_t(const float* g, const float* cos, const float* sin, int64_t D, float mult, float* out) {
  const int64_t h = D / 2;
  for (int64_t c = 0; c < h; ++c) out[c] = (g[c] * cos[c] + g[c + h] * sin[c + h]) * mult;
  for (int64_t c = 0; c < h; ++c) out[c + h] = (g[c + h] * cos[c + h] - g[c] * sin[c]) * mult;
}

void load_row(const float* x, const float* cos, const float* sin, const Geo& g, float mult, float* out) {
  if (g.rope) {
    rope_row(x, cos, sin, g.D, mult, out);
  } else {
    for (int64_t c = 0; c < g.D; ++c) out[c] = x[c] * mult;
  }
}

// The tiles use moekit::v16 (vec_math.h): left to itself, the compiler vectorized these
// tiles over their 8 rows with shuffles (measured 2-5x slower than torch's path).
using moekit::v16;
using moekit::vbroadcast;
using moekit::vload;
using moekit::vstore;

// out[r][c] = Σ_{t<T} a[r][t] · b[t][c] for r < R and c < ncols (a multiple of W): a tile of
// R rows of a product, R accumulators per W columns. Serves the scores (a = q rows,
// b = kᵀ), the mix of values (a = p, b = v rows) and the backward's products alike.
void rows_times(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t T, int64_t ncols, float* out,
                int64_t ldo) {
  for (int64_t c0 = 0; c0 < ncols; c0 += W) {
    v16 acc[R] = {};
    for (int64_t t = 0; t < T; ++t) {
      const v16 bt = vload(b + t * ldb + c0);
      for (int r = 0; r < R; ++r) acc[r] += a[r * lda + t] * bt;
    }
    for (int r = 0; r < R; ++r) vstore(out + r * ldo + c0, acc[r]);
  }
}

// acc_j += Σ_r p[r][j] · a_r for j < n: the rank-R update of dk and dv (a: R x D)
void update_tile(const float* p, int64_t ldp, const float* a, int64_t D, int64_t n, float* acc) {
  for (int64_t c0 = 0; c0 < D; c0 += W) {
    v16 ar[R];
    for (int r = 0; r < R; ++r) ar[r] = vload(a + r * D + c0);
    for (int64_t j = 0; j < n; ++j) {
      v16 sum = vload(acc + j * D + c0);
      for (int r = 0; r < R; ++r) sum += p[r * ldp + j] * ar[r];
      vstore(acc + j * D + c0, sum);
    }
  }
}

// per-thread buffers, kept across calls (they only grow)
std::vector<float>& scratch(int slot) {
  thread_local std::vector<float> bufs[10];
  return bufs[slot];
}

float* grab(int slot, int64_t n) {
  std::vector<float>& v = scratch(slot);
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// rotated rows of k (L x D) and their transpose (D x Lp, zero beyond L); v and vᵀ alike
void load_keys(const Rows& src, int64_t b, int64_t gh, const float* cos, const float* sin, const Geo& g, bool rotate,
               float* rows, float* cols) {
  std::fill(cols, cols + g.D * g.Lp, 0.0f);
  for (int64_t j = 0; j < g.L; ++j) {
    float* rj = rows + j * g.D;
    const float* x = src.row(b, gh, j);
    if (rotate && g.rope) {
      rope_row(x, cos + j * g.D, sin + j * g.D, g.D, 1.0f, rj);
    } else {
      std::copy(x, x + g.D, rj);
    }
    for (int64_t c = 0; c < g.D; ++c) cols[c * g.Lp + j] = rj[c];
  }
}

// the block's rows i0.. (n valid, rest zero) of q, scaled and rotated, into qb (R x D)
void load_queries(const Rows& q, int64_t b, int64_t h, int64_t i0, int n, const float* cos, const float* sin,
                  const Geo& g, float* qb) {
  std::fill(qb, qb + R * g.D, 0.0f);
  for (int r = 0; r < n; ++r) {
    const int64_t at = (i0 + r) * g.D;
    load_row(q.row(b, h, i0 + r), g.rope ? cos + at : nullptr, g.rope ? sin + at : nullptr, g, g.scale, qb + r * g.D);
  }
}

// one work item's keys and values, rotated, as rows and transposed, in this thread's buffers
struct Keys {
  float *k, *kt, *v, *vt;
};

Keys load_item(const Rows& kr, const Rows& vr, int64_t b, int64_t gh, const float* ck, const float* sk, const Geo& g) {
  const Keys out{grab(0, g.L * g.D), grab(1, g.D * g.Lp), grab(2, g.L * g.D), grab(3, g.D * g.Lp)};
  load_keys(kr, b, gh, ck, sk, g, true, out.k, out.kt);
  load_keys(vr, b, gh, nullptr, nullptr, g, false, out.v, out.vt);
  return out;
}

// block(h, i0, n, n16) for each block of R query rows (n of them real) of the query heads
// that share key/value head gh; n16: the keys the block's last row sees, rounded up to W
template <class Fn>
void for_blocks(const Geo& g, int64_t gh, Fn block) {
  for (int64_t h = gh * (g.H / g.G); h < (gh + 1) * (g.H / g.G); ++h) {
    for (int64_t i0 = 0; i0 < g.S; i0 += R) {
      const int n = static_cast<int>(std::min<int64_t>(R, g.S - i0));
      block(h, i0, n, (visible(g, i0 + n - 1) + W - 1) / W * W);
    }
  }
}

// probabilities of the block's rows: exp(s - m_r) for j < visible(i0 + r), 0 after (and for
// padding rows); returns through m (row max, or lse given) and l (row sum)
void softmax_rows(float* s, int64_t lds, int64_t n16, int64_t i0, int n, const Geo& g, const float* lse, float* m,
                  float* l) {
  for (int r = 0; r < R; ++r) {
    float* sr = s + r * lds;
    const int64_t vis = r < n ? visible(g, i0 + r) : 0;
    float mr = lse != nullptr ? (r < n ? lse[r] : 0.0f) : -std::numeric_limits<float>::infinity();
    if (lse == nullptr) {
      v16 mv = vbroadcast(mr);
      int64_t j = 0;
      for (; j + W <= vis; j += W) {
        const v16 x = vload(sr + j);
        mv = x > mv ? x : mv;
      }
      for (int c = 0; c < W; ++c) mr = std::max(mr, mv[c]);
      for (; j < vis; ++j) mr = std::max(mr, sr[j]);
    }
    for (int64_t j = 0; j < vis; ++j) sr[j] = moekit::exp_approx(sr[j] - mr);  // vectorized by the compiler
    std::fill(sr + vis, sr + n16, 0.0f);
    v16 sv = {};
    for (int64_t j = 0; j < n16; j += W) sv += vload(sr + j);
    const float sum = moekit::hsum(sv);
    m[r] = mr;
    l[r] = sum;
  }
}

Geo geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos_q,
             const at::Tensor& sin_q, const at::Tensor& cos_k, const at::Tensor& sin_k, double scale, int64_t offset,
             bool causal) {
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 4 && t->stride(3) == 1,
                "attention: q, k, v must be CPU float32 (B, heads, rows, D) with contiguous rows");
  Geo g{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), 0, offset, causal, cos_q.numel() > 0,
        static_cast<float>(scale)};
  g.Lp = (g.L + W - 1) / W * W;
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == g.B && k.size(3) == g.D,
              "attention: k and v must both be (B, G, L, D) with q's B and D");
  TORCH_CHECK(g.L > 0 && g.S > 0, "attention: empty sequence");
  TORCH_CHECK(g.G > 0 && g.H % g.G == 0, "attention: query heads ", g.H, " must be a multiple of kv heads ", g.G);
  TORCH_CHECK(g.D % W == 0, "attention: head dim ", g.D, " must be a multiple of ", W);
  TORCH_CHECK(!causal || (offset >= 0 && offset == g.L - g.S), "attention: causal offset must be L - S >= 0");
  if (g.rope) {
    for (const at::Tensor* t : {&cos_q, &sin_q})
      TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == g.S &&
                      t->size(1) == g.D, "attention: query rope tables must be contiguous float32 (S, D)");
    for (const at::Tensor* t : {&cos_k, &sin_k})
      TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == g.L &&
                      t->size(1) == g.D, "attention: key rope tables must be contiguous float32 (L, D)");
  }
  return g;
}

const float* ptr_or_null(const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos_q,
                   const at::Tensor& sin_q, const at::Tensor& cos_k, const at::Tensor& sin_k, const at::Tensor& o,
                   const at::Tensor& lse, double scale, int64_t offset, bool causal) {
  const Geo g = geometry(q, k, v, cos_q, sin_q, cos_k, sin_k, scale, offset, causal);
  TORCH_CHECK(o.sizes() == q.sizes() && o.scalar_type() == at::kFloat && o.stride(3) == 1,
              "attention: o must be float32 shaped as q with contiguous rows");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat && lse.numel() == g.B * g.H * g.S,
              "attention: lse must be contiguous float32 (B, H, S)");
  const Rows qr = rows_of(q), kr = rows_of(k), vr = rows_of(v), orows = rows_of(o);
  const float *cq = ptr_or_null(cos_q), *sq = ptr_or_null(sin_q), *ck = ptr_or_null(cos_k), *sk = ptr_or_null(sin_k);
  float* lse_p = lse.data_ptr<float>();
  at::parallel_for(0, g.B * g.G, 1, [&](int64_t begin, int64_t end) {
    float* qb = grab(4, R * g.D);
    float* s = grab(5, R * g.Lp);
    float* ob = grab(6, R * g.D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / g.G, gh = item % g.G;
      const Keys kv = load_item(kr, vr, b, gh, ck, sk, g);
      for_blocks(g, gh, [&](int64_t h, int64_t i0, int n, int64_t n16) {
        load_queries(qr, b, h, i0, n, cq, sq, g, qb);
        rows_times(qb, g.D, kv.kt, g.Lp, g.D, n16, s, g.Lp);  // scores
        float m[R], l[R];
        softmax_rows(s, g.Lp, n16, i0, n, g, nullptr, m, l);
        rows_times(s, g.Lp, kv.v, g.D, std::min(n16, g.L), g.D, ob, g.D);  // p · v
        for (int r = 0; r < n; ++r) {
          float* out = orows.row(b, h, i0 + r);
          const float inv = 1.0f / l[r];
          for (int64_t c = 0; c < g.D; ++c) out[c] = ob[r * g.D + c] * inv;
          lse_p[(b * g.H + h) * g.S + i0 + r] = m[r] + std::log(l[r]);
        }
      });
    }
  });
}

void attention_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos_q,
                   const at::Tensor& sin_q, const at::Tensor& cos_k, const at::Tensor& sin_k, const at::Tensor& o,
                   const at::Tensor& lse, const at::Tensor& dout, const at::Tensor& dq, const at::Tensor& dk,
                   const at::Tensor& dv, double scale, int64_t offset, bool causal) {
  const Geo g = geometry(q, k, v, cos_q, sin_q, cos_k, sin_k, scale, offset, causal);
  for (const at::Tensor* t : {&o, &dout, &dq})
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == at::kFloat && t->stride(3) == 1,
                "attention: o, dout and dq must be float32 shaped as q with contiguous rows");
  for (const at::Tensor* t : {&dk, &dv})
    TORCH_CHECK(t->sizes() == k.sizes() && t->scalar_type() == at::kFloat && t->stride(3) == 1,
                "attention: dk and dv must be float32 shaped as k with contiguous rows");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat && lse.numel() == g.B * g.H * g.S,
              "attention: lse must be contiguous float32 (B, H, S)");
  const Rows qr = rows_of(q), kr = rows_of(k), vr = rows_of(v), orows = rows_of(o), dor = rows_of(dout);
  const Rows dqr = rows_of(dq), dkr = rows_of(dk), dvr = rows_of(dv);
  const float *cq = ptr_or_null(cos_q), *sq = ptr_or_null(sin_q), *ck = ptr_or_null(cos_k), *sk = ptr_or_null(sin_k);
  const float* lse_p = lse.data_ptr<float>();
  at::parallel_for(0, g.B * g.G, 1, [&](int64_t begin, int64_t end) {
    float* qb = grab(4, R * g.D);
    float* p = grab(5, R * g.Lp);
    float* dp = grab(6, R * g.Lp);
    float* dob = grab(7, R * g.D);
    float* dkb = grab(8, 2 * g.L * g.D);  // dk rows, then dv rows
    float* dqb = grab(9, R * g.D);
    float* dvb = dkb + g.L * g.D;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / g.G, gh = item % g.G;
      const Keys kv = load_item(kr, vr, b, gh, ck, sk, g);
      std::fill(dkb, dkb + 2 * g.L * g.D, 0.0f);
      for_blocks(g, gh, [&](int64_t h, int64_t i0, int n, int64_t n16) {
        const int64_t nk = std::min(n16, g.L);
        load_queries(qr, b, h, i0, n, cq, sq, g, qb);
        std::fill(dob, dob + R * g.D, 0.0f);
        float di[R] = {}, m[R], l[R];
        for (int r = 0; r < n; ++r) {
          const float *dor_r = dor.row(b, h, i0 + r), *or_r = orows.row(b, h, i0 + r);
          float acc = 0.0f;
          for (int64_t c = 0; c < g.D; ++c) {
            dob[r * g.D + c] = dor_r[c];
            acc += dor_r[c] * or_r[c];
          }
          di[r] = acc;
        }
        rows_times(qb, g.D, kv.kt, g.Lp, g.D, n16, p, g.Lp);  // scores again
        softmax_rows(p, g.Lp, n16, i0, n, g, lse_p + (b * g.H + h) * g.S + i0, m, l);
        update_tile(p, g.Lp, dob, g.D, nk, dvb);  // dv += pᵀ do
        rows_times(dob, g.D, kv.vt, g.Lp, g.D, n16, dp, g.Lp);  // dp = do · vᵀ
        for (int r = 0; r < R; ++r)  // ds = p ∘ (dp - di), in place of dp
          for (int64_t j = 0; j < n16; ++j) dp[r * g.Lp + j] = p[r * g.Lp + j] * (dp[r * g.Lp + j] - di[r]);
        update_tile(dp, g.Lp, qb, g.D, nk, dkb);  // dk_rot += dsᵀ (scale · q_rot)
        rows_times(dp, g.Lp, kv.k, g.D, nk, g.D, dqb, g.D);  // dq_rot / scale = ds · k_rot
        for (int r = 0; r < n; ++r) {
          float* out = dqr.row(b, h, i0 + r);
          if (g.rope) {
            rope_row_t(dqb + r * g.D, cq + (i0 + r) * g.D, sq + (i0 + r) * g.D, g.D, g.scale, out);
          } else {
            for (int64_t c = 0; c < g.D; ++c) out[c] = dqb[r * g.D + c] * g.scale;
          }
        }
      });
      for (int64_t j = 0; j < g.L; ++j) {
        float* dkj = dkr.row(b, gh, j);
        if (g.rope) {
          rope_row_t(dkb + j * g.D, ck + j * g.D, sk + j * g.D, g.D, 1.0f, dkj);
        } else {
          std::copy(dkb + j * g.D, dkb + (j + 1) * g.D, dkj);
        }
        std::copy(dvb + j * g.D, dvb + (j + 1) * g.D, dvr.row(b, gh, j));
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cos_q, Tensor sin_q, Tensor cos_k, Tensor sin_k, "
        "Tensor(a!) o, Tensor(b!) lse, float scale, int offset, bool causal) -> ()");
  m.def("attention_bwd(Tensor q, Tensor k, Tensor v, Tensor cos_q, Tensor sin_q, Tensor cos_k, Tensor sin_k, "
        "Tensor o, Tensor lse, Tensor dout, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, float scale, int offset, "
        "bool causal) -> ()");
}
TORCH_LIBRARY_IMPL(moekit, CPU, m) {
  m.impl("attention_fwd", attention_fwd);
  m.impl("attention_bwd", attention_bwd);
}
