"""MAE teacher pretraining: the model matches facebookresearch/mae's `MaskedAutoencoderViT`, the
trainer's loss falls on the smoke config, and the encoder it exports is a teacher the DeFusion++
pretraining (MCUD) path accepts."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from defusion_jax.models import mae as M
from defusion_jax.models import vit

ATOL = 1e-4


def init(model, size, seed=0):
    return jax.device_get(jax.jit(lambda r: M.init_mae_params(model, r, size))(jax.random.key(seed)))


def mae_sincos(dim, g):
    """MAE's `get_2d_sincos_pos_embed(dim, g, cls_token=True)` (util/pos_embed.py), transcribed."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)), 0)
    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0).astype(np.float32)[None]


# ---- pure pieces ----------------------------------------------------------------------------------
def test_patchify_is_maes_order_and_inverts():
    x = np.random.default_rng(0).normal(size=(2, 32, 48, 3)).astype(np.float32)
    p = np.asarray(M.patchify(jnp.asarray(x), 16))
    # MAE: imgs (N,3,H,W).reshape(N,3,h,p,w,q); einsum('nchpwq->nhwpqc'); reshape(N, h*w, p*q*3)
    ref = np.einsum("nchpwq->nhwpqc", x.transpose(0, 3, 1, 2).reshape(2, 3, 2, 16, 3, 16)).reshape(2, 6, 768)
    np.testing.assert_array_equal(p, ref)
    np.testing.assert_array_equal(np.asarray(M.unpatchify(jnp.asarray(p), 2, 3, 16)), x)


def test_masking_from_noise_keeps_the_lowest_noise():
    noise = jax.random.uniform(jax.random.key(0), (3, 196))
    keep, restore, mask = (np.asarray(a) for a in vit.masking_from_noise(noise, 0.75))
    assert keep.shape == (3, 49) and restore.shape == (3, 196)
    np.testing.assert_array_equal(mask.sum(1), [147] * 3)
    for b in range(3):
        np.testing.assert_array_equal(np.sort(keep[b]), np.sort(np.argsort(np.asarray(noise[b]))[:49]))
        assert (mask[b, keep[b]] == 0).all()
        shuffle = np.argsort(np.asarray(noise[b]))
        np.testing.assert_array_equal(shuffle[restore[b]], np.arange(196))  # restore un-shuffles
    k2, _, m2 = vit.random_masking(jax.random.key(1), 3, 196, 0.75)
    assert k2.shape == (3, 49) and float(m2.mean()) == 0.75


def test_encoder_without_mask_is_the_vit_and_exports_as_teacher(tmp_path):
    cfg = dict(width=64, depth=2, heads=2, mlp_dim=128, eps=1e-6, posemb="sincos", normalize=True)
    model = M.build_mae(dict(encoder=cfg, decoder=dict(width=32, depth=1, heads=2, mlp_dim=64)))
    params = init(model, (64, 64))
    x = jax.random.uniform(jax.random.key(1), (2, 48, 80, 3))
    plain = jax.jit(vit.vit_from_config(cfg).apply)({"params": params["encoder"]}, x)["tokens"]
    enc = jax.jit(M.encoder_from_config(cfg).apply)({"params": params["encoder"]}, x)
    np.testing.assert_array_equal(np.asarray(enc), np.asarray(plain))
    M.export_teacher(params, {"encoder": cfg}, tmp_path / "teacher")
    module, tp = vit.load(tmp_path / "teacher", normalize=True)
    np.testing.assert_allclose(np.asarray(jax.jit(module.apply)({"params": tp}, x)), np.asarray(plain), atol=1e-6)


# ---- against MAE's PyTorch model ------------------------------------------------------------------
def torch_mae(embed_dim=64, depth=2, heads=2, dec_dim=32, dec_depth=1, dec_heads=2, img=64):
    """facebookresearch/mae `models_mae.MaskedAutoencoderViT` (norm_pix_loss=True), transcribed with
    the timm layers it imports; `noise` is an argument instead of `torch.rand` inside."""
    torch = pytest.importorskip("torch", reason="torch (requirements-dev.txt) is the MAE reference")
    pytest.importorskip("timm", reason="timm (requirements-dev.txt) is the MAE reference")
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import Block

    nn = torch.nn
    norm = functools.partial(nn.LayerNorm, eps=1e-6)

    class MaskedAutoencoderViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = PatchEmbed(img, 16, 3, embed_dim)
            n = self.patch_embed.num_patches
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.pos_embed = nn.Parameter(torch.from_numpy(mae_sincos(embed_dim, int(n**0.5))), requires_grad=False)
            self.blocks = nn.ModuleList([Block(embed_dim, heads, 4.0, qkv_bias=True, norm_layer=norm)
                                         for _ in range(depth)])
            self.norm = norm(embed_dim)
            self.decoder_embed = nn.Linear(embed_dim, dec_dim, bias=True)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
            self.decoder_pos_embed = nn.Parameter(torch.from_numpy(mae_sincos(dec_dim, int(n**0.5))),
                                                  requires_grad=False)
            self.decoder_blocks = nn.ModuleList([Block(dec_dim, dec_heads, 4.0, qkv_bias=True, norm_layer=norm)
                                                 for _ in range(dec_depth)])
            self.decoder_norm = norm(dec_dim)
            self.decoder_pred = nn.Linear(dec_dim, 16 * 16 * 3, bias=True)

        def patchify(self, imgs):
            p = 16
            h = w = imgs.shape[2] // p
            x = imgs.reshape(shape=(imgs.shape[0], 3, h, p, w, p))
            x = torch.einsum("nchpwq->nhwpqc", x)
            return x.reshape(shape=(imgs.shape[0], h * w, p**2 * 3))

        def random_masking(self, x, mask_ratio, noise):
            N, L, D = x.shape
            len_keep = int(L * (1 - mask_ratio))
            ids_shuffle = torch.argsort(noise, dim=1)
            ids_restore = torch.argsort(ids_shuffle, dim=1)
            ids_keep = ids_shuffle[:, :len_keep]
            x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
            mask = torch.ones([N, L])
            mask[:, :len_keep] = 0
            mask = torch.gather(mask, dim=1, index=ids_restore)
            return x_masked, mask, ids_restore

        def forward_encoder(self, x, mask_ratio, noise):
            x = self.patch_embed(x)
            x = x + self.pos_embed[:, 1:, :]
            x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
            cls_token = self.cls_token + self.pos_embed[:, :1, :]
            x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            for blk in self.blocks:
                x = blk(x)
            return self.norm(x), mask, ids_restore

        def forward_decoder(self, x, ids_restore):
            x = self.decoder_embed(x)
            mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
            x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
            x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
            x = torch.cat([x[:, :1, :], x_], dim=1)
            x = x + self.decoder_pos_embed
            for blk in self.decoder_blocks:
                x = blk(x)
            return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

        def forward_loss(self, imgs, pred, mask):
            target = self.patchify(imgs)
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
            loss = ((pred - target) ** 2).mean(dim=-1)
            return (loss * mask).sum() / mask.sum()

        def forward(self, imgs, noise, mask_ratio=0.75):
            latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
            pred = self.forward_decoder(latent, ids_restore)
            return self.forward_loss(imgs, pred, mask), pred, mask

    model = MaskedAutoencoderViT().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embed" in name:
                continue
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if "norm" in name else 0.05)
                    + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def test_mae_matches_pytorch_mae_and_full_checkpoint_converts(tmp_path):
    torch = pytest.importorskip("torch")
    ref = torch_mae()
    torch.save({"model": ref.state_dict(), "epoch": 799}, tmp_path / "mae_full.pth")  # MAE's saver layout
    model = M.build_mae(dict(encoder=dict(width=64, depth=2, heads=2, mlp_dim=256, posemb="sincos"),
                             decoder=dict(width=32, depth=1, heads=2, mlp_dim=128)))
    fresh = init(model, (64, 64))
    params, notes = M.init_from(tmp_path / "mae_full.pth", model, fresh)
    assert "decoder from the checkpoint" in notes
    rng = np.random.default_rng(0)
    x01 = rng.uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
    xn = (x01 - np.asarray(vit.IMAGENET_MEAN, np.float32)) / np.asarray(vit.IMAGENET_STD, np.float32)
    noise = rng.uniform(size=(2, 16)).astype(np.float32)
    with torch.no_grad():
        loss_t, pred_t, mask_t = ref(torch.from_numpy(xn.transpose(0, 3, 1, 2)), torch.from_numpy(noise))
    out = jax.jit(lambda p, x, ids: model.apply({"params": p}, x, None, ids=ids))(
        params, jnp.asarray(x01), vit.masking_from_noise(jnp.asarray(noise), 0.75))
    np.testing.assert_array_equal(np.asarray(out["mask"]), mask_t.numpy())
    err = float(np.abs(np.asarray(out["pred"]) - pred_t.numpy()).max())
    loss = float(M.mae_loss(out["pred"], out["target_images"], out["mask"]))
    print(f"MAE pred max |diff| = {err:.2e}; loss {loss:.6f} vs torch {float(loss_t):.6f}")
    assert err < ATOL and abs(loss - float(loss_t)) < ATOL


def test_init_from_encoder_only_keeps_fresh_decoder(tmp_path):
    torch = pytest.importorskip("torch")
    ref = torch_mae()
    enc_only = {k: v for k, v in ref.state_dict().items() if not (k.startswith("decoder") or k == "mask_token")}
    torch.save({"model": enc_only}, tmp_path / "mae_pretrain.pth")  # like mae_pretrain_vit_base.pth
    model = M.build_mae(dict(encoder=dict(width=64, depth=2, heads=2, mlp_dim=256),
                             decoder=dict(width=32, depth=1, heads=2, mlp_dim=128)))
    fresh = init(model, (64, 64))
    params, notes = M.init_from(tmp_path / "mae_pretrain.pth", model, fresh)
    assert any("decoder freshly initialised" in n for n in notes)
    np.testing.assert_array_equal(params["decoder_pred"]["kernel"], fresh["decoder_pred"]["kernel"])
    np.testing.assert_array_equal(params["encoder"]["blocks_1"]["attn"]["qkv"]["kernel"],
                                  enc_only["blocks.1.attn.qkv.weight"].numpy().T)


def test_mae_initialize_matches_maes_scheme():
    model = M.build_mae(dict(encoder=dict(width=96, depth=1, heads=2, mlp_dim=192),
                             decoder=dict(width=64, depth=1, heads=2, mlp_dim=128)))
    p = init(model, (32, 32))
    k = p["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"]  # (96, 288): xavier_uniform bound
    bound = math.sqrt(6 / (96 + 288))
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.95 * bound and abs(k.std() - bound / math.sqrt(3)) < 0.01
    conv = p["encoder"]["patch_embed"]["proj"]["kernel"]  # MAE: xavier on the (96, 768) view
    bound = math.sqrt(6 / (768 + 96))
    assert np.abs(conv).max() <= bound and np.abs(conv).max() > 0.95 * bound
    assert (p["encoder"]["norm"]["scale"] == 1).all() and (p["decoder_embed"]["bias"] == 0).all()
    assert 0.015 < p["encoder"]["cls_token"].std() < 0.025 and 0.015 < p["mask_token"].std() < 0.025


# ---- the trainer: smoke run, export, and the exported teacher in the MCUD path ----------------------
def _need_trainer():
    """The shared trainer and the pretraining task come with issue 3; until they are in the
    checkout these tests are PENDING (skipped loudly), not passed."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    missing = [p for p in ("defusion_jax/train.py", "defusion_jax/tasks/__init__.py", "defusion_jax/tasks/pretrain.py",
                           "configs/pretrain.py") if not (root / p).is_file()]
    if missing:
        pytest.skip(f"*** PENDING: the shared trainer (issue 3) is not in this checkout ({', '.join(missing)}) ***")


def _config(name, arg):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


@pytest.mark.slow
def test_smoke_run_loss_falls_and_its_teacher_trains_mcud(tmp_path):
    _need_trainer()
    from defusion_jax import train
    from defusion_jax.logging_utils import read_metrics
    from defusion_jax.tasks import mae as mae_task

    c = _config("teacher_mae", "smoke")
    c.total_steps, c.log_every, c.panel_every, c.ckpt_every = 40, 5, 0, 40
    c.tensorboard, c.async_checkpoints = False, False
    res = train.train_and_evaluate(c, str(tmp_path / "mae"))
    assert res["status"] == "done" and res["checkpoint"] == 40
    losses = [r["loss"] for r in read_metrics(tmp_path / "mae")]
    print("MAE smoke losses every 5 steps:", [round(v, 3) for v in losses])
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-2:]) < 0.8 * losses[0], losses

    # The run exported its encoder; the export CLI writes the same from the checkpoint.
    teacher = tmp_path / "mae" / mae_task.TEACHER_DIR
    assert mae_task.main(["--workdir", str(tmp_path / "mae"), "--output", str(tmp_path / "t2")]) == 0
    m1, p1 = vit.load(teacher, normalize=True)
    m2, p2 = vit.load(tmp_path / "t2", normalize=True)
    assert m1 == m2 and m1.width == 64 and m1.normalize
    jax.tree.map(np.testing.assert_array_equal, p1, p2)

    # config.init from a teacher folder (e.g. the converted ImageNet MAE) sets the encoder; the
    # warm-up starts at lr 0, so after one step the checkpoint still holds exactly those weights.
    c1 = _config("teacher_mae", "smoke")
    c1.init, c1.total_steps, c1.panel_every, c1.tensorboard = str(teacher), 1, 0, False
    assert train.train_and_evaluate(c1, str(tmp_path / "mae_init"))["status"] == "done"
    from defusion_jax.checkpoints import load_params_from_workdir

    restarted, _, _ = load_params_from_workdir(tmp_path / "mae_init")
    jax.tree.map(np.testing.assert_array_equal, restarted["encoder"], p1)
    # ... and from another MAE workdir, every parameter.
    model = M.build_mae(c.model.to_dict())
    again, notes = M.init_from(tmp_path / "mae", model, init(model, (64, 64)))
    final, _, _ = load_params_from_workdir(tmp_path / "mae")
    jax.tree.map(np.testing.assert_array_equal, again, final)

    # DeFusion++ pretraining with it as both teachers, every step a multi-modal (MCUD) batch.
    p = _config("pretrain", "smoke")
    p.teacher.smoke = {}
    p.teacher.visible = p.teacher.infrared = str(teacher)
    p.model.teacher_dim = m1.width
    p.mm_ratio, p.total_steps, p.log_every, p.panel_every, p.ckpt_every = 1.0, 2, 1, 0, 2
    p.tensorboard, p.async_checkpoints = False, False
    res = train.train_and_evaluate(p, str(tmp_path / "mcud"))
    assert res["status"] == "done"
    rows = read_metrics(tmp_path / "mcud")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["mcud/unique"]) and r["mcud/unique"] > 0 for r in rows)


def test_export_cli_bad_workdir_exits_2(tmp_path, capsys):
    _need_trainer()
    from defusion_jax.tasks import mae as mae_task

    assert mae_task.main(["--workdir", str(tmp_path / "nothing"), "--output", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "nothing" in err[0]
    assert not (tmp_path / "t").exists()
