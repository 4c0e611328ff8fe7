"""The catalogue: SQLAlchemy models, engine setup and the migration runner.

The catalogue is the single source of truth for what exists in a store. Array data that
no row references is garbage. By default it is a SQLite file in WAL mode next to the
data; any SQLAlchemy URL can replace it.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from tdstore.core.errors import SchemaError
from tdstore.core.forking import renew_after_fork

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.pool import ConnectionPoolEntry

# Settings applied to every SQLite connection. synchronous=FULL makes a commit durable
# across power loss; WAL lets readers proceed while one writer commits.
SQLITE_PRAGMAS = {
    "journal_mode": "WAL",
    "synchronous": "FULL",
    "foreign_keys": "ON",
}
BUSY_TIMEOUT_S = 60.0
# a best-effort access record gives up after this long when a writer holds the lock
TOUCH_BUSY_MS = 20


class Base(DeclarativeBase):
    pass


class MetaRow(Base):
    """Store-wide settings and facts (tdstore version that created it, size budget...)."""

    __tablename__ = "store_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String)


class GroupRow(Base):
    """Agents that share one master. The array layout is fixed by the first master."""

    __tablename__ = "groups"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, unique=True)
    gid: Mapped[str] = mapped_column(String(32), unique=True)  # directory name under data/
    diff_threshold: Mapped[float] = mapped_column(Float)
    allow_nonfinite: Mapped[bool] = mapped_column(Boolean, default=False)
    compressor: Mapped[str | None] = mapped_column(String(32), nullable=True)
    chunk_blocks: Mapped[int | None] = mapped_column(Integer, nullable=True)  # most per chunk
    dtype: Mapped[str | None] = mapped_column(String(32), nullable=True)
    block_shape: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    n_blocks: Mapped[int] = mapped_column(Integer, default=0)
    kv_layout: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class AgentRow(Base):
    """One agent: the group's master (full blocks) or a mirror (its differing blocks)."""

    __tablename__ = "agents"
    __table_args__ = (
        UniqueConstraint("group_id", "name"),
        Index(
            "ix_agents_one_master",
            "group_id",
            unique=True,
            sqlite_where=text("role = 'master'"),
            postgresql_where=text("role = 'master'"),
        ),
        Index("ix_agents_name", "name"),  # keyed chunks are found by name (migration 0006)
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("groups.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String)
    role: Mapped[str] = mapped_column(String(8))  # "master" | "mirror"
    # array path relative to data/: the master's blocks, or a mirror's own differing
    # blocks; None for a mirror identical to the master.
    array: Mapped[str | None] = mapped_column(String, nullable=True)
    chunk_blocks: Mapped[int | None] = mapped_column(Integer, nullable=True)  # of `array`
    n_diff: Mapped[int] = mapped_column(Integer, default=0)
    nbytes: Mapped[int] = mapped_column(BigInteger, default=0)  # bytes on disk of `array`
    status: Mapped[str] = mapped_column(String(16), default="ok")
    attrs: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    last_access: Mapped[float] = mapped_column(Float)
    # crc32c of each chunk of `array` as decoded (binds every chunk to its array and
    # position) and of the diff index (block indices in slot order, int64 little endian);
    # None for rows written before schema 0004
    chunk_crcs: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    index_crc: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class DiffBlockRow(Base):
    """The diff-block index of a mirror: block ``block_index`` is stored at ``slot``."""

    __tablename__ = "diff_blocks"
    agent_id: Mapped[int] = mapped_column(
        ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True
    )
    block_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    slot: Mapped[int] = mapped_column(Integer)


class NullStatsRow(Base):
    """Cached null-adapter statistics (tdstore.analysis.nullstats), keyed by a stable hash."""

    __tablename__ = "null_stats"
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_json: Mapped[str] = mapped_column(Text)
    schema_version: Mapped[int] = mapped_column(Integer)
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class PendingRow(Base):
    """The journal: data put down under ``data/`` that no agent row references yet
    (``kind`` "write": a write in progress, or an append to a live master) or any more
    ("remove": replaced data whose removal follows the commit). Its bytes count against
    the size budget until the row goes, and a row left by a crash marks garbage that is
    collected under the group's lock (no live writer holds it then)."""

    __tablename__ = "pending"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    gid: Mapped[str] = mapped_column(String(32), index=True)
    path: Mapped[str] = mapped_column(String)
    kind: Mapped[str] = mapped_column(String(16))
    nbytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)


def _first_line(exc: object) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def now() -> float:
    return time.time()


def delete_agents(session: Session, ids: Sequence[int]) -> None:
    """Delete agent rows and their diff indexes (the one place agents are deleted)."""
    if not ids:
        return
    session.execute(delete(DiffBlockRow).where(DiffBlockRow.agent_id.in_(list(ids))))
    session.execute(delete(AgentRow).where(AgentRow.id.in_(list(ids))))


def _sqlite_engine(url: str, readonly: bool, foreign_keys: bool = True, **kw: Any) -> Engine:
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S}, **kw)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own handling
        # would start transactions lazily and as DEFERRED).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        for key, value in SQLITE_PRAGMAS.items():
            if (readonly and key == "journal_mode") or (key == "foreign_keys"
                                                        and not foreign_keys):
                continue
            cur.execute(f"PRAGMA {key} = {value}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A writer takes the write lock at BEGIN, so it waits on the busy timeout
        # instead of failing with "database is locked" when upgrading a read lock.
        options = conn.get_execution_options()
        if options.get("tdstore_nowait"):
            # best-effort bookkeeping (access times): give up quickly if busy, and skip
            # the fsync at commit (WAL + NORMAL: lost only by a power cut, never torn)
            conn.exec_driver_sql(f"PRAGMA busy_timeout = {TOUCH_BUSY_MS}")
            conn.exec_driver_sql("PRAGMA synchronous = NORMAL")
        elif options.get("tdstore_write"):
            conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            # journal rows (tdstore.ops.journal) need no fsync of their own: the commit that
            # follows them fsyncs the WAL, theirs included
            sync = "NORMAL" if options.get("tdstore_lazy") else SQLITE_PRAGMAS["synchronous"]
            conn.exec_driver_sql(f"PRAGMA synchronous = {sync}")
        if options.get("tdstore_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    return engine


def make_engine(url: str, *, readonly: bool = False, foreign_keys: bool = True) -> Engine:
    """An engine for the catalogue at ``url`` with tdstore's connection settings."""
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    from tdstore.core.errors import InvalidInputError

    try:
        return _make_engine(url, readonly, foreign_keys)
    except (ArgumentError, NoSuchModuleError, ModuleNotFoundError) as exc:
        hint = " (pip install 'tdstore[postgres]')" if "psycopg" in str(exc) else ""
        raise InvalidInputError(
            f"catalogue URL {url[:200]!r} cannot be used ({exc}){hint}; expected "
            "sqlite:///PATH or postgresql+psycopg://USER@HOST/DATABASE") from None


def _make_engine(url: str, readonly: bool, foreign_keys: bool) -> Engine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url, readonly, foreign_keys)
    # a held advisory lock keeps a connection of its own (tdstore.storage.dblocks):
    # room for a group lock, the budget lock and sessions of every thread
    return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=56,
                         pool_timeout=BUSY_TIMEOUT_S)


def sqlite_url(path: Path, *, readonly: bool = False, immutable: bool = False) -> str:
    if not readonly:
        return f"sqlite:///{path}"
    flags = "mode=ro&immutable=1" if immutable else "mode=ro"
    return f"sqlite:///file:{path}?{flags}&uri=true"


class Catalog:
    """The catalogue of one store: an engine plus transaction helpers.

    ``unwritable_file``: a SQLite catalogue in a directory this process cannot write.
    SQLite must create the ``-shm`` file to read a WAL database, so while no writer has
    left a WAL file the catalogue is opened ``immutable`` (with a fresh connection for
    each transaction, which therefore sees the database file as it is now), and while a
    WAL file holds transactions, read-only through the writer's ``-shm`` file: either
    way a reader sees later commits.
    """

    def __init__(self, url: str, *, readonly: bool = False,
                 unwritable_file: Path | None = None):
        self.url = url
        self.readonly = readonly
        self.unwritable_file = unwritable_file
        if unwritable_file is not None:
            from sqlalchemy.pool import NullPool

            self.url = sqlite_url(unwritable_file, readonly=True)
            self._immutable = _sqlite_engine(
                sqlite_url(unwritable_file, readonly=True, immutable=True), True,
                poolclass=NullPool)
            self.engine = self._immutable
            self._wal_engine: Engine | None = None
        else:
            self.engine = make_engine(url, readonly=readonly)
        self._version_conn: Any = None
        self._version_epoch = 0
        self._version_lock = threading.Lock()
        renew_after_fork(self)

    def _after_fork_in_child(self) -> None:
        # SQLite connections must not cross a fork: the child gets fresh ones, and
        # leaves the parent's alone (close=False) instead of closing them under it
        self.engine.dispose(close=False)
        self._version_conn = None  # the parent's, left open for it
        self._version_lock = threading.Lock()  # perhaps held at the fork by a thread

    @property
    def counts_changes(self) -> bool:
        """Whether :meth:`change_counter` gives numbers (else it gives None)."""
        return self.dialect == "sqlite" and self.unwritable_file is None

    def change_counter(self) -> int | None:
        """A number that differs from the one returned before whenever anything may have
        been committed to the catalogue in between, by any connection of any process
        (SQLite's ``PRAGMA data_version`` on a connection kept for it, which never
        writes); None where there is none to go by (PostgreSQL; a catalogue opened
        without a writer's files): the caller must query. One statement, no
        transaction: for caches of what a query found (see tdstore.api.chunks)."""
        if not self.counts_changes:
            return None
        with self._version_lock:
            try:
                cur = self._version_connection().cursor()
                try:
                    cur.execute("PRAGMA data_version")
                    return (self._version_epoch << 40) + int(cur.fetchone()[0])
                finally:
                    cur.close()
            except Exception:  # no answer: the caller queries
                self._drop_version_conn()
                return None

    def _version_connection(self) -> Any:
        """The connection change_counter reads from (under ``_version_lock``)."""
        if self._version_conn is None:
            # a new connection counts on its own: numbers of the one before must never
            # match its numbers
            self._version_conn = self.engine.raw_connection()
            self._version_epoch += 1
        return self._version_conn

    def _touch_uncounted(self, ids: list[int], t: float, busy_ms: int) -> bool:
        """SQLite: record accesses on the connection :meth:`change_counter` reads, whose
        own commits do not move its ``data_version`` (it counts other connections'): a
        read's access record then never ends what lookups kept (tdstore.api.chunks),
        while every other commit, of this process or another, still does. Best effort,
        like :meth:`touch`: skipped when the write lock is busy. Returns False when no
        such connection is open (nothing kept to protect: the caller updates as usual)."""
        with self._version_lock:
            if self._version_conn is None:
                return False
            try:
                cur = self._version_conn.cursor()
            except Exception:
                self._drop_version_conn()
                return True
            try:
                cur.execute(f"PRAGMA busy_timeout = {int(busy_ms)}")
                cur.execute("PRAGMA synchronous = NORMAL")  # as touch: no fsync of its own
                cur.execute("BEGIN IMMEDIATE")
            except sqlite3.Error:  # "database is locked": a writer is busy
                cur.close()
                return True
            try:
                for i in range(0, len(ids), 500):
                    part = ids[i : i + 500]
                    cur.execute(f"UPDATE {AgentRow.__tablename__} SET last_access = ? "
                                f"WHERE id IN ({', '.join('?' * len(part))})", [t, *part])
                cur.execute("COMMIT")
            except sqlite3.Error:
                try:
                    cur.execute("ROLLBACK")
                except sqlite3.Error:
                    self._drop_version_conn()
            finally:
                cur.close()
        return True

    def _drop_version_conn(self) -> None:
        conn, self._version_conn = self._version_conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def _read_engine(self) -> Engine:
        if self.unwritable_file is None:
            return self.engine
        wal = self.unwritable_file.with_name(self.unwritable_file.name + "-wal")
        try:
            live = wal.stat().st_size > 0
        except FileNotFoundError:
            live = False
        if not live:
            return self._immutable
        if self._wal_engine is None:
            self._wal_engine = make_engine(self.url, readonly=True)
        return self._wal_engine

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    @property
    def where(self) -> str:
        """The catalogue's URL without its password, for messages."""
        return self.engine.url.render_as_string(hide_password=True)

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A read transaction (a consistent snapshot: on PostgreSQL, REPEATABLE READ)."""
        with self.errors():
            with self._read_engine().connect() as conn:
                if self.dialect == "postgresql":
                    conn = conn.execution_options(isolation_level="REPEATABLE READ",
                                                  postgresql_readonly=True)
                with Session(bind=conn, expire_on_commit=False) as session, session.begin():
                    yield session

    @contextlib.contextmanager
    def write(self, *, lazy: bool = False) -> Iterator[Session]:
        """A write transaction: committed on exit, rolled back on error. ``lazy``
        commits without an fsync of its own (bookkeeping a later commit makes durable)."""
        with self.errors():
            with self.engine.connect() as conn:
                conn = conn.execution_options(tdstore_write=True, tdstore_lazy=lazy)
                with Session(bind=conn, expire_on_commit=False) as session, session.begin():
                    yield session

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Database failures as tdstore errors: a damaged catalogue is CorruptionError,
        a full or failing disk under a commit is StorageError (the transaction is rolled
        back, so the catalogue is as it was)."""
        from sqlalchemy.exc import DatabaseError, OperationalError

        from tdstore.core.errors import CorruptionError, StorageError

        try:
            yield
        except OperationalError as exc:
            if self.dialect != "sqlite":
                raise StorageError(
                    f"catalogue {self.where}: the database server cannot be reached or "
                    f"closed the connection ({_first_line(exc.orig)}); the operation was "
                    "cut: a write either committed whole or not at all (read again to see "
                    "which); the next call reconnects") from exc
            self._sqlite_error(exc)
            raise
        except json.JSONDecodeError as exc:  # a JSON column holds something else
            raise CorruptionError(
                f"catalogue {self.url}: a JSON column holds malformed JSON ({exc}); "
                "`tdstore verify` names the rows it can read") from exc
        except DatabaseError as exc:
            self._sqlite_error(exc)
            raise

    def _sqlite_error(self, exc: Exception) -> None:
        """Raise the tdstore error a SQLite failure means, if it means one."""
        from tdstore.core.errors import CorruptionError, StorageError

        orig = getattr(exc, "orig", None)
        text = str(orig if orig is not None else exc).lower()
        if "malformed" in text or "not a database" in text or "corrupt" in text:
            raise CorruptionError(
                f"catalogue {self.url}: damaged ({orig}); restore it from a backup "
                "or a copy") from exc
        if "no such table" in text or "no such column" in text:
            raise CorruptionError(
                f"catalogue {self.url}: a table or column of the schema is missing ({orig}); "
                "restore it from a backup") from exc
        if "unable to open database file" in text:
            raise StorageError(f"catalogue {self.url}: cannot be opened ({orig})") from exc
        if "disk is full" in text or "disk i/o error" in text or "readonly" in text \
                or "read-only" in text:
            raise StorageError(
                f"catalogue {self.url}: the commit failed ({orig}); nothing was "
                "committed") from exc

    def get_meta(self, key: str) -> str | None:
        with self.read() as s:
            row = s.get(MetaRow, key)
            return row.value if row else None

    def touch(self, accessed: dict[int, float], resolution: float, *,
              wait: bool = False) -> None:
        """Record an access of these agent rows, if their last one is older than
        ``resolution`` seconds. Best effort: skipped when the writer lock is busy, unless
        ``wait`` (then it waits for the lock as a write does)."""
        from sqlalchemy import update
        from sqlalchemy.exc import OperationalError

        t = now()
        stale = [i for i, last in accessed.items()
                 if not isinstance(last, (int, float)) or t - last >= resolution]
        if not stale:
            return
        if self.counts_changes and self._touch_uncounted(
                stale, t, int(BUSY_TIMEOUT_S * 1000) if wait else TOUCH_BUSY_MS):
            return
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(tdstore_write=True, tdstore_nowait=not wait)
                with conn.begin():
                    if self.dialect == "postgresql" and not wait:  # a writer holds the
                        conn.exec_driver_sql("SET LOCAL lock_timeout = '50ms'")  # rows
                    conn.execute(update(AgentRow).where(AgentRow.id.in_(stale))
                                 .values(last_access=t))
        except OperationalError:
            pass  # "database is locked": a writer is busy; the next read records it

    def close(self) -> None:
        with self._version_lock:
            self._drop_version_conn()
        self.engine.dispose()
        if self.unwritable_file is not None and self._wal_engine is not None:
            self._wal_engine.dispose()


# ---------------------------------------------------------------------------- migrations


def migrations_dir() -> Path:
    """The Alembic script directory: inside the installed package, or the source tree."""
    try:
        return Path(str(resources.files("tdstore.migrations")))
    except ModuleNotFoundError:  # running from a source checkout without installing
        return source_migrations_dir()


def source_migrations_dir() -> Path:
    """``migrations/`` of the source checkout this module lies in (tdstore/storage/)."""
    return Path(__file__).resolve().parents[2] / "migrations"


def _alembic_config(catalog: Catalog) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", catalog.url.replace("%", "%%"))
    return cfg


def schema_status(catalog: Catalog) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(current revisions of the catalogue, head revisions this tdstore knows)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config(catalog))
    with catalog._read_engine().connect() as conn:
        current = MigrationContext.configure(conn).get_current_heads()
    return tuple(current), tuple(script.get_heads())


def known_revisions(catalog: Catalog) -> set[str]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config(catalog))
    return {rev.revision for rev in script.walk_revisions()}


def check_not_newer(catalog: Catalog, where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Refuse a catalogue whose schema revision this tdstore does not know."""
    current, heads = schema_status(catalog)
    unknown = set(current) - known_revisions(catalog)
    if unknown:
        raise SchemaError(
            f"store {where}: catalogue schema revision {', '.join(sorted(unknown))} is newer "
            f"than this tdstore knows (latest {', '.join(heads)}); upgrade tdstore to open it"
        )
    return current, heads


def upgrade(catalog: Catalog, revision: str = "head") -> None:
    """Upgrade (or downgrade, for a revision below the current one) the schema."""
    from alembic import command

    cfg = _alembic_config(catalog)
    current, _ = schema_status(catalog)
    # SQLite rebuilds a table to alter it; with foreign keys on, dropping the old table
    # would cascade into the rows that reference it (the diff-block index)
    engine = make_engine(catalog.url, foreign_keys=False)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            if revision != "head" and current and revision in _ancestors(catalog, current[0]):
                command.downgrade(cfg, revision)
            else:
                command.upgrade(cfg, revision)
            if conn.dialect.name == "sqlite":
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise SchemaError(f"catalogue {catalog.url}: migration to {revision} left "
                                      f"{len(broken)} rows with broken references; rolled back")
    finally:
        engine.dispose()


def _ancestors(catalog: Catalog, revision: str) -> set[str]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config(catalog))
    return {rev.revision for rev in script.iterate_revisions(revision, "base")} - {revision}
