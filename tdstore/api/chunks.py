"""Arrays stored, found and removed by a string key: :class:`Chunks`.

A keyed chunk (an LMCache KV chunk, say) is kept as a group of its own named
``<namespace>:<key>`` whose master holds the chunk's bytes, with its dtype, shape and
format tag in the master's attributes. So every guarantee the store gives agents holds
for chunks too: data is durable before one catalogue transaction makes a chunk visible,
every chunk is checksummed and checked by ``verify``, the size budget evicts least
recently used chunks, any number of processes share them, on every location (a local
directory, or object storage with a PostgreSQL catalogue); ``tdstore ls``/``info``/
``rm``/``verify``/``gc`` show and handle them like any group.

The bytes are stored as raw ``uint8`` blocks of whole rows of the last axis (for an
LMCache ``KV_2LTD`` chunk ``[2, layers, tokens, hidden]``: runs of tokens of one layer),
so a chunk comes back bit-exact in any dtype.

Chunks that agents of one pipeline store at the same position of their sequences can
share storage: ``put(..., share=(group, position))`` files the chunk in the group
``<namespace>-shared:<group>:<position>:<shape>`` as an agent named by its key. The
first chunk there is the master; every later one is a mirror holding only the blocks
that differ from it (exactly: ``diff_threshold`` 0), so a prefix the agents share is
stored once however their keys differ.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Container, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import bindparam, exists, select, union_all
from sqlalchemy.orm import aliased

from tdstore.core.errors import InvalidInputError, NotFoundError, StateError, TdStoreError
from tdstore.core.forking import renew_after_fork
from tdstore.core.kinds import Role, Status
from tdstore.core.validate import check_name
from tdstore.storage.catalog import AgentRow, GroupRow

if TYPE_CHECKING:
    from tdstore.api.store import Store
    from tdstore.core.layout import ArrayRef

AGENT = "chunk"
# keys whose lookups a Chunks keeps (see Chunks._locate), at most
SEEN_KEEP = 8192
# blocks of at most this many rows (tokens, for an LMCache chunk) and bytes: small enough
# for the diff index to find shared runs of tokens, large enough to keep its rows few
BLOCK_ROWS = 16
BLOCK_BYTES = 64 << 10


def block_layout(shape: Sequence[int], itemsize: int) -> tuple[int, int]:
    """``(n_blocks, block_bytes)`` for an array of ``shape``: each block holds whole rows
    of the last axis, as many consecutive rows of the axis before it (at most
    ``BLOCK_ROWS`` and ``BLOCK_BYTES``) as divide it evenly."""
    if not shape or any(d < 1 for d in shape):
        raise InvalidInputError(f"chunk shape {tuple(shape)}: expected at least one "
                                "dimension, each >= 1")
    row = shape[-1] * itemsize
    rows_axis = shape[-2] if len(shape) >= 2 else 1
    per = 1
    for d in range(1, min(rows_axis, BLOCK_ROWS) + 1):
        if rows_axis % d == 0 and d * row <= BLOCK_BYTES:
            per = d
    nbytes = math.prod(shape) * itemsize
    block = per * row
    return nbytes // block, block


def _statements(*columns: Any) -> tuple[Any, Any]:
    """The two lookups of chunks by key, built once (bound per call): a group of their
    own (``<namespace>:<key>``, its master), or an agent of a shared group. Each stays on
    an index (an OR of the two would scan the agents). Built per call they cost about
    1 ms of a 2 ms lookup of 8 keys (profiled in the LMCache benchmark); built once, a
    lookup of 8 keys takes 0.6 ms (names) or 0.9 ms (rows) on SQLite."""
    join = select(*columns).join(AgentRow, AgentRow.group_id == GroupRow.id)
    own = join.where(GroupRow.name.in_(bindparam("groups", expanding=True)),
                     AgentRow.role == Role.MASTER, AgentRow.status == Status.OK)
    # a chunk of a shared group is read through the group's master: none while that is
    # quarantined (verify --repair found it damaged)
    master = aliased(AgentRow)
    master_ok = exists().where(master.group_id == GroupRow.id, master.role == Role.MASTER,
                               master.status == Status.OK)
    shared = join.where(AgentRow.name.in_(bindparam("keys", expanding=True)),
                        AgentRow.status == Status.OK,
                        GroupRow.name.like(bindparam("shared"), escape="\\"), master_ok)
    return own, shared


_ROWS = _statements(GroupRow, AgentRow)
_NAMES = union_all(*_statements(GroupRow.name, AgentRow.name))


def _prefix(keys: Sequence[str], present: Container[str]) -> int:
    """How many of ``keys``, from the first, are in ``present``."""
    n = 0
    while n < len(keys) and keys[n] in present:
        n += 1
    return n


class _Found:
    """A located chunk: its group and agent rows (read in one transaction)."""

    __slots__ = ("_attrs", "_layout", "_snap", "agent", "group")

    def __init__(self, group: GroupRow, agent: AgentRow):
        self.group, self.agent = group, agent
        self._attrs: dict[str, Any] | None = None
        self._layout: tuple[int, int] | None = None
        self._snap: Any = None

    def layout(self) -> tuple[int, int]:
        """``block_layout`` of the recorded shape and dtype (computed once per row)."""
        if self._layout is None:
            from tdstore.core.dtypes import numpy_dtype

            meta = self.attrs
            self._layout = block_layout(meta["shape"],
                                        numpy_dtype(meta["dtype"]).itemsize)
        return self._layout

    def master(self) -> Any:
        """The master snapshot of a chunk filed as a master, its rows checked (once per
        located row: rows kept by lookups are read many times)."""
        if self._snap is None:
            from tdstore.ops.groups import GroupOps

            self._snap = GroupOps.master_snapshot(self.group, self.agent)
        return self._snap

    @property
    def attrs(self) -> dict[str, Any]:
        """The chunk's recorded attributes, their checksum checked once per located row
        (CorruptionError); a copy."""
        if self._attrs is None:
            from tdstore.storage.integrity import checked_attrs

            self._attrs = checked_attrs(self.agent.attrs,
                                        f"catalogue: chunk group {self.group.name!r}",
                                        self.group.name, self.agent.name)
        return dict(self._attrs)


class Chunks:
    """The keyed chunks of namespace ``namespace`` in ``store``."""

    def __init__(self, store: Store, namespace: str = "chunk"):
        check_name("namespace", namespace)
        if ":" in namespace:
            raise InvalidInputError(f"chunk namespace {namespace!r}: must not contain ':'")
        self.store = store
        self.namespace = namespace
        # the LIKE pattern of this namespace's shared groups (``_``, ``%`` and ``\``
        # in the name are letters, not wildcards)
        esc = namespace.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        self._shared_like = f"{esc}-shared:%"
        # what lookups found (rows by key; None: not stored), valid while the
        # catalogue's change counter stays where it was when they ran
        self._seen: dict[str, _Found | None] = {}
        self._seen_at: int | None = None
        self._seen_lock = threading.Lock()
        renew_after_fork(self)

    def _after_fork_in_child(self) -> None:
        self._seen_lock = threading.Lock()

    def group_name(self, key: str) -> str:
        check_name("chunk key", key)
        return f"{self.namespace}:{key}"

    def shared_group_name(self, group: str, position: int, shape: Sequence[int],
                          dtype: str) -> str:
        check_name("sharing group", group)
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise InvalidInputError(f"chunk position {position!r}: expected an int >= 0")
        return (f"{self.namespace}-shared:{group}:{position}:"
                f"{'x'.join(str(int(d)) for d in shape)}:{dtype}")

    def _params(self, part: list[str]) -> dict[str, Any]:
        return {"groups": [self.group_name(k) for k in part], "keys": part,
                "shared": self._shared_like}

    def _key_of(self, group_name: str, agent_name: str) -> str:
        return group_name[len(self.namespace) + 1:] if agent_name == AGENT and \
            group_name.startswith(f"{self.namespace}:") else agent_name

    def _locate(self, keys: Sequence[str]) -> dict[str, _Found]:
        """The committed, readable chunks among ``keys``: two catalogue queries per 500
        keys, in one transaction; none while nothing was committed to the catalogue
        since these keys were looked up (what lookups found is kept for that: measured
        in the LMCache benchmark, 8 lookups of 8 keys 0.012-0.025 s with queries, about
        0.002 s answered from what was kept)."""
        counter = self.store.catalog.change_counter()
        if counter is not None:
            with self._seen_lock:
                if counter == self._seen_at and all(k in self._seen for k in keys):
                    return {k: at for k in keys if (at := self._seen[k]) is not None}
        found = self._query(keys)
        if counter is not None:  # read before the query: what it found is no older
            with self._seen_lock:
                if counter != self._seen_at or len(self._seen) > SEEN_KEEP:
                    self._seen, self._seen_at = {}, counter
                self._seen.update({k: found.get(k) for k in keys})
        return found

    def _query(self, keys: Sequence[str]) -> dict[str, _Found]:
        found: dict[str, _Found] = {}
        keys = list(keys)
        with self.store.catalog.read() as s:
            for i in range(0, len(keys), 500):
                params = self._params(keys[i : i + 500])
                for stmt in _ROWS:
                    for g, a in s.execute(stmt, params):
                        found.setdefault(self._key_of(g.name, a.name), _Found(g, a))
        return found

    def _present(self, keys: Sequence[str]) -> set[str]:
        """The keys among ``keys`` whose chunks are committed (names only, one query
        per 500 keys: lighter than :meth:`_locate`, for lookups)."""
        present: set[str] = set()
        keys = list(keys)
        with self.store.catalog.read() as s:
            for i in range(0, len(keys), 500):
                for gname, aname in s.execute(_NAMES, self._params(keys[i : i + 500])):
                    present.add(self._key_of(gname, aname))
        return present

    def _where(self, key: str) -> _Found:
        check_name("chunk key", key)
        at = self._locate([key]).get(key)
        if at is None:
            raise NotFoundError(f"chunk {key!r} is not in store {self.store.path}")
        return at

    # ------------------------------------------------------------------ writing

    def put(self, key: str, array: np.ndarray, *, fmt: str | None = None,
            attrs: dict[str, Any] | None = None,
            share: tuple[str, int] | None = None) -> bool:
        """Store ``array`` under ``key`` (durable and visible on return); returns False
        when the key was already stored (the existing chunk is kept, keys name content,
        and counts as used now in the budget's LRU order).
        With ``share=(group, position)`` it is stored against the chunk other agents of
        ``group`` stored at ``position`` (see the module's documentation).
        """
        if not isinstance(array, np.ndarray):
            raise InvalidInputError(f"chunk {key!r}: expected a numpy.ndarray, got "
                                    f"{type(array).__name__}")
        from tdstore.core.dtypes import logical_name

        name = self.group_name(key)
        dtype = logical_name(array.dtype, f"chunk {key!r}")
        if self.touch(key):
            # put again: used again, the newest in the budget's LRU order (a prompt
            # prefix every request of a pipeline stores must outlast their own chunks)
            return False
        a = np.ascontiguousarray(array)
        n_blocks, block = block_layout(a.shape, a.dtype.itemsize)
        blocks = a.reshape(-1).view(np.uint8).reshape(n_blocks, block)
        # the shape, dtype and format say how to read the bytes back: stored with the
        # agent's attributes, which carry a checksum (see storage.integrity.seal_attrs)
        meta = {"shape": list(a.shape), "dtype": dtype, "fmt": fmt, **(attrs or {})}
        if share is None:
            # one chunk file per chunk (one open and read); a shared group keeps the
            # default, since its mirrors' arrays of a few blocks would be padded to it
            g = self.store.group(name, diff_threshold=0.0, chunk_blocks=n_blocks)
            g.register_master(AGENT, blocks, attrs=meta)
            return True
        self._put_shared(self.shared_group_name(share[0], share[1], a.shape, dtype), key,
                         blocks, meta)
        return True

    def _put_shared(self, name: str, key: str, blocks: np.ndarray,
                    meta: dict[str, Any]) -> None:
        """Store a chunk in the shared group ``name``: its master if it has none yet,
        else a mirror of it. A group whose master was quarantined (``verify --repair``
        found it damaged) cannot be read or stored against: it is deleted, with the
        chunks stored against it (misses already), and this chunk starts it anew."""
        for attempt in range(3):
            before, master = self._group_state(name)
            g = self.store.group(name, diff_threshold=0.0)
            if master is None:
                try:
                    g.register_master(key, blocks, attrs=meta, first=True)
                    return
                except StateError:  # another process put down the master meanwhile
                    pass
            try:
                g.register_mirror(key, blocks, attrs=meta)
                return
            except TdStoreError:
                if attempt == 2:
                    raise
                try:
                    gone = self.store.discard_quarantined_group(name)
                except NotFoundError:  # deleted meanwhile
                    gone = True
                # (or another writer started it anew meanwhile)
                if not gone and self._group_state(name)[0] == before:
                    raise

    def _group_state(self, name: str) -> tuple[str | None, str | None]:
        """The id of group ``name`` and its master's name (None where there is none), in
        one query."""
        master = aliased(AgentRow)
        with self.store.catalog.read() as s:
            row = s.execute(select(GroupRow.gid, master.name).outerjoin(
                master, (master.group_id == GroupRow.id) & (master.role == Role.MASTER))
                .where(GroupRow.name == name)).first()
        return (None, None) if row is None else (row[0], row[1])

    def touch(self, key: str) -> bool:
        """Record a use of the chunk now (the budget's LRU order), waiting for the
        catalogue's write lock; returns whether it is stored."""
        check_name("chunk key", key)
        stored = self._locate([key]).get(key)
        if stored is not None and not self.store.readonly:
            self.store.catalog.touch({stored.agent.id: stored.agent.last_access}, 0.0,
                                     wait=True)
        return stored is not None

    def remove(self, key: str) -> bool:
        """Remove the chunk; returns whether it was there. A shared chunk that other
        chunks are stored against takes them with it (they become misses)."""
        try:
            at = self._where(key)
            gname, agent = at.group.name, at.agent.name
            if agent == AGENT or agent == self.store.group(gname, create=False).master_id:
                self.store.delete_group(gname)
            else:
                self.store.group(gname, create=False).delete(agent)
        except NotFoundError:
            return False
        return True

    # ------------------------------------------------------------------ reading

    def meta(self, key: str) -> dict[str, Any]:
        """The chunk's shape, dtype, format tag and other attributes."""
        return self._where(key).attrs

    def get(self, key: str) -> tuple[np.ndarray, dict[str, Any]]:
        """The chunk's array (its dtype and shape) and its attributes."""
        from tdstore.core.dtypes import numpy_dtype

        at = self._where(key)
        meta = at.attrs
        out = np.empty(meta["shape"], numpy_dtype(meta["dtype"]))
        self._record(self._read(key, at, out.reshape(-1).view(np.uint8)))
        return out, meta

    def read_into(self, key: str, buf: np.ndarray) -> dict[str, Any]:
        """Read the chunk's bytes into ``buf`` (a writable uint8 array of its size, e.g.
        over a buffer someone else allocated); returns its attributes."""
        at = self._where(key)
        self._record(self._read(key, at, buf))
        return at.attrs

    def _record(self, accessed: dict[int, float]) -> None:
        """Record reads of these agent rows (the budget's LRU order)."""
        if accessed and not self.store.readonly:
            from tdstore.ops.groups import ACCESS_RESOLUTION_S

            self.store.catalog.touch(accessed, ACCESS_RESOLUTION_S)

    def _layout(self, key: str, at: _Found, buf: np.ndarray) -> np.ndarray:
        """``buf`` (checked against the chunk's recorded size) as the chunk's blocks."""
        n_blocks, block = at.layout()
        if not isinstance(buf, np.ndarray):
            raise InvalidInputError(f"chunk {key!r}: the buffer must be a numpy uint8 array, "
                                    f"got {type(buf).__name__}")
        if buf.dtype != np.uint8 or buf.size != n_blocks * block:
            raise InvalidInputError(f"chunk {key!r}: the buffer holds {buf.size} "
                                    f"{buf.dtype} items, expected {n_blocks * block} uint8")
        if not (buf.flags.c_contiguous and buf.flags.writeable):
            # (a reshape of any other array is a copy: the bytes would go there)
            raise InvalidInputError(f"chunk {key!r}: the buffer must be writable and "
                                    "C-contiguous")
        return buf.reshape(n_blocks, block)

    def _read(self, key: str, at: _Found, buf: np.ndarray) -> dict[int, float]:
        """Read one located chunk into ``buf``; returns the access to record. A chunk
        filed as a master is read from the rows already located (no further query)."""
        from tdstore.storage.reads import check_out, reconstruct_into

        out = self._layout(key, at, buf)
        accessed: dict[int, float] = {}

        def fill(snap: Any) -> None:
            check_out(snap, out)
            reconstruct_into(self.store.arrays, snap, out)
            accessed.update(snap.accessed)

        if at.agent.role == Role.MASTER:
            fill(at.master())
        else:  # a mirror: its master and diff index, with the read's retry on churn
            self.store.group_ops(at.group.name).read(at.agent.name, fill, touch=False)
        return accessed

    def locate_prefix(self, keys: Sequence[str]) -> dict[str, Any]:
        """The catalogue rows of ``keys`` from the first up to the first one not
        committed (one transaction), by key: its length is :meth:`count_present`'s
        answer, and the rows are :meth:`read_many`'s ``located``."""
        for k in keys:
            check_name("chunk key", k)
        found = self._locate(keys)
        return {k: found[k] for k in keys[:_prefix(keys, found)]}

    def read_many(self, keys: Sequence[str],
                  buffer: Callable[[int, dict[str, Any]], np.ndarray | None], *,
                  accessed_into: dict[int, float] | None = None,
                  located: dict[str, Any] | None = None) -> int:
        """Read the chunks of ``keys`` in order until one is missing (or unreadable, or
        ``buffer`` gives none): ``buffer(i, attributes)`` returns the uint8 array the
        i-th chunk's bytes go into. Returns how many were read (from the first). One
        lookup for all keys; the buffers are asked for in order, then the chunks are
        read at once by the store's I/O threads; one access record for all chunks read
        (for the budget's LRU order); with ``accessed_into`` the accesses are added
        there instead, for the caller to record later (``catalog.touch``). With
        ``located`` (rows from :meth:`locate`, e.g. kept from a lookup just before) no
        lookup at all: a row gone stale since only makes a miss, as every read is checked
        against the checksums recorded with the chunk."""
        from tdstore.core.errors import TdStoreError
        from tdstore.storage.arrays import run_all
        from tdstore.storage.reads import check_out

        for k in keys:
            check_name("chunk key", k)
        where = self._locate(keys) if located is None else located
        misses = (TdStoreError, KeyError, TypeError, ValueError)
        todo: list[tuple[str, _Found, np.ndarray]] = []
        accessed: list[dict[int, float]] = []  # what each read touched
        masters: list[int] = []
        mirrors: list[int] = []

        def prepared() -> Iterator[tuple[ArrayRef, np.ndarray, str]]:
            """The chunks in order, up to the first miss, each with its buffer: a chunk
            filed as a master (every chunk but those stored against a sharing group's)
            checked and yielded for the store's batched read, which starts reading it
            while the next is prepared; a mirror left for later."""
            for i, k in enumerate(keys):
                at = where.get(k)
                if at is None:
                    return
                try:
                    attrs = at.attrs
                except TdStoreError:  # a damaged row: a miss, like damaged data
                    return
                buf = buffer(i, attrs)
                if buf is None:
                    return
                todo.append((k, at, buf))
                accessed.append({})
                if at.agent.role != Role.MASTER:
                    mirrors.append(i)
                    continue
                try:
                    out = self._layout(k, at, buf)
                    snap = at.master()
                    check_out(snap, out)
                except misses:
                    todo.pop()  # a miss: this chunk and every later one
                    return
                masters.append(i)
                accessed[i] = snap.accessed
                yield snap.master, out.view(snap.spec.dtype), f"{snap.label} (master)"

        def read(k: str, at: _Found, buf: np.ndarray) -> dict[int, float] | None:
            try:
                return self._read(k, at, buf)
            except misses:
                return None

        # measured in the LMCache benchmark, 64 chunks of 8 MiB from the page cache,
        # checksums on: one after the other 0.22-0.24 s, one read per chunk on the I/O
        # threads 0.146-0.154 s, the batched read 0.12-0.13 s. A mirror is read on its
        # own, with the read's retry on churn.
        n = 0
        ok: list[bool] = []
        try:
            errors = self.store.arrays.read_arrays(prepared())
            ok = [False] * len(todo)
            for i, err in zip(masters, errors, strict=True):
                if err is not None and not isinstance(err, misses):
                    raise err
                ok[i] = err is None
            for i, res in zip(mirrors, run_all([functools.partial(read, *todo[i])
                                                for i in mirrors]), strict=True):
                ok[i], accessed[i] = res is not None, res or {}
            while n < len(todo) and ok[n]:
                n += 1
        finally:
            got = {a: t for acc in accessed[:n] for a, t in acc.items()}
            if accessed_into is not None:
                accessed_into.update(got)
            else:
                self._record(got)
        return n

    def contains(self, key: str) -> bool:
        return self.count_present([key]) == 1

    def count_present(self, keys: Sequence[str]) -> int:
        """How many of ``keys``, from the first, are stored (committed and readable):
        one catalogue query for all of them."""
        if not keys:
            return 0
        for k in keys:
            check_name("chunk key", k)
        # where lookups are kept, through them (often no query at all); else names only
        present = (self._locate(keys) if self.store.catalog.counts_changes
                   else self._present(keys))
        return _prefix(keys, present)

    def keys(self) -> list[str]:
        """Every stored key of this namespace."""
        prefix, shared = f"{self.namespace}:", f"{self.namespace}-shared:"
        with self.store.catalog.read() as s:
            names = s.scalars(select(GroupRow.name)
                              .join(AgentRow, AgentRow.group_id == GroupRow.id)
                              .where(GroupRow.name.startswith(prefix, autoescape=True),
                                     AgentRow.role == Role.MASTER).order_by(GroupRow.id))
            out = [n[len(prefix):] for n in names]
            out += list(s.scalars(select(AgentRow.name)
                                  .join(GroupRow, AgentRow.group_id == GroupRow.id)
                                  .where(GroupRow.name.startswith(shared, autoescape=True))
                                  .order_by(AgentRow.id)))
            return out
