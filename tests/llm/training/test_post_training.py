"""llm.training.post_training: an SFT experiment reads the shipped JSONL (counts printed), its loss
ignores the prompt tokens as targets (values and gradients) and equals a plain numpy
cross-entropy over the response tokens."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data import sft
from llm import config as config_lib
from llm.model.transformer import Transformer
from llm.training.step import token_losses

SHIPPED = pathlib.Path(sft.__file__).parent / "post_training"


@pytest.fixture(scope="module")
def sft_experiment(tiny_config_shared):
    return config_lib.resolve(
        config_lib.with_overrides(
            tiny_config_shared,
            {
                "seq_len": 64,
                "post_training.format": "sft",
                "post_training.train_file": str(SHIPPED / "sft_train.jsonl"),
                "post_training.eval_file": str(SHIPPED / "sft_validation.jsonl"),
                "post_training.overlong": "drop",
            },
        )
    )


def test_an_sft_experiment_reads_its_jsonl_and_counts_what_it_drops(sft_experiment, capsys):
    _, train, evaluation = sft_experiment.load_data()
    out = capsys.readouterr().out
    records = len(sft.read_jsonl(SHIPPED / "sft_train.jsonl", "sft"))
    assert f"sft_train.jsonl: {records} sft records, 0 truncated and " in out
    dropped = int(out.split("0 truncated and ")[1].split()[0])
    assert 0 < dropped < records  # some paragraphs are longer than 64 tokens
    batch = train.batch(0, 8)
    assert 0 < batch["weights"].sum() < (batch["segment_ids"] > 0).sum()  # prompts weigh 0
    assert evaluation.num_rows > 0


def test_the_sft_loss_ignores_prompt_tokens(sft_experiment):
    _, train, _ = sft_experiment.load_data()
    batch = {k: jnp.asarray(v) for k, v in train.batch(0, 8).items()}
    graphdef, state = nnx.split(Transformer(sft_experiment.model, rngs=nnx.Rngs(0)))

    @jax.jit
    def loss_and_grads(state, batch):
        def ce(state):
            _, ce_sum, _ = token_losses(nnx.merge(graphdef, state), batch, 0.0, sft_experiment.loss)
            return ce_sum

        return jax.value_and_grad(ce)(state)

    loss, grads = loss_and_grads(state, batch)
    prompt = np.asarray(batch["weights"]) == 0
    noise = np.random.default_rng(0).integers(0, 4000, prompt.shape)
    changed = {**batch, "targets": jnp.where(prompt, noise, batch["targets"])}
    assert (changed["targets"] != batch["targets"]).sum() > 100
    changed_loss, changed_grads = loss_and_grads(state, changed)
    assert float(changed_loss) == float(loss)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(changed_grads), strict=True):
        np.testing.assert_array_equal(a, b)
    response = {**batch, "targets": jnp.where(prompt, batch["targets"], noise)}
    assert float(loss_and_grads(state, response)[0]) != float(loss)

    model = jax.jit(lambda state, *x: nnx.merge(graphdef, state)(*x))
    logits = np.asarray(
        model(state, batch["inputs"], batch["positions"], batch["segment_ids"]), np.float64
    )
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    expected = -np.sum(picked * np.asarray(batch["weights"]))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
