"""Test-only SGLang plugin: the negative controls of the end-to-end tests.

Deliberately wrong DAS workers, registered as extra speculative algorithms through
SGLang's own plugin seam (entry point group ``sglang.srt.plugins``). The distribution
lives only in ``tests/sglang/doubles/`` (a ``*.dist-info`` next to this package), which
``tests/sglang/conftest.py`` puts on ``sys.path`` and ``PYTHONPATH`` so SGLang's engine
and scheduler processes discover it. Production code carries no test switch.

- ``DAS_GREEDY_ACCEPT``: accepts a draft when it equals the target's argmax (SGLang's
  CPU verify rule at any temperature) while the bonus token stays the sampled draw, so
  only the acceptance path is lossy: a sampling test that catches it really checks it.
- ``DAS_CORRUPT_MASK``: every verify row sees only the prefix, the root and itself (its
  ancestors are dropped), so any node accepted below depth 1 was scored on the wrong
  context and greedy outputs must diverge from the non-speculative run.
- ``DAS_TP_RECORD``: the production worker, recording every accept decision of its
  tensor-parallel rank to ``$DAS_TEST_TP_RECORD_DIR/rank<r>.jsonl`` (the TP test compares
  the ranks).
- ``DAS_FAKE_GRAPHS``: the production worker told that SGLang captured verify CUDA graphs
  at its full width for batches up to 32 (``_captured_graphs``). On the CPU nothing
  replays, so its graph tiers only explore: now and then a ragged step is verified padded
  to the full width instead -- the path a GPU takes when the graph is the cheaper one --
  and the outputs must not change.
"""

from __future__ import annotations

GREEDY_ACCEPT = "DAS_GREEDY_ACCEPT"
CORRUPT_MASK = "DAS_CORRUPT_MASK"
TP_RECORD = "DAS_TP_RECORD"
FAKE_GRAPHS = "DAS_FAKE_GRAPHS"


def register() -> None:
    from das_sglang.sglang import plugin

    plugin.register()  # CPU development mode first, when requested (idempotent)
    from sglang.srt.speculative.spec_registry import get_spec

    from das_sglang.sglang.spec import register_das

    for name in (GREEDY_ACCEPT, CORRUPT_MASK, TP_RECORD, FAKE_GRAPHS):
        if get_spec(name) is None:
            register_das(name, worker_class=_worker_factory(name))


def _worker_factory(name: str):
    def worker_class(server_args):
        from das_test_doubles import workers

        return {GREEDY_ACCEPT: workers.GreedyAcceptWorker,
                CORRUPT_MASK: workers.CorruptMaskWorker,
                TP_RECORD: workers.TpRecordWorker,
                FAKE_GRAPHS: workers.FakeGraphsWorker}[name]

    return worker_class
