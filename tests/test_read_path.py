"""The read path: windows, memmap outputs, checksums, views of compressed groups."""

from __future__ import annotations

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import zarr
from conftest import kv
from hypothesis import given, settings
from hypothesis import strategies as st

import tdstore
from tdstore.core.diff import nonfinite_blocks
from tdstore.core.dtypes import NONFINITE_BITS, numpy_dtype
from tdstore.storage import reads as reconstruct


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(NONFINITE_BITS)), data=st.data())
def test_nonfinite_blocks_agrees_with_isfinite(name, data):
    dt = numpy_dtype(name)
    n_blocks, width = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 40))
    raw = data.draw(st.binary(min_size=n_blocks * width * dt.itemsize,
                              max_size=n_blocks * width * dt.itemsize))
    blocks = np.frombuffer(raw, dtype=dt).reshape(n_blocks, width)
    with np.errstate(invalid="ignore"):
        expected = np.flatnonzero(~np.isfinite(blocks.astype(np.float64)).all(axis=1))
    assert nonfinite_blocks(blocks, name).tolist() == expected.tolist()


def test_integer_blocks_are_never_nonfinite():
    assert nonfinite_blocks(np.full((3, 4), 255, np.uint8), "uint8").size == 0


def test_a_nan_in_a_kept_block_is_named_by_its_block_number(store):
    g = store.group("g")
    master = kv(16)
    g.register_master("m", master)
    bad = master.copy()
    bad[14, 1, 1] = np.inf
    with pytest.raises(tdstore.InvalidInputError, match=r"NaN or inf in block\(s\) 14;"):
        g.register_mirror("a", bad)
    assert g.agents() == ["m"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_reconstruct_over_many_windows_into_arrays_and_memmaps(store, tmp_path, monkeypatch,
                                                                dtype):
    monkeypatch.setattr(reconstruct, "WINDOW_BYTES", 5 * 4 * 8 * 4)  # ~5 blocks a window
    g = store.group("g", chunk_blocks=3)
    master = kv(50, dtype=dtype)
    mirror = master.copy()
    rng = np.random.default_rng(3)
    changed = rng.choice(50, 17, replace=False)
    mirror[changed] = kv(17, dtype=dtype, seed=8)
    g.register_master("m", master)
    g.register_mirror("a", mirror)
    assert np.array_equal(g.reconstruct("a").view(np.uint8), mirror.view(np.uint8))
    mm = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=mirror.dtype,
                                   shape=mirror.shape)
    g.reconstruct("a", out=mm)
    assert np.array_equal(np.asarray(mm).view(np.uint8), mirror.view(np.uint8))
    del mm
    again = np.load(tmp_path / "out.npy")
    assert np.array_equal(again.view(np.uint8), mirror.view(np.uint8))


def test_copy_on_write_memmap_output_keeps_its_pages(store, tmp_path):
    g = store.group("g")
    g.register_master("m", kv(8))
    np.save(tmp_path / "z.npy", np.zeros_like(kv(8)))
    mm = np.load(tmp_path / "z.npy", mmap_mode="c")
    g.reconstruct("m", out=mm)
    assert np.array_equal(mm, kv(8))
    assert not np.load(tmp_path / "z.npy").any()  # copy-on-write: the file is untouched


def test_verify_reads_detects_a_flipped_byte_and_names_the_blocks(tmp_path):
    path = tmp_path / "s"
    with tdstore.open(path) as store:
        g = store.group("rag", chunk_blocks=4)
        g.register_master("retriever", kv(12))
    chunk = next((path / "data").glob("*/m-*/c.1.0.0"))
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with tdstore.open(path, verify_reads=True) as store:
        g = store.group("rag")
        with pytest.raises(tdstore.CorruptionError,
                           match=r"group 'rag' agent 'retriever' \(master\) blocks 4-7: .*crc32c"):
            g.reconstruct("retriever")
        with pytest.raises(tdstore.CorruptionError, match="block 5: chunk file c.1.0.0 fails"):
            g.view("retriever")[5]
        assert np.array_equal(g.view("retriever")[:4], kv(12)[:4])  # other chunks still read


def test_a_missing_chunk_is_an_error_not_zeros(tmp_path):
    path = tmp_path / "s"
    with tdstore.open(path) as store:
        g = store.group("rag", chunk_blocks=4)
        g.register_master("retriever", kv(12))
        next((path / "data").glob("*/m-*/c.2.0.0")).unlink()
        with pytest.raises(tdstore.CorruptionError,
                           match="blocks 8-11: chunk file c.2.0.0 is missing"):
            g.reconstruct("retriever")
        with pytest.raises(tdstore.CorruptionError, match="missing"):
            g.register_mirror("critic", kv(12))


def test_array_metadata_stays_readable_by_zarr_after_appends(store):
    g = store.group("g", chunk_blocks=4)
    master = kv(6, dtype="bfloat16")
    g.register_master("m", master)
    g.collective_reuse_step(["m"], kv(5, dtype="bfloat16", seed=2))
    (arr_dir,) = (store.path / "data").glob("*/m-*")
    arr = zarr.open_array(str(arr_dir), mode="r")
    assert arr.shape == (11, 4, 8)
    full = np.concatenate([master, kv(5, dtype="bfloat16", seed=2)])
    assert np.array_equal(arr[:].view(ml_dtypes.bfloat16), full)


def test_bench_runs_and_reports_every_target_as_json(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "tdstore", "bench", "--agents", "3", "--blocks", "32",
         "--block-shape", "2,8,16", "--reps", "1", "--scaling-mirrors", "4",
         "--open-agents", "20", "--big-gib", "0.002", "--dir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    r = report["results"]
    assert r["big_ok"] is True and r["bytes_on_disk"] >= r["bytes_ideal"]
    assert len(report["ratios"]) >= 12
    for name, t in report["ratios"].items():
        assert t["value"] is not None and t["value"] > 0, name
    assert list(tmp_path.iterdir()) == []  # the benchmark cleans up after itself


@pytest.mark.parametrize("verify_reads", [False, True])
def test_a_truncated_chunk_is_an_error_on_read_not_short_data(tmp_path, verify_reads):
    path = tmp_path / "s"
    with tdstore.open(path) as store:
        g = store.group("rag", chunk_blocks=4)
        g.register_master("retriever", kv(12))
    chunk = next((path / "data").glob("*/m-*/c.1.0.0"))
    chunk.write_bytes(chunk.read_bytes()[:50])
    with tdstore.open(path, verify_reads=verify_reads) as store:
        with pytest.raises(tdstore.CorruptionError, match=r"blocks 4-7: chunk file c.1.0.0"):
            store.group("rag").reconstruct("retriever")


def test_verify_reads_once_checks_each_version_of_a_file_and_every_read_from_the_disk(
        tmp_path):
    """verify_reads="once": a chunk file is checksummed on its first read, not again
    while that version of it is read from the page cache, again when the read has to go
    to the disk, again once the file changed in any way (a damaged byte is found even
    with its modification time put back: the change time still moves)."""
    import os

    from tdstore.dev.bench import drop_page_cache

    path = tmp_path / "s"
    data = kv(8)
    with tdstore.open(path) as store:
        store.chunks("t").put("k", data)
    (chunk,) = (path / "data").glob("*/m-*/c.*")
    with tdstore.open(path, verify_reads="once") as store:
        chunks, arrays = store.chunks("t"), store.arrays
        assert np.array_equal(chunks.get("k")[0], data) and arrays.checksummed_reads == 1
        assert np.array_equal(chunks.get("k")[0], data) and arrays.checksummed_reads == 1
        drop_page_cache(chunk)
        assert np.array_equal(chunks.get("k")[0], data) and arrays.checksummed_reads == 2
        chunk.write_bytes(chunk.read_bytes())  # the same bytes, a new version of the file
        fd = os.open(chunk, os.O_RDONLY)
        os.fsync(fd)  # written back (a check of pages not yet written back is not kept)
        os.close(fd)
        assert np.array_equal(chunks.get("k")[0], data) and arrays.checksummed_reads == 3
        assert np.array_equal(chunks.get("k")[0], data) and arrays.checksummed_reads == 3
        st = chunk.stat()
        raw = bytearray(chunk.read_bytes())
        raw[100] ^= 0x01
        chunk.write_bytes(bytes(raw))
        os.utime(chunk, ns=(st.st_atime_ns, st.st_mtime_ns))
        with pytest.raises(tdstore.CorruptionError, match="fails its crc32c checksum"):
            chunks.get("k")
        with pytest.raises(tdstore.CorruptionError, match="fails its crc32c checksum"):
            chunks.get("k")  # a failed check is never remembered as a pass


@pytest.mark.parametrize("value", ["yes", 1, "ONCE", None])
def test_verify_reads_takes_true_false_or_once(tmp_path, value):
    with pytest.raises(tdstore.InvalidInputError,
                       match=r"verify_reads must be True, False or 'once', got"):
        tdstore.open(tmp_path / "s", verify_reads=value)
    assert not (tmp_path / "s").exists()


def _open_fds() -> set[str]:
    import gc
    import os

    gc.collect()
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
def test_a_store_keeps_data_open_while_open_and_not_after_close(tmp_path):
    """Reads open data/ once and keep it (not by its path each time); closing the store
    releases it: opening and closing a store many times leaks no descriptor."""
    path = tmp_path / "s"
    data = kv(8)
    with tdstore.open(path) as store:
        store.chunks("t").put("k", data)
    with tdstore.open(path) as store:  # what the first open of a process sets up
        store.chunks("t").get("k")
    before = _open_fds()
    for _ in range(50):
        with tdstore.open(path) as store:
            assert np.array_equal(store.chunks("t").get("k")[0], data)
    assert _open_fds() == before


def test_reads_racing_close_finish_or_fail_cleanly_and_leak_nothing(tmp_path):
    """A store closed while other threads read from it: each read returns the right
    bytes or raises a tdstore error, never reads through a descriptor closed under it
    (data/ stays open until the last read holding it is done)."""
    import threading

    path = tmp_path / "s"
    data = {f"k{i}": kv(8, seed=i) for i in range(8)}
    with tdstore.open(path) as store:
        for k, v in data.items():
            store.chunks("t").put(k, v)
    with tdstore.open(path) as store:  # what the first open of a process sets up
        store.chunks("t").get("k0")
    before = _open_fds()
    wrong: list[str] = []
    for _ in range(20):
        store = tdstore.open(path)
        chunks = store.chunks("t")
        start = threading.Barrier(5)

        def reader(chunks=chunks, start=start) -> None:
            start.wait()
            for k, v in data.items():
                try:
                    got = chunks.get(k)[0]
                except tdstore.TdStoreError:
                    continue
                except Exception as exc:  # anything else is the failure
                    wrong.append(f"{k}: {type(exc).__name__}: {exc}")
                    continue
                if not np.array_equal(got, v):
                    wrong.append(f"{k}: other bytes")

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        start.wait()
        store.close()
        for t in threads:
            t.join()
        store.close()  # what the reads after the first close opened again
        del store, chunks
    assert wrong == []
    assert _open_fds() == before


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork()")
def test_a_child_forked_from_a_process_whose_threads_read_reads_the_same_open_store(
        tmp_path):
    """Local stores work after fork(): a child forked from a process whose threads have
    been reading (and are not inside a tdstore call at the fork, see README "fork()")
    reads every chunk right through the store the parent opened, with the parent's
    data/ directory and new catalogue connections, while the parent goes on reading."""
    import faulthandler
    import os
    import threading

    path = tmp_path / "s"
    data = {f"k{i}": kv(4, seed=i) for i in range(20)}
    with tdstore.open(path) as store:
        for k, v in data.items():
            store.chunks("t").put(k, v)
    store = tdstore.open(path)
    chunks = store.chunks("t")
    parked, resume = threading.Barrier(3), threading.Barrier(3)

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while True:
                for _ in range(20):
                    chunks.get(f"k{rng.integers(20)}")
                parked.wait()  # out of tdstore while the main thread forks
                resume.wait()
        except threading.BrokenBarrierError:
            return

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    codes = []
    try:
        for _ in range(10):
            parked.wait()
            pid = os.fork()
            if pid == 0:  # the child: all 20 chunks right, or exit 3; stuck: exit 1
                code = 3
                try:
                    faulthandler.dump_traceback_later(60, exit=True)
                    if all(np.array_equal(chunks.get(k)[0], v) for k, v in data.items()):
                        code = 0
                except BaseException as exc:
                    os.write(2, f"child: {type(exc).__name__}: {exc}\n".encode())
                finally:
                    os._exit(code)
            resume.wait()  # the parent's threads read on while the child reads
            codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    finally:
        parked.abort()
        resume.abort()
        for t in threads:
            t.join()
        store.close()
    assert codes == [0] * 10


def _pages_cached(path) -> int:
    import os

    from tdstore.storage.arrays import _cachestat

    fd = os.open(path, os.O_RDONLY)
    try:
        st = _cachestat(fd)
        assert st is not None
        return int(st.nr_cache)
    finally:
        os.close(fd)


def _aligned(nbytes: int) -> np.ndarray:
    """A uint8 buffer at a page boundary (as LMCache's allocator gives)."""
    import mmap

    return np.frombuffer(mmap.mmap(-1, nbytes), np.uint8)


def _cachestat_missing() -> bool:
    import os

    from tdstore.storage.arrays import _cachestat

    fd = os.open(__file__, os.O_RDONLY)
    try:
        return _cachestat(fd) is None
    finally:
        os.close(fd)


needs_cachestat = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _cachestat_missing(),
    reason="direct_reads asks cachestat(2) (Linux 6.5+) what the page cache holds")


@needs_cachestat
@pytest.mark.parametrize("verify_reads", [False, True, "once"])
@pytest.mark.parametrize("n_blocks", [256, 257])  # a whole number of 4 KiB pages, and not
def test_direct_reads_read_a_chunk_not_in_the_page_cache_around_it(tmp_path, verify_reads,
                                                                   n_blocks):
    """direct_reads: a chunk not in the page cache is read straight into an aligned buffer
    (its pages stay out of the cache, but for the file's last page); one in the page
    cache is read from there; the bytes are the chunk's either way, and without
    direct_reads the same read fills the page cache."""
    from tdstore.dev.bench import drop_page_cache

    path = tmp_path / "s"
    data = kv(n_blocks, block=(4, 16))  # 256 bytes a block
    with tdstore.open(path) as store:
        store.chunks("t").put("k", data)
    (chunk,) = (path / "data").glob("*/m-*/c.*")
    pages = -(-chunk.stat().st_size // 4096)
    for direct in (True, False):
        with tdstore.open(path, verify_reads=verify_reads, direct_reads=direct) as store:
            for _ in range(2):  # ("once": a second read of a version checked before)
                drop_page_cache(chunk)
                buf = _aligned(data.nbytes)
                store.chunks("t").read_into("k", buf)
                assert np.array_equal(buf.view(data.dtype).reshape(data.shape), data)
                cached = _pages_cached(chunk)
                assert (cached <= 2) if direct else (cached == pages), (direct, cached, pages)
            if direct:  # all of it in the page cache: read from there, left there
                chunk.read_bytes()
                buf = _aligned(data.nbytes)
                store.chunks("t").read_into("k", buf)
                assert np.array_equal(buf.view(data.dtype).reshape(data.shape), data)
                assert _pages_cached(chunk) == pages


@needs_cachestat
@pytest.mark.parametrize("verify_reads", [True, "once"])
def test_direct_reads_find_a_damaged_byte(tmp_path, verify_reads):
    """A flipped byte in a chunk read with O_DIRECT fails its checksum, every time."""
    from tdstore.dev.bench import drop_page_cache

    path = tmp_path / "s"
    data = kv(256, block=(4, 16))
    with tdstore.open(path) as store:
        store.chunks("t").put("k", data)
    (chunk,) = (path / "data").glob("*/m-*/c.*")
    raw = bytearray(chunk.read_bytes())
    raw[5000] ^= 0x08
    chunk.write_bytes(bytes(raw))
    with tdstore.open(path, verify_reads=verify_reads, direct_reads=True) as store:
        for _ in range(2):
            drop_page_cache(chunk)
            with pytest.raises(tdstore.CorruptionError, match="fails its crc32c checksum"):
                store.chunks("t").read_into("k", _aligned(data.nbytes))
            assert _pages_cached(chunk) <= 2  # (it was read around the page cache)


@needs_cachestat
def test_direct_reads_into_an_unaligned_buffer_read_through_the_page_cache(tmp_path):
    from tdstore.dev.bench import drop_page_cache

    path = tmp_path / "s"
    data = kv(256, block=(4, 16))
    with tdstore.open(path) as store:
        store.chunks("t").put("k", data)
    (chunk,) = (path / "data").glob("*/m-*/c.*")
    with tdstore.open(path, verify_reads=True, direct_reads=True) as store:
        drop_page_cache(chunk)
        buf = _aligned(data.nbytes + 64)[64:]  # 64 bytes past a page boundary
        store.chunks("t").read_into("k", buf)
        assert np.array_equal(buf.view(data.dtype).reshape(data.shape), data)
        assert _pages_cached(chunk) == -(-chunk.stat().st_size // 4096)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_direct_reads_takes_true_or_false(tmp_path, value):
    with pytest.raises(tdstore.InvalidInputError,
                       match=r"direct_reads must be True or False, got"):
        tdstore.open(tmp_path / "s", direct_reads=value)
    assert not (tmp_path / "s").exists()


def test_direct_reads_are_refused_for_an_object_store_location():
    with pytest.raises(tdstore.InvalidInputError,
                       match=r"store s3://bucket/kv: direct_reads is for a store directory"):
        tdstore.open("s3://bucket/kv", url="postgresql+psycopg://u@127.0.0.1:9/x",
                     direct_reads=True)
