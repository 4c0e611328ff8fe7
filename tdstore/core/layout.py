"""Chunk layout: how the blocks of an array map to chunks, and what the catalogue records
of a committed array. Pure arithmetic, shared by every array store."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

# every chunk file ends with a crc32c of what precedes it
CRC_BYTES = 4
# Default chunk size in bytes; see README "Chunking" for the measurement behind it.
DEFAULT_CHUNK_BYTES = 4 << 20


def default_chunk_blocks(block_nbytes: int) -> int:
    """The most blocks per chunk for blocks of ``block_nbytes`` bytes."""
    return max(1, DEFAULT_CHUNK_BYTES // max(1, block_nbytes))


def balanced_chunk_blocks(n_blocks: int, max_blocks: int) -> int:
    """Blocks per chunk for an array of ``n_blocks``: at most ``max_blocks``, and spread
    evenly so the padding of the last chunk (zarr stores edge chunks full size) stays
    below one block per chunk."""
    if n_blocks == 0:  # an empty master grows by appends: full-size chunks
        return max_blocks
    n_chunks = -(-n_blocks // max_blocks)
    return -(-n_blocks // n_chunks)


@dataclass(frozen=True)
class ArraySpec:
    """How the blocks of one array are laid out on disk."""

    block_shape: tuple[int, ...]
    dtype: np.dtype  # the stored (raw-bits) dtype
    chunk_blocks: int
    compressor: str | None = None
    # worked out once: every read of a chunk asks for them (np.prod of a short tuple
    # costs about 5 us a time, 20 times math.prod)
    block_nbytes: int = field(init=False, repr=False, compare=False)
    chunk_nbytes: int = field(init=False, repr=False, compare=False)
    _key_tail: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        block = math.prod(self.block_shape) * self.dtype.itemsize
        object.__setattr__(self, "block_nbytes", block)
        object.__setattr__(self, "chunk_nbytes", block * self.chunk_blocks)
        object.__setattr__(self, "_key_tail", ".0" * len(self.block_shape))

    @property
    def max_file_bytes(self) -> int:
        """The largest chunk file this layout can produce (compressors add a header)."""
        if self.compressor is None:
            return self.chunk_nbytes + CRC_BYTES
        return self.chunk_nbytes + self.chunk_nbytes // 64 + 4096

    def chunk_key(self, chunk: int) -> str:
        return f"c.{chunk}{self._key_tail}"

    def chunks_of(self, start: int, stop: int) -> range:
        """The chunk numbers that hold blocks ``[start, stop)``."""
        if stop <= start:
            return range(0)
        return range(start // self.chunk_blocks, (stop - 1) // self.chunk_blocks + 1)

    def windows(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """``(chunk, lo, hi)`` for each chunk holding blocks of ``[start, stop)``:
        the blocks ``[lo, hi)`` of the range that lie in that chunk."""
        for chunk in self.chunks_of(start, stop):
            c0 = chunk * self.chunk_blocks
            yield chunk, max(start, c0), min(stop, c0 + self.chunk_blocks)


@dataclass(frozen=True)
class ArrayRef:
    """A committed array as the catalogue records it: what a read may trust."""

    path: str
    spec: ArraySpec
    rows: int  # committed rows: a master's blocks, a mirror's own blocks
    crcs: tuple[int, ...] | None  # crc32c of each chunk's decoded bytes; None: unrecorded

    def chunk_rows(self, chunk: int) -> int:
        """How many of the chunk's blocks are committed."""
        c0 = chunk * self.spec.chunk_blocks
        return max(0, min(self.spec.chunk_blocks, self.rows - c0))


def block_range(lo: int, hi: int, unit: str = "block") -> str:
    """``blocks lo-(hi-1)``, or ``block lo`` for a single block."""
    return f"{unit} {lo}" if hi - lo == 1 else f"{unit}s {lo}-{hi - 1}"
