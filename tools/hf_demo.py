#!/usr/bin/env python3
"""A tiny Llama's KV caches for a group of agents: stored, reloaded, continued.

Agents share a long prompt and differ in their last turn. Their caches go into a store
(threshold 0); then each agent's first new token is produced two ways: from the stored
cache (load + one decode step) and by recomputing the prefill. Prints the compression
ratio and both times to first token. Needs `pip install tdstore[hf]`; no download (the
model is randomly initialised from a config).

    python tools/hf_demo.py [--prefix 1024] [--agents 6] [--layers 8] [--hidden 512]
"""

import tempfile
import time
from typing import Any

import click
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tdstore
from tdstore.integrations.hf import load_cache, store_cache


@click.command(help=__doc__.splitlines()[0])
@click.option("--prefix", default=1024, show_default=True, type=click.IntRange(min=1),
              help="Shared prompt tokens.")
@click.option("--turn", default=48, show_default=True, type=click.IntRange(min=1),
              help="Tokens of each agent's own turn.")
@click.option("--agents", default=6, show_default=True, type=click.IntRange(min=2),
              help="Agents sharing the prompt.")
@click.option("--layers", default=8, show_default=True, type=click.IntRange(min=1),
              help="Decoder layers of the model.")
@click.option("--hidden", default=512, show_default=True, type=click.IntRange(min=64),
              help="Hidden size of the model (a multiple of 64).")
@click.option("--dir", "workdir", default=None, type=click.Path(file_okay=False),
              help="Where the store goes (default: a new temp dir).")
def main(prefix: int, turn: int, agents: int, layers: int, hidden: int,
         workdir: str | None) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=2, max_position_embeddings=prefix + turn + 8)
    model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    shared = torch.randint(0, 4096, (1, prefix))
    prompts = {f"agent{i}": torch.cat([shared, torch.randint(0, 4096, (1, turn))], 1)
               for i in range(agents)}
    path = workdir or tempfile.mkdtemp(prefix="tdstore-hf-")
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
    print(f"model: Llama, {layers} layers, hidden {hidden}, bfloat16, random weights")
    print(f"agents: {agents}, each {prefix} shared + {turn} own tokens")
    print(f"stored: {st['bytes_stored'] / mib:.1f} MiB for {st['bytes_logical'] / mib:.1f} MiB of "
          f"caches; compression ratio {st['compression_ratio']:.2f}x")
    print(f"time to first token: recomputing the prefill {1e3 * min(prefill_s):.1f} ms, from "
          f"the store {1e3 * min(load_s):.1f} ms ({min(prefill_s) / min(load_s):.1f}x faster); "
          f"same first token: {sum(same)}/{len(same)}")


def _drop_last(cache: Any) -> Any:
    """The stored cache holds the whole prompt; to produce the first new token from it
    the last prompt token is fed again, so drop it from the cache."""
    cache.crop(-1)
    return cache


if __name__ == "__main__":
    main()
