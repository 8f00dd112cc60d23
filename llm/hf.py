"""Hugging Face interop: load and save Llama, Mixtral and Qwen2-MoE checkpoints (config.json +
safetensors).

    model = llm.hf.load("/path/to/llama")   # a *ForCausalLM directory, sharded or not
    llm.hf.save(model, "/tmp/out")          # transformers.AutoModelForCausalLM.from_pretrained works
    llm.hf.save(model, "/tmp/out", tokenizer=Tokenizer())  # + AutoTokenizer, generation config

HF stores every linear layer as weight[out, in] with heads flattened into one axis
(q_proj: [H*Dh, D]); ours are [in, out] with heads split out (wq: [D, H, Dh]). Both use
Llama's rotate-half RoPE on the head dimension, so no permutation is needed. Experts are one
HF tensor each (experts.{e}.w1.weight: [F, D]); ours are stacked (w_gate: [E, D, F]).

save picks the architecture from the config: dense -> LlamaForCausalLM; MoE in every layer,
softmax router, no shared experts -> MixtralForCausalLM; shared experts with
moe.shared_expert_gate -> Qwen2MoeForCausalLM (dense layers anywhere, via mlp_only_layers).
Both MoE models renormalize the top-k softmax scores as llm.model.moe does (Qwen2-MoE only with
norm_topk_prob=true); load refuses configs that llm.model does not implement.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from data.tokenizer import UNK_ID, Tokenizer
from llm.model.config import ModelConfig, MoEConfig
from llm.model.transformer import Transformer

# Our parameter path -> (HF tensor name, number of leading "in" axes of our array; 0 = copied as is).
_TOP = {
    ("embed",): ("model.embed_tokens.weight", 0),
    ("final_norm", "scale"): ("model.norm.weight", 0),
    ("unembed",): ("lm_head.weight", 1),
}
_BLOCK = {  # inside one decoder layer, HF names relative to model.layers.{i}
    ("attn_norm", "scale"): ("input_layernorm.weight", 0),
    ("attn", "wq"): ("self_attn.q_proj.weight", 1),
    ("attn", "wk"): ("self_attn.k_proj.weight", 1),
    ("attn", "wv"): ("self_attn.v_proj.weight", 1),
    ("attn", "wo"): ("self_attn.o_proj.weight", 2),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", 0),
    ("mlp", "w_gate"): ("mlp.gate_proj.weight", 1),
    ("mlp", "w_up"): ("mlp.up_proj.weight", 1),
    ("mlp", "w_down"): ("mlp.down_proj.weight", 1),
}

# An MoE layer's tensors (llm.model.moe.MoE), per model_type; all [out, in] (n_in = 1), {e}: expert.
_MOE_BLOCK = {
    "mixtral": {
        ("mlp", "router"): "block_sparse_moe.gate.weight",
        ("mlp", "w_gate"): "block_sparse_moe.experts.{e}.w1.weight",
        ("mlp", "w_up"): "block_sparse_moe.experts.{e}.w3.weight",
        ("mlp", "w_down"): "block_sparse_moe.experts.{e}.w2.weight",
    },
    "qwen2_moe": {
        ("mlp", "router"): "mlp.gate.weight",
        ("mlp", "w_gate"): "mlp.experts.{e}.gate_proj.weight",
        ("mlp", "w_up"): "mlp.experts.{e}.up_proj.weight",
        ("mlp", "w_down"): "mlp.experts.{e}.down_proj.weight",
        ("mlp", "shared", "w_gate"): "mlp.shared_expert.gate_proj.weight",
        ("mlp", "shared", "w_up"): "mlp.shared_expert.up_proj.weight",
        ("mlp", "shared", "w_down"): "mlp.shared_expert.down_proj.weight",
        ("mlp", "shared_gate"): "mlp.shared_expert_gate.weight",
    },
}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}


def _model_type(cfg: ModelConfig) -> str:
    m = cfg.moe
    if not m.num_experts:
        return "llama"
    return "qwen2_moe" if m.num_shared_experts or m.shared_expert_gate else "mixtral"


def _hf_names(path: tuple, cfg: ModelConfig) -> tuple[str | list[str], int]:
    """HF name of our parameter at `path`, or a list of names when ours stacks them on axis 0
    (layers under scan_layers, or experts), and its in-axes."""
    if path[0] != "blocks":
        return _TOP[path]
    if cfg.scan_layers:  # ("blocks", "attn", "wq"): [num_layers, ...]
        name, n_in = _BLOCK[path[1:]]
        return [f"model.layers.{i}.{name}" for i in range(cfg.num_layers)], n_in
    i, rest = path[1], path[2:]  # ("blocks", i, "attn", "wq")
    moe_names = _MOE_BLOCK[_model_type(cfg)] if cfg.moe.is_moe_layer(i) else {}
    if rest in moe_names:
        name = f"model.layers.{i}.{moe_names[rest]}"
        if "{e}" in name:
            return [name.format(e=e) for e in range(cfg.moe.num_experts)], 1
        return name, 1
    name, n_in = _BLOCK[rest]
    return f"model.layers.{i}.{name}", n_in


def _to_hf(x: np.ndarray, n_in: int) -> np.ndarray:
    """Ours [in..., out...] -> HF [out, in] (vectors unchanged)."""
    return x if n_in == 0 else x.reshape(math.prod(x.shape[:n_in]), -1).T


def _from_hf(w: np.ndarray, shape: tuple[int, ...], n_in: int) -> np.ndarray:
    """HF [out, in] -> ours of `shape` [in..., out...] (vectors unchanged)."""
    expected = shape if n_in == 0 else (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    if w.shape != expected:
        raise ValueError(f"shape {w.shape}, expected {expected}")
    return w if n_in == 0 else w.T.reshape(shape)


def _moe_from_hf(hf: dict) -> MoEConfig:
    """The MoE fields of a Mixtral or Qwen2-MoE config.json (dense for Llama)."""
    if hf["model_type"] == "llama":
        return MoEConfig()
    k = hf["num_experts_per_tok"]
    if hf["model_type"] == "mixtral":  # every layer MoE, no shared experts
        return MoEConfig(
            num_experts=hf["num_local_experts"], top_k=k, expert_mlp_dim=hf["intermediate_size"]
        )
    f, shared = hf["moe_intermediate_size"], hf["shared_expert_intermediate_size"]
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
    num_layers = hf["num_hidden_layers"]
    layers = [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]
    moe = MoEConfig(
        num_experts=hf["num_experts"],
        top_k=k,
        expert_mlp_dim=f,
        every=layers[1] - layers[0] if len(layers) > 1 else 1,
        first_dense_layers=layers[0] if layers else 0,
        num_shared_experts=shared // f,
        shared_expert_gate=True,
    )
    if shared <= 0 or shared % f or [i for i in range(num_layers) if moe.is_moe_layer(i)] != layers:
        raise ValueError(
            f"Unsupported Hugging Face config (num_experts={hf['num_experts']}, MoE layers "
            f"{layers}, shared_expert_intermediate_size={shared}, moe_intermediate_size={f}): "
            "llm.model.moe needs MoE layers at first_dense_layers + every * n and shared experts of a "
            "positive multiple of moe_intermediate_size."
        )
    return moe


def _config_from_hf(hf: dict, *, dtype: str, scan_layers: bool) -> ModelConfig:
    """Our ModelConfig from a HF config.json; ValueError for what we do not implement."""
    rope = hf.get("rope_parameters") or {}  # transformers >= 5; before: rope_theta, rope_scaling
    model_type = hf.get("model_type")
    unsupported = {
        "model_type": model_type not in ARCHITECTURES,
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(hf.get("attention_bias")),
        "qkv_bias": bool(hf.get("qkv_bias")),
        "mlp_bias": bool(hf.get("mlp_bias")),
        "sliding_window": bool(hf.get("sliding_window")) and hf.get("use_sliding_window", True),
        "norm_topk_prob": model_type == "qwen2_moe" and not hf.get("norm_topk_prob"),
        "rope_scaling": hf.get("rope_scaling") is not None,
        "rope_parameters": rope.get("rope_type", "default") != "default",
    }
    bad = [f"{key}={hf.get(key)!r}" for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(
            f"Unsupported Hugging Face config ({', '.join(bad)}): llm.model implements "
            f"model_type in {tuple(ARCHITECTURES)} with silu MLPs, no biases, full causal "
            "attention, plain (unscaled) RoPE and renormalized top-k routing (Qwen2-MoE: "
            "norm_topk_prob=true)."
        )
    heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        num_layers=hf["num_hidden_layers"],
        embed_dim=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"),  # None: ModelConfig derives hidden_size // heads
        mlp_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta", 10_000.0)),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        dtype=dtype,
        param_dtype=dtype,
        scan_layers=scan_layers,
        moe=_moe_from_hf(hf),
    )


def _config_to_hf(cfg: ModelConfig) -> dict:
    model_type, m = _model_type(cfg), cfg.moe
    moe = {
        "llama": {"attention_bias": False, "mlp_bias": False},
        "mixtral": {
            "intermediate_size": m.expert_mlp_dim,
            "num_local_experts": m.num_experts,
            "num_experts_per_tok": m.top_k,
            "sliding_window": None,
            "router_jitter_noise": 0.0,
        },
        "qwen2_moe": {
            "moe_intermediate_size": m.expert_mlp_dim,
            "shared_expert_intermediate_size": m.num_shared_experts * m.expert_mlp_dim,
            "num_experts": m.num_experts,
            "num_experts_per_tok": m.top_k,
            "norm_topk_prob": True,
            "qkv_bias": False,
            "use_sliding_window": False,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(cfg.num_layers) if not m.is_moe_layer(i)],
        },
    }[model_type]
    return {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": cfg.param_dtype,
        **moe,
    }


def _check_saveable(model: Transformer) -> None:
    """ValueError where the HF architecture of `model` would compute something else."""
    cfg, m, model_type = model.cfg, model.cfg.moe, _model_type(model.cfg)
    every_layer = all(m.is_moe_layer(i) for i in range(cfg.num_layers))
    moe_blocks = [model.blocks[i] for i in range(cfg.num_layers) if m.is_moe_layer(i)]
    biased = any(np.any(np.asarray(b.mlp.expert_bias[...])) for b in moe_blocks)
    problems = [
        (m.num_experts and m.router != "softmax_topk", f"moe.router={m.router!r}"),
        (model_type == "mixtral" and not every_layer, "dense layers (Mixtral has none)"),
        (model_type == "qwen2_moe" and not m.shared_expert_gate, "moe.shared_expert_gate=False"),
        (biased, "a nonzero expert_bias (HF routers have no selection bias)"),
    ]
    bad = [problem for is_bad, problem in problems if is_bad]
    if bad:
        raise ValueError(
            f"Cannot save as {ARCHITECTURES[model_type]}: {'; '.join(bad)}. Saveable: dense "
            "(Llama); softmax_topk MoE in every layer (Mixtral); softmax_topk MoE with shared "
            "experts and moe.shared_expert_gate=True (Qwen2-MoE)."
        )


def _open_tensors(path: pathlib.Path) -> dict:
    """Tensor name -> open safetensors file holding it (single-file or sharded checkpoint)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{path} has neither model.safetensors nor model.safetensors.index.json "
            "(PyTorch .bin checkpoints are not supported; re-save with safetensors)."
        )
    handles = {}
    for file in files:
        if not (path / file).is_file():
            raise FileNotFoundError(f"{path / file} is listed in {index.name} but missing.")
        f = safe_open(path / file, framework="numpy")
        handles.update(dict.fromkeys(f.keys(), f))
    return handles


def load(path: str, *, dtype: str = "float32", scan_layers: bool = False) -> Transformer:
    """A Transformer with the weights of the HF checkpoint directory `path`, cast to `dtype`."""
    path = pathlib.Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path / 'config.json'} not found: expected a Hugging Face "
            "checkpoint directory (config.json + *.safetensors)."
        )
    cfg = _config_from_hf(
        json.loads((path / "config.json").read_text()), dtype=dtype, scan_layers=scan_layers
    )
    tensors = _open_tensors(path)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    for key, like in flat.items():
        if key[-1] == "expert_bias":  # balancing state, not a weight: starts at 0
            flat[key] = jnp.zeros(like.shape, like.dtype)
            continue
        names, n_in = _hf_names(key, cfg)
        stacked = isinstance(names, list)
        shape = like.shape[1:] if stacked else like.shape
        arrays = []
        for name in names if stacked else [names]:
            if name not in tensors:
                raise ValueError(
                    f"{path}: tensor {name!r} (for {'.'.join(map(str, key))}) is missing."
                )
            try:
                arrays.append(_from_hf(tensors[name].get_tensor(name), shape, n_in))
            except ValueError as err:
                raise ValueError(f"{path}: tensor {name!r} has {err}.") from None
        flat[key] = jnp.asarray(np.stack(arrays) if stacked else arrays[0], dtype=cfg.param_dtype)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
    return nnx.merge(graphdef, state)


def save(model: Transformer, path: str, *, tokenizer: Tokenizer | None = None) -> None:
    """Writes `model` as a HF Llama, Mixtral or Qwen2-MoE directory (module docstring):
    config.json + model.safetensors; with `tokenizer`, also its special-token ids, the tokenizer
    (`save_tokenizer`) and generation_config.json."""
    cfg, path = model.cfg, pathlib.Path(path)
    if set(cfg.layer_patterns) != {"dense"}:
        raise ValueError(
            f"attention_pattern={cfg.attention_pattern!r}: a HF Llama attends densely, so this "
            "model would load as a different one; only dense models can be saved."
        )
    _check_saveable(model)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tensors = {}
    for key, x in flat.items():
        names, n_in = _hf_names(key, cfg)
        names, parts = (names, x) if isinstance(names, list) else ([names], [x])
        for name, part in zip(names, parts, strict=True):
            tensors[name] = np.ascontiguousarray(_to_hf(np.asarray(part), n_in))
    path.mkdir(parents=True, exist_ok=True)
    hf_config = _config_to_hf(cfg)
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
        ids["pad_token_id"] = tokenizer.pad_id
        hf_config.update(ids)
        (path / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
        save_tokenizer(tokenizer, path)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def save_tokenizer(tokenizer: Tokenizer, path: str | pathlib.Path) -> None:
    """Writes the sentencepiece model as transformers' LlamaTokenizer reads it (no prefix space,
    no implicit bos/eos), so `AutoTokenizer.from_pretrained(path).encode(text,
    add_special_tokens=False)` equals `tokenizer.encode(text)`."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer.path, path / "tokenizer.model")
    special = {
        "bos_token": tokenizer.piece(tokenizer.bos_id),
        "eos_token": tokenizer.piece(tokenizer.eos_id),
        "pad_token": tokenizer.piece(tokenizer.pad_id),
        "unk_token": tokenizer.piece(UNK_ID),
    }
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "model_max_length": 1 << 30,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
