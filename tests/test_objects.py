"""Stores on S3-compatible object storage with a PostgreSQL catalogue."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import bits, kv

import tdstore


def test_smoke(s3_env, pg_url, s3_server):
    loc = f"s3://{s3_env}/p"
    with tdstore.open(loc, url=pg_url) as st:
        g = st.group("g")
        m = kv(40)
        g.register_master("a", m)
        mm = m.copy()
        mm[3] += 1
        g.register_mirror("b", mm)
        assert np.array_equal(bits(g.reconstruct("b")), bits(mm))
        g.collective_reuse_step(["a", "b"], kv(5, seed=3))
        assert st.verify().ok
        print(st.info())
    keys = sorted(s3_server.objects(s3_env))
    assert keys[0].startswith("p/data/")
