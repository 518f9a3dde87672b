"""The one-shot GPU kit: prove and calibrate DAS on a real GPU in one short run.

    python benchmarks/gpu/gpukit.py run --out OUTDIR [--plan gpu|dry] [--budget-s 450]

(``benchmarks/gpu/run.sh OUTDIR`` installs the carried wheels first and calls this.) Writes
everything under OUTDIR, ending with ``OUTDIR/summary.json``:

1. **greedy identity** — >= 200 requests (GPU plan), DAS vs no speculation, token by
   token, on float32 engines (``greedy_mismatches``; bf16 changes reduction order
   between a verify forward and a decode forward, which is numerics, not DAS);
2. **sampled** — temperature 1.0, top-p 0.8: DAS and no-speculation samples of one
   prompt, chi-square per position (``das_sglang.sglang.sampling_check``; ``sampled_ok``);
3. **cost table** — TARGET_VERIFY forward ms by batch x tokens per request through
   SGLang's model runner (``DAS_COST_PROBE``, ``das_sglang/sglang/cost_probe.py``), eager,
   and CUDA graph where SGLang captured it -> ``cost_table.csv`` -> ``fit_cost_model.py``
   -> ``coefficients.json``;
4. **end to end** — the same rollout (prompts x n samples x steps, temperature 1.0) with
   no speculation, DAS and SGLang's NGRAM, bf16: wall-clock tokens/s per mode.

Each engine runs in its own subprocess under a time box (``role`` below); a failing or
timed-out stage records its error in the JSON and the run continues. The same script runs
on the CPU (``DAS_SGLANG_CPU=1``, ``--plan dry``: tiny sizes) as the CI dry run
(``pytest -m gpukit_dry``). On a GPU without the CUDA ``sgl-kernel`` wheel it activates
``das_sglang.sglang.nokernel`` (Triton attention, pytorch sampling, torch fused ops).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COST_HEADER = ("batch", "tokens_per_request", "cuda_graph", "ms")


# ------------------------------------------------------------------ plans


@dataclass(frozen=True)
class Plan:
    model: str  # a tiny_model preset
    greedy_prompts: int
    greedy_rounds: int  # each round: every prompt once, DAS step = round
    greedy_new_tokens: int
    sampled_samples: int
    sampled_warmup: int
    sampled_new_tokens: int
    sampled_min_accepted: float  # accepted drafts per verify for the test to have teeth
    cost_batches: list[int]
    cost_widths: list[int]  # tokens per request (1 = root only)
    cost_warmup: int
    cost_repeats: int
    e2e_prompts: int
    e2e_n: int
    e2e_steps: int
    e2e_new_tokens: int
    max_running: int
    draft_tokens: int  # --speculative-num-draft-tokens (>= max cost width)
    decode_tokens: tuple  # (short, long) decode lengths of the plain-decode step timing
    # role -> (speculative algorithm, engine dtype, stages, seconds), run in this order:
    # the correctness roles first, so a short run still answers the first questions.
    roles: dict = field(default_factory=dict)
    reference: str = "none32"  # role whose greedy / sampled outputs are the reference
    speculative: str = "das32"  # role whose greedy / sampled outputs are checked
    e2e_modes: dict = field(default_factory=dict)  # role -> mode name in tokens_per_s


PLANS = {
    "gpu": Plan(
        model="gpu-0.6b", greedy_prompts=60, greedy_rounds=4, greedy_new_tokens=64,
        sampled_samples=2048, sampled_warmup=256, sampled_new_tokens=12, sampled_min_accepted=0.5,
        cost_batches=[1, 2, 4, 8, 16, 32, 64, 128, 256], cost_widths=list(range(1, 18)),
        cost_warmup=2, cost_repeats=5,
        e2e_prompts=32, e2e_n=8, e2e_steps=3, e2e_new_tokens=256,
        max_running=256, draft_tokens=17, decode_tokens=(16, 80),
        roles={
            # Boxes from the first H200 run (2026-12-04): an engine starts in ~50 s
            # (weights, JIT and Triton kernels, decode CUDA graphs for 9 batch sizes);
            # none32 then took 61 s in all, das32 81 s. The second run (float32 under
            # TRITON_F32_DEFAULT=ieee) spent 28 s importing before the engine's init and
            # 16 s capturing its first decode graph (Triton compiles): none32 ran out of
            # an 80 s box while capturing. The third run (warm caches): none32 125 s in
            # all (start 65 s, greedy 25 s, sampled 31 s); das32 started in 128 s (its
            # float32 verify graphs at 17 tokens took 65 s to capture) and ran out of a
            # 150 s box in its first greedy round; probe16 started in 76 s, measured the
            # cost table in 70 s and ran out during its end-to-end run.
            "none32": (None, "float32", ["greedy", "sampled"], 135),
            "das32": ("DAS", "float32", ["greedy", "sampled"], 210),
            # DAS_COST_PROBE decodes exactly like DAS when no request arms the probe, so
            # its engine serves the DAS end-to-end run too (one engine start less).
            "probe16": ("DAS_COST_PROBE", "bfloat16", ["cost", "e2e"], 190),
            # (decode: ~2 x 9 batch sizes x 96 steps of a replayed graph, ~15 s)
            "none16": (None, "bfloat16", ["decode", "e2e"], 110),
            "ngram16": ("NGRAM", "bfloat16", ["e2e"], 100),
        },
        e2e_modes={"none16": "none", "probe16": "das", "ngram16": "ngram"},
    ),
    "dry": Plan(
        model="tiny", greedy_prompts=6, greedy_rounds=2, greedy_new_tokens=12,
        sampled_samples=32, sampled_warmup=8, sampled_new_tokens=6, sampled_min_accepted=0.0,
        cost_batches=[1, 2, 4], cost_widths=[1, 2, 5], cost_warmup=1, cost_repeats=2,
        e2e_prompts=2, e2e_n=2, e2e_steps=2, e2e_new_tokens=8,
        max_running=16, draft_tokens=5, decode_tokens=(2, 6),
        # The CPU computes in float32 whatever the dtype, so the dry run folds the GPU's
        # five engines into two (engine starts dominate a CPU run): the same stage code,
        # with NGRAM's end-to-end left to `--roles` (its C++ corpus compiles for ~40 s).
        roles={
            "none32": (None, "float32", ["greedy", "sampled", "decode", "e2e"], 240),
            "das32": ("DAS_COST_PROBE", "float32", ["greedy", "sampled", "cost", "e2e"], 300),
            "ngram16": ("NGRAM", "float32", ["e2e"], 300),
        },
        e2e_modes={"none32": "none", "das32": "das", "ngram16": "ngram"},
    ),
}
DRY_DEFAULT_ROLES = ("none32", "das32")

ALL_ROLES = sorted({r for p in PLANS.values() for r in p.roles})
SAMPLED = {"temperature": 1.0, "top_p": 0.8}
# A greedy mismatch whose reference picked between two tokens at most this far apart in
# logprob is a near-tie: float32 forwards of different shapes (a verify of n tokens vs a
# decode of 1) round differently by ~1e-6 relative, far below this.
NEAR_TIE_LOGPROB = 1e-3
# DAS verifies its full draft width in the correctness runs (more accepted tokens,
# stronger tests); the e2e run uses the default policy.
FULL_WIDTH = '{"server": {"policy": "unlimited"}}'


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------ engine side


def engine_kwargs(plan: Plan, algorithm: str | None, dtype: str) -> dict:
    kwargs = dict(log_level="error", random_seed=0, max_running_requests=plan.max_running,
                  dtype=dtype)
    if on_gpu():
        from das_sglang.sglang import nokernel

        # SGLang's own timings (weights, kernel JIT, CUDA-graph capture) into the role log:
        # the first run's ~50 s engine starts could not be split without them.
        kwargs["log_level"] = "info"

        if not nokernel.real_sgl_kernel_installed():
            kwargs.update(nokernel.ENGINE_KWARGS)
        kwargs.update(mem_fraction_static=0.5, disable_prefill_cuda_graph=True,
                      cuda_graph_bs_decode=plan.cost_batches,
                      cuda_graph_max_bs_decode=max(plan.cost_batches))
    else:
        from das_sglang.sglang import cpu

        kwargs.update({k: v for k, v in cpu.ENGINE_KWARGS.items() if k != "dtype"})
    if algorithm is not None:
        kwargs.update(speculative_algorithm=algorithm, disable_overlap_schedule=True,
                      speculative_num_draft_tokens=plan.draft_tokens)
    return kwargs


def activate_backend() -> str:
    """CPU development mode or the GPU's no-kernel mode, before sglang is imported."""
    if not on_gpu():
        from das_sglang.sglang import cpu

        cpu.activate()
        return "cpu"
    from das_sglang.sglang import nokernel

    return "gpu-nokernel" if nokernel.activate() else "gpu"


def random_prompts(count: int, vocab: int, seed: int, lo: int = 8, hi: int = 24) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def generate(engine, prompts, params, tags=None, **kwargs) -> list[dict]:
    plist = []
    for i, _ in enumerate(prompts):
        p = dict(params)
        if tags is not None:
            p["custom_params"] = {**p.get("custom_params", {}),
                                  "das_problem_id": tags[i][0], "das_step": tags[i][1]}
        plist.append(p)
    return engine.generate(input_ids=[list(x) for x in prompts], sampling_params=plist,
                           **kwargs)


def top2_gaps(meta: dict) -> list[float | None]:
    """Per output position, the reference's logprob gap between its two likeliest tokens
    (``top_logprobs_num=2``): how far the greedy pick was from a tie."""
    gaps = []
    for top in meta.get("output_top_logprobs") or []:
        lps = sorted((t[0] for t in top or [] if t and t[0] is not None), reverse=True)
        gaps.append(lps[0] - lps[1] if len(lps) >= 2 else None)
    return gaps


def stage_greedy(engine, plan: Plan, vocab: int, out: Path, role: str) -> dict:
    prompts = random_prompts(plan.greedy_prompts, vocab, seed=1)
    params = {"temperature": 0.0, "max_new_tokens": plan.greedy_new_tokens, "ignore_eos": True}
    # The reference also returns its top-2 logprobs per position, so that a mismatch can
    # be told apart: at a near-tie (two logits within float32 rounding of each other) a
    # verify forward and a decode forward may pick differently with no DAS error.
    reference = role == plan.reference
    extra = {"return_logprob": True, "top_logprobs_num": 2} if reference else {}
    outputs, metas, gaps, round_s = [], [], [], []
    for r in range(plan.greedy_rounds):
        tags = [(f"greedy-{i}", r) for i in range(len(prompts))]
        t = time.perf_counter()
        got = generate(engine, prompts, params, tags, **extra)
        round_s.append(time.perf_counter() - t)  # (round 0 also compiles kernels)
        outputs += [o["output_ids"] for o in got]
        metas += [o["meta_info"] for o in got]
        if reference:
            gaps += [top2_gaps(o["meta_info"]) for o in got]
        # Written after every round: an engine whose time box ends mid-stage still leaves
        # its finished rounds, and the verdict covers the rounds both engines finished.
        if reference:
            _atomic_write(out / f"greedy_{role}_gaps.json", gaps)
        _atomic_write(out / f"greedy_{role}.json", outputs)
    return {"requests": len(outputs), "round_seconds": round_s, **spec_counts(metas)}


def stage_sampled(engine, plan: Plan, vocab: int, out: Path, role: str) -> dict:
    prompt = random_prompts(1, vocab, seed=2)[0]
    params = dict(SAMPLED, max_new_tokens=plan.sampled_new_tokens, ignore_eos=True)
    batch = min(plan.max_running, 256)

    def draw(n: int, step: int) -> tuple[list, list]:
        outs, metas = [], []
        for start in range(0, n, batch):
            k = min(batch, n - start)
            got = generate(engine, [prompt] * k, params, [("sampled", step)] * k)
            outs += [o["output_ids"] for o in got]
            metas += [o["meta_info"] for o in got]
        return outs, metas

    draw(plan.sampled_warmup, 0)  # history for step 1 (also warms the no-spec engine)
    outs, metas = draw(plan.sampled_samples, 1)
    (out / f"sampled_{role}.json").write_text(json.dumps({"outputs": outs, "metas": metas}))
    return {"samples": len(outs), **spec_counts(metas)}


def stage_cost(engine, plan: Plan, vocab: int, out: Path, role: str) -> dict:
    from das_sglang.sglang.cost_probe import PROBE_KEY

    probe_dir = out / "probe"
    probe_dir.mkdir(exist_ok=True)
    missing = []
    for b in plan.cost_batches:
        prompts = random_prompts(b, vocab, seed=100 + b, lo=32, hi=32)
        probe = {"out": str(probe_dir), "batch": b, "widths": plan.cost_widths,
                 "warmup": plan.cost_warmup, "repeats": plan.cost_repeats}
        params = {"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True,
                  "custom_params": {PROBE_KEY: probe}}
        generate(engine, prompts, params)
        if not (probe_dir / f"probe_b{b}.json").exists():
            missing.append(b)
    rows, errors = [], []
    for b in plan.cost_batches:
        f = probe_dir / f"probe_b{b}.json"
        if f.exists():
            got = json.loads(f.read_text())
            rows += got["rows"]
            if got.get("error"):
                errors.append(f"batch {b}: {got['error']}")
    table = out / "cost_table.csv"
    _write_table(table, sorted(((r["batch"], r["tokens_per_request"], r["cuda_graph"], r["ms"])
                                for r in rows), key=lambda r: (r[2], r[1], r[0])))
    if errors or not rows:
        raise RuntimeError(f"cost probe: {len(rows)} rows; errors {errors}; "
                           f"batches never reached {missing}")
    return {"rows": len(rows), "graph_rows": sum(r["cuda_graph"] for r in rows),
            "batches_not_reached": missing, "table": str(table)}


def _write_table(path: Path, rows) -> None:
    """A cost table CSV (``COST_HEADER``) of ``(batch, tokens_per_request, cuda_graph, ms)``."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COST_HEADER)
        for b, t, g, ms in rows:
            w.writerow([b, t, g, f"{ms:.4f}"])


def stage_decode(engine, plan: Plan, vocab: int, out: Path, role: str) -> dict:
    """Plain decode step times of a no-speculation engine, per batch size: ``B`` requests
    decoding ``decode_tokens[0]`` and then ``decode_tokens[1]`` tokens (greedy, ignore_eos),
    the step time the slope between the two runs (prefill and scheduling start-up cancel).
    Rows ``(B, 1, cuda_graph, ms)`` into ``decode_table.csv``: a no-speculation engine
    replays SGLang's decode graphs (captured for every cost batch on the GPU), so
    ``das replay`` can charge its ``none`` baseline from measurement -- the verify table
    of a speculative engine has no plain-decode rows."""
    short, long_ = plan.decode_tokens
    graph = int(on_gpu())
    rows = []
    for b in plan.cost_batches:
        prompts = random_prompts(b, vocab, seed=200 + b, lo=32, hi=32)
        seconds = []
        for n in (short, long_, short, long_):  # (the first pair warms the batch shape up)
            t0 = time.perf_counter()
            generate(engine, prompts, {"temperature": 0.0, "max_new_tokens": n, "ignore_eos": True})
            seconds.append(time.perf_counter() - t0)
        ms = max((seconds[3] - seconds[2]) / (long_ - short), 1e-7) * 1e3
        rows.append((b, 1, graph, ms))
    table = out / "decode_table.csv"
    _write_table(table, rows)
    return {"rows": len(rows), "table": str(table), "ms": {str(r[0]): r[3] for r in rows}}


def stage_e2e(engine, plan: Plan, vocab: int, out: Path, role: str) -> dict:
    from das_sglang.rollout import Prompt, Sampling, run_step
    from das_sglang.sglang.cpu.tiny_model import _corpus

    texts = _corpus(seed=3, lines=plan.e2e_prompts)
    prompts = [Prompt(f"e2e-{i}", t) for i, t in enumerate(texts)]
    sampling = Sampling(max_new_tokens=plan.e2e_new_tokens, temperature=1.0, seed=0)
    steps = []
    for step in range(plan.e2e_steps):
        res = run_step(engine, prompts, plan.e2e_n, step, sampling)
        steps.append(res.stats.as_dict())
    tokens = sum(s["completion_tokens"] for s in steps)
    seconds = sum(s["makespan_s"] for s in steps)
    return {"mode": plan.e2e_modes[role], "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds else 0.0,
            "tokens_per_forward": tokens / max(1, sum(s["forward_passes"] for s in steps)),
            "steps": steps}


STAGES = {"greedy": stage_greedy, "sampled": stage_sampled, "cost": stage_cost,
          "decode": stage_decode, "e2e": stage_e2e}


def spec_counts(metas) -> dict:
    verify = sum(int(m.get("spec_verify_ct", 0) or 0) for m in metas)
    tokens = sum(int(m.get("completion_tokens", 0)) for m in metas)
    return {"completion_tokens": tokens, "verify_forwards": verify,
            "tokens_per_verify": (tokens - len(metas)) / verify if verify else None}


def run_role(role: str, plan_name: str, model: str, out: Path) -> int:
    """One engine, its stages; ``OUT/role_<role>.json`` rewritten after every stage."""
    plan = PLANS[plan_name]
    algorithm, dtype, stages, _ = plan.roles[role]
    result = {"role": role, "algorithm": algorithm, "dtype": dtype, "stages": {}}
    path = out / f"role_{role}.json"

    def save():
        _atomic_write(path, result)

    t0 = time.perf_counter()
    try:
        result["backend"] = activate_backend()
        stats_file = None
        if algorithm in ("DAS", "DAS_COST_PROBE"):
            config = json.loads(FULL_WIDTH if role == plan.speculative else "{}")
            # the worker's counters (verifies, CUDA-graph replays, host ms per step),
            # rewritten every step: read after each stage (worker_stats_delta)
            stats_file = out / f"das_stats_{role}.json"
            config.setdefault("server", {})["stats_path"] = str(stats_file)
            os.environ["DAS_CONFIG"] = json.dumps(config)
        if dtype == "float32":
            # Triton's tl.dot rounds float32 inputs to TF32 unless told otherwise: SGLang's
            # extend / verify attention kernel and its grouped (GQA) decode kernel both use
            # tl.dot, with different tiling and reduction, so in the first GPU run
            # (2026-12-04) a verify and a decode of the same position disagreed at
            # near-ties (9 of 240 greedy requests, 3 prompts). IEEE float32 in both makes
            # the greedy identity check a check of DAS, not of TF32.
            os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
        import sglang

        engine = sglang.Engine(model_path=model, **engine_kwargs(plan, algorithm, dtype))
    except Exception:
        result["error"] = traceback.format_exc(limit=8)
        save()
        return 1
    result["engine_start_s"] = time.perf_counter() - t0
    save()
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    try:
        for stage in stages:
            t = time.perf_counter()
            before = _read_json(stats_file)
            try:
                got = STAGES[stage](engine, plan, vocab, out, role)
                result["stages"][stage] = {"ok": True, "seconds": time.perf_counter() - t, **got}
                if stats_file is not None:
                    result["stages"][stage]["worker"] = worker_stats_delta(
                        _read_json(stats_file), before)
            except Exception:
                result["stages"][stage] = {"ok": False, "seconds": time.perf_counter() - t,
                                           "error": traceback.format_exc(limit=8)}
            save()
    finally:
        engine.shutdown()
    return 0


# ------------------------------------------------------------------ orchestration


def build_model(plan: Plan, model_dir: Path) -> Path:
    from das_sglang.sglang.cpu.tiny_model import make_tiny_model, preset

    return make_tiny_model(model_dir, preset(plan.model), device="cuda" if on_gpu() else "cpu")


def preflight() -> dict:
    """GPU only: SGLang importable in no-kernel mode, and its JIT tree-verify kernel
    compiles (nvcc) and walks a tree exactly as our reference walk does."""
    import torch

    info = {"backend": activate_backend(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0)}
    import sglang

    info["sglang"] = sglang.__version__
    from sglang.kernels.ops.speculative.spec_tree import verify_tree_greedy_func

    from das_sglang.sglang.cpu.ops import verify_tree_greedy_cpu

    def walk(fn, dev):
        cand = torch.tensor([[5, 6, 7, 8]], dtype=torch.int64, device=dev)
        idx = torch.arange(4, dtype=torch.int64, device=dev).view(1, 4)
        nxt = torch.tensor([[1, 2, -1, -1]], dtype=torch.int64, device=dev)
        sib = torch.tensor([[-1, 3, -1, -1]], dtype=torch.int64, device=dev)
        target = torch.tensor([[8, 7, 9, 1]], dtype=torch.int64, device=dev)
        pred = torch.zeros(4, dtype=torch.int32, device=dev)
        acc = torch.full((1, 4), -1, dtype=torch.int32, device=dev)
        num = torch.zeros(1, dtype=torch.int32, device=dev)
        fn(pred, acc, num, cand, idx, nxt, sib, target)
        return pred.tolist(), acc.tolist(), num.tolist()

    t = time.perf_counter()
    got = walk(lambda *a: verify_tree_greedy_func(*a), "cuda")
    info["jit_compile_s"] = time.perf_counter() - t
    want = walk(lambda *a: verify_tree_greedy_cpu(*a), "cpu")
    info["jit_tree_verify_matches_reference"] = got == want
    if got != want:
        raise RuntimeError(f"JIT verify_tree_greedy {got} != reference {want}")
    return info


def run(out: Path, plan_name: str, budget_s: float, model_dir: Path,
        roles: list[str] | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    plan = PLANS[plan_name]
    if roles is None:
        roles = list(DRY_DEFAULT_ROLES if plan_name == "dry" else plan.roles)
    unknown = [r for r in roles if r not in plan.roles]
    if unknown:
        raise ValueError(f"--roles {unknown}: plan {plan_name!r} has {sorted(plan.roles)}")
    deadline = time.monotonic() + budget_s
    summary: dict = {"plan": plan_name, "plan_detail": asdict(plan), "stages": {},
                     "greedy_mismatches": None, "sampled_ok": False,
                     "cost_table": None, "coefficients": None, "tokens_per_s": {},
                     "roles": roles}
    gpu = on_gpu()
    summary["device"] = "cuda" if gpu else "cpu"
    pre = None
    if gpu:  # JIT compile (CPU-bound nvcc) overlaps the model build
        pre = subprocess.Popen([sys.executable, __file__, "preflight", "--out", str(out)],
                               stdout=open(out / "preflight.log", "w"), stderr=subprocess.STDOUT)
    t = time.perf_counter()
    try:
        model = build_model(plan, model_dir)
        summary["stages"]["model"] = {"ok": True, "seconds": time.perf_counter() - t,
                                      "preset": plan.model, "path": str(model)}
    except Exception:
        summary["stages"]["model"] = {"ok": False, "error": traceback.format_exc(limit=8)}
        _finish(out, summary)
        return summary
    if pre is not None:
        try:
            pre.wait(timeout=max(1, min(120, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            pre.kill()
        f = out / "preflight.json"
        summary["stages"]["preflight"] = json.loads(f.read_text()) if f.exists() else {
            "ok": False, "error": "preflight did not finish (see preflight.log)"}
    engine_failed = None  # the first role whose engine did not start
    for role in [r for r in plan.roles if r in roles]:
        left = deadline - time.monotonic()
        box = min(plan.roles[role][3], left - 5)
        if box < 20:
            summary["stages"][role] = {"ok": False, "error": f"skipped: {left:.0f} s left"}
            continue
        if engine_failed is not None:
            # Device time is scarce: the engines differ only in algorithm and dtype, so
            # the first engine that cannot start answers for the rest.
            summary["stages"][role] = {"ok": False, "error": f"skipped: the {engine_failed} "
                                                             "engine did not start"}
            continue
        t = time.perf_counter()
        cmd = [sys.executable, __file__, "role", role, "--plan", plan_name, "--model", str(model),
               "--out", str(out)]
        log = open(out / f"role_{role}.log", "w")
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=box,
                                start_new_session=True).returncode
            status = {"rc": rc}
        except subprocess.TimeoutExpired:
            status = {"rc": None, "error": f"timed out after {box:.0f} s"}
        status["seconds"] = time.perf_counter() - t
        f = out / f"role_{role}.json"
        status.update(json.loads(f.read_text()) if f.exists() else {})
        status["ok"] = status.get("rc") == 0 and "error" not in status and all(
            s.get("ok") for s in status.get("stages", {}).values())
        if not status.get("stages") and "engine_start_s" not in status:
            engine_failed = role
            status.setdefault("error", "the engine did not start")
            status["log_tail"] = _tail(out / f"role_{role}.log")
        summary["stages"][role] = status
        _atomic_write(out / "summary.json", summary)
    combine(out, summary)
    _finish(out, summary)
    return summary


def combine(out: Path, summary: dict) -> None:
    """Greedy mismatches, the sampling verdict, the fit, tokens/s per mode."""
    from das_sglang.sglang import sampling_check

    plan = PLANS[summary["plan"]]
    a, b = out / f"greedy_{plan.reference}.json", out / f"greedy_{plan.speculative}.json"
    if a.exists() and b.exists():
        ref, got = json.loads(a.read_text()), json.loads(b.read_text())
        # (whole rounds, in the same order: a time box may have ended either engine's stage
        # after some rounds; the verdict covers those both finished, and says so)
        common = min(len(ref), len(got))
        if common:
            ref, got = ref[:common], got[:common]
            bad = [i for i, (x, y) in enumerate(zip(ref, got)) if x != y]
            summary["greedy_mismatches"] = len(bad)
            summary["greedy_requests"] = common
            summary["greedy_requests_planned"] = plan.greedy_prompts * plan.greedy_rounds
            gaps_file = out / f"greedy_{plan.reference}_gaps.json"
            gaps = json.loads(gaps_file.read_text()) if gaps_file.exists() else None
            firsts, unexplained = [], 0
            for i in bad:
                pos = next((k for k, (p, q) in enumerate(zip(ref[i], got[i])) if p != q),
                           min(len(ref[i]), len(got[i])))
                gap = gaps[i][pos] if gaps and pos < len(gaps[i]) else None
                near_tie = gap is not None and gap <= NEAR_TIE_LOGPROB
                unexplained += not near_tie
                firsts.append({"request": i, "position": pos, "reference_top2_gap": gap,
                               "near_tie": near_tie})
            summary["greedy_first_mismatches"] = firsts[:20]
            # A mismatch where the reference's top two were not within rounding of each
            # other is a DAS error until shown otherwise: this must be 0.
            summary["greedy_mismatches_unexplained"] = unexplained
            summary["greedy_near_tie_logprob"] = NEAR_TIE_LOGPROB
    a, b = out / f"sampled_{plan.reference}.json", out / f"sampled_{plan.speculative}.json"
    if a.exists() and b.exists():
        ref, got = json.loads(a.read_text()), json.loads(b.read_text())
        verdict = sampling_check.compare(ref["outputs"], got["outputs"], got["metas"],
                                         plan.sampled_new_tokens, plan.sampled_min_accepted)
        summary["sampled"] = verdict.as_dict()
        summary["sampled_ok"] = verdict.ok
    table = out / "cost_table.csv"
    decode = out / "decode_table.csv"
    if table.exists() and decode.exists():
        # What `das replay --score` reads: the speculative engine's verify rows plus the
        # plain engine's decode rows (its `none` baseline); the fit reads the verify rows.
        score = out / "score_table.csv"
        lines = table.read_text().splitlines() + decode.read_text().splitlines()[1:]
        score.write_text("\n".join(lines) + "\n")
        summary["score_table"] = str(score)
    if table.exists():
        summary["cost_table"] = str(table)
        summary["stages"]["fit"] = fit(table, out / "coefficients.json")
        if summary["stages"]["fit"]["ok"]:
            summary["coefficients"] = json.loads((out / "coefficients.json").read_text())
    for role, mode in plan.e2e_modes.items():
        e2e = summary["stages"].get(role, {}).get("stages", {}).get("e2e", {})
        if e2e.get("ok"):
            summary["tokens_per_s"][mode] = e2e["tokens_per_s"]
    tps = summary["tokens_per_s"]
    if tps.get("none"):
        summary["speedup_vs_none"] = {m: v / tps["none"] for m, v in tps.items()}


def fit(table: Path, coefficients: Path) -> dict:
    script = REPO / "benchmarks" / "fit_cost_model.py"
    if not script.exists():
        return {"ok": False, "error": f"{script} is missing (the cost-model fit of the "
                                      "host-path work); the table is kept"}
    cmd = [sys.executable, str(script), "--table", str(table), "--json", str(coefficients)]
    got = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return {"ok": got.returncode == 0 and coefficients.exists(), "rc": got.returncode,
            "output": (got.stdout + got.stderr)[-2000:]}


def _finish(out: Path, summary: dict) -> None:
    _atomic_write(out / "summary.json", summary)
    short = {k: summary.get(k) for k in ("device", "greedy_mismatches", "sampled_ok",
                                         "cost_table", "tokens_per_s")}
    short["failed"] = sorted(k for k, v in summary["stages"].items() if not v.get("ok", True))
    print(json.dumps(short, indent=1))


def _read_json(path: Path | None) -> dict | None:
    try:
        return json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None


def worker_stats_delta(after: dict | None, before: dict | None) -> dict | None:
    """What the DAS worker counted during one stage: verify forwards, how many SGLang
    replayed as a CUDA graph and how many were ragged, DAS's host ms per step
    (``das_sglang.sglang.host_time``: plan + verify inputs, feedback, SGLang's gap), and
    its CUDA-graph tier estimate at the end of the stage."""
    if after is None:
        return None
    from das_sglang.sglang import host_time

    before = before or {}
    counts = {k: after.get(k, 0) - before.get(k, 0)
              for k in ("verify_steps", "graph_steps", "ragged_steps", "verify_tokens",
                        "proposed", "accepted", "probe_forwards")}
    host = host_time.delta(after.get("host", {}), before.get("host", {}))
    # (the worker's graph-tier estimate at the stage's end: graph / eager samples, the
    # measured eager extra, exploring steps; core/graph_tiers.py)
    return {**counts, "host": host_time.summary(host) if host else None,
            "graph_width": after.get("graph_width"), "graph_tiers": after.get("graph_tiers")}


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _atomic_write(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the whole kit")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--plan", choices=sorted(PLANS), default=None,
                   help="default: gpu on a CUDA machine, dry on the CPU")
    r.add_argument("--budget-s", type=float, default=450.0)
    r.add_argument("--model-dir", type=Path, default=None,
                   help="where the random model is written (default: OUT/model)")
    r.add_argument("--roles", default=None,
                   help="comma list of roles to run (default: all of the gpu plan; "
                        f"{','.join(DRY_DEFAULT_ROLES)} of the dry plan)")
    e = sub.add_parser("role", help="one engine and its stages (internal)")
    e.add_argument("role", choices=ALL_ROLES)
    e.add_argument("--plan", choices=sorted(PLANS), required=True)
    e.add_argument("--model", required=True)
    e.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("preflight", help="GPU: JIT tree-verify kernel check (internal)")
    p.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "role":
        return run_role(args.role, args.plan, args.model, args.out)
    if args.cmd == "preflight":
        try:
            info = {"ok": True, **preflight()}
        except Exception:
            info = {"ok": False, "error": traceback.format_exc(limit=8)}
        _atomic_write(args.out / "preflight.json", info)
        return 0 if info["ok"] else 1
    gpu = on_gpu()
    if not gpu and os.environ.get("DAS_SGLANG_CPU") != "1":
        print("error: no CUDA GPU here; set DAS_SGLANG_CPU=1 for the CPU dry run", file=sys.stderr)
        return 1
    roles = args.roles.split(",") if args.roles else None
    try:
        run(args.out, args.plan or ("gpu" if gpu else "dry"), args.budget_s,
            args.model_dir or args.out / "model", roles)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
