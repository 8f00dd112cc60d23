"""The model's building blocks: parameters with logical axis names, RMSNorm, dense, RoPE, SwiGLU.

Shape letters: B batch, L sequence, D embed, H query heads, K key/value heads, Dh head dim,
F mlp hidden, V vocabulary. Every parameter carries logical axis names (`out_sharding`
metadata) and activations are constrained by name with `shard`; llm.parallel.partitioning maps
the names to a device mesh, so nothing in llm.model knows about devices.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from llm.model.config import ModelConfig
from llm.parallel.partitioning import shard


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], names: tuple[str, ...], dtype) -> nnx.Param:
    """A parameter with logical axis names; placement happens later, under jit, by the rules table."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def dense(x: jax.Array, w: jax.Array, in_dims: int = 1) -> jax.Array:
    """x[..., *in] @ w[*in, *out], computed as one 2-D matmul over the flattened tokens.

    Keeping the token axes out of the dot makes the backward weight gradients plain 2-D
    matmuls too: with [B, L, ...] operands XLA CPU materializes transposes of the activations.
    """
    n_in = math.prod(w.shape[:in_dims])
    y = x.reshape(-1, n_in) @ w.reshape(n_in, -1)
    return y.reshape(*x.shape[: x.ndim - in_dims], *w.shape[in_dims:])


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, Llama's "rotate half" layout. x: [B, L, heads, Dh], positions: [B, L]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)  # [Dh/2]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, L, Dh/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f, pdt = cfg.embed_dim, cfg.mlp_dim, cfg.param_dtype
        init = nnx.initializers.normal(0.02)
        self.w_gate = param(rngs, init, (d, f), ("embed", "mlp"), pdt)
        self.w_up = param(rngs, init, (d, f), ("embed", "mlp"), pdt)
        self.w_down = param(
            rngs,
            nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.num_layers)),
            (f, d),
            ("mlp", "embed"),
            pdt,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.cfg.dtype
        h = jax.nn.silu(dense(x, self.w_gate[...].astype(dt))) * dense(
            x, self.w_up[...].astype(dt)
        )  # [B, L, F]
        h = shard(h, ("batch", "seq", "mlp"))
        return dense(h, self.w_down[...].astype(dt))  # [B, L, D]
