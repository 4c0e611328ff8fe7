"""Hugging Face transformers caches in and out of a store.

``store_cache`` pages a ``DynamicCache`` (per layer keys and values of shape
``(1, kv_heads, seq, head_dim)``) into blocks of ``block_tokens`` tokens laid out as
``(layers, 2, block_tokens, kv_heads, head_dim)`` and records that layout on the group,
so the attention A/B tools can read it. ``load_cache`` gives a ``DynamicCache`` back,
bit-exact, in the cache's own dtype (bfloat16 included).

The agents of a group diverge in their last turn, so their caches differ in length. A
group holds as many blocks as its longest cache; each agent records its true token count
(``attrs["tokens"]``). Tokens past an agent's end are filled with the master's values,
which makes them free: they never count as differing blocks. A partial trailing block
is handled the same way, exactly.

Requires ``pip install tdstore[hf]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from tdstore.core.errors import InvalidInputError, NoMasterError, NotFoundError
from tdstore.core.tensors import numpy_to_tensor, tensor_to_numpy

if TYPE_CHECKING:
    from tdstore.api.store import Group

LAYOUT = {"axes": ["layer", "kv", "token", "head", "dim"]}


def _cache_layers(cache: Any) -> list[tuple[Any, Any]]:
    """(keys, values) per layer of a transformers cache (v5 ``layers`` or v4 lists)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    if isinstance(cache, (list, tuple)):
        return [(k, v) for k, v in cache]
    raise InvalidInputError(f"expected a transformers DynamicCache, got {type(cache).__name__}")


def cache_to_blocks(cache: Any, block_tokens: int, fill: np.ndarray | None = None
                    ) -> tuple[np.ndarray, int]:
    """Page a cache into blocks ``(n_blocks, layers, 2, block_tokens, kv_heads, dim)``.

    Tokens past the cache's end come from ``fill`` (blocks of the same layout) where it
    has them, else zeros. Returns (blocks, number of real tokens).
    """
    layers = _cache_layers(cache)
    if not layers:
        raise InvalidInputError("the cache has no layers")
    k0 = layers[0][0]
    if k0.dim() != 4 or k0.shape[0] != 1:
        raise InvalidInputError(
            f"expected per-layer keys of shape (1, kv_heads, seq, head_dim); got "
            f"{tuple(k0.shape)} (store one sequence per agent)")
    _, heads, seq, dim = k0.shape
    # (layers, 2, seq, heads, dim) in the cache's dtype, exactly
    stacked = np.stack([np.stack([tensor_to_numpy(k)[0].transpose(1, 0, 2),
                                  tensor_to_numpy(v)[0].transpose(1, 0, 2)])
                        for k, v in layers])
    n_blocks = -(-seq // block_tokens)
    if fill is not None:
        n_blocks = max(n_blocks, fill.shape[0])
    n_layers = len(layers)
    tokens = np.zeros((n_layers, 2, n_blocks * block_tokens, heads, dim), stacked.dtype)
    if fill is not None:
        tokens[:, :, : fill.shape[0] * block_tokens] = _token_major(fill)
    tokens[:, :, :seq] = stacked
    blocks = tokens.reshape(n_layers, 2, n_blocks, block_tokens, heads, dim)
    return np.ascontiguousarray(blocks.transpose(2, 0, 1, 3, 4, 5)), int(seq)


def _token_major(blocks: np.ndarray) -> np.ndarray:
    """Blocks ``(n, layers, 2, block_tokens, heads, dim)`` -> ``(layers, 2, n x block_tokens,
    heads, dim)`` (a copy: the axes move)."""
    n, layers, _, bt, heads, dim = blocks.shape
    return blocks.transpose(1, 2, 0, 3, 4, 5).reshape(layers, 2, n * bt, heads, dim)


def store_cache(group: Group, agent: str, cache: Any, *, block_tokens: int = 16,
                master: bool | None = None) -> dict[str, Any]:
    """Store ``cache`` as ``agent``'s KV cache in ``group`` (the master if the group has
    none yet, or if ``master`` is True; otherwise a mirror). Returns what was stored."""
    if not isinstance(block_tokens, int) or block_tokens < 1:
        raise InvalidInputError(f"block_tokens must be an int >= 1, got {block_tokens!r}")
    layout = {**LAYOUT, "block_tokens": block_tokens}
    current = group.kv_layout
    if current and current.get("block_tokens", block_tokens) != block_tokens:
        raise InvalidInputError(
            f"group {group.name!r} pages caches in blocks of {current['block_tokens']} tokens, "
            f"not {block_tokens}")
    if current != layout:
        group.store.group(group.name, kv_layout=layout)
    as_master = master if master is not None else group.master_id is None
    if as_master:
        blocks, seq = cache_to_blocks(cache, block_tokens)
        group.register_master(agent, blocks, attrs={"tokens": seq})
        return {"agent": agent, "role": "master", "tokens": seq, "blocks": len(blocks),
                "diff_blocks": len(blocks)}
    master_id = group.master_id
    if master_id is None:  # master=False on a group that has none
        raise NoMasterError(f"group {group.name!r}: no master registered; store the first "
                            "cache as the master (master=None or True)")
    base = group.reconstruct(master_id)
    blocks, seq = cache_to_blocks(cache, block_tokens, fill=base)
    if len(blocks) > len(base):  # longer than the group: every agent grows (with zeros,
        # as this cache's own padding past its end is, so that padding costs nothing)
        group.collective_reuse_step([], np.zeros((len(blocks) - len(base), *base.shape[1:]),
                                                 base.dtype))
    diff = group.register_mirror(agent, blocks, attrs={"tokens": seq})
    return {"agent": agent, "role": "mirror", "tokens": seq, "blocks": len(blocks),
            "diff_blocks": diff.n_diff_blocks}


def load_cache(group: Group, agent: str, *, device: Any = None) -> Any:
    """The ``DynamicCache`` stored for ``agent`` (on ``device`` if given), bit-exact."""
    from transformers import DynamicCache

    layout = group.kv_layout or {}
    if "block_tokens" not in layout:
        raise NotFoundError(f"group {group.name!r} holds no Hugging Face caches (no layout)")
    tokens = group.attrs(agent).get("tokens")
    if tokens is None:
        raise NotFoundError(f"group {group.name!r} agent {agent!r}: no token count recorded")
    seq = _token_major(group.reconstruct(agent))[:, :, :tokens]
    cache = DynamicCache()
    for layer in range(seq.shape[0]):
        k = numpy_to_tensor(np.ascontiguousarray(seq[layer, 0].transpose(1, 0, 2))[None])
        v = numpy_to_tensor(np.ascontiguousarray(seq[layer, 1].transpose(1, 0, 2))[None])
        if device is not None:
            k, v = k.to(device), v.to(device)
        cache.update(k, v, layer)
    return cache
