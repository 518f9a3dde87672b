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
    seq = list(req.output_ids) if text_stops else []
    for k in range(1, limit + 1):
        token = int(run[k - 1])
        if token in stop_ids:
            return k
        if text_stops:
            seq.append(token)
            if k < limit and _stop_text_matches(req, seq):
                return k
    return limit


def delivered_output(req) -> list[int]:
    """The output tokens the user received: SGLang's ``finished_len`` (stop included)
    and never more than ``max_new_tokens``."""
    out = list(req.output_ids_through_stop)
    max_new = req.sampling_params.max_new_tokens
    return out if max_new is None else out[:max_new]


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
