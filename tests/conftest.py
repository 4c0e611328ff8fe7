from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np
import pytest

import tdstore


@pytest.fixture
def store(tmp_path: Path):
    with tdstore.open(tmp_path / "store") as s:
        yield s


def fingerprint(path: Path) -> tuple[dict, dict]:
    """Everything a store holds: every catalogue row and every file's content hash."""
    rows: dict = {}
    con = sqlite3.connect(f"file:{path / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for t in tables:
            rows[t] = sorted(map(repr, con.execute(f'SELECT * FROM "{t}"')))
    except sqlite3.DatabaseError as exc:  # a damaged catalogue: compare the files only
        rows = {"unreadable": str(exc)}
    finally:
        con.close()
    files = {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.parent.name != "locks" and not p.name.startswith("catalog.sqlite")
    }
    return rows, files


def kv(n_blocks: int = 32, block=(4, 8), dtype="float32", seed: int = 0) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((n_blocks, *block), np.float32)
    return a.astype(dtype)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def head_revision() -> str:
    """The newest catalogue schema revision this tdstore knows."""
    from alembic.script import ScriptDirectory

    from tdstore.storage.catalog import migrations_dir

    return ScriptDirectory(str(migrations_dir())).get_current_head()


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server for this test session (see tests/pgserver.py)."""
    from pgserver import PgServer

    server = PgServer().start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_url(pg_server) -> str:
    """The SQLAlchemy URL of a fresh database on the session's PostgreSQL server."""
    return pg_server.new_database()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1 for this session (tests/s3server.py)."""
    from s3server import S3Server

    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """The AWS_* variables of the session's S3 server, a fresh bucket, and a chunk cache
    of this test's own; returns the bucket's name."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TDSTORE_CACHE_DIR", str(tmp_path / "chunk-cache"))
    return s3_server.new_bucket()


class Backend:
    """Where a test's stores live: ``local`` (a directory and its SQLite catalogue),
    ``pg`` (a directory, the catalogue on PostgreSQL) or ``s3`` (an S3 bucket, the
    catalogue on PostgreSQL). Each store name gets a catalogue of its own."""

    def __init__(self, kind: str, tmp: Path, pg=None, s3=None, bucket: str | None = None):
        self.kind, self.tmp, self.pg, self.s3, self.bucket = kind, tmp, pg, s3, bucket
        self.urls: dict[str, str] = {}

    def location(self, name: str = "store") -> str:
        return f"s3://{self.bucket}/{name}" if self.kind == "s3" else str(self.tmp / name)

    def url(self, name: str = "store") -> str | None:
        if self.kind == "local":
            return None
        if name not in self.urls:
            self.urls[name] = self.pg.new_database()
        return self.urls[name]

    def open(self, name: str = "store", **kw):
        return tdstore.open(self.location(name), url=self.url(name), **kw)

    def env(self, name: str = "store") -> dict[str, str]:
        """Environment for a subprocess (the command line or a script) on this store."""
        import os

        env = dict(os.environ)
        if self.url(name):
            env["TDSTORE_URL"] = self.url(name) or ""
        if self.s3 is not None:
            env.update(self.s3.env())
        return env


@pytest.fixture(params=["local", "pg", "s3"])
def backend(request, tmp_path):
    """Each store test that takes this runs on local+SQLite, local+PostgreSQL and
    S3+PostgreSQL."""
    kind = request.param
    if kind == "local":
        return Backend(kind, tmp_path)
    pg = request.getfixturevalue("pg_server")
    if kind == "pg":
        return Backend(kind, tmp_path, pg)
    bucket = request.getfixturevalue("s3_env")
    return Backend(kind, tmp_path, pg, request.getfixturevalue("s3_server"), bucket)
