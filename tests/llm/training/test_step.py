"""The train and eval steps with config.loss.impl="chunked" (kernels.cross_entropy on the hidden
states) give the plain loss, gradients and updated parameters: tied and untied embeddings, MoE,
bf16 compute, z-loss, masked targets, a ragged last vocabulary chunk and sequence block."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llm import config as config_lib
from llm.model.transformer import Transformer
from llm.parallel import partitioning
from llm.training import loop
from llm.training.state import TrainState
from llm.training.step import LossConfig, make_eval_step, make_train_step

PLAIN = LossConfig()
CHUNKED = LossConfig(impl="chunked", vocab_chunk=1000, seq_block=12)  # ragged: of 4096 and 32


def _batch(vocab: int) -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (2, 33))
    weights = (rng.random((2, 32)) > 0.25).astype(np.float32)  # masked targets
    return {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(32), (2, 32)),
        "segment_ids": jnp.ones((2, 32), jnp.int32),
        "weights": jnp.asarray(weights),
    }


def _run_steps(config, grad_accum_steps: int):
    """For the plain and the chunked loss: (parameter change of one SGD step with learning rate 1,
    i.e. minus the mean gradient; train metrics; eval cross-entropy sum and token count)."""
    exp = config_lib.resolve(config)
    graphdef, params = nnx.split(Transformer(exp.model, rngs=nnx.Rngs(0)))
    tx = optax.sgd(1.0)
    trainable, _ = nnx.split_state(params, nnx.Param, ...)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(trainable), guard={})
    batch = _batch(exp.model.vocab_size)
    results = []
    for loss in (PLAIN, CHUNKED):
        step = make_train_step(
            graphdef, tx, optax.constant_schedule(1.0), grad_accum_steps=grad_accum_steps,
            z_loss=1e-2, loss=loss,
        )  # fmt: skip
        new_state, metrics = jax.jit(step)(state, batch)
        update = jax.tree.map(jnp.subtract, new_state.params, params)
        results.append((update, metrics, jax.jit(make_eval_step(graphdef, loss))(params, batch)))
    return exp, batch, results


@pytest.mark.parametrize(
    "overrides",
    [{}, {"model.tie_embeddings": False}, {"model.moe.num_experts": 4, "model.moe.top_k": 2}],
    ids=["tied", "untied", "moe"],
)
def test_chunked_loss_step_equals_plain(tiny_config, overrides):
    config = config_lib.with_overrides(tiny_config, overrides)
    exp, batch, (plain, chunked) = _run_steps(config, grad_accum_steps=2)
    assert plain[1]["loss"] == pytest.approx(np.log(exp.model.vocab_size), rel=0.05)
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(chunked[1][name], plain[1][name], rtol=1e-5, err_msg=name)
    for got, want in zip(jax.tree.leaves(chunked[0]), jax.tree.leaves(plain[0]), strict=True):
        # atol: two float32 ulps of a parameter near 1 (the update is new - old parameters)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2.5e-7)
    np.testing.assert_allclose(chunked[2][0], plain[2][0], rtol=1e-5)  # eval cross-entropy sum
    assert chunked[2][1] == plain[2][1] == float(batch["weights"].sum())


def test_chunked_loss_step_bfloat16_compute(tiny_config):
    config = config_lib.with_overrides(tiny_config, {"model.dtype": "bfloat16"})
    _, _, (plain, chunked) = _run_steps(config, grad_accum_steps=1)
    np.testing.assert_allclose(chunked[1]["loss"], plain[1]["loss"], rtol=1e-2)
    np.testing.assert_allclose(chunked[1]["grad_norm"], plain[1]["grad_norm"], rtol=5e-2)
    for got, want in zip(jax.tree.leaves(chunked[0]), jax.tree.leaves(plain[0]), strict=True):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2 * scale)


def test_chunked_loss_on_a_data_and_fsdp_mesh(tiny_config):
    """Compiled as llm.train compiles it, on 4 x 2 devices (batch split, unembedding sharded on
    embed): the same loss and gradient norm as the plain loss."""
    metrics = []
    for impl in ("plain", "chunked"):
        overrides = {"mesh.data": 4, "mesh.fsdp": 2, "loss.impl": impl, "loss.seq_block": 12}
        exp = config_lib.resolve(config_lib.with_overrides(tiny_config, overrides))
        mesh = partitioning.make_mesh(dict(exp.mesh.sizes))
        batch = {k: np.concatenate([v] * 4) for k, v in _batch(exp.model.vocab_size).items()}
        with jax.set_mesh(mesh), partitioning.axis_rules(exp.mesh.rules):
            setup = loop.setup_state(exp, mesh)
            batch = jax.device_put(batch, partitioning.batch_sharding(mesh, exp.mesh.rules))
            metrics.append(loop.compile_train_step(exp, setup, batch)(setup.state, batch)[1])
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(metrics[1][name], metrics[0][name], rtol=1e-5, err_msg=name)
