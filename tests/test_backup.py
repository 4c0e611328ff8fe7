"""`tdstore backup`: a consistent copy of a store while other processes write to it.

Real stores on temporary paths, real writer subprocesses, no mocks. Writers that must
act at a precise moment of a backup do so from its progress callback (called before
each array is copied), so those tests do not depend on the machine's speed.
"""

from __future__ import annotations

import inspect
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import fingerprint

import tdstore
from tdstore.cli import main
from tdstore.ops.backup import MAX_ROUNDS, backup

BLOCK = (4, 8)

def blocks(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *BLOCK)).astype(np.float16)


class Model:
    """The agents of each group as the writer's ops leave them. The writer prints each
    op with its seed before calling it, so replaying the printed ops gives every state
    the store went through, in order."""

    def __init__(self) -> None:
        self.groups: dict[str, dict[str, np.ndarray]] = {}
        self.masters: dict[str, str] = {}

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        return {g: dict(a) for g, a in self.groups.items() if a}

    def apply(self, group: str, op: str, agent: str, seed: int, k: int) -> tuple[str, tuple]:
        """Apply one op; returns (method, args) to call on the store's group."""
        agents = self.groups.setdefault(group, {})
        master = self.masters.get(group)
        if op == "master":  # another agent replaces every mirror; the same one keeps them
            value = blocks(seed, k)
            if agent != master:
                agents.clear()
                self.masters[group] = agent
            agents[agent] = value
            return "register_master", (agent, value)
        if op == "mirror":
            value = agents[master].copy()
            rng = np.random.default_rng(seed + 1)
            idx = rng.choice(len(value), size=min(k, len(value)), replace=False)
            value[idx] = blocks(seed, len(idx))
            agents[agent] = value
            return "register_mirror", (agent, value)
        if op == "append":  # agents named that are not in the group join as copies
            new = blocks(seed, k)
            names = agent.split(",")
            for a in list(agents):
                agents[a] = np.concatenate([agents[a], new])
            for a in names:
                if a not in agents:
                    agents[a] = agents[master].copy()
            return "collective_reuse_step", (names, new)
        if op == "delete":
            del agents[agent]
            return "delete", (agent,)
        raise ValueError(op)


WRITER = "\n".join([
    "import os, sys",
    "import numpy as np",
    "import tdstore",
    f"BLOCK = {BLOCK!r}",
    inspect.getsource(blocks),
    inspect.getsource(Model),
    textwrap.dedent('''
        path, stop_file, max_ops = sys.argv[1], sys.argv[2], int(sys.argv[3])
        rng = np.random.default_rng(20261123)
        model = Model()
        with tdstore.open(path) as store:
            groups = {"plain": store.group("plain", chunk_blocks=4),
                      "packed": store.group("packed", compressor="zstd", chunk_blocks=4)}

            def run(group, op, agent, k):
                seed = int(rng.integers(2**31))
                print(f"op {group} {op} {agent} {seed} {k}", flush=True)
                method, args = model.apply(group, op, agent, seed, k)
                getattr(groups[group], method)(*args)

            for name in groups:
                run(name, "master", "m", 10)
            for i in range(max_ops):
                if os.path.exists(stop_file):
                    break
                name = ("plain", "packed")[i % 2]
                agents, master = model.groups[name], model.masters[name]
                n = len(agents[master])
                mirrors = sorted(a for a in agents if a != master)
                r = rng.random()
                if r < 0.45:
                    run(name, "mirror", str(rng.choice(["a", "b", "c"])),
                        int(rng.integers(1, 4)))
                elif r < 0.65 and n < 40:
                    run(name, "append", ",".join(rng.choice(["m", "n", "a", "d"], 2,
                                                            replace=False)),
                        int(rng.integers(1, 6)))
                elif r < 0.75 and mirrors:
                    run(name, "delete", str(rng.choice(mirrors)), 0)
                elif r < 0.85:  # the master re-registered: mirrors keep their values
                    run(name, "master", master, n)
                else:  # a new master replaces the group: every mirror's array goes
                    run(name, "master", "n" if master == "m" else "m",
                        int(rng.integers(6, 14)))
        print("done", flush=True)
    '''),
])


# --------------------------------------------------------------------------- helpers


def contents(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every agent of every group of the store at ``path``, reconstructed."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with tdstore.open(path, readonly=True) as store:
        for name in store.groups():
            g = store.group(name, create=False)
            agents = {a: g.reconstruct(a) for a in g.agents()}
            if agents:
                out[name] = agents
    return out


def same(a: dict, b: dict) -> bool:
    """Bit-exact equality of two contents() results."""
    if a.keys() != b.keys():
        return False
    for g in a:
        if a[g].keys() != b[g].keys():
            return False
        for agent, value in a[g].items():
            other = b[g][agent]
            if value.shape != other.shape or value.dtype != other.dtype:
                return False
            if value.view(np.uint8).tobytes() != other.view(np.uint8).tobytes():
                return False
    return True


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (symlinks as their target), except SQLite's -wal/-shm."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_symlink():
            out[rel] = b"-> " + os.readlink(p).encode()
        elif p.is_file() and not rel.endswith(("-wal", "-shm")):
            out[rel] = p.read_bytes()
    return out


def gids(path: Path) -> dict[str, str]:
    con = sqlite3.connect(f"file:{path / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT name, gid FROM groups"))
    finally:
        con.close()


def arrays(path: Path) -> dict[tuple[str, str], str]:
    """(group, agent) -> array path, as the catalogue at ``path`` records them."""
    con = sqlite3.connect(f"file:{path / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        return {(g, a): p for g, a, p in con.execute(
            "SELECT groups.name, agents.name, agents.array FROM agents "
            "JOIN groups ON groups.id = agents.group_id")}
    finally:
        con.close()


def check_backup(dest: Path) -> dict:
    """The backup opens with tdstore.open, verify finds nothing; returns its contents."""
    with tdstore.open(dest, create=False) as store:
        report = store.verify()
    assert report.ok, [str(f) for f in report.findings]
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    return contents(dest)


def build(path: Path, compressor: str | None = None) -> None:
    """A store with masters, mirrors, appends (partly filled last chunks), an identical
    mirror, attributes, an empty group and a group whose master was deleted."""
    with tdstore.open(path) as store:
        g = store.group("rag", compressor=compressor, chunk_blocks=8)
        master = blocks(1, 30)
        g.register_master("retriever", master, attrs={"tokens": 1000})
        critic = master.copy()
        critic[[2, 17, 29]] = blocks(2, 3)
        g.register_mirror("critic", critic)
        g.register_mirror("twin", master)  # identical: no array of its own
        g.collective_reuse_step(["retriever", "critic", "joiner"], blocks(3, 5))
        h = store.group("other", compressor=compressor, chunk_blocks=4)
        h.register_master("m", blocks(4, 9))
        h.register_mirror("x", blocks(5, 9))
        store.group("empty")
        gone = store.group("gone")
        gone.register_master("m", blocks(6, 3))
        gone.delete("m")


# --------------------------------------------------------------------------- idle stores


@pytest.mark.parametrize("compressor", [None, "zstd", "blosc-lz4"])
def test_backup_of_an_idle_store_restores_bit_exact(tmp_path, compressor):
    src, dest = tmp_path / "src", tmp_path / "backup"
    build(src, compressor)
    before_rows, before_files = fingerprint(src)
    before_tree = tree(src)

    report = backup(src, dest)

    assert report["groups"] == 4 and report["agents"] == 6
    assert report["arrays"] == 4  # two masters, two mirrors with blocks of their own
    assert report["rounds"] == 1 and report["bytes"] > 0 and report["seconds"] >= 0
    assert report["source"] == str(src) and report["destination"] == str(dest)
    # nothing was written into the source
    assert fingerprint(src) == (before_rows, before_files)
    assert tree(src) == before_tree
    # the backup holds every catalogue row and exactly the source's data files
    assert fingerprint(dest) == (before_rows, before_files)
    got = check_backup(dest)
    assert same(got, contents(src))
    assert got["rag"]["critic"][17].tobytes() == blocks(2, 3)[1].tobytes()

    # restore: writers stopped, the backup moved into place, and the store used again
    restored = tmp_path / "restored"
    dest.rename(restored)
    with tdstore.open(restored) as store:
        g = store.group("rag", create=False)
        assert g.attrs("retriever") == {"tokens": 1000}
        g.collective_reuse_step(["retriever", "critic"], blocks(7, 3))
        g.register_mirror("late", g.reconstruct("retriever"))
        assert g.reconstruct("critic")[-3:].tobytes() == blocks(7, 3).tobytes()
        assert store.verify().ok


def test_backup_into_an_existing_empty_directory(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "empty"
    build(src)
    dest.mkdir()
    backup(src, dest)
    assert same(check_backup(dest), contents(src))


# --------------------------------------------------------------------------- concurrent writers


def test_backup_while_a_writer_process_runs(tmp_path):
    """Each backup taken under a writer looping register_mirror / register_master /
    collective_reuse_step / delete equals one state the writer went through, exactly."""
    src, stop = tmp_path / "src", tmp_path / "stop"
    errors = (tmp_path / "writer.err").open("w+")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(src), str(stop), "100000"],
        stdout=subprocess.PIPE, stderr=errors, text=True)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in writer.stdout:
            lines.append(line.strip())
            if len(lines) >= 20:
                started.set()
        started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    backups = []
    try:
        started.wait()  # returns once 20 ops were printed, or the writer ended
        assert writer.poll() is None, (tmp_path / "writer.err").read_text()
        overlapped = 0
        for i in range(8):  # until two backups ran while the writer made progress
            seen = len(lines)
            dest = tmp_path / f"backup-{i}"
            report = backup(src, dest)
            assert report["rounds"] <= MAX_ROUNDS
            backups.append(dest)
            overlapped += len(lines) > seen + 1
            if overlapped >= 2 and i >= 2:
                break
    finally:
        stop.touch()
        writer.wait()
        reader.join()
        errors.close()
    assert writer.returncode == 0, (tmp_path / "writer.err").read_text()
    assert lines[-1] == "done"

    found = {dest: check_backup(dest) for dest in backups}
    matched: set[Path] = set()
    model = Model()
    states = 0
    for line in [ln for ln in lines if ln.startswith("op ")]:
        _, group, op, agent, seed, k = line.split()
        model.apply(group, op, agent, int(seed), int(k))
        states += 1
        state = model.state()
        for dest, got in found.items():
            if dest not in matched and same(got, state):
                matched.add(dest)
    assert states > 20
    unmatched = [d.name for d in backups if d not in matched]
    assert not unmatched, f"backups equal to no state the writer went through: {unmatched}"
    # and the source itself ends clean and equal to the last state
    assert same(contents(src), model.state())
    with tdstore.open(src) as store:
        assert store.verify().ok


def _two_groups(src: Path, compressor: str | None = None) -> tuple[str, str]:
    """Groups 'g1' and 'g2' (g1's directory sorts first: its arrays are copied first),
    each a master of 10 blocks in chunks of 4 (the last one partly filled) and mirrors."""
    with tdstore.open(src) as store:
        for name, seed in (("g1", 10), ("g2", 20)):
            g = store.group(name, compressor=compressor, chunk_blocks=4)
            g.register_master("m", blocks(seed, 10))
            for j, agent in enumerate(("a", "b")):
                value = blocks(seed, 10)
                value[[j, 9]] = blocks(seed + j + 1, 2)
                g.register_mirror(agent, value)
    ids = gids(src)
    if ids["g1"] > ids["g2"]:  # name them by the order their directories sort in
        con = sqlite3.connect(src / "catalog.sqlite")
        with con:
            con.execute("UPDATE groups SET name = 'tmp' WHERE name = 'g1'")
            con.execute("UPDATE groups SET name = 'g1' WHERE name = 'g2'")
            con.execute("UPDATE groups SET name = 'g2' WHERE name = 'tmp'")
        con.close()
        ids = gids(src)
    return ids["g1"], ids["g2"]


@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_master_appended_while_it_is_copied(tmp_path, compressor):
    """An append grows the master in place (new chunks, a replaced last chunk, a larger
    zarr.json) before it is copied: the backup holds the snapshot, without the append."""
    src, dest = tmp_path / "src", tmp_path / "backup"
    _two_groups(src, compressor)
    expected = contents(src)
    calls = []

    def append_first(done: int, total: int, what: str) -> None:
        if not calls:
            with tdstore.open(src) as store:
                store.group("g1").collective_reuse_step(["m", "a"], blocks(99, 3))
                store.group("g2").collective_reuse_step(["m"], blocks(98, 7))
        calls.append(what)

    report = backup(src, dest, progress=append_first)
    assert report["rounds"] == 1
    assert calls[-1] == "done" and len(calls) == report["arrays"] + 1
    got = check_backup(dest)
    assert same(got, expected)
    assert got["g1"]["m"].shape[0] == 10
    # the restored store appends past its own committed length again
    with tdstore.open(dest) as store:
        store.group("g1").collective_reuse_step(["m", "b"], blocks(97, 5))
        assert store.verify().ok
        assert store.group("g1").reconstruct("b")[10:].tobytes() == blocks(97, 5).tobytes()


@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_arrays_replaced_during_the_copy_trigger_a_new_snapshot(tmp_path, compressor):
    """Mirrors re-registered (their arrays removed) before they are copied, and a master
    grown after it was copied: a second snapshot completes the backup, which equals the
    store after those writes."""
    src, dest = tmp_path / "src", tmp_path / "backup"
    g1, g2 = _two_groups(src, compressor)
    acted = []

    def churn(done: int, total: int, what: str) -> None:
        # g1's arrays are copied by now; g2's mirrors are not
        if not acted and what.startswith(f"data/{g2}/d-"):
            with tdstore.open(src) as store:
                store.group("g1").collective_reuse_step(["m", "a", "new"], blocks(50, 3))
                g = store.group("g2")
                g.register_mirror("a", blocks(51, 10))
                g.register_mirror("b", blocks(52, 10))
                g.delete("b")
            acted.append(what)

    report = backup(src, dest, progress=churn)
    assert acted
    assert report["rounds"] == 2
    got = check_backup(dest)
    assert same(got, contents(src))
    assert got["g1"]["new"].shape[0] == 13 and "b" not in got["g2"]
    # the round-1 copies of g2's replaced mirrors are not in the backup
    live = set(arrays(dest).values())
    on_disk = {f"{p.parent.name}/{p.name}" for p in (dest / "data").glob("*/*-*")}
    assert on_disk == live - {None}


def test_backup_gives_up_when_writers_never_let_it_finish(tmp_path):
    src = tmp_path / "src"
    _two_groups(src)
    before = contents(src)
    rounds = []

    def replace_everything(done: int, total: int, what: str) -> None:
        if done == 0 and what != "done":
            rounds.append(what)
            with tdstore.open(src) as store:
                for name in ("g1", "g2"):
                    g = store.group(name)
                    for agent in ("a", "b"):
                        g.register_mirror(agent, before[name][agent])

    dest = tmp_path / "backup"
    with pytest.raises(tdstore.StorageError, match=f"{MAX_ROUNDS} catalogue snapshots"):
        backup(src, dest, progress=replace_everything)
    assert len(rounds) == MAX_ROUNDS
    assert not dest.exists()  # the directory it created is gone again
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(tdstore.StorageError):
        backup(src, empty, progress=replace_everything)
    assert empty.is_dir() and not any(empty.iterdir())  # given empty, left empty
    assert same(contents(src), before)


# --------------------------------------------------------------------------- refusals


def test_destination_that_exists_and_is_not_empty_is_refused(tmp_path):
    src = tmp_path / "src"
    build(src)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for dest in (full, a_file, src, src / "data" / "inside", tmp_path / "no" / "parent"):
        before = tree(tmp_path)
        with pytest.raises(tdstore.InvalidInputError, match="backup destination"):
            backup(src, dest)
        assert tree(tmp_path) == before
    assert (full / "keep.txt").read_text() == "mine"


def test_symlinks_planted_in_data_are_not_followed(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "outside"
    build(src)
    outside.mkdir()
    (outside / "secret").write_text("not part of any store")
    g = gids(src)["rag"]
    paths = arrays(src)
    master = src / "data" / paths[("rag", "retriever")]
    (src / "data" / "link-dir").symlink_to(outside)
    (src / "data" / g / "link-file").symlink_to(outside / "secret")
    (master / "c.99.0.0").symlink_to(outside / "secret")  # looks like a chunk, not committed

    dest = tmp_path / "backup"
    backup(src, dest)
    assert same(check_backup(dest), contents(src))
    copied = [p for p in dest.rglob("*")]
    assert not any(p.is_symlink() for p in copied)
    assert not any(p.name in ("link-dir", "link-file", "c.99.0.0", "secret") for p in copied)
    assert all(b"not part of any store" not in p.read_bytes() for p in copied if p.is_file())


@pytest.mark.parametrize("where", ["chunk", "zarr.json", "array", "group", "data"])
def test_a_referenced_file_that_is_a_symlink_is_refused(tmp_path, where):
    """Data the catalogue references, replaced by a symlink to an identical copy outside
    the store: the backup refuses it instead of following it."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    build(src)
    outside.mkdir()
    master = src / "data" / arrays(src)[("rag", "retriever")]
    target = {"chunk": master / "c.0.0.0", "zarr.json": master / "zarr.json",
              "array": master, "group": master.parent, "data": src / "data"}[where]
    copy = outside / target.name
    os.rename(target, copy)
    target.symlink_to(copy)
    before = tree(src)

    dest = tmp_path / "backup"
    with pytest.raises(tdstore.CorruptionError, match="symbolic link"):
        backup(src, dest)
    assert not dest.exists()
    assert tree(src) == before


def test_catalogue_paths_are_checked_before_use(tmp_path):
    src = tmp_path / "src"
    build(src)
    (tmp_path / "d-0000000000000000").mkdir()
    con = sqlite3.connect(src / "catalog.sqlite")
    with con:
        aid = con.execute("SELECT id FROM agents WHERE name = 'critic'").fetchone()[0]
        gid = gids(src)["rag"]
        con.execute("UPDATE agents SET array = ? WHERE id = ?", (f"{gid}/../../d-0000000000000000",
                                                                 aid))
    con.close()
    dest = tmp_path / "backup"
    with pytest.raises(tdstore.CorruptionError, match=f"agents.id={aid}.*'critic'"):
        backup(src, dest)
    assert not dest.exists()


def test_a_damaged_source_is_refused(tmp_path):
    src = tmp_path / "src"
    build(src)
    (src / "data" / arrays(src)[("rag", "critic")] / "c.0.0.0").unlink()
    dest = tmp_path / "backup"
    damaged = "'critic'.*c.0.0.0 is missing.*source is damaged"
    with pytest.raises(tdstore.CorruptionError, match=damaged):
        backup(src, dest)
    assert not dest.exists()


def test_a_directory_that_is_not_a_store_is_refused(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(tdstore.NotFoundError):
        backup(tmp_path / "plain", tmp_path / "backup")
    assert not (tmp_path / "backup").exists()
    assert not any((tmp_path / "plain").iterdir())


# --------------------------------------------------------------------------- the command


def test_cli_backup(tmp_path):
    src = tmp_path / "src"
    build(src, "zstd")
    result = CliRunner().invoke(main, ["backup", str(src), str(tmp_path / "b1")])
    assert result.exit_code == 0, (result.output, result.stderr)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("backed up 4 group(s), 6 agent(s)")
    assert same(check_backup(tmp_path / "b1"), contents(src))

    result = CliRunner().invoke(main, ["backup", str(src), str(tmp_path / "b2"), "--json"])
    assert result.exit_code == 0, (result.output, result.stderr)
    report = json.loads(result.output)
    assert report["agents"] == 6 and report["rounds"] == 1
    assert report["destination"] == str(tmp_path / "b2")

    result = CliRunner().invoke(main, ["backup", str(src), str(tmp_path / "b1")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: backup destination")


def test_cli_backup_in_a_subprocess(tmp_path):
    src = tmp_path / "src"
    build(src)

    def tdstore_cmd(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tdstore.cli", *args],
                              capture_output=True, text=True, timeout=300)

    done = tdstore_cmd("backup", str(src), str(tmp_path / "b"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["arrays"] == 4
    assert same(check_backup(tmp_path / "b"), contents(src))

    done = tdstore_cmd("backup", str(src), str(tmp_path / "b"))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("error: backup destination") and done.stderr.count("\n") == 1

    done = tdstore_cmd("backup", str(tmp_path / "missing"), str(tmp_path / "c"))
    assert done.returncode == 2 and done.stderr.startswith("error: ")
    assert not (tmp_path / "c").exists()
