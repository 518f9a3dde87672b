# The two commands of the README. Both create/refresh .venv/ first (idempotent).
.PHONY: setup replay test bench

setup:
	bash scripts/setup.sh

# Main job on a machine without a GPU: replay the bundled real rollouts through DAS,
# SuffixDecoding and no speculation; writes runs/replay/{replay.json,*.png}.
replay: setup
	.venv/bin/das replay --json runs/replay/replay.json --plots runs/replay

# The whole test suite (real SGLang on the CPU included).
test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python benchmarks/bench_drafter.py --json runs/bench/drafter.json
