"""das-sglang: distribution-aware speculative decoding for RL rollouts on SGLang."""

__version__ = "0.1.0"

# The Python API for RL frameworks (imports no sglang until an engine is built).
from das_sglang.api import engine, tag, tagged  # noqa: E402

__all__ = ["engine", "tag", "tagged", "__version__"]
