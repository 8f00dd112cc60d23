"""The continuous-batching engine's device side (llm.engine): the KV cache of fixed slots, the few
shapes compiled for it, and the calls that run them (llm.model.slot_decode).

The shapes: calls attend over the chunk doubled up to the whole cache (`lengths`); a decode call
computes a power of two of the first slots (`rows`); a prompt's piece is padded to the chunk
halved down to 8 tokens (`chunks`), and so is a packed row of several prompts' first chunks.
`warmup` compiles all of them; the engine asks for nothing else, so serving compiles nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from llm.engine_requests import SlotSampling
from llm.model import slot_decode
from llm.model.transformer import Transformer


class SlotCache:
    """`slots` rows of `max_len` positions (rounded up to whole chunks) on the device, and the
    calls that write and read them; every input is a host array, every call donates the cache."""

    def __init__(
        self,
        model: Transformer,
        slots: int,
        max_len: int,
        chunk: int,
        decode_steps: int,
        vocab_limit: int | None,
    ):
        self.slots, self.decode_steps, self.vocab_limit = slots, decode_steps, vocab_limit
        length = -(-max_len // chunk) * chunk  # a last chunk never writes past the cache
        self.lengths = sorted({min(chunk * 2**i, length) for i in range(length.bit_length())})
        self.rows = sorted({min(2**i, slots) for i in range(slots.bit_length() + 1)})
        halves = {chunk >> i for i in range(chunk.bit_length())}
        self.chunks = sorted({chunk} | {c for c in halves if c >= 8})
        graphdef, self._state = nnx.split(model)
        self._graph = slot_decode.Graph(graphdef)
        self._new_cache = lambda: slot_decode.init_slots(model.cfg, slots, length)
        self._cache = self._new_cache()
        self._placement = None  # the cache's placement once a call has returned it (warmup)

    def length_for(self, needed: int) -> int:
        """The shortest compiled cache length holding `needed` positions."""
        return next(n for n in self.lengths if n >= needed)

    def rows_for(self, slot: int) -> int:
        """The fewest compiled decode rows that reach `slot`."""
        return next(r for r in self.rows if r > slot)

    def warmup(self, sampling: SlotSampling) -> None:
        """Compiles every shape (packed prefill at each chunk size, a later chunk's prefill at each
        longer cache length and chunk size, decode at each length and row count, the slot move).
        Call while every slot is idle (`sampling` all idle)."""
        # A fresh cache is not yet placed like the cache every call returns (with parameters
        # placed on a mesh, a NamedSharding): one call first, so the shapes below are compiled
        # for the cache placement that serving passes; a fresh cache later is put there (`reset`).
        self.prefill_packed([], sampling.take([]), width=self.chunks[0])
        self._placement = jax.tree.map(lambda a: a.sharding, self._cache)
        for chunk in self.chunks:
            self.prefill_packed([], sampling.take([]), width=chunk)
        zeros = np.zeros(self.slots, np.int32)
        for length in self.lengths:
            for chunk in self.chunks if length > self.lengths[0] else ():
                # A later chunk starts at the chunk size or after: past the shortest length.
                self._prefill(0, np.zeros((1, chunk), np.int32), 0, 0, sampling.at(0), length)
            for rows in self.rows:
                tokens = self._decode(zeros[:rows], zeros[:rows], 1, sampling.first(rows), length)
        self.move(0, 0)
        tokens.block_until_ready()

    def reset(self) -> None:
        """An empty cache (a failed call may have consumed the donated one), placed as warmup
        compiled for."""
        self._cache = jax.device_put(self._new_cache(), self._placement)

    def prefill_packed(
        self,
        pieces: Sequence[tuple[int, Sequence[int]]],
        sampling: slot_decode.Sampling,
        width: int | None = None,
    ) -> jax.Array:
        """(slot, first chunk of its prompt) pairs in one call, packed into one row of `width`
        columns (default: the shortest compiled chunk size that holds them) -> int32[slots]: the
        token sampled after each piece's last token (rows past the pieces: ignored)."""
        n = self.slots
        width = width or next(c for c in self.chunks if c >= sum(len(p) for _, p in pieces))
        tokens, positions = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
        segments = np.arange(n, n + width, dtype=np.int32)[None]  # padding: a segment a column
        token_slots = np.full(width, n, np.int32)  # padding: the slot count, written nowhere
        lasts, column = np.zeros(n, np.int32), 0
        for p, (slot, piece) in enumerate(pieces):
            at = slice(column, column + len(piece))
            tokens[0, at], positions[0, at], segments[0, at] = piece, np.arange(len(piece)), p
            token_slots[at], column = slot, column + len(piece)
            lasts[p] = column - 1
        sampled, self._cache = slot_decode.prefill_packed(
            self._graph, self._state, self._cache, tokens, positions, segments, token_slots,
            lasts, sampling, vocab_limit=self.vocab_limit,
        )  # fmt: skip
        return sampled

    def prefill(
        self, slot: int, piece: Sequence[int], start: int, sampling: slot_decode.Sampling
    ) -> jax.Array:
        """A later chunk of a slot's prompt, at positions start.. -> the token sampled after it."""
        tokens = np.zeros((1, next(c for c in self.chunks if c >= len(piece))), np.int32)
        tokens[0, : len(piece)] = piece
        length = self.length_for(start + tokens.shape[1])
        return self._prefill(slot, tokens, start, len(piece) - 1, sampling, length)

    def decode(
        self,
        tokens: np.ndarray,
        index: np.ndarray,
        steps: int,
        sampling: slot_decode.Sampling,
        needed: int,
    ) -> jax.Array:
        """`steps` decode steps of the first rows (tokens, index: [rows], a compiled row count;
        `needed`: the positions the generating rows reach) -> int32[decode_steps, rows]."""
        return self._decode(tokens, index, steps, sampling, self.length_for(needed))

    def move(self, src: int, dst: int) -> None:
        """Copies slot `src`'s keys and values into slot `dst`."""
        self._cache = slot_decode.move(self._cache, np.int32(src), np.int32(dst))

    def _prefill(self, slot, tokens, start, last, sampling, length) -> jax.Array:
        token, self._cache = slot_decode.prefill(
            self._graph, self._state, self._cache, tokens, np.int32(slot), np.int32(start),
            np.int32(last), sampling, vocab_limit=self.vocab_limit, length=length,
        )  # fmt: skip
        return token

    def _decode(self, tokens, index, steps, sampling, length) -> jax.Array:
        rows = len(tokens)
        out, self._cache = slot_decode.decode(
            self._graph, self._state, self._cache, tokens, index, np.int32(steps), sampling,
            vocab_limit=self.vocab_limit, length=length, rows=rows, max_steps=self.decode_steps,
        )  # fmt: skip
        return out
