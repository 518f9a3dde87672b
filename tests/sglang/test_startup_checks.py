"""What is decided and checked before a DAS server serves (no engine is started).

- ``handle_das_server_args`` (issue 10.6): DAS's own server args, the user's
  ``max_running_requests`` kept (NGRAM's handler caps it at 48), each change logged.
- Every DAS option is validated while SGLang resolves the server args, in the launching
  process, before any weights load, with the bad value named (issue 10.7).
- The docs' options table is generated from the config dataclasses (one source).
- Environment variables: only ``DAS_CONFIG`` and ``DAS_SGLANG_CPU``.
- Models the tree verify cannot verify exactly are refused (issue 10.5).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from das_sglang.sglang import cpu
from das_sglang.sglang.options import TABLE_BEGIN, TABLE_END, options_table

ROOT = Path(__file__).resolve().parents[2]


def _resolve(tiny_model, monkeypatch, das_config: str | None = None, **kwargs):
    """A real ServerArgs, resolved the way sglang.Engine / launch_server resolve it."""
    from sglang.srt.arg_groups.overrides import resolution_result
    from sglang.srt.server_args import ServerArgs

    from das_sglang.sglang import plugin

    plugin.register()
    if das_config is not None:
        monkeypatch.setenv("DAS_CONFIG", das_config)
    args = ServerArgs(model_path=tiny_model, **{**cpu.ENGINE_KWARGS, **kwargs})
    args.resolve_once()
    return lambda field: resolution_result(args, field)


# ------------------------------------------------------------------ 10.6 server args
def test_das_keeps_the_users_max_running_requests(tiny_model, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="das_sglang.sglang.spec"):
        got = _resolve(tiny_model, monkeypatch, speculative_algorithm="DAS",
                       max_running_requests=200)
    assert got("max_running_requests") == 200
    assert got("disable_overlap_schedule") is True and got("enable_mixed_chunk") is False
    assert got("speculative_num_draft_tokens") == 12
    assert "server arg disable_overlap_schedule False -> True" in caplog.text
    assert "max_running_requests" not in caplog.text  # never touched


def test_das_does_not_impose_ngrams_cap_of_48(tiny_model, monkeypatch):
    plain = _resolve(tiny_model, monkeypatch)("max_running_requests")
    das = _resolve(tiny_model, monkeypatch, speculative_algorithm="DAS")("max_running_requests")
    ngram = _resolve(tiny_model, monkeypatch, speculative_algorithm="NGRAM")("max_running_requests")
    assert ngram == 48  # what DAS inherited from _handle_ngram before
    assert das == plain != 48


def test_ngram_corpus_endpoints_get_a_clear_refusal():
    """SGLang wires its corpus manager to any is_ngram() worker; DAS answers clearly."""
    from sglang.srt.managers.io_struct import (
        ListExternalCorporaReqInput,
        RemoveExternalCorpusReqInput,
    )
    from sglang.srt.speculative.external_corpus_manager import ExternalCorpusManager

    from das_sglang.sglang.support import NoExternalCorpus

    manager = ExternalCorpusManager(NoExternalCorpus(), send_response=lambda *a: None)
    for out in (manager.list(ListExternalCorporaReqInput()),
                manager.remove(RemoveExternalCorpusReqInput(corpus_id="c"))):
        assert out.success is False and "NGRAM feature" in out.message


def test_production_verify_path_has_no_test_switch():
    for path in (ROOT / "das_sglang").rglob("*.py"):
        text = path.read_text()
        assert "GREEDY_ACCEPT" not in text and "CORRUPT_MASK" not in text, path


# ------------------------------------------------------------------ 10.7 validation
@pytest.mark.parametrize("das_config, named", [
    ('{"drafter": {"window_steps": 99}}', "window_steps=99"),
    ('{"drafter": {"max_match_len": 64, "max_depth": 64}}', "max_match_len=64"),
    ('{"drafter": {"max_match_len": 80}}', "max_match_len=80"),
    ('{"policy": {"max_budget": 30}}', "policy.max_budget=30"),
    ('{"server": {"snapshot_interval": -1}}', "snapshot_interval=-1"),
    ('{"server": {"background_nice": 20}}', "background_nice=20"),
    ('{"server": {"background_nice": true}}', "background_nice=True"),
    ('{"server": {"history_path": "/proc/version"}}', "history_path='/proc/version'"),
])
def test_bad_options_fail_while_resolving_server_args(tiny_model, monkeypatch, das_config, named):
    with pytest.raises(ValueError) as err:
        _resolve(tiny_model, monkeypatch, das_config, speculative_algorithm="DAS",
                 speculative_num_draft_tokens=8)
    assert named in str(err.value)


def test_strict_snapshot_that_cannot_load_is_refused_up_front(tiny_model, monkeypatch, tmp_path):
    from das_sglang.core.snapshot import snapshot_file

    snapshot_file(tmp_path).write_bytes(b"not a snapshot")
    cfg = json.dumps({"server": {"history_path": str(tmp_path), "strict_snapshot": True}})
    with pytest.raises(ValueError, match="history_path"):
        _resolve(tiny_model, monkeypatch, cfg, speculative_algorithm="DAS")


def test_strict_snapshot_with_bad_saved_lengths_is_refused_up_front(tiny_model, monkeypatch, tmp_path):
    import numpy as np

    from das_sglang.core.snapshot import save_history

    bad = {"step": 1, "problems": ["p"], "columns": [[0], [1], [-3]]}
    save_history(tmp_path, {"p": {1: [np.array([1, 2, 3], np.int32)]}}, {"das_lengths": bad})
    cfg = json.dumps({"server": {"history_path": str(tmp_path), "strict_snapshot": True}})
    with pytest.raises(ValueError, match=r"history_path.*entry 0 .*\(0, 1, -3\)"):
        _resolve(tiny_model, monkeypatch, cfg, speculative_algorithm="DAS")


def test_docs_options_table_is_generated_from_the_dataclasses():
    docs = (ROOT / "docs" / "sglang.md").read_text()
    assert TABLE_BEGIN in docs and TABLE_END in docs
    embedded = docs.split(TABLE_BEGIN)[1].split(TABLE_END)[0].strip()
    assert embedded == options_table(), (
        "docs/sglang.md's options table is stale: regenerate it with "
        "`python -m das_sglang.sglang.options`")
    assert all(row.split("|")[3].strip() for row in options_table().splitlines()[2:]), (
        "every config field needs a description in its dataclass docstring")


def test_only_two_environment_variables():
    """DAS reads DAS_CONFIG and DAS_SGLANG_CPU; everything else is an option or a flag."""
    pattern = re.compile(r"""environ(?:\.get)?\(\s*["'](DAS_\w+)|environ\[\s*["'](DAS_\w+)""")
    names = set()
    for path in (ROOT / "das_sglang").rglob("*.py"):
        names |= {a or b for a, b in pattern.findall(path.read_text())}
    assert names <= {"DAS_CONFIG", "DAS_SGLANG_CPU"}, names


# ------------------------------------------------------------------ 10.5 models
def _model_config(tmp_path: Path, tiny_model: str, name: str, patch: dict):
    from sglang.srt.configs.model_config import ModelConfig

    config = json.loads((Path(tiny_model) / "config.json").read_text())
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps({**config, **patch}))
    return ModelConfig(model_path=str(tmp_path / name), dtype="float32")


MLA = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
       "kv_lora_rank": 32, "q_lora_rank": None, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
       "v_head_dim": 16}
MAMBA = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
         "hybrid_override_pattern": "M*", "mamba_num_heads": 4, "mamba_head_dim": 16,
         "ssm_state_size": 8, "n_groups": 1, "conv_kernel": 4, "chunk_size": 64,
         "mamba_hidden_act": "silu", "expand": 2, "mlp_hidden_act": "relu2"}


@pytest.mark.parametrize("name, patch, reason", [
    ("mla", MLA, "MLA model"), ("mamba", MAMBA, "hybrid Mamba"),
])
def test_unverifiable_models_are_refused_at_start_up(tmp_path, tiny_model, name, patch, reason):
    from das_sglang.sglang.support import UnsupportedModelError, check_model_supported

    with pytest.raises(UnsupportedModelError, match=reason):
        check_model_supported(_model_config(tmp_path, tiny_model, name, patch))


def test_plain_attention_models_are_accepted(tmp_path, tiny_model):
    from das_sglang.sglang.support import check_model_supported

    check_model_supported(_model_config(tmp_path, tiny_model, "llama", {}))


def test_dead_code_is_gone():
    from das_sglang.sglang import tree_inputs

    assert not hasattr(tree_inputs, "accepted_tokens")
    assert not hasattr(tree_inputs, "build_layout_reference")  # the oracle is in tests/oracle
    # worker.stats is used: written to server.stats_path and read by the shard stats
    worker = (ROOT / "das_sglang" / "sglang" / "worker.py").read_text()
    assert "write_json_atomic(self.options.server.stats_path, self.stats)" in worker
    assert "self.session.worker_stats = self.stats" in worker


def test_conftest_leaves_cpu_mode_off_on_a_cuda_host():
    """GPU tests must stay collectable: on a CUDA host the conftest must not activate
    (activation refuses there) -- checked with CUDA reported present."""
    import subprocess
    import sys

    code = (
        "import os, runpy, torch; torch.cuda.is_available = lambda: True; "
        "os.environ.pop('SGLANG_USE_CPU_ENGINE', None); os.environ.pop('DAS_SGLANG_CPU', None); "
        f"g = runpy.run_path({str(Path(__file__).parent / 'conftest.py')!r}); "
        "assert g['CPU_MODE'] is False; "
        "assert 'SGLANG_USE_CPU_ENGINE' not in os.environ and 'DAS_SGLANG_CPU' not in os.environ"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_paged_tree_verify_off_flashinfer_is_refused(tiny_model, monkeypatch):
    with pytest.raises(ValueError, match="page_size=16"):
        _resolve(tiny_model, monkeypatch, speculative_algorithm="DAS", page_size=16)
