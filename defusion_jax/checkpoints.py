"""Training checkpoints (orbax) and reading trained parameters back out of a workdir.

Layout of a workdir:
  WORKDIR/model_config.json         the model config (what `api.load_model(WORKDIR)` builds)
  WORKDIR/config.json               the full training config
  WORKDIR/checkpoints/<step>/state  params, opt_state, step, rng (sharded arrays; orbax)
  WORKDIR/checkpoints/<step>/data   the grain iterator state, one JSON file per process

Frozen parameters (the teacher) are never saved. A checkpoint restores onto any mesh: the target
shardings come from the current run.
"""

from __future__ import annotations

import json
import logging as logging_std
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from defusion_jax import paths
from defusion_jax.params_io import CheckpointError

CKPT_DIR = "checkpoints"
MODEL_CONFIG = "model_config.json"


def write_model_config(workdir: str | os.PathLike, model_config: Mapping, meta: Mapping | None = None) -> None:
    paths.write_text_whole(paths.path(workdir) / MODEL_CONFIG,
                           json.dumps({"model": dict(model_config), "meta": dict(meta or {})}, indent=2, default=str) + "\n")


class Checkpointer:
    """An orbax CheckpointManager holding `state` (a pytree of arrays) and `data` (grain iterators)."""

    def __init__(self, directory: str | os.PathLike, *, every: int = 1000, keep: int = 3,
                 async_save: bool = True, read_only: bool = False):
        self.directory = paths.path(directory)
        opts = ocp.CheckpointManagerOptions(save_interval_steps=max(int(every), 1), max_to_keep=keep,
                                            enable_async_checkpointing=async_save, create=not read_only,
                                            read_only=read_only)
        self.mngr = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.mngr.all_steps())

    def should_save(self, step: int) -> bool:
        return self.mngr.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        return self.mngr.reached_preemption(step)

    def save(self, step: int, state: Any, data_iter=None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.mngr.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, data_iter=None) -> Any:
        """The state at `step` with the shardings of `abstract_state`; `data_iter` restored in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        has_data = (self.directory / str(step) / "data").is_dir()
        if data_iter is not None and has_data:
            import grain

            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        elif data_iter is not None:
            logging.warning("checkpoint %s/%d has no data iterator state; the data stream starts afresh",
                            self.directory, step)
        return self.mngr.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()


def locate(path: str | os.PathLike) -> tuple[Path, int | None]:
    """(checkpoints directory, step or None=latest) for a workdir, its checkpoints/ or a step folder."""
    try:
        path = paths.path(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if (path / CKPT_DIR).is_dir():
        return path / CKPT_DIR, None
    if re.fullmatch(r"\d+", path.name) and (path / "state").is_dir():
        return path.parent, int(path.name)
    if path.is_dir() and any(re.fullmatch(r"\d+", p.name) for p in path.iterdir()):
        return path, None
    raise CheckpointError(f"{path}: no training checkpoints here (expected WORKDIR/{CKPT_DIR}/<step>/state)")


def latest_step_in(ckpt_dir: Path) -> int | None:
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir()
                   if re.fullmatch(r"\d+", p.name) and (p / "state").is_dir() and not p.name.endswith(".tmp"))
    return steps[-1] if steps else None


def find_model_config(start: Path) -> dict:
    for d in [start, *start.parents][:4]:
        f = d / MODEL_CONFIG
        if f.is_file():
            return json.loads(f.read_text())
    raise CheckpointError(f"{start}: no {MODEL_CONFIG} in this folder or the three above it")


class _NoMissingMetadataWarning(logging_std.Filter):
    """orbax warns that a CheckpointManager step folder has no per-item `_CHECKPOINT_METADATA`
    when one item is read on its own; nothing is wrong, and users should not be told otherwise."""

    def filter(self, record):
        return "_CHECKPOINT_METADATA" not in record.getMessage()


def read_state_numpy(step_dir: Path, subtree: str | None = "params") -> Any:
    """Arrays of a saved `state` item as host numpy (any mesh), optionally one top-level subtree."""
    ckptr = ocp.PyTreeCheckpointer()
    quiet = _NoMissingMetadataWarning()
    handlers = logging_std.getLogger().handlers + logging_std.getLogger("absl").handlers
    for h in handlers:
        h.addFilter(quiet)
    try:
        meta = ckptr.metadata(step_dir / "state")
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        if subtree is not None:
            tree = {subtree: tree[subtree]}
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                              is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
        restored = ckptr.restore(step_dir / "state", ocp.args.PyTreeRestore(
            item=target, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target),
            partial_restore=True))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{step_dir}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    finally:
        ckptr.close()
        for h in handlers:
            h.removeFilter(quiet)
    return restored[subtree] if subtree is not None else restored


def load_params_from_workdir(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(params, model_config, meta) of the latest checkpoint in a training workdir (or of a given
    checkpoint folder WORKDIR/checkpoints/<step>). Used by `defusion_jax.api.load_model`."""
    ckpt_dir, step = locate(path)
    step = latest_step_in(ckpt_dir) if step is None else step
    if step is None:
        raise CheckpointError(f"{ckpt_dir}: no finished checkpoint yet")
    cfg = find_model_config(ckpt_dir)
    params = read_state_numpy(ckpt_dir / str(step), "params")
    meta = {**cfg.get("meta", {}), "source": str(ckpt_dir / str(step)), "step": step}
    return params, cfg.get("model", {}), meta
