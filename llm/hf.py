"""Hugging Face interop: load and save Llama checkpoints (config.json + safetensors).

    model = llm.hf.load("/path/to/llama")   # a LlamaForCausalLM directory, sharded or not
    llm.hf.save(model, "/tmp/out")          # transformers.AutoModelForCausalLM.from_pretrained works

HF stores every linear layer as weight[out, in] with heads flattened into one axis
(q_proj: [H*Dh, D]); ours are [in, out] with heads split out (wq: [D, H, Dh]). Both use
Llama's rotate-half RoPE on the head dimension, so no permutation is needed.
"""

from __future__ import annotations

import json
import math
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from llm import sparse
from llm.model import ModelConfig, Transformer

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


def _hf_names(path: tuple, cfg: ModelConfig) -> tuple[list[str], int]:
    """HF names of our parameter at `path` (one per layer if layers are stacked) and its in-axes."""
    if path[0] != "blocks":
        name, n_in = _TOP[path]
        return [name], n_in
    if cfg.scan_layers:  # ("blocks", "attn", "wq"): [num_layers, ...]
        name, n_in = _BLOCK[path[1:]]
        return [f"model.layers.{i}.{name}" for i in range(cfg.num_layers)], n_in
    name, n_in = _BLOCK[path[2:]]  # ("blocks", i, "attn", "wq")
    return [f"model.layers.{path[1]}.{name}"], n_in


def _to_hf(x: np.ndarray, n_in: int) -> np.ndarray:
    """Ours [in..., out...] -> HF [out, in] (vectors unchanged)."""
    return x if n_in == 0 else x.reshape(math.prod(x.shape[:n_in]), -1).T


def _from_hf(w: np.ndarray, shape: tuple[int, ...], n_in: int) -> np.ndarray:
    """HF [out, in] -> ours of `shape` [in..., out...] (vectors unchanged)."""
    expected = shape if n_in == 0 else (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    if w.shape != expected:
        raise ValueError(f"shape {w.shape}, expected {expected}")
    return w if n_in == 0 else w.T.reshape(shape)


def _config_from_hf(hf: dict, *, dtype: str, scan_layers: bool) -> ModelConfig:
    """Our ModelConfig from a HF Llama config.json; ValueError for what we do not implement."""
    rope = hf.get("rope_parameters") or {}  # transformers >= 5; before: rope_theta, rope_scaling
    unsupported = {
        "model_type": hf.get("model_type") != "llama",
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(hf.get("attention_bias")),
        "mlp_bias": bool(hf.get("mlp_bias")),
        "rope_scaling": hf.get("rope_scaling") is not None,
        "rope_parameters": rope.get("rope_type", "default") != "default",
    }
    bad = [f"{key}={hf.get(key)!r}" for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(
            f"Unsupported Hugging Face config ({', '.join(bad)}): llm.model implements "
            "model_type='llama' with silu MLPs, no biases and plain (unscaled) RoPE."
        )
    heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        num_layers=hf["num_hidden_layers"],
        embed_dim=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta", 10_000.0)),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        dtype=dtype,
        param_dtype=dtype,
        scan_layers=scan_layers,
    )


def _config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": cfg.param_dtype,
    }


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
    """A Transformer with the weights of the HF Llama checkpoint directory `path`, cast to `dtype`."""
    path = pathlib.Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path / 'config.json'} not found: expected a Hugging Face Llama "
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
        names, n_in = _hf_names(key, cfg)
        stacked = cfg.scan_layers and key[0] == "blocks"
        shape = like.shape[1:] if stacked else like.shape
        arrays = []
        for name in names:
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


def save(model: Transformer, path: str) -> None:
    """Writes `model` as a HF LlamaForCausalLM directory: config.json + model.safetensors."""
    cfg, path = model.cfg, pathlib.Path(path)
    if set(sparse.layer_patterns(cfg)) != {"dense"}:
        raise ValueError(
            f"attention_pattern={cfg.attention_pattern!r}: a HF Llama attends densely, so this "
            "model would load as a different one; only dense models can be saved."
        )
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tensors = {}
    for key, x in flat.items():
        names, n_in = _hf_names(key, cfg)
        layers = x if cfg.scan_layers and key[0] == "blocks" else [x]
        for name, layer in zip(names, layers, strict=True):
            tensors[name] = np.ascontiguousarray(_to_hf(np.asarray(layer), n_in))
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(_config_to_hf(cfg), indent=2) + "\n")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
