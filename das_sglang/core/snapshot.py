"""Crash-safe snapshots of the drafter's per-problem history window.

The history is what `SuffixDrafter.history()` returns and `load_history(...)` takes:
``{problem_id: {step: [int32 token array, ...]}}`` (finished rollouts only). A snapshot
is one file, ``<dir>/history.dassnap``, laid out as::

    magic    8 bytes   b"DASHIST\\0"
    version  u32 LE    FORMAT_VERSION
    index_n  u64 LE    bytes of the JSON index
    payload  u64 LE    bytes of the token payload (a multiple of 4)
    index    JSON      {"meta": ..., "problems": [[problem_id, [[step, [len, ...]], ...]], ...]}
                       (numpy arrays in meta: {"__ndarray__": base64 bytes, "dtype", "shape"})
    tokens   int32 LE  every sequence, concatenated in index order
    sha256   32 bytes  over everything above

Writes are atomic: a temp file in the same directory is written, flushed and fsynced,
renamed over the old snapshot, and the directory is fsynced. A writer killed at any point
therefore leaves either the previous snapshot or the new one, never a torn file; stray
temp files are ignored by readers. Temp names carry the writer's host and pid, and a save
removes only temps of its own process or of a dead process on the same host: never a
temp another live writer (e.g. another tensor-parallel rank) is writing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Mapping, Sequence

import numpy as np

from das_sglang.core.atomic import atomic_file

MAGIC = b"DASHIST\0"
FORMAT_VERSION = 1
SNAPSHOT_NAME = "history.dassnap"
_HEADER = struct.Struct("<8sIQQ")
_DIGEST_BYTES = 32
_TMP_PREFIX = ".history-"  # + "<host>-<pid>-" (see _own_prefix)
_INT32 = np.dtype("<i4")

History = dict[str, dict[int, list[np.ndarray]]]
_log = logging.getLogger(__name__)


class SnapshotError(ValueError):
    """A snapshot file that cannot be used: the message names the file and the defect."""


def snapshot_file(path: str | os.PathLike[str]) -> Path:
    """The snapshot file inside directory ``path``."""
    return Path(path) / SNAPSHOT_NAME


# ---------------------------------------------------------------- saving


def save_history(
    path: str | os.PathLike[str],
    history: Mapping[str, Mapping[int, Sequence[Any]]],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write ``history`` (and JSON-able ``meta``) to directory ``path``.

    Returns the snapshot file. Raises ValueError for a history that is not
    ``{str: {int: [int32-compatible 1-D arrays]}}`` or meta that is not JSON.
    """
    index, arrays = _encode_index(history, meta)
    payload_len = sum(a.nbytes for a in arrays)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(index), payload_len)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(directory)
    target = directory / SNAPSHOT_NAME
    with atomic_file(target, binary=True, tmp_prefix=_own_prefix()) as f:
        _write_all(f, _chunks(header, index, arrays))
    return target


def _encode_index(
    history: Mapping[str, Mapping[int, Sequence[Any]]], meta: Mapping[str, Any] | None
) -> tuple[bytes, list[np.ndarray]]:
    if not isinstance(history, Mapping):
        raise ValueError(f"history must be a mapping problem_id -> {{step: [tokens]}}, got {type(history).__name__}")
    problems: list[list[Any]] = []
    arrays: list[np.ndarray] = []
    for problem_id, steps in history.items():
        if not isinstance(problem_id, str):
            raise ValueError(f"history problem_id {problem_id!r}: must be a str")
        if not isinstance(steps, Mapping):
            raise ValueError(f"history[{problem_id!r}] must map step -> [tokens], got {type(steps).__name__}")
        step_rows = []
        for step, seqs in steps.items():
            if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
                raise ValueError(f"history[{problem_id!r}] step {step!r}: must be an int")
            tokens = [_as_int32(t, problem_id, int(step), i) for i, t in enumerate(seqs)]
            arrays.extend(tokens)
            step_rows.append([int(step), [len(t) for t in tokens]])
        problems.append([problem_id, step_rows])
    try:
        index = json.dumps({"meta": dict(meta or {}), "problems": problems}, separators=(",", ":"),
                           default=_json_numpy)
    except (TypeError, ValueError) as e:
        raise ValueError(f"snapshot meta is not JSON-serialisable: {e}") from None
    return index.encode(), arrays


_NDARRAY = "__ndarray__"  # meta's encoding of a numpy array: base64 bytes + dtype + shape


def _json_numpy(obj: Any) -> Any:
    """Meta may carry numpy arrays and scalars (e.g. the length predictor's columns),
    encoded here, on the writer thread, not where the view was taken. An array is its
    bytes in base64 (``{"__ndarray__", "dtype", "shape"}``, read back as an array by
    ``load_history``), not a JSON list: json.dumps holds the GIL for the whole call, and
    131k lengths x 3 as a list took 50 ms of it (base64: 6 ms)."""
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        if a.dtype.kind not in "biuf":
            raise TypeError(f"arrays of {a.dtype} are not JSON serializable")
        return {_NDARRAY: base64.b64encode(a.tobytes()).decode("ascii"), "dtype": a.dtype.str,
                "shape": list(a.shape)}
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _as_int32(tokens: Any, problem_id: str, step: int, i: int) -> np.ndarray:
    if type(tokens) is np.ndarray and tokens.dtype == _INT32 and tokens.ndim == 1 and tokens.flags.c_contiguous:
        return tokens  # what the session's history view holds: nothing to check or copy
    arr = np.asarray(tokens)
    where = f"history[{problem_id!r}][{step}][{i}]"
    if arr.ndim != 1:
        raise ValueError(f"{where}: token array must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{where}: token array must hold integers, got dtype {arr.dtype}")
    if arr.size and arr.dtype != _INT32:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < np.iinfo(np.int32).min or hi > np.iinfo(np.int32).max:
            raise ValueError(f"{where}: token ids [{lo}, {hi}] do not fit int32")
    return np.ascontiguousarray(arr, dtype=_INT32)


def _chunks(header: bytes, index: bytes, arrays: Iterable[np.ndarray]) -> Iterable[bytes]:
    """File content in order, ending with the sha256 of everything before it."""
    digest = hashlib.sha256()
    for part in _body(header, index, arrays):
        digest.update(part)
        yield part
    yield digest.digest()


_CHUNK_BYTES = 1 << 20


def _body(header: bytes, index: bytes, arrays: Iterable[np.ndarray]) -> Iterable[bytes]:
    """The file's parts; the token arrays coalesced into ~1 MiB chunks (the same bytes): a
    background writer then spends its time in sha256 and write, which release the GIL,
    not in a Python call per sequence that the scheduler thread would wait behind."""
    yield header
    yield index
    buf: list[np.ndarray] = []
    size = 0
    for a in arrays:
        buf.append(a)
        size += a.nbytes
        if size >= _CHUNK_BYTES:
            yield memoryview(np.concatenate(buf) if len(buf) > 1 else buf[0]).cast("B")
            buf, size = [], 0
    if buf:
        yield memoryview(np.concatenate(buf) if len(buf) > 1 else buf[0]).cast("B")


def _write_all(f: BinaryIO, chunks: Iterable[bytes]) -> None:
    # A module-level seam: the kill-mid-save test replaces it with a slow writer.
    for chunk in chunks:
        f.write(chunk)


def _own_prefix() -> str:
    return f"{_TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-"


def _remove_stale_temps(directory: Path) -> None:
    """Temp files this process left, or that a dead writer on this host left; never the
    live snapshot, never a temp of a live writer or of another host."""
    host = socket.gethostname()
    for stale in directory.glob(f"{_TMP_PREFIX}*.tmp"):
        owner = stale.name[len(_TMP_PREFIX):].rsplit("-", 2)  # host (may hold "-"), pid, rand
        if len(owner) != 3 or owner[0] != host or not owner[1].isdigit():
            continue
        pid = int(owner[1])
        if pid == os.getpid() or not _alive(pid):
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# ---------------------------------------------------------------- loading


def load_history(path: str | os.PathLike[str]) -> tuple[History, dict[str, Any]]:
    """Read the snapshot in directory ``path`` -> (history, meta).

    Raises FileNotFoundError when there is no snapshot, SnapshotError when it is corrupt,
    truncated, or of another format version.
    """
    file = snapshot_file(path)
    with open(file, "rb") as f:
        buf = bytearray(os.fstat(f.fileno()).st_size)
        f.readinto(buf)
    return _decode(file, buf)


def _decode(file: Path, buf: bytearray) -> tuple[History, dict[str, Any]]:
    if len(buf) < _HEADER.size:
        raise SnapshotError(f"{file}: truncated: {len(buf)} bytes is shorter than the {_HEADER.size}-byte header")
    magic, version, index_n, payload_n = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise SnapshotError(f"{file}: not a das-sglang history snapshot (magic {bytes(magic)!r}, want {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise SnapshotError(f"{file}: unsupported format version {version} (this build reads {FORMAT_VERSION})")
    expected = _HEADER.size + index_n + payload_n + _DIGEST_BYTES
    if len(buf) != expected:
        what = "truncated" if len(buf) < expected else "trailing bytes"
        raise SnapshotError(f"{file}: {what}: {len(buf)} bytes, header says {expected}")
    body = memoryview(buf)[: expected - _DIGEST_BYTES]
    if hashlib.sha256(body).digest() != bytes(buf[expected - _DIGEST_BYTES :]):
        raise SnapshotError(f"{file}: checksum mismatch (sha256): the file is corrupt")
    index = _parse_index(file, bytes(buf[_HEADER.size : _HEADER.size + index_n]))
    tokens = np.frombuffer(buf, dtype=_INT32, count=payload_n // 4, offset=_HEADER.size + index_n)
    return _split(file, index["problems"], tokens), index["meta"]


def _ndarray_hook(obj: dict) -> Any:
    if _NDARRAY not in obj:
        return obj
    dtype = np.dtype(obj["dtype"])
    if dtype.kind not in "biuf":
        raise ValueError(f"array of dtype {dtype} in meta")
    a = np.frombuffer(base64.b64decode(obj[_NDARRAY], validate=True), dtype=dtype)
    return a.reshape([int(n) for n in obj["shape"]])


def _parse_index(file: Path, raw: bytes) -> dict[str, Any]:
    try:
        index = json.loads(raw, object_hook=_ndarray_hook)
        if not isinstance(index, dict) or not isinstance(index["problems"], list):
            raise TypeError("index is not an object with a 'problems' list")
        return index
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        # The checksum passed, so this is a writer bug, not disk corruption; still say where.
        raise SnapshotError(f"{file}: malformed index: {e}") from None


def _split(file: Path, problems: list[Any], tokens: np.ndarray) -> History:
    history: History = {}
    pos = 0
    try:
        for problem_id, step_rows in problems:
            steps = history.setdefault(str(problem_id), {})
            for step, lengths in step_rows:
                seqs = steps.setdefault(int(step), [])
                for n in lengths:
                    seqs.append(tokens[pos : pos + n])
                    pos += n
    except (TypeError, ValueError) as e:
        raise SnapshotError(f"{file}: malformed index: {e}") from None
    if pos != len(tokens):
        raise SnapshotError(f"{file}: index lists {pos} tokens but the payload holds {len(tokens)}")
    return history


def load_history_or_empty(
    path: str | os.PathLike[str],
    strict: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[History, dict[str, Any]]:
    """Start-up loading: a missing snapshot is a fresh start; a bad one is logged and
    ignored (empty history) so the engine still starts, unless ``strict``."""
    warn = log or _log.warning
    try:
        return load_history(path)
    except FileNotFoundError:
        return {}, {}
    except (SnapshotError, OSError) as e:
        if strict:
            raise
        warn(f"ignoring unusable DAS history snapshot, starting with empty history: {e}")
        return {}, {}


# ---------------------------------------------------------------- periodic saving


@dataclass
class PeriodicSnapshot:
    """Saves ``get_history()`` to ``path`` every ``every_n`` finished requests and on close.

    The SGLang worker calls `note_finished()` per finished request and `close()` at
    shutdown; ``every_n=0`` saves only on close.

    ``background=True``: ``save()`` only takes ``get_history()`` (which must return a view
    the caller no longer mutates, e.g. per-step tuples of immutable arrays) on the calling
    thread; encoding, sha256, write and fsync run on a writer thread, through the same
    atomic temp-file + rename path (crash-safe exactly as before). Saves requested while
    one is being written coalesce: the newest view is written next. ``close()`` (and
    ``wait()``) block until everything requested is on disk and re-raise a write error.
    """

    path: Path
    get_history: Callable[[], Mapping[str, Mapping[int, Sequence[Any]]]]
    every_n: int = 0
    get_meta: Callable[[], Mapping[str, Any]] | None = None
    _since_save: int = 0
    background: bool = False

    def __post_init__(self) -> None:
        if self.every_n < 0:
            raise ValueError(f"invalid every_n={self.every_n!r}: must be >= 0")
        self.path = Path(self.path)
        self._writer: _Writer | None = _Writer(self.path) if self.background else None

    def note_finished(self, count: int = 1) -> bool:
        """Count finished requests; returns True when this call saved a snapshot."""
        self._since_save += count
        if self.every_n and self._since_save >= self.every_n:
            self.save()
            return True
        return False

    def save(self) -> Path:
        meta = self.get_meta() if self.get_meta else None
        self._since_save = 0
        if self._writer is not None:
            self._writer.request(self.get_history(), meta)
            return snapshot_file(self.path)
        return save_history(self.path, self.get_history(), meta)

    def wait(self) -> None:
        if self._writer is not None:
            self._writer.wait()

    def close(self) -> Path:
        out = self.save()
        if self._writer is not None:
            self._writer.close()
        return out


class _Writer:
    """Writer thread of a background PeriodicSnapshot: at most one pending view."""

    def __init__(self, path: Path) -> None:
        import threading

        self.path = path
        self._cv = threading.Condition()
        self._pending: tuple | None = None
        self._busy = False
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="das-snapshot-writer", daemon=True)
        self._thread.start()

    def request(self, history, meta) -> None:
        with self._cv:
            self._raise()
            self._pending = (history, meta)
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._closed:
                    self._cv.wait()
                if self._pending is None:
                    return
                job, self._pending = self._pending, None
                self._busy = True
            try:
                save_history(self.path, *job)
            except BaseException as e:  # noqa: BLE001 (re-raised by wait/close/request)
                _log.exception("DAS: background snapshot write failed")
                self._error = e
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def wait(self) -> None:
        with self._cv:
            while self._pending is not None or self._busy:
                self._cv.wait()
            self._raise()

    def close(self) -> None:
        self.wait()
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=60)
