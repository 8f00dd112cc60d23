"""llm.training.dpo: the DPO, IPO and SimPO losses equal their formulas (values and gradients) on
hand-computed log-probabilities; sequence log-probabilities and the KL to the reference equal
plain numpy; a short DPO run on the shipped preference set beats chance on validation pairs; a
resumed DPO run equals an uninterrupted one bit for bit."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from data import sft
from data.packing import PACKED_KEYS
from data.tokenizer import Tokenizer
from llm import config as config_lib
from llm import train
from llm.errors import ConfigError
from llm.model.transformer import Transformer
from llm.training import dpo
from llm.training.metrics import read_metrics
from llm.training.state import TrainState

SHIPPED = pathlib.Path(sft.__file__).parent / "post_training"
POLICY = np.array([[-12.0, -30.5, -7.25], [-14.0, -29.0, -9.5]])  # [chosen, rejected] x 3 pairs
REFERENCE = np.array([[-13.0, -30.0, -8.0], [-13.5, -31.0, -9.0]])
LENGTHS = np.array([[4.0, 10.0, 3.0], [5.0, 9.0, 4.0]])
BETA, GAMMA = 0.5, 0.3


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _expected(loss):
    """Per-pair loss and d(loss)/d(policy) [2, 3], written out by hand."""
    (pc, pr), (rc, rr), (lc, lr) = POLICY, REFERENCE, LENGTHS
    if loss == "dpo":
        h = BETA * ((pc - rc) - (pr - rr))
        d = -BETA * _sigmoid(-h)
        return -_log_sigmoid(h), np.stack([d, -d])
    if loss == "ipo":
        h = (pc - rc) / lc - (pr - rr) / lr - 1 / (2 * BETA)
        return h**2, np.stack([2 * h / lc, -2 * h / lr])
    h = BETA * (pc / lc - pr / lr) - GAMMA
    d = -_sigmoid(-h) * BETA
    return -_log_sigmoid(h), np.stack([d / lc, -d / lr])


@pytest.mark.parametrize("loss", dpo.LOSSES)
def test_losses_and_gradients_equal_their_formulas(loss):
    def total(policy):
        losses, _, _ = dpo.preference_losses(
            policy, jnp.asarray(REFERENCE), jnp.asarray(LENGTHS), loss=loss, beta=BETA, gamma=GAMMA
        )
        return jnp.sum(losses), losses

    (_, losses), grads = jax.value_and_grad(total, has_aux=True)(jnp.asarray(POLICY))
    values, derivatives = _expected(loss)
    np.testing.assert_allclose(losses, values, rtol=1e-6)
    np.testing.assert_allclose(grads, derivatives, rtol=1e-5)


def test_rewards_and_their_margin():
    _, chosen, rejected = dpo.preference_losses(
        jnp.asarray(POLICY), jnp.asarray(REFERENCE), jnp.asarray(LENGTHS), loss="dpo", beta=BETA
    )
    np.testing.assert_allclose(chosen, BETA * (POLICY[0] - REFERENCE[0]))
    np.testing.assert_allclose(rejected, BETA * (POLICY[1] - REFERENCE[1]))


def test_sequence_logprobs_equal_plain_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 5))
    weights = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], np.float32)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = [
        sum(log_probs[b, t, targets[b, t]] * weights[b, t] for t in range(5)) for b in (0, 1)
    ]
    got = dpo.sequence_logprobs(jnp.asarray(log_probs), jnp.asarray(targets), jnp.asarray(weights))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def _preference_batch(seq_len=24, pairs=2):
    records = sft.read_jsonl(SHIPPED / "preference_validation.jsonl", "preference")[:pairs]
    arrays, _ = sft.pack_preference(records, Tokenizer(), seq_len, "truncate")
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def test_pair_sums_equal_plain_numpy(tiny_config_shared):
    """Log-probabilities from the models' logits, the KL of policy from reference over response
    tokens; and for policy = reference: zero rewards and KL, a log(2) DPO loss per pair."""
    exp = config_lib.resolve(_dpo_config(tiny_config_shared, "/unused"))
    graphdef, state = nnx.split(Transformer(exp.model, rngs=nnx.Rngs(0)))
    reference = nnx.state(Transformer(exp.model, rngs=nnx.Rngs(1)))
    batch = _preference_batch()
    pair_sums = jax.jit(dpo.pair_sums, static_argnums=(0, 3))
    _, sums = pair_sums(graphdef, state, {**batch, "reference": reference}, exp.post_training)

    @jax.jit
    def logits(params, side):
        model = nnx.merge(graphdef, params)
        return model(*(side[k] for k in ("inputs", "positions", "segment_ids")))

    def numpy_log_probs(params, side):  # [B, L, V]
        x = np.asarray(logits(params, {k: batch[f"{side}_{k}"] for k in PACKED_KEYS}), np.float64)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    kl, tokens = 0.0, 0.0
    for side in dpo.SIDES:
        p, q = numpy_log_probs(state, side), numpy_log_probs(reference, side)
        weights = np.asarray(batch[f"{side}_weights"])
        picked = np.take_along_axis(p, np.asarray(batch[f"{side}_targets"])[..., None], -1)
        expected = np.sum(picked[..., 0] * weights)
        assert float(sums[f"{side}_logp"]) == pytest.approx(expected, rel=1e-5)
        kl += np.sum(np.sum(np.exp(p) * (p - q), -1) * weights)
        tokens += weights.sum()
    assert float(sums["kl_to_ref"]) == pytest.approx(kl, rel=1e-4)
    assert float(sums["tokens"]) == tokens

    _, same = pair_sums(graphdef, state, {**batch, "reference": state}, exp.post_training)
    assert float(same["loss"]) == pytest.approx(2 * np.log(2), rel=1e-6)
    assert float(same["reward_margin"]) == 0 and float(same["accuracy"]) == 0
    assert float(same["kl_to_ref"]) == pytest.approx(0, abs=1e-6)


def test_a_short_dpo_run_beats_chance_on_the_validation_pairs(tiny_config_shared):
    """20 steps of 16 pairs from a fresh model (its own reference): most validation pairs, whose
    rejected side is mostly the chosen paragraph's sentences shuffled, are then ranked right."""
    from data.pipeline import PackedDataset

    exp = config_lib.resolve(_dpo_config(tiny_config_shared, "/unused", seq_len=96))
    tokenizer = Tokenizer()
    train_pairs = sft.read_jsonl(SHIPPED / "preference_train.jsonl", "preference")
    data = PackedDataset(sft.pack_preference(train_pairs, tokenizer, 96, "truncate")[0], seed=0)
    val_pairs = sft.read_jsonl(SHIPPED / "preference_validation.jsonl", "preference")
    val = sft.pack_preference(val_pairs, tokenizer, 96, "truncate")[0]
    graphdef, reference = nnx.split(Transformer(exp.model, rngs=nnx.Rngs(0)))
    tx = optax.adam(3e-3)
    params = nnx.state(nnx.merge(graphdef, reference), nnx.Param)
    state = TrainState(jnp.zeros((), jnp.int32), reference, tx.init(params), guard={})
    step = jax.jit(dpo.make_train_step(graphdef, tx, optax.constant_schedule(3e-3), exp))
    evaluate = jax.jit(dpo.make_eval_step(graphdef, exp.post_training))

    def validation(params):
        sums = jax.device_get(evaluate(params, {**val, "reference": reference}))
        return sums["accuracy"] / sums["pairs"], sums["reward_margin"] / sums["pairs"]

    assert validation(state.params) == (0.0, 0.0)  # policy = reference: no pair ranked
    for i in range(20):
        state, _ = step(state, {**data.batch(i, 16), "reference": reference})
    accuracy, margin = validation(state.params)
    assert accuracy > 0.6 and margin > 0, (accuracy, margin)


def _dpo_config(config, source, **overrides):
    return config_lib.with_overrides(
        config,
        {
            "init_from": f"workdir:{source}",
            "post_training.format": "preference",
            "post_training.train_file": str(SHIPPED / "preference_train.jsonl"),
            "post_training.eval_file": str(SHIPPED / "preference_validation.jsonl"),
            **overrides,
        },
    )


def test_a_resumed_dpo_run_matches_an_uninterrupted_one(
    tmp_path, tiny_config, tiny_run, train_until_first_save
):
    config = _dpo_config(tiny_config, tiny_run, steps=4, checkpoint_every=2, eval_every=4)
    train.train_and_evaluate(config, str(tmp_path / "full"))
    expected = {r["step"]: r for r in read_metrics(tmp_path / "full")}
    assert {"dpo/loss", "dpo/reward_margin", "dpo/accuracy", "dpo/kl_to_ref"} <= set(expected[4])
    assert {"eval_dpo/accuracy", "eval_dpo/reward_margin"} <= set(expected[4])
    assert expected[1]["dpo/kl_to_ref"] == pytest.approx(0, abs=1e-6)  # starts at the reference

    config = config_lib.with_overrides(config, {"eval_every": 0})  # no eval step to compile
    train_until_first_save(config, str(tmp_path / "resumed"))
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
    records = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        for key in ("loss", "dpo/reward_margin", "dpo/kl_to_ref", "grad_norm"):
            assert record[key] == expected[record["step"]][key]  # bit-identical on CPU


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"init_from": ""}, "format=preference needs a reference model"),
        ({"post_training.eval_file": ""}, "set --config.post_training.eval_file=FILE"),
        ({"post_training.loss": "orpo"}, "post_training.loss must be one of"),
        ({"post_training.overlong": "cut"}, "post_training.overlong must be one of"),
        ({"post_training.beta": 0.0}, "post_training.beta must be > 0"),
        ({"debug.log_activation_rms": True}, "log_activation_rms measures pretraining batches"),
    ],
)
def test_a_bad_post_training_config_is_one_line(tiny_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.resolve(_dpo_config(tiny_config, "/nowhere", **overrides))
