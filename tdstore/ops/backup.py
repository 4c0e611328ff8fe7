"""A consistent online backup of a store that other processes may be writing to.

The catalogue is the single source of truth, so a backup is one catalogue snapshot plus
exactly the array data that snapshot references:

1. the catalogue is copied with SQLite's online backup API (one consistent snapshot,
   taken while writers go on);
2. every array the copy references is copied (``zarr.json`` plus the chunk files that
   hold its committed blocks), with the group and root ``zarr.json`` files. Committed
   arrays are immutable, except a master that ``collective_reuse_step`` appends to: it
   only adds chunk files past the committed length and atomically replaces the last
   chunk with one holding the same committed blocks, so any version of a file read here
   holds the blocks the snapshot committed;
3. a referenced array can vanish while it is copied (a writer replaced it, committed, and
   removed the old one). Then a fresh snapshot is taken, what it references that is not
   copied yet is copied, and what it no longer references is removed from the
   destination; this repeats until one snapshot is complete (at most ``MAX_ROUNDS``);
4. everything is fsynced, the catalogue copy is moved into place, and the result is
   opened with :func:`tdstore.open` and verified before the backup is reported.

Nothing is written into the source: its catalogue is read through a read-only
connection and its files are only opened for reading, never through a symbolic link.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import sqlite3
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tdstore.core.errors import CorruptionError, InvalidInputError, StorageError
from tdstore.core.ids import ARRAY_RE, GID_RE
from tdstore.core.location import is_object_url
from tdstore.ops import maintenance
from tdstore.ops.context import CATALOG_FILE, DATA_DIR, LOCK_DIR, StoreContext
from tdstore.storage.arrays import NOT_A_FILE, fsync_dir, fsync_file

Progress = Callable[[int, int, str], None]  # (done, total, what)

META_FILE = "zarr.json"
MAX_ROUNDS = 20
ARRAY_PATH = ARRAY_RE
GROUP_ID = GID_RE
COPY_BLOCK = 1 << 20
MAX_OBJECT_BYTES = 1 << 32  # no chunk object of any layout is larger

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class _Vanished(Exception):
    """A file of a referenced array is gone: a writer replaced and removed it (or the
    source is damaged, which the next snapshot tells apart)."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


@dataclass(frozen=True)
class _ArrayRef:
    """An array a catalogue snapshot references, and the files its committed rows use."""

    path: str  # relative to data/
    rows: int  # committed rows (master: the group's n_blocks; mirror: n_diff)
    chunk_blocks: int
    key_suffix: str  # ".0" per block dimension: chunk files are "c.<i>" + key_suffix
    is_master: bool
    owner: str  # "group 'g' agent 'a'", for messages

    @property
    def gid(self) -> str:
        return self.path.split("/", 1)[0]

    def chunk_names(self, start: int = 0) -> list[str]:
        """The chunk files holding committed rows ``[start, rows)``."""
        if self.rows <= start:
            return []
        first, last = start // self.chunk_blocks, (self.rows - 1) // self.chunk_blocks
        return [f"c.{c}{self.key_suffix}" for c in range(first, last + 1)]


@dataclass
class _Snapshot:
    groups: int
    agents: int
    arrays: dict[str, _ArrayRef]
    gids: set[str]  # every group's directory name (one may have no directory yet)


# --------------------------------------------------------------------------- entry point


def backup(source_path: str | os.PathLike[str], dest_path: str | os.PathLike[str], *,
           progress: Progress | None = None, url: str | None = None,
           storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy the store at ``source_path`` to the new directory ``dest_path``, consistently,
    while other processes may be writing to the source.

    The source may be any store: a directory with its SQLite catalogue, or with the
    catalogue at ``url`` (PostgreSQL), or an object-store location (``s3://...``) with
    its PostgreSQL catalogue. The copy is always a self-contained local store (a
    directory with ``catalog.sqlite``), opened by ``tdstore.open(dest_path)``.

    The copy holds exactly one catalogue snapshot of the source and the data it
    references; it is fsynced and verified (``verify()`` finds no damage) before this
    returns. ``dest_path`` must not exist or be an empty directory. ``progress`` is
    called as ``progress(done, total, what)`` before each array is copied.

    Returns a report: groups, agents, arrays, files, bytes, rounds (catalogue snapshots
    taken), seconds. Raises InvalidInputError for a bad destination, NotFoundError /
    SchemaError for a source that is not a store this tdstore can read, CorruptionError
    for a damaged source (or a copy that fails verification), StorageError when writers
    kept replacing data for ``MAX_ROUNDS`` snapshots or the copy could not be written.
    On failure, the destination directory this call created is removed again.
    """
    t0 = time.monotonic()
    dest = Path(dest_path).absolute()
    src: Path | str
    if is_object_url(source_path):
        src = str(source_path)
    else:
        src = Path(source_path).absolute()
        _check_source(src)
    source = StoreContext(src, readonly=True, create=False, url=url,
                          storage_options=storage_options)
    try:
        created = _prepare_dest(src, dest)
        try:
            report = _Backup(source, dest, progress).run()
            _verify_copy(dest)
        except BaseException as exc:
            _discard(dest, created)
            if isinstance(exc, OSError) and not isinstance(exc, (CorruptionError,
                                                                   StorageError)):
                raise StorageError(f"backup of {source.path} to {dest} failed ({exc}); what "
                                   "it had written there was removed") from exc
            raise
    finally:
        source.close()
    report.update(source=str(source.path), destination=str(dest),
                  seconds=round(time.monotonic() - t0, 3))
    return report


def _check_source(src: Path) -> None:
    for name in (CATALOG_FILE, DATA_DIR):
        try:
            mode = os.lstat(src / name).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue  # opening the store says what is wrong
        ok = stat.S_ISREG(mode) if name == CATALOG_FILE else stat.S_ISDIR(mode)
        if not ok:
            raise CorruptionError(f"store {src}: {name} is a symbolic link or not a "
                                  f"{'file' if name == CATALOG_FILE else 'directory'}; "
                                  "refusing to back it up")


def _prepare_dest(src: Path | str, dest: Path) -> bool:
    """Check the destination; create it if missing. Returns whether it was created."""
    real_dest = dest.resolve()
    if isinstance(src, Path) and (real_dest == (real_src := src.resolve())
                                  or real_src in real_dest.parents):
        raise InvalidInputError(f"backup destination {dest} is inside the source store "
                                f"{src}; choose a directory outside it")
    if os.path.lexists(dest):
        if dest.is_symlink() or not dest.is_dir() or any(dest.iterdir()):
            raise InvalidInputError(f"backup destination {dest} exists and is not an empty "
                                    "directory; give a new path or an empty directory")
        return False
    if not dest.parent.is_dir():
        raise InvalidInputError(f"backup destination {dest}: the parent directory "
                                f"{dest.parent} does not exist")
    try:
        dest.mkdir()
    except FileExistsError:
        raise InvalidInputError(f"backup destination {dest} exists and is not an empty "
                                "directory; give a new path or an empty directory") from None
    return True


def _discard(dest: Path, created: bool) -> None:
    """Undo a failed backup: remove the directory it created, or empty the one it got."""
    if created:
        shutil.rmtree(dest, ignore_errors=True)
        return
    with contextlib.suppress(OSError):
        for entry in dest.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _verify_copy(dest: Path) -> None:
    copy = StoreContext(dest, create=False)
    try:
        report = maintenance.verify(copy)
    finally:
        copy.close()
    if report.damage:
        shown = "; ".join(str(f) for f in report.damage[:3])
        raise CorruptionError(f"backup at {dest}: the copy fails verification "
                              f"({len(report.damage)} finding(s): {shown}); the source is "
                              "probably damaged: run `tdstore verify` on it")


# --------------------------------------------------------------------------- the copy


class _Backup:
    def __init__(self, source: Any, dest: Path, progress: Progress | None):
        self.source = source
        self.src = source.path
        self.dest = dest
        self.progress = progress
        self.copied: dict[str, int] = {}  # array path -> committed rows copied
        self.groups_copied: set[str] = set()

    def run(self) -> dict[str, Any]:
        data = self.dest / DATA_DIR
        data.mkdir()
        (self.dest / LOCK_DIR).mkdir()
        self._copy_root_meta(data)
        vanished: dict[str, str] = {}
        for round_no in range(1, MAX_ROUNDS + 1):
            tmp = self.dest / f"{CATALOG_FILE}.tmp-{secrets.token_hex(4)}"
            snap = self._snapshot_catalog(tmp)
            for path, what in vanished.items():
                if path in snap.arrays:  # gone, yet still referenced after the fact
                    _remove_sqlite(tmp)
                    raise CorruptionError(
                        f"{what} is missing, and the catalogue still references "
                        f"data/{path} after the fact: the source is damaged (run "
                        "`tdstore verify` on it)")
            self._drop_unreferenced(snap)
            vanished = self._copy_arrays(snap, round_no)
            if not vanished:
                self._finish(tmp)
                files, nbytes = _tally(self.dest)
                return {"groups": snap.groups, "agents": snap.agents,
                        "arrays": len(snap.arrays), "files": files, "bytes": nbytes,
                        "rounds": round_no}
            _remove_sqlite(tmp)
        raise StorageError(
            f"backup of {self.src}: writers replaced referenced data during each of "
            f"{MAX_ROUNDS} catalogue snapshots; no consistent copy could be completed "
            "(retry when the store is less busy)")

    # ------------------------------------------------------------------ catalogue

    def _snapshot_catalog(self, tmp: Path) -> _Snapshot:
        """Copy the catalogue into ``tmp`` (one consistent snapshot) and read from the
        copy every array it references."""
        if self.source.catalog.dialect != "sqlite":
            return self._snapshot_server_catalog(tmp)
        raw = self.source.catalog.engine.raw_connection()
        try:
            target = sqlite3.connect(tmp)
            try:
                try:
                    raw.driver_connection.backup(target)
                except sqlite3.DatabaseError as exc:
                    text = str(exc).lower()
                    if "malformed" in text or "not a database" in text:
                        raise CorruptionError(f"store {self.src}: the catalogue is damaged "
                                              f"({exc})") from exc
                    raise StorageError(f"backup of {self.src}: copying the catalogue "
                                       f"failed ({exc})") from exc
                # the source's writes in progress and pending removals: their data is
                # not copied (only referenced arrays are), so the copy has no journal
                if target.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                  "AND name = 'pending'").fetchone():
                    target.execute("DELETE FROM pending")
                    target.commit()
                snap = _read_snapshot(target, self.src)
            finally:
                target.close()
        finally:
            raw.close()
        fsync_file(tmp)
        return snap

    def _snapshot_server_catalog(self, tmp: Path) -> _Snapshot:
        """A catalogue on a database server: every table's rows read in one snapshot
        (REPEATABLE READ) and written into a new SQLite catalogue of the same schema.
        The journal and the object-store location are not carried over (the copy holds
        only referenced data, in a directory)."""
        from sqlalchemy import delete, insert, select

        from tdstore.ops.context import LOCATION_KEY
        from tdstore.storage.catalog import Base, Catalog, MetaRow, sqlite_url, upgrade

        copy = Catalog(sqlite_url(tmp))
        try:
            upgrade(copy, "head")
            tables = [t for t in Base.metadata.sorted_tables if t.name != "pending"]
            with self.source.catalog.errors(), self.source.catalog.read() as s:
                rows = {t.name: [dict(r._mapping) for r in s.execute(select(t))]
                        for t in tables}
            with copy.engine.begin() as con:
                for t in tables:
                    for i in range(0, len(rows[t.name]), 10_000):
                        con.execute(insert(t), rows[t.name][i : i + 10_000])
                con.execute(delete(MetaRow).where(MetaRow.key == LOCATION_KEY))
        finally:
            copy.close()
        target = sqlite3.connect(tmp)
        try:
            snap = _read_snapshot(target, self.src)
        finally:
            target.close()
        fsync_file(tmp)
        return snap

    def _finish(self, tmp: Path) -> None:
        for suffix in ("-wal", "-shm", "-journal"):  # none after close; never carried over
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        os.replace(tmp, self.dest / CATALOG_FILE)
        data = self.dest / DATA_DIR
        for gid in self.groups_copied:
            fsync_dir(data / gid)
        fsync_dir(data)
        fsync_dir(self.dest / LOCK_DIR)
        fsync_dir(self.dest)
        fsync_dir(self.dest.parent)

    # ------------------------------------------------------------------ data

    def _drop_unreferenced(self, snap: _Snapshot) -> None:
        data = self.dest / DATA_DIR
        for path in [p for p in self.copied if p not in snap.arrays]:
            shutil.rmtree(data / path)
            del self.copied[path]
        live = snap.gids | {a.gid for a in snap.arrays.values()}
        for gid in [g for g in self.groups_copied if g not in live]:
            shutil.rmtree(data / gid)
            self.groups_copied.discard(gid)

    def _copy_arrays(self, snap: _Snapshot, round_no: int) -> dict[str, str]:
        """Copy what ``snap`` references that is not complete in the destination yet.
        Returns the arrays that vanished meanwhile (path -> what was missing)."""
        todo = [a for a in snap.arrays.values()
                if a.path not in self.copied or self.copied[a.path] < a.rows]
        vanished: dict[str, str] = {}
        if self.source.arrays.shared:
            return self._copy_objects(snap, todo, round_no)
        src_root = os.open(self.src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            src_data = _open_dir(DATA_DIR, src_root, f"store {self.src}: {DATA_DIR}")
        except _Vanished:
            src_data = None
        finally:
            os.close(src_root)
        try:
            for i, ref in enumerate(sorted(todo, key=lambda a: a.path)):
                if self.progress is not None:
                    self.progress(i, len(todo), f"data/{ref.path}"
                                  + (f" (snapshot {round_no})" if round_no > 1 else ""))
                try:
                    if src_data is None:
                        raise _Vanished(f"store {self.src}: {DATA_DIR}")
                    self._copy_array(src_data, ref)
                except _Vanished as exc:
                    vanished[ref.path] = exc.what
                    shutil.rmtree(self.dest / DATA_DIR / ref.path, ignore_errors=True)
                    self.copied.pop(ref.path, None)
            if src_data is not None:  # groups whose directory holds no array copied
                for gid in sorted(snap.gids - self.groups_copied):
                    with contextlib.suppress(_Vanished):
                        self._copy_group_meta(src_data, gid, f"store {self.src}")
            if self.progress is not None:
                self.progress(len(todo), len(todo), "done")
        finally:
            if src_data is not None:
                os.close(src_data)
        return vanished

    # an object-store source: the same files, fetched through its array store

    def _copy_objects(self, snap: _Snapshot, todo: list[_ArrayRef], round_no: int
                      ) -> dict[str, str]:
        vanished: dict[str, str] = {}
        data = self.dest / DATA_DIR
        for i, ref in enumerate(sorted(todo, key=lambda a: a.path)):
            if self.progress is not None:
                self.progress(i, len(todo), f"data/{ref.path}"
                              + (f" (snapshot {round_no})" if round_no > 1 else ""))
            try:
                self._copy_object_group(ref.gid)
                target = data / ref.path
                have = self.copied.get(ref.path)
                if have is None:
                    target.mkdir()
                for n in [META_FILE, *ref.chunk_names(have or 0)]:
                    self._copy_object(f"{ref.path}/{n}", target / n, replace=have is not None)
                fsync_dir(target)
                if have is None:
                    fsync_dir(data / ref.gid)
                self.copied[ref.path] = ref.rows
            except _Vanished as exc:
                vanished[ref.path] = exc.what
                shutil.rmtree(data / ref.path, ignore_errors=True)
                self.copied.pop(ref.path, None)
        for gid in sorted(snap.gids - self.groups_copied):
            with contextlib.suppress(_Vanished):
                self._copy_object_group(gid)
        if self.progress is not None:
            self.progress(len(todo), len(todo), "done")
        return vanished

    def _copy_object_group(self, gid: str) -> None:
        if gid in self.groups_copied:
            return
        gdir = self.dest / DATA_DIR / gid
        gdir.mkdir(exist_ok=True)
        try:
            self._copy_object(f"{gid}/{META_FILE}", gdir / META_FILE)
        except BaseException:
            shutil.rmtree(gdir, ignore_errors=True)
            raise
        self.groups_copied.add(gid)

    def _copy_object(self, rel: str, target: Path, *, replace: bool = False) -> None:
        try:
            body = self.source.arrays.read_object(rel, MAX_OBJECT_BYTES)
        except FileNotFoundError:
            raise _Vanished(f"store {self.src}: data/{rel}") from None

        def write(out: int) -> int:
            view = memoryview(body)
            while view:
                view = view[os.write(out, view):]
            return len(body)

        _write_file(target, write, replace=replace)

    def _copy_root_meta(self, data: Path) -> None:
        """``data/zarr.json`` (the hierarchy's root), when the source has one."""
        if self.source.arrays.shared:
            with contextlib.suppress(_Vanished):
                self._copy_object(META_FILE, data / META_FILE)
            return
        src_root = os.open(self.src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            src_data = _open_dir(DATA_DIR, src_root, f"store {self.src}: {DATA_DIR}")
        except _Vanished:
            return
        finally:
            os.close(src_root)
        try:
            _copy_file(src_data, META_FILE, data / META_FILE,
                       f"store {self.src}: {DATA_DIR}/{META_FILE}")
        except _Vanished:
            pass  # a store opened only read-only so far has none; opening the copy adds it
        finally:
            os.close(src_data)

    def _copy_group_meta(self, src_data: int, gid: str, where: str) -> None:
        """``data/<gid>/zarr.json``, once per group directory."""
        if gid in self.groups_copied:
            return
        gdir = self.dest / DATA_DIR / gid
        gfd = _open_dir(gid, src_data, f"{where}: data/{gid}")
        try:
            gdir.mkdir(exist_ok=True)
            try:
                _copy_file(gfd, META_FILE, gdir / META_FILE, f"{where}: data/{gid}/{META_FILE}")
            except BaseException:
                shutil.rmtree(gdir, ignore_errors=True)
                raise
        finally:
            os.close(gfd)
        self.groups_copied.add(gid)

    def _copy_array(self, src_data: int, ref: _ArrayRef) -> None:
        where = f"store {self.src}: {ref.owner}"
        data = self.dest / DATA_DIR
        gdir = data / ref.gid
        name = ref.path.split("/", 1)[1]
        self._copy_group_meta(src_data, ref.gid, where)
        gfd = _open_dir(ref.gid, src_data, f"{where}: data/{ref.gid}")
        try:
            afd = _open_dir(name, gfd, f"{where}: data/{ref.path}")
        finally:
            os.close(gfd)
        try:
            target = data / ref.path
            have = self.copied.get(ref.path)
            if have is None:
                target.mkdir()
            # a master that grew since it was copied: its metadata, the chunk that was
            # partly filled and the new ones. The metadata is read first: any version of
            # it read after the snapshot covers at least the rows the snapshot committed
            for n in [META_FILE, *ref.chunk_names(have or 0)]:
                _copy_file(afd, n, target / n, f"{where}: data/{ref.path}/{n}",
                           replace=have is not None)
            fsync_dir(target)
            if have is None:
                fsync_dir(gdir)
        finally:
            os.close(afd)
        self.copied[ref.path] = ref.rows


def _read_snapshot(conn: sqlite3.Connection, src: Path) -> _Snapshot:
    """Every array the catalogue copy references, validated before any becomes a path."""
    groups: dict[int, tuple[str, str, list[int] | None, int]] = {}
    for gid_row, name, gid, shape, n_blocks in conn.execute(
            "SELECT id, name, gid, block_shape, n_blocks FROM groups"):
        where = f"store {src}: catalogue row groups.id={gid_row} (group {name!r})"
        if not isinstance(gid, str) or not GROUP_ID.fullmatch(gid):
            raise CorruptionError(f"{where}: gid {gid!r} is not 16 hex digits; refusing to "
                                  "use it as a path")
        try:  # a JSON column: SQL NULL or JSON null before the first master
            block_shape = None if shape is None else json.loads(shape)
        except (TypeError, ValueError):
            block_shape = "bad"
        if block_shape is not None:
            if not (isinstance(block_shape, list) and block_shape
                    and all(isinstance(d, int) and d >= 1 for d in block_shape)):
                raise CorruptionError(f"{where}: block_shape {shape!r} is not a list of "
                                      "positive integers")
        if not isinstance(n_blocks, int) or n_blocks < 0:
            raise CorruptionError(f"{where}: n_blocks {n_blocks!r} is not an integer >= 0")
        groups[gid_row] = (name, gid, block_shape, n_blocks)
    arrays: dict[str, _ArrayRef] = {}
    n_agents = 0
    gids = {g[1] for g in groups.values()}
    for aid, group_id, name, role, array, chunk_blocks, n_diff in conn.execute(
            "SELECT id, group_id, name, role, array, chunk_blocks, n_diff FROM agents"):
        n_agents += 1
        if array is None:
            continue
        g = groups.get(group_id)
        owner = (f"group {g[0]!r} agent {name!r}" if g else f"agent {name!r}")
        where = f"store {src}: catalogue row agents.id={aid} ({owner})"
        if not isinstance(array, str) or not ARRAY_PATH.fullmatch(array):
            raise CorruptionError(f"{where}: array path {array!r} does not match "
                                  "<16 hex>/[md]-<16 hex>; refusing to use it as a path")
        if g is None or g[2] is None:
            raise CorruptionError(f"{where}: references data/{array} but its group "
                                  f"{'is missing' if g is None else 'has no block shape'}")
        if not isinstance(chunk_blocks, int) or chunk_blocks < 1:
            raise CorruptionError(f"{where}: chunk_blocks {chunk_blocks!r} is not an "
                                  "integer >= 1")
        is_master = role == "master"
        rows = g[3] if is_master else n_diff
        if not isinstance(rows, int) or rows < 0:
            raise CorruptionError(f"{where}: n_diff {n_diff!r} is not an integer >= 0")
        ref = _ArrayRef(array, rows, chunk_blocks, ".0" * len(g[2]), is_master, owner)
        if array in arrays:
            raise CorruptionError(f"{where}: data/{array} is also referenced by "
                                  f"{arrays[array].owner}")
        arrays[array] = ref
    return _Snapshot(groups=len(groups), agents=n_agents, arrays=arrays, gids=gids)


# --------------------------------------------------------------------------- files


def _open_dir(name: str, dir_fd: int, what: str) -> int:
    """Open the directory ``name`` below ``dir_fd``, never through a symbolic link."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise _Vanished(what) from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise CorruptionError(f"{what} is a symbolic link or not a directory; refusing "
                                  "to follow it") from None
        raise


def _copy_file(dir_fd: int, name: str, target: Path, what: str, *,
               replace: bool = False) -> int:
    """Copy the regular file ``name`` below ``dir_fd`` to ``target`` (fsynced), never
    through a symbolic link. Returns its size."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise _Vanished(what) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CorruptionError(f"{what} is a symbolic link; refusing to follow it") from None
        if exc.errno in NOT_A_FILE:  # a socket, or a device
            raise CorruptionError(f"{what} is not a regular file; refusing to copy it") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptionError(f"{what} is not a regular file; refusing to copy it")
        return _write_file(target, lambda out: _copy_fd(fd, out), replace=replace)
    finally:
        os.close(fd)


def _write_file(target: Path, write: Callable[[int], int], *, replace: bool = False) -> int:
    """Create ``target`` (never through a symlink) with what ``write(fd)`` writes, fsynced;
    with ``replace`` through a temporary file renamed over it. Returns ``write``'s count."""
    out_path = target.with_name(f"{target.name}.tmp-{secrets.token_hex(4)}") \
        if replace else target
    out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                  | os.O_CLOEXEC, 0o644)
    try:
        n = write(out)
        os.fsync(out)
    except BaseException:
        os.close(out)
        out_path.unlink(missing_ok=True)
        raise
    os.close(out)
    if replace:
        os.replace(out_path, target)
    return n


def _copy_fd(src: int, dst: int) -> int:
    total = 0
    try:
        while True:
            n = os.sendfile(dst, src, None, COPY_BLOCK)
            if n == 0:
                return total
            total += n
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) or total:
            raise
    while True:  # sendfile unsupported here: plain reads
        buf = os.read(src, COPY_BLOCK)
        if not buf:
            return total
        view = memoryview(buf)
        while view:
            view = view[os.write(dst, view):]
        total += len(buf)


def _tally(dest: Path) -> tuple[int, int]:
    """Files and bytes of the finished copy."""
    files = nbytes = 0
    for root, _, names in os.walk(dest):
        for n in names:
            files += 1
            nbytes += os.lstat(os.path.join(root, n)).st_size
    return files, nbytes




def _remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
