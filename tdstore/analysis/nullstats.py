"""A stable-hashed cache of null-adapter statistics, persisted in the store's catalogue.

A probe's raw score is calibrated against "null adapters" (random adapters of the same
scale, one per seed): ``z = (raw - mean) / std`` over the null runs. Computing the null
statistics costs many forward passes, so they are cached, keyed by a *stable* hash of
everything they depend on: the backend's identity (model id and adapter content hash,
not a path: an adapter retrained in place must miss), the calibration parameters and a
schema version. The hash is the same in every process, ``PYTHONHASHSEED`` and machine
(Python's ``hash()`` is salted per process, which once made such a cache serve stale or
missing values after a restart).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from sqlalchemy import delete, select

from tdstore.analysis.scoring import DifferentialBackend, TokenDist
from tdstore.core.errors import InvalidInputError, NotFoundError, ReadOnlyError
from tdstore.storage.catalog import NullStatsRow, now

if TYPE_CHECKING:
    from sqlalchemy import CursorResult
    from sqlalchemy.pool import PoolProxiedConnection

    from tdstore.api.store import Store

SCHEMA_VERSION = 1
STD_FLOOR = 1e-6


# --------------------------------------------------------------------------- hashing


def _canonical(obj: Any) -> Any:
    """A JSON value that encodes ``obj`` and its type unambiguously."""
    if obj is None:
        return ["n"]
    if isinstance(obj, (np.ndarray, np.generic)):  # before float: np.float64 is a float
        a = np.asarray(obj)
        if a.dtype.kind == "O":
            raise TypeError("stable_hash: cannot hash an object array")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        a = np.ascontiguousarray(a)
        return ["a", a.dtype.str, list(a.shape), hashlib.sha256(a.tobytes()).hexdigest()]
    if isinstance(obj, bool):
        return ["b", obj]
    if isinstance(obj, int):
        return ["i", str(obj)]
    if isinstance(obj, float):  # exact: float.hex round-trips every bit
        return ["f", obj.hex()]
    if isinstance(obj, str):
        return ["s", obj]
    if isinstance(obj, (bytes, bytearray)):
        return ["y", bytes(obj).hex()]
    if isinstance(obj, (list, tuple)):
        return ["l", [_canonical(x) for x in obj]]
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"stable_hash: dict keys must be str, got {type(bad[0]).__name__}")
        return ["d", [[k, _canonical(obj[k])] for k in sorted(obj)]]
    raise TypeError(f"stable_hash: cannot hash an object of type {type(obj).__name__}")


def canonical_json(obj: Any) -> str:
    return json.dumps(_canonical(obj), separators=(",", ":"), ensure_ascii=True)


def readable_json(obj: Any) -> str:
    """The key as people read it (the hash uses ``canonical_json``)."""

    def default(o: Any) -> Any:
        if isinstance(o, (np.ndarray, np.generic)):
            a = np.asarray(o)
            return f"<{a.dtype} {list(a.shape)} {_canonical(a)[3][:16]}>"
        if isinstance(o, (bytes, bytearray)):
            return f"<{len(o)} bytes {hashlib.sha256(bytes(o)).hexdigest()[:16]}>"
        return repr(o)

    return json.dumps(obj, sort_keys=True, ensure_ascii=False, default=default)


def stable_hash(obj: Any) -> str:
    """sha256 hex of a canonical encoding of ``obj``: str, bytes, int, float (exact),
    bool, None, lists/tuples, dicts with str keys (order-free), numpy scalars and
    arrays (dtype, shape, bytes). Anything else raises TypeError naming its type."""
    return hashlib.sha256(canonical_json(obj).encode("ascii")).hexdigest()


# --------------------------------------------------------------------------- the cache


def _entry_ok(e: Any) -> bool:
    """One probe kind's statistics: finite ``mean``, ``std``, ``n``, bool ``degenerate``."""
    return (isinstance(e, dict) and {"mean", "std", "n", "degenerate"} <= set(e)
            and all(isinstance(e[k], (int, float)) and not isinstance(e[k], bool)
                    and math.isfinite(e[k]) for k in ("mean", "std", "n"))
            and isinstance(e["degenerate"], bool))


def _table_ok(t: Any) -> bool:
    return isinstance(t, dict) and all(isinstance(k, str) and _entry_ok(v)
                                       for k, v in t.items())


def is_plain(stats: Any) -> bool:
    """Whether ``stats`` is the plain per-kind mapping ``{kind: {mean, std, n,
    degenerate}}`` (rather than ``{"kinds": {...}, "by_rank": {...}}``)."""
    return isinstance(stats, dict) and bool(stats) and _table_ok(stats)


def _check_stats(stats: Any) -> dict[str, Any]:
    """Stats are the plain per-kind mapping ``{kind: {mean, std, n, degenerate}}``, or
    ``{"kinds": {kind: {...}}, "by_rank": {multiplier: {kind: {...}}}}`` (what
    :func:`calibrate` returns); both are stored as given."""
    if is_plain(stats):
        return dict(stats)
    if not (isinstance(stats, dict) and set(stats) <= {"kinds", "by_rank"}
            and _table_ok(stats.get("kinds"))
            and isinstance(stats.get("by_rank") or {}, dict)
            and all(_table_ok(t) for t in (stats.get("by_rank") or {}).values())):
        raise InvalidInputError(
            "null stats must be {kind: {'mean', 'std', 'n', 'degenerate'}} or "
            "{'kinds': {kind: {...}}, 'by_rank': {multiplier: {kind: {...}}}}, with finite "
            f"numbers for mean, std and n and a bool for degenerate; got {str(stats)[:120]}")
    return stats


class NullStatsCache:
    """Null statistics in the store's catalogue: shared by every process that opens it,
    kept across restarts. Hits read one row over a per-thread connection."""

    def __init__(self, store: Store):
        self.store = store
        self._local = threading.local()

    def _check_writable(self) -> None:
        if self.store.readonly:
            raise ReadOnlyError(f"store {self.store.path} is open read-only")

    def _raw(self) -> PoolProxiedConnection:
        """A DBAPI connection from the engine's pool, one per thread and process."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.conn = self.store.catalog.engine.raw_connection()
            local.pid = os.getpid()
        return local.conn

    def _read(self, key_hash: str) -> tuple[int, str] | None:
        engine = self.store.catalog.engine
        if engine.dialect.name == "sqlite":
            cur = self._raw().cursor()
            cur.execute("SELECT schema_version, payload FROM null_stats WHERE key_hash = ?",
                        (key_hash,))
            return cur.fetchone()
        with self.store.catalog.read() as s:
            row = s.get(NullStatsRow, key_hash)
            return None if row is None else (row.schema_version, row.payload)

    def get(self, key: Any) -> dict[str, Any] | None:
        """The stats cached under ``key``, or None. An entry of another schema version
        or one that cannot be read counts as missing, never as an error."""
        row = self._read(stable_hash(key))
        if row is None or row[0] != SCHEMA_VERSION:
            return None
        try:
            stats = json.loads(row[1])
        except ValueError:
            return None
        # put() validated every entry; a hit checks the shape only (a full check would
        # double its cost), and zscore names any kind that is missing
        if not (isinstance(stats, dict) and (isinstance(stats.get("kinds"), dict)
                                              or is_plain(stats))):
            return None
        return stats

    def put(self, key: Any, stats: dict[str, Any]) -> str:
        """Store ``stats`` under ``key`` (one transaction); returns the key hash."""
        self._check_writable()
        payload = json.dumps(_check_stats(stats), sort_keys=True, allow_nan=False)
        key_hash, key_json = stable_hash(key), readable_json(key)
        with self.store.catalog.write() as s:
            s.merge(NullStatsRow(key_hash=key_hash, key_json=key_json,
                                 schema_version=SCHEMA_VERSION, payload=payload,
                                 created_at=now()))
        return key_hash

    def get_or_compute(self, key: Any, compute: Callable[[], dict[str, Any]]
                       ) -> dict[str, Any]:
        """The cached stats, or ``compute()`` stored under ``key``. Processes racing on
        one key each store a complete entry; one of them remains."""
        found = self.get(key)
        if found is not None:
            return found
        stats = compute()
        self.put(key, stats)
        return stats

    def _resolve(self, key_or_hash: Any) -> str:
        if isinstance(key_or_hash, str) and 4 <= len(key_or_hash) <= 64 and all(
                c in "0123456789abcdef" for c in key_or_hash):
            with self.store.catalog.read() as s:
                hits = list(s.scalars(select(NullStatsRow.key_hash).where(
                    NullStatsRow.key_hash.startswith(key_or_hash))))
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise InvalidInputError(f"key hash prefix {key_or_hash!r} matches "
                                        f"{len(hits)} entries; give more digits")
        return stable_hash(key_or_hash)

    def delete(self, key_or_hash: Any) -> bool:
        """Remove one entry (by key, or by key hash or a unique prefix of it)."""
        self._check_writable()
        key_hash = self._resolve(key_or_hash)
        with self.store.catalog.write() as s:
            # a DML statement executes to a CursorResult (Session.execute is typed Result)
            result = cast("CursorResult[Any]", s.execute(
                delete(NullStatsRow).where(NullStatsRow.key_hash == key_hash)))
            return result.rowcount > 0

    def clear(self) -> int:
        self._check_writable()
        with self.store.catalog.write() as s:
            return cast("CursorResult[Any]", s.execute(delete(NullStatsRow))).rowcount

    def keys(self) -> list[dict[str, Any]]:
        """Every entry: hash, its key (as readable JSON), schema version, creation time."""
        with self.store.catalog.read() as s:
            rows = s.scalars(select(NullStatsRow).order_by(NullStatsRow.created_at))
            return [{"key_hash": r.key_hash, "key": r.key_json,
                     "schema_version": r.schema_version, "created_at": r.created_at}
                    for r in rows]

    def show(self, key_or_hash: Any) -> dict[str, Any]:
        key_hash = self._resolve(key_or_hash)
        with self.store.catalog.read() as s:
            row = s.get(NullStatsRow, key_hash)
        if row is None:
            raise NotFoundError(f"no null stats under {str(key_or_hash)[:70]!r}")
        try:
            stats = json.loads(row.payload)
        except ValueError:
            stats = None
        return {"key_hash": row.key_hash, "key": row.key_json,
                "schema_version": row.schema_version, "created_at": row.created_at,
                "stats": stats}


# --------------------------------------------------------------------------- calibration


def _aligned(p: TokenDist, q: TokenDist) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of two top-k distributions over their common tokens, renormalised."""
    common, ip, iq = np.intersect1d(p.token_ids, q.token_ids, return_indices=True)
    if common.size == 0:
        raise InvalidInputError("the two distributions share no token")
    a = np.exp(p.logprobs[ip].astype(np.float64))
    b = np.exp(q.logprobs[iq].astype(np.float64))
    return a / a.sum(), b / b.sum()


def kl(p: TokenDist, q: TokenDist) -> float:
    """KL(p || q) in nats over the tokens both distributions list."""
    a, b = _aligned(p, q)
    return float(np.sum(a * (np.log(a) - np.log(np.maximum(b, 1e-300)))))


def js(p: TokenDist, q: TokenDist) -> float:
    """Jensen-Shannon divergence in nats."""
    a, b = _aligned(p, q)
    m = (a + b) / 2
    return float(0.5 * np.sum(a * np.log(a / m)) + 0.5 * np.sum(b * np.log(b / m)))


PROBES: dict[str, Callable[[TokenDist, TokenDist], float]] = {"kl": kl, "js": js}


def summarise(values: Sequence[float]) -> dict[str, Any]:
    """mean, population std (floored at 1e-6), n, and whether they are degenerate (one
    run, or all runs equal)."""
    v = np.asarray(values, dtype=np.float64)
    degenerate = v.size < 2 or bool(np.all(v == v[0]))
    return {"mean": float(v.mean()), "std": max(float(v.std()), STD_FLOOR), "n": int(v.size),
            "degenerate": degenerate}


def calibration_key(identity: Any, prompts: Sequence[str], *, kinds: Sequence[str],
                    runs: int, seed_base: int, init_scale: float, top_k: int,
                    rank_multipliers: Sequence[float]) -> dict[str, Any]:
    return {"schema": SCHEMA_VERSION, "backend": identity, "prompts": stable_hash(list(prompts)),
            "kinds": sorted(kinds), "runs": runs, "seed_base": seed_base,
            "init_scale": float(init_scale), "top_k": top_k,
            "rank_multipliers": [float(m) for m in rank_multipliers]}


def calibrate(backend: DifferentialBackend, prompts: Sequence[str], *,
              kinds: Sequence[str] = ("kl",),
              runs: int = 3, seed_base: int = 1000, init_scale: float = 0.02,
              rank_multipliers: Sequence[float] = (1.0,), top_k: int = 256,
              cache: NullStatsCache | None = None, identity: Any = None) -> dict[str, Any]:
    """Null statistics of each probe kind over ``runs`` null adapters (seeds
    ``seed_base``..) per rank multiplier. With ``cache``, a hit computes nothing.

    ``identity`` names the backend in the cache key (default: ``backend.identity``):
    give the model id and the adapter's content hash, not a path.
    """
    unknown = [k for k in kinds if k not in PROBES]
    if unknown or not kinds:
        raise InvalidInputError(f"probe kinds {unknown or kinds} unknown; expected some of "
                                f"{sorted(PROBES)}")
    if runs < 1:
        raise InvalidInputError(f"runs must be >= 1, got {runs}")
    if identity is None:
        identity = getattr(backend, "identity", None)
        if identity is None:
            raise InvalidInputError("the backend has no .identity: pass identity= (model id "
                                    "and adapter content hash)")

    def compute() -> dict[str, Any]:
        with backend.as_base() as view:
            base = view.next_token_dist_batch(list(prompts), top_k=top_k)
        by_rank: dict[str, dict[str, Any]] = {}
        for mult in rank_multipliers:
            values: dict[str, list[float]] = {k: [] for k in kinds}
            for run in range(runs):
                with backend.as_null_adapter(seed_base + run, init_scale=init_scale,
                                             rank_scale=mult) as view:
                    null = view.next_token_dist_batch(list(prompts), top_k=top_k)
                for k in kinds:
                    values[k].append(float(np.mean([PROBES[k](b, n) for b, n in
                                                    zip(base, null, strict=True)])))
            by_rank[repr(float(mult))] = {k: summarise(v) for k, v in values.items()}
        first = by_rank[repr(float(rank_multipliers[0]))]
        return {"kinds": first, "by_rank": by_rank}

    if cache is None:
        return compute()
    key = calibration_key(identity, prompts, kinds=kinds, runs=runs, seed_base=seed_base,
                          init_scale=init_scale, top_k=top_k,
                          rank_multipliers=rank_multipliers)
    return cache.get_or_compute(key, compute)


def zscore(raw: float, stats: dict[str, Any], kind: str = "kl",
           rank_multiplier: float | None = None) -> float:
    """``(raw - mean) / std`` against the null statistics of ``kind`` (either shape)."""
    if is_plain(stats):
        if rank_multiplier is not None:
            raise NotFoundError("these null stats are a plain per-kind mapping: they hold no "
                                "per-rank statistics")
        table = stats
    else:
        table = stats["kinds"] if rank_multiplier is None else \
            stats["by_rank"][repr(float(rank_multiplier))]
    if kind not in table:
        raise NotFoundError(f"null stats hold no probe kind {kind!r}; they hold {sorted(table)}")
    entry = table[kind]
    return (raw - entry["mean"]) / entry["std"]
