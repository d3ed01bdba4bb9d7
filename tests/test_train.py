"""End-to-end training: the smoke config trained in this process (so every run after the first
reuses the traced and compiled step), and the command line for start-up errors.

Runs share one workdir layout: `smoke` trains 60 steps (checkpoints every 8 steps); the resume,
SIGTERM and overfit tests restart from or compare against it.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from defusion_jax import checkpoints, logging_utils, train
from defusion_jax.tasks import Task

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "defusion_jax" / "sample_data"


def smoke_config(**overrides):
    from configs.pretrain import get_config

    c = get_config("smoke")
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split("__")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def train_here(workdir, **overrides):
    return train.train_and_evaluate(smoke_config(**overrides), str(workdir))


def main_cmd(workdir, *overrides, config="configs/pretrain.py:smoke"):
    return [sys.executable, "-m", "defusion_jax.main", f"--config={config}", f"--workdir={workdir}", *overrides]


def main_env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def run_main(workdir, *overrides, expect_rc=0, timeout=600, config="configs/pretrain.py:smoke"):
    r = subprocess.run(main_cmd(workdir, *overrides, config=config), cwd=REPO, env=main_env(),
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == expect_rc, f"rc={r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-6000:]}"
    return r


def steps_logged(workdir, key):
    return {row["step"]: row[key] for row in logging_utils.read_metrics(workdir) if key in row}


def same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


# Every run of the smoke model shares these so that its programs are compiled once per session.
QUIET = dict(log_every=1, panel_every=0, ckpt_every=1000)


def train_smoke_reference(workdir):
    """The `smoke` fixture's run (conftest.py): 60 steps, metrics every step, a checkpoint every 8."""
    t0 = time.time()
    result = train_here(workdir, log_every=1, ckpt_every=8, keep_checkpoints=10)
    return workdir, result, time.time() - t0


def test_smoke_run_trains_logs_and_checkpoints(smoke, caplog):
    workdir, result, seconds = smoke
    assert result["status"] == "done" and result["step"] == 60
    rows = logging_utils.read_metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, 61))
    single = [row["loss/single"] for row in rows if "loss/single" in row]
    assert np.mean(single[-5:]) < 0.5 * np.mean(single[:5]), single  # the loss falls
    assert sum("loss/multi" in row for row in rows) == 15, "a quarter of the batches are multi-modal (MCUD)"
    for key in ("img_per_sec", "eta_sec", "grad_norm", "lr", "data/checksum", "cud/common", "cud/fused_l1",
                "mfm/recon", "mcud/unique", "mcud/common", "views/common_frac"):
        assert any(key in row for row in rows), key
    assert sorted(p.name for p in (workdir / "panels").glob("*.png")) == ["step_0000030.png", "step_0000060.png"]
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == \
        [8, 16, 24, 32, 40, 48, 56, 60]
    cfg = json.loads((workdir / "model_config.json").read_text())
    assert cfg["model"]["multimodal"] is True and "dtype" not in cfg["model"]
    print(f"smoke run in-process: {seconds:.1f} s wall including compilation")


def test_load_model_reads_the_trained_params(smoke):
    from defusion_jax.api import load_model

    workdir = smoke[0]
    m = load_model(workdir)
    assert m.meta["step"] == 60
    params_60 = checkpoints.load_params_from_workdir(workdir / "checkpoints" / "60")[0]
    same_params(m.params, params_60)
    params_8 = checkpoints.load_params_from_workdir(workdir / "checkpoints" / "8")[0]
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params_8), jax.tree.leaves(params_60)))
    x = np.random.default_rng(0).random((1, 64, 64, 3), np.float32)
    parts = m.decompose(x, x)
    assert parts["fused"].shape == (1, 64, 64, 3) and np.all(np.isfinite(np.asarray(parts["fused"])))


def test_exact_resume(smoke, tmp_path):
    """4 steps, a fresh trainer restored from disk, 4 more == the 8 straight steps of the smoke run:
    the same batches in the same order and bit-identical parameters."""
    first = train_here(tmp_path, stop_after=4, **QUIET)
    assert first["status"] == "stopped" and first["checkpoint"] == 4
    # a kill -9 after step 6: rows 5 and 6 (and half a row) were logged, no checkpoint after 4
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.0}\n{"step": 6, "loss": 1.0}\n{"step": 7, "lo')
    second = train_here(tmp_path, stop_after=4, **QUIET)
    assert second["step"] == 8
    assert [r["step"] for r in logging_utils.read_metrics(tmp_path)] == list(range(1, 9)), "rows after 4 kept"
    straight = steps_logged(smoke[0], "data/checksum")
    split = steps_logged(tmp_path, "data/checksum")
    assert [split[s] for s in range(1, 9)] == [straight[s] for s in range(1, 9)], "data order differs"
    assert set(steps_logged(tmp_path, "loss/multi")) == {s for s in steps_logged(smoke[0], "loss/multi") if s <= 8}
    same_params(checkpoints.load_params_from_workdir(tmp_path)[0],
                checkpoints.load_params_from_workdir(smoke[0] / "checkpoints" / "8")[0])
    assert [steps_logged(tmp_path, "loss")[s] for s in range(1, 9)] == [steps_logged(smoke[0], "loss")[s]
                                                                         for s in range(1, 9)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_checkpoints_and_the_same_run_resumes(smoke, tmp_path, signum):
    caught = []
    previous = signal.signal(signum, lambda *a: caught.append(a))  # if the run ended first
    done = threading.Event()

    def send_sigterm_after_step_3():
        while not done.is_set():
            rows = logging_utils.read_metrics(tmp_path)
            if rows and rows[-1]["step"] >= 3:
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=send_sigterm_after_step_3, daemon=True)
    killer.start()
    try:
        result = train_here(tmp_path, **QUIET)
    finally:
        done.set()
        killer.join()
        signal.signal(signum, previous)
    assert not caught, "the signal arrived after the run had finished"
    assert result["status"] == "preempted"
    stopped = result["step"]
    assert 3 <= stopped < 60 and result["checkpoint"] == stopped
    again = train_here(tmp_path, stop_after=2, **QUIET)
    assert again["step"] == stopped + 2 and again["checkpoint"] == stopped + 2
    # nothing was lost: the interrupted run continued exactly where the uninterrupted one would be
    logged = steps_logged(tmp_path, "data/checksum")
    reference = steps_logged(smoke[0], "data/checksum")
    assert [logged[s] for s in range(1, stopped + 3)] == [reference[s] for s in range(1, stopped + 3)]


def test_a_final_report_cut_short_is_written_by_the_next_run(tmp_path, monkeypatch):
    """A run that dies (or is stopped) during its last step or its final report (segment/detect
    reports, the MAE teacher export) leaves a checkpoint at total_steps; rerunning the command
    writes the report instead of saying 'nothing to do' for ever; once written, it is not redone."""
    from defusion_jax.tasks.pretrain import PretrainTask

    calls = []

    def report(self, params, frozen, workdir):
        calls.append(workdir)
        if len(calls) == 1:
            raise RuntimeError("killed during the report")
        (Path(workdir) / "report.txt").write_text("done")

    monkeypatch.setattr(PretrainTask, "final_report", report)
    with pytest.raises(RuntimeError, match="killed during the report"):
        train_here(tmp_path, total_steps=2, **QUIET)
    assert checkpoints.Checkpointer(tmp_path / checkpoints.CKPT_DIR, read_only=True).latest_step() == 2
    again = train_here(tmp_path, total_steps=2, **QUIET)
    assert again["step"] == 2 and len(calls) == 2 and (tmp_path / "report.txt").read_text() == "done"
    assert json.loads((tmp_path / train.REPORT_MARK).read_text()) == {"step": 2}
    train_here(tmp_path, total_steps=2, **QUIET)
    assert len(calls) == 2


def test_a_stop_between_log_rows_logs_the_steps_since_the_last_row(tmp_path, monkeypatch):
    """A preemption notice at step 3 with log_every 1000: the row of steps 1-3 is written with the
    checkpoint, not lost (the resumed run's rows start after the checkpoint)."""
    monkeypatch.setattr(checkpoints.Checkpointer, "reached_preemption", lambda self, step: step == 3)
    result = train_here(tmp_path, **{**QUIET, "log_every": 1000})
    assert result["status"] == "preempted" and result["checkpoint"] == 3
    assert [r["step"] for r in logging_utils.read_metrics(tmp_path)] == [3]


def test_the_init_record_survives_a_resume(smoke, tmp_path, monkeypatch, caplog):
    """What config.init loaded (segment/detect reports print it) is saved in the workdir, so a
    resumed run's final report still names it; config.init is not loaded again, and says so."""
    from defusion_jax.tasks.pretrain import PretrainTask

    load, seen = PretrainTask.load_init_params, []

    def load_and_record(self, path, shape):
        self.init_report = {"source": str(path), "loaded": 7}
        return load(self, path, shape)

    monkeypatch.setattr(PretrainTask, "load_init_params", load_and_record)
    monkeypatch.setattr(PretrainTask, "final_report", lambda self, *a: seen.append(getattr(self, "init_report", None)))
    init = str(smoke[0] / "checkpoints" / "8")
    assert train_here(tmp_path, init=init, total_steps=3, stop_after=1, **QUIET)["status"] == "stopped"
    with caplog.at_level("WARNING"):
        train_here(tmp_path, init=init, total_steps=3, **QUIET)
    assert seen == [{"source": init, "loaded": 7}]
    assert any(f"config.init={init} is not loaded" in r.getMessage() for r in caplog.records)


def test_init_crosses_between_cud_only_and_multimodal_networks(smoke, tmp_path):
    """config.init from a CUD-only network (the official UCMIMNet's kind, mm_ratio 0) into one with
    the Eq. 6 heads starts those heads fresh, the other way drops them; every other array is the
    source's. A source of another architecture is refused, naming the arrays that differ."""
    from defusion_jax import sharding as sh
    from defusion_jax.models.defusion import MULTIMODAL_ONLY
    from defusion_jax.params_io import save_params
    from defusion_jax.tasks import check_same_structure, get_task, trainer_keys

    params, model_cfg, _ = checkpoints.load_params_from_workdir(smoke[0])
    cud = save_params(tmp_path / "cud", {k: v for k, v in params.items() if k not in MULTIMODAL_ONLY},
                      {**model_cfg, "multimodal": False})
    mesh = sh.make_mesh((("data", -1),))
    for mm_ratio, source in ((0.25, cud), (0.0, smoke[0])):
        task = get_task("pretrain")(smoke_config(mm_ratio=mm_ratio), mesh)
        shape = jax.eval_shape(task.init_params, jax.random.key(0))
        got = task.load_init_params(str(source), shape)
        assert jax.tree.structure(got) == jax.tree.structure(shape)
        for k in got:
            if k not in MULTIMODAL_ONLY:
                jax.tree.map(np.testing.assert_array_equal, got[k], params[k])
        assert (set(MULTIMODAL_ONLY) <= set(got)) == (mm_ratio > 0)
        if mm_ratio > 0:  # the fresh heads are those of a from-scratch run of this config
            scratch = jax.jit(task.init_params)(trainer_keys(task.config)[0])
            for k in MULTIMODAL_ONLY:
                jax.tree.map(np.testing.assert_array_equal, got[k], scratch[k])
    with pytest.raises(ValueError, match=r"^x: parameters do not match the model being trained: missing keys 1 "
                                         r"\(b/w\); unexpected keys 1 \(a/w\)$"):
        check_same_structure({"a": {"w": np.zeros(1)}}, {"b": {"w": np.zeros(1)}}, "x")
    with pytest.raises(ValueError, match=r"^x: .*: wrong shapes 1 \(a/w \(2,\) \(expected \(1,\)\)\)$"):
        check_same_structure({"a": {"w": np.zeros(2)}}, {"a": {"w": np.zeros(1)}}, "x")


def test_overfits_two_images(smoke, tmp_path):
    """Two fixed images (no crop, jitter or flip): the CUD + MFM loss at least halves in 40 steps."""
    data = tmp_path / "two"
    data.mkdir()
    for f in ("mef/under/House.png", "mff/A/lytro_01.jpg"):
        (data / Path(f).name).write_bytes((SAMPLE / f).read_bytes())
    train_here(tmp_path / "run", data__single__path=str(data), data__single__jitter=False,
               data__single__flip=False, data__scale=(1.0, 1.0), data__ratio=(1.0, 1.0), stop_after=40, **QUIET)
    single = steps_logged(tmp_path / "run", "loss/single")
    steps = sorted(single)
    first, last = np.mean([single[s] for s in steps[:3]]), np.mean([single[s] for s in steps[-3:]])
    assert last < 0.5 * first, (first, last)


BF16_TOLERANCE = 0.05  # the tolerance docs/benchmarks.md states (benchmarks/bf16_loss.py, 60 steps: 0.30 %)


def test_bf16_compute_tracks_float32_with_float32_state(smoke, tmp_path):
    """The smoke config with `compute_dtype=bfloat16`: the same batches as the float32 smoke run,
    every loss within 5 % of it, yet not equal (the switch took effect), and parameters and Adam
    state still float32 in the checkpoint."""
    steps = 5  # steps 1 and 5 multi-modal (MCUD), 2-4 single: both bf16 programs
    result = train_here(tmp_path, compute_dtype="bfloat16", stop_after=steps, **QUIET)
    assert result["status"] == "stopped" and result["checkpoint"] == steps
    assert [steps_logged(tmp_path, "data/checksum")[s] for s in range(1, steps + 1)] == \
        [steps_logged(smoke[0], "data/checksum")[s] for s in range(1, steps + 1)]
    bf16, f32 = steps_logged(tmp_path, "loss"), steps_logged(smoke[0], "loss")
    rel = [abs(bf16[s] - f32[s]) / abs(f32[s]) for s in range(1, steps + 1)]
    assert max(rel) <= BF16_TOLERANCE, rel
    assert max(rel) > 1e-6, f"bf16 losses equal float32's: the compute dtype was not applied {rel}"
    state = checkpoints.read_state_numpy(tmp_path / "checkpoints" / str(steps), subtree=None)
    floats = {str(np.asarray(x).dtype) for x in jax.tree.leaves(state)
              if np.issubdtype(np.asarray(x).dtype, np.floating)}
    assert floats == {"float32"}, floats
    assert len(jax.tree.leaves(state["opt_state"])) >= 2 * len(jax.tree.leaves(state["params"]))  # mu and nu


class ToyTask(Task):
    """A 4-weight linear regression: the smallest task the trainer can drive (compiles in a second)."""

    def init_params(self, rng):
        return {"w": 0.1 * jax.random.normal(rng, (4,))}

    def model_config(self):
        return {}

    def make_train_data(self, process_index, process_count):
        import grain

        ds = grain.MapDataset.range(1 << 20).map(lambda i: {"x": np.full((4,), 1.0 + i % 3, np.float32)})
        return ds.to_iter_dataset().batch(int(self.config.batch_size) // process_count, drop_remainder=True)

    def loss_fn(self, params, frozen, batch, rng, step):
        return ((batch["x"] @ params["w"] - 1.0) ** 2).mean(), {}


TASK = ToyTask  # config.task = "test_train" finds it (tasks may live outside the package)


@pytest.mark.parametrize("lr,first_bad", [(1e30, 2), (1e39, 1)])
def test_non_finite_loss_stops_with_the_step_range(tmp_path, lr, first_bad):
    """Loss (lr 1e30: the weights reach 1e30, the next loss overflows) or parameters (lr 1e39: the
    first update overflows) become non-finite: the run stops naming the steps, and every checkpoint
    left behind holds finite parameters."""
    c = smoke_config(task="test_train", stop_after=0, log_every=1, panel_every=0, ckpt_every=1)
    c.schedule.base_lr = lr
    with pytest.raises(train.NonFiniteLoss, match=rf"non-finite between step {first_bad - 1} .* and step {first_bad}"):
        train.train_and_evaluate(c, str(tmp_path))
    steps = checkpoints.Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps()
    assert steps == list(range(1, first_bad))
    for step in steps:
        params = checkpoints.read_state_numpy(tmp_path / "checkpoints" / str(step), "params")
        assert np.all(np.isfinite(params["w"]))


def test_failed_start_up_closes_the_writer_and_signal_handlers(tmp_path, monkeypatch):
    """A run that fails before its first step still closes its metric writer (left to atexit, a
    tensorboardX writer raises at interpreter shutdown on Python 3.12), and one that fails inside
    the loop puts the signal handlers back."""
    closed = []
    close = logging_utils.MetricWriter.close
    monkeypatch.setattr(logging_utils.MetricWriter, "close", lambda self: (closed.append(self._tb), close(self)))
    with pytest.raises(train.ConfigError, match="^mesh:"):
        train_here(tmp_path / "a", mesh=(("data", 2),))
    assert len(closed) == 1  # (its TensorBoard file opens at the first event: none was written)
    assert not (tmp_path / "a" / "config.json").exists(), "a failed start wrote config.json"

    before = signal.getsignal(signal.SIGTERM)
    c = smoke_config(task="test_train", stop_after=0, log_every=1, panel_every=0, ckpt_every=0)
    c.schedule.base_lr = 1e39
    with pytest.raises(train.NonFiniteLoss):
        train.train_and_evaluate(c, str(tmp_path / "b"))
    assert len(closed) == 2 and signal.getsignal(signal.SIGTERM) is before


def test_config_errors_are_one_line(tmp_path):
    """The command line: configuration mistakes end with one 'error: ...' line and exit code 2."""
    r = run_main(tmp_path / "a", "--config.mesh=(('data', 2),)", expect_rc=2)
    assert r.stderr.strip().splitlines()[-1].startswith("error: mesh:")
    r = run_main(tmp_path / "b", "--config.data.single.data_dir=" + str(tmp_path), expect_rc=2,
                 config="configs/pretrain.py:cud")
    assert "tfds build coco/2017" in r.stderr.strip().splitlines()[-1]
    r = run_main(tmp_path / "c", "--config.data.single.kind=folder", f"--config.data.single.path={SAMPLE}",
                 expect_rc=2, config="configs/pretrain.py")
    last = r.stderr.strip().splitlines()[-1]
    assert "teacher not found" in last and "python -m defusion_jax.convert vit" in last and "mm_ratio=0" in last


def test_panel_columns_keep_the_task_order():
    """A jitted dict comes back with sorted keys; the panel must show the task's column order, and
    the first `panel_samples` rows of what the task computes on the whole batch."""
    class Columns:
        def panel(self, params, frozen, batch, rng):
            return {"view": batch["x"], "target": batch["x"] * 0.5, "prediction": batch["x"] + params}

    run = train._ordered_panel(Columns(), None, n_rows=2)
    x = np.arange(3, dtype=np.float32)[:, None, None, None] * np.ones((3, 2, 2, 3), np.float32)
    cols = run(np.float32(0.25), {}, {"x": x}, jax.random.key(0))
    assert list(cols) == ["view", "target", "prediction"]
    np.testing.assert_allclose(cols["prediction"], x[:2] + 0.25)  # the batch's first panel_samples rows


def test_learning_rate_schedules_hand_values():
    """Step milestones count from step 0 (warm-up included); poly and cosine decay after the warm-up."""
    import ml_collections as mlc

    step = train.learning_rate_fn(mlc.ConfigDict(dict(base_lr=1.0, milestones=(0.5, 0.75), gamma=0.1,
                                                      warmup_steps=10)), 100)
    got = [float(step(s)) for s in (0, 5, 10, 49, 50, 74, 75, 99)]
    np.testing.assert_allclose(got, [0, 0.5, 1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6, atol=1e-9)
    poly = train.learning_rate_fn(mlc.ConfigDict(dict(name="poly", base_lr=2.0, end_lr=0.0, power=2.0,
                                                      warmup_steps=10)), 110)
    np.testing.assert_allclose([float(poly(s)) for s in (10, 60, 110)], [2.0, 2.0 * 0.5 ** 2, 0.0], atol=1e-6)
    cos = train.learning_rate_fn(mlc.ConfigDict(dict(name="cosine", base_lr=1.0, end_lr=0.1)), 100)
    np.testing.assert_allclose([float(cos(s)) for s in (0, 50, 100)], [1.0, 0.55, 0.1], atol=1e-6)
    with pytest.raises(ValueError, match="schedule.name"):
        train.learning_rate_fn(mlc.ConfigDict(dict(name="linear", base_lr=1.0)), 10)


def test_fuse_cli_takes_the_trained_workdir(smoke, tmp_path, capsys):
    """What the README's main job does after training: fuse the bundled IR/visible pairs with the
    workdir (latest checkpoint), decomposition included."""
    from defusion_jax import fuse

    rc = fuse.main(["--model", str(smoke[0]), "--task", "ivf", "--a", str(SAMPLE / "ivf" / "ir"),
                    "--b", str(SAMPLE / "ivf" / "vi"), "--out", str(tmp_path / "out"), "--save-decomposition"])
    assert rc == 0
    assert "fused 3 pair(s)" in capsys.readouterr().out
    for stem in ("00004N", "00055D", "FLIR_00306"):
        for suffix in ("", "_common", "_unique_a", "_unique_b", "_heat_common"):
            assert (tmp_path / "out" / f"{stem}{suffix}.png").is_file(), stem + suffix


def test_ctrl_c_before_the_first_step_or_twice_aborts(monkeypatch):
    """Ctrl-C asks for a checkpoint only once a step has run; before that it marks the run aborted
    (KeyboardInterrupt at the trainer's next check: raised in the handler it can land in a gc
    callback and be dropped), and a second Ctrl-C raises at once. The CLI turns KeyboardInterrupt
    into one line and exit code 130."""
    def sigint():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.3)  # the handler runs between bytecodes of the main thread

    stop = train._StopFlag().install()
    try:
        sigint()
        assert stop.aborted and stop.signum is None
        with pytest.raises(KeyboardInterrupt):
            stop.check()
        with pytest.raises(KeyboardInterrupt):
            sigint()
        stop.aborted = False
        stop.armed = True
        sigint()
        assert stop.signum == signal.SIGINT and not stop.aborted
        stop.check()  # a checkpoint, not an abort
        with pytest.raises(KeyboardInterrupt):
            sigint()
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_while_compiling_is_one_line_exit_130(tmp_path):
    """The CLI interrupted after the model was built (compilation of the first step under way)."""
    proc = subprocess.Popen(main_cmd(tmp_path / "w", "--config.tensorboard=False"), cwd=REPO,
                            env=main_env(DEFUSION_COMPILE_CACHE="0"), stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "trainable parameters" in line:
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.communicate(timeout=300)[1]
    finally:
        proc.kill()
    # the model line also names what the config does not hold: the matmul precision in force
    assert any("trainable parameters; compute float32, matmul precision " in line for line in seen), \
        "".join(seen)[-3000:]
    assert proc.returncode == 130, rest[-3000:]
    assert "Traceback" not in rest and rest.strip().splitlines()[-1].startswith("interrupted (Ctrl-C)"), rest[-3000:]


@pytest.mark.parametrize("remote", [False, True], ids=["local", "gs"])
def test_resume_drops_the_rows_and_events_logged_after_the_checkpoint(tmp_path, monkeypatch, remote):
    import tensorboardX

    opened = []
    real = tensorboardX.SummaryWriter
    monkeypatch.setattr(tensorboardX, "SummaryWriter", lambda **kw: (opened.append(kw), real(**kw))[1])
    where = str(tmp_path / "run")
    if remote:
        rw = pytest.importorskip("test_remote_workdir")
        rw.FakeGCS.root = str(tmp_path / "store")
        import fsspec

        for proto in ("gs", "gcs"):
            fsspec.register_implementation(proto, rw.FakeGCS, clobber=True)
        monkeypatch.setitem(rw.paths._NEEDS, "gs", ("fsspec", "the stand-in store"))
        where = "gs://bucket/run"
    w = logging_utils.MetricWriter(where, tensorboard=not remote, remote_every_s=0)
    w.resume_at(0)
    for s in range(1, 8):
        w.scalars(s, {"loss": float(s)})
    w.close()
    w = logging_utils.MetricWriter(where, tensorboard=not remote, remote_every_s=0)
    w.resume_at(4)  # the run restored the checkpoint of step 4
    assert [r["step"] for r in logging_utils.read_metrics(where)] == [1, 2, 3, 4]
    w.scalars(5, {"loss": 50.0})
    w.close()
    assert [(r["step"], r["loss"]) for r in logging_utils.read_metrics(where)] == [(1, 1), (2, 2), (3, 3), (4, 4),
                                                                                     (5, 50)]
    if not remote:
        assert [kw["purge_step"] for kw in opened] == [1, 5]


def test_config_json_is_written_after_restore_and_changes_are_named(smoke, tmp_path, caplog):
    """A start that fails on the checkpoint (another model) leaves config.json alone and says what
    to do in one line; a resume with other host-side fields names them and, once it trains, saves the
    new config (a rerun with nothing left to train keeps the old one)."""
    import shutil

    for name in ("config.json", "model_config.json", "metrics.jsonl"):
        shutil.copy(smoke[0] / name, tmp_path / name)
    shutil.copytree(smoke[0] / "checkpoints" / "60", tmp_path / "checkpoints" / "60")
    saved = (tmp_path / "config.json").read_text()
    with pytest.raises(train.ConfigError) as e:
        train_here(tmp_path, model__vit__depth=3, **QUIET)
    msg = str(e.value)
    assert "\n" not in msg and f"checkpoint in {tmp_path} was written with a different model/optimizer" in msg
    assert "params/encoder/blocks_2/" in msg and "use a new workdir (the parameters differ" in msg, msg
    assert "--config.init" not in msg.replace("so --config.init cannot", ""), msg  # it could not load them either
    assert (tmp_path / "config.json").read_text() == saved
    with caplog.at_level("WARNING"):
        result = train_here(tmp_path, **QUIET)  # log_every 10 -> 1, ckpt_every 8 -> 1000 ...; already at 60
    assert result["step"] == 60
    changed = [r.getMessage() for r in caplog.records if "config changed since the last run" in r.getMessage()]
    assert any("ckpt_every: 8 -> 1000" in m for m in changed), changed
    assert (tmp_path / "config.json").read_text() == saved  # nothing trained: the record stays the run's
    assert train_here(tmp_path, total_steps=61, **QUIET)["step"] == 61
    assert json.loads((tmp_path / "config.json").read_text())["ckpt_every"] == 1000


@pytest.mark.parametrize("override,expect", [
    ("--config.optim.lrr=1", "no such config field: optim"),
    ("--config.optimizer.lrr=1", "no such config field: lrr"),
    ("--config.batchsize=8", "no such config field: batchsize (did you mean batch_size?)"),
    ("--config.total_steps=abc", "invalid literal for int()"),
    ("--config=configs/pretrian.py:smoke", "No such file or directory: 'configs/pretrian.py'"),
    ("--config=configs/pretrain.py:smok", "unknown config arguments ['smok']"),
])
def test_command_line_mistakes_are_one_line(tmp_path, override, expect):
    cmd = main_cmd(tmp_path / "w", override) if not override.startswith("--config=") else \
        main_cmd(tmp_path / "w", config=override.split("=", 1)[1])
    r = subprocess.run(cmd, cwd=REPO, env=main_env(), capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[-1].startswith("error: ") and expect in lines[-1], lines[-1]
    assert not (tmp_path / "w").exists()


def test_workdir_tilde_is_the_home_folder(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    r = subprocess.run(main_cmd("~/w", "--config.mesh=(('data', 3),)", config=f"{REPO}/configs/pretrain.py:smoke"),
                       cwd=tmp_path, env=main_env(HOME=str(home), PYTHONPATH=str(REPO)), capture_output=True,
                       text=True, timeout=300)  # fails after the workdir is made: 3 devices wanted, 1 here
    assert r.returncode == 2 and "needs 3 devices" in r.stderr, r.stderr[-3000:]
    assert (home / "w").is_dir() and not (tmp_path / "~").exists()


def test_start_up_mistakes_are_one_config_error(tmp_path):
    """Workdir on a file, batch size 0, and models the config cannot build: ConfigError (one line,
    exit code 2 from the CLI) before anything is compiled."""
    (tmp_path / "file").write_text("x")
    for workdir, match in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "run", "cannot be made under it")):
        with pytest.raises(train.ConfigError, match=match):
            train_here(workdir, **QUIET)
    with pytest.raises(train.ConfigError, match="batch_size must be positive"):
        train_here(tmp_path / "b", batch_size=0, **QUIET)
    assert not (tmp_path / "b").exists()  # checked before the workdir is made: nothing left behind
    with pytest.raises(train.ConfigError, match=r"^mesh: expected \(name, size\) pairs such as"):
        train_here(tmp_path / "m", mesh=("((data,-1),)",), **QUIET)  # what an unquoted --config.mesh gives
    with pytest.raises(train.ConfigError, match="total_steps must be positive, got 0"):
        train_here(tmp_path / "t", total_steps=0, **QUIET)
    with pytest.raises(train.ConfigError, match="seed must be non-negative, got -1"):
        train_here(tmp_path / "s", seed=-1, **QUIET)
    with pytest.raises(train.ConfigError, match="mesh_axis_types must be 'auto' or 'explicit', got 'Explicit'"):
        train_here(tmp_path / "x", mesh_axis_types="Explicit", **QUIET)
    with pytest.raises(train.ConfigError, match="keep_checkpoints must be at least 1, got 0"):
        train_here(tmp_path / "k", keep_checkpoints=0, **QUIET)  # it would save nothing and call it saved
    with pytest.raises(train.ConfigError, match="compute_dtype must be one of float32, bfloat16, got 'bf16'"):
        train_here(tmp_path / "d", compute_dtype="bf16", **QUIET)
    with pytest.raises(train.ConfigError, match=r"^config.init=/nonexist: "):
        train_here(tmp_path / "i", init="/nonexist", **QUIET)
    with pytest.raises(train.ConfigError, match=r"^config.resume=/nonexist: "):
        train_here(tmp_path / "r", resume="/nonexist", **QUIET)
    for field, value, match in (("image_size", 60, r"^model \(config.model\): image size 60x60 is not a multiple"),
                                ("model__vit__width", 32, r"config.model.vit.width \(32\) and config.model.dim")):
        with pytest.raises(train.ConfigError, match=match) as e:
            train_here(tmp_path / field, **{field: value}, **QUIET)
        assert "\n" not in str(e.value)
        assert not (tmp_path / field / "config.json").exists()


def test_an_explicit_teacher_path_wins_over_the_smoke_teacher(tmp_path):
    """docs/teacher.md's `--config.teacher.infrared=...` on pretrain.py:smoke: that path is used
    (here: reported missing) rather than the smoke config's random teacher; the other role keeps it."""
    from defusion_jax import sharding as sh
    from defusion_jax.tasks import get_task

    mesh = sh.make_mesh((("data", -1),))
    c = smoke_config()
    assert get_task("pretrain")(c, mesh).teacher_roles == {"infrared": "smoke", "visible": "smoke"}
    c.teacher.infrared = str(tmp_path / "mae_ir" / "teacher")
    with pytest.raises(ValueError, match=r"teacher not found \(config.teacher.infrared='.*mae_ir/teacher'\)"):
        get_task("pretrain")(c, mesh)
    c.teacher.infrared = str(tmp_path)
    assert get_task("pretrain")(c, mesh).teacher_roles == {"infrared": str(tmp_path), "visible": "smoke"}


def test_a_checkpoint_of_two_processes_resumes_in_one(tmp_path):
    """docs/training.md: the global batch is the same for any process count. Two processes' data
    iterator states (each process its block of every global batch, two mixed streams) restore into
    one process, whose next batch is the two processes' next batches concatenated; positions that
    do not correspond (a process skipped an image) are one CheckpointError naming both counts."""
    import grain

    from defusion_jax.data import pipeline
    from defusion_jax.params_io import CheckpointError

    def stream(p, count):
        def one(offset):
            ds = grain.MapDataset.range(10_000).map(lambda i: {"x": np.float32(i + offset)})
            return pipeline.BatchBlockShard(ds, 4, p, count).to_iter_dataset().batch(4 // count)
        return iter(pipeline.mix_streams({"a": one(0), "b": one(0.5)}, {"a": 0.7, "b": 0.3}))

    two = [stream(p, 2) for p in (0, 1)]
    for _ in range(7):
        for it in two:
            next(it)
    states = [it.get_state() for it in two]
    expected = np.concatenate([next(it)["x"] for it in two])

    ckpt = checkpoints.Checkpointer(tmp_path / "ck", async_save=False)
    ckpt.save(7, {"w": np.zeros(2, np.float32)}, stream(0, 1), force=True)
    ckpt.wait()
    data = tmp_path / "ck" / "7" / "data"
    (data / "process_0-of-1.json").unlink()
    for p, st in enumerate(states):
        (data / f"process_{p}-of-2.json").write_text(json.dumps(st))
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"w": jax.ShapeDtypeStruct((2,), np.float32, sharding=one_device)}
    one = stream(0, 1)
    restored = ckpt.restore(7, abstract, one)
    np.testing.assert_array_equal(restored["w"], np.zeros(2))
    np.testing.assert_array_equal(next(one)["x"], expected)

    (data / "process_1-of-2.json").write_text(json.dumps(
        {**states[1], "parents": {**states[1]["parents"], "a": {"next_index": 3}}}))
    with pytest.raises(CheckpointError, match="written by 2 processes and this run has 1"):
        ckpt.restore(7, abstract, stream(0, 1))
    ckpt.close()


@pytest.mark.parametrize("arg", ["smoke", "paper", "official", "official,cud"])
def test_documented_schedule_overrides_apply(arg):
    """docs/training.md: `--config.schedule.name=cosine --config.schedule.end_lr=...` (or poly and
    power) on any configs/pretrain.py schedule; the step schedule stays what it was."""
    from configs.pretrain import get_config

    c = get_config(arg)
    c.lock()  # as the command line has it (config_flags lock_config=True)
    lr = train.learning_rate_fn(c.schedule, 100)
    assert float(lr(0)) == pytest.approx(c.schedule.base_lr) and c.schedule.name == "step"
    c.schedule.name, c.schedule.end_lr = "cosine", 1e-6  # a locked ConfigDict refuses new fields
    np.testing.assert_allclose(float(train.learning_rate_fn(c.schedule, 100)(100)), 1e-6, rtol=1e-5)
    c.schedule.name, c.schedule.power = "poly", 2.0
    np.testing.assert_allclose(float(train.learning_rate_fn(c.schedule, 100)(50)),
                               1e-6 + (c.schedule.base_lr - 1e-6) * 0.25, rtol=1e-5)


def test_progress_line_names_colliding_terms_in_full():
    keys = ("cud/common", "cud/fused_l1", "mcud/unique", "mcud/common")
    line = logging_utils.progress_line(5, 60, {"loss": 1.0, "cud/common": 0.5, "cud/fused_l1": 0.25,
                                               "mcud/common": 0.125}, {}, keys)
    assert line == "step 5/60 | loss 1 | (cud/common 0.5, fused_l1 0.25, mcud/common 0.125)"


def test_reading_another_runs_checkpoints_prints_no_orbax_warnings(tmp_path, caplog):
    """config.resume and load_model open checkpoints read-only: orbax warned about every saving
    option it had to reset, three lines per load that looked like problems."""
    checkpoints.Checkpointer(tmp_path / "ck", every=5, keep=3).close()
    with caplog.at_level("WARNING"):
        assert checkpoints.Checkpointer(tmp_path / "ck", read_only=True).latest_step() is None
    assert not [r.getMessage() for r in caplog.records if "read_only" in r.getMessage()]
