"""Attention A/B on stored K/V: layouts, both comparisons, the sweep, the commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import fingerprint

import tdstore
from tdstore.analysis import ab
from tdstore.cli import main

LAYOUT = {"axes": ["layer", "kv", "token", "head", "dim"]}


@pytest.fixture
def path(tmp_path):
    """A group of 32 blocks of (2 layers, k/v, 4 tokens, 2 heads, 8 dims) in float16:
    'critic' differs in 2 tail blocks and by ~1e-3 in blocks 3-5."""
    p = tmp_path / "s"
    rng = np.random.default_rng(0)
    master = rng.standard_normal((32, 2, 2, 4, 2, 8)).astype(np.float16)
    critic = master.copy()
    critic[-2:] = rng.standard_normal(critic[-2:].shape).astype(np.float16)
    critic[3:6] = (critic[3:6].astype(np.float32)
                   + rng.standard_normal(critic[3:6].shape) * 1e-3).astype(np.float16)
    with tdstore.open(p) as store:
        g = store.group("rag", kv_layout=LAYOUT)
        g.register_master("retriever", master)
        g.register_mirror("critic", critic)
    return p


def test_layer_kv_follows_the_layout():
    blocks = np.arange(3 * 2 * 2 * 4 * 5 * 6, dtype=np.float32).reshape(3, 2, 2, 4, 5, 6)
    kv = ab.layer_kv(blocks, LAYOUT)
    assert kv.shape == (2, 2, 12, 5, 6)  # layers, k/v, 3 blocks x 4 tokens, heads, dim
    assert np.array_equal(kv[1, 0, 4 + 2], blocks[1, 1, 0, 2])  # block 1, token 2 of layer 1
    other = {"axes": ["token", "layer", "head", "kv", "dim"]}
    moved = blocks.transpose(0, 3, 1, 4, 2, 5)  # the same cache laid out another way
    assert np.array_equal(ab.layer_kv(moved, other), kv)


@pytest.mark.parametrize("layout, message", [
    ({"axes": ["layer", "kv", "token"]}, "permutation"),
    ("layer,kv", "must be a dict"),
    ({"axes": ["layer", "kv", "token", "head", "head"]}, "permutation"),
])
def test_bad_kv_layouts_are_refused(tmp_path, layout, message):
    with tdstore.open(tmp_path / "s") as store:
        with pytest.raises(tdstore.InvalidInputError, match=message):
            store.group("g", kv_layout=layout)
        assert store.groups() == []


def test_blocks_that_do_not_fit_the_layout_are_refused(tmp_path):
    with tdstore.open(tmp_path / "s") as store:
        g = store.group("g", kv_layout=LAYOUT)
        with pytest.raises(tdstore.InvalidInputError, match="do not fit the group's kv_layout"):
            g.register_master("m", np.zeros((4, 2, 8), np.float32))


def test_compare_reports_both_comparisons_per_layer(path):
    with tdstore.open(path) as store:
        g = store.group("rag")
        cfg = ab.ABConfig(window=16, block_size=8, queries=20, seed=1)
        exact = ab.compare(g, "critic", cfg, threshold=0.0)
        assert exact["blocks_kept_at_threshold"] == 5 and len(exact["layers"]) == 2
        for layer in exact["layers"]:
            b, a = layer["exact_vs_store"], layer["dense_vs_sparse"]
            assert b["max_abs_err"] == 0 and b["kl"] == 0
            assert b["cos_min"] == pytest.approx(1.0, abs=1e-12)
            assert a["max_abs_err"] > 0 and 0 < a["mass_kept"] < 1 and a["kl"] > 0
            assert -1 <= a["cos_min"] <= a["cos_mean"] <= 1
        loose = ab.compare(g, "critic", cfg, threshold=0.5, layers=[1])
        assert loose["blocks_kept_at_threshold"] == 2
        assert [r["layer"] for r in loose["layers"]] == [1]
        b = loose["layers"][0]["exact_vs_store"]
        assert 0 < b["max_abs_err"] < 0.05 and b["kl"] > 0
        assert g.diff_threshold == 0.0  # nothing in the store changed


def test_compare_against_an_exact_copy_from_outside(path):
    with tdstore.open(path) as store:
        g = store.group("rag")
        exact = g.reconstruct("critic")
        exact[0, 0, 0, 0, 0, 0] += np.float16(0.5)  # what the store does not have
        r = ab.compare(g, "critic", ab.ABConfig(window=16, block_size=8, queries=32),
                       exact=exact)
        assert r["comparison_b"] == "exact file vs store reconstruction"
        assert max(layer["exact_vs_store"]["max_abs_err"] for layer in r["layers"]) > 0


def test_saturated_sparse_settings_make_a_zero_dense_vs_sparse_error(path):
    with tdstore.open(path) as store:
        cfg = ab.ABConfig(window=128, block_size=128, queries=16)
        r = ab.compare(store.group("rag"), "critic", cfg)
        for layer in r["layers"]:
            assert layer["dense_vs_sparse"]["max_abs_err"] < 1e-5
            assert layer["dense_vs_sparse"]["mass_kept"] == pytest.approx(1.0)


def test_sweep_trades_compression_for_error_monotonically(path):
    with tdstore.open(path) as store:
        r = ab.sweep(store.group("rag"), [0, 0.5, 1e4],
                     ab.ABConfig(window=16, block_size=8, queries=16))
    rows = r["rows"]
    assert [x["diff_blocks"] for x in rows] == [5, 2, 0]
    assert rows[0]["rel_err_mean"] == 0 < rows[1]["rel_err_mean"] < rows[2]["rel_err_mean"]
    ratios = [x["compression_ratio"] for x in rows]
    assert ratios[0] < ratios[1] < ratios[2]
    assert rows[2]["compression_ratio"] == 2.0


def test_a_group_without_layout_gets_a_clear_error(tmp_path):
    with tdstore.open(tmp_path / "s") as store:
        g = store.group("plain")
        g.register_master("m", np.zeros((4, 2, 8), np.float32))
        with pytest.raises(tdstore.StateError, match="records no kv_layout"):
            ab.compare(g, "m")


def test_ab_and_ab_sweep_commands_write_json_and_readable_pngs(path, tmp_path):
    before = fingerprint(path)
    runner = CliRunner()
    res = runner.invoke(main, ["ab", str(path), "rag", "critic", "--window", "16",
                               "--block-size", "8", "--queries", "8", "--threshold", "0.5",
                               "--plot", str(tmp_path / "ab.png"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["threshold"] == 0.5 and len(report["layers"]) == 2
    res = runner.invoke(main, ["ab", str(path), "rag", "critic", "--layers", "0",
                               "--window", "16", "--block-size", "8"])
    assert res.exit_code == 0 and "mass kept" in res.output
    res = runner.invoke(main, ["ab-sweep", str(path), "rag", "--thresholds", "0,0.5,10000",
                               "--window", "16", "--block-size", "8", "--plot",
                               str(tmp_path / "sweep.png")])
    assert res.exit_code == 0, res.output
    assert "compression_ratio" in res.output and "2.00x" in res.output
    for png in ("ab.png", "sweep.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    bad = runner.invoke(main, ["ab-sweep", str(path), "rag", "--thresholds", "0,-1"])
    assert bad.exit_code == 2 and "thresholds must be finite and >= 0" in bad.stderr
    bad = runner.invoke(main, ["ab", str(path), "rag", "critic", "--layers", "7"])
    assert bad.exit_code == 2 and "layers [7] out of range" in bad.stderr
    assert fingerprint(path)[1] == before[1]  # the A/B wrote no array data


def test_bench_attention_command_reports_speed_and_memory():
    res = CliRunner().invoke(main, ["bench-attention", "--seq", "512", "--window", "32",
                                    "--block-size", "16", "--reps", "1", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["dense_s"] > 0 and r["sparse_s"] > 0 and r["peak_ok"] is True
