"""cuDNN baseline via `jax.nn.dot_product_attention(implementation="cudnn")`.

Causal and sliding-window masks map to `is_causal` / `local_window_size`
when q_seq == kv_seq; any other mask, decode alignment (q_seq != kv_seq) and
segment ids become an explicit boolean mask [batch, 1, q_seq, kv_seq].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.attention import masks as masks_lib
from kernels.attention.block_sizes import BlockSizes

_DTYPES = (jnp.float16, jnp.bfloat16)


def unsupported_reason(
    q, k, v, *, mask: masks_lib.Mask | None, segment_ids, block_sizes: BlockSizes | None
) -> str | None:
    del k, v, mask, segment_ids, block_sizes
    if jax.default_backend() != "gpu":
        return f"cudnn needs a GPU backend, but the default backend is {jax.default_backend()!r}"
    if q.dtype not in _DTYPES:
        return f"cudnn supports float16/bfloat16 only, got {q.dtype}"
    if q.shape[-1] % 8 or q.shape[-1] > 128:
        return f"cudnn needs head_dim a multiple of 8 and <= 128, got {q.shape[-1]}"
    return None


def _native(mask: masks_lib.Mask | None) -> tuple[bool, tuple[int, int] | None] | None:
    """(is_causal, local_window_size) if cuDNN expresses `mask` natively, else None."""
    parts = mask.masks if isinstance(mask, masks_lib.Intersection) else (mask,)
    is_causal, window = False, None
    for m in parts:
        if isinstance(m, masks_lib.CausalMask):
            is_causal = True
        elif isinstance(m, masks_lib.SlidingWindowMask) and window is None:
            window = (m.left - 1, m.right)
        elif m is not None:
            return None
    if window is not None and window[1] == 0:
        is_causal = True
    return is_causal, window


def attention(
    q,
    k,
    v,
    *,
    mask: masks_lib.Mask | None,
    segment_ids,
    softmax_scale: float,
    block_sizes: BlockSizes | None,
) -> jax.Array:
    del block_sizes
    q_seq, kv_seq = q.shape[1], k.shape[1]
    native = _native(mask) if q_seq == kv_seq else None
    explicit = None
    is_causal, window = (False, None) if native is None else native
    if native is None and mask is not None:
        explicit = jnp.asarray(mask.dense(q_seq, kv_seq))[None, None]
    if segment_ids is not None:
        same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        explicit = same if explicit is None else explicit & same
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=explicit,
        scale=softmax_scale,
        is_causal=is_causal,
        local_window_size=window,
        implementation="cudnn",
    )
