"""A training run's files, for the commands that read one (sample, export, evaluate, serve): its
config and its model at a checkpoint. A run is named `DIR` (its latest checkpoint) or `DIR@STEP`."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any

import ml_collections
from flax import nnx

from data.hf_tokenizer import HFTokenizer, load_tokenizer
from llm import config as config_lib
from llm import hf
from llm.model import lora, quant
from llm.model.transformer import Transformer
from llm.training import checkpoint, workdir
from llm.training.experiment import Experiment


def load_experiment(config: ml_collections.ConfigDict) -> Experiment:
    """The typed experiment of a run's recorded config; fields added to the code since the run
    was started take their defaults, fields removed since are ignored."""
    default = config_lib.load_config(config_lib.DEFAULT_CONFIG)
    known = workdir.flatten(default.to_dict())
    recorded = workdir.flatten(config.to_dict())
    return config_lib.resolve(
        config_lib.with_overrides(default, {k: v for k, v in recorded.items() if k in known})
    )


def load_run(run: str) -> tuple[Transformer, ml_collections.ConfigDict]:
    """The model of a run's checkpoint (`DIR` for the latest, `DIR@STEP`) and the run's config."""
    workdir, step = checkpoint.split_step(run)
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a training run; train one with "
            f"`python -m llm.train --config=experiments/default.py --workdir={workdir}`."
        )
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    exp = load_experiment(config)

    def build() -> Transformer:  # the run's structure: llm.quantize's quantized weights
        # (config.quant.weights) and LoRA adapters (llm.model.lora) included
        model = quant.quantize_model(Transformer(exp.model, rngs=nnx.Rngs(0)), exp.model.quant)
        lora.attach(model, exp.lora, 0)
        return model

    model = nnx.eval_shape(build)
    nnx.update(model, checkpoint.restore_params(workdir, nnx.state(model), step))  # + MoE biases
    return model, config


def load_model(run: str | None, hf_dir: str | None) -> tuple[Transformer, Any, Callable]:
    """(model, tokenizer, encode) of a run (`DIR[@STEP]`) or a Hugging Face directory; encode(text)
    gives prompt ids as the model saw its inputs: bos + text for a run, the tokenizer's own
    special tokens for a released model."""
    if hf_dir:
        tokenizer = HFTokenizer(hf_dir)
        return hf.load(hf_dir), tokenizer, tokenizer.encode_prompt
    model, config = load_run(run)
    tokenizer = load_tokenizer(config.data.tokenizer)
    return model, tokenizer, lambda text: [tokenizer.bos_id] + tokenizer.encode(text)
