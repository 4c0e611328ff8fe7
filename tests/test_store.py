"""Behaviour of Store and Group: round trips, diff semantics, layout, writes, reads."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import zarr
from conftest import bits, kv

import tdstore
from tdstore.core.dtypes import SUPPORTED

LAYOUT = ("layer", "kv", "token", "head", "dim")
RAW_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
              "float8_e5m2": ml_dtypes.float8_e5m2}


def random_bits(shape, dtype_name: str, seed: int = 0) -> np.ndarray:
    """Arrays of arbitrary (finite) bit patterns in any supported dtype."""
    dt = np.dtype(RAW_DTYPES.get(dtype_name, dtype_name))
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=(*shape, dt.itemsize), dtype=np.uint8).view(dt).reshape(shape)
    if dtype_name.startswith(("float", "bfloat")):
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(a)
        a[bad] = np.asarray(1.5, dtype=dt)
    return a


@pytest.mark.parametrize("dtype_name", SUPPORTED)
def test_every_dtype_round_trips_bit_exact(store, dtype_name):
    g = store.group("g")
    master = random_bits((24, 3, 5), dtype_name)
    mirror = master.copy()
    mirror[[2, 20]] = random_bits((2, 3, 5), dtype_name, seed=1)
    g.register_master("m", master)
    d = g.register_mirror("a", mirror)
    assert g.dtype == master.dtype
    assert set(d.block_indices.tolist()) <= {2, 20}
    assert bits(g.reconstruct("m")).tobytes() == bits(master).tobytes()
    assert bits(g.reconstruct("a")).tobytes() == bits(mirror).tobytes()


def test_threshold_zero_keeps_a_block_iff_any_byte_differs(store):
    g = store.group("g", diff_threshold=0.0)
    master = np.zeros((6, 4), np.float32)
    mirror = master.copy()
    mirror[1, 0] = -0.0  # equal as a float, different bytes
    mirror[3, 2] = np.float32(1e-38)
    g.register_master("m", master)
    d = g.register_mirror("a", mirror)
    assert d.block_indices.tolist() == [1, 3]
    assert bits(g.reconstruct("a")).tobytes() == bits(mirror).tobytes()


def test_threshold_compares_l2_distance_in_float64(store):
    # float16 deltas of 200 over 64 values overflow a float16 norm (inf); float64 does not
    g = store.group("g", diff_threshold=2000.0)
    master = np.zeros((4, 64), np.float16)
    mirror = master.copy()
    mirror[0] = 200.0  # distance 1600 <= 2000: equal
    mirror[1] = 300.0  # distance 2400 > 2000: kept
    g.register_master("m", master)
    d = g.register_mirror("a", mirror)
    assert d.block_indices.tolist() == [1]
    out = g.reconstruct("a")
    assert (out[0] == 0).all() and (out[1] == 300).all()


def test_threshold_drops_blocks_within_distance(store):
    g = store.group("g", diff_threshold=0.5)
    master = kv(8)
    mirror = master.copy()
    mirror[2] += 0.01
    mirror[5] += 10.0
    g.register_master("m", master)
    assert g.register_mirror("a", mirror).block_indices.tolist() == [5]


def test_nonfinite_refused_by_default_and_kept_exactly_when_allowed(tmp_path):
    with tdstore.open(tmp_path / "s") as store:
        master = kv(4)
        bad = master.copy()
        bad[1, 0] = np.nan
        strict = store.group("strict")
        strict.register_master("m", master)
        with pytest.raises(tdstore.InvalidInputError, match="NaN or inf in block"):
            strict.register_mirror("a", bad)
        loose = store.group("loose", diff_threshold=1.0, allow_nonfinite=True)
        loose.register_master("m", master)
        payload = bad.copy()
        payload.view(np.uint32)[2, 3] = 0x7FC0_1234  # a NaN with a payload
        d = loose.register_mirror("a", payload)
        assert d.block_indices.tolist() == [1, 2]  # a NaN distance is never "equal"
        assert bits(loose.reconstruct("a")).tobytes() == bits(payload).tobytes()


def test_out_fills_a_preallocated_array_and_a_memmap(store, tmp_path):
    g = store.group("g")
    master, mirror = kv(40), kv(40)
    mirror[:30] = master[:30]
    g.register_master("m", master)
    g.register_mirror("a", mirror)
    buf = np.full_like(master, 7.0)
    assert g.reconstruct("a", out=buf) is buf
    assert np.array_equal(buf, mirror)
    mm = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=master.dtype,
                                   shape=master.shape)
    g.reconstruct("a", out=mm)
    mm.flush()
    assert np.array_equal(np.load(tmp_path / "a.npy"), mirror)


def test_out_with_wrong_shape_or_dtype_is_refused(store):
    g = store.group("g")
    g.register_master("m", kv(8))
    with pytest.raises(tdstore.InvalidInputError, match=r"out has shape \(8, 4, 4\)"):
        g.reconstruct("m", out=np.empty((8, 4, 4), np.float32))
    with pytest.raises(tdstore.InvalidInputError, match="dtype float64"):
        g.reconstruct("m", out=np.empty((8, 4, 8), np.float64))
    with pytest.raises(tdstore.InvalidInputError, match="C-contiguous"):
        g.reconstruct("m", out=np.empty((8, 8, 4), np.float32).transpose(0, 2, 1))


def test_view_reads_slices_lists_and_single_blocks(store):
    g = store.group("g", chunk_blocks=4)
    master, mirror = kv(30), kv(30, seed=1)
    mirror[::2] = master[::2]
    g.register_master("m", master)
    g.register_mirror("a", mirror)
    v = g.view("a")
    assert len(v) == 30 and v.shape == mirror.shape and v.dtype == mirror.dtype
    assert np.array_equal(v[10:20], mirror[10:20])
    assert np.array_equal(v[[3, 7, 3, 29]], mirror[[3, 7, 3, 29]])
    assert np.array_equal(v[-1], mirror[-1])
    assert np.array_equal(v[::7], mirror[::7])
    assert np.array_equal(v[np.arange(30) % 3 == 0], mirror[::3])
    assert v[5:5].shape == (0, 4, 8)
    assert np.array_equal(np.asarray(v), mirror)
    with pytest.raises(IndexError):
        v[30]
    with pytest.raises(tdstore.NotFoundError):
        g.view("ghost")


@pytest.mark.parametrize("compressor", ["zstd", "blosc-lz4"])
def test_compressed_groups_round_trip_and_use_less_space(store, compressor):
    plain, packed = store.group("plain"), store.group("packed", compressor=compressor)
    master = np.zeros((64, 16, 16), np.float16)
    master[:, 0, :4] = kv(64, (4,), "float16")
    mirror = master.copy()
    mirror[60:] = 1
    for g in (plain, packed):
        g.register_master("m", master)
        g.register_mirror("a", mirror)
        g.collective_reuse_step(["a"], master[:5])
        assert np.array_equal(g.reconstruct("a"), np.concatenate([mirror, master[:5]]))
        assert np.array_equal(g.view("a")[58:66], np.concatenate([mirror, master[:5]])[58:66])
    assert packed.stats()["bytes_stored"] < plain.stats()["bytes_stored"] / 4


def test_unknown_compressor_is_refused(store):
    with pytest.raises(tdstore.InvalidInputError, match="compressor 'lzma' is not supported"):
        store.group("g", compressor="lzma")
    assert "g" not in store


def test_collective_reuse_step_appends_without_rewriting_full_chunks(store):
    g = store.group("g", chunk_blocks=4)
    master = kv(10)
    g.register_master("m", master)
    g.register_mirror("a", master.copy())
    mdir = store.path / "data" / _master_array(store, "g")
    before = {p.name: p.stat().st_ino for p in mdir.glob("c.*")}
    new = kv(3, seed=9)
    counts = g.collective_reuse_step(["m", "a", "late"], new)
    assert counts == {"m": 0, "a": 0, "late": 0}
    after = {p.name: p.stat().st_ino for p in mdir.glob("c.*")}
    # chunks 0 and 1 (blocks 0-7) are untouched; chunk 2 held committed blocks 8-9 and
    # was replaced atomically; chunk 3 is new
    assert after["c.0.0.0"] == before["c.0.0.0"] and after["c.1.0.0"] == before["c.1.0.0"]
    assert after["c.2.0.0"] != before["c.2.0.0"] and "c.3.0.0" in after
    full = np.concatenate([master, new])
    for agent in ("m", "a", "late"):
        assert np.array_equal(g.reconstruct(agent), full)
    assert g.n_blocks == 13 and g.agents() == ["m", "a", "late"]


def test_collective_reuse_step_keeps_mirror_diffs(store):
    g = store.group("g")
    master = kv(8)
    mirror = master.copy()
    mirror[3] = 5
    g.register_master("m", master)
    g.register_mirror("a", mirror)
    assert g.collective_reuse_step(["a"], kv(2, seed=4)) == {"m": 0, "a": 1}
    assert np.array_equal(g.reconstruct("a"), np.concatenate([mirror, kv(2, seed=4)]))
    assert g.mirror("a").total_blocks == 10


def test_replacing_the_master_clears_mirrors_and_frees_their_data(store):
    g = store.group("g")
    g.register_master("m", kv(8))
    g.register_mirror("a", kv(8, seed=1))
    g.register_master("other", kv(5, (2, 2)))
    assert g.agents() == ["other"]
    assert g.master_id == "other" and g.block_shape == (2, 2) and g.n_blocks == 5
    arrays = [p.name for p in (store.path / "data").glob("*/*") if p.is_dir()]
    assert len(arrays) == 1 and arrays[0].startswith("m-")


def test_reregistering_the_master_rederives_every_mirror(store):
    g = store.group("g")
    old, mirror, new = kv(12), kv(12, seed=1), kv(12, seed=2)
    mirror[:6] = old[:6]
    g.register_master("m", old)
    g.register_mirror("a", mirror)
    new[6:] = mirror[6:]
    g.register_master("m", new)
    assert np.array_equal(g.reconstruct("m"), new)
    assert np.array_equal(g.reconstruct("a"), mirror)  # not silently changed
    assert g.mirror("a").block_indices.tolist() == list(range(6))


def test_reregistering_a_mirror_replaces_it(store):
    g = store.group("g")
    master = kv(8)
    g.register_master("m", master)
    first, second = master.copy(), master.copy()
    first[0], second[7] = 1, 2
    g.register_mirror("a", first)
    g.register_mirror("a", second)
    assert g.mirror("a").block_indices.tolist() == [7]
    assert np.array_equal(g.reconstruct("a"), second)
    assert len(list((store.path / "data").glob("*/d-*"))) == 1


def test_mirror_reports_values_and_seed_deltas(store):
    g = store.group("g")
    master = kv(6, dtype="float16")
    mirror = master.copy()
    mirror[4] += np.float16(3)
    g.register_master("m", master)
    d = g.register_mirror("a", mirror)
    again = g.mirror("a")
    for diff in (d, again):
        assert diff.block_indices.tolist() == [4]
        assert bits(diff.values).tobytes() == bits(mirror[[4]]).tobytes()
        np.testing.assert_array_equal(
            diff.diff_values, mirror[[4]].astype(np.float64) - master[[4]].astype(np.float64)
        )
        assert diff.total_blocks == 6 and diff.sparsity == pytest.approx(5 / 6)


def test_delete_agents_and_groups(store):
    g = store.group("g")
    g.register_master("m", kv(8))
    g.register_mirror("a", kv(8, seed=1))
    with pytest.raises(tdstore.StateError, match="master of 1 mirror"):
        g.delete("m")
    g.delete("a")
    assert "a" not in g and g.agents() == ["m"]
    g.delete("m")
    assert g.agents() == [] and g.master_id is None and g.n_blocks == 0
    with pytest.raises(tdstore.NotFoundError):
        g.delete("m")
    store.delete_group("g")
    assert store.groups() == [] and not any((store.path / "data").glob("*/"))


def test_stats_has_seed_keys_layout_and_bytes(store):
    g = store.group("g", diff_threshold=0.0)
    master = kv(16, (8, 32), "float16")
    mirror = master.copy()
    mirror[-2:] = 0
    g.register_master("m", master)
    g.register_mirror("a", mirror)
    s = g.stats()
    assert s["master_id"] == "m" and s["master_blocks"] == 16 and s["n_mirrors"] == 1
    assert s["diff_blocks_total"] == 2 and s["diff_threshold"] == 0.0
    assert s["compression_ratio"] == pytest.approx(32 / 18) == g.compression_ratio()
    assert s["n_blocks"] == 16 and s["block_shape"] == (8, 32) and s["dtype"] == "float16"
    assert s["bytes_logical"] == 2 * master.nbytes
    payload = master.nbytes + mirror[-2:].nbytes
    assert payload <= s["bytes_stored"] <= payload * 1.02 + 4096


def test_settings_persist_and_explicit_settings_replace_them(tmp_path):
    with tdstore.open(tmp_path / "s") as store:
        store.group("g", diff_threshold=0.25, kv_layout={"axes": list(LAYOUT)})
    with tdstore.open(tmp_path / "s") as store:
        g = store.group("g")
        assert g.diff_threshold == 0.25 and g.kv_layout == {"axes": list(LAYOUT)}
        store.group("g", diff_threshold=0.5)
        assert g.diff_threshold == 0.5
        with pytest.raises(tdstore.InvalidInputError, match="compressor"):
            store.group("g", compressor="zstd")


def test_groups_are_independent(store):
    a, b = store.group("a"), store.group("b")
    a.register_master("x", kv(4))
    b.register_master("x", kv(6, seed=3))
    assert store.groups() == ["a", "b"]
    assert np.array_equal(a.reconstruct("x"), kv(4))
    assert np.array_equal(b.reconstruct("x"), kv(6, seed=3))


def test_master_arrays_are_plain_zarr_readable_by_zarr(store):
    g = store.group("g", chunk_blocks=3)
    master = kv(10, dtype="bfloat16")
    g.register_master("m", master)
    arr = zarr.open_array(str(store.path / "data" / _master_array(store, "g")), mode="r")
    assert arr.shape == master.shape and arr.dtype == np.uint16
    assert np.array_equal(arr[:], master.view(np.uint16))


def test_big_endian_fortran_and_strided_inputs_are_stored_exactly(store):
    g = store.group("g")
    base = kv(8)
    g.register_master("m", base.astype(">f4"))
    assert np.array_equal(g.reconstruct("m"), base) and g.dtype == np.dtype("<f4")
    g.register_mirror("f", np.asfortranarray(base))
    strided = np.repeat(base, 2, axis=2)[:, :, ::2]
    g.register_mirror("s", strided)
    assert g.mirror("f").n_diff_blocks == 0 and g.mirror("s").n_diff_blocks == 0


def test_a_master_of_zero_blocks_grows_by_reuse_steps(store):
    g = store.group("g")
    g.register_master("m", np.zeros((0, 4), np.float32))
    assert g.reconstruct("m").shape == (0, 4)
    g.collective_reuse_step(["a"], kv(3, (4,)))
    g.collective_reuse_step(["a"], kv(5, (4,), seed=1))
    assert np.array_equal(g.reconstruct("a"), np.concatenate([kv(3, (4,)), kv(5, (4,), seed=1)]))
    # an empty master gets full-size chunks, not one file per appended block
    assert len(list((store.path / "data").glob("*/m-*/c.*"))) == 1


def _master_array(store, group: str) -> str:
    import sqlite3

    con = sqlite3.connect(store.path / "catalog.sqlite")
    (path,) = con.execute(
        "SELECT a.array FROM agents a JOIN groups g ON a.group_id = g.id "
        "WHERE g.name = ? AND a.role = 'master'", (group,)
    ).fetchone()
    con.close()
    return path
