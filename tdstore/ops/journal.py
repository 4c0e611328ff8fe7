"""The journal: data under ``data/`` that no agent row references yet, or any more.

A write records each array it is about to put down (``write``), or the master it is
about to append to (``append``), in a row of the ``pending`` table *before* writing any
byte; the transaction that makes the data visible deletes those rows and records the
arrays it made unreferenced (``remove``; a deleted group's directory: ``remove-group``),
which are removed right after it, and their rows deleted.

So at every instant the journal names every byte under ``data/`` that the agent rows do
not: the size budget counts it, and a row left behind by a crash or a signal marks
garbage. Rows of a group are only written by the holder of the group's lock, so whoever
holds it sees only stale rows (their writer died): :func:`collect` removes what they
mark, but only data that a fresh read of the catalogue shows is unreferenced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import delete, select

from tdstore.core.errors import CorruptionError
from tdstore.core.ids import check_array_path, check_gid
from tdstore.core.kinds import JournalOp
from tdstore.storage.catalog import AgentRow, GroupRow, PendingRow, now
from tdstore.storage.integrity import agent_ref, check_group_row

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from tdstore.ops.context import StoreContext as Store



def record(store: Store, gid: str, path: str, kind: JournalOp, nbytes: int) -> int:
    """Journal data about to be put down (committed before the first byte is written)."""
    with store.catalog.write(lazy=True) as s:
        row = PendingRow(gid=gid, path=path, kind=kind, nbytes=int(nbytes), created_at=now())
        s.add(row)
        s.flush()
        return row.id


def settle(session: Session, ids: list[int]) -> None:
    """In the commit that references the journaled data: it is no longer pending."""
    if ids:
        session.execute(delete(PendingRow).where(PendingRow.id.in_(ids)))


def schedule_removals(session: Session, gid: str, items: list[tuple[str, int]],
                      kind: JournalOp = JournalOp.REMOVE) -> list[int]:
    """In the commit that unreferences ``(path, nbytes)`` items: journal their removal."""
    rows = [PendingRow(gid=gid, path=p, kind=kind, nbytes=int(n), created_at=now())
            for p, n in items if p]
    if not rows:
        return []
    session.add_all(rows)
    session.flush()
    return [r.id for r in rows]


def stale_ids(session: Session, gid: str) -> list[int]:
    return list(session.scalars(select(PendingRow.id).where(PendingRow.gid == gid)))


def references_under(store: Store, gid: str) -> bool:
    """Whether any agent row references an array in group directory ``gid``."""
    with store.catalog.read() as s:
        return s.scalars(select(AgentRow.id).where(AgentRow.array.startswith(f"{gid}/"))
                         ).first() is not None


def collect(store: Store, gid: str, ids: list[int] | None = None) -> int:
    """Remove the unreferenced data that journal rows of group ``gid`` mark (all of its
    rows, or those in ``ids``) and delete the rows; returns the bytes they counted.

    The caller holds the group's lock, so no live writer owns these rows. Data that the
    catalogue references (the write committed after all) is kept.
    """
    if ids is not None and not ids:
        return 0
    with store.catalog.read() as s:
        q = select(PendingRow).where(PendingRow.gid == gid)
        if ids is not None:
            q = q.where(PendingRow.id.in_(ids))
        rows = list(s.scalars(q))
        if not rows:
            return 0
        paths = [r.path for r in rows]
        refs = {a.array: a for a in s.scalars(select(AgentRow).where(AgentRow.array.in_(paths)))}
        group = s.scalars(select(GroupRow).where(GroupRow.gid == gid)).one_or_none()
    for r in rows:
        try:
            if r.kind == JournalOp.REMOVE_GROUP:
                if group is None and r.path == gid:
                    store.arrays.remove_group_dir(check_gid(r.path))
            elif r.path not in refs:
                store.arrays.remove(check_array_path(r.path))
            elif r.kind == JournalOp.APPEND and group is not None and group.dtype is not None:
                # an append that did not commit: drop its chunk files past the committed
                # length (the rewritten last chunk keeps the committed blocks: it stays)
                check_group_row(group)
                ref = agent_ref(group, refs[r.path])
                if ref is not None:
                    for extra in store.arrays.extra_entries(ref.path, ref.spec, ref.rows):
                        store.arrays.remove_below(extra)
        except CorruptionError:
            pass  # a tampered row or path: nothing of ours to remove; the row goes
    with store.catalog.write(lazy=True) as s:
        s.execute(delete(PendingRow).where(PendingRow.id.in_([r.id for r in rows])))
    return sum(r.nbytes for r in rows)
