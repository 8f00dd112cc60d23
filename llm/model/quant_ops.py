"""Quantization on arrays: symmetric int8/int4 and fp8 quantize-dequantize, int4 packing (two
values per byte), fake quantization with straight-through gradients, and the low-precision
matmuls (real int8/fp8 `dot_general`s off CPU, simulated in float32 on CPU).
llm.model.quant applies them to the model's weights and activations.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

E4M3_MAX, E5M2_MAX = 448.0, 57344.0


# ---- quantize / dequantize ----------------------------------------------------------------------


def _absmax(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axes, keepdims=True)
    return jnp.maximum(amax, jnp.finfo(jnp.float32).tiny)


def int_quantize(x: jax.Array, axes: tuple[int, ...], bits: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric: x ~ q * scale, q int8 in [-(2^(b-1)-1), 2^(b-1)-1], scale = amax / qmax over
    `axes` (kept as size-1 dims)."""
    qmax = 2 ** (bits - 1) - 1
    scale = _absmax(x, axes) / qmax
    q = jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -qmax, qmax).astype(jnp.int8)
    return q, scale


def fp8_quantize(x: jax.Array, dtype=jnp.float8_e4m3fn) -> tuple[jax.Array, jax.Array]:
    """Per-tensor current scaling: x ~ f8 * scale, scale = amax(x) / the format's max."""
    fmax = E4M3_MAX if dtype == jnp.float8_e4m3fn else E5M2_MAX
    scale = _absmax(x, tuple(range(x.ndim))) / fmax
    return (x.astype(jnp.float32) / scale).astype(dtype), scale


def _grouped(w: jax.Array, axes: tuple[int, ...], group: int) -> tuple[jax.Array, int]:
    """w with its contracted axes merged and split into [n_in / group, group]; the group axis."""
    a = axes[0]
    n_in = math.prod(w.shape[a : a + len(axes)])
    return w.reshape(*w.shape[:a], n_in // group, group, *w.shape[a + len(axes) :]), a + 1


def quantize_weight(w: jax.Array, axes: tuple[int, ...], kind: str, group: int):
    """A weight stored quantized: (int8 q of w's shape, float32 scale): int8 per output channel,
    int4 per `group` inputs of each output channel."""
    if kind == "int8":
        return int_quantize(w, axes, 8)
    grouped, g_axis = _grouped(w, axes, group)
    q, scale = int_quantize(grouped, (g_axis,), 4)
    return q.reshape(w.shape), scale


def pack_nibbles(codes: jax.Array, axis: int) -> jax.Array:
    """uint8 codes in [0, 15] -> uint8 with `axis` halved, two codes a byte: code 2i in the low
    nibble, 2i + 1 in the high one. `axis` must have an even length."""
    c = jnp.moveaxis(codes, axis, -1)
    return jnp.moveaxis(c[..., 0::2] | (c[..., 1::2] << 4), -1, axis)


def unpack_nibbles(packed: jax.Array, axis: int) -> jax.Array:
    """Inverse of `pack_nibbles`: uint8 [..., n/2 at axis, ...] -> codes uint8 [..., n, ...]."""
    p = jnp.moveaxis(packed, axis, -1)
    codes = jnp.stack([p & 0xF, p >> 4], axis=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])
    return jnp.moveaxis(codes, -1, axis)


def pack_int4(q: jax.Array, axis: int) -> jax.Array:
    """int8 values in [-8, 7] -> uint8, two a byte along `axis` (two's complement nibbles)."""
    return pack_nibbles(q.astype(jnp.uint8) & 0xF, axis)


def unpack_int4(packed: jax.Array, axis: int) -> jax.Array:
    """Inverse of `pack_int4`: uint8 -> int8 values in [-8, 7], `axis` doubled."""
    codes = unpack_nibbles(packed, axis).astype(jnp.int8)
    return jnp.where(codes > 7, codes - 16, codes)


def dequantize_weight(q: jax.Array, scale: jax.Array, axes: tuple[int, ...], dtype) -> jax.Array:
    """Inverse of `quantize_weight` (the scale's shape tells per-channel from grouped); a uint8
    `q` is int4 packed along the last contracted axis (`pack_int4`), unpacked here first."""
    if q.dtype == jnp.uint8:
        q = unpack_int4(q, axes[-1])
    a = axes[0]
    if scale.ndim == q.ndim and all(scale.shape[i] == 1 for i in axes):  # per channel
        return (q.astype(jnp.float32) * scale).astype(dtype)
    n_in = math.prod(q.shape[a : a + len(axes)])
    groups = scale.shape[a]
    shaped = q.reshape(*q.shape[:a], groups, n_in // groups, *q.shape[a + len(axes) :])
    return (shaped.astype(jnp.float32) * scale).reshape(q.shape).astype(dtype)


def _ste(x: jax.Array, fake: jax.Array) -> jax.Array:
    """fake forward, identity backward (the straight-through estimator)."""
    return x + jax.lax.stop_gradient(fake.astype(x.dtype) - x)


def fake_weight(w: jax.Array, axes: tuple[int, ...], mode: str, group: int) -> jax.Array:
    """w quantized and dequantized as `mode` stores it, with straight-through gradients."""
    if mode == "fp8":
        f8, scale = fp8_quantize(w)
        return _ste(w, f8.astype(jnp.float32) * scale)
    q, scale = quantize_weight(w, axes, "int8" if mode == "int8" else "int4", group)
    return _ste(w, dequantize_weight(q, scale, axes, jnp.float32))


def fake_activation(x: jax.Array, mode: str) -> jax.Array:
    """x: [..., K] quantized and dequantized per token (int8) or per tensor (fp8); unchanged for
    int4_weights; straight-through gradients."""
    if mode == "int8":
        q, scale = int_quantize(x, (x.ndim - 1,), 8)
        return _ste(x, q * scale)
    if mode == "fp8":
        f8, scale = fp8_quantize(x)
        return _ste(x, f8.astype(jnp.float32) * scale)
    return x


# ---- matmuls ------------------------------------------------------------------------------------


def real_lowp() -> bool:
    """Real int8/fp8 dot_generals off CPU (simulated in float32 on CPU)."""
    return jax.default_backend() != "cpu"


def lowp_matmul(xq, x_scale, wq, w_scale, real: bool) -> jax.Array:
    """(xq * x_scale) @ (wq * w_scale) -> float32 [M, N]; xq: [M, K] and wq: [K, N] int8 or fp8,
    scales broadcasting against [M, 1] and [1, N]. `real`: one low-precision dot_general
    (int8 -> int32, fp8 -> float32 accumulation), then the rescale; else dequantize first."""
    if real:
        acc = jnp.int32 if xq.dtype == jnp.int8 else jnp.float32
        y = jax.lax.dot_general(xq, wq, (((1,), (0,)), ((), ())), preferred_element_type=acc)
        return y.astype(jnp.float32) * x_scale * w_scale
    return (xq.astype(jnp.float32) * x_scale) @ (wq.astype(jnp.float32) * w_scale)


def _quantize_operands(x2, w2, mode):
    if mode == "int8":
        return (*int_quantize(x2, (1,), 8), *int_quantize(w2, (0,), 8))
    return (*fp8_quantize(x2), *fp8_quantize(w2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _qmatmul(x2: jax.Array, w2: jax.Array, mode: str, real: bool) -> jax.Array:
    return lowp_matmul(*_quantize_operands(x2, w2, mode), real)


def _qmatmul_fwd(x2, w2, mode, real):
    xq, xs, wq, ws = _quantize_operands(x2, w2, mode)
    return lowp_matmul(xq, xs, wq, ws, real), (
        xq,
        xs,
        wq,
        ws,
        jnp.zeros((), x2.dtype),
        jnp.zeros((), w2.dtype),
    )


def _qmatmul_bwd(mode, real, saved, g):
    xq, xs, wq, ws, x_like, w_like = saved  # the last two: the operands' dtypes
    x_deq = xq.astype(jnp.float32) * xs
    w_deq = wq.astype(jnp.float32) * ws
    if mode == "fp8":  # e5m2 gradients
        g8, gs = fp8_quantize(g, jnp.float8_e5m2)
        g = g8.astype(jnp.float32) * gs
    g = g.astype(jnp.float32)
    return (g @ w_deq.T).astype(x_like.dtype), (x_deq.T @ g).astype(w_like.dtype)


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def qmatmul(x2: jax.Array, w2: jax.Array, mode: str, real: bool | None = None) -> jax.Array:
    """x2: [M, K] @ w2: [K, N] with both operands quantized (`mode` int8 or fp8), float32 out;
    gradients straight through to the dequantized operands (fp8: the gradient in e5m2)."""
    return _qmatmul(x2, w2, mode, real_lowp() if real is None else real)
