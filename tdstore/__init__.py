"""tdstore: persistent master/mirror storage for the KV caches of many LLM agents.

The public API is what this module exports; ``tdstore.api`` implements it on top of
``tdstore.ops`` (operations), ``tdstore.storage`` (catalogue, arrays, locks) and
``tdstore.core`` (pure logic).
"""

from tdstore.api.compat import TokenDanceStorage
from tdstore.api.store import BlockView, Group, Store, open
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
from tdstore.core.sparse import SparseKVDiff
from tdstore.core.version import __version__

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
