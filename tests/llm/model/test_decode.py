"""llm.sample: cached decoding agrees with the full forward pass; the sampling filters."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm.model.config import ModelConfig
from llm.model.decode import check_sampling, generate, top_k_filter, top_p_filter
from llm.model.transformer import Transformer, init_cache, unstack_layers

PROMPT, NEW = 5, 8


@functools.cache
def tiny_model(scan: bool = False) -> Transformer:
    """Built once per layout and shared by the tests (which only read it)."""
    cfg = ModelConfig(
        vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
        max_seq_len=32, scan_layers=scan,
    )  # fmt: skip
    return Transformer(cfg, rngs=nnx.Rngs(0))


def prompt() -> jax.Array:
    return jax.random.randint(jax.random.key(1), (2, PROMPT), 0, 64, jnp.int32)


@pytest.mark.parametrize("scan", [False, True])
def test_greedy_matches_uncached_argmax(scan):
    model = tiny_model(scan)
    out = generate(model, prompt(), max_new_tokens=NEW, rng=jax.random.key(0), greedy=True)
    assert out.shape == (2, PROMPT + NEW) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :PROMPT], prompt())
    # model(out)[:, t - 1] is model(out[:, :t])[:, -1] for a causal model: one uncached pass.
    expected = jnp.argmax(model(out)[:, PROMPT - 1 : -1], axis=-1)  # [B, NEW]
    np.testing.assert_array_equal(out[:, PROMPT:], expected)


def filled_cache(cfg: ModelConfig, batch: int, length: int, int8: bool) -> dict:
    """k, v of `init_cache` filled with random values (stale ones: a row must see only its own
    positions below its index)."""
    cache = init_cache(cfg, batch, length, int8)
    keys = iter(jax.random.split(jax.random.key(3), 4))

    def filled(a):
        if a.dtype == jnp.int8:
            return jax.random.randint(next(keys), a.shape, -127, 128).astype(jnp.int8)
        return jax.random.uniform(next(keys), a.shape, a.dtype, 0.01, 1.0)

    return jax.tree.map(filled, {"k": cache["k"], "v": cache["v"]})


@pytest.mark.parametrize("scan,int8", [(False, False), (True, False), (False, True)])
def test_a_cache_position_per_row_equals_each_row_alone(scan, int8):
    """A cache index int32[B] (llm.engine's decode calls): each row writes and attends at its own
    position, as that row alone with a scalar index does; logits and written caches agree."""
    model, index = tiny_model(scan), jnp.array([3, 9, 0], jnp.int32)
    tokens = jax.random.randint(jax.random.key(2), (3, 2), 0, 64, jnp.int32)
    kv = filled_cache(model.cfg, 3, 16, int8)
    logits, new = model(tokens, cache={**kv, "index": index})
    np.testing.assert_array_equal(new["index"], index + 2)
    for b in range(3):
        row = jax.tree.map(lambda a, b=b: a[:, b : b + 1], kv)
        alone, alone_new = model(tokens[b : b + 1], cache={**row, "index": index[b]})
        np.testing.assert_allclose(logits[b], alone[0], rtol=1e-5, atol=1e-5)
        for n in ("k", "v"):
            got, want = (jax.tree.leaves(c[n]) for c in (new, alone_new))
            for x, y in zip(got, want):
                np.testing.assert_allclose(x[:, b], y[:, 0], rtol=1e-6)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("index", [[4], [3, 9, 0]], ids=["scalar", "per_row"])
def test_a_cache_unstacked_into_layers_equals_the_stacked_one(int8, index):
    """unstack_layers (how the decode loops carry the cache): the logits and the keys and values
    written equal the stacked cache's."""
    model = tiny_model()
    index = jnp.array(index[0] if len(index) == 1 else index, jnp.int32)
    tokens = jax.random.randint(jax.random.key(2), (3, 2), 0, 64, jnp.int32)
    kv = filled_cache(model.cfg, 3, 16, int8)
    layered = unstack_layers(model.cfg, kv)
    assert isinstance(layered["k"], list) and len(layered["v"]) == model.cfg.num_layers
    stack = lambda c: {n: jax.tree.map(lambda *xs: jnp.stack(xs), *c[n]) for n in ("k", "v")}
    jax.tree.map(np.testing.assert_array_equal, stack(layered), kv)
    logits, new = model(tokens, cache={**kv, "index": index})
    got_logits, got = model(tokens, cache={**layered, "index": index})
    np.testing.assert_array_equal(got_logits, logits)
    jax.tree.map(np.testing.assert_array_equal, stack(got), {n: new[n] for n in ("k", "v")})
    scanned = tiny_model(scan=True).cfg
    assert unstack_layers(scanned, kv) is kv  # scanned layers index the stack


@pytest.mark.parametrize("scan", [False, True])
def test_left_padded_rows_continue_as_alone(scan):
    """prompt_lengths: each left-padded row's tokens equal its own unpadded generation."""
    model, lengths = tiny_model(scan), [5, 2, 4]
    rows = jax.random.randint(jax.random.key(2), (3, max(lengths)), 0, 64, jnp.int32)
    rows = rows.at[1, :3].set(0).at[2, :1].set(0)  # the padding: any ids, never attended
    kw = {"max_new_tokens": NEW, "rng": jax.random.key(0), "greedy": True}
    padded = generate(model, rows, prompt_lengths=lengths, **kw)[:, max(lengths) :]
    for row, n, out in zip(rows, lengths, padded):
        alone = generate(model, row[None, len(row) - n :], **kw)[0, n:]
        np.testing.assert_array_equal(out, alone)
    other_padding = generate(model, rows.at[1, :3].set(7), prompt_lengths=lengths, **kw)
    np.testing.assert_array_equal(other_padding[:, max(lengths) :], padded)


def test_top_k_1_is_greedy():
    model, rng = tiny_model(), jax.random.key(3)
    greedy = generate(model, prompt(), max_new_tokens=NEW, rng=rng, greedy=True)
    top1 = generate(model, prompt(), max_new_tokens=NEW, rng=rng, temperature=2.0, top_k=1)
    np.testing.assert_array_equal(top1, greedy)


def test_sampling_is_deterministic_per_rng():
    model = tiny_model()
    kw = {"max_new_tokens": NEW, "temperature": 0.7, "top_k": 20, "top_p": 0.9}
    a = generate(model, prompt(), rng=jax.random.key(0), **kw)
    b = generate(model, prompt(), rng=jax.random.key(0), **kw)
    c = generate(model, prompt(), rng=jax.random.key(1), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_padded_vocabulary_ids_are_never_generated():
    model, limit = tiny_model(), 40  # as if the tokenizer had 40 pieces and the model 64 ids
    for kw in ({"greedy": True}, {"temperature": 5.0}):
        out = generate(
            model, prompt(), max_new_tokens=NEW, rng=jax.random.key(0), vocab_limit=limit, **kw
        )
        assert int(out[:, PROMPT:].max()) < limit
    hot = generate(model, prompt(), max_new_tokens=NEW, rng=jax.random.key(0), temperature=5.0)
    assert int(hot[:, PROMPT:].max()) >= limit  # without the limit these ids do occur


def test_after_eos_only_eos():
    model = tiny_model()
    first = generate(model, prompt(), max_new_tokens=1, rng=jax.random.key(0), greedy=True)
    eos = int(first[0, PROMPT])  # row 0 emits it first
    out = generate(
        model, prompt(), max_new_tokens=NEW, rng=jax.random.key(0), greedy=True, eos_id=eos
    )
    np.testing.assert_array_equal(out[0, PROMPT:], eos)


def test_top_p_keeps_smallest_set_with_mass_p():
    probs = np.array([[0.05, 0.5, 0.15, 0.1, 0.2], [0.2, 0.1, 0.05, 0.15, 0.5]])
    logits = jnp.log(jnp.asarray(probs))
    for p, size in [(0.3, 1), (0.6, 2), (0.8, 3), (0.9, 4), (0.99, 5)]:
        kept = np.isfinite(top_p_filter(logits, p))
        np.testing.assert_array_equal(kept, probs >= np.sort(probs)[:, ::-1][:, size - 1 : size])
        np.testing.assert_array_equal(np.asarray(top_p_filter(logits, p))[kept], logits[kept])


def test_top_p_random_against_numpy():
    logits = jax.random.normal(jax.random.key(0), (4, 64)) * 3
    probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    for p in [0.1, 0.5, 0.9]:
        kept = np.isfinite(top_p_filter(logits, p))
        for row, kept_row in zip(probs, kept):
            order = np.argsort(-row)
            size = np.searchsorted(np.cumsum(row[order]), p) + 1  # smallest prefix with mass >= p
            assert set(np.flatnonzero(kept_row)) == set(order[:size])


def test_top_k_filter():
    logits = jnp.array([[1.0, 4.0, 3.0, 2.0], [0.0, -1.0, 5.0, 2.0]])
    kept = np.isfinite(top_k_filter(logits, 2))
    np.testing.assert_array_equal(kept, [[False, True, True, False], [False, False, True, True]])
    assert np.isfinite(top_k_filter(logits, 10)).all()


def test_too_long_is_an_error():
    with pytest.raises(ValueError, match="max_seq_len=32"):
        generate(tiny_model(), prompt(), max_new_tokens=40, rng=jax.random.key(0))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"max_new_tokens": -5}, "max_new_tokens must be >= 1, got -5"),
        ({"temperature": float("nan")}, "temperature must be a finite number > 0, got nan"),
        ({"temperature": -1.0}, "temperature must be a finite number > 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be >= 0"),
    ],
)
def test_sampling_settings_that_would_give_nothing_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny_model(), prompt(), rng=jax.random.key(0), **{"max_new_tokens": 4, **settings})


def test_greedy_ignores_the_sampling_settings():
    check_sampling(4, temperature=float("nan"), top_k=-1, top_p=0.0, greedy=True)
