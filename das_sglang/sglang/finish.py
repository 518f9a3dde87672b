"""Where a request ends, as one-token-at-a-time decoding would end it.

SGLang checks a speculative step's whole accepted run at once
(``Req.update_finish_state``, ``managers/schedule_batch.py``): it takes the first stop
string *in list order* found in the run's tail, and a stop string found anywhere in
the run beats an EOS accepted earlier in it. Without speculation the request ends at
the first token that completes *any* stop condition. So ``stop=["d", "th"]`` gave
``' the b'`` with speculation where plain decoding gives ``' '``.

:func:`stop_cut` restores the plain-decoding result from our side of the seam: the
worker shortens each request's accepted run to end at the first token where a plain
decode would have stopped (an EOS / stop token, a stop string or stop regex completed
in the tail, or ``max_new_tokens`` reached). SGLang then sees a run in which only the
last token can finish the request, and its own check finds the same stop. The tail
text is decoded exactly as SGLang decodes it (``Req.tail_str``: the last
``stop_*_max_len + 1`` tokens with the request's tokenizer).

:func:`delivered_output` is what the user received (SGLang's ``finished_len``), which is
what history stores; :func:`is_server_warmup` recognises SGLang's start-up warmup
request (``entrypoints/http_server.py``, ``_execute_server_warmup``), which is not a
rollout and is not stored.
"""

from __future__ import annotations

import re
from typing import Sequence

WARMUP_TEXT = "The capital city of France is"  # http_server._execute_server_warmup
WARMUP_IDS = [10, 11, 12]  # the same warmup with --skip-tokenizer-init
WARMUP_MAX_NEW_TOKENS = 8


def _stop_token_ids(req) -> set[int]:
    """Every token id that ends ``req`` (``Req._check_token_based_finish``)."""
    sp = req.sampling_params
    if sp.ignore_eos:
        return set()
    ids = set(sp.stop_token_ids or ()) | set(req.eos_token_ids or ())
    tok = req.tokenizer
    if tok is not None:
        if tok.eos_token_id is not None:
            ids.add(tok.eos_token_id)
        ids |= set(getattr(tok, "additional_stop_token_ids", None) or ())
    return ids


def _stop_text_matches(req, tokens: list[int]) -> bool:
    sp = req.sampling_params
    strs = [s for s in (sp.stop_strs or ()) if s]
    regexes = list(sp.stop_regex_strs or ())
    if not (strs or regexes) or req.tokenizer is None:
        return False
    tail_len = min(max(sp.stop_str_max_len + 1, sp.stop_regex_max_len + 1), len(tokens))
    try:
        tail = req.tokenizer.decode(tokens[-tail_len:])
    except Exception:  # noqa: BLE001 - never raise in the scheduler; SGLang's own check follows
        return False
    if any(s in tail for s in strs):
        return True
    for pattern in regexes:
        try:
            if re.search(pattern, tail):
                return True
        except (re.error, RecursionError):
            continue  # SGLang aborts that request itself (Req._check_str_based_finish)
    return False


def stop_cut(req, run: Sequence[int]) -> int:
    """How many tokens of ``run`` (this step's accepted tokens, bonus included, >= 1)
    a one-token-at-a-time decode would emit before ``req`` finishes (>= 1)."""
    committed = len(req.output_ids)
    limit = len(run)
    max_new = req.sampling_params.max_new_tokens
    if max_new is not None:
        limit = max(1, min(limit, max_new - committed))
    stop_ids = _stop_token_ids(req)
    text_stops = bool(req.sampling_params.stop_strs or req.sampling_params.stop_regex_strs)
    if not stop_ids and not text_stops:
        return limit
    seq = []
    if text_stops:
        # Only the tail a stop-text check decodes (_stop_text_matches: the last
        # max(stop_str_max_len, stop_regex_max_len) + 1 tokens): the same tails as the
        # whole output gives, without copying a long output per request and step.
        sp = req.sampling_params
        keep = max(sp.stop_str_max_len + 1, sp.stop_regex_max_len + 1)
        seq = list(req.output_ids[-keep:])
    for k in range(1, limit + 1):
        token = int(run[k - 1])
        if token in stop_ids:
            return k
        if text_stops:
            seq.append(token)
            if k < limit and _stop_text_matches(req, seq):
                return k
    return limit


def _fast_decode(tokenizer):
    """``tokenizer.decode`` of a list of ids, or the same call one level down where that
    is provably what it runs: a ``TokenizersBackend`` (transformers 5) whose ``decode``
    and ``_decode`` are the library's own, without the space clean-up, decodes a list of
    ids as its Rust backend does (~0.5 vs ~3 us a call). None without a tokenizer."""
    if tokenizer is None:
        return None
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # (another transformers: its own decode)
        return tokenizer.decode
    cls = type(tokenizer)
    backend = getattr(tokenizer, "_tokenizer", None)
    if (cls.decode is PreTrainedTokenizerBase.decode and getattr(cls, "_decode", None) is TokenizersBackend._decode
            and not tokenizer.clean_up_tokenization_spaces and backend is not None):
        raw = backend.decode
        return lambda ids: raw(ids, skip_special_tokens=False)
    return tokenizer.decode


class TextStops:
    """A request's stop strings and regexes (and stop tokens), read once at its start,
    and :meth:`cut`: :func:`stop_cut` for it without re-reading its parameters per call
    (the worker's rows with stop text, ``batch_rows.BatchRows.cut``)."""

    __slots__ = ("stop_ids", "strs", "regexes", "keep", "decode")

    def __init__(self, req, stop_ids: frozenset) -> None:
        sp = req.sampling_params
        self.stop_ids = stop_ids
        self.strs = [s for s in (sp.stop_strs or ()) if s]
        # compiled once (a pattern that does not compile never matches: SGLang aborts
        # that request itself, as _stop_text_matches skips it)
        self.regexes = []
        for pattern in sp.stop_regex_strs or ():
            try:
                self.regexes.append(re.compile(pattern))
            except (re.error, RecursionError):
                continue
        self.keep = max(sp.stop_str_max_len + 1, sp.stop_regex_max_len + 1)
        # (no tokenizer, or nothing to match: the text never ends the request here)
        self.decode = _fast_decode(req.tokenizer) if (self.strs or self.regexes) else None

    def cut(self, output, run: list, limit: int) -> int:
        """``stop_cut(req, run)`` for ``req.output_ids == output``, whose length limit
        (``max_new_tokens``) leaves ``limit`` tokens of ``run``."""
        stop_ids, decode, keep = self.stop_ids, self.decode, self.keep
        if decode is None:
            for k in range(1, limit + 1):
                if int(run[k - 1]) in stop_ids:
                    return k
            return limit
        strs, regexes = self.strs, self.regexes
        seq = list(output[-keep:])  # (the tails _stop_text_matches decodes: the last `keep`)
        for k in range(1, limit + 1):
            token = int(run[k - 1])
            if token in stop_ids:
                return k
            seq.append(token)
            if k < limit:
                try:
                    tail = decode(seq[-keep:])
                except Exception:  # noqa: BLE001 - as _stop_text_matches: SGLang's own check follows
                    continue
                for stop in strs:
                    if stop in tail:
                        return k
                for pattern in regexes:
                    try:
                        if pattern.search(tail):
                            return k
                    except RecursionError:
                        continue
        return limit


def delivered_output(req) -> Sequence[int]:
    """The output tokens the user received: SGLang's ``finished_len`` (stop included)
    and never more than ``max_new_tokens``. As SGLang keeps them (a slice of its
    ``array("q")``; a list in SGLang versions that keep lists): a Python list of a
    4,000-token output, copied again by the session, cost ~60 us a finish where the
    array's slice and one numpy conversion cost ~7."""
    out = req.output_ids_through_stop
    max_new = req.sampling_params.max_new_tokens
    return out if max_new is None or len(out) <= max_new else out[:max_new]


def is_server_warmup(req) -> bool:
    """SGLang's start-up warmup request: untagged, greedy (SGLang stores temperature 0
    as top_k 1), 8 new tokens, a fixed prompt."""
    sp = req.sampling_params
    if sp.custom_params or sp.max_new_tokens != WARMUP_MAX_NEW_TOKENS or sp.top_k != 1:
        return False
    ids = list(req.origin_input_ids_unpadded)
    if ids == WARMUP_IDS:
        return True
    tok = req.tokenizer
    if tok is None or len(ids) > 32:
        return False
    return tok.decode(ids, skip_special_tokens=True).strip() == WARMUP_TEXT
