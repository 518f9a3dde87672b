"""Crash-safe snapshots of the drafter's per-problem history window.

The history is what `SuffixDrafter.history()` returns and `load_history(...)` takes:
``{problem_id: {step: [int32 token array, ...]}}`` (finished rollouts only). A snapshot
is one file, ``<dir>/history.dassnap``, laid out as (format 2)::

    magic    8 bytes   b"DASHIST\\0"
    version  u32 LE    FORMAT_VERSION (2; version 1 files are still read)
    index_n  u64 LE    bytes of the JSON index
    payload  u64 LE    bytes of the binary payload (a multiple of 4)
    index    JSON      {"meta": ..., "problems": [[problem_id, [[step, n_sequences], ...]], ...],
                        "sequences": S, "tokens": T}
                       (numpy arrays in meta: {"__array__": [offset, nbytes], "dtype", "shape"},
                        their bytes in the payload's array section)
    lengths  int32 LE  S sequence lengths, in index order
    tokens   int32 LE  T tokens: every sequence, concatenated in index order
    arrays   bytes     meta's numpy arrays, each padded to 8 bytes
    sha256   32 bytes  over everything above

Format 1 kept each sequence's length in the JSON index and meta's arrays as base64 in it.
Format 2 moved both into the binary payload: a background writer's ``json.dumps`` and
``base64`` are single calls that hold the GIL throughout, and at RL scale (131k sequences,
the length predictor's 3 x 131k columns) they held it for ~24 and ~8 ms, stalling the
scheduler thread for as long (measured: its longest stall during a save fell from 30-40 ms
to ~7 ms).

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Mapping, Sequence

import numpy as np

from das_sglang.core.atomic import atomic_file

MAGIC = b"DASHIST\0"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
SNAPSHOT_NAME = "history.dassnap"
_HEADER = struct.Struct("<8sIQQ")
_DIGEST_BYTES = 32
_TMP_PREFIX = ".history-"  # + "<host>-<pid>-" (see _own_prefix)
_INT32 = np.dtype("<i4")

History = dict[str, dict[int, list[np.ndarray]]]
_log = logging.getLogger(__name__)


class _Tail:
    """Append-only storage behind TokenGroups: arrays with spare room and how much of them
    some group covers. Only the group covering all of it (the tip) may append in place;
    bytes a group covers are never written again."""

    __slots__ = ("tokens", "lens", "n_tokens", "n_seqs")

    def __init__(self, tokens: np.ndarray, lens: np.ndarray, n_tokens: int, n_seqs: int) -> None:
        self.tokens, self.lens, self.n_tokens, self.n_seqs = tokens, lens, n_tokens, n_seqs


class TokenGroup(Sequence):
    """The sequences of one problem-step as one int32 array and their lengths: an
    immutable sequence of int32 arrays (views), which ``save_history`` writes without a
    Python step per sequence. The worker's history mirror holds these (at RL scale 8k
    problem-steps instead of 131k arrays), so a background writer's encode holds the GIL
    in a loop over problem-steps, not sequences.

    ``plus`` returns a new group and leaves this one as it was (a writer may hold it). It
    costs O(the new sequence), amortised: the newest group of a chain appends into spare
    room of the arrays it views (past every byte any group covers), which grow 1.5x when
    full -- a problem-step that takes many rollouts (one problem id for a whole run, say)
    never copies its whole text per finish."""

    __slots__ = ("flat", "lens", "_tail")

    def __init__(self, flat: np.ndarray, lens: np.ndarray, _tail: _Tail | None = None) -> None:
        self.flat = flat  # int32, contiguous; never written while this group exists
        self.lens = lens  # int32, one per sequence, summing to len(flat)
        self._tail = _tail

    @classmethod
    def of(cls, seqs: Iterable[Any]) -> TokenGroup:
        arrays = [_as_int32(t, "", 0, i) for i, t in enumerate(seqs)]
        flat = np.concatenate(arrays) if arrays else np.zeros(0, _INT32)
        return cls(flat, np.array([len(a) for a in arrays], _INT32))

    @classmethod
    def single(cls, tokens: np.ndarray) -> TokenGroup:
        """A group of one validated sequence (a contiguous int32 array, never written
        afterwards: the group views it)."""
        if tokens.dtype != _INT32 or tokens.ndim != 1 or not tokens.flags.c_contiguous:
            raise ValueError(f"TokenGroup.single: expected a contiguous 1-D int32 array, got "
                             f"dtype={tokens.dtype} shape={tokens.shape}")
        return cls(tokens, np.array([len(tokens)], _INT32))

    def plus(self, tokens: np.ndarray) -> TokenGroup:
        """This group with one more sequence (``tokens``: an int32 array)."""
        n, k, m = len(self.flat), len(self.lens), len(tokens)
        tail = self._tail
        if tail is None or tail.n_tokens != n or tail.n_seqs != k or \
                len(tail.tokens) < n + m or len(tail.lens) < k + 1:
            # not the tip (another group appended past us), or full: new arrays, 1.5x the
            # need (amortised O(1) per token; at most a third of a grown array is spare)
            t = np.empty(max((n + m) * 3 // 2, 256), _INT32)
            t[:n] = self.flat
            ls = np.empty(max((k + 1) * 3 // 2, 16), _INT32)
            ls[:k] = self.lens
            tail = _Tail(t, ls, n, k)
        tail.tokens[n : n + m] = tokens
        tail.lens[k] = m
        tail.n_tokens, tail.n_seqs = n + m, k + 1
        return TokenGroup(tail.tokens[: n + m], tail.lens[: k + 1], tail)

    def __len__(self) -> int:
        return len(self.lens)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self.lens)
        if not -n <= i < n:
            raise IndexError(f"TokenGroup index {i} out of range ({n} sequences)")
        i %= n
        start = int(self.lens[:i].sum(dtype=np.int64))
        return self.flat[start : start + int(self.lens[i])]

    def __repr__(self) -> str:
        return f"TokenGroup({len(self)} sequences, {len(self.flat)} tokens)"


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
    return _save(path, history, meta, None)


def _save(path, history, meta, pause: Callable[[], None] | None) -> Path:
    """:func:`save_history`; ``pause`` (a background writer's :func:`gil_pause`) is
    called between slices of the encoding's Python. (The payload's chunks need none: the
    concatenations, sha256 and writes hold the GIL for ~50 us a chunk or release it.)"""
    index, parts, payload_len = _encode(history, meta, pause)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(index), payload_len)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(directory)
    target = directory / SNAPSHOT_NAME
    with atomic_file(target, binary=True, tmp_prefix=_own_prefix()) as f:
        _write_all(f, _chunks(header, index, parts))
    return target


# A background writer's encoding is Python (a pass over every (problem, step) group and
# the JSON index: 8-12 ms at 2,048 problems x 4 steps) that another thread waiting for the
# GIL gets only when the interpreter forces a switch, after ``sys.getswitchinterval()``
# (5 ms): the scheduler thread then stalled up to ~5-10 ms per save. The writer now
# pauses between slices of that work (gil_pause), so a waiter gets it within one slice.
_PAUSE_GROUPS = 256  # (problem, step) groups encoded between two pauses (~0.2-0.3 ms)
_PAUSE_PROBLEMS = 256  # problems of the JSON index dumped between two pauses
_PAUSE_S = 20e-6


def gil_pause() -> None:
    """A background thread's pause between pieces of Python: a sleep releases the GIL and
    lasts long enough for a thread waiting for it to take it (the snapshot writer here,
    the session's policy-thread recording job)."""
    time.sleep(_PAUSE_S)


def _encode(
    history: Mapping[str, Mapping[int, Sequence[Any]]], meta: Mapping[str, Any] | None,
    pause: Callable[[], None] | None = None,
) -> tuple[bytes, list[Any], int]:
    """(JSON index, payload parts in order, payload bytes). The parts: the lengths array,
    the token arrays (coalesced into chunks by ``_body``), then meta's arrays. ``pause``:
    called between slices of the work (the same bytes either way)."""
    if not isinstance(history, Mapping):
        raise ValueError(f"history must be a mapping problem_id -> {{step: [tokens]}}, got {type(history).__name__}")
    problems: list[list[Any]] = []
    arrays: list[np.ndarray] = []
    lengths: list[Any] = []  # ints, and arrays of a TokenGroup's lengths
    groups = 0
    for problem_id, steps in history.items():
        if pause is not None and groups >= _PAUSE_GROUPS:
            pause()
            groups = 0
        groups += len(steps)
        if not isinstance(problem_id, str):
            raise ValueError(f"history problem_id {problem_id!r}: must be a str")
        if not isinstance(steps, Mapping):
            raise ValueError(f"history[{problem_id!r}] must map step -> [tokens], got {type(steps).__name__}")
        step_rows = []
        for step, seqs in steps.items():
            if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
                raise ValueError(f"history[{problem_id!r}] step {step!r}: must be an int")
            if type(seqs) is TokenGroup:  # the worker's mirror: no step per sequence
                arrays.append(seqs.flat)
                lengths.append(seqs.lens)
                step_rows.append([int(step), len(seqs)])
                continue
            tokens = [_as_int32(t, problem_id, int(step), i) for i, t in enumerate(seqs)]
            arrays.extend(tokens)
            lengths.append(np.fromiter(map(len, tokens), _INT32, len(tokens)))
            step_rows.append([int(step), len(tokens)])
        problems.append([problem_id, step_rows])
    blobs: list[np.ndarray] = []
    blob_bytes = [0]

    def as_blob(obj: Any) -> Any:
        """Meta's numpy arrays go to the payload's array section (8-byte aligned)."""
        if isinstance(obj, np.ndarray):
            a = np.ascontiguousarray(obj)
            _numeric(a.dtype)
            ref = {_ARRAY: [blob_bytes[0], a.nbytes], "dtype": a.dtype.str, "shape": list(a.shape)}
            blobs.append(a)
            pad = -a.nbytes % 8
            if pad:
                blobs.append(np.zeros(pad, np.uint8))
            blob_bytes[0] += a.nbytes + pad
            return ref
        return _json_scalar(obj)

    lens = np.concatenate(lengths) if lengths else np.zeros(0, _INT32)
    n_tokens = int(lens.sum(dtype=np.int64))
    try:
        # {"meta":..,"problems":[..],"sequences":S,"tokens":T}, the problems dumped a slice
        # at a time (one call held the GIL ~3 ms at 2,048 problems), pausing between slices
        sep = (",", ":")
        head = json.dumps({"meta": dict(meta or {})}, separators=sep, default=as_blob)
        pieces = []
        for lo in range(0, len(problems), _PAUSE_PROBLEMS):
            if lo and pause is not None:
                pause()
            pieces.append(json.dumps(problems[lo: lo + _PAUSE_PROBLEMS], separators=sep)[1:-1])
        index = (f'{head[:-1]},"problems":[{",".join(pieces)}],'
                 f'"sequences":{len(lens)},"tokens":{n_tokens}}}')
    except (TypeError, ValueError) as e:
        raise ValueError(f"snapshot meta is not JSON-serialisable: {e}") from None
    payload_len = lens.nbytes + 4 * n_tokens + blob_bytes[0]
    return index.encode(), [lens, arrays, blobs], payload_len


_NDARRAY = "__ndarray__"  # format 1: meta's numpy arrays as base64 bytes + dtype + shape
_ARRAY = "__array__"  # format 2: [offset, nbytes] in the payload's array section + dtype + shape


def _json_scalar(obj: Any) -> Any:
    """Numpy scalars in meta, as JSON numbers."""
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


def _chunks(header: bytes, index: bytes, parts: list[Any]) -> Iterable[bytes]:
    """File content in order, ending with the sha256 of everything before it."""
    digest = hashlib.sha256()
    for part in _body(header, index, parts):
        digest.update(part)
        yield part
    yield digest.digest()


_CHUNK_BYTES = 1 << 20


def _body(header: bytes, index: bytes, parts: list[Any]) -> Iterable[bytes]:
    """The file's parts; the token arrays coalesced into ~1 MiB chunks (the same bytes): a
    background writer then spends its time in sha256 and write, which release the GIL,
    not in a Python call per sequence that the scheduler thread would wait behind."""
    lens, arrays, blobs = parts
    yield header
    yield index
    yield lens.view(np.uint8)
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
    for b in blobs:
        yield b.reshape(-1).view(np.uint8)  # (any shape, empty ones too)


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
    if version not in READ_VERSIONS:
        raise SnapshotError(f"{file}: unsupported format version {version} (this build reads "
                            f"{', '.join(map(str, READ_VERSIONS))})")
    expected = _HEADER.size + index_n + payload_n + _DIGEST_BYTES
    if len(buf) != expected:
        what = "truncated" if len(buf) < expected else "trailing bytes"
        raise SnapshotError(f"{file}: {what}: {len(buf)} bytes, header says {expected}")
    body = memoryview(buf)[: expected - _DIGEST_BYTES]
    if hashlib.sha256(body).digest() != bytes(buf[expected - _DIGEST_BYTES :]):
        raise SnapshotError(f"{file}: checksum mismatch (sha256): the file is corrupt")
    raw = bytes(buf[_HEADER.size : _HEADER.size + index_n])
    start = _HEADER.size + index_n
    if version == 1:
        index = _parse_index(file, raw, _ndarray_hook)
        tokens = np.frombuffer(buf, dtype=_INT32, count=payload_n // 4, offset=start)
        return _split(file, index["problems"], tokens), index["meta"]
    return _decode_v2(file, buf, raw, start, payload_n)


def _decode_v2(file: Path, buf: bytearray, raw: bytes, start: int, payload_n: int):
    # Two passes over the (small) index: the counts first place the array section.
    head = _parse_index(file, raw, None)
    try:
        n_seqs, n_tokens = int(head["sequences"]), int(head["tokens"])
        if n_seqs < 0 or n_tokens < 0 or 4 * (n_seqs + n_tokens) > payload_n:
            raise ValueError(f"{n_seqs} sequences and {n_tokens} tokens do not fit the "
                             f"{payload_n}-byte payload")
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"{file}: malformed index: {e!s}") from None
    blob_base, blob_n = start + 4 * (n_seqs + n_tokens), payload_n - 4 * (n_seqs + n_tokens)

    def array_hook(obj: dict) -> Any:
        if _ARRAY not in obj:
            return obj
        dtype = _meta_dtype(obj)
        off, nbytes = (int(x) for x in obj[_ARRAY])
        shape = [int(n) for n in obj["shape"]]
        if off < 0 or nbytes < 0 or off + nbytes > blob_n or nbytes != int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"meta array [{off}, {nbytes}] of shape {shape} outside the payload's "
                             f"{blob_n}-byte array section")
        return np.frombuffer(buf, dtype, nbytes // dtype.itemsize, blob_base + off).reshape(shape).copy()

    index = _parse_index(file, raw, array_hook)
    lens = np.frombuffer(buf, dtype=_INT32, count=n_seqs, offset=start)
    tokens = np.frombuffer(buf, dtype=_INT32, count=n_tokens, offset=start + 4 * n_seqs)
    if n_seqs and (int(lens.min()) < 0 or int(lens.sum(dtype=np.int64)) != n_tokens):
        raise SnapshotError(f"{file}: malformed index: sequence lengths do not add up to {n_tokens} tokens")
    history: History = {}
    ends = np.cumsum(lens, dtype=np.int64).tolist()
    k = 0
    try:
        for problem_id, step_rows in index["problems"]:
            steps = history.setdefault(str(problem_id), {})
            for step, n in step_rows:
                if not 0 <= int(n) <= n_seqs - k:
                    raise ValueError(f"{problem_id!r} step {step}: {n} sequences past the {n_seqs} stored")
                seqs = steps.setdefault(int(step), [])
                a = ends[k - 1] if k else 0
                for z in ends[k : k + int(n)]:
                    seqs.append(tokens[a:z])
                    a = z
                k += int(n)
    except (TypeError, ValueError) as e:
        raise SnapshotError(f"{file}: malformed index: {e}") from None
    if k != n_seqs:
        raise SnapshotError(f"{file}: index lists {k} sequences but the payload holds {n_seqs}")
    return history, index["meta"]


def _numeric(dtype: np.dtype) -> np.dtype:
    """Meta's arrays are numeric (bool, int, float): ValueError naming any other dtype."""
    if dtype.kind not in "biuf":
        raise ValueError(f"array of dtype {dtype} in meta")
    return dtype


def _meta_dtype(obj: dict) -> np.dtype:
    """The dtype of a meta array entry read back (numeric only)."""
    return _numeric(np.dtype(obj["dtype"]))


def _ndarray_hook(obj: dict) -> Any:
    """Format 1: a meta array as base64 in the JSON index."""
    if _NDARRAY not in obj:
        return obj
    dtype = _meta_dtype(obj)
    a = np.frombuffer(base64.b64decode(obj[_NDARRAY], validate=True), dtype=dtype)
    return a.reshape([int(n) for n in obj["shape"]])


def _parse_index(file: Path, raw: bytes, hook) -> dict[str, Any]:
    try:
        index = json.loads(raw, object_hook=hook)
        if not isinstance(index, dict) or not isinstance(index["problems"], list):
            raise TypeError("index is not an object with a 'problems' list")
        return index
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        # The checksum passed, so this is a writer bug, not disk corruption; still say where.
        raise SnapshotError(f"{file}: malformed index: {e}") from None


def _split(file: Path, problems: list[Any], tokens: np.ndarray) -> History:
    """Format 1: the index lists every sequence's length."""
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
    keep_aside: bool = False,
) -> tuple[History, dict[str, Any]]:
    """Start-up loading: a missing snapshot is a fresh start; a bad one is logged and
    ignored (empty history) so the engine still starts, unless ``strict``.

    ``keep_aside`` (a caller that will write snapshots here): an unusable snapshot is
    renamed to ``history.dassnap.unusable-<UTC time>-<pid>`` before anything overwrites
    it, and the warning names that file -- nothing is lost. A snapshot of a newer format
    (a downgrade, or an engine of another version sharing the directory) is then still
    there for the build that reads it. Callers that only read (tensor-parallel ranks
    other than 0) leave the file where it is."""
    warn = log or _log.warning
    try:
        return load_history(path)
    except FileNotFoundError:
        return {}, {}
    except (SnapshotError, OSError) as e:
        if strict:
            raise
        msg = f"ignoring unusable DAS history snapshot, starting with empty history: {e}"
        if keep_aside and isinstance(e, SnapshotError):
            moved = _move_aside(snapshot_file(path))
            msg += (f" (kept as {moved}; the next save writes a new snapshot)" if moved is not None
                    else " (could not be renamed aside: the next save replaces it)")
        warn(msg)
        return {}, {}


def _move_aside(file: Path) -> Path | None:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = file.with_name(f"{file.name}.unusable-{stamp}-{os.getpid()}")
    try:
        os.rename(file, target)
    except OSError:
        return None
    return target


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

    def note_finished(self, count: int = 1, hold: bool = False) -> bool:
        """Count finished requests; returns True when this call saved a snapshot."""
        self._since_save += count
        if self.every_n and self._since_save >= self.every_n:
            self.save(hold)
            return True
        return False

    def save(self, hold: bool = False) -> Path:
        """Save now (the view is taken now, on this thread). ``hold`` (background only):
        the writer starts on it at the next :meth:`release` (or ``wait`` / ``close``), not
        at once: its encoding is Python that holds the GIL for a few ms at RL scale, so the
        caller starts it where its own thread waits without the GIL (the SGLang worker: the
        verify forward), not beside the next plan's Python."""
        meta = self.get_meta() if self.get_meta else None
        self._since_save = 0
        if self._writer is not None:
            self._writer.request(self.get_history(), meta, hold)
            return snapshot_file(self.path)
        return save_history(self.path, self.get_history(), meta)

    def release(self) -> None:
        """Let the writer start on a held save (no-op otherwise)."""
        if self._writer is not None:
            self._writer.release()

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
        self._held = False  # the pending view waits for release()
        self._busy = False
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="das-snapshot-writer", daemon=True)
        self._thread.start()

    def request(self, history, meta, hold: bool = False) -> None:
        with self._cv:
            self._raise()
            self._pending = (history, meta)
            self._held = hold
            self._cv.notify_all()

    def release(self) -> None:
        with self._cv:
            if self._held:
                self._held = False
                self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while (self._pending is None or self._held) and not self._closed:
                    self._cv.wait()
                if self._pending is None:
                    return
                job, self._pending = self._pending, None
                self._busy = True
            try:
                _save(self.path, *job, gil_pause)
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
            self._held = False  # (a held save is written now)
            self._cv.notify_all()
            while self._pending is not None or self._busy:
                self._cv.wait()
            self._raise()

    def close(self) -> None:
        self.wait()
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=60)
