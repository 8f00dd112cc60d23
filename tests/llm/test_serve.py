"""llm.serve: a real HTTP client over the loopback gets the sampler's completion, streamed or
not, and for chat messages the completion of transformers' apply_chat_template rendering; the API
key, the body cap, bad input, malformed messages and a tokenizer without a chat template are
refused while the server keeps serving; a client that leaves mid-stream frees its slot."""

import asyncio
import contextlib
import http.client
import json
import socket
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from aiohttp import web
from flax import nnx

from data import sft
from data.hf_tokenizer import HFTokenizer
from llm import serve, serve_logprobs
from llm.engine import Engine, EngineConfig
from llm.model.config import ModelConfig
from llm.model.decode import generate
from llm.model.transformer import Transformer
from llm.serve_logprobs import Logprobs

KEY = "test-key"
TIMEOUT = 5  # seconds a client may stall
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@contextlib.contextmanager
def running(app, timeout: float = TIMEOUT):
    """The port of `app` served on 127.0.0.1 by a thread of this process."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, **serve.connection_settings(timeout))
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield runner.addresses[0][1]
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(chat_tokenizer_dir):
    """(port, engine, model, tokenizer) of a server on 127.0.0.1 run by a thread of this process;
    its tokenizer has a chat template (tests/llm/conftest.py)."""
    tokenizer = HFTokenizer(chat_tokenizer_dir)
    cfg = ModelConfig(
        vocab_size=512, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
        max_seq_len=64,
    )  # fmt: skip
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, jax.tree.map(lambda p: p * 8, nnx.state(model, nnx.Param)))
    config = EngineConfig(slots=2, max_len=64, prefill_chunk=32, max_queue=4)
    engine = Engine(
        model,
        config,
        tokenizer=tokenizer,
        eos_id=tokenizer.eos_id,
        vocab_limit=tokenizer.vocab_size,
    )
    scorer = Logprobs(model, tokenizer, 64, vocab_limit=tokenizer.vocab_size)
    scorer.warmup()
    app = serve.make_app(
        engine, tokenizer.encode, api_key=KEY, max_body_bytes=2048, max_tokens_cap=48,
        timeout=TIMEOUT, chat=sft.chat_encoder(tokenizer),
        scorer=scorer,
    )  # fmt: skip
    with running(app) as port:
        yield port, engine, model, tokenizer


def post(port, body, headers=AUTH, path="/v1/completions"):
    """-> (status, parsed JSON or the raw text) of a POST to `path` over a real connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request("POST", path, body=data, headers=headers)
    response = connection.getresponse()
    raw = response.read().decode()
    connection.close()
    if response.headers.get("Content-Type", "").startswith("application/json"):
        return response.status, json.loads(raw)
    return response.status, raw


def greedy_ids(model, tokenizer, prompt: str, n: int) -> list[int]:
    """The single-request sampler's greedy continuation, cut at end of sequence."""
    ids = tokenizer.encode(prompt)
    out = generate(
        model, jnp.array([ids]), max_new_tokens=n, rng=jax.random.key(0), greedy=True,
        eos_id=tokenizer.eos_id, vocab_limit=tokenizer.vocab_size,
    )  # fmt: skip
    new = np.asarray(out)[0, len(ids) :].tolist()
    return new[: new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new


def greedy_text(model, tokenizer, prompt: str, n: int) -> str:
    """greedy_ids as text."""
    ids, new = tokenizer.encode(prompt), greedy_ids(model, tokenizer, prompt, n)
    return tokenizer.decode(ids[-4:] + new)[len(tokenizer.decode(ids[-4:])) :]


def test_completion_and_stream_over_http(server):
    port, _, model, tokenizer = server
    body = {"prompt": "The list type of", "max_tokens": 12, "temperature": 0, "model": "x"}
    status, answer = post(port, body)
    assert status == 200, answer
    assert answer["object"] == "text_completion" and answer["choices"][0]["finish_reason"]
    assert answer["choices"][0]["text"] == greedy_text(model, tokenizer, body["prompt"], 12)
    assert answer["usage"]["prompt_tokens"] == len(tokenizer.encode(body["prompt"]))

    status, raw = post(port, {**body, "stream": True})
    assert status == 200
    events = [line[len("data: ") :] for line in raw.split("\n\n") if line]
    assert events[-1] == "[DONE]" and len(events) >= 3  # several deltas, then the end
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == answer["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == answer["choices"][0]["finish_reason"]


def reference_logprobs(model, tokenizer, ids: list[int]) -> np.ndarray:
    """log-softmax of the model's logits after each of `ids` over the tokenizer's vocabulary:
    [len(ids), vocabulary]."""
    logits = np.asarray(model(jnp.array([ids]))[0], np.float64)[:, : tokenizer.vocab_size]
    return (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))[:, None]
        - logits.max(-1, keepdims=True)
    )


@pytest.mark.parametrize("echo", [True, False])
def test_logprobs_are_the_models_log_softmax(server, echo):
    """Each token's logprob and the likeliest alternatives equal the model's log-softmax after
    the tokens before it; with echo the prompt comes first (its first token without one); the
    text is the prompt's (echo) then the completion, each token's text at its offset. Nothing
    compiles after the scorer's warmup."""
    port, _, model, tokenizer = server
    compiled = serve_logprobs._score._cache_size()
    body = {"prompt": "The list type of", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    status, plain = post(port, {**body, "logprobs": None})
    status, answer = post(port, {**body, "echo": echo})
    assert status == 200, answer
    choice, prompt = answer["choices"][0], tokenizer.encode(body["prompt"])
    logprobs, n = choice["logprobs"], answer["usage"]["completion_tokens"]
    assert n > 0 and choice["text"].endswith(plain["choices"][0]["text"])
    first = 0 if echo else len(prompt)
    assert len(logprobs["tokens"]) == len(prompt) + n - first
    for i, offset in enumerate(logprobs["text_offset"]):
        assert choice["text"][offset:].startswith(logprobs["tokens"][i])
    assert choice["text"] == "".join(logprobs["tokens"])[: len(choice["text"])]
    if echo:
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    ids = prompt + greedy_ids(model, tokenizer, body["prompt"], n)
    want = reference_logprobs(model, tokenizer, ids)
    for i in range(max(first, 1), len(ids)):
        got_top = logprobs["top_logprobs"][i - first]
        assert logprobs["token_logprobs"][i - first] == pytest.approx(want[i - 1, ids[i]], abs=1e-4)
        best = np.sort(want[i - 1])[::-1][:2]  # two alternatives may read alike: one kept
        assert max(got_top.values()) == pytest.approx(best[0], abs=1e-4)
        assert all(np.isclose(best, p, atol=1e-4).any() for p in got_top.values())
        if i >= len(prompt):  # greedy: the chosen token is the likeliest
            assert logprobs["token_logprobs"][i - first] == pytest.approx(max(got_top.values()))
    assert serve_logprobs._score._cache_size() == compiled


def test_refusals_keep_the_server_serving(server):
    port = server[0]
    good = {"prompt": "def f", "max_tokens": 4, "temperature": 0}
    no_key = {"Content-Type": "application/json"}
    assert post(port, good, headers=no_key)[0] == 401
    assert post(port, good, headers={**no_key, "Authorization": "Bearer wrong"})[0] == 401
    assert post(port, {**good, "prompt": "x" * 4000})[0] == 413
    for body, status, message in [
        (b"{not json", 400, "not valid JSON"),
        ({**good, "temprature": 0.5}, 400, "unknown field(s) ['temprature']"),
        ({**good, "prompt": ""}, 400, "prompt is empty"),
        ({**good, "max_tokens": 0}, 400, "max_tokens must be an integer >= 1"),
        ({**good, "max_tokens": 100}, 400, "cap of 48"),
        ({**good, "temperature": -1}, 400, "temperature must be"),
        ({**good, "prompt": "word " * 70}, 400, "exceeds the context of 64 tokens"),
        ({**good, "logprobs": 6}, 400, "logprobs must be an integer from 0 to 5"),
        ({**good, "logprobs": "2"}, 400, "logprobs must be an integer"),
        ({**good, "echo": "yes"}, 400, "echo must be true or false"),
        ({**good, "logprobs": 1, "stream": True}, 400, "set stream to false"),
    ]:
        got, answer = post(port, body)
        assert got == status and message in answer["error"]["message"], answer
    assert post(port, good)[0] == 200


def test_a_client_leaving_mid_stream_frees_its_slot(server, monkeypatch):
    port, engine = server[0], server[1]
    step = engine.step

    def slow_step():  # 48 tokens take seconds: the request cannot end before the client leaves
        time.sleep(0.05)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    before = engine.finished["cancelled"]
    body = json.dumps({"prompt": "The", "max_tokens": 48, "temperature": 1.0, "stream": True})
    with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
        client.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        received = b""
        while b"data: " not in received:  # the first event has arrived: leave
            received += client.recv(4096)
    deadline = time.monotonic() + 30
    while engine.finished["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.finished["cancelled"] == before + 1
    assert engine.load() == (0, 0)
    assert post(port, {"prompt": "The", "max_tokens": 2})[0] == 200


def test_a_client_stalled_sending_headers_is_disconnected(server):
    port = server[0]
    with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        start = time.monotonic()
        assert client.recv(4096) == b""  # the server closed the connection
        assert time.monotonic() - start < TIMEOUT + 10
    assert post(port, {"prompt": "The", "max_tokens": 2})[0] == 200


def test_chat_completion_and_stream_over_http(server, chat_tokenizer_dir):
    import transformers

    port, _, model, tokenizer = server
    messages = [
        {"role": "system", "content": "Answer in Python terms."},
        {"role": "user", "content": "The list type"},
    ]
    rendered = transformers.AutoTokenizer.from_pretrained(chat_tokenizer_dir).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|assistant|>\n")
    body = {"messages": messages, "max_tokens": 10, "temperature": 0}
    status, answer = post(port, body, path="/v1/chat/completions")
    assert status == 200, answer
    assert answer["object"] == "chat.completion" and answer["choices"][0]["finish_reason"]
    message = answer["choices"][0]["message"]
    assert message == {"role": "assistant", "content": greedy_text(model, tokenizer, rendered, 10)}
    assert answer["usage"]["prompt_tokens"] == len(tokenizer.encode(rendered))

    status, raw = post(port, {**body, "stream": True}, path="/v1/chat/completions")
    assert status == 200
    events = [line[len("data: ") :] for line in raw.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == message["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == answer["choices"][0]["finish_reason"]


def test_malformed_chat_requests_are_400(server, hf_tokenizer_dir):
    port = server[0]
    good = {"messages": [{"role": "user", "content": "def f"}], "max_tokens": 2}
    for body, message in [
        ({"max_tokens": 2}, "messages must be a non-empty list"),
        ({**good, "messages": []}, "messages must be a non-empty list"),
        ({**good, "messages": [{"role": "user", "content": 3}]}, "messages must be"),
        ({**good, "messages": [{"role": "user"}]}, "messages must be"),
        ({**good, "messages": [{"role": "robot", "content": "x"}]}, "unknown role robot"),
        ({**good, "prompt": "x"}, "unknown field(s) ['prompt']"),
    ]:
        got, answer = post(port, body, path="/v1/chat/completions")
        assert got == 400 and message in answer["error"]["message"], answer
    assert post(port, good, path="/v1/chat/completions")[0] == 200

    plain = HFTokenizer(hf_tokenizer_dir)  # no chat template
    assert sft.chat_encoder(plain) is None
    engine = Engine(server[2], EngineConfig(slots=1, max_len=64), tokenizer=plain)
    with running(serve.make_app(engine, plain.encode, chat=None)) as other:
        got, answer = post(other, good, headers={}, path="/v1/chat/completions")
    assert got == 400 and "no chat template" in answer["error"]["message"], answer


def test_lm_evals_api_client_scores_like_our_backend(llama_dir):
    """lm-eval's own OpenAI-style client (`local-completions`: echo and logprobs) against this
    server on a small random Hugging Face Llama scores the shipped cloze task per document as our
    lm-eval backend (llm.harness) does on the same model, within 1e-4."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from llm.evaluate import harness_model
    from llm.harness import run
    from llm.runs import load_model

    # Contexts short enough that neither truncates: lm-eval's API client keeps max_length - 1
    # tokens (room for the one generated token), its hf backend and ours max_length + 1.
    task, limit, max_length = "llm_lab_cloze", 6, 256
    model, tokenizer, encode = load_model(None, str(llama_dir))
    engine = Engine(model, EngineConfig(slots=2, max_len=max_length), tokenizer=tokenizer)
    scorer = Logprobs(model, tokenizer, engine.max_len)
    with running(serve.make_app(engine, encode, scorer=scorer)) as port:
        client = LocalCompletionsAPI(
            base_url=f"http://127.0.0.1:{port}/v1/completions", model="llama",
            tokenizer=str(llama_dir), tokenizer_backend="huggingface", max_length=max_length,
            max_retries=1,
        )  # fmt: skip
        theirs = run.evaluate(client, [task], limit=limit, bootstrap_iters=0, log_samples=True)
    ours = run.evaluate(
        harness_model(hf_dir=str(llama_dir), max_length=max_length), [task], limit=limit,
        bootstrap_iters=0, log_samples=True,
    )  # fmt: skip
    ours_docs, their_docs = ours["samples"][task], theirs["samples"][task]
    assert len(ours_docs) == len(their_docs) == limit
    for a, b in zip(ours_docs, their_docs, strict=True):
        assert a["doc_id"] == b["doc_id"] and a["arguments"] == b["arguments"]
        assert [r[0][0] for r in a["resps"]] == pytest.approx(
            [r[0][0] for r in b["resps"]], abs=1e-4
        )
        assert [r[0][1] for r in a["resps"]] == [r[0][1] for r in b["resps"]]  # is greedy
    assert ours["results"][task]["acc,none"] == theirs["results"][task]["acc,none"]
