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

    from tdstore.cli import run
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
