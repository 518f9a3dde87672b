"""A rollout engine that is an HTTP endpoint: the SMG router in front of many engines.

Exposes the part of ``sglang.Engine`` that `das_sglang.rollout` drives (``loop``,
``async_generate``, ``get_server_info``, ``shutdown``), sending each request to
``<url>/generate`` with the routing-key header set to the request's problem id
(``custom_params["das_problem_id"]``), so the router keeps a problem on one engine.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from das_sglang.api import PROBLEM_KEY, routing_headers


class RouterEngine:
    def __init__(self, url: str, *, max_concurrency: int = 256, timeout_s: float = 1800.0,
                 on_shutdown: Callable[[], None] | None = None) -> None:
        self.url = url.rstrip("/")
        self.loop = asyncio.new_event_loop()
        self._limit = max_concurrency
        self._timeout_s = timeout_s
        self._session = None
        self._sem: asyncio.Semaphore | None = None
        self._on_shutdown = on_shutdown

    async def _http(self):
        if self._session is None:
            import aiohttp

            self._sem = asyncio.Semaphore(self._limit)
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        return self._session

    async def async_generate(self, *, prompt: str | None = None, sampling_params: dict, rid: str,
                             input_ids: list[int] | None = None) -> dict:
        session = await self._http()
        pid = (sampling_params.get("custom_params") or {}).get(PROBLEM_KEY)
        headers = routing_headers(pid) if pid not in (None, "") else {}
        body: dict[str, Any] = {"sampling_params": sampling_params, "rid": rid}
        if input_ids is not None:
            body["input_ids"] = input_ids
        else:
            body["text"] = prompt
        assert self._sem is not None
        async with self._sem:
            async with session.post(self.url + "/generate", json=body, headers=headers) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:500]
                    raise RuntimeError(f"{self.url}/generate answered {resp.status} for rid {rid!r}: {text}")
                return await resp.json()

    def get_server_info(self) -> dict:
        return {"url": self.url}

    def shutdown(self) -> None:
        if self._session is not None:
            self.loop.run_until_complete(self._session.close())
            self._session = None
        self.loop.close()
        if self._on_shutdown is not None:
            self._on_shutdown()
