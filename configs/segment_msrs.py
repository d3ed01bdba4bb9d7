"""Semantic segmentation on MSRS from DeFusion++ fused features (paper Sec. 4.4.2, Table 5).

    python -m defusion_jax.main --config=configs/segment_msrs.py --workdir=runs/seg \\
        --config.init=runs/pretrain --config.data.root=data/MSRS
    python -m defusion_jax.main --config=configs/segment_msrs.py:ir --workdir=runs/seg_ir ...   # Table 5 "IR"
    python -m defusion_jax.main --config=configs/segment_msrs.py:vi --workdir=runs/seg_vi ...   # Table 5 "VI"
    python -m defusion_jax.main --config=configs/segment_msrs.py:smoke --workdir=runs/seg_smoke

Arguments after ':' (comma separated):
  fused  (default) IR and visible image as the two views (the DeFusion++ row)
  ir     the infrared image as both views (single-modality baseline, first row of Table 5)
  vi     the visible image as both views (second row)
  smoke  tiny model (ViT width 64, depth 2) on generated IR/visible scenes with labels; trains,
         evaluates and writes the same report files as a real run in a few minutes on a 2-core CPU
  fsdp   shard parameters above 64k elements over the data axis

Data: the MSRS repository layout (github.com/Linfeng-Tang/MSRS) under --config.data.root:
{train,test}/{ir,vi,Segmentation_labels}/NAME.png; the paper's split is MSRS train / test.
Init: --config.init is a pretraining workdir, a converted parameter folder or the official
checkpoint; only the backbone (encoder, CA blocks, MFM encoder) is taken. Without it the backbone
starts from random weights (not the paper's setting; the run logs a warning).

The paper names only the head (UPerHead) and the data; the optimisation recipe below is
mmsegmentation's for ViT + UPerNet (AdamW 6e-5, weight decay 0.01, linear warm-up 1500 steps then
poly decay with power 1), with 40k steps of batch 8 (~300 epochs of MSRS train) and full-size
480x640 crops after a random 0.5-2x rescale and flip. See docs/segmentation.md.
"""

from __future__ import annotations

import ml_collections

from defusion_jax.config_blocks import VIT_TI_MIM, add_trainer_fields, parse_args, pick_modality

CLASS_NAMES = ("unlabelled", "car", "person", "bike", "curve", "car stop", "guardrail", "colour cone", "bump")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_args(arg, {"smoke", "fused", "ir", "vi", "fsdp"}, "configs/segment_msrs.py")

    c = ml_collections.ConfigDict()
    c.task = "segment"
    c.seed = 0
    c.modality = pick_modality(args)

    # ---- classes ------------------------------------------------------------------------------
    c.num_classes = 9
    c.class_names = CLASS_NAMES
    c.ignore_index = 255

    # ---- run length and batch -------------------------------------------------------------------
    c.batch_size = 8
    c.crop_size = (480, 640)  # training crop (H, W); evaluation is always at full resolution
    c.total_steps = 40_000
    c.stop_after = 0

    # ---- model ----------------------------------------------------------------------------------
    c.model = dict(
        backbone=dict(vit=dict(VIT_TI_MIM), dim=192, heads=16, mfme_depth=2),  # must match the pretrained network
        pyramid_dim=256, pyramid_scales=(4.0, 2.0, 1.0, 0.5),  # ViTDet simple feature pyramid
        head_channels=512, pool_scales=(1, 2, 3, 6), norm_groups=32, head_dropout=0.1,  # UPerHead
        direction="q_view2")
    c.compute_dtype = "float32"
    c.remat = False

    # ---- data -----------------------------------------------------------------------------------
    c.data = dict(root="data/MSRS", synthetic={}, min_size=32, num_threads=8, prefetch=4)
    c.augment = dict(scale=(0.5, 2.0), flip=True)
    c.eval = dict(split="test", batch_size=8, max_images=0, overlays=8)

    # ---- optimiser --------------------------------------------------------------------------------
    c.optimizer = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip_norm=0.0)
    c.schedule = dict(name="poly", base_lr=6e-5, end_lr=0.0, power=1.0, warmup_steps=1500)

    # ---- devices, checkpoints and logs (defusion_jax.config_blocks) ----------------------------
    add_trainer_fields(c, fsdp="fsdp" in args, ckpt_every=2000, log_every=50,
                       panel_every=2000, eval_every=4000)

    if "smoke" in args:
        c.batch_size = 8
        c.crop_size = (64, 64)
        c.total_steps = 240
        c.model = dict(backbone=dict(vit=dict(width=64, depth=2, heads=2, mlp_dim=128, eps=1e-6), dim=64, heads=4,
                                     mfme_depth=1),  # = configs/pretrain.py:smoke's model
                       pyramid_dim=32, pyramid_scales=(4.0, 2.0, 1.0, 0.5), head_channels=32, pool_scales=(1, 2, 3, 6),
                       norm_groups=8, head_dropout=0.1, direction="q_view2")
        # Generated 64x96 scenes: a coloured block seen only in the visible image (class 1), a hot
        # block only in infrared (2), a block in both (3) and an ignored (255) noise block.
        c.data = dict(root="", synthetic=dict(n_train=16, n_test=8, size=(64, 96), seed=0), min_size=32,
                      num_threads=2, prefetch=2)
        c.augment = dict(scale=(1.0, 1.0), flip=True)
        c.eval = dict(split="test", batch_size=8, max_images=0, overlays=4)
        c.schedule = dict(name="poly", base_lr=1e-3, end_lr=0.0, power=1.0, warmup_steps=10)
        c.optimizer.weight_decay = 0.0
        c.ckpt_every = 120
        c.log_every = 20
        c.panel_every = 120
        c.eval_every = 120
        c.tensorboard = False
    return c
