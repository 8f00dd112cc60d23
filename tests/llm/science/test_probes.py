"""llm.science.probes: passkey trials hold the key and mark the answer; the probes run on a model
and bucket the per-token losses by position."""

import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data import tokenizer as tokenizer_lib
from llm.model.config import ModelConfig
from llm.model.transformer import Transformer
from llm.science import probes

CFG = ModelConfig(
    vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64
)


def tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, shape), jnp.int32)


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_lib.Tokenizer()


def test_passkey_trials_hold_the_key_and_mark_the_answer(tokenizer):
    filler = np.arange(100, 400, dtype=np.int32)
    rows, answer, distances = probes.passkey_trials(
        tokenizer.encode, filler, 96, 0.5, trials=3, num_candidates=4, bos_id=tokenizer.bos_id
    )
    assert rows.shape == answer.shape == (12, 97) and distances.shape == (3,)
    for trial, c in itertools.product(range(3), range(4)):
        row, mask = rows[trial * 4 + c], answer[trial * 4 + c]
        true_key = tokenizer.decode(rows[trial * 4][answer[trial * 4]].tolist()).strip(" .")
        text = tokenizer.decode(row.tolist())
        assert f"The pass key is {true_key}." in text  # the needle holds the true key
        key = tokenizer.decode(row[mask].tolist()).strip(" .")
        assert len(key) == 5 and key.isdigit() and (c == 0) == (key == true_key)
        start = int(np.argmax(mask))
        assert tokenizer.decode(row[:start].tolist()).endswith("The pass key is")
    assert 30 < distances.mean() < 96


def test_probes_run_on_a_tiny_model(tokenizer):
    cfg = dataclasses.replace(CFG, vocab_size=tokenizer.vocab_size, max_seq_len=128)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    filler = np.random.default_rng(0).integers(5, 4000, 1000).astype(np.int32)
    rows = probes.passkey_retrieval(
        model, tokenizer.encode, filler, context_lens=(48, 64), depths=(0.0, 1.0), trials=2,
        num_candidates=3, bos_id=tokenizer.bos_id,
    )  # fmt: skip
    assert [(r["context_len"], r["depth"]) for r in rows] == [
        (48, 0.0),
        (48, 1.0),
        (64, 0.0),
        (64, 1.0),
    ]
    assert all(r["accuracy"] in (0.0, 0.5, 1.0) for r in rows)
    assert rows[0]["needle_distance"] > rows[1]["needle_distance"]

    x = tokens((2, 33), seed=1)
    batch = {
        "inputs": x[:, :-1],
        "targets": x[:, 1:],
        "positions": jnp.array([list(range(20)) + list(range(12))] * 2),
        "segment_ids": jnp.array([[1] * 20 + [2] * 12] * 2),
        "weights": np.ones((2, 32), np.float32),
    }
    starts, means = probes.position_losses(model, [batch, batch], num_buckets=4, seq_len=32)
    np.testing.assert_array_equal(starts, [0, 8, 16, 24])
    losses = np.asarray(
        probes.token_losses(model, batch["inputs"], batch["targets"], batch["positions"],
                            batch["segment_ids"])
    )  # fmt: skip
    pos = np.asarray(batch["positions"])
    for i, s in enumerate(starts):
        in_bucket = (pos >= s) & (pos < s + 8)
        if in_bucket.any():
            assert means[i] == pytest.approx(losses[in_bucket].mean(), rel=1e-5)
        else:
            assert np.isnan(means[i])  # positions 24.. never occur
