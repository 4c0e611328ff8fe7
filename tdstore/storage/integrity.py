"""Checks of catalogue rows before anything is built from them.

The catalogue is the source of truth, but its rows are still input: a damaged or
tampered row must give a clear CorruptionError naming the group and agent, never a
KeyError, a ZeroDivisionError, a path outside the store, or silently different data.
"""

from __future__ import annotations

import json
from typing import Any, TypeGuard

import crc32c
import numpy as np

from tdstore.core.dtypes import SUPPORTED, stored_dtype
from tdstore.core.errors import CorruptionError
from tdstore.core.ids import ARRAY_RE, check_gid
from tdstore.core.layout import ArrayRef, ArraySpec
from tdstore.core.validate import ATTRS_OWNER, ATTRS_SEAL
from tdstore.storage.arrays import COMPRESSORS
from tdstore.storage.catalog import AgentRow, GroupRow

ROLES = ("master", "mirror")


def index_checksum(indices: np.ndarray) -> int:
    """crc32c of a mirror's diff index (block indices in slot order, int64 LE)."""
    return crc32c.crc32c(np.ascontiguousarray(indices, dtype="<i8").tobytes())


def index_problems(idx: np.ndarray, n_diff: int, n_blocks: int,
                   index_crc: int | None) -> list[str]:
    """What is wrong with a mirror's diff index (block indices in slot order) against
    its row: the count, the range, the order, and the checksum recorded with it."""
    problems = []
    if idx.size != n_diff:
        problems.append(f"{idx.size} index rows for {n_diff} diff blocks")
    if idx.size and (idx.min() < 0 or idx.max() >= n_blocks):
        problems.append(f"block indices {idx.min()}..{idx.max()} outside 0..{n_blocks - 1}")
    if idx.size and np.any(np.diff(idx) <= 0):
        problems.append("block indices not strictly increasing by slot")
    if index_crc is None or index_checksum(idx) != index_crc:
        problems.append("block indices do not match the checksum recorded with them")
    return problems


def _int(value: object) -> TypeGuard[int]:
    return type(value) is int


def check_group_row(g: GroupRow) -> None:
    """A group row's layout fields, as reads and maintenance use them."""
    where = f"catalogue: group {g.name!r}"
    try:
        check_gid(g.gid)
    except CorruptionError as exc:
        raise CorruptionError(f"{where}: {exc}") from None
    if g.dtype is not None and g.dtype not in SUPPORTED:
        raise CorruptionError(f"{where}: dtype {str(g.dtype)[:40]!r} is not one of "
                              f"{', '.join(SUPPORTED)}")
    if g.compressor is not None and g.compressor not in COMPRESSORS:
        raise CorruptionError(f"{where}: compressor {str(g.compressor)[:40]!r} is not one of "
                              f"{', '.join(COMPRESSORS)}")
    shape = g.block_shape
    if (g.dtype is None) != (shape is None) or (shape is not None and not (
            isinstance(shape, list) and shape and all(_int(d) and d >= 1 for d in shape))):
        raise CorruptionError(f"{where}: block_shape {str(shape)[:60]} with dtype "
                              f"{g.dtype!r} is not a layout (positive ints, both or neither)")
    if not _int(g.n_blocks) or g.n_blocks < 0:
        raise CorruptionError(f"{where}: n_blocks {str(g.n_blocks)[:40]} is not an int >= 0")
    if g.chunk_blocks is not None and (not _int(g.chunk_blocks) or g.chunk_blocks < 1):
        raise CorruptionError(f"{where}: chunk_blocks {str(g.chunk_blocks)[:40]} is not an "
                              "int >= 1")


def group_layout(g: GroupRow) -> tuple[str, tuple[int, ...]]:
    """The dtype name and block shape of a group with a master (its first master fixed
    them); CorruptionError naming the group if the row records none."""
    if g.dtype is None or g.block_shape is None:
        raise CorruptionError(f"catalogue: group {g.name!r}: no layout (dtype and "
                              "block_shape) is recorded, yet the group has a master")
    return g.dtype, tuple(g.block_shape)


# An agent's attributes carry the crc32c of the rest under ATTRS_SEAL: a catalogue row
# has no checksum of its own, and keyed chunks record there how to read their bytes back
# (shape, dtype, format); Hugging Face caches record their tokens. Under ATTRS_OWNER they
# name the group and agent they were stored for, inside the seal: a row renamed, or
# moved to another group, in the catalogue (a keyed chunk's group name is its key) is
# then damaged, not another chunk's data under this name.


def _attrs_crc(attrs: dict[str, Any]) -> int:
    doc = json.dumps(attrs, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return crc32c.crc32c(doc.encode("utf-8", "surrogatepass"))


def seal_attrs(attrs: dict[str, Any], group: str, agent: str) -> dict[str, Any]:
    """``attrs`` of agent ``agent`` of group ``group``, with their owner and the crc32c
    of their JSON added (checked by :func:`checked_attrs`)."""
    owned = {**attrs, ATTRS_OWNER: [group, agent]}
    return {**owned, ATTRS_SEAL: _attrs_crc(owned)}


def checked_attrs(attrs: object, where: str, group: str, agent: str) -> dict[str, Any]:
    """The attributes of the row of agent ``agent`` of group ``group``, without their
    seal and owner; CorruptionError naming ``where`` when they are not a JSON object,
    carry a seal they no longer match, or were stored for another group or agent
    (attributes stored before tdstore sealed them, or named their owner, carry none and
    are taken as they are)."""
    if attrs is None:
        return {}
    if not isinstance(attrs, dict):
        raise CorruptionError(f"{where}: attributes {str(attrs)[:60]!r} are not a JSON object")
    if ATTRS_SEAL not in attrs:
        if ATTRS_OWNER in attrs:  # (tdstore seals every row it names the owner of)
            raise CorruptionError(f"{where}: the attributes recorded with it have lost their "
                                  "checksum (the catalogue row is damaged)")
        return dict(attrs)
    rest = {k: v for k, v in attrs.items() if k != ATTRS_SEAL}
    if attrs[ATTRS_SEAL] != _attrs_crc(rest):
        raise CorruptionError(f"{where}: the attributes recorded with it fail their crc32c "
                              "checksum (the catalogue row is damaged)")
    owner = rest.pop(ATTRS_OWNER, None)
    if owner is not None and owner != [group, agent]:
        raise CorruptionError(f"{where}: the row was stored as {str(owner)[:200]} (the "
                              "catalogue row was renamed or moved)")
    return rest


def agent_ref(g: GroupRow, a: AgentRow, *, attrs: bool = True) -> ArrayRef | None:
    """The checked array of an agent row (None: a mirror identical to its master).

    Checks the attributes' seal (see :func:`checked_attrs`; not with ``attrs=False``),
    the role, that the array lies in the agent's own group directory, the chunking, the
    row count and that one checksum is recorded per committed chunk.
    """
    where = f"catalogue: group {g.name!r} agent {a.name!r}"
    if attrs:
        checked_attrs(a.attrs, where, g.name, a.name)
    if a.role not in ROLES:
        raise CorruptionError(f"{where}: role {str(a.role)[:40]!r} is not master or mirror")
    rows = g.n_blocks if a.role == "master" else a.n_diff
    if not _int(rows) or rows < 0 or (a.role == "mirror" and rows > g.n_blocks):
        raise CorruptionError(f"{where}: {str(rows)[:40]} diff blocks for a group of "
                              f"{g.n_blocks} blocks")
    if a.array is None:
        if a.role == "master" or rows:
            raise CorruptionError(f"{where}: no array recorded for {rows} blocks")
        return None
    if g.dtype is None or g.block_shape is None:
        raise CorruptionError(f"{where}: an array but the group has no layout")
    m = ARRAY_RE.fullmatch(a.array) if isinstance(a.array, str) else None
    if m is None or m.group(1) != g.gid or m.group(2) != ("m" if a.role == "master" else "d"):
        raise CorruptionError(
            f"{where}: array path {str(a.array)[:80]!r} is not a {a.role} array of this "
            f"group's directory {g.gid!r}; refusing to use it")
    if not _int(a.chunk_blocks) or a.chunk_blocks < 1:
        raise CorruptionError(f"{where}: chunk_blocks {str(a.chunk_blocks)[:40]} is not an "
                              "int >= 1")
    spec = ArraySpec(tuple(g.block_shape), stored_dtype(g.dtype), a.chunk_blocks, g.compressor)
    crcs = a.chunk_crcs
    n_chunks = len(spec.chunks_of(0, rows))
    if not (isinstance(crcs, list) and len(crcs) == n_chunks
            and all(_int(c) and 0 <= c < 1 << 32 for c in crcs)):
        have = f"{len(crcs)} checksums" if isinstance(crcs, list) else f"checksums {crcs!r}"
        raise CorruptionError(f"{where}: {have[:60]} recorded for the {n_chunks} chunks of "
                              f"{rows} blocks")
    return ArrayRef(a.array, spec, rows, tuple(crcs))
