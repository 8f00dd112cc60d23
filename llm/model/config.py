"""The model's typed config: frozen dataclasses, checked and completed when built.

A ModelConfig that exists is valid: `__post_init__` raises ConfigError (naming the config.model
field and the fix) for the first bad field, then fills the derived values once: `head_dim`
(when None) and `layer_patterns`, the attention schedule parsed and repeated over the layers.
Fields marked `shape=True` in their metadata determine the parameters' shapes: a checkpoint
resumes only under a config that agrees on them (llm.training.checkpoint).
"""

from __future__ import annotations

import dataclasses

import jax

from kernels.attention import IMPLEMENTATIONS
from llm.errors import check, check_positive, is_int
from llm.model import patterns
from llm.model.quant import QuantConfig, check_widths

DTYPES = ("float32", "bfloat16", "float16")
ROPE_SCALINGS = ("none", "linear", "dynamic", "yarn", "llama3")  # llm.model.layers.rope_frequencies
MLP_ACTIVATIONS = ("silu", "gelu_tanh")  # SwiGLU (Llama) | GeGLU with tanh GELU (Gemma)
ROUTERS = ("softmax_topk", "sigmoid_topk")
DISPATCHES = ("dropless", "capacity")
CONTEXT_PARALLEL = ("ring", "all_gather")  # llm.parallel.context
PARAMETRIZATIONS = ("sp", "mup")  # standard | maximal update (llm.model.mup)
MUP_READOUTS = ("multiplier", "zero")  # logits x base_width / width | zero-initialized, lr / m
REMAT_POLICIES = {  # what the backward pass recomputes: name -> jax.checkpoint policy
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
SHAPE = {"shape": True}  # field metadata: the field fixes parameter shapes


def shape_fields(cls: type) -> tuple[str, ...]:
    """The fields of dataclass `cls` that fix parameter shapes."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("shape"))


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts feed-forward layers (llm.model.moe); num_experts=0 keeps every layer dense."""

    num_experts: int = dataclasses.field(default=0, metadata=SHAPE)
    top_k: int = 2  # experts per token
    expert_mlp_dim: int = dataclasses.field(default=768, metadata=SHAPE)  # F of each expert
    # MoE in layers i >= first_dense_layers with (i - first_dense_layers) % every == 0
    every: int = dataclasses.field(default=1, metadata=SHAPE)
    first_dense_layers: int = dataclasses.field(default=0, metadata=SHAPE)
    router: str = "softmax_topk"  # one of ROUTERS
    dispatch: str = "dropless"  # "dropless" (grouped matmul) or "capacity" (fixed buffers)
    capacity_factor: float = 1.25  # capacity dispatch: slots per expert = ceil(cf * tokens * k / E)
    aux_loss_weight: float = 1e-2  # Switch load-balancing loss
    z_loss_weight: float = 1e-3  # router z-loss
    bias_update_rate: float = 0.0  # auxiliary-loss-free balancing step size; 0 = off
    num_shared_experts: int = dataclasses.field(default=0, metadata=SHAPE)  # dense SwiGLU experts
    # Qwen2-MoE: shared output * sigmoid(x @ w), w: [D, 1]
    shared_expert_gate: bool = dataclasses.field(default=False, metadata=SHAPE)
    norm_topk_prob: bool = True  # gate weights = the top-k scores renormalized to sum to 1

    def __post_init__(self):
        check(
            is_int(self.num_experts) and self.num_experts >= 0,
            f"config.model.moe.num_experts must be >= 0 (0 = dense), got {self.num_experts!r}.",
        )
        if self.num_experts:
            self._validate_experts()

    def _validate_experts(self) -> None:
        for field in ("top_k", "expert_mlp_dim", "every"):
            check_positive(getattr(self, field), f"model.moe.{field}")
        check(
            self.top_k <= self.num_experts,
            f"config.model.moe.top_k={self.top_k} is more than config.model.moe.num_experts="
            f"{self.num_experts}: each token picks top_k distinct experts; lower top_k.",
        )
        for field, allowed in (("router", ROUTERS), ("dispatch", DISPATCHES)):
            value = getattr(self, field)
            check(value in allowed, f"config.model.moe.{field}={value!r} is not one of {allowed}.")
        check(
            self.capacity_factor > 0,
            f"config.model.moe.capacity_factor must be > 0, got {self.capacity_factor}: "
            "set e.g. --config.model.moe.capacity_factor=1.25 (or use dispatch=dropless).",
        )
        for field in ("first_dense_layers", "num_shared_experts"):
            value = getattr(self, field)
            check(
                is_int(value) and value >= 0,
                f"config.model.moe.{field} must be an integer >= 0, got {value!r}.",
            )
        for field in ("aux_loss_weight", "z_loss_weight", "bias_update_rate"):
            value = getattr(self, field)
            check(value >= 0, f"config.model.moe.{field} must be >= 0 (0 = off), got {value}.")
        check(
            not self.shared_expert_gate or self.num_shared_experts > 0,
            "config.model.moe.shared_expert_gate=True gates the shared experts, but "
            "config.model.moe.num_shared_experts=0: set num_shared_experts >= 1 or the gate False.",
        )

    def is_moe_layer(self, layer: int) -> bool:
        start = self.first_dense_layers
        return self.num_experts > 0 and layer >= start and (layer - start) % self.every == 0


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling for contexts beyond the pretraining length (transformers' rope_type).

    none: plain RoPE. linear: positions / factor (position interpolation). dynamic: NTK-aware base
    theta * (factor * L / original - factor + 1)^(Dh / (Dh - 2)), L the largest position + 1 in the
    call, once L > original. yarn: per-frequency blend of interpolated and original frequencies
    (ramp between beta_fast and beta_slow rotations over the original context), cos and sin times
    attention_factor. llama3: long wavelengths / factor, short kept, smoothed between.
    """

    type: str = "none"  # one of ROPE_SCALINGS
    factor: float = 1.0
    original_max_position: int = 2048  # the pretraining context length
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn; None = 0.1 * ln(factor) + 1
    truncate: bool = True  # yarn: round the ramp's ends to whole dimensions

    def __post_init__(self):
        check(
            self.type in ROPE_SCALINGS,
            f"config.model.rope_scaling.type={self.type!r} is not one of {ROPE_SCALINGS}.",
        )
        if self.type == "none":
            return
        check(
            isinstance(self.factor, (int, float)) and self.factor >= 1,
            f"config.model.rope_scaling.factor must be >= 1 for type={self.type!r}, got "
            f"{self.factor!r}: set --config.model.rope_scaling.factor (e.g. 8.0).",
        )
        check_positive(self.original_max_position, "model.rope_scaling.original_max_position")
        if self.type == "llama3":
            check(
                self.high_freq_factor > self.low_freq_factor > 0,
                "config.model.rope_scaling needs high_freq_factor > low_freq_factor > 0 for "
                f"llama3, got {self.high_freq_factor} and {self.low_freq_factor}.",
            )
        if self.type == "yarn":
            check(
                self.beta_fast > self.beta_slow > 0,
                "config.model.rope_scaling needs beta_fast > beta_slow > 0 for yarn, got "
                f"{self.beta_fast} and {self.beta_slow}.",
            )
            check(
                self.attention_factor is None or self.attention_factor > 0,
                "config.model.rope_scaling.attention_factor must be > 0 (or None), got "
                f"{self.attention_factor}.",
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = dataclasses.field(default=4096, metadata=SHAPE)
    num_layers: int = dataclasses.field(default=4, metadata=SHAPE)
    embed_dim: int = dataclasses.field(default=256, metadata=SHAPE)
    num_heads: int = dataclasses.field(default=4, metadata=SHAPE)
    num_kv_heads: int = dataclasses.field(default=2, metadata=SHAPE)
    head_dim: int | None = dataclasses.field(default=None, metadata=SHAPE)  # None: D // H
    mlp_dim: int = dataclasses.field(default=768, metadata=SHAPE)
    max_seq_len: int = 2048
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
    qkv_bias: bool = dataclasses.field(default=False, metadata=SHAPE)  # Qwen2: q, k, v biases
    qk_norm: bool = dataclasses.field(default=False, metadata=SHAPE)  # Qwen3: RMSNorm per q/k head
    # Gemma 3's features, each off by default:
    rope_local_theta: float | None = None  # RoPE base of "sliding" layers, unscaled; None = shared
    embed_scale: bool = False  # embeddings times sqrt(embed_dim)
    norm_plus_one: bool = False  # every RMSNorm scales by (1 + w), w starting at 0
    post_norms: bool = dataclasses.field(default=False, metadata=SHAPE)  # + RMSNorm of each branch
    mlp_activation: str = "silu"  # one of MLP_ACTIVATIONS (dense MLPs)
    query_pre_attn_scalar: float | None = None  # scores / sqrt(this); None = head_dim
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap); None = off
    norm_eps: float = 1e-6
    tie_embeddings: bool = dataclasses.field(default=True, metadata=SHAPE)
    dtype: str = "float32"  # compute
    param_dtype: str = dataclasses.field(default="float32", metadata=SHAPE)
    scan_layers: bool = dataclasses.field(default=False, metadata=SHAPE)
    remat: str = "none"  # a key of REMAT_POLICIES
    attention_impl: str | None = None  # None = kernels.attention picks for the backend
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)  # config.quant (llm.config)
    attention_pattern: str = "dense"  # per-layer schedule of llm.model.patterns
    attention_window: int = 128  # W of "sliding", "local_global", "dilated", "nsa"
    attention_global: int = 16  # G global tokens of "local_global"
    attention_stride: int = 8  # S of "strided", "dilated"
    attention_chunk: int = 128  # C of "chunked"
    attention_nsa_block: int = 16  # tokens per compressed/selected block of "nsa"
    attention_nsa_selected: int = 4  # past blocks each "nsa" query selects (besides its own)
    context_parallel: str = "ring"  # one of CONTEXT_PARALLEL, used when mesh.sequence > 1
    # muP (llm.model.mup): initializations, learning rates, logits and attention scale by width.
    parametrization: str = "sp"  # one of PARAMETRIZATIONS
    mup_base_width: int | None = None  # the embed_dim the hyperparameters were tuned at
    mup_base_head_dim: int | None = None  # None: mup_base_width // num_heads
    mup_readout: str = "multiplier"  # one of MUP_READOUTS
    # Derived: the pattern name of each layer (attention_pattern parsed and repeated).
    layer_patterns: tuple[str, ...] = dataclasses.field(init=False, default=())

    def __post_init__(self):
        for name, cls in (
            ("moe", MoEConfig),
            ("rope_scaling", RopeScaling),
            ("quant", QuantConfig),
        ):
            value = getattr(self, name)
            if isinstance(value, dict):  # from a config file's nested section
                known = {f.name for f in dataclasses.fields(cls)}
                unknown = sorted(set(value) - known)
                check(
                    not unknown,
                    f"config.model.{name} has unknown fields {unknown}; the fields are "
                    f"{sorted(known)}.",
                )
                object.__setattr__(self, name, cls(**value))
        schedule = self._validate()
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)
        if self.parametrization == "mup" and self.mup_base_head_dim is None:
            object.__setattr__(self, "mup_base_head_dim", self.mup_base_width // self.num_heads)
        object.__setattr__(
            self, "layer_patterns", patterns.repeat_over_layers(schedule, self.num_layers)
        )
        check_widths(self.quant, self)

    def _validate(self) -> tuple[str, ...]:
        """Checks every field; returns the parsed attention schedule."""
        sizes = ("vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads", "mlp_dim")
        for field in (*sizes, "max_seq_len"):
            check_positive(getattr(self, field), f"model.{field}")
        check(
            self.num_heads % self.num_kv_heads == 0,
            f"config.model.num_heads={self.num_heads} is not divisible by config.model.num_kv_heads="
            f"{self.num_kv_heads}: grouped-query attention shares each kv head among an equal number "
            "of query heads; choose num_kv_heads dividing num_heads.",
        )
        if self.head_dim is None:
            check(
                self.embed_dim % self.num_heads == 0,
                f"config.model.embed_dim={self.embed_dim} is not divisible by config.model.num_heads="
                f"{self.num_heads}: set --config.model.head_dim explicitly or change the sizes.",
            )
        head_dim = self.head_dim or self.embed_dim // self.num_heads
        check(head_dim % 2 == 0, f"head_dim={head_dim} must be even for rotary embeddings.")
        for field in ("dtype", "param_dtype"):
            value = getattr(self, field)
            check(value in DTYPES, f"config.model.{field}={value!r} is not one of {DTYPES}.")
        check(
            self.remat in REMAT_POLICIES,
            f"config.model.remat={self.remat!r} is not one of {tuple(REMAT_POLICIES)}.",
        )
        check(
            self.attention_impl is None or self.attention_impl in IMPLEMENTATIONS,
            f"config.model.attention_impl={self.attention_impl!r} is not one of "
            f"{IMPLEMENTATIONS} (or unset, to pick the fastest for the backend).",
        )
        check(
            self.context_parallel in CONTEXT_PARALLEL,
            f"config.model.context_parallel={self.context_parallel!r} is not one of "
            f"{CONTEXT_PARALLEL}.",
        )
        check(self.rope_theta > 0, f"config.model.rope_theta must be > 0, got {self.rope_theta}.")
        for field in ("rope_local_theta", "query_pre_attn_scalar", "final_logit_softcap"):
            value = getattr(self, field)
            check(
                value is None or value > 0,
                f"config.model.{field} must be > 0 or None (off), got {value!r}.",
            )
        check(
            self.parametrization in PARAMETRIZATIONS,
            f"config.model.parametrization={self.parametrization!r} is not one of "
            f"{PARAMETRIZATIONS}: sp (standard) or mup (maximal update, with mup_base_width).",
        )
        check(
            self.mup_readout in MUP_READOUTS,
            f"config.model.mup_readout={self.mup_readout!r} is not one of {MUP_READOUTS}.",
        )
        check(
            self.mlp_activation in MLP_ACTIVATIONS,
            f"config.model.mlp_activation={self.mlp_activation!r} is not one of {MLP_ACTIVATIONS}.",
        )
        check(
            self.mlp_activation == "silu" or not self.moe.num_experts,
            f"config.model.mlp_activation={self.mlp_activation!r}: MoE experts are SwiGLU; use "
            "silu with config.model.moe.num_experts > 0.",
        )
        m = self.moe
        check(
            not (self.scan_layers and m.num_experts and (m.first_dense_layers or m.every > 1)),
            "config.model.scan_layers=True stacks identical layers, so every layer must be MoE: "
            f"config.model.moe.first_dense_layers={m.first_dense_layers} and every={m.every} mix "
            "in dense ones; set them to 0 and 1, or --config.model.scan_layers=False.",
        )
        schedule = patterns.validate(self)
        if self.parametrization == "mup":
            self._validate_mup(schedule)
        return schedule

    def _validate_mup(self, schedule: tuple[str, ...]) -> None:
        check(
            is_int(self.mup_base_width) and self.mup_base_width > 0,
            "config.model.mup_base_width must be a positive integer under parametrization='mup' "
            f"(the embed_dim the learning rate was tuned at), got {self.mup_base_width!r}: set "
            "--config.model.mup_base_width=N.",
        )
        if self.mup_base_head_dim is None:
            check(
                self.mup_base_width % self.num_heads == 0,
                f"config.model.mup_base_width={self.mup_base_width} is not divisible by "
                f"config.model.num_heads={self.num_heads}: the base head dim is their quotient; "
                "set --config.model.mup_base_head_dim or a divisible mup_base_width.",
            )
        else:
            check_positive(self.mup_base_head_dim, "model.mup_base_head_dim")
        check(
            self.mup_readout != "zero" or not self.tie_embeddings,
            "config.model.mup_readout='zero' zero-initializes the output projection, which "
            "tie_embeddings=True shares with the input: set --config.model.tie_embeddings=False.",
        )
        check(
            "nsa" not in schedule,
            "config.model.parametrization='mup' has no rules for native sparse attention's "
            "parameters yet: use another config.model.attention_pattern, or parametrization='sp'.",
        )
        check(
            self.query_pre_attn_scalar is None,
            "config.model.query_pre_attn_scalar sets the attention scale, which "
            "parametrization='mup' also sets (1/head_dim): unset one of them.",
        )

    @property
    def width_multiplier(self) -> float:
        """m = embed_dim / mup_base_width under muP (every width is taken to scale by m); 1 under sp."""
        if self.parametrization != "mup":
            return 1.0
        return self.embed_dim / self.mup_base_width


def shape_differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(field, saved value, current value) for each shape-fixing field ("num_layers",
    "moe.num_experts", ...) on which two model configs (as dicts, e.g. from config.json) differ;
    MoE fields count when either model has experts. A field a dict lacks (a config saved before
    the field existed) has its default."""
    saved_moe, current_moe = saved.get("moe") or {}, current.get("moe") or {}
    keys = [(ModelConfig, None, f) for f in shape_fields(ModelConfig)]
    if saved_moe.get("num_experts") or current_moe.get("num_experts"):
        keys += [(MoEConfig, "moe", f) for f in shape_fields(MoEConfig)]
    differing = []
    for cls, section, name in keys:
        default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
        a, b = ((c.get(section) or {}) if section else c for c in (saved, current))
        if a.get(name, default) != b.get(name, default):
            label = f"{section}.{name}" if section else name
            differing.append((label, a.get(name, default), b.get(name, default)))
    return differing
