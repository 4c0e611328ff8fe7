"""Faults: a full disk, failing writes and fsyncs, a read-only directory, a damaged
catalogue. Each gives a clear error and leaves the store as it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import fingerprint, kv

import tdstore


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "s"
    with tdstore.open(path) as store:
        g = store.group("rag")
        g.register_master("retriever", kv(64, (32, 32)))
        mirror = kv(64, (32, 32))
        mirror[-4:] = 0
        g.register_mirror("critic", mirror)
    return path


INJECT = textwrap.dedent("""
    import errno, json, os, sys, numpy as np, tdstore
    path, call, fail_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real = getattr(os, call)
    seen = [0]

    def failing(*args):
        seen[0] += 1
        if seen[0] > fail_after:
            code = errno.ENOSPC if call == "write" else errno.EIO
            raise OSError(code, os.strerror(code))
        return real(*args)

    store = tdstore.open(path)
    g = store.group("rag")
    setattr(os, call, failing)
    try:
        big = np.random.default_rng(1).standard_normal((64, 32, 32), np.float32)
        g.register_mirror("new", big)
        print(json.dumps({"error": None}))
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc),
                          "is_oserror": isinstance(exc, OSError)}))
""")


@pytest.mark.parametrize("call, fail_after", [("write", 0), ("write", 1), ("fsync", 0),
                                              ("fsync", 2)])
def test_a_failing_write_or_fsync_gives_a_clear_error_and_changes_nothing(store_path, call,
                                                                          fail_after):
    before = fingerprint(store_path)
    done = subprocess.run([sys.executable, "-c", INJECT, str(store_path), call,
                           str(fail_after)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["error"] == "StorageError" and out["is_oserror"]
    assert "group 'rag': writing failed" in out["message"]
    assert "nothing was committed" in out["message"]
    assert fingerprint(store_path) == before
    with tdstore.open(store_path) as store:
        assert store.verify().ok and store.group("rag").agents() == ["retriever", "critic"]


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True)
    return done.returncode == 0


def test_a_really_full_disk_gives_a_clear_error_and_changes_nothing(tmp_path):
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "3m"):
        pytest.skip("mounting a tmpfs needs root; the injected ENOSPC test covers this")
    try:
        path = mnt / "s"
        with tdstore.open(path) as store:
            g = store.group("rag")
            g.register_master("retriever", kv(256, (32, 32)))  # 1 MiB
            g.register_mirror("critic", kv(256, (32, 32), seed=1))  # 1 MiB more
            before = fingerprint(path)
            with pytest.raises(tdstore.StorageError, match="No space left on device"):
                g.register_mirror("judge", kv(256, (32, 32), seed=2))  # does not fit
            assert fingerprint(path)[1] == before[1]
            assert g.agents() == ["retriever", "critic"]
            assert np.array_equal(g.reconstruct("critic"), kv(256, (32, 32), seed=1))
            assert store.verify().ok
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_read_only_directory(store_path):
    before = fingerprint(store_path)
    script = textwrap.dedent("""
        import json, sys, numpy as np, tdstore
        path = sys.argv[1]
        out = {}
        try:
            tdstore.open(path)
        except tdstore.ReadOnlyError as exc:
            out["writable_open"] = str(exc)
        with tdstore.open(path, readonly=True) as store:
            g = store.group("rag")
            out["agents"] = g.agents()
            out["critic_sum"] = float(g.reconstruct("critic").sum())
            out["view"] = g.view("critic")[60:].shape[0]
            out["verify_ok"] = store.verify().ok
            out["info_groups"] = store.info()["groups"]
            try:
                g.register_mirror("x", g.reconstruct("critic"))
            except tdstore.ReadOnlyError as exc:
                out["write"] = str(exc)
        print(json.dumps(out))
    """)
    mount = None
    if os.geteuid() == 0:  # root ignores permission bits: a read-only bind mount stops it
        mount = Path(tempfile.mkdtemp(prefix="tdstore-ro-"))
        binds = [["mount", "--bind", str(store_path), str(mount)],
                 ["mount", "-o", "remount,ro,bind", str(mount)]]
        for cmd in binds:
            if shutil.which("mount") is None or subprocess.run(cmd, capture_output=True
                                                               ).returncode != 0:
                subprocess.run(["umount", str(mount)], capture_output=True)
                pytest.skip("root without mount: no way to make a directory unwritable")
        target = mount
    else:
        target = store_path
        for p in [target, *target.rglob("*")]:
            if p.is_dir():
                os.chmod(p, 0o555)
    try:
        done = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
    finally:
        if mount is not None:
            subprocess.run(["umount", str(mount)], capture_output=True)
            mount.rmdir()
        else:
            for p in [target, *target.rglob("*")]:
                if p.is_dir():
                    os.chmod(p, 0o755)
    assert "not writable by this process; open it with readonly=True" in out["writable_open"]
    assert out["agents"] == ["retriever", "critic"] and out["view"] == 4
    assert out["verify_ok"] and out["info_groups"] == 1
    assert "read-only" in out["write"]
    assert out["critic_sum"] == pytest.approx(float(kv(64, (32, 32))[:-4].sum()), rel=1e-6)
    assert fingerprint(store_path) == before


def test_a_damaged_catalogue_is_reported_not_used(store_path):
    before_data = fingerprint(store_path)[1]
    cat = store_path / "catalog.sqlite"
    data = bytearray(cat.read_bytes())
    data[:16] = b"garbage garbage!"
    cat.write_bytes(bytes(data))
    for readonly in (False, True):
        with pytest.raises(tdstore.CorruptionError, match="catalogue .* damaged"):
            tdstore.open(store_path, readonly=readonly)
    assert fingerprint(store_path)[1] == before_data


def test_an_emptied_catalogue_is_not_initialised_over_existing_data(store_path):
    before_data = fingerprint(store_path)[1]
    for name in ("catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm"):
        p = store_path / name
        if p.exists():
            p.write_bytes(b"")
    with pytest.raises(tdstore.CorruptionError, match="refusing to initialise it"):
        tdstore.open(store_path)
    assert fingerprint(store_path)[1] == before_data
