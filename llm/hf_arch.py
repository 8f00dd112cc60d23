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

HF stores every linear layer as weight[out, in] with heads flattened into one axis
(q_proj: [H*Dh, D]); ours are [in, out] with heads split out (wq: [D, H, Dh]). Both use
Llama's rotate-half RoPE on the head dimension, so no permutation is needed. Experts are one
HF tensor each (experts.{e}.gate_proj.weight: [F, D]); ours are stacked (w_gate: [E, D, F]).
"""

from __future__ import annotations

import math
from typing import Any

from llm.errors import ConfigError, check
from llm.model.config import ModelConfig, MoEConfig, RopeScaling

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
_MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")

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
    if m.num_experts:
        if m.num_shared_experts or m.shared_expert_gate:
            return "qwen2_moe"
        return "qwen3_moe" if cfg.qk_norm else "mixtral"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias:
        return "qwen2"
    return "mistral" if set(cfg.layer_patterns) == {"sliding"} else "llama"


def hf_names(path: tuple, cfg: ModelConfig) -> tuple[str | list[str], int | None]:
    """HF name of our parameter at `path`, or a list of names when ours stacks them on axis 0
    (layers under scan_layers, or experts), and its in-axes."""
    if path[0] != "blocks":
        return TOP[path]
    if cfg.scan_layers:  # ("blocks", "attn", "wq"): [num_layers, ...]
        name, n_in = BLOCK[path[1:]]
        return [f"model.layers.{i}.{name}" for i in range(cfg.num_layers)], n_in
    i, rest = path[1], path[2:]  # ("blocks", i, "attn", "wq")
    moe_names = MOE_BLOCK[model_type(cfg)] if cfg.moe.is_moe_layer(i) else {}
    if rest in moe_names:
        name = f"model.layers.{i}.{moe_names[rest]}"
        if "{e}" in name:
            return [name.format(e=e) for e in range(cfg.moe.num_experts)], 1
        return name, 1
    name, n_in = BLOCK[rest]
    return f"model.layers.{i}.{name}", n_in


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling, int | None]:
    """rope_theta, our RopeScaling and, for dynamic NTK, the max_seq_len to allow, from a
    config.json (transformers >= 5: rope_parameters; before: rope_theta and rope_scaling)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta") or hf.get("rope_theta") or 10_000.0)
    kind = rope.get("rope_type") or rope.get("type") or "default"
    max_pos = hf.get("max_position_embeddings", 2048)
    if kind == "default":
        return theta, RopeScaling(), None
    if kind not in ("linear", "dynamic", "llama3", "yarn"):
        raise ConfigError(
            f"rope_scaling type {kind!r} (config.json rope_parameters.rope_type) is not "
            "implemented: llm.model.layers supports default, linear, dynamic, yarn and llama3."
        )
    fields = {"type": kind, "factor": rope.get("factor")}
    if kind == "dynamic":  # transformers scales beyond max_position_embeddings
        fields["original_max_position"] = max_pos
    else:
        fields["original_max_position"] = rope.get("original_max_position_embeddings", max_pos)
    if kind == "llama3":
        fields |= {k: rope[k] for k in ("low_freq_factor", "high_freq_factor") if k in rope}
    if kind == "yarn":
        if fields["factor"] is None:
            fields["factor"] = max_pos / fields["original_max_position"]
        fields |= {k: rope[k] for k in ("beta_fast", "beta_slow") if rope.get(k)}
        fields["truncate"] = rope.get("truncate", True)
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        factor = rope.get("attention_factor")
        if factor is None and mscale and mscale_all:  # DeepSeek's ratio of two mscales

            def get_mscale(m: float) -> float:
                return 0.1 * m * math.log(fields["factor"]) + 1.0 if fields["factor"] > 1 else 1.0

            factor = get_mscale(mscale) / get_mscale(mscale_all)
        fields["attention_factor"] = factor
    if fields["factor"] is None:
        raise ConfigError(f"config.json rope_parameters of type {kind!r} lacks its 'factor'.")
    scaling = RopeScaling(**fields)
    return theta, scaling, int(max_pos * scaling.factor) if kind == "dynamic" else None


def _rope_to_hf(cfg: ModelConfig) -> dict:
    s, theta = cfg.rope_scaling, cfg.rope_theta
    if s.type == "none":
        return {"rope_type": "default", "rope_theta": theta}
    rope = {"rope_type": s.type, "rope_theta": theta, "factor": s.factor}
    if s.type != "dynamic":  # dynamic's original length is max_position_embeddings
        rope["original_max_position_embeddings"] = s.original_max_position
    if s.type == "llama3":
        rope |= {"low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor}
    if s.type == "yarn":
        rope |= {"beta_fast": s.beta_fast, "beta_slow": s.beta_slow, "truncate": s.truncate}
        if s.attention_factor is not None:
            rope["attention_factor"] = float(s.attention_factor)
    return rope


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
    unsupported = {
        "model_type": kind not in ARCHITECTURES,
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(hf.get("attention_bias")),
        "mlp_bias": bool(hf.get("mlp_bias")),
        "partial_rotary_factor": rope.get("partial_rotary_factor", 1.0) != 1.0,
        "qkv_bias": kind not in ("qwen2_moe", None) and bool(hf.get("qkv_bias")),
        "norm_topk_prob": kind == "mixtral" and hf.get("norm_topk_prob") is False,
    }
    bad = [f"{key}={hf.get(key)!r}" for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ConfigError(
            f"Unsupported Hugging Face config ({', '.join(bad)}): llm.model implements "
            f"model_type in {tuple(ARCHITECTURES)} with silu MLPs, no o_proj or MLP biases and "
            "full RoPE."
        )
    theta, scaling, dynamic_len = _rope_from_hf(hf)
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
        qk_norm=kind in ("qwen3", "qwen3_moe"),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        dtype=dtype,
        param_dtype=dtype,
        scan_layers=scan_layers,
        moe=_moe_from_hf(hf, kind),
        attention_pattern=pattern,
        **({"attention_window": window} if window else {}),
    )


def check_saveable(cfg: ModelConfig) -> None:
    """ConfigError where the HF architecture of `cfg` would compute something else."""
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
    ]
    bad = [problem for is_bad, problem in problems if is_bad]
    check(
        not bad,
        f"Cannot save as {ARCHITECTURES[kind]}: {'; '.join(bad)}. Saveable: dense or sliding "
        "attention layers; softmax_topk MoE in every layer (Mixtral), with gated shared experts "
        "(Qwen2-MoE) or with qk_norm (Qwen3-MoE).",
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
    rope = _rope_to_hf(cfg)
    max_pos = cfg.max_seq_len
    if rope["rope_type"] == "dynamic":  # transformers' original length
        max_pos = cfg.rope_scaling.original_max_position
    return {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_pos,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope if rope["rope_type"] != "default" else None,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": cfg.param_dtype,
        **extra,
    }
