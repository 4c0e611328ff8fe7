"""The size budget holds exactly: writes evict least-recently-used agents, or fail cleanly."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import kv

import tdstore
from tdstore.ops.budget import lru_order

MiB = 1 << 20


def data_hashes(backend, name: str) -> dict[str, str]:
    """Every file (object) under the store's data/: its content hash."""
    return {rel: hashlib.sha256(backend.read(rel, name)).hexdigest()
            for rel in sorted(backend.files(name))}


def test_filling_far_past_the_budget_never_exceeds_it(backend):
    budget = 3 * MiB
    written = 0
    with backend.open("s", max_bytes=budget) as store:
        for i in range(12):  # ~12 MiB of masters and mirrors into a 3 MiB budget
            g = store.group(f"g{i}")
            master = kv(64, (32, 64), seed=i)  # 512 KiB
            g.register_master("m", master)
            written += master.nbytes
            assert backend.data_bytes("s") <= budget
            for j in range(3):
                mirror = master.copy()
                mirror[-(8 * (j + 1)):] = kv(8 * (j + 1), (32, 64), seed=100 * i + j)
                g.register_mirror(f"a{j}", mirror)
                written += mirror[-(8 * (j + 1)):].nbytes
                assert backend.data_bytes("s") <= budget
                assert np.array_equal(g.reconstruct(f"a{j}"), mirror)  # the new one survives
            g.collective_reuse_step(["m", "a0"], kv(16, (32, 64), seed=7))
            assert backend.data_bytes("s") <= budget
        assert written > 3 * budget
        assert store.info()["bytes_accounted"] <= budget
        assert store.verify().ok


def test_the_least_recently_used_group_goes_first(backend):
    with backend.open("s", max_bytes=int(2.5 * MiB)) as store:
        for name in ("a", "b"):
            store.group(name).register_master("m", kv(256, (32, 32), seed=ord(name)))  # 1 MiB
        import time

        time.sleep(1.1)  # accesses are recorded with one-second resolution
        store.group("a").reconstruct("m")  # "a" is now more recent than "b"
        store.group("c").register_master("m", kv(256, (32, 32), seed=9))
        assert store.group("a").agents() == ["m"]
        assert store.group("b").agents() == []  # evicted: group kept, agents gone
        assert store.group("c").agents() == ["m"]


def add_group(store, name: str, n_mirrors: int):
    """A 512 KiB master and mirrors a0.. each differing in 8 blocks (64 KiB)."""
    g = store.group(name)
    master = kv(64, (32, 64))
    g.register_master("m", master)
    for j in range(n_mirrors):
        x = master.copy()
        x[j * 8:(j + 1) * 8] = 0
        g.register_mirror(f"a{j}", x)
    return g


def test_mirrors_are_evicted_before_their_master_when_less_recent(backend):
    with backend.open("s") as store:
        g = add_group(store, "g", 4)
        total = store.info()["bytes_accounted"]
        victims = store.evict(total - 1, dry_run=True)
        assert [v.agent for v in victims] == ["a0"]  # the master was used by later writes
        store.evict(total - 1)
        assert g.agents() == ["m", "a1", "a2", "a3"]


def test_a_write_that_cannot_fit_fails_and_changes_nothing(backend):
    with backend.open("s", max_bytes=MiB) as store:
        g = store.group("g")
        g.register_master("m", kv(64, (32, 64)))  # 512 KiB
    before = data_hashes(backend, "s")
    with backend.open("s") as store:
        g = store.group("g")
        with pytest.raises(tdstore.StoreFullError, match="budget is 1048576 bytes"):
            g.register_mirror("big", kv(64, (32, 64), seed=1))  # needs 512 KiB more
        with pytest.raises(tdstore.StoreFullError):
            store.group("h").register_master("m", kv(160, (32, 64)))  # 1.25 MiB alone
        with pytest.raises(OSError):  # StoreFullError is an OSError
            g.collective_reuse_step(["m"], kv(64, (32, 64)))
    assert data_hashes(backend, "s") == before  # files untouched (group 'h' got a row)


def test_the_budget_persists_and_can_change(backend):
    with backend.open("s", max_bytes=10 * MiB) as store:
        assert store.max_bytes == 10 * MiB
    with backend.open("s") as store:
        assert store.max_bytes == 10 * MiB
        store.set_max_bytes(None)
        assert store.max_bytes is None
    with backend.open("s", max_bytes=5 * MiB) as store:
        assert store.max_bytes == 5 * MiB
    with pytest.raises(tdstore.InvalidInputError, match="positive int"):
        backend.open("s", max_bytes=-1)



def test_a_process_opening_with_another_budget_sets_it_for_all_and_says_so(backend, caplog):
    """The budget is the store's, one for every process: opening with another
    max_bytes replaces it for all of them (the last to open sets it), with a warning
    naming both; opening with the same one, or none, says nothing."""
    with backend.open("s", max_bytes=2 * MiB) as first:
        with caplog.at_level("WARNING", logger="tdstore"):
            with backend.open("s", max_bytes=2 * MiB):
                pass
            assert not caplog.records
            with backend.open("s", max_bytes=6 * MiB):
                pass
        (record,) = caplog.records
        assert f"max_bytes {6 * MiB} replaces the budget of {2 * MiB} bytes" in \
            record.getMessage()
        assert first.max_bytes == 6 * MiB  # the other process's open set it here too


def test_setting_a_budget_waits_for_writes_that_began_without_one(backend):
    """A write that began while the store had no budget never reserves against one set
    meanwhile (two such writes would both count on the same free bytes): setting a
    budget waits until the writes in flight are done, and writes that begin after it
    take their turns under it."""
    import threading

    from tdstore.ops.budget import budget_turn

    with backend.open("s") as store, backend.open("s") as other:
        inside, release, done = threading.Event(), threading.Event(), threading.Event()

        def write() -> None:  # a write's turn, begun with no budget, held open
            with budget_turn(store._ctx):
                inside.set()
                release.wait(120)

        def set_budget() -> None:
            other.set_max_bytes(MiB)
            done.set()

        writer = threading.Thread(target=write)
        writer.start()
        assert inside.wait(120)
        setter = threading.Thread(target=set_budget)
        setter.start()
        held = not done.wait(1.0)  # (a budget set while the write is in its turn fails)
        release.set()
        writer.join(120)
        setter.join(120)
        assert held and done.is_set() and store.max_bytes == MiB

WRITER = textwrap.dedent("""
    import os, sys, numpy as np, tdstore
    path, name, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    def data_bytes():  # measured directly, not through tdstore
        if path.startswith("s3://"):
            import obstore
            from obstore.store import from_url
            data = from_url(path + "/data")  # the AWS_* variables of the environment
            return sum(o["size"] for batch in obstore.list(data) for o in batch)
        from pathlib import Path
        return sum(p.stat().st_size for p in (Path(path) / "data").rglob("*") if p.is_file())
    worst = 0
    with tdstore.open(path, url=os.environ.get("TDSTORE_URL")) as store:
        for i in range(15):
            g = store.group(f"{name}{i}")
            rng = np.random.default_rng(i)
            g.register_master("m", rng.standard_normal((64, 32, 64), np.float32))
            worst = max(worst, data_bytes())
    print(worst)
""")


def test_two_processes_share_one_budget(backend):
    budget = 2 * MiB
    backend.open("s", max_bytes=budget).close()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, backend.location("s"), n,
                               str(budget)], stdout=subprocess.PIPE, text=True,
                              env=backend.env("s")) for n in ("x", "y")]
    worst = [int(p.communicate(timeout=300)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert 0 < min(worst) and max(worst) <= budget and backend.data_bytes("s") <= budget
    with backend.open("s") as store:
        assert store.verify().ok


def test_a_group_counts_as_used_when_any_of_its_agents_is(backend):
    import time

    with backend.open("s") as store:
        add_group(store, "old", 0)
        hot = add_group(store, "hot", 3)
        time.sleep(1.1)
        hot.reconstruct("a2")  # touches a2 and, through it, the group
        order = [(v.group, v.agent) for v in lru_order(store._ctx)]
        # 'old' was used longest ago; then hot's mirrors one by one; the hot group last
        assert order == [("old", None), ("hot", "a0"), ("hot", "a1"), ("hot", "a2"),
                         ("hot", None)]
        # evicting everything takes each group once, with all its bytes counted once
        plan = store.evict(1, dry_run=True)
        assert [(v.group, v.agent) for v in plan] == [("old", None), ("hot", None)]
        assert sum(v.nbytes for v in plan) == sum(
            store.group(g).stats()["bytes_stored"] for g in ("old", "hot"))
