"""Store and Group: the write protocol, orchestrating the catalogue and the arrays.

Every write follows the same protocol (README, "Crash safety: the write protocol"):

1. validate the input completely, before anything is written;
2. take the group's writer lock (an ``flock`` on ``locks/<gid>.lock``) on the group the
   name means now, so writers of one group are serialised across threads and
   processes, and re-read the group's state;
3. journal the arrays about to be written (``tdstore.journal``), then write the data
   under fresh paths (or, for a master append, only past the committed length), fsync
   the files and their directories;
4. make the new state visible in one catalogue transaction, with signals held back;
5. remove the data the transaction made unreferenced (a crash leaves it journaled).

On any failure, what the write journaled is removed only if a fresh read of the
catalogue shows nothing references it. Readers trust only the catalogue: a read takes
one catalogue snapshot and reads the arrays it names, retrying on a fresh snapshot if a
writer replaced them meanwhile. Unreferenced data is never read.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import time
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, insert, select

from . import __version__, budget, journal, maintenance
from .arrays import (
    ArrayRef,
    ArraySpec,
    ArrayStore,
    balanced_chunk_blocks,
    check_compressor,
    check_gid,
    default_chunk_blocks,
    run_all,
)
from .budget import Reservation, budget_turn
from .catalog import (
    AgentRow,
    Catalog,
    DiffBlockRow,
    GroupRow,
    MetaRow,
    check_not_newer,
    now,
    sqlite_url,
    upgrade,
)
from .diff import diff_mask, nonfinite_blocks
from .dtypes import logical_name, numpy_dtype, stored_dtype
from .errors import (
    CorruptionError,
    InvalidInputError,
    NoMasterError,
    NotFoundError,
    ReadOnlyError,
    SchemaError,
    StateError,
    StorageError,
    TdStoreError,
)
from .integrity import agent_ref, check_group_row, index_checksum, index_problems
from .locking import deferred_signals, file_lock
from .reconstruct import (
    AgentSnapshot,
    check_out,
    normalize_index,
    read_blocks,
    reconstruct_into,
)
from .sparse import SparseKVDiff

CATALOG_FILE = "catalog.sqlite"
DATA_DIR = "data"
LOCK_DIR = "locks"
MAX_NAME_CHARS = 1024
DEFAULT_DIFF_THRESHOLD = 0.0
# A read that finds its data replaced by a concurrent writer retries on a fresh
# snapshot (with a randomised backoff); it gives up only if the data it read is damaged
# (the same snapshot fails again) or after this many replacements in a row.
READ_RETRIES = 200
# blocks along the leading axis; catalogue columns are 32-bit on PostgreSQL
MAX_BLOCKS = 2**31 - 1
# last_access is recorded at most this often per agent (reads stay read-mostly)
ACCESS_RESOLUTION_S = 1.0


# --------------------------------------------------------------------------- validation


def check_name(kind: str, name: object, where: str = "") -> str:
    """Validate a user-given group or agent name (names never become paths)."""
    prefix = f"{where}: " if where else ""
    if not isinstance(name, str):
        raise InvalidInputError(f"{prefix}{kind} name must be a str, got {type(name).__name__}")
    if not name.strip():
        raise InvalidInputError(f"{prefix}{kind} name {name!r} must not be empty or blank")
    if name in (".", ".."):
        raise InvalidInputError(f"{prefix}{kind} name {name!r} is not allowed")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(
            f"{prefix}{kind} name {name[:80]!r} is not valid Unicode text (it holds a lone "
            "surrogate, e.g. from undecodable command-line bytes); names must encode as "
            "UTF-8") from None
    bad = sorted({c for c in name if c in "/\\" or unicodedata.category(c) == "Cc"})
    if bad:
        raise InvalidInputError(
            f"{prefix}{kind} name {name[:80]!r} must not contain {', '.join(map(repr, bad))} "
            "(path separators and control characters such as NUL are refused)"
        )
    if len(name) > MAX_NAME_CHARS:
        raise InvalidInputError(
            f"{prefix}{kind} name of {len(name)} characters is too long; "
            f"expected at most {MAX_NAME_CHARS}"
        )
    return name


def as_blocks(kv: object, what: str) -> tuple[np.ndarray, str]:
    """Validate a block array; returns it C-contiguous, little-endian, and its dtype name.

    Raises InvalidInputError for non-arrays, fewer than 2 dimensions, unsupported dtypes
    and blocks with no elements. Values are never converted: byte order and memory
    layout are normalised exactly.
    """
    if isinstance(kv, np.ma.MaskedArray):
        raise InvalidInputError(
            f"{what} is a masked array; its mask cannot be stored: pass np.ma.getdata(a) "
            "or a.filled(value)")
    if not isinstance(kv, np.ndarray):
        kv = _from_tensor(kv, what)
    if kv.ndim < 2:
        raise InvalidInputError(
            f"{what} must be at least 2D (n_blocks, ...); got shape {kv.shape}"
        )
    name = logical_name(kv.dtype, what)
    if kv.dtype.byteorder == ">":
        kv = kv.astype(kv.dtype.newbyteorder("<"))
    if any(d == 0 for d in kv.shape[1:]):
        raise InvalidInputError(
            f"{what}: block shape {kv.shape[1:]} has no elements; every block dimension "
            "must be >= 1"
        )
    if kv.shape[0] > MAX_BLOCKS:
        raise InvalidInputError(
            f"{what}: {kv.shape[0]} blocks; expected at most {MAX_BLOCKS}")
    if not kv.flags.c_contiguous:
        # a strided or broadcast array is copied; refuse a copy that cannot fit
        import psutil

        available = psutil.virtual_memory().available
        if kv.nbytes > available:
            raise InvalidInputError(
                f"{what}: shape {kv.shape} ({kv.nbytes} bytes) is not contiguous and a "
                f"contiguous copy would not fit in the {available} bytes of free memory; "
                "pass a contiguous array (or np.memmap)")
    return np.ascontiguousarray(kv), name


def _from_tensor(kv: object, what: str) -> np.ndarray:
    """Accept array-likes that expose their buffer exactly (torch tensors, memoryviews)."""
    if type(kv).__module__.startswith("torch"):
        from .integrations.torch import tensor_to_numpy

        return tensor_to_numpy(kv)
    raise InvalidInputError(f"{what} must be a numpy.ndarray, got {type(kv).__name__}")


def check_finite(kv: np.ndarray, dtype_name: str, what: str,
                 block_numbers: np.ndarray | None = None) -> None:
    """Refuse NaN and inf; ``block_numbers`` names the blocks of ``kv`` in messages."""
    bad = nonfinite_blocks(kv, dtype_name)
    if bad.size:
        if block_numbers is not None:
            bad = block_numbers[bad]
        raise InvalidInputError(
            f"{what} holds NaN or inf in block(s) {', '.join(map(str, bad[:5]))}; "
            "refused (create the group with allow_nonfinite=True to store them exactly)"
        )


# --------------------------------------------------------------------------- the store


class Store:
    """A tdstore directory: ``catalog.sqlite`` plus the zarr hierarchy under ``data/``.

    Use :func:`tdstore.open` to get one. A Store is safe to use from several threads, and
    any number of processes may open the same directory at once.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        url: str | None = None,
        readonly: bool = False,
        verify_reads: bool = False,
        max_bytes: int | None = None,
        create: bool = True,
    ):
        if max_bytes is not None:
            budget.check_max_bytes(max_bytes)
        self.path = Path(path).absolute()
        self.readonly = readonly
        if not create and not (self.path / CATALOG_FILE).exists():
            raise NotFoundError(f"store {self.path}: no {CATALOG_FILE}; not a tdstore store")
        self._prepare_directory()
        catalog_file = self.path / CATALOG_FILE
        unwritable = None
        if url is None:
            _refuse_empty_catalog(self.path)
            # SQLite needs to write its -shm file even to read a WAL database; in a
            # directory we cannot write, Catalog reads it immutable or through the
            # writer's -shm file, whichever is exact at the time (see Catalog)
            if readonly and not _writable(self.path):
                unwritable = catalog_file
            url = sqlite_url(catalog_file, readonly=readonly)
        self.catalog = Catalog(url, readonly=readonly, unwritable_file=unwritable)
        self.arrays = ArrayStore(self.path / DATA_DIR, verify_reads=verify_reads)
        try:
            with self.catalog.errors():
                self._open_schema()
            if not readonly:
                self.arrays.ensure_root()
            if max_bytes is not None and max_bytes != self.max_bytes:
                self.set_max_bytes(max_bytes)
        except BaseException:
            self.catalog.close()
            raise

    def _prepare_directory(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise InvalidInputError(f"store {self.path}: exists and is not a directory")
        if not self.readonly and self.path.exists() and not _writable(self.path):
            raise ReadOnlyError(
                f"store {self.path}: the directory is not writable by this process; "
                "open it with readonly=True")
        if self.readonly:
            if not (self.path / CATALOG_FILE).exists():
                raise NotFoundError(f"store {self.path}: no {CATALOG_FILE}; not a tdstore store")
            return
        if self.path.exists() and not (self.path / CATALOG_FILE).exists():
            foreign = [p.name for p in self.path.iterdir() if p.name not in (DATA_DIR, LOCK_DIR)]
            if foreign:
                raise InvalidInputError(
                    f"store {self.path}: directory is not empty and holds no {CATALOG_FILE}; "
                    "refusing to turn it into a store"
                )
        (self.path / LOCK_DIR).mkdir(parents=True, exist_ok=True)
        (self.path / DATA_DIR).mkdir(exist_ok=True)

    def _open_schema(self) -> None:
        current, heads = check_not_newer(self.catalog, str(self.path))
        if set(current) == set(heads):
            return
        data = self.path / DATA_DIR
        held = [p.name for p in data.iterdir() if p.name != "zarr.json"] if data.is_dir() else []
        if not current and held:
            # an empty or replaced catalogue beside existing data: initialising it would
            # orphan every array (and gc would then delete them)
            raise CorruptionError(
                f"store {self.path}: the catalogue holds no schema but data/ holds "
                f"{len(held)} group directories; refusing to initialise it over them "
                "(restore catalog.sqlite from a backup)")
        if self.readonly:
            raise SchemaError(
                f"store {self.path}: catalogue schema {current or 'empty'} needs an upgrade to "
                f"{', '.join(heads)}; open it once without readonly=True or run `tdstore migrate`"
            )
        with file_lock(self.lock_path("store")):
            current, heads = check_not_newer(self.catalog, str(self.path))
            if set(current) != set(heads):
                created = not current
                upgrade(self.catalog, "head")
                with self.catalog.write() as s:
                    if created:
                        s.merge(MetaRow(key="created_by", value=__version__))
                    s.merge(MetaRow(key="tdstore_version", value=__version__))
                if not created:  # rows of an older schema get their checksums recorded
                    maintenance.backfill_checksums(self)

    # ------------------------------------------------------------------ plumbing

    def _check_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyError(f"store {self.path} is open read-only")

    def lock_path(self, name: str) -> Path:
        """The lock file of a group id (checked: it comes from the catalogue or from
        ``data/``), or of ``budget`` / ``store``."""
        if name not in ("budget", "store"):
            check_gid(name)
        return self.path / LOCK_DIR / f"{name}.lock"

    @contextlib.contextmanager
    def _group_lock(self, gid: str) -> Iterator[None]:
        with file_lock(self.lock_path(gid)):
            yield

    def _group_row(self, session, name: str) -> GroupRow:  # noqa: ANN001
        check_name("group", name)
        row = session.scalars(select(GroupRow).where(GroupRow.name == name)).one_or_none()
        if row is None:
            raise NotFoundError(f"group {name!r} does not exist in store {self.path}")
        return row

    # ------------------------------------------------------------------ public API

    def group(
        self,
        name: str,
        *,
        diff_threshold: float | None = None,
        compressor: str | None = None,
        chunk_blocks: int | None = None,
        allow_nonfinite: bool | None = None,
        kv_layout: dict[str, Any] | None = None,
        create: bool = True,
    ) -> Group:
        """Get or create the group ``name``.

        Settings are persisted with the group. On an existing group, a setting passed
        explicitly replaces the stored one (it applies to later writes); ``compressor``
        and ``chunk_blocks`` can only be chosen when the group is created.

        Raises NotFoundError if the group is missing and ``create`` is False, and
        InvalidInputError for invalid names or settings.
        """
        check_name("group", name)
        if diff_threshold is not None:
            diff_threshold = _check_threshold(diff_threshold, name)
        check_compressor(compressor)
        if kv_layout is not None:
            from .ab import check_kv_layout

            kv_layout = check_kv_layout(kv_layout)
        if chunk_blocks is not None and (not isinstance(chunk_blocks, int) or chunk_blocks < 1):
            raise InvalidInputError(f"group {name!r}: chunk_blocks must be an int >= 1")
        with self.catalog.read() as s:
            row = s.scalars(select(GroupRow).where(GroupRow.name == name)).one_or_none()
        if row is None:
            if not create or self.readonly:
                raise NotFoundError(f"group {name!r} does not exist in store {self.path}")
            self._create_group(name, diff_threshold, compressor, chunk_blocks,
                               allow_nonfinite, kv_layout)
        else:
            self._update_group(row, diff_threshold, compressor, chunk_blocks,
                               allow_nonfinite, kv_layout)
        return Group(self, name)

    def _create_group(self, name, diff_threshold, compressor, chunk_blocks,  # noqa: ANN001
                      allow_nonfinite, kv_layout) -> None:
        from sqlalchemy.exc import IntegrityError

        t = now()
        try:
            with self.catalog.write() as s:
                s.add(GroupRow(
                    name=name, gid=secrets.token_hex(8),
                    diff_threshold=DEFAULT_DIFF_THRESHOLD if diff_threshold is None
                    else diff_threshold,
                    allow_nonfinite=bool(allow_nonfinite), compressor=compressor,
                    chunk_blocks=chunk_blocks, n_blocks=0, kv_layout=kv_layout,
                    created_at=t, updated_at=t,
                ))
        except IntegrityError:  # another process created it first: use theirs
            with self.catalog.read() as s:
                row = self._group_row(s, name)
            self._update_group(row, diff_threshold, compressor, chunk_blocks,
                               allow_nonfinite, kv_layout)

    def _update_group(self, row: GroupRow, diff_threshold, compressor, chunk_blocks,  # noqa: ANN001
                      allow_nonfinite, kv_layout) -> None:
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
        if diff_threshold is not None and diff_threshold != row.diff_threshold:
            changes["diff_threshold"] = diff_threshold
        if allow_nonfinite is not None and bool(allow_nonfinite) != row.allow_nonfinite:
            changes["allow_nonfinite"] = bool(allow_nonfinite)
        if kv_layout is not None and kv_layout != row.kv_layout:
            changes["kv_layout"] = kv_layout
        if changes:
            self._check_writable()
            with self.catalog.write() as s:
                g = self._group_row(s, row.name)
                for key, value in changes.items():
                    setattr(g, key, value)
                g.updated_at = now()

    def groups(self) -> list[str]:
        """Names of the groups in this store, oldest first."""
        with self.catalog.read() as s:
            return list(s.scalars(select(GroupRow.name).order_by(GroupRow.id)))

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        with self.catalog.read() as s:
            return s.scalars(select(GroupRow.id).where(GroupRow.name == name)).first() is not None

    def delete_group(self, name: str) -> None:
        """Delete a group, its agents and their data. Raises NotFoundError if missing.

        Deletes the group the name means when its lock is held: racing a re-creation of
        the same name, either the old or the new group goes, never the wrong data."""
        self._check_writable()
        while True:
            with self.catalog.read() as s:
                gid = self._group_row(s, name).gid
            with self._group_lock(gid):
                with deferred_signals(), self.catalog.write() as s:
                    g = s.scalars(select(GroupRow).where(GroupRow.gid == gid)).one_or_none()
                    if g is None or g.name != name:
                        continue  # deleted (and perhaps re-created) meanwhile: look again
                    ids = list(s.scalars(select(AgentRow.id).where(AgentRow.group_id == g.id)))
                    nbytes = sum(s.scalars(select(AgentRow.nbytes)
                                           .where(AgentRow.group_id == g.id)))
                    s.execute(delete(DiffBlockRow).where(DiffBlockRow.agent_id.in_(ids)))
                    s.execute(delete(AgentRow).where(AgentRow.group_id == g.id))
                    s.delete(g)
                    journal.schedule_removals(s, gid, [(gid, nbytes)], journal.REMOVE_GROUP)
                journal.collect(self, gid)
                return

    # ------------------------------------------------------------------ maintenance

    @property
    def max_bytes(self) -> int | None:
        """The size budget of ``data/`` in bytes (None: unlimited); persisted."""
        return budget.get_max_bytes(self)

    def set_max_bytes(self, value: int | None) -> None:
        """Set (None: remove) the persisted size budget. Takes effect on the next write;
        use :meth:`evict` to shrink the store to a new, lower budget at once."""
        budget.set_max_bytes(self, value)

    def info(self) -> dict[str, Any]:
        """Schema revision, versions, groups, agents, bytes, ratio, reclaimable bytes."""
        return maintenance.info(self)

    def verify(self, *, repair: bool = False, progress=None) -> maintenance.VerifyReport:  # noqa: ANN001
        """Check catalogue against data (and every chunk's crc32c); see tdstore.maintenance."""
        return maintenance.verify(self, repair=repair, progress=progress)

    def gc(self, *, dry_run: bool = False, progress=None) -> maintenance.GcReport:  # noqa: ANN001
        """Remove data no catalogue row references; ``dry_run`` only reports it."""
        return maintenance.gc(self, dry_run=dry_run, progress=progress)

    def evict(self, max_bytes: int, *, dry_run: bool = False) -> list[budget.Victim]:
        """Evict least-recently-used agents until the data fits in ``max_bytes``."""
        return maintenance.evict(self, max_bytes, dry_run=dry_run)

    def migrate(self, revision: str = "head") -> tuple[str, ...]:
        """Upgrade (or downgrade) the catalogue schema; returns the new revision."""
        self._check_writable()
        from .catalog import known_revisions

        known = known_revisions(self.catalog)
        if revision != "head" and revision not in known:
            raise InvalidInputError(
                f"store {self.path}: schema revision {revision!r} is unknown; expected "
                f"'head' or one of {', '.join(sorted(known))}")
        with file_lock(self.lock_path("store")):
            check_not_newer(self.catalog, str(self.path))
            upgrade(self.catalog, revision)
            if revision == "head":
                maintenance.backfill_checksums(self)
        from .catalog import schema_status

        return schema_status(self.catalog)[0]

    def close(self) -> None:
        """Release the catalogue's connections. The store can be opened again later."""
        self.catalog.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = ", readonly" if self.readonly else ""
        return f"<tdstore.Store {str(self.path)!r}{mode}>"


def _check_attrs(attrs: object, where: str) -> dict[str, Any] | None:
    if attrs is None:
        return None
    import json

    if not isinstance(attrs, dict):
        raise InvalidInputError(f"{where}: attrs must be a dict, got {type(attrs).__name__}")
    try:
        return json.loads(json.dumps(attrs, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{where}: attrs must be JSON-able: {exc}") from None


def _refuse_empty_catalog(path: Path) -> None:
    """An empty (or headerless) catalogue file beside existing data: connecting would
    write a database header into it, so refuse before connecting."""
    catalog = path / CATALOG_FILE
    try:
        size = catalog.stat().st_size
    except FileNotFoundError:
        return
    data = path / DATA_DIR
    held = [p.name for p in data.iterdir() if p.name != "zarr.json"] if data.is_dir() else []
    if size < 100 and held:  # 100 bytes: the SQLite header
        raise CorruptionError(
            f"store {path}: {CATALOG_FILE} is empty ({size} bytes) but data/ holds "
            f"{len(held)} group directories; refusing to initialise it over them "
            f"(restore {CATALOG_FILE} from a backup)")


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


def _check_threshold(value: object, group: str) -> float:
    try:
        t = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise InvalidInputError(
            f"group {group!r}: diff_threshold must be a number, got {value!r}"
        ) from None
    if not np.isfinite(t) or t < 0:
        raise InvalidInputError(f"group {group!r}: diff_threshold must be finite and >= 0, got {t}")
    return t


# --------------------------------------------------------------------------- groups


class Group:
    """Agents that share one master. Get one with :meth:`Store.group`.

    Every method reads the current state from the catalogue, so a Group always reflects
    what other processes have committed.
    """

    def __init__(self, store: Store, name: str):
        self.store = store
        self.name = name

    def __repr__(self) -> str:
        return f"<tdstore.Group {self.name!r} in {str(self.store.path)!r}>"

    # ------------------------------------------------------------------ state

    def _row(self, session) -> GroupRow:  # noqa: ANN001
        return self.store._group_row(session, self.name)

    @staticmethod
    def _spec(g: GroupRow, chunk_blocks: int) -> ArraySpec:
        """The layout of one of the group's arrays (each records its own chunking)."""
        return ArraySpec(tuple(g.block_shape), stored_dtype(g.dtype), chunk_blocks, g.compressor)

    @staticmethod
    def _chunk_for(g: GroupRow, spec: ArraySpec, n_blocks: int) -> int:
        """Blocks per chunk for a new array of ``n_blocks`` blocks in this group."""
        most = g.chunk_blocks or default_chunk_blocks(spec.block_nbytes)
        return balanced_chunk_blocks(n_blocks, most)

    @staticmethod
    def _agents(session, g: GroupRow) -> list[AgentRow]:  # noqa: ANN001
        return list(session.scalars(
            select(AgentRow).where(AgentRow.group_id == g.id)
            .order_by(AgentRow.role != "master", AgentRow.id)
        ))

    @staticmethod
    def _master_and(session, g: GroupRow, agent: str) -> tuple[AgentRow | None,  # noqa: ANN001
                                                               AgentRow | None]:
        """The group's master row and the row of ``agent`` (either may be None)."""
        rows = session.scalars(select(AgentRow).where(
            AgentRow.group_id == g.id, (AgentRow.role == "master") | (AgentRow.name == agent)))
        master = row = None
        for r in rows:
            if r.role == "master":
                master = r
            if r.name == agent:
                row = r
        return master, row

    def _where(self, agent: str | None = None) -> str:
        return f"group {self.name!r}" + (f" agent {agent!r}" if agent is not None else "")

    def _snapshot(self, agent: str) -> AgentSnapshot:
        check_name("agent", agent, f"group {self.name!r}")
        with self.store.catalog.read() as s:
            g = self._row(s)
            check_group_row(g)
            master, row = self._master_and(s, g, agent)
            if master is None:
                raise NoMasterError(f"group {self.name!r}: no master registered")
            if row is None:
                raise NotFoundError(f"group {self.name!r}: unknown agent {agent!r}")
            for r in {row.id: row, master.id: master}.values():
                if r.status != "ok":
                    raise CorruptionError(
                        f"{self._where(agent)}: agent {r.name!r} is {r.status}: its data is "
                        "damaged; re-register it or delete it"
                    )
            idx = np.zeros(0, dtype=np.int64)
            if row.role == "mirror" and row.n_diff:
                idx = np.fromiter(
                    s.scalars(select(DiffBlockRow.block_index)
                              .where(DiffBlockRow.agent_id == row.id)
                              .order_by(DiffBlockRow.slot)),
                    dtype=np.int64,
                )
            self._check_index(g, row, idx)
            return AgentSnapshot(
                group=self.name, agent=agent, role=row.role, master=self._ref(g, master),
                diff=agent_ref(g, row) if row.role != "master" else None,
                dtype_name=g.dtype, block_indices=idx,
                accessed={row.id: row.last_access, master.id: master.last_access},
            )

    @staticmethod
    def _ref(g: GroupRow, row: AgentRow) -> ArrayRef:
        """The committed array of an agent row, checked (see tdstore.integrity)."""
        ref = agent_ref(g, row)
        if ref is None:
            raise CorruptionError(f"group {g.name!r} agent {row.name!r}: no array recorded")
        return ref

    def _check_index(self, g: GroupRow, row: AgentRow, idx: np.ndarray) -> None:
        """The diff index read from the catalogue is the one its writer recorded."""
        if row.role != "mirror":
            return
        problems = index_problems(idx, row.n_diff, g.n_blocks, row.index_crc)
        if problems:
            raise CorruptionError(f"{self._where(row.name)}: diff index is damaged "
                                  f"({'; '.join(problems)}); re-register the agent or "
                                  "delete it")

    def _read(self, agent: str, fn, *, touch: bool = True):  # noqa: ANN001
        """Run ``fn(snapshot)``; if it fails on data that a concurrent writer replaced
        meanwhile, run it again on a fresh snapshot (with a short randomised backoff), so
        churn never surfaces as corruption. Then record the access (for LRU eviction)."""
        snap = self._snapshot(agent)
        delay = 0.0005
        for _ in range(READ_RETRIES):
            try:
                result = fn(snap)
                break
            except CorruptionError:
                fresh = self._snapshot(agent)
                if fresh.arrays_key == snap.arrays_key:
                    raise  # the data this snapshot names is damaged
                snap = fresh
                time.sleep(delay * random.random())
                delay = min(delay * 2, 0.05)
        else:
            raise StorageError(
                f"{self._where(agent)}: the agent was replaced {READ_RETRIES} times while "
                "being read; try again")
        if touch and not self.store.readonly:
            self.store.catalog.touch(snap.accessed, ACCESS_RESOLUTION_S)
        return result

    # ------------------------------------------------------------------ properties

    @property
    def master_id(self) -> str | None:
        """Name of the master agent, or None before one is registered."""
        with self.store.catalog.read() as s:
            g = self._row(s)
            return s.scalars(select(AgentRow.name).where(
                AgentRow.group_id == g.id, AgentRow.role == "master")).first()

    @property
    def diff_threshold(self) -> float:
        with self.store.catalog.read() as s:
            return self._row(s).diff_threshold

    @property
    def n_blocks(self) -> int:
        with self.store.catalog.read() as s:
            return self._row(s).n_blocks

    @property
    def block_shape(self) -> tuple[int, ...] | None:
        with self.store.catalog.read() as s:
            shape = self._row(s).block_shape
            return None if shape is None else tuple(shape)

    @property
    def dtype(self) -> np.dtype | None:
        with self.store.catalog.read() as s:
            g = self._row(s)
            check_group_row(g)
            return None if g.dtype is None else numpy_dtype(g.dtype)

    @property
    def kv_layout(self) -> dict[str, Any] | None:
        with self.store.catalog.read() as s:
            return self._row(s).kv_layout

    def set_diff_threshold(self, value: float) -> None:
        """Change the persisted threshold; it applies to mirrors registered later."""
        self.store.group(self.name, diff_threshold=value, create=False)

    def attrs(self, agent_id: str) -> dict[str, Any]:
        """The attributes stored with an agent (empty if none)."""
        check_name("agent", agent_id, f"group {self.name!r}")
        with self.store.catalog.read() as s:
            _, row = self._master_and(s, self._row(s), agent_id)
        if row is None:
            raise NotFoundError(f"group {self.name!r}: unknown agent {agent_id!r}")
        return dict(row.attrs or {})

    def agents(self) -> list[str]:
        """Agent names: the master first, then mirrors in registration order."""
        with self.store.catalog.read() as s:
            return [a.name for a in self._agents(s, self._row(s))]

    def __contains__(self, agent: object) -> bool:
        if not isinstance(agent, str):
            return False
        with self.store.catalog.read() as s:
            g = self._row(s)
            return s.scalars(select(AgentRow.id).where(
                AgentRow.group_id == g.id, AgentRow.name == agent)).first() is not None

    # ------------------------------------------------------------------ writes

    @contextlib.contextmanager
    def _locked(self) -> Iterator[GroupRow]:
        """The group's writer lock, held on the group the name means *now*: if it was
        deleted and re-created while we waited, the new group's lock is taken instead.
        Journal rows the group's last writer left behind (it died) are collected first.
        """
        self.store._check_writable()
        while True:
            with self.store.catalog.read() as s:
                gid = self._row(s).gid
            with self.store._group_lock(gid), budget_turn(self.store):
                with self.store.catalog.read() as s:  # state as of holding the lock
                    g = s.scalars(select(GroupRow).where(GroupRow.name == self.name)
                                  ).one_or_none()
                    stale = journal.stale_ids(s, gid) if g is not None else []
                if g is None:
                    raise NotFoundError(
                        f"group {self.name!r} does not exist in store {self.store.path} "
                        "(deleted meanwhile)")
                if g.gid != gid:
                    continue  # deleted and re-created meanwhile: lock the new one
                check_group_row(g)
                if stale:
                    journal.collect(self.store, gid, stale)
                try:
                    yield g
                except TdStoreError:
                    raise
                except OSError as exc:  # the write removed what it had put down before this
                    raise StorageError(
                        f"group {self.name!r}: writing failed ({exc}); nothing was committed "
                        "and the store is as it was") from exc
                return

    def _prepare(self, kv: object, what: str, g: GroupRow, *, check: bool = True
                 ) -> tuple[np.ndarray, str]:
        kv, dtype_name = as_blocks(kv, what)
        if check and not g.allow_nonfinite:
            check_finite(kv, dtype_name, what)
        return kv, dtype_name

    @staticmethod
    def _finite_check(g: GroupRow, dtype_name: str, what: str):  # noqa: ANN205
        """The finite check run on each chunk as it is written (the bytes written)."""
        if g.allow_nonfinite:
            return None

        def check(blocks: np.ndarray, first: int) -> None:
            check_finite(blocks, dtype_name, what,
                         block_numbers=np.arange(first, first + blocks.shape[0]))

        return check

    def register_master(self, agent_id: str, kv_blocks: object, *,
                        attrs: dict[str, Any] | None = None) -> None:
        """Store ``kv_blocks`` (``(n_blocks, ...)``) as the group's master.

        A different agent replaces the master and removes every mirror (their data
        becomes unreferenced). Re-registering the current master re-derives each mirror
        against the new blocks, so every mirror still reconstructs to its own values;
        re-registering a master quarantined by ``verify --repair`` restores it and keeps
        its mirrors' stored blocks.

        ``attrs`` (a JSON-able dict) is stored with the agent in the same transaction.
        Raises InvalidInputError for bad arrays or names (nothing is written).
        """
        where = self._where(agent_id)
        check_name("agent", agent_id, f"group {self.name!r}")
        attrs = _check_attrs(attrs, where)
        with self._locked() as g, _Write(self, g) as w:
            # values are checked as they are written (on the bytes written), so bad ones
            # are refused with nothing left behind and the array is scanned once
            kv, dtype_name = self._prepare(kv_blocks, f"{where}: kv_blocks", g, check=False)
            if g.kv_layout and kv.ndim - 1 != len(g.kv_layout["axes"]):
                raise InvalidInputError(
                    f"{where}: blocks of shape {kv.shape[1:]} do not fit the group's kv_layout "
                    f"axes {g.kv_layout['axes']}")
            with self.store.catalog.read() as s:
                agents = self._agents(s, g)
            master = next((a for a in agents if a.role == "master"), None)
            mirrors = [a for a in agents if a.role == "mirror"]
            same_master = master is not None and master.name == agent_id
            shape_kept = (g.block_shape is not None and tuple(g.block_shape) == kv.shape[1:]
                          and g.dtype == dtype_name)
            if same_master and mirrors and not (shape_kept and g.n_blocks == kv.shape[0]):
                raise InvalidInputError(
                    f"{where}: re-registering the master with shape {kv.shape} and dtype "
                    f"{dtype_name} would break its {len(mirrors)} mirror(s) of shape "
                    f"{(g.n_blocks, *(g.block_shape or ()))} and dtype {g.dtype}; delete "
                    "them first or register a different master"
                )
            spec = ArraySpec(kv.shape[1:], stored_dtype(dtype_name), 1, g.compressor)
            spec = replace(spec, chunk_blocks=self._chunk_for(g, spec, kv.shape[0]))
            arrays = self.store.arrays
            room = Reservation(self.store, g.gid, frozenset(a.name for a in agents))
            path = w.new_array("m", arrays.estimate_nbytes(spec, kv.shape[0]),
                               f"{where}: the master", room)
            nbytes, crcs = arrays.create_and_write(
                path, spec, kv.view(spec.dtype),
                check=self._finite_check(g, dtype_name, f"{where}: kv_blocks"))
            mref = ArrayRef(path, spec, kv.shape[0], tuple(crcs))
            rederived = []
            # a quarantined master is being restored: its mirrors' own blocks are
            # intact and stay as stored (they cannot be rebuilt through damaged data)
            if same_master and mirrors and master.status == "ok":
                for m in mirrors:
                    old = self._read(m.name, self._full, touch=False)
                    rederived.append((m, self._write_diff(g, mref, old, w, room=room)))
            kept_mirrors = same_master and not rederived
            t = now()
            with w.commit() as (s, row):
                for a in agents:
                    if a.array and not (kept_mirrors and a.role == "mirror"):
                        w.unreference(a.array, a.nbytes)
                if not same_master:
                    ids = [a.id for a in agents]
                    s.execute(delete(DiffBlockRow).where(DiffBlockRow.agent_id.in_(ids)))
                    s.execute(delete(AgentRow).where(AgentRow.id.in_(ids)))
                    s.flush()
                    s.add(AgentRow(group_id=row.id, name=agent_id, role="master", array=path,
                                   chunk_blocks=spec.chunk_blocks, n_diff=0, nbytes=nbytes,
                                   status="ok", created_at=t, updated_at=t, last_access=t,
                                   attrs=attrs, chunk_crcs=crcs))
                else:
                    mrow = s.get(AgentRow, master.id)
                    mrow.array, mrow.nbytes, mrow.updated_at, mrow.status = path, nbytes, t, "ok"
                    mrow.chunk_blocks, mrow.attrs, mrow.chunk_crcs = spec.chunk_blocks, attrs, crcs
                    for m, diff in rederived:
                        self._store_diff_rows(s, s.get(AgentRow, m.id), diff, t)
                row.dtype, row.block_shape = dtype_name, list(kv.shape[1:])
                row.n_blocks, row.updated_at = kv.shape[0], t

    def _full(self, snap: AgentSnapshot) -> np.ndarray:
        out = np.empty(snap.shape, snap.dtype)
        reconstruct_into(self.store.arrays, snap, out)
        return out

    def _diff_indices(self, g: GroupRow, mref: ArrayRef, kv: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Blocks of ``kv`` that differ from the stored master, and the master's values of
        those blocks. The master is read and compared in parallel batches of bounded size.
        """
        def compare(start: int, load) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
            master = load().view(kv.dtype)
            stop = start + master.shape[0]
            kept = np.flatnonzero(diff_mask(master, kv[start:stop], g.diff_threshold))
            return kept + start, master[kept]

        loaders = self.store.arrays.mapped(mref, 0, kv.shape[0])
        parts = run_all([lambda s=s, f=f: compare(s, f) for s, f in loaders])
        if not parts:
            return np.zeros(0, np.int64), np.empty((0, *mref.spec.block_shape), kv.dtype)
        return (np.concatenate([p[0] for p in parts]).astype(np.int64),
                np.concatenate([p[1] for p in parts]))

    def _write_diff(self, g: GroupRow, mref: ArrayRef, kv: np.ndarray, w: _Write,
                    what: str = "", room: Reservation | None = None) -> _WrittenDiff:
        """Write the mirror's own differing blocks (``mref``: the master they differ from).

        Only the kept blocks need the finite check: a dropped block is byte-identical to,
        or within a finite distance of, a finite master block, so it is finite itself.
        The values written are a private copy, so what is checked is what is written.
        """
        spec = mref.spec
        idx, master_values = self._diff_indices(g, mref, kv)
        values = kv[idx]
        if what and not g.allow_nonfinite:
            check_finite(values, g.dtype, what, block_numbers=idx)
        if idx.size == 0:
            return _WrittenDiff(idx, None, None, 0, values, master_values, None)
        dspec = replace(spec, chunk_blocks=self._chunk_for(g, spec, idx.size))
        path = w.new_array("d", self.store.arrays.estimate_nbytes(dspec, idx.size),
                           what or f"group {self.name!r}: a mirror", room)
        nbytes, crcs = self.store.arrays.create_and_write(path, dspec, values.view(spec.dtype))
        return _WrittenDiff(idx, path, dspec.chunk_blocks, nbytes, values, master_values, crcs)

    @staticmethod
    def _store_diff_rows(s, row: AgentRow, diff: _WrittenDiff, t: float) -> None:  # noqa: ANN001
        s.execute(delete(DiffBlockRow).where(DiffBlockRow.agent_id == row.id))
        if diff.indices.size:
            s.execute(insert(DiffBlockRow), [
                {"agent_id": row.id, "block_index": int(b), "slot": i}
                for i, b in enumerate(diff.indices.tolist())
            ])
        row.array, row.chunk_blocks = diff.path, diff.chunk_blocks
        row.n_diff, row.nbytes = int(diff.indices.size), diff.nbytes
        row.chunk_crcs, row.index_crc = diff.crcs, index_checksum(diff.indices)
        row.updated_at = t
        row.status = "ok"

    def register_mirror(self, agent_id: str, kv_blocks: object, *,
                        attrs: dict[str, Any] | None = None) -> SparseKVDiff:
        """Store ``kv_blocks`` as a mirror: only the blocks that differ from the master.

        Re-registering a mirror replaces it atomically. Returns the stored diff.
        ``attrs`` (a JSON-able dict) is stored with the agent in the same transaction.
        Raises NoMasterError without a master, InvalidInputError for a shape or dtype
        that does not match the master (nothing is written).
        """
        where = self._where(agent_id)
        check_name("agent", agent_id, f"group {self.name!r}")
        attrs = _check_attrs(attrs, where)
        with self._locked() as g, _Write(self, g) as w:
            with self.store.catalog.read() as s:
                master, old = self._master_and(s, g, agent_id)
            if master is None:
                raise NoMasterError(
                    f"{where}: register_master() must be called before register_mirror()"
                )
            if master.name == agent_id:
                raise InvalidInputError(
                    f"{where} is the group's master; use register_master() to replace it"
                )
            what = f"{where}: kv_blocks"
            kv, dtype_name = self._prepare(kv_blocks, what, g, check=False)
            master_shape = (g.n_blocks, *g.block_shape)
            if kv.shape != master_shape:
                raise InvalidInputError(
                    f"{where}: kv_blocks shape {kv.shape} must match master shape {master_shape}"
                )
            if dtype_name != g.dtype:
                raise InvalidInputError(
                    f"{where}: kv_blocks dtype {dtype_name} must match master dtype {g.dtype}"
                )
            room = Reservation(self.store, g.gid, frozenset({agent_id}))
            diff = self._write_diff(g, self._ref(g, master), kv, w, what, room)
            t = now()
            with w.commit() as (s, _):
                if old is None:
                    row = AgentRow(group_id=g.id, name=agent_id, role="mirror", n_diff=0,
                                   nbytes=0, status="ok", created_at=t, updated_at=t,
                                   last_access=t)
                    s.add(row)
                    s.flush()
                else:
                    row = s.get(AgentRow, old.id)
                    w.unreference(old.array, old.nbytes)
                self._store_diff_rows(s, row, diff, t)
                row.last_access, row.attrs = t, attrs
                s.get(AgentRow, master.id).last_access = t  # the diff read the master
        return SparseKVDiff(block_indices=diff.indices, total_blocks=kv.shape[0],
                            threshold=g.diff_threshold, values=diff.values,
                            master_values=diff.master_values)

    def _master_blocks(self, master: str, idx: np.ndarray) -> np.ndarray:
        return self._read(master, lambda snap: read_blocks(self.store.arrays, snap, idx))

    def collective_reuse_step(self, agent_ids: Sequence[str], shared_blocks: object
                              ) -> dict[str, int]:
        """Append ``shared_blocks`` to the master once; every mirror adopts them.

        Agents named in ``agent_ids`` that are not in the group join as mirrors identical
        to the master. Cost is O(new blocks): existing chunks are not rewritten. Returns
        the number of diff blocks of the master and of each agent named.
        """
        if isinstance(agent_ids, str):
            raise InvalidInputError(f"group {self.name!r}: agent_ids must be a list of names, "
                                    f"not the string {agent_ids[:80]!r}")
        names = [check_name("agent", a, f"group {self.name!r}") for a in agent_ids]
        with self._locked() as g, _Write(self, g) as w:
            with self.store.catalog.read() as s:
                agents = {a.name: a for a in self._agents(s, g)}
            master = next((a for a in agents.values() if a.role == "master"), None)
            if master is None:
                raise NoMasterError(f"group {self.name!r}: no master registered")
            what = f"group {self.name!r}: shared_blocks"
            new, dtype_name = self._prepare(shared_blocks, what, g)
            if new.shape[1:] != tuple(g.block_shape) or dtype_name != g.dtype:
                raise InvalidInputError(
                    f"{what} blocks of shape {new.shape[1:]} and dtype {dtype_name} must match "
                    f"the master's blocks of shape {tuple(g.block_shape)} and dtype {g.dtype}"
                )
            mref = self._ref(g, master)
            spec = mref.spec
            n_new = g.n_blocks + new.shape[0]
            arrays = self.store.arrays
            crcs = master.chunk_crcs
            if new.shape[0]:
                # the replaced last chunk and zarr.json exist twice for a moment
                grown = (arrays.estimate_nbytes(spec, n_new) - master.nbytes
                         + spec.chunk_nbytes + 4096)
                w.append(master.array, grown, what,
                         Reservation(self.store, g.gid, frozenset(names)))
                arrays.resize(master.array, spec, n_new)
                crcs = arrays.write(mref, new.view(spec.dtype),
                                    check=self._finite_check(g, dtype_name, what))
            t = now()
            counts = {master.name: 0}
            with w.commit() as (s, row):
                row.n_blocks, row.updated_at = n_new, t
                mrow = s.get(AgentRow, master.id)
                mrow.nbytes, mrow.last_access = arrays.nbytes(master.array), t
                mrow.chunk_crcs = crcs
                for name in names:
                    if name == master.name:
                        continue
                    if name not in agents:
                        s.add(AgentRow(group_id=g.id, name=name, role="mirror", n_diff=0,
                                       nbytes=0, status="ok", created_at=t, updated_at=t,
                                       last_access=t, index_crc=index_checksum(
                                           np.zeros(0, np.int64))))
                        agents[name] = None  # a name given twice joins once
                        counts[name] = 0
                    else:
                        counts[name] = agents[name].n_diff if agents[name] else 0
        return counts

    def delete(self, agent_id: str) -> None:
        """Delete an agent and its data.

        The master can be deleted only once it has no mirrors (delete them, or the whole
        group with ``Store.delete_group``). Raises NotFoundError for an unknown agent.
        """
        check_name("agent", agent_id, f"group {self.name!r}")
        with self._locked() as g, _Write(self, g) as w, w.commit() as (s, grow):
            rows = self._agents(s, g)
            row = next((a for a in rows if a.name == agent_id), None)
            if row is None:
                raise NotFoundError(f"group {self.name!r}: unknown agent {agent_id!r}")
            if row.role == "master" and len(rows) > 1:
                raise StateError(
                    f"{self._where(agent_id)} is the master of {len(rows) - 1} mirror(s); "
                    "delete the mirrors first or delete the whole group"
                )
            w.unreference(row.array, row.nbytes)
            s.execute(delete(DiffBlockRow).where(DiffBlockRow.agent_id == row.id))
            s.delete(row)
            if row.role == "master":
                grow.n_blocks, grow.dtype, grow.block_shape = 0, None, None
                grow.updated_at = now()

    def _replace_all(self, new_master: str) -> None:
        """Rewrite every agent of the group against ``new_master``, atomically.

        Each agent is rebuilt from the committed state (one at a time: memory stays at one
        agent plus the new master) and re-diffed; one transaction swaps in the new arrays
        and roles. Backs ``rebase`` and ``compact``.
        """
        with self._locked() as g, _Write(self, g) as w:
            with self.store.catalog.read() as s:
                agents = self._agents(s, g)
            names = [a.name for a in agents]
            if new_master not in names:
                raise NotFoundError(f"group {self.name!r}: unknown agent {new_master!r}")
            master_kv = self._read(new_master, self._full, touch=False)
            spec = ArraySpec(master_kv.shape[1:], stored_dtype(g.dtype), 1, g.compressor)
            spec = replace(spec, chunk_blocks=self._chunk_for(g, spec, master_kv.shape[0]))
            arrays = self.store.arrays
            room = Reservation(self.store, g.gid, frozenset(names))
            path = w.new_array("m", arrays.estimate_nbytes(spec, master_kv.shape[0]),
                               f"group {self.name!r}", room)
            nbytes, crcs = arrays.create_and_write(path, spec, master_kv.view(spec.dtype))
            mref = ArrayRef(path, spec, master_kv.shape[0], tuple(crcs))
            diffs = {}
            for a in agents:
                if a.name != new_master:
                    kv = self._read(a.name, self._full, touch=False)
                    diffs[a.id] = self._write_diff(g, mref, kv, w, room=room)
            t = now()
            with w.commit() as (s, _):
                for a in agents:  # demote first: one master per group at any time
                    s.get(AgentRow, a.id).role = "mirror"
                    w.unreference(a.array, a.nbytes)
                s.flush()
                for a in agents:
                    row = s.get(AgentRow, a.id)
                    if a.name == new_master:
                        s.execute(delete(DiffBlockRow).where(DiffBlockRow.agent_id == a.id))
                        row.role, row.array = "master", path
                        row.chunk_blocks, row.n_diff = spec.chunk_blocks, 0
                        row.nbytes, row.updated_at = nbytes, t
                        row.chunk_crcs, row.index_crc = crcs, None
                    else:
                        self._store_diff_rows(s, row, diffs[a.id], t)

    # ------------------------------------------------------------------ reads

    def reconstruct(self, agent_id: str, out: np.ndarray | None = None, *,
                    device: Any = None) -> Any:
        """The agent's full KV blocks, bit-exact for every kept block.

        With ``out`` (an ndarray or ``np.memmap`` of the right shape and dtype) the blocks
        are written into it and ``out`` is returned; no full-size temporary is made.
        With ``device`` (e.g. ``"cpu"``, ``"cuda"``, a ``torch.device``) the result is a
        torch tensor there, in the same dtype (bfloat16 included); for CUDA the blocks
        are read straight into pinned host memory and copied once.
        Raises NotFoundError for an unknown agent, CorruptionError for damaged data.
        """
        if device is not None:
            if out is not None:
                raise InvalidInputError(f"{self._where(agent_id)}: give out= or device=, "
                                        "not both")
            from .integrations.torch import reconstruct_to_device

            return reconstruct_to_device(self, agent_id, device)

        def run(snap: AgentSnapshot) -> np.ndarray:
            target = np.empty(snap.shape, snap.dtype) if out is None else out
            check_out(snap, target)
            reconstruct_into(self.store.arrays, snap, target)
            return target

        return self._read(agent_id, run)

    def view(self, agent_id: str) -> BlockView:
        """A lazy view of the agent's blocks; indexing reads only the blocks asked for."""
        self._snapshot(agent_id)  # unknown agents fail here, not on first use
        return BlockView(self, agent_id)

    def mirror(self, agent_id: str) -> SparseKVDiff:
        """The stored diff of a mirror (the master has an empty one)."""

        def run(snap: AgentSnapshot) -> SparseKVDiff:
            idx = snap.block_indices
            values = read_blocks(self.store.arrays, snap, idx) if idx.size else \
                np.empty((0, *snap.spec.block_shape), snap.dtype)
            master = self._master_blocks(self.master_id, idx) if idx.size else values
            return SparseKVDiff(block_indices=idx, total_blocks=snap.n_blocks,
                                threshold=self.diff_threshold, values=values,
                                master_values=master)

        return self._read(agent_id, run)

    # ------------------------------------------------------------------ introspection

    def stats(self) -> dict[str, Any]:
        """The seed's statistics plus the layout and bytes (logical and on disk)."""
        with self.store.catalog.read() as s:
            g = self._row(s)
            check_group_row(g)
            agents = self._agents(s, g)
        master = next((a for a in agents if a.role == "master"), None)
        mirrors = [a for a in agents if a.role == "mirror"]
        n = g.n_blocks if master is not None else 0
        block_nbytes = self._spec(g, 1).block_nbytes if g.dtype else 0
        diff_total = sum(a.n_diff for a in mirrors)
        return {
            "master_id": master.name if master else "",
            "master_blocks": n,
            "n_mirrors": len(mirrors),
            "diff_blocks_total": diff_total,
            "compression_ratio": _ratio(len(agents), n, diff_total),
            "diff_threshold": g.diff_threshold,
            "n_blocks": n,
            "block_shape": tuple(g.block_shape) if g.block_shape else None,
            "dtype": g.dtype,
            "bytes_logical": len(agents) * n * block_nbytes,
            "bytes_stored": sum(a.nbytes for a in agents),
        }

    def compression_ratio(self) -> float:
        """(agents x master blocks) / (master blocks + diff blocks); 1.0 without a master."""
        return self.stats()["compression_ratio"]

    # ------------------------------------------------------------------ maintenance

    def rebase(self, master: str | None = None) -> dict[str, Any]:
        """Make ``master`` (None: the agent minimising the total diff) the master and
        re-derive every mirror, atomically."""
        return maintenance.rebase(self, master)

    def compact(self) -> dict[str, Any]:
        """Rewrite the group tightly (re-balanced chunks), atomically."""
        return maintenance.compact(self)

    def export(self, agent_id: str, file: str | os.PathLike[str]) -> dict[str, Any]:
        """Write an agent's blocks to a .npy or .safetensors file."""
        return maintenance.export_agent(self, agent_id, file)

    def import_file(self, agent_id: str, file: str | os.PathLike[str], *,
                    master: bool = False, dtype: str | None = None) -> dict[str, Any]:
        """Register an agent from a .npy or .safetensors file (as a mirror unless
        ``master``, or when the group has no master yet)."""
        kv = maintenance.load_file(file, dtype)
        as_master = master or self.master_id is None
        if as_master:
            self.register_master(agent_id, kv)
            n_diff = int(kv.shape[0])
        else:
            n_diff = self.register_mirror(agent_id, kv).n_diff_blocks
        return {"group": self.name, "agent": agent_id, "role": "master" if as_master
                else "mirror", "blocks": int(kv.shape[0]), "diff_blocks": n_diff}


def _ratio(n_agents: int, master_blocks: int, diff_blocks: int) -> float:
    if n_agents == 0:
        return 1.0
    stored = master_blocks + diff_blocks
    return float(n_agents) if stored == 0 else n_agents * master_blocks / stored


@dataclass(frozen=True)
class _WrittenDiff:
    """A mirror's differing blocks as just written: indices, array path, chunking, bytes."""

    indices: np.ndarray
    path: str | None
    chunk_blocks: int | None
    nbytes: int
    values: np.ndarray  # the mirror's values of those blocks
    master_values: np.ndarray  # the master's values of those blocks
    crcs: list[int] | None  # per-chunk checksums of the array


class _Write:
    """The data one write puts down, journaled before any byte is written.

    ``new_array`` / ``append`` reserve room under the budget and journal the data;
    ``commit`` makes it visible in one transaction (with signals held back) that also
    checks the group is still the one locked, and journals what the commit
    unreferences (``unreference``), which is removed right after. On any exception,
    the signals included, what this write journaled is removed if, and only if, a fresh
    read of the catalogue shows nothing references it.
    """

    def __init__(self, group: Group, g: GroupRow):
        self.store, self.g, self.name = group.store, g, group.name
        self.ids: list[int] = []
        self.obsolete: list[tuple[str, int]] = []
        self.created_dir = False  # this write created data/<gid>

    def __enter__(self) -> _Write:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc_type is None:
            return
        with contextlib.suppress(Exception):
            if self.ids:
                journal.collect(self.store, self.g.gid, self.ids)
            # a group directory this write created holds nothing committed unless a
            # row says so (the interruption may have come after the commit)
            if self.created_dir and not journal.references_under(self.store, self.g.gid):
                self.store.arrays.remove_group_dir(self.g.gid)

    def new_array(self, kind: str, nbytes: int, what: str, room: Reservation | None) -> str:
        if room is not None:
            room.need(nbytes, what)
        self.created_dir |= self.store.arrays.new_group_dir(self.g.gid)
        path = self.store.arrays.new_path(self.g.gid, kind)
        self.ids.append(journal.record(self.store, self.g.gid, path, journal.WRITE, nbytes))
        return path

    def append(self, path: str, nbytes: int, what: str, room: Reservation) -> None:
        room.need(nbytes, what)
        self.ids.append(journal.record(self.store, self.g.gid, path, journal.APPEND, nbytes))

    def unreference(self, path: str | None, nbytes: int) -> None:
        if path:
            self.obsolete.append((path, nbytes))

    @contextlib.contextmanager
    def commit(self) -> Iterator[tuple[Any, GroupRow]]:
        with deferred_signals():
            with self.store.catalog.write() as s:
                row = s.get(GroupRow, self.g.id)
                if row is None or row.gid != self.g.gid:  # cannot happen under the lock
                    raise StateError(f"group {self.name!r} was deleted during the write; "
                                     "nothing was committed")
                yield s, row
                journal.settle(s, self.ids)
                removals = journal.schedule_removals(s, self.g.gid, self.obsolete)
            self.ids = []
        journal.collect(self.store, self.g.gid, removals)


class BlockView:
    """A lazy, read-only view of one agent's blocks: ``view[i:j]``, ``view[[3, 7]]``.

    Each access reads the current catalogue state and only the blocks asked for.
    """

    def __init__(self, group: Group, agent: str):
        self.group = group
        self.agent = agent

    def _snap(self) -> AgentSnapshot:
        return self.group._snapshot(self.agent)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._snap().shape

    @property
    def dtype(self) -> np.dtype:
        return self._snap().dtype

    def __len__(self) -> int:
        return self._snap().n_blocks

    def __getitem__(self, key) -> np.ndarray:  # noqa: ANN001
        def run(snap: AgentSnapshot) -> np.ndarray:
            idx, scalar = normalize_index(key, snap.n_blocks, snap.label)
            blocks = read_blocks(self.group.store.arrays, snap, idx)
            return blocks[0] if scalar else blocks

        return self.group._read(self.agent, run)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # noqa: ANN001
        full = self.group.reconstruct(self.agent)
        return full if dtype is None else full.astype(dtype)

    def __repr__(self) -> str:
        return f"<tdstore.BlockView {self.group.name!r}/{self.agent!r} shape={self.shape}>"


def open(  # noqa: A001 - the library's entry point mirrors builtins.open on purpose
    path: str | os.PathLike[str],
    *,
    url: str | None = None,
    readonly: bool = False,
    verify_reads: bool = False,
    max_bytes: int | None = None,
    create: bool = True,
) -> Store:
    """Open (creating if missing) the store at directory ``path``.

    ``url`` replaces the local SQLite catalogue with any SQLAlchemy URL; ``readonly``
    opens without writing anything (also on a directory the process cannot write);
    ``verify_reads`` checks every chunk's crc32c on read; ``max_bytes`` sets (and
    persists) a size budget for the data, kept by evicting least-recently-used agents;
    ``create=False`` refuses a directory that holds no store instead of creating one.
    Raises SchemaError if the store was written by a newer tdstore.
    """
    return Store(path, url=url, readonly=readonly, verify_reads=verify_reads,
                 max_bytes=max_bytes, create=create)
