"""Segmentation on DeFusion++ fused features (paper Sec. 3.5 "Segmentation", Sec. 4.4.2, Table 5).

    IR x1, visible x2 -> DeFusionPP.features: encoder H -> CA decomposition -> MFM encoder
      -> f_x (B, 1 + h*w, D) at stride 16 (cls token dropped)
      -> SimpleFeaturePyramid (ViTDet): strides 4, 8, 16, 32 from the single stride-16 map
      -> UPerHead (UPerNet: pyramid pooling on the coarsest level + FPN top-down fusion)
      -> logits at stride 4, bilinearly resized to the input size.

The paper gives no more than "UPerHead [71]" on a ViT backbone (EVA setting), so the head follows
mmsegmentation's `UPerHead` and ViTDet's simple feature pyramid, with one change: BatchNorm is
replaced by GroupNorm, because the trainer keeps plain parameter trees with no batch statistics
(mutable collections) and GroupNorm does not depend on the per-device batch. No auxiliary FCN head.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from defusion_jax.models.defusion import build_model
from defusion_jax.models.vit import Dropout, gelu_exact


def resize_bilinear(x: jax.Array, hw: Sequence[int]) -> jax.Array:
    """NHWC bilinear resize with half-pixel centres (torch `align_corners=False`), no antialiasing."""
    if tuple(x.shape[1:3]) == tuple(hw):
        return x
    return jax.image.resize(x, (x.shape[0], int(hw[0]), int(hw[1]), x.shape[3]), "bilinear", antialias=False)


def _adaptive_pool_matrix(n: int, m: int) -> np.ndarray:
    """(m, n) averaging matrix of torch `adaptive_avg_pool` along one axis: bin i averages input
    positions floor(i n / m) .. ceil((i + 1) n / m) - 1 (bins overlap, or repeat when m > n)."""
    p = np.zeros((m, n), np.float32)
    for i in range(m):
        start, end = (i * n) // m, -((-(i + 1) * n) // m)
        p[i, start:end] = 1.0 / (end - start)
    return p


def adaptive_avg_pool(x: jax.Array, out_hw: Sequence[int]) -> jax.Array:
    """NHWC `torch.nn.functional.adaptive_avg_pool2d` (any input size, static shapes)."""
    ph = jnp.asarray(_adaptive_pool_matrix(x.shape[1], int(out_hw[0])), x.dtype)
    pw = jnp.asarray(_adaptive_pool_matrix(x.shape[2], int(out_hw[1])), x.dtype)
    return jnp.einsum("ih,jw,bhwc->bijc", ph, pw, x)


class ConvGNReLU(nn.Module):
    """mmseg `ConvModule` (conv without bias -> norm -> ReLU) with GroupNorm in place of BatchNorm."""

    features: int
    kernel: int = 1
    groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, (self.kernel, self.kernel), padding="SAME", use_bias=False, dtype=self.dtype,
                    name="conv")(x)
        x = nn.GroupNorm(num_groups=self.groups, epsilon=1e-5, dtype=self.dtype, name="gn")(x)
        return nn.relu(x)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one stride-16 map -> maps at strides 16 / `scales`.

    scale 4: deconv 2x2/2 -> LayerNorm -> GELU -> deconv 2x2/2 (width D/4); scale 2: deconv (D/2);
    scale 1: identity; scale 0.5: max-pool 2x2/2. Each level then gets a 1x1 conv -> LN -> 3x3 conv
    -> LN to `out_dim` channels (ViTDet `SimpleFeaturePyramid` with norm='LN').
    """

    out_dim: int = 256
    scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5)
    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        ln = lambda name: nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name=name)  # noqa: E731
        deconv = lambda f, name: nn.ConvTranspose(f, (2, 2), strides=(2, 2), padding="VALID",  # noqa: E731
                                                  dtype=self.dtype, name=name)
        outs = []
        for i, s in enumerate(self.scales):
            if s == 4.0:
                y = deconv(d // 2, f"level{i}_deconv1")(x)
                y = gelu_exact(ln(f"level{i}_deconv_norm")(y))
                y = deconv(d // 4, f"level{i}_deconv2")(y)
            elif s == 2.0:
                y = deconv(d // 2, f"level{i}_deconv1")(x)
            elif s == 1.0:
                y = x
            elif s == 0.5:
                y = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
            else:
                raise ValueError(f"pyramid scales must be among 4, 2, 1, 0.5; got {s}")
            y = nn.Conv(self.out_dim, (1, 1), use_bias=False, dtype=self.dtype, name=f"level{i}_lateral")(y)
            y = ln(f"level{i}_lateral_norm")(y)
            y = nn.Conv(self.out_dim, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                        name=f"level{i}_output")(y)
            outs.append(ln(f"level{i}_output_norm")(y))
        return outs


class UPerHead(nn.Module):
    """UPerNet decode head (mmseg `UPerHead`): PPM on the last (coarsest) level, lateral 1x1 convs,
    top-down additions, 3x3 FPN convs, all levels resized to the finest and fused by a 3x3 conv,
    dropout, 1x1 classifier. Input: list of NHWC maps, finest first. Output: logits at the finest."""

    num_classes: int
    channels: int = 512
    pool_scales: Sequence[int] = (1, 2, 3, 6)
    groups: int = 32
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array], deterministic: bool = True):
        conv = lambda k, name: ConvGNReLU(self.channels, k, self.groups, self.dtype, name=name)  # noqa: E731
        top = feats[-1]
        ppm = [top]
        for i, s in enumerate(self.pool_scales):
            y = conv(1, f"psp_modules_{i}")(adaptive_avg_pool(top, (s, s)))
            ppm.append(resize_bilinear(y, top.shape[1:3]))
        laterals = [conv(1, f"lateral_convs_{i}")(f) for i, f in enumerate(feats[:-1])]
        laterals.append(conv(3, "bottleneck")(jnp.concatenate(ppm, axis=-1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
        outs = [conv(3, f"fpn_convs_{i}")(lat) for i, lat in enumerate(laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[1:3]
        fused = conv(3, "fpn_bottleneck")(jnp.concatenate([resize_bilinear(o, size) for o in outs], axis=-1))
        fused = Dropout(self.dropout)(fused, deterministic=deterministic)
        return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="conv_seg")(fused)


class DeFusionSeg(nn.Module):
    """DeFusion++ backbone (up to the fused features f_x) + simple feature pyramid + UPerHead.

    Parameters: `backbone` (the DeFusionPP sub-tree that `features` uses: encoder, CA blocks, MFM
    encoder; names as in pretraining, so a pretraining tree can be copied in), `pyramid`,
    `decode_head`. x1 is the infrared image and x2 the visible one (the pretraining MCUD order).
    """

    backbone_config: Mapping[str, Any] = None  # DeFusionPP config (build_model keys)
    num_classes: int = 9
    pyramid_dim: int = 256
    pyramid_scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5)
    head_channels: int = 512
    pool_scales: Sequence[int] = (1, 2, 3, 6)
    norm_groups: int = 32
    head_dropout: float = 0.1
    direction: str = "q_view2"
    dtype: Any = jnp.float32

    def setup(self):
        self.backbone = build_model({**dict(self.backbone_config or {}), "dtype": self.dtype})
        self.pyramid = SimpleFeaturePyramid(self.pyramid_dim, tuple(self.pyramid_scales), dtype=self.dtype)
        self.decode_head = UPerHead(self.num_classes, self.head_channels, tuple(self.pool_scales), self.norm_groups,
                                    self.head_dropout, self.dtype)

    def feature_map(self, x1, x2, deterministic: bool = True):
        """f_x without the cls token as a (B, H/16, W/16, D) map."""
        b, h, w, _ = x1.shape
        p = self.backbone.patch
        f = self.backbone.features(x1, x2, self.direction, deterministic)
        return f[:, 1:].reshape(b, h // p, w // p, f.shape[-1])

    def head_logits(self, fmap, deterministic: bool = True):
        """Pyramid + UPerHead on a (B, h, w, D) feature map -> float32 logits at stride 4. Initialising
        through this method creates the head parameters alone (the backbone is never touched)."""
        return self.decode_head(self.pyramid(fmap), deterministic).astype(jnp.float32)

    def __call__(self, x1, x2, deterministic: bool = True, full_size: bool = True):
        """float32 logits (B, H, W, num_classes); with `full_size=False` at stride 4."""
        logits = self.head_logits(self.feature_map(x1, x2, deterministic), deterministic)
        return resize_bilinear(logits, x1.shape[1:3]) if full_size else logits


def build_seg_model(cfg: Mapping[str, Any]) -> DeFusionSeg:
    """DeFusionSeg from a plain mapping (unknown keys fail loudly); `backbone` holds the DeFusionPP config."""
    cfg = dict(cfg)
    if "backbone" in cfg:
        cfg["backbone_config"] = dict(cfg.pop("backbone") or {})
    if isinstance(cfg.get("dtype"), str):
        cfg["dtype"] = jnp.dtype(cfg["dtype"])
    for k in ("pyramid_scales", "pool_scales"):
        if k in cfg:
            cfg[k] = tuple(cfg[k])
    fields = set(DeFusionSeg.__dataclass_fields__) - {"parent", "name"}
    unknown = set(cfg) - fields
    if unknown:
        raise ValueError(f"unknown segmentation model config keys: {sorted(unknown)}")
    return DeFusionSeg(**cfg)
