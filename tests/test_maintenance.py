"""verify / repair / gc / compact / rebase / export / import, through the library."""

from __future__ import annotations

import hashlib

import conftest
import ml_dtypes
import numpy as np
import pytest
from conftest import kv

import tdstore


@pytest.fixture
def rag(backend):
    """A store 's' with group 'rag': a master of 16 blocks (chunks of 4) and three
    mirrors; returns the backend it is on."""
    with backend.open("s") as store:
        g = store.group("rag", chunk_blocks=4)
        master = kv(16)
        g.register_master("retriever", master)
        for i, name in enumerate(["reranker", "critic", "responder"]):
            x = master.copy()
            x[-(i + 2):] = kv(i + 2, seed=10 + i)
            g.register_mirror(name, x)
    return backend


def fingerprint(backend, name: str = "s") -> tuple[dict, dict]:
    """Everything a store holds, read directly (not through tdstore): every catalogue
    row and every data file's (object's) content hash."""
    if backend.kind == "local":
        return conftest.fingerprint(backend.tmp / name)
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(backend.url(name))
    try:
        with engine.connect() as con:
            rows = {t: sorted(map(repr, con.execute(text(f'SELECT * FROM "{t}"'))))
                    for t in inspect(con).get_table_names()}
    finally:
        engine.dispose()
    files = {rel: hashlib.sha256(backend.read(rel, name)).hexdigest()
             for rel in sorted(backend.files(name))}
    return rows, files


def test_a_clean_store_verifies_clean(rag):
    with rag.open("s") as store:
        report = store.verify()
    assert report.ok and report.agents_checked == 4 and report.chunks_checked == 4 + 3


def test_verify_reports_a_flipped_byte_with_group_agent_and_blocks(rag):
    with rag.open("s") as store:
        chunk = f"{rag.array_of(store, 'rag', 'retriever')}/c.2.0.0"
        data = bytearray(rag.read(chunk, "s"))
        data[3] ^= 0x40
        rag.write(chunk, bytes(data), "s")
        (f,) = store.verify().findings
    assert (f.kind, f.group, f.agent, f.blocks) == ("checksum", "rag", "retriever", "blocks 8-11")
    assert "crc32c" in f.detail and f.path == f"data/{chunk}"


def test_verify_reports_a_truncated_chunk(rag):
    with rag.open("s") as store:
        chunk = f"{rag.array_of(store, 'rag', 'critic')}/c.0.0.0"
        rag.write(chunk, rag.read(chunk, "s")[:100], "s")
        (f,) = store.verify().findings
    assert (f.kind, f.group, f.agent) == ("truncated-chunk", "rag", "critic")
    assert "has 100 bytes, expected" in f.detail and f.path == f"data/{chunk}"


def test_verify_reports_a_deleted_chunk(rag):
    with rag.open("s") as store:
        chunk = f"{rag.array_of(store, 'rag', 'retriever')}/c.3.0.0"
        rag.delete(chunk, "s")
        (f,) = store.verify().findings
    assert (f.kind, f.agent, f.blocks) == ("missing-chunk", "retriever", "blocks 12-15")
    assert f.path == f"data/{chunk}"


def test_verify_reports_an_orphaned_array_and_gc_removes_it(rag):
    with rag.open("s") as store:
        src = rag.array_of(store, "rag", "critic")
        copy = f"{src.rsplit('/', 1)[0]}/d-0123456789abcdef"
        files = [rel for rel in rag.files("s") if rel.startswith(src + "/")]
        assert files
        for rel in files:  # a copy of every file (object) of the array, at a new path
            rag.write(copy + rel[len(src):], rag.read(rel, "s"), "s")
        (f,) = store.verify().findings
        assert (f.kind, f.group, f.path) == ("orphan-array", "rag", f"data/{copy}")
        assert f.nbytes == sum(rag.files("s")[rel] for rel in files)
        assert store.info()["reclaimable_bytes"] == f.nbytes
        dry = store.gc(dry_run=True)
        assert dry.removed == [f.path] and rag.exists(copy, "s")
        done = store.gc()
        assert done.freed_bytes == f.nbytes and not rag.exists(copy, "s")
        assert rag.exists(src, "s")
        assert store.verify().ok


def test_gc_removes_what_interrupted_writes_leave(rag):
    with rag.open("s") as store:
        arr = rag.array_of(store, "rag", "retriever")
        rag.write(f"{arr}/c.0.0.0.tmp-deadbeef", b"half a chunk", "s")
        rag.write(f"{arr}/c.9.0.0", b"a chunk past the committed length", "s")
        if rag.kind == "s3":  # an object store has no empty directories: a stray object
            rag.write("00ff00ff00ff00ff/m-1/c.0.0.0", b"a chunk of no group", "s")
        else:
            (rag.tmp / "s" / "data" / "00ff00ff00ff00ff" / "m-1").mkdir(parents=True)
        kinds = sorted(f.kind for f in store.verify().findings)
        assert kinds == ["orphan-file", "orphan-file", "orphan-group"]
        assert len(store.gc().removed) == 3
        assert store.verify().ok
        assert not rag.exists("00ff00ff00ff00ff", "s")
        if rag.kind != "s3":
            assert not (rag.tmp / "s" / "data" / "00ff00ff00ff00ff").exists()
        assert not rag.exists(f"{arr}/c.9.0.0", "s")
        assert not rag.exists(f"{arr}/c.0.0.0.tmp-deadbeef", "s")
        assert np.array_equal(store.group("rag").reconstruct("retriever"), kv(16))


def test_repair_quarantines_only_the_damaged_agent(rag):
    with rag.open("s") as store:
        g = store.group("rag")
        healthy = {a: g.reconstruct(a) for a in ("reranker", "responder", "retriever")}
        chunk = f"{rag.array_of(store, 'rag', 'critic')}/c.0.0.0"
        rag.write(chunk, b"\0" + rag.read(chunk, "s")[1:], "s")
        report = store.verify(repair=True)
        assert report.repaired == ["quarantined group 'rag' agent 'critic'"]
        with pytest.raises(tdstore.CorruptionError, match="agent 'critic' is quarantined"):
            g.reconstruct("critic")
        for a, expected in healthy.items():
            assert np.array_equal(g.reconstruct(a), expected)
        fixed = kv(16)
        fixed[-3:] = kv(3, seed=11)
        g.register_mirror("critic", fixed)  # re-registering heals it
        assert np.array_equal(g.reconstruct("critic"), fixed)
        assert store.verify().ok


def test_a_quarantined_master_is_restored_by_re_registering_it(rag):
    with rag.open("s") as store:
        g = store.group("rag")
        critic = g.reconstruct("critic")
        rag.delete(f"{rag.array_of(store, 'rag', 'retriever')}/c.1.0.0", "s")
        store.verify(repair=True)
        with pytest.raises(tdstore.CorruptionError, match="'retriever' is quarantined"):
            g.reconstruct("critic")  # a mirror needs its master
        g.register_master("retriever", kv(16))
        assert np.array_equal(g.reconstruct("critic"), critic)
        assert store.verify().ok


def test_no_mirror_is_stored_against_a_quarantined_master(rag):
    """A quarantined master's values may not be what was stored: a mirror diffed
    against them would come back wrong once the master is restored. Refused, naming the
    master, and nothing changes until it is re-registered."""
    with rag.open("s") as store:
        g = store.group("rag")
        chunk = f"{rag.array_of(store, 'rag', 'retriever')}/c.0.0.0"
        rag.write(chunk, b"\0" + rag.read(chunk, "s")[1:], "s")
        store.verify(repair=True)
        with pytest.raises(tdstore.CorruptionError,
                           match="the group's master 'retriever' is quarantined"):
            g.register_mirror("newcomer", kv(16, seed=5))
        assert "newcomer" not in g.agents()
        g.register_master("retriever", kv(16))
        g.register_mirror("newcomer", kv(16, seed=5))
        assert np.array_equal(g.reconstruct("newcomer"), kv(16, seed=5))
        assert store.verify().ok


def test_a_group_with_a_quarantined_master_can_be_discarded_and_only_then(rag):
    with rag.open("s") as store:
        assert not store.discard_quarantined_group("rag")  # healthy: left alone
        chunk = f"{rag.array_of(store, 'rag', 'retriever')}/c.0.0.0"
        rag.write(chunk, b"\0" + rag.read(chunk, "s")[1:], "s")
        store.verify(repair=True)
        assert store.discard_quarantined_group("rag")
        assert "rag" not in store and store.verify().ok
        with pytest.raises(tdstore.NotFoundError):
            store.discard_quarantined_group("rag")


def test_a_quarantined_master_is_restored_only_with_its_own_values(rag):
    """Its mirrors were stored against its lost values: re-registering it with those
    values (its recorded checksums) heals the group; with any other values they would
    reconstruct to what was never written for them, so that is refused."""
    with rag.open("s") as store:
        g = store.group("rag")
        want = {a: g.reconstruct(a) for a in ("reranker", "critic", "responder")}
        chunk = f"{rag.array_of(store, 'rag', 'retriever')}/c.1.0.0"
        data = bytearray(rag.read(chunk, "s"))
        data[5] ^= 0x01
        rag.write(chunk, bytes(data), "s")
        store.verify(repair=True)
        other = kv(16)
        other[2] += 1  # (block 2 lies in the damaged chunk 0; any block would do)
        with pytest.raises(tdstore.StateError, match="the master is quarantined"):
            g.register_master("retriever", other)
        with pytest.raises(tdstore.CorruptionError):  # still read through it
            g.reconstruct("critic")
        g.register_master("retriever", kv(16))
        assert all(np.array_equal(g.reconstruct(a), x) for a, x in want.items())
        assert store.verify().ok


@pytest.mark.parametrize("rewrite", ["compact", "rebase", "register_master"])
def test_a_rewrite_never_copies_a_damaged_chunk(rag, rewrite):
    """compact, rebase and re-registering the master read every agent and write it anew
    with checksums of its own: a flipped bit they copied unchecked (reads check only
    with verify_reads) would become wrong values that verify calls clean. They check
    every chunk they copy: the rewrite is refused naming it, and the store is as it
    was, damage and all, for verify --repair to find."""
    with rag.open("s") as store:
        chunk = f"{rag.array_of(store, 'rag', 'retriever')}/c.1.0.0"
    data = bytearray(rag.read(chunk, "s"))
    data[9] ^= 0x10
    rag.write(chunk, bytes(data), "s")
    before = fingerprint(rag)
    with rag.open("s") as store:
        g = store.group("rag")
        with pytest.raises(tdstore.CorruptionError, match="crc32c"):
            if rewrite == "compact":
                g.compact()
            elif rewrite == "rebase":
                g.rebase(master="critic")
            else:
                g.register_master("retriever", kv(16, seed=3))
    assert fingerprint(rag) == before
    with rag.open("s") as store:
        (finding,) = store.verify().findings
        assert finding.agent == "retriever" and finding.kind.is_damage


def test_verify_reports_index_rows_out_of_range(rag):
    rag.sql("UPDATE diff_blocks SET block_index = 99 WHERE slot = 0 AND agent_id = "
            "(SELECT id FROM agents WHERE name = 'critic')", "s")
    with rag.open("s") as store:
        (f,) = store.verify().findings
    assert (f.kind, f.agent) == ("bad-index", "critic") and "outside 0..15" in f.detail


def test_compact_removes_append_padding_and_keeps_every_agent(backend):
    with backend.open("s") as store:
        g = store.group("g")
        g.register_master("m", kv(64, (64, 64)))
        g.register_mirror("a", kv(64, (64, 64), seed=1))
        for i in range(3):
            g.collective_reuse_step(["m", "a"], kv(1, (64, 64), seed=20 + i))
        before = {a: g.reconstruct(a) for a in g.agents()}
        result = g.compact()
        assert result["bytes_after"] < result["bytes_before"]
        for a, expected in before.items():
            assert np.array_equal(g.reconstruct(a), expected)
        assert store.verify().ok


def test_rebase_auto_picks_the_agent_that_minimises_the_diff(backend):
    with backend.open("s") as store:
        g = store.group("g", diff_threshold=0.0)
        common = kv(20)
        outlier = common.copy()
        outlier[:10] = kv(10, seed=5)  # 10 blocks off everyone else
        g.register_master("outlier", outlier)
        agents = {"outlier": outlier}
        for i in range(4):
            x = common.copy()
            x[19 - i] = kv(1, seed=30 + i)[0]
            agents[f"a{i}"] = x
            g.register_mirror(f"a{i}", x)
        before = g.stats()["diff_blocks_total"]
        result = g.rebase()
        assert result["master"] != "outlier" and result["diff_blocks_after"] < before
        assert g.master_id == result["master"]
        for name, x in agents.items():
            assert np.array_equal(g.reconstruct(name), x)
        g.rebase("outlier")
        assert g.master_id == "outlier" and g.stats()["diff_blocks_total"] == before
        with pytest.raises(tdstore.NotFoundError):
            g.rebase("ghost")


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_export_and_import_round_trip(backend, tmp_path, suffix, dtype):
    with backend.open("s") as store:
        g = store.group("g")
        master = kv(8, dtype=dtype)
        mirror = master.copy()
        mirror[5] = kv(1, dtype=dtype, seed=3)[0]
        g.register_master("m", master)
        g.register_mirror("a", mirror)
        file = tmp_path / f"a{suffix}"
        info = g.export("a", file)
        assert info["dtype"] == dtype and file.exists()
        h = store.group("h")
        raw_bits = suffix == ".npy" and dtype == "bfloat16"
        h.import_file("m", file,
                      dtype=dtype if raw_bits else None)
        back = h.reconstruct("m")
        assert back.dtype == np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
        assert np.array_equal(back.view(np.uint8), mirror.view(np.uint8))
        result = g.import_file("b", file, dtype=dtype if raw_bits else None)
        assert result == {"group": "g", "agent": "b", "role": "mirror", "blocks": 8,
                          "diff_blocks": 1, "removed": []}


def test_import_of_a_bad_file_is_refused_and_store_unchanged(backend, tmp_path):
    with backend.open("s") as store:
        store.group("g").register_master("m", kv(4))
    before = fingerprint(backend)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    (tmp_path / "x.txt").write_text("hello")
    with backend.open("s") as store:
        g = store.group("g")
        with pytest.raises(tdstore.InvalidInputError, match="junk.npy cannot be read"):
            g.import_file("a", tmp_path / "junk.npy")
        with pytest.raises(tdstore.InvalidInputError, match="expected a .npy or .safetensors"):
            g.import_file("a", tmp_path / "x.txt")
        with pytest.raises(tdstore.NotFoundError, match="does not exist"):
            g.import_file("a", tmp_path / "missing.npy")
        with pytest.raises(tdstore.InvalidInputError, match="expected a .npy or .safetensors"):
            g.export("m", tmp_path / "out.csv")
    assert fingerprint(backend) == before
