"""The seed's tests again, each TokenDanceStorage backed by a store directory on disk."""

from __future__ import annotations

import itertools

import pytest
import test_seed_token_dance as seed
from test_seed_token_dance import (  # noqa: F401  (collected here, under the fixture below)
    TestTokenDanceBasics,
    TestTokenDanceCollective,
    TestTokenDanceCompression,
    TestTokenDanceReconstruction,
    TestTokenDanceStats,
)

import tdstore


@pytest.fixture(autouse=True)
def persistent_storage(tmp_path, monkeypatch):
    counter = itertools.count()
    made = []

    def factory(*args, **kwargs):
        s = tdstore.TokenDanceStorage(*args, path=str(tmp_path / f"s{next(counter)}"), **kwargs)
        made.append(s)
        return s

    monkeypatch.setattr(seed, "TokenDanceStorage", factory)
    yield
    assert made, "the seed test did not create a store"
    for s in made:  # every store the test wrote opens again in the state it left
        again = tdstore.TokenDanceStorage(s.diff_threshold, path=str(s.group.store.path))
        assert again.stats() == s.stats()
        s.close()
        again.close()
