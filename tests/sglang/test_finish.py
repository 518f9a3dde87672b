"""Stop conditions cut where one-token-at-a-time decoding stops (real SGLang Req objects,
the tiny model's real tokenizer; no engine)."""

from __future__ import annotations

import pytest

from das_sglang.sglang.finish import delivered_output, is_server_warmup, stop_cut


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from sglang.srt.utils.hf_transformers_utils import get_tokenizer

    return get_tokenizer(tiny_model)


def make_req(tokenizer, prompt, output, rid="r", **params):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    sp = SamplingParams(**params)
    sp.normalize(tokenizer)
    sp.verify(tokenizer.vocab_size)
    req = Req(rid, "", list(prompt), sp, eos_token_ids={tokenizer.eos_token_id})
    req.tokenizer = tokenizer
    req.output_ids.extend(output)
    return req


def ids_of(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_stop_string_listed_second_but_earlier_in_the_text_wins(tokenizer):
    text_ids = ids_of(tokenizer, "ab cd ef gh ij")
    tokens = [tokenizer.decode([t]) for t in text_ids]
    # a stop completed by token 1 and one completed by the last token, later one listed first
    early, late = tokens[1][-1], tokens[-1][-1]
    assert early not in tokenizer.decode(text_ids[:1]) and late not in tokenizer.decode(text_ids[:-1])
    req = make_req(tokenizer, [5, 6], [], temperature=0, max_new_tokens=64, stop=[late, early])
    assert stop_cut(req, text_ids) == 2
    req = make_req(tokenizer, [5, 6], [], temperature=0, max_new_tokens=64)
    assert stop_cut(req, text_ids) == len(text_ids)  # no stop: the whole run


def test_eos_and_stop_token_ids_and_max_new_tokens(tokenizer):
    eos = tokenizer.eos_token_id
    req = make_req(tokenizer, [5], [7, 8], temperature=0, max_new_tokens=64)
    assert stop_cut(req, [9, eos, 10, 11]) == 2
    req = make_req(tokenizer, [5], [7, 8], temperature=0, max_new_tokens=64, ignore_eos=True)
    assert stop_cut(req, [9, eos, 10, 11]) == 4
    req = make_req(tokenizer, [5], [7], temperature=0, max_new_tokens=64, stop_token_ids=[10])
    assert stop_cut(req, [9, 10, 11]) == 2
    req = make_req(tokenizer, [5], [7, 8], temperature=0, max_new_tokens=4)
    assert stop_cut(req, [9, 10, 11, 12]) == 2  # 2 committed + 2 = max_new_tokens


def test_delivered_output_is_sglangs_finished_len(tokenizer):
    req = make_req(tokenizer, [5], [7, 8, 9, 10, 11], temperature=0, max_new_tokens=4)
    assert list(delivered_output(req)) == [7, 8, 9, 10]
    req.finished_len = 2
    assert list(delivered_output(req)) == [7, 8]


def test_server_warmup_is_recognised(tokenizer):
    warm = ids_of(tokenizer, "The capital city of France is")
    assert is_server_warmup(make_req(tokenizer, warm, [], temperature=0, max_new_tokens=8))
    assert is_server_warmup(make_req(tokenizer, [10, 11, 12], [], temperature=0, max_new_tokens=8))
    assert not is_server_warmup(make_req(tokenizer, warm, [], temperature=0, max_new_tokens=9))
    assert not is_server_warmup(make_req(tokenizer, warm, [], temperature=0, max_new_tokens=8,
                                         custom_params={"das_problem_id": "x"}))
    assert not is_server_warmup(make_req(tokenizer, [3, 4, 5], [], temperature=0, max_new_tokens=8))


def test_same_tokens_is_the_list_comparison():
    """``_same_tokens`` (the finish's check that the returned prompt is the one validated
    at the start) answers what ``arr.tolist() == list(seq)`` answers, for lists, tuples,
    numpy arrays and items the C conversion refuses."""
    import numpy as np

    from das_sglang.sglang.session import _same_tokens

    arr = np.array([5, 0, 2**31 - 1, 7], np.int32)
    for seq in ([5, 0, 2**31 - 1, 7], (5, 0, 2**31 - 1, 7), np.array([5, 0, 2**31 - 1, 7]),
                [5, 0, 2**31 - 1, 8], [5, 0, -1, 7], [5, 0, 2**31, 7], [5, 0, True, 7],
                [np.int64(5), 0, 2**31 - 1, 7], [5.0, 0, 2**31 - 1, 7]):
        assert _same_tokens(arr, seq) == (arr.tolist() == list(seq)), seq
