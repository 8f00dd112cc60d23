"""The device half of the continuous-batching engine (llm.engine): a KV cache of fixed slots,
the chunked prefill of prompts, a few decode steps of every slot, sampling with per-slot settings.

A slot is one row of the cache, holding one request's keys and values at its own positions. The
first chunks of several prompts are prefilled together, packed into one row (each at its own
positions, its own segment: a query sees its own prompt only), their keys and values then
scattered to their slots, so the weights are read once for all of them; a later chunk of a long
prompt runs the model on its slot as on a batch of one. A decode call runs the model on the first
rows with a position per row (the per-row cache index of llm.model.transformer), so every attention
pattern decodes exactly as in llm.model.decode. Positions at and after a slot's length may hold
stale values (an earlier request's, or a padded chunk's); every mask is causal and a slot writes
each position before any query can see it, so a slot is reused without clearing. Each call
attends over the first `length` cache positions only (a few static lengths, llm.engine picks the
shortest that holds its slots), so short requests do not pay for the longest context; a decode
call computes the first `rows` slots only (llm.engine keeps requests in the lowest slots) and
runs several steps in one loop on the device, so the host's cost per call is paid once for them;
a prompt's last piece is written as a chunk of the shortest compiled size that holds it, so on
hardware whose step cost grows with the rows (a CPU) idle slots and chunk padding cost little.
The compiled shapes: packed prefill [1, c] for a few chunk sizes c; prefill [1, c] and decode
[r] at each cache length, for those c and a few row counts r.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llm.model.config import ModelConfig
from llm.model.decode import top_k_filter, top_p_filter
from llm.model.transformer import init_cache, unstack_layers


class Sampling(NamedTuple):
    """Per-row sampling settings, each [R] (R rows: the slots, or the one prefilling slot)."""

    temperature: jax.Array  # float32; 1 on greedy rows
    top_k: jax.Array  # int32; 0 = all tokens
    top_p: jax.Array  # float32; 1 = all tokens
    greedy: jax.Array  # bool
    seed: jax.Array  # uint32: the request's seed
    count: jax.Array  # int32: tokens the request has generated so far (its key's fold-in)


class Graph:
    """A GraphDef as the calls below take it (a static argument): its hash is computed once, not
    on every call (hashing a GraphDef walks the whole graph: ~0.1 ms, a tenth of a small call)."""

    def __init__(self, graphdef: nnx.GraphDef):
        self.graphdef, self._hash = graphdef, hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, Graph) and self.graphdef == other.graphdef)


def init_slots(cfg: ModelConfig, slots: int, length: int) -> dict[str, jax.Array]:
    """An empty slot cache: k, v: [layers, slots, K, length, Dh] in the compute dtype."""
    cache = init_cache(cfg, slots, length)
    return {"k": cache["k"], "v": jnp.copy(cache["v"])}  # two buffers: both are donated


def sample_rows(logits: jax.Array, s: Sampling, vocab_limit: int | None) -> jax.Array:
    """logits: float32[R, V] -> int32[R]: per row argmax, or a draw after its temperature, top-k
    and top-p with the key fold_in(key(seed), count), so a request's draws do not depend on the
    other rows."""
    if vocab_limit is not None:  # padded vocabulary: ids the tokenizer lacks are never drawn
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    argmax = lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32)

    def draw(x):
        x = top_k_filter(x / s.temperature[:, None], s.top_k)
        x = jnp.where(s.top_p[:, None] < 1, top_p_filter(x, s.top_p[:, None]), x)
        keys = jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.key(seed), n))(
            s.seed, s.count
        )
        drawn = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
        return jnp.where(s.greedy, argmax(x), drawn)

    return jax.lax.cond(jnp.all(s.greedy), argmax, draw, logits)


@functools.partial(
    jax.jit, static_argnames=("graph", "vocab_limit", "length"), donate_argnames=("cache",)
)
def prefill(
    graph: Graph, state, cache, tokens, slot, start, last, sampling: Sampling, vocab_limit, length
):
    """Writes one chunk of a slot's prompt into the cache; samples the token after position
    start + last (the prompt's last token when this is its last chunk).

    tokens: int32[1, C] at positions start..start+C-1 (padding after the prompt's end is
    harmless); slot, start, last: int32[]; length: the cache positions attended (static, at least
    start + C). Returns (int32[], the cache).
    """
    model = nnx.merge(graph.graphdef, state)
    rows = {
        n: jax.lax.dynamic_slice_in_dim(cache[n], slot, 1, axis=1)[:, :, :, :length] for n in cache
    }
    x, new, _ = model.hidden_states(tokens, cache={**rows, "index": start})  # x: [1, C, D]
    cache = {n: jax.lax.dynamic_update_slice(cache[n], new[n], (0, slot, 0, 0, 0)) for n in cache}
    logits = model.logits(jax.lax.dynamic_slice_in_dim(x, last, 1, axis=1))  # only there: [1, 1, V]
    token = sample_rows(logits[:, 0], sampling, vocab_limit)
    return token[0], cache


@functools.partial(jax.jit, static_argnames=("graph", "vocab_limit"), donate_argnames=("cache",))
def prefill_packed(
    graph: Graph, state, cache, tokens, positions, segments, token_slots, lasts,
    sampling: Sampling, vocab_limit,
):  # fmt: skip
    """Writes the first chunks of several prompts, packed into one row, into their slots (one
    pass over the weights for all of them); samples the token after each one's last position.

    tokens, positions, segments: int32[1, T]: prompt p at consecutive columns, its positions from
    0, segment p (a column of padding: a segment of its own); token_slots: int32[T], the slot of
    each column's prompt (padding: the slot count, written nowhere); lasts: int32[P], the column
    of each prompt's last token (P: the sampling rows; rows past the prompts are ignored).
    Returns (int32[P], the cache).
    """
    model = nnx.merge(graph.graphdef, state)
    layers, _, heads, _, head_dim = cache["k"].shape
    width = tokens.shape[1]
    row = {n: jnp.zeros((layers, 1, heads, width, head_dim), cache[n].dtype) for n in cache}
    x, new, _ = model.hidden_states(tokens, positions, segments, cache={**row, "index": 0})
    cache = {  # each column's keys and values to its slot, at its position: [T, layers, K, Dh]
        n: cache[n].at[:, token_slots, :, positions[0]].set(new[n][:, 0].transpose(2, 0, 1, 3),
                                                            mode="drop")
        for n in cache
    }  # fmt: skip
    logits = model.logits(x[:, lasts])  # [1, P, V]
    return sample_rows(logits[0], sampling, vocab_limit), cache


@functools.partial(
    jax.jit,
    static_argnames=("graph", "vocab_limit", "length", "rows", "max_steps"),
    donate_argnames=("cache",),
)
def decode(
    graph: Graph, state, cache, tokens, index, steps, sampling: Sampling, vocab_limit, length, rows,
    max_steps,
):  # fmt: skip
    """`steps` (int32[], 1..max_steps) decode steps of the first `rows` slots in one call, each
    step feeding every row its last token: tokens int32[rows] at positions index int32[rows] ->
    (the tokens of each step int32[max_steps, rows], the steps after `steps` zero; the cache).
    Every position a row writes must lie below `length`, the cache positions attended (static,
    like rows and max_steps); a step's draw for a row uses the key fold_in(seed, count + step).
    Rows of idle slots compute and are ignored; one slot per row, no sequence axis: each row
    writes and attends at its own position (the per-row cache index of llm.model.transformer).
    The loop carries the attended part of the cache as a list of layers (unstack_layers: a step
    reads a layer in place); the positions the steps wrote are then scattered into the cache, not
    the whole part written back."""
    model = nnx.merge(graph.graphdef, state)
    kv = unstack_layers(model.cfg, {n: cache[n][:, :rows, :, :length] for n in ("k", "v")})

    def step(i, carry):
        out, token, kv = carry
        logits, new = model(token[:, None], cache={**kv, "index": index + i})
        token = sample_rows(logits[:, -1], sampling._replace(count=sampling.count + i), vocab_limit)
        return out.at[i].set(token), token, {"k": new["k"], "v": new["v"]}

    out = jnp.zeros((max_steps, rows), jnp.int32)
    out, _, kv = jax.lax.fori_loop(0, steps, step, (out, tokens, kv))
    # Back into the cache: only the positions the steps wrote (row r: index[r] + 0..steps-1).
    step_index = jnp.arange(max_steps)
    written = index[:, None] + step_index  # [rows, max_steps]
    row = jnp.arange(rows)[:, None]
    read = jnp.minimum(written, length - 1)
    positions = jnp.where(step_index < steps, written, cache["k"].shape[3])  # unrun steps: dropped

    def new(x):  # -> [rows, max_steps, layers, K, Dh]
        if isinstance(x, list):
            return jnp.stack([layer[row, :, read] for layer in x], axis=2)
        return x[:, row, :, read]

    return out, {n: cache[n].at[:, row, :, positions].set(new(kv[n]), mode="drop") for n in kv}


@functools.partial(jax.jit, donate_argnames=("cache",))
def move(cache, src, dst):
    """The cache with slot `src`'s keys and values copied into slot `dst` (int32[] each)."""
    row = lambda x: jax.lax.dynamic_slice_in_dim(x, src, 1, axis=1)
    return {n: jax.lax.dynamic_update_slice_in_dim(x, row(x), dst, 1) for n, x in cache.items()}
