"""SparseKVDiff: the seed's record of a mirror's differing blocks."""

from __future__ import annotations

import numpy as np


class SparseKVDiff:
    """The blocks of one agent that differ from the master.

    ``block_indices`` are the differing blocks (ascending). ``values`` are the agent's
    *own* values of those blocks, which is what tdstore stores, so reconstruction is
    bit-exact in every dtype. ``diff_values`` (mirror minus master, in float64) keeps the
    seed prototype's field; tdstore derives it on first access from ``values`` and the
    master's blocks as they were when the diff was taken.
    """

    def __init__(
        self,
        block_indices: np.ndarray,
        diff_values: np.ndarray | None = None,
        total_blocks: int = 0,
        threshold: float = 1e-4,
        *,
        values: np.ndarray | None = None,
        master_values: np.ndarray | None = None,
    ):
        self.block_indices = block_indices
        self._diff_values = diff_values
        self.total_blocks = total_blocks
        self.threshold = threshold
        self.values = values
        self._master_values = master_values

    @property
    def diff_values(self) -> np.ndarray:
        if self._diff_values is None:
            if self.values is None or self._master_values is None:
                raise ValueError("SparseKVDiff has neither diff_values nor values and master")
            self._diff_values = (self.values.astype(np.float64)
                                 - self._master_values.astype(np.float64))
        return self._diff_values

    @property
    def n_diff_blocks(self) -> int:
        return int(self.block_indices.shape[0])

    @property
    def sparsity(self) -> float:
        if self.total_blocks == 0:
            return 0.0
        return 1.0 - self.n_diff_blocks / self.total_blocks

    def __repr__(self) -> str:
        return (f"SparseKVDiff(n_diff_blocks={self.n_diff_blocks}, "
                f"total_blocks={self.total_blocks}, threshold={self.threshold})")
