"""Real model caches: a tiny random Llama, stored, reloaded in a new process, continued."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tdstore
from tdstore.integrations.hf import load_cache, store_cache

PREFIX, TURNS, STEPS = 37, {"retriever": 5, "critic": 11, "responder": 27}, 6


def tiny_llama(dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    return LlamaForCausalLM(config).eval().to(dtype)


def prompts() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 96, (1, PREFIX), generator=g)
    return {a: torch.cat([prefix, torch.randint(0, 96, (1, n), generator=g)], dim=1)
            for a, n in TURNS.items()}


def greedy(model, cache, first: int) -> tuple[list[np.ndarray], list[int]]:
    tok, logits, tokens = first, [], []
    with torch.no_grad():
        for _ in range(STEPS):
            out = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            last = out.logits[0, -1].float()
            logits.append(last.numpy().copy())
            tok = int(last.argmax())
            tokens.append(tok)
    return logits, tokens


CHILD = textwrap.dedent("""
    import json, sys, numpy as np, torch
    sys.path.insert(0, sys.argv[3])
    import tdstore
    from test_hf import greedy, tiny_llama
    from tdstore.integrations.hf import load_cache
    torch.set_num_threads(1)
    dtype = getattr(torch, sys.argv[2])
    model = tiny_llama(dtype)
    model.load_state_dict(torch.load(sys.argv[1] + "/weights.pt"))
    ref = json.load(open(sys.argv[1] + "/ref.json"))
    out = {}
    with tdstore.open(sys.argv[1] + "/store", readonly=True) as store:
        g = store.group("agents", create=False)
        for agent, r in ref.items():
            cache = load_cache(g, agent)
            seq = cache.get_seq_length()
            logits, tokens = greedy(model, cache, r["first"])
            expected = np.load(sys.argv[1] + f"/{agent}.npy")
            out[agent] = {"bitwise": bool(np.array_equal(np.stack(logits), expected)),
                          "tokens": tokens, "seq": seq}
    print(json.dumps(out))
""")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_new_process_continues_from_stored_caches_bit_exactly(tmp_path, dtype):
    torch.set_num_threads(1)
    model = tiny_llama(getattr(torch, dtype))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    ref = {}
    with tdstore.open(tmp_path / "store") as store:
        group = store.group("agents", diff_threshold=0.0)
        for agent, ids in prompts().items():
            with torch.no_grad():
                out = model(ids, use_cache=True)
            info = store_cache(group, agent, out.past_key_values, block_tokens=16)
            assert info["tokens"] == ids.shape[1]
            first = int(out.logits[0, -1].float().argmax())
            logits, tokens = greedy(model, out.past_key_values, first)  # uninterrupted run
            np.save(tmp_path / f"{agent}.npy", np.stack(logits))
            ref[agent] = {"first": first, "tokens": tokens}
        stats = group.stats()
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    # the prefix is shared: mirrors store only the blocks holding their own turn
    assert stats["compression_ratio"] > 1.3 and stats["dtype"] == dtype
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), dtype,
                           str(__import__("pathlib").Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    for agent, r in result.items():
        assert r["bitwise"], f"{agent}: logits differ after reloading"
        assert r["tokens"] == ref[agent]["tokens"]
        assert r["seq"] == PREFIX + TURNS[agent]


def test_a_threshold_changes_the_logits_and_says_by_how_much(tmp_path, capsys):
    torch.set_num_threads(1)
    model = tiny_llama(torch.float32)
    ids = prompts()
    with tdstore.open(tmp_path / "s") as store:
        exact_g = store.group("exact", diff_threshold=0.0)
        loose_g = store.group("loose", diff_threshold=10.0)  # the turns differ by ~9 (L2)
        report = {}
        for agent, x in ids.items():
            with torch.no_grad():
                out = model(x, use_cache=True)
            for g in (exact_g, loose_g):
                store_cache(g, agent, out.past_key_values)
            first = int(out.logits[0, -1].argmax())
            exact_logits, exact_tokens = greedy(model, load_cache(exact_g, agent), first)
            loose_logits, loose_tokens = greedy(model, load_cache(loose_g, agent), first)
            report[agent] = (float(np.abs(np.stack(exact_logits) - np.stack(loose_logits))
                                   .max()), exact_tokens == loose_tokens)
        ratio = (exact_g.compression_ratio(), loose_g.compression_ratio())
    with capsys.disabled():
        print(f"\nthreshold 10 vs 0: compression {ratio[1]:.2f}x vs {ratio[0]:.2f}x; "
              + ", ".join(f"{a}: max |dlogit| {d:.3g}, same tokens {s}"
                          for a, (d, s) in report.items()))
    assert ratio[1] > ratio[0]
    assert report["retriever"][0] == 0.0  # the master is stored whole either way
    assert any(d > 0 for d, _ in report.values())  # mirrors lost blocks: logits moved
    assert all(np.isfinite(d) for d, _ in report.values())


def test_torch_tensors_in_and_out_exactly(tmp_path):
    t = torch.randn(8, 4, 16).to(torch.bfloat16)
    with tdstore.open(tmp_path / "s") as store:
        g = store.group("g")
        g.register_master("m", t)  # bfloat16 never goes through float32
        mirror = t.clone()
        mirror[5] = 1.5
        g.register_mirror("a", mirror)
        back = g.reconstruct("a", device="cpu")
        assert back.dtype == torch.bfloat16 and torch.equal(back.view(torch.int16),
                                                             mirror.view(torch.int16))
        arr = g.reconstruct("a")
        assert arr.dtype.name == "bfloat16"
        with pytest.raises(tdstore.InvalidInputError, match="not both"):
            g.reconstruct("a", out=arr, device="cpu")
        with pytest.raises(tdstore.InvalidInputError, match="complex64 is not supported"):
            g.register_mirror("c", torch.zeros(8, 4, 16, dtype=torch.complex64))
        if torch.cuda.is_available():  # on a GPU machine: the pinned-memory path
            gpu = g.reconstruct("a", device="cuda")
            assert gpu.is_cuda and torch.equal(gpu.cpu().view(torch.int16),
                                               mirror.view(torch.int16))
