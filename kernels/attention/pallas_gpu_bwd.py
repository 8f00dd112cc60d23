"""Flash-attention backward kernels (Pallas Triton), block-sparse over MaskInfo.

Probabilities are recomputed from the saved base-2 log-sum-exp:
p = exp2(s2 - lse2), ds = p * (do.v - delta) with delta = sum(do * out).

  dq kernel:  grid (q blocks, batch, heads), loops over the kv blocks listed
              for its q block; dq = scale * ds @ k.
  dkv kernel: grid (kv blocks, batch, kv_heads), loops over the query heads
              of its group and the q blocks listed for its kv block (the
              transposed MaskInfo); dk = scale * ds^T @ q, dv = p^T @ do,
              summed over the group (GQA) in registers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.attention import pallas_gpu_common as common


def _probs_and_ds(cfg, q, k, v, do, lse, delta, vis):
    """p, ds: float32 [block_q, block_kv] (ds without the softmax scale)."""
    s = common.dot_nt(q, k) * cfg.scale2
    if vis is not None:
        s = jnp.where(vis, s, common.NEG)
    p = jnp.exp2(s - lse[:, None])  # lse2 = +inf on rows that see nothing -> 0.
    return p, p * (common.dot_nt(do, v) - delta[:, None])


def _dq_kernel(
    indices_ref,  # int32[num_q_blocks, width]
    counts_ref,  # int32[num_q_blocks, 2]
    q_ref,  # [block_q, D]
    k_ref,  # [kv_pad, D]
    v_ref,  # [kv_pad, D]
    do_ref,  # [block_q, D]
    lse_ref,  # f32[block_q]
    delta_ref,  # f32[block_q]
    *refs,  # (q_segments [block_q], kv_segments [kv_pad])?, dq [block_q, D]
    cfg: common.Config,
    block_q: int,
    block_kv: int,
):
    if len(refs) == 3:
        q_seg_ref, kv_seg_ref, dq_ref = refs
        q_segments = q_seg_ref[...]
    else:
        (dq_ref,), kv_seg_ref, q_segments = refs, None, None
    qi = pl.program_id(0)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def body(t, dq, partial: bool):
        kv_start = pl.multiple_of(indices_ref[qi, t] * block_kv, block_kv)
        kv_slice = pl.ds(kv_start, block_kv)
        k = k_ref[kv_slice, :]
        kv_segments = None if kv_seg_ref is None else kv_seg_ref[kv_slice]
        vis = common.visible(
            cfg, qi * block_q, kv_start, block_q, block_kv, q_segments, kv_segments, partial
        )
        _, ds = _probs_and_ds(cfg, q, k, v_ref[kv_slice, :], do, lse, delta, vis)
        return dq + common.dot_nn(ds.astype(k.dtype), k)

    num_partial, num_total = counts_ref[qi, 0], counts_ref[qi, 1]
    dq = jnp.zeros(q.shape, jnp.float32)
    dq = jax.lax.fori_loop(0, num_partial, functools.partial(body, partial=True), dq)
    dq = jax.lax.fori_loop(num_partial, num_total, functools.partial(body, partial=False), dq)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    indices_ref,  # int32[num_kv_blocks, width]
    counts_ref,  # int32[num_kv_blocks, 2]
    q_ref,  # [q_pad, group, D]
    k_ref,  # [block_kv, D]
    v_ref,  # [block_kv, D]
    do_ref,  # [q_pad, group, D]
    lse_ref,  # f32[group, q_pad]
    delta_ref,  # f32[group, q_pad]
    *refs,  # (q_segments [q_pad], kv_segments [block_kv])?, dk, dv [block_kv, D]
    cfg: common.Config,
    block_q: int,
    block_kv: int,
    group: int,
):
    if len(refs) == 4:
        q_seg_ref, kv_seg_ref, dk_ref, dv_ref = refs
        kv_segments = kv_seg_ref[...]
    else:
        (dk_ref, dv_ref), q_seg_ref, kv_segments = refs, None, None
    kj = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]

    def body(t, carry, g, partial: bool):
        dk, dv = carry
        q_start = pl.multiple_of(indices_ref[kj, t] * block_q, block_q)
        q_slice = pl.ds(q_start, block_q)
        q, do = q_ref[q_slice, g, :], do_ref[q_slice, g, :]
        q_segments = None if q_seg_ref is None else q_seg_ref[q_slice]
        vis = common.visible(
            cfg, q_start, kj * block_kv, block_q, block_kv, q_segments, kv_segments, partial
        )
        p, ds = _probs_and_ds(cfg, q, k, v, do, lse_ref[g, q_slice], delta_ref[g, q_slice], vis)
        dv = dv + common.dot_tn(p.astype(do.dtype), do)
        return dk + common.dot_tn(ds.astype(q.dtype), q), dv

    num_partial, num_total = counts_ref[kj, 0], counts_ref[kj, 1]

    def head(g, carry):
        carry = jax.lax.fori_loop(0, num_partial, functools.partial(body, g=g, partial=True), carry)
        return jax.lax.fori_loop(
            num_partial, num_total, functools.partial(body, g=g, partial=False), carry
        )

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, group, head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(
    cfg: common.Config,
    q: jax.Array,  # [batch, q_pad, heads, D]
    k: jax.Array,  # [batch, kv_pad, kv_heads, D]
    v: jax.Array,  # [batch, kv_pad, kv_heads, D]
    q_segments: jax.Array | None,  # int32 [batch, q_pad]
    kv_segments: jax.Array | None,  # int32 [batch, kv_pad]
    out: jax.Array,  # [batch, q_pad, heads, D]
    lse: jax.Array,  # f32 [batch, heads, q_pad], base 2
    do: jax.Array,  # [batch, q_pad, heads, D]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (dq, dk, dv) shaped and typed like q, k, v."""
    batch, q_pad, heads, head_dim = q.shape
    kv_pad, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    do = do.astype(q.dtype)
    delta = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32), do.astype(jnp.float32))
    segments = [] if q_segments is None else [q_segments, kv_segments]
    params = {"compiler_params": cfg.compiler_params(head_dim), "interpret": cfg.interpret}

    def whole(x):
        return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)

    # dq: grid (q blocks, batch, heads).
    bs = cfg.block_sizes
    block_q, block_kv = bs.block_q_dq, bs.block_kv_dq
    vis = common.forward_visits(cfg, block_q, block_kv, q_pad // block_q)
    q_spec = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, kv_pad, None, head_dim), lambda i, b, h: (b, 0, h // group, 0))
    row_spec = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
    seg_specs = [
        pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
        pl.BlockSpec((None, kv_pad), lambda i, b, h: (b, 0)),
    ]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, block_q=block_q, block_kv=block_kv),
        grid=(q_pad // block_q, batch, heads),
        in_specs=[whole(vis.indices), whole(vis.counts), q_spec, kv_spec, kv_spec, q_spec]
        + [row_spec, row_spec]
        + seg_specs[: len(segments)],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="flash_attention_dq",
        **params,
    )(vis.indices, vis.counts, q, k, v, do, lse, delta, *segments)

    # dk, dv: grid (kv blocks, batch, kv_heads); q heads h = kv_head * group + g.
    block_q, block_kv = bs.block_q_dkv, bs.block_kv_dkv
    vis = common.transposed_visits(cfg, block_q, block_kv, kv_pad // block_kv)
    q_spec = pl.BlockSpec((None, q_pad, group, head_dim), lambda j, b, h: (b, 0, h, 0))
    kv_spec = pl.BlockSpec((None, block_kv, None, head_dim), lambda j, b, h: (b, j, h, 0))
    row_spec = pl.BlockSpec((None, group, q_pad), lambda j, b, h: (b, h, 0))
    seg_specs = [
        pl.BlockSpec((None, q_pad), lambda j, b, h: (b, 0)),
        pl.BlockSpec((None, block_kv), lambda j, b, h: (b, j)),
    ]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, block_q=block_q, block_kv=block_kv, group=group),
        grid=(kv_pad // block_kv, batch, kv_heads),
        in_specs=[whole(vis.indices), whole(vis.counts), q_spec, kv_spec, kv_spec, q_spec]
        + [row_spec, row_spec]
        + seg_specs[: len(segments)],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        name="flash_attention_dkv",
        **params,
    )(vis.indices, vis.counts, q, k, v, do, lse, delta, *segments)
    return dq, dk, dv
