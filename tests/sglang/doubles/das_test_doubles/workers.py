"""The wrong workers (see the package docstring) and their verify functions."""

from __future__ import annotations

import json
import os

import torch

from das_sglang.sglang import verify
from das_sglang.sglang.worker import DasWorker


def greedy_accept_target_tokens(logits, sampling_info, positions, n):
    """The sampled draws, carrying the argmax of the (penalised) logits alongside."""
    target = verify.target_tokens(logits, sampling_info, positions, n)
    target.greedy_accept = torch.argmax(logits, dim=-1)  # penalties were applied in place
    return target


def greedy_accept_walk_trees(layout_tensors, target, bs, n, stride):
    """Accept by argmax; the bonus token (after the last accepted row) stays sampled."""
    predict, accept_index, num_correct = verify.walk_trees(
        layout_tensors, target.greedy_accept, bs, n, stride
    )
    bonus = accept_index.gather(1, num_correct.long()[:, None]).view(-1).long()
    predict[bonus] = target.view(-1)[bonus].to(predict.dtype)
    return predict, accept_index, num_correct


class GreedyAcceptWorker(DasWorker):
    target_tokens = staticmethod(greedy_accept_target_tokens)
    walk_trees = staticmethod(greedy_accept_walk_trees)


class CorruptMaskWorker(DasWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layout, self._layout_confirmed = "uniform", True  # the mask below is uniform

    def _prepare_verify(self, batch, trees, width=None):
        layout = super()._prepare_verify(batch, trees, width)
        spec, n, bs = batch.spec_info, layout.n, len(batch.reqs)
        if spec.custom_mask.numel() != bs * n * n:
            raise RuntimeError("the corrupt-mask control expects the CPU tree-block mask")
        wrong = torch.eye(n, dtype=torch.bool, device=spec.custom_mask.device)
        wrong[:, 0] = True
        spec.custom_mask = wrong.expand(bs, n, n).reshape(-1).contiguous()
        return layout


class TpRecordWorker(DasWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._record = os.path.join(os.environ["DAS_TEST_TP_RECORD_DIR"],
                                    f"rank{self.tp.rank}.jsonl")
        self._log({"rank": self.tp.rank, "size": self.tp.size,
                   "writes_snapshots": self.session.snapshot is not None})

    def walk_trees(self, layout_tensors, target, bs, n, stride):
        predict, accept_index, num_correct = verify.walk_trees(
            layout_tensors, target, bs, n, stride)
        self._log({"accept_index": accept_index.tolist(), "num_correct": num_correct.tolist(),
                   "predict": predict.tolist()})
        return predict, accept_index, num_correct

    def _log(self, record: dict) -> None:
        with open(self._record, "a") as f:
            f.write(json.dumps(record) + "\n")


class FakeGraphsWorker(DasWorker):
    """Told that SGLang captured verify graphs at the full width (batches <= 32)."""

    def _captured_graphs(self):
        from das_sglang.core.graph_tiers import GraphSpec

        return GraphSpec(width=self.options.max_nodes, max_bs=32)
