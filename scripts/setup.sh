#!/usr/bin/env bash
# One-shot, idempotent set-up: creates .venv/ at the repo root with CPU torch, stock
# sglang==0.5.23 (no deps, then its light runtime deps), and das-sglang itself (editable,
# native index built by scikit-build-core). Re-running skips the steps whose inputs did
# not change (a stamp file keyed on this script, pyproject.toml, the requirements and the
# native sources: a changed C++ index is rebuilt).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
venv="$root/.venv"
pip="$venv/bin/python -m pip"
stamp="$venv/.das-setup-stamp"
key="$(cat scripts/setup.sh pyproject.toml CMakeLists.txt requirements/*.txt das_sglang/native/src/* | sha256sum | cut -c1-16)"

if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
$pip install -q --upgrade pip
# CPU torch first: a plain `torch` (or sglang's own pin) pulls a multi-GB CUDA build.
$pip install -q torch==2.13.0
# sglang without its dependency list (which pins CUDA torch and sgl-kernel), then the
# runtime deps it needs for CPU serving.
$pip install -q --no-deps sglang==0.5.23
$pip install -q -r requirements/sglang-runtime.txt
$pip install -q -r requirements/dev.txt
# Build the native suffix index and install das-sglang in editable mode.
$pip install -q --no-build-isolation -e .
echo "$key" > "$stamp"
