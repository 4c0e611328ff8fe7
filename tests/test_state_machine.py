"""Random operation sequences against an in-memory model holding the exact values."""

from __future__ import annotations

import shutil
import tempfile

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import tdstore
from tdstore.dev.harness import BLOCK, DTYPE, apply, execute, read_state, same

# names that must be stored exactly and never reach the file system
NAMES = st.sampled_from(["a", "b", "critic", "名前", "🤖", "x" * 300, "a..b", ".hidden", "-",
                         " lead", "tab\u00a0nbsp"])
# groups and the compressor each is (re-)created with: raw and compressed groups alike
COMPRESSORS = {"g": None, "グループ": "zstd", "with space": "blosc-lz4", "%s": None,
               "' OR 1=1 --": "zstd"}
GROUPS = st.sampled_from(sorted(COMPRESSORS))
# any string at all, lone surrogates included (hypothesis leaves them out by default)
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=24)
BAD_NAMES = st.sampled_from(["../escape", "a/b", "..", "", "   ", "nul\0", "back\\slash",
                             "\n", "x" * 2000])


class StoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="tdstore-sm-")
        self.store = tdstore.open(f"{self.dir}/s")
        self.model: dict = {}
        self.seq = 0

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.dir)

    def _do(self, op: dict) -> None:
        op["seq"] = self.seq
        self.seq += 1
        execute(self.store, op, self.model)
        apply(self.model, op)

    def _master(self, group: str) -> str | None:
        return next(iter(self.model.get(group, {})), None)

    @rule(group=GROUPS, agent=NAMES, seed=st.integers(0, 2**30), n=st.integers(0, 12))
    def register_master(self, group, agent, seed, n):
        agents = self.model.get(group, {})
        if agent == self._master(group) and len(agents) > 1:
            n = len(agents[agent])  # re-registering keeps the shape its mirrors need
        self._do({"op": "master", "group": group, "agent": agent, "seed": seed, "n": n,
                  "compressor": COMPRESSORS[group]})

    @precondition(lambda self: self.model)
    @rule(data=st.data(), agent=NAMES, seed=st.integers(0, 2**30))
    def register_mirror(self, data, agent, seed):
        group = data.draw(st.sampled_from(sorted(self.model)))
        if agent == self._master(group):
            return
        n = len(self.model[group][self._master(group)])
        blocks = sorted(data.draw(st.sets(st.integers(0, max(0, n - 1)), max_size=n))) if n \
            else []
        self._do({"op": "mirror", "group": group, "agent": agent, "seed": seed,
                  "blocks": blocks})

    @precondition(lambda self: self.model)
    @rule(data=st.data(), seed=st.integers(0, 2**30), n=st.integers(0, 5),
          named=st.lists(NAMES, max_size=3, unique=True))
    def collective_reuse_step(self, data, seed, n, named):
        group = data.draw(st.sampled_from(sorted(self.model)))
        self._do({"op": "append", "group": group, "agents": named, "seed": seed, "n": n})

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data):
        group = data.draw(st.sampled_from(sorted(self.model)))
        agents = list(self.model[group])
        victim = data.draw(st.sampled_from(agents[1:] or agents))
        self._do({"op": "delete", "group": group, "agent": victim})

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete_group(self, data):
        self._do({"op": "delete_group", "group": data.draw(st.sampled_from(sorted(self.model)))})

    @precondition(lambda self: self.model)
    @rule(data=st.data(), bad=BAD_NAMES)
    def hostile_or_malformed_input_changes_nothing(self, data, bad):
        group = data.draw(st.sampled_from(sorted(self.model)))
        g = self.store.group(group)
        master = self.model[group][self._master(group)]
        calls = [
            lambda: g.register_mirror(bad, master),
            lambda: g.register_master(bad, master),
            lambda: self.store.group(bad),
            lambda: g.register_mirror("ok", master[:, :1]),
            lambda: g.register_mirror("ok", master.astype(np.float32)),
            lambda: g.register_mirror("ok", np.full_like(master, np.nan)) if len(master)
            else g.register_mirror("ok", master[:, :, :0]),
            lambda: g.collective_reuse_step(["ok"], np.zeros((1, 3), DTYPE)),
            lambda: g.reconstruct(bad if bad else "missing"),
        ]
        call = data.draw(st.sampled_from(calls))
        try:
            call()
        except (tdstore.InvalidInputError, tdstore.NotFoundError):
            pass
        else:
            raise AssertionError("bad input was accepted")

    @precondition(lambda self: self.model)
    @rule(data=st.data(), name=ANY_TEXT)
    def any_name_is_stored_exactly_or_refused(self, data, name):
        """A name drawn from all of Unicode is either stored and found again exactly,
        or refused with InvalidInputError before anything is written."""
        group = data.draw(st.sampled_from(sorted(self.model)))
        if name in self.model[group]:
            return
        g = self.store.group(group)
        kv = self.model[group][self._master(group)]
        try:
            g.register_mirror(name, kv)
        except tdstore.InvalidInputError:
            assert name not in g.agents()
            return
        assert name.encode("utf-8")  # only valid text gets here
        assert name in g.agents() and g.reconstruct(name).tobytes() == kv.tobytes()
        g.delete(name)

    @rule()
    def reopen(self):
        self.store.close()
        self.store = tdstore.open(f"{self.dir}/s")

    @invariant()
    def store_equals_model(self):
        state = read_state(self.store)
        assert same(state, self.model), (sorted(state), sorted(self.model))

    @invariant()
    def views_read_the_same_blocks(self):
        for group, agents in self.model.items():
            g = self.store.group(group)
            for agent, data in agents.items():
                if len(data):
                    idx = [len(data) - 1, 0]
                    assert g.view(agent)[idx].tobytes() == data[idx].tobytes()
                assert data.shape[1:] == BLOCK

    @invariant()
    def nothing_escapes_the_store_directory(self):
        names = {p.name for p in __import__("pathlib").Path(self.dir).rglob("*")}
        assert not any(n in names for n in ("escape", "etc", "名前", "🤖"))


StoreMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestStoreMachine = StoreMachine.TestCase
