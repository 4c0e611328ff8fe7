"""Dense and sparse attention: the seed's A/B cases, GQA, and a naive reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tdstore
from tdstore.analysis.attention import SparsePattern, dense_attention, sparse_attention


def make_qkv(seq: int, heads: int, dim: int):
    """The seed's deterministic inputs (sin/cos at 0.1 scale)."""
    s = np.arange(seq)[:, None, None]
    h = np.arange(heads)[None, :, None]
    d = np.arange(dim)[None, None, :]
    q = np.sin((s * 31 + h * 7 + d).astype(np.float32)) * 0.1
    k = np.cos((s * 17 + h * 3 + d).astype(np.float32)) * 0.1
    return q.astype(np.float32), k.astype(np.float32), (k * 0.5).astype(np.float32)


def naive(q, k, v, pos, pattern: SparsePattern | None):
    """One query at a time, straight from the definition (float64)."""
    n, hkv, d = k.shape
    group = q.shape[1] // hkv
    out = np.zeros((q.shape[0], q.shape[1], v.shape[2]))
    nb = n // pattern.block_size if pattern else 0
    kl = vl = None
    if nb:
        kl = k[: nb * pattern.block_size].reshape(nb, pattern.block_size, hkv, d).mean(1)
        vl = v[: nb * pattern.block_size].reshape(nb, pattern.block_size, hkv, -1).mean(1)
    for r, i in enumerate(pos):
        if pattern is None:
            keys, lands = list(range(i + 1)), 0
        elif pattern.causal:
            keys = sorted(set(range(max(0, i - pattern.window + 1), i + 1))
                          | set(pattern.extra_keys(i)))
            lands = pattern.n_landmarks(i)
        else:
            keys = sorted(set(range(max(0, i - pattern.window + 1),
                                    min(n, i + pattern.window)))
                          | {g for g in pattern.global_tokens if g < n})
            lands = 0
        for h in range(q.shape[1]):
            kh = h // group
            ks = [k[j, kh] for j in keys] + [kl[b, kh] for b in range(lands)]
            vs = [v[j, kh] for j in keys] + [vl[b, kh] for b in range(lands)]
            s = np.array(ks, np.float64) @ q[r, h].astype(np.float64) / np.sqrt(d)
            p = np.exp(s - s.max())
            out[r, h] = (p / p.sum()) @ np.array(vs, np.float64)
    return out


def test_saturated_pattern_equals_dense_to_1e5():
    q, k, v = make_qkv(32, 4, 16)
    dense = dense_attention(q, k, v)
    sparse = sparse_attention(q, k, v, window=32, block_size=32, log_stride=False,
                              landmarks=False)
    assert np.abs(dense - sparse).max() < 1e-5


def test_seed_saturated_configuration_stays_under_1e4():
    q, k, v = make_qkv(32, 4, 16)  # window = block_size = N, strides and landmarks on
    dense = dense_attention(q, k, v)
    sparse = sparse_attention(q, k, v, window=32, block_size=32)
    assert np.abs(dense - sparse).max() < 1e-4


def test_seed_long_case_is_finite_and_plausible(capsys):
    q, k, v = make_qkv(256, 4, 16)
    dense = dense_attention(q, k, v)
    sparse = sparse_attention(q, k, v, window=16, block_size=32)
    err = np.abs(dense - sparse)
    # the sparse result is exactly the pattern's attention, computed from the definition
    # (V lies within +-0.05, so a bound on the error alone would hold for any output)
    reference = naive(q, k, v, np.arange(256), SparsePattern(window=16, block_size=32))
    assert np.abs(sparse - reference).max() < 1e-5
    with capsys.disabled():
        print(f"\ndense_vs_sparse @ N=256, window=16, block=32: max_abs_err={err.max():.6e}, "
              f"mean_abs_err={err.mean():.6e}")
    assert err.max() > 0  # the pattern really is sparse here


def test_dense_matches_the_naive_definition():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((40, h, 8)).astype(np.float32) for h in (6, 2, 2))
    pos = np.arange(40)
    np.testing.assert_allclose(dense_attention(q, k, v), naive(q, k, v, pos, None),
                               atol=2e-6)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 70), kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]),
       window=st.integers(1, 80), block=st.integers(1, 40), log_stride=st.booleans(),
       landmarks=st.booleans(), causal=st.booleans(), globals_=st.sampled_from([(), (0,), (0, 5)]),
       seed=st.integers(0, 2**16))
def test_sparse_matches_a_naive_reference_of_the_pattern(n, kv_heads, group, window, block,
                                                         log_stride, landmarks, causal,
                                                         globals_, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, kv_heads * group, 8)).astype(np.float32)
    k = rng.standard_normal((n, kv_heads, 8)).astype(np.float32)
    v = rng.standard_normal((n, kv_heads, 8)).astype(np.float32)
    got = sparse_attention(q, k, v, window=window, block_size=block, log_stride=log_stride,
                           landmarks=landmarks, global_tokens=globals_, causal=causal)
    pattern = SparsePattern(window, block, log_stride and causal, landmarks and causal,
                            globals_, causal)
    np.testing.assert_allclose(got, naive(q, k, v, np.arange(n), pattern), atol=3e-5)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 60), kv_heads=st.integers(1, 3), group=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_gqa_equals_attention_over_repeated_kv_heads(n, kv_heads, group, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, kv_heads * group, 8)).astype(np.float32)
    k = rng.standard_normal((n, kv_heads, 8)).astype(np.float32)
    v = rng.standard_normal((n, kv_heads, 8)).astype(np.float32)
    kr, vr = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    np.testing.assert_allclose(dense_attention(q, k, v), dense_attention(q, kr, vr), atol=1e-6)
    np.testing.assert_allclose(sparse_attention(q, k, v, window=5, block_size=4),
                               sparse_attention(q, kr, vr, window=5, block_size=4), atol=1e-6)


def test_query_subsets_equal_the_rows_of_the_full_computation():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((64, 2, 8)).astype(np.float32) for _ in range(3))
    pos = np.array([3, 40, 17, 63])
    for fn in (lambda **kw: dense_attention(q[kw["p"]], k, v, q_positions=kw["p"]),
               lambda **kw: sparse_attention(q[kw["p"]], k, v, window=8, block_size=8,
                                             q_positions=kw["p"])):
        full = fn(p=np.arange(64))
        np.testing.assert_allclose(fn(p=pos), full[pos], atol=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda q, k, v: dense_attention(q[0], k, v), "must be an ndarray of shape"),
    (lambda q, k, v: dense_attention(q, k[:, :1], v), "same seq and heads"),
    (lambda q, k, v: dense_attention(np.zeros((8, 3, 4), np.float32), k, v),
     "multiple of kv_heads"),
    (lambda q, k, v: dense_attention(q, k, v, q_positions=[99] * 8), "q_positions"),
    (lambda q, k, v: sparse_attention(q, k, v, window=0, block_size=4), "window"),
    (lambda q, k, v: sparse_attention(q, k, v, window=4, block_size=0), "block_size"),
])
def test_bad_attention_input_is_refused_clearly(call, message):
    q, k, v = (np.zeros((8, 2, 4), np.float32) for _ in range(3))
    with pytest.raises(tdstore.InvalidInputError, match=message):
        call(q, k, v)


@pytest.mark.parametrize("causal", [True, False])
def test_the_torch_path_computes_the_same_attention(causal):
    torch = pytest.importorskip("torch")  # installed by the test extra; optional otherwise
    rng = np.random.default_rng(4)
    q = rng.standard_normal((50, 6, 8)).astype(np.float32)
    k, v = (rng.standard_normal((50, 2, 8)).astype(np.float32) for _ in range(2))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for fn in (lambda **kw: dense_attention(q, k, v, causal=causal, **kw),
               lambda **kw: sparse_attention(q, k, v, window=7, block_size=5, causal=causal,
                                             global_tokens=(0, 3), **kw)):
        np.testing.assert_allclose(fn(backend="torch", device=device), fn(backend="numpy"),
                                   atol=2e-6)


def test_unknown_backends_are_refused():
    q = np.zeros((4, 2, 4), np.float32)
    with pytest.raises(tdstore.InvalidInputError, match="backend must be"):
        dense_attention(q, q, q, backend="jax")
