"""timm/MAE ViT checkpoints convert to Flax params that compute timm's `forward_features`.

Randomly initialised timm models (no downloads) are saved the ways users have them (bare `.pth`,
MAE's `{'model': ...}` wrapper, `.safetensors`, float16), converted, and compared token by token
with timm on the same ImageNet-normalised images (float32, CPU, highest matmul precision).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (requirements-dev.txt) builds the reference checkpoints")
timm = pytest.importorskip("timm", reason="timm (requirements-dev.txt) is the reference ViT")

from defusion_jax.convert import main as convert_main  # noqa: E402
from defusion_jax.convert_vit import convert_vit  # noqa: E402
from defusion_jax.models import vit  # noqa: E402
from defusion_jax.params_io import CheckpointError, load_params  # noqa: E402

ATOL = 1e-4
REPO = Path(__file__).resolve().parents[1]


def mae_sincos(dim, grid_h, grid_w):
    """MAE's `get_2d_sincos_pos_embed(dim, size, cls_token=True)` transcribed (models/pos_embed.py),
    with `grid_size` split into h and w; `meshgrid(grid_w, grid_h)` puts columns first."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32)), 0)
    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0).astype(np.float32)[None]


def images(n, h=224, w=224, seed=0):
    """ImageNet-normalised NCHW images (what timm's forward_features takes)."""
    x = np.random.default_rng(seed).uniform(0, 1, (n, 3, h, w)).astype(np.float32)
    mean = np.asarray(vit.IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(vit.IMAGENET_STD, np.float32)[:, None, None]
    return (x - mean) / std


def timm_tokens(model, x):
    with torch.no_grad():
        return model.forward_features(torch.from_numpy(x)).numpy()


def ours(module, params, x):
    return np.asarray(jax.jit(module.apply)({"params": params}, x.transpose(0, 2, 3, 1)))


def randomise(model, seed=0):
    """Random values in every tensor, LayerNorm affines included (timm's own init is slow and
    leaves those at 1 and 0, which would hide a swapped scale/bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if "norm" in name else 0.05)
                    + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model.eval()


def timm_model(name, seed=0, **kw):
    return randomise(timm.create_model(name, pretrained=False, weight_init="skip", **kw), seed)


def tiny_timm(img_size=224, seed=0, **kw):
    from timm.models.vision_transformer import VisionTransformer

    return randomise(VisionTransformer(img_size=img_size, patch_size=16, embed_dim=192, depth=2, num_heads=3,
                                       weight_init="skip", **kw), seed)


def state_dict(model, dtype=None):
    return {k: (v.to(dtype) if dtype is not None else v).clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "vit_small_patch16_224"])
def test_timm_parity_bare_and_mae_wrapped(name, tmp_path):
    ref = timm_model(name)
    sd = state_dict(ref)
    torch.save(sd, tmp_path / "bare.pth")
    torch.save({"model": sd}, tmp_path / "mae.pth")
    x = images(1)
    want = timm_tokens(ref, x)
    for f in ("bare.pth", "mae.pth"):
        module, params = vit.load(tmp_path / f)  # converts on the fly; normalize=False
        assert module.posemb == "learned" and module.eps == 1e-6
        got = ours(module, params, x)
        assert got.shape == want.shape
        err = np.abs(got - want).max()
        print(f"{name} {f}: max |tokens - timm| = {err:.2e}")
        assert err < ATOL, (name, f, err)


def test_cli_folder_loads_as_teacher(tmp_path, capsys):
    ref = tiny_timm(num_classes=10)
    sd = state_dict(ref)
    sd.update({"fc_norm.weight": torch.ones(192), "fc_norm.bias": torch.zeros(192)})  # fine-tuning extras
    torch.save({"model": sd}, tmp_path / "ckpt.pth")
    assert convert_main(["vit", "--input", str(tmp_path / "ckpt.pth"), "--output", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "skipped fc_norm.weight" in out and "skipped head.weight" in out
    cfg = json.loads((tmp_path / "t" / "model.json").read_text())["model"]
    assert {k: cfg[k] for k in ("width", "depth", "heads", "mlp_dim", "eps", "posemb", "posemb_grid", "normalize")} \
        == dict(width=192, depth=2, heads=3, mlp_dim=768, eps=1e-6, posemb="learned", posemb_grid=[14, 14],
                normalize=True)
    x = images(2)
    want = timm_tokens(ref, x)
    module, params = vit.load(tmp_path / "t")
    assert not module.normalize
    assert np.abs(ours(module, params, x) - want).max() < ATOL
    # The trainers feed [0,1] images: normalize=True applies ImageNet normalisation inside.
    module01, _ = vit.load(tmp_path / "t", normalize=True)
    raw = x * np.asarray(vit.IMAGENET_STD, np.float32)[:, None, None] + \
        np.asarray(vit.IMAGENET_MEAN, np.float32)[:, None, None]
    assert np.abs(ours(module01, params, raw) - want).max() < ATOL
    assert vit.load(tmp_path / "t", normalize=None)[0].normalize  # as stored


def test_mae_sincos_table_carried_and_recomputed_for_other_grid(tmp_path):
    ref = tiny_timm(seed=1)
    sd = state_dict(ref)
    sd["pos_embed"] = torch.from_numpy(mae_sincos(192, 14, 14))
    params, cfg, notes = convert_vit({k: v.numpy() for k, v in sd.items()})
    assert cfg["posemb"] == "sincos" and "pos_embed" not in params
    assert any("sin-cos" in n for n in notes)
    torch.save({"model": sd}, tmp_path / "mae.pth")
    module, params = vit.load(tmp_path / "mae.pth")
    ref.load_state_dict(sd)
    x = images(1, seed=3)
    assert np.abs(ours(module, params, x) - timm_tokens(ref, x)).max() < ATOL
    # MAE at another resolution recomputes its fixed table for the new (non-square) grid.
    big = tiny_timm(img_size=(256, 320), seed=1)
    sd_big = dict(sd, pos_embed=torch.from_numpy(mae_sincos(192, 16, 20)))
    big.load_state_dict(sd_big)
    x = images(1, 256, 320, seed=4)
    err = np.abs(ours(module, params, x) - timm_tokens(big, x)).max()
    assert err < ATOL, err


def test_learned_table_resampled_like_timm(tmp_path):
    ref = tiny_timm(seed=2, dynamic_img_size=True)
    with torch.no_grad():
        ref.pos_embed.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))  # a wrong resampling shows
    torch.save(state_dict(ref), tmp_path / "vit.pth")
    x = images(1, 256, 320, seed=5)
    want = timm_tokens(ref, x)  # timm resamples bicubically (antialiased) at run time
    module, params = vit.load(tmp_path / "vit.pth")
    assert np.abs(ours(module, params, x) - want).max() < ATOL
    # ... or once at conversion time.
    assert convert_main(["vit", "--input", str(tmp_path / "vit.pth"), "--output", str(tmp_path / "t"),
                         "--image-size", "256", "320"]) == 0
    module, params = vit.load(tmp_path / "t")
    assert module.posemb_grid == (16, 20) and params["pos_embed"].shape == (1, 1 + 16 * 20, 192)
    assert np.abs(ours(module, params, x) - want).max() < ATOL


def test_float16_pth_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    ref = tiny_timm(seed=3)
    half = state_dict(ref, torch.float16)
    torch.save({"model": half}, tmp_path / "half.pth")
    save_file(half, str(tmp_path / "half.safetensors"))
    ref.load_state_dict({k: v.float() for k, v in half.items()})  # the function the fp16 file holds
    x = images(1, seed=6)
    want = timm_tokens(ref, x)
    for f in ("half.pth", "half.safetensors"):
        module, params = vit.load(tmp_path / f)
        assert all(v.dtype == np.float32 for v in jax.tree.leaves(params))
        assert np.abs(ours(module, params, x) - want).max() < ATOL, f
    # An MAE table stored in float16 is still recognised as the fixed sin-cos table.
    half["pos_embed"] = torch.from_numpy(mae_sincos(192, 14, 14)).half()
    _, cfg, notes = convert_vit({k: v.float().numpy() for k, v in half.items()})
    assert cfg["posemb"] == "sincos" and any("float16" in n for n in notes)


def test_heads_flag_and_inference():
    sd = {k: v.numpy() for k, v in state_dict(tiny_timm()).items()}
    _, cfg, _ = convert_vit(sd)
    assert cfg["heads"] == 3 and "variant" not in cfg  # depth 2 is no standard variant
    _, cfg, _ = convert_vit(sd, heads="6,12")
    assert cfg["heads"] == [6, 12]
    with pytest.raises(CheckpointError, match="2 blocks"):
        convert_vit(sd, heads="6,6,12")
    with pytest.raises(CheckpointError, match="not divisible"):
        convert_vit(sd, heads=5)


def test_mismatched_checkpoint_lists_every_problem_in_one_line():
    sd = {k: v.numpy() for k, v in state_dict(tiny_timm()).items()}
    del sd["blocks.1.attn.proj.weight"]
    sd["blocks.0.ls1.gamma"] = np.ones(192, np.float32)  # layer scale: not this architecture
    sd["blocks.0.mlp.fc2.bias"] = np.zeros(100, np.float32)
    with pytest.raises(CheckpointError) as e:
        convert_vit(sd, source="x.pth")
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("missing keys 1 (blocks.1.attn.proj.weight)", "unexpected keys 1 (blocks.0.ls1.gamma)",
                 "wrong shapes 1 (blocks.0.mlp.fc2.bias (100,)"):
        assert part in msg, msg
    sd.update({f"extra.{i}": np.zeros(1, np.float32) for i in range(500)})  # another network: counts, not a list
    with pytest.raises(CheckpointError, match=r"unexpected keys 501 \(.*, \.\.\.\)") as e:
        convert_vit(sd, source="x.pth")
    assert len(str(e.value)) < 600


def test_load_rejects_folder_whose_config_disagrees(tmp_path):
    params, cfg, _ = convert_vit({k: v.numpy() for k, v in state_dict(tiny_timm()).items()})
    from defusion_jax.params_io import save_params

    save_params(tmp_path / "t", params, dict(cfg, depth=3), {})
    with pytest.raises(CheckpointError, match=r"do not match the ViT config in model.json: missing keys \d+ \(.*blocks_2/attn/proj/kernel"):
        vit.load(tmp_path / "t")
    assert load_params(tmp_path / "t")[1]["depth"] == 3


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    r = subprocess.run([sys.executable, "-m", "defusion_jax.convert", "vit", "--input", str(bad),
                        "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "broken.pth" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_distilled_deit_names_its_dist_token():
    """A distilled DeiT (cls + dist token, 2 + 14x14 position rows) is refused naming dist_token,
    not as a position table of the wrong length."""
    sd = {k: v.numpy() for k, v in state_dict(tiny_timm()).items()}
    sd["dist_token"] = np.zeros((1, 1, 192), np.float32)
    sd["pos_embed"] = np.zeros((1, 2 + 14 * 14, 192), np.float32)
    with pytest.raises(CheckpointError, match=r"x.pth: has a dist_token \(a distilled DeiT"):
        convert_vit(sd, source="x.pth")
