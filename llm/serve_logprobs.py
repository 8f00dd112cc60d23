"""The `logprobs` of an OpenAI-style completion (llm.serve): each token's log-probability under the
model and the most likely tokens at its position, from one teacher-forced pass over the prompt and
the completion, so they are the model's own distribution (before temperature, top-k or top-p),
over the tokens the tokenizer has (a padded vocabulary's extra ids excluded).

    scorer = Logprobs(model, tokenizer, max_len=256, vocab_limit=None)
    scorer(prompt_ids, completion_ids, top=1, echo=True)  # {"tokens", "token_logprobs", ...}

The answer's `tokens` are each token's text as it reads mid-text (llm.engine_requests.detokenize)
and `text_offset` where each starts in the answer's text. With `echo` the prompt's tokens come
first, the first of them with no log-probability (None), as OpenAI's API answers; lm-eval's
`local-completions` backend scores a continuation this way. Lengths are padded to a power of two
from 16 tokens, one compilation each (`warmup` compiles them all).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm.engine_requests import detokenize
from llm.model.slot_decode import Graph
from llm.model.transformer import Transformer

MAX_TOP = 5  # the most alternatives a request may ask for, as OpenAI's completions API allows
MIN_LENGTH = 16  # the shortest padded length


@functools.partial(jax.jit, static_argnames=("graph", "vocab_limit"))
def _score(graph: Graph, state, tokens, vocab_limit: int | None):
    """tokens: int32[1, L] -> (log p(tokens[t + 1] | tokens[..t]) f32[L - 1], the MAX_TOP
    likeliest ids after each position int32[L, MAX_TOP] and their log-probabilities)."""
    logits = nnx.merge(graph.graphdef, state)(tokens)[0]  # [L, V] float32
    if vocab_limit is not None:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs[:-1], tokens[0, 1:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = jax.lax.top_k(logprobs, MAX_TOP)
    return chosen, top_ids, top_logprobs


class Logprobs:
    """Scores (prompt, completion) pairs of up to `max_len` tokens with `model`; any thread may
    call it, beside the engine's."""

    def __init__(
        self, model: Transformer, tokenizer: Any, max_len: int, vocab_limit: int | None = None
    ):
        graphdef, self._state = nnx.split(model)
        self._graph, self.tokenizer = Graph(graphdef), tokenizer
        self.max_len, self.vocab_limit = max_len, vocab_limit
        self.lengths = sorted({min(MIN_LENGTH << i, max_len) for i in range(max_len.bit_length())})

    def warmup(self) -> None:
        """Compiles the scoring pass at every padded length."""
        for length in self.lengths:
            _score(self._graph, self._state, np.zeros((1, length), np.int32), self.vocab_limit)

    def __call__(
        self, prompt: Sequence[int], completion: Sequence[int], top: int, echo: bool
    ) -> dict[str, list]:
        """OpenAI's logprobs object of `completion` after `prompt` (and of the prompt too with
        `echo`), listing the `top` (0..MAX_TOP) likeliest tokens at each position."""
        ids = [int(t) for t in (*prompt, *completion)]
        tokens = np.zeros((1, next(n for n in self.lengths if n >= len(ids))), np.int32)
        tokens[0, : len(ids)] = ids
        scored = _score(self._graph, self._state, tokens, self.vocab_limit)
        chosen, top_ids, top_logprobs = map(np.asarray, scored)
        first = 0 if echo else len(prompt)
        texts = token_texts(self.tokenizer, ids, start=first)
        answer = {"tokens": texts, "token_logprobs": [], "top_logprobs": []}
        answer["text_offset"] = np.cumsum([0] + [len(t) for t in texts])[:-1].tolist()
        for i in range(first, len(ids)):
            if i == 0:  # nothing before the first token predicts it
                answer["token_logprobs"].append(None)
                answer["top_logprobs"].append(None)
                continue
            answer["token_logprobs"].append(float(chosen[i - 1]))
            alternatives: dict[str, float] = {}  # two ids of one text: the likelier one's
            for t, p in zip(top_ids[i - 1, :top], top_logprobs[i - 1, :top]):
                alternatives.setdefault(detokenize(self.tokenizer, ids[:i], [int(t)]), float(p))
            answer["top_logprobs"].append(alternatives)
        return answer


def token_texts(tokenizer: Any, ids: Sequence[int], start: int = 0) -> list[str]:
    """The text of each token from `start` on, as it reads after the tokens before it (word
    boundaries as the tokenizer writes them mid-text; sentencepiece drops a token's leading space
    at the start)."""
    return [detokenize(tokenizer, list(ids[:i]), [ids[i]]) for i in range(start, len(ids))]
