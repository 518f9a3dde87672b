#!/usr/bin/env bash
# Before spending device time: the kit's CPU dry run under the GPU image's Python and torch
# (docs/gpu.md "The first GPU run": SGLang's Rust radix-tree core, built for its pinned
# torch 2.14, misread dtypes under the image's 2.11 -- found here, on the CPU).
#
#   bash benchmarks/gpu/prepare.sh && bash benchmarks/gpu/dry_image_torch.sh [OUTDIR]
#
# Needs network (PyPI; the torch wheel is ~530 MB, kept in $GPUKIT_TORCH_CACHE) and a
# Python 3.12 (PYTHON312, python3.12 or pyenv's). Builds a venv in $GPUKIT_IMAGE_VENV
# (default /tmp/gpukit-image-venv) with torch $GPUKIT_IMAGE_TORCH (default 2.11.0, the
# image's), the runtime requirements, and exactly the carried wheels of .gpukit/set*/
# (--no-deps, as run.sh installs them there); then runs run.sh's CPU dry run with it and
# the no-kernel mode's SGLang switches that apply on a CPU. Exit status: run.sh's, and 1
# when any stage failed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
out="${1:-/tmp/gpukit-image-dry}"
venv="${GPUKIT_IMAGE_VENV:-/tmp/gpukit-image-venv}"
torch_version="${GPUKIT_IMAGE_TORCH:-2.11.0}"
cache="${GPUKIT_TORCH_CACHE:-/tmp/gpukit-torch-wheels}"
ls .gpukit/set*/*.whl >/dev/null 2>&1 || { echo "error: no carried wheels: run benchmarks/gpu/prepare.sh first" >&2; exit 1; }
py312="${PYTHON312:-}"
if [ -z "$py312" ]; then
  if command -v python3.12 >/dev/null 2>&1 && python3.12 -V >/dev/null 2>&1; then py312=python3.12
  elif command -v pyenv >/dev/null 2>&1 && v="$(pyenv versions --bare | grep '^3\.12' | tail -1)" && [ -n "$v" ]; then
    py312="$(pyenv root)/versions/$v/bin/python3.12"
  fi
fi
[ -n "$py312" ] || { echo "error: no Python 3.12 here (set PYTHON312=...)" >&2; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
  "$py312" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q)
mkdir -p "$cache"
ls "$cache"/torch-"$torch_version"-*.whl >/dev/null 2>&1 || \
  "$venv/bin/python" -m pip download -q --no-deps -d "$cache" "torch==$torch_version"
"${pip[@]}" --no-deps "$cache"/torch-"$torch_version"-*.whl
"${pip[@]}" sympy networkx filelock jinja2 fsspec typing-extensions setuptools
"${pip[@]}" -r requirements/sglang-runtime.txt
"${pip[@]}" --no-deps --force-reinstall .gpukit/set*/*.whl
"$venv/bin/python" -c "import torch; print('image torch here:', torch.__version__)"
# The no-kernel mode's SGLang switches (das_sglang.sglang.nokernel.ENV) that a CPU run
# honours too; the GPU-only ones (fused-op backend, FlashInfer) do not apply here.
export SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND="$(cd /tmp && "$venv/bin/python" -c \
  'from das_sglang.sglang.nokernel import ENV; print(ENV["SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND"])')"
rm -rf "$out"
rc=0
DAS_SGLANG_CPU=1 PYTHON="$venv/bin/python" bash benchmarks/gpu/run.sh "$out" || rc=$?
"$venv/bin/python" - "$out/summary.json" <<'PYEOF' || rc=1
import json, sys
s = json.load(open(sys.argv[1]))
failed = sorted(k for k, v in s["stages"].items() if not v.get("ok", True))
print("stages failed under the image's torch:", failed or "none")
sys.exit(1 if failed else 0)
PYEOF
exit $rc
