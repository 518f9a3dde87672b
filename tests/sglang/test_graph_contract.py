"""What the worker reads to know which verify widths SGLang replays as CUDA graphs
(``worker.captured_verify_graphs``) is SGLang 0.5.23's own: its ModelRunner keeps the
decode graph runner as ``decode_cuda_graph_runner`` (the eager runner or None without
graphs), the runner sets ``captured_req_width`` and ``max_bs``, and ``can_run_graph``
refuses a verify whose ``num_tokens_per_req`` differs from the captured width. Read from
the installed sources (no GPU can capture a graph here): if SGLang renames any of it, the
worker would silently see no graphs -- this test says so instead."""

from __future__ import annotations

import inspect

import pytest

pytestmark = pytest.mark.sglang


def test_sglang_exposes_what_the_worker_reads_about_captured_verify_graphs():
    from das_sglang.sglang import cpu

    cpu.activate()
    from sglang.srt.model_executor import model_runner
    from sglang.srt.model_executor.runner import decode_cuda_graph_runner as dcgr

    runner_src = inspect.getsource(dcgr.DecodeCudaGraphRunner)
    assert "self.captured_req_width = " in runner_src
    assert "self.max_bs = max(self.capture_bs)" in runner_src
    can_run = inspect.getsource(dcgr.DecodeCudaGraphRunner.can_run_graph)
    assert "spec_info.num_tokens_per_req != self.captured_req_width" in can_run
    mr_src = inspect.getsource(model_runner.ModelRunner)
    assert "self.decode_cuda_graph_runner = " in mr_src and "self.eager_runner" in mr_src


def test_captured_verify_graphs_reads_the_runner_and_ignores_the_eager_one():
    from das_sglang.sglang import cpu

    cpu.activate()
    from das_sglang.core.graph_tiers import GraphSpec
    from das_sglang.sglang.worker import captured_verify_graphs

    class Runner:  # the two attributes DecodeCudaGraphRunner sets (test above)
        captured_req_width, max_bs = 17, 256

    class ModelRunner:
        eager_runner = object()

    mr = ModelRunner()
    mr.decode_cuda_graph_runner = Runner()
    assert captured_verify_graphs(mr) == GraphSpec(width=16, max_bs=256)
    mr.decode_cuda_graph_runner = mr.eager_runner
    assert captured_verify_graphs(mr) is None
    mr.decode_cuda_graph_runner = None
    assert captured_verify_graphs(mr) is None
    one = Runner()
    one.captured_req_width = 1  # a plain decode graph: no verify width to pad to
    mr.decode_cuda_graph_runner = one
    assert captured_verify_graphs(mr) is None
