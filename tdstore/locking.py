"""``flock``-based locks (group writers, budgeted writers, migrations) and the
deferral of signals around commits."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import threading
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


_DEFERRED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back for the duration (a commit): a signal that
    arrives meanwhile is delivered, to the handler that was installed before, once the
    block has finished. So Ctrl-C can never land between the database's commit and the
    code that learns of it. Python runs signal handlers in the main thread only, so
    elsewhere this does nothing (no signal can interrupt those threads).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict[int, object] = {}
    try:
        for signum in _DEFERRED:
            previous[signum] = signal.signal(signum, lambda s, _f: received.append(s))
    except ValueError:  # not the main interpreter
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        for signum in dict.fromkeys(received):
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)
