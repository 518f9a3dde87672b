"""``DAS_COST_PROBE``: the DAS worker, plus timing of TARGET_VERIFY forwards (GPU kit).

Benchmark-only speculative algorithm (``--speculative-algorithm DAS_COST_PROBE``), used by
``benchmarks/gpu/`` to measure what one verify forward costs on the machine at hand, by
batch size x tokens per request, through SGLang's own model runner (Triton/FlashInfer
attention, CUDA graph where SGLang captured one), not a stand-alone model.

It decodes exactly like ``DAS``. A request whose ``custom_params`` hold
``{"gpukit_cost_probe": {"out": DIR, "batch": B, "widths": [1, ..., 17], "warmup": 2,
"repeats": 5}}`` arms the probe: at the first decode step whose batch has exactly ``B``
requests, before the real step, the worker runs the verify forward of that batch with
``n`` tokens per request (the root plus a chain of ``n - 1`` drafts) ``warmup + repeats``
times for every ``n`` in ``widths``, synchronising the device around each, and writes
``DIR/probe_b{B}.json``: one row per ``n`` with the median milliseconds and whether
SGLang replayed a CUDA graph. The drafts are built by the worker's own verify preparation
(only the planner is replaced), so the probe times the forward the worker really runs.
The probe's KV writes land in the slots the real verify of this step overwrites next.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from das_sglang.core.draft_tree import DraftTree
from das_sglang.sglang.worker import DasWorker

PROBE_KEY = "gpukit_cost_probe"
ALGORITHM = "DAS_COST_PROBE"


class CostProbeWorker(DasWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._probed: set[tuple[str, int]] = set()

    def forward_batch_generation(self, batch, on_publish=None, pp_proxy_tensors=None):
        if batch.forward_mode.is_decode():
            cfg = _probe_config(batch)
            if cfg is not None and len(batch.reqs) == cfg["batch"]:
                key = (cfg["out"], cfg["batch"])
                if key not in self._probed:
                    self._probed.add(key)
                    self._probe(batch, cfg, pp_proxy_tensors)
        return super().forward_batch_generation(batch, on_publish, pp_proxy_tensors)

    def _probe(self, batch, cfg, pp_proxy_tensors) -> None:
        saved = (batch.forward_mode, batch.input_ids, batch.out_cache_loc, batch.spec_info)
        plan = self.session.plan
        # (the probe's forwards are not the engine's verifies: its counters stay those of
        # the real decode steps -- the first GPU table's 1,098 "verify steps" were 1,071
        # probe forwards and 27 verifies)
        counted = {k: self.stats[k] for k in ("verify_steps", "verify_tokens")}
        forwards = 0
        rows, error = [], None
        try:
            for n in cfg["widths"]:
                if not 1 <= n <= self.draft_token_num:
                    raise ValueError(f"probe width {n}: must be in 1..{self.draft_token_num} "
                                     "(--speculative-num-draft-tokens)")
                trees = [DraftTree.chain([int(r.output_ids[-1])] * (n - 1)) for r in batch.reqs]
                self.session.plan = lambda rids, max_nodes, t=trees, w=n - 1: (t, w)
                times, graph = [], False
                for i in range(cfg["warmup"] + cfg["repeats"]):
                    self._prepare_verify(batch, trees)  # uniform: every request n - 1 nodes
                    _sync(self.device)
                    start = time.perf_counter()
                    result = self.target_worker.forward_batch_generation(
                        batch, pp_proxy_tensors=pp_proxy_tensors, is_verify=True)
                    _sync(self.device)
                    forwards += 1
                    if i >= cfg["warmup"]:
                        times.append((time.perf_counter() - start) * 1e3)
                        graph = bool(result.can_run_cuda_graph)
                    (batch.forward_mode, batch.input_ids, batch.out_cache_loc,
                     batch.spec_info) = saved
                rows.append({"batch": len(batch.reqs), "tokens_per_request": n,
                             "cuda_graph": int(graph), "ms": statistics.median(times),
                             "ms_all": times})
        except Exception as e:  # a probe failure must not take the server down
            error = f"{type(e).__name__}: {e}"
        finally:
            self.session.plan = plan
            (batch.forward_mode, batch.input_ids, batch.out_cache_loc, batch.spec_info) = saved
            self.stats.update(counted)
            self.stats["probe_forwards"] = self.stats.get("probe_forwards", 0) + forwards
        _write_json(Path(cfg["out"]) / f"probe_b{cfg['batch']}.json",
                    {"batch": len(batch.reqs), "rows": rows, "error": error})


def _probe_config(batch) -> dict | None:
    params = batch.reqs[0].sampling_params.custom_params if batch.reqs else None
    raw = params.get(PROBE_KEY) if isinstance(params, dict) else None
    if not isinstance(raw, dict) or not isinstance(raw.get("out"), str):
        return None
    try:
        return {"out": raw["out"], "batch": int(raw["batch"]),
                "widths": [int(w) for w in raw.get("widths", [1])],
                "warmup": int(raw.get("warmup", 2)), "repeats": max(1, int(raw.get("repeats", 5)))}
    except (KeyError, TypeError, ValueError):
        return None


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
