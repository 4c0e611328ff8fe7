"""Acknowledged data is never wrong and never lost, at the edges: compressed reads racing
writers, churn, Ctrl-C inside a commit, delete and re-create races, read-only readers,
the budget after a crash, hostile names and malformed input. Each test names the
failure class it guards against; all use real stores, real subprocesses and signals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import fingerprint, kv

import tdstore
from tdstore.cli import main as cli
from tdstore.dev.harness import STOP_TRIES, wait_stopped

BLOCKS = 24
SHAPE = (8, 32)


def _py(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def _spawn(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# Versions a writer process writes (deterministic, recomputed by the reader).
VERSIONS = textwrap.dedent("""
    import numpy as np
    def master(i):
        return np.random.default_rng(1000 + i).standard_normal((24, 8, 32)).astype(np.float16)
    def mirror(i, m):
        a = m.copy()
        a[[i % 24, (7 * i + 3) % 24]] = np.random.default_rng(5000 + i).standard_normal(
            (2, 8, 32)).astype(np.float16)
        return a
""")
ns: dict = {}
exec(VERSIONS, ns)


# ----------------------------------------------------------------- 1. compressed races


@pytest.mark.slow
@pytest.mark.parametrize("compressor", ["zstd", "blosc-lz4", None])
def test_reads_racing_rewrites_return_only_written_versions(tmp_path, compressor):
    """A writer re-registers a mirror (and every fifth time the master) while this
    process reads both: every read is one complete written version, never zeros."""
    path = tmp_path / "s"
    iterations = 150
    base = ns["master"](0)
    with tdstore.open(path) as store:
        g = store.group("g", compressor=compressor, chunk_blocks=4)
        g.register_master("m", base)
        g.register_mirror("a", ns["mirror"](0, base))
    masters = {_digest(ns["master"](i)) for i in range(iterations)} | {_digest(base)}
    mirrors = set()
    m = base
    for i in range(iterations):
        if i % 5 == 0:
            m = ns["master"](i)
        mirrors |= {_digest(ns["mirror"](i, base)), _digest(ns["mirror"](i, m))}
    writer = _spawn(VERSIONS + """
import sys, tdstore
with tdstore.open(sys.argv[1]) as store:
    g = store.group("g")
    last = {}
    m = master(0)
    for i in range(int(sys.argv[2])):
        if i % 5 == 0:
            m = master(i)
            g.register_master("m", m)   # the mirror is re-derived: it keeps its values
        else:
            g.register_mirror("a", mirror(i, m))
print("done")
""", path, iterations)
    reads = bad = 0
    with tdstore.open(path) as store:
        g = store.group("g")
        while writer.poll() is None and reads < 3000:
            got_m, got_a = g.reconstruct("m"), g.reconstruct("a")
            reads += 2
            bad += _digest(got_m) not in masters
            bad += _digest(got_a) not in mirrors
            view = g.view("a")[3:9]
            bad += not (view == got_a[3:9]).all() and _digest(g.reconstruct("a")) not in mirrors
    out, err = writer.communicate()
    assert writer.returncode == 0, err
    assert bad == 0 and reads > 0


@pytest.mark.slow
def test_churn_never_surfaces_as_corruption(tmp_path):
    """A reader of a 16 MiB mirror whose own blocks are re-registered as fast as a
    writer can never gets an error: each read that finds its data replaced retries on a
    fresh snapshot until it holds a consistent one."""
    path = tmp_path / "s"
    script = """
import sys, numpy as np, tdstore
base = np.random.default_rng(0).standard_normal((128, 256, 128)).astype(np.float32)
def version(i):
    a = base.copy()
    a[[i % 128, (i * 7 + 1) % 128]] = i
    return a
"""
    ns_churn: dict = {}
    exec(script, ns_churn)
    with tdstore.open(path) as store:
        g = store.group("g", chunk_blocks=8)
        g.register_master("m", ns_churn["base"])
        g.register_mirror("a", ns_churn["version"](1))
    writer = _spawn(script + """
with tdstore.open(sys.argv[1]) as store:
    g = store.group("g")
    for i in range(2, 202):
        g.register_mirror("a", version(i))
""", path)
    errors, reads = [], 0
    with tdstore.open(path) as store:
        g = store.group("g")
        while writer.poll() is None and reads < 5000:
            try:
                if reads % 2:  # a scattered view: many small reads, a long read window
                    g.view("a")[::3]
                else:
                    got = g.reconstruct("a")
                    changed = got != ns_churn["base"]
                    i = int(got[changed][0]) if changed.any() else -1
                    if i < 1 or not (got == ns_churn["version"](i)).all():
                        errors.append(f"read {reads}: not a written version")
            except tdstore.TdStoreError as exc:
                errors.append(repr(exc))
            reads += 1
    writer.communicate()
    assert writer.returncode == 0
    assert errors == [] and reads > 0


# ----------------------------------------------------------------- 2. Ctrl-C in a commit


WRITE_LOOP = VERSIONS + """
import json, signal, sys, tdstore
signal.signal(signal.SIGINT, signal.default_int_handler)  # also in a background job
kind = sys.argv[2]
with tdstore.open(sys.argv[1]) as store:
    g = store.group("g")
    m = master(0)
    i = int(sys.argv[3])
    while True:
        print(json.dumps({"begin": i}), flush=True)
        if kind == "mirror":
            g.register_mirror("a", mirror(i, m))
        elif kind == "master":
            g.register_master("m", master(i))
        else:
            g.collective_reuse_step(["a", "b"], master(i)[:3])
        print(json.dumps({"ack": i}), flush=True)
        i += 1
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mirror", "master", "append"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_in_a_write_loop_never_loses_the_acknowledged_state(tmp_path, kind, sig):
    """Ctrl-C or SIGTERM at growing delays into a write loop: the agent reads back as
    the last acknowledged write or the one in flight, verify finds no damage."""
    path = tmp_path / "s"
    with tdstore.open(path) as store:
        g = store.group("g", compressor="zstd" if sig == signal.SIGTERM else None)
        g.register_master("m", ns["master"](0))
        g.register_mirror("a", ns["mirror"](0, ns["master"](0)))
    start = 1
    for attempt in range(5):
        before = {}
        with tdstore.open(path) as store:
            g = store.group("g")
            before = {a: g.reconstruct(a) for a in g.agents()}
        proc = _spawn(WRITE_LOOP, path, kind, start)
        acked, begun = [], []
        deadline_lines = 2 + attempt  # stop after a growing number of begun writes
        for line in proc.stdout:
            msg = json.loads(line)
            if "begin" in msg:
                begun.append(msg["begin"])
                if len(begun) >= deadline_lines:
                    time.sleep(0.002 * attempt)
                    proc.send_signal(sig)
                    break
            else:
                acked.append(msg["ack"])
        rest, _, repeated = wait_stopped(proc, sig)
        assert repeated < STOP_TRIES, f"the writer did not stop after {sig.name}"
        for line in rest.splitlines():  # the writer may have run ahead of what we read
            msg = json.loads(line)
            if "begin" in msg:
                begun.append(msg["begin"])
            else:
                acked.append(msg["ack"])
        with tdstore.open(path) as store:
            report = store.verify()
            assert not report.damage, [str(f) for f in report.damage]
            g = store.group("g")
            state = {a: g.reconstruct(a) for a in g.agents()}
        m = ns["master"](0)
        # what the store may hold: the state after the last ack, or after the op in flight
        if kind == "mirror":
            ok = {_digest(ns["mirror"](i, m)) for i in (acked[-1:] or [start - 1]) +
                  [begun[-1]]} | ({_digest(before["a"])} if not acked else set())
            assert _digest(state["a"]) in ok
        elif kind == "master":
            ok = {_digest(ns["master"](i)) for i in acked[-1:] + [begun[-1]]} | \
                ({_digest(before["m"])} if not acked else set())
            assert _digest(state["m"]) in ok
            assert (state["a"] == before["a"]).all()  # re-derived, same values
        else:
            n_done = len(acked) + (state["m"].shape[0] - before["m"].shape[0]
                                   - 3 * len(acked)) // 3
            assert n_done in (len(acked), len(acked) + 1)
            tail = [ns["master"](i)[:3] for i in begun[:n_done]]
            want = np.concatenate([before["m"], *tail]) if tail else before["m"]
            assert state["m"].tobytes() == want.tobytes()
        start = begun[-1] + 1


# ----------------------------------------------------------------- 3. delete / re-create


@pytest.mark.slow
def test_deleting_and_recreating_a_group_concurrently_loses_nothing(tmp_path):
    path = tmp_path / "s"
    tdstore.open(path).close()
    script = VERSIONS + """
import json, sys, tdstore
path, me, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {"errors": [], "acked": []}
with tdstore.open(path) as store:
    for i in range(n):
        try:
            if i % 3 == 0:
                store.delete_group("x")
            else:
                g = store.group("x")
                if i % 3 == 1:
                    g.register_master(f"m{me}", master(me * 1000 + i))
                elif (master_id := g.master_id) is not None:
                    g.register_mirror(f"a{me}", mirror(i, g.reconstruct(master_id)))
                out["acked"].append(i)
        except (tdstore.NotFoundError, tdstore.NoMasterError):
            pass  # deleted (or re-created without a master) by another process meanwhile
        except Exception as exc:
            out["errors"].append(f"{type(exc).__name__}: {exc}")
print(json.dumps(out))
"""
    procs = [_spawn(script, path, me, 60) for me in range(3)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert [r["errors"] for r in results] == [[], [], []]
    with tdstore.open(path) as store:
        assert not store.verify().damage
        store.gc()
        report = store.verify()
        assert report.ok, [str(f) for f in report.findings]
        live = set()
        if "x" in store:
            g = store.group("x")
            for agent in g.agents():  # everything still listed reads back
                g.reconstruct(agent)
            import sqlite3

            con = sqlite3.connect(path / "catalog.sqlite")
            live = {r[0] for r in con.execute("SELECT gid FROM groups")}
            con.close()
        # after gc, the only group directory left is the live group's
        assert {p.name for p in (path / "data").iterdir() if p.is_dir()} <= live


# ----------------------------------------------------------------- 5. read-only readers


def _unwritable_view(store_path: Path):
    """A path to the store that this process cannot write (a read-only bind mount as
    root, permission bits otherwise); returns (path, undo)."""
    if os.geteuid() == 0:
        mount = Path(tempfile.mkdtemp(prefix="tdstore-ro-"))
        for cmd in (["mount", "--bind", str(store_path), str(mount)],
                    ["mount", "-o", "remount,ro,bind", str(mount)]):
            if shutil.which("mount") is None or subprocess.run(cmd, capture_output=True
                                                               ).returncode != 0:
                subprocess.run(["umount", str(mount)], capture_output=True)
                pytest.skip("root without mount: no way to make a directory unwritable")

        def undo() -> None:
            subprocess.run(["umount", str(mount)], capture_output=True)
            mount.rmdir()
        return mount, undo
    os.chmod(store_path, 0o555)
    return store_path, lambda: os.chmod(store_path, 0o755)


def test_a_read_only_reader_sees_later_commits(tmp_path):
    path = tmp_path / "s"
    with tdstore.open(path) as store:
        store.group("g").register_master("m", kv(8, (4, 8)))
    # no WAL file is left once the writer has closed: the case that went stale
    assert not (path / "catalog.sqlite-wal").exists()
    view, undo = _unwritable_view(path)
    try:
        with tdstore.open(view, readonly=True) as reader:
            g = reader.group("g")
            assert g.agents() == ["m"]
            with tdstore.open(path) as writer:  # a writer keeps its connection open
                w = writer.group("g")
                for i in range(3):
                    w.register_mirror(f"a{i}", kv(8, (4, 8), seed=i + 1))
                    assert g.agents() == ["m"] + [f"a{j}" for j in range(i + 1)]
                    assert (g.reconstruct(f"a{i}") == kv(8, (4, 8), seed=i + 1)).all()
            # the writer has closed (its WAL checkpointed and removed)
            assert reader.group("g").agents() == ["m", "a0", "a1", "a2"]
            with tdstore.open(path) as writer:
                writer.group("g").delete("a0")
            assert g.agents() == ["m", "a1", "a2"]
            assert (g.reconstruct("a2") == kv(8, (4, 8), seed=3)).all()
    finally:
        undo()


# ----------------------------------------------------------------- 6. budget after a crash


def _data_bytes(path: Path) -> int:
    return sum(p.lstat().st_size for p in (path / "data").rglob("*") if p.is_file()
               and not p.is_symlink())


@pytest.mark.slow
def test_the_budget_holds_after_a_write_killed_midway(tmp_path):
    path = tmp_path / "s"
    with tdstore.open(path, max_bytes=64 << 20) as store:  # a 1 MiB master, 256 chunks
        g = store.group("g", chunk_blocks=1)
        g.register_master("m", kv(256, (32, 32)))
        agent = g.stats()["bytes_stored"]  # an agent that differs everywhere: the same
        # room for the master and four such mirrors, and a quarter of one to spare
        budget = store.info()["bytes_accounted"] + 4 * agent + agent // 4
        store.set_max_bytes(budget)
    # a writer killed while it writes a 1 MiB mirror leaves most of its chunks behind
    proc = _spawn("""
import sys, numpy as np, tdstore
a = np.random.default_rng(9).standard_normal((256, 32, 32)).astype(np.float32)
with tdstore.open(sys.argv[1]) as store:
    print("go", flush=True)
    store.group("g").register_mirror("big", a)
print("committed", flush=True)
""", path)
    assert proc.stdout.readline().strip() == "go"
    gdir = next(p for p in (path / "data").iterdir() if p.is_dir())
    for _ in range(1_000_000):  # kill once most of the mirror is on disk (bounded poll)
        arrays = [d for d in gdir.iterdir() if d.name.startswith("d-")]
        if (arrays and sum(1 for _ in arrays[0].iterdir()) > 200) or proc.poll() is not None:
            break
    proc.kill()
    out, _ = proc.communicate()
    if "committed" in out:
        pytest.skip("the writer finished before it could be killed")  # never seen here
    left = _data_bytes(path)
    assert left > (1 << 20) + (600 << 10)  # the master plus most of the killed mirror
    # a fresh process fills the budget: what it writes plus what the crash left fit
    with tdstore.open(path) as store:
        g = store.group("g")
        for i in range(7):
            try:
                g.register_mirror(f"x{i}", kv(256, (32, 32), seed=20 + i))
            except tdstore.StoreFullError:
                pass
            assert _data_bytes(path) <= budget, (i, _data_bytes(path), left)
        assert store.info()["bytes_accounted"] <= budget


# ----------------------------------------------------------------- 9. names


LONE = ["\udcff", "a\ud800b", "\udfff" * 3]


@pytest.mark.parametrize("name", LONE)
def test_names_that_are_not_utf8_are_refused_before_anything_is_written(tmp_path, name):
    path = tmp_path / "s"
    with tdstore.open(path) as store:
        g = store.group("g")
        g.register_master("m", kv(8, (4, 8)))
    before = fingerprint(path)
    with tdstore.open(path) as store:
        g = store.group("g")
        with pytest.raises(tdstore.InvalidInputError, match="UTF-8"):
            store.group(name)
        with pytest.raises(tdstore.InvalidInputError, match="UTF-8"):
            g.register_mirror(name, kv(8, (4, 8), seed=1))
        with pytest.raises(tdstore.InvalidInputError, match="UTF-8"):
            g.collective_reuse_step(["m", name], kv(2, (4, 8), seed=2))
        with pytest.raises(tdstore.InvalidInputError, match="UTF-8"):
            g.register_master(name, kv(8, (4, 8), seed=3))
    assert fingerprint(path) == before


def test_the_cli_reports_undecodable_names_in_one_line(tmp_path):
    path = tmp_path / "s"
    with tdstore.open(path) as store:
        store.group("g").register_master("m", kv(8, (4, 8)))
    env = dict(os.environ, LC_ALL="C.UTF-8")
    for args in (["rm", str(path), "g", "\udcff"], ["ls", str(path), "\udcff"],
                 ["export", str(path), "\udcff", "m", "-o", str(tmp_path / "x.npy")]):
        done = subprocess.run([sys.executable, "-m", "tdstore.cli", *args],
                              capture_output=True, env=env)
        err = done.stderr.decode("utf-8", "replace")
        assert done.returncode == 2, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------- 11. smaller items


def test_nan_written_by_a_racing_caller_is_refused(tmp_path):
    """The finite check runs on the bytes written (a private copy of each chunk), not on
    the caller's array read earlier: a caller that puts NaN into its array once the
    write has started cannot slip it into a group that refuses NaN."""
    import threading

    path = tmp_path / "s"
    with tdstore.open(path) as store:
        g = store.group("g", chunk_blocks=1)
        g.register_master("first", np.ones((2, 4), np.float32))  # creates data/<gid>
        gdir = next(p for p in (path / "data").iterdir() if p.is_dir())
        a = np.ones((64, 256, 256), np.float32)  # 64 chunk files, written one by one
        started = threading.Event()

        def poison() -> None:
            for _ in range(1_000_000):  # bounded: until the new array's directory appears
                if sum(1 for p in gdir.iterdir() if p.name.startswith("m-")) > 1:
                    break
            a[-1, 0, 0] = np.nan  # the last block is written last
            started.set()

        t = threading.Thread(target=poison)
        t.start()
        try:
            g.register_master("m", a)
            stored = True
        except tdstore.InvalidInputError as exc:
            stored = False
            assert "NaN" in str(exc) and "63" in str(exc)
        t.join()
        assert started.is_set()
        if stored:
            assert np.isfinite(g.reconstruct("m")).all()
        else:
            assert g.agents() == ["first"]
        assert not store.verify().damage


@pytest.mark.parametrize("value", [10**400, float("inf"), float("nan"), -1, "x", [1]])
def test_a_bad_threshold_is_a_clear_error(store, value):
    with pytest.raises(tdstore.InvalidInputError, match="diff_threshold"):
        store.group("g", diff_threshold=value)
    assert "g" not in store


def test_membership_of_non_strings_is_false(store):
    store.group("g").register_master("m", kv(4, (2, 2)))
    assert ["g"] not in store and 1 not in store and None not in store
    g = store.group("g")
    assert ["m"] not in g and b"m" not in g and "m" in g


def test_a_masked_array_is_refused(store):
    a = np.ma.masked_array(kv(4, (2, 2)), mask=np.zeros((4, 2, 2), bool))
    with pytest.raises(tdstore.InvalidInputError, match="masked"):
        store.group("g").register_master("m", a)
    assert store.group("g").agents() == []


def test_a_zero_slice_step_is_a_clear_error(store):
    g = store.group("g")
    g.register_master("m", kv(4, (2, 2)))
    with pytest.raises(tdstore.InvalidInputError, match="step"):
        g.view("m")[::0]


def test_a_broadcast_array_too_large_to_copy_is_refused(store):
    huge = np.broadcast_to(np.float32(1), (10**12, 4, 8))
    with pytest.raises(tdstore.InvalidInputError, match="free memory|at most"):
        store.group("g").register_master("m", huge)
    assert store.group("g").agents() == []


def test_an_empty_catalogue_beside_data_is_refused_without_writing_to_it(tmp_path):
    path = tmp_path / "s"
    with tdstore.open(path) as store:
        store.group("g").register_master("m", kv(4, (2, 2)))
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}/catalog.sqlite{suffix}").unlink(missing_ok=True)
    (path / "catalog.sqlite").write_bytes(b"")
    for _ in range(2):
        with pytest.raises(tdstore.CorruptionError, match="empty"):
            tdstore.open(path)
        assert (path / "catalog.sqlite").stat().st_size == 0
    assert not (path / "catalog.sqlite-wal").exists()


def test_cli_signals_end_a_command_in_one_line(tmp_path):
    """SIGTERM during a CLI command: one line, exit 130, the store consistent."""
    path = tmp_path / "s"
    big = tmp_path / "big.npy"
    np.save(big, np.random.default_rng(0).standard_normal((256, 128, 128)).astype(np.float32))
    with tdstore.open(path) as store:
        store.group("g")
    proc = subprocess.Popen([sys.executable, "-m", "tdstore.cli", "import", str(path), "g",
                             "m", str(big)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    gdir = path / "data"
    for _ in range(100000):
        if any(d.is_dir() for d in gdir.iterdir()) or proc.poll() is not None:
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    if proc.returncode != 0:  # interrupted (it may have finished first on a fast machine)
        assert proc.returncode == 130, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "interrupted" in err
    with tdstore.open(path) as store:
        assert not store.verify().damage
        g = store.group("g")
        assert g.agents() in ([], ["m"])


def test_cli_rm_of_an_undecodable_name_is_one_line(tmp_path):
    path = tmp_path / "s"
    with tdstore.open(path) as store:
        store.group("g").register_master("m", kv(4, (2, 2)))
    before = fingerprint(path)
    for args in (["rm", str(path), "g\udcff"], ["rm", str(path), "g", "m\udcff"],
                 ["stats", str(path), "\udcff"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert "UTF-8" in result.output and len(result.output.strip().splitlines()) == 1
    assert fingerprint(path) == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_commit_is_delivered_after_it(sig):
    """A signal inside the deferred block (a commit) waits for the block, then acts as
    it would have: KeyboardInterrupt for SIGINT, termination for SIGTERM; none is lost."""
    done = _py(f"""
import os, signal, time
from tdstore.storage.locks import deferred_signals
signal.signal(signal.SIGINT, signal.default_int_handler)  # also in a background job
try:
    with deferred_signals():
        os.kill(os.getpid(), {int(sig)})
        time.sleep(0.05)
        print("committed", flush=True)
    time.sleep(0.5)
    print("not stopped", flush=True)
except KeyboardInterrupt:
    print("interrupted after the block", flush=True)
""")
    assert done.stdout.splitlines()[0] == "committed"
    if sig == signal.SIGINT:
        assert done.stdout.splitlines()[1:] == ["interrupted after the block"]
    else:
        assert done.returncode == -signal.SIGTERM and "not stopped" not in done.stdout


AT_COMMIT = VERSIONS + """
import os, signal, sys, tdstore
from sqlalchemy import event
from sqlalchemy.orm import Session
signal.signal(signal.SIGINT, signal.default_int_handler)
path, kind, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
commits = []

def after_commit(session):
    bind = session.bind
    if bind is None or not bind.get_execution_options().get("tdstore_write"):
        return  # a read transaction
    commits.append(1)
    if len(commits) == nth:  # a real Ctrl-C, right after the database committed
        os.kill(os.getpid(), signal.SIGINT)

with tdstore.open(path) as store:
    g = store.group("g")
    m = master(0)
    event.listen(Session, "after_commit", after_commit)
    try:
        if kind == "mirror":
            g.register_mirror("a", mirror(1, m))
        elif kind == "master":
            g.register_master("m", master(1))
        else:
            g.collective_reuse_step(["a"], master(1)[:3])
        print("returned")
    except KeyboardInterrupt:
        print("interrupted")
    event.remove(Session, "after_commit", after_commit)
"""


@pytest.mark.parametrize("kind", ["mirror", "master", "append"])
@pytest.mark.parametrize("nth", [1, 2, 3, 4])
def test_ctrl_c_right_after_each_commit_of_a_write_keeps_the_store_whole(tmp_path, kind,
                                                                        nth):
    """SIGINT delivered right after the n-th database commit of a write (a journal
    row, the write's own commit, the removal of what it replaced): the write either
    took effect entirely or not at all, and nothing the catalogue references is gone."""
    path = tmp_path / "s"
    m0 = ns["master"](0)
    with tdstore.open(path) as store:
        g = store.group("g", compressor="zstd" if kind == "append" else None)
        g.register_master("m", m0)
        g.register_mirror("a", ns["mirror"](0, m0))
    done = _py(AT_COMMIT, path, kind, nth)
    assert done.returncode == 0, done.stderr
    with tdstore.open(path) as store:
        assert not store.verify().damage
        store.gc()
        report = store.verify()
        assert report.ok, [str(f) for f in report.findings]
        g = store.group("g")
        state = {a: g.reconstruct(a) for a in g.agents()}
    if kind == "mirror":
        assert _digest(state["a"]) in {_digest(ns["mirror"](0, m0)),
                                       _digest(ns["mirror"](1, m0))}
    elif kind == "master":
        assert _digest(state["m"]) in {_digest(m0), _digest(ns["master"](1))}
        assert _digest(state["a"]) == _digest(ns["mirror"](0, m0))
    else:
        grown = np.concatenate([m0, ns["master"](1)[:3]])
        assert _digest(state["m"]) in {_digest(m0), _digest(grown)}
        assert state["a"].shape == state["m"].shape
    if "returned" in done.stdout:  # acknowledged: it must have taken effect
        changed = {"mirror": _digest(state["a"]) == _digest(ns["mirror"](1, m0)),
                   "master": _digest(state["m"]) == _digest(ns["master"](1)),
                   "append": state["m"].shape[0] == m0.shape[0] + 3}[kind]
        assert changed
