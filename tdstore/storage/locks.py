"""Locks (group writers, budgeted writers, migrations) behind the :class:`Locks`
interface, their ``flock`` implementation, and the deferral of signals around commits."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from tdstore.core.errors import StorageError
from tdstore.core.ids import check_gid


@contextlib.contextmanager
def file_lock(path: Path, *, shared: bool = False, wait: bool = True) -> Iterator[bool]:
    """An ``flock`` on ``path``: excludes other processes and other threads alike.

    Yields True when held; with ``wait=False`` it yields False at once instead of waiting
    for a holder.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # not recreated: the store may have been moved
            raise StorageError(f"lock file {path}: its directory is missing (the "
                               "store's locks/ directory was removed, or the store moved "
                               "or deleted)") from None
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
_depth = 0  # deferrals open in the main thread
_pending: list[int] = []  # signals that arrived meanwhile
_originals: dict[int, object] = {}  # the handlers the wrapper stands in front of


def _deliver(signum: int, frame: object) -> None:
    handler = _originals.get(signum, signal.SIG_DFL)
    if callable(handler):
        handler(signum, frame)
    elif handler in (signal.SIG_DFL, None):
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # the default action: terminate, now


def _wrapper(signum: int, frame: object) -> None:
    if _depth > 0:
        _pending.append(signum)
    else:
        _deliver(signum, frame)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back for the duration (a commit): a signal that
    arrives meanwhile goes, once the block has finished, to the handler that was
    installed before. So Ctrl-C can never land between the database's commit and the
    code that learns of it.

    A small wrapper stays installed in front of the process's handlers (it passes
    signals straight through outside a deferral; for a default handler it restores the
    default and re-sends the signal). Swapping handlers in and out instead would lose a
    signal that arrives just before the swap back: Python runs the handler installed
    when it gets to it, and drops the signal if that is the default one. Python runs
    signal handlers in the main thread only, so elsewhere this does nothing.
    """
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    for signum in _DEFERRED:
        current = signal.getsignal(signum)
        if current is not _wrapper:
            _originals[signum] = current
            try:
                signal.signal(signum, _wrapper)
            except ValueError:  # not the main interpreter
                pass
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending:
            todo = list(dict.fromkeys(_pending))
            _pending.clear()
            for pending in todo:
                _deliver(pending, None)


class Locks(Protocol):
    """Named locks shared by every process of a store: ``store`` (schema upgrades),
    ``budget`` (budgeted writes take turns) and one per group id (its writers).

    ``hold(name, wait=False)`` yields False at once instead of waiting for a holder;
    ``shared=True`` holds it beside other shared holders (not beside an exclusive one).
    A second implementation (locks in a database server) plugs in here."""

    def hold(self, name: str, *, wait: bool = True,
             shared: bool = False) -> AbstractContextManager[bool]: ...

    def confirm(self, session: Any) -> None:
        """Called inside a commit's transaction: raise if a lock this thread holds was
        lost meanwhile (then the commit rolls back)."""

    def forget(self, name: str) -> None:
        """Drop what the lock of a deleted group left behind (a group id is never
        reused, so no later writer needs it)."""


class FileLocks:
    """:class:`Locks` as ``flock`` on ``<directory>/<name>.lock`` (one host)."""

    def __init__(self, directory: Path):
        self.directory = directory

    def path(self, name: str) -> Path:
        """The lock file of a group id (checked: it comes from the catalogue or from
        ``data/``), or of ``budget`` / ``store``."""
        if name not in ("budget", "store"):
            check_gid(name)
        return self.directory / f"{name}.lock"

    def hold(self, name: str, *, wait: bool = True,
             shared: bool = False) -> AbstractContextManager[bool]:
        return file_lock(self.path(name), wait=wait, shared=shared)

    def confirm(self, session: Any) -> None:
        """An flock is held until its descriptor closes: it cannot be lost."""

    def forget(self, name: str) -> None:
        # a process still waiting on the old file finds the group gone once it holds it
        with contextlib.suppress(OSError):
            self.path(name).unlink()
