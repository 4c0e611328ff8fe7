"""The demo behind ``tdstore demo``: a synthetic group of agents, written and re-read.

Eight agents share a prefix and diverge on a few tail blocks. The demo writes them into
a store, then a *fresh process* (:func:`verify_child`) re-opens the store,
reconstructs every agent and checks each is bit-exact against a regenerated copy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tdstore.api.store import open as open_store

GROUP = "demo"
KV_LAYOUT = {"axes": ["layer", "kv", "token", "head", "dim"]}


@dataclass(frozen=True)
class DemoWorkload:
    n_agents: int = 8
    n_blocks: int = 256
    block_shape: tuple[int, ...] = (4, 2, 16, 8, 64)  # layers, k/v, tokens, kv heads, dim
    tail_blocks: int = 8  # blocks at the end where each agent diverges
    near_blocks: int = 4  # blocks where each agent's values differ by rounding-level noise
    dtype: str = "float16"
    seed: int = 0

    @property
    def agent_names(self) -> list[str]:
        roles = ["retriever", "reranker", "summarizer", "critic", "planner", "coder",
                 "verifier", "responder"]
        return [roles[i] if i < len(roles) else f"agent-{i}" for i in range(self.n_agents)]

    def agent(self, i: int) -> np.ndarray:
        """Agent ``i``'s KV blocks, regenerated identically in any process."""
        shape = (self.n_blocks, *self.block_shape)
        kv = np.random.default_rng(self.seed).standard_normal(shape, np.float32)
        kv = kv.astype(self.dtype)
        if i > 0:
            rng = np.random.default_rng([self.seed, i])
            tail = kv[self.n_blocks - self.tail_blocks :]
            tail[...] = rng.standard_normal(tail.shape, np.float32).astype(self.dtype)
            # the shared prefix recomputed elsewhere: a few blocks off by ~1e-3
            near = kv[i : i + self.near_blocks]
            noise = rng.standard_normal(near.shape, np.float32) * 1e-3
            near[...] = (near.astype(np.float32) + noise).astype(self.dtype)
        return kv

    @property
    def agent_nbytes(self) -> int:
        return self.n_blocks * int(np.prod(self.block_shape)) * np.dtype(self.dtype).itemsize


def write(path: Path, work: DemoWorkload) -> dict[str, float]:
    """Write the demo group; returns timings in seconds."""
    agents = [work.agent(i) for i in range(work.n_agents)]
    names = work.agent_names
    with open_store(path) as store:
        if GROUP in store:
            store.delete_group(GROUP)
        group = store.group(GROUP, diff_threshold=0.0, kv_layout=KV_LAYOUT)
        t0 = time.perf_counter()
        group.register_master(names[0], agents[0])
        t1 = time.perf_counter()
        for name, kv in zip(names[1:], agents[1:], strict=True):
            group.register_mirror(name, kv)
        t2 = time.perf_counter()
    return {"master_s": t1 - t0, "mirrors_s": t2 - t1}


def verify(path: Path, work: DemoWorkload) -> dict[str, object]:
    """Re-open the store, reconstruct every agent, compare bitwise to regenerated data."""
    with open_store(path, readonly=True) as store:
        group = store.group(GROUP, create=False)
        out = np.empty((work.n_blocks, *work.block_shape), work.dtype)
        exact, read_s = [], 0.0
        for i, name in enumerate(work.agent_names):
            t0 = time.perf_counter()
            group.reconstruct(name, out=out)
            read_s += time.perf_counter() - t0
            expected = work.agent(i)
            exact.append(bool(np.array_equal(out.view(np.uint8), expected.view(np.uint8))))
        stats = group.stats()
    return {"agents": work.agent_names, "exact": exact, "read_s": read_s, "stats": stats}


def run(path: Path, work: DemoWorkload | None = None) -> dict[str, Any]:
    """Write the demo group, verify it in a fresh process; returns the figures."""
    work = work or DemoWorkload()
    path = Path(path)
    timings = write(path, work)
    child = subprocess.run(
        [sys.executable, "-c", "from tdstore.dev.demo import verify_child; verify_child()"],
        input=json.dumps({"path": str(path), "workload": asdict(work)}),
        capture_output=True, text=True, check=False,
    )
    if child.returncode != 0:
        raise RuntimeError(f"verifying process failed:\n{child.stderr}")
    result = json.loads(child.stdout)
    result.update(timings)
    result["workload"] = asdict(work)
    result["agent_nbytes"] = work.agent_nbytes
    result["disk_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return result


def verify_child() -> None:
    """The fresh process of :func:`run`: reads ``{"path", "workload"}`` as JSON on stdin
    and prints the result of :func:`verify` as JSON."""
    request = json.load(sys.stdin)
    spec = request["workload"]
    spec["block_shape"] = tuple(spec["block_shape"])
    result = verify(Path(request["path"]), DemoWorkload(**spec))
    print(json.dumps(result, default=str))
