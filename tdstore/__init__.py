"""tdstore: persistent master/mirror storage for the KV caches of many LLM agents."""

__version__ = "0.1.0"

from .compat import TokenDanceStorage  # noqa: E402
from .errors import (  # noqa: E402
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
from .sparse import SparseKVDiff  # noqa: E402
from .store import BlockView, Group, Store, open  # noqa: E402

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
