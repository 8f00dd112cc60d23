"""What one request of llm.engine asks for and gets back: the request and its checks, its
sampling settings as rows of the slots' device inputs, and its stop handling (a stop sequence
cuts the text; text that may still become one is held back from the stream).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llm.errors import is_int
from llm.model import slot_decode
from llm.model.decode import check_sampling


@dataclasses.dataclass(frozen=True)
class Request:
    """One completion: prompt token ids and how to continue them. temperature 0 = greedy."""

    prompt: Sequence[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    stop: Sequence[str] = ()  # text that ends the completion (excluded); needs a tokenizer
    seed: int = 0
    on_delta: Callable[[Delta], None] | None = None  # called on the engine's thread


@dataclasses.dataclass(frozen=True)
class Delta:
    """What a request produced since its last delta; the last one has a finish_reason:
    "stop" (stop sequence or end-of-sequence token), "length", "cancelled" or "error"."""

    text: str
    tokens: tuple[int, ...]
    finish_reason: str | None = None


@dataclasses.dataclass
class Completion:
    """A finished request: the generated ids (the end-of-sequence token excluded) and text."""

    tokens: list[int]
    text: str
    finish_reason: str | None
    prompt_tokens: int
    truncated: int  # prompt tokens dropped from the left (truncate="left")


def check_request(
    request: Request, max_len: int, truncate: str, has_tokenizer: bool
) -> tuple[list[int], int]:
    """The prompt to run (truncated from the left if `truncate` is "left") and the count dropped;
    ValueError naming what is wrong with a request that cannot run."""
    r, prompt = request, list(request.prompt)
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token.")
    if not (is_int(r.max_tokens) and r.max_tokens >= 1):
        raise ValueError(f"max_tokens must be an integer >= 1, got {r.max_tokens!r}.")
    check_sampling(r.max_tokens, r.temperature, r.top_k, r.top_p, r.greedy or r.temperature == 0)
    if r.stop and not has_tokenizer:
        raise ValueError("stop sequences need the engine's tokenizer.")
    room = max_len - r.max_tokens  # prompt tokens that fit
    if len(prompt) <= room:
        return prompt, 0
    if truncate == "refuse" or room < 1:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({r.max_tokens}) exceeds the context "
            f"of {max_len} tokens; shorten the prompt or lower max_tokens (prompts are "
            f"refused, not truncated{'' if room < 1 else '; --truncate=left cuts them'})."
        )
    return prompt[-room:], len(prompt) - room


class SlotSampling:
    """Each slot's sampling settings, kept on the host as the rows of slot_decode.Sampling; an
    idle slot's row is greedy, which keeps all-greedy steps on the fast path. One more row, after
    the slots', stays idle: the padding rows of `take`."""

    def __init__(self, slots: int):
        self.slots = slots
        self.rows = slot_decode.Sampling(
            np.ones(slots + 1, np.float32),  # temperature
            np.zeros(slots + 1, np.int32),  # top_k
            np.ones(slots + 1, np.float32),  # top_p
            np.ones(slots + 1, bool),  # greedy
            np.zeros(slots + 1, np.uint32),  # seed
            np.zeros(slots + 1, np.int32),  # count
        )

    def admit(self, slot: int, r: Request) -> None:
        greedy = r.greedy or r.temperature == 0
        values = (1.0 if greedy else r.temperature, r.top_k, r.top_p, greedy, r.seed % 2**32, 0)
        for field, value in zip(self.rows, values):
            field[slot] = value

    def clear(self, slot: int) -> None:
        self.rows.greedy[slot], self.rows.temperature[slot] = True, 1.0

    def move(self, src: int, dst: int) -> None:
        for field in self.rows:
            field[dst] = field[src]
        self.clear(src)

    def first(self, n: int) -> slot_decode.Sampling:
        """The first n slots' rows (copies: a call's inputs must not change while it runs)."""
        return slot_decode.Sampling(*(field[:n].copy() for field in self.rows))

    def take(self, slots: Sequence[int]) -> slot_decode.Sampling:
        """These slots' rows, then idle (greedy) rows up to the slot count."""
        picked = list(slots) + [self.slots] * (self.slots - len(slots))
        return slot_decode.Sampling(*(field[picked] for field in self.rows))

    def at(self, slot: int) -> slot_decode.Sampling:
        """One slot's row (a batch of one), copied like `first`'s."""
        return slot_decode.Sampling(*(field[slot : slot + 1].copy() for field in self.rows))


def detokenize(tokenizer: Any, prompt: list[int], tokens: list[int]) -> str:
    """The text of `tokens`, decoded after a few prompt tokens so word boundaries come out as
    the tokenizer writes them mid-text (sentencepiece drops a leading space)."""
    context = prompt[-4:]
    return tokenizer.decode(context + tokens)[len(tokenizer.decode(context)) :]


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to its first stop sequence, and whether it had one."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def deliverable(text: str, sent: int, stop: Sequence[str], final: bool) -> int:
    """How much of `text` may be streamed: all of it at the end; while running, not what may
    still become a stop sequence, nor an incomplete character (at least `sent`)."""
    end = len(text)
    if not final:
        end = max(sent, end - max((len(s) - 1 for s in stop), default=0))
        while end > sent and text[end - 1] == "\ufffd":
            end -= 1
    return end
