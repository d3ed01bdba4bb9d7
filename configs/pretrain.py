"""DeFusion++ pretraining (CUD + MFM on COCO, MCUD on MSRS IR/visible pairs).

    python -m defusion_jax.main --config=configs/pretrain.py --workdir=runs/pretrain
    python -m defusion_jax.main --config=configs/pretrain.py:smoke --workdir=runs/smoke
    python -m defusion_jax.main --config=configs/pretrain.py:official --workdir=runs/official
    python -m defusion_jax.main --config=configs/pretrain.py:official,cud --workdir=runs/official_cud

Arguments after ':' (comma separated, any order):
  smoke     tiny model on the bundled sample images with a smoke-only random teacher; finishes on a
            2-core CPU in under 3 minutes (both batch kinds, checkpoints, panels)
  paper     (default) the paper's recipe: unweighted Eq. 3 + 0.1 Eq. 8, Adam lr 1e-4 halved after
            20 of 30 epochs
  official  the released code's loss weights (20/10/10/100 L1 + 50 SSIM/2x MFM, summed over the
            batch) and its MCUD schedule (lr 1e-4, halved at epochs 80/160/180/190 of 200)
  cud       single-modal CUD + MFM only (mm_ratio 0, no teacher); with `official` the CUD schedule
            (lr 4e-4, halved at epochs 20/40/45/47 of 50)
  fsdp      shard every parameter above 64k elements over the data axis (default: replicate)

One "epoch" is the official 50,000-image COCO sample; steps = epochs * 50000 / 16. The real config
expects COCO prepared for tensorflow-datasets under ~/tensorflow_datasets (or
--config.data.single.data_dir), MSRS at data/MSRS/train/{ir,vi}, and the converted MAE teachers at
teachers/ (see docs/training.md); what is missing is reported at start with how to make it.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from defusion_jax.config_blocks import VIT_TI_MIM, add_trainer_fields, parse_args

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "defusion_jax" / "sample_data"
EPOCH_STEPS_AT_16 = 50_000 // 16  # 3125

# Learning-rate schedules: milestones are fractions of total_steps (epoch milestones / epochs).
# Every field train.learning_rate_fn reads is present, so that `--config.schedule.name=cosine
# --config.schedule.end_lr=1e-6` (or poly with `power`) can switch the schedule from the command line.
_STEP = dict(name="step", end_lr=0.0, power=1.0, gamma=0.5, warmup_steps=0)
SCHEDULES = {
    "paper": dict(_STEP, base_lr=1e-4, milestones=(20 / 30,)),
    "official_mcud": dict(_STEP, base_lr=1e-4, milestones=(80 / 200, 160 / 200, 180 / 200, 190 / 200)),
    "official_cud": dict(_STEP, base_lr=4e-4, milestones=(20 / 50, 40 / 50, 45 / 50, 47 / 50)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_args(arg, {"smoke", "paper", "official", "cud", "fsdp"}, "configs/pretrain.py")
    official = "official" in args

    c = ml_collections.ConfigDict()
    c.task = "pretrain"
    c.seed = 0

    # ---- run length and batch --------------------------------------------------------------
    c.batch_size = 16
    c.image_size = 224
    c.total_steps = (50 if "cud" in args else 200) * EPOCH_STEPS_AT_16 if official else 30 * EPOCH_STEPS_AT_16
    c.stop_after = 0  # end this invocation after N steps (checkpointed); 0 = run to total_steps

    # ---- model ------------------------------------------------------------------------------
    c.model = dict(vit=dict(VIT_TI_MIM), dim=192, heads=16, teacher_dim=768)
    c.compute_dtype = "float32"  # or 'bfloat16': bf16 compute, float32 params and optimiser state
    c.remat = False  # rematerialise encoder blocks (less memory, ~30% more compute)

    # ---- pretext tasks ----------------------------------------------------------------------
    c.mm_ratio = 0.0 if "cud" in args else 0.25  # fraction of steps that are MSRS (MCUD) batches
    c.views = dict(coarse_sizes=(13,), fine_sizes=(26, 27), p_range=(0.1, 0.1 + 1 / 1.12),
                   third_grid_thresholds=(0.33, 0.66), swap_prob=0.5)
    c.loss = dict(recipe="official" if official else "paper")
    c.teacher = dict(visible="teachers/mae_vit_b16", infrared="teachers/mae_vit_b16_ir", smoke={})

    # ---- data -------------------------------------------------------------------------------
    c.data = dict(
        single=dict(kind="tfds", name="coco/2017", split="train", data_dir="~/tensorflow_datasets", path="",
                    min_size=32, jitter=True, flip=True),
        multi=dict(kind="paired", path="data/MSRS/train", a="ir", b="vi", min_size=32, jitter=False, flip=True),
        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), num_threads=8, prefetch=4)

    # ---- optimiser ----------------------------------------------------------------------------
    c.optimizer = dict(name="adam", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0)
    c.schedule = dict(SCHEDULES[("official_cud" if "cud" in args else "official_mcud") if official else "paper"])

    # ---- devices, checkpoints and logs (defusion_jax.config_blocks) ----------------------------
    add_trainer_fields(c, fsdp="fsdp" in args, ckpt_every=2000, log_every=50,
                       panel_every=1000, eval_every=0)

    if "smoke" in args:
        c.batch_size = 4
        c.image_size = 64
        c.total_steps = 60
        c.model = dict(vit=dict(width=64, depth=2, heads=2, mlp_dim=128, eps=1e-6), dim=64, heads=4, teacher_dim=32,
                       mfme_depth=1, mfm_decoder_depth=1, dropout=0.0)  # no dropout: ~25% less compile
        c.fast_compile = True
        c.teacher = dict(visible="", infrared="", smoke=dict(width=32, depth=1, heads=2, mlp_dim=64))
        c.data.single = dict(kind="folder", path=str(SAMPLE_DATA), min_size=32, jitter=True, flip=True)
        c.data.multi = dict(kind="paired", path=str(SAMPLE_DATA / "ivf"), a="ir", b="vi", min_size=32,
                            jitter=False, flip=True)
        c.data.num_threads = 2
        c.schedule = dict(_STEP, base_lr=1e-3, milestones=(2 / 3,))
        c.ckpt_every = 30
        c.log_every = 10
        c.panel_every = 30
    return c
