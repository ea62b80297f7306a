// What the expert bank's kernels (expert_bank.cpp, expert_bank_cols.cpp) share: the
// input checks (the rows' tokens and routing weights, the stacked SwiGLU weights) and the
// threads' scratch memory.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace moekit::bank {

// x (T, D) contiguous CPU float32; tok (rows,) int64 with every token in [0, T); wts (rows,)
// float32
inline void check_rows(const at::Tensor& x, const at::Tensor& tok, const at::Tensor& wts) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "expert_bank: x must be contiguous CPU float32 (T, D)");
  TORCH_CHECK(tok.scalar_type() == at::kLong && tok.dim() == 1 && tok.is_contiguous(),
              "expert_bank: tok must be contiguous int64");
  TORCH_CHECK(wts.scalar_type() == at::kFloat && wts.is_contiguous() && wts.numel() == tok.numel(),
              "expert_bank: weights must be contiguous float32 with one per row");
  const int64_t* tp = tok.data_ptr<int64_t>();
  for (int64_t r = 0; r < tok.numel(); ++r)
    TORCH_CHECK(tp[r] >= 0 && tp[r] < x.size(0), "expert_bank: token index ", tp[r], " out of range");
}

// check_rows, and w_in (E, 2F, D) and w_out (E, D, F) contiguous float32
inline void check_inputs(const at::Tensor& x, const at::Tensor& tok, const at::Tensor& wts, const at::Tensor& w_in,
                         const at::Tensor& w_out) {
  check_rows(x, tok, wts);
  TORCH_CHECK(w_in.scalar_type() == at::kFloat && w_in.dim() == 3 && w_in.is_contiguous() &&
                  w_out.scalar_type() == at::kFloat && w_out.dim() == 3 && w_out.is_contiguous(),
              "expert_bank: w_in (E, 2F, D) and w_out (E, D, F) must be contiguous float32");
  const int64_t D = x.size(1), F = w_out.size(2);
  TORCH_CHECK(w_in.size(2) == D && w_in.size(1) == 2 * F && w_out.size(1) == D && w_out.size(0) == w_in.size(0),
              "expert_bank: weight shapes ", w_in.sizes(), " and ", w_out.sizes(), " do not fit D=", D);
}

// The calling thread's n floats: one block per thread that lives as long as the thread
// (torch's pool threads persist) and only grows. Fresh buffers on every call were fresh
// pages to fault in (expert_bank.cpp: thread_buffers says how costly). One kernel call
// at a time uses it per thread.
inline float* thread_floats(int64_t n) {
  thread_local std::vector<float> store;
  if (static_cast<int64_t>(store.size()) < n) store.resize(n);
  return store.data();
}

}  // namespace moekit::bank
