"""torch tensors in and out, exactly (bfloat16 and float8 move as raw bits, never through
float32). Requires the optional dependency: ``pip install tdstore[torch]``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..dtypes import logical_name, numpy_dtype
from ..errors import InvalidInputError

if TYPE_CHECKING:
    import torch

    from ..store import Group

# logical dtype -> (torch dtype name, torch dtype of the same-width raw bits or None)
_TORCH = {
    "float16": ("float16", None), "float32": ("float32", None), "float64": ("float64", None),
    "int8": ("int8", None), "uint8": ("uint8", None),
    "bfloat16": ("bfloat16", "int16"),
    "float8_e4m3fn": ("float8_e4m3fn", "uint8"), "float8_e5m2": ("float8_e5m2", "uint8"),
}


def _torch():  # noqa: ANN202
    try:
        import torch
    except ImportError:
        raise InvalidInputError("torch is not installed: pip install 'tdstore[torch]'") \
            from None
    return torch


def _logical(t: torch.Tensor) -> str:
    name = str(t.dtype).removeprefix("torch.")
    for logical, (torch_name, _) in _TORCH.items():
        if torch_name == name:
            return logical
    raise InvalidInputError(
        f"torch tensor of dtype {t.dtype} is not supported; expected one of "
        f"{', '.join(v[0] for v in _TORCH.values())}")


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's memory (no copy), in the same logical dtype."""
    torch = _torch()
    logical = _logical(t)
    bits = _TORCH[logical][1]
    if bits is None:
        return t.numpy()
    return t.view(getattr(torch, bits)).numpy().view(numpy_dtype(logical))


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU numpy array holding exactly the tensor's values (copied off a GPU)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return as_numpy(t.contiguous())


def numpy_to_tensor(a: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing ``a``'s memory, in the same logical dtype."""
    torch = _torch()
    logical = logical_name(a.dtype)
    torch_name, bits = _TORCH[logical]
    a = np.ascontiguousarray(a)
    if bits is None:
        return torch.from_numpy(a)
    return torch.from_numpy(a.view(f"{'i' if bits == 'int16' else 'u'}{a.itemsize}")).view(
        getattr(torch, torch_name))


def reconstruct_to_device(group: Group, agent: str, device: Any) -> torch.Tensor:
    """Reconstruct into a torch tensor on ``device``. For CUDA the blocks are read
    straight into pinned host memory, then copied to the device in one transfer."""
    torch = _torch()
    device = torch.device(device)
    snap = group._snapshot(agent)
    dtype = getattr(torch, _TORCH[snap.dtype_name][0])
    host = torch.empty(snap.shape, dtype=dtype, pin_memory=device.type == "cuda")
    group.reconstruct(agent, out=as_numpy(host))
    if device.type == "cpu":
        return host
    return host.to(device, non_blocking=True)
