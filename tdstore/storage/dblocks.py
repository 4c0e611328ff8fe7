""":class:`~tdstore.storage.locks.Locks` held in a PostgreSQL server: advisory locks.

With a catalogue on PostgreSQL, every process that reaches the server takes its turns
there, whatever host it runs on and whether or not the hosts share a file system. Each
held lock is a session-level advisory lock on a connection of its own, taken out of the
pool for as long as the lock is held: the server releases it when the holder unlocks,
and also when the holder's connection ends (a crashed or killed process never leaves a
lock behind). Keys are 64-bit hashes of ``tdstore:<name>``; advisory locks are scoped to
the database, and a database holds the catalogue of one store.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from tdstore.core.errors import StorageError
from tdstore.core.ids import check_gid


def lock_key(name: str) -> int:
    """The advisory lock key of ``name``: a signed 64-bit int, the same in every process."""
    digest = hashlib.blake2b(f"tdstore:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class AdvisoryLocks:
    """:class:`~tdstore.storage.locks.Locks` as PostgreSQL advisory locks."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._held = threading.local()  # name -> (key, backend pid), per thread

    def _mine(self) -> dict[str, tuple[int, int]]:
        held = getattr(self._held, "locks", None)
        if held is None:
            held = self._held.locks = {}
        return held

    @contextlib.contextmanager
    def hold(self, name: str, *, wait: bool = True, shared: bool = False) -> Iterator[bool]:
        if name not in ("budget", "store"):
            check_gid(name)
        key = lock_key(name)
        kind = "_shared" if shared else ""
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            if wait:
                conn.execute(text(f"SELECT pg_advisory_lock{kind}(:k)"), {"k": key})
            elif not conn.execute(text(f"SELECT pg_try_advisory_lock{kind}(:k)"),
                                  {"k": key}).scalar():
                yield False
                return
            mine = self._mine()
            outer = mine.get(name)
            mine[name] = (key, int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one()))
            try:
                yield True
            finally:
                if outer is None:
                    mine.pop(name, None)
                else:
                    mine[name] = outer
                # a connection that broke meanwhile has lost the lock with its session
                with contextlib.suppress(Exception):
                    conn.execute(text(f"SELECT pg_advisory_unlock{kind}(:k)"), {"k": key})

    def confirm(self, session: Any) -> None:
        """In a commit's transaction: every lock this thread holds is still held by the
        session that took it. A lock's session can end under its holder (a server
        restart, a killed backend): then another process may hold the lock now, and the
        commit is refused (the caller's transaction rolls back)."""
        for name, (key, pid) in self._mine().items():
            hi, lo = (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF
            held = session.execute(text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid = :pid AND classid = :hi AND objid = :lo AND objsubid = 1"),
                {"pid": pid, "hi": hi, "lo": lo}).scalar_one()
            if not held:
                raise StorageError(
                    f"the catalogue's lock {name!r} was lost while held (its database "
                    "session ended: a server restart or a terminated backend); nothing "
                    "was committed")

    def forget(self, name: str) -> None:
        """Advisory locks leave nothing behind."""
