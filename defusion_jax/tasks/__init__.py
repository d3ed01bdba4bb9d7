"""Training tasks: what `defusion_jax.train` trains, selected by `config.task`.

The trainer (`defusion_jax/train.py`) owns everything generic: processes and mesh, parameter and
optimiser shardings, the jitted sharded step with donation, the optimiser and its schedule,
checkpoints (orbax, with the grain iterator state), resume order, SIGTERM / preemption, the
non-finite guard, metrics, TensorBoard and picture panels. A task owns the model, its data and its
loss. To add one, write `defusion_jax/tasks/<name>.py` with a subclass of `Task` assigned to a
module-level `TASK`, and a config that sets `config.task = "<name>"`; train.py does not change.

The interface (all methods get plain pytrees; nothing here may hold device state between calls):

    class MyTask(Task):
        def __init__(self, config, mesh): ...            # read config, build flax modules
        def init_params(self, rng) -> params             # traced under jax.jit (sharded init) and
                                                         # jax.eval_shape; plain nested dict
        def model_config(self) -> dict                   # JSON-able; saved as WORKDIR/model_config.json
        def load_frozen(self) -> pytree                  # host arrays never trained nor checkpointed
                                                         # (e.g. a teacher); {} if none. Replicated.
        def make_train_data(self, process_index, process_count) -> grain.IterDataset
                                                         # endless per-process batches: dicts of numpy
                                                         # arrays whose leading axis is this process's
                                                         # share (config.batch_size // process_count)
        def loss_fn(self, params, frozen, batch, rng, step) -> (loss, metrics)
                                                         # traced inside the step; batch leaves are
                                                         # global jax.Arrays sharded over the batch
                                                         # axis; metrics: dict of scalars
    optional (defaults below do nothing):
        def load_init_params(self, path, params_shape) -> params   # config.init (params only)
        def panel(self, params, frozen, batch, rng) -> {name: (B, H, W, C) images in [0,1]}
                                                         # traced, on the whole batch; the trainer
                                                         # shows the first config.panel_samples rows
                                                         # every config.panel_every steps
        def evaluate(self, params, frozen, step) -> {name: float}  # host side, every config.eval_every
        def final_report(self, params, frozen, workdir) -> None     # once, after the last step
        console_keys: tuple of metric names the progress line shows after the loss

Batches may differ in structure from step to step (the pretraining task mixes single-modal and
multi-modal batches); the step is compiled once per structure.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping


class Task:
    """Base class with the optional hooks; see the module docstring for the contract."""

    console_keys: tuple[str, ...] = ()

    def __init__(self, config, mesh):
        self.config = config
        self.mesh = mesh

    # -- required ------------------------------------------------------------------------------
    def init_params(self, rng):
        raise NotImplementedError

    def model_config(self) -> dict:
        raise NotImplementedError

    def make_train_data(self, process_index: int, process_count: int):
        raise NotImplementedError

    def loss_fn(self, params, frozen, batch, rng, step):
        raise NotImplementedError

    # -- optional ------------------------------------------------------------------------------
    def load_frozen(self) -> Any:
        return {}

    def load_init_params(self, path: str, params_shape: Any):
        """Default: parameters of a training workdir, a converted params folder or anything
        `defusion_jax.api.load_model` reads; the tree must match `params_shape` exactly."""
        from defusion_jax.api import load_model

        return check_same_structure(load_model(path).params, params_shape, path)

    def panel(self, params, frozen, batch, rng) -> Mapping[str, Any] | None:
        return None

    def evaluate(self, params, frozen, step: int) -> Mapping[str, float]:
        return {}

    def final_report(self, params, frozen, workdir: str) -> None:
        return None


def trainer_keys(config):
    """(rng_init, rng_loop): the trainer's parameter-init and loop keys, from `config.seed`. A task's
    `load_init_params` initialises fresh parts with rng_init, so they come out as in a from-scratch
    run of the same config (Flax derives each module's key from its path)."""
    import jax

    return tuple(jax.random.split(jax.random.key(int(config.seed))))


def as_dict(cfg) -> dict:
    """A config block (ConfigDict, mapping or None) as a plain dict."""
    if cfg is None:
        return {}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def backbone_model_config(config) -> dict:
    """`config.model` as a plain dict for a downstream model, with `config.remat` applied to the
    DeFusion++ backbone's ViT encoder (`model.backbone.vit`)."""
    m = as_dict(config.model)
    m["backbone"] = dict(m.get("backbone") or {})
    if m["backbone"].get("vit") is not None:
        m["backbone"]["vit"] = dict(m["backbone"]["vit"])
        if config.get("remat", False):
            m["backbone"]["vit"]["remat"] = True
    return m


def check_same_structure(params, params_shape, source: str = "init"):
    """`params` as they are, or a ValueError whose one line says how they differ from `params_shape`
    (the model being trained): missing, unexpected and mis-shaped keys, or the nesting."""
    import jax

    from defusion_jax.params_io import flat_shapes, shape_mismatch

    problem = shape_mismatch(flat_shapes(params), flat_shapes(params_shape))
    if problem is None and jax.tree.structure(params) != jax.tree.structure(params_shape):
        problem = "nesting differs"
    if problem:
        raise ValueError(f"{source}: parameters do not match the model being trained: {problem}")
    return params


def get_task(name: str) -> type[Task]:
    """The Task class (module-level `TASK`) of `defusion_jax.tasks.<name>`, or of the module `name`
    itself when it is not one of ours (tasks kept outside the package: 'myproject.tasks.foo')."""
    for module_name in (f"defusion_jax.tasks.{name}", name):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and module_name.startswith(e.name):
                continue  # this candidate does not exist; a missing import *inside* it is re-raised
            raise
        if not hasattr(module, "TASK"):
            raise ValueError(f"task module {module_name} defines no TASK")
        return module.TASK
    raise ValueError(f"unknown task {name!r}: no module defusion_jax/tasks/{name}.py (nor an importable {name!r})")


# ---- where a fine-tuned backbone came from ----------------------------------------------------------
INIT_REPORT = "init_report.json"  # the `init_report` of the run that loaded config.init, for its reports


def read_init_report(workdir) -> dict | None:
    """The init report the trainer saved in `workdir` when it loaded config.init, or None."""
    import json

    try:
        report = json.loads((workdir / INIT_REPORT).read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


# ---- re-evaluating a finished workdir (`python -m defusion_jax.tasks.<name> --workdir DIR`) --------
def restore_for_eval(workdir, task_name: str, edit=None):
    """(task, replicated params, config, checkpoint meta) of a finished `task_name` run, rebuilt from
    WORKDIR/config.json and its latest checkpoint; `edit(config)` may change the config first."""
    import json
    from pathlib import Path

    import jax
    import ml_collections

    from defusion_jax import checkpoints
    from defusion_jax import sharding as sh
    from defusion_jax.params_io import CheckpointError

    wd = Path(workdir)
    if not (wd / "config.json").is_file():
        raise CheckpointError(f"{wd}: no config.json (not a training workdir)")
    config = ml_collections.ConfigDict(json.loads((wd / "config.json").read_text()))
    if config.get("task") != task_name:
        raise CheckpointError(f"{wd}: a {config.get('task')!r} run, not a {task_name!r} run")
    params, _, meta = checkpoints.load_params_from_workdir(wd)
    if edit is not None:
        edit(config)
    mesh = sh.make_mesh(config.mesh, config.get("mesh_axis_types", "auto"))
    task = get_task(task_name)(config, mesh)
    task.init_report = read_init_report(wd)
    return task, jax.device_put(params, sh.replicated(mesh)), config, meta


def workdir_eval_main(argv, prog: str, description: str, evaluate, summary) -> int:
    """The re-evaluation command of a task: `evaluate(workdir, split)` then print `summary(result)`
    lines; unusable workdirs, data or splits end with one 'error:' line and exit code 2."""
    import argparse
    import sys

    from defusion_jax.data.sources import DataError
    from defusion_jax.params_io import CheckpointError

    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--workdir", required=True, help="a finished training workdir of this task")
    ap.add_argument("--split", default=None, help="evaluate this split instead of the config's")
    args = ap.parse_args(argv)
    from defusion_jax import compile_cache

    compile_cache.enable()
    try:
        result = evaluate(args.workdir, args.split)
    except (CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in summary(result):
        print(line)
    return 0
