"""Per-request DAS parameters: bad tags degrade one request, steps move the clock by one."""

from __future__ import annotations

import numpy as np
import pytest

from das_sglang import api
from das_sglang.core.snapshot import load_history
from das_sglang.sglang.options import load_options
from das_sglang.sglang.request_params import StepClock, parse_tag
from das_sglang.sglang.session import DasSession

OPTS = load_options(8, '{"server": {"policy": "unlimited"}}')

HOSTILE = [
    ({"das_step": "x"}, "das_step='x'"),
    ({"das_step": -1}, "das_step=-1"),
    ({"das_step": -5}, "das_step=-5"),
    ({"das_step": 1.5}, "das_step=1.5"),
    ({"das_step": True}, "das_step=True"),
    ({"das_step": 2**64}, "das_step=18446744073709551616"),
    ({"das_step": {"a": [1]}}, "das_step={'a': [1]}"),
    ({"das_problem_id": {"nested": {"x": 1}}}, "das_problem_id={'nested'"),
    ({"das_problem_id": ["a"]}, "das_problem_id=['a']"),
    ({"das_problem_id": "p" * 100_000}, "100000 characters"),
    ([1, 2], "custom_params=[1, 2]"),
    ("das_step=3", "custom_params='das_step=3'"),
]


@pytest.mark.parametrize("params, named", HOSTILE)
def test_bad_tag_is_named(params, named):
    with pytest.raises(ValueError, match="invalid") as err:
        parse_tag(params)
    assert named in str(err.value)


def test_good_tags():
    assert parse_tag(None) == (None, None)
    assert parse_tag({"das_problem_id": 17, "das_step": 0}) == ("17", 0)
    assert parse_tag({"other": [1, {"x": 2}], "das_problem_id": ""}) == (None, None)


@pytest.mark.parametrize("params, named", HOSTILE[:10])
def test_api_helpers_refuse_bad_values_before_sending(params, named):
    step = params.get("das_step", 1)
    pid = params.get("das_problem_id", "p")
    with pytest.raises(ValueError, match="invalid") as err:
        api.tagged({"temperature": 0}, pid, step)
    assert named in str(err.value)


def test_api_tagged_refuses_non_dict_custom_params():
    with pytest.raises(ValueError, match=r"custom_params=\[1, 2\]"):
        api.tagged({"custom_params": [1, 2]}, "p", 1)


@pytest.mark.parametrize("params, _", HOSTILE)
def test_session_serves_bad_tags_untagged_and_counts(params, _):
    s = DasSession(OPTS)
    s.start("a", {"das_problem_id": "p", "das_step": 1}, [1, 2], [3], max_new_tokens=4)
    s.start("bad", params, [1, 2], [3], max_new_tokens=4)  # never raises
    assert s.counters["bad_params"] == 1
    assert s.live["bad"].problem_id.startswith("prompt-") and s.live["bad"].step == s.step == 1
    trees, _width = s.plan(["a", "bad"], OPTS.max_nodes)
    s.committed_batch(["a", "bad"], [len(t) for t in trees], [[4], [4]])
    s.finished("bad", [1, 2], [3, 4])


def _group(s: DasSession, pid: str, step: int, n: int = 4, start: int = 0):
    for i in range(n):
        rid = f"{pid}-{step}-{i}"
        s.start(rid, {"das_problem_id": pid, "das_step": step}, [1, 2], [3], max_new_tokens=8)
        s.finished(rid, [1, 2], [3, 4, 5, 6, 7 + i + start])


def test_far_future_step_moves_the_clock_one_step_and_keeps_history(tmp_path):
    raw = '{"server": {"policy": "unlimited", "history_path": "%s", "snapshot_interval": 1}}'
    s = DasSession(load_options(8, raw % tmp_path))
    for step in range(1, 4):
        _group(s, "A", step)
    s.sync()  # the finishes reach the drafter on the update thread: read it after them
    before = s.drafter.history()
    kept = sum(len(v) for v in before["A"].values())
    s.start("evil", {"das_problem_id": "B", "das_step": 10**12}, [1, 2], [3], max_new_tokens=8)
    s.finished("evil", [1, 2], [3, 4])
    assert s.step == 4 and s.drafter.step == 4  # one step, not 10**12
    history, meta = load_history(tmp_path)  # the snapshot on disk kept A's window
    assert sum(len(v) for v in history["A"].values()) == kept == 12
    assert meta["das_step_clock"][str(10**12)] == 4
    s.start("a", {"das_problem_id": "A", "das_step": 4}, [1, 2], [3], max_new_tokens=8)
    (tree,), _ = s.plan(["a"], OPTS.max_nodes)
    assert len(tree) > 0  # A still drafts from its history
    assert s.live["a"].step == 5  # the trainer's next step is the next clock step


def test_clock_identity_for_a_counting_trainer_and_restored_from_snapshot(tmp_path):
    raw = '{"server": {"policy": "unlimited", "history_path": "%s", "snapshot_interval": 1}}'
    opts = load_options(8, raw % tmp_path)
    s = DasSession(opts)
    for step in (3, 4, 5):
        _group(s, "A", step, n=1)
        assert s.step == step
    again = DasSession(opts)
    assert again.step == 5
    again.start("x", {"das_problem_id": "A", "das_step": 5}, [1, 2], [3], max_new_tokens=8)
    assert again.live["x"].step == 5  # same training step after a restart
    again.start("y", {"das_problem_id": "A", "das_step": 6}, [1, 2], [3], max_new_tokens=8)
    assert again.step == 6


def test_step_clock_bounded_memory_and_one_step_per_value():
    clock = StepClock(window_steps=2)
    assert clock.resolve(7, lambda: True) == (7, True)  # nothing stored: adopt the value
    for i, value in enumerate([10**12, 3, 99, 2**40, 5]):
        assert clock.resolve(value) == (8 + i, True)
    assert clock.resolve(5) == (12, False) and clock.resolve(None) == (12, False)
    assert len(clock.known()) == 3  # window + 1 values remembered
    assert np.all(np.diff(sorted(clock.known().values())) == 1)
