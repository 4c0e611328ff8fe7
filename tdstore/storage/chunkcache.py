"""A per-host, read-through cache of chunks fetched from object storage, on local disk.

Chunk objects are immutable once a catalogue row references them, with one exception: a
master's last, partly filled chunk is replaced by an append, with the same committed
blocks. So a cached chunk is filed under the catalogue's checksum of the version that a
read expects (``<ns>/<array path>/<chunk key>.<crc32c>``): a new version has a new
name, an entry never needs invalidation, and every hit is checked against the record
exactly as a chunk file of a local store is (a damaged entry is a miss, never data).

The cache holds at most ``max_bytes`` (approximately: processes of one host share the
directory and each one evicts, least recently used first, when its count passes the
limit). Entries are written to a temporary name and renamed, so a reader sees a whole
entry or none; a crash can leave a temporary file, which eviction removes.
"""

from __future__ import annotations

import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Buffer

DEFAULT_MAX_BYTES = 4 << 30
# an entry read this long after it was last touched is touched again (LRU order by mtime
# costs one utime per entry and minute, not per read)
TOUCH_AFTER_S = 60.0
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def default_directory() -> Path:
    """``$TDSTORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/tdstore``, else ``~/.cache/tdstore``."""
    explicit = os.environ.get("TDSTORE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tdstore"


class ChunkCache:
    """Chunks of one object-store location (namespace ``ns``) under ``directory``."""

    def __init__(self, directory: str | os.PathLike[str], ns: str, max_bytes: int):
        self.root = Path(directory) / ns
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._count: int | None = None  # bytes in the cache, as this process knows it
        self.hits = self.misses = 0

    def _file(self, rel: str, crc: int) -> Path:
        return self.root / f"{rel}.{crc:08x}"

    def open(self, rel: str, crc: int, sizes: tuple[int, int]) -> int | None:
        """A read-only descriptor of the entry, or None (missing, or not a regular file
        of a plausible size: such an entry is removed)."""
        path = self._file(rel, crc)
        try:
            fd = os.open(path, _O_READ)
        except OSError:
            self.misses += 1
            return None
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            return None
        if not stat.S_ISREG(st.st_mode) or not sizes[0] <= st.st_size <= sizes[1]:
            os.close(fd)
            self.discard(rel, crc)
            self.misses += 1
            return None
        if time.time() - st.st_mtime > TOUCH_AFTER_S:
            try:
                os.utime(fd)
            except OSError:
                pass
        self.hits += 1
        return fd

    def discard(self, rel: str, crc: int) -> None:
        try:
            self._file(rel, crc).unlink()
        except OSError:
            pass

    def put(self, rel: str, crc: int, parts: list[Buffer]) -> None:
        """File the bytes of ``parts`` (one chunk object) under ``rel`` and ``crc``.
        A cache that cannot be written (disk full, permissions) is skipped silently."""
        size = sum(memoryview(p).nbytes for p in parts)
        if size > self.max_bytes:
            return
        path = self._file(rel, crc)
        tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                for p in parts:
                    view = memoryview(p).cast("B")
                    while view:
                        view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass
            return
        with self._lock:
            if self._count is None:
                self._count = self._scan_bytes()
            else:
                self._count += size
            over = self._count > self.max_bytes
        if over:
            self.evict()

    def _entries(self) -> list[tuple[float, int, str]]:
        out = []
        for dirpath, _dirs, files in os.walk(self.root):
            for f in files:
                p = os.path.join(dirpath, f)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                out.append((st.st_mtime, st.st_size, p))
        return out

    def _scan_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def evict(self, target: float = 0.8, remove: Callable[[str], None] = os.unlink) -> int:
        """Remove least recently used entries until the cache holds at most ``target``
        of its limit; returns the bytes removed."""
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        freed = 0
        for _, size, p in entries:
            if total - freed <= self.max_bytes * target:
                break
            try:
                remove(p)
            except OSError:
                continue
            freed += size
        with self._lock:
            self._count = total - freed
        return freed

    def nbytes(self) -> int:
        return self._scan_bytes()
