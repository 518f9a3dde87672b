"""History snapshots: exact round trip, crash safety, corruption detection."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from das_sglang.core import snapshot
from das_sglang.core.snapshot import (
    FORMAT_VERSION,
    PeriodicSnapshot,
    SnapshotError,
    load_history,
    load_history_or_empty,
    save_history,
    snapshot_file,
)


def _history(seed: int = 0, problems: int = 3, steps: int = 3, per_step: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    return {
        f"p{p}": {
            s: [rng.integers(0, 151_000, rng.integers(0, 50), dtype=np.int32) for _ in range(per_step)]
            for s in range(steps)
        }
        for p in range(problems)
    }


def _assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for pid in a:
        assert list(a[pid]) == list(b[pid])
        for step in a[pid]:
            assert len(a[pid][step]) == len(b[pid][step])
            for x, y in zip(a[pid][step], b[pid][step]):
                assert y.dtype == np.int32
                np.testing.assert_array_equal(x, y)


class TestRoundTrip:
    def test_arrays_and_meta_survive(self, tmp_path: Path) -> None:
        hist = _history()
        save_history(tmp_path, hist, meta={"step": 2, "config": {"window_steps": 4}})
        got, meta = load_history(tmp_path)
        _assert_same(hist, got)
        assert meta == {"step": 2, "config": {"window_steps": 4}}

    def test_coalesced_chunks_write_the_same_bytes(self, tmp_path: Path, monkeypatch) -> None:
        # The writer joins the token arrays into ~1 MiB chunks (few Python calls per MiB):
        # any chunk size gives the same file, and it loads back exactly.
        hist = _history(seed=4, problems=5, per_step=7)
        save_history(tmp_path / "one", hist)
        for size in (1, 64, 1000):
            monkeypatch.setattr(snapshot, "_CHUNK_BYTES", size)
            save_history(tmp_path / str(size), hist)
            assert snapshot_file(tmp_path / str(size)).read_bytes() == snapshot_file(tmp_path / "one").read_bytes()
        _assert_same(hist, load_history(tmp_path / "64")[0])
        monkeypatch.setattr(snapshot, "_CHUNK_BYTES", 64)  # 40 + 80 B, then 120 B, then 0 + 20 B
        lens = np.array([10, 20, 30, 0, 5], np.int32)
        blob = np.arange(3, dtype=np.float64)
        parts = list(snapshot._body(b"h", b"i", [lens, [np.arange(n, dtype=np.int32) for n in lens], [blob]]))
        # header, index, the lengths, then the token chunks, then meta's arrays
        assert bytes(parts[2]) == lens.tobytes() and bytes(parts[-1]) == blob.tobytes()
        tokens = parts[3:-1]
        assert [len(bytes(p)) for p in tokens] == [120, 120, 20] and b"".join(bytes(p) for p in tokens) == np.concatenate(
            [np.arange(n, dtype=np.int32) for n in lens]).tobytes()

    def test_empty_history_and_empty_sequences(self, tmp_path: Path) -> None:
        save_history(tmp_path, {})
        assert load_history(tmp_path) == ({}, {})
        save_history(tmp_path, {"x": {5: [np.zeros(0, np.int32)]}})
        got, _ = load_history(tmp_path)
        assert list(got["x"]) == [5] and len(got["x"][5]) == 1 and got["x"][5][0].size == 0

    def test_lists_and_int64_are_accepted_as_int32(self, tmp_path: Path) -> None:
        save_history(tmp_path, {"q": {1: [[1, 2, 3], np.array([7, 8], dtype=np.int64)]}})
        got, _ = load_history(tmp_path)
        np.testing.assert_array_equal(got["q"][1][0], [1, 2, 3])
        np.testing.assert_array_equal(got["q"][1][1], [7, 8])

    def test_loaded_arrays_are_writable(self, tmp_path: Path) -> None:
        # The drafter may keep and mutate what it loads; views of a read-only buffer would break it.
        save_history(tmp_path, {"q": {1: [[1, 2, 3]]}})
        got, _ = load_history(tmp_path)
        got["q"][1][0][0] = 9
        assert got["q"][1][0][0] == 9

    @settings(max_examples=40, deadline=None)
    @given(
        st.dictionaries(
            st.text(min_size=1, max_size=8),
            st.dictionaries(
                st.integers(-5, 10**6),
                st.lists(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=20), max_size=4),
                max_size=3,
            ),
            max_size=4,
        )
    )
    def test_property_round_trip(self, tmp_path_factory: pytest.TempPathFactory, hist: dict) -> None:
        d = tmp_path_factory.mktemp("snap")
        save_history(d, hist)
        got, _ = load_history(d)
        assert {p: {s: [a.tolist() for a in seqs] for s, seqs in st_.items()} for p, st_ in got.items()} == hist

    def test_overwrite_replaces_previous(self, tmp_path: Path) -> None:
        save_history(tmp_path, _history(seed=1))
        save_history(tmp_path, _history(seed=2))
        got, _ = load_history(tmp_path)
        _assert_same(_history(seed=2), got)
        assert [p.name for p in tmp_path.iterdir()] == [snapshot.SNAPSHOT_NAME]


class TestDraftsPreserved:
    def test_drafter_from_loaded_history_speculates_identically(self, tmp_path: Path) -> None:
        drafter_mod = pytest.importorskip("das_sglang.core.drafter")
        from das_sglang.core.config import DrafterConfig

        def build(hist: dict):
            d = drafter_mod.SuffixDrafter(DrafterConfig())
            d.advance_step(3)
            d.load_history(hist)
            return d

        rng = np.random.default_rng(7)
        base = rng.integers(0, 50, 200, dtype=np.int32)
        hist = {"p0": {s: [np.concatenate([base[: 40 + 10 * i], rng.integers(0, 50, 30, dtype=np.int32)])
                           for i in range(4)] for s in range(3)}}
        original = build(hist)
        save_history(tmp_path, original.history())
        restored = build(load_history(tmp_path)[0])
        for d in (original, restored):
            d.start_request("r", "p0", base[:45])
        a, b = original.speculate("r", 16), restored.speculate("r", 16)
        assert len(a) > 0
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.parents, b.parents)
        np.testing.assert_array_equal(a.probs, b.probs)


def _corrupt(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


class TestCorruption:
    @pytest.fixture
    def snap(self, tmp_path: Path) -> Path:
        save_history(tmp_path, _history())
        return snapshot_file(tmp_path)

    def test_flipped_payload_byte_is_a_checksum_error(self, snap: Path) -> None:
        raw = snap.read_bytes()
        _corrupt(snap, len(raw) - 100, bytes([raw[-100] ^ 0xFF]))
        with pytest.raises(SnapshotError, match=r"checksum mismatch") as e:
            load_history(snap.parent)
        assert str(snap) in str(e.value)

    def test_every_single_byte_flip_is_detected(self, tmp_path: Path) -> None:
        save_history(tmp_path, {"a": {0: [[1, 2, 3]]}}, meta={"k": 1})
        snap = snapshot_file(tmp_path)
        raw = snap.read_bytes()
        for i in range(len(raw)):
            _corrupt(snap, i, bytes([raw[i] ^ 0x01]))
            with pytest.raises(SnapshotError):
                load_history(tmp_path)
            snap.write_bytes(raw)

    def test_truncated(self, snap: Path) -> None:
        snap.write_bytes(snap.read_bytes()[:-7])
        with pytest.raises(SnapshotError, match=r"truncated"):
            load_history(snap.parent)

    def test_shorter_than_header(self, snap: Path) -> None:
        snap.write_bytes(b"DAS")
        with pytest.raises(SnapshotError, match=r"truncated.*header"):
            load_history(snap.parent)

    def test_wrong_magic(self, snap: Path) -> None:
        _corrupt(snap, 0, b"NOTASNAP")
        with pytest.raises(SnapshotError, match=r"not a das-sglang history snapshot"):
            load_history(snap.parent)

    def test_wrong_version(self, snap: Path) -> None:
        _corrupt(snap, 8, (FORMAT_VERSION + 1).to_bytes(4, "little"))
        with pytest.raises(SnapshotError, match=rf"unsupported format version {FORMAT_VERSION + 1}"):
            load_history(snap.parent)

    def test_missing_is_file_not_found(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            load_history(tmp_path / "nope")


class TestLoadOrEmpty:
    def test_missing_snapshot_is_a_silent_fresh_start(self, tmp_path: Path) -> None:
        msgs: list[str] = []
        assert load_history_or_empty(tmp_path, log=msgs.append) == ({}, {})
        assert msgs == []

    def test_corrupt_snapshot_warns_and_starts_empty(self, tmp_path: Path) -> None:
        save_history(tmp_path, _history())
        _corrupt(snapshot_file(tmp_path), 8, (99).to_bytes(4, "little"))
        msgs: list[str] = []
        assert load_history_or_empty(tmp_path, log=msgs.append) == ({}, {})
        assert len(msgs) == 1 and "version 99" in msgs[0] and "empty history" in msgs[0]

    def test_unusable_snapshot_is_kept_aside_not_overwritten(self, tmp_path: Path) -> None:
        """A writer that starts empty over an unusable snapshot (corrupt, or a newer format
        after a downgrade) first renames it aside: the next save does not destroy it. A
        reader that never writes leaves it in place."""
        save_history(tmp_path, _history())
        _corrupt(snapshot_file(tmp_path), 8, (FORMAT_VERSION + 1).to_bytes(4, "little"))
        raw = snapshot_file(tmp_path).read_bytes()
        msgs: list[str] = []
        assert load_history_or_empty(tmp_path, log=msgs.append) == ({}, {})  # reader
        assert snapshot_file(tmp_path).read_bytes() == raw
        assert load_history_or_empty(tmp_path, log=msgs.append, keep_aside=True) == ({}, {})
        aside = list(tmp_path.glob("history.dassnap.unusable-*"))
        assert len(aside) == 1 and aside[0].read_bytes() == raw and not snapshot_file(tmp_path).exists()
        assert str(aside[0]) in msgs[-1] and f"version {FORMAT_VERSION + 1}" in msgs[-1]
        save_history(tmp_path, {"p": {1: [[1, 2]]}})  # the next save: a new file beside it
        assert load_history(tmp_path)[0]["p"][1][0].tolist() == [1, 2] and aside[0].read_bytes() == raw

    def test_strict_raises(self, tmp_path: Path) -> None:
        save_history(tmp_path, _history())
        snapshot_file(tmp_path).write_bytes(b"garbage" * 10)
        with pytest.raises(SnapshotError):
            load_history_or_empty(tmp_path, strict=True)

    def test_good_snapshot_loads(self, tmp_path: Path) -> None:
        save_history(tmp_path, _history(), meta={"step": 4})
        hist, meta = load_history_or_empty(tmp_path)
        _assert_same(_history(), hist)
        assert meta == {"step": 4}


class TestBadInput:
    @pytest.mark.parametrize(
        "hist, match",
        [
            ([1, 2], r"history must be a mapping"),
            ({1: {0: [[1]]}}, r"problem_id 1: must be a str"),
            ({"p": [[1]]}, r"history\['p'\] must map step"),
            ({"p": {"0": [[1]]}}, r"step '0': must be an int"),
            ({"p": {0: [[[1, 2]]]}}, r"history\['p'\]\[0\]\[0\]: token array must be 1-D"),
            ({"p": {0: [[1.5]]}}, r"must hold integers, got dtype float64"),
            ({"p": {0: [np.array([2**40])]}}, r"do not fit int32"),
        ],
    )
    def test_bad_history_names_the_value(self, tmp_path: Path, hist, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            save_history(tmp_path, hist)
        assert not snapshot_file(tmp_path).exists()

    def test_bad_meta(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"meta is not JSON"):
            save_history(tmp_path, {}, meta={"x": object()})


_SLOW_CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from das_sglang.core import snapshot

    def slow_write_all(f, chunks):
        for i, chunk in enumerate(chunks):
            f.write(chunk)
            if i == 2:
                f.flush()
                print("MIDWAY", flush=True)
                time.sleep(60)  # the parent kills us here

    snapshot._write_all = slow_write_all
    hist = {"new": {9: [np.arange(1000, dtype=np.int32)] * 8}}
    snapshot.save_history(sys.argv[1], hist)
    print("FINISHED", flush=True)
    """
)


class TestCrashSafety:
    def test_sigkill_mid_save_leaves_previous_snapshot_loadable(self, tmp_path: Path) -> None:
        old = _history(seed=3)
        save_history(tmp_path, old, meta={"gen": "old"})
        child = subprocess.Popen(
            [sys.executable, "-c", _SLOW_CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "MIDWAY"
            # The half-written temp file is on disk next to the live snapshot.
            assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=30) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        got, meta = load_history(tmp_path)
        _assert_same(old, got)
        assert meta == {"gen": "old"}
        # The next save sweeps the dead writer's temp file.
        save_history(tmp_path, {"n": {0: [[1]]}})
        assert sorted(p.name for p in tmp_path.iterdir()) == [snapshot.SNAPSHOT_NAME]

    def test_exception_mid_save_keeps_previous_and_cleans_up(self, tmp_path: Path, monkeypatch) -> None:
        save_history(tmp_path, {"a": {0: [[1, 2]]}})

        def failing_write_all(f, chunks):
            next(iter(chunks))
            raise OSError("disk full")

        monkeypatch.setattr(snapshot, "_write_all", failing_write_all)
        with pytest.raises(OSError, match="disk full"):
            save_history(tmp_path, {"b": {0: [[3]]}})
        assert sorted(p.name for p in tmp_path.iterdir()) == [snapshot.SNAPSHOT_NAME]
        assert list(load_history(tmp_path)[0]) == ["a"]


class TestPeriodicSnapshot:
    def test_saves_every_n_and_on_close(self, tmp_path: Path) -> None:
        state = {"p": {0: [[1]]}}
        saver = PeriodicSnapshot(tmp_path, lambda: state, every_n=3, get_meta=lambda: {"n": len(state["p"])})
        assert [saver.note_finished() for _ in range(3)] == [False, False, True]
        assert load_history(tmp_path)[1] == {"n": 1}
        state["p"][1] = [[2]]
        assert saver.note_finished() is False
        saver.close()
        hist, meta = load_history(tmp_path)
        assert list(hist["p"]) == [0, 1] and meta == {"n": 2}

    def test_every_zero_saves_only_on_close(self, tmp_path: Path) -> None:
        saver = PeriodicSnapshot(tmp_path, lambda: {}, every_n=0)
        assert not any(saver.note_finished() for _ in range(10))
        assert not snapshot_file(tmp_path).exists()
        saver.close()
        assert snapshot_file(tmp_path).exists()

    def test_held_save_waits_for_release_and_keeps_the_view_of_its_request(self, tmp_path: Path) -> None:
        """``save(hold=True)`` takes the view now and writes it only once released (the
        worker's verify forward); ``wait`` and ``close`` write a held save too."""
        import time

        state = {"p": {0: [np.array([1, 2], np.int32)]}}
        saver = PeriodicSnapshot(tmp_path, lambda: {p: dict(s) for p, s in state.items()}, background=True)
        saver.save(hold=True)
        state["p"][1] = [np.array([3], np.int32)]  # after the request: not in its view
        time.sleep(0.2)
        assert not snapshot_file(tmp_path).exists()  # held
        saver.release()
        saver.wait()
        assert list(load_history(tmp_path)[0]["p"]) == [0]
        saver.save(hold=True)
        saver.wait()  # not released: written anyway
        assert list(load_history(tmp_path)[0]["p"]) == [0, 1]
        state["p"][2] = [np.array([4], np.int32)]
        saver.note_finished(hold=True)  # (every_n 0: no save)
        saver.save(hold=True)
        saver.close()
        assert list(load_history(tmp_path)[0]["p"]) == [0, 1, 2]

    def test_negative_every_n(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"every_n=-1"):
            PeriodicSnapshot(tmp_path, lambda: {}, every_n=-1)


def test_meta_arrays_round_trip_compactly(tmp_path):
    """Numpy arrays in meta (the length predictor's columns) are stored as their bytes in the
    payload and read back as arrays of the same dtype, shape and values (copies: they do not
    pin the file's buffer); non-numeric arrays are refused."""
    import numpy as np

    from das_sglang.core.snapshot import load_history, save_history, snapshot_file

    cols = np.arange(3 * 5000, dtype=np.int64).reshape(3, 5000) * 7919
    meta = {"das_lengths": {"step": 3, "problems": ["a"], "columns": cols}, "x": np.int64(4),
            "f": np.arange(4, dtype=np.float32), "e": np.zeros((0, 3), np.int32)}
    save_history(tmp_path, {"a": {1: [np.array([1, 2], np.int32)]}}, meta)
    _, back = load_history(tmp_path)
    got = back["das_lengths"]["columns"]
    assert got.dtype == np.int64 and got.shape == (3, 5000) and np.array_equal(got, cols)
    assert back["x"] == 4 and back["f"].dtype == np.float32 and back["f"].tolist() == [0, 1, 2, 3]
    assert got.base is None  # a copy
    assert back["e"].shape == (0, 3) and back["e"].dtype == np.int32
    # compact: the bytes themselves, not a list of 15,000 numbers in the JSON index
    assert snapshot_file(tmp_path).stat().st_size < 15000 * 8 + 1024
    with pytest.raises(ValueError, match="not JSON"):
        save_history(tmp_path, {}, {"bad": np.array(["s"], dtype=object)})


def _file(version: int, index: dict, payload: bytes) -> bytes:
    import hashlib
    import json

    raw = json.dumps(index).encode()
    body = snapshot._HEADER.pack(snapshot.MAGIC, version, len(raw), len(payload)) + raw + payload
    return body + hashlib.sha256(body).digest()


def test_format_1_files_still_load(tmp_path):
    """Snapshots written before format 2 (each sequence's length in the JSON index, meta's
    arrays in base64) load as before: an upgraded worker keeps its history."""
    import base64

    cols = np.arange(6, dtype=np.int64).reshape(2, 3)
    index = {"meta": {"c": {"__ndarray__": base64.b64encode(cols.tobytes()).decode(), "dtype": "<i8",
                            "shape": [2, 3]}, "k": 1},
             "problems": [["a", [[0, [2, 3]], [1, [0]]]], ["b", [[4, [1]]]]]}
    tokens = np.array([1, 2, 3, 4, 5, 6], np.int32)
    snapshot_file(tmp_path).write_bytes(_file(1, index, tokens.tobytes()))
    hist, meta = load_history(tmp_path)
    _assert_same({"a": {0: [np.array([1, 2]), np.array([3, 4, 5])], 1: [np.zeros(0)]},
                  "b": {4: [np.array([6])]}}, hist)
    assert meta["k"] == 1 and np.array_equal(meta["c"], cols)
    # and this build writes format 2, which it reads back the same
    save_history(tmp_path / "v2", hist, meta)
    assert snapshot_file(tmp_path / "v2").read_bytes()[8:12] == (2).to_bytes(4, "little") == FORMAT_VERSION.to_bytes(4, "little")
    hist2, meta2 = load_history(tmp_path / "v2")
    _assert_same(hist, hist2)
    assert meta2["k"] == 1 and np.array_equal(meta2["c"], cols)


def test_index_size_does_not_grow_with_sequences(tmp_path):
    """Format 2 keeps the sequence lengths out of the JSON index: its size depends on the
    problem-steps, not on how many sequences they hold (json.dumps holds a background
    writer's GIL for the whole call)."""
    def index_bytes(n_seqs: int) -> int:
        hist = {"p": {3: [np.arange(i % 7, dtype=np.int32) for i in range(n_seqs)]}}
        d = tmp_path / str(n_seqs)
        save_history(d, hist)
        raw = snapshot_file(d).read_bytes()
        assert load_history(d)[0]["p"][3][5].tolist() == list(range(5))
        return snapshot._HEADER.unpack_from(raw)[2]

    # only digits differ: the group's and the file's sequence counts (10 -> 10000) and the
    # token count (24 -> 29994)
    assert index_bytes(10) + 9 == index_bytes(10_000) < 80


@pytest.mark.parametrize("index, payload, match", [
    ({"meta": {}, "problems": [["a", [[0, 2]]]], "sequences": 2, "tokens": 5},
     np.array([2, 2, 1, 2, 3, 4, 5], np.int32), "do not add up to 5"),
    ({"meta": {}, "problems": [["a", [[0, 3]]]], "sequences": 2, "tokens": 3},
     np.array([1, 2, 1, 2, 3], np.int32), "3 sequences past the 2"),
    ({"meta": {}, "problems": [["a", [[0, 1]]]], "sequences": 2, "tokens": 3},
     np.array([1, 2, 1, 2, 3], np.int32), "lists 1 sequences but the payload holds 2"),
    ({"meta": {}, "problems": [], "sequences": 9, "tokens": 0},
     np.zeros(2, np.int32), "do not fit the 8-byte payload"),
    ({"meta": {"x": {"__array__": [0, 64], "dtype": "<i8", "shape": [8]}}, "problems": [],
      "sequences": 0, "tokens": 0}, np.zeros(2, np.int32), "outside the payload's 8-byte array section"),
    ({"meta": {"x": {"__array__": [0, 8], "dtype": "|O", "shape": [1]}}, "problems": [],
      "sequences": 0, "tokens": 0}, np.zeros(2, np.int32), "array of dtype object in meta"),
    ({"meta": {}, "problems": []}, np.zeros(0, np.int32), "'sequences'"),
])
def test_malformed_format_2_index_is_named(tmp_path, index, payload, match):
    """A format-2 file whose checksum holds but whose index does not match its payload (a
    writer bug, not disk corruption) is a SnapshotError naming the file and the defect."""
    snapshot_file(tmp_path).write_bytes(_file(2, index, payload.tobytes()))
    with pytest.raises(SnapshotError, match=match) as e:
        load_history(tmp_path)
    assert str(snapshot_file(tmp_path)) in str(e.value)


def test_token_group_is_an_immutable_sequence_of_arrays():
    a, b, c = (np.array(x, np.int32) for x in ([1, 2, 3], [], [7, 8]))
    g0 = snapshot.TokenGroup.of([a, b])
    g = g0.plus(c)
    assert len(g0) == 2 and len(g) == 3 and g0.flat.tolist() == [1, 2, 3]  # g0 unchanged
    assert [x.tolist() for x in g] == [[1, 2, 3], [], [7, 8]] and g[-1].tolist() == [7, 8]
    assert [x.tolist() for x in g[1:]] == [[], [7, 8]] and g.lens.tolist() == [3, 0, 2]
    assert all(x.dtype == np.int32 for x in g)
    with pytest.raises(IndexError, match="index 3 out of range"):
        g[3]
    empty = snapshot.TokenGroup.of([])
    assert len(empty) == 0 and list(empty) == [] and empty.plus(a)[0].tolist() == [1, 2, 3]


def test_token_groups_write_the_same_file_as_arrays(tmp_path):
    """The worker's mirror (TokenGroups: one array per problem-step, no Python step per
    sequence in the writer) gives the same bytes as the same history as lists of arrays."""
    hist = _history(seed=7, problems=4, steps=3, per_step=5)
    hist["z"] = {9: [np.zeros(0, np.int32)], 10: []}
    grouped = {p: {s: snapshot.TokenGroup.of(seqs) for s, seqs in steps.items()} for p, steps in hist.items()}
    meta = {"m": np.arange(5)}
    save_history(tmp_path / "a", hist, meta)
    save_history(tmp_path / "g", grouped, meta)
    assert snapshot_file(tmp_path / "a").read_bytes() == snapshot_file(tmp_path / "g").read_bytes()
    _assert_same(hist, load_history(tmp_path / "g")[0])


def test_token_group_appends_without_copying_the_group():
    """plus is amortised O(new sequence): the newest group appends into spare room of the
    arrays it views; an older group (a writer's view) never changes, and appending to it
    again (a branch) copies instead of writing over what the newer group holds."""
    g = snapshot.TokenGroup.of([])
    groups = [g]
    for i in range(300):
        g = g.plus(np.full(i % 5 + 1, i, np.int32))
        groups.append(g)
    bases = {id(x.flat.base) for x in groups[1:]}
    assert len(bases) <= 12  # 300 appends: a few reallocations (each array grows 1.5x when full)
    for n, x in enumerate(groups):  # every earlier view still reads what it held
        assert len(x) == n and [a.tolist() for a in x][-1:] == ([[n - 1] * ((n - 1) % 5 + 1)] if n else [])
    old = groups[10]
    branch = old.plus(np.array([77], np.int32))  # not the tip: copies
    assert branch.flat.base is not old.flat.base
    assert groups[11][10].tolist() == [10] * 1 and branch[10].tolist() == [77]
    assert [a.tolist() for a in groups[-1]][:11] == [a.tolist() for a in groups[11]]


def test_a_background_writer_pauses_between_slices_and_writes_the_same_file(tmp_path, monkeypatch):
    """The background writer's encoding lets go of the GIL between slices of (problem,
    step) groups and of the JSON index's problems (a waiting scheduler thread took the
    GIL only at the interpreter's forced switch, 5 ms): it pauses at least once per
    slice, and the file is byte for byte the one written in one go."""
    monkeypatch.setattr(snapshot, "_PAUSE_GROUPS", 4)
    monkeypatch.setattr(snapshot, "_PAUSE_PROBLEMS", 3)
    hist = _history(seed=3, problems=10, steps=2, per_step=3)
    grouped = {p: {s: snapshot.TokenGroup.of(seqs) for s, seqs in steps.items()} for p, steps in hist.items()}
    meta = {"das_lengths": {"step": 2, "problems": ["p1"], "columns": np.arange(6).reshape(3, 2)}, "x": 1}
    pauses = []
    snapshot._save(tmp_path / "paused", grouped, meta, lambda: pauses.append(1))
    save_history(tmp_path / "plain", grouped, meta)
    # groups: a pause before every problem once 4 groups were encoded (every 2nd of the
    # 10 problems: 4); index: between its 4 slices of 3 problems (3)
    assert len(pauses) == 4 + 3
    assert snapshot_file(tmp_path / "paused").read_bytes() == snapshot_file(tmp_path / "plain").read_bytes()
    got, got_meta = load_history(tmp_path / "paused")
    _assert_same(hist, got)
    assert got_meta["x"] == 1 and got_meta["das_lengths"]["columns"].tolist() == [[0, 1], [2, 3], [4, 5]]
    writes = []
    monkeypatch.setattr(snapshot, "gil_pause", lambda: writes.append(1))
    snap = PeriodicSnapshot(tmp_path / "bg", lambda: grouped, get_meta=lambda: meta, background=True)
    snap.close()  # (the writer thread's save)
    assert len(writes) == 7
    assert snapshot_file(tmp_path / "bg").read_bytes() == snapshot_file(tmp_path / "plain").read_bytes()
