"""Bad input gets a clear error naming the object, and leaves the store exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import kv

import tdstore


@pytest.fixture
def populated(backend):
    """A store with group 'rag' (a master and a mirror) on each backend."""
    with backend.open("s") as store:
        g = store.group("rag")
        g.register_master("retriever", kv(16))
        mirror = kv(16)
        mirror[-2:] = 0
        g.register_mirror("critic", mirror)
    return backend


@pytest.fixture
def store(backend):
    with backend.open("s") as s:
        yield s


BAD_CALLS = {
    "1-D master": (lambda g: g.register_master("x", np.zeros(8, np.float32)),
                   tdstore.InvalidInputError,
                   r"at least 2D \(n_blocks, \.\.\.\); got shape \(8,\)"),
    "1-D mirror": (lambda g: g.register_mirror("x", np.zeros(8, np.float32)),
                   ValueError, "at least 2D"),
    "shape mismatch": (lambda g: g.register_mirror("x", kv(16, (4, 4))),
                       ValueError, r"group 'rag' agent 'x': kv_blocks shape \(16, 4, 4\) must "
                       r"match master shape \(16, 4, 8\)"),
    "block count mismatch": (lambda g: g.register_mirror("x", kv(15)),
                             ValueError, "must match master shape"),
    "dtype mismatch": (lambda g: g.register_mirror("x", kv(16, dtype="float16")),
                       ValueError, "dtype float16 must match master dtype float32"),
    "NaN": (lambda g: g.register_mirror("x", np.full((16, 4, 8), np.nan, np.float32)),
            ValueError, "group 'rag' agent 'x': kv_blocks holds NaN or inf in block"),
    "inf in reuse step": (lambda g: g.collective_reuse_step(["critic"], np.full((1, 4, 8), np.inf,
                                                                                np.float32)),
                          ValueError, "shared_blocks holds NaN or inf"),
    "reuse step shape": (lambda g: g.collective_reuse_step(["critic"], kv(2, (8, 4))),
                         ValueError, r"blocks of shape \(8, 4\) .* must match"),
    "unsupported dtype": (lambda g: g.register_mirror("x", np.zeros((16, 4, 8), np.int64)),
                          ValueError, "dtype int64 is not supported"),
    "object dtype": (lambda g: g.register_mirror("x", np.empty((16, 4, 8), object)),
                     ValueError, "dtype object is not supported"),
    "not an array": (lambda g: g.register_mirror("x", [[1.0, 2.0]]),
                     ValueError, "must be a numpy.ndarray, got list"),
    "zero-size blocks": (lambda g: g.register_master("x", np.zeros((4, 0), np.float32)),
                         ValueError, "has no elements"),
    "unknown agent": (lambda g: g.reconstruct("ghost"), KeyError, "unknown agent 'ghost'"),
    "unknown agent view": (lambda g: g.view("ghost"), KeyError, "unknown agent 'ghost'"),
    "delete unknown": (lambda g: g.delete("ghost"), KeyError, "unknown agent 'ghost'"),
    "mirror named like master": (lambda g: g.register_mirror("retriever", kv(16)),
                                 ValueError, "is the group's master"),
    "slash in name": (lambda g: g.register_mirror("a/b", kv(16)),
                      ValueError, "must not contain '/'"),
    "dotdot name": (lambda g: g.register_master("..", kv(16)), ValueError, "'..' is not allowed"),
    "NUL in name": (lambda g: g.register_mirror("a\0b", kv(16)), ValueError, r"'\\x00'"),
    "blank name": (lambda g: g.register_mirror("  ", kv(16)), ValueError, "empty or blank"),
    "non-str name": (lambda g: g.register_mirror(7, kv(16)), ValueError, "must be a str, got int"),
    "long name": (lambda g: g.register_mirror("x" * 10_000, kv(16)), ValueError, "too long"),
    "bad name in reuse step": (lambda g: g.collective_reuse_step(["ok", "../x"], kv(1)),
                               ValueError, "must not contain '/'"),
    "reshape master with mirrors": (lambda g: g.register_master("retriever", kv(8)),
                                    ValueError, "would break its 1 mirror"),
}


@pytest.mark.parametrize("case", BAD_CALLS, ids=list(BAD_CALLS))
def test_bad_input_is_refused_and_store_unchanged(populated, case):
    call, exc_type, pattern = BAD_CALLS[case]
    before = populated.fingerprint("s")
    with populated.open("s") as store:
        with pytest.raises(exc_type, match=pattern) as info:
            call(store.group("rag"))
    assert isinstance(info.value, tdstore.TdStoreError)
    assert populated.fingerprint("s") == before


@pytest.mark.parametrize("name", ["a/b", "..", "x\0", "", 3])
def test_bad_group_names_are_refused(populated, name):
    before = populated.fingerprint("s")
    with populated.open("s") as store, pytest.raises(tdstore.InvalidInputError):
        store.group(name)
    assert populated.fingerprint("s") == before


def test_unknown_group_without_create(populated):
    with populated.open("s") as store:
        with pytest.raises(KeyError, match="group 'nope' does not exist"):
            store.group("nope", create=False)
        with pytest.raises(tdstore.NotFoundError):
            store.delete_group("nope")


def test_mirror_before_master_raises_runtime_error(store):
    g = store.group("empty")
    with pytest.raises(RuntimeError, match="register_master"):
        g.register_mirror("a", kv(4))
    with pytest.raises(tdstore.NoMasterError):
        g.reconstruct("a")


def test_unicode_and_odd_names_are_stored_exactly_and_never_become_paths(store, backend):
    names = ["критик", "🤖 agent", "a..b", "x" * 1024, "名前 with spaces", ".hidden"]
    g = store.group("グループ")
    g.register_master(names[0], kv(4))
    for n in names[1:]:
        g.register_mirror(n, kv(4, seed=1))
    assert g.agents() == names and store.groups() == ["グループ"]
    on_disk = {part for rel in backend.files("s") for part in rel.split("/")}
    assert not on_disk & set(names + ["グループ"])


def test_invalid_diff_threshold(store):
    for bad in (-1, float("nan"), "abc"):
        with pytest.raises(tdstore.InvalidInputError, match="diff_threshold"):
            store.group("g", diff_threshold=bad)
    assert store.groups() == []


def test_refuses_to_turn_a_foreign_directory_into_a_store(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(tdstore.InvalidInputError, match="not empty"):
        tdstore.open(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("url, error", [
    ("postgresql+psycopg://kv@127.0.0.1:1/kv", tdstore.StorageError),
    ("sqlite:////nonexistent/dir/catalog.sqlite", tdstore.TdStoreError),
    ("not a url", tdstore.InvalidInputError),
])
def test_an_open_that_fails_on_its_catalogue_leaves_no_directory(tmp_path, url, error):
    """Not the store directory, nor its data/ and locks/, nor a parent it would make."""
    with pytest.raises(error):
        tdstore.open(tmp_path / "new" / "kv", url=url)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kv").mkdir()  # one that was there stays, as it was
    with pytest.raises(error):
        tdstore.open(tmp_path / "kv", url=url)
    assert [p.name for p in tmp_path.iterdir()] == ["kv"]
    assert list((tmp_path / "kv").iterdir()) == []


def test_a_store_whose_locks_directory_is_gone_refuses_writes_naming_it(tmp_path):
    """locks/ removed (or the store moved) under an open store: a write is one clear
    StorageError naming the lock directory, and nothing is recreated or changed."""
    import shutil

    with tdstore.open(tmp_path / "s") as store:
        g = store.group("g")
        g.register_master("m", np.ones((4, 8), np.float32))
        shutil.rmtree(tmp_path / "s" / "locks")
        with pytest.raises(tdstore.StorageError, match="locks/ directory was removed"):
            g.register_mirror("a", np.zeros((4, 8), np.float32))
        with pytest.raises(tdstore.StorageError, match="locks/ directory was removed"):
            store.delete_group("g")
        assert not (tmp_path / "s" / "locks").exists()
        assert g.agents() == ["m"]
        assert np.array_equal(g.reconstruct("m"), np.ones((4, 8), np.float32))
