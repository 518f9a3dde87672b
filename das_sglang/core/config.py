"""Frozen, self-validating configuration. Every default lives here, once.

CLI flags (`das ...`) and the SGLang plugin's options map onto these fields one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


def check_field(cond: bool, name: str, value: object, why: str) -> None:
    if not cond:
        raise ValueError(f"invalid {name}={value!r}: {why}")


@dataclass(frozen=True, slots=True)
class DrafterConfig:
    """Suffix drafter settings.

    window_steps   training steps of history kept per problem (the sliding window W);
                   the current step's live and finished rollouts are always included.
    step_decay     weight of a history step ``a`` steps old is ``step_decay ** a``
                   (the current step has weight 1): older policies' text counts less.
    max_depth      depth bound of the suffix index: longest substring counted; a match
                   plus its draft never exceeds it. The index is built only as deep as
                   drafting can read (``index_depth``: ``max_match_len + max_budget`` when
                   that is less): deeper levels would cost appends and memory, never a draft.
    max_match_len  longest context suffix used for matching.
    max_budget     most draft nodes ever proposed for one request in one step.
    min_token_prob a node is proposed only if its estimated acceptance probability
                   (product of conditional frequencies along its path) is at least this.
    tree           False proposes a chain (the 1-wide tree).
    global_shard   also index every problem's rollouts in one shared (cross-problem) index
                   (docs/design.md "Shared index"). With ``shared_weight`` > 0 and the wide
                   tree, every draft mixes its problem's matches with the shared index's
                   (formats, tool calls and phrasing that other problems share; a cold-start
                   problem's first step); otherwise the shared index drafts only for rows whose
                   own index has nothing.
    shared_weight  weight of a shared-index anchor relative to a problem-index anchor of
                   the same match length (raw ``shared_weight * m ** mix_alpha``).
    shared_min_match  shortest shared-index match taken as an anchor (shorter ones, shared
                   by many problems, cost the most to merge).
    shared_max_depth  depth bound of the shared index (its ``max_depth``): it serves the
                   short matches a problem's own index lacks, so a shallower index is
                   enough; each appended token updates one cursor per depth level, so this
                   sets the shared index's append cost and size. 0 = ``max_depth``
                   (never deeper than the per-problem indexes' ``index_depth``).
    shared_max_tokens  finished-rollout tokens the shared index keeps (newest first; live
                   requests are always in it): bounds its memory (~145 B per token: 512k
                   tokens ~ 75 MB) apart from the per-problem history; copies past it leave
                   during the next verify forward (else at the next batch extend); a live
                   request's copy starts at its prompt's last shared_max_depth tokens.
                   0 = no cap.
    max_history_tokens  cap on finished-rollout (history) tokens kept; past it the oldest
                   step's rollouts are evicted first, problem by problem (oldest added
                   first), with the policy's statistics of problems left without history.
                   Default 80M tokens: ~10.4 GB of index at the ~130 B per stored token
                   the native index takes, leaving room for live requests, the predictor
                   and snapshots within a 16 GB host budget. 0 = no cap.
    mixture        wide tree (docs/design.md "Wide tree"): merge the continuations of every
                   context suffix length from the longest match down to ``mix_min_match``,
                   each weighted by ``m ** mix_alpha``; False drafts below the longest match only.
    mix_alpha      how much more a longer match counts (raw anchor weight ``m ** mix_alpha``).
    mix_escape     pseudo-weight of "an unseen token comes next" at every node: a continuation
                   seen under little weight gets a lower acceptance estimate.
    mix_min_match  shortest context suffix whose continuations are merged.
    mix_max_fanout stop merging (towards shorter matches) at a match with more distinct
                   continuations than this (bounds the per-step cost).
    mix_recency    recency: where a matched node has two or more continuations, the one
                   seen most recently (the newest occurrence, own text and live siblings
                   included) gets this fraction of the node's continuation weight on top.
                   0 = counts only.
    dedup_prompts  a request whose problem's index already holds a whole copy of the same
                   prompt (an earlier start of it, stored, in the window) indexes only the
                   prompt's last ``index_depth`` tokens: its cursors, and every count a
                   draft reads past the prompt, are those of the whole prompt; only the
                   prompt's inner substrings count one copy per problem and step fewer (a
                   GRPO group indexed its prompt 16 times: ~0.85 ms of native work per
                   start at RL scale). Snapshots and ``history()`` keep the whole text.
                   bench_peers tokens per step: 3.634 / 9.024 / 3.259 vs 3.632 / 9.023 /
                   3.225 with every copy whole.
    mix_min_ratio  shortest anchor relative to the draft's match length L: lengths below
                   ``ceil(mix_min_ratio * L)`` are not merged. Under ``m ** mix_alpha`` they
                   add little to any node's prob, and their match nodes (short contexts have
                   the most continuations) cost the most to scan. 0 = down to ``mix_min_match``.
    skip_unseen    a tree for a row whose last token x never went on anywhere (no suffix
                   matches: a new number, a rare word; no row is drafted otherwise) drafts
                   what followed the context *without* x with another token in x's place
                   (the longest such suffix, every continuation weighted by its count; the
                   tree reports match length 0). bench_peers tokens per step: verl
                   3.610 -> 3.619 (all), 3.258 -> 3.267 (lockstep), 3.418 -> 3.447
                   (fresh-state leave-one-out), SkyThought 3.635 / 9.025 -> 3.642 / 9.033
                   (docs/design.md "Unseen last token").
    skip_discount  the stand-in tree's probs are scaled by this (the policy's budget and
                   ``min_token_prob`` read them): such trees are right far less often than
                   their counts say -- accepted / summed probs 0.13 (verl) to 0.20
                   (SkyThought) at a fixed budget of 16, vs 0.43-0.49 for 1-token matches.
    mix_match_half order of expansion: a node's conditional is scaled by L / (L + this)
                   for ordering only, L = match length + depth, so levels drafted under a
                   short match are trusted less (wider trees after a miss, deep paths under
                   long matches). 0 = best first by prob. The probs are not changed by it.
    """

    window_steps: int = 4
    step_decay: float = 0.7
    max_depth: int = 64
    max_match_len: int = 32
    max_budget: int = 32
    min_token_prob: float = 0.05
    tree: bool = True
    global_shard: bool = True
    shared_weight: float = 0.03
    shared_min_match: int = 1
    shared_max_depth: int = 24
    shared_max_tokens: int = 524_288
    max_history_tokens: int = 80_000_000
    mixture: bool = True
    mix_alpha: float = 4.0
    mix_escape: float = 0.0
    mix_min_match: int = 1
    mix_max_fanout: int = 64
    mix_recency: float = 0.3
    mix_match_half: float = 4.0
    mix_min_ratio: float = 0.15
    dedup_prompts: bool = True
    skip_unseen: bool = True
    skip_discount: float = 0.15

    def __post_init__(self) -> None:
        from das_sglang.native import MAX_STEPS  # step slots of the native index

        check_field(
            0 <= self.window_steps <= MAX_STEPS - 1,
            "window_steps",
            self.window_steps,
            f"must be in [0, {MAX_STEPS - 1}] (the native index keeps {MAX_STEPS} step slots: "
            "the window plus the current step)",
        )
        check_field(0.0 < self.step_decay <= 1.0, "step_decay", self.step_decay, "must be in (0, 1]")
        check_field(2 <= self.max_depth <= 256, "max_depth", self.max_depth, "must be in [2, 256]")
        check_field(
            1 <= self.max_match_len < self.max_depth,
            "max_match_len",
            self.max_match_len,
            f"must be in [1, max_depth={self.max_depth})",
        )
        check_field(0 <= self.max_budget <= 1024, "max_budget", self.max_budget, "must be in [0, 1024]")
        check_field(self.max_history_tokens >= 0, "max_history_tokens", self.max_history_tokens,
                    "must be >= 0 (0 = no cap)")
        check_field(
            0.0 <= self.min_token_prob <= 1.0,
            "min_token_prob",
            self.min_token_prob,
            "must be in [0, 1]",
        )
        check_field(0.0 <= self.mix_alpha <= 16.0, "mix_alpha", self.mix_alpha, "must be in [0, 16]")
        check_field(self.mix_escape >= 0.0, "mix_escape", self.mix_escape, "must be >= 0")
        check_field(self.mix_min_match >= 1, "mix_min_match", self.mix_min_match, "must be >= 1")
        check_field(self.mix_max_fanout >= 1, "mix_max_fanout", self.mix_max_fanout, "must be >= 1")
        check_field(0.0 <= self.shared_weight <= 1e6, "shared_weight", self.shared_weight, "must be in [0, 1e6]")
        check_field(self.shared_min_match >= 1, "shared_min_match", self.shared_min_match, "must be >= 1")
        check_field(self.shared_max_depth == 0 or 2 <= self.shared_max_depth <= self.max_depth,
                    "shared_max_depth", self.shared_max_depth, f"must be 0 or in [2, max_depth={self.max_depth}]")
        check_field(self.shared_max_tokens >= 0, "shared_max_tokens", self.shared_max_tokens, "must be >= 0")
        check_field(self.mix_recency >= 0.0, "mix_recency", self.mix_recency, "must be >= 0")
        check_field(self.mix_match_half >= 0.0, "mix_match_half", self.mix_match_half, "must be >= 0")
        check_field(0.0 <= self.mix_min_ratio < 1.0, "mix_min_ratio", self.mix_min_ratio, "must be in [0, 1)")
        check_field(0.0 < self.skip_discount <= 1.0, "skip_discount", self.skip_discount, "must be in (0, 1]")

    @property
    def index_depth(self) -> int:
        """Depth the per-problem indexes are built to: ``max_depth``, or less where no
        draft can reach it. A draft starts at a match of at most ``max_match_len`` tokens
        and adds at most ``max_budget`` levels (a tree of ``b`` nodes is at most ``b``
        deep; the drafter never drafts more than ``max_budget`` nodes), so the levels past
        ``max_match_len + max_budget`` are never read: every count, continuation and
        recency a draft reads is the same in the shallower index (tests/test_index_depth.py)."""
        return min(self.max_depth, self.max_match_len + max(1, self.max_budget))

    @property
    def shared_index_depth(self) -> int:
        """Depth the shared index is built to (``shared_max_depth``, 0 = ``max_depth``; never
        deeper than ``index_depth``, for the same reason)."""
        return min(self.shared_max_depth or self.max_depth, self.index_depth)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
