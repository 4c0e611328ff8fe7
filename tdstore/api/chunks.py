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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select

from tdstore.core.errors import InvalidInputError, NotFoundError
from tdstore.core.kinds import Role, Status
from tdstore.core.validate import check_name
from tdstore.storage.catalog import AgentRow, GroupRow

if TYPE_CHECKING:
    from tdstore.api.store import Store

AGENT = "chunk"
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


class Chunks:
    """The keyed chunks of namespace ``namespace`` in ``store``."""

    def __init__(self, store: Store, namespace: str = "chunk"):
        check_name("namespace", namespace)
        if ":" in namespace:
            raise InvalidInputError(f"chunk namespace {namespace!r}: must not contain ':'")
        self.store = store
        self.namespace = namespace

    def group_name(self, key: str) -> str:
        check_name("chunk key", key)
        return f"{self.namespace}:{key}"

    # ------------------------------------------------------------------ writing

    def put(self, key: str, array: np.ndarray, *, fmt: str | None = None,
            attrs: dict[str, Any] | None = None) -> bool:
        """Store ``array`` under ``key`` (durable and visible on return); returns False
        when the key was already stored (the existing chunk is kept: keys name content).
        """
        if not isinstance(array, np.ndarray):
            raise InvalidInputError(f"chunk {key!r}: expected a numpy.ndarray, got "
                                    f"{type(array).__name__}")
        from tdstore.core.dtypes import logical_name

        name = self.group_name(key)
        dtype = logical_name(array.dtype, f"chunk {key!r}")
        if name in self.store and self.contains(key):
            return False
        a = np.ascontiguousarray(array)
        n_blocks, block = block_layout(a.shape, a.dtype.itemsize)
        blocks = a.reshape(-1).view(np.uint8).reshape(n_blocks, block)
        meta = {"shape": list(a.shape), "dtype": dtype, "fmt": fmt, **(attrs or {})}
        g = self.store.group(name, diff_threshold=0.0)
        g.register_master(AGENT, blocks, attrs=meta)
        return True

    def remove(self, key: str) -> bool:
        """Remove the chunk; returns whether it was there."""
        try:
            self.store.delete_group(self.group_name(key))
        except NotFoundError:
            return False
        return True

    # ------------------------------------------------------------------ reading

    def meta(self, key: str) -> dict[str, Any]:
        """The chunk's shape, dtype, format tag and other attributes."""
        try:
            return self.store.group(self.group_name(key), create=False).attrs(AGENT)
        except NotFoundError:
            raise NotFoundError(f"chunk {key!r} is not in store {self.store.path}") from None

    def get(self, key: str) -> tuple[np.ndarray, dict[str, Any]]:
        """The chunk's array (its dtype and shape) and its attributes."""
        from tdstore.core.dtypes import numpy_dtype

        meta = self.meta(key)
        dtype = numpy_dtype(meta["dtype"])
        out = np.empty(meta["shape"], dtype)
        self.read_into(key, out.reshape(-1).view(np.uint8), meta)
        return out, meta

    def read_into(self, key: str, buf: np.ndarray, meta: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
        """Read the chunk's bytes into ``buf`` (a writable uint8 array of its size, e.g.
        over a buffer someone else allocated); returns its attributes."""
        from tdstore.core.dtypes import numpy_dtype

        meta = self.meta(key) if meta is None else meta
        dtype = numpy_dtype(meta["dtype"])
        n_blocks, block = block_layout(meta["shape"], dtype.itemsize)
        if buf.dtype != np.uint8 or buf.size != n_blocks * block:
            raise InvalidInputError(f"chunk {key!r}: the buffer holds {buf.size} "
                                    f"{buf.dtype} items, expected {n_blocks * block} uint8")
        g = self.store.group(self.group_name(key), create=False)
        g.reconstruct(AGENT, out=buf.reshape(n_blocks, block))
        return meta

    def contains(self, key: str) -> bool:
        return self.count_present([key]) == 1

    def count_present(self, keys: Sequence[str]) -> int:
        """How many of ``keys``, from the first, are stored (committed and readable):
        one catalogue query for all of them."""
        if not keys:
            return 0
        names = [self.group_name(k) for k in keys]
        present = self._present(names)
        n = 0
        for name in names:
            if name not in present:
                break
            n += 1
        return n

    def _present(self, names: Iterable[str]) -> set[str]:
        catalog = self.store.catalog
        names = list(names)
        found: set[str] = set()
        with catalog.read() as s:
            for i in range(0, len(names), 500):
                found.update(s.scalars(
                    select(GroupRow.name).join(AgentRow, AgentRow.group_id == GroupRow.id)
                    .where(GroupRow.name.in_(names[i : i + 500]), AgentRow.role == Role.MASTER,
                           AgentRow.status == Status.OK)))
        return found

    def keys(self) -> list[str]:
        """Every stored key of this namespace."""
        prefix = f"{self.namespace}:"
        with self.store.catalog.read() as s:
            names = s.scalars(select(GroupRow.name)
                              .join(AgentRow, AgentRow.group_id == GroupRow.id)
                              .where(GroupRow.name.startswith(prefix, autoescape=True),
                                     AgentRow.role == Role.MASTER).order_by(GroupRow.id))
            return [n[len(prefix):] for n in names]
