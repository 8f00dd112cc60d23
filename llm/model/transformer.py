"""A decoder-only Transformer in the Llama style, read top to bottom.

token embedding -> num_layers x [RMSNorm -> grouped-query attention with RoPE (llm.model.attention;
or native sparse attention, llm.model.nsa) -> residual, RMSNorm -> SwiGLU MLP (or a mixture of
experts, llm.model.moe) -> residual] -> RMSNorm -> output projection (tied or untied).

Gemma 3's options (ModelConfig): embeddings times sqrt(D), RMSNorms of (1 + w), a second
RMSNorm on each branch's output (post_norms), GeGLU, its own attention scale and local RoPE
base, and logits soft-capped.

Shape letters as in llm.model.layers. The config is llm.model.config.ModelConfig.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llm.model import mup, quant
from llm.model.attention import Attention
from llm.model.config import REMAT_POLICIES, ModelConfig
from llm.model.layers import MLP, dense, norm, param, rms
from llm.model.moe import MoE
from llm.model.nsa import NativeSparseAttention
from llm.parallel.partitioning import shard


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    With `moe` the MLP is a mixture of experts (llm.model.moe) and the block also returns its auxiliary
    values (losses and routing statistics); a dense block returns {}. `layer` picks the block's
    attention pattern (llm.model.patterns); None = the schedule's single pattern (scanned layers).
    """

    def __init__(
        self, cfg: ModelConfig, layer: int | None = None, *, rngs: nnx.Rngs, moe: bool = False
    ):
        self.attn_norm = norm(cfg, cfg.embed_dim, rngs=rngs)
        nsa = cfg.layer_patterns[layer or 0] == "nsa"  # scanned layers share one pattern
        self.attn = (NativeSparseAttention if nsa else Attention)(cfg, layer, rngs=rngs)
        self.mlp_norm = norm(cfg, cfg.embed_dim, rngs=rngs)
        self.is_moe = moe
        self.mlp = MoE(cfg, rngs=rngs) if moe else MLP(cfg, rngs=rngs)
        self.post_norms = cfg.post_norms
        if cfg.post_norms:  # Gemma 2/3: each branch's output normalized before the residual add
            self.attn_post_norm = norm(cfg, cfg.embed_dim, rngs=rngs)
            self.mlp_post_norm = norm(cfg, cfg.embed_dim, rngs=rngs)

    def __call__(self, x, positions, segment_ids, cache, record_rms: bool = False):
        """record_rms: aux also holds the RMS of the attention and MLP outputs and of the
        residual stream after the block (rms_attention, rms_mlp, rms_residual)."""
        h, cache = self.attn(self.attn_norm(x), positions, segment_ids, cache)
        attn_out = self.attn_post_norm(h) if self.post_norms else h
        x = x + attn_out
        h, aux = self.mlp(self.mlp_norm(x)) if self.is_moe else (self.mlp(self.mlp_norm(x)), {})
        mlp_out = self.mlp_post_norm(h) if self.post_norms else h
        x = x + mlp_out
        if record_rms:
            aux = {**aux, "rms_attention": rms(attn_out), "rms_mlp": rms(mlp_out)}
            aux["rms_residual"] = rms(x)
        return shard(x, ("batch", "seq", "embed")), cache, aux


class Transformer(nnx.Module):
    """tokens: int32[B, L] -> logits: float32[B, L, V]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = cfg.param_dtype
        self.embed = param(
            rngs,
            nnx.initializers.normal(0.02),
            (cfg.vocab_size, cfg.embed_dim),
            ("vocab", "embed"),
            pdt,
        )
        if cfg.scan_layers:  # one Block whose parameters are stacked along a leading "layers" axis
            moe = cfg.moe.num_experts > 0  # then every layer is MoE (config validation)

            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked_blocks(rngs: nnx.Rngs) -> Block:
                return Block(cfg, rngs=rngs, moe=moe)

            self.blocks = stacked_blocks(rngs)
        else:
            self.blocks = nnx.List(
                [
                    Block(cfg, i, rngs=rngs, moe=cfg.moe.is_moe_layer(i))
                    for i in range(cfg.num_layers)
                ]
            )
        self.final_norm = norm(cfg, cfg.embed_dim, rngs=rngs)
        if not cfg.tie_embeddings:
            self.unembed = param(
                rngs,
                nnx.initializers.normal(0.02),
                (cfg.embed_dim, cfg.vocab_size),
                ("embed", "vocab"),
                pdt,
            )
        if cfg.parametrization == "mup":  # llm.model.mup: initializations scaled by width
            mup.rescale_init(cfg, self)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: dict[str, Any] | None = None,
        *,
        return_aux: bool = False,
        record_rms: bool = False,
    ):
        """Returns logits, or (logits, cache) when decoding with a KV cache (see `init_cache`).

        positions: [B, L] position of each token in its document (default 0..L-1, or the cache
        index onward when decoding); segment_ids: [B, L] document ids of packed sequences.
        return_aux: also return the MoE layers' auxiliary values {layer: {name: value}} (training).
        record_rms: the auxiliary values include each block's output sizes (`Block`).
        """
        x, cache, aux = self.hidden_states(tokens, positions, segment_ids, cache, record_rms)
        logits = self.logits(x)
        if return_aux:
            return logits, aux
        return logits if cache is None else (logits, cache)

    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: dict[str, Any] | None = None,
        record_rms: bool = False,
    ) -> tuple[jax.Array, dict[str, Any] | None, dict]:
        """Everything before the output projection: x: [B, L, D] after the final norm, the new
        cache (None without one) and the MoE auxiliary values. A fused loss
        (kernels.cross_entropy) takes x and `unembedding()` instead of the logits."""
        if positions is None:  # a cache's index: int32[], or int32[B] (a position per row)
            start = jnp.asarray(0 if cache is None else cache["index"])
            positions = jnp.broadcast_to(
                start[..., None] + jnp.arange(tokens.shape[1]), tokens.shape
            )
        x = self.embed_tokens(tokens)
        x, cache, aux = self._run_blocks(x, positions, segment_ids, cache, record_rms)
        return self.final_norm(x), cache, aux

    def logits(self, x: jax.Array) -> jax.Array:
        """x: [B, L, D] after the final norm -> logits: float32[B, L, V]."""
        x = quant.activation(self, "head", x)  # config.quant: the head's input
        logits = dense(x, self.unembedding()).astype(jnp.float32)  # [B, L, V]
        if self.cfg.final_logit_softcap is not None:  # Gemma
            cap = self.cfg.final_logit_softcap
            logits = cap * jnp.tanh(logits / cap)
        return shard(logits, ("batch", "seq", "vocab"))

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """tokens: int32[B, L] -> the embeddings x: [B, L, D] in the compute dtype."""
        cfg = self.cfg
        x = quant.weight(self, "embed", cfg.dtype)[tokens]  # [B, L, D]
        if cfg.embed_scale:  # Gemma: sqrt(D), rounded to the compute dtype as transformers does
            x = x * jnp.asarray(cfg.embed_dim**0.5, cfg.dtype)
        return shard(x, ("batch", "seq", "embed"))

    def unembedding(self) -> jax.Array:
        """The output projection [D, V] in the compute dtype (the embedding transposed if tied),
        times muP's logit multiplier (llm.model.mup), so fused losses see it too."""
        cfg = self.cfg
        name = "embed" if cfg.tie_embeddings else "unembed"
        unembed = quant.trained_weight(
            self, name, cfg.dtype
        )  # config.quant: dequantized, fake-quantized
        unembed = unembed.T if cfg.tie_embeddings else unembed
        if (factor := mup.logit_multiplier(cfg)) != 1.0:
            unembed = unembed * jnp.asarray(factor, cfg.dtype)
        return unembed

    def _run_blocks(self, x, positions, segment_ids, cache, record_rms: bool = False):
        """Applies the blocks (a Python loop, or a scan over stacked parameters), with remat.
        Each block writes its keys and values into the stacked cache in place (`init_cache`)."""
        cfg = self.cfg
        block_fn = _block_fn(cfg, positions, segment_ids, record_rms)

        def layer_cache(kv, layer):  # the stacked k, v, and the rest of the cache (index, start)
            return None if cache is None else {**cache, **kv, "layer": layer}

        kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        if cfg.scan_layers:
            graphdef, state = nnx.split(self.blocks)

            def body(carry, layer):  # aux: {} (dense), MoE values and/or RMS, stacked by the scan
                x, kv = carry
                layer_state, i = layer
                x, new, layer_aux = block_fn(graphdef, layer_state, x, layer_cache(kv, i))
                return (x, None if new is None else {"k": new["k"], "v": new["v"]}), layer_aux

            layers = (state, jnp.arange(cfg.num_layers))
            (x, kv), stacked = jax.lax.scan(body, (x, kv), layers)
            aux = {i: jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(cfg.num_layers)}
        else:
            aux = {}
            for i, block in enumerate(self.blocks):
                graphdef, state = nnx.split(block)
                x, new, aux[i] = block_fn(graphdef, state, x, layer_cache(kv, i))
                kv = None if new is None else {"k": new["k"], "v": new["v"]}
        aux = {i: values for i, values in aux.items() if values}
        if cache is None:
            return x, None, aux
        return x, {**cache, **kv, "index": cache["index"] + x.shape[1]}, aux

    def update_expert_biases(self, loads: dict[int, jax.Array]) -> None:
        """One auxiliary-loss-free balancing step (llm.model.moe) of each MoE layer, from its load [E]."""
        if self.cfg.scan_layers:  # every layer MoE, biases stacked [layers, E]
            self.blocks.mlp.update_bias(jnp.stack([loads[i] for i in range(self.cfg.num_layers)]))
            return
        for i, load in loads.items():
            self.blocks[i].mlp.update_bias(load)


def _block_fn(cfg: ModelConfig, positions, segment_ids, record_rms: bool = False):
    """(block graphdef, block state, x, cache) -> a block's (x, cache, aux), with cfg.remat."""

    def block_fn(graphdef, block_state, x, block_cache):
        block = nnx.merge(graphdef, block_state)
        return block(x, positions, segment_ids, block_cache, record_rms)

    if cfg.remat == "none":
        return block_fn
    return jax.checkpoint(block_fn, policy=REMAT_POLICIES[cfg.remat], static_argnums=(0,))


def apply_stacked_blocks(
    cfg: ModelConfig, graphdef: nnx.GraphDef, state: nnx.State, x, positions, segment_ids
) -> tuple[jax.Array, dict]:
    """x: [B, L, D] through the blocks of `state`, parameters stacked [n, ...] (a run of
    consecutive layers of a scan_layers model: a pipeline stage, llm.parallel.pipeline) -> x and
    the blocks' auxiliary values stacked {name: [n, ...]} (MoE; {} for dense blocks)."""
    block_fn = _block_fn(cfg, positions, segment_ids)

    def body(x, layer_state):
        x, _, aux = block_fn(graphdef, layer_state, x, None)
        return x, aux

    return jax.lax.scan(body, x, state)


def init_cache(
    cfg: ModelConfig, batch: int, max_len: int, int8: bool = False
) -> dict[str, jax.Array]:
    """An empty KV cache: k, v: [layers, B, K, max_len, Dh] in the compute dtype, or int8 with a
    scale per token and head (llm.model.quant.init_kv); index: int32[] (or int32[B], a position
    per row, as llm.model.slot_decode's decode passes it). A cache may also hold
    start: int32[B], the first slot of each row that holds a token (rows of left-padded prompts,
    whose padding is never attended; llm.model.decode.generate). Positions are the
    second-minor axis so that attention reads each (row, head)'s keys as one contiguous block and
    a decode step writes one position of the stacked arrays in place (no copy of the cache)."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    k, v = (quant.init_kv(shape, cfg.dtype, int8) for _ in "kv")
    return {"k": k, "v": v, "index": jnp.array(0, jnp.int32)}


def unstack_layers(cfg: ModelConfig, cache: dict[str, Any]) -> dict[str, Any]:
    """`cache` with k and v as lists of each layer's [B, K, S, Dh], as a decode loop carries them:
    a step then reads a layer's keys and values in place, where slicing the stacked arrays copies
    them (on a CPU a fifth of a step at 8 rows). Scanned layers index the stack: unchanged."""
    if cfg.scan_layers:
        return cache
    split = lambda a: [jax.tree.map(lambda x, i=i: x[i], a) for i in range(cfg.num_layers)]
    return {**cache, "k": split(cache["k"]), "v": split(cache["v"])}
