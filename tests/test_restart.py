"""A store written by one process is seen, bit-exact, by later and concurrent processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import tdstore

WRITER = textwrap.dedent("""
    import os, sys, numpy as np, ml_dtypes, tdstore
    path, expected = sys.argv[1], sys.argv[2]
    with tdstore.open(path, url=os.environ.get("TDSTORE_URL")) as store:
        for dtype in ("float16", "bfloat16", "float32"):
            g = store.group(dtype, diff_threshold=0.0)
            rng = np.random.default_rng(5)
            master = rng.standard_normal((64, 2, 16, 4, 8), np.float32).astype(dtype)
            g.register_master("retriever", master)
            for i, name in enumerate(["reranker", "critic", "responder"]):
                kv = master.copy()
                kv[-(i + 1):] = rng.standard_normal(kv[-(i + 1):].shape, np.float32).astype(dtype)
                kv[0, 0, 0, 0, i] = -0.0 if i == 0 else kv[0, 0, 0, 0, i]
                g.register_mirror(name, kv)
            g.collective_reuse_step(["retriever", "critic"], master[:3])
            np.save(f"{expected}-{dtype}-expected.npy", np.stack(
                [g.reconstruct(a).view(np.uint8) for a in g.agents()]))
""")

READER = textwrap.dedent("""
    import json, os, sys, numpy as np, tdstore
    path, expected_at = sys.argv[1], sys.argv[2]
    out = {}
    with tdstore.open(path, url=os.environ.get("TDSTORE_URL"), readonly=True) as store:
        for dtype in store.groups():
            g = store.group(dtype, create=False)
            expected = np.load(f"{expected_at}-{dtype}-expected.npy")
            got = np.stack([g.reconstruct(a).view(np.uint8) for a in g.agents()])
            out[dtype] = {"agents": g.agents(), "exact": bool(np.array_equal(got, expected)),
                          "dtype": str(g.dtype), "n_blocks": g.n_blocks,
                          "stats": g.stats()["diff_blocks_total"]}
    print(json.dumps(out))
""")


def run(code: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    return p


def test_a_new_process_sees_every_agent_bit_exact(backend, tmp_path):
    path, expected = backend.location("store"), str(tmp_path / "expected")
    run(WRITER, path, expected, env=backend.env("store"))
    result = json.loads(run(READER, path, expected, env=backend.env("store")).stdout)
    assert set(result) == {"float16", "bfloat16", "float32"}
    for dtype, r in result.items():
        assert r["exact"], dtype
        assert r["agents"] == ["retriever", "reranker", "critic", "responder"]
        assert r["dtype"] == dtype and r["n_blocks"] == 67
        assert r["stats"] == 1 + 2 + 3 + 1  # reranker's -0.0 block 0 counts as differing


def test_a_concurrent_reader_sees_committed_state(backend, tmp_path):
    """A reader process opened before the writes sees them without reopening."""
    path, env = backend.location("store"), backend.env("store")
    reader = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import os, sys, json, tdstore
            store = tdstore.open(sys.argv[1], url=os.environ.get("TDSTORE_URL"))
            g = store.group("float16")
            sys.stdout.write("ready\\n"); sys.stdout.flush()
            sys.stdin.readline()
            print(json.dumps([g.agents(), g.n_blocks]))
        """), path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )
    assert reader.stdout.readline().strip() == "ready"
    run(WRITER, path, str(tmp_path / "expected"), env=env)
    out, _ = reader.communicate("go\n", timeout=60)
    assert json.loads(out) == [["retriever", "reranker", "critic", "responder"], 67]


def test_a_forked_child_uses_its_own_connections(backend):
    """A forked child writes through the store it inherited (its catalogue connections
    are its own). On object storage the client cannot survive fork(): the child gets a
    clear StorageError at once, never a hang, and the parent's store keeps working."""
    import multiprocessing

    import numpy as np

    with backend.open("s") as store:
        g = store.group("g")
        g.register_master("m", np.zeros((4, 8), np.float32))
        ctx = multiprocessing.get_context("fork")
        errors = ctx.Queue()

        def child() -> None:  # writes through the store object it inherited
            try:
                g.register_mirror("from-child", np.ones((4, 8), np.float32))
            except tdstore.StorageError as exc:
                errors.put(str(exc))
                raise

        p = ctx.Process(target=child)
        p.start()
        p.join(60)
        if p.exitcode is None:  # hung: kill it, so the test fails instead of pytest's exit
            p.kill()
            p.join()
            pytest.fail("the forked child did not finish its write within 60 s")
        if backend.kind == "s3":
            assert p.exitcode == 1
            assert "does not survive fork()" in errors.get(timeout=10)
            expected = ["m", "from-parent"]
        else:
            assert p.exitcode == 0
            expected = ["m", "from-child", "from-parent"]
        g.register_mirror("from-parent", np.full((4, 8), 2, np.float32))
        assert g.agents() == expected
        assert store.verify().ok
