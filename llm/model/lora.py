"""LoRA and QLoRA on our layers (config.lora): low-rank adapters beside frozen base weights.

    y = x @ W + (alpha / rank) * dropout(x) @ A @ B        A [in..., r], B [r, out...]; B starts at 0

Layers name the weights that take adapters in a `lora_targets` class attribute, (weight, target):
    q k v o       Attention.wq [D, H, Dh], wk, wv [D, K, Dh], wo [H, Dh, D]
    gate up down  MLP.w_gate, w_up [D, F], w_down [F, D] (MoE shared experts too)
    experts       MoE.w_gate, w_up [E, D, F], w_down [E, F, D]: one adapter per expert, added to
                  the weight (W + s A B) inside the step, so no dropout there
`attach` puts an `Adapter` beside each targeted weight (module attribute `<weight>_lora`) with the
weight's logical axis names (the rank axis replicated), so it shards like its base; its A and B
are `nnx.LoRAParam`, the only variables a LoRA run's optimizer sees (`trainable`). QLoRA
(`lora.quantize`) replaces every weight listed above (targeted or not) by a frozen `Quantized`
copy: int8 with an absmax scale per output column, or NF4 (QLoRA's 4-bit NormalFloat, two codes
a byte) with an absmax scale per block of up to 64 along the last axis. Shape letters as in
llm.model.layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from llm.errors import check
from llm.model.quant_ops import pack_nibbles, unpack_nibbles

TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "experts")
QUANTIZE = ("none", "int8", "nf4")
IN_DIMS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}
NDIM = {"wq": 3, "wk": 3, "wv": 3, "wo": 3, "w_gate": 2, "w_up": 2, "w_down": 2}  # unstacked
# QLoRA's NormalFloat4 levels (Dettmers et al. 2023, appendix E).
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044006, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """config.lora; rank 0 = off (full fine-tuning)."""

    rank: int = 0  # r of every adapter; 0 = no adapters, every parameter trained
    alpha: float = 16.0  # the update is scaled by alpha / rank (PEFT's lora_alpha)
    dropout: float = 0.0  # on the adapters' input (PEFT's lora_dropout), training steps only
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    quantize: str = "none"  # QLoRA: none | int8 | nf4, the frozen base weights' storage

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        check(
            isinstance(self.rank, int) and self.rank >= 0,
            f"config.lora.rank must be an integer >= 0 (0 = off), got {self.rank!r}.",
        )
        unknown = sorted(set(self.targets) - set(TARGETS))
        check(
            not unknown and bool(self.targets),
            f"config.lora.targets={self.targets} must be a non-empty list of {TARGETS}"
            + (f" (unknown: {unknown})." if unknown else "."),
        )
        check(0 <= self.dropout < 1, f"config.lora.dropout must be in [0, 1), got {self.dropout}.")
        check(self.alpha > 0, f"config.lora.alpha must be > 0, got {self.alpha}.")
        check(
            self.quantize in QUANTIZE,
            f"config.lora.quantize must be one of {QUANTIZE}, got {self.quantize!r}.",
        )
        check(
            self.rank > 0 or self.quantize == "none",
            f"config.lora.quantize={self.quantize!r} (QLoRA) needs adapters: set config.lora.rank.",
        )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check_model(self, cfg) -> None:
        """Every target names a layer of `cfg` (a ModelConfig); the rank fits each width."""
        if not self.rank:
            return
        check(
            cfg.parametrization == "sp",
            "config.lora with model.parametrization=mup: muP has no LoRA rules yet; use sp.",
        )
        check(
            not (self.dropout and cfg.scan_layers),
            "config.lora.dropout > 0 needs model.scan_layers=False (scanned layers would share "
            "one dropout mask).",
        )
        dense_layers = any(not cfg.moe.is_moe_layer(i) for i in range(cfg.num_layers))
        attention = any(p != "nsa" for p in cfg.layer_patterns)
        has = {t: attention for t in "qkvo"}
        has.update(
            dict.fromkeys(("gate", "up", "down"), dense_layers or cfg.moe.num_shared_experts)
        )
        has["experts"] = cfg.moe.num_experts > 0
        missing = [t for t in self.targets if not has[t]]
        check(
            not missing,
            f"config.lora.targets: {missing} name no layer of this model (no "
            f"{'MoE experts' if 'experts' in missing else 'such layer'}): remove them.",
        )
        check(
            not (self.dropout and "experts" in self.targets),
            "config.lora.dropout > 0 with target 'experts': expert adapters are added to the "
            "weights, where dropout cannot apply; set dropout=0 or drop 'experts'.",
        )
        widths = {
            "q": min(cfg.embed_dim, cfg.num_heads * cfg.head_dim),
            "k": min(cfg.embed_dim, cfg.num_kv_heads * cfg.head_dim),
            "v": min(cfg.embed_dim, cfg.num_kv_heads * cfg.head_dim),
            "o": min(cfg.embed_dim, cfg.num_heads * cfg.head_dim),
            "gate": min(cfg.embed_dim, cfg.mlp_dim),
            "up": min(cfg.embed_dim, cfg.mlp_dim),
            "down": min(cfg.embed_dim, cfg.mlp_dim),
            "experts": min(cfg.embed_dim, cfg.moe.expert_mlp_dim),
        }
        for t in self.targets:
            check(
                self.rank <= widths[t],
                f"config.lora.rank={self.rank} is larger than the {t} projection's smaller "
                f"width {widths[t]}: use a rank <= {widths[t]}.",
            )


def trainable(cfg: LoRAConfig) -> type[nnx.Variable]:
    """The variables the optimizer trains: the adapters under LoRA, else every nnx.Param."""
    return nnx.LoRAParam if cfg.rank else nnx.Param


class QuantizedBase(nnx.Variable):
    """A frozen QLoRA base weight's codes or scales: never trained, never an nnx.Param."""


class Quantized(nnx.Module):
    """A frozen weight [*lead, in..., out...] in `kind` (int8 | nf4) and its scales."""

    def __init__(self, w: jax.Array, names: tuple, kind: str, in_axes: tuple[int, ...]):
        self.kind, self.shape = kind, tuple(w.shape)
        w = w.astype(jnp.float32)
        if kind == "int8":  # absmax per output column: the input axes reduced
            scale = jnp.max(jnp.abs(w), axis=in_axes, keepdims=True) / 127.0
            codes = jnp.round(w / jnp.where(scale == 0, 1.0, scale)).astype(jnp.int8)
            scale_names = tuple(None if i in in_axes else n for i, n in enumerate(names))
            code_names = names
        else:  # nf4: blocks along the last axis, two 4-bit codes per byte
            block = math.gcd(64, w.shape[-1])
            check(
                block % 2 == 0,
                f"config.lora.quantize=nf4 needs an even last axis, got a weight of {w.shape}.",
            )
            blocks = w.reshape(*w.shape[:-1], w.shape[-1] // block, block)
            scale = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
            normed = blocks / jnp.where(scale == 0, 1.0, scale)
            levels = jnp.asarray(NF4, jnp.float32)
            index = jnp.searchsorted((levels[1:] + levels[:-1]) / 2, normed).astype(jnp.uint8)
            codes = pack_nibbles(index, -1)  # [..., n_blocks, block / 2]
            scale_names = code_names = (*names, None)
        self.codes = QuantizedBase(codes, out_sharding=code_names, eager_sharding=False)
        self.scale = QuantizedBase(scale, out_sharding=scale_names, eager_sharding=False)

    def dequantize(self, dtype) -> jax.Array:
        codes, scale = self.codes[...], self.scale[...]
        if self.kind == "int8":
            return (codes.astype(jnp.float32) * scale).astype(dtype)
        index = unpack_nibbles(codes, -1)
        w = jnp.asarray(NF4, jnp.float32)[index] * scale
        return w.reshape(self.shape).astype(dtype)


class Adapter(nnx.Module):
    """The low-rank update of one weight: a [*lead, in..., r], b [*lead, r, out...]."""

    def __init__(self, base: nnx.Variable, in_dims: int, lead: int, cfg: LoRAConfig, key, index):
        shape, names = base.shape, base.get_metadata()["out_sharding"]
        n_in = math.prod(shape[lead : lead + in_dims])
        bound = 1 / math.sqrt(n_in)  # PEFT's kaiming_uniform(a=sqrt(5)) of lora_A
        a_shape = (*shape[: lead + in_dims], cfg.rank)
        a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
        b = jnp.zeros((*shape[:lead], cfg.rank, *shape[lead + in_dims :]), jnp.float32)
        self.a = nnx.LoRAParam(
            a, out_sharding=(*names[: lead + in_dims], None), eager_sharding=False
        )
        self.b = nnx.LoRAParam(
            b, out_sharding=(*names[:lead], None, *names[lead + in_dims :]), eager_sharding=False
        )
        self.in_dims, self.lead, self.scale = in_dims, lead, cfg.scale
        self.rate, self.index = cfg.dropout, index

    def dropout(self, x: jax.Array) -> jax.Array:
        """x with inverted dropout under a training step's `dropout_key`, else x."""
        if not self.rate or _DROPOUT_KEY[-1] is None:
            return x
        key = jax.random.fold_in(_DROPOUT_KEY[-1], self.index)
        keep = jax.random.bernoulli(key, 1 - self.rate, x.shape)
        return jnp.where(keep, x / (1 - self.rate), 0).astype(x.dtype)

    def delta(self) -> jax.Array:
        """s * A @ B in the base weight's shape, float32 (merging, and the expert adapters)."""
        a, b = self.a[...], self.b[...]
        lead = a.shape[: self.lead]
        a2 = a.reshape(*lead, -1, a.shape[-1])  # [*lead, n_in, r]
        b2 = b.reshape(*lead, b.shape[self.lead], -1)  # [*lead, r, n_out]
        out = jnp.matmul(a2, b2) * self.scale
        return out.reshape(*a.shape[:-1], *b.shape[self.lead + 1 :])


_DROPOUT_KEY: list = [None]


@contextlib.contextmanager
def dropout_key(key: jax.Array | None) -> Iterator[None]:
    """Adapters traced inside apply dropout with masks from `key` (a training step's)."""
    _DROPOUT_KEY.append(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.pop()


_DISABLED: list[bool] = [False]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Adapters traced inside contribute nothing: the model is its (possibly quantized) base, as
    LoRA's DPO reference (llm.training.dpo) needs, without a second copy of the weights."""
    _DISABLED.append(True)
    try:
        yield
    finally:
        _DISABLED.pop()


def adapter(module: nnx.Module, name: str) -> Adapter | None:
    """module.<name>'s adapter; None if it has none or adapters are `disabled`."""
    return None if _DISABLED[-1] else getattr(module, f"{name}_lora", None)


def is_adapted(module: nnx.Module, name: str) -> bool:
    """module.<name> has an adapter or is held quantized by QLoRA."""
    return adapter(module, name) is not None or isinstance(getattr(module, name), Quantized)


def weight(module: nnx.Module, name: str, dtype) -> jax.Array:
    """module.<name> in `dtype`, dequantized if QLoRA holds it quantized (no adapter added)."""
    w = getattr(module, name)
    return w.dequantize(dtype) if isinstance(w, Quantized) else w[...].astype(dtype)


def merged_weight(module: nnx.Module, name: str, dtype) -> jax.Array:
    """module.<name> plus its adapter's s * A @ B, in `dtype`."""
    a = adapter(module, name)
    if a is None:
        return weight(module, name, dtype)
    return (weight(module, name, jnp.float32) + a.delta()).astype(dtype)


def _targeted(model: nnx.Module) -> list[tuple[nnx.Module, str, str, int]]:
    """(module, weight name, target, leading axes before its input axes) of every adaptable
    weight of `model`: the experts' axis, scanned layers' axis."""
    found = []
    for _, module in nnx.iter_modules(model):
        for name, target in getattr(type(module), "lora_targets", ()):
            found.append((module, name, target, len(getattr(module, name).shape) - NDIM[name]))
    return found


def attach(model: nnx.Module, cfg: LoRAConfig, seed: int) -> None:
    """Adds the adapters of `cfg` to `model` in place (and quantizes its base weights under
    QLoRA); nothing under rank 0. Adapter i's A is drawn from fold_in(key(seed), i)."""
    if not cfg.rank:
        return
    key = jax.random.fold_in(jax.random.key(seed), 0x10AA)
    for i, (module, name, target, lead) in enumerate(_targeted(model)):
        base = getattr(module, name)
        if target in cfg.targets:
            a = Adapter(base, IN_DIMS[name], lead, cfg, jax.random.fold_in(key, i), i)
            setattr(module, f"{name}_lora", a)
        if cfg.quantize != "none":
            names = base.get_metadata()["out_sharding"]
            in_axes = tuple(range(lead, lead + IN_DIMS[name]))
            setattr(module, name, Quantized(base[...], names, cfg.quantize, in_axes))


def merge(model: nnx.Module) -> None:
    """Folds every adapter into its weight (W + s A B, as float32 nnx.Params) and removes it;
    quantized weights become their float32 dequantization: a plain model, as `llm.hf.save` takes."""
    for module, name, _, _ in _targeted(model):
        base = getattr(module, name)
        if adapter(module, name) is None and not isinstance(base, Quantized):
            continue
        names = (
            base.get_metadata()["out_sharding"]
            if isinstance(base, nnx.Variable)
            else base.codes.get_metadata()["out_sharding"][: len(base.shape)]
        )
        w = merged_weight(module, name, jnp.float32)
        setattr(module, name, nnx.Param(w, out_sharding=names, eager_sharding=False))
        if adapter(module, name) is not None:
            delattr(module, f"{name}_lora")
