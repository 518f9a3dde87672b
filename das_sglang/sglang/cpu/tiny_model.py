"""A tiny random-weight Llama + a locally trained tokenizer, written to a directory.

Used by the CPU end-to-end tests, the CPU benchmark and ``das rollout`` on CPU: SGLang
loads it like any Hugging Face checkpoint, no network needed. Deterministic: the same
:class:`TinyModelSpec` always produces the same weights and tokenizer, and a directory
that already holds the spec's files is reused.
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

    def __post_init__(self) -> None:
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


def make_tiny_model(path: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write (or reuse) the tiny model described by ``spec`` at ``path``; return the dir."""
    out = Path(path)
    stamp = out / _STAMP
    if stamp.exists() and json.loads(stamp.read_text()) == asdict(spec):
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer(out, spec)
    _write_model(out, spec, vocab)
    stamp.write_text(json.dumps(asdict(spec)))
    return out


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
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return tok.get_vocab_size()


def _write_model(out: Path, spec: TinyModelSpec, vocab: int) -> None:
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
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    # Widen the random logits so sampling is not near-uniform (a few likely tokens
    # per context, like a trained model), which keeps statistical tests small.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(str(out), safe_serialization=True)
