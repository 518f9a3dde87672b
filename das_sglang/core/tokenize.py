"""Text -> token ids with the bundled offline Qwen2 BPE (or any ``tokenizer.json``), cached.

Replaying the bundled SkyThought series means tokenising ~6M tokens, which takes tens of
seconds on two cores, so encoded ids are cached as one ``.npz`` per (tokenizer, texts) pair:
the key hashes the tokenizer file's bytes and every text, so editing either gives a new entry
and a stale cache can never be read back.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np

BUNDLED_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tokenizers" / "qwen2.tokenizer.json.gz"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/das-sglang`` (``~/.cache/das-sglang``); ``--cache-dir`` overrides."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "das-sglang"


def _read_tokenizer_json(path: Path) -> str:
    if not path.is_file():
        raise ValueError(f"tokenizer file {str(path)!r} does not exist")
    raw = path.read_bytes()
    try:
        return (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"tokenizer file {str(path)!r} is not (gzipped) UTF-8 JSON: {e}") from None


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the content hash that keys its cache entries."""

    def __init__(self, path: Path | str | None = None, cache_dir: Path | str | None = None):
        from tokenizers import Tokenizer  # import here: loading the module stays cheap

        self.path = Path(path) if path is not None else BUNDLED_TOKENIZER
        text = _read_tokenizer_json(self.path)
        try:
            self._tok = Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"tokenizer file {str(self.path)!r} is not a tokenizer.json: {e}") from None
        self.digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_many(self, texts: Sequence[str], use_cache: bool = True) -> list[np.ndarray]:
        """Encode every text; read/write the cache entry keyed by tokenizer + texts."""
        path = self._cache_path(texts)
        if use_cache and path.is_file():
            cached = _load_entry(path, len(texts))
            if cached is not None:
                return cached
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        ids = [np.asarray(e.ids, dtype=np.int32) for e in encs]
        if use_cache:
            _save_entry(path, ids)
        return ids

    def _cache_path(self, texts: Sequence[str]) -> Path:
        h = hashlib.sha256(self.digest.encode())
        for t in texts:
            b = t.encode()
            h.update(len(b).to_bytes(8, "little"))  # length prefix: ("ab","c") != ("a","bc")
            h.update(b)
        return self.cache_dir / "tokens" / f"{h.hexdigest()[:24]}.npz"


def _save_entry(path: Path, ids: list[np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0] + [len(x) for x in ids], dtype=np.int64)
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")  # atomic: concurrent runs never see half a file
    np.savez(tmp, ids=flat, offsets=offsets)
    os.replace(tmp, path)


def _load_entry(path: Path, n: int) -> list[np.ndarray] | None:
    """The cached ids, or None when the entry is unreadable (then it is rebuilt)."""
    try:
        with np.load(path) as z:
            flat, offsets = z["ids"], z["offsets"]
    except (OSError, ValueError, KeyError):
        return None
    if len(offsets) != n + 1:
        return None
    return [flat[offsets[i] : offsets[i + 1]] for i in range(n)]
