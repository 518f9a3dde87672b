#!/usr/bin/env bash
# Optional peers for benchmarks/bench_peers.py: ArcticInference's suffix cache, built from its
# source release (C++ via CMake + nanobind). --no-deps: its dependency list pulls vLLM, which
# the benchmark does not use. Without it, bench_peers.py skips the peer with a clear message.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$root/.venv/bin/python"
nb="$("$py" -m nanobind --cmake_dir)"  # arctic's CMakeLists finds nanobind through this
CMAKE_PREFIX_PATH="$(dirname "$nb"):$nb" "$py" -m pip install --no-deps --no-build-isolation \
  arctic-inference==0.3.0
