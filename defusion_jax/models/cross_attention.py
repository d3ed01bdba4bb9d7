"""The cross-attention layer CA(H(x1), H(x2), T) of DeFusion++ (paper Sec. 3.2.2, Eq. 4 and 6).

Built as the official `TransformerAttenBlockVpaper`: outer query/key/value Linear layers, then a
`torch.nn.MultiheadAttention` with its own packed in-projection and out-projection, a post-norm
residual on the *query* side (x2), and a ReLU feed-forward, with dropout 0.1 in three places.
Parameter names mirror the PyTorch module so an official state dict converts by a generic rule.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from defusion_jax.models.vit import Dense, DenseParams, Dropout, attention, from_heads, to_heads


class MultiheadAttention(nn.Module):
    """`torch.nn.MultiheadAttention(batch_first=True)`: packed in_proj (q|k|v rows), out_proj.

    `pre` = the (kernel, bias) of the Linear layer in front of each of q, k and v, or None. The two
    affine maps are then composed before they touch the tokens, x (Wa Wb) + (ba Wb + bb) instead
    of (x Wa + ba) Wb + bb: the same function with three of the seven token-sized projections of a
    CA block gone, forward and backward (the 192^3 composition is negligible).
    """

    num_heads: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, q, k, v, deterministic: bool = True, pre=None):
        d = q.shape[-1] if pre is None else pre[0][0].shape[-1]
        w = self.param("in_proj_kernel", nn.initializers.xavier_uniform(), (d, 3 * d))
        bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * d,))

        def projection(i):
            wi, bi = w[:, i * d:(i + 1) * d], bias[i * d:(i + 1) * d]
            if pre is not None:
                wa, ba = pre[i]
                hi = jax.lax.Precision.HIGHEST  # parameters are composed at full float32 precision
                wi, bi = jnp.matmul(wa, wi, precision=hi), jnp.matmul(ba, wi, precision=hi) + bi
            return wi, bi

        # Projections of the same token array run as one packed matmul (common mode: q and k of x2;
        # unique mode: k and v of x1).
        inputs, heads = (q, k, v), [None] * 3
        groups: dict[int, list[int]] = {}
        for i, x in enumerate(inputs):
            groups.setdefault(id(x), []).append(i)
        for idx in groups.values():
            ws = [projection(i) for i in idx]
            y = to_heads(inputs[idx[0]], jnp.concatenate([p[0] for p in ws], axis=1),
                         jnp.concatenate([p[1] for p in ws]), self.num_heads, self.dtype, parts=len(idx))
            for j, i in enumerate(idx):
                heads[i] = y if len(idx) == 1 else y[j]

        drop = Dropout(self.dropout) if self.dropout else None
        out = attention(*heads, drop, deterministic)
        return from_heads(out, *DenseParams(d, name="out_proj")(d), self.dtype)


class CrossAttentionTask(nn.Module):
    """The task-indicator attention (Eq. 4 / Eq. 6) without the residual and FFN.

    Query from x2 always and value from x1 always; the key comes from x2 in common mode
    (softmax(Q2 K2^T) V1, Eq. 4) and from x1 in unique mode (softmax(Q2 K1^T) V1, Eq. 6). The
    official outer query/key/value Linear layers are kept as parameters and composed with the
    attention's in-projection (see `MultiheadAttention`).
    """

    num_heads: int
    common: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x1, x2, deterministic: bool = True):
        d = x2.shape[-1]
        pre = tuple(DenseParams(d, name=n)(d) for n in ("query", "key", "value"))
        return MultiheadAttention(self.num_heads, dtype=self.dtype, name="multihead_attn")(
            x2, x2 if self.common else x1, x1, deterministic, pre=pre)


class CABlock(nn.Module):
    """CA(x1, x2, T): post-norm block around `CrossAttentionTask`, residual on x2 (Eq. 4, 6)."""

    num_heads: int = 16
    common: bool = False
    mlp_dim: int = 768
    dropout: float = 0.1
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x1, x2, deterministic: bool = True):
        drop = lambda y: Dropout(self.dropout)(y, deterministic=deterministic)  # noqa: E731
        attn = CrossAttentionTask(self.num_heads, self.common, self.dtype,
                                  name="multi_input_self_attn")(x1, x2, deterministic)
        src = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="norm1")(x2 + drop(attn))
        ff = Dense(self.mlp_dim, dtype=self.dtype, name="linear1")(src)
        ff = Dense(src.shape[-1], dtype=self.dtype, name="linear2")(drop(jax.nn.relu(ff)))
        return nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="norm2")(src + drop(ff))
