"""llm.harness.lm.JaxLM against plain references: loglikelihood is the sum of the log-softmax
of the model's logits on the continuation (truncated from the left past max_length), rolling
log-likelihood scores every token once in lm-eval's windows, generate_until is the engine's
greedy output (llm.engine; here against full forward passes) cut at the stop sequence."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx
from lm_eval.api.instance import Instance

from data.tokenizer import Tokenizer
from llm import config as config_lib
from llm.harness.lm import JaxLM, bucket
from llm.model.transformer import Transformer
from llm.parallel import partitioning

MAX_LENGTH = 32


@pytest.fixture(scope="module")
def setup(tiny_config_shared):
    exp = config_lib.resolve(tiny_config_shared)
    model = Transformer(exp.model, rngs=nnx.Rngs(0))
    mesh = partitioning.make_mesh({"data": -1})  # 8 devices: batches split 8 ways
    tokenizer = Tokenizer()
    lm = JaxLM(
        model, tokenizer, mesh=mesh, rules=exp.mesh.rules, max_length=MAX_LENGTH, batch_size=3
    )
    return model, tokenizer, lm


def _logprobs(model, tokens):
    """float64[len(tokens), V] log-softmax of the model's logits on `tokens`, by one plain
    forward pass (no mesh) right-padded to MAX_LENGTH: one compile for every reference."""
    graphdef, state = nnx.split(model)
    padded = np.zeros((1, MAX_LENGTH), np.int32)
    padded[0, : len(tokens)] = tokens
    logits = np.asarray(_forward(graphdef, state, padded)[0, : len(tokens)], np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def _reference(model, inputs, targets, scored):
    logprobs = _logprobs(model, inputs)
    picked = logprobs[np.arange(len(targets)), targets][-scored:]
    greedy = (logprobs.argmax(-1) == np.asarray(targets))[-scored:].all()
    return picked.sum(), bool(greedy)


def _request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_batch_is_rounded_to_the_devices_and_buckets_are_powers_of_two(setup):
    _, _, lm = setup
    assert lm.batch_size == 8
    assert [bucket(n, MAX_LENGTH) for n in (1, 16, 17, 31, 32)] == [16, 16, 32, 32, 32]


def test_loglikelihood_is_the_sum_of_log_softmax_on_the_continuation(setup):
    model, tokenizer, lm = setup
    pairs = [
        ("The list type", " is a mutable sequence."),
        ("Return", " None"),
        ("", "An empty context is scored after the bos token."),
        ("A long context that does not fit: " * 4, " so it is cut from the left."),
    ]
    got = lm.loglikelihood([_request("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, got, strict=True):
        if context:  # lm-eval moves the context's trailing spaces to the continuation
            whole = [tokenizer.bos_id] + tokenizer.encode(context + continuation)
            scored = len(whole) - 1 - len(tokenizer.encode(context.rstrip()))
        else:
            whole = [tokenizer.bos_id] + tokenizer.encode(continuation)
            scored = len(whole) - 1
        whole = whole[-(MAX_LENGTH + 1) :]
        want, want_greedy = _reference(model, whole[:-1], whole[1:], scored)
        assert logprob == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy
    assert len(tokenizer.encode(pairs[3][0])) > MAX_LENGTH  # the truncated case is one


def test_rolling_loglikelihood_scores_each_token_once(setup):
    model, tokenizer, lm = setup
    short = "A short text."
    long = "Each token of a longer text is predicted once, in windows of max_length. " * 2
    tokens = tokenizer.encode(long)
    assert MAX_LENGTH < len(tokens) <= 2 * MAX_LENGTH
    got = lm.loglikelihood_rolling([_request("loglikelihood_rolling", t) for t in (short, long)])
    short_tokens = [tokenizer.bos_id] + tokenizer.encode(short)
    assert got[0] == pytest.approx(
        _reference(model, short_tokens[:-1], short_tokens[1:], len(short_tokens) - 1)[0], abs=1e-4
    )
    first = [tokenizer.bos_id] + tokens[: MAX_LENGTH - 1]  # predicts tokens[:MAX_LENGTH]
    rest = tokens[len(tokens) - MAX_LENGTH - 1 : -1]  # full context for the remaining tokens
    want = _reference(model, first, tokens[:MAX_LENGTH], MAX_LENGTH)[0]
    want += _reference(model, rest, tokens[len(tokens) - MAX_LENGTH :], len(tokens) - MAX_LENGTH)[0]
    assert got[1] == pytest.approx(want, abs=1e-4)


def test_generate_until_is_the_greedy_sampler_cut_at_the_stop_sequence(setup):
    model, tokenizer, lm = setup
    contexts = ["The list type", "Return the value of", "The list type"]
    kwargs = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    got = lm.generate_until([_request("generate_until", c, dict(kwargs)) for c in contexts])
    for context, text in zip(contexts, got, strict=True):
        tokens = [tokenizer.bos_id] + tokenizer.encode(context)
        new = []
        for _ in range(6):  # greedy by full forward passes, without a cache
            token = int(_logprobs(model, tokens)[-1].argmax())
            if token == tokenizer.eos_id:
                break
            tokens, new = tokens + [token], new + [token]
        assert text == tokenizer.decode(new).split("\n")[0]
    assert got[0] == got[2]
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until([_request("generate_until", "x", {**kwargs, "num_beams": 2})])
    with pytest.raises(ValueError, match="max_gen_toks=32"):
        lm.generate_until([_request("generate_until", "x", {**kwargs, "max_gen_toks": 32})])
