// Suffix index implementation. Invariants and the storage-lifetime scheme: suffix_index.h.
#include "suffix_index.h"

#include <algorithm>
#include <cmath>
#include <cassert>
#include <cstring>
#include <queue>

namespace das {

namespace {
constexpr uint64_t kEmpty = ~uint64_t(0);  // no real key: parent ids are < kNil

uint64_t mix(uint64_t k) { return ChildMap::mix_key(k); }

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument(msg); }
[[noreturn]] void broken(const std::string& inv, const std::string& detail) {
  throw std::runtime_error("check_integrity: invariant '" + inv + "' violated: " + detail);
}
}  // namespace

// ---------------------------------------------------------------- ChildMap

ChildMap::ChildMap() : keys_(16, kEmpty), vals_(16, kNil), mask_(15) {}

size_t ChildMap::slot_of(uint64_t k) const {
  size_t i = mix(k) & mask_;
  while (keys_[i] != k && keys_[i] != kEmpty) i = (i + 1) & mask_;
  return i;
}

uint32_t ChildMap::find(uint32_t parent, int32_t token) const {
  size_t i = slot_of(key(parent, token));
  return keys_[i] == kEmpty ? kNil : vals_[i];
}

void ChildMap::insert(uint32_t parent, int32_t token, uint32_t child) {
  if ((size_ + 1) * 2 > keys_.size()) grow();
  uint64_t k = key(parent, token);
  size_t i = slot_of(k);
  assert(keys_[i] == kEmpty);
  keys_[i] = k;
  vals_[i] = child;
  ++size_;
}

void ChildMap::assign(uint32_t parent, int32_t token, uint32_t child) {
  size_t i = slot_of(key(parent, token));
  assert(keys_[i] != kEmpty);
  vals_[i] = child;
}

void ChildMap::erase(uint32_t parent, int32_t token) {
  size_t i = slot_of(key(parent, token));
  assert(keys_[i] != kEmpty);
  // Backward-shift deletion: pull later entries of the probe run into the hole when their
  // home slot does not lie cyclically in (hole, j], so no tombstones accumulate.
  size_t j = i;
  for (;;) {
    j = (j + 1) & mask_;
    if (keys_[j] == kEmpty) break;
    size_t h = mix(keys_[j]) & mask_;
    bool stays = (i <= j) ? (i < h && h <= j) : (i < h || h <= j);
    if (!stays) {
      keys_[i] = keys_[j];
      vals_[i] = vals_[j];
      i = j;
    }
  }
  keys_[i] = kEmpty;
  --size_;
}

void ChildMap::grow() {
  BigVector<uint64_t> old_k;
  BigVector<uint32_t> old_v;
  old_k.swap(keys_);
  old_v.swap(vals_);
  keys_.assign(old_k.size() * 2, kEmpty);
  vals_.assign(old_k.size() * 2, kNil);
  mask_ = keys_.size() - 1;
  for (size_t i = 0; i < old_k.size(); ++i) {
    if (old_k[i] == kEmpty) continue;
    size_t s = slot_of(old_k[i]);
    keys_[s] = old_k[i];
    vals_[s] = old_v[i];
  }
}

// ---------------------------------------------------------------- bookkeeping

SuffixIndex::SuffixIndex(int max_depth) : max_depth_(max_depth) {
  if (max_depth < 2 || max_depth > 4096)
    bad("invalid max_depth=" + std::to_string(max_depth) + ": must be in [2, 4096]");
  Node root{};
  root.parent = kNil;
  root.first_child = root.next_sibling = root.prev_sibling = kNil;
  root.label_storage = kNil;
  nodes_.push_back(root);
  for (int s = 0; s < kSlots; ++s) {
    slot_step_[s] = 0;
    slot_seqs_[s] = 0;
  }
}

uint32_t SuffixIndex::storage_of(int64_t seq_id) const {
  const uint32_t s = storage_id(seq_id);
  if (s == kNil) bad("unknown seq_id=" + std::to_string(seq_id));
  return s;
}

int SuffixIndex::acquire_slot(int64_t step) {
  int free_slot = -1;
  for (int s = 0; s < kSlots; ++s) {
    if (slot_seqs_[s] && slot_step_[s] == step) return s;
    if (!slot_seqs_[s] && free_slot < 0) free_slot = s;
  }
  if (free_slot < 0)
    bad("step=" + std::to_string(step) + " would be the " + std::to_string(kSlots + 1) +
        "th distinct step in this index (at most " + std::to_string(kSlots) +
        "); remove older steps first");
  slot_step_[free_slot] = step;
  return free_slot;
}

void SuffixIndex::release_slot(int slot) {
  assert(slot_seqs_[slot] > 0);
  --slot_seqs_[slot];
}

uint32_t SuffixIndex::new_storage() {
  uint32_t s;
  if (!free_storages_.empty()) {
    s = free_storages_.back();
    free_storages_.pop_back();
  } else {
    s = uint32_t(storages_.size());
    storages_.emplace_back();
  }
  Storage& st = storages_[s];
  st.refs = 0;
  st.slot = -1;
  st.registered = false;
  st.in_use = true;
  return s;
}

void SuffixIndex::unref_storage(uint32_t s) {
  Storage& st = storages_[s];
  assert(st.refs > 0);
  if (--st.refs == 0 && !st.registered) {
    --num_orphans_;  // an unregistered storage with labels is an orphan
    free_storage(s);
  }
}

void SuffixIndex::free_storage(uint32_t s) {
  Storage& st = storages_[s];
  st.tokens = std::vector<int32_t>();  // give the memory back, not just the size
  st.cursors = std::vector<uint32_t>();
  st.in_use = false;
  st.registered = false;
  st.slot = -1;
  free_storages_.push_back(s);
}

uint32_t SuffixIndex::new_node() {
  uint32_t n;
  if (!free_nodes_.empty()) {
    n = free_nodes_.back();
    free_nodes_.pop_back();
  } else {
    n = uint32_t(nodes_.size());
    // Grow by 1/4, not the default doubling: nodes are most of the index's bytes and a
    // doubled vector idles up to half of them (memory budget per stored token).
    if (nodes_.size() == nodes_.capacity()) nodes_.reserve(nodes_.size() + nodes_.size() / 4 + 64);
    nodes_.emplace_back();
  }
  Node& x = nodes_[n];
  std::memset(&x, 0, sizeof(Node));
  x.parent = x.first_child = x.next_sibling = x.prev_sibling = kNil;
  x.label_storage = kNil;
  return n;
}

void SuffixIndex::free_node(uint32_t n) {
  Node& x = nodes_[n];
  if (x.label_storage != kNil) unref_storage(x.label_storage);
  x.label_storage = kNil;
  x.parent = kNil;  // marks "free" for check_integrity
  free_nodes_.push_back(n);
  ++frees_since_release_;
}

// Free nodes stay in nodes_ for reuse, so an index that lost history (a step evicted while
// the problem stays in the window) kept their pages resident until it got as much text
// again or was dropped: RSS followed the largest size each problem had had, not what it
// holds (bench_memory: 0.1-0.34 M free nodes, 6-22 MB, most of its step-to-step RSS
// swing). Once many nodes were freed, pages whose 64 nodes are all free go back to the
// OS; new_node() clears a node before use, so a page read back as zeros is fine.
// O(nodes) per run, run once at least 1/8 of the nodes (>= 1,024) were freed since the last
// and a third of them is free: not where removals are refilled soon, where pages would go
// and come back -- the shared index under its cap keeps few free nodes, and a problem that
// lost its oldest of four window steps (~1/4 of its nodes) gets new rollouts next step.
void SuffixIndex::maybe_release_free_pages() {
  constexpr size_t K = MappedArray<Node>::kPerPage;
  const size_t N = nodes_.size();
  if (frees_since_release_ < std::max<size_t>(1024, N / 8) || free_nodes_.size() < std::max(K, N / 3)) return;
  frees_since_release_ = 0;
  BigVector<uint8_t>& mark = node_marks();  // (borrowed, cleared after)
  for (uint32_t f : free_nodes_) mark[f] = 1;
  size_t run = 0;  // first page of the current run of free pages (in nodes)
  bool in_run = false;
  for (size_t p = K; p + K <= N; p += K) {  // (page 0 holds the root)
    bool all = true;
    for (size_t i = p; i < p + K; ++i)
      if (!mark[i]) { all = false; break; }
    if (all && !in_run) { run = p; in_run = true; }
    if (!all && in_run) {
      nodes_.release(run, p);
      in_run = false;
    }
  }
  if (in_run) nodes_.release(run, N - N % K);
  for (uint32_t f : free_nodes_) mark[f] = 0;
}

void SuffixIndex::set_label(uint32_t n, uint32_t storage, uint32_t start, uint32_t len) {
  Node& x = nodes_[n];
  if (x.label_storage != storage) {
    ++storages_[storage].refs;
    if (x.label_storage != kNil) unref_storage(x.label_storage);
    x.label_storage = storage;
  }
  x.label_start = start;
  x.label_len = len;
}

uint32_t SuffixIndex::find_child(uint32_t n, int32_t token) const {
  if (indexed(n)) return children_.find(n, token);
  for (uint32_t c = nodes_[n].first_child; c != kNil; c = nodes_[c].next_sibling)
    if (nodes_[c].token == token) return c;
  return kNil;
}

void SuffixIndex::link_child(uint32_t parent, uint32_t child) {
  Node& c = nodes_[child];
  Node& p = nodes_[parent];
  c.parent = parent;
  c.prev_sibling = kNil;
  c.next_sibling = p.first_child;
  if (p.first_child != kNil) nodes_[p.first_child].prev_sibling = child;
  p.first_child = child;
  ++p.fanout;
  if (parent != kRoot && p.fanout == kScanFanout + 1) {  // became wide: index all children
    for (uint32_t k = p.first_child; k != kNil; k = nodes_[k].next_sibling)
      children_.insert(parent, nodes_[k].token, k);
  } else if (indexed(parent)) {
    children_.insert(parent, c.token, child);
  }
}

void SuffixIndex::unlink_child(uint32_t child) {
  Node& c = nodes_[child];
  const uint32_t parent = c.parent;
  if (c.prev_sibling != kNil)
    nodes_[c.prev_sibling].next_sibling = c.next_sibling;
  else
    nodes_[parent].first_child = c.next_sibling;
  if (c.next_sibling != kNil) nodes_[c.next_sibling].prev_sibling = c.prev_sibling;
  if (indexed(parent)) children_.erase(parent, c.token);
  Node& p = nodes_[parent];
  --p.fanout;
  if (parent != kRoot && p.fanout == kScanFanout) {  // narrow again: back to list scans
    for (uint32_t k = p.first_child; k != kNil; k = nodes_[k].next_sibling)
      children_.erase(parent, nodes_[k].token);
  }
}

// new_child takes old_child's place (same parent, same first token, same list position).
void SuffixIndex::replace_child(uint32_t old_child, uint32_t new_child) {
  Node& o = nodes_[old_child];
  Node& c = nodes_[new_child];
  c.parent = o.parent;
  c.prev_sibling = o.prev_sibling;
  c.next_sibling = o.next_sibling;
  if (o.prev_sibling != kNil)
    nodes_[o.prev_sibling].next_sibling = new_child;
  else
    nodes_[o.parent].first_child = new_child;
  if (o.next_sibling != kNil) nodes_[o.next_sibling].prev_sibling = new_child;
  if (indexed(o.parent)) children_.assign(o.parent, o.token, new_child);
}

bool SuffixIndex::is_pass_through(uint32_t n) const {
  const Node& x = nodes_[n];
  return n != kRoot && x.fanout == 1 && nodes_[x.first_child].total() == x.total();
}

// ---------------------------------------------------------------- insertion

void SuffixIndex::add_sequence(int64_t seq_id, const int32_t* tokens, size_t n, int64_t step) {
  if (by_id_.count(seq_id)) bad("duplicate seq_id=" + std::to_string(seq_id));
  int slot = acquire_slot(step);
  bump_version();
  uint32_t s = new_storage();
  Storage& st = storages_[s];
  st.seq_id = seq_id;
  st.slot = slot;
  st.registered = true;
  st.cursors.assign(max_depth_, kRoot);
  ++slot_seqs_[slot];
  by_id_.emplace(seq_id, s);
  storages_[s].tokens.reserve(n);
  for (size_t i = 0; i < n; ++i) append_token(s, tokens[i]);
  clock_ += n;
  storages_[s].clock = clock_;
}

void SuffixIndex::extend(int64_t seq_id, const int32_t* tokens, size_t n) {
  extend_storage(storage_of(seq_id), tokens, n);
}

void SuffixIndex::prefetch_storage(uint32_t s, bool record_only) const {
  if (s == kNil || s >= storages_.size()) return;
  const Storage& st = storages_[s];
  __builtin_prefetch(&st);
  if (record_only) return;
  const char* c = reinterpret_cast<const char*>(st.cursors.data());
  const size_t bytes = st.cursors.size() * sizeof(uint32_t);
  for (size_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b);
}

void SuffixIndex::extend_storage(uint32_t s, const int32_t* tokens, size_t n) {
  if (s >= storages_.size() || !storages_[s].registered)
    bad("extend_storage: storage " + std::to_string(s) + " holds no registered sequence");
  bump_version();
  // The first token moves every active suffix end (up to max_depth nodes, independent
  // of each other): fetch them all at once instead of one cache miss after another.
  if (n) prefetch_cursor_nodes(s, max_depth_);
  for (size_t i = 0; i < n; ++i) append_token(s, tokens[i]);
  clock_ += n;
  storages_[s].clock = clock_;
}

// Appending token t at position L extends the active suffixes X[i:L], i in
// [max(0, L-D+1), L], by one; suffix X[L-D+1:] reaches depth D and retires, its ring slot
// is reused by the new empty suffix starting at L+1.
void SuffixIndex::append_token(uint32_t s, int32_t t) {
  const uint32_t D = uint32_t(max_depth_);
  uint32_t L = uint32_t(storages_[s].tokens.size());
  storages_[s].tokens.push_back(t);  // labels of new nodes point at it
  uint32_t lo = L + 1 >= D ? L + 1 - D : 0;
  // Cache hints: each active suffix end next reads its child under t (independent of the
  // other ends), so request them all before stepping any.
  for (uint32_t i = lo; i <= L; ++i) {
    const uint32_t c = storages_[s].cursors[i % D];
    const Node& x = nodes_[c];
    if (indexed(c))
      children_.prefetch(c, t);
    else if (x.first_child != kNil)
      __builtin_prefetch(&nodes_[x.first_child]);
  }
  for (uint32_t i = lo; i <= L; ++i) {
    uint32_t& cur = storages_[s].cursors[i % D];
    cur = step_suffix(s, cur, t, L);
  }
  storages_[s].cursors[(L + 1) % D] = kRoot;
  ++num_tokens_;
}

// Move one suffix end from node c (at depth L - i) one token deeper; returns the new end.
uint32_t SuffixIndex::step_suffix(uint32_t s, uint32_t c, int32_t t, uint32_t pos) {
  const int slot = storages_[s].slot;
  Node* x = &nodes_[c];
  // A leaf that only this suffix reaches: grow its edge in place (the common case for
  // new text). Re-point the label into our own storage first so it can grow.
  if (c != kRoot && x->first_child == kNil && x->total() == 1) {
    set_label(c, s, pos - x->label_len, x->label_len + 1);
    ++nodes_[c].depth;
    return c;
  }
  uint32_t ch = find_child(c, t);
  if (ch != kNil && c != kRoot && x->fanout == 1 && nodes_[ch].label_len > 1 &&
      x->total() == nodes_[ch].total() + 1) {
    // c's only end is ours and it has one child: a split would leave c a pass-through to
    // be merged straight back. Slide c one token down ch's edge instead (same counts).
    Node& y = nodes_[ch];
    const uint32_t len = x->label_len + 1;
    set_label(c, s, pos + 1 - len, len);  // our suffix now spells c's path: see below
    ++x->depth;
    ++y.label_start;
    --y.label_len;
    y.token = label_token(y, 0);  // c is not indexed (one child): no map entry to move
    return c;
  }
  uint32_t end;
  if (ch == kNil) {
    end = new_node();
    Node& e = nodes_[end];
    e.token = t;
    e.depth = nodes_[c].depth + 1;
    set_label(end, s, pos, 1);
    link_child(c, end);
  } else {
    end = nodes_[ch].label_len == 1 ? ch : split(ch);
    // Newest occurrence wins: point the end node's label into this sequence. Windows
    // evict oldest first, so labels rarely reference the sequence being removed and
    // removal seldom needs to re-point or orphan (header, "Storage lifetime").
    set_label(end, s, pos, 1);
  }
  ++nodes_[end].count[slot];
  if (is_pass_through(c)) merge_into_child(c);  // c lost its only end: ours
  return end;
}

// Cut ch's edge after its first token; the new upper node takes ch's counts.
uint32_t SuffixIndex::split(uint32_t ch) {
  uint32_t m = new_node();
  Node& up = nodes_[m];
  Node& lo = nodes_[ch];
  up.token = lo.token;
  up.depth = nodes_[lo.parent].depth + 1;
  std::memcpy(up.count, lo.count, sizeof(up.count));
  set_label(m, lo.label_storage, lo.label_start, 1);
  replace_child(ch, m);
  Node& low = nodes_[ch];
  low.label_start += 1;
  low.label_len -= 1;
  low.token = label_token(low, 0);
  low.prev_sibling = low.next_sibling = kNil;
  nodes_[m].first_child = kNil;
  nodes_[m].fanout = 0;
  link_child(m, ch);
  return m;
}

// n has one child and no ends: fold n's edge into the child's (anchoring guarantees the
// child's storage holds n's label just before the child's own).
void SuffixIndex::merge_into_child(uint32_t n) {
  uint32_t ch = nodes_[n].first_child;  // n has one child: not indexed, no map entry
  Node& c = nodes_[ch];
  const Node& x = nodes_[n];
  assert(c.label_start >= x.label_len);
  c.label_start -= x.label_len;
  c.label_len += x.label_len;
  c.token = x.token;
  replace_child(n, ch);
  free_node(n);
}

// ---------------------------------------------------------------- removal

void SuffixIndex::remove_sequence(int64_t seq_id) {
  const uint32_t X = storage_of(seq_id);
  bump_version();
  const int slot = storages_[X].slot;
  const std::vector<int32_t>& tok = storages_[X].tokens;
  const uint32_t L = uint32_t(tok.size()), D = uint32_t(max_depth_);
  // Phase A: decrement along every truncated suffix path; remember each touched node once,
  // bucketed by depth so phase B can go deepest first.
  std::vector<std::vector<uint32_t>> by_depth(D + 1);
  BigVector<uint8_t>& seen = node_marks();
  for (uint32_t i = 0; i < L; ++i) {
    uint32_t end = std::min(L, i + D), j = i, cur = kRoot;
    while (j < end) {
      cur = find_child(cur, tok[j]);
      assert(cur != kNil);
      Node& x = nodes_[cur];
      j += x.label_len;
      assert(j <= end);
      --x.count[slot];
      if (!seen[cur]) {
        seen[cur] = 1;
        by_depth[x.depth].push_back(cur);
      }
    }
  }
  // Phase B: children before parents, so a node's children are final when it is fixed.
  for (uint32_t d = D; d >= 1; --d)
    for (uint32_t n : by_depth[d]) {
      seen[n] = 0;
      fix_after_removal(n, X);
    }
  num_tokens_ -= L;
  release_slot(slot);
  by_id_.erase(seq_id);
  // Every label that referenced X was re-pointed or orphaned in phase B.
  assert(storages_[X].refs == 0);
  free_storage(X);
  maybe_release_free_pages();
}

void SuffixIndex::fix_after_removal(uint32_t n, uint32_t removed) {
  Node& x = nodes_[n];
  if (x.total() == 0) {  // children (deeper) are already gone
    assert(x.first_child == kNil);
    unlink_child(n);
    free_node(n);
    return;
  }
  if (is_pass_through(n)) {
    merge_into_child(n);
    return;
  }
  if (x.label_storage != removed) return;
  if (x.first_child != kNil) {
    const Node& c = nodes_[x.first_child];  // fixed already: not `removed`
    set_label(n, c.label_storage, c.label_start - x.label_len, x.label_len);
  } else {
    make_orphan_label(n);
  }
}

// Copy n's whole path into a private storage so n's label survives its sequence.
void SuffixIndex::make_orphan_label(uint32_t n) {
  const uint32_t depth = nodes_[n].depth;
  std::vector<int32_t> path(depth);
  uint32_t end = depth;
  for (uint32_t a = n; a != kRoot; a = nodes_[a].parent) {
    const Node& x = nodes_[a];
    const int32_t* src = storages_[x.label_storage].tokens.data() + x.label_start;
    std::copy(src, src + x.label_len, path.begin() + (end - x.label_len));
    end -= x.label_len;
  }
  uint32_t o = new_storage();  // may reallocate storages_: `path` was copied first
  storages_[o].tokens = std::move(path);
  ++num_orphans_;
  set_label(n, o, depth - nodes_[n].label_len, nodes_[n].label_len);
}

// ---------------------------------------------------------------- queries

bool SuffixIndex::walk(const int32_t* s, size_t n, Pos& pos) const {
  uint32_t node = kRoot, off = 0;
  for (size_t k = 0; k < n; ++k) {
    const Node& x = nodes_[node];
    if (off < x.label_len) {
      if (label_token(x, off) != s[k]) return false;
      ++off;
    } else {
      uint32_t ch = find_child(node, s[k]);
      if (ch == kNil) return false;
      node = ch;
      off = 1;
    }
  }
  pos = Pos{node, off};
  return true;
}

bool SuffixIndex::has_continuation(const Pos& pos) const {
  const Node& x = nodes_[pos.node];
  return pos.off < x.label_len || x.first_child != kNil;
}

// Longest m <= max_match_len such that ctx[-m:] is present with a continuation. That
// property is monotone in m (if x.c occurs, so does suffix(x).c), so binary search.
int SuffixIndex::longest_match(const int32_t* ctx, size_t n, int max_match_len,
                               Pos& pos) const {
  int hi = int(std::min<size_t>(n, size_t(std::max(0, std::min(max_match_len, max_depth_ - 1)))));
  int lo = 0;
  Pos best{kRoot, 0};
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    Pos p;
    if (walk(ctx + n - mid, size_t(mid), p) && has_continuation(p)) {
      lo = mid;
      best = p;
    } else {
      hi = mid - 1;
    }
  }
  pos = best;
  return lo;
}

int SuffixIndex::match_length(const int32_t* ctx, size_t n) const {
  int hi = int(std::min<size_t>(n, size_t(max_depth_))), lo = 0;
  while (lo < hi) {  // presence is monotone in the suffix length too
    int mid = (lo + hi + 1) / 2;
    Pos p;
    if (walk(ctx + n - mid, size_t(mid), p))
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

double SuffixIndex::weight_of(const Node& x, const double* w) const {
  double sum = 0.0;
  for (int s = 0; s < kSlots; ++s) sum += w[s] * double(x.count[s]);
  return sum;
}

void SuffixIndex::slot_weights(const int64_t* steps, const double* weights, size_t n,
                               double out[kSlots]) const {
  for (int s = 0; s < kSlots; ++s) {
    out[s] = 0.0;
    if (!slot_seqs_[s]) continue;
    for (size_t k = 0; k < n; ++k)
      if (steps[k] == slot_step_[s]) out[s] = weights[k];
  }
}

void SuffixIndex::draft(const int32_t* ctx, size_t n, const DraftParams& p, Draft& out) const {
  out.tokens.clear();
  out.parents.clear();
  out.probs.clear();
  Pos pos;
  out.match_len = longest_match(ctx, n, p.max_match_len, pos);
  // Only weighted text counts: a longer match whose continuations all weigh 0 (history out
  // of the window, not removed yet: its lazy removal runs in chunks, one per forward) is not
  // a match, so the match length never depends on how much of that history is still stored.
  while (out.match_len > 0 && continuation_weight(pos, p.slot_weight) <= 0.0) {
    --out.match_len;
    if (out.match_len > 0 && !walk(ctx + n - out.match_len, size_t(out.match_len), pos)) out.match_len = 0;
  }
  if (out.match_len == 0) {
    if (p.mixture && !p.chain && p.skip_unseen > 0.0) skip_draft(ctx, n, p, out);
    return;
  }
  if (p.mixture && !p.chain) {
    thread_local std::vector<Anchor> anchors;
    anchors.clear();
    for (int m = out.match_len; m >= p.mix_floor(out.match_len); --m) {
      Pos at;
      if (!walk(ctx + n - m, size_t(m), at)) break;  // cannot happen: shorter suffixes exist
      if (!add_anchor(anchors, at, m, p, 0)) break;
    }
    expand_mixture(anchors, p, out);
    return;
  }
  if (p.chain)
    expand_chain(pos, p, out);
  else
    expand(pos, p, out);
}

// The longest suffix of the sequence, of at most ``m`` tokens, whose continuations weigh
// more than 0 under ``w`` (sequence_match's ``m`` less the lengths whose continuations are
// only unweighted text: see draft).
int SuffixIndex::weighted_match(const Storage& st, int m, const double* w) const {
  const uint32_t L = uint32_t(st.tokens.size()), D = uint32_t(max_depth_);
  while (m > 0) {
    const uint32_t c = st.cursors[(L - uint32_t(m)) % D];
    if (continuation_weight(Pos{c, nodes_[c].label_len}, w) > 0.0) break;
    --m;
  }
  return m;
}

// The longest suffix of the sequence with a continuation, read from its live cursors.
int SuffixIndex::sequence_match(const Storage& st, int max_match_len) const {
  const uint32_t L = uint32_t(st.tokens.size()), D = uint32_t(max_depth_);
  // The cursor of the length-m suffix sits on a node; "has a continuation" is monotone in
  // m (see longest_match), so binary search touches ~log2(max_match_len) cursor nodes.
  int lo = 0, hi = std::min(int(std::min<uint32_t>(L, D - 1)), std::max(0, max_match_len));
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (nodes_[st.cursors[(L - uint32_t(mid)) % D]].first_child != kNil)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Same result as draft(sequence tokens): the live cursors already sit at the ends of the
// sequence's own suffixes, so no walk is needed.
void SuffixIndex::draft_for_sequence(int64_t seq_id, const DraftParams& p, Draft& out) const {
  const Storage& st = storages_[storage_of(seq_id)];
  out.tokens.clear();
  out.parents.clear();
  out.probs.clear();
  out.match_len = 0;
  const uint32_t D = uint32_t(max_depth_);
  const int lo = weighted_match(st, sequence_match(st, p.max_match_len), p.slot_weight);
  const bool mix = p.mixture && !p.chain;
  const Storage* sst = nullptr;  // the same sequence in the shared index
  int lo2 = 0;
  if (p.mixed_shared(this) != nullptr) {
    auto it = p.shared->by_id_.find(seq_id);
    if (it != p.shared->by_id_.end()) {
      sst = &p.shared->storages_[it->second];
      lo2 = p.shared->weighted_match(*sst, p.shared->sequence_match(*sst, p.max_match_len),
                                     p.shared_slot_weight);
    }
  }
  if (lo == 0 && lo2 == 0) {
    if (mix && p.skip_unseen > 0.0) skip_draft(st.tokens.data(), st.tokens.size(), p, out);
    return;
  }
  out.match_len = std::max(lo, lo2);
  if (mix) {
    thread_local std::vector<Anchor> anchors;
    anchors.clear();
    const uint32_t L = uint32_t(st.tokens.size());
    const int floor = p.mix_floor(out.match_len);
    for (int m = lo; m >= floor; --m) {
      const uint32_t c = st.cursors[(L - uint32_t(m)) % D];
      if (!add_anchor(anchors, Pos{c, nodes_[c].label_len}, m, p, 0)) break;
    }
    if (sst != nullptr) {
      const uint32_t L2 = uint32_t(sst->tokens.size()), D2 = uint32_t(p.shared->max_depth_);
      for (int m = lo2; m >= std::max(floor, p.shared_min_match); --m) {
        const uint32_t c = sst->cursors[(L2 - uint32_t(m)) % D2];
        if (!p.shared->add_anchor(anchors, Pos{c, p.shared->nodes_[c].label_len}, m, p, 1)) break;
      }
    }
    expand_mixture(anchors, p, out);
    return;
  }
  const uint32_t L = uint32_t(st.tokens.size());
  const uint32_t c = st.cursors[(L - uint32_t(lo)) % D];
  const Pos pos{c, nodes_[c].label_len};
  if (p.chain)
    expand_chain(pos, p, out);
  else
    expand(pos, p, out);
}

uint32_t SuffixIndex::prefetch_sequence(int64_t seq_id) const {
  const uint32_t s = storage_id(seq_id);
  prefetch_storage(s);  // (kNil: nothing)
  return s;
}

void SuffixIndex::prefetch_cursor_nodes(uint32_t s, int max_m) const {
  if (s == kNil) return;
  const Storage& st = storages_[s];
  const uint32_t L = uint32_t(st.tokens.size()), D = uint32_t(max_depth_);
  const int hi = std::min(int(std::min<uint32_t>(L, D - 1)), std::max(0, max_m));
  for (int m = 1; m <= hi; ++m) __builtin_prefetch(&nodes_[st.cursors[(L - uint32_t(m)) % D]]);
}

void SuffixIndex::draft_lists(uint32_t s, const DraftParams& p, std::vector<ListHead>& out,
                              bool as_shared) const {
  if (s == kNil) return;
  const Storage& st = storages_[s];
  const uint32_t L = uint32_t(st.tokens.size()), D = uint32_t(max_depth_);
  // the match length exactly as draft_for_sequence finds it (its cursor nodes are cached)
  const int lo = sequence_match(st, p.max_match_len);
  if (lo == 0) return;
  // (the own match's floor: at most the draft's, which takes the longer of both matches)
  const int last = !(p.mixture && !p.chain) ? lo
                   : as_shared ? std::max(p.mix_floor(lo), p.shared_min_match)
                               : p.mix_floor(lo);
  for (int m = lo; m >= last; --m) {
    const Node& x = nodes_[st.cursors[(L - uint32_t(m)) % D]];
    // add_anchor stops at the first match node with more continuations than this
    if (p.mixture && !p.chain && x.fanout > uint32_t(std::max(0, p.mix_max_fanout))) break;
    if (x.first_child != kNil) out.push_back({nodes_.data(), x.first_child});
  }
}

void SuffixIndex::walk_lists(std::vector<ListHead>& heads) {
  size_t n = heads.size();
  while (n) {
    for (size_t i = 0; i < n;) {
      const uint32_t next = heads[i].nodes[heads[i].cur].next_sibling;  // loads the node
      if (next == kNil) {
        heads[i] = heads[--n];
      } else {
        heads[i].cur = next;
        ++i;
      }
    }
  }
  heads.clear();
}

namespace {
struct Cand {
  double prob;
  int32_t token;
  int32_t parent;  // output index of the parent, -1 = root
  uint32_t node;
  uint32_t off;
};
// Best first: higher prob, then smaller token, then earlier parent (a total order:
// siblings differ in token).
struct Worse {
  bool operator()(const Cand& a, const Cand& b) const {
    if (a.prob != b.prob) return a.prob < b.prob;
    if (a.token != b.token) return a.token > b.token;
    return a.parent > b.parent;
  }
};
}  // namespace

void SuffixIndex::expand(const Pos& start, const DraftParams& p, Draft& out) const {
  thread_local std::vector<Cand> heap, kids;
  heap.clear();
  Worse worse;
  auto push_children = [&](const Pos& at, double prob, int32_t parent) {
    const Node& x = nodes_[at.node];
    if (at.off < x.label_len) {  // inside an edge: one continuation, conditional 1
      if (weight_of(x, p.slot_weight) > 0.0 && prob >= p.min_prob) {
        heap.push_back({prob, label_token(x, at.off), parent, at.node, at.off + 1});
        std::push_heap(heap.begin(), heap.end(), worse);
      }
      return;
    }
    // One pass over the (scattered) child nodes; the second pass reads the buffer.
    kids.clear();
    double sum = 0.0;
    for (uint32_t c = x.first_child; c != kNil; c = nodes_[c].next_sibling) {
      double w = weight_of(nodes_[c], p.slot_weight);
      sum += w;
      if (w > 0.0) kids.push_back({w, nodes_[c].token, parent, c, 1});
    }
    for (Cand& k : kids) {
      k.prob = prob * (k.prob / sum);  // k.prob held the weight
      if (k.prob < p.min_prob) continue;  // never proposed; keeps the heap small
      heap.push_back(k);
      std::push_heap(heap.begin(), heap.end(), worse);
    }
  };
  push_children(start, 1.0, -1);
  while (!heap.empty() && int(out.tokens.size()) < p.budget) {
    std::pop_heap(heap.begin(), heap.end(), worse);
    Cand c = heap.back();
    heap.pop_back();
    int32_t idx = int32_t(out.tokens.size());
    out.tokens.push_back(c.token);
    out.parents.push_back(c.parent);
    out.probs.push_back(c.prob);
    push_children(Pos{c.node, c.off}, c.prob, idx);
  }
}

// x's children that weigh more than 0 under ``w``, counted up to cap + 1: its fanout where
// every stored slot weighs more than 0 (no scan), so a fanout limit never depends on how
// much unweighted history is still stored.
uint32_t SuffixIndex::weighted_fanout(const Node& x, const double* w, uint32_t cap) const {
  bool unweighted = false;
  for (int s = 0; s < kSlots; ++s) unweighted |= slot_seqs_[s] != 0 && !(w[s] > 0.0);
  if (!unweighted) return x.fanout;
  uint32_t k = 0;
  for (uint32_t c = x.first_child; c != kNil && k <= cap; c = nodes_[c].next_sibling) k += weight_of(nodes_[c], w) > 0.0;
  return k;
}

double SuffixIndex::continuation_weight(const Pos& pos, const double* w) const {
  const Node& x = nodes_[pos.node];
  if (pos.off < x.label_len) return weight_of(x, w);
  double sum = 0.0;
  for (uint32_t c = x.first_child; c != kNil; c = nodes_[c].next_sibling) sum += weight_of(nodes_[c], w);
  return sum;
}

// Anchors come longest first. Returns false when this and every shorter match must be
// skipped (too many continuations: scanning them would cost more than they add).
bool SuffixIndex::add_anchor(std::vector<Anchor>& anchors, const Pos& pos, int m,
                             const DraftParams& p, int src) const {
  const Node& x = nodes_[pos.node];
  const double* w = src ? p.shared_slot_weight : p.slot_weight;
  const uint32_t fanout = pos.off < x.label_len ? 1u : x.fanout;
  const uint32_t cap = uint32_t(std::max(0, p.mix_max_fanout));
  if (fanout > cap && weighted_fanout(x, w, cap) > cap) return false;
  const double cont = continuation_weight(pos, w);
  if (cont <= 0.0) return true;  // nothing weighted here (continuation weight only grows as m shrinks)
  const double mpow = p.mix_pow_set && m >= 0 && m < DraftParams::kMixPow ? p.mix_pow[m]
                                                                           : std::pow(double(m), p.mix_alpha);
  const double raw = mpow * (src ? p.shared_weight : 1.0);
  if (!anchors.empty() && anchors.back().src == src && anchors.back().cont == cont) {
    // Same weight => the same occurrences continue: keep the shorter (deeper-reaching) match.
    anchors.back().pos = pos;
    anchors.back().raw += raw;
    anchors.back().m = m;
    return true;
  }
  anchors.push_back({pos, cont, raw, m, src});
  return true;
}

bool SuffixIndex::skip_anchors(const Pos& pos, int32_t x, int m, const DraftParams& p,
                               std::vector<Anchor>* anchors) const {
  const Node& at = nodes_[pos.node];
  const double* w = p.slot_weight;
  if (pos.off < at.label_len) {  // one continuation: the label's next token
    if (label_token(at, pos.off) == x || weight_of(at, w) <= 0.0) return false;
    const Pos after{pos.node, pos.off + 1};
    const double cont = continuation_weight(after, w);
    if (cont <= 0.0) return false;
    if (anchors != nullptr) anchors->push_back({after, cont, weight_of(at, w), m, 0});
    return true;
  }
  bool any = false;
  for (uint32_t c = at.first_child; c != kNil; c = nodes_[c].next_sibling) {
    const Node& y = nodes_[c];
    const double wc = y.token == x ? 0.0 : weight_of(y, w);
    if (wc <= 0.0) continue;
    const Pos after{c, 1};
    const double cont = continuation_weight(after, w);
    if (cont <= 0.0) continue;
    if (anchors == nullptr) return true;
    anchors->push_back({after, cont, wc, m, 0});
    any = true;
  }
  return any;
}

void SuffixIndex::skip_draft(const int32_t* ctx, size_t n, const DraftParams& p, Draft& out) const {
  if (n < 2 || p.budget <= 0) return;
  const int32_t x = ctx[n - 1];
  const size_t k = n - 1;  // the context without x
  // The suffix and the token in x's place must fit below max_depth with one more after.
  int hi = int(std::min<size_t>(k, size_t(std::max(0, std::min(p.max_match_len, max_depth_ - 2)))));
  int lo = 0;
  Pos best{kRoot, 0};
  while (lo < hi) {  // "has such a continuation" is monotone in the suffix length
    const int mid = (lo + hi + 1) / 2;
    Pos at;
    if (walk(ctx + k - mid, size_t(mid), at) && skip_anchors(at, x, mid, p, nullptr)) {
      lo = mid;
      best = at;
    } else {
      hi = mid - 1;
    }
  }
  if (lo == 0) return;
  const Node& at = nodes_[best.node];
  const uint32_t cap = uint32_t(std::max(0, p.mix_max_fanout));
  if (best.off >= at.label_len && at.fanout > cap && weighted_fanout(at, p.slot_weight, cap) > cap) return;
  thread_local std::vector<Anchor> anchors;
  anchors.clear();
  skip_anchors(best, x, lo, p, &anchors);
  // token order (the oracle's; the sums below run in it): several anchors are children,
  // each at Pos{c, 1}, their tokens distinct
  std::sort(anchors.begin(), anchors.end(), [this](const Anchor& a, const Anchor& b) {
    return nodes_[a.pos.node].token < nodes_[b.pos.node].token;
  });
  out.match_len = lo;  // the expansion's order reads it (match_half)
  // probs scaled by skip_unseen, the cut on the scaled probs: prob * scale >= min_prob
  DraftParams q = p;
  q.min_prob = p.min_prob / p.skip_unseen;
  expand_mixture(anchors, q, out);
  for (auto& v : out.probs) v = v * p.skip_unseen;
  out.match_len = 0;
}

double SuffixIndex::recency_of(uint32_t x) const {
  const Node& n = nodes_[x];
  const Storage& st = storages_[n.label_storage];
  if (!st.registered) return 0.0;
  return double(st.clock) - double(st.tokens.size() - n.label_start);
}

namespace {
constexpr double kMixPrune = 1.0 / 64;  // dyadic: the oracle's comparison is bit-identical
struct MixState {  // one anchor's position below a virtual node
  uint32_t node, off;
  int32_t anchor;
  double pa;  // P_anchor(path)
};
struct MixCand {
  double score;  // expansion order: prob, or the match-length-scaled score (mix_match_half)
  double prob;
  int32_t depth;
  int32_t token;
  int32_t parent;
  uint32_t begin, end;  // its states in the pool
};
struct MixWorse {
  bool operator()(const MixCand& a, const MixCand& b) const {
    if (a.score != b.score) return a.score < b.score;
    if (a.token != b.token) return a.token > b.token;
    return a.parent > b.parent;
  }
};
struct MixEntry {
  int32_t token;
  int32_t anchor;
  uint32_t node, off;
  double pa;
};

// expand_mixture's scratch, one per thread. Reached through one reference per call: a
// thread_local named inside the loops costs a __tls_get_addr call at every use in a shared
// library (7.5 % of a 512-row draft's time, perf).
struct MixScratch {
  std::vector<MixState> pool;
  std::vector<MixCand> heap;
  std::vector<MixEntry> tmp;
  std::vector<double> lambda;
  std::vector<uint64_t> keys;  // (token, entry) pairs: the entries grouped by token
};
}  // namespace

void SuffixIndex::expand_mixture(const std::vector<Anchor>& anchors, const DraftParams& p,
                                 Draft& out) const {
  if (anchors.empty() || p.budget <= 0) return;
  thread_local MixScratch scratch;
  MixScratch& sc = scratch;
  std::vector<MixState>& pool = sc.pool;
  std::vector<MixCand>& heap = sc.heap;
  std::vector<MixEntry>& tmp = sc.tmp;
  std::vector<double>& lambda = sc.lambda;
  std::vector<uint64_t>& keys = sc.keys;
  pool.clear();
  heap.clear();
  lambda.clear();
  double total = 0.0;
  for (const Anchor& a : anchors) total += a.raw;
  for (const Anchor& a : anchors) lambda.push_back(a.raw / total);
  MixWorse worse;
  // Children of the virtual node whose states are pool[begin, end): merged by token.
  // Mathematically prob <= parent_prob <= 1; clamped so rounding of the sum never breaks it.
  const double rec = p.mix_recency, half = p.mix_match_half;
  auto push_children = [&](uint32_t begin, uint32_t end, int32_t parent, double parent_prob,
                           double parent_score, int32_t depth) {
    tmp.clear();
    const double esc = p.mix_escape;
    for (uint32_t i = begin; i < end; ++i) {
      const MixState s = pool[i];
      const bool sh = anchors[size_t(s.anchor)].src != 0;
      const SuffixIndex& ix = sh ? *p.shared : *this;  // the index this state walks
      const double* sw = sh ? p.shared_slot_weight : p.slot_weight;
      const auto& nodes = ix.nodes_;
      const Node& x = nodes[s.node];
      if (s.off < x.label_len) {
        const double w = ix.weight_of(x, sw);
        if (w > 0.0) tmp.push_back({ix.label_token(x, s.off), s.anchor, s.node, s.off + 1, s.pa * (w / (w + esc))});
        continue;
      }
      const size_t first = tmp.size();
      double sum = 0.0, newest_t = -1.0;
      size_t newest = first;
      for (uint32_t c = x.first_child; c != kNil; c = nodes[c].next_sibling) {
        const double w = ix.weight_of(nodes[c], sw);
        sum += w;
        if (w > 0.0) {
          if (rec > 0.0) {
            const double t = ix.recency_of(c);
            // ties (equal clocks: rare) go to the smaller token, as everywhere else
            if (t > newest_t || (t == newest_t && nodes[c].token < tmp[newest].token))
              newest_t = t, newest = tmp.size();
          }
          tmp.push_back({nodes[c].token, s.anchor, c, 1, w});
          // Cache hint for this child's own expansion, should it be popped: its children
          // list, or the storage its edge's next token is read from.
          const Node& y = nodes[c];
          if (y.label_len > 1)
            __builtin_prefetch(&ix.storages_[y.label_storage]);
          else if (y.first_child != kNil)
            __builtin_prefetch(&nodes[y.first_child]);
        }
      }
      double denom = sum + esc;
      if (rec > 0.0 && tmp.size() - first >= 2) {
        tmp[newest].pa += rec * sum;
        denom += rec * sum;
      }
      for (size_t k = first; k < tmp.size(); ++k) tmp[k].pa = s.pa * (tmp[k].pa / denom);
    }
    // The entries merge by token. Each state is one anchor's (ascending, a state per anchor
    // at most), so a token's entries in state order are in anchor order: the order their
    // probs are summed in (the same sums, bit for bit, as sorting the entries by token
    // and anchor did). Which token's candidate is pushed first does not matter: the heap's
    // order is total (score, token, parent). One state: every token once, nothing to group.
    const size_t n_tmp = tmp.size();
    const bool group = end - begin > 1;
    if (group) {
      keys.resize(n_tmp);
      for (size_t i = 0; i < n_tmp; ++i) keys[i] = (uint64_t(uint32_t(tmp[i].token)) << 32) | i;
      std::sort(keys.begin(), keys.end());
    }
    for (size_t k = 0; k < n_tmp;) {
      size_t z = k;
      double prob = 0.0;
      if (group) {
        const uint64_t tok = keys[k] >> 32;
        for (; z < n_tmp && (keys[z] >> 32) == tok; ++z) {
          const MixEntry& e = tmp[keys[z] & 0xffffffffu];
          prob += lambda[e.anchor] * e.pa;
        }
      } else {
        prob = lambda[tmp[k].anchor] * tmp[k].pa;
        z = k + 1;
      }
      prob = std::min(prob, parent_prob);
      if (prob >= p.min_prob) {
        const uint32_t b = uint32_t(pool.size());
        // An anchor adding less than kMixPrune of the node's prob is not followed further
        // (its share below is at most that small too): bounds the states per node.
        for (size_t j = k; j < z; ++j) {
          const MixEntry& e = tmp[group ? size_t(keys[j] & 0xffffffffu) : j];
          if (lambda[e.anchor] * e.pa >= prob * kMixPrune) pool.push_back({e.node, e.off, e.anchor, e.pa});
        }
        const MixEntry& first = tmp[group ? size_t(keys[k] & 0xffffffffu) : k];
        double score = prob;
        if (half > 0.0 && parent_prob > 0.0) {
          const double len = double(out.match_len + depth);
          score = parent_score * (prob / parent_prob) * (len / (len + half));
        }
        heap.push_back({score, prob, depth, first.token, parent, b, uint32_t(pool.size())});
        std::push_heap(heap.begin(), heap.end(), worse);
      }
      k = z;
    }
  };
  for (size_t a = 0; a < anchors.size(); ++a)
    pool.push_back({anchors[a].pos.node, anchors[a].pos.off, int32_t(a), 1.0});
  push_children(0, uint32_t(pool.size()), -1, 1.0, 1.0, 0);
  while (!heap.empty() && int(out.tokens.size()) < p.budget) {
    std::pop_heap(heap.begin(), heap.end(), worse);
    const MixCand c = heap.back();
    heap.pop_back();
    const int32_t idx = int32_t(out.tokens.size());
    out.tokens.push_back(c.token);
    out.parents.push_back(c.parent);
    out.probs.push_back(c.prob);
    if (int(out.tokens.size()) < p.budget) push_children(c.begin, c.end, idx, c.prob, c.score, c.depth + 1);
  }
}

void SuffixIndex::expand_chain(const Pos& start, const DraftParams& p, Draft& out) const {
  Pos at = start;
  double prob = 1.0;
  while (int(out.tokens.size()) < p.budget) {
    const Node& x = nodes_[at.node];
    int32_t tok;
    Pos next;
    if (at.off < x.label_len) {
      if (weight_of(x, p.slot_weight) <= 0.0) return;
      tok = label_token(x, at.off);
      next = Pos{at.node, at.off + 1};
    } else {
      double sum = 0.0, best_w = 0.0;
      uint32_t best = kNil;
      for (uint32_t c = x.first_child; c != kNil; c = nodes_[c].next_sibling) {
        double w = weight_of(nodes_[c], p.slot_weight);
        sum += w;
        if (w > best_w || (w == best_w && w > 0.0 && nodes_[c].token < nodes_[best].token)) {
          best_w = w;
          best = c;
        }
      }
      if (best == kNil) return;
      prob = prob * (best_w / sum);
      tok = nodes_[best].token;
      next = Pos{best, 1};
    }
    if (prob < p.min_prob) return;
    out.parents.push_back(int32_t(out.tokens.size()) - 1);
    out.tokens.push_back(tok);
    out.probs.push_back(prob);
    at = next;
  }
}

// ---------------------------------------------------------------- introspection

size_t SuffixIndex::memory_bytes() const {
  size_t b = nodes_.capacity() * sizeof(Node) + free_nodes_.capacity() * 4 +
             removal_marks_.capacity() +
             children_.memory_bytes() + storages_.capacity() * sizeof(Storage) +
             free_storages_.capacity() * 4 + by_id_.size() * 32;
  for (const Storage& st : storages_)
    b += st.tokens.capacity() * 4 + st.cursors.capacity() * 4;
  return b;
}

std::vector<int64_t> SuffixIndex::steps() const {
  std::vector<int64_t> v;
  for (int s = 0; s < kSlots; ++s)
    if (slot_seqs_[s]) v.push_back(slot_step_[s]);
  std::sort(v.begin(), v.end());
  return v;
}

int64_t SuffixIndex::sequence_step(int64_t seq_id) const {
  return slot_step_[storages_[storage_of(seq_id)].slot];
}

const std::vector<int32_t>& SuffixIndex::sequence_tokens(int64_t seq_id) const {
  return storages_[storage_of(seq_id)].tokens;
}

std::vector<int64_t> SuffixIndex::sequence_ids() const {
  std::vector<int64_t> v;
  v.reserve(by_id_.size());
  for (const auto& kv : by_id_) v.push_back(kv.first);
  std::sort(v.begin(), v.end());
  return v;
}

void SuffixIndex::check_integrity() const {
  const uint32_t D = uint32_t(max_depth_);
  const size_t N = nodes_.size();
  std::vector<uint8_t> is_free(N, 0);
  for (uint32_t f : free_nodes_) {
    if (f >= N || f == kRoot || is_free[f]) broken("free list", "bad entry " + std::to_string(f));
    is_free[f] = 1;
  }
  // Expected ends per node and slot, recomputed from the registered sequences.
  std::vector<uint32_t> ends(N * kSlots, 0);
  uint32_t slot_count[kSlots] = {};
  size_t tokens = 0;
  for (const auto& kv : by_id_) {
    const Storage& st = storages_[kv.second];
    if (!st.in_use || !st.registered || st.seq_id != kv.first || st.slot < 0 ||
        !slot_seqs_[st.slot])
      broken("sequence table", "seq_id=" + std::to_string(kv.first));
    ++slot_count[st.slot];
    const uint32_t L = uint32_t(st.tokens.size());
    tokens += L;
    for (uint32_t i = 0; i < L; ++i) {
      uint32_t end = std::min(L, i + D), j = i, cur = kRoot;
      while (j < end) {
        cur = find_child(cur, st.tokens[j]);
        if (cur == kNil || is_free[cur])
          broken("suffix paths", "seq_id=" + std::to_string(kv.first) + " start " +
                                     std::to_string(i) + " falls off the tree at " +
                                     std::to_string(j));
        j += nodes_[cur].label_len;
      }
      if (j != end)
        broken("boundary", "suffix end of seq_id=" + std::to_string(kv.first) + " start " +
                               std::to_string(i) + " is inside an edge");
      ++ends[size_t(cur) * kSlots + st.slot];
      if (L - i < D && st.cursors[i % D] != cur)  // active suffix: its cursor
        broken("cursors", "seq_id=" + std::to_string(kv.first) + " start " + std::to_string(i));
    }
    if (st.cursors[L % D] != kRoot) broken("cursors", "empty suffix not at root");
  }
  if (tokens != num_tokens_) broken("num_tokens", std::to_string(tokens));
  for (int s = 0; s < kSlots; ++s)
    if (slot_count[s] != slot_seqs_[s]) broken("slot bookkeeping", "slot " + std::to_string(s));
  // Walk the tree from the root, checking structure, labels, anchoring and counts.
  std::vector<uint32_t> refs(storages_.size(), 0);
  size_t reached = 1, edges = 0;
  std::vector<uint32_t> stack{kRoot};
  while (!stack.empty()) {
    uint32_t n = stack.back();
    stack.pop_back();
    const Node& x = nodes_[n];
    uint64_t child_sum[kSlots] = {};
    size_t n_children = 0;
    uint32_t prev = kNil;
    for (uint32_t c = x.first_child; c != kNil; c = nodes_[c].next_sibling) {
      const std::string where = "node " + std::to_string(c);
      if (c >= N || is_free[c]) broken("free list", "free " + where + " is linked");
      const Node& y = nodes_[c];
      if (y.parent != n || y.prev_sibling != prev) broken("parent links", where);
      if (children_.find(n, y.token) != (indexed(n) ? c : kNil)) broken("child map", where);
      if (y.label_storage >= storages_.size() || !storages_[y.label_storage].in_use ||
          y.label_len == 0 ||
          size_t(y.label_start) + y.label_len > storages_[y.label_storage].tokens.size())
        broken("labels readable", where);
      if (label_token(y, 0) != y.token) broken("labels consistent", where);
      if (y.depth != x.depth + y.label_len || y.depth > D) broken("depth", where);
      // Anchoring by induction: y's storage must hold x's (anchored) path right before
      // y's label.
      if (y.label_start < x.depth) broken("anchored labels", where);
      const int32_t* ys = storages_[y.label_storage].tokens.data() + y.label_start - x.depth;
      if (n != kRoot) {
        const int32_t* xs = storages_[x.label_storage].tokens.data() + x.label_start +
                            x.label_len - x.depth;
        for (uint32_t k = 0; k < x.depth; ++k)
          if (ys[k] != xs[k]) broken("anchored labels", where);
      }
      ++refs[y.label_storage];
      uint32_t total = 0;
      for (int s = 0; s < kSlots; ++s) {
        child_sum[s] += y.count[s];
        total += y.count[s];
      }
      if (total == 0) broken("counts", "zero total of " + where);
      ++n_children;
      ++reached;
      prev = c;
      stack.push_back(c);
    }
    if (n != kRoot && x.fanout != n_children) broken("fanout", "node " + std::to_string(n));
    if (indexed(n)) edges += n_children;
    if (n == kRoot) continue;
    const uint32_t f_node = n;
    bool has_ends = false;
    for (int s = 0; s < kSlots; ++s) {
      uint64_t e = ends[size_t(f_node) * kSlots + s];
      if (x.count[s] != child_sum[s] + e)
        broken("counts", "node " + std::to_string(f_node) + " slot " + std::to_string(s) +
                             ": count " + std::to_string(x.count[s]) + " != children " +
                             std::to_string(child_sum[s]) + " + ends " + std::to_string(e));
      has_ends |= e > 0;
    }
    if (n_children == 1 && !has_ends) broken("canonical", "pass-through node " + std::to_string(f_node));
  }
  if (reached + free_nodes_.size() != N) broken("free list", "unreachable live nodes");
  if (edges != children_.size()) broken("child map", "size");
  size_t orphans = 0;
  for (size_t s = 0; s < storages_.size(); ++s) {
    const Storage& st = storages_[s];
    if (!st.in_use) {
      if (refs[s]) broken("storage refs", "free storage referenced");
      continue;
    }
    if (st.refs != refs[s]) broken("storage refs", "storage " + std::to_string(s));
    if (!st.registered) {
      ++orphans;
      if (st.refs == 0) broken("storage refs", "unreferenced orphan");
    }
  }
  if (orphans != num_orphans_) broken("storage refs", "orphan count");
}

}  // namespace das
