"""MAE pretraining of a ViT teacher (e.g. the paper's infrared H_fix on FLIR thermal images).

    python -m defusion_jax.main --config=configs/teacher_mae.py --workdir=runs/mae_ir
    python -m defusion_jax.tasks.mae --workdir runs/mae_ir --output teachers/mae_vit_b16_ir   # any checkpoint

Masked autoencoding as in He et al. (facebookresearch/mae `main_pretrain.py`): 75 % of the patches
are removed per image, the encoder sees the rest, MAE's decoder predicts the removed patches and
the loss is the per-patch-normalised pixel MSE on them (`defusion_jax.models.mae`). Everything
else (mesh, sharded init and step, optimiser, checkpoints, resume, logs, panels) is the shared
trainer's (`defusion_jax.train`).

When the run ends the encoder is written as a teacher folder, WORKDIR/teacher (params.safetensors +
model.json, `normalize: true`), which `defusion_jax.models.vit.load` and the pretraining task's
`config.teacher.infrared` take as is.

`config.init` may name the converted ImageNet MAE (a `convert vit` folder), a timm/MAE `.pth` or
`.safetensors` file (encoder only, or MAE's `*_full.pth` with its decoder), or another MAE
workdir; parts the source lacks (the decoder, usually) keep their fresh initialisation.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from defusion_jax.models import mae as M
from defusion_jax.params_io import CheckpointError, flatten
from defusion_jax.tasks import Task, as_dict, check_same_structure, trainer_keys

TEACHER_DIR = "teacher"


class MAETask(Task):
    console_keys = ("mae/recon",)

    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.image_size = (int(config.image_size), int(config.image_size))
        self.dtype = jnp.dtype(config.get("compute_dtype", "float32"))
        self.norm_pix_loss = bool(config.get("norm_pix_loss", True))
        model_cfg = as_dict(config.model)
        model_cfg["encoder"] = dict(model_cfg["encoder"])
        if config.get("remat", False):
            model_cfg["encoder"]["remat"] = True
        self._model_cfg = model_cfg
        self.model = M.build_mae({**model_cfg, "dtype": self.dtype})
        if self.image_size[0] % self.model.patch:
            raise ValueError(f"image_size {config.image_size} is not a multiple of the patch size {self.model.patch}")

    # ---- model -------------------------------------------------------------------------------
    def init_params(self, rng):
        return M.init_mae_params(self.model, rng, self.image_size)

    def model_config(self) -> dict:
        cfg = {k: v for k, v in self._model_cfg.items() if k != "dtype"}
        cfg["encoder"] = M.full_encoder_config({k: v for k, v in cfg["encoder"].items() if k != "remat"})
        cfg["decoder"] = dict(M.MAE_DECODER, **dict(cfg.get("decoder") or {}))
        return {"kind": "mae", **cfg}

    def load_init_params(self, path: str, params_shape: Any):
        fresh = jax.device_get(jax.jit(self.init_params)(trainer_keys(self.config)[0]))
        params, notes = M.init_from(path, self.model, fresh)
        for n in notes:
            logging.info("config.init: %s", n)
        return check_same_structure(params, params_shape, path)

    # ---- data --------------------------------------------------------------------------------
    def make_train_data(self, process_index: int, process_count: int):
        from defusion_jax.data import pipeline, sources

        d = self.config.data
        train = as_dict(d.train)
        src = sources.build_source(train)
        logging.info("MAE data: %s, %d images", train, len(src))
        return pipeline.make_stream(src, global_batch=int(self.config.batch_size), process_index=process_index,
                                    process_count=process_count, seed=int(self.config.seed),
                                    image_size=self.image_size, scale=tuple(d.scale), ratio=tuple(d.ratio),
                                    jitter=bool(train.get("jitter", False)), flip=bool(train.get("flip", True)),
                                    num_threads=int(d.num_threads), prefetch=int(d.prefetch))

    # ---- loss --------------------------------------------------------------------------------
    def loss_fn(self, params, frozen, batch, rng, step):
        x = batch["image"].astype(jnp.float32)
        out = self.model.apply({"params": params}, x, rng)
        loss = M.mae_loss(out["pred"], out["target_images"], out["mask"], self.model.patch, self.norm_pix_loss)
        return loss, {"mae/recon": loss, "mae/mask_frac": out["mask"].mean()}

    # ---- pictures ----------------------------------------------------------------------------
    def panel(self, params, frozen, batch, rng):
        """Input, what the encoder saw, the reconstruction, and the reconstruction with the visible
        patches pasted back (MAE's demo figure)."""
        x = batch["image"].astype(jnp.float32)
        out = self.model.apply({"params": params}, x, rng)
        p = self.model.patch
        grid = (x.shape[1] // p, x.shape[2] // p)
        target = M.patchify(out["target_images"], p)
        pred = out["pred"].astype(jnp.float32)
        if self.norm_pix_loss:  # back from per-patch standardised to image values
            pred = pred * jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6) + target.mean(-1, keepdims=True)
        mask = out["mask"][:, :, None]
        recon = M.unpatchify(pred, *grid, p)
        pasted = M.unpatchify(pred * mask + target * (1 - mask), *grid, p)
        masked = M.unpatchify(target * (1 - mask), *grid, p)
        if self.model.encoder_config.get("normalize", True):
            from defusion_jax.models.vit import IMAGENET_MEAN, IMAGENET_STD

            mean, std = jnp.asarray(IMAGENET_MEAN), jnp.asarray(IMAGENET_STD)
            recon, pasted = recon * std + mean, pasted * std + mean
            masked = (masked * std + mean) * (1 - M.unpatchify(jnp.broadcast_to(mask, pred.shape), *grid, p))
        cols = {"image": x, "visible": masked, "recon": recon, "recon+visible": pasted}
        return {k: jnp.clip(v, 0.0, 1.0) for k, v in cols.items()}

    # ---- export ------------------------------------------------------------------------------
    def final_report(self, params, frozen, workdir: str) -> None:
        from jax.experimental import multihost_utils

        host = jax.tree.map(lambda a: np.asarray(jax.device_get(a)) if a.is_fully_addressable
                            else np.asarray(multihost_utils.process_allgather(a, tiled=True)), params)
        if jax.process_index() == 0:
            out = M.export_teacher(host, self.model_config(), Path(workdir) / TEACHER_DIR,
                                 {"source": str(workdir), "step": int(self.config.total_steps)})
            logging.info("exported the MAE encoder as a teacher: %s (use it as config.teacher.infrared)", out)


TASK = MAETask


# ---- CLI: export any checkpoint's encoder as a teacher --------------------------------------------
def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m defusion_jax.tasks.mae",
                                     description="Export the encoder of an MAE training checkpoint as a teacher folder.")
    parser.add_argument("--workdir", required=True, help="MAE training workdir, or WORKDIR/checkpoints/<step>")
    parser.add_argument("--output", required=True, help="teacher folder to write (params.safetensors + model.json)")
    args = parser.parse_args(argv)
    try:
        from defusion_jax import checkpoints

        params, cfg, meta = checkpoints.load_params_from_workdir(args.workdir)
        if cfg.get("kind") != "mae":
            raise CheckpointError(f"{args.workdir}: not an MAE training workdir")
        try:
            out = M.export_teacher(params, cfg, args.output, {"source": meta.get("source"), "step": meta.get("step")})
        except OSError as e:
            raise CheckpointError(f"cannot write {args.output}: {e.strerror or e}") from None
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(int(np.prod(v.shape)) for v in flatten(params["encoder"]).values())
    print(f"wrote the encoder of {meta.get('source')} ({n:,} parameters) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
