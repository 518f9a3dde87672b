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

#include <algorithm>
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

namespace das::alloc {

// The online acceptance curves of one plan's rows (policy._ModelBased.inputs with
// curve_mode "online", flat drafts; OnlineCalibration.ratios / node_bins): per row i,
// W = max(m) + 1 columns.
//   base[i, b]  = sum of row i's first min(b, m_i) node probabilities (np.cumsum);
//   bins[i, r]  = the depth bin of node r (depth_bin[min(depth, max_budget)]) for
//                 r < min(len_i, W - 1), else rank_bin[r] (node_bins, uncapped);
//   acc[i, b]   = min(sum_{r < b} (base[r+1] - base[r]) * table[state_i, match_i,
//                 min(bins[i, r], B - 1)] * relative_i, b)  (running sum, sequential).
// Every element-wise expression in numpy's order, so the arrays are numpy's bit for bit.
struct OnlineCurves {
  std::vector<double> base, acc;  // rows x width, row-major
  std::vector<int64_t> bins;      // rows x (width - 1)
  size_t width = 1;
};

struct OnlineInputs {
  const int64_t* offsets;  // rows + 1: row i's nodes are [offsets[i], offsets[i + 1])
  const double* probs;
  const int32_t* depths;
  const int64_t* m;  // nodes read per row (<= its node count)
  size_t rows;
  const double* table;  // states x match bins x rank bins, row-major
  size_t n_states, n_match, n_bins;
  const int64_t* states;
  const int64_t* match;
  const double* relative;
  const int64_t* depth_bin;  // depth (capped at max_budget) -> bin
  const int64_t* rank_bin;   // rank r (0-based) -> bin, at least width - 1 entries
  int64_t max_budget;
};

void online_curves(const OnlineInputs& in, OnlineCurves& out);

// One plan's verify outcomes added to the online calibration's cells
// (online_acceptance.OnlineCalibration._add). Row i (planned row p = pos[i], budget
// b_i > 0) accepted a_i = min(max(generated_i - pend_generated[p] - 1, 0), b_i) drafts; its
// next state is 1 + min(ceil(log2(a_i + 1)), 5) + (a_i == b_i ? 6 : 0). For each depth bin
// k its hits are clip(a_i - bin_before[k], 0, bin_size[k]) and its expectation the sum of
// its first b_i planned node values whose bin is k, in node order; both are summed per
// cell (states_i, pend_match[p], k) over the rows in order (np.bincount) and then added
// to the cell's (accepted, expected) pair: numpy's sums bit for bit.
struct OnlineOutcomes {
  double* cells;  // n_states x n_match x n_bins x 2, row-major (updated in place)
  size_t n_states, n_match, n_bins;
  const int64_t* generated;
  const int64_t* pos;
  const int64_t* budget;
  const int64_t* states;
  size_t rows;
  const int64_t* pend_generated;  // per planned row
  const int64_t* pend_match;
  const double* pend_nodes;  // planned rows x width
  const int64_t* pend_bins;  // planned rows x width
  size_t width;
  const int64_t* bin_before;  // n_bins
  const int64_t* bin_size;
};

void online_add(const OnlineOutcomes& in, int64_t* new_states);

// OnlineCalibration.table: (state, match bin, depth bin) -> accepted / expected, shrunk
// (module docstring of online_acceptance.py) from the S x M x B x 2 cells into out (S x M x
// B); numpy's sums (sequential over the reduced axes, C order) and arithmetic, the same doubles.
void online_table(const double* cells, size_t S, size_t M, size_t B, double w, double prior, double* out);

// OnlineCalibration.update's arithmetic for a whole batch: cells *= decay (when decay < 1),
// then the outcomes of the rows whose planned row (at[i], or i itself when at is null; -1:
// none) had a budget > 0 are added as online_add adds them (rows in order, the same
// doubles); every other row keeps its state. in.pos / in.budget / in.rows are unused here:
// in.states and the result are per batch row (rows entries). Returns the rows updated.
size_t online_update(const OnlineOutcomes& in, double decay, const int64_t* at, const int64_t* pend_budget,
                     size_t planned, size_t rows, int64_t* new_states);

// The length predictor's queries (length_predictor._LengthQueries.predict_many, with class
// thresholds): each row asks its initial class's group (if that group exists), then the
// group of every problem pooled; in the first whose rollouts run longer than g somewhere,
// per class c: count_c = rollouts longer than g, sum_c their lengths (sorted lengths and
// suffix sums); c* = the first argmax of (count_c > 0 ? count_c + 1 : -1), remaining =
// sum_c* / max(count_c*, 1) - g. Nowhere longer: tail_factor * g, class LONG (2). Then
// clipped to [1, cap]. numpy's arithmetic in numpy's order: the same doubles.
struct LengthGroups {
  const int64_t* present;      // 4 slots: short, medium, long, all problems pooled
  const double* sorted;        // block b = slot * 3 + class: [sorted_off[b], sorted_off[b + 1])
  const int64_t* sorted_off;   // 13
  const double* suffix;        // block b: [suffix_off[b], suffix_off[b + 1]), one more entry
  const int64_t* suffix_off;   // 13
};

// The class a row is re-classified to from its group's counts and sums of longer lengths
// per class (some count > 0): the first argmax of (count_c > 0 ? count_c + 1 : -1); sets
// remaining = sum_c* / max(count_c*, 1) - g. (Shared with lengths::LengthIndex.)
inline int64_t pick_length_class(const double counts[3], const double sums[3], double g, double& remaining) {
  int best = 0;
  double top = counts[0] > 0 ? counts[0] + 1.0 : -1.0;
  for (int c = 1; c < 3; ++c) {
    const double v = counts[c] > 0 ? counts[c] + 1.0 : -1.0;
    if (v > top) top = v, best = c;
  }
  remaining = sums[best] / std::max(counts[best], 1.0) - g;
  return best;
}

void length_remaining(const LengthGroups& groups, const double* g, const double* cap, const int64_t* c0,
                      size_t rows, double tail_factor, double* remaining, int64_t* cls);

}  // namespace das::alloc
