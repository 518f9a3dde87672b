"""One TP rank of the tensor-parallel test (run in a spawned process, gloo backend).

Each rank drives its own DAS session (drafter + policy + snapshot) and the production
verify path (``verify.walk_trees`` -> SGLang's ``verify_tree_greedy_func`` -> the CPU
stand-in) through decode steps of a GRPO group, exactly as ``DasWorker`` does, with one
difference per rank on purpose: each draws its "target tokens" from its own random
stream, standing in for ranks whose sampled tokens differ. ``TpGroup.agree`` (the
worker's broadcast from TP rank 0) must make every accept decision identical anyway.
"""

from __future__ import annotations

import json

STEPS, BS, MAX_NODES, VOCAB = 12, 4, 7, 3


def run_rank(rank: int, world: int, port: int, tmp: str, out: str) -> None:
    """Both runs, in one process pair: with the broadcast, then without (the control)."""
    from das_sglang.sglang import cpu

    cpu.activate()
    import torch.distributed as dist

    from das_sglang.sglang.tp import SINGLE, from_torch_distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    tp = from_torch_distributed()
    result = {"agree": _decode(rank, tp, tp, f"{tmp}/history"),
              "control": _decode(rank, tp, SINGLE, f"{tmp}/history-control"),
              # each rank measured its own verify time: the graph tiers read rank 0's
              "seconds": [tp.agree_value(0.010 * (rank + 1) + 0.001 * i) for i in range(3)]}
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)


def _decode(rank, tp, sync, history_dir: str) -> dict:
    import numpy as np
    import torch

    from das_sglang.sglang.options import load_options
    from das_sglang.sglang.session import DasSession
    from das_sglang.sglang.tree_inputs import build_layout
    from das_sglang.sglang.verify import walk_trees

    raw = json.dumps({"server": {"policy": "unlimited", "history_path": history_dir,
                                 "snapshot_interval": 1}})
    session = DasSession(load_options(MAX_NODES + 1, raw=raw), write_snapshots=tp.is_writer)
    if tp.size > 1:  # as in SGLang: every rank has loaded the snapshot before any serves
        import torch.distributed as dist

        dist.barrier(group=tp.group)
    text = np.random.default_rng(0)  # the same prompts and history on every rank
    prompt = [100, 101, 102]
    for i in range(4):  # step 0: finished rollouts of the problem become history
        rid = f"warm{i}"
        session.start(rid, {"das_problem_id": "p", "das_step": 0}, prompt, [], 64)
        session.finished(rid, prompt, text.integers(0, VOCAB, size=48).tolist())
    rids = [f"r{i}" for i in range(BS)]
    outputs = [[int(text.integers(0, VOCAB))] for _ in rids]
    for rid, out_ in zip(rids, outputs):
        session.start(rid, {"das_problem_id": "p", "das_step": 1}, prompt, out_, 64)
    draws = np.random.default_rng(1000 + rank)  # differs per rank on purpose
    decisions = []
    for _ in range(STEPS):
        trees, width = session.plan(rids, MAX_NODES)
        seq_lens = [len(prompt) + len(o) for o in outputs]
        layout = build_layout([o[-1] for o in outputs], trees, seq_lens, width)
        n = layout.n
        target = torch.from_numpy(draws.integers(0, VOCAB, size=BS * n).astype(np.int32))
        sync.agree(target)  # DasWorker: self.tp.agree(target)
        links = tuple(torch.from_numpy(x) for x in (
            layout.tokens, layout.retrieve_index, layout.next_token, layout.next_sibling))
        predict, accept_index, num_correct = walk_trees(links, target, BS, n, MAX_NODES + 1)
        decisions.append([accept_index.tolist(), num_correct.tolist()])
        tokens = [[int(predict[i]) for i in row[: k + 1]]
                  for row, k in zip(accept_index.tolist(), num_correct.tolist())]
        session.committed_batch(rids, [len(t) for t in trees], tokens)
        for o, t in zip(outputs, tokens):
            o.extend(t)
    for rid, o in zip(rids, outputs):
        session.finished(rid, prompt, o)
    return {"decisions": decisions, "outputs": outputs, "wrote": session.snapshot is not None}
