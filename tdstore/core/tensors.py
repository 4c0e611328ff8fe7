"""torch tensors in and out of numpy, exactly (bfloat16 and float8 move as raw bits, never
through float32). torch is imported only when a tensor is converted: it is the optional
dependency ``tdstore[torch]``."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, TypeGuard

import numpy as np

from tdstore.core.dtypes import logical_name, numpy_dtype
from tdstore.core.errors import InvalidInputError

if TYPE_CHECKING:
    import torch

# logical dtype -> (torch dtype name, torch dtype of the same-width raw bits or None)
_TORCH = {
    "float16": ("float16", None), "float32": ("float32", None), "float64": ("float64", None),
    "int8": ("int8", None), "uint8": ("uint8", None),
    "bfloat16": ("bfloat16", "int16"),
    "float8_e4m3fn": ("float8_e4m3fn", "uint8"), "float8_e5m2": ("float8_e5m2", "uint8"),
}


def load_torch() -> ModuleType:
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
    torch = load_torch()
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
    torch = load_torch()
    logical = logical_name(a.dtype)
    torch_name, bits = _TORCH[logical]
    a = np.ascontiguousarray(a)
    if bits is None:
        return torch.from_numpy(a)
    return torch.from_numpy(a.view(f"{'i' if bits == 'int16' else 'u'}{a.itemsize}")).view(
        getattr(torch, torch_name))


def is_tensor(obj: object) -> TypeGuard[torch.Tensor]:
    """Whether ``obj`` is a torch tensor (without importing torch when it is not)."""
    return type(obj).__module__.startswith("torch")


def torch_dtype(logical: str) -> torch.dtype:
    """The torch dtype of a logical dtype name (``bfloat16`` -> ``torch.bfloat16``)."""
    return getattr(load_torch(), _TORCH[logical][0])
