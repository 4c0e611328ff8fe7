"""Tampering: a store altered the way an attacker (or a careless script) would alter it.

Each test builds a real store, tampers with it, and checks that
(a) ``verify`` reports the tampering as damage, naming group and agent,
(b) reads of the affected agent raise CorruptionError (never return other data),
(c) nothing outside the store directory is read into a result, changed or deleted, by
    reads, ``verify(repair=True)``, ``gc``, ``Group.delete`` or ``Store.delete_group``.
Chunk files that could hang a reader (FIFOs, /dev/zero) are handled in a subprocess with
a timeout, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import bits, fingerprint, kv

import tdstore

GROUP = "rag"
COMPRESSORS = [None, "zstd", "blosc-lz4"]
N_BLOCKS, BLOCK, CHUNK = 16, (4, 8), 4
CHILD_TIMEOUT = 60


# --------------------------------------------------------------------------- building


def build(path: Path, compressor: str | None, dtype: str = "float16") -> dict[str, np.ndarray]:
    """Group 'rag': master 'm' (16 blocks, 4 chunk files) and mirrors 'a' (even blocks
    differ) and 'b' (odd blocks differ), 8 diff blocks each (2 chunk files); and a group
    'other' with a master of the same layout. Returns the agents' data."""
    m = kv(N_BLOCKS, BLOCK, dtype)
    a = m.copy()
    a[0::2] = kv(8, BLOCK, dtype, seed=1)
    b = m.copy()
    b[1::2] = kv(8, BLOCK, dtype, seed=2)
    other = kv(N_BLOCKS, BLOCK, dtype, seed=3)
    with tdstore.open(path) as store:
        g = store.group(GROUP, compressor=compressor, chunk_blocks=CHUNK)
        g.register_master("m", m)
        g.register_mirror("a", a)
        g.register_mirror("b", b)
        store.group("other", compressor=compressor, chunk_blocks=CHUNK).register_master(
            "m", other)
        assert store.verify().ok
    return {"m": m, "a": a, "b": b, "other": other}


def catalog(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path / "catalog.sqlite")


def sql(path: Path, stmt: str, *args: object) -> None:
    con = catalog(path)
    try:
        assert con.execute(stmt, args).rowcount >= 1, stmt
        con.commit()
    finally:
        con.close()


def array_rel(path: Path, agent: str, group: str = GROUP) -> str:
    con = catalog(path)
    try:
        (rel,) = con.execute("SELECT a.array FROM agents a JOIN groups g ON a.group_id = g.id "
                             "WHERE g.name = ? AND a.name = ?", (group, agent)).fetchone()
    finally:
        con.close()
    return rel


def array_dir(path: Path, agent: str, group: str = GROUP) -> Path:
    return path / "data" / array_rel(path, agent, group)


def group_dir(path: Path, group: str = GROUP) -> Path:
    con = catalog(path)
    try:
        (gid,) = con.execute("SELECT gid FROM groups WHERE name = ?", (group,)).fetchone()
    finally:
        con.close()
    return path / "data" / gid


def agent_id(path: Path, agent: str, group: str = GROUP) -> int:
    con = catalog(path)
    try:
        (aid,) = con.execute("SELECT a.id FROM agents a JOIN groups g ON a.group_id = g.id "
                             "WHERE g.name = ? AND a.name = ?", (group, agent)).fetchone()
    finally:
        con.close()
    return aid


# --------------------------------------------------------------------------- outside


class Outside:
    """Files and directories next to the store that nothing may read, change or delete."""

    def __init__(self, root: Path, store: Path):
        self.root, self.store = root, store
        d = root / "outside_plain"
        d.mkdir()
        (d / "secret.txt").write_bytes(b"do not delete me\n")
        (d / "sub").mkdir()
        (d / "sub" / "c.0.0.0").write_bytes(os.urandom(300))
        (root / "outside.bin").write_bytes(os.urandom(1000))
        self.before: dict[str, str] | None = None

    def snapshot(self) -> dict[str, str]:
        """Every entry under the test's directory except the store: kind and content."""
        state = {}
        for dirpath, dirs, files in os.walk(self.root, followlinks=False):
            here = Path(dirpath)
            if here == self.root:
                dirs[:] = [d for d in dirs if here / d != self.store]
            for name in dirs + files:
                p = here / name
                rel = str(p.relative_to(self.root))
                if p.is_symlink():
                    state[rel] = "link:" + os.readlink(p)
                elif p.is_dir():
                    state[rel] = "dir"
                elif p.is_file():
                    state[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
                else:
                    state[rel] = "special"
        return state

    def seal(self) -> None:
        """Record the state: call after the tampering planted what it plants outside."""
        self.before = self.snapshot()
        assert len(self.before) >= 4

    def check(self, when: str) -> None:
        assert self.before is not None, "seal() first"
        assert self.snapshot() == self.before, f"outside the store changed after {when}"


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "store"


@pytest.fixture
def outside(tmp_path, store_path):
    return Outside(tmp_path, store_path)


# --------------------------------------------------------------------------- checks


def assert_damage(report, agent: str | None, kinds: set[str], path_part: str | None = None,
                  group: str = GROUP):
    """The report names ``agent`` of ``group`` with damage of one of ``kinds``."""
    hits = [f for f in report.damage if f.group == group and f.agent == agent
            and (path_part is None or path_part in f.path)]
    assert hits, f"no damage reported for {group}/{agent}: {[str(f) for f in report.findings]}"
    assert all(f.is_damage for f in hits)
    assert {f.kind for f in hits} <= kinds, [str(f) for f in hits]
    assert not report.ok
    return hits


def verify(path: Path, **kw):
    with tdstore.open(path) as store:
        return store.verify(**kw)


def assert_reads_refused(path: Path, agent: str, lo: int = 0, hi: int = N_BLOCKS,
                         group: str = GROUP) -> None:
    """Every way of reading the agent's affected blocks raises CorruptionError, with and
    without ``verify_reads``."""
    for verify_reads in (False, True):
        with tdstore.open(path, verify_reads=verify_reads) as store:
            g = store.group(group)
            with pytest.raises(tdstore.CorruptionError):
                g.reconstruct(agent)
            with pytest.raises(tdstore.CorruptionError):
                g.view(agent)[lo:hi]
            with pytest.raises(tdstore.CorruptionError):
                g.view(agent)[lo]
            with pytest.raises(tdstore.CorruptionError):
                g.reconstruct(agent, out=np.empty((N_BLOCKS, *BLOCK), g.dtype))


def assert_reads_ok(path: Path, expected: dict[str, np.ndarray], agents, group: str = GROUP):
    with tdstore.open(path) as store:
        g = store.group(group)
        for name in agents:
            assert np.array_equal(bits(g.reconstruct(name)), bits(expected[name])), name


def assert_other_intact(path: Path, data: dict[str, np.ndarray]) -> None:
    """Group 'other' still reads back bit-exactly."""
    with tdstore.open(path) as store:
        assert np.array_equal(bits(store.group("other").reconstruct("m")), bits(data["other"]))


def maintain(path: Path, outside: Outside, *, delete: str | None = None,
             delete_group: bool = True) -> None:
    """repair, gc, delete an agent, delete the group: none may touch anything outside."""
    outside.check("the tampering itself")
    with tdstore.open(path) as store:
        store.verify(repair=True)
        outside.check("verify(repair=True)")
        store.gc()
        outside.check("gc()")
        if delete is not None:
            store.group(GROUP).delete(delete)
            assert delete not in store.group(GROUP).agents()
            outside.check(f"Group.delete({delete!r})")
        if delete_group:
            store.delete_group(GROUP)
            assert GROUP not in store
            outside.check("Store.delete_group")
            store.gc()
            outside.check("gc() after delete_group")
            store.verify(repair=True)
            outside.check("verify(repair=True) after delete_group")


CHILD = textwrap.dedent("""
    import json, sys, numpy as np, tdstore
    path, group, agent, ops = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")

    def findings(rep):
        return [[f.kind, f.group, f.agent, f.path, f.is_damage] for f in rep.findings]

    out = {}
    for op in ops:
        try:
            with tdstore.open(path, verify_reads=op.endswith("+vr")) as store:
                g = store.group(group)
                name = op.removesuffix("+vr")
                if name == "reconstruct":
                    g.reconstruct(agent)
                    r = "returned data"
                elif name == "view":
                    g.view(agent)[0:16]
                    r = "returned data"
                elif name == "verify":
                    r = findings(store.verify())
                elif name == "repair":
                    r = findings(store.verify(repair=True))
                elif name == "gc":
                    r = store.gc().removed
                elif name == "delete_group":
                    store.delete_group(group)
                    r = "deleted"
                else:
                    raise SystemExit("unknown op " + op)
        except tdstore.CorruptionError as exc:
            r = "CorruptionError: " + str(exc)
        except Exception as exc:
            r = "CRASH " + type(exc).__name__ + ": " + str(exc)
        out[op] = r
    print(json.dumps(out))
""")


def child(path: Path, agent: str, ops: list[str], group: str = GROUP) -> dict:
    """Run ``ops`` on the store in a subprocess; a hang fails the test after a timeout."""
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, str(path), group, agent,
                               ",".join(ops)], capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{ops} hung for {CHILD_TIMEOUT}s")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


class _Findings:
    """A verify report rebuilt from the child's JSON, for assert_damage."""

    def __init__(self, rows):
        from tdstore.ops.maintenance import Finding

        self.findings = [Finding(kind, p, "", group=g, agent=a) for kind, g, a, p, _ in rows]
        self.damage = [f for f in self.findings if f.is_damage]
        self.ok = not self.findings


def run_cli_verify(path: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("tdstore")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tdstore"]
    try:
        return subprocess.run([*cmd, "verify", str(path)], capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"tdstore verify hung for {CHILD_TIMEOUT}s")


# --------------------------------------------------------------------------- 1. swapped


def swap(a: Path, b: Path) -> None:
    """Exchange the contents of two chunk files."""
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)



@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_two_swapped_master_chunks_are_refused(store_path, outside, compressor):
    data = build(store_path, compressor)
    outside.seal()
    arr = array_dir(store_path, "m")
    swap(arr / "c.0.0.0", arr / "c.2.0.0")
    report = verify(store_path)
    assert_damage(report, "m", {"foreign-chunk", "checksum"}, "c.0.0.0")
    assert_damage(report, "m", {"foreign-chunk", "checksum"}, "c.2.0.0")
    assert_reads_refused(store_path, "m", 0, 4)
    assert_reads_refused(store_path, "m", 8, 12)
    # a mirror reads the master's blocks it shares: refused too, never the swapped data
    assert_reads_refused(store_path, "b", 0, 4)
    maintain(store_path, outside)
    assert_other_intact(store_path, data)


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_two_swapped_diff_chunks_of_a_mirror_are_refused(store_path, outside, compressor):
    data = build(store_path, compressor)
    outside.seal()
    arr = array_dir(store_path, "a")
    swap(arr / "c.0.0.0", arr / "c.1.0.0")
    report = verify(store_path)
    assert_damage(report, "a", {"foreign-chunk", "checksum"})
    assert not [f for f in report.findings if f.agent in ("m", "b")]
    assert_reads_refused(store_path, "a", 0, 8)
    assert_reads_ok(store_path, data, ["m", "b"])
    maintain(store_path, outside, delete="a")


# --------------------------------------------------------------------------- 2. copied


@pytest.mark.parametrize("source", ["other-mirror", "other-group", "stale-version"])
@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_a_chunk_copied_from_another_array_is_refused(store_path, outside, compressor,
                                                      source):
    data = build(store_path, compressor)
    outside.seal()
    if source == "other-mirror":  # b's diff array has a's shape and chunking
        victim, name, lo = "a", "c.1.0.0", 8
        donor = (array_dir(store_path, "b") / name).read_bytes()
    elif source == "other-group":
        victim, name, lo = "m", "c.1.0.0", 4
        donor = (array_dir(store_path, "m", "other") / name).read_bytes()
    else:  # a replay: the same chunk of an earlier version of the same agent
        victim, name, lo = "a", "c.0.0.0", 0
        donor = (array_dir(store_path, "a") / name).read_bytes()
        with tdstore.open(store_path) as store:
            newer = data["a"].copy()
            newer[0::2] = kv(8, BLOCK, "float16", seed=9)
            store.group(GROUP).register_mirror("a", newer)
        outside.seal()
    target = array_dir(store_path, victim) / name
    assert len(donor) > 0 and target.read_bytes() != donor
    target.write_bytes(donor)
    report = verify(store_path)
    assert_damage(report, victim, {"foreign-chunk", "checksum"}, name)
    assert_reads_refused(store_path, victim, lo, lo + 4)
    maintain(store_path, outside, delete="a" if victim == "a" else None)


# --------------------------------------------------------------------------- 3. zarr.json


def _edit(doc_change):
    def edit(file: Path) -> None:
        doc = json.loads(file.read_text())
        doc_change(doc)
        file.write_text(json.dumps(doc, indent=2))
    return edit


def _raw(text: str):
    def edit(file: Path) -> None:
        file.write_text(text)
    return edit


def _set_dtype(doc):
    doc["data_type"] = "int16"


def _big_endian(doc):
    next(c for c in doc["codecs"] if c["name"] == "bytes")["configuration"]["endian"] = "big"


def _chunk_shape(doc):
    doc["chunk_grid"]["configuration"]["chunk_shape"][0] = 2


def _drop_crc(doc):
    doc["codecs"] = [c for c in doc["codecs"] if c["name"] != "crc32c"]


def _other_compressor(doc):
    compressed = [c for c in doc["codecs"] if c["name"] not in ("bytes", "crc32c")]
    if compressed:  # drop the compressor
        doc["codecs"] = [c for c in doc["codecs"] if c not in compressed]
    else:  # add one
        doc["codecs"].insert(1, {"name": "zstd", "configuration": {"level": 3,
                                                                  "checksum": False}})


def _shrunk_shape(doc):
    doc["shape"][0] = 4


def _extra_field(doc):
    doc["dimension_names"] = ["x", "y", "z"]


ZARR_EDITS = {
    "dtype-int16": _edit(_set_dtype),
    "big-endian": _edit(_big_endian),
    "chunk-shape": _edit(_chunk_shape),
    "codecs-no-crc32c": _edit(_drop_crc),
    "codecs-other-compressor": _edit(_other_compressor),
    "shape-shrunk": _edit(_shrunk_shape),
    "extra-field": _edit(_extra_field),
    "not-json": _raw("zarr.json? no"),
    "binary": lambda file: file.write_bytes(b"\xff\xfe\x00\x80 not utf-8"),
    "json-array": _raw("[1, 2, 3]"),
    "empty": _raw(""),
    "nested-100000": _raw("[" * 100_000),
    "nested-60000": _raw("[" * 60_000),  # under the size cap: reaches the JSON parser
    "nested-objects": _raw('{"a":' * 12_000),
}


@pytest.mark.parametrize("edit", list(ZARR_EDITS))
@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_a_changed_zarr_json_is_reported_and_refused(store_path, outside, compressor, edit):
    build(store_path, compressor)
    outside.seal()
    ZARR_EDITS[edit](array_dir(store_path, "m") / "zarr.json")
    report = verify(store_path)
    assert_damage(report, "m", {"bad-metadata"}, "zarr.json")
    assert_reads_refused(store_path, "m")
    assert_reads_refused(store_path, "a")  # a mirror needs its master's blocks
    maintain(store_path, outside)


@pytest.mark.parametrize("edit", ["dtype-int16", "big-endian", "chunk-shape", "nested-60000"])
def test_a_changed_zarr_json_of_a_mirror_is_reported_and_refused(store_path, outside, edit):
    data = build(store_path, "zstd")
    outside.seal()
    ZARR_EDITS[edit](array_dir(store_path, "b") / "zarr.json")
    assert_damage(verify(store_path), "b", {"bad-metadata"}, "zarr.json")
    assert_reads_refused(store_path, "b", 1, N_BLOCKS)  # b's own blocks are the odd ones
    assert_reads_ok(store_path, data, ["m", "a"])
    maintain(store_path, outside, delete="b")


@pytest.mark.parametrize("edit", ["nested-100000", "nested-60000", "nested-objects"])
def test_deeply_nested_zarr_json_through_the_cli(store_path, edit):
    build(store_path, None)
    ZARR_EDITS[edit](array_dir(store_path, "a") / "zarr.json")
    done = run_cli_verify(store_path)
    assert done.returncode == 1, (done.stdout[-2000:], done.stderr[-2000:])
    assert "Traceback" not in done.stderr and "RecursionError" not in done.stderr
    assert "bad-metadata" in done.stdout and "'a'" in done.stdout


def test_zarr_json_tampered_in_place_behind_an_open_store_is_still_reported(store_path):
    """Same inode, same size, same mtime: a cache of checked metadata must not hide it."""
    build(store_path, None)
    file = array_dir(store_path, "m") / "zarr.json"
    with tdstore.open(store_path) as store:
        g = store.group(GROUP)
        g.reconstruct("m")
        assert store.verify().ok
        st = os.stat(file)
        text = file.read_bytes()
        tampered = text.replace(b'"little"', b'"big"   ', 1)
        assert len(tampered) == len(text) and tampered != text
        with open(file, "r+b") as f:  # in place: the inode stays
            f.write(tampered)
        os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(file).st_ino == st.st_ino
        assert_damage(store.verify(), "m", {"bad-metadata"}, "zarr.json")
    assert_reads_refused(store_path, "m")


# --------------------------------------------------------------------------- 4. index


@pytest.mark.parametrize("change", ["slot1-2to3", "last-14to15", "first-0to1"])
@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_a_diff_index_changed_to_another_valid_block_is_refused(store_path, outside,
                                                                compressor, change):
    data = build(store_path, compressor)
    outside.seal()
    slot, new = {"slot1-2to3": (1, 3), "last-14to15": (7, 15), "first-0to1": (0, 1)}[change]
    sql(store_path, "UPDATE diff_blocks SET block_index = ? WHERE agent_id = ? AND slot = ?",
        new, agent_id(store_path, "a"), slot)
    report = verify(store_path)
    assert_damage(report, "a", {"bad-index"})
    assert_reads_refused(store_path, "a", new, new + 1)
    assert_reads_ok(store_path, data, ["m", "b"])
    maintain(store_path, outside, delete="a")


# --------------------------------------------------------------------------- 5. chunk kinds


def _bind_socket(path: Path) -> None:
    """A Unix socket's entry at ``path`` (bound from its directory: the whole path may be
    longer than a socket address takes)."""
    import socket

    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(path.name)
    finally:
        os.chdir(cwd)


def _plant_chunk(kind: str, chunk: Path, outside_root: Path) -> None:
    content = chunk.read_bytes()
    chunk.unlink()
    if kind == "symlink-outside":  # a plausible file: the chunk's own bytes, outside
        target = outside_root / "outside_chunk"
        target.write_bytes(content)
        chunk.symlink_to(target)
    elif kind == "symlink-relative":
        target = outside_root / "outside_chunk"
        target.write_bytes(content)
        chunk.symlink_to(os.path.relpath(target, chunk.parent))
    elif kind == "symlink-dev-zero":
        chunk.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(chunk)
    elif kind == "socket":  # (opening one gives ENXIO, not a file)
        _bind_socket(chunk)
    elif kind == "directory":
        chunk.mkdir()
        (chunk / "inner").write_bytes(content)
        (chunk / "link-out").symlink_to(outside_root / "outside_plain")
    else:
        raise AssertionError(kind)


CHUNK_KINDS = ["symlink-outside", "symlink-relative", "symlink-dev-zero", "fifo", "socket",
               "directory"]


@pytest.mark.parametrize("kind", CHUNK_KINDS)
@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_a_chunk_file_replaced_by_a_special_entry(store_path, tmp_path, outside, compressor,
                                                  kind):
    build(store_path, compressor)
    chunk = array_dir(store_path, "m") / "c.1.0.0"
    _plant_chunk(kind, chunk, tmp_path)
    outside.seal()
    ops = ["reconstruct", "view", "reconstruct+vr", "view+vr", "verify"]
    out = child(store_path, "m", ops)
    for op in ops[:4]:
        assert out[op].startswith("CorruptionError"), (op, out[op])
    report = _Findings(out["verify"])
    assert_damage(report, "m", {"unsafe-entry"}, "c.1.0.0")
    outside.check("reads and verify")
    out = child(store_path, "m", ["repair", "gc", "reconstruct", "verify", "delete_group"])
    assert not any(str(v).startswith("CRASH") for v in out.values()), out
    assert out["reconstruct"].startswith("CorruptionError"), out["reconstruct"]
    assert out["delete_group"] == "deleted"
    outside.check("repair, gc, delete_group")
    assert not os.path.lexists(chunk)


@pytest.mark.parametrize("kind", ["symlink-outside", "fifo", "directory"])
def test_a_mirror_chunk_file_replaced_by_a_special_entry(store_path, tmp_path, outside, kind):
    build(store_path, "blosc-lz4")
    chunk = array_dir(store_path, "a") / "c.0.0.0"
    _plant_chunk(kind, chunk, tmp_path)
    outside.seal()
    out = child(store_path, "a", ["reconstruct", "view", "verify", "repair", "gc",
                                  "reconstruct+vr"])
    assert out["reconstruct"].startswith("CorruptionError"), out
    assert out["view"].startswith("CorruptionError"), out
    assert out["reconstruct+vr"].startswith("CorruptionError"), out
    assert_damage(_Findings(out["verify"]), "a", {"unsafe-entry"}, "c.0.0.0")
    outside.check("reads, repair, gc")
    maintain(store_path, outside, delete="a")


@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_zarr_json_replaced_by_a_symlink_to_an_outside_copy(store_path, tmp_path, outside,
                                                            compressor):
    build(store_path, compressor)
    meta = array_dir(store_path, "m") / "zarr.json"
    target = tmp_path / "outside_zarr.json"
    target.write_bytes(meta.read_bytes())
    meta.unlink()
    meta.symlink_to(target)
    outside.seal()
    assert_damage(verify(store_path), "m", {"unsafe-entry", "bad-metadata"}, "m-")
    assert_reads_refused(store_path, "m")
    maintain(store_path, outside)


@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_zarr_json_replaced_by_a_socket(store_path, outside, compressor):
    build(store_path, compressor)
    meta = array_dir(store_path, "m") / "zarr.json"
    meta.unlink()
    _bind_socket(meta)
    outside.seal()
    assert_damage(verify(store_path), "m", {"unsafe-entry", "bad-metadata"}, "m-")
    assert_reads_refused(store_path, "m")
    maintain(store_path, outside)


# --------------------------------------------------------------------------- 6. linked dirs


@pytest.mark.parametrize("level", ["group", "array", "data"])
@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_a_directory_replaced_by_a_symlink_to_an_outside_copy(store_path, tmp_path, outside,
                                                              compressor, level):
    """The real directory is moved out of the store and a symlink put in its place:
    everything it holds is valid data, but none of it may be read, and neither repair
    nor gc nor delete may remove anything through the link."""
    data = build(store_path, compressor)
    src = {"group": group_dir(store_path), "array": array_dir(store_path, "a"),
           "data": store_path / "data"}[level]
    moved = tmp_path / f"moved_{level}"
    shutil.move(src, moved)
    (moved / "extra-secret.txt").write_bytes(b"an outside file\n")
    src.symlink_to(moved, target_is_directory=True)
    outside.seal()
    if level == "data":
        try:
            report = verify(store_path)
        except tdstore.CorruptionError:
            report = None  # refusing to open the store at all is fine too
        if report is not None:
            assert_damage(report, "m", {"unsafe-entry"})
            assert_damage(report, "m", {"unsafe-entry"}, group="other")
    else:
        report = verify(store_path)
        damaged = ["m", "a", "b"] if level == "group" else ["a"]
        for agent in damaged:
            assert_damage(report, agent, {"unsafe-entry"})
        if level == "group":
            assert any(f.kind == "unsafe-entry" and f.group == GROUP and f.agent is None
                       for f in report.damage)
    outside.check("verify")
    for agent in (["m", "a", "b"] if level != "array" else ["a"]):
        try:
            assert_reads_refused(store_path, agent)
        except tdstore.CorruptionError:
            assert level == "data"  # the store would not open
    outside.check("reads")
    if level == "data":
        try:
            maintain(store_path, outside)
        except tdstore.CorruptionError:
            pass
        outside.check("maintenance")
    else:
        maintain(store_path, outside, delete="a")
        assert_other_intact(store_path, data)


@pytest.mark.parametrize("op", ["repair", "gc"])
def test_repair_or_gc_alone_never_removes_through_a_linked_group_directory(
        store_path, tmp_path, outside, op):
    build(store_path, None)
    gdir = group_dir(store_path)
    moved = tmp_path / "moved_group"
    shutil.move(gdir, moved)
    gdir.symlink_to(moved, target_is_directory=True)
    outside.seal()
    with tdstore.open(store_path) as store:
        if op == "repair":
            store.verify(repair=True)
        else:
            store.gc()
    outside.check(op)


# --------------------------------------------------------------------------- 7. paths


def _outside_array(tmp_path: Path, store_path: Path, agent: str) -> Path:
    """An outside directory holding a valid copy of the agent's array (if the path were
    followed, the read would succeed with plausible data)."""
    target = tmp_path / "outside"
    shutil.copytree(array_dir(store_path, agent), target)
    (target / "secret.txt").write_bytes(b"do not delete me either\n")
    return target


@pytest.mark.parametrize("form", ["dotdot", "absolute", "dotdot-inside-pattern", "empty",
                                  "null"])
@pytest.mark.parametrize("compressor", [None, "blosc-lz4"])
def test_an_array_path_pointing_outside_the_store(store_path, tmp_path, outside, compressor,
                                                  form):
    build(store_path, compressor)
    target = _outside_array(tmp_path, store_path, "a")
    gid = group_dir(store_path).name
    bad = {"dotdot": "../../outside", "absolute": str(target),
           "dotdot-inside-pattern": f"{gid}/../../../outside", "empty": "",
           "null": None}[form]
    sql(store_path, "UPDATE agents SET array = ? WHERE id = ?", bad, agent_id(store_path, "a"))
    outside.seal()
    assert_damage(verify(store_path), "a", {"bad-path", "bad-row"})
    assert_reads_refused(store_path, "a")
    outside.check("reads")
    maintain(store_path, outside, delete="a")


@pytest.mark.parametrize("form", ["dotdot", "absolute"])
def test_a_master_array_path_pointing_outside_the_store(store_path, tmp_path, outside, form):
    build(store_path, "zstd")
    target = _outside_array(tmp_path, store_path, "m")
    bad = {"dotdot": "../../outside", "absolute": str(target)}[form]
    sql(store_path, "UPDATE agents SET array = ? WHERE id = ?", bad, agent_id(store_path, "m"))
    outside.seal()
    assert_damage(verify(store_path), "m", {"bad-path"})
    for agent in ("m", "a", "b"):
        assert_reads_refused(store_path, agent)
    maintain(store_path, outside)


def test_an_array_path_pointing_at_another_groups_array(store_path, outside):
    """A valid-looking path that names another group's array: refused (its chunks are not
    the ones recorded), and deleting the agent never removes the other group's data."""
    data = build(store_path, None)
    outside.seal()
    theirs = array_rel(store_path, "m", "other")
    sql(store_path, "UPDATE agents SET array = ? WHERE id = ?", theirs,
        agent_id(store_path, "a"))
    assert_damage(verify(store_path), "a", {"foreign-chunk", "checksum", "bad-path",
                                            "bad-metadata"})
    assert_reads_refused(store_path, "a")
    maintain(store_path, outside, delete="a")
    assert (store_path / "data" / theirs).is_dir()
    assert_other_intact(store_path, data)
    assert verify(store_path).ok


@pytest.mark.parametrize("form", ["dotdot", "absolute"])
def test_a_group_directory_name_pointing_outside_the_store(store_path, tmp_path, outside,
                                                           form):
    build(store_path, None)
    target = tmp_path / "outside"
    shutil.copytree(group_dir(store_path), target)
    bad = {"dotdot": "../../outside", "absolute": str(target)}[form]
    sql(store_path, "UPDATE groups SET gid = ? WHERE name = ?", bad, GROUP)
    outside.seal()
    report = verify(store_path)
    assert any(f.is_damage and f.group == GROUP for f in report.findings), report.findings
    outside.check("verify")
    with tdstore.open(store_path) as store:
        store.verify(repair=True)
        outside.check("verify(repair=True)")
        store.gc()
        outside.check("gc")
        try:
            store.delete_group(GROUP)
        except tdstore.TdStoreError:
            pass  # refusing is fine; deleting through the path is not
        outside.check("delete_group")


# --------------------------------------------------------------------------- 8. foreign


def test_foreign_files_links_and_fifos_are_garbage_and_gc_removes_only_them(
        store_path, tmp_path, outside):
    data = build(store_path, None)
    gdir, arr = group_dir(store_path), array_dir(store_path, "m")
    data_dir = store_path / "data"
    plain = tmp_path / "outside_plain"
    planted = {
        data_dir / "junk.txt": lambda p: p.write_bytes(b"junk"),
        data_dir / "0123456789abcdef": lambda p: p.symlink_to(plain, target_is_directory=True),
        data_dir / "link-to-file": lambda p: p.symlink_to(tmp_path / "outside.bin"),
        data_dir / "fifo": os.mkfifo,
        gdir / "m-0123456789abcdef": lambda p: p.symlink_to(plain, target_is_directory=True),
        gdir / "fifo": os.mkfifo,
        gdir / "junk": lambda p: p.write_bytes(b"junk"),
        arr / "junk": lambda p: p.write_bytes(b"junk"),
        arr / "c.9.0.0": lambda p: p.symlink_to(tmp_path / "outside.bin"),
        arr / "c.0.0.0.tmp-deadbeef": lambda p: p.symlink_to(plain / "secret.txt"),
        arr / "dir-link": lambda p: p.symlink_to(plain, target_is_directory=True),
        arr / "pipe": os.mkfifo,
        arr / "subdir": lambda p: (p.mkdir(), (p / "out").symlink_to(plain)),
    }
    for p, make in planted.items():
        make(p)
    outside.seal()
    out = child(store_path, "m", ["verify", "reconstruct", "view"])
    assert out["reconstruct"] == out["view"] == "returned data", out
    reported = {row[3] for row in out["verify"]}
    missing = {str(p.relative_to(store_path)) for p in planted} - reported
    assert not missing, f"not reported: {sorted(missing)}; reported: {out['verify']}"
    outside.check("verify")
    out = child(store_path, "m", ["gc", "verify"])
    assert not any(str(v).startswith("CRASH") for v in out.values()), out
    assert out["verify"] == [], out["verify"]
    for p in planted:
        assert not os.path.lexists(p), f"gc left {p}"
    outside.check("gc")
    assert_reads_ok(store_path, data, ["m", "a", "b"])
    maintain(store_path, outside, delete="a")


def test_repair_removes_planted_entries_but_not_their_targets(store_path, tmp_path, outside):
    build(store_path, "zstd")
    arr = array_dir(store_path, "a")
    plain = tmp_path / "outside_plain"
    (arr / "c.5.0.0").symlink_to(plain / "sub" / "c.0.0.0")
    (store_path / "data" / "fedcba9876543210").symlink_to(plain, target_is_directory=True)
    os.mkfifo(arr / "c.7.0.0")
    outside.seal()
    out = child(store_path, "a", ["repair", "verify", "reconstruct"])
    assert not any(str(v).startswith("CRASH") for v in out.values()), out
    assert out["verify"] == [] and out["reconstruct"] == "returned data", out
    outside.check("verify(repair=True)")


# --------------------------------------------------------------------------- 9. baseline


@pytest.mark.parametrize("cut", ["to-100-bytes", "last-byte", "to-empty"])
@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_a_truncated_chunk_is_reported_and_refused(store_path, outside, compressor, cut):
    build(store_path, compressor)
    outside.seal()
    chunk = array_dir(store_path, "m") / "c.3.0.0"
    content = chunk.read_bytes()
    chunk.write_bytes({"to-100-bytes": content[:100], "last-byte": content[:-1],
                       "to-empty": b""}[cut])
    report = verify(store_path)
    assert_damage(report, "m", {"truncated-chunk", "checksum"}, "c.3.0.0")
    assert_reads_refused(store_path, "m", 12, 16)
    maintain(store_path, outside)


def _flip(chunk: Path, at: int) -> None:
    data = bytearray(chunk.read_bytes())
    data[at] ^= 0x10
    chunk.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["middle", "first", "crc-trailer"])
@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_a_flipped_byte_is_reported_and_refused_by_checked_reads(store_path, outside,
                                                                 compressor, where):
    build(store_path, compressor)
    outside.seal()
    chunk = array_dir(store_path, "a") / "c.1.0.0"
    size = chunk.stat().st_size
    _flip(chunk, {"middle": size // 2, "first": 0, "crc-trailer": size - 2}[where])
    (f,) = verify(store_path).findings
    assert (f.kind, f.group, f.agent) == ("checksum", GROUP, "a") and f.path.endswith("c.1.0.0")
    with tdstore.open(store_path, verify_reads=True) as store:
        g = store.group(GROUP)
        with pytest.raises(tdstore.CorruptionError):
            g.reconstruct("a")
        with pytest.raises(tdstore.CorruptionError):
            g.view("a")[8:16]
    maintain(store_path, outside, delete="a")


@pytest.mark.parametrize("compressor", [
    pytest.param(None, marks=pytest.mark.xfail(
        strict=True, reason="documented trade-off: uncompressed chunks are checked against "
        "their crc32c on read only with verify_reads=True (README), so a flipped byte in "
        "the body of an uncompressed chunk is returned by default reads")),
    "zstd", "blosc-lz4"])
def test_a_flipped_byte_is_refused_by_default_reads(store_path, compressor):
    data = build(store_path, compressor)
    chunk = array_dir(store_path, "a") / "c.1.0.0"
    _flip(chunk, chunk.stat().st_size // 2)
    with tdstore.open(store_path) as store:
        g = store.group(GROUP)
        for read in (lambda: g.reconstruct("a"), lambda: g.view("a")[8:16],
                     lambda: g.view("a")[10]):
            try:
                got = read()
            except tdstore.CorruptionError:
                continue
            same = np.array_equal(bits(got), bits(data["a"][: len(got)])) \
                if got.shape == data["a"].shape else False
            pytest.fail(f"a default read returned data of a chunk with a flipped byte "
                        f"(shape {got.shape}, equal to the original: {same})")


# ----------------------------------------------------------------- catalogue rows


def _catalogue_store(path: Path) -> None:
    with tdstore.open(path) as store:
        g = store.group("rag", chunk_blocks=2)
        base = kv(8, (4, 4), "float16")
        g.register_master("m", base)
        c = base.copy()
        c[[1, 4, 6]] = kv(3, (4, 4), "float16", seed=3)
        g.register_mirror("c", c)
        store.group("other", chunk_blocks=2).register_master("m", kv(8, (4, 4), "float16", 5))


def _sql(path: Path, statement: str) -> None:
    con = sqlite3.connect(path / "catalog.sqlite")
    con.execute(statement)
    con.commit()
    con.close()


def test_cleared_chunk_checksums_with_swapped_chunks_are_damage(tmp_path):
    path = tmp_path / "s"
    _catalogue_store(path)
    _sql(path, "UPDATE agents SET chunk_crcs = NULL WHERE name = 'm' AND group_id = "
               "(SELECT id FROM groups WHERE name = 'rag')")
    with tdstore.open(path) as store:
        a = next(p for p in (path / "data").rglob("m-*")
                 if p.parent.name == _gid(path, "rag"))
        swap(a / "c.0.0.0", a / "c.1.0.0")
        with pytest.raises(tdstore.CorruptionError, match="checksums"):
            store.group("rag").reconstruct("m")
        report = store.verify()
        assert any(f.agent == "m" and f.group == "rag" and f.is_damage for f in report.damage)


def _gid(path: Path, group: str) -> str:
    con = sqlite3.connect(path / "catalog.sqlite")
    (gid,) = con.execute("SELECT gid FROM groups WHERE name = ?", (group,)).fetchone()
    con.close()
    return gid


@pytest.mark.parametrize("role", ["boss", "Mirror", "master "])
def test_an_unknown_role_is_damage_not_a_copy_of_the_master(tmp_path, role):
    path = tmp_path / "s"
    _catalogue_store(path)
    _sql(path, f"UPDATE agents SET role = '{role}' WHERE name = 'c'")
    with tdstore.open(path) as store:
        g = store.group("rag")
        with pytest.raises(tdstore.CorruptionError, match="role"):
            g.reconstruct("c")
        with pytest.raises(tdstore.CorruptionError, match="role"):
            g.view("c")[0:2]
        report = store.verify(repair=True)
        assert any(f.agent == "c" and f.kind == "bad-row" for f in report.damage)
        assert (g.reconstruct("m") == kv(8, (4, 4), "float16")).all()


def test_a_lowered_block_count_is_damage_and_gc_keeps_the_chunks(tmp_path):
    path = tmp_path / "s"
    _catalogue_store(path)
    before = fingerprint(path)[1]
    _sql(path, "UPDATE groups SET n_blocks = 5 WHERE name = 'rag'")
    with tdstore.open(path) as store:
        with pytest.raises(tdstore.CorruptionError):
            store.group("rag").reconstruct("m")
        assert store.verify().damage
        store.gc()
    assert fingerprint(path)[1] == before  # no chunk of the damaged group was removed
    _sql(path, "UPDATE groups SET n_blocks = 8 WHERE name = 'rag'")
    with tdstore.open(path) as store:
        g = store.group("rag")
        assert (g.reconstruct("m") == kv(8, (4, 4), "float16")).all()
        store.verify(repair=True)
    assert fingerprint(path)[1] == before


@pytest.mark.parametrize("statement", [
    "UPDATE groups SET dtype = 'zzz' WHERE name = 'rag'",
    "UPDATE groups SET dtype = 'int16' WHERE name = 'rag'",
    "UPDATE groups SET compressor = 'lzma' WHERE name = 'rag'",
    "UPDATE groups SET block_shape = 'notjson' WHERE name = 'rag'",
    "UPDATE groups SET block_shape = '[-1, 4]' WHERE name = 'rag'",
    "UPDATE groups SET n_blocks = 1e30 WHERE name = 'rag'",
    "UPDATE groups SET n_blocks = -1 WHERE name = 'rag'",
    "UPDATE agents SET chunk_crcs = 'garbage' WHERE name = 'c'",
    "UPDATE agents SET chunk_blocks = 0 WHERE name = 'c'",
    "UPDATE agents SET chunk_blocks = -2 WHERE name = 'c'",
    "UPDATE agents SET array = NULL WHERE name = 'c'",
    "UPDATE agents SET last_access = 'x' WHERE name = 'c'",
    "UPDATE agents SET attrs = 'nonjson' WHERE name = 'c'",
])
def test_malformed_catalogue_values_are_tdstore_errors(tmp_path, statement):
    """Every operation either works or raises a TdStoreError naming the problem;
    verify and gc never crash with a plain Python error and delete nothing."""
    path = tmp_path / "s"
    _catalogue_store(path)
    data_before = fingerprint(path)[1]
    _sql(path, statement)
    with tdstore.open(path) as store:
        for op in (lambda: store.group("rag").reconstruct("c"),
                   lambda: store.group("rag").view("c")[0:3],
                   lambda: store.group("rag").agents(),
                   lambda: store.group("rag").stats(),
                   store.groups, store.info, store.verify, store.gc,
                   lambda: store.verify(repair=True)):
            try:
                op()
            except tdstore.TdStoreError:
                pass
        assert (store.group("other").reconstruct("m") == kv(8, (4, 4), "float16", 5)).all()
    # nothing of the damaged group was deleted
    assert set(data_before) <= set(fingerprint(path)[1])


# --------------------------------------------------------------------------- 10. data/
# replaced while a store is open


@pytest.mark.parametrize("replacement", ["symlink", "directory", "file"])
def test_data_replaced_while_a_store_is_open(store_path, tmp_path, replacement):
    """The open store stays bound to the data/ directory it opened: reads go on from it
    (never through what was put in its place), a write is refused before it creates
    anything, and what took data/'s place is left as it was."""
    store = tdstore.open(store_path)
    try:
        chunks = store.chunks("t")
        chunks.put("k", kv(4))
        assert np.array_equal(chunks.get("k")[0], kv(4))
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (store_path / "data").rename(store_path / "data.away")
        if replacement == "symlink":
            (store_path / "data").symlink_to(elsewhere, target_is_directory=True)
        elif replacement == "directory":
            (store_path / "data").mkdir()
        else:
            (store_path / "data").write_text("x")
        with pytest.raises(tdstore.CorruptionError,
                           match=r"data (is a symlink|was replaced|is a file)"):
            chunks.put("new", kv(4, seed=2))
        assert "new" not in chunks.keys()
        assert list(elsewhere.iterdir()) == []
        if replacement == "directory":
            assert list((store_path / "data").iterdir()) == []
        assert np.array_equal(chunks.get("k")[0], kv(4))  # from the directory it opened
    finally:
        store.close()
    if replacement != "directory":  # a new open refuses what is no directory
        with pytest.raises(tdstore.TdStoreError, match="data"):
            tdstore.open(store_path).close()


@pytest.mark.parametrize("level", ["group", "array"])
def test_a_directory_replaced_by_a_symlink_is_named_a_symlink(store_path, tmp_path, level):
    """The error names what was found: a symlink (which tdstore never follows), not
    just "not a directory"."""
    with tdstore.open(store_path) as store:
        store.chunks("t").put("k", kv(4))
    array = next((store_path / "data").glob("*/m-*"))
    victim = array.parent if level == "group" else array
    copy = tmp_path / "copy"
    shutil.copytree(victim, copy)
    shutil.rmtree(victim)
    victim.symlink_to(copy, target_is_directory=True)
    with tdstore.open(store_path) as store:
        with pytest.raises(tdstore.CorruptionError,
                           match=rf"{victim.name} is a symlink; tdstore never follows one"):
            store.chunks("t").get("k")
