"""Explicit mesh axis types (`config.mesh_axis_types='explicit'`) through the trainer, for the tasks
the float64 pretraining comparison in `test_train_sharded.py` does not cover. Runs in a subprocess
with 2 fake CPU devices (its own XLA_FLAGS), in a file of its own so pytest-xdist can run it beside
that one."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TASKS_SCRIPT = textwrap.dedent("""
    import importlib, json, sys
    from pathlib import Path
    import jax, numpy as np
    jax.config.update("jax_disable_most_optimizations", True)  # compile time dominates on CPU
    from defusion_jax import train

    assert jax.device_count() == 2, jax.devices()
    tmp = Path(sys.argv[1])
    # pretraining: test_train_sharded.py's float64 test; segment and detect in Explicit mode only (~40 s each)
    for name, kinds in (("teacher_mae", ("auto", "explicit")), ("segment_msrs", ("explicit",)),
                        ("detect_m3fd", ("explicit",))):
        losses = {}
        for kind in kinds:
            cfg = importlib.import_module(f"configs.{name}").get_config("smoke,fsdp")
            with cfg.unlocked():
                cfg.update(mesh_axis_types=kind, batch_size=4, total_steps=2, log_every=1, panel_every=2,
                           ckpt_every=2, async_checkpoints=False, fsdp_min_size=1024, eval_every=0)
            wd = tmp / name / kind
            assert train.train_and_evaluate(cfg, str(wd))["status"] == "done", (name, kind)
            rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
            losses[kind] = np.array([r["loss"] for r in rows if "loss" in r])
            assert len(losses[kind]) == 2 and np.all(np.isfinite(losses[kind])), (name, kind, rows)
            if name != "detect_m3fd":  # (it has no panel) the panel's rows come from a sharded batch
                assert list(wd.glob("panels/*.png")), (name, kind)
            if name != "teacher_mae":  # the final report's evaluation, from FSDP-sharded parameters
                assert list((wd / "report").glob("*.md")), (name, kind)
        if "auto" in losses:  # step 2's loss follows step 1's update: the gradients agree too
            np.testing.assert_allclose(losses["explicit"], losses["auto"], rtol=2e-5, err_msg=name)
        print(name, "ok", losses["explicit"])
""")


@pytest.mark.slow
def test_every_task_trains_under_an_explicit_mesh(tmp_path):
    """`mesh_axis_types='explicit'` (shardings in the types, as `jax.make_mesh` now defaults to) trains
    the downstream tasks with FSDP-sharded parameters over 2 devices, with panels and the final
    evaluation reports; the MAE teacher logs the same losses as in the default Auto mode."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", TASKS_SCRIPT, str(tmp_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    for name in ("teacher_mae", "segment_msrs", "detect_m3fd"):
        assert f"{name} ok" in r.stdout, name
