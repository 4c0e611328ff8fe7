"""Crashes and concurrency, with real subprocesses (short runs of the tools/ harnesses)."""

from __future__ import annotations

import signal

import pytest

from tdstore.dev.harness import concurrency_test, crash_test

pytestmark = pytest.mark.slow


def test_sigkill_at_random_moments_loses_nothing_acknowledged(tmp_path):
    report = crash_test(tmp_path / "store", 50, seed=11)
    assert report.failures == []
    assert report.kills == 50 and report.ops_committed > 100
    # the kills landed inside several kinds of operation
    assert len(report.killed_during) >= 3


def test_sigint_and_sigterm_at_random_moments_lose_nothing_acknowledged(tmp_path):
    # Ctrl-C raises KeyboardInterrupt inside the write: its cleanup must remove only
    # data a fresh read of the catalogue shows unreferenced, even right after a commit
    report = crash_test(tmp_path / "store", 60, seed=5,
                        signals=(signal.SIGINT, signal.SIGTERM))
    assert report.failures == []
    assert report.kills == 60
    assert report.signals["SIGINT"] > 10 and report.signals["SIGTERM"] > 10


def test_four_processes_with_two_threads_each_share_a_store(tmp_path):
    # a fixed number of operations per thread: the outcome does not depend on speed
    r = concurrency_test(tmp_path / "store", processes=4, threads=2, ops=60)
    assert r["errors"] == []  # "database is locked" or anything else never reaches a caller
    assert r["mismatches"] == 0 and r["verify_ok"]
    ops = r["ops"]
    assert ops["writes"] > 0 and ops["reads"] > 0 and ops["master_writes"] > 0
    assert ops["group_deletes"] > 0 and ops["ops_compressed"] > 0
