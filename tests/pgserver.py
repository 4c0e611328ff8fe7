"""A real PostgreSQL server for the tests: ``initdb`` and ``pg_ctl`` from the machine's
PostgreSQL (Debian's ``postgresql`` package; ``.ci/run`` installs it), in a temporary
directory, listening on a unix socket only (no TCP port), with fsync off (the tests
crash processes, not the server's machine). Started once per test session (about 2 s);
every test gets a database of its own."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path


def _find() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("pg_ctl")
    return Path(os.path.realpath(found)).parent if found else None


def _bindir() -> Path:
    """The server binaries; on a machine without them, as root with apt (a fresh Debian
    machine running README's test command), Debian's postgresql package is installed."""
    found = _find()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env,
                       timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], capture_output=True,
                       env=env, timeout=900)
        found = _find()
    if found is None:
        raise RuntimeError("PostgreSQL server binaries not found (initdb, pg_ctl): install "
                           "Debian's postgresql package (`apt-get install -y postgresql`)")
    return found


class PgServer:
    def __init__(self) -> None:
        self.bindir = _bindir()
        self.root = Path(tempfile.mkdtemp(prefix="tdstore-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root
        # the server refuses to run as root: run it as the postgres user then
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)

    def start(self) -> PgServer:
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--no-sync")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-o",
                  f"-k {self.socket_dir} -c listen_addresses='' -c fsync=off "
                  "-c max_connections=300 -c full_page_writes=off", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop("immediate")
        self.start()

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.socket_dir}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host=str(self.socket_dir), user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
