"""Quantization of the model's matmuls: quantization-aware training (fake quantization with
straight-through gradients) and post-training quantized weights, on `llm.model.layers.dense`.

QuantConfig.mode (training and inference):
  int8          weights per output channel, activations per token, symmetric int8; straight-through
                gradients (the backward uses the dequantized operands).
  fp8           e4m3 operands forward, e5m2 output gradients backward; recipe: per-tensor current
                scaling (scale = amax / the format's max, from this call's tensor, no history).
  int4_weights  weights only, symmetric int4 in groups of `group_size` along the input width.
QuantConfig.weights ("" | "int8" | "int4") says the target weights are stored quantized
(`llm.quantize`, post-training): an int8 array of the weight's shape plus a float32
`<name>_scale` parameter beside it.

On CPU everything is simulated in float32 (quantize, dequantize, float matmul). On accelerators
the int8 and fp8 dense matmuls are real low-precision `dot_general`s (int8 x int8 -> int32,
e4m3 x e4m3 -> float32) rescaled afterwards; experts and the output head are always simulated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llm.errors import check, is_int

MODES = ("none", "int8", "fp8", "int4_weights")
TARGETS = ("attention", "mlp", "experts", "head")
STORED = ("", "int8", "int4")  # QuantConfig.weights: how llm.quantize stored the target weights
E4M3_MAX, E5M2_MAX = 448.0, 57344.0
# (module class, weight) -> (target, its contracted (input) axes, leading and contiguous)
WEIGHTS = {
    ("Attention", "wq"): ("attention", (0,)),
    ("Attention", "wk"): ("attention", (0,)),
    ("Attention", "wv"): ("attention", (0,)),
    ("Attention", "wo"): ("attention", (0, 1)),
    ("MLP", "w_gate"): ("mlp", (0,)),
    ("MLP", "w_up"): ("mlp", (0,)),
    ("MLP", "w_down"): ("mlp", (0,)),
    ("MoE", "w_gate"): ("experts", (1,)),
    ("MoE", "w_up"): ("experts", (1,)),
    ("MoE", "w_down"): ("experts", (1,)),
    ("Transformer", "unembed"): ("head", (0,)),
    ("Transformer", "embed"): ("head", (1,)),  # tied: the head is embed.T, contracted over D
}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """config.quant: which matmuls are quantized, and how (module docstring)."""

    mode: str = "none"  # one of MODES
    targets: str = "attention,mlp,experts"  # comma-separated subset of TARGETS
    group_size: int = 128  # int4: weights per scale along the input width
    weights: str = ""  # one of STORED; set by llm.quantize, never trained

    def __post_init__(self):
        check(
            self.mode in MODES,
            f"config.quant.mode={self.mode!r} is not one of {MODES}: e.g. --config.quant.mode=int8.",
        )
        unknown = [t for t in self.target_set if t not in TARGETS]
        check(
            not unknown and self.target_set,
            f"config.quant.targets={self.targets!r} names {unknown or 'nothing'}: give a "
            f"comma-separated subset of {TARGETS}, e.g. --config.quant.targets=attention,mlp.",
        )
        check(
            is_int(self.group_size) and self.group_size > 0,
            f"config.quant.group_size must be a positive integer, got {self.group_size!r}.",
        )
        check(
            self.weights in STORED,
            f"config.quant.weights={self.weights!r} is not one of {STORED} (llm.quantize sets it).",
        )

    @property
    def target_set(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())

    def quantizes(self, target: str) -> bool:
        return self.mode != "none" and target in self.target_set

    @property
    def int4(self) -> bool:
        return self.mode == "int4_weights" or self.weights == "int4"


def check_widths(quant: QuantConfig, model: Any) -> None:
    """ConfigError when int4's group size does not divide a targeted weight's input width.
    `model`: the ModelConfig (head_dim filled)."""
    if not quant.int4:
        return
    widths = {
        "attention": {"embed_dim": model.embed_dim, "num_heads x head_dim": model.num_heads * model.head_dim},
        "mlp": {"embed_dim": model.embed_dim, "mlp_dim": model.mlp_dim},
        "experts": {"embed_dim": model.embed_dim, "moe.expert_mlp_dim": model.moe.expert_mlp_dim}
        if model.moe.num_experts
        else {},
        "head": {"embed_dim": model.embed_dim},
    }  # fmt: skip
    for target in quant.target_set:
        for name, width in widths[target].items():
            check(
                width % quant.group_size == 0,
                f"config.quant.group_size={quant.group_size} does not divide the input width of "
                f"the {target} weights (model.{name}={width}): pick a group size dividing it, "
                f"e.g. {math.gcd(width, quant.group_size)}.",
            )


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


def dequantize_weight(q: jax.Array, scale: jax.Array, axes: tuple[int, ...], dtype) -> jax.Array:
    """Inverse of `quantize_weight` (the scale's shape tells per-channel from grouped)."""
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


@jax.custom_vjp
def e5m2_gradient(y: jax.Array) -> jax.Array:
    """Identity forward; the incoming gradient rounded to e5m2 (per-tensor current scaling)."""
    return y


def _e5m2_fwd(y):
    return y, None


def _e5m2_bwd(_, g):
    f8, scale = fp8_quantize(g, jnp.float8_e5m2)
    return ((f8.astype(jnp.float32) * scale).astype(g.dtype),)


e5m2_gradient.defvjp(_e5m2_fwd, _e5m2_bwd)


# ---- matmuls ------------------------------------------------------------------------------------


def _real_lowp() -> bool:
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
    return _qmatmul(x2, w2, mode, _real_lowp() if real is None else real)


# ---- the model's view: weights by (module, name) ------------------------------------------------


def _spec(module: nnx.Module, name: str) -> tuple[str, tuple[int, ...]]:
    """WEIGHTS' entry for module.<name>, found by its class or the class it extends (the
    native sparse attention layer projects q, k, v and o as Attention does)."""
    for cls in type(module).__mro__:
        if (cls.__name__, name) in WEIGHTS:
            return WEIGHTS[(cls.__name__, name)]
    raise KeyError((type(module).__name__, name))


def weight(module: nnx.Module, name: str, dtype) -> jax.Array:
    """module.<name> in `dtype`, dequantized if stored quantized (a `<name>_scale` beside it)."""
    w = getattr(module, name)[...]
    scale = getattr(module, f"{name}_scale", None)
    if scale is None:
        return w.astype(dtype)
    return dequantize_weight(w, scale[...], _spec(module, name)[1], dtype)


def trained_weight(module: nnx.Module, name: str, dtype) -> jax.Array:
    """`weight`, fake-quantized as config.quant.mode says for its target (experts, the head)."""
    quant, (target, axes) = module.cfg.quant, _spec(module, name)
    w = weight(module, name, dtype)
    return fake_weight(w, axes, quant.mode, quant.group_size) if quant.quantizes(target) else w


def activation(module: nnx.Module, target: str, x: jax.Array) -> jax.Array:
    """x fake-quantized as config.quant.mode says for `target` (the input of experts or head)."""
    quant = module.cfg.quant
    return fake_activation(x, quant.mode) if quant.quantizes(target) else x


def dense(module: nnx.Module, name: str, x: jax.Array, in_dims: int = 1) -> jax.Array:
    """llm.model.layers.dense(x, module.<name>) in the compute dtype, quantized per config.quant:
    int8/fp8 through `qmatmul` (real low-precision dots off CPU), int4_weights by fake-quantized
    weights, stored int8 weights with int8 activations straight into the int8 matmul."""
    cfg, quant = module.cfg, module.cfg.quant
    target, axes = _spec(module, name)
    mode = quant.mode if quant.quantizes(target) else "none"
    w_var, scale = getattr(module, name), getattr(module, f"{name}_scale", None)
    out_shape = (*x.shape[: x.ndim - in_dims], *w_var.shape[in_dims:])
    n_in = math.prod(w_var.shape[:in_dims])
    x2 = x.reshape(-1, n_in)  # [tokens, K]: one 2-D matmul, as layers.dense
    if mode == "int8" and scale is not None and quant.weights == "int8":  # PTQ w8a8
        xq, xs = int_quantize(x2, (1,), 8)
        ws = scale[...].reshape(1, -1)
        y = lowp_matmul(xq, xs, w_var[...].reshape(n_in, -1), ws, _real_lowp())
    elif mode in ("int8", "fp8"):
        y = qmatmul(x2, weight(module, name, cfg.dtype).reshape(n_in, -1), mode)
    else:
        w = weight(module, name, cfg.dtype)
        if mode == "int4_weights":
            w = fake_weight(w, axes, mode, quant.group_size)
        y = x2 @ w.reshape(n_in, -1)
    return y.astype(cfg.dtype).reshape(out_shape)


# ---- post-training quantization of a model ------------------------------------------------------


def quantize_model(model: nnx.Module, quant: QuantConfig) -> nnx.Module:
    """`model` with each weight of quant's targets replaced (in place) by its int8 array
    (quant.weights int8: per output channel; int4: per group_size inputs) and a float32
    `<name>_scale` parameter; unchanged when quant.weights is ""."""
    kind, targets, group = quant.weights, quant.target_set, quant.group_size
    if not kind:
        return model
    for _, module in nnx.iter_graph(model):
        for (cls, name), (target, axes) in WEIGHTS.items():
            if type(module).__name__ != cls or target not in targets:
                continue
            if not isinstance(getattr(module, name, None), nnx.Param):
                continue
            if cls == "Transformer" and name == "embed" and not module.cfg.tie_embeddings:
                continue
            var = getattr(module, name)
            q, scale = quantize_weight(var[...], axes, kind, group)
            names = var.get_metadata().get("out_sharding")
            setattr(module, name, nnx.Param(q, out_sharding=names, eager_sharding=False))
            setattr(module, f"{name}_scale", nnx.Param(scale, eager_sharding=False))
    return model


# ---- int8 KV cache ------------------------------------------------------------------------------


def init_kv(shape: tuple[int, ...], dtype, int8: bool):
    """An empty cache tensor [..., Dh]: an array, or int8 values with a float32 scale per
    (token, head) ({"q": int8[..., Dh], "scale": f32[..., 1]})."""
    if not int8:
        return jnp.zeros(shape, dtype)
    return {"q": jnp.zeros(shape, jnp.int8), "scale": jnp.zeros((*shape[:-1], 1), jnp.float32)}


def write_kv(cache, new: jax.Array, layer, index: jax.Array):
    """The stacked `cache` [layers, B, K, S, Dh] with `new` [B, T, K, Dh] written into `layer`
    at positions index.. (in place when the cache is donated or a loop's carry)."""
    new = new.transpose(0, 2, 1, 3)[None]  # [1, B, K, T, Dh]
    at = (layer, 0, 0, index, 0)
    if not isinstance(cache, dict):
        return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), at)
    q, scale = int_quantize(new, (new.ndim - 1,), 8)
    return {
        "q": jax.lax.dynamic_update_slice(cache["q"], q, at),
        "scale": jax.lax.dynamic_update_slice(cache["scale"], scale, at),
    }


def read_kv(cache, layer, dtype) -> jax.Array:
    """`layer`'s values [B, K, S, Dh] of the stacked cache, in `dtype`."""
    cache = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, False), cache)
    if not isinstance(cache, dict):
        return cache
    return (cache["q"].astype(jnp.float32) * cache["scale"]).astype(dtype)
