"""Atomic file replacement: a reader sees the old file or the new one, never a torn one.

Write to a temp file in the target's directory, flush, fsync, rename over the target,
then fsync the directory so the rename itself survives a crash. A writer killed midway
leaves only a temp file (named with ``tmp_prefix``) that the next writer may sweep.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def atomic_file(target: Path, *, binary: bool, tmp_prefix: str, durable: bool = True) -> Iterator[IO]:
    """Yield an open temp file; on normal exit it atomically replaces ``target``.
    ``durable=False``: no fsync (a reader still sees the old file or the new one; after a
    crash either may be there) -- for files rewritten often whose loss costs nothing."""
    directory = target.parent
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix, suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the file from other users
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX: the directory entry lives in the directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
