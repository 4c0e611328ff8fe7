"""The null-stats cache: stable hashing, persistence, sharing, and its commands."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

import tdstore
from tdstore.analysis.nullstats import (
    NullStatsCache,
    calibrate,
    calibration_key,
    stable_hash,
    summarise,
    zscore,
)
from tdstore.analysis.scoring import DummyDifferentialBackend, DummyResponses
from tdstore.cli import main

PROMPTS = ["What is 2+2?", "Name a colour.", "Écris une phrase.", "日本語で"]


def backend(identity="model-x@sha256:aaaa"):
    return DummyDifferentialBackend(base=DummyResponses(), ft=DummyResponses(),
                                    identity=identity)


def test_stable_hash_is_canonical_and_exact():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash([1, 2]) == stable_hash((1, 2))
    assert stable_hash(0.1) != stable_hash(0.1 + 2**-56)  # exact float, not rounded repr
    # all pairwise distinct (a chained != compares only neighbours)
    assert len({stable_hash(x) for x in (1, 1.0, True, "1")}) == 4
    assert stable_hash(b"ab") != stable_hash("ab")
    assert stable_hash({"k": None}) != stable_hash({"k": "None"})
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert stable_hash(a) == stable_hash(a.copy()) == stable_hash(a.astype(">f4"))
    assert len({stable_hash(x) for x in (a, a.astype(np.float64), a.reshape(3, 2))}) == 3
    assert stable_hash(np.float32(1.5)) != stable_hash(1.5)
    assert len(stable_hash("x")) == 64


@pytest.mark.parametrize("bad, name", [({1, 2}, "set"), (object(), "object"),
                                       ({1: "x"}, "int"), (np.array([None]), "object array")])
def test_stable_hash_refuses_what_it_cannot_encode(bad, name):
    with pytest.raises(TypeError, match=name):
        stable_hash(bad)


PROBE = textwrap.dedent("""
    import json, sys, numpy as np
    from tdstore.analysis.nullstats import calibrate, stable_hash
    from tdstore.analysis.scoring import DummyDifferentialBackend, DummyResponses
    be = DummyDifferentialBackend(base=DummyResponses(), ft=DummyResponses())
    prompts = json.loads(sys.argv[1])
    with be.as_null_adapter(1001) as v:
        dists = [v.next_token_dist(p).logprobs.tobytes().hex() for p in prompts]
    print(json.dumps({"salted": hash("x"),
                      "hash": stable_hash({"k": [1, 2.5, "é", None], "a": np.arange(3)}),
                      "dists": dists, "stats": calibrate(be, prompts, kinds=("kl", "js"))}))
""")


def test_hashes_null_views_and_stats_are_identical_across_hash_seeds():
    outs = []
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(PROMPTS)], env=env,
                              capture_output=True, text=True, timeout=120, check=True)
        outs.append(json.loads(done.stdout))
    # the processes really had different salts: Python's own hash() differs among them
    assert len({o.pop("salted") for o in outs}) == 3
    assert outs[0] == outs[1] == outs[2]


SECOND = textwrap.dedent("""
    import json, sys
    import tdstore
    from tdstore.analysis.nullstats import NullStatsCache, calibration_key
    key = json.loads(sys.argv[2])
    def compute():
        raise SystemExit("computed again")
    with tdstore.open(sys.argv[1]) as store:
        print(json.dumps(NullStatsCache(store).get_or_compute(key, compute)))
""")


def test_a_second_process_gets_the_cached_stats_without_computing(tmp_path):
    params = {"kinds": ("kl",), "runs": 3, "seed_base": 1000, "init_scale": 0.02,
              "rank_multipliers": (1.0,)}
    with tdstore.open(tmp_path / "s") as store:
        cache = NullStatsCache(store)
        calls = []
        stats = cache.get_or_compute(
            calibration_key("m", PROMPTS, top_k=256, **params),
            lambda: calls.append(1) or calibrate(backend(), PROMPTS, **params))
        assert calls == [1]
    key = json.loads(json.dumps(calibration_key("m", PROMPTS, top_k=256, **params)))
    done = subprocess.run([sys.executable, "-c", SECOND, str(tmp_path / "s"), json.dumps(key)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == stats


def test_calibrate_with_a_cache_computes_once_and_misses_on_any_change(tmp_path):
    with tdstore.open(tmp_path / "s") as store:
        cache = NullStatsCache(store)
        be = backend()
        first = calibrate(be, PROMPTS, cache=cache, runs=3)
        misses = be._inst.stats["misses"]
        assert calibrate(be, PROMPTS, cache=cache, runs=3) == first
        assert be._inst.stats["misses"] == misses  # a hit computed nothing
        variants = [
            dict(backend_=backend("model-x@sha256:bbbb")),  # adapter retrained in place
            dict(runs=4), dict(seed_base=7), dict(init_scale=0.03), dict(kinds=("kl", "js")),
            dict(rank_multipliers=(1.0, 2.0)), dict(prompts=PROMPTS[:2]),
        ]
        for i, v in enumerate(variants):
            be2 = v.pop("backend_", be)
            prompts = v.pop("prompts", PROMPTS)
            calibrate(be2, prompts, cache=cache, **{"runs": 3, **v})
            assert len(cache.keys()) == 2 + i, v  # a miss: computed and stored anew


def test_statistics_zscores_and_degenerate_runs():
    s = calibrate(backend(), PROMPTS, kinds=("kl", "js"), runs=5, rank_multipliers=(1.0, 4.0))
    kl = s["kinds"]["kl"]
    assert kl["n"] == 5 and kl["mean"] > 0 and kl["std"] > 1e-6 and not kl["degenerate"]
    assert s["by_rank"]["4.0"]["kl"]["mean"] > kl["mean"]  # a larger rank, larger noise
    assert zscore(kl["mean"] + 2 * kl["std"], s) == pytest.approx(2.0)
    assert zscore(0.0, s, "kl", rank_multiplier=4.0) < 0
    with pytest.raises(KeyError, match="no probe kind 'ppl'"):
        zscore(1.0, s, "ppl")
    one = calibrate(backend(), PROMPTS, runs=1)["kinds"]["kl"]
    assert one["degenerate"] and one["std"] == 1e-6
    assert summarise([0.3, 0.3, 0.3]) == {"mean": 0.3, "std": 1e-6, "n": 3, "degenerate": True}


def test_unreadable_and_old_schema_entries_are_misses_not_crashes(tmp_path):
    with tdstore.open(tmp_path / "s") as store:
        cache = NullStatsCache(store)
        good = calibrate(backend(), PROMPTS, runs=2)
        cache.put("k1", good)
        cache.put("k2", good)
    con = sqlite3.connect(tmp_path / "s" / "catalog.sqlite")
    con.execute("UPDATE null_stats SET payload = '{broken' WHERE key_hash = ?",
                (stable_hash("k1"),))
    con.execute("UPDATE null_stats SET schema_version = 0 WHERE key_hash = ?",
                (stable_hash("k2"),))
    con.commit()
    con.close()
    with tdstore.open(tmp_path / "s") as store:
        cache = NullStatsCache(store)
        assert cache.get("k1") is None and cache.get("k2") is None
        assert cache.get_or_compute("k1", lambda: good) == good  # recomputed and repaired
        assert cache.get("k1") == good
        with pytest.raises(tdstore.InvalidInputError, match="null stats must be"):
            cache.put("k3", {"kinds": {"kl": {"mean": float("nan")}}})


RACE = textwrap.dedent("""
    import sys, tdstore
    from tdstore.analysis.nullstats import NullStatsCache, calibrate
    from tdstore.analysis.scoring import DummyDifferentialBackend, DummyResponses
    be = DummyDifferentialBackend(base=DummyResponses(), ft=DummyResponses())
    with tdstore.open(sys.argv[1]) as store:
        for _ in range(20):
            calibrate(be, ["a", "b"], runs=2, cache=NullStatsCache(store))
""")


def test_processes_racing_on_one_key_leave_one_valid_entry(tmp_path):
    tdstore.open(tmp_path / "s").close()
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path / "s")],
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    with tdstore.open(tmp_path / "s") as store:
        cache = NullStatsCache(store)
        (entry,) = cache.keys()
        assert cache.show(entry["key_hash"])["stats"] == calibrate(
            DummyDifferentialBackend(base=DummyResponses(), ft=DummyResponses()), ["a", "b"],
            runs=2)


def test_nullstats_commands(tmp_path):
    with tdstore.open(tmp_path / "s") as store:
        cache = NullStatsCache(store)
        h1 = cache.put({"model": "a"}, calibrate(backend(), PROMPTS, runs=2))
        cache.put({"model": "b"}, calibrate(backend(), PROMPTS, runs=2))
    run = CliRunner().invoke
    rows = json.loads(run(main, ["nullstats", "ls", str(tmp_path / "s"), "--json"]).output)
    assert {r["key_hash"] for r in rows} >= {h1} and len(rows) == 2
    shown = json.loads(run(main, ["nullstats", "show", str(tmp_path / "s"), h1[:10],
                                  "--json"]).output)
    assert shown["key_hash"] == h1 and shown["stats"]["kinds"]["kl"]["n"] == 2
    text = run(main, ["nullstats", "show", str(tmp_path / "s"), h1[:10]]).output
    assert "degenerate" in text and h1 in text
    assert run(main, ["nullstats", "rm", str(tmp_path / "s"), h1]).exit_code == 0
    missing = run(main, ["nullstats", "rm", str(tmp_path / "s"), h1])
    assert missing.exit_code == 2 and "no null stats" in missing.stderr
    assert "removed 1 entries" in run(main, ["nullstats", "clear", str(tmp_path / "s")]).output
    assert json.loads(run(main, ["nullstats", "ls", str(tmp_path / "s"), "--json"]).output) == []


def test_bench_nullstats_command():
    res = CliRunner().invoke(main, ["bench-nullstats", "--gets", "200", "--reps", "1", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["tdstore_us"] > 0 and r["diskcache_us"] > 0 and r["ratio"] > 0


@pytest.mark.parametrize("stats", [
    {"kl": {"mean": 0.5, "std": 0.1, "n": 8, "degenerate": False}},
    {"kl": {"mean": 0.5, "std": 0.1, "n": 8, "degenerate": False},
     "js": {"mean": 0.2, "std": 1e-6, "n": 8, "degenerate": True}},
])
def test_the_plain_per_kind_mapping_is_stored_as_given(tmp_path, stats):
    with tdstore.open(tmp_path / "s") as store:
        cache = NullStatsCache(store)
        assert cache.get_or_compute({"model": "m"}, lambda: stats) == stats
        cache.put({"model": "n"}, stats)
    with tdstore.open(tmp_path / "s") as store:  # and back, equal, after a reopen
        cache = NullStatsCache(store)
        assert cache.get({"model": "m"}) == stats == cache.get({"model": "n"})
        assert zscore(0.7, cache.get({"model": "m"}), "kl") == pytest.approx(2.0)


@pytest.mark.parametrize("bad", [
    {"kl": {"mean": float("nan"), "std": 0.1, "n": 8, "degenerate": False}},
    {"kl": {"mean": 0.5, "std": 0.1, "n": 8}},
    {"kl": {"mean": 0.5, "std": 0.1, "n": 8, "degenerate": "no"}},
    {"kl": {"mean": True, "std": 0.1, "n": 8, "degenerate": False}},
    {"kl": 3},
    {},
])
def test_malformed_plain_mappings_are_refused(tmp_path, bad):
    with tdstore.open(tmp_path / "s") as store:
        with pytest.raises(tdstore.InvalidInputError, match="null stats must be"):
            NullStatsCache(store).put({"model": "m"}, bad)
        assert NullStatsCache(store).keys() == []
