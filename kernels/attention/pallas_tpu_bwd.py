"""Mosaic TPU flash-attention backward: dq kernel and dk/dv kernel.

Both recompute probabilities p = exp(s - lse) from the forward lse (+inf for
rows that see nothing or padding, so p = 0 there) and use the precomputed
delta = rowsum(dout * out): ds = p * (dout @ v.T - delta).
dq: one program per (batch, head, q block), visiting the q block's kv list.
dk/dv: one program per (batch, kv head, kv block), visiting the q blocks of
the transposed list for each of the `group` query heads sharing the kv head
(so GQA sums over them in VMEM); scores are computed transposed, [bkv, bq].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.attention.mask_info import MaskInfo
from kernels.attention.pallas_tpu_fwd import (
    _NN,
    _NT,
    LANES,
    SUBLANES,
    Config,
    _col_ids,
    _flat,
    _keep,
    _params,
    _row_ids,
    _segment_inputs,
    _visit,
)


def _dq_kernel(idx_ref, kind_ref, num_ref, *refs, cfg: Config, bq: int, bkv: int, width: int):
    has_ids = len(refs) == 10
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    q_ids_ref, kv_ids_ref = refs[6:8] if has_ids else (None, None)
    dq_ref, acc_scr = refs[-2:]
    i, j = pl.program_id(2), pl.program_id(3)
    slot = i * width + j

    @pl.when(j == 0)
    def _init():
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def body(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.softmax_scale
        p = jnp.exp(s - lse_ref[:, :1])  # [bq, bkv]
        keep = _keep(
            cfg,
            i * bq,
            idx_ref[slot] * bkv,
            s.shape,
            0,
            masked,
            None if q_ids_ref is None else q_ids_ref[:, :1],
            None if kv_ids_ref is None else kv_ids_ref[:1, :],
        )
        if keep is not None:
            p = jnp.where(keep, p, 0.0)
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[:, :1])
        acc_scr[...] += lax.dot_general(
            ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32
        )

    _visit(kind_ref, num_ref, slot, i, j, body)

    @pl.when(j == width - 1)
    def _end():
        dq_ref[...] = (acc_scr[...] * cfg.softmax_scale).astype(dq_ref.dtype)


def dq(q, k, v, dout, lse, delta, segment_ids, info: MaskInfo, cfg: Config) -> jax.Array:
    """Padded head-major q/k/v/dout; lse, delta f32[b, h, q_pad] -> dq like q."""
    batch, heads, q_pad, d = q.shape
    group = heads // k.shape[1]
    bq, bkv, width = info.block_q, info.block_kv, info.kv_block_indices.shape[1]

    def q_map(b, h, i, j, idx, kind, num):
        return b, h, i, 0

    def kv_map(b, h, i, j, idx, kind, num):
        return b, lax.div(h, group), idx[i * width + j], 0  # kv head; h >= 0.

    q_spec = pl.BlockSpec((None, None, bq, d), q_map)
    kv_spec = pl.BlockSpec((None, None, bkv, d), kv_map)
    row_spec = pl.BlockSpec((None, None, bq, LANES), q_map)
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    operands = [
        q,
        k,
        v,
        dout,
        *(jnp.broadcast_to(x[..., None], (*x.shape, LANES)) for x in (lse, delta)),
    ]
    if segment_ids is not None:
        specs, ids = _segment_inputs(segment_ids, q_pad, k.shape[2], bq, bkv, width)
        in_specs += specs
        operands += ids
    kernel = functools.partial(_dq_kernel, cfg=cfg, bq=bq, bkv=bkv, width=width)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, heads, info.num_q_blocks, width),
            in_specs=in_specs,
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        **_params(cfg, ("parallel", "parallel", "parallel", "arbitrary")),
    )(*_flat(info, transposed=False), *operands)


def _dkv_kernel(
    idx_ref, kind_ref, num_ref, *refs, cfg: Config, bq: int, bkv: int, width: int, group: int
):
    has_ids = len(refs) == 12
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
    q_ids_ref, kv_ids_ref = refs[6:8] if has_ids else (None, None)
    dk_ref, dv_ref, dk_scr, dv_scr = refs[-4:]
    kv_block, g, t = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    slot = kv_block * width + t

    @pl.when((g == 0) & (t == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def body(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        st = lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32) * cfg.softmax_scale
        pt = jnp.exp(st - lse_ref[:1, :])  # [bkv, bq]
        keep = _keep(
            cfg,
            idx_ref[slot] * bq,
            kv_block * bkv,
            st.shape,
            1,
            masked,
            None if q_ids_ref is None else q_ids_ref[:1, :],
            None if kv_ids_ref is None else kv_ids_ref[:, :1],
        )
        if keep is not None:
            pt = jnp.where(keep, pt, 0.0)
        dv_scr[...] += lax.dot_general(
            pt.astype(do.dtype), do, _NN, preferred_element_type=jnp.float32
        )
        dpt = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
        dst = pt * (dpt - delta_ref[:1, :])
        dk_scr[...] += lax.dot_general(
            dst.astype(q.dtype), q, _NN, preferred_element_type=jnp.float32
        )

    _visit(kind_ref, num_ref, slot, kv_block, t, body)

    @pl.when((g == group - 1) & (t == width - 1))
    def _end():
        dk_ref[...] = (dk_scr[...] * cfg.softmax_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def dkv(
    q, k, v, dout, lse, delta, segment_ids, info: MaskInfo, cfg: Config
) -> tuple[jax.Array, jax.Array]:
    """Padded head-major q/k/v/dout; lse, delta f32[b, h, q_pad] -> (dk, dv) like k."""
    batch, heads, q_pad, d = q.shape
    kv_heads, kv_pad = k.shape[1], k.shape[2]
    group = heads // kv_heads
    bq, bkv, width = info.block_q, info.block_kv, info.q_block_indices.shape[1]

    def q_map(b, kh, kv_block, g, t, idx, kind, num):
        return b, kh * group + g, idx[kv_block * width + t], 0

    def kv_map(b, kh, kv_block, g, t, idx, kind, num):
        return b, kh, kv_block, 0

    def col_map(b, kh, kv_block, g, t, idx, kind, num):
        return b, kh * group + g, 0, idx[kv_block * width + t]

    q_spec = pl.BlockSpec((None, None, bq, d), q_map)
    kv_spec = pl.BlockSpec((None, None, bkv, d), kv_map)
    col_spec = pl.BlockSpec((None, None, SUBLANES, bq), col_map)
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, col_spec, col_spec]
    col_shape = (batch, heads, SUBLANES, q_pad)
    operands = [
        q,
        k,
        v,
        dout,
        *(jnp.broadcast_to(x[..., None, :], col_shape) for x in (lse, delta)),
    ]
    if segment_ids is not None:
        in_specs += [
            pl.BlockSpec(
                (None, SUBLANES, bq),
                lambda b, kh, kv_block, g, t, idx, *_: (b, 0, idx[kv_block * width + t]),
            ),
            pl.BlockSpec((None, bkv, LANES), lambda b, kh, kv_block, *_: (b, kv_block, 0)),
        ]
        operands += [_col_ids(segment_ids, q_pad), _row_ids(segment_ids, kv_pad)]
    kernel = functools.partial(_dkv_kernel, cfg=cfg, bq=bq, bkv=bkv, width=width, group=group)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, kv_heads, info.num_kv_blocks, group, width),
            in_specs=in_specs,
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bkv, d), jnp.float32)] * 2,
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        **_params(cfg, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
    )(*_flat(info, transposed=True), *operands)
