"""The size budget: byte accounting and least-recently-used eviction.

A store opened with ``max_bytes`` keeps the bytes under ``data/`` at or below it. Every
array's size is recorded in the catalogue when it is written, and every byte no agent
references (a write in progress, data a commit replaced, garbage a crash left) is
journaled (:mod:`tdstore.ops.journal`), so the accounting needs no walk of the file system
and holds after crashes too. A write first reserves the bytes it will add (the old data
it replaces stays counted until it is removed after the commit); if they do not fit,
the garbage of crashed writes is collected first, then
least-recently-used agents are evicted (a mirror alone; a master only with its whole
group), and if even that cannot make room the write fails before writing anything.
All budgeted writes of a store take turns on ``locks/budget.lock``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from tdstore.core.errors import StoreFullError
from tdstore.core.kinds import JournalOp, Role
from tdstore.core.validate import check_max_bytes
from tdstore.ops import journal
from tdstore.storage.catalog import AgentRow, GroupRow, MetaRow, PendingRow, delete_agents
from tdstore.storage.locks import deferred_signals

if TYPE_CHECKING:
    from tdstore.ops.context import StoreContext as Store

log = logging.getLogger("tdstore.budget")
# the evictions made while a ``recording()`` block runs (for callers that report them)
_recorded: contextvars.ContextVar[list[Victim] | None] = contextvars.ContextVar(
    "tdstore_evictions", default=None)

META_KEY = "max_bytes"


@dataclass(frozen=True)
class Victim:
    """An eviction: one mirror, or a whole group (``agent`` None) when its master goes."""

    group: str
    gid: str
    agent: str | None
    nbytes: int
    last_access: float

    def describe(self) -> str:
        what = f"agent {self.agent!r}" if self.agent else "all agents (the group was LRU)"
        return f"group {self.group!r} {what}: {self.nbytes} bytes"


def get_max_bytes(store: Store) -> int | None:
    value = store.catalog.get_meta(META_KEY)
    return None if value is None else int(value)


def set_max_bytes(store: Store, value: int | None) -> None:
    """Persist the budget (None removes it), once no write is in its turn (see
    :func:`budget_turn`)."""
    store.check_writable()
    with store.locks.hold("budget"), store.catalog.write() as s:
        if value is None:
            row = s.get(MetaRow, META_KEY)
            if row is not None:
                s.delete(row)
        else:
            s.merge(MetaRow(key=META_KEY, value=str(check_max_bytes(value))))


def metadata_overhead(store: Store, n_groups: int) -> int:
    """Bytes of the zarr group documents: the root's and one per group directory."""
    return (1 + n_groups) * store.arrays.entry_nbytes("zarr.json")


def accounted_bytes(store: Store) -> int:
    """Bytes under ``data/`` according to the catalogue (an upper bound of the files)."""
    with store.catalog.read() as s:
        # an aggregate always returns one row
        arrays = s.scalars(select(func.coalesce(func.sum(AgentRow.nbytes), 0))).one()
        pending = s.scalars(select(func.coalesce(func.sum(PendingRow.nbytes), 0))).one()
        n_groups = s.scalars(select(func.count(GroupRow.id))).one()
    return int(arrays) + int(pending) + metadata_overhead(store, int(n_groups))


def lru_order(store: Store) -> list[Victim]:
    """Eviction units, least recently used first. A master is used by every read of its
    group, so a group (the unit its master goes with) counts as used when any of its
    agents was: its mirrors go one by one before it."""
    with store.catalog.read() as s:
        rows = s.execute(
            select(AgentRow.name, AgentRow.role, AgentRow.nbytes, AgentRow.last_access,
                   GroupRow.name, GroupRow.gid, GroupRow.id)
            .join(GroupRow, AgentRow.group_id == GroupRow.id)
            .order_by(AgentRow.last_access, AgentRow.id)
        ).all()
    group_bytes: dict[str, int] = {}
    group_used: dict[str, float] = {}
    for _, _, nbytes, last, _, gid, _ in rows:
        group_bytes[gid] = group_bytes.get(gid, 0) + nbytes
        group_used[gid] = max(group_used.get(gid, last), last)
    units = []
    for name, role, nbytes, last, gname, gid, _ in rows:
        if role == Role.MASTER:
            units.append(Victim(gname, gid, None, group_bytes[gid], group_used[gid]))
        elif nbytes:
            units.append(Victim(gname, gid, name, nbytes, last))
    return sorted(units, key=lambda v: (v.last_access, v.agent is None))


def plan(store: Store, target: int, *, extra: int = 0, current_gid: str | None = None,
         protect: frozenset[str] = frozenset()) -> tuple[list[Victim], int]:
    """The victims to evict so that accounted bytes + ``extra`` <= ``target``.

    The group being written (``current_gid``) never loses its master, nor the agents in
    ``protect``. Returns (victims, bytes after evicting them).
    """
    total = accounted_bytes(store)
    chosen: list[Victim] = []
    gone: set[str] = set()  # groups already evicted whole
    for v in lru_order(store):
        if total + extra <= target:
            break
        if v.gid in gone:
            continue
        if v.gid == current_gid and (v.agent is None or v.agent in protect):
            continue
        if v.agent is None:  # the whole group: it takes the mirrors chosen before it
            gone.add(v.gid)
            total -= v.nbytes - sum(c.nbytes for c in chosen if c.gid == v.gid)
            chosen = [c for c in chosen if c.gid != v.gid]
        else:
            total -= v.nbytes
        chosen.append(v)
    return chosen, total


@contextlib.contextmanager
def _try_group_lock(store: Store, gid: str, held_gid: str | None) -> Iterator[bool]:
    """The group's writer lock without waiting (a writer of another group may be waiting
    for the budget lock we hold); True when held. The caller's own group is held."""
    if gid == held_gid:
        yield True
        return
    with store.locks.hold(gid, wait=False) as held:
        yield held


def evict_victims(store: Store, victims: list[Victim], held_gid: str | None = None) -> list[Victim]:
    """Evict ``victims``; returns those evicted (a group busy with a writer is skipped)."""
    done = []
    for v in victims:
        with _try_group_lock(store, v.gid, held_gid) as locked:
            if not locked:
                continue
            with deferred_signals(), store.catalog.write() as s:
                g = s.scalars(select(GroupRow).where(GroupRow.gid == v.gid)).one_or_none()
                if g is None:
                    continue
                q = select(AgentRow).where(AgentRow.group_id == g.id)
                if v.agent is not None:
                    q = q.where(AgentRow.name == v.agent, AgentRow.role == Role.MIRROR)
                rows = list(s.scalars(q))
                if not rows:
                    continue
                delete_agents(s, [r.id for r in rows])
                if v.agent is None:  # the whole group goes, its directory with it
                    s.delete(g)
                    removals = journal.schedule_removals(
                        s, v.gid, [(v.gid, sum(r.nbytes for r in rows))],
                        JournalOp.REMOVE_GROUP)
                else:
                    removals = journal.schedule_removals(
                        s, v.gid, [(r.array, r.nbytes) for r in rows if r.array])
            journal.collect(store, v.gid, removals)
            done.append(v)
            log.info("evicted %s", v.describe())
            recorded = _recorded.get()
            if recorded is not None:
                recorded.append(v)
        if v.agent is None and v.gid != held_gid and done and done[-1] is v:
            store.locks.forget(v.gid)  # the whole group went: its lock is not needed
    return done


@contextlib.contextmanager
def recording() -> Iterator[list[Victim]]:
    """Collect the evictions made (by budgeted writes or ``evict``) inside the block."""
    evicted: list[Victim] = []
    token = _recorded.set(evicted)
    try:
        yield evicted
    finally:
        _recorded.reset(token)


class Reservation:
    """Room for one write under the budget (a no-op when the store has none)."""

    def __init__(self, store: Store, gid: str, protect: frozenset[str]):
        self.store, self.gid, self.protect = store, gid, protect
        self.max_bytes = get_max_bytes(store)

    def need(self, nbytes: int, what: str) -> None:
        """Make room for ``nbytes`` more, evicting LRU agents; StoreFullError if impossible.

        The bytes are then journaled by the caller before it writes them, so a later
        ``need`` of the same write counts them through the journal."""
        if self.max_bytes is None:
            return
        victims, after = plan(self.store, self.max_bytes, extra=nbytes,
                              current_gid=self.gid, protect=self.protect)
        if after + nbytes > self.max_bytes and collect_stale(self.store, self.gid):
            victims, after = plan(self.store, self.max_bytes, extra=nbytes,
                                  current_gid=self.gid, protect=self.protect)
        if after + nbytes > self.max_bytes:
            raise StoreFullError(
                f"store {self.store.path}: {what} needs {nbytes} bytes but the budget is "
                f"{self.max_bytes} bytes and only {self.max_bytes - after} can be freed or "
                "are free; nothing was written"
            )
        evict_victims(self.store, victims, held_gid=self.gid)
        if accounted_bytes(self.store) + nbytes > self.max_bytes:
            raise StoreFullError(
                f"store {self.store.path}: {what} needs {nbytes} bytes; agents that would make "
                "room are busy with other writers; nothing was written"
            )


def collect_stale(store: Store, held_gid: str | None = None) -> int:
    """Collect the journaled garbage of crashed writes in every group whose lock is free
    (a held lock means a live writer: its rows are not garbage); returns bytes freed."""
    with store.catalog.read() as s:
        gids = set(s.scalars(select(PendingRow.gid).distinct()))
    freed = 0
    for gid in sorted(gids - {held_gid}):
        with _try_group_lock(store, gid, None) as locked:
            if locked:
                freed += journal.collect(store, gid)
    return freed


@contextlib.contextmanager
def budget_turn(store: Store) -> Iterator[None]:
    """Budgeted writes take turns, so two of them cannot both use the same free bytes.
    Writes without a budget hold the lock shared (they run at once), so that setting a
    budget (which holds it alone: :func:`set_max_bytes`) waits for those in flight: a
    write that began without a budget never reserves against one set meanwhile."""
    if get_max_bytes(store) is None:
        with store.locks.hold("budget", shared=True):
            if get_max_bytes(store) is None:
                yield
                return
    with store.locks.hold("budget"):
        yield
