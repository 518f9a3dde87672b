"""Newcomer paths (issue 10 item 8): what a first-time user runs must work or say why.

Cheap checks, no engine: the CPU switch alone prepares imports at interpreter start
(``das_sglang_cpu.pth``), `das rollout --model PATH` gets the CPU engine settings under
``DAS_SGLANG_CPU=1``, `--compare none` on the CPU prints no wall-clock ratios (the runs
use different attention paths) and says so, the meta_info hook fills zero counters on DAS
engines only, and the tiny model ships a chat template.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from das_sglang import api
from das_sglang.sglang.cpu import STANDINS

PROBE = ("import sys, importlib.util; s = importlib.util.find_spec('torchvision'); "
         "print(s.origin if s else None); print(any('standins' in p for p in sys.path))")


def _python(env_extra: dict) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DAS_SGLANG_CPU", "PYTHONPATH")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_cpu_switch_alone_prepares_sglang_imports_at_interpreter_start():
    origin, on_path = _python({"DAS_SGLANG_CPU": "1"})
    assert origin.startswith(STANDINS) and on_path == "True"  # torchvision stand-in found


def test_without_the_switch_nothing_changes():
    origin, on_path = _python({})
    assert not origin.startswith(STANDINS) and on_path == "False"


def test_rollout_model_path_gets_cpu_engine_settings(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(api, "cpu_engine_kwargs", lambda: {"device": "cpu"})
    monkeypatch.delenv("DAS_SGLANG_CPU", raising=False)
    assert api.resolve_model(str(tmp_path)) == (str(tmp_path), {})
    monkeypatch.setenv("DAS_SGLANG_CPU", "1")
    assert api.resolve_model(str(tmp_path)) == (str(tmp_path), {"device": "cpu"})
    assert api.resolve_model("org/name") == ("org/name", {"device": "cpu"})


def test_cli_explains_a_missing_torchvision(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from das_sglang.cli import rollout as cli_rollout
    from das_sglang.cli.app import app

    def make(spec, speculative):
        raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")

    monkeypatch.setattr(cli_rollout, "make_engine", make)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    res = CliRunner().invoke(app, ["rollout", "--model", str(tmp_path), "--prompts", str(prompts),
                                   "--out", str(tmp_path / "o")], env={"COLUMNS": "200"})
    assert res.exit_code == 1 and "DAS_SGLANG_CPU=1" in res.output and "torchvision" in res.output


def test_compare_on_cpu_prints_no_wall_clock_ratio():
    from rich.console import Console

    from das_sglang.cli.rollout import _table, attention_path
    from das_sglang.rollout import StepStats

    assert attention_path("tiny", True) != attention_path("tiny", False)
    das = [StepStats(0, 4, 100, 30, 40, 35, 10, 1.0)]
    base = [StepStats(0, 4, 100, 0, 0, 100, 25, 12.0)]
    console = Console(width=200, record=True)
    console.print(_table(das, base, wall_clock=False))
    text = console.export_text()
    assert "n/a" in text and "0.35x" in text and "0.08x" not in text  # fwd ratio kept, time not
    console = Console(width=200, record=True)
    console.print(_table(das, base, wall_clock=True))
    assert "0.08x" in console.export_text()


def test_meta_info_hook_fills_zero_counters_on_das_engines_only():
    from das_sglang.sglang.meta_info import fill_zero_counters

    das = SimpleNamespace(server_args=SimpleNamespace(speculative_algorithm="DAS"))
    meta = {"completion_tokens": 1}
    fill_zero_counters(None, das, meta, None, 0)
    assert meta["spec_verify_ct"] == 0 and meta["spec_num_correct_drafts"] == 0
    kept = {"spec_verify_ct": 7}
    fill_zero_counters(None, das, kept, None, 0)
    assert kept["spec_verify_ct"] == 7
    plain = SimpleNamespace(server_args=SimpleNamespace(speculative_algorithm=None))
    meta = {}
    fill_zero_counters(None, plain, meta, None, 0)
    assert meta == {}


def test_tiny_model_ships_a_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from das_sglang.sglang.cpu.tiny_model import make_tiny_model

    tok = AutoTokenizer.from_pretrained(str(make_tiny_model(tmp_path / "m")))
    text = tok.apply_chat_template([{"role": "user", "content": "find the sum"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<s>user\nfind the sum</s>\n<s>assistant\n"
    assert json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())["chat_template"]
