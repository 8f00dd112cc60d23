"""The Hugging Face architectures llm.hf reads and writes: config.json <-> ModelConfig, and the
tensor name of each of our parameters. llm.hf does the files.

    model_type  class                 our features
    llama       LlamaForCausalLM      dense attention, SwiGLU; any rope_scaling; explicit head_dim
    mistral     MistralForCausalLM    + a sliding window in every layer (attention_pattern sliding)
    qwen2       Qwen2ForCausalLM      + q, k, v biases (qkv_bias); sliding layers by layer_types
    qwen3       Qwen3ForCausalLM      + RMSNorm per q and k head (qk_norm); layer_types
    mixtral     MixtralForCausalLM    MoE in every layer (renormalized top-k); optional window
    qwen2_moe   Qwen2MoeForCausalLM   MoE + gated shared experts; qkv_bias; norm_topk_prob
    qwen3_moe   Qwen3MoeForCausalLM   MoE, qk_norm; norm_topk_prob; mlp_only_layers
    gemma3_text Gemma3ForCausalLM     embed_scale, norm_plus_one, post_norms, gelu_tanh, qk_norm,
                                      query_pre_attn_scalar, rope_local_theta, final_logit_softcap

HF stores every linear layer as weight[out, in] with heads flattened into one axis
(q_proj: [H*Dh, D]); ours are [in, out] with heads split out (wq: [D, H, Dh]). Both use
Llama's rotate-half RoPE on the head dimension, so no permutation is needed. Experts are one
HF tensor each (experts.{e}.gate_proj.weight: [F, D]); ours are stacked (w_gate: [E, D, F]).
"""

from __future__ import annotations

from typing import Any

from llm.errors import ConfigError, check
from llm.hf_rope import rope_from_hf, rope_to_hf
from llm.model.config import ModelConfig, MoEConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
_MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
GELU_TANH = "gelu_pytorch_tanh"  # Gemma's hidden_activation

# Our parameter path -> (HF tensor name, number of leading "in" axes of our array; None = copied
# as is, 0 = a bias: our [heads, Dh] is HF's [heads * Dh]).
TOP = {
    ("embed",): ("model.embed_tokens.weight", None),
    ("final_norm", "scale"): ("model.norm.weight", None),
    ("unembed",): ("lm_head.weight", 1),
}
BLOCK = {  # inside one decoder layer, HF names relative to model.layers.{i}
    ("attn_norm", "scale"): ("input_layernorm.weight", None),
    ("attn", "wq"): ("self_attn.q_proj.weight", 1),
    ("attn", "wk"): ("self_attn.k_proj.weight", 1),
    ("attn", "wv"): ("self_attn.v_proj.weight", 1),
    ("attn", "wo"): ("self_attn.o_proj.weight", 2),
    ("attn", "bq"): ("self_attn.q_proj.bias", 0),
    ("attn", "bk"): ("self_attn.k_proj.bias", 0),
    ("attn", "bv"): ("self_attn.v_proj.bias", 0),
    ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", None),
    ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", None),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", None),
    ("mlp", "w_gate"): ("mlp.gate_proj.weight", 1),
    ("mlp", "w_up"): ("mlp.up_proj.weight", 1),
    ("mlp", "w_down"): ("mlp.down_proj.weight", 1),
}
# Gemma's four norms per layer: its post_attention_layernorm is the attention branch's output.
POST_NORM_BLOCK = {
    ("mlp_norm", "scale"): ("pre_feedforward_layernorm.weight", None),
    ("attn_post_norm", "scale"): ("post_attention_layernorm.weight", None),
    ("mlp_post_norm", "scale"): ("post_feedforward_layernorm.weight", None),
}
# An MoE layer's tensors (llm.model.moe.MoE), per model_type; all [out, in] (n_in = 1), {e}: expert.
_QWEN_MOE = {
    ("mlp", "router"): "mlp.gate.weight",
    ("mlp", "w_gate"): "mlp.experts.{e}.gate_proj.weight",
    ("mlp", "w_up"): "mlp.experts.{e}.up_proj.weight",
    ("mlp", "w_down"): "mlp.experts.{e}.down_proj.weight",
    ("mlp", "shared", "w_gate"): "mlp.shared_expert.gate_proj.weight",
    ("mlp", "shared", "w_up"): "mlp.shared_expert.up_proj.weight",
    ("mlp", "shared", "w_down"): "mlp.shared_expert.down_proj.weight",
    ("mlp", "shared_gate"): "mlp.shared_expert_gate.weight",
}
MOE_BLOCK = {
    "mixtral": {
        ("mlp", "router"): "block_sparse_moe.gate.weight",
        ("mlp", "w_gate"): "block_sparse_moe.experts.{e}.w1.weight",
        ("mlp", "w_up"): "block_sparse_moe.experts.{e}.w3.weight",
        ("mlp", "w_down"): "block_sparse_moe.experts.{e}.w2.weight",
    },
    "qwen2_moe": _QWEN_MOE,
    "qwen3_moe": _QWEN_MOE,
}


def model_type(cfg: ModelConfig) -> str:
    """The HF architecture `cfg` is saved as (module docstring)."""
    m = cfg.moe
    gemma = (cfg.embed_scale, cfg.norm_plus_one, cfg.post_norms, cfg.mlp_activation != "silu")
    if any(gemma) or cfg.final_logit_softcap or cfg.query_pre_attn_scalar or cfg.rope_local_theta:
        return "gemma3_text"
    if m.num_experts:
        if m.num_shared_experts or m.shared_expert_gate:
            return "qwen2_moe"
        return "qwen3_moe" if cfg.qk_norm else "mixtral"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias:
        return "qwen2"
    return "mistral" if set(cfg.layer_patterns) == {"sliding"} else "llama"


def check_mappable(cfg: ModelConfig) -> None:
    """ConfigError where our parameters have no HF names: stacked MoE layers (layers x experts)."""
    check(
        not (cfg.scan_layers and cfg.moe.num_experts),
        "scan_layers=True is not supported with MoE layers in Hugging Face checkpoints (stacked "
        "experts have no name mapping): load, save or export MoE models with scan_layers=False.",
    )


def hf_names(path: tuple, cfg: ModelConfig) -> tuple[str | list[str], int | None]:
    """HF name of our parameter at `path`, or a list of names when ours stacks them on axis 0
    (layers under scan_layers, or experts), and its in-axes."""
    if path[0] != "blocks":
        return TOP[path]
    check_mappable(cfg)
    block = BLOCK | POST_NORM_BLOCK if cfg.post_norms else BLOCK
    if cfg.scan_layers:  # ("blocks", "attn", "wq"): [num_layers, ...]
        name, n_in = block[path[1:]]
        return [f"model.layers.{i}.{name}" for i in range(cfg.num_layers)], n_in
    i, rest = path[1], path[2:]  # ("blocks", i, "attn", "wq")
    moe_names = MOE_BLOCK[model_type(cfg)] if cfg.moe.is_moe_layer(i) else {}
    if rest in moe_names:
        name = f"model.layers.{i}.{moe_names[rest]}"
        if "{e}" in name:
            return [name.format(e=e) for e in range(cfg.moe.num_experts)], 1
        return name, 1
    name, n_in = block[rest]
    return f"model.layers.{i}.{name}", n_in


def _layer_patterns(hf: dict, kind: str, num_layers: int) -> tuple[str, int | None]:
    """Our attention_pattern and window of a config.json: sliding where HF layers slide."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if not window:
        return "dense", None
    types = hf.get("layer_types")
    if types is None:
        last = hf.get("max_window_layers", num_layers)
        types = [
            {  # transformers' defaults when a config.json has no layer_types
                "qwen2": i >= last,
                "qwen3": i >= last,
                "qwen2_moe": bool((i + 1) % 2) and i < last,
                "gemma3_text": bool((i + 1) % hf.get("sliding_window_pattern", 6)),
            }.get(kind, True)
            for i in range(num_layers)
        ]
        types = ["sliding_attention" if t else "full_attention" for t in types]
    known = {"sliding_attention": "sliding", "full_attention": "dense"}
    bad = sorted(set(types) - set(known))
    check(not bad, f"config.json layer_types {bad} are not implemented (full or sliding only).")
    if kind in ("mistral", "mixtral", "qwen3_moe") and set(types) != {"sliding_attention"}:
        types = ["sliding_attention"] * num_layers  # these slide in every layer
    runs: list[list] = []
    for name in (known[t] for t in types):
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    return ",".join(f"{n}*{c}" if c > 1 else n for n, c in runs), int(window)


def _moe_from_hf(hf: dict, kind: str) -> MoEConfig:
    """The MoE fields of a Mixtral, Qwen2-MoE or Qwen3-MoE config.json (dense otherwise)."""
    if kind not in _MOE_TYPES:
        return MoEConfig()
    k = hf["num_experts_per_tok"]
    if kind == "mixtral":  # every layer MoE, no shared experts
        return MoEConfig(
            num_experts=hf["num_local_experts"], top_k=k, expert_mlp_dim=hf["intermediate_size"]
        )
    f = hf["moe_intermediate_size"]
    shared = hf["shared_expert_intermediate_size"] if kind == "qwen2_moe" else 0
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
    num_layers = hf["num_hidden_layers"]
    layers = [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]
    num_experts = hf["num_experts" if "num_experts" in hf else "num_local_experts"]  # v5 qwen3_moe
    moe = MoEConfig(
        num_experts=num_experts,
        top_k=k,
        expert_mlp_dim=f,
        every=layers[1] - layers[0] if len(layers) > 1 else 1,
        first_dense_layers=layers[0] if layers else 0,
        num_shared_experts=shared // f,
        shared_expert_gate=kind == "qwen2_moe",
        norm_topk_prob=bool(hf.get("norm_topk_prob", kind == "qwen2_moe")),
    )
    ok_shared = kind == "qwen3_moe" or (shared > 0 and shared % f == 0)
    if not ok_shared or [i for i in range(num_layers) if moe.is_moe_layer(i)] != layers:
        raise ConfigError(
            f"Unsupported Hugging Face config (num_experts={num_experts}, MoE layers "
            f"{layers}, shared_expert_intermediate_size={shared}, moe_intermediate_size={f}): "
            "llm.model.moe needs MoE layers at first_dense_layers + every * n and shared experts of a "
            "positive multiple of moe_intermediate_size."
        )
    return moe


def config_from_hf(hf: dict, *, dtype: str, scan_layers: bool) -> ModelConfig:
    """Our ModelConfig from a HF config.json; ConfigError naming the field we do not implement."""
    kind = hf.get("model_type")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    act = GELU_TANH if kind == "gemma3_text" else "silu"
    unsupported = {
        "model_type": kind not in ARCHITECTURES,
        "hidden_act": hf.get("hidden_act", act) != act,
        "attention_bias": bool(hf.get("attention_bias")),
        "mlp_bias": bool(hf.get("mlp_bias")),
        "partial_rotary_factor": rope.get("partial_rotary_factor", 1.0) != 1.0,
        "qkv_bias": kind not in ("qwen2_moe", None) and bool(hf.get("qkv_bias")),
        "norm_topk_prob": kind == "mixtral" and hf.get("norm_topk_prob") is False,
        "hidden_activation": hf.get("hidden_activation", GELU_TANH) != GELU_TANH,
        "attn_logit_softcapping": hf.get("attn_logit_softcapping") is not None,
        "use_bidirectional_attention": bool(hf.get("use_bidirectional_attention")),
    }
    bad = [f"{key}={hf.get(key)!r}" for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ConfigError(
            f"Unsupported Hugging Face config ({', '.join(bad)}): llm.model implements "
            f"model_type in {tuple(ARCHITECTURES)} with silu MLPs, no o_proj or MLP biases and "
            "full RoPE."
        )
    theta, scaling, dynamic_len, local_theta = rope_from_hf(hf, kind)
    gemma = kind == "gemma3_text"
    num_layers = hf["num_hidden_layers"]
    pattern, window = _layer_patterns(hf, kind, num_layers)
    heads = hf["num_attention_heads"]
    max_pos = hf.get("max_position_embeddings", 2048)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        num_layers=num_layers,
        embed_dim=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"),  # None: ModelConfig derives hidden_size // heads
        mlp_dim=hf["intermediate_size"],
        max_seq_len=dynamic_len or max_pos,
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=kind == "qwen2" or (kind == "qwen2_moe" and bool(hf.get("qkv_bias", True))),
        qk_norm=kind in ("qwen3", "qwen3_moe", "gemma3_text"),
        rope_local_theta=local_theta,
        embed_scale=gemma,
        norm_plus_one=gemma,
        post_norms=gemma,
        mlp_activation="gelu_tanh" if gemma else "silu",
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if gemma else None,
        final_logit_softcap=hf.get("final_logit_softcapping"),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", gemma),
        dtype=dtype,
        param_dtype=dtype,
        scan_layers=scan_layers,
        moe=_moe_from_hf(hf, kind),
        attention_pattern=pattern,
        **({"attention_window": window} if window else {}),
    )


def check_saveable(cfg: ModelConfig) -> None:
    """ConfigError where the HF architecture of `cfg` would compute something else."""
    check_mappable(cfg)
    m, kind = cfg.moe, model_type(cfg)
    every_layer = all(m.is_moe_layer(i) for i in range(cfg.num_layers))
    layer_types = set(cfg.layer_patterns)
    uniform = len(layer_types) == 1
    problems = [
        (not layer_types <= {"dense", "sliding"}, f"attention_pattern={cfg.attention_pattern!r}"),
        (kind in ("llama", "mixtral", "qwen3_moe") and not uniform, "mixed dense/sliding layers"),
        (m.num_experts and m.router != "softmax_topk", f"moe.router={m.router!r}"),
        (kind == "mixtral" and not every_layer, "dense layers (Mixtral has none)"),
        (kind == "mixtral" and not m.norm_topk_prob, "moe.norm_topk_prob=False"),
        (kind == "mixtral" and cfg.qkv_bias, "qkv_bias (Mixtral has none)"),
        (kind == "qwen2_moe" and not m.shared_expert_gate, "moe.shared_expert_gate=False"),
        (kind == "qwen2_moe" and cfg.qk_norm, "qk_norm (Qwen2-MoE has none)"),
        (kind in ("qwen3", "qwen3_moe") and cfg.qkv_bias, "qkv_bias with qk_norm"),
        (cfg.width_multiplier != 1, "parametrization='mup' off its base width (logit multiplier)"),
    ]
    if kind == "gemma3_text":  # all of Gemma 3's features, or none
        gemma = ("embed_scale", "norm_plus_one", "post_norms", "qk_norm")
        problems += [(not getattr(cfg, f), f"{f}=False (Gemma 3 has it)") for f in gemma]
        problems += [
            (cfg.mlp_activation != "gelu_tanh", f"mlp_activation={cfg.mlp_activation!r}"),
            (cfg.qkv_bias or m.num_experts, "qkv_bias or MoE layers"),
            (
                cfg.rope_local_theta is None and cfg.rope_scaling.type != "none",
                "rope_scaling without rope_local_theta (Gemma's local layers are unscaled)",
            ),
        ]
    bad = [problem for is_bad, problem in problems if is_bad]
    check(
        not bad,
        f"Cannot save as {ARCHITECTURES[kind]}: {'; '.join(bad)}. Saveable: dense or sliding "
        "attention layers; softmax_topk MoE in every layer (Mixtral), with gated shared experts "
        "(Qwen2-MoE) or with qk_norm (Qwen3-MoE); Gemma 3's features all together.",
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json of `cfg` as its HF architecture (model_type)."""
    kind, m = model_type(cfg), cfg.moe
    sliding = ["sliding" in p for p in cfg.layer_patterns]
    window = cfg.attention_window if any(sliding) else None
    extra: dict[str, Any] = {"attention_bias": False, "mlp_bias": False}
    if kind in ("mistral", "mixtral"):
        extra = {"sliding_window": window}
    if kind in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        extra = {"use_sliding_window": window is not None, "sliding_window": window}
        extra["max_window_layers"] = cfg.num_layers
        if kind != "qwen3_moe":
            extra["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
        if kind in ("qwen3", "qwen3_moe"):
            extra["attention_bias"] = False
    if kind == "mixtral":
        extra |= {
            "intermediate_size": m.expert_mlp_dim,
            "num_local_experts": m.num_experts,
            "num_experts_per_tok": m.top_k,
            "router_jitter_noise": 0.0,
        }
    if kind in ("qwen2_moe", "qwen3_moe"):
        extra |= {
            "moe_intermediate_size": m.expert_mlp_dim,
            "num_experts": m.num_experts,
            "num_experts_per_tok": m.top_k,
            "norm_topk_prob": m.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(cfg.num_layers) if not m.is_moe_layer(i)],
        }
    if kind == "qwen2_moe":
        extra["shared_expert_intermediate_size"] = m.num_shared_experts * m.expert_mlp_dim
        extra["qkv_bias"] = cfg.qkv_bias
    rope = rope_to_hf(cfg)
    max_pos = cfg.max_seq_len
    if rope["rope_type"] == "dynamic":  # transformers' original length
        max_pos = cfg.rope_scaling.original_max_position
    legacy_rope = {"rope_theta": cfg.rope_theta, "rope_scaling": None}
    if rope["rope_type"] != "default":
        legacy_rope["rope_scaling"] = rope
    if kind == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
        rope, legacy_rope = {"full_attention": rope, "sliding_attention": local}, {}
        extra = {
            "hidden_activation": GELU_TANH,
            "query_pre_attn_scalar": cfg.query_pre_attn_scalar or cfg.head_dim,
            "final_logit_softcapping": cfg.final_logit_softcap,
            "attn_logit_softcapping": None,
            "sliding_window": window,
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "attention_bias": False,
            "use_bidirectional_attention": False,
        }
    config = {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": cfg.norm_eps,
        **legacy_rope,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": cfg.param_dtype,
        **extra,
    }
    if kind != "gemma3_text":
        config["hidden_act"] = "silu"
    return config
