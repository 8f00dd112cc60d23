"""Native Sparse Attention (Yuan et al. 2025): learned, content-dependent sparse attention.

Each query attends through three branches whose outputs are mixed by per-head sigmoid gates
computed from the layer input:

  (a) compressed: every block of `block` keys/values is compressed to one key/value by a learned
      position-dependent linear map (initialized to mean pooling); a query sees the compressed
      blocks that lie entirely in its past (and in its document).
  (b) selected: the compressed attention probabilities, summed over the query heads of a kv group
      (one selection per GQA group, as NSA does), rank the past blocks; each query token attends
      at full resolution to the tokens of its top `num_selected` blocks plus its own block
      (causally). Selection is a top_k: gradients flow through the attention over the selected
      tokens and through the compressed branch, not through the choice itself.
  (c) window: causal sliding-window attention over the last `window` tokens (kernels.attention).

Selection is per query token, which keeps the layer causal (a per-query-block selection would let
later tokens of a block pick the blocks an earlier token sees). Packed documents (segment_ids)
are isolated: a compressed block is visible only if all its tokens are in the query's document,
and selected/window keys are masked to the query's document.

`sparse_attention` is the efficient plain-JAX path (gathers the selected blocks per query token);
`sparse_attention_reference` builds the same layer from dense [L, L] boolean masks, for tests.
Shape letters as in llm.model.layers, plus N blocks per sequence (L padded to a multiple of `block`),
G = H // K query heads per kv head, S = num_selected + 1 blocks attended per query.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels
from llm.errors import is_int
from llm.model import patterns
from llm.model.attention import Attention
from llm.model.config import ModelConfig
from llm.model.layers import dense, linear, param
from llm.parallel.partitioning import shard

_NEG = -1e30  # finite "minus infinity" for masked scores (no inf - inf NaNs)
BRANCHES = ("compressed", "selected", "window")


def validate_hyperparameters(block: int, num_selected: int, window: int) -> None:
    """Raises ValueError naming the first bad hyperparameter, its value and the fix (the minimums
    are the config fields' own, llm.model.patterns.MINIMUMS)."""
    for name, value, field, meaning in (
        ("block", block, "attention_nsa_block", " (tokens per compressed/selected block)"),
        ("num_selected", num_selected, "attention_nsa_selected", ""),
        ("window", window, "attention_window", " (sliding-window length, the query included)"),
    ):
        minimum = patterns.MINIMUMS[field]
        if not is_int(value) or value < minimum:
            raise ValueError(
                f"NativeSparseAttention {name}={value!r} must be an int >= {minimum}{meaning}"
            )


def nsa_attention_pairs(seq_len: int, block: int, num_selected: int, window: int) -> int:
    """Query-key pairs the layer scores for one unpacked sequence, summed over its three branches.

    Per head; multiply by 4 * head_dim * heads for the forward FLOPs of the score and value
    matmuls.
    """
    validate_hyperparameters(block, num_selected, window)
    t = np.arange(seq_len, dtype=np.int64)
    return int(patterns.nsa_visible(t, block, num_selected, window).sum())


# Pieces shared by the efficient path and the reference.


def _pad_to_blocks(x: jax.Array, block: int) -> jax.Array:
    """Pads axis 1 (the sequence) with zeros up to a multiple of `block`."""
    pad = -x.shape[1] % block
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def compress(x: jax.Array, w: jax.Array) -> jax.Array:
    """One key (or value) per block: x: [B, L, K, Dh], w: [block, Dh, Dh] -> [B, N, K, Dh].

    compressed[n] = sum_j x[n * block + j] @ w[j]: a linear map of the block that knows each
    token's place in it. A trailing partial block is zero-padded (it is never visible anyway).
    """
    block = w.shape[0]
    xb = _pad_to_blocks(x, block).astype(jnp.float32)
    b, lp, k, dh = xb.shape
    xb = xb.reshape(b, lp // block, block, k, dh)  # [B, N, block, K, Dh]
    return jnp.einsum("bnjkd,jde->bnke", xb, w.astype(jnp.float32))


def combine_branches(outs: tuple[jax.Array, ...], gates: jax.Array) -> jax.Array:
    """sum_i gates[..., i] * outs[i]; outs: 3 x [B, L, H, Dh], gates: [B, L, H, 3] in (0, 1)."""
    return sum(gates[..., i, None] * o.astype(jnp.float32) for i, o in enumerate(outs))


# The efficient path.


def compressed_visibility(segment_ids: jax.Array, block: int) -> jax.Array:
    """bool [B, L, N]: compressed block n is entirely in the past and the document of query t."""
    seg = _pad_to_blocks(segment_ids, block)
    (b, lp), seq_len = seg.shape, segment_ids.shape[1]
    blocks = seg.reshape(b, lp // block, block)  # [B, N, block]
    uniform = (blocks == blocks[..., :1]).all(-1)  # [B, N]: one document
    t = jnp.arange(seq_len)[:, None]
    ends = (jnp.arange(lp // block) + 1) * block - 1  # [N] last position of each block
    past = ends[None, :] <= t  # [L, N]; excludes the zero padding too
    same_doc = blocks[:, None, :, 0] == segment_ids[:, :, None]  # [B, L, N]
    return past[None] & uniform[:, None, :] & same_doc


def compressed_attention(
    q: jax.Array, kc: jax.Array, vc: jax.Array, visible: jax.Array, scale: float
) -> tuple[jax.Array, jax.Array]:
    """Attention over compressed blocks. q: [B, L, H, Dh]; kc, vc: [B, N, K, Dh];
    visible: [B, L, N]. Returns (out [B, L, H, Dh] f32, importance [B, K, L, N]: the attention
    probabilities summed over the G query heads of each kv head)."""
    b, l, h, dh = q.shape
    kv = kc.shape[2]
    q5 = q.astype(jnp.float32).reshape(b, l, kv, h // kv, dh) * scale
    s = jnp.einsum("blkgd,bnkd->bklgn", q5, kc)  # [B, K, L, G, N]
    vis = visible[:, None, :, None, :]
    s = jnp.where(vis, s, _NEG)
    p = jnp.where(vis, jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True))), 0.0)
    denom = p.sum(-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)  # rows that see no block give zeros
    out = jnp.einsum("bklgn,bnkd->blkgd", p, vc).reshape(b, l, h, dh)
    return out, p.sum(3)


def select_blocks(
    importance: jax.Array, visible: jax.Array, num_selected: int, block: int
) -> tuple[jax.Array, jax.Array]:
    """Top `num_selected` past blocks per (kv head, query token), then the query's own block.

    importance: [B, K, L, N]; visible: [B, L, N] (compressed visibility). A past block is a
    candidate if it is visible and not the query's own block. Returns (block ids int32
    [B, K, L, S], valid bool [B, K, L, S]); invalid slots (fewer candidates than num_selected)
    must be masked by the caller.
    """
    b, kv, l, n = importance.shape
    own = jnp.arange(l) // block  # [L]
    candidate = visible & (jnp.arange(n)[None, :] < own[:, None])[None]  # [B, L, N]
    score = jnp.where(candidate[:, None], jax.lax.stop_gradient(importance), -jnp.inf)
    top, ids = jax.lax.top_k(score, min(num_selected, n))  # [B, K, L, n_sel]
    ids = jnp.concatenate([ids, jnp.broadcast_to(own[:, None], (b, kv, l, 1))], -1)
    valid = jnp.concatenate([jnp.isfinite(top), jnp.ones((b, kv, l, 1), bool)], -1)
    return ids.astype(jnp.int32), valid


def selected_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    ids: jax.Array,
    valid: jax.Array,
    segment_ids: jax.Array,
    block: int,
    scale: float,
) -> jax.Array:
    """Full-resolution attention over the tokens of the selected blocks of each query token.

    q: [B, L, H, Dh]; k, v: [B, L, K, Dh]; ids, valid: [B, K, L, S] from `select_blocks`;
    segment_ids: [B, L]. Key j of a selected block is seen if valid, causal and in the query's
    document. Returns [B, L, H, Dh] f32. Holds the gathered keys and values, [B, K, L, S, block,
    Dh] each, in memory: S * block / G times the size of q (kernels.nsa_selected avoids it).
    """
    b, l, h, dh = q.shape
    kv = k.shape[2]
    lp = l + (-l % block)

    def blocks(x):  # [B, L, K, Dh] -> [B, K, N, block, Dh]
        x = _pad_to_blocks(x, block).astype(jnp.float32)
        return x.reshape(b, lp // block, block, kv, dh).transpose(0, 3, 1, 2, 4)

    gather = jax.vmap(jax.vmap(lambda xb, i: xb[i]))  # [N, block, Dh], [L, S] -> [L, S, block, Dh]
    ks, vs = gather(blocks(k), ids), gather(blocks(v), ids)  # [B, K, L, S, block, Dh]
    seg_blocks = _pad_to_blocks(segment_ids, block).reshape(b, lp // block, block)
    key_seg = seg_blocks[jnp.arange(b)[:, None, None, None], ids]  # [B, K, L, S, block]
    key_pos = ids[..., None] * block + jnp.arange(block)  # [B, K, L, S, block]
    t = jnp.arange(l)[:, None, None]
    visible = (
        valid[..., None] & (key_pos <= t) & (key_seg == segment_ids[:, None, :, None, None])
    )  # [B, K, L, S, block]
    q5 = q.astype(jnp.float32).reshape(b, l, kv, h // kv, dh) * scale
    s = jnp.einsum("blkgd,bklsjd->bklgsj", q5, ks)  # [B, K, L, G, S, block]
    vis = visible[:, :, :, None]
    s = jnp.where(vis, s, _NEG)
    m = jax.lax.stop_gradient(s.max((-2, -1), keepdims=True))
    p = jnp.where(vis, jnp.exp(s - m), 0.0)
    p = p / p.sum((-2, -1), keepdims=True)  # the query itself is always visible
    return jnp.einsum("bklgsj,bklsjd->blkgd", p, vs).reshape(b, l, h, dh)


def sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gates: jax.Array,
    w_ck: jax.Array,
    w_cv: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    num_selected: int,
    window: int,
    implementation: str | None = None,
) -> jax.Array:
    """The NSA layer's attention. q: [B, L, H, Dh]; k, v: [B, L, K, Dh] (after RoPE);
    gates: [B, L, H, 3] in (0, 1); w_ck, w_cv: [block, Dh, Dh]; segment_ids: int [B, L] or None.
    Returns [B, L, H, Dh] in q.dtype."""
    block = w_ck.shape[0]
    scale = 1.0 / math.sqrt(q.shape[-1])
    seg = jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
    visible = compressed_visibility(seg, block)  # [B, L, N]
    kc, vc = compress(k, w_ck), compress(v, w_cv)  # [B, N, K, Dh]
    out_cmp, importance = compressed_attention(q, kc, vc, visible, scale)
    ids, valid = select_blocks(importance, visible, num_selected, block)
    out_sel = selected_attention(q, k, v, ids, valid, seg, block, scale)
    out_win = kernels.attention(
        q,
        k,
        v,
        causal=True,
        sliding_window=window,
        segment_ids=segment_ids,
        implementation=implementation,
    )
    return combine_branches((out_cmp, out_sel, out_win), gates).astype(q.dtype)


# The reference: the same layer from dense [L, L] masks.


def dense_masked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, scale: float
) -> tuple[jax.Array, jax.Array]:
    """q: [B, L, H, Dh]; k, v: [B, M, K, Dh]; visible: bool [B, H, L, M] -> (out, probs)."""
    g = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x.astype(jnp.float32), g, axis=2) for x in (k, v))
    s = jnp.einsum("blhd,bmhd->bhlm", q.astype(jnp.float32) * scale, k)
    s = jnp.where(visible, s, -jnp.inf)
    p = jnp.where(visible, jax.nn.softmax(jnp.where(visible.any(-1, keepdims=True), s, 0), -1), 0)
    return jnp.einsum("bhlm,bmhd->blhd", p, v), p


def _allowed(segment_ids: jax.Array) -> jax.Array:
    """bool [B, L, L]: key s is causal (s <= t) and in the document of query t."""
    l = segment_ids.shape[1]
    causal = np.arange(l)[None, :] <= np.arange(l)[:, None]
    return causal & (segment_ids[:, :, None] == segment_ids[:, None, :])


def _in_block(seq_len: int, block: int) -> np.ndarray:
    """bool [N, L]: token s lies in block n."""
    return np.arange(seq_len)[None, :] // block == np.arange(-(-seq_len // block))[:, None]


def reference_compressed_mask(segment_ids: jax.Array, block: int) -> jax.Array:
    """bool [B, L, N]: block n is complete and every one of its tokens is allowed to query t."""
    l = segment_ids.shape[1]
    in_block = _in_block(l, block)
    complete = (np.arange(in_block.shape[0]) + 1) * block <= l
    return complete & jnp.all(_allowed(segment_ids)[:, :, None, :] | ~in_block, -1)


def reference_selected_mask(
    importance: jax.Array, segment_ids: jax.Array, num_selected: int, block: int
) -> jax.Array:
    """bool [B, K, L, L]: the allowed tokens of the num_selected most important visible past
    blocks (ranked by a stable sort of importance [B, K, L, N]) and of the query's own block."""
    l = segment_ids.shape[1]
    in_block = _in_block(l, block)
    n = in_block.shape[0]
    own = np.arange(l)[:, None] // block == np.arange(n)[None, :]  # [L, N]
    past = np.arange(l)[:, None] // block > np.arange(n)[None, :]
    candidate = reference_compressed_mask(segment_ids, block)[:, None] & past
    score = jnp.where(candidate, jax.lax.stop_gradient(importance), -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-score, axis=-1, stable=True), axis=-1, stable=True)
    chosen = ((rank < num_selected) & jnp.isfinite(score)) | own  # [B, K, L, N]
    tokens = jnp.einsum("bkln,nm->bklm", chosen.astype(jnp.int32), in_block.astype(np.int32))
    return (tokens > 0) & _allowed(segment_ids)[:, None]


def reference_window_mask(segment_ids: jax.Array, window: int) -> jax.Array:
    """bool [B, L, L]: the last `window` allowed keys of each query (itself included)."""
    l = segment_ids.shape[1]
    recent = np.arange(l)[:, None] - np.arange(l)[None, :] < window
    return _allowed(segment_ids) & recent


def sparse_attention_reference(
    q, k, v, gates, w_ck, w_cv, segment_ids=None, *, num_selected: int, window: int
) -> jax.Array:
    """`sparse_attention` from dense masks: each branch is full attention with a boolean mask."""
    b, l, h, dh = q.shape
    kv, g, block = k.shape[2], h // k.shape[2], w_ck.shape[0]
    scale = 1.0 / math.sqrt(dh)
    seg = jnp.zeros((b, l), jnp.int32) if segment_ids is None else segment_ids

    def heads(mask):  # [B, L, M] or [B, K, L, M] -> [B, H, L, M]
        return jnp.repeat(mask, g, axis=1) if mask.ndim == 4 else jnp.repeat(mask[:, None], h, 1)

    kc, vc = compress(k, w_ck), compress(v, w_cv)
    out_cmp, p = dense_masked_attention(
        q, kc, vc, heads(reference_compressed_mask(seg, block)), scale
    )
    importance = p.reshape(b, kv, g, l, -1).sum(2)  # [B, K, L, N]
    sel_mask = reference_selected_mask(importance, seg, num_selected, block)
    out_sel, _ = dense_masked_attention(q, k, v, heads(sel_mask), scale)
    out_win, _ = dense_masked_attention(q, k, v, heads(reference_window_mask(seg, window)), scale)
    return combine_branches((out_cmp, out_sel, out_win), gates).astype(q.dtype)


# The layer.


def _mean_pool_init(key, shape, dtype):
    """[block, Dh, Dh] identity / block: the compression starts as mean pooling."""
    del key
    return jnp.broadcast_to(jnp.eye(shape[1], dtype=dtype) / shape[0], shape)


class NativeSparseAttention(Attention):
    """Drop-in for llm.model.Attention (same wq, wk, wv, wo) with NSA's three gated branches.

    Hyperparameters (constructor keywords; None takes cfg's attention_nsa_block,
    attention_nsa_selected and attention_window):
      block: tokens per block, for both the compressed keys and the selected blocks (NSA: 64).
      num_selected: past blocks each query token selects besides its own (NSA: 16 incl. own).
      window: sliding-window length, the query itself included (NSA: 512).
    Extra parameters: gate [D, H, 3] (sigmoid gates from the layer input, one per head and
    branch), compress_k and compress_v [block, Dh, Dh] (position-dependent linear compression,
    initialized to mean pooling). config.quant's "attention" target quantizes wq, wk, wv and wo
    as Attention's (QAT and llm.quantize); the gates and compressions stay float, as routers do.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layer: int | None = None,
        *,
        block: int | None = None,
        num_selected: int | None = None,
        window: int | None = None,
        rngs: nnx.Rngs,
    ):
        block = cfg.attention_nsa_block if block is None else block
        num_selected = cfg.attention_nsa_selected if num_selected is None else num_selected
        window = cfg.attention_window if window is None else window
        validate_hyperparameters(block, num_selected, window)
        super().__init__(cfg, layer, rngs=rngs)
        self.block, self.num_selected, self.window = block, num_selected, window
        d, h, dh, pdt = cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.param_dtype
        init = nnx.initializers.normal(0.02)
        self.gate = param(rngs, init, (d, h, 3), ("embed", "heads", "nsa_branch"), pdt)
        names = ("nsa_block", "head_dim", "nsa_head_dim")
        self.compress_k = param(rngs, _mean_pool_init, (block, dh, dh), names, pdt)
        self.compress_v = param(rngs, _mean_pool_init, (block, dh, dh), names, pdt)

    def __call__(self, x, positions, segment_ids, cache: dict[str, jax.Array] | None):
        """x: [B, L, D] -> ([B, L, D], None). Training forward only: cache must be None."""
        if cache is not None:
            raise NotImplementedError(
                "NativeSparseAttention has no KV-cache decoding yet (cache must be None): "
                "train with it, and sample from a model with dense attention layers."
            )
        cfg, dt = self.cfg, self.cfg.dtype
        q, k, v = self.project(x, positions)
        gates = jax.nn.sigmoid(dense(x, self.gate[...].astype(dt)).astype(jnp.float32))
        gates = shard(gates, ("batch", "seq", "heads", "nsa_branch"))  # [B, L, H, 3]
        out = sparse_attention(
            q,
            k,
            v,
            gates,
            self.compress_k[...],
            self.compress_v[...],
            segment_ids,
            num_selected=self.num_selected,
            window=self.window,
            implementation=cfg.attention_impl,
        )
        out = shard(out, ("batch", "seq", "heads", "head_dim"))
        return linear(self, "wo", out, in_dims=2), None  # [B, L, D] (config.quant, LoRA)
