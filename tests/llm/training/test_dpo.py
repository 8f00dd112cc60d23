"""llm.training.dpo: the DPO, IPO and SimPO losses equal their formulas (values and gradients) on
hand-computed log-probabilities; sequence log-probabilities and the KL to the reference equal
plain numpy; a short DPO run on the shipped preference set beats chance on validation pairs; a
resumed DPO run equals an uninterrupted one bit for bit."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data import sft
from data.tokenizer import Tokenizer
from llm import config as config_lib
from llm import train
from llm.errors import ConfigError
from llm.model.transformer import Transformer
from llm.training import checkpoint, dpo
from llm.training.metrics import read_metrics

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


def test_sequence_logprobs_and_kl_equal_plain_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 5))
    weights = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], np.float32)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = [sum(log_probs[b, t, targets[b, t]] * weights[b, t] for t in range(5)) for b in (0, 1)]
    got = dpo.sequence_logprobs(jnp.asarray(log_probs), jnp.asarray(targets), jnp.asarray(weights))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_model(tiny_config_shared):
    exp = config_lib.resolve(tiny_config_shared)
    return nnx.split(Transformer(exp.model, rngs=nnx.Rngs(0)))


def _preference_batch(seq_len=24, pairs=2):
    records = sft.read_jsonl(SHIPPED / "preference_validation.jsonl", "preference")[:pairs]
    arrays, _ = sft.pack_preference(records, Tokenizer(), seq_len, "truncate")
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def test_pair_sums_of_the_reference_itself(tiny_model, tiny_config_shared):
    """Policy = reference: zero rewards and KL, log(2) DPO loss, and the log-probabilities are the
    model's own, from its logits."""
    graphdef, state = tiny_model
    batch = _preference_batch()
    cfg = config_lib.resolve(
        config_lib.with_overrides(
            tiny_config_shared,
            {
                "post_training.format": "preference",
                "post_training.train_file": "x",
                "post_training.eval_file": "x",
                "init_from": "workdir:x",
            },
        )
    ).post_training
    _, sums = dpo.pair_sums(graphdef, state, {**batch, "reference": state}, cfg)
    assert float(sums["loss"]) == pytest.approx(2 * np.log(2), rel=1e-6)
    assert float(sums["reward_margin"]) == 0 and float(sums["accuracy"]) == 0
    assert float(sums["kl_to_ref"]) == pytest.approx(0, abs=1e-6)
    logits = np.asarray(
        nnx.merge(graphdef, state)(
            batch["chosen_inputs"], batch["chosen_positions"], batch["chosen_segment_ids"]
        ),
        np.float64,
    )
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, np.asarray(batch["chosen_targets"])[..., None], -1)
    expected = np.sum(picked[..., 0] * np.asarray(batch["chosen_weights"]))
    assert float(sums["chosen_logp"]) == pytest.approx(expected, rel=1e-5)


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


class Interrupted(Exception):
    pass


def test_a_resumed_dpo_run_matches_an_uninterrupted_one(tmp_path, tiny_config, tiny_run, monkeypatch):
    config = _dpo_config(tiny_config, tiny_run, steps=4, checkpoint_every=2, eval_every=4)
    train.train_and_evaluate(config, str(tmp_path / "full"))
    expected = {r["step"]: r for r in read_metrics(tmp_path / "full")}
    assert {"dpo/loss", "dpo/reward_margin", "dpo/accuracy", "dpo/kl_to_ref"} <= set(expected[4])
    assert {"eval_dpo/accuracy", "eval_dpo/reward_margin"} <= set(expected[4])
    assert expected[1]["dpo/kl_to_ref"] == pytest.approx(0, abs=1e-6)  # starts at the reference

    save = checkpoint.save

    def save_then_die(manager, state, **kwargs):  # dies right after its step-2 save
        save(manager, state, **kwargs)
        manager.wait_until_finished()
        raise Interrupted

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Interrupted):
        train.train_and_evaluate(config, str(tmp_path / "resumed"))
    monkeypatch.setattr(checkpoint, "save", save)
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
    ],
)
def test_a_bad_post_training_config_is_one_line(tiny_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.resolve(_dpo_config(tiny_config, "/nowhere", **overrides))
