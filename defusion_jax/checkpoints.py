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

import contextlib
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
        # read-only: no saving interval and no retention (orbax warns about each one it has to reset)
        opts = ocp.CheckpointManagerOptions(save_interval_steps=0 if read_only else max(int(every), 1),
                                            max_to_keep=None if read_only else keep,
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
        """The state at `step` with the shardings of `abstract_state`; `data_iter` restored in place.

        A checkpoint written by another number of processes has one iterator state per process of
        that run; it is translated for this one (`translate_iterator_state`) when that is exact."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        data_dir = self.directory / str(step) / "data"
        has_data = data_dir.is_dir()
        saved = _saved_iterator_states(data_dir) if data_iter is not None and has_data else None
        if saved is not None and len(saved) != jax.process_count():
            state = translate_iterator_state(saved, jax.process_count(), where=f"{self.directory}/{step}")
            restored = self.mngr.restore(step, args=ocp.args.Composite(**items))["state"]
            data_iter.set_state(state)
            logging.warning("checkpoint %s/%d was written by %d processes, this run has %d: the data iterator "
                            "position was translated (the global batches continue as they would have)",
                            self.directory, step, len(saved), jax.process_count())
            return restored
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


def _saved_iterator_states(data_dir) -> list[dict] | None:
    """The grain iterator states of a checkpoint's `data` item, in process order (None: not JSON
    files per process, e.g. another grain version; orbax restores those as before)."""
    files = {}
    for f in data_dir.iterdir():
        m = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", f.name)
        if m:
            files[(int(m.group(1)), int(m.group(2)))] = f
    counts = {n for _, n in files}
    if len(counts) != 1 or sorted(i for i, _ in files) != list(range(counts.pop())):
        return None
    return [json.loads(files[k].read_text()) for k in sorted(files)]


_ITERATOR_KEYS = {"parents", "index", "stop", "next_index"}


def translate_iterator_state(states: list[dict], process_count: int, where: str = "checkpoint") -> dict:
    """The iterator state for each of `process_count` processes, from the states saved by
    len(states) processes, when the data order is a function of the step alone.

    Every process's stream takes its block of each global batch (`data.pipeline.BatchBlockShard`),
    so after k batches each saved process stands at element k * B / N of its stream (`next_index`)
    and the mix of streams at batch k (`index`, process independent). The same position with M
    processes is next_index * N / M. This holds when all saved states are equal and divide
    exactly; a process that skipped an unusable image stands elsewhere, and then the run cannot
    continue the same batches (CheckpointError naming both process counts)."""
    n = len(states)
    fail = (f"{where} was written by {n} process{'es' if n > 1 else ''} and this run has {process_count}: the data "
            f"iterator position cannot be carried over")
    if any(s != states[0] for s in states[1:]):
        raise CheckpointError(f"{fail} (the processes stand at different positions, e.g. after skipping unusable "
                              f"images); resume with {n} processes")

    def scale(node):
        if not isinstance(node, dict) or set(node) - _ITERATOR_KEYS:
            raise CheckpointError(f"{fail} (unknown iterator state {json.dumps(node)[:200]}); resume with {n} "
                                  "processes")
        out = dict(node)
        if "parents" in out:
            parents = out["parents"]
            out["parents"] = ({k: scale(v) for k, v in parents.items()} if isinstance(parents, dict)
                              else [scale(v) for v in parents])
        if "next_index" in out:
            moved = int(out["next_index"]) * n
            if moved % process_count:
                raise CheckpointError(f"{fail} (element {out['next_index']} does not split over {process_count} "
                                      f"processes); resume with {n} processes")
            out["next_index"] = moved // process_count
        return out

    return scale(states[0])


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


@contextlib.contextmanager
def _quiet_metadata_warning():
    quiet = _NoMissingMetadataWarning()
    handlers = logging_std.getLogger().handlers + logging_std.getLogger("absl").handlers
    for h in handlers:
        h.addFilter(quiet)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(quiet)


def _leaf_paths(tree) -> dict[str, tuple]:
    """{'params/encoder/.../kernel': shape} of a pytree of arrays, shape structs or orbax metadata
    (orbax stores optax's named tuples as lists of dicts: keys are compared by name or index)."""
    def name(k):
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    is_leaf = lambda m: hasattr(m, "shape") and hasattr(m, "dtype")  # noqa: E731
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {"/".join(name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def state_mismatch(step_dir: Path, abstract_state: Any, show: int = 3) -> str | None:
    """None if the checkpoint's `state` holds exactly the arrays of `abstract_state` (paths and
    shapes), else a short description of the difference (a few array names of each kind)."""
    with _quiet_metadata_warning():
        meta = ocp.PyTreeCheckpointer().metadata(step_dir / "state")  # a local or gs:// path
    tree = getattr(meta, "item_metadata", meta)
    saved, wanted = _leaf_paths(getattr(tree, "tree", tree)), _leaf_paths(abstract_state)
    order = lambda k: (not k.startswith("params/"), k)  # noqa: E731  parameter names say most
    missing = sorted(set(wanted) - set(saved), key=order)
    extra = sorted(set(saved) - set(wanted), key=order)
    shapes = sorted((k for k in set(saved) & set(wanted) if saved[k] != wanted[k]), key=order)
    parts = []
    for what, keys, fmt in (("not in the checkpoint", missing, str),
                            ("only in the checkpoint", extra, str),
                            ("with another shape", shapes, lambda k: f"{k} {saved[k]} vs {wanted[k]} now")):
        if keys:
            more = f" and {len(keys) - show} more" if len(keys) > show else ""
            parts.append(f"{len(keys)} arrays {what}: {', '.join(fmt(k) for k in keys[:show])}{more}")
    return "; ".join(parts) or None


def read_state_numpy(step_dir: Path, subtree: str | None = "params") -> Any:
    """Arrays of a saved `state` item as host numpy (any mesh), optionally one top-level subtree."""
    ckptr = ocp.PyTreeCheckpointer()
    try:
        with _quiet_metadata_warning():
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
