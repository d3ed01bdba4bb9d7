"""Masked autoencoder (He et al., MAE; facebookresearch/mae `models_mae.py`) for teacher pretraining.

The encoder is `defusion_jax.models.vit.ViT` run on the kept patches only (`MAEEncoder` has the
same fields and the same parameter names, so `params['encoder']` *is* a ViT teacher's params and
exports as a teacher folder unchanged). The decoder's parameters carry MAE's PyTorch names
(`decoder_embed`, `mask_token`, `decoder_blocks_i`, `decoder_norm`, `decoder_pred`), so an MAE
`*_full.pth` checkpoint converts with the generic rename of `defusion_jax.convert`.

Pixels: the model takes NHWC [0,1] images and normalises them with ImageNet statistics inside
(as the teacher does); MAE's target is the patchified *normalised* image, normalised again per
patch with the unbiased variance (torch `var`) when `norm_pix_loss` is on.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from defusion_jax.models.vit import (Block, Dense, ViT, normalize_imagenet, patchify, random_masking,  # noqa: F401
                                     restore_masked_tokens, sincos_table, unpatchify, vit_from_config)

MAE_DECODER = dict(width=512, depth=8, heads=16, mlp_dim=2048)  # MAE's ViT-B/L decoder


def mae_loss(pred: jax.Array, target_images: jax.Array, mask: jax.Array, patch: int = 16,
             norm_pix_loss: bool = True) -> jax.Array:
    """MAE's `forward_loss`: mean squared error per patch, averaged over the removed patches.

    `target_images` are what the encoder saw (ImageNet-normalised NHWC); with `norm_pix_loss` each
    target patch is standardised by its own mean and unbiased variance (+1e-6), as torch's
    `var(dim=-1)` computes it.
    """
    target = patchify(target_images.astype(jnp.float32), patch)
    if norm_pix_loss:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
    return jnp.sum(per_patch * mask) / jnp.sum(mask)


class MAEEncoder(ViT):
    """`ViT` over the kept patches only (MAE `forward_encoder`); identical parameters to `ViT`.

    With `ids_keep=None` it is exactly `ViT(...)(x)["tokens"]`.
    """

    def __call__(self, x, ids_keep=None, *, deterministic: bool = True):
        return super().__call__(x, deterministic=deterministic, ids_keep=ids_keep)["tokens"]


def encoder_from_config(cfg: Mapping[str, Any]) -> MAEEncoder:
    vit = vit_from_config(dict(cfg))
    return MAEEncoder(**{k: getattr(vit, k) for k in ViT.__dataclass_fields__ if k not in ("parent", "name")})


class MAE(nn.Module):
    """Encoder on the visible 25 %, then MAE's lightweight decoder over all tokens.

    `__call__(x, rng_mask)` -> {'pred': (B, N, p*p*3), 'mask': (B, N), 'target_images': the
    normalised images the loss compares with}.
    """

    encoder_config: Mapping[str, Any]
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_dim: int = 2048
    mask_ratio: float = 0.75
    dtype: Any = jnp.float32

    def setup(self):
        self.encoder = encoder_from_config({**dict(self.encoder_config), "dtype": self.dtype})
        p = self.encoder.patch
        dense = lambda n, name: Dense(n, dtype=self.dtype, name=name)  # noqa: E731
        self.decoder_embed = dense(self.decoder_width, "decoder_embed")
        self.mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.decoder_width))
        self.decoder_blocks = [Block(self.decoder_heads, self.decoder_mlp_dim, 1e-6, dtype=self.dtype,
                                     name=f"decoder_blocks_{i}") for i in range(self.decoder_depth)]
        self.decoder_norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="decoder_norm")
        self.decoder_pred = dense(p * p * 3, "decoder_pred")

    @property
    def patch(self) -> int:
        return int(dict(self.encoder_config).get("patch", 16))

    def decode(self, latent, ids_restore, grid):
        """MAE `forward_decoder`: mask tokens, unshuffle, fixed sin-cos table, blocks, pixel head."""
        x = self.decoder_embed(latent)
        x = restore_masked_tokens(x, self.mask_token, ids_restore, grid)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def __call__(self, x, rng_mask: jax.Array, ids=None):
        """`ids` = (ids_keep, ids_restore, mask) overrides the random masking (tests, panels)."""
        b, h, w, _ = x.shape
        grid = (h // self.patch, w // self.patch)
        if ids is None:
            ids = random_masking(rng_mask, b, grid[0] * grid[1], self.mask_ratio)
        ids_keep, ids_restore, mask = ids
        latent = self.encoder(x, ids_keep)
        pred = self.decode(latent, ids_restore, grid)
        target = normalize_imagenet(x) if self.encoder.normalize else x
        return {"pred": pred, "mask": mask, "target_images": target, "ids_restore": ids_restore}


def build_mae(cfg: Mapping[str, Any]) -> MAE:
    """MAE from `{'encoder': {'variant': 'B', ...}, 'decoder': {...}, 'mask_ratio': 0.75}`."""
    cfg = dict(cfg)
    enc = dict(cfg.pop("encoder"))
    dec = dict(MAE_DECODER, **dict(cfg.pop("decoder", None) or {}))
    unknown = set(dec) - set(MAE_DECODER)
    if unknown:
        raise ValueError(f"unknown decoder config keys {sorted(unknown)}")
    kw = {f"decoder_{k}": v for k, v in dec.items()}
    kw.update(cfg)
    return MAE(encoder_config=enc, **kw)


def mae_initialize(params: Mapping, rng: jax.Array) -> dict:
    """MAE's `initialize_weights`: xavier-uniform Linear kernels (the patch conv as a flattened
    Linear), zero biases, unit LayerNorm scales, N(0, 0.02) cls and mask tokens (learned position
    tables keep their N(0, 0.02) init).

    All kernels come from one uniform draw and the tokens from one normal draw: each separate
    random op costs about half a second of XLA compile time on a CPU.
    """
    from flax import traverse_util

    flat = traverse_util.flatten_dict(dict(params))
    kernels = [k for k in sorted(flat) if k[-1] == "kernel"]
    tokens = [k for k in sorted(flat) if k[-1] in ("cls_token", "mask_token")]
    r_u, r_n = jax.random.split(rng)
    u = jax.random.uniform(r_u, (sum(int(np.prod(flat[k].shape)) for k in kernels),), jnp.float32, -1.0, 1.0)
    z = jax.random.normal(r_n, (sum(int(np.prod(flat[k].shape)) for k in tokens),), jnp.float32)
    out, iu, iz = {}, 0, 0
    for path, v in flat.items():
        leaf, n = path[-1], int(np.prod(v.shape))
        if leaf == "kernel":
            fan_in, fan_out = int(np.prod(v.shape[:-1])), v.shape[-1]
            limit = float(np.sqrt(6.0 / (fan_in + fan_out)))
            out[path] = (limit * u[iu:iu + n]).reshape(v.shape).astype(v.dtype)
            iu += n
        elif leaf == "bias":
            out[path] = jnp.zeros_like(v)
        elif leaf == "scale":
            out[path] = jnp.ones_like(v)
        elif leaf in ("cls_token", "mask_token"):
            out[path] = (0.02 * z[iz:iz + n]).reshape(v.shape).astype(v.dtype)
            iz += n
        else:
            out[path] = v
    return traverse_util.unflatten_dict(out)


def init_mae_params(model: MAE, rng: jax.Array, image_size=(224, 224)) -> dict:
    r_init, r_mask, r_mae = jax.random.split(rng, 3)
    x = jnp.zeros((1, *image_size, 3), jnp.float32)
    params = model.init({"params": r_init}, x, r_mask)["params"]
    return mae_initialize(params, r_mae)


# ---- teacher export and initialisation from other weights ---------------------------------------
def full_encoder_config(encoder: Mapping[str, Any]) -> dict:
    """The encoder config with the variant expanded and JSON-able (what model.json stores)."""
    enc = encoder_from_config(dict(encoder))
    cfg = {"variant": encoder["variant"]} if "variant" in encoder else {}
    for k in ("width", "depth", "heads", "mlp_dim", "patch", "eps", "posemb", "posemb_grid", "normalize"):
        v = getattr(enc, k)
        cfg[k] = list(v) if isinstance(v, tuple) else v
    return cfg


def teacher_config(model_config: Mapping[str, Any]) -> dict:
    """model.json of the exported teacher: the encoder's ViT config (it normalises [0,1] input)."""
    return dict(full_encoder_config(model_config["encoder"]), normalize=True)


def export_teacher(params: Mapping, model_config: Mapping[str, Any], output, meta: Mapping | None = None) -> Path:
    """Write `params['encoder']` as a teacher folder loadable by `defusion_jax.models.vit.load`."""
    from defusion_jax.params_io import save_params

    enc = jax.tree.map(lambda a: np.asarray(a, np.float32), dict(params["encoder"]))
    return save_params(output, enc, teacher_config(model_config), dict(meta or {}, exported_from="mae"))


_DECODER = re.compile(r"(mask_token|decoder_.*)")


def init_from(path, model: MAE, fresh: Mapping) -> tuple[dict, list[str]]:
    """MAE params = `fresh` with the encoder (and the decoder, where the source has one) replaced
    by those of `path`: a ViT params folder, a timm/MAE checkpoint file or an MAE workdir."""
    from defusion_jax.convert import convert_state_dict, flatten_shapes
    from defusion_jax.convert_vit import convert_vit
    from defusion_jax.params_io import CheckpointError, is_params_dir, load_params, read_state_dict, unflatten

    path = Path(path)
    fresh = jax.tree.map(np.asarray, dict(fresh))
    enc_cfg = dict(model.encoder_config)
    notes = []
    want = full_encoder_config(enc_cfg)
    if is_params_dir(path):
        enc_params, cfg, _ = load_params(path)
        cfg = full_encoder_config({k: v for k, v in cfg.items() if k != "dtype"})
        diff = [f"{k} {cfg[k]} (MAE encoder: {want[k]})" for k in ("width", "depth", "heads", "mlp_dim", "posemb")
                if cfg[k] != want[k]]
        if diff:
            raise CheckpointError(f"{path}: this ViT does not fit config.model.encoder: {', '.join(diff)}")
        return dict(fresh, encoder=enc_params), [f"encoder from the ViT folder {path}; decoder freshly initialised"]
    if path.is_dir():
        from defusion_jax import checkpoints

        params, cfg, meta = checkpoints.load_params_from_workdir(path)
        if cfg.get("kind") != "mae":
            raise CheckpointError(f"{path}: not an MAE training workdir (model_config.json kind={cfg.get('kind')!r})")
        return params, [f"all parameters from {meta.get('source', path)}"]
    sd = read_state_dict(path)
    dec_sd = {k: v for k, v in sd.items() if _DECODER.fullmatch(k)}
    enc_sd = {k: v for k, v in sd.items() if k not in dec_sd}
    enc_params, cfg, more = convert_vit(enc_sd, heads=want["heads"], eps=want["eps"], source=str(path))
    notes += more
    if cfg["posemb"] != want["posemb"]:
        raise CheckpointError(f"{path}: its position table is {cfg['posemb']!r} but the MAE encoder uses "
                              f"{want['posemb']!r}; set config.model.encoder.posemb={cfg['posemb']!r}")
    out = dict(fresh, encoder=enc_params)
    if dec_sd:
        dec_fresh = {k: v for k, v in fresh.items() if k != "encoder"}
        expected = {k: tuple(v.shape) for k, v in flatten_shapes(dec_fresh).items()}
        d = model.decoder_width
        n = dec_sd.get("decoder_pos_embed", np.zeros((1, 0, d))).shape[1]
        g = int(round((n - 1) ** 0.5))
        tables = {"decoder_pos_embed": sincos_table(d, g, g)[None]} if "decoder_pos_embed" in dec_sd else {}
        dec_flat, more = convert_state_dict(dec_sd, expected, tables, (), f"{path} (decoder)")
        out.update(unflatten(dec_flat))
        notes += more + ["decoder from the checkpoint"]
    else:
        notes.append("the checkpoint has no MAE decoder: decoder freshly initialised")
    return out, notes
