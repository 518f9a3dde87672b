"""Per-problem history shards in a shared directory: history that survives moving.

Many SGLang engines behind a router act as one drafter when every problem's requests
reach the engine that holds its history (the router's routing key = the problem id).
When the engine set changes (an engine restarts, one is added, the router remaps keys),
a problem lands on an engine that does not hold it. That engine then loads the
problem's history lazily from the shared directory, so the problem does not start cold.

Layout under ``root`` (any path every engine mounts: a local disk, NFS, an object-store
mount)::

    <root>/<problem key>/<engine id>/history.dassnap   one shard per (problem, engine)
    <root>/_engines/<engine id>.json                   that engine's DAS stats
    <root>/_engines/<engine id>.lock                   held (flock) while the engine runs

A shard holds only the rollouts that engine generated itself (``core/snapshot.py``'s
format: versioned, sha256-checked, written atomically by rename). Each shard file has
exactly one writer, its engine, and the engine lock refuses a second live engine with
the same id, so two engines never write the same file: a reader merges the shards of
all engines of a problem, and the union is what one engine serving the problem alone
would hold, without duplicates.

When an engine loads a problem (:meth:`ShardSync.on_start`):

- first sight of the problem (fresh engine, or one that restarted): every shard of the
  problem, steps inside the window. The engine's own shard (written by its previous
  life) is adopted, so its next write keeps those rollouts;
- a problem it held but did not see for one or more steps (served elsewhere meanwhile):
  the other engines' rollouts of the steps it missed.

Writes happen off the scheduler thread (one background writer, coalesced per problem):
a problem's shard is rewritten when its last live request on the engine finishes, and
pending writes are drained at :meth:`ShardSync.close`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from das_sglang.core.atomic import atomic_file
from das_sglang.core.snapshot import SnapshotError, load_history, save_history, snapshot_file

ENGINES_DIR = "_engines"
STATS_SUFFIX = ".json"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_log = logging.getLogger(__name__)

Steps = dict[int, list[np.ndarray]]


class Drafter(Protocol):
    """The part of ``SuffixDrafter`` the shards feed."""

    @property
    def step(self) -> int: ...

    def add_history(self, problem_id: str, step: int, tokens: np.ndarray) -> bool: ...


def problem_key(problem_id: str) -> str:
    """Directory name of a problem: a readable prefix + a hash of the exact id (ids may
    hold any characters; the hash keeps distinct ids apart)."""
    digest = hashlib.blake2b(problem_id.encode(), digest_size=8).hexdigest()
    prefix = _SAFE.sub("_", problem_id)[:40].strip("._") or "p"
    return f"{prefix}-{digest}"


def check_engine_id(engine_id: str) -> str:
    if not isinstance(engine_id, str) or not engine_id or _SAFE.search(engine_id) or engine_id[0] == ".":
        raise ValueError(
            f"invalid engine_id={engine_id!r}: must be a non-empty name of letters, digits, '.', '_', '-' "
            "(not starting with '.')"
        )
    return engine_id


def default_engine_id(port: int, dp_rank: int | None = None) -> str:
    """``<host>-<port>[-dp<rank>]``: stable across restarts of the same engine slot."""
    name = _SAFE.sub("_", socket.gethostname()) or "host"
    return f"{name}-{port}" + (f"-dp{dp_rank}" if dp_rank is not None else "")


# ---------------------------------------------------------------- the store (files only)


class ShardStore:
    """Reads and writes one engine's view of the shard directory."""

    def __init__(self, root: str | os.PathLike[str], engine_id: str) -> None:
        self.root = Path(root)
        self.engine_id = check_engine_id(engine_id)
        self._lock_fd: int | None = None

    # ------------------------------------------------------------ engine lock
    def acquire(self) -> None:
        """Hold ``_engines/<id>.lock`` for the engine's lifetime; a second live engine
        with the same id (two writers of the same shards) is refused."""
        engines = self.root / ENGINES_DIR
        engines.mkdir(parents=True, exist_ok=True)
        fd = os.open(engines / f"{self.engine_id}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(
                f"DAS shard directory {self.root}: engine_id {self.engine_id!r} is held by another live "
                "engine; give every engine its own server.engine_id"
            ) from None
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    # ------------------------------------------------------------ shards
    def problem_dir(self, problem_id: str) -> Path:
        return self.root / problem_key(problem_id)

    def write(self, problem_id: str, steps: Mapping[int, list[np.ndarray]]) -> Path:
        """Atomically replace this engine's shard of ``problem_id``."""
        directory = self.problem_dir(problem_id) / self.engine_id
        return save_history(directory, {problem_id: dict(steps)},
                            meta={"problem_id": problem_id, "engine": self.engine_id})

    def read(self, problem_id: str) -> dict[str, Steps]:
        """Every engine's shard of ``problem_id``: ``{engine_id: {step: [tokens]}}``.

        A shard that cannot be used (corrupt, other format, another problem's) is logged
        and skipped: losing history costs speed, never correctness."""
        out: dict[str, Steps] = {}
        directory = self.problem_dir(problem_id)
        try:
            engines = sorted(p.name for p in directory.iterdir() if p.is_dir())
        except FileNotFoundError:
            return out
        except OSError as e:  # not a directory, unmounted, no permission: serve cold
            _log.warning("DAS: cannot list shards of problem %r: %s", problem_id, e)
            return out
        for engine in engines:
            try:
                history, meta = load_history(directory / engine)
            except FileNotFoundError:
                continue  # a writer's first save has not landed yet
            except (SnapshotError, OSError) as e:
                _log.warning("DAS: skipping unusable shard: %s", e)
                continue
            if meta.get("problem_id") != problem_id or set(history) - {problem_id}:
                _log.warning("DAS: skipping shard %s: it holds problem %r, not %r",
                             snapshot_file(directory / engine), meta.get("problem_id"), problem_id)
                continue
            out[engine] = {int(s): list(seqs) for s, seqs in history.get(problem_id, {}).items()}
        return out

    # ------------------------------------------------------------ stats
    def stats_file(self, engine_id: str | None = None) -> Path:
        return self.root / ENGINES_DIR / f"{engine_id or self.engine_id}{STATS_SUFFIX}"

    def write_stats(self, stats: Mapping[str, Any]) -> None:
        target = self.stats_file()
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(target, binary=False, tmp_prefix=f".{self.engine_id}-stats-") as f:
            json.dump(dict(stats), f, sort_keys=True)


def read_engine_stats(root: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The stats every engine of a shard directory published: ``{engine_id: stats}``."""
    directory = Path(root) / ENGINES_DIR
    out: dict[str, dict[str, Any]] = {}
    for file in sorted(directory.glob(f"*{STATS_SUFFIX}")):
        try:
            out[file.name[: -len(STATS_SUFFIX)]] = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            _log.warning("DAS: unreadable engine stats %s: %s", file, e)
    return out


# ---------------------------------------------------------------- stats


@dataclass
class ShardStats:
    """What one engine reports (``_engines/<id>.json`` and its /metrics).

    verify_steps      TARGET_VERIFY forwards (one per decode batch, all its requests)
    draft_tokens_proposed / _accepted   draft tokens over all requests (bonus tokens
                      not counted): acceptance_rate = accepted / proposed
    lazy_loads        problems looked up in the shards (first sight or after a gap)
    lazy_load_hits    of those, lookups that found rollouts to load
    lazy_load_sequences / lazy_load_tokens   rollouts / tokens loaded
    """

    engine_id: str
    started_at: float = field(default_factory=time.time)
    step: int = 0
    problems_held: int = 0
    history_tokens: int = 0
    requests_finished: int = 0
    verify_steps: int = 0
    draft_tokens_proposed: int = 0
    draft_tokens_accepted: int = 0
    lazy_loads: int = 0
    lazy_load_hits: int = 0
    lazy_load_sequences: int = 0
    lazy_load_tokens: int = 0
    lazy_load_ms: float = 0.0
    shard_writes: int = 0
    shard_write_errors: int = 0
    shard_pending: int = 0
    updated_at: float = 0.0

    @property
    def lazy_load_hit_rate(self) -> float:
        return self.lazy_load_hits / self.lazy_loads if self.lazy_loads else 0.0

    @property
    def acceptance_rate(self) -> float:
        p = self.draft_tokens_proposed
        return self.draft_tokens_accepted / p if p else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"lazy_load_hit_rate": self.lazy_load_hit_rate,
                               "acceptance_rate": self.acceptance_rate}


# ---------------------------------------------------------------- background writer


class _Writer:
    """One daemon thread writing queued shards (latest version per problem wins)."""

    def __init__(self, store: ShardStore, stats: ShardStats, on_written: Callable[[dict[str, Any]], None]) -> None:
        self.store = store
        self.stats = stats
        self._on_written = on_written  # gets the stats snapshot it just wrote
        self._pending: dict[str, dict[int, list[np.ndarray]]] = {}
        self._stats_due: dict[str, Any] | None = None
        self._cv = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="das-shard-writer", daemon=True)
        self._thread.start()

    def submit(self, problem_id: str, steps: dict[int, list[np.ndarray]]) -> None:
        with self._cv:
            self._pending[problem_id] = steps
            self.stats.shard_pending = len(self._pending)
            self._cv.notify()

    def submit_stats(self, snapshot: dict[str, Any]) -> None:
        with self._cv:
            self._stats_due = snapshot
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and self._stats_due is None and not self._closed:
                    self._cv.wait()
                if self._closed and not self._pending and self._stats_due is None:
                    return
                batch, self._pending = self._pending, {}
                stats_due, self._stats_due = self._stats_due, None
                self._busy = True
            self._write(batch, stats_due)
            with self._cv:
                self._busy = False
                self.stats.shard_pending = len(self._pending)
                self._cv.notify_all()

    def _write(self, batch: dict[str, dict[int, list[np.ndarray]]], stats_due: dict[str, Any] | None) -> None:
        for problem_id, steps in batch.items():
            try:
                self.store.write(problem_id, steps)
                self.stats.shard_writes += 1
            except (OSError, ValueError) as e:  # a full or unmounted disk must not stop serving
                self.stats.shard_write_errors += 1
                _log.warning("DAS: shard write of problem %r failed: %s", problem_id, e)
        if stats_due is not None or batch:
            snapshot = dict(stats_due) if stats_due is not None else self.stats.as_dict()
            snapshot.update(shard_writes=self.stats.shard_writes,
                            shard_write_errors=self.stats.shard_write_errors,
                            shard_pending=len(self._pending), updated_at=time.time())
            try:
                self.store.write_stats(snapshot)
            except OSError as e:
                _log.warning("DAS: writing engine stats failed: %s", e)
            self._on_written(snapshot)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is written."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._pending or self._stats_due is not None or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()


# ---------------------------------------------------------------- the session hook


class ShardSync:
    """Keeps one engine's drafter and the shard directory in step.

    The SGLang session calls :meth:`on_start` when a request of a problem arrives (after
    the drafter has moved to the request's step), :meth:`on_finished` / :meth:`on_drop`
    when it leaves, :meth:`advance_step` at a new training step and :meth:`close` at exit.
    """

    def __init__(self, root: str | os.PathLike[str], engine_id: str, drafter: Drafter,
                 window_steps: int, *, publish_every_s: float = 2.0,
                 extra_stats: Callable[[ShardStats], None] | None = None) -> None:
        self.store = ShardStore(root, engine_id)
        self.store.acquire()
        self.drafter = drafter
        self.window_steps = window_steps
        self.stats = ShardStats(engine_id)
        self._own: dict[str, dict[int, list[np.ndarray]]] = {}  # rollouts this engine made
        self._seen: dict[str, int] = {}  # problem -> last step this engine served it
        self._live: dict[str, int] = {}  # problem -> live requests here
        self._dirty: set[str] = set()
        self._publish_every_s = publish_every_s
        self._last_publish = 0.0
        self._extra_stats = extra_stats
        self._metrics = _PromMetrics.create(engine_id)
        self._writer = _Writer(self.store, self.stats, self._metrics.update)
        self.publish(force=True)

    # ------------------------------------------------------------ requests
    def on_start(self, problem_id: str, step: int) -> None:
        self._live[problem_id] = self._live.get(problem_id, 0) + 1
        seen = self._seen.get(problem_id)
        if seen is None or seen < step - 1:
            self._lazy_load(problem_id, seen, step)
        if seen is None or step > seen:
            self._seen[problem_id] = step

    def _lazy_load(self, problem_id: str, seen: int | None, step: int) -> None:
        t0 = time.perf_counter()
        current = self.drafter.step
        oldest = current - self.window_steps
        shards = self.store.read(problem_id)
        loaded = tokens = 0
        for engine, steps in shards.items():
            own = engine == self.store.engine_id and seen is None
            for s in sorted(steps):
                if s > current or s < oldest or (seen is not None and s <= seen):
                    continue  # outside the window, or what this engine already holds
                if own:  # our previous life's rollouts: keep them in our next write
                    self._own.setdefault(problem_id, {}).setdefault(s, []).extend(steps[s])
                for seq in steps[s]:
                    if self.drafter.add_history(problem_id, s, seq):
                        loaded += 1
                        tokens += len(seq)
        st = self.stats
        st.lazy_loads += 1
        st.lazy_load_hits += loaded > 0
        st.lazy_load_sequences += loaded
        st.lazy_load_tokens += tokens
        st.lazy_load_ms += 1e3 * (time.perf_counter() - t0)

    def on_finished(self, problem_id: str, step: int, tokens: np.ndarray) -> None:
        self._own.setdefault(problem_id, {}).setdefault(step, []).append(np.asarray(tokens, dtype=np.int32))
        self._dirty.add(problem_id)
        self.stats.requests_finished += 1
        self._left(problem_id)

    def on_drop(self, problem_id: str) -> None:
        self._left(problem_id)

    def _left(self, problem_id: str) -> None:
        n = self._live.get(problem_id, 0) - 1
        if n > 0:
            self._live[problem_id] = n
            return
        self._live.pop(problem_id, None)
        if problem_id in self._dirty:  # the problem's group is done here: persist it
            self._dirty.discard(problem_id)
            self._submit(problem_id)
        self.publish(force=not self._live)  # an idle engine reports its final numbers

    def _submit(self, problem_id: str) -> None:
        steps = self._own.get(problem_id, {})
        # Copies of the lists: the writer thread must not see later appends.
        self._writer.submit(problem_id, {s: list(seqs) for s, seqs in steps.items()})

    def advance_step(self, step: int) -> None:
        # A step boundary is a checkpoint too: persist problems whose group is still
        # open here (e.g. a request SGLang never reported finished).
        for problem_id in list(self._dirty):
            self._dirty.discard(problem_id)
            self._submit(problem_id)
        oldest = step - self.window_steps
        for problem_id in list(self._own):
            by_step = self._own[problem_id]
            for s in [s for s in by_step if s < oldest]:
                del by_step[s]
            if not by_step:
                del self._own[problem_id]
        self.stats.step = step
        self.publish(force=True)

    # ------------------------------------------------------------ stats
    def publish(self, force: bool = False) -> None:
        """Refresh the stats (rate-limited) and hand them to the writer and /metrics."""
        now = time.monotonic()
        if not force and now - self._last_publish < self._publish_every_s:
            return
        self._last_publish = now
        if self._extra_stats is not None:
            self._extra_stats(self.stats)
        self.stats.updated_at = time.time()
        self._writer.submit_stats(self.stats.as_dict())  # the writer also updates /metrics

    def flush(self, timeout: float | None = None) -> bool:
        """Write every dirty problem and the stats now; wait for the writer."""
        for problem_id in list(self._dirty):
            self._dirty.discard(problem_id)
            self._submit(problem_id)
        self.publish(force=True)
        return self._writer.drain(timeout)

    def close(self) -> None:
        self.flush()
        self._writer.close()
        self.store.release()


# ---------------------------------------------------------------- Prometheus (SGLang's /metrics)


class _PromMetrics:
    """DAS stats as Prometheus series on SGLang's own ``/metrics`` route.

    SGLang (``--enable-metrics``) serves /metrics from prometheus_client's multiprocess
    collector over ``PROMETHEUS_MULTIPROC_DIR``, which it sets before spawning the
    scheduler; series this worker process creates land in that directory and appear
    there, labelled by engine. Without the variable (offline engines, no metrics) this
    does nothing.
    """

    GAUGES = ("step", "problems_held", "history_tokens", "shard_pending", "lazy_load_hit_rate",
              "acceptance_rate")
    COUNTERS = ("requests_finished", "verify_steps", "draft_tokens_proposed", "draft_tokens_accepted",
                "lazy_loads", "lazy_load_hits", "lazy_load_sequences", "shard_writes", "shard_write_errors")

    def __init__(self, engine_id: str, gauges: dict, counters: dict) -> None:
        self.engine_id = engine_id
        self._gauges = gauges
        self._counters = counters
        self._last: dict[str, float] = {}

    _series: tuple[dict, dict] | None = None  # one registration per process

    @classmethod
    def create(cls, engine_id: str) -> _PromMetrics:
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return cls(engine_id, {}, {})
        if _PromMetrics._series is None:
            try:
                from prometheus_client import Counter, Gauge
            except ImportError:
                return cls(engine_id, {}, {})
            gauges = {n: Gauge(f"das_{n}", f"DAS {n.replace('_', ' ')}", ["engine"],
                               multiprocess_mode="mostrecent") for n in cls.GAUGES}
            counters = {n: Counter(f"das_{n}", f"DAS {n.replace('_', ' ')}", ["engine"]) for n in cls.COUNTERS}
            _PromMetrics._series = (gauges, counters)
        return cls(engine_id, *_PromMetrics._series)

    def update(self, snapshot: Mapping[str, Any]) -> None:
        """Called by the writer thread only (counter deltas need one caller)."""
        for name, gauge in self._gauges.items():
            gauge.labels(self.engine_id).set(float(snapshot[name]))
        for name, counter in self._counters.items():
            value = float(snapshot[name])
            delta = value - self._last.get(name, 0.0)
            child = counter.labels(self.engine_id)  # the series exists from the start, at 0
            if delta > 0:
                child.inc(delta)
            self._last[name] = value


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    """``das_*`` series of a /metrics page -> ``{engine: {name: value}}`` (``_total``
    suffixes dropped)."""
    out: dict[str, dict[str, float]] = {}
    pattern = re.compile(r'^das_([a-z_]+?)(?:_total)?\{engine="([^"]*)"\}\s+(\S+)$')
    for line in text.splitlines():
        m = pattern.match(line.strip())
        if m:
            out.setdefault(m.group(2), {})[m.group(1)] = float(m.group(3))
    return out
