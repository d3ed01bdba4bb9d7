"""The Python API users hold: `load_model(path)` -> `FusionModel`.

    from defusion_jax.api import load_model
    m = load_model("ucmimnet.pth")               # official checkpoint, or a converted folder,
    parts = m.decompose(a, b)                    # or a training workdir
    parts["fused"], parts["common"], parts["unique1"], parts["unique2"]

Inputs are NHWC arrays, batch first, with height and width multiples of 16 (no padding happens
here; `fuse_image` takes one HxWxC image of any size and pads like the official test script).
Floats must lie in [0, 1] (NaN, inf or more than 1e-3 outside is a ValueError naming the range
seen); uint8 is divided by 255 and uint16 by 65535, so `np.asarray(Image.open(path))` works as
is; other integer types and bool are a TypeError (`defusion_jax.exported.as_unit_float`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from defusion_jax import paths
from defusion_jax.exported import as_unit_float, is_export_dir, nchw_hint
from defusion_jax.models.defusion import DIRECTIONS, build_model
from defusion_jax.params_io import CheckpointError, is_params_dir, load_params

OFFICIAL_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".safetensors", ".ckpt")


def _matmul_precision(precision: str | None):
    # None must not enter a `default_matmul_precision(None)` context: that is a different jit
    # cache key from the global setting and would recompile
    return jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()


class FusionModel:
    """A DeFusion++ network with its parameters and jitted entry points."""

    def __init__(self, params: Mapping, model_config: Mapping | None = None, meta: Mapping | None = None):
        self.config = dict(model_config or {})
        self.module = build_model(self.config)
        self.params = jax.tree.map(jnp.asarray, dict(params))
        self.meta = dict(meta or {})

    def __repr__(self):
        n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(self.params))
        return f"FusionModel({n:,} params, source={self.meta.get('source', '?')!r})"

    # -- checks -------------------------------------------------------------------------------
    def _pair(self, a, b):
        a = jnp.asarray(as_unit_float(a, "a"))
        b = jnp.asarray(as_unit_float(b, "b"))
        if a.ndim != 4 or b.ndim != 4:
            hint = nchw_hint(a.shape) or ("; one image: pass x[None], or use fuse_image() for any size"
                                          if a.ndim == 3 else "")
            raise ValueError(f"expected NHWC batches, got shapes {a.shape} and {b.shape}{hint}")
        if a.shape != b.shape:
            raise ValueError(f"the two inputs differ in shape: {a.shape} vs {b.shape}")
        if a.shape[-1] != 3:
            raise ValueError(f"expected 3 channels (RGB; replicate grey images), got {a.shape[-1]}{nchw_hint(a.shape)}")
        p = self.module.patch
        if a.shape[1] % p or a.shape[2] % p:
            raise ValueError(f"height and width must be multiples of {p}, got {a.shape[1]}x{a.shape[2]}; "
                             "use fuse_image() or defusion_jax.fuse for arbitrary sizes")
        return a, b

    @staticmethod
    def _direction(direction):
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        return direction

    # -- entry points -------------------------------------------------------------------------
    @functools.cached_property
    def _decompose(self):
        def f(params, a, b, direction):
            out = self.module.apply({"params": params}, a, b, direction=direction, mfm=False)
            return {k: out[k] for k in ("common", "unique1", "unique2", "fused")}

        return jax.jit(f, static_argnums=3)

    @functools.cached_property
    def _fuse(self):
        return jax.jit(lambda params, a, b, direction: self.module.apply(
            {"params": params}, a, b, direction, method=type(self.module).fuse), static_argnums=3)

    @functools.cached_property
    def _mfm(self):
        return jax.jit(lambda params, a, b, keep, restore: self.module.apply(
            {"params": params}, a, b, ids_keep=keep, ids_restore=restore)["mfm_recon"])

    def decompose(self, a, b, direction: str = "q_view2", precision: str | None = "highest") -> dict[str, jax.Array]:
        """common, unique1, unique2 and fused images (NHWC float32, raw predictions).

        `precision`: matmul precision (`jax.default_matmul_precision`), `highest` (float32 on
        GPUs/TPUs, as `python -m defusion_jax.fuse` and the export) by default; None inherits
        the global setting."""
        a, b = self._pair(a, b)
        with _matmul_precision(precision):
            return self._decompose(self.params, a, b, self._direction(direction))

    def fuse(self, a, b, direction: str = "q_view2", precision: str | None = "highest") -> jax.Array:
        """Fused image only (the inference path of Fig. 6), NHWC float32, raw prediction
        (`precision` as in `decompose`)."""
        a, b = self._pair(a, b)
        with _matmul_precision(precision):
            return self._fuse(self.params, a, b, self._direction(direction))

    def mfm_reconstruct(self, a, b, ids_keep, ids_restore) -> jax.Array:
        """MFM reconstruction with explicit kept / restore token indices (Eq. 8)."""
        a, b = self._pair(a, b)
        keep = jnp.asarray(ids_keep, jnp.int32)
        restore = jnp.asarray(ids_restore, jnp.int32)
        n = (a.shape[1] // self.module.patch) * (a.shape[2] // self.module.patch)
        if restore.shape != (a.shape[0], n) or keep.ndim != 2 or keep.shape[0] != a.shape[0]:
            raise ValueError(f"ids_restore must be (B, {n}) and ids_keep (B, K); got {restore.shape}, {keep.shape}")
        return self._mfm(self.params, a, b, keep, restore)

    def fuse_image(self, a: np.ndarray, b: np.ndarray, task: str = "ivf", direction: str = "q_view2",
                   precision: str | None = "highest") -> np.ndarray:
        """One HxWxC pair in [0,1] of any size -> fused HxWx3 float32 in [0,1].

        The official test protocol: reflect-pad 16 px on each side, then up to a multiple of 16,
        run, crop back, clamp. IVF inputs are made grey in 3 channels (official loaders).
        `precision` as in `decompose` (default `highest`, as the CLI).
        """
        from defusion_jax import inference

        return inference.fuse_pair(self, a, b, task=task, direction=direction, precision=precision)


def load_model(path: str | os.PathLike, model_config: Mapping[str, Any] | None = None) -> FusionModel:
    """Load DeFusion++ parameters from any of the forms users have.

    - an official PyTorch checkpoint: `.pth` with its `{'state_dict': ...}` wrapper, a bare state
      dict, `module.`-prefixed keys, or `.safetensors`; float32 or float16 (upcast);
    - a folder written by `python -m defusion_jax.convert official` (params.safetensors + model.json);
    - a training workdir or one of its checkpoints (latest step's parameters), also on gs://.
    """
    url = paths.is_url(path)  # a pod's gs:// workdir: orbax reads it where it is
    try:
        path = paths.path(path) if url else Path(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not path.exists():
        raise CheckpointError(f"model not found: {path}")
    if path.is_dir():
        if not url and is_export_dir(path):
            raise CheckpointError(f"{path} is an export folder (python -m defusion_jax.export), not a checkpoint; "
                                  f"use defusion_jax.exported.load({str(path)!r}) or fuse --model {path}")
        if not url and is_params_dir(path):
            params, cfg, meta = load_params(path)
            return FusionModel(params, model_config or cfg, {**meta, "source": str(path)})
        from defusion_jax import checkpoints  # training workdirs (orbax)

        params, cfg, meta = checkpoints.load_params_from_workdir(path)
        kind = next((k for k in ("segmentation", "detection") if k in (cfg or {})), None)
        if kind and model_config is None:  # a fine-tuning run's workdir: its network is no DeFusion++
            raise CheckpointError(f"{path} is a {kind} run's workdir, not a DeFusion++ pretraining one; as "
                                  "config.init give the pretraining workdir it started from (config.resume "
                                  "continues a fine-tuning run)")
        return FusionModel(params, model_config or cfg, meta)
    if url:
        raise CheckpointError(f"{path}: from cloud storage only training workdirs are read; copy "
                              "checkpoint files and converted folders to a local path")
    if path.suffix.lower() in OFFICIAL_SUFFIXES:
        from defusion_jax.convert import load_official

        params, cfg, notes = load_official(path, model_config)
        return FusionModel(params, cfg, {"source": str(path), "notes": notes})
    raise CheckpointError(f"{path}: not a model checkpoint (expected a folder, .pth or .safetensors)")
