"""Store locations: a local directory, or an object-store prefix named by a URL."""

from __future__ import annotations

from tdstore.core.errors import InvalidInputError

# the schemes obstore serves (S3 and compatible services, Google Cloud Storage, Azure)
SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "abfss")


def is_object_url(location: object) -> bool:
    """Whether ``location`` names an object-store prefix rather than a directory."""
    if not isinstance(location, str) or "://" not in location:
        return False
    return location.split("://", 1)[0].lower() in SCHEMES


def check_location(location: str) -> None:
    """Refuse a URL of a scheme no store can live at (``http://``, ``memory://``...)."""
    if "://" in location and not is_object_url(location):
        scheme = location.split("://", 1)[0]
        raise InvalidInputError(
            f"store {location}: {scheme}:// is not a store location; expected a directory "
            f"or {' / '.join(s + '://BUCKET/PREFIX' for s in SCHEMES[:1])} "
            f"(also {', '.join(s + '://' for s in SCHEMES[1:])})")


def normalize_url(location: str) -> str:
    """``scheme://bucket/prefix`` without a trailing slash; refuses an empty bucket and
    empty, ``.`` or ``..`` components."""
    scheme, rest = location.split("://", 1)
    rest = rest.strip("/")
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise InvalidInputError(f"store {location}: no bucket in the location; expected "
                                f"{scheme}://BUCKET[/PREFIX]")
    if any(part in ("", ".", "..") for part in rest.split("/")):
        raise InvalidInputError(f"store {location}: the prefix has an empty, '.' or '..' "
                                "component")
    if any(ord(c) < 32 or c == "\x7f" for c in rest):
        raise InvalidInputError(f"store {location!r}: the location holds control characters")
    return f"{scheme.lower()}://{rest}"
