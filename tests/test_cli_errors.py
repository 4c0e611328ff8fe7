"""User errors on the command line: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import fingerprint, kv

import tdstore
from tdstore.cli import main as cli


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "s"
    with tdstore.open(p) as store:
        store.group("g").register_master("m", kv(4, (2, 2)))
    return p


def one_line_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 or lines[0].startswith("Usage:"), result.output
    for w in words:
        assert w in result.output, result.output


def test_migrate_to_an_unknown_revision(path):
    before = fingerprint(path)
    one_line_error(CliRunner().invoke(cli, ["migrate", str(path), "--to", "9999"]),
                   "'9999' is unknown", "0004")
    assert fingerprint(path) == before


def test_export_into_a_missing_directory(path, tmp_path):
    one_line_error(CliRunner().invoke(
        cli, ["export", str(path), "g", "m", "-o", str(tmp_path / "missing" / "x.npy")]),
        "does not exist")


def test_export_and_import_safetensors_after_the_plain_install(path, tmp_path):
    out = tmp_path / "m.safetensors"
    assert CliRunner().invoke(cli, ["export", str(path), "g", "m", "-o", str(out)]).exit_code == 0
    r = CliRunner().invoke(cli, ["import", str(path), "h", "m", str(out)])
    assert r.exit_code == 0, r.output
    with tdstore.open(path) as store:
        assert np.array_equal(store.group("h").reconstruct("m"), kv(4, (2, 2)))


@pytest.mark.parametrize("args", [["--agents", "0"], ["--blocks", "0"], ["--tail", "-1"],
                                  ["--blocks", "4", "--tail", "3", "--near", "2"]])
def test_demo_with_impossible_sizes(tmp_path, args):
    r = CliRunner().invoke(cli, ["demo", str(tmp_path / "d"), *args])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "Invalid value" in r.output
    assert not (tmp_path / "d").exists()


def test_bench_nullstats_without_diskcache_names_the_extra():
    # diskcache is installed for the tests: make it unimportable in a child process
    done = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['diskcache'] = None; "
         "from tdstore.cli import main; main(['bench-nullstats', '--gets', '10'])"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "tdstore[bench]" in done.stderr
