// Per-step budget allocation (see allocation.h; the numpy reference and the derivation:
// das_sglang/core/allocation.py). Comments name the numpy lines each block mirrors.
#include "allocation.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

namespace das::alloc {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kFreeTokenShare = 0.1;  // allocation.FREE_TOKEN_SHARE

// step_objective(remaining, (acc, m), budgets, kv, cost, uniform_width=False)
void step_objective(const Curves& c, const Cost& cost, const std::vector<int32_t>& budgets,
                    double& modeled, double& makespan) {
  const size_t n = c.rows;
  std::vector<double> per_row(n);
  makespan = n ? -kInf : 0.0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t b = std::min<int64_t>(budgets[i], c.m[i]);
    const double got = c.acc[i * c.width + size_t(b)];
    const double steps = c.remaining[i] / (1.0 + got);
    const double tokens = 1.0 + double(budgets[i]);
    per_row[i] = steps * (cost.c_tok * tokens + cost.c_kv * c.kv[i]);
    makespan = std::max(makespan, steps);
  }
  modeled = cost.c_base * makespan + pairwise_sum(per_row.data(), n);
}

// The stable ascending order of `vals` (a permutation of 0..n-1; equal values keep their
// index order), by an LSD radix sort of their bit patterns, which order like the values
// for finite non-negative doubles (+0.0 included, -0.0 not). False, `order` unset, when
// some value is not one of those: the caller sorts by comparison then. With it,
// lookahead_per_row took 268 us a call where std::sort of (value, index) pairs gave 390
// (40 captured 512-row plans, both builds alternating in one process).
bool radix_order(const double* vals, size_t n, std::vector<uint32_t>& order) {
  std::vector<uint64_t> keys(n);
  uint64_t diff = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!(vals[i] >= 0.0) || !std::isfinite(vals[i]) || std::signbit(vals[i])) return false;
    std::memcpy(&keys[i], &vals[i], sizeof(double));
    diff |= keys[i] ^ keys[0];
  }
  order.resize(n);
  std::iota(order.begin(), order.end(), 0u);
  std::vector<uint32_t> tmp(n);
  for (int shift = 0; shift < 64; shift += 8) {
    if (((diff >> shift) & 0xFF) == 0) continue;  // every key has the same byte here
    size_t count[257] = {0};
    for (size_t i = 0; i < n; ++i) ++count[((keys[i] >> shift) & 0xFF) + 1];
    for (int d = 0; d < 256; ++d) count[d + 1] += count[d];
    for (size_t i = 0; i < n; ++i) {
      const uint32_t o = order[i];
      tmp[count[(keys[o] >> shift) & 0xFF]++] = o;
    }
    order.swap(tmp);
  }
  return true;
}

}  // namespace

double pairwise_sum(const double* a, size_t n, size_t stride) {
  if (n < 8) {
    double res = 0.0;
    for (size_t i = 0; i < n; ++i) res += a[i * stride];
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[size_t(j) * stride];
    size_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[(i + size_t(j)) * stride];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i * stride];
    return res;
  }
  size_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2, stride) + pairwise_sum(a + n2 * stride, n - n2, stride);
}

Allocation best_per_row(const Curves& c, const Cost& cost) {
  const size_t n = c.rows, w = c.width;
  Allocation out;
  out.budgets.assign(n, 0);
  if (n == 0) return out;
  // steps = remaining / (1 + acc); row_cost = steps * (c_tok (1 + b) + c_kv kv), inf where
  // b > m; best_cost = its suffix minimum along the row. Only b <= m_i is kept (row i at
  // at[i], m_i + 1 entries): past it both are inf and nothing else reads them.
  std::vector<size_t> at(n + 1, 0);
  for (size_t i = 0; i < n; ++i) at[i + 1] = at[i] + size_t(c.m[i]) + 1;
  std::vector<double> steps(at[n]), row_cost(at[n]), best_cost(at[n]), cost0(n), best0(n);
  for (size_t i = 0; i < n; ++i) {
    const double* acc = c.acc + i * w;
    const size_t mi = size_t(c.m[i]);
    double* st = steps.data() + at[i];
    double* rc = row_cost.data() + at[i];
    double* bc = best_cost.data() + at[i];
    for (size_t j = 0; j <= mi; ++j) {
      st[j] = c.remaining[i] / (1.0 + acc[j]);
      rc[j] = st[j] * (cost.c_tok * (1.0 + double(j)) + cost.c_kv * c.kv[i]);
    }
    double run = kInf;
    for (size_t j = mi + 1; j-- > 0;) bc[j] = run = std::min(run, rc[j]);
    cost0[i] = rc[0];
    best0[i] = bc[0];
  }
  double n_lo = -kInf, top = -kInf;
  for (size_t i = 0; i < n; ++i) {
    n_lo = std::max(n_lo, steps[at[i] + size_t(c.m[i])]);
    top = std::max(top, c.remaining[i]);
  }
  // Events (i, j), j + 1 <= m_i, row-major, with value steps[i, j] > n_lo (the others have
  // fired for every candidate, see the numpy reference): delta best_cost[i, j+1] - [i, j].
  std::vector<std::pair<double, uint32_t>> ev;  // (value, event number): sorts stably
  std::vector<uint32_t> ev_row;
  std::vector<double> ev_delta;
  for (size_t i = 0; i < n; ++i) {
    const size_t mi = size_t(c.m[i]);
    const double* st = steps.data() + at[i];
    const double* bc = best_cost.data() + at[i];
    for (size_t j = 0; j < mi; ++j) {
      if (!(st[j] > n_lo)) continue;
      ev.emplace_back(st[j], uint32_t(ev.size()));
      ev_row.push_back(uint32_t(i));
      ev_delta.push_back(bc[j + 1] - bc[j]);
    }
  }
  out.baseline_s = cost.c_base * top + pairwise_sum(cost0.data(), n);
  const double base = pairwise_sum(best0.data(), n);
  {  // = the stable argsort of the values (ties by number)
    std::vector<double> vals(ev.size());
    for (size_t e = 0; e < ev.size(); ++e) vals[e] = ev[e].first;
    std::vector<uint32_t> order;
    if (radix_order(vals.data(), vals.size(), order)) {
      for (size_t e = 0; e < ev.size(); ++e) ev[e] = {vals[order[e]], order[e]};
    } else {
      std::sort(ev.begin(), ev.end());
    }
  }
  const size_t ne = ev.size();
  std::vector<double> prefix(ne + 1, 0.0);
  for (size_t k = 0; k < ne; ++k) prefix[k + 1] = prefix[k] + ev_delta[ev[k].second];
  // Candidate makespans: n_lo, the event values in (n_lo, top), top; sorted, unique.
  std::vector<double> cand;
  cand.reserve(ne + 2);
  cand.push_back(n_lo);
  for (const auto& e : ev)
    if (e.first < top) cand.push_back(e.first);  // (every event is above n_lo)
  cand.push_back(top);
  if (!std::is_sorted(cand.begin(), cand.end())) std::sort(cand.begin(), cand.end());
  cand.erase(std::unique(cand.begin(), cand.end()), cand.end());
  // t = c_base cand + base + (prefix[-1] - prefix[events with value <= cand]); the last
  // candidate within 1e-12 of the minimum (least speculation).
  std::vector<double> t(cand.size());
  double t_min = kInf;
  size_t k = 0;
  for (size_t q = 0; q < cand.size(); ++q) {
    while (k < ne && ev[k].first <= cand[q]) ++k;  // searchsorted(side="right")
    t[q] = (cost.c_base * cand[q] + base) + (prefix[ne] - prefix[k]);
    t_min = std::min(t_min, t[q]);
  }
  size_t best = 0;
  const double bound = t_min * (1 + 1e-12);
  for (size_t q = 0; q < cand.size(); ++q)
    if (t[q] <= bound) best = q;
  const double n_star = cand[best];
  // least budget per row: its events above N*; then the cheapest budget >= it (first).
  std::vector<int64_t> least(n, 0);
  for (size_t e = 0; e < ne; ++e)
    if (ev[e].first > n_star) ++least[ev_row[ev[e].second]];
  int32_t width = 0;
  for (size_t i = 0; i < n; ++i) {
    const double* rc = row_cost.data() + at[i];
    const size_t mi = size_t(c.m[i]);
    int32_t arg = 0;  // np.argmin: the first minimum (0 when every entry is inf)
    double best_c = least[i] <= 0 ? rc[0] : kInf;
    for (size_t j = 1; j <= mi; ++j) {
      const double v = int64_t(j) >= least[i] ? rc[j] : kInf;
      if (v < best_c) {
        best_c = v;
        arg = int32_t(j);
      }
    }
    out.budgets[i] = arg;
    width = std::max(width, arg);
  }
  out.width = width;
  step_objective(c, cost, out.budgets, out.modeled_s, out.makespan_steps);
  return out;
}

bool lookahead_per_row(const Curves& c, const Cost& cost, double spread, double free_tokens,
                       Allocation& out) {
  const size_t n = c.rows, w = c.width;
  if (n == 0) {
    out = Allocation();
    return true;
  }
  // token_values: each row's accepted token is worth (critical_i c_base + per_row_i) / (1 + got_i).
  const Allocation future = best_per_row(c, cost);
  std::vector<double> got(n), steps(n), weight(n), value(n);
  double smax = -kInf;
  for (size_t i = 0; i < n; ++i) {
    const int64_t b = std::min<int64_t>(future.budgets[i], c.m[i]);
    got[i] = c.acc[i * w + size_t(b)];
    steps[i] = c.remaining[i] / (1.0 + got[i]);
    smax = std::max(smax, steps[i]);
  }
  const double n_star = std::max(smax, 1e-9);
  const double temp = std::max(spread, 1e-9) * n_star;
  for (size_t i = 0; i < n; ++i) weight[i] = std::exp((steps[i] - n_star) / temp);
  const double total = pairwise_sum(weight.data(), n);
  for (size_t i = 0; i < n; ++i) {
    const double critical = weight[i] / total;
    const double tokens = 1.0 + double(future.budgets[i]);
    const double per_row = cost.c_tok * tokens + cost.c_kv * c.kv[i];
    value[i] = (critical * cost.c_base + per_row) / (1.0 + got[i]);
  }
  // _fill_nodes: node b of row i gains value_i * (E_i(b) - E_i(b-1)), made non-increasing
  // along the row (-inf past m_i); _take_best keeps the best k of them.
  Allocation res;
  res.budgets.assign(n, 0);
  res.baseline_s = future.baseline_s;
  res.makespan_steps = future.makespan_steps;
  double best_gain = 0.0;
  if (w > 1) {
    // Past m_i a node gains value_i * -inf: never taken while value_i > 0; numpy ranks
    // every node (a NaN, or +inf gains) otherwise, and so does the caller here.
    if (!(cost.c_tok >= 0.0)) return false;
    for (size_t i = 0; i < n; ++i)
      if (!(value[i] > 0.0)) return false;
    // Only gains above FREE_TOKEN_SHARE * c_tok can be taken (k <= their count, and c_tok
    // itself is not below that floor), so the selection works on those alone, in flat order.
    const double floor_gain = kFreeTokenShare * cost.c_tok;
    std::vector<uint32_t> row;  // the row of each candidate node, row-major (flat) order
    std::vector<double> flat;   // its gain
    for (size_t i = 0; i < n; ++i) {
      double run = kInf;
      const double* acc = c.acc + i * w;
      for (size_t b = 1; b <= size_t(c.m[i]); ++b) {
        const double d = acc[b] - acc[b - 1];
        if (std::isnan(d)) return false;
        run = std::min(run, d);  // np.minimum.accumulate
        const double g = value[i] * run;
        if (std::isnan(g)) return false;
        if (g > floor_gain) {
          row.push_back(uint32_t(i));
          flat.push_back(g);
        }
      }
    }
    const size_t positive = flat.size();
    size_t above_c = 0;
    for (double g : flat) above_c += g > cost.c_tok;
    // int(free) (free >= 0; beyond any count it is every positive gain)
    const size_t k_free = free_tokens >= double(positive) ? positive : size_t(free_tokens);
    const size_t k_paid = above_c > k_free ? above_c - k_free : 0;
    const size_t k = k_free + k_paid;
    if (k > 0) {
      std::vector<double> part(flat);
      std::nth_element(part.begin(), part.end() - ptrdiff_t(k), part.end());
      const double kth = *(part.end() - ptrdiff_t(k));  // the k-th largest gain
      std::vector<double> taken;
      taken.reserve(k);
      size_t above = 0;
      for (double g : flat) above += g > kth;
      size_t ties = k - above;  // equal to kth: the first ones (row-major) are taken
      for (size_t q = 0; q < positive; ++q) {
        const double g = flat[q];
        if (g > kth || (g == kth && ties > 0)) {
          if (!(g > kth)) --ties;
          ++res.budgets[row[q]];
          taken.push_back(g);
        }
      }
      // descending (equal gains are equal doubles: their order does not change the sum)
      std::vector<uint32_t> order;
      if (radix_order(taken.data(), taken.size(), order)) {
        std::vector<double> desc(taken.size());
        for (size_t q = 0; q < taken.size(); ++q) desc[q] = taken[order[taken.size() - 1 - q]];
        taken.swap(desc);
      } else {
        std::sort(taken.begin(), taken.end(), [](double a, double b) { return a > b; });
      }
      best_gain = pairwise_sum(taken.data(), taken.size()) - cost.c_tok * double(k_paid);
    }
  }
  int32_t width = 0;
  for (int32_t b : res.budgets) width = std::max(width, b);
  res.width = width;
  res.modeled_s = future.baseline_s - best_gain;
  out = std::move(res);
  return true;
}

void online_curves(const OnlineInputs& in, OnlineCurves& out) {
  const size_t n = in.rows;
  int64_t top = 0;
  for (size_t i = 0; i < n; ++i) top = std::max(top, in.m[i]);
  const size_t w = size_t(top) + 1, nb = w - 1;
  out.width = w;
  out.base.assign(n * w, 0.0);
  out.acc.assign(n * w, 0.0);
  out.bins.assign(n * nb, 0);
  for (size_t i = 0; i < n; ++i) {
    const int64_t a = in.offsets[i];
    const size_t len = size_t(in.offsets[i + 1] - a);
    const size_t mi = size_t(in.m[i]);
    double* base = out.base.data() + i * w;
    double* acc = out.acc.data() + i * w;
    int64_t* bins = out.bins.data() + i * nb;
    // base = np.cumsum(probs): column 0 is 0, columns past m_i add zeros
    for (size_t b = 1; b < w; ++b) base[b] = base[b - 1] + (b <= mi ? in.probs[size_t(a) + b - 1] : 0.0);
    // node_bins: the node's depth bin where the row has a node (first min(len, w - 1))
    const size_t k = std::min(len, nb);
    for (size_t r = 0; r < nb; ++r)
      bins[r] = r < k ? in.depth_bin[std::min<int64_t>(in.depths[size_t(a) + r], in.max_budget)] : in.rank_bin[r];
    // ratios: table[state, match, min(bin, B - 1)]; nodes = diff(base) * shape * relative;
    // acc = [0, cumsum(nodes)], then np.minimum(acc, b)
    const double* cell = in.table + (size_t(in.states[i]) * in.n_match + size_t(in.match[i])) * in.n_bins;
    const double rel = in.relative[i];
    double run = 0.0;
    for (size_t r = 0; r < nb; ++r) {
      const int64_t bin = std::min<int64_t>(bins[r], int64_t(in.n_bins) - 1);
      const double node = ((base[r + 1] - base[r]) * cell[bin]) * rel;
      run = r == 0 ? node : run + node;
      acc[r + 1] = run;
    }
    for (size_t b = 0; b < w; ++b) {  // np.minimum: a NaN wins
      const double x = acc[b], y = double(b);
      acc[b] = (std::isnan(x) || x <= y) ? x : y;
    }
  }
}

void online_add(const OnlineOutcomes& in, int64_t* new_states) {
  const size_t n = in.rows, nb = in.n_bins, w = in.width;
  const size_t size = in.n_states * in.n_match * nb;
  std::vector<double> hits(size, 0.0), expect(size, 0.0), row(nb);
  for (size_t i = 0; i < n; ++i) {
    const size_t p = size_t(in.pos[i]);
    const int64_t b = in.budget[i];
    const int64_t a = std::min<int64_t>(std::max<int64_t>(in.generated[i] - in.pend_generated[p] - 1, 0), b);
    int64_t lg = 0;  // ceil(log2(a + 1)), a + 1 >= 1
    while ((int64_t(1) << lg) < a + 1) ++lg;
    new_states[i] = 1 + std::min<int64_t>(lg, 5) + (a == b ? 6 : 0);
    std::fill(row.begin(), row.end(), 0.0);
    const double* nodes = in.pend_nodes + p * w;
    const int64_t* bins = in.pend_bins + p * w;
    for (size_t j = 0; j < w; ++j) row[size_t(bins[j])] += int64_t(j) < b ? nodes[j] : 0.0;
    const size_t cell = (size_t(in.states[i]) * in.n_match + size_t(in.pend_match[p])) * nb;
    for (size_t k = 0; k < nb; ++k) {
      const int64_t h = std::min<int64_t>(std::max<int64_t>(a - in.bin_before[k], 0), in.bin_size[k]);
      hits[cell + k] += double(h);
      expect[cell + k] += row[k];
    }
  }
  for (size_t c = 0; c < size; ++c) {
    in.cells[2 * c] += hits[c];
    in.cells[2 * c + 1] += expect[c];
  }
}

void online_table(const double* c, size_t S, size_t M, size_t B, double w, double prior, double* out) {
  auto at = [&](size_t i, size_t j, size_t k, size_t l) { return c[((i * M + j) * B + k) * 2 + l]; };
  auto shrink = [w](double a, double e, double p) { return (w * p + a) / (w + e); };
  double total[2] = {0.0, 0.0};  // c.sum(axis=(0, 1, 2))
  for (size_t i = 0; i < S; ++i)
    for (size_t j = 0; j < M; ++j)
      for (size_t k = 0; k < B; ++k)
        for (size_t l = 0; l < 2; ++l) total[l] += at(i, j, k, l);
  std::vector<double> effect(S, 1.0);
  if (total[0] > 0) {
    const double ratio = total[1] / total[0];
    for (size_t i = 0; i < S; ++i) {  // by_state = c.sum(axis=(1, 2))
      double acc[2] = {0.0, 0.0};
      for (size_t j = 0; j < M; ++j)
        for (size_t k = 0; k < B; ++k)
          for (size_t l = 0; l < 2; ++l) acc[l] += at(i, j, k, l);
      effect[i] = (w + acc[0] * ratio) / (w + acc[1]);
    }
  }
  std::vector<double> r_match(M);
  for (size_t j = 0; j < M; ++j) {  // by_match = c.sum(axis=(0, 2))
    double acc[2] = {0.0, 0.0};
    for (size_t i = 0; i < S; ++i)
      for (size_t k = 0; k < B; ++k)
        for (size_t l = 0; l < 2; ++l) acc[l] += at(i, j, k, l);
    r_match[j] = shrink(acc[0], acc[1], prior);
  }
  for (size_t i = 0; i < S; ++i)
    for (size_t j = 0; j < M; ++j) {
      double acc[2] = {0.0, 0.0};  // by_cell = c.sum(axis=2)
      for (size_t k = 0; k < B; ++k)
        for (size_t l = 0; l < 2; ++l) acc[l] += at(i, j, k, l);
      double below = shrink(acc[0], acc[1], effect[i] * r_match[j]);  // r_sm
      for (size_t k = 0; k < B; ++k)
        below = out[(i * M + j) * B + k] = shrink(at(i, j, k, 0), at(i, j, k, 1), below);
    }
}

size_t online_update(const OnlineOutcomes& in, double decay, const int64_t* at, const int64_t* pend_budget,
                     size_t planned, size_t rows, int64_t* new_states) {
  const size_t cells = in.n_states * in.n_match * in.n_bins * 2;
  if (decay < 1.0)
    for (size_t c = 0; c < cells; ++c) in.cells[c] *= decay;  // self._cells *= self._decay
  // The rows online_add would get (pending_rows: planned with a budget > 0), in order.
  std::vector<int64_t> pos, budget, states, generated;
  std::vector<size_t> which;
  for (size_t i = 0; i < rows; ++i) {
    new_states[i] = in.states[i];
    const int64_t p = at ? at[i] : int64_t(i);
    if (p < 0 || size_t(p) >= planned || pend_budget[p] <= 0) continue;
    which.push_back(i);
    pos.push_back(p);
    budget.push_back(pend_budget[p]);
    states.push_back(in.states[i]);
    generated.push_back(in.generated[i]);
  }
  if (which.empty()) return 0;
  OnlineOutcomes sub = in;
  sub.generated = generated.data();
  sub.pos = pos.data();
  sub.budget = budget.data();
  sub.states = states.data();
  sub.rows = which.size();
  std::vector<int64_t> out(which.size());
  online_add(sub, out.data());
  for (size_t k = 0; k < which.size(); ++k) new_states[which[k]] = out[k];
  return which.size();
}

void length_remaining(const LengthGroups& groups, const double* g, const double* cap, const int64_t* c0,
                      size_t rows, double tail_factor, double* remaining, int64_t* cls) {
  for (size_t i = 0; i < rows; ++i) {
    const double gi = g[i];
    double rem = tail_factor * gi;
    int64_t ci = 2;  // LONG
    int tries[2], n_tries = 0;
    if (c0[i] >= 0 && c0[i] < 3 && groups.present[c0[i]]) tries[n_tries++] = int(c0[i]);
    if (groups.present[3]) tries[n_tries++] = 3;
    for (int t = 0; t < n_tries; ++t) {
      double counts[3], sums[3];
      bool found = false;
      for (int c = 0; c < 3; ++c) {
        const int b = tries[t] * 3 + c;
        const double* lo = groups.sorted + groups.sorted_off[b];
        const double* hi = groups.sorted + groups.sorted_off[b + 1];
        const int64_t at = std::upper_bound(lo, hi, gi) - lo;  // np.searchsorted(side="right")
        counts[c] = double((hi - lo) - at);
        sums[c] = groups.suffix[groups.suffix_off[b] + at];
        found = found || counts[c] > 0;
      }
      if (!found) continue;
      ci = pick_length_class(counts, sums, gi, rem);
      break;
    }
    remaining[i] = std::min(std::max(rem, 1.0), cap[i]);  // np.clip(remaining, 1.0, cap)
    cls[i] = ci;
  }
}

}  // namespace das::alloc
