"""Checkpoints with orbax: asynchronous saves of the train state, restore of the latest step.

A checkpoint has two items, so that sampling can read the parameters without the optimizer:
    params:    the model parameters (an nnx.State)
    opt_state: {"step": int32[], "opt_state": the optax state}
Orbax writes each step to a temporary directory and renames it when complete, so a listed step
is always whole.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx

from llm.train_step import TrainState


class CheckpointNotFoundError(FileNotFoundError):
    """A workdir without checkpoints where one was needed."""


class CheckpointMismatchError(ValueError):
    """Resuming a workdir whose checkpoints belong to a differently shaped model."""


# Model fields that change the parameters' shapes or layout; others (dtype, remat, ...) may change.
SHAPE_FIELDS = (
    "vocab_size",
    "num_layers",
    "embed_dim",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_dim",
    "tie_embeddings",
    "scan_layers",
    "param_dtype",
)
# The same for model.moe, compared when either model has experts.
MOE_SHAPE_FIELDS = (
    "num_experts",
    "expert_mlp_dim",
    "every",
    "first_dense_layers",
    "num_shared_experts",
)


def _shape_fields(model: dict) -> dict:
    fields = {k: model.get(k) for k in SHAPE_FIELDS}
    moe = model.get("moe") or {}  # absent in configs saved before MoE: dense
    if moe.get("num_experts"):
        fields.update({f"moe.{k}": moe.get(k) for k in MOE_SHAPE_FIELDS})
    return fields


def check_same_model(saved: dict, current: dict) -> None:
    """Refuses to resume when a shape-determining model field differs, naming each."""
    saved, current = _shape_fields(saved), _shape_fields(current)
    differing = [k for k in {**saved, **current} if saved.get(k) != current.get(k)]
    if differing:
        changes = ", ".join(f"model.{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing)
        raise CheckpointMismatchError(
            f"this workdir was trained with a different model ({changes}); use a new --workdir, "
            "or the original model settings to resume."
        )


def make_manager(
    workdir: str | pathlib.Path, *, keep: int = 2, async_save: bool = True, create: bool = True
) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=create
    )
    return ocp.CheckpointManager(
        pathlib.Path(workdir).resolve() / "checkpoints",
        options=options,
        item_names=("params", "opt_state"),
    )


def save(manager: ocp.CheckpointManager, state: TrainState, *, force: bool = False) -> None:
    """Starts an asynchronous save of `state` at its step (waits for the previous save first)."""
    step = int(jax.device_get(state["step"]))
    manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(
                {"step": state["step"], "opt_state": state["opt_state"]}
            ),
        ),
        force=force,
    )


def restore_latest(manager: ocp.CheckpointManager, abstract_state: TrainState) -> TrainState | None:
    """The latest saved train state, placed as `abstract_state`'s shardings say; None if none saved."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state["params"]),
            opt_state=ocp.args.StandardRestore(
                {"step": abstract_state["step"], "opt_state": abstract_state["opt_state"]}
            ),
        ),
    )
    return {
        "step": restored.opt_state["step"],
        "params": restored.params,
        "opt_state": restored.opt_state["opt_state"],
    }


def restore_params(workdir: str | pathlib.Path, abstract_params: nnx.State) -> nnx.State:
    """The parameters of the latest checkpoint in `workdir` (no optimizer state is read)."""
    directory = pathlib.Path(workdir) / "checkpoints"
    manager = make_manager(workdir, async_save=False, create=False) if directory.is_dir() else None
    step = manager.latest_step() if manager else None
    if step is None:
        raise CheckpointNotFoundError(
            f"no checkpoint in {directory}: train first with "
            f"`python -m llm.train --config=experiments/default.py --workdir={workdir}`."
        )
    restored = manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
    )
    return restored.params
