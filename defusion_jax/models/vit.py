"""Vision Transformer used as the DeFusion++ encoder H and as the frozen ViT-B teacher H_fix.

One class serves both roles (design card): patch 16, cls token, pre-norm blocks with exact GELU,
configurable LayerNorm epsilon, per-block head counts (TinyMIM's ViT-T uses 6 heads and 12 in its
last block) and either a fixed 2-D sin-cos position table recomputed for any h x w grid (MAE,
TinyMIM) or a learned table resampled to the grid (timm).

Parameter names mirror the PyTorch modules (`patch_embed/proj`, `blocks_3/attn/qkv`, ...) so that a
state dict converts by a generic rule (see `defusion_jax.convert`).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from defusion_jax.sharding import batch_bernoulli, broadcast_batch, reshape_batch, shard_batch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# width, depth, heads, mlp width.  'Ti-mim' is TinyMIM's ViT-T (6 heads, 12 in the last block),
# 'Ti' is timm's ViT-T (3 heads).
VARIANTS = {
    "Ti": dict(width=192, depth=12, heads=3, mlp_dim=768),
    "Ti-mim": dict(width=192, depth=12, heads=(6,) * 11 + (12,), mlp_dim=768),
    "S": dict(width=384, depth=12, heads=6, mlp_dim=1536),
    "B": dict(width=768, depth=12, heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=24, heads=16, mlp_dim=4096),
}


def decode_variant(name: str) -> dict:
    """'B', 'B/16', 'Ti-mim' -> ViT keyword arguments (patch 16 only)."""
    base, _, patch = name.partition("/")
    if patch and patch != "16":
        raise ValueError(f"only patch 16 is supported, got variant {name!r}")
    if base not in VARIANTS:
        raise ValueError(f"unknown ViT variant {name!r}; known: {sorted(VARIANTS)}")
    return dict(VARIANTS[base])


def normalize_imagenet(x: jax.Array) -> jax.Array:
    """[0,1] RGB -> ImageNet-normalised, as torchvision's `normalize` in the official forward."""
    mean = jnp.asarray(IMAGENET_MEAN, x.dtype)
    std = jnp.asarray(IMAGENET_STD, x.dtype)
    return (x - mean) / std


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def unpatchify(tokens: jax.Array, gh: int, gw: int, patch: int = 16) -> jax.Array:
    """(B, gh*gw, p*p*C) patch vectors ordered (row p, col q, channel c), as MAE orders them ->
    (B, gh*p, gw*p, C)."""
    b, n, d = tokens.shape
    c = d // (patch * patch)
    if n != gh * gw:
        raise ValueError(f"{n} tokens do not fill a {gh}x{gw} grid")
    x = reshape_batch(tokens, (b, gh, gw, patch, patch, c)).transpose(0, 1, 3, 2, 4, 5)
    return reshape_batch(x, (b, gh * patch, gw * patch, c))


def patchify(images: jax.Array, patch: int = 16) -> jax.Array:
    """Inverse of `unpatchify`: (B, H, W, C) -> (B, H/p * W/p, p*p*C)."""
    b, h, w, c = images.shape
    x = reshape_batch(images, (b, h // patch, patch, w // patch, patch, c)).transpose(0, 1, 3, 2, 4, 5)
    return reshape_batch(x, (b, (h // patch) * (w // patch), patch * patch * c))


@functools.lru_cache(maxsize=64)
def sincos_table(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> np.ndarray:
    """Fixed 2-D sin-cos position table (MAE's `get_2d_sincos_pos_embed`) for any h x w grid.

    The first dim/2 channels encode the column index and the second dim/2 the row index (MAE calls
    the first half `emb_h` but feeds it `meshgrid(w, h)[0]`, i.e. columns); tokens are row-major.
    Returns float32 (1 + h*w, dim) with a zero cls row, or (h*w, dim).
    """
    if dim % 4:
        raise ValueError(f"sin-cos table needs a width divisible by 4, got {dim}")
    cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
    emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    table = emb.astype(np.float32)
    table.setflags(write=False)
    return table


# Largest grid side (in patches, i.e. 16384 px) `sincos_table_traced` serves.
MAX_TRACED_GRID = 1024


@functools.lru_cache(maxsize=8)
def _sincos_axis(dim: int, n: int) -> np.ndarray:
    return _sincos_1d(dim // 2, np.arange(n, dtype=np.float32)).astype(np.float32)


def sincos_table_traced(dim: int, grid_h, grid_w, cls_token: bool = True) -> jax.Array:
    """`sincos_table` for symbolic grid sizes (jax.export shape polymorphism).

    Slices one float64-computed per-axis table (rows 0..MAX_TRACED_GRID-1) instead of evaluating
    sin/cos in float32, so the values equal `sincos_table`'s bit for bit: a 1-ulp table error
    moves the random-weight fixture network's output by ~8e-6. The sizes must be provably at
    most MAX_TRACED_GRID (export with `constraints=("h <= 1024", ...)`), else tracing fails.
    """
    if dim % 4:
        raise ValueError(f"sin-cos table needs a width divisible by 4, got {dim}")
    axis = jnp.asarray(_sincos_axis(dim, MAX_TRACED_GRID))
    cols = jax.lax.slice_in_dim(axis, 0, grid_w)
    rows = jax.lax.slice_in_dim(axis, 0, grid_h)
    half = dim // 2
    emb = jnp.concatenate([jnp.broadcast_to(cols[None], (grid_h, grid_w, half)),
                           jnp.broadcast_to(rows[:, None], (grid_h, grid_w, half))], axis=-1)
    emb = emb.reshape(grid_h * grid_w, dim)
    if cls_token:
        emb = jnp.concatenate([jnp.zeros((1, dim), emb.dtype), emb], axis=0)
    return emb


def masking_from_noise(noise: jax.Array, mask_ratio: float):
    """MAE's `random_masking` given its uniform noise (B, N): the lowest `n_keep` stay visible.

    Returns `ids_keep` (B, n_keep) int32, `ids_restore` (B, N) int32 and `mask` (B, N) float32 with
    1 = removed; `n_keep = int(N * (1 - mask_ratio))` is static, as jit needs.
    """
    batch, n_tokens = noise.shape
    n_keep = int(n_tokens * (1 - mask_ratio))
    ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
    ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
    ids_keep = ids_shuffle[:, :n_keep]
    mask = (jnp.arange(n_tokens)[None, :] >= n_keep).astype(jnp.float32)
    mask = jnp.take_along_axis(broadcast_batch(mask, (batch, n_tokens), like=noise), ids_restore, axis=1)
    return ids_keep, ids_restore, mask


def random_masking(rng: jax.Array, batch: int, n_tokens: int, mask_ratio: float):
    """Per-sample random masking (see `masking_from_noise`), the noise kept with its sample under
    a batch-sharded mesh."""
    return masking_from_noise(shard_batch(jax.random.uniform(rng, (batch, n_tokens))), mask_ratio)


def restore_masked_tokens(x: jax.Array, mask_token: jax.Array, ids_restore: jax.Array,
                          grid: tuple[int, int]) -> jax.Array:
    """MAE-style interpolation: append mask tokens after the kept ones, unshuffle with
    `ids_restore`, put the cls token back in front and add the fixed sin-cos table of `grid`.

    x: (B, 1 + kept, D) with cls first; returns (B, 1 + h*w, D). Used by the MFM decoder (Eq. 8)
    and the MAE teacher decoder.
    """
    b, kept, d = x.shape
    fill = broadcast_batch(mask_token.astype(x.dtype), (b, ids_restore.shape[1] + 1 - kept, d), like=x)
    x_ = jnp.take_along_axis(jnp.concatenate([x[:, 1:], fill], axis=1), ids_restore[:, :, None], axis=1)
    return jnp.concatenate([x[:, :1], x_], axis=1) + jnp.asarray(sincos_table(d, *grid)).astype(x.dtype)


def resample_table(table: jax.Array, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> jax.Array:
    """Bicubic resampling of a learned (1 + h*w, D) position table to a new grid (cls row kept)."""
    if tuple(old_hw) == tuple(new_hw):
        return table
    cls, grid = table[:1], table[1:]
    grid = grid.reshape(*old_hw, -1)
    grid = jax.image.resize(grid, (*new_hw, grid.shape[-1]), method="cubic")
    return jnp.concatenate([cls, grid.reshape(-1, grid.shape[-1])], axis=0)


# ---- products ----------------------------------------------------------------------------------
def bf16_products() -> bool:
    """Whether the model's products take bfloat16 operands (float32 sums) in this trace: under
    `jax.default_matmul_precision("bfloat16")`. The model casts the operands itself (`product`,
    `dot_general`, and `attention` on accelerators) because XLA does not: XLA:CPU ignores matmul
    precision and XLA:GPU runs its default (TF32) for it. So the setting rounds alike on every
    backend (on TPU it is what XLA does anyway). It pays on CPUs with bfloat16 matmul instructions
    (docs/benchmarks.md: the fusion forward ~1.2-1.35x faster on a Zen 4), costs on CPUs without
    them, and on GPUs lets cuDNN flash attention run where the head size allows."""
    return jax.config.jax_default_matmul_precision == "bfloat16"


def _operands(*xs: jax.Array):
    """(*xs, preferred result type): float32 operands cast to bfloat16 where `bf16_products()`."""
    if all(x.dtype == jnp.float32 for x in xs) and bf16_products():
        return *(x.astype(jnp.bfloat16) for x in xs), jnp.float32
    return *xs, None


def product(subscripts: str, x: jax.Array, y: jax.Array, preferred_element_type: Any = None) -> jax.Array:
    """`jnp.einsum` of two arrays, as every product of the models' forward passes is computed."""
    x, y, preferred = _operands(x, y)
    return jnp.einsum(subscripts, x, y, preferred_element_type=preferred_element_type or preferred)


def dot_general(x, y, dimension_numbers, precision=None, preferred_element_type=None):
    """`jax.lax.dot_general` for `Dense`, with `product`'s operand rule."""
    x, y, preferred = _operands(x, y)
    return jax.lax.dot_general(x, y, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type or preferred)


Dense = functools.partial(nn.Dense, dot_general=dot_general)  # nn.Dense's parameters and names


def _cudnn_attention_ok(q: jax.Array) -> bool:
    """cuDNN flash attention (GPU, 16-bit, head dim a multiple of 8 up to 128), unless disabled."""
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128
            and os.environ.get("DEFUSION_CUDNN_ATTENTION", "1") != "0")


def _softmax_attention_fwd(q, k, v):
    # scaling q (L x Dh) instead of the logits (L x L): XLA:CPU otherwise feeds the fused
    # attention a materialised (B, H, L, L) broadcast of the scalar
    qs = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = product("bhqd,bhkd->bhqk", qs, k, preferred_element_type=jnp.float32)
    # the shift only guards exp against overflow; the result does not depend on it
    e = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
    total = e.sum(axis=-1, keepdims=True)
    out = product("bhqk,bhkd->bhqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32) / total
    return out.astype(q.dtype), (qs, k, v, e, total, out)


def _transposed_product(small: jax.Array, big: jax.Array) -> jax.Array:
    """big^T small for big (B, H, Lq, Lk) and small (B, H, Lq, Dh) -> (B, H, Lk, Dh), computed as
    (small^T big)^T. XLA:CPU runs the product with `big` transposed as a plain (non-YNNPACK) dot,
    3-4x slower than this form at 12-channel heads; the barriers keep XLA from folding the two
    small transposes back into it."""
    barrier = jax.lax.optimization_barrier
    small_t = barrier(jnp.swapaxes(small, -1, -2).astype(big.dtype))
    return jnp.swapaxes(barrier(jnp.einsum("bhdq,bhqk->bhdk", small_t, big)), -1, -2)


def _softmax_attention_bwd(res, g):
    qs, k, v, e, total, out = res
    g_un = g.astype(jnp.float32) / total  # gradient of exp(.) v before the normalisation
    g_total = -(g_un * out).sum(axis=-1, keepdims=True)
    g_e = jnp.einsum("bhqd,bhkd->bhqk", g_un.astype(v.dtype), v, preferred_element_type=jnp.float32)
    g_logits = e * (g_e + g_total)  # the max shift is a constant for the gradient
    g_q = jnp.einsum("bhqk,bhkd->bhqd", g_logits.astype(k.dtype), k, preferred_element_type=jnp.float32)
    g_q = g_q * qs.shape[-1] ** -0.5
    g_k = _transposed_product(qs, g_logits)
    g_v = _transposed_product(g_un, e)
    return g_q.astype(qs.dtype), g_k.astype(k.dtype), g_v.astype(v.dtype)


@jax.custom_vjp
def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over heads-major (B, H, L, Dh) arrays, written for XLA:CPU.

    - heads-major operands (see `to_heads`), so both products are plain batched matmuls (a
      dot_general with the batch dimensions in the middle runs ~3x slower);
    - the softmax normalisation is applied to the (L, Dh) output instead of the (L, L)
      probabilities (exp(s - max) v / sum exp(s - max)): the same value, half the backward work;
    - a hand-written backward whose four products all run as YNNPACK matmuls
      (`_transposed_product`): autodiff's two products with a transposed (L, L) operand are XLA:CPU's
      slowest operations in the training step at 12-channel heads.
    """
    return _softmax_attention_fwd(q, k, v)[0]


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, dropout: nn.Module | None = None,
              deterministic: bool = True) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over heads-major (B, H, L, Dh) arrays; returns (B, H, L, Dh).

    Without attention-probability dropout (every module here) this is `jax.nn.dot_product_attention`:
    cuDNN flash attention on GPUs where dtype and head size allow (DEFUSION_CUDNN_ATTENTION=0 turns
    that off), XLA elsewhere. On CPU it is `softmax_attention`, the same function written for
    XLA:CPU, where attention over 16 heads of 12 channels is the bottleneck of the network.
    """
    if dropout is None or deterministic:
        if jax.default_backend() != "cpu":
            dtype = q.dtype
            q, k, v, _ = _operands(q, k, v)  # `product`'s rule (the API sums in float32)
            qb, kb, vb = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # (B, L, H, Dh), what the API takes
            if _cudnn_attention_ok(q):
                try:
                    out = jax.nn.dot_product_attention(qb, kb, vb, implementation="cudnn")
                    return jnp.swapaxes(out, 1, 2).astype(dtype)
                except (NotImplementedError, ValueError, RuntimeError):  # cuDNN too old, shapes: fall back
                    pass
            return jnp.swapaxes(jax.nn.dot_product_attention(qb, kb, vb), 1, 2).astype(dtype)
        return softmax_attention(q, k, v)
    logits = product("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5
    probs = dropout(jax.nn.softmax(logits, axis=-1), deterministic=deterministic)
    return product("bhqk,bhkd->bhqd", probs, v)


class DenseParams(nn.Module):
    """The parameters of `nn.Dense(features)` (same names, shapes and initialisers), returned
    unapplied, for projections applied head-wise (`to_heads`, `from_heads`) or composed with the
    next affine map."""

    features: int

    @nn.compact
    def __call__(self, in_features: int):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features))
        return kernel, self.param("bias", nn.initializers.zeros_init(), (self.features,))


def to_heads(x: jax.Array, kernel: jax.Array, bias: jax.Array, num_heads: int, dtype: Any,
             parts: int = 1) -> jax.Array:
    """x @ kernel + bias with the output channels split into heads, heads-major: (B, L, D) ->
    (B, H, L, Dh), or (parts, B, H, L, Dh) for a packed kernel of `parts` projections (qkv: 3).

    The projection writes the heads-major layout itself, so no (B, L, H, Dh) copy is transposed,
    and a packed kernel stays one matmul (forward and both gradients)."""
    d_in, d_out = kernel.shape
    dh = d_out // (parts * num_heads)
    w = kernel.astype(dtype).reshape(d_in, parts, num_heads, dh)
    y = product("bld,dphe->pbhle", x.astype(dtype), w) + bias.astype(dtype).reshape(parts, 1, num_heads, 1, dh)
    return y[0] if parts == 1 else y


def from_heads(o: jax.Array, kernel: jax.Array, bias: jax.Array, dtype: Any) -> jax.Array:
    """Merge heads and project: (B, H, L, Dh) -> (B, L, D_out), i.e. concat_heads(o) @ kernel + bias."""
    h, dh = o.shape[1], o.shape[3]
    w = kernel.astype(dtype).reshape(h, dh, kernel.shape[1])
    return product("bhle,hed->bld", o.astype(dtype), w) + bias.astype(dtype)


class Attention(nn.Module):
    """timm/MAE self-attention with a fused qkv projection laid out (3, heads, head_dim)."""

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        w, b = DenseParams(3 * d, name="qkv")(d)
        q, k, v = to_heads(x, w, b, self.num_heads, self.dtype, parts=3)
        return from_heads(attention(q, k, v), *DenseParams(d, name="proj")(d), self.dtype)


def gelu_exact(x: jax.Array) -> jax.Array:
    """torch `nn.GELU()`: x/2 (1 + erf(x / sqrt 2)), written as torch computes it.

    `jax.nn.gelu(approximate=False)` evaluates the same function through erfc, which XLA:CPU runs
    2.5x slower; the two differ by < 1e-6 absolute on N(0, 4) inputs.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.5**0.5))


class Mlp(nn.Module):
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
        h = gelu_exact(h)
        return Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class Dropout(nn.Module):
    """`flax.linen.Dropout` (same rng stream, mask and scaling) with its mask drawn where the
    input's rows live, which Explicit sharding mode needs (`sharding.batch_bernoulli`)."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = batch_bernoulli(self.make_rng("dropout"), keep, x.shape, like=x)
        return jax.lax.select(mask, x / keep, jnp.zeros_like(x))


class Block(nn.Module):
    """Pre-norm ViT block: x + DropPath(Attn(LN(x))); x + DropPath(MLP(LN(x)))."""

    num_heads: int
    mlp_dim: int
    eps: float = 1e-6
    drop_path: float = 0.0
    dtype: Any = jnp.float32

    def _drop_path(self, y, deterministic):
        if deterministic or self.drop_path == 0.0:
            return y
        keep = 1.0 - self.drop_path
        mask = batch_bernoulli(self.make_rng("dropout"), keep, (y.shape[0],) + (1,) * (y.ndim - 1), like=y)
        return y * mask.astype(y.dtype) / keep

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        y = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="norm1")(x)
        x = x + self._drop_path(Attention(self.num_heads, dtype=self.dtype, name="attn")(y), deterministic)
        y = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="norm2")(x)
        return x + self._drop_path(Mlp(self.mlp_dim, dtype=self.dtype, name="mlp")(y), deterministic)


class PatchEmbed(nn.Module):
    """16x16 stride-16 convolution (named like timm's `patch_embed.proj`)."""

    width: int
    patch: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, padding="VALID",
                       dtype=self.dtype, name="proj")(x)


def as_heads(heads: int | Sequence[int], depth: int) -> tuple[int, ...]:
    heads = (heads,) * depth if isinstance(heads, int) else tuple(heads)
    if len(heads) != depth:
        raise ValueError(f"{len(heads)} head counts for {depth} blocks")
    return heads


class ViT(nn.Module):
    """ViT over NHWC images in [0,1] (ImageNet normalisation inside unless `normalize=False`).

    Returns a dict: `tokens` (B, 1 + h*w, D) after the final LayerNorm (timm's
    `forward_features`), and, with `return_all=True`, `all` = the list of depth + 1 token arrays
    [embedding(+pos, +cls), block 1, ..., block depth] without the final LayerNorm (what TinyMIM's
    forward returns and DeFusion++ consumes).
    """

    width: int = 192
    depth: int = 12
    heads: int | Sequence[int] = 3
    mlp_dim: int = 768
    patch: int = 16
    eps: float = 1e-6
    drop_path: float | Sequence[float] = 0.0
    posemb: str = "sincos"  # 'sincos' (fixed, any grid) or 'learned' (param, resampled)
    posemb_grid: tuple[int, int] = (14, 14)  # grid the learned table was trained on
    normalize: bool = True
    remat: bool = False
    dtype: Any = jnp.float32

    def position_table(self, gh: int, gw: int) -> jax.Array:
        if self.posemb == "sincos":
            if isinstance(gh, int) and isinstance(gw, int):
                return jnp.asarray(sincos_table(self.width, gh, gw))
            return sincos_table_traced(self.width, gh, gw)  # symbolic sizes (jax.export)
        if self.posemb == "learned":
            n = 1 + self.posemb_grid[0] * self.posemb_grid[1]
            table = self.param("pos_embed", nn.initializers.normal(0.02), (1, n, self.width))[0]
            return resample_table(table, self.posemb_grid, (gh, gw))
        raise ValueError(f"posemb must be 'sincos' or 'learned', got {self.posemb!r}")

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True, return_all: bool = False, ids_keep=None):
        """`ids_keep` (B, K) int: run on those patches only (MAE's encoder), after their positions."""
        b, h, w, _ = x.shape
        if h % self.patch or w % self.patch:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch}")
        if self.normalize:
            x = normalize_imagenet(x)
        x = PatchEmbed(self.width, self.patch, self.dtype, name="patch_embed")(x)
        gh, gw = h // self.patch, w // self.patch
        pos = self.position_table(gh, gw).astype(x.dtype)
        x = x.reshape(b, gh * gw, self.width) + pos[1:]
        if ids_keep is not None:
            x = jnp.take_along_axis(x, ids_keep[:, :, None], axis=1)
        cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, self.width))
        cls = broadcast_batch(cls.astype(x.dtype) + pos[:1], (b, 1, self.width), like=x)
        x = jnp.concatenate([cls, x], axis=1)

        heads = as_heads(self.heads, self.depth)
        drops = ((self.drop_path,) * self.depth if isinstance(self.drop_path, (int, float))
                 else tuple(self.drop_path))
        block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        outs = [x]
        for i in range(self.depth):
            x = block_cls(heads[i], self.mlp_dim, self.eps, drops[i], self.dtype,
                          name=f"blocks_{i}")(x, deterministic)
            outs.append(x)
        result = {"tokens": nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="norm")(x)}
        if return_all:
            result["all"] = outs
        return result


def vit_from_config(cfg: dict) -> ViT:
    """Build a ViT from `{'variant': 'B', ...overrides}`."""
    cfg = dict(cfg)
    kwargs = decode_variant(cfg.pop("variant")) if "variant" in cfg else {}
    kwargs.update(cfg)
    if "posemb_grid" in kwargs:
        kwargs["posemb_grid"] = tuple(kwargs["posemb_grid"])
    if isinstance(kwargs.get("heads"), list):
        kwargs["heads"] = tuple(kwargs["heads"])
    return ViT(**kwargs)


# ---- frozen teacher (H_fix) --------------------------------------------------------------------
class FeatureViT(ViT):
    """A ViT whose call returns the token array (B, 1 + h*w, D) after the final LayerNorm, like
    timm's `forward_features`: the interface of a frozen teacher. Same parameters as `ViT`."""

    def __call__(self, x, *, deterministic: bool = True):
        return super().__call__(x, deterministic=deterministic)["tokens"]


def load(path, *, normalize: bool | None = False, dtype: Any = jnp.float32, **convert_kwargs):
    """(module, params) of a ViT teacher: `module.apply({'params': params}, x)` -> tokens.

    `path` is a parameter folder (`python -m defusion_jax.convert vit`, or the encoder exported by
    MAE pretraining) or a timm/MAE `.pth`/`.safetensors` file, converted on the fly
    (`convert_kwargs` go to `defusion_jax.convert_vit.convert_vit`).

    `normalize` says what `x` is: False (default, as timm) -> NHWC ImageNet-normalised images;
    True -> NHWC [0,1] images, normalised inside (what the trainers feed); None -> as stored in
    the folder's model.json. Params are a plain dict of float32 numpy arrays, checked against the
    module's parameter tree (one line counting the missing, unexpected and mis-shaped keys and
    naming the first few of each).
    """
    import dataclasses
    from pathlib import Path

    from defusion_jax.params_io import CheckpointError, flat_shapes, is_params_dir, load_params, shape_mismatch

    path = Path(path)
    if is_params_dir(path):
        params, cfg, _ = load_params(path)
    elif path.is_file():
        from defusion_jax.convert_vit import load_checkpoint

        params, cfg, _ = load_checkpoint(path, **convert_kwargs)
    else:
        raise CheckpointError(f"{path}: neither a parameter folder (params.safetensors + model.json) "
                              "nor a checkpoint file")
    cfg = dict(cfg)
    if normalize is not None:
        cfg["normalize"] = bool(normalize)
    cfg["dtype"] = dtype
    try:
        vit = vit_from_config(cfg)
        module = FeatureViT(**{f.name: getattr(vit, f.name) for f in dataclasses.fields(ViT)
                               if f.name not in ("parent", "name")})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad ViT config in model.json ({e})") from None
    gh, gw = module.posemb_grid
    shapes = jax.eval_shape(lambda r: module.init(r, jnp.zeros((1, gh * module.patch, gw * module.patch, 3))),
                            jax.random.key(0))["params"]
    problem = shape_mismatch(flat_shapes(params), flat_shapes(shapes))
    if problem:
        raise CheckpointError(f"{path}: parameters do not match the ViT config in model.json: {problem}")
    return module, jax.tree.map(lambda v: np.asarray(v, np.float32), params)
