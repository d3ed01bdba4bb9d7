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

from defusion_jax.models.vit import attention


class MultiheadAttention(nn.Module):
    """`torch.nn.MultiheadAttention(batch_first=True)`: packed in_proj (q|k|v rows), out_proj."""

    num_heads: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, q, k, v, deterministic: bool = True):
        d = q.shape[-1]
        w = self.param("in_proj_kernel", nn.initializers.xavier_uniform(), (d, 3 * d))
        bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * d,))
        w, bias = w.astype(self.dtype), bias.astype(self.dtype)

        def heads(x, i):
            y = x.astype(self.dtype) @ w[:, i * d:(i + 1) * d] + bias[i * d:(i + 1) * d]
            return y.reshape(*y.shape[:-1], self.num_heads, d // self.num_heads)

        drop = nn.Dropout(self.dropout) if self.dropout else None
        out = attention(heads(q, 0), heads(k, 1), heads(v, 2), drop, deterministic)
        return nn.Dense(d, dtype=self.dtype, name="out_proj")(out.reshape(*out.shape[:-2], d))


class CrossAttentionTask(nn.Module):
    """The task-indicator attention (Eq. 4 / Eq. 6) without the residual and FFN.

    Query from x2 always and value from x1 always; the key comes from x2 in common mode
    (softmax(Q2 K2^T) V1, Eq. 4) and from x1 in unique mode (softmax(Q2 K1^T) V1, Eq. 6).
    """

    num_heads: int
    common: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x1, x2, deterministic: bool = True):
        d = x2.shape[-1]
        q = nn.Dense(d, dtype=self.dtype, name="query")(x2)
        k = nn.Dense(d, dtype=self.dtype, name="key")(x2 if self.common else x1)
        v = nn.Dense(d, dtype=self.dtype, name="value")(x1)
        return MultiheadAttention(self.num_heads, dtype=self.dtype, name="multihead_attn")(
            q, k, v, deterministic)


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
        drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=deterministic)  # noqa: E731
        attn = CrossAttentionTask(self.num_heads, self.common, self.dtype,
                                  name="multi_input_self_attn")(x1, x2, deterministic)
        src = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="norm1")(x2 + drop(attn))
        ff = nn.Dense(self.mlp_dim, dtype=self.dtype, name="linear1")(src)
        ff = nn.Dense(src.shape[-1], dtype=self.dtype, name="linear2")(drop(jax.nn.relu(ff)))
        return nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="norm2")(src + drop(ff))
