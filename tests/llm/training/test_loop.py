"""Training: the loss falls, checkpoints round-trip, and a resumed run equals an uninterrupted one
bit for bit; what the console prints and metrics.jsonl records."""

import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm import config as config_lib
from llm import train
from llm.model.config import ModelConfig, MoEConfig
from llm.model.transformer import Transformer
from llm.training import checkpoint, loop
from llm.training.metrics import read_metrics
from llm.training.optimizer import make_optimizer
from llm.training.state import TrainState
from llm.training.step import make_train_step


def test_a_few_steps_on_a_fixed_batch_reduce_the_loss(tiny_config):
    cfg = config_lib.model_config(tiny_config)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx, schedule = make_optimizer(config_lib.resolve(tiny_config).optimizer, steps=30)
    step = jax.jit(make_train_step(graphdef, tx, schedule, grad_accum_steps=2, z_loss=1e-4))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 33)), jnp.int32)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": jnp.broadcast_to(jnp.arange(32), (4, 32)),
        "segment_ids": jnp.ones((4, 32), jnp.int32),
        "weights": jnp.ones((4, 32), jnp.float32),
    }
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), guard={})
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(np.log(cfg.vocab_size), rel=0.05)
    assert losses[-1] < 0.5 * losses[0]


def test_checkpoint_round_trip(tmp_path, tiny_config):
    cfg = config_lib.model_config(tiny_config)
    params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    tx, _ = make_optimizer(config_lib.resolve(tiny_config).optimizer, steps=10)
    state = TrainState(jnp.array(7, jnp.int32), params, tx.init(params), guard={})
    manager = checkpoint.make_manager(tmp_path)
    checkpoint.save(manager, state)
    manager.wait_until_finished()
    restored = checkpoint.restore_latest(manager, jax.eval_shape(lambda: state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    only_params = checkpoint.restore_params(tmp_path, jax.eval_shape(lambda: params))
    np.testing.assert_array_equal(only_params["embed"][...], params["embed"][...])


MUP = {  # muP off its base width, logging the activation sizes
    "model.parametrization": "mup",
    "model.mup_base_width": 32,
    "debug.log_activation_rms": True,
}


@pytest.mark.parametrize("overrides", [{}, MUP], ids=["sp", "mup"])
def test_resumed_run_matches_an_uninterrupted_one(
    tmp_path, tiny_config, train_until_first_save, overrides
):
    tiny_config = config_lib.with_overrides(tiny_config, overrides)
    full = train.train_and_evaluate(tiny_config, str(tmp_path / "full"))
    expected = {r["step"]: r for r in read_metrics(tmp_path / "full")}
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert "eval_loss" in full

    train_until_first_save(tiny_config, str(tmp_path / "resumed"))
    train.train_and_evaluate(tiny_config, str(tmp_path / "resumed"))

    records = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # history kept across the restart
    for record in records:
        assert record["loss"] == expected[record["step"]]["loss"]  # bit-identical on CPU
        sizes = {k: v for k, v in record.items() if k.startswith("rms/")}
        assert sizes == {k: expected[record["step"]][k] for k in sizes}
        assert len(sizes) == (5 if overrides else 0)  # rms/embedding, ... rms/logits


def test_console_lines_clock_fields_and_a_finished_rerun(tmp_path, tiny_config):
    """Without a terminal the run prints a line per log and per evaluation; metrics.jsonl gets
    wall_time, elapsed and a running median of tokens/s; a rerun of the finished run says so and
    neither compiles nor trains."""
    command = [
        sys.executable, "-m", "llm.train", f"--workdir={tmp_path / 'run'}",
        "--config.steps=4", "--config.log_every=2", "--config.eval_every=4",
        "--config.eval_batches=1", "--config.model.num_layers=1", "--config.model.embed_dim=32",
        "--config.model.num_heads=2", "--config.model.num_kv_heads=1", "--config.model.mlp_dim=64",
        "--config.seq_len=32", "--config.batch_size=8", "--config.sample_prompt=",
        f"--config.data.text_dir={tiny_config.data.text_dir}",
        f"--config.data.data_dir={tiny_config.data.data_dir}",
    ]  # fmt: skip

    def run() -> str:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    first = run()
    assert "layers: dense\nrun: 4 steps x 256 tokens; " in first  # the start-up summary
    assert "step 2/4: loss " in first and "step 4/4: eval loss " in first
    assert "\r" not in first
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        assert record["elapsed"] > 0 and abs(record["wall_time"] - time.time()) < 600
        assert record["tokens_per_second_median"] > 0
    assert records[-1]["elapsed"] > records[0]["elapsed"]

    again = run()
    assert "this run is finished (step 4 of 4)" in again
    assert "compiled" not in again and "step 2/4" not in again
    assert "final: loss" in again  # the last record's figures
    assert len(read_metrics(tmp_path / "run")) == 2


def test_profile_traces_the_chosen_steps(tmp_path, tiny_config):
    config = config_lib.with_overrides(tiny_config, {"profile.start_step": 1, "profile.steps": 2})
    train.train_and_evaluate(config, str(tmp_path))
    traces = list((tmp_path / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_layer_schedule_marks_sparse_and_moe_layers():
    cfg = ModelConfig(
        num_layers=6, attention_pattern="sliding*2,dense",
        moe=MoEConfig(num_experts=4, first_dense_layers=1, every=1),
    )  # fmt: skip
    assert loop.layer_schedule(cfg) == "sliding, sliding+moe, dense+moe, sliding+moe x2, dense+moe"
    assert loop.layer_schedule(ModelConfig()) == "dense x4"


def test_bfloat16_compute_trains_float32_parameters(tmp_path, tiny_config):
    """The supported mixed precision: bfloat16 matmuls, float32 parameters and AdamW state."""
    config = config_lib.with_overrides(
        tiny_config, {"model.dtype": "bfloat16", "steps": 3, "eval_every": 0}
    )
    train.train_and_evaluate(config, str(tmp_path))
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert len(losses) == 3 and np.isfinite(losses).all()
    exp = config_lib.resolve(config)
    model = nnx.eval_shape(lambda: Transformer(exp.model, rngs=nnx.Rngs(0)))
    params = checkpoint.restore_params(tmp_path, nnx.state(model))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
