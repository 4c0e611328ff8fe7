"""The dummy differential backend: behaviour ported from the seed's docstrings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tdstore.analysis.scoring import (
    DifferentialBackend,
    DummyDifferentialBackend,
    DummyResponses,
    Instrumentation,
    RollingLogprob,
    ScoringBackend,
    TokenDist,
)


@pytest.fixture
def backend():
    base = DummyResponses(generations={"hi": "hello"}, logprobs={("q", "a"): -1.0})
    ft = DummyResponses(generations={"hi": "hey there"}, logprobs={("q", "a"): -0.5})
    return DummyDifferentialBackend(base=base, ft=ft)


def test_it_satisfies_the_protocols(backend):
    assert isinstance(backend, DifferentialBackend)
    with backend.as_base() as view:
        assert isinstance(view, ScoringBackend)


def test_only_one_view_at_a_time(backend):
    with backend.as_base():
        with pytest.raises(RuntimeError, match="view already active \\('base'\\)"):
            with backend.as_finetuned():
                pass
    with backend.as_finetuned() as view:  # after exiting, another view is fine
        assert view.id == "ft"
    with backend.as_null_adapter(3):
        with pytest.raises(RuntimeError, match="null\\(3\\)"):
            with backend.as_scaled_adapter(0.5):
                pass


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_rank_scale_must_be_positive_and_finite(backend, bad):
    with pytest.raises(ValueError, match="rank_scale must be positive and finite"):
        with backend.as_null_adapter(1, rank_scale=bad):
            pass
    with backend.as_base():  # a refused view leaves no view active
        pass


def test_canned_and_default_answers(backend):
    with backend.as_base() as base:
        assert base.generate("hi", max_new_tokens=5) == "hello"
        assert base.logprob_of("q", "a") == -1.0
        assert base.logprob_of("q", "other") == -10.0
        with pytest.raises(KeyError, match="no canned generation for prompt 'nope'"):
            base.generate("nope", max_new_tokens=5)
        r = base.rolling_logprob("one two three")
        assert r.num_tokens == 3 and r.total_logprob == -4.0 and r.logprobs.dtype == np.float32
    with backend.as_finetuned() as ft:
        assert ft.generate("hi", max_new_tokens=5) == "hey there"
        assert ft.rolling_logprob("one two three").total_logprob == -3.0


def test_synthesised_distributions_sharp_base_broad_ft(backend):
    with backend.as_base() as base:
        b = base.next_token_dist("x")
    with backend.as_finetuned() as ft:
        f = ft.next_token_dist("x")
    assert b.vocab_size == f.vocab_size == 1000 and b.token_ids.tolist() == list(range(8))
    assert b.logprobs[0] == np.float32(-0.1) and b.tail_logprob is not None
    assert np.exp(f.logprobs).sum() == pytest.approx(1.0, abs=1e-4)
    assert np.ptp(f.logprobs) > 1e-9  # not exactly uniform
    assert f.tail_logprob is None  # all mass within the top k


def test_canned_distributions_and_rolling_override_the_synthesised_ones():
    dist = TokenDist(np.arange(3), np.log(np.array([0.5, 0.3, 0.2], np.float32)), 3, None)
    roll = RollingLogprob(np.arange(2), np.array([-0.7], np.float32), 2, -0.7)
    be = DummyDifferentialBackend(base=DummyResponses(token_dists={"p": dist},
                                                      rolling={"t": roll}),
                                  ft=DummyResponses())
    with be.as_base() as v:
        assert v.next_token_dist("p") is dist and v.rolling_logprob("t") is roll


def test_null_views_are_seeded_deterministic_and_small(backend):
    with backend.as_base() as base:
        b = base.next_token_dist("prompt")
    with backend.as_null_adapter(42) as null:
        assert null.id == "null_42"
        n1 = null.next_token_dist("prompt")
    with backend.as_null_adapter(42) as null:
        n2 = null.next_token_dist("prompt")
    with backend.as_null_adapter(43) as null:
        n3 = null.next_token_dist("prompt")
    with backend.as_null_adapter(42, rank_scale=4.0) as null:
        assert null.id == "null_42_rank4.00"
        wide = null.next_token_dist("prompt")
    assert np.array_equal(n1.logprobs, n2.logprobs) and not np.array_equal(n1.logprobs,
                                                                           n3.logprobs)
    assert np.exp(n1.logprobs).sum() == pytest.approx(1.0, abs=1e-5)
    small = np.abs(n1.logprobs - b.logprobs).max()
    assert 0 < small < 0.2
    assert np.abs(wide.logprobs - b.logprobs).max() > small  # rank scales the noise


def test_scaled_adapter_blends_base_and_ft(backend):
    with backend.as_scaled_adapter(0.25) as v:
        assert v.id == "scaled_0.25"
        assert v.logprob_of("q", "a") == pytest.approx(0.75 * -1.0 + 0.25 * -0.5)
        assert v.generate("hi", max_new_tokens=2) == "hello"
    with backend.as_scaled_adapter(0.5) as v:
        assert v.generate("hi", max_new_tokens=2) == "hey there"


def test_batched_distributions_keep_per_prompt_semantics(backend):
    with backend.as_null_adapter(7) as v:
        batch = v.next_token_dist_batch(["a", "b"])
        single = [v.next_token_dist("a"), v.next_token_dist("b")]
    for x, y in zip(batch, single, strict=True):
        assert np.array_equal(x.logprobs, y.logprobs)


def test_scoring_calls_are_cached_per_view_with_counters(backend):
    with backend.as_base() as v:
        v.next_token_dist("p")
        v.next_token_dist("p")
        v.logprob_of("q", "a")
    with backend.as_finetuned() as v:
        v.next_token_dist("p")  # another view id: a miss
    assert backend._inst.stats == {"hits": 1, "misses": 3}
    inst = Instrumentation(capacity=2)
    for k in ("a", "b", "c", "a"):
        inst.cached("m", "v", k, 0, lambda: 1)
    assert inst.stats == {"hits": 0, "misses": 4}  # "a" was evicted by "c"


def test_preflight_passes_on_finite_data_and_fails_on_nan():
    assert DummyDifferentialBackend(base=DummyResponses(), ft=DummyResponses()
                                    ).preflight_finite_check() == (True, "")
    nan = TokenDist(np.arange(4), np.array([0, np.nan, -1, -2], np.float32), 4, None)
    bad = DummyDifferentialBackend(base=DummyResponses(),
                                   ft=DummyResponses(token_dists={"preflight": nan}))
    ok, why = bad.preflight_finite_check()
    assert not ok and "ft view produced 1/4 non-finite" in why


def test_null_views_of_another_scale_are_not_served_from_the_cache(backend):
    with backend.as_null_adapter(5) as v:
        small = v.next_token_dist("p")
    with backend.as_null_adapter(5, init_scale=0.5) as v:
        assert v.id == "null_5_scale0.5"
        large = v.next_token_dist("p")
    assert not np.array_equal(small.logprobs, large.logprobs)
