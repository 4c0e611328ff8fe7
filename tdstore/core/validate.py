"""Validation of what callers pass in: names, block arrays, settings, attributes.

Every check raises :class:`~tdstore.core.errors.InvalidInputError` naming the object and
what was expected; nothing here touches a store, so a refused input leaves it as it was.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any, Literal, cast

import numpy as np

from tdstore.core import tensors
from tdstore.core.diff import nonfinite_blocks
from tdstore.core.dtypes import logical_name
from tdstore.core.errors import InvalidInputError

MAX_NAME_CHARS = 1024
# blocks along the leading axis; catalogue columns are 32-bit on PostgreSQL
MAX_BLOCKS = 2**31 - 1
# the compressors a group may be created with (their codec settings: tdstore.storage.arrays)
COMPRESSOR_NAMES = ("zstd", "blosc-lz4")
# the axes a kv_layout names, in the order analysis code expects them
KV_AXES = ("layer", "kv", "token", "head", "dim")


def check_name(kind: str, name: object, where: str = "") -> str:
    """Validate a user-given group or agent name (names never become paths)."""
    if type(name) is str and name in _good_names:
        return name
    _check_name(kind, name, where)
    if len(_good_names) >= GOOD_NAMES_KEEP:
        _good_names.clear()
    _good_names.add(name)  # type: ignore[arg-type]  # a str: checked above
    return name  # type: ignore[return-value]


# names that passed check_name, at most this many: keyed chunks are looked up by the same
# keys again and again (measured in the LMCache benchmark: 30 us per check, 64 per read)
GOOD_NAMES_KEEP = 1 << 16
_good_names: set[str] = set()


def _check_name(kind: str, name: object, where: str) -> None:
    prefix = f"{where}: " if where else ""
    if not isinstance(name, str):
        raise InvalidInputError(f"{prefix}{kind} name must be a str, got {type(name).__name__}")
    if not name.strip():
        raise InvalidInputError(f"{prefix}{kind} name {name!r} must not be empty or blank")
    if name in (".", ".."):
        raise InvalidInputError(f"{prefix}{kind} name {name!r} is not allowed")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(
            f"{prefix}{kind} name {name[:80]!r} is not valid Unicode text (it holds a lone "
            "surrogate, e.g. from undecodable command-line bytes); names must encode as "
            "UTF-8") from None
    bad = sorted({c for c in name if c in "/\\" or unicodedata.category(c) == "Cc"})
    if bad:
        raise InvalidInputError(
            f"{prefix}{kind} name {name[:80]!r} must not contain {', '.join(map(repr, bad))} "
            "(path separators and control characters such as NUL are refused)"
        )
    if len(name) > MAX_NAME_CHARS:
        raise InvalidInputError(
            f"{prefix}{kind} name of {len(name)} characters is too long; "
            f"expected at most {MAX_NAME_CHARS}"
        )


def as_blocks(kv: object, what: str) -> tuple[np.ndarray, str]:
    """Validate a block array; returns it C-contiguous, little-endian, and its dtype name.

    Raises InvalidInputError for non-arrays, fewer than 2 dimensions, unsupported dtypes
    and blocks with no elements. Values are never converted: byte order and memory
    layout are normalised exactly. torch tensors are taken exactly (raw bits).
    """
    if isinstance(kv, np.ma.MaskedArray):
        raise InvalidInputError(
            f"{what} is a masked array; its mask cannot be stored: pass np.ma.getdata(a) "
            "or a.filled(value)")
    if not isinstance(kv, np.ndarray):
        if not tensors.is_tensor(kv):
            raise InvalidInputError(f"{what} must be a numpy.ndarray, got {type(kv).__name__}")
        kv = tensors.tensor_to_numpy(kv)
    if kv.ndim < 2:
        raise InvalidInputError(
            f"{what} must be at least 2D (n_blocks, ...); got shape {kv.shape}"
        )
    name = logical_name(kv.dtype, what)
    if kv.dtype.byteorder == ">":
        kv = kv.astype(kv.dtype.newbyteorder("<"))
    if any(d == 0 for d in kv.shape[1:]):
        raise InvalidInputError(
            f"{what}: block shape {kv.shape[1:]} has no elements; every block dimension "
            "must be >= 1"
        )
    if kv.shape[0] > MAX_BLOCKS:
        raise InvalidInputError(
            f"{what}: {kv.shape[0]} blocks; expected at most {MAX_BLOCKS}")
    if not kv.flags.c_contiguous:
        # a strided or broadcast array is copied; refuse a copy that cannot fit
        import psutil

        available = psutil.virtual_memory().available
        if kv.nbytes > available:
            raise InvalidInputError(
                f"{what}: shape {kv.shape} ({kv.nbytes} bytes) is not contiguous and a "
                f"contiguous copy would not fit in the {available} bytes of free memory; "
                "pass a contiguous array (or np.memmap)")
    return np.ascontiguousarray(kv), name


def check_finite(kv: np.ndarray, dtype_name: str, what: str,
                 block_numbers: np.ndarray | None = None) -> None:
    """Refuse NaN and inf; ``block_numbers`` names the blocks of ``kv`` in messages."""
    bad = nonfinite_blocks(kv, dtype_name)
    if bad.size:
        if block_numbers is not None:
            bad = block_numbers[bad]
        raise InvalidInputError(
            f"{what} holds NaN or inf in block(s) {', '.join(map(str, bad[:5]))}; "
            "refused (create the group with allow_nonfinite=True to store them exactly)"
        )


# the key under which a stored agent's attributes carry their checksum, and the one
# under which they name the group and agent they were stored for (tdstore's own)
ATTRS_SEAL = "attrs_crc32c"
ATTRS_OWNER = "attrs_owner"


def check_attrs(attrs: object, where: str) -> dict[str, Any] | None:
    """An agent's attributes: a JSON-able dict (stored and returned as JSON gives it)."""
    if attrs is None:
        return None
    if not isinstance(attrs, dict):
        raise InvalidInputError(f"{where}: attrs must be a dict, got {type(attrs).__name__}")
    for own, what in ((ATTRS_SEAL, "the checksum stored with them"),
                      (ATTRS_OWNER, "the group and agent they are stored for")):
        if own in attrs:
            raise InvalidInputError(f"{where}: attrs key {own!r} is tdstore's own ({what})")
    try:
        loaded: dict[str, Any] = json.loads(json.dumps(attrs, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{where}: attrs must be JSON-able: {exc}") from None
    return loaded


def check_threshold(value: object, group: str) -> float:
    """A diff threshold: a finite number >= 0."""
    try:
        # any object: float() itself refuses what it cannot convert (caught below)
        t = float(cast(Any, value))
    except (TypeError, ValueError, OverflowError):
        raise InvalidInputError(
            f"group {group!r}: diff_threshold must be a number, got {value!r}"
        ) from None
    if not np.isfinite(t) or t < 0:
        raise InvalidInputError(f"group {group!r}: diff_threshold must be finite and >= 0, got {t}")
    return t


def check_compressor(compressor: str | None) -> None:
    if compressor is not None and compressor not in COMPRESSOR_NAMES:
        raise InvalidInputError(
            f"compressor {compressor!r} is not supported; expected None or one of "
            f"{', '.join(COMPRESSOR_NAMES)}"
        )


def check_chunk_blocks(value: object, group: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
        raise InvalidInputError(f"group {group!r}: chunk_blocks must be an int >= 1, "
                                f"got {value!r}")
    return value


def check_kv_layout(layout: Any) -> dict[str, Any]:
    """A kv_layout names the axes of one block: a permutation of
    ``layer, kv, token, head, dim`` (e.g. a paged cache block of shape
    ``(layers, 2, block_tokens, kv_heads, head_dim)`` has the axes in that order)."""
    if not isinstance(layout, dict) or "axes" not in layout:
        raise InvalidInputError(
            f"kv_layout must be a dict with 'axes', a permutation of {KV_AXES}; got {layout!r}")
    axes = tuple(layout["axes"])
    if sorted(axes) != sorted(KV_AXES):
        raise InvalidInputError(f"kv_layout axes {axes} must be a permutation of {KV_AXES}")
    return {**layout, "axes": list(axes)}


# verify_reads: False (each chunk file checked against the catalogue's record of it),
# True (and every read checksummed) or "once" (checksummed the first time this process
# reads that version of the file, and whenever the read has to go to the disk)
VerifyReads = bool | Literal["once"]


def check_verify_reads(value: object) -> VerifyReads:
    if value is True or value is False or value == "once":
        return value
    raise InvalidInputError(f"verify_reads must be True, False or 'once', got {value!r}")


def check_max_bytes(value: object, name: str = "max_bytes", *, allow_zero: bool = False
                    ) -> int:
    """A size budget: a positive int of bytes (or 0, where ``allow_zero``: none)."""
    if (isinstance(value, bool) or not isinstance(value, int) or value < 0
            or (value == 0 and not allow_zero)):
        expected = "a non-negative" if allow_zero else "a positive"
        raise InvalidInputError(f"{name} must be {expected} int of bytes, got {value!r}")
    return value
