"""DPO through LoRA (llm.training.dpo with config.lora): the reference is the base model without
adapters (its log-probabilities equal a separate adapter-free model's), the step's update equals
plain SGD on a DPO loss written out against that separate base (values and gradients), the base
stays bit-identical with no optimizer state, and a LoRA DPO run trains through the loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util
from test_dpo import SHIPPED, _dpo_config

from data import sft
from data.tokenizer import Tokenizer
from llm import config as config_lib
from llm import runs, train
from llm.model import lora
from llm.model.transformer import Transformer
from llm.training import dpo
from llm.training.metrics import read_metrics
from llm.training.state import TrainState

LORA = {"lora.rank": 4, "lora.alpha": 8.0}
LR = 0.5


@pytest.fixture(scope="module")
def setting(tiny_config_shared):
    """The experiment, the base model's (graphdef, state), the adapted model's (graphdef, state)
    with random nonzero B, and a batch of 2 pairs without a reference."""
    exp = config_lib.resolve(_dpo_config(tiny_config_shared, "/unused", **LORA))
    model = Transformer(exp.model, rngs=nnx.Rngs(0))
    base = nnx.split(model)
    model = nnx.merge(*base)  # a separate copy to adapt
    lora.attach(model, exp.lora, exp.seed)
    adapters = [m for _, m in nnx.iter_modules(model) if isinstance(m, lora.Adapter)]
    for i, adapter in enumerate(adapters):  # B != 0: the adapters change the model
        adapter.b[...] = 0.05 * jax.random.normal(jax.random.key(i), adapter.b[...].shape)
    records = sft.read_jsonl(SHIPPED / "preference_validation.jsonl", "preference")[:2]
    arrays, _ = sft.pack_preference(records, Tokenizer(), 24, "truncate")
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    return exp, base, nnx.split(model), batch


def _logp(graphdef, state, batch):
    """[2, B] summed response log-probabilities (chosen, rejected) of a plain forward."""
    model = nnx.merge(graphdef, state)
    out = []
    for side in dpo.SIDES:
        logits = model(*(batch[f"{side}_{k}"] for k in ("inputs", "positions", "segment_ids")))
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(log_probs, batch[f"{side}_targets"][..., None], -1)[..., 0]
        out.append(jnp.sum(picked * batch[f"{side}_weights"], axis=-1))
    return jnp.stack(out)


def test_the_reference_is_the_base_without_adapters(setting):
    exp, base, (graphdef, state), batch = setting
    with lora.disabled():
        ref_logp, _ = jax.jit(dpo.reference_logprobs, static_argnums=0)(graphdef, state, batch)
    expected = _logp(*base, batch)
    np.testing.assert_allclose(ref_logp.reshape(2, -1), expected, rtol=1e-5)
    policy = _logp(graphdef, state, batch)
    assert np.max(np.abs(policy - expected)) > 1e-3  # the adapters do change the policy
    _, sums = jax.jit(dpo.pair_sums, static_argnums=(0, 3))(
        graphdef, state, batch, exp.post_training
    )  # no "reference" in the batch: the base is the reference
    margin = exp.post_training.beta * ((policy[0] - expected[0]) - (policy[1] - expected[1]))
    assert float(sums["reward_margin"]) == pytest.approx(float(jnp.sum(margin)), rel=1e-4)


def test_dpo_steps_train_only_the_adapters(setting):
    """Two SGD steps: the first equals -LR * the gradient of the plain DPO loss (policy = the
    adapted model, reference = the separate base) over the adapters; the base never moves and the
    optimizer holds state for the adapters only."""
    exp, base, (graphdef, state), batch = setting
    tx = optax.chain(optax.scale_by_adam(), optax.scale(-LR))
    adapters, rest = nnx.split_state(state, nnx.LoRAParam, ...)
    opt_state = tx.init(adapters)
    assert jax.tree.structure(opt_state[0].mu) == jax.tree.structure(adapters)
    train_state = TrainState(jnp.zeros((), jnp.int32), state, opt_state, guard={})
    step = jax.jit(dpo.make_train_step(graphdef, tx, optax.constant_schedule(LR), exp))
    new_state, metrics = step(train_state, batch)

    reference = _logp(*base, batch)

    def plain_loss(adapters):
        policy = _logp(graphdef, nnx.merge_state(adapters, rest), batch)
        h = exp.post_training.beta * ((policy[0] - reference[0]) - (policy[1] - reference[1]))
        return jnp.mean(-jax.nn.log_sigmoid(h))

    loss, grads = jax.value_and_grad(plain_loss)(adapters)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.global_norm(grads)), rel=1e-4)
    expected, _ = tx.update(grads, tx.init(adapters), adapters)
    new_adapters, new_rest = nnx.split_state(new_state.params, nnx.LoRAParam, ...)
    for got, before, update in zip(
        jax.tree.leaves(new_adapters), jax.tree.leaves(adapters), jax.tree.leaves(expected)
    ):
        np.testing.assert_allclose(got, before + update, rtol=1e-4, atol=1e-6)
    new_state, _ = step(new_state, batch)
    _, new_rest = nnx.split_state(new_state.params, nnx.LoRAParam, ...)
    for got, before in zip(jax.tree.leaves(new_rest), jax.tree.leaves(rest)):
        np.testing.assert_array_equal(got, before)


def test_a_lora_dpo_run_trains_through_the_loop(tmp_path, tiny_config, tiny_run):
    """Adapters (with dropout) on tiny_run's model, accumulated over 2 micro-batches: starts at
    the reference (KL 0), evaluates, and leaves the base as init_from gave it."""
    overrides = {**LORA, "lora.dropout": 0.1, "model.scan_layers": False, "grad_accum_steps": 2}
    config = _dpo_config(tiny_config, tiny_run, steps=3, eval_every=3, **overrides)
    config = config_lib.with_overrides(config, {"checkpoint_every": 3})
    train.train_and_evaluate(config, str(tmp_path))
    records = {r["step"]: r for r in read_metrics(tmp_path)}
    assert records[1]["dpo/kl_to_ref"] == pytest.approx(0, abs=1e-6)  # B starts at 0
    assert "eval_dpo/accuracy" in records[3]
    trained, _ = runs.load_run(str(tmp_path))
    start, _ = runs.load_run(str(tiny_run))
    got = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(trained, nnx.Not(nnx.LoRAParam))))
    want = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(start)))
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=str(key))
