"""Hostile traffic against a real SGLang server with DAS (CPU development mode).

    python benchmarks/fuzz_server.py --requests 1000 --json out.json [--png out.png]

Starts ``python -m das_sglang.sglang.cpu.launch_server`` (tiny random Llama, DAS on,
history snapshots in a temp dir, 127.0.0.1 only) and sends ``--requests`` HTTP
``/generate`` requests, ``--concurrency`` at a time, mixing:

- grpo: GRPO groups tagged ``das_problem_id`` / ``das_step`` (steps advance), greedy;
- hostile: bad ``custom_params`` (das_step "x" / -1 / -5 / 1.5 / True / lists / nested
  objects, a 100k-character problem id, a list or a string as custom_params), greedy;
- far_future: one ``das_step=10**12`` request (history size read from the on-disk
  snapshot before and after it);
- stop: stop strings (several per request), greedy;
- constrained: regex / JSON schema, frequency / presence / repetition penalties,
  min_new_tokens, logit bias, a custom logit processor, greedy;
- seeded: temperature 0.8 / top-k 8 with a sampling seed (checked for success only);
- abort: streamed requests whose connection is closed after the first chunk.

Then the same greedy requests go to a server without speculation (same flags) and
the outputs are compared token for token. JSON: requests, server_restarts (process
deaths of the DAS server; it is never restarted), errors_unexpected (failed requests
that should have succeeded), mismatches_vs_nospec, greedy_compared,
history_tokens_before / history_tokens_after (around the far-future step),
das_counters (from the snapshot's meta), by_category; a PNG of per-category counts.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from das_sglang.core.snapshot import load_history

HOST = "127.0.0.1"
NEW = 24
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW}
SERVER_FLAGS = [
    "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
    "--disable-cuda-graph", "--dtype", "float32", "--mem-fraction-static", "0.2",
    "--max-total-tokens", "32768", "--random-seed", "0", "--log-level", "warning",
    "--enable-custom-logit-processor", "--max-running-requests", "32",
]
BANNED = [17, 42, 99, 150, 201]
HOSTILE = [
    {"das_step": "x"}, {"das_step": -1}, {"das_step": -5}, {"das_step": 1.5},
    {"das_step": True}, {"das_step": [3]}, {"das_step": {"a": {"b": [1, 2]}}},
    {"das_problem_id": {"nested": {"deep": [1, {"x": None}]}}, "das_step": 1},
    {"das_problem_id": "h" * 100_000, "das_step": 1}, {"das_problem_id": ["a", "b"]},
    {"das_problem_id": 3.5}, [1, 2, 3], "das_step=1", {"das_step": 2**62},
]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--json", required=True, type=Path)
    p.add_argument("--png", type=Path, default=None, help="default: --json with .png")
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/das-tiny-llama"))
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.requests < 100:
        p.error(f"--requests must be >= 100, got {args.requests}")
    if not 1 <= args.concurrency <= 64:
        p.error(f"--concurrency must be in [1, 64], got {args.concurrency}")
    return args


# ------------------------------------------------------------------ server
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """A launch_server subprocess on 127.0.0.1; ``deaths`` counts exits seen."""

    def __init__(self, model: Path, das: bool, history: Path | None, log: Path):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        cmd = [sys.executable, "-m", "das_sglang.sglang.cpu.launch_server",
               "--model-path", str(model), "--host", HOST, "--port", str(self.port),
               *SERVER_FLAGS]
        env = dict(os.environ, DAS_SGLANG_CPU="1")
        if das:
            cmd += ["--speculative-algorithm", "DAS", "--speculative-num-draft-tokens", "8",
                    "--disable-overlap-schedule"]
            env["DAS_CONFIG"] = json.dumps({"server": {
                "policy": "unlimited", "history_path": str(history), "snapshot_interval": 1}})
        else:
            cmd += ["--disable-overlap-schedule"]  # same scheduling as the DAS server
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.deaths = 0

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} at start")
            try:
                if requests.get(self.url + "/health_generate", timeout=30).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(2)
        raise RuntimeError(f"server not ready after {timeout:.0f} s")

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            self.deaths = 1
            return False
        try:
            return requests.get(self.url + "/health", timeout=60).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ------------------------------------------------------------------ workload
def make_workload(n: int, seed: int):
    """Phases of (category, input_ids, sampling_params, extra) with ~n requests."""
    rng = np.random.default_rng(seed)
    problems = [rng.integers(3, 300, int(rng.integers(6, 12))).tolist() for _ in range(12)]
    n_steps = 3
    per_phase = n // n_steps
    phases = []
    for step in range(1, n_steps + 1):
        phase = []
        for i, prompt in enumerate(problems):  # GRPO group: 4 siblings
            for _ in range(4):
                phase.append(("grpo", prompt, {**GREEDY, "custom_params": {
                    "das_problem_id": f"p{i}", "das_step": step}}, None))
        while len(phase) < per_phase:
            i = int(rng.integers(len(problems)))
            prompt, tag = problems[i], {"das_problem_id": f"p{i}", "das_step": step}
            kind = rng.choice(["hostile", "stop", "constrained", "seeded", "abort", "grpo"],
                              p=[0.25, 0.2, 0.2, 0.1, 0.1, 0.15])
            if kind == "hostile":
                bad = HOSTILE[int(rng.integers(len(HOSTILE)))]
                phase.append(("hostile", prompt, {**GREEDY, "custom_params": bad}, None))
            elif kind == "stop":
                phase.append(("stop", prompt, {**GREEDY, "custom_params": tag}, "stop"))
            elif kind == "constrained":
                phase.append(("constrained", prompt, constrained(rng, tag), None))
            elif kind == "seeded":
                phase.append(("seeded", prompt, {"temperature": 0.8, "top_k": 8,
                              "max_new_tokens": NEW, "sampling_seed": int(rng.integers(1 << 30)),
                              "custom_params": tag}, None))
            elif kind == "abort":
                phase.append(("abort", prompt, {**GREEDY, "max_new_tokens": 200,
                              "custom_params": tag}, None))
            else:
                phase.append(("grpo", prompt, {**GREEDY, "custom_params": tag}, None))
        order = rng.permutation(len(phase))
        phases.append([phase[j] for j in order])
    extra = n - sum(len(p) for p in phases) - 1  # -1: the far-future request
    phases[-1] += [("grpo", problems[0], {**GREEDY, "custom_params": {
        "das_problem_id": "p0", "das_step": n_steps}}, None)] * max(extra, 0)
    far = ("far_future", problems[1], {**GREEDY, "custom_params": {
        "das_problem_id": "far", "das_step": 10**12}}, None)
    return phases, far


def constrained(rng, tag):
    choice = int(rng.integers(8))
    base = {**GREEDY, "custom_params": dict(tag)}
    if choice == 0:
        return {**base, "regex": "[a-z ]{5,40}"}
    if choice == 1:
        return {**base, "json_schema": json.dumps({"type": "object", "properties": {
            "a": {"type": "integer"}}, "required": ["a"]}), "max_new_tokens": 16}
    if choice == 2:
        return {**base, "frequency_penalty": 1.2}
    if choice == 3:
        return {**base, "presence_penalty": 1.0}
    if choice == 4:
        return {**base, "repetition_penalty": 1.5}
    if choice == 5:
        return {**base, "min_new_tokens": 10, "frequency_penalty": 0.3}
    if choice == 6:
        return {**base, "logit_bias": {str(int(rng.integers(3, 300))): 4.0}}
    # SGLang's DisallowedTokensLogitsProcessor asserts one token_ids list per batch (it
    # raises in the scheduler otherwise, with or without speculation): one list for all.
    return {**base, "custom_params": {**tag, "token_ids": BANNED}, "_processor": True}


def processor_str() -> str:
    from das_sglang.sglang import cpu

    cpu.activate()
    from sglang.srt.sampling.custom_logit_processor import DisallowedTokensLogitsProcessor

    return DisallowedTokensLogitsProcessor().to_str()


# ------------------------------------------------------------------ requests
def send(url: str, item, processor: str, reference_texts: dict, timeout: float):
    """(category, ok, output_ids or None, error)"""
    category, prompt, params, extra = item
    params = dict(params)
    body = {"input_ids": prompt, "sampling_params": params}
    if params.pop("_processor", False):
        body["custom_logit_processor"] = processor
    if extra == "stop":
        text = reference_texts.get(tuple(prompt), "")
        params["stop"] = stop_list(text) if text else ["e", "th"]
    try:
        if category == "abort":
            with requests.post(url + "/generate", json={**body, "stream": True},
                               stream=True, timeout=timeout) as r:
                if r.status_code != 200:
                    return category, False, None, f"HTTP {r.status_code}"
                for _ in r.iter_lines():
                    break  # one chunk, then hang up mid-stream
            return category, True, None, None
        r = requests.post(url + "/generate", json=body, timeout=timeout)
        if r.status_code != 200:
            return category, False, None, f"HTTP {r.status_code}: {r.text[:200]}"
        out = r.json()
        return category, True, out.get("output_ids"), None
    except requests.RequestException as e:
        return category, False, None, f"{type(e).__name__}: {e}"[:300]


def stop_list(text: str) -> list[str]:
    """A later stop listed before an earlier one (list order != text order)."""
    for a in range(2, max(2, len(text) - 10)):
        early = text[a:a + 2]
        if early in text[:a + 1]:
            continue
        for b in range(a + 3, min(a + 10, len(text) - 2)):
            late = text[b:b + 2]
            if late not in text[:b + 1]:
                return [late, early]
    return [text[-2:] or "e", "th"]


def history_tokens(path: Path) -> int:
    try:
        history, _ = load_history(path)
    except FileNotFoundError:
        return 0
    return int(sum(len(t) for steps in history.values() for seqs in steps.values() for t in seqs))


def main(argv=None) -> int:
    args = parse_args(argv)
    from das_sglang.sglang.cpu.tiny_model import make_tiny_model

    model = make_tiny_model(args.model_dir)
    processor = processor_str()
    phases, far = make_workload(args.requests, args.seed)
    work = Path(tempfile.mkdtemp(prefix="das-fuzz-"))
    history = work / "history"
    t0 = time.monotonic()
    # Items are indexed so that results of both servers line up.
    indexed = [[(j, it) for j, it in enumerate(ph, start=1000 * k)] for k, ph in enumerate(phases)]
    far_item = (-1, far)
    greedy = [x for ph in indexed for x in ph if x[1][0] not in ("seeded", "abort")] + [far_item]

    def run(server, items, pool, refs):
        futures = [(j, pool.submit(send, server.url, it, processor, refs, args.timeout))
                   for j, it in items]
        return {j: f.result() for j, f in futures}

    reference_texts: dict = {}
    das_results: dict = {}
    before = after = None
    meta: dict = {}
    with ThreadPoolExecutor(args.concurrency) as pool:
        ref = Server(model, das=False, history=None, log=work / "nospec.log")
        try:
            ref.wait_ready()
            # Greedy text without stops per prompt: the stop lists are built from it.
            for p in sorted({tuple(it[1]) for _, it in greedy}):
                r = requests.post(ref.url + "/generate", json={
                    "input_ids": list(p), "sampling_params": GREEDY}, timeout=args.timeout)
                reference_texts[p] = r.json()["text"]
            ref_results = run(ref, greedy, pool, reference_texts)
        finally:
            ref.stop()

        das = Server(model, das=True, history=history, log=work / "das.log")
        alive = False
        try:
            das.wait_ready()
            for k, phase in enumerate(indexed):
                das_results.update(run(das, phase, pool, reference_texts))
                if k == 1:  # between steps 2 and 3: the far-future step
                    before = history_tokens(history)
                    das_results.update(run(das, [far_item], pool, reference_texts))
                    after = history_tokens(history)
                if not das.alive():
                    break
            alive = das.alive()
            meta = load_history(history)[1] if history.exists() else {}
        finally:
            das.stop()
    wall = time.monotonic() - t0

    by_cat: dict = {}
    errors = []
    for cat, ok, _ids, err in das_results.values():
        c = by_cat.setdefault(cat, {"sent": 0, "ok": 0, "failed": 0})
        c["sent"] += 1
        c["ok" if ok else "failed"] += 1
        if not ok:
            errors.append(f"{cat}: {err}")
    compared = mismatches = 0
    mismatch_samples = []
    for j, _it in greedy:
        if j not in das_results:
            continue
        cat, ok1, a, _ = das_results[j]
        _, ok2, b, _ = ref_results[j]
        if ok1 and ok2 and a is not None and b is not None:
            compared += 1
            if a != b:
                mismatches += 1
                mismatch_samples.append({"category": cat, "das": a, "nospec": b})
    out = {
        "requests": len(das_results),
        "server_restarts": das.deaths or int(not alive),
        "errors_unexpected": len(errors),
        "mismatches_vs_nospec": mismatches,
        "greedy_compared": compared,
        "history_tokens_before": before,
        "history_tokens_after": after,
        "das_counters": meta.get("das_counters"),
        "das_step_clock": meta.get("das_step_clock"),
        "by_category": by_cat,
        "error_samples": errors[:10],
        "mismatch_samples": mismatch_samples[:5],
        "wall_s": round(wall, 1),
        "concurrency": args.concurrency,
        "server_logs": str(work),
    }
    args.json.write_text(json.dumps(out, indent=2))
    plot(out, args.png or args.json.with_suffix(".png"))
    print(json.dumps({k: v for k, v in out.items() if k not in ("by_category", "mismatch_samples")},
                     indent=2))
    return 0


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = sorted(out["by_category"])
    ok = [out["by_category"][c]["ok"] for c in cats]
    failed = [out["by_category"][c]["failed"] for c in cats]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(cats, ok, label="served")
    ax.bar(cats, failed, bottom=ok, label="failed", color="tab:red")
    ax.set_ylabel("requests")
    ax.set_title(f"fuzz_server: {out['requests']} requests, restarts {out['server_restarts']}, "
                 f"unexpected errors {out['errors_unexpected']}, greedy mismatches "
                 f"{out['mismatches_vs_nospec']}/{out['greedy_compared']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
