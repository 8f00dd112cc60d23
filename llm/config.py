"""Validation of an experiment config: every mistake found before compiling, one clear message each."""

from __future__ import annotations

import math
import sys
from typing import Any

import jax
import ml_collections
from ml_collections import config_flags

from llm import context_parallel, moe, partitioning, sparse
from llm.model import REMAT_POLICIES, ModelConfig

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("xla", "cudnn", "pallas_gpu", "pallas_tpu")


class ConfigError(ValueError):
    """A config mistake; the message names the field and the fix."""


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


def with_overrides(
    config: ml_collections.ConfigDict, overrides: dict[str, Any]
) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted fields ("model.num_heads") set, as --config.* flags do."""
    config = config.copy_and_resolve_references()
    for dotted, value in overrides.items():
        *parents, name = dotted.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[name] = value
    return config


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The typed model config of an experiment config."""
    return ModelConfig(**config.model.to_dict())


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(config: ml_collections.ConfigDict, *fields: str, prefix: str = "") -> None:
    for field in fields:
        value = config
        for part in field.split("."):
            value = value[part]
        name = prefix + field  # the full dotted name, e.g. "model.num_layers"
        _check(
            isinstance(value, int) and value > 0,
            f"config.{name} must be a positive integer, got {value!r}: set --config.{name}=N.",
        )


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for the first inconsistency in `config`."""
    _positive(
        config,
        "steps",
        "batch_size",
        "seq_len",
        "log_every",
        "grad_accum_steps",
        "eval_batches",
        "keep_checkpoints",
    )
    for field in ("eval_every", "checkpoint_every"):
        _check(
            config[field] >= 0, f"config.{field} must be >= 0 (0 disables), got {config[field]}."
        )
    _check(
        config.batch_size % config.grad_accum_steps == 0,
        f"config.batch_size={config.batch_size} is not divisible by config.grad_accum_steps="
        f"{config.grad_accum_steps}: pick a batch size that splits into equal micro-batches.",
    )
    validate_model(config.model)
    _check(
        config.seq_len <= config.model.max_seq_len,
        f"config.seq_len={config.seq_len} is longer than the model accepts "
        f"(config.model.max_seq_len={config.model.max_seq_len}): lower seq_len or raise max_seq_len.",
    )
    validate_attention_fits(config.model, config.seq_len)
    opt = config.optimizer
    _check(
        opt.learning_rate > 0,
        f"config.optimizer.learning_rate must be > 0, got {opt.learning_rate}.",
    )
    _check(
        0 <= opt.warmup_steps < config.steps,
        f"config.optimizer.warmup_steps={opt.warmup_steps} must be in [0, steps={config.steps}).",
    )
    _check(
        0 <= opt.min_learning_rate_ratio <= 1,
        f"config.optimizer.min_learning_rate_ratio must be in [0, 1], got {opt.min_learning_rate_ratio}.",
    )
    _check(
        opt.grad_clip_norm >= 0,
        "config.optimizer.grad_clip_norm must be >= 0 (0 disables clipping).",
    )
    _check(config.z_loss >= 0, f"config.z_loss must be >= 0, got {config.z_loss}.")
    validate_robustness(config)
    validate_mesh(config)


def validate_robustness(config: ml_collections.ConfigDict) -> None:
    """The non-finite policy, loss-spike skipping and checkpoint options (llm.guard)."""
    _check(
        config.nonfinite in ("stop", "skip"),
        f"config.nonfinite={config.nonfinite!r} is not one of ('stop', 'skip').",
    )
    window, sigmas = config.loss_spike.window, config.loss_spike.sigmas
    _check(
        isinstance(window, int) and not isinstance(window, bool) and window >= 0,
        f"config.loss_spike.window must be an integer >= 0 (0 disables), got {window!r}.",
    )
    _check(
        isinstance(sigmas, (int, float)) and sigmas > 0,
        f"config.loss_spike.sigmas must be > 0, got {sigmas!r}: e.g. --config.loss_spike.sigmas=6.",
    )
    for field in ("checkpoint.fallback_to_previous", "debug.log_batch_hashes"):
        group, name = field.split(".")
        value = config[group][name]
        _check(
            isinstance(value, bool),
            f"config.{field} must be True or False, got {value!r}.",
        )


def validate_mesh(config: ml_collections.ConfigDict) -> None:
    """Mesh sizes are positive or -1; axes for parallelism not implemented yet are size 1."""
    unknown = set(config.mesh) - set(partitioning.MESH_AXES)
    _check(
        not unknown,
        f"config.mesh has unknown axes {sorted(unknown)}; the axes are {partitioning.MESH_AXES}.",
    )
    for axis, size in config.mesh.items():
        _check(
            isinstance(size, int) and (size > 0 or size == -1),
            f"config.mesh.{axis} must be a positive integer or -1 (all remaining devices), "
            f"got {size!r}.",
        )
    rules = tuple(config.axis_rules)
    named = {a for name, _ in rules for a in partitioning.mesh_axes_of(name, rules)}
    _check(
        named <= set(partitioning.MESH_AXES),
        f"config.axis_rules names unknown mesh axes {sorted(named - set(partitioning.MESH_AXES))}; "
        f"the mesh axes are {partitioning.MESH_AXES}.",
    )


def validate_model(model: ml_collections.ConfigDict) -> None:
    """Checks the model fields alone (also used when loading a checkpoint's config)."""
    _positive(
        model,
        "vocab_size",
        "num_layers",
        "embed_dim",
        "num_heads",
        "num_kv_heads",
        "mlp_dim",
        "max_seq_len",
        prefix="model.",
    )
    _check(
        model.num_heads % model.num_kv_heads == 0,
        f"config.model.num_heads={model.num_heads} is not divisible by config.model.num_kv_heads="
        f"{model.num_kv_heads}: grouped-query attention shares each kv head among an equal number of "
        "query heads; choose num_kv_heads dividing num_heads.",
    )
    if model.head_dim is None:
        _check(
            model.embed_dim % model.num_heads == 0,
            f"config.model.embed_dim={model.embed_dim} is not divisible by config.model.num_heads="
            f"{model.num_heads}: set --config.model.head_dim explicitly or change the sizes.",
        )
    head_dim = model.head_dim or model.embed_dim // model.num_heads
    _check(head_dim % 2 == 0, f"head_dim={head_dim} must be even for rotary embeddings.")
    _check(model.dtype in DTYPES, f"config.model.dtype={model.dtype!r} is not one of {DTYPES}.")
    _check(
        model.param_dtype in DTYPES,
        f"config.model.param_dtype={model.param_dtype!r} is not one of {DTYPES}.",
    )
    _check(
        model.remat in REMAT_POLICIES,
        f"config.model.remat={model.remat!r} is not one of {tuple(REMAT_POLICIES)}.",
    )
    _check(
        model.attention_impl is None or model.attention_impl in ATTENTION_IMPLS,
        f"config.model.attention_impl={model.attention_impl!r} is not one of {ATTENTION_IMPLS} "
        "(or unset, to pick the fastest for the backend).",
    )
    _check(
        model.context_parallel in context_parallel.MODES,
        f"config.model.context_parallel={model.context_parallel!r} is not one of "
        f"{context_parallel.MODES}.",
    )
    _check(model.rope_theta > 0, f"config.model.rope_theta must be > 0, got {model.rope_theta}.")
    validate_moe(model)
    validate_attention_pattern(model)


def validate_moe(model: ml_collections.ConfigDict) -> None:
    """The mixture-of-experts fields (checked only when num_experts > 0)."""
    if "moe" not in model:  # a config saved before MoE existed: dense
        return
    m = model.moe
    _check(
        isinstance(m.num_experts, int) and m.num_experts >= 0,
        f"config.model.moe.num_experts must be >= 0 (0 = dense), got {m.num_experts!r}.",
    )
    if m.num_experts == 0:
        return
    _positive(model, "moe.top_k", "moe.expert_mlp_dim", "moe.every")
    _check(
        m.top_k <= m.num_experts,
        f"config.model.moe.top_k={m.top_k} is more than config.model.moe.num_experts="
        f"{m.num_experts}: each token picks top_k distinct experts; lower top_k.",
    )
    for field, allowed in (("router", moe.ROUTERS), ("dispatch", moe.DISPATCHES)):
        _check(
            m[field] in allowed,
            f"config.model.moe.{field}={m[field]!r} is not one of {allowed}.",
        )
    _check(
        m.capacity_factor > 0,
        f"config.model.moe.capacity_factor must be > 0, got {m.capacity_factor}: "
        "set e.g. --config.model.moe.capacity_factor=1.25 (or use dispatch=dropless).",
    )
    for field in ("first_dense_layers", "num_shared_experts"):
        _check(
            isinstance(m[field], int) and m[field] >= 0,
            f"config.model.moe.{field} must be an integer >= 0, got {m[field]!r}.",
        )
    for field in ("aux_loss_weight", "z_loss_weight", "bias_update_rate"):
        _check(m[field] >= 0, f"config.model.moe.{field} must be >= 0 (0 = off), got {m[field]}.")
    _check(
        not m.get("shared_expert_gate", False) or m.num_shared_experts > 0,
        "config.model.moe.shared_expert_gate=True gates the shared experts, but "
        "config.model.moe.num_shared_experts=0: set num_shared_experts >= 1 or the gate False.",
    )
    _check(
        not model.scan_layers,
        "config.model.scan_layers=True is not supported with MoE layers "
        "(config.model.moe.num_experts > 0): set --config.model.scan_layers=False.",
    )


def validate_attention_pattern(model: ml_collections.ConfigDict) -> None:
    """The schedule parses, repeats evenly over the layers, and its patterns' sizes are positive."""
    spec = model.attention_pattern
    try:
        schedule = sparse.parse_schedule(spec)
    except ValueError as e:
        raise ConfigError(
            f"config.model.attention_pattern={spec!r}: {e}. Write pattern names separated by "
            'commas, each optionally repeated with "*N", e.g. "sliding*5,dense".'
        ) from None
    _check(
        model.num_layers % len(schedule) == 0,
        f"config.model.attention_pattern={spec!r} has {len(schedule)} entries, which does not "
        f"divide config.model.num_layers={model.num_layers}: the schedule repeats over the layers; give "
        f"it a length dividing {model.num_layers} (or set num_layers to a multiple of "
        f"{len(schedule)}).",
    )
    _check(
        not model.scan_layers or len(set(schedule)) == 1,
        f"config.model.scan_layers=True compiles one block for every layer, but "
        f"config.model.attention_pattern={spec!r} mixes {sorted(set(schedule))}: set "
        "--config.model.scan_layers=False or use a single pattern.",
    )
    for field in sorted({f for name in schedule for f in sparse.PATTERNS[name].fields}):
        minimum = 0 if field in ("attention_global", "attention_nsa_selected") else 1
        _check(
            isinstance(model[field], int) and model[field] >= minimum,
            f"config.model.{field} must be an integer >= {minimum}, got {model[field]!r}: set "
            f"--config.model.{field}=N.",
        )
    if "dilated" in schedule:
        _check(
            model.attention_stride < model.attention_window,
            f"config.model.attention_stride={model.attention_stride} must be smaller than "
            f'config.model.attention_window={model.attention_window} for "dilated" (else a '
            "query sees only itself): lower the stride or widen the window.",
        )


def validate_attention_fits(model: ml_collections.ConfigDict, seq_len: int) -> None:
    """A pattern's window, chunk, stride or global tokens fit in the trained sequence."""
    schedule = sparse.parse_schedule(model.attention_pattern)
    for field in sorted({f for name in schedule for f in sparse.PATTERNS[name].fields}):
        size = model[field]
        limit = seq_len - 1 if field == "attention_global" else seq_len
        _check(
            size <= limit,
            f"config.model.{field}={size} does not fit in config.seq_len={seq_len} (the attention "
            f"pattern {model.attention_pattern!r} would be dense or degenerate): set "
            f"--config.model.{field} to at most {limit}, or use attention_pattern=dense.",
        )


def check_vocab(config: ml_collections.ConfigDict, tokenizer_vocab_size: int) -> None:
    _check(
        config.model.vocab_size >= tokenizer_vocab_size,
        f"config.model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
        f"vocabulary ({tokenizer_vocab_size}): set --config.model.vocab_size={tokenizer_vocab_size} "
        "or larger (a larger, padded vocabulary is fine).",
    )


# Logical axes the rules table may shard -> the config field that sets their size.
SHARDED_SIZES = {
    "batch": "batch_size",
    "seq": "seq_len",
    "embed": "model.embed_dim",
    "heads": "model.num_heads",
    "kv_heads": "model.num_kv_heads",
    "head_dim": "model.head_dim",
    "mlp": "model.mlp_dim",
    "vocab": "model.vocab_size",
    "expert": "model.moe.num_experts",
}


def check_sharding(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Every dimension the rules table shards splits evenly over its mesh axes, and the global
    batch over the processes (each feeds an equal share)."""
    rules = tuple(config.axis_rules)
    model = model_config(config)
    for name, field in SHARDED_SIZES.items():
        axes = partitioning.mesh_axes_of(name, rules)
        shards = math.prod(mesh.shape[a] for a in axes)
        size = config
        for part in field.split("."):
            size = size[part]
        if field == "model.head_dim":  # None in the file: the model derives it
            size = model.head_dim
        over = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
        _check(
            size % shards == 0,
            f"config.{field}={size} does not split over {over} ({shards} devices; axis_rules "
            f"shard {name!r} over {axes}): use a multiple of {shards} for config.{field}, or "
            "shrink those mesh axes (or change config.axis_rules).",
        )
    seq_axes = [a for a in partitioning.mesh_axes_of("seq", rules) if mesh.shape[a] > 1]
    if seq_axes:
        patterns = set(sparse.layer_patterns(model))
        _check(
            patterns == {"dense"},
            f"config.model.attention_pattern={model.attention_pattern!r}: context parallelism "
            f"(mesh.{seq_axes[0]}={mesh.shape[seq_axes[0]]}) supports dense causal attention only; "
            "use --config.model.attention_pattern=dense or --config.mesh.sequence=1.",
        )
    if seq_axes and model.context_parallel == "ring":
        chunks = 2 * mesh.shape[seq_axes[0]]
        _check(
            config.seq_len % chunks == 0,
            f"config.seq_len={config.seq_len} does not split into {chunks} chunks: ring context "
            f"parallelism over mesh.{seq_axes[0]}={chunks // 2} gives each device two chunks "
            f"(zig-zag); use a multiple of {chunks}, or --config.model.context_parallel=all_gather.",
        )
    processes = jax.process_count()
    _check(
        config.batch_size % processes == 0,
        f"config.batch_size={config.batch_size} does not split over {processes} processes: "
        f"use a multiple of {processes}.",
    )
