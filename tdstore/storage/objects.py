"""Arrays under an object-store prefix (``s3://bucket/prefix``, ``gs://``, ``az://``):
the same zarr v3 hierarchy as a local store's ``data/`` directory, one object per file.

Consistency: the catalogue is the only place where data becomes visible. A write puts
down chunk objects under a fresh, random array path (an append puts new chunk keys past
the committed length) and only then commits the catalogue row that references them; a
read trusts nothing but that row, and checks every chunk it fetches against the row's
per-chunk checksum. The one object ever replaced is a master's last, partly filled chunk
(by an append): both versions hold the committed blocks, and each PUT is atomic, so a
reader sees one whole version and either one verifies. What this needs of the service:
atomic PUTs and read-after-write consistency, which S3 (since 2020), MinIO, Ceph RGW,
Google Cloud Storage and Azure Blob give.

The client is obstore (Rust's object_store): requests run on its own threads and
release the GIL, so reads and writes of many chunks overlap (``OBJECT_IO_THREADS``).
Fetched chunks go through a per-host :class:`ChunkCache` on local disk.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import timedelta
from typing import Any

import numpy as np

from tdstore.core.errors import CorruptionError, InvalidInputError, StorageError
from tdstore.core.ids import check_array_path, check_gid
from tdstore.core.layout import CRC_BYTES, ArrayRef, ArraySpec, block_range
from tdstore.core.location import normalize_url
from tdstore.core.validate import VerifyReads
from tdstore.storage.arrays import (
    GROUP_METADATA,
    MAX_METADATA_BYTES,
    Entry,
    as_bytes,
    assemble_chunk,
    check_chunk_size,
    check_metadata_doc,
    decode_chunk,
    estimate_nbytes,
    metadata_text,
    read_each,
    run_all,
    trailer_matches,
)
from tdstore.storage.chunkcache import ChunkCache

# Chunks fetched or put at once by one call. Measured against moto on loopback (8 agents
# of 64 MiB, cold chunk cache): 2 threads 646 ms, 4 threads 532 ms, 8 threads 655 ms,
# 16 threads 945 ms (the server's own threads contend). A service farther away answers
# each request after a longer round trip and wants more in flight.
OBJECT_IO_THREADS = 4
DATA = "data"
# client settings tdstore chooses unless storage_options says otherwise: a service that
# is down is reported within seconds, not after object_store's default of 3 minutes
CLIENT_DEFAULTS = {"connect_timeout": "5s", "timeout": "120s"}
RETRY_DEFAULTS: dict[str, Any] = {"max_retries": 3, "retry_timeout": timedelta(seconds=15),
                                  "backoff": {"init_backoff": timedelta(milliseconds=100),
                                              "max_backoff": timedelta(seconds=2),
                                              "base": 2}}
CLIENT_KEYS = {"allow_http", "allow_invalid_certificates", "connect_timeout",
               "default_content_type", "pool_idle_timeout", "pool_max_idle_per_host",
               "proxy_url", "proxy_ca_certificate", "proxy_excludes", "timeout",
               "user_agent", "read_timeout", "randomize_addresses"}


# obstore's runtime threads do not survive fork(): in a child forked from a process that
# used it, every request (even through a store made in the child) hangs. Measured with
# obstore 0.12.1; see the test of a forked child in tests/test_restart.py.
_used_in: int | None = None  # the pid of the process whose obstore runtime is live
_unusable = False  # this process was forked after its parent used obstore


def _after_fork_in_child() -> None:
    global _unusable
    if _used_in is not None:
        _unusable = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_usable(location: str) -> None:
    global _used_in
    if _unusable:
        raise StorageError(
            f"store {location}: this process was forked from one that used object "
            "storage, and the object-store client does not survive fork(); start such "
            "processes with multiprocessing's 'spawn' or 'forkserver' method (or "
            "subprocess)")
    if _used_in is None:
        _used_in = os.getpid()


def _first_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split())
    for marker in ("<?xml", "Error performing"):
        cut = text.find(marker)
        if cut > 40:
            text = text[:cut].rstrip(" :-")
    return text[:limit]


def _endpoint(options: Mapping[str, Any]) -> str:
    for key in ("endpoint", "endpoint_url", "aws_endpoint", "aws_endpoint_url"):
        if options.get(key):
            return str(options[key])
    return os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or ""


class ObjectArrayStore:
    """:class:`tdstore.storage.arrays.ArrayStore` under an object-store prefix.

    Settings come from the standard environment variables (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ALLOW_HTTP``,
    and the equivalents of the other services) or ``storage_options`` (obstore's config
    keys, e.g. ``endpoint``, ``access_key_id``, ``region``, ``allow_http``).
    """

    shared = True

    def __init__(self, url: str, *, storage_options: Mapping[str, Any] | None = None,
                 verify_reads: VerifyReads = False, cache_dir: str | os.PathLike[str] | None = None,
                 cache_max_bytes: int | None = None):
        try:
            from obstore.store import from_url as _from_url
        except ImportError:
            raise InvalidInputError(f"store {url}: object-store locations need obstore: "
                                    "pip install 'tdstore[s3]'") from None

        from_url: Any = _from_url  # its overloads type each service's keys; ours are any
        self.location = normalize_url(url)
        _check_usable(self.location)
        self.verify_reads = verify_reads
        options = dict(storage_options or {})
        client = {**CLIENT_DEFAULTS, **{k: options.pop(k) for k in list(options)
                                       if k in CLIENT_KEYS}}
        # passing client options replaces those object_store reads from the environment
        if "allow_http" not in client and os.environ.get("AWS_ALLOW_HTTP", "").lower() in (
                "1", "true", "yes", "on"):
            client["allow_http"] = True
        retry = dict(RETRY_DEFAULTS)
        if "max_retries" in options:
            retry["max_retries"] = int(options.pop("max_retries"))
        try:
            self._store = from_url(self.location, config=options or None,
                                   client_options=client, retry_config=retry)
        except Exception as exc:  # obstore's configuration errors
            raise InvalidInputError(f"store {self.location}: the object store cannot be "
                                    f"configured ({_first_line(exc)})") from None
        self._meta_ok: set[tuple] = set()
        self._groups_seen: set[str] = set()  # group "directories" known to exist
        self.cache: ChunkCache | None = None
        from tdstore.storage.chunkcache import DEFAULT_MAX_BYTES, default_directory

        limit = DEFAULT_MAX_BYTES if cache_max_bytes is None else int(cache_max_bytes)
        if limit > 0:
            ns = hashlib.sha256(f"{_endpoint(storage_options or {})}|{self.location}"
                                .encode()).hexdigest()[:16]
            self.cache = ChunkCache(cache_dir or default_directory(), ns, limit)

    @property
    def client(self) -> Any:
        """The obstore store of this location (for tools comparing with direct use)."""
        return self._store

    # ------------------------------------------------------------------ requests

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """obstore's errors as tdstore's: a missing object stays FileNotFoundError (the
        caller knows what it means); the rest is one StorageError line."""
        from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

        _check_usable(self.location)
        try:
            yield
        except (CorruptionError, InvalidInputError, StorageError):
            raise
        except Exception as exc:
            full = str(exc)
            if "NoSuchBucket" in full:
                bucket = self.location.split("://", 1)[1].split("/", 1)[0]
                raise StorageError(f"store {self.location}: bucket {bucket!r} does not "
                                   "exist") from None
            if isinstance(exc, FileNotFoundError):
                raise
            text = _first_line(exc)
            if (isinstance(exc, (PermissionDeniedError, UnauthenticatedError, PermissionError))
                    or "InvalidAccessKeyId" in full or "SignatureDoesNotMatch" in full
                    or "AccessDenied" in full):
                raise StorageError(
                    f"store {self.location}: {what}: the credentials are refused ({text}); "
                    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or storage_options"
                ) from None
            # connection refused, timeouts, 5xx after the retries
            raise StorageError(f"store {self.location}: {what}: the object store cannot be "
                               f"reached or failed ({text})") from None

    def _get(self, key: str, what: str) -> memoryview:
        import obstore

        with self._errors(f"reading {key}"):
            try:
                return memoryview(obstore.get(self._store, key).bytes())
            except FileNotFoundError:
                raise
            except Exception as exc:
                if "NotFound" in type(exc).__name__:
                    raise FileNotFoundError(key) from None
                raise
        raise AssertionError("unreachable")  # for mypy: _errors re-raises

    def _put(self, key: str, data: bytes | memoryview) -> None:
        import obstore

        with self._errors(f"writing {key}"):
            obstore.put(self._store, key, data)

    def _list(self, prefix: str) -> list[dict[str, Any]]:
        import obstore

        with self._errors(f"listing {prefix}/"):
            out: list[dict[str, Any]] = []
            for batch in obstore.list(self._store, prefix):
                out.extend(dict(o) for o in batch)
            return out

    def _head(self, key: str) -> dict[str, Any] | None:
        import obstore

        with self._errors(f"reading {key}"):
            try:
                return dict(obstore.head(self._store, key))
            except FileNotFoundError as exc:
                if "NoSuchBucket" in str(exc):
                    raise
                return None
        raise AssertionError("unreachable")

    def _delete(self, keys: list[str]) -> None:
        import obstore

        for i in range(0, len(keys), 1000):  # S3's DeleteObjects takes 1000 keys
            with self._errors(f"removing {keys[i]}"):
                obstore.delete(self._store, keys[i : i + 1000])

    @staticmethod
    def _key(rel: str) -> str:
        return f"{DATA}/{rel}" if rel else DATA

    def probe(self) -> None:
        """Reach the service once (a missing bucket or refused credentials are named)."""
        import obstore

        with self._errors("listing the location"):
            try:
                obstore.list_with_delimiter(self._store, DATA)
            except FileNotFoundError as exc:
                if "NoSuchBucket" in str(exc):
                    raise

    # ------------------------------------------------------------------ layout

    def ensure_root(self) -> None:
        if self._head(f"{DATA}/zarr.json") is None:
            self._put(f"{DATA}/zarr.json", GROUP_METADATA.encode())

    def new_group_dir(self, gid: str) -> bool:
        """Put the group's zarr.json if missing (ids are never reused, so a group seen
        once by this process is not asked about again)."""
        if gid in self._groups_seen:
            return False
        key = f"{DATA}/{check_gid(gid)}/zarr.json"
        created = self._head(key) is None
        if created:
            self._put(key, GROUP_METADATA.encode())
        self._groups_seen.add(gid)
        return created

    def estimate_nbytes(self, spec: ArraySpec, n_blocks: int) -> int:
        return estimate_nbytes(spec, n_blocks)

    def check_metadata(self, ref: ArrayRef, *, cached: bool = True) -> None:
        """Check the array's ``zarr.json`` against the catalogue's record; reads check
        it once per process and array state, ``verify`` (``cached=False``) always."""
        key = (ref.path, ref.spec, ref.rows)
        if cached and key in self._meta_ok:
            return
        what = f"array {ref.path}: zarr.json"
        try:
            raw = self._get(f"{DATA}/{check_array_path(ref.path)}/zarr.json", what)
        except FileNotFoundError:
            raise CorruptionError(f"{what} is missing") from None
        check_metadata_doc(ref, bytes(raw[: MAX_METADATA_BYTES + 1]), what)
        if len(self._meta_ok) > 4096:
            self._meta_ok.clear()
        self._meta_ok.add(key)

    # ------------------------------------------------------------------ writing

    def _put_chunk(self, ref: ArrayRef, chunk: int, body: np.ndarray, lo: int,
                   check: Callable[[np.ndarray, int], None] | None) -> int:
        spec = ref.spec
        keep = (lo - chunk * spec.chunk_blocks) * spec.block_nbytes
        head = self._chunk(ref, chunk, f"{ref.path} chunk {chunk}") if keep else None
        payload, trailer, decoded_crc = assemble_chunk(spec, head, keep, body, lo, check)
        data = bytearray(payload.nbytes + CRC_BYTES)
        data[: payload.nbytes] = as_bytes(payload)
        data[payload.nbytes :] = trailer.to_bytes(CRC_BYTES, "little")
        rel = f"{ref.path}/{spec.chunk_key(chunk)}"
        self._put(f"{DATA}/{rel}", memoryview(data))
        if self.cache is not None:  # write-through: this host reads it next
            self.cache.put(rel, decoded_crc, [data])
        return decoded_crc

    def write(self, ref: ArrayRef, blocks: np.ndarray,
              check: Callable[[np.ndarray, int], None] | None = None) -> list[int] | None:
        """Put ``blocks`` at block ``ref.rows``; returns the array's new per-chunk
        checksums (see ``LocalArrayStore.write``). Every PUT has finished on return."""
        spec, start = ref.spec, ref.rows
        stop = start + blocks.shape[0]
        old = None if ref.crcs is None else list(ref.crcs)
        if stop == start:
            return old
        check_array_path(ref.path)
        jobs = [functools.partial(self._put_chunk, ref, c, blocks[lo - start : hi - start],
                                  lo, check) for c, lo, hi in spec.windows(start, stop)]
        crcs = run_all(jobs, OBJECT_IO_THREADS)
        first = start // spec.chunk_blocks
        if old is None and first:
            return None
        return (old or [])[:first] + crcs

    def create_and_write(self, path: str, spec: ArraySpec, blocks: np.ndarray,
                         check: Callable[[np.ndarray, int], None] | None = None
                         ) -> tuple[int, list[int]]:
        """A new array: its zarr.json and chunk objects, all PUT at once."""
        n = blocks.shape[0]
        meta = metadata_text(spec, n).encode()
        key = f"{DATA}/{check_array_path(path)}/zarr.json"
        ref = ArrayRef(path, spec, 0, ())
        jobs: list[Callable[[], Any]] = [functools.partial(self._put, key, meta)]
        jobs += [functools.partial(self._put_chunk, ref, c, blocks[lo:hi], lo, check)
                 for c, lo, hi in spec.windows(0, n)]
        crcs = run_all(jobs, OBJECT_IO_THREADS)[1:]
        n_chunks = len(crcs)
        if spec.compressor is None:
            return len(meta) + n_chunks * (spec.chunk_nbytes + CRC_BYTES), crcs
        return self.nbytes(path), crcs

    def resize(self, path: str, spec: ArraySpec, n_blocks: int) -> None:
        key = f"{DATA}/{check_array_path(path)}/zarr.json"
        try:
            doc = json.loads(bytes(self._get(key, f"array {path}: zarr.json")))
        except FileNotFoundError:
            raise CorruptionError(f"array {path}: zarr.json is missing") from None
        except ValueError:
            raise CorruptionError(f"array {path}: zarr.json is not valid JSON") from None
        if doc["shape"][0] < n_blocks:
            self._put(key, metadata_text(spec, n_blocks).encode())

    # ------------------------------------------------------------------ reading

    def _fetch(self, ref: ArrayRef, chunk: int, what: str) -> memoryview:
        """A chunk object's bytes from the service (missing: CorruptionError)."""
        name = ref.spec.chunk_key(chunk)
        try:
            return self._get(f"{DATA}/{ref.path}/{name}", what)
        except FileNotFoundError:
            raise CorruptionError(f"{what}: chunk file {name} is missing") from None

    def _chunk(self, ref: ArrayRef, chunk: int, what: str) -> memoryview:
        """The decoded bytes of one chunk, from the cache or the service, every check
        applied; what is fetched is filed in the cache."""
        spec = ref.spec
        name = spec.chunk_key(chunk)
        rel = f"{ref.path}/{name}"
        recorded = None if ref.crcs is None or chunk >= len(ref.crcs) else ref.crcs[chunk]
        cache = self.cache if recorded is not None else None
        if cache is not None and recorded is not None:
            cached = self._from_cache(cache, ref, chunk, rel, recorded, what)
            if cached is not None:
                return cached
        raw = self._fetch(ref, chunk, what)
        decoded = decode_chunk(ref, chunk, raw, what, name)
        if cache is not None and recorded is not None:
            cache.put(rel, recorded, [raw])
        return decoded

    def _cached_into(self, ref: ArrayRef, chunk: int, target: memoryview, offset: int
                     ) -> bool:
        """Read an uncompressed chunk's blocks from the cache straight into ``target``
        (as a local store reads its chunk files: the entry's own checksum must be the one
        the catalogue records); False when that cannot be done (the caller fetches)."""
        cache, spec = self.cache, ref.spec
        if (cache is None or spec.compressor is not None or self.verify_reads
                or ref.crcs is None or chunk >= len(ref.crcs)):
            return False
        rel = f"{ref.path}/{spec.chunk_key(chunk)}"
        size = spec.chunk_nbytes + CRC_BYTES
        fd = cache.open(rel, ref.crcs[chunk], (size, size))
        if fd is None:
            return False
        try:
            view, pos = target, offset
            while view:
                n = os.preadv(fd, [view], pos)
                if n == 0:
                    break
                view, pos = view[n:], pos + n
            trailer = os.pread(fd, CRC_BYTES, spec.chunk_nbytes)
        finally:
            os.close(fd)
        if not view and trailer_matches(ref, chunk, int.from_bytes(trailer, "little")):
            return True
        cache.discard(rel, ref.crcs[chunk])  # damaged, or another version: fetch it
        return False

    def _from_cache(self, cache: ChunkCache, ref: ArrayRef, chunk: int, rel: str,
                    recorded: int, what: str) -> memoryview | None:
        from tdstore.storage.arrays import chunk_size_range

        fd = cache.open(rel, recorded, chunk_size_range(ref.spec))
        if fd is None:
            return None
        try:
            size = os.fstat(fd).st_size
            data = bytearray(size)
            view = memoryview(data)
            got = 0
            while got < size:
                n = os.preadv(fd, [view[got:]], got)
                if n == 0:
                    break
                got += n
        finally:
            os.close(fd)
        try:
            if got != size:
                raise CorruptionError("truncated")
            if (ref.spec.compressor is None and not self.verify_reads
                    and trailer_matches(ref, chunk, int.from_bytes(data[-CRC_BYTES:], "little"))):
                check_chunk_size(ref.spec, size, what, ref.spec.chunk_key(chunk))
                return view[:-CRC_BYTES]
            return decode_chunk(ref, chunk, data, what, ref.spec.chunk_key(chunk))
        except CorruptionError:
            cache.discard(rel, recorded)  # a damaged entry is a miss
            return None

    def read_arrays(self, items: Iterable[tuple[ArrayRef, np.ndarray, str]]
                    ) -> list[BaseException | None]:
        """Every committed block of each ``(ref, out, label)``: one :meth:`read` per
        array (each fetches its chunks in parallel); per item None or its error."""
        return read_each(self, items)

    def read(self, ref: ArrayRef, start: int, stop: int, out: np.ndarray,
             label: str = "", unit: str = "block") -> None:
        """Read blocks ``[start, stop)`` into ``out``: the chunks are fetched in
        parallel and each is copied into its place in ``out``."""
        if stop <= start:
            return
        if stop > ref.rows:
            raise CorruptionError(f"{label or ref.path}: {block_range(start, stop, unit)} "
                                  f"past the {ref.rows} committed")
        check_array_path(ref.path)
        what = label or ref.path
        dst = as_bytes(out)
        bn = ref.spec.block_nbytes
        # zarr.json is not read here: tdstore trusts only the catalogue's record and
        # each chunk's checksums; verify checks the document (one request per array)

        def job(c: int, lo: int, hi: int) -> None:
            target = dst[(lo - start) * bn : (hi - start) * bn]
            offset = (lo - c * ref.spec.chunk_blocks) * bn
            if self._cached_into(ref, c, target, offset):
                return
            data = self._chunk(ref, c, f"{what} {block_range(lo, hi, unit)}")
            target[:] = data[offset : offset + (hi - lo) * bn]

        run_all([functools.partial(job, c, lo, hi)
                 for c, lo, hi in ref.spec.windows(start, stop)], OBJECT_IO_THREADS)

    def read_runs(self, ref: ArrayRef, positions: np.ndarray, out: np.ndarray,
                  label: str = "", unit: str = "block") -> None:
        """Read the blocks at sorted ``positions`` into ``out`` (one row each), every
        chunk fetched once and all of them in parallel."""
        if positions.size == 0:
            return
        if int(positions[-1]) >= ref.rows:
            raise CorruptionError(f"{label or ref.path}: {unit} {int(positions[-1])} past "
                                  f"the {ref.rows} committed")
        check_array_path(ref.path)
        what = label or ref.path
        cb, bn = ref.spec.chunk_blocks, ref.spec.block_nbytes
        dst = as_bytes(out)
        chunks = positions // cb
        bounds = np.flatnonzero(np.diff(chunks)) + 1
        starts = np.concatenate([[0], bounds])
        stops = np.concatenate([bounds, [positions.size]])

        def job(i0: int, i1: int) -> None:
            c = int(chunks[i0])
            data = np.frombuffer(self._chunk(ref, c, f"{what} chunk {c}"), np.uint8)
            rows = data.reshape(cb, bn) if bn else data.reshape(cb, 0)
            picked = rows[positions[i0:i1] - c * cb]
            dst[i0 * bn : i1 * bn] = as_bytes(np.ascontiguousarray(picked))

        run_all([functools.partial(job, int(a), int(b)) for a, b in zip(starts, stops,
                                                                       strict=True)],
                OBJECT_IO_THREADS)

    def mapped(self, ref: ArrayRef, start: int, stop: int
               ) -> list[tuple[int, Callable[[], np.ndarray]]]:
        def load(lo: int, hi: int) -> np.ndarray:
            out = np.empty((hi - lo, *ref.spec.block_shape), ref.spec.dtype)
            self.read(ref, lo, hi, out)
            return out

        return [(lo, functools.partial(load, lo, hi))
                for _c, lo, hi in ref.spec.windows(start, stop)]

    def chunk_checksums(self, ref: ArrayRef) -> list[int]:
        import crc32c

        check_array_path(ref.path)
        return [crc32c.crc32c(decode_chunk(ref, c, self._fetch(ref, c, ref.path), ref.path,
                                           ref.spec.chunk_key(c)))
                for c in ref.spec.chunks_of(0, ref.rows)]

    def check_chunk(self, ref: ArrayRef, chunk: int, what: str) -> None:
        """Fetch one chunk from the service (not the cache) with every check."""
        check_array_path(ref.path)
        decode_chunk(ref, chunk, self._fetch(ref, chunk, what), what, ref.spec.chunk_key(chunk))

    # ------------------------------------------------------------------ housekeeping

    def _objects_below(self, rel: str) -> list[dict[str, Any]]:
        return self._list(self._key(rel))

    def extra_entries(self, path: str, spec: ArraySpec, rows: int) -> list[str]:
        keep = {"zarr.json"} | {spec.chunk_key(c) for c in spec.chunks_of(0, rows)}
        prefix = f"{DATA}/{check_array_path(path)}/"
        return [o["path"].removeprefix(f"{DATA}/") for o in self._list(prefix.rstrip("/"))
                if o["path"].removeprefix(prefix) not in keep]

    def nbytes(self, path: str) -> int:
        return sum(int(o["size"]) for o in self._objects_below(check_array_path(path)))

    def _remove_keys(self, rel: str) -> None:
        keys = [o["path"] for o in self._objects_below(rel)]
        if rel and self._head(self._key(rel)) is not None:
            keys.append(self._key(rel))
        if keys:
            self._delete(keys)

    def remove(self, path: str) -> None:
        self._remove_keys(check_array_path(path))

    def remove_group_dir(self, gid: str) -> None:
        self._groups_seen.discard(gid)
        self._remove_keys(check_gid(gid))

    def remove_below(self, rel: str) -> None:
        if not rel or any(p in ("", ".", "..") for p in rel.split("/")):
            raise CorruptionError(f"data/{rel}: not a path below data/")
        self._remove_keys(rel)

    def kind(self, rel: str) -> str | None:
        if not rel:
            return "dir"
        if self._head(self._key(rel)) is not None:
            return "file"
        import obstore

        with self._errors(f"listing {self._key(rel)}/"):
            found = obstore.list_with_delimiter(self._store, self._key(rel))
        return "dir" if found["objects"] or found["common_prefixes"] else None

    def children(self, rel: str) -> list[Entry]:
        import obstore

        with self._errors(f"listing {self._key(rel)}/"):
            found = obstore.list_with_delimiter(self._store, self._key(rel))
        out = [Entry(p.removeprefix(f"{DATA}/").rstrip("/"), "dir")
               for p in found["common_prefixes"]]
        out += [Entry(o["path"].removeprefix(f"{DATA}/"), "file") for o in found["objects"]]
        return sorted(out, key=lambda e: e.rel)

    def entry_nbytes(self, rel: str) -> int:
        head = self._head(self._key(rel)) if rel else None
        if head is not None:
            return int(head["size"])
        return sum(int(o["size"]) for o in self._objects_below(rel))

    def read_object(self, rel: str, max_bytes: int) -> bytes:
        raw = self._get(self._key(rel), f"data/{rel}")
        if len(raw) > max_bytes:
            raise CorruptionError(f"data/{rel} has {len(raw)} bytes, expected at most "
                                  f"{max_bytes}")
        return bytes(raw)

    def close(self) -> None:
        pass
