"""N SGLang engines with DAS behind one SMG router, as one command.

    python -m das_sglang.cluster --model tiny --engines 2 --port 30000 --shard-dir /tmp/das-shards

starts engines on ``port+1 .. port+N`` (``sglang.launch_server`` with DAS, metrics on),
each named ``engine<i>`` in the shared shard directory, then the SMG router (`smg`, the
Rust router of the SGLang project, pip ``smg``) on ``port`` with consistent hashing on
the ``x-smg-routing-key`` header. Clients send every request of a problem with that
header set to the problem id (``das_sglang.api.routing_headers``), so all samples of a
problem, across steps, reach the engine holding its history; when the engine set
changes, the engine that newly gets a problem loads its history from the shards.

Everything binds 127.0.0.1 unless ``--host`` says otherwise. Ctrl-C / SIGTERM stops
the router and the engines. The library side (:func:`start_cluster`) is what
``benchmarks/bench_scaleout.py`` and ``das rollout --engines N`` use.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

ROUTER_POLICIES = ("consistent_hashing", "round_robin", "manual", "cache_aware", "random")
DEFAULT_POLICY = "consistent_hashing"


class ClusterError(RuntimeError):
    """An engine or the router did not come up (the message names its log file)."""


def http_json(url: str, body: Mapping[str, Any] | None = None, timeout: float = 10.0,
              headers: Mapping[str, str] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw.strip() else None


def http_text(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


@dataclass
class _Proc:
    name: str
    cmd: list[str]
    env: dict[str, str]
    log: Path
    url: str
    popen: subprocess.Popen | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")
        # Own session: stopping it takes its child processes (SGLang's scheduler and
        # detokenizer) along, and nothing else.
        self.popen = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace_s: float = 20.0) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        self.signal(signal.SIGKILL)  # what is left of the group (children included)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.popen = None

    def kill(self) -> None:
        """Crash it: SIGKILL the whole process group, no exit handlers."""
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(30)
        self.popen = None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class Cluster:
    """Handles of a running cluster: engines ``engine0..`` and the router."""

    engines: list[_Proc]
    router: _Proc | None
    shard_dir: Path | None
    startup_timeout_s: float = 600.0
    _extra: list[_Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        if self.router is None:
            raise ClusterError("this cluster has no router")
        return self.router.url

    @property
    def engine_urls(self) -> list[str]:
        return [e.url for e in self.engines]

    def wait_ready(self, procs: Sequence[_Proc] | None = None) -> None:
        procs = list(procs if procs is not None else self.engines)
        deadline = time.monotonic() + self.startup_timeout_s
        pending = list(procs)
        while pending:
            for p in list(pending):
                if not p.alive():
                    raise ClusterError(f"{p.name} exited during start-up; its log {p.log}:\n{p.tail()}")
                if _ready(p):
                    pending.remove(p)
            if pending and time.monotonic() > deadline:
                raise ClusterError(f"{pending[0].name} not ready after {self.startup_timeout_s:.0f} s; log {pending[0].log}")
            if pending:
                time.sleep(1.0)

    def restart_engine(self, i: int, crash: bool = True) -> None:
        """Stop engine ``i`` (SIGKILL when ``crash``, else SIGTERM) and start it again on
        the same port with the same engine id; returns once it serves."""
        e = self.engines[i]
        e.kill() if crash else e.stop()
        e.start()
        self.wait_ready([e])

    def engine_stats(self) -> dict[str, dict[str, Any]]:
        """Per engine, the DAS stats it published in the shard directory."""
        if self.shard_dir is None:
            return {}
        from das_sglang.core.shards import read_engine_stats

        return read_engine_stats(self.shard_dir)

    def stop(self) -> None:
        for p in ([self.router] if self.router else []) + self.engines + self._extra:
            p.stop()


def _ready(p: _Proc) -> bool:
    path = "/workers" if p.name == "router" else "/health"
    try:
        with urllib.request.urlopen(p.url + path, timeout=5) as resp:
            if resp.status != 200:
                return False
            if p.name != "router":
                return True
            workers = json.loads(resp.read()).get("workers", [])
            return bool(workers) and all(w.get("is_healthy") for w in workers)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def engine_command(python: str, model_path: str, host: str, port: int, width: int,
                   cpu_kwargs: Mapping[str, Any], extra_args: Sequence[str], speculative: bool = True) -> list[str]:
    module = "das_sglang.sglang.cpu.launch_server" if cpu_kwargs else "sglang.launch_server"
    cmd = [python, "-m", module, "--model-path", model_path, "--host", host, "--port", str(port),
           "--enable-metrics", "--log-level", "warning"]
    if speculative:
        cmd += ["--speculative-algorithm", "DAS", "--speculative-num-draft-tokens", str(width),
                "--disable-overlap-schedule"]
    for k, v in cpu_kwargs.items():
        flag = "--" + k.replace("_", "-")
        cmd += [flag] if v is True else [flag, str(v)]
    return cmd + list(extra_args)


def router_command(python: str, host: str, port: int, worker_urls: Sequence[str], policy: str,
                   metrics_port: int | None = None) -> list[str]:
    if policy not in ROUTER_POLICIES:
        raise ValueError(f"invalid router policy {policy!r}: must be one of {list(ROUTER_POLICIES)}")
    return [python, "-m", "smg.launch_router", "--worker-urls", *worker_urls, "--policy", policy,
            "--host", host, "--port", str(port), "--prometheus-host", host,
            "--prometheus-port", str(metrics_port or free_port(host)), "--log-level", "warn",
            "--worker-startup-check-interval", "1"]


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def das_config_for(engine_id: str, shard_dir: Path | None, das_config: Mapping[str, Any] | None) -> dict[str, Any]:
    config = {k: dict(v) for k, v in (das_config or {}).items()}
    if shard_dir is not None:
        config["server"] = {**config.get("server", {}), "shard_path": str(shard_dir), "engine_id": engine_id}
    return config


def start_cluster(model: str, engines: int, *, port: int = 30000, host: str = "127.0.0.1",
                  shard_dir: str | os.PathLike[str] | None = None, policy: str = DEFAULT_POLICY,
                  width: int = 8, das_config: Mapping[str, Any] | None = None,
                  engine_args: Sequence[str] = (), log_dir: str | os.PathLike[str] | None = None,
                  router: bool = True, startup_timeout_s: float = 600.0,
                  python: str = sys.executable, speculative: bool = True) -> Cluster:
    """Start ``engines`` DAS engines (ports ``port+1..``) and, with ``router``, the SMG
    router on ``port``; returns once all serve. ``model`` ``"tiny"`` = the CPU test model
    in CPU development mode. ``speculative=False`` starts plain SGLang engines (the
    no-speculation reference). On failure, whatever started is stopped again."""
    from das_sglang import api

    if engines < 1:
        raise ValueError(f"invalid engines={engines!r}: must be >= 1")
    model_path, cpu_kwargs = api.resolve_model(model)
    shard = Path(shard_dir).resolve() if shard_dir is not None else None
    if shard is not None:
        shard.mkdir(parents=True, exist_ok=True)
    logs = Path(log_dir) if log_dir is not None else (shard or Path.cwd()) / "logs"
    procs = []
    for i in range(engines):
        engine_id = f"engine{i}"
        env = dict(os.environ)
        if speculative:
            env.update(api.das_env(das_config_for(engine_id, shard, das_config)))
        env.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
        p = port + 1 + i
        procs.append(_Proc(engine_id, engine_command(python, model_path, host, p, width, cpu_kwargs, engine_args,
                                                         speculative),
                           env, logs / f"{engine_id}.log", f"http://{host}:{p}"))
    cluster = Cluster(procs, None, shard, startup_timeout_s)
    try:
        for p in procs:
            p.start()
        cluster.wait_ready()
        if router:
            cluster.router = start_router(cluster.engine_urls, port, host=host, policy=policy,
                                          log=logs / "router.log", python=python)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def start_router(worker_urls: Sequence[str], port: int, *, host: str = "127.0.0.1",
                 policy: str = DEFAULT_POLICY, log: Path, python: str = sys.executable,
                 timeout_s: float = 120.0) -> _Proc:
    proc = _Proc("router", router_command(python, host, port, worker_urls, policy), dict(os.environ), log,
                 f"http://{host}:{port}")
    proc.start()
    c = Cluster([], None, None, timeout_s)
    try:
        c.wait_ready([proc])
    except BaseException:
        proc.stop()
        raise
    return proc


def metrics_by_engine(engine_urls: Sequence[str]) -> dict[str, dict[str, float]]:
    """``das_*`` series of every engine's /metrics page, by engine id."""
    from das_sglang.core.shards import parse_metrics

    out: dict[str, dict[str, float]] = {}
    for url in engine_urls:
        try:
            out.update(parse_metrics(http_text(url + "/metrics")))
        except (urllib.error.URLError, OSError) as e:
            out[url] = {"error": str(e)}  # type: ignore[dict-item]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m das_sglang.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model path / HF id; 'tiny' = CPU test model (CPU dev mode)")
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--port", type=int, default=30000, help="router port; engines use port+1..port+N")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--shard-dir", type=Path, required=True, help="shared history shard directory")
    p.add_argument("--policy", default=DEFAULT_POLICY, choices=ROUTER_POLICIES)
    p.add_argument("--width", type=int, default=8, help="--speculative-num-draft-tokens")
    p.add_argument("--das-config", default=None,
                   help="DAS_CONFIG: JSON object or file (server.shard_path/engine_id are set per engine)")
    args, engine_args = p.parse_known_args(argv)
    try:
        from das_sglang.sglang.options import parse_config

        das_config = parse_config(args.das_config) if args.das_config else None
        cluster = start_cluster(args.model, args.engines, port=args.port, host=args.host,
                                shard_dir=args.shard_dir, policy=args.policy, width=args.width,
                                das_config=das_config, engine_args=engine_args)
    except (ValueError, ClusterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"router {cluster.url} -> " + " ".join(cluster.engine_urls), flush=True)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        while not stop["now"] and all(e.alive() for e in cluster.engines):
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
