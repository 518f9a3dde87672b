"""The Python API: request tags, model resolution, engine arguments (SGLang stubbed out)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import das_sglang
from das_sglang import api


class TestTags:
    def test_tag(self) -> None:
        assert das_sglang.tag("gsm8k-17", 3) == {"das_problem_id": "gsm8k-17", "das_step": 3}
        assert api.tag(17, 0) == {"das_problem_id": "17", "das_step": 0}

    def test_tagged_merges_and_copies(self) -> None:
        base = {"temperature": 1.0, "custom_params": {"return_top_p_token_ids": True}}
        got = das_sglang.tagged(base, "p", 2)
        assert got == {
            "temperature": 1.0,
            "custom_params": {"return_top_p_token_ids": True, "das_problem_id": "p", "das_step": 2},
        }
        assert base == {"temperature": 1.0, "custom_params": {"return_top_p_token_ids": True}}

    def test_tagged_none(self) -> None:
        assert api.tagged(None, "p", 0) == {"custom_params": {"das_problem_id": "p", "das_step": 0}}

    @pytest.mark.parametrize("pid, step, match", [("p", -1, "step=-1"), ("p", 1.5, "step=1.5"),
                                                   ("p", True, "step=True"), ("", 0, "problem_id=''")])
    def test_bad_tag(self, pid, step, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            api.tag(pid, step)


class TestResolveModel:
    @pytest.fixture(autouse=True)
    def _gpu_host(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Without the CPU switch (tests/sglang's conftest sets it for the whole session).
        monkeypatch.delenv("DAS_SGLANG_CPU", raising=False)

    def test_cpu_switch_adds_the_cpu_engine_settings(self, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
        from das_sglang.sglang import cpu

        (tmp_path / "config.json").write_text("{}")
        monkeypatch.setenv("DAS_SGLANG_CPU", "1")
        assert api.resolve_model(str(tmp_path)) == (str(tmp_path), dict(cpu.ENGINE_KWARGS))

    def test_local_hf_dir(self, tmp_path: Path) -> None:
        (tmp_path / "config.json").write_text("{}")
        assert api.resolve_model(str(tmp_path)) == (str(tmp_path), {})

    def test_dir_without_config(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"has no config.json"):
            api.resolve_model(str(tmp_path))

    def test_hub_id_passes_through(self) -> None:
        assert api.resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", {})

    @pytest.mark.parametrize("model", ["/no/such/model", "./missing", "just-a-name", "a/b/c"])
    def test_missing(self, model: str) -> None:
        with pytest.raises(ValueError, match=rf"--model {model}: no such directory"):
            api.resolve_model(model)


class TestEngineArguments:
    @pytest.fixture
    def calls(self, monkeypatch: pytest.MonkeyPatch) -> list:
        seen: list = []
        monkeypatch.setattr(api, "_sglang_engine", lambda path, kwargs: seen.append((path, kwargs)) or "ENGINE")
        monkeypatch.setattr(api, "das_env", lambda cfg: {"DAS_TEST_CFG": repr(cfg)})
        monkeypatch.delenv("DAS_TEST_CFG", raising=False)
        monkeypatch.delenv("DAS_SGLANG_CPU", raising=False)  # (set by tests/sglang's conftest)
        return seen

    def test_engine_selects_das_and_keeps_user_kwargs(self, calls: list) -> None:
        assert das_sglang.engine("/m", mem_fraction_static=0.8) == "ENGINE"
        assert calls == [("/m", {"speculative_algorithm": "DAS", "mem_fraction_static": 0.8})]

    def test_das_config_goes_to_the_environment(self, calls: list, monkeypatch: pytest.MonkeyPatch) -> None:
        import os

        das_sglang.engine(Path("/m"), das_config={"window_steps": 2})
        assert os.environ["DAS_TEST_CFG"] == "{'window_steps': 2}"
        assert calls[0][0] == "/m"

    def test_plain_rollout_engine_has_no_speculation(self, calls: list, tmp_path: Path) -> None:
        (tmp_path / "config.json").write_text("{}")
        api.rollout_engine(str(tmp_path), speculative=False, seed=3)
        assert calls == [(str(tmp_path), {"max_running_requests": api.ROLLOUT_MAX_RUNNING_REQUESTS, "random_seed": 3})]


class TestDasConfig:
    """``das_config`` -> ``DAS_CONFIG``, validated by the SGLang integration's own parser."""

    def test_mapping_with_dataclasses(self) -> None:
        from das_sglang.core.config import DrafterConfig

        env = api.das_env({"drafter": DrafterConfig(window_steps=2), "server": {"policy": "fixed"}})
        raw = json.loads(env["DAS_CONFIG"])
        assert raw["drafter"]["window_steps"] == 2 and raw["server"] == {"policy": "fixed"}

    def test_json_string_passes_through(self) -> None:
        assert api.das_env('{"drafter": {"step_decay": 0.25}}') == {"DAS_CONFIG": '{"drafter": {"step_decay": 0.25}}'}

    @pytest.mark.parametrize(
        "cfg, match",
        [
            ({"drafter": {"window_steps": -1}}, r"window_steps=-1"),
            ({"drafter": {"no_such": 1}}, r"no_such"),
            ({"nonsense": {}}, r"nonsense"),
            ({"drafter": 3}, r"drafter=3"),
            ("{not json", r"not valid JSON"),
        ],
    )
    def test_invalid_is_rejected_in_the_caller(self, cfg, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            api.das_env(cfg)

    def test_rollout_config_adds_history(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        monkeypatch.setenv("DAS_CONFIG", '{"server": {"policy": "fixed"}, "drafter": {"window_steps": 3}}')
        cfg = api.rollout_das_config(tmp_path / "h")
        assert cfg == {"server": {"policy": "fixed", "history_path": str(tmp_path / "h"), "strict_snapshot": False},
                       "drafter": {"window_steps": 3}}
        api.das_env(cfg)  # still valid
        cfg = api.rollout_das_config(tmp_path / "h", snapshot_interval=32)
        assert cfg["server"]["snapshot_interval"] == 32

    def test_rollout_config_reads_a_config_file(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        f = tmp_path / "das.json"
        f.write_text('{"drafter": {"window_steps": 1}}')
        monkeypatch.setenv("DAS_CONFIG", str(f))
        assert api.rollout_das_config(None) == str(f)
        cfg = api.rollout_das_config(tmp_path, strict_history=True)
        assert cfg["drafter"] == {"window_steps": 1} and cfg["server"]["strict_snapshot"] is True

    def test_rollout_config_without_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("DAS_CONFIG", raising=False)
        assert api.rollout_das_config(None) == {}


def test_prompt_key_matches_replay_grouping(tmp_path: Path) -> None:
    from das_sglang.core.records import RolloutRecord, write_step
    from das_sglang.replay.datasets import load_verl

    write_step(tmp_path, 0, [RolloutRecord("What is 2+2?", "4", None, 0, "r0")])
    assert load_verl([tmp_path])[0].problem_id == api.prompt_key("What is 2+2?")
    assert api.prompt_key("a") != api.prompt_key("b")
