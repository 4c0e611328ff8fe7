"""Which blocks of an agent differ from the master. Pure numpy, no I/O.

A block is *equal* to the master block when its L2 distance, accumulated in float64, is
``<= threshold``. Blocks are first compared bytewise, so with threshold 0 a block differs
iff any byte differs (NaN payloads and -0.0 included), and the float64 distance is only
computed for blocks whose bytes differ. A NaN distance (NaN or inf in either block) never
counts as equal: such a block is kept exactly.
"""

from __future__ import annotations

import numpy as np

from tdstore.core.dtypes import NONFINITE_BITS

# Blocks are compared in batches of about this many bytes to bound temporary memory.
BATCH_BYTES = 16 << 20
# Non-finite checks run over batches that fit in a CPU cache.
SCAN_BYTES = 512 << 10


def _as_words(blocks: np.ndarray) -> np.ndarray:
    """View blocks as (n, words) of the widest unsigned int that divides a block."""
    n = blocks.shape[0]
    raw = blocks.reshape(n, -1).view(np.uint8)
    width = raw.shape[1]
    for word in (8, 4, 2):
        if width % word == 0:
            return raw.view(f"<u{word}")
    return raw


def bytes_differ(master: np.ndarray, kv: np.ndarray) -> np.ndarray:
    """Boolean mask over blocks: True where any byte of the block differs."""
    a, b = _as_words(np.ascontiguousarray(master)), _as_words(np.ascontiguousarray(kv))
    if a.shape[1] == 0:
        return np.zeros(a.shape[0], dtype=bool)
    return (a != b).any(axis=1)


def l2_distances(master: np.ndarray, kv: np.ndarray) -> np.ndarray:
    """Per-block L2 distance between two block arrays, accumulated in float64."""
    n = master.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    d = kv.reshape(n, -1).astype(np.float64) - master.reshape(n, -1).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.sqrt(np.einsum("ij,ij->i", d, d))


def diff_mask(master: np.ndarray, kv: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask over blocks: True for the blocks of ``kv`` that must be kept."""
    n = master.shape[0]
    mask = np.zeros(n, dtype=bool)
    block_bytes = max(1, master[:1].nbytes)
    step = max(1, BATCH_BYTES // block_bytes)
    for start in range(0, n, step):
        stop = min(n, start + step)
        changed = bytes_differ(master[start:stop], kv[start:stop])
        if threshold > 0 and changed.any():
            idx = np.flatnonzero(changed)
            dist = l2_distances(master[start:stop][idx], kv[start:stop][idx])
            changed[idx] = ~(dist <= threshold)  # NaN distance: keep
        mask[start:stop] = changed
    return mask


def nonfinite_blocks(blocks: np.ndarray, dtype_name: str) -> np.ndarray:
    """Indices of the blocks holding NaN or inf (none for integer dtypes).

    Tests bit patterns in cache-sized batches: ~10x faster than ``np.isfinite`` on
    float16/bfloat16, which have no vectorised path.
    """
    spec = NONFINITE_BITS.get(dtype_name)
    n = blocks.shape[0]
    if spec is None or n == 0 or blocks[:1].size == 0:
        return np.zeros(0, dtype=np.int64)
    uint, mask, first_bad = spec
    words = np.ascontiguousarray(blocks).reshape(n, -1).view(uint)
    step = max(1, SCAN_BYTES // max(1, words[:1].nbytes))
    tmp = np.empty((min(step, n), words.shape[1]), uint)
    bad = []
    for start in range(0, n, step):
        part = words[start : start + step]
        t = tmp[: part.shape[0]]
        np.bitwise_and(part, mask, out=t)
        if t.max() >= first_bad:
            bad.append(np.flatnonzero(t.max(axis=1) >= first_bad) + start)
    return np.concatenate(bad).astype(np.int64) if bad else np.zeros(0, dtype=np.int64)


def diff_blocks(master: np.ndarray, kv: np.ndarray, threshold: float) -> np.ndarray:
    """Indices (int64, ascending) of the blocks of ``kv`` that differ from ``master``."""
    return np.flatnonzero(diff_mask(master, kv, threshold)).astype(np.int64)
