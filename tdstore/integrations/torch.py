"""torch tensors in and out of a store, exactly (bfloat16 and float8 move as raw bits,
never through float32). Requires the optional dependency: ``pip install tdstore[torch]``.

``Group.register_master`` / ``register_mirror`` accept tensors as they are and
``Group.reconstruct(agent, device=...)`` returns one; these are the conversions they use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tdstore.core.tensors import as_numpy, numpy_to_tensor, tensor_to_numpy

if TYPE_CHECKING:
    import torch

    from tdstore.api.store import Group

__all__ = ["as_numpy", "numpy_to_tensor", "reconstruct_to_device", "tensor_to_numpy"]


def reconstruct_to_device(group: Group, agent: str, device: Any) -> torch.Tensor:
    """``group.reconstruct(agent, device=device)``: a tensor on ``device``."""
    tensor: torch.Tensor = group.reconstruct(agent, device=device)
    return tensor
