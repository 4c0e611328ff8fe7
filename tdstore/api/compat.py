"""The seed prototype's API, backed by a persistent store.

``TokenDanceStorage`` keeps the seed's names and semantics: ``path=None`` is a throwaway
store in a temporary directory (removed when the object is closed or collected); with a
path the state persists and a new process sees it.
"""

from __future__ import annotations

import tempfile
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, Unpack

import numpy as np

from tdstore.api.store import ClosingContext, Group, OpenOptions, Store
from tdstore.core.errors import NoMasterError, NotFoundError
from tdstore.core.sparse import SparseKVDiff


class _MasterCache(Mapping[str, np.ndarray]):
    """Read-only ``{master_id: blocks}``; arrays returned are read-only copies."""

    def __init__(self, group: Group):
        self._group = group

    def __getitem__(self, agent: str) -> np.ndarray:
        if agent != self._group.master_id:
            raise NotFoundError(f"group {self._group.name!r}: {agent!r} is not the master")
        out = self._group.reconstruct(agent)
        out.flags.writeable = False
        return out

    def __iter__(self) -> Iterator[str]:
        master = self._group.master_id
        return iter([] if master is None else [master])

    def __len__(self) -> int:
        return 0 if self._group.master_id is None else 1


class _Mirrors(Mapping[str, SparseKVDiff]):
    """Read-only ``{agent_id: SparseKVDiff}`` of the group's mirrors."""

    def __init__(self, group: Group):
        self._group = group

    def _names(self) -> list[str]:
        master = self._group.master_id
        return [a for a in self._group.agents() if a != master]

    def __getitem__(self, agent: str) -> SparseKVDiff:
        if agent == self._group.master_id:
            raise NotFoundError(f"group {self._group.name!r}: {agent!r} is the master")
        return self._group.mirror(agent)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, agent: object) -> bool:
        return agent in self._group and agent != self._group.master_id


class TokenDanceStorage(ClosingContext):
    """Master-mirror diff storage for multi-agent KV caches (the seed's API, persistent)."""

    def __init__(self, diff_threshold: float = 1e-4, *, path: str | None = None,
                 group: str = "default", **options: Unpack[OpenOptions]):
        self._tmp = None
        if path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tdstore-")
            path = self._tmp.name
        self._store = Store(path, **options)
        self._finalizer = weakref.finalize(self, self._store.close)
        self._group = self._store.group(group, diff_threshold=diff_threshold)
        self.master_cache: Mapping[str, np.ndarray] = _MasterCache(self._group)
        self.mirrors: Mapping[str, SparseKVDiff] = _Mirrors(self._group)

    @property
    def group(self) -> Group:
        return self._group

    @property
    def diff_threshold(self) -> float:
        return self._group.diff_threshold

    @diff_threshold.setter
    def diff_threshold(self, value: float) -> None:
        self._group.set_diff_threshold(value)

    @property
    def master_id(self) -> str | None:
        return self._group.master_id

    def register_master(self, agent_id: str, kv_blocks: np.ndarray) -> None:
        self._group.register_master(agent_id, kv_blocks)

    def register_mirror(self, agent_id: str, kv_blocks: np.ndarray) -> SparseKVDiff:
        return self._group.register_mirror(agent_id, kv_blocks)

    def reconstruct(self, agent_id: str) -> np.ndarray:
        if self._group.master_id is None:
            raise NoMasterError(f"group {self._group.name!r}: No master registered")
        return self._group.reconstruct(agent_id)

    def compression_ratio(self) -> float:
        return self._group.compression_ratio()

    def collective_reuse_step(self, agent_ids: list[str], shared_blocks: np.ndarray
                              ) -> dict[str, int]:
        return self._group.collective_reuse_step(agent_ids, shared_blocks)

    def stats(self) -> dict[str, Any]:
        return self._group.stats()

    def close(self) -> None:
        self._finalizer()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"TokenDanceStorage(master={s['master_id']!r}, "
            f"master_blocks={s['master_blocks']}, mirrors={s['n_mirrors']}, "
            f"diff_blocks={s['diff_blocks_total']}, "
            f"compression={s['compression_ratio']:.2f}x, "
            f"threshold={s['diff_threshold']:.0e})"
        )
