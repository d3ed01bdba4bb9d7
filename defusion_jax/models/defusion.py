"""DeFusion++: ViT encoder -> cross-attention decomposition -> MFM encoder -> pixel heads.

Paper Sec. 3; official modules `UCMIMNet` / `MUCMIMNet` (see ../shared/notes/reference_impl.md).
Data flow for one pair (x1, x2), both NHWC in [0,1]:

  encoder H (shared) -> deep stream (block-12 tokens) and skip stream LN(embed) + LN(block 1)
  common  f_c   = CA_common(., .)          on both streams, one direction      (Eq. 2, 4)
  unique  f_u^i = CA_unique(other, own) + Block(own)   on both streams         (Eq. 2, 6)
  fused   = CA_fuse(f_c, f_u^1) + CA_fuse(f_c, f_u^2)  (+ skip stream), then the MFM encoder
            H_MFME with a long skip, then the projector head PH                (Eq. 3, last term)
  MFM     = the same fusion on a token subset kept at the *same* positions for every category
            (balanced sampling), H_MFME, mask-token interpolation + fixed position table,
            decoder, pixel head                                                (Eq. 8)
  multi-modal branch: both common directions, LayerNorm without affine, LP heads (Eq. 5, 7)

Every output image is a raw linear prediction (not clamped); clamp only when saving.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from defusion_jax.models.cross_attention import CABlock
from defusion_jax.models.vit import (Block, Dense, patchify, random_masking, restore_masked_tokens, unpatchify,
                                     vit_from_config)

DIRECTIONS = ("q_view2", "q_view1")
# The parameters only a multi-modal network (MCUD, `multimodal=True`) has: the Eq. 6 heads
# (its mm_common_norm has neither scale nor bias).
MULTIMODAL_ONLY = ("mm_unique_norm1", "mm_unique_norm2", "latent_predict1", "latent_predict2")

# The official network (TinyMIM ViT-T encoder; drop-path 0.1 on blocks 0-10, 0 on block 11).
OFFICIAL_ENCODER = dict(variant="Ti-mim", eps=1e-6, drop_path=(0.1,) * 11 + (0.0,), posemb="sincos")


def mfm_masking(rng: jax.Array, batch: int, num_tokens: int, mask_ratio: float = 0.75):
    """Random masking indices shared by every token category (balanced sampling, Eq. 8): MAE's
    masking (`vit.random_masking`), as the official forward computes it from its noise.
    Returns (ids_keep (B, keep), ids_restore (B, L)), both int32."""
    return random_masking(rng, batch, num_tokens, mask_ratio)[:2]


def gather_tokens(tokens: jax.Array, ids_keep: jax.Array) -> jax.Array:
    """Keep the cls token and the patch tokens at `ids_keep` (in that order)."""
    kept = jnp.take_along_axis(tokens[:, 1:], ids_keep[:, :, None], axis=1)
    return jnp.concatenate([tokens[:, :1], kept], axis=1)


def stack_pair(a: jax.Array, b: jax.Array) -> jax.Array:
    """(B, ...) twice -> (2B, ...) with the rows interleaved (a0, b0, a1, b1, ...).

    Interleaving rather than concatenating keeps both halves of a sample next to each other, so a
    batch-sharded input gives a batch-sharded stack whose rows stay on their sample's device: no
    collective at the stack or the split (concatenation moved half of every array across devices).
    """
    return jnp.stack([a, b], axis=1).reshape(-1, *a.shape[1:])


def split_pair(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse of `stack_pair`."""
    x = x.reshape(-1, 2, *x.shape[1:])
    return x[:, 0], x[:, 1]


def run_stacked(fn, *pairs):
    """fn applied to two inputs at once: each argument pair (a, b) is stacked along the batch
    (`stack_pair`), fn runs once, and its output (any pytree) is split back into (out_a, out_b). For
    modules applied twice with the same parameters: one pass with matmuls twice as tall."""
    out = fn(*(stack_pair(*pair) for pair in pairs))
    return jax.tree.map(lambda x: split_pair(x)[0], out), jax.tree.map(lambda x: split_pair(x)[1], out)


class DeFusionPP(nn.Module):
    """The DeFusion++ network. The default configuration is the official `UCMIMNet`.

    Parameter names follow the official state dict (`decoder_common_blocks_0` for
    `decoder_common_blocks.0`, ...) so conversion is a generic rename (see `defusion_jax.convert`).
    """

    vit: Mapping[str, Any] = None  # encoder ViT config; None -> OFFICIAL_ENCODER
    dim: int = 192  # token width of the decomposition (== encoder width)
    heads: int = 16
    mlp_ratio: float = 4.0
    patch: int = 16
    eps: float = 1e-5
    dropout: float = 0.1
    mask_ratio: float = 0.75
    mfme_depth: int = 2
    mfm_decoder_depth: int = 2
    multimodal: bool = False
    teacher_dim: int = 768
    dtype: Any = jnp.float32

    # ----------------------------------------------------------------------------------------
    def setup(self):
        enc_cfg = dict(OFFICIAL_ENCODER if self.vit is None else self.vit)
        enc_cfg.setdefault("dtype", self.dtype)
        self.encoder = vit_from_config(enc_cfg)
        mlp = int(self.mlp_ratio * self.dim)
        out = self.patch * self.patch * 3
        blk = lambda: Block(self.heads, mlp, self.eps, dtype=self.dtype)  # noqa: E731
        ca = lambda common: CABlock(self.heads, common, mlp, self.dropout, self.eps, self.dtype)  # noqa: E731
        dense = lambda n: Dense(n, dtype=self.dtype)  # noqa: E731
        ln = lambda **kw: nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, **kw)  # noqa: E731

        # Attribute names are the official module names, so parameters convert by a generic rename.
        self.enc_norm1, self.enc_norm2 = ln(), ln()
        # decoder_<part>_blocks = [CA block, projector Block, Linear to p*p*3 pixels]: one
        # parameter-shared CA block per role, and PH = the Block + Linear (the two unique parts
        # share one head). Each CA role has its own block for the skip stream.
        self.decoder_common_blocks = [ca(True), blk(), dense(out)]
        self.decode_common_skipconn = ca(True)
        self.decoder_unique_blocks = [ca(False), blk(), dense(out)]
        self.decoder_unique_skipconn = ca(False)
        self.decoder_unique_residual = blk()
        self.decoder_unique_residual_skipconn = blk()
        self.decoder_fuse_blocks = [ca(False), blk(), dense(out)]
        self.decoder_fuse_skipconn = ca(False)
        self.recon_blocks_mim_encoder = [blk() for _ in range(self.mfme_depth)]  # H_MFME
        self.mask_token = self.param("mask_token", nn.initializers.zeros, (1, 1, self.dim))
        self.mim_decoder_blocks = [blk() for _ in range(self.mfm_decoder_depth)]
        self.mim_decoder_norm = ln()
        self.mim_decoder_pred = dense(out)
        if self.multimodal:  # MULTIMODAL_ONLY
            self.mm_common_norm = ln(use_scale=False, use_bias=False)
            self.mm_unique_norm1, self.mm_unique_norm2 = ln(), ln()
            self.latent_predict1, self.latent_predict2 = dense(self.teacher_dim), dense(self.teacher_dim)

    # ---- H: shared encoder, deep and skip streams -------------------------------------------
    def encode(self, x1, x2, deterministic: bool = True):
        """Both views through the shared encoder in one batch (`stack_pair`); returns the deep and skip
        streams, and the patch embeddings as a (view 1, view 2) pair."""
        outs = self.encoder(stack_pair(x1, x2), deterministic=deterministic, return_all=True)["all"]
        deep1, deep2 = split_pair(outs[-1])  # block-12 tokens, no final LayerNorm (official)
        skip1, skip2 = split_pair(self.enc_norm1(outs[0]) + self.enc_norm2(outs[1]))
        return {"embed": split_pair(outs[0]), "deep1": deep1, "deep2": deep2, "skip1": skip1, "skip2": skip2}

    # ---- CA decomposition (Eq. 2) -------------------------------------------------------------
    def common(self, e1, e2, r1, r2, direction, deterministic: bool = True):
        """f_c on both streams. `direction` 'q_view2' = CA_common(e1, e2): query and key from view 2,
        value from view 1 (Eq. 4); 'q_view1' swaps the views. A boolean (B,) array picks per sample
        (True = q_view2), which is how training draws it."""
        if isinstance(direction, str):
            if direction not in DIRECTIONS:
                raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
            if direction == "q_view1":
                e1, e2, r1, r2 = e2, e1, r2, r1
        else:
            flag = jnp.asarray(direction).reshape(-1, 1, 1)
            e1, e2 = jnp.where(flag, e1, e2), jnp.where(flag, e2, e1)
            r1, r2 = jnp.where(flag, r1, r2), jnp.where(flag, r2, r1)
        return (self.decoder_common_blocks[0](e1, e2, deterministic), self.decode_common_skipconn(r1, r2, deterministic))

    def unique(self, e_other, e_own, r_other, r_own, deterministic: bool = True):
        """f_u of the `own` view on both streams: CA_unique(other, own) + Block(own) (Eq. 6)."""
        deep = self.decoder_unique_blocks[0](e_other, e_own, deterministic) + self.decoder_unique_residual(e_own, deterministic)
        skip = (self.decoder_unique_skipconn(r_other, r_own, deterministic)
                + self.decoder_unique_residual_skipconn(r_own, deterministic))
        return deep, skip

    def unique_pair(self, e1, e2, r1, r2, deterministic: bool = True):
        """f_u of view 1 and of view 2 (`unique` twice, run stacked: shared parameters).
        Returns ((deep1, skip1), (deep2, skip2))."""
        return run_stacked(lambda *a: self.unique(*a, deterministic), (e2, e1), (e1, e2), (r2, r1), (r1, r2))

    def fuse_tokens(self, t: Mapping[str, jax.Array], deterministic: bool = True):
        """Fusion CA on both streams, CA_fuse(f_c, f_u^1) + CA_fuse(f_c, f_u^2) in the official order
        (input of H_MFME). Both unique parts go through each CA block stacked."""

        def both(ca, stream):
            c = t[f"common_{stream}"]
            o1, o2 = run_stacked(lambda x1, x2: ca(x1, x2, deterministic), (c, c),
                                 (t[f"unique1_{stream}"], t[f"unique2_{stream}"]))
            return o1 + o2

        return both(self.decoder_fuse_blocks[0], "deep") + both(self.decoder_fuse_skipconn, "skip")

    def run_mfme(self, x, deterministic: bool = True):
        for blk in self.recon_blocks_mim_encoder:
            x = blk(x, deterministic)
        return x

    def decompose_tokens(self, x1, x2, direction="q_view2", deterministic: bool = True):
        """Token-level decomposition: every intermediate the fixture names (tok_*), no heads."""
        e = self.encode(x1, x2, deterministic)
        t = {"enc_deep_v1": e["deep1"], "enc_deep_v2": e["deep2"],
             "enc_skip_v1": e["skip1"], "enc_skip_v2": e["skip2"]}
        t["common_deep"], t["common_skip"] = self.common(e["deep1"], e["deep2"], e["skip1"], e["skip2"],
                                                         direction, deterministic)
        (t["unique1_deep"], t["unique1_skip"]), (t["unique2_deep"], t["unique2_skip"]) = self.unique_pair(
            e["deep1"], e["deep2"], e["skip1"], e["skip2"], deterministic)
        t["enc_embed_v1"], t["enc_embed_v2"] = e["embed"]
        for part in ("common", "unique1", "unique2"):
            t[part] = t[f"{part}_deep"] + t[f"{part}_skip"]
        return t

    # ---- images -------------------------------------------------------------------------------
    def project(self, part: str, tokens, grid, deterministic: bool = True):
        """Projector head PH of `part` ('common', 'unique', 'fuse') -> NHWC float32 image."""
        _, block, linear = getattr(self, f"decoder_{part}_blocks")
        pixels = linear(block(tokens, deterministic))
        return unpatchify(pixels[:, 1:].astype(jnp.float32), *grid, self.patch)

    def __call__(self, x1, x2, *, direction="q_view2", ids_keep=None, ids_restore=None,
                 mfm: bool = True, deterministic: bool = True, return_tokens: bool = False):
        """Single-modal forward (CUD + MFM, Eq. 3 and 8).

        Returns images `common`, `unique1`, `unique2`, `fused` and, with `mfm=True`, `mfm_recon`
        (NHWC float32, raw). MFM masking uses `ids_keep`/`ids_restore` when given, else draws them
        from the 'mfm' rng. With `return_tokens=True` a `tokens` dict holds every intermediate.
        """
        grid = (x1.shape[1] // self.patch, x1.shape[2] // self.patch)
        t = self.decompose_tokens(x1, x2, direction, deterministic)
        t["fuse_pre_mfme"] = self.fuse_tokens(t, deterministic)
        t["fuse"] = self.run_mfme(t["fuse_pre_mfme"], deterministic) + t["fuse_pre_mfme"]
        out = {
            "common": self.project("common", t["common"], grid, deterministic),
            # the two unique parts share PH
            **dict(zip(("unique1", "unique2"), run_stacked(
                lambda x: self.project("unique", x, grid, deterministic), (t["unique1"], t["unique2"])))),
            "fused": self.project("fuse", t["fuse"], grid, deterministic),
        }
        if mfm:
            if ids_keep is None:
                ids_keep, ids_restore = mfm_masking(self.make_rng("mfm"), x1.shape[0], grid[0] * grid[1],
                                                    self.mask_ratio)
            pixels = self.mfm_decode(self.mfm_encode(t, ids_keep, deterministic), ids_restore, grid,
                                     deterministic)
            out["mfm_recon"] = unpatchify(pixels[:, 1:].astype(jnp.float32), *grid, self.patch)
            out["ids_keep"], out["ids_restore"] = ids_keep, ids_restore
        if return_tokens:
            out["tokens"] = t
        return out

    def fuse(self, x1, x2, direction="q_view2"):
        """Inference: the fused image only (Fig. 6: no MFM decoder, no common/unique heads)."""
        grid = (x1.shape[1] // self.patch, x1.shape[2] // self.patch)
        t = self.decompose_tokens(x1, x2, direction)
        pre = self.fuse_tokens(t)
        return self.project("fuse", self.run_mfme(pre) + pre, grid)

    def features(self, x1, x2, direction="q_view2", deterministic: bool = True):
        """Fused features f_x (Sec. 3.5): output of H_MFME with the long skip, cls token first."""
        t = self.decompose_tokens(x1, x2, direction, deterministic)
        pre = self.fuse_tokens(t, deterministic)
        return self.run_mfme(pre, deterministic) + pre

    # ---- MFM (Eq. 8) --------------------------------------------------------------------------
    def mfm_encode(self, t, ids_keep, deterministic: bool = True):
        """Sample(f_c, f_u^1, f_u^2) with the same kept positions for every category, fuse, H_MFME."""
        keys = ("common_deep", "common_skip", "unique1_deep", "unique1_skip", "unique2_deep", "unique2_skip")
        masked = {k: gather_tokens(t[k], ids_keep) for k in keys}
        t["mfm_masked"] = self.fuse_tokens(masked, deterministic)
        t["mfm_mfme_out"] = self.run_mfme(t["mfm_masked"], deterministic)
        return t

    def mfm_decode(self, t, ids_restore, grid, deterministic: bool = True):
        """Interpolation layer (mask tokens, unshuffle, fixed sin-cos table) and the MFM decoder."""
        x = restore_masked_tokens(t["mfm_mfme_out"], self.mask_token, ids_restore, grid)
        t["mfm_decoder_in"] = x
        for blk in self.mim_decoder_blocks:
            x = blk(x, deterministic)
        return self.mim_decoder_pred(self.mim_decoder_norm(x))

    # ---- multi-modal branch (Eq. 5, 7) --------------------------------------------------------
    def multimodal_forward(self, x1, x2, deterministic: bool = True):
        """MCUD outputs: both common directions (LayerNorm without affine) and the LP predictions.

        x1 is the infrared view (teacher 1), x2 the visible view (teacher 2). LP adds the normalised
        unique and common tokens (official code) where the paper says "concatenation".
        """
        if not self.multimodal:
            raise ValueError("this DeFusionPP was built with multimodal=False")
        e = self.encode(x1, x2, deterministic)
        # both directions in one stacked pass: 'q_view1' is 'q_view2' with the views swapped
        c1, c2 = run_stacked(lambda *a: self.common(*a, "q_view2", deterministic),
                             (e["deep1"], e["deep2"]), (e["deep2"], e["deep1"]),
                             (e["skip1"], e["skip2"]), (e["skip2"], e["skip1"]))
        u1, u2 = self.unique_pair(e["deep1"], e["deep2"], e["skip1"], e["skip2"], deterministic)
        com_w1 = self.mm_common_norm(c1[0] + c1[1])
        com_w2 = self.mm_common_norm(c2[0] + c2[1])
        pred1 = self.latent_predict1(self.mm_unique_norm1(u1[0] + u1[1]) + com_w1)
        pred2 = self.latent_predict2(self.mm_unique_norm2(u2[0] + u2[1]) + com_w2)
        return {"pred1": pred1, "pred2": pred2, "com_w1": com_w1, "com_w2": com_w2}

    def initialize_mm_heads(self, tokens):
        """Create only the Eq. 6 heads (`MULTIMODAL_ONLY`) from stand-in (B, N, dim) tokens: with
        `init`, the values a whole-model init with the same rng gives them (Flax derives each module's
        rng from its name path), without compiling the network."""
        self.mm_common_norm(tokens)
        return self.latent_predict1(self.mm_unique_norm1(tokens)), self.latent_predict2(self.mm_unique_norm2(tokens))

    def initialize(self, x1, x2):
        """Touch every sub-module once so `init` creates the complete parameter tree."""
        n = (x1.shape[1] // self.patch) * (x1.shape[2] // self.patch)
        keep = jnp.tile(jnp.arange(int(n * (1 - self.mask_ratio)), dtype=jnp.int32), (x1.shape[0], 1))
        restore = jnp.tile(jnp.arange(n, dtype=jnp.int32), (x1.shape[0], 1))
        out = self(x1, x2, ids_keep=keep, ids_restore=restore)
        if self.multimodal:
            out["mm"] = self.multimodal_forward(x1, x2)
        return out


def build_model(cfg: Mapping[str, Any] | None = None) -> DeFusionPP:
    """DeFusionPP from a plain mapping (e.g. `config.model`); unknown keys fail loudly."""
    cfg = dict(cfg or {})
    if cfg.get("vit") is not None:
        cfg["vit"] = dict(cfg["vit"])
    if isinstance(cfg.get("dtype"), str):
        cfg["dtype"] = jnp.dtype(cfg["dtype"])
    fields = set(DeFusionPP.__dataclass_fields__) - {"parent", "name"}
    unknown = set(cfg) - fields
    if unknown:
        raise ValueError(f"unknown model config keys: {sorted(unknown)}")
    return DeFusionPP(**cfg)


def init_params(model: DeFusionPP, rng: jax.Array, image_size: Sequence[int] = (224, 224), batch: int = 1):
    """Complete parameter tree (plain nested dict) for `model`."""
    x = jnp.zeros((batch, *image_size, 3), jnp.float32)
    return model.init({"params": rng}, x, x, method=DeFusionPP.initialize)["params"]
