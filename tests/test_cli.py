"""Every command through click's CliRunner; info, verify and gc also in a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import fingerprint, head_revision, kv

import tdstore
from tdstore.cli import main


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "s"
    with tdstore.open(p) as store:
        g = store.group("rag", chunk_blocks=4)
        master = kv(16)
        g.register_master("retriever", master)
        critic = master.copy()
        critic[-2:] = kv(2, seed=3)
        g.register_mirror("critic", critic)
    return p


def run(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.stderr)
    return result


def test_info_text_and_json(path):
    out = run("info", path).output
    head = head_revision()
    assert f"schema revision    {head} (latest known {head})" in out
    assert "agents             2" in out and "reclaimable bytes  0 B" in out
    data = json.loads(run("info", path, "--json").output)
    assert data["groups"] == 1 and data["agents"] == 2
    assert data["bytes_logical"] == 2 * kv(16).nbytes
    assert data["compression_ratio"] == pytest.approx(data["bytes_logical"] / data["bytes_stored"])


def test_ls_groups_and_agents(path):
    rows = json.loads(run("ls", path, "--json").output)
    assert [(r["group"], r["agents"], r["master"]) for r in rows] == [("rag", 2, "retriever")]
    agents = json.loads(run("ls", path, "rag", "--json").output)
    assert [(a["agent"], a["role"], a["diff_blocks"], a["status"]) for a in agents] == [
        ("retriever", "master", 0, "ok"), ("critic", "mirror", 2, "ok")]
    text = run("ls", path, "rag").output
    assert "critic" in text and "mirror" in text and "last_access" in text


def test_stats(path):
    data = json.loads(run("stats", path, "rag", "--json").output)
    assert data["diff_blocks_total"] == 2 and data["master_id"] == "retriever"
    assert "n_mirrors          1" in run("stats", path, "rag").output


def test_verify_clean_exits_0_and_damage_exits_1(path):
    assert run("verify", path).output.strip().endswith("clean")
    (chunk,) = (path / "data").glob("*/m-*/c.1.0.0")
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"\x00")
    result = run("verify", path, code=1)
    assert "checksum: group 'rag' agent 'retriever' blocks 4-7" in result.output
    report = json.loads(run("verify", path, "--json", code=1).output)
    assert report["ok"] is False and report["findings"][0]["blocks"] == "blocks 4-7"
    repaired = run("verify", path, "--repair", code=1).output
    assert "repaired: quarantined group 'rag' agent 'retriever'" in repaired


def test_gc_dry_run_and_real(path):
    (path / "data" / "0123456789abcdef").mkdir()
    assert "would remove data/0123456789abcdef" in run("gc", path, "--dry-run").output
    assert (path / "data" / "0123456789abcdef").exists()
    report = json.loads(run("gc", path, "--json").output)
    assert report["removed"] == ["data/0123456789abcdef"]
    assert not (path / "data" / "0123456789abcdef").exists()


def test_compact_and_rebase(path):
    with tdstore.open(path) as store:
        store.group("rag").collective_reuse_step(["critic"], kv(1, seed=7))
    assert "group 'rag':" in run("compact", path, "rag").output
    out = json.loads(run("rebase", path, "rag", "--master", "critic", "--json").output)
    assert out["master"] == "critic" and out["previous_master"] == "retriever"
    assert "master 'critic' ->" in run("rebase", path, "rag", "--auto").output
    assert "exactly one of" in run("rebase", path, "rag", code=2).output


def test_export_import_rm(path, tmp_path):
    out = tmp_path / "critic.safetensors"
    assert "wrote" in run("export", path, "rag", "critic", "-o", out).output
    res = json.loads(run("import", path, "copy", "c", out, "--json").output)
    assert res["role"] == "master"
    with tdstore.open(path) as store:
        assert np.array_equal(store.group("copy").reconstruct("c"),
                              store.group("rag").reconstruct("critic"))
    assert "deleted agent 'critic'" in run("rm", path, "rag", "critic").output
    assert "deleted group 'copy'" in run("rm", path, "copy").output
    with tdstore.open(path) as store:
        assert store.groups() == ["rag"] and store.group("rag").agents() == ["retriever"]


def test_migrate_budget_and_evict(path):
    assert f"schema revision: {head_revision()}" in run("migrate", path).output
    assert "size budget: none" in run("budget", path).output
    assert "size budget: 100000000" in run("budget", path, "100000000").output
    assert "size budget: none" in run("budget", path, "none").output
    dry = run("evict", path, "--max-bytes", "1", "--dry-run").output
    assert "would evict group 'rag' all agents" in dry
    assert json.loads(run("evict", path, "--max-bytes", "1", "--json").output)[0]["group"] == "rag"
    with tdstore.open(path) as store:
        assert store.group("rag").agents() == []


@pytest.mark.parametrize("args, message", [
    (["info", "{tmp}/missing"], "not a tdstore store"),
    (["stats", "{path}", "nope"], "group 'nope' does not exist"),
    (["rm", "{path}", "rag", "ghost"], "unknown agent 'ghost'"),
    (["export", "{path}", "rag", "critic", "-o", "{tmp}/x.csv"], "expected a .npy or"),
    (["import", "{path}", "rag", "x", "{tmp}/nothing.npy"], "does not exist"),
    (["evict", "{path}", "--max-bytes", "0"], "max_bytes must be a positive int"),
    (["rm", "{path}", "rag", "retriever"], "master of 1 mirror"),
])
def test_user_errors_are_one_line_exit_2_and_change_nothing(path, tmp_path, args, message):
    before = fingerprint(path)
    result = CliRunner().invoke(main, [a.format(path=path, tmp=tmp_path) for a in args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.output
    assert fingerprint(path) == before
    assert not (tmp_path / "missing").exists()


def test_info_verify_gc_in_a_real_subprocess(path):
    def tdstore_cmd(*args):
        return subprocess.run([sys.executable, "-m", "tdstore", *map(str, args)],
                              capture_output=True, text=True, timeout=120)

    info = tdstore_cmd("info", path, "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["agents"] == 2
    (path / "data" / "feedfacefeedface").mkdir()
    verify = tdstore_cmd("verify", path)
    assert verify.returncode == 1 and "orphan-group: directory of no group" in verify.stdout
    gc = tdstore_cmd("gc", path)
    assert gc.returncode == 0 and "removed data/feedfacefeedface" in gc.stdout
    assert tdstore_cmd("verify", path).returncode == 0
    assert tdstore_cmd("info", path / "nope").returncode == 2
