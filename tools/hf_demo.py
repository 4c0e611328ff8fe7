#!/usr/bin/env python3
"""A tiny Llama's KV caches for a group of agents: stored, reloaded, continued.

Agents share a long prompt and differ in their last turn. Their caches go into a store
(threshold 0); then each agent's first new token is produced two ways: from the stored
cache (load + one decode step) and by recomputing the prefill. Prints the compression
ratio and both times to first token. Needs `pip install tdstore[hf]`; no download (the
model is randomly initialised from a config).

    python tools/hf_demo.py [--prefix 1024] [--agents 6] [--layers 8] [--hidden 512]
"""

import argparse
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tdstore
from tdstore.integrations.hf import load_cache, store_cache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefix", type=int, default=1024, help="shared prompt tokens")
    p.add_argument("--turn", type=int, default=48, help="tokens of each agent's own turn")
    p.add_argument("--agents", type=int, default=6)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--dir", default=None)
    a = p.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=a.hidden, intermediate_size=a.hidden * 2,
                         num_hidden_layers=a.layers, num_attention_heads=8,
                         num_key_value_heads=2, max_position_embeddings=a.prefix + a.turn + 8)
    model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    prefix = torch.randint(0, 4096, (1, a.prefix))
    prompts = {f"agent{i}": torch.cat([prefix, torch.randint(0, 4096, (1, a.turn))], 1)
               for i in range(a.agents)}
    path = a.dir or tempfile.mkdtemp(prefix="tdstore-hf-")
    prefill_s, load_s, same, firsts = [], [], [], {}
    with tdstore.open(path) as store:
        g = store.group("agents", diff_threshold=0.0)
        for name, ids in prompts.items():
            with torch.no_grad():
                t0 = time.perf_counter()
                out = model(ids, use_cache=True)  # recomputing the prefill ...
                firsts[name] = int(out.logits[0, -1].argmax())  # ... gives the first token
                prefill_s.append(time.perf_counter() - t0)
            store_cache(g, name, out.past_key_values)
        for name, ids in prompts.items():
            with torch.no_grad():
                t0 = time.perf_counter()
                cache = load_cache(g, name)  # from the store: load, then one decode step
                nxt = model(ids[:, -1:], past_key_values=_drop_last(cache), use_cache=True)
                token = int(nxt.logits[0, -1].argmax())
                load_s.append(time.perf_counter() - t0)
            same.append(token == firsts[name])
        st = g.stats()
    mib = 1 << 20
    print(f"model: Llama, {a.layers} layers, hidden {a.hidden}, bfloat16, random weights")
    print(f"agents: {a.agents}, each {a.prefix} shared + {a.turn} own tokens")
    print(f"stored: {st['bytes_stored'] / mib:.1f} MiB for {st['bytes_logical'] / mib:.1f} MiB of "
          f"caches; compression ratio {st['compression_ratio']:.2f}x")
    print(f"time to first token: recomputing the prefill {1e3 * min(prefill_s):.1f} ms, from "
          f"the store {1e3 * min(load_s):.1f} ms ({min(prefill_s) / min(load_s):.1f}x faster); "
          f"same first token: {sum(same)}/{len(same)}")


def _drop_last(cache):  # noqa: ANN001, ANN202
    """The stored cache holds the whole prompt; to produce the first new token from it
    the last prompt token is fed again, so drop it from the cache."""
    cache.crop(-1)
    return cache


if __name__ == "__main__":
    main()
