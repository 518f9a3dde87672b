"""DAS_CONFIG parsing and validation (no engine)."""

from __future__ import annotations

import json

import pytest

from das_sglang.sglang import cpu
from das_sglang.sglang.options import for_layout, load_options


def test_defaults_fit_the_verify_width():
    opts = load_options(8, "")
    assert opts.max_nodes == 7
    assert opts.drafter.max_budget == 7 and opts.policy.max_budget == 7
    assert opts.policy.uniform_width  # until the layout is known: padding priced
    assert opts.width_from_layout
    assert opts.server.policy == "length-aware"


def test_budgets_follow_the_verify_layout_unless_configured():
    """Ragged verify: per-request budgets priced by each request's own tokens; uniform:
    one batch width with the padding paid. A configured uniform_width is kept."""
    opts = load_options(8, "")
    assert for_layout(opts, "ragged").policy.uniform_width is False
    assert for_layout(opts, "uniform").policy.uniform_width is True
    for set_to in (True, False):
        mine = load_options(8, json.dumps({"policy": {"uniform_width": set_to}}))
        assert not mine.width_from_layout
        assert for_layout(mine, "ragged").policy.uniform_width is set_to
        assert for_layout(mine, "uniform").policy.uniform_width is set_to
    with pytest.raises(ValueError, match="'diagonal'"):
        for_layout(opts, "diagonal")


def test_sections_map_one_to_one_onto_the_dataclasses(tmp_path):
    cfg = {"drafter": {"window_steps": 2, "tree": False}, "policy": {"cost_preset": "cpu-tiny"},
           "server": {"policy": "fixed", "history_path": str(tmp_path), "snapshot_interval": 3}}
    path = tmp_path / "das.json"
    path.write_text(json.dumps(cfg))
    opts = load_options(8, str(path))
    assert opts.policy.cost_preset == "cpu-tiny"
    assert opts.drafter.window_steps == 2 and opts.drafter.tree is False
    assert opts.server.policy == "fixed" and opts.server.snapshot_interval == 3


@pytest.mark.parametrize("raw, message", [
    ('{"x": {}}', "section(s) ['x']"),
    ('{"drafter": {"window": 3}}', "drafter.['window']"),
    ('{"drafter": {"window_steps": -1}}', "window_steps=-1"),
    ('{"policy": {"max_budget": 20}}', "policy.max_budget=20"),
    ('{"server": {"policy": "nope"}}', "policy='nope'"),
    ('{"server": {"forward_hook": "later"}}', "forward_hook='later'"),
    ('{"server": []}', "section server"),
    ("{oops", "not valid JSON"),
    ("/no/such/file.json", "neither a JSON object nor a file"),
])
def test_bad_options_name_the_bad_value(raw, message):
    with pytest.raises(ValueError) as err:
        load_options(8, raw)
    assert message in str(err.value)


def test_width_below_two_is_rejected():
    with pytest.raises(ValueError, match="speculative_num_draft_tokens=1"):
        load_options(1, "")


@pytest.mark.sglang
def test_engine_start_fails_fast_on_bad_das_config(tiny_model, monkeypatch):
    """SGLang runs the DAS validator while resolving server args, before any process
    starts: the user sees the ValueError naming the bad field."""
    import sglang

    monkeypatch.setenv("DAS_CONFIG", '{"drafter": {"window": 3}}')
    with pytest.raises(ValueError, match=r"drafter\.\['window'\]"):
        sglang.Engine(model_path=tiny_model, speculative_algorithm="DAS",
                      disable_overlap_schedule=True, **cpu.ENGINE_KWARGS)


def test_engine_graphs_drop_only_default_buckets():
    """Stock SGLang replays one verify width: the worker drops the default buckets
    (for_engine_graphs), but keeps buckets a user configured, even equal to the default."""
    import json

    from das_sglang.sglang.options import GRAPH_BUCKETS, for_engine_graphs, load_options

    default = load_options(17)
    assert default.buckets_from_engine and default.policy.width_buckets == GRAPH_BUCKETS
    dropped = for_engine_graphs(default)
    assert dropped.policy.width_buckets is None and not dropped.buckets_from_engine
    assert for_engine_graphs(dropped) is dropped
    mine = load_options(17, json.dumps({"policy": {"width_buckets": list(GRAPH_BUCKETS)}}))
    assert not mine.buckets_from_engine
    assert for_engine_graphs(mine).policy.width_buckets == GRAPH_BUCKETS


def test_forward_hook_follows_the_device_unless_configured():
    """``auto``: after the launch on a CUDA device (its launch returns while the forward
    runs), before it elsewhere; an explicit choice holds on any device."""
    from das_sglang.sglang.options import hook_after_launch

    assert load_options(8, "").server.forward_hook == "auto"
    assert hook_after_launch("auto", "cuda") and hook_after_launch("auto", "cuda:3")
    assert not hook_after_launch("auto", "cpu") and not hook_after_launch("auto", "xpu")
    assert hook_after_launch("after_launch", "cpu") and not hook_after_launch("before_launch", "cuda")
    with pytest.raises(ValueError, match="forward_hook='soon'"):
        hook_after_launch("soon", "cuda")
