// Depth-bounded, path-compressed, incrementally updated suffix tree over int32 token
// sequences, counting occurrences per training-step slot. Semantics: docs/design.md,
// "Native index". Reference (slow, obvious) implementation: tests/oracle/.
//
// What is counted. For every stored sequence X (length L) and every start i < L, the
// truncated suffix X[i : min(i + max_depth, L)] is inserted; every tree position on its
// path counts it once. So count(x) = number of occurrences of string x (|x| <= max_depth).
// The root counts nothing.
//
// Shape invariants (check_integrity() verifies each one and names the one that fails):
//  - canonical: every non-root node has total > 0 and is not a pass-through (exactly one
//    child and no suffix ending at it). Hence the node set is a function of the stored
//    strings alone: removing a sequence returns num_nodes to what it was before it was
//    added, with no garbage collection pass.
//  - boundary: every suffix end (in particular every live sequence's cursor) is a node.
//  - counts: count_s(n) = ends_s(n) + sum over children count_s(child), per slot s.
//  - anchored labels: a node's edge label is (storage, start, len) and
//    storage[start + len - depth : start + len] equals the node's whole path string. This
//    is what makes re-pointing and merging cheap: the parent's label is the `len` tokens
//    just before a child's label start in the child's storage.
//
// Incremental append (O(max_depth) per token). A registered sequence keeps, in a ring of
// max_depth slots, the node where each of its active suffixes X[i:L] (L - i < max_depth)
// ends. Appending token t moves each of those ends one token deeper:
//  - the end is a leaf only it reaches: grow the leaf's edge in place (new text);
//  - the end is a node whose only end is ours, with one child, and t continues that child's
//    multi-token edge: slide the node one token down the edge (copied text);
//  - otherwise step into child t (count +1), splitting its edge after t if it is longer,
//    or create a new leaf; the node left behind is merged into its child if it became a
//    pass-through.
// Queries: draft() binary-searches the longest context suffix with a continuation (the
// property is monotone in the length); draft_for_sequence() binary-searches the cursor
// ring instead, so it never walks from the root.
//
// Threads: const methods may run concurrently with each other (draft_batch releases the
// GIL); a mutation must not overlap any other call on the same index.
//
// Storage lifetime (why labels of removed sequences never dangle). Appends point the label
// of every node a suffix end moves to into the appending sequence (newest occurrence
// wins), so with oldest-first eviction few labels reference a sequence when it goes.
//  remove_sequence(X) walks X's suffix paths (every node whose label references X lies on
//  one of them, by anchoring), decrements, then fixes the touched nodes deepest first:
//  zero-count nodes are freed, pass-throughs merged into their child, and a surviving node
//  whose label still references X is re-pointed into its first child's storage (children
//  were fixed first, so that storage is not X). A surviving leaf has no child to borrow
//  from: its path (<= max_depth tokens) is copied into a small private "orphan" storage.
//  Afterwards no label references X, so X's storage is released at once. Orphans are
//  reference counted by the labels using them and freed when the last one goes; there is
//  at most one per leaf, so storage stays O(stored tokens + leaves * max_depth).
#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <type_traits>
#include <vector>

namespace das {

// Distinct live steps per index (window + current). 7 makes a Node exactly one cache line.
constexpr int kSlots = 7;
constexpr uint32_t kNil = 0xFFFFFFFFu;  // "no node" / "no storage"
constexpr uint32_t kRoot = 0;
// Children of a node with at most kScanFanout children are found by scanning its child
// list (they are touched anyway; most deep nodes have one or two children); the root and
// wider nodes keep their children in the ChildMap as well. 8, not 4 (measured at RL scale,
// 2,048 problems x 16 rollouts, two drafters on the same history in one process): 5% fewer
// index bytes per token (95.1 -> 90.2: fewer map entries), appends of a 512-row step and
// the removal of a step's rollouts as fast (own-index appends p50 4.01 vs 4.15 and 5.65 vs
// 5.56 ms in two runs, shared 2.81 vs 2.81 and 3.44 vs 3.37; removals 3.945 vs 3.963 s for
// 8,192 rollouts). 2 was slower (appends +16%) and 8.5% larger.
constexpr uint32_t kScanFanout = 8;

struct alignas(64) Node {  // one cache line: an append touches a few nodes per suffix
  uint32_t parent;        // for unlinking and merging without a search
  uint32_t first_child;   // children list: iteration for draft expansion and integrity
  uint32_t next_sibling;  // doubly linked so unlinking a child is O(1)
  uint32_t prev_sibling;
  uint32_t label_storage; // edge label = storages_[label_storage].tokens[label_start, +label_len)
  uint32_t label_start;
  uint16_t label_len;     // > 0 except for the root (<= depth <= max_depth <= 4096)
  uint16_t depth;         // string depth at the end of this edge
  uint32_t fanout;        // number of children: decides list scan vs ChildMap lookup
  int32_t token;          // first label token: the key under which the parent finds us
  uint32_t count[kSlots]; // occurrences per step slot (see slot_step_)

  uint32_t total() const {  // pass-through / in-place-extension tests; the line is loaded
    uint32_t t = 0;
    for (int s = 0; s < kSlots; ++s) t += count[s];
    return t;
  }
};
static_assert(sizeof(Node) == 64, "Node should stay one cache line");

// Token storage of one sequence (or an orphaned path copy, see header comment).
struct Storage {
  std::vector<int32_t> tokens;
  std::vector<uint32_t> cursors;  // registered sequences: node where suffix i ends, at i % D
  int64_t seq_id = 0;
  uint64_t clock = 0;     // index clock after this sequence's last add/extend (recency)
  uint32_t refs = 0;      // labels pointing here
  int slot = -1;          // step slot of a registered sequence, -1 for orphans / free
  bool registered = false;// a live (not removed) sequence; false for orphans
  bool in_use = false;    // false while on the free list
};

// Allocator of the index's large arrays (nodes, child map, scratch marks): blocks of at
// least kMapBytes are mapped straight from the OS and unmapped when freed, so evicted
// history gives its pages back at once. Through malloc they would land in the heap (glibc
// raises its mmap threshold after the first large free) and only a process-wide
// malloc_trim -- which holds the allocator's locks while it walks the heap, stalling every
// other thread's malloc -- would return them.
template <class T>
struct MappedAlloc {
  using value_type = T;
  static constexpr size_t kMapBytes = size_t(1) << 14;
  MappedAlloc() noexcept = default;
  template <class U>
  MappedAlloc(const MappedAlloc<U>&) noexcept {}
  static size_t round_up(size_t b) { return (b + 4095) & ~size_t(4095); }
  T* allocate(size_t n) {
    const size_t b = n * sizeof(T);
    if (b < kMapBytes) return static_cast<T*>(::operator new(b, std::align_val_t(alignof(T))));
    void* p = mmap(nullptr, round_up(b), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t n) noexcept {
    const size_t b = n * sizeof(T);
    if (b < kMapBytes)
      ::operator delete(p, std::align_val_t(alignof(T)));
    else
      munmap(p, round_up(b));
  }
  template <class U>
  bool operator==(const MappedAlloc<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const MappedAlloc<U>&) const noexcept { return false; }
};
template <class T>
using BigVector = std::vector<T, MappedAlloc<T>>;

// Address space reserved up front per MappedArray (virtual only: PROT_NONE, not
// committed, no page tables; see MappedArray). 256 MiB = 4M nodes, more than any index
// holds at RL scale (a problem's ~1.6 MB, the shared index's ~60 MB at its 512k-token
// cap); 2,048 problems reserve 0.5 TiB of the 128 TiB address space.
// (Settable for tests and tight RLIMIT_AS: node_reserve_bytes / set_node_reserve_bytes.)
inline std::atomic<size_t>& mapped_array_reserve_bytes() {
  static std::atomic<size_t> bytes{size_t(1) << 28};
  return bytes;
}

// Growable array of a trivially copyable T that never moves while it fits its
// reservation: the first growth reserves address space (mapped_array_reserve_bytes(),
// PROT_NONE) and each growth makes more of it readable and writable in place
// (mprotect: no copy, no new mapping). Pages are touched only as elements are added, so
// the reserved tail costs no RSS. Past the reservation (or where it cannot be had, e.g.
// under a tight RLIMIT_AS) it moves to a new one twice as large by copying.
//
// Until this version growth was mremap(MREMAP_MAYMOVE): equally copy-free, but it made
// the kernel's reverse-map walks of our pages expensive. Measured on the 2-vCPU dev VM
// (DAMON paddr monitoring on): with bench_host_path's 2,048 x 16 history built and the
// process idle, kdamond took 45-50% of a core, its time in page_vma_mapped_walk under
// rmap_walk_anon (perf), vs 0.2-0.4% with arrays that never move (copy growth, or this
// reservation) -- 19-25 ms of CPU per 512-row step taken from the native job. (Our reading:
// a moved mapping keeps its page offset and anon_vma, so after thousands of moves an
// anon_vma holds many mappings whose offsets overlap, and each walk visits them all; any
// rmap walk pays it -- reclaim, compaction, migration -- not only DAMON's sampling.)
template <class T>
class MappedArray {
  static_assert(std::is_trivially_copyable<T>::value, "MappedArray holds plain data");

 public:
  MappedArray() = default;
  MappedArray(const MappedArray&) = delete;
  MappedArray& operator=(const MappedArray&) = delete;
  ~MappedArray() {
    if (data_ != nullptr) munmap(data_, reserved_);
  }
  size_t size() const { return size_; }
  size_t capacity() const { return bytes_ / sizeof(T); }
  bool empty() const { return size_ == 0; }
  T* data() { return data_; }
  const T* data() const { return data_; }
  T& operator[](size_t i) { return data_[i]; }
  const T& operator[](size_t i) const { return data_[i]; }
  T& back() { return data_[size_ - 1]; }
  void reserve(size_t n) {
    if (n <= capacity()) return;
    const size_t want = page_up(n * sizeof(T));
    if (want <= reserved_) {  // in place: the next part of the reservation
      if (mprotect(reinterpret_cast<char*>(data_) + bytes_, want - bytes_, PROT_READ | PROT_WRITE) != 0)
        throw std::bad_alloc();
      bytes_ = want;
      return;
    }
    size_t res = std::max(want, std::max(page_up(mapped_array_reserve_bytes().load()), 2 * reserved_));
    void* p = mmap(nullptr, res, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED && res > want) {  // no room for the headroom: exactly what is needed
      res = want;
      p = mmap(nullptr, res, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    }
    if (p == MAP_FAILED) throw std::bad_alloc();
    if (mprotect(p, want, PROT_READ | PROT_WRITE) != 0) {
      munmap(p, res);
      throw std::bad_alloc();
    }
    if (data_ != nullptr) {
      std::memcpy(p, data_, size_ * sizeof(T));
      munmap(data_, reserved_);
    }
    data_ = static_cast<T*>(p);
    reserved_ = res;
    bytes_ = want;
  }
  void push_back(const T& x) {
    if (size_ == capacity()) reserve(size_ + size_ / 4 + 64);
    data_[size_++] = x;
  }
  T& emplace_back() {
    if (size_ == capacity()) reserve(size_ + size_ / 4 + 64);
    data_[size_] = T{};
    return data_[size_++];
  }
  // Hand the pages of elements [first, last) back to the OS (both page-aligned element
  // indices below size()): they read as zeros afterwards and cost RSS again only once
  // written. For elements the owner no longer uses (SuffixIndex's free nodes).
  void release(size_t first, size_t last) {
    if (last > first)
      madvise(reinterpret_cast<char*>(data_) + first * sizeof(T), (last - first) * sizeof(T), MADV_DONTNEED);
  }
  static constexpr size_t kPerPage = 4096 / sizeof(T);

 private:
  static size_t page_up(size_t b) { return (b + 4095) & ~size_t(4095); }
  T* data_ = nullptr;
  size_t size_ = 0;
  size_t bytes_ = 0;     // readable and writable (the capacity)
  size_t reserved_ = 0;  // mapped in all (the rest PROT_NONE)
};

// Open-addressing map (parent, token) -> child, linear probing, backward-shift deletion.
// One flat table instead of per-node maps: O(1) child lookup at high-fanout nodes (the
// root has one child per distinct token) without a heap object per node. Holds exactly the
// children of the root and of nodes with more than kScanFanout children.
class ChildMap {
 public:
  ChildMap();
  uint32_t find(uint32_t parent, int32_t token) const;
  static uint64_t mix_key(uint64_t k) {  // the slot hash
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return k;
  }
  void prefetch(uint32_t parent, int32_t token) const {  // cache hint for find()
    const size_t i = mix_key(key(parent, token)) & mask_;
    __builtin_prefetch(&keys_[i]);
    __builtin_prefetch(&vals_[i]);
  }
  void insert(uint32_t parent, int32_t token, uint32_t child);  // key must be absent
  void assign(uint32_t parent, int32_t token, uint32_t child);  // key must be present
  void erase(uint32_t parent, int32_t token);                   // key must be present
  size_t size() const { return size_; }
  size_t memory_bytes() const { return keys_.capacity() * 12; }

 private:
  static uint64_t key(uint32_t p, int32_t t) { return (uint64_t(p) << 32) | uint32_t(t); }
  size_t slot_of(uint64_t k) const;
  void grow();
  BigVector<uint64_t> keys_;  // kEmpty marks a free slot
  BigVector<uint32_t> vals_;
  size_t size_ = 0;
  size_t mask_ = 0;
};

// One draft tree, flat, best-first (docs/design.md "Draft tree").
struct Draft {
  std::vector<int32_t> tokens;
  std::vector<int32_t> parents;
  std::vector<double> probs;
  int match_len = 0;
};

class SuffixIndex;

struct DraftParams {
  int budget = 0;
  double min_prob = 0.0;
  bool chain = false;
  int max_match_len = 0;
  double slot_weight[kSlots] = {};  // weight of each slot (0 for unused / unweighted)
  // Mixture drafting (docs/design.md "Wide tree"): when `mixture` is set, a tree draft
  // merges the continuations of every context suffix length m in [mix_min_match, longest]
  // (stopping at the first, going shorter, whose match node has more than mix_max_fanout
  // continuations). Anchors whose continuation weight equals the next longer one's have
  // the same continuations: they are merged (the shorter match is kept, it reaches deeper)
  // and their raw weights m^mix_alpha add up. A node's prob is sum_a lambda_a * P_a(path),
  // lambda = normalised raw weights, P_a = product of W(child) / (W(children) + mix_escape)
  // along the path below anchor a (0 if it leaves a's subtree). Chain drafts ignore it.
  // Recency (docs/design.md "Wide tree"): where an anchor's node has two or more weighted
  // children, the one whose newest occurrence is the most recent (recency_of) gets
  // mix_recency * W(children) extra weight (added to the denominator too).
  // Order: with mix_match_half = h > 0 nodes are expanded best first by a score instead of
  // the prob: score(child) = score(parent) * prob(child) / prob(parent) * L / (L + h),
  // L = match_len + depth (depth 0 for a root child): a level drafted under a short match
  // is trusted less, so short matches draft wider trees and long ones deep paths. Probs
  // (output, min_prob) are unchanged by it.
  bool mixture = false;
  double mix_alpha = 4.0;
  double mix_escape = 0.0;
  int mix_min_match = 1;
  int mix_max_fanout = 1 << 30;
  double mix_recency = 0.0;
  double mix_match_half = 0.0;
  // Shortest anchor relative to the draft's match length L (max of the own and shared
  // matches): anchors are taken down to max(1, mix_min_match, ceil(mix_min_ratio * L)).
  // Under m^alpha weights a match far shorter than L adds almost nothing to any node's
  // prob, while its node (short matches have the most continuations) is the most costly
  // to scan. 0 = every length down to mix_min_match.
  double mix_min_ratio = 0.0;
  int mix_floor(int match_len) const {
    const int r = mix_min_ratio > 0.0 ? int(std::ceil(mix_min_ratio * double(match_len))) : 1;
    return std::max({1, mix_min_match, r});
  }
  // Unseen last token (docs/design.md "Unseen last token"): with a mixture tree, where no
  // suffix of the context has a weighted continuation (its last token x never went on
  // anywhere: a new number, a rare word), draft what followed the context *without* x
  // with one token in x's place: the longest suffix of context[:-1] with a weighted
  // continuation c != x that itself goes on; every such c is an anchor at the position
  // after it, raw weight W(c) (anchors in token order), expanded as a mixture under that
  // suffix's length. The tree reports match length 0 (no match of the context itself).
  // 0: off; else its probs are scaled by this (such a tree is right far less often than
  // its counts say; min_prob applies to the scaled probs, the order is unchanged).
  double skip_unseen = 0.0;
  // m^mix_alpha for m < kMixPow (std::pow's own results, filled by set_mix from a table it
  // keeps per alpha; add_anchor reads them instead of calling pow per anchor: 5 % of a
  // draft's time). Unset (a DraftParams not made by set_mix): add_anchor calls pow.
  static constexpr int kMixPow = 65;
  bool mix_pow_set = false;
  double mix_pow[kMixPow] = {};
  // Shared (cross-problem) index (docs/design.md "Shared index"): with a mixture tree
  // draft_for_sequence also takes anchors from `shared` (which holds the same seq_id: every
  // sequence is added to both), each weighing shared_weight * m^mix_alpha, so where the
  // problem's own index matches only briefly the text of other problems fills the tree.
  // The tree's match length (score order) is the longer of the two matches. Unused when
  // null, shared_weight <= 0 or the sequence is not in `shared`.
  const SuffixIndex* shared = nullptr;
  double shared_weight = 0.0;
  int shared_min_match = 1;  // shortest shared-index match taken as an anchor
  double shared_slot_weight[kSlots] = {};
  // The shared index a tree draft from index `from` mixes in, or null: a mixture tree, a
  // shared index with weight, and not `from` itself (null `from`: any index but it).
  const SuffixIndex* mixed_shared(const SuffixIndex* from) const {
    return mixture && !chain && shared != nullptr && shared_weight > 0.0 && shared != from ? shared : nullptr;
  }
};

class SuffixIndex {
 public:
  explicit SuffixIndex(int max_depth);

  void add_sequence(int64_t seq_id, const int32_t* tokens, size_t n, int64_t step);
  void extend(int64_t seq_id, const int32_t* tokens, size_t n);
  // A registered sequence's storage id (kNil if unknown): valid until that sequence is
  // removed (other mutations never move it). Batch callers look it up once and then use
  // extend_storage / prefetch_storage, without a seq_id lookup per call.
  uint32_t storage_id(int64_t seq_id) const {
    auto it = by_id_.find(seq_id);
    return it == by_id_.end() ? kNil : it->second;
  }
  void extend_storage(uint32_t storage, const int32_t* tokens, size_t n);
  // Cache hints for a later extend_storage of that storage (no effect on any result): its
  // record only (`record_only`: a load-free hint, a few rows ahead), or the record and the
  // cursor ring behind it (reads the record: one row ahead).
  void prefetch_storage(uint32_t storage, bool record_only = false) const;
  void remove_sequence(int64_t seq_id);

  int match_length(const int32_t* ctx, size_t n) const;
  void draft(const int32_t* ctx, size_t n, const DraftParams& p, Draft& out) const;
  void draft_for_sequence(int64_t seq_id, const DraftParams& p, Draft& out) const;
  // Cache hints for a later draft_for_sequence (no effect on any result): batch drafting
  // calls them a few rows ahead so the memory reads of several rows overlap. Stage 1
  // returns the sequence's storage (kNil if unknown) and prefetches its cursor ring;
  // stage 2 prefetches the nodes where its last `max_m` suffixes end.
  uint32_t prefetch_sequence(int64_t seq_id) const;
  void prefetch_cursor_nodes(uint32_t storage, int max_m) const;
  // Stage 3: the children lists a draft of the sequence scans first (its match node's, or
  // with `mixture` every anchor's), as list heads for walk_lists. The sibling lists are
  // linked: one list is a chain of dependent cache misses, but the lists of several
  // anchors (and rows) are independent, so walking them round-robin overlaps their misses.
  // `as_shared`: the lists of the anchors draft_for_sequence takes from this index as
  // another index's `p.shared` (shortest anchor max(1, mix_min_match, shared_min_match)).
  struct ListHead { const Node* nodes; uint32_t cur; };
  void draft_lists(uint32_t storage, const DraftParams& p, std::vector<ListHead>& out,
                   bool as_shared = false) const;
  static void walk_lists(std::vector<ListHead>& heads);

  // Slot weights from a step -> weight table (steps absent from the table weigh 0).
  void slot_weights(const int64_t* steps, const double* weights, size_t n,
                    double out[kSlots]) const;

  int max_depth() const { return max_depth_; }
  size_t num_nodes() const { return nodes_.size() - free_nodes_.size(); }
  size_t num_sequences() const { return by_id_.size(); }
  size_t num_tokens() const { return num_tokens_; }
  size_t num_orphans() const { return num_orphans_; }
  // Bumped by every mutation (add / extend / remove): a draft computed at version v is
  // still exact while the version is v (draft_rows results can be reused across calls).
  uint64_t version() const { return version_; }
  // Bumped with every index's version, process-wide: while it is unchanged no SuffixIndex
  // changed at all, so every version read before is still current (one read instead of
  // one per index: SuffixDrafter's pre-drafted trees at the next plan).
  static uint64_t mutation_epoch() { return epoch_.load(std::memory_order_acquire); }
  size_t memory_bytes() const;
  std::vector<int64_t> steps() const;
  bool has_sequence(int64_t seq_id) const { return by_id_.count(seq_id) != 0; }
  int64_t sequence_step(int64_t seq_id) const;
  // When the newest occurrence of node x's edge was appended, on the index clock (tokens
  // added so far): clock of its label's sequence after its last add/extend, minus how many
  // of that sequence's tokens follow the edge's first token. 0 for orphaned labels.
  // Labels are re-pointed at every append, so this is exact until a removal re-points a
  // label into another occurrence (see "Storage lifetime").
  double recency_of(uint32_t x) const;
  const std::vector<int32_t>& sequence_tokens(int64_t seq_id) const;
  std::vector<int64_t> sequence_ids() const;
  void check_integrity() const;  // throws std::runtime_error naming the invariant

 private:
  uint32_t storage_of(int64_t seq_id) const;  // throws std::invalid_argument naming seq_id
  // Longest suffix of the sequence with a continuation (<= max_match_len), from its cursors.
  int sequence_match(const Storage& st, int max_match_len) const;
  int weighted_match(const Storage& st, int m, const double* w) const;
  uint32_t weighted_fanout(const Node& x, const double* w, uint32_t cap) const;
  int acquire_slot(int64_t step);
  void release_slot(int slot);
  uint32_t new_storage();
  void unref_storage(uint32_t s);
  void free_storage(uint32_t s);
  uint32_t new_node();
  void free_node(uint32_t n);
  void set_label(uint32_t n, uint32_t storage, uint32_t start, uint32_t len);
  int32_t label_token(const Node& n, uint32_t off) const {
    return storages_[n.label_storage].tokens[n.label_start + off];
  }
  bool indexed(uint32_t n) const { return n == kRoot || nodes_[n].fanout > kScanFanout; }
  uint32_t find_child(uint32_t n, int32_t token) const;
  void link_child(uint32_t parent, uint32_t child);
  void unlink_child(uint32_t child);
  void replace_child(uint32_t old_child, uint32_t new_child);
  bool is_pass_through(uint32_t n) const;

  void append_token(uint32_t s, int32_t t);
  uint32_t step_suffix(uint32_t s, uint32_t c, int32_t t, uint32_t pos);
  uint32_t split(uint32_t ch);
  void merge_into_child(uint32_t n);
  void fix_after_removal(uint32_t n, uint32_t removed);
  void make_orphan_label(uint32_t n);

  struct Pos { uint32_t node; uint32_t off; };  // off == label_len: at the node itself
  bool walk(const int32_t* s, size_t n, Pos& pos) const;
  bool has_continuation(const Pos& pos) const;
  int longest_match(const int32_t* ctx, size_t n, int max_match_len, Pos& pos) const;
  double weight_of(const Node& n, const double* w) const;
  void expand(const Pos& start, const DraftParams& p, Draft& out) const;
  void expand_chain(const Pos& start, const DraftParams& p, Draft& out) const;
  struct Anchor { Pos pos; double cont; double raw; int m; int src; };  // src 1: p.shared
  double continuation_weight(const Pos& pos, const double* w) const;
  bool add_anchor(std::vector<Anchor>& anchors, const Pos& pos, int m, const DraftParams& p,
                  int src) const;
  void expand_mixture(const std::vector<Anchor>& anchors, const DraftParams& p, Draft& out) const;
  // DraftParams::skip_unseen's tree for the context ctx[0, n) (out empty on entry).
  void skip_draft(const int32_t* ctx, size_t n, const DraftParams& p, Draft& out) const;
  // The weighted continuations c != x at pos that go on (skip_draft's anchors); with
  // `anchors` null, only whether there is one.
  bool skip_anchors(const Pos& pos, int32_t x, int m, const DraftParams& p, std::vector<Anchor>* anchors) const;

  int max_depth_;
  MappedArray<Node> nodes_;             // nodes_[kRoot] is the root
  std::vector<uint32_t> free_nodes_;    // freed node ids, reused first
  size_t frees_since_release_ = 0;      // nodes freed since maybe_release_free_pages last ran
  void maybe_release_free_pages();
  BigVector<uint8_t> removal_marks_;    // remove_sequence scratch: touched-node marks, kept
                                        // zeroed so a removal costs O(its paths), not O(nodes)
  BigVector<uint8_t>& node_marks() {    // removal_marks_, one per node (all zero between uses)
    if (removal_marks_.size() < nodes_.size()) removal_marks_.resize(nodes_.capacity(), 0);
    return removal_marks_;
  }
  ChildMap children_;
  std::vector<Storage> storages_;
  std::vector<uint32_t> free_storages_;
  std::unordered_map<int64_t, uint32_t> by_id_;  // seq_id -> storage
  int64_t slot_step_[kSlots];           // step held by each slot
  uint32_t slot_seqs_[kSlots];          // registered sequences per slot; 0 = slot free
  size_t num_tokens_ = 0;               // tokens of registered sequences
  size_t num_orphans_ = 0;
  uint64_t version_ = 0;
  void bump_version() {
    ++version_;
    epoch_.fetch_add(1, std::memory_order_acq_rel);
  }
  static inline std::atomic<uint64_t> epoch_{0};
  uint64_t clock_ = 0;                  // tokens added so far, any sequence (recency_of)
};

}  // namespace das
