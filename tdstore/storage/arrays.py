"""The zarr layout of a store's array data, and the only code that touches its files.

Every array is a zarr v3 array of shape ``(n_blocks, *block_shape)``, chunked along
blocks, with flat chunk keys (``c.<i>.0.0...``) so that all chunk files of an array sit in
one directory and one directory fsync makes them durable. Codecs: ``bytes`` (little
endian), an optional compressor, then ``crc32c``: every chunk file ends with a checksum of
what precedes it, and the result is an ordinary zarr array that zarr itself reads.

tdstore reads and writes the chunk files directly, compressed ones included (zarr's API
costs ~1 ms per chunk, does not fsync, and fills a chunk that vanished between its
check and its read with the fill value, i.e. returns zeros without an error).

Every chunk is also bound to its array and position: the catalogue records, per array,
the crc32c of each chunk's decoded bytes (:class:`ArrayRef`). A read compares the chunk
file's own checksum with that record, so a chunk swapped with another one, or copied
from another array, is refused even though its own checksum is intact. The one chunk
that may legitimately differ from its record is the last, partly filled chunk of a
master that an append replaced (with the same committed blocks plus new ones): there the
committed blocks, zero padded, must give the recorded checksum.

Containment: paths are generated hex ids checked against a strict pattern; every file is
opened relative to a directory descriptor with ``O_NOFOLLOW`` (no symlink is followed,
at any level below ``data/``), non-blocking (a FIFO cannot hang a reader), and only
regular files of a plausible size are read.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import json
import math
import mmap
import os
import secrets
import shutil
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import crc32c
import numpy as np
import zarr
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec

from tdstore.core.errors import CorruptionError, InvalidInputError
from tdstore.core.forking import renew_after_fork
from tdstore.core.ids import check_array_path, check_gid
from tdstore.core.layout import CRC_BYTES, ArrayRef, ArraySpec, block_range
from tdstore.core.validate import VerifyReads

if TYPE_CHECKING:
    from typing_extensions import Buffer

COMPRESSORS: dict[str, Callable[[], BytesBytesCodec]] = {
    "zstd": lambda: ZstdCodec(level=3),
    "blosc-lz4": lambda: BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
}
# Chunk files are written (and fsynced) and read by this many threads at once: with
# several fsyncs in flight the disk sees a deeper queue (measured: 64 MiB in 4 MiB chunks,
# sequential 62-67 ms, 4 threads 46 ms, np.save+fsync of one file 52 ms).
IO_THREADS = 4
# zarr.json documents are a few hundred bytes; anything much larger is not ours
MAX_METADATA_BYTES = 1 << 16

# what zarr.open_group writes (zarr's own API would start its event loop thread)
GROUP_METADATA = '{\n  "attributes": {},\n  "zarr_format": 3,\n  "node_type": "group"\n}'
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_pools: dict[int, ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()


def _io_pool(threads: int) -> ThreadPoolExecutor:
    with _pool_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(
                threads, thread_name_prefix=f"tdstore-io{threads}")
        return pool


def _forget_pools() -> None:  # a forked child has the pool objects but not their threads
    global _pool_lock
    _pools.clear()
    _pool_lock = threading.Lock()  # perhaps held at the fork by a thread not there


os.register_at_fork(after_in_child=_forget_pools)


# Threads whose calls to run_all run their jobs inline: the pool's own (a pool thread
# must never wait on the pool) and tdstore's background threads (``tdstore-bg-*``, e.g.
# write-behind), which must not take the pool from the reads a caller waits for; several
# of them already give the disk its queue.
_INLINE_THREADS = ("tdstore-io", "tdstore-bg")


def run_all(jobs: Sequence[Callable[[], object]], threads: int = IO_THREADS) -> list:
    """Run the callables in ``jobs`` on an I/O pool of ``threads`` threads; returns their
    results in order.

    Every job has finished when this returns or raises (the first error is raised), so
    a caller that cleans up after an error never races its own jobs. One job, or a call
    from a pool thread or a background thread (see ``_INLINE_THREADS``), runs inline.
    """
    if len(jobs) <= 1 or threading.current_thread().name.startswith(_INLINE_THREADS):
        return [job() for job in jobs]
    futures = [_io_pool(threads).submit(job) for job in jobs]
    try:
        return [f.result() for f in futures]
    finally:
        for f in futures:
            f.cancel()
        wait(futures)


def read_each(store: ArrayStore, items: Iterable[tuple[ArrayRef, np.ndarray, str]]
              ) -> list[BaseException | None]:
    """:meth:`ArrayStore.read_arrays` as one :meth:`ArrayStore.read` per item, each
    reading its chunks at once: for stores without a batched path, and for calls from
    threads that run their I/O inline."""

    def one(ref: ArrayRef, out: np.ndarray, what: str) -> BaseException | None:
        try:
            store.read(ref, 0, ref.rows, out, what)
        except Exception as exc:
            return exc
        return None

    return [one(*item) for item in items]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: Buffer) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, buf: memoryview, offset: int, what: str, name: str) -> None:
    while buf:
        n = os.preadv(fd, [buf], offset)
        if n == 0:
            raise CorruptionError(f"{what}: chunk file {name} is truncated")
        buf = buf[n:]
        offset += n


# verify_reads reads a chunk in pieces of this many bytes and runs the crc32c on each
# while it is still in the CPU's cache (measured on 64 chunk files of 8 MiB in the page
# cache, 4 threads on 2 cores: read, then checksum, 0.104-0.108 s; in pieces of 64 KiB
# 0.10-0.13 s, 256 KiB 0.084 s, 1 MiB 0.072-0.082 s, 2 MiB 0.074-0.080 s; the read
# alone 0.060-0.070 s)
CHECKED_PIECE = 1 << 20


def _read_exact_crc(fd: int, buf: memoryview, what: str, name: str) -> int:
    """Read the start of the file into ``buf``; returns the crc32c of what was read."""
    crc, offset = 0, 0
    while buf:
        n = os.preadv(fd, [buf[:CHECKED_PIECE]], offset)
        if n == 0:
            raise CorruptionError(f"{what}: chunk file {name} is truncated")
        crc = crc32c.crc32c(buf[:n], crc)
        buf = buf[n:]
        offset += n
    return crc


# verify_reads="once": versions of chunk files whose check is kept, at most this many,
# each for at most CHECKED_TTL_S seconds. The age bounds what the version cannot show: a
# page another program read back from a damaged disk into the page cache after the check
CHECKED_KEEP = 1 << 16
CHECKED_TTL_S = 60.0


def _version(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _CacheStat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


# cachestat(2) (Linux 6.5+, the same number on every architecture): whether any page of
# a file is dirty or being written back. A committed chunk file never is (it was fsynced
# before its commit), so one that is has been written since, perhaps through a shared
# memory mapping whose later writes do not move the file's times until the kernel writes
# the pages back: verify_reads="once" then checksums it (and does not remember that
# check); where cachestat is missing, "once" checksums every read.
_SYS_CACHESTAT = 451
_syscall: Any = None
if sys.platform == "linux":
    try:
        # (the GIL held: cachestat looks at the page cache and never waits for the disk)
        _syscall = ctypes.PyDLL(None, use_errno=True).syscall
        _syscall.restype = ctypes.c_long
    except (OSError, AttributeError):
        _syscall = None


_cachestat_args = threading.local()  # each thread's arguments, made once


def _cachestat(fd: int) -> _CacheStat | None:
    """The page-cache state of the whole open file (this thread's structure, valid until
    its next call); None where that cannot be told."""
    if _syscall is None:
        return None
    args = getattr(_cachestat_args, "value", None)
    if args is None:  # (a reference from byref keeps its object alive)
        stat_ = _CacheStat()
        args = _cachestat_args.value = (stat_, ctypes.byref(_CacheStatRange(0, 0)),
                                        ctypes.byref(stat_))  # (0, 0): the whole file
    stat_, whole_ref, stat_ref = args
    if _syscall(_SYS_CACHESTAT, fd, whole_ref, stat_ref, 0) != 0:
        return None
    return stat_


def _clean(fd: int) -> bool:
    """Whether no page of the open file is dirty or under writeback; False where that
    cannot be told."""
    st = _cachestat(fd)
    return st is not None and _written_back(st)


def _written_back(st: _CacheStat) -> bool:
    return st.nr_dirty == 0 and st.nr_writeback == 0


# direct_reads: a whole chunk not all in the page cache is read with O_DIRECT straight
# into the caller's buffer, in requests aligned to this many bytes (a multiple of any
# disk's logical block size). Measured on 64 chunk files of 8 MiB dropped from the page
# cache, 4 threads, median of 10 alternating rounds: read through the page cache 401-442
# ms, O_DIRECT 324 ms (and the page cache's copy is not made).
DIRECT_ALIGN = 4096
_PAGE = mmap.PAGESIZE


def _from_disk(fd: int, size: int) -> bool:
    """Whether a read of the open file of ``size`` bytes has to go to the disk: some of
    it is not in the page cache, and none of it is dirty (bytes not yet written back are
    read from the page cache, where they are)."""
    st = _cachestat(fd)
    return st is not None and _written_back(st) and st.nr_cache < -(-size // _PAGE)


def _read_direct(fd: int, target: memoryview, what: str, name: str) -> bool:
    """Read the start of the file into ``target``, bypassing the page cache for all of
    it but an unaligned tail; False (nothing read) where O_DIRECT cannot be used: an
    unaligned buffer, or a file system without it."""
    head = len(target) - len(target) % DIRECT_ALIGN
    if head == 0 or np.frombuffer(target, np.uint8).ctypes.data % DIRECT_ALIGN:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        return False
    off = 0
    try:
        while off < head:
            n = os.preadv(fd, [target[off:head]], off)
            if n == 0:
                raise CorruptionError(f"{what}: chunk file {name} is truncated")
            off += n
            if n % DIRECT_ALIGN:  # (a short read ends where O_DIRECT cannot go on)
                break
    except OSError as exc:
        if exc.errno != errno.EINVAL or off:
            raise
        return False  # the file system refuses these requests: read as usual
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    _read_exact(fd, target[off:], off, what, name)
    return True


def _settled(fd: int, version: tuple | None) -> bool:
    """Whether the open file, just read, is still ``version`` and has no page written
    since it was last written back: what was read is that version's bytes."""
    return _clean(fd) and _version(os.fstat(fd)) == version


def _read_cached(fd: int, buf: memoryview, trailer: bytearray) -> bool:
    """Read the whole file into ``buf`` and ``trailer`` only from the page cache;
    False when any of it is not there (then the caller reads it from the disk)."""
    try:
        n = os.preadv(fd, [buf, trailer], 0, os.RWF_NOWAIT)
    except OSError:  # EAGAIN: not all cached; EOPNOTSUPP: no RWF_NOWAIT here
        return False
    return n == len(buf) + len(trailer)


class _DirHandle:
    """An open directory, closed when the last reference to this is dropped: a read on
    another thread keeps it open while the store is being closed."""

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def __del__(self) -> None:
        os.close(self.fd)


def _open_part(rel: str, part: str, path: str, dir_fd: int | None) -> int:
    """One directory on the way to ``data/<rel>`` (``part`` names it), never a symlink."""
    try:
        return os.open(path, _O_DIR, dir_fd=dir_fd)
    except FileNotFoundError:
        raise CorruptionError(f"data/{rel}: array directory is missing") from None
    except NotADirectoryError:  # also what O_DIRECTORY | O_NOFOLLOW gives a symlink
        try:
            link = stat.S_ISLNK(os.lstat(path, dir_fd=dir_fd).st_mode)
        except OSError:
            link = False
        if link:
            raise CorruptionError(
                f"data/{rel}: {part} is a symlink; tdstore never follows one") from None
        raise CorruptionError(f"data/{rel}: {part} is not a directory") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CorruptionError(
                f"data/{rel}: {part} is a symlink; tdstore never follows one") from None
        raise


def _meta_key(ref: ArrayRef, st: os.stat_result) -> tuple:
    """What identifies a checked ``zarr.json`` version of an array (see check_metadata)."""
    return (ref.path, ref.spec, ref.rows, st.st_ino, st.st_mtime_ns, st.st_ctime_ns,
            st.st_size)


def as_bytes(a: np.ndarray) -> memoryview:
    """A flat byte view of a C-contiguous array (any dtype, bfloat16 included)."""
    return a.reshape(-1).view(np.uint8).data


@functools.lru_cache(maxsize=64)
def _metadata_template(spec: ArraySpec) -> str:
    """The zarr.json that zarr itself writes for an array of this layout."""
    from zarr.storage import MemoryStore

    compressors: list[BytesBytesCodec] = [Crc32cCodec()]
    if spec.compressor is not None:
        compressors.insert(0, COMPRESSORS[spec.compressor]())
    store = MemoryStore()
    zarr.create_array(
        store=store,
        shape=(0, *spec.block_shape),
        chunks=(spec.chunk_blocks, *spec.block_shape),
        dtype=spec.dtype,
        serializer=BytesCodec(endian="little"),
        compressors=compressors,
        fill_value=0,
        chunk_key_encoding={"name": "default", "separator": "."},
    )
    return store._store_dict["zarr.json"].to_bytes().decode()


@functools.lru_cache(maxsize=64)
def _expected_metadata(spec: ArraySpec) -> dict:
    doc = json.loads(_metadata_template(spec))
    doc["shape"] = None
    return doc


class _Compressor(Protocol):
    """What tdstore uses of a numcodecs compressor (numcodecs ships no type hints)."""

    def encode(self, buf: Buffer | np.ndarray) -> bytes: ...

    def decode(self, buf: Buffer | np.ndarray) -> bytes: ...


@functools.lru_cache(maxsize=64)
def _codec(spec: ArraySpec) -> _Compressor:
    """The numcodecs compressor equivalent to the zarr codec recorded in zarr.json
    (checked by a test that reads tdstore's chunks back through zarr)."""
    import numcodecs

    conf = next(c for c in json.loads(_metadata_template(spec))["codecs"]
                if c["name"] not in ("bytes", "crc32c"))
    cfg = conf.get("configuration", {})
    if conf["name"] == "zstd":
        return numcodecs.Zstd(level=cfg["level"], checksum=cfg.get("checksum", False))
    shuffles = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
                "bitshuffle": numcodecs.Blosc.BITSHUFFLE}
    return numcodecs.Blosc(cname=cfg["cname"], clevel=cfg["clevel"],
                           shuffle=shuffles[cfg["shuffle"]], blocksize=cfg["blocksize"],
                           typesize=cfg["typesize"])


def assemble_chunk(spec: ArraySpec, head: memoryview | None, keep: int, body: np.ndarray,
                   lo: int, check: Callable[[np.ndarray, int], None] | None
                   ) -> tuple[np.ndarray, int, int]:
    """One chunk as stored: the ``keep`` bytes of committed blocks from ``head``, then
    ``body`` (blocks from ``lo``), zero padding, encoded. Returns ``(payload, trailer,
    decoded_crc)``: the bytes to store before the 4-byte crc32c ``trailer``, and the
    crc32c of the decoded chunk (what the catalogue records). ``check(blocks, lo)`` runs
    on the private copy, so what is validated is exactly what is stored."""
    buf = np.empty(spec.chunk_nbytes, np.uint8)
    buf[keep + body.nbytes :] = 0  # zarr pads an edge chunk with the fill value
    if keep:
        assert head is not None
        buf[:keep] = np.frombuffer(head, np.uint8, keep)
    region = buf[keep : keep + body.nbytes]
    region[:] = as_bytes(np.ascontiguousarray(body))
    if check is not None:
        check(region.view(spec.dtype).reshape(body.shape), lo)
    decoded_crc = crc32c.crc32c(buf.data)
    if spec.compressor is None:
        return buf, decoded_crc, decoded_crc
    payload = np.frombuffer(_codec(spec).encode(buf), np.uint8)
    return payload, crc32c.crc32c(payload.data), decoded_crc


def chunk_size_range(spec: ArraySpec) -> tuple[int, int]:
    """The sizes (inclusive) a stored chunk of this layout can have."""
    lo = spec.chunk_nbytes + CRC_BYTES if spec.compressor is None else CRC_BYTES + 1
    return lo, spec.max_file_bytes


def check_chunk_size(spec: ArraySpec, size: int, what: str, name: str) -> None:
    lo, hi = chunk_size_range(spec) if spec.compressor is not None else (
        spec.chunk_nbytes + CRC_BYTES, spec.chunk_nbytes + CRC_BYTES)
    if not lo <= size <= hi:
        expected = f"{lo}" if lo == hi else f"{lo}-{hi}"
        raise CorruptionError(f"{what}: chunk file {name} has {size} bytes, expected {expected}")


def decode_chunk(ref: ArrayRef, chunk: int, data: Buffer, what: str, name: str) -> memoryview:
    """The decoded bytes of one stored chunk, every check applied: its own crc32c, the
    codec, the decoded size, and its binding to the catalogue's record."""
    spec = ref.spec
    view = memoryview(data).cast("B")
    check_chunk_size(spec, len(view), what, name)
    body = view[:-CRC_BYTES]
    stored = int.from_bytes(view[-CRC_BYTES:], "little")
    if crc32c.crc32c(body) != stored:
        raise CorruptionError(f"{what}: chunk file {name} fails its crc32c checksum")
    if spec.compressor is None:
        decoded = body
    else:
        try:
            decoded = memoryview(_codec(spec).decode(body)).cast("B")
        except Exception as exc:  # numcodecs raises plain errors for bad input
            raise CorruptionError(f"{what}: chunk file {name} cannot be decoded "
                                  f"({exc})") from None
        if len(decoded) != spec.chunk_nbytes:
            raise CorruptionError(f"{what}: chunk file {name} decodes to "
                                  f"{len(decoded)} bytes, expected {spec.chunk_nbytes}")
    verify_binding(ref, chunk, decoded, what, name)
    return decoded


def verify_binding(ref: ArrayRef, chunk: int, decoded: memoryview | bytes,
                   what: str, name: str) -> None:
    """The decoded chunk is the one the catalogue recorded at this position."""
    if ref.crcs is None:
        return
    if chunk >= len(ref.crcs):
        raise CorruptionError(f"{what}: the catalogue records {len(ref.crcs)} chunk "
                              f"checksums, none for chunk {chunk}")
    recorded = ref.crcs[chunk]
    crc = crc32c.crc32c(decoded)
    if crc == recorded:
        return
    # the last chunk of a master, replaced by an append (committed or not): its
    # committed blocks, zero padded, are what was recorded
    keep = ref.chunk_rows(chunk) * ref.spec.block_nbytes
    if keep < ref.spec.chunk_nbytes:
        crc = crc32c.crc32c(bytes(ref.spec.chunk_nbytes - keep),
                            crc32c.crc32c(memoryview(decoded)[:keep]))
        if crc == recorded:
            return
    raise CorruptionError(
        f"{what}: chunk file {name} holds other data than the catalogue recorded at "
        f"chunk {chunk} of array {ref.path} (a chunk swapped or copied from elsewhere)")


def trailer_matches(ref: ArrayRef, chunk: int, trailer: int) -> bool:
    """Whether an uncompressed chunk's own checksum is the one the catalogue recorded
    (then its bytes are the recorded ones, unless damaged on the medium itself)."""
    return ref.crcs is None or (chunk < len(ref.crcs) and trailer == ref.crcs[chunk])


def check_metadata_doc(ref: ArrayRef, raw: bytes, what: str) -> None:
    """Check an array's ``zarr.json`` against the catalogue's record (dtype, byte order,
    chunking, codecs, shape): zarr and other readers trust it."""
    if len(raw) > MAX_METADATA_BYTES:
        raise CorruptionError(f"{what} has {len(raw)} bytes; expected a document "
                              f"of at most {MAX_METADATA_BYTES}")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested JSON
        raise CorruptionError(f"{what} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise CorruptionError(f"{what} is not a JSON object")
    shape = doc.get("shape")
    if (not isinstance(shape, list) or len(shape) != 1 + len(ref.spec.block_shape)
            or not all(type(d) is int for d in shape) or shape[0] < ref.rows
            or tuple(shape[1:]) != ref.spec.block_shape):
        raise CorruptionError(f"{what}: shape {str(shape)[:80]} does not hold the "
                              f"{ref.rows} committed blocks of {ref.spec.block_shape}")
    expected = _expected_metadata(ref.spec)
    for field_name, value in expected.items():
        if field_name != "shape" and doc.get(field_name) != value:
            raise CorruptionError(
                f"{what}: {field_name} is {str(doc.get(field_name))[:120]}, but the "
                f"catalogue records {str(value)[:120]}")
    extra = set(doc) - set(expected)
    if extra:
        raise CorruptionError(f"{what}: unexpected fields {sorted(extra)[:5]}")


def metadata_text(spec: ArraySpec, n_blocks: int) -> str:
    """zarr's own ``zarr.json`` for this layout with the array's shape filled in
    (zarr's create/resize cost ~2 ms each through its async API)."""
    doc = json.loads(_metadata_template(spec))
    doc["shape"] = [n_blocks, *spec.block_shape]
    return json.dumps(doc, indent=2)


def estimate_nbytes(spec: ArraySpec, n_blocks: int) -> int:
    """Bytes an array of ``n_blocks`` will take: exact when uncompressed, an upper bound
    when compressed (incompressible data grows by a small header)."""
    n_chunks = -(-n_blocks // spec.chunk_blocks) if n_blocks else 0
    per_chunk = spec.chunk_nbytes + CRC_BYTES
    if spec.compressor is not None:
        per_chunk += spec.chunk_nbytes // 64 + 512
    return n_chunks * per_chunk + len(metadata_text(spec, n_blocks).encode())


@dataclass(frozen=True)
class Entry:
    """One entry under ``data/``, as maintenance scans them: ``rel`` is relative to
    ``data/``; ``kind`` is "dir", "file" or "other" (a symlink, FIFO, device...)."""

    rel: str
    kind: str

    @property
    def name(self) -> str:
        return self.rel.rsplit("/", 1)[-1]


# what opening a socket (ENXIO) or a device without a driver (ENXIO, ENODEV) gives
NOT_A_FILE = (errno.ENXIO, errno.ENODEV)


def _kind_at(dirfd: int, name: str) -> str:
    """What the entry ``name`` is, for an error that names it."""
    try:
        return _kind_of(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
    except OSError:
        return "not a regular file"


def _kind_of(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


class ArrayStore(Protocol):
    """Where a store's arrays live, and the only way the layers above touch them.

    Arrays are named by generated paths (``tdstore.core.ids``) and laid out as
    ``tdstore.core.layout`` describes; every chunk is checked against the catalogue's
    record (:class:`ArrayRef`) when read. Paths are never overwritten in place except a
    master's last, partly filled chunk by an append (both versions hold the committed
    blocks). :class:`LocalArrayStore` keeps them in a directory,
    ``tdstore.storage.objects.ObjectArrayStore`` under an object-store prefix.
    Relative paths (``rel``) are relative to ``data/``.
    """

    location: str  # for messages: the data directory or URL
    verify_reads: VerifyReads
    shared: bool  # reachable from other hosts (then the catalogue must be too)

    def ensure_root(self) -> None: ...
    def new_group_dir(self, gid: str) -> bool: ...
    def estimate_nbytes(self, spec: ArraySpec, n_blocks: int) -> int: ...
    def create_and_write(self, path: str, spec: ArraySpec, blocks: np.ndarray,
                         check: Callable[[np.ndarray, int], None] | None = None
                         ) -> tuple[int, list[int]]: ...
    def resize(self, path: str, spec: ArraySpec, n_blocks: int) -> None: ...
    def write(self, ref: ArrayRef, blocks: np.ndarray,
              check: Callable[[np.ndarray, int], None] | None = None) -> list[int] | None: ...
    def read(self, ref: ArrayRef, start: int, stop: int, out: np.ndarray,
             label: str = "", unit: str = "block") -> None: ...
    def read_arrays(self, items: Iterable[tuple[ArrayRef, np.ndarray, str]]
                    ) -> list[BaseException | None]: ...
    def read_runs(self, ref: ArrayRef, positions: np.ndarray, out: np.ndarray,
                  label: str = "", unit: str = "block") -> None: ...
    def mapped(self, ref: ArrayRef, start: int, stop: int
               ) -> list[tuple[int, Callable[[], np.ndarray]]]: ...
    def check_metadata(self, ref: ArrayRef, *, cached: bool = True) -> None: ...
    def check_chunk(self, ref: ArrayRef, chunk: int, what: str) -> None: ...
    def chunk_checksums(self, ref: ArrayRef) -> list[int]: ...
    def extra_entries(self, path: str, spec: ArraySpec, rows: int) -> list[str]: ...
    def nbytes(self, path: str) -> int: ...
    def remove(self, path: str) -> None: ...
    def remove_group_dir(self, gid: str) -> None: ...
    def remove_below(self, rel: str) -> None: ...
    def kind(self, rel: str) -> str | None: ...
    def children(self, rel: str) -> list[Entry]: ...
    def entry_nbytes(self, rel: str) -> int: ...
    def read_object(self, rel: str, max_bytes: int) -> bytes: ...
    def close(self) -> None: ...


class LocalArrayStore:
    """:class:`ArrayStore` in the ``data/`` directory of a store: a zarr v3 hierarchy of
    generated ids."""

    shared = False

    def __init__(self, root: Path, *, verify_reads: VerifyReads = False,
                 direct_reads: bool = False):
        self.root = root
        self.location = str(root)
        self.verify_reads = verify_reads
        # whole uncompressed chunks not in the page cache are read with O_DIRECT
        self.direct_reads = direct_reads
        self._meta_ok: dict[tuple, bool] = {}  # zarr.json documents already checked
        # verify_reads="once": the chunk file versions this process checksummed, and how
        # many whole-chunk reads were checksummed (for tests and diagnostics)
        self._checked: dict[tuple | None, float] = {}  # version: when its check passed
        self._count_lock = threading.Lock()
        self.checksummed_reads = 0
        self._data: _DirHandle | None = None  # data/, once opened (see _data_dir)
        self._data_lock = threading.Lock()
        renew_after_fork(self)

    def _after_fork_in_child(self) -> None:
        self._count_lock = threading.Lock()
        self._data_lock = threading.Lock()

    # ------------------------------------------------------------------ safe access

    @contextmanager
    def _dir(self, rel: str) -> Iterator[int]:
        """A descriptor of ``data/<rel>``, opened one component at a time without
        following a symlink anywhere below the store directory."""
        fd = self._open_dir(rel)
        try:
            yield fd
        finally:
            os.close(fd)

    def _data_dir(self, rel: str) -> _DirHandle:
        """The store's ``data/`` directory, opened (never through a symlink) by the first
        access that finds it and kept open from then on: like the catalogue's connection,
        an open store stays bound to the directory it opened. Measured on 64 chunk files
        of 8 MiB in the page cache, 4 threads on 2 cores, median of 37 rounds: each file
        opened by its path and read, 59-63 ms; through its directories from ``data/``
        opened by its path each time, 65-66 ms; from ``data/`` kept open, 63-64 ms
        (threads walking the same directories at once is the cost)."""
        handle = self._data
        if handle is None:
            with self._data_lock:
                handle = self._data
                if handle is None:
                    handle = self._data = _DirHandle(
                        _open_part(rel, "data", str(self.root), None))
        return handle

    def _open_dir(self, rel: str) -> int:
        """What :meth:`_dir` yields, for the caller to close."""
        data = self._data_dir(rel)  # open until this reference is dropped
        if not rel:
            return os.dup(data.fd)
        fd = data.fd
        try:
            for part in rel.split("/"):
                nxt = _open_part(rel, part, part, fd)
                if fd != data.fd:
                    os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            if fd != data.fd:
                os.close(fd)
            raise

    @classmethod
    def _open_file(cls, dirfd: int, name: str, what: str, sizes: tuple[int, int]) -> int:
        """Open a regular file of a size within ``sizes`` (inclusive) read-only."""
        return cls._open_file_stat(dirfd, name, what, sizes)[0]

    @staticmethod
    def _open_file_stat(dirfd: int, name: str, what: str, sizes: tuple[int, int]
                        ) -> tuple[int, os.stat_result]:
        """:meth:`_open_file`, with the file's status."""
        try:
            fd = os.open(name, _O_READ, dir_fd=dirfd)
        except FileNotFoundError:
            raise CorruptionError(f"{what}: chunk file {name} is missing") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CorruptionError(f"{what}: chunk file {name} is a symlink; tdstore "
                                      "never follows one") from None
            if exc.errno in NOT_A_FILE:
                raise CorruptionError(f"{what}: chunk file {name} is "
                                      f"{_kind_at(dirfd, name)}") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptionError(f"{what}: chunk file {name} is {_kind_of(st.st_mode)}")
            if not sizes[0] <= st.st_size <= sizes[1]:
                expected = (f"{sizes[0]}" if sizes[0] == sizes[1]
                            else f"{sizes[0]}-{sizes[1]}")
                raise CorruptionError(
                    f"{what}: chunk file {name} has {st.st_size} bytes, expected {expected}")
            return fd, st
        except BaseException:
            os.close(fd)
            raise

    def check_metadata(self, ref: ArrayRef, dirfd: int | None = None, *,
                       cached: bool = True) -> None:
        """Check the array's ``zarr.json`` against the catalogue's record (dtype, byte
        order, chunking, codecs, shape): zarr and other readers trust it. Reads skip a
        document already checked (same inode, size, mtime and ctime: an edit that puts
        the mtime back still moves the ctime); ``cached=False`` (verify) reads it anyway."""
        if dirfd is None:
            with self._dir(ref.path) as fd:
                return self.check_metadata(ref, fd, cached=cached)
        what = f"array {ref.path}: zarr.json"
        if cached:  # a document checked before: one stat, no open (reads take this path)
            try:
                st = os.stat("zarr.json", dir_fd=dirfd, follow_symlinks=False)
            except OSError:
                pass  # reported by the open below
            else:
                if _meta_key(ref, st) in self._meta_ok and stat.S_ISREG(st.st_mode):
                    return None
        try:
            fd = os.open("zarr.json", _O_READ, dir_fd=dirfd)
        except FileNotFoundError:
            raise CorruptionError(f"{what} is missing") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CorruptionError(f"{what} is a symlink") from None
            if exc.errno in NOT_A_FILE:
                raise CorruptionError(f"{what} is {_kind_at(dirfd, 'zarr.json')}") from None
            raise
        try:
            st = os.fstat(fd)
            key = _meta_key(ref, st)
            if cached and key in self._meta_ok:
                return None
            if not stat.S_ISREG(st.st_mode):
                raise CorruptionError(f"{what} is {_kind_of(st.st_mode)}")
            raw = os.pread(fd, min(st.st_size, MAX_METADATA_BYTES + 1), 0)
        finally:
            os.close(fd)
        check_metadata_doc(ref, raw, what)
        if len(self._meta_ok) > 4096:
            self._meta_ok.clear()
        self._meta_ok[key] = True
        return None

    # ------------------------------------------------------------------ paths

    @staticmethod
    def _write_group_metadata(path: Path) -> None:
        """The zarr.json of a zarr v3 group, as zarr writes it (durable on return)."""
        tmp = path / f"zarr.json.tmp-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, GROUP_METADATA.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path / "zarr.json")
        fsync_dir(path)

    def ensure_root(self) -> None:
        if self.root.is_symlink():
            raise CorruptionError(f"{self.root} is a symlink; tdstore never follows one")
        if not (self.root / "zarr.json").exists():
            self.root.mkdir(exist_ok=True)
            self._write_group_metadata(self.root)
            fsync_dir(self.root.parent)

    def _check_root(self) -> None:
        """Before a write through ``data/``'s path: it is still the directory this store
        reads from (opened, never through a symlink, by the first access), so a write
        never lands through a symlink or in a directory put in its place while the
        store was open (reads would not see it)."""
        data = self._data_dir("")
        try:
            st = os.lstat(self.root)
        except FileNotFoundError:
            st = None
        if st is None or stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            what = ("is missing" if st is None else "is a file" if stat.S_ISREG(st.st_mode)
                    else f"is {_kind_of(st.st_mode)}")
            raise CorruptionError(f"{self.root} {what} (replaced while the store was open); "
                                  "refusing to write; tdstore never follows a symlink")
        held = os.fstat(data.fd)
        if (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino):
            raise CorruptionError(f"{self.root} was replaced while the store was open; "
                                  "refusing to write into another directory than the one "
                                  "this store reads (open the store again)")

    def new_group_dir(self, gid: str) -> bool:
        """Create ``data/<gid>`` if missing; returns whether it was created."""
        self._check_root()
        path = self.root / check_gid(gid)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise CorruptionError(
                f"data/{gid} is {_kind_of(st.st_mode)}, not a group directory; refusing to "
                "write through it (`tdstore verify --repair` removes it)")
        if st is None or not (path / "zarr.json").exists():
            path.mkdir(exist_ok=True)
            self._write_group_metadata(path)
            fsync_dir(self.root)
            return st is None
        return False

    def chunk_file(self, path: str, spec: ArraySpec, chunk: int) -> Path:
        return self.root / check_array_path(path) / spec.chunk_key(chunk)

    # ------------------------------------------------------------------ writing

    def create(self, path: str, spec: ArraySpec, n_blocks: int, *, durable: bool = True) -> None:
        """Create the zarr metadata of a new, empty array (fsynced if ``durable``)."""
        self._check_root()
        full = self.root / check_array_path(path)
        full.mkdir()
        self._write_metadata(full, spec, n_blocks)
        if durable:
            fsync_file(full / "zarr.json")
            fsync_dir(full)
            fsync_dir(full.parent)

    def _write_metadata(self, full: Path, spec: ArraySpec, n_blocks: int) -> None:
        tmp = full / f"zarr.json.tmp-{secrets.token_hex(4)}"
        tmp.write_text(metadata_text(spec, n_blocks))
        os.replace(tmp, full / "zarr.json")

    def estimate_nbytes(self, spec: ArraySpec, n_blocks: int) -> int:
        return estimate_nbytes(spec, n_blocks)

    def resize(self, path: str, spec: ArraySpec, n_blocks: int) -> None:
        """Grow the array's zarr shape (never shrinks: that would delete chunks)."""
        self._check_root()
        full = self.root / check_array_path(path)
        if json.loads((full / "zarr.json").read_text())["shape"][0] < n_blocks:
            self._write_metadata(full, spec, n_blocks)
            fsync_file(full / "zarr.json")
            fsync_dir(full)

    def write(self, ref: ArrayRef, blocks: np.ndarray,
              check: Callable[[np.ndarray, int], None] | None = None,
              also_fsync: tuple[Path, ...] = ()) -> list[int] | None:
        """Write ``blocks`` (stored dtype) at block ``ref.rows`` (the committed length),
        durably; returns the array's new per-chunk checksums (``ref.crcs`` kept for the
        chunks below the write).

        Only chunks holding blocks ``>= ref.rows`` are written; a chunk that also holds
        committed blocks keeps their bytes and is replaced atomically (temporary file,
        fsync, rename), so readers never see a torn chunk. Each chunk is assembled in a
        private buffer, and ``check(blocks, first_block)`` (e.g. the finite check) runs on
        that copy: what is validated is exactly what is written, even if the caller
        changes its array meanwhile.
        """
        spec, start = ref.spec, ref.rows
        stop = start + blocks.shape[0]
        old = None if ref.crcs is None else list(ref.crcs)
        if stop == start:
            return old
        path = check_array_path(ref.path)
        self._check_root()
        full = self.root / path
        jobs: list[Callable[[], object]] = []
        pending: list[tuple[Path, Path]] = []
        for chunk, lo, hi in spec.windows(start, stop):
            final = full / spec.chunk_key(chunk)
            tmp = final.with_name(f"{final.name}.tmp-{secrets.token_hex(4)}")
            body = blocks[lo - start : hi - start]
            jobs.append(functools.partial(self._write_chunk, ref, chunk, tmp, body, lo, check))
            pending.append((tmp, final))
        jobs.extend(functools.partial(fsync_file, f) for f in also_fsync)
        try:
            crcs = run_all(jobs)[: len(pending)]
            for tmp, final in pending:
                os.replace(tmp, final)
            pending.clear()
            fsync_dir(full)
        finally:
            for tmp, _ in pending:
                tmp.unlink(missing_ok=True)
        first = start // spec.chunk_blocks
        if old is None and first:  # an array of an older store: its chunks are unrecorded
            return None
        return (old or [])[:first] + crcs

    def _write_chunk(self, ref: ArrayRef, chunk: int, tmp: Path, body: np.ndarray, lo: int,
                     check: Callable[[np.ndarray, int], None] | None) -> int:
        """Write one chunk file to ``tmp`` (fsynced): the chunk's committed blocks, then
        ``body`` (blocks from ``lo``), zero padding, encoded, plus the crc32c. Returns the
        crc32c of the decoded chunk."""
        spec = ref.spec
        keep = (lo - chunk * spec.chunk_blocks) * spec.block_nbytes  # committed blocks first
        head = None
        if keep:
            with self._dir(ref.path) as dirfd:
                head = self._load_chunk(dirfd, ref, chunk, f"{ref.path} chunk {chunk}")
        payload, crc, decoded_crc = assemble_chunk(spec, head, keep, body, lo, check)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, payload.data)
            _write_all(fd, crc.to_bytes(CRC_BYTES, "little"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return decoded_crc

    def create_and_write(self, path: str, spec: ArraySpec, blocks: np.ndarray,
                         check: Callable[[np.ndarray, int], None] | None = None
                         ) -> tuple[int, list[int]]:
        """A new array holding ``blocks`` (durable on return); returns its bytes on disk
        and its per-chunk checksums."""
        n = blocks.shape[0]
        self.create(path, spec, n, durable=n == 0)
        full = self.root / path
        ref = ArrayRef(path, spec, 0, ())
        crcs: list[int] | None = []
        if n:
            crcs = self.write(ref, blocks, check, also_fsync=(full / "zarr.json",))
            fsync_dir(full.parent)
        # write() returns None only for an array whose earlier chunks are unrecorded;
        # this one records every chunk from the first (ref.crcs is ())
        assert crcs is not None
        return self.nbytes(path), crcs

    # ------------------------------------------------------------------ reading

    def _load_chunk(self, dirfd: int, ref: ArrayRef, chunk: int, what: str) -> memoryview:
        """The decoded bytes of one chunk, every check applied (checksum, binding)."""
        spec = ref.spec
        name = spec.chunk_key(chunk)
        fd = self._open_file(dirfd, name, what, chunk_size_range(spec))
        try:
            size = os.fstat(fd).st_size
            data = bytearray(size)
            _read_exact(fd, memoryview(data), 0, what, name)
        finally:
            os.close(fd)
        return decode_chunk(ref, chunk, data, what, name)

    def read(self, ref: ArrayRef, start: int, stop: int, out: np.ndarray,
             label: str = "", unit: str = "block") -> None:
        """Read blocks ``[start, stop)`` into ``out`` (stored dtype, C-contiguous).
        Errors name ``label`` and the positions read (as ``unit``s)."""
        if stop <= start:
            return
        if stop > ref.rows:
            raise CorruptionError(f"{label or ref.path}: {block_range(start, stop, unit)} "
                                  f"past the {ref.rows} committed")
        what = label or ref.path
        dst = as_bytes(out)
        bn = ref.spec.block_nbytes
        with self._dir(check_array_path(ref.path)) as dirfd:
            self.check_metadata(ref, dirfd)
            jobs = [lambda c=c, lo=lo, hi=hi: self._read_chunk_into(
                dirfd, ref, c, dst[(lo - start) * bn : (hi - start) * bn],
                (lo - c * ref.spec.chunk_blocks) * bn, f"{what} {block_range(lo, hi, unit)}")
                for c, lo, hi in ref.spec.windows(start, stop)]
            run_all(jobs)

    def read_arrays(self, items: Iterable[tuple[ArrayRef, np.ndarray, str]]
                    ) -> list[BaseException | None]:
        """Read every committed block of each ``(ref, out, label)`` into its ``out``
        (stored dtype, C-contiguous, all of the array's blocks), the arrays at once on
        the I/O pool, each as soon as ``items`` gives it; returns, per item, None or the
        error that failed it (the other items are read regardless).

        Each array is one job on the pool: it opens the array's directory, checks its
        metadata and reads its chunks, while the caller prepares the next item (measured
        with ``Chunks.read_many`` of 64 chunks of 8 MiB from the page cache, checksums
        on, best and median of 30: the directories opened by the calling thread after
        every item was prepared 0.113-0.124 s and 0.142-0.146 s, this 0.102-0.104 s and
        0.118-0.119 s). Every job has finished when this returns or raises.
        """
        if threading.current_thread().name.startswith(_INLINE_THREADS):
            return read_each(self, items)
        pool = _io_pool(IO_THREADS)
        futures: list[Future] = []
        try:
            for ref, out, what in items:
                futures.append(pool.submit(self._read_whole, ref, out, what))
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            wait(futures)
        return [f.exception() for f in futures]

    def _read_whole(self, ref: ArrayRef, out: np.ndarray, what: str) -> None:
        """Every committed block of ``ref`` into ``out``, its chunks one after another
        (for read_arrays: a job of the pool, which never waits on the pool)."""
        spec, bn = ref.spec, ref.spec.block_nbytes
        dst = as_bytes(out)
        if len(dst) != ref.rows * bn:
            raise InvalidInputError(f"{what}: out holds {len(dst)} bytes, expected "
                                    f"{ref.rows * bn}")
        dirfd = self._open_dir(check_array_path(ref.path))
        try:
            self.check_metadata(ref, dirfd)
            for c, lo, hi in spec.windows(0, ref.rows):
                self._read_chunk_into(dirfd, ref, c, dst[lo * bn : hi * bn],
                                      (lo - c * spec.chunk_blocks) * bn,
                                      f"{what} {block_range(lo, hi)}")
        finally:
            os.close(dirfd)

    def _read_chunk_into(self, dirfd: int, ref: ArrayRef, chunk: int, target: memoryview,
                         offset: int, what: str) -> None:
        spec = ref.spec
        whole = offset == 0 and len(target) == spec.chunk_nbytes
        if spec.compressor is not None or (self.verify_reads and not whole):
            data = self._load_chunk(dirfd, ref, chunk, what)
            target[:] = data[offset : offset + len(target)]
            return
        name = spec.chunk_key(chunk)
        size = spec.chunk_nbytes + CRC_BYTES
        fd, st = self._open_file_stat(dirfd, name, what, (size, size))
        trailer = bytearray(CRC_BYTES)
        # verify_reads="once": a version of the file checksummed before is read unchecked
        # when all of it is in the page cache (a read from the disk is always checked)
        version = _version(st) if self.verify_reads == "once" else None
        settled = False
        try:
            # (asked first: a read from the page cache that misses starts its readahead,
            # which would read the file from the disk a second time; a read that neither
            # checks nor reads directly takes the same path either way, and asks nothing)
            cold = (whole and bool(self.verify_reads or self.direct_reads)
                    and _from_disk(fd, size))
            if (not cold
                    and time.monotonic() - self._checked.get(version, -math.inf) < CHECKED_TTL_S
                    and _read_cached(fd, target, trailer)
                    and _settled(fd, version)):
                check = False
            else:
                check = bool(self.verify_reads)
                if cold and self.direct_reads and _read_direct(fd, target, what, name):
                    if check:
                        got = crc32c.crc32c(target)
                elif cold and check:  # in one request: the readahead asks for all of it
                    _read_exact(fd, target, 0, what, name)
                    got = crc32c.crc32c(target)
                elif check:
                    got = _read_exact_crc(fd, target, what, name)
                else:
                    _read_exact(fd, target, offset, what, name)
                _read_exact(fd, memoryview(trailer), spec.chunk_nbytes, what, name)
                settled = version is not None and _settled(fd, version)
        finally:
            os.close(fd)
        stored = int.from_bytes(trailer, "little")
        # verify_reads on a whole uncompressed chunk: checked where it was read to, with
        # no second buffer and copy (crc32c measured at 17 GB/s here, a copy at 3.8 GB/s)
        if check:
            with self._count_lock:
                self.checksummed_reads += 1
            if got != stored:
                # the version once checked has gone bad (bits rotted on the disk, read
                # back into the page cache by this check): never trusted again
                self._checked.pop(version, None)
                raise CorruptionError(f"{what}: chunk file {name} fails its crc32c checksum")
            if settled and version is not None:  # (a check of bytes being written
                if len(self._checked) >= CHECKED_KEEP:  # proves nothing about later reads)
                    self._checked.clear()
                self._checked[version] = time.monotonic()
        if not trailer_matches(ref, chunk, stored):
            # not the chunk recorded here, or a master's last chunk replaced by an
            # append: decide on the whole chunk (checksum and binding)
            data = self._load_chunk(dirfd, ref, chunk, what)
            target[:] = data[offset : offset + len(target)]

    def mapped(self, ref: ArrayRef, start: int, stop: int
               ) -> list[tuple[int, Callable[[], np.ndarray]]]:
        """Blocks ``[start, stop)`` as zero-copy views of the chunk files, one loader per
        chunk: ``(first_block, load)`` where ``load()`` returns a read-only array of those
        blocks (stored dtype) mapping the page cache. Compressed arrays, and every array
        when ``verify_reads`` is on, are read (and checked) instead."""
        return [(lo, functools.partial(self._map_chunk, ref, c, lo, hi))
                for c, lo, hi in ref.spec.windows(start, stop)]

    def _map_chunk(self, ref: ArrayRef, chunk: int, lo: int, hi: int) -> np.ndarray:
        spec = ref.spec
        shape = (hi - lo, *spec.block_shape)
        if self.verify_reads or spec.compressor is not None or spec.block_nbytes == 0:
            out = np.empty(shape, spec.dtype)
            self.read(ref, lo, hi, out)
            return out
        what = f"{ref.path} chunk {chunk}"
        name = spec.chunk_key(chunk)
        size = spec.chunk_nbytes + CRC_BYTES
        with self._dir(check_array_path(ref.path)) as dirfd:
            self.check_metadata(ref, dirfd)
            fd = self._open_file(dirfd, name, what, (size, size))
            try:
                mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                               prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            trailer = int.from_bytes(mm[spec.chunk_nbytes:], "little")
            if not trailer_matches(ref, chunk, trailer):
                mm.close()
                out = np.empty(shape, spec.dtype)
                data = self._load_chunk(dirfd, ref, chunk, what)
                offset = (lo - chunk * spec.chunk_blocks) * spec.block_nbytes
                as_bytes(out)[:] = data[offset : offset + out.nbytes]
                return out
        offset = (lo - chunk * spec.chunk_blocks) * spec.block_nbytes
        return np.frombuffer(mm, spec.dtype, count=int(np.prod(shape)),
                             offset=offset).reshape(shape)

    def read_runs(self, ref: ArrayRef, positions: np.ndarray, out: np.ndarray,
                  label: str = "", unit: str = "block") -> None:
        """Read the blocks at sorted ``positions`` into ``out`` (one row each)."""
        if positions.size == 0:
            return
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        row = 0
        for run in np.split(positions, breaks):
            lo, hi = int(run[0]), int(run[-1]) + 1
            self.read(ref, lo, hi, out[row : row + hi - lo], label, unit)
            row += hi - lo

    def chunk_checksums(self, ref: ArrayRef) -> list[int]:
        """The crc32c of each committed chunk as decoded (each chunk's own checksum is
        verified first); for recording them where an older store did not."""
        with self._dir(check_array_path(ref.path)) as dirfd:
            return [crc32c.crc32c(self._load_chunk(dirfd, ref, c, ref.path))
                    for c in ref.spec.chunks_of(0, ref.rows)]

    def check_chunk(self, ref: ArrayRef, chunk: int, what: str) -> None:
        """Read one chunk with every check (``verify``); raises CorruptionError."""
        with self._dir(check_array_path(ref.path)) as dirfd:
            self._load_chunk(dirfd, ref, chunk, what)

    # ------------------------------------------------------------------ housekeeping

    def extra_entries(self, path: str, spec: ArraySpec, rows: int) -> list[str]:
        """Entries of an array directory that no committed block uses (relative to
        ``data/``): chunk files past ``rows``, temporary files, anything foreign."""
        full = self._inside(check_array_path(path))
        keep = {"zarr.json"} | {spec.chunk_key(c) for c in spec.chunks_of(0, rows)}
        try:
            with os.scandir(full) as it:
                return [f"{path}/{e.name}" for e in it if e.name not in keep]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def kind(self, rel: str) -> str | None:
        """What ``data/<rel>`` is: "dir", "file", "other" (symlink, FIFO...) or None."""
        try:
            st = os.lstat(self._inside(rel) if rel else self.root)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except CorruptionError:
            return "other"  # a directory on the way is a symlink
        if stat.S_ISDIR(st.st_mode):
            return "dir"
        return "file" if stat.S_ISREG(st.st_mode) else "other"

    def children(self, rel: str) -> list[Entry]:
        """The entries of the directory ``data/<rel>`` ("" the root), sorted by name;
        none if it is missing or not a directory of the store."""
        if self.kind(rel) != "dir":
            return []
        out = []
        with os.scandir(self._inside(rel) if rel else self.root) as it:
            for e in it:
                kind = ("dir" if e.is_dir(follow_symlinks=False) else
                        "file" if e.is_file(follow_symlinks=False) else "other")
                out.append(Entry(f"{rel}/{e.name}" if rel else e.name, kind))
        return sorted(out, key=lambda e: e.rel)

    def entry_nbytes(self, rel: str) -> int:
        """Bytes of the regular files at or below ``data/<rel>`` (no link followed)."""
        try:
            return entry_nbytes(self._inside(rel) if rel else self.root)
        except CorruptionError:
            return 0

    def read_object(self, rel: str, max_bytes: int) -> bytes:
        """The bytes of the regular file ``data/<rel>`` (at most ``max_bytes``)."""
        parent, _, name = rel.rpartition("/")
        with self._dir(parent) as dirfd:
            fd = self._open_file(dirfd, name, f"data/{rel}", (0, max_bytes))
            try:
                return os.pread(fd, max_bytes, 0)
            finally:
                os.close(fd)

    def close(self) -> None:
        # data/ is closed once no read in flight holds it (a later access opens it anew)
        self._data = None

    def _inside(self, rel: str) -> Path:
        """``data/<rel>``, after checking that no directory on the way below ``data/``
        is a symlink (the last component is left to the caller)."""
        parts = rel.split("/")
        path = self.root
        if self.root.is_symlink():
            raise CorruptionError(f"{self.root} is a symlink; tdstore never follows one")
        for part in parts[:-1]:
            path = path / part
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                raise CorruptionError(f"data/{rel}: {part} is not a directory (a symlink?); "
                                      "tdstore never follows one")
        return path / parts[-1]

    def nbytes(self, path: str) -> int:
        total = 0
        with os.scandir(self._inside(check_array_path(path))) as it:
            for entry in it:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
        return total

    def remove(self, path: str) -> None:
        """Remove an array directory (only a checked array path; never follows a link)."""
        remove_entry(self._inside(check_array_path(path)))

    def remove_group_dir(self, gid: str) -> None:
        remove_entry(self._inside(check_gid(gid)))

    def remove_below(self, rel: str) -> None:
        """Remove ``data/<rel>`` (garbage found by a scan): never through a symlinked
        directory on the way, never the target of a symlink."""
        remove_entry(self._inside(rel))


def remove_entry(path: Path) -> None:
    """Remove a file, a symlink (the link itself, never its target) or a directory tree
    (shutil.rmtree walks by descriptors and does not follow symlinks inside)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def entry_nbytes(path: Path) -> int:
    """Bytes of the regular files at or below ``path``, without following symlinks."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if not stat.S_ISDIR(st.st_mode):
        return 0
    total = 0
    for _dirpath, _dirs, files, dirfd in os.fwalk(path, follow_symlinks=False):
        for f in files:
            try:
                s = os.stat(f, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(s.st_mode):
                total += s.st_size
    return total
