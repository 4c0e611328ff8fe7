"""What a new user runs into on the command line: destructive actions that say what they
remove, one-line errors, valid JSON, help for every option, and budget side effects."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import click
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import fingerprint, kv
from test_cli_errors import one_line_error

import tdstore
from tdstore.cli import main as cli

MiB = 1 << 20


def strict_json(text: str):
    """json.loads that refuses NaN and infinities (which are not JSON)."""

    def refuse(token: str):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def path(tmp_path):
    """A store with group 'g': master 'm', mirrors 'a' and 'b'."""
    p = tmp_path / "s"
    base = kv(8, (2, 4))
    with tdstore.open(p) as store:
        g = store.group("g")
        g.register_master("m", base)
        for i, name in enumerate("ab"):
            other = base.copy()
            other[i] += 1
            g.register_mirror(name, other)
    return p


# --------------------------------------------------------------------------- import --master


def test_import_as_a_new_master_asks_for_replace_and_leaves_the_store_alone(path, tmp_path):
    file = tmp_path / "new.npy"
    np.save(file, kv(8, (2, 4), seed=9))
    before = fingerprint(path)
    result = CliRunner().invoke(cli, ["import", str(path), "g", "new", str(file), "--master"])
    one_line_error(result, "replaces master 'm'", "removes 3 agent(s)", "'a'", "'b'",
                   "--replace")
    assert fingerprint(path) == before


def test_import_with_replace_lists_what_it_removed(path, tmp_path):
    file = tmp_path / "new.npy"
    np.save(file, kv(8, (2, 4), seed=9))
    result = CliRunner().invoke(cli, ["import", str(path), "g", "new", str(file), "--master",
                                      "--replace"])
    assert result.exit_code == 0, result.output
    assert "removed agent 'm'" in result.output and "removed agent 'a'" in result.output
    with tdstore.open(path) as store:
        assert store.group("g").agents() == ["new"]


def test_re_importing_the_current_master_needs_no_replace(path, tmp_path):
    with tdstore.open(path) as store:
        store.group("g").export("m", tmp_path / "m.npy")
    result = CliRunner().invoke(cli, ["import", str(path), "g", "m", str(tmp_path / "m.npy"),
                                      "--master", "--json"])
    assert result.exit_code == 0, result.output
    assert strict_json(result.output)["removed"] == []


# --------------------------------------------------------------------------- budget


def test_evict_counts_each_byte_once_and_leaves_no_empty_group(path):
    with tdstore.open(path) as store:
        stored = store.group("g").stats()["bytes_stored"]
    result = CliRunner().invoke(cli, ["evict", str(path), "--max-bytes", "1", "--json"])
    assert result.exit_code == 0, result.output
    victims = strict_json(result.output)
    assert [(v["group"], v["agent"]) for v in victims] == [("g", None)]
    assert sum(v["nbytes"] for v in victims) == stored
    with tdstore.open(path) as store:
        assert store.groups() == []
        assert store.verify().ok


def test_an_import_refused_by_the_budget_leaves_no_group_behind(path, tmp_path):
    file = tmp_path / "big.npy"
    np.save(file, np.ones((64, 256, 64), np.float32))  # 4 MiB
    with tdstore.open(path) as store:
        store.set_max_bytes(1 * MiB)
    before = fingerprint(path)
    result = CliRunner().invoke(cli, ["import", str(path), "new-group", "x", str(file)])
    one_line_error(result, "budget", "nothing was written")
    with tdstore.open(path) as store:
        assert "new-group" not in store
    assert fingerprint(path) == before


def test_an_import_that_evicts_says_what_it_evicted(path, tmp_path):
    with tdstore.open(path) as store:
        stored = store.info()["bytes_accounted"]
        store.set_max_bytes(stored + 256 * 1024)
    file = tmp_path / "x.npy"
    np.save(file, np.ones((4, 128, 128), np.float32))  # 256 KiB: g must make room
    result = CliRunner().invoke(cli, ["import", str(path), "other", "x", str(file)])
    assert result.exit_code == 0, result.output
    assert "evicted group 'g'" in result.output and "(size budget)" in result.output


def test_budget_has_json(path):
    assert CliRunner().invoke(cli, ["budget", str(path), "4096"]).exit_code == 0
    result = CliRunner().invoke(cli, ["budget", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = strict_json(result.output)
    assert data["max_bytes"] == 4096 and data["bytes_accounted"] > 0


# --------------------------------------------------------------------------- migrate


def test_a_downgrade_stays_until_migrate_upgrades_again(path):
    result = CliRunner().invoke(cli, ["migrate", str(path), "--to", "0001"])
    assert result.exit_code == 0 and "0001" in result.output, result.output
    before = fingerprint(path)
    one_line_error(CliRunner().invoke(cli, ["info", str(path)]), "0001",
                   "run `tdstore migrate` to upgrade")
    assert fingerprint(path) == before  # info did not upgrade it
    with pytest.raises(tdstore.SchemaError, match="tdstore migrate --to 0001"):
        tdstore.open(path)
    result = CliRunner().invoke(cli, ["migrate", str(path)])
    assert result.exit_code == 0, result.output
    with tdstore.open(path) as store:
        assert store.group("g").agents() == ["m", "a", "b"]
        assert store.verify().ok


def test_a_downgrade_that_would_drop_agents_attributes_is_refused(path):
    """Revision 0001 has no agents' attributes: a downgrade there would drop them (a
    keyed chunk's shape and dtype among them), so it is refused while any agent has
    some, and the store is left as it was."""
    with tdstore.open(path) as store:
        store.chunks("kv").put("k", np.arange(6, dtype=np.float32).reshape(2, 3))
    before = fingerprint(path)
    one_line_error(CliRunner().invoke(cli, ["migrate", str(path), "--to", "0001"]),
                   "downgrading to 0001 would drop the attributes of 1 agents")
    assert fingerprint(path) == before
    result = CliRunner().invoke(cli, ["migrate", str(path), "--to", "0002"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["migrate", str(path)])
    assert result.exit_code == 0, result.output
    with tdstore.open(path) as store:
        array, meta = store.chunks("kv").get("k")
        assert np.array_equal(array, np.arange(6, dtype=np.float32).reshape(2, 3))


def test_migrate_to_base_is_refused(path):
    before = fingerprint(path)
    one_line_error(CliRunner().invoke(cli, ["migrate", str(path), "--to", "base"]),
                   "'base' would drop every table")
    assert fingerprint(path) == before


# --------------------------------------------------------------------------- ab


@pytest.fixture
def kv_store(tmp_path):
    p = tmp_path / "kv"
    layout = {"axes": ["layer", "kv", "token", "head", "dim"]}
    rng = np.random.default_rng(0)
    base = rng.standard_normal((8, 2, 2, 8, 2, 16)).astype(np.float32)
    with tdstore.open(p) as store:
        g = store.group("rag", kv_layout=layout)
        g.register_master("m", base)
        other = base.copy()
        other[-1] += 0.5
        g.register_mirror("c", other)
    return p


def test_ab_refuses_a_plot_it_cannot_write_before_computing(kv_store, tmp_path):
    one_line_error(CliRunner().invoke(cli, ["ab", str(kv_store), "rag", "c", "--plot",
                                            str(tmp_path / "missing" / "x.png")]),
                   "does not exist")


@pytest.mark.parametrize("option", ["--queries", "--window", "--block-size"])
def test_ab_refuses_zero_sizes(kv_store, option):
    result = CliRunner().invoke(cli, ["ab", str(kv_store), "rag", "c", option, "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert option in result.output


def test_ab_exact_and_threshold_together_are_refused(kv_store, tmp_path):
    np.save(tmp_path / "e.npy", np.zeros((8, 2, 2, 8, 2, 16), np.float32))
    one_line_error(CliRunner().invoke(cli, ["ab", str(kv_store), "rag", "c", "--exact",
                                            str(tmp_path / "e.npy"), "--threshold", "1"]),
                   "not both")


def test_ab_json_is_valid_json(kv_store):
    result = CliRunner().invoke(cli, ["ab", str(kv_store), "rag", "c", "--window", "4",
                                      "--block-size", "4", "--queries", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = strict_json(result.output)
    assert report["queries"] == 2 and report["layers"]


def test_json_output_turns_values_that_are_not_numbers_into_null():
    from tdstore.cli import _finite

    assert _finite({"a": float("nan"), "b": [float("inf"), 1.5], "c": np.float32("nan")}) == \
        {"a": None, "b": [None, 1.5], "c": None}


def test_ab_sweep_reports_progress(kv_store):
    from tdstore.analysis.ab import ABConfig, sweep

    seen = []
    with tdstore.open(kv_store) as store:
        sweep(store.group("rag"), [0.0, 1.0], ABConfig(window=4, block_size=4, queries=2),
              progress=lambda done, total, what: seen.append((done, total)))
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] == 2


# --------------------------------------------------------------------------- help, signals


def _commands(group: click.Group, prefix: str = ""):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def test_every_command_and_option_has_help():
    missing = []
    for name, command in _commands(cli):
        if not (command.help or "").strip():
            missing.append(name)
        for param in command.params:
            if isinstance(param, click.Option) and not (param.help or "").strip():
                missing.append(f"{name} {param.opts[0]}")
    assert missing == []
    result = CliRunner().invoke(cli, ["bench", "--help"])
    assert result.exit_code == 0 and "--big-gib" in result.output and "memmap" in result.output


# A real Ctrl-C while the command line is still importing the library (the first moment
# a user can press it): the interpreter is told to interrupt itself when SQLAlchemy,
# which only the library needs, is first imported.
INTERRUPT_AT_IMPORT = textwrap.dedent("""
    import importlib.abc, os, signal, sys

    class Interrupt(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "sqlalchemy":
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGINT)
            return None

    from tdstore.entry import run
    sys.meta_path.insert(0, Interrupt())
    sys.argv = ["tdstore", *sys.argv[1:]]
    run()
""")


@pytest.mark.parametrize("args", [["info", "{path}"], ["ls", "{path}"], ["verify", "{path}"],
                                  ["demo", "{tmp}/d", "--blocks", "8", "--tail", "1",
                                   "--near", "1"]])
def test_ctrl_c_while_the_library_loads_is_one_line(path, tmp_path, args):
    argv = [a.format(path=path, tmp=tmp_path) for a in args]
    done = subprocess.run([sys.executable, "-c", INTERRUPT_AT_IMPORT, *argv],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "interrupted (SIGINT): the operation in progress was completed or rolled back; "
        "the store is consistent"]


# --------------------------------------------------------------------------- library


def test_reconstruct_on_cuda_without_cuda_is_a_clear_error(path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error case does not arise")
    with tdstore.open(path) as store:
        with pytest.raises(tdstore.InvalidInputError, match="CUDA is not available"):
            store.group("g").reconstruct("a", device="cuda")
        with pytest.raises(tdstore.InvalidInputError, match="not a torch device"):
            store.group("g").reconstruct("a", device="gpu-please")
        cpu = store.group("g").reconstruct("a", device="cpu")
        assert np.array_equal(cpu.numpy(), store.group("g").reconstruct("a"))


@pytest.mark.parametrize("command", [["info", "{p}"], ["import", "{p}", "g", "m", "{f}"],
                                     ["verify", "{p}"]])
@pytest.mark.parametrize("kind", ["name too long", "through a file"])
def test_a_path_the_system_refuses_is_one_line(tmp_path, command, kind):
    file = tmp_path / "kv.npy"
    np.save(file, kv(4, (2, 2)))
    bad = tmp_path / ("a" * 300) if kind == "name too long" else file / "store"
    args = [a.format(p=bad, f=file) for a in command]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kv.npy"]  # nothing was made


@pytest.mark.parametrize("damage", ["removed", "foreign sqlite"])
def test_no_command_initialises_a_catalogue_over_existing_data(path, tmp_path, damage):
    """A lost catalogue beside data: import, migrate and gc all refuse, so gc can never
    delete the data as orphans."""
    import sqlite3

    catalog = path / "catalog.sqlite"
    for suffix in ("", "-wal", "-shm"):
        (path / f"catalog.sqlite{suffix}").unlink(missing_ok=True)
    if damage == "foreign sqlite":
        con = sqlite3.connect(catalog)
        con.execute("CREATE TABLE t (x)")
        con.commit()
        con.close()
    data = sorted(p.name for p in (path / "data").iterdir())
    file = tmp_path / "m.npy"
    np.save(file, kv(4, (2, 2)))
    for args in (["import", str(path), "g9", "x", str(file), "--master"],
                 ["migrate", str(path)], ["gc", str(path)], ["verify", str(path), "--repair"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
    assert sorted(p.name for p in (path / "data").iterdir()) == data
    assert catalog.exists() == (damage == "foreign sqlite")


# --------------------------------------------------------------------------- found by an
# independent tester: each of these printed a traceback, left debris or lost data


def _junk_store(path, tmp_path, damage):
    if damage == "catalog is a directory":
        for suffix in ("", "-wal", "-shm"):
            (path / f"catalog.sqlite{suffix}").unlink(missing_ok=True)
        (path / "catalog.sqlite").mkdir()
    elif damage == "data is a file":
        import shutil

        shutil.rmtree(path / "data")
        (path / "data").write_text("x")
    elif damage == "a table dropped":
        import sqlite3

        con = sqlite3.connect(path / "catalog.sqlite")
        con.execute("DROP TABLE groups")
        con.commit()
        con.close()


@pytest.mark.parametrize("damage", ["catalog is a directory", "data is a file",
                                    "a table dropped"])
@pytest.mark.parametrize("command", [["info"], ["ls"], ["verify"], ["gc"], ["stats", "g"],
                                     ["rm", "g", "a"]])
def test_a_broken_store_layout_is_one_line(path, tmp_path, damage, command):
    _junk_store(path, tmp_path, damage)
    result = CliRunner().invoke(cli, [command[0], str(path), *command[1:]])
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


# the store-wide lock files (every other one is a group's, named by its id)
STORE_LOCKS = {"store.lock", "budget.lock"}


@pytest.mark.parametrize("args, words", [
    (["import", "{p}", "\udcff", "a", "{npy}"], ["not valid Unicode"]),
    (["import", "{p}", "g", "x", "{junk}"], ["cannot be read"]),
    (["import", "{p}", "g", "x", "{empty}"], ["empty or truncated"]),
    (["import", "{p}", "g", "x", "{npy}", "--dtype", ""], ["not a dtype"]),
    (["import", "{p}", "g", "x", "{npy}", "--replace"], ["--replace only goes with"]),
    (["info", "{p}", "--url", "bogus"], ["cannot be used", "postgresql+psycopg"]),
    (["info", "{p}", "--url", "foo://x"], ["cannot be used"]),
    (["info", "{p}", "--url", "sqlite:////nonexistent/dir/x.db"], ["cannot be opened"]),
    (["export", "{p}", "g", "m", "-o", "{p}/evil.npy"], ["inside the store"]),
    (["export", "{p}", "g", "m", "-o", "{npy}"], ["exists", "--force"]),
    (["info", "{tmp}/x\ny"], ["x\\ny"]),
])
def test_bad_input_found_by_the_tester_is_one_line(path, tmp_path, args, words):
    npy, junk, empty = tmp_path / "m.npy", tmp_path / "junk.safetensors", tmp_path / "e.npy"
    np.save(npy, kv(8, (2, 4)))
    junk.write_bytes(b"\xff" * 20)
    empty.write_bytes(b"")
    before = fingerprint(path)
    argv = [a.format(p=path, npy=npy, junk=junk, empty=empty, tmp=tmp_path) for a in args]
    one_line_error(CliRunner().invoke(cli, argv), *words)
    assert fingerprint(path) == before
    assert sorted(p.name for p in (path / "locks").iterdir()) == sorted(
        p.name for p in (path / "locks").iterdir() if p.name in STORE_LOCKS
        or p.stem in _gids(path))


def _gids(path) -> set[str]:
    import sqlite3

    con = sqlite3.connect(path / "catalog.sqlite")
    try:
        return {r[0] for r in con.execute("SELECT gid FROM groups")}
    finally:
        con.close()


@pytest.mark.parametrize("args", [["--seed", "-1"], ["--window", "99999999999999999999"],
                                  ["--threshold", "nan"], ["--threshold", "-1"]])
def test_ab_bad_values_are_refused(kv_store, args):
    result = CliRunner().invoke(cli, ["ab", str(kv_store), "rag", "c", *args])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output


def test_ab_exact_of_another_dtype_is_refused(kv_store, tmp_path):
    np.save(tmp_path / "e.npy", np.zeros((8, 2, 2, 8, 2, 16), np.float64))
    one_line_error(CliRunner().invoke(cli, ["ab", str(kv_store), "rag", "c", "--exact",
                                            str(tmp_path / "e.npy")]), "dtype float64")


@pytest.mark.parametrize("args", [["bench", "--diff-fraction", "nan"],
                                  ["bench", "--block-shape", "99999999999,99999999999"],
                                  ["bench-attention", "--seq", "2000000000", "--head-dim",
                                   "100000"]])
def test_impossible_benchmarks_are_refused_before_running(args):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output


def test_a_deleted_or_discarded_group_leaves_no_lock_file(path, tmp_path):
    (tmp_path / "e.npy").write_bytes(b"")
    for _ in range(3):  # refused imports into new groups
        assert CliRunner().invoke(cli, ["import", str(path), "new", "x",
                                        str(tmp_path / "e.npy")]).exit_code == 2
    assert CliRunner().invoke(cli, ["rm", str(path), "g"]).exit_code == 0
    assert {p.name for p in (path / "locks").iterdir()} <= STORE_LOCKS


def test_rm_of_a_group_names_its_agents(path):
    result = CliRunner().invoke(cli, ["rm", str(path), "g"])
    assert result.exit_code == 0
    assert result.output.strip() == "deleted group 'g' and its 3 agent(s): 'm', 'a', 'b'"


def test_demo_says_it_replaces_an_existing_demo_group(tmp_path):
    store = tmp_path / "d"
    args = ["demo", str(store), "--agents", "2", "--blocks", "4", "--tail", "1", "--near", "0"]
    assert "replacing" not in CliRunner().invoke(cli, args).output
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert "replacing group 'demo'" in again.output and "2 agent(s)" in again.output


AFTER_THE_END = textwrap.dedent("""
    import atexit, os, signal, sys
    sig = getattr(signal, sys.argv[1])
    if sys.argv[2] == "ignored":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    from tdstore.entry import run
    atexit.register(lambda: os.kill(os.getpid(), sig))  # while the interpreter shuts down
    sys.argv = ["tdstore", *sys.argv[3:]]
    run()
""")


@pytest.mark.parametrize("sig, start", [("SIGINT", "default"), ("SIGTERM", "default"),
                                         ("SIGINT", "ignored")])
def test_a_signal_once_the_command_has_finished_does_not_kill_it(path, sig, start):
    """The interpreter resets signal handlers as it shuts down: a signal then used to
    kill a command whose work was done (exit -2, no message)."""
    done = subprocess.run([sys.executable, "-c", AFTER_THE_END, sig, start, "rm", str(path),
                           "g", "a"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout.strip() == "deleted agent 'a' of group 'g'" and done.stderr == ""


def test_a_reader_that_goes_away_is_not_an_error(path):
    """`tdstore info PATH | head -1`: a closed pipe ends the command quietly."""
    proc = subprocess.Popen([sys.executable, "-m", "tdstore", "info", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command writes anything
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert err == "" and proc.returncode == 1


def test_the_library_refuses_a_replacing_import_with_replace_false(path, tmp_path):
    file = tmp_path / "new.npy"
    np.save(file, kv(8, (2, 4), seed=9))
    before = fingerprint(path)
    with tdstore.open(path) as store:
        with pytest.raises(tdstore.InvalidInputError, match=r"removes 3 agent\(s\)"):
            store.group("g").import_file("new", file, master=True, replace=False)
    assert fingerprint(path) == before


def test_budget_json_counts_what_info_counts(path):
    with tdstore.open(path) as store:
        assert store.accounted_bytes() == store.info()["bytes_accounted"] > 0
