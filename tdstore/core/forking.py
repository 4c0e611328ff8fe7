"""What a forked child must renew: locks and connections of objects it inherits.

A lock that another thread held at the moment of ``fork()`` stays held in the child
for ever (that thread does not exist there), and a database connection must not be used
by two processes. Objects that keep such state and are used in a forked child (an open
local store is, see README "fork()") register here; their ``_after_fork_in_child()``
runs in every child.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol


class ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


_owners: weakref.WeakSet[ForkAware] = weakref.WeakSet()


def renew_after_fork(owner: ForkAware) -> None:
    """Have ``owner._after_fork_in_child()`` called in every forked child (for as long
    as ``owner`` lives)."""
    _owners.add(owner)


def _in_child() -> None:
    for owner in list(_owners):
        owner._after_fork_in_child()


os.register_at_fork(after_in_child=_in_child)
