"""Block-sparse flash attention in Pallas Triton ("pallas_gpu" implementation).

Forward: `pallas_gpu_fwd`; backward (dq and dk/dv kernels): `pallas_gpu_bwd`;
both visit only the non-empty blocks of the mask (MaskInfo). This module pads
the inputs (sequences to the block sizes, head_dim to a power of two >= 16),
wires the custom VJP and says what it cannot run. On CPU the kernels run in
Pallas interpret mode (for tests; not a performance figure).

Supports float16/bfloat16/float32, head_dim <= 256, GQA/MQA, any Mask whose
`kernel_block_error` accepts the block sizes, segment ids, q_seq != kv_seq.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.attention import masks as masks_lib
from kernels.attention import pallas_gpu_bwd, pallas_gpu_fwd
from kernels.attention.block_sizes import BlockSizes, default_block_sizes
from kernels.attention.pallas_gpu_common import Config

_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
_MAX_HEAD_DIM = 256


def _block_sizes(q: jax.Array, block_sizes: BlockSizes | None) -> BlockSizes:
    return block_sizes or default_block_sizes("gpu", q.shape[-1], q.dtype)


def _pairs(bs: BlockSizes) -> list[tuple[int, int]]:
    """(block_q, block_kv) of the forward, dk/dv and dq passes."""
    return [
        (bs.block_q, bs.block_kv),
        (bs.block_q_dkv, bs.block_kv_dkv),
        (bs.block_q_dq, bs.block_kv_dq),
    ]


def unsupported_reason(
    q, k, v, *, mask: masks_lib.Mask | None, segment_ids, block_sizes: BlockSizes | None
) -> str | None:
    del k, v, segment_ids
    backend = jax.default_backend()
    if backend == "tpu":
        return "pallas_gpu is a Triton kernel; on TPU use implementation='pallas_tpu'"
    if backend not in ("gpu", "cpu"):
        return f"pallas_gpu needs a GPU (or CPU interpret mode), got backend {backend!r}"
    if q.dtype not in _DTYPES:
        return f"pallas_gpu supports float16/bfloat16/float32, got {q.dtype}"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"pallas_gpu supports head_dim <= {_MAX_HEAD_DIM}, got {q.shape[-1]}"
    bs = _block_sizes(q, block_sizes)
    for block_q, block_kv in _pairs(bs):
        for b in (block_q, block_kv):
            if b < 16 or b & (b - 1):
                return f"pallas_gpu block sizes must be powers of two >= 16 (Triton), got {bs}"
        if mask is not None and (err := mask.kernel_block_error(block_q, block_kv)) is not None:
            return err
    return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: Config, q, k, v, q_segments, kv_segments) -> jax.Array:
    return pallas_gpu_fwd.forward(cfg, q, k, v, q_segments, kv_segments)[0]


def _flash_fwd(cfg: Config, q, k, v, q_segments, kv_segments):
    out, lse = pallas_gpu_fwd.forward(cfg, q, k, v, q_segments, kv_segments)
    return out, (q, k, v, q_segments, kv_segments, out, lse)


def _flash_bwd(cfg: Config, residuals, do):
    q, k, v, q_segments, kv_segments, out, lse = residuals
    dq, dk, dv = pallas_gpu_bwd.backward(cfg, q, k, v, q_segments, kv_segments, out, lse, do)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pads `axis` of x up to `size` (no copy if already that long)."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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
    """Backend entry point: `flash_attention`, interpreted on CPU."""
    return flash_attention(
        q,
        k,
        v,
        mask=mask,
        segment_ids=segment_ids,
        softmax_scale=softmax_scale,
        block_sizes=block_sizes,
        interpret=jax.default_backend() == "cpu",
    )


def flash_attention(
    q: jax.Array,  # [batch, q_seq, heads, head_dim]
    k: jax.Array,  # [batch, kv_seq, kv_heads, head_dim]
    v: jax.Array,  # [batch, kv_seq, kv_heads, head_dim]
    *,
    mask: masks_lib.Mask | None,
    segment_ids: jax.Array | None,  # int [batch, seq]
    softmax_scale: float,
    block_sizes: BlockSizes | None,
    interpret: bool,
) -> jax.Array:
    """Flash attention (see the module docstring). Returns [batch, q_seq, heads, head_dim]."""
    bs = _block_sizes(q, block_sizes)
    q_seq, kv_seq, head_dim = q.shape[1], k.shape[1], q.shape[-1]
    cfg = Config(mask, q_seq, kv_seq, float(softmax_scale), bs, interpret)
    q_pad = _round_up(q_seq, max(b for b, _ in _pairs(bs)))
    kv_pad = _round_up(kv_seq, max(b for _, b in _pairs(bs)))
    d_pad = max(16, 1 << (head_dim - 1).bit_length())
    q = _pad(_pad(q, 1, q_pad), 3, d_pad)
    k, v = (_pad(_pad(x, 1, kv_pad), 3, d_pad) for x in (k, v))
    q_segments = kv_segments = None
    if segment_ids is not None:  # Padded positions are masked by the sequence bounds.
        segment_ids = segment_ids.astype(jnp.int32)
        q_segments, kv_segments = _pad(segment_ids, 1, q_pad), _pad(segment_ids, 1, kv_pad)
    out = _flash(cfg, q, k, v, q_segments, kv_segments)
    return out[:, :q_seq, :, :head_dim]
