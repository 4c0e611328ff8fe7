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
from collections.abc import Iterator

from sqlalchemy import text
from sqlalchemy.engine import Engine

from tdstore.core.ids import check_gid


def lock_key(name: str) -> int:
    """The advisory lock key of ``name``: a signed 64-bit int, the same in every process."""
    digest = hashlib.blake2b(f"tdstore:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class AdvisoryLocks:
    """:class:`~tdstore.storage.locks.Locks` as PostgreSQL advisory locks."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @contextlib.contextmanager
    def hold(self, name: str, *, wait: bool = True) -> Iterator[bool]:
        if name not in ("budget", "store"):
            check_gid(name)
        key = lock_key(name)
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            if wait:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            elif not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                yield False
                return
            try:
                yield True
            finally:
                # a connection that broke meanwhile has lost the lock with its session
                with contextlib.suppress(Exception):
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})

    def forget(self, name: str) -> None:
        """Advisory locks leave nothing behind."""
