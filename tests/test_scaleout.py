"""Scale-out plumbing without SGLang: the real SMG router's problem affinity in front of
two stand-in HTTP workers, the router client's routing header, `das rollout` flags."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from das_sglang import api, cluster
from das_sglang.router_client import RouterEngine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Worker:
    """A stand-in HTTP worker: answers SGLang's routes, records what it was sent."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[tuple[str | None, dict]] = []
        worker = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, obj):
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.startswith("/v1/models"):
                    return self._send({"object": "list", "data": [{"id": "tiny", "object": "model"}]})
                return self._send({"model_path": "tiny", "is_generation": True})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                worker.seen.append((self.headers.get(api.ROUTING_KEY_HEADER), body))
                return self._send({"text": worker.name, "meta_info": {"completion_tokens": 1}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def workers():
    ws = [_Worker("w0"), _Worker("w1")]
    yield ws
    for w in ws:
        w.close()


def _generate_all(engine: RouterEngine, problems: list[str], rounds: int) -> list[tuple[str, str]]:
    async def one(pid: str, r: int):
        out = await engine.async_generate(prompt=f"q {pid}", rid=f"{pid}/{r}",
                                          sampling_params=api.tagged({"max_new_tokens": 1}, pid, r))
        return pid, out["text"]

    async def all_():
        return await asyncio.gather(*(one(p, r) for r in range(rounds) for p in problems))

    return engine.loop.run_until_complete(all_())


def test_real_router_keeps_every_problem_on_one_engine(workers, tmp_path):
    router = cluster.start_router([w.url for w in workers], _free_port(), log=tmp_path / "router.log",
                                  timeout_s=60)
    engine = RouterEngine(router.url)
    try:
        problems = [f"gsm8k-{i}" for i in range(16)]
        served = _generate_all(engine, problems, rounds=3)
    finally:
        engine.shutdown()
        router.stop()
    where: dict[str, set[str]] = {}
    for pid, name in served:
        where.setdefault(pid, set()).add(name)
    assert all(len(names) == 1 for names in where.values()), where  # affinity, across "steps"
    assert {n for names in where.values() for n in names} == {"w0", "w1"}  # both engines used
    for w in workers:  # the header is the problem id; SGLang's rid and custom_params pass through
        for key, body in w.seen:
            assert key == body["sampling_params"]["custom_params"]["das_problem_id"]
            assert body["rid"].startswith(key + "/")


def test_round_robin_router_spreads_a_problem(workers, tmp_path):
    router = cluster.start_router([w.url for w in workers], _free_port(), policy="round_robin",
                                  log=tmp_path / "router.log", timeout_s=60)
    engine = RouterEngine(router.url)
    try:
        served = _generate_all(engine, ["only"], rounds=1) + _generate_all(engine, ["only"], rounds=1)
    finally:
        engine.shutdown()
        router.stop()
    assert {name for _, name in served} == {"w0", "w1"}


def test_routing_headers():
    assert api.routing_headers("gsm8k/17") == {"x-smg-routing-key": "gsm8k/17"}
    assert api.routing_headers(7) == {"x-smg-routing-key": "7"}
    odd = api.routing_headers("prob\nlème")[api.ROUTING_KEY_HEADER]
    assert odd.startswith("h-") and odd == api.routing_headers("prob\nlème")[api.ROUTING_KEY_HEADER]
    with pytest.raises(ValueError, match="problem_id"):
        api.routing_headers("")


def test_commands_bind_loopback_and_name_das():
    cmd = cluster.engine_command("py", "/m", "127.0.0.1", 31001, 8, {"device": "cpu", "disable_cuda_graph": True}, [])
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and "--enable-metrics" in cmd
    assert cmd[cmd.index("--speculative-algorithm") + 1] == "DAS" and "--disable-cuda-graph" in cmd
    r = cluster.router_command("py", "127.0.0.1", 31000, ["http://127.0.0.1:31001"], "consistent_hashing")
    assert r[r.index("--prometheus-host") + 1] == "127.0.0.1"
    with pytest.raises(ValueError, match="router policy"):
        cluster.router_command("py", "127.0.0.1", 31000, [], "sticky")
    cfg = cluster.das_config_for("engine1", Path("/s"), {"server": {"policy": "fixed"}})
    assert cfg == {"server": {"policy": "fixed", "shard_path": "/s", "engine_id": "engine1"}}
    api.das_env(cfg)  # a valid DAS_CONFIG


# ---------------------------------------------------------------- das rollout flags


def _rollout(*args: str):
    import typer

    from das_sglang.cli import rollout as cli_rollout

    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("rollout")(cli_rollout.rollout)
    return CliRunner().invoke(app, ["rollout", *args], env={"COLUMNS": "200"})


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.jsonl"
    p.write_text(json.dumps({"problem_id": "a", "prompt": "1+1?"}) + "\n")
    return p


@pytest.mark.parametrize("extra, message", [
    (["--engines", "0"], "invalid --engines 0"),
    (["--engines", "2", "--router", "http://127.0.0.1:1"], "--router and --engines > 1"),
    (["--engines", "2", "--history", "H"], "--history is per engine"),
])
def test_rollout_scaleout_flags_are_checked(prompts, tmp_path, extra, message):
    res = _rollout("--model", "tiny", "--prompts", str(prompts), "--out", str(tmp_path / "o"), *extra)
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output


def test_rollout_through_router_prints_per_engine_stats(prompts, tmp_path, monkeypatch, workers):
    from das_sglang.cli import rollout as cli_rollout

    router = cluster.start_router([w.url for w in workers], _free_port(), log=tmp_path / "router.log",
                                  timeout_s=60)
    specs = []

    def make(spec, speculative):
        specs.append(spec)
        engine = RouterEngine(spec.router)
        engine.engine_stats = lambda: {"engine0": {"problems_held": 3, "requests_finished": 2,
                                                   "draft_tokens_proposed": 8, "draft_tokens_accepted": 6,
                                                   "lazy_loads": 2, "lazy_load_hits": 1}}
        return engine

    monkeypatch.setattr(cli_rollout, "make_engine", make)
    try:
        res = _rollout("--model", "tiny", "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                       "--router", router.url, "--n", "2", "--steps", "1")
    finally:
        router.stop()
    assert res.exit_code == 0, res.output
    assert specs[0].router == router.url
    assert "DAS per engine" in res.output and "1/2" in res.output and "0.75" in res.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["engines"]["engine0"]["lazy_load_hits"] == 1
    assert sum(len(w.seen) for w in workers) == 2
