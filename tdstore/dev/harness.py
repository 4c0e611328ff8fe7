"""Reliability harnesses: crash (SIGKILL at random moments) and concurrency.

Both run real subprocesses against a real store and compare what the store holds with a
model kept from the operations the workers acknowledged. They back ``tools/crash.py``
and ``tools/concurrency.py`` (long runs) and the test suite (short runs).

Crash: a writer process runs a random mix of register_master (first, re-registered and
replacing), register_mirror, collective_reuse_step, delete and delete_group. It prints
``begin`` before each operation and ``ack`` after it returns (after the commit). The
parent kills it with SIGKILL at a random moment inside an operation, then checks that
the store opens, ``verify`` finds no damage (garbage is allowed, and ``gc`` removes it),
and the store holds exactly the acknowledged state, or that state plus the one
operation in flight, never anything in between.

Concurrency: processes x threads write their own agents in one shared group and in
groups of their own while reading each other's; every value read must be a complete
version some writer wrote, and the end state must equal a replay of the acknowledged
operations. No error may reach a caller (``database is locked`` included).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tdstore.api.store import open as open_store
from tdstore.core.location import is_object_url
from tdstore.ops.maintenance import Progress

if TYPE_CHECKING:
    from tdstore.api.store import Store

BLOCK = (4, 32)  # float16: 256 bytes a block
DTYPE = np.float16
GROUPS = ("g0", "g1")
COMPRESSOR = {"g0": None, "g1": "zstd"}  # one raw and one compressed group
AGENTS = ("a0", "a1", "a2", "a3")


def gen(seed: int, n: int) -> np.ndarray:
    """Deterministic blocks for ``seed`` (in any process)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *BLOCK), np.float32).astype(DTYPE)


Model = dict[str, dict[str, np.ndarray]]  # group -> agent -> content (master first)


def _master(model: Model, group: str) -> str | None:
    agents = model.get(group) or {}
    return next(iter(agents), None)


def _require_master(model: Model, group: str) -> str:
    master = _master(model, group)
    if master is None:
        raise AssertionError(f"the model's group {group!r} has no master")
    return master


def apply(model: Model, op: dict[str, Any]) -> None:
    """What ``op`` does to the store, on the model (mirrors seed semantics)."""
    kind, g = op["op"], op["group"]
    agents = model.setdefault(g, {})
    if kind == "master":
        data = gen(op["seed"], op["n"])
        if _master(model, g) == op["agent"]:
            agents[op["agent"]] = data  # mirrors keep their content (re-derived)
        else:
            model[g] = {op["agent"]: data}
    elif kind == "mirror":
        data = agents[_require_master(model, g)].copy()
        data[op["blocks"]] = gen(op["seed"], len(op["blocks"]))
        agents[op["agent"]] = data
    elif kind == "append":
        new = gen(op["seed"], op["n"])
        for name in list(agents):
            agents[name] = np.concatenate([agents[name], new])
        master = _require_master(model, g)
        for name in op["agents"]:
            if name not in agents:
                agents[name] = agents[master].copy()
    elif kind == "delete":
        del agents[op["agent"]]
    elif kind == "delete_group":
        model.pop(g, None)
    if g in model and not model[g]:  # an empty group holds nothing
        model.pop(g)


def choose(model: Model, rng: random.Random, seq: int) -> dict[str, Any]:
    """A random operation that is valid in ``model``."""
    g = rng.choice(GROUPS)
    agents = model.get(g) or {}
    master = _master(model, g)
    seed = rng.randrange(1 << 30)
    mirrors = [a for a in agents if a != master]
    choices = ["master"] * 2
    if master:
        choices += ["mirror"] * 6 + ["append"] * 2 + ["delete"] * 2 + ["delete_group"]
        choices += ["replace"] if len(agents) > 1 else []
    kind = rng.choice(choices)
    big = rng.random() < 0.15  # now and then a few MiB, so kills land in data writes too
    if kind in ("master", "replace"):
        n = len(next(iter(agents.values()))) if (master and mirrors and kind == "master") \
            else rng.choice([8, 32, 4096 if big else 64])
        agent = master if (kind == "master" and master) else rng.choice(
            [a for a in AGENTS if a != master])
        return {"op": "master", "group": g, "agent": agent, "seed": seed, "n": n, "seq": seq}
    if kind == "mirror":
        n = len(agents[_require_master(model, g)])
        free = [a for a in AGENTS if a != master]
        k = rng.randint(0, min(n, 600 if big else 6))
        blocks = sorted(rng.sample(range(n), k))
        return {"op": "mirror", "group": g, "agent": rng.choice(free), "seed": seed,
                "blocks": blocks, "seq": seq}
    if kind == "append":
        named = rng.sample(list(AGENTS), rng.randint(0, 2))
        return {"op": "append", "group": g, "agents": named, "seed": seed,
                "n": rng.randint(1, 2048 if big else 5), "seq": seq}
    if kind == "delete":
        victim = rng.choice(mirrors) if mirrors else master
        return {"op": "delete", "group": g, "agent": victim, "seq": seq}
    return {"op": "delete_group", "group": g, "seq": seq}


def execute(store: Store, op: dict[str, Any], model: Model) -> None:
    """Run ``op`` against the store (the model gives the mirror's base content)."""
    kind, g = op["op"], op["group"]
    if kind == "delete_group":
        store.delete_group(g)
        return
    group = store.group(g, diff_threshold=0.0,
                        compressor=op.get("compressor", COMPRESSOR.get(g)))
    if kind == "master":
        group.register_master(op["agent"], gen(op["seed"], op["n"]))
    elif kind == "mirror":
        data = model[g][_require_master(model, g)].copy()
        data[op["blocks"]] = gen(op["seed"], len(op["blocks"]))
        group.register_mirror(op["agent"], data)
    elif kind == "append":
        group.collective_reuse_step(op["agents"], gen(op["seed"], op["n"]))
    elif kind == "delete":
        group.delete(op["agent"])


def read_state(store: Store) -> Model:
    """Everything the store holds, as a model."""
    state: Model = {}
    for name in store.groups():
        g = store.group(name, create=False)
        agents = g.agents()
        if agents:
            state[name] = {a: g.reconstruct(a) for a in agents}
    return state


def same(a: Model, b: Model) -> bool:
    if a.keys() != b.keys():
        return False
    for g in a:
        if list(a[g]) != list(b[g]):
            return False
        for agent in a[g]:
            x, y = a[g][agent], b[g][agent]
            if x.shape != y.shape or x.tobytes() != y.tobytes():
                return False
    return True


def describe(model: Model) -> str:
    return json.dumps({g: {a: list(v.shape) for a, v in agents.items()}
                       for g, agents in model.items()})


# --------------------------------------------------------------------------- crash


URL_ENV = "TDSTORE_HARNESS_URL"  # the catalogue URL handed to the harness's processes


def _child_env(url: str | None, host_dir: Path | None = None) -> dict[str, str]:
    """The environment of a harness process. With ``host_dir`` the process plays a host
    of its own: that working directory and a chunk cache in it, sharing nothing with the
    others but the object store and the catalogue's server."""
    env = dict(os.environ)
    env.pop(URL_ENV, None)
    if url:
        env[URL_ENV] = url
    if host_dir is not None:
        host_dir.mkdir(parents=True, exist_ok=True)
        env["TDSTORE_CACHE_DIR"] = str(host_dir / "chunk-cache")
    return env


def _host_dir(workdir: Path | None, path: str, n: int) -> Path | None:
    """Process ``n``'s own directory, for a store on object storage."""
    if not is_object_url(path):
        return None
    return (workdir or Path(tempfile.gettempdir())) / f"host{n}"


def _child_url() -> str | None:
    return os.environ.get(URL_ENV) or None


def writer_main(path: str, seed: int) -> None:
    """The crash writer: rebuilds its model from the store, then runs operations."""
    # Ctrl-C raises KeyboardInterrupt here as in an interactive program, even when the
    # harness was started where SIGINT is ignored (a background job of a shell)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rng = random.Random(seed)
    with open_store(path, url=_child_url()) as store:
        model = read_state(store)
        seq = 0
        while True:
            op = choose(model, rng, seq)
            print(json.dumps({"begin": op}), flush=True)
            execute(store, op, model)
            apply(model, op)
            print(json.dumps({"ack": seq}), flush=True)
            seq += 1


@dataclass
class CrashReport:
    """What a crash run found: kills, what was committed, what each kill interrupted."""

    kills: int = 0
    signals: Counter = field(default_factory=Counter)  # kills by signal
    killed_during: Counter = field(default_factory=Counter)  # kills by operation
    ops_committed: int = 0
    in_flight_committed: int = 0
    in_flight_lost: int = 0
    repeated: int = 0  # signals sent again to a writer that kept going
    garbage_collected: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return sum(1 for f in self.failures if "lost" in f)

    def to_dict(self) -> dict[str, Any]:
        return {"kills": self.kills, "ops_committed": self.ops_committed,
                "in_flight_committed": self.in_flight_committed,
                "in_flight_rolled_back": self.in_flight_lost,
                "killed_during": dict(self.killed_during), "signals": dict(self.signals),
                "signals_repeated": self.repeated,
                "garbage_items_collected": self.garbage_collected,
                "failures": self.failures}


STOP_TRIES = 60


def wait_stopped(proc: subprocess.Popen, sig: int) -> tuple[str, str, int]:
    """Wait for a process sent ``sig`` to end; returns (the rest of its stdout, its
    stderr, how often the signal was sent again). Python drops a KeyboardInterrupt
    raised inside a finaliser ("Exception ignored in ..."), so, like a user, this presses
    Ctrl-C again while the process keeps going; after STOP_TRIES it is killed."""
    for repeated in range(STOP_TRIES):
        try:
            rest, err = proc.communicate(timeout=2)
            return rest, err, repeated
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
    proc.kill()
    rest, err = proc.communicate()
    return rest, err, STOP_TRIES


def _stopped_by(sig: int, returncode: int, err: str) -> bool:
    """Whether a writer ended the way ``sig`` ends a Python program with default
    handlers: SIGINT raises KeyboardInterrupt (exit status 1 after the traceback)."""
    if sig == signal.SIGINT:
        return returncode == -sig or (returncode == 1 and "KeyboardInterrupt" in err)
    return returncode == -sig


def crash_test(path: str | os.PathLike[str], kills: int, *, seed: int = 0,
               max_ops_before_kill: int = 6, max_delay_s: float = 0.05,
               signals: tuple[int, ...] = (signal.SIGKILL,),
               progress: Progress | None = None, url: str | None = None,
               workdir: str | os.PathLike[str] | None = None) -> CrashReport:
    """Run ``kills`` writer processes into ``path``, each stopped at a random moment by
    a signal drawn from ``signals`` (SIGKILL, SIGTERM, SIGINT). ``url``: the catalogue
    (default: the store's own SQLite file). For a store on object storage each writer
    runs as a host of its own under ``workdir`` (its working directory and chunk cache)."""
    path = str(path)
    work = Path(workdir) if workdir is not None else None
    rng = random.Random(seed)
    report = CrashReport()
    model: Model = {}
    open_store(path, url=url).close()
    for k in range(kills):
        host = _host_dir(work, path, k)
        env = _child_env(url, host)
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from tdstore.dev.harness import writer_main; "
             "writer_main(sys.argv[1], int(sys.argv[2]))", path, str(rng.randrange(1 << 30))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=host)
        target = rng.randint(1, max_ops_before_kill)
        sig = signals[0]
        begun: dict[int, dict] = {}
        acked: list[int] = []
        lines = []
        assert proc.stdout is not None  # started with stdout=PIPE
        while True:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            msg = json.loads(line)
            if "begin" in msg:
                begun[msg["begin"]["seq"]] = msg["begin"]
                if len(begun) == target:
                    time.sleep(rng.uniform(0, max_delay_s))
                    sig = rng.choice(signals)
                    proc.send_signal(sig)
                    break
            else:
                acked.append(msg["ack"])
        rest, err, repeated = wait_stopped(proc, sig)
        report.repeated += repeated
        if repeated == STOP_TRIES:
            report.failures.append(f"kill {k}: the writer did not stop after "
                                   f"{STOP_TRIES} {signal.Signals(sig).name}s")
            break
        for line in rest.splitlines():
            msg = json.loads(line)
            if "ack" in msg:
                acked.append(msg["ack"])
            elif "begin" in msg:
                begun[msg["begin"]["seq"]] = msg["begin"]
        if not _stopped_by(sig, proc.returncode, err):
            report.failures.append(f"kill {k}: writer exited {proc.returncode} after "
                                   f"{signal.Signals(sig).name}: {err[-2000:]}")
            break
        report.kills += 1
        report.signals[signal.Signals(sig).name] += 1
        for seq in sorted(acked):
            apply(model, begun[seq])
            report.ops_committed += 1
        flight = [begun[s] for s in sorted(begun) if s not in acked]
        if flight:
            report.killed_during[flight[0]["op"]] += 1
        problem = _check_after_kill(path, model, flight, report, url)
        if problem:
            report.failures.append(f"kill {k}: {problem}")
            break
        if progress:
            progress(k + 1, kills, f"{report.ops_committed} ops committed")
    return report


def _check_after_kill(path: str, model: Model, flight: list[dict], report: CrashReport,
                      url: str | None = None) -> str | None:
    with open_store(path, url=url) as store:
        v = store.verify()
        if v.damage:
            return "verify found damage: " + "; ".join(map(str, v.damage))
        report.garbage_collected += len(store.gc().removed)
        if not store.verify().ok:
            return "garbage left after gc"
        state = read_state(store)
    if same(state, model):
        if flight:
            report.in_flight_lost += 1
        return None
    for op in flight:
        after = {g: dict(a) for g, a in model.items()}
        apply(after, op)
        if same(state, after):
            apply(model, op)
            report.in_flight_committed += 1
            return None
    return (f"state is neither the acknowledged one nor it plus the op in flight "
            f"({flight}); lost or half-visible. store {describe(state)}, "
            f"model {describe(model)}")


# --------------------------------------------------------------------------- concurrency


def _versioned(owner: int, agent: int, version: int, base: np.ndarray) -> np.ndarray:
    """A mirror's content for (owner, agent, version): the base with 4 blocks replaced,
    the first value of its first replaced block tagging the version."""
    data = base.copy()
    rng = np.random.default_rng([owner, agent, version])
    blocks = np.sort(rng.choice(len(base), 4, replace=False))
    data[blocks] = gen(hash((owner, agent, version)) & 0xFFFFFFF, 4)
    return data


SHARED = {"shared": None, "shared-z": "zstd"}  # groups every thread writes and reads
VOLATILE = "volatile"  # deleted and re-created while others use it


def _worker(path: str, proc_id: int, threads: int, ops: int, out: str) -> None:
    """One process of the concurrency test (run in a subprocess): each thread runs
    ``ops`` operations (a fixed count, so the test does not depend on machine speed)."""
    from tdstore.core.errors import NoMasterError, NotFoundError

    base = gen(7, 32)
    log: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def check(where: str, target: str, got: np.ndarray) -> None:
        o, a = (int(x) for x in target[1:].split("-"))
        if not any(got.tobytes() == _versioned(o, a, ver, base).tobytes()
                   for ver in range(1, ops + 2)):
            errors.append(f"{where}/{target}: read a value never written")

    def thread_main(tid: int) -> None:
        owner = proc_id * 100 + tid
        rng = random.Random(owner)
        own = f"own-{owner}"
        versions: dict[tuple[str, int], int] = {}
        with open_store(path, url=_child_url()) as store:
            groups = {name: store.group(name, diff_threshold=0.0, compressor=comp)
                      for name, comp in SHARED.items()}
            groups[own] = store.group(own, diff_threshold=0.0)
            groups[own].register_master("m", base)
            for _ in range(ops):
                where = rng.choice([*SHARED, own, VOLATILE])
                agent = rng.randrange(3)
                name = f"w{owner}-{agent}"
                r = rng.random()
                entry: dict[str, Any] = {"group": where, "t0": time.monotonic()}
                try:
                    if where == VOLATILE and r < 0.08:
                        store.delete_group(VOLATILE)
                        entry["deleted_group"] = True
                    elif where == VOLATILE and r < 0.2:
                        store.group(VOLATILE, diff_threshold=0.0).register_master("m", base)
                        entry["master"] = True
                    elif r < 0.05 and where != VOLATILE:
                        # replace the master: every mirror is re-derived against it and
                        # must still reconstruct to its own values
                        g = groups[where]
                        g.register_master("m", gen(rng.randrange(1 << 20), 32))
                        entry["master"] = True
                    elif r < 0.5:
                        g = store.group(where, create=False) if where == VOLATILE \
                            else groups[where]
                        v = versions.get((where, agent), 0) + 1
                        g.register_mirror(name, _versioned(owner, agent, v, base))
                        versions[(where, agent)] = v
                        entry |= {"agent": name, "owner": owner, "idx": agent, "version": v}
                    elif r < 0.6:
                        if (where, agent) not in versions:
                            continue
                        g = store.group(where, create=False) if where == VOLATILE \
                            else groups[where]
                        g.delete(name)
                        versions.pop((where, agent))
                        entry |= {"agent": name, "deleted": True}
                    else:
                        g = store.group(where, create=False) if where == VOLATILE \
                            else groups[where]
                        names = [a for a in g.agents() if a != "m"]
                        if not names:
                            continue
                        target = rng.choice(names)
                        check(where, target, g.reconstruct(target))
                        entry["read"] = target
                except (NotFoundError, NoMasterError) as exc:
                    # the agent or the volatile group was deleted meanwhile (or re-created
                    # without its master yet): a correct answer, not an error
                    if where != VOLATILE and not isinstance(exc, NotFoundError):
                        with lock:
                            errors.append(f"{type(exc).__name__}: {exc}")
                    if where == VOLATILE:
                        versions = {k: v for k, v in versions.items() if k[0] != VOLATILE}
                    entry["missed"] = True
                except Exception as exc:  # every error is a finding
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                entry["t1"] = time.monotonic()
                with lock:
                    log.append(entry)

    ts = [threading.Thread(target=thread_main, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    Path(out).write_text(json.dumps({"log": log, "errors": errors}))


def concurrency_test(path: str | os.PathLike[str], *, processes: int = 4, threads: int = 2,
                     ops: int = 200, url: str | None = None,
                     workdir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Run the concurrency test (each thread runs ``ops`` operations); returns counts
    and every error seen.

    Groups ``shared`` (raw) and ``shared-z`` (zstd) are written by every thread, each
    thread also has a group of its own, and the group ``volatile`` is deleted and
    re-created while others write and read it. Masters are replaced now and then (every
    mirror is re-derived). Every value read must be a version its writer wrote; in the
    end each agent of the stable groups must hold exactly its last acknowledged version
    (or be absent after an acknowledged delete), and each agent of ``volatile`` one of
    its acknowledged versions.
    """
    path = str(path)
    work = Path(workdir) if workdir is not None else (
        Path(tempfile.mkdtemp(prefix="tdstore-hosts-")) if is_object_url(path)
        else Path(path).parent)
    with open_store(path, url=url) as store:
        for name, comp in SHARED.items():
            store.group(name, diff_threshold=0.0, compressor=comp).register_master(
                "m", gen(7, 32))
        store.group(VOLATILE, diff_threshold=0.0).register_master("m", gen(7, 32))
    outs = [work / f"{Path(path).name}-worker{p}.json" for p in range(processes)]
    hosts = [_host_dir(work, path, p) for p in range(processes)]
    procs = [subprocess.Popen(
        [sys.executable, "-c", "import sys; from tdstore.dev.harness import _worker; "
         "_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), "
         "sys.argv[5])", path, str(p), str(threads), str(ops), str(outs[p])],
        stderr=subprocess.PIPE, text=True, env=_child_env(url, hosts[p]), cwd=hosts[p])
        for p in range(processes)]
    errors = []
    started = time.monotonic()
    for p, proc in enumerate(procs):
        _, err = proc.communicate()
        if proc.returncode != 0:
            errors.append(f"process {p} exited {proc.returncode}: {err[-2000:]}")
    seconds = time.monotonic() - started
    expected: dict[tuple[str, str], tuple[int, int, int] | None] = {}
    volatile: dict[str, set[tuple[int, int, int]]] = {}
    counts: Counter[str] = Counter()
    for out in outs:
        if not out.exists():
            continue
        data = json.loads(out.read_text())
        errors += data["errors"]
        for e in data["log"]:
            g = e["group"]
            kind = ("missed" if e.get("missed") else "reads" if "read" in e else
                    "group_deletes" if e.get("deleted_group") else
                    "master_writes" if e.get("master") else
                    "deletes" if e.get("deleted") else "writes")
            counts[kind] += 1
            if g in SHARED:
                counts[f"ops_{'compressed' if SHARED[g] else 'raw'}"] += 1
            if kind == "writes":
                version = (e["owner"], e["idx"], e["version"])
                if g == VOLATILE:
                    volatile.setdefault(e["agent"], set()).add(version)
                else:
                    expected[(g, e["agent"])] = version
            elif kind == "deletes" and g != VOLATILE:
                expected[(g, e["agent"])] = None
        out.unlink()
    base = gen(7, 32)
    mismatches = 0
    with open_store(path, url=url) as store:
        for (group, agent), want in expected.items():
            g = store.group(group, create=False)
            if want is None:
                mismatches += agent in g
                continue
            got = g.reconstruct(agent) if agent in g else None
            if got is None or got.tobytes() != _versioned(*want, base).tobytes():
                mismatches += 1
        if VOLATILE in store:
            g = store.group(VOLATILE, create=False)
            for agent in g.agents():
                if agent == "m":
                    continue
                got = g.reconstruct(agent).tobytes()
                if not any(got == _versioned(*v, base).tobytes()
                           for v in volatile.get(agent, ())):
                    mismatches += 1
        verify = store.verify()
        verify_ok = not verify.damage
    return {"processes": processes, "threads": threads, "ops_per_thread": ops,
            "seconds": round(seconds, 1), "ops": dict(counts),
            "agents_checked": len(expected), "mismatches": mismatches,
            "verify_ok": verify_ok, "errors": errors}
