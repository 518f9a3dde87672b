#!/usr/bin/env bash
# The GPU kit in one command (docs/gpu.md): install what was carried, run every stage.
#
#   bash benchmarks/gpu/run.sh OUTDIR
#
# On a CUDA machine: reassembles and checks the wheels stashed in /tmp/gpukit (stash.sh),
# installs them with --no-deps --no-index into /tmp/gpukit-site (PYTHONPATH), then runs
# benchmarks/gpu/gpukit.py (<= 9 minutes in all; each stage time-boxed). On the CPU
# (DAS_SGLANG_CPU=1, the CI dry run) it skips the install and runs the dry plan with the
# repository's .venv. Results: OUTDIR/summary.json, OUTDIR/cost_table.csv,
# OUTDIR/coefficients.json, and OUTDIR/details.tgz (per-engine logs and JSON) -- few
# files, as the device tool returns at most 8.
set -uo pipefail
out="${1:?usage: run.sh OUTDIR}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
start=$(date +%s)
export PYTHONUNBUFFERED=1
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ "${DAS_SGLANG_CPU:-}" = "1" ] && [ -x "$root/.venv/bin/python" ]; then PY="$root/.venv/bin/python"
  else PY=python3; fi
fi

if [ "${DAS_SGLANG_CPU:-}" != "1" ]; then
  stash="${GPUKIT_STASH:-/tmp/gpukit}"
  site="${GPUKIT_SITE:-/tmp/gpukit-site}"
  echo "== install from $stash"
  # reassemble files that were cut into parts (carry.py), then check the manifest
  for first in "$stash"/*.part000; do
    [ -e "$first" ] || continue
    whole="${first%.part000}"
    cat "$whole".part[0-9][0-9][0-9] > "$whole" && rm -f "$whole".part[0-9][0-9][0-9]
  done
  if ! "$PY" benchmarks/gpu/carry.py check --dir "$stash" --manifest "$stash/manifest.json"; then
    echo "{\"error\": \"carried wheels missing or damaged in $stash: stash every set first (docs/gpu.md)\"}" > "$out/summary.json"
    exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$stash"/*.whl || { echo '{"error": "pip install of the carried wheels failed"}' > "$out/summary.json"; exit 1; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  # (from /tmp: the checkout's own das_sglang sources have no cp312 native build)
  if ! (cd /tmp && "$PY" -c "import das_sglang.native" 2>/dev/null); then
    echo "== the carried das-sglang wheel does not load here: building it from source"
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" --upgrade "$root"
  fi
  echo "== installed in $(( $(date +%s) - start )) s"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

left=$(( ${GPUKIT_BUDGET_S:-575} - ($(date +%s) - start) ))
"$PY" benchmarks/gpu/gpukit.py run --out "$out" --budget-s "$left" \
  --model-dir "${GPUKIT_MODEL_DIR:-/tmp/gpukit-model}" ${GPUKIT_ROLES:+--roles "$GPUKIT_ROLES"}
rc=$?
# Few files back: keep summary, table and coefficients; pack the rest.
(cd "$out" && ls | grep -v -e '^summary.json$' -e '^cost_table.csv$' -e '^coefficients.json$' \
   -e '^decode_table.csv$' -e '^score_table.csv$' -e '^details.tgz$' > .pack && [ -s .pack ] && tar czf details.tgz -T .pack && xargs rm -rf < .pack; rm -f .pack)
echo "== kit done in $(( $(date +%s) - start )) s (rc $rc); results in $out"
exit $rc
