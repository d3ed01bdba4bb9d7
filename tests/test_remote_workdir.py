"""gs:// workdirs (a pod's shared workdir): the trainer's files go to the object store, not to a
local folder called `gs:`, and what an object store cannot do (append) is not relied on.

The store here is a stand-in registered with fsspec for gs://: local files under tmp_path, and,
like gcsfs, a file opened for appending is silently overwritten. Orbax's own gs:// support
(TensorStore's GCS driver) is not exercised: it needs the network.
"""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from defusion_jax import checkpoints, logging_utils, paths, train


class FakeGCS(LocalFileSystem):
    protocol = ("gs", "gcs")
    root = "/nonexistent"

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                return f"{cls.root}/{path[len(prefix):]}".rstrip("/")
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        if "a" in mode:  # what gcsfs does: "Append mode 'a' is not supported in GCS. Using overwrite mode"
            mode = mode.replace("a", "w")
        return super()._open(path, mode, block_size, **kwargs)


@pytest.fixture
def gs(tmp_path, monkeypatch):
    FakeGCS.root = str(tmp_path / "store")
    fsspec.register_implementation("gs", FakeGCS, clobber=True)
    fsspec.register_implementation("gcs", FakeGCS, clobber=True)
    monkeypatch.setitem(paths._NEEDS, "gs", ("fsspec", "the stand-in store"))
    return tmp_path / "store"


def test_a_gs_workdir_is_not_a_local_folder(gs):
    p = paths.path("gs://bucket/runs/pt1")
    assert str(p) == "gs://bucket/runs/pt1" and str(p / "checkpoints") == "gs://bucket/runs/pt1/checkpoints"
    local = paths.path("runs/pt1")
    assert local.is_absolute() and local.name == "pt1"
    with pytest.raises(ValueError, match="unsupported storage scheme ftp"):
        paths.path("ftp://host/run")


def test_without_gcsfs_a_gs_path_says_what_to_install():
    if paths.has_module("gcsfs") or paths.has_module("tensorflow"):
        pytest.skip("gcsfs or tensorflow is installed here: gs:// paths are usable")
    with pytest.raises(ValueError, match="pip install gcsfs"):
        paths.path("gs://bucket/run")


def test_metrics_survive_a_resume_on_an_object_store(gs):
    for session, steps in enumerate([(1, 2), (3, 4, 5)]):
        w = logging_utils.MetricWriter("gs://bucket/run", tensorboard=False, remote_every_s=3600)
        for s in steps:
            w.scalars(s, {"loss": float(s), "session": session})
        w.close()
    on_store = (gs / "bucket" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in on_store] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in logging_utils.read_metrics("gs://bucket/run")] == [1, 2, 3, 4, 5]


def test_metrics_reach_the_store_on_flush_not_only_at_close(gs):
    w = logging_utils.MetricWriter("gs://bucket/run", tensorboard=False, remote_every_s=3600)
    w.scalars(1, {"loss": 1.0})  # the first row is written at once (nothing written yet)
    w.scalars(2, {"loss": 2.0})  # then at most every remote_every_s
    target = gs / "bucket" / "run" / "metrics.jsonl"
    assert len(target.read_text().splitlines()) == 1
    w.flush()  # the trainer flushes with every checkpoint
    assert len(target.read_text().splitlines()) == 2
    w.close()


def test_panels_model_config_and_reports_land_on_the_store(gs):
    grid = (np.arange(24 * 32 * 3) % 251).astype(np.uint8).reshape(24, 32, 3)
    logging_utils.save_panel("gs://bucket/run", 40, grid)
    np.testing.assert_array_equal(np.asarray(Image.open(gs / "bucket/run/panels/step_0000040.png")), grid)

    checkpoints.write_model_config("gs://bucket/run", {"dim": 192}, {"task": "pretrain"})
    assert checkpoints.find_model_config(paths.path("gs://bucket/run"))["model"] == {"dim": 192}

    with paths.staged(paths.path("gs://bucket/run")) as local:
        (local / "report").mkdir()
        (local / "report" / "table.md").write_text("| a |\n")
    assert (gs / "bucket/run/report/table.md").read_text() == "| a |\n"


def test_the_trainer_refuses_an_unusable_workdir_url_up_front(tmp_path):
    from configs.pretrain import get_config

    with pytest.raises(train.ConfigError, match="unsupported storage scheme"):
        train.train_and_evaluate(get_config("smoke"), "ftp://host/run")


def test_tensorboard_on_gs_without_its_client_library_is_a_config_error(gs):
    if paths.has_module("google.cloud.storage"):
        pytest.skip("google-cloud-storage is installed here")
    with pytest.raises(ValueError, match="pip install google-cloud-storage"):
        logging_utils.MetricWriter("gs://bucket/run", tensorboard=True)


def test_loading_a_model_from_the_store_reads_workdirs_only(gs):
    from defusion_jax.api import load_model
    from defusion_jax.params_io import CheckpointError

    (gs / "bucket" / "weights.pth").parent.mkdir(parents=True)
    (gs / "bucket" / "weights.pth").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="only training workdirs"):
        load_model("gs://bucket/weights.pth")
    with pytest.raises(CheckpointError, match="model not found: gs://bucket/none"):
        load_model("gs://bucket/none")
    (gs / "bucket" / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="no training checkpoints here"):
        load_model("gs://bucket/empty_run")


@pytest.mark.slow
def test_a_training_run_on_a_gs_workdir_writes_there_and_resumes(gs, tmp_path, monkeypatch):
    """The smoke run on gs://bucket/run: config, model config, metrics and panels land on the store,
    no local `gs:` folder appears, and a resumed run keeps the first run's metric rows. Orbax gets a
    local folder instead (its GCS driver needs the network); the trainer must still hand it the URL."""
    from test_train import train_here

    real, seen = checkpoints.Checkpointer, []

    def local_orbax(directory, **kw):
        seen.append(str(directory))
        return real(tmp_path / "orbax", **kw)

    monkeypatch.setattr(checkpoints, "Checkpointer", local_orbax)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    run = gs / "bucket" / "run"
    for _ in range(2):
        res = train_here("gs://bucket/run", stop_after=2, log_every=1, panel_every=2, ckpt_every=1000,
                         tensorboard=False)
        assert res["status"] == "stopped"
    assert seen == ["gs://bucket/run/checkpoints"] * 2
    assert res["step"] == 4 and res["workdir"] == "gs://bucket/run"
    assert [r["step"] for r in logging_utils.read_metrics("gs://bucket/run")] == [1, 2, 3, 4]
    assert json.loads((run / "model_config.json").read_text())["meta"]["task"] == "pretrain"
    assert (run / "config.json").is_file()
    assert sorted(p.name for p in (run / "panels").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    assert not any((tmp_path / "cwd").iterdir()), "something was written to a local folder named after the URL"
