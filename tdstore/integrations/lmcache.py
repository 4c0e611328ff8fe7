"""tdstore as an LMCache storage backend: ``TdStoreBackend``, an LMCache storage plugin.

LMCache loads it from its own configuration (no code of ours in vLLM)::

    chunk_size: 256
    local_cpu: false
    max_local_cpu_size: 5          # GB: LMCache's buffers, also for chunks read back
    save_unfull_chunk: true
    storage_plugins: ["tdstore"]
    extra_config:
      storage_plugin.tdstore.module_path: tdstore.integrations.lmcache
      storage_plugin.tdstore.class_name: TdStoreBackend
      tdstore.location: /var/cache/kv            # or s3://bucket/prefix
      tdstore.url: postgresql+psycopg://...      # optional (required for s3://)
      tdstore.max_bytes: 200000000000            # optional size budget (LRU eviction)
      tdstore.direct_reads: auto                 # optional: O_DIRECT for chunks not in
                                                 # the page cache (auto: with local_cpu)

Each LMCache chunk is a keyed chunk of the store (:class:`tdstore.api.chunks.Chunks`,
namespace ``lmcache``) under a name made of its key's fields (:func:`key_name`), with the
shapes, dtypes and memory format LMCache gave it; in layerwise mode a chunk per layer.
Writes are behind, like LMCache's own disk backend: a put
copies the chunk and returns, a writer thread commits it; ``contains`` and lookups count
only chunks whose commit is done, so LMCache is never told of a chunk a crash could
lose. Reads fill buffers LMCache allocates. A damaged chunk is a miss, never wrong bytes.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.storage_backend.abstract_backend import StoragePluginInterface

from tdstore.api.store import Store
from tdstore.api.store import open as open_store
from tdstore.core.errors import CorruptionError, NotFoundError, TdStoreError
from tdstore.core.location import is_object_url
from tdstore.core.validate import MAX_NAME_CHARS

log = logging.getLogger("tdstore.lmcache")

NAMESPACE = "lmcache"
SETTINGS = ("location", "url", "max_bytes", "cache_dir", "cache_max_bytes", "verify_reads",
            "direct_reads", "writers")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _setting(name: str, value: Any) -> Any:
    """One ``tdstore.<name>`` value of ``extra_config``, converted; ValueError naming the
    setting and what it expects."""
    key = f"tdstore.{name}"
    if name in ("max_bytes", "cache_max_bytes", "writers"):
        what = (f"an int from 1 to {MAX_WRITERS}" if name == "writers" else
                "a number of bytes (an int, or a float such as 2e11)")
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        low, high = (1, MAX_WRITERS) if name == "writers" else (0, math.inf)
        if not math.isfinite(number) or number != int(number) or not low <= number <= high:
            raise ValueError(f"tdstore LMCache backend: extra_config {key}: expected {what}, "
                             f"got {value!r}")
        return int(number)
    if name in ("verify_reads", "direct_reads"):  # a boolean, or the word besides it
        word = "once" if name == "verify_reads" else "auto"
        text = str(value).strip().lower()
        if text == word:
            return word
        if text not in _TRUE + _FALSE:
            raise ValueError(f"tdstore LMCache backend: extra_config {key}: expected {word}, "
                             f"true or false, got {value!r}")
        return text in _TRUE
    if not isinstance(value, str):
        raise ValueError(f"tdstore LMCache backend: extra_config {key}: expected a string, "
                         f"got {value!r}")
    return value


def settings_from(extra: dict[str, Any]) -> dict[str, Any]:
    """tdstore's settings from LMCache's ``extra_config`` (keys ``tdstore.<name>``), every
    value checked before anything is opened; an unknown ``tdstore.*`` key is an error (a
    misspelt budget would otherwise be no budget)."""
    unknown = sorted(k for k in extra if isinstance(k, str) and k.startswith("tdstore.")
                     and k.removeprefix("tdstore.") not in SETTINGS)
    if unknown:
        raise ValueError(f"tdstore LMCache backend: unknown extra_config setting "
                         f"{', '.join(unknown)}; known: "
                         f"{', '.join('tdstore.' + n for n in SETTINGS)}")
    out: dict[str, Any] = {}
    for name in SETTINGS:
        value = extra.get(f"tdstore.{name}")
        if value is None or value == "":
            continue
        out[name] = _setting(name, value)
    # a damaged chunk must be a miss, never bytes: each chunk file is checksummed the
    # first time this process reads it (and again once it changes, or whenever the read
    # has to go to the disk); true checksums every read (see VERIFY_READS)
    out.setdefault("verify_reads", VERIFY_READS)
    out.setdefault("direct_reads", DIRECT_READS)
    out.setdefault("writers", WRITERS)
    if "location" not in out:
        raise ValueError("tdstore LMCache backend: extra_config needs tdstore.location "
                         "(a directory, or s3://bucket/prefix with tdstore.url)")
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptionError(f"chunk records dtype {name!r}, not a torch dtype")
    return dtype


# the default tdstore.verify_reads. Measured in the LMCache benchmark (64 chunks of 8 MiB
# from the page cache, 2 cores): a retrieve that checksums every chunk takes 1.1-1.35x
# as long as one that checksums each file version once
VERIFY_READS = "once"


# tdstore.direct_reads "auto" (the default): chunks not in the page cache are read with
# O_DIRECT (see tdstore.open) when LMCache's CPU tier is on (local_cpu: true), which
# keeps every chunk a retrieve brings back from a storage backend; a copy in the page
# cache would hold it in memory twice. With local_cpu: false the page cache is the only
# memory that keeps a chunk between retrieves, so reads go through it.
DIRECT_READS = "auto"


# the LMCache request tag that names a tdstore group of agents sharing storage
GROUP_TAG = "tdstore_group"


# writer threads: chunks of different keys are written (and fsynced) at once, so the
# disk sees a deeper queue; tdstore.writers takes at most MAX_WRITERS (each a thread)
WRITERS = 4
MAX_WRITERS = 256
# the writers' nice value: write behind yields the CPU to the threads LMCache's caller
# waits on (measured in the LMCache benchmark, 64 chunks of 8 MiB on 2 cores: the store
# calls return in 0.47-0.53 s with the writers at the caller's priority, 0.18-0.30 s at
# nice 10, with the time until all are committed unchanged, about 2 s)
WRITER_NICE = 10
# while lookups fail (the catalogue or object store down), one log line per this many
# seconds
OUTAGE_LOG_S = 60.0
# rows located by lookups, kept for the reads that follow them, at most this many
# (measured in the LMCache benchmark, 8 retrieves of 8 chunks of 8 MiB: with a lookup
# of their own the reads take 0.175-0.19 s, with the rows kept 0.135-0.145 s)
LOCATED_KEEP = 4096


# what a part of a chunk key cannot hold as it is (tdstore names hold no path separator,
# control character or lone surrogate), characters that would garble or disguise a
# listing (invisible formatting, line separators, direction overrides), '%' itself, and
# the characters that separate the parts ('@', '='; '~' marks a value not a string):
# written %XX (its UTF-8 bytes), as in a URL
_UNSAFE = re.compile("[%/\\\\@=~\x00-\x1f\x7f-\x9f\xad\u200b-\u200f\u2028-\u202e"
                     "\u2060-\u206f\ufeff\ud800-\udfff]")
# the longest chunk key: a chunk's group is named "lmcache:<key>"
MAX_KEY_CHARS = MAX_NAME_CHARS - len(NAMESPACE) - 1
# the longest group tag as it goes into the names of the group's shared groups
# ("lmcache-shared:<group>:<position>:<shape>:<dtype>")
MAX_GROUP_CHARS = 256


def _escaped(text: str) -> str:
    return _UNSAFE.sub(lambda m: "".join(
        f"%{b:02X}" for b in m.group().encode("utf-8", "surrogatepass")), text)


def _text(value: Any) -> str:
    """A string as itself (escaped), any other value as ``~<type>:<repr>``: LMCache tells
    a tag value 1 from "1", and so do the names."""
    if isinstance(value, str):
        return _escaped(value)
    return "~" + _escaped(f"{type(value).__name__}:{value!r}")


def _number(value: Any) -> str:
    return str(value) if type(value) is int else _text(value)


def _cut(name: str, limit: int) -> str:
    """``name``, or when longer than ``limit`` its start and the SHA-256 of all of it."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{name[:limit - len(digest) - 1]}#{digest}"


def _layer_of(key: Any) -> Any:
    """The layer of a layer's key (``LayerCacheEngineKey``, layerwise mode), else None."""
    return getattr(key, "layer_id", None)


def key_name(key: Any) -> str:
    """The chunk key of LMCache's key ``key`` (a ``CacheEngineKey``, or a
    ``LayerCacheEngineKey``): its fields as LMCache's ``to_string()`` writes them,
    ``model@world_size@worker_id@chunk_hash@dtype[@layer][@tag=value...]``, each
    written so that different keys never get one name (LMCache's own string gives tag
    values holding ``@`` or ``%``, and 1 and "1", one string). Characters a name cannot
    hold are written %XX, so vLLM's model names (``meta-llama/Llama-3.1-8B-Instruct``,
    or a path) work, and a name too long is cut short with the SHA-256 of all of it."""
    chunk_hash = key.chunk_hash
    if type(chunk_hash) is int:
        hash_text = f"{chunk_hash:x}"
    elif isinstance(chunk_hash, bytes):
        hash_text = "x" + chunk_hash.hex()
    else:
        hash_text = _text(chunk_hash)
    dtype = getattr(key, "_dtype_str", None) or _dtype_name(key.dtype)
    parts = [_text(key.model_name), _number(key.world_size), _number(key.worker_id),
             hash_text, _text(dtype)]
    layer = _layer_of(key)
    if layer is not None:
        parts.append(_number(layer))
    parts += [f"{_text(k)}={_text(v)}" for k, v in key.tags or ()]
    return _cut("@".join(parts), MAX_KEY_CHARS)


def group_name(tag: Any) -> str:
    """The sharing group a request's ``tdstore_group`` tag names, as it goes into the
    names of that group's chunks (escaped like a key, and at most MAX_GROUP_CHARS)."""
    return _cut(_text(tag), MAX_GROUP_CHARS)


class _Put:
    __slots__ = ("again", "callback", "dtypes", "fmt", "key", "name", "obj", "shapes",
                 "share")

    def __init__(self, key: Any, name: str, obj: Any, shapes: list, dtypes: list,
                 fmt: str, callback: Callable[[Any], None] | None,
                 share: tuple[str, int] | None):
        self.key, self.name, self.obj = key, name, obj
        self.shapes, self.dtypes, self.fmt, self.callback = shapes, dtypes, fmt, callback
        self.share = share
        self.again = 0  # stores of this chunk again, while it was written, to record

    def data(self) -> np.ndarray:
        """The chunk's bytes in LMCache's buffer (held until written), as rows of the
        last axis (runs of tokens of one layer for KV_2LTD): blocks that agents sharing a
        prompt share."""
        size = self.obj.get_size()
        data = np.frombuffer(memoryview(self.obj.byte_array).cast("B"), np.uint8, count=size)
        shape = self.shapes[0] if len(self.shapes) == 1 else None
        if shape and math.prod(shape) and size % math.prod(shape[:-1]) == 0:
            data = data.reshape(*shape[:-1], -1)
        return data


class TdStoreBackend(StoragePluginInterface):
    """LMCache's storage plugin interface, kept in a tdstore store."""

    def __init__(self, dst_device: str = "cpu", config: Any = None, metadata: Any = None,
                 local_cpu_backend: Any = None,
                 loop: asyncio.AbstractEventLoop | None = None):
        super().__init__(dst_device=dst_device, config=config, metadata=metadata,
                         local_cpu_backend=local_cpu_backend, loop=loop)
        if local_cpu_backend is None:
            raise ValueError("tdstore LMCache backend: needs LMCache's local CPU backend "
                             "(max_local_cpu_size > 0) to allocate the chunks it reads")
        extra = dict(getattr(config, "extra_config", None) or {})
        opts = settings_from(extra)  # all checked before the store is opened
        # layerwise mode (use_layerwise: true) keys each layer of a chunk on its own, and
        # LMCache looks a chunk up by its first layer's key alone (see contains)
        kv_shape = getattr(metadata, "kv_shape", None)
        self.num_layers: int | None = int(kv_shape[0]) if kv_shape else None
        location = opts.pop("location")
        writers = opts.pop("writers")
        if opts["direct_reads"] == "auto":  # see DIRECT_READS
            opts["direct_reads"] = (bool(getattr(config, "local_cpu", False))
                                    and not is_object_url(location))
        self.store: Store = open_store(location, **opts)
        try:
            self._start(writers)
        except BaseException:
            self.store.close()
            raise
        # LMCache closes its CPU backend, and frees the buffers queued chunks are still
        # written from, before it closes its plugins: the queue is committed first
        cpu_close = local_cpu_backend.close

        def close_after_writes() -> None:
            self._finish_writes()
            cpu_close()

        local_cpu_backend.close = close_after_writes

    def _start(self, writers: int) -> None:
        self.chunks = self.store.chunks(NAMESPACE)
        self._pending: dict[str, _Put] = {}
        self._again = 0  # chunks stored again while queued: uses still to record
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Put | str | None] = queue.Queue()
        self._idle = threading.Condition(self._lock)
        self._closing = False  # set once: later puts are refused
        self.failed = 0  # puts that did not commit (logged)
        # tdstore-bg-*: their writes run inline, not on the I/O pool that reads use
        self._writers = [threading.Thread(target=self._write_loop, daemon=True,
                                          name=f"tdstore-bg-lmcache-writer-{i}")
                         for i in range(writers)]
        for t in self._writers:
            t.start()
        # reads record their accesses (the budget's LRU order) from a thread of their
        # own, once a second: a retrieve never waits for a catalogue write
        self._accessed: dict[int, float] = {}
        self._stop = threading.Event()
        self._toucher = threading.Thread(target=self._touch_loop, daemon=True,
                                         name="tdstore-lmcache-access")
        self._toucher.start()
        self._located: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._outage_logged = -math.inf  # when a failed lookup was last logged

    def __str__(self) -> str:
        return f"TdStoreBackend({self.store.path})"

    @staticmethod
    def _name(key: Any) -> str:
        return key_name(key)

    # ------------------------------------------------------------------ lookups

    def _unreachable(self, what: str, exc: Exception) -> None:
        """A lookup or removal that failed on the store (its catalogue or object store
        down, its directory moved): logged, once per OUTAGE_LOG_S while it lasts;
        LMCache is answered with a miss, never an exception."""
        at = time.monotonic()
        with self._lock:
            quiet = at - self._outage_logged < OUTAGE_LOG_S
            if not quiet:
                self._outage_logged = at
        if not quiet:
            log.warning("tdstore: %s failed, answered as a miss (%s)", what, exc)

    def _layers_of(self, key: Any) -> list[str] | None:
        """For a layer's key (layerwise mode), the names of every layer of its chunk;
        else None."""
        if _layer_of(key) is None or not self.num_layers:
            return None
        return [self._name(k) for k in key.split_layers(self.num_layers)]

    def contains(self, key: Any, pin: bool = False) -> bool:
        """Whether the chunk is committed. For a layer's key, whether every layer of its
        chunk is: LMCache's layerwise retrieve asks for the first layer's key alone, then
        loads each layer of every chunk it found, by position (a layer missing there
        would leave its tokens unloaded while the retrieve counts them)."""
        try:
            layers = self._layers_of(key)
            if layers is None:
                return self.chunks.contains(self._name(key))
            return self._locate_kept(layers) == len(layers)
        except (TdStoreError, OSError) as exc:
            self._unreachable("lookup", exc)
            return False

    def batched_contains(self, keys: list[Any], pin: bool = False) -> int:
        """How many of ``keys``, from the first, are committed (one catalogue
        transaction). Their rows are kept for the read that follows (a retrieve looks its
        chunks up, then reads them), which then needs no lookup of its own."""
        try:
            return self._locate_kept([self._name(k) for k in keys])
        except (TdStoreError, OSError) as exc:
            self._unreachable("lookup", exc)
            return 0

    def _locate_kept(self, names: list[str]) -> int:
        """How many of ``names``, from the first, are committed; their rows kept."""
        found = self.chunks.locate_prefix(names)
        with self._lock:
            for name, at in found.items():
                self._located[name] = at
                self._located.move_to_end(name)
            while len(self._located) > LOCATED_KEEP:
                self._located.popitem(last=False)
        return len(found)

    async def batched_async_contains(self, lookup_id: str, keys: list[Any],
                                     pin: bool = False) -> int:
        return await asyncio.get_running_loop().run_in_executor(
            None, self.batched_contains, keys, pin)

    def exists_in_put_tasks(self, key: Any) -> bool:
        with self._lock:
            return self._name(key) in self._pending

    # ------------------------------------------------------------------ writes

    def batched_submit_put_task(self, keys: Sequence[Any], objs: list[Any],
                                transfer_spec: Any = None,
                                on_complete_callback: Callable[[Any], None] | None = None
                                ) -> list[Future] | None:
        """Queue each chunk for the writer threads; returns at once. Each buffer is held
        (a reference taken, as LMCache's disk backend does) until its chunk is written.

        A request tagged ``lmcache.tag.tdstore_group: G`` has its chunks stored against
        group G's chunks at the same positions (LMCache passes a request's chunks in
        order, from its first)."""
        for position, (key, obj) in enumerate(zip(keys, objs, strict=True)):
            name = self._name(key)
            meta = obj.metadata
            shapes = [list(s) for s in (meta.shapes or [meta.shape])]
            dtypes = [_dtype_name(d) for d in (meta.dtypes or [meta.dtype])]
            tags = dict(getattr(key, "tags", None) or ())
            group = tags.get(GROUP_TAG)
            share = None
            if group is not None and group != "":
                # (layerwise mode: each layer shares with the same layer of the others)
                layer = _layer_of(key)
                share = (group_name(group) + ("" if layer is None else f"@{_number(layer)}"),
                         position)
            item = _Put(key, name, obj, shapes, dtypes, meta.fmt.name, on_complete_callback,
                        share)
            with self._lock:  # (queued ahead of the writers' stop, or not at all)
                if self._closing:
                    log.warning("tdstore: backend closed; chunk %s not stored", name)
                    continue
                if name in self._pending:
                    # stored again while still queued: a use, recorded when the
                    # queue reaches it, or once the chunk is committed (_use_again)
                    self._again += 1
                    self._queue.put(name)
                    continue
                obj.ref_count_up()
                self._pending[name] = item
                self._queue.put(item)
        return None

    def _write_loop(self) -> None:
        try:  # this thread only (Linux: a thread's id is a process id for setpriority)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        except (AttributeError, OSError):
            pass
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, str):
                self._use_again(item)
                continue
            committed = False
            try:
                self.chunks.put(item.name, item.data(), fmt=item.fmt, share=item.share,
                                attrs={"shapes": item.shapes, "dtypes": item.dtypes})
                committed = True
            except Exception as exc:  # not committed: LMCache will not find it
                self.failed += 1
                log.warning("tdstore: chunk %s was not stored (%s)", item.name, exc)
            else:
                if item.callback is not None:
                    try:
                        item.callback(item.key)
                    except Exception as exc:
                        log.warning("tdstore: on_complete_callback failed: %s", exc)
            finally:
                item.obj.ref_count_down()
                self._done(item, committed)

    def _done(self, item: _Put, committed: bool) -> None:
        """A put is done: the uses left to it by stores of its chunk while it was being
        written (see _use_again) are recorded, then it leaves the queue's pending set."""
        while True:
            with self._lock:
                again, item.again = item.again, 0
                if not again:
                    self._pending.pop(item.name, None)
                    self._idle.notify_all()
                    return
            if committed:
                self._touch(item.name)

    def _use_again(self, name: str) -> None:
        """A chunk stored again while it was queued counts as used when the queue reaches
        that store, so that a prompt prefix every request of a burst stores stays the
        newest in the budget's LRU order: now, or, while its own write is still going on
        (on another writer), as soon as that is done (a writer never waits for another:
        with every writer waiting, no put would be left to finish)."""
        with self._lock:
            pending = self._pending.get(name)
            if pending is not None:  # (flush waits for it to leave _pending)
                pending.again += 1
                self._again -= 1
                return
        try:
            self._touch(name)
        finally:
            with self._lock:
                self._again -= 1
                self._idle.notify_all()

    def _touch(self, name: str) -> None:
        try:
            self.chunks.touch(name)
        except Exception as exc:
            log.warning("tdstore: use of chunk %s not recorded (%s)", name, exc)

    def _touch_loop(self) -> None:
        from tdstore.ops.groups import ACCESS_RESOLUTION_S

        while True:
            stopping = self._stop.wait(ACCESS_RESOLUTION_S)
            with self._lock:
                accessed, self._accessed = self._accessed, {}
            if accessed and not self.store.readonly:
                try:
                    self.store.catalog.touch(accessed, ACCESS_RESOLUTION_S)
                except TdStoreError as exc:
                    log.warning("tdstore: accesses not recorded (%s)", exc)
            if stopping:
                return

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued chunk is committed (or failed); returns whether the
        queue drained within ``timeout``."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._pending and not self._again,
                                       timeout)

    # ------------------------------------------------------------------ reads

    def get_blocking(self, key: Any) -> Any:
        """The chunk in a buffer LMCache allocates, or None (missing, damaged, or no
        buffer free)."""
        return self.batched_get_blocking([key])[0]

    def _allocate(self, name: str, meta: dict[str, Any]) -> Any:
        try:
            shapes = [torch.Size(s) for s in meta["shapes"]]
            dtypes = [_torch_dtype(d) for d in meta["dtypes"]]
            fmt = MemoryFormat[meta["fmt"]]
        except (CorruptionError, KeyError, TypeError, ValueError) as exc:
            log.warning("tdstore: chunk %s has unusable metadata (%s): a miss", name, exc)
            return None
        obj = self.local_cpu_backend.allocate(shapes if len(shapes) > 1 else shapes[0],
                                              dtypes if len(dtypes) > 1 else dtypes[0],
                                              fmt, busy_loop=False)
        if obj is None:
            log.warning("tdstore: no LMCache buffer free for chunk %s", name)
        return obj

    def batched_get_blocking(self, keys: list[Any]) -> list[Any]:
        """The chunks of ``keys`` from the first, each in a buffer LMCache allocates,
        until one is missing, damaged (a miss, never bytes) or finds no buffer. Rows
        kept by the lookup before are used (each once) when it found them all."""
        names = [self._name(k) for k in keys]
        with self._lock:
            kept = {n: self._located.pop(n) for n in names if n in self._located}
        objs: list[Any] = []
        got = self._read_into(names, objs, kept if len(kept) == len(names) else None)
        if len(kept) == len(names) and got < len(names):
            # a kept row may have gone stale (its chunk evicted, then stored again by
            # another process): the rest once more, from a lookup of their own
            for obj in objs[got:]:
                obj.ref_count_down()
            del objs[got:]
            got += self._read_into(names[got:], objs, None)
        for obj in objs[got:]:  # allocated for a chunk that then failed to read
            obj.ref_count_down()
        return objs[:got] + [None] * (len(keys) - got)

    def _read_into(self, names: list[str], objs: list[Any],
                   located: dict[str, Any] | None) -> int:
        """Read the chunks of ``names`` from the first, each into a buffer allocated and
        appended to ``objs``; returns how many were read."""

        def buffer(i: int, meta: dict[str, Any]) -> np.ndarray | None:
            obj = self._allocate(names[i], meta)
            if obj is None:
                return None
            view = memoryview(obj.byte_array).cast("B")
            n = math.prod(meta["shape"])
            if len(view) != n:  # LMCache's shapes and dtypes do not cover the bytes
                log.warning("tdstore: chunk %s records %d bytes but LMCache shapes of %d: "
                            "a miss", names[i], n, len(view))
                obj.ref_count_down()
                return None
            objs.append(obj)
            return np.frombuffer(view, np.uint8, count=n)

        accessed: dict[int, float] = {}
        try:
            got = self.chunks.read_many(names, buffer, accessed_into=accessed,
                                        located=located)
        except TdStoreError as exc:
            log.warning("tdstore: chunks cannot be read (%s): misses", exc)
            got = 0
        if accessed:
            with self._lock:
                self._accessed.update(accessed)
        return got

    async def batched_get_non_blocking(self, lookup_id: str, keys: list[Any],
                                       transfer_spec: Any = None) -> list[Any]:
        """The chunks of ``keys`` from the first, until one is not read (LMCache's
        prefetch takes what came). In layerwise mode (one layer of a request's chunks)
        all of them or an error: LMCache loads them into the KV cache by position, after
        the retrieve has counted every chunk its lookup found, so a chunk gone since (or
        damaged) must fail the retrieve, not leave its tokens unloaded."""
        got = await asyncio.get_running_loop().run_in_executor(
            None, self.batched_get_blocking, keys)
        objs = [o for o in got if o is not None]
        if len(objs) < len(keys) and _layer_of(keys[0]) is not None:
            for obj in objs:
                obj.ref_count_down()
            name = self._name(keys[len(objs)])
            log.warning("tdstore: layer chunk %s cannot be read: the layerwise retrieve "
                        "fails", name)
            raise NotFoundError(
                f"tdstore: layer chunk {name} is gone or damaged since LMCache's lookup "
                "found its chunk; a layerwise retrieve cannot load part of a layer (LMCache "
                "would count the tokens of the missing chunk as loaded)")
        return objs

    def get_non_blocking(self, key: Any) -> Future | None:
        future: Future = Future()
        future.set_result(self.get_blocking(key))
        return future

    # ------------------------------------------------------------------ the rest

    def pin(self, key: Any) -> bool:
        return self.contains(key)

    def unpin(self, key: Any) -> bool:
        return True

    def remove(self, key: Any, force: bool = True) -> bool:
        try:
            return self.chunks.remove(self._name(key))
        except (TdStoreError, OSError) as exc:
            self._unreachable("remove", exc)
            return False

    def get_allocator_backend(self) -> Any:
        return self.local_cpu_backend

    def _finish_writes(self) -> None:
        """Refuse further puts, commit what is queued and stop the writers (once)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        for _ in self._writers:
            self._queue.put(None)
        for t in self._writers:
            t.join()

    def close(self) -> None:
        """Commit what is queued, then release the store. Puts after this are refused
        (logged; LMCache's buffers are not held)."""
        self._finish_writes()
        self._stop.set()
        self._toucher.join()
        self.store.close()
