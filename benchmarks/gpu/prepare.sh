#!/usr/bin/env bash
# Prepare the GPU kit's carry, here (PyPI is reachable here; the GPU machine has no network).
#
#   bash benchmarks/gpu/prepare.sh            # -> .gpukit/set1/, set2/, ... + manifest.json
#
# 1. downloads exactly the wheels of benchmarks/gpu/wheels.txt for CPython 3.12 manylinux
#    x86_64 (--no-deps: the list is the closure already) into .gpukit/wheels/;
# 2. builds das-sglang itself as a cp312 wheel (native suffix index included) with a
#    Python 3.12 found here (PYTHON312, python3.12, or pyenv's 3.12);
# 3. splits .gpukit/wheels/ into carry sets that each fit one device call together with
#    the working tree (64 MiB per call; benchmarks/gpu/carry.py), and prints the calls.
# .gpukit/ is git-ignored. Re-running re-downloads only what is missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
kit=.gpukit
mkdir -p "$kit/wheels"
PY="${PYTHON:-$root/.venv/bin/python}"
[ -x "$PY" ] || PY=python3

echo "== 1/3 wheels (cp312 manylinux x86_64)"
plat=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
grep -v '^\s*#' benchmarks/gpu/wheels.txt | grep -v '^\s*$' > "$kit/wheels.lock"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none "${plat[@]}" --platform any \
  -d "$kit/wheels" -r "$kit/wheels.lock"
# One version of each: a stale wheel left by an earlier list would stop the install.
"$PY" - "$kit/wheels" "$kit/wheels.lock" <<'PYEOF'
import re, sys
from pathlib import Path
d, lock = Path(sys.argv[1]), Path(sys.argv[2])
norm = lambda n: re.sub(r"[-_.]+", "_", n).lower()
want = {norm(l.split("==")[0]): l.split("==")[1].strip() for l in lock.read_text().split("\n") if l.strip()}
for w in d.glob("*.whl"):
    name, ver = w.name.split("-")[:2]
    if norm(name) == "das_sglang":
        continue
    if want.get(norm(name)) != ver:
        print(f"   removing stale {w.name}")
        w.unlink()
missing = set(want) - {norm(w.name.split("-")[0]) for w in d.glob("*.whl")}
if missing:
    sys.exit(f"error: no wheel for {sorted(missing)}")
PYEOF

echo "== 2/3 das-sglang cp312 wheel"
py312="${PYTHON312:-}"
if [ -z "$py312" ]; then
  if command -v python3.12 >/dev/null 2>&1 && python3.12 -V >/dev/null 2>&1; then py312=python3.12
  elif command -v pyenv >/dev/null 2>&1 && v="$(pyenv versions --bare | grep '^3\.12' | tail -1)" && [ -n "$v" ]; then
    py312="$(pyenv root)/versions/$v/bin/python3.12"
  fi
fi
if [ -z "$py312" ]; then
  echo "error: no Python 3.12 here to build the das-sglang cp312 wheel (set PYTHON312=...)" >&2
  exit 1
fi
rm -f "$kit"/wheels/das_sglang-*.whl
"$py312" -m pip wheel -q --no-deps -w "$kit/wheels" "$root"

echo "== 3/3 carry sets"
"$PY" benchmarks/gpu/carry.py split --src "$kit/wheels" --dest "$kit"
n="$(ls -d "$kit"/set* | wc -l)"
echo
echo "Device calls (docs/gpu.md): for each set but the last,"
echo "  run(command='bash benchmarks/gpu/stash.sh .gpukit/setK', carry=['.gpukit/setK'])"
echo "then the last one stashes and runs the kit:"
echo "  run(command='bash benchmarks/gpu/stash.sh .gpukit/set$n && bash benchmarks/gpu/run.sh \$OUT/kit', carry=['.gpukit/set$n'], timeout_s=600)"
