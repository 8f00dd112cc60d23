"""llm.model.patterns patterns and schedules, their FLOP counts, the model under them, and llm.probes."""

import dataclasses
import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_model import stacked_copy  # pytest puts tests/llm on sys.path

from data import tokenizer as tokenizer_lib
from llm import hf
from llm.model import patterns as sparse
from llm.model.config import ModelConfig
from llm.model.transformer import Transformer, init_cache
from llm.science import flops, probes

CFG = ModelConfig(
    vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
    max_seq_len=64, attention_window=5, attention_global=2, attention_stride=3, attention_chunk=4,
)  # fmt: skip

# Pattern -> (p, k, cfg) -> visible, written from the definitions in the llm.sparse docstring.
HAND = {
    "dense": lambda p, k, c: k <= p,
    "sliding": lambda p, k, c: k <= p and p - k < c.attention_window,
    "local_global": lambda p, k, c: (
        k <= p and (p - k < c.attention_window or k < c.attention_global)
    ),
    "strided": lambda p, k, c: (
        k <= p and (p - k < c.attention_stride or (p - k) % c.attention_stride == 0)
    ),
    "dilated": lambda p, k, c: (
        k <= p and p - k < c.attention_window and (p - k) % c.attention_stride == 0
    ),
    "chunked": lambda p, k, c: k <= p and p // c.attention_chunk == k // c.attention_chunk,
}


def hand_mask(name: str, cfg: ModelConfig, seq: int) -> np.ndarray:
    return np.array([[HAND[name](p, k, cfg) for k in range(seq)] for p in range(seq)], bool)


def with_pattern(pattern: str, **kw) -> ModelConfig:
    return dataclasses.replace(CFG, attention_pattern=pattern, **kw)


def pattern_sizes(name: str, **kw) -> types.SimpleNamespace:
    """CFG's pattern fields with `kw`, unchecked (sizes a ModelConfig would refuse count too),
    every layer of pattern `name`."""
    fields = {f.name: getattr(CFG, f.name) for f in dataclasses.fields(CFG)}
    return types.SimpleNamespace(**{**fields, **kw, "layer_patterns": (name,) * CFG.num_layers})


def tokens(shape, seed=0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, shape), jnp.int32)


# "nsa" is learned (content-dependent): tests/llm/test_native_sparse.py checks it.
MASK_PATTERNS = sorted(set(sparse.PATTERNS) - {"nsa"})


def test_every_pattern_has_a_hand_built_reference():
    assert set(HAND) == set(MASK_PATTERNS)


@pytest.mark.parametrize("name", MASK_PATTERNS)
def test_pattern_mask_equals_hand_built(name):
    got = sparse.PATTERNS[name].mask(CFG).dense(17, 17)
    np.testing.assert_array_equal(got, hand_mask(name, CFG, 17))


@pytest.mark.parametrize("name", MASK_PATTERNS)
@pytest.mark.parametrize(
    "window,num_global,stride,chunk", [(5, 2, 3, 4), (1, 0, 1, 1), (8, 9, 7, 40), (40, 3, 2, 6)]
)
def test_visible_pairs_equal_brute_force_count(name, window, num_global, stride, chunk):
    cfg = pattern_sizes(
        name,
        attention_window=window,
        attention_global=num_global,
        attention_stride=stride,
        attention_chunk=chunk,
    )
    for seq in (1, 7, 33):
        brute = int(hand_mask(name, cfg, seq).sum())
        assert sparse.visible_pairs(cfg, seq) == (brute, brute)


def test_train_flops_count_each_layers_pairs():
    cfg = with_pattern("sliding*3,dense", num_layers=4)
    seq = 20
    pairs = 3 * int(hand_mask("sliding", cfg, seq).sum()) + seq * (seq + 1) // 2
    per_pair = 12 * cfg.num_heads * cfg.head_dim
    expected = 6 * flops.param_counts(cfg)["matmul"] + per_pair * pairs / seq
    assert flops.train_flops_per_token(cfg, seq) == pytest.approx(expected, rel=1e-12)
    # A window covering the sequence costs exactly what dense does.
    wide = with_pattern("sliding", attention_window=seq)
    assert flops.train_flops_per_token(wide, seq) == flops.train_flops_per_token(CFG, seq)


@pytest.mark.parametrize(
    "spec,names",
    [
        ("dense", ("dense",) * 6),
        ("sliding*2,dense", ("sliding", "sliding", "dense") * 2),
        (" sliding , chunked ", ("sliding", "chunked") * 3),
        (("local_global", "strided", "dilated"), ("local_global", "strided", "dilated") * 2),
    ],
)
def test_schedule_gives_each_layer_its_mask(spec, names):
    cfg = with_pattern(spec, num_layers=6)
    assert cfg.layer_patterns == names
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    for block, name in zip(model.blocks, names, strict=True):
        np.testing.assert_array_equal(block.attn.mask.dense(12, 12), hand_mask(name, cfg, 12))


@pytest.mark.parametrize("spec", ["dense,sliding*0", "sparse", "sliding*x"])
def test_bad_schedule_raises(spec):
    with pytest.raises(ValueError, match="attention pattern|repeat count"):
        sparse.parse_schedule(spec)


def test_scanned_layers_need_a_uniform_schedule():
    with pytest.raises(ValueError, match="scan_layers"):
        with_pattern("sliding,dense", scan_layers=True)
    assert sparse.layer_mask(with_pattern("sliding*2"), None) == sparse.PATTERNS["sliding"].mask(
        CFG
    )


def test_scanned_layers_follow_a_uniform_sliding_schedule():
    cfg = with_pattern("sliding", attention_window=4)
    loop = Transformer(cfg, rngs=nnx.Rngs(0))
    scan = stacked_copy(loop, dataclasses.replace(cfg, scan_layers=True))
    x = tokens((2, 12))
    np.testing.assert_allclose(scan(x), loop(x), atol=1e-5)
    assert not np.allclose(scan(x), Transformer(CFG, rngs=nnx.Rngs(0))(x), atol=1e-4)


def test_hf_export_refuses_sparse_patterns(tmp_path):
    with pytest.raises(ValueError, match="only dense models"):
        hf.save(Transformer(with_pattern("sliding,dense"), rngs=nnx.Rngs(0)), str(tmp_path))


def loss_and_grads(cfg: ModelConfig, x: jax.Array):
    model = Transformer(cfg, rngs=nnx.Rngs(0))

    def loss(model):
        return jnp.mean(jax.nn.log_softmax(model(x))[..., 0])

    value, grads = nnx.value_and_grad(loss)(model)
    return model(x), value, jax.tree.leaves(nnx.state(grads))


@pytest.mark.parametrize(
    "overrides",
    [
        {"attention_pattern": "sliding", "attention_window": 16},
        {"attention_pattern": "sliding", "attention_window": 40},
        {"attention_pattern": "chunked", "attention_chunk": 16},
        {"attention_pattern": "local_global,sliding", "attention_window": 16},
    ],
)
def test_window_covering_the_sequence_equals_dense_exactly(overrides):
    x = tokens((2, 16))
    logits, value, grads = loss_and_grads(dataclasses.replace(CFG, **overrides), x)
    dense_logits, dense_value, dense_grads = loss_and_grads(CFG, x)
    np.testing.assert_array_equal(logits, dense_logits)
    assert value == dense_value
    for g, d in zip(grads, dense_grads, strict=True):
        np.testing.assert_array_equal(g, d)


def test_sliding_window_limits_the_receptive_field():
    """With L layers of window W, position p depends on tokens >= p - L(W-1) only."""
    cfg = with_pattern("sliding", attention_window=4)  # 2 layers: reach 6 tokens back
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    x = tokens((1, 16))
    changed = x.at[:, 3].set((x[:, 3] + 1) % cfg.vocab_size)
    a, b = model(x), model(changed)
    np.testing.assert_array_equal(a[:, 10:], b[:, 10:])
    assert not np.allclose(a[:, 3:10], b[:, 3:10], atol=1e-4)
    assert not np.allclose(a, Transformer(CFG, rngs=nnx.Rngs(0))(x), atol=1e-4)


@pytest.mark.parametrize("pattern", ["sliding", "sliding,dense", "chunked", "local_global"])
def test_cached_decode_equals_full_forward(pattern):
    cfg = with_pattern(pattern, attention_window=4, attention_chunk=5)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    x, prompt = tokens((2, 14)), 6
    full = model(x)
    cache = init_cache(cfg, 2, 14)
    logits, cache = model(x[:, :prompt], cache=cache)  # prefill
    steps = [logits]
    for t in range(prompt, 14):
        logits, cache = model(x[:, t : t + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


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
