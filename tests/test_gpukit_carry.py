"""The GPU kit's carry split (benchmarks/gpu/carry.py): every device call <= 64 MiB.

Fake files only (no network, no download): sizes like the real carry (a 39 MB sglang
wheel, a few MB-sized ones, many small ones, one file larger than a whole call).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

MIB = 1 << 20
_spec = importlib.util.spec_from_file_location(
    "gpukit_carry", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "carry.py")
carry = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = carry  # dataclasses look their module up
_spec.loader.exec_module(carry)


def fake_wheels(d: Path, sizes: dict[str, int]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        (d / name).write_bytes(os.urandom(1024) * (size // 1024) + os.urandom(size % 1024))
    return d


SIZES = {"sglang-0.5.23-py3-none-any.whl": 39 * MIB, "transformers-5.19.0-py3-none-any.whl": 12 * MIB,
         "xgrammar-0.2.7-cp312.whl": 9 * MIB, "llguidance-1.9.1-cp39-abi3.whl": 3 * MIB,
         "big-1.0-py3-none-any.whl": 70 * MIB,
         **{f"small{i}-1.0-py3-none-any.whl": (i + 1) * 97 * 1024 for i in range(30)}}


def test_sets_fit_one_call_with_the_working_tree(tmp_path):
    src = fake_wheels(tmp_path / "wheels", SIZES)
    tree = 9 * MIB
    manifest = carry.split(src, tmp_path / "kit", tree)
    assert len(manifest["sets"]) >= 3  # 140+ MiB cannot travel in fewer calls
    for st in manifest["sets"]:
        on_disk = sum(p.stat().st_size for p in (tmp_path / "kit" / st["name"]).iterdir())
        assert on_disk + tree <= carry.CALL_LIMIT, st["name"]
    # the file larger than a call was cut into parts, every other file travels whole
    names = [n for st in manifest["sets"] for n in st["files"]]
    assert "big-1.0-py3-none-any.whl" not in names
    assert sum(n.startswith("big-1.0-py3-none-any.whl.part") for n in names) == 2
    assert sorted(n for n in names if ".part" not in n) == sorted(n for n in SIZES if not n.startswith("big"))


def test_parts_reassemble_and_the_manifest_catches_damage(tmp_path):
    src = fake_wheels(tmp_path / "wheels", SIZES)
    carry.split(src, tmp_path / "kit", 9 * MIB)
    stash = tmp_path / "stash"
    stash.mkdir()
    for st in sorted((tmp_path / "kit").glob("set*")):
        for f in st.iterdir():
            (stash / f.name).write_bytes(f.read_bytes())
    big = stash / "big-1.0-py3-none-any.whl"
    big.write_bytes(b"".join(p.read_bytes() for p in sorted(stash.glob(big.name + ".part*"))))
    manifest = stash / "manifest.json"
    assert carry.check(stash, manifest) == []
    (stash / "small3-1.0-py3-none-any.whl").write_bytes(b"x")
    big.unlink()
    problems = carry.check(stash, manifest)
    assert any("small3" in p for p in problems) and any("missing big" in p for p in problems)


def test_first_fit_decreasing_packs_tightly():
    sets = carry.plan_sets({"a": 60, "b": 40, "c": 40, "d": 20, "e": 20, "f": 20}, capacity=100)
    assert len(sets) == 2 and all(sum(p.size for p in s) <= 100 for s in sets)


def test_a_tree_that_fills_the_call_is_refused(tmp_path):
    src = fake_wheels(tmp_path / "wheels", {"a.whl": 1024})
    with pytest.raises(ValueError, match="working tree alone fills a call"):
        carry.split(src, tmp_path / "kit", tree=63 * MIB)


def test_wheel_list_is_pinned_and_has_one_version_each():
    lines = [l.strip() for l in (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" /
                                 "wheels.txt").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    names = [l.split("==")[0] for l in lines]
    assert all("==" in l for l in lines) and len(names) == len(set(names))
    assert "sglang==0.5.23" in lines and "apache-tvm-ffi==0.1.11" in lines
    assert not {"torch", "sglang-kernel", "flashinfer-python", "triton"} & set(names)
