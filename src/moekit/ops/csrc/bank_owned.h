// Threads owning tokens, for the expert bank's forwards that add output rows straight
// into y (expert_bank_cols.cpp: activations in columns; expert_bank_rows.cpp: in rows).
//
// Each thread owns a range of tokens and runs every expert, in order, on its own tokens'
// rows, so no other thread writes its rows of y. A thread out of work takes pieces from
// the back of another's list; the owner adds their outputs after its own, in order, so a
// token's output is the sum of its rows' outputs in row order whoever computed them: the
// result does not depend on the thread count or the scheduling.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "bank_common.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MOEKIT_PAUSE() _mm_pause()
#else
#define MOEKIT_PAUSE() ((void)0)
#endif

namespace moekit::bank {

// Each expert's first row: start[e] .. start[e + 1] are expert e's rows (counts may stop
// before the last expert); the counts must add up to `rows`
inline std::vector<int64_t> expert_starts(const at::Tensor& counts, int64_t E, int64_t rows, const char* op) {
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.dim() == 1 && counts.is_contiguous() &&
                  counts.numel() <= E, op, ": counts must be contiguous int64 with at most ", E, " entries");
  std::vector<int64_t> start{0};
  const int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t e = 0; e < counts.numel(); ++e) {
    TORCH_CHECK(cp[e] >= 0, op, ": expert ", e, " has a negative count ", cp[e]);
    start.push_back(start.back() + cp[e]);
  }
  TORCH_CHECK(start.back() == rows, op, ": the counts add up to ", start.back(), " rows, not ", rows);
  return start;
}

// Some rows of one expert: rows b .. b+n-1 of a unit's row lists. The column kernel pads
// them to whole vectors, with a row stride of an odd number of cache lines: a power-of-two
// stride maps the rows onto few L1 sets (harness: 128 columns at 208 GFLOP/s against
// 224-229 for 112 and 144).
struct Piece {
  int64_t e, b, n;
  int64_t nc() const { return (n + 15) / 16 * 16; }
  int64_t ld() const { return nc() | 16; }
};

// One thread's tokens [t0, t1): their rows, expert by expert, cut into pieces of equal
// size, at most `most` rows each. Its thread adds every piece's output into y, in order;
// a thread that runs out of work takes pieces from the back (state THIEF) and leaves
// their output in `stolen` (state DONE) for the owner to add in turn.
struct Owned {
  enum : int { FREE, OWNER, THIEF, DONE };
  int64_t t0 = 0, t1 = 0;
  std::vector<int64_t> idx, rid;  // token and row of each of its rows
  std::vector<float> wr;          // its routing weight
  std::vector<Piece> pieces;
  std::unique_ptr<std::atomic<int>[]> state;
  std::vector<std::vector<float>> stolen;
  std::atomic<bool> ready{false};

  void build(int64_t lo, int64_t hi, const std::vector<int64_t>& start, const int64_t* tp, const float* wp,
             bool rows, int64_t most) {
    t0 = lo;
    t1 = hi;
    for (size_t e = 0; e + 1 < start.size(); ++e) {
      const int64_t b = static_cast<int64_t>(idx.size());
      for (int64_t r = start[e]; r < start[e + 1]; ++r)
        if (tp[r] >= t0 && tp[r] < t1) {
          if (rows) rid.push_back(r);
          idx.push_back(tp[r]);
          wr.push_back(wp[r]);
        }
      const int64_t n = static_cast<int64_t>(idx.size()) - b, k = (n + most - 1) / most;
      for (int64_t q = 0, q0 = 0; q < k; ++q) {
        const int64_t nq = (n - q0) / (k - q);
        pieces.push_back({static_cast<int64_t>(e), b + q0, nq});
        q0 += nq;
      }
    }
    state.reset(new std::atomic<int>[pieces.size()]);
    for (size_t i = 0; i < pieces.size(); ++i) state[i].store(FREE, std::memory_order_relaxed);
    stolen.resize(pieces.size());
    ready.store(true, std::memory_order_release);
  }

  bool claim(int64_t j, int who) {
    int free = FREE;
    return state[j].compare_exchange_strong(free, who, std::memory_order_acq_rel);
  }
};

// y (T, D): P threads own tokens [T·p/P, T·(p+1)/P). compute(u, j, next, buf, seen)
// computes piece j of unit u in the calling thread's `buf_floats` floats; `next` is the
// piece of u the thread runs after it (-1: none), for prefetching. Its owner passes `seen`,
// and the piece's output either goes into y there (compute returns nullptr) or is
// returned for add(u, piece, out, seen) to add. A thief passes nullptr and gets the output
// back (out_floats(piece) floats, in the kernel's layout); its owner adds it later.
// A token's row of y is written where seen[token - t0] is still 0, added to after. Tokens
// no row names get zeros. Returns how many pieces threads took from other threads' tokens.
template <class Compute, class OutFloats, class Add>
int64_t run_owned(int64_t T, int64_t D, const std::vector<int64_t>& start, const int64_t* tp, const float* wp,
                  bool rows, int64_t most, int64_t buf_floats, float* y, const Compute& compute,
                  const OutFloats& out_floats, const Add& add) {
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), T / 64));
  std::vector<Owned> units(P);
  std::atomic<int64_t> stolen{0};
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    float* buf = thread_floats(buf_floats);
    Owned& u = units[p0];
    u.build(T * p0 / P, T * p1 / P, start, tp, wp, rows, most);
    for (int64_t q = p0 + 1; q < p1; ++q) units[q].ready.store(true, std::memory_order_release);  // empty
    // the owner: pieces from the front, each added into y as it comes
    std::vector<uint8_t> seen(u.t1 - u.t0, 0);
    const int64_t J = static_cast<int64_t>(u.pieces.size());
    int64_t j = 0;
    for (; j < J && u.claim(j, Owned::OWNER); ++j)
      if (const float* out = compute(u, j, j + 1 < J ? j + 1 : -1, buf, seen.data())) add(u, u.pieces[j], out, seen.data());
    // a thief: the other units' pieces from their back, while they have free ones; each
    // output waits in the unit's own room for its owner to add it
    for (int64_t k = 1; k < P; ++k) {
      Owned& v = units[(p0 + k) % P];
      // its thread builds it first thing (skipping it while not yet built left a thread
      // with no tokens of its own idle on every call but the first)
      while (!v.ready.load(std::memory_order_acquire)) MOEKIT_PAUSE();
      for (int64_t i = static_cast<int64_t>(v.pieces.size()) - 1; i >= 0; --i) {
        const int s = v.state[i].load(std::memory_order_acquire);
        if (s == Owned::OWNER) break;  // the owner got here
        if (s != Owned::FREE || !v.claim(i, Owned::THIEF)) continue;
        const float* out = compute(v, i, i - 1, buf, nullptr);
        v.stolen[i].assign(out, out + out_floats(v.pieces[i]));
        v.state[i].store(Owned::DONE, std::memory_order_release);
        stolen.fetch_add(1, std::memory_order_relaxed);
      }
    }
    // the owner again: the pieces thieves took, added in their order once computed
    for (; j < J; ++j) {
      while (u.state[j].load(std::memory_order_acquire) != Owned::DONE) MOEKIT_PAUSE();
      add(u, u.pieces[j], u.stolen[j].data(), seen.data());
    }
    for (int64_t t = u.t0; t < u.t1; ++t)  // tokens no row names: nothing from the bank
      if (!seen[t - u.t0]) std::memset(y + t * D, 0, D * sizeof(float));
  });
  return stolen.load();
}

}  // namespace moekit::bank
