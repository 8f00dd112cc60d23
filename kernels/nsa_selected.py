"""Pallas (Triton-style) forward kernel for the selected-block branch of native sparse attention.

Grid (batch, query token, kv head), as in NSA's kernel: one program loads the G query heads of
a kv group for one token (they share the selection), then loops over that token's S selected
key blocks, reading each block of `block` keys/values at its own offset, with an online softmax
in float32. Keys are masked to positions <= the query's and to the query's segment; slots whose
`valid` is 0 are skipped. Forward only (no VJP yet); runs on CPU with interpret=True.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.attention.pallas_gpu_common import NEG, dot_nn, dot_nt


def _kernel(ids_ref, valid_ref, q_ref, k_ref, v_ref, seg_ref, o_ref, *, block: int, scale: float):
    """ids_ref, valid_ref: int32 [S]; q_ref: [G, Dh]; k_ref, v_ref: [Lp, Dh]; seg_ref: [Lp];
    o_ref: [G, Dh]."""
    t = pl.program_id(1)
    q = q_ref[...].astype(jnp.float32) * scale
    q_segment = seg_ref[pl.ds(t, 1)]  # [1]

    def body(slot, carry):
        acc, m, l = carry
        start = pl.multiple_of(ids_ref[slot] * block, block)
        keys = pl.ds(start, block)
        s = dot_nt(q, k_ref[keys, :].astype(jnp.float32))  # [G, block]
        positions = start + jax.lax.broadcasted_iota(jnp.int32, (block,), 0)
        vis = (valid_ref[slot] != 0) & (positions <= t) & (seg_ref[keys] == q_segment)
        s = jnp.where(vis[None, :], s, NEG)
        m_next = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(vis[None, :], jnp.exp(s - m_next[:, None]), 0.0)
        correction = jnp.exp(m - m_next)
        acc = acc * correction[:, None] + dot_nn(p, v_ref[keys, :].astype(jnp.float32))
        return acc, m_next, l * correction + p.sum(axis=1)

    group, head_dim = q.shape
    init = (
        jnp.zeros((group, head_dim), jnp.float32),
        jnp.full((group,), NEG, jnp.float32),
        jnp.zeros((group,), jnp.float32),
    )
    acc, _, l = jax.lax.fori_loop(0, ids_ref.shape[0], body, init)
    o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)


def selected_attention_pallas(
    q: jax.Array,  # [batch, seq, heads, head_dim]
    k: jax.Array,  # [batch, seq, kv_heads, head_dim]
    v: jax.Array,  # [batch, seq, kv_heads, head_dim]
    ids: jax.Array,  # int [batch, kv_heads, seq, slots]: selected block of each slot
    valid: jax.Array,  # bool [batch, kv_heads, seq, slots]
    segment_ids: jax.Array,  # int [batch, seq]
    *,
    block: int,
    scale: float,
    interpret: bool = False,
) -> jax.Array:
    """Attention of each query token over the tokens of its selected key blocks (causal, within
    its segment). Returns [batch, seq, heads, head_dim] in q.dtype; a row that sees no key is 0."""
    batch, seq, heads, head_dim = q.shape
    kv_heads, slots = k.shape[2], ids.shape[-1]
    group = heads // kv_heads
    pad = -seq % block

    def padded(x):
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

    k, v, segment_ids = padded(k), padded(v), padded(segment_ids.astype(jnp.int32))
    seq_pad = seq + pad
    slot_spec = pl.BlockSpec((None, None, None, slots), lambda b, t, h: (b, h, t, 0))
    q_spec = pl.BlockSpec((None, None, group, head_dim), lambda b, t, h: (b, t, h, 0))
    kv_spec = pl.BlockSpec((None, seq_pad, None, head_dim), lambda b, t, h: (b, 0, h, 0))
    seg_spec = pl.BlockSpec((None, seq_pad), lambda b, t, h: (b, 0))
    return pl.pallas_call(
        functools.partial(_kernel, block=block, scale=scale),
        grid=(batch, seq, kv_heads),
        in_specs=[slot_spec, slot_spec, q_spec, kv_spec, kv_spec, seg_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
        name="nsa_selected_fwd",
    )(ids.astype(jnp.int32), valid.astype(jnp.int32), q, k, v, segment_ids)
