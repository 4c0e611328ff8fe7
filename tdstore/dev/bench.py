"""The read/write benchmark behind ``tdstore bench`` (also ``tools/bench.py``).

Everything is measured in one run on the same data, best of several repetitions, and
reported as ratios against baselines measured in that same run (machines are shared and
noisy): memcpy of the same bytes, one ``np.save``/``np.load`` file per agent,
``safetensors`` files and a ``diskcache.Cache``.
Cold reads evict every file from the page cache first (``posix_fadvise(DONTNEED)``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tdstore.api.store import open as open_store
from tdstore.storage.arrays import fsync_file

MiB = 1 << 20
GROUP = "bench"


@dataclass
class Workload:
    agents: int = 8
    blocks: int = 1024
    block_shape: tuple[int, ...] = (2, 16, 8, 128)  # k/v, tokens, kv heads, head dim
    dtype: str = "float16"
    diff_fraction: float = 0.05  # share of tail blocks where each mirror differs
    reps: int = 5
    scaling_mirrors: int = 200
    open_agents: int = 10_000
    big_gib: float = 4.0  # memmap-output test; 0 skips it
    extra: dict = field(default_factory=dict)

    @property
    def agent_nbytes(self) -> int:
        return self.blocks * int(np.prod(self.block_shape)) * np.dtype(self.dtype).itemsize

    @property
    def diff_blocks(self) -> int:
        return max(1, round(self.blocks * self.diff_fraction))


def make_agents(w: Workload) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    master = rng.standard_normal((w.blocks, *w.block_shape), np.float32).astype(w.dtype)
    agents = [master]
    for _ in range(1, w.agents):
        kv = master.copy()
        tail = kv[w.blocks - w.diff_blocks :]
        tail[...] = rng.standard_normal(tail.shape, np.float32).astype(w.dtype)
        agents.append(kv)
    return agents


def best(fn: Callable[[], object], reps: int, setup: Callable[[], object] | None = None) -> float:
    """The fastest of ``reps`` timed calls of ``fn`` (``setup`` runs untimed before each)."""
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def drop_page_cache(path: Path) -> None:
    """Drop every file under ``path`` from the page cache (no root needed)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # only clean pages can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- tdstore


def bench_tdstore(w: Workload, agents: list[np.ndarray], root: Path) -> dict[str, float]:
    r: dict[str, float] = {}
    path = root / "store"
    names = [f"agent{i}" for i in range(w.agents)]
    with open_store(path) as store:

        def fresh_group():
            if GROUP in store:
                store.delete_group(GROUP)
            return store.group(GROUP, diff_threshold=0.0)

        r["register_master_s"] = best(lambda: store.group(GROUP).register_master(
            names[0], agents[0]), w.reps, setup=fresh_group)
        g = store.group(GROUP)
        r["register_mirror_s"] = best(lambda: g.register_mirror(names[1], agents[1]), w.reps)
        for name, kv in zip(names[2:], agents[2:], strict=True):
            g.register_mirror(name, kv)
        r["bytes_on_disk"] = du(path)
        stats = g.stats()
        r["bytes_ideal"] = (w.blocks + stats["diff_blocks_total"]) * (
            agents[0][:1].nbytes)
        r["compression_ratio"] = stats["compression_ratio"]

        mirror = names[-1]
        g.reconstruct(mirror)  # warm the page cache
        r["reconstruct_warm_s"] = best(lambda: g.reconstruct(mirror), w.reps)
        out = np.empty_like(agents[0])
        r["reconstruct_out_warm_s"] = best(lambda: g.reconstruct(mirror, out=out), w.reps)
        r["reconstruct_master_warm_s"] = best(lambda: g.reconstruct(names[0], out=out), w.reps)
        assert np.array_equal(g.reconstruct(mirror).view(np.uint8), agents[-1].view(np.uint8))

        n10 = max(1, w.blocks // 10)
        view = g.view(mirror)
        r["view_10pct_warm_s"] = best(lambda: view[w.blocks - n10 :], w.reps)

        def read_all():
            for name in names:
                g.reconstruct(name, out=out)

        r["reconstruct_all_cold_s"] = best(read_all, w.reps, setup=lambda: drop_page_cache(path))
        r["reconstruct_cold_s"] = best(lambda: g.reconstruct(mirror, out=out), w.reps,
                                       setup=lambda: drop_page_cache(path))

        g.reconstruct(mirror, out=out)
        tracemalloc.start()
        g.reconstruct(mirror, out=out)
        r["reconstruct_peak_extra_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return r


def bench_scaling(w: Workload, root: Path) -> dict[str, float]:
    """register_mirror/reconstruct with 2 vs many mirrors; open with few vs many agents."""
    r: dict[str, float] = {}
    small = Workload(agents=2, blocks=max(16, w.blocks // 4), block_shape=w.block_shape,
                     dtype=w.dtype, diff_fraction=w.diff_fraction)
    master, probe = make_agents(small)
    out = np.empty_like(master)
    with open_store(root / "scaling") as store:
        g = store.group("scaling", diff_threshold=0.0)
        g.register_master("master", master)
        g.register_mirror("other", probe)
        timings = {}
        for n_mirrors in (2, w.scaling_mirrors):
            while len(g.agents()) - 1 < n_mirrors - 1:
                g.register_mirror(f"m{len(g.agents())}", probe)
            timings[n_mirrors] = (
                best(lambda: g.register_mirror("probe", probe), w.reps),
                best(lambda: g.reconstruct("probe", out=out), w.reps),
            )
        few, many = timings[2], timings[w.scaling_mirrors]
        r["register_mirror_2_s"], r["reconstruct_2_s"] = few
        r["register_mirror_many_s"], r["reconstruct_many_s"] = many

    for n_agents in (10, w.open_agents):
        path = root / f"open{n_agents}"
        with open_store(path) as store:
            g = store.group("g")
            g.register_master("master", np.zeros((4, 8), np.float32))
            g.collective_reuse_step([f"a{i}" for i in range(n_agents - 1)],
                                    np.zeros((0, 8), np.float32))

        def open_and_read(p=path):
            with open_store(p) as s:
                s.group("g").reconstruct("a1")

        r[f"open_{n_agents}_s"] = best(open_and_read, w.reps)
    return r


# Peak RSS comes from VmHWM: ru_maxrss would include the parent's RSS at fork time.
_BIG_CHILD = textwrap.dedent("""
    import json, sys, numpy as np, tdstore

    def hwm_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    store, out_path = sys.argv[1], sys.argv[2]
    with tdstore.open(store) as s:
        g = s.group("big")
        out = np.lib.format.open_memmap(out_path, mode="w+", dtype=g.dtype,
                                        shape=(g.n_blocks, *g.block_shape))
        before = hwm_kib()
        g.reconstruct("mirror", out=out)
        ok = bool((out[-1] == 1).all() and (out[0] == 0).all())
        print(json.dumps({"peak_rss_kib": hwm_kib(), "rss_before_kib": before, "ok": ok}))
""")


def bench_big_memmap(w: Workload, root: Path) -> dict[str, float]:
    """Rebuild a ``big_gib`` agent into an np.memmap in a child process; its peak RSS."""
    path = root / "big"
    block = np.zeros((16, *w.block_shape), w.dtype)
    total = int(w.big_gib * (1 << 30)) // block[:1].nbytes
    with open_store(path) as store:
        g = store.group("big", diff_threshold=0.0)
        g.register_master("master", block[:0])
        step = (256 * MiB) // block[:1].nbytes
        for start in range(0, total, step):  # grows the master 256 MiB at a time
            g.collective_reuse_step(["mirror"], np.zeros((min(step, total - start),
                                                          *w.block_shape), w.dtype))
        idx = np.arange(total - 16, total)
        mirror_tail = np.ones((16, *w.block_shape), w.dtype)
    # register the mirror from a memmap, so this process never holds 4 GiB either
    src = np.lib.format.open_memmap(root / "big-src.npy", mode="w+", dtype=w.dtype,
                                    shape=(total, *w.block_shape))
    src[idx] = mirror_tail
    src.flush()
    with open_store(path) as store:
        store.group("big").register_mirror("mirror", src)
    del src
    (root / "big-src.npy").unlink()
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _BIG_CHILD, str(path), str(root / "out.npy")],
                          capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - t0
    res = json.loads(done.stdout)
    shutil.rmtree(path)
    (root / "out.npy").unlink()
    return {"big_agent_bytes": total * block[:1].nbytes, "big_peak_rss_bytes":
            res["peak_rss_kib"] * 1024, "big_rss_before_bytes": res["rss_before_kib"] * 1024,
            "big_ok": res["ok"], "big_child_s": elapsed}


# --------------------------------------------------------------------------- baselines


def bench_baselines(w: Workload, agents: list[np.ndarray], root: Path) -> dict[str, float]:
    with contextlib.ExitStack() as stack:
        return _baselines(w, agents, root, stack)


def _baselines(w: Workload, agents: list[np.ndarray], root: Path,
               stack: contextlib.ExitStack) -> dict[str, float]:
    r: dict[str, float] = {}
    a = agents[-1]
    dst = np.empty_like(a)
    r["memcpy_s"] = best(lambda: np.copyto(dst, a), w.reps)
    r["memcpy_fresh_s"] = best(lambda: a.copy(), w.reps)

    npy = root / "npy"
    npy.mkdir()

    def np_save(i: int, kv: np.ndarray) -> None:
        with open(npy / f"agent{i}.npy", "wb") as f:
            np.save(f, kv)
            f.flush()
            os.fsync(f.fileno())

    r["np_save_fsync_s"] = best(lambda: np_save(0, agents[0]), w.reps)
    for i, kv in enumerate(agents):
        np_save(i, kv)
    last = npy / f"agent{len(agents) - 1}.npy"
    np.load(last)
    r["np_load_warm_s"] = best(lambda: np.load(last), w.reps)
    r["np_load_cold_s"] = best(lambda: np.load(last), w.reps, setup=lambda: drop_page_cache(npy))
    r["np_load_all_cold_s"] = best(
        lambda: [np.load(npy / f"agent{i}.npy") for i in range(len(agents))], w.reps,
        setup=lambda: drop_page_cache(npy))
    r["np_bytes_on_disk"] = du(npy)

    with contextlib.suppress(ImportError):
        from safetensors.numpy import load_file, save_file

        st = root / "st"
        st.mkdir()

        def st_save(i: int, kv: np.ndarray) -> None:
            save_file({"kv": kv}, str(st / f"agent{i}.safetensors"))
            fsync_file(st / f"agent{i}.safetensors")

        r["safetensors_save_fsync_s"] = best(lambda: st_save(0, agents[0]), w.reps)
        for i, kv in enumerate(agents):
            st_save(i, kv)
        f = str(st / f"agent{len(agents) - 1}.safetensors")
        load_file(f)
        r["safetensors_load_warm_s"] = best(lambda: load_file(f), w.reps)
        r["safetensors_load_all_cold_s"] = best(
            lambda: [load_file(str(st / f"agent{i}.safetensors")) for i in range(len(agents))],
            w.reps, setup=lambda: drop_page_cache(st))
        r["safetensors_bytes_on_disk"] = du(st)

    with contextlib.suppress(ImportError):
        import diskcache

        dc_path = root / "diskcache"
        with diskcache.Cache(str(dc_path)) as cache:
            r["diskcache_set_s"] = best(lambda: cache.set("agent0", agents[0].tobytes()), w.reps)
            for i, kv in enumerate(agents):
                cache.set(f"agent{i}", kv.tobytes())
            key = f"agent{len(agents) - 1}"

            def dc_get():
                return np.frombuffer(cache.get(key), a.dtype).reshape(a.shape)

            dc_get()
            r["diskcache_get_warm_s"] = best(dc_get, w.reps)
            r["diskcache_get_all_cold_s"] = best(
                lambda: [cache.get(f"agent{i}") for i in range(len(agents))], w.reps,
                setup=lambda: drop_page_cache(dc_path))
        r["diskcache_bytes_on_disk"] = du(dc_path)

    return r


# --------------------------------------------------------------------------- report


Target = dict[str, float | bool | str | None]


def ratios(w: Workload, r: dict[str, float]) -> dict[str, Target]:
    """Each target: the measured ratio, the target, and whether it is met."""

    def ratio(num: str, den: str) -> float | None:
        return r[num] / r[den] if num in r and den in r and r[den] else None

    def target(value: float | None, goal: float, higher_is_better: bool = True) -> Target:
        met = None if value is None else (value >= goal if higher_is_better else value <= goal)
        return {"value": value, "target": goal, "met": met,
                "direction": ">=" if higher_is_better else "<="}

    # (what, baseline time or size, tdstore's, target, whether higher is better)
    table = [
        ("warm reconstruct vs np.load", "np_load_warm_s", "reconstruct_warm_s", 0.9, True),
        ("warm reconstruct vs safetensors load_file", "safetensors_load_warm_s",
         "reconstruct_warm_s", 0.9, True),
        ("warm reconstruct vs memcpy (fresh output)", "memcpy_fresh_s", "reconstruct_warm_s",
         0.5, True),
        ("warm reconstruct(out=) vs memcpy (preallocated)", "memcpy_s",
         "reconstruct_out_warm_s", 0.5, True),
        ("cold reconstruct all agents vs np.load all", "np_load_all_cold_s",
         "reconstruct_all_cold_s", 2.0, True),
        ("register_mirror vs np.save+fsync", "np_save_fsync_s", "register_mirror_s", 3.0, True),
        ("register_master vs np.save+fsync", "np_save_fsync_s", "register_master_s", 0.8, True),
        ("bytes on disk / ideal (master + kept diff blocks)", "bytes_on_disk", "bytes_ideal",
         1.02, False),
        ("register_mirror 200 vs 2 mirrors (time ratio)", "register_mirror_many_s",
         "register_mirror_2_s", 1.25, False),
        ("reconstruct 200 vs 2 mirrors (time ratio)", "reconstruct_many_s", "reconstruct_2_s",
         1.25, False),
        (f"open+read {w.open_agents} vs 10 agents (time ratio)", f"open_{w.open_agents}_s",
         "open_10_s", 2.0, False),
    ]
    out = {name: target(ratio(num, den), goal, higher) for name, num, den, goal, higher in table}
    out["reconstruct peak memory above output (MiB)"] = target(
        r.get("reconstruct_peak_extra_bytes", 0) / MiB, 64, higher_is_better=False)
    if "big_peak_rss_bytes" in r:
        out[f"peak RSS, {w.big_gib:g} GiB agent into np.memmap (MiB)"] = target(
            r["big_peak_rss_bytes"] / MiB, 512, higher_is_better=False)
    return out


def throughput_table(w: Workload, r: dict[str, float]) -> list[tuple[str, str, str]]:
    n = w.agent_nbytes
    rows = []

    def add(label: str, key: str, nbytes: int) -> None:
        if key in r:
            rows.append((label, f"{r[key] * 1e3:9.1f} ms", f"{nbytes / r[key] / 1e9:6.2f} GB/s"))

    add("memcpy into a preallocated array", "memcpy_s", n)
    add("memcpy into a fresh array", "memcpy_fresh_s", n)
    add("tdstore register_master (fsynced)", "register_master_s", n)
    add("tdstore register_mirror (fsynced)", "register_mirror_s", n)
    add("tdstore reconstruct mirror, warm", "reconstruct_warm_s", n)
    add("tdstore reconstruct mirror out=, warm", "reconstruct_out_warm_s", n)
    add("tdstore reconstruct master out=, warm", "reconstruct_master_warm_s", n)
    add("tdstore reconstruct mirror, cold", "reconstruct_cold_s", n)
    add("tdstore reconstruct all agents, cold", "reconstruct_all_cold_s", n * w.agents)
    add("tdstore view of 10% of blocks, warm", "view_10pct_warm_s", n // 10)
    add("np.save + fsync", "np_save_fsync_s", n)
    add("np.load, warm", "np_load_warm_s", n)
    add("np.load, cold", "np_load_cold_s", n)
    add("np.load all agents, cold", "np_load_all_cold_s", n * w.agents)
    add("safetensors save_file + fsync", "safetensors_save_fsync_s", n)
    add("safetensors load_file, warm", "safetensors_load_warm_s", n)
    add("safetensors load_file all agents, cold", "safetensors_load_all_cold_s", n * w.agents)
    add("diskcache set", "diskcache_set_s", n)
    add("diskcache get, warm", "diskcache_get_warm_s", n)
    add("diskcache get all agents, cold", "diskcache_get_all_cold_s", n * w.agents)
    return rows


def run(w: Workload, workdir: str | None = None, progress: Callable[[str], None] = print
        ) -> dict:
    """Run every measurement; returns ``{"workload", "results", "ratios"}``."""
    root = Path(tempfile.mkdtemp(prefix="tdstore-bench-", dir=workdir))
    try:
        progress(f"workload: {w.agents} agents x {w.agent_nbytes / MiB:.0f} MiB {w.dtype}, "
                 f"{w.blocks} blocks of {w.block_shape}, {w.diff_blocks} differing tail "
                 f"blocks per mirror; best of {w.reps}; in {root}")
        agents = make_agents(w)
        results: dict[str, float] = {}
        progress("baselines ...")
        results.update(bench_baselines(w, agents, root))
        progress("tdstore ...")
        results.update(bench_tdstore(w, agents, root))
        del agents
        progress(f"scaling ({w.scaling_mirrors} mirrors, {w.open_agents} agents) ...")
        results.update(bench_scaling(w, root))
        if w.big_gib > 0:
            progress(f"{w.big_gib:g} GiB agent into an np.memmap ...")
            results.update(bench_big_memmap(w, root))
        return {"workload": asdict(w), "results": results, "ratios": ratios(w, results)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def targets_table(ratios: dict[str, Target]) -> Any:
    """The targets of a report as a rich table: measured ratio, goal, met."""
    from rich.table import Table

    targets = Table(title="Targets (ratios measured in this run)")
    for col in ("target", "measured", "goal", "met"):
        targets.add_column(col, justify="left" if col == "target" else "right")
    for name, t in ratios.items():
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        met = {True: "yes", False: "NO", None: "n/a"}[t["met"]]  # type: ignore[index]
        targets.add_row(name, value, f"{t['direction']} {t['target']:g}", met)
    return targets


def print_report(report: dict, echo: Callable[[str], None] = print) -> None:
    from rich.console import Console
    from rich.table import Table

    w = Workload(**{**report["workload"], "block_shape": tuple(report["workload"]["block_shape"])})
    r = report["results"]
    console = Console(width=110)
    table = Table(title="Throughput (best of repetitions; GB/s of agent data)")
    for col in ("operation", "time", "throughput"):
        table.add_column(col, justify="left" if col == "operation" else "right")
    for row in throughput_table(w, r):
        table.add_row(*row)
    console.print(table)
    console.print(targets_table(report["ratios"]))
    disk = (f"bytes on disk: tdstore {r['bytes_on_disk'] / MiB:.1f} MiB, np.save "
            f"{r.get('np_bytes_on_disk', 0) / MiB:.1f} MiB, safetensors "
            f"{r.get('safetensors_bytes_on_disk', 0) / MiB:.1f} MiB, diskcache "
            f"{r.get('diskcache_bytes_on_disk', 0) / MiB:.1f} MiB "
            f"(tdstore uses {r.get('np_bytes_on_disk', 0) / r['bytes_on_disk']:.2f}x less "
            "than one .npy per agent)")
    echo(disk)


def attention_benchmark(seq: int = 8192, q_heads: int = 8, kv_heads: int = 2,
                        head_dim: int = 64, window: int = 128, block_size: int = 64,
                        reps: int = 3) -> dict[str, Any]:
    """Dense vs sparse attention on the same random inputs: best time of ``reps`` (after
    a warm-up call each) and peak traced memory of one call."""
    from tdstore.analysis.attention import dense_attention, sparse_attention

    rng = np.random.default_rng(0)
    q = rng.standard_normal((seq, q_heads, head_dim), np.float32)
    k = rng.standard_normal((seq, kv_heads, head_dim), np.float32)
    v = rng.standard_normal((seq, kv_heads, head_dim), np.float32)
    runs = {
        "dense": lambda: dense_attention(q, k, v),
        "sparse": lambda: sparse_attention(q, k, v, window=window, block_size=block_size),
    }
    r: dict[str, Any] = {}
    for name, fn in runs.items():
        fn()
        r[f"{name}_s"] = best(fn, reps)
        tracemalloc.start()
        fn()
        r[f"{name}_peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    r["speedup"] = r["dense_s"] / r["sparse_s"]
    r["peak_ok"] = max(r["dense_peak_bytes"], r["sparse_peak_bytes"]) <= 1 << 30
    return r


def nullstats_benchmark(gets: int = 5000, reps: int = 5) -> dict[str, Any]:
    """A cache hit of NullStatsCache vs diskcache.Cache.get of the same payload, both
    looked up by the same key object (so both pay for a stable hash of it)."""
    try:
        import diskcache
    except ImportError:
        from tdstore.core.errors import InvalidInputError

        raise InvalidInputError(
            "bench-nullstats compares with diskcache, which is not installed: "
            "pip install 'tdstore[bench]'") from None

    from tdstore.analysis.nullstats import NullStatsCache, calibrate, calibration_key, stable_hash
    from tdstore.analysis.scoring import DummyDifferentialBackend, DummyResponses

    root = Path(tempfile.mkdtemp(prefix="tdstore-bench-ns-"))
    try:
        backend = DummyDifferentialBackend(base=DummyResponses(), ft=DummyResponses())
        prompts = [f"prompt {i}" for i in range(8)]
        params: dict[str, Any] = {"kinds": ("kl", "js"), "runs": 5, "seed_base": 1000,
                                  "init_scale": 0.02, "rank_multipliers": (0.5, 1.0, 2.0)}
        stats = calibrate(backend, prompts, **params)
        key = calibration_key(backend.identity, prompts, top_k=256, **params)
        with open_store(root / "store") as store:
            cache = NullStatsCache(store)
            cache.put(key, stats)
            assert cache.get(key) == stats
            t_ours = best(lambda: [cache.get(key) for _ in range(gets)], reps) / gets
        with diskcache.Cache(str(root / "dc")) as dc:
            dc.set(stable_hash(key), stats)
            assert dc.get(stable_hash(key)) == stats
            t_dc = best(lambda: [dc.get(stable_hash(key)) for _ in range(gets)], reps) / gets
        t_hash = best(lambda: [stable_hash(key) for _ in range(gets)], reps) / gets
        return {"payload_bytes": len(json.dumps(stats)), "tdstore_us": t_ours * 1e6,
                "diskcache_us": t_dc * 1e6, "hash_us": t_hash * 1e6, "ratio": t_ours / t_dc}
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- object storage


def object_benchmark(location: str, url: str, w: Workload, *, scale_agents: int = 1_000_000,
                     progress: Callable[[str], None] = print,
                     workdir: str | None = None) -> dict[str, Any]:
    """tdstore on an object-store ``location`` with the PostgreSQL catalogue ``url``
    against what a user would write with the same client (obstore): one object per
    agent, PUT and GET whole. Figures in one run, reported as ratios:

    - reconstruct every agent with a cold chunk cache vs GETting each agent's object;
    - reconstruct with a warm chunk cache vs the same reconstruct from a local-disk store;
    - register_mirror vs PUT of the whole agent;
    - bytes under the prefix vs the block-level ideal;
    - open + reconstruct one agent with ``scale_agents`` agents in the catalogue vs 10
      (the large catalogue is filled by one INSERT ... SELECT of valid mirror rows).
    """
    import obstore

    from tdstore.core.location import normalize_url

    location = normalize_url(location)
    root = Path(tempfile.mkdtemp(prefix="tdstore-objbench-", dir=workdir))
    r: dict[str, float] = {}
    names = [f"agent{i}" for i in range(w.agents)]
    try:
        agents = make_agents(w)
        progress(f"workload: {w.agents} agents x {w.agent_nbytes / MiB:.0f} MiB {w.dtype}, "
                 f"{w.diff_blocks} differing blocks per mirror; best of {w.reps}; "
                 f"at {location}")

        def cache(tag: str) -> dict[str, Any]:
            return {"cache_dir": root / f"cache-{tag}", "cache_max_bytes": 64 << 30}

        with open_store(location, url=url, **cache("writer")) as store:
            g = store.group(GROUP, diff_threshold=0.0)
            g.register_master(names[0], agents[0])
            for n, a in zip(names[1:], agents[1:], strict=True):
                g.register_mirror(n, a)
            r["register_mirror_s"] = best(lambda: g.register_mirror(names[1], agents[1]),
                                          w.reps)
            raw = store.arrays.client  # type: ignore[attr-defined]
            stats = g.stats()
            r["diff_blocks"] = stats["diff_blocks_total"]
            r["bytes_ideal"] = (w.blocks + stats["diff_blocks_total"]) * (
                w.agent_nbytes // w.blocks)
        # baseline objects live beside the store's data/ (the same bucket and client)
        base = [f"baseline/{n}.bin" for n in names]
        flat: list[memoryview] = [a.reshape(-1).view(np.uint8).data for a in agents]
        r["put_agent_s"] = best(lambda: obstore.put(raw, base[0], flat[0]), w.reps)
        for key, view in zip(base[1:], flat[1:], strict=True):
            obstore.put(raw, key, view)
        flat.clear()

        def get_all() -> None:
            for key in base:
                np.frombuffer(memoryview(obstore.get(raw, key).bytes()), w.dtype)

        def get_all_parallel() -> None:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(base)) as ex:
                list(ex.map(lambda k: bytes(obstore.get(raw, k).bytes()), base))

        r["get_all_s"] = best(get_all, w.reps)
        r["get_all_parallel_s"] = best(get_all_parallel, w.reps)
        stored = sum(int(o["size"]) for batch in obstore.list(raw, "data")
                     for o in batch)
        r["bytes_under_prefix"] = stored
        progress("reconstruct, cold and warm chunk cache ...")
        cold = []
        for rep in range(w.reps):
            with open_store(location, url=url, **cache(f"cold{rep}")) as s2:
                g2 = s2.group(GROUP, create=False)
                t0 = time.perf_counter()
                for n in names:
                    g2.reconstruct(n)
                cold.append(time.perf_counter() - t0)
                if rep == w.reps - 1:
                    def read_all(g2: Any = g2) -> None:
                        for n in names:
                            g2.reconstruct(n)

                    r["reconstruct_all_warm_s"] = best(read_all, w.reps)
        r["reconstruct_all_cold_s"] = min(cold)
        with open_store(root / "local") as local:
            lg = local.group(GROUP, diff_threshold=0.0)
            lg.register_master(names[0], agents[0])
            for n, a in zip(names[1:], agents[1:], strict=True):
                lg.register_mirror(n, a)
            r["local_reconstruct_all_warm_s"] = best(
                lambda: [lg.reconstruct(n) for n in names], w.reps)
        agents.clear()
        if scale_agents:
            progress(f"catalogue of {scale_agents} agents ...")
            r.update(_catalogue_scale(location, url, scale_agents, w.reps, root))
        obstore.delete(raw, base)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"location": location, "workload": asdict(w), "results": r,
            "ratios": object_ratios(r, scale_agents)}


def _catalogue_scale(location: str, url: str, n_agents: int, reps: int, root: Path
                     ) -> dict[str, float]:
    """open + reconstruct of one agent: a group of 10 agents vs one of ``n_agents``, in
    catalogues of their own (databases ``<db>_scale10`` and ``<db>_scaleN``, created
    beside the given one on the same server)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    out: dict[str, float] = {}
    base = make_url(url)
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        for n in (10, n_agents):
            db = f"{base.database}_scale{n}"
            with admin.connect() as con:
                con.execute(text(f'DROP DATABASE IF EXISTS "{db}"'))
                con.execute(text(f'CREATE DATABASE "{db}"'))
            db_url = base.set(database=db).render_as_string(hide_password=False)
            loc = f"{location}-scale{n}"
            with open_store(loc, url=db_url, cache_dir=root / f"scale{n}") as store:
                g = store.group("g")
                g.register_master("master", np.zeros((4, 8), np.float32))
                probe = np.zeros((4, 8), np.float32)
                probe[1] = 1
                g.register_mirror("a0", probe)
            # the other agents: copies of a0's valid rows (its agent row and its one
            # diff-index row), each named a<i>, inserted in bulk by PostgreSQL itself
            eng = create_engine(db_url)
            with eng.begin() as con:

                def columns(table: str, *but: str) -> str:
                    names = con.execute(text(
                        "SELECT column_name FROM information_schema.columns "
                        "WHERE table_name = :t"), {"t": table}).scalars()
                    return ", ".join(f'"{c}"' for c in names if c not in but)

                qcols = columns("agents", "id", "name")
                con.execute(text(
                    f'INSERT INTO agents (name, {qcols}) SELECT \'a\' || i, {qcols} '
                    "FROM agents, generate_series(1, :n) AS i WHERE name = 'a0'"),
                    {"n": n - 3})
                qd = columns("diff_blocks", "id", "agent_id")
                con.execute(text(
                    f"INSERT INTO diff_blocks (agent_id, {qd}) SELECT a.id, {qd} FROM "
                    "agents a, diff_blocks d JOIN agents a0 ON d.agent_id = a0.id "
                    "WHERE a0.name = 'a0' AND a.name <> 'a0' AND a.role = 'mirror'"))
                con.execute(text("ANALYZE"))
            eng.dispose()
            probe_name = f"a{max(1, n // 2)}" if n > 10 else "a1"

            def open_and_read(db_url: str = db_url, loc: str = loc, name: str = probe_name,
                              cache: Path = root / f"scale{n}") -> None:
                with open_store(loc, url=db_url, cache_dir=cache) as s:
                    s.group("g").reconstruct(name)

            open_and_read()
            out[f"scale_open_{n}_s"] = best(open_and_read, reps)
            out[f"scale_agents_{n}"] = n
    finally:
        admin.dispose()
    return out


def object_ratios(r: dict[str, float], scale_agents: int) -> dict[str, Target]:
    def target(num: str, den: str, goal: float, higher: bool = True) -> Target:
        value = r[num] / r[den] if num in r and den in r and r[den] else None
        met = None if value is None else (value >= goal if higher else value <= goal)
        return {"value": value, "target": goal, "met": met,
                "direction": ">=" if higher else "<="}

    out = {
        "cold-cache reconstruct all vs GET each agent's object": target(
            "get_all_s", "reconstruct_all_cold_s", 3.0),
        "cold-cache reconstruct all vs GET each agent's object, all GETs at once": target(
            "get_all_parallel_s", "reconstruct_all_cold_s", 1.0),
        "warm-cache reconstruct all vs the local-disk store": target(
            "local_reconstruct_all_warm_s", "reconstruct_all_warm_s", 0.8),
        "register_mirror vs PUT of the whole agent": target(
            "put_agent_s", "register_mirror_s", 5.0),
        "bytes under the prefix / block-level ideal": target(
            "bytes_under_prefix", "bytes_ideal", 1.02, higher=False),
    }
    if scale_agents:
        out[f"open+reconstruct, {scale_agents} vs 10 agents (time ratio)"] = target(
            f"scale_open_{scale_agents}_s", "scale_open_10_s", 2.0, higher=False)
    return out


def print_object_report(report: dict, echo: Callable[[str], None] = print) -> None:
    from rich.console import Console
    from rich.table import Table

    r = report["results"]
    w = report["workload"]
    n = w["agents"]
    console = Console(width=110)
    table = Table(title=f"Object storage at {report['location']} (best of repetitions)")
    for col in ("operation", "time"):
        table.add_column(col, justify="left" if col == "operation" else "right")
    rows = [("tdstore reconstruct all agents, cold chunk cache", "reconstruct_all_cold_s"),
            ("tdstore reconstruct all agents, warm chunk cache", "reconstruct_all_warm_s"),
            ("local-disk store reconstruct all agents, warm", "local_reconstruct_all_warm_s"),
            (f"GET each of the {n} agents' objects", "get_all_s"),
            (f"GET the {n} agents' objects at once", "get_all_parallel_s"),
            ("tdstore register_mirror", "register_mirror_s"),
            ("PUT of one whole agent", "put_agent_s")]
    for label, key in rows:
        if key in r:
            table.add_row(label, f"{r[key] * 1e3:.1f} ms")
    for key in sorted(k for k in r if k.startswith("scale_open_")):
        table.add_row(f"open + reconstruct, {key.split('_')[2]} agents", f"{r[key] * 1e3:.1f} ms")
    console.print(table)
    console.print(targets_table(report["ratios"]))
    echo(f"bytes under the prefix {r['bytes_under_prefix'] / MiB:.1f} MiB, block-level "
         f"ideal {r['bytes_ideal'] / MiB:.1f} MiB, one object per agent "
         f"{n * w['blocks'] * r['bytes_ideal'] / (w['blocks'] + r['diff_blocks']) / MiB:.1f} MiB")
