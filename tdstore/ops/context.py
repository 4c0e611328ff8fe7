"""An open store's internals: its directory, catalogue, array store and locks, the
schema check at open, and the group-level operations (create, update, delete, migrate).

``StoreContext`` is what every operation in ``tdstore.ops`` works on; the public
``tdstore.Store`` wraps one.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tdstore.core.errors import (
    CorruptionError,
    InvalidInputError,
    NotFoundError,
    ReadOnlyError,
    SchemaError,
    TdStoreError,
)
from tdstore.core.kinds import JournalOp, Role, Status
from tdstore.core.location import check_location, is_object_url
from tdstore.core.validate import VerifyReads, check_max_bytes, check_name, check_verify_reads
from tdstore.core.version import __version__
from tdstore.ops import budget, journal, maintenance
from tdstore.storage.arrays import ArrayStore, LocalArrayStore
from tdstore.storage.catalog import (
    AgentRow,
    Catalog,
    GroupRow,
    MetaRow,
    check_not_newer,
    delete_agents,
    known_revisions,
    now,
    schema_status,
    sqlite_url,
    upgrade,
)
from tdstore.storage.dblocks import AdvisoryLocks
from tdstore.storage.locks import FileLocks, Locks, deferred_signals

CATALOG_FILE = "catalog.sqlite"
DATA_DIR = "data"
LOCK_DIR = "locks"
DEFAULT_DIFF_THRESHOLD = 0.0
# set by a downgrade (`tdstore migrate --to REV`): opening then refuses to upgrade
PINNED_KEY = "pinned_revision"
# the object-store location whose data a catalogue describes (none: a local directory)
LOCATION_KEY = "data_location"


# the schema revision that added agents' attributes (revision ids are ordered numbers)
ATTRS_REVISION = "0002"

log = logging.getLogger("tdstore")


class StoreContext:
    """A tdstore directory opened: ``catalog.sqlite`` (or the catalogue at ``url``), the
    zarr hierarchy under ``data/`` and the locks under ``locks/``."""

    catalog: Catalog
    arrays: ArrayStore
    locks: Locks
    path: Path | str  # the store directory, or the object-store URL
    location: str  # the same, for messages

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        url: str | None = None,
        readonly: bool = False,
        verify_reads: VerifyReads = False,
        direct_reads: bool = False,
        max_bytes: int | None = None,
        create: bool = True,
        upgrade: bool = True,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_max_bytes: int | None = None,
    ):
        check_verify_reads(verify_reads)
        if not isinstance(direct_reads, bool):
            raise InvalidInputError(f"direct_reads must be True or False, got {direct_reads!r}")
        if max_bytes is not None:
            check_max_bytes(max_bytes)
        if cache_max_bytes is not None:
            check_max_bytes(cache_max_bytes, "cache_max_bytes", allow_zero=True)
        self.readonly = readonly
        self._created: list[Path] = []  # directories this open made, parents first
        try:
            self._open(path, url, readonly, verify_reads, direct_reads, max_bytes, create,
                       upgrade, storage_options, cache_dir, cache_max_bytes)
        except BaseException:
            # an open that fails leaves no trace: the directories it made are removed
            # while still empty (rmdir removes nothing else, so nothing any process put
            # there can go)
            for d in reversed(self._created):
                try:
                    d.rmdir()
                except OSError:
                    break
            raise

    def _open(self, path: str | os.PathLike[str], url: str | None, readonly: bool,
              verify_reads: VerifyReads, direct_reads: bool, max_bytes: int | None,
              create: bool, upgrade: bool, storage_options: Mapping[str, Any] | None,
              cache_dir: str | os.PathLike[str] | None, cache_max_bytes: int | None) -> None:
        if is_object_url(path):
            url = url or os.environ.get("TDSTORE_URL") or None
            self.url_given = url is not None
            if direct_reads:
                raise InvalidInputError(f"store {path}: direct_reads is for a store directory "
                                        "(its chunk files), not an object-store location")
            self._open_object(str(path), url, verify_reads, storage_options, cache_dir,
                              cache_max_bytes)
        else:
            check_location(str(path))
            if storage_options:
                raise InvalidInputError(f"store {path}: storage_options are for object-store "
                                        "locations (s3://...), not a directory")
            self.url_given = url is not None
            self._open_local(path, url, verify_reads, create, direct_reads)
        try:
            with self.catalog.errors():
                if not create and self.url_given and not schema_status(self.catalog)[0]:
                    raise NotFoundError(f"store {self.location}: the catalogue at "
                                        f"{self.catalog.where} holds no store")
                if upgrade:
                    self._open_schema()
                else:
                    check_not_newer(self.catalog, self.location)
                self._check_location()
            if not readonly:
                self.arrays.ensure_root()
            if max_bytes is not None:
                was = budget.get_max_bytes(self)
                if max_bytes != was:
                    # the budget is the store's, shared by every process: say so when
                    # this one changes what another set
                    if was is not None:
                        log.warning("store %s: max_bytes %d replaces the budget of %d "
                                    "bytes every process of this store shares", self.location,
                                    max_bytes, was)
                    budget.set_max_bytes(self, max_bytes)
        except BaseException:
            self.catalog.close()
            raise

    def _open_local(self, path: str | os.PathLike[str], url: str | None, verify_reads: VerifyReads,
                    create: bool, direct_reads: bool = False) -> None:
        self.path = local = Path(path).absolute()
        self.location = str(local)
        catalog_file = local / CATALOG_FILE
        unwritable = None
        try:
            if not create and not self.url_given:
                self._require_store()
            self._prepare_directory()
            if url is None:
                _refuse_empty_catalog(local)
                # SQLite needs to write its -shm file even to read a WAL database; in a
                # directory we cannot write, Catalog reads it immutable or through the
                # writer's -shm file, whichever is exact at the time (see Catalog)
                if self.readonly and not _writable(local):
                    unwritable = catalog_file
                url = sqlite_url(catalog_file, readonly=self.readonly)
        except TdStoreError:
            raise
        except OSError as exc:  # a name too long, a path through a file, no permission
            raise InvalidInputError(
                f"store {str(local)[:200]}: the path cannot be used as a store directory "
                f"({exc.strerror or exc})") from None
        self.catalog = Catalog(url, readonly=self.readonly, unwritable_file=unwritable)
        # with a catalogue on a database server, processes take turns there, on any host
        self.locks = AdvisoryLocks(self.catalog.engine) if self.catalog.dialect == \
            "postgresql" else FileLocks(local / LOCK_DIR)
        self.arrays = LocalArrayStore(local / DATA_DIR, verify_reads=verify_reads,
                                      direct_reads=direct_reads)

    def _open_object(self, location: str, url: str | None, verify_reads: VerifyReads,
                     storage_options: Mapping[str, Any] | None,
                     cache_dir: str | os.PathLike[str] | None,
                     cache_max_bytes: int | None) -> None:
        """An object-store location: its catalogue must be one every host reaches and
        takes turns in (PostgreSQL); a SQLite file is refused."""
        from tdstore.core.location import normalize_url
        from tdstore.storage.objects import ObjectArrayStore

        self.path = self.location = normalize_url(location)
        if url is None:
            raise InvalidInputError(
                f"store {self.location}: an object-store location needs a catalogue every "
                "host reaches; pass url='postgresql+psycopg://USER@HOST/DB' (command line: "
                "--url or TDSTORE_URL)")
        self.catalog = Catalog(url, readonly=self.readonly)
        if self.catalog.dialect != "postgresql":
            where = self.catalog.where
            self.catalog.close()
            raise InvalidInputError(
                f"store {self.location}: the catalogue {where} is {self.catalog.dialect}, "
                "which other hosts can neither reach nor take turns in; an object-store "
                "location needs PostgreSQL (postgresql+psycopg://...)")
        self.locks = AdvisoryLocks(self.catalog.engine)
        try:
            arrays = ObjectArrayStore(self.location, storage_options=storage_options,
                                      verify_reads=verify_reads, cache_dir=cache_dir,
                                      cache_max_bytes=cache_max_bytes)
            arrays.probe()
        except BaseException:
            self.catalog.close()
            raise
        self.arrays = arrays

    def _check_location(self) -> None:
        """A catalogue serves the data of one location: refuse another one's."""
        if not schema_status(self.catalog)[0]:
            return
        recorded = self.catalog.get_meta(LOCATION_KEY)
        mine = self.location if self.arrays.shared else None
        if recorded == mine:
            return
        if recorded is None and mine is not None:
            with self.catalog.read() as s:
                holds = s.scalars(select(GroupRow.id)).first() is not None
            if holds:
                raise InvalidInputError(
                    f"store {self.location}: the catalogue at {self.catalog.where} holds the "
                    "groups of a store in a local directory, not of this location")
            if not self.readonly:
                with self.catalog.write() as s:
                    s.merge(MetaRow(key=LOCATION_KEY, value=mine))
            return
        raise InvalidInputError(
            f"store {self.location}: the catalogue at {self.catalog.where} belongs to the "
            f"store at {recorded or 'a local directory'}; refusing to mix their data")

    @property
    def _dir(self) -> Path:
        """The store directory (a local store's)."""
        assert isinstance(self.path, Path)
        return self.path

    def _require_store(self) -> None:
        if not (self._dir / CATALOG_FILE).exists():
            raise NotFoundError(f"store {self.location}: no {CATALOG_FILE}; not a tdstore store")

    def _prepare_directory(self) -> None:
        if self._dir.exists() and not self._dir.is_dir():
            raise InvalidInputError(f"store {self.location}: exists and is not a directory")
        if not self.readonly and self._dir.exists() and not _writable(self._dir):
            raise ReadOnlyError(
                f"store {self.location}: the directory is not writable by this process; "
                "open it with readonly=True")
        if self.readonly:
            if not self.url_given:
                self._require_store()
            return
        if self._dir.exists() and not (self._dir / CATALOG_FILE).exists():
            foreign = [p.name for p in self._dir.iterdir() if p.name not in (DATA_DIR, LOCK_DIR)]
            if foreign:
                raise InvalidInputError(
                    f"store {self.location}: directory is not empty and holds no {CATALOG_FILE}; "
                    "refusing to turn it into a store"
                )
        missing, d = [], self._dir
        while not d.exists() and d != d.parent:
            missing.append(d)
            d = d.parent
        self._created = [*reversed(missing)] + [
            d for d in (self._dir / LOCK_DIR, self._dir / DATA_DIR) if not d.exists()]
        (self._dir / LOCK_DIR).mkdir(parents=True, exist_ok=True)
        (self._dir / DATA_DIR).mkdir(exist_ok=True)

    def _open_schema(self) -> None:
        current, heads = check_not_newer(self.catalog, self.location)
        if set(current) == set(heads):
            return
        if not current:
            self._refuse_schema_over_data()
        pinned = self.catalog.get_meta(PINNED_KEY) if current else None
        if pinned is not None:
            raise SchemaError(
                f"store {self.location}: schema revision {', '.join(current)} was chosen by "
                f"`tdstore migrate --to {pinned}`; this tdstore needs {', '.join(heads)}: "
                "run `tdstore migrate` to upgrade it")
        if self.readonly:
            raise SchemaError(
                f"store {self.location}: catalogue schema {current or 'empty'} needs an upgrade to "
                f"{', '.join(heads)}; open it once without readonly=True or run `tdstore migrate`"
            )
        with self.locks.hold("store"):
            current, heads = check_not_newer(self.catalog, self.location)
            if set(current) != set(heads):
                created = not current
                upgrade(self.catalog, "head")
                with self.catalog.write() as s:
                    if created:
                        s.merge(MetaRow(key="created_by", value=__version__))
                        if self.arrays.shared:
                            s.merge(MetaRow(key=LOCATION_KEY, value=self.location))
                    s.merge(MetaRow(key="tdstore_version", value=__version__))
                if not created:  # rows of an older schema get their checksums recorded
                    maintenance.backfill_checksums(self)

    def _refuse_schema_over_data(self) -> None:
        """An empty or replaced catalogue beside existing data: initialising it would
        orphan every array (and gc would then delete them)."""
        held = [e for e in self.arrays.children("") if e.name != "zarr.json"]
        if held:
            raise CorruptionError(
                f"store {self.location}: the catalogue holds no schema but data/ holds "
                f"{len(held)} group directories; refusing to initialise it over them "
                "(restore the catalogue from a backup)")

    # ------------------------------------------------------------------ plumbing

    def check_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyError(f"store {self.location} is open read-only")

    def group_row(self, session: Session, name: str) -> GroupRow:
        check_name("group", name)
        row = session.scalars(select(GroupRow).where(GroupRow.name == name)).one_or_none()
        if row is None:
            raise NotFoundError(f"group {name!r} does not exist in store {self.location}")
        return row

    # ------------------------------------------------------------------ groups

    def open_group(self, name: str, settings: dict[str, Any], *, create: bool) -> None:
        """Create the group ``name`` or apply ``settings`` (validated, None: keep) to it."""
        with self.catalog.read() as s:
            row = s.scalars(select(GroupRow).where(GroupRow.name == name)).one_or_none()
        if row is None:
            if not create or self.readonly:
                raise NotFoundError(f"group {name!r} does not exist in store {self.location}")
            self._create_group(name, settings)
        else:
            self._update_group(row, settings)

    def _create_group(self, name: str, settings: dict[str, Any]) -> None:
        from sqlalchemy.exc import IntegrityError

        t = now()
        threshold = settings.get("diff_threshold")
        try:
            with self.catalog.write() as s:
                s.add(GroupRow(
                    name=name, gid=secrets.token_hex(8),
                    diff_threshold=DEFAULT_DIFF_THRESHOLD if threshold is None else threshold,
                    allow_nonfinite=bool(settings.get("allow_nonfinite")),
                    compressor=settings.get("compressor"),
                    chunk_blocks=settings.get("chunk_blocks"), n_blocks=0,
                    kv_layout=settings.get("kv_layout"), created_at=t, updated_at=t,
                ))
        except IntegrityError:  # another process created it first: use theirs
            with self.catalog.read() as s:
                row = self.group_row(s, name)
            self._update_group(row, settings)

    def _update_group(self, row: GroupRow, settings: dict[str, Any]) -> None:
        compressor, chunk_blocks = settings.get("compressor"), settings.get("chunk_blocks")
        if compressor is not None and compressor != row.compressor:
            raise InvalidInputError(
                f"group {row.name!r} was created with compressor {row.compressor!r}; "
                f"the compressor of an existing group cannot change to {compressor!r}"
            )
        if chunk_blocks is not None and chunk_blocks != row.chunk_blocks:
            raise InvalidInputError(
                f"group {row.name!r} has chunk_blocks {row.chunk_blocks}; the chunking of an "
                "existing group cannot change"
            )
        changes: dict[str, Any] = {}
        for key in ("diff_threshold", "allow_nonfinite", "kv_layout"):
            value = settings.get(key)
            if key == "allow_nonfinite" and value is not None:
                value = bool(value)
            if value is not None and value != getattr(row, key):
                changes[key] = value
        if changes:
            self.check_writable()
            with self.catalog.write() as s:
                g = self.group_row(s, row.name)
                for key, value in changes.items():
                    setattr(g, key, value)
                g.updated_at = now()

    def groups(self) -> list[str]:
        """Names of the groups in this store, oldest first."""
        with self.catalog.read() as s:
            return list(s.scalars(select(GroupRow.name).order_by(GroupRow.id)))

    def __contains__(self, name: object) -> bool:
        try:
            check_name("group", name)
        except InvalidInputError:  # no group can have such a name
            return False
        with self.catalog.read() as s:
            return s.scalars(select(GroupRow.id).where(GroupRow.name == name)).first() is not None

    def delete_group(self, name: str) -> None:
        """Delete a group, its agents and their data. Raises NotFoundError if missing.

        Deletes the group the name means when its lock is held: racing a re-creation of
        the same name, either the old or the new group goes, never the wrong data."""
        self.check_writable()
        while True:
            with self.catalog.read() as s:
                gid = self.group_row(s, name).gid
            if self._discard_if(name, gid, lambda rows: True):
                return
            # deleted (and perhaps re-created) meanwhile: look again

    def discard_if_empty(self, name: str, gid: str) -> bool:
        """Delete the group ``name`` if it is still the group ``gid`` and holds no agent
        (a group a failed command created): nothing was ever committed to it."""
        return self._discard_if(name, gid, lambda rows: not rows)

    def discard_if_quarantined(self, name: str, gid: str) -> bool:
        """Delete the group ``name`` if it is still the group ``gid`` and its master is
        quarantined (``verify --repair`` found its data damaged): its mirrors, read
        through it, go with it. Decided under the group's lock, so a group whose master
        was healed or replaced meanwhile is left alone."""
        return self._discard_if(name, gid, lambda rows: any(
            r.role == Role.MASTER and r.status == Status.QUARANTINED for r in rows))

    def _discard_if(self, name: str, gid: str,
                    condition: Callable[[list[AgentRow]], bool]) -> bool:
        """Delete the group ``name`` if it is still the group ``gid`` and ``condition``
        holds for its agents' rows, all under its lock; returns whether it did."""
        self.check_writable()
        with self.locks.hold(gid):
            with deferred_signals(), self.catalog.write() as s:
                g = s.scalars(select(GroupRow).where(GroupRow.gid == gid)).one_or_none()
                if g is None or g.name != name:
                    return False
                rows = list(s.scalars(select(AgentRow).where(AgentRow.group_id == g.id)))
                if not condition(rows):
                    return False
                delete_agents(s, [r.id for r in rows])
                s.delete(g)
                journal.schedule_removals(s, gid, [(gid, sum(r.nbytes for r in rows))],
                                          JournalOp.REMOVE_GROUP)
                self.locks.confirm(s)
            journal.collect(self, gid)
        self.locks.forget(gid)
        return True

    def migrate(self, revision: str = "head") -> tuple[str, ...]:
        """Upgrade (or downgrade) the catalogue schema; returns the new revision."""
        self.check_writable()
        known = known_revisions(self.catalog)
        if revision == "base":
            raise InvalidInputError(
                f"store {self.location}: downgrading to 'base' would drop every table of the "
                "catalogue (all groups and agents); refused: remove the store directory "
                "to discard a store")
        if revision != "head" and revision not in known:
            raise InvalidInputError(
                f"store {self.location}: schema revision {revision!r} is unknown; expected "
                f"'head' or one of {', '.join(sorted(known))}")
        with self.locks.hold("store"):
            if not check_not_newer(self.catalog, self.location)[0]:
                self._refuse_schema_over_data()
            if revision != "head" and revision < ATTRS_REVISION and any(
                    r >= ATTRS_REVISION for r in schema_status(self.catalog)[0]):
                with self.catalog.read() as s:
                    kept = sum(1 for a in s.scalars(select(AgentRow.attrs)) if a)
                if kept:
                    raise InvalidInputError(
                        f"store {self.location}: downgrading to {revision} would drop the "
                        f"attributes of {kept} agents (keyed chunks need theirs to be "
                        "read); refused")
            upgrade(self.catalog, revision)
            current, heads = schema_status(self.catalog)
            with self.catalog.write() as s:
                if set(current) == set(heads):
                    pin = s.get(MetaRow, PINNED_KEY)
                    if pin is not None:
                        s.delete(pin)
                else:
                    s.merge(MetaRow(key=PINNED_KEY, value=revision))
            if set(current) == set(heads):
                maintenance.backfill_checksums(self)
        return current

    def close(self) -> None:
        """Release the catalogue's connections and the data directory. The store can be
        opened again later."""
        self.catalog.close()
        self.arrays.close()



def _refuse_empty_catalog(path: Path) -> None:
    """An empty (or headerless) catalogue file beside existing data: connecting would
    write a database header into it, so refuse before connecting."""
    catalog = path / CATALOG_FILE
    held = _group_dirs(path)
    try:
        size = catalog.stat().st_size
    except FileNotFoundError:
        if held:  # connecting would create a new, empty catalogue over them
            raise CorruptionError(
                f"store {path}: {CATALOG_FILE} is missing but data/ holds {len(held)} group "
                f"directories; refusing to create a new catalogue over them (restore "
                f"{CATALOG_FILE} from a backup)") from None
        return
    if size < 100 and held:  # 100 bytes: the SQLite header
        raise CorruptionError(
            f"store {path}: {CATALOG_FILE} is empty ({size} bytes) but data/ holds "
            f"{len(held)} group directories; refusing to initialise it over them "
            f"(restore {CATALOG_FILE} from a backup)")


def _group_dirs(path: Path) -> list[str]:
    """The entries of ``data/`` other than its zarr.json (group directories, or debris)."""
    data = path / DATA_DIR
    return [p.name for p in data.iterdir() if p.name != "zarr.json"] if data.is_dir() else []


def _writable(path: Path) -> bool:
    """Whether this process can create files in ``path`` (os.access is wrong for root
    on read-only mounts, and for other users only approximate)."""
    probe = path / f".tdstore-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True


