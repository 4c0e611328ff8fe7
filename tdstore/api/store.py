"""The public facade: :func:`open`, :class:`Store`, :class:`Group` and :class:`BlockView`.

Each class is a thin, typed face over ``tdstore.ops``: a ``Store`` wraps a
:class:`~tdstore.ops.context.StoreContext`, a ``Group`` a
:class:`~tdstore.ops.groups.GroupOps`. The logic lives there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Self, TypedDict, TypeVar, Unpack, overload

import numpy as np

from tdstore.core.sparse import SparseKVDiff
from tdstore.core.validate import (
    VerifyReads,
    check_chunk_blocks,
    check_compressor,
    check_kv_layout,
    check_name,
    check_threshold,
)
from tdstore.ops import budget, files, maintenance, rewrites
from tdstore.ops.budget import Victim
from tdstore.ops.context import StoreContext
from tdstore.ops.groups import GroupOps
from tdstore.ops.maintenance import GcReport, Progress, VerifyReport
from tdstore.storage.arrays import ArrayStore
from tdstore.storage.catalog import Catalog
from tdstore.storage.reads import AgentSnapshot

if TYPE_CHECKING:
    from tdstore.api.chunks import Chunks

T = TypeVar("T")


class _Forward(Generic[T]):
    """A read-only attribute reading the attribute of the same name of the wrapped
    object (``_ctx`` of a Store, ``_ops`` of a Group), so each reads the current state."""

    def __init__(self, inner: str, doc: str) -> None:
        self.inner = inner
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _Forward[T]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> T: ...
    def __get__(self, obj: object | None, owner: type | None = None) -> T | _Forward[T]:
        if obj is None:
            return self
        value: T = getattr(getattr(obj, self.inner), self.name)
        return value

    def __set__(self, obj: object, value: object) -> None:
        raise AttributeError(f"{self.name} is read-only")


class ClosingContext:
    """``with x:`` closes ``x`` at the end of the block."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OpenOptions(TypedDict, total=False):
    """The keyword arguments of :func:`open` (and of :class:`Store`)."""

    url: str | None
    readonly: bool
    verify_reads: VerifyReads
    direct_reads: bool
    max_bytes: int | None
    create: bool
    upgrade: bool
    storage_options: Mapping[str, Any] | None
    cache_dir: str | os.PathLike[str] | None
    cache_max_bytes: int | None


class Store(ClosingContext):
    """A tdstore directory: ``catalog.sqlite`` plus the zarr hierarchy under ``data/``.

    Use :func:`tdstore.open` to get one. A Store is safe to use from several threads, and
    any number of processes may open the same directory at once.
    """

    def __init__(self, path: str | os.PathLike[str], **options: Unpack[OpenOptions]):
        self._ctx = StoreContext(path, **options)

    path: _Forward[Path | str] = _Forward(
        "_ctx", "The store directory (absolute), or the object-store URL.")
    readonly: _Forward[bool] = _Forward("_ctx", "Whether the store was opened read-only.")
    catalog: _Forward[Catalog] = _Forward(
        "_ctx", "The catalogue (storage layer), for tools that inspect a store directly.")
    arrays: _Forward[ArrayStore] = _Forward(
        "_ctx", "The array store (storage layer), for tools that inspect a store directly.")

    def group_ops(self, name: str) -> GroupOps:
        """The operations layer's view of group ``name`` (for the facade's own modules,
        such as :class:`tdstore.api.chunks.Chunks`)."""
        return GroupOps(self._ctx, name)

    def chunks(self, namespace: str = "chunk") -> Chunks:
        """Arrays stored and found by a string key (see :class:`tdstore.api.chunks.Chunks`),
        each kept as a group ``<namespace>:<key>``."""
        from tdstore.api.chunks import Chunks

        return Chunks(self, namespace)

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
        check_compressor(compressor)
        settings = {
            "diff_threshold": None if diff_threshold is None
            else check_threshold(diff_threshold, name),
            "compressor": compressor,
            "chunk_blocks": check_chunk_blocks(chunk_blocks, name),
            "allow_nonfinite": allow_nonfinite,
            "kv_layout": None if kv_layout is None else check_kv_layout(kv_layout),
        }
        self._ctx.open_group(name, settings, create=create)
        return Group(self, name)

    def groups(self) -> list[str]:
        """Names of the groups in this store, oldest first."""
        return self._ctx.groups()

    def __contains__(self, name: object) -> bool:
        return name in self._ctx

    def ls(self) -> list[dict[str, Any]]:
        """One row per group: agents, master, blocks, shape, dtype, bytes, ratio."""
        return maintenance.ls_groups(self._ctx)

    def discard_empty_group(self, name: str) -> bool:
        """Delete group ``name`` if it holds no agent (e.g. one a failed import created);
        returns whether it was deleted. A group with any agent is left alone."""
        return self._ctx.discard_if_empty(name, self._gid(name))

    def discard_quarantined_group(self, name: str) -> bool:
        """Delete group ``name`` if its master is quarantined (``verify --repair`` found
        its data damaged), with its mirrors, which are read through the master; returns
        whether it was deleted. A group whose master is healthy, or was re-registered
        meanwhile, is left alone. For a cache, whose entries are stored again when
        missed; a store of record re-registers the master instead."""
        return self._ctx.discard_if_quarantined(name, self._gid(name))

    def _gid(self, name: str) -> str:
        """The id of group ``name`` (NotFoundError when there is none)."""
        with self.catalog.read() as s:
            return self._ctx.group_row(s, name).gid

    def delete_group(self, name: str) -> None:
        """Delete a group, its agents and their data. Raises NotFoundError if missing.

        Deletes the group the name means when its lock is held: racing a re-creation of
        the same name, either the old or the new group goes, never the wrong data."""
        self._ctx.delete_group(name)

    # ------------------------------------------------------------------ maintenance

    @property
    def max_bytes(self) -> int | None:
        """The size budget of ``data/`` in bytes (None: unlimited); persisted."""
        return budget.get_max_bytes(self._ctx)

    def set_max_bytes(self, value: int | None) -> None:
        """Set (None: remove) the persisted size budget. Takes effect on the next write;
        use :meth:`evict` to shrink the store to a new, lower budget at once."""
        budget.set_max_bytes(self._ctx, value)

    def accounted_bytes(self) -> int:
        """Bytes under ``data/`` as the size budget counts them (agents' arrays, journaled
        data, metadata), from the catalogue alone."""
        return budget.accounted_bytes(self._ctx)

    def info(self) -> dict[str, Any]:
        """Schema revision, versions, groups, agents, bytes, ratio, reclaimable bytes."""
        return maintenance.info(self._ctx)

    def verify(self, *, repair: bool = False, progress: Progress | None = None
               ) -> VerifyReport:
        """Check catalogue against data (and every chunk's crc32c); see
        ``tdstore.ops.maintenance``."""
        return maintenance.verify(self._ctx, repair=repair, progress=progress)

    def gc(self, *, dry_run: bool = False, progress: Progress | None = None) -> GcReport:
        """Remove data no catalogue row references; ``dry_run`` only reports it."""
        return maintenance.gc(self._ctx, dry_run=dry_run, progress=progress)

    def evict(self, max_bytes: int, *, dry_run: bool = False) -> list[Victim]:
        """Evict least-recently-used agents until the data fits in ``max_bytes``."""
        return maintenance.evict(self._ctx, max_bytes, dry_run=dry_run)

    def migrate(self, revision: str = "head") -> tuple[str, ...]:
        """Upgrade (or downgrade) the catalogue schema; returns the new revision."""
        return self._ctx.migrate(revision)

    def close(self) -> None:
        """Release the catalogue's connections. The store can be opened again later."""
        self._ctx.close()

    def __repr__(self) -> str:
        mode = ", readonly" if self.readonly else ""
        return f"<tdstore.Store {str(self.path)!r}{mode}>"


class Group:
    """Agents that share one master. Get one with :meth:`Store.group`.

    Every method reads the current state from the catalogue, so a Group always reflects
    what other processes have committed.
    """

    def __init__(self, store: Store, name: str):
        self.store = store
        self.name = name
        self._ops = GroupOps(store._ctx, name)

    def __repr__(self) -> str:
        return f"<tdstore.Group {self.name!r} in {str(self.store.path)!r}>"

    # ------------------------------------------------------------------ properties

    master_id: _Forward[str | None] = _Forward(
        "_ops", "Name of the master agent, or None before one is registered.")
    diff_threshold: _Forward[float] = _Forward(
        "_ops", "The persisted diff threshold (applies to mirrors registered later).")
    n_blocks: _Forward[int] = _Forward("_ops", "Blocks of every agent (0 before a master).")
    block_shape: _Forward[tuple[int, ...] | None] = _Forward(
        "_ops", "The shape of one block, or None before a master.")
    dtype: _Forward[np.dtype | None] = _Forward(
        "_ops", "The dtype of the blocks (bfloat16, float8 included), or None.")
    kv_layout: _Forward[dict[str, Any] | None] = _Forward(
        "_ops", "The axes of a block, if the group records them (attention A/B, HF).")

    def set_diff_threshold(self, value: float) -> None:
        """Change the persisted threshold; it applies to mirrors registered later."""
        self._ops.set_diff_threshold(value)

    def attrs(self, agent_id: str) -> dict[str, Any]:
        """The attributes stored with an agent (empty if none)."""
        return self._ops.attrs(agent_id)

    def agents(self) -> list[str]:
        """Agent names: the master first, then mirrors in registration order."""
        return self._ops.agents()

    def __contains__(self, agent: object) -> bool:
        return agent in self._ops

    def ls(self) -> list[dict[str, Any]]:
        """One row per agent: role, blocks, diff blocks, bytes, last access, status."""
        return maintenance.ls_agents(self.store._ctx, self.name)

    # ------------------------------------------------------------------ writes

    def register_master(self, agent_id: str, kv_blocks: object, *,
                        attrs: dict[str, Any] | None = None, first: bool = False) -> None:
        """Store ``kv_blocks`` (``(n_blocks, ...)``, an ndarray or torch tensor) as the
        group's master.

        A different agent replaces the master and removes every mirror (their data
        becomes unreferenced). Re-registering the current master re-derives each mirror
        against the new blocks, so every mirror still reconstructs to its own values;
        re-registering a master quarantined by ``verify --repair`` restores it and keeps
        its mirrors' stored blocks.

        ``attrs`` (a JSON-able dict) is stored with the agent in the same transaction.
        With ``first=True`` the master is registered only if the group has none yet
        (decided under the group's writer lock), else StateError: several processes can
        race to put down a group's first master and exactly one wins.
        Raises InvalidInputError for bad arrays or names (nothing is written).
        """
        self._ops.register_master(agent_id, kv_blocks, attrs=attrs, first=first)

    def register_mirror(self, agent_id: str, kv_blocks: object, *,
                        attrs: dict[str, Any] | None = None) -> SparseKVDiff:
        """Store ``kv_blocks`` as a mirror: only the blocks that differ from the master.

        Re-registering a mirror replaces it atomically. Returns the stored diff.
        ``attrs`` (a JSON-able dict) is stored with the agent in the same transaction.
        Raises NoMasterError without a master, InvalidInputError for a shape or dtype
        that does not match the master (nothing is written).
        """
        return self._ops.register_mirror(agent_id, kv_blocks, attrs=attrs)

    def collective_reuse_step(self, agent_ids: Sequence[str], shared_blocks: object
                              ) -> dict[str, int]:
        """Append ``shared_blocks`` to the master once; every mirror adopts them.

        Agents named in ``agent_ids`` that are not in the group join as mirrors identical
        to the master. Cost is O(new blocks): existing chunks are not rewritten. Returns
        the number of diff blocks of the master and of each agent named.
        """
        return self._ops.collective_reuse_step(agent_ids, shared_blocks)

    def delete(self, agent_id: str) -> None:
        """Delete an agent and its data.

        The master can be deleted only once it has no mirrors (delete them, or the whole
        group with ``Store.delete_group``). Raises NotFoundError for an unknown agent.
        """
        self._ops.delete(agent_id)

    # ------------------------------------------------------------------ reads

    def reconstruct(self, agent_id: str, out: np.ndarray | None = None, *,
                    device: Any = None) -> Any:
        """The agent's full KV blocks, bit-exact for every kept block.

        With ``out`` (an ndarray or ``np.memmap`` of the right shape and dtype) the blocks
        are written into it and ``out`` is returned; no full-size temporary is made.
        With ``device`` (e.g. ``"cpu"``, ``"cuda"``, a ``torch.device``) the result is a
        torch tensor there, in the same dtype (bfloat16 included); for CUDA the blocks
        are read straight into pinned host memory and copied once.
        Raises NotFoundError for an unknown agent, CorruptionError for damaged data,
        InvalidInputError for a device torch cannot use here (CUDA without a GPU).
        """
        return self._ops.reconstruct(agent_id, out, device=device)

    def view(self, agent_id: str) -> BlockView:
        """A lazy view of the agent's blocks; indexing reads only the blocks asked for."""
        self._ops.snapshot(agent_id)  # unknown agents fail here, not on first use
        return BlockView(self, agent_id)

    def mirror(self, agent_id: str) -> SparseKVDiff:
        """The stored diff of a mirror (the master has an empty one)."""
        return self._ops.mirror(agent_id)

    # ------------------------------------------------------------------ introspection

    def stats(self) -> dict[str, Any]:
        """The seed's statistics plus the layout and bytes (logical and on disk)."""
        return self._ops.stats()

    def compression_ratio(self) -> float:
        """(agents x master blocks) / (master blocks + diff blocks); 1.0 without a master."""
        return self._ops.compression_ratio()

    # ------------------------------------------------------------------ maintenance

    def rebase(self, master: str | None = None) -> dict[str, Any]:
        """Make ``master`` (None: the agent minimising the total diff) the master and
        re-derive every mirror, atomically."""
        return rewrites.rebase(self._ops, master)

    def compact(self) -> dict[str, Any]:
        """Rewrite the group tightly (re-balanced chunks), atomically."""
        return rewrites.compact(self._ops)

    def export(self, agent_id: str, file: str | os.PathLike[str]) -> dict[str, Any]:
        """Write an agent's blocks to a .npy or .safetensors file."""
        return files.export_agent(self._ops, agent_id, file)

    def import_file(self, agent_id: str, file: str | os.PathLike[str], *,
                    master: bool = False, dtype: str | None = None,
                    replace: bool = True) -> dict[str, Any]:
        """Register an agent from a .npy or .safetensors file (as a mirror unless
        ``master``, or when the group has no master yet). Registering a different agent
        as master replaces the group's master and removes its mirrors, as
        :meth:`register_master` does; the result lists them under ``"removed"``.
        ``replace=False`` refuses that (InvalidInputError naming them) instead."""
        return files.import_agent(self._ops, agent_id, file, master=master, dtype=dtype,
                                  replace=replace)


class BlockView:
    """A lazy, read-only view of one agent's blocks: ``view[i:j]``, ``view[[3, 7]]``.

    Each access reads the current catalogue state and only the blocks asked for.
    """

    def __init__(self, group: Group, agent: str):
        self.group = group
        self.agent = agent

    def _snap(self) -> AgentSnapshot:
        return self.group._ops.snapshot(self.agent)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._snap().shape

    @property
    def dtype(self) -> np.dtype:
        return self._snap().dtype

    def __len__(self) -> int:
        return self._snap().n_blocks

    def __getitem__(self, key: object) -> np.ndarray:
        return self.group._ops.blocks(self.agent, key)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        full = self.group.reconstruct(self.agent)
        return full if dtype is None else full.astype(dtype)

    def __repr__(self) -> str:
        return f"<tdstore.BlockView {self.group.name!r}/{self.agent!r} shape={self.shape}>"


def open(path: str | os.PathLike[str], **options: Unpack[OpenOptions]) -> Store:
    """Open (creating if missing) the store at ``path``: a directory, or an object-store
    location such as ``s3://bucket/prefix`` (also ``gs://``, ``az://``).

    ``url`` replaces the local SQLite catalogue with any SQLAlchemy URL; an object-store
    location needs a PostgreSQL one (default: ``$TDSTORE_URL``). ``storage_options``
    configures the object store (obstore keys such as ``endpoint``, ``access_key_id``,
    ``region``, ``allow_http``; default: the ``AWS_*`` environment variables);
    ``cache_dir`` / ``cache_max_bytes`` place and bound this host's chunk cache
    (default ``$TDSTORE_CACHE_DIR`` or ``~/.cache/tdstore``, 4 GiB; 0 turns it off). ``readonly``
    opens without writing anything (also on a directory the process cannot write);
    ``verify_reads=True`` checks every chunk's crc32c on read, ``"once"`` the first
    time this process reads each version of a chunk file and whenever a read has to go
    to the disk (local directories; on object storage ``"once"`` checks every read);
    ``direct_reads=True`` (store directories) reads a whole chunk that is not all in the
    page cache with ``O_DIRECT``, straight into the caller's buffer when it is aligned to
    4096 bytes, and leaves it out of the page cache (for a caller that keeps what it
    reads in memory of its own, such as LMCache's CPU tier);
    ``max_bytes`` sets (and
    persists) a size budget for the data, kept by evicting least-recently-used agents;
    ``create=False`` refuses a directory that holds no store instead of creating one;
    ``upgrade=False`` leaves an older catalogue schema as it is (for ``migrate``).
    Raises SchemaError if the store was written by a newer tdstore, or was pinned to an
    older schema by ``tdstore migrate --to REV``.
    """
    return Store(path, **options)
