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
