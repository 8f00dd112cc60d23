"""Non-finite steps and loss spikes: "stop" names the step and what went bad and never saves it,
"skip" keeps the old parameters and optimizer state; the spike window resumes exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data import pipeline
from llm import config as config_lib
from llm import train
from llm.model.transformer import Transformer
from llm.training import checkpoint, guard
from llm.training.metrics import read_metrics
from llm.training.optimizer import make_optimizer
from llm.training.state import TrainState
from llm.training.step import make_train_step


def _guard_config(nonfinite="skip", window=0, sigmas=3.0):
    return guard.GuardConfig(nonfinite=nonfinite, spike_window=window, spike_sigmas=sigmas)


def _state(params, opt_state, config) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=opt_state,
        guard=guard.init_guard(config),
    )


def _fake_step(state, batch):
    """Moves params by 1 and reports the batch's loss: the guard's decisions are readable."""
    new = state.replace(
        step=state.step + 1, params={"w": state.params["w"] + 1.0}, opt_state=state.opt_state + 1
    )
    return new, {"loss": batch["loss"], "grad_norm": jnp.float32(1.0)}


def _run(step, state, losses):
    for loss in losses:
        state, metrics = step(state, {"loss": jnp.float32(loss)})
    return state, metrics


def test_loss_spikes_and_nonfinite_losses_are_skipped_and_the_window_resumes(tmp_path):
    config = _guard_config(window=4, sigmas=3.0)
    step = jax.jit(guard.guarded(_fake_step, config))
    state = _state({"w": jnp.zeros(())}, jnp.zeros((), jnp.int32), config)
    losses = [1.0, 1.2, 0.8, 1.1, 1.0, 5.0, float("nan"), 1.05, 0.9, 1.1, 9.0, 1.0]
    skipped = {5, 6, 10}  # the spikes and the NaN: 0-based positions
    full, metrics = _run(step, state, losses)
    assert int(full.step) == len(losses)
    assert float(full.params["w"]) == len(losses) - len(skipped)  # a skipped step moves nothing
    assert int(full.opt_state) == len(losses) - len(skipped)
    assert int(metrics["skipped_steps"]) == len(skipped)
    assert int(full.guard["bad_step"]) == 7 and int(full.guard["bad_what"]) == guard.LOSS

    half, _ = _run(step, state, losses[:8])  # save, restore, go on: the same decisions
    manager = checkpoint.make_manager(tmp_path)
    checkpoint.save(manager, half)
    checkpoint.wait(manager)
    restored = checkpoint.restore_latest(manager, jax.eval_shape(lambda: half))
    resumed, _ = _run(step, restored, losses[8:])
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(a, b)


def test_skip_keeps_parameters_and_optimizer_state_bit_for_bit(tiny_config):
    cfg = config_lib.model_config(config_lib.with_overrides(tiny_config, {"model.num_layers": 1}))
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tx, schedule = make_optimizer(config_lib.resolve(tiny_config).optimizer, steps=10)
    inner = make_train_step(graphdef, tx, schedule, grad_accum_steps=1, z_loss=0.0)
    step = jax.jit(guard.guarded(inner, _guard_config("skip")))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 17)), jnp.int32)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": jnp.broadcast_to(jnp.arange(16), (2, 16)),
        "segment_ids": jnp.ones((2, 16), jnp.int32),
        "weights": jnp.ones((2, 16), jnp.float32),
    }
    state = _state(params, tx.init(params), _guard_config())
    state, _ = step(state, batch)  # a good step first, so the optimizer state is not all zeros
    before = jax.tree.map(np.asarray, state)
    poisoned = {**batch, "weights": batch["weights"].at[0, 3].set(jnp.nan)}
    after, metrics = step(state, poisoned)
    assert np.isnan(metrics["loss"]) and int(metrics["skipped_steps"]) == 1
    assert int(after.step) == 2
    for key in ("params", "opt_state"):
        after_key, before_key = getattr(after, key), getattr(before, key)
        for a, b in zip(jax.tree.leaves(after_key), jax.tree.leaves(before_key), strict=True):
            np.testing.assert_array_equal(a, b)


def _poison(monkeypatch, bad_step):
    """Batch `bad_step` gets NaN weights: that step's loss and gradients are NaN."""
    batch = pipeline.PackedDataset.batch

    def poisoned(self, step, *args, **kwargs):
        result = batch(self, step, *args, **kwargs)
        if step == bad_step:
            result["weights"] = np.full_like(result["weights"], np.nan)
        return result

    monkeypatch.setattr(pipeline.PackedDataset, "batch", poisoned)


@pytest.fixture
def small(tiny_config):
    return config_lib.with_overrides(
        tiny_config,
        {"steps": 6, "checkpoint_every": 2, "eval_every": 0, "model.num_layers": 1},
    )


def test_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, small, monkeypatch):
    _poison(monkeypatch, bad_step=4)  # trains step 5
    every_step = config_lib.with_overrides(small, {"checkpoint_every": 1, "log_every": 6})
    with pytest.raises(guard.NonFiniteError, match="step 5: the loss, gradients and parameters"):
        train.train_and_evaluate(every_step, str(tmp_path))  # the save of step 5 is refused
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "4"]


def test_stop_names_non_finite_parameters(tmp_path):
    def overflowing_step(state, batch):  # a finite loss and gradients, an update to infinity
        new = state.replace(step=state.step + 1, params={"w": state.params["w"] * 1e39})
        return new, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0)}

    config = _guard_config("stop")
    state = _state({"w": jnp.ones((2,))}, jnp.zeros(()), config)
    state, _ = jax.jit(guard.guarded(overflowing_step, config))(state, {})
    manager = checkpoint.make_manager(tmp_path)
    with pytest.raises(guard.NonFiniteError, match="step 1: the parameters went non-finite.*none"):
        guard.raise_if_nonfinite(state, manager)


def test_skip_policy_trains_through_a_poisoned_batch(tmp_path, small, monkeypatch):
    _poison(monkeypatch, bad_step=2)  # trains step 3
    skip = config_lib.with_overrides(small, {"nonfinite": "skip"})
    metrics = train.train_and_evaluate(skip, str(tmp_path))
    records = read_metrics(tmp_path)
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert np.isnan(records[2]["loss"]) and np.isfinite(metrics["loss"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "6"]
