"""``flock``-based locks: group writers, budgeted writers, migrations."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path, *, shared: bool = False, wait: bool = True) -> Iterator[bool]:
    """An ``flock`` on ``path``: excludes other processes and other threads alike.

    Yields True when held; with ``wait=False`` it yields False at once instead of waiting
    for a holder.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        # a directory this process cannot write: only reads happen here, and a writer
        # would have created the lock file; share it if it exists
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            yield True
            return
        shared = True
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock
