"""llm.model.patterns: each pattern's mask and visible pairs against hand-built references, the
schedule syntax, and the model under the patterns (equal to dense where a window covers the
sequence, the receptive field, cached decoding)."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_transformer import stacked_copy  # pytest puts this directory on sys.path

from llm.model import patterns as sparse
from llm.model.config import ModelConfig
from llm.model.transformer import Transformer, init_cache

CFG = ModelConfig(
    vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
    max_seq_len=64, attention_window=5, attention_global=2, attention_stride=3, attention_chunk=4,
)  # fmt: skip

# Pattern -> (p, k, cfg) -> visible, written from the definitions in the llm.model.patterns docstring.
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


# "nsa" is learned (content-dependent): tests/llm/model/test_nsa.py checks it.
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
