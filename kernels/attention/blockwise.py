"""Block-skipping attention in plain JAX for the XLA backends ("xla_blockwise" implementation).

The queries are cut into blocks of block_q rows and the keys into blocks of block_kv columns.
Each query block attends only to the key blocks its mask leaves non-empty: the static visit
lists of `mask_info`, the same structure the Pallas kernels skip blocks with. So a causal
attention computes about half the scores and a sliding window a band of them; the mask
predicate is applied only in query blocks that visit a PARTIAL block. A query block's visited
keys are gathered into one key set and attended at once by the reference
(`attention_reference_with_lse`: exact softmax in float32, GQA, segment ids, empty rows), so
no online softmax is needed: one matmul per query block rather than one per key block (fewer,
larger ops for XLA; not measured against an online-softmax loop), holding block_q x (visited
keys) scores at once, never q_seq x kv_seq.

The backward is autodiff of this forward: per query block it keeps that block's probabilities,
so the residuals are the visited score area (less than the reference's full matrix; compiled
temp memory in kernels/BENCHMARKS.md). The per-block loop is unrolled at trace time, so compile
time grows with the number of query blocks.
Segment ids are dynamic and applied elementwise; only the mask's static structure is skipped.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from kernels.attention import masks as masks_lib
from kernels.attention.block_sizes import BlockSizes, default_block_sizes
from kernels.attention.mask_info import PARTIAL, mask_info
from kernels.attention.reference import attention_reference_with_lse

FEATURES = ("return_lse", "kv_segment_ids")  # optional arguments (see api.py); q_offset is not
# supported: a traced offset leaves the block structure unknown at trace time.


def block_shape(
    q: jax.Array, k: jax.Array, block_sizes: BlockSizes | None, *, log: bool = False
) -> tuple[int, int]:
    """(block_q, block_kv): the forward block sizes (default: the backend's), each clamped to
    its sequence length (one block); with `log`, a clamp of a requested size is logged."""
    bs = block_sizes or default_block_sizes(jax.default_backend(), q.shape[-1], q.dtype)
    sizes = []
    for name, block, seq in (
        ("block_q", bs.block_q, q.shape[1]),
        ("block_kv", bs.block_kv, k.shape[1]),
    ):
        if block > seq:
            if log:
                logging.getLogger(__name__).log(
                    logging.WARNING if block_sizes else logging.INFO,
                    "xla_blockwise: %s=%d exceeds the sequence length %d; using one block of %d",
                    name, block, seq, seq,
                )  # fmt: skip
            block = seq
        sizes.append(block)
    return sizes[0], sizes[1]


def _spans(blocks: np.ndarray, block: int, seq: int) -> list[tuple[int, int]]:
    """Sorted block indices -> [start, stop) position ranges, adjacent blocks merged."""
    spans: list[tuple[int, int]] = []
    for j in blocks.tolist():
        start, stop = j * block, min((j + 1) * block, seq)
        if spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], stop)
        else:
            spans.append((start, stop))
    return spans


def _gather(x: jax.Array, spans: list[tuple[int, int]]) -> jax.Array:
    """x[:, positions in spans] along axis 1 (static slices)."""
    parts = [x[:, start:stop] for start, stop in spans]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def blockwise_attention(
    q: jax.Array,  # [batch, q_seq, heads, head_dim]
    k: jax.Array,  # [batch, kv_seq, kv_heads, head_dim]
    v: jax.Array,  # [batch, kv_seq, kv_heads, head_dim]
    *,
    mask: masks_lib.Mask | None,
    segment_ids: tuple[jax.Array, jax.Array] | None,  # int [batch, q_seq], [batch, kv_seq]
    softmax_scale: float,
    block_q: int,
    block_kv: int,
) -> tuple[jax.Array, jax.Array]:
    """(out [batch, q_seq, heads, head_dim] in q.dtype, lse f32 [batch, heads, q_seq])."""
    batch, q_seq, heads, _ = q.shape
    kv_seq = k.shape[1]
    info = mask_info(mask, q_seq, kv_seq, block_q, block_kv)
    outs, lses = [], []
    for i in range(info.num_q_blocks):
        start, stop = i * block_q, min((i + 1) * block_q, q_seq)
        qb = q[:, start:stop]  # [batch, rows, heads, head_dim]
        visits = int(info.num_kv_visits[i])
        if visits == 0:  # the whole query block sees no key
            outs.append(jnp.zeros_like(qb))
            lses.append(jnp.full((batch, heads, stop - start), -jnp.inf, jnp.float32))
            continue
        spans = _spans(info.kv_block_indices[i, :visits], block_kv, kv_seq)
        dense = None  # bool [rows, cols]: only where a visited block is partly masked
        if mask is not None and (info.kv_block_kinds[i, :visits] == PARTIAL).any():
            q_pos = np.arange(start, stop, dtype=np.int32)[:, None] + np.int32(info.q_offset)
            k_pos = np.concatenate([np.arange(a, b, dtype=np.int32) for a, b in spans])[None]
            dense = mask.predicate(jnp.asarray(q_pos), jnp.asarray(k_pos))
            dense = jnp.broadcast_to(dense, (stop - start, k_pos.shape[1]))
        ids = None
        if segment_ids is not None:
            ids = (segment_ids[0][:, start:stop], _gather(segment_ids[1], spans))
        out, lse = attention_reference_with_lse(
            qb,
            _gather(k, spans),
            _gather(v, spans),
            mask=dense,
            segment_ids=ids,
            softmax_scale=softmax_scale,
        )
        outs.append(out)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)


# Backend interface (registered as implementation "xla_blockwise").


def unsupported_reason(
    q, k, v, *, mask: masks_lib.Mask | None, segment_ids, block_sizes: BlockSizes | None
) -> str | None:
    del v, segment_ids
    block_q, block_kv = block_shape(q, k, block_sizes)
    if mask is not None and (err := mask.kernel_block_error(block_q, block_kv)) is not None:
        return err
    return None


def attention(
    q,
    k,
    v,
    *,
    mask: masks_lib.Mask | None,
    segment_ids,
    softmax_scale: float,
    block_sizes: BlockSizes | None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    block_q, block_kv = block_shape(q, k, block_sizes, log=True)
    if segment_ids is not None and not isinstance(segment_ids, tuple):
        segment_ids = (segment_ids, segment_ids)
    out, lse = blockwise_attention(
        q,
        k,
        v,
        mask=mask,
        segment_ids=segment_ids,
        softmax_scale=softmax_scale,
        block_q=block_q,
        block_kv=block_kv,
    )
    return (out, lse) if return_lse else out
