"""A store whose catalogue is on a real PostgreSQL server (tests/pgserver.py): the same
semantics as on SQLite, migrations there, writers taking turns through advisory locks
(no lock files), and clear errors when the server is away."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from conftest import head_revision, kv
from test_cli_errors import one_line_error

import tdstore
from tdstore.cli import main as cli
from tdstore.storage.dblocks import AdvisoryLocks, lock_key


def test_a_store_round_trips_and_survives_a_restart(tmp_path, pg_url):
    master, other = kv(16), kv(16)
    other[3] += 1
    with tdstore.open(tmp_path / "s", url=pg_url) as store:
        g = store.group("g", compressor="zstd")
        g.register_master("m", master)
        assert g.register_mirror("a", other).block_indices.tolist() == [3]
    assert not (tmp_path / "s" / "catalog.sqlite").exists()
    code = textwrap.dedent("""
        import sys, numpy as np, tdstore
        with tdstore.open(sys.argv[1], url=sys.argv[2], readonly=True) as store:
            g = store.group("g")
            print(g.agents(), g.reconstruct("a").tobytes().hex())
    """)
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s"), pg_url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    names, data = done.stdout.rsplit(" ", 1)
    assert names == "['m', 'a']" and bytes.fromhex(data.strip()) == other.tobytes()


def test_the_schema_is_at_head_with_dialect_types(tmp_path, pg_url):
    with tdstore.open(tmp_path / "s", url=pg_url) as store:
        assert store.info()["schema_revision"] == head_revision()
        cols = {c["name"]: c["type"] for c in sa.inspect(store.catalog.engine)
                .get_columns("agents")}
        assert isinstance(cols["nbytes"], sa.BigInteger)  # arrays of 2 GiB and more
        indexes = {i["name"]: i for i in sa.inspect(store.catalog.engine).get_indexes("agents")}
        assert indexes["ix_agents_one_master"]["unique"]


def test_migrate_down_and_up_on_postgresql(tmp_path, pg_url):
    path = tmp_path / "s"
    with tdstore.open(path, url=pg_url) as store:
        store.group("g").register_master("m", kv(4))
    runner = CliRunner()
    result = runner.invoke(cli, ["migrate", str(path), "--url", pg_url, "--to", "0003"])
    assert result.exit_code == 0 and "0003" in result.output, result.output
    one_line_error(runner.invoke(cli, ["info", str(path), "--url", pg_url]), "0003")
    result = runner.invoke(cli, ["migrate", str(path)], env={"TDSTORE_URL": pg_url})
    assert result.exit_code == 0 and head_revision() in result.output, result.output
    with tdstore.open(path, url=pg_url) as store:
        assert store.group("g").agents() == ["m"] and store.verify().ok


OPEN_AND_WRITE = textwrap.dedent("""
    import sys, numpy as np, tdstore
    with tdstore.open(sys.argv[1], url=sys.argv[2]) as store:
        g = store.group("g")
        if g.master_id is None:
            try:
                g.register_master("m", np.zeros((8, 4), np.float32))
            except tdstore.TdStoreError:
                pass
        for i in range(int(sys.argv[4])):
            kv = np.zeros((8, 4), np.float32)
            kv[i % 8] = float(sys.argv[3]) + i
            g.register_mirror(f"{sys.argv[3]}-{i}", kv)
            assert (g.reconstruct(f"{sys.argv[3]}-{i}") == kv).all()
    print("ok")
""")


def test_processes_share_a_store_through_the_database(tmp_path, pg_url):
    """Four processes open a fresh catalogue at once (the schema is created once) and
    write mirrors of one group; the group's writers take turns through advisory locks,
    so no lock file is ever made."""
    path = tmp_path / "s"
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AND_WRITE, str(path), pg_url,
                               str(p), "12"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for p in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [o[1][-2000:] for o in outs]
    with tdstore.open(path, url=pg_url) as store:
        g = store.group("g")
        assert len(g.agents()) == 1 + 4 * 12
        for p in range(4):
            for i in range(12):
                want = np.zeros((8, 4), np.float32)
                want[i % 8] = p + i
                assert (g.reconstruct(f"{p}-{i}") == want).all()
        assert store.verify().ok
    assert not (path / "locks").exists() or not any((path / "locks").iterdir())


HOLDER = textwrap.dedent("""
    import sys, sqlalchemy as sa
    from tdstore.storage.dblocks import AdvisoryLocks
    locks = AdvisoryLocks(sa.create_engine(sys.argv[1]))
    with locks.hold(sys.argv[2]):
        print("held", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
    sys.stdin.readline()
""")


@pytest.mark.parametrize("ending", ["release", "SIGKILL"])
def test_an_advisory_lock_excludes_other_processes_until_released_or_killed(pg_url, ending):
    gid = "0123456789abcdef"
    locks = AdvisoryLocks(sa.create_engine(pg_url))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, pg_url, gid],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with locks.hold(gid, wait=False) as got:
            assert got is False
        with locks.hold("budget", wait=False) as got:  # other names are other locks
            assert got is True
        if ending == "release":
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.stdout.readline().strip() == "released"
        else:
            holder.kill()
            holder.wait(timeout=60)
        with locks.hold(gid) as got:  # waits until the server has let go of it
            assert got is True
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert lock_key(gid) == lock_key(gid) and lock_key(gid) != lock_key("budget")


def test_the_budget_holds_with_a_postgresql_catalogue(tmp_path, pg_url):
    budget = 3 << 20
    with tdstore.open(tmp_path / "s", url=pg_url, max_bytes=budget) as store:
        for i in range(6):
            store.group(f"g{i}").register_master("m", np.full((16, 256, 64), i, np.float32))
        assert store.info()["bytes_accounted"] <= budget
        assert len(store.groups()) < 6  # the least recently used groups went
        assert store.verify().ok


def test_maintenance_and_null_stats_on_postgresql(tmp_path, pg_url):
    from tdstore.analysis.nullstats import NullStatsCache

    path = tmp_path / "s"
    with tdstore.open(path, url=pg_url) as store:
        g = store.group("g")
        g.register_master("m", kv(8))
        g.register_master("n", kv(8, seed=1))  # replaces m: its array is garbage till gc
        stats = {"kl": {"mean": 0.5, "std": 0.1, "n": 8, "degenerate": False}}
        NullStatsCache(store).put({"model": "x"}, stats)
    runner = CliRunner(env={"TDSTORE_URL": pg_url})
    for args in (["ls", str(path)], ["ls", str(path), "g"], ["info", str(path)],
                 ["verify", str(path)], ["gc", str(path)], ["nullstats", "ls", str(path)]):
        result = runner.invoke(cli, [*args, "--json"])
        assert result.exit_code == 0, (args, result.output)
        json.loads(result.output)
    with tdstore.open(path, url=pg_url) as store:
        assert NullStatsCache(store).get({"model": "x"}) == stats
        assert store.gc(dry_run=True).removed == []
    result = runner.invoke(cli, ["backup", str(path), str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    with tdstore.open(tmp_path / "b") as copy:  # a local store with its own catalog.sqlite
        assert (copy.group("g").reconstruct("n") == kv(8, seed=1)).all()
        assert NullStatsCache(copy).get({"model": "x"}) == stats
        assert copy.verify().ok
    assert (tmp_path / "b" / "catalog.sqlite").is_file()


def test_an_unreachable_server_is_one_clear_line(tmp_path):
    url = f"postgresql+psycopg://postgres@/nothing?host={tmp_path}"  # no server there
    with pytest.raises(tdstore.StorageError, match="cannot be reached"):
        tdstore.open(tmp_path / "s", url=url)
    one_line_error(CliRunner().invoke(cli, ["info", str(tmp_path / "s"), "--url", url]),
                   "cannot be reached")


def test_a_server_restart_between_operations_needs_no_reopen(tmp_path, pg_server):
    url = pg_server.new_database()
    with tdstore.open(tmp_path / "s", url=url) as store:
        g = store.group("g")
        g.register_master("m", kv(8))
        pg_server.restart()
        g.register_mirror("a", kv(8, seed=2))  # the pool reconnects
        assert (g.reconstruct("a") == kv(8, seed=2)).all()
        assert store.verify().ok


@pytest.mark.slow
def test_sigkill_with_a_postgresql_catalogue_loses_nothing_acknowledged(tmp_path, pg_url):
    from tdstore.dev.harness import crash_test

    report = crash_test(tmp_path / "store", 30, seed=3, url=pg_url)
    assert report.failures == []
    assert report.kills == 30 and report.ops_committed > 50
    assert not (tmp_path / "store" / "catalog.sqlite").exists()


@pytest.mark.slow
def test_processes_and_threads_share_a_postgresql_catalogue(tmp_path, pg_url):
    from tdstore.dev.harness import concurrency_test

    r = concurrency_test(tmp_path / "store", processes=3, threads=2, ops=40, url=pg_url)
    assert r["errors"] == []
    assert r["mismatches"] == 0 and r["verify_ok"]
    assert r["ops"]["writes"] > 0 and r["ops"]["reads"] > 0 and r["ops"]["group_deletes"] > 0
