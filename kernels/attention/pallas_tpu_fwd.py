"""Mosaic TPU flash-attention forward kernel and helpers shared with the backward.

Layouts are head-major: q, out, dout [batch, heads, q_pad, head_dim]; k, v
[batch, kv_heads, kv_pad, head_dim], sequences padded to block multiples.
Which kv blocks a q block visits (and vice versa for dk/dv) comes from
`MaskInfo`, scalar-prefetched into SMEM: the k/v (or q) BlockSpec index_map
reads the block to fetch at each visit, so EMPTY blocks are never DMA'd;
padding visits repeat the last block (no new DMA) and skip compute.
PARTIAL blocks apply sequence bounds and `mask.predicate`; FULL blocks skip
it. Segment ids, when given, are compared in every visited block.

Per-row vectors avoid 1-wide minor dims: lse/delta are lane-broadcast
[..., seq, 128] where rows are sublanes (forward, dq) and sublane-broadcast
[..., 8, seq] in the transposed dk/dv kernel; segment ids come in both forms.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.attention import masks as masks_lib
from kernels.attention.mask_info import FULL, MaskInfo

LANES, SUBLANES = 128, 8
_NEG = -1e30  # Finite "minus infinity" for masked scores.
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class Config:
    """Static (hashable) parameters shared by the wrapper and the kernels."""

    mask: masks_lib.Mask | None
    q_seq: int
    kv_seq: int
    softmax_scale: float
    interpret: bool  # TPU interpret mode (CPU).


def _keep(cfg: Config, q_start, k_start, shape, q_axis: int, masked: bool, q_ids, kv_ids):
    """bool[shape] of visible pairs (q along `q_axis`), or None if all are visible."""
    keep = None
    if masked:
        q_row = q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
        k_col = k_start + lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
        keep = (q_row < cfg.q_seq) & (k_col < cfg.kv_seq)
        if cfg.mask is not None:
            keep = keep & cfg.mask.predicate(q_row + (cfg.kv_seq - cfg.q_seq), k_col)
    if q_ids is not None:
        same = q_ids == kv_ids  # Broadcast [rows, 1] vs [1, cols].
        keep = same if keep is None else keep & same
    return keep


def _visit(kind_ref, num_ref, slot, block, step, body) -> None:
    """Runs body(masked) for a valid visit: unmasked in FULL blocks, masked otherwise."""
    run = step < num_ref[block]
    full = kind_ref[slot] == FULL

    @pl.when(run & full)
    def _full():
        body(False)

    @pl.when(run & jnp.logical_not(full))
    def _partial():
        body(True)


def _params(cfg: Config, semantics: tuple[str, ...]) -> dict:
    return {
        "compiler_params": pltpu.CompilerParams(dimension_semantics=semantics),
        "interpret": pltpu.InterpretParams(dma_execution_mode="eager") if cfg.interpret else False,
    }


def _row_ids(ids: jax.Array | None, n: int) -> jax.Array | None:
    """int32[batch, n, 128]: ids (padded to n) broadcast along lanes (rows = sublanes)."""
    if ids is None:
        return None
    ids = jnp.pad(ids, ((0, 0), (0, n - ids.shape[1])))
    return jnp.broadcast_to(ids[:, :, None], (ids.shape[0], n, LANES))


def _col_ids(ids: jax.Array | None, n: int) -> jax.Array | None:
    """int32[batch, 8, n]: ids (padded to n) broadcast along sublanes (cols = lanes)."""
    if ids is None:
        return None
    ids = jnp.pad(ids, ((0, 0), (0, n - ids.shape[1])))
    return jnp.broadcast_to(ids[:, None, :], (ids.shape[0], SUBLANES, n))


def _segment_inputs(
    segment_ids: jax.Array, q_pad: int, kv_pad: int, bq: int, bkv: int, width: int
) -> tuple[list[pl.BlockSpec], list[jax.Array]]:
    """Specs and operands of the q-row and kv-column segment ids for a (q block, kv visit) grid."""
    specs = [
        pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, idx, *_: (b, i, 0)),
        pl.BlockSpec((None, SUBLANES, bkv), lambda b, h, i, j, idx, *_: (b, 0, idx[i * width + j])),
    ]
    return specs, [_row_ids(segment_ids, q_pad), _col_ids(segment_ids, kv_pad)]


def _flat(info: MaskInfo, transposed: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Scalar-prefetch operands: flattened block indices, kinds (int32) and counts."""
    if transposed:
        idx, kinds, num = info.q_block_indices, info.q_block_kinds, info.num_q_visits
    else:
        idx, kinds, num = info.kv_block_indices, info.kv_block_kinds, info.num_kv_visits
    return (
        jnp.asarray(idx.reshape(-1), jnp.int32),
        jnp.asarray(kinds.reshape(-1), jnp.int32),
        jnp.asarray(num, jnp.int32),
    )


# Forward.


def _fwd_kernel(idx_ref, kind_ref, num_ref, *refs, cfg: Config, bq: int, bkv: int, width: int):
    has_ids = len(refs) == 10
    q_ref, k_ref, v_ref = refs[:3]
    q_ids_ref, kv_ids_ref = refs[3:5] if has_ids else (None, None)
    o_ref, lse_ref, m_scr, l_scr, acc_scr = refs[-5:]
    i, j = pl.program_id(2), pl.program_id(3)
    slot = i * width + j

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, _NEG, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def body(masked: bool):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.softmax_scale
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
            s = jnp.where(keep, s, _NEG)
        m_prev, l_prev = m_scr[:, :1], l_scr[:, :1]  # [bq, 1]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        if keep is not None:
            p = jnp.where(keep, p, 0.0)  # Rows with nothing visible yet: exp(0) -> 0.
        alpha = jnp.exp(m_prev - m_new)
        l_scr[...] = jnp.broadcast_to(alpha * l_prev + p.sum(axis=1, keepdims=True), l_scr.shape)
        m_scr[...] = jnp.broadcast_to(m_new, m_scr.shape)
        pv = lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
        acc_scr[...] = alpha * acc_scr[...] + pv

    _visit(kind_ref, num_ref, slot, i, j, body)

    @pl.when(j == width - 1)
    def _end():
        l = l_scr[:, :1]
        empty = l == 0.0  # Rows that see no key: out 0, lse +inf (so p = 0 in bwd).
        o_ref[...] = (acc_scr[...] / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
        lse = jnp.where(empty, jnp.inf, m_scr[:, :1] + jnp.log(jnp.where(empty, 1.0, l)))
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def forward(q, k, v, segment_ids, info: MaskInfo, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """q [b, h, q_pad, d], k/v [b, kv_h, kv_pad, d] (padded) -> out like q, lse f32[b, h, q_pad, 128]."""
    batch, heads, q_pad, d = q.shape
    group = heads // k.shape[1]
    bq, bkv, width = info.block_q, info.block_kv, info.kv_block_indices.shape[1]
    grid = (batch, heads, info.num_q_blocks, width)

    def q_map(b, h, i, j, idx, kind, num):
        return b, h, i, 0

    def kv_map(b, h, i, j, idx, kind, num):
        return b, lax.div(h, group), idx[i * width + j], 0  # kv head; h >= 0.

    in_specs = [
        pl.BlockSpec((None, None, bq, d), q_map),
        pl.BlockSpec((None, None, bkv, d), kv_map),
        pl.BlockSpec((None, None, bkv, d), kv_map),
    ]
    operands = [q, k, v]
    if segment_ids is not None:
        specs, ids = _segment_inputs(segment_ids, q_pad, k.shape[2], bq, bkv, width)
        in_specs += specs
        operands += ids
    kernel = functools.partial(_fwd_kernel, cfg=cfg, bq=bq, bkv=bkv, width=width)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=grid,
            in_specs=in_specs,
            out_specs=[
                pl.BlockSpec((None, None, bq, d), q_map),
                pl.BlockSpec((None, None, bq, LANES), q_map),
            ],
            scratch_shapes=[
                pltpu.VMEM((bq, LANES), jnp.float32),  # Running max.
                pltpu.VMEM((bq, LANES), jnp.float32),  # Running sum.
                pltpu.VMEM((bq, d), jnp.float32),  # Accumulator.
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_pad, LANES), jnp.float32),
        ],
        **_params(cfg, ("parallel", "parallel", "parallel", "arbitrary")),
    )(*_flat(info, transposed=False), *operands)
