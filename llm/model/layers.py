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

from llm.model import lora, quant
from llm.model.config import ModelConfig, RopeScaling
from llm.parallel.partitioning import shard


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], names: tuple[str, ...], dtype) -> nnx.Param:
    """A parameter with logical axis names; placement happens later, under jit, by the rules table."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    """x / rms(x) * w, or * (1 + w) with `plus_one` (Gemma; w then starts at 0)."""

    def __init__(
        self,
        dim: int,
        eps: float,
        *,
        param_dtype,
        rngs: nnx.Rngs,
        axis: str = "embed",
        plus_one: bool = False,
    ):
        self.eps, self.plus_one = eps, plus_one
        init = nnx.initializers.zeros if plus_one else nnx.initializers.ones
        self.scale = param(rngs, init, (dim,), (axis,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        return (x32 * (1.0 + scale if self.plus_one else scale)).astype(x.dtype)


def norm(cfg: ModelConfig, dim: int, *, rngs: nnx.Rngs, axis: str = "embed") -> RMSNorm:
    """The model's RMSNorm over `dim` (its eps, dtype and (1 + w) choice)."""
    return RMSNorm(
        dim, cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs, axis=axis,
        plus_one=cfg.norm_plus_one,
    )  # fmt: skip


def rms(x: jax.Array) -> jax.Array:
    """Root mean square of all of x's coordinates, f32[] (the size of a typical coordinate)."""
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def dense(x: jax.Array, w: jax.Array, in_dims: int = 1) -> jax.Array:
    """x[..., *in] @ w[*in, *out], computed as one 2-D matmul over the flattened tokens.

    Keeping the token axes out of the dot makes the backward weight gradients plain 2-D
    matmuls too: with [B, L, ...] operands XLA CPU materializes transposes of the activations.
    """
    n_in = math.prod(w.shape[:in_dims])
    y = x.reshape(-1, n_in) @ w.reshape(n_in, -1)
    return y.reshape(*x.shape[: x.ndim - in_dims], *w.shape[in_dims:])


def linear(module: nnx.Module, name: str, x: jax.Array, in_dims: int = 1) -> jax.Array:
    """x @ module.<name> in the module's compute dtype (dequantized under QLoRA), plus its LoRA
    adapter's update where it has one (llm.model.lora): x @ W + s * dropout(x) @ A @ B."""
    dt = module.cfg.dtype
    if isinstance(getattr(module, name), lora.Quantized):  # QLoRA's base
        y = dense(x, lora.weight(module, name, dt), in_dims)
    else:  # config.quant's matmul (llm.model.quant; plain when off)
        y = quant.dense(module, name, x, in_dims)
    adapter = lora.adapter(module, name)
    if adapter is None:
        return y
    h = dense(adapter.dropout(x), adapter.a[...].astype(dt), in_dims)  # [..., r]
    return y + dense(h, adapter.b[...].astype(dt)) * jnp.asarray(adapter.scale, dt)


def rope_frequencies(
    dim: int, theta: float, scaling: RopeScaling, positions: jax.Array
) -> tuple[jax.Array, float]:
    """The inverse frequencies f32[dim/2] of RoPE over `dim` dimensions and the factor cos and sin
    are multiplied by, as transformers' rope_type computes them (llm.model.config.RopeScaling).

    Only "dynamic" reads `positions` ([B, L]): its length L is the largest position + 1 in this
    call, which is what transformers uses for a fresh model's forward and, since its decoding
    positions only grow, for each KV-cache step (transformers keeps the largest length it has
    seen across calls; ours forgets it between calls).
    """
    s, half = scaling, dim // 2
    exponent = jnp.arange(half, dtype=jnp.float32) / half  # 2i / dim
    inv_freq = 1.0 / theta**exponent  # [Dh/2]
    if s.type == "linear":
        return inv_freq / s.factor, 1.0
    if s.type == "dynamic":
        length = jnp.maximum(jnp.max(positions) + 1, s.original_max_position).astype(jnp.float32)
        base = theta * (s.factor * length / s.original_max_position - (s.factor - 1)) ** (
            dim / (dim - 2)
        )
        return 1.0 / base**exponent, 1.0
    if s.type == "llama3":
        wavelen = 2 * math.pi / inv_freq
        low, high = (
            s.original_max_position / s.low_freq_factor,
            s.original_max_position / s.high_freq_factor,
        )
        scaled = jnp.where(wavelen > low, inv_freq / s.factor, inv_freq)
        smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        return jnp.where((wavelen >= high) & (wavelen <= low), smoothed, scaled), 1.0
    if s.type == "yarn":

        def correction_dim(rotations: float) -> float:  # the dimension turning `rotations` times
            return (
                dim
                * math.log(s.original_max_position / (rotations * 2 * math.pi))
                / (2 * math.log(theta))
            )

        low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = jnp.clip((jnp.arange(half, dtype=jnp.float32) - low) / (high - low or 0.001), 0, 1)
        blended = inv_freq / s.factor * ramp + inv_freq * (1 - ramp)
        attention_factor = s.attention_factor
        if attention_factor is None:
            attention_factor = 0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0
        return blended, attention_factor
    return inv_freq, 1.0


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, scaling: RopeScaling) -> jax.Array:
    """Rotary embedding, Llama's "rotate half" layout. x: [B, L, heads, Dh], positions: [B, L]."""
    inv_freq, factor = rope_frequencies(x.shape[-1], theta, scaling, positions)  # [Dh/2]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, L, Dh/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    if factor != 1.0:
        sin, cos = sin * factor, cos * factor
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up)); GeGLU with mlp_activation="gelu_tanh"."""

    lora_targets = (("w_gate", "gate"), ("w_up", "up"), ("w_down", "down"))  # llm.model.lora

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
        gate = linear(self, "w_gate", x)  # [B, L, F]
        if self.cfg.mlp_activation == "gelu_tanh":  # GeGLU
            gate = jax.nn.gelu(gate, approximate=True)
        else:
            gate = jax.nn.silu(gate)
        h = gate * linear(self, "w_up", x)  # [B, L, F]
        h = shard(h, ("batch", "seq", "mlp"))
        return linear(self, "w_down", h)  # [B, L, D]
