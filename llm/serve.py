"""OpenAI-compatible completions and chat completions endpoints on the continuous-batching engine.

    python -m llm.serve --workdir=/tmp/default --port=8000
    python -m llm.serve --hf=path/to/qwen2.5-0.5b --port=8000 --api_key=secret --slots=16
    curl -s 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"prompt": "The list type", "max_tokens": 32, "temperature": 0}'

POST /v1/completions takes prompt (text, or token ids), max_tokens (default 16), temperature
(0 = greedy), top_p, top_k, stop, seed, stream, n (1 only), logprobs (0-5: each token's
log-probability and that many likeliest alternatives, llm.serve_logprobs), echo (the prompt
before the completion, with its tokens' logprobs), model and user (ignored); any other field is
refused. With "stream": true the answer is server-sent events, one chunk per delta, then
`data: [DONE]` (logprobs and echo are answered whole, not streamed). POST /v1/chat/completions
takes messages ([{"role", "content": text}, ...]) instead of prompt, rendered by the tokenizer's
chat template (data.sft) with the assistant's turn opened; it answers choices[0].message
(streamed: choices[0].delta chunks), and 400 when the tokenizer has no chat template.
GET /v1/models names the model. It binds 127.0.0.1 unless --host says otherwise; with --api_key
every request needs `Authorization: Bearer KEY` (else 401). A body over --max_body_bytes is 413,
a bad request 400 (one message, the server keeps serving), a full queue 429; a client that stalls
sending its headers or body or reading the stream for --timeout seconds is dropped, and a client
that goes away frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import secrets
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jinja2
from absl import app, flags, logging
from aiohttp import web

from data.sft import chat_encoder
from llm.engine import TRUNCATE, Delta, Engine, EngineConfig, QueueFull, Request
from llm.errors import ConfigError
from llm.runs import load_model
from llm.serve_logprobs import MAX_TOP, Logprobs, token_texts

CHAT = Callable[[list], list[int]]  # messages -> the prompt ids of the assistant's reply
FIELDS = {"prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "n"}
SCORING = {"logprobs", "echo"}  # completions only
IGNORED = {"model", "user"}


class BadRequest(ValueError):
    """A request the server refuses with 400; the message says why."""


def _error(status: int, message: str) -> web.Response:
    kind = {400: "invalid_request_error", 401: "authentication_error", 413: "invalid_request_error"}
    body = {"error": {"message": message, "type": kind.get(status, "server_error"), "code": status}}
    return web.json_response(body, status=status)


def _number(body: dict, name: str, default: Any, integer: bool = False) -> Any:
    """body[name] (default when absent), which must be a JSON number (an integer if `integer`)."""
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"{name} must be {kind}, got {value!r}.")
    return value


def _chat_ids(messages: Any, chat: CHAT) -> list[int]:
    """The prompt ids of well-formed `messages`; BadRequest otherwise."""
    if not (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict)
            and set(m) == {"role", "content"}
            and isinstance(m["role"], str)
            and isinstance(m["content"], str)
            for m in messages
        )
    ):
        raise BadRequest(
            'messages must be a non-empty list of {"role": string, "content": string} objects.'
        )
    try:
        return chat(messages)
    except jinja2.TemplateError as e:  # the template's own refusal, e.g. roles out of order
        raise BadRequest(f"the chat template cannot render these messages: {e}") from e


def parse_request(
    body: Any, encode: Callable[[str], list[int]], max_tokens_cap: int, chat: CHAT | None = None
) -> dict:
    """A completions body (with `chat`: a chat completions body, its messages rendered by it) ->
    the engine Request's fields and `stream`; BadRequest otherwise."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object.")
    fields = FIELDS | SCORING if chat is None else FIELDS - {"prompt"} | {"messages"}
    unknown = sorted(set(body) - fields - IGNORED)
    if unknown:
        raise BadRequest(
            f"unknown field(s) {unknown}; this endpoint takes {sorted(fields | IGNORED)}."
        )
    prompt = body.get("prompt") if chat is None else _chat_ids(body.get("messages"), chat)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and chat is None:
        if not prompt:
            raise BadRequest("prompt is empty: give some text to continue.")
        ids = encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        ids = prompt
    else:
        raise BadRequest(
            "prompt must be a non-empty string (or a list of token ids)."
            if chat is None
            else "the chat template rendered these messages as no tokens."
        )
    max_tokens = _number(body, "max_tokens", 16, integer=True)
    if max_tokens < 1:
        raise BadRequest(f"max_tokens must be an integer >= 1, got {max_tokens!r}.")
    if max_tokens > max_tokens_cap:
        raise BadRequest(f"max_tokens={max_tokens} exceeds this server's cap of {max_tokens_cap}.")
    if body.get("n", 1) != 1:
        raise BadRequest("n must be 1 (one completion per request).")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not (
        isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)
    ):
        raise BadRequest("stop must be a non-empty string or a list of up to 4 of them.")
    temperature = float(_number(body, "temperature", 1.0))
    stream, echo = body.get("stream", False), body.get("echo", False)
    for name, value in (("stream", stream), ("echo", echo)):
        if not isinstance(value, bool):
            raise BadRequest(f"{name} must be true or false, got {value!r}.")
    logprobs = body.get("logprobs")
    if logprobs is not None and _number(body, "logprobs", 0, True) not in range(MAX_TOP + 1):
        raise BadRequest(
            f"logprobs must be an integer from 0 to {MAX_TOP} or null, got {logprobs}."
        )
    if stream and (echo or logprobs is not None):
        raise BadRequest("logprobs and echo are answered whole: set stream to false.")
    return {
        "prompt": ids,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "greedy": temperature == 0,
        "top_p": float(_number(body, "top_p", 1.0)),
        "top_k": _number(body, "top_k", 0, integer=True),
        "stop": tuple(stop),
        "seed": _number(body, "seed", 0, integer=True) % 2**32,
        "stream": stream,
        "logprobs": logprobs,
        "echo": echo,
    }


def connection_settings(timeout: float) -> dict[str, Any]:
    """aiohttp's per-connection settings (web.run_app, web.AppRunner): a client that has not sent
    a whole request line and headers `timeout` seconds after connecting, or after its previous
    answer, is disconnected (aiohttp's keep-alive timer runs from the connection's start)."""
    return {"keepalive_timeout": timeout}


def make_app(
    engine: Engine,
    encode: Callable[[str], list[int]],
    *,
    model_name: str = "llm-lab",
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    max_tokens_cap: int = 256,
    timeout: float = 30.0,
    chat: CHAT | None = None,
    scorer: Logprobs | None = None,
) -> web.Application:
    """The aiohttp application; its startup starts the engine's thread, its cleanup stops it.
    `chat` (data.sft.chat_encoder's) serves /v1/chat/completions; without it that answers 400.
    `scorer` answers logprobs and echo; without it a request asking for them is a 400."""

    @web.middleware
    async def guard(request: web.Request, handler):
        if api_key is not None:
            given = request.headers.get("Authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key: send `Authorization: Bearer KEY`.")
        if (request.content_length or 0) > max_body_bytes:
            return _error(413, f"the body is over this server's {max_body_bytes} bytes.")
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"the body is over this server's {max_body_bytes} bytes.")

    async def models(request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": model_name, "object": "model"}]}
        )

    def text_choice(text: str, finish_reason: str | None, first: bool) -> dict:
        del first
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}

    def chat_choice(text: str, finish_reason: str | None, first: bool | None) -> dict:
        if first is None:  # the whole answer
            return {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": 0, "delta": delta, "finish_reason": finish_reason}

    async def completions(request: web.Request) -> web.StreamResponse:
        return await complete(request, None, "cmpl", "text_completion", text_choice)

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        if chat is None:
            return _error(400, "this model's tokenizer has no chat template: use /v1/completions.")
        return await complete(request, chat, "chatcmpl", "chat.completion", chat_choice)

    async def complete(request, chat_ids, prefix, kind, choice_of) -> web.StreamResponse:
        """One request of either endpoint; choice_of(text, finish_reason, first chunk or None for
        a whole answer) -> the endpoint's choice."""
        try:
            raw = await asyncio.wait_for(request.read(), timeout)
        except TimeoutError:
            return _error(408, f"the body did not arrive within {timeout} s.")
        try:
            fields = parse_request(json.loads(raw), encode, max_tokens_cap, chat_ids)
        except json.JSONDecodeError as e:
            return _error(400, f"the body is not valid JSON: {e}.")
        except BadRequest as e:
            return _error(400, str(e))
        stream, top, echo = (fields.pop(name) for name in ("stream", "logprobs", "echo"))
        if (top is not None or echo) and scorer is None:
            return _error(400, "this server answers no logprobs or echo.")
        loop, deltas = asyncio.get_running_loop(), asyncio.Queue()
        on_delta = lambda delta: loop.call_soon_threadsafe(deltas.put_nowait, delta)
        try:
            rid, prompt_tokens, truncated = engine.submit(Request(**fields, on_delta=on_delta))
        except QueueFull as e:
            return _error(429, str(e))
        except ValueError as e:
            return _error(400, str(e))
        head = {"id": f"{prefix}-{rid}", "object": kind, "created": int(time.time())}
        head["model"] = model_name
        finished = False
        try:
            if not stream:
                text, tokens, delta = "", [], Delta("", ())
                while delta.finish_reason is None:
                    delta = await deltas.get()
                    text, tokens = text + delta.text, tokens + list(delta.tokens)
                finished = True
                if delta.finish_reason == "error":
                    return _error(500, "the engine failed on this request; retry.")
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens)}
                usage["total_tokens"] = prompt_tokens + len(tokens)
                extra = {"truncated_prompt_tokens": truncated} if truncated else {}
                choice = choice_of(text, delta.finish_reason, None)
                prompt = fields["prompt"][truncated:]
                if top is not None:  # the scoring pass off the event loop, beside the engine
                    choice["logprobs"] = await asyncio.to_thread(scorer, prompt, tokens, top, echo)
                if echo:  # the prompt's token texts (the logprobs list them first)
                    texts = choice["logprobs"] and choice["logprobs"]["tokens"]
                    texts = texts or token_texts(scorer.tokenizer, prompt)
                    choice["text"] = "".join(texts[: len(prompt)]) + text
                return web.json_response({**head, "choices": [choice], "usage": usage, **extra})
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            response.headers["Cache-Control"] = "no-cache"
            await response.prepare(request)
            head["object"] += ".chunk" if chat_ids else ""
            try:
                first = True
                while not finished:
                    delta = await deltas.get()
                    finished = delta.finish_reason is not None
                    choice = choice_of(delta.text, delta.finish_reason, first)
                    event, first = {**head, "choices": [choice]}, False
                    await asyncio.wait_for(
                        response.write(f"data: {json.dumps(event)}\n\n".encode()), timeout
                    )
                await asyncio.wait_for(response.write(b"data: [DONE]\n\n"), timeout)
            except (ConnectionResetError, TimeoutError):
                pass  # the client left or stalled: `finally` frees its slot
            return response
        finally:
            if not finished:  # the client left, stalled, or the handler was cancelled
                engine.cancel(rid)

    async def run_engine(application: web.Application):
        stop = threading.Event()
        thread = threading.Thread(target=engine.serve_forever, args=(stop,), daemon=True)
        thread.start()
        yield
        stop.set()
        thread.join()

    application = web.Application(middlewares=[guard], client_max_size=max_body_bytes)
    application.router.add_get("/v1/models", models)
    application.router.add_post("/v1/completions", completions)
    application.router.add_post("/v1/chat/completions", chat_completions)
    application.cleanup_ctx.append(run_engine)
    return application


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if bool(f.workdir) == bool(f.hf):
        print("error: pass --workdir=DIR[@STEP] or --hf=DIR, not both.", file=sys.stderr)
        sys.exit(2)
    logging.set_verbosity(logging.WARNING)
    try:
        config = EngineConfig(
            f.slots, f.max_len, f.prefill_chunk, f.max_queue, f.truncate, f.decode_steps
        )
        model, tokenizer, encode = load_model(f.workdir, f.hf)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    vocab = tokenizer.vocab_size if tokenizer.vocab_size < model.cfg.vocab_size else None
    engine = Engine(model, config, tokenizer=tokenizer, eos_id=tokenizer.eos_id, vocab_limit=vocab)
    scorer = Logprobs(model, tokenizer, engine.max_len, vocab)
    scorer.warmup()
    engine.warmup()
    name = pathlib.Path((f.workdir or f.hf).split("@")[0]).name
    application = make_app(
        engine,
        encode,
        model_name=name,
        api_key=f.api_key,
        max_body_bytes=f.max_body_bytes,
        max_tokens_cap=f.max_tokens_cap,
        timeout=f.timeout,
        chat=chat_encoder(tokenizer),
        scorer=scorer,
    )
    web.run_app(application, host=f.host, port=f.port, **connection_settings(f.timeout))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A training run, DIR or DIR@STEP.")
    flags.DEFINE_string("hf", None, "A Hugging Face model directory with its tokenizer.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind; 0.0.0.0 lets other machines in.")
    flags.DEFINE_integer("port", 8000, "Port.")
    flags.DEFINE_string("api_key", None, "Require `Authorization: Bearer KEY` on every request.")
    flags.DEFINE_integer("slots", EngineConfig.slots, "Requests decoded together.")
    flags.DEFINE_integer("max_len", None, "Tokens per slot (prompt + output); default max_seq_len.")
    flags.DEFINE_integer(
        "prefill_chunk", EngineConfig.prefill_chunk, "Prompt tokens written per prefill call."
    )
    flags.DEFINE_integer("max_queue", EngineConfig.max_queue, "Requests waiting; more get 429.")
    flags.DEFINE_integer(
        "decode_steps",
        EngineConfig.decode_steps,
        "Decode steps per device call (tokens stream in bursts).",
    )
    flags.DEFINE_enum(
        "truncate", EngineConfig.truncate, TRUNCATE, "A too long prompt: 400, or cut."
    )
    flags.DEFINE_integer("max_tokens_cap", 256, "Largest max_tokens a request may ask for.")
    flags.DEFINE_integer("max_body_bytes", 1 << 20, "Largest request body (else 413).")
    flags.DEFINE_float("timeout", 30.0, "Seconds a client may stall sending or reading.")
    app.run(main)
