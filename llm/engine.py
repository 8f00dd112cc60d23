"""Continuous batching: requests join and leave a fixed set of decode slots between steps.

    engine = Engine(model, EngineConfig(slots=8), tokenizer=tokenizer, eos_id=tokenizer.eos_id)
    completions = engine.generate([Request(prompt=ids, max_tokens=32, stop=("\\n\\n",)), ...])

Each step admits queued requests into free slots, writes one chunk of each waiting prompt into its
slot (chunked prefill; the first chunks of several prompts packed into one call), then decodes a
few tokens for every generating slot in one device call (`EngineConfig.decode_steps`, at most the
fewest any of them has left); a request leaves its slot when it meets its stop sequence, the
end-of-sequence token, its max_tokens, or is cancelled, and the next queued request takes the slot
at the following step (the lowest free slot, so a decode call computes the first few slots only).
The device work is llm.engine_slots (the slot cache and its few compiled shapes, over
llm.model.slot_decode); llm.engine_requests holds what one request asks for (checks, sampling
settings, stop sequences); this module is the host-side bookkeeping.
`generate` drives the steps itself; a server runs `serve_forever` in a thread and talks to it
through `submit` / `cancel` (thread-safe), receiving each request's `Delta`s on its callback.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from llm.engine_requests import (
    Completion,
    Delta,
    Request,
    SlotSampling,
    check_request,
    cut_at_stop,
    deliverable,
    detokenize,
)
from llm.engine_slots import SlotCache
from llm.errors import check, is_int
from llm.model.transformer import Transformer

TRUNCATE = ("refuse", "left")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The engine's fixed sizes (flags of llm.serve and llm.engine_benchmark)."""

    slots: int = 8  # requests decoded together
    max_len: int | None = None  # tokens per slot (prompt + output); None: model.max_seq_len
    prefill_chunk: int = 128  # prompt tokens written per prefill call
    max_queue: int = 64  # requests waiting for a slot; more are refused (QueueFull)
    truncate: str = "refuse"  # a prompt too long for max_len - max_tokens: "refuse" or "left"
    # Decode steps per device call, fewer when a request has fewer tokens left; a request that
    # meets its stop sequence or end-of-sequence token mid-call computes the rest for nothing.
    decode_steps: int = 8

    def __post_init__(self):
        for name in ("slots", "prefill_chunk", "max_queue", "decode_steps"):
            value = getattr(self, name)
            check(is_int(value) and value > 0, f"--{name} must be a positive integer, got {value}.")
        check(
            self.max_len is None or (is_int(self.max_len) and self.max_len > 1),
            f"--max_len must be an integer > 1 (or unset: the model's max_seq_len), got "
            f"{self.max_len}.",
        )
        check(
            self.truncate in TRUNCATE,
            f"--truncate must be one of {TRUNCATE} (what to do with a prompt longer than the "
            f"context allows), got {self.truncate!r}.",
        )


class QueueFull(RuntimeError):
    """More requests wait than EngineConfig.max_queue allows."""


@dataclasses.dataclass
class _Job:
    """A request the engine holds, queued or in a slot."""

    id: int
    request: Request
    prompt: list[int]  # after truncation
    truncated: int
    filled: int = 0  # prompt tokens in the cache
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""  # of the generated tokens, cut at a stop sequence
    sent: int = 0  # characters of text already delivered
    sent_tokens: int = 0  # tokens already delivered


class Engine:
    """Fixed decode slots over one preallocated KV cache (see the module docstring)."""

    def __init__(
        self,
        model: Transformer,
        config: EngineConfig = EngineConfig(),
        *,
        tokenizer: Any = None,  # decode(ids) -> str; needed for text and stop sequences
        eos_id: int | None = None,
        vocab_limit: int | None = None,  # the tokenizer's vocabulary when the model's is padded
    ):
        self.config, self.tokenizer, self.eos_id = config, tokenizer, eos_id
        self.max_len = config.max_len or model.cfg.max_seq_len
        self._kv = SlotCache(
            model, config.slots, self.max_len, config.prefill_chunk, config.decode_steps,
            vocab_limit,
        )  # fmt: skip
        self._slots: list[_Job | None] = [None] * config.slots
        self._queue: collections.deque[_Job] = collections.deque()
        self._cancelled: set[int] = set()
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self.finished: collections.Counter[str] = collections.Counter()  # requests per reason
        # Device work done: decode_calls, decode_steps, prefill_calls, prefill_tokens (unpadded).
        self.work: collections.Counter[str] = collections.Counter()
        s = config.slots  # per-slot device inputs, kept on the host
        self._next = np.zeros(s, np.int32)  # the token each slot feeds at its next decode step
        self._index = np.zeros(s, np.int32)  # its position
        self._sampling = SlotSampling(s)

    # Thread-safe entry points.

    def submit(self, request: Request) -> tuple[int, int, int]:
        """Queues a request -> (its id, prompt tokens kept, tokens truncated from the left).
        ValueError for a request that cannot run, QueueFull when the queue is full."""
        prompt, truncated = check_request(
            request, self.max_len, self.config.truncate, self.tokenizer is not None
        )
        with self._cv:
            if len(self._queue) >= self.config.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting; retry later.")
            job = _Job(next(self._ids), request, prompt, truncated)
            self._queue.append(job)
            self._cv.notify()
        return job.id, len(prompt), truncated

    def cancel(self, request_id: int) -> None:
        """Ends a request (queued or in a slot) at the next step; its slot is freed."""
        with self._cv:
            self._cancelled.add(request_id)
            self._cv.notify()

    def load(self) -> tuple[int, int]:
        """(busy slots, queued requests)."""
        with self._cv:
            return sum(job is not None for job in self._slots), len(self._queue)

    def serve_forever(self, stop: threading.Event) -> None:
        """Steps while there is work, waits while there is none, until `stop` is set. A failing
        step ends the requests it held with finish_reason "error"; the loop goes on."""
        while not stop.is_set():
            try:
                worked = self.step()
            except Exception:  # noqa: BLE001  (a failed step must not take the server down)
                logging.exception("engine step failed; its requests end with an error")
                self._fail_all()
                continue
            if not worked:
                with self._cv:
                    self._cv.wait_for(
                        lambda: self._queue or self._cancelled or stop.is_set(), timeout=0.5
                    )

    # The engine's own thread (or generate's caller).

    def warmup(self) -> None:
        """Compiles every shape the engine runs (llm.engine_slots), so no request waits for a
        compilation. Call while no request is in a slot."""
        self._kv.warmup(self._sampling)

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """Runs `requests` to completion (queued beyond the slots) -> their completions, in order.
        The engine must not be serving another thread meanwhile."""
        completions = []
        for request in requests:
            completion = Completion([], "", None, 0, 0)

            def collect(delta: Delta, c: Completion = completion, user=request.on_delta) -> None:
                c.tokens += delta.tokens
                c.text += delta.text
                c.finish_reason = delta.finish_reason
                if user is not None:
                    user(delta)

            _, completion.prompt_tokens, completion.truncated = self.submit(
                dataclasses.replace(request, on_delta=collect)
            )
            completions.append(completion)
        while any(c.finish_reason is None for c in completions):
            self.step()
        return completions

    def step(self) -> bool:
        """Admits (or, with none queued, moves requests into lower slots), prefills one chunk of
        each waiting prompt, decodes a few tokens per generating slot. False when idle."""
        with self._cv:
            cancelled, self._cancelled = self._cancelled, set()
            for job in [j for j in self._queue if j.id in cancelled]:
                self._queue.remove(job)
                self.finished["cancelled"] += 1
                self._emit(job, "cancelled")
            for slot, job in enumerate(self._slots):
                if job is not None and job.id in cancelled:
                    self._finish(slot, "cancelled")
            for slot in range(len(self._slots)):
                if self._slots[slot] is None and self._queue:
                    self._admit(slot, self._queue.popleft())
            if not self._queue:
                self._compact()
        waiting = [
            s for s, j in enumerate(self._slots) if j is not None and j.filled < len(j.prompt)
        ]
        started = [s for s in waiting if self._slots[s].filled > 0]
        for group in self._packs([s for s in waiting if s not in started]):
            self._prefill_packed(group)  # first chunks, several to a call
        for slot in started:
            self._prefill(slot)  # a long prompt's later chunks, one to a call
        generating = [s for s, j in enumerate(self._slots) if j is not None and j.tokens]
        if generating:
            self._decode(generating)
        return bool(waiting or generating)

    def _admit(self, slot: int, job: _Job) -> None:
        self._slots[slot] = job
        self._index[slot] = 0
        self._sampling.admit(slot, job.request)

    def _compact(self) -> None:
        """Moves requests from the highest slots into free lower ones, so decode steps compute
        fewer rows once nothing waits to take those slots."""
        while None in self._slots:
            free, last = (
                self._slots.index(None),
                max((s for s, j in enumerate(self._slots) if j is not None), default=-1),
            )
            if last < free:
                return
            self._kv.move(last, free)
            self._slots[free], self._slots[last] = self._slots[last], None
            self._next[free], self._index[free], self._index[last] = (
                self._next[last],
                self._index[last],
                0,
            )
            self._sampling.move(last, free)

    def _prefill(self, slot: int) -> None:
        job, start = self._slots[slot], self._slots[slot].filled
        piece = job.prompt[start : start + self.config.prefill_chunk]
        token = self._kv.prefill(slot, piece, start, self._sampling.at(slot))
        self.work.update(prefill_calls=1, prefill_tokens=len(piece))
        job.filled += len(piece)
        self._index[slot] = job.filled  # an idle slot's decode row writes past what it holds
        if job.filled == len(job.prompt):
            self._take(slot, int(token))

    def _packs(self, slots: list[int]) -> list[list[int]]:
        """The slots of prompts not yet started, grouped so that each group's first chunks fit
        one row of prefill_chunk tokens (first fit, longest first)."""
        size = lambda slot: min(len(self._slots[slot].prompt), self.config.prefill_chunk)
        groups, room = [], []
        for slot in sorted(slots, key=size, reverse=True):
            i = next((i for i, free in enumerate(room) if free >= size(slot)), len(groups))
            if i == len(groups):
                groups.append([])
                room.append(self.config.prefill_chunk)
            groups[i].append(slot)
            room[i] -= size(slot)
        return groups

    def _prefill_packed(self, slots: list[int]) -> None:
        """The first chunks of these slots' prompts in one call, packed into one row
        (llm.model.slot_decode.prefill_packed)."""
        pieces = [self._slots[s].prompt[: self.config.prefill_chunk] for s in slots]
        sampled = self._kv.prefill_packed(list(zip(slots, pieces)), self._sampling.take(slots))
        self.work.update(prefill_calls=1, prefill_tokens=sum(map(len, pieces)))
        for slot, piece, token in zip(slots, pieces, np.asarray(sampled)):
            job = self._slots[slot]
            job.filled = len(piece)
            self._index[slot] = job.filled  # an idle slot's decode row writes past what it holds
            if job.filled == len(job.prompt):
                self._take(slot, int(token))

    def _decode(self, slots: list[int]) -> None:
        jobs = {slot: self._slots[slot] for slot in slots}
        rows = self._kv.rows_for(max(slots))
        steps = min(
            self.config.decode_steps, *(j.request.max_tokens - len(j.tokens) for j in jobs.values())
        )
        # The generating rows write positions index..index+steps-1 (other rows' writes past the
        # length attended are dropped, and they hold nothing there).
        tokens = self._kv.decode(
            self._next[:rows].copy(),  # copies: a call's inputs must not change while it runs
            self._index[:rows].copy(),
            steps,
            self._sampling.first(rows),
            needed=int(self._index[slots].max()) + steps,
        )
        tokens = np.asarray(tokens)  # [decode_steps, rows]
        self.work.update(decode_calls=1, decode_steps=steps)
        for step in range(steps):
            for slot, job in jobs.items():
                if self._slots[slot] is job:  # not finished at an earlier step
                    self._take(slot, int(tokens[step, slot]))

    def _take(self, slot: int, token: int) -> None:
        """A slot's new token: ends the request or queues the token for the next decode step."""
        job = self._slots[slot]
        if token == self.eos_id:
            return self._finish(slot, "stop")
        job.tokens.append(token)
        reason = "length" if len(job.tokens) == job.request.max_tokens else None
        if self.tokenizer is not None:
            job.text, stopped = cut_at_stop(
                detokenize(self.tokenizer, job.prompt, job.tokens), job.request.stop
            )
            reason = "stop" if stopped else reason
        if reason is not None:
            return self._finish(slot, reason)
        self._next[slot] = token
        self._index[slot] = len(job.prompt) + len(job.tokens) - 1
        self._sampling.rows.count[slot] = len(job.tokens)
        self._emit(job, None)

    def _emit(self, job: _Job, finish_reason: str | None) -> None:
        """Delivers the new tokens and the text that may be streamed (`deliverable`)."""
        end = deliverable(job.text, job.sent, job.request.stop, finish_reason is not None)
        delta = Delta(job.text[job.sent : end], tuple(job.tokens[job.sent_tokens :]), finish_reason)
        job.sent, job.sent_tokens = end, len(job.tokens)
        if job.request.on_delta is not None:
            job.request.on_delta(delta)

    def _finish(self, slot: int, reason: str) -> None:
        job, self._slots[slot] = self._slots[slot], None
        self.finished[reason] += 1
        self._sampling.clear(slot)
        self._index[slot] = 0
        self._emit(job, reason)

    def _fail_all(self) -> None:
        """Ends every request in a slot with "error" and starts over from an empty cache (a
        failed call may have consumed the donated one), placed as warmup compiled for."""
        with self._cv:
            for slot, job in enumerate(self._slots):
                if job is not None:
                    self._finish(slot, "error")
            self._kv.reset()
