"""Fixtures of the end-to-end tests on real SGLang (CPU development mode)."""

from __future__ import annotations

import pytest

from das_sglang.sglang import cpu

cpu.activate()  # before anything imports sglang: stand-ins + SGLang's CPU switch


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from das_sglang.sglang.cpu.tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-llama")))
