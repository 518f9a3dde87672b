// Per-step draft-budget allocation, per-row (ragged) verify: the policy's hot path at
// batch 512 (das_sglang/core/allocation.py holds the same math in numpy, the reference
// the tests compare this with, and its derivation).
//
// Exactness: every element-wise expression is evaluated in numpy's order, the sums that
// numpy takes with its pairwise summation (np.sum of a float64 array) use the same
// pairwise scheme (pairwise_sum), running sums (np.cumsum) stay sequential, and ties
// break as numpy's stable sorts and first-index argmin / argmax do. So the budgets are
// numpy's, and the modeled seconds agree to the last bits (exp() is the C library's,
// numpy may use its own SIMD one: one ulp apart at most).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace das::alloc {

struct Cost {
  double c_base = 0.0;  // seconds per forward
  double c_tok = 0.0;   // seconds per processed token
  double c_kv = 0.0;    // seconds per KV token read
};

// Row-major rows x width matrix of expected accepted tokens E_i(b) (edge-padded), each
// row's usable budget m_i <= width - 1, predicted remaining tokens and KV tokens per row.
struct Curves {
  const double* remaining;
  const double* acc;
  const int64_t* m;
  const double* kv;
  size_t rows;
  size_t width;
};

struct Allocation {
  std::vector<int32_t> budgets;
  int32_t width = 0;
  double modeled_s = 0.0;
  double baseline_s = 0.0;
  double makespan_steps = 0.0;
};

// numpy's pairwise summation of a float64 array (np.add.reduce): n < 8 sequential, up to
// 128 elements eight interleaved accumulators, longer ones split in halves (multiples of 8).
double pairwise_sum(const double* a, size_t n, size_t stride = 1);

// allocation._best_per_row: the stationary optimum (exact integer minimiser of the
// step objective, per-row budgets).
Allocation best_per_row(const Curves& c, const Cost& cost);

// allocation.lookahead_step_budgets with uniform_width False: the stationary optimum's
// token values (token_values), then _fill_nodes. Returns false (nothing written) where
// numpy's rank-everything path would run instead (c_tok < 0 or a NaN gain).
bool lookahead_per_row(const Curves& c, const Cost& cost, double spread, double free_tokens,
                       Allocation& out);

}  // namespace das::alloc
