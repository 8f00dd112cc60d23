"""A LoRA run's adapters and merged model (llm.model.lora), in PEFT's and Hugging Face's formats,
and the memory LoRA saves.

    python -m llm.lora merge --workdir=/tmp/lora[@STEP] --out=/tmp/merged_hf    # = llm.export
    python -m llm.lora adapters --workdir=/tmp/lora[@STEP] --out=/tmp/adapter   # PEFT format
    python -m llm.lora memory --config=experiments/default.py                   # README table

`merge` writes the model with its adapters folded into the weights (llm.hf.save merges them);
`adapters` writes the adapters alone as PEFT's `adapter_config.json` + `adapter_model.safetensors`,
which `peft.PeftModel.from_pretrained` loads onto the base model (`llm.export` of the run
`init_from` named, or that HF directory itself); `load_peft` reads them back into ours.
Tensor names: `base_model.model.<HF module>.lora_A.weight` [r, in] and `lora_B.weight` [out, r].
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx, traverse_util
from safetensors.numpy import load_file, save_file

from llm import config as config_lib
from llm import export
from llm.errors import check
from llm.hf_arch import hf_names
from llm.model import lora
from llm.model.lora import LoRAConfig
from llm.model.transformer import Transformer
from llm.runs import load_experiment, load_run
from llm.training import loop
from llm.training.experiment import Experiment
from llm.training.optimizer import make_optimizer

PEFT_MODULES = {  # HF module -> our target
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}
_PREFIX = "base_model.model."


def _adapters(model: Transformer) -> dict[tuple, dict[str, np.ndarray]]:
    """Our base weight's path -> {"a": A, "b": B} of each adapter of `model`."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    found: dict[tuple, dict[str, np.ndarray]] = {}
    for key, value in flat.items():
        *path, attr, factor = key
        found.setdefault((*path, attr.removesuffix("_lora")), {})[factor] = np.asarray(value)
    return found


def _hf_modules(key: tuple, cfg) -> list[str]:
    """The HF module name(s) of our weight `key` (one per layer when layers are stacked)."""
    names, _ = hf_names(key, cfg)
    names = names if isinstance(names, list) else [names]
    check(
        all("experts." not in n for n in names),
        "PEFT adapters of MoE experts: transformers fuses experts, PEFT cannot target them; "
        "merge the run instead (python -m llm.lora merge).",
    )
    return [n.removesuffix(".weight") for n in names]


def save_peft(model: Transformer, cfg: LoRAConfig, path: str | pathlib.Path) -> None:
    """Writes `model`'s adapters (trained with `cfg`) in PEFT's format to `path`."""
    path = pathlib.Path(path)
    tensors, modules = {}, set()
    for key, ab in _adapters(model).items():
        names = _hf_modules(key, model.cfg)
        a, b = (ab["a"][None], ab["b"][None]) if len(names) == 1 else (ab["a"], ab["b"])
        for name, a_i, b_i in zip(names, a, b, strict=True):
            r = a_i.shape[-1]
            tensors[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a_i.reshape(-1, r).T)
            tensors[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b_i.reshape(r, -1).T)
            modules.add(name.rpartition(".")[2])
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})


def load_peft(model: Transformer, path: str | pathlib.Path) -> LoRAConfig:
    """Attaches the PEFT adapters in `path` to `model` (a plain model, e.g. from llm.hf.load);
    returns their LoRAConfig. ConfigError for what ours cannot represent."""
    path = pathlib.Path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    modules = config.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else modules
    check(
        config.get("peft_type") == "LORA"
        and not config.get("use_rslora")
        and not config.get("use_dora")
        and not config.get("rank_pattern")
        and not config.get("alpha_pattern")
        and config.get("bias", "none") == "none"
        and all(m in PEFT_MODULES for m in modules),
        f"{path}: only plain LoRA adapters (no rslora, DoRA, rank/alpha patterns or biases) on "
        f"{sorted(PEFT_MODULES)} load into llm.model.lora.",
    )
    cfg = LoRAConfig(
        rank=config["r"],
        alpha=float(config["lora_alpha"]),
        targets=tuple(sorted({PEFT_MODULES[m] for m in modules})),
    )
    cfg.check_model(model.cfg)
    lora.attach(model, cfg, 0)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    state = nnx.state(model, nnx.LoRAParam)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    for key, ab in _adapters(model).items():
        names = _hf_modules(key, model.cfg)
        for factor, like in ab.items():
            parts = []
            for name in names:
                lora_name = f"{_PREFIX}{name}.lora_{factor.upper()}.weight"
                check(lora_name in tensors, f"{path}: tensor {lora_name!r} is missing.")
                parts.append(tensors.pop(lora_name).T)
            shape = like.shape[1:] if len(names) > 1 else like.shape  # stacked layers
            parts = [p.reshape(shape) for p in parts]
            value = np.stack(parts) if len(names) > 1 else parts[0]
            flat[(*key[:-1], f"{key[-1]}_lora", factor)] = jax.numpy.asarray(value, like.dtype)
    check(not tensors, f"{path}: tensors ours would not use, e.g. {sorted(tensors)[:3]}.")
    nnx.update(model, nnx.State(traverse_util.unflatten_dict(flat)))
    return cfg


def state_bytes(exp: Experiment) -> dict[str, int]:
    """Bytes of the train state of `exp` (from jax.eval_shape, nothing allocated): all model
    parameters, the trained ones, and the optimizer state."""
    tx, _ = make_optimizer(exp.optimizer, exp.schedule_length)
    state = jax.eval_shape(lambda: loop.fresh_state(exp, tx)[1])
    trained, _ = nnx.split_state(state.params, lora.trainable(exp.lora), ...)

    def size(tree) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    return {
        "params": size(state.params),
        "trained": size(trained),
        "optimizer": size(state.opt_state),
    }


def memory_table(config) -> str:
    """A Markdown table of `state_bytes` for full fine-tuning, LoRA and QLoRA of `config`."""
    rows = [
        "| method | parameters (MiB) | trained (MiB) | optimizer state (MiB) |",
        "|---|---:|---:|---:|",
    ]
    rank = config.lora.rank or 8
    variants = {
        "full fine-tuning": {"lora.rank": 0, "lora.quantize": "none"},
        f"LoRA r={rank}": {"lora.rank": rank, "lora.quantize": "none"},
        f"QLoRA r={rank}, int8": {"lora.rank": rank, "lora.quantize": "int8"},
        f"QLoRA r={rank}, nf4": {"lora.rank": rank, "lora.quantize": "nf4"},
    }
    for name, overrides in variants.items():
        exp = config_lib.resolve(config_lib.with_overrides(config, overrides))
        b = state_bytes(exp)
        mib = [f"{b[k] / 2**20:.2f}" for k in ("params", "trained", "optimizer")]
        rows.append(f"| {name} | " + " | ".join(mib) + " |")
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    check(len(argv) == 2, "usage: python -m llm.lora merge|adapters|memory [flags]")
    command, f = argv[1], flags.FLAGS
    logging.set_verbosity(logging.WARNING)
    if command == "memory":
        print(memory_table(f.config))
        return
    check(
        command in ("merge", "adapters") and bool(f.workdir and f.out),
        f"{command}: pass --workdir=DIR[@STEP] (a LoRA run) and --out=DIR.",
    )
    if command == "merge":  # llm.export: llm.hf.save merges the adapters
        export.export(f.workdir, f.out)
    else:
        model, config = load_run(f.workdir)
        exp = load_experiment(config)
        check(exp.lora.rank > 0, f"{f.workdir} is not a LoRA run (config.lora.rank=0).")
        save_peft(model, exp.lora, f.out)
    print(f"wrote {f.out}")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "merge, adapters: a LoRA training run, DIR[@STEP].")
    flags.DEFINE_string("out", None, "merge, adapters: the directory to write.")
    config_lib.define_config_flag()
    try:
        app.run(main, flags_parser=config_lib.parse_flags)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
