"""Autoregressive decoding with a KV cache, and a command that continues a prompt.

    python -m llm.sample --workdir=/tmp/default --prompt="The list type"

`generate` runs the prompt through the model in one call that fills the cache (prefill), then
one cached decode step per new token inside a `lax.scan`; the whole loop is one jitted function,
compiled once per shape and sampling setting.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from data.tokenizer import SHIPPED_MODEL, Tokenizer
from llm import checkpoint
from llm import config as config_lib
from llm.model import Transformer, init_cache

FLAGS = flags.FLAGS


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits of each row (and ties with the k-th); -inf elsewhere. [B, V]."""
    kth = jax.lax.top_k(logits, min(k, logits.shape[-1]))[0][:, -1:]  # [B, 1]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Keeps the smallest set of most likely tokens whose probability is >= p; -inf elsewhere."""
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
    ),
)
def _generate(
    graphdef,
    state,
    prompt,
    rng,
    *,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    greedy,
    eos_id,
    vocab_limit,
):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompt.shape
    cache = init_cache(model.cfg, batch, prompt_len + max_new_tokens)
    logits, cache = model(prompt, cache=cache)  # prefill: [B, P, V]

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
        logits, cache = model(token[:, None], cache=cache)  # [B, 1, V]
        return (logits[:, -1], cache, done), token

    carry = (logits[:, -1], cache, jnp.zeros(batch, bool))
    _, new = jax.lax.scan(step, carry, jax.random.split(rng, max_new_tokens))  # new: [N, B]
    return jnp.concatenate([prompt, new.T], axis=1)


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
) -> jax.Array:
    """Continues int32[B, P] prompts (all P long) -> int32[B, P + max_new_tokens].

    Once a row has produced `eos_id`, it keeps emitting `eos_id`. With `vocab_limit` (the
    tokenizer's vocabulary size when the model's is padded) only ids below it are generated.
    """
    total = prompt_tokens.shape[1] + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({prompt_tokens.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} "
            f"exceeds the model's max_seq_len={model.cfg.max_seq_len}."
        )
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use greedy=True for argmax.")
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        jnp.asarray(prompt_tokens, jnp.int32),
        rng,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        greedy=greedy,
        eos_id=eos_id,
        vocab_limit=vocab_limit,
    )


def load_run(workdir: str) -> tuple[Transformer, ml_collections.ConfigDict]:
    """The model of the latest checkpoint of a training run, and the run's config."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a training run; train one with "
            f"`python -m llm.train --config=experiments/default.py --workdir={workdir}`."
        )
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    config_lib.validate_model(config.model)
    cfg = config_lib.model_config(config)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    nnx.update(model, checkpoint.restore_params(workdir, nnx.state(model)))  # + MoE biases
    return model, config


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        sys.exit("error: --workdir is required: the --workdir of a `python -m llm.train` run.")
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a restore at INFO
    try:
        model, config = load_run(FLAGS.workdir)
        tokenizer = Tokenizer(config.data.tokenizer or SHIPPED_MODEL)
        prompt = [tokenizer.bos_id] + tokenizer.encode(FLAGS.prompt)
        tokens = generate(
            model,
            jnp.array([prompt], jnp.int32),
            max_new_tokens=FLAGS.max_new_tokens,
            rng=jax.random.key(FLAGS.seed),
            temperature=FLAGS.temperature,
            top_k=FLAGS.top_k,
            top_p=FLAGS.top_p,
            greedy=FLAGS.greedy,
            eos_id=tokenizer.eos_id,
            vocab_limit=tokenizer.vocab_size,
        )
    except (FileNotFoundError, ValueError) as e:  # user errors: one message, no traceback
        sys.exit(f"error: {e}")
    new = np.asarray(tokens[0, len(prompt) :]).tolist()
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    print(FLAGS.prompt + tokenizer.decode(new))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "Training run directory: config.json, checkpoints/.")
    flags.DEFINE_string("prompt", "", "Text to continue (a bos token is prepended).")
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
    flags.DEFINE_float("temperature", 0.8, "Softmax temperature (> 0).")
    flags.DEFINE_integer("top_k", 40, "Sample among the k most likely tokens; 0 = all.")
    flags.DEFINE_float("top_p", 0.95, "Nucleus: smallest set with this much mass; 1 = all.")
    flags.DEFINE_bool("greedy", False, "Take the most likely token (ignores the above).")
    flags.DEFINE_integer("seed", 0, "Random seed of the sampling.")
    app.run(main)
