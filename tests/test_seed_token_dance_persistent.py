"""The seed's tests again, each TokenDanceStorage backed by a persistent store on every
backend (local+SQLite, local+PostgreSQL, S3+PostgreSQL)."""

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
def persistent_storage(backend, monkeypatch):
    counter = itertools.count()
    made = []

    def factory(*args, **kwargs):
        name = f"s{next(counter)}"
        s = tdstore.TokenDanceStorage(*args, path=backend.location(name),
                                      url=backend.url(name), **kwargs)
        made.append((name, s))
        return s

    monkeypatch.setattr(seed, "TokenDanceStorage", factory)
    yield
    assert made, "the seed test did not create a store"
    for name, s in made:  # every store the test wrote opens again in the state it left
        again = tdstore.TokenDanceStorage(s.diff_threshold, path=backend.location(name),
                                          url=backend.url(name))
        assert again.stats() == s.stats()
        s.close()
        again.close()
