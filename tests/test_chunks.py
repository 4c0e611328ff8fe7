"""Keyed chunks (Store.chunks): arrays stored, found and removed by a string key, with
every guarantee agents have, on every backend."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import Backend
from sqlalchemy import select

import tdstore
from tdstore.storage.catalog import AgentRow, GroupRow

KEYS = ["model@1@0@-520fcff2946d4d52@half", "model@1@0@3f1a@half", "model@1@0@77@half"]


def chunk(seed: int, tokens: int = 256, dtype=ml_dtypes.bfloat16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, 4, tokens, 64), np.float32).astype(dtype)


def flip(backend, rel: str, at: int, mask: int) -> int:
    """XOR byte ``at`` of the chunk file of the array ``rel`` with ``mask``, directly in
    the stored file; returns the file's size."""
    name = next(k for k in backend.files() if k.startswith(rel + "/c."))
    raw = bytearray(backend.read(name))
    raw[at] ^= mask
    backend.write(name, bytes(raw))
    return len(raw)


def test_chunks_round_trip_bit_exact_with_their_metadata(backend):
    with backend.open() as store:
        c = store.chunks("lmcache")
        assert c.put(KEYS[0], chunk(0), fmt="KV_2LTD")
        assert not c.put(KEYS[0], chunk(0), fmt="KV_2LTD")  # a key names its content
        c.put(KEYS[1], chunk(1, tokens=232), fmt="KV_2LTD")  # a last, partial chunk
        c.put(KEYS[2], chunk(2, dtype=np.float16))
    with backend.open() as store:  # a new open: found, bit-exact
        c = store.chunks("lmcache")
        assert sorted(c.keys()) == sorted(KEYS)
        for i, k in enumerate(KEYS):
            got, meta = c.get(k)
            want = chunk(i, tokens=232 if i == 1 else 256,
                         dtype=np.float16 if i == 2 else ml_dtypes.bfloat16)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert got.tobytes() == want.tobytes()
        assert meta["fmt"] is None and c.meta(KEYS[0])["fmt"] == "KV_2LTD"
        assert c.count_present(KEYS) == 3
        assert c.count_present([KEYS[0], "model@1@0@missing@half", KEYS[1]]) == 1
        assert c.remove(KEYS[1]) and not c.remove(KEYS[1])
        assert not c.contains(KEYS[1]) and c.count_present(KEYS) == 1
        with pytest.raises(tdstore.NotFoundError, match="chunk 'model@1@0@3f1a@half'"):
            c.get(KEYS[1])
        assert store.verify().ok
        assert f"lmcache:{KEYS[0]}" in store.groups()


def test_a_damaged_chunk_is_an_error_never_wrong_bytes(backend):
    with backend.open() as store:
        c = store.chunks()
        c.put(KEYS[0], chunk(0))
        rel = backend.array_of(store, f"chunk:{KEYS[0]}", "chunk")
    flip(backend, rel, 100, 0x01)
    # (on object storage the host's chunk cache still holds the intact copy, and would
    # rightly serve it: read past it, from the damaged object)
    no_cache = {"cache_max_bytes": 0} if backend.kind == "s3" else {}
    with backend.open(verify_reads=True, **no_cache) as store:
        with pytest.raises(tdstore.CorruptionError):
            store.chunks().get(KEYS[0])
        assert not store.verify().ok


def damage_attrs(store, key: str, change) -> None:
    """Rewrite the attributes recorded with chunk ``key`` in the catalogue, as damage to
    the row would (the store's own API never writes them so)."""
    with store.catalog.write() as s:
        row = s.scalars(select(AgentRow).join(GroupRow, AgentRow.group_id == GroupRow.id)
                        .where(GroupRow.name == f"lmcache:{key}")).one()
        row.attrs = change(dict(row.attrs))


@pytest.mark.parametrize("change", [
    pytest.param(lambda m: {**m, "shape": [2, 4, 254, 64]}, id="shape"),
    pytest.param(lambda m: {**m, "dtype": "float16"}, id="dtype-same-itemsize"),
    pytest.param(lambda m: {**m, "fmt": "KV_2LTE"}, id="format"),
    pytest.param(lambda m: {**m, "shapes": [[2, 4, 256, 65]]}, id="caller-attribute"),
])
def test_damaged_recorded_attributes_are_a_miss_never_misread_bytes(backend, change):
    with backend.open() as store:
        c = store.chunks("lmcache")
        for i in range(2):
            c.put(KEYS[i], chunk(i), fmt="KV_2LTD", attrs={"shapes": [[2, 4, 256, 64]]})
        damage_attrs(store, KEYS[1], change)
    with backend.open() as store:
        c = store.chunks("lmcache")
        for read in (c.get, c.meta):
            with pytest.raises(tdstore.CorruptionError, match="fail their crc32c checksum"):
                read(KEYS[1])
        asked = []

        def buffer(i, meta):
            asked.append(meta)
            return np.empty(chunk(0).nbytes, np.uint8)

        assert c.read_many(KEYS[:2], buffer) == 1 and len(asked) == 1
        assert c.get(KEYS[0])[0].tobytes() == chunk(0).tobytes()
        report = store.verify()
        assert [(f.kind, f.group) for f in report.findings] == [
            ("bad-row", f"lmcache:{KEYS[1]}")], report.findings
        assert "attributes" in report.findings[0].detail


def test_chunk_rows_renamed_in_the_catalogue_are_misses_never_each_others_bytes(backend):
    """Two chunks' group names swapped in the catalogue, and a third renamed to a key
    never stored: each row names the group and agent it was stored for inside its seal,
    so every one is a miss (never the other chunk's bytes) and verify names them."""
    with backend.open() as store:
        c = store.chunks("lmcache")
        for i in range(3):
            c.put(KEYS[i], chunk(i), fmt="KV_2LTD")
        with store.catalog.write() as s:
            rows = {g.name: g for g in s.scalars(select(GroupRow))}
            a, b, third = (rows[f"lmcache:{k}"] for k in KEYS)
            a.name, b.name, third.name = "swap", f"lmcache:{KEYS[0]}", "lmcache:never-stored"
            s.flush()
            a.name = f"lmcache:{KEYS[1]}"
    with backend.open() as store:
        c = store.chunks("lmcache")
        for key in (KEYS[0], KEYS[1], "never-stored"):
            for read in (c.get, c.meta):
                with pytest.raises(tdstore.CorruptionError, match="renamed or moved"):
                    read(key)
        assert c.read_many([KEYS[0]], lambda i, m: np.empty(chunk(0).nbytes, np.uint8)) == 0
        report = store.verify()
        assert sorted((f.kind, f.group) for f in report.findings) == sorted(
            ("bad-row", f"lmcache:{k}") for k in (KEYS[0], KEYS[1], "never-stored"))
        assert all("was stored as" in f.detail for f in report.findings)


def test_a_chunk_row_whose_seal_was_removed_is_a_miss(store):
    """Attributes that name their owner are always sealed: without the seal (removed so
    that a swap of names would pass) the row is damaged."""
    c = store.chunks("lmcache")
    c.put(KEYS[0], chunk(0), fmt="KV_2LTD")
    with store.catalog.write() as s:
        row = s.scalars(select(AgentRow)).one()
        row.attrs = {k: v for k, v in row.attrs.items() if k != "attrs_crc32c"}
    c = store.chunks("lmcache")
    with pytest.raises(tdstore.CorruptionError, match="have lost their checksum"):
        c.meta(KEYS[0])
    assert [f.kind for f in store.verify().findings] == ["bad-row"]


def test_attributes_come_back_as_given_without_their_checksum(store):
    g = store.group("g")
    g.register_master("a", np.zeros((4, 8), np.float32), attrs={"tokens": [1, 2, 3], "é": 1.5})
    assert g.attrs("a") == {"tokens": [1, 2, 3], "é": 1.5}
    c = store.chunks()
    c.put("k", chunk(0), fmt="F", attrs={"n": 1})
    assert c.meta("k") == {"shape": [2, 4, 256, 64], "dtype": "bfloat16", "fmt": "F", "n": 1}
    for own in ("attrs_crc32c", "attrs_owner"):
        with pytest.raises(tdstore.InvalidInputError, match=f"attrs key '{own}' is tdstore"):
            g.register_mirror("b", np.zeros((4, 8), np.float32), attrs={own: 0})
    assert g.agents() == ["a"]


def test_the_budget_evicts_old_chunks_whole_and_never_the_new_one(backend):
    one = chunk(0).nbytes
    budget = int(3.5 * one)
    with backend.open(max_bytes=budget) as store:
        c = store.chunks()
        for i in range(8):
            c.put(f"k{i}", chunk(i))
            assert c.contains(f"k{i}")  # the chunk just written survives its own write
            assert store.accounted_bytes() <= budget and backend.data_bytes() <= budget
        kept = c.keys()
        assert 1 <= len(kept) <= 3 and "k7" in kept
        for k in kept:  # what is left reads back exactly; what went, went whole
            assert c.get(k)[0].tobytes() == chunk(int(k[1:])).tobytes()
        leading = next((i for i in range(8) if f"k{i}" not in kept), 8)
        assert c.count_present([f"k{i}" for i in range(8)]) == leading
        assert store.verify().ok


def test_bad_keys_and_arrays_are_refused(store):
    c = store.chunks()
    for bad in ("", "a/b", "\0", 5):
        with pytest.raises(tdstore.InvalidInputError):
            c.put(bad, chunk(0))
    with pytest.raises(tdstore.InvalidInputError, match="expected a numpy.ndarray"):
        c.put("k", [1, 2, 3])
    with pytest.raises(tdstore.InvalidInputError):
        c.put("k", np.zeros((2, 3), np.int64))
    with pytest.raises(tdstore.InvalidInputError, match="':'"):
        store.chunks("a:b")
    assert store.groups() == []


def test_chunks_shared_by_position_store_only_what_differs(backend):
    base = chunk(0)
    with backend.open() as store:
        c = store.chunks("lmcache")
        c.put("a@0", base, share=("rag", 0))  # the first becomes the position's master
        same = base.copy()
        c.put("b@0", same, share=("rag", 0))  # identical: no block stored
        diverged = base.copy()
        diverged[:, :, 200:] = chunk(9)[:, :, 200:]  # the last 56 tokens differ
        c.put("c@0", diverged, share=("rag", 0))
        c.put("a@1", chunk(1), share=("rag", 1))  # another position: its own master
        for k, want in (("a@0", base), ("b@0", same), ("c@0", diverged), ("a@1", chunk(1))):
            assert c.get(k)[0].tobytes() == want.tobytes()
        assert c.count_present(["a@0", "b@0", "c@0", "a@1"]) == 4
        g = store.group("lmcache-shared:rag:0:2x4x256x64:bfloat16", create=False)
        st = g.stats()
        assert st["n_mirrors"] == 2
        # 16-token blocks: tokens 200-255 fall in 4 blocks per (k/v, layer) row
        assert st["diff_blocks_total"] == 0 + 2 * 4 * 4
        assert c.remove("b@0") and c.get("c@0")[0].tobytes() == diverged.tobytes()
        assert c.remove("a@0")  # the master: its position's chunks go with it
        assert c.count_present(["c@0"]) == 0 and c.contains("a@1")
        assert store.verify().ok


def test_namespaces_are_apart_even_when_their_names_are_like_patterns(store):
    """A namespace's shared chunks are found by a name pattern; ``_`` and ``%`` in a
    namespace are letters there, not wildcards."""
    store.chunks("axb").put("k", chunk(0), share=("g", 0))
    store.chunks("a%b").put("k2", chunk(1), share=("g", 0))
    for ns in ("a_b", "a%b"):
        assert store.chunks(ns).count_present(["k"]) == 0
    assert store.chunks("a_b").count_present(["k2"]) == 0
    assert store.chunks("axb").contains("k") and store.chunks("a%b").contains("k2")
    assert store.chunks("axb").keys() == ["k"]


def test_read_many_stops_at_the_first_unreadable_chunk_however_they_are_read(backend):
    """Chunks are read at once; what comes back is still every chunk before the first
    one that cannot be read, each bit-exact, and nothing is claimed after it."""
    arrays = {f"k{i}": chunk(i) for i in range(6)}
    with backend.open() as store:
        c = store.chunks()
        for k, a in arrays.items():
            c.put(k, a)
        rel = backend.array_of(store, "chunk:k3", "chunk")
    flip(backend, rel, 100, 0xFF)  # the 4th chunk's data: the checks of every read catch it
    keys = list(arrays)
    bufs = [np.zeros(a.nbytes, np.uint8) for a in arrays.values()]
    no_cache = {"cache_max_bytes": 0} if backend.kind == "s3" else {}
    with backend.open(verify_reads=True, **no_cache) as store:
        assert store.chunks().read_many(keys, lambda i, meta: bufs[i]) == 3
    for i in range(3):
        assert bufs[i].tobytes() == arrays[keys[i]].view(np.uint8).tobytes()


@pytest.mark.parametrize("where", ["first-byte", "second-piece", "last-piece", "last-byte",
                                   "trailer"])
def test_a_flipped_byte_anywhere_in_a_large_chunk_is_a_miss(tmp_path, where):
    """A chunk larger than the pieces its checksum is computed over as it is read: one
    flipped bit in any piece, or in the stored checksum, makes the chunk a miss; the
    chunks before it in the batch come back bit-exact, and so do the ones after it when
    read on their own."""
    from tdstore.storage.arrays import CHECKED_PIECE

    arrays = {f"k{i}": chunk(i, tokens=256).repeat(14, axis=3) for i in range(4)}
    size = arrays["k0"].nbytes  # 3.5 MiB: three whole pieces and a part of one
    assert size > 3 * CHECKED_PIECE and size % CHECKED_PIECE
    backend = Backend("local", tmp_path)
    with backend.open() as store:
        c = store.chunks()
        for k, a in arrays.items():
            c.put(k, a)
        rel = backend.array_of(store, "chunk:k2", "chunk")
    at = {"first-byte": 0, "second-piece": CHECKED_PIECE + 12345,
          "last-piece": 3 * CHECKED_PIECE + 99, "last-byte": size - 1,
          "trailer": size + 2}[where]
    assert flip(backend, rel, at, 0x10) == size + 4
    keys = list(arrays)
    bufs = [np.zeros(size, np.uint8) for _ in keys]
    with backend.open(verify_reads=True) as store:
        c = store.chunks()
        assert c.read_many(keys, lambda i, meta: bufs[i]) == 2
        with pytest.raises(tdstore.CorruptionError, match="checksum"):
            c.get("k2")
        assert c.read_many(["k3"], lambda i, meta: bufs[3]) == 1
    for i in (0, 1, 3):
        assert bufs[i].tobytes() == arrays[keys[i]].view(np.uint8).tobytes()


def test_read_many_of_own_and_shared_chunks_in_one_batch(store):
    """A batch mixing chunks of their own with chunks stored against a sharing group's
    (read by different paths) comes back in order, bit-exact; a missing one ends it."""
    base = chunk(50)
    other = base.copy()
    other[:, :, 200:] += 1  # differs in its last tokens only
    c = store.chunks()
    c.put("own0", chunk(51))
    c.put("a0", base, share=("pipeline", 0))
    c.put("b0", other, share=("pipeline", 0))  # a mirror of a0
    c.put("own1", chunk(52))
    want = {"own0": chunk(51), "a0": base, "b0": other, "own1": chunk(52)}
    keys = ["b0", "own0", "a0", "own1", "b0"]
    bufs = [np.zeros(base.nbytes, np.uint8) for _ in keys]
    assert c.read_many(keys, lambda i, meta: bufs[i]) == 5
    for k, b in zip(keys, bufs, strict=True):
        assert b.tobytes() == want[k].view(np.uint8).tobytes()
    bufs = [np.zeros(base.nbytes, np.uint8) for _ in keys]
    assert c.read_many(["own0", "b0", "missing", "a0"], lambda i, meta: bufs[i]) == 2
    assert bufs[3].tobytes() == bytes(base.nbytes)  # nothing read past the miss


OTHER_PROCESS = """
import sys, numpy as np, tdstore
location, url = sys.argv[1], sys.argv[2] or None
with tdstore.open(location, url=url) as store:
    c = store.chunks()
    c.put("k2", np.full((2, 4, 256, 64), 2, np.float16))
    assert c.remove("k0")
"""


def test_lookups_see_what_another_process_committed_since(backend):
    """What a lookup found may be kept for the next one, never past a commit: after
    another process stored one chunk and removed another, the next lookups of this
    process (same open store) find the new chunk and miss the removed one."""
    import subprocess
    import sys

    arrays = {f"k{i}": np.full((2, 4, 256, 64), i, np.float16) for i in range(3)}
    with backend.open() as store:
        c = store.chunks()
        c.put("k0", arrays["k0"])
        c.put("k1", arrays["k1"])
        for _ in range(2):  # looked up twice: the second may be answered as kept
            assert c.count_present(["k0", "k1", "k2"]) == 2 and not c.contains("k2")
        proc = subprocess.run([sys.executable, "-c", OTHER_PROCESS, backend.location(),
                               backend.url() or ""], env=backend.env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert not c.contains("k0") and c.count_present(["k1", "k2"]) == 2
        bufs = [np.zeros(arrays["k1"].nbytes, np.uint8) for _ in range(3)]
        assert c.read_many(["k1", "k2", "k0"], lambda i, meta: bufs[i]) == 2
        assert bufs[1].tobytes() == arrays["k2"].view(np.uint8).tobytes()
        with pytest.raises(tdstore.NotFoundError):
            c.get("k0")
        with backend.open() as other:  # another handle in this process: also a commit
            assert other.chunks().remove("k1")
        assert c.count_present(["k1", "k2"]) == 0 and c.contains("k2")


def test_a_forked_child_sees_the_parents_later_commits(tmp_path):
    """A child forked after lookups were kept counts commits on its own connection."""
    import os

    with tdstore.open(tmp_path / "store") as store:
        c = store.chunks()
        c.put("k0", np.zeros((2, 4, 256, 64), np.float16))
        assert c.contains("k0") and c.contains("k0")
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: waits for the parent's removal, then looks up
            code = 1
            try:
                os.close(go_w)
                os.read(go_r, 1)
                code = 0 if not c.contains("k0") else 3
            finally:
                os._exit(code)
        os.close(go_r)
        assert c.remove("k0")
        os.write(go_w, b"x")
        os.close(go_w)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def test_read_into_takes_only_a_buffer_its_bytes_can_go_into(tmp_path):
    """A buffer of the right size that is not C-contiguous (a reshape of it would be a
    copy, and the bytes would go there) or not writable is refused, naming the chunk;
    the wrong size or dtype too. A right one gets the chunk's bytes."""
    a = chunk(1)
    with tdstore.open(tmp_path / "s") as store:
        c = store.chunks("t")
        c.put("k", a)
        n = a.nbytes
        bad = {"Fortran order": np.asfortranarray(np.zeros((n // 64, 64), np.uint8)),
               "every other byte": np.zeros(2 * n, np.uint8)[::2],
               "read-only": np.frombuffer(bytes(n), np.uint8)}
        for what, buf in bad.items():
            with pytest.raises(tdstore.InvalidInputError,
                               match="chunk 'k': the buffer must be writable and "
                                     "C-contiguous"):
                c.read_into("k", buf)
            assert not buf.any(), what
        for buf in (bytearray(n), memoryview(bytearray(n))):
            with pytest.raises(tdstore.InvalidInputError,
                               match="chunk 'k': the buffer must be a numpy uint8 array, got"):
                c.read_into("k", buf)
        with pytest.raises(tdstore.InvalidInputError, match=f"expected {n} uint8"):
            c.read_into("k", np.zeros(n, np.uint16))
        buf = np.zeros((n // 64, 64), np.uint8)
        c.read_into("k", buf)
        assert buf.tobytes() == a.tobytes()
