"""Store maintenance: inspect, verify, repair, collect garbage, compact, rebase, evict.

Each function here backs one ``tdstore`` command and is also a method of
:class:`tdstore.Store` or :class:`tdstore.Group`. Work on a group holds that group's
writer lock, so it never races a writer: data a writer has put down but not yet
committed is never mistaken for garbage.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from tdstore.core.errors import CorruptionError
from tdstore.core.ids import GID_RE, check_gid
from tdstore.core.kinds import FindingKind
from tdstore.core.layout import ArrayRef, ArraySpec, block_range
from tdstore.core.validate import check_max_bytes
from tdstore.core.version import __version__
from tdstore.ops import budget, journal
from tdstore.ops.groups import GroupOps
from tdstore.storage.catalog import AgentRow, DiffBlockRow, GroupRow, schema_status
from tdstore.storage.integrity import (
    agent_ref,
    check_group_row,
    checked_attrs,
    group_layout,
    index_problems,
)

if TYPE_CHECKING:
    from tdstore.ops.context import StoreContext as Store

Progress = Callable[[int, int, str], None]  # (done, total, what)

DATA_DIR = "data"


@dataclass
class Finding:
    """One thing ``verify`` found: damage to live data, or garbage that can be removed."""

    kind: FindingKind
    path: str  # relative to the store directory
    detail: str
    group: str | None = None
    agent: str | None = None
    blocks: str | None = None
    nbytes: int = 0  # bytes a removal would reclaim

    def __post_init__(self) -> None:
        self.kind = FindingKind(self.kind)  # also from a report's JSON

    @property
    def is_damage(self) -> bool:
        return self.kind.is_damage

    def __str__(self) -> str:
        where = " ".join(
            part for part in (
                f"group {self.group!r}" if self.group is not None else "",
                f"agent {self.agent!r}" if self.agent is not None else "",
                self.blocks or "",
            ) if part
        )
        return f"{self.kind}: {where + ': ' if where else ''}{self.detail} ({self.path})"


@dataclass
class VerifyReport:
    findings: list[Finding] = field(default_factory=list)
    agents_checked: int = 0
    chunks_checked: int = 0
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def damage(self) -> list[Finding]:
        return [f for f in self.findings if f.is_damage]

    @property
    def garbage(self) -> list[Finding]:
        return [f for f in self.findings if not f.is_damage]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "agents_checked": self.agents_checked,
                "chunks_checked": self.chunks_checked,
                "findings": [asdict(f) | {"message": str(f)} for f in self.findings],
                "repaired": self.repaired}


def _rel(rel: str) -> str:
    """A path under ``data/`` as findings name it (relative to the store's location)."""
    return f"{DATA_DIR}/{rel}" if rel else DATA_DIR


# --------------------------------------------------------------------------- scanning


@dataclass
class _ArrayRef:
    """An array the catalogue references, with what must hold for it."""

    ref: ArrayRef
    agent: AgentRow
    group: GroupRow

    @property
    def path(self) -> str:
        return self.ref.path


def _group_refs(session: Session, g: GroupRow) -> tuple[list[_ArrayRef], list[Finding]]:
    """The checked arrays of a group's agents, and the rows that fail their checks
    (see tdstore.storage.integrity)."""
    try:
        check_group_row(g)
    except CorruptionError as exc:
        return [], [Finding(FindingKind.BAD_ROW, "catalog.sqlite", str(exc), group=g.name)]
    refs, found = [], []
    rows = list(session.scalars(select(AgentRow).where(AgentRow.group_id == g.id)))
    # an array path lies in its own group's directory (agent_ref checks that), so two
    # rows naming one array can only be agents of the same group
    counts = Counter(a.array for a in rows if a.array is not None)
    for a in rows:
        try:
            if a.array is not None and counts[a.array] > 1:
                raise CorruptionError(f"array {a.array} is referenced by more than one agent")
            # damaged attributes are reported below, and the array is checked regardless
            ref = agent_ref(g, a, attrs=False)
        except CorruptionError as exc:
            kind = FindingKind.BAD_PATH if "array path" in str(exc) or "array " in str(exc)[:7] \
                or "referenced by more than one" in str(exc) else FindingKind.BAD_ROW
            found.append(Finding(kind, "catalog.sqlite", str(exc), group=g.name,
                                 agent=a.name))
            continue
        try:
            checked_attrs(a.attrs, f"catalogue: group {g.name!r} agent {a.name!r}", g.name,
                          a.name)
        except CorruptionError as exc:
            found.append(Finding(FindingKind.BAD_ROW, "catalog.sqlite", str(exc), group=g.name,
                                 agent=a.name))
        if ref is not None:
            refs.append(_ArrayRef(ref, a, g))
    return refs, found


class _Who(TypedDict):
    group: str
    agent: str


def _check_array(store: Store, ref: _ArrayRef, checksums: bool,
                 report: VerifyReport) -> list[Finding]:
    """Damage in one referenced array, plus the garbage files inside it."""
    found: list[Finding] = []
    who: _Who = {"group": ref.group.name, "agent": ref.agent.name}
    spec, rows = ref.ref.spec, ref.ref.rows
    try:
        store.arrays.check_metadata(ref.ref, cached=False)
    except CorruptionError as exc:
        msg = str(exc)
        kind = (FindingKind.UNSAFE_ENTRY if "symlink" in msg or "not a directory" in msg else
                FindingKind.MISSING_ARRAY if "is missing" in msg and "zarr.json" not in msg else
                FindingKind.BAD_METADATA)
        where = f"{ref.path}/zarr.json" if kind == FindingKind.BAD_METADATA else ref.path
        found.append(Finding(kind, _rel(where), msg.split(": ", 1)[-1], **who))
        if kind != FindingKind.BAD_METADATA:
            return found
    for extra in store.arrays.extra_entries(ref.path, spec, rows):
        found.append(Finding(FindingKind.ORPHAN_FILE, _rel(extra), "file no committed block "
                             "uses", nbytes=store.arrays.entry_nbytes(extra), **who))
    for c, lo, hi in spec.windows(0, rows):
        blocks = block_range(lo, hi) if ref.agent.role == "master" else \
            f"slots {lo}-{hi - 1} of its own blocks"
        file = f"{ref.path}/{spec.chunk_key(c)}"
        report.chunks_checked += 1
        try:
            if checksums:
                store.arrays.check_chunk(ref.ref, c, ref.path)
            else:
                what = store.arrays.kind(file)
                if what is None:
                    raise FileNotFoundError(file)
                if what != "file":
                    raise CorruptionError(f"chunk file {spec.chunk_key(c)} is not a regular "
                                          "file")
        except FileNotFoundError:
            found.append(Finding(FindingKind.MISSING_CHUNK, _rel(file),
                                 "chunk file is missing", blocks=blocks, **who))
        except CorruptionError as exc:
            msg = str(exc)
            kind = (FindingKind.MISSING_CHUNK if "is missing" in msg else
                    FindingKind.TRUNCATED_CHUNK if " bytes, expected" in msg
                    or "truncated" in msg else
                    FindingKind.FOREIGN_CHUNK if "holds other data" in msg else
                    FindingKind.UNSAFE_ENTRY if "symlink" in msg or " is a" in msg
                    or "not a regular" in msg else FindingKind.CHECKSUM)
            found.append(Finding(kind, _rel(file), msg.split(": ", 1)[-1],
                                 blocks=blocks, **who))
    return found


def _check_index(store: Store, session: Session, g: GroupRow) -> list[Finding]:
    found = []
    mirrors = session.scalars(select(AgentRow).where(AgentRow.group_id == g.id,
                                                    AgentRow.role == "mirror"))
    for a in mirrors:
        rows = session.execute(select(DiffBlockRow.block_index, DiffBlockRow.slot)
                               .where(DiffBlockRow.agent_id == a.id)
                               .order_by(DiffBlockRow.slot)).all()
        idx = np.array([r[0] for r in rows], dtype=np.int64)
        slots = [r[1] for r in rows]
        problems = index_problems(idx, a.n_diff, g.n_blocks, a.index_crc)
        if slots != list(range(len(slots))):
            problems.append(f"slots are not 0..{len(slots) - 1}")
        if problems:
            found.append(Finding(FindingKind.BAD_INDEX, "catalog.sqlite", "; ".join(problems),
                                 group=g.name, agent=a.name))
    return found


def _orphans_in_group_dir(store: Store, gid: str, referenced: set[str],
                          group: str | None) -> list[Finding]:
    found = []
    for entry in store.arrays.children(gid):
        if entry.name == "zarr.json" or entry.rel in referenced:
            continue
        found.append(Finding(FindingKind.ORPHAN_ARRAY, _rel(entry.rel),
                             "array no catalogue row references", group=group,
                             nbytes=store.arrays.entry_nbytes(entry.rel)))
    return found


def _groups(store: Store) -> list[GroupRow]:
    with store.catalog.read() as s:
        return list(s.scalars(select(GroupRow).order_by(GroupRow.id)))


def _scan(store: Store, *, checksums: bool, remove_garbage: bool = False,
          progress: Progress | None = None,
          on_group: Callable[[GroupRow, list[Finding]], None] | None = None) -> VerifyReport:
    """Check every group (under its writer lock) and the directories no group owns.

    With ``remove_garbage`` what no row references is removed under the same lock it
    was found with, so a writer can never have claimed it in between; the journal rows
    a crashed writer left are collected the same way. Nothing is ever followed through
    a symlink: a symlink (or FIFO, device...) under ``data/`` is itself the garbage.
    """
    report = VerifyReport()
    groups = _groups(store)
    total = len(groups) + 1
    arrays = store.arrays
    for i, g in enumerate(groups):
        if progress:
            progress(i, total, f"group {g.name!r}")
        try:
            check_gid(g.gid)
        except CorruptionError as exc:
            report.findings.append(Finding(FindingKind.BAD_ROW, "catalog.sqlite", str(exc),
                                           group=g.name))
            continue
        with store.locks.hold(g.gid), store.catalog.read() as s:
            current = s.get(GroupRow, g.id)
            if current is None:  # deleted meanwhile
                continue
            g = current
            if remove_garbage and journal.stale_ids(s, g.gid):
                journal.collect(store, g.gid)
            refs, found = _group_refs(s, g)
            # garbage is removed only where every row could be read: a damaged row may
            # be the one that references what looks unreferenced
            trusted = not found
            found += _check_index(store, s, g)
            gkind = arrays.kind(g.gid)
            if gkind not in ("dir", None):
                found.append(Finding(FindingKind.UNSAFE_ENTRY, _rel(g.gid),
                                     "the group directory is a symlink or not a directory",
                                     group=g.name))
                found += [Finding(FindingKind.UNSAFE_ENTRY, _rel(r.path),
                                  "its group directory is not a directory of the store",
                                  group=g.name, agent=r.agent.name) for r in refs]
                refs = []
            for ref in refs:
                found += _check_array(store, ref, checksums, report)
            report.agents_checked += len(list(s.scalars(
                select(AgentRow.id).where(AgentRow.group_id == g.id))))
            if gkind == "dir":
                found += _orphans_in_group_dir(store, g.gid, {r.path for r in refs}, g.name)
            if remove_garbage and trusted:
                for f in found:
                    if not f.is_damage or f.kind == FindingKind.UNSAFE_ENTRY:
                        with contextlib.suppress(CorruptionError):
                            arrays.remove_below(f.path.removeprefix(f"{DATA_DIR}/"))
            if on_group is not None:
                on_group(g, found)
        report.findings += found
    if progress:
        progress(total - 1, total, "directories of no group")
    known = {g.gid for g in _groups(store)}
    for entry in arrays.children(""):
        if entry.name == "zarr.json" or entry.name in known:
            continue
        if not GID_RE.fullmatch(entry.name) or entry.kind != "dir":
            report.findings.append(Finding(
                FindingKind.FOREIGN_ENTRY, _rel(entry.rel),
                "not a group directory (a symlink, file or foreign name)",
                nbytes=arrays.entry_nbytes(entry.rel)))
            if remove_garbage:
                arrays.remove_below(entry.rel)
            continue
        with store.locks.hold(entry.name):
            if entry.name in {g.gid for g in _groups(store)}:
                continue
            report.findings.append(Finding(
                FindingKind.ORPHAN_GROUP, _rel(entry.rel), "directory of no group",
                nbytes=arrays.entry_nbytes(entry.rel)))
            if remove_garbage:
                arrays.remove_below(entry.rel)
                journal.collect(store, entry.name)
    if progress:
        progress(total, total, "done")
    return report


def backfill_checksums(store: Store) -> int:
    """Record the per-chunk and diff-index checksums of rows written before schema
    0004 (each chunk's own checksum is verified first; a damaged chunk leaves its row
    unrecorded, which ``verify`` reports). Returns the rows updated."""
    from tdstore.storage.integrity import index_checksum

    with store.catalog.read() as s:
        groups = {g.id: g for g in s.scalars(select(GroupRow))}
        rows = [a for a in s.scalars(select(AgentRow))
                if (a.array is not None and a.chunk_crcs is None)
                or (a.role == "mirror" and a.index_crc is None)]
    done = 0
    for a in rows:
        g = groups.get(a.group_id)
        if g is None:
            continue
        try:
            with store.locks.hold(g.gid):
                crcs = a.chunk_crcs
                if a.array is not None and crcs is None:
                    from tdstore.core.dtypes import stored_dtype

                    dtype_name, block_shape = group_layout(g)
                    if a.chunk_blocks is None:
                        raise CorruptionError(f"catalogue: group {g.name!r} agent {a.name!r}: "
                                              "an array but no chunk_blocks recorded")
                    spec = ArraySpec(block_shape, stored_dtype(dtype_name), a.chunk_blocks,
                                     g.compressor)
                    rows_n = g.n_blocks if a.role == "master" else a.n_diff
                    crcs = store.arrays.chunk_checksums(ArrayRef(a.array, spec, rows_n, None))
                with store.catalog.write() as s:
                    row = s.get(AgentRow, a.id)
                    if row is None:
                        continue
                    row.chunk_crcs = crcs
                    if row.role == "mirror":
                        idx = np.array(list(s.scalars(
                            select(DiffBlockRow.block_index)
                            .where(DiffBlockRow.agent_id == a.id)
                            .order_by(DiffBlockRow.slot))), dtype=np.int64)
                        row.index_crc = index_checksum(idx)
                done += 1
        except (CorruptionError, KeyError, TypeError, ValueError):
            continue  # damaged: verify reports it
    return done


# --------------------------------------------------------------------------- commands


def verify(store: Store, *, repair: bool = False, checksums: bool = True,
           progress: Progress | None = None) -> VerifyReport:
    """Check the catalogue against the data: missing or damaged arrays and chunks (by
    their crc32c), index rows out of range, and garbage no row references.

    With ``repair``: garbage is removed and agents with damaged data are quarantined
    (reads of them raise CorruptionError until they are re-registered or deleted);
    healthy agents are never touched.
    """
    if repair:
        store.check_writable()
    quarantined: list[str] = []

    def quarantine(g: GroupRow, found: list[Finding]) -> None:
        damaged = sorted({f.agent for f in found if f.is_damage and f.agent is not None})
        if damaged:
            with store.catalog.write() as s:
                for row in s.scalars(select(AgentRow).where(AgentRow.group_id == g.id,
                                                           AgentRow.name.in_(damaged))):
                    row.status = "quarantined"
                    quarantined.append(f"quarantined group {g.name!r} agent {row.name!r}")

    report = _scan(store, checksums=checksums, remove_garbage=repair, progress=progress,
                   on_group=quarantine if repair else None)
    if repair:
        report.repaired = [f"removed {f.path}" for f in report.garbage] + quarantined
    return report


@dataclass
class GcReport:
    removed: list[str]
    freed_bytes: int
    dry_run: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gc(store: Store, *, dry_run: bool = False, progress: Progress | None = None) -> GcReport:
    """Remove the data no catalogue row references (left by replacements, deletes and
    interrupted writes); with ``dry_run`` only report it."""
    if not dry_run:
        store.check_writable()
    garbage = _scan(store, checksums=False, remove_garbage=not dry_run,
                    progress=progress).garbage
    return GcReport([f.path for f in garbage], sum(f.nbytes for f in garbage), dry_run)


def info(store: Store) -> dict[str, Any]:
    """What is in the store: schema, version, groups, agents, bytes, ratio, garbage."""
    current, heads = schema_status(store.catalog)
    groups = []
    logical = stored = agents = 0
    for name in store.groups():
        st = GroupOps(store, name).stats()
        groups.append(name)
        agents += (st["n_mirrors"] + 1) if st["master_id"] else 0
        logical += st["bytes_logical"]
        stored += st["bytes_stored"]
    reclaimable = gc(store, dry_run=True).freed_bytes
    return {
        "path": str(store.path),
        "schema_revision": ",".join(current),
        "schema_head": ",".join(heads),
        "tdstore_version": __version__,
        "created_by": store.catalog.get_meta("created_by"),
        "groups": len(groups),
        "agents": agents,
        "bytes_logical": logical,
        "bytes_stored": stored,
        "compression_ratio": logical / stored if stored else 1.0,
        "reclaimable_bytes": reclaimable,
        "max_bytes": budget.get_max_bytes(store),
        "bytes_accounted": budget.accounted_bytes(store),
    }


def ls_agents(store: Store, group: str) -> list[dict[str, Any]]:
    """The agents of a group with role, blocks, diff blocks, bytes, last access, status."""
    ops = GroupOps(store, group)
    with store.catalog.read() as s:
        g = ops.row(s)
        rows = ops.agents_of(s, g)
    return [{"agent": a.name, "role": a.role, "blocks": g.n_blocks,
             "diff_blocks": a.n_diff,
             "bytes": a.nbytes, "last_access": a.last_access, "status": a.status}
            for a in rows]


def ls_groups(store: Store) -> list[dict[str, Any]]:
    out = []
    for name in store.groups():
        st = GroupOps(store, name).stats()
        out.append({"group": name, "agents": (st["n_mirrors"] + 1) if st["master_id"] else 0,
                    "master": st["master_id"], "blocks": st["n_blocks"],
                    "block_shape": st["block_shape"], "dtype": st["dtype"],
                    "bytes_logical": st["bytes_logical"], "bytes_stored": st["bytes_stored"],
                    "compression_ratio": st["compression_ratio"],
                    "diff_threshold": st["diff_threshold"]})
    return out


def evict(store: Store, max_bytes: int, *, dry_run: bool = False) -> list[budget.Victim]:
    """Evict least-recently-used agents until the store's data fits in ``max_bytes``."""
    check_max_bytes(max_bytes)
    victims, _ = budget.plan(store, max_bytes)
    if dry_run:
        return victims
    store.check_writable()
    with budget.budget_turn(store):
        victims, _ = budget.plan(store, max_bytes)
        return budget.evict_victims(store, victims)
