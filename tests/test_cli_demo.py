"""``tdstore demo``: writes a group, verifies it in a fresh process, prints the figures."""

from __future__ import annotations

import re
import subprocess
import sys

from click.testing import CliRunner

import tdstore
from tdstore.cli import main


def test_demo_writes_verifies_and_reports(tmp_path):
    result = CliRunner().invoke(main, ["demo", str(tmp_path / "d"), "--blocks", "32"])
    assert result.exit_code == 0, result.output
    assert "bit-exact: 8/8" in result.output
    ratio = float(re.search(r"compression ratio ([\d.]+)x \(blocks\)", result.output).group(1))
    assert abs(ratio - 8 * 32 / (32 + 7 * (8 + 4))) < 0.01  # 8 tail + 4 near blocks each
    with tdstore.open(tmp_path / "d", readonly=True) as store:
        assert len(store.group("demo", create=False).agents()) == 8


def test_demo_runs_again_on_the_same_store(tmp_path):
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "tdstore", "demo", str(tmp_path / "d"),
                               "--blocks", "16", "--tail", "2"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "bit-exact: 8/8" in done.stdout


def test_user_errors_print_one_line_and_exit_2(tmp_path):
    (tmp_path / "x").write_text("not a store")
    result = CliRunner().invoke(main, ["demo", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: store {tmp_path / 'x'}: exists and is not a directory"
    ]
    assert "Traceback" not in result.output
