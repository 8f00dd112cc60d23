"""llm.engine: continuous batching gives the single-request sampler's tokens, whatever the join
order; slots are reused after a finish or a cancel; stop sequences, sampling, bad requests."""

import functools
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm.engine import Engine, EngineConfig, QueueFull, Request
from llm.errors import ConfigError
from llm.model import slot_decode
from llm.model.config import ModelConfig
from llm.model.decode import generate
from llm.model.transformer import Transformer

MAX_LEN, CHUNK = 32, 16
PROMPTS = [list(np.random.default_rng(0).integers(0, 64, n)) for n in (3, 11, 1, 20)]
NEW = [5, 9, 3, 12]


@functools.cache
def tiny_model(pattern: str = "dense", scan: bool = False) -> Transformer:
    cfg = ModelConfig(
        vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
        max_seq_len=MAX_LEN, attention_pattern=pattern, attention_window=4, attention_global=2,
        scan_layers=scan,
    )  # fmt: skip
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    # Larger weights: peaked logits, so greedy tokens vary along a sequence.
    nnx.update(model, jax.tree.map(lambda p: p * 8, nnx.state(model, nnx.Param)))
    return model


@functools.cache
def reference(pattern: str, i: int, scan: bool = False) -> list[int]:
    """The single-request sampler's greedy continuation of PROMPTS[i]."""
    prompt = jnp.array([PROMPTS[i]], jnp.int32)
    out = generate(
        tiny_model(pattern, scan), prompt, max_new_tokens=NEW[i], rng=jax.random.key(0),
        greedy=True,
    )  # fmt: skip
    return np.asarray(out)[0, len(PROMPTS[i]) :].tolist()


@functools.cache
def engine(pattern: str = "dense", slots: int = 2) -> Engine:
    return Engine(
        tiny_model(pattern), EngineConfig(slots=slots, max_len=MAX_LEN, prefill_chunk=CHUNK)
    )


def run_staggered(eng: Engine, requests: list[Request], join_at: list[int]) -> list[list[int]]:
    """Submits request i at engine step join_at[i]; steps until all finish -> their tokens."""
    tokens, done = [[] for _ in requests], set()

    def collect(i):
        def on_delta(delta):
            tokens[i].extend(delta.tokens)
            if delta.finish_reason is not None:
                done.add(i)

        return on_delta

    step = 0
    while len(done) < len(requests):
        for i, request in enumerate(requests):
            if join_at[i] == step:
                eng.submit(Request(**{**request.__dict__, "on_delta": collect(i)}))
        eng.step()
        step += 1
    return tokens


@pytest.mark.parametrize("pattern", ["dense", "local_global,sliding"])
def test_greedy_equals_the_sampler_whatever_the_join_order(pattern):
    eng, expected = engine(pattern), [reference(pattern, i) for i in range(len(PROMPTS))]
    for order in ([0, 1, 2, 3], [3, 2, 0, 1]):  # all at once, fewer slots than requests
        out = eng.generate([Request(PROMPTS[i], max_tokens=NEW[i], greedy=True) for i in order])
        assert [c.tokens for c in out] == [expected[i] for i in order]
        assert all(c.finish_reason == "length" for c in out)
    requests = [Request(p, max_tokens=n, temperature=0) for p, n in zip(PROMPTS, NEW)]
    assert run_staggered(eng, requests, [3, 0, 7, 1]) == expected  # joining mid-flight
    # Four slots: the first chunks of the prompts of 11, 3 and 1 tokens share one packed row
    # (each sequence at its own positions, seeing only itself), 20's first 16 take another,
    # its last 4 a call of their own.
    packed = engine(pattern, slots=4)
    packed.work.clear()
    out = packed.generate([Request(p, max_tokens=n, greedy=True) for p, n in zip(PROMPTS, NEW)])
    assert [c.tokens for c in out] == expected
    assert packed.work["prefill_calls"] == 3 and packed.work["prefill_tokens"] == 35
    # Prompts of 8 and 7 tokens in one row: the second one's columns 8-14 hold its positions 0-6,
    # longer than the window, so local+global's global first tokens are its own.
    prompts = [PROMPTS[3][:8], PROMPTS[3][8:15]]
    packed.work.clear()
    out = packed.generate([Request(p, max_tokens=6, greedy=True) for p in prompts])
    assert packed.work["prefill_calls"] == 1
    for prompt, completion in zip(prompts, out):
        alone = generate(
            tiny_model(pattern), jnp.array([prompt]), max_new_tokens=6, rng=jax.random.key(0),
            greedy=True,
        )  # fmt: skip
        assert completion.tokens == np.asarray(alone)[0, len(prompt) :].tolist()
    if pattern != "dense":  # the pattern is applied: same weights, other tokens
        assert expected != [reference("dense", i) for i in range(len(PROMPTS))]


def test_scanned_layers_decode_as_the_sampler():
    """A scan_layers model (its cache stacked [layers, ...] in the decode loop too) joins and
    leaves slots with the sampler's tokens; two decode steps per call, so most of a request's
    keys and values are read back from the cache, written there by earlier calls."""
    config = EngineConfig(slots=2, max_len=MAX_LEN, prefill_chunk=CHUNK, decode_steps=2)
    eng = Engine(tiny_model(scan=True), config)
    requests = [Request(p, max_tokens=n, greedy=True) for p, n in zip(PROMPTS, NEW)]
    expected = [reference("dense", i, scan=True) for i in range(len(PROMPTS))]
    assert [c.tokens for c in eng.generate(requests)] == expected
    assert run_staggered(eng, requests, [3, 0, 7, 1]) == expected


def test_slots_are_reused_after_finish_and_cancel():
    eng = engine("dense", slots=1)
    eng.finished.clear()
    got = []
    long_id, _, _ = eng.submit(Request(PROMPTS[3], max_tokens=12, greedy=True, on_delta=got.append))
    queued_id, _, _ = eng.submit(Request(PROMPTS[0], max_tokens=5, greedy=True))
    for _ in range(2):  # two prefill chunks, then 8 decode steps in one call: 9 tokens of 12
        eng.step()
    eng.cancel(long_id)
    eng.cancel(queued_id)  # still waiting: leaves without running
    out = eng.generate([Request(PROMPTS[i], max_tokens=NEW[i], greedy=True) for i in (1, 2, 0)])
    # The one slot served three requests after a cancel; stale cache rows never leak.
    assert [c.tokens for c in out] == [reference("dense", i) for i in (1, 2, 0)]
    assert got[-1].finish_reason == "cancelled"
    assert 0 < sum(len(d.tokens) for d in got) < 12
    assert eng.finished == {"cancelled": 2, "length": 3}
    assert eng.load() == (0, 0)


def test_nothing_compiles_after_warmup_with_parameters_on_a_mesh():
    """As with a loaded run (llm.runs.load_model): the calls' caches come back placed on the
    parameters' mesh, unlike a fresh one, and warmup has compiled for that placement too."""
    model = tiny_model()
    graphdef, state = nnx.split(model)
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    placed = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    config = EngineConfig(slots=2, max_len=MAX_LEN, prefill_chunk=CHUNK)
    eng = Engine(nnx.merge(graphdef, placed), config)
    eng.warmup()
    jitted = (slot_decode.prefill_packed, slot_decode.prefill, slot_decode.decode, slot_decode.move)
    compiled = [f._cache_size() for f in jitted]
    out = eng.generate([Request(PROMPTS[i], max_tokens=NEW[i], greedy=True) for i in (3, 1, 0)])
    assert [c.tokens for c in out] == [reference("dense", i) for i in (3, 1, 0)]
    assert [f._cache_size() for f in jitted] == compiled
    # Serving's device work alone (warmup's calls are not counted): 20 prompt tokens in two
    # chunks of 16, 11 and 3 in one each; the first output token comes from the prefill.
    assert eng.work["prefill_tokens"] == 34 and eng.work["prefill_calls"] == 4
    assert NEW[3] - 1 <= eng.work["decode_steps"] <= sum(NEW) - 3
    assert eng.work["decode_calls"] <= eng.work["decode_steps"]
    # A second engine over an equal model reuses the compiled calls (slot_decode.Graph hashes
    # once and compares equal graphs equal): its warmup compiles nothing.
    Engine(nnx.merge(graphdef, placed), config).warmup()
    assert [f._cache_size() for f in jitted] == compiled


def test_a_failed_step_ends_its_requests_and_serving_goes_on_without_compiling(monkeypatch):
    """serve_forever: a call that fails after consuming the donated cache ends the requests in
    the slots with "error"; the next requests run on a fresh cache placed as warmup compiled for
    (parameters on a mesh), so nothing compiles and their tokens are the sampler's."""
    graphdef, state = nnx.split(tiny_model())
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    placed = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    eng = Engine(
        nnx.merge(graphdef, placed), EngineConfig(slots=2, max_len=MAX_LEN, prefill_chunk=CHUNK)
    )
    eng.warmup()
    jitted = (slot_decode.prefill_packed, slot_decode.prefill, slot_decode.decode, slot_decode.move)
    compiled = [f._cache_size() for f in jitted]
    decode = slot_decode.decode

    def failing(*args, **kwargs):
        decode(*args, **kwargs)  # the donated cache is gone
        raise RuntimeError("device lost")

    monkeypatch.setattr(slot_decode, "decode", failing)
    finished, stop = queue.Queue(), threading.Event()
    thread = threading.Thread(target=eng.serve_forever, args=(stop,))
    thread.start()
    try:
        on_delta = lambda d: d.finish_reason and finished.put(d.finish_reason)
        for i in (0, 1):
            eng.submit(Request(PROMPTS[i], max_tokens=NEW[i], greedy=True, on_delta=on_delta))
        assert [finished.get(timeout=60) for _ in range(2)] == ["error", "error"]
        monkeypatch.setattr(slot_decode, "decode", decode)
        while eng.load() != (0, 0):  # the engine thread is between steps
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join()
    out = eng.generate([Request(PROMPTS[i], max_tokens=NEW[i], greedy=True) for i in (3, 1)])
    assert [c.tokens for c in out] == [reference("dense", i) for i in (3, 1)]
    assert [f._cache_size() for f in jitted] == compiled


@pytest.mark.parametrize(
    "flag, message",
    [("--decode_steps=0", "--decode_steps must be"), ("--requests=0", "--requests must be")],
)
def test_the_benchmark_refuses_bad_settings_in_one_line(run_module, flag, message):
    done = run_module("llm.engine_benchmark", flag)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: {message} a positive integer, got 0."
    ]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--config.model.num_kv_heads=3"], "is not divisible by config.model.num_kv_heads=3"),
        (["--workdir=/nonexistent", "--config.model.num_layers=2"], "pass one or the other."),
    ],
)
def test_the_benchmark_refuses_a_bad_model_config_in_one_line(run_module, flags, message):
    """--config.* shapes the model at random init: a bad field, or one beside --workdir (whose
    model has its own), is one line and exit status 2."""
    done = run_module("llm.engine_benchmark", *flags)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr


def test_a_request_moved_to_a_freed_lower_slot_continues_exactly(monkeypatch):
    """Once nothing waits, a request in a high slot moves into a freed lower one (decode steps
    then compute fewer rows); its tokens are the sampler's all the same."""
    moves, move = [], slot_decode.move

    def counted(cache, src, dst):
        moves.append((int(src), int(dst)))
        return move(cache, src, dst)

    monkeypatch.setattr(slot_decode, "move", counted)
    out = engine("dense", slots=2).generate(
        [Request(PROMPTS[i], max_tokens=NEW[i], greedy=True) for i in (2, 3)]
    )  # 2 ends first: 3 moves from slot 1 to slot 0
    assert moves == [(1, 0)]
    assert [c.tokens for c in out] == [reference("dense", i) for i in (2, 3)]


class Letters:
    """A tokenizer stand-in: id i is the letter chr(97 + i % 26)."""

    def decode(self, ids):
        return "".join(chr(97 + int(i) % 26) for i in ids)


def test_stop_sequences_eos_and_streamed_text():
    model = tiny_model()
    eng = Engine(
        model, EngineConfig(slots=2, max_len=MAX_LEN, prefill_chunk=CHUNK), tokenizer=Letters()
    )
    full = eng.generate([Request(PROMPTS[3], max_tokens=12, greedy=True)])[0]
    assert full.text == Letters().decode(reference("dense", 3))
    stop = full.text[4:6]
    deltas = []
    cut = eng.generate(
        [
            Request(
                PROMPTS[3], max_tokens=12, greedy=True, stop=("zzzz", stop), on_delta=deltas.append
            )
        ]
    )[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    assert "".join(d.text for d in deltas) == cut.text and all(stop not in d.text for d in deltas)
    eos = full.tokens[5]
    eng.eos_id = eos
    ended = eng.generate([Request(PROMPTS[3], max_tokens=12, greedy=True)])[0]
    assert ended.finish_reason == "stop" and ended.tokens == full.tokens[: full.tokens.index(eos)]


def test_sampling_depends_on_the_request_alone():
    eng = engine()
    kw = {"max_tokens": 10, "temperature": 0.8, "top_k": 20, "top_p": 0.9}
    alone = eng.generate([Request(PROMPTS[1], seed=3, **kw)])[0].tokens
    others = [Request(PROMPTS[i], max_tokens=NEW[i], greedy=True) for i in (3, 0)]
    mixed = eng.generate([others[0], Request(PROMPTS[1], seed=3, **kw), others[1]])[1].tokens
    assert alone == mixed
    one_step = Engine(  # the draw of step i of a call is the one of a call per step
        tiny_model(), EngineConfig(slots=2, max_len=MAX_LEN, prefill_chunk=CHUNK, decode_steps=1)
    )
    assert one_step.generate([Request(PROMPTS[1], seed=3, **kw)])[0].tokens == alone
    other_seed = eng.generate([Request(PROMPTS[1], seed=4, **kw)])[0].tokens
    assert other_seed != alone
    top1 = eng.generate([Request(PROMPTS[1], max_tokens=NEW[1], temperature=3.0, top_k=1)])[0]
    assert top1.tokens == reference("dense", 1)


def test_bad_requests_and_config():
    eng = engine()
    with pytest.raises(ValueError, match="prompt is empty"):
        eng.submit(Request([], max_tokens=3))
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1"):
        eng.submit(Request([1], max_tokens=0))
    with pytest.raises(ValueError, match="top_p must be in"):
        eng.submit(Request([1], top_p=0.0))
    with pytest.raises(ValueError, match="exceeds the context of 32 tokens"):
        eng.submit(Request([1] * 25, max_tokens=10))
    with pytest.raises(ValueError, match="stop sequences need"):
        eng.submit(Request([1], stop=("x",)))
    left = Engine(
        tiny_model(), EngineConfig(slots=2, max_len=MAX_LEN, prefill_chunk=CHUNK, truncate="left")
    )
    long = PROMPTS[3] * 3  # 60 tokens: the last 32 - 5 are kept
    _, kept, dropped = left.submit(Request(long, max_tokens=5, greedy=True))
    assert (kept, dropped) == (27, 33)
    out = left.generate([Request(long, max_tokens=5, greedy=True)])[0]
    expected = generate(
        tiny_model(), jnp.array([long[-27:]]), max_new_tokens=5, rng=jax.random.key(0), greedy=True
    )
    assert out.tokens == np.asarray(expected)[0, 27:].tolist()
    full = Engine(tiny_model(), EngineConfig(slots=1, max_len=MAX_LEN, max_queue=2))
    full.submit(Request([1]))
    full.submit(Request([1]))
    with pytest.raises(QueueFull):
        full.submit(Request([1]))
    for bad, message in [
        ({"slots": 0}, "--slots"),
        ({"truncate": "right"}, "--truncate"),
        ({"max_len": 1}, "--max_len"),
        ({"decode_steps": 0}, "--decode_steps"),
    ]:
        with pytest.raises(ConfigError, match=message):
            EngineConfig(**bad)
