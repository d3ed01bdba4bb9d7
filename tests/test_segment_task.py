"""Segmentation fine-tuning through the shared trainer: overfit a handful of synthetic pairs with the
smoke config (initialised from a pretraining-style parameter folder), the report files, re-evaluation,
single-modality inputs, backbone transplant and the missing-dataset message."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jax

from defusion_jax import sharding as sh
from defusion_jax.data import msrs_seg
from defusion_jax.models.defusion import build_model, init_params
from defusion_jax.params_io import CheckpointError, flatten, load_params, save_params
from defusion_jax.tasks import segment

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "segment_msrs.py"


def get_config(arg=""):
    spec = importlib.util.spec_from_file_location("segment_msrs_config", CONFIG)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def mesh():
    return sh.make_mesh([("data", -1)])


def pretrain_folder(path: Path, cfg) -> Path:
    """A pretraining-style parameter folder: the whole DeFusionPP tree (pixel heads, MFM decoder,
    multi-modal LP heads included) with random values; shapes from eval_shape, nothing compiled."""
    model_cfg = dict(cfg.model.backbone.to_dict(), teacher_dim=32, multimodal=True)
    shapes = jax.eval_shape(lambda k: init_params(build_model(model_cfg), k, (32, 32)), jax.random.key(0))
    rng = np.random.default_rng(42)
    params = jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32), shapes)
    return save_params(path, params, model_cfg)


def overfit_config(init: Path):
    c = get_config("smoke")
    c.data.synthetic.n_train = 6  # a handful of labelled pairs ...
    c.data.synthetic.size = (48, 80)  # (not a multiple of 32: evaluation pads, then crops back)
    c.eval.split = "train"  # ... scored on themselves at full resolution
    c.batch_size = 6
    c.total_steps = 150
    c.eval_every = 0
    c.panel_every = 0
    c.ckpt_every = 150
    c.async_checkpoints = False
    c.init = str(init)
    return c


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    from defusion_jax import train

    tmp = tmp_path_factory.mktemp("seg")
    config = overfit_config(pretrain_folder(tmp / "pretrained", get_config("smoke")))
    result = train.train_and_evaluate(config, str(tmp / "run"))
    return tmp / "run", result


@pytest.mark.slow
def test_overfits_a_handful_of_synthetic_pairs(overfit_run):
    workdir, result = overfit_run
    assert result["status"] == "done" and result["checkpoint"] == 150
    report = workdir / "report"
    m = json.loads((report / "metrics.json").read_text())
    assert m["images"] == 6 and m["split"] == "train" and m["data"] == "synthetic scenes"
    assert m["mIoU"] > 0.9, m
    assert m["mAcc"] > 0.9
    # classes 4..8 never occur and (once learnt) are never predicted: n/a, outside the means
    assert m["iou"][4:] == [None] * 5
    cm = np.array(m["confusion_matrix"])
    assert cm[:, 4:].sum() == 0
    # every labelled pixel of the full-size (48x80) images counted once, ignored (255) ones nowhere
    src = msrs_seg.SyntheticSegSource(6, (48, 80), seed=0)
    labels = np.stack([src.load(i)["label"] for i in range(6)])
    np.testing.assert_array_equal(cm.sum(axis=1), np.bincount(labels[labels != 255], minlength=9))
    assert m["pixels"] == cm.sum() < labels.size
    assert m["init"]["loaded"] > 0 and "encoder" in m["init"]["loaded_modules"]
    assert {"mim_decoder_pred", "latent_predict1", "decoder_fuse_blocks_2"} <= set(m["init"]["dropped_modules"])
    md = (report / "segmentation_table.md").read_text()
    assert "| DeFusion++ (this run) |" in md and "n/a" in md
    assert (report / "segmentation_table.csv").read_text().splitlines()[0].startswith("Method,unlabelled IoU")
    assert len((report / "per_class.csv").read_text().splitlines()) == 1 + 9 + 3
    assert len(list((report / "overlays").glob("*.png"))) == 4


@pytest.mark.slow
def test_reevaluation_cli_reproduces_the_report(overfit_run):
    workdir, _ = overfit_run
    before = json.loads((workdir / "report" / "metrics.json").read_text())
    assert segment.main(["--workdir", str(workdir), "--split", "train"]) == 0
    after = json.loads((workdir / "report_train" / "metrics.json").read_text())
    assert after["confusion_matrix"] == before["confusion_matrix"]
    assert after["step"] == 150
    assert after["init"] == before["init"] and after["init"]["loaded"] > 0  # where the backbone came from
    from defusion_jax.api import load_model  # e.g. as config.init of another fine-tuning run

    with pytest.raises(CheckpointError, match="is a segmentation run's workdir, not a DeFusion\\+\\+ pretraining"):
        load_model(workdir)


def test_load_init_params_takes_only_the_backbone(tmp_path):
    cfg = get_config("smoke")
    folder = pretrain_folder(tmp_path / "pre", cfg)
    task = segment.SegmentTask(cfg, mesh())
    shape = jax.eval_shape(task.init_params, jax.random.key(0))
    params = task.load_init_params(str(folder), shape)
    src, got = flatten(load_params(folder)[0]), flatten(params["backbone"])
    assert got and all(np.array_equal(got[k], src[k]) for k in got)
    top = lambda keys: {k.split("/")[0] for k in keys}  # noqa: E731
    assert top(src) - top(got) == set(task.init_report["dropped_modules"])
    assert task.init_report["loaded"] == len(got) and task.init_report["dropped"] == len(src) - len(got)
    assert jax.tree.structure(shape) == jax.tree.structure(params)
    assert set(task.init_head(jax.random.key(1))) == {"pyramid", "decode_head"}  # head alone, same tree
    # settings no parameter shape shows: the checkpoint's weights would run as another function
    for field, value, said in (("heads", 8, "heads 4 (checkpoint) vs 8 (config)"),
                               ("eps", 1e-6, "eps 1e-05 (checkpoint) vs 1e-06 (config)")):
        other = get_config("smoke")
        other.model.backbone[field] = value
        with pytest.raises(ValueError, match=re.escape(said)):
            segment.SegmentTask(other, mesh()).load_init_params(str(folder), shape)
    other = get_config("smoke")
    other.model.backbone.vit.heads = 4
    with pytest.raises(ValueError, match=r"vit.heads \(2, 2\) \(checkpoint\) vs \(4, 4\) \(config\)"):
        segment.SegmentTask(other, mesh()).load_init_params(str(folder), shape)
    cfg.model.backbone.dim = 32  # a backbone that does not match the checkpoint: one clear line, the
    # first three names (no Python list repr) and how many there are
    with pytest.raises(ValueError, match=r"^the checkpoint does not hold the backbone config\.model\.backbone "
                                         r"describes: wrong shapes 28 \(decode_common_skipconn/linear1/bias \(256,\) "
                                         r"\(expected \(128,\)\), [^\['\]]*, \.\.\.\)$"):
        narrow = segment.SegmentTask(cfg, mesh())
        narrow.load_init_params(str(folder), jax.eval_shape(narrow.init_params, jax.random.key(0)))


@pytest.mark.parametrize("arg,views", [("smoke", ("ir", "vi")), ("smoke,ir", ("ir", "ir")),
                                       ("smoke,vi", ("vi", "vi"))])
def test_single_modality_rows_feed_one_image_twice(arg, views):
    task = segment.SegmentTask(get_config(arg), mesh())
    batch = {"ir": np.zeros((1, 2, 2, 3)), "vi": np.ones((1, 2, 2, 3))}
    x1, x2 = task._views(batch)
    assert float(x1.mean()) == float(batch[views[0]].mean()) and float(x2.mean()) == float(batch[views[1]].mean())
    with pytest.raises(ValueError, match="pick one"):
        get_config("ir,vi")


def test_missing_dataset_is_one_clear_line(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "defusion_jax.main", f"--config={CONFIG}", f"--workdir={tmp_path / 'w'}",
                        f"--config.data.root={tmp_path / 'MSRS'}"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in r.stderr
    assert "{train,test}/ir/NAME.png" in err[0] and "Segmentation_labels" in err[0]


def test_smoke_backbone_is_the_pretrain_smoke_network():
    """configs/segment_msrs.py:smoke can start from a configs/pretrain.py:smoke workdir
    (docs/segmentation.md): every backbone parameter exists there with the same shape."""
    from flax import traverse_util

    from configs.pretrain import get_config as pretrain_config
    from defusion_jax.tasks import get_task

    m = mesh()
    seg = segment.SegmentTask(get_config("smoke"), m)
    seg_shapes = jax.eval_shape(seg.init_params, jax.random.key(0))["backbone"]
    pre = get_task("pretrain")(pretrain_config("smoke"), m)
    pre_shapes = jax.eval_shape(pre.init_params, jax.random.key(0))
    flat = lambda t: {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(dict(t)).items()}  # noqa: E731
    seg_flat, pre_flat = flat(seg_shapes), flat(pre_shapes)
    assert {k: pre_flat.get(k) for k in seg_flat} == seg_flat
    assert any(k.startswith("recon_blocks_mim_encoder_0/") for k in seg_flat)


def test_an_unknown_split_is_an_error_on_synthetic_data_too():
    """`tasks.segment --split=bogus` on the smoke workdir used to score the generated test scenes
    and write report_bogus/; the split names are MSRS's for the stand-in data as well."""
    cfg = get_config("smoke").data
    assert len(msrs_seg.build_seg_source(cfg, "test")) == 8
    with pytest.raises(msrs_seg.DataError, match="unknown MSRS split 'bogus'; expected one of train, test"):
        msrs_seg.build_seg_source(cfg, "bogus")
