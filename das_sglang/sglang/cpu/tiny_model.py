"""A tiny random-weight Llama + a locally trained tokenizer, written to a directory.

Used by the CPU end-to-end tests, the CPU benchmark and ``das rollout`` on CPU: SGLang
loads it like any Hugging Face checkpoint, no network needed. Deterministic: the same
:class:`TinyModelSpec` always produces the same weights and tokenizer, and a directory
that already holds the spec's files is reused. The tokenizer ships a chat template, so
SGLang's chat routes (``/v1/chat/completions``) work on it.

:data:`PRESETS` names larger shapes of the same model for the GPU kit
(``benchmarks/gpu/``): ``gpu-0.6b`` is a Llama-shaped ~0.6B-parameter model in bf16,
built in place (``device="cuda"``), with no download.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

_STAMP = "das_tiny_model.json"
_WORDS = (
    "the of and to a in is it that for on with as by at from this be are or an was "
    "problem answer solve number sum product prime square root triangle circle angle "
    "area side length equal let find compute therefore thus so then if when since "
    "integer real value function sequence term ratio probability count ways digit "
    "remainder divisible factor multiple even odd positive negative maximum minimum"
).split()


@dataclass(frozen=True, slots=True)
class TinyModelSpec:
    """Shape of the tiny model; every default is the one the tests use."""

    vocab_size: int = 320
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 4096
    seed: int = 0
    dtype: str = "float32"  # weights as saved (and SGLang's dtype="auto" then)
    # lm_head is multiplied by this after init: widens the random logits so sampling is
    # not near-uniform (a few likely tokens per context, like a trained model).
    logit_scale: float = 8.0

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"invalid dtype={self.dtype!r}: must be one of {sorted(_DTYPES)}")
        if not self.logit_scale > 0:
            raise ValueError(f"invalid logit_scale={self.logit_scale!r}: must be > 0")
        if self.vocab_size < 64:
            raise ValueError(f"invalid vocab_size={self.vocab_size!r}: must be >= 64")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"invalid hidden_size={self.hidden_size!r}: must be a multiple of "
                f"num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"invalid num_kv_heads={self.num_kv_heads!r}: must divide "
                f"num_heads={self.num_heads}"
            )


_DTYPES = {"float32", "bfloat16", "float16"}

# Named shapes. "tiny" is the default spec (CPU tests); the gpu-* ones are Llama-shaped
# models for the GPU kit: per layer 4 * h^2 * (1 + kv/heads) / 2 attention + 3 * h * i MLP
# parameters (gpu-0.6b: 24 layers x ~26M = ~0.6B), random weights, bf16. Their logit
# scale keeps the next-token distribution peaked (logit std ~ 0.02 * sqrt(h) * scale ~ 7:
# after top-p 0.8 the likeliest token has ~0.7 of the mass on random contexts)
# so drafts are accepted often at temperature 1.0, as with a trained model on RL prompts.
PRESETS: dict[str, TinyModelSpec] = {
    "tiny": TinyModelSpec(),
    "small": TinyModelSpec(vocab_size=1024, hidden_size=256, intermediate_size=512,
                           num_layers=4, num_heads=8, num_kv_heads=4),
    "gpu-0.6b": TinyModelSpec(vocab_size=4096, hidden_size=1536, intermediate_size=4096,
                              num_layers=24, num_heads=12, num_kv_heads=4, dtype="bfloat16",
                              logit_scale=9.0),
    "gpu-1b": TinyModelSpec(vocab_size=4096, hidden_size=2048, intermediate_size=5632,
                            num_layers=22, num_heads=16, num_kv_heads=4, dtype="bfloat16",
                            logit_scale=8.0),
}


def preset(name: str) -> TinyModelSpec:
    """The spec named ``name`` (a key of :data:`PRESETS`); ValueError naming it otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown model size {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def make_tiny_model(path: str | Path, spec: TinyModelSpec = TinyModelSpec(),
                    device: str = "cpu") -> Path:
    """Write (or reuse) the model described by ``spec`` at ``path``; return the dir.

    ``device`` is where the random weights are initialised (``"cuda"`` makes a 1B model
    in seconds); the files are the same on any device up to the RNG's device.
    """
    out = Path(path)
    stamp = out / _STAMP
    if stamp.exists() and json.loads(stamp.read_text()) == asdict(spec):
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer(out, spec)
    _write_model(out, spec, vocab, device)
    stamp.write_text(json.dumps(asdict(spec)))
    return out


# A minimal ChatML template: SGLang's chat routes need one, and the tokenizer's special
# tokens mark the turns (the model is random; the template only makes the route work).
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def _corpus(seed: int, lines: int = 2000) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(
            rng.choice(_WORDS) if rng.random() < 0.8 else str(rng.randint(0, 999))
            for _ in range(rng.randint(5, 20))
        )
        for _ in range(lines)
    ]


def _write_tokenizer(out: Path, spec: TinyModelSpec) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec.seed), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": spec.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return tok.get_vocab_size()


def _write_model(out: Path, spec: TinyModelSpec, vocab: int, device: str = "cpu") -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        torch_dtype=spec.dtype,
    )
    torch.manual_seed(spec.seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    # Widen the random logits so sampling is not near-uniform (a few likely tokens
    # per context, like a trained model), which keeps statistical tests small.
    with torch.no_grad():
        model.lm_head.weight.mul_(spec.logit_scale)
    model = model.to(device="cpu", dtype=getattr(torch, spec.dtype))
    model.save_pretrained(str(out), safe_serialization=True)
