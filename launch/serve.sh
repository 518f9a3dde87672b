#!/usr/bin/env bash
# Launch a stock SGLang 0.5.23 HTTP server that speculates with DAS.
#
#   launch/serve.sh MODEL [extra sglang.launch_server flags ...]
#
# MODEL is a local Hugging Face checkpoint, a hub id, or "tiny" (the random CPU test
# model, CPU development mode: for trying the plumbing on a machine without a GPU).
#
# Environment (all optional):
#   PORT            HTTP port                                      (default 30000)
#   DRAFT_TOKENS    --speculative-num-draft-tokens: verify width,
#                   i.e. 1 + most draft nodes per request per step (default 9)
#   DAS_CONFIG      DAS options: JSON object or path to a JSON file with sections
#                   drafter / policy / server (see docs/sglang.md)
#   DAS_HISTORY     history snapshot directory: loaded at start, saved every
#                   server.snapshot_interval finished requests and when the server
#                   stops on SIGTERM/Ctrl-C (merged into DAS_CONFIG as
#                   server.history_path)
#   PYTHON          interpreter with das-sglang installed             (default python)
#
# Requests name their problem and training step in custom_params:
#   curl -s localhost:30000/generate -H 'content-type: application/json' -d '{
#     "text": "...", "sampling_params": {"max_new_tokens": 512, "temperature": 1.0,
#       "custom_params": {"das_problem_id": "gsm8k-17", "das_step": 3}}}'
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  [[ $# -ge 1 ]] && exit 0 || exit 1
fi
MODEL="$1"; shift
PY="${PYTHON:-python}"
PORT="${PORT:-30000}"
DRAFT_TOKENS="${DRAFT_TOKENS:-9}"

# Resolve the model and the DAS options with the library, so both are validated
# (and errors named) before SGLang starts its processes.
eval "$("$PY" - "$MODEL" <<'PYEOF'
import json, os, shlex, sys
from pathlib import Path
from das_sglang import api
try:
    model = sys.argv[1]
    cpu = model == api.TINY_MODEL
    path, extra = (str(api.tiny_model()), api.cpu_engine_kwargs()) if cpu else api.resolve_model(model)
    history = os.environ.get("DAS_HISTORY")
    cfg = api.rollout_das_config(Path(history) if history else None)
    env = api.das_env(cfg) if cfg else {}
except (ValueError, RuntimeError) as e:
    print(f"echo {shlex.quote('error: ' + str(e))} >&2; exit 1")
    raise SystemExit(0)
flags = []
for k, v in extra.items():  # CPU development mode settings (tiny model only)
    flag = "--" + k.replace("_", "-")
    flags += [flag] if v is True else [flag, str(v)]
print(f"MODEL_PATH={shlex.quote(path)}")
print("CPU_FLAGS=(" + " ".join(map(shlex.quote, flags)) + ")")
for k, v in env.items():
    print(f"export {k}={shlex.quote(v)}")
if cpu:
    for k in ("DAS_SGLANG_CPU", "SGLANG_USE_CPU_ENGINE", "PYTHONPATH"):
        print(f"export {k}={shlex.quote(os.environ[k])}")
PYEOF
)"

exec "$PY" -m sglang.launch_server \
  --model-path "$MODEL_PATH" \
  --port "$PORT" \
  --speculative-algorithm DAS \
  --speculative-num-draft-tokens "$DRAFT_TOKENS" \
  "${CPU_FLAGS[@]}" \
  "$@"
