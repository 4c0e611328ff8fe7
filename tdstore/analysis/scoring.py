"""The scoring-backend protocol and a deterministic dummy differential backend.

A differential backend scores a fine-tuned adapter against its base model. It yields one
*view* at a time (base, fine-tuned, a lam-blend of both, or a seeded "null" adapter),
and each view answers scoring calls (log-probabilities, next-token distributions).
``DummyDifferentialBackend`` answers from canned data or synthesises plausible values:
deterministic, torch-free and fast, for tests and for calibrating null statistics
(``tdstore.analysis.nullstats``) without a model.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

Mode = Literal["base", "ft"]


@dataclass(frozen=True)
class TokenDist:
    """The top-k next-token distribution: ids, their log-probabilities, and the log of
    the mass outside the top k (None when nothing measurable is left)."""

    token_ids: np.ndarray  # int64[k]
    logprobs: np.ndarray  # float32[k]
    vocab_size: int
    tail_logprob: float | None = None


@dataclass(frozen=True)
class RollingLogprob:
    """Per-token log-probabilities of a text (the first token has none)."""

    token_ids: np.ndarray  # int64[N]
    logprobs: np.ndarray  # float32[N-1]
    num_tokens: int
    total_logprob: float


@runtime_checkable
class ScoringBackend(Protocol):
    id: str

    def logprob_of(self, prompt: str, completion: str) -> float: ...

    def rolling_logprob(self, text: str) -> RollingLogprob: ...

    def next_token_dist(self, prompt: str, *, top_k: int = 256) -> TokenDist: ...

    def next_token_dist_batch(self, prompts: Sequence[str], *, top_k: int = 256
                              ) -> list[TokenDist]: ...


@runtime_checkable
class DifferentialBackend(Protocol):
    def as_base(self) -> AbstractContextManager[ScoringBackend]: ...

    def as_finetuned(self) -> AbstractContextManager[ScoringBackend]: ...

    def as_scaled_adapter(self, lam: float) -> AbstractContextManager[ScoringBackend]: ...

    def as_null_adapter(self, seed: int, *, init_scale: float = 0.02,
                        rank_scale: float = 1.0) -> AbstractContextManager[ScoringBackend]: ...

    def preflight_finite_check(self) -> tuple[bool, str]: ...


def prompt_seed(prompt: str) -> int:
    """A seed from a prompt that is the same in every process (Python's ``hash(str)`` is
    salted per process, which made null views differ across restarts)."""
    return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16)


class Instrumentation:
    """An LRU of scoring calls keyed by (method, view id, input, top_k), with counters."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self.stats = {"hits": 0, "misses": 0}

    def cached(self, method: str, view_id: str, key: str, top_k: int,
               compute: Callable[[], Any]) -> Any:
        k = (method, view_id, key, top_k)
        if k in self._cache:
            self._cache.move_to_end(k)
            self.stats["hits"] += 1
            return self._cache[k]
        self.stats["misses"] += 1
        value = compute()
        self._cache[k] = value
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return value


@dataclass(slots=True)
class DummyResponses:
    """Canned data for one mode (base or ft)."""

    generations: dict[str, str] = field(default_factory=dict)
    logprobs: dict[tuple[str, str], float] = field(default_factory=dict)  # default -10.0
    rolling: dict[str, RollingLogprob] = field(default_factory=dict)
    token_dists: dict[str, TokenDist] = field(default_factory=dict)


class _DummyView:
    """A view of one mode; answers scoring calls through the shared instrumentation."""

    def __init__(self, mode: Mode, responses: DummyResponses,
                 inst: Instrumentation | None = None):
        self.id: str = mode
        self._mode: Mode = mode
        self._r = responses
        self._inst = inst if inst is not None else Instrumentation()

    def generate(self, prompt: str, *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> str:
        del max_new_tokens, temperature, top_p, seed  # canned; decoding is trivial
        try:
            return self._r.generations[prompt]
        except KeyError as exc:
            raise KeyError(
                f"dummy backend ({self._mode}): no canned generation for prompt {prompt!r}"
            ) from exc

    def close(self) -> None:
        return None

    def logprob_of(self, prompt: str, completion: str) -> float:
        return self._inst.cached("logprob_of", self.id, f"{prompt}\x00{completion}", 0,
                                 lambda: self._r.logprobs.get((prompt, completion), -10.0))

    def rolling_logprob(self, text: str) -> RollingLogprob:
        return self._inst.cached("rolling_logprob", self.id, text, 0,
                                 lambda: self._compute_rolling_logprob(text))

    def _compute_rolling_logprob(self, text: str) -> RollingLogprob:
        if text in self._r.rolling:
            return self._r.rolling[text]
        n = max(len(text.split()), 1)
        per_tok = -2.0 if self._mode == "base" else -1.5
        return RollingLogprob(token_ids=np.arange(n, dtype=np.int64),
                              logprobs=np.full(max(n - 1, 0), per_tok, dtype=np.float32),
                              num_tokens=n, total_logprob=per_tok * max(n - 1, 0))

    def next_token_dist(self, prompt: str, *, top_k: int = 256) -> TokenDist:
        return self._inst.cached("next_token_dist", self.id, prompt, top_k,
                                 lambda: self._compute_next_token_dist(prompt, top_k=top_k))

    def next_token_dist_batch(self, prompts: Sequence[str], *, top_k: int = 256
                              ) -> list[TokenDist]:
        # per prompt, so subclasses' next_token_dist semantics hold on the batched path
        return [self.next_token_dist(p, top_k=top_k) for p in prompts]

    def _compute_next_token_dist(self, prompt: str, *, top_k: int = 256) -> TokenDist:
        del top_k
        if prompt in self._r.token_dists:
            return self._r.token_dists[prompt]
        vocab, k = 1000, 8
        if self._mode == "base":  # sharp
            lp = np.array([-0.1] + [-5.0] * (k - 1), dtype=np.float32)
        else:  # broad, with a tiny slope so it does not look like a broken lm_head
            lp = np.full(k, -math.log(k), dtype=np.float32)
            lp += np.linspace(-1e-4, 1e-4, k, dtype=np.float32)
        residual = 1.0 - float(np.exp(lp).sum())
        tail = math.log(residual) if residual > 1e-12 else None
        return TokenDist(token_ids=np.arange(k, dtype=np.int64), logprobs=lp,
                         vocab_size=vocab, tail_logprob=tail)


class _NullView(_DummyView):
    """The base distribution perturbed by seeded noise, as a random adapter of scale
    ``init_scale`` would; ``rank_scale`` multiplies the noise variance (std by its
    square root). Seeded from a stable hash of the prompt."""

    def __init__(self, base: DummyResponses, seed: int, init_scale: float,
                 rank_scale: float = 1.0):
        super().__init__("base", base)
        self._seed, self._init_scale, self._rank_scale = seed, init_scale, rank_scale

    def next_token_dist(self, prompt: str, *, top_k: int = 256) -> TokenDist:
        base = super().next_token_dist(prompt, top_k=top_k)
        rng = np.random.default_rng(self._seed + prompt_seed(prompt) % 1_000_003)
        scale = self._init_scale * math.sqrt(self._rank_scale)
        lp = base.logprobs + rng.normal(0.0, scale, size=base.logprobs.shape).astype(np.float32)
        probs = np.exp(lp - lp.max())
        probs /= probs.sum()
        return TokenDist(token_ids=base.token_ids, logprobs=np.log(probs).astype(np.float32),
                         vocab_size=base.vocab_size, tail_logprob=base.tail_logprob)


class _InterpolatedView(_DummyView):
    """A lam-blend of base and ft (log-space for distributions); generations come from
    ft at lam >= 0.5, else base."""

    def __init__(self, base: DummyResponses, ft: DummyResponses, lam: float):
        super().__init__("ft" if lam >= 0.5 else "base", ft if lam >= 0.5 else base)
        self._base_r, self._ft_r, self._lam = base, ft, lam

    def logprob_of(self, prompt: str, completion: str) -> float:
        b = self._base_r.logprobs.get((prompt, completion), -10.0)
        f = self._ft_r.logprobs.get((prompt, completion), -10.0)
        return (1 - self._lam) * b + self._lam * f

    def next_token_dist(self, prompt: str, *, top_k: int = 256) -> TokenDist:
        b = _DummyView("base", self._base_r).next_token_dist(prompt, top_k=top_k)
        f = _DummyView("ft", self._ft_r).next_token_dist(prompt, top_k=top_k)
        lp = (1 - self._lam) * b.logprobs + self._lam * f.logprobs
        return TokenDist(token_ids=b.token_ids, logprobs=lp, vocab_size=b.vocab_size,
                         tail_logprob=b.tail_logprob)


class DummyDifferentialBackend:
    """A differential backend over canned responses; one view at a time (entering a
    second while one is active raises RuntimeError). ``_inst.stats`` counts cache hits
    and misses of scoring calls across views."""

    safe_for_concurrent_views: bool = False

    def __init__(self, *, base: DummyResponses, ft: DummyResponses, identity: str = "dummy"):
        self._base_r, self._ft_r = base, ft
        self.identity = identity  # what a null-stats key records about this backend
        self._inst = Instrumentation()
        self._base = _DummyView("base", base, inst=self._inst)
        self._ft = _DummyView("ft", ft, inst=self._inst)
        self._active: str | None = None

    @contextmanager
    def as_base(self) -> Iterator[_DummyView]:
        with self._view("base"):
            yield self._base

    @contextmanager
    def as_finetuned(self) -> Iterator[_DummyView]:
        with self._view("ft"):
            yield self._ft

    @contextmanager
    def as_scaled_adapter(self, lam: float) -> Iterator[_DummyView]:
        with self._view(f"scaled({lam})"):
            view = _InterpolatedView(self._base_r, self._ft_r, lam)
            view._inst, view.id = self._inst, f"scaled_{lam:.2f}"
            yield view

    @contextmanager
    def as_null_adapter(self, seed: int, *, init_scale: float = 0.02,
                        rank_scale: float = 1.0) -> Iterator[_DummyView]:
        if rank_scale <= 0.0 or not math.isfinite(rank_scale):
            raise ValueError(f"rank_scale must be positive and finite; got {rank_scale!r}")
        label = f"null({seed})" if rank_scale == 1.0 else f"null({seed},rank={rank_scale:.2f})"
        with self._view(label):
            view = _NullView(self._base_r, seed=seed, init_scale=init_scale,
                             rank_scale=rank_scale)
            view._inst = self._inst
            # the id keys the shared LRU, so it names everything the view depends on
            view.id = f"null_{seed}" if rank_scale == 1.0 else \
                f"null_{seed}_rank{rank_scale:.2f}"
            if init_scale != 0.02:
                view.id += f"_scale{init_scale!r}"
            yield view

    def preflight_finite_check(self) -> tuple[bool, str]:
        """One forward per view; refuses non-finite log-probabilities."""
        prompt = "preflight"
        try:
            with self.as_base() as view:
                base = view.next_token_dist(prompt, top_k=8)
            with self.as_finetuned() as view:
                ft = view.next_token_dist(prompt, top_k=8)
        except Exception as exc:  # any failure fails the preflight
            return False, f"preflight raised {type(exc).__name__}: {exc}"
        for label, dist in (("base", base), ("ft", ft)):
            bad = int((~np.isfinite(dist.logprobs)).sum())
            if bad:
                return False, (f"{label} view produced {bad}/{dist.logprobs.size} non-finite "
                               f"logprob(s) on prompt {prompt!r}")
        return True, ""

    @contextmanager
    def _view(self, mode: str) -> Iterator[None]:
        if self._active is not None:
            raise RuntimeError(
                f"DifferentialBackend view already active ({self._active!r}); "
                f"exit the current view before entering {mode!r}.")
        self._active = mode
        try:
            yield
        finally:
            self._active = None
