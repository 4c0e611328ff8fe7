"""The zarr layout of a store's array data.

Every array is a zarr v3 array of shape ``(n_blocks, *block_shape)``, chunked along
blocks, with flat chunk keys (``c.<i>.0.0...``) so that all chunk files of an array sit in
one directory and one directory fsync makes them durable. Codecs: ``bytes`` (little
endian), an optional compressor, then ``crc32c``, so every chunk file carries a checksum
of its contents and damage is detected on ``verify`` (and on read with ``verify_reads``).

For uncompressed arrays a chunk file is the raw C-order bytes of the chunk followed by 4
bytes of crc32c. tdstore writes and reads those files directly (zarr's API costs ~1 ms
per chunk and does not fsync); the result is an ordinary zarr array that zarr reads.
Compressed arrays are written and read through zarr, and fsynced afterwards.

Paths are generated hex ids; no user-supplied name ever becomes a path.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import secrets
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec

from .errors import CorruptionError, InvalidInputError

CRC_BYTES = 4
COMPRESSORS = {
    "zstd": lambda: ZstdCodec(level=3),
    "blosc-lz4": lambda: BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
}
# Default chunk size in bytes; see README "Chunking" for the measurement behind it.
DEFAULT_CHUNK_BYTES = 4 << 20
# Chunk files are written (and fsynced) and read by this many threads at once: with
# several fsyncs in flight the disk sees a deeper queue (measured: 64 MiB in 4 MiB chunks,
# sequential 62-67 ms, 4 threads 46 ms, np.save+fsync of one file 52 ms).
IO_THREADS = 4

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _io_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="tdstore-io")
        return _pool


def _forget_pool() -> None:  # a forked child has the pool object but not its threads
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def run_all(jobs: list) -> list:
    """Run the callables in ``jobs`` on the I/O pool; returns their results in order.

    One job, or a call from a pool thread (which must never wait on the pool), runs
    inline.
    """
    if len(jobs) <= 1 or threading.current_thread().name.startswith("tdstore-io"):
        return [job() for job in jobs]
    futures = [_io_pool().submit(job) for job in jobs]
    return [f.result() for f in futures]


def default_chunk_blocks(block_nbytes: int) -> int:
    """The most blocks per chunk for blocks of ``block_nbytes`` bytes."""
    return max(1, DEFAULT_CHUNK_BYTES // max(1, block_nbytes))


def balanced_chunk_blocks(n_blocks: int, max_blocks: int) -> int:
    """Blocks per chunk for an array of ``n_blocks``: at most ``max_blocks``, and spread
    evenly so the padding of the last chunk (zarr stores edge chunks full size) stays
    below one block per chunk."""
    if n_blocks == 0:  # an empty master grows by appends: full-size chunks
        return max_blocks
    n_chunks = -(-n_blocks // max_blocks)
    return -(-n_blocks // n_chunks)


def check_compressor(compressor: str | None) -> None:
    if compressor is not None and compressor not in COMPRESSORS:
        raise InvalidInputError(
            f"compressor {compressor!r} is not supported; expected None or one of "
            f"{', '.join(COMPRESSORS)}"
        )


@dataclass(frozen=True)
class ArraySpec:
    """How the blocks of one group are laid out on disk."""

    block_shape: tuple[int, ...]
    dtype: np.dtype  # the stored (raw-bits) dtype
    chunk_blocks: int
    compressor: str | None = None

    @property
    def block_nbytes(self) -> int:
        return int(np.prod(self.block_shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def chunk_nbytes(self) -> int:
        return self.block_nbytes * self.chunk_blocks

    def chunk_key(self, chunk: int) -> str:
        return "c." + ".".join([str(chunk)] + ["0"] * len(self.block_shape))

    def chunks_of(self, start: int, stop: int) -> range:
        """The chunk numbers that hold blocks ``[start, stop)``."""
        if stop <= start:
            return range(0)
        return range(start // self.chunk_blocks, (stop - 1) // self.chunk_blocks + 1)


def block_range(lo: int, hi: int, unit: str = "block") -> str:
    """``blocks lo-(hi-1)``, or ``block lo`` for a single block."""
    return f"{unit} {lo}" if hi - lo == 1 else f"{unit}s {lo}-{hi - 1}"


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


def _write_all(fd: int, data) -> None:  # noqa: ANN001
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


def as_bytes(a: np.ndarray) -> memoryview:
    """A flat byte view of a C-contiguous array (any dtype, bfloat16 included)."""
    return memoryview(a.reshape(-1).view(np.uint8))


@functools.lru_cache(maxsize=64)
def _metadata_template(spec: ArraySpec) -> str:
    """The zarr.json that zarr itself writes for an array of this layout."""
    from zarr.storage import MemoryStore

    compressors = [Crc32cCodec()]
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


class ArrayStore:
    """The ``data/`` directory of a store: a zarr v3 hierarchy of generated ids."""

    def __init__(self, root: Path, *, verify_reads: bool = False):
        self.root = root
        self.verify_reads = verify_reads

    # ------------------------------------------------------------------ paths

    def ensure_root(self) -> None:
        if not (self.root / "zarr.json").exists():
            zarr.open_group(str(self.root), mode="a")
            fsync_file(self.root / "zarr.json")
            fsync_dir(self.root)
            fsync_dir(self.root.parent)

    def new_group_dir(self, gid: str) -> None:
        path = self.root / gid
        if not (path / "zarr.json").exists():
            zarr.open_group(str(path), mode="a")
            fsync_file(path / "zarr.json")
            fsync_dir(path)
            fsync_dir(self.root)

    @staticmethod
    def new_path(gid: str, kind: str) -> str:
        """A fresh array path for group ``gid``: ``m-<hex>`` (master) or ``d-<hex>``."""
        return f"{gid}/{kind}-{secrets.token_hex(8)}"

    def chunk_file(self, path: str, spec: ArraySpec, chunk: int) -> Path:
        return self.root / path / spec.chunk_key(chunk)

    # ------------------------------------------------------------------ writing

    def create(self, path: str, spec: ArraySpec, n_blocks: int, *, durable: bool = True) -> None:
        """Create the zarr metadata of a new, empty array (fsynced if ``durable``)."""
        full = self.root / path
        full.mkdir()
        self._write_metadata(full, spec, n_blocks)
        if durable:
            fsync_file(full / "zarr.json")
            fsync_dir(full)
            fsync_dir(full.parent)

    @staticmethod
    def _metadata_text(spec: ArraySpec, n_blocks: int) -> str:
        """zarr's own ``zarr.json`` for this layout with the array's shape filled in
        (zarr's create/resize cost ~2 ms each through its async API)."""
        doc = json.loads(_metadata_template(spec))
        doc["shape"] = [n_blocks, *spec.block_shape]
        return json.dumps(doc, indent=2)

    def _write_metadata(self, full: Path, spec: ArraySpec, n_blocks: int) -> None:
        tmp = full / f"zarr.json.tmp-{secrets.token_hex(4)}"
        tmp.write_text(self._metadata_text(spec, n_blocks))
        os.replace(tmp, full / "zarr.json")

    def estimate_nbytes(self, spec: ArraySpec, n_blocks: int) -> int:
        """Bytes an array of ``n_blocks`` will take on disk: exact when uncompressed, an
        upper bound when compressed (incompressible data grows by a small header)."""
        n_chunks = -(-n_blocks // spec.chunk_blocks) if n_blocks else 0
        per_chunk = spec.chunk_nbytes + CRC_BYTES
        if spec.compressor is not None:
            per_chunk += spec.chunk_nbytes // 64 + 512
        return n_chunks * per_chunk + len(self._metadata_text(spec, n_blocks).encode())

    def resize(self, path: str, spec: ArraySpec, n_blocks: int) -> None:
        """Grow the array's zarr shape (never shrinks: that would delete chunks)."""
        full = self.root / path
        if json.loads((full / "zarr.json").read_text())["shape"][0] < n_blocks:
            self._write_metadata(full, spec, n_blocks)
            fsync_file(full / "zarr.json")
            fsync_dir(full)

    def write(self, path: str, spec: ArraySpec, start: int, blocks: np.ndarray,
              also_fsync: tuple[Path, ...] = ()) -> None:
        """Write ``blocks`` (stored dtype, C-contiguous) at block ``start``, durably.

        Only chunks holding blocks ``>= start`` are written; a chunk that also holds
        committed blocks below ``start`` keeps their bytes and is replaced atomically
        (temporary file, fsync, rename), so readers never see a torn chunk.
        """
        stop = start + blocks.shape[0]
        if stop == start:
            return
        if spec.compressor is not None:
            arr = zarr.open_array(
                str(self.root / path), mode="r+", config={"write_empty_chunks": True}
            )
            arr[start:stop] = blocks
            for chunk in spec.chunks_of(start, stop):
                fsync_file(self.chunk_file(path, spec, chunk))
            fsync_dir(self.root / path)
            return
        jobs, pending = [], []
        for chunk in spec.chunks_of(start, stop):
            c0 = chunk * spec.chunk_blocks
            lo, hi = max(start, c0), min(stop, c0 + spec.chunk_blocks)
            final = self.chunk_file(path, spec, chunk)
            tmp = final.with_name(f"{final.name}.tmp-{secrets.token_hex(4)}")
            body = as_bytes(blocks[lo - start : hi - start])
            keep = (lo - c0) * spec.block_nbytes  # committed blocks at the front of the chunk
            jobs.append(lambda f=final, t=tmp, b=body, k=keep, c=chunk: self._write_chunk(
                f, t, b, k, spec.chunk_nbytes, f"{path} chunk {c}"))
            pending.append((tmp, final))
        jobs.extend(lambda f=f: fsync_file(f) for f in also_fsync)
        try:
            run_all(jobs)
            for tmp, final in pending:
                os.replace(tmp, final)
            pending.clear()
            fsync_dir(self.root / path)
        finally:
            for tmp, _ in pending:
                tmp.unlink(missing_ok=True)

    def _write_chunk(self, final: Path, tmp: Path, body: memoryview, keep: int,
                     chunk_nbytes: int, what: str) -> None:
        """Write one chunk file to ``tmp`` (fsynced): ``keep`` bytes of ``final``, then
        ``body``, zero padding to the full chunk size, and the crc32c."""
        head = bytearray(keep)
        if keep:
            self._read_raw(final, memoryview(head), 0, what)
        pad = chunk_nbytes - keep - len(body)
        crc = crc32c.crc32c(body, crc32c.crc32c(head))
        if pad:
            crc = crc32c.crc32c(bytes(pad), crc)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, head)
            _write_all(fd, body)
            if pad:
                _write_all(fd, bytes(pad))
            _write_all(fd, crc.to_bytes(CRC_BYTES, "little"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def create_and_write(self, path: str, spec: ArraySpec, blocks: np.ndarray) -> int:
        """A new array holding ``blocks`` (durable on return); returns its bytes on disk."""
        self.create(path, spec, blocks.shape[0], durable=blocks.shape[0] == 0
                    or spec.compressor is not None)
        full = self.root / path
        if blocks.shape[0] and spec.compressor is None:
            self.write(path, spec, 0, blocks, also_fsync=(full / "zarr.json",))
            fsync_dir(full.parent)
        else:
            self.write(path, spec, 0, blocks)
        return self.nbytes(path)

    # ------------------------------------------------------------------ reading

    def _read_raw(self, file: Path, buf: memoryview, offset: int, what: str) -> None:
        try:
            fd = os.open(file, os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptionError(f"{what}: chunk file {file.name} is missing") from None
        try:
            _read_exact(fd, buf, offset, what, file.name)
        finally:
            os.close(fd)

    def _read_chunk_verified(self, file: Path, spec: ArraySpec, what: str) -> bytearray:
        data = bytearray(spec.chunk_nbytes + CRC_BYTES)
        try:
            size = os.path.getsize(file)
        except FileNotFoundError:
            raise CorruptionError(f"{what}: chunk file {file.name} is missing") from None
        if size != len(data):
            raise CorruptionError(
                f"{what}: chunk file {file.name} has {size} bytes, expected {len(data)}"
            )
        self._read_raw(file, memoryview(data), 0, what)
        stored = int.from_bytes(data[-CRC_BYTES:], "little")
        if crc32c.crc32c(memoryview(data)[:-CRC_BYTES]) != stored:
            raise CorruptionError(f"{what}: chunk file {file.name} fails its crc32c checksum")
        return data

    def read(self, path: str, spec: ArraySpec, start: int, stop: int, out: np.ndarray,
             label: str = "", unit: str = "block") -> None:
        """Read blocks ``[start, stop)`` into ``out`` (stored dtype, C-contiguous).
        Errors name ``label`` and the positions read (as ``unit``s)."""
        if stop <= start:
            return
        what = label or path
        if spec.compressor is not None:
            self._read_zarr(path, spec, start, stop, out, what, unit)
            return
        dst = as_bytes(out)
        bn = spec.block_nbytes
        jobs = []
        for chunk in spec.chunks_of(start, stop):
            c0 = chunk * spec.chunk_blocks
            lo, hi = max(start, c0), min(stop, c0 + spec.chunk_blocks)
            jobs.append(lambda c=chunk, c0=c0, lo=lo, hi=hi: self._read_chunk_into(
                self.chunk_file(path, spec, c), spec, dst[(lo - start) * bn : (hi - start) * bn],
                (lo - c0) * bn, f"{what} {block_range(lo, hi, unit)}"))
        run_all(jobs)

    def _read_chunk_into(self, file: Path, spec: ArraySpec, target: memoryview, offset: int,
                         what: str) -> None:
        if self.verify_reads:
            data = self._read_chunk_verified(file, spec, what)
            target[:] = memoryview(data)[offset : offset + len(target)]
        else:
            self._read_raw(file, target, offset, what)

    def _read_zarr(self, path: str, spec: ArraySpec, start: int, stop: int,
                   out: np.ndarray, what: str, unit: str = "block") -> None:
        for chunk in spec.chunks_of(start, stop):  # zarr would silently fill a missing chunk
            if not self.chunk_file(path, spec, chunk).exists():
                c0 = chunk * spec.chunk_blocks
                lo, hi = max(start, c0), min(stop, c0 + spec.chunk_blocks)
                raise CorruptionError(
                    f"{what} {block_range(lo, hi, unit)}: chunk file {spec.chunk_key(chunk)} "
                    "is missing"
                )
        try:
            arr = zarr.open_array(str(self.root / path), mode="r")
            out[...] = arr[start:stop]
        except CorruptionError:
            raise
        except Exception as exc:  # zarr raises plain errors for checksum/decoding failures
            raise CorruptionError(f"{what} {block_range(start, stop, unit)}: {exc}") from exc

    def mapped(self, path: str, spec: ArraySpec, start: int, stop: int
               ) -> list[tuple[int, callable]]:
        """Blocks ``[start, stop)`` as zero-copy views of the chunk files, one loader per
        chunk: ``(first_block, load)`` where ``load()`` returns a read-only array of those
        blocks (stored dtype) mapping the page cache. Uncompressed arrays only; falls back
        to reading (with checksums) when ``verify_reads`` is on."""
        loaders = []
        for chunk in spec.chunks_of(start, stop):
            c0 = chunk * spec.chunk_blocks
            lo, hi = max(start, c0), min(stop, c0 + spec.chunk_blocks)
            loaders.append((lo, lambda c=chunk, c0=c0, lo=lo, hi=hi: self._map_chunk(
                path, spec, c, lo - c0, hi - lo)))
        return loaders

    def _map_chunk(self, path: str, spec: ArraySpec, chunk: int, first: int, count: int
                   ) -> np.ndarray:
        shape = (count, *spec.block_shape)
        if self.verify_reads or spec.compressor is not None or spec.block_nbytes == 0:
            out = np.empty(shape, spec.dtype)
            c0 = chunk * spec.chunk_blocks
            self.read(path, spec, c0 + first, c0 + first + count, out)
            return out
        file = self.chunk_file(path, spec, chunk)
        what = f"{path} chunk {chunk}"
        try:
            fd = os.open(file, os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptionError(f"{what}: chunk file {file.name} is missing") from None
        try:
            if os.fstat(fd).st_size != spec.chunk_nbytes + CRC_BYTES:
                raise CorruptionError(f"{what}: chunk file {file.name} has the wrong size")
            mm = mmap.mmap(fd, spec.chunk_nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                           prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        offset = first * spec.block_nbytes
        return np.frombuffer(mm, spec.dtype, count=int(np.prod(shape)),
                             offset=offset).reshape(shape)

    def read_runs(self, path: str, spec: ArraySpec, positions: np.ndarray, out: np.ndarray,
                  label: str = "", unit: str = "block") -> None:
        """Read the blocks at sorted ``positions`` into ``out`` (one row each)."""
        if positions.size == 0:
            return
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        row = 0
        for run in np.split(positions, breaks):
            lo, hi = int(run[0]), int(run[-1]) + 1
            self.read(path, spec, lo, hi, out[row : row + hi - lo], label, unit)
            row += hi - lo

    # ------------------------------------------------------------------ housekeeping

    def nbytes(self, path: str) -> int:
        total = 0
        with os.scandir(self.root / path) as it:
            for entry in it:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
        return total

    def remove(self, path: str) -> None:
        shutil.rmtree(self.root / path, ignore_errors=True)

    def remove_group_dir(self, gid: str) -> None:
        shutil.rmtree(self.root / gid, ignore_errors=True)
