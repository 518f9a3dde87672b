"""Calibrate ``t = c_base + c_tok * n_tokens + c_kv * kv_tokens`` on the machine at hand.

Times one decode-verify forward of a random-weight Llama (no download) over a grid of
batch sizes x draft widths (``n_tokens = batch * (1 + width)``, ``kv_tokens = batch *
context``) at a fixed context length,
fits ``CostModel.fit`` and writes the samples, the constants and the fit error as JSON
(+ a PNG of measured vs fitted).

    python benchmarks/calibrate_cost_model.py --json runs/calib/cpu_tiny.json         # CPU, tiny
    python benchmarks/calibrate_cost_model.py --shape 7b --device cuda --json h100.json  # GPU

``--shape tiny`` is the 2-layer test model of the CPU end-to-end tests; ``7b`` has the layer
shapes of Qwen2.5-7B (``--layers`` trims the depth; per-layer cost scales linearly, the fit
then reports the trimmed model: multiply c_base and c_tok by 28 / layers). Times the model
forward only: an engine adds its own per-step overhead on top of c_base.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from das_sglang.core.cost_model import calibrate

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (64, 128, 2, 4, 2, 320),
    "7b": (3584, 18944, 28, 28, 4, 152064),
}


def build(shape: str, layers: int | None, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, n_layers, heads, kv_heads, vocab = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers or n_layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=32768)
    torch.manual_seed(0)
    if device == "cpu":
        torch.set_num_threads(1)  # one core: shared CPUs make multi-thread timings noise
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def forward_fn(model, device: str, context: int, width: int):
    """forward(n_tokens): a batch of n_tokens / (1 + width) rows, each verifying 1 + width
    tokens against a cached context of ``context`` tokens."""
    import torch

    caches: dict[int, object] = {}

    def prefill(batch: int):
        ids = torch.zeros((batch, context), dtype=torch.long, device=device)
        with torch.no_grad():
            return model(ids, use_cache=True).past_key_values

    def forward(n_tokens: int, kv_tokens: int = 0) -> None:
        batch = max(1, n_tokens // (1 + width))
        if batch not in caches:
            caches[batch] = prefill(batch)
        cache = caches[batch]
        ids = torch.zeros((batch, 1 + width), dtype=torch.long, device=device)
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
        cache.crop(-(1 + width))  # forget the verified tokens: every call sees the same context
        if device == "cuda":
            torch.cuda.synchronize()

    return forward


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--widths", default="0,3,7,15")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        batches = [int(x) for x in args.batches.split(",")]
        widths = [int(x) for x in args.widths.split(",")]
    except ValueError:
        print(f"error: --batches {args.batches!r} / --widths {args.widths!r} must be comma lists "
              "of integers", file=sys.stderr)
        return 1
    model = build(args.shape, args.layers, args.device)
    samples = []
    for width in widths:
        fwd = forward_fn(model, args.device, args.context, width)
        grid = [(b * (1 + width), b * args.context) for b in batches]
        _, rows = calibrate(fwd, grid, repeats=args.repeats, warmup=2, timer=time.perf_counter)
        samples += rows
    from das_sglang.core.cost_model import CostModel

    fit = CostModel.fit(samples, name=f"{args.device}-{args.shape}")
    out = {
        "shape": args.shape, "layers": args.layers, "device": args.device, "context": args.context,
        "samples": [{"n_tokens": n, "kv_tokens": kv, "seconds": t} for n, kv, t in samples],
        "c_base_s": fit.c_base_s, "c_tok_s": fit.c_tok_s, "c_kv_s": fit.c_kv_s,
        "fit": fit.fit_info.__dict__,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    _plot(args.json.with_suffix(".png"), samples, fit)
    print(f"c_base = {fit.c_base_s * 1e3:.3f} ms, c_tok = {fit.c_tok_s * 1e6:.2f} us, "
          f"c_kv = {fit.c_kv_s * 1e9:.2f} ns, "
          f"mean rel err {fit.fit_info.mean_rel_err:.1%}, max {fit.fit_info.max_rel_err:.1%}; "
          f"wrote {args.json}")
    return 0


def _plot(path: Path, samples, fit) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, kv, t = (np.array([s[i] for s in samples]) for i in range(3))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    pred = fit.forward_time(n, kv)
    ax.scatter(pred * 1e3, t * 1e3, s=12, label="grid points (median)")
    top = max(pred.max(), t.max()) * 1e3
    ax.plot([0, top], [0, top], color="C1", label="fit = measured")
    ax.set_xlabel("fitted ms")
    ax.set_ylabel("measured ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
