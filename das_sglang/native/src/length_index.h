// Incremental length index: the length predictor's query structure (core/length_predictor.py)
// kept up to date finish by finish, never rebuilt on a finish.
//
// What a query reads (the reference is LengthPredictor._build_index + length_remaining, numpy):
// the class thresholds (fixed, or the linear-interpolated quantiles of every length in the
// window, as np.quantile computes them), each problem's initial class (the class of its own
// median length), and per group -- the problems of one initial class, or all problems -- the
// count and sum of the lengths of each class longer than g. Here every group keeps a Fenwick
// tree over length values (count and sum per value), so "lengths of class c longer than g" is
// two prefix queries with the class bounds applied at query time: a finish is one insertion
// into its problem's sorted lengths and O(log V) tree updates. Thresholds and initial classes
// are brought up to date lazily, at the next query after a change: O(problems) to re-check
// each problem's class, and a problem whose class changed moves its lengths between group
// trees. The answers are the reference's bit for bit: lengths are integers, so every count and
// sum is an exact integer (as the reference's float64 suffix sums are, below 2**53).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "allocation.h"

namespace das::lengths {

// Counts and sums of integer values in [0, size), size a power of two (a count and its sum
// side by side: one cache line per tree level).
struct Fenwick {
  struct Cell {
    int64_t c = 0, s = 0;
  };
  std::vector<Cell> cell;  // 1-based
  int64_t size = 0;

  void reset(int64_t n) {  // (keeps the vector's memory: no fresh pages to fault in)
    size = n;
    cell.assign(size_t(n) + 1, Cell{});
  }
  // the tree of a histogram (hist[v]: how many values v), in O(size)
  void assign(const std::vector<int64_t>& hist) {
    cell.resize(size_t(size) + 1);
    cell[0] = Cell{};
    for (int64_t v = 0; v < size; ++v) cell[v + 1] = Cell{hist[v], hist[v] * v};
    for (int64_t i = 1; i <= size; ++i) {
      const int64_t j = i + (i & -i);
      if (j <= size) {
        cell[j].c += cell[i].c;
        cell[j].s += cell[i].s;
      }
    }
  }
  void add(int64_t v, int64_t dc) {
    const int64_t ds = dc * v;
    for (int64_t i = v + 1; i <= size; i += i & -i) {
      cell[i].c += dc;
      cell[i].s += ds;
    }
  }
  // count and sum of the values <= v
  void prefix(int64_t v, int64_t& c, int64_t& s) const {
    c = s = 0;
    if (v < 0) return;
    for (int64_t i = std::min(v + 1, size); i > 0; i -= i & -i) {
      c += cell[i].c;
      s += cell[i].s;
    }
  }
  int64_t total() const {
    int64_t c, s;
    prefix(size - 1, c, s);
    return c;
  }
  // the k-th smallest value (0-based); k < total()
  int64_t kth(int64_t k) const {
    int64_t pos = 0;
    for (int64_t step = size; step > 0; step >>= 1) {
      if (pos + step <= size && cell[pos + step].c <= k) {
        pos += step;
        k -= cell[pos].c;
      }
    }
    return pos;  // tree index pos + 1 holds value pos
  }
};

class LengthIndex {
 public:
  static constexpr int64_t kMaxLength = int64_t(1) << 21;  // values the trees cover (128 MiB of trees at most)

  // fixed: thresholds (a, b) in tokens; else the quantiles (a, b) of the window's lengths
  LengthIndex(bool fixed, double a, double b) : fixed_(fixed), a_(a), b_(b) { reset(1024); }

  size_t num_lengths() const { return n_; }
  size_t num_problems() const { return lens_.size(); }

  void add(int64_t p, int64_t len) {
    if (p < 0) throw std::invalid_argument("invalid problem index " + std::to_string(p) + ": must be >= 0");
    if (len < 0 || len >= kMaxLength)
      throw std::invalid_argument("invalid length " + std::to_string(len) + ": must be in [0, " +
                                  std::to_string(kMaxLength) + ")");
    if (size_t(p) >= lens_.size()) {
      lens_.resize(size_t(p) + 1);
      group_.resize(size_t(p) + 1, -1);
      median_.resize(size_t(p) + 1, kNoMedian);
    }
    if (len >= all_.size) grow(len);
    std::vector<int64_t>& v = lens_[p];
    v.insert(std::upper_bound(v.begin(), v.end(), len), len);
    median_[p] = median_of(v);
    all_.add(len, 1);
    if (group_[p] >= 0) grp_[group_[p]].add(len, 1);
    ++n_;
    dirty_ = true;
  }

  // Lengths that left (a window step, an eviction), each one a (problem, length) present
  // now: removed from the problem's sorted lengths and the trees, O(log V) each. A pair not
  // present throws, the removals before it undone: nothing changes.
  void remove(const int64_t* problems, const int64_t* lengths, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      const int64_t p = problems[i], x = lengths[i];
      std::vector<int64_t>* v = (p >= 0 && size_t(p) < lens_.size()) ? &lens_[p] : nullptr;
      const auto at = v ? std::lower_bound(v->begin(), v->end(), x) : std::vector<int64_t>::iterator();
      if (!v || at == v->end() || *at != x) {
        for (size_t k = i; k-- > 0;) add(problems[k], lengths[k]);  // (undo: they were present)
        throw std::invalid_argument(v ? "length " + std::to_string(x) + " of problem index " + std::to_string(p) +
                                            " is not present"
                                      : "invalid problem index " + std::to_string(p) + " of " +
                                            std::to_string(lens_.size()));
      }
      v->erase(at);
      median_[p] = median_of(*v);
      all_.add(x, -1);
      if (group_[p] >= 0) grp_[group_[p]].add(x, -1);
      --n_;
      dirty_ = true;
    }
  }

  // The problems renumbered: problem i becomes remap[i] (-1: gone, it must have no lengths
  // left), n_problems in all.
  void renumber(const int64_t* remap, size_t n, size_t n_problems) {
    if (n != lens_.size())
      throw std::invalid_argument("remap has " + std::to_string(n) + " entries for " +
                                  std::to_string(lens_.size()) + " problems");
    for (size_t i = 0; i < n; ++i) {
      if (remap[i] < -1 || remap[i] >= int64_t(n_problems) || (remap[i] < 0 && !lens_[i].empty()))
        throw std::invalid_argument("invalid remap[" + std::to_string(i) + "]=" + std::to_string(remap[i]) +
                                    " (" + std::to_string(lens_[i].size()) + " lengths, " +
                                    std::to_string(n_problems) + " problems)");
    }
    std::vector<std::vector<int64_t>> lens(n_problems);
    std::vector<int8_t> group(n_problems, -1);
    std::vector<double> median(n_problems, kNoMedian);
    for (size_t i = 0; i < n; ++i) {
      if (remap[i] < 0) continue;
      lens[remap[i]].swap(lens_[i]);
      group[remap[i]] = group_[i];
      median[remap[i]] = median_[i];
    }
    lens_.swap(lens);
    group_.swap(group);
    median_.swap(median);
  }

  // Everything from columns (problem index, length), n_problems problems (a restore).
  void build(const int64_t* problems, const int64_t* lengths, size_t n, size_t n_problems) {
    int64_t top = 0;
    for (size_t i = 0; i < n; ++i) {
      if (problems[i] < 0 || size_t(problems[i]) >= n_problems)
        throw std::invalid_argument("invalid problem index " + std::to_string(problems[i]) + " of " +
                                    std::to_string(n_problems));
      if (lengths[i] < 0 || lengths[i] >= kMaxLength)
        throw std::invalid_argument("invalid length " + std::to_string(lengths[i]) + ": must be in [0, " +
                                    std::to_string(kMaxLength) + ")");
      top = std::max(top, lengths[i]);
    }
    lens_.assign(n_problems, {});
    group_.assign(n_problems, -1);
    for (size_t i = 0; i < n; ++i) lens_[problems[i]].push_back(lengths[i]);
    for (auto& v : lens_) std::sort(v.begin(), v.end());
    median_.resize(n_problems);
    for (size_t p = 0; p < n_problems; ++p) median_[p] = median_of(lens_[p]);
    int64_t size = 1024;
    while (size <= top) size *= 2;
    n_ = n;
    rebuild_trees(size);
  }

  // false while there are no lengths (then no thresholds either)
  bool thresholds(double out[2]) {
    refresh();
    if (!n_) return false;
    out[0] = thr_[0];
    out[1] = thr_[1];
    return true;
  }

  int64_t initial_class(int64_t p) {
    refresh();
    return (p >= 0 && size_t(p) < group_.size()) ? group_[p] : -1;
  }

  // _LengthQueries.predict_many's group queries for rows of problem indices p (-1: a
  // problem without lengths); n_ > 0. remaining, class, initial class per row.
  void query(const double* g, const double* cap, const int64_t* p, size_t rows, double tail_factor,
             double* remaining, int64_t* cls, int64_t* c0) {
    refresh();
    const int64_t t0 = floor_bound(thr_[0]), t1 = floor_bound(thr_[1]);
    const int64_t lo_of[3] = {-1, t0, t1}, hi_of[3] = {t0, t1, all_.size - 1};
    bool present[4];
    for (int k = 0; k < 3; ++k) present[k] = grp_[k].total() > 0;
    present[3] = n_ > 0;
    for (size_t i = 0; i < rows; ++i) {
      const double gi = g[i];
      const int64_t c0i = (p[i] >= 0 && size_t(p[i]) < group_.size()) ? group_[p[i]] : -1;
      c0[i] = c0i;
      const int64_t gf = floor_bound(gi);  // lengths > gi <=> lengths > floor(gi)
      double rem = tail_factor * gi;
      int64_t ci = 2;  // LONG
      int tries[2], n_tries = 0;
      if (c0i >= 0 && present[c0i]) tries[n_tries++] = int(c0i);
      if (present[3]) tries[n_tries++] = 3;
      for (int t = 0; t < n_tries; ++t) {
        const Fenwick& f = tries[t] == 3 ? all_ : grp_[tries[t]];
        double counts[3], sums[3];
        bool found = false;
        for (int c = 0; c < 3; ++c) {
          const int64_t lo = std::max(gf, lo_of[c]), hi = hi_of[c];
          int64_t ch = 0, sh = 0, cl = 0, sl = 0;
          if (hi > lo) {
            f.prefix(hi, ch, sh);
            f.prefix(lo, cl, sl);
          }
          counts[c] = double(ch - cl);
          sums[c] = double(sh - sl);
          found = found || counts[c] > 0;
        }
        if (!found) continue;
        ci = das::alloc::pick_length_class(counts, sums, gi, rem);
        break;
      }
      remaining[i] = std::min(std::max(rem, 1.0), cap[i]);  // np.clip(remaining, 1.0, cap)
      cls[i] = ci;
    }
  }

  size_t memory_bytes() const {
    size_t b = 4 * (size_t(all_.size) + 1) * sizeof(Fenwick::Cell) + group_.size() +
               median_.capacity() * sizeof(double);
    for (const auto& h : hist_) b += h.capacity() * sizeof(int64_t);
    for (const auto& v : lens_) b += sizeof(v) + v.capacity() * sizeof(int64_t);
    return b;
  }

 private:
  void reset(int64_t size) {
    all_.reset(size);
    for (auto& f : grp_) f.reset(size);
    std::fill(group_.begin(), group_.end(), int8_t(-1));
  }

  // the trees re-made over a larger value range
  void grow(int64_t len) {
    int64_t size = all_.size;
    while (size <= len) size *= 2;
    rebuild_trees(size);
  }

  // Every tree from the problems' lengths in O(lengths + size) (histograms, not one tree
  // update per length), thresholds and groups up to date: a window step's rebuild at RL
  // scale (~40k lengths) is then well under a millisecond.
  void rebuild_trees(int64_t size) {
    for (Fenwick* f : {&all_, &grp_[0], &grp_[1], &grp_[2]}) f->size = size;
    for (auto& h : hist_) h.assign(size_t(size), 0);
    std::vector<int64_t>& all = hist_[3];
    for (const auto& v : lens_)
      for (int64_t x : v) ++all[x];
    all_.assign(all);
    dirty_ = false;
    if (n_) update_thresholds();
    for (size_t p = 0; p < lens_.size(); ++p) {
      group_[p] = n_ ? median_class(p) : int8_t(-1);
      if (group_[p] >= 0)
        for (int64_t x : lens_[p]) ++hist_[group_[p]][x];
    }
    for (int k = 0; k < 3; ++k) grp_[k].assign(hist_[k]);
  }

  void update_thresholds() {
    if (fixed_) {
      thr_[0] = a_;
      thr_[1] = b_;
    } else {
      thr_[0] = quantile(a_);
      thr_[1] = quantile(b_);
    }
  }

  // A problem's median length (kNoMedian: no lengths), kept beside its sorted lengths so
  // that refresh() reads one contiguous array, not each problem's vector: at 2,048 problems
  // the pass after every finish went ~60 -> a few us (cache misses on 2,048 vectors).
  static constexpr double kNoMedian = -1.0;

  static double median_of(const std::vector<int64_t>& v) {
    if (v.empty()) return kNoMedian;
    const size_t c = v.size();
    return (double(v[(c - 1) / 2]) + double(v[c / 2])) / 2.0;
  }

  int8_t median_class(size_t p) const {
    const double median = median_[p];
    return median == kNoMedian ? int8_t(-1) : int8_t(classify(median, thr_));
  }

  // floor(x) clamped to [-1, size]: the bound of "values <= x" for integer values
  int64_t floor_bound(double x) const {
    if (!(x >= 0.0)) return -1;  // (also NaN)
    if (x >= double(all_.size)) return all_.size;
    return int64_t(std::floor(x));
  }

  // np.quantile(lengths, q) (method "linear"): virtual index (n - 1) * q, the two order
  // statistics around it, numpy's _lerp
  double quantile(double q) const {
    const int64_t n = int64_t(n_);
    const double v = double(n - 1) * q;
    double prev = std::floor(v);
    int64_t ip, in;
    if (v >= double(n - 1)) {
      ip = in = n - 1;
      prev = -1.0;
    } else if (v < 0.0) {
      ip = in = 0;
    } else {
      ip = int64_t(prev);
      in = ip + 1;
    }
    const double t = v - prev;
    const double a = double(all_.kth(ip)), b = double(all_.kth(in));
    const double diff = b - a;
    return t >= 0.5 ? b - diff * (1.0 - t) : a + diff * t;
  }

  static int64_t classify(double x, const double thr[2]) {  // np.searchsorted(thr, x, "left")
    return int64_t(thr[0] < x) + int64_t(thr[1] < x);
  }

  void refresh() {
    if (!dirty_) return;
    dirty_ = false;
    if (!n_) return;
    update_thresholds();
    for (size_t p = 0; p < lens_.size(); ++p) {
      const int8_t want = median_class(p);
      if (want == group_[p]) continue;
      const std::vector<int64_t>& v = lens_[p];
      if (group_[p] >= 0)
        for (int64_t x : v) grp_[group_[p]].add(x, -1);
      if (want >= 0)
        for (int64_t x : v) grp_[want].add(x, 1);
      group_[p] = want;
    }
  }

  bool fixed_;
  double a_, b_;
  double thr_[2] = {0.0, 0.0};
  std::vector<std::vector<int64_t>> lens_;  // per problem, sorted
  std::vector<int8_t> group_;               // the group tree a problem's lengths are in (-1: none)
  std::vector<double> median_;              // per problem, median_of(lens_[p])
  Fenwick all_, grp_[3];
  std::vector<int64_t> hist_[4];  // rebuild_trees' histograms (per group, all), kept allocated
  size_t n_ = 0;
  bool dirty_ = true;
};

}  // namespace das::lengths
