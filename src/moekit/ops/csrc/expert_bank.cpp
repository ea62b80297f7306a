// The SwiGLU expert bank with whole experts handed to threads: each thread gathers its
// expert's rows, runs that expert's products on one core, and applies the SwiGLU, all in
// its own cache-sized buffers. ops/expert_bank.py is the typed face; the CPU expert path
// that calls it (moe/experts/cpu/whole.py) says why, and the chunk loop
// (moe/experts/cpu/chunked.py) is the reference.
//
// A call's rows are sorted by expert; each row's output (and, in the backward, its dx
// row) goes to the row dst[r] of out: its slot t·K + k when the caller sums slots per
// token afterwards, or r for a chunk buffer it scatter-adds.
// seg (S, 4) int64 lists the call's segments as (expert, first row, end row, first-write)
// with rows relative to the call. An expert's rows may be split into several segments
// (they bound the threads' buffers); such segments follow each other, and first-write = 1
// marks the one where the backward writes the expert's weight gradients (beta 0) rather
// than adding to them. The saved pre-activations h come as a list of row blocks (h[c]
// holds rows h_rows[c] ..): blocks below glibc's mmap threshold, so that they are not
// fresh pages on every call; no segment spans two blocks.
// The forward hands segments to threads one at a time; the backward hands out an expert's
// segments together, to one thread, in order (they write the same weight gradients).
//
// The products run on the engine the caller names (see `Engine` below). oneDNN's matmul
// compiles a kernel per new shape, so for it each expert's rows are padded with zero rows
// to a multiple of `step` rows (fewer than `step` stay as they are); zero rows stay zero
// through every stage and add nothing to any output. The micro-kernel's shapes are bounded
// by its blocks instead: only its weight gradients, whose reduction runs over the rows,
// keep the padding. BLAS pads nothing.
// Every product of an expert runs on one thread in a fixed order, so the result does
// not depend on the thread count or on which thread took the expert.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bank_common.h"
#include "swiglu_rows.h"
#include "transpose_tile.h"
#include "vec_math.h"

namespace at::native {
// result = alpha · (mat1 @ mat2) + beta · result on oneDNN, into result as it lies.
// Exported by libtorch_cpu (aten/src/ATen/native/mkldnn/Matmul.cpp) without an installed
// header. Called inside a parallel region it runs on the calling thread alone.
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta, float alpha);
}  // namespace at::native

namespace {

// Blocks of the micro-kernel's products: rows in blocks of 32 took 1.027x the time of 64
// for whole `tiny` training steps (`python benchmarks/ab.py --mode step`, a build per size).
constexpr int64_t MICRO_ROWS = 64, MICRO_DEPTH = 256;

// C (M x N, row stride ldc) = A (M x K, lda) · B (K x N, ldb), plus C when add, on the
// calling thread through the micro-kernel (where the CPU has none, torch falls back to
// its own GEMM)
void micro_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                float* C, int64_t ldc, bool add) {
  for (int64_t m0 = 0; m0 < M; m0 += MICRO_ROWS) {
    const int64_t mm = std::min(MICRO_ROWS, M - m0);
    for (int64_t k0 = 0; k0 < K; k0 += MICRO_DEPTH)
      at::native::cpublas::brgemm(mm, N, std::min(MICRO_DEPTH, K - k0), lda, ldb, ldc, add || k0 > 0,
                                  A + m0 * lda + k0, B + k0 * ldb, C + m0 * ldc, false);
  }
}

// The three forms of an expert's products, on one of three engines (moe/experts/cpu/path.py
// picks it per machine and shape: CpuPath.products):
//   MATMUL  oneDNN's matmul (at::native::mkldnn_matmul), which blocks for the caches itself;
//           torch refuses it on CPUs without avx512bw/vl/dq (or avx_ne_convert), so the
//           caller probes it once before choosing it;
//   MICRO   oneDNN's brgemm micro-kernel (at::native::cpublas::brgemm; where the CPU has none
//           torch runs its own GEMM), for experts whose weights fit a core's L2. It wants both
//           operands in rows, so the caller's buffer `t` takes the operand it needs transposed;
//   BLAS    torch's own product (at::mm_out, at::addmm_out: MKL's sgemm in torch's x86
//           wheels, OpenBLAS or torch's kernels elsewhere), which takes transposed operands
//           as they lie. Inside this kernel's parallel region it runs on the calling thread.
// Every operand is a row-major matrix (a view with unit column stride).
enum Engine : int64_t { MATMUL = 0, MICRO = 1, BLAS = 2 };

// c = a · b: a (M, K), b (K, N), c (M, N)
void mm(int64_t engine, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  if (engine == MATMUL) return at::native::mkldnn_matmul(a, b, c, 0.0f, 1.0f);
  if (engine == BLAS) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the weights are parameters
    at::mm_out(const_cast<at::Tensor&>(c), a, b);
    return;
  }
  micro_gemm(a.size(0), b.size(1), a.size(1), a.data_ptr<float>(), a.stride(0), b.data_ptr<float>(), b.stride(0),
             c.data_ptr<float>(), c.stride(0), false);
}

// c = a · wᵀ: a (M, K), w (N, K), c (M, N); the micro-kernel reads wᵀ from t (K x N)
void mm_nt(int64_t engine, const at::Tensor& a, const at::Tensor& w, const at::Tensor& c, float* t) {
  if (engine == MATMUL) return at::native::mkldnn_matmul(a, w.t(), c, 0.0f, 1.0f);
  const int64_t N = w.size(0), K = w.size(1);
  if (engine == BLAS) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::mm_out(const_cast<at::Tensor&>(c), a, w.t());
    return;
  }
  moekit::transpose_cols(w.data_ptr<float>(), N, w.stride(0), 0, K, t, N);
  micro_gemm(a.size(0), N, K, a.data_ptr<float>(), a.stride(0), t, N, c.data_ptr<float>(), c.stride(0), false);
}

// c = aᵀ · b, plus c when add: a (R, M), b (R, N), c (M, N); the micro-kernel reads aᵀ
// from t (M x R)
void mm_tn(int64_t engine, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool add, float* t) {
  if (engine == MATMUL) return at::native::mkldnn_matmul(a.t(), b, c, add ? 1.0f : 0.0f, 1.0f);
  const int64_t R = a.size(0), M = a.size(1);
  if (engine == BLAS) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (add) {
      const_cast<at::Tensor&>(c).addmm_(a.t(), b);
    } else {
      at::mm_out(const_cast<at::Tensor&>(c), a.t(), b);
    }
    return;
  }
  moekit::transpose_cols(a.data_ptr<float>(), R, a.stride(0), 0, M, t, R);
  micro_gemm(M, b.size(1), R, t, R, b.data_ptr<float>(), b.stride(0), c.data_ptr<float>(), c.stride(0), add);
}

struct Seg {
  int64_t e, s, t;
  bool first;
};

std::vector<Seg> read_segments(const at::Tensor& seg, int64_t E, int64_t rows) {
  TORCH_CHECK(seg.scalar_type() == at::kLong && seg.dim() == 2 && seg.size(1) == 4,
              "expert_bank: seg must be int64 (S, 4)");
  const at::Tensor sc = seg.contiguous();
  const int64_t* p = sc.data_ptr<int64_t>();
  std::vector<Seg> out;
  for (int64_t i = 0; i < sc.size(0); ++i) {
    const Seg g{p[4 * i], p[4 * i + 1], p[4 * i + 2], p[4 * i + 3] != 0};
    TORCH_CHECK(g.e >= 0 && g.e < E && g.s >= 0 && g.s <= g.t && g.t <= rows,
                "expert_bank: segment ", i, " (", g.e, ", ", g.s, ", ", g.t, ") out of range");
    if (g.t > g.s) out.push_back(g);
  }
  return out;
}

int64_t padded(int64_t n, int64_t step) { return n < step ? n : (n + step - 1) / step * step; }

// rows of the largest padded segment: the size of each thread's buffers
int64_t most_rows(const std::vector<Seg>& segs, int64_t step) {
  int64_t most = 0;
  for (const Seg& g : segs) most = std::max(most, padded(g.t - g.s, step));
  return most;
}

// A task: a run of segments [begin, end) that one thread takes at once.
struct Task {
  int64_t begin, end, rows;
};

// f(segment index, buffers) for every segment of every task, the tasks handed out one at
// a time (experts differ in size)
template <class Bufs, class Fn>
void for_each_task(const std::vector<Task>& tasks, const std::function<Bufs()>& make, const Fn& f) {
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(tasks.size());
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Bufs b = make();
    for (int64_t i; (i = next.fetch_add(1)) < n;)
      for (int64_t j = tasks[i].begin; j < tasks[i].end; ++j) f(j, b);
  });
}

// One task per segment (the forward), or per run of one expert's segments (the backward),
// the longest first: the last tasks to start are the short ones, so the threads finish
// close together. Each task writes rows and weight gradients no other task writes, so
// the order changes no result.
std::vector<Task> make_tasks(const std::vector<Seg>& segs, bool by_expert) {
  std::vector<Task> out;
  for (int64_t i = 0; i < static_cast<int64_t>(segs.size()); ++i) {
    const int64_t n = segs[i].t - segs[i].s;
    if (by_expert && !out.empty() && segs[out.back().begin].e == segs[i].e) {
      out.back().end = i + 1;
      out.back().rows += n;
    } else {
      TORCH_CHECK(!by_expert || std::none_of(out.begin(), out.end(), [&](const Task& t) { return segs[t.begin].e == segs[i].e; }),
                  "expert_bank: an expert's segments must follow each other");  // else two threads write its gradients
      out.push_back({i, i + 1, n});
    }
  }
  std::stable_sort(out.begin(), out.end(), [](const Task& a, const Task& b) { return a.rows > b.rows; });
  return out;
}

// where each segment's rows of h start: h[c] holds rows h_rows[c] .. h_rows[c] + h[c].size(0)
// of the call, (rows, width) contiguous float32, the starts ascending; every segment must
// lie inside one block
std::vector<float*> h_rows_of(const std::vector<Seg>& segs, at::TensorList h, at::IntArrayRef h_rows, int64_t width) {
  TORCH_CHECK(h.size() == h_rows.size(), "expert_bank: ", h.size(), " blocks of h but ", h_rows.size(), " row starts");
  TORCH_CHECK(std::is_sorted(h_rows.begin(), h_rows.end()), "expert_bank: the row starts of h must ascend");
  for (const at::Tensor& b : h)
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.is_contiguous() && b.dim() == 2 && b.size(1) == width,
                "expert_bank: each block of h must be contiguous float32 (rows, ", width, ")");
  std::vector<float*> out;
  for (const Seg& g : segs) {
    const auto c = std::upper_bound(h_rows.begin(), h_rows.end(), g.s) - h_rows.begin() - 1;
    TORCH_CHECK(c >= 0 && g.s >= h_rows[c] && g.t <= h_rows[c] + h[c].size(0), "expert_bank: rows ", g.s, "..",
                g.t, " are not inside one block of h");
    out.push_back(h[c].data_ptr<float>() + (g.s - h_rows[c]) * width);
  }
  return out;
}

// The calling thread's buffers, (rows, width) each, carved from one block that lives as
// long as the thread (torch's pool threads persist) and only grows. Fresh buffers on
// every call were fresh pages to fault in: measured on the "many" layer, the gather and
// the SwiGLU (the first writes to them) took 5 and 6.5 ms per thread of a 72 ms forward.
std::vector<at::Tensor> thread_buffers(std::initializer_list<int64_t> widths, int64_t rows) {
  thread_local std::vector<float> store;
  int64_t total = 0;
  for (const int64_t w : widths) total += rows * w;
  if (static_cast<int64_t>(store.size()) < total) store.resize(total);
  float* p = store.data();
  std::vector<at::Tensor> out;
  for (const int64_t w : widths) {
    out.push_back(at::from_blob(p, {rows, w}, at::TensorOptions().dtype(at::kFloat)));
    p += rows * w;
  }
  return out;
}

// n floats of the calling thread's own (bank_common.h)
at::Tensor thread_scratch(int64_t n) {
  return at::from_blob(moekit::bank::thread_floats(n), {n}, at::TensorOptions().dtype(at::kFloat));
}

// The gathered rows lie at random places and the saved pre-activations were written
// long before the backward reads them: both are prefetched PREFETCH_AHEAD rows early
// (vec_math.h). Measured on the "many" layer (per thread and chunk of ~8.5 experts,
// timers inside this kernel): the backward's two gathers 0.8 -> 0.5 ms and its SwiGLU
// 0.55 -> 0.17 ms.
constexpr int64_t AHEAD = moekit::PREFETCH_AHEAD;

// rows src[idx[r]] into dst rows 0..n-1, zero rows n..m-1
void gather_rows(const at::Tensor& src, const int64_t* idx, int64_t n, int64_t m, const at::Tensor& dst) {
  const int64_t W = src.size(1), st = src.stride(0);
  const float* sp = src.data_ptr<float>();
  float* dp = dst.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r) {
    if (r + AHEAD < n) moekit::prefetch_floats(sp + idx[r + AHEAD] * st, W);
    std::memcpy(dp + r * W, sp + idx[r] * st, W * sizeof(float));
  }
  if (m > n) std::memset(dp + n * W, 0, (m - n) * W * sizeof(float));
}

// out (S, width) contiguous float32 and dst (rows,) int64 with every entry in [0, S)
const int64_t* check_dst(const at::Tensor& out, const at::Tensor& dst, int64_t rows, int64_t width) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(1) == width,
              "expert_bank: out must be contiguous float32 (S, ", width, ")");
  TORCH_CHECK(dst.scalar_type() == at::kLong && dst.dim() == 1 && dst.is_contiguous() && dst.numel() == rows,
              "expert_bank: dst must be contiguous int64 with one entry per row");
  const int64_t* p = dst.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(p[r] >= 0 && p[r] < out.size(0), "expert_bank: destination row ", p[r], " out of range");
  return p;
}

// rows 0..n-1 of src (n, W) to the rows dst[0..n-1] of out, each times s[r] when s is given.
// stream: with non-temporal stores where the rows are whole 64-byte lines, for outputs
// that are read once, much later (the slot buffer of moe/experts/cpu/whole.py: 64 MiB on
// the "many" layer, more than the caches hold): the lines are not read from memory
// before being overwritten, and they do not evict the weights and rows still in use.
// many forward: 0.968 of the time of plain stores
// (`python benchmarks/ab.py --config many --mode fwd --a stream=false --b stream=true`, AVX-512).
void scatter_rows(const float* src, int64_t n, int64_t W, const int64_t* dst, const float* s, float* out,
                  bool stream) {
#ifdef __AVX512F__
  if (stream && W % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 64 == 0) {
    for (int64_t r = 0; r < n; ++r) {
      float* o = out + dst[r] * W;
      const float* a = src + r * W;
      const __m512 f = _mm512_set1_ps(s == nullptr ? 1.0f : s[r]);
      for (int64_t d = 0; d < W; d += 16) _mm512_stream_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(a + d), f));
    }
    _mm_sfence();
    return;
  }
#endif
  for (int64_t r = 0; r < n; ++r) {
    float* o = out + dst[r] * W;
    const float* a = src + r * W;
    if (s == nullptr) {
      std::memcpy(o, a, W * sizeof(float));
    } else {
      for (int64_t d = 0; d < W; ++d) o[d] = a[d] * s[r];
    }
  }
}

struct FwdBufs {
  at::Tensor x, h, a, o, wt;
};

// out[dst[r]] = w · (silu(x W_gᵀ) · x W_uᵀ) W_outᵀ for the call's rows r; h (blocks of
// (rows, 2F)) gets the pre-activations when given (saved for the backward)
void bank_fwd(const at::Tensor& x, const at::Tensor& tok, const at::Tensor& wts, const at::Tensor& seg,
              const at::Tensor& w_in, const at::Tensor& w_out, const at::Tensor& out, const at::Tensor& dst,
              at::TensorList h, at::IntArrayRef h_rows, int64_t step, int64_t engine, bool stream) {
  moekit::bank::check_inputs(x, tok, wts, w_in, w_out);
  TORCH_CHECK(engine >= MATMUL && engine <= BLAS, "expert_bank: engine ", engine, " is not 0, 1 or 2");
  // only oneDNN's matmul compiles a kernel per shape and wants padded rows
  const bool micro = engine == MICRO, unpadded = engine != MATMUL;
  const int64_t rows = tok.numel(), D = x.size(1), F = w_out.size(2), N = 2 * F;
  const int64_t* dp = check_dst(out, dst, rows, D);
  const std::vector<Seg> segs = read_segments(seg, w_in.size(0), rows);
  const bool keep_h = !h.empty();
  const std::vector<float*> hseg = keep_h ? h_rows_of(segs, h, h_rows, N) : std::vector<float*>();
  const int64_t most = most_rows(segs, step);
  const int64_t* tp = tok.data_ptr<int64_t>();
  const float* wp = wts.data_ptr<float>();
  // the routing weight scales a (F wide) or the output (D wide), whichever is narrower
  const bool weight_a = F <= D;
  std::function<FwdBufs()> make = [&] {
    const std::vector<at::Tensor> v = thread_buffers({D, N, F, D}, most);
    return FwdBufs{v[0], v[1], v[2], v[3], micro ? thread_scratch(N * D) : at::Tensor()};
  };
  for_each_task(make_tasks(segs, false), make, [&](int64_t i, FwdBufs& b) {
    const Seg& g = segs[i];
    const int64_t n = g.t - g.s, m = unpadded ? n : padded(n, step);
    float* wt = micro ? b.wt.data_ptr<float>() : nullptr;
    const at::Tensor xm = b.x.narrow(0, 0, m), am = b.a.narrow(0, 0, m), om = b.o.narrow(0, 0, m);
    // unpadded, h goes straight into the saved rows (there are no padding rows to spill)
    const bool direct = unpadded && keep_h;
    const at::Tensor hm = direct ? at::from_blob(hseg[i], {n, N}, at::TensorOptions().dtype(at::kFloat))
                                 : b.h.narrow(0, 0, m);
    gather_rows(x, tp + g.s, n, m, xm);
    mm_nt(engine, xm, w_in[g.e], hm, wt);
    if (keep_h && !direct) std::memcpy(hseg[i], hm.data_ptr<float>(), n * N * sizeof(float));
    const float* hp = hm.data_ptr<float>();
    float* ap = am.data_ptr<float>();
    for (int64_t r = 0; r < m; ++r)
      moekit::fwd_row(hp + r * N, hp + r * N + F, weight_a && r < n ? wp[g.s + r] : 1.0f, ap + r * F, F);
    mm_nt(engine, am, w_out[g.e], om, wt);
    scatter_rows(om.data_ptr<float>(), n, D, dp + g.s, weight_a ? nullptr : wp + g.s, out.data_ptr<float>(), stream);
  });
}

struct BwdBufs {
  at::Tensor dy, u, dh, a, x, dx, t;
};

// Given dy (T, D) and the forward's h (rows, 2F): dx rows into dx_out[dst[r]], the
// routing-weight gradient per row into dw, and each segment's weight gradients written
// (first-write) or added into dw_in (E, 2F, D) and dw_out (E, D, F). Undefined or empty
// outputs are not computed.
void bank_bwd(const at::Tensor& x, const at::Tensor& tok, const at::Tensor& wts, const at::Tensor& seg,
              const at::Tensor& w_in, const at::Tensor& w_out, at::TensorList h, at::IntArrayRef h_rows,
              const at::Tensor& dy,
              const at::Tensor& dx_out, const at::Tensor& dst, const at::Tensor& dw, const at::Tensor& dw_in,
              const at::Tensor& dw_out, int64_t step, int64_t engine, bool stream) {
  moekit::bank::check_inputs(x, tok, wts, w_in, w_out);
  TORCH_CHECK(engine >= MATMUL && engine <= BLAS, "expert_bank: engine ", engine, " is not 0, 1 or 2");
  const bool micro = engine == MICRO;
  const int64_t rows = tok.numel(), D = x.size(1), F = w_out.size(2), N = 2 * F;
  TORCH_CHECK(dy.scalar_type() == at::kFloat && dy.is_contiguous() && dy.sizes() == x.sizes(),
              "expert_bank: dy must be contiguous float32 like x");
  const bool need_x = dx_out.numel() > 0, need_w = dw.numel() > 0;
  const bool need_win = dw_in.numel() > 0, need_wout = dw_out.numel() > 0;
  const int64_t* dp = need_x ? check_dst(dx_out, dst, rows, D) : nullptr;
  TORCH_CHECK(!need_w || (dw.is_contiguous() && dw.numel() == rows && dw.scalar_type() == at::kFloat),
              "expert_bank: dw must be float32 with one per row");
  TORCH_CHECK(!need_win || (dw_in.sizes() == w_in.sizes() && dw_in.is_contiguous() && dw_in.scalar_type() == at::kFloat), "expert_bank: dw_in must be like w_in");
  TORCH_CHECK(!need_wout || (dw_out.sizes() == w_out.sizes() && dw_out.is_contiguous() && dw_out.scalar_type() == at::kFloat), "expert_bank: dw_out must be like w_out");
  const std::vector<Seg> segs = read_segments(seg, w_in.size(0), rows);
  const std::vector<float*> hseg = h_rows_of(segs, h, h_rows, N);
  const int64_t most = most_rows(segs, step);
  const int64_t* tp = tok.data_ptr<int64_t>();
  const float* wp = wts.data_ptr<float>();
  std::function<BwdBufs()> make = [&] {
    // micro: one more buffer for the transposed left operand of the weight gradients
    const std::vector<at::Tensor> v = thread_buffers({D, F, N, F, D, D, micro ? std::max(D, N) : 0}, most);
    return BwdBufs{v[0], v[1], v[2], v[3], v[4], v[5], v[6]};
  };
  for_each_task(make_tasks(segs, true), make, [&](int64_t i, BwdBufs& b) {
    const Seg& g = segs[i];
    // m: rows padded for the weight gradients' reduction (oneDNN compiles a kernel per
    // shape, the micro-kernel too), none on BLAS; k: the rows the other products run on
    const int64_t n = g.t - g.s, m = engine == BLAS ? n : padded(n, step), k = micro ? n : m;
    float* tr = micro ? b.t.data_ptr<float>() : nullptr;
    const at::Tensor dym = b.dy.narrow(0, 0, m), dhm = b.dh.narrow(0, 0, m), am = b.a.narrow(0, 0, m);
    gather_rows(dy, tp + g.s, n, m, dym);
    mm(engine, dym.narrow(0, 0, k), w_out[g.e], b.u.narrow(0, 0, k));  // u = dy · W_out: reaches w·a
    const float* hp = hseg[i];
    const float* up = b.u.data_ptr<float>();
    float* dhp = dhm.data_ptr<float>();
    float* ap = am.data_ptr<float>();
    for (int64_t r = 0; r < n; ++r) {
      if (r + AHEAD < n) moekit::prefetch_floats(hp + (r + AHEAD) * N, N);
      const float* gr = hp + r * N;
      float* dg = dhp + r * N;
      const float dot = need_wout ? moekit::bwd_row<true>(gr, gr + F, up + r * F, wp[g.s + r], dg, dg + F, ap + r * F, F)
                                  : moekit::bwd_row<false>(gr, gr + F, up + r * F, wp[g.s + r], dg, dg + F, nullptr, F);
      if (need_w) dw.data_ptr<float>()[g.s + r] = dot;
    }
    if (m > n) {  // padding rows: zero, so they add nothing to the weight gradients
      std::memset(dhp + n * N, 0, (m - n) * N * sizeof(float));
      if (need_wout) std::memset(ap + n * F, 0, (m - n) * F * sizeof(float));
    }
    if (need_wout) mm_tn(engine, dym, am, dw_out[g.e], !g.first, tr);  // dyᵀ (w·a)
    if (need_win) {  // dhᵀ x
      const at::Tensor xm = b.x.narrow(0, 0, m);
      gather_rows(x, tp + g.s, n, m, xm);
      mm_tn(engine, dhm, xm, dw_in[g.e], !g.first, tr);
    }
    if (need_x) {  // dh · W_in
      const at::Tensor dxm = b.dx.narrow(0, 0, k);
      mm(engine, dhm.narrow(0, 0, k), w_in[g.e], dxm);
      scatter_rows(dxm.data_ptr<float>(), n, D, dp + g.s, nullptr, dx_out.data_ptr<float>(), stream);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moekit, m) {
  m.def("expert_bank_fwd(Tensor x, Tensor tok, Tensor weights, Tensor seg, Tensor w_in, Tensor w_out, "
        "Tensor(a!) out, Tensor dst, Tensor(b!)[] h, int[] h_rows, int step, int engine, bool stream) -> ()");
  m.def("expert_bank_bwd(Tensor x, Tensor tok, Tensor weights, Tensor seg, Tensor w_in, Tensor w_out, Tensor[] h, "
        "int[] h_rows, Tensor dy, Tensor(a!) dx_out, Tensor dst, Tensor(b!) dw, Tensor(c!) dw_in, Tensor(d!) dw_out, "
        "int step, int engine, bool stream) -> ()");
}
TORCH_LIBRARY_IMPL(moekit, CPU, m) {
  m.impl("expert_bank_fwd", bank_fwd);
  m.impl("expert_bank_bwd", bank_bwd);
}
