"""tdstore's LMCache backend against LMCache's own LocalDiskBackend, through the same
standalone engine on the same chunks (``tools/bench_lmcache.py`` prints the report).

- store: ``engine.store`` of every sequence (both write behind): the time until the
  calls return, and until every chunk is retrievable (tdstore: committed; LocalDisk:
  its writes done);
- retrieve, warm (files in the page cache) and cold (dropped from it), in the process
  that stored the chunks, the backends' rounds alternating (see ``WARM_ROUNDS``);
- what a new process finds (the restart a serving node goes through);
- bytes on disk against the chunks' bytes;
- agents that share a long prompt and diverge, tagged as one tdstore group.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

from tdstore.dev.bench import drop_page_cache, du
from tdstore.dev.lmcache_engine import (
    CHUNK,
    backend_of,
    disk_config,
    engine,
    sequence,
    tdstore_config,
)

_LOOKUP_CHILD = textwrap.dedent("""
    import json, sys
    from tdstore.dev.lmcache_engine import engine, sequence
    cfg, seqs, layers, hidden = json.loads(sys.argv[1])
    with engine(cfg, layers=layers, hidden=hidden) as eng:
        print(json.dumps([eng.lookup(tokens=sequence(n, s, layers=layers, hidden=hidden)[0])
                          for s, n in seqs]))
""")


# retrieve rounds per backend, warm and cold: the backends' rounds alternate (one round
# of each in turn, all engines open in this process), so a slower or busier spell of
# this shared machine falls on every backend alike; each figure is the best round (the
# least disturbed), and the median is reported beside it
WARM_ROUNDS = 12
COLD_ROUNDS = 8
# tdstore with tdstore.verify_reads: true (every read checksummed), beside the default
# (each chunk file version checksummed once per process, and every read from the disk)
EVERY = "tdstore, verify_reads true"
# tdstore with tdstore.direct_reads: true, what "auto" (the default) gives with LMCache's
# CPU tier on (local_cpu: true): chunks not in the page cache are read with O_DIRECT.
# Every engine here runs with local_cpu: false, so that each retrieve reaches the disk
# tier (with the CPU tier on, LMCache keeps what it retrieves there)
DIRECT = "tdstore, direct_reads true"


def _wait_disk(eng: Any, n_chunks: int, timeout: float = 600) -> int:
    """Wait until LocalDiskBackend has no write in flight; returns the chunks it holds."""
    disk = eng.storage_manager.storage_backends["LocalDiskBackend"]
    deadline = time.monotonic() + timeout
    while disk.disk_worker.put_tasks or (len(disk.dict) < n_chunks
                                         and time.monotonic() < deadline):
        if time.monotonic() > deadline:
            raise RuntimeError("LocalDiskBackend did not finish its writes")
        time.sleep(0.002)
    return len(disk.dict)


def _store(kind: str, eng: Any, seqs: list[tuple[int, int]],
           data: dict[int, tuple[torch.Tensor, torch.Tensor]], chunks: int
           ) -> dict[str, float]:
    """Store every sequence through ``eng``: until the calls return, and until every
    chunk is retrievable."""
    r: dict[str, float] = {}
    t0 = time.perf_counter()
    for s, _ in seqs:
        tokens, kv = data[s]
        eng.store(tokens, kv_buffer=kv)
    r["store_return_s"] = time.perf_counter() - t0
    if kind == "tdstore":
        backend_of(eng).flush()
        r["store_durable_s"] = time.perf_counter() - t0
        r["chunks_stored"] = len(backend_of(eng).chunks.keys())
    else:
        r["chunks_stored"] = _wait_disk(eng, chunks)
        r["store_durable_s"] = time.perf_counter() - t0
    return r


def _retrieve_rounds(engines: dict[str, Any], paths: dict[str, Path],
                     seqs: list[tuple[int, int]],
                     data: dict[int, tuple[torch.Tensor, torch.Tensor]], rounds: int,
                     cold: bool) -> dict[str, dict[str, float]]:
    """Alternating rounds of every engine retrieving every sequence (cold: each round
    after the engine's files are dropped from the page cache); per engine the best and
    median round, and the tokens its last round found."""
    # the KV the retrieves fill, allocated once (a serving engine's KV cache is allocated
    # up front): the rounds time the retrieves, not page faults of new buffers
    outs = {s: torch.empty_like(kv) for s, (_, kv) in data.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    got: dict[str, int] = {}
    names = list(engines)
    for i in range(rounds):
        # each round in another order: an engine's place in a round changes its figures
        # (measured: whichever engine runs first, its copies into the KV buffers take
        # longer), so every engine takes every place in turn
        for name in names[i % len(names):] + names[:i % len(names)]:
            eng = engines[name]
            if cold:
                drop_page_cache(paths[name])
            t0 = time.perf_counter()
            n = 0
            for s, _ in seqs:
                n += int(eng.retrieve(data[s][0], kv_buffer=outs[s]).sum())
            times[name].append(time.perf_counter() - t0)
            got[name] = n
    which = "cold" if cold else "warm"
    return {name: {f"retrieve_{which}_s": min(t), f"retrieve_{which}_median_s":
                   statistics.median(t), f"retrieved_{which}_tokens": got[name]}
            for name, t in times.items()}


def _measure(configs: dict[str, tuple[str, dict[str, Any], Path]],
             seqs: list[tuple[int, int]],
             data: dict[int, tuple[torch.Tensor, torch.Tensor]], layers: int, hidden: int,
             chunks: int) -> dict[str, dict[str, float]]:
    """Every backend's figures: ``configs`` maps a name to the backend's kind, its
    LMCache configuration and the directory the configuration names."""
    r: dict[str, dict[str, float]] = {name: {} for name in configs}
    paths = {name: path for name, (_, _, path) in configs.items()}
    with contextlib.ExitStack() as stack:
        engines = {name: stack.enter_context(engine(cfg, layers=layers, hidden=hidden))
                   for name, (_, cfg, _) in configs.items()}
        for name, (kind, _, _) in configs.items():  # one after another
            r[name].update(_store(kind, engines[name], seqs, data, chunks))
        _retrieve_rounds(engines, paths, seqs, data, 1, False)  # warms up, not timed
        for cold, rounds in ((False, WARM_ROUNDS), (True, COLD_ROUNDS)):
            for name, res in _retrieve_rounds(engines, paths, seqs, data, rounds,
                                              cold).items():
                r[name].update(res)
    for name, (_, cfg, path) in configs.items():
        r[name]["bytes_on_disk"] = du(path)
        proc = subprocess.run([sys.executable, "-c", _LOOKUP_CHILD,
                               json.dumps([cfg, seqs, layers, hidden])], capture_output=True,
                              text=True, timeout=600, check=True)
        found = json.loads(proc.stdout.strip().splitlines()[-1])
        r[name]["found_after_restart_tokens"] = sum(found)
    return r


def _sharing(root: Path, agents: int, shared: int, own: int, layers: int, hidden: int,
             cpu_gb: float) -> dict[str, float]:
    """Bytes on disk for agents sharing a ``shared``-token prompt, each with ``own``
    tokens of its own after it: tagged per agent (keys differ, nothing shared), tagged
    per agent and as one tdstore group (shared by position), untagged (LMCache's own
    prefix dedup: identical prefixes have identical keys)."""
    prompt_tokens, prompt_kv = sequence(shared, 100, layers=layers, hidden=hidden)
    seqs = []
    for a in range(agents):
        t, kv = sequence(own, 200 + a, layers=layers, hidden=hidden)
        seqs.append((torch.cat([prompt_tokens, t]), torch.cat([prompt_kv, kv], dim=2)))
    out: dict[str, float] = {}
    for label, tags in (("agents_tagged", lambda a: {"lmcache.tag.agent": f"a{a}"}),
                        ("agents_tagged_group", lambda a: {
                            "lmcache.tag.agent": f"a{a}",
                            "lmcache.tag.tdstore_group": "pipeline"}),
                        ("untagged", lambda a: None)):
        path = root / f"share-{label}"
        with engine(tdstore_config(str(path), cpu_gb=cpu_gb), layers=layers,
                    hidden=hidden) as eng:
            for a, (tokens, kv) in enumerate(seqs):
                configs = tags(a)
                if configs is None:
                    eng.store(tokens, kv_buffer=kv)
                else:
                    eng.store(tokens, kv_buffer=kv, request_configs=configs)
            backend_of(eng).flush()
            exact = True
            for a, (tokens, kv) in enumerate(seqs):
                got = torch.empty_like(kv)
                configs = tags(a)
                kwargs = {} if configs is None else {"request_configs": configs}
                n = int(eng.retrieve(tokens, kv_buffer=got, **kwargs).sum())
                exact &= n == tokens.numel() and bool(torch.equal(got, kv))
        out[f"{label}_bytes"] = du(path / "data")
        out[f"{label}_exact"] = float(exact)
    out["chunk_bytes_all_agents"] = float(sum(kv.numel() * kv.element_size() for _, kv in seqs))
    return out


def run(*, sequences: int = 8, tokens: int = 2048, layers: int = 32, hidden: int = 256,
        agents: int = 4, shared_tokens: int = 1536, own_tokens: int = 512,
        workdir: str | None = None) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="tdstore-lmcbench-", dir=workdir))
    try:
        seqs = [(s, tokens) for s in range(sequences)]
        data = {s: sequence(n, s, layers=layers, hidden=hidden) for s, n in seqs}
        chunk_bytes = sum(kv.numel() * kv.element_size() for _, kv in data.values())
        chunks = sequences * -(-tokens // CHUNK)
        per_chunk_gb = 2 * layers * CHUNK * hidden * 2 / 1e9
        # LMCache's buffers: both backends hold a chunk's buffer until it is written, so
        # the pool holds the whole workload (a smaller one makes LMCache drop stores)
        cpu_gb = max(0.2, 1.25 * chunk_bytes / 1e9)
        results = _measure({
            "tdstore": ("tdstore", tdstore_config(str(root / "tdstore"), cpu_gb=cpu_gb),
                        root / "tdstore"),
            # what a checksum on every read costs (the default checks each chunk file
            # once per process and every read from the disk); LocalDiskBackend checks
            # nothing
            EVERY: ("tdstore", tdstore_config(str(root / "every"), cpu_gb=cpu_gb,
                                              verify_reads="true"), root / "every"),
            DIRECT: ("tdstore", tdstore_config(str(root / "direct"), cpu_gb=cpu_gb,
                                               direct_reads="true"), root / "direct"),
            "LocalDiskBackend": ("LocalDiskBackend",
                                 disk_config(str(root / "LocalDiskBackend"),
                                             max_gb=4 * chunk_bytes / 1e9 + 0.1,
                                             cpu_gb=cpu_gb),
                                 root / "LocalDiskBackend"),
        }, seqs, data, layers, hidden, chunks)
        sharing = _sharing(root, agents, shared_tokens, own_tokens, layers, hidden,
                           max(cpu_gb, 3 * -(-(shared_tokens + own_tokens) // CHUNK)
                               * per_chunk_gb))
        total_tokens = sequences * tokens
        return {"workload": {"sequences": sequences, "tokens": tokens, "layers": layers,
                             "hidden": hidden,
                             "chunk_tokens": CHUNK, "chunks": chunks,
                             "chunk_bytes": chunk_bytes, "agents": agents,
                             "shared_tokens": shared_tokens, "own_tokens": own_tokens},
                "results": results, "sharing": sharing,
                "ratios": ratios(results, sharing, chunk_bytes, total_tokens)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def ratios(r: dict[str, dict[str, float]], sharing: dict[str, float], chunk_bytes: int,
           total_tokens: int) -> dict[str, dict[str, Any]]:
    t, d, u, o = r["tdstore"], r["LocalDiskBackend"], r[EVERY], r[DIRECT]

    def info(value: float) -> dict[str, Any]:
        return {"value": value, "target": None, "direction": "", "met": None}

    def target(value: float, goal: float, higher: bool = True) -> dict[str, Any]:
        return {"value": value, "target": goal, "direction": ">=" if higher else "<=",
                "met": value >= goal if higher else value <= goal}

    def retrieves(e: dict[str, float], which: str) -> dict[str, dict[str, Any]]:
        """Warm and cold retrieves of engine ``e`` against LocalDiskBackend's."""
        out = {}
        for temp in ("warm", "cold"):
            out[f"retrieve throughput, {temp}{which}, vs LocalDiskBackend"] = target(
                d[f"retrieve_{temp}_s"] / e[f"retrieve_{temp}_s"], 1.0)
            out[f"retrieve throughput, {temp}{which}, median rounds, vs LocalDiskBackend"] = \
                info(d[f"retrieve_{temp}_median_s"] / e[f"retrieve_{temp}_median_s"])
        return out

    return {
        **retrieves(t, ""), **retrieves(o, ", direct_reads true"),
        "retrieve throughput, warm, verify_reads true, vs LocalDiskBackend": info(
            d["retrieve_warm_s"] / u["retrieve_warm_s"]),
        "retrieve throughput, cold, verify_reads true, vs LocalDiskBackend": info(
            d["retrieve_cold_s"] / u["retrieve_cold_s"]),
        "store throughput (calls return) vs LocalDiskBackend": target(
            d["store_return_s"] / t["store_return_s"], 0.8),
        "store throughput (until retrievable) vs LocalDiskBackend": target(
            d["store_durable_s"] / t["store_durable_s"], 0.8),
        "retrievable after a restart, tdstore (share of tokens)": target(
            t["found_after_restart_tokens"] / total_tokens, 1.0),
        "retrievable after a restart, LocalDiskBackend (share of tokens)": info(
            d["found_after_restart_tokens"] / total_tokens),
        "bytes on disk / chunk bytes, unrelated chunks": target(
            t["bytes_on_disk"] / chunk_bytes, 1.02, higher=False),
        "bytes on disk / chunk bytes, LocalDiskBackend": info(
            d["bytes_on_disk"] / chunk_bytes),
        "bytes, tagged agents of one group / tagged agents without it": target(
            sharing["agents_tagged_group_bytes"] / sharing["agents_tagged_bytes"], 1.0,
            higher=False),
    }
