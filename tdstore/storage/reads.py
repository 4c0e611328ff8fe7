"""The read path: rebuild an agent's blocks from the master and its own diff blocks.

A read takes one catalogue snapshot (:class:`AgentSnapshot`), then reads the master's
chunk files straight into the output buffer and overwrites the mirror's diff blocks:
O(master + diff) bytes, no per-block Python work, independent of how many agents exist.
"""

from __future__ import annotations

import ctypes
import mmap
import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tdstore.core.dtypes import numpy_dtype
from tdstore.core.errors import CorruptionError, InvalidInputError
from tdstore.core.layout import ArrayRef, ArraySpec
from tdstore.storage.arrays import ArrayStore


@dataclass(frozen=True)
class AgentSnapshot:
    """Everything a read of one agent needs, taken from one catalogue transaction."""

    group: str
    agent: str
    role: str
    master: ArrayRef  # the master's blocks
    diff: ArrayRef | None  # the mirror's own blocks
    dtype_name: str
    block_indices: np.ndarray  # int64, ascending; the values sit at slots 0..n_diff-1
    accessed: dict[int, float]  # agent row id -> last_access, for the agent and its master

    @property
    def label(self) -> str:
        return f"group {self.group!r} agent {self.agent!r}"

    @property
    def spec(self) -> ArraySpec:
        return self.master.spec

    @property
    def n_blocks(self) -> int:
        return self.master.rows

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n_blocks, *self.spec.block_shape)

    @property
    def dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype_name)

    @property
    def arrays_key(self) -> tuple[object, ...]:
        return (self.master, self.diff)


def check_out(snap: AgentSnapshot, out: np.ndarray) -> np.ndarray:
    """Validate a caller's output array; returns its stored-dtype view."""
    if not isinstance(out, np.ndarray):
        raise InvalidInputError(
            f"{snap.label}: out must be a numpy.ndarray (or np.memmap), got {type(out).__name__}"
        )
    if out.shape != snap.shape or out.dtype != snap.dtype:
        raise InvalidInputError(
            f"{snap.label}: out has shape {out.shape} and dtype {out.dtype}; expected shape "
            f"{snap.shape} and dtype {snap.dtype}"
        )
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise InvalidInputError(f"{snap.label}: out must be C-contiguous and writeable")
    return out.view(snap.spec.dtype)


# Reconstruction proceeds in windows of about this many bytes: the mirror's own blocks
# of a window are read into a temporary of at most this size, and the pages of a finished
# window of an np.memmap output are released, so memory beyond `out` stays bounded.
WINDOW_BYTES = 32 << 20


def reconstruct_into(arrays: ArrayStore, snap: AgentSnapshot, out: np.ndarray) -> None:
    """Fill ``out`` (already validated with :func:`check_out`) with the agent's blocks."""
    spec, idx = snap.spec, snap.block_indices
    raw = out.view(spec.dtype)
    window = max(1, WINDOW_BYTES // max(1, spec.block_nbytes))
    window = max(spec.chunk_blocks, window - window % spec.chunk_blocks)  # whole chunks
    release = _page_releaser(out)
    for start in range(0, snap.n_blocks, window):
        stop = min(snap.n_blocks, start + window)
        arrays.read(snap.master, start, stop, raw[start:stop], f"{snap.label} (master)")
        lo, hi = np.searchsorted(idx, [start, stop])
        if hi > lo:  # the mirror's own blocks in this window sit at slots lo..hi-1
            if snap.diff is None:  # agent_ref refuses diff blocks without an array
                raise CorruptionError(f"{snap.label}: {snap.block_indices.size} diff blocks "
                                      "but no array of them recorded")
            values = np.empty((hi - lo, *spec.block_shape), spec.dtype)
            arrays.read(snap.diff, int(lo), int(hi), values, f"{snap.label} (own blocks)",
                        "slot")
            raw[idx[lo:hi]] = values
        if release is not None:
            release(raw[start:stop])


def _page_releaser(out: np.ndarray) -> Callable[[np.ndarray], None] | None:
    """For an np.memmap output on a shared mapping, a function that drops the pages of a
    finished region from this process (they stay in the page cache and reach the file),
    so a cache larger than RAM can be rebuilt with bounded resident memory."""
    mm = getattr(out, "_mmap", None)
    if not isinstance(out, np.memmap) or not isinstance(mm, mmap.mmap) or out.mode == "c":
        return None
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    except (TypeError, ValueError):  # a read-only or closed mapping
        return None
    page = mmap.PAGESIZE

    def release(region: np.ndarray) -> None:
        begin = region.ctypes.data - base
        end = begin + region.nbytes
        begin = -(-begin // page) * page  # whole pages inside the region only
        end -= end % page
        if end > begin:
            mm.madvise(mmap.MADV_DONTNEED, begin, end - begin)

    return release


def read_blocks(arrays: ArrayStore, snap: AgentSnapshot, indices: np.ndarray) -> np.ndarray:
    """The agent's blocks at ``indices`` (any order, repeats allowed), reading only those."""
    spec = snap.spec
    uniq = np.unique(indices)
    raw = np.empty((uniq.size, *spec.block_shape), spec.dtype)
    arrays.read_runs(snap.master, uniq, raw, f"{snap.label} (master)")
    if snap.diff is not None and snap.block_indices.size:
        hit = np.isin(uniq, snap.block_indices)
        if hit.any():
            slots = np.searchsorted(snap.block_indices, uniq[hit])
            values = np.empty((slots.size, *spec.block_shape), spec.dtype)
            arrays.read_runs(snap.diff, slots, values, f"{snap.label} (own blocks)", "slot")
            raw[hit] = values
    if uniq.size != indices.size or not np.array_equal(uniq, indices):
        raw = raw[np.searchsorted(uniq, indices)]
    return raw.view(snap.dtype)


def normalize_index(key: object, n_blocks: int, label: str) -> tuple[np.ndarray, bool]:
    """Block indices selected by ``key``, and whether the result drops the block axis."""
    if isinstance(key, tuple):
        if len(key) != 1:
            raise InvalidInputError(
                f"{label}: a view selects blocks only; index with one int, slice or list"
            )
        key = key[0]
    if isinstance(key, slice):
        if key.step == 0:
            raise InvalidInputError(f"{label}: slice step must not be zero")
        try:
            bounds = key.indices(n_blocks)
        except TypeError:
            raise InvalidInputError(
                f"{label}: slice bounds must be ints or None, got {key!r}") from None
        return np.arange(*bounds, dtype=np.int64), False
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        i = operator.index(key)
        if not -n_blocks <= i < n_blocks:
            raise IndexError(f"{label}: block {i} out of range for {n_blocks} blocks")
        return np.array([i % n_blocks], dtype=np.int64), True
    idx = np.asarray(key)
    if idx.dtype == bool:
        if idx.shape != (n_blocks,):
            raise IndexError(f"{label}: boolean index must have shape ({n_blocks},)")
        return np.flatnonzero(idx).astype(np.int64), False
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise InvalidInputError(
            f"{label}: index must be an int, a slice or a 1-D list of ints, got {key!r}"
        )
    if idx.size and (idx.min() < -n_blocks or idx.max() >= n_blocks):
        raise IndexError(f"{label}: block index out of range for {n_blocks} blocks")
    return np.where(idx < 0, idx + n_blocks, idx).astype(np.int64), False
