"""The catalogue: schema creation, upgrades, refusal of newer schemas, engine settings."""

from __future__ import annotations

import sqlite3

import pytest
from alembic import command
from conftest import fingerprint, kv

import tdstore
from tdstore.storage.catalog import Catalog, _alembic_config, schema_status, sqlite_url


def test_new_store_has_head_schema_wal_and_metadata(tmp_path):
    with tdstore.open(tmp_path / "s") as store:
        current, heads = schema_status(store.catalog)
        assert current == heads and len(heads) == 1
        assert store.catalog.get_meta("created_by") == tdstore.__version__
        with store.catalog.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
    assert (tmp_path / "s" / "catalog.sqlite").exists() and (tmp_path / "s" / "data").is_dir()


def test_a_newer_schema_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "s"
    with tdstore.open(path) as store:
        store.group("g").register_master("m", kv(4))
    con = sqlite3.connect(path / "catalog.sqlite")
    con.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    con.commit()
    con.close()
    before = fingerprint(path)
    for readonly in (False, True):
        with pytest.raises(tdstore.SchemaError, match="9999_from_the_future is newer than"):
            tdstore.open(path, readonly=readonly)
    assert fingerprint(path) == before


@pytest.mark.parametrize("revision", ["base", "0001", "0002"])
def test_a_store_at_an_older_revision_is_upgraded_on_open(tmp_path, revision):
    path = tmp_path / "s"
    path.mkdir()
    catalog = Catalog(sqlite_url(path / "catalog.sqlite"))
    cfg = _alembic_config(catalog)
    with catalog.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    catalog.close()
    with pytest.raises(tdstore.SchemaError, match="needs an upgrade"):
        tdstore.open(path, readonly=True)
    with tdstore.open(path) as store:
        current, heads = schema_status(store.catalog)
        assert current == heads
        store.group("g").register_master("m", kv(4))


def test_the_catalogue_can_live_at_another_sqlalchemy_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    with tdstore.open(tmp_path / "s", url=url) as store:
        store.group("g").register_master("m", kv(4))
    assert not (tmp_path / "s" / "catalog.sqlite").exists()
    with tdstore.open(tmp_path / "s", url=url) as store:
        assert store.group("g").agents() == ["m"]


def test_readonly_store_refuses_writes_and_writes_nothing(tmp_path):
    path = tmp_path / "s"
    with tdstore.open(path) as store:
        store.group("g").register_master("m", kv(4))
    before = fingerprint(path)
    with tdstore.open(path, readonly=True) as store:
        g = store.group("g")
        assert g.agents() == ["m"]
        with pytest.raises(tdstore.ReadOnlyError, match="read-only"):
            g.register_mirror("a", kv(4))
        with pytest.raises(tdstore.ReadOnlyError):
            store.delete_group("g")
        with pytest.raises(KeyError):
            store.group("new")
    assert fingerprint(path) == before


def test_readonly_open_of_a_missing_store_fails_clearly(tmp_path):
    with pytest.raises(tdstore.NotFoundError, match="not a tdstore store"):
        tdstore.open(tmp_path / "nothing", readonly=True)
    assert not (tmp_path / "nothing").exists()


def unpin(path):
    """Make a store downgraded by ``migrate`` look like one an older tdstore wrote: that
    records no pinned revision, so this tdstore upgrades it on open."""
    import sqlite3

    con = sqlite3.connect(path / "catalog.sqlite")
    with con:
        assert con.execute("DELETE FROM store_meta WHERE key = 'pinned_revision'").rowcount == 1
    con.close()


def test_a_store_written_at_0001_keeps_its_data_through_the_upgrade(tmp_path):
    """Stores made before per-agent attrs existed open, upgrade, and read the same."""
    path = tmp_path / "s"
    with tdstore.open(path) as store:
        g = store.group("g")
        g.register_master("m", kv(8))
        g.register_mirror("a", kv(8, seed=1))
        expected = {a: g.reconstruct(a) for a in g.agents()}
        store.migrate("0001")
        assert schema_status(store.catalog)[0] == ("0001",)
    unpin(path)
    with tdstore.open(path) as store:  # upgraded on open
        current, heads = schema_status(store.catalog)
        assert current == heads
        g = store.group("g")
        for a, want in expected.items():
            assert (g.reconstruct(a) == want).all()
        assert g.attrs("a") == {}
        g.register_mirror("b", kv(8, seed=2), attrs={"tokens": 99})
        assert g.attrs("b") == {"tokens": 99}


def test_a_store_from_before_the_null_stats_table_gains_it_on_open(tmp_path):
    from tdstore.analysis.nullstats import NullStatsCache

    with tdstore.open(tmp_path / "s") as store:
        store.group("g").register_master("m", kv(4))
        store.migrate("0002")
    unpin(tmp_path / "s")
    with tdstore.open(tmp_path / "s") as store:
        cache = NullStatsCache(store)
        cache.put("k", {"kinds": {"kl": {"mean": 0.1, "std": 0.01, "n": 3,
                                         "degenerate": False}}})
        assert cache.get("k")["kinds"]["kl"]["mean"] == 0.1
        assert store.group("g").agents() == ["m"]


def test_access_records_leave_the_change_counter_where_other_commits_move_it(tmp_path):
    """Lookups kept while the change counter stands (tdstore.api.chunks) survive the
    access records reads make, and end with any other commit."""
    from sqlalchemy import select

    from tdstore.storage.catalog import AgentRow

    with tdstore.open(tmp_path / "s") as store:
        g = store.group("g")
        g.register_master("m", kv(4))
        (row_id,) = g._ops.snapshot("m").accessed
        with store.catalog.write() as s:
            s.get(AgentRow, row_id).last_access = 1.0  # long ago
        before = store.catalog.change_counter()
        store.catalog.touch({row_id: 1.0}, 1.0)
        assert store.catalog.change_counter() == before
        with store.catalog.read() as s:  # recorded all the same
            assert s.scalar(select(AgentRow.last_access).where(AgentRow.id == row_id)) > 1e9
        g.register_mirror("critic", kv(4, seed=3))
        assert store.catalog.change_counter() != before


def test_writes_commit_with_full_sync_even_after_best_effort_access_records(tmp_path):
    with tdstore.open(tmp_path / "s") as store:
        g = store.group("g")
        g.register_master("m", kv(4))
        stale = {i: 0.0 for i in g._ops.snapshot("m").accessed}
        store.catalog.touch(stale, 1.0)  # an access record: synchronous NORMAL, no fsync
        with store.catalog.write() as s:
            assert s.connection().exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert store.catalog.engine.pool.checkedout() == 0
