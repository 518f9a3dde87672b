"""``python -m das_sglang.sglang.cpu.launch_server <sglang.launch_server args>``.

SGLang's own server launcher with the CPU development mode activated first (the
stand-ins must be importable before SGLang's modules load).
"""

from __future__ import annotations

import runpy
import sys

from das_sglang.sglang import cpu


def main() -> None:
    cpu.activate()
    sys.argv[0] = "sglang.launch_server"
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
