"""tdstore: persistent master/mirror storage for the KV caches of many LLM agents.

The public API is what this module exports; ``tdstore.api`` implements it on top of
``tdstore.ops`` (operations), ``tdstore.storage`` (catalogue, arrays, locks) and
``tdstore.core`` (pure logic). The facade is imported on first use, so importing
``tdstore`` (and starting the command line) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tdstore.core.errors import (
    CorruptionError,
    InvalidInputError,
    NoMasterError,
    NotFoundError,
    ReadOnlyError,
    SchemaError,
    StateError,
    StorageError,
    StoreFullError,
    TdStoreError,
)
from tdstore.core.version import __version__

if TYPE_CHECKING:
    from tdstore.api.compat import TokenDanceStorage
    from tdstore.api.store import BlockView, Group, Store, open
    from tdstore.core.sparse import SparseKVDiff

_LAZY = {
    "TokenDanceStorage": "tdstore.api.compat",
    "BlockView": "tdstore.api.store",
    "Group": "tdstore.api.store",
    "Store": "tdstore.api.store",
    "open": "tdstore.api.store",
    "SparseKVDiff": "tdstore.core.sparse",
}

__all__ = [
    "BlockView",
    "CorruptionError",
    "Group",
    "InvalidInputError",
    "NoMasterError",
    "NotFoundError",
    "ReadOnlyError",
    "SchemaError",
    "SparseKVDiff",
    "StateError",
    "Store",
    "StorageError",
    "StoreFullError",
    "TdStoreError",
    "TokenDanceStorage",
    "__version__",
    "open",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tdstore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
