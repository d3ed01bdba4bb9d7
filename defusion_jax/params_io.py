"""Reading PyTorch-style state dicts and this project's own parameter files.

Nothing here runs code from a file: safetensors is read as plain tensors, `.pth` only through
`torch.load(..., weights_only=True)`. The project's own format is a folder holding
`params.safetensors` (flat keys joined with '/') and `model.json` (the model config and where the
weights came from).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "model.json"
# Wrappers used by the official DeFusion++ trainer ('state_dict'), MAE/TinyMIM ('model') and
# some others ('module', 'params').
_WRAPPERS = ("state_dict", "model", "module", "params")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why in one line."""


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A PyTorch state dict from `.safetensors` or `.pth`/`.pt`/`.bin`, as float32 numpy arrays.

    Accepts the official `{'state_dict': ...}` wrapper, MAE's `{'model': ...}`, a bare state dict
    and `module.`-prefixed keys (DataParallel). Half precision is upcast to float32.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected a checkpoint file (.pth or .safetensors)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # corrupt header, truncated file, bfloat16 numpy cannot hold...
            sd = _read_safetensors_torch(path, e)
    else:
        sd = _read_torch(path)
    for _ in range(3):  # nested wrappers, e.g. {'model': {'state_dict': ...}}
        inner = next((sd[k] for k in _WRAPPERS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        arr = _to_numpy(v)
        if arr is None:
            continue  # non-tensor entries (e.g. an 'epoch' counter inside a flat dict)
        out[k] = arr.astype(np.float32) if arr.dtype.kind == "f" else arr
    if not out:
        raise CheckpointError(f"{path}: no tensors found")
    return out


def _read_safetensors_torch(path: Path, err: Exception) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None
    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def _read_torch(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading .pth files needs PyTorch (pip install -r requirements-dev.txt), "
                              "or convert it to .safetensors elsewhere") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e):
            # torch's advice to retry with weights_only=False would run the file's pickled code
            raise CheckpointError(f"{path}: not a loadable checkpoint (torch's safe loader finds "
                                  "no plain state dict of tensors in it)") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return dict(obj)


def _to_numpy(v: Any) -> np.ndarray | None:
    if isinstance(v, np.ndarray):
        return v
    if hasattr(v, "detach") and hasattr(v, "dtype"):  # torch.Tensor
        import torch

        t = v.detach().cpu()
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        return t.numpy()
    return None


def first_few(items, n: int = 3) -> str:
    """'a, b, c, ...': the start of a long list of names, for a one-line error message."""
    items = list(items)
    return ", ".join(map(str, items[:n])) + (", ..." if len(items) > n else "")


def describe_mismatch(missing=(), unexpected=(), wrong=()) -> str | None:
    """'missing keys 2 (a, b); unexpected keys 1 (c); wrong shapes ...': one line for a parameter set
    that does not fit a model, a count and the first few names of each kind (a wholly different
    network has hundreds), or None when all three are empty."""
    parts = [f"{what} {len(items)} ({first_few(items)})" for what, items in
             (("missing keys", list(missing)), ("unexpected keys", list(unexpected)), ("wrong shapes", list(wrong)))
             if items]
    return "; ".join(parts) or None


def shape_mismatch(got: Mapping[str, tuple], want: Mapping[str, tuple], *, extra_ok: bool = False) -> str | None:
    """`describe_mismatch` of two flat {name: shape} maps: what `got` lacks, has besides (unless
    `extra_ok`) and has with another shape than `want`; None when `got` fits."""
    missing = sorted(set(want) - set(got))
    unexpected = [] if extra_ok else sorted(set(got) - set(want))
    wrong = [f"{k} {tuple(got[k])} (expected {tuple(want[k])})" for k in sorted(set(want) & set(got))
             if tuple(got[k]) != tuple(want[k])]
    return describe_mismatch(missing, unexpected, wrong)


def flat_shapes(params: Mapping) -> dict[str, tuple]:
    """{'a/b/kernel': shape} of a tree of arrays or shape structs."""
    return {"/".join(k): tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(dict(params)).items()}


def flatten(params: Mapping) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(params)).items()}


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def save_params(directory: str | os.PathLike, params: Mapping, model_config: Mapping,
                meta: Mapping | None = None) -> Path:
    """Write `params.safetensors` + `model.json` into `directory` (created if needed)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in flatten(params).items()}
    tmp = directory / (PARAMS_FILE + ".tmp")
    save_file(flat, str(tmp), metadata={"format": "defusion_jax.params/1"})
    os.replace(tmp, directory / PARAMS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps({"model": dict(model_config), "meta": dict(meta or {})},
                                                    indent=2, default=str) + "\n")
    return directory


def is_params_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / PARAMS_FILE).is_file() and (path / CONFIG_FILE).is_file()


def load_params(directory: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(params, model_config, meta) from a folder written by `save_params`."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    if not is_params_dir(directory):
        raise CheckpointError(f"{directory}: expected {PARAMS_FILE} and {CONFIG_FILE}")
    try:
        cfg = json.loads((directory / CONFIG_FILE).read_text())
        flat = load_file(str(directory / PARAMS_FILE))
    except Exception as e:
        raise CheckpointError(f"{directory}: unreadable parameter files ({e})") from None
    return unflatten(flat), cfg.get("model", {}), cfg.get("meta", {})
