"""torch tensors in and out, exactly (bfloat16 without a float32 detour)."""

from __future__ import annotations

import numpy as np

from ..dtypes import numpy_dtype
from ..errors import InvalidInputError

# torch dtypes numpy cannot hold directly, moved as raw bits of the same width
_BITS = {"torch.bfloat16": ("int16", "bfloat16"),
         "torch.float8_e4m3fn": ("uint8", "float8_e4m3fn"),
         "torch.float8_e5m2": ("uint8", "float8_e5m2")}


def tensor_to_numpy(tensor) -> np.ndarray:  # noqa: ANN001
    """A CPU numpy array holding exactly the tensor's values (copied off the GPU)."""
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    bits = _BITS.get(str(t.dtype))
    if bits is not None:
        raw = t.view(getattr(torch, bits[0])).numpy()
        return raw.view(numpy_dtype(bits[1]))
    try:
        return t.numpy()
    except TypeError as exc:
        raise InvalidInputError(f"torch tensor of dtype {t.dtype} is not supported") from exc
