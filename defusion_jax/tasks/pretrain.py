"""DeFusion++ self-supervised pretraining: CUD + MFM on single-modal images, MCUD on IR/visible pairs.

Per step the batch is either single-modal (`{'image'}`: clean crops, the degraded views are made on
device, Eq. 1) and trained with Eq. 3 + Eq. 8, or multi-modal (`{'ir', 'vi'}`: registered pairs)
and trained with Eq. 5 + Eq. 7 against frozen ViT teachers; Eq. 9 picks the branch. The two kinds
alternate in the fixed proportion `config.mm_ratio` (grain's deterministic mix, part of the data
iterator state, so a resumed run continues the same sequence).

Teachers (`config.teacher.visible`, `config.teacher.infrared`) are parameter folders written by
`python -m defusion_jax.convert vit` and read with `defusion_jax.models.vit.load`. They are frozen:
outside the optimiser and the checkpoint, replicated, under stop_gradient.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from defusion_jax import losses as L
from defusion_jax import sharding as sharding_lib
from defusion_jax import views as V
from defusion_jax.data import pipeline, sources
from defusion_jax.models.defusion import MULTIMODAL_ONLY, DeFusionPP, build_model, init_params
from defusion_jax.tasks import Task, as_dict, check_same_structure, trainer_keys

TEACHER_HELP = (
    "Convert the MAE ViT-B/16 weights once with `python -m defusion_jax.convert vit --input "
    "mae_pretrain_vit_base.pth --output teachers/mae_vit_b16` (ImageNet MAE, "
    "github.com/facebookresearch/mae) and point --config.teacher.visible (and "
    "--config.teacher.infrared: the paper's FLIR MAE was never released; pretrain one or reuse the "
    "ImageNet teacher) at the folder; or train CUD + MFM only with --config.mm_ratio=0.")


class TeacherError(ValueError):
    """Teacher files missing or unusable; the message says how to make them."""


class PretrainTask(Task):
    console_keys = ("cud/common", "cud/unique1", "cud/unique2", "cud/fused_l1", "mfm/recon",
                    "mcud/unique", "mcud/common")

    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.mm_ratio = float(config.mm_ratio)
        if not 0.0 <= self.mm_ratio <= 1.0:
            raise ValueError(f"mm_ratio must be in [0, 1], got {self.mm_ratio}")
        self.image_size = (int(config.image_size), int(config.image_size))
        self.recipe = L.get_recipe(config.loss.recipe if isinstance(config.loss.recipe, str)
                                   else as_dict(config.loss.recipe))
        self.view_cfg = V.ViewConfig.from_mapping(as_dict(config.views))
        self.dtype = jnp.dtype(config.get("compute_dtype", "float32"))
        self.teacher_roles = self._check_teachers() if self.mm_ratio > 0 else {}
        model_cfg = as_dict(config.model)
        model_cfg["vit"] = dict(model_cfg.get("vit") or {})
        if config.get("remat", False):
            if not model_cfg["vit"]:
                raise ValueError("config.remat needs an explicit config.model.vit")
            model_cfg["vit"]["remat"] = True
        width, dim = model_cfg["vit"].get("width"), model_cfg.get("dim")
        if width is not None and dim is not None and int(width) != int(dim):
            # (the CA blocks read the encoder's tokens: otherwise a broadcasting error deep in the model)
            raise ValueError(f"config.model.vit.width ({width}) and config.model.dim ({dim}) must be equal")
        model_cfg["multimodal"] = self.mm_ratio > 0
        self._model_cfg = model_cfg
        self.model: DeFusionPP = build_model({**model_cfg, "dtype": self.dtype})
        self.teachers: dict[str, Any] = {}

    # ---- model -------------------------------------------------------------------------------
    def init_params(self, rng):
        return init_params(self.model, rng, self.image_size)

    def load_init_params(self, path: str, params_shape: Any):
        """config.init: parameters of a workdir, converted folder or official checkpoint. Between a
        CUD-only network (the official UCMIMNet, mm_ratio 0) and a multi-modal one only the Eq. 6 heads
        differ (`MULTIMODAL_ONLY`): heads the source lacks start as in a from-scratch run of this
        config, heads this model lacks are dropped; the log names them."""
        from defusion_jax.api import load_model

        source = dict(load_model(path).params)
        added = [k for k in MULTIMODAL_ONLY if k in params_shape and k not in source]
        dropped = [k for k in MULTIMODAL_ONLY if k in source and k not in params_shape]
        if added:  # only the heads are initialised (DeFusionPP.initialize_mm_heads): no whole-model compile
            tokens = jnp.zeros((1, 1, self.model.dim), jnp.float32)
            fresh = jax.device_get(jax.jit(lambda r: self.model.init(
                {"params": r}, tokens, method=DeFusionPP.initialize_mm_heads)["params"])(trainer_keys(self.config)[0]))
            source.update({k: fresh[k] for k in added})
        for k in dropped:
            del source[k]
        if added or dropped:
            logging.info("config.init=%s: %s", path, "; ".join(
                f"{what} the multi-modal heads {', '.join(ks)}" for ks, what in
                ((added, "initialised fresh"), (dropped, "dropped")) if ks))
        return check_same_structure(source, params_shape, path)

    def model_config(self) -> dict:
        cfg = {k: v for k, v in self._model_cfg.items() if k != "dtype"}
        cfg["vit"] = {k: v for k, v in cfg["vit"].items() if k != "remat"} or None
        return cfg

    # ---- teachers ----------------------------------------------------------------------------
    def _check_teachers(self) -> dict[str, str]:
        t = self.config.teacher
        roles = {"infrared": t.get("infrared"), "visible": t.get("visible")}
        if as_dict(t.get("smoke")):
            # a teacher path given on the command line wins over the smoke config's random teacher
            given = {r: p for r, p in roles.items() if p}
            if given:
                logging.warning("config.teacher.smoke is set, but %s given: using %s instead of the smoke teacher",
                                ", ".join(f"config.teacher.{r}" for r in given),
                                "them" if len(given) > 1 else "it")
            roles = {r: given.get(r, "smoke") for r in roles}
            if set(roles.values()) == {"smoke"}:
                return roles
        missing = [f"config.teacher.{r}={p!r}" for r, p in roles.items()
                   if p != "smoke" and (not p or not os.path.exists(p))]
        if missing:
            raise TeacherError(f"teacher not found ({', '.join(missing)}). " + TEACHER_HELP)
        return roles

    def load_frozen(self) -> dict:
        """Teacher parameters (host arrays), one entry per distinct teacher."""
        if not self.teacher_roles:
            return {}
        frozen: dict[str, Any] = {}
        t = self.config.teacher
        if "smoke" in self.teacher_roles.values():
            from defusion_jax.models.vit import vit_from_config

            cfg = dict(as_dict(t.smoke), dtype=self.dtype)
            module = vit_from_config(cfg)
            logging.warning("using a smoke-only teacher: a tiny RANDOM ViT (%s), not a pretrained MAE; "
                            "MCUD losses from it mean nothing", as_dict(t.smoke))
            params = module.init(jax.random.key(int(self.config.seed) + 7),
                                 jnp.zeros((1, *self.image_size, 3)))["params"]
            self.teachers["smoke"] = module
            frozen["smoke"] = jax.tree.map(np.asarray, params)
        if set(self.teacher_roles.values()) - {"smoke"}:
            from defusion_jax.models import vit

            if not hasattr(vit, "load"):
                raise TeacherError("defusion_jax.models.vit.load is not available in this checkout; "
                                   "update it, or train with --config.mm_ratio=0")
            for path in sorted(set(self.teacher_roles.values()) - {"smoke"}):
                try:
                    module, params = vit.load(path, normalize=True, dtype=self.dtype)
                except Exception as e:
                    raise TeacherError(f"teacher {path}: {e}. " + TEACHER_HELP) from None
                self.teachers[path] = module
                frozen[path] = params
                logging.info("teacher %s: %s", path, {k: getattr(module, k, None) for k in ("width", "depth")})
        widths = {getattr(m, "width", None) for m in self.teachers.values()}
        if len(widths) > 1:
            raise TeacherError(f"the teachers have different widths {sorted(widths, key=str)} "
                               f"({self.teacher_roles}); give both config.teacher.infrared and .visible")
        if widths != {self.model.teacher_dim}:
            raise TeacherError(f"teacher width {sorted(widths)} != config.model.teacher_dim "
                               f"{self.model.teacher_dim}; set --config.model.teacher_dim")
        return frozen

    def _teacher_tokens(self, frozen, role: str, images):
        key = self.teacher_roles[role]
        out = self.teachers[key].apply({"params": frozen[key]}, images)
        tokens = out["tokens"] if isinstance(out, dict) else out
        return jax.lax.stop_gradient(tokens.astype(jnp.float32))

    # ---- data --------------------------------------------------------------------------------
    def make_train_data(self, process_index: int, process_count: int):
        d = self.config.data
        common = dict(global_batch=int(self.config.batch_size), process_index=process_index,
                      process_count=process_count, image_size=self.image_size, scale=tuple(d.scale),
                      ratio=tuple(d.ratio), num_threads=int(d.num_threads), prefetch=int(d.prefetch))
        streams, weights = {}, {}
        if self.mm_ratio < 1:
            single = as_dict(d.single)
            src = sources.build_source(single)
            logging.info("single-modal data: %s, %d images", single, len(src))
            streams["single"] = pipeline.make_stream(src, seed=int(self.config.seed), jitter=single.get("jitter", True),
                                                     flip=single.get("flip", True), **common)
            weights["single"] = 1.0 - self.mm_ratio
        if self.mm_ratio > 0:
            multi = as_dict(d.multi)
            src = sources.build_source(multi)
            logging.info("multi-modal data: %s, %d pairs", multi, len(src))
            streams["multi"] = pipeline.make_stream(src, seed=int(self.config.seed) + 1,
                                                    jitter=multi.get("jitter", False),
                                                    flip=multi.get("flip", True), **common)
            weights["multi"] = self.mm_ratio
        return pipeline.mix_streams(streams, weights)

    # ---- losses ------------------------------------------------------------------------------
    def loss_fn(self, params, frozen, batch, rng, step):
        if "image" in batch:
            return self._single_loss(params, batch, rng)
        return self._multi_loss(params, frozen, batch, rng)

    def _forward_single(self, params, clean, rng, deterministic: bool):
        k_views, k_dir, k_drop, k_mfm = jax.random.split(rng, 4)
        v = V.make_views(k_views, clean, self.view_cfg)
        direction = sharding_lib.shard_batch(jax.random.bernoulli(k_dir, 0.5, (clean.shape[0],)))
        out = self.model.apply({"params": params}, v["view1"], v["view2"], direction=direction,
                               deterministic=deterministic, rngs={"dropout": k_drop, "mfm": k_mfm})
        return v, out

    def _single_loss(self, params, batch, rng):
        clean = batch["image"].astype(jnp.float32)
        v, out = self._forward_single(params, clean, rng, deterministic=False)
        terms = L.cud_loss_eq3(out, v, clean, with_ssim=self.recipe.fused_ssim != 0)
        terms["mfm"] = L.mfm_loss_eq8(out["mfm_recon"], clean)
        loss = L.total_loss_eq9(terms, self.recipe, multimodal=False)
        metrics = {f"cud/{k}": t.mean() for k, t in terms.items() if k != "mfm"}
        metrics.update({"mfm/recon": terms["mfm"].mean(), "loss/single": loss,
                        "views/common_frac": v["common_mask"].mean(), "views/p": v["p"].mean()})
        return loss, metrics

    def _multi_loss(self, params, frozen, batch, rng):
        ir, vi = batch["ir"].astype(jnp.float32), batch["vi"].astype(jnp.float32)
        out = self.model.apply({"params": params}, ir, vi, deterministic=False, rngs={"dropout": rng},
                               method=DeFusionPP.multimodal_forward)
        t_ir = self._teacher_tokens(frozen, "infrared", ir)
        t_vi = self._teacher_tokens(frozen, "visible", vi)
        terms = {"mcud_common": L.mcud_common_eq5(out["com_w1"], out["com_w2"]),
                 "mcud_unique": L.mcud_unique_eq7(out["pred1"], t_ir, out["pred2"], t_vi)}
        loss = L.total_loss_eq9(terms, self.recipe, multimodal=True)
        return loss, {"mcud/common": terms["mcud_common"].mean(), "mcud/unique": terms["mcud_unique"].mean(),
                      "loss/multi": loss}

    # ---- pictures ----------------------------------------------------------------------------
    def panel(self, params, frozen, batch, rng):
        """Fig. 7 style: views, common, unique parts, fused image, MFM reconstruction."""
        if "image" in batch:
            clean = batch["image"].astype(jnp.float32)
            v, out = self._forward_single(params, clean, rng, deterministic=True)
            # each prediction beside its Eq. 3 target, as in the paper's Fig. 7
            cols = {"view1": v["view1"], "view2": v["view2"], "common gt": v["common"],
                    "common": out["common"], "unique1 gt": v["unique1"], "unique1": out["unique1"],
                    "unique2 gt": v["unique2"], "unique2": out["unique2"], "clean": clean,
                    "fused": out["fused"], "mfm_recon": out["mfm_recon"]}
        else:
            ir, vi = batch["ir"].astype(jnp.float32), batch["vi"].astype(jnp.float32)
            out = self.model.apply({"params": params}, ir, vi, mfm=False)
            cols = {"ir": ir, "vi": vi, "common": out["common"], "unique1": out["unique1"],
                    "unique2": out["unique2"], "fused": out["fused"]}
        return {k: jnp.clip(x.astype(jnp.float32), 0.0, 1.0) for k, x in cols.items()}


TASK = PretrainTask
