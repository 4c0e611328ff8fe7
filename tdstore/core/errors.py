"""The tdstore error hierarchy.

Every error derives from :class:`TdStoreError` and from the builtin the seed prototype
raised in the same situation, so ``except ValueError`` / ``except KeyError`` keep working.
Messages name the group and agent involved and say what was expected.
"""

from __future__ import annotations


class TdStoreError(Exception):
    """Base class of every error raised by tdstore."""


class InvalidInputError(TdStoreError, ValueError):
    """An argument has the wrong shape, dtype, values or name."""


class NotFoundError(TdStoreError, KeyError):
    """An unknown group or agent."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class NoMasterError(TdStoreError, RuntimeError):
    """The group has no master yet (call ``register_master`` first)."""


class StateError(TdStoreError, RuntimeError):
    """The operation does not fit the current state of the store."""


class ReadOnlyError(StateError):
    """A write was attempted on a store opened with ``readonly=True``."""


class SchemaError(TdStoreError, RuntimeError):
    """The catalogue schema is newer than this tdstore, or cannot be upgraded."""


class CorruptionError(TdStoreError, OSError):
    """Stored data is missing or damaged; it is never returned as data."""


class StoreFullError(TdStoreError, OSError):
    """A write would exceed the store's size budget even after evicting what it may."""


class StorageError(TdStoreError, OSError):
    """The file system failed under a write (full disk, I/O error, read-only); nothing
    was committed and the store is as it was."""


def name_list(names: list[str], most: int = 5) -> str:
    """``'a', 'b', ...``: the first ``most`` names, quoted, for a one-line message."""
    return ", ".join(map(repr, names[:most])) + (", ..." if len(names) > most else "")
