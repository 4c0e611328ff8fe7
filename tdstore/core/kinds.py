"""The fixed vocabularies of a store. Each is a ``StrEnum``: its members are the strings
the catalogue holds and reports print, so they compare equal to those strings."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """What an agent is in its group."""

    MASTER = "master"  # holds every block
    MIRROR = "mirror"  # holds only the blocks that differ from the master


class Status(StrEnum):
    """The state of an agent's data."""

    OK = "ok"
    QUARANTINED = "quarantined"  # verify --repair found its data damaged


class JournalOp(StrEnum):
    """Why a journal row (table ``pending``) names some data."""

    WRITE = "write"  # a new array a write is putting down
    APPEND = "append"  # chunks an append adds to a master
    REMOVE = "remove"  # an array a commit unreferenced
    REMOVE_GROUP = "remove-group"  # the directory of a deleted group


class FindingKind(StrEnum):
    """What ``verify`` reports. Damage is live data that cannot be read as committed;
    the rest is garbage that ``gc`` (or ``verify --repair``) may remove."""

    # damage
    MISSING_ARRAY = "missing-array"
    MISSING_CHUNK = "missing-chunk"
    TRUNCATED_CHUNK = "truncated-chunk"
    CHECKSUM = "checksum"
    BAD_METADATA = "bad-metadata"
    BAD_INDEX = "bad-index"
    FOREIGN_CHUNK = "foreign-chunk"
    UNSAFE_ENTRY = "unsafe-entry"
    BAD_ROW = "bad-row"
    BAD_PATH = "bad-path"
    # garbage
    ORPHAN_FILE = "orphan-file"
    ORPHAN_ARRAY = "orphan-array"
    ORPHAN_GROUP = "orphan-group"
    FOREIGN_ENTRY = "foreign-entry"

    @property
    def is_damage(self) -> bool:
        return self in _DAMAGE


_DAMAGE = frozenset({
    FindingKind.MISSING_ARRAY, FindingKind.MISSING_CHUNK, FindingKind.TRUNCATED_CHUNK,
    FindingKind.CHECKSUM, FindingKind.BAD_METADATA, FindingKind.BAD_INDEX,
    FindingKind.FOREIGN_CHUNK, FindingKind.UNSAFE_ENTRY, FindingKind.BAD_ROW,
    FindingKind.BAD_PATH,
})
