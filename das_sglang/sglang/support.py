"""Models DAS's tree verification cannot verify exactly: refused at worker start-up.

DAS verifies a whole draft tree in one TARGET_VERIFY forward (NGRAM's layout: tree
attention mask over the verify rows, accepted KV moved afterwards). That is exact only
for pure-attention models whose per-token state is the KV cache the mover keeps:

- hybrid Mamba / linear-attention models (Mamba2, GDN, KDA, Lightning, ...) carry a
  recurrent state that a tree of branches cannot be scored against in one pass, and
  rejected branches would have advanced it;
- hybrid sliding-window models keep a second (SWA) KV pool the tree path does not move;
- MLA models (DeepSeek-V2/V3-style absorbed attention) use backends whose tree-mask
  TARGET_VERIFY path DAS has not been verified against.

Serving them "relaxed" would silently change outputs, so the worker refuses them.
"""

from __future__ import annotations


class UnsupportedModelError(ValueError):
    """The target model's architecture is not one DAS can verify exactly."""


def unsupported_reason(model_config) -> str | None:
    """Why DAS cannot verify this SGLang ``ModelConfig`` exactly, or None."""
    from sglang.srt.configs.hybrid_arch import mambaish_config
    from sglang.srt.configs.model_config import AttentionArch

    archs = list(getattr(model_config.hf_config, "architectures", None) or [])
    if mambaish_config(model_config):
        return f"hybrid Mamba / linear-attention model {archs}: recurrent state"
    if getattr(model_config, "is_hybrid_swa", False):
        return f"hybrid sliding-window model {archs}: a second KV pool"
    if model_config.attention_arch == AttentionArch.MLA:
        return f"MLA model {archs}: absorbed multi-latent attention"
    return None


def check_model_supported(model_config) -> None:
    reason = unsupported_reason(model_config)
    if reason is not None:
        raise UnsupportedModelError(
            f"--speculative-algorithm DAS cannot verify this model exactly ({reason}); "
            "DAS supports pure-attention (MHA/GQA) decoder models. Serve it without "
            "DAS or with a speculative algorithm SGLang supports for it."
        )


class NoExternalCorpus:
    """SGLang wires its n-gram external-corpus endpoints to every worker of an
    ``is_ngram()`` algorithm (``scheduler.py``: ``ExternalCorpusManager(draft_worker)``).
    DAS has no n-gram corpus: the endpoints answer with this clear refusal (SGLang turns
    the exception into ``success=False`` and its message) instead of an AttributeError."""

    _NO_CORPUS = (
        "external n-gram corpora are an NGRAM feature; --speculative-algorithm DAS drafts "
        "from its own per-problem rollout history"
    )

    def add_external_corpus(self, corpus_id, token_chunks):
        raise NotImplementedError(self._NO_CORPUS)

    def commit_corpus_load(self, corpus_id, loaded_token_count):
        raise NotImplementedError(self._NO_CORPUS)

    def remove_external_corpus(self, corpus_id):
        raise NotImplementedError(self._NO_CORPUS)

    def list_external_corpora(self):
        raise NotImplementedError(self._NO_CORPUS)
