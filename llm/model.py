"""A decoder-only Transformer in the Llama style, read top to bottom.

token embedding -> num_layers x [RMSNorm -> grouped-query attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP (or a mixture of experts, llm.moe) -> residual] -> RMSNorm -> output
projection (tied or untied).

Shape letters: B batch, L sequence, D embed, H query heads, K key/value heads, Dh head dim,
F mlp hidden, V vocabulary. Every parameter carries logical axis names (`out_sharding`
metadata) and activations are constrained by name with `shard`; `llm.partitioning` maps the
names to a device mesh, so nothing here knows about devices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.attention.masks import Mask
from kernels.attention.reference import attention_reference
from llm import context_parallel, sparse
from llm.partitioning import shard

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts feed-forward layers (llm.moe); num_experts=0 keeps every layer dense."""

    num_experts: int = 0
    top_k: int = 2  # experts per token
    expert_mlp_dim: int = 768  # F of each expert's SwiGLU
    every: int = (
        1  # MoE in layers i >= first_dense_layers with (i - first_dense_layers) % every == 0
    )
    first_dense_layers: int = 0
    router: str = "softmax_topk"  # a key of llm.moe.ROUTERS
    dispatch: str = "dropless"  # "dropless" (grouped matmul) or "capacity" (fixed buffers)
    capacity_factor: float = 1.25  # capacity dispatch: slots per expert = ceil(cf * tokens * k / E)
    aux_loss_weight: float = 1e-2  # Switch load-balancing loss
    z_loss_weight: float = 1e-3  # router z-loss
    bias_update_rate: float = 0.0  # auxiliary-loss-free balancing step size; 0 = off
    num_shared_experts: int = 0  # dense SwiGLU experts every token uses
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output * sigmoid(x @ w), w: [D, 1]

    def is_moe_layer(self, layer: int) -> bool:
        start = self.first_dense_layers
        return self.num_experts > 0 and layer >= start and (layer - start) % self.every == 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    num_layers: int = 4
    embed_dim: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # None = embed_dim // num_heads
    mlp_dim: int = 768
    max_seq_len: int = 2048
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"  # a key of REMAT_POLICIES
    attention_impl: str | None = None  # None = kernels.attention picks for the backend
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    attention_pattern: str = "dense"  # per-layer schedule of llm.sparse patterns
    attention_window: int = 128  # W of "sliding", "local_global", "dilated"
    attention_global: int = 16  # G global tokens of "local_global"
    attention_stride: int = 8  # S of "strided", "dilated"
    attention_chunk: int = 128  # C of "chunked"
    attention_nsa_block: int = 16  # tokens per compressed/selected block of "nsa"
    attention_nsa_selected: int = 4  # past blocks each "nsa" query selects (besides its own)
    context_parallel: str = "ring"  # "ring" | "all_gather", used when mesh.sequence > 1

    def __post_init__(self):
        if isinstance(self.moe, dict):  # from a config file's nested ConfigDict
            object.__setattr__(self, "moe", MoEConfig(**self.moe))
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)


def _param(
    rngs: nnx.Rngs, init, shape: tuple[int, ...], names: tuple[str, ...], dtype
) -> nnx.Param:
    """A parameter with logical axis names; placement happens later, under jit, by the rules table."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = _param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype)

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


def cached_attention(
    q, k, v, q_positions: jax.Array, kv_positions: jax.Array, mask: Mask
) -> jax.Array:
    """Attention over a KV cache: query at position p sees the cached keys the mask allows.

    q: [B, T, H, Dh]; k, v: [B, S, K, Dh]; q_positions: [T]; kv_positions: [S].
    """
    visible = mask.predicate(q_positions[:, None], kv_positions[None, :])  # [T, S]
    return attention_reference(q, k, v, mask=visible)


class Attention(nnx.Module):
    """Grouped-query attention: H query heads share K key/value heads (H % K == 0).

    `layer` picks this layer's mask from the attention schedule (llm.sparse); None for scanned
    layers, which share one pattern.
    """

    def __init__(self, cfg: ModelConfig, layer: int | None, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.mask = sparse.layer_mask(cfg, layer)
        d, h, kv, dh, pdt = (
            cfg.embed_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.param_dtype,
        )
        init = nnx.initializers.normal(0.02)
        out_init = nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.num_layers))
        self.wq = _param(rngs, init, (d, h, dh), ("embed", "heads", "head_dim"), pdt)
        self.wk = _param(rngs, init, (d, kv, dh), ("embed", "kv_heads", "head_dim"), pdt)
        self.wv = _param(rngs, init, (d, kv, dh), ("embed", "kv_heads", "head_dim"), pdt)
        self.wo = _param(rngs, out_init, (h, dh, d), ("heads", "head_dim", "embed"), pdt)

    def project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: [B, L, D] -> q [B, L, H, Dh], k and v [B, L, K, Dh], RoPE applied to q and k."""
        cfg, dt = self.cfg, self.cfg.dtype
        q = dense(x, self.wq[...].astype(dt))  # [B, L, H, Dh]
        k = dense(x, self.wk[...].astype(dt))  # [B, L, K, Dh]
        v = dense(x, self.wv[...].astype(dt))  # [B, L, K, Dh]
        q = shard(apply_rope(q, positions, cfg.rope_theta), ("batch", "seq", "heads", "head_dim"))
        k = shard(
            apply_rope(k, positions, cfg.rope_theta), ("batch", "seq", "kv_heads", "head_dim")
        )
        return q, k, shard(v, ("batch", "seq", "kv_heads", "head_dim"))

    def __call__(self, x, positions, segment_ids, cache: dict[str, jax.Array] | None):
        """x: [B, L, D] -> ([B, L, D], updated cache or None)."""
        cfg, dt = self.cfg, self.cfg.dtype
        q, k, v = self.project(x, positions)
        if cache is None:  # training / full forward: the fused attention boundary
            out = context_parallel.attention(
                q,
                k,
                v,
                segment_ids,
                mask=self.mask,
                mode=cfg.context_parallel,
                implementation=cfg.attention_impl,
            )
        else:  # decoding: write k, v at cache["index"], attend over the whole cache
            index = cache["index"]
            k_all = jax.lax.dynamic_update_slice_in_dim(
                cache["k"], k.astype(cache["k"].dtype), index, axis=1
            )
            v_all = jax.lax.dynamic_update_slice_in_dim(
                cache["v"], v.astype(cache["v"].dtype), index, axis=1
            )
            q_positions = index + jnp.arange(q.shape[1])
            kv_positions = jnp.arange(k_all.shape[1])
            out = cached_attention(q, k_all, v_all, q_positions, kv_positions, self.mask)
            cache = {"k": k_all, "v": v_all, "index": index}
        out = dense(out, self.wo[...].astype(dt), in_dims=2)  # [B, L, D]
        return out, cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f, pdt = cfg.embed_dim, cfg.mlp_dim, cfg.param_dtype
        init = nnx.initializers.normal(0.02)
        self.w_gate = _param(rngs, init, (d, f), ("embed", "mlp"), pdt)
        self.w_up = _param(rngs, init, (d, f), ("embed", "mlp"), pdt)
        self.w_down = _param(
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


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    With `moe` the MLP is a mixture of experts (llm.moe) and the block also returns its auxiliary
    values (losses and routing statistics); a dense block returns {}. `layer` picks the block's
    attention pattern (llm.sparse); None = the schedule's single pattern (scanned layers).
    """

    def __init__(
        self, cfg: ModelConfig, layer: int | None = None, *, rngs: nnx.Rngs, moe: bool = False
    ):
        kw = dict(param_dtype=cfg.param_dtype, rngs=rngs)
        self.attn_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, **kw)
        if sparse.layer_pattern(cfg, layer) == "nsa":
            from llm.native_sparse import NativeSparseAttention  # builds on this module

            self.attn = NativeSparseAttention(
                cfg,
                layer,
                block=cfg.attention_nsa_block,
                num_selected=cfg.attention_nsa_selected,
                window=cfg.attention_window,
                rngs=rngs,
            )
        else:
            self.attn = Attention(cfg, layer, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, **kw)
        self.is_moe = moe
        if moe:
            from llm.moe import MoE  # llm.moe builds on this module's MLP

            self.mlp = MoE(cfg, rngs=rngs)
        else:
            self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, segment_ids, cache):
        h, cache = self.attn(self.attn_norm(x), positions, segment_ids, cache)
        x = x + h
        h, aux = self.mlp(self.mlp_norm(x)) if self.is_moe else (self.mlp(self.mlp_norm(x)), {})
        x = x + h
        return shard(x, ("batch", "seq", "embed")), cache, aux


class Transformer(nnx.Module):
    """tokens: int32[B, L] -> logits: float32[B, L, V]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = cfg.param_dtype
        self.embed = _param(
            rngs,
            nnx.initializers.normal(0.02),
            (cfg.vocab_size, cfg.embed_dim),
            ("vocab", "embed"),
            pdt,
        )
        if cfg.scan_layers:  # one Block whose parameters are stacked along a leading "layers" axis

            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked_blocks(rngs: nnx.Rngs) -> Block:
                return Block(cfg, rngs=rngs)

            self.blocks = stacked_blocks(rngs)
        else:
            self.blocks = nnx.List(
                [
                    Block(cfg, i, rngs=rngs, moe=cfg.moe.is_moe_layer(i))
                    for i in range(cfg.num_layers)
                ]
            )
        self.final_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        if not cfg.tie_embeddings:
            self.unembed = _param(
                rngs,
                nnx.initializers.normal(0.02),
                (cfg.embed_dim, cfg.vocab_size),
                ("embed", "vocab"),
                pdt,
            )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: dict[str, Any] | None = None,
        *,
        return_aux: bool = False,
    ):
        """Returns logits, or (logits, cache) when decoding with a KV cache (see `init_cache`).

        positions: [B, L] position of each token in its document (default 0..L-1, or the cache
        index onward when decoding); segment_ids: [B, L] document ids of packed sequences.
        return_aux: also return the MoE layers' auxiliary values {layer: {name: value}} (training).
        """
        cfg = self.cfg
        if positions is None:
            start = 0 if cache is None else cache["index"]
            positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embed[...].astype(cfg.dtype)[tokens]  # [B, L, D]
        x = shard(x, ("batch", "seq", "embed"))
        x, cache, aux = self._run_blocks(x, positions, segment_ids, cache)
        x = self.final_norm(x)
        unembed = self.embed[...].T if cfg.tie_embeddings else self.unembed[...]  # [D, V]
        logits = dense(x, unembed.astype(cfg.dtype)).astype(jnp.float32)  # [B, L, V]
        logits = shard(logits, ("batch", "seq", "vocab"))
        if return_aux:
            return logits, aux
        return logits if cache is None else (logits, cache)

    def _run_blocks(self, x, positions, segment_ids, cache):
        """Applies the blocks (a Python loop, or a scan over stacked parameters), with remat."""
        cfg = self.cfg

        def block_fn(graphdef, block_state, x, block_cache):
            return nnx.merge(graphdef, block_state)(x, positions, segment_ids, block_cache)

        if cfg.remat != "none":
            block_fn = jax.checkpoint(
                block_fn, policy=REMAT_POLICIES[cfg.remat], static_argnums=(0,)
            )

        def layer_cache(k, v):
            return None if cache is None else {"k": k, "v": v, "index": cache["index"]}

        if cfg.scan_layers:
            graphdef, state = nnx.split(self.blocks)

            def body(x, layer):  # dense blocks only (config validation)
                layer_state, k, v = layer
                x, new, _ = block_fn(graphdef, layer_state, x, layer_cache(k, v))
                return x, (None, None) if new is None else (new["k"], new["v"])

            kv = (None, None) if cache is None else (cache["k"], cache["v"])
            x, (new_k, new_v) = jax.lax.scan(body, x, (state, *kv))
            aux = {}
        else:
            new_k, new_v, aux = [], [], {}
            for i, block in enumerate(self.blocks):
                graphdef, state = nnx.split(block)
                kv = (None, None) if cache is None else (cache["k"][i], cache["v"][i])
                x, new, aux[i] = block_fn(graphdef, state, x, layer_cache(*kv))
                if new is not None:
                    new_k.append(new["k"])
                    new_v.append(new["v"])
            new_k, new_v = (jnp.stack(new_k), jnp.stack(new_v)) if new_k else (None, None)
        aux = {i: values for i, values in aux.items() if values}
        if cache is None:
            return x, None, aux
        return x, {"k": new_k, "v": new_v, "index": cache["index"] + x.shape[1]}, aux

    def update_expert_biases(self, loads: dict[int, jax.Array]) -> None:
        """One auxiliary-loss-free balancing step (llm.moe) of each MoE layer, from its load [E]."""
        for i, load in loads.items():
            self.blocks[i].mlp.update_bias(load)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> dict[str, jax.Array]:
    """An empty KV cache: k, v: [layers, B, max_len, K, Dh] in the compute dtype; index: int32[]."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    zeros = jnp.zeros(shape, cfg.dtype)
    return {"k": zeros, "v": zeros, "index": jnp.array(0, jnp.int32)}
