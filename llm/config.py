"""The experiment config, resolved once: an ml_collections ConfigDict in, typed frozen objects out.

An experiment is a config file whose `get_config()` returns a ConfigDict; every field can be
overridden on the command line (`--config.model.num_layers=2`) or in code with the same dotted
names (`with_overrides`). `resolve` turns it into an `llm.training.experiment.Experiment`: each
part is built, and so checked, by the module that owns it, and derived values (head_dim, the
per-layer attention patterns, the rules table) are computed there once. Nothing below the entry
points sees a ConfigDict.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import sys
from typing import Any

import ml_collections
from ml_collections import config_flags

from llm.errors import ConfigError, check
from llm.model.config import ModelConfig
from llm.parallel.partitioning import MeshConfig
from llm.training.checkpoint import CheckpointConfig
from llm.training.experiment import Experiment
from llm.training.guard import GuardConfig
from llm.training.inputs import DataConfig
from llm.training.optimizer import OptimizerConfig

__all__ = [
    "ConfigError",
    "define_config_flag",
    "load_config",
    "model_config",
    "resolve",
    "with_overrides",
]


def define_config_flag(default: str) -> config_flags.FlagHolder:
    """`--config=FILE` plus `--config.a.b=value` overrides; a misspelled field exits with a message.

    ml_collections resolves override names while defining the flag, so the error surfaces here.
    """
    try:
        return config_flags.DEFINE_config_file(
            "config", default, "Experiment config file.", lock_config=True
        )
    except (AttributeError, KeyError) as e:
        while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(msg))
            e = e.args[0]
        hint = " ".join(str(e.args[0] if e.args else e).split())
        sys.exit(f"error: unknown config field in a --config.* override: {hint}")


def load_config(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The locked ConfigDict of a config file's `get_config()`."""
    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.lock()
    return config


def with_overrides(
    config: ml_collections.ConfigDict, overrides: dict[str, Any]
) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted fields ("model.num_heads") set, as --config.* flags do; a
    field the config does not have is a ConfigError."""
    config = config.copy_and_resolve_references()
    for dotted, value in overrides.items():
        *parents, name = dotted.split(".")
        node = config
        for parent in parents:
            check(parent in node, f"unknown config field {dotted!r}: no section {parent!r}.")
            node = node[parent]
        check(name in node, f"unknown config field {dotted!r}.")
        node[name] = value
    return config


def _build(cls: type, fields: dict[str, Any], section: str):
    """cls(**fields); a field cls does not have is a ConfigError naming it."""
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(fields) - known)
    check(
        not unknown,
        f"config{section} has unknown fields {unknown}; the fields are {sorted(known)}.",
    )
    return cls(**fields)


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The typed model config of an experiment config (checked; derived values filled)."""
    return _build(ModelConfig, config.model.to_dict(), ".model")


def resolve(config: ml_collections.ConfigDict) -> Experiment:
    """The typed experiment of `config`; ConfigError names the first mistake and its fix."""
    c = config.to_dict()
    return Experiment(
        model=model_config(config),
        optimizer=_build(OptimizerConfig, c["optimizer"], ".optimizer"),
        data=_build(DataConfig, c["data"], ".data"),
        mesh=MeshConfig(
            sizes=tuple(c["mesh"].items()), rules=tuple(tuple(r) for r in c["axis_rules"])
        ),
        checkpoint=CheckpointConfig(
            every=c["checkpoint_every"],
            keep=c["keep_checkpoints"],
            fallback_to_previous=c["checkpoint"]["fallback_to_previous"],
        ),
        guard=GuardConfig(
            nonfinite=c["nonfinite"],
            spike_window=c["loss_spike"]["window"],
            spike_sigmas=c["loss_spike"]["sigmas"],
        ),
        seed=c["seed"],
        steps=c["steps"],
        batch_size=c["batch_size"],
        grad_accum_steps=c["grad_accum_steps"],
        seq_len=c["seq_len"],
        log_every=c["log_every"],
        eval_every=c["eval_every"],
        eval_batches=c["eval_batches"],
        z_loss=c["z_loss"],
        sample_prompt=c["sample_prompt"],
        sample_tokens=c["sample_tokens"],
        log_batch_hashes=c["debug"]["log_batch_hashes"],
        config_json=config.to_json_best_effort(indent=2),
    )
