"""Scale-out settings of one SGLang engine: its name in the shared shard directory.

Kept apart from the worker so the check is testable without an engine.
"""

from __future__ import annotations

from das_sglang.core.shards import default_engine_id
from das_sglang.sglang.options import DasOptions


def shard_engine_id(server_args, options: DasOptions) -> str | None:
    """The engine id for ``server.shard_path`` (None when shards are off).

    Refuses tensor parallelism: every TP rank runs its own drafter, which must propose
    identical drafts, and a lazy load reads files another engine may be rewriting, so
    two ranks could load different versions. Refused clearly rather than risked; so is
    SGLang's in-server data parallelism (its DP ranks would share one engine id): the
    router is the data-parallel layer here.
    """
    server = options.server
    if server.shard_path is None:
        return None
    for name in ("tp_size", "dp_size"):
        size = getattr(server_args, name, 1) or 1
        if size > 1:
            raise ValueError(
                f"DAS_CONFIG server.shard_path with {name}={size}: history shards support one "
                "rank per engine only; run one engine per replica behind the router instead"
            )
    if server.engine_id:
        return server.engine_id
    return default_engine_id(getattr(server_args, "port", 0))
