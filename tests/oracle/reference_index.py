"""Slow, obviously-correct reference of the native SuffixIndex (test oracle only).

An uncompressed trie of dicts: every truncated suffix ``X[i : i + max_depth]`` of every
stored sequence is inserted token by token and every trie node on its path counts it once,
per step. No compression, no cursors, no slots: ``extend`` re-walks from the root, and
``draft_for_sequence`` is literally ``draft(sequence tokens)``. Semantics follow
docs/design.md "Native index"; tie-breaks are spelt out in ``draft``.
"""

from __future__ import annotations

import math

import heapq
from dataclasses import dataclass, field


@dataclass
class _Node:
    children: dict[int, "_Node"] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)  # step -> occurrences
    newest: tuple[int, int] | None = None  # (seq_id, position of this node's token) last counted

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class ReferenceIndex:
    def __init__(self, max_depth: int = 64) -> None:
        self.max_depth = max_depth
        self.root = _Node()
        self.seqs: dict[int, tuple[list[int], int]] = {}  # seq_id -> (tokens, step)
        self.clock = 0  # tokens added so far by add_sequence / extend (recency)
        self.seq_clock: dict[int, int] = {}  # seq_id -> clock after its last add / extend

    # -------------------------------------------------------------- mutation

    def _bump(self, path: list[int], step: int, delta: int, where: tuple[int, int] | None = None) -> None:
        """Add ``delta`` to the count of the trie node spelling ``path`` (created if new);
        ``where`` (seq_id, position) becomes its newest occurrence."""
        node = self.root
        for t in path[:-1]:
            node = node.children[t]
        child = node.children.setdefault(path[-1], _Node())
        if where is not None:
            child.newest = where
        child.counts[step] = child.counts.get(step, 0) + delta
        if child.counts[step] == 0:
            del child.counts[step]
        if not child.counts:
            assert not child.children
            del node.children[path[-1]]

    def add_sequence(self, seq_id: int, tokens: list[int], step: int) -> None:
        assert seq_id not in self.seqs
        self.seqs[seq_id] = ([], step)
        self.extend(seq_id, tokens)

    def extend(self, seq_id: int, tokens: list[int]) -> None:
        seq, step = self.seqs[seq_id]
        for t in tokens:
            seq.append(int(t))
            end = len(seq)
            # Every suffix that now ends at `end` and is not longer than max_depth gains
            # one position: the node one deeper than its old end counts it.
            for i in range(max(0, end - self.max_depth), end):
                self._bump(seq[i:end], step, +1, (seq_id, end - 1))
        self.clock += len(tokens)
        self.seq_clock[seq_id] = self.clock

    def remove_sequence(self, seq_id: int) -> None:
        seq, step = self.seqs.pop(seq_id)
        self.seq_clock.pop(seq_id)
        for i in range(len(seq)):
            # Deepest first so a node is only deleted once its children are gone.
            for j in range(min(len(seq), i + self.max_depth), i, -1):
                self._bump(seq[i:j], step, -1)

    # -------------------------------------------------------------- queries

    def _find(self, path: list[int]) -> _Node | None:
        node = self.root
        for t in path:
            node = node.children.get(t)
            if node is None:
                return None
        return node

    def match_length(self, context: list[int]) -> int:
        for m in range(min(len(context), self.max_depth), 0, -1):
            if self._find(context[len(context) - m :]) is not None:
                return m
        return 0

    @staticmethod
    def _weight(node: _Node, step_weights: dict[int, float]) -> float:
        return sum(step_weights.get(s, 0.0) * c for s, c in sorted(node.counts.items()))

    def draft(self, context, budget, min_prob, step_weights, chain, max_match_len, mix=None):
        """Returns (tokens, parents, probs, match_len) as lists.

        ``mix=(alpha, escape, min_match, max_fanout[, recency, match_half])`` (tree drafts
        only) merges several match lengths, see ``_mixture``.

        Match: the longest suffix of ``context`` (<= max_match_len, < max_depth) present
        with a continuation of weight > 0 (text of weight 0 -- out of the window, not
        removed yet -- is as if it were not stored). Expansion: conditional prob = W(child) / sum of W
        over the children; children with W = 0 are never proposed; nodes below
        ``min_prob`` are not proposed. Tree: best first by (higher prob, smaller token,
        smaller parent index). Chain: at each node the child with the largest W (then the
        smaller token).
        """
        context = [int(t) for t in context]
        top = min(max_match_len, len(context), self.max_depth - 1)
        for m in range(top, 0, -1):
            node = self._find(context[len(context) - m :])
            if node is not None and self._weighted_children(node, step_weights)[1] > 0.0:
                break
        else:
            if mix is not None and not chain and len(mix) == 8 and mix[7]:
                return (*self._skip(context, budget, min_prob, step_weights, mix, max_match_len), 0)
            return [], [], [], 0
        if mix is not None and not chain:
            return (*self._mixture(context, m, budget, min_prob, step_weights, mix), m)
        expand = self._chain if chain else self._tree
        tokens, parents, probs = expand(node, budget, min_prob, step_weights)
        return tokens, parents, probs, m

    def _weighted_children(self, node: _Node, w: dict[int, float]):
        weights = [(t, c, self._weight(c, w)) for t, c in node.children.items()]
        total = sum(x for _, _, x in weights)
        return [(t, c, x) for t, c, x in weights if x > 0.0], total

    def _tree(self, start, budget, min_prob, w):
        heap: list[tuple[float, int, int, int, _Node]] = []
        tie = 0  # heap entries are unique by (prob, token, parent) already

        def push(node: _Node, prob: float, parent: int) -> None:
            nonlocal tie
            kids, total = self._weighted_children(node, w)
            for t, c, x in kids:
                q = prob * (x / total)
                if q >= min_prob:
                    heapq.heappush(heap, (-q, t, parent, tie, c))
                    tie += 1

        tokens, parents, probs = [], [], []
        push(start, 1.0, -1)
        while heap and len(tokens) < budget:
            neg_q, t, parent, _, c = heapq.heappop(heap)
            tokens.append(t)
            parents.append(parent)
            probs.append(-neg_q)
            push(c, -neg_q, len(tokens) - 1)
        return tokens, parents, probs

    def _skip(self, context, budget, min_prob, w, mix, max_match_len):
        """Unseen last token x (no suffix of ``context`` has a weighted continuation): the
        longest suffix s of context[:-1] (<= max_match_len, <= max_depth - 2) with a child
        c != x of weight > 0 whose own children weigh > 0; unless s has more than
        max_fanout weighted children, each such c is an anchor (node s + c, raw W(c)),
        in token order, expanded as ``_mixture`` under match length len(s); probs scaled
        by mix[7] (min_prob applies to the scaled ones)."""
        if len(context) < 2:
            return [], [], []
        x, head = context[-1], context[:-1]

        def anchors_at(node):
            out = []
            for t, c, wc in sorted(self._weighted_children(node, w)[0], key=lambda k: k[0]):
                cont = self._weighted_children(c, w)[1]
                if t != x and cont > 0.0:
                    out.append([c, cont, wc, self])
            return out

        top = min(max_match_len, len(head), self.max_depth - 2)
        for m in range(top, 0, -1):
            node = self._find(head[len(head) - m :])
            anchors = anchors_at(node) if node is not None else []
            if anchors:
                break
        else:
            return [], [], []
        if len(self._weighted_children(node, w)[0]) > mix[3]:
            return [], [], []
        scale = float(mix[7])  # probs scaled by it; the cut on the scaled probs
        tokens, parents, probs = self._mixture(context, m, budget, min_prob / scale, w, mix, anchors=anchors)
        return tokens, parents, [x * scale for x in probs]

    def _anchors(self, context, longest, w, alpha, max_fanout, floor, own, shared) -> list:
        """``_mixture``'s anchors, [node, C, raw, index] each: this index's (from ``own``,
        default ``longest``, down to ``floor``), then the shared index's."""
        sources = [(self, longest if own is None else own, 1.0)]
        if shared is not None:  # a shared index's anchors come after the own ones
            sources.append(shared)
        anchors: list = []
        for ix, top, factor in sources:
            for m in range(top, floor - 1, -1):
                node = ix._find(context[len(context) - m :])
                if len(ix._weighted_children(node, w)[0]) > max_fanout:
                    break
                _, c = ix._weighted_children(node, w)
                if c <= 0.0:
                    continue
                raw = float(m) ** alpha * factor
                if anchors and anchors[-1][3] is ix and anchors[-1][1] == c:
                    anchors[-1][0] = node
                    anchors[-1][2] += raw
                else:
                    anchors.append([node, c, raw, ix])
        return anchors

    def _mixture(self, context, longest, budget, min_prob, w, mix, own=None, shared=None, anchors=None):
        """Wide tree. Anchors: the match nodes of context suffixes m = longest .. min_match
        (stop at the first with more than max_fanout children of weight > 0). An anchor's continuation
        weight C = sum of its children's W; anchors with C = 0 are skipped; an anchor whose C
        equals the previous (longer) kept anchor's replaces it (same occurrences continue),
        adding its raw weight m ** alpha to it. lambda = raw / sum(raw).
        Virtual tree: a node is a token path below the root; P_a(path) = product over the
        path of W(child) / (C(parent) + escape) walking a's subtree (0 once it leaves it);
        prob(path) = sum over anchors, in anchor order, of lambda_a * P_a(path). Best first
        with the same tie-breaks as ``_tree``; nodes below min_prob are never proposed. An
        anchor whose term is below 1/64 of a node's prob is not followed below that node.
        Recency: where an anchor's node has >= 2 weighted children, the one with the newest
        occurrence (``_recency``; ties: smaller token) counts W + recency * C, and C grows by
        recency * C. match_half = h > 0: nodes come best first by score instead of prob,
        score(child) = score(parent) * prob(child) / prob(parent) * n / (n + h), n = the
        longest match + the child's depth (0 under the root)."""
        alpha, escape, min_match, max_fanout = mix[:4]
        recency, half = mix[4:6] if len(mix) >= 6 else (0.0, 0.0)
        # shortest anchor: min_match, and min_ratio (7th) of the draft's match length
        ratio = mix[6] if len(mix) >= 7 else 0.0
        floor = max(1, min_match, math.ceil(ratio * longest) if ratio > 0.0 else 1)
        if anchors is None:  # (given: _skip's)
            anchors = self._anchors(context, longest, w, alpha, max_fanout, floor, own, shared)
        if not anchors or budget <= 0:
            return [], [], []
        total = 0.0
        for a in anchors:
            total += a[2]
        lam = [a[2] / total for a in anchors]
        heap: list = []
        tie = 0

        def push(states, parent, parent_prob, parent_score, depth):
            nonlocal tie
            entries = []  # (token, anchor, child node, P_a)
            for a, node, pa in states:
                kids, csum = self._weighted_children(node, w)
                denom, boost = csum + escape, None
                if recency > 0.0 and len(kids) >= 2:
                    # the child seen most recently (ties: smaller token) gets recency * C
                    ix = anchors[a][3]
                    boost = max(kids, key=lambda k: (ix._recency(k[1]), -k[0]))[0]
                    denom += recency * csum
                for t, c, x in kids:
                    if t == boost:
                        x = x + recency * csum
                    entries.append((t, a, c, pa * (x / denom)))
            entries.sort(key=lambda e: (e[0], e[1]))
            k = 0
            while k < len(entries):
                z, prob = k, 0.0
                while z < len(entries) and entries[z][0] == entries[k][0]:
                    prob += lam[entries[z][1]] * entries[z][3]
                    z += 1
                prob = min(prob, parent_prob)  # exact in reals; keeps rounding from exceeding it
                if prob >= min_prob:
                    # an anchor adding < 1/64 of the node's prob is not followed below it
                    child_states = [(e[1], e[2], e[3]) for e in entries[k:z] if lam[e[1]] * e[3] >= prob / 64]
                    score = prob
                    if half > 0.0 and parent_prob > 0.0:  # expansion order, see DrafterConfig
                        n = float(longest + depth)
                        score = parent_score * (prob / parent_prob) * (n / (n + half))
                    heapq.heappush(heap, (-score, entries[k][0], parent, tie, child_states, prob, score, depth))
                    tie += 1
                k = z

        tokens, parents, probs = [], [], []
        push([(a, anchors[a][0], 1.0) for a in range(len(anchors))], -1, 1.0, 1.0, 0)
        while heap and len(tokens) < budget:
            _, t, parent, _, states, prob, score, depth = heapq.heappop(heap)
            tokens.append(t)
            parents.append(parent)
            probs.append(prob)
            if len(tokens) < budget:
                push(states, len(tokens) - 1, prob, score, depth + 1)
        return tokens, parents, probs

    def _recency(self, node: _Node) -> int:
        """When the newest occurrence of ``node``'s compressed edge was counted, on the add /
        extend clock: the sequence's clock minus how many of its tokens follow the edge's
        first token. The edge runs down through pass-through nodes (one child, no suffix
        ending there) to the deepest one, whose newest occurrence it is."""
        k = 0
        while len(node.children) == 1:
            (only,) = node.children.values()
            if node.total != only.total:  # a suffix ends here: the edge ends here
                break
            node, k = only, k + 1
        seq_id, pos = node.newest
        return self.seq_clock[seq_id] - (len(self.seqs[seq_id][0]) - (pos - k))

    def _chain(self, start, budget, min_prob, w):
        tokens, parents, probs = [], [], []
        node, prob = start, 1.0
        while len(tokens) < budget:
            kids, total = self._weighted_children(node, w)
            if not kids:
                break
            t, c, x = min(kids, key=lambda k: (-k[2], k[0]))
            prob = prob * (x / total)
            if prob < min_prob:
                break
            tokens.append(t)
            parents.append(len(tokens) - 2)
            probs.append(prob)
            node = c
        return tokens, parents, probs

    def draft_for_sequence(self, seq_id, budget, min_prob, step_weights, chain, max_match_len, mix=None,
                           shared=None, shared_weight=0.0):
        context = self.seqs[seq_id][0]
        if shared is None or shared_weight <= 0.0 or mix is None or chain or seq_id not in shared.seqs:
            return self.draft(context, budget, min_prob, step_weights, chain, max_match_len, mix)
        own = self._longest(context, max_match_len, step_weights)
        other = shared._longest(context, max_match_len, step_weights)
        if own == 0 and other == 0:
            if len(mix) == 8 and mix[7]:
                return (*self._skip([int(t) for t in context], budget, min_prob, step_weights, mix,
                                    max_match_len), 0)
            return [], [], [], 0
        longest = max(own, other)
        tokens, parents, probs = self._mixture([int(t) for t in context], longest, budget, min_prob,
                                               step_weights, mix, own, (shared, other, shared_weight))
        return tokens, parents, probs, longest

    def _longest(self, context, max_match_len, w) -> int:
        """The longest suffix of ``context`` with a continuation of weight > 0 here (0: none)."""
        context = [int(t) for t in context]
        top = min(max_match_len, len(context), self.max_depth - 1)
        for m in range(top, 0, -1):
            node = self._find(context[len(context) - m :])
            if node is not None and self._weighted_children(node, w)[1] > 0.0:
                return m
        return 0

    # -------------------------------------------------------------- introspection

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s, _ in self.seqs.values())

    def steps(self) -> list[int]:
        return sorted({step for _, step in self.seqs.values()})

    def canonical_num_nodes(self) -> int:
        """Nodes of the path-compressed tree: root + trie nodes that branch, end a suffix
        (count exceeds the children's), or are leaves. Pass-through nodes are compressed."""
        n, stack = 1, [self.root]
        while stack:
            node = stack.pop()
            for c in node.children.values():
                kids = len(c.children)
                ends = c.total - sum(g.total for g in c.children.values())
                n += kids != 1 or ends > 0
                stack.append(c)
        return n
