"""Throughput and latency of three ways to serve one skewed mix of requests, in one run.

    python -m llm.engine_benchmark                        # the default model at random init
    python -m llm.engine_benchmark --config.model.embed_dim=512 --config.model.num_layers=8
    python -m llm.engine_benchmark --workdir=/tmp/default --requests=64 --slots=8

The mix: most prompts short and a few long, most outputs short and a few long (all requests
arriving at once, greedy, no end-of-sequence token, so every way produces exactly max_tokens per
request: equal outputs). The ways:
  one at a time  llm.model.decode.generate per request (batch of one, exact lengths)
  static         generate on batches of --slots requests in arrival order, prompts left-padded to
                 the batch's longest (the padding masked), every row decoding the batch's largest
                 max_tokens
  engine         llm.engine: --slots decode slots, chunked prefill, requests join as others leave,
                 --decode_steps steps per device call
Compilation is excluded (every shape is run once before timing, and compilations inside the timed
sections are counted: there must be none); the three ways run --repeats times, interleaved, and
each way's fastest round is shown, with its least CPU time (this process's, steadier than wall
time on a shared machine), and the median over rounds of the engine's ratio to static batching
within a round. Prints tokens/s (generated tokens only), per-request latency (arrival
to last token), the device work of static batching and of the engine (decode steps and calls,
prompt tokens and prefill calls: `Engine.work`), and whether static batching's and the engine's
tokens equal the one-at-a-time ones. CPU figures are CPU figures, not accelerator performance.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from llm import config as config_lib
from llm.engine import Engine, EngineConfig, Request
from llm.errors import ConfigError, check
from llm.model.decode import generate
from llm.model.transformer import Transformer
from llm.runs import load_model
from llm.science.flops import param_counts

PROMPT_LENGTHS = ((8, 0.35), (16, 0.3), (32, 0.2), (128, 0.15))  # (tokens, share of requests)
OUTPUT_LENGTHS = ((8, 0.45), (16, 0.4), (128, 0.15))


class Meter:
    """Over the timed sections: XLA compilations (a jax.monitoring listener, registered by main),
    which must be none, and this process's CPU seconds (`cpu`: the last section's), a steadier
    measure than wall time on a machine other jobs share."""

    compilations = compiled_while_timing = 0
    cpu = 0.0

    @classmethod
    def listen(cls, event: str, duration: float, **kwargs) -> None:
        cls.compilations += event == "/jax/core/compile/backend_compile_duration"

    @classmethod
    @contextlib.contextmanager
    def timed(cls):
        before, start = cls.compilations, time.process_time()
        yield
        cls.cpu = time.process_time() - start
        cls.compiled_while_timing += cls.compilations - before


def skewed_mix(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """n (prompt ids, max_tokens) drawn from PROMPT_LENGTHS x OUTPUT_LENGTHS."""
    rng = np.random.default_rng(seed)
    draw = lambda table: [
        int(x) for x in rng.choice([t for t, _ in table], n, p=[p for _, p in table])
    ]
    prompts, outputs = draw(PROMPT_LENGTHS), draw(OUTPUT_LENGTHS)
    return [(rng.integers(1, vocab, p).tolist(), o) for p, o in zip(prompts, outputs)]


def _greedy(model, prompts: np.ndarray, new: int, lengths=None) -> np.ndarray:
    out = generate(
        model,
        jnp.asarray(prompts),
        max_new_tokens=new,
        rng=jax.random.key(0),
        greedy=True,
        prompt_lengths=lengths,
    )
    return np.asarray(out)[:, prompts.shape[1] :]


def one_at_a_time(model, mix) -> tuple[list[list[int]], list[float]]:
    """Each request alone -> (its tokens, its finish time from the start)."""
    for shape in {(len(p), n) for p, n in mix}:  # compile every shape first
        _greedy(model, np.zeros((1, shape[0]), np.int32), shape[1])
    start, outputs, done = time.perf_counter(), [], []
    with Meter.timed():
        for prompt, new in mix:
            outputs.append(_greedy(model, np.array([prompt], np.int32), new)[0].tolist())
            done.append(time.perf_counter() - start)
    return outputs, done


def static_batches(model, mix, size: int) -> tuple[list[list[int]], list[float], dict]:
    """Batches of `size` in arrival order, left-padded to their longest prompt (the padding
    masked), every row decoding the batch's largest max_tokens -> (each request's first
    max_tokens tokens, finish times: a request finishes with its batch, the device work: tokens
    decoded per row over the batches, padded prompt tokens)."""
    batches = [mix[i : i + size] for i in range(0, len(mix), size)]

    def padded(batch):
        width = max(len(p) for p, _ in batch)
        rows = np.zeros((len(batch), width), np.int32)
        for row, (prompt, _) in zip(rows, batch):
            row[width - len(prompt) :] = prompt  # left-padded: every row's last token at the end
        return rows, max(n for _, n in batch), [len(p) for p, _ in batch]

    shapes = {(rows.shape, new): (rows, new, n) for rows, new, n in map(padded, batches)}
    for rows, new, lengths in shapes.values():
        _greedy(model, rows, new, lengths)  # compile
    start, outputs, done = time.perf_counter(), [], []
    with Meter.timed():
        for batch in batches:
            out = _greedy(model, *padded(batch))
            done += [time.perf_counter() - start] * len(batch)
            outputs += [row[:n].tolist() for row, (_, n) in zip(out, batch)]
    work = {"decode_tokens": 0, "prompt_tokens": 0}
    for rows, new, _ in map(padded, batches):
        work["decode_tokens"] += new
        work["prompt_tokens"] += rows.size
    return outputs, done, work


def engine_run(model, mix, config: EngineConfig) -> tuple[list[list[int]], list[float], dict]:
    """All requests submitted at once to a fresh engine -> (tokens, finish times, its device work:
    Engine.work)."""
    engine = Engine(model, config)
    engine.warmup()
    done = [0.0] * len(mix)
    start = time.perf_counter()

    def finish_time(i):
        def on_delta(delta):
            if delta.finish_reason is not None:
                done[i] = time.perf_counter() - start

        return on_delta

    requests = [
        Request(p, max_tokens=n, greedy=True, on_delta=finish_time(i))
        for i, (p, n) in enumerate(mix)
    ]
    with Meter.timed():
        completions = engine.generate(requests)
    return [c.tokens for c in completions], done, dict(engine.work)


def report(name: str, tokens: int, done: list[float], cpu: float, base) -> tuple[str, tuple]:
    """A table row; `base`: static batching's (tokens/s, tokens per CPU second) or None."""
    rates = (tokens / max(done), tokens / cpu)
    lat = np.percentile(done, [50, 99]) * 1000
    vs = [f"{r / b:.2f}x" for r, b in zip(rates, base or rates)]
    line = (
        f"| {name} | {rates[0]:,.0f} | {vs[0]} | {lat[0]:,.0f} | {lat[1]:,.0f} | {max(done):.2f} "
        f"| {cpu:.2f} | {vs[1]} |"
    )
    return line, rates


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:  # a bad setting: one line and exit status 2, before anything is loaded or compiled
        for name in ("requests", "repeats"):
            value = getattr(f, name)
            check(value > 0, f"--{name} must be a positive integer, got {value}.")
        config = EngineConfig(
            slots=f.slots,
            max_len=f.max_len,
            prefill_chunk=f.prefill_chunk,
            max_queue=f.requests,
            decode_steps=f.decode_steps,
        )
        check(
            not ((f.workdir or f.hf) and any(a.startswith("--config") for a in sys.argv)),
            "--config describes the model at random init; a --workdir or --hf model has its own: "
            "pass one or the other.",
        )
        model_cfg = None if f.workdir or f.hf else config_lib.model_config(f.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    jax.monitoring.register_event_duration_secs_listener(Meter.listen)
    if f.workdir or f.hf:
        model, _, _ = load_model(f.workdir, f.hf)
    else:
        model = Transformer(model_cfg, rngs=nnx.Rngs(0))
    mix = skewed_mix(f.requests, model.cfg.vocab_size, f.seed)
    total = sum(n for _, n in mix)
    print(
        f"{len(mix)} requests, prompts {sorted({len(p) for p, _ in mix})} tokens, outputs "
        f"{sorted({n for _, n in mix})}; {total} tokens generated per way; the model "
        f"{param_counts(model.cfg)['total'] / 1e6:.1f}M "
        f"parameters, {model.cfg.dtype}; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {jax.devices()[0].device_kind}"
    )
    rounds = []  # the ways interleaved, so a change in the machine's load hits them alike
    for i in range(f.repeats):
        single, single_done = one_at_a_time(model, mix)
        single_cpu = Meter.cpu
        static, static_done, static_work = static_batches(model, mix, f.slots)
        static_cpu = Meter.cpu
        tokens, engine_done, work = engine_run(model, mix, config)
        rounds.append(
            ((single_done, single_cpu), (static_done, static_cpu), (engine_done, Meter.cpu))
        )
        print(
            f"round {i + 1}: all done in {max(single_done):.2f} / {max(static_done):.2f} / "
            f"{max(engine_done):.2f} s (one / static / engine), engine vs static "
            f"{max(static_done) / max(engine_done):.2f}x (CPU {static_cpu / Meter.cpu:.2f}x); "
            f"load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    # Each way's fastest round (wall time), and its least CPU time over the rounds.
    (single_done, static_done, engine_done), (single_cpu, static_cpu, engine_cpu) = zip(
        *((min((d for d, _ in way), key=max), min(c for _, c in way)) for way in zip(*rounds))
    )
    print(
        "| way | tokens/s | vs static | latency p50 (ms) | p99 (ms) | all done (s) | CPU s "
        "| vs static (CPU) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    static_line, base = report(f"static batches of {f.slots}", total, static_done, static_cpu, None)
    print(report("one at a time", total, single_done, single_cpu, base)[0])
    print(static_line)
    print(report(f"engine, {f.slots} slots", total, engine_done, engine_cpu, base)[0])
    # Rounds run back to back, so their ratio is steadier than the fastest rounds' when the
    # machine's speed drifts: the median over rounds, with the range.
    for measure, ratio in (
        ("wall", lambda r: max(r[1][0]) / max(r[2][0])),
        ("CPU", lambda r: r[1][1] / r[2][1]),
    ):
        ratios = [ratio(r) for r in rounds]
        print(
            f"engine vs static per round ({measure} time): median {np.median(ratios):.2f}x, "
            f"range {min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} rounds"
        )
    print(
        f"device work: static batching decodes {static_work['decode_tokens']} tokens per row over "
        f"its batches and prefills {static_work['prompt_tokens']:,} padded prompt tokens; the "
        f"engine ran {work['decode_steps']} decode steps in {work['decode_calls']} calls and "
        f"prefilled {work['prefill_tokens']:,} prompt tokens in {work['prefill_calls']} calls"
    )
    for name, way in (("static", static), ("engine", tokens)):
        same = sum(a == b for a, b in zip(way, single))
        print(f"{name} tokens equal to one-at-a-time: {same}/{len(mix)} requests")
    print(f"compilations while timing: {Meter.compiled_while_timing}")


if __name__ == "__main__":
    config_lib.define_config_flag()  # the model at random init, without --workdir or --hf
    flags.DEFINE_string("workdir", None, "A training run (DIR[@STEP]); default: random init.")
    flags.DEFINE_string("hf", None, "A Hugging Face model directory.")
    flags.DEFINE_integer("requests", 32, "Requests in the mix.")
    flags.DEFINE_integer("slots", EngineConfig.slots, "Engine slots, and the static batch size.")
    flags.DEFINE_integer("max_len", 256, "Tokens per engine slot.")
    flags.DEFINE_integer("prefill_chunk", EngineConfig.prefill_chunk, "Prompt tokens per call.")
    flags.DEFINE_integer(
        "decode_steps", EngineConfig.decode_steps, "Engine decode steps per device call."
    )
    flags.DEFINE_integer("seed", 0, "Seed of the mix.")
    flags.DEFINE_integer("repeats", 3, "Rounds of all three ways; each way's fastest is shown.")
    app.run(main, flags_parser=config_lib.parse_flags)
