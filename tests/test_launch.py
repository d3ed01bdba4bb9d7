"""Launch scripts: syntax, the gcloud commands tpu_pod.sh prints and runs, the jax.distributed
parameters slurm_gpu.sbatch derives from Slurm's variables, and a real 2-process localhost run
through multi_gpu_local.sh that meets via the coordinator read from the environment."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["tpu_pod.sh", "slurm_gpu.sbatch", "multi_gpu_local.sh"]


def _sharding():
    """The trainer's process/mesh module (issue 3), which the launchers hand their environment to."""
    return pytest.importorskip("defusion_jax.sharding", reason="defusion_jax/sharding.py (trainer) not in this checkout")


def _bash(args, env=None, timeout=60, cwd=ROOT):
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    full_env.update(env or {})
    return subprocess.run(["bash", *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd)


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax(script):
    r = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ---- tpu_pod.sh ----------------------------------------------------------------------------------
def _tpu(*args, env=None):
    return _bash([str(LAUNCH / "tpu_pod.sh"), "--dry-run", *args], env=env)


def test_tpu_dry_run_create_uses_flags_and_env():
    r = _tpu("--name", "pt", "--accelerator", "v5litepod-16", "--spot", "create",
             env={"TPU_ZONE": "us-west4-a", "TPU_PROJECT": "proj"})
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout) == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pt", "--zone=us-west4-a",
                                     "--project=proj", "--accelerator-type=v5litepod-16",
                                     "--version=tpu-ubuntu2204-base", "--spot"]


def test_tpu_dry_run_all_is_create_install_train_logs():
    r = _tpu("--zone", "z", "--workdir", "gs://b/run", "all", "--", "--config.batch_size=64")
    assert r.returncode == 0, r.stderr
    lines = [shlex.split(x) for x in r.stdout.strip().splitlines()]
    heads = [" ".join(x[:5]) for x in lines]
    assert heads == ["gcloud compute tpus tpu-vm create", f"git -C {ROOT} archive --format=tar.gz",
                     "gcloud compute tpus tpu-vm scp", "gcloud compute tpus tpu-vm ssh",
                     "gcloud compute tpus tpu-vm ssh", "gcloud compute tpus tpu-vm ssh"]
    train = lines[4]
    assert "--worker=all" in train
    cmd = next(a for a in train if a.startswith("--command="))
    assert "python -m defusion_jax.main --config=configs/pretrain.py --workdir=gs://b/run --config.batch_size=64" in cmd
    assert "--worker=0" in lines[5]
    for x in lines[3:5]:  # the remote commands are valid shell
        script = next(a for a in x if a.startswith("--command="))[len("--command="):]
        assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0


def test_tpu_multislice_uses_queued_resources():
    r = _tpu("--zone", "z", "--num-slices", "2", "--accelerator", "v5litepod-256", "create")
    assert r.returncode == 0, r.stderr
    args = shlex.split(r.stdout.splitlines()[0])
    assert args[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert "--node-count=2" in args and "--accelerator-type=v5litepod-256" in args
    r = _tpu("--zone", "z", "--num-slices", "2", "ssh", "nvidia-smi")
    assert "--node=all" in shlex.split(r.stdout)


@pytest.mark.parametrize("args,message", [
    (["create"], "no zone"),
    (["--zone", "z", "train"], "no workdir"),
    (["--zone", "z", "--workdir", "/local/dir", "train"], "must be on GCS"),
    (["--zone", "z", "frobnicate"], "unknown argument"),
    (["--zone", "z"], "no subcommand"),
    (["--zone", "z", "--num-slices", "0", "create"], "positive integer"),
])
def test_tpu_bad_input_is_one_line_exit_2(args, message):
    r = _tpu(*args)
    assert r.returncode == 2 and message in r.stderr and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1


def test_tpu_train_and_stop_run_on_workers(tmp_path):
    """Run `train` for real against a fake gcloud that executes the remote command locally and a
    fake metadata server: the trainer process gets the worker list, index and multi-slice values,
    and from them defusion_jax.sharding decides to start jax.distributed (auto-detection)."""
    _sharding()
    home, fakebin = tmp_path / "home", tmp_path / "bin"
    (home / "defusion-jax").mkdir(parents=True)
    (home / "defusion-venv" / "bin").mkdir(parents=True)
    fakebin.mkdir()
    (fakebin / "gcloud").write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        for a in "$@"; do case "$a" in --command=*) exec bash -c "${a#--command=}" ;; esac; done
        exit 9
        """))
    (fakebin / "curl").write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        case "${@: -1}" in
          */agent-worker-number) echo -n 1 ;;
          */worker-network-endpoints) echo -n "w0:0:10.0.0.2,w1:1:10.0.0.3" ;;
          */tpu-env) printf "ACCELERATOR_TYPE: 'v4-16'\\nMEGASCALE_NUM_SLICES: '2'\\nMEGASCALE_COORDINATOR_ADDRESS: '10.0.0.2:8080'\\n" ;;
          *) exit 22 ;;
        esac
        """))
    probe = textwrap.dedent(f"""\
        #!{sys.executable}
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from defusion_jax import sharding
        keys = ["TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_NUM_SLICES", "MEGASCALE_COORDINATOR_ADDRESS"]
        print({{k: os.environ.get(k) for k in keys}})
        print("argv", sys.argv[1:])
        print("request", sharding.distributed_request())
        sys.stdout.flush()
        import time; time.sleep(30)
        """)
    (home / "defusion-venv" / "bin" / "python").write_text(probe)
    for f in [fakebin / "gcloud", fakebin / "curl", home / "defusion-venv" / "bin" / "python"]:
        f.chmod(0o755)
    env = {"PATH": f"{fakebin}:{os.environ['PATH']}", "HOME": str(home), "TPU_ZONE": "z"}
    r = _bash([str(LAUNCH / "tpu_pod.sh"), "--workdir", "gs://b/r", "train", "--", "--config.total_steps=5"], env=env)
    assert r.returncode == 0, r.stderr
    assert "started pid" in r.stdout
    log = home / "defusion-train.log"
    for _ in range(200):
        if log.exists() and "request" in log.read_text():
            break
        time.sleep(0.1)
    text = log.read_text()
    assert "'TPU_WORKER_ID': '1'" in text and "'TPU_WORKER_HOSTNAMES': '10.0.0.2,10.0.0.3'" in text
    assert "'MEGASCALE_NUM_SLICES': '2'" in text and "'MEGASCALE_COORDINATOR_ADDRESS': '10.0.0.2:8080'" in text
    assert "argv ['-m', 'defusion_jax.main', '--config=configs/pretrain.py', '--workdir=gs://b/r', " \
           "'--config.total_steps=5']" in text
    assert "request {}" in text  # multi-host -> jax.distributed.initialize() with auto-detection
    pid = int((home / "defusion-train.pid").read_text())
    assert "defusion-venv/bin/python" in Path(f"/proc/{pid}/cmdline").read_text()  # the trainer itself
    r = _bash([str(LAUNCH / "tpu_pod.sh"), "stop"], env=env)
    assert r.returncode == 0, r.stderr
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("stop did not end the training process")
    assert not (home / "defusion-train.pid").exists()


# ---- slurm_gpu.sbatch ------------------------------------------------------------------------------
SLURM = {"SLURM_JOB_ID": "1234", "SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_NTASKS": "16"}


def _slurm_env(extra):
    r = _bash([str(LAUNCH / "slurm_gpu.sbatch"), "--print-env"], env={"PATH": "/usr/bin:/bin", **SLURM, **extra})
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word == "export":
            k, _, v = rest.partition("=")
            out[k] = v
    return out


@pytest.mark.parametrize("nodelist,host", [("gpu[003-004],x1", "gpu003"), ("node001", "node001"),
                                           ("node001,host2", "node001"), ("n[007,009-015]", "n007")])
def test_slurm_coordinator_is_first_node(nodelist, host):
    env = _slurm_env({"SLURM_JOB_NODELIST": nodelist, "SLURM_NTASKS_PER_NODE": "8"})
    assert env["DEFUSION_COORDINATOR"] == f"{host}:{1234 % 4096 + 61440}"
    assert env["DEFUSION_NUM_PROCESSES"] == "16" and env["DEFUSION_PROCESS_ID"] == "11"


@pytest.mark.parametrize("extra,local_ids", [
    ({"SLURM_NTASKS_PER_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, "3"),  # per GPU, sees all
    ({"SLURM_TASKS_PER_NODE": "8(x2)", "CUDA_VISIBLE_DEVICES": "3"}, None),  # per GPU, Slurm-bound
    ({"SLURM_NTASKS_PER_NODE": "1", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, None),  # per node: all GPUs
])
def test_slurm_local_devices(extra, local_ids):
    env = _slurm_env({"SLURM_JOB_NODELIST": "gpu[1-2]", "PORT": "5000", **extra})
    assert env["DEFUSION_COORDINATOR"] == "gpu1:5000"
    assert env.get("DEFUSION_LOCAL_DEVICE_IDS") == local_ids


def test_slurm_env_feeds_the_trainers_distributed_request():
    sharding = _sharding()

    env = _slurm_env({"SLURM_JOB_NODELIST": "gpu[1-2]", "SLURM_NTASKS_PER_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1"})
    assert sharding.distributed_request(env) == {"coordinator_address": f"gpu1:{1234 % 4096 + 61440}",
                                                 "num_processes": 16, "process_id": 11, "local_device_ids": [3]}


def test_slurm_outside_a_job_fails_clearly():
    r = _bash([str(LAUNCH / "slurm_gpu.sbatch"), "--print-env"], env={"PATH": "/usr/bin:/bin"})
    assert r.returncode != 0 and "not inside a Slurm job" in r.stderr


# ---- multi_gpu_local.sh: 2 real processes on localhost ----------------------------------------------
PROBE = """\
import jax, numpy as np
from defusion_jax import sharding
started = sharding.maybe_initialize_distributed()
sharding.wait_for_all_processes("probe")  # the coordinator barrier the benchmarks use after compiling
from jax.experimental import multihost_utils
got = multihost_utils.process_allgather(np.array([jax.process_index()])).ravel().tolist()
print(f"probe started={started} index={jax.process_index()} count={jax.process_count()} "
      f"devices={jax.device_count()} local={jax.local_device_count()} gathered={got}", flush=True)
"""


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_localhost_meets_through_env_coordinator(tmp_path):
    _sharding()
    (tmp_path / "dist_probe.py").write_text(PROBE)
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PYTHON": sys.executable}
    r = _bash([str(LAUNCH / "multi_gpu_local.sh"), "--procs", "2", "--platform", "cpu", "--cpu-devices", "2",
               "--port", str(_free_port()), "--module", "dist_probe"], env=env, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    for i in (0, 1):
        assert f"[{i}] probe started=True index={i} count=2 devices=4 local=2 gathered=[0, 1]" in r.stdout, r.stdout


def test_local_launcher_stops_the_others_when_one_fails(tmp_path):
    (tmp_path / "dist_fail.py").write_text(
        "import os, sys, time\nif os.environ['DEFUSION_PROCESS_ID'] == '1':\n    sys.exit(3)\ntime.sleep(120)\n")
    env = {"PYTHONPATH": str(tmp_path), "PYTHON": sys.executable}
    t0 = time.monotonic()
    r = _bash([str(LAUNCH / "multi_gpu_local.sh"), "--procs", "2", "--platform", "cpu", "--module", "dist_fail"],
              env=env, timeout=100)
    assert r.returncode == 3 and "stopping the others" in r.stderr
    assert time.monotonic() - t0 < 60


def test_local_launcher_sigterm_waits_for_the_checkpointing_processes(tmp_path):
    """SIGTERM to the launcher reaches both processes, which (like the trainer) finish their step
    and exit 0; the launcher waits for them and exits 0 rather than 143 with 'stopping the others'."""
    (tmp_path / "dist_term.py").write_text(textwrap.dedent("""\
        import os, signal, sys, time
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        print("ready", flush=True)
        while not stop:
            time.sleep(0.05)
        time.sleep(1.0)  # the checkpoint
        print("saved", flush=True)
        """))
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": str(tmp_path),
           "PYTHON": sys.executable}
    proc = subprocess.Popen(["bash", str(LAUNCH / "multi_gpu_local.sh"), "--procs", "2", "--platform", "cpu",
                             "--module", "dist_term"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    try:
        ready = 0
        for line in proc.stdout:
            ready += "ready" in line
            if ready == 2:
                break
        proc.send_signal(15)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "[0] saved" in out and "[1] saved" in out, out
    assert "stopping the others" not in err
