"""Quantization of the model's matmuls: quantization-aware training (fake quantization with
straight-through gradients) and post-training quantized weights, on `llm.model.layers.dense`.

QuantConfig.mode (training and inference):
  int8          weights per output channel, activations per token, symmetric int8; straight-through
                gradients (the backward uses the dequantized operands).
  fp8           e4m3 operands forward, e5m2 output gradients backward; recipe: per-tensor current
                scaling (scale = amax / the format's max, from this call's tensor, no history).
  int4_weights  weights only, symmetric int4 in groups of `group_size` along the input width.
QuantConfig.weights ("" | "int8" | "int4") says the target weights are stored quantized
(`llm.quantize`, post-training): int8, an int8 array of the weight's shape; int4, a uint8 array
holding two values a byte along the last contracted axis (llm.model.quant_ops.pack_int4),
unpacked on the fly inside the matmul's jitted computation; either with a float32
`<name>_scale` parameter beside it.

On CPU everything is simulated in float32 (quantize, dequantize, float matmul). On accelerators
the int8 and fp8 dense matmuls are real low-precision `dot_general`s (int8 x int8 -> int32,
e4m3 x e4m3 -> float32) rescaled afterwards; experts and the output head are always simulated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llm.errors import check, is_int
from llm.model.quant_ops import (
    dequantize_weight,
    fake_activation,
    fake_weight,
    int_quantize,
    lowp_matmul,
    pack_int4,
    qmatmul,
    quantize_weight,
    real_lowp,
)

MODES = ("none", "int8", "fp8", "int4_weights")
TARGETS = ("attention", "mlp", "experts", "head")
STORED = ("", "int8", "int4")  # QuantConfig.weights: how llm.quantize stored the target weights
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


# ---- the model's view: weights by (module, name) ------------------------------------------------


def _spec(module: nnx.Module, name: str) -> tuple[str, tuple[int, ...]] | None:
    """WEIGHTS' entry for module.<name>, found by its class or the class it extends (the
    native sparse attention layer projects q, k, v and o as Attention does); None if none."""
    for cls in type(module).__mro__:
        if (cls.__name__, name) in WEIGHTS:
            return WEIGHTS[(cls.__name__, name)]
    return None


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
    scale = getattr(module, f"{name}_scale", None)
    w8a8 = mode == "int8" and scale is not None and quant.weights == "int8"  # PTQ w8a8
    w = getattr(module, name)[...] if w8a8 else weight(module, name, cfg.dtype)  # int4: unpacked
    out_shape = (*x.shape[: x.ndim - in_dims], *w.shape[in_dims:])
    n_in = math.prod(w.shape[:in_dims])
    x2, w2 = x.reshape(-1, n_in), w.reshape(n_in, -1)  # [tokens, K] @ [K, N], as layers.dense
    if w8a8:
        xq, xs = int_quantize(x2, (1,), 8)
        y = lowp_matmul(xq, xs, w2, scale[...].reshape(1, -1), real_lowp())
    elif mode in ("int8", "fp8"):
        y = qmatmul(x2, w2, mode)
    elif mode == "int4_weights":
        y = x2 @ fake_weight(w, axes, mode, quant.group_size).reshape(n_in, -1)
    else:
        y = x2 @ w2
    return y.astype(cfg.dtype).reshape(out_shape)


# ---- post-training quantization of a model ------------------------------------------------------


def quantize_model(model: nnx.Module, quant: QuantConfig) -> nnx.Module:
    """`model` with each weight of quant's targets replaced (in place) by its stored form
    (quant.weights int8: int8 per output channel; int4: per group_size inputs, packed two a byte)
    and a float32 `<name>_scale` parameter; unchanged when quant.weights is ""."""
    kind, targets, group = quant.weights, quant.target_set, quant.group_size
    if not kind:
        return model
    names = sorted({name for _, name in WEIGHTS})
    for _, module in nnx.iter_graph(model):
        for name in names:
            spec = (
                _spec(module, name) if isinstance(getattr(module, name, None), nnx.Param) else None
            )
            if spec is None or spec[0] not in targets:
                continue
            if name == "embed" and not module.cfg.tie_embeddings:  # not the head
                continue
            var, (target, axes) = getattr(module, name), spec
            # scan_layers: a block's weights are stacked [layers, ...] (the head's are not); the
            # scale keeps that axis, so each scanned layer sees its own slice of both
            stacked = int(module.cfg.scan_layers and target != "head")
            axes = tuple(a + stacked for a in axes)
            q, scale = quantize_weight(var[...], axes, kind, group)
            if kind == "int4":
                width = q.shape[axes[-1]]
                check(
                    width % 2 == 0,
                    f"--mode=int4 packs two weights a byte along {type(module).__name__}.{name}'s "
                    f"input axis, whose width {width} is odd: drop {target!r} from the targets.",
                )
                q = pack_int4(q, axes[-1])
            sharding = var.get_metadata().get("out_sharding")
            setattr(module, name, nnx.Param(q, out_sharding=sharding, eager_sharding=False))
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
    """`cache` with `new` [B, T, K, Dh] written into `layer` at positions index.. (in place when
    the cache is donated or a loop's carry). cache: stacked [layers, B, K, S, Dh], or a list of
    each layer's [B, K, S, Dh] (llm.model.transformer.unstack_layers; `layer` a Python int).
    index: int32[] (every row from the same position) or int32[B] (row b from index[b]: a
    scatter, which drops positions past the cache)."""
    if isinstance(cache, list):
        return [_write(c, new, (), index) if i == layer else c for i, c in enumerate(cache)]
    return _write(cache, new, (layer,), index)


def _write(cache, new: jax.Array, lead: tuple, index: jax.Array):
    """`write_kv` into a cache [*lead, B, K, S, Dh], `lead` indexing its leading axes."""
    values = new  # [B, T, K, Dh]; int8: {"q": int8[B, T, K, Dh], "scale": f32[B, T, K, 1]}
    if isinstance(cache, dict):
        values = dict(zip(("q", "scale"), int_quantize(new, (3,), 8)))

    def put(buf, x):  # x: [B, T, K, Dh or 1]
        x = x.astype(buf.dtype)
        if jnp.ndim(index) == 0:
            update = x.transpose(0, 2, 1, 3)[(None,) * len(lead)]  # [*1s, B, K, T, Dh]
            return jax.lax.dynamic_update_slice(buf, update, (*lead, 0, 0, index, 0))
        rows = jnp.arange(x.shape[0])[:, None]  # [B, 1]
        positions = index[:, None] + jnp.arange(x.shape[1])  # [B, T]
        # The indexed dims lead the update's shape: [B, T, K, Dh], x as it is.
        return buf.at[(*lead, rows, slice(None), positions)].set(x, mode="drop")

    return jax.tree.map(put, cache, values)


def read_kv(cache, layer, dtype) -> jax.Array:
    """`layer`'s values [B, K, S, Dh] of the cache (stacked, or a list of layers), in `dtype`."""
    if isinstance(cache, list):
        cache = cache[layer]
    else:
        cache = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, False), cache)
    if not isinstance(cache, dict):
        return cache
    return (cache["q"].astype(jnp.float32) * cache["scale"]).astype(dtype)
