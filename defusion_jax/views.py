"""The two degraded views of the CUD pretext task (paper Eq. 1), built on device inside the step.

The generator reproduces the official DeFusion data code (`self_mixpretrain_dataset.py`, see
../shared/notes/reference_impl.md section 1.3-1.5) in distribution:

  p ~ U[p_range)  (official 0.1 + U/1.12, one p for every grid of a sample)
  A = up(Bern_c(p)) * up(Bern_f(p)),  B = up(Bern_c(p)) * up(Bern_f(p))   fresh draws, shared sizes
  C = up(Bern_c(p)) | up(Bern_f(p)) | up(Bern_g3(p))  picked by s < 0.33 / < 0.66 / else
  pixels seen by neither view go to A where C == 1, else to B        (so M1 + M2 > 0)
  (mask1, mask2) = (A, B), or (B, A) when t >= 0.5
  view_k = clean * mask_k + clip(|N(0,1)|, 0, 1) * (1 - mask_k), noise per pixel AND channel

`c` is the coarse grid size (official 13), `f` and `g3` the fine sizes drawn independently from
`fine_sizes` (official 26 or 27). A g x g grid reaches H x W by nearest upsampling with source index
floor(i * float32(g / H)), which is torch's `F.interpolate(mode='nearest')`. Grid sizes are static
shapes, so every candidate size is built and the per-sample choice is a `jnp.where`.

All randomness of a batch comes from two batch-shaped draws (uniforms for p, the size and branch
choices and the grids; normals for the noise). threefry is partitionable, so the values do not
depend on how the batch is split over devices or processes, and with the draws constrained to the
batch sharding every device generates only its own rows.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from defusion_jax import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    """Mask generator settings (official defaults)."""

    coarse_sizes: tuple[int, ...] = (13,)
    fine_sizes: tuple[int, ...] = (26, 27)
    p_range: tuple[float, float] = (0.1, 0.1 + 1.0 / 1.12)
    third_grid_thresholds: tuple[float, float] = (0.33, 0.66)
    swap_prob: float = 0.5

    @classmethod
    def from_mapping(cls, cfg: Mapping | None) -> "ViewConfig":
        cfg = dict(cfg or {})
        unknown = set(cfg) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown view config keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.items()})


# ---- deterministic pieces (tested against hand-made grids and the reference fixture) -------------
def nearest_indices(grid: int, out: int) -> np.ndarray:
    """Source row of every output row for torch's nearest upsampling: floor(i * float32(g / out))."""
    scale = np.float32(np.float32(grid) / np.float32(out))
    idx = np.floor(np.arange(out, dtype=np.float32) * scale).astype(np.int32)
    return np.minimum(idx, grid - 1)


def upsample_nearest(grid: jax.Array, hw: Sequence[int]) -> jax.Array:
    """(..., g, g) -> (..., H, W) nearest-neighbour upsampling as torch `F.interpolate` does it."""
    gh, gw = grid.shape[-2:]
    rows = jnp.asarray(nearest_indices(gh, hw[0]))
    cols = jnp.asarray(nearest_indices(gw, hw[1]))
    return jnp.take(jnp.take(grid, rows, axis=-2), cols, axis=-1)


def assemble_masks(grid_a, grid_b, grid_c, swap):
    """Masks from the upsampled grids: uncovered pixels to A where C == 1, else to B, then the swap.

    grid_a/b/c are {0,1} arrays of one shape (any leading dims); `swap` is a boolean that broadcasts
    against them. Returns (mask1, mask2) as float32 with mask1 + mask2 >= 1 everywhere.
    """
    a = jnp.asarray(grid_a, jnp.float32)
    b = jnp.asarray(grid_b, jnp.float32)
    c = jnp.asarray(grid_c, jnp.float32)
    none = (a == 0) & (b == 0)
    a = a + c * none
    b = b + (1.0 - c) * none
    return jnp.where(swap, b, a), jnp.where(swap, a, b)


def degrade_eq1(clean, mask1, mask2, noise1, noise2):
    """Eq. 1: x^k = M_k(x) + (not M_k)(n), masks (B, H, W) broadcast over channels."""
    m1, m2 = mask1[..., None], mask2[..., None]
    return clean * m1 + noise1 * (1.0 - m1), clean * m2 + noise2 * (1.0 - m2)


def cud_targets(clean, mask1, mask2):
    """Targets of the three CUD terms of Eq. 3 (official: common = M1 & M2, unique = |M_k - common|).

    The three add up to `clean` because M1 + M2 > 0 everywhere.
    """
    common = ((mask1 == 1.0) & (mask2 == 1.0)).astype(clean.dtype)
    return {
        "common": clean * common[..., None],
        "unique1": clean * jnp.abs(mask1 - common)[..., None],
        "unique2": clean * jnp.abs(mask2 - common)[..., None],
        "common_mask": common,
    }


# ---- random draws --------------------------------------------------------------------------------
N_SCALARS = 6  # p, coarse size, fine size, third-grid fine size, third-grid choice s, swap t
N_GRIDS = 7  # A coarse/fine, B coarse/fine, C coarse/fine/third


def _select_size(u, p, size_index, sizes, hw):
    """up(u[:g, :g] < p) with g = sizes[size_index] per sample; every size is built, one is kept.

    u: (B, G, G) uniforms with G >= max(sizes); p, size_index: (B,)."""
    out = None
    for i, g in enumerate(sizes):
        up = upsample_nearest((u[:, :g, :g] < p[:, None, None]).astype(jnp.float32), hw)
        out = up if out is None else jnp.where((size_index == i)[:, None, None], up, out)
    return out


def masks_from_uniforms(scalars: jax.Array, grids: jax.Array, hw: Sequence[int], cfg: ViewConfig = ViewConfig()):
    """(mask1, mask2, p) from per-sample uniforms: scalars (B, 6) and grids (B, 7, G, G) in [0, 1).

    Uniform u -> Bernoulli(p) as u < p (the official generator's `rand < p`)."""
    lo, hi = cfg.p_range
    p = lo + scalars[:, 0] * (hi - lo)
    pick = lambda u, n: jnp.minimum(jnp.floor(u * n), n - 1).astype(jnp.int32)  # noqa: E731
    ci = pick(scalars[:, 1], len(cfg.coarse_sizes))
    fi = pick(scalars[:, 2], len(cfg.fine_sizes))
    gi = pick(scalars[:, 3], len(cfg.fine_sizes))
    s, t = scalars[:, 4], scalars[:, 5]
    coarse = lambda j: _select_size(grids[:, j], p, ci, cfg.coarse_sizes, hw)  # noqa: E731
    fine = lambda j, idx: _select_size(grids[:, j], p, idx, cfg.fine_sizes, hw)  # noqa: E731
    grid_a = coarse(0) * fine(1, fi)
    grid_b = coarse(2) * fine(3, fi)
    t1, t2 = cfg.third_grid_thresholds
    s = s[:, None, None]
    grid_c = jnp.where(s < t1, coarse(4), jnp.where(s < t2, fine(5, fi), fine(6, gi)))
    mask1, mask2 = assemble_masks(grid_a, grid_b, grid_c, (t >= cfg.swap_prob)[:, None, None])
    return mask1, mask2, p


def _batch_random(sample, key, shape, **kw):
    """`jax.random.<sample>` of a batch-leading shape, generated where its rows live.

    threefry is partitionable (JAX's default), so the values do not depend on the sharding and each
    device computes only its rows once the output is constrained to the batch sharding."""
    return sharding_lib.shard_batch(sample(key, shape, **kw, **sharding_lib.batch_out_sharding(shape)))


def make_views(rng: jax.Array, clean: jax.Array, cfg: ViewConfig = ViewConfig()) -> dict[str, jax.Array]:
    """Eq. 1 for a batch of clean NHWC images in [0,1] (float32), on device.

    Returns view1, view2 (B, H, W, 3), mask1, mask2 (B, H, W) float32 in {0,1}, p (B,), and the CUD
    targets common / unique1 / unique2 (B, H, W, 3) and common_mask (B, H, W). Under a mesh every
    output is sharded over the batch like `clean`, and each device generates only its own rows.
    """
    b, h, w, c = clean.shape
    big = max(max(cfg.coarse_sizes), max(cfg.fine_sizes))
    k_u, k_n = jax.random.split(rng)
    u = _batch_random(jax.random.uniform, k_u, (b, N_SCALARS + N_GRIDS * big * big))
    mask1, mask2, p = masks_from_uniforms(u[:, :N_SCALARS], u[:, N_SCALARS:].reshape(b, N_GRIDS, big, big),
                                          (h, w), cfg)
    noise = jnp.clip(jnp.abs(_batch_random(jax.random.normal, k_n, (b, 2, h, w, c), dtype=clean.dtype)), 0.0, 1.0)
    view1, view2 = degrade_eq1(clean, mask1, mask2, noise[:, 0], noise[:, 1])
    out = {"view1": view1, "view2": view2, "mask1": mask1, "mask2": mask2, "p": p}
    out.update(cud_targets(clean, mask1, mask2))
    return {k: sharding_lib.shard_batch(v) for k, v in out.items()}
