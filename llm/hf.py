"""Hugging Face interop: load and save Llama, Mistral, Qwen2/3, Mixtral and Qwen2/3-MoE
checkpoints (config.json + safetensors); llm.hf_arch maps the architectures onto llm.model.

    model = llm.hf.load("/path/to/llama")   # a *ForCausalLM directory, sharded or not
    llm.hf.save(model, "/tmp/out")          # transformers.AutoModelForCausalLM.from_pretrained works
    llm.hf.save(model, "/tmp/out", tokenizer=Tokenizer())  # + AutoTokenizer, generation config

save picks the architecture from the config (llm.hf_arch.model_type). load refuses, with a
ConfigError naming the file or field, what llm.model does not implement, a config.json that is
missing, not JSON or lacks a field, a missing or unreadable safetensors file, a tensor of the
wrong shape and tensors the model would not use.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from data.hf_tokenizer import HFTokenizer
from data.tokenizer import UNK_ID, Tokenizer
from llm.errors import ConfigError, check
from llm.hf_arch import ARCHITECTURES, check_saveable, config_from_hf, config_to_hf, hf_names
from llm.hf_arch import model_type as _model_type
from llm.model import lora
from llm.model.config import DTYPES, ModelConfig
from llm.model.transformer import Transformer
from llm.parallel import partitioning

_BUFFERS = ("rotary_emb.inv_freq",)  # non-weights some checkpoints carry; never read


def _to_hf(x: np.ndarray, n_in: int | None) -> np.ndarray:
    """Ours [in..., out...] -> HF [out, in] (biases flattened, vectors and tables unchanged)."""
    if n_in is None:
        return x
    return x.reshape(-1) if n_in == 0 else x.reshape(math.prod(x.shape[:n_in]), -1).T


def _from_hf(w: np.ndarray, shape: tuple[int, ...], n_in: int | None) -> np.ndarray:
    """HF [out, in] -> ours of `shape` [in..., out...] (biases unflattened)."""
    if n_in is None:
        expected = shape
    elif n_in == 0:
        expected = (math.prod(shape),)
    else:
        expected = (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    if w.shape != expected:
        raise ValueError(f"shape {w.shape}, expected {expected}")
    if n_in is None:
        return w
    return w.reshape(shape) if n_in == 0 else w.T.reshape(shape)


def _read_json(file: pathlib.Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file} is not valid JSON ({e}).") from None
    check(isinstance(data, dict), f"{file} is not a JSON object.")
    return data


def _open_tensors(path: pathlib.Path) -> dict:
    """Tensor name -> open safetensors file holding it (single-file or sharded checkpoint)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        check(isinstance(weight_map, dict), f"{index} has no 'weight_map' object.")
        files = sorted(set(weight_map.values()))
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
        try:
            f = safe_open(path / file, framework="numpy")
        except (SafetensorError, OSError) as e:  # a corrupt or truncated file
            raise ConfigError(f"{path / file} is not a readable safetensors file ({e}).") from None
        handles.update(dict.fromkeys(f.keys(), (f, path / file)))
    return handles


def read_config(path: str | pathlib.Path, dtype: str, scan_layers: bool = False) -> ModelConfig:
    """Our ModelConfig of the config.json in `path`; ConfigError naming a missing field."""
    file = pathlib.Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: expected a Hugging Face checkpoint directory "
            "(config.json + *.safetensors)."
        )
    try:
        return config_from_hf(_read_json(file), dtype=dtype, scan_layers=scan_layers)
    except KeyError as e:
        raise ConfigError(f"{file} lacks the field {e.args[0]!r}.") from None
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def load(
    path: str,
    *,
    dtype: str = "float32",
    scan_layers: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    rules: partitioning.AxisRules | None = None,
) -> Transformer:
    """A Transformer with the weights of the HF checkpoint directory `path`, cast to `dtype`.

    Tensors are read one at a time (a sharded checkpoint file by file through its index) and each
    is placed before the next is read: on `mesh`, straight into the sharding `rules` give it;
    so the host holds the model's arrays plus about one tensor, never a second copy."""
    check(dtype in DTYPES, f"hf.load dtype={dtype!r} is not one of {DTYPES}.")
    path = pathlib.Path(path)
    cfg = read_config(path, dtype, scan_layers)
    tensors = _open_tensors(path)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    placement = {}
    if mesh is not None:
        shardings = partitioning.state_shardings(state, mesh, rules or ())
        placement = traverse_util.flatten_dict(nnx.to_pure_dict(shardings))
    used = set()
    for key, like in flat.items():
        if key[-1] == "expert_bias":  # balancing state, not a weight: starts at 0
            flat[key] = jax.device_put(np.zeros(like.shape, like.dtype), placement.get(key))
            continue
        names, n_in = hf_names(key, cfg)
        stacked = isinstance(names, list)
        shape = like.shape[1:] if stacked else like.shape
        arrays = []
        for name in names if stacked else [names]:
            if name not in tensors:
                raise ConfigError(
                    f"{path}: tensor {name!r} (for {'.'.join(map(str, key))}) is missing."
                )
            handle, file = tensors[name]
            try:
                arrays.append(_from_hf(handle.get_tensor(name), shape, n_in))
            except ValueError as err:
                raise ConfigError(f"{file}: tensor {name!r} has {err}.") from None
            except (SafetensorError, OSError) as err:
                raise ConfigError(f"{file}: tensor {name!r} cannot be read ({err}).") from None
            used.add(name)
        value = (np.stack(arrays) if stacked else arrays[0]).astype(jnp.dtype(cfg.param_dtype))
        del arrays
        flat[key] = jax.device_put(value, placement.get(key))
    unused = sorted(n for n in set(tensors) - used if not n.endswith(_BUFFERS))
    check(
        not unused,
        f"{path}: {len(unused)} tensors the {cfg.num_layers}-layer model described by config.json "
        f"would not use, e.g. {unused[:3]}: the config does not match the weights.",
    )
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
    return nnx.merge(graphdef, state)


def save(
    model: Transformer, path: str, *, tokenizer: Tokenizer | HFTokenizer | None = None
) -> None:
    """Writes `model` as its HF architecture's directory (llm.hf_arch.model_type):
    config.json + model.safetensors; with `tokenizer`, also its special-token ids, the tokenizer
    (`save_tokenizer`) and generation_config.json. LoRA adapters are merged into their weights
    and QLoRA's quantized weights written dequantized (llm.model.lora.merge), on a copy."""
    model = nnx.clone(model)
    lora.merge(model)
    cfg, path = model.cfg, pathlib.Path(path)
    check_saveable(cfg)
    moe_blocks = [model.blocks[i] for i in range(cfg.num_layers) if cfg.moe.is_moe_layer(i)]
    check(
        not any(np.any(np.asarray(b.mlp.expert_bias[...])) for b in moe_blocks),
        f"Cannot save as {ARCHITECTURES[_model_type(cfg)]}: a nonzero expert_bias (HF routers "
        "have no selection bias).",
    )
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tensors = {}
    for key, x in flat.items():
        names, n_in = hf_names(key, cfg)
        names, parts = (names, x) if isinstance(names, list) else ([names], [x])
        for name, part in zip(names, parts, strict=True):
            tensors[name] = np.ascontiguousarray(_to_hf(np.asarray(part), n_in))
    path.mkdir(parents=True, exist_ok=True)
    hf_config = config_to_hf(cfg)
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
        ids["pad_token_id"] = tokenizer.pad_id
        hf_config.update(ids)
        (path / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
        save_tokenizer(tokenizer, path)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def save_tokenizer(tokenizer: Tokenizer | HFTokenizer, path: str | pathlib.Path) -> None:
    """Writes the tokenizer so that `AutoTokenizer.from_pretrained(path).encode(text,
    add_special_tokens=False)` equals `tokenizer.encode(text)`: a Hugging Face tokenizer's own
    files, or the sentencepiece model as transformers' LlamaTokenizer reads it (no prefix space,
    no implicit bos/eos)."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, HFTokenizer):
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer.path / name).is_file():
                shutil.copyfile(tokenizer.path / name, path / name)
        return
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
