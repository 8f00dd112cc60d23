"""Flash-attention forward kernel (Pallas Triton), block-sparse over MaskInfo.

Grid (q blocks, batch, heads). Each program keeps its q block [block_q, D]
and loops over the kv blocks listed for it (PARTIAL ones with elementwise
masking, then FULL ones without), with an online softmax in float32. Empty
kv blocks are never loaded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.attention import pallas_gpu_common as common


def _kernel(
    indices_ref,  # int32[num_q_blocks, width]
    counts_ref,  # int32[num_q_blocks, 2]
    q_ref,  # [block_q, D]
    k_ref,  # [kv_pad, D]
    v_ref,  # [kv_pad, D]
    *refs,  # (q_segments [block_q], kv_segments [kv_pad])?, out [block_q, D], lse2 [block_q]
    cfg: common.Config,
    block_q: int,
    block_kv: int,
):
    if len(refs) == 4:
        q_seg_ref, kv_seg_ref, o_ref, lse_ref = refs
        q_segments = q_seg_ref[...]
    else:
        (o_ref, lse_ref), kv_seg_ref, q_segments = refs, None, None
    qi = pl.program_id(0)
    q = q_ref[...]

    def body(t, carry, partial: bool):
        acc, m, l = carry
        kv_start = pl.multiple_of(indices_ref[qi, t] * block_kv, block_kv)
        kv_slice = pl.ds(kv_start, block_kv)
        s = common.dot_nt(q, k_ref[kv_slice, :]) * cfg.scale2  # [block_q, block_kv]
        kv_segments = None if kv_seg_ref is None else kv_seg_ref[kv_slice]
        vis = common.visible(
            cfg, qi * block_q, kv_start, block_q, block_kv, q_segments, kv_segments, partial
        )
        if vis is not None:
            s = jnp.where(vis, s, common.NEG)
        m_next = jnp.maximum(m, s.max(axis=1))
        correction = jnp.exp2(m - m_next)
        p = jnp.exp2(s - m_next[:, None])
        if vis is not None:
            p = jnp.where(vis, p, 0.0)  # Rows masked so far stay at l == 0.
        v = v_ref[kv_slice, :]
        acc = acc * correction[:, None] + common.dot_nn(p.astype(v.dtype), v)
        return acc, m_next, l * correction + p.sum(axis=1)

    head_dim = q.shape[-1]
    init = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    num_partial, num_total = counts_ref[qi, 0], counts_ref[qi, 1]
    carry = jax.lax.fori_loop(0, num_partial, functools.partial(body, partial=True), init)
    acc, m, l = jax.lax.fori_loop(
        num_partial, num_total, functools.partial(body, partial=False), carry
    )
    empty = l == 0.0  # Saw no key: output 0; lse2 = +inf makes backward probabilities 0.
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def forward(
    cfg: common.Config,
    q: jax.Array,  # [batch, q_pad, heads, D]
    k: jax.Array,  # [batch, kv_pad, kv_heads, D]
    v: jax.Array,  # [batch, kv_pad, kv_heads, D]
    q_segments: jax.Array | None,  # int32 [batch, q_pad]
    kv_segments: jax.Array | None,  # int32 [batch, kv_pad]
) -> tuple[jax.Array, jax.Array]:
    """Returns (out [batch, q_pad, heads, D] in q.dtype, lse2 f32 [batch, heads, q_pad])."""
    batch, q_pad, heads, head_dim = q.shape
    kv_pad, group = k.shape[1], heads // k.shape[2]
    block_q, block_kv = cfg.block_sizes.block_q, cfg.block_sizes.block_kv
    num_q_blocks = q_pad // block_q
    vis = common.forward_visits(cfg, block_q, block_kv, num_q_blocks)

    def whole(x):
        return pl.BlockSpec(x.shape, lambda i, b, h: (0,) * x.ndim)

    q_spec = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, kv_pad, None, head_dim), lambda i, b, h: (b, 0, h // group, 0))
    in_specs = [whole(vis.indices), whole(vis.counts), q_spec, kv_spec, kv_spec]
    args = [vis.indices, vis.counts, q, k, v]
    if q_segments is not None:
        in_specs += [
            pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
            pl.BlockSpec((None, kv_pad), lambda i, b, h: (b, 0)),
        ]
        args += [q_segments, kv_segments]
    return pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, block_q=block_q, block_kv=block_kv),
        grid=(num_q_blocks, batch, heads),
        in_specs=in_specs,
        out_specs=[q_spec, pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_pad), jnp.float32),
        ],
        compiler_params=cfg.compiler_params(head_dim),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(*args)
