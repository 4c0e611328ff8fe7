"""Crashes and concurrency, with real subprocesses (short runs of the tools/ harnesses)."""

from __future__ import annotations

from tdstore.harness import concurrency_test, crash_test


def test_sigkill_at_random_moments_loses_nothing_acknowledged(tmp_path):
    report = crash_test(tmp_path / "store", 50, seed=11)
    assert report.failures == []
    assert report.kills == 50 and report.ops_committed > 100
    # the kills landed inside several kinds of operation
    assert len(report.killed_during) >= 3


def test_four_processes_with_two_threads_each_share_a_store(tmp_path):
    r = concurrency_test(tmp_path / "store", processes=4, threads=2, seconds=3)
    assert r["errors"] == []  # "database is locked" or anything else never reaches a caller
    assert r["mismatches"] == 0 and r["verify_ok"]
    assert r["ops"]["writes"] > 50 and r["ops"]["reads"] > 50
