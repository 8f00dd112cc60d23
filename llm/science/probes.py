"""Long-context probes: passkey retrieval by candidate ranking, and loss per position bucket.

Passkey retrieval (after Mohtashami & Jaggi 2023): a random number is stated once inside corpus
filler text at a given depth, and the prompt ends by asking for it. Small models trained for
minutes almost never decode a multi-digit number exactly, so greedy accuracy is ~0 for every
model and tells nothing apart. Instead the true key is ranked against `num_candidates - 1`
random keys of the same format by the log-likelihood of " <key>." after the prompt: accuracy
is the fraction of trials where the true key scores highest. Keys are drawn from one
distribution, so a model whose prediction cannot depend on the needle (e.g. the needle lies
outside its receptive field) scores 1/num_candidates in expectation: chance is an honest floor.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm.model.transformer import Transformer

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}."


@functools.partial(jax.jit, static_argnames="graphdef")
def _token_losses(graphdef, state, inputs, targets, positions, segment_ids):
    """Next-token cross-entropy of every position: f32[B, L]."""
    logits = nnx.merge(graphdef, state)(inputs, positions, segment_ids)  # [B, L, V]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def token_losses(model: Transformer, inputs, targets, positions=None, segment_ids=None):
    """f32[B, L] cross-entropy of predicting targets[b, i] after inputs[b, : i + 1]."""
    graphdef, state = nnx.split(model)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    return _token_losses(graphdef, state, inputs, targets, positions, segment_ids)


def position_losses(
    model: Transformer, batches: Iterable[dict[str, np.ndarray]], num_buckets: int, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean eval loss per bucket of position in the document (packed batches' "positions").

    Returns (bucket start positions int[num_buckets], mean loss f64[num_buckets], NaN where a
    bucket has no target token). Late buckets show whether a pattern uses long context.
    """
    edges = np.linspace(0, seq_len, num_buckets + 1).astype(int)
    total, count = np.zeros(num_buckets), np.zeros(num_buckets)
    for batch in batches:
        losses = np.asarray(
            token_losses(
                model, batch["inputs"], batch["targets"], batch["positions"], batch["segment_ids"]
            )
        )
        bucket = np.searchsorted(edges, batch["positions"], side="right") - 1  # [B, L]
        np.add.at(total, bucket, losses * batch["weights"])
        np.add.at(count, bucket, batch["weights"])
    with np.errstate(invalid="ignore"):
        return edges[:-1], total / count


def passkey_trials(
    encode,
    filler: np.ndarray,
    context_len: int,
    depth: float,
    trials: int,
    *,
    num_candidates: int = 5,
    digits: int = 5,
    bos_id: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scoring inputs for `trials` passkey prompts of context_len tokens (prompt plus answer).

    encode: text -> token ids; filler: int[N] tokens of corpus text (N > context_len); depth in
    [0, 1]: where the needle sits in the filler. Returns (tokens int32[trials * C, context_len + 1],
    answer_mask bool[same] marking the answer tokens, distance int[trials] from the needle's first
    token to the answer's), C = num_candidates; row t * C of trial t holds the true key.
    """
    rng = np.random.default_rng([seed, context_len, int(depth * 1000)])
    question = encode(QUESTION)
    rows, answer_rows, distances = [], [], []
    for _ in range(trials):
        keys = rng.choice(9 * 10 ** (digits - 1), size=num_candidates, replace=False)
        keys = keys + 10 ** (digits - 1)  # distinct numbers of exactly `digits` digits
        needle = encode(NEEDLE.format(key=keys[0]))
        answers = [encode(ANSWER.format(key=k)) for k in keys]
        head = [] if bos_id is None else [bos_id]
        room = context_len - len(head) - len(needle) - len(question) - max(map(len, answers))
        if room < 1:
            raise ValueError(f"context_len={context_len} leaves no room for filler text")
        start = rng.integers(0, len(filler) - room)
        text = filler[start : start + room].tolist()
        cut = round(depth * room)
        prompt = head + text[:cut] + needle + text[cut:] + question
        distances.append(len(prompt) - len(head) - cut)
        for answer in answers:
            row = prompt + answer
            rows.append(row + [0] * (context_len + 1 - len(row)))
            answer_rows.append([False] * len(prompt) + [True] * len(answer))
            answer_rows[-1] += [False] * (context_len + 1 - len(answer_rows[-1]))
    return np.array(rows, np.int32), np.array(answer_rows, bool), np.array(distances)


def passkey_accuracy(
    model: Transformer,
    tokens: np.ndarray,
    answer_mask: np.ndarray,
    num_candidates: int,
    batch_size: int = 8,
) -> float:
    """Fraction of trials whose true key (first of each group of candidates) scores strictly highest."""
    scores = []
    for i in range(0, len(tokens), batch_size):
        chunk, mask = tokens[i : i + batch_size], answer_mask[i : i + batch_size]
        losses = np.asarray(token_losses(model, chunk[:, :-1], chunk[:, 1:]))  # [b, L]
        scores.append(-(losses * mask[:, 1:]).sum(axis=1))  # log-likelihood of the answer
    scores = np.concatenate(scores).reshape(-1, num_candidates)
    return float(np.mean(scores[:, 0] > scores[:, 1:].max(axis=1)))  # a tie is a miss


def passkey_retrieval(
    model: Transformer,
    encode,
    filler: np.ndarray,
    context_lens: Sequence[int],
    depths: Sequence[float],
    trials: int,
    *,
    num_candidates: int = 5,
    bos_id: int | None = None,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Accuracy per (context length, depth): rows {context_len, depth, needle_distance, accuracy}.

    needle_distance: mean tokens from the needle's start to the answer (what a sliding window
    must bridge); chance accuracy is 1 / num_candidates.
    """
    rows = []
    for context_len in context_lens:
        for depth in depths:
            tokens, mask, distances = passkey_trials(
                encode,
                filler,
                context_len,
                depth,
                trials,
                num_candidates=num_candidates,
                bos_id=bos_id,
                seed=seed,
            )
            rows.append(
                {
                    "context_len": context_len,
                    "depth": depth,
                    "needle_distance": float(distances.mean()),
                    "accuracy": passkey_accuracy(model, tokens, mask, num_candidates),
                }
            )
    return rows


def wilson_interval(accuracy: np.ndarray, trials: int, z: float = 1.96) -> np.ndarray:
    """The 95% Wilson score interval of a binomial proportion: [2, ...] (low, high); unlike the
    normal approximation it is not empty at an accuracy of 0 or 1."""
    centre = (accuracy + z**2 / (2 * trials)) / (1 + z**2 / trials)
    half = (
        z
        / (1 + z**2 / trials)
        * np.sqrt(accuracy * (1 - accuracy) / trials + z**2 / (4 * trials**2))
    )
    return np.stack([centre - half, centre + half])
