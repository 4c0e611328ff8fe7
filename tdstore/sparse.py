"""SparseKVDiff: the seed's record of a mirror's differing blocks."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SparseKVDiff:
    """The blocks of one agent that differ from the master.

    ``block_indices`` are the differing blocks (ascending). ``values`` are the agent's
    *own* values of those blocks, which is what tdstore stores, so reconstruction is
    bit-exact in every dtype. ``diff_values`` (mirror minus master, float64) is kept for
    compatibility with the seed prototype and derived from the stored values.
    """

    block_indices: np.ndarray  # (n_diff_blocks,) int64
    diff_values: np.ndarray  # (n_diff_blocks, *block_shape) float64 deltas
    total_blocks: int
    threshold: float = 1e-4
    values: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_diff_blocks(self) -> int:
        return int(self.block_indices.shape[0])

    @property
    def sparsity(self) -> float:
        if self.total_blocks == 0:
            return 0.0
        return 1.0 - self.n_diff_blocks / self.total_blocks
