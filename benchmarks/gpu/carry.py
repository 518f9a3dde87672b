"""Split the GPU kit's files into carry sets that each fit one device call.

The device tool sends, per call, the working tree plus the paths named in ``carry``, 64 MiB
in all. ``prepare.sh`` downloads the wheels into ``.gpukit/wheels/``; this module packs
them into ``.gpukit/set1/``, ``.gpukit/set2/``, ... (hard links, or copies), each at most
``limit - tree`` bytes, where ``tree`` is what the working tree itself sends. A file larger
than a set is cut into parts (``NAME.part000``, ...), reassembled on the GPU machine by
``stash.sh`` (``cat``), and checked there against ``manifest.json`` (size + sha256).

    python benchmarks/gpu/carry.py split --src .gpukit/wheels --dest .gpukit [--tree-bytes N]
    python benchmarks/gpu/carry.py check --dir /tmp/gpukit --manifest /tmp/gpukit/manifest.json

Packing is first-fit decreasing: few sets means few device calls (each call's start and
transfer is paid in device minutes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
CALL_LIMIT = 64 * MIB  # the device tool: working tree + carried paths, per call
MARGIN = 2 * MIB  # headroom: files written between prepare and the call, rounding


@dataclass(frozen=True)
class Piece:
    name: str  # file name inside the set
    source: str  # file it comes from
    offset: int
    size: int


def plan_sets(files: dict[str, int], capacity: int) -> list[list[Piece]]:
    """Pack ``{name: size}`` into sets of at most ``capacity`` bytes (first-fit
    decreasing); a file larger than ``capacity`` is cut into ``capacity``-byte parts."""
    if capacity <= 0:
        raise ValueError(f"invalid capacity={capacity}: the working tree alone fills a call")
    pieces: list[Piece] = []
    for name, size in files.items():
        if size <= capacity:
            pieces.append(Piece(name, name, 0, size))
            continue
        for k, off in enumerate(range(0, size, capacity)):
            pieces.append(Piece(f"{name}.part{k:03d}", name, off, min(capacity, size - off)))
    pieces.sort(key=lambda p: (-p.size, p.name))
    sets: list[list[Piece]] = []
    used: list[int] = []
    for p in pieces:
        for i, u in enumerate(used):
            if u + p.size <= capacity:
                sets[i].append(p)
                used[i] += p.size
                break
        else:
            sets.append([p])
            used.append(p.size)
    return sets


def tree_bytes(repo: Path) -> int:
    """Bytes the device tool sends for the working tree: tracked and untracked files
    that git does not ignore (``shared/`` is absent in this checkout)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=repo, capture_output=True, check=True).stdout
    total = 0
    for rel in filter(None, out.split(b"\0")):
        p = repo / os.fsdecode(rel)
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def sha256(path: Path, offset: int = 0, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = size if size is not None else os.path.getsize(path) - offset
        while left > 0:
            chunk = f.read(min(left, 4 * MIB))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def split(src: Path, dest: Path, tree: int, limit: int = CALL_LIMIT) -> dict:
    """Write ``dest/setN/`` and ``dest/manifest.json``; return the manifest."""
    files = {p.name: p.stat().st_size for p in sorted(src.iterdir()) if p.is_file()}
    if not files:
        raise ValueError(f"{src}: no files to carry")
    capacity = limit - tree - MARGIN
    sets = plan_sets(files, capacity)
    for old in dest.glob("set*"):
        shutil.rmtree(old)
    manifest = {"capacity": capacity, "tree_bytes": tree, "limit": limit,
                "files": {n: {"size": s, "sha256": sha256(src / n)} for n, s in files.items()},
                "sets": []}
    for i, pieces in enumerate(sets, start=1):
        d = dest / f"set{i}"
        d.mkdir(parents=True)
        for p in pieces:
            _materialise(src / p.source, d / p.name, p.offset, p.size, whole=p.name == p.source)
        manifest["sets"].append({"name": d.name, "bytes": sum(p.size for p in pieces),
                                 "files": sorted(p.name for p in pieces)})
    text = json.dumps(manifest, indent=1)
    (dest / "manifest.json").write_text(text)
    (dest / "set1" / "manifest.json").write_text(text)  # travels with the first call
    return manifest


def _materialise(src: Path, dst: Path, offset: int, size: int, whole: bool) -> None:
    if whole:
        try:
            os.link(src, dst)
            return
        except OSError:
            shutil.copyfile(src, dst)
            return
    with open(src, "rb") as f, open(dst, "wb") as g:
        f.seek(offset)
        left = size
        while left > 0:
            chunk = f.read(min(left, 4 * MIB))
            g.write(chunk)
            left -= len(chunk)


def check(directory: Path, manifest_path: Path) -> list[str]:
    """Problems with the reassembled files in ``directory`` (empty = all present and
    intact)."""
    manifest = json.loads(manifest_path.read_text())
    problems = []
    for name, want in manifest["files"].items():
        p = directory / name
        if not p.exists():
            problems.append(f"missing {name} (a carry set was not stashed?)")
        elif p.stat().st_size != want["size"]:
            problems.append(f"{name}: {p.stat().st_size} bytes, want {want['size']}")
        elif sha256(p) != want["sha256"]:
            problems.append(f"{name}: sha256 differs")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("--src", type=Path, required=True)
    s.add_argument("--dest", type=Path, required=True)
    s.add_argument("--tree-bytes", type=int, default=None,
                   help="default: measured with git in the current repository")
    s.add_argument("--limit-mib", type=float, default=CALL_LIMIT / MIB)
    c = sub.add_parser("check")
    c.add_argument("--dir", type=Path, required=True)
    c.add_argument("--manifest", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "check":
        problems = check(args.dir, args.manifest)
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 1 if problems else 0
    tree = args.tree_bytes if args.tree_bytes is not None else tree_bytes(Path.cwd())
    try:
        manifest = split(args.src, args.dest, tree, int(args.limit_mib * MIB))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"working tree {tree / MIB:.1f} MiB; {len(manifest['sets'])} carry set(s), each "
          f"<= {manifest['capacity'] / MIB:.1f} MiB:")
    for st in manifest["sets"]:
        print(f"  {args.dest / st['name']}: {st['bytes'] / MIB:.1f} MiB, {len(st['files'])} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
