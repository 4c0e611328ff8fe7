"""tdstore as LMCache's storage backend, driven through LMCache's standalone engine on
the CPU (no vLLM, no GPU): every process a fresh engine loaded from configuration."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

import tdstore

CHILD = textwrap.dedent("""
    import json, os, sys, torch
    from tdstore.dev.lmcache_engine import engine, tdstore_config, sequence, backend_of, keys_of
    args = json.loads(sys.argv[1])
    cfg = tdstore_config(args["location"], url=args.get("url"), max_bytes=args.get("max_bytes"))
    out = {}
    with engine(cfg, model=args.get("model", "tdstore-test")) as eng:
        for seed, n in args.get("store", []):
            tokens, kv = sequence(n, seed)
            eng.store(tokens, kv_buffer=kv)
        backend_of(eng).flush(300)
        out["failed"] = backend_of(eng).failed
        out["found"], out["exact"], out["keys"] = [], [], []
        for seed, n in args.get("check", []):
            tokens, kv = sequence(n, seed)
            out["keys"].append(keys_of(eng, tokens))
            out["found"].append(eng.lookup(tokens=tokens))
            got = torch.zeros_like(kv)
            mask = eng.retrieve(tokens, kv_buffer=got)
            k = int(mask.sum())
            # what came back is exactly what was stored; what did not is untouched
            out["exact"].append([k, bool(torch.equal(got[:, :, :k], kv[:, :, :k]))
                                 and not bool(got[:, :, k:].any())])
    print(json.dumps(out))
""")


# bytes of one full chunk of the test model (2 x 4 layers x 256 tokens x 32 float16)
CHUNK_BYTES = 2 * 4 * 256 * 32 * 2


def run(args: dict, env: dict | None = None, check: bool = True) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0 or not check, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    if request.param == "local":
        return {"location": str(tmp_path / "kv")}
    bucket = request.getfixturevalue("s3_env")
    return {"location": f"s3://{bucket}/kv", "url": request.getfixturevalue("pg_url")}


def test_a_new_process_finds_and_retrieves_every_chunk_bit_exact(where):
    wrote = run({**where, "store": [[1, 1000], [2, 600]]})
    assert wrote["failed"] == 0
    got = run({**where, "check": [[1, 1000], [2, 600], [3, 300]]})
    assert got["found"] == [1000, 600, 0]
    assert got["exact"] == [[1000, True], [600, True], [0, True]]


def test_two_processes_store_and_retrieve_at_once(where):
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(
        {**where, "store": [[seed, 900], [10, 700]], "check": [[seed, 900], [10, 700]]})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (4, 5)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        r = json.loads(out.strip().splitlines()[-1])
        assert r["failed"] == 0 and r["found"] == [900, 700]
        assert r["exact"] == [[900, True], [700, True]]
    final = run({**where, "check": [[4, 900], [5, 900], [10, 700]]})
    assert final["exact"] == [[900, True], [900, True], [700, True]]


def test_the_budget_evicts_and_the_newest_sequence_stays(tmp_path):
    loc = str(tmp_path / "kv")
    budget = 10 * CHUNK_BYTES
    r = run({"location": loc, "max_bytes": budget,
             "store": [[s, 1024] for s in range(6)], "check": [[5, 1024], [0, 1024]]})
    assert r["failed"] == 0
    assert r["exact"][0] == [1024, True]  # the newest sequence is whole
    assert r["exact"][1][1] and r["exact"][1][0] < 1024  # the oldest went (a prefix may stay)
    with tdstore.open(loc) as store:
        assert store.accounted_bytes() <= budget and store.verify().ok


def test_a_damaged_chunk_file_is_a_miss_never_wrong_bytes(tmp_path):
    """A flipped bit in a chunk file, and the shapes recorded with another chunk changed
    in the catalogue (LMCache would allocate and fill a buffer of the wrong size): both
    misses in a new process, and verify names both."""
    from sqlalchemy import select

    from tdstore.storage.catalog import AgentRow, GroupRow

    loc = str(tmp_path / "kv")
    run({"location": loc, "store": [[1, 1000], [2, 1000]]})
    keys = run({"location": loc, "check": [[1, 1000], [2, 1000]]})["keys"]
    with tdstore.open(loc) as store, store.catalog.write() as s:
        rows = {k: s.scalars(select(AgentRow).join(GroupRow, AgentRow.group_id == GroupRow.id)
                             .where(GroupRow.name == f"lmcache:{k}")).one()
                for k in (keys[0][1], keys[1][1])}
        path = rows[keys[0][1]].array
        attrs = dict(rows[keys[1][1]].attrs)
        attrs["shapes"] = [[*attrs["shapes"][0][:2], 254, *attrs["shapes"][0][3:]]]
        rows[keys[1][1]].attrs = attrs  # as damage to the row would (one bit: 6 -> 4)
    chunk_file = next((tmp_path / "kv" / "data" / path).glob("c.*"))
    data = bytearray(chunk_file.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit, in the middle of the KV
    chunk_file.write_bytes(bytes(data))
    r = run({"location": loc, "check": [[1, 1000], [2, 1000]]})
    # the first chunk of each; the damaged second is a miss, and so what follows it
    assert r["exact"] == [[256, True], [256, True]]
    with tdstore.open(loc) as store:
        found = {(f.kind, f.group) for f in store.verify().findings}
    assert found == {("checksum", f"lmcache:{keys[0][1]}"), ("bad-row", f"lmcache:{keys[1][1]}")}



DAMAGE_AFTER_READ = textwrap.dedent("""
    import json, os, sys, torch
    from pathlib import Path
    from tdstore.dev.lmcache_engine import engine, tdstore_config, sequence, backend_of, keys_of
    loc = sys.argv[1]
    tokens, kv = sequence(1000, 7)
    out = {}
    with engine(tdstore_config(loc)) as eng:
        eng.store(tokens, kv_buffer=kv)
        backend_of(eng).flush(300)
        def retrieve():
            got = torch.zeros_like(kv)
            k = int(eng.retrieve(tokens, kv_buffer=got).sum())
            return [k, bool(torch.equal(got[:, :, :k], kv[:, :, :k]))]
        out["before"] = [retrieve(), retrieve()]  # checksummed, then from the page cache
        second = backend_of(eng).chunks._where(keys_of(eng, tokens)[1])
        (chunk,) = (Path(loc) / "data" / second.agent.array).glob("c.*")
        st = chunk.stat()
        raw = bytearray(chunk.read_bytes())
        raw[len(raw) // 3] ^= 0x04  # one bit, the modification time put back
        chunk.write_bytes(bytes(raw))
        os.utime(chunk, ns=(st.st_atime_ns, st.st_mtime_ns))
        out["after"] = [retrieve(), retrieve()]
    print(json.dumps(out))
""")


def test_a_chunk_damaged_after_this_process_read_it_is_a_miss(tmp_path):
    """The default verify_reads ("once") checksums a chunk file once per version: damage
    to a file this process has already read and checked is still found (the file's change
    time moves, whatever its modification time says), as a miss, never bytes."""
    proc = subprocess.run([sys.executable, "-c", DAMAGE_AFTER_READ, str(tmp_path / "kv")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["before"] == [[1000, True], [1000, True]]
    assert out["after"] == [[256, True], [256, True]]  # the damaged second chunk on: misses

PRIORITIES = textwrap.dedent("""
    import json, os, sys, threading, torch
    from tdstore.dev.lmcache_engine import engine, tdstore_config, sequence, backend_of
    def io_threads():
        return {t.name: os.getpriority(os.PRIO_PROCESS, t.native_id)
                for t in threading.enumerate() if t.name.startswith("tdstore-io")}
    from tdstore.integrations.lmcache import WRITER_NICE, WRITERS
    out = {"base": os.getpriority(os.PRIO_PROCESS, 0), "nice": WRITER_NICE, "n": WRITERS}
    with engine(tdstore_config(sys.argv[1])) as eng:
        backend = backend_of(eng)
        out["writers"] = [os.getpriority(os.PRIO_PROCESS, t.native_id)
                          for t in backend._writers]
        tokens, kv = sequence(1500, 3)
        eng.store(tokens, kv_buffer=kv)
        backend.flush(300)
        out["io_after_writes"] = io_threads()
        got = torch.zeros_like(kv)
        out["retrieved"] = int(eng.retrieve(tokens, kv_buffer=got).sum())
        out["exact"] = bool(torch.equal(got, kv))
        out["io_after_reads"] = io_threads()
    print(json.dumps(out))
""")


def test_write_behind_yields_the_cpu_and_leaves_the_read_threads_alone(tmp_path):
    """The writer threads run at a lower priority than the process (nice +10), write
    on their own threads, not on the I/O pool that reads use (which keeps the
    process's priority)."""
    proc = subprocess.run([sys.executable, "-c", PRIORITIES, str(tmp_path / "kv")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["nice"] > 0 and out["n"] >= 2
    assert out["writers"] == [min(19, out["base"] + out["nice"])] * out["n"]
    assert out["io_after_writes"] == {}  # the writes did not start the read pool
    assert out["retrieved"] == 1500 and out["exact"]
    assert out["io_after_reads"] and set(out["io_after_reads"].values()) == {out["base"]}


STALE = textwrap.dedent("""
    import json, sys, torch, numpy as np
    import tdstore
    from tdstore.dev.lmcache_engine import engine, tdstore_config, sequence, backend_of
    loc = sys.argv[1]
    out = {}
    with engine(tdstore_config(loc)) as eng:
        backend = backend_of(eng)
        tokens, kv = sequence(768, 5)
        eng.store(tokens, kv_buffer=kv)
        backend.flush(300)
        keys = [k for _, _, k in eng.token_database.process_tokens(tokens=tokens)]
        names = [k.to_string() for k in keys]
        stored = {}
        with tdstore.open(loc) as other:  # another handle, as another process would be
            c = other.chunks("lmcache")
            for n in names:
                a, meta = c.get(n)
                stored[n] = (a, meta)
        def step(what):
            out[what + "_lookup"] = backend.batched_contains(keys)
            with tdstore.open(loc) as other:
                c = other.chunks("lmcache")
                c.remove(names[1])  # evicted after the lookup ...
                if what == "stored_again":  # ... and stored again (new rows, new files)
                    a, meta = stored[names[1]]
                    c.put(names[1], a, fmt=meta["fmt"],
                          attrs={"shapes": meta["shapes"], "dtypes": meta["dtypes"]})
            objs = backend.batched_get_blocking(keys)
            out[what + "_got"] = sum(o is not None for o in objs)
            out[what + "_exact"] = all(
                bytes(np.frombuffer(memoryview(o.byte_array).cast("B"), np.uint8,
                                    count=stored[n][0].nbytes))
                == stored[n][0].reshape(-1).view(np.uint8).tobytes()
                for o, n in zip(objs, names) if o is not None)
            for o in objs:
                if o is not None:
                    o.ref_count_down()
        step("stored_again")
        step("evicted")
    print(json.dumps(out))
""")


def test_a_chunk_evicted_between_lookup_and_read_is_a_miss_or_its_new_copy(tmp_path):
    """A read uses the rows its lookup found; if the chunk was removed meanwhile the
    read is a miss from there, and if it was stored again the read finds the new copy,
    bit-exact: never the bytes of another chunk."""
    proc = subprocess.run([sys.executable, "-c", STALE, str(tmp_path / "kv")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["stored_again_lookup"] == 3 and out["stored_again_got"] == 3
    assert out["stored_again_exact"]
    assert out["evicted_lookup"] == 3 and out["evicted_got"] == 1 and out["evicted_exact"]


@pytest.mark.parametrize("seeds", [("0", "12345")])
def test_keys_and_hits_do_not_depend_on_pythonhashseed(tmp_path, seeds):
    """LMCache's default ``pre_caching_hash_algorithm: builtin`` hashes tuples of ints,
    which Python does not salt (only str/bytes are): keys agree across seeds."""
    loc = str(tmp_path / "kv")
    a = run({"location": loc, "store": [[7, 800]], "check": [[7, 800]]},
            env={**os.environ, "PYTHONHASHSEED": seeds[0]})
    b = run({"location": loc, "check": [[7, 800]]},
            env={**os.environ, "PYTHONHASHSEED": seeds[1]})
    assert a["keys"] == b["keys"] and len(a["keys"][0]) == 4
    assert b["exact"] == [[800, True]]


def test_a_kill_right_after_store_loses_only_what_was_not_yet_committed(tmp_path):
    """Write-behind: store() returns before the chunks are committed. A SIGKILL then
    loses the uncommitted ones; whatever a new process finds is whole and exact."""
    loc = str(tmp_path / "kv")
    code = CHILD.replace("    backend_of(eng).flush(300)\n",
                         "    import signal; os.kill(os.getpid(), signal.SIGKILL)\n")
    assert code != CHILD
    proc = subprocess.run([sys.executable, "-c", code,
                           json.dumps({"location": loc, "store": [[s, 1024] for s in range(4)]})],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    got = run({"location": loc, "check": [[s, 1024] for s in range(4)]})
    for found, (n, exact) in zip(got["found"], got["exact"], strict=True):
        assert exact and n == found and n % 256 == 0  # whole chunks, exact bytes
    with tdstore.open(loc) as store:
        assert not store.verify().damage


def test_agents_tagged_as_one_group_share_their_common_prompt(tmp_path):
    code = textwrap.dedent("""
        import json, sys, torch
        from tdstore.dev.lmcache_engine import engine, tdstore_config, sequence, backend_of
        loc, group = sys.argv[1], sys.argv[2]
        prompt_t, prompt_kv = sequence(768, 1)
        exact = []
        with engine(tdstore_config(loc)) as eng:
            seqs = []
            for a in range(3):
                t, kv = sequence(256, 10 + a)
                seqs.append((torch.cat([prompt_t, t]), torch.cat([prompt_kv, kv], dim=2)))
            def tags(a):
                cfg = {"lmcache.tag.agent": f"a{a}"}
                if group:
                    cfg["lmcache.tag.tdstore_group"] = group
                return cfg
            for a, (t, kv) in enumerate(seqs):
                eng.store(t, kv_buffer=kv, request_configs=tags(a))
            backend_of(eng).flush(300)
            for a, (t, kv) in enumerate(seqs):
                out = torch.zeros_like(kv)
                n = int(eng.retrieve(t, kv_buffer=out, request_configs=tags(a)).sum())
                exact.append(n == t.numel() and bool(torch.equal(out, kv)))
        print(json.dumps(exact))
    """)
    sizes = {}
    for group in ("", "pipeline"):
        loc = tmp_path / f"kv-{group or 'none'}"
        out = subprocess.run([sys.executable, "-c", code, str(loc), group], capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, True, True]
        sizes[group] = sum(p.stat().st_size for p in (loc / "data").rglob("*") if p.is_file())
    # 3 agents x 4 chunks; with the group the 3 prompt chunks are stored once, not 3 times
    assert sizes[""] >= 12 * CHUNK_BYTES
    assert sizes["pipeline"] < 7 * CHUNK_BYTES  # 3 prompt chunks + 3 own chunks, + metadata


def test_the_lmcache_benchmark_runs_and_reports_every_target(tmp_path):
    from pathlib import Path

    tool = Path(__file__).parents[1] / "tools" / "bench_lmcache.py"
    out = subprocess.run([sys.executable, str(tool), "--sequences", "2", "--tokens", "512",
                          "--layers", "2", "--hidden", "32", "--agents", "2", "--json",
                          "--dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout[out.stdout.index("{"):])
    ratios = report["ratios"]
    assert ratios["retrievable after a restart, tdstore (share of tokens)"]["value"] == 1.0
    assert ratios["bytes, tagged agents of one group / tagged agents without it"]["value"] < 1
    assert report["sharing"]["agents_tagged_group_exact"] == 1.0
    tokens = 2 * 512
    for kind in ("tdstore", "tdstore, verify_reads true", "tdstore, direct_reads true",
                 "LocalDiskBackend"):
        r = report["results"][kind]
        assert r["retrieved_warm_tokens"] == r["retrieved_cold_tokens"] == tokens, kind
    assert report["results"]["tdstore, verify_reads true"]["found_after_restart_tokens"] == tokens
    assert ratios["retrieve throughput, warm, verify_reads true, vs LocalDiskBackend"]["value"] > 0
    assert list(tmp_path.iterdir()) == []  # the benchmark cleans up after itself


@pytest.mark.parametrize("name, value, expected", [
    ("max_bytes", "10GB", "tdstore.max_bytes: expected a number of bytes"),
    ("max_bytes", "inf", "tdstore.max_bytes: expected a number of bytes"),
    ("max_bytes", "nan", "tdstore.max_bytes: expected a number of bytes"),
    ("max_bytes", -5, "tdstore.max_bytes: expected a number of bytes"),
    ("max_bytes", True, "tdstore.max_bytes: expected a number of bytes"),
    ("cache_max_bytes", "x", "tdstore.cache_max_bytes: expected a number of bytes"),
    ("writers", "four", "tdstore.writers: expected an int from 1 to 256, got 'four'"),
    ("writers", 0, "tdstore.writers: expected an int from 1 to 256, got 0"),
    ("writers", 2.5, "tdstore.writers: expected an int from 1 to 256"),
    ("writers", "1e12", "tdstore.writers: expected an int from 1 to 256, got '1e12'"),
    ("verify_reads", "enabled",
     "tdstore.verify_reads: expected once, true or false, got 'enabled'"),
    ("direct_reads", "sometimes",
     "tdstore.direct_reads: expected auto, true or false, got 'sometimes'"),
    ("url", 5432, "tdstore.url: expected a string"),
    ("maxbytes", "10", "unknown extra_config setting tdstore.maxbytes; known: tdstore.location"),
])
def test_a_bad_setting_is_refused_naming_it(name, value, expected):
    from tdstore.integrations.lmcache import settings_from

    with pytest.raises(ValueError, match=re.escape(expected)):
        settings_from({"tdstore.location": "/kv", f"tdstore.{name}": value})


def test_settings_as_yaml_gives_them():
    from tdstore.integrations.lmcache import WRITERS, settings_from

    assert settings_from({"tdstore.location": "/kv"}) == {
        "location": "/kv", "verify_reads": "once", "direct_reads": "auto", "writers": WRITERS}
    assert settings_from({"tdstore.location": "/kv", "tdstore.direct_reads": "On"}
                         )["direct_reads"] is True
    assert settings_from({"tdstore.location": "/kv", "tdstore.verify_reads": " ONCE"}
                         )["verify_reads"] == "once"
    assert settings_from({"tdstore.location": "/kv", "tdstore.verify_reads": True}
                         )["verify_reads"] is True
    assert settings_from({"tdstore.location": "/kv", "tdstore.max_bytes": "2e11",
                          "tdstore.cache_max_bytes": 0, "tdstore.verify_reads": "Off",
                          "tdstore.writers": "2", "other.key": "x"}) == {
        "location": "/kv", "max_bytes": 200_000_000_000, "cache_max_bytes": 0,
        "verify_reads": False, "direct_reads": "auto", "writers": 2}


@pytest.mark.parametrize("setting, expected", [
    ({"writers": "four"}, "tdstore.writers: expected an int from 1 to 256, got 'four'"),
    ({"url": "postgresql+psycopg://kv@127.0.0.1:1/kv"},
     "the database server cannot be reached"),
    ({"url": "sqlite:////nonexistent/dir/catalog.sqlite"}, "cannot be opened"),
])
def test_the_engine_refuses_a_bad_setting_and_creates_nothing(tmp_path, setting, expected):
    """Refused before anything is made, or (a catalogue that cannot be reached) without
    a trace: not even the store's directory, nor a parent of it."""
    code = textwrap.dedent("""
        import json, sys
        from tdstore.dev.lmcache_engine import engine, tdstore_config
        try:
            with engine(tdstore_config(sys.argv[1], **json.loads(sys.argv[2]))):
                pass
        except RuntimeError as exc:
            print("refused:", exc)
    """)
    loc = tmp_path / "new" / "kv"
    out = subprocess.run([sys.executable, "-c", code, str(loc), json.dumps(setting)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "refused: LMCache did not load the tdstore backend" in out.stdout
    assert expected in out.stdout + out.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_model_name_with_a_slash_or_percent_stores_and_a_new_process_retrieves(tmp_path):
    """vLLM puts its model's name (meta-llama/Llama-3.1-8B-Instruct, or a path) in every
    key: a character tdstore names cannot hold is written %XX, and two models whose
    names differ only so keep chunks of their own."""
    loc = {"location": str(tmp_path / "kv")}
    for model in ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama%2FLlama-3.1-8B-Instruct"):
        wrote = run({**loc, "model": model, "store": [[1, 600]]})
        assert wrote["failed"] == 0
        got = run({**loc, "model": model, "check": [[1, 600]]})
        assert got["found"] == [600] and got["exact"] == [[600, True]]
    with tdstore.open(loc["location"]) as store:
        names = store.chunks("lmcache").keys()
        assert len(names) == 6  # 3 chunks of each model
        assert {n.split("@")[0] for n in names} == {"meta-llama%2FLlama-3.1-8B-Instruct",
                                                   "meta-llama%252FLlama-3.1-8B-Instruct"}
        assert store.verify().ok


def _key(model="kv", chunk_hash=0xAB, tags=None, layer=None, world_size=1, worker_id=0):
    import torch
    from lmcache.utils import CacheEngineKey, LayerCacheEngineKey

    configs = {f"lmcache.tag.{k}": v for k, v in (tags or {}).items()}
    if layer is None:
        return CacheEngineKey(model, world_size, worker_id, chunk_hash, torch.float16, configs)
    return LayerCacheEngineKey(model, world_size, worker_id, chunk_hash, torch.float16,
                               configs, layer_id=layer)


def test_key_names_are_one_per_key_and_valid_names():
    """Every two keys LMCache tells apart get two names, also where LMCache's own
    ``to_string()`` gives them one (tag values holding '@' or '%', 1 and "1", a hash as
    bytes or as an int), and every name is a valid tdstore name."""
    from tdstore.core.validate import check_name
    from tdstore.integrations.lmcache import MAX_KEY_CHARS, NAMESPACE, key_name

    keys = [_key(), _key("a/b"), _key("a%2Fb"), _key("a%252Fb"), _key("a\\b"),
            _key("a\x00b"), _key("a\x85b"), _key("é/ü"), _key("x" * 5000),
            _key("x" * 5000 + "y"), _key("/" * 3000), _key("%2F" * 1000),
            _key("/models/bad\udcff"), _key("a\u202eb\u2028c\ufeff"), _key("a\u200bb"),
            _key("a@1@0@ab@half"), _key(tags={"agent": "a@b%c"}),
            _key(tags={"agent": "a", "b": "c"}), _key(tags={"agent": 1}),
            _key(tags={"agent": "1"}), _key(tags={"agent": "~int:1"}),
            _key(tags={"agent": "a=b"}), _key(tags={"agent=a": "b"}), _key(chunk_hash=b"\xab"),
            _key(chunk_hash=-0xAB), _key(layer=0), _key(layer=1), _key(tags={"0": "0"}),
            _key(world_size=2), _key(worker_id=1), _key(tags={"agent": "a", "x": "y"}),
            _key(tags={"x": "y", "agent": "a"})]
    assert len({(type(k), k) for k in keys}) == len(keys)  # all different for LMCache
    names = [key_name(k) for k in keys]
    assert len(set(names)) == len(keys)
    assert names[0] == keys[0].to_string() == "kv@1@0@ab@half"  # the usual key as it is
    assert names[1] == "a%2Fb@1@0@ab@half"  # a vLLM model name
    assert names[12] == "%2Fmodels%2Fbad%ED%B3%BF@1@0@ab@half"  # a path's undecodable byte
    assert names[13] == "a%E2%80%AEb%E2%80%A8c%EF%BB%BF@1@0@ab@half"  # marks that garble ls
    assert names[16] == "kv@1@0@ab@half@agent=a%40b%25c"
    assert names[18] == "kv@1@0@ab@half@agent=~int:1"
    for n in names:
        assert len(n) <= MAX_KEY_CHARS
        check_name("group", f"{NAMESPACE}:{n}")


TAGGED = textwrap.dedent("""
    import json, sys, torch
    from tdstore.dev.lmcache_engine import engine, tdstore_config, sequence, backend_of
    args = json.loads(sys.argv[1])
    out = {"checks": []}
    with engine(tdstore_config(args["location"])) as eng:
        for op, seed, n, tags in args["ops"]:
            tokens, kv = sequence(n, 0)
            kv = sequence(n, seed)[1]  # the same tokens, KV of its own per seed
            if op == "store":
                eng.store(tokens, kv_buffer=kv, request_configs=tags)
                backend_of(eng).flush(300)
                continue
            got = torch.zeros_like(kv)
            k = int(eng.retrieve(tokens, kv_buffer=got, request_configs=tags).sum())
            out["checks"].append([eng.lookup(tokens=tokens, request_configs=tags), k,
                                  bool(torch.equal(got[:, :, :k], kv[:, :, :k]))])
        out["failed"] = backend_of(eng).failed
    print(json.dumps(out))
""")


def tagged(loc: str, ops: list) -> dict:
    proc = subprocess.run([sys.executable, "-c", TAGGED, json.dumps({"location": loc,
                                                                      "ops": ops})],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_requests_whose_tags_print_alike_keep_chunks_of_their_own(tmp_path):
    """LMCache's key string joins tags as @name%value, so {agent: "a@b%c"} and {agent:
    "a", b: "c"} print alike, as do the values 1 and "1"; LMCache tells them apart, and
    so must the backend: a miss until stored, then each its own bytes."""
    loc = str(tmp_path / "kv")
    pairs = [({"lmcache.tag.agent": "a@b%c"}, {"lmcache.tag.agent": "a", "lmcache.tag.b": "c"}),
             ({"lmcache.tag.agent": 1}, {"lmcache.tag.agent": "1"})]
    for first, second in pairs:
        got = tagged(loc, [["store", 1, 512, first], ["check", 2, 512, second],
                           ["store", 2, 512, second], ["check", 1, 512, first],
                           ["check", 2, 512, second]])
        assert got["checks"] == [[0, 0, True], [512, 512, True], [512, 512, True]]
        assert got["failed"] == 0


def test_a_group_whose_master_chunk_was_quarantined_is_stored_anew(tmp_path):
    """Agents A (the master at a position) and B (a mirror of it) of one group: A's chunk
    file is damaged and verify --repair quarantines it. Both are misses then (B is read
    through A), and storing them again stores them anew, exact, with verify clean."""
    loc = str(tmp_path / "kv")
    a = {"lmcache.tag.tdstore_group": "rag/v1", "lmcache.tag.agent": "A"}
    b = {"lmcache.tag.tdstore_group": "rag/v1", "lmcache.tag.agent": "B"}
    got = tagged(loc, [["store", 1, 512, a], ["store", 2, 512, b],
                       ["check", 1, 512, a], ["check", 2, 512, b]])
    assert got["checks"] == [[512, 512, True]] * 2 and got["failed"] == 0
    with tdstore.open(loc) as store:
        groups = sorted(g for g in store.groups() if g.startswith("lmcache-shared:rag%2Fv1:"))
        # positions 0 and 1, each with A's chunk as master and B's as a mirror of it
        assert [g.split(":")[2] for g in groups] == ["0", "1"]
        ls = store.group(groups[0]).ls()
        master = next(r for r in ls if r["role"] == "master")
        assert master["agent"].endswith("@agent=A")
    chunk_file = next((tmp_path / "kv" / "data").glob(f"*/{_array_of(loc, groups[0])}/c.*"))
    data = bytearray(chunk_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk_file.write_bytes(bytes(data))
    with tdstore.open(loc) as store:
        assert any("quarantined" in line for line in store.verify(repair=True).repaired)
    got = tagged(loc, [["check", 1, 512, a], ["check", 2, 512, b],
                       ["store", 2, 512, b], ["store", 1, 512, a],
                       ["check", 1, 512, a], ["check", 2, 512, b]])
    assert got["checks"] == [[0, 0, True], [0, 0, True], [512, 512, True], [512, 512, True]]
    assert got["failed"] == 0
    with tdstore.open(loc) as store:
        assert store.verify().ok


def _array_of(loc: str, group: str) -> str:
    """The array directory name of ``group``'s master."""
    from sqlalchemy import select

    from tdstore.storage.catalog import AgentRow, GroupRow

    with tdstore.open(loc) as store, store.catalog.read() as s:
        path = s.scalars(select(AgentRow.array).join(GroupRow, AgentRow.group_id == GroupRow.id)
                         .where(GroupRow.name == group, AgentRow.role == "master")).one()
    return path.split("/")[-1]


def test_lookups_while_the_catalogue_is_down_are_misses_not_errors(tmp_path, pg_server):
    """The catalogue's PostgreSQL server stops under a running engine: lookups and
    retrieves are misses (logged), never an exception into LMCache's caller; once the
    server is back every chunk is found again, exact."""
    url = pg_server.new_database()
    code = textwrap.dedent("""
        import json, sys, torch
        from tdstore.dev.lmcache_engine import engine, tdstore_config, sequence, backend_of
        tokens, kv = sequence(600, 1)
        with engine(tdstore_config(sys.argv[1], url=sys.argv[2])) as eng:
            eng.store(tokens, kv_buffer=kv)
            backend_of(eng).flush(300)
            for line in sys.stdin:
                got = torch.zeros_like(kv)
                k = int(eng.retrieve(tokens, kv_buffer=got).sum())
                print(json.dumps([eng.lookup(tokens=tokens), k,
                                  bool(torch.equal(got[:, :, :k], kv[:, :, :k]))]), flush=True)
        print("closed", flush=True)
    """)
    log = tmp_path / "child.log"  # (LMCache logs much: a pipe could fill and block it)
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "kv"), url],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=log.open("w"), text=True)

    def check() -> list:
        child.stdin.write("\n")
        child.stdin.flush()
        return json.loads(child.stdout.readline())

    try:
        assert check() == [600, 600, True]
        pg_server.stop("immediate")
        try:
            assert check() == [0, 0, True]
            assert check() == [0, 0, True]
        finally:
            pg_server.start()
        assert check() == [600, 600, True]
        child.stdin.close()
        out = child.stdout.read()
        child.wait(timeout=600)
    finally:
        child.kill()
    err = log.read_text()
    assert child.returncode == 0, err[-3000:]
    assert out.split() == ["closed"]
    # one line for the outage, not one per lookup
    assert err.count("lookup failed, answered as a miss") == 1, err[-3000:]
    assert "Traceback" not in err


def test_closing_with_chunks_still_queued_commits_them_first(tmp_path):
    """LMCache closes its CPU backend, freeing the buffers of chunks still queued, before
    it closes the plugin: the queue is committed first. The writers are held back by a
    write lock another process holds on the catalogue until the engine is closing."""
    import sqlite3

    loc = str(tmp_path / "kv")
    run({"location": loc})  # the store, empty
    code = textwrap.dedent("""
        import sys
        from tdstore.dev.lmcache_engine import engine, tdstore_config, sequence, backend_of
        with engine(tdstore_config(sys.argv[1])) as eng:
            for seed in range(3):
                tokens, kv = sequence(700, seed)
                eng.store(tokens, kv_buffer=kv)
            print("queued", len(backend_of(eng)._pending), flush=True)
            sys.stdin.readline()  # then closing, while the writers wait for the lock
        print("closed", flush=True)
    """)
    db = sqlite3.connect(tmp_path / "kv" / "catalog.sqlite", isolation_level=None)
    db.execute("BEGIN IMMEDIATE")  # the write lock: every commit of the child waits
    child = subprocess.Popen([sys.executable, "-c", code, loc], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().split() == ["queued", "9"]
        child.stdin.write("\n")
        child.stdin.flush()
    finally:
        db.execute("ROLLBACK")
        db.close()
    out, err = child.communicate(timeout=600)
    assert child.returncode == 0, err[-3000:]
    assert out.split() == ["closed"]
    got = run({"location": loc, "check": [[0, 700], [1, 700], [2, 700]]})
    assert got["exact"] == [[700, True]] * 3


def test_a_store_after_close_is_refused_and_holds_no_buffer(tmp_path):
    code = textwrap.dedent("""
        import sys
        from tdstore.dev.lmcache_engine import engine, tdstore_config, sequence, backend_of
        with engine(tdstore_config(sys.argv[1])) as eng:
            backend = backend_of(eng)
            backend.close()
            tokens, kv = sequence(700, 1)
            eng.store(tokens, kv_buffer=kv)
            print(len(backend._pending), backend.flush(0), eng.lookup(tokens=tokens))
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "kv")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["0", "True", "0"]
    assert "backend closed; chunk" in out.stderr


def test_a_prefix_stored_by_a_burst_of_requests_outlasts_their_own_chunks(tmp_path):
    """Requests stored one after another with no wait between them: the prefix each one
    stores again is often still queued then, and each of those stores counts as a use
    once it is committed (one writer, so that commits keep the order of the stores)."""
    code = textwrap.dedent("""
        import json, sys, torch
        from tdstore.dev.lmcache_engine import engine, tdstore_config, sequence, backend_of
        prefix, pkv = sequence(512, 1)
        def request(seed):
            tokens, kv = sequence(600, seed)
            return torch.cat([prefix, tokens]), torch.cat([pkv, kv], dim=2)
        cfg = tdstore_config(sys.argv[1], max_bytes=int(sys.argv[2]), writers="1")
        with engine(cfg) as eng:
            for seed in range(2, 8):
                tokens, kv = request(seed)
                eng.store(tokens, kv_buffer=kv)
            backend_of(eng).flush(300)
            got = torch.zeros_like(kv)
            k = int(eng.retrieve(tokens, kv_buffer=got).sum())
            print(json.dumps([k, bool(torch.equal(got, kv)),
                              eng.lookup(tokens=request(2)[0])]))
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "kv"),
                          str(10 * CHUNK_BYTES)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    # the newest request whole; the oldest one's own chunks gone, its prefix kept
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [1112, True, 512]


def test_one_request_stored_again_and_again_never_stalls_the_writers(tmp_path):
    """A burst of requests storing one prompt: stores of chunks whose first store is
    queued, or being written, or already done, interleave with new puts of them. No
    writer ever waits for another (all four once waited for puts queued behind them, and
    nothing was ever written again): the queue drains, later chunks are stored and the
    engine closes."""
    code = textwrap.dedent("""
        import sys, time
        from tdstore.dev.lmcache_engine import engine, tdstore_config, sequence, backend_of
        tokens, kv = sequence(2048, 1)
        other, other_kv = sequence(600, 2)
        with engine(tdstore_config(sys.argv[1])) as eng:
            for _ in range(40):
                eng.store(tokens, kv_buffer=kv)
                time.sleep(0.005)
            print("drained", backend_of(eng).flush(), flush=True)
            eng.store(other, kv_buffer=other_kv)
            print("drained", backend_of(eng).flush(), flush=True)
            print("found", eng.lookup(tokens=tokens), eng.lookup(tokens=other), flush=True)
        print("closed", flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "kv")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["drained", "True", "drained", "True", "found", "2048",
                                  "600", "closed"]


def test_a_remove_that_fails_on_the_store_is_a_logged_miss(tmp_path):
    """LMCache's clear (and remove_after_retrieve) remove chunks through the backend:
    with the store's locks/ directory gone, that is a logged failure, never an exception
    into LMCache's caller, and the chunk stays."""
    code = textwrap.dedent("""
        import shutil, sys
        from tdstore.dev.lmcache_engine import engine, tdstore_config, sequence, backend_of
        tokens, kv = sequence(600, 1)
        with engine(tdstore_config(sys.argv[1])) as eng:
            eng.store(tokens, kv_buffer=kv)
            backend_of(eng).flush()
            shutil.rmtree(sys.argv[1] + "/locks")
            print("cleared", eng.clear(tokens), "found", eng.lookup(tokens=tokens), flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "kv")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["cleared", "0", "found", "600"]
    assert "remove failed, answered as a miss" in out.stderr
    assert "locks/ directory was removed" in out.stderr


def test_a_chunk_stored_again_is_used_again_and_outlasts_older_ones(tmp_path):
    """Requests sharing a prompt prefix all store its chunk: each time it counts as used,
    so the budget evicts older chunks first and the newest request stays whole."""
    code = textwrap.dedent("""
        import json, sys, torch
        from tdstore.dev.lmcache_engine import engine, tdstore_config, sequence, backend_of
        prefix, pkv = sequence(256, 1)
        def with_prefix(seed):
            tokens, kv = sequence(256, seed)
            return torch.cat([prefix, tokens]), torch.cat([pkv, kv], dim=2)
        with engine(tdstore_config(sys.argv[1], max_bytes=int(sys.argv[2]))) as eng:
            def store(tokens, kv):
                eng.store(tokens, kv_buffer=kv)
                backend_of(eng).flush(300)
            store(*with_prefix(2))                 # the prefix, then A
            for seed in (10, 11, 12):
                store(*sequence(256, seed))        # three other chunks
            newest, kv = with_prefix(3)
            store(newest, kv)                      # the prefix again, then B
            store(*sequence(256, 99))              # one more: over the budget
            got = torch.zeros_like(kv)
            k = int(eng.retrieve(newest, kv_buffer=got).sum())
            a = with_prefix(2)[0]
            print(json.dumps([k, bool(torch.equal(got, kv)), eng.lookup(tokens=a)]))
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "kv"),
                          str(6 * CHUNK_BYTES + 4000)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    # the newest request whole; A, the oldest chunk used, evicted (its prefix stays)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [512, True, 256]


DIRECT_CHILD = textwrap.dedent("""
    import json, os, sys, torch
    from pathlib import Path
    from tdstore.dev.bench import drop_page_cache
    from tdstore.dev.lmcache_engine import engine, tdstore_config, sequence, backend_of
    from tdstore.storage.arrays import _cachestat
    loc, local_cpu, direct = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
    cfg = tdstore_config(loc, **({"direct_reads": direct} if direct else {}))
    cfg["local_cpu"] = local_cpu
    tokens, kv = sequence(1000, 3)
    with engine(cfg) as eng:
        if not any(Path(loc).glob("data/*/*/c.*")):
            eng.store(tokens, kv_buffer=kv)
            backend_of(eng).flush(300)
        drop_page_cache(Path(loc))
        got = torch.zeros_like(kv)
        k = int(eng.retrieve(tokens, kv_buffer=got).sum())
        files, cached, pages = 0, 0, 0
        for f in Path(loc).glob("data/*/*/c.*"):
            fd = os.open(f, os.O_RDONLY)
            files, cached = files + 1, cached + _cachestat(fd).nr_cache
            pages += -(-os.fstat(fd).st_size // 4096)
            os.close(fd)
        print(json.dumps({"direct": backend_of(eng).store.arrays.direct_reads,
                          "exact": [k, bool(torch.equal(got, kv))], "files": files,
                          "cached": cached, "pages": pages}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cachestat(2)")
@pytest.mark.parametrize("local_cpu, setting, direct", [
    (True, "", True), (False, "", False), (False, "true", True), (True, "false", False)])
def test_direct_reads_follow_lmcaches_cpu_tier_unless_set(tmp_path, local_cpu, setting,
                                                          direct):
    """tdstore.direct_reads auto (the default): with LMCache's CPU tier on, chunks a new
    process retrieves from the disk come into LMCache's buffers around the page cache
    (LMCache keeps them in its CPU tier); with it off, through the page cache."""
    loc = str(tmp_path / "kv")
    run_child = [sys.executable, "-c", DIRECT_CHILD, loc, "1" if local_cpu else "0", setting]
    first = subprocess.run(run_child, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    out = subprocess.run(run_child, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["direct"] is direct and r["exact"] == [1000, True] and r["files"] == 4
    if direct:  # (the last page of each chunk file is read through the page cache)
        assert r["cached"] <= 2 * r["files"]
    else:
        assert r["cached"] == r["pages"]


LAYERWISE = textwrap.dedent("""
    import json, sys, torch, tdstore
    from tdstore.dev.lmcache_engine import (engine, tdstore_config, sequence, backend_of,
                                            store_layerwise, retrieve_layerwise)
    from tdstore.integrations.lmcache import key_name
    args = json.loads(sys.argv[1])
    cfg = tdstore_config(args["location"], url=args.get("url"))
    cfg["use_layerwise"] = True
    out = {"exact": [], "keys": []}
    with engine(cfg) as eng:
        for seed, n, tags in args.get("store", []):
            tokens, kv = sequence(n, seed)
            store_layerwise(eng, tokens, kv, request_configs=tags)
        backend_of(eng).flush(300)
        out["failed"] = backend_of(eng).failed
        for seed, n, tags in args.get("check", []):
            tokens, kv = sequence(n, seed)
            # its chunks' keys in token order, each as its layers' keys
            out["keys"].append([[key_name(k) for k in key.split_layers(4)] for _, _, key
                                in eng.token_database.process_tokens(tokens=tokens)])
            got = torch.zeros_like(kv)
            k = retrieve_layerwise(eng, tokens, got, request_configs=tags)
            # what the retrieve counts came back exactly; nothing else was written
            out["exact"].append([k, bool(torch.equal(got[:, :, :k], kv[:, :, :k]))
                                 and not bool(got[:, :, k:].any())])
    print(json.dumps(out))
""")


def layerwise(args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", LAYERWISE, json.dumps(args)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_layerwise_chunks_come_back_exact_in_a_new_process(where):
    """use_layerwise: true (vLLM's layer-by-layer loading): a chunk per layer; a new
    process retrieves every token, layer by layer, bit-exact."""
    assert layerwise({**where, "store": [[1, 1000, None], [2, 300, None]]})["failed"] == 0
    got = layerwise({**where, "check": [[1, 1000, None], [2, 300, None], [3, 500, None]]})
    assert got["exact"] == [[1000, True], [300, True], [0, True]]
    with tdstore.open(where["location"], url=where.get("url")) as store:
        keys = store.chunks("lmcache").keys()
    assert len(keys) == (4 + 2) * 4  # a chunk per layer (the test model has 4 layers)
    assert {k.rsplit("@", 1)[1] for k in keys} == {"0", "1", "2", "3"}


def test_layerwise_a_chunk_missing_a_layer_is_a_miss_never_unloaded_kv(tmp_path):
    """LMCache's layerwise retrieve looks each chunk up by its first layer's key alone,
    counts the tokens, then reads one layer of every chunk at a time and loads them by
    position: a chunk with a layer missing counted as found would leave that layer's
    tokens unloaded in a retrieve that counts them. A layer missing before the lookup
    (removed, evicted, quarantined, not yet committed) makes its chunk a miss; one lost
    after it fails the retrieve, naming the chunk."""
    import torch

    from tdstore.core.errors import NotFoundError
    from tdstore.dev.lmcache_engine import engine, retrieve_layerwise, sequence, tdstore_config

    loc = str(tmp_path / "kv")
    r = layerwise({"location": loc, "store": [[1, 1000, None]], "check": [[1, 1000, None]]})
    assert r["exact"] == [[1000, True]]
    keys = r["keys"][0]  # [chunk][layer]
    cfg = tdstore_config(loc)
    cfg["use_layerwise"] = True
    tokens, kv = sequence(1000, 1)
    with engine(cfg) as eng, tdstore.open(loc) as store:
        # lost after the lookup: the second chunk's layer 2, once the retrieve counted it
        out = torch.zeros_like(kv)
        steps = iter(eng.retrieve_layer(tokens, kv_buffer=out))
        assert int(next(steps).sum()) == 1000  # counted, layer 0 on its way
        assert store.chunks("lmcache").remove(keys[1][2])
        with pytest.raises(NotFoundError, match=re.escape(keys[1][2])):
            for _ in steps:
                pass
        assert torch.equal(out[:, :2], kv[:, :2])  # the layers before it are whole
        # missing before the lookup: the first chunk, exact; the rest missed
        out = torch.zeros_like(kv)
        assert retrieve_layerwise(eng, tokens, out) == 256
        assert torch.equal(out[:, :, :256], kv[:, :, :256]) and not out[:, :, 256:].any()


def test_layerwise_agents_of_one_group_share_layer_by_layer(tmp_path):
    """Tagged agents of one tdstore group in layerwise mode: each layer's chunk is stored
    against the same layer of the others (3 agents sharing 768 of 1024 tokens: half the
    bytes; against the first layer alone, as every layer once was, 0.87)."""
    from tdstore.dev.bench import du

    sizes = {}
    for label, group in (("tagged", None), ("group", "rag/v1")):
        loc = str(tmp_path / label)
        ops = []
        for a in range(3):
            tags = {"lmcache.tag.agent": f"a{a}"}
            if group:
                tags["lmcache.tag.tdstore_group"] = group
            ops.append([a, tags])
        script_args = {"location": loc, "agents": ops}
        proc = subprocess.run([sys.executable, "-c", SHARED_LAYERWISE,
                               json.dumps(script_args)], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == [True, True, True]
        sizes[label] = du(tmp_path / label / "data")
    assert sizes["group"] < 0.6 * sizes["tagged"]
    with tdstore.open(str(tmp_path / "group")) as store:
        shared = [g for g in store.groups() if g.startswith("lmcache-shared:")]
    # a group per position and layer: rag%2Fv1@<layer>:<position>:...
    assert len(shared) == 4 * 4 and {g.split(":")[1] for g in shared} == {
        f"rag%2Fv1@{layer}" for layer in range(4)}


SHARED_LAYERWISE = textwrap.dedent("""
    import json, sys, torch
    from tdstore.dev.lmcache_engine import (engine, tdstore_config, sequence, backend_of,
                                            store_layerwise, retrieve_layerwise)
    args = json.loads(sys.argv[1])
    cfg = tdstore_config(args["location"])
    cfg["use_layerwise"] = True
    prompt, prompt_kv = sequence(768, 100)
    seqs = {}
    for a, _ in args["agents"]:
        t, kv = sequence(256, 200 + a)
        seqs[a] = (torch.cat([prompt, t]), torch.cat([prompt_kv, kv], dim=2))
    with engine(cfg) as eng:
        for a, tags in args["agents"]:
            store_layerwise(eng, *seqs[a], request_configs=tags)
        backend_of(eng).flush(300)
        exact = []
        for a, tags in args["agents"]:
            tokens, kv = seqs[a]
            got = torch.zeros_like(kv)
            exact.append(retrieve_layerwise(eng, tokens, got, request_configs=tags) == 1024
                         and bool(torch.equal(got, kv)))
    print(json.dumps(exact))
""")
