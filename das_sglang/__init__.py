"""das-sglang: distribution-aware speculative decoding for RL rollouts on SGLang."""

__version__ = "0.1.0"
