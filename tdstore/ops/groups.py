"""The operations on one group: its state, reads and writes (the write protocol).

Every write follows the same protocol (README, "Crash safety: the write protocol"):

1. validate the input completely, before anything is written;
2. take the group's writer lock (``StoreContext.locks``) on the group the name means
   now, so writers of one group are serialised across threads and processes, and
   re-read the group's state;
3. journal the arrays about to be written (``tdstore.ops.journal``), then write the
   data under fresh paths (or, for a master append, only past the committed length),
   fsync the files and their directories;
4. make the new state visible in one catalogue transaction, with signals held back;
5. remove the data the transaction made unreferenced (a crash leaves it journaled).

On any failure, what the write journaled is removed only if a fresh read of the
catalogue shows nothing references it. Readers trust only the catalogue: a read takes
one catalogue snapshot and reads the arrays it names, retrying on a fresh snapshot if a
writer replaced them meanwhile. Unreferenced data is never read.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from sqlalchemy import delete as sa_delete
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from tdstore.core import tensors
from tdstore.core.diff import diff_mask
from tdstore.core.dtypes import numpy_dtype, stored_dtype
from tdstore.core.errors import (
    CorruptionError,
    InvalidInputError,
    NoMasterError,
    NotFoundError,
    StateError,
    StorageError,
    TdStoreError,
)
from tdstore.core.ids import new_array_path
from tdstore.core.kinds import JournalOp, Role, Status
from tdstore.core.layout import (
    ArrayRef,
    ArraySpec,
    balanced_chunk_blocks,
    default_chunk_blocks,
)
from tdstore.core.sparse import SparseKVDiff
from tdstore.core.validate import (
    as_blocks,
    check_attrs,
    check_finite,
    check_name,
    check_threshold,
)
from tdstore.ops import journal
from tdstore.ops.budget import Reservation, budget_turn
from tdstore.storage.arrays import run_all
from tdstore.storage.catalog import AgentRow, DiffBlockRow, GroupRow, delete_agents, now
from tdstore.storage.integrity import (
    agent_ref,
    check_group_row,
    checked_attrs,
    group_layout,
    index_checksum,
    index_problems,
    seal_attrs,
)
from tdstore.storage.locks import deferred_signals
from tdstore.storage.reads import (
    AgentSnapshot,
    check_out,
    normalize_index,
    read_blocks,
    reconstruct_into,
)

if TYPE_CHECKING:
    from types import TracebackType

    import torch

    from tdstore.ops.context import StoreContext

T = TypeVar("T")
# A read that finds its data replaced by a concurrent writer retries on a fresh
# snapshot (with a randomised backoff); it gives up only if the data it read is damaged
# (the same snapshot fails again) or after this many replacements in a row.
READ_RETRIES = 200
# last_access is recorded at most this often per agent (reads stay read-mostly)
ACCESS_RESOLUTION_S = 1.0


class GroupOps:
    """The operations on one group of an open store: its state, reads and writes.

    Every method reads the current state from the catalogue, so it always reflects what
    other processes have committed. ``tdstore.Group`` is the public face of one.
    """

    def __init__(self, ctx: StoreContext, name: str):
        self.ctx = ctx
        self.name = name

    # ------------------------------------------------------------------ state

    def row(self, session: Session) -> GroupRow:
        return self.ctx.group_row(session, self.name)

    @staticmethod
    def spec(g: GroupRow, chunk_blocks: int) -> ArraySpec:
        """The layout of one of the group's arrays (each records its own chunking)."""
        dtype_name, block_shape = group_layout(g)
        return ArraySpec(block_shape, stored_dtype(dtype_name), chunk_blocks, g.compressor)

    @staticmethod
    def chunk_for(g: GroupRow, spec: ArraySpec, n_blocks: int) -> int:
        """Blocks per chunk for a new array of ``n_blocks`` blocks in this group."""
        most = g.chunk_blocks or default_chunk_blocks(spec.block_nbytes)
        return balanced_chunk_blocks(n_blocks, most)

    @staticmethod
    def agents_of(session: Session, g: GroupRow) -> list[AgentRow]:
        return list(session.scalars(
            select(AgentRow).where(AgentRow.group_id == g.id)
            .order_by(AgentRow.role != Role.MASTER, AgentRow.id)
        ))

    @staticmethod
    def master_and(session: Session, g: GroupRow, agent: str
                   ) -> tuple[AgentRow | None, AgentRow | None]:
        """The group's master row and the row of ``agent`` (either may be None)."""
        rows = session.scalars(select(AgentRow).where(
            AgentRow.group_id == g.id, (AgentRow.role == Role.MASTER) | (AgentRow.name == agent)))
        master = row = None
        for r in rows:
            if r.role == Role.MASTER:
                master = r
            if r.name == agent:
                row = r
        return master, row

    def where(self, agent: str | None = None) -> str:
        return f"group {self.name!r}" + (f" agent {agent!r}" if agent is not None else "")

    def snapshot(self, agent: str) -> AgentSnapshot:
        check_name("agent", agent, f"group {self.name!r}")
        with self.ctx.catalog.read() as s:
            g = self.row(s)
            check_group_row(g)
            master, row = self.master_and(s, g, agent)
            if master is None:
                raise NoMasterError(f"group {self.name!r}: no master registered")
            if row is None:
                raise NotFoundError(f"group {self.name!r}: unknown agent {agent!r}")
            for r in {row.id: row, master.id: master}.values():
                if r.status != Status.OK:
                    raise CorruptionError(
                        f"{self.where(agent)}: agent {r.name!r} is {r.status}: its data is "
                        "damaged; re-register it or delete it"
                    )
            idx: np.ndarray = np.zeros(0, dtype=np.int64)
            if row.role == Role.MIRROR and row.n_diff:
                idx = np.fromiter(
                    s.scalars(select(DiffBlockRow.block_index)
                              .where(DiffBlockRow.agent_id == row.id)
                              .order_by(DiffBlockRow.slot)),
                    dtype=np.int64,
                )
            self._check_index(g, row, idx)
            return AgentSnapshot(
                group=self.name, agent=agent, role=row.role, master=self.ref(g, master),
                diff=agent_ref(g, row) if row.role != Role.MASTER else None,
                dtype_name=group_layout(g)[0], block_indices=idx,
                accessed={row.id: row.last_access, master.id: master.last_access},
            )

    @classmethod
    def master_snapshot(cls, g: GroupRow, row: AgentRow) -> AgentSnapshot:
        """The snapshot of a master from rows read in one catalogue transaction (for
        callers that located many masters with one query, e.g. keyed chunks)."""
        check_group_row(g)
        if row.role != Role.MASTER or row.group_id != g.id:
            raise CorruptionError(f"group {g.name!r} agent {row.name!r}: not its master")
        if row.status != Status.OK:
            raise CorruptionError(f"group {g.name!r} agent {row.name!r} is {row.status}: "
                                  "its data is damaged; re-register it or delete it")
        return AgentSnapshot(
            group=g.name, agent=row.name, role=row.role, master=cls.ref(g, row), diff=None,
            dtype_name=group_layout(g)[0], block_indices=np.zeros(0, dtype=np.int64),
            accessed={row.id: row.last_access})

    @staticmethod
    def ref(g: GroupRow, row: AgentRow) -> ArrayRef:
        """The committed array of an agent row, checked (see tdstore.storage.integrity)."""
        ref = agent_ref(g, row)
        if ref is None:
            raise CorruptionError(f"group {g.name!r} agent {row.name!r}: no array recorded")
        return ref

    def _check_index(self, g: GroupRow, row: AgentRow, idx: np.ndarray) -> None:
        """The diff index read from the catalogue is the one its writer recorded."""
        if row.role != Role.MIRROR:
            return
        problems = index_problems(idx, row.n_diff, g.n_blocks, row.index_crc)
        if problems:
            raise CorruptionError(f"{self.where(row.name)}: diff index is damaged "
                                  f"({'; '.join(problems)}); re-register the agent or "
                                  "delete it")

    def read(self, agent: str, fn: Callable[[AgentSnapshot], T], *, touch: bool = True) -> T:
        """Run ``fn(snapshot)``; if it fails on data that a concurrent writer replaced
        meanwhile, run it again on a fresh snapshot (with a short randomised backoff), so
        churn never surfaces as corruption. Then record the access (for LRU eviction)."""
        snap = self.snapshot(agent)
        delay = 0.0005
        for _ in range(READ_RETRIES):
            try:
                result = fn(snap)
                break
            except CorruptionError:
                fresh = self.snapshot(agent)
                if fresh.arrays_key == snap.arrays_key:
                    raise  # the data this snapshot names is damaged
                snap = fresh
                time.sleep(delay * random.random())
                delay = min(delay * 2, 0.05)
        else:
            raise StorageError(
                f"{self.where(agent)}: the agent was replaced {READ_RETRIES} times while "
                "being read; try again")
        if touch and not self.ctx.readonly:
            self.ctx.catalog.touch(snap.accessed, ACCESS_RESOLUTION_S)
        return result

    # ------------------------------------------------------------------ properties

    @property
    def master_id(self) -> str | None:
        """Name of the master agent, or None before one is registered."""
        with self.ctx.catalog.read() as s:
            g = self.row(s)
            return s.scalars(select(AgentRow.name).where(
                AgentRow.group_id == g.id, AgentRow.role == Role.MASTER)).first()

    @property
    def diff_threshold(self) -> float:
        with self.ctx.catalog.read() as s:
            return self.row(s).diff_threshold

    @property
    def n_blocks(self) -> int:
        with self.ctx.catalog.read() as s:
            return self.row(s).n_blocks

    @property
    def block_shape(self) -> tuple[int, ...] | None:
        with self.ctx.catalog.read() as s:
            shape = self.row(s).block_shape
            return None if shape is None else tuple(shape)

    @property
    def dtype(self) -> np.dtype | None:
        with self.ctx.catalog.read() as s:
            g = self.row(s)
            check_group_row(g)
            return None if g.dtype is None else numpy_dtype(g.dtype)

    @property
    def kv_layout(self) -> dict[str, Any] | None:
        with self.ctx.catalog.read() as s:
            return self.row(s).kv_layout

    def set_diff_threshold(self, value: float) -> None:
        """Change the persisted threshold; it applies to mirrors registered later."""
        self.ctx.open_group(self.name, {"diff_threshold": check_threshold(value, self.name)},
                            create=False)

    def attrs(self, agent_id: str) -> dict[str, Any]:
        """The attributes stored with an agent (empty if none)."""
        check_name("agent", agent_id, f"group {self.name!r}")
        with self.ctx.catalog.read() as s:
            _, row = self.master_and(s, self.row(s), agent_id)
        if row is None:
            raise NotFoundError(f"group {self.name!r}: unknown agent {agent_id!r}")
        return checked_attrs(row.attrs, f"catalogue: group {self.name!r} agent {agent_id!r}",
                             self.name, agent_id)

    def agents(self) -> list[str]:
        """Agent names: the master first, then mirrors in registration order."""
        with self.ctx.catalog.read() as s:
            return [a.name for a in self.agents_of(s, self.row(s))]

    def __contains__(self, agent: object) -> bool:
        if not isinstance(agent, str):
            return False
        with self.ctx.catalog.read() as s:
            g = self.row(s)
            return s.scalars(select(AgentRow.id).where(
                AgentRow.group_id == g.id, AgentRow.name == agent)).first() is not None

    # ------------------------------------------------------------------ writes

    @contextlib.contextmanager
    def locked(self) -> Iterator[GroupRow]:
        """The group's writer lock, held on the group the name means *now*: if it was
        deleted and re-created while we waited, the new group's lock is taken instead.
        Journal rows the group's last writer left behind (it died) are collected first.
        """
        self.ctx.check_writable()
        while True:
            with self.ctx.catalog.read() as s:
                gid = self.row(s).gid
            with self.ctx.locks.hold(gid), budget_turn(self.ctx):
                with self.ctx.catalog.read() as s:  # state as of holding the lock
                    g = s.scalars(select(GroupRow).where(GroupRow.name == self.name)
                                  ).one_or_none()
                    stale = journal.stale_ids(s, gid) if g is not None else []
                if g is None:
                    raise NotFoundError(
                        f"group {self.name!r} does not exist in store {self.ctx.path} "
                        "(deleted meanwhile)")
                if g.gid != gid:
                    continue  # deleted and re-created meanwhile: lock the new one
                check_group_row(g)
                if stale:
                    journal.collect(self.ctx, gid, stale)
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
    def _finite_check(g: GroupRow, dtype_name: str, what: str
                      ) -> Callable[[np.ndarray, int], None] | None:
        """The finite check run on each chunk as it is written (the bytes written)."""
        if g.allow_nonfinite:
            return None

        def check(blocks: np.ndarray, first: int) -> None:
            check_finite(blocks, dtype_name, what,
                         block_numbers=np.arange(first, first + blocks.shape[0]))

        return check

    def _checked_agent(self, agent: str, attrs: object) -> tuple[str, dict[str, Any] | None]:
        """A write's agent name and attrs, validated: (where, attrs)."""
        check_name("agent", agent, f"group {self.name!r}")
        where = self.where(agent)
        checked = check_attrs(attrs, where)
        return where, None if checked is None else seal_attrs(checked, self.name, agent)

    def register_master(self, agent_id: str, kv_blocks: object, *,
                        attrs: dict[str, Any] | None = None, first: bool = False) -> None:
        """Store ``kv_blocks`` as the group's master (with ``first``: only if the group
        has none yet, decided under the group's lock; else StateError).

        Documented on ``tdstore.Group.register_master``.
        """
        where, attrs = self._checked_agent(agent_id, attrs)
        with self.locked() as g, _Write(self, g) as w:
            # values are checked as they are written (on the bytes written), so bad ones
            # are refused with nothing left behind and the array is scanned once
            kv, dtype_name = self._prepare(kv_blocks, f"{where}: kv_blocks", g, check=False)
            if g.kv_layout and kv.ndim - 1 != len(g.kv_layout["axes"]):
                raise InvalidInputError(
                    f"{where}: blocks of shape {kv.shape[1:]} do not fit the group's kv_layout "
                    f"axes {g.kv_layout['axes']}")
            with self.ctx.catalog.read() as s:
                agents = self.agents_of(s, g)
            master = next((a for a in agents if a.role == Role.MASTER), None)
            if first and master is not None:
                raise StateError(f"{where}: the group has a master already ({master.name!r})")
            mirrors = [a for a in agents if a.role == Role.MIRROR]
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
            spec = replace(spec, chunk_blocks=self.chunk_for(g, spec, kv.shape[0]))
            arrays = self.ctx.arrays
            room = Reservation(self.ctx, g.gid, frozenset(a.name for a in agents))
            path = w.new_array("m", arrays.estimate_nbytes(spec, kv.shape[0]),
                               f"{where}: the master", room)
            nbytes, crcs = arrays.create_and_write(
                path, spec, kv.view(spec.dtype),
                check=self._finite_check(g, dtype_name, f"{where}: kv_blocks"))
            mref = ArrayRef(path, spec, kv.shape[0], tuple(crcs))
            rederived = []
            # the master re-registered: its mirrors are re-derived against the new values;
            # or, where it is quarantined and being restored, their own blocks are intact
            # and stay as stored (they cannot be rebuilt through damaged data), which is
            # right only for the master's own values (its recorded checksums)
            if master is not None and same_master and mirrors:
                if master.status == Status.OK:
                    for m in mirrors:  # (checked: see _full_checked)
                        old = self.read(m.name, self._full_checked, touch=False)
                        rederived.append((m, self._write_diff(g, mref, old, w, room=room)))
                elif (master.chunk_blocks != spec.chunk_blocks
                      or list(master.chunk_crcs or ()) != list(crcs)):
                    raise StateError(
                        f"{where}: the master is quarantined, and its {len(mirrors)} "
                        "mirror(s) were stored against its lost values: registering other "
                        "values would change what they reconstruct to. Register the "
                        "master's own values, or delete the mirrors (or the group: "
                        "Store.discard_quarantined_group) first")
            kept_mirrors = same_master and not rederived
            t = now()
            with w.commit() as (s, row):
                for a in agents:
                    if a.array and not (kept_mirrors and a.role == Role.MIRROR):
                        w.unreference(a.array, a.nbytes)
                if not same_master:
                    ids = [a.id for a in agents]
                    delete_agents(s, ids)
                    s.flush()
                    s.add(AgentRow(group_id=row.id, name=agent_id, role=Role.MASTER, array=path,
                                   chunk_blocks=spec.chunk_blocks, n_diff=0, nbytes=nbytes,
                                   status=Status.OK, created_at=t, updated_at=t, last_access=t,
                                   attrs=attrs, chunk_crcs=crcs))
                else:
                    assert master is not None  # same_master
                    mrow = s.get(AgentRow, master.id)
                    mrow.array, mrow.nbytes, mrow.updated_at = path, nbytes, t
                    mrow.status = Status.OK
                    mrow.chunk_blocks, mrow.attrs, mrow.chunk_crcs = spec.chunk_blocks, attrs, crcs
                    for m, diff in rederived:
                        self._store_diff_rows(s, s.get(AgentRow, m.id), diff, t)
                row.dtype, row.block_shape = dtype_name, list(kv.shape[1:])
                row.n_blocks, row.updated_at = kv.shape[0], t

    def full(self, snap: AgentSnapshot) -> np.ndarray:
        out = np.empty(snap.shape, snap.dtype)
        reconstruct_into(self.ctx.arrays, snap, out)
        return out

    def _full_checked(self, snap: AgentSnapshot) -> np.ndarray:
        """:meth:`full` for a rewrite, every chunk it reads checksummed first whatever
        ``verify_reads`` says: a rewrite gives what it copies checksums of its own, so a
        damaged chunk it copied would become wrong values that ``verify`` calls clean.
        A damaged chunk raises CorruptionError naming it (nothing is rewritten)."""
        for ref in (snap.master, snap.diff):
            if ref is not None:
                for c in ref.spec.chunks_of(0, ref.rows):
                    self.ctx.arrays.check_chunk(ref, c, f"{snap.label}: array {ref.path}")
        return self.full(snap)

    def _diff_indices(self, g: GroupRow, mref: ArrayRef, kv: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Blocks of ``kv`` that differ from the stored master, and the master's values of
        those blocks. The master is read and compared in parallel batches of bounded size.
        """
        def compare(start: int, load: Callable[[], np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray]:
            master = load().view(kv.dtype)
            stop = start + master.shape[0]
            kept = np.flatnonzero(diff_mask(master, kv[start:stop], g.diff_threshold))
            return kept + start, master[kept]

        loaders = self.ctx.arrays.mapped(mref, 0, kv.shape[0])
        parts = run_all([functools.partial(compare, s, f) for s, f in loaders])
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
            check_finite(values, group_layout(g)[0], what, block_numbers=idx)
        if idx.size == 0:
            return _WrittenDiff(idx, None, None, 0, values, master_values, None)
        dspec = replace(spec, chunk_blocks=self.chunk_for(g, spec, idx.size))
        path = w.new_array("d", self.ctx.arrays.estimate_nbytes(dspec, idx.size),
                           what or f"group {self.name!r}: a mirror", room)
        nbytes, crcs = self.ctx.arrays.create_and_write(path, dspec, values.view(spec.dtype))
        return _WrittenDiff(idx, path, dspec.chunk_blocks, nbytes, values, master_values, crcs)

    @staticmethod
    def _store_diff_rows(s: Session, row: AgentRow, diff: _WrittenDiff, t: float) -> None:
        s.execute(sa_delete(DiffBlockRow).where(DiffBlockRow.agent_id == row.id))
        if diff.indices.size:
            s.execute(insert(DiffBlockRow), [
                {"agent_id": row.id, "block_index": int(b), "slot": i}
                for i, b in enumerate(diff.indices.tolist())
            ])
        row.array, row.chunk_blocks = diff.path, diff.chunk_blocks
        row.n_diff, row.nbytes = int(diff.indices.size), diff.nbytes
        row.chunk_crcs, row.index_crc = diff.crcs, index_checksum(diff.indices)
        row.updated_at = t
        row.status = Status.OK

    def register_mirror(self, agent_id: str, kv_blocks: object, *,
                        attrs: dict[str, Any] | None = None) -> SparseKVDiff:
        """Store ``kv_blocks`` as a mirror: only the blocks that differ.

        Documented on ``tdstore.Group.register_mirror``.
        """
        where, attrs = self._checked_agent(agent_id, attrs)
        with self.locked() as g, _Write(self, g) as w:
            with self.ctx.catalog.read() as s:
                master, old = self.master_and(s, g, agent_id)
            if master is None:
                raise NoMasterError(
                    f"{where}: register_master() must be called before register_mirror()"
                )
            if master.name == agent_id:
                raise InvalidInputError(
                    f"{where} is the group's master; use register_master() to replace it"
                )
            if master.status != Status.OK:  # its values may not be what was stored
                raise CorruptionError(
                    f"{where}: the group's master {master.name!r} is {master.status}: its "
                    "data is damaged; re-register it, or delete the group, before storing "
                    "mirrors against it")
            what = f"{where}: kv_blocks"
            kv, dtype_name = self._prepare(kv_blocks, what, g, check=False)
            master_dtype, block_shape = group_layout(g)
            master_shape = (g.n_blocks, *block_shape)
            if kv.shape != master_shape:
                raise InvalidInputError(
                    f"{where}: kv_blocks shape {kv.shape} must match master shape {master_shape}"
                )
            if dtype_name != master_dtype:
                raise InvalidInputError(
                    f"{where}: kv_blocks dtype {dtype_name} must match master dtype {master_dtype}"
                )
            room = Reservation(self.ctx, g.gid, frozenset({agent_id}))
            diff = self._write_diff(g, self.ref(g, master), kv, w, what, room)
            t = now()
            with w.commit() as (s, _):
                if old is None:
                    row = AgentRow(group_id=g.id, name=agent_id, role=Role.MIRROR, n_diff=0,
                                   nbytes=0, status=Status.OK, created_at=t, updated_at=t,
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
        return self.read(master, lambda snap: read_blocks(self.ctx.arrays, snap, idx))

    def collective_reuse_step(self, agent_ids: Sequence[str], shared_blocks: object
                              ) -> dict[str, int]:
        """Append ``shared_blocks`` to the master once; every mirror adopts them.

        Documented on ``tdstore.Group.collective_reuse_step``.
        """
        if isinstance(agent_ids, str):
            raise InvalidInputError(f"group {self.name!r}: agent_ids must be a list of names, "
                                    f"not the string {agent_ids[:80]!r}")
        names = [check_name("agent", a, f"group {self.name!r}") for a in agent_ids]
        with self.locked() as g, _Write(self, g) as w:
            with self.ctx.catalog.read() as s:
                agents = {a.name: a for a in self.agents_of(s, g)}
            master = next((a for a in agents.values() if a.role == Role.MASTER), None)
            if master is None:
                raise NoMasterError(f"group {self.name!r}: no master registered")
            what = f"group {self.name!r}: shared_blocks"
            new, dtype_name = self._prepare(shared_blocks, what, g)
            master_dtype, block_shape = group_layout(g)
            if new.shape[1:] != block_shape or dtype_name != master_dtype:
                raise InvalidInputError(
                    f"{what} blocks of shape {new.shape[1:]} and dtype {dtype_name} must match "
                    f"the master's blocks of shape {block_shape} and dtype {master_dtype}"
                )
            mref = self.ref(g, master)
            spec = mref.spec
            n_new = g.n_blocks + new.shape[0]
            arrays = self.ctx.arrays
            crcs = master.chunk_crcs
            if new.shape[0]:
                # the replaced last chunk and zarr.json exist twice for a moment
                grown = (arrays.estimate_nbytes(spec, n_new) - master.nbytes
                         + spec.chunk_nbytes + 4096)
                w.append(mref.path, grown, what,
                         Reservation(self.ctx, g.gid, frozenset(names)))
                arrays.resize(mref.path, spec, n_new)
                crcs = arrays.write(mref, new.view(spec.dtype),
                                    check=self._finite_check(g, dtype_name, what))
            t = now()
            counts = {master.name: 0}
            with w.commit() as (s, row):
                row.n_blocks, row.updated_at = n_new, t
                mrow = s.get(AgentRow, master.id)
                mrow.nbytes, mrow.last_access = arrays.nbytes(mref.path), t
                mrow.chunk_crcs = crcs
                for name in names:
                    if name == master.name:
                        continue
                    if name in agents:
                        counts[name] = agents[name].n_diff
                    elif name not in counts:  # a name given twice joins once
                        s.add(AgentRow(group_id=g.id, name=name, role=Role.MIRROR, n_diff=0,
                                       nbytes=0, status=Status.OK, created_at=t, updated_at=t,
                                       last_access=t, index_crc=index_checksum(
                                           np.zeros(0, np.int64))))
                        counts[name] = 0
        return counts

    def delete(self, agent_id: str) -> None:
        """Delete an agent and its data.

        Documented on ``tdstore.Group.delete``.
        """
        check_name("agent", agent_id, f"group {self.name!r}")
        with self.locked() as g, _Write(self, g) as w, w.commit() as (s, grow):
            rows = self.agents_of(s, g)
            row = next((a for a in rows if a.name == agent_id), None)
            if row is None:
                raise NotFoundError(f"group {self.name!r}: unknown agent {agent_id!r}")
            if row.role == Role.MASTER and len(rows) > 1:
                raise StateError(
                    f"{self.where(agent_id)} is the master of {len(rows) - 1} mirror(s); "
                    "delete the mirrors first or delete the whole group"
                )
            w.unreference(row.array, row.nbytes)
            delete_agents(s, [row.id])
            if row.role == Role.MASTER:
                grow.n_blocks, grow.dtype, grow.block_shape = 0, None, None
                grow.updated_at = now()

    def replace_all(self, new_master: str) -> None:
        """Rewrite every agent of the group against ``new_master``, atomically.

        Each agent is rebuilt from the committed state (one at a time: memory stays at one
        agent plus the new master) and re-diffed; one transaction swaps in the new arrays
        and roles. Backs ``rebase`` and ``compact``.
        """
        with self.locked() as g, _Write(self, g) as w:
            with self.ctx.catalog.read() as s:
                agents = self.agents_of(s, g)
            names = [a.name for a in agents]
            if new_master not in names:
                raise NotFoundError(f"group {self.name!r}: unknown agent {new_master!r}")
            master_kv = self.read(new_master, self._full_checked, touch=False)
            spec = ArraySpec(master_kv.shape[1:], stored_dtype(group_layout(g)[0]), 1,
                             g.compressor)
            spec = replace(spec, chunk_blocks=self.chunk_for(g, spec, master_kv.shape[0]))
            arrays = self.ctx.arrays
            room = Reservation(self.ctx, g.gid, frozenset(names))
            path = w.new_array("m", arrays.estimate_nbytes(spec, master_kv.shape[0]),
                               f"group {self.name!r}", room)
            nbytes, crcs = arrays.create_and_write(path, spec, master_kv.view(spec.dtype))
            mref = ArrayRef(path, spec, master_kv.shape[0], tuple(crcs))
            diffs = {}
            for a in agents:
                if a.name != new_master:
                    kv = self.read(a.name, self._full_checked, touch=False)
                    diffs[a.id] = self._write_diff(g, mref, kv, w, room=room)
            t = now()
            with w.commit() as (s, _):
                for a in agents:  # demote first: one master per group at any time
                    s.get(AgentRow, a.id).role = Role.MIRROR
                    w.unreference(a.array, a.nbytes)
                s.flush()
                for a in agents:
                    row = s.get(AgentRow, a.id)
                    if a.name == new_master:
                        s.execute(sa_delete(DiffBlockRow).where(DiffBlockRow.agent_id == a.id))
                        row.role, row.array = Role.MASTER, path
                        row.chunk_blocks, row.n_diff = spec.chunk_blocks, 0
                        row.nbytes, row.updated_at = nbytes, t
                        row.chunk_crcs, row.index_crc = crcs, None
                    else:
                        self._store_diff_rows(s, row, diffs[a.id], t)

    # ------------------------------------------------------------------ reads

    def reconstruct(self, agent_id: str, out: np.ndarray | None = None, *,
                    device: Any = None) -> Any:
        """The agent's full KV blocks, into ``out`` or onto ``device``.

        Documented on ``tdstore.Group.reconstruct``.
        """
        if device is not None:
            if out is not None:
                raise InvalidInputError(f"{self.where(agent_id)}: give out= or device=, "
                                        "not both")
            return self._reconstruct_to_device(agent_id, device)

        def run(snap: AgentSnapshot) -> np.ndarray:
            target = np.empty(snap.shape, snap.dtype) if out is None else out
            check_out(snap, target)
            reconstruct_into(self.ctx.arrays, snap, target)
            return target

        return self.read(agent_id, run)

    def _reconstruct_to_device(self, agent: str, device: Any) -> torch.Tensor:
        """A torch tensor on ``device``; for CUDA the blocks are read straight into
        pinned host memory, then copied to the device in one transfer."""
        torch = tensors.load_torch()
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise InvalidInputError(f"{self.where(agent)}: device {device!r} is not a torch "
                                    f"device ({exc})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidInputError(
                f"{self.where(agent)}: device {str(device)!r} was asked for but CUDA is not "
                "available to torch here (no GPU, or a CPU-only build of torch); use "
                "device='cpu' or reconstruct() for a numpy array")
        if device.type not in ("cpu", "cuda"):
            raise InvalidInputError(f"{self.where(agent)}: device {str(device)!r} is not "
                                    "supported; expected 'cpu' or 'cuda'")
        snap = self.snapshot(agent)
        host = torch.empty(snap.shape, dtype=tensors.torch_dtype(snap.dtype_name),
                           pin_memory=device.type == "cuda")
        self.reconstruct(agent, out=tensors.as_numpy(host))
        if device.type == "cpu":
            return host
        return host.to(device, non_blocking=True)

    def blocks(self, agent: str, key: object) -> np.ndarray:
        """``view[key]``: only the blocks asked for (an int, slice, or index array)."""

        def run(snap: AgentSnapshot) -> np.ndarray:
            idx, scalar = normalize_index(key, snap.n_blocks, snap.label)
            blocks = read_blocks(self.ctx.arrays, snap, idx)
            return blocks[0] if scalar else blocks

        return self.read(agent, run)

    def mirror(self, agent_id: str) -> SparseKVDiff:
        """The stored diff of a mirror (the master has an empty one)."""

        def run(snap: AgentSnapshot) -> SparseKVDiff:
            idx = snap.block_indices
            values = read_blocks(self.ctx.arrays, snap, idx) if idx.size else \
                np.empty((0, *snap.spec.block_shape), snap.dtype)
            if not idx.size:
                master = values
            else:
                master_id = self.master_id
                if master_id is None:  # a concurrent writer removed it meanwhile
                    raise NoMasterError(f"group {self.name!r}: no master registered")
                master = self._master_blocks(master_id, idx)
            return SparseKVDiff(block_indices=idx, total_blocks=snap.n_blocks,
                                threshold=self.diff_threshold, values=values,
                                master_values=master)

        return self.read(agent_id, run)

    # ------------------------------------------------------------------ introspection

    def stats(self) -> dict[str, Any]:
        """The seed's statistics plus the layout and bytes (logical and on disk)."""
        with self.ctx.catalog.read() as s:
            g = self.row(s)
            check_group_row(g)
            agents = self.agents_of(s, g)
        master = next((a for a in agents if a.role == Role.MASTER), None)
        mirrors = [a for a in agents if a.role == Role.MIRROR]
        n = g.n_blocks if master is not None else 0
        block_nbytes = self.spec(g, 1).block_nbytes if g.dtype else 0
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

    def __init__(self, group: GroupOps, g: GroupRow):
        self.ctx, self.g, self.name = group.ctx, g, group.name
        self.ids: list[int] = []
        self.obsolete: list[tuple[str, int]] = []
        self.created_dir = False  # this write created data/<gid>

    def __enter__(self) -> _Write:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            return
        with contextlib.suppress(Exception):
            if self.ids:
                journal.collect(self.ctx, self.g.gid, self.ids)
            # a group directory this write created holds nothing committed unless a
            # row says so (the interruption may have come after the commit)
            if self.created_dir and not journal.references_under(self.ctx, self.g.gid):
                self.ctx.arrays.remove_group_dir(self.g.gid)

    def new_array(self, kind: str, nbytes: int, what: str, room: Reservation | None) -> str:
        if room is not None:
            room.need(nbytes, what)
        self.created_dir |= self.ctx.arrays.new_group_dir(self.g.gid)
        path = new_array_path(self.g.gid, kind)
        self.ids.append(journal.record(self.ctx, self.g.gid, path, JournalOp.WRITE, nbytes))
        return path

    def append(self, path: str, nbytes: int, what: str, room: Reservation) -> None:
        room.need(nbytes, what)
        self.ids.append(journal.record(self.ctx, self.g.gid, path, JournalOp.APPEND, nbytes))

    def unreference(self, path: str | None, nbytes: int) -> None:
        if path:
            self.obsolete.append((path, nbytes))

    @contextlib.contextmanager
    def commit(self) -> Iterator[tuple[Any, GroupRow]]:
        with deferred_signals():
            with self.ctx.catalog.write() as s:
                row = s.get(GroupRow, self.g.id)
                if row is None or row.gid != self.g.gid:  # cannot happen under the lock
                    raise StateError(f"group {self.name!r} was deleted during the write; "
                                     "nothing was committed")
                yield s, row
                self.ctx.locks.confirm(s)  # still this writer's turn (see AdvisoryLocks)
                journal.settle(s, self.ids)
                removals = journal.schedule_removals(s, self.g.gid, self.obsolete)
            self.ids = []
        journal.collect(self.ctx, self.g.gid, removals)


