"""LMCache's standalone engine on the CPU, with tdstore or LMCache's own disk backend:
what the tests and the benchmark drive (no vLLM, no GPU).

The engine moves KV between its chunk buffers and the model's KV through a "GPU
connector"; LMCache's own CPU stand-in copies nothing, so :class:`CPUConnector` copies
between the buffers and a plain tensor ``[2, layers, tokens, heads * head_size]`` (the
``KV_2LTD`` layout of LMCache's chunks), and :class:`CPULayerwiseConnector` does the
same one layer at a time (``use_layerwise: true``: a chunk per layer, ``KV_T2D``).
"""

from __future__ import annotations

import os

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")  # no usage reports to LMCache's server

from contextlib import contextmanager
from typing import Any

import torch
from lmcache.utils import mock_up_broadcast_fn, mock_up_broadcast_object_fn
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.gpu_connector.gpu_connectors import (
    GPUConnectorInterface,
    VLLMPagedMemLayerwiseGPUConnector,
)
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.standalone.manager import StandaloneLMCacheManager

LAYERS, HEADS, HEAD_SIZE = 4, 2, 16
HIDDEN = HEADS * HEAD_SIZE
DTYPE = torch.float16
CHUNK = 256


class CPUConnector(GPUConnectorInterface):
    """Copies chunk buffers from and to ``kv_buffer[:, :, start:end, :]``."""

    def __init__(self, kv_shape: tuple[int, ...]):
        self.kv_shape = kv_shape
        self.num_layers = kv_shape[0]
        self.kvcaches = None

    def get_shape(self, num_tokens: int) -> torch.Size:
        layers, kv, _, heads, size = self.kv_shape
        return torch.Size([kv, layers, num_tokens, heads * size])

    def from_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        memory_obj.tensor.copy_(kwargs["kv_buffer"][:, :, start:end, :])

    def to_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
        kwargs["kv_buffer"][:, :, start:end, :].copy_(memory_obj.tensor)

    def batched_from_gpu(self, memory_objs: Any, starts: list[int], ends: list[int],
                         **kwargs: Any) -> None:
        for m, s, e in zip(memory_objs, starts, ends, strict=True):
            self.from_gpu(m, s, e, **kwargs)

    def batched_to_gpu(self, memory_objs: Any = None, starts: Any = None, ends: Any = None,
                       **kwargs: Any) -> None:
        for m, s, e in zip(memory_objs, starts, ends, strict=True):
            self.to_gpu(m, s, e, **kwargs)


class CPULayerwiseConnector(VLLMPagedMemLayerwiseGPUConnector):
    """Layerwise mode's connector (LMCache accepts only its own layerwise classes, hence
    the base; nothing of it runs): generators that copy one layer of every chunk per
    step between the chunks' buffers (``[tokens, 2, heads * head_size]``) and
    ``kv_buffer[:, layer, start:end, :]``. Loading pairs each chunk's place with the
    buffer at its position, as vLLM's connector does (``zip``, not strict): a layer
    handed fewer buffers than chunks leaves the rest unloaded."""

    def __init__(self, kv_shape: tuple[int, ...]):  # (no GPU to set up)
        self.kv_shape = kv_shape
        self.num_layers = kv_shape[0]
        self.hidden_dim_size = kv_shape[3] * kv_shape[4]
        self.use_mla = False
        self.kvcaches = None

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([num_tokens, 2, self.hidden_dim_size])

    def batched_from_gpu(self, memory_objs: Any, starts: list[int], ends: list[int],
                         **kwargs: Any) -> Any:
        """Layer 0 at the first step, each next layer at the next (layers + 1 steps)."""
        kv = kwargs["kv_buffer"]
        for layer in range(self.num_layers):
            for s, e, m in zip(starts, ends, memory_objs[layer], strict=True):
                m.tensor.copy_(kv[:, layer, s:e, :].transpose(0, 1))
            yield
        yield

    def batched_to_gpu(self, starts: list[int], ends: list[int], **kwargs: Any) -> Any:
        """Takes one layer's buffers per step (``send``); layers + 2 steps."""
        kv = kwargs["kv_buffer"]
        for layer in range(self.num_layers):
            objs = yield
            for s, e, m in zip(starts, ends, objs, strict=False):
                kv[:, layer, s:e, :].copy_(m.tensor.transpose(0, 1))
        yield
        yield


def tdstore_config(location: str, *, url: str | None = None, max_bytes: int | None = None,
                   cpu_gb: float = 0.2, **extra: Any) -> dict[str, Any]:
    """LMCache's configuration with tdstore as its storage backend (what a user writes
    in LMCache's YAML file, as a dict)."""
    cfg: dict[str, Any] = {
        "chunk_size": CHUNK, "local_cpu": False, "max_local_cpu_size": cpu_gb,
        "save_unfull_chunk": True, "storage_plugins": ["tdstore"],
        "extra_config": {
            "storage_plugin.tdstore.module_path": "tdstore.integrations.lmcache",
            "storage_plugin.tdstore.class_name": "TdStoreBackend",
            "tdstore.location": location,
            **({"tdstore.url": url} if url else {}),
            **({"tdstore.max_bytes": max_bytes} if max_bytes else {}),
            **{f"tdstore.{k}": v for k, v in extra.items()},
        },
    }
    return cfg


def disk_config(path: str, *, max_gb: float = 5.0, cpu_gb: float = 0.2) -> dict[str, Any]:
    """The same engine with LMCache's own LocalDiskBackend instead."""
    return {"chunk_size": CHUNK, "local_cpu": False, "max_local_cpu_size": cpu_gb,
            "save_unfull_chunk": True, "local_disk": f"file://{path.rstrip('/')}/",
            "max_local_disk_size": max_gb}


@contextmanager
def engine(config: dict[str, Any], *, layers: int = LAYERS, hidden: int = HIDDEN,
           model: str = "tdstore-test") -> Any:
    """A started standalone engine (stopped, and its backends closed, on exit); ``model``
    is the model name LMCache puts in every key (vLLM passes its model's name)."""
    cfg = LMCacheEngineConfig.from_dict(config)
    cfg.validate()
    meta = LMCacheMetadata(model_name=model, world_size=1, local_world_size=1,
                           worker_id=0, local_worker_id=0, kv_dtype=DTYPE,
                           kv_shape=(layers, 2, CHUNK, hidden // HEAD_SIZE, HEAD_SIZE),
                           use_mla=False,
                           role="worker", chunk_size=CHUNK)
    connector = (CPULayerwiseConnector if config.get("use_layerwise") else
                 CPUConnector)(meta.kv_shape)
    manager = StandaloneLMCacheManager(config=cfg, metadata=meta, gpu_connector=connector,
                                       broadcast_fn=mock_up_broadcast_fn,
                                       broadcast_object_fn=mock_up_broadcast_object_fn)
    manager.post_init()
    try:
        eng = manager.lmcache_engine
        if eng is None or eng.storage_manager is None:
            raise RuntimeError("LMCache's engine did not start (see its log)")
        if "storage_plugins" in config and "tdstore" not in eng.storage_manager.storage_backends:
            raise RuntimeError("LMCache did not load the tdstore backend (see its log)")
        yield eng
    finally:
        manager.stop_services()


def backend_of(eng: Any) -> Any:
    """The tdstore backend LMCache created."""
    return eng.storage_manager.storage_backends["tdstore"]


def sequence(n_tokens: int, seed: int = 0, *, layers: int = LAYERS, hidden: int = HIDDEN
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and their (random) KV ``[2, layers, n_tokens, hidden]`` (hidden: kv
    heads x head size, a multiple of 16)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 32000, (n_tokens,), generator=g, dtype=torch.long)
    kv = torch.randn((2, layers, n_tokens, hidden), generator=g).to(DTYPE)
    return tokens, kv


def keys_of(eng: Any, tokens: torch.Tensor) -> list[str]:
    return [k.to_string() for _, _, k in eng.token_database.process_tokens(tokens=tokens)]


def store_layerwise(eng: Any, tokens: torch.Tensor, kv: torch.Tensor, **kwargs: Any) -> None:
    """``eng.store_layer`` run to its end (an engine with ``use_layerwise: true``)."""
    for _ in eng.store_layer(tokens, kv_buffer=kv, **kwargs):
        pass


def retrieve_layerwise(eng: Any, tokens: torch.Tensor, out: torch.Tensor,
                       **kwargs: Any) -> int:
    """``eng.retrieve_layer`` run to its end; returns the tokens it counts as retrieved
    (what it yields first). As vLLM does, only after a lookup found some: LMCache's
    ``retrieve_layer`` fails when it finds nothing (UnboundLocalError, LMCache 0.5.6)."""
    if not eng.lookup(tokens=tokens, request_configs=kwargs.get("request_configs")):
        return 0
    steps = iter(eng.retrieve_layer(tokens, kv_buffer=out, **kwargs))
    first = next(steps)  # the count of retrieved tokens (a 0-d tensor), or a mask
    for _ in steps:
        pass
    return 0 if first is None else int(first.sum())
