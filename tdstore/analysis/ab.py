"""Attention A/B on K/V read from a store: what sparse attention and diff thresholds cost.

Two comparisons, per layer, on an agent's stored KV cache:

(a) dense vs sparse attention on the same K/V;
(b) the agent's exact K/V vs what the store gives back under a diff threshold. The store
    cannot know the exact values of blocks a threshold already dropped, so "exact" is
    either the stored blocks (exact when the group's threshold is 0) with the threshold
    applied on the fly against the master (nothing in the store changes), or an exact
    copy given from a file, compared with the store's reconstruction.

Queries are not stored with a KV cache: they are drawn at random positions (seeded),
with the per-head scale of the keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tdstore.analysis.attention import (
    SparsePattern,
    attended_mask,
    dense_attention,
    sparse_attention,
)
from tdstore.core.diff import diff_mask
from tdstore.core.errors import InvalidInputError, NoMasterError, StateError
from tdstore.core.validate import KV_AXES as AXES
from tdstore.core.validate import check_threshold

if TYPE_CHECKING:
    from tdstore.api.store import Group

def layer_kv(blocks: np.ndarray, layout: dict[str, Any]) -> np.ndarray:
    """Blocks ``(n_blocks, *block_shape)`` -> ``(layers, 2, seq, kv_heads, head_dim)``
    float32, with seq = n_blocks x block tokens."""
    axes = list(layout["axes"])
    if blocks.ndim != len(axes) + 1:
        raise InvalidInputError(
            f"kv_layout axes {axes} do not fit blocks of shape {blocks.shape[1:]}")
    order = [0] + [1 + axes.index(a) for a in AXES]  # (n, layer, kv, token, head, dim)
    a = blocks.transpose(order)
    n, layers, kv, tokens, heads, dim = a.shape
    if kv != 2:
        raise InvalidInputError(f"kv_layout: the 'kv' axis has size {kv}, expected 2 (K, V)")
    a = a.transpose(1, 2, 0, 3, 4, 5).reshape(layers, 2, n * tokens, heads, dim)
    return a.astype(np.float32)


# --------------------------------------------------------------------------- metrics


def error_metrics(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Max/mean abs error, relative error (L2) and per-row cosine similarity of two
    attention outputs ``(queries, heads, dim)``."""
    ref = ref.astype(np.float64)
    test = test.astype(np.float64)
    diff = np.abs(ref - test)
    rows_r = ref.reshape(-1, ref.shape[-1])
    rows_t = test.reshape(-1, test.shape[-1])
    denom = np.linalg.norm(rows_r, axis=1) * np.linalg.norm(rows_t, axis=1)
    cos = np.where(denom > 0, (rows_r * rows_t).sum(axis=1) / np.where(denom > 0, denom, 1), 1.0)
    norm = np.linalg.norm(ref)
    return {
        "max_abs_err": float(diff.max(initial=0.0)),
        "mean_abs_err": float(diff.mean()) if diff.size else 0.0,
        "rel_err": float(np.linalg.norm(ref - test) / norm) if norm else 0.0,
        "cos_mean": float(cos.mean()) if cos.size else 1.0,
        "cos_min": float(cos.min(initial=1.0)),
    }


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, in nats (rows of probabilities over the same keys)."""
    p = p.astype(np.float64)
    q = np.maximum(q.astype(np.float64), 1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(np.maximum(p, 1e-30)) - np.log(q)), 0.0)
    return terms.sum(axis=-1)


def _dense_probs(q: np.ndarray, k: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Dense attention rows ``(queries, q_heads, keys)`` as float64 probabilities."""
    rows = []

    def keep(a: int, b: int, s: np.ndarray) -> None:  # (Hkv, G, T, width)
        hkv, g, t, width = s.shape
        full = np.zeros((t, hkv * g, k.shape[0]))
        full[:, :, :width] = s.transpose(2, 0, 1, 3).reshape(t, hkv * g, width)
        rows.append(full)

    dense_attention(q, k, np.zeros_like(k), q_positions=pos, return_probs_for=keep)
    return np.concatenate(rows) if rows else np.zeros((0, q.shape[1], k.shape[0]))


def _sparse_probs_projected(q: np.ndarray, k: np.ndarray, pos: np.ndarray,
                            pattern: SparsePattern) -> np.ndarray:
    """Sparse attention rows over the exact keys: a landmark's weight is spread evenly
    over the keys of its block. Computed by running sparse attention with one-hot
    values, so it is the very pattern ``sparse_attention`` uses."""
    n = k.shape[0]
    out = np.zeros((q.shape[0], q.shape[1], n))
    eye_chunk = 512
    for start in range(0, n, eye_chunk):
        stop = min(n, start + eye_chunk)
        # values: one-hot over keys start..stop, per kv head
        v = np.zeros((n, k.shape[1], stop - start), np.float32)
        v[np.arange(start, stop), :, np.arange(stop - start)] = 1.0
        out[:, :, start:stop] = sparse_attention(
            q, k, v, window=pattern.window, block_size=pattern.block_size,
            log_stride=pattern.log_stride, landmarks=pattern.landmarks,
            global_tokens=pattern.global_tokens, causal=pattern.causal, q_positions=pos)
    return out


@dataclass
class ABConfig:
    window: int = 128
    block_size: int = 64
    queries: int = 64
    seed: int = 0
    q_heads: int | None = None  # default: the kv heads (no grouping)
    log_stride: bool = True
    landmarks: bool = True

    def __post_init__(self) -> None:
        for name in ("window", "block_size", "queries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"A/B {name} must be an int >= 1, got {value!r}")
        if self.q_heads is not None and (not isinstance(self.q_heads, int)
                                         or self.q_heads < 1):
            raise InvalidInputError(f"A/B q_heads must be an int >= 1, got {self.q_heads!r}")


def _queries(kv: np.ndarray, cfg: ABConfig) -> tuple[np.ndarray, np.ndarray]:
    """Random queries at random positions (seeded), scaled like the keys."""
    _, _, seq, heads, dim = kv.shape
    q_heads = cfg.q_heads or heads
    if q_heads % heads:
        raise InvalidInputError(f"q_heads {q_heads} must be a multiple of kv_heads {heads}")
    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.queries, seq)
    pos = np.sort(rng.choice(seq, size=n, replace=False)).astype(np.int64)
    scale = float(kv[:, 0].std()) or 1.0
    q = (rng.standard_normal((n, q_heads, dim)) * scale).astype(np.float32)
    return q, pos


def _chosen_layers(n_layers: int, layers: Sequence[int] | None) -> list[int]:
    chosen = list(range(n_layers)) if not layers else list(layers)
    bad = [x for x in chosen if not 0 <= x < n_layers]
    if bad:
        raise InvalidInputError(f"layers {bad} out of range; the cache has {n_layers} layers")
    return chosen


def _layout(group: Group) -> dict[str, Any]:
    layout = group.kv_layout
    if not layout:
        raise StateError(
            f"group {group.name!r} records no kv_layout; create it with "
            "store.group(name, kv_layout={'axes': [...]}) so K and V can be found")
    return layout


def thresholded(master: np.ndarray, exact: np.ndarray, threshold: float) -> tuple[np.ndarray,
                                                                                   int]:
    """What the store would give back for ``exact`` at ``threshold``, and blocks kept."""
    keep = diff_mask(master, exact, threshold)
    out = master.copy()
    out[keep] = exact[keep]
    return out, int(keep.sum())


def compare(group: Group, agent: str, cfg: ABConfig | None = None, *,
            layers: Sequence[int] | None = None, threshold: float | None = None,
            exact: np.ndarray | None = None) -> dict[str, Any]:
    """Per-layer A/B report for ``agent``: (a) dense vs sparse attention on its K/V,
    (b) exact K/V vs the store's (see the module docstring)."""
    cfg = cfg or ABConfig()
    layout = _layout(group)
    stored = group.reconstruct(agent)
    t = group.diff_threshold if threshold is None else check_threshold(threshold, group.name)
    if exact is not None:
        if exact.shape != stored.shape or exact.dtype != stored.dtype:
            raise InvalidInputError(
                f"exact KV has shape {exact.shape} and dtype {exact.dtype}; the stored agent "
                f"has shape {stored.shape} and dtype {stored.dtype}")
        ref_blocks, approx_blocks = exact, stored
        kept = int(diff_mask(stored, exact, 0.0).sum())
        mode = "exact file vs store reconstruction"
    else:
        master_id = group.master_id
        if master_id is None:  # removed since the agent was read
            raise NoMasterError(f"group {group.name!r}: no master registered")
        master = group.reconstruct(master_id)
        ref_blocks = stored
        approx_blocks, kept = thresholded(master, stored, t)
        mode = f"stored blocks vs threshold {t:g} applied against the master"
    ref_kv, approx_kv = layer_kv(ref_blocks, layout), layer_kv(approx_blocks, layout)
    q, pos = _queries(ref_kv, cfg)
    pattern = SparsePattern(cfg.window, cfg.block_size, cfg.log_stride, cfg.landmarks)
    report_layers = []
    for layer in _chosen_layers(ref_kv.shape[0], layers):
        k, v = ref_kv[layer, 0], ref_kv[layer, 1]
        dense = dense_attention(q, k, v, q_positions=pos)
        sparse = sparse_attention(q, k, v, window=cfg.window, block_size=cfg.block_size,
                                  log_stride=cfg.log_stride, landmarks=cfg.landmarks,
                                  q_positions=pos)
        p_dense = _dense_probs(q, k, pos)
        mask = attended_mask(pattern, pos, k.shape[0])
        a = error_metrics(dense, sparse)
        a["kl"] = float(_kl(p_dense, _sparse_probs_projected(q, k, pos, pattern)).mean())
        a["mass_kept"] = float((p_dense * mask[:, None, :]).sum(axis=-1).mean())
        ka, va = approx_kv[layer, 0], approx_kv[layer, 1]
        b = error_metrics(dense, dense_attention(q, ka, va, q_positions=pos))
        b["kl"] = float(_kl(p_dense, _dense_probs(q, ka, pos)).mean())
        report_layers.append({"layer": layer, "dense_vs_sparse": a, "exact_vs_store": b})
    return {
        "group": group.name, "agent": agent, "queries": int(pos.size),
        "q_heads": int(q.shape[1]), "seq": int(ref_kv.shape[2]),
        "window": cfg.window, "block_size": cfg.block_size, "seed": cfg.seed,
        "threshold": t, "comparison_b": mode,
        "blocks": int(stored.shape[0]), "blocks_kept_at_threshold": kept,
        "layers": report_layers,
    }


def sweep(group: Group, thresholds: Sequence[float], cfg: ABConfig | None = None, *,
          layers: Sequence[int] | None = None, max_agents: int = 8,
          progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Compression ratio against attention error for each threshold, over the group's
    mirrors (the stored blocks taken as exact; the store is not changed).
    ``progress(done, total, what)`` is called before each threshold and at the end."""
    cfg = cfg or ABConfig()
    layout = _layout(group)
    names = group.agents()
    if len(names) < 2:
        raise StateError(f"group {group.name!r} needs a master and at least one mirror")
    master = group.reconstruct(names[0])
    mirrors = names[1 : 1 + max_agents]
    exact = {m: group.reconstruct(m) for m in mirrors}
    master_kv = layer_kv(master, layout)
    q, pos = _queries(master_kv, cfg)
    chosen = _chosen_layers(master_kv.shape[0], layers)
    refs = {}
    for m in mirrors:
        kv = layer_kv(exact[m], layout)
        refs[m] = {layer: (dense_attention(q, kv[layer, 0], kv[layer, 1], q_positions=pos),
                           _dense_probs(q, kv[layer, 0], pos)) for layer in chosen}
    rows = []
    n = master.shape[0]
    ordered = sorted(float(x) for x in thresholds)
    for i, t in enumerate(ordered):
        if progress is not None:
            progress(i, len(ordered), f"threshold {t:g}")
        kept_total, errs, kls, maxes = 0, [], [], []
        for m in mirrors:
            approx, kept = thresholded(master, exact[m], t)
            kept_total += kept
            kv = layer_kv(approx, layout)
            for layer in chosen:
                out, probs = refs[m][layer]
                test = dense_attention(q, kv[layer, 0], kv[layer, 1], q_positions=pos)
                e = error_metrics(out, test)
                errs.append(e["rel_err"])
                maxes.append(e["max_abs_err"])
                kls.append(float(_kl(probs, _dense_probs(q, kv[layer, 0], pos)).mean()))
        agents = 1 + len(mirrors)
        rows.append({
            "threshold": t,
            "diff_blocks": kept_total,
            "compression_ratio": agents * n / (n + kept_total),
            "rel_err_mean": float(np.mean(errs)),
            "max_abs_err": float(np.max(maxes)),
            "kl_mean": float(np.mean(kls)),
        })
    if progress is not None:
        progress(len(ordered), len(ordered), "done")
    return {"group": group.name, "mirrors": mirrors, "queries": int(pos.size),
            "layers": chosen, "rows": rows}


# --------------------------------------------------------------------------- plots


def plot_compare(report: dict[str, Any], file: str) -> None:
    """Per-layer bars of (a) dense vs sparse and (b) exact vs store errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in report["layers"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    x = np.arange(len(layers))
    for ax, metric, title in ((axes[0], "mean_abs_err", "mean abs error"),
                              (axes[1], "rel_err", "relative error (L2)"),
                              (axes[2], "kl", "KL(dense || test), nats")):
        floor = 1e-12  # the two errors differ by orders of magnitude: log axes; 0 drawn here
        a = [max(r["dense_vs_sparse"][metric], floor) for r in report["layers"]]
        b = [max(r["exact_vs_store"][metric], floor) for r in report["layers"]]
        ax.bar(x - 0.2, a, 0.4, label="dense vs sparse attention")
        ax.bar(x + 0.2, b, 0.4, label=f"exact vs store (threshold {report['threshold']:g})")
        ax.set_yscale("log")
        ax.set_xticks(x, [str(v) for v in layers])
        ax.set_xlabel("layer")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"group {report['group']!r}, agent {report['agent']!r}: {report['queries']} "
                 f"queries, window {report['window']}, block {report['block_size']}")
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def plot_sweep(report: dict[str, Any], file: str) -> None:
    """Compression ratio and attention error against the diff threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    ts = [r["threshold"] for r in rows]
    positive = [t for t in ts if t > 0]
    zero_at = min(positive) / 10 if positive else 1e-6
    xs = [t if t > 0 else zero_at for t in ts]
    fig, ax1 = plt.subplots(figsize=(8, 4.5))
    ax1.plot(xs, [r["compression_ratio"] for r in rows], "o-", color="tab:blue",
             label="compression ratio")
    ax1.set_xscale("log")
    ax1.set_xlabel("diff threshold (L2 distance per block; leftmost point: 0)")
    ax1.set_ylabel("compression ratio (x)", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(xs, [r["rel_err_mean"] for r in rows], "s--", color="tab:red",
             label="attention relative error")
    ax2.set_ylabel("attention output relative error (mean)", color="tab:red")
    ax1.grid(alpha=0.3)
    fig.suptitle(f"group {report['group']!r}: space vs fidelity over {len(report['mirrors'])} "
                 f"mirrors, {report['queries']} queries")
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def parse_thresholds(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise InvalidInputError(f"thresholds must be comma-separated numbers, got {text!r}") \
            from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise InvalidInputError(f"thresholds must be finite and >= 0, got {text!r}")
    return values
