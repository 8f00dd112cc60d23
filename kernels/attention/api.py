"""`attention`: input validation, mask construction and backend dispatch.

Backends are modules of this package, imported lazily by name. Each exposes

  attention(q, k, v, *, mask: Mask | None, segment_ids, softmax_scale: float,
            block_sizes: BlockSizes | None) -> out
  unsupported_reason(q, k, v, *, mask, segment_ids, block_sizes) -> str | None

and may declare FEATURES, the optional arguments it supports beyond those (see _FEATURES);
so adding a backend is adding its module file (and its name to _MODULES).
"""

from __future__ import annotations

import importlib
import math
import types

import jax
import jax.numpy as jnp

from kernels.attention import masks as masks_lib
from kernels.attention.block_sizes import BlockSizes

# implementation name -> module under kernels.attention.
_MODULES = {
    "xla": "reference",
    "xla_blockwise": "blockwise",
    "cudnn": "cudnn",
    "pallas_gpu": "pallas_gpu",
    "pallas_tpu": "pallas_tpu",
}
IMPLEMENTATIONS = tuple(_MODULES)  # what `implementation=` accepts, besides None
# Preference order for implementation=None, per jax.default_backend(). On CPU xla_blockwise is
# measured faster than xla in the kernel benchmark and the default train step (kernels/BENCHMARKS.md).
_AUTO = {
    "gpu": ("pallas_gpu", "cudnn", "xla"),
    "tpu": ("pallas_tpu", "xla"),
    "cpu": ("xla_blockwise", "xla"),
}


# Optional arguments a backend supports only if its module lists them in FEATURES; they are passed
# to its `attention` as keyword arguments (context parallelism needs them: llm/parallel/context.py).
_FEATURES = ("return_lse", "q_offset", "kv_segment_ids")


class UnsupportedError(ValueError):
    """An explicitly requested implementation cannot run these inputs here."""


def _module(implementation: str) -> types.ModuleType:
    """The backend module (imported on first use; import errors propagate)."""
    return importlib.import_module(f"{__package__}.{_MODULES[implementation]}")


def _validate(q, k, v, segment_ids, sliding_window, mask, softmax_scale, block_sizes) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(
                f"{name} must have rank 4 [batch, seq, heads, head_dim], got shape {jnp.shape(x)}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k batch sizes differ: {q.shape[0]} vs {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head_dim differ: {q.shape[3]} vs {k.shape[3]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"q heads ({q.shape[2]}) must be a multiple of k/v kv_heads ({k.shape[2]})"
        )
    if isinstance(segment_ids, tuple):  # (q_segment_ids, kv_segment_ids)
        if len(segment_ids) != 2:
            raise ValueError(
                "segment_ids must be one array or a pair (q_segment_ids, kv_segment_ids), "
                f"got a tuple of {len(segment_ids)}"
            )
        for name, ids, x in zip(("q", "kv"), segment_ids, (q, k)):
            _check_segment_ids(f"segment_ids[{name}]", ids, x.shape[:2])
    elif segment_ids is not None:
        if q.shape[1] != k.shape[1]:
            raise ValueError(
                f"segment_ids require q_seq == kv_seq, got {q.shape[1]} and {k.shape[1]}; "
                "pass a pair (q_segment_ids, kv_segment_ids) for different lengths"
            )
        _check_segment_ids("segment_ids", segment_ids, q.shape[:2])
    if sliding_window is not None and (
        isinstance(sliding_window, bool)
        or not isinstance(sliding_window, int)
        or sliding_window < 1
    ):
        raise ValueError(f"sliding_window must be a positive int, got {sliding_window!r}")
    if mask is not None and not isinstance(mask, masks_lib.Mask):
        raise ValueError(f"mask must be a kernels Mask object, got {type(mask).__name__}")
    if softmax_scale is not None and not (
        isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)
    ):
        raise ValueError(f"softmax_scale must be a finite float, got {softmax_scale!r}")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")


def _check_segment_ids(name: str, ids, shape: tuple[int, int]) -> None:
    if jnp.shape(ids) != shape:
        raise ValueError(f"{name} must have shape [batch, seq] = {shape}, got {jnp.shape(ids)}")
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise ValueError(f"{name} must be integers, got {jnp.result_type(ids)}")


def attention(
    q: jax.Array,  # [batch, q_seq, heads, head_dim]
    k: jax.Array,  # [batch, kv_seq, kv_heads, head_dim]
    v: jax.Array,  # [batch, kv_seq, kv_heads, head_dim]
    *,
    causal: bool = False,
    sliding_window: int | None = None,
    mask: masks_lib.Mask | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,  # int [batch, seq]
    softmax_scale: float | None = None,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
    q_offset: int | jax.Array | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Multi-head attention with GQA/MQA, masks and packed segments.

    causal, sliding_window (query sees itself and the W-1 keys before) and
    mask intersect. With q_seq != kv_seq, query i sits at position
    i + kv_seq - q_seq (last query aligned with last key). Rows that see no
    key give zeros. implementation: "xla", "xla_blockwise", "cudnn",
    "pallas_gpu", "pallas_tpu" or None (fastest supported one for
    jax.default_backend()).
    Returns [batch, q_seq, heads, head_dim] in q.dtype.

    For attention between blocks of a longer sequence (context parallelism), three optional
    features, supported by the "xla" implementation (and "xla_blockwise", all but q_offset;
    others raise UnsupportedError):
      segment_ids=(q_segment_ids [batch, q_seq], kv_segment_ids [batch, kv_seq]);
      q_offset: position of query row 0 relative to key column 0 (an int or a traced int32
        scalar; default kv_seq - q_seq) for causal / window masks;
      return_lse: also return the log-sum-exp of the scores, f32 [batch, heads, q_seq]
        (-inf for rows that see no key), to merge partial results over key blocks.

    Raises:
      ValueError: bad inputs (the message names the argument).
      UnsupportedError: the requested implementation cannot run these inputs.
    """
    if implementation is not None and implementation not in _MODULES:
        raise ValueError(
            f"implementation must be one of {sorted(_MODULES)} or None, got {implementation!r}"
        )
    _validate(q, k, v, segment_ids, sliding_window, mask, softmax_scale, block_sizes)
    full_mask = masks_lib.combine(
        [
            masks_lib.CausalMask() if causal else None,
            masks_lib.SlidingWindowMask(sliding_window) if sliding_window is not None else None,
            mask,
        ]
    )
    if full_mask is not None:
        full_mask.validate(q.shape[1], k.shape[1])
        if q_offset is not None and full_mask.has_block_sparse:
            raise ValueError("q_offset cannot shift a BlockSparseMask (its layout is absolute)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    kwargs = {"mask": full_mask, "segment_ids": segment_ids, "block_sizes": block_sizes}
    extra = {}  # optional features, passed only to backends that list them in FEATURES
    if return_lse:
        extra["return_lse"] = True
    if q_offset is not None:
        extra["q_offset"] = q_offset
    needed = set(extra) | ({"kv_segment_ids"} if isinstance(segment_ids, tuple) else set())

    def missing(module: types.ModuleType) -> set[str]:
        return needed - set(getattr(module, "FEATURES", ()))

    if implementation is None:
        for name in _AUTO.get(jax.default_backend(), ("xla",)):
            module = _module(name)
            if not missing(module) and module.unsupported_reason(q, k, v, **kwargs) is None:
                return module.attention(q, k, v, softmax_scale=scale, **kwargs, **extra)
        raise UnsupportedError(
            "no attention implementation supports these inputs"
        )  # xla always does.

    module = _module(implementation)
    if lacking := missing(module):
        raise UnsupportedError(
            f"implementation={implementation!r} does not support {sorted(lacking)}; "
            "use implementation='xla' (or None) for these arguments"
        )
    if (reason := module.unsupported_reason(q, k, v, **kwargs)) is not None:
        raise UnsupportedError(f"implementation={implementation!r} cannot run: {reason}")
    return module.attention(q, k, v, softmax_scale=scale, **kwargs, **extra)
