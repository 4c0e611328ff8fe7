"""Generated identifiers: group directories (16 hex digits) and array paths
(``<gid>/m-<16 hex>`` for a master, ``d-`` for a mirror's diff). Names never become paths;
these are the only names a store puts on disk, checked wherever they are read back."""

from __future__ import annotations

import re
import secrets

from tdstore.core.errors import CorruptionError

GID_RE = re.compile(r"[0-9a-f]{16}")
ARRAY_RE = re.compile(r"([0-9a-f]{16})/([md])-([0-9a-f]{16})")


def new_array_path(gid: str, kind: str) -> str:
    """A fresh array path for group ``gid``: ``m-<hex>`` (master) or ``d-<hex>`` (a
    mirror's diff), random, so a path is never written twice on any array store."""
    return f"{check_gid(gid)}/{kind}-{secrets.token_hex(8)}"


def check_gid(gid: object) -> str:
    """A group directory name from the catalogue or from ``data/``: 16 hex digits."""
    if not isinstance(gid, str) or not GID_RE.fullmatch(gid):
        raise CorruptionError(f"group directory name {gid!r} is not a tdstore id "
                              "(16 hex digits); refusing to use it as a path")
    return gid


def check_array_path(path: object) -> str:
    """An array path from the catalogue: ``<gid>/m-<id>`` or ``<gid>/d-<id>``."""
    if not isinstance(path, str) or not ARRAY_RE.fullmatch(path):
        raise CorruptionError(f"array path {path!r} is not a tdstore array path "
                              "(<16 hex>/m-<16 hex> or d-<16 hex>); refusing to use it")
    return path
