"""Logical dtypes and how they are stored.

zarr 3.1 has no bfloat16 or float8 data types, so those are stored as their raw bits
(``uint16`` / ``uint8``) and the logical dtype is recorded in the catalogue. Every stored
dtype is little-endian; arrays are reinterpreted (never converted) on the way in and out,
so values round-trip bit-exactly, NaN payloads and -0.0 included.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from tdstore.core.errors import InvalidInputError

# logical name -> (numpy dtype of the values, dtype of the stored raw bits)
_DTYPES: dict[str, tuple[np.dtype, np.dtype]] = {
    "float16": (np.dtype("<f2"), np.dtype("<f2")),
    "float32": (np.dtype("<f4"), np.dtype("<f4")),
    "float64": (np.dtype("<f8"), np.dtype("<f8")),
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), np.dtype("<u2")),
    "float8_e4m3fn": (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype("u1")),
    "float8_e5m2": (np.dtype(ml_dtypes.float8_e5m2), np.dtype("u1")),
    "int8": (np.dtype("i1"), np.dtype("i1")),
    "uint8": (np.dtype("u1"), np.dtype("u1")),
}

SUPPORTED = tuple(_DTYPES)


def logical_name(dtype: np.dtype, what: str = "array") -> str:
    """The logical dtype name of ``dtype``; raises InvalidInputError if unsupported."""
    dtype = np.dtype(dtype)
    for name, (values, _) in _DTYPES.items():
        # compare ignoring byte order: big-endian input is converted, not refused
        if dtype.newbyteorder("=") == values.newbyteorder("="):
            return name
    raise InvalidInputError(
        f"{what}: dtype {dtype} is not supported; expected one of {', '.join(SUPPORTED)}"
    )


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a logical dtype name."""
    return _DTYPES[name][0]


def stored_dtype(name: str) -> np.dtype:
    """The dtype of the raw bits stored on disk for a logical dtype name."""
    return _DTYPES[name][1]


# For each float dtype: (unsigned view, mask without the sign bit, smallest non-finite
# pattern). A value is NaN or inf iff (bits & mask) >= that pattern (exponent all ones;
# float8_e4m3fn has no inf and one NaN pattern per sign).
NONFINITE_BITS: dict[str, tuple[np.dtype, int, int]] = {
    "float16": (np.dtype("<u2"), 0x7FFF, 0x7C00),
    "bfloat16": (np.dtype("<u2"), 0x7FFF, 0x7F80),
    "float32": (np.dtype("<u4"), 0x7FFF_FFFF, 0x7F80_0000),
    "float64": (np.dtype("<u8"), 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
    "float8_e5m2": (np.dtype("u1"), 0x7F, 0x7C),
    "float8_e4m3fn": (np.dtype("u1"), 0x7F, 0x7F),
}
