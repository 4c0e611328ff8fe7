"""Agents to and from files: ``.npy`` and ``.safetensors``, bit-exact in every dtype."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tdstore.core.dtypes import SUPPORTED, logical_name, numpy_dtype
from tdstore.core.errors import InvalidInputError, NotFoundError, name_list
from tdstore.ops.groups import GroupOps


def export_agent(group: GroupOps, agent: str, file: str | os.PathLike[str]) -> dict[str, Any]:
    """Write one agent's blocks to a ``.npy`` or ``.safetensors`` file.

    bfloat16 and float8 have no .npy or safetensors-numpy dtype: they are written as their
    raw bits (uint16/uint8); a .safetensors file records the logical dtype in its metadata,
    so ``import_agent`` restores it (for .npy pass ``dtype=``).
    """
    path = Path(file)
    kind = path.suffix.lower()
    if kind not in (".npy", ".safetensors"):
        raise InvalidInputError(f"export file {path}: expected a .npy or .safetensors name")
    if not path.parent.is_dir():
        raise InvalidInputError(f"export file {path}: directory {path.parent} does not exist")
    target = path.absolute().parent.resolve() / path.name
    if isinstance(group.ctx.path, Path) and (
            target == (store_dir := group.ctx.path.resolve()) or store_dir in target.parents):
        raise InvalidInputError(f"export file {path}: it lies inside the store directory "
                                f"{store_dir}; write it elsewhere")
    full = group.reconstruct(agent)
    name = logical_name(full.dtype)
    raw = full.view(f"u{full.dtype.itemsize}") if name in ("bfloat16", "float8_e4m3fn",
                                                           "float8_e5m2") else full
    tmp = path.with_name(path.name + ".tmp")
    if kind == ".npy":
        with open(tmp, "wb") as f:
            np.save(f, raw)
    else:
        from safetensors.numpy import save_file

        save_file({"kv": raw}, str(tmp), metadata={"tdstore_dtype": name, "group": group.name,
                                                   "agent": agent})
    os.replace(tmp, path)
    return {"group": group.name, "agent": agent, "file": str(path), "dtype": name,
            "shape": list(full.shape), "bytes": path.stat().st_size}


def load_file(file: str | os.PathLike[str], dtype: str | None = None) -> np.ndarray:
    """Read blocks from a ``.npy`` or ``.safetensors`` file (as written by export)."""
    path = Path(file)
    kind = path.suffix.lower()
    if not path.is_file():
        raise NotFoundError(f"import file {path} does not exist")
    recorded = None
    try:
        if kind == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        elif kind == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                keys = list(f.keys())
                if len(keys) != 1:
                    raise InvalidInputError(
                        f"import file {path}: expected one tensor, found {len(keys)} ({keys})")
                arr = f.get_tensor(keys[0])
                recorded = (f.metadata() or {}).get("tdstore_dtype")
        else:
            raise InvalidInputError(f"import file {path}: expected a .npy or .safetensors file")
    except InvalidInputError:
        raise
    except EOFError:
        raise InvalidInputError(f"import file {path} cannot be read: it is empty or "
                                "truncated") from None
    except Exception as exc:  # numpy's and safetensors' errors for a damaged file
        raise InvalidInputError(f"import file {path} cannot be read: {exc}") from None
    if dtype == "":
        raise InvalidInputError("dtype '' is not a dtype; expected one of "
                                f"{', '.join(SUPPORTED)}")
    target = dtype or recorded
    if target is not None:
        if target not in SUPPORTED:
            raise InvalidInputError(f"dtype {target!r} is not supported; expected one of "
                                    f"{', '.join(SUPPORTED)}")
        want = numpy_dtype(target)
        if arr.dtype != want:
            if arr.dtype.itemsize != want.itemsize or arr.dtype.kind not in "ui":
                raise InvalidInputError(
                    f"import file {path}: dtype {arr.dtype} cannot be read as {target}")
            arr = np.ascontiguousarray(arr).view(want)
    return arr


def import_agent(group: GroupOps, agent: str, file: str | os.PathLike[str], *,
                 master: bool = False, dtype: str | None = None,
                 replace: bool = True) -> dict[str, Any]:
    """Register ``agent`` from a file: as a mirror, or as the master when ``master`` is
    set or the group has none yet. A new master replaces the old one and its mirrors
    (as ``register_master`` does): the result names them under ``removed``; with
    ``replace=False`` that is refused instead, before the file is read."""
    current = group.master_id
    as_master = master or current is None
    removed = [a for a in group.agents() if a != agent] if as_master and current != agent \
        else []
    if removed and not replace:
        raise InvalidInputError(
            f"group {group.name!r}: registering {agent!r} as master replaces master "
            f"{current!r} and removes {len(removed)} agent(s) ({name_list(removed)}); "
            "pass --replace (replace=True) to do that")
    kv = load_file(file, dtype)
    if as_master:
        group.register_master(agent, kv)
        n_diff = int(kv.shape[0])
    else:
        n_diff = group.register_mirror(agent, kv).n_diff_blocks
    return {"group": group.name, "agent": agent, "role": "master" if as_master
            else "mirror", "blocks": int(kv.shape[0]), "diff_blocks": n_diff,
            "removed": removed}
