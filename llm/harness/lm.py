"""lm-evaluation-harness on our models: `JaxLM`, an `lm_eval` LM over a Transformer and its
tokenizer, with `loglikelihood`, `loglikelihood_rolling` and `generate_until`.

Scoring sorts the requests by length, pads each batch to a fixed number of rows and to a length
bucket (a power of two from MIN_BUCKET, at most max_length), so the jitted scorer compiles once
per bucket; parameters and batches are placed on the mesh by the rules table, as in training.
Generation goes through one function, `generate_tokens`: llm.engine's continuous batching over
batch_size decode slots of max_length tokens (built at the first generation), so prompts of any
length share a batch and a request leaves its slot at its stop sequence.

Tokens as lm-eval's `hf` backend makes them: a context is encoded with the tokenizer's own special
tokens (`bos_prefix=False`, released models) or after a bos token (`bos_prefix=True`, our runs,
as they trained); a continuation is the whole text's tokens after the context's. Rolling
perplexity predicts every token of the text (no special tokens) after the bos token, in windows
of max_length, each token once (lm-eval's `get_rolling_token_windows`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

from llm.engine import Engine, EngineConfig, Request
from llm.model.decode import check_sampling
from llm.model.transformer import Transformer
from llm.parallel import partitioning

MIN_BUCKET = 16  # shortest padded length of a scoring batch
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task names no max_gen_toks
SAMPLING_KWARGS = ("do_sample", "temperature", "top_k", "top_p", "seed")


@functools.partial(jax.jit, static_argnames="graphdef")
def _score(graphdef, state, inputs, targets):
    """inputs, targets: int32[B, L] -> (log p(targets) f32[B, L], targets are the argmax bool[B, L])."""
    logits = nnx.merge(graphdef, state)(inputs)  # [B, L, V]
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    target_logprob = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return target_logprob, jnp.argmax(logits, axis=-1) == targets


def bucket(length: int, max_length: int) -> int:
    """The padded length of a batch whose longest row has `length` tokens."""
    return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), max_length)


def _row(context: list[int], continuation: list[int], max_length: int):
    """(inputs, targets, scored) of a pair: the last max_length + 1 tokens of context +
    continuation, shifted; the last `scored` targets are the continuation's."""
    whole = (context + continuation)[-(max_length + 1) :]
    return whole[:-1], whole[1:], min(len(continuation), len(whole) - 1)


class JaxLM(TemplateLM):
    """An lm_eval LM: `model` with `tokenizer` (data.tokenizer.Tokenizer or
    data.hf_tokenizer.HFTokenizer) on `mesh` under the logical-axis `rules`.

    max_length: longest scored window (tokens); batch_size: rows per compiled batch (rounded up
    to a multiple of the devices the batch splits over); bos_prefix: see the module docstring.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Any,
        *,
        mesh: jax.sharding.Mesh,
        rules: partitioning.AxisRules,
        max_length: int,
        batch_size: int = 16,
        bos_prefix: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        if not 0 < max_length <= model.cfg.max_seq_len:
            raise ValueError(
                f"max_length={max_length} must be in [1, the model's max_seq_len="
                f"{model.cfg.max_seq_len}]."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
        self.text_tokenizer, self.bos_prefix, self.seed = tokenizer, bos_prefix, seed
        self.mesh, self.rules, self._max_length = mesh, tuple(rules), max_length
        batch_split = math.prod(
            mesh.shape[a] for a in partitioning.mesh_axes_of("batch", self.rules)
        )
        self._batch_size = -(-batch_size // batch_split) * batch_split
        self.graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, partitioning.state_shardings(state, mesh, self.rules))
        self.num_params = sum(x.size for x in jax.tree.leaves(state))
        self.dtype = str(model.cfg.dtype)

    # The interface lm-eval reads.
    @property
    def eot_token_id(self) -> int:
        return self.text_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.text_tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.text_tokenizer, "path", "")).replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_num_parameters": self.num_params, "model_dtype": self.dtype}

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        """A text's tokens; with special tokens unless add_special_tokens=False."""
        tokenizer = self.text_tokenizer
        if add_special_tokens is False:
            return tokenizer.encode(string)
        if self.bos_prefix:
            return [tokenizer.bos_id] + tokenizer.encode(string)
        return tokenizer.encode_prompt(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.text_tokenizer.decode([int(t) for t in tokens])

    # Scoring.
    def _score_batch(self, inputs: np.ndarray, targets: np.ndarray):
        """Log-probabilities and argmax matches of int32[batch_size, L] targets on the mesh."""
        sharding = partitioning.batch_sharding(self.mesh, self.rules)
        with jax.set_mesh(self.mesh), partitioning.axis_rules(self.rules):
            logprob, greedy = _score(
                self.graphdef,
                self.state,
                jax.device_put(inputs, sharding),
                jax.device_put(targets, sharding),
            )
        return np.asarray(logprob, np.float64), np.asarray(greedy)

    def score_rows(self, rows: list[tuple[list[int], list[int], int]]) -> list[tuple[float, bool]]:
        """(sum of log p, all greedy) of the last `scored` targets of each (inputs, targets,
        scored) row, longest rows batched first."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        size = self.batch_size
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            length = bucket(len(rows[chunk[0]][0]), self.max_length)
            inputs = np.zeros((size, length), np.int32)
            targets = np.zeros((size, length), np.int32)
            mask = np.zeros((size, length), bool)
            for j, i in enumerate(chunk):
                row_inputs, row_targets, scored = rows[i]
                inputs[j, : len(row_inputs)] = row_inputs
                targets[j, : len(row_targets)] = row_targets
                mask[j, len(row_targets) - scored : len(row_targets)] = True
            logprob, greedy = self._score_batch(inputs, targets)
            for j, i in enumerate(chunk):
                results[i] = (float(logprob[j][mask[j]].sum()), bool(greedy[j][mask[j]].all()))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: ((context, continuation), context tokens, continuation tokens) each."""
        rows = [
            _row(context, continuation, self.max_length) for _, context, continuation in requests
        ]
        return self.score_rows(rows)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, every token predicted once after the bos token."""
        rows, owners = [], []
        for k, (text,) in enumerate(req.args for req in requests):
            windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, target in map(lm_utils.make_disjoint_window, windows):
                rows.append(_row(context, target, self.max_length))
                owners.append(k)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owners, self.score_rows(rows), strict=True):
            totals[k] += logprob
        return totals

    # Generation.
    @functools.cached_property
    def engine(self) -> Engine:
        """batch_size decode slots of max_length tokens over the model (llm.engine)."""
        return Engine(
            nnx.merge(self.graphdef, self.state),
            EngineConfig(slots=self.batch_size, max_len=self.max_length),
            tokenizer=self.text_tokenizer,
            eos_id=self.eot_token_id,
            vocab_limit=self.text_tokenizer.vocab_size,
        )

    def generate_tokens(
        self, prompts: list[list[int]], until: list[list[str]], max_new: list[int], sampling: dict
    ) -> list[list[int]]:
        """The new tokens after each prompt, up to its stop sequence (included: cut by the
        caller, as lm-eval cuts text), max_new tokens or eos (excluded); `sampling` as _sampling
        returns it. The one place generation happens (llm.engine)."""
        sampling = {"seed": self.seed, **sampling}
        requests = [
            Request(prompt=p, max_tokens=n, stop=tuple(stop), **sampling)
            for p, stop, n in zip(prompts, until, max_new, strict=True)
        ]
        step = self.engine.config.max_queue
        with jax.set_mesh(self.mesh), partitioning.axis_rules(self.rules):
            done = [
                c
                for i in range(0, len(requests), step)
                for c in self.engine.generate(requests[i : i + step])
            ]
        return [c.tokens for c in done]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continues each context until a stop sequence or max_gen_toks tokens; prompts longer
        than max_length - max_gen_toks keep their last tokens (as lm-eval's hf backend)."""
        eos_text = self.text_tokenizer.piece(self.eot_token_id)
        groups: dict[tuple, list[tuple[int, list[int], list[str], int]]] = {}
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = kwargs.pop("max_gen_toks")
            if not 0 < max_new < self.max_length:
                raise ValueError(
                    f"max_gen_toks={max_new} must be in [1, max_length={self.max_length}): "
                    "room must be left for the prompt."
                )
            sampling = _sampling(kwargs)
            prompt = self.tok_encode(context)[-(self.max_length - max_new) :]
            groups.setdefault(tuple(sorted(sampling.items())), []).append(
                (i, prompt, until, max_new)
            )
        results = [""] * len(requests)
        for sampling, members in groups.items():
            index, prompts, untils, max_new = zip(*members, strict=True)
            new = self.generate_tokens(list(prompts), list(untils), list(max_new), dict(sampling))
            for i, until, tokens in zip(index, untils, new, strict=True):
                results[i] = postprocess_generated_text(self.tok_decode(tokens), until, None)
        return results


def _sampling(kwargs: dict[str, Any]) -> dict[str, Any]:
    """llm.engine.Request's sampling fields of a request's remaining generation kwargs: greedy
    unless do_sample with a temperature > 0; ValueError naming a kwarg this backend lacks."""
    unknown = sorted(set(kwargs) - set(SAMPLING_KWARGS))
    if unknown:
        raise ValueError(
            f"generation kwargs {unknown} are not supported by llm.harness (it takes until, "
            f"max_gen_toks and {', '.join(SAMPLING_KWARGS)})."
        )
    temperature = float(kwargs.get("temperature") or 0.0)
    if not kwargs.get("do_sample") or temperature == 0.0:
        return {"greedy": True}
    sampling = {
        "temperature": temperature,
        "top_k": int(kwargs.get("top_k") or 0),
        "top_p": float(kwargs.get("top_p") or 1.0),
        "greedy": False,
    }
    check_sampling(1, **sampling)
    if "seed" in kwargs:
        sampling["seed"] = int(kwargs["seed"])
    return sampling
