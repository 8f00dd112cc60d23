"""Pallas Mosaic TPU block-sparse flash attention ("pallas_tpu" implementation).

Forward and fused backward kernels live in `pallas_tpu_fwd` / `pallas_tpu_bwd`;
this module validates, pads sequences to block multiples, transposes to
head-major layout and wires the custom VJP. On CPU the kernels run in TPU
interpret mode, so `kernels.attention(..., implementation="pallas_tpu")` works
there too (slowly; for tests).

Supported: bfloat16/float32; head_dim a multiple of 128 (TPU lane width; 64
too in CPU interpret mode); block sizes multiples of 128 (8 in interpret
mode); GQA/MQA; q_seq != kv_seq; segment ids; any mask whose predicate is
exact in the kernel blocks (`Mask.kernel_block_error`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kernels.attention import masks as masks_lib
from kernels.attention import pallas_tpu_bwd, pallas_tpu_fwd
from kernels.attention.block_sizes import BlockSizes, default_block_sizes
from kernels.attention.mask_info import mask_info
from kernels.attention.pallas_tpu_fwd import Config

_DTYPES = (jnp.bfloat16, jnp.float32)
_PASSES = (("block_q", "block_kv"), ("block_q_dkv", "block_kv_dkv"), ("block_q_dq", "block_kv_dq"))


def _interpret() -> bool:
    """True on CPU (TPU interpret mode); False on a real TPU."""
    return jax.default_backend() != "tpu"


def _block_error(mask: masks_lib.Mask | None, blocks: BlockSizes) -> str | None:
    """The first pass whose (block_q, block_kv) the mask's predicate cannot handle."""
    for bq, bkv in _PASSES:
        if mask is not None and (
            err := mask.kernel_block_error(getattr(blocks, bq), getattr(blocks, bkv))
        ):
            return err
    return None


def _block_sizes(q, k, mask: masks_lib.Mask | None, block_sizes: BlockSizes | None) -> BlockSizes:
    """Requested (or default) sizes, clamped to the aligned sequence lengths.

    Defaults are halved (down to the alignment) until they fit a block-sparse layout.
    """
    align = 8 if _interpret() else 128
    if block_sizes is None:
        backend = "cpu" if _interpret() else "tpu"
        block_sizes = default_block_sizes(backend, q.shape[-1], q.dtype)
        while _block_error(mask, block_sizes) and block_sizes.block_q % (2 * align) == 0:
            block_sizes = BlockSizes.uniform(block_sizes.block_q // 2, block_sizes.block_kv // 2)
    q_cap = -(-q.shape[1] // align) * align
    kv_cap = -(-k.shape[1] // align) * align
    return BlockSizes(
        **{
            f.name: min(getattr(block_sizes, f.name), kv_cap if "kv" in f.name else q_cap)
            for f in dataclasses.fields(BlockSizes)
        }
    )


def unsupported_reason(
    q, k, v, *, mask: masks_lib.Mask | None, segment_ids, block_sizes: BlockSizes | None
) -> str | None:
    del v, segment_ids
    backend = jax.default_backend()
    if backend == "gpu":
        return "pallas_tpu compiles Mosaic kernels for TPU; on GPU use implementation='pallas_gpu'"
    if backend not in ("tpu", "cpu"):
        return f"pallas_tpu runs on TPU (or interpreted on CPU), not on {backend!r}"
    if q.dtype not in _DTYPES:
        return f"pallas_tpu supports bfloat16 and float32, got {q.dtype}"
    head_dim = q.shape[-1]
    if head_dim % 128 and not (_interpret() and head_dim == 64):
        where = " (64 is also allowed in CPU interpret mode)" if _interpret() else ""
        return (
            f"pallas_tpu needs head_dim a multiple of 128 (TPU lane width){where}, got {head_dim}"
        )
    align = 8 if _interpret() else 128
    if block_sizes is not None:
        for f in dataclasses.fields(BlockSizes):
            if (value := getattr(block_sizes, f.name)) % align:
                return f"pallas_tpu needs block_sizes.{f.name} a multiple of {align}, got {value}"
    return _block_error(mask, _block_sizes(q, k, mask, block_sizes))


def _pad_seq(x: jax.Array, block: int, fill: float = 0.0) -> jax.Array:
    """Pads axis 2 (sequence, head-major layout) up to a multiple of `block`."""
    pad = -x.shape[2] % block
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[2] = (0, pad)
    return jnp.pad(x, widths, constant_values=fill)


def _heads_major(x: jax.Array, block: int) -> jax.Array:
    """[b, s, h, d] -> [b, h, s_pad, d]."""
    return _pad_seq(x.transpose(0, 2, 1, 3), block)


def _seq_major(x: jax.Array, seq: int) -> jax.Array:
    """[b, h, s_pad, d] -> [b, seq, h, d]."""
    return x[:, :, :seq].transpose(0, 2, 1, 3)


def _forward(q, k, v, segment_ids, cfg: Config, blocks: BlockSizes):
    """Returns out [b, q_seq, h, d] and lse f32[b, h, q_seq] (+inf for empty rows)."""
    info = mask_info(cfg.mask, cfg.q_seq, cfg.kv_seq, blocks.block_q, blocks.block_kv)
    out, lse = pallas_tpu_fwd.forward(
        _heads_major(q, blocks.block_q),
        _heads_major(k, blocks.block_kv),
        _heads_major(v, blocks.block_kv),
        segment_ids,
        info,
        cfg,
    )
    return _seq_major(out, cfg.q_seq), lse[:, :, : cfg.q_seq, 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, segment_ids, cfg: Config, blocks: BlockSizes) -> jax.Array:
    return _forward(q, k, v, segment_ids, cfg, blocks)[0]


def _attention_fwd(q, k, v, segment_ids, cfg: Config, blocks: BlockSizes):
    out, lse = _forward(q, k, v, segment_ids, cfg, blocks)
    return out, (q, k, v, segment_ids, out, lse)


def _attention_bwd(cfg: Config, blocks: BlockSizes, residuals, dout):
    q, k, v, segment_ids, out, lse = residuals
    delta = jnp.einsum(
        "bqhd,bqhd->bhq", dout.astype(jnp.float32), out.astype(jnp.float32)
    )  # [b, h, q_seq]

    def operands(bq: int, bkv: int):
        """Padded head-major operands for one pass; padded rows get lse +inf (p = 0)."""
        return (
            _heads_major(q, bq),
            _heads_major(k, bkv),
            _heads_major(v, bkv),
            _heads_major(dout, bq),
            _pad_seq(lse[..., None], bq, jnp.inf)[..., 0],
            _pad_seq(delta[..., None], bq)[..., 0],
            segment_ids,
        )

    bq, bkv = blocks.block_q_dq, blocks.block_kv_dq
    dq = pallas_tpu_bwd.dq(
        *operands(bq, bkv), mask_info(cfg.mask, cfg.q_seq, cfg.kv_seq, bq, bkv), cfg
    )
    bq, bkv = blocks.block_q_dkv, blocks.block_kv_dkv
    dk, dv = pallas_tpu_bwd.dkv(
        *operands(bq, bkv), mask_info(cfg.mask, cfg.q_seq, cfg.kv_seq, bq, bkv), cfg
    )
    return _seq_major(dq, cfg.q_seq), _seq_major(dk, cfg.kv_seq), _seq_major(dv, cfg.kv_seq), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(
    q: jax.Array,  # [batch, q_seq, heads, head_dim]
    k: jax.Array,  # [batch, kv_seq, kv_heads, head_dim]
    v: jax.Array,  # [batch, kv_seq, kv_heads, head_dim]
    *,
    mask: masks_lib.Mask | None,
    segment_ids: jax.Array | None,  # int [batch, seq]
    softmax_scale: float,
    block_sizes: BlockSizes | None,
) -> jax.Array:
    """Block-sparse flash attention; differentiable w.r.t. q, k, v."""
    cfg = Config(mask, q.shape[1], k.shape[1], softmax_scale, _interpret())
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    return _attention(q, k, v, segment_ids, cfg, _block_sizes(q, k, mask, block_sizes))
