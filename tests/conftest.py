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

    # -- the stored data itself, read and damaged directly (not through tdstore) --------

    def _raw(self):
        return self.s3.raw_store(self.bucket)

    def _key(self, name: str, rel: str) -> str:
        return f"{name}/data/{rel}"

    def files(self, name: str = "store") -> dict[str, int]:
        """Every file (object) under the store's data/, relative to data/: its size."""
        if self.kind != "s3":
            root = self.tmp / name / "data"
            return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")
                    if p.is_file() and not p.is_symlink()}
        import obstore

        prefix = f"{name}/data/"
        return {o["path"][len(prefix):]: o["size"] for batch in obstore.list(self._raw(), prefix)
                for o in batch}

    def data_bytes(self, name: str = "store") -> int:
        return sum(self.files(name).values())

    def read(self, rel: str, name: str = "store") -> bytes:
        if self.kind != "s3":
            return (self.tmp / name / "data" / rel).read_bytes()
        import obstore

        return bytes(obstore.get(self._raw(), self._key(name, rel)).bytes())

    def write(self, rel: str, data: bytes, name: str = "store") -> None:
        if self.kind != "s3":
            p = self.tmp / name / "data" / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            return
        import obstore

        obstore.put(self._raw(), self._key(name, rel), data)

    def delete(self, rel: str, name: str = "store") -> None:
        if self.kind != "s3":
            (self.tmp / name / "data" / rel).unlink()
            return
        import obstore

        obstore.delete(self._raw(), self._key(name, rel))

    def exists(self, rel: str, name: str = "store") -> bool:
        """Whether the file, or any file below the directory, ``data/<rel>`` exists."""
        return any(k == rel or k.startswith(rel + "/") for k in self.files(name))

    @staticmethod
    def array_of(store, group: str, agent: str) -> str:
        """The array path (relative to data/) of an agent, from the catalogue."""
        from sqlalchemy import text

        with store.catalog.read() as s:
            return s.execute(text(
                "SELECT a.array FROM agents a JOIN groups g ON a.group_id = g.id "
                "WHERE g.name = :g AND a.name = :a"), {"g": group, "a": agent}).scalar_one()

    def sql(self, statement: str, name: str = "store", **params) -> None:
        """Run one SQL statement on the store's catalogue directly (tests that damage it)."""
        from sqlalchemy import create_engine, text

        from tdstore.storage.catalog import sqlite_url

        url = self.url(name) or sqlite_url(self.tmp / name / "catalog.sqlite")
        engine = create_engine(url)
        with engine.begin() as con:
            con.execute(text(statement), params)
        engine.dispose()

    def fingerprint(self, name: str = "store") -> tuple[dict, dict]:
        """Every catalogue row and every stored file's content hash (as ``fingerprint``)."""
        if self.kind == "local":
            return fingerprint(self.tmp / name)
        from sqlalchemy import MetaData, create_engine, select

        engine = create_engine(self.url(name))
        rows: dict = {}
        try:
            meta = MetaData()
            meta.reflect(engine)
            with engine.connect() as con:
                for t in meta.sorted_tables:
                    rows[t.name] = sorted(map(repr, con.execute(select(t))))
        finally:
            engine.dispose()
        files = {rel: hashlib.sha256(self.read(rel, name)).hexdigest()
                 for rel in sorted(self.files(name))}
        return rows, files

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
