"""Durable writes: files and directories that survive a crash whole or not at all.

The one place that knows the pattern (write to a temporary name in the same
directory, flush, fsync, rename over the final name, fsync the directory);
shard snapshots and checkpoints use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["fsync_dir", "replace_dir", "replace_file", "write_synced"]


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``directory`` durable.

    Args:
        directory: the directory whose entries to fsync.

    Raises:
        OSError: it cannot be opened or synced.
    """
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Create ``path`` with what ``write(f)`` writes, flushed and fsynced (no rename:
    for files inside a directory that :func:`replace_dir` publishes).

    Args:
        path: the file to create (or truncate).
        write: writes the content to the binary file it is given.

    Raises:
        OSError: writing failed.
    """
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def replace_file(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Atomically and durably replace ``path`` with what ``write(f)`` writes.

    A crash or error at any point leaves either the old file or the new one,
    never a mix; the temporary file is removed on error.

    Args:
        path: the file to replace (or create).
        write: writes the content to the binary file it is given.

    Returns:
        ``path``, as a Path.

    Raises:
        OSError: writing failed (disk full, ...); ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)  # makes the rename itself durable
    return path


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Publish the filled directory ``tmp`` as ``final`` (same parent), durably.

    Args:
        tmp: the filled directory.
        final: its name once published; an existing empty directory of that
            name is replaced.

    Raises:
        OSError: the rename or a sync failed (e.g. ``final`` is not empty).
    """
    fsync_dir(tmp)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)
