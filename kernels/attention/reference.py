"""Plain-JAX reference attention ("xla" implementation), written to be read.

Computes in float32 and returns q.dtype. GQA/MQA reshape q heads into
[kv_heads, group] instead of repeating k/v. Rows that see no key give zero
output, log-sum-exp -inf, and finite (zero) gradients.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels.attention import masks as masks_lib
from kernels.attention.block_sizes import BlockSizes

_NEG = -1e30  # Finite "minus infinity" for masked scores (no inf - inf NaNs).


def attention_reference_with_lse(
    q: jax.Array,  # [batch, q_seq, heads, head_dim]
    k: jax.Array,  # [batch, kv_seq, kv_heads, head_dim]
    v: jax.Array,  # [batch, kv_seq, kv_heads, head_dim]
    *,
    mask: np.ndarray | jax.Array | None = None,  # bool [q_seq, kv_seq] or [batch, q_seq, kv_seq]
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,  # int32 [batch, seq]
    softmax_scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Returns (out [batch, q_seq, heads, head_dim] in q.dtype, lse f32 [batch, heads, q_seq]).

    lse is the natural-log sum of exp(scale * q.k) over visible keys (-inf for
    rows that see nothing). segment_ids: one array (q_seq == kv_seq) or a pair
    (q_segment_ids [batch, q_seq], kv_segment_ids [batch, kv_seq]).
    """
    batch, q_seq, heads, head_dim = q.shape
    kv_seq, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale

    # Scores laid out [b, kv_heads, q_seq, group, kv_seq]: the order the matmul produces them in.
    q5 = q.astype(jnp.float32).reshape(batch, q_seq, kv_heads, group, head_dim) * scale
    s = jnp.einsum("bqhgd,bkhd->bhqgk", q5, k.astype(jnp.float32))

    visible = jnp.ones((1, q_seq, kv_seq), bool)  # [batch or 1, q_seq, kv_seq]
    if mask is not None:  # one for every row, or one per row
        mask = jnp.asarray(mask, bool)
        visible = visible & (mask if mask.ndim == 3 else mask[None])
    if segment_ids is not None:
        q_ids, kv_ids = segment_ids if isinstance(segment_ids, tuple) else (segment_ids,) * 2
        visible = visible & (q_ids[:, :, None] == kv_ids[:, None, :])
    visible = visible[:, None, :, None, :]  # [batch or 1, 1, q_seq, 1, kv_seq]

    s = jnp.where(visible, s, _NEG)
    m = jax.lax.stop_gradient(s.max(axis=-1, keepdims=True))  # Cancels out exactly.
    p = jnp.where(visible, jnp.exp(s - m), 0.0)  # [b, kv_heads, q_seq, group, kv_seq]
    l = p.sum(axis=-1, keepdims=True)
    has_any = l > 0
    l_safe = jnp.where(has_any, l, 1.0)
    # Normalize after the p.v product: [q_seq, head_dim] divisions instead of [q_seq, kv_seq].
    out = jnp.einsum("bhqgk,bkhd->bhqgd", p, v.astype(jnp.float32)) / l_safe
    out = out.transpose(0, 2, 1, 3, 4).reshape(batch, q_seq, heads, head_dim).astype(q.dtype)
    lse = jnp.where(has_any, m + jnp.log(l_safe), -jnp.inf)[..., 0]  # [b, kv_heads, q_seq, group]
    lse = lse.transpose(0, 1, 3, 2)
    return out, lse.reshape(batch, heads, q_seq)


def attention_reference(q, k, v, *, mask=None, segment_ids=None, softmax_scale=None) -> jax.Array:
    """`attention_reference_with_lse` without the lse."""
    return attention_reference_with_lse(
        q, k, v, mask=mask, segment_ids=segment_ids, softmax_scale=softmax_scale
    )[0]


# Backend interface (registered as implementation "xla").

FEATURES = ("return_lse", "q_offset", "kv_segment_ids")  # optional arguments (see api.py)


def unsupported_reason(
    q, k, v, *, mask: masks_lib.Mask | None, segment_ids, block_sizes: BlockSizes | None
) -> str | None:
    del q, k, v, mask, segment_ids, block_sizes
    return None  # Runs everywhere.


def attention(
    q,
    k,
    v,
    *,
    mask: masks_lib.Mask | None,
    segment_ids,
    softmax_scale: float,
    block_sizes: BlockSizes | None,
    q_offset: int | jax.Array | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    del block_sizes  # No blocking.
    q_seq, kv_seq = q.shape[1], k.shape[1]
    if mask is None:
        dense = None
    elif q_offset is None:
        dense = mask.dense(q_seq, kv_seq)
    else:  # shifted positions, possibly traced: the elementwise predicate on device
        q_pos = q_offset + jnp.arange(q_seq, dtype=jnp.int32)[:, None]
        dense = mask.predicate(q_pos, jnp.arange(kv_seq, dtype=jnp.int32)[None, :])
        dense = jnp.broadcast_to(dense, (q_seq, kv_seq))
    out, lse = attention_reference_with_lse(
        q, k, v, mask=dense, segment_ids=segment_ids, softmax_scale=softmax_scale
    )
    return (out, lse) if return_lse else out
