"""Two JAX processes on localhost (jax.distributed over loopback, CPU) train like one process.

Both processes run the real command line with the coordinator in the environment
(DEFUSION_COORDINATOR / DEFUSION_NUM_PROCESSES / DEFUSION_PROCESS_ID), i.e. the launch path a
cluster uses. Each holds one CPU device and reads its half of every global batch.
"""

import socket
import subprocess

import jax
import numpy as np
import pytest

from defusion_jax import checkpoints, logging_utils
from test_train import REPO, main_cmd, main_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(smoke, tmp_path):
    """2 steps on 2 processes x 1 CPU device == 2 steps of one process on the same global batches."""
    from test_train import QUIET, train_here

    args = ["--config.stop_after=2", "--config.log_every=1", "--config.panel_every=2", "--config.ckpt_every=1000"]
    port = free_port()
    procs = []
    for pid in range(2):
        env = main_env(DEFUSION_COORDINATOR=f"127.0.0.1:{port}", DEFUSION_NUM_PROCESSES="2",
                       DEFUSION_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(main_cmd(tmp_path / "two", *args), cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=900))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for pid, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {pid}:\n{err[-5000:]}"
        assert "starting jax.distributed" in err
        assert f"process {pid}/2" in err and "holds 1 of 2 devices" in err
    train_here(tmp_path / "one", stop_after=2, **QUIET)  # reuses the session's compiled smoke step
    one = {r["step"]: r for r in logging_utils.read_metrics(tmp_path / "one")}
    two = {r["step"]: r for r in logging_utils.read_metrics(tmp_path / "two")}
    assert sorted(one) == sorted(two) == [1, 2]
    assert "loss/multi" in two[1] and "loss/single" in two[2]  # both batch kinds
    for step in (1, 2):
        # the same global batch (the processes' shares concatenated) and the same loss
        assert two[step]["data/checksum"] == pytest.approx(one[step]["data/checksum"], rel=1e-6)
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-6)
        assert two[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-5)
    assert (tmp_path / "two" / "panels" / "step_0000002.png").is_file()
    data_states = sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "2" / "data").glob("process_*"))
    assert data_states == ["process_0-of-2.json", "process_1-of-2.json"]
    p1 = checkpoints.load_params_from_workdir(tmp_path / "one")[0]
    p2 = checkpoints.load_params_from_workdir(tmp_path / "two")[0]
    diffs = np.array([float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True)])
    # Two Adam steps move each weight by ~lr = 1e-3 (sign(g) for a fresh Adam): equal updates leave
    # the parameters within float rounding; a weight whose gradient is ~0 may flip (up to 2e-3).
    print("max |param difference| per leaf: median %.2e, max %.2e" % (np.median(diffs), diffs.max()))
    assert np.median(diffs) < 1e-6 and diffs.max() < 2.1e-3

    # The 2-process checkpoint resumes in one process (docs/training.md: the global batch does not
    # depend on the process count): the data iterator position is translated, steps 3 and 4 see
    # the batches of the uninterrupted one-process smoke run.
    again = train_here(tmp_path / "two", stop_after=2, **QUIET)
    assert again["step"] == 4
    resumed = {r["step"]: r["data/checksum"] for r in logging_utils.read_metrics(tmp_path / "two")}
    straight = {r["step"]: r["data/checksum"] for r in logging_utils.read_metrics(smoke[0])}
    assert [resumed[s] for s in (3, 4)] == pytest.approx([straight[s] for s in (3, 4)], rel=1e-6)
