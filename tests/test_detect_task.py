"""End to end through the shared trainer: the smoke config (tiny DeFusion++ backbone + Faster R-CNN
head on generated IR/visible scenes) overfits its images to AP50 > 0.9 and writes the report files;
the backbone comes from a DeFusion++ parameter folder through `config.init`."""

import json

import jax
import numpy as np
import pytest

from configs.detect_m3fd import get_config
from defusion_jax.detection import evaluate as E
from defusion_jax.models.defusion import build_model, init_params
from defusion_jax.params_io import flatten, save_params, unflatten


def fake_pretrained(model_cfg):
    """A DeFusion++ parameter tree with Flax-like initial values, made without compiling an init:
    shapes from eval_shape, LayerNorm scales 1, biases 0, kernels N(0, 1/fan_in)."""
    shapes = jax.eval_shape(lambda r: init_params(build_model(model_cfg), r, (32, 32)), jax.random.key(0))
    rng = np.random.default_rng(0)
    out = {}
    for k, s in flatten(jax.tree.map(lambda x: np.zeros(x.shape, np.float32), shapes)).items():
        if k.endswith("scale"):
            out[k] = np.ones(s.shape, np.float32)
        elif k.endswith("bias") or "mask_token" in k:
            out[k] = np.zeros(s.shape, np.float32)
        else:
            fan_in = int(np.prod(s.shape[:-1])) if s.ndim > 1 else 1
            out[k] = (rng.normal(size=s.shape) / np.sqrt(max(fan_in, 1))).astype(np.float32)
    return unflatten(out)


@pytest.mark.slow
def test_smoke_config_overfits_and_reports(tmp_path):
    from defusion_jax import train

    config = get_config("smoke")
    backbone = config.model.backbone.to_dict()
    source = fake_pretrained(backbone)
    save_params(tmp_path / "pretrained", source, backbone)
    with config.unlocked():
        config.init = str(tmp_path / "pretrained")
    result = train.train_and_evaluate(config, str(tmp_path / "wd"))
    assert result["status"] == "done"

    report = tmp_path / "wd" / "report"
    rows = E.read_report_csv(report / "detection_train.csv")
    ap50, ap = float(rows[0]["AP50"]), float(rows[0]["AP"])
    print(f"smoke overfit: AP50 {ap50:.2f}, AP {ap:.2f}")
    assert ap50 > 90.0, rows
    md = (report / "detection_train.md").read_text()
    assert "| disc | block | ring | AP50 | AP |" in md and f"Backbone init: {tmp_path / 'pretrained'}" in md
    assert md.startswith("# Object detection, train split of the generated scenes (every split is the training")
    assert len(list(report.glob("boxes_train_*.png"))) == config.eval.drawings
    dets = json.loads((report / "detections_train.json").read_text())
    assert dets["detections"] and {c["name"] for c in dets["categories"]} == {"disc", "block", "ring"}
    cfg = json.loads((tmp_path / "wd" / "model_config.json").read_text())["model"]
    assert cfg["detection"]["head"]["num_classes"] == 3


def test_config_arguments():
    assert get_config().modality == "fused" and get_config("ir").modality == "ir"
    assert get_config("vi,smoke").modality == "vi"
    c = get_config()
    assert c.task == "detect" and tuple(c.image_size) == (768, 1024) and c.data.kind == "m3fd"
    assert c.total_steps == 600 * 3360 // 4  # the paper's 600 epochs at batch 4
    with pytest.raises(ValueError, match="pick one"):
        get_config("ir,vi")
    with pytest.raises(ValueError, match="unknown config arguments"):
        get_config("large")
    from defusion_jax.detection.detector import HeadConfig

    for arg in ("", "smoke"):  # docs/detection.md's --config.model.head.nms_method=loop needs the field
        head = get_config(arg).model.head
        assert head.nms_method == HeadConfig.nms_method and set(head) <= set(HeadConfig.__dataclass_fields__)


def test_an_unknown_split_is_an_error_on_synthetic_data_too():
    """The generated stand-in for M3FD accepts M3FD's split names only (it used to take any)."""
    from defusion_jax.data import m3fd

    cfg = {"kind": "synthetic", "count": 2, "size": (64, 64)}
    assert len(m3fd.build_source(cfg, "val")) == 2
    with pytest.raises(m3fd.DataError, match="unknown split 'bogus'"):
        m3fd.build_source(cfg, "bogus")
