"""Fixtures of the end-to-end tests on real SGLang (CPU development mode).

CPU development mode is activated at import (before anything imports sglang) only where
it may run: on a machine without a CUDA GPU. On a CUDA host the modules still collect
(GPU tests live beside these); the tests that need the CPU engine skip.

``doubles/`` (a test-only distribution with an ``sglang.srt.plugins`` entry point, the
negative-control workers) goes on ``sys.path`` and ``PYTHONPATH``, so SGLang's plugin
loader finds it in the engine and in the scheduler processes it spawns.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from das_sglang.sglang import cpu

DOUBLES = str(Path(__file__).resolve().parent / "doubles")
CPU_MODE = not torch.cuda.is_available()

if DOUBLES not in sys.path:
    sys.path.insert(0, DOUBLES)
_paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
if DOUBLES not in _paths:
    os.environ["PYTHONPATH"] = os.pathsep.join([DOUBLES, *filter(None, _paths)])
if CPU_MODE:
    cpu.activate()  # stand-ins + SGLang's CPU switch


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    if not CPU_MODE:
        pytest.skip("needs das-sglang's CPU development mode, which is off on a CUDA host")
    from das_sglang.sglang.cpu.tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-llama")))
