"""Autoregressive decoding with a KV cache: greedy, temperature, top-k, top-p.

`generate` runs the prompt through the model in one call that fills the cache (prefill), then
one cached decode step per new token inside a `lax.scan`; the whole loop is one jitted function,
compiled once per shape and sampling setting.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from llm.model.transformer import Transformer, init_cache, unstack_layers


def top_k_filter(logits: jax.Array, k: int | jax.Array) -> jax.Array:
    """Keeps the k largest logits of each row (and ties with the k-th); -inf elsewhere. [B, V].

    k: one int, or int32[B] per row (0 keeps the whole row)."""
    if isinstance(k, int):
        kth = jax.lax.top_k(logits, min(k, logits.shape[-1]))[0][:, -1:]  # [B, 1]
    else:
        descending = -jnp.sort(-logits, axis=-1)  # [B, V]
        index = jnp.clip(k, 1, logits.shape[-1])[:, None] - 1  # [B, 1]
        kth = jnp.where(k[:, None] > 0, jnp.take_along_axis(descending, index, axis=-1), -jnp.inf)
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits: jax.Array, p: float | jax.Array) -> jax.Array:
    """Keeps the smallest set of most likely tokens whose probability is >= p (one float, or
    float32[B, 1] per row); -inf elsewhere."""
    order = jnp.argsort(-logits, axis=-1)  # [B, V], most likely first
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # of the tokens more likely than each
    keep = jnp.take_along_axis(mass_before < p, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits, -jnp.inf)


def sample_token(
    logits: jax.Array,
    rng: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> jax.Array:
    """logits: float32[B, V] -> int32[B]: argmax, or a sample after temperature, top-k, top-p."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        logits = top_k_filter(logits, top_k)
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "greedy",
        "eos_id",
        "vocab_limit",
        "kv_int8",
    ),
)
def _generate(
    graphdef,
    state,
    prompt,
    pad,
    rng,
    *,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    greedy,
    eos_id,
    vocab_limit,
    kv_int8,
):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompt.shape
    cache = init_cache(model.cfg, batch, prompt_len + max_new_tokens, int8=kv_int8)
    if pad is not None:  # left-padded rows: the padding is never attended, positions start at 0
        cache["start"] = pad
    x, cache, _ = model.hidden_states(  # prefill: x [B, P, D]; logits at the last position only
        prompt, None if pad is None else jnp.arange(prompt_len) - pad[:, None], cache=cache
    )
    logits = model.logits(x[:, -1:])  # [B, 1, V]
    cache = unstack_layers(model.cfg, cache)  # each step reads a layer without a copy

    def step(carry, key):
        logits, cache, done = carry  # logits: [B, V] for the next token; done: [B] eos seen
        if vocab_limit is not None:  # padded vocabulary: ids the tokenizer lacks are never drawn
            logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
        token = sample_token(
            logits, key, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
        )  # [B]
        if eos_id is not None:
            token = jnp.where(done, eos_id, token)
            done = done | (token == eos_id)
        positions = None if pad is None else (cache["index"] - pad)[:, None]  # [B, 1]
        logits, cache = model(token[:, None], positions, cache=cache)  # [B, 1, V]
        return (logits[:, -1], cache, done), token

    carry = (logits[:, -1], cache, jnp.zeros(batch, bool))
    _, new = jax.lax.scan(step, carry, jax.random.split(rng, max_new_tokens))  # new: [N, B]
    return jnp.concatenate([prompt, new.T], axis=1)


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int, top_p: float, greedy: bool
) -> None:
    """ValueError naming the first sampling setting that would give a wrong or empty result."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if greedy:
        return
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"temperature must be a finite number > 0, got {temperature}; use greedy for argmax."
        )
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: all tokens), got {top_k}.")
    if not 0 < top_p <= 1:  # also refuses nan
        raise ValueError(f"top_p must be in (0, 1] (1: all tokens), got {top_p}.")


def generate(
    model: Transformer,
    prompt_tokens: jax.Array,
    *,
    max_new_tokens: int,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    eos_id: int | None = None,
    vocab_limit: int | None = None,
    kv_int8: bool = False,
    prompt_lengths: Sequence[int] | None = None,
) -> jax.Array:
    """Continues int32[B, P] prompts (all P long) -> int32[B, P + max_new_tokens].

    prompt_lengths: rows of different lengths, left-padded to P: row b's prompt is its last
    prompt_lengths[b] tokens; its padding is never attended and its positions start at 0, so each
    row continues as it would alone.

    Once a row has produced `eos_id`, it keeps emitting `eos_id`. With `vocab_limit` (the
    tokenizer's vocabulary size when the model's is padded) only ids below it are generated.
    `kv_int8`: the KV cache holds int8 keys and values with a scale per token and head.
    """
    total = prompt_tokens.shape[1] + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({prompt_tokens.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} "
            f"exceeds the model's max_seq_len={model.cfg.max_seq_len}."
        )
    check_sampling(max_new_tokens, temperature, top_k, top_p, greedy)
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        jnp.asarray(prompt_tokens, jnp.int32),
        None if prompt_lengths is None else prompt_tokens.shape[1] - jnp.asarray(prompt_lengths),
        rng,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        greedy=greedy,
        eos_id=eos_id,
        vocab_limit=vocab_limit,
        kv_int8=kv_int8,
    )
