"""Dense and sparse attention with grouped-query heads, in numpy (float32 math).

Layout is ``(seq, heads, head_dim)``. Queries may have more heads than keys and values
(grouped-query attention): query head ``h`` reads kv head ``h // (q_heads // kv_heads)``.
Queries sit at key positions ``q_positions`` (default: the last ``len(q)`` positions).

The sparse pattern of a query at position ``i`` (causal):

- its local window: keys ``i-window+1 .. i``;
- the global tokens (default: position 0);
- log-stride positions ``i-1, i-2, i-4, ...``;
- one landmark (mean key, mean value) per completed block of ``block_size`` keys.

Keys reached twice are counted once: strides and globals inside the window are the window's;
landmarks cover only blocks that lie entirely before the window. So with ``window >= N``
the pattern *is* dense attention and the two agree to float32 rounding.

Both functions work in tiles of queries, so memory stays bounded (nothing of size
N x N is ever held); see ``TILE_BYTES``.

``backend="auto"`` (the default) runs on a GPU through torch when the caller has imported
torch and CUDA is available, else in numpy; ``backend="numpy"`` or ``"torch"`` (with ``device``)
choose. The same code runs on both, through the small ``_Ops`` layer below.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tdstore.core.errors import InvalidInputError

# Score tiles are kept near this size (float32 bytes) to bound memory.
TILE_BYTES = 32 << 20


def _check(q: np.ndarray, k: np.ndarray, v: np.ndarray,
           q_positions: Sequence[int] | np.ndarray | None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    for name, a in (("q", q), ("k", k), ("v", v)):
        if not isinstance(a, np.ndarray) or a.ndim != 3:
            raise InvalidInputError(
                f"attention: {name} must be an ndarray of shape (seq, heads, head_dim), got "
                f"{getattr(a, 'shape', type(a).__name__)}")
    if k.shape[:2] != v.shape[:2]:
        raise InvalidInputError(
            f"attention: k {k.shape} and v {v.shape} must have the same seq and heads")
    if q.shape[2] != k.shape[2]:
        raise InvalidInputError(
            f"attention: q head_dim {q.shape[2]} must equal k head_dim {k.shape[2]}")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv:
        raise InvalidInputError(
            f"attention: q_heads {hq} must be a multiple of kv_heads {hkv}")
    n = k.shape[0]
    if q_positions is None:
        if q.shape[0] > n:
            raise InvalidInputError(f"attention: {q.shape[0]} queries but only {n} keys")
        pos: np.ndarray = np.arange(n - q.shape[0], n, dtype=np.int64)
    else:
        pos = np.asarray(q_positions, dtype=np.int64)
        if pos.shape != (q.shape[0],) or (pos.size and (pos.min() < 0 or pos.max() >= n)):
            raise InvalidInputError(
                f"attention: q_positions must be {q.shape[0]} positions in 0..{n - 1}")
    f32 = np.float32
    return (q.astype(f32, copy=False), k.astype(f32, copy=False), v.astype(f32, copy=False),
            pos, hq // hkv)


class _Ops:
    """The array operations the kernels use, for numpy (this class) and torch."""

    name = "numpy"

    def array(self, a: np.ndarray) -> Any:
        return a

    def index(self, i: np.ndarray) -> Any:
        return i

    def perm(self, a: Any, axes: tuple[int, ...]) -> Any:
        return a.transpose(axes)

    def fill_(self, a: Any, mask: np.ndarray, value: float) -> None:
        a[..., mask] = value

    def softmax_(self, s: Any) -> Any:
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        return s

    def cat(self, parts: list) -> Any:
        return np.concatenate(parts, axis=-1)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return np.zeros(shape, np.float32)

    def mean(self, a: Any, axis: int) -> Any:
        return a.mean(axis=axis)

    def numpy(self, a: Any) -> np.ndarray:
        return a


class _TorchOps(_Ops):
    name = "torch"

    def __init__(self, device: Any):
        import torch

        self.torch = torch
        self.device = torch.device(device)

    def array(self, a: np.ndarray) -> Any:
        return self.torch.as_tensor(a, device=self.device)

    def index(self, i: np.ndarray) -> Any:
        return self.torch.as_tensor(i, device=self.device)

    def perm(self, a: Any, axes: tuple[int, ...]) -> Any:
        return a.permute(*axes)

    def fill_(self, a: Any, mask: np.ndarray, value: float) -> None:
        a.masked_fill_(self.torch.as_tensor(mask, device=self.device), value)

    def softmax_(self, s: Any) -> Any:
        return self.torch.softmax(s, dim=-1)

    def cat(self, parts: list) -> Any:
        return self.torch.cat(parts, dim=-1)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return self.torch.zeros(shape, dtype=self.torch.float32, device=self.device)

    def mean(self, a: Any, axis: int) -> Any:
        return a.mean(dim=axis)

    def numpy(self, a: Any) -> np.ndarray:
        return a.cpu().numpy()


def _cuda_available() -> bool:
    """CUDA through torch, asked only of a torch the caller has imported already (so
    numpy users never pay for importing it)."""
    torch = sys.modules.get("torch")
    return torch is not None and _torch_has_cuda(torch)


@functools.lru_cache(maxsize=1)
def _torch_has_cuda(torch: Any) -> bool:
    return bool(torch.cuda.is_available())


def _ops(backend: str, device: Any) -> _Ops:
    if backend == "auto":
        backend = "torch" if device is not None or _cuda_available() else "numpy"
    if backend == "numpy":
        return _Ops()
    if backend == "torch":
        if importlib.util.find_spec("torch") is None:
            raise InvalidInputError("attention: backend 'torch' needs torch installed")
        return _TorchOps(device or ("cuda" if _cuda_available() else "cpu"))
    raise InvalidInputError(f"attention: backend must be 'auto', 'numpy' or 'torch', "
                            f"got {backend!r}")


def _grouped(ops: _Ops, q: Any, hkv: int, group: int) -> Any:
    """(T, Hq, D) -> (Hkv, G, T, D)."""
    t, _, d = q.shape
    return ops.perm(q.reshape(t, hkv, group, d), (1, 2, 0, 3))


def _ungrouped(ops: _Ops, o: Any) -> Any:
    """(Hkv, G, T, D) -> (T, Hq, D)."""
    hkv, g, t, d = o.shape
    return ops.perm(o, (2, 0, 1, 3)).reshape(t, hkv * g, d)


def _tile(n_queries: int, heads: int, width: int) -> int:
    return max(1, min(n_queries, TILE_BYTES // max(1, 4 * heads * max(1, width))))


def dense_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool = True,
                    q_positions: Sequence[int] | np.ndarray | None = None,
                    scale: float | None = None,
                    return_probs_for: Callable[[int, int, np.ndarray], object] | None = None,
                    backend: str = "auto", device: Any = None) -> np.ndarray:
    """Softmax attention of every query over every (causal) key. Returns float32
    ``(n_queries, q_heads, head_dim)``."""
    q, k, v, pos, group = _check(q, k, v, q_positions)
    ops = _ops(backend, device)
    n, hkv, d = k.shape
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    qx, kt, vt = ops.array(q), ops.perm(ops.array(k), (1, 2, 0)), ops.perm(ops.array(v),
                                                                              (1, 0, 2))
    out = np.empty((q.shape[0], q.shape[1], v.shape[2]), np.float32)
    step = _tile(q.shape[0], q.shape[1], n)
    for a in range(0, q.shape[0], step):
        b = min(q.shape[0], a + step)
        p = pos[a:b]
        width = int(p.max()) + 1 if causal else n
        s = (_grouped(ops, qx[a:b], hkv, group) @ kt[:, None, :, :width]) * float(scale)
        if causal:  # (Hkv, G, T, width)
            ops.fill_(s, np.arange(width)[None, :] > p[:, None], -np.inf)
        s = ops.softmax_(s)
        if return_probs_for is not None:
            return_probs_for(a, b, ops.numpy(s))
        out[a:b] = ops.numpy(_ungrouped(ops, s @ vt[:, None, :width]))
    return out


@dataclass(frozen=True)
class SparsePattern:
    window: int
    block_size: int
    log_stride: bool = True
    landmarks: bool = True
    global_tokens: tuple[int, ...] = (0,)
    causal: bool = True

    def extra_keys(self, i: int) -> list[int]:
        """Exact keys of query ``i`` outside its window: globals, then log-strides."""
        lo = i - self.window + 1
        keys = [g for g in self.global_tokens if g < lo and (g <= i or not self.causal)]
        if self.log_stride:
            step = 1
            while i - step >= 0:
                if i - step < lo:
                    keys.append(i - step)
                step *= 2
        return sorted(set(keys))

    def n_landmarks(self, i: int) -> int:
        """Completed blocks lying entirely before query ``i``'s window."""
        if not self.landmarks:
            return 0
        return max(0, (i - self.window + 1) // self.block_size)


def sparse_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, window: int,
                     block_size: int, log_stride: bool = True, landmarks: bool = True,
                     global_tokens: Sequence[int] = (0,), causal: bool = True,
                     q_positions: Sequence[int] | np.ndarray | None = None,
                     scale: float | None = None, backend: str = "auto",
                     device: Any = None) -> np.ndarray:
    """Attention over the sparse pattern described in the module docstring.

    Returns float32 ``(n_queries, q_heads, head_dim)``. Non-causal mode attends to the
    window on both sides and to every global token; landmarks and log-strides are causal
    notions and apply only in causal mode.
    """
    q, k, v, pos, group = _check(q, k, v, q_positions)
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise InvalidInputError(f"sparse_attention: window must be an int >= 1, got {window!r}")
    if not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise InvalidInputError(
            f"sparse_attention: block_size must be an int >= 1, got {block_size!r}")
    ops = _ops(backend, device)
    n, hkv, d = k.shape
    pattern = SparsePattern(int(window), int(block_size), bool(log_stride and causal),
                            bool(landmarks and causal), tuple(int(g) for g in global_tokens),
                            causal)
    scale = float(1.0 / np.sqrt(d) if scale is None else scale)
    n_blocks = n // pattern.block_size
    qx, kx, vx = ops.array(q), ops.array(k), ops.array(v)
    k_land = v_land = None
    if pattern.landmarks and n_blocks:
        used = n_blocks * pattern.block_size
        k_land = ops.mean(kx[:used].reshape(n_blocks, pattern.block_size, hkv, d), 1)
        v_land = ops.mean(vx[:used].reshape(n_blocks, pattern.block_size, hkv, -1), 1)
    out = np.empty((q.shape[0], q.shape[1], v.shape[2]), np.float32)
    half = pattern.window if not causal else 0  # non-causal windows look ahead too
    # a tile of about one window of queries: its band is then ~2 windows wide, so the
    # work per query stays O(window) instead of growing with the tile
    step = max(16, min(pattern.window, 256, _tile(q.shape[0], q.shape[1],
                                                      3 * pattern.window)))
    order = np.argsort(pos, kind="stable")  # tiles of nearby queries share their band
    for a in range(0, q.shape[0], step):
        sel = order[a : a + step]
        out[sel] = ops.numpy(_sparse_tile(ops, qx[ops.index(sel)], kx, vx, pos[sel], pattern,
                                          group, scale, half, k_land, v_land))
    return out


def _sparse_tile(ops: _Ops, q: Any, k: Any, v: Any, p: np.ndarray, pattern: SparsePattern,
                 group: int, scale: float, half: int, k_land: Any, v_land: Any) -> Any:
    n, hkv, d = k.shape
    t = p.size
    qg = _grouped(ops, q, hkv, group) * scale  # (Hkv, G, T, D)
    parts_s, parts_v = [], []

    # 1. the band holding every query's window: one small dense block
    lo = max(0, int(p.min()) - pattern.window + 1)
    hi = min(n, int(p.max()) + 1 + half)
    band = np.arange(lo, hi)
    s = qg @ ops.perm(k[lo:hi], (1, 2, 0))[:, None]  # (Hkv, G, T, S)
    rel = band[None, :] - p[:, None]
    inside = (rel <= 0) & (rel > -pattern.window)
    if half:
        inside |= (rel > 0) & (rel < pattern.window)
    ops.fill_(s, ~inside, -np.inf)
    parts_s.append(s)
    parts_v.append(("band", ops.perm(v[lo:hi], (1, 0, 2))[:, None]))  # (Hkv, 1, S, D)

    # 2. exact keys outside the window: globals and log-strides, masked per query
    idx, valid = _extra_keys(pattern, p, n)
    if valid.any():
        ix = ops.index(idx)
        kx = ops.perm(k[ix], (2, 0, 3, 1))  # (Hkv, T, D, M)
        sx = ops.perm(ops.perm(qg, (0, 2, 1, 3)) @ kx, (0, 2, 1, 3))  # (Hkv, G, T, M)
        ops.fill_(sx, ~valid, -np.inf)
        parts_s.append(sx)
        parts_v.append(("gather", ops.perm(v[ix], (2, 0, 1, 3))))  # (Hkv, T, M, D)

    # 3. landmarks of completed blocks entirely before the window
    if k_land is not None:
        counts = np.maximum(0, (p - pattern.window + 1) // pattern.block_size)
        nl = int(counts.max(initial=0))
        if nl:
            sl = qg @ ops.perm(k_land[:nl], (1, 2, 0))[:, None]  # (Hkv, G, T, L)
            ops.fill_(sl, np.arange(nl)[None, :] >= counts[:, None], -np.inf)
            parts_s.append(sl)
            parts_v.append(("band", ops.perm(v_land[:nl], (1, 0, 2))[:, None]))

    allp = ops.softmax_(ops.cat(parts_s))
    o = ops.zeros((hkv, group, t, v.shape[2]))
    start = 0
    for s_part, (kind, vals) in zip(parts_s, parts_v, strict=True):
        width = s_part.shape[-1]
        pr = allp[..., start : start + width]
        start += width
        if kind == "band":
            o += pr @ vals
        else:  # per-query gathered values: (Hkv, T, M, D)
            o += ops.perm(ops.perm(pr, (0, 2, 1, 3)) @ vals, (0, 2, 1, 3))
    return _ungrouped(ops, o)


def _extra_keys(pattern: SparsePattern, p: np.ndarray, n: int) -> tuple[np.ndarray,
                                                                       np.ndarray]:
    """For queries at ``p``: (T, M) key indices of globals and log-strides outside each
    window, and which of them are real (the rest is padding). Same keys as
    ``SparsePattern.extra_keys``, computed for all queries at once."""
    w = pattern.window
    cols, masks = [], []
    globals_ = np.array(pattern.global_tokens, np.int64)
    if globals_.size:
        g = np.broadcast_to(globals_, (p.size, globals_.size))
        if pattern.causal:
            ok = g < (p[:, None] - w + 1)
            if pattern.log_stride:  # a global that is also a stride position counts once
                dist = p[:, None] - g
                ok &= ~((dist >= w) & (dist & (dist - 1) == 0))
        else:
            ok = np.abs(g - p[:, None]) >= w
        ok &= (g >= 0) & (g < n)
        cols.append(g)
        masks.append(ok)
    if pattern.log_stride:
        first = max(0, int(np.ceil(np.log2(w)))) if w > 1 else 0
        offs: np.ndarray = 2 ** np.arange(first, max(first, int(n).bit_length()),
                                          dtype=np.int64)
        offs = offs[offs >= w]
        s = p[:, None] - offs[None, :]
        cols.append(s)
        masks.append(s >= 0)
    if not cols:
        return np.zeros((p.size, 0), np.int64), np.zeros((p.size, 0), bool)
    idx = np.concatenate(cols, axis=1)
    valid = np.concatenate(masks, axis=1)
    return np.where(valid, idx, 0), valid


def attended_mask(pattern: SparsePattern, positions: np.ndarray, n_keys: int) -> np.ndarray:
    """Boolean (n_queries, n_keys): the exact keys each query reaches (not landmarks)."""
    mask = np.zeros((positions.size, n_keys), bool)
    for r, i in enumerate(positions):
        i = int(i)
        lo = max(0, i - pattern.window + 1)
        hi = i + 1 if pattern.causal else min(n_keys, i + pattern.window)
        mask[r, lo:hi] = True
        if pattern.causal:
            mask[r, pattern.extra_keys(i)] = True
        else:
            mask[r, [g for g in pattern.global_tokens if g < n_keys]] = True
    return mask
