"""MAE pretraining of a ViT-B/16 teacher on infrared images (the paper's FLIR H_fix).

    python -m defusion_jax.main --config=configs/teacher_mae.py --workdir=runs/mae_ir \
        --config.data.train.path=data/FLIR_ADAS_v2/images_thermal_train
    python -m defusion_jax.main --config=configs/teacher_mae.py:imagenet_init --workdir=runs/mae_ir \
        --config.init=teachers/mae_vit_b16
    python -m defusion_jax.main --config=configs/teacher_mae.py:smoke --workdir=runs/mae_smoke

Arguments after ':' (comma separated):
  smoke          tiny ViT on the bundled infrared samples (defusion_jax/sample_data/ivf/ir); a few
                 minutes on a 2-core CPU; checkpoints, panels and the teacher export included
  imagenet_init  continue from the converted ImageNet MAE (set --config.init to the folder written
                 by `python -m defusion_jax.convert vit --input mae_pretrain_vit_base.pth ...`):
                 shorter run, smaller peak learning rate
  fsdp           shard every parameter above 64k elements over the data axis

Data ("FLIR layout"): every image under `config.data.train.path`, recursively. Point it at the
thermal folder only: FLIR ADAS v2 `images_thermal_train/` (its `data/*.jpg`), or v1.3
`train/thermal_8_bit/`; the sibling RGB folders must not be included. Grey images become 3 equal
channels, as for the student.

Recipe (facebookresearch/mae PRETRAIN.md): ViT-B/16 encoder, decoder 512 wide x 8 blocks x 16
heads, 75 % masking, normalised-pixel loss, AdamW betas (0.9, 0.95), weight decay 0.05, lr =
1.5e-4 x batch / 256 after a linear warm-up, then half-cosine decay to 0, no weight decay on biases
and LayerNorm scales, RandomResizedCrop(scale 0.2-1) + horizontal flip.

The encoder is written to WORKDIR/teacher when the run ends (use it as
--config.teacher.infrared of configs/pretrain.py); `python -m defusion_jax.tasks.mae --workdir
WORKDIR --output DIR` exports any checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from defusion_jax.config_blocks import add_trainer_fields, parse_args

SAMPLE_IR = Path(__file__).resolve().parents[1] / "defusion_jax" / "sample_data" / "ivf" / "ir"
FLIR_V2_THERMAL_TRAIN = 10_742  # images in FLIR ADAS v2 images_thermal_train


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_args(arg, {"smoke", "imagenet_init", "fsdp"}, "configs/teacher_mae.py")

    c = ml_collections.ConfigDict()
    c.task = "mae"
    c.seed = 0

    # ---- run length and batch --------------------------------------------------------------
    c.batch_size = 256
    c.image_size = 224
    epochs = 100 if "imagenet_init" in args else 400
    c.total_steps = epochs * FLIR_V2_THERMAL_TRAIN // c.batch_size
    c.stop_after = 0

    # ---- model ------------------------------------------------------------------------------
    c.model = dict(encoder=dict(variant="B", eps=1e-6, posemb="sincos", normalize=True),
                   decoder=dict(width=512, depth=8, heads=16, mlp_dim=2048), mask_ratio=0.75)
    c.norm_pix_loss = True
    c.compute_dtype = "float32"  # or 'bfloat16'
    c.remat = False

    # ---- data -------------------------------------------------------------------------------
    c.data = dict(train=dict(kind="folder", path="data/FLIR_ADAS_v2/images_thermal_train", min_size=32,
                             jitter=False, flip=True),
                  scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), num_threads=8, prefetch=4)

    # ---- optimiser ----------------------------------------------------------------------------
    blr = 1.5e-4 if "imagenet_init" not in args else 0.5e-4
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, grad_clip_norm=0.0,
                       decay_exempt_1d=True)
    c.schedule = dict(name="cosine", base_lr=blr * c.batch_size / 256, end_lr=0.0,
                      warmup_steps=c.total_steps // (20 if "imagenet_init" in args else 10))

    # ---- devices, checkpoints and logs (defusion_jax.config_blocks) ----------------------------
    add_trainer_fields(c, fsdp="fsdp" in args, ckpt_every=2000, log_every=50,
                       panel_every=2000, eval_every=0)
    # config.init: the converted ImageNet MAE folder, a timm/MAE checkpoint file or an MAE workdir

    if "smoke" in args:
        c.batch_size = 4
        c.image_size = 64
        c.total_steps = 120
        c.model = dict(encoder=dict(width=64, depth=2, heads=2, mlp_dim=128, eps=1e-6, posemb="sincos",
                                    normalize=True),
                       decoder=dict(width=32, depth=1, heads=2, mlp_dim=64), mask_ratio=0.75)
        c.data.train = dict(kind="folder", path=str(SAMPLE_IR), min_size=32, jitter=False, flip=True)
        c.data.num_threads = 2
        c.optimizer.weight_decay = 0.0
        c.schedule = dict(base_lr=2e-3, milestones=(2 / 3,), gamma=0.5, warmup_steps=10)
        c.ckpt_every = 60
        c.log_every = 10
        c.panel_every = 60
    return c
