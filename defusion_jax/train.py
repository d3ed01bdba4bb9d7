"""The trainer: one function, read top to bottom, shared by every task (`defusion_jax/tasks/`).

Sections, in order: logging -> mesh -> task and input pipeline -> model and optimiser shapes ->
shardings -> restore or sharded init -> update step -> train loop. What is trained (model, data,
loss, pictures) comes from `config.task`; see `defusion_jax/tasks/__init__.py` for that interface.

Guarantees:
- Parameters are created directly with their shardings (jit of the init with out_shardings), the
  step is `jax.jit` with explicit in/out shardings and the train state donated.
- Per-step randomness is `fold_in(rng, step)`; the data iterator state is checkpointed with the
  train state, so an interrupted run continues exactly (same batches, same parameters).
- Resume order: WORKDIR's latest checkpoint -> `config.resume` (another run) -> `config.init`
  (parameters only) -> from scratch. Re-running the same command after an interruption resumes.
- SIGTERM or Ctrl-C (SIGINT; single process) or a JAX preemption notice (multi-process, TPU pods)
  -> checkpoint at the current step and return with status 'preempted'. A second Ctrl-C, or one
  before the first step has run, raises KeyboardInterrupt (nothing new to save).
- Resuming at step s drops what the interrupted run logged after s (metrics.jsonl rows, TensorBoard
  events), so the logs match the restored state; WORKDIR/config.json is written only once the
  state was restored or initialised, and a resume names the fields that changed.
- A non-finite loss, gradient norm or parameter norm raises `NonFiniteLoss` with the step range;
  checkpoints are only written after every step up to theirs was seen finite, so the last one is good.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from defusion_jax import checkpoints, logging_utils, paths
from defusion_jax import sharding as sh
from defusion_jax.data import pipeline
from defusion_jax.params_io import CheckpointError
from defusion_jax.tasks import INIT_REPORT, get_task, read_init_report, trainer_keys


class NonFiniteLoss(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the message names the steps."""


COMPUTE_DTYPES = ("float32", "bfloat16")  # the activations' type; parameters and optimiser state stay float32


class ConfigError(ValueError):
    """The run cannot start as configured (batch size, mesh, data, teacher...); one-line message."""


@contextlib.contextmanager
def _startup(what: str, also=()):
    """Turn configuration mistakes found while setting up `what` into one-line ConfigErrors
    (ValueError, and the exception types in `also`)."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, *also) as e:  # DataError, TeacherError, bad mesh or batch size, unknown names
        raise ConfigError(f"{what}: {' '.join(str(e).split())}") from None


REPORT_MARK = "final_report.json"  # {"step": N}: the task's final report of step N is complete


def _report_done(workdir, step: int) -> bool:
    """Whether the final report of `step` was completed, agreed by every process (it has collectives)."""
    try:
        done = json.loads((workdir / REPORT_MARK).read_text()).get("step") == step
    except (OSError, ValueError, AttributeError):
        done = False
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        done = bool(multihost_utils.broadcast_one_to_all(np.int32(done)))
    return done


def _check_fields(config) -> None:
    """Values the trainer can tell are wrong before building anything, as one-line ConfigErrors."""
    for field, value, ok, rule in (
            ("batch_size", int(config.batch_size), lambda v: v > 0, "must be positive"),
            ("total_steps", int(config.total_steps), lambda v: v > 0, "must be positive"),
            ("seed", int(config.seed), lambda v: v >= 0, "must be non-negative"),
            # 0 would save nothing while saying 'checkpoint saved', and a rerun would start over
            ("keep_checkpoints", int(_cfg_get(config, "keep_checkpoints", 3)), lambda v: v >= 1, "must be at least 1"),
            ("compute_dtype", str(_cfg_get(config, "compute_dtype", "float32")), lambda v: v in COMPUTE_DTYPES,
             f"must be one of {', '.join(COMPUTE_DTYPES)}")):
        if not ok(value):
            raise ConfigError(f"{field} {rule}, got {value!r}")


def _check_workdir(workdir) -> None:
    """A local workdir must be a folder or not exist yet; a file on its path is a config error."""
    if paths.is_url(workdir):
        return
    for p in [workdir, *workdir.parents]:
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"workdir: {p} is a file" + ("" if p == workdir else f", not a folder ({workdir} "
                                                                                         "cannot be made under it)"))
            return


def _flat(d, prefix=""):
    out = {}
    for k, v in (d.items() if isinstance(d, dict) else ()):
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, current: dict) -> list[str]:
    """'field: old -> new' for every leaf field that differs between two JSON configs."""
    a, b = _flat(saved), _flat(json.loads(json.dumps(current, default=str)))
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "(absent)") != b.get(k, "(absent)")]


def _config_json(config) -> str:
    return (config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort")
            else json.dumps(dict(config), indent=2, default=str)) + "\n"


# ---- optimiser -----------------------------------------------------------------------------------
def learning_rate_fn(schedule, total_steps: int):
    """Learning rate per step: an optional linear warm-up from 0, then `schedule.name`:

    - 'step' (default): `base_lr` multiplied by `gamma` at each milestone, like the MultiStepLR
      schedules of the reference code. Milestones are fractions of the whole run (0.667 = after two
      thirds, warm-up included), so they follow `--config.total_steps`.
    - 'poly': (1 - t)^power decay from `base_lr` to `end_lr` over the steps after the warm-up
      (mmsegmentation's PolyLR).
    - 'cosine': cosine decay from `base_lr` to `end_lr` over the steps after the warm-up (MAE).
    """
    name = str(schedule.get("name", "step"))
    base = float(schedule.base_lr)
    warmup = int(schedule.get("warmup_steps", 0))
    after = max(int(total_steps) - warmup, 1)
    end = float(schedule.get("end_lr", 0.0))
    if name == "step":
        # join_schedules hands the second schedule the steps counted from the warm-up's end
        bounds = {int(round(float(m) * total_steps)) - warmup: float(schedule.get("gamma", 0.5))
                  for m in schedule.get("milestones", ())}
        fn = optax.piecewise_constant_schedule(base, {b: g for b, g in bounds.items() if 0 < b})
    elif name == "poly":
        fn = optax.polynomial_schedule(base, end, float(schedule.get("power", 1.0)), after)
    elif name == "cosine":
        fn = optax.cosine_decay_schedule(base, after, alpha=end / base if base else 0.0)
    else:
        raise ValueError(f"schedule.name must be 'step', 'poly' or 'cosine', got {name!r}")
    if warmup:
        fn = optax.join_schedules([optax.linear_schedule(0.0, base, warmup), fn], [warmup])
    return fn


def build_optimizer(config):
    """Adam (the paper's and the official optimiser) with optional weight decay and clipping."""
    o = config.optimizer
    lr = learning_rate_fn(config.schedule, int(config.total_steps))
    if o.name not in ("adam", "adamw"):
        raise ValueError(f"optimizer must be 'adam' or 'adamw', got {o.name!r}")
    if o.name == "adamw":
        exempt = o.get("decay_exempt_1d", False)  # MAE/timm: no decay on biases and LayerNorm scales
        mask = (lambda params: jax.tree.map(lambda x: x.ndim > 1, params)) if exempt else None
        tx = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)
    else:
        tx = optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
    if o.get("grad_clip_norm"):
        tx = optax.chain(optax.clip_by_global_norm(float(o.grad_clip_norm)), tx)
    return tx, lr


# ---- the update --------------------------------------------------------------------------------
def task_loss(task):
    """`task.loss_fn` as the step differentiates it: FSDP-split parameters are gathered first
    (`sharding.gather_params`), so tasks never see a split weight."""
    return lambda params, *args: task.loss_fn(sh.gather_params(params), *args)


def make_step_fns(task, tx, lr_fn):
    """(init_state, train_step) of a task: the pure functions the trainer jits with its shardings
    (and `benchmarks/` time as they are)."""

    def init_state(rng_init, rng_loop):
        params = task.init_params(rng_init)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(rng_loop)}

    def train_step(state, frozen, batch):
        step = state["step"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        (loss, metrics), grads = jax.value_and_grad(task_loss(task), has_aux=True)(
            state["params"], frozen, batch, rng, step)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                       param_norm=optax.tree.norm(params), lr=lr_fn(step))
        metrics["data/checksum"] = batch_checksum(batch)
        # (param_norm itself can overflow for finite weights near 1e19; count what is not finite)
        metrics["params_finite"] = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
        return {"params": params, "opt_state": opt_state, "step": step + 1, "rng": state["rng"]}, metrics

    return init_state, train_step


def state_shardings(config, state_shape, mesh):
    """Where the train state lives: `config.sharding_rules` (replicate / fsdp, first match wins)
    applied to every parameter and optimiser array."""
    return sh.tree_shardings(state_shape, mesh, _cfg_get(config, "sharding_rules", ((".*", "replicate"),)),
                             fsdp_axis=_cfg_get(config, "fsdp_axis", "data"),
                             fsdp_min_size=int(_cfg_get(config, "fsdp_min_size", 2**16)))


def jit_train_step(train_step, mesh, state_sharding=None):
    """`train_step` jitted as the trainer runs it: the state donated and kept in `state_sharding`
    (default: replicated), the frozen parameters and metrics replicated, every batch leaf sharded
    on its leading axis over the mesh's batch axes. The benchmarks time this same program."""
    repl = sh.replicated(mesh)
    state_sharding = repl if state_sharding is None else state_sharding
    return jax.jit(train_step, in_shardings=(state_sharding, repl, sh.batch_sharding(mesh)),
                   out_shardings=(state_sharding, repl), donate_argnums=(0,))


# ---- small helpers -------------------------------------------------------------------------------
class _StopFlag:
    """Set by SIGTERM/SIGINT in a single-process run; checked once per step.

    Ctrl-C (SIGINT) only asks for a checkpoint once the first step has run (`armed`): before it
    there is nothing new to save and a user interrupting a minute of compilation wants out, so it
    sets `aborted`, and the trainer raises KeyboardInterrupt at its next `check()` (after the
    start-up stages, before every step). Raising in the handler itself can land in a garbage-
    collector callback (JAX has one), where Python prints a traceback and drops the exception. A
    second Ctrl-C raises at once. The CLI reports KeyboardInterrupt in one line (exit code 130)."""

    def __init__(self):
        self.signum = None
        self.armed = False
        self.aborted = False
        self._old = {}

    def install(self, *signums):
        if threading.current_thread() is not threading.main_thread():
            return self
        for s in signums or (signal.SIGTERM, signal.SIGINT):
            if s not in self._old:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def check(self):
        if self.aborted:
            raise KeyboardInterrupt

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and (self.aborted or self.signum is not None):
            self.aborted = True
            raise KeyboardInterrupt  # the second Ctrl-C
        if signum == signal.SIGINT and not self.armed:
            self.aborted = True
            logging.warning("Ctrl-C: stopping at the end of this start-up stage (nothing to save yet; Ctrl-C "
                            "again to stop at once)")
            return
        self.signum = signum
        if signum == signal.SIGINT:
            logging.warning("Ctrl-C: will checkpoint after the current step and stop (Ctrl-C again to abort "
                            "without saving)")
        else:
            logging.warning("received signal %d: will checkpoint after the current step and stop", signum)

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def batch_checksum(batch) -> jax.Array:
    """An order-sensitive fingerprint of a batch, logged so runs can prove they saw the same data."""
    total = 0.0
    for i, x in enumerate(jax.tree.leaves(batch)):
        rows = x.reshape(x.shape[0], -1).astype(jnp.float32).mean(axis=1)
        total = total + (i + 1) * jnp.sum(rows * (1.0 + jnp.arange(x.shape[0], dtype=jnp.float32)))
    return total


def _mean_metrics(pending):
    """Average the scalars of several steps (keys absent in some steps average where present)."""
    sums, counts = {}, {}
    for _, m in pending:
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
            counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


def _check_finite(pending, last_good: int, ckpt_step):
    for step, m in pending:
        # params_finite: the update of step s can overflow while its loss (computed before it) is finite
        bad = [k for k in ("loss", "grad_norm") if k in m and not math.isfinite(float(m[k]))]
        if "params_finite" in m and not bool(m["params_finite"]):
            bad.append("parameters")
        if bad:
            raise NonFiniteLoss(f"{'/'.join(bad)} became non-finite between step {last_good} (last checked "
                                f"finite) and step {step}; stopped. Last good checkpoint: "
                                f"{'step ' + str(ckpt_step) if ckpt_step is not None else 'none'}")


# Config fields that only steer the host side (data files, logging and checkpoint cadence, where to
# resume from): runs that differ only in these reuse one another's traced and compiled functions
# within a process (tests, notebooks), which saves a minute of tracing and compiling per run on CPU.
HOST_ONLY_FIELDS = ("data", "stop_after", "log_every", "ckpt_every", "keep_checkpoints", "async_checkpoints",
                    "tensorboard", "resume", "init", "eval_every", "panel_every")
_PROGRAMS: dict[str, dict] = {}


def _programs_for(config, mesh) -> dict:
    fields = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    key = json.dumps({k: v for k, v in fields.items() if k not in HOST_ONLY_FIELDS}, sort_keys=True, default=str)
    key += repr((mesh.axis_names, tuple(mesh.shape.values()), [d.id for d in mesh.devices.flat], mesh.axis_types,
                 jax.config.read("jax_disable_most_optimizations")))
    return _PROGRAMS.setdefault(key, {})


def _memo(programs: dict, name: str, build):
    if name not in programs:
        programs[name] = build()
    return programs[name]


def _hook_params(params, mesh):
    """Parameters for the host-side hooks (evaluate, final_report), which jit their own programs:
    replicated in Explicit mode, as `task_loss` gives them to the loss."""
    return jax.device_put(params, sh.replicated(mesh)) if sh.is_explicit(mesh) else params


def _ordered_panel(task, out_sharding, n_rows: int):
    """`task.panel` jitted, returning {name: host array of the first `n_rows` samples} in the task's
    column order (a jitted dict comes back with sorted keys; the order of a picture's columns is
    part of what it says)."""
    names: dict[tuple, list[str]] = {}

    def columns(params, frozen, batch, rng):
        cols = task.panel(sh.gather_params(params), frozen, batch, rng) or {}
        cols = {k: sh.first_rows(v, n_rows) for k, v in cols.items()}
        names[tuple(sorted(batch))] = list(cols)
        return [cols[k] for k in cols]

    fn = jax.jit(columns, out_shardings=out_sharding)

    def run(params, frozen, batch, rng):
        arrays = jax.device_get(fn(params, frozen, batch, rng))
        return dict(zip(names[tuple(sorted(batch))], arrays))

    return run


def _check_restorable(ckpt, step: int, abstract_state, where: str) -> None:
    """A checkpoint whose arrays do not match the configured model and optimiser is a config
    mistake (a changed --config.model...), not something orbax's partial_restore should paper over."""
    diff = checkpoints.state_mismatch(ckpt.directory / str(step), abstract_state)
    if diff:
        src = where.split("=", 1)[-1]
        # state_mismatch names parameter arrays first, so any parameter difference shows in `diff`;
        # config.init needs the same parameter tree, so it is only a way out when just the optimiser changed.
        way_out = ("use a new workdir (the parameters differ, so --config.init cannot take them either)"
                   if "params/" in diff else f"use a new workdir, or --config.init={src} to start from its parameters "
                   "with a fresh optimizer")
        raise ConfigError(f"checkpoint in {where} was written with a different model/optimizer ({diff}); {way_out}")


def _cfg_get(config, key, default=None):
    return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


# ---- the trainer ---------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str) -> dict:
    """Train `config.task` into `workdir`; returns {'status', 'step', 'checkpoint', 'workdir'}."""
    fast_compile_before = jax.config.read("jax_disable_most_optimizations")
    if _cfg_get(config, "fast_compile", False):  # small runs are dominated by XLA compile time
        jax.config.update("jax_disable_most_optimizations", True)
    logging_utils.quiet_library_logs()
    try:
        # The writer, checkpointer and signal handlers close on every exit, a failed start-up too:
        # left to atexit, tensorboardX's writer raises at interpreter shutdown on Python 3.12.
        with contextlib.ExitStack() as cleanup:
            return _train(config, workdir, cleanup)
    finally:
        jax.config.update("jax_disable_most_optimizations", fast_compile_before)


def _train(config, workdir, cleanup: contextlib.ExitStack) -> dict:
    # ================================ Logging ====================================================
    try:
        workdir = paths.path(workdir)  # gs:// for a pod's shared workdir
    except ValueError as e:
        raise ConfigError(f"workdir: {e}") from None
    _check_workdir(workdir)
    _check_fields(config)  # before the workdir is made: a mistyped value leaves no empty run behind
    pidx, pcount = jax.process_index(), jax.process_count()
    stop = _StopFlag()
    cleanup.callback(stop.restore)
    if pcount == 1:  # Ctrl-C from here on: abort (one line from the CLI) until the first step has run
        stop.install(signal.SIGINT)
    sh.log_topology()
    if pidx == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        writer = cleanup.enter_context(contextlib.closing(
            logging_utils.MetricWriter(workdir, enabled=pidx == 0, tensorboard=_cfg_get(config, "tensorboard", True))))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    total = int(config.total_steps)

    # ================================ Mesh =======================================================
    with _startup("mesh"):
        mesh = sh.make_mesh(config.mesh, _cfg_get(config, "mesh_axis_types", "auto"))
        if int(config.batch_size) % pcount:
            raise ValueError(f"batch size {config.batch_size} does not split over {pcount} processes")
        per_device = sh.batch_size_per_device(mesh, int(config.batch_size))
    logging.info("mesh %s (%s axes), global batch %d = %d per device", dict(mesh.shape),
                 _cfg_get(config, "mesh_axis_types", "auto"), config.batch_size, per_device)
    repl = sh.replicated(mesh)

    # ================================ Task and input pipeline ====================================
    with _startup("task"):
        task = get_task(config.task)(config, mesh)
    with _startup("data"):
        train_iter = iter(task.make_train_data(pidx, pcount))
    stop.check()

    # ================================ Model and optimiser shapes =================================
    with _startup("optimizer"):
        tx, lr_fn = build_optimizer(config)
    rng_init, rng_loop = trainer_keys(config)

    init_state, train_step = make_step_fns(task, tx, lr_fn)
    programs = _programs_for(config, mesh)  # traced/compiled functions shared by identical runs
    # Shape errors of a model the config cannot build (widths that do not divide, an image size
    # that is no multiple of the patch) surface here as ValueError/TypeError: config mistakes.
    with _startup("model (config.model)", also=(TypeError,)):
        state_shape = _memo(programs, "state_shape", lambda: jax.eval_shape(init_state, rng_init, rng_loop))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state_shape["params"]))
    # the matmul precision is not in the config (JAX_DEFAULT_MATMUL_PRECISION, e.g. bfloat16 products)
    logging.info("model: %s trainable parameters; compute %s, matmul precision %s", f"{n_params:,}",
                 _cfg_get(config, "compute_dtype", "float32"), jax.config.jax_default_matmul_precision or "default")
    stop.check()

    # ================================ Shardings ==================================================
    state_sharding = state_shardings(config, state_shape, mesh)
    for line in sh.describe_shardings(state_shape["params"], state_sharding["params"]):
        logging.info("sharded param: %s", line)
    with _startup("frozen parameters"):
        frozen = jax.device_put(task.load_frozen(), repl)  # replicated, never optimised nor saved
    abstract_state = jax.tree.map(lambda s, shd: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shd),
                                  state_shape, state_sharding)

    # ================================ Restore or sharded init ====================================
    ckpt = cleanup.enter_context(contextlib.closing(
        checkpoints.Checkpointer(workdir / checkpoints.CKPT_DIR, every=int(config.ckpt_every),
                                 keep=int(_cfg_get(config, "keep_checkpoints", 3)),
                                 async_save=bool(_cfg_get(config, "async_checkpoints", True)))))
    with jax.set_mesh(mesh):
        if ckpt.latest_step() is not None:
            _check_restorable(ckpt, ckpt.latest_step(), abstract_state, str(workdir))
            state = ckpt.restore(ckpt.latest_step(), abstract_state, train_iter)
            origin = f"resumed {workdir} at step {ckpt.latest_step()}"
            if (init_report := read_init_report(workdir)) is not None:  # what config.init loaded, for the report
                task.init_report = init_report
            if _cfg_get(config, "init"):
                logging.warning("config.init=%s is not loaded: the run resumes from its own checkpoint (step %d); "
                                "use a new workdir to start from it", config.init, ckpt.latest_step())
        elif _cfg_get(config, "resume"):
            with _startup(f"config.resume={config.resume}", also=(OSError, CheckpointError)):
                src_dir, src_step = checkpoints.locate(config.resume)
            with contextlib.closing(checkpoints.Checkpointer(src_dir, read_only=True)) as src:
                src_step = src.latest_step() if src_step is None else src_step
                _check_restorable(src, src_step, abstract_state, f"config.resume={config.resume}")
                state = src.restore(src_step, abstract_state, train_iter)
            origin = f"resumed from config.resume={config.resume} at step {src_step}"
        else:
            init_fn = _memo(programs, "init", lambda: jax.jit(init_state, out_shardings=state_sharding))
            state = init_fn(rng_init, rng_loop)
            origin = "initialised from scratch"
            if _cfg_get(config, "init"):
                with _startup(f"config.init={config.init}", also=(OSError, CheckpointError)):
                    params = task.load_init_params(config.init, state_shape["params"])
                state["params"] = jax.device_put(jax.tree.map(np.asarray, params), state_sharding["params"])
                origin = f"parameters from config.init={config.init}"
    first_step = int(jax.device_get(state["step"]))
    logging.info("%s", origin)
    stop.check()
    writer.resume_at(first_step)  # what an interrupted run logged after its last checkpoint goes
    writer.text("config", "```\n" + str(config) + "\n```")
    if pidx == 0:
        saved = workdir / "config.json"
        if first_step and saved.exists():
            try:
                changes = config_changes(json.loads(saved.read_text()), json.loads(_config_json(config)))
            except ValueError:  # an unreadable old copy is simply replaced
                changes = ["(the saved config.json could not be read)"]
            for line in changes:
                logging.warning("config changed since the last run in %s: %s", workdir, line)
        if first_step < total or not saved.exists():  # a rerun with nothing to train keeps the run's record
            paths.write_text_whole(saved, _config_json(config))
        checkpoints.write_model_config(workdir, task.model_config(), {"task": config.task, "source": str(workdir)})
        if getattr(task, "init_report", None):
            paths.write_text_whole(workdir / INIT_REPORT, json.dumps(task.init_report, indent=1, default=str) + "\n")

    # ================================ Update step ================================================
    step_fn = _memo(programs, "step", lambda: jit_train_step(train_step, mesh, state_sharding))
    panel_every = int(_cfg_get(config, "panel_every", 0))
    panel_rows = int(_cfg_get(config, "panel_samples", 2))
    panel_fn = _memo(programs, "panel", lambda: _ordered_panel(task, repl, panel_rows)) if panel_every else None

    # ================================ Train loop =================================================
    log_every = max(int(_cfg_get(config, "log_every", 50)), 1)
    eval_every = int(_cfg_get(config, "eval_every", 0))
    stop_after = int(_cfg_get(config, "stop_after", 0) or 0)
    ckpt_every = max(int(config.ckpt_every), 0)  # 0: only at the end (and on preemption)
    if pcount == 1:  # multi-process jobs get SIGTERM through JAX's preemption notice (below)
        stop.install(signal.SIGTERM)
    progress = logging_utils.Progress(total, int(config.batch_size), first_step)
    pending, last_checked, status = [], first_step, "done"
    step = first_step
    if first_step >= total:
        logging.info("nothing to do: step %d >= total_steps %d", first_step, total)
    for step in range(first_step + 1, total + 1):
        stop.check()
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            batch = sh.global_batch(next(train_iter), mesh)
            with jax.set_mesh(mesh):
                state, metrics = step_fn(state, frozen, batch)
        pending.append((step, metrics))
        if step == first_step + 1:
            jax.block_until_ready(metrics)
            logging.info("first step done (compiled) at step %d", step)
            progress.started(step)
            stop.check()
            stop.armed = True

        preempted = stop.signum is not None or ckpt.reached_preemption(step)
        last = step == total or (stop_after and step - first_step >= stop_after)
        saving = (ckpt_every and step % ckpt_every == 0) or last or preempted
        if step % log_every == 0 or saving:
            pending = [(s, jax.device_get(m)) for s, m in pending]
            _check_finite(pending, last_checked, ckpt.latest_step())
            last_checked = step
            if step % log_every == 0 or last or preempted:  # a stop keeps the steps since the last row
                values = _mean_metrics(pending)
                values["data/skipped_images"] = pipeline.skipped_files()
                speed = progress.report(step)
                values.update(speed)
                writer.scalars(step, values)
                logging.info("%s", logging_utils.progress_line(step, total, values, speed, task.console_keys))
                pending = []
        if panel_fn is not None and (step % panel_every == 0 or last):  # every process runs it
            t0 = time.perf_counter()
            with jax.set_mesh(mesh):
                cols = panel_fn(state["params"], frozen, batch,
                                jax.random.fold_in(jax.random.key(int(config.seed) + 1), step))
            if pidx == 0 and cols:
                grid = logging_utils.image_grid(cols)
                logging_utils.save_panel(workdir, step, grid)
                writer.image(step, "panel", grid)
            progress.pause(time.perf_counter() - t0)
        if eval_every and (step % eval_every == 0 or last):
            t0 = time.perf_counter()
            ev = task.evaluate(_hook_params(state["params"], mesh), frozen, step)
            if ev:
                writer.scalars(step, {f"eval/{k}": v for k, v in ev.items()})
                logging.info("eval at step %d: %s", step, ev)
            progress.pause(time.perf_counter() - t0)
        if saving:
            t0 = time.perf_counter()
            writer.flush()  # the logged metrics reach the workdir with each checkpoint
            ckpt.save(step, state, train_iter, force=True)
            progress.pause(time.perf_counter() - t0)
        if preempted:
            ckpt.wait()
            status = "preempted"
            logging.warning("stopped at step %d after %s; checkpoint saved. Run the same command again to "
                            "resume.", step, "Ctrl-C" if stop.signum == signal.SIGINT else "a termination signal")
            break
        if last and step != total:
            status = "stopped"
            logging.info("stop_after=%d reached at step %d; checkpoint saved", stop_after, step)
            break
    else:  # the last step is done: the task's report, once (a run stopped during it writes it when rerun)
        if first_step < total or not _report_done(workdir, step):
            if first_step >= total:
                logging.info("writing the final report of step %d (the run that reached it stopped before "
                             "finishing it)", step)
            with paths.staged(workdir) as local:
                task.final_report(_hook_params(state["params"], mesh), frozen, str(local))
            if pidx == 0:
                paths.write_text_whole(workdir / REPORT_MARK, json.dumps({"step": step}) + "\n")
    ckpt.wait()  # the step reported is on disk
    return {"status": status, "step": step, "checkpoint": ckpt.latest_step(), "workdir": str(workdir)}
