"""Rewrites of a whole group: ``rebase`` (choose another master) and ``compact``.

Both rebuild every agent from the committed state and swap the new arrays in with one
catalogue transaction (``GroupOps.replace_all``), so each agent keeps what it
reconstructs to and a reader never sees a half-rewritten group.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tdstore.core.diff import diff_mask
from tdstore.core.errors import NotFoundError
from tdstore.ops.groups import GroupOps


def best_master(group: GroupOps) -> str:
    """The agent that, as master, gives the fewest diff blocks in total (ties: current)."""
    names = group.agents()
    if len(names) < 2:
        return names[0] if names else ""
    threshold = group.diff_threshold
    master = names[0]
    mirrors = {n: group.mirror(n) for n in names[1:]}
    union = np.unique(np.concatenate([d.block_indices for d in mirrors.values()] +
                                     [np.zeros(0, np.int64)]))
    cost = dict.fromkeys(names, 0)
    if union.size == 0:
        return master
    base = group.blocks(master, union)
    views = {n: group.blocks(n, union) for n in mirrors}
    for j in range(union.size):
        # each agent's value of this block: its own if it differs here, else the master's
        values = [base[j]] + [views[n][j] for n in names[1:]]
        stacked = np.stack(values)
        for i, cand in enumerate(names):
            ref = np.broadcast_to(stacked[i], stacked.shape)
            cost[cand] += int(diff_mask(ref, stacked, threshold).sum())
    best = min(names, key=lambda n: (cost[n], n != master))
    return best


def rebase(group: GroupOps, master: str | None = None) -> dict[str, Any]:
    """Make ``master`` (or, if None, the agent that minimises the total diff) the master,
    and re-derive every mirror against it. Atomic: one catalogue transaction makes the
    new layout visible. Each agent keeps what it reconstructs to now."""
    names = group.agents()
    if not names:
        raise NotFoundError(f"group {group.name!r} has no agents")
    chosen = best_master(group) if master is None else master
    if chosen not in names:
        raise NotFoundError(f"group {group.name!r}: unknown agent {chosen!r}")
    before = group.stats()["diff_blocks_total"]
    group.replace_all(chosen)
    return {"group": group.name, "master": chosen, "previous_master": names[0],
            "diff_blocks_before": before, "diff_blocks_after": group.stats()["diff_blocks_total"]}


def compact(group: GroupOps) -> dict[str, Any]:
    """Rewrite the group tightly: chunking re-balanced for the current sizes (appends
    leave a padded last chunk), stale metadata trimmed. Atomic, like ``rebase``."""
    names = group.agents()
    if not names:
        return {"group": group.name, "bytes_before": 0, "bytes_after": 0}
    before = group.stats()["bytes_stored"]
    group.replace_all(names[0])
    return {"group": group.name, "bytes_before": before,
            "bytes_after": group.stats()["bytes_stored"]}
