"""Checkpoint faults: retention waits for the next commit, a failed asynchronous save is an error,
a corrupt or partial step is named (or, if asked, the previous step restored)."""

import errno
import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import config as config_lib
from llm import train
from llm.parallel import partitioning
from llm.training import checkpoint, debug, loop
from llm.training.metrics import last_per_step, read_metrics
from llm.training.state import TrainState


def _state(step: int) -> TrainState:
    return TrainState(
        step=jnp.array(step, jnp.int32),
        params={"w": jnp.full((16, 16), float(step))},
        opt_state={"m": jnp.zeros((16,))},
        guard={"skipped": jnp.zeros((), jnp.int32)},
    )


def _committed(directory) -> list[int]:
    return sorted(int(p.name) for p in (directory / "checkpoints").iterdir() if p.name.isdigit())


def _temporary(directory) -> list[str]:
    return [p.name for p in (directory / "checkpoints").iterdir() if not p.name.isdigit()]


def test_retention_and_failed_saves(tmp_path, monkeypatch):
    gate, reached, failure = threading.Event(), threading.Event(), []

    def pause(point):  # runs in orbax's save thread after the files are written, before commit
        reached.set()
        gate.wait(60)
        if failure:
            raise failure[0]

    monkeypatch.setattr(debug, "pause", pause)
    manager = checkpoint.make_manager(tmp_path, keep=1)
    gate.set()
    checkpoint.save(manager, _state(1))
    checkpoint.wait(manager)
    assert _committed(tmp_path) == [1]

    gate.clear(), reached.clear()
    checkpoint.save(manager, _state(2))
    assert reached.wait(60)
    assert _committed(tmp_path) == [1] and _temporary(tmp_path), "keep=1 still holds step 1"
    gate.set()
    checkpoint.wait(manager)
    assert _committed(tmp_path) == [2] and not _temporary(tmp_path)

    # An I/O error in the background: raised at the next wait, the committed step is kept.
    failure.append(OSError(errno.ENOSPC, "No space left on device"))
    checkpoint.save(manager, _state(3))
    with pytest.raises(checkpoint.CheckpointSaveError, match="step 3 .* No space left on device"):
        checkpoint.wait(manager)
    assert _committed(tmp_path) == [2]
    # ... or at the next save.
    checkpoint.save(manager, _state(4))
    with pytest.raises(checkpoint.CheckpointSaveError, match="step 4 .*last committed .* step 2"):
        checkpoint.save(manager, _state(5))
    assert _committed(tmp_path) == [2]
    abstract = jax.eval_shape(lambda: _state(0))
    np.testing.assert_array_equal(checkpoint.restore_latest(manager, abstract).params["w"], 2.0)


@pytest.mark.parametrize(
    "damage, file",
    [
        ("truncate", "params/d/"),  # an array file cut short
        ("delete", "opt_state/_METADATA"),  # missing metadata
    ],
)
def test_corrupt_step_is_named_or_skipped(tmp_path, caplog, damage, file):
    manager = checkpoint.make_manager(tmp_path, keep=2)
    for step in (3, 6):
        checkpoint.save(manager, _state(step))
    checkpoint.wait(manager)
    step_dir = tmp_path / "checkpoints" / "6"
    target = min(step_dir.glob(file + "*"))
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:10])
    else:
        target.unlink()
    abstract = jax.eval_shape(lambda: _state(0))

    manager = checkpoint.make_manager(tmp_path, keep=2)
    with pytest.raises(checkpoint.CheckpointCorruptError) as error:
        checkpoint.restore_latest(manager, abstract)
    assert f"checkpoint step directory {step_dir} is corrupt" in str(error.value)
    assert f"file {target}" in str(error.value)
    assert "fallback_to_previous" in str(error.value)

    with caplog.at_level(logging.WARNING):
        restored = checkpoint.restore_latest(manager, abstract, fallback_to_previous=True)
    assert int(restored.step) == 3
    assert "restoring step 3 instead" in caplog.text
    assert _committed(tmp_path) == [3]
    assert (tmp_path / "corrupt_checkpoints" / "6").is_dir(), "set aside, not deleted"


def test_training_resumes_from_the_previous_step_of_a_corrupt_checkpoint(tmp_path, tiny_config):
    config = config_lib.with_overrides(
        tiny_config,
        {"steps": 4, "checkpoint_every": 2, "eval_every": 0, "model.num_layers": 1},
    )
    train.train_and_evaluate(config, str(tmp_path))
    expected = last_per_step(read_metrics(tmp_path))
    data_file = min((tmp_path / "checkpoints" / "4" / "params" / "d").iterdir())
    data_file.write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointCorruptError, match=str(data_file)):
        train.train_and_evaluate(config, str(tmp_path))
    fallback = config_lib.with_overrides(config, {"checkpoint.fallback_to_previous": True})
    train.train_and_evaluate(fallback, str(tmp_path))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 3, 4]  # steps 3, 4 trained again
    assert records[-1]["loss"] == expected[4]["loss"]
    assert _committed(tmp_path) == [2, 4]


class RecordingJax:
    """`jax` for llm.train, recording the names of the functions it jits."""

    def __init__(self):
        self.jitted = []

    def __getattr__(self, name):
        return getattr(jax, name)

    def jit(self, fn, **kwargs):
        self.jitted.append(fn.__name__)
        return jax.jit(fn, **kwargs)


def test_restore_reads_into_abstract_targets_without_a_fresh_state(
    tmp_path, tiny_config, monkeypatch
):
    recorder = RecordingJax()
    monkeypatch.setattr(loop, "jax", recorder)
    mesh = partitioning.make_mesh(tiny_config.mesh.to_dict())
    with jax.set_mesh(mesh), partitioning.axis_rules(tuple(tiny_config.axis_rules)):
        fresh = loop.setup_state(config_lib.resolve(tiny_config), mesh).state
        assert recorder.jitted == ["init_state"]  # a fresh start builds the state
        manager = checkpoint.make_manager(tmp_path)
        checkpoint.save(
            manager, fresh.replace(guard=None)
        )  # the format from before llm.training.guard
        checkpoint.wait(manager)
        recorder.jitted.clear()
        restored = loop.setup_state(config_lib.resolve(tiny_config), mesh, manager).state
    assert recorder.jitted == [], "a restore builds no fresh state, only jax.eval_shape"
    assert jax.tree.structure(restored) == jax.tree.structure(fresh), (
        "a checkpoint from before llm.training.guard gets a fresh guard"
    )
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(fresh), strict=True):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(a, b)
