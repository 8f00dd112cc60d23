"""A run's workdir: one writer at a time, and a record of the config of every start.

    WORKDIR/.lock                 held (flock) by the one process training here; the kernel
                                  releases it when that process exits, kill -9 included
    WORKDIR/config.json           the config the run trains with (as given, overrides applied);
                                  written only once every check of a start has passed
    WORKDIR/config_history.jsonl  one line per start that trained: time, host, pid, commit, the
                                  step it started at, its config and what it changed

A resume may change only the fields of SAFE_TO_CHANGE; any other change is refused naming the
fields, unless config.resume_policy="allow_changes" (then the changes are logged in the history).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from llm.errors import ConfigError
from llm.model.config import shape_differences

# Dotted config fields (or sections, ending in ".") a resume may change: how often to log,
# evaluate and save, on which lm-eval tasks, where metrics go, how long to run, how the state is
# laid out over devices (restores reshard), what the backward pass recomputes and which kernels
# compute the same attention and loss. Anything else changes what is trained.
SAFE_TO_CHANGE = (
    "steps",
    "log_every",
    "eval_every",
    "eval_batches",
    "checkpoint_every",
    "keep_checkpoints",
    "checkpoint.",
    "sample_prompt",
    "sample_tokens",
    "profile.",
    "debug.",
    "resume_policy",
    "resume_schedule",
    "mesh.",
    "axis_rules",
    "model.remat",
    "model.attention_impl",
    "loss.",
    "tracker",
    "data.data_dir",
    "eval.",
)
RESUME_POLICIES = ("strict", "allow_changes")


class WorkdirBusyError(RuntimeError):
    """Another process is training in this workdir."""


class WorkdirWriteError(OSError):
    """A record of the run could not be written (disk full, ...)."""


class ResumeChangeError(ValueError):
    """A resume that changes fields outside SAFE_TO_CHANGE under resume_policy="strict"."""


def create(workdir: str | pathlib.Path) -> pathlib.Path:
    """`workdir`, created if missing; PermissionError (one line) if it cannot be written."""
    path = pathlib.Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=path).close()  # unique per process: hosts may share path
    except OSError as e:
        raise PermissionError(
            f"workdir {workdir} is not writable ({e.strerror}): pass a --workdir you can write to."
        ) from None
    return path


@contextlib.contextmanager
def lock(path: pathlib.Path) -> Iterator[None]:
    """Holds WORKDIR/.lock for the duration; WorkdirBusyError naming the holder if another
    process has it. With several processes only the first takes it; all fail together."""
    fd, error = None, ""
    if jax.process_index() == 0:
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            holder = f"pid {os.getpid()} on host {socket.gethostname()} since {_now()}"
            os.write(fd, holder.encode())
        except BlockingIOError:
            holder = (path / ".lock").read_text().strip() or "an unknown process"
            os.close(fd)
            fd = None
            error = (
                f"workdir {path} is in use by another training process ({holder}): wait for it "
                "to finish or stop it, or pass another --workdir."
            )
    if jax.process_count() > 1:
        busy = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
        if busy and not error:
            error = f"workdir {path} is in use by another training process (see process 0)."
    if error:
        raise WorkdirBusyError(error)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


def read_config(path: pathlib.Path) -> dict | None:
    """WORKDIR/config.json of an earlier start, None for a new run; a damaged file is a
    ConfigError pointing at its copy in the history."""
    saved = path / "config.json"
    if not saved.exists():
        return None
    try:
        return json.loads(saved.read_text())
    except (ValueError, OSError) as e:
        raise ConfigError(
            f"{saved} cannot be read ({e}): restore it from the last line of "
            f'{path / "config_history.jsonl"} (its "config"), or pass a new --workdir.'
        ) from None


def flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"num_layers": 2}} -> {"model.num_layers": 2}."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    """{"moe.num_experts": 4} -> {"moe": {"num_experts": 4}}."""
    out: dict = {}
    for dotted, value in flat.items():
        *parents, name = dotted.split(".")
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value
    return out


def changes(recorded: dict, given: dict) -> list[tuple[str, Any, Any]]:
    """(dotted field, recorded value, given value) for each field both configs have and that
    differs (a field one lacks was added or removed by a code change, not by the user)."""
    old, new = flatten(recorded), flatten(given)
    return [(k, old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]]


def is_safe(field: str) -> bool:
    return any(field == s or (s.endswith(".") and field.startswith(s)) for s in SAFE_TO_CHANGE)


def format_changes(changed: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed)


def explain_changes(changed: list) -> str:
    """The config changes behind a state mismatch: first the model fields the dataclasses mark
    as fixing parameter shapes (llm.model.config.SHAPE), then all of them."""
    before = {k[len("model.") :]: a for k, a, _ in changed if k.startswith("model.")}
    after = {k[len("model.") :]: b for k, _, b in changed if k.startswith("model.")}
    fixing = shape_differences(unflatten(before), unflatten(after))
    shapes = ", ".join(f"model.{k}: {a!r} -> {b!r}" for k, a, b in fixing)
    everything = f"changed since the run's config.json: {format_changes(changed)}"
    return (
        f"model fields that fix parameter shapes changed ({shapes}); {everything}"
        if shapes
        else everything
    )


def check_resume(recorded: dict, given: dict, policy: str) -> list[tuple[str, Any, Any]]:
    """The fields a resume changes; ResumeChangeError for unsafe ones under the strict policy."""
    changed = changes(recorded, given)
    unsafe = [c for c in changed if not is_safe(c[0])]
    if unsafe and policy == "strict":
        raise ResumeChangeError(
            f"this workdir's run was started with other settings ({format_changes(unsafe)}): "
            "resume with the recorded values (config.json), pass a new --workdir, or "
            "--config.resume_policy=allow_changes to continue with them (logged in "
            "config_history.jsonl)."
        )
    return changed


def read_history(path: pathlib.Path) -> list[dict]:
    """The records of config_history.jsonl (a line cut short by a kill is dropped)."""
    history = path / "config_history.jsonl"
    if not history.exists():
        return []
    records = []
    for line in history.read_text().splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def record_start(
    path: pathlib.Path, config_json: str, start_step: int, changed: list, schedule: dict
) -> None:
    """Writes config.json (atomically) and appends this start to config_history.jsonl."""
    if jax.process_index() != 0:
        return
    _write_atomically(path / "config.json", config_json)
    record = {
        "time": _now(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "commit": _commit(),
        "start_step": start_step,
        "changes": [{"field": k, "from": a, "to": b} for k, a, b in changed],
        "schedule": schedule,
        "config": json.loads(config_json),
    }
    try:
        with open(path / "config_history.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise WorkdirWriteError(
            f"could not append to {path / 'config_history.jsonl'} ({e.strerror or e}): free "
            "space (or fix permissions) and rerun the same command."
        ) from None


def _write_atomically(target: pathlib.Path, text: str) -> None:
    """`text` into `target` by rename, with the permissions the umask gives a new file; nothing
    is left behind if the write fails (disk full)."""
    name = None
    try:
        with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False) as f:
            name = f.name
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(name, 0o666 & ~umask)
        os.replace(name, target)
    except OSError as e:
        if name:
            pathlib.Path(name).unlink(missing_ok=True)
        raise WorkdirWriteError(
            f"could not write {target} ({e.strerror or e}); nothing was trained: free space (or "
            "fix permissions) and rerun the same command."
        ) from None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _commit() -> str | None:
    """The git commit of this code, None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=pathlib.Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return None
    return out.stdout.strip() or None
