// Thin nanobind bindings: array conversion and argument checks only. Errors that name a
// bad value come out as ValueError (std::invalid_argument / nb::value_error).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <iterator>
#include <set>
#include <functional>
#include <memory>
#include <cerrno>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <unordered_map>

#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>

#include "allocation.h"
#include "length_index.h"
#include "suffix_index.h"

namespace nb = nanobind;
using das::Draft;
using das::DraftParams;
using das::SuffixIndex;

namespace {

using Tokens = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using I64 = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Bools = nb::ndarray<const bool, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using F64 = nb::ndarray<const double, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

std::string describe(nb::handle h) {
  std::string d = nb::str(h.type().attr("__name__")).c_str();
  if (nb::hasattr(h, "dtype")) d += " dtype=" + std::string(nb::repr(h.attr("dtype")).c_str());
  if (nb::hasattr(h, "shape")) d += " shape=" + std::string(nb::repr(h.attr("shape")).c_str());
  return d;
}

// No implicit conversion: a silent int64 -> int32 copy would hide a caller bug and cost time.
template <typename A>
A as_array(nb::handle h, const char* name, const char* want) {
  A a;
  if (!nb::try_cast(h, a, false))
    throw nb::value_error((std::string("invalid ") + name + ": expected a 1-D contiguous " +
                           want + " numpy array, got " + describe(h))
                              .c_str());
  return a;
}

Tokens tokens_arg(nb::handle h, const char* name) { return as_array<Tokens>(h, name, "int32"); }

// A multi-dimensional array argument (`want` describes it), no implicit conversion either.
template <typename A>
A nd_arg(nb::handle h, const char* name, const char* want) {
  A a;
  if (!nb::try_cast(h, a, false))
    throw nb::value_error((std::string("invalid ") + name + ": expected " + want + ", got " + describe(h)).c_str());
  return a;
}

template <typename T>
nb::ndarray<nb::numpy, T, nb::ndim<1>> to_numpy(const std::vector<T>& v) {
  T* data = new T[v.size() ? v.size() : 1];
  if (!v.empty()) std::memcpy(data, v.data(), v.size() * sizeof(T));
  nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
  return nb::ndarray<nb::numpy, T, nb::ndim<1>>(data, {v.size()}, owner);
}

// The vector itself handed to numpy (moved, not copied): for large per-step results.
template <typename T>
nb::ndarray<nb::numpy, T, nb::ndim<1>> to_numpy_moved(std::vector<T>&& v) {
  auto* owned = new std::vector<T>(std::move(v));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, T, nb::ndim<1>>(owned->data(), {owned->size()}, owner);
}

// A vector of 0/1 bytes handed to numpy as a bool array, not copied.
nb::ndarray<nb::numpy, bool, nb::ndim<1>> to_bool_numpy_moved(std::vector<uint8_t>&& v) {
  auto* owned = new std::vector<uint8_t>(std::move(v));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<std::vector<uint8_t>*>(p); });
  return nb::ndarray<nb::numpy, bool, nb::ndim<1>>(reinterpret_cast<bool*>(owned->data()), {owned->size()}, owner);
}

// A {step: weight} dict as two parallel arrays (what slot_weights reads).
struct StepTable {
  std::vector<int64_t> steps;
  std::vector<double> weights;
  explicit StepTable(nb::dict step_weights) {
    for (auto kv : step_weights) {
      steps.push_back(nb::cast<int64_t>(kv.first));
      weights.push_back(nb::cast<double>(kv.second));
    }
  }
};

DraftParams params(const SuffixIndex& idx, int budget, double min_prob, nb::dict step_weights,
                   bool chain, int max_match_len) {
  if (budget < 0) throw nb::value_error(("invalid budget=" + std::to_string(budget) + ": must be >= 0").c_str());
  DraftParams p;
  p.budget = budget;
  p.min_prob = min_prob;
  p.chain = chain;
  p.max_match_len = max_match_len;
  const StepTable t(step_weights);
  idx.slot_weights(t.steps.data(), t.weights.data(), t.steps.size(), p.slot_weight);
  return p;
}

// mix = None (longest match only) or (alpha, escape, min_match, max_fanout[, recency,
// match_half]): DraftParams (recency and match_half default to 0: off).
void set_mix(DraftParams& p, nb::handle mix) {
  if (mix.is_none()) return;
  const size_t len = nb::isinstance<nb::tuple>(mix) ? nb::len(mix) : 0;
  if (len != 4 && len != 6 && len != 7 && len != 8)
    throw nb::value_error(("invalid mix: expected None or (alpha, escape, min_match, max_fanout"
                           "[, recency, match_half[, min_ratio[, skip_unseen]]]), got " + describe(mix)).c_str());
  nb::tuple t = nb::borrow<nb::tuple>(mix);
  p.mixture = true;
  p.mix_alpha = nb::cast<double>(t[0]);
  p.mix_escape = nb::cast<double>(t[1]);
  p.mix_min_match = nb::cast<int>(t[2]);
  p.mix_max_fanout = nb::cast<int>(t[3]);
  if (nb::len(mix) >= 6) {
    p.mix_recency = nb::cast<double>(t[4]);
    p.mix_match_half = nb::cast<double>(t[5]);
  }
  if (len == 8) {
    p.skip_unseen = nb::cast<double>(t[7]);  // (a bool reads as 0 / 1)
    if (!(p.skip_unseen >= 0.0 && p.skip_unseen <= 1.0))
      throw nb::value_error(("invalid mix=(..., skip_unseen=" + std::to_string(p.skip_unseen) +
                             "): must be in [0, 1] (0: off; else the stand-in tree's prob scale)").c_str());
  }
  if (len >= 7) {
    p.mix_min_ratio = nb::cast<double>(t[6]);
    if (!(p.mix_min_ratio >= 0.0 && p.mix_min_ratio < 1.0))
      throw nb::value_error(("invalid mix=(..., min_ratio=" + std::to_string(p.mix_min_ratio) +
                             "): must be in [0, 1)").c_str());
  }
  if (!(p.mix_escape >= 0.0) || !(p.mix_alpha >= 0.0 && p.mix_alpha <= 16.0))
    throw nb::value_error(("invalid mix=(alpha=" + std::to_string(p.mix_alpha) + ", escape=" +
                           std::to_string(p.mix_escape) + ", ...): need 0 <= alpha <= 16, escape >= 0").c_str());
  if (!(p.mix_recency >= 0.0) || !(p.mix_match_half >= 0.0))
    throw nb::value_error(("invalid mix=(..., recency=" + std::to_string(p.mix_recency) + ", match_half=" +
                           std::to_string(p.mix_match_half) + "): both must be >= 0").c_str());
  // (made once per alpha, not per call: 65 pow calls were ~2 us, a one-row call's budget;
  // set_mix runs with the GIL held, so the cache needs no lock)
  static double cached_alpha = -1.0;
  static double cached_pow[DraftParams::kMixPow];
  if (p.mix_alpha != cached_alpha) {
    for (int m = 0; m < DraftParams::kMixPow; ++m) cached_pow[m] = std::pow(double(m), p.mix_alpha);
    cached_alpha = p.mix_alpha;
  }
  std::memcpy(p.mix_pow, cached_pow, sizeof(cached_pow));
  p.mix_pow_set = true;
}

nb::tuple draft_tuple(const Draft& d) {
  return nb::make_tuple(to_numpy(d.tokens), to_numpy(d.parents), to_numpy(d.probs), d.match_len);
}

// Rows (index, seq_id, budget) drafted into flat arrays, row order kept. With threads > 1
// the rows are cut into contiguous chunks, one per thread (each drafts into its own
// buffers, thread_local scratch inside the index), then concatenated in chunk order: the
// same arrays as the sequential loop. Runs without the GIL; indices are only read.
struct FlatDrafts {
  std::vector<int32_t> tokens, parents, depths;
  std::vector<double> probs;
  std::vector<int64_t> offsets;  // n + 1
  std::vector<int32_t> match;
};

// Rows of flat drafts cut out (draft_select; the plan made ahead's cut of its trees): output
// row q is input row src[q] (-1: an empty row, match length 0) cut to its first lens[q]
// nodes (at most the row's), with the output's node counts and the widest.
struct SelectedRows {
  FlatDrafts out;
  std::vector<int64_t> lens;
  int64_t width = 0;
};
void select_rows(const int64_t* offsets, const int32_t* tokens, const int32_t* parents, const double* probs,
                 const int32_t* depths, const int32_t* match, const std::vector<int64_t>& src,
                 std::vector<int64_t> lens, SelectedRows& s) {
  const size_t n = src.size();
  FlatDrafts& o = s.out;
  o.offsets.assign(n + 1, 0);
  for (size_t q = 0; q < n; ++q) o.offsets[q + 1] = o.offsets[q] + lens[q];
  const size_t total = size_t(o.offsets[n]);
  o.tokens.resize(total);
  o.parents.resize(total);
  o.depths.resize(total);
  o.probs.resize(total);
  o.match.assign(n, 0);
  s.width = n ? *std::max_element(lens.begin(), lens.end()) : 0;
  for (size_t q = 0; q < n; ++q) {
    if (src[q] < 0) continue;
    o.match[q] = match[size_t(src[q])];
    const size_t a = size_t(offsets[size_t(src[q])]), at = size_t(o.offsets[q]), k = size_t(lens[q]);
    std::memcpy(o.tokens.data() + at, tokens + a, k * sizeof(int32_t));
    std::memcpy(o.parents.data() + at, parents + a, k * sizeof(int32_t));
    std::memcpy(o.depths.data() + at, depths + a, k * sizeof(int32_t));
    std::memcpy(o.probs.data() + at, probs + a, k * sizeof(double));
  }
  s.lens = std::move(lens);
}

// (tokens, parents, probs, depths, offsets, match, lens, width) of selected rows (handed over)
nb::tuple selected_tuple(SelectedRows& s) {
  FlatDrafts& o = s.out;
  return nb::make_tuple(to_numpy_moved(std::move(o.tokens)), to_numpy_moved(std::move(o.parents)),
                        to_numpy_moved(std::move(o.probs)), to_numpy_moved(std::move(o.depths)),
                        to_numpy_moved(std::move(o.offsets)), to_numpy_moved(std::move(o.match)),
                        to_numpy_moved(std::move(s.lens)), s.width);
}

template <class F>
void on_threads(size_t n_threads, F run) {
  if (n_threads <= 1) {
    run(size_t(0), size_t(1));
    return;
  }
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(n_threads);
  for (size_t t = 1; t < n_threads; ++t)
    pool.emplace_back([&, t] {
      try { run(t, n_threads); } catch (...) { errors[t] = std::current_exception(); }
    });
  try { run(0, n_threads); } catch (...) { errors[0] = std::current_exception(); }
  for (auto& th : pool) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// Rows [r0, r1) drafted into `buf` (appended, row order), each row's length into
// lens[r] and its match length into match[r]. Reads the indices only.
void draft_range(const std::vector<const SuffixIndex*>& idx, const int64_t* seq_ids,
                 const int32_t* budgets, const int64_t* steps, const double* weights,
                 size_t n_steps, const DraftParams& base, bool want_depths, size_t r0, size_t r1,
                 FlatDrafts& buf, int64_t* lens, int32_t* match) {
  DraftParams p = base;
  Draft one;
  const SuffixIndex* last = nullptr;
  // Cache hints a few rows ahead (results do not depend on them): the storage and cursor
  // ring kAhead1 rows on, the cursors' nodes kAhead2 rows on.
  // The same stages for the row's sequence in the shared index, when the drafts mix it
  // in (it is large: its misses are most of a row's fixed cost).
  constexpr size_t kAhead1 = 16, kAhead2 = 8;
  const SuffixIndex* sh = p.mixed_shared(nullptr);  // (a row of the shared index itself: stage1)
  uint32_t ring[kAhead1], ring2[kAhead1];
  auto stage1 = [&](size_t r) {
    ring[r % kAhead1] = idx[r]->prefetch_sequence(seq_ids[r]);
    ring2[r % kAhead1] = sh != nullptr && sh != idx[r] ? sh->prefetch_sequence(seq_ids[r]) : das::kNil;
  };
  auto stage2 = [&](size_t r) {
    idx[r]->prefetch_cursor_nodes(ring[r % kAhead1], p.max_match_len);
    if (sh != nullptr) sh->prefetch_cursor_nodes(ring2[r % kAhead1], p.max_match_len);
  };
  for (size_t r = r0; r < std::min(r1, r0 + kAhead1); ++r) stage1(r);
  for (size_t r = r0; r < std::min(r1, r0 + kAhead2); ++r) stage2(r);
  // Stage 3, a group of kGroup rows at a time: walk the children lists the group's
  // drafts scan first, all lists interleaved (their cursor nodes were prefetched
  // kAhead2 rows ahead).
  constexpr size_t kGroup = 4;
  std::vector<SuffixIndex::ListHead> heads;
  for (size_t r = r0; r < r1; ++r) {
    if ((r - r0) % kGroup == 0) {
      for (size_t g = r; g < std::min(r1, r + kGroup); ++g) {
        idx[g]->draft_lists(ring[g % kAhead1], p, heads);
        if (sh != nullptr) sh->draft_lists(ring2[g % kAhead1], p, heads, true);
      }
      SuffixIndex::walk_lists(heads);
    }
    if (r + kAhead2 < r1) stage2(r + kAhead2);
    if (r + kAhead1 < r1) stage1(r + kAhead1);
    p.budget = budgets[r];
    if (idx[r] != last) {  // slot weights depend on the index only
      idx[r]->slot_weights(steps, weights, n_steps, p.slot_weight);
      last = idx[r];
    }
    idx[r]->draft_for_sequence(seq_ids[r], p, one);
    const size_t at = buf.tokens.size();
    buf.tokens.insert(buf.tokens.end(), one.tokens.begin(), one.tokens.end());
    buf.parents.insert(buf.parents.end(), one.parents.begin(), one.parents.end());
    buf.probs.insert(buf.probs.end(), one.probs.begin(), one.probs.end());
    if (want_depths) {
      for (size_t i = 0; i < one.parents.size(); ++i) {
        const int32_t par = one.parents[i];
        buf.depths.push_back(par < 0 ? 1 : buf.depths[at + size_t(par)] + 1);
      }
    }
    lens[r] = int64_t(one.tokens.size());
    match[r] = one.match_len;
  }
}

// Per-chunk buffers appended to `out` in chunk order; out.offsets[r + 1] holds row r's
// length until the final prefix sum.
void concat_chunks(std::vector<FlatDrafts>& bufs, FlatDrafts& out) {
  out.tokens.clear(); out.parents.clear(); out.probs.clear(); out.depths.clear();
  size_t nt = 0, nd = 0;
  for (auto& b : bufs) { nt += b.tokens.size(); nd += b.depths.size(); }
  out.tokens.reserve(nt); out.parents.reserve(nt); out.probs.reserve(nt); out.depths.reserve(nd);
  for (auto& b : bufs) {
    out.tokens.insert(out.tokens.end(), b.tokens.begin(), b.tokens.end());
    out.parents.insert(out.parents.end(), b.parents.begin(), b.parents.end());
    out.probs.insert(out.probs.end(), b.probs.begin(), b.probs.end());
    out.depths.insert(out.depths.end(), b.depths.begin(), b.depths.end());
  }
}

// The order rows are drafted in: grouped by index (rows of one index together, in row
// order within it), when the batch has enough rows for it to matter and its rows are not
// grouped already. A decode batch interleaves the requests of many problems; GRPO siblings
// read largely the same nodes of their problem's index, so drafted one after another they
// find them in cache (a cold 512-row draft over ~30 indexes: 4.7 vs 6.4 ms p50, the caches
// flushed before each, bench state of bench_host_path), and the slot weights are set once
// per index. Drafting only reads: the trees do not depend on the order. Empty = row order.
std::vector<uint32_t> index_order(const std::vector<const SuffixIndex*>& idx) {
  constexpr size_t kMinRows = 16;
  const size_t n = idx.size();
  std::vector<uint32_t> order;
  if (n < kMinRows) return order;
  size_t runs = 1;
  for (size_t r = 1; r < n; ++r) runs += idx[r] != idx[r - 1];
  std::unordered_map<const SuffixIndex*, uint32_t> first;  // index -> its first row
  first.reserve(runs);
  for (size_t r = 0; r < n; ++r) first.emplace(idx[r], uint32_t(r));
  if (first.size() == runs) return order;  // (every index's rows are contiguous already)
  // groups in order of their first row; rows in order within a group (deterministic)
  std::vector<uint32_t> group(n);
  for (size_t r = 0; r < n; ++r) group[r] = first[idx[r]];
  order.resize(n);
  for (size_t r = 0; r < n; ++r) order[r] = uint32_t(r);
  std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return group[a] < group[b]; });
  return order;
}

// A draft's per-row arguments in index_order (order[k] is the k-th row drafted).
struct OrderedRows {
  std::vector<const SuffixIndex*> idx;
  std::vector<int64_t> seq_ids;
  std::vector<int32_t> budgets;
  OrderedRows() = default;
  OrderedRows(const std::vector<uint32_t>& order, const std::vector<const SuffixIndex*>& idx_,
              const int64_t* seq_ids_, const int32_t* budgets_)
      : idx(order.size()), seq_ids(order.size()), budgets(order.size()) {
    for (size_t k = 0; k < order.size(); ++k)
      idx[k] = idx_[order[k]], seq_ids[k] = seq_ids_[order[k]], budgets[k] = budgets_[order[k]];
  }
};

// `in` holds rows order[0], order[1], ... (offsets as prefix sums, match per position);
// `out` gets them in row order.
void unpermute(const FlatDrafts& in, const std::vector<uint32_t>& order, bool want_depths, FlatDrafts& out) {
  const size_t n = order.size();
  out.offsets.assign(n + 1, 0);
  out.match.assign(n, 0);
  for (size_t k = 0; k < n; ++k) {
    out.offsets[order[k] + 1] = in.offsets[k + 1] - in.offsets[k];
    out.match[order[k]] = in.match[k];
  }
  for (size_t r = 0; r < n; ++r) out.offsets[r + 1] += out.offsets[r];
  const size_t total = size_t(out.offsets[n]);
  out.tokens.resize(total);
  out.parents.resize(total);
  out.probs.resize(total);
  out.depths.resize(want_depths ? total : 0);
  for (size_t k = 0; k < n; ++k) {
    const size_t a = size_t(in.offsets[k]), len = size_t(in.offsets[k + 1]) - a, to = size_t(out.offsets[order[k]]);
    if (!len) continue;
    std::memcpy(out.tokens.data() + to, in.tokens.data() + a, len * sizeof(int32_t));
    std::memcpy(out.parents.data() + to, in.parents.data() + a, len * sizeof(int32_t));
    std::memcpy(out.probs.data() + to, in.probs.data() + a, len * sizeof(double));
    if (want_depths) std::memcpy(out.depths.data() + to, in.depths.data() + a, len * sizeof(int32_t));
  }
}

void draft_rows_ordered(const std::vector<const SuffixIndex*>& idx, const int64_t* seq_ids,
                        const int32_t* budgets, const int64_t* steps, const double* weights,
                        size_t n_steps, const DraftParams& base, bool want_depths, size_t threads,
                        FlatDrafts& out);

// Rows drafted in index_order (see there), the result in row order: the same arrays.
void draft_rows_impl(const std::vector<const SuffixIndex*>& idx, const int64_t* seq_ids,
                     const int32_t* budgets, const int64_t* steps, const double* weights,
                     size_t n_steps, const DraftParams& base, bool want_depths, size_t threads,
                     FlatDrafts& out) {
  const std::vector<uint32_t> order = index_order(idx);
  if (order.empty()) {
    draft_rows_ordered(idx, seq_ids, budgets, steps, weights, n_steps, base, want_depths, threads, out);
    return;
  }
  const OrderedRows rows(order, idx, seq_ids, budgets);
  FlatDrafts perm;
  draft_rows_ordered(rows.idx, rows.seq_ids.data(), rows.budgets.data(), steps, weights, n_steps, base,
                     want_depths, threads, perm);
  unpermute(perm, order, want_depths, out);
}

void draft_rows_ordered(const std::vector<const SuffixIndex*>& idx, const int64_t* seq_ids,
                        const int32_t* budgets, const int64_t* steps, const double* weights,
                        size_t n_steps, const DraftParams& base, bool want_depths, size_t threads,
                        FlatDrafts& out) {
  const size_t n = idx.size();
  out.offsets.assign(n + 1, 0);
  out.match.assign(n, 0);
  int64_t* lens = out.offsets.data() + 1;
  threads = std::max<size_t>(1, std::min(threads, n));
  if (threads == 1) {
    draft_range(idx, seq_ids, budgets, steps, weights, n_steps, base, want_depths, 0, n, out, lens,
                out.match.data());
  } else {
    std::vector<FlatDrafts> bufs(threads);
    auto bounds = [&](size_t t) { return n * t / threads; };
    on_threads(threads, [&](size_t t, size_t) {
      draft_range(idx, seq_ids, budgets, steps, weights, n_steps, base, want_depths, bounds(t), bounds(t + 1),
                  bufs[t], lens, out.match.data());
    });
    concat_chunks(bufs, out);
  }
  for (size_t r = 0; r < n; ++r) out.offsets[r + 1] += out.offsets[r];  // lengths -> offsets
}

// Arguments of draft_batch / draft_rows, checked before any drafting.
struct DraftArgs {
  std::vector<const SuffixIndex*> idx;
  I64 seq_ids, steps;
  nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> budgets;
  F64 weights;
  DraftParams p;
};

// shared = None or a SuffixIndex (DraftParams::shared), with its weight and slot weights.
void set_shared(DraftParams& p, nb::handle shared, double shared_weight, const int64_t* steps,
                const double* weights, size_t n_steps, int shared_min_match = 1) {
  if (!(shared_weight >= 0.0))
    throw nb::value_error(("invalid shared_weight=" + std::to_string(shared_weight) + ": must be >= 0").c_str());
  if (shared.is_none() || shared_weight == 0.0) return;
  p.shared = nb::cast<const SuffixIndex*>(shared);
  p.shared_weight = shared_weight;
  p.shared_min_match = shared_min_match;
  p.shared->slot_weights(steps, weights, n_steps, p.shared_slot_weight);
}

DraftArgs draft_args(nb::list indices, nb::handle seq_ids_h, nb::handle budgets_h,
                     double min_prob, nb::handle steps_h, nb::handle weights_h, bool chain,
                     int max_match_len, nb::handle mix, const char* fn, bool check_ids = true,
                     const std::vector<SuffixIndex*>* known = nullptr) {
  // known: the same list's indices, already converted (extend_draft_args: not cast twice)
  DraftArgs a;
  a.seq_ids = as_array<I64>(seq_ids_h, "seq_ids", "int64");
  a.budgets = as_array<nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>>(
      budgets_h, "budgets", "int32");
  a.steps = as_array<I64>(steps_h, "steps", "int64");
  a.weights = as_array<F64>(weights_h, "weights", "float64");
  const size_t n = a.seq_ids.shape(0);
  if (nb::len(indices) != n || a.budgets.shape(0) != n)
    throw nb::value_error((std::string(fn) + ": indices, seq_ids and budgets differ in length: " +
                           std::to_string(nb::len(indices)) + ", " + std::to_string(n) + ", " +
                           std::to_string(a.budgets.shape(0)))
                              .c_str());
  if (a.steps.shape(0) != a.weights.shape(0))
    throw nb::value_error((std::string(fn) + ": steps and weights differ in length").c_str());
  a.idx.resize(n);
  for (size_t r = 0; r < n; ++r) {
    a.idx[r] = known != nullptr ? (*known)[r] : nb::cast<const SuffixIndex*>(indices[r]);
    if (a.budgets(r) < 0)
      throw nb::value_error(("invalid budget=" + std::to_string(a.budgets(r)) + " in row " +
                             std::to_string(r) + ": must be >= 0")
                                .c_str());
    if (check_ids && !a.idx[r]->has_sequence(a.seq_ids(r)))
      throw nb::value_error(("unknown seq_id=" + std::to_string(a.seq_ids(r)) + " in row " +
                             std::to_string(r))
                                .c_str());
  }
  set_mix(a.p, mix);
  a.p.min_prob = min_prob;
  a.p.chain = chain;
  a.p.max_match_len = max_match_len;
  return a;
}

// One call per decode batch: rows (index, seq_id, budget) -> concatenated trees + offsets.
nb::tuple draft_batch(nb::list indices, nb::handle seq_ids_h, nb::handle budgets_h,
                      double min_prob, nb::handle steps_h, nb::handle weights_h, bool chain,
                      int max_match_len, nb::handle mix, nb::handle shared, double shared_weight,
                      int shared_min_match) {
  DraftArgs a = draft_args(indices, seq_ids_h, budgets_h, min_prob, steps_h, weights_h, chain,
                           max_match_len, mix, "draft_batch");
  set_shared(a.p, shared, shared_weight, a.steps.data(), a.weights.data(), a.steps.shape(0),
             shared_min_match);
  FlatDrafts all;
  {
    nb::gil_scoped_release release;
    draft_rows_impl(a.idx, a.seq_ids.data(), a.budgets.data(), a.steps.data(), a.weights.data(),
                    a.steps.shape(0), a.p, false, 1, all);
  }
  return nb::make_tuple(to_numpy(all.tokens), to_numpy(all.parents), to_numpy(all.probs),
                        to_numpy(all.offsets), to_numpy(all.match));
}

// draft_batch plus each node's depth (root children 1), on up to `threads` threads.
nb::tuple draft_rows(nb::list indices, nb::handle seq_ids_h, nb::handle budgets_h,
                     double min_prob, nb::handle steps_h, nb::handle weights_h, bool chain,
                     int max_match_len, nb::handle mix, int threads, nb::handle shared,
                     double shared_weight, int shared_min_match) {
  if (threads < 1)
    throw nb::value_error(("invalid threads=" + std::to_string(threads) + ": must be >= 1").c_str());
  DraftArgs a = draft_args(indices, seq_ids_h, budgets_h, min_prob, steps_h, weights_h, chain,
                           max_match_len, mix, "draft_rows");
  set_shared(a.p, shared, shared_weight, a.steps.data(), a.weights.data(), a.steps.shape(0),
             shared_min_match);
  FlatDrafts all;
  {
    nb::gil_scoped_release release;
    draft_rows_impl(a.idx, a.seq_ids.data(), a.budgets.data(), a.steps.data(), a.weights.data(),
                    a.steps.shape(0), a.p, true, size_t(threads), all);
  }
  return nb::make_tuple(to_numpy(all.tokens), to_numpy(all.parents), to_numpy(all.probs),
                        to_numpy(all.depths), to_numpy(all.offsets), to_numpy(all.match));
}

// One call per decode batch for the updates: row r appends tokens[offsets[r]:offsets[r+1]]
// to (indices[r], seq_ids[r]). Everything is validated before the first mutation, so a
// bad row leaves every index untouched.
struct ExtendArgs {
  std::vector<SuffixIndex*> idx;
  I64 seq_ids, offsets;
  Tokens tokens;
};

ExtendArgs extend_args(nb::list indices, nb::handle seq_ids_h, nb::handle tokens_h, nb::handle offsets_h,
                       const char* fn, bool check_ids = true) {
  ExtendArgs e;
  e.seq_ids = as_array<I64>(seq_ids_h, "seq_ids", "int64");
  e.tokens = tokens_arg(tokens_h, "tokens");
  e.offsets = as_array<I64>(offsets_h, "offsets", "int64");
  const size_t n = e.seq_ids.shape(0);
  if (nb::len(indices) != n || e.offsets.shape(0) != n + 1)
    throw nb::value_error((std::string(fn) + ": need len(indices) == len(seq_ids) == len(offsets) - 1, got " +
                           std::to_string(nb::len(indices)) + ", " + std::to_string(n) + ", " +
                           std::to_string(e.offsets.shape(0)))
                              .c_str());
  e.idx.resize(n);
  for (size_t r = 0; r < n; ++r) {
    e.idx[r] = nb::cast<SuffixIndex*>(indices[r]);
    const int64_t a = e.offsets(r), z = e.offsets(r + 1);
    if (a < 0 || z < a || z > int64_t(e.tokens.shape(0)))
      throw nb::value_error((std::string(fn) + ": invalid offsets[" + std::to_string(r) + ":" +
                             std::to_string(r + 2) + "]=(" + std::to_string(a) + ", " +
                             std::to_string(z) + ") for " + std::to_string(e.tokens.shape(0)) +
                             " tokens")
                                .c_str());
    if (check_ids && !e.idx[r]->has_sequence(e.seq_ids(r)))
      throw nb::value_error(("unknown seq_id=" + std::to_string(e.seq_ids(r)) + " in row " +
                             std::to_string(r))
                                .c_str());
  }
  return e;
}

// Thread `tid` of `stride` owns the rows of the indices that hash to it: every row of one
// index on one thread, in row order, so any split gives the sequential loop's result.
bool owns(const SuffixIndex* ix, size_t tid, size_t stride) {
  if (stride <= 1) return true;
  const uint64_t h = (uint64_t(reinterpret_cast<uintptr_t>(ix)) >> 4) * 0x9E3779B97F4A7C15ull;
  return (h >> 32) % stride == tid;
}

void extend_batch(nb::list indices, nb::handle seq_ids_h, nb::handle tokens_h, nb::handle offsets_h) {
  ExtendArgs e = extend_args(indices, seq_ids_h, tokens_h, offsets_h, "extend_batch");
  const size_t n = e.idx.size();
  // The mutation itself runs without the GIL (the session applies batches on a background
  // thread while the scheduler thread runs Python); callers serialise calls per index.
  nb::gil_scoped_release release;
  // Rows of different indices are independent: large batches are split over threads by
  // index (owns), so the result is the same as the sequential loop.
  const size_t hw = std::max(1u, std::thread::hardware_concurrency());
  on_threads(std::min<size_t>({hw, 8, n / 64}), [&](size_t tid, size_t stride) {
    for (size_t r = 0; r < n; ++r)
      if (owns(e.idx[r], tid, stride))
        e.idx[r]->extend(e.seq_ids(r), e.tokens.data() + e.offsets(r), size_t(e.offsets(r + 1) - e.offsets(r)));
  });
}

// policy._ModelBased's next plan of a feedback's rows (plan_ahead), computed by the feedback's
// extend + draft job right after its drafts are built, while the engine processes the step's
// results: OnlineCalibration.update (on a copy of the cells) and table, the rows'
// calibration factors, the length predictor's remaining tokens and the KV tokens (prepare),
// then online_plan on the job's drafts. The inputs are copies taken by the constructor,
// except the length index, which the query only reads (the caller refreshed it; the policy
// waits for the job before anything changes it). The plan is used only if nothing it read
// changed by the next plan (the policy checks); every number is what those calls give.
struct PlanAhead {
  // OnlineCalibration.update's arguments (same rows as planned: no row map)
  std::vector<double> cells;  // S x M x B x 2 (a copy: updated here)
  size_t S = 0, M = 0, B = 0;
  double decay = 1.0;
  std::vector<int64_t> generated, states, pend_budget, pend_generated, pend_match, pend_bins, bin_before, bin_size;
  std::vector<double> pend_nodes;
  size_t planned = 0, pend_w = 0;
  double table_w = 0.0, table_prior = 0.0;  // online_table's
  // curves
  std::vector<int64_t> depth_bin, rank_bin, match_lut;
  int64_t max_budget = 0;
  // calibration factors: per row the tracker's sums (known rows), wp = w * prior
  std::vector<double> sum_matched, sum_expected;
  std::vector<uint8_t> known;
  double cal_w = 0.0, cal_wp = 0.0, cal_prior = 1.0;
  // length predictor
  das::lengths::LengthIndex* lengths = nullptr;
  std::vector<int64_t> problem_rows, max_new, prompt_len;
  double tail_factor = 0.0;
  // online_plan's scalars
  double c_base = 0.0, c_tok = 0.0, c_kv = 0.0, spread = 0.0, free_tokens = 0.0, min_gain = 0.0;
  int64_t probe_budget = 0;
  std::vector<uint8_t> due;
  double probe_spent = 0.0, probe_limit = 0.0;
  // results (set by run_plan_ahead, read after the job was waited for)
  std::atomic<bool> ran{false};
  bool planned_ok = false;  // lookahead_per_row gave a plan (else: the caller plans the numpy way)
  std::string error;        // why nothing ran (a drafts / inputs mismatch)
  size_t added = 0;
  std::vector<int64_t> new_states, m, match;
  std::vector<double> table, calibration, relative, remaining, kv;
  das::alloc::OnlineCurves curves;
  das::alloc::Allocation alloc;
  std::vector<int32_t> budgets;
  double probe_s = 0.0;
  // the job's trees cut to min(budget, cut_cap) (cut_at; -1: not asked): what the plan's
  // DraftBatch.truncate of them gives, with its rows' node counts and the widest
  int64_t cut_cap = -1;
  bool cut_ok = false;
  SelectedRows cut;
  nb::object keep_lengths;  // (the LengthIndex's Python object: alive while the job runs)
};
void run_plan_ahead(PlanAhead& a, const FlatDrafts& d) noexcept;

// extend_batch, then draft_rows of the same rows (budgets[r]): the work of both, GIL-free,
// plus every row's SuffixIndex.version afterwards. (Drafting each row right after its
// index's appends measured slower than the row-pipelined draft_range: the draft reads far
// more than the appends touch.)
//
// Work sharing: the job is a list of tasks taken from atomic counters by every thread that
// calls work() -- the `threads` workers started with it and, in PendingExtendDraft::wait,
// the caller that would otherwise only wait (so a 2-core host drafts on both cores once the
// scheduler thread has nothing left but to wait). First the appends: one task per bucket of
// per-problem indices (owns: each index in one task, its rows in row order) and one for the
// shared index (every row, row order); then, once every append is done, the drafts in
// chunks of kChunk rows, each into its own buffer, concatenated in chunk order. Which
// thread runs which task never changes the result: it equals the sequential loop's.
struct ExtendDraftWork {
  static constexpr size_t kChunk = 32;
  std::vector<SuffixIndex*> idx;
  std::vector<const SuffixIndex*> cidx;
  std::vector<int64_t> seq_ids, offsets, steps;
  std::vector<int32_t> tokens, budgets;
  std::vector<double> weights;
  DraftParams p;
  SuffixIndex* shared = nullptr;  // also appended to (every row), and drafted from (p.shared)
  std::vector<int64_t> unshare;   // removed from the shared index before its appends
  // Each row's storage id in its own index and in the shared one, looked up once by the
  // argument checks (a removal of other sequences -- unshare -- never moves them).
  std::vector<uint32_t> own_st, shared_st;
  size_t threads = 1, extend_threads = 1;
  const char* fn = "extend_draft_rows";  // the Python name errors are raised under
  PlanAhead* ahead = nullptr;  // run on the drafts once they are built (kept alive by the caller)
  FlatDrafts out;
  std::vector<uint64_t> versions;
  bool probs_in_range = true;  // every node probability in [0, 1] (the session's check, made here)

  // Each row's storage ids (own index, shared index); an unknown seq_id throws, naming it
  // and its row. Before any append, so a bad row leaves every index untouched. The started
  // form (PendingExtendDraft) runs it on its first worker, off the caller's thread: at 512
  // rows these ~1,000 hash lookups in as many cold maps took ~0.1-0.2 ms under the GIL.
  void lookup() {
    const size_t rows = idx.size();
    own_st.resize(rows);
    for (size_t r = 0; r < rows; ++r)
      if ((own_st[r] = idx[r]->storage_id(seq_ids[r])) == das::kNil)
        throw nb::value_error(("unknown seq_id=" + std::to_string(seq_ids[r]) + " in row " + std::to_string(r))
                                  .c_str());
    if (shared != nullptr) {
      shared_st.resize(rows);
      for (size_t r = 0; r < rows; ++r)
        if ((shared_st[r] = shared->storage_id(seq_ids[r])) == das::kNil)
          throw nb::value_error((std::string(fn) + ": unknown seq_id=" + std::to_string(seq_ids[r]) +
                                 " in the shared index (row " + std::to_string(r) + ")").c_str());
    }
  }

  void plan() {  // after the arguments are set and looked up, before any work()
    const size_t n = idx.size();
    buckets_ = std::max<size_t>(1, std::min<size_t>({extend_threads, 8, n / 64}));
    ext_tasks_ = buckets_ + (shared != nullptr ? 1 : 0);
    chunks_ = (n + kChunk - 1) / kChunk;
    bufs_.assign(chunks_, FlatDrafts{});
    // the drafts go in index_order (the appends keep their own order): the chunks are of
    // that order, the result is put back in row order by finish()
    order_ = index_order(cidx);
    if (!order_.empty()) ordered_ = OrderedRows(order_, cidx, seq_ids.data(), budgets.data());
    out.offsets.assign(n + 1, 0);
    out.match.assign(n, 0);
  }

  // Takes tasks until none is left; any number of threads may call it at once.
  void work() {
    const size_t n = idx.size();
    for (size_t t; (t = next_ext_.fetch_add(1)) < ext_tasks_;) {
      if (!failed_.load()) {
        try {
          // The shared index's task first: the longest one (every row's appends and the
          // removals), so it starts at once and the buckets fill the other threads.
          if (shared != nullptr && t == 0) {
            for (int64_t q : unshare) shared->remove_sequence(q);
            std::vector<size_t> rows(n);
            for (size_t r = 0; r < n; ++r) rows[r] = r;
            append_rows(rows, [&](size_t) { return shared; }, shared_st);
          } else {
            const size_t bucket = t - (shared != nullptr ? 1 : 0);
            std::vector<size_t> rows;
            for (size_t r = 0; r < n; ++r)
              if (owns(idx[r], bucket, buckets_)) rows.push_back(r);
            append_rows(rows, [&](size_t r) { return idx[r]; }, own_st);
          }
        } catch (...) {
          fail(std::current_exception());
        }
      }
      if (ext_done_.fetch_add(1) + 1 == ext_tasks_) {
        std::lock_guard<std::mutex> l(mu_);
        cv_.notify_all();
      }
    }
    {  // every append lands before any draft reads an index
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return ext_done_.load() == ext_tasks_; });
    }
    for (size_t c; (c = next_chunk_.fetch_add(1)) < chunks_;) {
      if (failed_.load()) continue;
      try {
        const bool perm = !order_.empty();
        draft_range(perm ? ordered_.idx : cidx, perm ? ordered_.seq_ids.data() : seq_ids.data(),
                    perm ? ordered_.budgets.data() : budgets.data(), steps.data(), weights.data(), steps.size(), p, true,
                    c * kChunk, std::min(n, (c + 1) * kChunk), bufs_[c], out.offsets.data() + 1,
                    out.match.data());
      } catch (...) {
        fail(std::current_exception());
      }
      // The thread that drafted the last chunk builds the result (the chunks joined in
      // row order, the indices' versions): on a background thread of a started job, not
      // in the caller's wait() -- there, with the GIL held, it took ~50-70 us of the
      // scheduler thread's plan at 512 rows (a version read is a cache miss per index).
      if (chunks_done_.fetch_add(1) + 1 == chunks_ && !failed_.load()) {
        try {
          build();
        } catch (...) {
          fail(std::current_exception());
        }
      }
    }
  }

  // The appends of `rows` (in order) into index_of(r), storage st[r]: each row's record
  // and cursor ring are requested a row or two ahead, so their cache misses overlap the
  // previous rows' appends (the same appends, in the same order).
  template <class IndexOf>
  void append_rows(const std::vector<size_t>& rows, IndexOf index_of, const std::vector<uint32_t>& st) {
    const size_t m = rows.size();
    for (size_t q = 0; q < std::min<size_t>(m, 2); ++q) index_of(rows[q])->prefetch_storage(st[rows[q]], true);
    for (size_t q = 0; q < m; ++q) {
      if (q + 2 < m) index_of(rows[q + 2])->prefetch_storage(st[rows[q + 2]], true);
      if (q + 1 < m) index_of(rows[q + 1])->prefetch_storage(st[rows[q + 1]]);
      const size_t r = rows[q];
      index_of(r)->extend_storage(st[r], tokens.data() + offsets[r], size_t(offsets[r + 1] - offsets[r]));
    }
  }

  // After every work() call has returned: the result arrays (or the first error).
  // After every work() returned: the error, if any; else the result, built here unless
  // the last chunk's thread built it (nothing then reads or changes it concurrently: the
  // caller waited for every worker).
  void finish() {
    if (error_) std::rethrow_exception(error_);
    if (!built_) build();
  }

  // finish()'s build where it cannot throw (its error is kept for finish()): a started
  // job's wait() runs it without the GIL.
  void build_now() {
    if (built_ || error_) return;
    try {
      build();
    } catch (...) {
      fail(std::current_exception());
    }
  }

  // The started form's first step, run by its first worker: lookup() and plan(). An error
  // is kept for finish() (work() then finds no task). Every work() call waits for it.
  void prepare() {
    try {
      lookup();
      plan();
    } catch (...) {
      fail(std::current_exception());
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      prepared_ = true;
    }
    cv_.notify_all();
  }
  void wait_prepared() {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return prepared_; });
  }

  void run() {  // the whole job on `threads` threads, this one included (after lookup())
    plan();
    on_threads(std::max<size_t>(1, threads), [&](size_t, size_t) { work(); });
    finish();
  }

  // The result, once (after finish()): the vectors handed to numpy as they are.
  nb::tuple result() {
    return nb::make_tuple(to_numpy_moved(std::move(out.tokens)), to_numpy_moved(std::move(out.parents)),
                          to_numpy_moved(std::move(out.probs)), to_numpy_moved(std::move(out.depths)),
                          to_numpy_moved(std::move(out.offsets)), to_numpy_moved(std::move(out.match)),
                          to_numpy_moved(std::move(versions)), probs_in_range);
  }

 private:
  // The chunks joined in row order (offsets from lengths) and each row's index version,
  // once every chunk is drafted.
  void build() {
    const size_t n = idx.size();
    concat_chunks(bufs_, out);
    bufs_.clear();
    for (size_t r = 0; r < n; ++r) out.offsets[r + 1] += out.offsets[r];  // lengths -> offsets
    if (!order_.empty()) {  // (drafted in index_order: back to row order)
      FlatDrafts perm = std::move(out);
      unpermute(perm, order_, true, out);
    }
    versions.resize(n);
    for (size_t r = 0; r < n; ++r) versions[r] = idx[r]->version();
    built_ = true;
    for (const double q : out.probs)  // (NaN is out of range too)
      if (!(q >= 0.0 && q <= 1.0)) {
        probs_in_range = false;
        break;
      }
    if (ahead != nullptr) run_plan_ahead(*ahead, out);  // (never throws: a failed plan reads as none)
  }

  void fail(std::exception_ptr e) {
    std::lock_guard<std::mutex> l(mu_);
    if (!error_) error_ = e;
    failed_.store(true);
  }
  size_t buckets_ = 1, ext_tasks_ = 0, chunks_ = 0;
  std::atomic<size_t> next_ext_{0}, ext_done_{0}, next_chunk_{0}, chunks_done_{0};
  bool built_ = false;  // (set by build(): see finish() for who reads it when)
  std::atomic<bool> failed_{false};
  bool prepared_ = false;  // (under mu_)
  std::mutex mu_;
  std::condition_variable cv_;
  std::exception_ptr error_;
  std::vector<FlatDrafts> bufs_;
  std::vector<uint32_t> order_;  // index_order of the drafts (empty: row order)
  OrderedRows ordered_;          // the draft arguments in that order
};

template <class A>
std::vector<typename std::remove_const<typename A::Scalar>::type> copy_of(const A& a) {
  return {a.data(), a.data() + a.shape(0)};
}

void extend_draft_args(ExtendDraftWork& w, nb::list indices, nb::handle seq_ids_h, nb::handle tokens_h,
                       nb::handle offsets_h, nb::handle budgets_h, double min_prob, nb::handle steps_h,
                       nb::handle weights_h, bool chain, int max_match_len, nb::handle mix, int threads,
                       int extend_threads, const char* fn, nb::handle shared = nb::none(),
                       double shared_weight = 0.0, int shared_min_match = 1,
                       nb::handle unshare = nb::none()) {
  if (threads < 1)
    throw nb::value_error(("invalid threads=" + std::to_string(threads) + ": must be >= 1").c_str());
  if (extend_threads < 0)
    throw nb::value_error(("invalid extend_threads=" + std::to_string(extend_threads) + ": must be >= 0").c_str());
  // (seq_ids are checked where each row's storage ids are looked up: ExtendDraftWork::lookup)
  ExtendArgs e = extend_args(indices, seq_ids_h, tokens_h, offsets_h, fn, false);
  DraftArgs a = draft_args(indices, seq_ids_h, budgets_h, min_prob, steps_h, weights_h, chain,
                           max_match_len, mix, fn, false, &e.idx);
  w.idx = e.idx;
  w.cidx = a.idx;
  w.seq_ids = copy_of(e.seq_ids);
  w.offsets = copy_of(e.offsets);
  w.tokens = copy_of(e.tokens);
  w.budgets = copy_of(a.budgets);
  w.steps = copy_of(a.steps);
  w.weights = copy_of(a.weights);
  w.p = a.p;
  set_shared(w.p, shared, shared_weight, w.steps.data(), w.weights.data(), w.steps.size(), shared_min_match);
  if (!shared.is_none())  // appended to even when its weight is 0 (fallback drafts read it)
    w.shared = nb::cast<SuffixIndex*>(shared);
  w.fn = fn;
  if (!unshare.is_none()) {  // finished copies past the shared index's cap (SuffixDrafter)
    I64 ids = as_array<I64>(unshare, "unshare", "int64");
    if (ids.shape(0) && w.shared == nullptr)
      throw nb::value_error((std::string(fn) + ": unshare given without a shared index").c_str());
    w.unshare = copy_of(ids);
    for (size_t i = 0; i < w.unshare.size(); ++i)
      if (!w.shared->has_sequence(w.unshare[i]) ||
          std::find(w.seq_ids.begin(), w.seq_ids.end(), w.unshare[i]) != w.seq_ids.end())
        throw nb::value_error((std::string(fn) + ": cannot unshare seq_id=" + std::to_string(w.unshare[i]) +
                               " (not in the shared index, or a row of this call)").c_str());
  }
  w.threads = size_t(threads);
  // append tasks (buckets of per-problem indices): 0 = 8; at most 8, 64 rows each at least
  w.extend_threads = extend_threads ? size_t(extend_threads) : 8;
}

nb::tuple extend_draft_rows(nb::list indices, nb::handle seq_ids_h, nb::handle tokens_h,
                            nb::handle offsets_h, nb::handle budgets_h, double min_prob,
                            nb::handle steps_h, nb::handle weights_h, bool chain, int max_match_len,
                            nb::handle mix, int threads, int extend_threads, nb::handle shared,
                            double shared_weight, int shared_min_match, nb::handle unshare) {
  ExtendDraftWork w;
  extend_draft_args(w, indices, seq_ids_h, tokens_h, offsets_h, budgets_h, min_prob, steps_h, weights_h,
                    chain, max_match_len, mix, threads, extend_threads, "extend_draft_rows", shared,
                    shared_weight, shared_min_match, unshare);
  w.lookup();  // (a bad seq_id raises here, before anything starts)
  {
    nb::gil_scoped_release release;
    w.run();
  }
  return w.result();
}

// Nice value of the threads extend_draft_rows_start runs beside the caller (0 = the
// caller's). On Linux the nice value is per thread: a started job's workers then yield a
// shared core to the scheduler thread's Python (SGLang's result processing), which the
// job must not slow down; the caller's own share of the job (wait()) keeps its priority.
std::atomic<int> g_background_nice{0};

// The threads started jobs run on: made once and kept (waiting on a condition variable),
// not one std::thread per job. A thread made per job started at the caller's priority and
// lowered itself only once running; on a 2-core host the new thread then sometimes took
// the scheduler thread's core for a whole time slice, right inside the feedback (1.8-2.8 ms
// instead of ~0.06 ms, with an involuntary context switch; bench_host_path, 512 rows). A
// kept thread sleeps at the background nice value, so waking it does not preempt the
// caller, and nothing is created per step. Each thread applies the nice value before every
// task; one that cannot go back to a lower nice value (raising priority needs privileges)
// leaves the pool, and the next submit makes a new one at its caller's. After fork() the child starts
// with an empty pool (its parent's threads do not exist there).
class BackgroundPool {
 public:
  static BackgroundPool& get() {
    static std::once_flag once;
    std::call_once(once, [] {
      pthread_atfork(nullptr, nullptr, [] {
        new (&create_mu()) std::mutex();  // (a lock held in the parent at fork() stays held)
        instance() = new BackgroundPool();
      });
    });
    std::lock_guard<std::mutex> l(create_mu());
    if (instance() == nullptr) instance() = new BackgroundPool();  // (never freed: threads may outlive exit)
    return *instance();
  }

  // Queues the tasks for the pool's threads, making threads until there are as many as
  // this call's tasks. Not one per queued task: tasks of jobs whose caller did the work
  // itself (wait(), under load, before a thread woke) stay queued until a thread finds
  // their job closed, and counting them grew the pool -- a new thread per job again.
  void submit(std::vector<std::function<void()>> tasks) {
    const int cpu = sched_getcpu();  // (the caller's core: the tasks keep off it, see loop)
    std::lock_guard<std::mutex> l(mu_);
    submit_cpu_ = cpu;
    const size_t want = tasks.size();
    for (auto& t : tasks) queue_.push_back(std::move(t));
    // Once a thread could not lower its nice value (no CAP_SYS_NICE), a thread above the
    // background value would leave the pool on waking: only the others are counted. New
    // threads have this caller's value (and register it when they start).
    size_t able = threads_;
    if (cannot_lower_) {
      const int nice = g_background_nice.load(std::memory_order_relaxed);
      able = size_t(std::distance(applied_.begin(), applied_.upper_bound(nice))) + starting_;
    }
    while (able < want) {
      std::thread(&BackgroundPool::loop, this).detach();
      ++threads_;
      ++starting_;
      ++able;
    }
    cv_.notify_all();
  }

  size_t threads() {
    std::lock_guard<std::mutex> l(mu_);
    return threads_;
  }

 private:
  static BackgroundPool*& instance() {
    static BackgroundPool* p = nullptr;
    return p;
  }
  static std::mutex& create_mu() {
    static std::mutex m;
    return m;
  }

  void loop() {
    // (a new thread has the nice value of the thread that made it: a submitter's)
    errno = 0;
    int applied = getpriority(PRIO_PROCESS, 0);
    if (errno != 0) applied = 0;
    std::unique_lock<std::mutex> l(mu_);
    --starting_;
    applied_.insert(applied);
    for (;;) {
      cv_.wait(l, [&] { return !queue_.empty(); });
      const int nice = g_background_nice.load(std::memory_order_relaxed);
      if (nice != applied) {
        if (setpriority(PRIO_PROCESS, 0, nice) != 0 && nice < applied) {
          // Cannot go back: this thread leaves the pool, and the next submit makes a new
          // one at its caller's value (made here, it would have this thread's). The task
          // stays queued for another thread; its job never depends on it (wait() and a
          // dropped job's destructor do what no pool thread has taken).
          --threads_;
          applied_.erase(applied_.find(applied));
          cannot_lower_ = true;
          cv_.notify_all();
          return;
        }
        applied_.erase(applied_.find(applied));
        applied_.insert(nice);
        applied = nice;
      }
      std::function<void()> task = std::move(queue_.front());
      queue_.pop_front();
      const int avoid = submit_cpu_;
      l.unlock();
      cpu_set_t allowed;
      const bool moved = keep_off(avoid, allowed);
      task();  // (tasks keep their own errors)
      task = nullptr;
      if (moved) sched_setaffinity(0, sizeof(allowed), &allowed);
      l.lock();
    }
  }

  // A woken thread is placed next to the thread that woke it (the kernel's wake-affine
  // placement): the caller's core, where SGLang's result processing runs next. There it
  // took ~10 % of that core (its nice value's share) for the whole job while the other
  // core idled: at 128 rows the engine's Python ran 0.54 ms late per step (p50) and the
  // job was not done by the plan. So a task runs on the allowed cores other than the
  // submitter's (when there are others; the thread's mask is restored afterwards).
  static bool keep_off(int cpu, cpu_set_t& allowed) {
    if (cpu < 0 || sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return false;
    if (!CPU_ISSET(cpu, &allowed) || CPU_COUNT(&allowed) < 2) return false;
    cpu_set_t others = allowed;
    CPU_CLR(cpu, &others);
    return sched_setaffinity(0, sizeof(others), &others) == 0;
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  size_t threads_ = 0;
  size_t starting_ = 0;       // made, not yet registered in applied_
  std::multiset<int> applied_;  // each registered thread's nice value
  bool cannot_lower_ = false;   // a thread failed to lower its nice value
  int submit_cpu_ = -1;
};

// extend_draft_rows started at once on `threads` background pool threads (it never takes
// the GIL, so it runs while the caller's thread goes on with Python); wait() takes part in
// what is left (ExtendDraftWork::work, GIL released), waits for the pool threads working
// on it and returns the result (or raises its error). Keeps the index list alive until
// then. The caller must not touch these indices before wait() returns. A pool thread that
// gets to the job only once wait() has closed it leaves it untouched (the job's state is
// shared with the queued tasks, so it outlives them).
class PendingExtendDraft {
  struct Job {
    ExtendDraftWork w;
    std::mutex mu;
    std::condition_variable cv;
    size_t running = 0;
    bool closed = false;
    std::atomic<bool> prepare_claimed{false};

    void prepare_or_wait() {  // the first to arrive looks the rows up and plans the job
      if (!prepare_claimed.exchange(true))
        w.prepare();
      else
        w.wait_prepared();
    }
    void close_and_wait() {  // no pool thread starts on it after this; the running ones end
      std::unique_lock<std::mutex> l(mu);
      closed = true;
      cv.wait(l, [&] { return running == 0; });
    }
    void complete() {  // what no pool thread has taken, on this thread; then the rest ends
      prepare_or_wait();
      w.work();
      close_and_wait();
    }
  };

 public:
  PendingExtendDraft(nb::list indices, nb::handle seq_ids_h, nb::handle tokens_h, nb::handle offsets_h,
                     nb::handle budgets_h, double min_prob, nb::handle steps_h, nb::handle weights_h,
                     bool chain, int max_match_len, nb::handle mix, int threads, int extend_threads,
                     nb::handle shared, double shared_weight, int shared_min_match, nb::handle unshare,
                     nb::handle ahead)
      : keep_(indices), keep_shared_(nb::borrow(shared)), keep_ahead_(nb::borrow(ahead)),
        job_(std::make_shared<Job>()) {
    extend_draft_args(job_->w, indices, seq_ids_h, tokens_h, offsets_h, budgets_h, min_prob, steps_h, weights_h,
                      chain, max_match_len, mix, threads, extend_threads, "extend_draft_rows_start", shared,
                      shared_weight, shared_min_match, unshare);
    if (!ahead.is_none()) {
      PlanAhead* a = nb::cast<PlanAhead*>(ahead);
      if (a->ran.load() || a->generated.size() != job_->w.idx.size())
        throw nb::value_error(("extend_draft_rows_start: ahead is for " + std::to_string(a->generated.size()) +
                               " rows (or already ran), the job has " + std::to_string(job_->w.idx.size()))
                                  .c_str());
      job_->w.ahead = a;
    }
    // The rows' storage ids are looked up and the job planned by its first worker, off
    // this thread (an unknown seq_id is raised by wait(), before any index changed).
    // prepare() and work() record their own errors (finish() rethrows them).
    std::vector<std::function<void()>> tasks;
    for (size_t t = 0; t < std::max<size_t>(1, job_->w.threads); ++t)
      tasks.emplace_back([job = job_] {
        {
          std::lock_guard<std::mutex> l(job->mu);
          if (job->closed) return;
          ++job->running;
        }
        job->prepare_or_wait();
        job->w.work();
        {
          std::lock_guard<std::mutex> l(job->mu);
          --job->running;
        }
        job->cv.notify_all();
      });
    nb::gil_scoped_release release;  // (the pool's lock may be held by a thread making a thread)
    BackgroundPool::get().submit(std::move(tasks));
  }
  ~PendingExtendDraft() {  // a job never waited for still completes (its errors are lost)
    nb::gil_scoped_release release;
    if (!done_) job_->complete();
  }
  // Helps with what is left (this thread takes tasks too), then waits for the pool threads.
  nb::tuple wait() {
    if (done_) throw nb::value_error("extend_draft_rows_start: wait() already returned the result");
    {
      nb::gil_scoped_release release;
      job_->complete();
      job_->w.build_now();  // (if no pool thread built the result: still without the GIL)
    }
    done_ = true;
    job_->w.finish();
    return job_->w.result();
  }

 private:
  nb::object keep_, keep_shared_, keep_ahead_;
  std::shared_ptr<Job> job_;
  bool done_ = false;
};

// Ragged tree-verify inputs of one decode batch (sglang/tree_inputs.build_ragged_layout,
// from its flat DraftBatch): request b verifies its root and its lens[b] draft nodes.
// Per request, columns 0..k (0 = root): tokens, positions (seq_len + depth), the k+1 x k+1
// ancestor mask, and the tree links (first child / next sibling by column order, which is
// what the stable (row, parent) sort of the numpy version gives). The dense [bs, n] link
// arrays use n = the widest request's row count; columns past a request's rows are never
// linked. parents are row-local, -1 = the root; a parent not before its node is refused.
//
// Every integer array the verify forward reads is written into ONE int64 buffer, so the
// worker moves them to the device with one copy and takes views (until this version: ten
// host-to-device copies and SGLang's qo_indptr ops, ~0.2 ms of host time a step at 512 rows
// on the CPU). Its parts, back to back, their first words in `starts` (the last entry:
// the buffer's length):
//   0 tokens[total], 1 positions[total], 2 verify_lens[bs], 3 offsets[bs] (int64),
//   4 candidates, retrieve_index, next_token, next_sibling (int64 [bs, n] each, adjacent),
//   5 (an even word) int32 verify_lens[bs], qo_indptr[bs+1] (0, running sum) and
//     extend_start_loc[bs] (qo_indptr[:-1]), each padded to 4 int32 (16 bytes),
//   6 with mask_zeros: the int64 positions of the tree blocks' False entries in the
//     [seq_len prefix | tree] mask (ragged_mask_index's with `tree`); its length returned.
constexpr int RAGGED_PARTS = 7;

inline int64_t round4(int64_t x) { return (x + 3) & ~int64_t(3); }

// The flat GPU-form verify mask (request b: verify_len(b) rows of [seq_len(b) prefix |
// tree columns], blocks back to back): calls emit(position) for each tree-block entry
// (b, i, j) in (b, i, j) order that `pick(at)` keeps (`at`: the entry's index in the
// blocks' flat order), and returns the mask's length. ragged_mask_index's index and
// ragged_layout's zeros both walk it here.
template <class VerifyLen, class SeqLen, class Pick, class Emit>
int64_t mask_tree_positions(size_t bs, VerifyLen verify_len, SeqLen seq_len, Pick pick, Emit emit) {
  int64_t start = 0;
  size_t at = 0;
  for (size_t b = 0; b < bs; ++b) {
    const int64_t w = verify_len(b), prefix = seq_len(b), row_len = prefix + w;
    for (int64_t i = 0; i < w; ++i)
      for (int64_t j = 0; j < w; ++j, ++at)
        if (pick(at)) emit(start + i * row_len + prefix + j);
    start += w * row_len;
  }
  return start;
}

nb::tuple ragged_layout(nb::handle roots_h, nb::handle seq_lens_h, nb::handle offsets_h, nb::handle tokens_h,
                        nb::handle parents_h, bool mask_zeros) {
  I64 roots = as_array<I64>(roots_h, "roots", "int64");
  I64 seq_lens = as_array<I64>(seq_lens_h, "seq_lens", "int64");
  I64 offsets = as_array<I64>(offsets_h, "offsets", "int64");
  Tokens tokens = tokens_arg(tokens_h, "tokens");
  Tokens parents = as_array<Tokens>(parents_h, "parents", "int32");
  const size_t bs = roots.shape(0);
  if (seq_lens.shape(0) != bs || offsets.shape(0) != bs + 1)
    throw nb::value_error(("ragged_layout: " + std::to_string(bs) + " roots but " +
                           std::to_string(seq_lens.shape(0)) + " seq_lens and " +
                           std::to_string(offsets.shape(0)) + " offsets (need bs + 1)").c_str());
  const int64_t total_nodes = bs ? offsets(bs) : 0;
  if ((bs && offsets(0) != 0) || size_t(total_nodes) != tokens.shape(0) || tokens.shape(0) != parents.shape(0))
    throw nb::value_error(("ragged_layout: offsets must run from 0 to the node count (" +
                           std::to_string(tokens.shape(0)) + " tokens, " + std::to_string(parents.shape(0)) +
                           " parents)").c_str());
  int64_t n = 0, total = 0, mask_len = 0;
  for (size_t b = 0; b < bs; ++b) {
    const int64_t k = offsets(b + 1) - offsets(b);
    if (k < 0) throw nb::value_error(("ragged_layout: offsets decrease at row " + std::to_string(b)).c_str());
    if (mask_zeros && seq_lens(b) < 0)
      throw nb::value_error(("ragged_layout: negative seq_len " + std::to_string(seq_lens(b)) + " at row " +
                             std::to_string(b)).c_str());
    total += k + 1;
    mask_len += (k + 1) * (k + 1);
    n = std::max(n, k + 1);
  }
  const int64_t ubs = int64_t(bs), dense = ubs * n;
  std::vector<int64_t> starts(RAGGED_PARTS + 1, 0);
  starts[1] = total;
  starts[2] = 2 * total;
  starts[3] = starts[2] + ubs;
  starts[4] = starts[3] + ubs;
  starts[5] = (starts[4] + 4 * dense + 1) & ~int64_t(1);
  starts[6] = starts[5] + (round4(ubs) + round4(ubs + 1) + round4(ubs)) / 2;
  // (the zeros' capacity: at most every tree entry; only the written part is handed over)
  const int64_t capacity = starts[6] + (mask_zeros ? mask_len : 0);
  auto* buf = new int64_t[size_t(std::max<int64_t>(capacity, 1))];
  std::unique_ptr<int64_t[]> owned(buf);
  int64_t* tok = buf;
  int64_t* pos = buf + starts[1];
  int64_t* vl = buf + starts[2];
  int64_t* offs = buf + starts[3];
  int64_t* cand = buf + starts[4];
  int64_t* retrieve = cand + dense;
  int64_t* next_tok = retrieve + dense;
  int64_t* next_sib = next_tok + dense;
  auto* vl32 = reinterpret_cast<int32_t*>(buf + starts[5]);
  int32_t* qo = vl32 + round4(ubs);
  int32_t* start_loc = qo + round4(ubs + 1);
  std::fill(buf + starts[4] + 4 * dense, buf + starts[6], 0);  // (the padding words: defined)
  std::fill(cand, cand + dense, 0);
  std::fill(retrieve, retrieve + 3 * dense, -1);  // retrieve_index, next_token, next_sibling
  std::vector<uint8_t> mask(static_cast<size_t>(mask_len), 0);
  std::vector<int64_t> depth, last_child;
  int64_t row0 = 0;
  qo[0] = 0;
  for (size_t b = 0; b < bs; ++b) {
    const int64_t k = offsets(b + 1) - offsets(b), w = k + 1;
    vl[b] = w;
    offs[b] = row0;
    vl32[b] = int32_t(w);
    start_loc[b] = int32_t(row0);
    qo[b + 1] = int32_t(row0 + w);
    row0 += w;
  }
  size_t m0 = 0;  // where request b's mask block starts
  for (size_t b = 0; b < bs; ++b) {
    const int64_t k = vl[b] - 1, a = offsets(b), w = vl[b];
    depth.assign(size_t(w), 0);
    last_child.assign(size_t(w), -1);
    int64_t* row_cand = cand + b * size_t(n);
    int64_t* row_ret = retrieve + b * size_t(n);
    int64_t* row_next = next_tok + b * size_t(n);
    int64_t* row_sib = next_sib + b * size_t(n);
    uint8_t* blk = mask.data() + m0;
    tok[size_t(offs[b])] = roots(b);
    pos[size_t(offs[b])] = seq_lens(b);
    row_cand[0] = roots(b);
    row_ret[0] = offs[b];
    blk[0] = 1;
    for (int64_t i = 0; i < k; ++i) {
      const int32_t par = parents(size_t(a + i));
      if (par < -1 || par >= i)
        throw nb::value_error(("ragged_layout: row " + std::to_string(b) + " node " + std::to_string(i) +
                               " has parent " + std::to_string(par) + " (need -1 <= parent < node)").c_str());
      const int64_t c = i + 1, pc = int64_t(par) + 1;  // columns: the root is 0
      depth[size_t(c)] = depth[size_t(pc)] + 1;
      tok[size_t(offs[b] + c)] = tokens(size_t(a + i));
      pos[size_t(offs[b] + c)] = seq_lens(b) + depth[size_t(c)];
      row_cand[c] = tokens(size_t(a + i));
      row_ret[c] = offs[b] + c;
      uint8_t* r = blk + c * w;
      const uint8_t* pr = blk + pc * w;
      for (int64_t j = 0; j < c; ++j) r[j] = pr[j];  // the parent's ancestors (and itself)
      r[c] = 1;
      if (last_child[size_t(pc)] < 0)
        row_next[pc] = c;
      else
        row_sib[last_child[size_t(pc)]] = c;
      last_child[size_t(pc)] = c;
    }
    m0 += size_t(w * w);
  }
  int64_t flat_len = 0;  // the [seq_len prefix | tree] mask's length
  int64_t end = starts[6];
  if (mask_zeros) {  // (as ragged_mask_index with the tree: its False entries' positions)
    int64_t* zeros = buf + end;
    flat_len = mask_tree_positions(
        bs, [&](size_t b) { return vl[b]; }, [&](size_t b) { return seq_lens(b); },
        [&](size_t at) { return !mask[at]; }, [&](int64_t q) { *zeros++ = q; });
    end = zeros - buf;
  }
  starts[RAGGED_PARTS] = end;
  nb::capsule owner(owned.release(), [](void* q) noexcept { delete[] static_cast<int64_t*>(q); });
  auto buf_np = nb::ndarray<nb::numpy, int64_t, nb::ndim<1>>(buf, {size_t(end)}, owner);
  // (the mask handed to numpy as it is, not copied)
  return nb::make_tuple(buf_np, to_numpy_moved(std::move(starts)), to_bool_numpy_moved(std::move(mask)), n, total,
                        flat_len);
}

// DraftBatch.take / take_rows / truncate in one pass (core/draft_tree.py, the numpy
// reference): output row q is input row rows[q] (-1: an empty row, match length 0; rows
// None: q itself), cut to its first keep[q] nodes (keep None: all of them). A tree's
// prefix is a tree (parent index < node index), so the cut keeps parents valid.
// Returns (tokens, parents, probs, depths, offsets, match, lens, width): the rows' node counts
// (int64) and the widest one's, which the caller would compute again; () when rows is None
// and no row was cut (the caller keeps its batch).
nb::tuple draft_select(nb::handle offsets_h, nb::handle rows_h, nb::handle keep_h, nb::handle tokens_h,
                       nb::handle parents_h, nb::handle probs_h, nb::handle depths_h, nb::handle match_h) {
  const I64 offsets = as_array<I64>(offsets_h, "offsets", "int64");
  const Tokens tokens = tokens_arg(tokens_h, "tokens");
  const Tokens parents = tokens_arg(parents_h, "parents");
  const F64 probs = as_array<F64>(probs_h, "probs", "float64");
  const Tokens depths = tokens_arg(depths_h, "depths");
  const Tokens match = tokens_arg(match_h, "match_len");
  if (offsets.shape(0) < 1) throw nb::value_error("draft_select: offsets must have rows + 1 entries");
  const size_t n_in = offsets.shape(0) - 1;
  const size_t nodes = tokens.shape(0);
  if (parents.shape(0) != nodes || probs.shape(0) != nodes || depths.shape(0) != nodes || match.shape(0) != n_in)
    throw nb::value_error("draft_select: tokens, parents, probs and depths must have one entry per node, "
                          "match_len one per row");
  if (offsets(0) != 0 || size_t(offsets(n_in)) != nodes)
    throw nb::value_error("draft_select: offsets must run from 0 to the node count");
  for (size_t r = 0; r < n_in; ++r)
    if (offsets(r + 1) < offsets(r))
      throw nb::value_error(("draft_select: offsets must not decrease (row " + std::to_string(r) + ")").c_str());
  const bool has_rows = !rows_h.is_none(), has_keep = !keep_h.is_none();
  I64 rows, keep;
  if (has_rows) rows = as_array<I64>(rows_h, "rows", "int64");
  if (has_keep) keep = as_array<I64>(keep_h, "keep", "int64");
  const size_t n_out = has_rows ? rows.shape(0) : n_in;
  if (has_keep && keep.shape(0) != n_out)
    throw nb::value_error(("draft_select: keep has " + std::to_string(keep.shape(0)) + " entries for " +
                           std::to_string(n_out) + " rows").c_str());
  std::vector<int64_t> src(n_out), len(n_out);
  size_t total = 0;
  for (size_t q = 0; q < n_out; ++q) {
    const int64_t r = has_rows ? rows(q) : int64_t(q);
    if (r < -1 || r >= int64_t(n_in))
      throw nb::value_error(("draft_select: invalid rows[" + std::to_string(q) + "]=" + std::to_string(r) +
                             ": must be in [-1, " + std::to_string(n_in) + ")").c_str());
    int64_t k = r < 0 ? 0 : offsets(size_t(r) + 1) - offsets(size_t(r));
    if (has_keep) k = std::min(k, std::max<int64_t>(keep(q), 0));
    src[q] = r;
    len[q] = k;
    total += size_t(k);
  }
  if (!has_rows && total == nodes) return nb::make_tuple();  // (a truncate that cuts nothing)
  SelectedRows s;
  select_rows(offsets.data(), tokens.data(), parents.data(), probs.data(), depths.data(), match.data(), src,
              std::move(len), s);
  return selected_tuple(s);
}

// TokenRows.from_padded in one pass (core/drafter.py, the numpy reference): row r = the
// first lens[r] entries of row r of a 2-D C-contiguous int64 or int32 array. Returns
// (flat int32, offsets int64), or None when a length or a token id is invalid (the caller's
// numpy path then names it).
template <typename T>
nb::object padded_rows_impl(const T* tok, size_t rows, size_t stride, const int64_t* lens) {
  std::vector<int64_t> off(rows + 1, 0);
  for (size_t r = 0; r < rows; ++r) {
    if (lens[r] < 0 || size_t(lens[r]) > stride) return nb::none();
    off[r + 1] = off[r] + lens[r];
  }
  std::vector<int32_t> flat(size_t(off[rows]));
  for (size_t r = 0; r < rows; ++r) {
    const T* src = tok + r * stride;
    int32_t* dst = flat.data() + off[r];
    for (int64_t k = 0; k < lens[r]; ++k) {
      const T v = src[k];
      if (v < 0 || int64_t(v) > int64_t(INT32_MAX)) return nb::none();
      dst[k] = int32_t(v);
    }
  }
  return nb::make_tuple(to_numpy_moved(std::move(flat)), to_numpy_moved(std::move(off)));
}

// outcome_rows(proposed, committed): a feedback's verify outcomes in one pass (DasSession.
// committed_batch): the rows with one (something drafted, or more than the bonus token
// committed), their proposed counts and accepted counts (committed - 1), and the first of
// those rows whose outcome is invalid (accepted < 0, proposed < 0 or accepted > proposed;
// -1: none) -- until stop 58 about ten numpy operations a step.
nb::tuple outcome_rows(nb::handle proposed_h, nb::handle committed_h) {
  const I64 p = as_array<I64>(proposed_h, "proposed", "int64");
  const I64 n = as_array<I64>(committed_h, "committed", "int64");
  const size_t bs = p.shape(0);
  if (n.shape(0) != bs)
    throw nb::value_error(("outcome_rows: " + std::to_string(bs) + " proposed counts but " +
                           std::to_string(n.shape(0)) + " committed counts").c_str());
  std::vector<int64_t> rows, prop, acc;
  int64_t bad = -1;
  for (size_t b = 0; b < bs; ++b) {
    const int64_t pb = p.data()[b], nb_ = n.data()[b];
    if (pb == 0 && nb_ == 1) continue;  // nothing drafted, only the bonus token: no outcome
    const int64_t a = nb_ - 1;
    if (bad < 0 && (pb < 0 || a < 0 || a > pb)) bad = int64_t(rows.size());
    rows.push_back(int64_t(b));
    prop.push_back(pb);
    acc.push_back(a);
  }
  return nb::make_tuple(to_numpy_moved(std::move(rows)), to_numpy_moved(std::move(prop)),
                        to_numpy_moved(std::move(acc)), bad);
}

nb::object padded_rows(nb::handle tokens_h, nb::handle lens_h) {
  using I64M = nb::ndarray<const int64_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
  using I32M = nb::ndarray<const int32_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
  const I64 lens = as_array<I64>(lens_h, "lens", "int64");
  I64M t64;
  I32M t32;
  if (nb::try_cast(tokens_h, t64, false)) {
    if (t64.shape(0) != lens.shape(0)) throw nb::value_error("padded_rows: one length per tokens row");
    return padded_rows_impl(t64.data(), t64.shape(0), t64.shape(1), lens.data());
  }
  if (nb::try_cast(tokens_h, t32, false)) {
    if (t32.shape(0) != lens.shape(0)) throw nb::value_error("padded_rows: one length per tokens row");
    return padded_rows_impl(t32.data(), t32.shape(0), t32.shape(1), lens.data());
  }
  throw nb::value_error(("invalid tokens: expected a 2-D C-contiguous int64 or int32 numpy array, got " +
                         describe(tokens_h)).c_str());
}

// seq_tails(seqs): each sequence's last item and length -- the worker reads each decode
// row's ``req.output_ids`` (SGLang's array("q"), a list in earlier versions) for the
// verify's roots and the stop cut's length limit (sglang/batch_rows.py: the arrays are
// gathered once per batch composition; two list comprehensions over the requests were
// ~40 us at 512 rows warm, and each read a cold Req's attribute dict). An empty sequence
// is an error naming its row.
nb::tuple seq_tails(nb::handle seqs_h) {
  nb::object f = nb::steal(PySequence_Fast(seqs_h.ptr(), "seq_tails: seqs must be a sequence"));
  if (!f.is_valid()) throw nb::python_error();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(f.ptr());
  PyObject** items = PySequence_Fast_ITEMS(f.ptr());
  std::vector<int64_t> last(static_cast<size_t>(n)), length(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* seq = items[i];
    const Py_ssize_t m = PySequence_Size(seq);
    if (m < 0) throw nb::python_error();
    if (m == 0) throw nb::value_error(("seq_tails: the sequence at row " + std::to_string(i) + " is empty").c_str());
    nb::object t = nb::steal(PySequence_GetItem(seq, m - 1));
    if (!t.is_valid()) throw nb::python_error();
    const long long v = PyLong_AsLongLong(t.ptr());
    if (v == -1 && PyErr_Occurred()) throw nb::python_error();
    last[size_t(i)] = v;
    length[size_t(i)] = m;
  }
  return nb::make_tuple(to_numpy_moved(std::move(last)), to_numpy_moved(std::move(length)));
}

// stop_rows(runs, lens, max_new, committed, row_set, set_ids, set_offsets): the stop cut
// of every row whose stops are tokens only (sglang/batch_rows.py, BatchRows.cut: what
// finish.stop_cut gives it). Row b's accepted run is runs[b, :lens[b]] (bonus included,
// lens >= 1); its length limit max(1, min(lens[b], max_new[b] - committed[b])); with
// row_set[b] = s >= 0 its run ends at the first of its first `limit` tokens in
// set_ids[set_offsets[s]:set_offsets[s + 1]]. Returns (cut, limit, finishing): int64 each
// (cut = limit where row_set is -1: the caller cuts those rows itself), and per row whether
// the request finishes with its run as cut (bool): the cut ends at one of its stop tokens,
// or the run reaches its length limit (committed + cut >= max_new; until stop 58 the caller
// added that with numpy, ~3 cold array ops a step).
nb::tuple stop_rows(nb::handle runs_h, nb::handle lens_h, nb::handle max_new_h, nb::handle committed_h,
                    nb::handle row_set_h, nb::handle set_ids_h, nb::handle set_offsets_h) {
  using I64M = nb::ndarray<const int64_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
  I64M runs;
  if (!nb::try_cast(runs_h, runs, false))
    throw nb::value_error(("invalid runs: expected a 2-D C-contiguous int64 numpy array, got " +
                           describe(runs_h)).c_str());
  const I64 lens = as_array<I64>(lens_h, "lens", "int64");
  const I64 max_new = as_array<I64>(max_new_h, "max_new", "int64");
  const I64 committed = as_array<I64>(committed_h, "committed", "int64");
  const I64 row_set = as_array<I64>(row_set_h, "row_set", "int64");
  const I64 ids = as_array<I64>(set_ids_h, "set_ids", "int64");
  const I64 offs = as_array<I64>(set_offsets_h, "set_offsets", "int64");
  const size_t bs = runs.shape(0), width = runs.shape(1);
  if (lens.shape(0) != bs || max_new.shape(0) != bs || committed.shape(0) != bs || row_set.shape(0) != bs)
    throw nb::value_error(("stop_rows: " + std::to_string(bs) + " runs but lens / max_new / committed / row_set of " +
                           std::to_string(lens.shape(0)) + " / " + std::to_string(max_new.shape(0)) + " / " +
                           std::to_string(committed.shape(0)) + " / " + std::to_string(row_set.shape(0)) + " rows")
                              .c_str());
  const int64_t n_sets = int64_t(offs.shape(0)) - 1;
  if (n_sets < 0) throw nb::value_error("stop_rows: set_offsets needs at least one entry");
  for (int64_t s = 0; s < n_sets; ++s)
    if (offs.data()[s] < 0 || offs.data()[s] > offs.data()[s + 1] || offs.data()[s + 1] > int64_t(ids.shape(0)))
      throw nb::value_error(("stop_rows: set_offsets out of order or past set_ids at set " + std::to_string(s)).c_str());
  std::vector<int64_t> cut(bs), limit(bs);
  std::vector<uint8_t> stopped(bs, 0);
  const int64_t* r = runs.data();
  for (size_t b = 0; b < bs; ++b) {
    const int64_t n = lens.data()[b];
    if (n < 1 || size_t(n) > width)
      throw nb::value_error(("stop_rows: lens[" + std::to_string(b) + "]=" + std::to_string(n) + " is outside [1, " +
                             std::to_string(width) + "]").c_str());
    const int64_t left = max_new.data()[b] - committed.data()[b];
    const int64_t lim = std::max<int64_t>(1, std::min<int64_t>(n, left));
    limit[b] = lim;
    cut[b] = lim;
    const int64_t s = row_set.data()[b];
    if (lim >= left) stopped[b] = 1;  // (the length limit: committed + cut >= max_new)
    if (s < 0) continue;
    if (s >= n_sets)
      throw nb::value_error(("stop_rows: row_set[" + std::to_string(b) + "]=" + std::to_string(s) + " but " +
                             std::to_string(n_sets) + " sets").c_str());
    const int64_t* lo = ids.data() + offs.data()[s];
    const int64_t* hi = ids.data() + offs.data()[s + 1];
    const int64_t* row = r + b * width;
    for (int64_t k = 0; k < lim; ++k)
      if (std::find(lo, hi, row[k]) != hi) {
        cut[b] = k + 1;
        stopped[b] = 1;
        break;
      }
  }
  return nb::make_tuple(to_numpy_moved(std::move(cut)), to_numpy_moved(std::move(limit)),
                        to_bool_numpy_moved(std::move(stopped)));
}

// Where the ragged tree blocks go in the FlashInfer-form mask (sglang/tree_inputs.
// ragged_custom_mask): request b has verify_lens[b] rows of [seq_len prefix | tree
// columns]; entry (b, i, j) of its tree block lands at start_b + i * row_len_b + seq_len_b
// + j. Returns (index int64[sum vl^2], the mask's total length).
// With `tree` (the layout's flat bool tree blocks, sum vl^2 entries): only the positions
// of its False entries -- what a mask of ones needs cleared (one indexed store of False
// instead of a scatter of every tree entry with its value).
nb::tuple ragged_mask_index(nb::handle verify_lens_h, nb::handle seq_lens_h, nb::handle tree_h) {
  I64 vl = as_array<I64>(verify_lens_h, "verify_lens", "int64");
  I64 lens = as_array<I64>(seq_lens_h, "seq_lens", "int64");
  const size_t bs = vl.shape(0);
  if (lens.shape(0) != bs)
    throw nb::value_error(("ragged_mask_index: " + std::to_string(bs) + " verify_lens but " +
                           std::to_string(lens.shape(0)) + " seq_lens").c_str());
  size_t count = 0;
  for (size_t b = 0; b < bs; ++b) {
    if (vl(b) < 0 || lens(b) < 0)
      throw nb::value_error(("ragged_mask_index: negative verify_len or seq_len at row " + std::to_string(b)).c_str());
    count += size_t(vl(b) * vl(b));
  }
  const bool* tree = nullptr;
  Bools tree_arr;
  if (!tree_h.is_none()) {
    tree_arr = nd_arg<Bools>(tree_h, "tree", "a 1-D contiguous bool numpy array");
    if (tree_arr.shape(0) != count)
      throw nb::value_error(("ragged_mask_index: tree has " + std::to_string(tree_arr.shape(0)) +
                             " entries for " + std::to_string(count) + " tree-block entries").c_str());
    tree = tree_arr.data();
  }
  std::vector<int64_t> index;
  index.reserve(count);
  const int64_t length = mask_tree_positions(
      bs, [&](size_t b) { return vl(b); }, [&](size_t b) { return lens(b); },
      [&](size_t at) { return tree == nullptr || !tree[at]; }, [&](int64_t q) { index.push_back(q); });
  return nb::make_tuple(to_numpy_moved(std::move(index)), length);
}

using F64Matrix = nb::ndarray<const double, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

// The allocation kernels' inputs (allocation.h Curves), checked: shapes agree, every m_i
// in [0, width - 1] (numpy would index out of the curve), cost coefficients finite.
das::alloc::Curves curves_arg(nb::handle remaining_h, nb::handle acc_h, nb::handle m_h,
                              nb::handle kv_h, F64& remaining, F64Matrix& acc, I64& m, F64& kv) {
  remaining = as_array<F64>(remaining_h, "remaining", "float64");
  acc = nd_arg<F64Matrix>(acc_h, "acc", "a 2-D C-contiguous float64 numpy array");
  m = as_array<I64>(m_h, "m", "int64");
  kv = as_array<F64>(kv_h, "kv_tokens", "float64");
  const size_t rows = remaining.shape(0), width = acc.shape(1);
  if (acc.shape(0) != rows || m.shape(0) != rows || kv.shape(0) != rows)
    throw nb::value_error(("allocation: " + std::to_string(rows) + " remaining but acc has " +
                           std::to_string(acc.shape(0)) + " rows, m " + std::to_string(m.shape(0)) +
                           ", kv_tokens " + std::to_string(kv.shape(0))).c_str());
  if (rows > 0 && width == 0) throw nb::value_error("allocation: acc has no budget column");
  for (size_t i = 0; i < rows; ++i)
    if (m(i) < 0 || size_t(m(i)) >= width)
      throw nb::value_error(("allocation: invalid m[" + std::to_string(i) + "]=" + std::to_string(m(i)) +
                             ": must be in [0, " + std::to_string(width) + ")").c_str());
  return das::alloc::Curves{remaining.data(), acc.data(), m.data(), kv.data(), rows, width};
}

das::alloc::Cost cost_arg(double c_base, double c_tok, double c_kv) {
  const double v[3] = {c_base, c_tok, c_kv};
  const char* names[3] = {"c_base", "c_tok", "c_kv"};
  for (int k = 0; k < 3; ++k)
    if (!std::isfinite(v[k]))
      throw nb::value_error(("allocation: invalid " + std::string(names[k]) + "=" + std::to_string(v[k]) +
                             ": must be finite").c_str());
  return das::alloc::Cost{c_base, c_tok, c_kv};
}

nb::tuple allocation_tuple(das::alloc::Allocation& a) {
  return nb::make_tuple(to_numpy(a.budgets), a.width, a.modeled_s, a.baseline_s, a.makespan_steps);
}

nb::tuple best_per_row(nb::handle remaining_h, nb::handle acc_h, nb::handle m_h, nb::handle kv_h,
                       double c_base, double c_tok, double c_kv) {
  F64 remaining, kv;
  F64Matrix acc;
  I64 m;
  const das::alloc::Curves c = curves_arg(remaining_h, acc_h, m_h, kv_h, remaining, acc, m, kv);
  const das::alloc::Cost cost = cost_arg(c_base, c_tok, c_kv);
  das::alloc::Allocation a;
  {
    nb::gil_scoped_release release;
    a = das::alloc::best_per_row(c, cost);
  }
  return allocation_tuple(a);
}

nb::object lookahead_per_row(nb::handle remaining_h, nb::handle acc_h, nb::handle m_h, nb::handle kv_h,
                             double c_base, double c_tok, double c_kv, double spread, double free_tokens) {
  F64 remaining, kv;
  F64Matrix acc;
  I64 m;
  const das::alloc::Curves c = curves_arg(remaining_h, acc_h, m_h, kv_h, remaining, acc, m, kv);
  const das::alloc::Cost cost = cost_arg(c_base, c_tok, c_kv);
  if (!(free_tokens >= 0.0) || !std::isfinite(spread))
    throw nb::value_error(("allocation: invalid free_tokens=" + std::to_string(free_tokens) + " or spread=" +
                           std::to_string(spread) + ": must be >= 0 / finite").c_str());
  das::alloc::Allocation a;
  bool ok;
  {
    nb::gil_scoped_release release;
    ok = das::alloc::lookahead_per_row(c, cost, spread, free_tokens, a);
  }
  if (!ok) return nb::none();
  return allocation_tuple(a);
}

using F64Cube = nb::ndarray<const double, nb::ndim<3>, nb::c_contig, nb::device::cpu>;

// policy._ModelBased.inputs' online curves of flat drafts (allocation.h online_curves),
// every argument checked first (a bad one is named): (base, acc, bins, width), the
// matrices flat row-major (rows x width, rows x (width - 1)).
// online_curves' arguments (also online_plan's), every one checked (a bad one is named,
// prefixed with `fn`); m: the nodes read per row (n of them).
struct OnlineArgs {
  I64 offsets;
  F64 probs;
  Tokens depths;
  I64 states, match;
  F64 relative;
  I64 depth_bin, rank_bin;
  F64Cube table;
  das::alloc::OnlineInputs in{};
};

void online_args(OnlineArgs& a, const char* fn, nb::handle offsets_h, nb::handle probs_h, nb::handle depths_h,
                 const int64_t* m, size_t n, nb::handle table_h, nb::handle states_h, nb::handle match_h,
                 nb::handle relative_h, nb::handle depth_bin_h, nb::handle rank_bin_h, int64_t max_budget) {
  a.offsets = as_array<I64>(offsets_h, "offsets", "int64");
  a.probs = as_array<F64>(probs_h, "probs", "float64");
  a.depths = as_array<Tokens>(depths_h, "depths", "int32");
  a.states = as_array<I64>(states_h, "states", "int64");
  a.match = as_array<I64>(match_h, "match", "int64");
  a.relative = as_array<F64>(relative_h, "relative", "float64");
  a.depth_bin = as_array<I64>(depth_bin_h, "depth_bin", "int64");
  a.rank_bin = as_array<I64>(rank_bin_h, "rank_bin", "int64");
  a.table = nd_arg<F64Cube>(table_h, "table", "a 3-D C-contiguous float64 numpy array");
  auto bad = [fn](const std::string& what) { throw nb::value_error((std::string(fn) + ": " + what).c_str()); };
  const I64& offsets = a.offsets;
  const I64& states = a.states;
  const I64& match = a.match;
  if (offsets.shape(0) != n + 1 || states.shape(0) != n || match.shape(0) != n || a.relative.shape(0) != n)
    bad(std::to_string(n) + " rows (m) but offsets has " + std::to_string(offsets.shape(0)) + " entries, states " +
        std::to_string(states.shape(0)) + ", match " + std::to_string(match.shape(0)) + ", relative " +
        std::to_string(a.relative.shape(0)));
  if (a.probs.shape(0) != a.depths.shape(0) || offsets(0) != 0 || size_t(offsets(n)) != a.probs.shape(0))
    bad("offsets must run from 0 to the node count (" + std::to_string(a.probs.shape(0)) + " probs, " +
        std::to_string(a.depths.shape(0)) + " depths)");
  const size_t S = a.table.shape(0), M = a.table.shape(1), B = a.table.shape(2);
  if (B == 0) bad("table has no rank bin");
  if (max_budget < 0 || a.depth_bin.shape(0) <= size_t(max_budget))
    bad("invalid max_budget=" + std::to_string(max_budget) + " for " + std::to_string(a.depth_bin.shape(0)) +
        " depth bins");
  int64_t top = 0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t len = offsets(i + 1) - offsets(i);
    if (len < 0) bad("offsets decrease at row " + std::to_string(i));
    if (m[i] < 0 || m[i] > len)
      bad("invalid m[" + std::to_string(i) + "]=" + std::to_string(m[i]) + ": must be in [0, " + std::to_string(len) + "]");
    if (states(i) < 0 || size_t(states(i)) >= S || match(i) < 0 || size_t(match(i)) >= M)
      bad("row " + std::to_string(i) + ": state " + std::to_string(states(i)) + " / match bin " +
          std::to_string(match(i)) + " outside the table (" + std::to_string(S) + " x " + std::to_string(M) + ")");
    top = std::max(top, m[i]);
  }
  if (a.rank_bin.shape(0) < size_t(top))
    bad(std::to_string(a.rank_bin.shape(0)) + " rank bins for " + std::to_string(top) + " ranks");
  for (size_t i = 0; i < n; ++i) {  // the depths read (each row's first min(len, width - 1))
    const size_t k = std::min<size_t>(size_t(offsets(i + 1) - offsets(i)), size_t(top));
    for (size_t r = 0; r < k; ++r)
      if (a.depths(size_t(offsets(i)) + r) < 0)
        bad("row " + std::to_string(i) + " node " + std::to_string(r) + " has depth " +
            std::to_string(a.depths(size_t(offsets(i)) + r)));
  }
  for (size_t q = 0; q < a.depth_bin.shape(0); ++q)
    if (a.depth_bin(q) < 0) bad("negative depth bin at " + std::to_string(q));
  for (size_t q = 0; q < size_t(top); ++q)
    if (a.rank_bin(q) < 0) bad("negative rank bin at " + std::to_string(q));
  a.in = das::alloc::OnlineInputs{offsets.data(), a.probs.data(), a.depths.data(), m, n, a.table.data(),
                                  S, M, B, states.data(), match.data(), a.relative.data(), a.depth_bin.data(),
                                  a.rank_bin.data(), max_budget};
}

nb::tuple online_curves(nb::handle offsets_h, nb::handle probs_h, nb::handle depths_h, nb::handle m_h,
                        nb::handle table_h, nb::handle states_h, nb::handle match_h, nb::handle relative_h,
                        nb::handle depth_bin_h, nb::handle rank_bin_h, int64_t max_budget) {
  const I64 m = as_array<I64>(m_h, "m", "int64");
  OnlineArgs a;
  online_args(a, "online_curves", offsets_h, probs_h, depths_h, m.data(), m.shape(0), table_h, states_h, match_h,
              relative_h, depth_bin_h, rank_bin_h, max_budget);
  das::alloc::OnlineCurves out;
  {
    nb::gil_scoped_release release;
    das::alloc::online_curves(a.in, out);
  }
  return nb::make_tuple(to_numpy_moved(std::move(out.base)), to_numpy_moved(std::move(out.acc)),
                        to_numpy_moved(std::move(out.bins)), out.width);
}

// online_plan's budgets from its allocation (no GIL): none unless the plan saves min_gain
// (LengthAware.plan's rule), then _probe's probe drafts (per-row widths): the rows `due`
// (empty: no probing) without a budget and with nodes get min(probe_budget, m) while
// probe_spent + their modelled seconds stay within probe_limit. Returns those seconds.
double final_budgets(const das::alloc::Allocation& alloc, const int64_t* m, size_t n, double min_gain,
                     const std::function<bool(size_t)>& due, int64_t probe_budget, double c_tok, double probe_spent,
                     double probe_limit, std::vector<int32_t>& budgets) {
  budgets = alloc.budgets;
  if (alloc.width == 0 || alloc.modeled_s > (1.0 - min_gain) * alloc.baseline_s)
    std::fill(budgets.begin(), budgets.end(), 0);
  if (!due) return 0.0;
  std::vector<int32_t> probe(n, 0);
  int64_t tokens = 0;
  bool any = false;
  for (size_t i = 0; i < n; ++i)
    if (due(i) && budgets[i] == 0 && m[i] > 0) {
      any = true;
      probe[i] = int32_t(std::min<int64_t>(probe_budget, m[i]));
      tokens += probe[i];
    }
  if (!any) return 0.0;
  const double probe_s = c_tok * double(tokens);
  if (probe_spent + probe_s > probe_limit) return 0.0;
  for (size_t i = 0; i < n; ++i) budgets[i] = std::max(budgets[i], probe[i]);
  return probe_s;
}

// policy.LengthAware.plan for flat rows with online curves and the marginal lookahead
// (per-row widths) in one call: each row's usable nodes m (min(nodes, max_budget,
// max_new - generated - 1), at least 0), online_curves, lookahead_per_row, the min_gain
// rule (no speculation unless the plan saves that share) and _probe's probe drafts
// (rows `due` without a budget and with nodes get min(probe_budget, m) while
// probe_spent + their modeled seconds <= probe_limit). The same arrays and numbers as
// those steps in Python and numpy (tests/test_policy_online.py), without the Python
// between them (~35 numpy calls, cold on every step). None where lookahead_per_row
// defers to numpy (a NaN or a non-positive value): the caller plans the unfused way.
// Returns (base, acc, bins, width, m, alloc budgets int32, alloc width, modeled_s,
// baseline_s, makespan_steps, budgets int32, probe_s).
nb::object online_plan(nb::handle offsets_h, nb::handle probs_h, nb::handle depths_h, nb::handle table_h,
                       nb::handle states_h, nb::handle match_h, nb::handle relative_h, nb::handle depth_bin_h,
                       nb::handle rank_bin_h, int64_t max_budget, nb::handle generated_h, nb::handle max_new_h,
                       nb::handle remaining_h, nb::handle kv_h, double c_base, double c_tok, double c_kv,
                       double spread, double free_tokens, double min_gain, int64_t probe_budget, nb::handle due_h,
                       double probe_spent, double probe_limit) {
  const I64 generated = as_array<I64>(generated_h, "generated", "int64");
  const I64 max_new = as_array<I64>(max_new_h, "max_new", "int64");
  const I64 offsets = as_array<I64>(offsets_h, "offsets", "int64");
  const size_t n = generated.shape(0);
  if (max_new.shape(0) != n || offsets.shape(0) != n + 1)
    throw nb::value_error(("online_plan: " + std::to_string(n) + " rows (generated) but max_new has " +
                           std::to_string(max_new.shape(0)) + ", offsets " + std::to_string(offsets.shape(0)) +
                           " entries").c_str());
  if (max_budget < 0) throw nb::value_error(("online_plan: invalid max_budget=" + std::to_string(max_budget)).c_str());
  std::vector<int64_t> m(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t found = offsets(i + 1) - offsets(i);
    m[i] = std::min(std::min(found, max_budget), std::max<int64_t>(max_new(i) - generated(i) - 1, 0));
  }
  OnlineArgs a;
  online_args(a, "online_plan", offsets_h, probs_h, depths_h, m.data(), n, table_h, states_h, match_h, relative_h,
              depth_bin_h, rank_bin_h, max_budget);
  const F64 remaining = as_array<F64>(remaining_h, "remaining", "float64");
  const F64 kv = as_array<F64>(kv_h, "kv_tokens", "float64");
  if (remaining.shape(0) != n || kv.shape(0) != n)
    throw nb::value_error(("online_plan: " + std::to_string(n) + " rows but remaining has " +
                           std::to_string(remaining.shape(0)) + ", kv_tokens " + std::to_string(kv.shape(0))).c_str());
  const das::alloc::Cost cost = cost_arg(c_base, c_tok, c_kv);
  if (!(free_tokens >= 0.0) || !std::isfinite(spread))
    throw nb::value_error(("online_plan: invalid free_tokens=" + std::to_string(free_tokens) + " or spread=" +
                           std::to_string(spread) + ": must be >= 0 / finite").c_str());
  Bools due;
  const bool probing = probe_budget > 0;
  if (probing) {
    due = nd_arg<Bools>(due_h, "due", "a 1-D contiguous bool numpy array");
    if (due.shape(0) != n)
      throw nb::value_error(("online_plan: " + std::to_string(n) + " rows but due has " +
                             std::to_string(due.shape(0))).c_str());
  }
  das::alloc::OnlineCurves curves;
  das::alloc::Allocation alloc;
  std::vector<int32_t> budgets;
  double probe_s = 0.0;
  bool ok;
  {
    nb::gil_scoped_release release;
    das::alloc::online_curves(a.in, curves);
    const das::alloc::Curves c{remaining.data(), curves.acc.data(), m.data(), kv.data(), n, curves.width};
    ok = das::alloc::lookahead_per_row(c, cost, spread, free_tokens, alloc);
    if (ok) {
      const std::function<bool(size_t)> is_due =
          probing ? std::function<bool(size_t)>([&](size_t i) { return bool(due(i)); }) : std::function<bool(size_t)>();
      probe_s = final_budgets(alloc, m.data(), n, min_gain, is_due, probe_budget, c_tok, probe_spent, probe_limit,
                              budgets);
    }
  }
  if (!ok) return nb::none();
  const size_t w = curves.width;
  auto as_i32 = [](std::vector<int32_t>&& v) { return to_numpy_moved(std::move(v)); };
  return nb::make_tuple(to_numpy_moved(std::move(curves.base)), to_numpy_moved(std::move(curves.acc)),
                        to_numpy_moved(std::move(curves.bins)), w, to_numpy_moved(std::move(m)),
                        as_i32(std::move(alloc.budgets)), alloc.width, alloc.modeled_s, alloc.baseline_s,
                        alloc.makespan_steps, as_i32(std::move(budgets)), probe_s);
}

using F64Cells = nb::ndarray<double, nb::ndim<4>, nb::c_contig, nb::device::cpu>;
using I64Matrix = nb::ndarray<const int64_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

// The online calibration's cells and the previous plan's pending arrays (online_add,
// online_update), checked for shape and dtype (a bad one is named, prefixed with `fn`).
struct OnlinePending {
  F64Cells cells;
  I64 pend_generated, pend_match, bin_before, bin_size;
  F64Matrix nodes;
  I64Matrix bins;
  size_t planned = 0, w = 0, S = 0, M = 0, B = 0;
};

OnlinePending online_pending_args(const std::string& fn, nb::handle cells_h, nb::handle pend_generated_h,
                                  nb::handle pend_match_h, nb::handle pend_nodes_h, nb::handle pend_bins_h,
                                  nb::handle bin_before_h, nb::handle bin_size_h) {
  constexpr const char* kCells =
      "a writable 4-D C-contiguous float64 numpy array (states x match bins x depth bins x 2)";
  OnlinePending a;
  a.cells = nd_arg<F64Cells>(cells_h, "cells", kCells);
  if (a.cells.shape(3) != 2)
    throw nb::value_error((std::string("invalid cells: expected ") + kCells + ", got " + describe(cells_h)).c_str());
  a.pend_generated = as_array<I64>(pend_generated_h, "pend_generated", "int64");
  a.pend_match = as_array<I64>(pend_match_h, "pend_match", "int64");
  a.bin_before = as_array<I64>(bin_before_h, "bin_before", "int64");
  a.bin_size = as_array<I64>(bin_size_h, "bin_size", "int64");
  a.nodes = nd_arg<F64Matrix>(pend_nodes_h, "pend_nodes", "a 2-D C-contiguous float64 numpy array");
  a.bins = nd_arg<I64Matrix>(pend_bins_h, "pend_bins", "a 2-D C-contiguous int64 numpy array");
  a.planned = a.pend_generated.shape(0);
  a.w = a.nodes.shape(1);
  a.S = a.cells.shape(0);
  a.M = a.cells.shape(1);
  a.B = a.cells.shape(2);
  auto bad = [&fn](const std::string& what) { throw nb::value_error((fn + ": " + what).c_str()); };
  if (a.pend_match.shape(0) != a.planned || a.nodes.shape(0) != a.planned || a.bins.shape(0) != a.planned ||
      a.bins.shape(1) != a.w)
    bad(std::to_string(a.planned) + " planned rows (pend_generated) but pend_match has " +
        std::to_string(a.pend_match.shape(0)) + ", pend_nodes " + std::to_string(a.nodes.shape(0)) + " x " +
        std::to_string(a.w) + ", pend_bins " + std::to_string(a.bins.shape(0)) + " x " +
        std::to_string(a.bins.shape(1)));
  if (a.bin_before.shape(0) != a.B || a.bin_size.shape(0) != a.B)
    bad(std::to_string(a.B) + " depth bins in cells but bin_before has " + std::to_string(a.bin_before.shape(0)) +
        ", bin_size " + std::to_string(a.bin_size.shape(0)));
  return a;
}

// Planned row p's match bin and node depth bins are inside the cells (else raises, naming them).
void check_planned_row(const OnlinePending& a, size_t p, const std::string& fn) {
  auto bad = [&fn](const std::string& what) { throw nb::value_error((fn + ": " + what).c_str()); };
  if (a.pend_match(p) < 0 || size_t(a.pend_match(p)) >= a.M)
    bad("planned row " + std::to_string(p) + ": match bin " + std::to_string(a.pend_match(p)) +
        " outside the cells (" + std::to_string(a.M) + " match bins)");
  for (size_t j = 0; j < a.w; ++j)
    if (a.bins(p, j) < 0 || size_t(a.bins(p, j)) >= a.B)
      bad("planned row " + std::to_string(p) + " node " + std::to_string(j) + " has depth bin " +
          std::to_string(a.bins(p, j)) + ": must be in [0, " + std::to_string(a.B) + ")");
}

das::alloc::OnlineOutcomes online_outcomes(OnlinePending& a, const I64& generated, const int64_t* pos,
                                           const int64_t* budget, const I64& states) {
  return das::alloc::OnlineOutcomes{a.cells.data(), a.S, a.M, a.B, generated.data(), pos, budget, states.data(),
                                    generated.shape(0), a.pend_generated.data(), a.pend_match.data(),
                                    a.nodes.data(), a.bins.data(), a.w, a.bin_before.data(), a.bin_size.data()};
}

// online_acceptance.OnlineCalibration._add's arithmetic (allocation.h online_add): the
// cells updated in place, every argument checked first (a bad one is named, nothing
// changes); returns each row's next outcome state (int64).
nb::object online_add(nb::handle cells_h, nb::handle generated_h, nb::handle pos_h, nb::handle budget_h,
                      nb::handle states_h, nb::handle pend_generated_h, nb::handle pend_match_h,
                      nb::handle pend_nodes_h, nb::handle pend_bins_h, nb::handle bin_before_h,
                      nb::handle bin_size_h) {
  OnlinePending a = online_pending_args("online_add", cells_h, pend_generated_h, pend_match_h, pend_nodes_h,
                                        pend_bins_h, bin_before_h, bin_size_h);
  const I64 generated = as_array<I64>(generated_h, "generated", "int64");
  const I64 pos = as_array<I64>(pos_h, "pos", "int64");
  const I64 budget = as_array<I64>(budget_h, "budget", "int64");
  const I64 states = as_array<I64>(states_h, "states", "int64");
  auto bad = [](const std::string& what) { throw nb::value_error(("online_add: " + what).c_str()); };
  const size_t n = generated.shape(0);
  if (pos.shape(0) != n || budget.shape(0) != n || states.shape(0) != n)
    bad(std::to_string(n) + " rows (generated) but pos has " + std::to_string(pos.shape(0)) + ", budget " +
        std::to_string(budget.shape(0)) + ", states " + std::to_string(states.shape(0)));
  for (size_t i = 0; i < n; ++i) {
    if (pos(i) < 0 || size_t(pos(i)) >= a.planned)
      bad("invalid pos[" + std::to_string(i) + "]=" + std::to_string(pos(i)) + ": must be in [0, " +
          std::to_string(a.planned) + ")");
    if (budget(i) < 0) bad("invalid budget[" + std::to_string(i) + "]=" + std::to_string(budget(i)));
    if (states(i) < 0 || size_t(states(i)) >= a.S)
      bad("row " + std::to_string(i) + ": state " + std::to_string(states(i)) + " outside the cells (" +
          std::to_string(a.S) + " states)");
    check_planned_row(a, size_t(pos(i)), "online_add");
  }
  const das::alloc::OnlineOutcomes in = online_outcomes(a, generated, pos.data(), budget.data(), states);
  std::vector<int64_t> out(n);
  {
    nb::gil_scoped_release release;
    das::alloc::online_add(in, out.data());
  }
  return nb::cast(to_numpy_moved(std::move(out)));
}

// online_acceptance.OnlineCalibration.table (allocation.h online_table): a new
// states x match bins x depth bins float64 array.
nb::object online_table(nb::handle cells_h, double w, double prior) {
  using F64Cube4 = nb::ndarray<const double, nb::ndim<4>, nb::c_contig, nb::device::cpu>;
  constexpr const char* kCells = "a 4-D C-contiguous float64 numpy array (states x match bins x depth bins x 2)";
  const F64Cube4 cells = nd_arg<F64Cube4>(cells_h, "cells", kCells);
  if (cells.shape(3) != 2)
    throw nb::value_error((std::string("invalid cells: expected ") + kCells + ", got " + describe(cells_h)).c_str());
  const size_t S = cells.shape(0), M = cells.shape(1), B = cells.shape(2);
  double* data = new double[std::max<size_t>(1, S * M * B)];
  nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<double*>(p); });
  das::alloc::online_table(cells.data(), S, M, B, w, prior, data);
  return nb::cast(nb::ndarray<nb::numpy, double, nb::ndim<3>>(data, {S, M, B}, owner));
}

// online_acceptance.OnlineCalibration.update's arithmetic for a batch (allocation.h
// online_update): the cells decayed and the previous plan's outcomes added in place, every
// argument checked first (a bad one is named, nothing changes); returns (each row's state
// after it, int64; how many rows had an outcome). at: each row's planned row (-1: none), or
// None when the rows are the planned rows in order.
nb::tuple online_update(nb::handle cells_h, double decay, nb::handle at_h, nb::handle generated_h,
                        nb::handle states_h, nb::handle pend_budget_h, nb::handle pend_generated_h,
                        nb::handle pend_match_h, nb::handle pend_nodes_h, nb::handle pend_bins_h,
                        nb::handle bin_before_h, nb::handle bin_size_h) {
  OnlinePending a = online_pending_args("online_update", cells_h, pend_generated_h, pend_match_h, pend_nodes_h,
                                        pend_bins_h, bin_before_h, bin_size_h);
  const I64 generated = as_array<I64>(generated_h, "generated", "int64");
  const I64 states = as_array<I64>(states_h, "states", "int64");
  const I64 pend_budget = as_array<I64>(pend_budget_h, "pend_budget", "int64");
  auto bad = [](const std::string& what) { throw nb::value_error(("online_update: " + what).c_str()); };
  const size_t n = generated.shape(0), planned = a.planned;
  I64 at;
  const bool has_at = !at_h.is_none();
  if (has_at) at = as_array<I64>(at_h, "at", "int64");
  if (states.shape(0) != n || (has_at && at.shape(0) != n))
    bad(std::to_string(n) + " rows (generated) but states has " + std::to_string(states.shape(0)) +
        (has_at ? ", at " + std::to_string(at.shape(0)) : std::string()));
  if (!has_at && n > planned)
    bad(std::to_string(n) + " rows read as the planned rows, but only " + std::to_string(planned) + " were planned");
  if (pend_budget.shape(0) != planned)
    bad(std::to_string(planned) + " planned rows (pend_generated) but pend_budget has " +
        std::to_string(pend_budget.shape(0)));
  if (!(decay > 0.0 && decay <= 1.0)) bad("invalid decay=" + std::to_string(decay) + ": must be in (0, 1]");
  for (size_t i = 0; i < n; ++i) {
    const int64_t p = has_at ? at(i) : int64_t(i);
    if (p < -1 || p >= int64_t(planned))
      bad("invalid at[" + std::to_string(i) + "]=" + std::to_string(p) + ": must be in [-1, " +
          std::to_string(planned) + ")");
    if (states(i) < 0 || size_t(states(i)) >= a.S)
      bad("row " + std::to_string(i) + ": state " + std::to_string(states(i)) + " outside the cells (" +
          std::to_string(a.S) + " states)");
    if (p >= 0 && pend_budget(size_t(p)) > 0) check_planned_row(a, size_t(p), "online_update");
  }
  const das::alloc::OnlineOutcomes in = online_outcomes(a, generated, nullptr, nullptr, states);
  std::vector<int64_t> out(n);
  size_t added;
  {
    nb::gil_scoped_release release;
    added = das::alloc::online_update(in, decay, has_at ? at.data() : nullptr, pend_budget.data(), planned, n,
                                      out.data());
  }
  return nb::make_tuple(to_numpy_moved(std::move(out)), added);
}

// length_predictor._LengthQueries.predict_many's group queries (allocation.h
// length_remaining), every argument checked first: (remaining float64, class int64).
nb::tuple length_remaining(nb::handle g_h, nb::handle cap_h, nb::handle c0_h, nb::handle present_h,
                           nb::handle sorted_h, nb::handle sorted_off_h, nb::handle suffix_h,
                           nb::handle suffix_off_h, double tail_factor) {
  const F64 g = as_array<F64>(g_h, "g", "float64");
  const F64 cap = as_array<F64>(cap_h, "cap", "float64");
  const I64 c0 = as_array<I64>(c0_h, "c0", "int64");
  const I64 present = as_array<I64>(present_h, "present", "int64");
  const F64 sorted = as_array<F64>(sorted_h, "sorted", "float64");
  const I64 sorted_off = as_array<I64>(sorted_off_h, "sorted_off", "int64");
  const F64 suffix = as_array<F64>(suffix_h, "suffix", "float64");
  const I64 suffix_off = as_array<I64>(suffix_off_h, "suffix_off", "int64");
  auto bad = [](const std::string& what) { throw nb::value_error(("length_remaining: " + what).c_str()); };
  const size_t n = g.shape(0);
  if (cap.shape(0) != n || c0.shape(0) != n)
    bad(std::to_string(n) + " rows (g) but cap has " + std::to_string(cap.shape(0)) + ", c0 " +
        std::to_string(c0.shape(0)));
  if (present.shape(0) != 4 || sorted_off.shape(0) != 13 || suffix_off.shape(0) != 13)
    bad("expected 4 group flags and 13 block offsets, got " + std::to_string(present.shape(0)) + ", " +
        std::to_string(sorted_off.shape(0)) + ", " + std::to_string(suffix_off.shape(0)));
  if (sorted_off(0) != 0 || suffix_off(0) != 0 || size_t(sorted_off(12)) != sorted.shape(0) ||
      size_t(suffix_off(12)) != suffix.shape(0))
    bad("block offsets must run from 0 to the array lengths");
  for (size_t b = 0; b < 12; ++b) {
    const int64_t len = sorted_off(b + 1) - sorted_off(b);
    if (len < 0 || suffix_off(b + 1) - suffix_off(b) != len + 1)
      bad("block " + std::to_string(b) + ": " + std::to_string(len) + " lengths need " + std::to_string(len + 1) +
          " suffix sums, got " + std::to_string(suffix_off(b + 1) - suffix_off(b)));
  }
  if (!(std::isfinite(tail_factor))) bad("invalid tail_factor=" + std::to_string(tail_factor));
  const das::alloc::LengthGroups groups{present.data(), sorted.data(), sorted_off.data(), suffix.data(),
                                        suffix_off.data()};
  std::vector<double> remaining(n);
  std::vector<int64_t> cls(n);
  {
    nb::gil_scoped_release release;
    das::alloc::length_remaining(groups, g.data(), cap.data(), c0.data(), n, tail_factor, remaining.data(),
                                 cls.data());
  }
  return nb::make_tuple(to_numpy_moved(std::move(remaining)), to_numpy_moved(std::move(cls)));
}

// length_predictor.LengthPredictor's incremental index (length_index.h): arguments checked
// here, every error a ValueError naming the bad value.
using das::lengths::LengthIndex;

void length_index_build(LengthIndex& self, nb::handle problems_h, nb::handle lengths_h, int64_t n_problems) {
  const I64 problems = as_array<I64>(problems_h, "problems", "int64");
  const I64 lengths = as_array<I64>(lengths_h, "lengths", "int64");
  if (problems.shape(0) != lengths.shape(0))
    throw nb::value_error(("LengthIndex.build: " + std::to_string(problems.shape(0)) + " problem indices but " +
                           std::to_string(lengths.shape(0)) + " lengths").c_str());
  if (n_problems < 0) throw nb::value_error(("invalid n_problems=" + std::to_string(n_problems)).c_str());
  try {
    self.build(problems.data(), lengths.data(), problems.shape(0), size_t(n_problems));
  } catch (const std::invalid_argument& e) {
    throw nb::value_error((std::string("LengthIndex.build: ") + e.what()).c_str());
  }
}

void length_index_remove(LengthIndex& self, nb::handle problems_h, nb::handle lengths_h) {
  const I64 problems = as_array<I64>(problems_h, "problems", "int64");
  const I64 lengths = as_array<I64>(lengths_h, "lengths", "int64");
  if (problems.shape(0) != lengths.shape(0))
    throw nb::value_error(("LengthIndex.remove: " + std::to_string(problems.shape(0)) + " problem indices but " +
                           std::to_string(lengths.shape(0)) + " lengths").c_str());
  try {
    self.remove(problems.data(), lengths.data(), problems.shape(0));
  } catch (const std::invalid_argument& e) {
    throw nb::value_error((std::string("LengthIndex.remove: ") + e.what()).c_str());
  }
}

void length_index_renumber(LengthIndex& self, nb::handle remap_h, int64_t n_problems) {
  const I64 remap = as_array<I64>(remap_h, "remap", "int64");
  if (n_problems < 0) throw nb::value_error(("invalid n_problems=" + std::to_string(n_problems)).c_str());
  try {
    self.renumber(remap.data(), remap.shape(0), size_t(n_problems));
  } catch (const std::invalid_argument& e) {
    throw nb::value_error((std::string("LengthIndex.renumber: ") + e.what()).c_str());
  }
}

nb::tuple length_index_query(LengthIndex& self, nb::handle g_h, nb::handle cap_h, nb::handle problems_h,
                             double tail_factor) {
  const F64 g = as_array<F64>(g_h, "g", "float64");
  const F64 cap = as_array<F64>(cap_h, "cap", "float64");
  const I64 problems = as_array<I64>(problems_h, "problems", "int64");
  const size_t n = g.shape(0);
  if (cap.shape(0) != n || problems.shape(0) != n)
    throw nb::value_error(("LengthIndex.query: " + std::to_string(n) + " rows (g) but cap has " +
                           std::to_string(cap.shape(0)) + ", problems " + std::to_string(problems.shape(0)))
                              .c_str());
  if (!std::isfinite(tail_factor)) throw nb::value_error(("invalid tail_factor=" + std::to_string(tail_factor)).c_str());
  if (!self.num_lengths()) throw nb::value_error("LengthIndex.query: no lengths (no thresholds to classify by)");
  std::vector<double> remaining(n);
  std::vector<int64_t> cls(n), c0(n);
  self.query(g.data(), cap.data(), problems.data(), n, tail_factor, remaining.data(), cls.data(), c0.data());
  return nb::make_tuple(to_numpy_moved(std::move(remaining)), to_numpy_moved(std::move(cls)),
                        to_numpy_moved(std::move(c0)));
}

// PlanAhead (defined before ExtendDraftWork): the policy's inputs, copied and checked here
// (a bad one is named, as online_update / online_plan name theirs).
PlanAhead* make_plan_ahead(nb::handle cells_h, double decay, nb::handle generated_h, nb::handle states_h,
                           nb::handle pend_budget_h, nb::handle pend_generated_h, nb::handle pend_match_h,
                           nb::handle pend_nodes_h, nb::handle pend_bins_h, nb::handle bin_before_h,
                           nb::handle bin_size_h, double table_w, double table_prior, nb::handle depth_bin_h,
                           nb::handle rank_bin_h, int64_t max_budget, nb::handle match_lut_h, nb::handle sums_h,
                           nb::handle slots_h, double cal_w, double cal_wp, double cal_prior, nb::handle lengths_h,
                           nb::handle problem_rows_h, double tail_factor, nb::handle max_new_h,
                           nb::handle prompt_len_h, double c_base, double c_tok, double c_kv, double spread,
                           double free_tokens, double min_gain, int64_t probe_budget, nb::handle due_h,
                           double probe_spent, double probe_limit) {
  const char* fn = "plan_ahead";
  auto bad = [fn](const std::string& what) { throw nb::value_error((std::string(fn) + ": " + what).c_str()); };
  OnlinePending p = online_pending_args(fn, cells_h, pend_generated_h, pend_match_h, pend_nodes_h, pend_bins_h,
                                        bin_before_h, bin_size_h);
  const I64 generated = as_array<I64>(generated_h, "generated", "int64");
  const I64 states = as_array<I64>(states_h, "states", "int64");
  const I64 pend_budget = as_array<I64>(pend_budget_h, "pend_budget", "int64");
  const size_t n = generated.shape(0);
  if (states.shape(0) != n) bad(std::to_string(n) + " rows (generated) but states has " + std::to_string(states.shape(0)));
  if (n > p.planned)
    bad(std::to_string(n) + " rows read as the planned rows, but only " + std::to_string(p.planned) + " were planned");
  if (pend_budget.shape(0) != p.planned)
    bad(std::to_string(p.planned) + " planned rows (pend_generated) but pend_budget has " +
        std::to_string(pend_budget.shape(0)));
  if (!(decay > 0.0 && decay <= 1.0)) bad("invalid decay=" + std::to_string(decay) + ": must be in (0, 1]");
  for (size_t i = 0; i < n; ++i) {
    if (states(i) < 0 || size_t(states(i)) >= p.S)
      bad("row " + std::to_string(i) + ": state " + std::to_string(states(i)) + " outside the cells (" +
          std::to_string(p.S) + " states)");
    if (pend_budget(i) > 0) check_planned_row(p, i, fn);
  }
  const I64 depth_bin = as_array<I64>(depth_bin_h, "depth_bin", "int64");
  const I64 rank_bin = as_array<I64>(rank_bin_h, "rank_bin", "int64");
  const I64 match_lut = as_array<I64>(match_lut_h, "match_lut", "int64");
  if (max_budget < 0 || depth_bin.shape(0) <= size_t(max_budget))
    bad("invalid max_budget=" + std::to_string(max_budget) + " for " + std::to_string(depth_bin.shape(0)) +
        " depth bins");
  for (size_t q = 0; q < depth_bin.shape(0); ++q)
    if (depth_bin(q) < 0) bad("negative depth bin at " + std::to_string(q));
  for (size_t q = 0; q < rank_bin.shape(0); ++q)
    if (rank_bin(q) < 0) bad("negative rank bin at " + std::to_string(q));
  if (match_lut.shape(0) == 0) bad("empty match_lut");
  for (size_t q = 0; q < match_lut.shape(0); ++q)
    if (match_lut(q) < 0 || size_t(match_lut(q)) >= p.M)
      bad("match_lut[" + std::to_string(q) + "]=" + std::to_string(match_lut(q)) + " outside the cells (" +
          std::to_string(p.M) + " match bins)");
  const F64Matrix sums = nd_arg<F64Matrix>(sums_h, "sums", "a 2-D C-contiguous float64 numpy array");
  const I64 slots = as_array<I64>(slots_h, "slots", "int64");
  const I64 problem_rows = as_array<I64>(problem_rows_h, "problem_rows", "int64");
  const I64 max_new = as_array<I64>(max_new_h, "max_new", "int64");
  const I64 prompt_len = as_array<I64>(prompt_len_h, "prompt_len", "int64");
  if (slots.shape(0) != n || problem_rows.shape(0) != n || max_new.shape(0) != n || prompt_len.shape(0) != n)
    bad(std::to_string(n) + " rows (generated) but slots has " + std::to_string(slots.shape(0)) + ", problem_rows " +
        std::to_string(problem_rows.shape(0)) + ", max_new " + std::to_string(max_new.shape(0)) + ", prompt_len " +
        std::to_string(prompt_len.shape(0)));
  if (sums.shape(1) < 2) bad("sums needs 2 columns (matched, expected)");
  if (!std::isfinite(tail_factor)) bad("invalid tail_factor=" + std::to_string(tail_factor));
  cost_arg(c_base, c_tok, c_kv);  // (checks them)
  if (!(free_tokens >= 0.0) || !std::isfinite(spread))
    bad("invalid free_tokens=" + std::to_string(free_tokens) + " or spread=" + std::to_string(spread) +
        ": must be >= 0 / finite");
  LengthIndex* lengths = nb::cast<LengthIndex*>(lengths_h);
  if (!lengths->num_lengths()) bad("the length index has no lengths (no thresholds to classify by)");

  auto a = std::make_unique<PlanAhead>();
  a->cells.assign(p.cells.data(), p.cells.data() + p.S * p.M * p.B * 2);
  a->S = p.S, a->M = p.M, a->B = p.B, a->decay = decay;
  a->generated = copy_of(generated);
  a->states = copy_of(states);
  a->pend_budget = copy_of(pend_budget);
  a->pend_generated = copy_of(p.pend_generated);
  a->pend_match = copy_of(p.pend_match);
  a->pend_nodes.assign(p.nodes.data(), p.nodes.data() + p.planned * p.w);
  a->pend_bins.assign(p.bins.data(), p.bins.data() + p.planned * p.w);
  a->bin_before = copy_of(p.bin_before);
  a->bin_size = copy_of(p.bin_size);
  a->planned = p.planned, a->pend_w = p.w;
  a->table_w = table_w, a->table_prior = table_prior;
  a->depth_bin = copy_of(depth_bin);
  a->rank_bin = copy_of(rank_bin);
  a->match_lut = copy_of(match_lut);
  a->max_budget = max_budget;
  a->sum_matched.assign(n, 0.0);
  a->sum_expected.assign(n, 0.0);
  a->known.assign(n, 0);
  for (size_t i = 0; i < n; ++i) {
    const int64_t q = slots(i);
    if (q < -1 || q >= int64_t(sums.shape(0)))
      bad("invalid slots[" + std::to_string(i) + "]=" + std::to_string(q) + ": must be in [-1, " +
          std::to_string(sums.shape(0)) + ")");
    if (q >= 0) a->known[i] = 1, a->sum_matched[i] = sums(size_t(q), 0), a->sum_expected[i] = sums(size_t(q), 1);
  }
  a->cal_w = cal_w, a->cal_wp = cal_wp, a->cal_prior = cal_prior;
  a->lengths = lengths;
  a->keep_lengths = nb::borrow(lengths_h);
  a->problem_rows = copy_of(problem_rows);
  a->max_new = copy_of(max_new);
  a->prompt_len = copy_of(prompt_len);
  a->tail_factor = tail_factor;
  a->c_base = c_base, a->c_tok = c_tok, a->c_kv = c_kv, a->spread = spread, a->free_tokens = free_tokens;
  a->min_gain = min_gain, a->probe_budget = probe_budget;
  if (probe_budget > 0) {
    const auto due = nd_arg<Bools>(due_h, "due", "a 1-D contiguous bool numpy array");
    if (due.shape(0) != n) bad(std::to_string(n) + " rows but due has " + std::to_string(due.shape(0)));
    a->due.assign(n, 0);
    for (size_t i = 0; i < n; ++i) a->due[i] = due(i) ? 1 : 0;
  }
  a->probe_spent = probe_spent, a->probe_limit = probe_limit;
  return a.release();
}

// What plan_ahead's calls give for the job's drafts d (without the GIL, never throws: an
// error leaves `ran` false, its message in `error`). Each step is the function the policy's
// Python calls for it (OnlineCalibration.update / table, AcceptanceTracker.calibration_rows'
// arithmetic, LengthPredictor.predict_many, _draft_free_inputs' KV tokens, online_plan).
void run_plan_ahead(PlanAhead& a, const FlatDrafts& d) noexcept {
  try {
    const size_t n = a.generated.size();
    if (d.offsets.size() != n + 1 || d.match.size() != n) {
      a.error = "the drafts have " + std::to_string(d.match.size()) + " rows, the plan " + std::to_string(n);
      return;
    }
    // OnlineCalibration._update_native (the planned rows again, in order: no row map)
    const das::alloc::OnlineOutcomes in{a.cells.data(), a.S, a.M, a.B, a.generated.data(), nullptr, nullptr,
                                        a.states.data(), n, a.pend_generated.data(), a.pend_match.data(),
                                        a.pend_nodes.data(), a.pend_bins.data(), a.pend_w, a.bin_before.data(),
                                        a.bin_size.data()};
    a.new_states.assign(n, 0);
    a.added = das::alloc::online_update(in, a.decay, nullptr, a.pend_budget.data(), a.planned, n,
                                        a.new_states.data());
    a.table.assign(std::max<size_t>(1, a.S * a.M * a.B), 0.0);
    das::alloc::online_table(a.cells.data(), a.S, a.M, a.B, a.table_w, a.table_prior, a.table.data());
    // calibration_rows: (w * prior + matched) / (w + expected), the prior for unknown problems;
    // relative to the pooled factor (calibration(GLOBAL), which is the prior)
    a.calibration.assign(n, 0.0);
    a.relative.assign(n, 0.0);
    for (size_t i = 0; i < n; ++i) {
      a.calibration[i] = a.known[i] ? (a.cal_wp + a.sum_matched[i]) / (a.cal_w + a.sum_expected[i]) : a.cal_prior;
      a.relative[i] = a.calibration[i] / a.cal_prior;
    }
    // predict_many (g = max(generated, 0), cap = max(1, max_new - g)), then the KV tokens
    std::vector<double> g(n), cap(n);
    for (size_t i = 0; i < n; ++i) {
      g[i] = std::max(double(a.generated[i]), 0.0);
      cap[i] = std::max(1.0, double(a.max_new[i]) - g[i]);
    }
    a.remaining.assign(n, 0.0);
    std::vector<int64_t> cls(n), c0(n);
    a.lengths->query(g.data(), cap.data(), a.problem_rows.data(), n, a.tail_factor, a.remaining.data(), cls.data(),
                     c0.data());
    a.kv.assign(n, 0.0);
    for (size_t i = 0; i < n; ++i) {
      a.kv[i] = double(a.prompt_len[i]) + double(a.generated[i]);
      a.kv[i] += 0.5 * a.remaining[i];  // (exact product: the same double as numpy's two steps)
    }
    // online_plan: usable nodes, match bins (match_bin's table, clipped), the curves' checks
    a.m.assign(n, 0);
    a.match.assign(n, 0);
    int64_t top = 0;
    const int64_t lut_last = int64_t(a.match_lut.size()) - 1;
    for (size_t i = 0; i < n; ++i) {
      const int64_t found = d.offsets[i + 1] - d.offsets[i];
      a.m[i] = std::min(std::min(found, a.max_budget), std::max<int64_t>(a.max_new[i] - a.generated[i] - 1, 0));
      a.match[i] = a.match_lut[size_t(std::min<int64_t>(std::max<int64_t>(d.match[i], 0), lut_last))];
      top = std::max(top, a.m[i]);
    }
    for (size_t i = 0; i < n; ++i) {  // (the depths the curves read: each row's first min(len, top))
      const int64_t k = std::min<int64_t>(d.offsets[i + 1] - d.offsets[i], top);
      for (int64_t r = 0; r < k; ++r)
        if (d.depths[size_t(d.offsets[i] + r)] < 0) {
          a.error = "row " + std::to_string(i) + " has a negative node depth";
          return;
        }
    }
    if (a.rank_bin.size() < size_t(top)) {
      a.error = std::to_string(a.rank_bin.size()) + " rank bins for " + std::to_string(top) + " ranks";
      return;
    }
    const das::alloc::OnlineInputs oi{d.offsets.data(), d.probs.data(), d.depths.data(), a.m.data(), n,
                                      a.table.data(), a.S, a.M, a.B, a.new_states.data(), a.match.data(),
                                      a.relative.data(), a.depth_bin.data(), a.rank_bin.data(), a.max_budget};
    das::alloc::online_curves(oi, a.curves);
    const das::alloc::Curves c{a.remaining.data(), a.curves.acc.data(), a.m.data(), a.kv.data(), n, a.curves.width};
    const das::alloc::Cost cost{a.c_base, a.c_tok, a.c_kv};
    a.planned_ok = das::alloc::lookahead_per_row(c, cost, a.spread, a.free_tokens, a.alloc);
    if (a.planned_ok)  // (online_plan's min-gain rule and probe drafts)
      a.probe_s = final_budgets(a.alloc, a.m.data(), n, a.min_gain,
                                a.probe_budget > 0 ? std::function<bool(size_t)>([&](size_t i) { return a.due[i] != 0; })
                                                   : std::function<bool(size_t)>(),
                                a.probe_budget, a.c_tok, a.probe_spent, a.probe_limit, a.budgets);
    if (a.planned_ok && a.cut_cap >= 0 && a.budgets.size() == n) {  // (draft_select's cut, rows in order)
      std::vector<int64_t> src(n), keep(n);
      for (size_t i = 0; i < n; ++i) {
        src[i] = int64_t(i);
        keep[i] = std::min(d.offsets[i + 1] - d.offsets[i],
                           std::max<int64_t>(std::min<int64_t>(a.budgets[i], a.cut_cap), 0));
      }
      select_rows(d.offsets.data(), d.tokens.data(), d.parents.data(), d.probs.data(), d.depths.data(),
                  d.match.data(), src, std::move(keep), a.cut);
      a.cut_ok = true;
    }
    a.ran.store(true);
  } catch (const std::exception& e) {
    a.error = e.what();
  } catch (...) {
    a.error = "unknown error";
  }
}

// PlanAhead.result(): None if the job did not run it (or it stopped: `error` says why), else
// (cells, states, rows added, table, calibration, relative, remaining, kv, plan) with plan
// online_plan's tuple (None where lookahead_per_row declined). Once.
nb::object plan_ahead_result(PlanAhead& a) {
  if (!a.ran.load()) return nb::none();
  a.ran.store(false);  // (the vectors are handed over: once)
  nb::object plan = nb::none();
  if (a.planned_ok) {
    const size_t w = a.curves.width;
    plan = nb::make_tuple(to_numpy_moved(std::move(a.curves.base)), to_numpy_moved(std::move(a.curves.acc)),
                          to_numpy_moved(std::move(a.curves.bins)), w, to_numpy(a.m),
                          to_numpy_moved(std::move(a.alloc.budgets)), a.alloc.width, a.alloc.modeled_s,
                          a.alloc.baseline_s, a.alloc.makespan_steps, to_numpy_moved(std::move(a.budgets)),
                          a.probe_s);
  }
  const size_t S = a.S, M = a.M, B = a.B;
  double* cells = new double[std::max<size_t>(1, S * M * B * 2)];
  std::copy(a.cells.begin(), a.cells.end(), cells);
  nb::capsule owner(cells, [](void* q) noexcept { delete[] static_cast<double*>(q); });
  double* table = new double[std::max<size_t>(1, S * M * B)];
  std::copy(a.table.begin(), a.table.end(), table);
  nb::capsule towner(table, [](void* q) noexcept { delete[] static_cast<double*>(q); });
  return nb::make_tuple(nb::ndarray<nb::numpy, double, nb::ndim<4>>(cells, {S, M, B, 2}, owner),
                        to_numpy_moved(std::move(a.new_states)), a.added,
                        nb::ndarray<nb::numpy, double, nb::ndim<3>>(table, {S, M, B}, towner),
                        to_numpy_moved(std::move(a.calibration)), to_numpy_moved(std::move(a.relative)),
                        to_numpy_moved(std::move(a.remaining)), to_numpy_moved(std::move(a.kv)), plan);
}

// PlanAhead.cut(): the job's trees cut at cut_at's cap (tokens, parents, probs, depths, offsets,
// match, lens, width), or None (not asked, or not planned). Once; apart from result(), so a
// plan that does not use it (its rows changed) converts nothing.
nb::object plan_ahead_cut(PlanAhead& a) {
  if (!a.cut_ok) return nb::none();
  a.cut_ok = false;
  return selected_tuple(a.cut);
}

// PlanAhead.launch(rows, generated, skipped): what a plan of these rows that takes the job's
// plan gives, read without handing anything over (result() and cut() stay for that plan,
// made after the launch): the job's cut trees of the rows (rows[q] >= 0: the job's row
// rows[q]; -1 a new row, empty; None: the job's rows themselves) as (tokens, parents, probs,
// depths, offsets, match, lens, width), and the widest budget the plan gives them (a new
// row none). None if the job did not plan or cut, or where that plan would not take the
// job's: the job's rows whose generated counts (int64, given for rows None) are not the
// job's, or rows of which none is kept or a kept one is ``skipped`` (bool per job row: the
// rows the job took for finishing).
nb::object plan_ahead_launch(PlanAhead& a, nb::handle rows_h, nb::handle generated_h, nb::handle skipped_h) {
  if (!a.ran.load() || !a.planned_ok || !a.cut_ok) return nb::none();
  const size_t old = a.cut.lens.size();
  if (a.budgets.size() != old || a.cut.out.offsets.size() != old + 1) return nb::none();
  std::vector<int64_t> src;
  if (rows_h.is_none()) {
    if (!generated_h.is_none()) {
      const I64 g = as_array<I64>(generated_h, "generated", "int64");
      if (g.shape(0) != a.generated.size() || !std::equal(g.data(), g.data() + g.shape(0), a.generated.begin()))
        return nb::none();
    }
    src.resize(old);
    for (size_t i = 0; i < old; ++i) src[i] = int64_t(i);
  } else {
    const I64 rows = as_array<I64>(rows_h, "rows", "int64");
    src.assign(rows.data(), rows.data() + rows.shape(0));
    for (size_t q = 0; q < src.size(); ++q)
      if (src[q] < -1 || src[q] >= int64_t(old))
        throw nb::value_error(("PlanAhead.launch: row " + std::to_string(src[q]) + " of " +
                               std::to_string(old)).c_str());
    Bools skipped;
    const bool has_skipped = !skipped_h.is_none();
    if (has_skipped) {
      skipped = nd_arg<Bools>(skipped_h, "skipped", "a 1-D contiguous bool numpy array");
      if (skipped.shape(0) != old)
        throw nb::value_error(("PlanAhead.launch: skipped has " + std::to_string(skipped.shape(0)) + " rows, the job " +
                               std::to_string(old)).c_str());
    }
    bool any_kept = false;
    for (int64_t j : src) {
      if (j < 0) continue;
      any_kept = true;
      if (has_skipped && skipped(size_t(j))) return nb::none();
    }
    if (!any_kept) return nb::none();
  }
  std::vector<int64_t> lens(src.size(), 0);
  int64_t widest_budget = 0;
  for (size_t q = 0; q < src.size(); ++q) {
    if (src[q] < 0) continue;
    lens[q] = a.cut.lens[size_t(src[q])];
    widest_budget = std::max<int64_t>(widest_budget, a.budgets[size_t(src[q])]);
  }
  SelectedRows s;
  const FlatDrafts& c = a.cut.out;
  select_rows(c.offsets.data(), c.tokens.data(), c.parents.data(), c.probs.data(), c.depths.data(),
              c.match.data(), src, std::move(lens), s);
  return nb::make_tuple(selected_tuple(s), widest_budget);
}

// Every index's SuffixIndex.version, in list order (uint64): one call for a batch's rows;
// a None item (a placeholder row, no index) reads 0.
nb::object index_versions(nb::list indices) {
  const size_t n = nb::len(indices);
  std::vector<uint64_t> out(n);
  for (size_t r = 0; r < n; ++r) {
    if (indices[r].is_none()) {
      out[r] = 0;
      continue;
    }
    const SuffixIndex* s;
    if (!nb::try_cast<const SuffixIndex*>(indices[r], s) || s == nullptr)
      throw nb::value_error(("index_versions: item " + std::to_string(r) + " is not a SuffixIndex").c_str());
    out[r] = s->version();
  }
  return nb::cast(to_numpy_moved(std::move(out)));
}

// row_map(prev, new): for each item of ``new``, the index of its LAST equal item in
// ``prev`` (-1: none), and whether ``new`` holds each item once -- what
// ``dict(zip(prev, range(len(prev))))`` and ``len(set(new)) == len(new)`` give, in one C pass
// (Python's hash and ==; a str caches its hash). The per-step parts that keep per-row
// arrays for the latest rows gather them through it when a start or a finish changed the
// rows, instead of looking every row up in a dict again.
class ItemTable {
 public:
  explicit ItemTable(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n + 1) cap <<= 1;
    mask_ = cap - 1;
    slots_.assign(cap, Slot{nullptr, 0, -1});
  }
  // index stored for an item equal to ``item`` (-1: none); ``put`` stores ``at`` for it
  // (overwriting an equal item's); returns the index it held before (-1: none).
  int64_t find_or_put(PyObject* item, Py_hash_t h, int64_t at, bool put, bool identity = false) {
    size_t i = size_t(h) & mask_;
    while (true) {
      Slot& s = slots_[i];
      if (s.at < 0) {
        if (put) s = Slot{item, h, at};
        return -1;
      }
      if (s.hash == h) {
        int eq = s.item == item ? 1 : identity ? 0 : PyObject_RichCompareBool(s.item, item, Py_EQ);
        if (eq < 0) throw nb::python_error();
        if (eq) {
          int64_t was = s.at;
          if (put) s.at = at;
          return was;
        }
      }
      i = (i + 1) & mask_;
    }
  }

 private:
  struct Slot {
    PyObject* item;
    Py_hash_t hash;
    int64_t at;
  };
  std::vector<Slot> slots_;
  size_t mask_;
};

// identity: items are equal only if they are the same object, hashed by their address
// (no item is read: for objects that hash and compare by identity anyway, such as
// SGLang's Req, the map touches only the lists -- each Req's header was a cold read).
static inline Py_hash_t address_hash(PyObject* o) {
  const uint64_t a = reinterpret_cast<uintptr_t>(o) >> 4;
  return static_cast<Py_hash_t>((a * 0x9E3779B97F4A7C15ull) >> 1);
}

// row_map by identity over two lists: one compact table keyed by address (no hash stored:
// an address hashes in a multiply) holding, per item, its last index in ``prev`` and
// whether ``now`` has it already -- a quarter of the two general tables' memory, which the
// call cleared on every finish step (~25 us of a 512-row map in bench_host_path, cold).
// ``fresh``: also the rows of ``now`` absent from ``prev`` (what the caller took with
// numpy's nonzero, ~14 us cold).
static nb::tuple row_map_identity(PyObject** pi, Py_ssize_t np_, PyObject** ni, Py_ssize_t nn, bool fresh) {
  struct Slot {
    PyObject* item;
    int32_t at;    // last index in prev (-1: none)
    int32_t seen;  // 1 once `now` has it
  };
  size_t cap = 16;
  while (cap < 2 * size_t(np_ + nn) + 1) cap <<= 1;
  const size_t mask = cap - 1;
  std::vector<Slot> slots(cap, Slot{nullptr, -1, 0});
  auto find = [&](PyObject* o) -> Slot& {
    size_t i = size_t(address_hash(o)) & mask;
    while (slots[i].item != nullptr && slots[i].item != o) i = (i + 1) & mask;
    return slots[i];
  };
  for (Py_ssize_t i = 0; i < np_; ++i) {
    Slot& s = find(pi[i]);
    s.item = pi[i];
    s.at = int32_t(i);
  }
  std::vector<int64_t> at(static_cast<size_t>(nn));
  std::vector<int64_t> new_rows;
  bool unique = true;
  for (Py_ssize_t i = 0; i < nn; ++i) {
    Slot& s = find(ni[i]);
    s.item = ni[i];
    at[size_t(i)] = s.at;
    if (s.seen) unique = false;
    s.seen = 1;
    if (fresh && s.at < 0) new_rows.push_back(int64_t(i));
  }
  if (fresh)
    return nb::make_tuple(to_numpy_moved(std::move(at)), unique, to_numpy_moved(std::move(new_rows)));
  return nb::make_tuple(to_numpy_moved(std::move(at)), unique);
}

nb::tuple row_map(nb::handle prev, nb::handle now, bool identity, bool fresh) {
  if (fresh && !identity) throw nb::value_error("row_map: fresh=True is for identity=True maps");
  if (identity && PyList_CheckExact(prev.ptr()) && PyList_CheckExact(now.ptr()) &&
      PyList_GET_SIZE(prev.ptr()) < INT32_MAX && PyList_GET_SIZE(now.ptr()) < INT32_MAX)
    return row_map_identity(PySequence_Fast_ITEMS(prev.ptr()), PyList_GET_SIZE(prev.ptr()),
                            PySequence_Fast_ITEMS(now.ptr()), PyList_GET_SIZE(now.ptr()), fresh);
  // Tuples (a list is copied, ~1 us at 512 rows): the items stay alive and in place even
  // if an item's __eq__ changes the caller's list while the tables hold borrowed pointers.
  // By identity no Python code runs during the passes (no __hash__, no __eq__), so lists
  // are read in place: a copy would write every item's reference count -- a cold line of
  // each of the 2 x 512 Req objects a finish step maps (~25 us of the call's ~30).
  nb::object pf, nf;
  if (identity && PyList_CheckExact(prev.ptr())) pf = nb::borrow(prev);
  else pf = nb::steal(PySequence_Tuple(prev.ptr()));
  if (!pf.is_valid()) throw nb::python_error();
  if (identity && PyList_CheckExact(now.ptr())) nf = nb::borrow(now);
  else nf = nb::steal(PySequence_Tuple(now.ptr()));
  if (!nf.is_valid()) throw nb::python_error();
  const Py_ssize_t np_ = PySequence_Fast_GET_SIZE(pf.ptr()), nn = PySequence_Fast_GET_SIZE(nf.ptr());
  PyObject** pi = PySequence_Fast_ITEMS(pf.ptr());
  PyObject** ni = PySequence_Fast_ITEMS(nf.ptr());
  ItemTable old{static_cast<size_t>(np_)}, seen{static_cast<size_t>(nn)};
  for (Py_ssize_t i = 0; i < np_; ++i) {
    Py_hash_t h = identity ? address_hash(pi[i]) : PyObject_Hash(pi[i]);
    if (h == -1 && PyErr_Occurred()) throw nb::python_error();
    old.find_or_put(pi[i], h, i, true, identity);
  }
  std::vector<int64_t> at(static_cast<size_t>(nn));
  std::vector<int64_t> new_rows;
  bool unique = true;
  for (Py_ssize_t i = 0; i < nn; ++i) {
    Py_hash_t h = identity ? address_hash(ni[i]) : PyObject_Hash(ni[i]);
    if (h == -1 && PyErr_Occurred()) throw nb::python_error();
    at[size_t(i)] = old.find_or_put(ni[i], h, 0, false, identity);
    if (unique && seen.find_or_put(ni[i], h, i, true, identity) >= 0) unique = false;
    if (fresh && at[size_t(i)] < 0) new_rows.push_back(int64_t(i));
  }
  if (fresh)
    return nb::make_tuple(to_numpy_moved(std::move(at)), unique, to_numpy_moved(std::move(new_rows)));
  return nb::make_tuple(to_numpy_moved(std::move(at)), unique);
}

// gather_list(src, at, fill): [src[j] if j >= 0 else fill for j in at], in one C pass.
nb::list gather_list(nb::handle src, nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> at,
                     nb::handle fill) {
  nb::object sf = nb::steal(PySequence_Fast(src.ptr(), "gather_list: src must be a sequence"));
  if (!sf.is_valid()) throw nb::python_error();
  const Py_ssize_t ns = PySequence_Fast_GET_SIZE(sf.ptr());
  PyObject** si = PySequence_Fast_ITEMS(sf.ptr());
  const size_t n = at.shape(0);
  const int64_t* a = at.data();
  for (size_t i = 0; i < n; ++i)
    if (a[i] >= ns)
      throw nb::value_error(("gather_list: at[" + std::to_string(i) + "]=" + std::to_string(a[i]) +
                             " is out of range for " + std::to_string(ns) + " items").c_str());
  PyObject* out = PyList_New(Py_ssize_t(n));
  if (out == nullptr) throw nb::python_error();
  for (size_t i = 0; i < n; ++i) {
    PyObject* item = a[i] >= 0 ? si[a[i]] : fill.ptr();
    Py_INCREF(item);
    PyList_SET_ITEM(out, Py_ssize_t(i), item);
  }
  return nb::steal<nb::list>(out);
}

// ahead_rows(at, old_generated, generated, skipped): a plan adopting the feedback job's
// results for the rows it kept (policy.py _ModelBased._adopt_kept), from the row map `at`
// (each row's row in the job's batch, -1: a new row) in one pass: (ok: some row kept, every
// kept row's generated count the job's and none of them `skipped` (bool per old row, or
// None), src: max(at, 0), fresh: the rows at -1, left: the job's rows no row maps to).
// Until this version ~10 numpy calls, ~70 us cold at 512 rows.
nb::tuple ahead_rows(nb::handle at_h, nb::handle old_h, nb::handle gen_h, nb::handle skipped_h) {
  I64 at = as_array<I64>(at_h, "at", "int64");
  I64 old_generated = as_array<I64>(old_h, "old_generated", "int64");
  I64 generated = as_array<I64>(gen_h, "generated", "int64");
  const size_t n = at.shape(0), n_old = old_generated.shape(0);
  if (generated.shape(0) != n)
    throw nb::value_error(("ahead_rows: " + std::to_string(n) + " rows in at but " +
                           std::to_string(generated.shape(0)) + " generated counts").c_str());
  const bool* skipped = nullptr;
  Bools skipped_arr;
  if (!skipped_h.is_none()) {
    skipped_arr = nd_arg<Bools>(skipped_h, "skipped", "a 1-D contiguous bool numpy array");
    if (skipped_arr.shape(0) != n_old)
      throw nb::value_error(("ahead_rows: skipped has " + std::to_string(skipped_arr.shape(0)) + " rows for " +
                             std::to_string(n_old) + " old rows").c_str());
    skipped = skipped_arr.data();
  }
  std::vector<int64_t> src(n), fresh, left;
  std::vector<uint8_t> stays(n_old, 0);
  bool any = false, same = true;
  for (size_t i = 0; i < n; ++i) {
    const int64_t j = at(i);
    if (j < -1 || j >= int64_t(n_old))
      throw nb::value_error(("ahead_rows: at[" + std::to_string(i) + "]=" + std::to_string(j) +
                             " is out of range for " + std::to_string(n_old) + " rows").c_str());
    if (j < 0) {
      src[i] = 0;
      fresh.push_back(int64_t(i));
      continue;
    }
    src[i] = j;
    any = true;
    stays[size_t(j)] = 1;
    if (old_generated(size_t(j)) != generated(i) || (skipped != nullptr && skipped[j])) same = false;
  }
  for (size_t j = 0; j < n_old; ++j)
    if (!stays[j]) left.push_back(int64_t(j));
  return nb::make_tuple(any && same, to_numpy_moved(std::move(src)), to_numpy_moved(std::move(fresh)),
                        to_numpy_moved(std::move(left)));
}

// clip_budgets(budgets, cap): the drafter's per-row budgets (SuffixDrafter._budget_array) as
// int32, each at most cap, in one pass: (-1, the array) for none negative, else (the first
// negative row, None) so the caller names it. Until this version ~5 numpy calls, ~25 us
// cold at 512 rows, twice on a step with finishes (the plan, the feedback's pre-draft).
nb::tuple clip_budgets(nb::handle budgets_h, int64_t cap) {
  I64 b = as_array<I64>(budgets_h, "budgets", "int64");
  const size_t n = b.shape(0);
  std::vector<int32_t> out(n);
  const int64_t c = std::max<int64_t>(0, std::min<int64_t>(cap, INT32_MAX));
  for (size_t i = 0; i < n; ++i) {
    const int64_t x = b(i);
    if (x < 0) return nb::make_tuple(int64_t(i), nb::none());
    out[i] = int32_t(x < c ? x : c);
  }
  return nb::make_tuple(int64_t(-1), to_numpy_moved(std::move(out)));
}

// int32_tokens' buffers: a 1-D C-contiguous buffer of signed 32- or 64-bit ints in native
// byte order -- SGLang's array("q") of a request's output ids, an int64 numpy array -- in
// [0, 2**31) as an int32 array, in one pass (as_tokens' numpy path: asarray, min, max,
// astype, ~30 us cold per finished request at 512 rows in bench_host_path); None for any
// other object or an id out of range (the numpy path then converts it or names the value).
template <class T>
nb::object int32_checked(const T* p, size_t n) {
  std::vector<int32_t> out(n);
  for (size_t i = 0; i < n; ++i) {
    if (p[i] < 0 || p[i] > T(INT32_MAX)) return nb::none();
    out[i] = static_cast<int32_t>(p[i]);
  }
  return nb::cast(to_numpy_moved(std::move(out)));
}

nb::object int32_from_buffer(nb::handle obj) {
  if (!PyObject_CheckBuffer(obj.ptr())) return nb::none();
  Py_buffer view;
  if (PyObject_GetBuffer(obj.ptr(), &view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) != 0) {
    PyErr_Clear();
    return nb::none();
  }
  struct Release {
    Py_buffer* v;
    ~Release() { PyBuffer_Release(v); }
  } release{&view};
  if (view.ndim != 1 || view.format == nullptr) return nb::none();
  std::string fmt(view.format);
  if (!fmt.empty() && (fmt[0] == '@' || fmt[0] == '=' || fmt[0] == '<')) fmt = fmt.substr(1);  // (native, little-endian host)
  if (fmt.size() != 1 || std::string("qli").find(fmt[0]) == std::string::npos) return nb::none();
  const size_t n = size_t(view.shape != nullptr ? view.shape[0] : view.len / view.itemsize);
  if (view.itemsize == 8) return int32_checked(static_cast<const int64_t*>(view.buf), n);
  if (view.itemsize == 4) return int32_checked(static_cast<const int32_t*>(view.buf), n);
  return nb::none();
}

// int32_tokens(seq): a list / tuple of Python ints in [0, 2**31) as an int32 array, in one
// C pass (as_tokens' per-request conversion of SGLang's token lists: np.asarray + min + max
// + astype was ~15 us for 256 tokens); None when any item is not such an int (a bool, a
// numpy scalar, out of range): the caller's numpy path then converts it or names the bad
// value. A buffer of ints (array("q"), an int64 numpy array): int32_from_buffer.
nb::object int32_tokens(nb::handle seq) {
  if (!PyList_Check(seq.ptr()) && !PyTuple_Check(seq.ptr())) return int32_from_buffer(seq);
  nb::object f = nb::steal(PySequence_Fast(seq.ptr(), "int32_tokens: not a sequence"));
  if (!f.is_valid()) throw nb::python_error();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(f.ptr());
  PyObject** items = PySequence_Fast_ITEMS(f.ptr());
  std::vector<int32_t> out(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* o = items[i];
    if (!PyLong_CheckExact(o)) return nb::none();
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow || v < 0 || v > INT32_MAX) return nb::none();
    out[static_cast<size_t>(i)] = static_cast<int32_t>(v);
  }
  return nb::cast(to_numpy_moved(std::move(out)));
}

// add_sequence / extend of at least this many tokens drop the GIL (below it the release
// and re-take would cost more than the insertion).
constexpr size_t kGilFreeTokens = 32;

}  // namespace

NB_MODULE(_suffix, m) {
  m.attr("MAX_STEPS") = das::kSlots;
  nb::class_<SuffixIndex>(m, "SuffixIndex")
      .def(nb::init<int>(), nb::arg("max_depth") = 64)
      .def_prop_ro("max_depth", &SuffixIndex::max_depth)
      .def(
          "add_sequence",
          [](SuffixIndex& s, int64_t seq_id, nb::handle tokens, int64_t step) {
            Tokens t = tokens_arg(tokens, "tokens");
            // A prompt or a finished rollout: ~50 ns per token per suffix depth. Run on
            // the session's update thread, GIL-free above a few tokens so the scheduler
            // thread's Python is not held up (errors still raise: the GIL is re-taken as
            // the exception leaves this scope). `t` keeps the array alive meanwhile.
            if (t.shape(0) >= kGilFreeTokens) {
              nb::gil_scoped_release release;
              s.add_sequence(seq_id, t.data(), t.shape(0), step);
            } else {
              s.add_sequence(seq_id, t.data(), t.shape(0), step);
            }
          },
          nb::arg("seq_id"), nb::arg("tokens"), nb::arg("step"))
      .def(
          "extend",
          [](SuffixIndex& s, int64_t seq_id, nb::handle tokens) {
            Tokens t = tokens_arg(tokens, "tokens");
            if (t.shape(0) >= kGilFreeTokens) {  // (as add_sequence)
              nb::gil_scoped_release release;
              s.extend(seq_id, t.data(), t.shape(0));
            } else {
              s.extend(seq_id, t.data(), t.shape(0));
            }
          },
          nb::arg("seq_id"), nb::arg("tokens"))
      .def(
          "append",  // one token, no array: the per-decode-step path
          [](SuffixIndex& s, int64_t seq_id, int32_t token) { s.extend(seq_id, &token, 1); },
          nb::arg("seq_id"), nb::arg("token"))
      .def(
          "remove_sequence",  // GIL-free: history eviction runs on the session's update thread
          [](SuffixIndex& s, int64_t seq_id) {
            if (!s.has_sequence(seq_id)) s.remove_sequence(seq_id);  // throws, naming seq_id
            nb::gil_scoped_release release;
            s.remove_sequence(seq_id);
          },
          nb::arg("seq_id"))
      .def(
          "remove_sequences",  // many removals in one GIL-free call (history eviction)
          [](SuffixIndex& s, nb::handle ids_h) {
            I64 ids = as_array<I64>(ids_h, "seq_ids", "int64");
            for (size_t i = 0; i < ids.shape(0); ++i)
              if (!s.has_sequence(ids(i))) s.remove_sequence(ids(i));  // throws, naming it
            nb::gil_scoped_release release;
            for (size_t i = 0; i < ids.shape(0); ++i) s.remove_sequence(ids(i));
          },
          nb::arg("seq_ids"))
      .def(
          "match_length",
          [](const SuffixIndex& s, nb::handle ctx) {
            Tokens t = tokens_arg(ctx, "context");
            return s.match_length(t.data(), t.shape(0));
          },
          nb::arg("context"))
      .def(
          "draft",
          [](const SuffixIndex& s, nb::handle ctx, int budget, double min_prob,
             nb::dict step_weights, bool chain, int max_match_len, nb::handle mix) {
            Tokens t = tokens_arg(ctx, "context");
            DraftParams p = params(s, budget, min_prob, step_weights, chain, max_match_len);
            set_mix(p, mix);
            Draft d;
            s.draft(t.data(), t.shape(0), p, d);
            return draft_tuple(d);
          },
          nb::arg("context"), nb::arg("budget"), nb::arg("min_prob"), nb::arg("step_weights"),
          nb::arg("chain"), nb::arg("max_match_len"), nb::arg("mix") = nb::none())
      .def(
          "draft_for_sequence",
          [](const SuffixIndex& s, int64_t seq_id, int budget, double min_prob,
             nb::dict step_weights, bool chain, int max_match_len, nb::handle mix,
             nb::handle shared, double shared_weight, int shared_min_match) {
            DraftParams p = params(s, budget, min_prob, step_weights, chain, max_match_len);
            set_mix(p, mix);
            if (!shared.is_none()) {  // the shared index's slot weights from the same table
              const StepTable t(step_weights);
              set_shared(p, shared, shared_weight, t.steps.data(), t.weights.data(), t.steps.size(),
                         shared_min_match);
            }
            // The batch path's cache stages (draft_range), for this one row: its cursor
            // nodes requested, then every anchor's children list walked round-robin, so
            // their misses overlap instead of coming one after another in the draft.
            // Hints only: the draft is the same without them.
            const SuffixIndex* sh = p.mixed_shared(&s);
            const uint32_t st = s.prefetch_sequence(seq_id);
            const uint32_t st2 = sh != nullptr ? sh->prefetch_sequence(seq_id) : das::kNil;
            if (st != das::kNil) {
              s.prefetch_cursor_nodes(st, p.max_match_len);
              if (sh != nullptr) sh->prefetch_cursor_nodes(st2, p.max_match_len);
              thread_local std::vector<SuffixIndex::ListHead> heads;
              s.draft_lists(st, p, heads);
              if (sh != nullptr) sh->draft_lists(st2, p, heads, true);
              SuffixIndex::walk_lists(heads);
            }
            Draft d;
            s.draft_for_sequence(seq_id, p, d);
            return draft_tuple(d);
          },
          nb::arg("seq_id"), nb::arg("budget"), nb::arg("min_prob"), nb::arg("step_weights"),
          nb::arg("chain"), nb::arg("max_match_len"), nb::arg("mix") = nb::none(),
          nb::arg("shared") = nb::none(), nb::arg("shared_weight") = 0.0,
          nb::arg("shared_min_match") = 1)
      .def_prop_ro("num_nodes", &SuffixIndex::num_nodes)
      .def_prop_ro("num_sequences", &SuffixIndex::num_sequences)
      .def_prop_ro("num_tokens", &SuffixIndex::num_tokens)
      .def_prop_ro("num_orphans", &SuffixIndex::num_orphans)
      .def_prop_ro("version", &SuffixIndex::version)
      .def("memory_bytes", &SuffixIndex::memory_bytes)
      .def("check_integrity", &SuffixIndex::check_integrity)
      .def("steps", &SuffixIndex::steps)
      .def("has_sequence", &SuffixIndex::has_sequence, nb::arg("seq_id"))
      .def("sequence_step", &SuffixIndex::sequence_step, nb::arg("seq_id"))
      .def("sequence_ids", &SuffixIndex::sequence_ids)
      .def(
          "sequence_tokens",
          [](const SuffixIndex& s, int64_t seq_id) { return to_numpy(s.sequence_tokens(seq_id)); },
          nb::arg("seq_id"));
  m.def("draft_batch", &draft_batch, nb::arg("indices"), nb::arg("seq_ids"), nb::arg("budgets"),
        nb::arg("min_prob"), nb::arg("steps"), nb::arg("weights"), nb::arg("chain"),
        nb::arg("max_match_len"), nb::arg("mix") = nb::none(), nb::arg("shared") = nb::none(),
        nb::arg("shared_weight") = 0.0, nb::arg("shared_min_match") = 1,
        "Draft for many (index, seq_id, budget) rows in one call; returns (tokens, parents, "
        "probs, offsets int64[n+1], match_lens int32[n]).");
  m.def("draft_rows", &draft_rows, nb::arg("indices"), nb::arg("seq_ids"), nb::arg("budgets"),
        nb::arg("min_prob"), nb::arg("steps"), nb::arg("weights"), nb::arg("chain"),
        nb::arg("max_match_len"), nb::arg("mix") = nb::none(), nb::arg("threads") = 1,
        nb::arg("shared") = nb::none(), nb::arg("shared_weight") = 0.0, nb::arg("shared_min_match") = 1,
        "draft_batch plus node depths, rows split over `threads` threads (same result); "
        "returns (tokens, parents, probs, depths int32, offsets int64[n+1], match_lens int32[n]).");
  nb::class_<PendingExtendDraft>(m, "PendingExtendDraft")
      .def("wait", &PendingExtendDraft::wait,
           "Take part in what is left of the work (this thread drafts too, without the GIL), join "
           "the workers; returns extend_draft_rows' tuple (raises its error).");
  m.def(
      "extend_draft_rows_start",
      [](nb::list indices, nb::handle seq_ids, nb::handle tokens, nb::handle offsets, nb::handle budgets,
         double min_prob, nb::handle steps, nb::handle weights, bool chain, int max_match_len,
         nb::handle mix, int threads, int extend_threads, nb::handle shared, double shared_weight,
         int shared_min_match, nb::handle unshare, nb::handle ahead) {
        return new PendingExtendDraft(indices, seq_ids, tokens, offsets, budgets, min_prob, steps, weights,
                                      chain, max_match_len, mix, threads, extend_threads, shared,
                                      shared_weight, shared_min_match, unshare, ahead);
      },
      nb::arg("indices"), nb::arg("seq_ids"), nb::arg("tokens"), nb::arg("offsets"), nb::arg("budgets"),
      nb::arg("min_prob"), nb::arg("steps"), nb::arg("weights"), nb::arg("chain"),
      nb::arg("max_match_len"), nb::arg("mix") = nb::none(), nb::arg("threads") = 1,
      nb::arg("extend_threads") = 0, nb::arg("shared") = nb::none(), nb::arg("shared_weight") = 0.0,
      nb::arg("shared_min_match") = 1, nb::arg("unshare") = nb::none(), nb::arg("ahead") = nb::none(),
      nb::rv_policy::take_ownership,
      "extend_draft_rows on `threads` native threads of their own, started now (arguments checked "
      "here); returns a PendingExtendDraft whose wait() helps finish it and gives the result.");
  m.def(
      "set_background_nice",
      [](int nice) {
        if (nice < 0 || nice > 19) throw nb::value_error(("invalid nice=" + std::to_string(nice) + ": must be in [0, 19]").c_str());
        g_background_nice.store(nice);
      },
      nb::arg("nice"),
      "Nice value (0-19) of the threads a started extend + draft job runs on (0: the caller's).");
  m.def("background_nice", [] { return g_background_nice.load(); });
  m.def("background_threads", [] { return BackgroundPool::get().threads(); },
        "Threads the started jobs' pool has (kept; a start makes threads up to its own task count).");
  m.def(
      "set_node_reserve_bytes",
      [](int64_t bytes) {
        if (bytes < 4096 || bytes > (int64_t(1) << 40))
          throw nb::value_error(("invalid bytes=" + std::to_string(bytes) + ": must be in [4096, 2**40]").c_str());
        das::mapped_array_reserve_bytes().store(size_t(bytes));
      },
      nb::arg("bytes"),
      "Address space an index reserves for its node array when it first grows (virtual, "
      "not committed; growth within it is in place, past it the array moves to a reservation "
      "twice as large by copying). Default 256 MiB. Indexes already grown keep theirs.");
  m.def("node_reserve_bytes", [] { return int64_t(das::mapped_array_reserve_bytes().load()); });
  m.def("extend_draft_rows", &extend_draft_rows, nb::arg("indices"), nb::arg("seq_ids"),
        nb::arg("tokens"), nb::arg("offsets"), nb::arg("budgets"), nb::arg("min_prob"),
        nb::arg("steps"), nb::arg("weights"), nb::arg("chain"), nb::arg("max_match_len"),
        nb::arg("mix") = nb::none(), nb::arg("threads") = 1, nb::arg("extend_threads") = 0,
        nb::arg("shared") = nb::none(), nb::arg("shared_weight") = 0.0, nb::arg("shared_min_match") = 1,
        nb::arg("unshare") = nb::none(),
        "extend_batch then draft_rows of the same rows in one GIL-free call (first removing the "
        "`unshare` seq_ids from the shared index); returns "
        "draft_rows' tuple plus every row's index version (uint64) after the call; the appends "
        "split into up to `extend_threads` tasks by index (0: 8; 64 rows each at least) plus one "
        "for the shared index, the work shared by `threads` threads (the result never depends on "
        "either).");
  m.def("ragged_layout", &ragged_layout, nb::arg("roots"), nb::arg("seq_lens"), nb::arg("offsets"),
        nb::arg("tokens"), nb::arg("parents"), nb::arg("mask_zeros") = false,
        "Ragged tree-verify inputs of a flat draft batch, every integer array in one int64 buffer: "
        "(buffer, part starts int64[8], mask bool[sum vl^2], n, total, flat mask length (mask_zeros)). "
        "Parts: tokens, positions, verify_lens, offsets, [candidates, retrieve_index, next_token, "
        "next_sibling] (int64), [verify_lens, qo_indptr, extend_start_loc] (int32, each padded to 16 "
        "bytes), the flat mask's False positions (int64, mask_zeros).");
  m.def("draft_select", &draft_select, nb::arg("offsets"), nb::arg("rows").none(), nb::arg("keep").none(),
        nb::arg("tokens"), nb::arg("parents"), nb::arg("probs"), nb::arg("depths"), nb::arg("match_len"),
        "DraftBatch.take / take_rows / truncate in one pass: (tokens, parents, probs, depths, offsets, match).");
  m.def("online_plan", &online_plan, nb::arg("offsets"), nb::arg("probs"), nb::arg("depths"), nb::arg("table"),
        nb::arg("states"), nb::arg("match"), nb::arg("relative"), nb::arg("depth_bin"), nb::arg("rank_bin"),
        nb::arg("max_budget"), nb::arg("generated"), nb::arg("max_new"), nb::arg("remaining"), nb::arg("kv_tokens"),
        nb::arg("c_base"), nb::arg("c_tok"), nb::arg("c_kv"), nb::arg("spread"), nb::arg("free_tokens"),
        nb::arg("min_gain"), nb::arg("probe_budget"), nb::arg("due").none(), nb::arg("probe_spent"),
        nb::arg("probe_limit"),
        "LengthAware.plan for flat rows (online curves, marginal lookahead) in one call: (base, acc, bins, width, "
        "m, alloc budgets, alloc width, modeled_s, baseline_s, makespan_steps, budgets, probe_s), or None where "
        "the lookahead defers to numpy.");
  m.def("online_update", &online_update, nb::arg("cells"), nb::arg("decay"), nb::arg("at").none(),
        nb::arg("generated"), nb::arg("states"), nb::arg("pend_budget"), nb::arg("pend_generated"),
        nb::arg("pend_match"), nb::arg("pend_nodes"), nb::arg("pend_bins"), nb::arg("bin_before"),
        nb::arg("bin_size"),
        "OnlineCalibration.update's arithmetic for a batch: (next states int64, rows with an outcome).");
  m.def("outcome_rows", &outcome_rows, nb::arg("proposed"), nb::arg("committed"),
        "A feedback's verify outcomes: (rows, proposed, accepted, first invalid row or -1).");
  m.def("padded_rows", &padded_rows, nb::arg("tokens"), nb::arg("lens"),
        "TokenRows.from_padded in one pass: (flat int32, offsets int64), None on an invalid length or token.");
  m.def("online_table", &online_table, nb::arg("cells"), nb::arg("w"), nb::arg("prior"),
        "OnlineCalibration.table's shrunk (state, match bin, depth bin) ratios: numpy's doubles.");
  m.def("seq_tails", &seq_tails, nb::arg("seqs"),
        "Each sequence's last item and length: (int64 array, int64 array).");
  m.def("stop_rows", &stop_rows, nb::arg("runs"), nb::arg("lens"), nb::arg("max_new"), nb::arg("committed"),
        nb::arg("row_set"), nb::arg("set_ids"), nb::arg("set_offsets"),
        "The token-stop cut of each row's accepted run and its length limit: (cut, limit), int64.");
  m.def("ragged_mask_index", &ragged_mask_index, nb::arg("verify_lens"), nb::arg("seq_lens"),
        nb::arg("tree") = nb::none(),
        "Flat positions of the ragged tree blocks in the [seq_len prefix | tree] mask: (index, length); "
        "with tree (the flat bool blocks), only the positions of its False entries.");
  m.def("best_per_row", &best_per_row, nb::arg("remaining"), nb::arg("acc"), nb::arg("m"), nb::arg("kv_tokens"),
        nb::arg("c_base"), nb::arg("c_tok"), nb::arg("c_kv"),
        "allocation._best_per_row: (budgets int32, width, modeled_s, baseline_s, makespan_steps).");
  m.def("online_curves", &online_curves, nb::arg("offsets"), nb::arg("probs"), nb::arg("depths"), nb::arg("m"),
        nb::arg("table"), nb::arg("states"), nb::arg("match"), nb::arg("relative"), nb::arg("depth_bin"),
        nb::arg("rank_bin"), nb::arg("max_budget"),
        "policy._ModelBased.inputs' online curves of flat drafts: (base, acc, bins, width), flat row-major "
        "(rows x width, rows x (width - 1)); numpy's arrays bit for bit.");
  m.def("online_add", &online_add, nb::arg("cells"), nb::arg("generated"), nb::arg("pos"), nb::arg("budget"),
        nb::arg("states"), nb::arg("pend_generated"), nb::arg("pend_match"), nb::arg("pend_nodes"),
        nb::arg("pend_bins"), nb::arg("bin_before"), nb::arg("bin_size"),
        "OnlineCalibration._add: adds one plan's verify outcomes to cells (in place, numpy's sums bit "
        "for bit) and returns each row's next state (int64).");
  m.def("length_remaining", &length_remaining, nb::arg("g"), nb::arg("cap"), nb::arg("c0"), nb::arg("present"),
        nb::arg("sorted"), nb::arg("sorted_off"), nb::arg("suffix"), nb::arg("suffix_off"), nb::arg("tail_factor"),
        "length_predictor's group queries: (remaining float64, class int64), numpy's bit for bit.");
  nb::class_<LengthIndex>(m, "LengthIndex")
      .def(nb::init<bool, double, double>(), nb::arg("fixed"), nb::arg("a"), nb::arg("b"),
           "fixed: class thresholds (a, b) in tokens; else the quantiles (a, b) of the lengths.")
      .def(
          "add",
          [](LengthIndex& self, int64_t problem, int64_t length) {
            try {
              self.add(problem, length);
            } catch (const std::invalid_argument& e) {
              throw nb::value_error((std::string("LengthIndex.add: ") + e.what()).c_str());
            }
          },
          nb::arg("problem"), nb::arg("length"), "One finished length of problem index `problem`.")
      .def("remove", &length_index_remove, nb::arg("problems"), nb::arg("lengths"),
           "Lengths that left, each a (problem index, length) present now; checked first.")
      .def("renumber", &length_index_renumber, nb::arg("remap"), nb::arg("n_problems"),
           "Problem i becomes remap[i] (-1: gone; it must have no lengths).")
      .def("build", &length_index_build, nb::arg("problems"), nb::arg("lengths"), nb::arg("n_problems"),
           "Everything from columns (problem index, length) of n_problems problems.")
      .def("query", &length_index_query, nb::arg("g"), nb::arg("cap"), nb::arg("problems"), nb::arg("tail_factor"),
           "(remaining float64, class int64, initial class int64) per row; problems: index or -1.")
      .def(
          "thresholds",
          [](LengthIndex& self) -> nb::object {
            double t[2];
            if (!self.thresholds(t)) return nb::none();
            return nb::cast(to_numpy(std::vector<double>{t[0], t[1]}));
          },
          "The class thresholds (float64 [2]), None without lengths.")
      .def("initial_class", &LengthIndex::initial_class, nb::arg("problem"),
           "A problem index's initial class (-1: none).")
      .def_prop_ro("num_lengths", &LengthIndex::num_lengths)
      .def("memory_bytes", &LengthIndex::memory_bytes)
      .def_ro_static("MAX_LENGTH", &LengthIndex::kMaxLength);
  m.def("int32_tokens", &int32_tokens, nb::arg("seq"),
        "A list / tuple of Python ints, or a 1-D buffer of 32- / 64-bit ints (array('q'), int64 numpy), "
        "in [0, 2**31) as an int32 array; None otherwise.");
  m.def("row_map", &row_map, nb::arg("prev"), nb::arg("new"), nb::arg("identity") = false, nb::arg("fresh") = false,
        "For each item of new, the index of its last equal item in prev (-1: none), and whether new "
        "holds each item once: (int64 array, bool). identity: equal = the same object (items unread); "
        "fresh (with identity): also the rows of new absent from prev (int64 array), a third element.");
  m.def("clip_budgets", &clip_budgets, nb::arg("budgets"), nb::arg("cap"),
        "Per-row draft budgets as int32 at most cap: (-1, array), or (first negative row, None).");
  m.def("ahead_rows", &ahead_rows, nb::arg("at"), nb::arg("old_generated"), nb::arg("generated"),
        nb::arg("skipped").none(),
        "A plan's reading of its row map into the feedback job's rows (policy._adopt_kept): "
        "(ok, src, fresh, left).");
  m.def("gather_list", &gather_list, nb::arg("src"), nb::arg("at"), nb::arg("fill").none(),
        "[src[j] if j >= 0 else fill for j in at] (at: int64).");
  m.def("mutation_epoch", &SuffixIndex::mutation_epoch,
        "A process-wide count bumped with every SuffixIndex's version (add / extend / remove): "
        "while it is unchanged no index changed, so versions read before are still current.");
  nb::class_<PlanAhead>(m, "PlanAhead")
      .def(
          "set_generated",
          [](PlanAhead& a, nb::handle generated_h) {
            const I64 generated = as_array<I64>(generated_h, "generated", "int64");
            if (generated.shape(0) != a.generated.size())
              throw nb::value_error(("PlanAhead.set_generated: " + std::to_string(generated.shape(0)) +
                                     " counts for " + std::to_string(a.generated.size()) + " rows").c_str());
            if (a.ran.load()) throw nb::value_error("PlanAhead.set_generated: the plan already ran");
            std::copy(generated.data(), generated.data() + generated.shape(0), a.generated.begin());
          },
          nb::arg("generated"), "The rows' generated counts the plan is made for (int64, one per row; "
          "before a job runs it).")
      .def(
          "skip_outcomes",
          [](PlanAhead& a, nb::handle rows_h) {
            const I64 rows = as_array<I64>(rows_h, "rows", "int64");
            if (a.ran.load()) throw nb::value_error("PlanAhead.skip_outcomes: the plan already ran");
            for (size_t i = 0; i < rows.shape(0); ++i)
              if (rows(i) < 0 || size_t(rows(i)) >= a.generated.size())
                throw nb::value_error(("PlanAhead.skip_outcomes: row " + std::to_string(rows(i)) + " of " +
                                       std::to_string(a.generated.size())).c_str());
            for (size_t i = 0; i < rows.shape(0); ++i)  // (rows < generated.size() <= pend_budget.size())
              a.pend_budget[size_t(rows(i))] = 0;
          },
          nb::arg("rows"), "Leave these rows' verify outcomes out of the plan's calibration update "
          "(int64 row indices; requests that finish with this step: their last run is cut by the stop). "
          "Before a job runs it.")
      .def(
          "cut_at",
          [](PlanAhead& a, int64_t cap) {
            if (a.ran.load()) throw nb::value_error("PlanAhead.cut_at: the plan already ran");
            a.cut_cap = cap;
          },
          nb::arg("cap"), "Also cut the job's trees to min(budget, cap) nodes per row once it planned "
          "(cut(); -1: not). Before a job runs it.")
      .def("cut", &plan_ahead_cut,
           "The job's trees cut at cut_at's cap: (tokens, parents, probs, depths, offsets, match, lens, "
           "width), or None. Once.")
      .def("launch", &plan_ahead_launch, nb::arg("rows").none(), nb::arg("generated").none() = nb::none(),
           nb::arg("skipped").none() = nb::none(),
           "(the job's cut trees of these rows -- rows[q]: the job's row, -1 a new row (empty); None: "
           "the job's rows -- as cut() gives them, the widest budget the plan gives them), or None (not "
           "planned or cut; for the job's rows, generated counts not the job's; else no row kept, or a "
           "kept row skipped); hands nothing over (cut() and result() stay).")
      .def("result", &plan_ahead_result,
           "None if the job did not plan (see error), else (cells, states, added, table, calibration, "
           "relative, remaining, kv, plan); plan is online_plan's tuple or None. Once.")
      .def_prop_ro("error", [](const PlanAhead& a) { return a.error; });
  m.def("plan_ahead", &make_plan_ahead, nb::arg("cells"), nb::arg("decay"), nb::arg("generated"), nb::arg("states"),
        nb::arg("pend_budget"), nb::arg("pend_generated"), nb::arg("pend_match"), nb::arg("pend_nodes"),
        nb::arg("pend_bins"), nb::arg("bin_before"), nb::arg("bin_size"), nb::arg("table_w"), nb::arg("table_prior"),
        nb::arg("depth_bin"), nb::arg("rank_bin"), nb::arg("max_budget"), nb::arg("match_lut"), nb::arg("sums"),
        nb::arg("slots"), nb::arg("cal_w"), nb::arg("cal_wp"), nb::arg("cal_prior"), nb::arg("lengths"),
        nb::arg("problem_rows"), nb::arg("tail_factor"), nb::arg("max_new"), nb::arg("prompt_len"),
        nb::arg("c_base"), nb::arg("c_tok"), nb::arg("c_kv"), nb::arg("spread"), nb::arg("free_tokens"),
        nb::arg("min_gain"), nb::arg("probe_budget"), nb::arg("due").none(), nb::arg("probe_spent"),
        nb::arg("probe_limit"), nb::rv_policy::take_ownership,
        "The policy's next plan of a feedback's rows, to run in its extend_draft_rows_start job "
        "(ahead=): the inputs copied and checked now.");
  m.def("index_versions", &index_versions, nb::arg("indices"),
        "Every index's SuffixIndex.version, in list order (uint64).");
  m.def("lookahead_per_row", &lookahead_per_row, nb::arg("remaining"), nb::arg("acc"), nb::arg("m"),
        nb::arg("kv_tokens"), nb::arg("c_base"), nb::arg("c_tok"), nb::arg("c_kv"), nb::arg("spread"),
        nb::arg("free_tokens"),
        "allocation.lookahead_step_budgets, per-row widths: the same tuple, or None where numpy "
        "ranks every node (c_tok < 0 or a NaN gain).");
  m.def("extend_batch", &extend_batch, nb::arg("indices"), nb::arg("seq_ids"), nb::arg("tokens"),
        nb::arg("offsets"),
        "Append tokens[offsets[r]:offsets[r+1]] to (indices[r], seq_ids[r]) for every row.");
}
