"""The experiment config, resolved once: an ml_collections ConfigDict in, typed frozen objects out.

An experiment is a config file whose `get_config()` returns a ConfigDict; every field can be
overridden on the command line (`--config.model.num_layers=2`) or in code with the same dotted
names (`with_overrides`). `resolve` turns it into an `llm.training.experiment.Experiment`: each
part is built, and so checked, by the module that owns it, and derived values (head_dim, the
per-layer attention patterns, the rules table) are computed there once. Nothing below the entry
points sees a ConfigDict.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import io
import pathlib
import sys
import tokenize
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from llm.errors import ConfigError, check
from llm.harness.config import HarnessConfig
from llm.model.config import ModelConfig
from llm.model.lora import LoRAConfig
from llm.parallel.partitioning import MeshConfig
from llm.parallel.pipeline import PipelineConfig
from llm.training.checkpoint import CheckpointConfig
from llm.training.distill import DistillConfig
from llm.training.experiment import Experiment
from llm.training.guard import GuardConfig
from llm.training.inputs import DataConfig
from llm.training.optimizer import OptimizerConfig
from llm.training.post_training import PostTrainingConfig
from llm.training.prune import PruneConfig
from llm.training.step import LossConfig

# experiments/default.py, found from this file, so a command works from any directory.
DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "default.py")

__all__ = [
    "DEFAULT_CONFIG",
    "ConfigError",
    "define_config_flag",
    "load_config",
    "model_config",
    "parse_flags",
    "resolve",
    "with_overrides",
]


def _one_line(error: BaseException) -> str:
    """The innermost message of `error` (ml_collections wraps KeyErrors in AttributeErrors), on
    one line."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    return " ".join(str(error.args[0] if error.args else error).split())


def define_config_flag(default: str = DEFAULT_CONFIG) -> config_flags.FlagHolder:
    """`--config=FILE` plus `--config.a.b=value` overrides; a misspelled field exits with a message.

    Overrides of the default file are resolved while the flag is defined, so their errors surface
    here; those of a `--config=FILE` given on the command line surface in `parse_flags`.
    """
    help_text = "Experiment config file. Its fields, each overridable as --config.FIELD=VALUE:\n"
    help_text += describe(default)
    try:
        holder = config_flags.DEFINE_config_file("config", default, help_text, lock_config=True)
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["config"])  # --help
        return holder
    except (AttributeError, KeyError) as e:
        print(
            f"error: unknown config field in a --config.* override: {_one_line(e)}", file=sys.stderr
        )
        sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for a command (`app.run(main, flags_parser=parse_flags)`): a user's
    mistake (an unknown flag, a mistyped value, a misspelled --config.* field, a config file that
    cannot be loaded) is one `error:` line and exit status 2, never a traceback."""
    try:
        argv = flags.FLAGS(argv)
        if "config" in flags.FLAGS:  # ml_collections reports a file it could not load on use
            flags.FLAGS.config.keys()
        return argv
    except flags.Error as e:
        message = _one_line(e)
    except (AttributeError, KeyError) as e:  # ml_collections: a field the config does not have
        message = f"unknown config field in a --config.* override: {_one_line(e)}"
    except (OSError, SyntaxError, TypeError, ValueError) as e:  # the config file
        message = (
            f"the --config file could not be loaded ({_one_line(e)}): pass --config=FILE, a "
            f"Python file with get_config(), e.g. --config={DEFAULT_CONFIG}"
        )
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def field_comments(path: str | pathlib.Path) -> dict[str, str]:
    """Dotted field ("model.num_layers") -> the comment on the line(s) that set it in a config
    file (`c.model.num_layers = 4  # ...`)."""
    source = pathlib.Path(path).read_text()
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    fields = {}
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)):
            continue
        parts, target = [], node.targets[0]
        while isinstance(target, ast.Attribute):
            parts.insert(0, target.attr)
            target = target.value
        lines = range(node.lineno, node.end_lineno + 1)
        found = [comments[line] for line in lines if line in comments]
        if found and "fmt:" not in found[0]:
            fields[".".join(parts)] = found[0]
    return fields


def describe(path: str | pathlib.Path) -> str:
    """One line per field of a config file: its dotted name, default and comment (for --help)."""
    comments = field_comments(path)

    def lines(node: dict, prefix: str):
        for name, value in node.items():
            if isinstance(value, dict):
                yield from lines(value, f"{prefix}{name}.")
            else:
                comment = comments.get(prefix + name, "")
                yield f"  {prefix}{name} = {value!r}" + (f"  # {comment}" if comment else "")

    return "\n".join(lines(load_config(path).to_dict(), ""))


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
    quant = config.quant.to_dict() if "quant" in config else {}  # runs from before config.quant
    return _build(ModelConfig, {**config.model.to_dict(), "quant": quant}, ".model")


def _warmup_follows(optimizer: dict, steps: Any) -> dict:
    """optimizer.warmup_steps=None warms up for a tenth of the run, so `--config.steps=N` alone
    makes a consistent short run."""
    if optimizer.get("warmup_steps") is None and isinstance(steps, int):
        return {**optimizer, "warmup_steps": steps // 10}
    return optimizer


def resolve(config: ml_collections.ConfigDict) -> Experiment:
    """The typed experiment of `config`; ConfigError names the first mistake and its fix."""
    c = config.to_dict()
    return Experiment(
        model=model_config(config),
        optimizer=_build(
            OptimizerConfig, _warmup_follows(c["optimizer"], c["steps"]), ".optimizer"
        ),
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
        loss=_build(LossConfig, c["loss"], ".loss"),
        pipeline=_build(PipelineConfig, c["pipeline"], ".pipeline"),
        lora=_build(LoRAConfig, c["lora"], ".lora"),
        post_training=_build(PostTrainingConfig, c["post_training"], ".post_training"),
        harness=_build(HarnessConfig, c["eval"], ".eval"),
        prune=_build(PruneConfig, c["prune"], ".prune"),
        distill=_build(DistillConfig, c["distill"], ".distill"),
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
        log_activation_rms=c["debug"]["log_activation_rms"],
        profile_start=c["profile"]["start_step"],
        profile_steps=c["profile"]["steps"],
        init_from=c["init_from"],
        resume_policy=c["resume_policy"],
        resume_schedule=c["resume_schedule"],
        tracker=c["tracker"],
        config_json=config.to_json_best_effort(indent=2),
    )
