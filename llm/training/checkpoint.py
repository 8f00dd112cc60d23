"""Checkpoints with orbax: asynchronous saves of the train state, restore of the latest step.

A checkpoint has two items, so that sampling can read the parameters without the optimizer:
    params:    the model parameters (an nnx.State)
    opt_state: the rest of the train state: {"step": int32[], "opt_state": the optax state,
               "guard": the non-finite and loss-spike state of llm.training.guard}
(the fields of llm.training.state.TrainState).
Orbax writes each step to a temporary directory and renames it when complete, so a listed step
is always whole; a temporary directory left by a killed run is deleted when the next run opens
the manager. An old step is deleted only after the next one has committed, and a failed
asynchronous save raises `CheckpointSaveError` at the next save or wait, never silently.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from llm.errors import check, check_positive
from llm.training import debug
from llm.training.state import TrainState

ITEMS = ("params", "opt_state")  # the items of a step directory, see the module docstring


class CheckpointNotFoundError(FileNotFoundError):
    """A workdir without checkpoints where one was needed."""


class CheckpointMismatchError(ValueError):
    """Resuming a workdir whose checkpoints belong to a differently shaped model."""


class CheckpointCorruptError(ValueError):
    """A step directory that cannot be restored: truncated array file, missing metadata, ..."""


class CheckpointSaveError(OSError):
    """An asynchronous save failed (disk full, permissions, ...); earlier checkpoints are kept."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When and how checkpoints are written and read, checked when built."""

    every: int = 100  # config.checkpoint_every: steps between saves (and at the end); 0: never
    keep: int = 2  # config.keep_checkpoints: the last N steps kept
    fallback_to_previous: bool = False  # config.checkpoint.fallback_to_previous

    def __post_init__(self):
        check(
            self.every >= 0, f"config.checkpoint_every must be >= 0 (0 disables), got {self.every}."
        )
        check_positive(self.keep, "keep_checkpoints")
        check(
            isinstance(self.fallback_to_previous, bool),
            "config.checkpoint.fallback_to_previous must be True or False, got "
            f"{self.fallback_to_previous!r}.",
        )


def make_manager(
    workdir: str | pathlib.Path, *, keep: int = 2, async_save: bool = True, create: bool = True
) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=create,
        cleanup_tmp_directories=create,  # partial saves of a killed run
        async_options=ocp.AsyncOptions(post_finalization_callback=lambda: debug.pause("save"))
        if async_save
        else None,
    )
    return ocp.CheckpointManager(
        pathlib.Path(workdir).resolve() / "checkpoints",
        options=options,
        item_handlers={  # so the metadata of a step can be read before anything is restored
            item: ocp.StandardCheckpointHandler() for item in ITEMS
        },
    )


def wait(manager: ocp.CheckpointManager) -> None:
    """Waits for the pending save to commit; raises CheckpointSaveError if it failed."""
    pending = manager.latest_step()  # a step is listed from the start of its save
    try:
        manager.wait_until_finished()
    except Exception as e:
        manager.reload()  # the steps on disk: retention had already dropped old ones from memory
        raise CheckpointSaveError(
            f"saving the checkpoint of step {pending} in {manager.directory} failed "
            f"({type(e).__name__}: {e}); the last committed checkpoint is step "
            f"{manager.latest_step()}. Fix the cause (disk space, permissions) and rerun the same "
            "command to resume from it."
        ) from e


def save(manager: ocp.CheckpointManager, state: TrainState, *, force: bool = False) -> None:
    """Starts an asynchronous save of `state` at its step (waits for the previous save first)."""
    step = int(jax.device_get(state.step))
    wait(manager)
    manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(_rest(state)),
        ),
        force=force,
    )


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: TrainState,
    *,
    fallback_to_previous: bool = False,
) -> TrainState | None:
    """The latest saved train state, placed as `abstract_state`'s shardings say; None if none saved.

    `abstract_state` holds only shapes, dtypes and shardings: each array is read straight into its
    shards, no fresh state is built first. A step that cannot be read raises
    CheckpointCorruptError naming its directory and file; with `fallback_to_previous` the step is
    moved to WORKDIR/corrupt_checkpoints/ (logged) and the previous one restored instead.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
        check_restorable(manager, step, abstract_state)
        try:
            return _restore(manager, step, abstract_state)
        except Exception as e:
            error = CheckpointCorruptError(describe_damage(manager.directory / str(step), e))
            if not fallback_to_previous or i + 1 == len(steps):
                raise error from e
            aside = manager.directory.parent / "corrupt_checkpoints" / str(step)
            logging.warning(
                "%s\ncheckpoint.fallback_to_previous: moved it to %s; restoring step %d instead.",
                error,
                aside,
                steps[i + 1],
            )
            if jax.process_index() == 0:
                aside.parent.mkdir(exist_ok=True)
                shutil.move(manager.directory / str(step), aside)
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
            manager.reload()
    return None


def leaves(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """ "a/b/c" path -> (shape, dtype) of each array of a state tree or of orbax's metadata."""

    def name(key) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    return {
        "/".join(name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def state_differences(saved: dict, expected: dict) -> list[str]:
    """What differs between two `leaves` maps, one line each: missing, extra, reshaped arrays."""
    lines = [f"{p}: not in the checkpoint" for p in sorted(expected.keys() - saved.keys())]
    lines += [f"{p}: in the checkpoint only" for p in sorted(saved.keys() - expected.keys())]
    for p in sorted(expected.keys() & saved.keys()):
        if saved[p] != expected[p]:
            (s_shape, s_dtype), (e_shape, e_dtype) = saved[p], expected[p]
            lines.append(f"{p}: saved {s_dtype}{list(s_shape)}, expected {e_dtype}{list(e_shape)}")
    return lines


def check_restorable(manager: ocp.CheckpointManager, step: int, abstract_state: TrainState) -> None:
    """CheckpointMismatchError if step `step` holds a train state of another structure, shape or
    dtype than `abstract_state` (from its metadata, before any array is read). Metadata that
    cannot be read is left for the restore to report as damage."""
    saved = _saved_leaves(manager, step, ("params", "opt_state"))
    if saved is None:
        return
    expected = {**leaves(abstract_state.params), **leaves(_rest(abstract_state))}
    if not any(p.startswith("guard/") for p in saved):  # saved before llm.training.guard
        expected = {p: v for p, v in expected.items() if not p.startswith("guard/")}
    _raise_if_different(manager, step, saved, expected, "train state")


def _saved_leaves(manager: ocp.CheckpointManager, step: int, items: tuple[str, ...]):
    """`leaves` of the saved items of step `step` (from metadata); None if it cannot be read."""
    try:
        metadata = manager.item_metadata(step)
        trees = [metadata[item] for item in items]
    except Exception:  # noqa: BLE001  (damaged files: reported by the restore that follows)
        return None
    if any(tree is None for tree in trees):
        return None
    return {path: leaf for tree in trees for path, leaf in leaves(tree).items()}


def _raise_if_different(manager, step: int, saved: dict, expected: dict, what: str) -> None:
    differences = state_differences(saved, expected)
    if differences:
        shown = "; ".join(differences[:4]) + ("; ..." if len(differences) > 4 else "")
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {manager.directory} holds a different {what} than "
            f"this config builds ({len(differences)} arrays differ: {shown}); it is intact and "
            "was left in place"
        )


def _rest(state: TrainState) -> dict:
    """The "opt_state" item: every field of the state but the parameters (a None guard, as in
    checkpoints from before llm.training.guard, is left out)."""
    rest = {"step": state.step, "opt_state": state.opt_state, "guard": state.guard}
    return {k: v for k, v in rest.items() if v is not None}


def _restore(manager: ocp.CheckpointManager, step: int, abstract_state: TrainState) -> TrainState:
    """Step `step`. A checkpoint saved before llm.training.guard existed has no "guard": it
    comes back with guard=None, for the caller to start afresh."""
    rest = _rest(abstract_state)
    errors = []
    for item in (rest, {k: v for k, v in rest.items() if k != "guard"}):
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_state.params),
                    opt_state=ocp.args.StandardRestore(item),
                ),
            )
            return abstract_state.replace(
                params=restored.params, **{"guard": None, **restored.opt_state}
            )
        except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many types)
            errors.append(e)
    raise errors[0]


def describe_damage(step_dir: pathlib.Path, error: Exception) -> str:
    """A message naming `step_dir`, the damaged file (as far as it can be found) and the fix."""
    step_dir, text = pathlib.Path(step_dir), str(error)
    named = re.findall(r'local file "([^"]+)"', text)
    named += [
        str(pathlib.Path(d) / "_METADATA")
        for d in re.findall(r"does not exist at (\S+?)\.?$", text)
    ]
    named = [
        n for n in named if not (n.endswith("/") and pathlib.Path(n, "manifest.ocdbt").exists())
    ]
    named = [f"{n}manifest.ocdbt (missing)" if n.endswith("/") else n for n in named]
    if not named:  # JSON metadata that does not parse
        for path in sorted(step_dir.rglob("*")):
            if path.is_file() and (
                path.name.startswith("_") or path.parent.name == "array_metadatas"
            ):
                try:
                    json.loads(path.read_bytes())
                except ValueError:
                    named.append(str(path))
    file = named[-1] if named else "unknown (see the error)"
    return (
        f"checkpoint step directory {step_dir} is corrupt or partial: file {file}: "
        f"{type(error).__name__}: {text[:300]}. Delete {step_dir} to resume from the "
        "previous step, or set --config.checkpoint.fallback_to_previous=True."
    )


def split_step(run: str) -> tuple[str, int | None]:
    """ "DIR@STEP" -> (DIR, STEP); "DIR" -> (DIR, None)."""
    directory, at, step = run.rpartition("@")
    if not at:
        return run, None
    if not step.isdigit():
        raise ValueError(
            f"{run!r}: the step after '@' must be a checkpoint step number, e.g. DIR@300."
        )
    return directory, int(step)


def restore_params(
    workdir: str | pathlib.Path, abstract_params: nnx.State, step: int | None = None
) -> nnx.State:
    """The parameters of checkpoint `step` (None: the latest) in `workdir`; no optimizer state is
    read."""
    directory = pathlib.Path(workdir) / "checkpoints"
    manager = make_manager(workdir, async_save=False, create=False) if directory.is_dir() else None
    steps = sorted(manager.all_steps()) if manager else []
    if not steps:
        raise CheckpointNotFoundError(
            f"no checkpoint in {directory}: train first with "
            f"`python -m llm.train --config=experiments/default.py --workdir={workdir}`."
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointNotFoundError(
            f"no checkpoint of step {step} in {directory}; its steps are {steps}: pass one of "
            f"them as {workdir}@STEP, or the directory alone for the latest."
        )
    saved = _saved_leaves(manager, step, ("params",))
    if saved is not None:
        _raise_if_different(manager, step, saved, leaves(abstract_params), "model")
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
        )
    except Exception as e:
        raise CheckpointCorruptError(describe_damage(directory / str(step), e)) from e
    return restored.params


def verify_step(step_dir: pathlib.Path) -> str | None:
    """Reads every array of a step directory (one item at a time, into host memory, on any
    topology): None if all read back finite and its train-state step is the directory's, else
    the problem in one line."""
    step_dir = pathlib.Path(step_dir)
    try:
        handler, items = ocp.PyTreeCheckpointHandler(), {}
        with ocp.Checkpointer(handler) as checkpointer:
            for name in ITEMS:
                tree = handler.metadata(step_dir / name).tree  # raises, unlike the checkpointer's
                as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
                items[name] = checkpointer.restore(
                    step_dir / name, args=ocp.args.PyTreeRestore(restore_args=as_numpy)
                )
    except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many types)
        return describe_damage(step_dir, e)
    for name, tree in items.items():
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            if jnp.issubdtype(x.dtype, jnp.inexact) and not np.isfinite(x).all():
                where = f"{name}{jax.tree_util.keystr(path)}"
                return f"non-finite values in {where}: the run had diverged by this step."
    if int(items["opt_state"]["step"]) != int(step_dir.name):
        return f"its train state says step {int(items['opt_state']['step'])}, not {step_dir.name}."
    return None
