#!/usr/bin/env bash
# N SGLang engines with DAS behind one SMG router, in one command (launch/scaleout.md).
#
#   launch/scaleout.sh MODEL [N] [extra sglang.launch_server flags ...]
#
# MODEL: a local checkpoint, a hub id, or "tiny" (CPU test model, CPU development mode).
# Environment (all optional):
#   PORT        router port; engines listen on PORT+1 .. PORT+N          (default 30000)
#   SHARD_DIR   shared per-problem history shard directory               (default ./das-shards)
#   POLICY      router policy: consistent_hashing (problem affinity) | round_robin | ...
#   WIDTH       --speculative-num-draft-tokens                            (default 8)
#   DAS_CONFIG  DAS options (docs/sglang.md); server.shard_path / engine_id are set here
#   PYTHON      interpreter with das-sglang and smg installed             (default python)
# Clients send each request with the header `x-smg-routing-key: <problem id>`.
set -euo pipefail
if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  [[ $# -ge 1 ]] && exit 0 || exit 1
fi
MODEL="$1"; shift
N="${1:-2}"; [[ $# -ge 1 ]] && shift
args=(--model "$MODEL" --engines "$N" --port "${PORT:-30000}" --shard-dir "${SHARD_DIR:-./das-shards}"
      --policy "${POLICY:-consistent_hashing}" --width "${WIDTH:-8}")
[[ -n "${DAS_CONFIG:-}" ]] && args+=(--das-config "$DAS_CONFIG")
exec "${PYTHON:-python}" -m das_sglang.cluster "${args[@]}" "$@"
