"""Stores on S3-compatible object storage (a real moto server on 127.0.0.1) with a
PostgreSQL catalogue: layout, the chunk cache, refusals, faults, several hosts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from conftest import bits, kv

import tdstore


def _loc(bucket: str, name: str = "p") -> str:
    return f"s3://{bucket}/{name}"


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tdstore", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def _fill(store, n_mirrors: int = 3, blocks: int = 40) -> dict[str, np.ndarray]:
    g = store.group("rag", chunk_blocks=8)
    master = kv(blocks)
    g.register_master("retriever", master)
    out = {"retriever": master}
    for i in range(n_mirrors):
        x = master.copy()
        x[-(i + 2):] = kv(i + 2, seed=20 + i)
        g.register_mirror(f"m{i}", x)
        out[f"m{i}"] = x
    return out


def test_the_data_is_a_zarr_hierarchy_that_zarr_itself_reads(s3_env, pg_url, s3_server):
    import zarr
    from zarr.storage import ObjectStore

    with tdstore.open(_loc(s3_env), url=pg_url) as store:
        written = _fill(store)
        from sqlalchemy import text

        with store.catalog.read() as s:
            master_path = s.execute(text(
                "SELECT \"array\" FROM agents WHERE name = 'retriever'")).scalar_one()
    root = zarr.open_group(ObjectStore(s3_server.raw_store(s3_env), read_only=True),
                           path="p/data", mode="r")
    arr = root[master_path]
    assert np.array_equal(bits(arr[:]), bits(written["retriever"]))
    keys = set(s3_server.objects(s3_env))
    assert "p/data/zarr.json" in keys and all(k.startswith("p/data/") for k in keys)


def test_every_agent_reads_back_bit_exact_in_a_new_process_on_another_host(
        s3_env, pg_url, s3_server, tmp_path):
    with tdstore.open(_loc(s3_env), url=pg_url) as store:
        written = _fill(store)
        store.group("rag").collective_reuse_step(["retriever", "m0"], kv(5, seed=9))
        expected = {a: store.group("rag").reconstruct(a) for a in store.group("rag").agents()}
    np.savez(tmp_path / "expected.npz", **{a: bits(v) for a, v in expected.items()})
    code = textwrap.dedent("""
        import sys, numpy as np, tdstore
        want = np.load(sys.argv[2])
        with tdstore.open(sys.argv[1], readonly=True) as store:
            g = store.group("rag", create=False)
            assert sorted(g.agents()) == sorted(want.files), g.agents()
            for a in g.agents():
                got = np.ascontiguousarray(g.reconstruct(a)).view(np.uint8)
                assert np.array_equal(got, want[a]), a
        print("ok")
    """)
    env = {**os.environ, "TDSTORE_URL": pg_url,
           "TDSTORE_CACHE_DIR": str(tmp_path / "other-host-cache")}
    out = subprocess.run([sys.executable, "-c", code, _loc(s3_env), str(tmp_path / "expected.npz")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr
    assert set(written) <= set(expected)


def test_a_warm_chunk_cache_serves_reads_with_the_service_down(s3_env, pg_url, s3_server):
    with tdstore.open(_loc(s3_env), url=pg_url) as store:
        written = _fill(store, n_mirrors=1)
        g = store.group("rag")
        assert np.array_equal(bits(g.reconstruct("m0")), bits(written["m0"]))  # warms it
        s3_server.relay.cut()
        try:
            for a, v in written.items():
                assert np.array_equal(bits(g.reconstruct(a)), bits(v))
        finally:
            s3_server.relay.restore()


def test_a_damaged_cache_entry_is_a_miss_never_data(s3_env, pg_url, tmp_path):
    cache = tmp_path / "chunk-cache"
    with tdstore.open(_loc(s3_env), url=pg_url) as store:
        written = _fill(store, n_mirrors=1)
        entries = [p for p in cache.rglob("c.*") if p.is_file()]
        assert entries
        for p in entries:  # flip a byte in the body, and truncate one
            data = bytearray(p.read_bytes())
            data[10] ^= 0xFF
            p.write_bytes(bytes(data))
        entries[0].write_bytes(entries[0].read_bytes()[:50])
    with tdstore.open(_loc(s3_env), url=pg_url, verify_reads=True) as store:
        g = store.group("rag")
        for a, v in written.items():
            assert np.array_equal(bits(g.reconstruct(a)), bits(v))


def test_the_chunk_cache_keeps_to_its_byte_limit(s3_env, pg_url, tmp_path):
    limit = 600_000
    cache = tmp_path / "chunk-cache"
    with tdstore.open(_loc(s3_env), url=pg_url, cache_max_bytes=limit) as store:
        for i in range(6):
            g = store.group(f"g{i}", chunk_blocks=4)
            m = kv(32, (16, 32), seed=i)  # 64 KiB chunks, 512 KiB per master
            g.register_master("m", m)
            assert np.array_equal(bits(g.reconstruct("m")), bits(m))
            held = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
            assert held <= limit
    with tdstore.open(_loc(s3_env), url=pg_url, cache_max_bytes=0) as store:
        assert store.arrays.cache is None


def test_the_service_going_down_mid_write_commits_nothing(s3_env, pg_url, s3_server):
    loc = _loc(s3_env)
    with tdstore.open(loc, url=pg_url, cache_max_bytes=0) as store:
        written = _fill(store, n_mirrors=1)
        g = store.group("rag")
        before = (g.agents(), g.n_blocks, store.accounted_bytes())
        s3_server.relay.cut_after(b"PUT /", 3)  # the third chunk PUT finds it down
        try:
            with pytest.raises(tdstore.StorageError, match=f"store {loc}: .*cannot be reached"):
                g.register_mirror("new", kv(40, seed=99))
            with pytest.raises(tdstore.StorageError):
                g.reconstruct("retriever")  # down: an error, never wrong data
        finally:
            s3_server.relay.restore()
        assert (g.agents(), g.n_blocks) == before[:2]
        for a, v in written.items():
            assert np.array_equal(bits(g.reconstruct(a)), bits(v))
        assert not store.verify().damage
        store.gc()
        assert store.verify().ok and store.accounted_bytes() == before[2]
        g.register_mirror("new", kv(40, seed=99))  # usable again
        assert np.array_equal(bits(g.reconstruct("new")), bits(kv(40, seed=99)))


def test_gc_on_another_host_never_removes_a_write_in_progress(s3_env, pg_url, s3_server,
                                                              tmp_path):
    loc = _loc(s3_env)
    with tdstore.open(loc, url=pg_url) as store:
        _fill(store, n_mirrors=0)
    relay = s3_server.new_relay()
    release = relay.stall_after(b"PUT /", 4)  # the writer stops after 3 chunk objects
    code = textwrap.dedent("""
        import sys, numpy as np, tdstore
        rng = np.random.default_rng(5)
        new = rng.standard_normal((64, 4, 8), np.float32)
        with tdstore.open(sys.argv[1], cache_max_bytes=0) as store:
            store.group("rag").register_master("retriever", new)
        print("committed")
    """)
    env = {**os.environ, **s3_server.env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{relay.port}",
           "TDSTORE_URL": pg_url, "TDSTORE_CACHE_DIR": str(tmp_path / "writer-host")}
    writer = subprocess.Popen([sys.executable, "-c", code, loc], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # wait until the writer has put objects down (they are listed) and stalled
    import time

    deadline = time.monotonic() + 120
    while sum(1 for k in s3_server.objects(s3_env) if "/c." in k) < 5 + 3:
        assert writer.poll() is None and time.monotonic() < deadline, writer.communicate()
        time.sleep(0.05)
    result: dict = {}

    def collect() -> None:
        with tdstore.open(loc, url=pg_url) as store:
            result["gc"] = store.gc()

    t = threading.Thread(target=collect)
    t.start()
    release.set()
    out, err = writer.communicate(timeout=300)
    t.join(300)
    assert out.strip() == "committed", err
    new = np.random.default_rng(5).standard_normal((64, 4, 8), np.float32)
    with tdstore.open(loc, url=pg_url) as store:
        assert np.array_equal(bits(store.group("rag").reconstruct("retriever")), bits(new))
        assert store.verify().ok
    relay.cut()


def test_refusals_are_one_line_naming_what_is_wrong(s3_env, pg_url, s3_server, tmp_path):
    env = {**os.environ, "TDSTORE_CACHE_DIR": str(tmp_path / "c")}
    env.pop("TDSTORE_URL", None)
    loc = _loc(s3_env)
    line = _one_line(_cli("ls", loc, env=env))
    assert loc in line and "needs a catalogue every host reaches" in line
    sqlite = f"sqlite:///{tmp_path / 'cat.sqlite'}"
    line = _one_line(_cli("ls", loc, "--url", sqlite, env=env))
    assert "sqlite" in line and "PostgreSQL" in line
    line = _one_line(_cli("ls", "s3://tdstore-no-such-bucket/p", "--url", pg_url, env=env))
    assert "bucket 'tdstore-no-such-bucket' does not exist" in line
    bad = {**env, "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_ACCESS_KEY_ID": "wrong"}
    proc = _cli("ls", loc, "--url", pg_url, env=bad)
    # moto accepts any credentials unless told otherwise; a real service refuses them.
    # What must hold either way: no traceback, and an error is one line.
    assert "Traceback" not in proc.stderr
    line = _one_line(_cli("ls", "http://example.com/x", env=env))
    assert "http:// is not a store location" in line
    with pytest.raises(tdstore.InvalidInputError, match="PostgreSQL"):
        tdstore.open(loc, url=sqlite)


def test_a_catalogue_serves_one_location_only(s3_env, pg_url, tmp_path):
    with tdstore.open(_loc(s3_env, "a"), url=pg_url) as store:
        _fill(store, n_mirrors=0)
    with pytest.raises(tdstore.InvalidInputError, match="belongs to the store at s3://"):
        tdstore.open(_loc(s3_env, "b"), url=pg_url)
    with pytest.raises(tdstore.InvalidInputError, match="belongs to the store at s3://"):
        tdstore.open(tmp_path / "local", url=pg_url)


def test_the_command_line_works_on_an_object_store_location(s3_env, pg_url, tmp_path):
    loc = _loc(s3_env)
    with tdstore.open(loc, url=pg_url) as store:
        _fill(store)
    env = {**os.environ, "TDSTORE_URL": pg_url, "TDSTORE_CACHE_DIR": str(tmp_path / "c")}
    out = _cli("ls", loc, "--json", env=env)
    assert out.returncode == 0, out.stderr
    assert "rag" in out.stdout
    out = _cli("verify", loc, env=env)
    assert out.returncode == 0 and "clean" in out.stdout, out.stdout + out.stderr
    out = _cli("info", loc, "--json", env=env)
    assert out.returncode == 0 and loc in out.stdout
    out = _cli("export", loc, "rag", "m0", "-o", str(tmp_path / "m0.npy"), env=env)
    assert out.returncode == 0, out.stderr
    out = _cli("rm", loc, "rag", "m0", env=env)
    assert out.returncode == 0, out.stderr
    out = _cli("gc", loc, env=env)
    assert out.returncode == 0, out.stderr
    with tdstore.open(loc, url=pg_url) as store:
        assert "m0" not in store.group("rag").agents()
        assert store.verify().ok


@pytest.mark.slow
def test_several_hosts_write_and_read_the_same_groups_at_once(s3_env, pg_url, tmp_path):
    from tdstore.dev.harness import concurrency_test

    r = concurrency_test(_loc(s3_env), processes=3, threads=2, ops=40, url=pg_url,
                         workdir=tmp_path / "hosts")
    assert r["errors"] == [] and r["mismatches"] == 0 and r["verify_ok"], r
    assert r["ops"]["writes"] > 0 and r["ops"]["reads"] > 0
    # each process had a chunk cache of its own, and used it
    caches = sorted((tmp_path / "hosts").glob("host*/chunk-cache"))
    assert len(caches) == 3 and all(any(c.rglob("c.*")) for c in caches)


@pytest.mark.slow
def test_writers_killed_on_several_hosts_lose_nothing_acknowledged(s3_env, pg_url, tmp_path):
    import signal

    from tdstore.dev.harness import crash_test

    report = crash_test(_loc(s3_env), 12, seed=3, url=pg_url, workdir=tmp_path / "hosts",
                        signals=(signal.SIGKILL, signal.SIGTERM, signal.SIGINT))
    assert report.failures == [] and report.lost == 0, report.failures
    assert report.kills == 12 and report.ops_committed > 0


def test_backup_of_an_object_store_location_is_a_local_store(s3_env, pg_url, tmp_path):
    loc = _loc(s3_env)
    with tdstore.open(loc, url=pg_url) as store:
        written = _fill(store)
        g = store.group("rag")
        g.collective_reuse_step(["retriever", "m1"], kv(3, seed=4))
        g.register_mirror("m0", kv(43, seed=8))  # replaces m0's array: garbage till gc
        expected = {a: g.reconstruct(a) for a in g.agents()}
    env = {**os.environ, "TDSTORE_URL": pg_url, "TDSTORE_CACHE_DIR": str(tmp_path / "c")}
    out = _cli("backup", loc, str(tmp_path / "copy"), env=env)
    assert out.returncode == 0, out.stderr
    with tdstore.open(tmp_path / "copy") as copy:
        cg = copy.group("rag", create=False)
        assert sorted(cg.agents()) == sorted(expected)
        for a, v in expected.items():
            assert np.array_equal(bits(cg.reconstruct(a)), bits(v))
        assert copy.verify().ok and copy.gc(dry_run=True).removed == []
        assert copy.catalog.get_meta("data_location") is None
    assert set(written) <= set(expected)


def test_a_postgresql_restart_during_a_write_commits_nothing(s3_env, pg_server, s3_server):
    import time

    url = pg_server.new_database()
    loc = _loc(s3_env)
    with tdstore.open(loc, url=url) as store:
        written = _fill(store, n_mirrors=1)
    relay = s3_server.new_relay()
    store = tdstore.open(loc, url=url, cache_max_bytes=0,
                         storage_options={"endpoint": f"http://127.0.0.1:{relay.port}"})
    try:
        g = store.group("rag")
        before = len(s3_server.objects(s3_env))
        release = relay.stall_after(b"PUT /", 3)
        result: dict = {}

        def write() -> None:
            try:
                g.register_master("retriever", kv(40, seed=77))
            except Exception as exc:  # what the write raised is checked below
                result["error"] = exc

        t = threading.Thread(target=write)
        t.start()
        deadline = time.monotonic() + 120
        while len(s3_server.objects(s3_env)) < before + 2:  # it has put objects down
            assert t.is_alive() and time.monotonic() < deadline, result
            time.sleep(0.05)
        pg_server.restart()  # the writer's lock session ends with the old server
        release.set()
        t.join(300)
        assert isinstance(result.get("error"), tdstore.StorageError), result
        for a, v in written.items():  # nothing committed; the same Store works
            assert np.array_equal(bits(g.reconstruct(a)), bits(v))
        g.register_mirror("after", kv(40, seed=5))
        assert np.array_equal(bits(g.reconstruct("after")), bits(kv(40, seed=5)))
        assert not store.verify().damage
    finally:
        store.close()
        relay.cut()


def test_the_object_store_benchmark_runs_and_reports_every_target(s3_env, pg_url, tmp_path):
    env = {**os.environ, "TDSTORE_URL": pg_url}
    out = _cli("bench", "--location", _loc(s3_env, "bench"), "--agents", "3", "--blocks", "32",
               "--block-shape", "4,64", "--reps", "1", "--scale-agents", "50", "--json",
               env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    report = json.loads(out.stdout)
    assert set(report["ratios"]) >= {
        "cold-cache reconstruct all vs GET each agent's object",
        "warm-cache reconstruct all vs the local-disk store",
        "register_mirror vs PUT of the whole agent",
        "bytes under the prefix / block-level ideal",
        "open+reconstruct, 50 vs 10 agents (time ratio)"}
    assert all(t["value"] is not None and t["value"] > 0 for t in report["ratios"].values())
    # a tiny workload: the zarr.json documents weigh more than at full size
    assert report["ratios"]["bytes under the prefix / block-level ideal"]["value"] < 1.5
