"""DeFusion++ pretraining losses (paper Eq. 3, 5, 7, 8, 9) and the two weightings people use.

Every term is computed per sample (shape (B,)); `total_loss_eq9` weights and reduces them.

Recipes:
  official  the released code (`loss/mix_fp_loss.py`, `multimodalloss.py`): 20 L1 common, 10 L1 per
            unique part, 100 L1 + 50 SSIM-loss on the fused image, the MFM reconstruction counted
            twice (the model returns it twice), summed over the batch; MCUD batches use
            L1(teacher1, pred1) + L1(teacher2, pred2) + L1(com_w1, com_w2), each nn.L1Loss, i.e.
            averaged over the batch.
  paper     Eq. 3 + alpha Eq. 8 with alpha = 0.1, unweighted, averaged over the batch; MCUD the
            unweighted Eq. 5 + Eq. 7.
L1 is `nn.L1Loss` (mean over every element of the sample). The SSIM loss is kornia's `SSIMLoss`
(window 11): mean(clamp((1 - SSIM map) / 2, 0, 1)), Gaussian window sigma 1.5, C1 = 0.01^2,
C2 = 0.03^2, eps 1e-12 in the denominator, reflect padding ('same') as kornia's filter2d_separable.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Recipe:
    common: float
    unique1: float
    unique2: float
    fused_l1: float
    fused_ssim: float
    mfm: float
    mcud_unique: float
    mcud_common: float
    single_reduce: str  # 'sum' or 'mean' over the batch
    multi_reduce: str


RECIPES = {
    "official": Recipe(common=20.0, unique1=10.0, unique2=10.0, fused_l1=100.0, fused_ssim=50.0, mfm=2.0,
                       mcud_unique=1.0, mcud_common=1.0, single_reduce="sum", multi_reduce="mean"),
    "paper": Recipe(common=1.0, unique1=1.0, unique2=1.0, fused_l1=1.0, fused_ssim=0.0, mfm=0.1,
                    mcud_unique=1.0, mcud_common=1.0, single_reduce="mean", multi_reduce="mean"),
}


def get_recipe(recipe: str | Mapping | Recipe) -> Recipe:
    """A preset name, or a mapping of fields (a preset name under 'base' may supply the rest)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"unknown loss recipe {recipe!r}; known: {sorted(RECIPES)}")
        return RECIPES[recipe]
    fields = dict(recipe)
    base = fields.pop("base", None)
    return dataclasses.replace(RECIPES[base], **fields) if base else Recipe(**fields)


# ---- building blocks ---------------------------------------------------------------------------
def _wide(x: jax.Array) -> jax.Array:
    """At least float32 (bf16 compute is summed in float32; float64 stays float64)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def l1(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Per-sample mean absolute error (torch `nn.L1Loss` on one sample), shape (B,), >= float32."""
    d = jnp.abs(_wide(pred) - _wide(target))
    return d.reshape(d.shape[0], -1).mean(axis=1)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """kornia `get_gaussian_kernel1d`: x = arange(size) - size // 2 (+0.5 if even), normalised."""
    x = np.arange(size, dtype=np.float64) - size // 2
    if size % 2 == 0:
        x = x + 0.5
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def blur_matrix(n: int, w: np.ndarray) -> np.ndarray:
    """(n, n) matrix M with M @ x = the 1-D filter `w` over x, reflect-padded to keep the length n
    (kornia's filter2d_separable(border_type='reflect') along one axis)."""
    k = len(w)
    r = k // 2
    padded = np.pad(np.eye(n), ((r, k - 1 - r), (0, 0)), mode="reflect")  # (n + k - 1, n)
    return sum(w[i] * padded[i:i + n] for i in range(k))


def _blur(x: jax.Array, w: np.ndarray) -> jax.Array:
    """Separable Gaussian over H and W of NHWC `x`, reflect-padded to keep the size.

    Two matmuls with banded (H, H) and (W, W) matrices rather than depthwise convolutions: the same
    sums, and on XLA:CPU 15x faster forward and backward (a grouped convolution's gradient is slow
    there; the matmul's transpose is another matmul).
    """
    mh = jnp.asarray(blur_matrix(x.shape[1], w), x.dtype)
    mw = jnp.asarray(blur_matrix(x.shape[2], w), x.dtype)
    hi = jax.lax.Precision.HIGHEST  # TPUs would otherwise blur in bf16 passes
    y = jnp.einsum("oh,nhwc->nowc", mh, x, precision=hi)
    return jnp.einsum("pw,nowc->nopc", mw, y, precision=hi)


def ssim_map(a: jax.Array, b: jax.Array, window: int = 11, sigma: float = 1.5, max_val: float = 1.0,
             eps: float = 1e-12) -> jax.Array:
    """kornia `metrics.ssim` (padding 'same') on NHWC images; returns the per-pixel SSIM map."""
    a, b = _wide(a), _wide(b)
    c = a.shape[-1]
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    blurred = _blur(jnp.concatenate([a, b, a * a, b * b, a * b], axis=-1), gaussian_window(window, sigma))
    mu1, mu2, e11, e22, e12 = (blurred[..., i * c:(i + 1) * c] for i in range(5))
    s11, s22, s12 = e11 - mu1 * mu1, e22 - mu2 * mu2, e12 - mu1 * mu2
    num = (2.0 * mu1 * mu2 + c1) * (2.0 * s12 + c2)
    den = (mu1 * mu1 + mu2 * mu2 + c1) * (s11 + s22 + c2)
    return num / (den + eps)


def ssim_loss(a: jax.Array, b: jax.Array, window: int = 11) -> jax.Array:
    """kornia `SSIMLoss(window)` per sample: mean(clamp((1 - SSIM) / 2, 0, 1)), shape (B,)."""
    d = jnp.clip((1.0 - ssim_map(a, b, window)) / 2.0, 0.0, 1.0)
    return d.reshape(d.shape[0], -1).mean(axis=1)


# ---- the equations -----------------------------------------------------------------------------
def cud_loss_eq3(out: Mapping[str, jax.Array], targets: Mapping[str, jax.Array], clean: jax.Array,
                 with_ssim: bool = True) -> dict[str, jax.Array]:
    """Eq. 3 terms per sample: PH(f_c), PH(f_u^1), PH(f_u^2) against the masked targets and the fused
    image against the clean scene (L1, plus the SSIM loss the official recipe adds)."""
    terms = {
        "common": l1(out["common"], targets["common"]),
        "unique1": l1(out["unique1"], targets["unique1"]),
        "unique2": l1(out["unique2"], targets["unique2"]),
        "fused_l1": l1(out["fused"], clean),
    }
    if with_ssim:
        terms["fused_ssim"] = ssim_loss(clean, out["fused"])
    return terms


def mfm_loss_eq8(recon: jax.Array, clean: jax.Array) -> jax.Array:
    """Eq. 8 per sample: L1 between the MFM reconstruction from balanced-sampled tokens and x."""
    return l1(recon, clean)


def mcud_common_eq5(com_w1: jax.Array, com_w2: jax.Array) -> jax.Array:
    """Eq. 5 per sample: L1 between CA(H(x1), H(x2), T_c) and CA(H(x2), H(x1), T_c)."""
    return l1(com_w1, com_w2)


def mcud_unique_eq7(pred1, teacher1, pred2, teacher2) -> jax.Array:
    """Eq. 7 per sample: L1 of LP(f_u^k, f_c) to the frozen teacher tokens H_fix(x^k), k = 1, 2."""
    return l1(jax.lax.stop_gradient(teacher1), pred1) + l1(jax.lax.stop_gradient(teacher2), pred2)


def _reduce(x: jax.Array, how: str) -> jax.Array:
    if how == "sum":
        return x.sum()
    if how == "mean":
        return x.mean()
    raise ValueError(f"batch reduction must be 'sum' or 'mean', got {how!r}")


def total_loss_eq9(terms: Mapping[str, jax.Array], recipe: Recipe, multimodal: bool) -> jax.Array:
    """Eq. 9: (a) multi-modal batches L_m-com + L_m-uni, otherwise L_s-cud + alpha L_mfm, with the
    recipe's weights and batch reduction. `terms` holds per-sample arrays from the functions above."""
    r = recipe
    if multimodal:
        per = r.mcud_common * terms["mcud_common"] + r.mcud_unique * terms["mcud_unique"]
        return _reduce(per, r.multi_reduce)
    per = (r.common * terms["common"] + r.unique1 * terms["unique1"] + r.unique2 * terms["unique2"]
           + r.fused_l1 * terms["fused_l1"] + r.mfm * terms["mfm"])
    if r.fused_ssim:
        per = per + r.fused_ssim * terms["fused_ssim"]
    return _reduce(per, r.single_reduce)
