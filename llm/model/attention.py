"""Grouped-query attention with RoPE: the training path through the fused kernels (split over the
sequence axis under context parallelism), and the KV-cache path for decoding. Each layer's mask
is its pattern's (llm.model.patterns). Shape letters as in llm.model.layers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.attention.masks import Mask
from kernels.attention.reference import attention_reference
from llm.model import mup, patterns, quant
from llm.model.config import ModelConfig, RopeScaling
from llm.model.layers import apply_rope, linear, norm, param
from llm.parallel import context
from llm.parallel.partitioning import shard


def cached_attention(
    q, k, v, q_positions: jax.Array, kv_positions: jax.Array, mask: Mask, start=None, segments=None
) -> jax.Array:
    """Attention over a KV cache: query at position p sees the cached keys the mask allows.

    q: [B, T, H, Dh]; k, v: [B, K, S, Dh] (the cache's layout); q_positions: [T], or [B, T] when
    each row is at its own position; kv_positions: [S], or [B, S]; start: None, or int32[B]: each
    row's keys before it are padding, never seen; segments: None, or int32[B, T] with T == S
    (a row packing several sequences: a query sees its own sequence's keys only). The transposes
    below cancel with the reference's own, so the cache is read in place.
    """
    visible = mask.predicate(q_positions[..., :, None], kv_positions[..., None, :])  # [(B,) T, S]
    k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [B, S, K, Dh]
    if start is not None:  # segment 1: a row's tokens; 0: its padding
        tokens = (kv_positions[None, :] >= start[:, None]).astype(jnp.int32)  # [B, S]
        segments = (jnp.ones(q.shape[:2], jnp.int32), tokens)
    return attention_reference(q, k, v, mask=visible, segment_ids=segments)


class Attention(nnx.Module):
    """Grouped-query attention: H query heads share K key/value heads (H % K == 0).

    `layer` picks this layer's mask from the attention schedule (llm.model.patterns); None for
    scanned layers, which share one pattern.
    """

    lora_targets = (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o"))  # llm.model.lora

    def __init__(self, cfg: ModelConfig, layer: int | None, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.mask = patterns.layer_mask(cfg, layer)
        d, h, kv, dh, pdt = (
            cfg.embed_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.param_dtype,
        )
        init = nnx.initializers.normal(0.02)
        out_init = nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.num_layers))
        self.wq = param(rngs, init, (d, h, dh), ("embed", "heads", "head_dim"), pdt)
        self.wk = param(rngs, init, (d, kv, dh), ("embed", "kv_heads", "head_dim"), pdt)
        self.wv = param(rngs, init, (d, kv, dh), ("embed", "kv_heads", "head_dim"), pdt)
        self.wo = param(rngs, out_init, (h, dh, d), ("heads", "head_dim", "embed"), pdt)
        if cfg.qkv_bias:  # Qwen2: bq [H, Dh], bk and bv [K, Dh]
            zeros = nnx.initializers.zeros
            self.bq = param(rngs, zeros, (h, dh), ("heads", "head_dim"), pdt)
            self.bk = param(rngs, zeros, (kv, dh), ("kv_heads", "head_dim"), pdt)
            self.bv = param(rngs, zeros, (kv, dh), ("kv_heads", "head_dim"), pdt)
        if cfg.qk_norm:  # Qwen3, Gemma 3: RMSNorm over each head's Dh, before RoPE
            self.q_norm = norm(cfg, dh, rngs=rngs, axis="head_dim")
            self.k_norm = norm(cfg, dh, rngs=rngs, axis="head_dim")
        # Gemma 3: "sliding" layers rotate with their own base frequency, unscaled.
        local = cfg.rope_local_theta is not None and cfg.layer_patterns[layer or 0] == "sliding"
        self.rope = (
            (cfg.rope_local_theta, RopeScaling()) if local else (cfg.rope_theta, cfg.rope_scaling)
        )

    def project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: [B, L, D] -> q [B, L, H, Dh], k and v [B, L, K, Dh], RoPE applied to q and k."""
        cfg, dt = self.cfg, self.cfg.dtype
        q = linear(self, "wq", x)  # [B, L, H, Dh]
        k = linear(self, "wk", x)  # [B, L, K, Dh]
        v = linear(self, "wv", x)  # [B, L, K, Dh]
        if cfg.qkv_bias:
            q, k, v = (y + b[...].astype(dt) for y, b in ((q, self.bq), (k, self.bk), (v, self.bv)))
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = (apply_rope(y, positions, *self.rope) for y in (q, k))
        if cfg.query_pre_attn_scalar is not None:  # the kernels divide by sqrt(Dh)
            q = q * jnp.asarray(math.sqrt(cfg.head_dim / cfg.query_pre_attn_scalar), q.dtype)
        if (factor := mup.query_multiplier(cfg)) != 1.0:  # muP: scores x sqrt(base Dh) / Dh
            q = q * jnp.asarray(factor, q.dtype)
        return (
            shard(q, ("batch", "seq", "heads", "head_dim")),
            shard(k, ("batch", "seq", "kv_heads", "head_dim")),
            shard(v, ("batch", "seq", "kv_heads", "head_dim")),
        )

    def __call__(self, x, positions, segment_ids, cache: dict[str, jax.Array] | None):
        """x: [B, L, D] -> ([B, L, D], updated cache or None)."""
        cfg, dt = self.cfg, self.cfg.dtype
        q, k, v = self.project(x, positions)
        if cache is None:  # training / full forward: the fused attention boundary
            out = context.attention(
                q,
                k,
                v,
                segment_ids,
                mask=self.mask,
                mode=cfg.context_parallel,
                implementation=cfg.attention_impl,
            )
        else:  # decoding: write k, v into this layer's cache at cache["index"] (int32[] or a
            # position per row, int32[B]), attend over it
            index, layer = jnp.asarray(cache["index"]), cache["layer"]
            k_all, v_all = (
                quant.write_kv(cache[n], y, layer, index) for n, y in (("k", k), ("v", v))
            )
            k_read, v_read = (quant.read_kv(y, layer, dt) for y in (k_all, v_all))  # [B, K, S, Dh]
            if segment_ids is None:  # cache slot s holds position s
                q_positions = index[..., None] + jnp.arange(q.shape[1])  # [T] or [B, T]
                kv_positions = jnp.arange(k_read.shape[2])
            else:  # packed sequences filling the cache from 0 (S == T): slot t holds token t
                q_positions = kv_positions = positions  # [B, T], each sequence's own
            out = cached_attention(
                q, k_read, v_read, q_positions, kv_positions, self.mask, cache.get("start"),
                segment_ids,
            )  # fmt: skip
            cache = {"k": k_all, "v": v_all}
        out = linear(self, "wo", out, in_dims=2)  # [B, L, D]
        return out, cache
